//! The HTTP transport `object_store` uses to reach the bucket: hyper's HTTP/1.1 client over
//! tokio, rustls with ring (the system's roots), one connection per request. Keeps the agent
//! free of a second HTTP and TLS stack (reqwest, aws-lc).
//!
//! Every step has a timer: connecting, the TLS handshake and the answer's headers share the
//! request timeout; the answer's body may pause at most that long between two frames.

use std::{
    pin::Pin,
    sync::Arc,
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
}

impl HttpConnector for Connector {
    fn connect(&self, _options: &object_store::ClientOptions) -> object_store::Result<HttpClient> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(HttpClient::new(Transport {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            allow_http: self.allow_http,
            timeout: self.timeout,
        }))
    }
}

#[derive(Clone)]
struct Transport {
    tls: tokio_rustls::TlsConnector,
    allow_http: bool,
    timeout: Duration,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("allow_http", &self.allow_http)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn err(kind: HttpErrorKind, message: impl Into<String>) -> HttpError {
    HttpError::new(kind, std::io::Error::other(message.into()))
}

#[async_trait::async_trait]
impl HttpService for Transport {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        tokio::time::timeout(self.timeout, self.exchange(req))
            .await
            .map_err(|_| {
                err(
                    HttpErrorKind::Timeout,
                    format!("no answer within {} s", self.timeout.as_secs()),
                )
            })?
    }
}

impl Transport {
    async fn exchange(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
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
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| HttpError::new(HttpErrorKind::Connect, e))?;
        let _ = tcp.set_nodelay(true);
        let request = http::Request::from_parts(parts, body);
        let response = if https {
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| HttpError::new(HttpErrorKind::Connect, e))?;
            let stream = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| HttpError::new(HttpErrorKind::Connect, e))?;
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
