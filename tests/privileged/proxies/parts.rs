//! The real parts of the egress proxy tests: squid and tinyproxy as plain processes with the
//! test's own configurations, the scripts the clients and servers run, small helpers.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

pub(super) const SQUID: &str = "/usr/sbin/squid";
pub(super) const TINYPROXY: &str = "/usr/bin/tinyproxy";
/// A non-MCP HTTPS server behind the same proxy.
pub(super) const OTHER: &str = "other.internal.test";
/// A name that resolves (for the agent and the proxy) to the backend's address.
pub(super) const ALIAS: &str = "alias.internal.test";
/// The Basic proxy credentials of the tinyproxy test: never in the archive or the log.
pub(super) const PROXY_PASSWORD: &str = "pr0xy-s3cret-9f2c";

/// A TLS server answering every GET with `hello from other` (system Python, stdlib).
pub(super) const OTHER_SERVER: &str = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        b = b"hello from other\n"
        self.send_response(200); self.send_header("Content-Length", str(len(b))); self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2], sys.argv[3])
s.socket = ctx.wrap_socket(s.socket, server_side=True)
s.serve_forever()
"#;

/// httpx (as the MCP SDK uses it) GET through the proxy of the environment.
pub(super) const HTTPX_GET: &str = r#"
import httpx2, json, os, ssl, sys
r = httpx2.get(sys.argv[1], verify=ssl.create_default_context(cafile=sys.argv[2]))
print(json.dumps({"pid": os.getpid(), "status": r.status_code, "body": r.text}))
"#;

/// Raw proxy requests, one connection each; everything each connection answered.
pub(super) const PROBES: &str = r#"
import json, os, socket, sys
out = {"pid": os.getpid(), "answers": []}
for data in json.loads(sys.argv[2]):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    s.sendall(data.encode("latin-1"))
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except OSError as e:
        got += f"<{type(e).__name__}>".encode()
    out["answers"].append(got.decode("latin-1"))
print(json.dumps(out))
"#;

/// NTLM with squid's fake helper, by hand: the first CONNECT (type 1, for a non-MCP host) is
/// answered 407 with a challenge on the same connection; the second (type 3) names the MCP
/// backend. Then TLS, trusting only `argv[4]`.
pub(super) const NTLM_SWITCH: &str = r#"
import json, os, socket, ssl, sys
T1 = "TlRMTVNTUAABAAAABoIIAAAAAAAAAAAAAAAAAAAAAAA="
T3 = ("TlRMTVNTUAADAAAAGAAYAEAAAAAwADAAWAAAAAAAAACIAAAABQAFAIgAAAALAAsAjQAAAAAAAAAAAAAABoIIAJO9jm8E"
      "oAOnWfvD/MUptBP2QcivtaQs/k83shg3cWbKqbshRnzq0zQBAQAAAAAAAAC6WbNfht0B9kHIr7WkLP4AAAAAAAAAAGFs"
      "aWNlV09SS1NUQVRJT04=")
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
f = s.makefile("rb")
def answer():
    status = int(f.readline().split()[1]); length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        if k.strip().lower() == "content-length": length = int(v)
    f.read(length)
    return status
def connect(target, token):
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: NTLM {token}\r\n\r\n".encode())
    return answer()
out = {"pid": os.getpid(), "first": connect(sys.argv[3], T1), "second": connect(sys.argv[2], T3)}
try:
    t = ssl.create_default_context(cafile=sys.argv[4]).wrap_socket(s, server_hostname=sys.argv[2].split(":")[0])
    out["issuer"] = dict(x[0] for x in t.getpeercert()["issuer"])
except (ssl.SSLError, OSError) as e:
    out["error"] = str(e)
print(json.dumps(out))
"#;

/// Through the proxy with Basic credentials (`http.client`'s tunnel): two calls on one
/// connection, then, once `argv[5]` exists, a third on the same connection.
pub(super) const REDIAL: &str = r#"
import base64, http.client, json, os, ssl, sys, time
c = http.client.HTTPSConnection("127.0.0.1", int(sys.argv[1]), timeout=20,
                                context=ssl.create_default_context(cafile=sys.argv[4]))
c.set_tunnel(sys.argv[2], int(sys.argv[3]),
             headers={"Proxy-Authorization": "Basic " + base64.b64encode(b"bob:redial").decode()})
body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "redial", "version": "1"}}})
def call():
    c.request("POST", "/mcp", body, {"Content-Type": "application/json",
                                     "Accept": "application/json, text/event-stream"})
    r = c.getresponse(); r.read()
    return r.status
statuses = [call(), call()]
print("two calls", flush=True)
while not os.path.exists(sys.argv[5]):
    time.sleep(0.02)
statuses.append(call())
print(json.dumps({"pid": os.getpid(), "statuses": statuses}), flush=True)
"#;

/// A real proxy, a plain process of this test; stopped on drop.
pub(super) struct RealProxy {
    child: Child,
    pub(super) port: u16,
    log: PathBuf,
}

/// `/etc/hosts` for the proxies (and the agent): every test name on loopback.
pub(super) fn hosts(dir: &Path) -> PathBuf {
    let path = dir.join("proxy-hosts");
    std::fs::write(
        &path,
        format!("127.0.0.1 localhost {HOST} {OTHER} {ALIAS}\n::1 localhost\n"),
    )
    .unwrap();
    path
}

impl RealProxy {
    /// squid on a free loopback port; `access` is its `http_access` (and auth) configuration.
    pub(super) fn squid(dir: &Path, access: &str) -> RealProxy {
        use std::os::unix::fs::PermissionsExt as _;
        let pdir = dir.join("squid");
        std::fs::create_dir_all(&pdir).unwrap();
        // squid drops to its own user: its logs are written there.
        std::fs::set_permissions(&pdir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = free_port();
        let conf = pdir.join("squid.conf");
        std::fs::write(
            &conf,
            format!(
                "http_port 127.0.0.1:{port}\npid_filename {d}/squid.pid\naccess_log stdio:{d}/access.log\n\
                 cache_log {d}/cache.log\ncache_store_log none\ncache deny all\ncoredump_dir {d}\n\
                 hosts_file {hosts}\npinger_enable off\nvisible_hostname airlock-test\n\
                 shutdown_lifetime 0 seconds\n{access}\n",
                d = pdir.display(),
                hosts = hosts(dir).display(),
            ),
        )
        .unwrap();
        let out = std::fs::File::create(pdir.join("squid.out")).unwrap();
        let child = Command::new(SQUID)
            .args(["-N", "-f"])
            .arg(&conf)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("squid: `cargo xtask setup` installs it");
        Self::ready(child, port, pdir.join("access.log"))
    }

    /// tinyproxy on a free loopback port, resolving names through the test's hosts file (its
    /// own mount namespace), with Basic authentication.
    pub(super) fn tinyproxy(dir: &Path, ports: &[u16], user: &str, password: &str) -> RealProxy {
        let port = free_port();
        let log = dir.join("tinyproxy.log");
        let conf = dir.join("tinyproxy.conf");
        let connect: String = ports.iter().map(|p| format!("ConnectPort {p}\n")).collect();
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{log}\"\nLogLevel Connect\n\
                 PidFile \"{pid}\"\nMaxClients 64\nAllow 127.0.0.1\n{connect}BasicAuth {user} {password}\n",
                log = log.display(),
                pid = dir.join("tinyproxy.pid").display(),
            ),
        )
        .unwrap();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$1" /etc/hosts && shift && exec "$@""#)
            .arg("sh")
            .arg(hosts(dir))
            .args([TINYPROXY, "-d", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy: `cargo xtask setup` installs it");
        Self::ready(child, port, log)
    }

    pub(super) fn ready(mut child: Child, port: u16, log: PathBuf) -> RealProxy {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the proxy exited with {status} before it listened");
            }
            assert!(Instant::now() < deadline, "the proxy did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        RealProxy { child, port, log }
    }

    pub(super) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(super) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the proxy's log has `text` (squid writes its access log a moment later).
    pub(super) fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no `{text}` in the proxy's log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RealProxy {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our child; SIGTERM lets squid stop its helpers.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The variables a client behind a proxy reads (httpx prefers the lower-case ones).
pub(super) fn proxy_env(cmd: &mut Command, url: &str) {
    for key in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
        cmd.env(key, url);
    }
    for key in ["NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"] {
        cmd.env(key, "");
    }
}

/// Run `cmd`; its pid and output.
pub(super) fn run(mut cmd: Command) -> (u32, Output) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    (pid, child.wait_with_output().unwrap())
}

pub(super) fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A test CA and a certificate for `OTHER` (the non-MCP server's own).
pub(super) fn other_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "other test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![OTHER.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths = (
        dir.join("other-ca.pem"),
        dir.join("other.pem"),
        dir.join("other.key"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// undici's fetch through `EnvHttpProxyAgent`, as the TypeScript SDK client does it.
pub(super) const NODE_GET: &str = r#"
import { createRequire } from "node:module";
import path from "node:path";
const require = createRequire(path.join(process.env.NODE_PATH, "x.js"));
const { EnvHttpProxyAgent, setGlobalDispatcher } = require("undici");
setGlobalDispatcher(new EnvHttpProxyAgent());
const r = await fetch(process.argv[2]);
console.log(JSON.stringify({ status: r.status, body: await r.text() }));
"#;

pub(super) fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(super) struct KillOnDrop(pub(super) Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
