//! What a test reads back from an agent's archive: every record through `airlock replay`, and
//! DuckDB (the test venv's) over the Parquet files.

use std::{path::Path, process::Command};

use serde_json::Value;

use super::{airlock_out, peers::venv_python};

/// Every archived record (`input` objects), all sessions.
pub fn archived_records(archive: &Path) -> Vec<Value> {
    let archive = archive.to_str().unwrap();
    let mut out = Vec::new();
    for line in airlock_out(&["sessions", "--archive", archive, "--json"]).lines() {
        let s: Value = serde_json::from_str(line).unwrap();
        let id = s["session_id"].as_str().unwrap();
        for rec in airlock_out(&["replay", id, "--archive", archive, "--json"]).lines() {
            let v: Value = serde_json::from_str(rec).unwrap();
            out.push(v["input"].clone());
        }
    }
    out
}

/// The rows DuckDB gives for `sql`, each a JSON array; a value JSON has no type for (a
/// timestamp, a decimal) as its text.
pub fn duckdb(sql: &str) -> Vec<Value> {
    let script = format!(
        "import duckdb, json\nrows = duckdb.sql({sql:?}).fetchall()\nprint(json.dumps([[c if isinstance(c, (int, float, str, list, type(None))) else str(c) for c in r] for r in rows]))"
    );
    let out = Command::new(venv_python())
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "duckdb failed on {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The glob of every Parquet file of `archive`.
pub fn parquet_glob(archive: &Path) -> String {
    format!("{}/**/*.parquet", archive.display())
}

/// [`duckdb`] over the archive's Parquet files (after the agent stopped), `ARCHIVE` in `sql`
/// standing for them.
pub fn query_archive(archive: &Path, sql: &str) -> Vec<Value> {
    let files = format!(
        "read_parquet('{}', hive_partitioning=true)",
        parquet_glob(archive)
    );
    duckdb(&sql.replace("ARCHIVE", &files))
}
