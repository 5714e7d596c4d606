//! Types shared by Airlock's kernel programs (`agent-ebpf`) and its agent.
//!
//! Every type here is `#[repr(C)]`, has explicit padding and a size pinned by a test, because
//! the kernel and userspace read the same bytes. Conventions:
//! - addresses are four 32-bit words holding the 16 address bytes in network order, exactly as
//!   the kernel stores `user_ip6` (IPv4 is written IPv4-mapped, `::ffff:a.b.c.d`). Words, not
//!   bytes: byte arrays make the BPF backend emit byte-at-a-time memset loops;
//! - ports are in host byte order.
//!
//! Bump [`ABI_VERSION`] whenever a layout or a map definition changes: the agent keeps pinned
//! maps in a directory named after it, so an upgraded agent never reuses maps of another shape.
#![no_std]

/// Version of the map layouts below; part of the bpffs pin path of the maps.
pub const ABI_VERSION: u32 = 4;

/// Names of the maps and programs in the eBPF object, shared so that neither side spells them.
/// Kernel object names hold 15 characters: these fit, so bpftool and bpf_stats show them whole.
pub mod names {
    pub const CONFIG: &str = "AIRLOCK_CONFIG";
    pub const TARGETS: &str = "AIRLOCK_TARGETS";
    pub const PENDING: &str = "AIRLOCK_PENDING";
    pub const OWN: &str = "AIRLOCK_OWN";
    pub const FLOWS: &str = "AIRLOCK_FLOWS";
    pub const COUNTERS: &str = "AIRLOCK_COUNTER";
    pub const PORTS: &str = "AIRLOCK_PORTS";
    pub const LOCAL: &str = "AIRLOCK_LOCAL";
    pub const LOCAL_TARGETS: &str = "AIRLOCK_LTARGET";
    pub const REPORTS: &str = "AIRLOCK_REPORTS";
    pub const DROPS: &str = "AIRLOCK_DROPS";
    pub const REPORTED: &str = "AIRLOCK_DROPREP";
    pub const CGROUP: &str = "AIRLOCK_CGROUP";
    pub const IFACES: &str = "AIRLOCK_IFACES";
    pub const NETNS: &str = "AIRLOCK_NETNS";
    pub const SCOPES: &str = "AIRLOCK_SCOPES";

    pub const PROG_CONNECT4: &str = "airlock_conn4";
    pub const PROG_CONNECT6: &str = "airlock_conn6";
    pub const PROG_SOCK_OPS: &str = "airlock_sockops";
    pub const PROG_EGRESS: &str = "airlock_egress";
    pub const PROG_SOCKET_CREATE: &str = "airlock_socknew";
    pub const PROG_SETSOCKOPT: &str = "airlock_sockopt";
    pub const PROG_PACKET_OUT: &str = "airlock_pkt_out";
    pub const PROG_BIND4: &str = "airlock_bind4";
    pub const PROG_BIND6: &str = "airlock_bind6";

    /// Every map, for pinning and for `airlock detach`.
    pub const MAPS: [&str; 16] = [
        CONFIG,
        TARGETS,
        PORTS,
        PENDING,
        OWN,
        FLOWS,
        COUNTERS,
        LOCAL,
        LOCAL_TARGETS,
        REPORTS,
        DROPS,
        REPORTED,
        CGROUP,
        IFACES,
        NETNS,
        SCOPES,
    ];
}

/// Capacity of the maps. LRU maps may evict before they are full, so they are sized well above
/// the expected number of in-flight connections.
pub mod capacity {
    pub const TARGETS: u32 = 4096;
    /// Connections between the SYN and the agent's `accept()`.
    pub const FLOWS: u32 = 64 * 1024;
    /// Prefixes of the host's local addresses (the `local` routing table).
    pub const LOCAL: u32 = 1024;
    /// Ports with a backend on a local address.
    pub const LOCAL_TARGETS: u32 = 1024;
    /// Bytes of the ring buffer carrying refusals to the agent (a power of two, page multiple).
    pub const REPORTS_BYTES: u32 = 256 * 1024;
    /// Bytes of the ring buffer carrying dropped traffic to the agent.
    pub const DROPS_BYTES: u32 = 128 * 1024;
    /// Interfaces without an Ethernet header the packet guard knows of.
    pub const IFACES: u32 = 4096;
    /// Network namespaces the agent listens in (containers).
    pub const NETNS: u32 = 16384;
    /// Targets (egress proxies) with a cgroup scope.
    pub const SCOPES: u32 = 64;
}

/// Backends on local addresses that share one port: at most this many per port.
pub const LOCAL_TARGETS_PER_PORT: usize = 4;

/// Words of the `AIRLOCK_PORTS` bitmap: one bit for each of the 65536 ports.
pub const PORT_WORDS: u32 = 65536 / 64;

/// The word index and bit mask of `port` in the `AIRLOCK_PORTS` bitmap.
#[inline(always)]
pub const fn port_bit(port: u16) -> (u32, u64) {
    ((port >> 6) as u32, 1u64 << (port & 63))
}

/// `Config::enabled` value meaning the agent has written the configuration.
pub const CONFIG_ENABLED: u32 = 1;

/// The one entry of the `AIRLOCK_CONFIG` array, written by the agent before it attaches.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Agent IPv4 listen address as stored in `bpf_sock_addr.user_ip4` (network order).
    pub agent_ip4: u32,
    /// Agent IPv6 listen address as stored in `bpf_sock_addr.user_ip6` (network order words).
    pub agent_ip6: [u32; 4],
    /// Agent listen port, host order.
    pub agent_port: u16,
    pub _pad: u16,
    /// [`CONFIG_ENABLED`] once written; until then the programs let everything through.
    pub enabled: u32,
    pub _pad2: u32,
    /// The agent's own network namespace (`SO_NETNS_COOKIE`): a connection from another one
    /// is redirected only when the agent listens there (`AIRLOCK_NETNS`).
    pub host_netns: u64,
}

/// Key of `AIRLOCK_TARGETS`: one backend address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TargetKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

/// Key of `AIRLOCK_FLOWS`: the redirected connection as the agent sees it from `accept()`,
/// `src` = the client's socket, `dst` = the agent's listening address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: u32,
    /// The network namespace of the connection (`bpf_get_netns_cookie`): loopback 4-tuples
    /// repeat across namespaces.
    pub netns: u64,
}

/// How the caller addressed the backend in `connect()`.
pub mod family {
    /// `AF_INET` socket.
    pub const IPV4: u16 = 4;
    /// `AF_INET6` socket, native IPv6 destination.
    pub const IPV6: u16 = 6;
    /// `AF_INET6` socket, IPv4-mapped destination (`::ffff:a.b.c.d`), taken through the IPv4 path.
    pub const IPV4_MAPPED: u16 = 46;
}

/// What the kernel knows about a redirected connection: its original destination and caller.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnMeta {
    /// Original destination address (IPv4-mapped for IPv4).
    pub orig_addr: [u32; 4],
    /// Original destination port, host order.
    pub orig_port: u16,
    /// One of [`family`].
    pub orig_family: u16,
    /// Value of the `AIRLOCK_TARGETS` entry that matched: the backend's index in the config.
    pub backend_id: u32,
    /// Thread id of the caller (kernel `pid`).
    pub pid: u32,
    /// Process id of the caller (kernel `tgid`).
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The calling thread's name, NUL-padded.
    pub comm: [u8; 16],
    /// Id of the caller's cgroup v2 (the inode of its directory).
    pub cgroup_id: u64,
    /// Socket cookie of the client socket.
    pub cookie: u64,
    /// `bpf_ktime_get_boot_ns()` at `connect()` (CLOCK_BOOTTIME, comparable with process start times).
    pub connect_ns: u64,
    /// The address exactly as the caller gave it to `connect()` (`orig_addr` is the backend
    /// address it was judged to reach).
    pub dialed_addr: [u32; 4],
    /// How the destination was matched: one of [`matched`].
    pub matched: u32,
    pub _pad: u32,
    /// The caller's network namespace (`bpf_get_netns_cookie`).
    pub netns: u64,
}

/// How a destination was found to be a backend.
pub mod matched {
    /// The address and port are a configured backend's.
    pub const EXACT: u32 = 0;
    /// An unspecified address (`0.0.0.0`, `::`, `::ffff:0.0.0.0`) that the kernel turns into a
    /// backend's address.
    pub const UNSPECIFIED: u32 = 1;
    /// Another local address whose listening socket is the one a local backend's address
    /// reaches (a server bound to the wildcard address).
    pub const LISTENER: u32 = 2;
}

/// Key of `AIRLOCK_LOCAL` (an LPM trie): a prefix of the host's local addresses, IPv4 as
/// IPv4-mapped (so `127.0.0.0/8` is `::ffff:127.0.0.0/104`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LocalKey {
    /// Prefix length in bits, 0..=128.
    pub prefix_len: u32,
    pub addr: [u32; 4],
}

/// Value of `AIRLOCK_LTARGET`, keyed by port (`u32`): the backends of that port whose
/// addresses are local to the host. A connection to another local address on the port is the
/// backend's when it reaches the same listening socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LocalTargets {
    pub addrs: [[u32; 4]; LOCAL_TARGETS_PER_PORT],
    pub backend_ids: [u32; LOCAL_TARGETS_PER_PORT],
    pub count: u32,
    pub _pad: u32,
}

/// Cgroups one scoped target (an egress proxy) is redirected for: at most this many.
pub const SCOPE_CGROUPS: usize = 8;

/// Value of `AIRLOCK_SCOPES`, keyed by target id (`u32`): a target in this map is redirected
/// (and guarded) only for sockets whose cgroup is one of `ids` or below it. `levels[i]` is the
/// depth of `ids[i]` in the cgroup v2 hierarchy (the root is 0), the argument of the ancestor
/// helpers. A target absent from the map is redirected for the whole attached cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Scope {
    pub ids: [u64; SCOPE_CGROUPS],
    pub levels: [u32; SCOPE_CGROUPS],
    pub count: u32,
    pub _pad: u32,
}

/// What the kernel refused or ended, reported to the agent through `AIRLOCK_REPORTS`.
pub mod report {
    /// A raw `AF_INET`/`AF_INET6` socket of a protocol other than ICMP/ICMPv6.
    pub const RAW_SOCKET: u32 = 1;
    /// A packet socket sending TCP to a backend, or asking to send past traffic control
    /// (`PACKET_QDISC_BYPASS`, `AF_XDP` options).
    pub const PACKET_SOCKET: u32 = 2;
    /// `IP_HDRINCL` / `IPV6_HDRINCL`: a raw socket writing its own IP headers.
    pub const HDRINCL: u32 = 3;
    /// TCP to a backend from a socket whose `connect()` was not redirected (opened before the
    /// programs were attached, a raw socket, a destination rewritten by NAT after the hook).
    pub const EGRESS_DROP: u32 = 4;
    /// No socket storage for the caller's record: `connect()` refused.
    pub const NO_STORAGE: u32 = 5;
    /// A local address on a backend port whose listener cannot be told from the backend's (a
    /// wildcard listener of the other family; `0.0.0.0` on a device-bound socket): `connect()`
    /// refused.
    pub const AMBIGUOUS: u32 = 6;
    /// A `connect()` to a backend from a network namespace the agent does not listen in (not
    /// enrolled yet): refused with `EPERM`, so the agent enrols it.
    pub const NETNS_NOT_ENROLLED: u32 = 7;
    /// A `bind()` to the agent's port by another socket (it would receive redirected
    /// connections while the agent is away): refused.
    pub const AGENT_PORT_BIND: u32 = 8;
}

/// One entry of the `AIRLOCK_REPORTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// One of [`report`].
    pub kind: u32,
    /// Socket family, type and protocol (socket refusals), or the IP version (egress).
    pub family: u32,
    pub sock_type: u32,
    pub protocol: u32,
    /// The caller (socket refusals, `connect()`); 0 for egress drops, which may run outside
    /// the process (a retransmission).
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: [u8; 16],
    pub cgroup_id: u64,
    pub cookie: u64,
    pub ts_ns: u64,
    /// Egress drops: source and destination as the packet carried them (after NAT).
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub backend_id: u32,
    /// The network namespace the refusal happened in (`bpf_get_netns_cookie`), when known.
    pub netns: u64,
}

impl Report {
    pub const fn zeroed() -> Self {
        Self {
            kind: 0,
            family: 0,
            sock_type: 0,
            protocol: 0,
            pid: 0,
            tgid: 0,
            uid: 0,
            gid: 0,
            comm: [0; 16],
            cgroup_id: 0,
            cookie: 0,
            ts_ns: 0,
            src_addr: [0; 4],
            dst_addr: [0; 4],
            src_port: 0,
            dst_port: 0,
            backend_id: 0,
            netns: 0,
        }
    }
}

impl ConnMeta {
    pub const fn zeroed() -> Self {
        Self {
            orig_addr: [0; 4],
            orig_port: 0,
            orig_family: 0,
            backend_id: 0,
            pid: 0,
            tgid: 0,
            uid: 0,
            gid: 0,
            comm: [0; 16],
            cgroup_id: 0,
            cookie: 0,
            connect_ns: 0,
            dialed_addr: [0; 4],
            matched: 0,
            _pad: 0,
            netns: 0,
        }
    }
}

/// Named counters of `AIRLOCK_COUNTER` (a per-CPU array indexed by this enum). Every skip,
/// redirect and miss path in the kernel programs bumps exactly one of them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect() on a socket that is not TCP (UDP, QUIC, raw...): not ours.
    SkipNotTcp = 0,
    /// The agent has not written its configuration yet.
    SkipUnconfigured,
    /// The destination is not a configured backend.
    MissNotBackend,
    /// A backend destination on a socket the agent tagged as its own upstream connection.
    SkipOwn,
    /// Redirected an `AF_INET` connect().
    RedirectIpv4,
    /// Redirected an `AF_INET6` connect() to a native IPv6 backend address.
    RedirectIpv6,
    /// Redirected an `AF_INET6` connect() to an IPv4-mapped backend address.
    RedirectIpv4Mapped,
    /// Could not allocate the caller's record: connect() refused with EPERM (fail closed).
    RefusedNoStorage,
    /// sock_ops moved a pending connection into the flow table.
    FlowRecorded,
    /// sock_ops saw a connection that was not redirected (the common case).
    FlowNotRedirected,
    /// sock_ops could not insert into the flow table: the agent will reject the connection.
    FlowStoreFailed,
    /// A connection to the agent's port that was not redirected removed a stale flow record
    /// left under its 4-tuple.
    FlowStaleRemoved,
    /// Redirected a connect() to an unspecified address (`0.0.0.0`, `::`) that the kernel
    /// would have turned into a backend's address.
    RedirectUnspecified,
    /// Redirected a connect() to another local address that reaches a local backend's
    /// listening socket.
    RedirectListener,
    /// A local address on a backend port that reaches another listening socket (or none).
    MissOtherListener,
    /// Refused a raw IP socket of a protocol other than ICMP/ICMPv6.
    RefusedRawSocket,
    /// Refused what a packet socket tried: TCP to a backend, `PACKET_QDISC_BYPASS`, `AF_XDP`.
    RefusedPacketSocket,
    /// Refused `IP_HDRINCL`/`IPV6_HDRINCL`.
    RefusedHdrincl,
    /// Dropped TCP to a backend from a socket whose `connect()` was never redirected.
    EgressDropped,
    /// A refusal the ring buffer had no room for (the counter still counts it).
    ReportLost,
    /// A destination that may or may not be a backend's, refused (see `report::AMBIGUOUS`).
    RefusedAmbiguous,
    /// Redirected a connect() from another network namespace to the agent's listener there.
    RedirectOtherNetns,
    /// Refused a connect() to a backend from a namespace the agent does not listen in.
    RefusedNetnsNotEnrolled,
    /// Refused a bind() to the agent's port.
    RefusedAgentPortBind,
    /// A connect() to a scoped target (an egress proxy) from outside its cgroups: passed on.
    MissOutOfScope,
}

impl Counter {
    pub const COUNT: u32 = 25;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::SkipNotTcp,
        Counter::SkipUnconfigured,
        Counter::MissNotBackend,
        Counter::SkipOwn,
        Counter::RedirectIpv4,
        Counter::RedirectIpv6,
        Counter::RedirectIpv4Mapped,
        Counter::RefusedNoStorage,
        Counter::FlowRecorded,
        Counter::FlowNotRedirected,
        Counter::FlowStoreFailed,
        Counter::FlowStaleRemoved,
        Counter::RedirectUnspecified,
        Counter::RedirectListener,
        Counter::MissOtherListener,
        Counter::RefusedRawSocket,
        Counter::RefusedPacketSocket,
        Counter::RefusedHdrincl,
        Counter::EgressDropped,
        Counter::ReportLost,
        Counter::RefusedAmbiguous,
        Counter::RedirectOtherNetns,
        Counter::RefusedNetnsNotEnrolled,
        Counter::RefusedAgentPortBind,
        Counter::MissOutOfScope,
    ];

    /// The name `airlock status` shows.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::SkipNotTcp => "skip_not_tcp",
            Counter::SkipUnconfigured => "skip_unconfigured",
            Counter::MissNotBackend => "miss_not_backend",
            Counter::SkipOwn => "skip_own",
            Counter::RedirectIpv4 => "redirect_ipv4",
            Counter::RedirectIpv6 => "redirect_ipv6",
            Counter::RedirectIpv4Mapped => "redirect_ipv4_mapped",
            Counter::RefusedNoStorage => "refused_no_storage",
            Counter::FlowRecorded => "flow_recorded",
            Counter::FlowNotRedirected => "flow_not_redirected",
            Counter::FlowStoreFailed => "flow_store_failed",
            Counter::FlowStaleRemoved => "flow_stale_removed",
            Counter::RedirectUnspecified => "redirect_unspecified",
            Counter::RedirectListener => "redirect_listener",
            Counter::MissOtherListener => "miss_other_listener",
            Counter::RefusedRawSocket => "refused_raw_socket",
            Counter::RefusedPacketSocket => "refused_packet_socket",
            Counter::RefusedHdrincl => "refused_hdrincl",
            Counter::EgressDropped => "egress_dropped",
            Counter::ReportLost => "report_lost",
            Counter::RefusedAmbiguous => "refused_ambiguous",
            Counter::RedirectOtherNetns => "redirect_other_netns",
            Counter::RefusedNetnsNotEnrolled => "refused_netns_not_enrolled",
            Counter::RefusedAgentPortBind => "refused_agent_port_bind",
            Counter::MissOutOfScope => "miss_out_of_scope",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` data with explicit padding fields and no pointers; every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::TargetKey {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::ConnMeta {}
    unsafe impl aya::Pod for super::LocalKey {}
    unsafe impl aya::Pod for super::LocalTargets {}
    unsafe impl aya::Pod for super::Report {}
    unsafe impl aya::Pod for super::Scope {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn config_layout() {
        assert_eq!(size_of::<Config>(), 40);
        assert_eq!(offset_of!(Config, agent_ip4), 0);
        assert_eq!(offset_of!(Config, agent_ip6), 4);
        assert_eq!(offset_of!(Config, agent_port), 20);
        assert_eq!(offset_of!(Config, enabled), 24);
        assert_eq!(offset_of!(Config, host_netns), 32);
    }

    #[test]
    fn target_key_layout() {
        assert_eq!(size_of::<TargetKey>(), 20);
        assert_eq!(offset_of!(TargetKey, port), 16);
        assert_eq!(align_of::<TargetKey>(), 4);
    }

    #[test]
    fn flow_key_layout() {
        assert_eq!(size_of::<FlowKey>(), 48);
        assert_eq!(offset_of!(FlowKey, dst_addr), 16);
        assert_eq!(offset_of!(FlowKey, src_port), 32);
        assert_eq!(offset_of!(FlowKey, dst_port), 34);
        assert_eq!(offset_of!(FlowKey, netns), 40);
    }

    #[test]
    fn conn_meta_layout() {
        assert_eq!(size_of::<ConnMeta>(), 112);
        assert_eq!(align_of::<ConnMeta>(), 8);
        assert_eq!(offset_of!(ConnMeta, orig_port), 16);
        assert_eq!(offset_of!(ConnMeta, orig_family), 18);
        assert_eq!(offset_of!(ConnMeta, backend_id), 20);
        assert_eq!(offset_of!(ConnMeta, pid), 24);
        assert_eq!(offset_of!(ConnMeta, tgid), 28);
        assert_eq!(offset_of!(ConnMeta, uid), 32);
        assert_eq!(offset_of!(ConnMeta, gid), 36);
        assert_eq!(offset_of!(ConnMeta, comm), 40);
        assert_eq!(offset_of!(ConnMeta, cgroup_id), 56);
        assert_eq!(offset_of!(ConnMeta, cookie), 64);
        assert_eq!(offset_of!(ConnMeta, connect_ns), 72);
        assert_eq!(offset_of!(ConnMeta, dialed_addr), 80);
        assert_eq!(offset_of!(ConnMeta, matched), 96);
        assert_eq!(offset_of!(ConnMeta, netns), 104);
    }

    #[test]
    fn local_map_layouts() {
        assert_eq!(size_of::<LocalKey>(), 20);
        assert_eq!(size_of::<LocalTargets>(), 88);
        assert_eq!(offset_of!(LocalTargets, backend_ids), 64);
        assert_eq!(offset_of!(LocalTargets, count), 80);
    }

    #[test]
    fn report_layout() {
        assert_eq!(size_of::<Report>(), 120);
        assert_eq!(offset_of!(Report, netns), 112);
        assert_eq!(align_of::<Report>(), 8);
        assert_eq!(offset_of!(Report, comm), 32);
        assert_eq!(offset_of!(Report, cgroup_id), 48);
        assert_eq!(offset_of!(Report, src_addr), 72);
        assert_eq!(offset_of!(Report, src_port), 104);
        assert_eq!(offset_of!(Report, backend_id), 108);
    }

    #[test]
    fn program_names_fit_the_kernel_name_field() {
        let progs = [
            names::PROG_CONNECT4,
            names::PROG_CONNECT6,
            names::PROG_SOCK_OPS,
            names::PROG_EGRESS,
            names::PROG_SOCKET_CREATE,
            names::PROG_SETSOCKOPT,
            names::PROG_PACKET_OUT,
            names::PROG_BIND4,
            names::PROG_BIND6,
        ];
        for n in progs.iter().chain(names::MAPS.iter()) {
            assert!(n.len() <= 15, "{n} would be truncated by BPF_OBJ_NAME_LEN");
        }
    }

    #[test]
    fn port_bitmap_covers_every_port_once() {
        let mut seen = [0u64; PORT_WORDS as usize];
        for port in 0..=u16::MAX {
            let (word, bit) = port_bit(port);
            assert!(word < PORT_WORDS);
            assert_eq!(seen[word as usize] & bit, 0, "port {port} shares a bit");
            seen[word as usize] |= bit;
        }
        assert!(seen.iter().all(|w| *w == u64::MAX));
    }

    #[test]
    fn counters_are_dense_and_named_uniquely() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32, "{} out of order", c.name());
            for other in &Counter::ALL[..i] {
                assert_ne!(c.name(), other.name());
            }
        }
    }
}
