//! Archives written through the library API, read by the real DuckDB (PyPI `duckdb`, in the
//! venv `cargo xtask setup` creates under target/): the schema DuckDB sees, and analyst
//! queries over hive-partitioned files. Also `airlock verify` on the same archive.

#[path = "support/queries.rs"]
mod queries;
use queries::documented_queries;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use airlock::{
    archive::{ArchiveWriter, RecordInput, WriterConfig},
    policy::{Direction, HashKey, Message, PolicySet, Subject},
};
use serde_json::json;

const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");

fn duckdb_python() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv/bin/python");
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{} is missing: `cargo xtask setup` creates it (DuckDB for the archive tests)",
            p.display()
        );
    }
    eprintln!(
        "skipping: no DuckDB venv at {} (run `cargo xtask setup`)",
        p.display()
    );
    None
}

/// Run SQL in DuckDB, return rows as JSON arrays.
fn duckdb(python: &Path, sql: &str) -> Vec<serde_json::Value> {
    let script = "import duckdb, json, sys\nfor row in duckdb.sql(sys.argv[1]).fetchall():\n    print(json.dumps([str(c) if not isinstance(c, (int, float, str, list, type(None))) else c for c in row]))\n";
    let out = Command::new(python)
        .args(["-c", script, sql])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "duckdb failed on {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_archive(dir: &Path) {
    let policies = PolicySet::load_dir(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies"),
        HashKey([3; 32]),
    )
    .expect("shipped policies");
    let (mut w, _) = ArchiveWriter::open(WriterConfig {
        archive_dir: dir.join("archive"),
        signing_key: dir.join("signing.key"),
        host: "runner-7".into(),
        group: None,
        max_rows: 1000,
        max_segment_bytes: airlock::archive::writer::MAX_SEGMENT_BYTES,
    })
    .unwrap();
    let users = [("alice", 1000u32), ("bob", 1001)];
    for (n, (user, uid)) in users.iter().enumerate() {
        let subject = Subject {
            uid: *uid,
            gid: *uid,
            user: Some(user.to_string()),
            comm: "python3".into(),
            ..Default::default()
        };
        for i in 0..3u64 {
            let tool = if i == 2 { "send_mail" } else { "search" };
            let msg = Message {
                backend: "tools",
                direction: Direction::ServerToClient,
                method: Some("tools/call"),
                tool: Some(tool),
                arguments: None,
                is_call: false,
                scope_unknown: false,
            };
            let decision = policies.decide(&subject, &msg);
            let body = json!({"content": [{"type": "text", "text": format!("reply to {user}@example.com #{i}")}]});
            let (payload, masking) = policies.mask_payload(&decision, body);
            let counts = masking.counts();
            // Synthetic: bob's mail was refused by a rule (named first: it decided).
            let blocked = *user == "bob" && tool == "send_mail";
            let mut rules = masking.rules().to_vec();
            if blocked {
                rules.insert(0, "no-mail".into());
            }
            w.append(RecordInput {
                ts_us: 1_795_000_000_000_000 + (n as i64 * 10 + i as i64) * 1_000_000,
                host: "runner-7".into(),
                session_id: format!("session-{user}"),
                seq: i,
                // A refused call is archived as its request (the server never answered it).
                direction: if blocked {
                    "client_to_server"
                } else {
                    "server_to_client"
                }
                .into(),
                kind: if blocked { "request" } else { "response" }.into(),
                method: Some("tools/call".into()),
                tool: Some(tool.into()),
                jsonrpc_id: Some(i.to_string()),
                payload: Some(payload),
                decision: if blocked {
                    "block"
                } else if counts.is_empty() {
                    "allow"
                } else {
                    "mask"
                }
                .into(),
                rules,
                masked_detectors: counts
                    .iter()
                    .flat_map(|(d, n)| std::iter::repeat_n(d.clone(), *n as usize))
                    .collect(),
                latency_us: Some(100 * (i + 1)),
                pid: Some(4000 + n as u32),
                uid: Some(*uid),
                user: Some(user.to_string()),
                comm: Some("python3".into()),
                backend: Some("tools".into()),
                policy_hash: Some(policies.hash.clone()),
                ..Default::default()
            })
            .unwrap();
        }
    }
    w.sync().unwrap();
    w.roll().unwrap();
}

#[test]
fn duckdb_reads_the_archive_with_natural_types() {
    let Some(python) = duckdb_python() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("airlock-archive-duckdb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_archive(&dir);
    let glob = format!("{}/archive/**/*.parquet", dir.display());
    let src = format!("read_parquet('{glob}', hive_partitioning=true)");

    let types: Vec<(String, String)> = duckdb(
        &python,
        &format!("select column_name, column_type from (describe select * from {src})"),
    )
    .into_iter()
    .map(|r| {
        (
            r[0].as_str().unwrap().to_owned(),
            r[1].as_str().unwrap().to_owned(),
        )
    })
    .collect();
    let ty = |c: &str| {
        types
            .iter()
            .find(|(n, _)| n == c)
            .map(|(_, t)| t.clone())
            .unwrap_or_default()
    };
    assert_eq!(ty("ts"), "TIMESTAMP WITH TIME ZONE");
    assert_eq!(ty("rules"), "VARCHAR[]");
    assert_eq!(ty("masked_detectors"), "VARCHAR[]");
    assert_eq!(ty("uid"), "UINTEGER");
    assert_eq!(ty("seq"), "UBIGINT");
    assert_eq!(ty("date"), "DATE");
    assert!(
        !ty("hour").is_empty(),
        "hive partition column `hour`: {types:?}"
    );

    let per_user = duckdb(
        &python,
        &format!("select user, tool, count(*) from {src} group by all order by all"),
    );
    assert_eq!(
        per_user,
        vec![
            json!(["alice", "search", 2]),
            json!(["alice", "send_mail", 1]),
            json!(["bob", "search", 2]),
            json!(["bob", "send_mail", 1])
        ]
    );
    let masked = duckdb(
        &python,
        &format!(
            "select d, count(*) from (select unnest(masked_detectors) d from {src}) group by d"
        ),
    );
    assert_eq!(masked, vec![json!(["email", 6])]);
    let leaked = duckdb(
        &python,
        &format!("select count(*) from {src} where payload like '%@example.com%'"),
    );
    assert_eq!(
        leaked,
        vec![json!([0])],
        "an unmasked address reached the archive"
    );
    let transcript = duckdb(
        &python,
        &format!("select seq from {src} where session_id = 'session-bob' order by seq"),
    );
    assert_eq!(transcript, vec![json!([0]), json!([1]), json!([2])]);

    // The verifier brings the key it trusts (here: the one the test signed with).
    let pubkey = format!(
        "runner-7={}",
        dir.join("archive/_manifest/runner-7.pub").display()
    );
    let out = Command::new(AIRLOCK)
        .args(["verify", "--pubkey", &pubkey, "--archive"])
        .arg(dir.join("archive"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("6 record(s) checked") && stdout.contains("intact"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Recomputes every row's `hash` from the Parquet file alone, in Python, following the
/// encoding ARCHIVE.md documents ("The record hash"): what an auditor without Airlock does.
const RECOMPUTE_HASHES: &str = r#"
import duckdb, hashlib, struct, sys
cols = ["ts", "host", "session_id", "mcp_session_id", "seq", "direction", "kind", "method",
        "tool", "jsonrpc_id", "payload", "decision", "rules", "masked_detectors", "latency_us",
        "pid", "tgid", "uid", "gid", "user", "comm", "exe", "cgroup", "backend", "server_addr",
        "sni", "principal_iss", "principal_sub", "policy_hash"]
ints = {"ts": "<q", "seq": "<Q", "latency_us": "<Q", "pid": "<I", "tgid": "<I", "uid": "<I", "gid": "<I"}
required = {"ts", "host", "session_id", "seq", "direction", "kind", "decision", "rules", "masked_detectors"}
def string(v):
    b = v.encode()
    return struct.pack("<I", len(b)) + b
def value(name, v):
    if name in ints:
        return struct.pack(ints[name], v)
    if name in ("rules", "masked_detectors"):
        return struct.pack("<I", len(v)) + b"".join(string(x) for x in v)
    return string(v)
select = ", ".join(["epoch_us(ts)" if c == "ts" else c for c in cols] + ["archive_seq", "prev_hash", "hash"])
rows = bad = 0
for row in duckdb.sql(f"select {select} from read_parquet('{sys.argv[1]}')").fetchall():
    *vals, archive_seq, prev_hash, stored = row
    content = b""
    for name, v in zip(cols, vals):
        if name in required:
            content += value(name, v)
        else:
            content += b"\0" if v is None else b"\1" + value(name, v)
    digest = hashlib.sha256(prev_hash.encode() + b"\n" + struct.pack("<Q", archive_seq) + content)
    rows += 1
    bad += digest.hexdigest() != stored
print(rows, bad)
"#;

#[test]
fn the_record_hash_is_recomputable_as_archive_md_says() {
    let Some(python) = duckdb_python() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("airlock-archive-rehash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_archive(&dir);
    let glob = format!("{}/archive/**/*.parquet", dir.display());
    let out = Command::new(&python)
        .args(["-c", RECOMPUTE_HASHES, &glob])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<u64> = text
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(counts[0] >= 6, "rows checked: {text}");
    assert_eq!(
        counts[1], 0,
        "rows whose hash does not follow ARCHIVE.md: {text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_queries_in_archive_md_give_the_right_answers() {
    let Some(python) = duckdb_python() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("airlock-archive-queries-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_archive(&dir);
    let glob = format!("{}/archive/**/*.parquet", dir.display());
    let queries = documented_queries();
    let names: Vec<&str> = queries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "calls-per-user-and-tool",
            "blocked-calls",
            "masked-per-detector",
            "slowest-tools",
            "sessions-of-one-process",
            "one-session-transcript"
        ]
    );
    for (name, sql) in &queries {
        let rows = duckdb(
            &python,
            &sql.replace("/var/lib/airlock/archive/**/*.parquet", &glob),
        );
        match name.as_str() {
            "calls-per-user-and-tool" => assert_eq!(
                rows,
                vec![
                    json!(["alice", "search", 2]),
                    json!(["alice", "send_mail", 1]),
                    json!(["bob", "search", 2])
                ]
            ),
            "blocked-calls" => {
                assert_eq!(rows.len(), 1, "{rows:?}");
                assert_eq!(rows[0][1], "bob");
                assert_eq!(rows[0][3], "send_mail");
                assert!(rows[0][4].as_array().unwrap().contains(&json!("no-mail")));
            }
            "masked-per-detector" => assert_eq!(rows, vec![json!(["email", 6])]),
            "slowest-tools" => assert_eq!(
                rows,
                vec![json!(["send_mail", 300, 300]), json!(["search", 200, 150])]
            ),
            "sessions-of-one-process" => {
                assert_eq!(rows.len(), 1, "{rows:?}");
                assert_eq!(rows[0][0], "session-bob");
                assert_eq!(rows[0][2], 3);
            }
            "one-session-transcript" => {
                assert_eq!(
                    rows.iter().map(|r| r[0].clone()).collect::<Vec<_>>(),
                    vec![json!(0), json!(1), json!(2)]
                );
                assert!(
                    rows.iter()
                        .all(|r| !r[5].as_str().unwrap().contains("bob@example.com"))
                );
            }
            other => panic!("no expected answer for query {other}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(AIRLOCK).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn responder_sessions_replay_and_evidence() {
    let dir =
        std::env::temp_dir().join(format!("airlock-archive-responder-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_archive(&dir);
    let archive = dir.join("archive");
    let a = archive.to_str().unwrap();

    let (code, out, err) = run(&["sessions", "--archive", a, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let sessions: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(sessions.len(), 2, "{out}");
    assert_eq!(sessions[0]["session_id"], "session-alice");
    assert_eq!(sessions[0]["user"], "alice");
    assert_eq!(sessions[0]["pid"], 4000);
    assert_eq!(sessions[0]["messages"], 3);
    assert_eq!(sessions[0]["masked"], 3);
    assert_eq!(sessions[0]["blocked"], 0);
    assert_eq!(sessions[0]["duration_ms"], 2000);
    assert_eq!(sessions[1]["blocked"], 1);
    let (_, out, _) = run(&["sessions", "--archive", a, "--json", "--user", "bob"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    let (_, out, _) = run(&[
        "sessions",
        "--archive",
        a,
        "--json",
        "--since",
        "2030-01-01T00:00:00Z",
    ]);
    assert_eq!(out.lines().count(), 0, "{out}");
    let (code, _, err) = run(&["sessions", "--archive", a, "--since", "yesterday"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, out, _) = run(&["sessions", "--archive", a]);
    assert_eq!(code, Some(0));
    assert!(out.lines().next().unwrap().starts_with("SESSION"), "{out}");

    let (code, out, err) = run(&["replay", "session-bob", "--archive", a]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("session session-bob  user bob  pid 4001"),
        "{out}"
    );
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("  #")).collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].contains("#0") && lines[2].contains("#2"), "{out}");
    assert!(
        lines[2].contains("send_mail") && lines[2].contains("[block]"),
        "{out}"
    );
    assert!(
        !out.contains('\x1b'),
        "colours when stdout is not a terminal"
    );
    assert!(!out.contains("bob@example.com"), "{out}");
    let (code, out, _) = run(&["replay", "session-bob", "--archive", a, "--json"]);
    assert_eq!(code, Some(0));
    let seqs: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["input"]["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, vec![0, 1, 2]);
    let (code, _, err) = run(&["replay", "no-such-session", "--archive", a]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no session `no-such-session`"), "{err}");

    let bundle = dir.join("evidence.tar.gz");
    let pubkey = format!("{a}/_manifest/runner-7.pub");
    let (code, out, err) = run(&[
        "evidence",
        "--pubkey",
        &pubkey,
        "--archive",
        a,
        "--from",
        "2026-11-18T00:00:00Z",
        "--to",
        "2026-11-19T00:00:00Z",
        "--out",
        bundle.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&bundle).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut names = Vec::new();
    let mut verification = String::new();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(&bundle).unwrap(),
    ));
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        if name == "VERIFICATION.txt" {
            std::io::Read::read_to_string(&mut entry, &mut verification).unwrap();
        }
        names.push(name);
    }
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("archive/date=2026-11-18/") && n.ends_with(".parquet")),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n == "archive/_manifest/runner-7.jsonl"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n == "archive/_manifest/runner-7.pub"),
        "{names:?}"
    );
    assert!(
        verification.contains("verification of the whole archive: intact"),
        "{verification}"
    );
    assert!(
        verification.contains("HEAD host=runner-7 "),
        "{verification}"
    );
    // A second bundle to the same path is refused rather than overwritten.
    let (code, _, _) = run(&[
        "evidence",
        "--pubkey",
        &pubkey,
        "--archive",
        a,
        "--from",
        "2026-11-18T00:00:00Z",
        "--to",
        "2026-11-19T00:00:00Z",
        "--out",
        bundle.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Trust does not come from the archive: without a key from the verifier every host is
/// untrusted; a replaced key, a key that signed nothing here, or a head the verifier kept
/// elsewhere that the archive no longer reaches, are each reported.
#[test]
fn verify_trusts_only_the_keys_a_verifier_brings() {
    let dir = std::env::temp_dir().join(format!("airlock-verify-trust-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_archive(&dir);
    let a = dir.join("archive");
    let a = a.to_str().unwrap();
    let stored = format!("{a}/_manifest/runner-7.pub");
    let key = std::fs::read_to_string(&stored).unwrap().trim().to_owned();

    // No key brought: untrusted, whatever the archive holds.
    let (code, out, _) = run(&["verify", "--archive", a]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("UNTRUSTED"), "{out}");
    assert!(out.contains("trusted=NO"), "{out}");

    // The right key: intact, and the head is reported.
    let (code, out, _) = run(&[
        "verify",
        "--archive",
        a,
        "--pubkey",
        &format!("runner-7={key}"),
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("HEAD host=runner-7 manifest_line="), "{out}");
    let (code, json, _) = run(&["verify", "--archive", a, "--pubkey", &key, "--json"]);
    assert_eq!(code, Some(0), "{json}");
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let head = report["heads"][0]["manifest_seq"].as_u64().unwrap();
    assert!(head >= 1, "{report}");
    let fingerprint = report["heads"][0]["key_fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(fingerprint.starts_with("sha256:"), "{report}");

    // A head kept off-host that the archive no longer reaches: a cut tail.
    let (code, out, _) = run(&[
        "verify",
        "--archive",
        a,
        "--pubkey",
        &key,
        "--expect-head",
        &format!("runner-7={}", head + 1),
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("its tail was cut"), "{out}");
    let (code, out, _) = run(&[
        "verify",
        "--archive",
        a,
        "--pubkey",
        &key,
        "--expect-head",
        "runner-9=1",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("host runner-9: no manifest"), "{out}");

    // Someone with write access re-signs the manifest with their own key and replaces the
    // stored public key: the verifier's key exposes it.
    let other = airlock::archive::manifest::public_key_of(&{
        let k = dir.join("other.key");
        std::fs::write(&k, [7u8; 32]).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        k
    })
    .unwrap();
    std::fs::write(&stored, &other).unwrap();
    let (code, out, _) = run(&["verify", "--archive", a, "--pubkey", &key]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not the trusted one: replaced"), "{out}");
    // Trusting the stored (replaced) key through a fingerprint pinned for the real one fails.
    let config = dir.join("airlock.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}/state\"\narchive_key_fingerprints = {{ runner-7 = \"{fingerprint}\" }}\n[[backend]]\nname = \"t\"\nhost = \"t.test\"\nport = 1\naddresses = [\"127.0.0.9\"]\n",
            dir.display()
        ),
    )
    .unwrap();
    let (code, out, _) = run(&[
        "verify",
        "--archive",
        a,
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("is not the pinned"), "{out}");
    std::fs::write(&stored, &key).unwrap();
    let (code, out, _) = run(&[
        "verify",
        "--archive",
        a,
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "pinned fingerprint, real key: {out}");
    // A key brought on the command line must agree with the pin.
    let (code, out, _) = run(&[
        "verify",
        "--archive",
        a,
        "--config",
        config.to_str().unwrap(),
        "--pubkey",
        &other,
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("is not the one pinned"), "{out}");
    // A key that is not a key is a usage error.
    let (code, _, err) = run(&["verify", "--archive", a, "--pubkey", "00ff"]);
    assert_eq!(code, Some(2), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
