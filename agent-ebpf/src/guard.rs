//! Sockets that could reach a backend without `connect()`, refused for processes in the
//! attached cgroup (what they might still send is `egress.rs`'s), and the reports of every
//! refusal.
//!
//! - `airlock_socknew` (cgroup `sock_create`): refuses raw `AF_INET`/`AF_INET6` sockets of
//!   any protocol but ICMP/ICMPv6 (`ping` keeps working; ICMP datagram sockets are not raw).
//! - `airlock_sockopt` (cgroup `setsockopt`): refuses `IP_HDRINCL`/`IPV6_HDRINCL` (a raw ICMP
//!   socket writing its own IP header could write a TCP one), `PACKET_QDISC_BYPASS` (a packet
//!   socket sending past the traffic-control layer) and every `SOL_XDP` option (an `AF_XDP`
//!   socket cannot send without registering its memory).
//!
//! Reports go to `AIRLOCK_REPORTS` (refusals in the caller's context); drops of traffic to
//! `AIRLOCK_DROPS`, so a flood of refused sockets cannot crowd them out.

use airlock_common::{Counter, Report, report};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_ktime_get_boot_ns},
    },
    macros::{cgroup_sock, cgroup_sockopt, map},
    maps::RingBuf,
    programs::{SockContext, SockoptContext},
};

use crate::count;

/// Refusals for the agent to record (pid, uid, what was refused).
#[map(name = "AIRLOCK_REPORTS")]
pub(crate) static REPORTS: RingBuf =
    RingBuf::with_byte_size(airlock_common::capacity::REPORTS_BYTES, 0);

const ALLOW: i32 = 1;
const DENY: i32 = 0;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_RAW: u32 = 3;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_ICMPV6: u32 = 58;
const SOL_IP: i32 = 0;
const IP_HDRINCL: i32 = 3;
const SOL_IPV6: i32 = 41;
const IPV6_HDRINCL: i32 = 36;
const SOL_PACKET: i32 = 263;
const PACKET_QDISC_BYPASS: i32 = 20;
const SOL_XDP: i32 = 283;

#[cgroup_sock(sock_create)]
pub fn airlock_socknew(ctx: SockContext) -> i32 {
    try_socket_create(&ctx)
}

#[cgroup_sockopt(setsockopt)]
pub fn airlock_sockopt(ctx: SockoptContext) -> i32 {
    try_setsockopt(&ctx)
}

/// A new `AF_INET`/`AF_INET6` socket of a process in the cgroup (the kernel's own sockets do
/// not come here).
#[inline(never)]
fn try_socket_create(ctx: &SockContext) -> i32 {
    // SAFETY: the context socket is valid for the program's run; plain field reads.
    let (family, sock_type, protocol) = unsafe {
        let sk = ctx.sock;
        ((*sk).family, (*sk).type_, (*sk).protocol)
    };
    if sock_type != SOCK_RAW
        || (family == AF_INET && protocol == IPPROTO_ICMP)
        || (family == AF_INET6 && protocol == IPPROTO_ICMPV6)
    {
        return ALLOW;
    }
    count(Counter::RefusedRawSocket);
    report_caller(report::RAW_SOCKET, family, sock_type, protocol);
    DENY
}

#[inline(never)]
fn try_setsockopt(ctx: &SockoptContext) -> i32 {
    // SAFETY: the context is valid for the program's run; plain field reads.
    let (level, optname) = unsafe { ((*ctx.sockopt).level, (*ctx.sockopt).optname) };
    let kind = if (level == SOL_IP && optname == IP_HDRINCL)
        || (level == SOL_IPV6 && optname == IPV6_HDRINCL)
    {
        report::HDRINCL
    } else if (level == SOL_PACKET && optname == PACKET_QDISC_BYPASS) || level == SOL_XDP {
        report::PACKET_SOCKET
    } else {
        return ALLOW;
    };
    count(if kind == report::HDRINCL {
        Counter::RefusedHdrincl
    } else {
        Counter::RefusedPacketSocket
    });
    report_caller(kind, level as u32, 0, optname as u32);
    DENY
}

/// Report a refusal made in the caller's context (pid, uid, comm, cgroup are its own).
#[inline(never)]
pub(crate) fn report_caller(kind: u32, family: u32, sock_type: u32, protocol: u32) {
    report_caller_in(kind, family, sock_type, protocol, 0);
}

/// [`report_caller`] naming the network namespace it happened in.
#[inline(never)]
pub(crate) fn report_caller_in(kind: u32, family: u32, sock_type: u32, protocol: u32, netns: u64) {
    let Some(mut entry) = REPORTS.reserve::<Report>(0) else {
        count(Counter::ReportLost);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let mut r = Report::zeroed();
    r.kind = kind;
    r.family = family;
    r.sock_type = sock_type;
    r.protocol = protocol;
    r.netns = netns;
    r.pid = pid_tgid as u32;
    r.tgid = (pid_tgid >> 32) as u32;
    r.uid = uid_gid as u32;
    r.gid = (uid_gid >> 32) as u32;
    // SAFETY: helpers with no memory preconditions beyond the 16-byte buffer.
    unsafe {
        if bpf_get_current_comm((&raw mut r.comm).cast(), 16) != 0 {
            r.comm = [0; 16];
        }
        r.cgroup_id = bpf_get_current_cgroup_id();
        r.ts_ns = bpf_ktime_get_boot_ns();
    }
    entry.write(r);
    entry.submit(0);
}
