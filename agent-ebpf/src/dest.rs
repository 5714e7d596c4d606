//! Which backend, if any, a destination reaches: shared by the connect hooks (before the
//! kernel resolves the address) and the egress guard (after NAT rewrote it).
//!
//! A destination is a backend's when
//! 1. its address and port are in `AIRLOCK_TARGETS` (exact), or
//! 2. its address is local to the host (`AIRLOCK_LOCAL`, the `local` routing table) and the
//!    listening socket it reaches is the one a local backend address on the same port
//!    reaches: the same bound address, or both wildcard listeners (`0.0.0.0`, `::`). A server
//!    bound to the wildcard address takes the whole loopback range, `::1` and every
//!    interface address; another service bound to another local address on the port is not
//!    the backend.
//!
//! Ports not in `AIRLOCK_PORTS` never get here: callers check the bitmap first.

use core::ffi::c_void;

use airlock_common::{
    Counter, LOCAL_TARGETS_PER_PORT, LocalKey, LocalTargets, SCOPE_CGROUPS, Scope, TargetKey,
    matched,
};
use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple},
    helpers::generated::{bpf_sk_lookup_tcp, bpf_sk_release},
    macros::map,
    maps::{HashMap, LpmTrie, lpm_trie::Key},
};

use crate::{AF_INET, AF_INET6, TARGETS, count};

/// Prefixes of the host's local addresses, IPv4 as IPv4-mapped (written by the agent from the
/// `local` routing table).
#[map(name = "AIRLOCK_LOCAL")]
static LOCAL: LpmTrie<[u32; 4], u32> =
    LpmTrie::with_max_entries(airlock_common::capacity::LOCAL, 0);

/// Per port: the backends whose addresses are local to the host.
#[map(name = "AIRLOCK_LTARGET")]
static LOCAL_TARGETS: HashMap<u32, LocalTargets> =
    HashMap::with_max_entries(airlock_common::capacity::LOCAL_TARGETS, 0);

/// Targets redirected only for some cgroups (egress proxies with `cgroups`), by target id.
#[map(name = "AIRLOCK_SCOPES")]
static SCOPES: HashMap<u32, Scope> = HashMap::with_max_entries(airlock_common::capacity::SCOPES, 0);

/// Whether target `id` is governed for the socket whose cgroup ancestor at a level is
/// `ancestor(level)`: always, unless the target has a scope and no scope cgroup is an ancestor.
#[inline(always)]
pub fn in_scope(id: u32, ancestor: impl Fn(u32) -> u64) -> bool {
    // SAFETY: the map value is plain data.
    let Some(scope) = (unsafe { SCOPES.get(&id) }) else {
        return true;
    };
    let n = scope.count as usize;
    for i in 0..SCOPE_CGROUPS {
        if i >= n {
            break;
        }
        if ancestor(scope.levels[i]) == scope.ids[i] {
            return true;
        }
    }
    false
}

/// What a destination is.
#[derive(Clone, Copy)]
pub enum Judged {
    /// A backend's.
    Backend(Match),
    /// Not a backend's.
    Other,
    /// A local address on a backend port whose listening socket cannot be told apart from the
    /// backend's (a wildcard listener of the other family, or a device-bound unspecified
    /// address): refused rather than guessed.
    Ambiguous,
}

/// A destination found to be a backend's.
#[derive(Clone, Copy)]
pub struct Match {
    pub backend_id: u32,
    /// The backend address it was judged to reach (the dialled one when exact).
    pub addr: [u32; 4],
    /// One of `airlock_common::matched`.
    pub how: u32,
}

/// What `key` is. `ctx` is the program's context (socket lookups are made in its network
/// namespace).
#[inline(always)]
pub fn judge(ctx: *mut c_void, key: &TargetKey) -> Judged {
    // SAFETY: the map value is plain data; copied out at once.
    if let Some(id) = unsafe { TARGETS.get(key) } {
        return Judged::Backend(Match {
            backend_id: *id,
            addr: key.addr,
            how: matched::EXACT,
        });
    }
    same_listener(ctx, key)
}

/// Case 2 above: a local address on a port with local backends, reaching one's listener.
#[inline(never)]
fn same_listener(ctx: *mut c_void, key: &TargetKey) -> Judged {
    let port = u32::from(key.port);
    // SAFETY: as above.
    let Some(local) = (unsafe { LOCAL_TARGETS.get(&port) }) else {
        return Judged::Other;
    };
    if LOCAL.get(&Key::new(128, key.addr)).is_none() {
        return Judged::Other;
    }
    let Some(reached) = listener(ctx, &key.addr, key.port) else {
        // Nothing listens there: the connection will be refused by the kernel itself.
        count(Counter::MissOtherListener);
        return Judged::Other;
    };
    let n = local.count as usize;
    let mut ambiguous = false;
    for i in 0..LOCAL_TARGETS_PER_PORT {
        if i >= n {
            break;
        }
        let target = local.addrs[i];
        let Some(theirs) = listener(ctx, &target, key.port) else {
            continue;
        };
        if reached.same(&theirs) {
            return Judged::Backend(Match {
                backend_id: local.backend_ids[i],
                addr: target,
                how: matched::LISTENER,
            });
        }
        ambiguous |= reached.wildcard() && theirs.wildcard();
    }
    if ambiguous {
        return Judged::Ambiguous;
    }
    count(Counter::MissOtherListener);
    Judged::Other
}

/// What identifies a listening socket: its family and the address it is bound to (port
/// equal by construction). Two listeners bound to the same address and port are one
/// `SO_REUSEPORT` group, i.e. one server.
#[derive(Clone, Copy)]
struct Listener {
    family: u32,
    addr: [u32; 4],
}

impl Listener {
    #[inline(always)]
    fn wildcard(&self) -> bool {
        self.addr[0] == 0 && self.addr[1] == 0 && self.addr[2] == 0 && self.addr[3] == 0
    }

    /// The same listening socket (or `SO_REUSEPORT` group): same family, same bound address.
    /// A dual-stack IPv6 listener is found by IPv4 lookups too, so a server on `[::]` is one
    /// listener for both families; two wildcard listeners of different families may be two
    /// services, and are not taken for one.
    #[inline(always)]
    fn same(&self, other: &Listener) -> bool {
        self.family == other.family
            && self.addr[0] == other.addr[0]
            && self.addr[1] == other.addr[1]
            && self.addr[2] == other.addr[2]
            && self.addr[3] == other.addr[3]
    }
}

/// The listening socket a connection to `addr:port` (map form: IPv4 mapped) would reach in
/// the caller's network namespace.
#[inline(never)]
fn listener(ctx: *mut c_void, addr: &[u32; 4], port: u16) -> Option<Listener> {
    // SAFETY: bpf_sock_tuple is plain data; all-zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let v4 = addr[0] == 0 && addr[1] == 0 && addr[2] == 0xffff_u32.to_be();
    let size = if v4 {
        tuple.__bindgen_anon_1.ipv4.daddr = addr[3];
        tuple.__bindgen_anon_1.ipv4.dport = port.to_be();
        // A source is needed for the lookup's hash only; the listener does not depend on it.
        tuple.__bindgen_anon_1.ipv4.saddr = addr[3];
        12
    } else {
        tuple.__bindgen_anon_1.ipv6.daddr = *addr;
        tuple.__bindgen_anon_1.ipv6.saddr = *addr;
        tuple.__bindgen_anon_1.ipv6.dport = port.to_be();
        36
    };
    // SAFETY: `ctx` is the program's context; the tuple outlives the call; the returned
    // socket reference is released below.
    let sk: *mut bpf_sock =
        unsafe { bpf_sk_lookup_tcp(ctx, &raw mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a referenced, non-null socket from the lookup; plain field reads.
    let found = unsafe {
        let family = (*sk).family;
        let a4 = (*sk).src_ip4;
        let a6 = (*sk).src_ip6;
        Listener {
            family,
            addr: if family == AF_INET {
                if a4 == 0 {
                    [0; 4]
                } else {
                    [0, 0, 0xffff_u32.to_be(), a4]
                }
            } else if family == AF_INET6 {
                a6
            } else {
                [0xffff_ffff; 4]
            },
        }
    };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk.cast()) };
    Some(found)
}

/// Written with `LocalKey` by the agent; the program reads `Key<[u32; 4]>`: one layout.
const _: () = assert!(core::mem::size_of::<LocalKey>() == core::mem::size_of::<Key<[u32; 4]>>());
