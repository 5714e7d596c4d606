//! HTTP/1.1 on both sides of an intercepted MCP connection (hyper), and what Airlock lets
//! through it. For a `mode = "mcp"` backend every request and every response is in exactly one
//! of three classes, decided from the bytes Airlock parsed, never from what a peer declares:
//!
//! 1. **MCP**: JSON-RPC that Airlock parsed strictly (one message or a batch, every member
//!    valid) — each message goes through the [`Pipeline`] (policy, masking, record) and is
//!    forwarded or answered by Airlock;
//! 2. **allowed non-MCP**: a request matching the backend's `allow_http` (OAuth discovery by
//!    default) whose body no lenient server would read as JSON-RPC — forwarded as it streams,
//!    recorded at HTTP level;
//! 3. **anything else**: refused with an error the peer can read (a JSON-RPC error, a 4xx, a
//!    502 to the client, an SSE stream ended with an error), counted and recorded with the
//!    reason.
//!
//! Jobs, one file each: [`framing`] (where each request head begins and whether it parses,
//! sans-IO) and `client_io` (the client stream as hyper reads it, heads judged first),
//! [`request`] (upgrades, Host, body, charset, classification, the request's messages), [`head`]
//! (why a head is refused: its authority, its mirrored headers),
//! [`response`] (what a server may answer an MCP exchange with), [`events`] (SSE streams,
//! event by event), [`upstream`] (the server connection and the pool).
//!
//! Upstream requests never ask for compression (`Accept-Encoding: identity`), so what Airlock
//! inspects is what the client gets. Hop-by-hop headers are dropped both ways.

mod client_io;
mod events;
pub mod framing;
mod head;
mod request;
mod response;
mod upstream;

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

pub use request::{Class, classify};
pub use upstream::{
    Dial, PoolKey, UpstreamBody, UpstreamError, UpstreamPool, UpstreamSender, UpstreamSlot,
    UpstreamTls, client_handshake,
};

use crate::{
    archive::{RecordDecision, RecordKind},
    mcp::session::SessionKey,
    pipeline::{ConnCtx, Origin, Pipeline},
    policy::Direction,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Limits and timeouts of the HTTP layer (from `airlock.toml`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body: usize,
    pub max_sse_event: usize,
    pub header_read_timeout: Duration,
    pub stream_idle_timeout: Duration,
    /// A whole request body, a whole JSON response, one SSE event once started.
    pub body_read_timeout: Duration,
}

/// Everything one client connection's requests share.
pub struct Conn {
    pub ctx: Arc<ConnCtx>,
    pub pipeline: Arc<Pipeline>,
    pub limits: Limits,
    pub upstream: tokio::sync::Mutex<UpstreamSlot>,
    /// The backend this connection is for (chosen by the original destination and SNI).
    pub backend: Arc<crate::config::Backend>,
    /// Per-uid and parsing budgets, shared by every connection.
    pub resources: Arc<crate::limits::Limits>,
}

/// Serve HTTP/1.1 on an intercepted (decrypted) client stream until it closes. Every request
/// head is judged before hyper reads it ([`framing`]): a malformed one ends the connection
/// with Airlock's answer saying why (counted in `http_refused`, recorded).
pub async fn serve<S>(io: S, conn: Arc<Conn>) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::AsyncWriteExt as _;
    let limits = conn.limits;
    let exchanges = Arc::new(client_io::Exchanges::default());
    let io = client_io::CheckedIo::new(io, exchanges.clone());
    let served = conn.clone();
    let svc = hyper::service::service_fn(move |req| {
        let conn = served.clone();
        // Open until the answer's body is done: a refused head's answer waits for it.
        let guard = exchanges.begin();
        async move {
            let response = conn.handle(req).await;
            Ok::<_, Infallible>(response.map(|body| {
                ExchangeBody {
                    body,
                    _guard: guard,
                }
                .boxed_unsync()
            }))
        }
    });
    let parts = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(framing::MAX_HEAD)
        .keep_alive(true)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .without_shutdown()
        .await?;
    let mut io = parts.io.into_inner();
    if let Some(refused) = io.take_refused() {
        conn.refuse_head(&refused).await;
        let answer = refused.answer();
        let wrote = tokio::time::timeout(
            limits.header_read_timeout,
            io.inner_mut().write_all(&answer),
        )
        .await;
        if !matches!(wrote, Ok(Ok(()))) {
            tracing::debug!(
                id = conn.ctx.conn_id,
                "the client did not take Airlock's answer to its malformed request"
            );
        }
    }
    // The stream ends cleanly (a TLS close_notify), within the same bound.
    let _ = tokio::time::timeout(limits.header_read_timeout, io.inner_mut().shutdown()).await;
    Ok(())
}

/// An answer's body, keeping its exchange open until it is done or dropped.
struct ExchangeBody {
    body: ProxyBody,
    _guard: client_io::ExchangeGuard,
}

impl hyper::body::Body for ExchangeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
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
    "expect",
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

fn json_response(status: StatusCode, body: &Value) -> Response<ProxyBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(full(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn is_identity_encoding(h: &HeaderMap) -> bool {
    h.get_all(header::CONTENT_ENCODING).iter().all(|v| {
        v.to_str()
            .map(|s| s.trim().eq_ignore_ascii_case("identity"))
            .unwrap_or(false)
    })
}

/// The legacy transport names its session in the query (`session_id` in Python,
/// `sessionId` in TypeScript), read as the servers read it: percent-decoded (`session%5Fid`
/// too), and a UUID in any spelling Python's `UUID(hex=…)` takes (case, hyphens, braces,
/// `urn:uuid:`) as its 32 lowercase hex digits. Named more than once: `Err` (servers differ on
/// which one counts).
fn legacy_session(query: Option<&str>) -> Result<Option<String>, head::LegacySessionError> {
    let Some(query) = query else {
        return Ok(None);
    };
    let mut found: Option<String> = None;
    for kv in query.split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let key = form_decode(k);
        if key != "session_id" && key != "sessionId" {
            continue;
        }
        if found.is_some() {
            return Err(head::LegacySessionError::Repeated);
        }
        found = Some(canonical_session(&form_decode(v)));
    }
    Ok(found)
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space), lossy on bad UTF-8.
fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A session id as the servers compare it: a UUID (as Python's `UUID(hex=…)` reads one) as
/// 32 lowercase hex digits, anything else as written.
fn canonical_session(id: &str) -> String {
    let hex = id.replace("urn:", "").replace("uuid:", "");
    let hex = hex.trim_matches(|c| c == '{' || c == '}').replace('-', "");
    if hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex.to_ascii_lowercase()
    } else {
        id.to_owned()
    }
}

/// What a request was, for its response and its records.
struct RequestInfo {
    method: Method,
    path: String,
    key: SessionKey,
    mcp_session_id: Option<String>,
    started: Instant,
    /// The request carried MCP messages (its response must be MCP too).
    mcp: bool,
    /// Allowed non-MCP traffic (`allow_http`): the response passes as it streams.
    passthrough: bool,
    /// The one request of the body, for what its response stream carries.
    origin: Option<Origin>,
    /// Ids of the forwarded requests whose answers are still to come: answered with an
    /// error if their stream is refused. Those still here when the request's handling ends
    /// will not be answered: dropping the info gives their ids back to the session, so they
    /// hold neither their id nor their place in its bounds. (A 202 clears them: the legacy
    /// transport answers on its `/sse` stream.)
    owed: Vec<Value>,
    sessions: Arc<crate::mcp::session::Sessions>,
}

impl RequestInfo {
    /// Give back the ids of every request still owed (Airlock answers them, or nobody will);
    /// the ids.
    fn release_owed(&mut self) -> Vec<Value> {
        let owed = std::mem::take(&mut self.owed);
        for id in &owed {
            self.sessions
                .cancel(&self.key, true, &crate::mcp::jsonrpc::canonical_id(id));
        }
        owed
    }

    /// The info for a stream that now owes the answers (this one owes none).
    fn hand_over(&mut self) -> RequestInfo {
        RequestInfo {
            method: self.method.clone(),
            path: self.path.clone(),
            key: self.key.clone(),
            mcp_session_id: self.mcp_session_id.clone(),
            started: self.started,
            mcp: self.mcp,
            passthrough: self.passthrough,
            origin: self.origin.clone(),
            owed: std::mem::take(&mut self.owed),
            sessions: self.sessions.clone(),
        }
    }
}

impl Drop for RequestInfo {
    fn drop(&mut self) {
        self.release_owed();
    }
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

    /// Record something about an HTTP exchange that is not an MCP message (`kind` "http" or
    /// "error"): its method and path, and `detail`.
    async fn exchange_record(
        &self,
        info: &RequestInfo,
        (direction, kind, decision): (Direction, RecordKind, RecordDecision),
        detail: Value,
        latency_us: Option<u64>,
    ) -> Result<(), crate::pipeline::PipelineError> {
        let mut event = json!({"http_method": info.method.as_str(), "path": info.path});
        if let (Some(event), Value::Object(detail)) = (event.as_object_mut(), detail) {
            event.extend(detail);
        }
        self.pipeline
            .record_event(
                &self.ctx,
                direction,
                kind,
                decision,
                event,
                latency_us,
                info.mcp_session_id.clone(),
            )
            .await
    }

    /// Record an error of Airlock's own about a request (`kind = "error"`): its method and
    /// path, and `detail`.
    async fn record_request_error(
        &self,
        info: &RequestInfo,
        direction: Direction,
        decision: RecordDecision,
        detail: Value,
        latency_us: Option<u64>,
    ) {
        let kind = (direction, RecordKind::Error, decision);
        if let Err(e) = self.exchange_record(info, kind, detail, latency_us).await {
            warn!(id = self.ctx.conn_id, error = %e, "cannot record a refusal");
        }
    }

    /// Refuse a request with a plain-text HTTP error: recorded, counted, never forwarded.
    async fn refuse_http(
        &self,
        info: &RequestInfo,
        status: StatusCode,
        reason: String,
    ) -> Response<ProxyBody> {
        self.pipeline
            .counters
            .refused_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.record_refusal(info, status, &reason).await;
        text_response(status, reason)
    }

    /// A request head Airlock refused before hyper read it (malformed, or an HTTP/2
    /// preface): counted with the refused requests, recorded.
    async fn refuse_head(&self, refused: &framing::Malformed) {
        self.pipeline
            .counters
            .refused_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let detail = json!({
            "status": refused.status().as_u16(),
            "error": format!("malformed HTTP request: {refused}"),
        });
        if let Err(e) = self
            .pipeline
            .record_event(
                &self.ctx,
                Direction::ClientToServer,
                RecordKind::Error,
                RecordDecision::Block,
                detail,
                None,
                None,
            )
            .await
        {
            warn!(id = self.ctx.conn_id, error = %e, "cannot record a refusal");
        }
    }

    /// The record of a refused request: its status and the reason.
    async fn record_refusal(&self, info: &RequestInfo, status: StatusCode, reason: &str) {
        self.record_request_error(
            info,
            Direction::ClientToServer,
            RecordDecision::Block,
            json!({"status": status.as_u16(), "error": reason}),
            None,
        )
        .await;
    }

    /// The server could not be reached (connect, TLS, HTTP): the client gets a 502 naming the
    /// reason, and the archive a record.
    async fn upstream_failed(
        &self,
        info: &RequestInfo,
        reason: UpstreamError,
    ) -> Response<ProxyBody> {
        warn!(id = self.ctx.conn_id, backend = %self.ctx.backend, %reason, "upstream failed");
        let text = format!(
            "Airlock: cannot reach backend `{}`: {reason}",
            self.ctx.backend
        );
        self.bad_gateway(info, RecordDecision::Allow, reason.to_string(), text)
            .await
    }

    /// What the server answered cannot be passed on: the client gets a 502 naming the reason,
    /// the archive a record, the counter a tick.
    async fn refuse_answer(&self, info: &RequestInfo, reason: String) -> Response<ProxyBody> {
        warn!(id = self.ctx.conn_id, backend = %self.ctx.backend, %reason, "refused a server's answer");
        self.pipeline
            .counters
            .refused_answers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let text = format!(
            "Airlock: refused the answer of backend `{}`: {reason}",
            self.ctx.backend
        );
        self.bad_gateway(info, RecordDecision::Block, reason, text)
            .await
    }

    async fn bad_gateway(
        &self,
        info: &RequestInfo,
        decision: RecordDecision,
        reason: String,
        text: String,
    ) -> Response<ProxyBody> {
        self.record_request_error(
            info,
            Direction::ServerToClient,
            decision,
            json!({"status": 502, "error": reason}),
            Some(info.started.elapsed().as_micros() as u64),
        )
        .await;
        text_response(StatusCode::BAD_GATEWAY, text)
    }

    /// Why reading `what` failed, in words naming the setting; deadlines are counted.
    fn read_failed(&self, e: &ReadError, what: &str) -> String {
        match e {
            ReadError::TooLarge => format!(
                "{what} is larger than {} bytes (`max_body_bytes`)",
                self.limits.max_body
            ),
            ReadError::Timeout => {
                self.resources
                    .counters
                    .body_read_timeouts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!(
                    "{what} did not arrive within {} s (`body_read_timeout_secs`)",
                    self.limits.body_read_timeout.as_secs()
                )
            }
            ReadError::Limit(e) => e.to_string(),
            ReadError::Io(e) => format!("reading {what}: {e}"),
        }
    }

    /// An HTTP-level record: method, path, status, content type (never headers: they carry
    /// credentials). `Err` when it could not be written in group or strict recording: the caller must
    /// not forward.
    async fn http_record(
        &self,
        info: &RequestInfo,
        status: u16,
        ct: &str,
    ) -> Result<(), crate::pipeline::PipelineError> {
        self.exchange_record(
            info,
            (
                Direction::ServerToClient,
                RecordKind::Http,
                RecordDecision::Allow,
            ),
            json!({"status": status, "content_type": ct}),
            Some(info.started.elapsed().as_micros() as u64),
        )
        .await
    }
}

/// Each message a server sent (a JSON answer, one event's data) through the pipeline, in
/// `session`; the requests it answers leave `info.owed`. Whether any message changed. With a
/// `batch`, the records of forwarded messages are left there for the caller to write.
async fn judge_server_messages(
    pipeline: &Pipeline,
    ctx: &ConnCtx,
    session: &SessionKey,
    info: &mut RequestInfo,
    parsed: &mut crate::mcp::jsonrpc::Body,
    raw: Option<Bytes>,
    mut batch: Option<&mut Vec<crate::archive::RecordInput>>,
) -> Result<bool, crate::pipeline::PipelineError> {
    use crate::{mcp::jsonrpc, pipeline::Outcome};
    let mut changed_any = false;
    for m in parsed.messages_mut() {
        let value = std::mem::take(m);
        let id = jsonrpc::id_text(&value);
        let outcome = pipeline
            .process_into(
                ctx,
                crate::pipeline::Msg {
                    direction: Direction::ServerToClient,
                    value,
                    session: session.clone(),
                    mcp_session_id: info.mcp_session_id.clone(),
                    raw: raw.clone(),
                    origin: info.origin.clone(),
                },
                batch.as_deref_mut(),
            )
            .await?;
        match outcome {
            Outcome::Forward {
                value,
                changed,
                kind,
                ..
            } => {
                if matches!(kind, jsonrpc::Kind::Response | jsonrpc::Kind::Error)
                    && let Some(id) = &id
                {
                    info.owed.retain(|owed| jsonrpc::canonical_id(owed) != *id);
                }
                changed_any |= changed;
                *m = value;
            }
            Outcome::Answer(a) => {
                changed_any = true;
                *m = a;
            }
        }
    }
    Ok(changed_any)
}

/// A pass-through body that ends with an error when no frame arrives for `idle`.
struct IdleBody {
    inner: UpstreamBody,
    idle: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl IdleBody {
    fn new(inner: UpstreamBody, idle: Duration) -> IdleBody {
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

/// Read a whole body, at most `max` bytes, within `deadline`; every frame is charged to
/// `permit` first when one is given (a client's in-flight bytes).
async fn read_capped<B>(
    mut body: B,
    max: usize,
    deadline: tokio::time::Instant,
    mut permit: Option<&mut crate::limits::BodyPermit>,
) -> Result<Bytes, ReadError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if hyper::body::Body::size_hint(&body).lower() > max as u64 {
        return Err(ReadError::TooLarge);
    }
    let mut buf = bytes::BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ReadError::Timeout),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => return Err(ReadError::Io(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        // Trailers are dropped: nothing uninspected travels with a body.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > max {
            return Err(ReadError::TooLarge);
        }
        if let Some(p) = permit.as_deref_mut() {
            p.grow(data.len()).map_err(ReadError::Limit)?;
        }
        buf.extend_from_slice(&data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::session::{Pending, Reservation, Sessions};

    fn info(sessions: &Arc<Sessions>, key: &SessionKey, owed: &[Value]) -> RequestInfo {
        RequestInfo {
            method: Method::POST,
            path: "/mcp".into(),
            key: key.clone(),
            mcp_session_id: None,
            started: Instant::now(),
            mcp: true,
            passthrough: false,
            origin: None,
            owed: owed.to_vec(),
            sessions: sessions.clone(),
        }
    }

    fn take(sessions: &Sessions, key: &SessionKey, id: &str) -> bool {
        let pending = Pending {
            method: "tools/call".into(),
            tool: None,
            started: Instant::now(),
            uid: 0,
        };
        sessions
            .reserve(key, true, id.into(), pending)
            .map(Reservation::keep)
            .is_ok()
    }

    #[test]
    fn ids_still_owed_are_given_back_when_the_request_is_done_and_handed_over_ones_are_not() {
        let sessions = Arc::new(Sessions::new());
        let key = SessionKey {
            backend: "b".into(),
            id: "mcp:s".into(),
        };
        for id in ["1", "2", "\"s\""] {
            assert!(take(&sessions, &key, id));
        }
        // Answered requests left `owed`; the rest are freed with the info.
        drop(info(&sessions, &key, &[json!(1), json!("s")]));
        assert!(
            take(&sessions, &key, "1"),
            "a freed id is free to take again"
        );
        assert!(take(&sessions, &key, "\"s\""));
        // "2" was not owed by that info: still taken.
        assert!(!take(&sessions, &key, "2"));
        // Handed over to a stream: the stream owes them now, not the request.
        let mut request = info(&sessions, &key, &[json!(2)]);
        let stream = request.hand_over();
        drop(request);
        assert!(!take(&sessions, &key, "2"), "handed over, still owed");
        drop(stream);
        assert!(take(&sessions, &key, "2"));
    }

    #[test]
    fn legacy_sessions_are_read_as_servers_read_them() {
        let uuid = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            legacy_session(Some(&format!("session_id={uuid}"))),
            Ok(Some(uuid.into()))
        );
        for spelling in [
            "session_id=0123456789ABCDEF0123456789ABCDEF",
            "session%5Fid=0123456789abcdef0123456789abcdef",
            "session_id=%7B01234567-89ab-cdef-0123-456789abcdef%7D",
            "x=1&session_id=urn:uuid:01234567-89ab-cdef-0123-456789abcdef",
        ] {
            assert_eq!(
                legacy_session(Some(spelling)),
                Ok(Some(uuid.into())),
                "{spelling}"
            );
        }
        assert_eq!(
            legacy_session(Some("sessionId=abc+d")),
            Ok(Some("abc d".into()))
        );
        assert_eq!(legacy_session(Some("x=1")), Ok(None));
        assert!(legacy_session(Some("session_id=a&session%5Fid=b")).is_err());
        assert!(legacy_session(Some("session_id=a&sessionId=a")).is_err());
    }
}

#[derive(Debug)]
enum ReadError {
    TooLarge,
    Timeout,
    Io(String),
    Limit(crate::limits::LimitError),
}
