//! Benchmark: stdio MCP servers of a governed job. The same client, in the same run, directly
//! and under `airlock govern` (its server relayed through the pipeline with the shipped
//! default policies):
//! - exec overhead: 1,000 `fork` + `exec /bin/true` + `wait`;
//! - call latency: one `tools/call` answered with 1 KiB at a time (p50, p99);
//! - throughput: 20,000 calls written back to back (the pipe full), 1 KiB answers each.
//!
//! Needs root (`cargo xtask bench`). Prints a table and writes `target/bench-stdio.json`.
//! The server is this binary again (`--stdio-bench-server`, a few µs per call), so the
//! numbers are the transport's and the relay's, not a Python server's.

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");
const EXECS: usize = 1000;
const CALLS: usize = 2000;
const BULK: usize = 20_000;
const ANSWER_LEN: usize = 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if args.iter().any(|a| a == "--stdio-bench-server") {
        return server();
    }
    if args.iter().any(|a| a == "--client") {
        return client();
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("stdio bench: needs root (cargo xtask bench)");
        std::process::exit(1);
    }
    let name = format!("airlock-bench-stdio-{}", std::process::id());
    let cgroup = airlock::cgroup::resolve(None)
        .expect("cgroup2 mount")
        .join(&name);
    std::fs::create_dir_all(&cgroup).expect("create bench cgroup");
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/default.toml"),
        dir.join("policies/default.toml"),
    )
    .unwrap();
    let config = dir.join("airlock.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{d}/state\"\narchive_dir = \"{d}/archive\"\npolicies_dir = \"{d}/policies\"\n\
             cgroup = \"{cg}\"\nbpffs_dir = \"/sys/fs/bpf/{name}\"\nlisten_port = 991\n\
             [[stdio_server]]\nname = \"bench\"\nargs = [\"--stdio-bench-server\"]\n\
             [[backend]]\nname = \"unused\"\nhost = \"unused.internal.test\"\nport = 9\nmode = \"opaque\"\ntls = false\naddresses = [\"127.0.0.2\"]\n",
            d = dir.display(),
            cg = cgroup.display(),
        ),
    )
    .unwrap();
    let mut guard = Cleanup {
        cgroup: cgroup.clone(),
        agent: None,
        dir: dir.clone(),
        config: config.clone(),
    };
    guard.agent = Some(
        Command::new(AIRLOCK)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log")).expect("agent log"))
            .spawn()
            .expect("start airlock"),
    );
    wait_ready(&config);
    let me = std::env::current_exe().unwrap();
    let run = |governed: bool| -> serde_json::Value {
        let mut cmd = if governed {
            let mut c = Command::new(AIRLOCK);
            c.arg("--config")
                .arg(&config)
                .args(["govern", "--"])
                .arg(&me);
            c
        } else {
            Command::new(&me)
        };
        let out = cmd.arg("--client").output().expect("run the client");
        assert!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("client output")
    };
    // Warm-up, then alternate so both see the same machine.
    run(false);
    run(true);
    let (direct, governed) = (run(false), run(true));
    let n = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "stdio (same run)", "direct", "governed", "ratio"
    );
    for (label, key, unit) in [
        ("exec of /bin/true (fork+exec+wait)", "exec_us", "µs"),
        ("tools/call round trip, p50", "call_p50_us", "µs"),
        ("tools/call round trip, p99", "call_p99_us", "µs"),
        ("20k calls back to back", "bulk_calls_per_s", "calls/s"),
        (
            "20k calls back to back, answer bytes",
            "bulk_mib_per_s",
            "MiB/s",
        ),
    ] {
        let (d, g) = (n(&direct, key), n(&governed, key));
        println!(
            "{label:<44} {d:>9.1} {unit:<2} {g:>9.1} {unit:<2} {:>7.2}×",
            g / d
        );
    }
    let json = serde_json::json!({ "direct": direct, "governed": governed });
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-stdio.json");
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap());
    println!("wrote {}", out.display());
    drop(guard);
}

/// The measuring client: execs, then a server (this binary) spawned with piped stdio.
fn client() {
    let t = Instant::now();
    for _ in 0..EXECS {
        let s = Command::new("/bin/true").status().expect("exec /bin/true");
        assert!(s.success());
    }
    let exec_us = t.elapsed().as_secs_f64() * 1e6 / EXECS as f64;

    let me = std::env::current_exe().unwrap();
    let mut server = Command::new(&me)
        .arg("--stdio-bench-server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the server");
    let mut to = server.stdin.take().unwrap();
    let mut from = BufReader::with_capacity(1 << 20, server.stdout.take().unwrap());
    let call = |id: usize| {
        format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"tools/call\",\"params\":{{\"name\":\"echo\",\"arguments\":{{\"text\":\"hello\"}}}}}}\n"
        )
    };
    let init = "{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"2025-06-18\",\"capabilities\":{},\"clientInfo\":{\"name\":\"bench\",\"version\":\"1\"}}}\n";
    to.write_all(init.as_bytes()).unwrap();
    let mut line = String::new();
    from.read_line(&mut line).unwrap();
    let mut lat = Vec::with_capacity(CALLS);
    for id in 1..=CALLS {
        let t = Instant::now();
        to.write_all(call(id).as_bytes()).unwrap();
        line.clear();
        from.read_line(&mut line).unwrap();
        lat.push(t.elapsed());
        assert!(line.len() > ANSWER_LEN, "short answer: {line}");
    }
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;

    let first = CALLS + 1;
    let writer = thread::spawn(move || {
        let mut buf = Vec::new();
        for id in first..first + BULK {
            buf.extend_from_slice(call(id).as_bytes());
        }
        to.write_all(&buf).unwrap();
        to
    });
    let t = Instant::now();
    let mut bytes = 0usize;
    for _ in 0..BULK {
        line.clear();
        bytes += from.read_line(&mut line).unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    drop(writer.join().unwrap());
    let _ = server.wait();
    println!(
        "{}",
        serde_json::json!({
            "exec_us": exec_us,
            "call_p50_us": pct(0.5),
            "call_p99_us": pct(0.99),
            "bulk_calls_per_s": BULK as f64 / secs,
            "bulk_mib_per_s": bytes as f64 / secs / (1 << 20) as f64,
        })
    );
}

/// The server: answers `initialize` and every call with a 1 KiB text result.
fn server() {
    let stdin = std::io::stdin();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let text = "x".repeat(ANSWER_LEN);
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        let Some(id) = v.get("id") else { continue };
        let result = if v["method"] == "initialize" {
            serde_json::json!({"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                               "serverInfo": {"name": "bench", "version": "1"}})
        } else {
            serde_json::json!({"content": [{"type": "text", "text": text}]})
        };
        let answer = serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result});
        writeln!(out, "{answer}").unwrap();
        out.flush().unwrap();
    }
}

fn wait_ready(config: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let ok = Command::new(AIRLOCK)
            .args(["status", "--json", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("agent not ready");
}

/// Agent stopped and detached, cgroup and directory removed.
struct Cleanup {
    cgroup: PathBuf,
    agent: Option<Child>,
    dir: PathBuf,
    config: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new(AIRLOCK)
            .args(["detach", "--config"])
            .arg(&self.config)
            .output();
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
