//! HTTP-level handling of an MCP backend: the caller's principal from a bearer JWT, non-MCP
//! requests passed through, JSON-RPC batches, malformed bodies, a plain-HTTP backend and the
//! body-size cap.

use serde_json::Value;

use crate::harness::*;

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
    add_policy(&agent, "block.toml", BLOCK_POLICY);
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
