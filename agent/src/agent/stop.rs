//! Shutdown: what ends the agent, and the order its parts stop in.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{signal::unix::SignalKind, sync::mpsc};
use tracing::{info, warn};

use crate::{
    archive::service::Archive,
    config::{Config, OnAgentDown},
    proxy::Proxy,
};

use super::{Pins, RunError};

/// SIGTERM, SIGINT or an admin request (`airlock detach`): what ended the agent. The handlers
/// are installed before the future is awaited.
pub(super) fn wait_for_stop<'a>(
    shutdown_rx: &'a mut mpsc::Receiver<&'static str>,
) -> Result<impl std::future::Future<Output = &'static str> + 'a, RunError> {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).map_err(|source| {
        RunError::StateDir {
            path: "signal handler".into(),
            source,
        }
    })?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).map_err(|source| {
        RunError::StateDir {
            path: "signal handler".into(),
            source,
        }
    })?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            Some(why) = shutdown_rx.recv() => why,
        }
    })
}

/// What runs once the agent is live, stopped in order at shutdown.
pub(super) struct Running<'a> {
    pub(super) config: &'a Config,
    pub(super) proxy: &'a Arc<Proxy>,
    /// Accept loops, resolver, namespace sweep, retention, policy watcher: stopped first.
    pub(super) background: Vec<tokio::task::AbortHandle>,
    pub(super) admin: tokio::task::AbortHandle,
    pub(super) metrics: Option<tokio::task::AbortHandle>,
    pub(super) guard_stop: Arc<std::sync::atomic::AtomicBool>,
    /// The refusals, netwatch and cgroup-watch threads.
    pub(super) threads: Vec<std::thread::JoinHandle<()>>,
    pub(super) pins_task: tokio::task::JoinHandle<()>,
    pub(super) pins: Pins,
    pub(super) archive: Archive,
    pub(super) shipper: Option<Arc<crate::ship::Shipper>>,
    pub(super) events: Option<Arc<crate::events::Events>>,
}

impl Running<'_> {
    /// No new connections; live ones drained (up to `drain_timeout_secs`); background work
    /// stopped; tool pins, the archive, the shipper and the events flushed.
    pub(super) async fn stop(self, why: &'static str) {
        info!(
            reason = why,
            "shutting down: no new connections, draining live ones"
        );
        crate::observe::event(crate::observe::AgentEvent::Stopped { reason: why.into() });
        let _ = crate::notify::notify("STOPPING=1");
        for t in &self.background {
            t.abort();
        }
        let deadline = Instant::now() + self.config.drain_timeout;
        while self.proxy.registry.live_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.proxy.registry.live_count();
        if left > 0 {
            warn!(
                left,
                "drain timeout reached; closing the remaining connections"
            );
        }
        self.admin.abort();
        if let Some(t) = &self.metrics {
            t.abort();
        }
        let _ = std::fs::remove_file(self.config.admin_socket());
        self.guard_stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        // Tool pins changed since the last save go to disk before the agent exits.
        self.pins_task.abort();
        let (path, snapshot) = {
            let mut p = self.pins.lock().unwrap_or_else(|p| p.into_inner());
            (p.path().to_owned(), p.take_snapshot())
        };
        if let Some(bytes) = snapshot
            && let Err(e) = crate::policy::pins::write_atomically(&path, &bytes)
        {
            warn!(error = %e, "cannot save the tool pins");
        }
        // Everything recorded goes into Parquet before the agent exits.
        match self.archive.close().await {
            Ok(()) => info!("archive flushed"),
            Err(e) => {
                warn!(error = %e, "archive flush failed; the write-ahead segments are recovered at the next start")
            }
        }
        // What the flush published goes to the bucket too, if it can in a few seconds.
        if let Some(s) = &self.shipper {
            s.finish(Duration::from_secs(10)).await;
        }
        // Events queued so far reach their file, syslog receiver or spool before the exit.
        if let Some(events) = self.events {
            let flushed = tokio::task::spawn_blocking(move || events.flush(Duration::from_secs(3)))
                .await
                .unwrap_or(false);
            if !flushed {
                warn!("some audit events were not written before the exit (a sink is down)");
            }
        }
        if self.config.on_agent_down == OnAgentDown::Block
            && crate::kernel::is_pinned(&self.config.bpffs_dir)
        {
            info!(
                "programs stay attached: connections to backends are refused until the agent is back (`airlock detach` to remove them)"
            );
        }
    }
}
