//! One redirected connection: attribute it from the kernel's record (or reject it), dial the
//! original destination with the bypass mark, relay.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::{
    archive::{MaskedPayload, RecordInput, service::Archive},
    attribution::{Attribution, NameCache},
    config::{BackendMode, Config, TargetRef},
    kernel::Kernel,
    keys,
    registry::{ConnState, Registry},
    relay::{self, RelayEnd},
};

/// What the accept loops share.
pub struct Proxy {
    pub config: Config,
    pub kernel: Mutex<Kernel>,
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
    pub upstream_pool: crate::http::UpstreamPool,
    /// The managed CA's leaves and the upstream TLS configurations (`None`: no TLS backend).
    pub tls: Option<crate::intercept::TlsRuntime>,
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
    pub threads: std::sync::OnceLock<Arc<crate::workers::ConnThreads>>,
    /// One enrolment at a time.
    pub enrolling: Mutex<()>,
    /// The attached cgroup and the cgroup2 mount it is in (which processes are governed).
    pub cgroup: std::path::PathBuf,
    pub cgroup_mount: std::path::PathBuf,
}

/// What a redirected connection is served as.
#[derive(Clone, Copy)]
enum Serve {
    /// Bytes relayed (`mode = "opaque"`).
    Opaque,
    /// Intercepted (`mode = "mcp"`).
    Mcp,
    /// The connection of a client to egress proxy `i`.
    Egress(usize),
}

/// The agent's own counters, shown next to the kernel's.
#[derive(Default)]
pub struct AgentCounters {
    pub accepted: AtomicU64,
    pub rejected_unattributed: AtomicU64,
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
    /// Accept until the task is dropped, handing each connection to a connection thread.
    /// Accept errors (e.g. out of fds) are logged and retried after a pause rather than ending
    /// the agent.
    pub async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        threads: Arc<crate::workers::ConnThreads>,
        netns: u64,
    ) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    threads.hand_off(stream, peer, netns).await;
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// One accepted connection; `netns` is the cookie of the namespace whose listener took it.
    pub(crate) async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr, netns: u64) {
        let accepted = std::time::Instant::now();
        let local = match client.local_addr() {
            Ok(l) => l,
            Err(e) => {
                warn!(%peer, error = %e, "accepted socket has no local address");
                return;
            }
        };
        let key = keys::flow_key(peer, local, netns);
        let meta = match self.kernel.lock() {
            Ok(mut k) => k.take_flow(&key),
            Err(_) => None,
        };
        let Some(meta) = meta else {
            // Not redirected by our programs (or its record was lost): never an open proxy.
            return self.reject_unknown(
                client,
                peer,
                &self.counters.rejected_unattributed,
                "no kernel record for this connection: only connections redirected by Airlock are served",
            );
        };
        if meta.connect_ns < self.listening_since_ns {
            return self.reject_unknown(
                client,
                peer,
                &self.counters.rejected_stale,
                "stale kernel record: made before this agent listened (a refused connection's 4-tuple, reused)",
            );
        }
        let meta_backend = meta.backend_id as usize;
        // A backend's name, or `proxy NAME` for an egress proxy.
        let backend = self
            .config
            .target(meta.backend_id)
            .map(|_| self.config.target_name(meta.backend_id));
        let original_dst =
            std::net::SocketAddr::new(keys::ip_from_words(meta.orig_addr), meta.orig_port);
        // Dial the backend while /proc is read: the two waits overlap.
        // Over capacity (all users, or this uid): still attributed (the record says who was
        // refused), never dialled.
        let uid_permit = self.resources.connection(meta.uid);
        let over_capacity = if self.registry.live_count() >= self.config.max_connections {
            Some(format!(
                "over capacity: more than {} live connections (`max_connections`)",
                self.config.max_connections
            ))
        } else {
            uid_permit
                .as_ref()
                .err()
                .map(|e| format!("over capacity: {e}"))
        };
        // An MCP backend with an idle pooled connection needs no new one.
        let pooled = self
            .config
            .backends
            .get(meta_backend)
            .is_some_and(|b| b.mode == crate::config::BackendMode::Mcp)
            && self
                .upstream_pool
                .has((meta_backend, original_dst, meta.netns));
        let dial = async {
            if over_capacity.is_some() {
                None
            } else if pooled {
                Some(Ok(None))
            } else {
                Some(self.dial(original_dst, meta.netns).await.map(Some))
            }
        };
        // procfs reads do not wait on I/O: done inline. A user or group name not yet cached
        // needs NSS, which can (LDAP, files on slow disks): that goes to the blocking pool.
        let attribute = async {
            if self.names.has(meta.uid, meta.gid) {
                Ok(Attribution::from_kernel(
                    &meta,
                    Path::new("/proc"),
                    &self.names,
                ))
            } else {
                let names = self.names.clone();
                tokio::task::spawn_blocking(move || {
                    Attribution::from_kernel(&meta, Path::new("/proc"), &names)
                })
                .await
            }
        };
        // `biased`: the dial is polled first, so its connect() is under way while /proc is read.
        let (upstream, attribution) = tokio::join!(biased; dial, attribute);
        let attribution = match attribution {
            Ok(a) => a,
            Err(e) => {
                warn!(%peer, error = %e, "attribution task failed");
                reset(client);
                return;
            }
        };
        // A container's name, when its runtime's hook gave one, is the namespace's.
        let mut attribution = attribution;
        if netns != self.host_netns
            && let Some(c) = attribution.container.as_mut()
            && c.name.is_none()
            && let Some(ns) = self.namespaces.lock().ok().and_then(|r| r.get(netns))
            && let Some(known) = &ns.container
            && known.id == c.id
        {
            c.name = known.name.clone();
        }
        let ready_us = accepted.elapsed().as_micros() as u64;
        let guard = self
            .registry
            .open(peer, Some(attribution.clone()), backend.clone());
        if let Some(reason) = over_capacity {
            self.counters
                .rejected_over_capacity
                .fetch_add(1, Ordering::Relaxed);
            warn!(id = guard.id(), uid = attribution.uid, %reason, "refused a connection");
            crate::observe::event(crate::observe::AgentEvent::ConnectionRejected {
                reason: reason.to_string(),
                client: peer.to_string(),
                destination: Some(attribution.original_dst.to_string()),
                actor: Some(Box::new(attribution.clone())),
            });
            let mut record =
                self.connection_record(guard.id(), 0, Some(&attribution), backend.as_deref());
            record.decision = "block".into();
            record.rules = vec!["airlock:over_capacity".into()];
            record.payload = Some(MaskedPayload::agent_event(
                &serde_json::json!({"event": "rejected", "client": peer.to_string(), "reason": reason}),
            ));
            guard.finish(ConnState::Rejected, reason);
            reset(client);
            if let Err(e) = self.archive.record(record).await {
                warn!(error = %e, "cannot archive a refused connection");
            }
            return;
        }
        // Held for the connection's life.
        let _uid_permit = uid_permit;
        info!(
            id = guard.id(),
            pid = attribution.pid,
            tgid = attribution.tgid,
            uid = attribution.uid,
            user = attribution.user.as_deref().unwrap_or("?"),
            comm = %attribution.comm,
            exe = attribution.exe.as_deref().unwrap_or("?"),
            backend = backend.as_deref().unwrap_or("?"),
            %original_dst,
            ready_us,
            "connection"
        );
        let upstream = match upstream {
            Some(Ok(s)) => s,
            // `None` only when over capacity, handled above.
            None => return,
            Some(Err(reason)) => {
                self.counters
                    .upstream_failed
                    .fetch_add(1, Ordering::Relaxed);
                warn!(id = guard.id(), %original_dst, %reason, "upstream connect failed");
                guard.finish(ConnState::Failed, reason);
                reset(client);
                return;
            }
        };
        // The opening record must be written (group) or durable (strict) before a byte is relayed.
        let serve = match self.config.target(meta.backend_id) {
            Some(TargetRef::Proxy(i, _)) => Serve::Egress(i),
            Some(TargetRef::Backend(_, b)) if b.mode == BackendMode::Opaque => Serve::Opaque,
            _ => Serve::Mcp,
        };
        // A proxy connection's records name the backend its requests turn out to be for
        // (`egress.rs`), so `airlock sessions --backend` finds MCP calls made through a proxy.
        let (record_backend, via_proxy) = match serve {
            Serve::Egress(i) => (None, self.config.egress_proxies.get(i).map(|p| &p.name)),
            _ => (backend.as_deref(), None),
        };
        let mut open = self.connection_record(guard.id(), 0, Some(&attribution), record_backend);
        // The command line may carry secrets: masked like a message.
        let subject = crate::pipeline::subject_of(&attribution, &self.names);
        let mut event = serde_json::json!({
            "event": "open",
            "client": peer.to_string(),
            "family": attribution.family,
            "cmdline": attribution.cmdline,
            "cgroup_id": attribution.cgroup_id,
            "container": attribution.container,
            "netns": attribution.netns,
        });
        if let Some(name) = via_proxy {
            event["egress_proxy"] = name.as_str().into();
        }
        open.payload = Some(self.pipeline.mask_event(
            &subject,
            backend.as_deref().unwrap_or(""),
            event,
        ));
        if let Err(e) = self.archive.record(open).await {
            self.counters
                .rejected_archive
                .fetch_add(1, Ordering::Relaxed);
            warn!(id = guard.id(), error = %e, "refusing a connection the archive cannot record");
            guard.finish(ConnState::Rejected, format!("archive unavailable: {e}"));
            reset(client);
            return;
        }
        let opened = std::time::Instant::now();
        let _ = client.set_nodelay(true);
        // A second handle on the client socket: its byte counts are read from the kernel when
        // the connection ends (TLS and HTTP are served on the first).
        let counted = socket2::SockRef::from(&client).try_clone().ok();
        // Message records take 1, 2, …; the closing record the next one after them.
        let msg_seq = Arc::new(AtomicU64::new(1));
        let parts = (
            guard.id(),
            format!("{}-{}", self.session_prefix, guard.id()),
            attribution.clone(),
            subject,
            msg_seq.clone(),
        );
        let work = async {
            let served = match serve {
                Serve::Opaque => {
                    guard.set_state(ConnState::Open);
                    let Some(upstream) = upstream else {
                        return Err("no upstream connection".to_owned());
                    };
                    return relay::relay(
                        client,
                        upstream,
                        self.config.idle_timeout,
                        guard.bytes_up(),
                        guard.bytes_down(),
                    )
                    .await
                    .map_err(|e| e.to_string());
                }
                Serve::Mcp => {
                    let route = crate::intercept::Route::Direct(upstream);
                    self.intercept(client, route, meta_backend, parts, &guard)
                        .await
                }
                Serve::Egress(i) => self.egress(client, upstream, i, parts, &guard).await,
            };
            match served {
                Ok(crate::intercept::End::Served(how)) => {
                    if let Some(how) = how {
                        debug!(id = guard.id(), how, "the client went away");
                    }
                    Ok(RelayEnd::Closed)
                }
                Ok(crate::intercept::End::Spliced(r)) => r.map_err(|e| e.to_string()),
                Err(reason) => {
                    warn!(id = guard.id(), %reason, "intercepted connection refused");
                    Err(reason)
                }
            }
        };
        // Containment (`airlock sessions kill`): dropping the work closes both sockets.
        let end = tokio::select! {
            end = work => end,
            () = guard.killed() => Err("killed by an operator (airlock sessions kill)".to_owned()),
        };
        // Bytes of an intercepted connection, as TCP counted them on the client's side (TLS
        // included); the relay of an opaque one counted its own.
        if let Some(sock) = counted {
            if let Some((up, down)) = tcp_bytes(&sock)
                && guard.bytes_up().load(Ordering::Relaxed) == 0
                && guard.bytes_down().load(Ordering::Relaxed) == 0
            {
                guard.bytes_up().store(up, Ordering::Relaxed);
                guard.bytes_down().store(down, Ordering::Relaxed);
            }
            drop(sock);
        }
        let idle = format!(
            "idle for {} s (`idle_timeout_secs`)",
            self.config.idle_timeout.as_secs()
        );
        let (state, reason) = match &end {
            Ok(RelayEnd::Closed) => ("closed", "closed".to_owned()),
            Ok(RelayEnd::IdleTimeout) => ("closed", idle.clone()),
            Err(e) => ("failed", e.clone()),
        };
        let mut close = self.connection_record(
            guard.id(),
            msg_seq.fetch_add(1, Ordering::Relaxed),
            Some(&attribution),
            record_backend,
        );
        close.latency_us = Some(opened.elapsed().as_micros() as u64);
        close.payload = Some(MaskedPayload::agent_event(&serde_json::json!({
            "event": "close",
            "state": state,
            "reason": reason,
            "bytes_up": guard.bytes_up().load(Ordering::Relaxed),
            "bytes_down": guard.bytes_down().load(Ordering::Relaxed),
        })));
        if let Err(e) = self.archive.record(close).await {
            warn!(id = guard.id(), error = %e, "cannot archive the end of a connection");
        }
        match end {
            Ok(RelayEnd::Closed) => {
                self.counters.relayed.fetch_add(1, Ordering::Relaxed);
                guard.finish(ConnState::Closed, "closed");
            }
            Ok(RelayEnd::IdleTimeout) => {
                self.counters.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                guard.finish(ConnState::Closed, idle);
            }
            Err(e) => {
                self.counters.relay_errors.fetch_add(1, Ordering::Relaxed);
                debug!(id = guard.id(), error = %e, "relay ended with an error");
                guard.finish(ConnState::Failed, e);
            }
        }
    }

    /// Refuse a connection nobody can be held responsible for: counted, listed, archived,
    /// reset.
    fn reject_unknown(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        counter: &AtomicU64,
        reason: &str,
    ) {
        counter.fetch_add(1, Ordering::Relaxed);
        let guard = self.registry.open(peer, None, None);
        guard.finish(ConnState::Rejected, reason);
        warn!(%peer, reason, "rejected a connection");
        crate::observe::event(crate::observe::AgentEvent::ConnectionRejected {
            reason: reason.into(),
            client: peer.to_string(),
            actor: None,
            destination: None,
        });
        reset(client);
        let mut record = self.connection_record(guard.id(), 0, None, None);
        record.decision = "block".into();
        record.rules = vec!["airlock:unattributed".into()];
        record.payload = Some(MaskedPayload::agent_event(
            &serde_json::json!({"event": "rejected", "client": peer.to_string(), "reason": reason}),
        ));
        let archive = self.archive.clone();
        tokio::spawn(async move {
            if let Err(e) = archive.record(record).await {
                warn!(error = %e, "cannot archive a rejected connection");
            }
        });
    }

    /// The archive row of a connection event (`kind = "connection"`).
    pub(crate) fn connection_record(
        &self,
        id: u64,
        seq: u64,
        a: Option<&Attribution>,
        backend: Option<&str>,
    ) -> RecordInput {
        RecordInput {
            ts_us: now_us(),
            host: self.config.host.clone(),
            session_id: format!("{}-{id}", self.session_prefix),
            seq,
            direction: "client_to_server".into(),
            kind: "connection".into(),
            decision: "allow".into(),
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
    pub(crate) async fn dial(&self, addr: SocketAddr, netns: u64) -> Result<TcpStream, String> {
        let socket = if netns == self.host_netns || netns == 0 {
            own_socket(&self.own, addr)?
        } else {
            let ns = self
                .namespaces
                .lock()
                .ok()
                .and_then(|r| r.get(netns))
                .ok_or_else(|| {
                    format!("the caller's network namespace ({netns}) is no longer served")
                })?;
            let fd = ns.socket(addr).map_err(|e| {
                format!("cannot create a socket in the caller's network namespace: {e}")
            })?;
            {
                use std::os::fd::AsFd as _;
                self.own
                    .tag(fd.as_fd())
                    .map_err(|e| format!("cannot tag the agent's socket (AIRLOCK_OWN): {e}"))?;
            }
            TcpSocket::from_std_stream(std::net::TcpStream::from(fd))
        };
        let _ = socket.set_nodelay(true);
        match tokio::time::timeout(self.config.connect_timeout, socket.connect(addr)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(format!("connect to {addr}: {e}")),
            Err(_) => Err(format!(
                "connect to {addr}: no answer in {} s (`connect_timeout_secs`)",
                self.config.connect_timeout.as_secs()
            )),
        }
    }
}

/// A TCP socket for `addr`'s family, tagged as the agent's own before it connects.
pub(crate) fn own_socket(
    own: &crate::kernel::OwnSockets,
    addr: SocketAddr,
) -> Result<TcpSocket, String> {
    use std::os::fd::AsFd as _;
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("cannot create a socket: {e}"))?;
    own.tag(socket.as_fd())
        .map_err(|e| format!("cannot tag the agent's socket (AIRLOCK_OWN): {e}"))?;
    Ok(socket)
}

pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Bytes received from and sent to (and acknowledged by) the peer of a TCP socket, from the
/// kernel (`TCP_INFO`: `tcpi_bytes_received`, `tcpi_bytes_acked`).
fn tcp_bytes(sock: &socket2::Socket) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd as _;
    // struct tcp_info up to tcpi_bytes_received (Linux 4.1+): bytes_acked at 120,
    // bytes_received at 128.
    let mut info = [0u8; 136];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: a buffer of `len` bytes for the kernel to fill; the fd is valid while `sock`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 || (len as usize) < info.len() {
        return None;
    }
    let acked = u64::from_ne_bytes(info[120..128].try_into().ok()?);
    let received = u64::from_ne_bytes(info[128..136].try_into().ok()?);
    Some((received, acked))
}

/// Close with a RST so the client sees a failure at once rather than a clean empty response.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
