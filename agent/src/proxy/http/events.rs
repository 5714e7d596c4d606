//! A server's event stream (a POST's answer, a GET stream, the legacy `/sse` stream), event by
//! event: what the server has sent so far is parsed and judged event by event, its records
//! written together (one write), and re-emitted in one write to the client. The judging runs
//! as the client reads the answer, on its connection's task ([`Driven`]).
//!
//! What passes: events without data (priming, keep-alive), `message` events (or events
//! without a type) whose data Airlock parsed as JSON-RPC — one message or a batch — and the
//! legacy transport's `endpoint` event naming a path on the same server. Lines a client does
//! not read as fields are dropped; comments and event ids that carry a detected secret are
//! emptied or dropped (an id cannot be rewritten: clients send it back). Anything else ends
//! the stream: the requests the stream still owes an answer get a JSON-RPC error event and the
//! stream ends (or, owing nothing, is cut), and the archive has a record of why.
//!
//! Slow senders are bounded: no byte for `stream_idle_timeout_secs` ends the stream, and an
//! event must be complete within `body_read_timeout_secs` of its first byte.

use std::sync::{Arc, atomic::Ordering};

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{HeaderValue, Response, header};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tracing::debug;

use super::{BoxError, Conn, Limits, ProxyBody, RequestInfo, UpstreamBody};
use crate::{
    archive::{RecordDecision, RecordKind},
    mcp::{
        jsonrpc::{self, Body, Parsed, code},
        session::SessionKey,
        sse::{self, Event, Line},
        strict,
    },
    pipeline::{ConnCtx, Pipeline},
    policy::Direction,
};

/// Bytes of a stream taken in one pass when the server has sent them already.
const BATCH_BYTES: usize = 256 * 1024;

impl Conn {
    pub(super) async fn stream(
        &self,
        info: RequestInfo,
        mut parts: http::response::Parts,
        body: UpstreamBody,
    ) -> Response<ProxyBody> {
        let ct = parts
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        if let Err(e) = self.http_record(&info, parts.status.as_u16(), &ct).await {
            return self.unrecorded(&info, e).await;
        }
        parts.headers.remove(header::CONTENT_LENGTH);
        let (tx, rx) = http_body_util::channel::Channel::<Bytes, BoxError>::new(4);
        let job = Stream {
            pipeline: self.pipeline.clone(),
            ctx: self.ctx.clone(),
            limits: self.limits,
            resources: self.resources.clone(),
            backend: self.backend.clone(),
            key: info.key.clone(),
            info,
            injected: None,
            registered: None,
        };
        let body = Driven {
            job: Some(Box::pin(job.run(body, tx))),
            out: rx,
        };
        let mut r = Response::from_parts(parts, body.boxed_unsync());
        r.headers_mut()
            .insert("x-accel-buffering", HeaderValue::from_static("no"));
        r
    }
}

/// The client's side of a judged stream: the judging runs as this body is read, on the client
/// connection's task (no task of its own), and its output comes through a small channel. The
/// client going away drops the body, and the judging with it.
struct Driven {
    job: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
    out: http_body_util::channel::Channel<Bytes, BoxError>,
}

impl hyper::body::Body for Driven {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        if let Some(job) = self.job.as_mut()
            && job.as_mut().poll(cx).is_ready()
        {
            // Its sender is gone with it: the channel ends once drained.
            self.job = None;
        }
        std::pin::Pin::new(&mut self.out).poll_frame(cx)
    }
}

struct Stream {
    pipeline: Arc<Pipeline>,
    ctx: Arc<ConnCtx>,
    limits: Limits,
    resources: Arc<crate::limits::Limits>,
    backend: Arc<crate::config::Backend>,
    info: RequestInfo,
    /// The session the stream's messages belong to (the legacy `endpoint` event names it).
    key: SessionKey,
    /// Airlock's own answers to refused legacy POSTs, emitted on this stream.
    injected: Option<tokio::sync::mpsc::Receiver<Value>>,
    registered: Option<SessionKey>,
}

impl Stream {
    async fn run(
        mut self,
        mut body: UpstreamBody,
        mut tx: http_body_util::channel::Sender<Bytes, BoxError>,
    ) {
        let mut parser = sse::Parser::new(self.limits.max_sse_event);
        let mut events = Vec::new();
        // The event being read counts against the caller's in-flight bytes.
        let mut permit = self.resources.body(self.ctx.attribution.uid);
        // Set while the parser holds part of an event: it must be complete by then.
        let mut event_deadline: Option<tokio::time::Instant> = None;
        let end: Result<(), StreamError> = loop {
            let idle_until = tokio::time::Instant::now() + self.limits.stream_idle_timeout;
            let until = event_deadline.map_or(idle_until, |d| d.min(idle_until));
            let next = async {
                match self.injected.as_mut() {
                    Some(rx) => tokio::select! {
                        biased;
                        f = body.frame() => Ok(f),
                        Some(v) = rx.recv() => Err(v),
                    },
                    None => Ok(body.frame().await),
                }
            };
            let frame = match tokio::time::timeout_at(until, next).await {
                Ok(Err(answer)) => {
                    let bytes = sse::encode_event(Some("message"), &answer.to_string());
                    if tx.send_data(Bytes::from(bytes)).await.is_err() {
                        break Ok(());
                    }
                    continue;
                }
                Ok(Ok(f)) => f,
                Err(_) if event_deadline.is_some_and(|d| d <= tokio::time::Instant::now()) => {
                    self.resources
                        .counters
                        .sse_event_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    break Err(StreamError::EventTimeout(
                        self.limits.body_read_timeout.as_secs(),
                    ));
                }
                Err(_) => {
                    break Err(StreamError::Idle(self.limits.stream_idle_timeout.as_secs()));
                }
            };
            let frame = match frame {
                None => break Ok(()),
                Some(Err(e)) => break Err(StreamError::Server(e)),
                Some(Ok(f)) => f,
            };
            // Trailers are dropped: nothing uninspected reaches the client.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if let Err(e) = parser.feed(&data, &mut events) {
                break Err(e.into());
            }
            // Whatever else the server has already sent is taken now, without waiting: one
            // pass and one write to the client for all of it, not one per event (hyper yields
            // a frame per chunk, and servers often send a chunk per event).
            let mut ended = None;
            let mut taken = data.len();
            while taken < BATCH_BYTES && ended.is_none() {
                match body.frame().now_or_never() {
                    None => break,
                    Some(None) => ended = Some(Ok(())),
                    Some(Some(Err(e))) => ended = Some(Err(StreamError::Server(e))),
                    Some(Some(Ok(f))) => {
                        let Ok(data) = f.into_data() else {
                            continue;
                        };
                        taken += data.len();
                        if let Err(e) = parser.feed(&data, &mut events) {
                            ended = Some(Err(e.into()));
                        }
                    }
                }
            }
            if let Err(e) = permit.set(parser.pending_bytes()) {
                break Err(e.into());
            }
            event_deadline = match (parser.pending_bytes(), event_deadline) {
                (0, _) => None,
                (_, Some(d)) if events.is_empty() => Some(d),
                _ => Some(tokio::time::Instant::now() + self.limits.body_read_timeout),
            };
            // Judged together, recorded together (one write), then sent together.
            let mut out = Vec::new();
            let mut refused = None;
            let mut records = Vec::new();
            for event in events.drain(..) {
                match self.event(event, &mut records).await {
                    Ok(bytes) => out.extend_from_slice(&bytes),
                    Err(reason) => {
                        refused = Some(reason);
                        break;
                    }
                }
            }
            if let Err(e) = self.pipeline.record_batch(&mut records).await {
                // Unrecorded: none of it is sent.
                break Err(e.into());
            }
            if !out.is_empty() && tx.send_data(Bytes::from(out)).await.is_err() {
                // The client went away: dropping the upstream body closes the server's stream.
                break Ok(());
            }
            if let Some(reason) = refused {
                break Err(reason);
            }
            if let Some(end) = ended {
                break end;
            }
        };
        self.unregister();
        if parser.pending_bytes() > 0 {
            debug!(
                id = self.ctx.conn_id,
                bytes = parser.pending_bytes(),
                "stream ended inside an event"
            );
        }
        if let Err(reason) = end {
            self.refused(reason, tx).await;
        }
    }

    /// The stream was refused: the record of why, then the requests it still owes get an
    /// error the client can read, and the stream is cut. The record comes first: once the
    /// client's side is cut, nothing reads this body (and so runs this job) any more.
    async fn refused(
        &mut self,
        reason: StreamError,
        mut tx: http_body_util::channel::Sender<Bytes, BoxError>,
    ) {
        let _ = self
            .pipeline
            .record_event(
                &self.ctx,
                Direction::ServerToClient,
                RecordKind::Error,
                RecordDecision::Block,
                json!({"http_method": self.info.method.as_str(), "path": self.info.path, "error": format!("event stream ended: {reason}")}),
                Some(self.info.started.elapsed().as_micros() as u64),
                self.info.mcp_session_id.clone(),
            )
            .await;
        let mut errors = Vec::new();
        // Airlock answers them: their ids are free.
        for id in self.info.release_owed() {
            let answer = jsonrpc::error_response(
                Some(&id),
                code::UNAVAILABLE,
                &format!("Airlock: the server's event stream was refused: {reason}"),
                None,
            );
            errors.extend_from_slice(&sse::encode_event(Some("message"), &answer.to_string()));
        }
        if errors.is_empty() {
            // Nothing owed: the client learns of the refusal from a cut stream.
            tx.abort(reason.to_string().into());
        } else {
            // The owed answers are the stream's last events; it then ends.
            let _ = tx.send_data(Bytes::from(errors)).await;
        }
    }

    /// The legacy session lives as long as its `/sse` stream.
    fn unregister(&mut self) {
        if let Some(k) = self.registered.take() {
            if let Ok(mut m) = self.pipeline.legacy_streams.lock() {
                m.remove(&k);
            }
            self.pipeline.sessions.end(&k);
        }
    }

    /// Judge one event: the bytes to send on, or why the stream must end.
    async fn event(
        &mut self,
        event: Event,
        records: &mut Vec<crate::archive::RecordInput>,
    ) -> Result<Vec<u8>, StreamError> {
        let mut lines = Vec::with_capacity(event.lines.len());
        // Characters some SSE parsers take for line ends (httpx-sse 0.4.0 splits like
        // `str.splitlines`): an event holding one is re-encoded without them.
        let mut as_received = !has_line_breaker(&event.raw);
        for line in &event.lines {
            match line {
                Line::Comment(c) | Line::Field { value: c, .. }
                    if !matches!(line, Line::Field { name, .. } if name == "data")
                        && has_line_breaker(c.as_bytes()) =>
                {
                    as_received = false;
                }
                Line::Comment(c) if !c.is_empty() && self.masks(c) => {
                    lines.push(Line::Comment(String::new()));
                    as_received = false;
                }
                Line::Comment(_) => lines.push(line.clone()),
                Line::Field { name, value } => match name.as_str() {
                    "data" | "event" => lines.push(line.clone()),
                    "id" if !self.masks(value) => lines.push(line.clone()),
                    "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                        lines.push(line.clone())
                    }
                    // A detected secret in an id, a malformed retry, a field clients ignore.
                    _ => as_received = false,
                },
            }
        }
        let data = event.data();
        let kind = event.event_type().unwrap_or("message");
        let new_data = match data.as_deref() {
            None | Some("") => None,
            Some(d) if kind == "message" => self.messages(d, records).await?,
            Some(d) if kind == "endpoint" && !has_line_breaker(d.as_bytes()) => {
                self.endpoint(d)?;
                None
            }
            Some(_) => {
                return Err(StreamError::DataInEvent(kind.to_owned()));
            }
        };
        if as_received && new_data.is_none() {
            return Ok(event.raw);
        }
        let rebuilt = Event {
            lines,
            raw: Vec::new(),
        };
        Ok(rebuilt.encode(new_data.as_deref().or(data.as_deref())))
    }

    /// Whether masking would change `text` (a comment or an event id).
    fn masks(&self, text: &str) -> bool {
        self.pipeline
            .mask_str(&self.ctx, Direction::ServerToClient, text)
            .is_some()
    }

    /// The data of a `message` event: JSON-RPC, every message through the pipeline. The new
    /// data when a message changed.
    async fn messages(
        &mut self,
        data: &str,
        records: &mut Vec<crate::archive::RecordInput>,
    ) -> Result<Option<String>, StreamError> {
        let _permit = self.resources.parse(
            self.ctx.attribution.uid,
            strict::parsed_size_estimate(data.as_bytes()),
        )?;
        let mut parsed = match Body::parse(data.as_bytes()) {
            Ok(Parsed::Messages(b)) => b,
            Ok(Parsed::Other(_)) => return Err(StreamError::NotJsonRpc),
            Err(e) => return Err(StreamError::BadData(e)),
        };
        let single = matches!(parsed, Body::Single(_));
        let raw = single.then(|| Bytes::copy_from_slice(data.as_bytes()));
        let judged = super::judge_server_messages(
            &self.pipeline,
            &self.ctx,
            &self.key,
            &mut self.info,
            &mut parsed,
            raw,
            Some(records),
        )
        .await?;
        // Data holding characters some parsers split lines at is always re-encoded.
        let changed_any = judged || has_line_breaker(data.as_bytes());
        Ok(changed_any.then(|| escape_line_breakers(&String::from_utf8_lossy(&parsed.to_bytes()))))
    }

    /// The legacy transport's `endpoint` event: where the client is to POST. It must name a
    /// path on this server (the clients' POSTs would otherwise go where Airlock does not look),
    /// and it names the session.
    fn endpoint(&mut self, data: &str) -> Result<(), StreamError> {
        if !super::response::same_server(data, &self.backend) {
            return Err(StreamError::ForeignEndpoint(data.to_owned()));
        }
        let path = match data.parse::<http::Uri>() {
            Ok(uri) if uri.host().is_some() => uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            _ => data.to_owned(),
        };
        let sid = super::legacy_session(path.split_once('?').map(|(_, q)| q))?;
        if let Some(sid) = sid {
            let key = SessionKey {
                backend: self.ctx.backend.clone(),
                id: format!("legacy:{sid}"),
            };
            let (stx, srx) = tokio::sync::mpsc::channel(16);
            if let Ok(mut m) = self.pipeline.legacy_streams.lock() {
                // One session per stream: an earlier `endpoint` of this stream is replaced.
                if let Some(old) = self.registered.take() {
                    m.remove(&old);
                }
                m.insert(key.clone(), stx);
                self.registered = Some(key.clone());
            }
            self.injected = Some(srx);
            self.key = key;
            // The stream's records name the legacy session, as its POSTs' records do.
            self.info.mcp_session_id = Some(sid);
        }
        Ok(())
    }
}

impl Drop for Stream {
    /// A stream dropped unfinished (its client went away) still ends its legacy session.
    fn drop(&mut self) {
        self.unregister();
    }
}

/// Why a server's event stream is cut (the requests it owes are answered with the reason).
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("an event took longer than {0} s to arrive (`body_read_timeout_secs`)")]
    EventTimeout(u64),
    #[error("no event for {0} s (`stream_idle_timeout_secs`)")]
    Idle(u64),
    #[error("the server's stream: {0}")]
    Server(#[source] hyper::Error),
    #[error(transparent)]
    Sse(#[from] sse::SseError),
    /// The caller's in-flight bytes or parsing budget.
    #[error(transparent)]
    Limit(#[from] crate::limits::LimitError),
    #[error("an event of type `{0}` carries data: only JSON-RPC `message` events are passed on")]
    DataInEvent(String),
    #[error("an event's data is JSON but not a JSON-RPC message")]
    NotJsonRpc,
    #[error("an event's data is {0}")]
    BadData(jsonrpc::BodyError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error("the `endpoint` event sends the client to {0:?}, not to this server")]
    ForeignEndpoint(String),
    #[error(transparent)]
    LegacySession(#[from] super::head::LegacySessionError),
}

/// Whether `bytes` hold a character that `str.splitlines`-style SSE parsers take for a line
/// end though the SSE standard does not: VT, FF, FS, GS, RS, NEL, LINE and PARAGRAPH
/// SEPARATOR.
///
/// One pass over the bytes (it runs on every event's bytes and data).
fn has_line_breaker(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(i, b)| match b {
        0x0b | 0x0c | 0x1c..=0x1e => true,
        0xC2 => bytes.get(i + 1) == Some(&0x85),
        0xE2 => matches!(bytes.get(i + 1..i + 3), Some([0x80, 0xA8 | 0xA9])),
        _ => false,
    })
}

/// Compact JSON with NEL, LINE and PARAGRAPH SEPARATOR written as escapes (they can only be
/// inside strings there; control characters are escaped by serde_json already).
fn escape_line_breakers(json: &str) -> String {
    json.replace('\u{85}', "\\u0085")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breakers_are_found_and_escaped() {
        assert!(has_line_breaker(":x\u{2028}data: {}".as_bytes()));
        assert!(has_line_breaker(b"a\x0cb"));
        assert!(has_line_breaker("\u{85}".as_bytes()));
        assert!(!has_line_breaker("plain é text".as_bytes()));
        assert!(has_line_breaker("\u{2029}".as_bytes()));
        assert!(!has_line_breaker("\u{2027}\u{2030}".as_bytes()));
        assert!(!has_line_breaker(&[0xE2, 0x80]));
        assert!(!has_line_breaker(&[0xC2]));
        let v = serde_json::json!({"t": "a\u{2028}b\u{85}c\u{2029}\u{c}"});
        let escaped = escape_line_breakers(&v.to_string());
        assert!(!has_line_breaker(escaped.as_bytes()), "{escaped}");
        assert_eq!(serde_json::from_str::<Value>(&escaped).unwrap(), v);
    }
}
