//! `airlock run`: start-up order, the background tasks, graceful shutdown.
//!
//! Start-up order matters for fail-closed behaviour: listeners are bound *before* the programs
//! are (re)attached, so from the moment a redirect exists there is an agent to receive it.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::{net::TcpListener, signal::unix::SignalKind, sync::mpsc};
use tracing::{info, warn};

use crate::{
    admin::{self, AgentInfo, Request, Response, Status, TargetInfo},
    archive::{ArchiveWriter, WriterConfig, service::Archive},
    attribution::NameCache,
    cgroup,
    config::{Config, ConfigError, OnAgentDown},
    kernel::{Kernel, KernelSetup},
    proxy::{AgentCounters, Proxy},
    registry::{Registry, rfc3339},
};

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
    Tls(String),
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
    create_state_dir(&config.state_dir)?;
    // One agent per state directory: a second one would recover (and delete) the write-ahead
    // segments the first is writing. Held until the process exits.
    let _lock = lock_state_dir(&config.state_dir)?;
    let targets = config.resolve().await?;
    // Shipping: credentials and state checked before anything starts.
    let ship = match &config.ship {
        Some(cfg) => Some((
            crate::ship::Prepared::new(&config, cfg)?,
            cfg.keep_unshipped,
        )),
        None => None,
    };
    let hold = ship
        .as_ref()
        .filter(|(_, keep)| *keep)
        .map(|(p, _)| p.stats.lines_shipped.clone());
    let archive = start_archive(&config, hold).await?;
    let shipper =
        ship.map(|(p, _)| Arc::new(p.start(config.host.clone(), archive.stats.published.clone())));
    let key =
        crate::policy::store::mask_key(&config.state_dir).map_err(|source| RunError::StateDir {
            path: config.state_dir.join("mask.key"),
            source,
        })?;
    let policies = Arc::new(crate::policy::store::PolicyStore::load(
        &config.policies_dir,
        key,
        crate::config::shared_backends(&config.backends, &targets),
    )?);
    for key in &config.deprecated {
        warn!(
            key,
            "this configuration key no longer has any effect; remove it"
        );
    }
    info!(policy = %policies.current().hash, rules = policies.current().rule_count(), "policies loaded");
    let cgroup = cgroup::resolve(config.cgroup.as_deref())?;
    let scopes = proxy_scopes(&config, &cgroup)?;

    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, config.listen_port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, config.listen_port));
    let listening_since_ns = boottime_ns().map_err(RunError::Clock)?;
    let listeners = [bind(v4)?, bind(v6)?];
    let host_netns = {
        use std::os::fd::AsFd as _;
        crate::keys::netns_cookie(listeners[0].as_fd())
            .map_err(|source| RunError::Listen { addr: v4, source })?
    };
    // Metrics: families fed from now on; the endpoint bound before the programs attach.
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let listener = crate::metrics::server::bind(addr).await?;
            let m = crate::metrics::Metrics::new(config.backends.iter().map(|b| b.name.as_str()));
            crate::observe::install(Arc::new(m.clone()));
            info!(%addr, "metrics at http://{addr}/metrics");
            Some((m, listener))
        }
        None => None,
    };

    let (kernel, own) = Kernel::start(
        &KernelSetup {
            bpffs_dir: &config.bpffs_dir,
            cgroup: &cgroup,
            listen_port: config.listen_port,
            pin_links: config.on_agent_down == OnAgentDown::Block,
            require_socket_guard: config.socket_guard == crate::config::SocketGuard::Require,
            host_netns,
            scopes: &scopes,
        },
        &targets,
    )?;
    let own = Arc::new(own);
    // The shipper dials the bucket as the agent's own from here on (never redirected to itself).
    if let Some(s) = &shipper {
        s.dial_as_own(own.clone());
    }
    // Audit events observe every decision from here on (before any traffic is accepted).
    let events = match &config.events {
        Some(ec) => {
            let gid = nix::unistd::Group::from_name(&config.archive_group)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw());
            Some(crate::events::Events::start_agent(
                ec,
                &config.host,
                gid,
                own.clone(),
            )?)
        }
        None => None,
    };
    info!(
        cgroup = %cgroup.display(),
        port = config.listen_port,
        targets = targets.len(),
        on_agent_down = ?config.on_agent_down,
        "redirecting connections to backends"
    );
    if let Ok(start) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        && start
            .trim()
            .parse::<u16>()
            .is_ok_and(|s| config.listen_port >= s)
    {
        warn!(
            port = config.listen_port,
            "listen_port is unprivileged: while the agent is down another user could bind it and receive redirected connections"
        );
    }

    let tls = if config
        .backends
        .iter()
        .any(|b| b.tls && b.mode == crate::config::BackendMode::Mcp)
    {
        let rt = crate::proxy::intercept::TlsRuntime::start(&config).map_err(RunError::Tls)?;
        info!(
            ca = %crate::tls::ca::Ca::dir_of(&config.state_dir).display(),
            "TLS interception ready (clients must trust `airlock ca show --pem`)"
        );
        Some(rt)
    } else {
        None
    };
    // Brokered credentials: refused at start when the file is not root-only.
    let mut credentials = std::collections::HashMap::new();
    for b in &config.backends {
        if let Some(path) = &b.credentials_file {
            let c = crate::policy::credentials::Credentials::load(path)
                .map_err(|e| RunError::Credentials(e.to_string()))?;
            credentials.insert(b.name.clone(), c);
        }
    }
    let pins = crate::policy::pins::ToolPins::open(&config.state_dir).map_err(|source| {
        RunError::StateDir {
            path: config.state_dir.join("tool-pins.json"),
            source,
        }
    })?;
    let pins = Arc::new(Mutex::new(pins));
    let pins_dirty = Arc::new(tokio::sync::Notify::new());
    let pin_saves = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pins_task = tokio::spawn(crate::policy::pins::saver(
        pins.clone(),
        pins_dirty.clone(),
        Duration::from_millis(200),
        pin_saves.clone(),
    ));
    let pipeline = Arc::new(crate::pipeline::Pipeline {
        pins: pins.clone(),
        pins_dirty,
        pin_saves,
        webhook: config.approval_webhook.clone().map(|u| (u, own.clone())),
        tool_changes: config.tool_changes,
        credentials,
        policies: policies.clone(),
        archive: archive.clone(),
        sessions: Arc::new(crate::mcp::session::Sessions::new()),
        host: config.host.clone(),
        counters: Default::default(),
        legacy_streams: Default::default(),
        approvals: Default::default(),
        approval_decided: tokio::sync::Notify::new(),
    });
    let proxy = Arc::new(Proxy {
        backends: config.backends.iter().cloned().map(Arc::new).collect(),
        config: config.clone(),
        kernel: Mutex::new(kernel),
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
    // What the kernel refuses from now on is recorded; connections to backends that did not
    // go through Airlock (opened before the programs were attached) are ended.
    let guard_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let own_map = proxy
        .own
        .map_fd()
        .try_clone_to_owned()
        .map_err(|source| RunError::StateDir {
            path: "AIRLOCK_OWN".into(),
            source,
        })?;
    let rings = proxy
        .kernel
        .lock()
        .map(|mut k| k.take_reports())
        .unwrap_or_default();
    let refusals_thread = match rings.is_empty() {
        false => Some(
            crate::refusals::spawn(
                proxy.clone(),
                rings,
                own_map.try_clone().map_err(|source| RunError::StateDir {
                    path: "AIRLOCK_OWN".into(),
                    source,
                })?,
                tokio::runtime::Handle::current(),
                guard_stop.clone(),
            )
            .map_err(RunError::Threads)?,
        ),
        true => None,
    };
    crate::refusals::sweep(&proxy, &cgroup, &own_map);
    let links_dir =
        (config.on_agent_down == OnAgentDown::Block).then(|| config.bpffs_dir.join("links"));
    let netwatch_thread = crate::netwatch::spawn(proxy.clone(), links_dir, guard_stop.clone())
        .map_err(RunError::Threads)?;
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
    let admin_task = tokio::spawn(admin::serve(admin_listener, {
        let proxy = proxy.clone();
        let policies = policies.clone();
        let cgroup = cgroup.display().to_string();
        let shutdown_tx = shutdown_tx.clone();
        let shipper = shipper.clone();
        move |req, peer_uid| match req {
            Request::Kill { user, pid, session } => {
                if user.is_none() && pid.is_none() && session.is_none() {
                    return Response::Error {
                        message: "name what to kill: --user, --pid or --session".into(),
                    };
                }
                // A session id is `<agent prefix>-<connection id>`.
                let session_conn = session.as_deref().map(|s| {
                    s.rsplit('-')
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .filter(|_| s.starts_with(&proxy.session_prefix) || !s.contains('-'))
                });
                if let Some(None) = session_conn {
                    return Response::Error {
                        message: format!(
                            "`{}` is not a session of this agent",
                            session.unwrap_or_default()
                        ),
                    };
                }
                let ids = proxy.registry.kill(|id, a| {
                    user.as_ref()
                        .is_none_or(|u| a.and_then(|a| a.user.as_ref()) == Some(u))
                        && pid.is_none_or(|p| a.is_some_and(|a| a.tgid == p || a.pid == p))
                        && session_conn.is_none_or(|c| c == Some(id))
                });
                info!(
                    ?ids,
                    ?user,
                    ?pid,
                    ?session,
                    by_uid = peer_uid,
                    "sessions killed by an operator"
                );
                Response::Ok {
                    message: format!(
                        "killed {} connection(s){}",
                        ids.len(),
                        if ids.is_empty() {
                            String::new()
                        } else {
                            format!(
                                ": {}",
                                ids.iter()
                                    .map(u64::to_string)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        }
                    ),
                }
            }
            Request::AcceptTool { backend, tool } => {
                let r = proxy
                    .pipeline
                    .pins
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .accept(&backend, &tool);
                match r {
                    Ok(true) => Response::Ok {
                        message: format!("accepted the new definition of `{tool}` ({backend})"),
                    },
                    Ok(false) => Response::Error {
                        message: format!(
                            "`{tool}` of backend `{backend}` has no changed definition to accept"
                        ),
                    },
                    Err(e) => Response::Error {
                        message: format!("cannot save the tool pins: {e}"),
                    },
                }
            }
            Request::Approvals => {
                let pending = proxy
                    .pipeline
                    .approvals
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .list(Instant::now());
                Response::Approvals { pending }
            }
            Request::Approve { id, digest } => decide(&proxy, id, "approved", |a| {
                a.approve(id, digest.as_deref(), peer_uid, Instant::now())
            }),
            Request::Deny { id } => decide(&proxy, id, "denied", |a| {
                a.deny(id, peer_uid, Instant::now())
            }),
            Request::Status => {
                let mut s = status(&proxy, &cgroup, started_at);
                s.agent.policy_hash = Some(policies.current().hash.clone());
                s.agent.policy_error = policies.last_error();
                s.ship = shipper.as_ref().map(|s| s.status());
                Response::Status(Box::new(s))
            }
            Request::Enroll { pid, name } => {
                match tokio::task::block_in_place(|| proxy.enroll(pid, "hook", name)) {
                    Ok(Some(ns)) => Response::Ok {
                        message: format!(
                            "serving the network namespace of pid {pid} (cookie {})",
                            ns.cookie
                        ),
                    },
                    Ok(None) => Response::Ok {
                        message: format!("pid {pid} is in the agent's own network namespace"),
                    },
                    Err(message) => Response::Error { message },
                }
            }
            Request::Shutdown => {
                let _ = shutdown_tx.try_send("admin request");
                Response::Ok {
                    message: "shutting down".into(),
                }
            }
        }
    }));
    let resolver_task = tokio::spawn(refresh_targets(proxy.clone(), policies.clone()));
    let retention_task = tokio::spawn(retention(archive.clone(), config.retention_days));
    let policy_task = tokio::spawn(watch_policies(policies.clone()));
    // Connections run on threads of their own (see `proxy::workers`), one per CPU.
    let threads = Arc::new(
        crate::proxy::start_threads(&proxy, crate::proxy::workers::count())
            .map_err(RunError::Threads)?,
    );
    let _ = proxy.threads.set(threads.clone());
    let accept_tasks: Vec<_> = listeners
        .into_iter()
        .map(|l| tokio::spawn(proxy.clone().accept_loop(l, threads.clone(), host_netns)))
        .collect();
    // Containers: every namespace of the cgroup's processes is served from now on.
    let enrolled = tokio::task::block_in_place(|| proxy.enroll_all());
    if enrolled > 0 {
        info!(enrolled, "serving the network namespaces found at start");
    }
    let sweep_task = tokio::spawn(proxy.clone().sweep_namespaces());
    let cgwatch_thread = crate::enroll::watch_cgroups(
        proxy.clone(),
        tokio::runtime::Handle::current(),
        guard_stop.clone(),
    )
    .map_err(RunError::Threads)?;
    // Programs attached, listeners accepting: interception is live.
    crate::observe::event(crate::observe::AgentEvent::Started {
        version: env!("CARGO_PKG_VERSION").into(),
    });
    // systemd (`Type=notify`): `systemctl start` returns only now.
    if let Err(e) = crate::notify::notify("READY=1") {
        warn!(error = %e, "cannot tell systemd the agent is ready");
    }

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
    let why = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        Some(why) = shutdown_rx.recv() => why,
    };
    info!(
        reason = why,
        "shutting down: no new connections, draining live ones"
    );
    crate::observe::event(crate::observe::AgentEvent::Stopped { reason: why.into() });
    let _ = crate::notify::notify("STOPPING=1");
    for t in &accept_tasks {
        t.abort();
    }
    resolver_task.abort();
    sweep_task.abort();
    retention_task.abort();
    policy_task.abort();
    let deadline = Instant::now() + config.drain_timeout;
    while proxy.registry.live_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = proxy.registry.live_count();
    if left > 0 {
        warn!(
            left,
            "drain timeout reached; closing the remaining connections"
        );
    }
    admin_task.abort();
    if let Some(t) = &metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(config.admin_socket());
    guard_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in refusals_thread
        .into_iter()
        .chain([netwatch_thread, cgwatch_thread])
    {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    // Tool pins changed since the last save go to disk before the agent exits.
    pins_task.abort();
    let (path, snapshot) = {
        let mut p = pins.lock().unwrap_or_else(|p| p.into_inner());
        (p.path().to_owned(), p.take_snapshot())
    };
    if let Some(bytes) = snapshot
        && let Err(e) = crate::policy::pins::write_atomically(&path, &bytes)
    {
        warn!(error = %e, "cannot save the tool pins");
    }
    // Everything recorded goes into Parquet before the agent exits.
    match archive.close().await {
        Ok(()) => info!("archive flushed"),
        Err(e) => {
            warn!(error = %e, "archive flush failed; the write-ahead segments are recovered at the next start")
        }
    }
    // What the flush published goes to the bucket too, if it can in a few seconds.
    if let Some(s) = &shipper {
        s.finish(Duration::from_secs(10)).await;
    }
    // Events queued so far reach their file, syslog receiver or spool before the exit.
    if let Some(events) = events {
        let flushed = tokio::task::spawn_blocking(move || events.flush(Duration::from_secs(3)))
            .await
            .unwrap_or(false);
        if !flushed {
            warn!("some audit events were not written before the exit (a sink is down)");
        }
    }
    if config.on_agent_down == OnAgentDown::Block && crate::kernel::is_pinned(&config.bpffs_dir) {
        info!(
            "programs stay attached: connections to backends are refused until the agent is back (`airlock detach` to remove them)"
        );
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> Result<TcpListener, RunError> {
    let err = |source| RunError::Listen { addr, source };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    if addr.is_ipv6() {
        // The IPv4 listener takes IPv4 and IPv4-mapped connections.
        socket2::SockRef::from(&socket)
            .set_only_v6(true)
            .map_err(err)?;
    }
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// The state directory: root's, `0711` — others may reach the archive inside it (which has
/// its own group permissions) but not list or read anything else (keys and the admin socket
/// are `0600`).
fn create_state_dir(path: &std::path::Path) -> Result<(), RunError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |source| RunError::StateDir {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    // One that existed before must be root's and not writable by others.
    crate::fsperm::check_private_dir(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o711)).map_err(err)
}

/// Take `state_dir/agent.lock` (flock, exclusive, non-blocking).
fn lock_state_dir(dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, RunError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| RunError::StateDir {
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| RunError::AlreadyRunning {
            path,
            reason: errno.desc().to_owned(),
        },
    )
}

/// The archive group's id, creating the group (`groupadd --system`) if it does not exist.
fn archive_gid(name: &str) -> Result<u32, String> {
    let lookup = || nix::unistd::Group::from_name(name).map_err(|e| e.to_string());
    if let Some(g) = lookup()? {
        return Ok(g.gid.as_raw());
    }
    let out = std::process::Command::new("groupadd")
        .args(["--system", name])
        .output()
        .map_err(|e| format!("cannot run groupadd: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "groupadd --system {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    info!(group = name, "created the archive group");
    lookup()?
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| format!("group {name} still missing after groupadd"))
}

/// Open the archive (recovering leftover segments), apply retention once, start its thread.
async fn start_archive(
    config: &Config,
    retention_hold: Option<Arc<std::sync::atomic::AtomicU64>>,
) -> Result<Archive, RunError> {
    let fail = |message: String| RunError::Archive {
        path: config.archive_dir.clone(),
        message,
    };
    let gid =
        archive_gid(&config.archive_group).map_err(|e| fail(format!("`archive_group`: {e}")))?;
    let (mut writer, recovery) = ArchiveWriter::open(WriterConfig {
        archive_dir: config.archive_dir.clone(),
        signing_key: config.state_dir.join("archive-signing.key"),
        host: config.host.clone(),
        group: Some(gid),
        max_rows: 100_000,
        max_segment_bytes: crate::archive::writer::MAX_SEGMENT_BYTES,
    })
    .map_err(|e| fail(e.to_string()))?;
    if recovery.segments > 0 {
        info!(
            segments = recovery.segments,
            records = recovery.records,
            torn_bytes = recovery.torn_bytes,
            "recovered write-ahead segments into Parquet"
        );
    }
    if let Some(hold) = retention_hold {
        writer.hold_retention(hold);
    }
    let archive = Archive::start(writer, config.recording, config.flush_interval);
    apply_retention(&archive, config.retention_days).await;
    Ok(archive)
}

/// Days since the epoch, UTC.
fn today() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0)
}

/// Reload the policies on SIGHUP and when their files change (checked every 2 s). A set that
/// does not validate leaves the one in force.
async fn watch_policies(store: Arc<crate::policy::store::PolicyStore>) {
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

fn reload(store: &crate::policy::store::PolicyStore, why: &str) {
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
async fn retention(archive: Archive, days: u32) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    tick.tick().await;
    loop {
        tick.tick().await;
        apply_retention(&archive, days).await;
    }
}

/// One retention pass; `days = 0` keeps everything.
/// An operator's decision on a held call (`airlock approvals approve|deny`): applied, the
/// waiting call woken, answered in one line.
fn decide(
    proxy: &Proxy,
    id: u64,
    done: &str,
    apply: impl FnOnce(
        &mut crate::policy::approvals::Approvals,
    ) -> Result<
        crate::policy::approvals::Outcome,
        crate::policy::approvals::ApprovalError,
    >,
) -> Response {
    let r = apply(
        &mut proxy
            .pipeline
            .approvals
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    proxy.pipeline.approval_decided.notify_waiters();
    match r {
        Ok(_) => Response::Ok {
            message: format!("{done} {id}"),
        },
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}

async fn apply_retention(archive: &Archive, days: u32) {
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

/// A prefix that makes connection session ids unique across agent restarts.
fn session_prefix() -> String {
    let mut bytes = [0u8; 6];
    if getrandom::fill(&mut bytes).is_err() {
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&now.to_le_bytes()[..6]);
    }
    format!("c{}", hex::encode(bytes))
}

/// Re-resolve backend names periodically; a failed lookup keeps the previous addresses, and
/// so does a change that would make backends share an address in a way the configuration or
/// the policies do not allow.
async fn refresh_targets(proxy: Arc<Proxy>, policies: Arc<crate::policy::store::PolicyStore>) {
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

/// CLOCK_BOOTTIME in nanoseconds: the clock of `ConnMeta::connect_ns`.
fn boottime_ns() -> Result<u64, nix::Error> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

fn status(proxy: &Proxy, cgroup: &str, started_at: SystemTime) -> Status {
    let (live, recent) = proxy.registry.snapshot();
    let live_connections = live.len();
    let kernel_counters = proxy
        .kernel
        .lock()
        .map(|k| {
            k.counters()
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v))
                .collect()
        })
        .unwrap_or_default();
    let targets = proxy
        .targets
        .read()
        .map(|ts| {
            ts.iter()
                .map(|t| TargetInfo {
                    backend: proxy.config.target_name(t.backend_id),
                    address: t.addr.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    let port = proxy.config.listen_port;
    Status {
        agent: AgentInfo {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: rfc3339(started_at),
            config: proxy.config.path.display().to_string(),
            cgroup: cgroup.to_owned(),
            on_agent_down: format!("{:?}", proxy.config.on_agent_down).to_lowercase(),
            listen: vec![format!("127.0.0.1:{port}"), format!("[::1]:{port}")],
            live_connections,
            policy_hash: None,
            policy_error: None,
        },
        kernel_counters,
        agent_counters: {
            let mut c = proxy.counters.snapshot();
            let a = &proxy.archive.stats;
            for (k, v) in [
                ("archive_records", &a.records),
                ("archive_fsyncs", &a.fsyncs),
                ("archive_files", &a.files),
                ("archive_errors", &a.errors),
                ("archive_dropped", &a.dropped),
            ] {
                c.insert(k.to_owned(), v.load(std::sync::atomic::Ordering::Relaxed));
            }
            let p = &proxy.pipeline.counters;
            for (k, v) in [
                ("mcp_messages", &p.messages),
                ("mcp_blocked", &p.blocked),
                ("mcp_masked_values", &p.masked_values),
                ("mcp_malformed", &p.malformed),
                ("mcp_protocol_refused", &p.protocol_refused),
                ("http_refused", &p.refused_requests),
                ("answers_refused", &p.refused_answers),
                ("tool_pin_saves", proxy.pipeline.pin_saves.as_ref()),
            ] {
                c.insert(k.to_owned(), v.load(std::sync::atomic::Ordering::Relaxed));
            }
            c.extend(proxy.resources.counters.snapshot());
            c.extend(crate::events::counters());
            c.extend(proxy.resources.in_use());
            c
        },
        targets,
        connections: live.into_iter().chain(recent).collect(),
        ship: None,
        mechanisms: proxy
            .kernel
            .lock()
            .map(|k| k.mechanisms.clone())
            .unwrap_or_default(),
        namespaces: proxy
            .namespaces
            .lock()
            .map(|r| {
                r.list()
                    .iter()
                    .map(|ns| crate::admin::NamespaceInfo {
                        cookie: ns.cookie,
                        inode: ns.inode,
                        source: ns.source.to_owned(),
                        enrolled_at: rfc3339(ns.enrolled_at),
                        container: ns.container.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// The kernel scopes of the egress proxies that name `cgroups`, by target id.
fn proxy_scopes(
    config: &Config,
    attached: &std::path::Path,
) -> Result<Vec<(u32, airlock_common::Scope)>, RunError> {
    let mount = cgroup::resolve(None)?;
    let mut scopes = Vec::new();
    for (i, p) in config.egress_proxies.iter().enumerate() {
        if let Some(scope) = p.scope(&mount, attached).map_err(RunError::Scope)? {
            scopes.push((crate::config::proxy_id(i), scope));
        }
    }
    Ok(scopes)
}
