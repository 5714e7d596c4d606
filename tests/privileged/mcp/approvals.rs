//! Calls held for a human's approval (`action = "approve"`): approved, denied, timed out, and
//! announced to a webhook.

use std::{
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

/// `action = "approve"`: the call waits; `airlock approvals approve` lets it through (the
/// client gets the server's answer), `deny` refuses it (-32013), silence past `timeout_secs`
/// refuses it too; an approval naming another call's digest is refused. Each decision is in
/// the archive with the approver's uid and the wait.
#[test]
fn approvals_hold_calls_until_a_human_decides() {
    let (hook_port, hooked) = webhook_receiver();
    let Some((cg, mut agent, _server, port, bundle)) = tls_setup_with(
        "approvals",
        "ca_file = \"BACKEND_CA\"",
        &format!("approval_webhook = \"http://127.0.0.1:{hook_port}/hook\""),
    ) else {
        return;
    };
    add_policy(&agent, "approve.toml", APPROVE_POLICY);
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
    let held = wait_pending(&agent);
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
    let first_hook = wait_until(
        Duration::from_secs(10),
        || "no webhook call".to_owned(),
        || hooked.lock().unwrap().first().cloned(),
    );
    let announced: Value = serde_json::from_str(&first_hook).unwrap();
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
    let held = wait_pending(&agent);
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

/// A webhook receiver on loopback: one thread, answers 204 and keeps the bodies it is POSTed.
/// Returns its port and those bodies.
fn webhook_receiver() -> (u16, Arc<Mutex<Vec<String>>>) {
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_port = hook.local_addr().unwrap().port();
    let hooked = Arc::new(Mutex::new(Vec::<String>::new()));
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
    (hook_port, hooked)
}
