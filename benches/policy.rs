//! Benchmark: masking throughput with the shipped default policy (every built-in detector),
//! and the cost of one policy decision. No privileges needed: `cargo bench --bench policy`.
//!
//! Inputs are tool outputs shaped like real ones: MCP `tools/call` results with text content
//! and `structuredContent`, mostly clean prose and code, some with planted secrets.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use airlock::policy::{Direction, HashKey, Message, PolicySet, Subject};
use serde_json::{Value, json};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let set = PolicySet::load_dir(&dir, HashKey([9; 32])).expect("shipped policies");
    let subject = Subject {
        uid: 1000,
        gid: 1000,
        user: Some("ci".into()),
        groups: vec!["ci".into()],
        exe: Some("/usr/bin/node".into()),
        comm: "node".into(),
        cgroup: Some("/ci/job".into()),
        container: Vec::new(),
    };
    let response = Message {
        backend: "tools",
        direction: Direction::ServerToClient,
        method: Some("tools/call"),
        tool: Some("read_file"),
        arguments: None,
        is_call: false,
        scope_unknown: false,
    };
    let decision = set.decide(&subject, &response);

    for (label, outputs) in [
        ("clean tool outputs", corpus(false)),
        ("tool outputs with secrets", corpus(true)),
    ] {
        let bytes: usize = outputs.iter().map(|v| v.to_string().len()).sum();
        let mut masked = 0u64;
        let start = Instant::now();
        let mut rounds = 0u32;
        while start.elapsed() < Duration::from_secs(2) {
            for v in &outputs {
                let mut v = v.clone();
                masked += u64::from(set.mask(&decision, &mut v).total());
            }
            rounds += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{label:<28} {:>8.1} MB/s per core ({} messages of {} B average, {} values masked per round)",
            (bytes as f64 * f64::from(rounds)) / secs / 1e6,
            outputs.len(),
            bytes / outputs.len(),
            masked / u64::from(rounds),
        );
    }

    let args = json!({"path": "/etc/hosts"});
    let request = Message {
        backend: "tools",
        direction: Direction::ClientToServer,
        method: Some("tools/call"),
        tool: Some("read_file"),
        arguments: Some(&args),
        is_call: true,
        scope_unknown: false,
    };
    let n = 200_000u32;
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box(set.decide(
            std::hint::black_box(&subject),
            std::hint::black_box(&request),
        ));
    }
    println!(
        "{:<28} {:>8.0} ns per decision ({} rules)",
        "policy decision",
        start.elapsed().as_nanos() as f64 / f64::from(n),
        set.rule_count()
    );
}

/// 200 results of 0.5–8 KiB.
fn corpus(with_secrets: bool) -> Vec<Value> {
    let prose = "The deployment finished in 42 seconds. Three services were restarted and the cache was warmed; \
                 see the runbook for rollback steps. Version 1.24.3 is now live on 2026-11-21 at 14:05 UTC. ";
    let code = "fn main() {\n    let total: u64 = items.iter().map(|i| i.price * i.quantity).sum();\n    println!(\"{total}\");\n}\n";
    let secrets = [
        "contact alice.smith@example.com",
        "card 4111 1111 1111 1111",
        "AKIAIOSFODNN7EXAMPLE",
        "Bearer abcdef0123456789abcdef0123",
        "ssn 123-45-6789",
        "ghp_abcdefghijklmnopqrstuvwxyzABCDEF0123",
    ];
    (0..200)
        .map(|i| {
            let mut text = String::new();
            let target = 512 + (i * 7919) % 7680;
            while text.len() < target {
                text.push_str(if text.len().is_multiple_of(3) {
                    prose
                } else {
                    code
                });
                if with_secrets && text.len().is_multiple_of(5) {
                    text.push_str(secrets[i % secrets.len()]);
                    text.push(' ');
                }
            }
            if with_secrets {
                text.push_str(secrets[(i + 1) % secrets.len()]);
            }
            json!({
                "content": [{"type": "text", "text": text}],
                "structuredContent": {"lines": i, "summary": &text[..80]},
                "isError": false
            })
        })
        .collect()
}
