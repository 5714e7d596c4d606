//! `airlock run`: start-up order, the background tasks, graceful shutdown.
//!
//! Start-up order matters for fail-closed behaviour: listeners are bound *before* the programs
//! are (re)attached, so from the moment a redirect exists there is an agent to receive it.
//!
//! - this file: [`run`], the phases in order;
//! - `start`: each start-up phase; `stop`: what ends the agent and the order of its stop;
//! - `control`: the admin socket's requests; `background`: policy reloads, retention, the
//!   backends' addresses.

mod background;
mod control;
mod start;
mod stop;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc;
use tracing::info;

use crate::{
    admin,
    attribution::NameCache,
    cgroup,
    config::{Config, ConfigError},
    proxy::{AgentCounters, Proxy},
    registry::Registry,
};

use background::{refresh_targets, retention, watch_policies};
use start::{
    Prepared, attach, go_live, listen, prepare, session_prefix, start_events, start_guards,
    start_metrics, start_pipeline, start_tls, warn_if_unprivileged,
};
use stop::{Running, wait_for_stop};

/// The tool pins, shared by the pipeline and the shutdown's last save.
type Pins = Arc<Mutex<crate::policy::pins::ToolPins>>;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Scope(String),
    #[error("airlock run needs root (it loads eBPF programs and marks sockets); you are uid {0}")]
    NotRoot(u32),
    #[error(
        "cannot listen on {addr}: {source}; is another agent running? (`listen_port` in airlock.toml)"
    )]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("state directory {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    #[error("cannot read CLOCK_BOOTTIME: {0}")]
    Clock(#[source] nix::Error),
    #[error("archive {path}: {message}")]
    Archive {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(
        "another agent is running with this state directory ({path} is locked: {reason}); stop it first, or use another `state_dir`"
    )]
    AlreadyRunning {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("shipping the archive: {0}")]
    Ship(#[from] crate::ship::ShipError),
    #[error("brokered credentials: {0}")]
    Credentials(String),
    #[error("TLS interception cannot start: {0}")]
    Tls(#[source] crate::proxy::intercept::TlsStartError),
    #[error("invalid policies (fix them, or check with `airlock policy check`):\n{0}")]
    Policy(#[from] crate::policy::PolicyErrors),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::server::BindError),
    #[error("audit events (`[events]` in airlock.toml): {0}")]
    Events(#[from] crate::events::EventsError),
    #[error("cannot start the connection threads: {0}")]
    Threads(#[source] std::io::Error),
}

pub async fn run(config: Config) -> Result<(), RunError> {
    let uid = nix::unistd::geteuid().as_raw();
    if uid != 0 {
        return Err(RunError::NotRoot(uid));
    }
    // One agent per state directory: a second one would recover (and delete) the write-ahead
    // segments the first is writing. Held until the process exits.
    let Prepared {
        _lock,
        targets,
        archive,
        shipper,
        policies,
    } = prepare(&config).await?;
    let cgroup = cgroup::resolve(config.cgroup.as_deref())?;

    let (listeners, listening_since_ns, host_netns) = listen(config.listen_port)?;
    // Metrics: families fed from now on; the endpoint bound before the programs attach.
    let metrics = start_metrics(&config).await?;

    let (kernel, own) = attach(&config, &cgroup, host_netns, &targets)?;
    // The shipper dials the bucket as the agent's own from here on (never redirected to itself).
    if let Some(s) = &shipper {
        s.dial_as_own(own.clone());
    }
    // Audit events observe every decision from here on (before any traffic is accepted).
    let events = start_events(&config, &own)?;
    info!(
        cgroup = %cgroup.display(),
        port = config.listen_port,
        targets = targets.len(),
        on_agent_down = ?config.on_agent_down,
        "redirecting connections to backends"
    );
    warn_if_unprivileged(config.listen_port);

    let tls = start_tls(&config)?;
    let (pipeline, pins, pins_task) = start_pipeline(&config, &own, &policies, &archive)?;
    let proxy = Arc::new(Proxy {
        backends: config.backends.iter().cloned().map(Arc::new).collect(),
        config: config.clone(),
        kernel: crate::proxy::state::KernelCell::new(kernel),
        registry: Arc::new(Registry::new(config.recent_connections)),
        counters: AgentCounters::default(),
        names: Arc::new(NameCache::new(Duration::from_secs(60))),
        listening_since_ns,
        archive: archive.clone(),
        session_prefix: session_prefix(),
        pipeline,
        tls,
        upstream_pool: Default::default(),
        own,
        targets: std::sync::RwLock::new(targets),
        host_netns,
        namespaces: Mutex::new(crate::netns::Registry::default()),
        threads: std::sync::OnceLock::new(),
        enrolling: Mutex::new(()),
        cgroup: cgroup.clone(),
        cgroup_mount: cgroup::resolve(None).unwrap_or_else(|_| cgroup.clone()),
        resources: Arc::new(crate::limits::Limits::new(
            config.max_connections_per_uid,
            config.max_inflight_bytes_per_uid,
            config.max_parsed_bytes,
        )),
    });
    let guard_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guard_threads = start_guards(&proxy, &config, &cgroup, &guard_stop)?;
    let started_at = SystemTime::now();
    let metrics_task = metrics.map(|(m, listener)| {
        let registry = m.registry(Some(crate::metrics::collect::AgentCollector {
            proxy: proxy.clone(),
            ship: shipper
                .as_ref()
                .map(|s| s.stats.clone() as Arc<dyn crate::metrics::ShipStats>),
        }));
        tokio::spawn(crate::metrics::server::serve(listener, Arc::new(registry)))
    });

    let (shutdown_tx, mut shutdown_rx) = mpsc::channel::<&'static str>(4);
    let admin_listener =
        admin::bind(&config.admin_socket()).map_err(|source| RunError::StateDir {
            path: config.admin_socket(),
            source,
        })?;
    // Governed jobs hand their exec filters over from here on (`airlock govern`).
    let govern_socket = crate::stdio::socket_path(&config.state_dir);
    let stdio = Arc::new(crate::stdio::Stdio::new(
        proxy.pipeline.clone(),
        proxy.names.clone(),
        config.stdio_servers.clone(),
        config.max_body_bytes,
        proxy.session_prefix.clone(),
    ));
    stdio
        .serve(&govern_socket)
        .map_err(|source| RunError::StateDir {
            path: govern_socket,
            source,
        })?;
    let control = Arc::new(control::Control {
        stdio: stdio.clone(),
        proxy: proxy.clone(),
        policies: policies.clone(),
        cgroup: cgroup.display().to_string(),
        shutdown_tx: shutdown_tx.clone(),
        shipper: shipper.clone(),
        started_at,
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, move |req, peer_uid| {
        control.handle(req, peer_uid)
    }));
    let unmanaged_task = tokio::spawn(crate::stdio::report_unmanaged(stdio.clone()));
    let resolver_task = tokio::spawn(refresh_targets(proxy.clone(), policies.clone()));
    let retention_task = tokio::spawn(retention(archive.clone(), config.retention_days));
    let policy_task = tokio::spawn(watch_policies(policies.clone()));
    let (accept_tasks, sweep_task, cgwatch_thread) = go_live(&proxy, listeners, &guard_stop)?;

    let why = wait_for_stop(&mut shutdown_rx)?.await;
    Running {
        config: &config,
        proxy: &proxy,
        background: accept_tasks
            .iter()
            .map(tokio::task::JoinHandle::abort_handle)
            .chain(
                [
                    &resolver_task,
                    &sweep_task,
                    &retention_task,
                    &policy_task,
                    &unmanaged_task,
                ]
                .map(|t| t.abort_handle()),
            )
            .collect(),
        admin: admin_task.abort_handle(),
        metrics: metrics_task
            .as_ref()
            .map(tokio::task::JoinHandle::abort_handle),
        guard_stop,
        threads: guard_threads.into_iter().chain([cgwatch_thread]).collect(),
        pins_task,
        pins,
        archive,
        shipper,
        events,
    }
    .stop(why)
    .await;
    Ok(())
}
