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

use crate::{
    config::{Backend, UnknownSni},
    http::{self, Conn, Dial, UpstreamSender, UpstreamSlot},
    pipeline::ConnCtx,
    proxy::Proxy,
    registry::ConnGuard,
    relay::{self, RelayEnd},
    tls,
};

/// Largest ClientHello accepted (post-quantum key shares make them ~1.8 KB today).
const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// What identifies a connection to the message pipeline: its id, session id, attribution,
/// policy subject, and the sequence of its records.
pub(crate) type ConnParts = (
    u64,
    String,
    crate::attribution::Attribution,
    crate::policy::Subject,
    Arc<std::sync::atomic::AtomicU64>,
);

/// How the backend is reached.
pub(crate) enum Route {
    /// At the original destination (the socket dialled during attribution, if any).
    Direct(Option<TcpStream>),
    /// Through an egress proxy's tunnel, opened by the agent for this client connection.
    Tunnel(crate::egress::TunnelRoute),
}

impl Route {
    /// The backend's address as the client named it: the original destination, or a tunnel
    /// target given as an address (`None`: by name only).
    fn address(&self, original: SocketAddr) -> Option<SocketAddr> {
        match self {
            Route::Direct(_) => Some(original),
            Route::Tunnel(t) => t.address,
        }
    }
}

/// How an intercepted connection ended.
pub enum End {
    /// HTTP served until one side closed, or the client went away (how, when it did not
    /// close cleanly: a reset, a close mid-request, idle past the header timeout).
    Served(Option<String>),
    /// Unknown SNI, passed through untouched.
    Spliced(Result<RelayEnd, relay::RelayError>),
}

/// The first upstream connection (its handshakes under way) and the dialer of the next.
type Upstreams = (
    tokio::task::JoinHandle<Result<UpstreamSender, String>>,
    Box<dyn Dial>,
);

/// Dials the backend again when the server closed the connection between requests.
struct BackendDialer {
    proxy: Arc<Proxy>,
    key: http::PoolKey,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl Dial for BackendDialer {
    fn dial(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<UpstreamSender, String>> + Send + '_>> {
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
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
) -> Result<UpstreamSender, String> {
    match tls {
        Some((config, name)) => {
            let shown = format!("{name:?}");
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with the server ({shown}): {e}"))?;
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

fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("`{host}` is not a valid server name: {e}"))
}

impl Proxy {
    /// Serve one attributed connection to an MCP backend, reached by `route`. `Err` carries
    /// the reason the connection was refused (recorded by the caller).
    pub(crate) async fn intercept(
        self: &Arc<Self>,
        mut client: TcpStream,
        route: Route,
        backend_id: usize,
        ctx_parts: ConnParts,
        guard: &ConnGuard,
    ) -> Result<End, String> {
        let (conn_id, session_id, attribution, subject, seq) = ctx_parts;
        let original = attribution.original_dst;
        let timeout = self.config.header_read_timeout;
        let mut first = [0u8; 1];
        let n = tokio::time::timeout(timeout, client.peek(&mut first))
            .await
            .map_err(|_| format!("the client sent nothing for {} s", timeout.as_secs()))?
            .map_err(|e| format!("reading from the client: {e}"))?;
        if n == 0 {
            return Ok(End::Served(Some(
                "the client closed the connection without sending anything".into(),
            )));
        }
        let backend = self
            .config
            .backends
            .get(backend_id)
            .ok_or("the kernel named an unknown backend")?;
        let is_tls = first[0] == 0x16;
        if is_tls != backend.tls {
            return Err(if is_tls {
                format!(
                    "the client started TLS but backend `{}` is `tls = false`",
                    backend.name
                )
            } else {
                format!(
                    "the client sent plaintext but backend `{}` is `tls = true`",
                    backend.name
                )
            });
        }
        let pool_key = (backend_id, original, attribution.netns);
        if !is_tls {
            if !first[0].is_ascii_uppercase() {
                return Err("the client sent neither TLS nor an HTTP request".into());
            }
            let upstream = self.upstreams(route, pool_key, None);
            let ctx = ConnCtx::new(
                conn_id,
                session_id,
                attribution,
                subject,
                backend.name.clone(),
                None,
                seq,
            );
            return self.serve_http(client, ctx, backend, upstream, guard).await;
        }

        let tls_rt = self
            .tls
            .as_ref()
            .ok_or("TLS interception is not available (no CA loaded)")?;
        let hello = tls::read_client_hello(&mut client, MAX_CLIENT_HELLO, timeout).await?;
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
                            guard,
                        )
                        .await;
                }
            },
        };
        let server_config = match (hello.sni.as_deref(), address) {
            (None, None) => {
                return Err(format!(
                    "the client sent no SNI through the tunnel to `{}`: no certificate to present",
                    backend.host
                ));
            }
            (sni, address) => tls_rt
                .acceptors
                .config_for(sni, address.map_or(original.ip(), |a| a.ip()))
                .map_err(|e| {
                    format!("no certificate for this connection: {e} (the client sent no SNI)")
                })?,
        };
        let upstream_tls = tls_rt
            .upstream
            .config(backend_id)
            .ok_or_else(|| format!("backend `{}` has no TLS client configuration", backend.name))?;
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
                return Err(format!(
                    "TLS handshake with the client failed: {e} (does the client trust Airlock's CA? `airlock ca show --pem`)"
                ));
            }
            Err(_) => {
                upstream.0.abort();
                return Err(format!(
                    "TLS handshake with the client took over {} s",
                    timeout.as_secs()
                ));
            }
        };
        let ctx = ConnCtx::new(
            conn_id,
            session_id,
            attribution,
            subject,
            backend.name.clone(),
            hello.sni.clone(),
            seq,
        );
        self.serve_http(stream, ctx, backend, upstream, guard).await
    }

    /// A ClientHello whose SNI names no backend at the address the client reached: spliced
    /// to the server (through the tunnel, when there is one) or refused, per `unknown_sni`.
    #[allow(clippy::too_many_arguments)]
    async fn unknown_sni(
        self: &Arc<Self>,
        client: TcpStream,
        route: Route,
        hello: &tls::Hello,
        backend: &Backend,
        sni: &str,
        (original, netns): (SocketAddr, u64),
        guard: &ConnGuard,
    ) -> Result<End, String> {
        match backend.unknown_sni {
            UnknownSni::Splice => {
                let mut upstream = match route {
                    Route::Direct(Some(u)) => u,
                    Route::Direct(None) => self.dial(original, netns).await?,
                    Route::Tunnel(t) => t.stream,
                };
                upstream
                    .write_all(&hello.bytes)
                    .await
                    .map_err(|e| format!("splicing to the server: {e}"))?;
                guard.set_state(crate::registry::ConnState::Open);
                Ok(End::Spliced(
                    relay::relay(
                        client,
                        upstream,
                        self.config.idle_timeout,
                        guard.bytes_up(),
                        guard.bytes_down(),
                    )
                    .await,
                ))
            }
            UnknownSni::Reject => Err(match route {
                Route::Direct(_) => format!(
                    "SNI `{sni}` names no backend at {original}, the address the client connected to (`unknown_sni = \"reject\"`)"
                ),
                Route::Tunnel(t) => format!(
                    "SNI `{sni}` is not the tunnel's target `{}` (`unknown_sni = \"reject\"`)",
                    t.spec.authority
                ),
            }),
        }
    }

    /// HTTP on the (decrypted) client stream until it closes; then the connection's session
    /// ends and its idle upstream connection goes to the pool (a tunnel's is closed).
    async fn serve_http<S>(
        self: &Arc<Self>,
        io: S,
        ctx: ConnCtx,
        backend: &Backend,
        (first_upstream, dialer): Upstreams,
        guard: &ConnGuard,
    ) -> Result<End, String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let conn = Arc::new(Conn {
            ctx: Arc::new(ctx),
            pipeline: self.pipeline.clone(),
            limits: self.limits(),
            upstream: tokio::sync::Mutex::new(UpstreamSlot::new(first_upstream, dialer)),
            backend: Arc::new(backend.clone()),
            resources: self.resources.clone(),
        });
        guard.set_state(crate::registry::ConnState::Open);
        let served = http::serve(io, conn.clone()).await;
        conn.end_connection_session();
        // Its server connection, if idle, goes to the pool (through the slot's dialer).
        conn.upstream.lock().await.checkin();
        match served {
            Ok(()) => Ok(End::Served(None)),
            Err(e) => match ordinary_end(&e) {
                Some(how) => Ok(End::Served(Some(how.into()))),
                None => Err(format!("HTTP with the client: {e}")),
            },
        }
    }

    /// The first upstream connection of a client connection (handshakes under way on their
    /// own task) and how to dial the next: the pool and the original destination, or the
    /// proxy's tunnel and a new tunnel.
    fn upstreams(
        self: &Arc<Self>,
        route: Route,
        key: http::PoolKey,
        tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    ) -> Upstreams {
        match route {
            Route::Direct(dialled) => (
                self.first_upstream(key, dialled, tls.clone()),
                Box::new(BackendDialer {
                    proxy: self.clone(),
                    key,
                    tls,
                }),
            ),
            Route::Tunnel(t) => {
                let first = tokio::spawn(open_upstream(t.stream, tls.clone()));
                let dialer = crate::egress::TunnelDialer {
                    proxy: self.clone(),
                    spec: t.spec,
                    tls,
                    idle: Default::default(),
                };
                (first, Box::new(dialer))
            }
        }
    }

    /// The upstream connection a new client connection starts with: an idle pooled one, or
    /// the socket dialled during attribution (TLS and HTTP handshakes run on their own task,
    /// alongside the client's handshake), or a fresh dial.
    fn first_upstream(
        self: &Arc<Self>,
        key: http::PoolKey,
        dialled: Option<TcpStream>,
        tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    ) -> tokio::task::JoinHandle<Result<UpstreamSender, String>> {
        if let Some(pooled) = self.upstream_pool.take(key) {
            // The dialled socket (if any) closes unused.
            return tokio::spawn(async move { Ok(pooled) });
        }
        let proxy = self.clone();
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
        let backends = &self.config.backends;
        let wanted = sni.trim_end_matches('.');
        let matches =
            |b: &Backend| b.tls && b.host.trim_end_matches('.').eq_ignore_ascii_case(wanted);
        if let Some(b) = backends.get(kernel_choice)
            && matches(b)
        {
            return Some((kernel_choice, b));
        }
        let targets = self.targets.read().ok()?;
        crate::config::Config::owners(&targets, address?)
            .filter_map(|id| Some((id, backends.get(id)?)))
            .find(|(_, b)| matches(b))
    }

    pub fn limits(&self) -> http::Limits {
        http::Limits {
            max_body: self.config.max_body_bytes,
            max_sse_event: self.config.max_sse_event_bytes,
            header_read_timeout: self.config.header_read_timeout,
            stream_idle_timeout: self.config.stream_idle_timeout,
            body_read_timeout: self.config.body_read_timeout,
        }
    }
}

/// The TLS state of a running agent.
pub struct TlsRuntime {
    pub acceptors: tls::Acceptors,
    pub upstream: tls::Upstream,
}

impl TlsRuntime {
    /// Load (or create) the CA, make the intermediate, build the upstream configurations.
    pub fn start(config: &crate::config::Config) -> Result<TlsRuntime, String> {
        let dir = tls::ca::Ca::dir_of(&config.state_dir);
        tls::ca::Ca::init(&dir, &config.host).map_err(|e| e.to_string())?;
        let ca = tls::ca::Ca::load(&dir).map_err(|e| e.to_string())?;
        let own: Vec<Vec<u8>> = ca
            .trusted_roots()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|r| r.der)
            .collect();
        let minter = Arc::new(
            tls::Minter::new(&ca, &config.backends, &config.host).map_err(|e| e.to_string())?,
        );
        let upstream = tls::Upstream::new(&config.backends, &own)?;
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
