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
        if info.passthrough {
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
        let no_body = matches!(
            parts.status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        ) || info.method == Method::HEAD;
        if parts.status == StatusCode::ACCEPTED {
            // Accepted: the answers come later, on another stream (the legacy transport).
            info.owed.clear();
        }
        if parts.status == StatusCode::ACCEPTED && !no_body {
            // No client reads the body of a 202 ("Accepted"): it is read (bounded) and dropped,
            // never passed on uninspected.
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
        if no_body {
            if let Err(e) = self
                .http_record(info, parts.status.as_u16(), &ct_text)
                .await
            {
                return self.unrecorded(info, e).await;
            }
            return Response::from_parts(parts, full(Bytes::new()));
        }
        if !is_identity_encoding(&parts.headers) {
            return self
                .refuse_answer(
                    info,
                    "the server compressed its answer although Airlock asked for none".into(),
                )
                .await;
        }
        if parts.status.is_informational() {
            // An unasked-for protocol switch (101) would hand the connection to bytes Airlock
            // does not read.
            return self
                .refuse_answer(
                    info,
                    format!(
                        "it answered {} (a protocol switch nobody asked for)",
                        parts.status
                    ),
                )
                .await;
        }
        if parts.status.is_redirection()
            && let Some(location) = parts.headers.get(header::LOCATION)
            && !location
                .to_str()
                .is_ok_and(|l| same_server(l, &self.backend))
        {
            return self
                .refuse_answer(
                    info,
                    format!(
                        "it redirects the client to {:?}, another server (the request would leave uninspected)",
                        String::from_utf8_lossy(location.as_bytes())
                    ),
                )
                .await;
        }
        // Below 400, clients parse the body as MCP; from 400 on, as an error to show.
        let success = parts.status.as_u16() < 400;
        // What the client will decode the body as: one media type, no charset but UTF-8 in
        // any notation its header parser reads (`charset*=utf-8''utf-7` is UTF-7 to httpx).
        let ct = match media::utf8_content_type(&parts.headers) {
            Ok(ct) => ct,
            Err(e) if hyper::body::Body::size_hint(&body).exact() == Some(0) => {
                // No byte to decode: the status and headers go on as they are.
                tracing::debug!(id = self.ctx.conn_id, error = %e, "an empty answer's Content-Type");
                None
            }
            Err(e) if success => {
                return self
                    .refuse_answer(info, format!("its answer has {e}"))
                    .await;
            }
            Err(e) => return self.withhold_error_body(info, parts, e).await,
        };
        let kind = match &ct {
            Some(m) if m.essence == "text/event-stream" => Some(true),
            Some(m) if m.essence == "application/json" => Some(false),
            _ => None,
        };
        if success && kind == Some(true) {
            return self.stream(info.hand_over(), parts, body).await;
        }
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
        if success && kind != Some(false) {
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
                if !success
                    && !strict::looks_like_json(&bytes)
                    && kind.is_none()
                    && !matches!(&ct, Some(m) if m.essence.contains("json") || m.essence.contains("event-stream")) =>
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

#[cfg(test)]
mod tests {
    use super::*;

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
