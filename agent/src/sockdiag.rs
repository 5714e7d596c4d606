//! The host's TCP sockets through `NETLINK_SOCK_DIAG`: list them with their owner, inode and
//! cgroup (and whether the agent tagged them as its own, read from the `AIRLOCK_OWN` socket
//! storage), end one (`SOCK_DESTROY`: the kernel aborts it, its owner sees `ECONNABORTED`
//! and the peer a reset), and find who holds a socket (`/proc/*/fd`).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, BorrowedFd},
    path::Path,
};

use crate::netlink::{self, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const INET_DIAG_CGROUP_ID: u16 = 21;

/// TCP states (`include/net/tcp_states.h`).
pub mod state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const LISTEN: u8 = 10;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
}

/// One TCP socket as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    pub family: u8,
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub uid: u32,
    pub inode: u32,
    pub cookie: u64,
    /// cgroup v2 id of the socket (its creator's cgroup).
    pub cgroup_id: Option<u64>,
    /// Tagged in `AIRLOCK_OWN`: one of the agent's upstream sockets.
    pub own: bool,
    /// The raw `inet_diag_sockid`, to name the socket back to the kernel.
    id: [u8; 48],
}

impl TcpSocket {
    pub fn is_listener(&self) -> bool {
        self.state == state::LISTEN
    }
}

/// Every TCP socket (IPv4 and IPv6) in the agent's network namespace. `own_map`: the
/// `AIRLOCK_OWN` socket-storage map, to tell the agent's sockets apart.
pub fn tcp_sockets(own_map: Option<BorrowedFd<'_>>) -> io::Result<Vec<TcpSocket>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let mut socket = netlink::Socket::open(netlink::NETLINK_SOCK_DIAG, 0)?;
        let mut req = request(family, u32::MAX, &[0; 48]);
        if let Some(map) = own_map {
            let mut nested = Vec::new();
            netlink::push_attribute(
                &mut nested,
                SK_DIAG_BPF_STORAGE_REQ_MAP_FD,
                &(map.as_raw_fd() as u32).to_ne_bytes(),
            );
            netlink::push_attribute(&mut req, INET_DIAG_REQ_SK_BPF_STORAGES | 0x8000, &nested);
        }
        let seq = socket.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
        for msg in socket.collect(seq)? {
            if msg.kind != SOCK_DIAG_BY_FAMILY {
                continue;
            }
            if let Some(s) = parse(&msg.payload) {
                out.push(s);
            }
        }
    }
    Ok(out)
}

/// End `socket` (`SOCK_DESTROY`). Gone already is success: the goal is its absence.
pub fn destroy(socket: &TcpSocket) -> io::Result<()> {
    let mut nl = netlink::Socket::open(netlink::NETLINK_SOCK_DIAG, 0)?;
    let req = request(socket.family, u32::MAX, &socket.id);
    let seq = nl.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
    match nl.collect(seq) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `struct inet_diag_req_v2` for TCP.
fn request(family: u8, states: u32, id: &[u8; 48]) -> Vec<u8> {
    let mut req = Vec::with_capacity(56);
    req.push(family);
    req.push(libc::IPPROTO_TCP as u8);
    req.push(0); // idiag_ext
    req.push(0); // pad
    req.extend_from_slice(&states.to_ne_bytes());
    req.extend_from_slice(id);
    req
}

/// `struct inet_diag_msg` and its attributes.
fn parse(p: &[u8]) -> Option<TcpSocket> {
    if p.len() < 72 {
        return None;
    }
    let family = p[0];
    let state = p[1];
    let mut id = [0u8; 48];
    id.copy_from_slice(&p[4..52]);
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let addr = |bytes: &[u8]| -> Option<IpAddr> {
        match i32::from(family) {
            libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
                bytes[0], bytes[1], bytes[2], bytes[3],
            ))),
            libc::AF_INET6 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&bytes[..16]);
                Some(IpAddr::V6(Ipv6Addr::from(o)))
            }
            _ => None,
        }
    };
    let local = SocketAddr::new(addr(&id[4..20])?, sport);
    let remote = SocketAddr::new(addr(&id[20..36])?, dport);
    let cookie = u64::from(u32::from_ne_bytes(id[40..44].try_into().ok()?))
        | (u64::from(u32::from_ne_bytes(id[44..48].try_into().ok()?)) << 32);
    let uid = u32::from_ne_bytes(p[64..68].try_into().ok()?);
    let inode = u32::from_ne_bytes(p[68..72].try_into().ok()?);
    let mut cgroup_id = None;
    let mut own = false;
    for (kind, value) in netlink::attributes(&p[72..]) {
        match kind {
            INET_DIAG_CGROUP_ID if value.len() == 8 => {
                cgroup_id = Some(u64::from_ne_bytes(value.try_into().ok()?));
            }
            INET_DIAG_SK_BPF_STORAGES => own = true,
            _ => {}
        }
    }
    Some(TcpSocket {
        family,
        state,
        local,
        remote,
        uid,
        inode,
        cookie,
        cgroup_id,
        own,
        id,
    })
}

/// The processes (tgids) holding socket `inode` open, from `/proc/*/fd`. Bounded: stops
/// after `limit` processes were looked at.
pub fn holders(proc_root: &Path, inode: u32, limit: usize) -> Vec<u32> {
    let target = format!("socket:[{inode}]");
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return found;
    };
    for entry in entries.flatten().take(limit) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()))
        {
            found.push(pid);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn lists_a_connection_with_its_owner_and_ends_it() {
        if !root() {
            eprintln!("skipping: SOCK_DESTROY needs CAP_NET_ADMIN");
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let local = client.local_addr().unwrap();
        let all = tcp_sockets(None).unwrap();
        let mine = all
            .iter()
            .find(|s| s.local == local && s.remote == addr)
            .expect("the client socket is listed")
            .clone();
        assert_eq!(mine.state, state::ESTABLISHED);
        assert!(mine.cgroup_id.is_some_and(|c| c != 0), "{mine:?}");
        assert!(!mine.own);
        assert!(all.iter().any(|s| s.is_listener() && s.local == addr));
        assert_eq!(
            holders(Path::new("/proc"), mine.inode, 1 << 20),
            vec![std::process::id()]
        );
        destroy(&mine).unwrap();
        use std::io::Write as _;
        let err = client
            .write_all(b"x")
            .and_then(|()| client.write_all(b"y"))
            .expect_err("a destroyed socket cannot send");
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        // Ending it again is not an error.
        destroy(&mine).unwrap();
    }
}

/// A packet socket (`AF_PACKET`) as `packet_diag` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketSocket {
    pub inode: u32,
    pub cookie: u64,
    pub uid: Option<u32>,
}

/// Every packet socket of the agent's network namespace.
pub fn packet_sockets() -> io::Result<Vec<PacketSocket>> {
    const PACKET_SHOW_INFO: u32 = 0x1;
    const PACKET_DIAG_UID: u16 = 5;
    let mut socket = netlink::Socket::open(netlink::NETLINK_SOCK_DIAG, 0)?;
    // struct packet_diag_req: family, protocol, pad, ino, show, cookie[2].
    let mut req = Vec::with_capacity(20);
    req.push(libc::AF_PACKET as u8);
    req.push(0);
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&PACKET_SHOW_INFO.to_ne_bytes());
    req.extend_from_slice(&[0u8; 8]);
    let seq = socket.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
    let mut out = Vec::new();
    for msg in socket.collect(seq)? {
        let p = &msg.payload;
        // struct packet_diag_msg: family, type, num (u16), ino (u32), cookie[2].
        if msg.kind != SOCK_DIAG_BY_FAMILY || p.len() < 16 {
            continue;
        }
        let inode = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
        let cookie = u64::from(u32::from_ne_bytes([p[8], p[9], p[10], p[11]]))
            | (u64::from(u32::from_ne_bytes([p[12], p[13], p[14], p[15]])) << 32);
        let uid = netlink::attributes(&p[16..])
            .find(|(k, v)| *k == PACKET_DIAG_UID && v.len() == 4)
            .map(|(_, v)| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]));
        out.push(PacketSocket { inode, cookie, uid });
    }
    Ok(out)
}

#[cfg(test)]
mod packet_tests {
    use super::*;

    #[test]
    fn lists_a_packet_socket_with_its_inode_and_owner() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: packet sockets need CAP_NET_RAW");
            return;
        }
        // SAFETY: plain socket(2); the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        let inode = {
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
            let s = link.to_string_lossy().into_owned();
            s.trim_start_matches("socket:[")
                .trim_end_matches(']')
                .parse::<u32>()
                .unwrap()
        };
        let found = packet_sockets().unwrap();
        let mine = found.iter().find(|p| p.inode == inode).expect("listed");
        assert_eq!(mine.uid, Some(0));
        assert_ne!(mine.cookie, 0);
        // SAFETY: our own fd.
        unsafe { libc::close(fd) };
    }
}
