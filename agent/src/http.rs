//! HTTP/1.1 on both sides of an intercepted MCP connection (hyper), and the MCP-aware
//! handling of each exchange:
//!
//! - POST bodies are read (capped), parsed as JSON-RPC (one message or a 2025-03-26 batch) and
//!   each message goes through the [`Pipeline`]; a refused message is answered by Airlock
//!   (HTTP 200, JSON-RPC error) and never reaches the server.
//! - JSON responses are read (capped), each message through the pipeline, re-sent with a new
//!   `Content-Length`.
//! - SSE responses (POST answers, GET streams, the legacy `/sse` stream) are parsed and
//!   re-emitted event by event, each flushed as soon as it is through the pipeline.
//! - Anything else (`/.well-known/oauth-*`, 401s) passes through, recorded at HTTP level.
//!
//! Upstream requests never ask for compression (`Accept-Encoding: identity`), so what Airlock
//! inspects is what the client gets; a compressed MCP body is refused rather than passed on
//! unread. Hop-by-hop headers are dropped both ways.

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use crate::{
    mcp::{
        headers,
        jsonrpc::{self, Body, code},
        session::SessionKey,
        sse,
    },
    pipeline::{ConnCtx, Msg, Outcome, Pipeline},
    policy::Direction,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
pub type UpstreamSender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Limits and timeouts of the HTTP layer (from `airlock.toml`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body: usize,
    pub max_sse_event: usize,
    pub header_read_timeout: Duration,
    pub stream_idle_timeout: Duration,
}

/// How to open (again) a connection to the server this client connection goes to.
pub trait Dial: Send + Sync + 'static {
    fn dial(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<UpstreamSender, String>> + Send + '_>>;
}

/// The upstream side of one client connection: the connection dialled while the client's
/// handshake ran, then new ones when the server closes it.
pub struct UpstreamSlot {
    first: Option<tokio::task::JoinHandle<Result<UpstreamSender, String>>>,
    sender: Option<UpstreamSender>,
    dialer: Box<dyn Dial>,
}

impl UpstreamSlot {
    pub fn new(
        first: tokio::task::JoinHandle<Result<UpstreamSender, String>>,
        dialer: Box<dyn Dial>,
    ) -> UpstreamSlot {
        UpstreamSlot {
            first: Some(first),
            sender: None,
            dialer,
        }
    }

    async fn ready(&mut self) -> Result<&mut UpstreamSender, String> {
        if let Some(first) = self.first.take() {
            let s = first
                .await
                .map_err(|e| format!("upstream connection task failed: {e}"))??;
            self.sender = Some(s);
        }
        let usable = match self.sender.as_mut() {
            Some(s) => !s.is_closed() && s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            self.sender = Some(self.dialer.dial().await?);
        }
        self.sender
            .as_mut()
            .ok_or_else(|| "no upstream connection".to_owned())
    }

    /// Forget the current connection: the next request dials a new one.
    fn discard(&mut self) {
        self.sender = None;
    }

    /// The connection, for the pool, once the client connection is done with it.
    pub fn release(&mut self) -> Option<UpstreamSender> {
        self.sender.take()
    }
}

/// Everything one client connection's requests share.
pub struct Conn {
    pub ctx: Arc<ConnCtx>,
    pub pipeline: Arc<Pipeline>,
    pub limits: Limits,
    pub upstream: tokio::sync::Mutex<UpstreamSlot>,
}

/// Serve HTTP/1.1 on an intercepted (decrypted) client stream until it closes.
pub async fn serve<S>(io: S, conn: Arc<Conn>) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = conn.limits;
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(64 * 1024)
        .keep_alive(true)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .await
}

/// Open an HTTP/1.1 client connection over `io`. Its driver runs on a task of its own, so
/// the connection can outlive the client connection that opened it (the upstream pool).
pub async fn client_handshake<S>(io: S) -> Result<UpstreamSender, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(64 * 1024)
        .handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake with the server: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "upstream HTTP connection ended with an error");
        }
    });
    Ok(sender)
}

/// Idle upstream connections, by backend and address, for the next client connection to the
/// same place: a new client connection then costs one TLS handshake, not two. Only a
/// connection with no request in flight is kept, at most `MAX_IDLE` per place, for
/// `IDLE_TTL`. HTTP/1.1 requests stand alone (MCP sessions ride in headers; brokered
/// credentials are added per request), so reuse across callers leaks nothing.
#[derive(Default)]
pub struct UpstreamPool {
    idle: std::sync::Mutex<std::collections::HashMap<PoolKey, Vec<(UpstreamSender, Instant)>>>,
}

/// Backend index and server address.
pub type PoolKey = (usize, std::net::SocketAddr);

const MAX_IDLE: usize = 16;
const IDLE_TTL: Duration = Duration::from_secs(30);

impl UpstreamPool {
    /// An idle connection to `key`, if one is still open.
    pub fn take(&self, key: PoolKey) -> Option<UpstreamSender> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(&key)?;
        while let Some((sender, since)) = list.pop() {
            if !sender.is_closed() && sender.is_ready() && since.elapsed() < IDLE_TTL {
                return Some(sender);
            }
        }
        None
    }

    pub fn has(&self, key: PoolKey) -> bool {
        self.idle
            .lock()
            .map(|i| i.get(&key).is_some_and(|l| !l.is_empty()))
            .unwrap_or(false)
    }

    /// Keep `sender` for reuse if it is idle and open.
    pub fn put(&self, key: PoolKey, sender: UpstreamSender) {
        if sender.is_closed() || !sender.is_ready() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            let list = idle.entry(key).or_default();
            list.retain(|(s, since)| !s.is_closed() && since.elapsed() < IDLE_TTL);
            if list.len() < MAX_IDLE {
                list.push((sender, Instant::now()));
            }
        }
    }
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named by `Connection` are hop-by-hop too.
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for n in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        h.remove(n);
    }
}

fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn text_response(status: StatusCode, text: String) -> Response<ProxyBody> {
    let mut r = Response::new(full(text + "\n"));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(
    status: StatusCode,
    body: &Value,
    extra: Option<&HeaderMap>,
) -> Response<ProxyBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(full(bytes));
    *r.status_mut() = status;
    if let Some(extra) = extra {
        for (k, v) in extra {
            r.headers_mut().insert(k.clone(), v.clone());
        }
    }
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn content_type(h: &HeaderMap) -> String {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

fn is_identity_encoding(h: &HeaderMap) -> bool {
    h.get_all(header::CONTENT_ENCODING).iter().all(|v| {
        v.to_str()
            .map(|s| s.trim().eq_ignore_ascii_case("identity"))
            .unwrap_or(false)
    })
}

/// The legacy transport names its session in the query (`session_id` in Python,
/// `sessionId` in TypeScript).
fn legacy_session(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "session_id" || k == "sessionId").then(|| v.to_owned())
    })
}

/// Where the legacy transport's `endpoint` event says to POST: its session id.
fn legacy_session_from_endpoint(data: &str) -> Option<String> {
    legacy_session(data.split_once('?').map(|(_, q)| q))
}

/// What the request said about its session.
struct RequestInfo {
    method: Method,
    path: String,
    key: SessionKey,
    mcp_session_id: Option<String>,
    started: Instant,
    /// Whether the request carried MCP messages (then its response is expected to).
    mcp: bool,
}

impl Conn {
    /// The connection closed: what was keyed by it (stateless requests, an `initialize`
    /// whose answer never came) is forgotten.
    pub fn end_connection_session(&self) {
        self.pipeline.sessions.end(&self.session_key(None, None));
    }

    fn session_key(&self, mcp_session_id: Option<&str>, legacy: Option<&str>) -> SessionKey {
        SessionKey {
            backend: self.ctx.backend.clone(),
            id: match (mcp_session_id, legacy) {
                (Some(s), _) => format!("mcp:{s}"),
                (None, Some(l)) => format!("legacy:{l}"),
                (None, None) => format!("conn:{}", self.ctx.conn_id),
            },
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let mcp_session_id = parts
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let legacy = legacy_session(parts.uri.query());
        if let Some(auth) = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            && let Some(identity) = jsonrpc::jwt_identity(auth)
            && let Ok(mut slot) = self.ctx.identity.lock()
        {
            *slot = Some(identity);
        }
        let mut info = RequestInfo {
            method: parts.method.clone(),
            path: path.clone(),
            key: self.session_key(mcp_session_id.as_deref(), legacy.as_deref()),
            mcp_session_id,
            started,
            mcp: false,
        };

        // The request body, read whole (capped) so that it can be inspected.
        let body = match Limited::new(body, self.limits.max_body).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                let too_large = e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some();
                let (status, reason) = if too_large {
                    (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "Airlock: request body larger than {} bytes (`max_body_bytes`)",
                            self.limits.max_body
                        ),
                    )
                } else {
                    (
                        StatusCode::BAD_REQUEST,
                        format!("Airlock: reading the request body: {e}"),
                    )
                };
                return self.refuse_http(&info, status, reason).await;
            }
        };
        let mut forward_body = body.clone();
        if !body.is_empty() && !is_identity_encoding(&parts.headers) {
            return self
                .refuse_http(
                    &info,
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Airlock: compressed request bodies cannot be inspected; send them uncompressed".into(),
                )
                .await;
        }
        if jsonrpc::looks_like_json(&body) {
            match Body::parse(&body) {
                Err(e) => {
                    self.pipeline
                        .counters
                        .malformed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return self
                        .refuse_malformed(
                            &info,
                            &format!("Airlock: the request body is not valid JSON: {e}"),
                            &format!("invalid JSON: {e}"),
                        )
                        .await;
                }
                Ok(Some(mut parsed)) => {
                    info.mcp = true;
                    match self
                        .requests_through_pipeline(&info, &mut parts.headers, &mut parsed, &body)
                        .await
                    {
                        // Unchanged messages go on as the client wrote them.
                        Ok(Ok(false)) => {}
                        Ok(Ok(true)) => forward_body = Bytes::from(parsed.to_bytes()),
                        Ok(Err(answer)) => return answer,
                        Err(resp) => return resp,
                    }
                }
                Ok(None) => {}
            }
        } else if parts.method == Method::POST && content_type(&parts.headers) == "application/json"
        {
            // Declared JSON that does not even start like JSON: refused, not forwarded unread.
            return self
                .refuse_malformed(
                    &info,
                    "Airlock: the request body is not valid JSON",
                    "body declared JSON is not JSON",
                )
                .await;
        }

        // Forward.
        strip_hop_by_hop(&mut parts.headers);
        if let Some(creds) = self.pipeline.credentials.get(&self.ctx.backend) {
            // Brokering: the client's credentials never reach the server; Airlock's do.
            for h in crate::policy::credentials::CLIENT_CREDENTIAL_HEADERS {
                parts.headers.remove(*h);
            }
            let a = &self.ctx.attribution;
            if let Some(secret) = creds.for_caller(a.uid, a.user.as_deref())
                && let Ok(mut v) = HeaderValue::from_str(secret.expose())
            {
                v.set_sensitive(true);
                parts.headers.insert(header::AUTHORIZATION, v);
            }
        }
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        parts.headers.remove(header::CONTENT_LENGTH);
        if !forward_body.is_empty() || parts.method == Method::POST {
            parts.headers.insert(
                header::CONTENT_LENGTH,
                HeaderValue::from(forward_body.len()),
            );
        }
        let mut up = Request::new(Full::new(forward_body));
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = path.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
        *up.headers_mut() = parts.headers;
        let response = {
            let mut slot = self.upstream.lock().await;
            let mut up = up;
            let mut retried = false;
            loop {
                let sender = match slot.ready().await {
                    Ok(s) => s,
                    Err(reason) => return self.upstream_failed(&info, reason).await,
                };
                match sender.try_send_request(up).await {
                    Ok(r) => break Ok(r),
                    // The connection closed before the request was written (a pooled or
                    // kept-alive connection the server had just closed): it was never
                    // sent, so sending it once more on a new connection is safe.
                    Err(mut e) => match e.take_message() {
                        Some(unsent) if !retried => {
                            retried = true;
                            slot.discard();
                            up = unsent;
                        }
                        _ => break Err(e.into_error()),
                    },
                }
            }
        };
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                return self
                    .upstream_failed(&info, format!("the server's response: {e}"))
                    .await;
            }
        };
        self.response(info, response).await
    }

    /// Each client→server message through the pipeline. `Ok(Ok(changed))`: forward `parsed`
    /// (rewritten when `changed`, headers in step); `Ok(Err(r))`: Airlock answers with `r`.
    async fn requests_through_pipeline(
        &self,
        info: &RequestInfo,
        headers: &mut HeaderMap,
        parsed: &mut Body,
        body: &Bytes,
    ) -> Result<Result<bool, Response<ProxyBody>>, Response<ProxyBody>> {
        let mut any_changed = false;
        let batch = matches!(parsed, Body::Batch(_));
        let raw = (!batch).then(|| body.clone());
        let mut answers = Vec::new();
        let mut forwarded_ids = Vec::new();
        for m in parsed.messages_mut() {
            let value = std::mem::take(m);
            let id = jsonrpc::id(&value).cloned();
            let outcome = self
                .pipeline
                .process(
                    &self.ctx,
                    Msg {
                        direction: Direction::ClientToServer,
                        value,
                        session: info.key.clone(),
                        mcp_session_id: info.mcp_session_id.clone(),
                        raw: raw.clone(),
                    },
                )
                .await;
            match outcome {
                Ok(Outcome::Forward {
                    value,
                    changed,
                    original_args,
                }) => {
                    if changed && !batch {
                        headers::sync_request_headers(
                            headers,
                            &value,
                            original_args.as_ref(),
                            |s| {
                                self.pipeline
                                    .mask_str(&self.ctx, Direction::ClientToServer, s)
                            },
                        );
                    }
                    any_changed |= changed;
                    forwarded_ids.push(id);
                    *m = value;
                }
                Ok(Outcome::Answer(a)) => answers.push(a),
                Err(e) => {
                    warn!(id = self.ctx.conn_id, error = %e, "refusing a message that cannot be recorded");
                    let answer = jsonrpc::error_response(
                        id.as_ref(),
                        code::UNAVAILABLE,
                        &format!("Airlock: {e}"),
                        None,
                    );
                    return Err(json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &answer,
                        None,
                    ));
                }
            }
        }
        if answers.is_empty() {
            return Ok(Ok(any_changed));
        }
        if !batch {
            // The legacy transport answers on its `/sse` stream and expects 202 here.
            let stream = self
                .pipeline
                .legacy_streams
                .lock()
                .ok()
                .and_then(|m| m.get(&info.key).cloned());
            if let Some(stream) = stream
                && stream.send(answers[0].clone()).await.is_ok()
            {
                let mut r = Response::new(full(Bytes::new()));
                *r.status_mut() = StatusCode::ACCEPTED;
                return Ok(Err(r));
            }
            return Ok(Err(json_response(StatusCode::OK, &answers[0], None)));
        }
        // A batch is forwarded whole or not at all: the others are answered too.
        for id in forwarded_ids.into_iter().flatten() {
            answers.push(jsonrpc::error_response(
                Some(&id),
                code::BATCH_REFUSED,
                "Airlock: not forwarded because another message of its batch was refused",
                None,
            ));
        }
        Ok(Err(json_response(
            StatusCode::OK,
            &Value::Array(answers),
            None,
        )))
    }

    /// A body that should be JSON and is not: answered with a JSON-RPC parse error (400),
    /// recorded, never forwarded.
    async fn refuse_malformed(
        &self,
        info: &RequestInfo,
        message: &str,
        recorded: &str,
    ) -> Response<ProxyBody> {
        let answer = jsonrpc::error_response(None, code::PARSE_ERROR, message, None);
        self.record_request_error(
            info,
            Direction::ClientToServer,
            "block",
            json!({"error": recorded}),
            None,
        )
        .await;
        json_response(StatusCode::BAD_REQUEST, &answer, None)
    }

    /// Record a request that ended in an error of Airlock's own (`kind = "error"`): its method
    /// and path, and `detail`.
    async fn record_request_error(
        &self,
        info: &RequestInfo,
        direction: Direction,
        decision: &str,
        detail: Value,
        latency_us: Option<u64>,
    ) {
        let mut event = json!({"http_method": info.method.as_str(), "path": info.path});
        if let (Some(event), Value::Object(detail)) = (event.as_object_mut(), detail) {
            event.extend(detail);
        }
        let _ = self
            .pipeline
            .record_event(
                &self.ctx,
                direction,
                "error",
                decision,
                event,
                latency_us,
                info.mcp_session_id.clone(),
            )
            .await;
    }

    async fn refuse_http(
        &self,
        info: &RequestInfo,
        status: StatusCode,
        reason: String,
    ) -> Response<ProxyBody> {
        self.record_request_error(
            info,
            Direction::ClientToServer,
            "block",
            json!({"status": status.as_u16(), "error": reason}),
            None,
        )
        .await;
        text_response(status, reason)
    }

    async fn upstream_failed(&self, info: &RequestInfo, reason: String) -> Response<ProxyBody> {
        warn!(id = self.ctx.conn_id, backend = %self.ctx.backend, %reason, "upstream failed");
        self.record_request_error(
            info,
            Direction::ServerToClient,
            "allow",
            json!({"status": 502, "error": reason}),
            Some(info.started.elapsed().as_micros() as u64),
        )
        .await;
        text_response(
            StatusCode::BAD_GATEWAY,
            format!(
                "Airlock: cannot reach backend `{}`: {reason}",
                self.ctx.backend
            ),
        )
    }

    async fn response(
        &self,
        mut info: RequestInfo,
        response: Response<Incoming>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // The server assigned a session: what the connection-keyed exchange learnt moves to it.
        if let Some(sid) = parts
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            && info.mcp_session_id.as_deref() != Some(sid.as_str())
        {
            let new_key = self.session_key(Some(&sid), None);
            self.pipeline.sessions.rename(&info.key, &new_key);
            info.key = new_key;
            info.mcp_session_id = Some(sid);
        }
        if info.method == Method::DELETE && parts.status.is_success() {
            self.pipeline.sessions.end(&info.key);
        }
        let ct = content_type(&parts.headers);
        let identity = is_identity_encoding(&parts.headers);
        if ct == "text/event-stream" {
            if !identity {
                return self
                    .upstream_failed(
                        &info,
                        "the server compressed an event stream although Airlock asked for none"
                            .into(),
                    )
                    .await;
            }
            parts.headers.remove(header::CONTENT_LENGTH);
            let (tx, rx) = http_body_util::channel::Channel::<Bytes, BoxError>::new(4);
            let pipeline = self.pipeline.clone();
            let ctx = self.ctx.clone();
            let limits = self.limits;
            let http_status = parts.status.as_u16();
            self.http_record(&info, http_status, &ct).await;
            tokio::spawn(stream_events(pipeline, ctx, limits, body, tx, info));
            let mut r = Response::from_parts(parts, rx.boxed_unsync());
            r.headers_mut()
                .insert("x-accel-buffering", HeaderValue::from_static("no"));
            return r;
        }
        if ct == "application/json" {
            if !identity {
                return self
                    .upstream_failed(
                        &info,
                        "the server compressed a JSON body although Airlock asked for none".into(),
                    )
                    .await;
            }
            let bytes = match tokio::time::timeout(
                self.limits.stream_idle_timeout,
                Limited::new(body, self.limits.max_body).collect(),
            )
            .await
            {
                Ok(Ok(c)) => c.to_bytes(),
                Ok(Err(e)) => {
                    return self
                        .upstream_failed(
                            &info,
                            format!(
                                "reading the response body (limit {} bytes, `max_body_bytes`): {e}",
                                self.limits.max_body
                            ),
                        )
                        .await;
                }
                Err(_) => {
                    return self
                        .upstream_failed(&info, "the response body stalled".into())
                        .await;
                }
            };
            let out = match Body::parse(&bytes) {
                Ok(Some(mut parsed)) => {
                    let mut any_changed = false;
                    let raw = matches!(parsed, Body::Single(_)).then(|| bytes.clone());
                    for m in parsed.messages_mut() {
                        let value = std::mem::take(m);
                        match self
                            .pipeline
                            .process(
                                &self.ctx,
                                Msg {
                                    direction: Direction::ServerToClient,
                                    value,
                                    session: info.key.clone(),
                                    mcp_session_id: info.mcp_session_id.clone(),
                                    raw: raw.clone(),
                                },
                            )
                            .await
                        {
                            Ok(Outcome::Forward { value, changed, .. }) => {
                                any_changed |= changed;
                                *m = value;
                            }
                            Ok(Outcome::Answer(a)) => {
                                any_changed = true;
                                *m = a;
                            }
                            Err(e) => {
                                return self.upstream_failed(&info, format!("Airlock: {e}")).await;
                            }
                        }
                    }
                    if any_changed {
                        Bytes::from(parsed.to_bytes())
                    } else {
                        bytes
                    }
                }
                // (An empty body, e.g. a 202 that still names a JSON type, is not MCP.)
                Ok(None) | Err(_) if info.mcp && parts.status.is_success() && !bytes.is_empty() => {
                    return self
                        .upstream_failed(&info, "the server answered an MCP request with a JSON body that is not JSON-RPC".into())
                        .await;
                }
                _ => {
                    self.http_record(&info, parts.status.as_u16(), &ct).await;
                    bytes
                }
            };
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
            return Response::from_parts(parts, full(out));
        }
        // Not MCP content (202 Accepted, 404, a well-known document): passed through as it
        // streams, recorded at HTTP level.
        if !(info.mcp && parts.status == StatusCode::ACCEPTED) {
            self.http_record(&info, parts.status.as_u16(), &ct).await;
        }
        let idle = self.limits.stream_idle_timeout;
        let body = IdleBody::new(body, idle);
        Response::from_parts(parts, body.boxed_unsync())
    }

    /// An HTTP-level record: method, path, status, content type (never headers: they carry
    /// credentials).
    async fn http_record(&self, info: &RequestInfo, status: u16, ct: &str) {
        if let Err(e) = self
            .pipeline
            .record_event(
                &self.ctx,
                Direction::ServerToClient,
                "http",
                "allow",
                json!({"http_method": info.method.as_str(), "path": info.path, "status": status, "content_type": ct}),
                Some(info.started.elapsed().as_micros() as u64),
                info.mcp_session_id.clone(),
            )
            .await
        {
            warn!(id = self.ctx.conn_id, error = %e, "cannot record an HTTP exchange");
        }
    }
}

/// Read an upstream SSE body, put each event through the pipeline, send it on at once.
async fn stream_events(
    pipeline: Arc<Pipeline>,
    ctx: Arc<ConnCtx>,
    limits: Limits,
    mut body: Incoming,
    mut tx: http_body_util::channel::Sender<Bytes, BoxError>,
    info: RequestInfo,
) {
    let mut parser = sse::Parser::new(limits.max_sse_event);
    let mut key = info.key.clone();
    let mut events = Vec::new();
    let mut injected: Option<tokio::sync::mpsc::Receiver<Value>> = None;
    let mut registered: Option<SessionKey> = None;
    let end: Result<(), String> = loop {
        let next = async {
            match injected.as_mut() {
                Some(rx) => tokio::select! {
                    biased;
                    f = body.frame() => Ok(f),
                    Some(v) = rx.recv() => Err(v),
                },
                None => Ok(body.frame().await),
            }
        };
        let frame = match tokio::time::timeout(limits.stream_idle_timeout, next).await {
            Ok(Err(answer)) => {
                let bytes = sse::encode_event(Some("message"), &answer.to_string());
                if tx.send_data(Bytes::from(bytes)).await.is_err() {
                    break Ok(());
                }
                continue;
            }
            Ok(Ok(f)) => Ok(f),
            Err(e) => Err(e),
        };
        let frame = match frame {
            Err(_) => {
                break Err(format!(
                    "no event for {} s (`stream_idle_timeout_secs`)",
                    limits.stream_idle_timeout.as_secs()
                ));
            }
            Ok(None) => break Ok(()),
            Ok(Some(Err(e))) => break Err(format!("the server's stream: {e}")),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if let Err(e) = parser.feed(&data, &mut events) {
            break Err(e.to_string());
        }
        let mut out = Vec::new();
        for event in events.drain(..) {
            if event.event_type() == Some("endpoint")
                && let Some(sid) = event
                    .data()
                    .as_deref()
                    .and_then(legacy_session_from_endpoint)
            {
                key = SessionKey {
                    backend: ctx.backend.clone(),
                    id: format!("legacy:{sid}"),
                };
                let (stx, srx) = tokio::sync::mpsc::channel(16);
                if let Ok(mut m) = pipeline.legacy_streams.lock() {
                    m.insert(key.clone(), stx);
                    registered = Some(key.clone());
                }
                injected = Some(srx);
            }
            let data = event.data();
            let value = data
                .as_deref()
                .filter(|d| jsonrpc::looks_like_json(d.as_bytes()))
                .and_then(|d| serde_json::from_str::<Value>(d).ok())
                .filter(|v| jsonrpc::classify(v).is_some());
            let Some(value) = value else {
                out.extend_from_slice(&event.raw);
                continue;
            };
            match pipeline
                .process(
                    &ctx,
                    Msg {
                        direction: Direction::ServerToClient,
                        value,
                        session: key.clone(),
                        mcp_session_id: info.mcp_session_id.clone(),
                        raw: data.map(Bytes::from),
                    },
                )
                .await
            {
                Ok(Outcome::Forward { changed: false, .. }) => out.extend_from_slice(&event.raw),
                Ok(Outcome::Forward { value, .. }) | Ok(Outcome::Answer(value)) => {
                    out.extend_from_slice(&event.encode_with_data(&value.to_string()))
                }
                Err(e) => {
                    tx.abort(e.to_string().into());
                    return record_stream_end(&pipeline, &ctx, &info, Err(e.to_string())).await;
                }
            }
        }
        if !out.is_empty() && tx.send_data(Bytes::from(out)).await.is_err() {
            // The client went away: dropping the upstream body closes the server's stream.
            break Ok(());
        }
    };
    if let Some(k) = registered {
        // The legacy session lives as long as its `/sse` stream.
        if let Ok(mut m) = pipeline.legacy_streams.lock() {
            m.remove(&k);
        }
        pipeline.sessions.end(&k);
    }
    if let Err(reason) = &end {
        tx.abort(reason.clone().into());
    }
    if parser.pending_bytes() > 0 {
        debug!(
            id = ctx.conn_id,
            bytes = parser.pending_bytes(),
            "stream ended inside an event"
        );
    }
    record_stream_end(&pipeline, &ctx, &info, end).await
}

async fn record_stream_end(
    pipeline: &Pipeline,
    ctx: &ConnCtx,
    info: &RequestInfo,
    end: Result<(), String>,
) {
    if let Err(reason) = end {
        let _ = pipeline
            .record_event(
                ctx,
                Direction::ServerToClient,
                "error",
                "allow",
                json!({"http_method": info.method.as_str(), "path": info.path, "error": format!("event stream ended: {reason}")}),
                Some(info.started.elapsed().as_micros() as u64),
                info.mcp_session_id.clone(),
            )
            .await;
    }
}

/// A pass-through body that ends with an error when no frame arrives for `idle`.
struct IdleBody {
    inner: Incoming,
    idle: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl IdleBody {
    fn new(inner: Incoming, idle: Duration) -> IdleBody {
        IdleBody {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl hyper::body::Body for IdleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                let idle = this.idle;
                this.sleep
                    .as_mut()
                    .reset(tokio::time::Instant::now() + idle);
                Poll::Ready(r.map(|f| f.map_err(|e| Box::new(e) as BoxError)))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err("response body idle too long".into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
