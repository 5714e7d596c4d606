//! The 2026-07-28 request headers that mirror the body (`Mcp-Method`, `Mcp-Name`,
//! `Mcp-Param-*`). A server refuses a request whose headers disagree with its body (400,
//! -32020), so whenever Airlock rewrites a body (masking) it rewrites these headers to match.

use base64::Engine as _;
use http::{HeaderMap, HeaderValue};
use serde_json::Value;

pub const MCP_METHOD: &str = "mcp-method";
pub const MCP_NAME: &str = "mcp-name";
pub const PARAM_PREFIX: &str = "mcp-param-";

/// Decode a header value: plain visible ASCII, or `=?base64?<utf-8 as base64>?=`.
pub fn decode_value(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    if let Some(inner) = s
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(inner)
            .ok()?;
        return String::from_utf8(bytes).ok();
    }
    Some(s.to_owned())
}

/// Encode a value the way a client does: as is when it is visible ASCII without leading or
/// trailing space, else base64.
pub fn encode_value(s: &str) -> Option<HeaderValue> {
    let plain = s.bytes().all(|b| (0x20..0x7f).contains(&b)) && s.trim() == s;
    if plain {
        HeaderValue::from_str(s).ok()
    } else {
        HeaderValue::from_str(&format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
        ))
        .ok()
    }
}

/// How a JSON argument looks in a header.
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Make the mirrored headers agree with the (possibly rewritten) request `message`.
///
/// `original_args` are the arguments before rewriting: a `Mcp-Param-*` header whose value was
/// one of them takes that argument's new value. A header matching no argument is passed
/// through `mask` (the policy's masking of a lone string). Returns how many headers changed.
pub fn sync_request_headers(
    headers: &mut HeaderMap,
    message: &Value,
    original_args: Option<&Value>,
    mut mask: impl FnMut(&str) -> Option<String>,
) -> usize {
    let mut changed = 0;
    if headers.contains_key(MCP_METHOD)
        && let Some(m) = super::jsonrpc::method(message)
        && headers.get(MCP_METHOD).and_then(|v| v.to_str().ok()) != Some(m)
        && let Some(v) = encode_value(m)
    {
        headers.insert(MCP_METHOD, v);
        changed += 1;
    }
    if headers.contains_key(MCP_NAME)
        && let Some(name) = super::jsonrpc::target_name(message)
        && headers.get(MCP_NAME).and_then(decode_value).as_deref() != Some(name)
        && let Some(v) = encode_value(name)
    {
        headers.insert(MCP_NAME, v);
        changed += 1;
    }
    let new_args = message.get("params").and_then(|p| p.get("arguments"));
    let param_names: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(PARAM_PREFIX))
        .cloned()
        .collect();
    for name in param_names {
        let Some(value) = headers.get(&name).and_then(decode_value) else {
            continue;
        };
        let from_args = original_args
            .and_then(Value::as_object)
            .and_then(|orig| {
                orig.iter()
                    .find(|(_, v)| scalar_text(v).as_deref() == Some(value.as_str()))
                    .map(|(k, _)| k.clone())
            })
            .and_then(|k| new_args?.get(&k).and_then(scalar_text));
        let replacement = match from_args {
            Some(new) if new != value => Some(new),
            Some(_) => None,
            None => mask(&value),
        };
        if let Some(new) = replacement
            && let Some(v) = encode_value(&new)
        {
            headers.insert(name, v);
            changed += 1;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_follow_their_masked_arguments() {
        let mut h = HeaderMap::new();
        h.insert(MCP_METHOD, HeaderValue::from_static("tools/call"));
        h.insert(MCP_NAME, HeaderValue::from_static("lookup"));
        h.insert(
            "mcp-param-email",
            HeaderValue::from_static("alice@example.com"),
        );
        h.insert("mcp-param-region", HeaderValue::from_static("eu-west"));
        let original = json!({"email": "alice@example.com", "region": "eu-west"});
        let masked = json!({"jsonrpc":"2.0","id":1,"method":"tools/call",
            "params":{"name":"lookup","arguments":{"email":"[MASKED:email]","region":"eu-west"}}});
        let n = sync_request_headers(&mut h, &masked, Some(&original), |_| None);
        assert_eq!(n, 1);
        assert_eq!(h["mcp-param-email"], "[MASKED:email]");
        assert_eq!(h["mcp-param-region"], "eu-west");
        assert_eq!(h[MCP_NAME], "lookup");
    }

    #[test]
    fn unmatched_params_are_masked_on_their_own_and_base64_round_trips() {
        let mut h = HeaderMap::new();
        let enc = encode_value("café secret").unwrap();
        assert!(enc.to_str().unwrap().starts_with("=?base64?"));
        h.insert("mcp-param-note", enc);
        let msg = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{}}});
        sync_request_headers(&mut h, &msg, None, |s| {
            Some(s.replace("secret", "[MASKED]"))
        });
        assert_eq!(decode_value(&h["mcp-param-note"]).unwrap(), "café [MASKED]");
    }

    #[test]
    fn headers_absent_stay_absent() {
        let mut h = HeaderMap::new();
        let msg = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t"}});
        assert_eq!(sync_request_headers(&mut h, &msg, None, |_| None), 0);
        assert!(h.is_empty());
    }
}
