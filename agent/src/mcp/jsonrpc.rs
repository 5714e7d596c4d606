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

/// Keys of a JSON-RPC message. A key that equals one of these only under case folding
/// (`"Method"`, `"params"` with a long s) is refused: Go's `encoding/json` would read it as the
/// protocol key, Airlock's policy would not.
const MESSAGE_KEYS: &[&str] = &["jsonrpc", "id", "method", "params", "result", "error"];
/// Keys of `params` that policies and correlation read.
const PARAMS_KEYS: &[&str] = &[
    "name",
    "arguments",
    "uri",
    "taskId",
    "task",
    "inputResponses",
    "requestState",
    "_meta",
    "cursor",
    "progressToken",
];

/// Methods that are requests: sent without an id (as a notification) they are refused, never
/// forwarded around the rules that judge requests.
pub const REQUEST_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/call",
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "sampling/createMessage",
    "elicitation/create",
    "roots/list",
    "server/discover",
    "subscriptions/listen",
    "tasks/get",
    "tasks/result",
    "tasks/list",
    "tasks/cancel",
    "tasks/update",
];

/// Longest string id accepted (ids are remembered until answered: their size is bounded).
pub const MAX_ID_BYTES: usize = 128;
/// Longest tool, prompt or task name accepted (MCP names are at most 128 characters).
pub const MAX_NAME_BYTES: usize = 512;

/// Why a JSON value that claims to be JSON-RPC (or must be) is not a valid message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(msg.into()))
}

/// Refuse keys of `obj` that equal a name of `known` only under case folding.
fn check_folded_keys(
    obj: &serde_json::Map<String, Value>,
    known: &[&str],
    what: &str,
) -> Result<(), Invalid> {
    for key in obj.keys() {
        if known.contains(&key.as_str()) {
            continue;
        }
        let folded = super::strict::fold(key);
        if let Some(k) = known.iter().find(|k| super::strict::fold(k) == folded) {
            return invalid(format!(
                "{what} key {key:?} differs from `{k}` only by case: refused (some servers read it as `{k}`)"
            ));
        }
    }
    Ok(())
}

/// Whether the value presents itself as JSON-RPC: an object with a `jsonrpc` or `method` key,
/// or an `id` with a `result` or `error` (keys compared under case folding), or an array
/// holding one.
pub fn looks_like_jsonrpc(v: &Value) -> bool {
    match v {
        Value::Array(items) => items.iter().any(looks_like_jsonrpc),
        Value::Object(obj) => {
            let has = |k: &str| obj.keys().any(|key| super::strict::fold(key) == k);
            has("jsonrpc") || has("method") || (has("id") && (has("result") || has("error")))
        }
        _ => false,
    }
}

/// A JSON-RPC id as MCP allows it: a string, or an integer all parsers read alike. `null` only
/// where `null_ok` (an error answering a request whose id could not be read); an integral
/// float (`1.0`) only where `float_ok` (a server echoing an id).
fn check_id(id: &Value, null_ok: bool, float_ok: bool) -> Result<(), Invalid> {
    match id {
        Value::String(s) if s.len() > MAX_ID_BYTES => invalid(format!(
            "an id of {} bytes: at most {MAX_ID_BYTES} are accepted",
            s.len()
        )),
        Value::String(_) => Ok(()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(()),
        Value::Number(n) if float_ok && n.as_f64().is_some_and(|f| f.fract() == 0.0) => Ok(()),
        Value::Null if null_ok => Ok(()),
        other => invalid(format!("the id {other} is not a string or an integer")),
    }
}

/// Validate one message and say what it is. `Err`: not a valid JSON-RPC 2.0 message as MCP
/// uses it (the caller refuses it; a batch holding it is refused whole).
pub fn validate(v: &Value) -> Result<Kind, Invalid> {
    let Some(obj) = v.as_object() else {
        return invalid("a JSON-RPC message must be an object");
    };
    check_folded_keys(obj, MESSAGE_KEYS, "message")?;
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return invalid("`jsonrpc` must be \"2.0\"");
    }
    let id = obj.get("id");
    match obj.get("method") {
        Some(method) => {
            let Some(method) = method.as_str() else {
                return invalid("`method` must be a string");
            };
            if method.is_empty() || method.len() > 256 {
                return invalid("`method` must be 1 to 256 bytes long");
            }
            if obj.contains_key("result") || obj.contains_key("error") {
                return invalid("a message with a `method` cannot also carry `result` or `error`");
            }
            let params = match obj.get("params") {
                None => None,
                Some(Value::Object(p)) => Some(p),
                Some(_) => return invalid("`params` must be an object"),
            };
            let kind = match id {
                Some(id) => {
                    check_id(id, false, false)?;
                    Kind::Request
                }
                None if REQUEST_METHODS.contains(&method) => {
                    return invalid(format!(
                        "`{method}` is a request and needs an id: sent as a notification it is refused"
                    ));
                }
                None => Kind::Notification,
            };
            if let Some(p) = params {
                check_folded_keys(p, PARAMS_KEYS, "params")?;
            }
            check_params(method, params)?;
            Ok(kind)
        }
        None => {
            let Some(id) = id else {
                return invalid("a message needs a `method` or an `id`");
            };
            match (obj.get("result"), obj.get("error")) {
                (Some(_), Some(_)) => invalid("a response cannot carry both `result` and `error`"),
                (Some(result), None) => {
                    check_id(id, false, true)?;
                    if !result.is_object() {
                        return invalid("`result` must be an object");
                    }
                    Ok(Kind::Response)
                }
                (None, Some(error)) => {
                    check_id(id, true, true)?;
                    let code_ok = error.get("code").is_some_and(|c| c.is_i64());
                    let message_ok = error.get("message").is_some_and(Value::is_string);
                    if !(error.is_object() && code_ok && message_ok) {
                        return invalid(
                            "`error` must be an object with an integer `code` and a string `message`",
                        );
                    }
                    Ok(Kind::Error)
                }
                (None, None) => invalid("a response needs a `result` or an `error`"),
            }
        }
    }
}

/// The parameters of the methods policies judge by name or URI must have the shape servers
/// execute: a `tools/call` whose `name` is not a string is refused, not passed on unjudged.
fn check_params(
    method: &str,
    params: Option<&serde_json::Map<String, Value>>,
) -> Result<(), Invalid> {
    let need = |key: &str| -> Result<(), Invalid> {
        match params.and_then(|p| p.get(key)) {
            Some(Value::String(s)) if key != "uri" && s.len() > MAX_NAME_BYTES => invalid(format!(
                "`params.{key}` of `{method}` is longer than {MAX_NAME_BYTES} bytes"
            )),
            Some(Value::String(_)) => Ok(()),
            _ => invalid(format!("`{method}` needs a string `params.{key}`")),
        }
    };
    let object_or_absent = |key: &str| -> Result<(), Invalid> {
        match params.and_then(|p| p.get(key)) {
            None | Some(Value::Object(_)) => Ok(()),
            Some(_) => invalid(format!("`params.{key}` of `{method}` must be an object")),
        }
    };
    match method {
        "tools/call" | "prompts/get" => {
            need("name")?;
            object_or_absent("arguments")
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => need("uri"),
        "tasks/get" | "tasks/result" | "tasks/cancel" | "tasks/update" => need("taskId"),
        _ => Ok(()),
    }
}

/// A body's JSON-RPC content: one message or a batch (2025-03-26).
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Single(Value),
    Batch(Vec<Value>),
}

/// What a JSON text turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// Valid JSON-RPC: one message or a batch whose every member is valid.
    Messages(Body),
    /// Strict JSON that does not present itself as JSON-RPC at all.
    Other(Value),
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not strict JSON (see [`super::strict`]).
    Json(super::strict::StrictError),
    /// JSON that presents itself as JSON-RPC but is not a valid message (or a batch with an
    /// invalid member).
    Invalid(Invalid),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Json(e) => write!(f, "not valid JSON: {e}"),
            BodyError::Invalid(e) => write!(f, "not a valid JSON-RPC message: {e}"),
        }
    }
}

impl Body {
    /// Parse a body strictly and validate every message.
    pub fn parse(bytes: &[u8]) -> Result<Parsed, BodyError> {
        let v = super::strict::parse(bytes).map_err(BodyError::Json)?;
        Self::from_value(v)
    }

    /// Validate a parsed value: one message, or a non-empty batch of valid messages.
    pub fn from_value(v: Value) -> Result<Parsed, BodyError> {
        if !looks_like_jsonrpc(&v) {
            return Ok(Parsed::Other(v));
        }
        match v {
            Value::Array(items) => {
                for (i, m) in items.iter().enumerate() {
                    validate(m).map_err(|e| {
                        BodyError::Invalid(Invalid(format!("batch member {i}: {e}")))
                    })?;
                }
                Ok(Parsed::Messages(Body::Batch(items)))
            }
            v => {
                validate(&v).map_err(BodyError::Invalid)?;
                Ok(Parsed::Messages(Body::Single(v)))
            }
        }
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

pub fn method(v: &Value) -> Option<&str> {
    v.get("method")?.as_str()
}

pub fn id(v: &Value) -> Option<&Value> {
    v.get("id")
}

/// The id as compact JSON text (`1`, `"a"`): the correlation key and the archive column.
/// Ids compare as JSON-RPC ids: a number is written as the integer it is, so a server that
/// echoes `1.0` for `1` answers the same request.
pub fn id_text(v: &Value) -> Option<String> {
    id(v).map(canonical_id)
}

/// See [`id_text`].
pub fn canonical_id(id: &Value) -> String {
    match id {
        Value::Number(n) if !(n.is_i64() || n.is_u64()) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() <= super::strict::MAX_SAFE_INTEGER as f64 => {
                format!("{}", f as i64)
            }
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The name a request addresses: the tool of `tools/call`, the prompt of `prompts/get`, the
/// URI of `resources/read`, the task of `tasks/*` (what 2026-07-28 mirrors into `Mcp-Name`).
pub fn target_name(v: &Value) -> Option<&str> {
    let params = v.get("params")?;
    match method(v)? {
        "tools/call" | "prompts/get" => params.get("name")?.as_str(),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            params.get("uri")?.as_str()
        }
        "tasks/get" | "tasks/result" | "tasks/cancel" | "tasks/update" => {
            params.get("taskId")?.as_str()
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
        let classify = |v: &Value| validate(v).ok();
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
        assert!(matches!(single, Parsed::Messages(Body::Single(_))));
        let Parsed::Messages(batch) = Body::parse(
            br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"n"}]"#,
        )
        .unwrap() else {
            panic!("a batch")
        };
        assert_eq!(batch.messages().len(), 2);
        assert!(matches!(
            Body::parse(br#"{"hello":1}"#).unwrap(),
            Parsed::Other(_)
        ));
        assert!(matches!(Body::parse(b"[]").unwrap(), Parsed::Other(_)));
        assert!(matches!(Body::parse(b"{not json"), Err(BodyError::Json(_))));
    }

    #[test]
    fn a_batch_with_one_invalid_member_is_refused_whole() {
        let e = Body::parse(
            br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}},{"jsonrpc":"1.0","id":2,"method":"ping"}]"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("batch member 1"), "{e}");
        assert!(Body::parse(br#"[{"jsonrpc":"2.0","method":"n"},3]"#).is_err());
    }

    #[test]
    fn shapes_servers_would_read_differently_are_refused() {
        let refused = [
            // Keys equal to protocol keys under case folding.
            json!({"jsonrpc":"2.0","id":1,"Method":"tools/call","params":{"name":"x"}}),
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","Params":{"name":"x"}}),
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"Name":"x"}}),
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","argument\u{17F}":{}}}),
            // Ids MCP does not allow.
            json!({"jsonrpc":"2.0","id":1.5,"method":"ping"}),
            json!({"jsonrpc":"2.0","id":true,"method":"ping"}),
            json!({"jsonrpc":"2.0","id":{},"method":"ping"}),
            json!({"jsonrpc":"2.0","id":null,"method":"ping"}),
            // A request sent without an id.
            json!({"jsonrpc":"2.0","method":"tools/call","params":{"name":"x"}}),
            // Ambiguous or malformed shapes.
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","result":{}}),
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":["x"]}}),
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":[1]}}),
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}),
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":[]}),
            json!({"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1,"message":"x"}}),
            json!({"jsonrpc":"2.0","id":1,"result":[]}),
            json!({"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"x"}}),
            json!({"jsonrpc":2.0,"id":1,"method":"ping"}),
            // Sizes that are remembered until answered are bounded.
            json!({"jsonrpc":"2.0","id":"x".repeat(MAX_ID_BYTES + 1),"method":"ping"}),
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t".repeat(MAX_NAME_BYTES + 1)}}),
        ];
        for v in refused {
            assert!(validate(&v).is_err(), "accepted {v}");
            assert!(looks_like_jsonrpc(&v), "{v}");
        }
        // A server echoing 1.0 for 1 is still a response; an error may answer id null.
        assert_eq!(
            validate(&json!({"jsonrpc":"2.0","id":1.0,"result":{}})),
            Ok(Kind::Response)
        );
        assert_eq!(
            validate(&json!({"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}})),
            Ok(Kind::Error)
        );
        assert_eq!(id_text(&json!({"id":1.0})).as_deref(), Some("1"));
        assert_eq!(id_text(&json!({"id":1})).as_deref(), Some("1"));
        assert_eq!(id_text(&json!({"id":"1"})).as_deref(), Some("\"1\""));
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
}
