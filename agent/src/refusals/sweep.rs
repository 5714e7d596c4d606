//! Connections to backends that did not go through Airlock, found and ended: at start (the
//! agent's namespace), when a namespace is first served, and for each egress drop.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    sync::{Arc, atomic::Ordering},
};

use tracing::{info, warn};

use super::{PROC_SCAN_LIMIT, attribute, record};
use crate::{
    kernel::LocalAddrs,
    proxy::Proxy,
    registry::ConnState,
    sockdiag::{self, TcpSocket},
};

/// End every connection of the cgroup to a backend that did not go through Airlock. Returns
/// how many were ended.
pub fn sweep(proxy: &Arc<Proxy>, cgroup: &Path, own_map: &OwnedFd) -> usize {
    sweep_in(proxy, cgroup, own_map, None)
}

/// [`sweep`] in one network namespace (`None`: the agent's own); a served namespace is swept
/// from its own thread, where its sockets are.
pub fn sweep_in(
    proxy: &Arc<Proxy>,
    cgroup: &Path,
    own_map: &OwnedFd,
    ns: Option<&Arc<crate::netns::Netns>>,
) -> usize {
    let listed = match ns {
        None => sockdiag::tcp_sockets(Some(own_map.as_fd())),
        Some(ns) => match own_map.try_clone() {
            Ok(map) => ns
                .run(move || sockdiag::tcp_sockets(Some(map.as_fd())))
                .and_then(|r| r),
            Err(e) => Err(e),
        },
    };
    let sockets = match listed {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot list a namespace's TCP sockets: connections opened before the agent are not ended (the egress guard still drops their traffic to backends)");
            return 0;
        }
    };
    let governed = crate::cgroup::subtree_ids(cgroup, 1 << 16);
    let local = proxy
        .kernel
        .lock()
        .map(|k| k.local_addrs().clone())
        .unwrap_or_default();
    let all: Vec<(SocketAddr, u32)> = proxy
        .targets
        .read()
        .map(|t| t.iter().map(|t| (t.addr, t.backend_id)).collect())
        .unwrap_or_default();
    let scopes = scoped_cgroups(&proxy.config);
    let listeners: Vec<&TcpSocket> = sockets.iter().filter(|s| s.is_listener()).collect();
    let mut ended = 0;
    for s in &sockets {
        let Some(cgroup_id) = s.cgroup_id.filter(|c| governed.contains(c)) else {
            continue;
        };
        if s.own
            || matches!(
                s.state,
                sockdiag::state::LISTEN | sockdiag::state::TIME_WAIT | sockdiag::state::CLOSE
            )
        {
            continue;
        }
        // A scoped target (an egress proxy with `cgroups`) counts only for its cgroups.
        let targets: Vec<SocketAddr> = all
            .iter()
            .filter(|(_, id)| scopes.get(id).is_none_or(|ids| ids.contains(&cgroup_id)))
            .map(|(addr, _)| *addr)
            .collect();
        let Some(target) = backend_reached(s.remote, &targets, &local, &listeners) else {
            continue;
        };
        let reason = format!(
            "a connection to backend address {target} that was open before Airlock attached its programs (or opened while it started): ended so the client reconnects through Airlock"
        );
        if end_socket(proxy, s, "airlock:opened_before_agent", &reason, ns) {
            ended += 1;
        }
    }
    if ended > 0 {
        info!(
            ended,
            "ended connections to backends that were opened before the programs were attached"
        );
    }
    ended
}

/// For each egress proxy with `cgroups`: the ids of those cgroups and every cgroup below them.
fn scoped_cgroups(config: &crate::config::Config) -> HashMap<u32, HashSet<u64>> {
    let Ok(mount) = crate::cgroup::resolve(None) else {
        return HashMap::new();
    };
    config
        .egress_proxies
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.cgroups.is_empty())
        .map(|(i, p)| {
            let ids = p
                .cgroups
                .iter()
                .filter_map(|rel| crate::cgroup::named(&mount, &mount, rel).ok())
                .flat_map(|n| crate::cgroup::subtree_ids(&n.dir, 1 << 16))
                .collect();
            (crate::config::proxy_id(i), ids)
        })
        .collect()
}

/// The backend address `remote` reaches: a target, or a local address whose listening socket
/// is a local target's (the rule `agent-ebpf/src/dest.rs` applies in the kernel).
fn backend_reached(
    remote: SocketAddr,
    targets: &[SocketAddr],
    local: &LocalAddrs,
    listeners: &[&TcpSocket],
) -> Option<SocketAddr> {
    let canon = |a: SocketAddr| SocketAddr::new(crate::keys::canonical_ip(a.ip()), a.port());
    let remote = canon(remote);
    if let Some(t) = targets.iter().find(|t| canon(**t) == remote) {
        return Some(*t);
    }
    if !local.contains(remote.ip()) {
        return None;
    }
    let reached = listener_for(remote, listeners)?;
    targets
        .iter()
        .filter(|t| t.port() == remote.port() && local.contains(t.ip()))
        .find(|t| listener_for(canon(**t), listeners).is_some_and(|l| l.same_server(&reached)))
        .copied()
}

/// A listening socket, by what the kernel matches on: its family and bound address.
struct Bound {
    v6: bool,
    addr: std::net::IpAddr,
}

impl Bound {
    fn wildcard(&self) -> bool {
        self.addr.is_unspecified()
    }
    fn same_server(&self, other: &Bound) -> bool {
        (self.wildcard() && other.wildcard()) || (self.v6 == other.v6 && self.addr == other.addr)
    }
}

/// The listener a connection to `to` reaches: one bound to that address, else a wildcard
/// one (IPv4 `0.0.0.0` for IPv4, `::` for both when it is not IPv6-only — approximated as
/// both).
fn listener_for(to: SocketAddr, listeners: &[&TcpSocket]) -> Option<Bound> {
    let port_matches = listeners.iter().filter(|l| l.local.port() == to.port());
    let mut wildcard = None;
    for l in port_matches {
        let bound = crate::keys::canonical_ip(l.local.ip());
        if bound == to.ip() {
            return Some(Bound {
                v6: l.family == libc::AF_INET6 as u8,
                addr: bound,
            });
        }
        if bound.is_unspecified() {
            wildcard = Some(Bound {
                v6: l.family == libc::AF_INET6 as u8,
                addr: bound,
            });
        }
    }
    wildcard
}

/// Attribute, record, event and destroy one socket (in namespace `ns`, `None`: the agent's).
/// `false` when it was already ended.
pub(super) fn end_socket(
    proxy: &Arc<Proxy>,
    s: &TcpSocket,
    rule: &str,
    reason: &str,
    ns: Option<&Arc<crate::netns::Netns>>,
) -> bool {
    let first = ENDED.lock().map(|mut e| e.insert(s.cookie)).unwrap_or(true);
    if !first {
        return false;
    }
    let holders = sockdiag::holders(Path::new("/proc"), s.inode, PROC_SCAN_LIMIT);
    let attribution = attribute(
        proxy,
        holders.first().copied(),
        s.uid,
        s.cgroup_id,
        s.remote,
    );
    let destroyed = match ns {
        None => sockdiag::destroy(s),
        Some(ns) => {
            let target = s.clone();
            ns.run(move || sockdiag::destroy(&target)).and_then(|r| r)
        }
    };
    let outcome = match &destroyed {
        Ok(()) => "ended".to_owned(),
        Err(e) => format!("could not be ended ({e}); its traffic to the backend is dropped"),
    };
    let guard = proxy
        .registry
        .open(s.local, Some(attribution.clone()), None);
    guard.finish(ConnState::Rejected, format!("{reason} ({outcome})"));
    proxy
        .counters
        .ended_unredirected
        .fetch_add(1, Ordering::Relaxed);
    warn!(
        rule,
        client = %s.local,
        server = %s.remote,
        pid = attribution.tgid,
        uid = s.uid,
        outcome,
        "a connection to a backend that Airlock never judged"
    );
    crate::observe::event(crate::observe::AgentEvent::ConnectionRejected {
        rule: rule.to_owned(),
        reason: reason.to_owned(),
        client: s.local.to_string(),
        actor: Some(Box::new(attribution.clone())),
        destination: Some(s.remote.to_string()),
    });
    let payload = serde_json::json!({
        "event": "ended",
        "client": s.local.to_string(),
        "server": s.remote.to_string(),
        "holders": holders,
        "reason": reason,
        "outcome": outcome,
    });
    record(proxy, guard.id(), rule, Some(&attribution), payload);
    true
}

/// Cookies of sockets already ended (by the sweep or a drop report), bounded.
static ENDED: std::sync::LazyLock<std::sync::Mutex<BoundedSet>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(BoundedSet::new(4096)));

struct BoundedSet {
    set: HashSet<u64>,
    order: VecDeque<u64>,
    cap: usize,
}

impl BoundedSet {
    fn new(cap: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }
    fn insert(&mut self, v: u64) -> bool {
        if !self.set.insert(v) {
            return false;
        }
        self.order.push_back(v);
        if self.order.len() > self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_set_forgets_the_oldest() {
        let mut s = BoundedSet::new(2);
        assert!(s.insert(1));
        assert!(!s.insert(1));
        assert!(s.insert(2));
        assert!(s.insert(3));
        assert!(s.insert(1), "1 was forgotten when 3 came");
    }
}
