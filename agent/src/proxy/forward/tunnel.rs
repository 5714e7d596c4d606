//! The agent's own tunnel through the real proxy to an MCP backend: `CONNECT backend:port`
//! on a connection from a socket tagged as the agent's own, carrying the client's header lines
//! (its `Proxy-Authorization` among them: passed on, never recorded, logged or shown), and the
//! upstream HTTP connection the interception then runs over. A server that closes an idle
//! connection gets a new tunnel the same way (`TunnelDialer`). A tunnel is one client
//! connection's, under its credentials: kept between its exchanges, never pooled for others.

use std::{fmt, net::SocketAddr, sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use super::{
    io::{HeadError, read_head},
    wire::{self, ResponseHead},
};
use crate::proxy::{
    http::{Dial, UpstreamError, UpstreamSender, UpstreamTls},
    route::Redial,
    state::Proxy,
};

/// Header fields a client sent with its proxy request, but `Host` and the framing ones: what
/// the agent's own request to the proxy carries. They hold the client's proxy credentials, so
/// they are never formatted (`Debug` says how many bytes, nothing else).
#[derive(Clone, Default)]
pub struct ProxyHeaders(Arc<Vec<u8>>);

impl fmt::Debug for ProxyHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyHeaders({} bytes, redacted)", self.0.len())
    }
}

impl ProxyHeaders {
    /// From the client's request head (already parsed: `wire::parse_request` accepted it).
    pub fn from_head(head: &[u8]) -> ProxyHeaders {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut headers);
        let mut out = Vec::with_capacity(head.len());
        if req.parse(head).is_ok() {
            for h in req.headers.iter() {
                let skip = ["host", "content-length", "transfer-encoding"]
                    .iter()
                    .any(|n| h.name.eq_ignore_ascii_case(n));
                if !skip {
                    out.extend_from_slice(h.name.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(h.value);
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
        ProxyHeaders(Arc::new(out))
    }
}

/// Everything needed to ask the proxy for a tunnel to a backend (again).
#[derive(Clone, Debug)]
pub struct TunnelSpec {
    /// The real proxy (the client's original destination) and the caller's network namespace
    /// (the agent dials from there).
    pub proxy: SocketAddr,
    pub netns: u64,
    /// `host:port` of the backend, as the proxy is asked for it.
    pub authority: String,
    pub headers: ProxyHeaders,
    /// For the proxy's answer.
    pub timeout: Duration,
}

impl TunnelSpec {
    fn request(&self) -> Vec<u8> {
        let mut out =
            format!("CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n", a = self.authority).into_bytes();
        out.extend_from_slice(&self.headers.0);
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// Why the agent's own tunnel through the real proxy could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("writing to the egress proxy {proxy}: {source}")]
    Write {
        proxy: SocketAddr,
        source: std::io::Error,
    },
    #[error("the egress proxy {proxy} closed the connection without answering CONNECT {authority}")]
    Unanswered {
        proxy: SocketAddr,
        authority: String,
    },
    #[error(
        "the egress proxy {proxy} did not answer CONNECT {authority} within {secs} s (`connect_timeout_secs`)"
    )]
    Timeout {
        proxy: SocketAddr,
        authority: String,
        secs: u64,
    },
    #[error("the egress proxy's answer to CONNECT: {0}")]
    Answer(#[source] HeadError),
    #[error("the egress proxy {proxy} sent data before the tunnel to {authority} was used")]
    EarlyData {
        proxy: SocketAddr,
        authority: String,
    },
    #[error(
        "the egress proxy {proxy} refused a new tunnel to {authority}: status {status} (proxy authentication tied to the first connection, NTLM or Negotiate, does not carry over)"
    )]
    Refused {
        proxy: SocketAddr,
        authority: String,
        status: u16,
    },
}

/// Ask for the tunnel on `stream`; the proxy's answer head (any status). What followed the
/// head stays in `buf` (a refusal's body).
pub async fn ask(
    stream: &mut TcpStream,
    spec: &TunnelSpec,
    buf: &mut BytesMut,
) -> Result<ResponseHead, TunnelError> {
    stream
        .write_all(&spec.request())
        .await
        .map_err(|source| TunnelError::Write {
            proxy: spec.proxy,
            source,
        })?;
    match read_head(stream, buf, spec.timeout, |b| {
        wire::parse_response(b, false, true)
    })
    .await
    {
        Ok(Some(head)) => Ok(head),
        Ok(None) => Err(TunnelError::Unanswered {
            proxy: spec.proxy,
            authority: spec.authority.clone(),
        }),
        Err(HeadError::Timeout) => Err(TunnelError::Timeout {
            proxy: spec.proxy,
            authority: spec.authority.clone(),
            secs: spec.timeout.as_secs(),
        }),
        Err(e) => Err(TunnelError::Answer(e)),
    }
}

/// A 2xx that nothing followed: the tunnel is open (the server speaks only after the client).
pub fn opened(head: &ResponseHead, buf: &BytesMut, spec: &TunnelSpec) -> Result<bool, TunnelError> {
    if !(200..300).contains(&head.status) {
        return Ok(false);
    }
    if buf.len() > head.len {
        return Err(TunnelError::EarlyData {
            proxy: spec.proxy,
            authority: spec.authority.clone(),
        });
    }
    Ok(true)
}

/// Opens a new tunnel (and the HTTP connection over it) when the server closed the last one;
/// keeps this client connection's tunnel between its exchanges (for nobody else).
pub struct TunnelDialer {
    pub proxy: Arc<Proxy>,
    pub spec: TunnelSpec,
    pub tls: Option<UpstreamTls>,
    pub idle: std::sync::Mutex<Option<UpstreamSender>>,
}

impl Dial for TunnelDialer {
    fn dial(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<UpstreamSender, UpstreamError>> + Send + '_>>
    {
        Box::pin(async move {
            let mut tcp = self.proxy.dial(self.spec.proxy, self.spec.netns).await?;
            let mut buf = BytesMut::new();
            let head = ask(&mut tcp, &self.spec, &mut buf).await?;
            if !opened(&head, &buf, &self.spec)? {
                return Err(TunnelError::Refused {
                    proxy: self.spec.proxy,
                    authority: self.spec.authority.clone(),
                    status: head.status,
                }
                .into());
            }
            crate::proxy::intercept::open_upstream(tcp, self.tls.clone()).await
        })
    }

    fn take_idle(&self) -> Option<UpstreamSender> {
        self.idle
            .lock()
            .ok()?
            .take()
            .filter(|s| !s.is_closed() && s.is_ready())
    }

    fn keep_idle(&self, sender: UpstreamSender) {
        // One client connection's tunnel, under its credentials: never in the shared pool.
        if let Ok(mut idle) = self.idle.lock() {
            *idle = Some(sender);
        }
    }
}

/// A tunnel's spec, waiting for the upstream TLS the interception chooses.
pub struct TunnelRedial {
    pub proxy: Arc<Proxy>,
    pub spec: TunnelSpec,
}

impl Redial for TunnelRedial {
    fn with_tls(self: Box<Self>, tls: Option<UpstreamTls>) -> Box<dyn Dial> {
        Box::new(TunnelDialer {
            proxy: self.proxy,
            spec: self.spec,
            tls,
            idle: Default::default(),
        })
    }
}
