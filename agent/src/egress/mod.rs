//! Every connection the agent makes itself: to a backend (the upstream of an intercepted
//! connection), to the approval and events webhooks, and to the archive's bucket. Each one
//! leaves from a socket tagged as the agent's own in `AIRLOCK_OWN` before it connects, so the
//! connect programs let it through instead of redirecting it into the agent — were a webhook
//! or the bucket at a backend's address, it would otherwise loop.
//!
//! - this file: the tagged socket, name resolution and the dial, under a deadline;
//! - [`tls`]: the TLS client configuration (the system's roots plus extra ones);
//! - [`post`]: one JSON POST over HTTP/1.1 (the webhooks), bounded in time and answer size.

pub mod post;
pub mod tls;

use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd},
    time::Duration,
};

use tokio::net::{TcpSocket, TcpStream};

use crate::kernel::OwnSockets;

pub use post::{PostError, post_json};

/// What went wrong on the way out. Messages name the peer and what to check.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host} has no address")]
    NoAddress { host: String },
    #[error("cannot create a socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("cannot tag the agent's socket (AIRLOCK_OWN): {0}")]
    Tag(#[source] std::io::Error),
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {addr}: no answer in {} s ({what})", .timeout.as_secs())]
    ConnectTimeout {
        addr: SocketAddr,
        timeout: Duration,
        what: &'static str,
    },
}

/// A TCP socket for `addr`'s family, tagged as the agent's own before it connects.
pub fn own_socket(own: &OwnSockets, addr: SocketAddr) -> Result<TcpSocket, EgressError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(EgressError::Socket)?;
    tag(own, socket.as_fd())?;
    Ok(socket)
}

/// Tag a socket made elsewhere (another network namespace's) as the agent's own.
pub fn tag(own: &OwnSockets, socket: BorrowedFd<'_>) -> Result<(), EgressError> {
    own.tag(socket).map_err(EgressError::Tag)
}

/// Connect `socket` to `addr` within `timeout` (`what` names the setting in the error).
pub async fn connect(
    socket: TcpSocket,
    addr: SocketAddr,
    timeout: Duration,
    what: &'static str,
) -> Result<TcpStream, EgressError> {
    let _ = socket.set_nodelay(true);
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(EgressError::Connect { addr, source }),
        Err(_) => Err(EgressError::ConnectTimeout {
            addr,
            timeout,
            what,
        }),
    }
}

/// Resolve `host` and connect to its addresses in turn (the first that answers), each from a
/// socket tagged with `own` (a plain socket when there is none: the command line, tests
/// without the kernel programs). The error is the last address's.
pub async fn dial(
    own: Option<&OwnSockets>,
    host: &str,
    port: u16,
    timeout: Duration,
    what: &'static str,
) -> Result<TcpStream, EgressError> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| EgressError::Resolve {
            host: host.to_owned(),
            source,
        })?;
    let mut last = EgressError::NoAddress {
        host: host.to_owned(),
    };
    for addr in addrs {
        let socket = match own {
            Some(own) => own_socket(own, addr)?,
            None => match addr {
                SocketAddr::V4(_) => TcpSocket::new_v4(),
                SocketAddr::V6(_) => TcpSocket::new_v6(),
            }
            .map_err(EgressError::Socket)?,
        };
        match connect(socket, addr, timeout, what).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}
