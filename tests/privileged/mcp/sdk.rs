//! Real, unmodified SDK clients (Python and TypeScript) against the Python SDK's server over
//! HTTPS, once direct and once through the eBPF redirect and Airlock's TLS interception: the
//! same results, masking and blocking applied inline, every message in the archive.

use serde_json::Value;

use super::archive_queries::{analyst_queries_answer_on_a_real_archive, sessions_are_mcp_sessions};
use crate::harness::*;

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
