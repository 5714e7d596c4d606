//! A local user floods the agent's port with direct connections (each refused: no kernel
//! record). The refusals cost a bounded number of audit events, so the webhook's spool (its
//! receiver down) keeps the real findings before and after the flood, and every refusal is
//! still accounted for in a summary event.

use std::{
    io::Read as _,
    net::TcpStream,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    harness::{HOST, finish, spawn_call, tls_setup_full},
    siem::*,
};

const BLOCK_POLICY: &str = r#"
[[rule]]
id = "no-destructive-tools"
action = "block"
tools = ["delete_*"]
"#;

const FLOOD: u64 = 300;

fn refused(e: &Value) -> bool {
    e["class_uid"] == 4001 && e["activity_id"] == 5
}

#[test]
fn a_flood_of_refused_connections_costs_a_bounded_number_of_events() {
    // The webhook's receiver is down (nothing on port 9): events wait in a spool of 20.
    let top = "[events]\n[events.file]\npath = \"EVENTS_DIR/events.jsonl\"\n\
         [events.webhook]\nurl = \"http://127.0.0.1:9/ingest\"\nspool_max_files = 20\ntimeout_secs = 1\n";
    let Some((cg, mut agent, _server, port, bundle)) = tls_setup_full(
        "events-flood",
        "ca_file = \"BACKEND_CA\"",
        top,
        ("json", 1),
        |agent| {
            let cfg = std::fs::read_to_string(&agent.config)
                .unwrap()
                .replace("EVENTS_DIR", agent.dir.to_str().unwrap());
            std::fs::write(&agent.config, cfg).unwrap();
            std::fs::write(agent.dir.join("policies/block.toml"), BLOCK_POLICY).unwrap();
        },
    ) else {
        return;
    };
    let url = format!("https://{HOST}:{port}/mcp");
    let res = finish(spawn_call(
        &cg,
        &agent.dir,
        &bundle,
        &url,
        "delete_before",
        "{}",
    ));
    assert_eq!(res["error"]["code"], -32010, "{res}");

    // The flood: straight to the agent's port from outside the cgroup (no kernel record).
    let started = Instant::now();
    for _ in 0..FLOOD {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", agent.port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.read(&mut [0u8; 16]); // the reset
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.agent_counter("rejected_unattributed") < FLOOD {
        assert!(Instant::now() < deadline, "{}", agent.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("{FLOOD} refused connections in {:?}", started.elapsed());

    let res = finish(spawn_call(
        &cg,
        &agent.dir,
        &bundle,
        &url,
        "delete_after",
        "{}",
    ));
    assert_eq!(res["error"]["code"], -32010, "{res}");
    let file = agent.dir.join("events.jsonl");
    let evs = wait_file(&file, "the blocked call after the flood", |evs| {
        evs.iter().any(|e| blocked_call(e, "delete_after"))
    });
    let refusals = evs.iter().filter(|e| refused(e)).count();
    assert!(
        (1..=4).contains(&refusals),
        "{refusals} refusal events for {FLOOD} refusals"
    );
    // The spool (20 events, its receiver down) still holds both real findings.
    let spool = agent.dir.join("state/events-spool");
    let spooled: Vec<Value> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect();
    for tool in ["delete_before", "delete_after"] {
        assert!(
            spooled.iter().any(|e| blocked_call(e, tool)),
            "the spool lost the `{tool}` finding: {spooled:#?}"
        );
    }
    assert_eq!(counter(&agent, "events_webhook_spool_dropped"), 0);

    // The interval ends (10 s) with no further refusal: its summary is sent anyway.
    wait_file(&file, "the summary of the refusals", |evs| {
        evs.iter()
            .any(|e| refused(e) && e["count"].as_u64().is_some())
    });

    // At the stop, any interval still open is summarised too: every refusal accounted for.
    assert!(agent.sigterm().success(), "{}", agent.log());
    let evs = json_lines(&file);
    let refusals: Vec<&Value> = evs.iter().filter(|e| refused(e)).collect();
    let told: u64 = refusals
        .iter()
        .map(|e| e["count"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(told, FLOOD, "{refusals:#?}");
    assert!(refusals.len() <= 6, "{}", refusals.len());
    let summary = refusals
        .iter()
        .find(|e| e["count"].as_u64().is_some())
        .expect("a summary event");
    assert_eq!(summary["policy"]["uid"], "airlock:unattributed");
    validate_ocsf(&evs);
    drop(cg);
}
