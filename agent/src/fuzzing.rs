//! The fuzz targets' bodies (`fuzz/fuzz_targets/*.rs` call these with libFuzzer's input, and
//! `tests/fuzz_corpora.rs` replays the checked-in corpora through them): each one runs a
//! parser or the masker on arbitrary bytes and panics when an invariant breaks.

use std::sync::OnceLock;

use serde_json::Value;

use crate::{
    config::{Backend, BackendMode, HttpAllow, UnknownSni},
    mcp::{
        jsonrpc::{self, Body, Parsed},
        media::MediaType,
        sse, strict,
    },
    policy::{Direction, HashKey, Message, PolicySet, Subject},
    proxy::http::{
        Class, classify,
        framing::{Framer, Step},
    },
};

/// Secrets the masker must never let through (shipped default policy detectors).
pub const SECRETS: &[&str] = &[
    "alice.smith@example.com",
    "4111 1111 1111 1111",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_abcdefghijklmnopqrstuvwxyzABCDEF0123",
    "123-45-6789",
    "DE89370400440532013000",
    "+1 415-555-2671",
];

/// Request classification: whatever the method, path and bytes, a body classified as MCP
/// holds only valid messages and survives a round trip; one passed through as non-MCP is
/// neither JSON Airlock failed to parse nor JSON-RPC.
pub fn request_classification(data: &[u8]) {
    let (head, body) = data.split_at(data.len().min(2));
    let method = match head.first().copied().unwrap_or(0) % 4 {
        0 => http::Method::POST,
        1 => http::Method::GET,
        2 => http::Method::DELETE,
        _ => http::Method::PUT,
    };
    let path = [
        "/mcp",
        "/.well-known/oauth-protected-resource",
        "/.well-known/../mcp",
        "/oauth/token",
    ][usize::from(head.get(1).copied().unwrap_or(0) % 4)];
    match classify(&method, path, body, backend()) {
        Class::Mcp(parsed) => {
            for m in parsed.messages() {
                jsonrpc::validate(m).expect("a classified message is valid");
            }
            let again = Body::parse(&parsed.to_bytes()).expect("re-serialised body parses");
            assert_eq!(again, Parsed::Messages(parsed), "round trip");
        }
        Class::Passthrough => {
            assert!(backend().allow_http.iter().any(|a| a.allows(&method, path)));
            if strict::looks_like_json(body) {
                let v = strict::parse(body).expect("JSON-looking passthrough is strict JSON");
                assert!(!jsonrpc::looks_like_jsonrpc(&v), "JSON-RPC passed through");
            }
        }
        Class::Empty => assert!(body.is_empty()),
        Class::Refused { .. } => {}
    }
}

fn backend() -> &'static Backend {
    static B: OnceLock<Backend> = OnceLock::new();
    B.get_or_init(|| mcp_backend(&["GET /.well-known/*", "POST /oauth/*"]))
}

/// A TLS `mode = "mcp"` backend allowing `allow_http`, for classifying bodies outside an
/// agent (here and in the differential tests).
pub fn mcp_backend(allow_http: &[&str]) -> Backend {
    Backend {
        name: "test".into(),
        host: "mcp.test.invalid".into(),
        port: 443,
        tls: true,
        addresses: Vec::new(),
        ca_file: None,
        mode: BackendMode::Mcp,
        unknown_sni: UnknownSni::Reject,
        credentials_file: None,
        allow_http: allow_http
            .iter()
            .filter_map(|t| HttpAllow::parse(t).ok())
            .collect(),
    }
}

/// JSON-RPC bodies (one message or a batch): a parsed body is all valid messages, its ids
/// have a canonical text, and it round-trips.
pub fn jsonrpc_batch(data: &[u8]) {
    let Ok(parsed) = Body::parse(data) else {
        return;
    };
    match parsed {
        Parsed::Messages(body) => {
            for m in body.messages() {
                jsonrpc::validate(m).expect("valid");
                let _ = jsonrpc::id_text(m);
                let _ = jsonrpc::target_name(m);
            }
            let text = body.to_bytes();
            assert_eq!(
                Body::parse(&text).expect("round trip"),
                Parsed::Messages(body)
            );
        }
        Parsed::Other(v) => assert!(!jsonrpc::looks_like_jsonrpc(&v)),
    }
}

/// The SSE parser: the events do not depend on how the stream is cut into chunks, and a
/// re-encoded event parses back to the same data, type and id.
pub fn sse_parser(data: &[u8]) {
    let cut = data.first().map_or(1, |b| usize::from(*b).max(1));
    let whole = events(&[data]);
    let chunks: Vec<&[u8]> = data.chunks(cut).collect();
    let pieces = events(&chunks);
    match (whole, pieces) {
        (Ok(a), Ok(b)) => {
            let summary = |e: &[sse::Event]| {
                e.iter()
                    .map(|e| {
                        (
                            e.data(),
                            e.event_type().map(str::to_owned),
                            e.id().map(str::to_owned),
                        )
                    })
                    .collect::<Vec<_>>()
            };
            assert_eq!(summary(&a), summary(&b), "chunking changed the events");
            for e in &a {
                // Re-encoded events go out after the stream's start (where a byte-order mark
                // would be stripped): parse them there.
                let encoded = e.encode(e.data().as_deref());
                let mut again = events(&[b":\n\n", &encoded]).expect("re-encoded parses");
                let again = again.split_off(1);
                assert_eq!(summary(std::slice::from_ref(e)), summary(&again));
            }
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "chunking changed the outcome: {:?} vs {:?}",
            a.is_ok(),
            b.is_ok()
        ),
    }
}

fn events(chunks: &[&[u8]]) -> Result<Vec<sse::Event>, sse::SseError> {
    let mut p = sse::Parser::new(64 * 1024);
    let mut out = Vec::new();
    for c in chunks {
        p.feed(c, &mut out)?;
    }
    Ok(out)
}

/// The masker with the shipped default policy: a secret planted in any string of any JSON
/// value never survives, and the output is valid JSON of the same shape (except where a
/// number or a key held a secret).
pub fn masker(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let secret = SECRETS[usize::from(pick) % SECRETS.len()];
    let planted = format!("«{secret}»");
    let mut value = strict::parse(rest)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(rest).into_owned()));
    if !plant(&mut value, &planted) {
        value = Value::Array(vec![value, Value::String(planted.clone())]);
    }
    let set = default_policy();
    let decision = set.decide(
        &Subject::default(),
        &Message {
            backend: "fuzz",
            direction: Direction::ServerToClient,
            method: None,
            tool: None,
            arguments: None,
            is_call: false,
            scope_unknown: true,
        },
    );
    let before = value.clone();
    set.mask(&decision, &mut value);
    let text = serde_json::to_string(&value).expect("serialisable");
    assert!(!text.contains(&planted), "{secret} survived: {text}");
    let back: Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(back, value);
    assert!(
        same_shape(&before, &value),
        "shape changed: {before} -> {value}"
    );
}

/// Put `text` into the first string leaf (a space either side); false when there is none.
fn plant(v: &mut Value, text: &str) -> bool {
    match v {
        Value::String(s) => {
            s.push(' ');
            s.push_str(text);
            s.push(' ');
            true
        }
        Value::Array(items) => items.iter_mut().any(|i| plant(i, text)),
        Value::Object(m) => m.values_mut().any(|i| plant(i, text)),
        _ => false,
    }
}

fn same_shape(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(_), Value::String(_)) | (Value::Number(_), Value::String(_)) => true,
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_shape(p, q))
        }
        (Value::Object(x), Value::Object(y)) => x.len() == y.len(),
        (p, q) => p == q,
    }
}

fn default_policy() -> &'static PolicySet {
    static SET: OnceLock<PolicySet> = OnceLock::new();
    SET.get_or_init(|| {
        PolicySet::parse(
            &[(
                "default.toml".into(),
                include_str!("../../policies/default.toml").to_owned(),
            )],
            HashKey([7; 32]),
        )
        .expect("the shipped policy is valid")
    })
}

/// The policy-file parser: any text either loads, or is refused with located errors; a loaded
/// set decides and masks without panicking.
pub fn policy_parser(data: &[u8]) {
    let text = String::from_utf8_lossy(data).into_owned();
    match PolicySet::parse(&[("fuzz.toml".into(), text)], HashKey([1; 32])) {
        Ok(set) => {
            let args = serde_json::json!({"sql": "drop table x", "email": "a@b.io"});
            let d = set.decide(
                &Subject::default(),
                &Message {
                    backend: "fuzz",
                    direction: Direction::ClientToServer,
                    method: Some("tools/call"),
                    tool: Some("query"),
                    arguments: Some(&args),
                    is_call: true,
                    scope_unknown: false,
                },
            );
            let mut v = args.clone();
            set.mask(&d, &mut v);
            let _ = set.tool_visible(&Subject::default(), "fuzz", "query");
        }
        Err(errors) => assert!(!errors.0.is_empty()),
    }
}

/// Request framing: what passes to hyper, and whether the stream is refused, do not depend on
/// how the stream is cut into reads; what passes is a prefix of the stream; a refusal's
/// answer is an HTTP/1.1 4xx or an HTTP/2 GOAWAY.
pub fn request_framing(data: &[u8]) {
    let cut = data.first().map_or(1, |b| usize::from(*b % 64).max(1));
    let whole = frame(&[data]);
    let chunks: Vec<&[u8]> = data.chunks(cut).collect();
    let pieces = frame(&chunks);
    assert_eq!(whole.0, pieces.0, "chunking changed what passed");
    assert_eq!(
        whole.1.is_some(),
        pieces.1.is_some(),
        "chunking changed the verdict"
    );
    assert!(data.starts_with(&whole.0));
    if let Some(m) = whole.1 {
        let answer = m.answer();
        assert!(answer.starts_with(b"HTTP/1.1 4") || answer.starts_with(&[0, 0, 0, 4]));
    }
}

fn frame(chunks: &[&[u8]]) -> (Vec<u8>, Option<crate::proxy::http::framing::Malformed>) {
    let mut framer = Framer::default();
    let (mut buf, mut passed) = (Vec::new(), Vec::new());
    for c in chunks {
        buf.extend_from_slice(c);
        while !buf.is_empty() {
            match framer.step(&buf) {
                Step::Pass(0) | Step::More => break,
                Step::Pass(n) => passed.extend(buf.drain(..n.min(buf.len()))),
                Step::Refuse(m) => return (passed, Some(m)),
            }
        }
    }
    (passed, None)
}

/// Media types: a `Content-Type` accepted as UTF-8 declares no charset or UTF-8, and reading
/// its parameters never panics.
pub fn media_type(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(m) = MediaType::parse(&text) else {
        return;
    };
    for name in ["charset", "boundary", "x"] {
        let _ = m.param(name);
    }
    if m.require_utf8().is_ok() {
        let charset = m.charset().expect("accepted");
        assert!(matches!(charset.as_deref(), None | Some("utf-8" | "utf8")));
    }
}

/// Proxy requests (`egress::wire`): a head is found at the same place whatever pieces its bytes
/// arrive in, lies within them, and names its target without panicking; the body after it ends
/// at the same byte in any split; a response head likewise lies within its bytes.
pub fn proxy_request(data: &[u8]) {
    use crate::proxy::forward::wire::{self, BodyFollower};
    let cut = data.first().map_or(1, |b| usize::from(*b % 64).max(1));
    let whole = wire::parse_request(data);
    let mut pieces = Ok(None);
    for end in (cut..data.len()).step_by(cut).chain([data.len()]) {
        pieces = wire::parse_request(&data[..end]);
        if !matches!(pieces, Ok(None)) {
            break;
        }
    }
    match (&whole, &pieces) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "pieces found another head"),
        (Err(_), Err(_)) => {}
        _ => panic!("pieces changed the verdict: {whole:?} / {pieces:?}"),
    }
    if let Ok(Some(head)) = whole {
        assert!(head.len <= data.len() && head.len <= wire::MAX_HEAD);
        let _ = head.authority();
        let rest = &data[head.len..];
        // Where the body ends (`None`: not within these bytes).
        let follow = |chunks: &mut dyn Iterator<Item = &[u8]>| {
            let mut f = BodyFollower::new(head.body);
            let mut used = 0;
            for c in chunks {
                let p = f.feed(c)?;
                if p.done {
                    return Ok(Some(used + p.used));
                }
                used += p.used;
            }
            Ok::<_, wire::Malformed>(None)
        };
        let once = follow(&mut std::iter::once(rest));
        let split = follow(&mut rest.chunks(cut));
        assert_eq!(
            once.is_err(),
            split.is_err(),
            "chunking changed the body's verdict"
        );
        if let (Ok(a), Ok(b)) = (once, split) {
            assert_eq!(a, b, "chunking moved the body's end");
        }
    }
    if let Ok(Some(r)) = wire::parse_response(data, cut.is_multiple_of(2), cut.is_multiple_of(3)) {
        assert!(r.len <= data.len());
    }
}
