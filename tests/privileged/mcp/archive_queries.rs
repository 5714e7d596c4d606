//! The archive of an end-to-end SDK run read back: `airlock sessions` groups it by MCP session,
//! and every analyst query of ARCHIVE.md gives the answers that run implies.

use std::path::Path;

use serde_json::Value;

#[path = "../../support/queries.rs"]
mod queries;
use queries::documented_queries;

use crate::harness::*;

/// `airlock sessions` on a real client's archive: the client's MCP session is one session,
/// with every connection it used (the legacy transport's too), every record counted once, and
/// the blocked call counted once (not again for the error Airlock answered it with).
pub(super) fn sessions_are_mcp_sessions(
    archive: &Path,
    records: &[Value],
    blocked: &Value,
    stateless: bool,
) {
    let archive = archive.to_str().unwrap();
    let list: Vec<Value> = airlock_out(&["sessions", "--archive", archive, "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let total: u64 = list.iter().map(|s| s["messages"].as_u64().unwrap()).sum();
    assert_eq!(
        total,
        records.len() as u64,
        "every record in one session: {list:#?}"
    );
    let conn = blocked["session_id"].as_str().unwrap();
    let session = list
        .iter()
        .find(|s| {
            s["connections"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == conn)
        })
        .unwrap();
    assert_eq!(session["blocked"], 1, "{session}");
    if stateless {
        assert_eq!(session["grouped_by"], "connection", "{session}");
        return;
    }
    let sid = blocked["mcp_session_id"].as_str().unwrap();
    assert_eq!(session["grouped_by"], "mcp_session", "{session}");
    assert_eq!(session["session_id"], sid, "{session}");
    let mut carried: Vec<&str> = records
        .iter()
        .filter(|r| r["mcp_session_id"] == sid)
        .map(|r| r["session_id"].as_str().unwrap())
        .collect();
    carried.sort_unstable();
    carried.dedup();
    let mut grouped: Vec<&str> = session["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    grouped.sort_unstable();
    assert_eq!(grouped, carried, "the session's connections: {session}");
    eprintln!("one MCP session over {} connection(s)", carried.len());
}

/// Every analyst query of ARCHIVE.md, run with the real DuckDB on the archive an end-to-end
/// run produced, gives the answers that run implies.
pub(super) fn analyst_queries_answer_on_a_real_archive(archive: &Path, records: &[Value]) {
    let glob = parquet_glob(archive);
    let pid = records.iter().find_map(|r| r["pid"].as_u64()).unwrap();
    let session = records
        .iter()
        .find(|r| r["tool"] == "add")
        .and_then(|r| r["session_id"].as_str())
        .unwrap()
        .to_owned();
    for (name, sql) in documented_queries() {
        let sql = sql
            .replace("/var/lib/airlock/archive/**/*.parquet", &glob)
            .replace("pid = 4001", &format!("pid = {pid}"))
            .replace("'session-bob'", &format!("'{session}'"));
        let rows = duckdb(&sql);
        match name.as_str() {
            "calls-per-user-and-tool" => {
                for (tool, n) in [("add", 2), ("contact", 1), ("countdown", 1), ("echo", 1)] {
                    assert!(
                        rows.contains(&serde_json::json!(["root", tool, n])),
                        "{tool}: {rows:?}"
                    );
                }
                assert!(
                    !rows.iter().any(|r| r[1] == "delete_everything"),
                    "refused: no answer"
                );
            }
            "blocked-calls" => {
                assert_eq!(rows.len(), 1, "{rows:?}");
                assert_eq!(rows[0][3], "delete_everything");
                assert!(
                    rows[0][4]
                        .as_array()
                        .unwrap()
                        .contains(&serde_json::json!("no-destructive-tools"))
                );
            }
            "masked-per-detector" => {
                assert!(
                    rows.iter()
                        .any(|r| r[0] == "email" && r[1].as_u64() >= Some(1)),
                    "{rows:?}"
                )
            }
            "slowest-tools" => {
                // countdown sleeps 3 × 10 ms: the slowest of these tools.
                assert_eq!(rows[0][0], "countdown", "{rows:?}");
                assert!(rows[0][1].as_u64().unwrap() >= 30_000);
            }
            "sessions-of-one-process" => assert!(!rows.is_empty(), "{rows:?}"),
            "one-session-transcript" => {
                let seqs: Vec<u64> = rows.iter().map(|r| r[0].as_u64().unwrap()).collect();
                assert!(
                    seqs.windows(2).all(|w| w[0] < w[1]) && seqs.len() >= 3,
                    "{seqs:?}"
                );
                assert!(rows.iter().any(|r| r[3] == "add"));
            }
            other => panic!("no expected answer for query {other}"),
        }
    }
}
