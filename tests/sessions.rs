//! `airlock sessions` and `airlock replay` group by MCP session across connections (the
//! per-connection view is an option), and count calls, not messages.

use std::{path::Path, process::Command};

use airlock::archive::{ArchiveWriter, RecordInput, WriterConfig};
use serde_json::Value;

const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");
const T0: i64 = 1_795_000_000_000_000;

/// One row: (connection, backend, MCP session, direction, kind, method, id, decision, masked).
type Row<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    &'a str,
    usize,
);

const C2S: &str = "client_to_server";
const S2C: &str = "server_to_client";

/// A client that spread MCP session `S1` of backend `tools` over three connections (its
/// `initialize` sent before the server named the session), a server of another backend that
/// named its session `S1` too, an opaque connection and a refused one.
#[rustfmt::skip]
const ROWS: &[Row] = &[
    ("h-1", "tools", None, C2S, "connection", None, None, "allow", 0),
    ("h-1", "tools", None, C2S, "request", Some("initialize"), Some("0"), "allow", 0),
    ("h-1", "tools", Some("S1"), S2C, "response", Some("initialize"), Some("0"), "allow", 0),
    ("h-2", "tools", None, C2S, "connection", None, None, "allow", 0),
    // A call masked both ways: one call.
    ("h-2", "tools", Some("S1"), C2S, "request", Some("tools/call"), Some("1"), "mask", 2),
    ("h-1", "tools", None, C2S, "connection", None, None, "allow", 0),
    ("h-2", "tools", Some("S1"), S2C, "response", Some("tools/call"), Some("1"), "mask", 1),
    ("h-3", "tools", None, C2S, "connection", None, None, "allow", 0),
    // A blocked call: its request and Airlock's error answer.
    ("h-3", "tools", Some("S1"), C2S, "request", Some("tools/call"), Some("2"), "block", 0),
    ("h-3", "tools", Some("S1"), S2C, "error", Some("tools/call"), Some("2"), "block", 0),
    // A held call denied: its approval record, the request, the error answer.
    ("h-3", "tools", Some("S1"), C2S, "approval", Some("tools/call"), Some("3"), "denied", 0),
    ("h-3", "tools", Some("S1"), C2S, "request", Some("tools/call"), Some("3"), "denied", 0),
    ("h-3", "tools", Some("S1"), S2C, "error", Some("tools/call"), Some("3"), "denied", 0),
    // A listing with a tool hidden by a block rule: no call was refused.
    ("h-3", "tools", Some("S1"), S2C, "response", Some("tools/list"), Some("4"), "block", 0),
    // A notification with a masked value (no id): counted on its own.
    ("h-2", "tools", Some("S1"), S2C, "notification", Some("notifications/message"), None, "mask", 1),
    ("h-4", "other", None, C2S, "connection", None, None, "allow", 0),
    ("h-4", "other", Some("S1"), C2S, "request", Some("tools/list"), Some("0"), "allow", 0),
    ("h-5", "opaque", None, C2S, "connection", None, None, "allow", 0),
    ("h-6", "tools", None, C2S, "connection", None, None, "block", 0),
    // Another user whose server handed out the same session name: not the same session.
    ("h-7", "tools", None, C2S, "connection", None, None, "allow", 0),
    ("h-7", "tools", Some("S1"), C2S, "request", Some("tools/call"), Some("1"), "allow", 0),
];

/// Who each connection's process was: (uid, user, comm). `h-7` named itself with a terminal
/// escape sequence.
fn who(conn: &str) -> (u32, &'static str, &'static str) {
    match conn {
        "h-7" => (1001, "bob", "\x1b]0;pwned\x07"),
        _ => (1000, "alice", "python3"),
    }
}

fn write(dir: &Path) {
    let (mut w, _) = ArchiveWriter::open(WriterConfig {
        archive_dir: dir.join("archive"),
        signing_key: dir.join("signing.key"),
        host: "runner-7".into(),
        group: None,
        max_rows: 1000,
        max_segment_bytes: airlock::archive::writer::MAX_SEGMENT_BYTES,
    })
    .unwrap();
    let mut seqs = std::collections::HashMap::new();
    for (n, (conn, backend, mcp, direction, kind, method, id, decision, masked)) in
        ROWS.iter().enumerate()
    {
        let seq = seqs.entry(*conn).or_insert(0u64);
        let (uid, user, comm) = who(conn);
        w.append(RecordInput {
            ts_us: T0 + n as i64 * 1_000_000,
            host: "runner-7".into(),
            session_id: (*conn).into(),
            mcp_session_id: mcp.map(str::to_owned),
            seq: *seq,
            direction: (*direction).into(),
            kind: (*kind).into(),
            method: method.map(str::to_owned),
            jsonrpc_id: id.map(str::to_owned),
            decision: (*decision).into(),
            masked_detectors: vec!["email".into(); *masked],
            pid: Some(4000),
            uid: Some(uid),
            user: Some(user.into()),
            comm: Some(comm.into()),
            backend: Some((*backend).into()),
            ..Default::default()
        })
        .unwrap();
        *seq += 1;
    }
    w.sync().unwrap();
    w.roll().unwrap();
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(AIRLOCK).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn sessions_group_an_mcp_session_across_connections_and_count_calls() {
    let dir = std::env::temp_dir().join(format!("airlock-sessions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write(&dir);
    let archive = dir.join("archive");
    let a = archive.to_str().unwrap();

    let (code, out, err) = run(&["sessions", "--archive", a, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let list = json_lines(&out);
    let names: Vec<(&str, &str, &str)> = list
        .iter()
        .map(|s| {
            (
                s["session_id"].as_str().unwrap(),
                s["grouped_by"].as_str().unwrap(),
                s["backend"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("S1", "mcp_session", "tools"),
            ("S1", "mcp_session", "other"),
            ("h-5", "connection", "opaque"),
            ("h-6", "connection", "tools"),
            ("S1", "mcp_session", "tools"),
        ],
        "{out}"
    );
    let s1 = &list[0];
    assert_eq!(s1["connections"], serde_json::json!(["h-1", "h-2", "h-3"]));
    // Every row of h-1, h-2 and h-3: the connections' own rows and `initialize` included.
    assert_eq!(s1["messages"], 15, "{s1}");
    assert_eq!(s1["calls"], 4, "initialize and three tools/call: {s1}");
    assert_eq!(s1["blocked"], 2, "one blocked, one denied call: {s1}");
    assert_eq!(
        s1["masked"], 2,
        "one call masked both ways, one notification: {s1}"
    );
    assert_eq!(s1["masked_values"], 4, "{s1}");
    assert_eq!(list[3]["blocked"], 1, "a refused connection: {out}");
    assert_eq!(list[4]["user"], "bob", "{out}");
    assert_eq!(list[4]["connections"], serde_json::json!(["h-7"]));

    // The per-connection view: one session per connection, the counts split with them.
    let (code, out, err) = run(&["sessions", "--archive", a, "--json", "--by-connection"]);
    assert_eq!(code, Some(0), "{err}");
    let list = json_lines(&out);
    let ids: Vec<&str> = list
        .iter()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["h-1", "h-2", "h-3", "h-4", "h-5", "h-6", "h-7"],
        "{out}"
    );
    assert!(list.iter().all(|s| s["grouped_by"] == "connection"));
    assert_eq!(list[1]["masked"], 2);
    assert_eq!(list[2]["blocked"], 2);

    // Two backends and two users named a session `S1`: the responder chooses.
    let (code, _, err) = run(&["replay", "S1", "--archive", a]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("names 3 sessions") && err.contains("--backend"),
        "{err}"
    );
    let (code, _, err) = run(&["replay", "S1", "--backend", "tools", "--archive", a]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("names 2 sessions") && err.contains("uid 1001"),
        "{err}"
    );
    let (code, out, _) = run(&["replay", "S1", "--uid", "1001", "--archive", a, "--json"]);
    assert_eq!(code, Some(0));
    assert_eq!(json_lines(&out).len(), 2, "bob's own: {out}");
    let tools_alice = [
        "replay",
        "S1",
        "--backend",
        "tools",
        "--uid",
        "1000",
        "--archive",
        a,
    ];
    let (code, out, err) = run(&[&tools_alice[..], &["--json"]].concat());
    assert_eq!(code, Some(0), "{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 15, "{out}");
    let ts: Vec<i64> = rows
        .iter()
        .map(|r| r["input"]["ts_us"].as_i64().unwrap())
        .collect();
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "in time order: {ts:?}");
    assert!(rows.iter().all(|r| r["input"]["backend"] == "tools"));
    let (code, out, err) = run(&tools_alice);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("3 connections: c0=h-1 c1=h-2 c2=h-3"), "{out}");
    assert!(
        out.contains("c2  #"),
        "rows marked with their connection: {out}"
    );

    // A connection: as a session of its own, or named with `--connection`.
    let (code, out, _) = run(&["replay", "h-5", "--archive", a, "--json"]);
    assert_eq!(code, Some(0));
    assert_eq!(json_lines(&out).len(), 1);
    let (code, out, err) = run(&["replay", "h-2", "--connection", "--archive", a, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let seqs: Vec<u64> = json_lines(&out)
        .iter()
        .map(|r| r["input"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [0, 1, 2, 3]);
    // Without `--connection`, h-2 is part of S1, not a session.
    let (code, _, err) = run(&["replay", "h-2", "--archive", a]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no session `h-2`"), "{err}");
    // A name a process chose is printed, not obeyed by the terminal.
    let (code, out, _) = run(&["sessions", "--archive", a, "--by-connection"]);
    assert_eq!(code, Some(0));
    assert!(!out.contains('\x1b') && !out.contains('\x07'), "{out:?}");
    assert!(out.contains("\\u{1b}]0;pwned\\u{7}"), "{out}");
    let (_, out, _) = run(&["replay", "h-7", "--connection", "--archive", a]);
    assert!(!out.contains('\x1b') && !out.contains('\x07'), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The archive's Parquet files (not the manifest).
fn parquet_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn a_damaged_file_is_named_and_skipped_and_the_exit_says_the_list_is_incomplete() {
    let dir = std::env::temp_dir().join(format!("airlock-sessions-dmg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write(&dir);
    let archive = dir.join("archive");
    let good = parquet_files(&archive);
    assert_eq!(good.len(), 1, "{good:?}");
    // A second file in the same partition, cut short (as a crash or a tamperer leaves it).
    let damaged = good[0].with_file_name("runner-7-damaged.parquet");
    let bytes = std::fs::read(&good[0]).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    let a = archive.to_str().unwrap();
    let (code, out, err) = run(&["sessions", "--archive", a, "--json", "--by-connection"]);
    assert_eq!(code, Some(1), "an incomplete list must not exit 0: {err}");
    assert!(
        err.contains("skipped") && err.contains("runner-7-damaged.parquet"),
        "{err}"
    );
    assert!(err.contains("airlock verify"), "{err}");
    assert_eq!(
        json_lines(&out).len(),
        7,
        "the readable file's sessions: {out}"
    );
    // The table view says the same.
    let (code, out, err) = run(&["sessions", "--archive", a]);
    assert_eq!(code, Some(1));
    assert!(out.lines().count() > 1, "{out}");
    assert!(err.contains("runner-7-damaged.parquet"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn replay_summarises_many_connections_and_shows_their_rows_on_request() {
    let dir = std::env::temp_dir().join(format!("airlock-sessions-many-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut w, _) = ArchiveWriter::open(WriterConfig {
        archive_dir: dir.join("archive"),
        signing_key: dir.join("signing.key"),
        host: "runner-7".into(),
        group: None,
        max_rows: 10_000,
        max_segment_bytes: airlock::archive::writer::MAX_SEGMENT_BYTES,
    })
    .unwrap();
    // One MCP session over 40 connections, each with its open row, one call, its close row.
    let mut n = 0i64;
    for c in 0..40 {
        let conn = format!("h-{c}");
        for (seq, (kind, mcp, method)) in [
            ("connection", None, None),
            ("request", Some("S9"), Some("tools/call")),
            ("connection", None, None),
        ]
        .into_iter()
        .enumerate()
        {
            w.append(RecordInput {
                ts_us: T0 + n * 1000,
                host: "runner-7".into(),
                session_id: conn.clone(),
                mcp_session_id: mcp.map(str::to_owned),
                seq: seq as u64,
                direction: C2S.into(),
                kind: kind.into(),
                method: method.map(str::to_owned),
                jsonrpc_id: mcp.map(|_| c.to_string()),
                decision: "allow".into(),
                pid: Some(4000),
                uid: Some(1000),
                user: Some("alice".into()),
                backend: Some("tools".into()),
                ..Default::default()
            })
            .unwrap();
            n += 1;
        }
    }
    w.sync().unwrap();
    w.roll().unwrap();
    let a = dir.join("archive");
    let a = a.to_str().unwrap();
    let (code, out, err) = run(&["replay", "S9", "--archive", a]);
    assert_eq!(code, Some(0), "{err}");
    let header = out.lines().nth(1).unwrap();
    assert!(
        header.starts_with("40 connections: c0=h-0 c1=h-1 c2=h-2 … c39=h-39"),
        "{out}"
    );
    assert!(
        out.contains("40 messages") && out.contains("80 connection open/close rows not shown"),
        "{out}"
    );
    let rows = out.lines().filter(|l| l.contains(" → ")).count();
    assert_eq!(rows, 40, "the calls only: {out}");
    let (code, out, _) = run(&["replay", "S9", "--archive", a, "--connections"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("c39=h-39") && out.contains("c20=h-20"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.contains(" → ")).count(),
        120,
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
