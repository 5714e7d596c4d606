//! The pipeline's decisions, without root, the kernel or HTTP: a real `Pipeline` (a real
//! archive in a temporary directory, policies loaded from TOML files, tool pins on disk) fed
//! JSON-RPC messages with their attribution, as a stdio relay would feed it.

use std::{
    fs,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicU64, atomic::Ordering::Relaxed},
    time::Duration,
};

use serde_json::{Value, json};

use super::{ConnCtx, Msg, Outcome, Pipeline};
use crate::{
    archive::{ArchiveWriter, WriterConfig, service::Archive},
    attribution::Attribution,
    config::{Recording, ToolChanges},
    mcp::session::{SessionKey, Sessions},
    policy::{Direction, Subject, mask::HashKey, pins::ToolPins, store::PolicyStore},
};

pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Relaxed);
        let p = std::env::temp_dir().join(format!(
            "airlock-pipeline-{}-{n}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const POLICY: &str = r#"
[[rule]]
id = "no-destructive-tools"
action = "block"
tools = ["drop_*"]

[[rule]]
id = "mask-personal-data"
action = "mask"
direction = "both"
style = "redact"
detectors = ["email"]
"#;

/// A pipeline over a real archive and `POLICY`.
pub(crate) fn pipeline(dir: &TempDir) -> Pipeline {
    let policies = dir.0.join("policies");
    fs::create_dir_all(&policies).unwrap();
    fs::write(policies.join("10-test.toml"), POLICY).unwrap();
    let (writer, _) = ArchiveWriter::open(WriterConfig {
        archive_dir: dir.0.join("archive"),
        signing_key: dir.0.join("archive-signing.key"),
        host: "runner-1".into(),
        group: None,
        max_rows: 100,
        max_segment_bytes: crate::archive::writer::MAX_SEGMENT_BYTES,
    })
    .unwrap();
    Pipeline {
        policies: Arc::new(PolicyStore::load(&policies, HashKey([7; 32]), Vec::new()).unwrap()),
        archive: Archive::start(writer, Recording::Group, Duration::from_secs(3600)),
        sessions: Arc::new(Sessions::new()),
        host: "runner-1".into(),
        counters: Default::default(),
        webhook: None,
        pins: Arc::new(Mutex::new(ToolPins::open(&dir.0).unwrap())),
        pins_dirty: Default::default(),
        pin_saves: Default::default(),
        tool_changes: ToolChanges::Alert,
        credentials: Default::default(),
        approvals: Default::default(),
        approval_decided: Default::default(),
        legacy_streams: Default::default(),
    }
}

pub(crate) fn ctx() -> ConnCtx {
    let attribution = Attribution {
        pid: 4242,
        tgid: 4240,
        uid: 1000,
        gid: 1000,
        user: Some("alice".into()),
        group: Some("alice".into()),
        comm: "python3".into(),
        exe: Some("/usr/bin/python3".into()),
        cmdline: None,
        cgroup_id: 7,
        cgroup: Some("/runner/job-1".into()),
        original_dst: "127.0.0.1:8443".parse().unwrap(),
        family: "ipv4",
        process_seen: true,
        netns: 0,
        container: None,
    };
    let subject = Subject {
        uid: 1000,
        gid: 1000,
        user: Some("alice".into()),
        groups: vec!["alice".into()],
        exe: attribution.exe.clone(),
        comm: attribution.comm.clone(),
        cgroup: attribution.cgroup.clone(),
        container: Vec::new(),
    };
    ConnCtx::new(
        1,
        "test-1".into(),
        attribution,
        subject,
        "tools".into(),
        None,
        Arc::new(AtomicU64::new(1)),
    )
}

fn msg(direction: Direction, value: Value) -> Msg {
    Msg {
        direction,
        value,
        session: SessionKey {
            backend: "tools".into(),
            id: "s1".into(),
        },
        mcp_session_id: Some("s1".into()),
        raw: None,
        origin: None,
    }
}

fn call(id: u64, tool: &str, arguments: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": tool, "arguments": arguments}})
}

#[tokio::test]
async fn a_blocked_call_is_answered_by_airlock_naming_its_rule_and_recorded() {
    let dir = TempDir::new("block");
    let p = pipeline(&dir);
    let ctx = ctx();
    let out = p
        .process(
            &ctx,
            msg(Direction::ClientToServer, call(1, "drop_table", json!({}))),
        )
        .await
        .unwrap();
    let Outcome::Answer(answer) = out else {
        panic!("a blocked call is never forwarded: {out:?}");
    };
    assert_eq!(answer["id"], 1);
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("no-destructive-tools"), "{message}");
    assert_eq!(p.counters.blocked.load(Relaxed), 1);
    // The id was given back: the client may use it again for a call that passes.
    let out = p
        .process(
            &ctx,
            msg(Direction::ClientToServer, call(1, "search", json!({}))),
        )
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Forward { .. }), "{out:?}");
    // All in the archive, signed: the refused call, Airlock's answer to it, the call forwarded.
    p.archive.close().await.unwrap();
    let key = crate::archive::manifest::public_key_of(&dir.0.join("archive-signing.key")).unwrap();
    let trust = crate::archive::verify::Trust {
        keys: vec![(None, key, "test".into())],
        ..Default::default()
    };
    let report = crate::archive::verify::verify(&dir.0.join("archive"), &trust);
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(report.records_checked, 3);
}

#[tokio::test]
async fn personal_data_is_masked_both_ways_before_it_is_forwarded() {
    let dir = TempDir::new("mask");
    let p = pipeline(&dir);
    let ctx = ctx();
    let out = p
        .process(
            &ctx,
            msg(
                Direction::ClientToServer,
                call(2, "search", json!({"q": "mail bob@example.com"})),
            ),
        )
        .await
        .unwrap();
    let Outcome::Forward { value, changed, .. } = out else {
        panic!("an allowed call is forwarded: {out:?}");
    };
    assert!(changed);
    let text = value.to_string();
    assert!(!text.contains("bob@example.com"), "{text}");
    assert!(text.contains("[MASKED:email]"), "{text}");
    // The answer to it, from the server, is masked on its way to the client too.
    let answer = json!({"jsonrpc": "2.0", "id": 2,
        "result": {"content": [{"type": "text", "text": "carol@example.org"}]}});
    let out = p
        .process(&ctx, msg(Direction::ServerToClient, answer))
        .await
        .unwrap();
    let Outcome::Forward { value, changed, .. } = out else {
        panic!("an answer is forwarded: {out:?}");
    };
    assert!(changed);
    assert!(!value.to_string().contains("carol@example.org"), "{value}");
    assert_eq!(p.counters.masked_values.load(Relaxed), 2);
    p.archive.close().await.unwrap();
}

#[tokio::test]
async fn a_second_request_with_an_id_in_flight_is_refused_by_airlock() {
    let dir = TempDir::new("dup");
    let p = pipeline(&dir);
    let ctx = ctx();
    let first = p
        .process(
            &ctx,
            msg(Direction::ClientToServer, call(3, "search", json!({}))),
        )
        .await
        .unwrap();
    assert!(matches!(first, Outcome::Forward { .. }), "{first:?}");
    let second = p
        .process(
            &ctx,
            msg(Direction::ClientToServer, call(3, "search", json!({}))),
        )
        .await
        .unwrap();
    let Outcome::Answer(answer) = second else {
        panic!("a duplicate id is answered by Airlock: {second:?}");
    };
    assert_eq!(answer["id"], 3);
    assert!(answer["error"]["code"].as_i64().is_some(), "{answer}");
    assert_eq!(p.counters.protocol_refused.load(Relaxed), 1);
    p.archive.close().await.unwrap();
}
