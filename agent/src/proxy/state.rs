//! What every connection of the wing shares ([`Proxy`]): the configuration, the kernel's
//! flow table, the registry of live connections, the archive, the pipeline, the upstream
//! pool, the served namespaces — and the agent's own counters, and the dial of an upstream
//! connection from the caller's network namespace.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::net::{TcpSocket, TcpStream};

use crate::{
    archive::{RecordDecision, RecordInput, RecordKind, service::Archive},
    attribution::{Attribution, NameCache},
    config::Config,
    egress,
    kernel::Kernel,
    registry::Registry,
};

/// What the accept loops share.
pub struct Proxy {
    pub config: Config,
    /// `config.backends`, each shared by every connection to it (never cloned per connection).
    pub backends: Vec<Arc<crate::config::Backend>>,
    pub kernel: KernelCell,
    pub registry: Arc<Registry>,
    pub counters: AgentCounters,
    /// uid/gid → name lookups, cached: NSS is slow and names rarely change.
    pub names: Arc<NameCache>,
    /// CLOCK_BOOTTIME (ns) just before the listeners were bound. A kernel record older than
    /// this belongs to a connection that was refused while no agent listened: it must not
    /// attribute a later connection that happens to reuse the 4-tuple.
    pub listening_since_ns: u64,
    /// The archive: a connection is relayed only once its opening record is durable (strict).
    pub archive: Archive,
    /// Makes session ids unique across agent restarts.
    pub session_prefix: String,
    /// Policy stage and record sink of every MCP message.
    pub pipeline: Arc<crate::pipeline::Pipeline>,
    /// Idle upstream connections of MCP backends, for the next client connection.
    pub upstream_pool: super::http::UpstreamPool,
    /// The managed CA's leaves and the upstream TLS configurations (`None`: no TLS backend).
    pub tls: Option<super::intercept::TlsRuntime>,
    /// Tags the agent's own upstream sockets so the connect programs let them through.
    pub own: Arc<crate::kernel::OwnSockets>,
    /// Every backend address the kernel redirects now (static, or resolved and refreshed):
    /// which backends a connection to an address may be for.
    pub targets: std::sync::RwLock<Vec<crate::config::ResolvedTarget>>,
    /// Per-uid and parsing budgets.
    pub resources: Arc<crate::limits::Limits>,
    /// The agent's own network namespace (`SO_NETNS_COOKIE`).
    pub host_netns: u64,
    /// The other network namespaces the agent listens in (containers).
    pub namespaces: Mutex<crate::netns::Registry>,
    /// The connection threads (set once they run), for the listeners of namespaces enrolled
    /// later.
    pub threads: std::sync::OnceLock<Arc<super::workers::ConnThreads>>,
    /// One enrolment at a time.
    pub enrolling: Mutex<()>,
    /// The attached cgroup and the cgroup2 mount it is in (which processes are governed).
    pub cgroup: std::path::PathBuf,
    pub cgroup_mount: std::path::PathBuf,
}

/// The loaded programs and their maps, behind a lock. Always there in the agent; a unit test
/// that runs connections without root has none, and every use of it then finds it unavailable,
/// as if its lock were poisoned (the callers already live with that).
pub struct KernelCell(Mutex<Option<Kernel>>);

/// The kernel, locked ([`KernelCell::lock`]).
pub struct KernelGuard<'a>(std::sync::MutexGuard<'a, Option<Kernel>>);

/// The kernel cannot be used: its lock is poisoned, or (in tests) there is none.
#[derive(Debug)]
pub struct KernelUnavailable;

impl KernelCell {
    pub fn new(kernel: Kernel) -> KernelCell {
        KernelCell(Mutex::new(Some(kernel)))
    }

    /// No kernel: for tests that run connections without root.
    #[cfg(test)]
    pub(crate) fn none() -> KernelCell {
        KernelCell(Mutex::new(None))
    }

    pub fn lock(&self) -> Result<KernelGuard<'_>, KernelUnavailable> {
        let guard = self.0.lock().map_err(|_| KernelUnavailable)?;
        match *guard {
            Some(_) => Ok(KernelGuard(guard)),
            None => Err(KernelUnavailable),
        }
    }
}

impl std::ops::Deref for KernelGuard<'_> {
    type Target = Kernel;

    fn deref(&self) -> &Kernel {
        // `KernelCell::lock` hands out a guard only over `Some`, and nothing takes it out.
        self.0.as_ref().expect("a locked kernel is there")
    }
}

impl std::ops::DerefMut for KernelGuard<'_> {
    fn deref_mut(&mut self) -> &mut Kernel {
        self.0.as_mut().expect("a locked kernel is there")
    }
}

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error(transparent)]
    Egress(#[from] egress::EgressError),
    #[error("the caller's network namespace ({0}) is no longer served")]
    NamespaceGone(u64),
    #[error("cannot create a socket in the caller's network namespace: {0}")]
    NamespaceSocket(#[source] std::io::Error),
}

/// The agent's own counters, shown next to the kernel's.
#[derive(Default)]
pub struct AgentCounters {
    pub accepted: AtomicU64,
    pub rejected_unattributed: AtomicU64,
    /// Connections whose attribution failed (the process was gone, /proc unreadable).
    pub rejected_attribution: AtomicU64,
    pub rejected_stale: AtomicU64,
    /// Refused because the archive could not record the connection (group or strict recording).
    pub rejected_archive: AtomicU64,
    pub rejected_over_capacity: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub relayed: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub relay_errors: AtomicU64,
    /// Proxy requests to egress proxies passed on to the real proxy byte for byte.
    pub egress_passed: AtomicU64,
    /// Tunnels to MCP backends through egress proxies, intercepted.
    pub egress_intercepted: AtomicU64,
    /// Proxy requests refused by Airlock (or, for a tunnel to a backend, by the proxy).
    pub egress_refused: AtomicU64,
    /// Connections to backends that never went through Airlock (opened before the programs,
    /// NAT, a raw socket), ended (`refusals.rs`).
    pub ended_unredirected: AtomicU64,
    /// Sockets and socket options the kernel refused, recorded.
    pub refused_sockets: AtomicU64,
    /// Refusals counted but not recorded on their own (coalesced per process and kind).
    pub refusals_coalesced: AtomicU64,
}

impl AgentCounters {
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        [
            ("accepted", &self.accepted),
            ("rejected_unattributed", &self.rejected_unattributed),
            ("rejected_attribution", &self.rejected_attribution),
            ("rejected_stale", &self.rejected_stale),
            ("rejected_archive", &self.rejected_archive),
            ("rejected_over_capacity", &self.rejected_over_capacity),
            ("upstream_failed", &self.upstream_failed),
            ("relayed", &self.relayed),
            ("idle_timeouts", &self.idle_timeouts),
            ("relay_errors", &self.relay_errors),
            ("egress_passed", &self.egress_passed),
            ("egress_intercepted", &self.egress_intercepted),
            ("egress_refused", &self.egress_refused),
            ("ended_unredirected", &self.ended_unredirected),
            ("refused_sockets", &self.refused_sockets),
            ("refusals_coalesced", &self.refusals_coalesced),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.load(Ordering::Relaxed)))
        .collect()
    }
}

impl Proxy {
    /// The archive row of a connection event (`kind = "connection"`).
    pub(crate) fn connection_record(
        &self,
        id: u64,
        seq: u64,
        a: Option<&Attribution>,
        backend: Option<&str>,
    ) -> RecordInput {
        RecordInput {
            ts_us: crate::pipeline::now_us(),
            host: self.config.host.clone(),
            session_id: format!("{}-{id}", self.session_prefix),
            seq,
            direction: crate::pipeline::direction_str(crate::policy::Direction::ClientToServer)
                .into(),
            kind: RecordKind::Connection.into(),
            decision: RecordDecision::Allow.into(),
            pid: a.map(|a| a.pid),
            tgid: a.map(|a| a.tgid),
            uid: a.map(|a| a.uid),
            gid: a.map(|a| a.gid),
            user: a.and_then(|a| a.user.clone()),
            comm: a.map(|a| a.comm.clone()),
            exe: a.and_then(|a| a.exe.clone()),
            cgroup: a.and_then(|a| a.cgroup.clone()),
            backend: backend.map(str::to_owned),
            server_addr: a.map(|a| a.original_dst.to_string()),
            ..Default::default()
        }
    }

    /// Connect to the original destination from a socket tagged as the agent's own, so our
    /// programs let it through — in the caller's network namespace (`netns`, a cookie): a
    /// container's call leaves from the container, with its routes and source address.
    pub(crate) async fn dial(&self, addr: SocketAddr, netns: u64) -> Result<TcpStream, DialError> {
        let socket = if netns == self.host_netns || netns == 0 {
            egress::own_socket(&self.own, addr)?
        } else {
            let ns = self
                .namespaces
                .lock()
                .ok()
                .and_then(|r| r.get(netns))
                .ok_or(DialError::NamespaceGone(netns))?;
            let fd = ns.socket(addr).map_err(DialError::NamespaceSocket)?;
            {
                use std::os::fd::AsFd as _;
                egress::tag(&self.own, fd.as_fd())?;
            }
            TcpSocket::from_std_stream(std::net::TcpStream::from(fd))
        };
        Ok(egress::connect(
            socket,
            addr,
            self.config.connect_timeout,
            "`connect_timeout_secs`",
        )
        .await?)
    }
}
