//! Airlock's kernel programs.
//!
//! - `airlock_conn4` / `airlock_conn6` (cgroup `connect4`/`connect6`) run inside the
//!   caller's `connect()`. For a TCP socket whose destination is a configured MCP backend they
//!   record who is calling (pid, tgid, uid, gid, comm, cgroup) and where it meant to go in the
//!   socket's own storage (`AIRLOCK_PENDING`, an SK_STORAGE map: the record dies with the
//!   socket, so a `connect()` that fails after the hook leaves nothing behind), then rewrite
//!   the destination to the agent's listener.
//! - The agent's own upstream sockets are let through: the agent tags each one in
//!   `AIRLOCK_OWN` (socket storage written from userspace with the socket's fd) before it
//!   connects. Nothing a client can set on its own socket (a mark, an option) does that.
//! - `airlock_sockops` runs at `BPF_SOCK_OPS_TCP_CONNECT_CB` (before the SYN, source port
//!   chosen) and moves the pending record into `AIRLOCK_FLOWS`, keyed by the 4-tuple the agent
//!   will see from `accept()`.
//!
//! - A destination is judged as the kernel will use it (`dest.rs`): an unspecified address
//!   (`0.0.0.0`, `::`, `::ffff:0.0.0.0`) as the local address the kernel turns it into, and
//!   another local address by the listening socket it reaches.
//! - `guard.rs`: what does not go through `connect()` — a cgroup egress program drops TCP to
//!   a backend from sockets that were never redirected (opened before the programs, a raw
//!   socket, a destination rewritten by NAT after the hook), and LSM programs attached to the
//!   cgroup refuse raw IP sockets other than ICMP, packet sockets and `IP_HDRINCL`.
//!
//! Every path bumps one named counter (`airlock_common::Counter`); refusals are also reported
//! to the agent through a ring buffer (`AIRLOCK_REPORTS`). Entry points are thin shims around
//! `try_*` functions that return a verdict.
#![no_std]
#![no_main]

mod dest;
mod egress;
mod guard;

use airlock_common::{
    CONFIG_ENABLED, Config, ConnMeta, Counter, FlowKey, PORT_WORDS, TargetKey, capacity, family,
    matched, port_bit,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
            bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns,
            bpf_sk_storage_delete, bpf_sk_storage_get,
        },
    },
    macros::{btf_map, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// Multipath TCP: a TCP conversation like any other (its subflows are TCP sockets).
const IPPROTO_MPTCP: u32 = 262;

/// `connect()` goes on (possibly to a rewritten address).
const ALLOW: i32 = 1;
/// `connect()` fails with EPERM.
const REFUSE: i32 = 0;

#[map(name = "AIRLOCK_CONFIG")]
pub(crate) static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "AIRLOCK_TARGETS")]
pub(crate) static TARGETS: HashMap<TargetKey, u32> =
    HashMap::with_max_entries(capacity::TARGETS, 0);

/// One bit per TCP port that some backend uses: most connect() calls are decided by this
/// inlined array read, without hashing the destination.
#[map(name = "AIRLOCK_PORTS")]
pub(crate) static PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

/// The caller's record, in the socket's own storage: sock_ops takes it out at the SYN, and a
/// socket that never gets there frees it when it closes. A local user cannot fill it up.
#[btf_map(name = "AIRLOCK_PENDING")]
static PENDING: SkStorage<ConnMeta> = SkStorage::new();

/// Tags of the agent's own upstream sockets (written by the agent, from userspace, keyed by the
/// socket's fd, before it connects).
#[btf_map(name = "AIRLOCK_OWN")]
pub(crate) static OWN: SkStorage<u32> = SkStorage::new();

#[map(name = "AIRLOCK_FLOWS")]
static FLOWS: LruHashMap<FlowKey, ConnMeta> = LruHashMap::with_max_entries(capacity::FLOWS, 0);

/// Network namespaces (other than the agent's) the agent listens in, by cookie.
#[map(name = "AIRLOCK_NETNS")]
static NETNS: HashMap<u64, u32> = HashMap::with_max_entries(capacity::NETNS, 0);

#[map(name = "AIRLOCK_COUNTER")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[cgroup_sock_addr(connect4)]
pub fn airlock_conn4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn airlock_conn6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx)
}

#[cgroup_sock_addr(bind4)]
pub fn airlock_bind4(ctx: SockAddrContext) -> i32 {
    try_bind(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn airlock_bind6(ctx: SockAddrContext) -> i32 {
    try_bind(&ctx)
}

#[sock_ops]
pub fn airlock_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        record_flow(&ctx);
    }
    1
}

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

/// The configuration, or `None` (and a counted skip) until the agent has written it.
#[inline(always)]
fn config() -> Option<&'static Config> {
    match CONFIG.get(0) {
        Some(cfg) if cfg.enabled == CONFIG_ENABLED => Some(cfg),
        _ => {
            count(Counter::SkipUnconfigured);
            None
        }
    }
}

/// First check of both hooks, the only one most connect() calls meet: is the destination port
/// used by any backend? One inlined array read, no hashing.
#[inline(always)]
fn port_in_use(ctx: &SockAddrContext) -> Option<u16> {
    // SAFETY: valid context pointer; plain field read.
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    let (word, bit) = port_bit(port);
    if PORTS.get(word).is_some_and(|w| w & bit != 0) {
        Some(port)
    } else {
        count(Counter::MissNotBackend);
        None
    }
}

/// Common checks of both hooks: a TCP (or MPTCP) socket (counted skip otherwise).
#[inline(always)]
fn is_tcp(ctx: &SockAddrContext) -> bool {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the duration of the program.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || (sa.protocol != IPPROTO_TCP && sa.protocol != IPPROTO_MPTCP) {
        count(Counter::SkipNotTcp);
        return false;
    }
    true
}

/// A `bind()` to the agent's port in another network namespace by a socket that is not the
/// agent's own: refused (a container's root could otherwise take the port the redirect sends
/// that namespace's connections to). In the agent's own namespace the port is privileged.
#[inline(never)]
fn try_bind(ctx: &SockAddrContext) -> i32 {
    // SAFETY: valid context pointer; plain field read.
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    let Some(cfg) = CONFIG.get(0) else {
        return ALLOW;
    };
    if cfg.enabled != CONFIG_ENABLED || port != cfg.agent_port {
        return ALLOW;
    }
    // SAFETY: the helper takes the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns == cfg.host_netns || is_own(ctx) {
        return ALLOW;
    }
    count(Counter::RefusedAgentPortBind);
    guard::report_caller_in(
        airlock_common::report::AGENT_PORT_BIND,
        0,
        0,
        u32::from(port),
        netns,
    );
    REFUSE
}

/// Whether the agent tagged this socket as one of its own upstream connections.
#[inline(always)]
fn is_own(ctx: &SockAddrContext) -> bool {
    // SAFETY: `sk` of a sock_addr context is never null; a lookup without the create flag only
    // reads.
    !unsafe { OWN.get_ptr_mut(ctx) }.is_null()
}

#[inline(never)]
fn try_connect4(ctx: &SockAddrContext) -> i32 {
    let Some(port) = port_in_use(ctx) else {
        return ALLOW;
    };
    if !is_tcp(ctx) {
        return ALLOW;
    }
    let Some(cfg) = config() else {
        return ALLOW;
    };
    // SAFETY: valid context pointer; plain field read.
    let dialed = unsafe { (*ctx.sock_addr).user_ip4 };
    // The kernel sends a connection to 0.0.0.0 to the socket's bound source address, or to
    // 127.0.0.1: judge that.
    let ip = if dialed == 0 {
        match unspecified_v4(ctx) {
            Some(ip) => ip,
            None => return refuse_ambiguous(),
        }
    } else {
        dialed
    };
    let key = TargetKey {
        addr: mapped(ip),
        port,
        _pad: 0,
    };
    let verdict = redirect_verdict(ctx, cfg, &key, &mapped(dialed), family::IPV4);
    if verdict == Redirect::Go {
        // SAFETY: valid context pointer; the kernel allows writing user_ip4/user_port here.
        unsafe {
            (*ctx.sock_addr).user_ip4 = cfg.agent_ip4;
            (*ctx.sock_addr).user_port = u32::from(cfg.agent_port.to_be());
        }
        count(Counter::RedirectIpv4);
    }
    verdict.into_return()
}

#[inline(never)]
fn try_connect6(ctx: &SockAddrContext) -> i32 {
    let Some(port) = port_in_use(ctx) else {
        return ALLOW;
    };
    if !is_tcp(ctx) {
        return ALLOW;
    }
    let Some(cfg) = config() else {
        return ALLOW;
    };
    // Read the address word by word: the verifier rejects wider or derived context accesses.
    // SAFETY: valid context pointer; plain field reads.
    let (w0, w1, w2, w3) = unsafe {
        let sa = ctx.sock_addr;
        (
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        )
    };
    let is_mapped = w0 == 0 && w1 == 0 && w2 == 0xffff_u32.to_be();
    let dialed = [w0, w1, w2, w3];
    // As the kernel resolves them: `::ffff:0.0.0.0` like 0.0.0.0 (it takes the IPv4 path);
    // `::` becomes `::1`, or `::ffff:127.0.0.1` on a socket bound to an IPv4-mapped address.
    let addr = if is_mapped && w3 == 0 {
        match unspecified_v4(ctx) {
            Some(ip) => mapped(ip),
            None => return refuse_ambiguous(),
        }
    } else if w0 == 0 && w1 == 0 && w2 == 0 && w3 == 0 {
        unspecified_v6(ctx)
    } else {
        dialed
    };
    let key = TargetKey {
        addr,
        port,
        _pad: 0,
    };
    let fam = if is_mapped {
        family::IPV4_MAPPED
    } else {
        family::IPV6
    };
    let verdict = redirect_verdict(ctx, cfg, &key, &dialed, fam);
    if verdict == Redirect::Go {
        // An IPv4-mapped destination goes to the agent's IPv4 listener through the same
        // mapped form; a native IPv6 one to the IPv6 listener (`::` that became an
        // IPv4-mapped loopback address goes the IPv4 way too).
        let to_v4 = key.addr[0] == 0 && key.addr[1] == 0 && key.addr[2] == 0xffff_u32.to_be();
        let target = if to_v4 {
            [0, 0, 0xffff_u32.to_be(), cfg.agent_ip4]
        } else {
            cfg.agent_ip6
        };
        // SAFETY: valid context pointer; the kernel allows writing user_ip6/user_port here.
        unsafe {
            let sa = ctx.sock_addr;
            (*sa).user_ip6[0] = target[0];
            (*sa).user_ip6[1] = target[1];
            (*sa).user_ip6[2] = target[2];
            (*sa).user_ip6[3] = target[3];
            (*sa).user_port = u32::from(cfg.agent_port.to_be());
        }
        count(if is_mapped {
            Counter::RedirectIpv4Mapped
        } else {
            Counter::RedirectIpv6
        });
    }
    verdict.into_return()
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Redirect {
    /// Leave the connection alone.
    Pass,
    /// Rewrite the destination to the agent.
    Go,
    /// Refuse the connection (we could not record who made it).
    Refuse,
}

impl Redirect {
    #[inline(always)]
    fn into_return(self) -> i32 {
        match self {
            Redirect::Pass | Redirect::Go => ALLOW,
            Redirect::Refuse => REFUSE,
        }
    }
}

/// The address a connection to `0.0.0.0` goes to: the socket's bound source address, or
/// 127.0.0.1 (network order). `None` on a socket bound to a device, where it is that device's
/// address, which the programs do not know.
#[inline(always)]
fn unspecified_v4(ctx: &SockAddrContext) -> Option<u32> {
    // SAFETY: `sk` of a sock_addr context is a valid socket; plain field reads.
    let (bound, dev) = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        ((*sk).src_ip4, (*sk).bound_dev_if)
    };
    if bound != 0 {
        Some(bound)
    } else if dev != 0 {
        None
    } else {
        Some(u32::from_be_bytes([127, 0, 0, 1]).to_be())
    }
}

/// A destination on a backend port that may be the backend's and cannot be told: refused,
/// counted, reported.
#[inline(never)]
fn refuse_ambiguous() -> i32 {
    count(Counter::RefusedAmbiguous);
    guard::report_caller(airlock_common::report::AMBIGUOUS, 0, 0, 0);
    REFUSE
}

/// The address a connection to `::` goes to: `::1`, or `::ffff:127.0.0.1` when the socket is
/// bound to an IPv4-mapped address.
#[inline(always)]
fn unspecified_v6(ctx: &SockAddrContext) -> [u32; 4] {
    // SAFETY: as above.
    let (b0, b1, b2) = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        ((*sk).src_ip6[0], (*sk).src_ip6[1], (*sk).src_ip6[2])
    };
    if b0 == 0 && b1 == 0 && b2 == 0xffff_u32.to_be() {
        mapped(u32::from_be_bytes([127, 0, 0, 1]).to_be())
    } else {
        [0, 0, 0, 1_u32.to_be()]
    }
}

/// Decide for one destination and, when it is a backend, record the caller in the socket's
/// storage. Shared by both address families. `key` is the destination as the kernel will use
/// it, `dialed` the address the caller gave.
#[inline(always)]
fn redirect_verdict(
    ctx: &SockAddrContext,
    cfg: &Config,
    key: &TargetKey,
    dialed: &[u32; 4],
    fam: u16,
) -> Redirect {
    let found = match dest::judge(ctx.as_ptr(), key) {
        dest::Judged::Backend(m) => m,
        dest::Judged::Other => {
            count(Counter::MissNotBackend);
            return Redirect::Pass;
        }
        dest::Judged::Ambiguous => {
            count(Counter::RefusedAmbiguous);
            guard::report_caller(airlock_common::report::AMBIGUOUS, u32::from(fam), 0, 0);
            return Redirect::Refuse;
        }
    };
    let backend_id = found.backend_id;
    // SAFETY: a helper of cgroup programs; any level is valid (0 past the leaf).
    if !dest::in_scope(backend_id, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level as i32)
    }) {
        count(Counter::MissOutOfScope);
        return Redirect::Pass;
    }
    let unspecified = dialed[0] == 0
        && dialed[1] == 0
        && (dialed[2] == 0 || dialed[2] == 0xffff_u32.to_be())
        && dialed[3] == 0;
    let how = if unspecified {
        matched::UNSPECIFIED
    } else {
        found.how
    };
    if is_own(ctx) {
        count(Counter::SkipOwn);
        return Redirect::Pass;
    }
    // Another network namespace (a container) reaches the agent only where it listens.
    // SAFETY: the helper takes the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns != cfg.host_netns {
        // SAFETY: the map value is plain data.
        if unsafe { NETNS.get(&netns) }.is_none() {
            count(Counter::RefusedNetnsNotEnrolled);
            guard::report_caller_in(
                airlock_common::report::NETNS_NOT_ENROLLED,
                u32::from(fam),
                0,
                u32::from(key.port),
                netns,
            );
            return Redirect::Refuse;
        }
        count(Counter::RedirectOtherNetns);
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    // SAFETY: helpers allowed in cgroup sock_addr programs; the context pointer is valid.
    let (cgroup_id, cookie, connect_ns) = unsafe {
        (
            bpf_get_current_cgroup_id(),
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_ktime_get_boot_ns(),
        )
    };
    // SAFETY: `sk` of a sock_addr context is never null; with the create flag the helper
    // returns the socket's (zeroed, new or reused) record or null when it cannot allocate.
    let p = unsafe { PENDING.get_or_insert_ptr_mut(ctx, None) };
    if p.is_null() {
        // Without a record the agent would reject the connection anyway; refuse it here,
        // loudly, rather than let it reach the backend unobserved.
        count(Counter::RefusedNoStorage);
        guard::report_caller(airlock_common::report::NO_STORAGE, 0, 0, 0);
        return Redirect::Refuse;
    }
    // SAFETY: `p` points to this socket's record (map memory the verifier knows the size of);
    // every field is written.
    unsafe {
        (*p).orig_addr = found.addr;
        (*p).orig_port = key.port;
        (*p).orig_family = fam;
        (*p).backend_id = backend_id;
        (*p).pid = pid_tgid as u32;
        (*p).tgid = (pid_tgid >> 32) as u32;
        (*p).uid = uid_gid as u32;
        (*p).gid = (uid_gid >> 32) as u32;
        // `comm` sits at offset 40 of an 8-aligned struct: two aligned u64 stores, volatile so
        // that LLVM does not merge them into a memset call.
        let comm = (&raw mut (*p).comm).cast::<u64>();
        if bpf_get_current_comm(comm.cast(), 16) != 0 {
            comm.write_volatile(0);
            comm.add(1).write_volatile(0);
        }
        (*p).cgroup_id = cgroup_id;
        (*p).cookie = cookie;
        (*p).connect_ns = connect_ns;
        (*p).dialed_addr = *dialed;
        (*p).matched = how;
        (*p)._pad = 0;
        (*p).netns = netns;
    }
    match how {
        matched::UNSPECIFIED => count(Counter::RedirectUnspecified),
        matched::LISTENER => count(Counter::RedirectListener),
        _ => {}
    }
    Redirect::Go
}

/// sock_ops at TCP_CONNECT_CB: move the pending record of a redirected socket into the flow
/// table under the 4-tuple the agent will see. pid/uid are not read here: later callbacks can
/// run in softirq context.
#[inline(never)]
fn record_flow(ctx: &SockOpsContext) {
    // Read once, plain load (see `flow_key` on the verifier and context pointers).
    // SAFETY: valid context pointer; `sk` may be null and is checked before use.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        count(Counter::FlowStoreFailed);
        return;
    }
    let map = core::ptr::from_ref(&PENDING).cast_mut().cast();
    // SAFETY: `sk` is a non-null socket pointer; a lookup without the create flag.
    let p =
        unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) }.cast::<ConnMeta>();
    if p.is_null() {
        count(Counter::FlowNotRedirected);
        forget_stale_flow(ctx);
        return;
    }
    // SAFETY: `p` is this socket's record; copied out before it is deleted.
    let meta = unsafe { *p };
    // SAFETY: as above; the record is consumed exactly once.
    unsafe { bpf_sk_storage_delete(map, sk.cast()) };
    let Some(key) = flow_key(ctx) else {
        count(Counter::FlowStoreFailed);
        return;
    };
    // A record left on a socket whose redirected connect() failed, now connecting elsewhere:
    // not ours to hand over.
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    if key.dst_port != cfg.agent_port {
        count(Counter::FlowNotRedirected);
        return;
    }
    if FLOWS.insert(&key, &meta, 0).is_err() {
        count(Counter::FlowStoreFailed);
        return;
    }
    count(Counter::FlowRecorded);
}

/// A connection that was not redirected but goes to the agent's port owns its 4-tuple now: a
/// flow record left under that 4-tuple (by a redirected connection that was refused while the
/// agent was down) must not be inherited by it, or it would be served under someone else's
/// identity.
#[inline(never)]
fn forget_stale_flow(ctx: &SockOpsContext) {
    let remote_port = u32::from_be(ctx.remote_port()) as u16;
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    if remote_port != cfg.agent_port {
        return;
    }
    if let Some(key) = flow_key(ctx)
        && FLOWS.remove(&key).is_ok()
    {
        count(Counter::FlowStaleRemoved);
    }
}

/// The connection's 4-tuple from a sock_ops context. Every context field is read once, up
/// front and unconditionally: loads placed in branches get their addresses hoisted by LLVM,
/// which the verifier rejects ("dereference of modified ctx ptr").
#[inline(never)]
fn flow_key(ctx: &SockOpsContext) -> Option<FlowKey> {
    let fam = ctx.family();
    let local4 = ctx.local_ip4();
    let remote4 = ctx.remote_ip4();
    let local6 = ctx.local_ip6();
    let remote6 = ctx.remote_ip6();
    let local_port = ctx.local_port();
    let remote_port = ctx.remote_port();

    let v4 =
        fam == AF_INET || (remote6[0] == 0 && remote6[1] == 0 && remote6[2] == 0xffff_u32.to_be());
    let (src_addr, dst_addr) = if v4 {
        // An IPv4-mapped connection on an AF_INET6 socket runs through tcp_v4_connect: its
        // IPv4 fields are set before this callback, its IPv6 source may not be yet.
        (mapped(local4), mapped(remote4))
    } else if fam == AF_INET6 {
        (local6, remote6)
    } else {
        return None;
    };
    // SAFETY: the helper takes the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    Some(FlowKey {
        src_addr,
        dst_addr,
        src_port: local_port as u16,
        // remote_port holds the network-order port in its upper half on little endian.
        dst_port: u32::from_be(remote_port) as u16,
        _pad: 0,
        netns,
    })
}

/// An IPv4 address as stored by the kernel (network order in a u32) to `::ffff:a.b.c.d`.
#[inline(always)]
pub(crate) fn mapped(ip4: u32) -> [u32; 4] {
    [0, 0, 0xffff_u32.to_be(), ip4]
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
