//! An operator's controls over a live backend: brokered credentials, pinned tool definitions,
//! and killing a caller's live connections.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

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
    use_backend_ca(&agent, &dir.join("backend-ca.pem"));
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
    let pins_file = dir.join("state/tool-pins.json");
    let pins = wait_until(
        Duration::from_secs(5),
        || {
            format!(
                "tool pins not saved: {:?}",
                std::fs::read_to_string(&pins_file)
            )
        },
        || {
            std::fs::read_to_string(&pins_file)
                .ok()
                .filter(|p| p.contains("echo"))
        },
    );
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
    wait_until(
        Duration::from_secs(20),
        || format!("no live connection of {pid}"),
        || {
            agent.status()["connections"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["tgid"] == pid && c["state"] == "open")
                .then_some(())
        },
    );
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
