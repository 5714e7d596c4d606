//! Crash consistency: the agent SIGKILLed again and again while a client calls tools.

use std::{path::Path, process::Stdio, time::Duration};

use crate::harness::*;

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
    let count = query_archive(&agent.archive, "select count(*) from ARCHIVE");
    let rows = count[0][0].as_u64().unwrap() as usize;
    assert!(rows >= answered.len() * 2, "{rows} rows");
}
