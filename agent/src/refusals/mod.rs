//! What the kernel programs refused or dropped, and the connections that were alive when they
//! were attached: each one attributed, counted, recorded in the archive and sent as an event.
//!
//! - The programs report through the `AIRLOCK_REPORTS` ring buffer (`agent-ebpf/src/guard.rs`):
//!   a raw socket, `IP_HDRINCL`, a packet socket's TCP to a backend or its traffic-control
//!   bypass, a `connect()` refused for want of socket storage, and the first segment of a
//!   socket whose TCP to a backend was dropped at egress. That last socket is then ended
//!   (`SOCK_DESTROY`), so its owner sees `ECONNABORTED` at once instead of retransmitting
//!   into the void.
//! - [`sweep`] runs once the programs are attached: every TCP connection of the attached
//!   cgroup to a backend that is not the agent's own — opened before the programs, while the
//!   agent was starting, or handed to another process since — is ended the same way, so the
//!   client reconnects through Airlock.
//!
//! Refusals are coalesced per user and kind: the first of a 10-second window is recorded at
//! once, later ones of the window are counted and named in the next record. Refusals the
//! kernel had no room to report are counted there (`report_lost`) and recorded as a number.
//! A socket ended for its egress drop is found by its cookie only: nothing else names it
//! exactly.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use airlock_common::{ConnMeta, Report, report};
use aya::maps::{MapData, RingBuf};
use tracing::warn;

mod sweep;

use sweep::end_socket;
pub use sweep::{sweep, sweep_in};

use crate::{
    archive::{MaskedPayload, RecordDecision, RecordInput, RecordKind},
    attribution::Attribution,
    proxy::Proxy,
    registry::ConnState,
    sockdiag::{self, TcpSocket},
};

/// Coalescing window of refusals of one kind by one process.
const WINDOW: Duration = Duration::from_secs(10);
/// Processes looked at when finding who holds a socket.
const PROC_SCAN_LIMIT: usize = 1 << 16;

/// Read the ring buffers until `stop` is set, on a thread of its own (`airlock-refusals`).
pub fn spawn(
    proxy: Arc<Proxy>,
    rings: Vec<RingBuf<MapData>>,
    own_map: OwnedFd,
    runtime: tokio::runtime::Handle,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("airlock-refusals".into())
        .spawn(move || {
            let mut reader = Reader::new(proxy, own_map, runtime);
            let mut rings = rings;
            while !stop.load(Ordering::Relaxed) {
                let mut pfds: Vec<libc::pollfd> = rings
                    .iter()
                    .map(|r| libc::pollfd {
                        fd: r.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: valid pollfds of the given count, 250 ms timeout.
                unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 250) };
                let mut batch = Vec::new();
                for ring in &mut rings {
                    while let Some(item) = ring.next() {
                        if item.len() >= std::mem::size_of::<Report>() {
                            // SAFETY: the kernel wrote a whole `Report` (checked size); read
                            // unaligned.
                            batch.push(unsafe {
                                std::ptr::read_unaligned(item.as_ptr().cast::<Report>())
                            });
                        }
                        if batch.len() >= 4096 {
                            break;
                        }
                    }
                }
                reader.handle_batch(&batch);
                reader.check_lost();
            }
        })
}

/// Who a socket belongs to: the first process holding it (from `/proc`), else only its uid.
fn attribute(
    proxy: &Proxy,
    tgid: Option<u32>,
    uid: u32,
    cgroup_id: Option<u64>,
    dst: SocketAddr,
) -> Attribution {
    let mut meta = ConnMeta::zeroed();
    meta.uid = uid;
    meta.cgroup_id = cgroup_id.unwrap_or(0);
    meta.orig_addr = crate::keys::ip_words(dst.ip());
    meta.orig_port = dst.port();
    meta.orig_family = if dst.is_ipv4() {
        airlock_common::family::IPV4
    } else {
        airlock_common::family::IPV6
    };
    if let Some(tgid) = tgid {
        meta.pid = tgid;
        meta.tgid = tgid;
        let dir = Path::new("/proc").join(tgid.to_string());
        if let Ok(comm) = std::fs::read_to_string(dir.join("comm")) {
            let bytes = comm.trim_end().as_bytes();
            let n = bytes.len().min(15);
            meta.comm[..n].copy_from_slice(&bytes[..n]);
        }
        if let Ok(status) = std::fs::read_to_string(dir.join("status"))
            && let Some(gid) = status
                .lines()
                .find_map(|l| l.strip_prefix("Gid:"))
                .and_then(|g| g.split_whitespace().next())
                .and_then(|g| g.parse().ok())
        {
            meta.gid = gid;
        }
    }
    Attribution::from_kernel(&meta, Path::new("/proc"), &proxy.names)
}

/// One archive row for a refusal (`kind = "connection"`, `decision = "block"`).
fn record(
    proxy: &Arc<Proxy>,
    id: u64,
    rule: &str,
    a: Option<&Attribution>,
    payload: serde_json::Value,
) {
    let input = RecordInput {
        ts_us: crate::pipeline::now_us(),
        host: proxy.config.host.clone(),
        session_id: format!("{}-{id}", proxy.session_prefix),
        seq: 0,
        direction: crate::pipeline::direction_str(crate::policy::Direction::ClientToServer).into(),
        kind: RecordKind::Connection.into(),
        decision: RecordDecision::Block.into(),
        rules: vec![rule.to_owned()],
        pid: a.map(|a| a.pid),
        tgid: a.map(|a| a.tgid),
        uid: a.map(|a| a.uid),
        gid: a.map(|a| a.gid),
        user: a.and_then(|a| a.user.clone()),
        comm: a.map(|a| a.comm.clone()),
        exe: a.and_then(|a| a.exe.clone()),
        cgroup: a.and_then(|a| a.cgroup.clone()),
        server_addr: a.map(|a| a.original_dst.to_string()),
        payload: Some(MaskedPayload::agent_event(&payload)),
        ..Default::default()
    };
    let archive = proxy.archive.clone();
    let handle = RUNTIME.with(|r| r.borrow().clone());
    let write = async move {
        if let Err(e) = archive.record(input).await {
            warn!(error = %e, "cannot archive a refusal");
        }
    };
    match handle {
        Some(h) => h.block_on(write),
        None => match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(write);
            }
            Err(_) => warn!("no runtime to archive a refusal on"),
        },
    }
}

thread_local! {
    /// The runtime the refusals thread archives through.
    static RUNTIME: std::cell::RefCell<Option<tokio::runtime::Handle>> = const { std::cell::RefCell::new(None) };
}

/// The ring buffers' consumer state.
struct Reader {
    proxy: Arc<Proxy>,
    own_map: OwnedFd,
    /// (kind, uid) → window start and refusals not recorded in it.
    windows: HashMap<(u32, u32), (Instant, u64)>,
    /// The kernel's `report_lost` counter when last looked at.
    lost_seen: u64,
}

impl Reader {
    fn new(proxy: Arc<Proxy>, own_map: OwnedFd, runtime: tokio::runtime::Handle) -> Reader {
        RUNTIME.with(|r| *r.borrow_mut() = Some(runtime));
        let lost_seen = lost(&proxy);
        Reader {
            proxy,
            own_map,
            windows: HashMap::new(),
            lost_seen,
        }
    }

    fn handle_batch(&mut self, batch: &[Report]) {
        let mut drops = Vec::new();
        let mut packets = Vec::new();
        for r in batch {
            match r.kind {
                report::EGRESS_DROP => drops.push(r),
                report::NETNS_NOT_ENROLLED => {
                    // A container the agent does not serve yet: serve it (the caller's next
                    // connect() is redirected), and record the refused one.
                    self.enroll_later(r.tgid);
                    if self.first_in_window(r) {
                        self.refused(r);
                    }
                }
                report::PACKET_SOCKET if r.tgid == 0 => {
                    if self.first_in_window(r) {
                        packets.push(r);
                    }
                }
                _ => {
                    if self.first_in_window(r) {
                        self.refused(r);
                    }
                }
            }
        }
        if !drops.is_empty() {
            self.egress_drops(&drops);
        }
        if !packets.is_empty() {
            self.packet_drops(&packets);
        }
    }

    /// Whether `r` is the first of its kind by its user in the current window (then it is
    /// recorded, naming how many were only counted before it); later ones are counted.
    fn first_in_window(&mut self, r: &Report) -> bool {
        let now = Instant::now();
        if self.windows.len() > 4096 {
            self.windows
                .retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let entry = self
            .windows
            .entry((r.kind, r.uid))
            .or_insert((now, u64::MAX));
        if entry.1 == u64::MAX || now.duration_since(entry.0) >= WINDOW {
            let before = if entry.1 == u64::MAX { 0 } else { entry.1 };
            *entry = (now, 0);
            SUPPRESSED.with(|s| s.set(before));
            true
        } else {
            entry.1 += 1;
            self.proxy
                .counters
                .refusals_coalesced
                .fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Serve the namespace of `pid` (on the runtime's blocking pool: enrolment waits for the
    /// namespace's thread).
    fn enroll_later(&self, pid: u32) {
        let Some(handle) = RUNTIME.with(|r| r.borrow().clone()) else {
            return;
        };
        let proxy = self.proxy.clone();
        let h = handle.clone();
        handle.spawn_blocking(move || {
            let _in_runtime = h.enter();
            if let Err(e) = proxy.enroll(pid, "refused connect", None) {
                warn!(pid, error = %e, "cannot serve the namespace of a refused connect()");
            }
        });
    }

    /// Refusals the ring buffers had no room for are still refusals: one record and event
    /// saying how many went unrecorded.
    fn check_lost(&mut self) {
        let now = lost(&self.proxy);
        if now <= self.lost_seen {
            return;
        }
        let missed = now - self.lost_seen;
        self.lost_seen = now;
        let reason = format!(
            "{missed} refusals were refused and counted but not recorded one by one: the kernel's report buffer was full (a flood of refused sockets or dropped segments)"
        );
        warn!(missed, "{reason}");
        crate::observe::event(crate::observe::AgentEvent::ConnectionRejected {
            rule: "airlock:reports_lost".into(),
            reason: reason.clone(),
            client: "many".into(),
            actor: None,
            destination: None,
        });
        let guard = self.proxy.registry.open(unspecified(), None, None);
        guard.finish(ConnState::Rejected, reason.clone());
        let payload = serde_json::json!({"event": "refusals_not_recorded", "count": missed, "reason": reason});
        record(
            &self.proxy,
            guard.id(),
            "airlock:reports_lost",
            None,
            payload,
        );
    }

    /// A socket the kernel refused (raw, `IP_HDRINCL`, a traffic-control bypass), a
    /// `connect()` without storage, or one to an ambiguous destination.
    fn refused(&self, r: &Report) {
        let suppressed = SUPPRESSED.with(std::cell::Cell::get);
        let (rule, what) = match r.kind {
            report::RAW_SOCKET => (
                "airlock:raw_socket",
                format!(
                    "a raw IP socket (family {}, protocol {}): it could send TCP to a backend without connect(); only ICMP raw sockets are allowed",
                    r.family, r.protocol
                ),
            ),
            report::HDRINCL => (
                "airlock:hdrincl",
                "IP_HDRINCL/IPV6_HDRINCL: a socket writing its own IP headers could write TCP to a backend".to_owned(),
            ),
            report::PACKET_SOCKET => (
                "airlock:packet_socket",
                "a packet socket asking to send past traffic control (PACKET_QDISC_BYPASS, AF_XDP)".to_owned(),
            ),
            report::NO_STORAGE => (
                "airlock:no_storage",
                "connect() to a backend refused: no socket storage for the caller's record".to_owned(),
            ),
            report::NETNS_NOT_ENROLLED => (
                "airlock:netns_not_served",
                format!(
                    "connect() to a backend refused: the caller's network namespace (cookie {}) was not served by the agent yet; it is being enrolled, and the next connection is served",
                    r.netns
                ),
            ),
            report::AGENT_PORT_BIND => (
                "airlock:agent_port_bind",
                format!(
                    "bind() to the agent's port {} in another network namespace refused: it would take the connections redirected there",
                    r.protocol
                ),
            ),
            report::AMBIGUOUS => (
                "airlock:ambiguous_destination",
                "connect() refused: a local address on a backend's port whose listening socket cannot be told apart from the backend's (a wildcard listener of the other family, or 0.0.0.0 on a socket bound to a device)".to_owned(),
            ),
            other => ("airlock:unknown", format!("kernel report of kind {other}")),
        };
        let mut meta = ConnMeta::zeroed();
        meta.pid = r.pid;
        meta.tgid = r.tgid;
        meta.uid = r.uid;
        meta.gid = r.gid;
        meta.comm = r.comm;
        meta.cgroup_id = r.cgroup_id;
        meta.connect_ns = r.ts_ns;
        let attribution = Attribution::from_kernel(&meta, Path::new("/proc"), &self.proxy.names);
        self.proxy
            .counters
            .refused_sockets
            .fetch_add(1, Ordering::Relaxed);
        warn!(rule, pid = r.tgid, uid = r.uid, comm = %attribution.comm, suppressed, "refused: {what}");
        crate::observe::event(crate::observe::AgentEvent::ConnectionRejected {
            rule: rule.into(),
            reason: what.clone(),
            client: format!("pid {}", r.tgid),
            actor: Some(Box::new(attribution.clone())),
            destination: None,
        });
        let payload = serde_json::json!({
            "event": "refused",
            "reason": what,
            "family": r.family,
            "type": r.sock_type,
            "protocol": r.protocol,
            "earlier_refusals_not_recorded": suppressed,
        });
        let guard = self
            .proxy
            .registry
            .open(unspecified(), Some(attribution.clone()), None);
        guard.finish(ConnState::Rejected, what);
        record(&self.proxy, guard.id(), rule, Some(&attribution), payload);
    }

    /// Sockets whose TCP to a backend was dropped at egress: each found by its cookie (one
    /// listing for the batch), ended and recorded.
    fn egress_drops(&self, drops: &[&Report]) {
        let sockets = sockdiag::tcp_sockets(Some(self.own_map.as_fd())).unwrap_or_default();
        for r in drops {
            let src = SocketAddr::new(crate::keys::ip_from_words(r.src_addr), r.src_port);
            let dst = SocketAddr::new(crate::keys::ip_from_words(r.dst_addr), r.dst_port);
            let what = if r.dst_port == 0 {
                "TCP it could not read whole (fragmented, truncated or too deep)".to_owned()
            } else {
                format!("TCP to backend address {dst}")
            };
            let reason = format!(
                "{what} from a socket whose connect() Airlock never redirected (opened before the agent, a destination rewritten by NAT, or a raw socket): dropped, and the connection ended"
            );
            // The cookie names the socket exactly; its own remote address may be the one
            // before NAT.
            let in_host = sockets
                .iter()
                .find(|s| s.cookie == r.cookie && !s.is_listener())
                .map(|s| (s.clone(), None));
            let found = in_host.or_else(|| self.find_in_namespaces(r.cookie));
            match found {
                Some((s, ns)) => {
                    end_socket(
                        &self.proxy,
                        &s,
                        "airlock:unredirected_tcp",
                        &reason,
                        ns.as_ref(),
                    );
                }
                None => {
                    // Gone already, or not a TCP socket (raw): record what the kernel saw,
                    // end nothing.
                    let attribution = attribute(&self.proxy, None, r.uid, Some(r.cgroup_id), dst);
                    let guard = self
                        .proxy
                        .registry
                        .open(src, Some(attribution.clone()), None);
                    guard.finish(ConnState::Rejected, reason.clone());
                    crate::observe::event(crate::observe::AgentEvent::ConnectionRejected {
                        rule: "airlock:unredirected_tcp".into(),
                        reason: reason.clone(),
                        client: src.to_string(),
                        actor: Some(Box::new(attribution.clone())),
                        destination: Some(dst.to_string()),
                    });
                    let payload = serde_json::json!({
                        "event": "dropped",
                        "client": src.to_string(),
                        "server": dst.to_string(),
                        "socket_cookie": r.cookie,
                        "reason": reason,
                    });
                    record(
                        &self.proxy,
                        guard.id(),
                        "airlock:unredirected_tcp",
                        Some(&attribution),
                        payload,
                    );
                }
            }
        }
    }

    /// A socket of a served namespace, by cookie (the egress guard runs for the cgroup's
    /// sockets in every namespace).
    fn find_in_namespaces(
        &self,
        cookie: u64,
    ) -> Option<(TcpSocket, Option<Arc<crate::netns::Netns>>)> {
        let namespaces = self.proxy.namespaces.lock().ok()?.list();
        for ns in namespaces {
            let Ok(map) = self.own_map.try_clone() else {
                continue;
            };
            let listed = ns.run(move || sockdiag::tcp_sockets(Some(map.as_fd())));
            if let Ok(Ok(sockets)) = listed
                && let Some(s) = sockets
                    .into_iter()
                    .find(|s| s.cookie == cookie && !s.is_listener())
            {
                return Some((s, Some(ns)));
            }
        }
        None
    }

    /// Frames of packet sockets holding TCP to a backend: the socket's holder found through
    /// `packet_diag` and `/proc`, recorded.
    fn packet_drops(&self, drops: &[&Report]) {
        let sockets = sockdiag::packet_sockets().unwrap_or_default();
        for r in drops {
            let suppressed = SUPPRESSED.with(std::cell::Cell::get);
            let dst = SocketAddr::new(crate::keys::ip_from_words(r.dst_addr), r.dst_port);
            let holder = sockets.iter().find(|s| s.cookie == r.cookie).and_then(|s| {
                sockdiag::holders(Path::new("/proc"), s.inode, PROC_SCAN_LIMIT)
                    .first()
                    .copied()
            });
            let attribution = attribute(&self.proxy, holder, r.uid, Some(r.cgroup_id), dst);
            let reason = if r.dst_port == 0 {
                "a packet socket sending TCP it could not read whole (fragmented, truncated or too deep): dropped".to_owned()
            } else {
                format!(
                    "a packet socket sending TCP to backend address {dst}, bypassing connect(): dropped"
                )
            };
            self.proxy
                .counters
                .refused_sockets
                .fetch_add(1, Ordering::Relaxed);
            warn!(pid = attribution.tgid, uid = r.uid, "refused: {reason}");
            crate::observe::event(crate::observe::AgentEvent::ConnectionRejected {
                rule: "airlock:packet_socket".into(),
                reason: reason.clone(),
                client: format!("pid {}", attribution.tgid),
                actor: Some(Box::new(attribution.clone())),
                destination: (r.dst_port != 0).then(|| dst.to_string()),
            });
            let guard = self
                .proxy
                .registry
                .open(unspecified(), Some(attribution.clone()), None);
            guard.finish(ConnState::Rejected, reason.clone());
            let payload = serde_json::json!({
                "event": "dropped",
                "server": (r.dst_port != 0).then(|| dst.to_string()),
                "socket_cookie": r.cookie,
                "reason": reason,
                "earlier_refusals_not_recorded": suppressed,
            });
            record(
                &self.proxy,
                guard.id(),
                "airlock:packet_socket",
                Some(&attribution),
                payload,
            );
        }
    }
}

thread_local! {
    /// How many refusals the window of the report being recorded counted without recording.
    static SUPPRESSED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The kernel's `report_lost` counter.
fn lost(proxy: &Proxy) -> u64 {
    proxy
        .kernel
        .lock()
        .map(|k| {
            k.counters()
                .into_iter()
                .find(|(n, _)| *n == "report_lost")
                .map_or(0, |(_, v)| v)
        })
        .unwrap_or(0)
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
