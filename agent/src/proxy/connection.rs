//! One redirected connection, from `accept()` to its closing record: steps 8 to 14 of
//! ARCHITECTURE.md, each a method of [`Connection`], read top-down:
//!
//! - 8\. [`Connection::flow`]: the kernel's record of who connected — none, or one older
//!   than the listeners, and the connection is refused;
//! - 9–10\. [`Connection::admit`]: the upstream dialled while `/proc` is read; capacity
//!   checked; 11. the registry lists it (`airlock status`);
//! - 12\. [`Connection::open`]: the `open` record, written (group) or durable (strict) first;
//! - 13\. [`Connection::serve`]: relayed (`mode = "opaque"`), intercepted (`mode = "mcp"`)
//!   or read as proxy requests (an egress proxy);
//! - 14\. [`Connection::close`]: the `close` record, the counters, the registry.
//!
//! Every refusal leaves through one exit, [`Proxy::refuse`], with a [`Refusal`].
//!
//! What a connection learns from the kernel (its flow record, the caller's process, the
//! upstream socket dialled as the agent's own) comes through [`Lookups`], so that a unit test
//! can run the steps without root (`tests_connection.rs`).

use std::{
    future::Future,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{
    forward, intercept,
    refusal::{Refusal, Refused},
    relay::{self, RelayEnd},
    route::{End, Identity, Route},
    state::{DialError, Proxy},
};
use crate::{
    archive::MaskedPayload,
    attribution::Attribution,
    config::{BackendMode, TargetRef},
    keys,
    limits::ConnectionPermit,
    registry::{ConnGuard, ConnState},
};

/// Serve one accepted connection; `netns` is the cookie of the namespace whose listener took
/// it.
pub(crate) async fn serve(proxy: Arc<Proxy>, client: TcpStream, peer: SocketAddr, netns: u64) {
    use tracing::Instrument as _;
    let conn = Connection::new(proxy, peer, netns, KernelLookups);
    // One span per connection: every line logged on its behalf names the client, and its id
    // once the registry gave it one.
    let span = tracing::info_span!("conn", client = %peer, id = tracing::field::Empty);
    conn.run(client).instrument(span).await;
}

/// What a connection asks of the kernel and of `/proc`, apart from the rest of its steps.
pub(crate) trait Lookups: Send + Sync {
    /// Step 8: the kernel's record of the connection with flow key `key`, taken out of the
    /// flow table.
    fn take_flow(
        &self,
        proxy: &Proxy,
        key: &airlock_common::FlowKey,
    ) -> Option<airlock_common::ConnMeta>;

    /// Step 10: the calling process, from the kernel's record.
    fn attribute(
        &self,
        proxy: &Proxy,
        meta: airlock_common::ConnMeta,
    ) -> impl Future<Output = Result<Attribution, Refusal>> + Send;

    /// Step 9: the upstream socket, from the caller's network namespace (`netns`).
    fn dial(
        &self,
        proxy: &Proxy,
        addr: SocketAddr,
        netns: u64,
    ) -> impl Future<Output = Result<TcpStream, DialError>> + Send;
}

/// The agent's lookups: the programs' flow table, `/proc`, a socket tagged as the agent's own.
pub(crate) struct KernelLookups;

impl Lookups for KernelLookups {
    fn take_flow(
        &self,
        proxy: &Proxy,
        key: &airlock_common::FlowKey,
    ) -> Option<airlock_common::ConnMeta> {
        proxy.kernel.lock().ok().and_then(|mut k| k.take_flow(key))
    }

    /// procfs reads do not wait on I/O: done inline; a user or group name not yet cached
    /// needs NSS, which can (LDAP, files on slow disks): that goes to the blocking pool.
    async fn attribute(
        &self,
        proxy: &Proxy,
        meta: airlock_common::ConnMeta,
    ) -> Result<Attribution, Refusal> {
        let names = &proxy.names;
        if names.has(meta.uid, meta.gid) {
            return Ok(Attribution::from_kernel(&meta, Path::new("/proc"), names));
        }
        let names = names.clone();
        tokio::task::spawn_blocking(move || {
            Attribution::from_kernel(&meta, Path::new("/proc"), &names)
        })
        .await
        .map_err(|e| Refusal::Attribution(e.to_string()))
    }

    async fn dial(
        &self,
        proxy: &Proxy,
        addr: SocketAddr,
        netns: u64,
    ) -> Result<TcpStream, DialError> {
        proxy.dial(addr, netns).await
    }
}

/// A connection between `accept()` and its end.
pub(crate) struct Connection<L> {
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    /// The namespace whose listener accepted it.
    netns: u64,
    accepted: Instant,
    lookups: L,
}

/// Why a connection ended in failure: the text of its close record and registry entry.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("killed by an operator (airlock sessions kill)")]
    Killed,
    #[error("no upstream connection")]
    NoUpstream,
    #[error(transparent)]
    Relay(#[from] relay::RelayError),
    #[error(transparent)]
    Intercept(#[from] intercept::InterceptError),
    #[error(transparent)]
    Forward(#[from] forward::ForwardError),
}

/// What a connection is served as.
#[derive(Clone, Copy)]
enum Serve {
    /// Bytes relayed (`mode = "opaque"`).
    Opaque,
    /// Intercepted (`mode = "mcp"`): the backend's index.
    Mcp(usize),
    /// The connection of a client to egress proxy `i`.
    Egress(usize),
}

/// A connection admitted (steps 9–11): attributed, listed, its upstream dialled.
struct Admitted {
    attribution: Attribution,
    guard: ConnGuard,
    /// The upstream socket (`None`: an idle pooled connection will serve).
    upstream: Option<TcpStream>,
    serve: Serve,
    /// The backend's name, or `proxy NAME`.
    target: Option<String>,
    /// The backend the connection's records name: its backend's; none for an egress proxy
    /// (each proxy request's record names the backend it turns out to be for, so `airlock
    /// sessions --backend` finds MCP calls made through a proxy).
    record_backend: Option<String>,
    /// Held for the connection's life.
    _uid_permit: ConnectionPermit,
}

impl<L: Lookups> Connection<L> {
    pub(crate) fn new(proxy: Arc<Proxy>, peer: SocketAddr, netns: u64, lookups: L) -> Self {
        Connection {
            proxy,
            peer,
            netns,
            accepted: Instant::now(),
            lookups,
        }
    }

    /// Steps 8 to 14, every refusal through [`Proxy::refuse`].
    pub(crate) async fn run(self, client: TcpStream) {
        let peer = self.peer;
        let refused = |client, attribution, guard, backend| Refused {
            client,
            peer,
            attribution,
            guard,
            backend,
        };
        let meta = match self.flow(&client) {
            Ok(meta) => meta,
            Err(r) => {
                return self
                    .proxy
                    .refuse(refused(client, None, None, None), r)
                    .await;
            }
        };
        let admitted = match self.admit(meta).await {
            Ok(a) => a,
            Err((r, attribution, target)) => {
                let who = refused(client, attribution.as_ref(), None, target.as_deref());
                return self.proxy.refuse(who, r).await;
            }
        };
        let who = match self.open(&admitted).await {
            Ok(who) => who,
            Err(r) => {
                let Admitted {
                    attribution,
                    guard,
                    target,
                    ..
                } = admitted;
                let who = refused(client, Some(&attribution), Some(guard), target.as_deref());
                return self.proxy.refuse(who, r).await;
            }
        };
        let opened = Instant::now();
        let _ = client.set_nodelay(true);
        // A second handle on the client socket: its byte counts are read from the kernel when
        // the connection ends (TLS and HTTP are served on the first).
        let counted = socket2::SockRef::from(&client).try_clone().ok();
        let Admitted {
            guard,
            upstream,
            serve,
            attribution,
            record_backend,
            _uid_permit,
            ..
        } = admitted;
        // Containment (`airlock sessions kill`): dropping the work closes both sockets.
        let end = tokio::select! {
            end = self.serve(client, upstream, serve, &who, &guard) => end,
            () = guard.killed() => Err(ServeError::Killed),
        };
        if let Some(sock) = counted {
            count_bytes(&sock, &guard);
        }
        self.close(
            end,
            &guard,
            &who,
            &attribution,
            record_backend.as_deref(),
            opened,
        )
        .await;
    }

    /// Step 8: the kernel's record of this connection, taken from the flow table.
    fn flow(&self, client: &TcpStream) -> Result<airlock_common::ConnMeta, Refusal> {
        let local = client.local_addr().map_err(|e| {
            Refusal::Attribution(format!("the accepted socket has no address: {e}"))
        })?;
        let key = keys::flow_key(self.peer, local, self.netns);
        let meta = self
            .lookups
            .take_flow(&self.proxy, &key)
            .ok_or(Refusal::Unattributed)?;
        if meta.connect_ns < self.proxy.listening_since_ns {
            return Err(Refusal::Stale);
        }
        Ok(meta)
    }

    /// Steps 9–11: dial the upstream while `/proc` is read, check capacity, list it. A
    /// refusal carries what was learnt of the caller.
    async fn admit(
        &self,
        meta: airlock_common::ConnMeta,
    ) -> Result<Admitted, (Refusal, Option<Attribution>, Option<String>)> {
        let proxy = &self.proxy;
        let config = &proxy.config;
        let target = config
            .target(meta.backend_id)
            .map(|_| config.target_name(meta.backend_id));
        let serve = match config.target(meta.backend_id) {
            Some(TargetRef::Proxy(i, _)) => Serve::Egress(i),
            Some(TargetRef::Backend(_, b)) if b.mode == BackendMode::Opaque => Serve::Opaque,
            _ => Serve::Mcp(meta.backend_id as usize),
        };
        let original_dst = SocketAddr::new(keys::ip_from_words(meta.orig_addr), meta.orig_port);
        // Over capacity (all users, or this uid): still attributed (the record says who was
        // refused), never dialled.
        let uid_permit = proxy.resources.connection(meta.uid);
        let over_capacity = if proxy.registry.live_count() >= config.max_connections {
            Some(format!(
                "more than {} live connections (`max_connections`)",
                config.max_connections
            ))
        } else {
            uid_permit.as_ref().err().map(ToString::to_string)
        };
        // An MCP backend with an idle pooled connection needs no new one.
        let pooled = matches!(serve, Serve::Mcp(i) if proxy.upstream_pool.has((i, original_dst, meta.netns)));
        let dial = async {
            if over_capacity.is_some() || pooled {
                Ok(None)
            } else {
                self.lookups
                    .dial(proxy, original_dst, meta.netns)
                    .await
                    .map(Some)
            }
        };
        // `biased`: the dial is polled first, so its connect() is under way while /proc is read.
        let (upstream, attribution) = tokio::join!(biased; dial, self.attribute(meta));
        let attribution = attribution.map_err(|r| (r, None, target.clone()))?;
        let refused = |r| (r, Some(attribution.clone()), target.clone());
        if let Some(reason) = over_capacity {
            return Err(refused(Refusal::OverCapacity(reason)));
        }
        let upstream = upstream.map_err(|e| refused(Refusal::Upstream(e)))?;
        let uid_permit = uid_permit.map_err(|e| refused(Refusal::OverCapacity(e.to_string())))?;
        let guard = proxy
            .registry
            .open(self.peer, Some(attribution.clone()), target.clone());
        tracing::Span::current().record("id", guard.id());
        info!(
            id = guard.id(),
            pid = attribution.pid,
            tgid = attribution.tgid,
            uid = attribution.uid,
            user = attribution.user.as_deref().unwrap_or("?"),
            comm = %attribution.comm,
            exe = attribution.exe.as_deref().unwrap_or("?"),
            backend = target.as_deref().unwrap_or("?"),
            %original_dst,
            ready_us = self.accepted.elapsed().as_micros() as u64,
            "connection"
        );
        let record_backend = match serve {
            Serve::Egress(_) => None,
            Serve::Opaque | Serve::Mcp(_) => target.clone(),
        };
        Ok(Admitted {
            attribution,
            guard,
            upstream,
            serve,
            target,
            record_backend,
            _uid_permit: uid_permit,
        })
    }

    /// Step 10: who called, from the kernel's record and `/proc` ([`Lookups::attribute`]).
    async fn attribute(&self, meta: airlock_common::ConnMeta) -> Result<Attribution, Refusal> {
        let mut attribution = self.lookups.attribute(&self.proxy, meta).await?;
        // A container's name, when its runtime's hook gave one, is the namespace's.
        if self.netns != self.proxy.host_netns
            && let Some(c) = attribution.container.as_mut()
            && c.name.is_none()
            && let Some(ns) = self
                .proxy
                .namespaces
                .lock()
                .ok()
                .and_then(|r| r.get(self.netns))
            && let Some(known) = &ns.container
            && known.id == c.id
        {
            c.name = known.name.clone();
        }
        Ok(attribution)
    }

    /// Step 12: the `open` record (the command line masked like a message), written (group)
    /// or durable (strict) before a byte is relayed.
    async fn open(&self, a: &Admitted) -> Result<Identity, Refusal> {
        let proxy = &self.proxy;
        let attribution = &a.attribution;
        let mut open = proxy.connection_record(
            a.guard.id(),
            0,
            Some(attribution),
            a.record_backend.as_deref(),
        );
        let subject = crate::pipeline::subject_of(attribution, &proxy.names);
        let mut event = serde_json::json!({
            "event": "open",
            "client": self.peer.to_string(),
            "family": attribution.family,
            "cmdline": attribution.cmdline,
            "cgroup_id": attribution.cgroup_id,
            "container": attribution.container,
            "netns": attribution.netns,
        });
        if let Serve::Egress(i) = a.serve
            && let Some(p) = proxy.config.egress_proxies.get(i)
        {
            event["egress_proxy"] = p.name.as_str().into();
        }
        open.payload = Some(proxy.pipeline.mask_event(
            &subject,
            a.target.as_deref().unwrap_or(""),
            event,
        ));
        proxy
            .archive
            .record(open)
            .await
            .map_err(|e| Refusal::Archive(e.to_string()))?;
        Ok(Identity {
            id: a.guard.id(),
            session_id: format!("{}-{}", proxy.session_prefix, a.guard.id()),
            attribution: attribution.clone(),
            subject,
            // Message records take 1, 2, …; the closing record the next one after them.
            seq: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Step 13: serve the connection as its backend's mode (or its egress proxy) says.
    async fn serve(
        &self,
        client: TcpStream,
        upstream: Option<TcpStream>,
        serve: Serve,
        who: &Identity,
        guard: &ConnGuard,
    ) -> Result<RelayEnd, ServeError> {
        let proxy = &self.proxy;
        let served = match serve {
            Serve::Opaque => {
                guard.set_state(ConnState::Open);
                let Some(upstream) = upstream else {
                    return Err(ServeError::NoUpstream);
                };
                return relay::relay(
                    client,
                    upstream,
                    proxy.config.idle_timeout,
                    guard.bytes_up(),
                    guard.bytes_down(),
                )
                .await
                .map_err(ServeError::from);
            }
            Serve::Mcp(backend) => {
                intercept::intercept(proxy, client, Route::Direct(upstream), backend, who, guard)
                    .await
                    .map_err(ServeError::from)
            }
            Serve::Egress(i) => forward::forward(proxy, client, upstream, i, who, guard)
                .await
                .map_err(ServeError::from),
        };
        match served {
            Ok(End::Served(how)) => {
                if let Some(how) = how {
                    debug!(id = guard.id(), how, "the client went away");
                }
                Ok(RelayEnd::Closed)
            }
            Ok(End::Relayed(r)) => r.map_err(ServeError::from),
            Err(reason) => {
                warn!(id = guard.id(), %reason, "intercepted connection refused");
                Err(reason)
            }
        }
    }

    /// Step 14: the `close` record, the counters and the registry.
    async fn close(
        &self,
        end: Result<RelayEnd, ServeError>,
        guard: &ConnGuard,
        who: &Identity,
        attribution: &Attribution,
        record_backend: Option<&str>,
        opened: Instant,
    ) {
        let proxy = &self.proxy;
        let idle = format!(
            "idle for {} s (`idle_timeout_secs`)",
            proxy.config.idle_timeout.as_secs()
        );
        let (state, reason) = match &end {
            Ok(RelayEnd::Closed) => ("closed", "closed".to_owned()),
            Ok(RelayEnd::IdleTimeout) => ("closed", idle.clone()),
            Err(e) => ("failed", e.to_string()),
        };
        let mut close = proxy.connection_record(
            guard.id(),
            who.next_seq(),
            Some(attribution),
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
        if let Err(e) = proxy.archive.record(close).await {
            warn!(id = guard.id(), error = %e, "cannot archive the end of a connection");
        }
        let counters = &proxy.counters;
        match end {
            Ok(RelayEnd::Closed) => {
                counters.relayed.fetch_add(1, Ordering::Relaxed);
                guard.finish(ConnState::Closed, "closed");
            }
            Ok(RelayEnd::IdleTimeout) => {
                counters.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                guard.finish(ConnState::Closed, idle);
            }
            Err(e) => {
                counters.relay_errors.fetch_add(1, Ordering::Relaxed);
                debug!(id = guard.id(), error = %e, "relay ended with an error");
                guard.finish(ConnState::Failed, e.to_string());
            }
        }
    }
}

/// Bytes of an intercepted connection, as TCP counted them on the client's side (TLS
/// included); the relay of an opaque one counted its own.
fn count_bytes(sock: &socket2::Socket, guard: &ConnGuard) {
    if let Some((up, down)) = tcp_bytes(sock)
        && guard.bytes_up().load(Ordering::Relaxed) == 0
        && guard.bytes_down().load(Ordering::Relaxed) == 0
    {
        guard.bytes_up().store(up, Ordering::Relaxed);
        guard.bytes_down().store(down, Ordering::Relaxed);
    }
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
