//! What a server may answer an MCP exchange with, decided from what Airlock parsed:
//!
//! - a status below 400 (the Python SDK parses 201, 299 and redirects alike) with no body, or
//!   `application/json` (by parsed media type, UTF-8) whose body is JSON-RPC — every message
//!   through the pipeline — or `text/event-stream` (UTF-8), event by event, see
//!   [`super::events`]; a redirect only to this same server (clients follow redirects, and a
//!   request sent elsewhere would leave unmasked);
//! - a 4xx/5xx with an error body: JSON-RPC through the pipeline, other JSON or text masked
//!   with every mask rule, then passed on (OAuth's 401 and its `WWW-Authenticate` still work).
//!
//! Whatever the status, a body goes on only under a `Content-Type` Airlock parsed whose
//! charset, in every notation clients read (`charset=`, `charset*=`, sections), is UTF-8 or
//! absent ([`media`]): a success answer under any other is refused (502), an error answer
//! keeps its status and headers and gets Airlock's reason as its body.
//!
//! Anything else — another content type, a compressed body, JSON that is not JSON-RPC, a body
//! a lenient client would read as JSON that Airlock cannot parse — is not passed on: the
//! client gets a 502 naming the reason, and the archive a record.
//!
//! The class of an answer is decided from its head alone, sans-IO ([`classify`]: status,
//! headers, the kind of request); [`Conn::response`] does the reading and writing it calls for.

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use serde_json::json;

use super::{
    Conn, IdleBody, ProxyBody, RequestInfo, UpstreamBody, full, is_identity_encoding,
    judge_server_messages, read_capped, strip_hop_by_hop, text_response,
};
use crate::{
    archive::{RecordDecision, RecordKind},
    mcp::{
        jsonrpc::{Body, BodyError, Parsed},
        media, strict,
    },
    pipeline::PipelineError,
    policy::Direction,
};

impl Conn {
    /// The answer to `info`'s request, judged. Requests of the body that the answer did not
    /// answer (an error with id null, a refusal) are forgotten: they will not be answered,
    /// and must not hold their id or their place in the bounds. A stream, or a 202 (the
    /// legacy transport answers on its `/sse` stream), answers later: those stay.
    pub(super) async fn response(
        &self,
        mut info: RequestInfo,
        response: Response<UpstreamBody>,
    ) -> Response<ProxyBody> {
        // `info` still owes: dropped here, it gives their ids back.
        self.answer(&mut info, response).await
    }

    async fn answer(
        &self,
        info: &mut RequestInfo,
        response: Response<UpstreamBody>,
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
        let ct_text = parts
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let asked = Asked {
            passthrough: info.passthrough,
            head: info.method == Method::HEAD,
        };
        let empty = hyper::body::Body::size_hint(&body).exact() == Some(0);
        let class = classify(parts.status, &parts.headers, asked, &self.backend, empty);
        if parts.status == StatusCode::ACCEPTED && class != AnswerClass::Passthrough {
            // Accepted: the answers come later, on another stream (the legacy transport).
            info.owed.clear();
        }
        let kind = match class {
            AnswerClass::Passthrough => {
                // Allowed non-MCP traffic: passed on as it streams, recorded at HTTP level.
                if let Err(e) = self
                    .http_record(info, parts.status.as_u16(), &ct_text)
                    .await
                {
                    return self.unrecorded(info, e).await;
                }
                let body = IdleBody::new(body, self.limits.stream_idle_timeout);
                return Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(body));
            }
            AnswerClass::NoBody => {
                if let Err(e) = self
                    .http_record(info, parts.status.as_u16(), &ct_text)
                    .await
                {
                    return self.unrecorded(info, e).await;
                }
                return Response::from_parts(parts, full(Bytes::new()));
            }
            AnswerClass::AcceptedDrained => {
                // No client reads the body of a 202 ("Accepted"): it is read (bounded) and
                // dropped, never passed on uninspected.
                let deadline = tokio::time::Instant::now() + self.limits.body_read_timeout;
                if let Err(e) = read_capped(body, self.limits.max_body, deadline, None).await {
                    tracing::debug!(id = self.ctx.conn_id, error = ?e, "the body of a 202 was not read whole");
                }
                if let Err(e) = self
                    .http_record(info, parts.status.as_u16(), &ct_text)
                    .await
                {
                    return self.unrecorded(info, e).await;
                }
                parts.headers.remove(header::CONTENT_TYPE);
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
                return Response::from_parts(parts, full(Bytes::new()));
            }
            AnswerClass::Refused(reason) => return self.refuse_answer(info, reason).await,
            AnswerClass::WithholdErrorBody(e) => {
                return self.withhold_error_body(info, parts, e).await;
            }
            AnswerClass::Stream => return self.stream(info.hand_over(), parts, body).await,
            AnswerClass::Read(kind) => kind,
        };
        // Below 400, clients parse the body as MCP; from 400 on, as an error to show.
        let success = parts.status.as_u16() < 400;
        let deadline = tokio::time::Instant::now() + self.limits.body_read_timeout;
        // The answer's bytes count against the caller's in-flight bytes while they are read.
        let mut permit = self.resources.body(self.ctx.attribution.uid);
        let bytes = match read_capped(body, self.limits.max_body, deadline, Some(&mut permit)).await
        {
            Ok(b) => b,
            Err(e) => {
                let reason = self.read_failed(&e, "its answer");
                return self.refuse_answer(info, reason).await;
            }
        };
        if bytes.is_empty() {
            if let Err(e) = self
                .http_record(info, parts.status.as_u16(), &ct_text)
                .await
            {
                return self.unrecorded(info, e).await;
            }
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            return Response::from_parts(parts, full(bytes));
        }
        if success && kind != BodyKind::Json {
            return self
                .refuse_answer(
                    info,
                    format!(
                        "it answered an MCP request with content type {:?}: only application/json and text/event-stream (UTF-8) are passed on",
                        ct_text
                    ),
                )
                .await;
        }
        let estimate = strict::parsed_size_estimate(&bytes);
        let _parse_permit = match self.resources.parse(self.ctx.attribution.uid, estimate) {
            Ok(p) => p,
            Err(e) => return self.refuse_answer(info, e.to_string()).await,
        };
        let out = match Body::parse(&bytes) {
            Ok(Parsed::Messages(parsed)) => {
                match self.answer_messages(info, parsed, &bytes).await {
                    Ok(out) => out,
                    Err(e) => return self.refuse_answer(info, e.to_string()).await,
                }
            }
            Ok(Parsed::Other(mut value)) if !success => {
                // An error document (OAuth's `{"error": "invalid_token"}`): masked whole.
                let masked =
                    self.pipeline
                        .mask_value(&self.ctx, Direction::ServerToClient, &mut value);
                if let Err(e) = self
                    .error_record(info, parts.status.as_u16(), &ct_text, masked)
                    .await
                {
                    return self.unrecorded(info, e).await;
                }
                if masked > 0 {
                    Bytes::from(value.to_string())
                } else {
                    bytes
                }
            }
            Ok(Parsed::Other(_)) => {
                return self
                    .refuse_answer(
                        info,
                        "it answered an MCP request with JSON that is not JSON-RPC".into(),
                    )
                    .await;
            }
            Err(BodyError::Json(_))
                if !success && !strict::looks_like_json(&bytes) && kind == BodyKind::Other =>
            {
                // An error text ("Not Found"): masked, passed on.
                let Ok(text) = std::str::from_utf8(&bytes) else {
                    return self
                        .refuse_answer(info, "its error answer is not UTF-8 text".into())
                        .await;
                };
                let masked = self
                    .pipeline
                    .mask_str(&self.ctx, Direction::ServerToClient, text);
                if let Err(e) = self
                    .error_record(
                        info,
                        parts.status.as_u16(),
                        &ct_text,
                        u32::from(masked.is_some()),
                    )
                    .await
                {
                    return self.unrecorded(info, e).await;
                }
                masked.map(Bytes::from).unwrap_or(bytes)
            }
            Err(e) => {
                return self.refuse_answer(info, format!("its answer is {e}")).await;
            }
        };
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
        Response::from_parts(parts, full(out))
    }

    /// Each message of a JSON answer through the pipeline; the body to send (the original
    /// bytes when nothing changed).
    async fn answer_messages(
        &self,
        info: &mut RequestInfo,
        mut parsed: Body,
        bytes: &Bytes,
    ) -> Result<Bytes, PipelineError> {
        let raw = matches!(parsed, Body::Single(_)).then(|| bytes.clone());
        let key = info.key.clone();
        let changed = judge_server_messages(
            &self.pipeline,
            &self.ctx,
            &key,
            info,
            &mut parsed,
            raw,
            None,
        )
        .await?;
        Ok(if changed {
            Bytes::from(parsed.to_bytes())
        } else {
            bytes.clone()
        })
    }

    /// An error answer (4xx/5xx) whose body the client would decode as something else than
    /// UTF-8 (or that Airlock cannot read the media type of): its status and headers go on
    /// (a 401 still starts OAuth), its body is replaced by Airlock's reason. Counted and
    /// recorded like a refused answer.
    async fn withhold_error_body(
        &self,
        info: &RequestInfo,
        mut parts: http::response::Parts,
        e: media::MediaError,
    ) -> Response<ProxyBody> {
        let reason = format!("its {} answer has {e}", parts.status.as_u16());
        tracing::warn!(id = self.ctx.conn_id, backend = %self.ctx.backend, %reason, "withheld the body of an error answer");
        self.pipeline
            .counters
            .refused_answers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.record_request_error(
            info,
            Direction::ServerToClient,
            RecordDecision::Block,
            json!({"status": parts.status.as_u16(), "error": reason}),
            Some(info.started.elapsed().as_micros() as u64),
        )
        .await;
        let text = format!(
            "Airlock: withheld the body of backend `{}`'s answer: {reason}\n",
            self.ctx.backend
        );
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
        Response::from_parts(parts, full(text))
    }

    /// The record of a non-MCP error answer: status, content type, how many values were
    /// masked.
    async fn error_record(
        &self,
        info: &RequestInfo,
        status: u16,
        ct: &str,
        masked: u32,
    ) -> Result<(), PipelineError> {
        let decision = if masked > 0 {
            RecordDecision::Mask
        } else {
            RecordDecision::Allow
        };
        self.exchange_record(
            info,
            (Direction::ServerToClient, RecordKind::Http, decision),
            json!({"status": status, "content_type": ct, "masked_values": masked}),
            Some(info.started.elapsed().as_micros() as u64),
        )
        .await
    }

    /// An exchange whose record could not be written (group or strict recording): not passed on.
    pub(super) async fn unrecorded(
        &self,
        info: &RequestInfo,
        e: PipelineError,
    ) -> Response<ProxyBody> {
        tracing::warn!(id = self.ctx.conn_id, error = %e, path = %info.path, "refusing an exchange the archive cannot record");
        text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Airlock: {e}; nothing was passed on"),
        )
    }
}

/// Whether a URL a server gives the client (a redirect's `Location`, the legacy `endpoint`)
/// stays on this server: a path, or a URL with the backend's scheme, host and port. URL
/// parsers read a backslash as a slash (`/\\evil.example` is another host) and strip spaces
/// and controls: such a URL never counts as a path.
pub(super) fn same_server(url: &str, backend: &crate::config::Backend) -> bool {
    if url.contains('\\') || url.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return false;
    }
    if url.starts_with('/') && !url.starts_with("//") {
        return true;
    }
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let scheme_ok = uri.scheme_str() == Some(if backend.tls { "https" } else { "http" });
    let port = uri.port_u16().unwrap_or(if backend.tls { 443 } else { 80 });
    scheme_ok
        && port == backend.port
        && uri.host().is_some_and(|h| {
            h.trim_end_matches('.')
                .eq_ignore_ascii_case(backend.host.trim_end_matches('.'))
        })
}

/// The request an answer is for, as far as the answer's class goes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Asked {
    /// Allowed non-MCP traffic (passed on as it streams).
    pub passthrough: bool,
    /// A `HEAD` request: its answer has no body whatever its headers say.
    pub head: bool,
}

/// What Airlock does with a server's answer, decided from its head alone ([`classify`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AnswerClass {
    /// Allowed non-MCP traffic: passed on as it streams, recorded at HTTP level.
    Passthrough,
    /// No body (204, 304, an answer to `HEAD`): the status and headers go on.
    NoBody,
    /// A 202 with a body no client reads: read (bounded) and dropped.
    AcceptedDrained,
    /// Not passed on: the client gets a 502 with this reason.
    Refused(String),
    /// An error answer whose body the client would not decode as UTF-8 (or whose media type
    /// Airlock cannot read): its status and headers go on, its body is Airlock's reason.
    WithholdErrorBody(media::MediaError),
    /// A success answer as an event stream: judged event by event.
    Stream,
    /// A body to read whole, then judge as its media type says.
    Read(BodyKind),
}

/// The media type of a body read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BodyKind {
    /// `application/json`: JSON-RPC through the pipeline (an error answer's other JSON,
    /// masked whole).
    Json,
    /// `text/event-stream` of an error answer, read whole like JSON.
    EventStream,
    /// Another type that names JSON or an event stream (`application/problem+json`): never
    /// taken for plain error text.
    JsonLike,
    /// Anything else, or none: a success answer's body is refused, an error answer's text is
    /// masked and passed on.
    Other,
}

/// The class of an answer with `status` and `headers` to a request `asked`, from `backend`;
/// `empty` when the body is known to be empty. Sans-IO: what the answer's I/O then does
/// follows from it.
pub(super) fn classify(
    status: StatusCode,
    headers: &http::HeaderMap,
    asked: Asked,
    backend: &crate::config::Backend,
    empty: bool,
) -> AnswerClass {
    if asked.passthrough {
        return AnswerClass::Passthrough;
    }
    let no_body = matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED) || asked.head;
    if no_body {
        return AnswerClass::NoBody;
    }
    if status == StatusCode::ACCEPTED {
        return AnswerClass::AcceptedDrained;
    }
    if !is_identity_encoding(headers) {
        return AnswerClass::Refused(
            "the server compressed its answer although Airlock asked for none".into(),
        );
    }
    if status.is_informational() {
        // An unasked-for protocol switch (101) would hand the connection to bytes Airlock
        // does not read.
        return AnswerClass::Refused(format!(
            "it answered {status} (a protocol switch nobody asked for)"
        ));
    }
    if status.is_redirection()
        && let Some(location) = headers.get(header::LOCATION)
        && !location.to_str().is_ok_and(|l| same_server(l, backend))
    {
        return AnswerClass::Refused(format!(
            "it redirects the client to {:?}, another server (the request would leave uninspected)",
            String::from_utf8_lossy(location.as_bytes())
        ));
    }
    // Below 400, clients parse the body as MCP; from 400 on, as an error to show.
    let success = status.as_u16() < 400;
    // What the client will decode the body as: one media type, no charset but UTF-8 in any
    // notation its header parser reads (`charset*=utf-8''utf-7` is UTF-7 to httpx).
    let ct = match media::utf8_content_type(headers) {
        Ok(ct) => ct,
        Err(e) if empty => {
            // No byte to decode: the status and headers go on as they are.
            tracing::debug!(error = %e, "an empty answer's Content-Type");
            None
        }
        Err(e) if success => return AnswerClass::Refused(format!("its answer has {e}")),
        Err(e) => return AnswerClass::WithholdErrorBody(e),
    };
    let kind = match ct.as_ref().map(|m| m.essence.as_str()) {
        Some("application/json") => BodyKind::Json,
        Some("text/event-stream") => BodyKind::EventStream,
        Some(e) if e.contains("json") || e.contains("event-stream") => BodyKind::JsonLike,
        _ => BodyKind::Other,
    };
    if success && kind == BodyKind::EventStream {
        return AnswerClass::Stream;
    }
    AnswerClass::Read(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The class of an answer with `status` and `headers` to an MCP POST.
    fn class_of(status: u16, headers: &[(&str, &str)], empty: bool) -> AnswerClass {
        let mut b = crate::fuzzing::mcp_backend(&[]);
        b.host = "mcp.test".into();
        b.port = 8443;
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let asked = Asked {
            passthrough: false,
            head: false,
        };
        classify(
            StatusCode::from_u16(status).unwrap(),
            &map,
            asked,
            &b,
            empty,
        )
    }

    const JSON: (&str, &str) = ("content-type", "application/json");
    const SSE: (&str, &str) = ("content-type", "text/event-stream; charset=utf-8");

    #[test]
    fn success_answers_are_json_read_whole_or_streams() {
        assert_eq!(
            class_of(200, &[JSON], false),
            AnswerClass::Read(BodyKind::Json)
        );
        assert_eq!(
            class_of(201, &[JSON], false),
            AnswerClass::Read(BodyKind::Json)
        );
        assert_eq!(class_of(200, &[SSE], false), AnswerClass::Stream);
        // Another type: read, then refused unless empty (the caller decides on the bytes).
        assert_eq!(
            class_of(200, &[("content-type", "text/html")], false),
            AnswerClass::Read(BodyKind::Other)
        );
        assert_eq!(
            class_of(200, &[], false),
            AnswerClass::Read(BodyKind::Other)
        );
    }

    #[test]
    fn bodiless_and_accepted_answers() {
        assert_eq!(class_of(204, &[JSON], false), AnswerClass::NoBody);
        assert_eq!(class_of(304, &[], false), AnswerClass::NoBody);
        assert_eq!(class_of(202, &[JSON], false), AnswerClass::AcceptedDrained);
        let mut b = crate::fuzzing::mcp_backend(&[]);
        b.host = "mcp.test".into();
        let head = Asked {
            passthrough: false,
            head: true,
        };
        let json = http::HeaderMap::from_iter([(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )]);
        assert_eq!(
            classify(StatusCode::OK, &json, head, &b, false),
            AnswerClass::NoBody
        );
        let through = Asked {
            passthrough: true,
            head: false,
        };
        assert_eq!(
            classify(StatusCode::OK, &json, through, &b, false),
            AnswerClass::Passthrough
        );
    }

    #[test]
    fn compressed_switching_and_redirected_elsewhere_answers_are_refused() {
        let refused = |c: AnswerClass| matches!(c, AnswerClass::Refused(_));
        assert!(refused(class_of(
            200,
            &[JSON, ("content-encoding", "gzip")],
            false
        )));
        assert_eq!(
            class_of(200, &[JSON, ("content-encoding", "identity")], false),
            AnswerClass::Read(BodyKind::Json)
        );
        assert!(refused(class_of(101, &[("upgrade", "websocket")], false)));
        assert!(refused(class_of(
            307,
            &[("location", "https://evil.example:8443/mcp")],
            false
        )));
        assert_eq!(
            class_of(307, &[("location", "/mcp/")], false),
            AnswerClass::Read(BodyKind::Other)
        );
    }

    #[test]
    fn a_charset_other_than_utf8_refuses_a_success_and_withholds_an_error_body() {
        let latin1 = ("content-type", "application/json; charset=latin1");
        assert!(matches!(
            class_of(200, &[latin1], false),
            AnswerClass::Refused(r) if r.contains("charset") || r.contains("UTF-8")
        ));
        assert!(matches!(
            class_of(401, &[latin1], false),
            AnswerClass::WithholdErrorBody(_)
        ));
        // No byte to decode: its type does not matter.
        assert_eq!(
            class_of(200, &[latin1], true),
            AnswerClass::Read(BodyKind::Other)
        );
    }

    #[test]
    fn error_answers_are_read_by_kind() {
        assert_eq!(
            class_of(401, &[JSON], false),
            AnswerClass::Read(BodyKind::Json)
        );
        assert_eq!(
            class_of(500, &[SSE], false),
            AnswerClass::Read(BodyKind::EventStream)
        );
        assert_eq!(
            class_of(400, &[("content-type", "application/problem+json")], false),
            AnswerClass::Read(BodyKind::JsonLike)
        );
        assert_eq!(
            class_of(404, &[("content-type", "text/plain")], false),
            AnswerClass::Read(BodyKind::Other)
        );
    }

    #[test]
    fn urls_stay_on_the_same_server_only_when_every_parser_agrees() {
        let mut b = crate::fuzzing::mcp_backend(&[]);
        b.host = "mcp.test".into();
        b.port = 8443;
        assert!(same_server("/mcp/", &b));
        assert!(same_server("https://MCP.test.:8443/x", &b));
        for other in [
            "//evil.example/x",
            "/\\evil.example/x",
            "\\\\evil.example",
            " /x",
            "https://mcp.test/x",
            "http://mcp.test:8443/x",
            "https://evil.example:8443/x",
            "/x\t",
        ] {
            assert!(!same_server(other, &b), "{other}");
        }
    }
}
