//! The official MCP conformance suite (server mode) run against a fixture server direct and
//! through Airlock.

use std::{path::Path, process::Command};

use serde_json::Value;

use crate::harness::*;

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
    let mut fixture = Command::new(venv_python());
    fixture
        .arg(CONFORMANCE_FIXTURE)
        .args(["--port", &port.to_string()])
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key);
    let server = PeerServer::spawn(fixture, &dir, port);
    use_backend_ca(&agent, &ca);
    agent.spawn();
    let bundle = airlock_ca_bundle(&agent);
    let url = format!("https://{HOST}:{port}/mcp");

    let (ok, out) = conformance(None, &dir, &ca, &url, "direct");
    assert!(ok, "direct run does not match the baseline:\n{out}");
    let (ok, out) = conformance(Some(&cg), &dir, &bundle, &url, "through");
    assert!(ok, "through Airlock:\n{out}\nagent log:\n{}", agent.log());
    assert!(out.contains("Baseline check passed"), "{out}");

    assert!(agent.sigterm().success(), "{}", agent.log());
    drop(server);
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
