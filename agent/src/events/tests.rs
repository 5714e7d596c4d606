//! The mapper's events, one of each kind, validated against the OCSF 1.7.0 schema (the
//! official export with its profiles, and pydantic-ocsf's models: `target/test-venv-ocsf`,
//! `tests/support/ocsf_validate.py`), and the sinks' local behaviour.

use std::{io::Write as _, path::PathBuf, process::Stdio};

use serde_json::{Value, json};

use super::ocsf;
use crate::{
    archive::{MaskedPayload, RecordInput},
    attribution::Attribution,
    observe::AgentEvent,
};

/// A planted secret: it is in the arguments and payloads below, and must be in no event.
pub(crate) const PLANTED: &str = "ghp_PLANTEDsecretTOKEN0123456789abcdefAB";

fn attribution() -> Attribution {
    Attribution {
        pid: 4242,
        tgid: 4240,
        uid: 1000,
        gid: 1000,
        user: Some("alice".into()),
        group: Some("alice".into()),
        comm: "python3".into(),
        exe: Some("/usr/bin/python3.11".into()),
        cmdline: Some(vec!["python3".into(), format!("--token={PLANTED}")]),
        cgroup_id: 7,
        cgroup: Some("/runner/job-1".into()),
        original_dst: "10.1.2.3:443".parse().unwrap(),
        family: "ipv4",
        process_seen: true,
        netns: 0,
        container: None,
    }
}

pub(crate) fn record(kind: &str, decision: &str) -> RecordInput {
    let a = attribution();
    RecordInput {
        ts_us: 1_764_468_000_123_456,
        host: "runner-7".into(),
        session_id: "a1b2-17".into(),
        mcp_session_id: Some("mcp-sess-9".into()),
        seq: 3,
        direction: "client_to_server".into(),
        kind: kind.into(),
        method: Some("tools/call".into()),
        tool: Some("read_file".into()),
        jsonrpc_id: Some("7".into()),
        payload: Some(MaskedPayload::for_tests(format!(
            r#"{{"params":{{"arguments":{{"token":"{PLANTED}"}}}}}}"#
        ))),
        decision: decision.into(),
        rules: vec!["no-secrets-out".into()],
        masked_detectors: vec![],
        latency_us: Some(1500),
        pid: Some(a.pid),
        tgid: Some(a.tgid),
        uid: Some(a.uid),
        gid: Some(a.gid),
        user: a.user.clone(),
        comm: Some(a.comm.clone()),
        exe: a.exe.clone(),
        cgroup: a.cgroup.clone(),
        backend: Some("files".into()),
        server_addr: Some("10.1.2.3:443".into()),
        sni: Some("files.example".into()),
        principal_iss: None,
        principal_sub: None,
        policy_hash: Some("sha256:abcd".into()),
    }
}

/// One event of every kind Airlock emits, with the kind's name.
pub(crate) fn every_kind() -> Vec<(&'static str, Value)> {
    let v = "0.1.0";
    let now = 1_764_468_000_500;
    let mut out = Vec::new();
    let blocked = record("request", "block");
    out.push(("blocked", ocsf::from_record(&blocked, v).unwrap()));
    let mut masked = record("response", "mask");
    masked.direction = "server_to_client".into();
    masked.masked_detectors = vec!["github_token".into(), "github_token".into(), "jwt".into()];
    // A record names the rules that masked something, in order: the first is the policy.
    masked.rules = vec!["mask-tokens".into(), "mask-jwts".into()];
    out.push(("masked", ocsf::from_record(&masked, v).unwrap()));
    let mut approved = record("approval", "approved");
    approved.payload = Some(MaskedPayload::agent_event(
        &json!({"approval_id": 1, "by_uid": 0, "decision": "approved"}),
    ));
    out.push(("approved", ocsf::from_record(&approved, v).unwrap()));
    let mut denied = record("approval", "denied");
    denied.payload = Some(MaskedPayload::agent_event(
        &json!({"approval_id": 2, "by_uid": 0, "decision": "denied"}),
    ));
    out.push(("denied", ocsf::from_record(&denied, v).unwrap()));
    let mut timed_out = record("approval", "denied");
    timed_out.payload = Some(MaskedPayload::agent_event(
        &json!({"approval_id": 3, "by_uid": null, "decision": "denied"}),
    ));
    out.push(("timed_out", ocsf::from_record(&timed_out, v).unwrap()));
    let events = [
        (
            "held",
            AgentEvent::CallHeld {
                approval_id: 4,
                rule: "approve-deploys".into(),
                backend: "files".into(),
                method: "tools/call".into(),
                tool: Some("deploy".into()),
                session_id: "a1b2-17".into(),
                timeout_secs: 300,
                actor: Box::new(attribution()),
            },
        ),
        ("started", AgentEvent::Started { version: v.into() }),
        (
            "stopped",
            AgentEvent::Stopped {
                reason: "SIGTERM".into(),
            },
        ),
        (
            "policy_reloaded",
            AgentEvent::PolicyReloaded {
                hash: "sha256:abcd".into(),
                reason: "SIGHUP".into(),
            },
        ),
        (
            "policy_refused",
            AgentEvent::PolicyRefused {
                error: "rules.toml: rule `x`: unknown detector `y`".into(),
                reason: "file change".into(),
            },
        ),
        (
            "tool_changed",
            AgentEvent::ToolDefinitionChanged {
                backend: "files".into(),
                tool: "read_file".into(),
                pinned: "sha256:1111".into(),
                seen: "sha256:2222".into(),
            },
        ),
        (
            "stdio_unmanaged",
            AgentEvent::UnmanagedStdioServer {
                server: "stdio-mcp".into(),
                start: 123456,
                parent_exe: Some("/usr/bin/python3.11".into()),
                actor: Box::new(attribution()),
            },
        ),
        (
            "verification_failed",
            AgentEvent::VerificationFailed {
                host: "runner-7".into(),
                problem: "date=2026-11-30/hour=01/part-0.parquet: record 12 hash mismatch".into(),
            },
        ),
        (
            "connection_rejected",
            AgentEvent::ConnectionRejected {
                rule: "airlock:over_capacity".into(),
                reason: "over capacity: uid 1000 has 64 connections".into(),
                client: "127.0.0.1:51234".into(),
                actor: Some(Box::new(attribution())),
                destination: Some("10.1.2.3:443".into()),
            },
        ),
        (
            "connection_rejected_unattributed",
            AgentEvent::ConnectionRejected {
                rule: "airlock:unattributed".into(),
                reason: "no kernel record".into(),
                client: "[::1]:40000".into(),
                actor: None,
                destination: None,
            },
        ),
    ];
    for (name, e) in events {
        out.push((name, ocsf::from_event(&e, "runner-7", v, now)));
    }
    out
}

fn ocsf_python() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv-ocsf/bin/python");
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{} is missing: `cargo xtask setup` creates it (pydantic-ocsf, ocsf-json-schema)",
            p.display()
        );
    }
    eprintln!(
        "skipping: no OCSF venv at {} (run `cargo xtask setup`)",
        p.display()
    );
    None
}

/// Validate JSON lines with `tests/support/ocsf_validate.py`; panics naming every problem.
pub fn validate_ocsf(lines: &str) {
    let Some(python) = ocsf_python() else { return };
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/support/ocsf_validate.py");
    let mut child = std::process::Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "OCSF validation failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        lines.lines().filter(|l| !l.trim().is_empty()).count()
    );
}

#[test]
fn ocsf_schema_validates_every_kind() {
    let all = every_kind();
    assert_eq!(all.len(), 15);
    let lines: String = all.iter().map(|(_, v)| format!("{v}\n")).collect();
    validate_ocsf(&lines);
}

#[test]
fn every_kind_has_the_class_and_disposition_of_its_decision() {
    let by_name: std::collections::BTreeMap<_, _> = every_kind().into_iter().collect();
    let get = |n: &str, k: &str| by_name[n][k].as_u64();
    // (kind, class_uid, activity_id, action_id, disposition_id)
    for (name, class, activity, action, disposition) in [
        ("blocked", 6003, 99, Some(2), Some(2)),
        ("masked", 6003, 99, Some(4), Some(1)),
        ("approved", 6003, 99, Some(1), Some(8)),
        ("denied", 6003, 99, Some(2), Some(25)),
        ("timed_out", 6003, 99, Some(2), Some(25)),
        ("held", 6003, 99, Some(99), Some(14)),
        ("started", 6002, 3, None, None),
        ("stopped", 6002, 4, None, None),
        ("policy_reloaded", 3004, 3, None, None),
        ("policy_refused", 3004, 3, None, None),
        ("tool_changed", 2004, 1, None, None),
        ("verification_failed", 2004, 1, None, None),
        ("connection_rejected", 4001, 5, Some(2), Some(2)),
    ] {
        assert_eq!(get(name, "class_uid"), Some(class), "{name}");
        assert_eq!(get(name, "activity_id"), Some(activity), "{name}");
        assert_eq!(
            get(name, "type_uid"),
            Some(class * 100 + activity),
            "{name}"
        );
        assert_eq!(get(name, "action_id"), action, "{name}");
        assert_eq!(get(name, "disposition_id"), disposition, "{name}");
    }
    let b = &by_name["blocked"];
    assert_eq!(b["actor"]["process"]["pid"], 4240);
    assert_eq!(b["actor"]["process"]["file"]["path"], "/usr/bin/python3.11");
    assert_eq!(b["actor"]["user"]["uid"], "1000");
    assert_eq!(b["api"]["operation"], "tools/call");
    assert_eq!(b["api"]["service"]["name"], "files");
    assert_eq!(b["resources"][0]["name"], "read_file");
    assert_eq!(b["policy"]["uid"], "no-secrets-out");
    assert_eq!(b["metadata"]["uid"], "a1b2-17:3");
    assert_eq!(b["time"], 1_764_468_000_123_i64);
    let m = &by_name["masked"];
    assert_eq!(
        m["unmapped"]["airlock"]["masked"],
        json!({"github_token": 2, "jwt": 1})
    );
    // The security-control profile's 4 Modified, not 99 Other (issue 19).
    assert_eq!(
        (&m["action_id"], &m["action"]),
        (&json!(4), &json!("Modified"))
    );
    assert_eq!(m["policy"]["uid"], "mask-tokens");
    assert_eq!(
        m["unmapped"]["airlock"]["rules"],
        json!(["mask-tokens", "mask-jwts"])
    );
    assert_eq!(by_name["policy_refused"]["status_id"], 2);
    assert_eq!(
        by_name["connection_rejected"]["actor"]["user"]["name"],
        "alice"
    );
}

#[test]
fn no_event_carries_a_payload_argument_or_command_line() {
    for (name, ev) in every_kind() {
        let text = ev.to_string();
        assert!(
            !text.contains(PLANTED),
            "{name} leaks the planted token: {text}"
        );
        assert!(!text.contains("arguments"), "{name}: {text}");
    }
}

#[test]
fn one_event_per_blocked_call_and_none_for_plain_traffic() {
    // The request row is the event; Airlock's error answer and plain rows are not.
    assert!(ocsf::from_record(&record("request", "block"), "v").is_some());
    assert!(ocsf::from_record(&record("error", "block"), "v").is_none());
    assert!(ocsf::from_record(&record("request", "allow"), "v").is_none());
    assert!(ocsf::from_record(&record("response", "allow"), "v").is_none());
    // Approvals are told by their `approval` row, not the request rows around it.
    assert!(ocsf::from_record(&record("request", "approved"), "v").is_none());
    assert!(ocsf::from_record(&record("request", "denied"), "v").is_none());
    assert!(ocsf::from_record(&record("error", "denied"), "v").is_none());
    // A server's error answer with a masked value is a masked event.
    let mut e = record("error", "mask");
    e.masked_detectors = vec!["jwt".into()];
    assert!(ocsf::from_record(&e, "v").is_some());
}

#[test]
fn file_sink_rotates_and_keeps_n() {
    let dir = std::env::temp_dir().join(format!("airlock-events-file-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("events.jsonl");
    let cfg = super::EventsConfig {
        queue_capacity: 10_000,
        file: Some(crate::config::events::FileSink {
            path: path.clone(),
            max_bytes: 8192,
            keep: 2,
        }),
        syslog: None,
        webhook: None,
    };
    let events = super::Events::start(&cfg, "runner-7", None).unwrap();
    let (_, ev) = every_kind().remove(0);
    for _ in 0..60 {
        events.emit(&ev);
    }
    assert!(events.flush(std::time::Duration::from_secs(5)));
    let s = &events.stats.file;
    assert_eq!(s.sent.load(std::sync::atomic::Ordering::Relaxed), 60);
    assert!(s.rotations.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    let mut lines = 0;
    for p in [
        path.clone(),
        super::file::rotated(&path, 1),
        super::file::rotated(&path, 2),
    ] {
        let meta = std::fs::metadata(&p).unwrap();
        assert!(
            meta.len() <= 8192,
            "{} is {} bytes",
            p.display(),
            meta.len()
        );
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&p).unwrap();
        for l in text.lines() {
            serde_json::from_str::<Value>(l).unwrap();
            lines += 1;
        }
    }
    assert!(!super::file::rotated(&path, 3).exists(), "keep = 2");
    assert!(lines < 60 && lines > 0, "older files were dropped: {lines}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn webhook_refuses_an_authorization_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("airlock-events-auth-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let auth = dir.join("siem.auth");
    std::fs::write(&auth, "Splunk token\n").unwrap();
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sink = crate::config::events::WebhookSink {
        url: "https://siem.example/in".parse().unwrap(),
        ca_file: None,
        authorization_file: Some(auth.clone()),
        timeout_secs: 5,
        spool_dir: dir.join("spool"),
        spool_max_bytes: 1 << 20,
        spool_max_files: 10,
    };
    let stats = std::sync::Arc::new(super::EventStats::default());
    let err =
        super::webhook::Delivery::open(sink.clone(), stats.clone(), super::spool::Role::Writer)
            .err()
            .expect("a world-readable secret is refused");
    assert!(err.to_string().contains("0600"), "{err}");
    assert!(
        !err.to_string().contains("token"),
        "the secret is not in the error"
    );
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
    super::webhook::Delivery::open(sink, stats, super::spool::Role::Writer).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn names_a_peer_chose_are_bounded() {
    let mut r = record("request", "block");
    r.tool = Some("t".repeat(100_000));
    r.method = Some("m".repeat(100_000));
    r.mcp_session_id = Some("s".repeat(100_000));
    let ev = ocsf::from_record(&r, "v").unwrap();
    assert!(ev.to_string().len() < 16 * 1024, "{}", ev.to_string().len());
    let ev = ocsf::from_event(
        &AgentEvent::ToolDefinitionChanged {
            backend: "files".into(),
            tool: "t".repeat(100_000),
            pinned: "sha256:1".into(),
            seen: "sha256:2".into(),
        },
        "h",
        "v",
        0,
    );
    assert!(ev.to_string().len() < 16 * 1024);
}
