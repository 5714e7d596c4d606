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
    http::{Dial, UpstreamSender, UpstreamTls},
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

/// Ask for the tunnel on `stream`; the proxy's answer head (any status). What followed the
/// head stays in `buf` (a refusal's body).
pub async fn ask(
    stream: &mut TcpStream,
    spec: &TunnelSpec,
    buf: &mut BytesMut,
) -> Result<ResponseHead, String> {
    stream
        .write_all(&spec.request())
        .await
        .map_err(|e| format!("writing to the egress proxy {}: {e}", spec.proxy))?;
    match read_head(stream, buf, spec.timeout, |b| {
        wire::parse_response(b, false, true)
    })
    .await
    {
        Ok(Some(head)) => Ok(head),
        Ok(None) => Err(format!(
            "the egress proxy {} closed the connection without answering CONNECT {}",
            spec.proxy, spec.authority
        )),
        Err(HeadError::Timeout) => Err(format!(
            "the egress proxy {} did not answer CONNECT {} within {} s (`connect_timeout_secs`)",
            spec.proxy,
            spec.authority,
            spec.timeout.as_secs()
        )),
        Err(e) => Err(format!("the egress proxy's answer to CONNECT: {e}")),
    }
}

/// A 2xx that nothing followed: the tunnel is open (the server speaks only after the client).
pub fn opened(head: &ResponseHead, buf: &BytesMut, spec: &TunnelSpec) -> Result<bool, String> {
    if !(200..300).contains(&head.status) {
        return Ok(false);
    }
    if buf.len() > head.len {
        return Err(format!(
            "the egress proxy {} sent data before the tunnel to {} was used",
            spec.proxy, spec.authority
        ));
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
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<UpstreamSender, String>> + Send + '_>> {
        Box::pin(async move {
            let mut tcp = self
                .proxy
                .dial(self.spec.proxy, self.spec.netns)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = BytesMut::new();
            let head = ask(&mut tcp, &self.spec, &mut buf).await?;
            if !opened(&head, &buf, &self.spec)? {
                return Err(format!(
                    "the egress proxy {} refused a new tunnel to {}: status {} (proxy authentication tied to the first connection, NTLM or Negotiate, does not carry over)",
                    self.spec.proxy, self.spec.authority, head.status
                ));
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
