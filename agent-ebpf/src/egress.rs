//! TCP to a backend that never went through a judged `connect()`, stopped on its way out.
//!
//! - `airlock_egress` (cgroup `skb` egress, the attached cgroup's sockets): every IPv4/IPv6
//!   TCP segment to a backend (`dest::judge` on the packet's own, post-NAT destination) must
//!   come from one of the agent's own sockets; from any other socket it was never redirected —
//!   a connection opened before the programs were attached, a raw socket opened before them,
//!   a destination a NAT rule rewrote after the connect hook — and is dropped. The first drop
//!   of each socket is reported, so the agent records it and ends the connection. RST segments
//!   pass: they end a connection, they carry nothing to a server.
//! - `airlock_pkt_out` (tcx egress on every interface): a frame a packet socket of the
//!   attached cgroup sends (`AF_PACKET` has no cgroup hook of its own) that holds TCP to a
//!   backend is dropped. Packet sockets stay usable for everything else (DHCP, LLDP, ARP).
//!
//! Both parse fail-closed: TCP the parser cannot read whole — a fragment, a chain of IPv6
//! extension headers or VLAN tags past its bound, a truncated header — is dropped, since no
//! kernel TCP socket sends such a thing and a receiver may still reassemble or strip it.

use core::ffi::c_void;

use airlock_common::{Counter, Report, TargetKey, report};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, bpf_sock},
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_socket_cookie, bpf_get_socket_uid, bpf_ktime_get_boot_ns, bpf_sk_fullsock,
        bpf_sk_storage_get, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id, bpf_skb_under_cgroup,
    },
    macros::{btf_map, cgroup_skb, classifier, map},
    maps::{CgroupArray, HashMap, RingBuf},
    programs::{SkBuffContext, TcContext, sk_buff::SkBuff},
};

use crate::{
    OWN, PORTS, count,
    dest::{self, Judged},
    mapped,
};

/// Drops of traffic, on a ring of their own (refused sockets cannot crowd them out).
#[map(name = "AIRLOCK_DROPS")]
static DROPS: RingBuf = RingBuf::with_byte_size(airlock_common::capacity::DROPS_BYTES, 0);

/// Sockets whose egress drop was already reported (one report a socket, however many
/// retransmissions).
#[btf_map(name = "AIRLOCK_DROPREP")]
static REPORTED: SkStorage<u32> = SkStorage::new();

/// Index 0: the attached cgroup (the tcx guard runs for every socket of the host).
#[map(name = "AIRLOCK_CGROUP")]
static CGROUP: CgroupArray = CgroupArray::with_max_entries(1, 0);

/// Interface index → the length of its link-layer header, for devices without the Ethernet
/// one (0 for tun, IP tunnels); a missing entry means Ethernet (14).
#[map(name = "AIRLOCK_IFACES")]
static IFACES: HashMap<u32, u32> = HashMap::with_max_entries(airlock_common::capacity::IFACES, 0);

const ALLOW: i32 = 1;
const DENY: i32 = 0;
/// tcx verdicts: let the next program (or the stack) decide, or drop.
const TCX_NEXT: i32 = -1;
const TCX_DROP: i32 = 2;

const AF_PACKET: u32 = 17;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const PROTO_TCP: u8 = 6;
const TCP_FLAG_RST: u8 = 0x04;
/// VLAN tags and IPv6 extension headers read before giving up (and dropping, for TCP).
const MAX_TAGS: usize = 8;
const MAX_EXT: usize = 8;

#[cgroup_skb(egress)]
pub fn airlock_egress(ctx: SkBuffContext) -> i32 {
    try_egress(&ctx)
}

#[classifier]
pub fn airlock_pkt_out(ctx: TcContext) -> i32 {
    try_packet_out(&ctx)
}

/// What an IP packet holds, for the guards.
enum Parsed {
    /// Not TCP.
    Other,
    Tcp(Segment),
    /// TCP the parser cannot read whole (fragmented, truncated, too deep): dropped.
    Unreadable,
}

/// The part of a TCP segment the guards read.
struct Segment {
    src: [u32; 4],
    dst: [u32; 4],
    src_port: u16,
    dst_port: u16,
    flags: u8,
    family: u32,
}

#[inline(never)]
fn try_egress(ctx: &SkBuffContext) -> i32 {
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    let seg = match ip_tcp(&ctx.skb, 0, proto) {
        Parsed::Other => return ALLOW,
        Parsed::Tcp(seg) => Some(seg),
        Parsed::Unreadable => None,
    };
    if let Some(seg) = &seg {
        let (word, bit) = airlock_common::port_bit(seg.dst_port);
        if !PORTS.get(word).is_some_and(|w| w & bit != 0) || seg.flags & TCP_FLAG_RST != 0 {
            return ALLOW;
        }
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
    let backend_id = match &seg {
        Some(seg) => {
            let key = TargetKey {
                addr: seg.dst,
                port: seg.dst_port,
                _pad: 0,
            };
            match dest::judge(ctx.as_ptr(), &key) {
                Judged::Other => return ALLOW,
                // A scoped target (an egress proxy) of another cgroup is not governed here.
                // SAFETY: the program's context; any level is valid.
                Judged::Backend(m)
                    if !dest::in_scope(m.backend_id, |level| unsafe {
                        bpf_skb_ancestor_cgroup_id(skb, level as i32)
                    }) =>
                {
                    return ALLOW;
                }
                Judged::Backend(m) => m.backend_id,
                Judged::Ambiguous => u32::MAX,
            }
        }
        None => u32::MAX,
    };
    count(Counter::EgressDropped);
    report_drop(skb, full, seg.as_ref(), backend_id);
    DENY
}

/// A frame leaving an interface: dropped when a packet socket of the attached cgroup sends
/// TCP to a backend, or TCP it cannot read.
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
    let cgroup = core::ptr::from_ref(&CGROUP).cast_mut().cast::<c_void>();
    // SAFETY: a helper on the program's context and the cgroup array (index 0).
    if unsafe { bpf_skb_under_cgroup(skb, cgroup, 0) } != 1 {
        return TCX_NEXT;
    }
    // SAFETY: plain field read of the context.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: the map value is plain data.
    let l2 = unsafe { IFACES.get(&ifindex) }.copied().unwrap_or(14);
    // The frame's own bytes decide (a packet socket sets `skb->protocol` as it likes).
    let parsed = if l2 == 0 {
        let Ok(first) = ctx.load::<u8>(0) else {
            return TCX_NEXT;
        };
        match first >> 4 {
            4 => ip_tcp(ctx, 0, ETH_P_IP),
            6 => ip_tcp(ctx, 0, ETH_P_IPV6),
            _ => Parsed::Other,
        }
    } else {
        ethernet(ctx, l2 as usize)
    };
    let dst = match parsed {
        Parsed::Other => return TCX_NEXT,
        Parsed::Unreadable => None,
        Parsed::Tcp(seg) => {
            let (word, bit) = airlock_common::port_bit(seg.dst_port);
            if !PORTS.get(word).is_some_and(|w| w & bit != 0) {
                return TCX_NEXT;
            }
            let key = TargetKey {
                addr: seg.dst,
                port: seg.dst_port,
                _pad: 0,
            };
            if let Judged::Other = dest::judge(ctx.as_ptr(), &key) {
                return TCX_NEXT;
            }
            Some(seg)
        }
    };
    count(Counter::RefusedPacketSocket);
    report_packet(skb, dst.as_ref());
    TCX_DROP
}

/// An Ethernet frame (header `l2` bytes, the ethertype in its last two): its IP packet,
/// behind up to `MAX_TAGS` VLAN tags.
#[inline(never)]
fn ethernet(ctx: &TcContext, l2: usize) -> Parsed {
    let mut off = l2.saturating_sub(2);
    let Ok(mut ether) = ctx.load::<[u8; 2]>(off).map(u16::from_be_bytes) else {
        return Parsed::Other;
    };
    for _ in 0..MAX_TAGS {
        if ether != ETH_P_8021Q && ether != ETH_P_8021AD {
            break;
        }
        off += 4;
        ether = match ctx.load::<[u8; 2]>(off) {
            Ok(b) => u16::from_be_bytes(b),
            Err(_) => return Parsed::Unreadable,
        };
    }
    if ether == ETH_P_8021Q || ether == ETH_P_8021AD {
        return Parsed::Unreadable;
    }
    ip_tcp(ctx, off + 2, ether)
}

/// What loads bytes from a packet (a cgroup skb and a tc context alike).
trait Packet {
    fn load<T>(&self, offset: usize) -> Result<T, aya_ebpf::cty::c_long>;
}

impl Packet for SkBuff {
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, aya_ebpf::cty::c_long> {
        SkBuff::load(self, offset)
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, aya_ebpf::cty::c_long> {
        TcContext::load(self, offset)
    }
}

/// The IP packet at `off` (of ethertype `proto`).
#[inline(always)]
fn ip_tcp<P: Packet>(ctx: &P, off: usize, proto: u16) -> Parsed {
    if proto == ETH_P_IP {
        ipv4_tcp(ctx, off)
    } else if proto == ETH_P_IPV6 {
        ipv6_tcp(ctx, off)
    } else {
        Parsed::Other
    }
}

#[inline(always)]
fn ipv4_tcp<P: Packet>(ctx: &P, off: usize) -> Parsed {
    let Ok(hdr) = ctx.load::<[u8; 20]>(off) else {
        return Parsed::Other;
    };
    if hdr[0] >> 4 != 4 || hdr[9] != PROTO_TCP {
        return Parsed::Other;
    }
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    // More fragments, or a later fragment: TCP no socket of ours would send in pieces.
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    if ihl < 20 || frag & 0x3fff != 0 {
        return Parsed::Unreadable;
    }
    let s = u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
    let d = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
    tcp(ctx, off + ihl, mapped(s), mapped(d), 4)
}

#[inline(always)]
fn ipv6_tcp<P: Packet>(ctx: &P, off: usize) -> Parsed {
    let Ok(hdr) = ctx.load::<[u32; 10]>(off) else {
        return Parsed::Other;
    };
    if u32::from_be(hdr[0]) >> 28 != 6 {
        return Parsed::Other;
    }
    let mut next = (u32::from_be(hdr[1]) >> 8) as u8;
    let mut at = off + 40;
    for _ in 0..MAX_EXT {
        match next {
            PROTO_TCP => {
                return tcp(
                    ctx,
                    at,
                    [hdr[2], hdr[3], hdr[4], hdr[5]],
                    [hdr[6], hdr[7], hdr[8], hdr[9]],
                    6,
                );
            }
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6: skipped.
            0 | 43 | 60 | 135 | 139 | 140 => {
                let Ok(ext) = ctx.load::<[u8; 2]>(at) else {
                    return Parsed::Unreadable;
                };
                next = ext[0];
                at += (usize::from(ext[1]) + 1) * 8;
            }
            // Authentication header: its length is in 4-byte units.
            51 => {
                let Ok(ext) = ctx.load::<[u8; 2]>(at) else {
                    return Parsed::Unreadable;
                };
                next = ext[0];
                at += (usize::from(ext[1]) + 2) * 4;
            }
            // A fragment of TCP (or of anything that may hold it): unreadable as a whole.
            44 => {
                let Ok(ext) = ctx.load::<[u8; 1]>(at) else {
                    return Parsed::Unreadable;
                };
                return if matches!(ext[0], PROTO_TCP | 0 | 43 | 60 | 51 | 44 | 135 | 139 | 140) {
                    Parsed::Unreadable
                } else {
                    Parsed::Other
                };
            }
            _ => return Parsed::Other,
        }
    }
    // Deeper than any socket's own headers go.
    Parsed::Unreadable
}

#[inline(always)]
fn tcp<P: Packet>(ctx: &P, at: usize, src: [u32; 4], dst: [u32; 4], family: u32) -> Parsed {
    let Ok(t) = ctx.load::<[u8; 14]>(at) else {
        return Parsed::Unreadable;
    };
    Parsed::Tcp(Segment {
        src,
        dst,
        src_port: u16::from_be_bytes([t[0], t[1]]),
        dst_port: u16::from_be_bytes([t[2], t[3]]),
        flags: t[13],
        family,
    })
}

/// Report the first dropped segment of a socket (a later one is reported if this report found
/// no room).
#[inline(never)]
fn report_drop(skb: *mut __sk_buff, sk: *mut bpf_sock, seg: Option<&Segment>, backend_id: u32) {
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
    // SAFETY: `seen`, when not null, points to this socket's u32.
    if !seen.is_null() && unsafe { *seen } != 0 {
        return;
    }
    let Some(mut entry) = DROPS.reserve::<Report>(0) else {
        count(Counter::ReportLost);
        return;
    };
    let mut r = Report::zeroed();
    r.kind = report::EGRESS_DROP;
    fill_segment(&mut r, seg);
    r.backend_id = backend_id;
    fill_skb(&mut r, skb);
    entry.write(r);
    entry.submit(0);
    if !seen.is_null() {
        // SAFETY: as above.
        unsafe { *seen = 1 };
    }
}

/// Report a frame a packet socket sent.
#[inline(never)]
fn report_packet(skb: *mut __sk_buff, seg: Option<&Segment>) {
    let Some(mut entry) = DROPS.reserve::<Report>(0) else {
        count(Counter::ReportLost);
        return;
    };
    let mut r = Report::zeroed();
    r.kind = report::PACKET_SOCKET;
    fill_segment(&mut r, seg);
    r.sock_type = AF_PACKET;
    fill_skb(&mut r, skb);
    entry.write(r);
    entry.submit(0);
}

#[inline(always)]
fn fill_segment(r: &mut Report, seg: Option<&Segment>) {
    match seg {
        Some(seg) => {
            r.family = seg.family;
            r.protocol = 6;
            r.src_addr = seg.src;
            r.dst_addr = seg.dst;
            r.src_port = seg.src_port;
            r.dst_port = seg.dst_port;
        }
        // TCP that could not be read: no addresses.
        None => r.protocol = 6,
    }
}

#[inline(always)]
fn fill_skb(r: &mut Report, skb: *mut __sk_buff) {
    // SAFETY: helpers taking the program's context.
    unsafe {
        r.cookie = bpf_get_socket_cookie(skb.cast());
        r.cgroup_id = bpf_skb_cgroup_id(skb);
        r.uid = bpf_get_socket_uid(skb);
        r.ts_ns = bpf_ktime_get_boot_ns();
    }
}
