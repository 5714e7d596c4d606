//! Benchmark: the archive. Records appended per second (buffered, strict with concurrent
//! callers), bytes on disk per message against the JSON it came from, and DuckDB over one
//! million archived messages: one session's transcript against a full scan.
//!
//! `cargo bench --bench archive` (DuckDB from `cargo xtask setup`'s venv; skipped if absent).
//! `AIRLOCK_BENCH_ONLY=throughput` or `=duckdb` runs one half, `=publish` only the publish
//! peak (heap and RSS high-water of turning one full segment into its Parquet file);
//! `AIRLOCK_BENCH_KEEP=1` keeps the archives made.

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
/// The agent's `max_rows` (agent.rs).
const ROWS_PER_FILE: usize = 100_000;

/// The agent's allocator (see agent/src/main.rs), so the bench measures what the agent runs,
/// counting the bytes live while [`heap::COUNTING`] is set (for the publish peak).
#[global_allocator]
static GLOBAL: heap::Counting = heap::Counting;

/// A counting wrapper around mimalloc: bytes allocated minus bytes freed since
/// [`heap::start`], and their high-water mark. Off (one relaxed load) outside a measurement.
mod heap {
    use std::{
        alloc::{GlobalAlloc, Layout},
        sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed},
    };

    pub struct Counting;
    pub static COUNTING: AtomicBool = AtomicBool::new(false);
    static LIVE: AtomicIsize = AtomicIsize::new(0);
    static PEAK: AtomicIsize = AtomicIsize::new(0);

    fn add(n: isize) {
        if COUNTING.load(Relaxed) {
            let now = LIVE.fetch_add(n, Relaxed) + n;
            PEAK.fetch_max(now, Relaxed);
        }
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let p = unsafe { mimalloc::MiMalloc.alloc(l) };
            if !p.is_null() {
                add(l.size() as isize);
            }
            p
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            let p = unsafe { mimalloc::MiMalloc.alloc_zeroed(l) };
            if !p.is_null() {
                add(l.size() as isize);
            }
            p
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            unsafe { mimalloc::MiMalloc.dealloc(p, l) };
            add(-(l.size() as isize));
        }
        /// Counted as a new block then the old one freed: a growing buffer is copied, and
        /// both are live meanwhile.
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            let q = unsafe { mimalloc::MiMalloc.realloc(p, l, new) };
            if !q.is_null() {
                add(new as isize);
                add(-(l.size() as isize));
            }
            q
        }
    }

    /// Start counting from zero.
    pub fn start() {
        LIVE.store(0, Relaxed);
        PEAK.store(0, Relaxed);
        COUNTING.store(true, Relaxed);
    }

    /// Stop counting: the high-water mark of live bytes since [`start`].
    pub fn stop() -> usize {
        COUNTING.store(false, Relaxed);
        PEAK.load(Relaxed).max(0) as usize
    }
}

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
    // AIRLOCK_BENCH_ONLY=throughput or =duckdb runs one half, =publish the publish peak alone.
    let only = std::env::var("AIRLOCK_BENCH_ONLY").unwrap_or_default();
    // First, while the process is small: its RSS high-water is then the publish's.
    if only.is_empty() || only == "publish" {
        publish_peak(&base.join("publish-peak"), ROWS_PER_FILE);
        if only == "publish" {
            if std::env::var_os("AIRLOCK_BENCH_KEEP").is_some() {
                println!("kept {}", base.display());
            } else {
                let _ = std::fs::remove_dir_all(&base);
            }
            return;
        }
    }
    let inputs = Arc::new(make_inputs(200_000));
    let json_bytes: usize = inputs
        .iter()
        .map(|r| serde_json::to_vec(r).unwrap().len())
        .sum();

    // Buffered: one producer, as fast as the writer takes them.
    if only != "duckdb" {
        let dir = base.join("buffered");
        let owned: Vec<RecordInput> = inputs.iter().cloned().collect();
        let start = Instant::now();
        let cpu_start = process_cpu();
        rt.block_on(async {
            let archive = Archive::start(
                writer(&dir, ROWS_PER_FILE),
                Recording::Buffered,
                Duration::from_secs(3600),
            );
            for r in owned {
                archive.record(r).await.unwrap();
            }
            archive.close().await.unwrap();
        });
        let buffered = inputs.len() as f64 / start.elapsed().as_secs_f64();
        let buffered_per_cpu = inputs.len() as f64 / (process_cpu() - cpu_start).as_secs_f64();
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
                writer(&dir, ROWS_PER_FILE),
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
            // Every record acknowledged durable; publishing the file at close is not counted.
            let acked = start.elapsed();
            let fsyncs = archive
                .stats
                .fsyncs
                .load(std::sync::atomic::Ordering::Relaxed);
            archive.close().await.unwrap();
            (fsyncs, acked)
        });
        let (fsyncs, acked) = fsyncs;
        let strict = n as f64 / acked.as_secs_f64();

        // The two threads' work, each alone on one core, without channels: the log thread
        // (chain, WAL append, an fsync every 1024 records as buffered recording does), then the
        // publish thread (Parquet encode, fsync, rename, manifest line).
        let dir = base.join("parts");
        let (mut log, mut publisher) = writer(&dir, usize::MAX).into_parts();
        let owned: Vec<RecordInput> = inputs.iter().cloned().collect();
        let start = Instant::now();
        let mut sealed = Vec::new();
        for (i, r) in owned.into_iter().enumerate() {
            log.append(r).unwrap();
            if i % 1024 == 1023 {
                log.sync().unwrap();
            }
            // Files of 100,000 rows, as the agent writes them.
            if i % ROWS_PER_FILE == ROWS_PER_FILE - 1 {
                sealed.extend(log.seal().unwrap());
            }
        }
        sealed.extend(log.seal().unwrap());
        let append_rate = inputs.len() as f64 / start.elapsed().as_secs_f64();
        let start = Instant::now();
        for s in sealed {
            publisher.submit(s);
        }
        publisher.publish_queued().unwrap();
        let publish_rate = inputs.len() as f64 / start.elapsed().as_secs_f64();

        println!(
            "archive bench ({} records of {} B JSON on average)",
            inputs.len(),
            json_bytes / inputs.len()
        );
        println!(
            "{:<44} {:>10.0} records/s (one core)",
            "log thread: chain + WAL append + fsync", append_rate
        );
        println!(
            "{:<44} {:>10.0} records/s (one core)",
            "publish thread: Parquet encode + publish", publish_rate
        );
        println!(
            "{:<44} {:>10.0} records/s per CPU-second of both",
            "  both together",
            1.0 / (1.0 / append_rate + 1.0 / publish_rate)
        );
        println!(
            "{:<44} {:>10.0} records/s ({:.0} per CPU-second of the process)",
            "buffered, through the service", buffered, buffered_per_cpu
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
    }
    if only == "throughput" {
        let _ = std::fs::remove_dir_all(&base);
        return;
    }
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv/bin/python");
    if !python.exists() {
        println!(
            "DuckDB: skipped (no venv at {}; run cargo xtask setup)",
            python.display()
        );
        let _ = std::fs::remove_dir_all(&base);
        return;
    }
    // One million messages for DuckDB, twice: sessions as they come and go on a runner
    // (ACTIVE at a time, PER_SESSION messages each, interleaved), and the worst case where
    // every session is spread over every file.
    for (layout, session_of) in [
        ("sessions come and go", session_in_time as fn(u64) -> u64),
        ("every session in every file", session_scattered),
    ] {
        let dir = base.join(format!("million-{}", session_of(1)));
        rt.block_on(async {
            let archive = Archive::start(
                writer(&dir, ROWS_PER_FILE),
                Recording::Buffered,
                Duration::from_secs(3600),
            );
            for round in 0..5u64 {
                for (i, r) in inputs.iter().enumerate() {
                    let n = round * inputs.len() as u64 + i as u64;
                    let mut r = r.clone();
                    r.session_id = format!("session-{:04}", session_of(n));
                    r.seq = n;
                    r.ts_us = 1_795_000_000_000_000 + n as i64 * 1000;
                    archive.record(r).await.unwrap();
                }
            }
            archive.close().await.unwrap();
        });
        let (total, full, one, rows) = duckdb_transcript(&python, &dir);
        println!("DuckDB over {total} messages, {layout}:");
        println!(
            "{:<44} {:>10.1} ms",
            "  full scan (LIKE on payload)",
            full * 1e3
        );
        println!(
            "{:<44} {:>10.1} ms ({rows} messages), {:.3}x the full scan",
            "  one session's transcript",
            one * 1e3,
            one / full
        );
    }
    if std::env::var_os("AIRLOCK_BENCH_KEEP").is_some() {
        println!("kept {}", base.display());
    } else {
        let _ = std::fs::remove_dir_all(&base);
    }
}

/// Sessions active at once, and messages per session, for [`session_in_time`].
const ACTIVE: u64 = 100;
const PER_SESSION: u64 = 500;

/// Message `n`'s session when sessions begin and end over time: `ACTIVE` of them at once,
/// their messages interleaved, each done after `PER_SESSION` messages.
fn session_in_time(n: u64) -> u64 {
    n / (ACTIVE * PER_SESSION) * ACTIVE + n % ACTIVE
}

/// Message `n`'s session when every session lasts the whole archive (the worst case for
/// pruning: every file holds some of every session).
fn session_scattered(n: u64) -> u64 {
    (n * 7919) % SESSIONS
}

/// Best-of-five DuckDB timings over an archive: (messages, full scan s, transcript s, rows).
fn duckdb_transcript(python: &Path, dir: &Path) -> (u64, f64, f64, u64) {
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
    let out = Command::new(python)
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
    (
        f[0].parse().unwrap(),
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
        f[3].parse().unwrap(),
    )
}

fn writer(dir: &Path, max_rows: usize) -> ArchiveWriter {
    ArchiveWriter::open(WriterConfig {
        archive_dir: dir.join("archive"),
        signing_key: dir.join("signing.key"),
        host: "bench".into(),
        group: None,
        max_rows,
        max_segment_bytes: airlock::archive::writer::MAX_SEGMENT_BYTES,
    })
    .unwrap()
    .0
}

/// CPU time of the whole process so far (every thread, the producer included).
fn process_cpu() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID).unwrap();
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
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

/// The publish thread's peak: one segment of `rows` records (made one at a time, so the
/// process is small before), then its Parquet file written by `publish_queued` on this thread.
/// Heap: the high-water of bytes live during the publish over those live before it (every
/// thread, but only this one works). RSS: `VmHWM` (reset through `clear_refs`) over `VmRSS`
/// before; mimalloc keeps freed pages, so this is a lower bound of what a fresh process faults.
fn publish_peak(dir: &Path, rows: usize) {
    let policies = policies();
    let (mut log, mut publisher) = writer(dir, usize::MAX).into_parts();
    for i in 0..rows {
        log.append(make_input(&policies, i)).unwrap();
        if i % 1024 == 1023 {
            log.sync().unwrap();
        }
    }
    let sealed = log.seal().unwrap().expect("a segment");
    drop(policies);
    let wal: u64 = std::fs::read_dir(dir.join("archive/_wal"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let rss = proc_status_kib("VmRSS");
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    heap::start();
    let start = Instant::now();
    publisher.submit(sealed);
    publisher.publish_queued().unwrap();
    let elapsed = start.elapsed();
    let heap_peak = heap::stop();
    let hwm = proc_status_kib("VmHWM");
    let mib = |b: f64| b / (1024.0 * 1024.0);
    println!(
        "publish peak, one segment of {rows} records ({:.1} MiB of WAL): heap +{:.1} MiB, RSS \
         high-water +{} ({:.2} s)",
        mib(wal as f64),
        mib(heap_peak as f64),
        if reset {
            format!("{:.1} MiB", mib(hwm.saturating_sub(rss) as f64 * 1024.0))
        } else {
            "? (clear_refs not writable)".into()
        },
        elapsed.as_secs_f64()
    );
}

/// A `/proc/self/status` field in KiB.
fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn policies() -> PolicySet {
    PolicySet::load_dir(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies"),
        HashKey([5; 32]),
    )
    .unwrap()
}

/// Realistic messages: tools/call requests (~300 B) and responses (~1 KB), the reference
/// call of PERFORMANCE-FLOORS.md, over sessions that come and go, masked.
fn make_inputs(n: usize) -> Vec<RecordInput> {
    let policies = policies();
    (0..n).map(|i| make_input(&policies, i)).collect()
}

/// Message `i` of [`make_inputs`].
fn make_input(policies: &PolicySet, i: usize) -> RecordInput {
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
    let session = session_in_time(i as u64);
    let tool = tools[i % tools.len()];
    let request = i.is_multiple_of(2);
    let msg = Message {
        backend: "tools",
        direction: if request {
            Direction::ClientToServer
        } else {
            Direction::ServerToClient
        },
        method: Some("tools/call"),
        tool: Some(tool),
        arguments: None,
        is_call: request,
        scope_unknown: false,
    };
    let decision = policies.decide(&subject, &msg);
    let body = if request {
        json!({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool, "arguments": {"query": format!("status of build {i} on branch main, failed jobs first"), "repository": "platform/runner-images", "since": "2026-11-01T00:00:00Z", "limit": 20}, "_meta": {"progressToken": i}}})
    } else {
        json!({"jsonrpc": "2.0", "id": i - 1, "result": {"content": [{"type": "text", "text": format!(
            "Build {i} passed: 1284 tests in 312 s; coverage 81.4%; artifacts at /builds/{i}/out.tar.gz; reviewer bob@example.com approved.\n\
             jobs: lint ok ({a} s), unit ok ({b} s), integration ok ({c} s), e2e ok ({d} s), package ok ({e} s)\n\
             slowest tests: tests/privileged/mcp.rs::conformance ({b}.{c} s), tests/archive.rs::crash_loop ({c}.{d} s), \
             benches/tls.rs::keep_alive ({d}.{e} s)\n\
             warnings: 3 deprecated APIs in agent/src/http.rs lines {a}, {b}, {c}; flaky: none in the last {e} runs\n\
             cache: restored 1.{a} GiB in {b} s, saved in {c} s; runner ci-{d}.internal, image 2026.11.{e}",
            a = i % 97, b = i % 89, c = i % 83, d = i % 79, e = i % 73
        )}], "isError": false}})
    };
    let (payload, masking) = policies.mask_payload(&decision, body);
    let counts = masking.counts();
    RecordInput {
        ts_us: 1_795_000_000_000_000 + i as i64 * 1000,
        host: "bench".into(),
        session_id: format!("session-{session:04}"),
        mcp_session_id: Some(format!("mcp-{session:08x}")),
        seq: i as u64,
        direction: if request {
            "client_to_server"
        } else {
            "server_to_client"
        }
        .into(),
        kind: if request { "request" } else { "response" }.into(),
        method: Some("tools/call".into()),
        tool: Some(tool.into()),
        jsonrpc_id: Some(i.to_string()),
        payload: Some(payload),
        decision: if counts.is_empty() { "allow" } else { "mask" }.into(),
        rules: masking.rules().to_vec(),
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
}
