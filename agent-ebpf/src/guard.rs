//! What does not go through `connect()`, for processes in the attached cgroup.
//!
//! - `airlock_egress` (cgroup `skb` egress): every IPv4/IPv6 TCP segment to a backend (judged
//!   by `dest::backend_of` on the packet's own, post-NAT destination) must come from one of
//!   the agent's own sockets; from any other socket it was never redirected — a connection
//!   opened before the programs were attached, a raw socket, a destination a NAT rule
//!   rewrote after the connect hook — and is dropped. The first drop of each socket is
//!   reported, so the agent records it and ends the connection. RST segments pass: they end
//!   a connection, they carry nothing to a server.
//! - `airlock_sock_new` (cgroup `sock_create`): refuses raw `AF_INET`/`AF_INET6` sockets of
//!   any protocol but ICMP/ICMPv6 (`ping` keeps working; ICMP datagram sockets are not raw).
//! - `airlock_sockopt` (cgroup `setsockopt`): refuses `IP_HDRINCL`/`IPV6_HDRINCL` (a raw ICMP
//!   socket writing its own IP header could write a TCP one), `PACKET_QDISC_BYPASS` (a packet
//!   socket sending past the traffic-control layer) and every `SOL_XDP` option (an `AF_XDP`
//!   socket cannot send without registering its memory).
//! - `airlock_pkt_out` (tcx egress on every interface): a frame a packet socket of the
//!   attached cgroup sends (`AF_PACKET` has no cgroup hook of its own) that holds TCP to a
//!   backend is dropped. Packet sockets stay usable for everything else (DHCP, LLDP, ARP).

use core::ffi::c_void;

use airlock_common::{Counter, Report, TargetKey, report};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, bpf_sock},
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_socket_cookie,
            bpf_ktime_get_boot_ns, bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_ancestor_cgroup_id,
            bpf_skb_cgroup_id,
        },
    },
    macros::{btf_map, cgroup_skb, cgroup_sock, cgroup_sockopt, classifier, map},
    maps::RingBuf,
    programs::{SkBuffContext, SockContext, SockoptContext, TcContext},
};

use crate::{CONFIG, OWN, PORTS, count, dest, mapped};

/// Refusals for the agent to record (pid, uid, what was refused).
#[map(name = "AIRLOCK_REPORTS")]
static REPORTS: RingBuf = RingBuf::with_byte_size(airlock_common::capacity::REPORTS_BYTES, 0);

/// Sockets whose egress drop was already reported (one report a socket, however many
/// retransmissions).
#[btf_map(name = "AIRLOCK_REPORTED")]
static REPORTED: SkStorage<u32> = SkStorage::new();

const ALLOW: i32 = 1;
const DENY: i32 = 0;

/// tcx verdicts: let the next program (or the stack) decide, or drop.
const TCX_NEXT: i32 = -1;
const TCX_DROP: i32 = 2;

const AF_PACKET: u32 = 17;
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

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const PROTO_TCP: u8 = 6;
const TCP_FLAG_RST: u8 = 0x04;

#[cgroup_sock(sock_create)]
pub fn airlock_sock_new(ctx: SockContext) -> i32 {
    try_socket_create(&ctx)
}

#[cgroup_sockopt(setsockopt)]
pub fn airlock_sockopt(ctx: SockoptContext) -> i32 {
    try_setsockopt(&ctx)
}

#[cgroup_skb(egress)]
pub fn airlock_egress(ctx: SkBuffContext) -> i32 {
    try_egress(&ctx)
}

#[classifier]
pub fn airlock_pkt_out(ctx: TcContext) -> i32 {
    try_packet_out(&ctx)
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

#[inline(never)]
fn try_egress(ctx: &SkBuffContext) -> i32 {
    let Some(seg) = tcp_segment(ctx) else {
        return ALLOW;
    };
    let (word, bit) = airlock_common::port_bit(seg.dst_port);
    if !PORTS.get(word).is_some_and(|w| w & bit != 0) {
        return ALLOW;
    }
    if seg.flags & TCP_FLAG_RST != 0 {
        return ALLOW;
    }
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the program's context; `sk` may be null and is checked.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return ALLOW;
    }
    // SAFETY: a non-null context socket; the helper returns the full socket or null.
    let full: *mut bpf_sock = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        // A request or time-wait socket answers a segment; it never carries data of its own.
        return ALLOW;
    }
    let own = core::ptr::from_ref(&OWN).cast_mut().cast::<c_void>();
    // SAFETY: a full socket; a lookup without the create flag only reads.
    if !unsafe { bpf_sk_storage_get(own, full.cast(), core::ptr::null_mut(), 0) }.is_null() {
        return ALLOW;
    }
    let key = TargetKey {
        addr: seg.dst,
        port: seg.dst_port,
        _pad: 0,
    };
    let Some(found) = dest::backend_of(ctx.as_ptr(), &key) else {
        return ALLOW;
    };
    count(Counter::EgressDropped);
    report_drop(skb, full, &seg, found.backend_id);
    DENY
}

/// A frame leaving an interface: dropped when a packet socket of the attached cgroup sends
/// TCP to a backend.
#[inline(never)]
fn try_packet_out(ctx: &TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the program's context; `sk` may be null and is checked.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return TCX_NEXT;
    }
    // SAFETY: a non-null context socket; the helper returns the full socket or null.
    let full: *mut bpf_sock = unsafe { bpf_sk_fullsock(sk) };
    // SAFETY: plain field read of a full socket.
    if full.is_null() || unsafe { (*full).family } != AF_PACKET {
        return TCX_NEXT;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return TCX_NEXT;
    };
    // SAFETY: a helper on the program's context (the cgroup of the frame's socket).
    if cfg.cgroup_id == 0
        || unsafe { bpf_skb_ancestor_cgroup_id(skb, cfg.cgroup_level as i32) } != cfg.cgroup_id
    {
        return TCX_NEXT;
    }
    // The frame's own bytes decide (a packet socket sets `skb->protocol` as it likes): an
    // Ethernet header (up to two VLAN tags), or none (devices without a link-layer header).
    let mut off = 12usize;
    let mut ether: u16 = match ctx.load::<[u8; 2]>(off) {
        Ok(b) => u16::from_be_bytes(b),
        Err(_) => return TCX_NEXT,
    };
    for _ in 0..2 {
        if ether != ETH_P_8021Q && ether != ETH_P_8021AD {
            break;
        }
        off += 4;
        ether = match ctx.load::<[u8; 2]>(off) {
            Ok(b) => u16::from_be_bytes(b),
            Err(_) => return TCX_NEXT,
        };
    }
    let found = tcp_to_backend(ctx, off + 2, u32::from(ether)).or_else(|| tcp_to_backend_l3(ctx));
    if found.is_none() {
        return TCX_NEXT;
    }
    count(Counter::RefusedPacketSocket);
    report_caller_packet(skb);
    TCX_DROP
}

/// TCP to a backend at `off` (an IP header of `ether` type)?
#[inline(never)]
fn tcp_to_backend(ctx: &TcContext, off: usize, ether: u32) -> Option<u32> {
    let seg = ip_tcp(ctx, off, ether)?;
    backend_port(&seg)?;
    let key = TargetKey {
        addr: seg.dst,
        port: seg.dst_port,
        _pad: 0,
    };
    dest::backend_of(ctx.as_ptr(), &key).map(|m| m.backend_id)
}

/// A frame with no link-layer header: IP from its first byte.
#[inline(never)]
fn tcp_to_backend_l3(ctx: &TcContext) -> Option<u32> {
    let first: [u8; 1] = ctx.load(0).ok()?;
    let ether = match first[0] >> 4 {
        4 => ETH_P_IP,
        6 => ETH_P_IPV6,
        _ => return None,
    };
    tcp_to_backend(ctx, 0, ether)
}

#[inline(always)]
fn backend_port(seg: &Segment) -> Option<()> {
    let (word, bit) = airlock_common::port_bit(seg.dst_port);
    PORTS.get(word).is_some_and(|w| w & bit != 0).then_some(())
}

/// Report a frame a packet socket sent (in the sender's context: packet sockets transmit
/// from `sendmsg`).
#[inline(never)]
fn report_caller_packet(skb: *mut __sk_buff) {
    let Some(mut entry) = REPORTS.reserve::<Report>(0) else {
        count(Counter::ReportLost);
        return;
    };
    let mut r = Report::zeroed();
    r.kind = report::PACKET_SOCKET;
    r.family = AF_PACKET;
    // SAFETY: helpers taking the program's context.
    unsafe {
        r.cookie = bpf_get_socket_cookie(skb.cast());
        r.cgroup_id = bpf_skb_cgroup_id(skb);
        r.uid = aya_ebpf::helpers::generated::bpf_get_socket_uid(skb);
        r.ts_ns = bpf_ktime_get_boot_ns();
    }
    entry.write(r);
    entry.submit(0);
}

/// The part of a TCP segment the egress guard reads.
struct Segment {
    src: [u32; 4],
    dst: [u32; 4],
    src_port: u16,
    dst_port: u16,
    flags: u8,
    family: u32,
}

/// The TCP segment in an egress packet (network header first), or `None` for anything else.
#[inline(never)]
fn tcp_segment(ctx: &SkBuffContext) -> Option<Segment> {
    let proto = u32::from(u16::from_be(ctx.skb.protocol() as u16));
    ip_tcp(&ctx.skb, 0, proto)
}

/// What loads bytes from a packet (a cgroup skb and a tc context alike).
trait Packet {
    fn load<T>(&self, offset: usize) -> Result<T, aya_ebpf::cty::c_long>;
}

impl Packet for aya_ebpf::programs::sk_buff::SkBuff {
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, aya_ebpf::cty::c_long> {
        aya_ebpf::programs::sk_buff::SkBuff::load(self, offset)
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, aya_ebpf::cty::c_long> {
        TcContext::load(self, offset)
    }
}

/// The TCP segment of an IP packet starting at `off` (`proto`: its ethertype).
#[inline(always)]
fn ip_tcp<P: Packet>(ctx: &P, off: usize, proto: u32) -> Option<Segment> {
    let (src, dst, l4, family) = if proto == ETH_P_IP {
        let hdr: [u8; 20] = ctx.load(off).ok()?;
        if hdr[0] >> 4 != 4 || hdr[9] != PROTO_TCP {
            return None;
        }
        // A later fragment carries no TCP header (a governed socket cannot send one: raw
        // sockets are refused, TCP sets DF).
        if (u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff) != 0 {
            return None;
        }
        let s = u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
        let d = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
        (
            mapped(s),
            mapped(d),
            off + usize::from(hdr[0] & 0x0f) * 4,
            4,
        )
    } else if proto == ETH_P_IPV6 {
        let hdr: [u32; 10] = ctx.load(off).ok()?;
        let mut next = (u32::from_be(hdr[1]) >> 8) as u8;
        let mut off = off + 40;
        // Extension headers a TCP socket can add (hop-by-hop, routing, destination options).
        for _ in 0..4 {
            if next == PROTO_TCP {
                break;
            }
            if next != 0 && next != 43 && next != 60 {
                return None;
            }
            let ext: [u8; 2] = ctx.load(off).ok()?;
            next = ext[0];
            off += (usize::from(ext[1]) + 1) * 8;
        }
        if next != PROTO_TCP {
            return None;
        }
        (
            [hdr[2], hdr[3], hdr[4], hdr[5]],
            [hdr[6], hdr[7], hdr[8], hdr[9]],
            off,
            6,
        )
    } else {
        return None;
    };
    let tcp: [u8; 14] = ctx.load(l4).ok()?;
    Some(Segment {
        src,
        dst,
        src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        flags: tcp[13],
        family,
    })
}

/// Report the first dropped segment of a socket.
#[inline(never)]
fn report_drop(skb: *mut __sk_buff, sk: *mut bpf_sock, seg: &Segment, backend_id: u32) {
    let reported = core::ptr::from_ref(&REPORTED).cast_mut().cast::<c_void>();
    // SAFETY: a full socket; with the create flag the helper returns its (zeroed, new or
    // existing) value or null.
    let seen = unsafe {
        bpf_sk_storage_get(
            reported,
            sk.cast(),
            core::ptr::null_mut(),
            aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<u32>();
    if seen.is_null() {
        count(Counter::ReportLost);
        return;
    }
    // SAFETY: `seen` points to this socket's u32.
    unsafe {
        if *seen != 0 {
            return;
        }
        *seen = 1;
    }
    let Some(mut entry) = REPORTS.reserve::<Report>(0) else {
        count(Counter::ReportLost);
        return;
    };
    let mut r = Report::zeroed();
    r.kind = report::EGRESS_DROP;
    r.family = seg.family;
    r.protocol = 6;
    r.src_addr = seg.src;
    r.dst_addr = seg.dst;
    r.src_port = seg.src_port;
    r.dst_port = seg.dst_port;
    r.backend_id = backend_id;
    // SAFETY: helpers taking the program's context.
    unsafe {
        r.cookie = bpf_get_socket_cookie(skb.cast());
        r.cgroup_id = bpf_skb_cgroup_id(skb);
        r.uid = aya_ebpf::helpers::generated::bpf_get_socket_uid(skb);
        r.ts_ns = bpf_ktime_get_boot_ns();
    }
    entry.write(r);
    entry.submit(0);
}
