//! JSON-RPC 2.0 as MCP uses it: classifying messages, reading the parts policies and records
//! need, building the errors Airlock answers with.

use serde_json::{Value, json};

/// What one JSON-RPC message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Notification,
    Response,
    Error,
}

impl Kind {
    /// The archive's `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Request => "request",
            Kind::Notification => "notification",
            Kind::Response => "response",
            Kind::Error => "error",
        }
    }
}

/// Classify one value; `None` when it is not a JSON-RPC 2.0 message.
pub fn classify(v: &Value) -> Option<Kind> {
    let obj = v.as_object()?;
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return None;
    }
    match (obj.get("method"), obj.get("id")) {
        (Some(Value::String(_)), Some(_)) => Some(Kind::Request),
        (Some(Value::String(_)), None) => Some(Kind::Notification),
        (None, Some(_)) if obj.contains_key("error") => Some(Kind::Error),
        (None, Some(_)) if obj.contains_key("result") => Some(Kind::Response),
        _ => None,
    }
}

/// A body's JSON-RPC content: one message or a batch (2025-03-26).
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Single(Value),
    Batch(Vec<Value>),
}

impl Body {
    /// Parse a body. `Ok(None)`: valid JSON that is not JSON-RPC; `Err`: not JSON.
    pub fn parse(bytes: &[u8]) -> Result<Option<Body>, serde_json::Error> {
        let v: Value = serde_json::from_slice(bytes)?;
        Ok(match v {
            Value::Array(items)
                if !items.is_empty() && items.iter().all(|m| classify(m).is_some()) =>
            {
                Some(Body::Batch(items))
            }
            v if classify(&v).is_some() => Some(Body::Single(v)),
            _ => None,
        })
    }

    pub fn messages(&self) -> &[Value] {
        match self {
            Body::Single(v) => std::slice::from_ref(v),
            Body::Batch(v) => v,
        }
    }

    pub fn messages_mut(&mut self) -> &mut [Value] {
        match self {
            Body::Single(v) => std::slice::from_mut(v),
            Body::Batch(v) => v,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Body::Single(v) => serde_json::to_vec(v),
            Body::Batch(v) => serde_json::to_vec(v),
        }
        .unwrap_or_default()
    }
}

/// Whether the bytes start like a JSON object or array (after whitespace): such a body is
/// inspected whatever its `Content-Type` says, so a mislabelled body cannot skip the policies.
pub fn looks_like_json(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{' || *b == b'[')
}

pub fn method(v: &Value) -> Option<&str> {
    v.get("method")?.as_str()
}

pub fn id(v: &Value) -> Option<&Value> {
    v.get("id")
}

/// The id as compact JSON text (`1`, `"a"`): the correlation key and the archive column.
pub fn id_text(v: &Value) -> Option<String> {
    id(v).map(Value::to_string)
}

/// The name a request addresses: the tool of `tools/call`, the prompt of `prompts/get`, the
/// URI of `resources/read` (what 2026-07-28 mirrors into `Mcp-Name`).
pub fn target_name(v: &Value) -> Option<&str> {
    let params = v.get("params")?;
    match method(v)? {
        "tools/call" | "prompts/get" => params.get("name")?.as_str(),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            params.get("uri")?.as_str()
        }
        _ => None,
    }
}

/// The tool name of a `tools/call` request.
pub fn tool(v: &Value) -> Option<&str> {
    (method(v)? == "tools/call")
        .then(|| v.get("params")?.get("name")?.as_str())
        .flatten()
}

/// JSON-RPC error codes Airlock answers with. -32010..-32019 is the implementation band that
/// SDKs do not use themselves (see notes/MCP-PROTOCOL.md).
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    /// Refused by a policy rule.
    pub const BLOCKED: i64 = -32010;
    /// Not forwarded because another message of its batch was refused.
    pub const BATCH_REFUSED: i64 = -32011;
    /// Airlock could not do its job (archive down, upstream failure): fail closed.
    pub const UNAVAILABLE: i64 = -32012;
    /// Held for approval and denied (or timed out).
    pub const DENIED: i64 = -32013;
}

/// An error response to `id` (`null` when the request's id is unknown).
pub fn error_response(id: Option<&Value>, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut error = json!({ "code": code, "message": message });
    if let Some(d) = data {
        error["data"] = d;
    }
    json!({ "jsonrpc": "2.0", "id": id.cloned().unwrap_or(Value::Null), "error": error })
}

/// `iss` and `sub` of a bearer JWT (signature not checked: identity context for the records,
/// never an authorization decision). The token itself is never kept.
pub fn jwt_identity(authorization: &str) -> Option<(Option<String>, Option<String>)> {
    use base64::Engine as _;
    let token = authorization
        .strip_prefix("Bearer ")
        .or_else(|| authorization.strip_prefix("bearer "))?
        .trim();
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > 16 * 1024 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let claim = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
    let (iss, sub) = (claim("iss"), claim("sub"));
    (iss.is_some() || sub.is_some()).then_some((iss, sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_four_kinds_and_rejects_others() {
        assert_eq!(
            classify(&json!({"jsonrpc":"2.0","id":1,"method":"tools/list"})),
            Some(Kind::Request)
        );
        assert_eq!(
            classify(&json!({"jsonrpc":"2.0","method":"notifications/initialized"})),
            Some(Kind::Notification)
        );
        assert_eq!(
            classify(&json!({"jsonrpc":"2.0","id":"a","result":{}})),
            Some(Kind::Response)
        );
        assert_eq!(
            classify(&json!({"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"x"}})),
            Some(Kind::Error)
        );
        assert_eq!(classify(&json!({"id":1,"method":"x"})), None);
        assert_eq!(classify(&json!({"jsonrpc":"2.0","id":1})), None);
        assert_eq!(classify(&json!([1])), None);
    }

    #[test]
    fn parses_single_and_batch_bodies() {
        let single = Body::parse(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#).unwrap();
        assert!(matches!(single, Some(Body::Single(_))));
        let batch = Body::parse(
            br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"n"}]"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(batch.messages().len(), 2);
        assert_eq!(Body::parse(br#"{"hello":1}"#).unwrap(), None);
        assert_eq!(Body::parse(b"[]").unwrap(), None);
        assert!(Body::parse(b"{not json").is_err());
    }

    #[test]
    fn names_of_calls() {
        let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{}}});
        assert_eq!(tool(&call), Some("add"));
        assert_eq!(target_name(&call), Some("add"));
        let read =
            json!({"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///a"}});
        assert_eq!(tool(&read), None);
        assert_eq!(target_name(&read), Some("file:///a"));
    }

    #[test]
    fn jwt_claims_are_read_without_keeping_the_token() {
        use base64::Engine as _;
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let token = format!(
            "{}.{}.{}",
            enc(r#"{"alg":"RS256"}"#),
            enc(r#"{"iss":"https://idp.test","sub":"alice","exp":1}"#),
            enc("sig")
        );
        assert_eq!(
            jwt_identity(&format!("Bearer {token}")),
            Some((Some("https://idp.test".into()), Some("alice".into())))
        );
        assert_eq!(jwt_identity("Bearer opaque-token"), None);
        assert_eq!(jwt_identity("Basic dXNlcjpwYXNz"), None);
    }

    #[test]
    fn json_sniffing() {
        assert!(looks_like_json(b"  \n{\"a\":1}"));
        assert!(looks_like_json(b"[1]"));
        assert!(!looks_like_json(b"grant_type=x"));
        assert!(!looks_like_json(b""));
    }
}
