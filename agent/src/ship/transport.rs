//! The HTTP transport `object_store` uses to reach the bucket: hyper's HTTP/1.1 client over
//! tokio, rustls with ring (the system's roots, plus `[ship] ca_file` or `--ca-file` for a
//! bucket behind a private CA), one connection per request. Keeps the agent free of a second
//! HTTP and TLS stack (reqwest, aws-lc).
//!
//! Every step has a timer, `timeout_secs`, as a stall timeout: connecting, the TLS handshake,
//! sending the request (its body included) and the answer's headers fail when no byte goes
//! out or comes in for that long; the answer's body may pause at most that long between two
//! frames. A large upload on a slow uplink takes as long as it takes, as long as it moves.
//!
//! Inside the agent, the connection is dialled from a socket tagged as the agent's own
//! (`AIRLOCK_OWN`, as the proxy's upstream and the webhooks): were the bucket's address an
//! intercepted backend, the upload would otherwise be redirected into the agent itself.

use std::{
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService,
};

/// Builds [`Transport`]s for `object_store` (`with_http_connector`).
#[derive(Debug, Clone)]
pub struct Connector {
    pub allow_http: bool,
    pub timeout: Duration,
    pub own: OwnDial,
    /// Roots trusted besides the system's (`ca_file`).
    pub extra_roots: Arc<Vec<rustls_pki_types::CertificateDer<'static>>>,
}

/// The agent's socket tag, once the kernel programs are up ([`OwnDial::set`]); unset (the
/// `airlock verify --fleet` command line, tests without the agent), plain sockets are used.
#[derive(Clone, Default)]
pub struct OwnDial(Arc<OnceLock<Arc<crate::kernel::OwnSockets>>>);

impl OwnDial {
    /// Dial from sockets tagged with `own` from now on.
    pub fn set(&self, own: Arc<crate::kernel::OwnSockets>) {
        let _ = self.0.set(own);
    }
}

impl std::fmt::Debug for OwnDial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("OwnDial")
            .field(&self.0.get().is_some())
            .finish()
    }
}

impl HttpConnector for Connector {
    fn connect(&self, _options: &object_store::ClientOptions) -> object_store::Result<HttpClient> {
        let tls = crate::egress::tls::system_client(&self.extra_roots).map_err(|e| {
            object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            }
        })?;
        Ok(HttpClient::new(Transport {
            tls: tokio_rustls::TlsConnector::from(tls),
            allow_http: self.allow_http,
            timeout: self.timeout,
            own: self.own.clone(),
        }))
    }
}

#[derive(Clone)]
struct Transport {
    tls: tokio_rustls::TlsConnector,
    allow_http: bool,
    timeout: Duration,
    own: OwnDial,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("allow_http", &self.allow_http)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A failed TLS handshake, with what to do when the bucket's certificate is signed by a CA
/// nobody told us about (an object store behind a private CA).
fn tls_error(host: &str, e: std::io::Error) -> std::io::Error {
    let unknown_issuer = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            )
        });
    let hint = if unknown_issuer {
        " (no trusted root signed the bucket's certificate: for a private CA, set `ca_file` in [ship], or `--ca-file` for verify --fleet)"
    } else {
        ""
    };
    std::io::Error::new(e.kind(), format!("TLS with {host}: {e}{hint}"))
}

fn err(kind: HttpErrorKind, message: impl Into<String>) -> HttpError {
    HttpError::new(kind, std::io::Error::other(message.into()))
}

#[async_trait::async_trait]
impl HttpService for Transport {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let progress = Arc::new(Clock::new());
        let work = self.exchange(req, progress.clone());
        tokio::pin!(work);
        loop {
            let deadline = progress.last() + self.timeout;
            tokio::select! {
                answer = &mut work => return answer,
                _ = tokio::time::sleep_until(deadline) => {
                    if progress.last() + self.timeout <= tokio::time::Instant::now() {
                        return Err(err(
                            HttpErrorKind::Timeout,
                            format!("no progress for {} s (connecting, sending or awaiting the answer)", self.timeout.as_secs()),
                        ));
                    }
                }
            }
        }
    }
}

impl Transport {
    async fn exchange(
        &self,
        req: HttpRequest,
        progress: Arc<Clock>,
    ) -> Result<HttpResponse, HttpError> {
        let (mut parts, body) = req.into_parts();
        let uri = parts.uri.clone();
        let host = uri
            .host()
            .ok_or_else(|| err(HttpErrorKind::Unknown, "the URL has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if self.allow_http => false,
            Some("http") => {
                return Err(err(
                    HttpErrorKind::Unknown,
                    "refusing plain http (set `allow_http = true` in [ship] for a local bucket)",
                ));
            }
            other => {
                return Err(err(
                    HttpErrorKind::Unknown,
                    format!("unsupported URL scheme {other:?}"),
                ));
            }
        };
        let default_port = if https { 443 } else { 80 };
        let port = uri.port_u16().unwrap_or(default_port);
        // The Host header the signature covers: the URL's host and any non-default port.
        let authority = match uri.port_u16() {
            Some(p) if p != default_port => format!("{}:{p}", uri.host().unwrap_or_default()),
            _ => uri.host().unwrap_or_default().to_owned(),
        };
        parts.headers.insert(
            http::header::HOST,
            http::HeaderValue::from_str(&authority)
                .map_err(|e| HttpError::new(HttpErrorKind::Unknown, e))?,
        );
        // Origin form on the wire: `PUT /bucket/key HTTP/1.1`.
        parts.uri = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()
            .map_err(|e: http::uri::InvalidUri| HttpError::new(HttpErrorKind::Unknown, e))?;
        let tcp = self.dial(&host, port).await?;
        let _ = tcp.set_nodelay(true);
        let tcp = Counted {
            inner: tcp,
            progress,
        };
        let request = http::Request::from_parts(parts, body);
        let response = if https {
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| HttpError::new(HttpErrorKind::Connect, e))?;
            let stream = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| HttpError::new(HttpErrorKind::Connect, tls_error(&host, e)))?;
            send(stream, request).await?
        } else {
            send(tcp, request).await?
        };
        let (parts, body) = response.into_parts();
        Ok(HttpResponse::from_parts(
            parts,
            HttpResponseBody::new(IdleTimeoutBody {
                inner: body,
                idle: self.timeout,
                timer: Box::pin(tokio::time::sleep(self.timeout)),
                left: MAX_BODY_BYTES,
            }),
        ))
    }
}

impl Transport {
    async fn dial(&self, host: &str, port: u16) -> Result<tokio::net::TcpStream, HttpError> {
        let own = self.own.0.get().map(|o| &**o);
        crate::egress::dial(own, host, port, self.timeout, "`timeout_secs` in [ship]")
            .await
            .map_err(|e| HttpError::new(HttpErrorKind::Connect, e))
    }
}

/// When bytes last moved on a connection (milliseconds after `start`).
struct Clock {
    start: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            start: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn tick(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

/// A connection that notes on its [`Clock`] every time bytes go out or come in.
struct Counted<S> {
    inner: S,
    progress: Arc<Clock>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.progress.tick();
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.progress.tick();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.progress.tick();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn send<S>(stream: S, request: HttpRequest) -> Result<http::Response<Incoming>, HttpError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| HttpError::new(HttpErrorKind::Connect, e))?;
    // Drives the connection until the answer's body is read or dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| HttpError::new(HttpErrorKind::Request, e))
}

/// The largest answer body read from a bucket: above any sealed file (segments seal at
/// 128 MiB of records, smaller once compressed), so a hostile or broken store cannot make the
/// agent or `verify --fleet` read without end.
const MAX_BODY_BYTES: u64 = 1 << 30;

/// An answer's body that fails when no frame arrives for `idle`, or past `MAX_BODY_BYTES`.
struct IdleTimeoutBody {
    inner: Incoming,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Bytes the body may still carry.
    left: u64,
}

impl Body for IdleTimeoutBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(next);
                if let Some(Ok(f)) = &frame
                    && let Some(data) = f.data_ref()
                {
                    let n = data.len() as u64;
                    if n > this.left {
                        return Poll::Ready(Some(Err(err(
                            HttpErrorKind::Request,
                            format!("the answer is larger than {MAX_BODY_BYTES} bytes"),
                        ))));
                    }
                    this.left -= n;
                }
                Poll::Ready(frame.map(|f| f.map_err(|e| HttpError::new(HttpErrorKind::Request, e))))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(err(
                    HttpErrorKind::Timeout,
                    format!("the answer stalled for {} s", this.idle.as_secs()),
                )))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    //! The stall timeout against a peer on loopback that reads slowly (a slow uplink) or not at
    //! all (a stuck one): what the timer does is a property of the transport, not of a bucket.

    use std::time::{Duration, Instant};

    use object_store::client::HttpConnector as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::Connector;

    const BODY: usize = 12 << 20;

    /// A listener that reads a request of `BODY` bytes, `chunk` bytes per `pause`, then answers
    /// 200; with `chunk` 0 it never reads.
    async fn peer(chunk: usize, pause: Duration) -> u16 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 << 10).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            if chunk == 0 {
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
            let mut buf = vec![0u8; chunk];
            let mut total = 0;
            while total < BODY {
                let mut got = 0;
                while got < chunk {
                    match s.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                }
                total += got;
                tokio::time::sleep(pause).await;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
        });
        port
    }

    async fn upload(port: u16) -> Result<u16, String> {
        let client = Connector {
            allow_http: true,
            timeout: Duration::from_secs(1),
            own: Default::default(),
            extra_roots: Default::default(),
        }
        .connect(&Default::default())
        .map_err(|e| e.to_string())?;
        // The request head counts towards the body read above: a few hundred bytes more.
        let req = http::Request::put(format!("http://127.0.0.1:{port}/b/k"))
            .body(bytes::Bytes::from(vec![7u8; BODY]).into())
            .unwrap();
        client
            .execute(req)
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_upload_that_moves_is_not_cut_and_a_stuck_one_is() {
        // 12 MiB at 1 MiB per 250 ms: about 3 s, three times the (1 s) timeout.
        let port = peer(1 << 20, Duration::from_millis(250)).await;
        let started = Instant::now();
        let answer = upload(port).await;
        assert!(
            started.elapsed() > Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(answer, Ok(200));

        let port = peer(0, Duration::ZERO).await;
        let started = Instant::now();
        let answer = upload(port).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        let error = answer.unwrap_err();
        assert!(error.contains("no progress for 1 s"), "{error}");
    }
}
