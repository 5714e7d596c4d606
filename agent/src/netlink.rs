//! A small netlink client: one request, its (multi-part) answer as messages with their
//! attributes. Used for the host's local addresses (`NETLINK_ROUTE`, the `local` table) and for
//! sockets (`NETLINK_SOCK_DIAG`: dump, `SOCK_DESTROY`).
//!
//! Hand-written on purpose: the netlink crates cover neither `SOCK_DESTROY` nor the
//! `INET_DIAG_CGROUP_ID` and socket-storage attributes the sweep needs, and the framing is
//! a page of code. Every read is bounded (buffer size, message count) and has a deadline.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

pub const NETLINK_ROUTE: i32 = 0;
pub const NETLINK_SOCK_DIAG: i32 = 4;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_ROOT: u16 = 0x100;
pub const NLM_F_MATCH: u16 = 0x200;
pub const NLM_F_DUMP: u16 = NLM_F_ROOT | NLM_F_MATCH;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const HDR: usize = 16;

/// A dump larger than this many messages is cut (and reported as an error).
const MAX_MESSAGES: usize = 1 << 20;

/// One answer message: its type and payload (after the netlink header).
pub struct Message {
    pub kind: u16,
    pub payload: Vec<u8>,
}

/// A netlink socket of one protocol, with a receive deadline.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open(protocol: i32, groups: u32) -> io::Result<Socket> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = groups;
        // SAFETY: a valid sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = Socket { fd, seq: 1 };
        socket.set_timeout(Duration::from_secs(5))?;
        Ok(socket)
    }

    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        socket2::SockRef::from(&self.fd).set_read_timeout(Some(timeout))
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Send one request (`payload` after the netlink header).
    pub fn send(&mut self, kind: u16, flags: u16, payload: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let len = HDR + payload.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        // SAFETY: sockaddr_nl is plain data; the kernel is port 0.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid buffers of the given sizes.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Read the answers to request `seq` until `NLMSG_DONE` (a dump) or an ack/error.
    pub fn collect(&self, seq: u32) -> io::Result<Vec<Message>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            let mut at = 0;
            while at + HDR <= n {
                let len =
                    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let mseq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap_or_default());
                if len < HDR || at + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "malformed netlink message",
                    ));
                }
                let payload = &buf[at + HDR..at + len];
                at += align4(len);
                if mseq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = payload
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(-libc::EIO);
                        if code == 0 {
                            return Ok(out);
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    _ => {
                        if out.len() >= MAX_MESSAGES {
                            return Err(io::Error::other("netlink dump too large"));
                        }
                        out.push(Message {
                            kind,
                            payload: payload.to_vec(),
                        });
                    }
                }
            }
        }
    }

    /// One datagram (blocking, within the socket's timeout).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes (`rtattr`/`nlattr`: u16 length, u16 type, value) in `data`.
pub fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            return None;
        }
        let value = &data[4..len];
        data = &data[align4(len).min(data.len())..];
        Some((kind, value))
    })
}

/// An attribute to append to a request.
pub fn push_attribute(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align4(buf.len()), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_and_stop_at_garbage() {
        let mut buf = Vec::new();
        push_attribute(&mut buf, 1, b"abc");
        push_attribute(&mut buf, 7, &42u32.to_ne_bytes());
        let got: Vec<(u16, Vec<u8>)> = attributes(&buf).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(
            got,
            vec![(1, b"abc".to_vec()), (7, 42u32.to_ne_bytes().to_vec())]
        );
        // A length past the end ends the walk instead of reading out of bounds.
        let bad = [200u8, 0, 1, 0, 9, 9];
        assert_eq!(attributes(&bad).count(), 0);
    }
}
