//! Benchmark: the archive. Records appended per second (buffered, strict with concurrent
//! callers), bytes on disk per message against the JSON it came from, and DuckDB over one
//! million archived messages: one session's transcript against a full scan.
//!
//! `cargo bench --bench archive` (DuckDB from `cargo xtask setup`'s venv; skipped if absent).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use airlock::{
    archive::{
        ArchiveWriter, RecordInput, WriterConfig,
        service::{Archive, Recording},
    },
    policy::{Direction, HashKey, Message, PolicySet, Subject},
};
use serde_json::json;

const SESSIONS: u64 = 2000;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = std::env::temp_dir().join(format!("airlock-bench-archive-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let inputs = Arc::new(make_inputs(200_000));
    let json_bytes: usize = inputs
        .iter()
        .map(|r| serde_json::to_vec(r).unwrap().len())
        .sum();

    // Buffered: one producer, as fast as the writer takes them.
    let dir = base.join("buffered");
    let owned: Vec<RecordInput> = inputs.iter().cloned().collect();
    let start = Instant::now();
    rt.block_on(async {
        let archive = Archive::start(
            writer(&dir, 100_000),
            Recording::Buffered,
            Duration::from_secs(3600),
        );
        for r in owned {
            archive.record(r).await.unwrap();
        }
        archive.close().await.unwrap();
    });
    let buffered = inputs.len() as f64 / start.elapsed().as_secs_f64();
    let parquet_bytes = dir_size(&dir.join("archive"));

    // Strict: 64 concurrent callers, each waiting for its fsync (group commit shares them).
    let dir = base.join("strict");
    let n = 50_000usize;
    let mut per_task: Vec<Vec<RecordInput>> = (0..64).map(|_| Vec::new()).collect();
    for (i, r) in inputs.iter().take(n).enumerate() {
        per_task[i % 64].push(r.clone());
    }
    let start = Instant::now();
    let fsyncs = rt.block_on(async {
        let archive = Archive::start(
            writer(&dir, 100_000),
            Recording::Strict,
            Duration::from_secs(3600),
        );
        let tasks: Vec<_> = per_task
            .into_iter()
            .map(|records| {
                let archive = archive.clone();
                tokio::spawn(async move {
                    for r in records {
                        archive.record(r).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let fsyncs = archive
            .stats
            .fsyncs
            .load(std::sync::atomic::Ordering::Relaxed);
        archive.close().await.unwrap();
        fsyncs
    });
    let strict = n as f64 / start.elapsed().as_secs_f64();

    // The parts, without the thread and channel: chaining + WAL append, then Parquet.
    let dir = base.join("parts");
    let mut w = writer(&dir, usize::MAX);
    let owned: Vec<RecordInput> = inputs.iter().cloned().collect();
    let start = Instant::now();
    for r in owned {
        w.append(r).unwrap();
    }
    w.sync().unwrap();
    let append_rate = inputs.len() as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    w.roll().unwrap();
    let roll_rate = inputs.len() as f64 / start.elapsed().as_secs_f64();

    println!(
        "archive bench ({} records of {} B JSON on average)",
        inputs.len(),
        json_bytes / inputs.len()
    );
    println!(
        "{:<44} {:>10.0} records/s",
        "  part: chain + WAL append", append_rate
    );
    println!(
        "{:<44} {:>10.0} records/s",
        "  part: Parquet encode + publish", roll_rate
    );
    println!(
        "{:<44} {:>10.0} records/s (one core writing)",
        "buffered append + Parquet roll", buffered
    );
    println!(
        "{:<44} {:>10.0} records/s ({} fsyncs for {n} records)",
        "strict, 64 callers awaiting durability", strict, fsyncs
    );
    println!(
        "{:<44} {:>10.0} B/message on disk, {:.1}x smaller than the JSON",
        "zstd Parquet size",
        parquet_bytes as f64 / inputs.len() as f64,
        json_bytes as f64 / parquet_bytes as f64
    );

    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv/bin/python");
    if !python.exists() {
        println!(
            "DuckDB: skipped (no venv at {}; run cargo xtask setup)",
            python.display()
        );
        let _ = std::fs::remove_dir_all(&base);
        return;
    }
    // One million messages for DuckDB.
    let dir = base.join("million");
    rt.block_on(async {
        let archive = Archive::start(
            writer(&dir, 100_000),
            Recording::Buffered,
            Duration::from_secs(3600),
        );
        for round in 0..5u64 {
            for r in inputs.iter() {
                let mut r = r.clone();
                r.seq += round * 1_000_000;
                archive.record(r).await.unwrap();
            }
        }
        archive.close().await.unwrap();
    });
    let glob = format!("{}/archive/**/*.parquet", dir.display());
    let script = r#"
import duckdb, sys, time
glob = sys.argv[1]
src = f"read_parquet('{glob}', hive_partitioning=true)"
con = duckdb.connect()
def timed(sql, n=5):
    best = None
    for _ in range(n):
        t = time.perf_counter(); rows = con.sql(sql).fetchall(); e = time.perf_counter() - t
        best = e if best is None or e < best else best
    return best, rows
full, rows = timed(f"select count(*) from {src} where payload like '%needle-that-is-absent%'")
one, tr = timed(f"select seq, direction, method, tool, payload from {src} where session_id = 'session-0777' order by seq")
total = con.sql(f"select count(*) from {src}").fetchall()[0][0]
print(f"{total} {full:.6f} {one:.6f} {len(tr)}")
"#;
    let out = Command::new(&python)
        .args(["-c", script, &glob])
        .output()
        .expect("run duckdb");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    let (total, full, one, rows): (u64, f64, f64, u64) = (
        f[0].parse().unwrap(),
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
        f[3].parse().unwrap(),
    );
    println!(
        "{:<44} {:>10.1} ms over {total} messages",
        "DuckDB full scan (LIKE on payload)",
        full * 1e3
    );
    println!(
        "{:<44} {:>10.1} ms ({rows} messages), {:.3}x the full scan",
        "DuckDB one session's transcript",
        one * 1e3,
        one / full
    );
    let _ = std::fs::remove_dir_all(&base);
}

fn writer(dir: &Path, max_rows: usize) -> ArchiveWriter {
    ArchiveWriter::open(WriterConfig {
        archive_dir: dir.join("archive"),
        signing_key: dir.join("signing.key"),
        host: "bench".into(),
        group: None,
        max_rows,
    })
    .unwrap()
    .0
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        dir_size(&p)
                    } else if p.extension().is_some_and(|x| x == "parquet") {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    } else {
                        0
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Realistic messages: tools/call requests and responses over many sessions, masked.
fn make_inputs(n: usize) -> Vec<RecordInput> {
    let policies = PolicySet::load_dir(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies"),
        HashKey([5; 32]),
    )
    .unwrap();
    let subject = Subject {
        uid: 1000,
        gid: 1000,
        user: Some("ci".into()),
        comm: "node".into(),
        ..Default::default()
    };
    let tools = [
        "search_issues",
        "read_file",
        "list_pull_requests",
        "get_weather",
        "query_db",
    ];
    (0..n)
        .map(|i| {
            let session = (i as u64 * 7919) % SESSIONS;
            let tool = tools[i % tools.len()];
            let request = i % 2 == 0;
            let msg = Message {
                backend: "tools",
                direction: if request { Direction::ClientToServer } else { Direction::ServerToClient },
                method: Some("tools/call"),
                tool: Some(tool),
                arguments: None,
                is_request: request,
            };
            let decision = policies.decide(&subject, &msg);
            let body = if request {
                json!({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool, "arguments": {"query": format!("status of build {i} on branch main"), "limit": 20}}})
            } else {
                json!({"jsonrpc": "2.0", "id": i - 1, "result": {"content": [{"type": "text", "text": format!("Build {i} passed: 1284 tests in 312 s; coverage 81.4%; artifacts at /builds/{i}/out.tar.gz; reviewer bob@example.com approved.")}], "isError": false}})
            };
            let (payload, counts) = policies.mask_payload(&decision, body);
            RecordInput {
                ts_us: 1_795_000_000_000_000 + i as i64 * 1000,
                host: "bench".into(),
                session_id: format!("session-{session:04}"),
                mcp_session_id: Some(format!("mcp-{session:08x}")),
                seq: i as u64,
                direction: if request { "client_to_server" } else { "server_to_client" }.into(),
                kind: if request { "request" } else { "response" }.into(),
                method: Some("tools/call".into()),
                tool: Some(tool.into()),
                jsonrpc_id: Some(i.to_string()),
                payload: Some(payload),
                decision: if counts.is_empty() { "allow" } else { "mask" }.into(),
                rules: decision.rules.clone(),
                masked_detectors: counts.keys().cloned().collect(),
                latency_us: (!request).then_some(800 + (i as u64 % 500)),
                pid: Some(4000 + session as u32),
                tgid: Some(4000 + session as u32),
                uid: Some(1000),
                gid: Some(1000),
                user: Some("ci".into()),
                comm: Some("node".into()),
                exe: Some("/usr/bin/node".into()),
                cgroup: Some("/ci/job".into()),
                backend: Some("tools".into()),
                server_addr: Some("127.0.0.2:8443".into()),
                sni: Some("mcp.internal.test".into()),
                principal_iss: None,
                principal_sub: None,
                policy_hash: Some(policies.hash.clone()),
            }
        })
        .collect()
}
