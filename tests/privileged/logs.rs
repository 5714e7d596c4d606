//! The agent's own log: JSON lines with structured fields when asked, the level from the
//! configuration, and no secret in it even at `trace`.

use serde_json::Value;

use crate::harness::{HOST, add_policy, finish, requests, spawn_call_with, tls_setup_with};

const CLIENT_TOKEN: &str = "PlantedClientBearer9f8e7d6c5b4a";
const ARGUMENT_TOKEN: &str = "ghp_PlantedArgumentTokenAbCdEf0123456789";
const HEADER_TOKEN: &str = "PlantedHeaderValue1a2b3c4d5e";
const WEBHOOK_TOKEN: &str = "PlantedWebhookPathXyZ123";
const EVENTS_HOOK_TOKEN: &str = "PlantedEventsHookPathQwErTy789";

const HOLD_ECHO: &str = r#"
[[rule]]
id = "approve-echo"
action = "approve"
tools = ["echo"]
timeout_secs = 1
"#;

#[test]
fn json_log_at_trace_level_holds_no_secret() {
    // The approval webhook's URL and the events webhook's carry a secret in their path, as
    // chat webhooks do; nothing listens on port 9, so the agent logs both failures.
    let top = format!(
        "log_level = \"trace\"\nlog_format = \"json\"\napproval_webhook = \"http://127.0.0.1:9/hooks/{WEBHOOK_TOKEN}?token={WEBHOOK_TOKEN}\"\n\
         [events]\n[events.webhook]\nurl = \"http://127.0.0.1:9/services/{EVENTS_HOOK_TOKEN}?token={EVENTS_HOOK_TOKEN}\"\ntimeout_secs = 1\n"
    );
    let Some((cg, mut agent, _server, port, bundle)) =
        tls_setup_with("logs", "ca_file = \"BACKEND_CA\"", &top)
    else {
        return;
    };
    // Taken once the agent's policy hash says so (the watcher reloads it live).
    add_policy(&agent, "hold.toml", HOLD_ECHO);
    let url = format!("https://{HOST}:{port}/mcp");
    // A real SDK client with its own bearer token, a call masked on the way back (`contact`
    // answers an e-mail address) and a held call whose argument is a token.
    let contact = finish(spawn_call_with(
        &cg,
        &agent.dir,
        &bundle,
        &url,
        "contact",
        "{}",
        &[("MCP_PEER_BEARER", CLIENT_TOKEN)],
    ));
    assert!(
        !contact.to_string().contains("alice@example.com"),
        "{contact}"
    );
    let held = finish(spawn_call_with(
        &cg,
        &agent.dir,
        &bundle,
        &url,
        "echo",
        &format!("{{\"text\": \"{ARGUMENT_TOKEN}\"}}"),
        &[("MCP_PEER_BEARER", CLIENT_TOKEN)],
    ));
    assert!(held.get("error").is_some(), "denied at the timeout: {held}");
    // Refused requests: a header that disagrees with the body, a body that is not JSON.
    let spec = serde_json::json!([
        {"method": "POST", "path": "/mcp", "headers": {
            "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
            "Mcp-Method": HEADER_TOKEN, "Cookie": format!("session={HEADER_TOKEN}"),
            "Authorization": format!("Bearer {CLIENT_TOKEN}")},
         "body": {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                  "params": {"name": "echo", "arguments": {"text": ARGUMENT_TOKEN}}}},
    ]);
    let res = requests(
        &cg,
        &agent.dir,
        &bundle,
        &format!("https://{HOST}:{port}"),
        &spec,
    );
    assert!(res[0]["status"].as_u64().unwrap() >= 400, "{res:?}");
    assert!(agent.sigterm().success(), "{}", agent.log());

    let log = agent.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 20, "a trace-level log: {log}");
    let mut levels = std::collections::BTreeSet::new();
    for line in &lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["target"].is_string(),
            "{line}"
        );
        levels.insert(v["level"].as_str().unwrap().to_owned());
    }
    assert!(
        levels.contains("TRACE") || levels.contains("DEBUG"),
        "{levels:?}"
    );
    // Structured fields: the webhook failure names its host, not its path.
    let webhook = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["message"] == "approval webhook failed")
        .unwrap_or_else(|| panic!("the webhook failure is logged: {log}"));
    assert_eq!(webhook["webhook"], "http://127.0.0.1:9/…", "{webhook}");
    // The events webhook's failure too: its URL without path or query.
    let events_hook = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("events webhook failed"))
        })
        .unwrap_or_else(|| panic!("the events webhook failure is logged: {log}"));
    assert_eq!(events_hook["url"], "http://127.0.0.1:9/…", "{events_hook}");
    for secret in [
        EVENTS_HOOK_TOKEN,
        CLIENT_TOKEN,
        ARGUMENT_TOKEN,
        HEADER_TOKEN,
        WEBHOOK_TOKEN,
        "alice@example.com",
    ] {
        let leaked: Vec<&&str> = lines.iter().filter(|l| l.contains(secret)).collect();
        assert!(leaked.is_empty(), "`{secret}` in the log: {leaked:#?}");
    }
}
