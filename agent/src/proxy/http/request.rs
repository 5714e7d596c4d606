//! One client request: the `Host` it names, its body (capped, within a deadline, charged to
//! its uid), the class Airlock gives it from the bytes, and, for MCP, each message through the
//! pipeline before anything is forwarded.

use std::{sync::atomic::Ordering, time::Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{Value, json};
use tracing::warn;

use super::{
    Conn, ProxyBody, ReadError, RequestInfo, full,
    head::{AuthorityError, MirrorError},
    is_identity_encoding, json_response, legacy_session, read_capped, strip_hop_by_hop,
};
use crate::{
    archive::{RecordDecision, RecordKind},
    config::Backend,
    mcp::{
        headers,
        jsonrpc::{self, Body, BodyError, Parsed, code},
        media, strict,
    },
    pipeline::{Msg, Origin, Outcome},
    policy::Direction,
};

/// What a request body is, decided from its bytes.
#[derive(Debug)]
pub enum Class {
    /// No body: nothing to judge on the way in (a GET stream, a DELETE); the response must be
    /// MCP.
    Empty,
    /// Allowed non-MCP traffic (`allow_http`).
    Passthrough,
    /// JSON-RPC Airlock parsed.
    Mcp(Body),
    /// Refused: the HTTP status, a JSON-RPC error code and id, the reason.
    Refused {
        status: StatusCode,
        code: i64,
        id: Option<Value>,
        reason: String,
    },
}

impl Conn {
    pub(super) async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
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
        let (legacy, legacy_refused) = match legacy_session(parts.uri.query()) {
            Ok(l) => (l, None),
            Err(e) => (None, Some(e)),
        };
        let both_sessions = (mcp_session_id.is_some() && legacy.is_some())
            || parts.headers.get_all("mcp-session-id").iter().count() > 1;
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
            // Records name the MCP session: the header's, else the legacy transport's.
            mcp_session_id: mcp_session_id.or_else(|| legacy.clone()),
            started,
            mcp: false,
            passthrough: false,
            origin: None,
            owed: Vec::new(),
            sessions: self.pipeline.sessions.clone(),
        };

        // Two session names: the server goes by one, correlation would go by the other.
        if let Some(reason) = legacy_refused {
            return self
                .refuse_http(&info, StatusCode::BAD_REQUEST, format!("Airlock: {reason}"))
                .await;
        }
        if both_sessions {
            return self
                .refuse_http(
                    &info,
                    StatusCode::BAD_REQUEST,
                    "Airlock: a request names its session twice (two Mcp-Session-Id headers, or one and a legacy session query parameter)".into(),
                )
                .await;
        }
        // A tunnel or a trace is never MCP, and Airlock does not relay what it cannot read.
        if matches!(parts.method, Method::CONNECT | Method::TRACE) {
            return self
                .refuse_http(
                    &info,
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("Airlock: {} is not passed on", parts.method),
                )
                .await;
        }
        // A protocol switch (WebSocket, h2c) would hand the connection to bytes Airlock does
        // not read: refused here, not forwarded with the switch stripped.
        if let Some(protocol) = upgrade_requested(&parts.headers) {
            return self
                .refuse_http(
                    &info,
                    StatusCode::NOT_IMPLEMENTED,
                    format!(
                        "Airlock: protocol upgrades are not passed on (this request asks for {protocol}); MCP goes through Airlock as plain HTTP/1.1 requests"
                    ),
                )
                .await;
        }
        // One connection, one backend: the request must name the backend its connection was
        // judged for; the server gets that name as Airlock read it (case and a trailing dot
        // normalised).
        match self.check_authority(&parts) {
            Ok(host) => {
                if let Ok(v) = HeaderValue::from_str(&host) {
                    parts.headers.insert(header::HOST, v);
                }
            }
            Err(reason) => {
                return self
                    .refuse_http(
                        &info,
                        StatusCode::MISDIRECTED_REQUEST,
                        format!("Airlock: {reason}"),
                    )
                    .await;
            }
        }

        // The body, read whole (capped, within the deadline, charged to the caller's uid).
        let mut permit = self.resources.body(self.ctx.attribution.uid);
        let deadline = tokio::time::Instant::now() + self.limits.body_read_timeout;
        let body = match read_capped(body, self.limits.max_body, deadline, Some(&mut permit)).await
        {
            Ok(b) => b,
            Err(e) => {
                let status = match e {
                    ReadError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                    ReadError::Timeout => StatusCode::REQUEST_TIMEOUT,
                    ReadError::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
                    ReadError::Io(_) => StatusCode::BAD_REQUEST,
                };
                let reason = format!("Airlock: {}", self.read_failed(&e, "the request body"));
                return self.refuse_http(&info, status, reason).await;
            }
        };
        if !body.is_empty() && !is_identity_encoding(&parts.headers) {
            return self
                .refuse_http(
                    &info,
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Airlock: compressed request bodies cannot be inspected; send them uncompressed"
                        .into(),
                )
                .await;
        }
        // A declared charset other than UTF-8 (in any notation a server's header parser
        // reads: `charset=`, `charset*=`, sections) would make some servers decode bytes Airlock
        // read as UTF-8 into other text; so would a `Content-Type` Airlock cannot read.
        if !body.is_empty()
            && let Err(e) = media::utf8_content_type(&parts.headers)
        {
            return self
                .refuse_http(
                    &info,
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("Airlock: the request has {e}"),
                )
                .await;
        }

        let mut forward_body = body.clone();
        // The parsing cost is charged before a byte is parsed, and held while the parsed body
        // lives.
        let parse_permit = if strict::looks_like_json(&body) {
            let estimate = strict::parsed_size_estimate(&body);
            match self.resources.parse(self.ctx.attribution.uid, estimate) {
                Ok(p) => Some(p),
                Err(e) => {
                    return self
                        .refuse_malformed(
                            &info,
                            StatusCode::SERVICE_UNAVAILABLE,
                            code::UNAVAILABLE,
                            None,
                            &format!("Airlock: {e}"),
                        )
                        .await;
                }
            }
        } else {
            None
        };
        match classify(&parts.method, &path, &body, &self.backend) {
            Class::Empty => {}
            Class::Passthrough => info.passthrough = true,
            Class::Refused {
                status,
                code,
                id,
                reason,
            } => {
                return self
                    .refuse_malformed(&info, status, code, id.as_ref(), &reason)
                    .await;
            }
            Class::Mcp(mut parsed) => {
                info.mcp = true;
                if let Err(reason) = mirrored_headers_agree(&parts.headers, &parsed) {
                    return self
                        .refuse_malformed(
                            &info,
                            StatusCode::BAD_REQUEST,
                            code::INVALID_REQUEST,
                            None,
                            &reason.to_string(),
                        )
                        .await;
                }
                match self
                    .requests_through_pipeline(&mut info, &mut parts.headers, &mut parsed, &body)
                    .await
                {
                    // Unchanged messages go on as the client wrote them.
                    Ok(false) => {}
                    Ok(true) => forward_body = Bytes::from(parsed.to_bytes()),
                    Err(answer) => return answer,
                }
            }
        }
        // The parsed body is gone (forwarded as bytes): so is its share of the budget.
        drop(parse_permit);
        drop(permit);
        // A request without messages (allowed non-MCP traffic, a GET stream, a DELETE) is
        // recorded at HTTP level before it goes on: in group or strict recording, nothing reaches the
        // server unrecorded.
        if !info.mcp
            && let Err(e) = self.request_record(&info).await
        {
            return self.unrecorded(&info, e).await;
        }
        self.forward(info, parts, forward_body).await
    }

    /// The HTTP-level record of a request that carries no MCP message: method and path.
    async fn request_record(
        &self,
        info: &RequestInfo,
    ) -> Result<(), crate::pipeline::PipelineError> {
        let kind = (
            Direction::ClientToServer,
            RecordKind::Http,
            RecordDecision::Allow,
        );
        self.exchange_record(info, kind, json!({}), None).await
    }

    /// The request's authority (`Host`, or an absolute-form target) must name the backend
    /// this connection was judged for: its host name, or the address the client connected to;
    /// and its port. Trailing dots and case do not count. Returns the authority normalised.
    fn check_authority(&self, parts: &http::request::Parts) -> Result<String, AuthorityError> {
        let mut hosts = parts.headers.get_all(header::HOST).iter();
        let host_header = match (hosts.next(), hosts.next()) {
            (Some(h), None) => Some(h.to_str().map_err(|_| AuthorityError::HostNotAscii)?),
            (None, _) => None,
            (Some(_), Some(_)) => return Err(AuthorityError::ManyHosts),
        };
        let from_uri = parts.uri.authority().map(|a| a.as_str());
        let authority = match (from_uri, host_header) {
            (Some(u), Some(h)) if !u.eq_ignore_ascii_case(h) => {
                return Err(AuthorityError::Disagree {
                    target: u.to_owned(),
                    host: h.to_owned(),
                });
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return Err(AuthorityError::NoHost),
        };
        let b = &self.backend;
        let (host, port) = split_authority(authority)
            .ok_or_else(|| AuthorityError::NotHostAndPort(authority.to_owned()))?;
        let wanted_port = port.unwrap_or(if b.tls { 443 } else { 80 });
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let original = self.ctx.attribution.original_dst;
        let names_backend = host == b.host.trim_end_matches('.').to_ascii_lowercase()
            || host.parse::<std::net::IpAddr>().is_ok_and(|ip| {
                crate::keys::canonical_ip(ip) == crate::keys::canonical_ip(original.ip())
            });
        if !names_backend || wanted_port != b.port {
            return Err(AuthorityError::OtherBackend {
                backend: b.name.clone(),
                host: b.host.clone(),
                port: b.port,
                authority: authority.to_owned(),
            });
        }
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(match port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        })
    }

    /// Each client→server message through the pipeline. `Ok(changed)`: forward `parsed`
    /// (rewritten when `changed`, headers in step); `Err(r)`: Airlock answers with `r`.
    async fn requests_through_pipeline(
        &self,
        info: &mut RequestInfo,
        headers: &mut HeaderMap,
        parsed: &mut Body,
        body: &Bytes,
    ) -> Result<bool, Response<ProxyBody>> {
        let mut any_changed = false;
        let batch = matches!(parsed, Body::Batch(_));
        let raw = (!batch).then(|| body.clone());
        let mut answers = Vec::new();
        let mut forwarded_ids = Vec::new();
        for m in parsed.messages_mut() {
            let value = std::mem::take(m);
            let id = jsonrpc::id(&value).cloned();
            // What a lone request's answer stream will belong to (read before masking).
            let origin = (!batch)
                .then(|| {
                    jsonrpc::method(&value).map(|method| Origin {
                        method: method.to_owned(),
                        tool: jsonrpc::tool(&value).map(str::to_owned),
                    })
                })
                .flatten();
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
                        origin: None,
                    },
                )
                .await;
            match outcome {
                Ok(Outcome::Forward {
                    value,
                    changed,
                    original_args,
                    kind,
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
                    if kind == jsonrpc::Kind::Request {
                        if let Some(id) = &id {
                            info.owed.push(id.clone());
                        }
                        info.origin = origin;
                    }
                    forwarded_ids.push(id);
                    *m = value;
                }
                Ok(Outcome::Answer(a)) => answers.push(a),
                Err(e) => {
                    warn!(id = self.ctx.conn_id, error = %e, "refusing a message the pipeline could not take");
                    // Nothing of the body goes on: the ids its earlier members took are free.
                    for id in forwarded_ids.iter().flatten() {
                        self.pipeline
                            .sessions
                            .cancel(&info.key, true, &jsonrpc::canonical_id(id));
                    }
                    let answer = jsonrpc::error_response(
                        id.as_ref(),
                        code::UNAVAILABLE,
                        &format!("Airlock: {e}"),
                        None,
                    );
                    return Err(json_response(StatusCode::SERVICE_UNAVAILABLE, &answer));
                }
            }
        }
        if answers.is_empty() {
            return Ok(any_changed);
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
                return Err(r);
            }
            return Err(json_response(StatusCode::OK, &answers[0]));
        }
        // A batch is forwarded whole or not at all: the others are answered too, on the
        // record, and the ids they took are free again.
        info.owed.clear();
        for id in forwarded_ids.into_iter().flatten() {
            self.pipeline
                .sessions
                .cancel(&info.key, true, &jsonrpc::canonical_id(&id));
            let answer = jsonrpc::error_response(
                Some(&id),
                code::BATCH_REFUSED,
                "Airlock: not forwarded because another message of its batch was refused",
                None,
            );
            self.record_request_error(
                info,
                Direction::ServerToClient,
                RecordDecision::Block,
                json!({"rules": ["airlock:batch_refused"], "answer": answer}),
                None,
            )
            .await;
            answers.push(answer);
        }
        Err(json_response(StatusCode::OK, &Value::Array(answers)))
    }

    /// A body Airlock refuses: answered with a JSON-RPC error (`status`), counted, recorded,
    /// never forwarded.
    async fn refuse_malformed(
        &self,
        info: &RequestInfo,
        status: StatusCode,
        code: i64,
        id: Option<&Value>,
        reason: &str,
    ) -> Response<ProxyBody> {
        self.pipeline
            .counters
            .malformed
            .fetch_add(1, Ordering::Relaxed);
        self.record_refusal(info, status, reason).await;
        json_response(status, &jsonrpc::error_response(id, code, reason, None))
    }

    /// Send the request on (brokered credentials, no compression) and handle the answer.
    async fn forward(
        &self,
        mut info: RequestInfo,
        mut parts: http::request::Parts,
        forward_body: Bytes,
    ) -> Response<ProxyBody> {
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
        *up.uri_mut() = info
            .path
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/"));
        *up.headers_mut() = parts.headers;
        let response = self.upstream.lock().await.send(up).await;
        match response {
            Ok(r) => {
                let answer = self.response(info, r).await;
                // Read whole (not a stream): the server connection waits in the pool.
                self.upstream.lock().await.checkin().await;
                answer
            }
            Err(reason) => {
                // The requests never reached the server: their ids are free.
                info.release_owed();
                self.upstream_failed(&info, reason).await
            }
        }
    }
}

/// The class of a request body, from its bytes (see the module documentation of `http`).
/// Sans-IO: the caller has charged the parsing cost already.
pub fn classify(method: &Method, path: &str, body: &[u8], backend: &Backend) -> Class {
    let allowed = backend.allow_http.iter().any(|a| a.allows(method, path));
    if body.is_empty() {
        return if allowed {
            Class::Passthrough
        } else if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            // A POST to an MCP backend carries JSON-RPC; an empty one is not MCP.
            Class::Refused {
                status: StatusCode::BAD_REQUEST,
                code: code::INVALID_REQUEST,
                id: None,
                reason: format!(
                    "Airlock: a {method} to backend `{}` must carry a JSON-RPC body",
                    backend.name
                ),
            }
        } else {
            Class::Empty
        };
    }
    if !strict::looks_like_json(body) {
        return if allowed {
            Class::Passthrough
        } else {
            Class::Refused {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code: code::PARSE_ERROR,
                id: None,
                reason: format!(
                    "Airlock: backend `{}` takes JSON-RPC request bodies only; `{method} {}` is not in its `allow_http`",
                    backend.name,
                    path.split('?').next().unwrap_or(path)
                ),
            }
        };
    }
    match Body::parse(body) {
        Ok(Parsed::Messages(b)) => Class::Mcp(b),
        Ok(Parsed::Other(_)) if allowed => Class::Passthrough,
        Ok(Parsed::Other(_)) => Class::Refused {
            status: StatusCode::BAD_REQUEST,
            code: code::INVALID_REQUEST,
            id: None,
            reason: "Airlock: the request body is JSON but not a JSON-RPC message".into(),
        },
        Err(BodyError::Json(e)) => Class::Refused {
            status: StatusCode::BAD_REQUEST,
            code: code::PARSE_ERROR,
            id: None,
            reason: format!("Airlock: the request body is not valid JSON: {e}"),
        },
        Err(BodyError::Invalid(e)) => Class::Refused {
            status: StatusCode::BAD_REQUEST,
            code: code::INVALID_REQUEST,
            // Answer the request's id when it has a usable one.
            id: strict::parse(body)
                .ok()
                .and_then(|v| v.get("id").cloned())
                .filter(|id| id.is_string() || id.is_i64() || id.is_u64()),
            reason: format!("Airlock: {e}"),
        },
    }
}

/// `host[:port]` (IPv6 in brackets).
fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    let authority = authority.rsplit('@').next()?;
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host, Some(port.parse().ok()?))),
        Some(_) => None,
        None => Some((authority, None)),
    }
}

/// The protocol a request asks to switch to (`Upgrade`, or `Connection: upgrade`, or an h2c
/// `HTTP2-Settings`), quoted for a reason; `None` for an ordinary request.
fn upgrade_requested(headers: &HeaderMap) -> Option<String> {
    let upgrade: Vec<String> = headers
        .get_all(header::UPGRADE)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned())
        .collect();
    if !upgrade.is_empty() {
        return Some(format!("`Upgrade: {}`", upgrade.join(", ")));
    }
    let connection_upgrade = headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    if connection_upgrade {
        return Some("`Connection: upgrade`".into());
    }
    headers
        .contains_key("http2-settings")
        .then(|| "h2c (`HTTP2-Settings`)".into())
}

/// The 2026-07-28 mirrored headers (`Mcp-Method`, `Mcp-Name`) must say what the body says: a
/// server routing on the header must not run what Airlock did not judge.
fn mirrored_headers_agree(headers: &HeaderMap, parsed: &Body) -> Result<(), MirrorError> {
    for name in [headers::MCP_METHOD, headers::MCP_NAME] {
        if headers.get_all(name).iter().count() > 1 {
            return Err(MirrorError::Repeated(name));
        }
    }
    let Body::Single(m) = parsed else {
        return Ok(());
    };
    if let Some(h) = headers.get(headers::MCP_METHOD) {
        let claimed = headers::decode_value(h).unwrap_or_default();
        if Some(claimed.as_str()) != jsonrpc::method(m) {
            return Err(MirrorError::Method {
                claimed,
                body: jsonrpc::method(m).unwrap_or("(no method)").to_owned(),
            });
        }
    }
    if let Some(h) = headers.get(headers::MCP_NAME) {
        let claimed = headers::decode_value(h).unwrap_or_default();
        if Some(claimed.as_str()) != jsonrpc::target_name(m) {
            return Err(MirrorError::Name {
                claimed,
                body: jsonrpc::target_name(m).unwrap_or("(no name)").to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(split_authority("a.test:8443"), Some(("a.test", Some(8443))));
        assert_eq!(split_authority("a.test"), Some(("a.test", None)));
        assert_eq!(split_authority("[::1]:443"), Some(("::1", Some(443))));
        assert_eq!(split_authority("[::1]"), Some(("::1", None)));
        assert_eq!(split_authority("a.test:x"), None);
        assert_eq!(split_authority("::1"), None);
    }

    #[test]
    fn declared_charsets() {
        let check = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::CONTENT_TYPE, v.parse().unwrap());
            }
            media::utf8_content_type(&h).map(|_| ())
        };
        assert!(check(&[]).is_ok());
        assert!(check(&["application/json; charset=UTF-8"]).is_ok());
        assert!(check(&["application/json; charset*=utf-8''utf-8"]).is_ok());
        assert!(check(&["text/plain"]).is_ok());
        for refused in [
            "application/json, text/plain; charset=utf-16",
            "application/json; charset=utf-16",
            "application/json; charset*=utf-8''utf-16",
            "application/json; charset*0=utf; charset*1=-16",
            "application/json; charset=utf-8; charset*=utf-8''utf-16",
        ] {
            assert!(check(&[refused]).is_err(), "{refused}");
        }
        assert!(check(&["text/plain", "application/json"]).is_err());
    }

    #[test]
    fn upgrades_are_recognised_in_every_spelling() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let ws = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(
            upgrade_requested(&ws).as_deref(),
            Some("`Upgrade: websocket`")
        );
        let h2c = headers(&[
            ("connection", "keep-alive, Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ]);
        assert!(upgrade_requested(&h2c).unwrap().contains("h2c"));
        assert!(upgrade_requested(&headers(&[("connection", "x, UPGRADE")])).is_some());
        assert!(upgrade_requested(&headers(&[("http2-settings", "AAMA")])).is_some());
        assert_eq!(
            upgrade_requested(&headers(&[("connection", "keep-alive")])),
            None
        );
        assert_eq!(upgrade_requested(&HeaderMap::new()), None);
    }

    #[test]
    fn mirrored_headers_must_match_the_body() {
        let call = Body::Single(
            serde_json::json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"safe"}}),
        );
        let mut h = HeaderMap::new();
        h.insert(headers::MCP_METHOD, "tools/call".parse().unwrap());
        h.insert(headers::MCP_NAME, "safe".parse().unwrap());
        assert!(mirrored_headers_agree(&h, &call).is_ok());
        h.insert(headers::MCP_NAME, "dangerous".parse().unwrap());
        assert!(mirrored_headers_agree(&h, &call).is_err());
        h.insert(headers::MCP_NAME, "safe".parse().unwrap());
        h.insert(headers::MCP_METHOD, "tools/list".parse().unwrap());
        assert!(mirrored_headers_agree(&h, &call).is_err());
    }
}
