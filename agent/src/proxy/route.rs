//! What the ways of serving a connection (MCP interception, an egress proxy's requests, the
//! opaque relay) share: who the connection is, how its backend is reached, how it ended.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
};

use tokio::net::TcpStream;

use super::{
    http::{Dial, UpstreamTls},
    relay::{RelayEnd, RelayError},
};
use crate::{attribution::Attribution, policy::Subject};

/// Who a connection is, for its records and the message pipeline.
pub(crate) struct Identity {
    /// The registry's id (`airlock status`, `airlock sessions kill`).
    pub id: u64,
    /// The archive's session id of the connection (`PREFIX-ID`).
    pub session_id: String,
    pub attribution: Attribution,
    /// The policy subject (user, groups, exe, container).
    pub subject: Subject,
    /// The sequence of its records: 0 is `open`, messages take 1, 2, …, `close` the last.
    pub seq: Arc<AtomicU64>,
}

impl Identity {
    /// The next record's sequence number.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// How the backend of an intercepted connection is reached.
pub(crate) enum Route {
    /// At the original destination (the socket dialled during attribution, if any).
    Direct(Option<TcpStream>),
    /// Through an egress proxy's tunnel, opened by the agent for this client connection.
    Tunnel(Tunnel),
}

impl Route {
    /// The backend's address as the client named it: the original destination, or a tunnel
    /// target given as an address (`None`: by name only).
    pub fn address(&self, original: SocketAddr) -> Option<SocketAddr> {
        match self {
            Route::Direct(_) => Some(original),
            Route::Tunnel(t) => t.address,
        }
    }
}

/// An open tunnel to an MCP backend through an egress proxy.
pub(crate) struct Tunnel {
    pub stream: TcpStream,
    /// The target as the proxy was asked for it (`host:port`).
    pub authority: String,
    /// The target, when the client named it by address (the leaf for a client without SNI;
    /// the backends sharing that address).
    pub address: Option<SocketAddr>,
    /// Opens the next tunnel when the server closed this one.
    pub redial: Box<dyn Redial>,
}

/// How a tunnel is opened again, once the upstream TLS is known.
pub(crate) trait Redial: Send {
    fn with_tls(self: Box<Self>, tls: Option<UpstreamTls>) -> Box<dyn Dial>;
}

/// How a served connection ended.
pub enum End {
    /// Served until one side closed, or the client went away (how, when it did not close
    /// cleanly: a reset, a close mid-request, idle past the header timeout).
    Served(Option<String>),
    /// Bytes relayed until the end (an opaque backend, an unknown SNI spliced, an egress
    /// proxy's tunnel to another host).
    Relayed(Result<RelayEnd, RelayError>),
}
