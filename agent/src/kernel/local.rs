//! The host's local addresses, as the kernel routes them: the `local` routing table (its
//! `local` routes: `127.0.0.0/8`, `::1`, every interface address, and any AnyIP prefix an
//! administrator added). A connection to one of them stays on the host, where the listening
//! socket it reaches decides which server it is (`agent-ebpf/src/dest.rs`).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::netlink;

const RTM_GETROUTE: u16 = 26;
const RTM_NEWROUTE: u16 = 24;
const RT_TABLE_LOCAL: u32 = 255;
const RTN_LOCAL: u8 = 2;
const RTA_DST: u16 = 1;
const RTA_TABLE: u16 = 15;

/// Multicast groups whose messages mean the local table may have changed.
pub const LOCAL_CHANGE_GROUPS: u32 = 0x10 /* IPV4_IFADDR */
    | 0x40 /* IPV4_ROUTE */
    | 0x100 /* IPV6_IFADDR */
    | 0x400 /* IPV6_ROUTE */;

/// Prefixes of local addresses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalAddrs {
    pub prefixes: Vec<(IpAddr, u8)>,
}

impl LocalAddrs {
    /// Read the `local` routing table of the agent's network namespace.
    pub fn read() -> io::Result<LocalAddrs> {
        let mut socket = netlink::Socket::open(netlink::NETLINK_ROUTE, 0)?;
        // struct rtmsg, AF_UNSPEC: both families.
        let rtmsg = [0u8; 12];
        let seq = socket.send(
            RTM_GETROUTE,
            netlink::NLM_F_REQUEST | netlink::NLM_F_DUMP,
            &rtmsg,
        )?;
        let mut prefixes = Vec::new();
        for msg in socket.collect(seq)? {
            if msg.kind != RTM_NEWROUTE || msg.payload.len() < 12 {
                continue;
            }
            let p = &msg.payload;
            let (family, dst_len, table, kind) = (p[0], p[1], u32::from(p[4]), p[7]);
            if kind != RTN_LOCAL {
                continue;
            }
            let mut table = table;
            let mut dst = None;
            for (attr, value) in netlink::attributes(&p[12..]) {
                match attr {
                    RTA_TABLE if value.len() == 4 => {
                        table = u32::from_ne_bytes([value[0], value[1], value[2], value[3]]);
                    }
                    RTA_DST => dst = ip_of(family, value),
                    _ => {}
                }
            }
            if table != RT_TABLE_LOCAL {
                continue;
            }
            if let Some(ip) = dst {
                prefixes.push((ip, dst_len));
            }
        }
        // Always local, whatever the table says (a host without `lo` up still keeps these).
        for fixed in [
            (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
            (IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
        ] {
            if !prefixes.contains(&fixed) {
                prefixes.push(fixed);
            }
        }
        prefixes.sort();
        prefixes.dedup();
        Ok(LocalAddrs { prefixes })
    }

    /// Whether `ip` (IPv4-mapped counts as IPv4) is local.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = crate::keys::canonical_ip(ip);
        self.prefixes
            .iter()
            .any(|(net, len)| in_prefix(ip, *net, *len))
    }

    /// The LPM-trie keys: (prefix length over the 128-bit mapped form, address words).
    pub fn trie_keys(&self) -> Vec<(u32, [u32; 4])> {
        self.prefixes
            .iter()
            .map(|(ip, len)| {
                let bits = match ip {
                    IpAddr::V4(_) => 96 + u32::from(*len),
                    IpAddr::V6(_) => u32::from(*len),
                };
                (bits.min(128), crate::keys::ip_words(*ip))
            })
            .collect()
    }
}

fn ip_of(family: u8, value: &[u8]) -> Option<IpAddr> {
    match (i32::from(family), value.len()) {
        (libc::AF_INET, 4) => Some(IpAddr::V4(Ipv4Addr::new(
            value[0], value[1], value[2], value[3],
        ))),
        (libc::AF_INET6, 16) => {
            let mut o = [0u8; 16];
            o.copy_from_slice(value);
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

fn in_prefix(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let len = u32::from(len.min(32));
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let len = u32::from(len.min(128));
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_table_holds_loopback_and_matches_prefixes() {
        let local = LocalAddrs::read().expect("read the local routing table");
        for ip in ["127.0.0.1", "127.5.6.7", "::1", "::ffff:127.0.0.9"] {
            assert!(local.contains(ip.parse().unwrap()), "{ip}: {local:?}");
        }
        for ip in ["198.18.200.1", "2001:db8::1", "::2"] {
            assert!(!local.contains(ip.parse().unwrap()), "{ip}: {local:?}");
        }
        let keys = local.trie_keys();
        assert!(
            keys.iter().any(|(len, _)| *len == 104),
            "127.0.0.0/8 is /104 mapped: {keys:?}"
        );
    }
}
