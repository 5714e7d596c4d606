//! Address normalisation between Rust socket addresses and the kernel maps' keys.
//!
//! The maps store every address as 16 bytes with IPv4 as `::ffff:a.b.c.d`, so an IPv4
//! connection, an IPv6 one and an IPv4-mapped one on an `AF_INET6` socket all meet in one key
//! space. Ports are host order. See `airlock_common`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use airlock_common::{FlowKey, TargetKey};

/// `::ffff:a.b.c.d` becomes `a.b.c.d`; everything else is unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The map form of an address: four network-order words, IPv4 as IPv4-mapped.
pub fn ip_words(ip: IpAddr) -> [u32; 4] {
    let octets = match canonical_ip(ip) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let w = |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// The address of a map form, canonical (IPv4 for mapped).
pub fn ip_from_words(words: [u32; 4]) -> IpAddr {
    let mut octets = [0u8; 16];
    for (chunk, w) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    canonical_ip(IpAddr::V6(Ipv6Addr::from(octets)))
}

pub fn target_key(addr: SocketAddr) -> TargetKey {
    TargetKey {
        addr: ip_words(addr.ip()),
        port: addr.port(),
        _pad: 0,
    }
}

/// The key under which sock_ops recorded an accepted connection: `peer` is the client's socket
/// as `accept()` reports it, `local` the agent's listening address it arrived on, `netns` the
/// cookie of the namespace the listener is in.
pub fn flow_key(peer: SocketAddr, local: SocketAddr, netns: u64) -> FlowKey {
    FlowKey {
        src_addr: ip_words(peer.ip()),
        dst_addr: ip_words(local.ip()),
        src_port: peer.port(),
        dst_port: local.port(),
        _pad: 0,
        netns,
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14): the cookie of the network namespace a socket lives in,
/// the value `bpf_get_netns_cookie` gives the programs.
pub fn netns_cookie(socket: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: an 8-byte buffer for the kernel to fill; the fd is borrowed for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The agent's listen addresses in the form `Config` stores them (network-order words).
pub fn kernel_ip4(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn kernel_ip6(ip: Ipv6Addr) -> [u32; 4] {
    ip_words(IpAddr::V6(ip))
}

/// A NUL-padded kernel `comm` as text.
pub fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_is_stored_mapped() {
        let w = ip_words("127.0.0.2".parse().unwrap());
        let bytes: Vec<u8> = w.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 2]
        );
    }

    #[test]
    fn mapped_and_plain_ipv4_share_a_key() {
        assert_eq!(
            target_key(sa("127.0.0.2:8443")),
            target_key(sa("[::ffff:127.0.0.2]:8443"))
        );
        assert_eq!(
            flow_key(
                sa("[::ffff:127.0.0.1]:40000"),
                sa("[::ffff:127.0.0.1]:1010"),
                7
            ),
            flow_key(sa("127.0.0.1:40000"), sa("127.0.0.1:1010"), 7)
        );
    }

    #[test]
    fn ipv6_is_kept_as_is() {
        let key = target_key(sa("[2001:db8::7]:443"));
        assert_eq!(
            ip_from_words(key.addr),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(key.addr[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(key.port, 443);
        assert_ne!(target_key(sa("[::1]:443")), target_key(sa("127.0.0.1:443")));
    }

    #[test]
    fn ports_are_host_order_and_direction_matters() {
        let key = flow_key(sa("127.0.0.1:40000"), sa("127.0.0.1:1010"), 7);
        assert_eq!(key.src_port, 40000);
        assert_eq!(key.dst_port, 1010);
        assert_ne!(
            key,
            flow_key(sa("127.0.0.1:1010"), sa("127.0.0.1:40000"), 7)
        );
        // The same 4-tuple in another namespace is another connection.
        assert_ne!(
            key,
            flow_key(sa("127.0.0.1:40000"), sa("127.0.0.1:1010"), 8)
        );
    }

    #[test]
    fn round_trip_is_canonical() {
        for s in ["10.0.0.1", "::1", "::ffff:10.0.0.1", "fe80::1"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(ip_from_words(ip_words(ip)), canonical_ip(ip));
        }
        assert_eq!(
            canonical_ip("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn kernel_words_match_memory_order() {
        // The kernel stores 127.0.0.1 as the bytes 7f 00 00 01.
        assert_eq!(
            kernel_ip4(Ipv4Addr::LOCALHOST).to_ne_bytes(),
            [127, 0, 0, 1]
        );
        let w = kernel_ip6(Ipv6Addr::LOCALHOST);
        assert_eq!(w[..3], [0, 0, 0]);
        assert_eq!(w[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    #[test]
    fn comm_stops_at_nul() {
        let mut c = [0u8; 16];
        c[..7].copy_from_slice(b"python3");
        assert_eq!(comm_str(&c), "python3");
        assert_eq!(comm_str(&[b'x'; 16]), "x".repeat(16));
    }
}
