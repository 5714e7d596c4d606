//! Clear refusals (issue 18, items 4 and 5), through the redirect: what Airlock cannot carry
//! gets an answer the client can read, is counted and recorded — a protocol upgrade, a
//! malformed request head, an HTTP/2 connection preface, an answer declaring another charset
//! than UTF-8 — and a TLS client that connects to a backend by address (no SNI) verifies the
//! leaf Airlock minted for it with OpenSSL (Python's `ssl`) and Node, not only with rustls.

use std::{path::Path, process::Command, time::Duration};

use base64::Engine as _;
use serde_json::Value;

use crate::harness::*;

/// Send bytes (base64 in argv[3]) on a plain connection to argv[1]:argv[2], read the answer
/// (to its Content-Length, or with argv[4] = "eof" to the end of the connection), print it as
/// JSON.
const SEND: &str = r#"
import base64, json, socket, sys
host, port, data = sys.argv[1], int(sys.argv[2]), base64.b64decode(sys.argv[3])
until_eof = len(sys.argv) > 4 and sys.argv[4] == "eof"
s = socket.create_connection((host, port), timeout=10)
s.sendall(data)
buf = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        head, sep, body = buf.partition(b"\r\n\r\n")
        if sep and head.startswith(b"HTTP/") and not until_eof:
            length = [l.split(b":", 1)[1] for l in head.lower().split(b"\r\n") if l.startswith(b"content-length:")]
            if length and len(body) >= int(length[0]):
                break
except OSError:
    pass
head, _, body = buf.partition(b"\r\n\r\n")
status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else None
print(json.dumps({"status": status, "head": head.decode("latin-1"), "body": body.decode("utf-8", "replace"), "raw": base64.b64encode(buf).decode()}))
"#;

fn send(cg: &TestCgroup, dir: &Path, port: u16, bytes: &[u8]) -> Value {
    send_with(cg, dir, port, bytes, "one")
}

/// Like [`send`]; `read` is "one" (one answer) or "eof" (everything until the connection ends).
fn send_with(cg: &TestCgroup, dir: &Path, port: u16, bytes: &[u8], read: &str) -> Value {
    let out = with_test_hosts(Some(cg), dir, Path::new(PYTHON))
        .args(["-c", SEND, HOST, &port.to_string()])
        .arg(base64::engine::general_purpose::STANDARD.encode(bytes))
        .arg(read)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The archived refusals (decision `block`, client to server) whose payload holds `text`.
fn refusals_containing(agent: &Agent, text: &str) -> usize {
    archived_records(&agent.archive)
        .iter()
        .filter(|r| {
            r["decision"] == "block"
                && r["direction"] == "client_to_server"
                && r["payload"].as_str().unwrap_or("").contains(text)
        })
        .count()
}

/// A plain HTTP backend (the Python SDK's server) behind an agent.
fn plain_backend(name: &str) -> Option<(TestCgroup, Agent, PeerServer, u16)> {
    if !privileged() {
        return None;
    }
    let (cg, mut agent, port) = local_backend_agent(name, "tools", "tls = false", "");
    let server = PeerServer::start_with(&agent.dir, port, "json", false);
    agent.spawn();
    Some((cg, agent, server, port))
}

/// WebSocket and h2c upgrades get Airlock's 501 naming the upgrade, not the server's answer
/// to a request stripped of it (Airlock used to forward them without their upgrade headers);
/// counted and recorded.
#[test]
fn upgrade_requests_are_refused_with_a_reason() {
    let Some((cg, mut agent, _server, port)) = plain_backend("upgrades") else {
        return;
    };
    let websocket = format!(
        "GET /mcp HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let h2c = format!(
        "GET /mcp HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    );
    for (what, request) in [("websocket", websocket), ("h2c", h2c)] {
        let res = send(&cg, &agent.dir, port, request.as_bytes());
        assert_eq!(res["status"], 501, "{what}: {res}");
        let body = res["body"].as_str().unwrap();
        assert!(
            body.contains("protocol upgrades are not passed on") && body.contains(what),
            "{what}: {body}"
        );
    }
    assert_eq!(agent.agent_counter("http_refused"), 2);
    assert!(agent.sigterm().success(), "{}", agent.log());
    assert_eq!(refusals_containing(&agent, "protocol upgrades"), 2);
}

/// A request head hyper cannot parse gets a 400 whose body says what is wrong (hyper's own
/// 400 had an empty body); counted and recorded.
#[test]
fn malformed_requests_get_a_400_that_says_why() {
    let Some((cg, mut agent, _server, port)) = plain_backend("malformed") else {
        return;
    };
    let res = send(
        &cg,
        &agent.dir,
        port,
        format!("GET /mcp HTTP/1.1\r\nHost: {HOST}:{port}\r\nBad Header\r\n\r\n").as_bytes(),
    );
    assert_eq!(res["status"], 400, "{res}");
    let body = res["body"].as_str().unwrap();
    assert!(
        body.starts_with("Airlock: malformed HTTP request")
            && body.contains("is not `name: value`")
            && body.contains("Bad Header"),
        "{res}"
    );
    assert!(
        res["head"]
            .as_str()
            .unwrap()
            .contains("content-type: text/plain"),
        "{res}"
    );

    // Pipelined after a good request, in the same write: the good one is answered whole
    // first, then the 400, then the connection closes.
    let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let pipelined = format!(
        "POST /mcp HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n{init}GET /mcp HTTP/1.1\r\nHost: {HOST}:{port}\r\nBad Header\r\n\r\n",
        init.len()
    );
    let res = send_with(&cg, &agent.dir, port, pipelined.as_bytes(), "eof");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(res["raw"].as_str().unwrap())
        .unwrap();
    let raw = String::from_utf8_lossy(&raw);
    let second = raw.find("HTTP/1.1 400").unwrap_or_else(|| panic!("{raw}"));
    assert!(
        raw.starts_with("HTTP/1.1 200") && raw[..second].contains("\"serverInfo\""),
        "{raw}"
    );
    assert!(
        raw[second..].contains("Airlock: malformed HTTP request"),
        "{raw}"
    );

    assert_eq!(agent.agent_counter("http_refused"), 2);
    assert!(agent.sigterm().success(), "{}", agent.log());
    assert_eq!(refusals_containing(&agent, "is not `name: value`"), 2);
}

/// HTTP/2 with prior knowledge on a plain connection gets an HTTP/2 GOAWAY with
/// `HTTP_1_1_REQUIRED` and the reason (hyper closed without a word); counted and recorded.
#[test]
fn an_http2_preface_gets_a_goaway_that_says_why() {
    let Some((cg, mut agent, _server, port)) = plain_backend("h2-preface") else {
        return;
    };
    let res = send(
        &cg,
        &agent.dir,
        port,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    );
    let raw = base64::engine::general_purpose::STANDARD
        .decode(res["raw"].as_str().unwrap())
        .unwrap();
    // A SETTINGS frame, then GOAWAY (type 7) with HTTP_1_1_REQUIRED (0xd) and the reason.
    assert!(raw.len() > 26 && raw[12] == 7, "{raw:?}");
    assert_eq!(&raw[22..26], &[0, 0, 0, 0xd], "{raw:?}");
    let reason = String::from_utf8_lossy(&raw[26..]);
    assert!(reason.contains("HTTP/1.1"), "{reason}");
    assert_eq!(agent.agent_counter("http_refused"), 1);
    assert!(agent.sigterm().success(), "{}", agent.log());
    assert_eq!(refusals_containing(&agent, "HTTP/2 connection preface"), 1);
}

/// TLS to a backend by address: the client sends no SNI, Airlock answers with the leaf it
/// minted for the address, under an intermediate constrained to the backend's name and
/// addresses. Python's `ssl` (OpenSSL) and Node verify it, and get an HTTP answer.
#[test]
fn tls_clients_connecting_by_address_verify_the_leaf() {
    let Some((cg, mut agent, _server, port, bundle)) = tls_setup_full(
        "ip-leaf",
        "ca_file = \"BACKEND_CA\"",
        "",
        ("json", 1),
        |_| {},
    ) else {
        return;
    };
    let dir = agent.dir.clone();
    const PYTHON_CLIENT: &str = r#"
import json, socket, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
try:
    with socket.create_connection((host, port), timeout=10) as s:
        # An address as server_hostname: no SNI is sent, the address is checked in the SAN.
        with ctx.wrap_socket(s, server_hostname=host) as t:
            t.sendall(f"GET /mcp HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n".encode())
            line = t.recv(4096).split(b"\r\n")[0].decode()
    print(json.dumps({"ok": True, "status_line": line}))
except Exception as e:
    print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
"#;
    const NODE_CLIENT: &str = r#"
const tls = require("node:tls");
const fs = require("node:fs");
const [host, port, ca] = process.argv.slice(1);
const done = (v) => { console.log(JSON.stringify(v)); process.exit(0); };
const s = tls.connect({ host, port: Number(port), ca: fs.readFileSync(ca) }, () => {
  s.write(`GET /mcp HTTP/1.1\r\nHost: ${host}:${port}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n`);
});
s.setTimeout(10000, () => done({ ok: false, error: "timeout" }));
s.once("data", (d) => done({ ok: s.authorized, status_line: d.toString().split("\r\n")[0], servername: s.servername ?? null }));
s.on("error", (e) => done({ ok: false, error: `${e.code}: ${e.message}` }));
"#;
    let port_s = port.to_string();
    let bundle_s = bundle.to_str().unwrap();
    let python = with_test_hosts(Some(&cg), &dir, Path::new(PYTHON))
        .args(["-c", PYTHON_CLIENT, "127.0.0.1", &port_s, bundle_s])
        .output()
        .unwrap();
    let node = with_test_hosts(Some(&cg), &dir, &node())
        .args(["-e", NODE_CLIENT, "127.0.0.1", &port_s, bundle_s])
        .output()
        .unwrap();
    for (client, out) in [("python ssl", python), ("node tls", node)] {
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{client}: {e}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(v["ok"], true, "{client}: {v}\n{}", agent.log());
        assert!(
            v["status_line"]
                .as_str()
                .unwrap_or("")
                .starts_with("HTTP/1.1 "),
            "{client}: {v}"
        );
    }
    // Both were intercepted (the leaf is Airlock's: the clients trust only its CA).
    assert!(agent.sigterm().success(), "{}", agent.log());
}

/// Answers declaring another charset than UTF-8 in RFC 2231 notation: a success answer is
/// refused (502 naming the reason); an error answer keeps its status and headers (a 401 still
/// starts OAuth) and gets Airlock's reason for a body. Both counted and recorded.
#[test]
fn answers_in_another_charset_are_refused_and_error_answers_keep_their_status() {
    if !privileged() {
        return;
    }
    const SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/denied":
            status, ct, body = 401, "text/html; charset*=utf-8''iso-8859-1", b"<b>d\xe9nied</b>"
        else:
            status, ct = 200, "application/json; charset*=utf-8''utf-16"
            body = b'{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":false}}'
        self.send_response(status)
        self.send_header("Content-Type", ct)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer resource_metadata="/.well-known/oauth-protected-resource"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    let (cg, mut agent, port) = local_backend_agent("charset-answers", "tools", "tls = false", "");
    let mut server = Command::new(PYTHON)
        .args(["-c", SERVER, &port.to_string()])
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.spawn();
    let call =
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{}}}"#;
    let post = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n{call}",
            call.len()
        )
    };
    let ok = send(&cg, &agent.dir, port, post("/mcp").as_bytes());
    let denied = send(&cg, &agent.dir, port, post("/denied").as_bytes());
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(ok["status"], 502, "{ok}");
    assert!(
        ok["body"]
            .as_str()
            .unwrap()
            .contains("declares charset `utf-16`"),
        "{ok}"
    );
    assert_eq!(denied["status"], 401, "{denied}");
    let head = denied["head"].as_str().unwrap().to_ascii_lowercase();
    assert!(
        head.contains("www-authenticate: bearer") && head.contains("content-type: text/plain"),
        "{denied}"
    );
    let body = denied["body"].as_str().unwrap();
    assert!(
        body.starts_with("Airlock: withheld the body") && body.contains("iso-8859-1"),
        "{denied}"
    );
    assert_eq!(agent.agent_counter("answers_refused"), 2);
    assert!(agent.sigterm().success(), "{}", agent.log());
    let refused = archived_records(&agent.archive)
        .iter()
        .filter(|r| {
            r["decision"] == "block"
                && r["direction"] == "server_to_client"
                && r["payload"].as_str().unwrap_or("").contains("charset")
        })
        .count();
    assert_eq!(refused, 2);
}
