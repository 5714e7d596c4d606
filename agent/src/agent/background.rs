//! The agent's background tasks: policy reloads, archive retention, backend addresses.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::signal::unix::SignalKind;
use tracing::{info, warn};

use crate::{archive::service::Archive, proxy::Proxy};

/// Reload the policies on SIGHUP and when their files change (checked every 2 s). A set that
/// does not validate leaves the one in force.
pub(super) async fn watch_policies(store: Arc<crate::policy::store::PolicyStore>) {
    let mut hup = tokio::signal::unix::signal(SignalKind::hangup())
        .inspect_err(
            |e| warn!(error = %e, "cannot listen for SIGHUP; policy files are still watched"),
        )
        .ok();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let sighup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        let why = tokio::select! {
            _ = sighup => "SIGHUP",
            _ = tick.tick() => {
                if !store.changed_on_disk() {
                    continue;
                }
                "files changed"
            }
        };
        reload(&store, why);
    }
}

pub(super) fn reload(store: &crate::policy::store::PolicyStore, why: &str) {
    match store.reload() {
        Ok(hash) => {
            info!(reason = why, policy = %hash, "policies reloaded");
            crate::observe::event(crate::observe::AgentEvent::PolicyReloaded {
                hash: hash.to_string(),
                reason: why.into(),
            });
        }
        Err(e) => {
            warn!(reason = why, errors = %e, "new policies are invalid; the previous ones stay in force");
            crate::observe::event(crate::observe::AgentEvent::PolicyRefused {
                error: e.to_string(),
                reason: why.into(),
            });
        }
    }
}

/// Hourly retention pass (the first one ran at start).
pub(super) async fn retention(archive: Archive, days: u32) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    tick.tick().await;
    loop {
        tick.tick().await;
        apply_retention(&archive, days).await;
    }
}

pub(super) async fn apply_retention(archive: &Archive, days: u32) {
    if days == 0 {
        return;
    }
    match archive.retention(days, today()).await {
        Ok(removed) if !removed.is_empty() => {
            info!(files = removed.len(), "retention removed old archive files")
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "retention failed"),
    }
}

/// Re-resolve backend names periodically; a failed lookup keeps the previous addresses, and
/// so does a change that would make backends share an address in a way the configuration or
/// the policies do not allow.
pub(super) async fn refresh_targets(
    proxy: Arc<Proxy>,
    policies: Arc<crate::policy::store::PolicyStore>,
) {
    if !proxy.config.resolves_names() {
        return; // all static
    }
    let mut tick = tokio::time::interval(proxy.config.resolve_interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        match proxy.config.resolve().await {
            Ok(fresh) => {
                let changed = proxy.targets.read().map(|c| *c != fresh).unwrap_or(true);
                if !changed {
                    continue;
                }
                let shared = crate::config::shared_backends(&proxy.config.backends, &fresh);
                if let Err(e) = policies.set_shared(shared) {
                    warn!(error = %e, "new backend addresses refused; keeping the previous ones");
                    continue;
                }
                let applied = proxy.kernel.lock().map(|mut k| k.set_targets(&fresh));
                match applied {
                    Ok(Ok(())) => {
                        info!(targets = fresh.len(), "backend addresses changed");
                        if let Ok(mut c) = proxy.targets.write() {
                            *c = fresh;
                        }
                    }
                    Ok(Err(e)) => warn!(error = %e, "cannot update backend addresses"),
                    Err(_) => warn!("kernel state lock poisoned"),
                }
            }
            Err(e) => {
                warn!(error = %e, "backend resolution failed or refused; keeping the previous addresses")
            }
        }
    }
}

/// Days since the epoch, UTC.
fn today() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0)
}
