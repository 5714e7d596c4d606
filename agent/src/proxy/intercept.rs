//! An attributed connection to an `mode = "mcp"` backend, from its first byte to HTTP:
//!
//! 1. Peek (bounded by `header_read_timeout_secs`): a TLS record (0x16) or plain HTTP.
//! 2. TLS: read the ClientHello; the SNI picks the backend (or, naming none, the connection is
//!    spliced or refused per `unknown_sni`); without SNI the leaf is for the original address.
//!    The server's TLS handshake starts on the socket dialled during attribution *while* the
//!    client's handshake runs.
//! 3. HTTP/1.1 on both sides (`http::serve`), every MCP message through the pipeline.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use rustls_pki_types::ServerName;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use super::{
    http::{self, Conn, Dial, UpstreamError, UpstreamSender, UpstreamSlot, UpstreamTls},
    relay,
    route::{End, Identity, Route},
    state::Proxy,
};
use crate::{
    config::{Backend, UnknownSni},
    pipeline::ConnCtx,
    registry::ConnGuard,
    tls,
};

/// Why an intercepted connection is refused (recorded by the caller as the reason).
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("the client sent nothing for {0} s")]
    Silent(u64),
    #[error("reading from the client: {0}")]
    Read(#[source] std::io::Error),
    #[error("the kernel named an unknown backend")]
    UnknownBackend,
    #[error("the client started TLS but backend `{0}` is `tls = false`")]
    UnexpectedTls(String),
    #[error("the client sent plaintext but backend `{0}` is `tls = true`")]
    UnexpectedPlaintext(String),
    #[error("the client sent neither TLS nor an HTTP request")]
    NotHttp,
    #[error("TLS interception is not available (no CA loaded)")]
    NoCa,
    /// The ClientHello could not be read (the reason is `tls::read_client_hello`'s).
    #[error("{0}")]
    ClientHello(String),
    #[error("the client sent no SNI through the tunnel to `{0}`: no certificate to present")]
    NoSniInTunnel(String),
    #[error("no certificate for this connection: {0} (the client sent no SNI)")]
    NoCertificate(String),
    #[error("backend `{0}` has no TLS client configuration")]
    NoUpstreamTls(String),
    #[error("`{host}` is not a valid server name: {source}")]
    ServerName {
        host: String,
        source: rustls_pki_types::InvalidDnsNameError,
    },
    #[error(
        "TLS handshake with the client failed: {0} (does the client trust Airlock's CA? `airlock ca show --pem`)"
    )]
    Handshake(#[source] std::io::Error),
    #[error("TLS handshake with the client took over {0} s")]
    HandshakeTimeout(u64),
    #[error(transparent)]
    Dial(#[from] super::state::DialError),
    #[error("splicing to the server: {0}")]
    Splice(#[source] std::io::Error),
    #[error(
        "SNI `{sni}` names no backend at {original}, the address the client connected to (`unknown_sni = \"reject\"`)"
    )]
    SniElsewhere { sni: String, original: SocketAddr },
    #[error("SNI `{sni}` is not the tunnel's target `{authority}` (`unknown_sni = \"reject\"`)")]
    SniNotTunnelTarget { sni: String, authority: String },
    #[error("HTTP with the client: {0}")]
    Http(#[source] hyper::Error),
}

/// Why the TLS state of the agent could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsStartError {
    #[error(transparent)]
    Ca(#[from] tls::ca::CaError),
    #[error(transparent)]
    Upstream(#[from] crate::egress::tls::TlsClientError),
}

/// Largest ClientHello accepted (post-quantum key shares make them ~1.8 KB today).
const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// The first upstream connection (its handshakes under way) and the dialer of the next.
type Upstreams = (
    tokio::task::JoinHandle<Result<UpstreamSender, UpstreamError>>,
    Box<dyn Dial>,
);

/// Dials the backend again when the server closed the connection between requests.
struct BackendDialer {
    proxy: Arc<Proxy>,
    key: http::PoolKey,
    tls: Option<UpstreamTls>,
}

impl Dial for BackendDialer {
    fn dial(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<UpstreamSender, UpstreamError>> + Send + '_>>
    {
        Box::pin(async move {
            let tcp = self.proxy.dial(self.key.1, self.key.2).await?;
            open_upstream(tcp, self.tls.clone()).await
        })
    }

    fn take_idle(&self) -> Option<UpstreamSender> {
        self.proxy.upstream_pool.take(self.key)
    }

    fn keep_idle(&self, sender: UpstreamSender) {
        self.proxy.upstream_pool.put(self.key, sender);
    }
}

/// TLS (when configured) and the HTTP handshake on a dialled socket (or a proxy's tunnel).
pub(crate) async fn open_upstream(
    tcp: TcpStream,
    tls: Option<UpstreamTls>,
) -> Result<UpstreamSender, UpstreamError> {
    match tls {
        Some((config, name)) => {
            let shown = format!("{name:?}");
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|source| UpstreamError::Tls {
                    name: shown,
                    source,
                })?;
            http::client_handshake(stream).await
        }
        None => http::client_handshake(tcp).await,
    }
}

/// A client going away is how connections end, not a refusal: a reset, a close before a
/// request was complete, the header timeout between requests. `None` for real failures.
fn ordinary_end(e: &hyper::Error) -> Option<&'static str> {
    if e.is_timeout() {
        return Some("idle past `header_read_timeout_secs`");
    }
    if e.is_incomplete_message() {
        return Some("the client closed the connection before its request was complete");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match io.kind() {
                ConnectionReset | ConnectionAborted => Some("the client reset the connection"),
                BrokenPipe | NotConnected => Some("the client closed the connection"),
                // TLS without close_notify: a truncation the client chose, not an attack
                // on a request (an incomplete request is caught above).
                UnexpectedEof => {
                    Some("the client closed the connection without a TLS close_notify")
                }
                _ => None,
            };
        }
        source = s.source();
    }
    None
}

fn server_name(host: &str) -> Result<ServerName<'static>, InterceptError> {
    ServerName::try_from(host.to_owned()).map_err(|source| InterceptError::ServerName {
        host: host.to_owned(),
        source,
    })
}

/// Serve one attributed connection to an MCP backend, reached by `route`. `Err` carries the
/// reason the connection was refused (recorded by the caller).
pub(crate) async fn intercept(
    proxy: &Arc<Proxy>,
    client: TcpStream,
    route: Route,
    backend_id: usize,
    who: &Identity,
    guard: &ConnGuard,
) -> Result<End, InterceptError> {
    Interception { proxy, who, guard }
        .run(client, route, backend_id)
        .await
}

/// One connection's interception: what its steps share.
struct Interception<'a> {
    proxy: &'a Arc<Proxy>,
    who: &'a Identity,
    guard: &'a ConnGuard,
}

impl Interception<'_> {
    async fn run(
        &self,
        mut client: TcpStream,
        route: Route,
        backend_id: usize,
    ) -> Result<End, InterceptError> {
        let attribution = &self.who.attribution;
        let original = attribution.original_dst;
        let timeout = self.proxy.config.header_read_timeout;
        let mut first = [0u8; 1];
        let n = tokio::time::timeout(timeout, client.peek(&mut first))
            .await
            .map_err(|_| InterceptError::Silent(timeout.as_secs()))?
            .map_err(InterceptError::Read)?;
        if n == 0 {
            return Ok(End::Served(Some(
                "the client closed the connection without sending anything".into(),
            )));
        }
        let backend = self
            .proxy
            .config
            .backends
            .get(backend_id)
            .ok_or(InterceptError::UnknownBackend)?;
        let is_tls = first[0] == 0x16;
        if is_tls != backend.tls {
            return Err(if is_tls {
                InterceptError::UnexpectedTls(backend.name.clone())
            } else {
                InterceptError::UnexpectedPlaintext(backend.name.clone())
            });
        }
        let pool_key = (backend_id, original, attribution.netns);
        if !is_tls {
            if !first[0].is_ascii_uppercase() {
                return Err(InterceptError::NotHttp);
            }
            let upstream = self.upstreams(route, pool_key, None);
            let ctx = ConnCtx::new(
                self.who.id,
                self.who.session_id.clone(),
                attribution.clone(),
                self.who.subject.clone(),
                backend.name.clone(),
                None,
                self.who.seq.clone(),
            );
            return self.serve_http(client, ctx, backend_id, upstream).await;
        }

        let tls_rt = self.proxy.tls.as_ref().ok_or(InterceptError::NoCa)?;
        let hello = tls::read_client_hello(&mut client, MAX_CLIENT_HELLO, timeout)
            .await
            .map_err(InterceptError::ClientHello)?;
        let address = route.address(original);
        let (backend_id, backend): (usize, &Backend) = match hello.sni.as_deref() {
            None => (backend_id, backend),
            Some(sni) => match self.backend_for_sni(sni, backend_id, address) {
                Some(found) => found,
                None => {
                    return self
                        .unknown_sni(
                            client,
                            route,
                            &hello,
                            backend,
                            sni,
                            (original, attribution.netns),
                        )
                        .await;
                }
            },
        };
        let server_config = match (hello.sni.as_deref(), address) {
            (None, None) => {
                return Err(InterceptError::NoSniInTunnel(backend.host.clone()));
            }
            (sni, address) => tls_rt
                .acceptors
                .config_for(sni, address.map_or(original.ip(), |a| a.ip()))
                .map_err(InterceptError::NoCertificate)?,
        };
        let upstream_tls = tls_rt
            .upstream
            .config(backend_id)
            .ok_or_else(|| InterceptError::NoUpstreamTls(backend.name.clone()))?;
        let name = match backend.host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => server_name(&backend.host)?,
        };
        // The server's handshake runs while the client's does.
        let pool_key = (backend_id, original, attribution.netns);
        let upstream = self.upstreams(route, pool_key, Some((upstream_tls, name)));
        let accept = tokio_rustls::StartHandshake::from_parts(hello.accepted, client)
            .into_stream(server_config);
        let stream = match tokio::time::timeout(timeout, accept).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                upstream.0.abort();
                return Err(InterceptError::Handshake(e));
            }
            Err(_) => {
                upstream.0.abort();
                return Err(InterceptError::HandshakeTimeout(timeout.as_secs()));
            }
        };
        let ctx = ConnCtx::new(
            self.who.id,
            self.who.session_id.clone(),
            attribution.clone(),
            self.who.subject.clone(),
            backend.name.clone(),
            hello.sni.clone(),
            self.who.seq.clone(),
        );
        self.serve_http(stream, ctx, backend_id, upstream).await
    }

    /// A ClientHello whose SNI names no backend at the address the client reached: spliced
    /// to the server (through the tunnel, when there is one) or refused, per `unknown_sni`.
    #[allow(clippy::too_many_arguments)]
    async fn unknown_sni(
        &self,
        client: TcpStream,
        route: Route,
        hello: &tls::Hello,
        backend: &Backend,
        sni: &str,
        (original, netns): (SocketAddr, u64),
    ) -> Result<End, InterceptError> {
        match backend.unknown_sni {
            UnknownSni::Splice => {
                let mut upstream = match route {
                    Route::Direct(Some(u)) => u,
                    Route::Direct(None) => self.proxy.dial(original, netns).await?,
                    Route::Tunnel(t) => t.stream,
                };
                upstream
                    .write_all(&hello.bytes)
                    .await
                    .map_err(InterceptError::Splice)?;
                self.guard.set_state(crate::registry::ConnState::Open);
                Ok(End::Relayed(
                    relay::relay(
                        client,
                        upstream,
                        self.proxy.config.idle_timeout,
                        self.guard.bytes_up(),
                        self.guard.bytes_down(),
                    )
                    .await,
                ))
            }
            UnknownSni::Reject => Err(match route {
                Route::Direct(_) => InterceptError::SniElsewhere {
                    sni: sni.to_owned(),
                    original,
                },
                Route::Tunnel(t) => InterceptError::SniNotTunnelTarget {
                    sni: sni.to_owned(),
                    authority: t.authority,
                },
            }),
        }
    }

    /// HTTP on the (decrypted) client stream until it closes; then the connection's session
    /// ends and its idle upstream connection goes to the pool (a tunnel's is closed).
    async fn serve_http<S>(
        &self,
        io: S,
        ctx: ConnCtx,
        backend_id: usize,
        (first_upstream, dialer): Upstreams,
    ) -> Result<End, InterceptError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let backend = self
            .proxy
            .backends
            .get(backend_id)
            .cloned()
            .ok_or(InterceptError::UnknownBackend)?;
        let conn = Arc::new(Conn {
            ctx: Arc::new(ctx),
            pipeline: self.proxy.pipeline.clone(),
            limits: limits(&self.proxy.config),
            upstream: tokio::sync::Mutex::new(UpstreamSlot::new(first_upstream, dialer)),
            backend,
            resources: self.proxy.resources.clone(),
        });
        self.guard.set_state(crate::registry::ConnState::Open);
        let served = http::serve(io, conn.clone()).await;
        conn.end_connection_session();
        // Its server connection, if idle, goes to the pool (through the slot's dialer).
        conn.upstream.lock().await.checkin().await;
        match served {
            Ok(()) => Ok(End::Served(None)),
            Err(e) => match ordinary_end(&e) {
                Some(how) => Ok(End::Served(Some(how.into()))),
                None => Err(InterceptError::Http(e)),
            },
        }
    }

    /// The first upstream connection of a client connection (handshakes under way on their
    /// own task) and how to dial the next: the pool and the original destination, or the
    /// proxy's tunnel and a new tunnel.
    fn upstreams(&self, route: Route, key: http::PoolKey, tls: Option<UpstreamTls>) -> Upstreams {
        match route {
            Route::Direct(dialled) => (
                self.first_upstream(key, dialled, tls.clone()),
                Box::new(BackendDialer {
                    proxy: self.proxy.clone(),
                    key,
                    tls,
                }),
            ),
            Route::Tunnel(t) => {
                let first = tokio::spawn(open_upstream(t.stream, tls.clone()));
                (first, t.redial.with_tls(tls))
            }
        }
    }

    /// The upstream connection a new client connection starts with: an idle pooled one, or
    /// the socket dialled during attribution (TLS and HTTP handshakes run on their own task,
    /// alongside the client's handshake), or a fresh dial.
    fn first_upstream(
        &self,
        key: http::PoolKey,
        dialled: Option<TcpStream>,
        tls: Option<UpstreamTls>,
    ) -> tokio::task::JoinHandle<Result<UpstreamSender, UpstreamError>> {
        if let Some(pooled) = self.proxy.upstream_pool.take(key) {
            // The dialled socket (if any) closes unused.
            return tokio::spawn(async move { Ok(pooled) });
        }
        let proxy = self.proxy.clone();
        tokio::spawn(async move {
            let tcp = match dialled {
                Some(tcp) => tcp,
                None => proxy.dial(key.1, key.2).await?,
            };
            open_upstream(tcp, tls).await
        })
    }

    /// The backend a TLS client asked for by name: the one the kernel matched, or another
    /// that has the original destination among its addresses (backends sharing an address).
    /// A name is honoured only for the backends of the address the client connected to: a SNI
    /// naming a backend elsewhere (a wildcard certificate would let the handshake succeed) is
    /// not a way to be judged, and brokered, as that backend. Case and a trailing dot do not
    /// count.
    fn backend_for_sni(
        &self,
        sni: &str,
        kernel_choice: usize,
        address: Option<SocketAddr>,
    ) -> Option<(usize, &Backend)> {
        let backends = &self.proxy.config.backends;
        let wanted = sni.trim_end_matches('.');
        let matches =
            |b: &Backend| b.tls && b.host.trim_end_matches('.').eq_ignore_ascii_case(wanted);
        if let Some(b) = backends.get(kernel_choice)
            && matches(b)
        {
            return Some((kernel_choice, b));
        }
        let targets = self.proxy.targets.read().ok()?;
        crate::config::Config::owners(&targets, address?)
            .filter_map(|id| Some((id, backends.get(id)?)))
            .find(|(_, b)| matches(b))
    }
}

/// The HTTP layer's limits and timeouts, from `airlock.toml`.
pub fn limits(config: &crate::config::Config) -> http::Limits {
    http::Limits {
        max_body: config.max_body_bytes,
        max_sse_event: config.max_sse_event_bytes,
        header_read_timeout: config.header_read_timeout,
        stream_idle_timeout: config.stream_idle_timeout,
        body_read_timeout: config.body_read_timeout,
    }
}

/// The TLS state of a running agent.
pub struct TlsRuntime {
    pub acceptors: tls::Acceptors,
    pub upstream: crate::egress::tls::Upstream,
}

impl TlsRuntime {
    /// Load (or create) the CA, make the intermediate, build the upstream configurations.
    pub fn start(config: &crate::config::Config) -> Result<TlsRuntime, TlsStartError> {
        let dir = tls::ca::Ca::dir_of(&config.state_dir);
        tls::ca::Ca::init(&dir, &config.host)?;
        let ca = tls::ca::Ca::load(&dir)?;
        let own: Vec<Vec<u8>> = ca.trusted_roots()?.into_iter().map(|r| r.der).collect();
        let minter = Arc::new(tls::Minter::new(&ca, &config.backends, &config.host)?);
        let upstream = crate::egress::tls::Upstream::new(&config.backends, &own)?;
        Ok(TlsRuntime {
            acceptors: tls::Acceptors::with_refresh(
                minter,
                tls::MinterSource {
                    ca_dir: dir,
                    backends: config.backends.clone(),
                    host: config.host.clone(),
                },
            ),
            upstream,
        })
    }
}
