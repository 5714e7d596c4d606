//! Why a request's head is refused before its body is judged: an authority that does not
//! name the connection's backend, mirrored headers that do not say what the body says, a
//! legacy session named twice. The texts reach the client (and the record) as they are shown
//! here.

/// The request's authority (`Host`, or an absolute-form target) does not name the backend
/// its connection was judged for (answered 421).
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("the Host header is not visible ASCII")]
    HostNotAscii,
    #[error("more than one Host header")]
    ManyHosts,
    #[error("the request target names `{target}` and the Host header `{host}`")]
    Disagree { target: String, host: String },
    #[error("the request names no host (no Host header)")]
    NoHost,
    #[error("`{0}` is not a host and port")]
    NotHostAndPort(String),
    #[error(
        "this connection is for backend `{backend}` ({host}:{port}); the request names `{authority}`"
    )]
    OtherBackend {
        backend: String,
        host: String,
        port: u16,
        authority: String,
    },
}

/// The 2026-07-28 mirrored headers (`Mcp-Method`, `Mcp-Name`) do not say what the body says
/// (answered as an invalid request).
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("Airlock: more than one {0} header")]
    Repeated(&'static str),
    #[error("Airlock: the Mcp-Method header says `{claimed}`, the body `{body}`")]
    Method { claimed: String, body: String },
    #[error("Airlock: the Mcp-Name header says `{claimed}`, the body `{body}`")]
    Name { claimed: String, body: String },
}

/// The legacy transport's session is named more than once in a query (servers differ on
/// which one counts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegacySessionError {
    #[error("the request names its legacy session more than once")]
    Repeated,
}
