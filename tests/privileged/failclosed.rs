//! One connection, one backend; and no local user can deny service to everyone: each limit of
//! issue 10 refuses, is counted in `airlock status`, and is recorded.

use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;

use crate::harness::*;

/// A python snippet run inside the test cgroup (so its connections are redirected) with the
/// test's `/etc/hosts`; prints what it saw as JSON.
fn python(cg: &TestCgroup, dir: &Path, user: Option<u32>, script: &str, args: &[&str]) -> Value {
    let mut cmd = match user {
        None => with_test_hosts(Some(cg), dir, Path::new(PYTHON)),
        Some(uid) => {
            let mut c = with_test_hosts(Some(cg), dir, Path::new("/usr/bin/setpriv"));
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                PYTHON.into(),
            ]);
            c
        }
    };
    let out = cmd.arg("-c").arg(script).args(args).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout={} stderr={}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Raw HTTP/1.1 over plain TCP: send the request head and body parts (pausing `pause` seconds
/// between parts), read the answer for up to `wait` seconds; print status, the body and how
/// long the answer took.
const RAW: &str = r#"
import json, socket, sys, time
host, port, parts, pause, wait = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
s = socket.create_connection((host, port), timeout=wait)
start = time.monotonic()
for i, p in enumerate(parts):
    if i:
        time.sleep(pause)
    try:
        s.sendall(p.encode())
    except OSError:
        break
data = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data and (b"408" in data.split(b"\r\n")[0] or b"event: message" in data and data.rstrip().endswith(b"}")):
            break
        # The answer is complete (the connection itself stays open for the next request): the
        # last chunk of a chunked body (it may come in the same read as the last event), or
        # as many bytes as Content-Length gives.
        if data.endswith(b"\r\n0\r\n\r\n"):
            break
        head, sep, body = data.partition(b"\r\n\r\n")
        length = [l.split(b":", 1)[1] for l in head.lower().split(b"\r\n") if l.startswith(b"content-length:")]
        if sep and length and len(body) >= int(length[0]):
            break
except OSError as e:
    pass
took = time.monotonic() - start
head, _, body = data.partition(b"\r\n\r\n")
status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else None
print(json.dumps({"status": status, "body": body.decode(errors="replace"), "took": took}))
"#;

fn raw(cg: &TestCgroup, dir: &Path, port: u16, parts: &[String], pause: f64, wait: f64) -> Value {
    python(
        cg,
        dir,
        None,
        RAW,
        &[
            HOST,
            &port.to_string(),
            &serde_json::to_string(parts).unwrap(),
            &pause.to_string(),
            &wait.to_string(),
        ],
    )
}

fn post_head(port: u16, len: usize) -> String {
    format!(
        "POST /mcp HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {len}\r\n\r\n"
    )
}

/// An agent (plain HTTP backend `tools` on a free port, the Python SDK's server behind it)
/// with top-level settings `top`.
fn plain_setup(name: &str, top: &str) -> Option<(TestCgroup, Agent, PeerServer, u16)> {
    if !privileged() {
        return None;
    }
    let (cg, mut agent, port) = local_backend_agent(name, "tools", "tls = false", top);
    let server = PeerServer::start_with(&agent.dir, port, "json", false);
    agent.spawn();
    Some((cg, agent, server, port))
}

fn error_records_containing(agent: &Agent, text: &str) -> usize {
    archived_records(&agent.archive)
        .iter()
        .filter(|r| r["decision"] == "block" && r["payload"].as_str().unwrap_or("").contains(text))
        .count()
}

/// A server name (SNI) or a `Host` naming another backend than the one the client connected
/// to is refused: with a wildcard certificate, that was a way to be judged (and brokered) as
/// the other backend while talking to this one. Case and a trailing dot do not count.
#[test]
fn a_server_name_or_host_naming_another_backend_is_refused() {
    let other = "[[backend]]\nname = \"other\"\nhost = \"other.internal.test\"\nport = PORT\naddresses = [\"127.0.0.3\"]\nca_file = \"BACKEND_CA\"\n";
    let Some((cg, mut agent, _server, port, bundle)) = tls_setup_full(
        "sni-bind",
        "ca_file = \"BACKEND_CA\"",
        "",
        ("json", 1),
        |agent| {
            let text = std::fs::read_to_string(&agent.config).unwrap();
            let port = text
                .split("port = ")
                .nth(2)
                .and_then(|p| p.lines().next())
                .unwrap()
                .to_owned();
            let ca = agent.dir.join("backend-ca.pem");
            std::fs::write(
                &agent.config,
                format!(
                    "{text}\n{}",
                    other
                        .replace("PORT", &port)
                        .replace("BACKEND_CA", ca.to_str().unwrap())
                ),
            )
            .unwrap();
        },
    ) else {
        return;
    };
    let url = format!("https://{HOST}:{port}/mcp");
    // The client connects to `tools`' address and names `other`.
    let refused = probe(
        &cg,
        &agent.dir,
        Path::new("/dev/null"),
        &url,
        "other.internal.test",
    );
    assert_eq!(refused["handshake"], false, "{refused}");
    // The refusal and its reason are in `airlock status`.
    agent.wait_for_connection_text("SNI `other.internal.test` names no backend at 127.0.0.1");
    // The right name, then a Host naming the other backend, then the right one in capitals
    // with a trailing dot.
    let init = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let headers = |host: &str| {
        serde_json::json!({"Content-Type": "application/json",
            "Accept": "application/json, text/event-stream", "Host": host})
    };
    let spec = serde_json::json!([
        {"method": "POST", "path": "/mcp", "headers": headers(&format!("{HOST}:{port}")), "body": init},
        {"method": "POST", "path": "/mcp", "headers": headers(&format!("other.internal.test:{port}")), "body": init},
        {"method": "POST", "path": "/mcp", "headers": headers(&format!("{HOST}:1")), "body": init},
        {"method": "POST", "path": "/mcp", "headers": headers(&format!("{}.:{port}", HOST.to_uppercase())), "body": init},
    ]);
    let res = requests(
        &cg,
        &agent.dir,
        &bundle,
        &format!("https://{HOST}:{port}"),
        &spec,
    );
    assert_eq!(res[0]["status"], 200, "{res:?}");
    assert_eq!(res[1]["status"], 421, "{res:?}");
    assert!(
        res[1]["body"]
            .as_str()
            .unwrap()
            .contains("this connection is for backend `tools`"),
        "{res:?}"
    );
    assert_eq!(res[2]["status"], 421, "a wrong port: {res:?}");
    assert_eq!(res[3]["status"], 200, "case and a trailing dot: {res:?}");
    assert!(agent.agent_counter("http_refused") >= 2);
    assert!(agent.sigterm().success(), "{}", agent.log());
    assert_eq!(error_records_containing(&agent, "\"status\":421"), 2);
}

/// A client that sends its body byte by byte (slow-loris) is cut off at
/// `body_read_timeout_secs`, and so is a server whose event never ends: the client gets the
/// error for its call, the stream ends.
#[test]
fn slow_bodies_and_endless_events_hit_their_deadline() {
    let Some((cg, mut agent, _server, port)) = plain_setup("slow", "body_read_timeout_secs = 2")
    else {
        return;
    };
    let res = raw(
        &cg,
        &agent.dir,
        port,
        &[post_head(port, 200), "{\"jsonrpc\":".into()],
        0.1,
        10.0,
    );
    assert_eq!(res["status"], 408, "{res}");
    let took = res["took"].as_f64().unwrap();
    assert!((1.5..6.0).contains(&took), "cut off after {took} s: {res}");
    assert_eq!(agent.agent_counter("body_read_timeouts"), 1);
    assert!(agent.sigterm().success(), "{}", agent.log());
    assert_eq!(
        error_records_containing(&agent, "body_read_timeout_secs"),
        1
    );

    // A server that starts an event and never finishes it.
    const STALLING: &str = r#"
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        part = b'data: {"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"plan'
        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.flush()
        time.sleep(30)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    let (cg, mut agent, port) = local_backend_agent(
        "stall",
        "tools",
        "tls = false",
        "body_read_timeout_secs = 2",
    );
    let mut server = Command::new(PYTHON)
        .args(["-c", STALLING, &port.to_string()])
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.spawn();
    let call =
        r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"slow","arguments":{}}}"#;
    let res = raw(
        &cg,
        &agent.dir,
        port,
        &[post_head(port, call.len()) + call],
        0.0,
        15.0,
    );
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(res["status"], 200, "{res}");
    let body = res["body"].as_str().unwrap();
    assert!(
        body.contains("\"id\":7") && body.contains("-32012"),
        "{body}"
    );
    assert!(
        !body.contains("plan"),
        "the partial event was passed on: {body}"
    );
    let took = res["took"].as_f64().unwrap();
    assert!(took < 8.0, "{took}");
    assert_eq!(agent.agent_counter("sse_event_timeouts"), 1);
    assert!(agent.sigterm().success(), "{}", agent.log());
    assert_eq!(
        error_records_containing(&agent, "body_read_timeout_secs"),
        1
    );
}

/// One uid holds at most `max_connections_per_uid` intercepted connections: the next is
/// refused (reset, recorded), and other users are not affected.
#[test]
fn one_user_cannot_take_every_connection() {
    let Some((cg, mut agent, _server, port)) =
        plain_setup("uidconns", "max_connections_per_uid = 2")
    else {
        return;
    };
    const HOLD: &str = r#"
import json, socket, sys, time
port = int(sys.argv[1])
held = [socket.create_connection(("mcp.internal.test", port), timeout=5) for _ in range(2)]
time.sleep(0.5)
try:
    # The reset may come before the connect is reported done.
    third = socket.create_connection(("mcp.internal.test", port), timeout=5)
    third.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    got = third.recv(100)
    outcome = "closed" if not got else "answered"
except OSError as e:
    outcome = type(e).__name__
# Another user's connection (root) is made by the test meanwhile.
time.sleep(2)
print(json.dumps({"third": outcome}))
"#;
    let holder = {
        let mut c = with_test_hosts(Some(&cg), &agent.dir, Path::new("/usr/bin/setpriv"));
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            PYTHON,
            "-c",
            HOLD,
        ])
        .arg(port.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
    };
    std::thread::sleep(Duration::from_secs(1));
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let root = raw(
        &cg,
        &agent.dir,
        port,
        &[post_head(port, init.len()) + init],
        0.0,
        10.0,
    );
    assert_eq!(
        root["status"], 200,
        "root is not limited by nobody's connections: {root}"
    );
    let out = holder.wait_with_output().unwrap();
    let held: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        held["third"] == "ConnectionResetError" || held["third"] == "closed",
        "{held}"
    );
    assert_eq!(agent.agent_counter("rejected_uid_connections"), 1);
    assert!(agent.sigterm().success(), "{}", agent.log());
    assert_eq!(
        error_records_containing(&agent, "uid 65534 already has 2 intercepted connections"),
        1
    );
}

/// An idle client connection holds no server connection: once an answer was read whole, the
/// server connection goes back to its connection thread's pool and the next exchange on that
/// thread, from any client connection, takes it. Client connections held open after one call
/// each cost the server at most one connection per connection thread, not one each (as a
/// reverse proxy's keep-alive pool, which nginx keeps per worker too).
#[test]
fn idle_client_connections_hold_no_server_connection() {
    let Some((cg, agent, _server, port)) = plain_setup("pooled", "") else {
        return;
    };
    // The agent runs one connection thread per CPU; more client connections than threads.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let clients = 2 * threads + 2;
    const HELD: &str = r#"
import http.client, json, subprocess, sys
port, body, clients = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
def connect():
    c = http.client.HTTPConnection("mcp.internal.test", port, timeout=10)
    c.connect()
    return c
def call(c):
    c.request("POST", "/mcp", body, headers)
    r = c.getresponse()
    r.read()
    return r.status
held, status = [], []
for _ in range(clients):
    held.append(connect())
    status.append(call(held[-1]))
# Every client connection is open and idle: count the server's connections.
ss = subprocess.run(["ss", "-Htn", "state", "established", "( sport = :%d )" % port],
                    capture_output=True, text=True).stdout
status.append(call(held[0]))
print(json.dumps({"status": status, "server_connections": len(ss.splitlines())}))
"#;
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let out = python(
        &cg,
        &agent.dir,
        None,
        HELD,
        &[&port.to_string(), init, &clients.to_string()],
    );
    assert_eq!(
        out["status"],
        serde_json::json!(vec![200; clients + 1]),
        "{out}"
    );
    let server = out["server_connections"].as_u64().unwrap() as usize;
    assert!(
        (1..=threads).contains(&server),
        "{clients} idle client connections, {threads} connection threads: {out}"
    );
}

/// One uid has at most `max_inflight_bytes_per_uid` bytes of request bodies in flight: a
/// second slow body past that is refused with 429 at once.
#[test]
fn one_user_cannot_hold_every_body_byte() {
    let Some((cg, mut agent, _server, port)) = plain_setup(
        "uidbytes",
        "max_body_bytes = 4096\nmax_inflight_bytes_per_uid = 6000",
    ) else {
        return;
    };
    const TWO: &str = r#"
import json, socket, sys, time
port = int(sys.argv[1])
head = ("POST /mcp HTTP/1.1\r\nHost: mcp.internal.test:%d\r\nContent-Type: application/json\r\n"
        "Content-Length: 4000\r\n\r\n" % port).encode()
a = socket.create_connection(("mcp.internal.test", port), timeout=10)
a.sendall(head + b" " * 3500)
time.sleep(0.5)
b = socket.create_connection(("mcp.internal.test", port), timeout=10)
b.sendall(head + b" " * 3500)
answer = b.recv(4096).decode(errors="replace")
print(json.dumps({"second": answer.split("\r\n")[0], "body": answer.split("\r\n\r\n", 1)[-1]}))
"#;
    let res = python(&cg, &agent.dir, Some(65534), TWO, &[&port.to_string()]);
    assert!(res["second"].as_str().unwrap().contains("429"), "{res}");
    assert!(
        res["body"]
            .as_str()
            .unwrap()
            .contains("max_inflight_bytes_per_uid"),
        "{res}"
    );
    assert_eq!(agent.agent_counter("refused_uid_bytes"), 1);
    assert!(agent.sigterm().success(), "{}", agent.log());
    assert_eq!(
        error_records_containing(&agent, "max_inflight_bytes_per_uid"),
        1
    );
}

/// Parsed JSON costs far more memory than its text (an array of small numbers ~30×): a body
/// whose parsing would not fit in `max_parsed_bytes` is refused before it is parsed.
#[test]
fn bodies_too_costly_to_parse_are_refused() {
    let Some((cg, mut agent, _server, port)) = plain_setup(
        "parse",
        "max_body_bytes = 65536\nmax_sse_event_bytes = 65536\nmax_parsed_bytes = 2097152",
    ) else {
        return;
    };
    let numbers = vec!["1"; 30_000].join(",");
    let costly = format!(
        r#"{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"add","arguments":{{"n":[{numbers}]}}}}}}"#
    );
    assert!(costly.len() < 65536);
    let res = raw(
        &cg,
        &agent.dir,
        port,
        &[post_head(port, costly.len()) + &costly],
        0.0,
        10.0,
    );
    assert_eq!(res["status"], 503, "{res}");
    assert!(
        res["body"].as_str().unwrap().contains("max_parsed_bytes"),
        "{res}"
    );
    // A body of ordinary shape and the same size passes.
    let text = "x".repeat(60_000);
    let plain = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"2025-11-25","capabilities":{{}},"clientInfo":{{"name":"{text}","version":"1"}}}}}}"#
    );
    let res = raw(
        &cg,
        &agent.dir,
        port,
        &[post_head(port, plain.len()) + &plain],
        0.0,
        10.0,
    );
    assert_eq!(res["status"], 200, "{res}");
    assert_eq!(agent.agent_counter("refused_parse_budget"), 1);
    assert!(agent.sigterm().success(), "{}", agent.log());
    assert_eq!(error_records_containing(&agent, "max_parsed_bytes"), 1);
}

/// A state directory that another user created beforehand (and could have planted keys in)
/// is refused at start, as is a CA key that is not root's.
#[test]
fn a_state_directory_owned_by_another_user_is_refused() {
    if !privileged() {
        return;
    }
    let (_cg, agent, _port) = local_backend_agent("owner", "tools", "tls = false", "");
    let state = agent.dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let out = Command::new(AIRLOCK)
        .args(["run", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("owned by uid 65534"), "{err}");
    assert!(
        !agent.bpffs_dir.join("links").exists(),
        "nothing was attached"
    );
}
