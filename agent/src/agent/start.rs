//! Start-up, phase by phase, in the order `run` calls them: prepare (state, archive,
//! policies), listen, attach, events and metrics, TLS and the pipeline, the guards, live.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    archive::{ArchiveWriter, WriterConfig, service::Archive},
    cgroup,
    config::{Config, OnAgentDown},
    kernel::{Kernel, KernelSetup},
    proxy::Proxy,
};

use super::{Pins, RunError, background::apply_retention};

/// The agent's listeners on loopback (bound before the programs attach: from the moment a
/// redirect exists there is an agent to receive it), when they were bound (CLOCK_BOOTTIME),
/// and the agent's network namespace.
pub(super) fn listen(port: u16) -> Result<([TcpListener; 2], u64, u64), RunError> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let listening_since_ns = boottime_ns().map_err(RunError::Clock)?;
    let listeners = [bind(v4)?, bind(v6)?];
    let host_netns = {
        use std::os::fd::AsFd as _;
        crate::keys::netns_cookie(listeners[0].as_fd())
            .map_err(|source| RunError::Listen { addr: v4, source })?
    };
    Ok((listeners, listening_since_ns, host_netns))
}

/// Load the programs, write the maps and attach (or swap into the pinned links).
pub(super) fn attach(
    config: &Config,
    cgroup: &std::path::Path,
    host_netns: u64,
    targets: &[crate::config::ResolvedTarget],
) -> Result<(Kernel, Arc<crate::kernel::OwnSockets>), RunError> {
    let scopes = proxy_scopes(config, cgroup)?;
    let (kernel, own) = Kernel::start(
        &KernelSetup {
            bpffs_dir: &config.bpffs_dir,
            cgroup,
            listen_port: config.listen_port,
            pin_links: config.on_agent_down == OnAgentDown::Block,
            require_socket_guard: config.socket_guard == crate::config::SocketGuard::Require,
            host_netns,
            scopes: &scopes,
        },
        targets,
    )?;
    let own = Arc::new(own);
    Ok((kernel, own))
}

/// Interception goes live: the connection threads (one per CPU), the accept loops, every
/// network namespace of the cgroup's processes served (and followed), `Started`, `READY=1`.
#[allow(clippy::type_complexity)]
pub(super) fn go_live(
    proxy: &Arc<Proxy>,
    listeners: [TcpListener; 2],
    guard_stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<
    (
        Vec<tokio::task::JoinHandle<()>>,
        tokio::task::JoinHandle<()>,
        std::thread::JoinHandle<()>,
    ),
    RunError,
> {
    // Connections run on threads of their own (see `proxy::workers`), one per CPU.
    let threads = Arc::new(
        crate::proxy::start_threads(proxy, crate::proxy::workers::count())
            .map_err(RunError::Threads)?,
    );
    let _ = proxy.threads.set(threads.clone());
    let accept_tasks: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            tokio::spawn(
                proxy
                    .clone()
                    .accept_loop(l, threads.clone(), proxy.host_netns),
            )
        })
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
    Ok((accept_tasks, sweep_task, cgwatch_thread))
}

/// What is set up before anything is bound or attached; any failure here leaves the host as
/// it was.
pub(super) struct Prepared {
    pub(super) _lock: nix::fcntl::Flock<std::fs::File>,
    pub(super) targets: Vec<crate::config::ResolvedTarget>,
    pub(super) archive: Archive,
    pub(super) shipper: Option<Arc<crate::ship::Shipper>>,
    pub(super) policies: Arc<crate::policy::store::PolicyStore>,
}

/// The state directory (locked), the backends' addresses, the shipper's credentials and
/// state, the archive (recovered), the masking key and the policies.
pub(super) async fn prepare(config: &Config) -> Result<Prepared, RunError> {
    create_state_dir(&config.state_dir)?;
    let _lock = lock_state_dir(&config.state_dir)?;
    let targets = config.resolve().await?;
    // Shipping: credentials and state checked before anything starts.
    let ship = match &config.ship {
        Some(cfg) => Some((crate::ship::Prepared::new(config, cfg)?, cfg.keep_unshipped)),
        None => None,
    };
    let hold = ship
        .as_ref()
        .filter(|(_, keep)| *keep)
        .map(|(p, _)| p.stats.lines_shipped.clone());
    let archive = start_archive(config, hold).await?;
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
    Ok(Prepared {
        _lock,
        targets,
        archive,
        shipper,
        policies,
    })
}

/// The metrics families (fed from now on) and the endpoint's listener.
pub(super) async fn start_metrics(
    config: &Config,
) -> Result<Option<(crate::metrics::Metrics, tokio::net::TcpListener)>, RunError> {
    Ok(match config.metrics_listen {
        Some(addr) => {
            let listener = crate::metrics::server::bind(addr).await?;
            let m = crate::metrics::Metrics::new(config.backends.iter().map(|b| b.name.as_str()));
            crate::observe::install(Arc::new(m.clone()));
            info!(%addr, "metrics at http://{addr}/metrics");
            Some((m, listener))
        }
        None => None,
    })
}

/// The audit events' sinks (their files readable by `archive_group`), observing from now on.
pub(super) fn start_events(
    config: &Config,
    own: &Arc<crate::kernel::OwnSockets>,
) -> Result<Option<Arc<crate::events::Events>>, RunError> {
    Ok(match &config.events {
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
    })
}

/// A port others may bind while the agent is down is worth a warning.
pub(super) fn warn_if_unprivileged(port: u16) {
    if let Ok(start) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        && start.trim().parse::<u16>().is_ok_and(|s| port >= s)
    {
        warn!(
            port,
            "listen_port is unprivileged: while the agent is down another user could bind it and receive redirected connections"
        );
    }
}

/// The message pipeline: brokered credentials (refused at start when a file is not
/// root-only), the tool pins and their saver task, approvals.
pub(super) fn start_pipeline(
    config: &Config,
    own: &Arc<crate::kernel::OwnSockets>,
    policies: &Arc<crate::policy::store::PolicyStore>,
    archive: &Archive,
) -> Result<
    (
        Arc<crate::pipeline::Pipeline>,
        Pins,
        tokio::task::JoinHandle<()>,
    ),
    RunError,
> {
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
    Ok((pipeline, pins, pins_task))
}

/// Leaves and upstream TLS, when a backend is intercepted over TLS.
pub(super) fn start_tls(
    config: &Config,
) -> Result<Option<crate::proxy::intercept::TlsRuntime>, RunError> {
    Ok(
        if config
            .backends
            .iter()
            .any(|b| b.tls && b.mode == crate::config::BackendMode::Mcp)
        {
            let rt = crate::proxy::intercept::TlsRuntime::start(config).map_err(RunError::Tls)?;
            info!(
                ca = %crate::tls::ca::Ca::dir_of(&config.state_dir).display(),
                "TLS interception ready (clients must trust `airlock ca show --pem`)"
            );
            Some(rt)
        } else {
            None
        },
    )
}

/// What the kernel refuses from now on is recorded (the refusals thread); connections to
/// backends that did not go through Airlock (opened before the programs were attached) are
/// ended (the sweep); interfaces are followed (netwatch). The threads, to join at the end.
pub(super) fn start_guards(
    proxy: &Arc<Proxy>,
    config: &Config,
    cgroup: &std::path::Path,
    guard_stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<Vec<std::thread::JoinHandle<()>>, RunError> {
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
    crate::refusals::sweep(proxy, cgroup, &own_map);
    let links_dir =
        (config.on_agent_down == OnAgentDown::Block).then(|| config.bpffs_dir.join("links"));
    let netwatch_thread = crate::netwatch::spawn(proxy.clone(), links_dir, guard_stop.clone())
        .map_err(RunError::Threads)?;
    Ok(refusals_thread
        .into_iter()
        .chain([netwatch_thread])
        .collect())
}

pub(super) fn bind(addr: SocketAddr) -> Result<TcpListener, RunError> {
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
pub(super) fn create_state_dir(path: &std::path::Path) -> Result<(), RunError> {
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
pub(super) fn lock_state_dir(
    dir: &std::path::Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, RunError> {
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
pub(super) fn archive_gid(name: &str) -> Result<u32, String> {
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
pub(super) async fn start_archive(
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
    let archive = Archive::start(writer, config.recording, config.flush_interval)
        .with_tap(crate::observe::record);
    apply_retention(&archive, config.retention_days).await;
    Ok(archive)
}

/// A prefix that makes connection session ids unique across agent restarts.
pub(super) fn session_prefix() -> String {
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

/// CLOCK_BOOTTIME in nanoseconds: the clock of `ConnMeta::connect_ns`.
pub(super) fn boottime_ns() -> Result<u64, nix::Error> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// The kernel scopes of the egress proxies that name `cgroups`, by target id.
pub(super) fn proxy_scopes(
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
