//! Benchmark: a connection plus one small request/response through Airlock's redirect and
//! relay, against the same exchange sent directly to the same server, in the same run; and
//! the kernel programs' own cost from `bpf_stats`.
//!
//! Needs root (`cargo xtask bench`). Prints a table and writes `target/bench-redirect.json`.
//!
//! Set-up: one server process-thread listening on two ports of 127.0.0.2, only one of them a
//! configured backend; this bench process is moved into a fresh cgroup the programs attach to,
//! so its connections to the backend port are redirected and those to the other port are not.
//! The agent runs outside that cgroup, so its upstream connections do not add hook runs to the
//! redirect-path measurement.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::programs::{ProgramInfo, links::PinnedLink};

const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");
const ROUNDS: usize = 3;
const PER_ROUND: usize = 1000;
const KEEPALIVE_EXCHANGES: usize = 5000;
const REQUEST: &[u8] =
    b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\"}}\n";
const RESPONSE_LEN: usize = 1024;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / `cargo test --benches` probing
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("redirect bench: needs root (cargo xtask bench)");
        std::process::exit(1);
    }
    let name = format!("airlock-bench-{}", std::process::id());
    let cgroup_root = cgroup2_root();
    let cgroup = cgroup_root.join(&name);
    std::fs::create_dir_all(&cgroup).expect("create bench cgroup");
    let guard = Cleanup {
        cgroup: cgroup.clone(),
        agent: None,
        config: None,
    };

    // The server: one thread per connection; newline-terminated requests; a 1 KiB answer each.
    let backend = serve("127.0.0.2:0");
    let direct = serve("127.0.0.2:0");
    let dir = std::env::temp_dir().join(&name);
    // No policy: an opaque backend's bytes are never judged.
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    let config = dir.join("airlock.toml");
    let port = 990;
    // Buffered by default: this measures the redirect and the relay. With BENCH_RECORDING=strict
    // every new connection also waits for its archive record's fsync.
    let recording = std::env::var("BENCH_RECORDING").unwrap_or_else(|_| "buffered".into());
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{d}/state\"\narchive_dir = \"{d}/archive\"\npolicies_dir = \"{d}/policies\"\nrecording = \"{recording}\"\ncgroup = \"{cg}\"\nbpffs_dir = \"/sys/fs/bpf/{name}\"\nlisten_port = {port}\n\
             [[backend]]\nname = \"bench\"\nhost = \"bench.internal.test\"\nport = {bp}\nmode = \"opaque\"\ntls = false\naddresses = [\"127.0.0.2\"]\n",
            d = dir.display(),
            recording = recording,
            cg = cgroup.display(),
            bp = backend.port(),
        ),
    )
    .unwrap();
    let mut guard = guard;
    guard.config = Some(config.clone());
    let agent = Command::new(AIRLOCK)
        .args(["run", "--config"])
        .arg(&config)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(
            std::env::var("BENCH_AGENT_THREADS")
                .ok()
                .map(|n| ("TOKIO_WORKER_THREADS", n)),
        )
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(std::env::temp_dir().join("airlock-bench-agent.log"))
                .expect("agent log"),
        )
        .spawn()
        .expect("start airlock");
    guard.agent = Some(agent);
    wait_ready(&config);

    // From here on, this process is inside the intercepted cgroup.
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .expect("join cgroup");
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable bpf_stats");
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/{name}"));
    // An empty connect4 program on the same cgroup: it runs for every connect() too, and its
    // cost is the kernel's floor for any program (dispatch plus bpf_stats accounting).
    let mut baseline = aya::Ebpf::load(aya::include_bytes_aligned!(concat!(
        env!("OUT_DIR"),
        "/airlock-ebpf-baseline"
    )))
    .expect("load baseline object");
    let empty: &mut aya::programs::CgroupSockAddr = baseline
        .program_mut("airlock_empty4")
        .expect("baseline program")
        .try_into()
        .expect("cgroup_sock_addr");
    empty.load().expect("load baseline");
    empty
        .attach(
            std::fs::File::open(&cgroup).expect("cgroup"),
            aya::programs::CgroupAttachMode::Single,
        )
        .expect("attach baseline");
    let empty_info = || empty_info(&baseline);

    // Warm-up, and a check that the two paths are what we think.
    assert_eq!(
        exchange(backend).1.port(),
        port,
        "backend port not redirected"
    );
    assert_eq!(exchange(direct).1, direct, "direct port redirected");

    let mut direct_lat = Vec::new();
    let mut airlock_lat = Vec::new();
    let mut miss = HookCost::default();
    let mut hit = HookCost::default();
    let mut floor = HookCost::default();
    for _ in 0..ROUNDS {
        let (before, empty_before) = (prog(&bpffs, "connect4"), empty_info());
        for _ in 0..PER_ROUND {
            direct_lat.push(exchange(direct).0);
        }
        miss.add(&before, &prog(&bpffs, "connect4"));
        floor.add(&empty_before, &empty_info());
        let (before, empty_before) = (prog(&bpffs, "connect4"), empty_info());
        for _ in 0..PER_ROUND {
            airlock_lat.push(exchange(backend).0);
        }
        hit.add(&before, &prog(&bpffs, "connect4"));
        floor.add(&empty_before, &empty_info());
    }
    let sockops = prog(&bpffs, "sock_ops");
    let keepalive_direct = keepalive(direct);
    let keepalive_airlock = keepalive(backend);
    // The same hooks in a tight connect()/close() loop: caches stay warm, as in a burst of
    // connections; the exchange loops above leave them colder between two connect() calls.
    let mut miss_hot = HookCost::default();
    let mut hit_hot = HookCost::default();
    for (cost, addr) in [(&mut miss_hot, direct), (&mut hit_hot, backend)] {
        let before = prog(&bpffs, "connect4");
        for _ in 0..PER_ROUND {
            drop(TcpStream::connect(addr).expect("connect"));
        }
        cost.add(&before, &prog(&bpffs, "connect4"));
    }

    let new_conn = Comparison::new(&direct_lat, &airlock_lat);
    let reuse = Comparison::new(&keepalive_direct, &keepalive_airlock);
    println!(
        "redirect bench ({} connections each way, {} keep-alive exchanges, recording = {recording})",
        direct_lat.len(),
        KEEPALIVE_EXCHANGES
    );
    println!(
        "{:<40} {:>10} {:>10} {:>8} {:>10}",
        "", "direct", "airlock", "ratio", "added"
    );
    new_conn.print("connect + request/response + close, p50", |s| s.p50);
    new_conn.print("connect + request/response + close, p99", |s| s.p99);
    reuse.print("keep-alive request/response, p50", |s| s.p50);
    reuse.print("keep-alive request/response, p99", |s| s.p99);
    println!(
        "{:<40} {:>10.0} ns/run over {} runs",
        "empty connect4 program (kernel floor)",
        floor.ns(),
        floor.count
    );
    println!(
        "{:<40} {:>10.0} ns/run over {} runs ({:.0} ns above the floor)",
        "connect4, miss path (not a backend)",
        miss.ns(),
        miss.count,
        miss.ns() - floor.ns()
    );
    println!(
        "{:<40} {:>10.0} ns/run over {} runs ({:.0} ns above the floor)",
        "connect4, redirect path",
        hit.ns(),
        hit.count,
        hit.ns() - floor.ns()
    );
    println!(
        "{:<40} {:>10.0} ns/run over {} runs",
        "connect4, miss path, connect loop",
        miss_hot.ns(),
        miss_hot.count
    );
    println!(
        "{:<40} {:>10.0} ns/run over {} runs",
        "connect4, redirect path, connect loop",
        hit_hot.ns(),
        hit_hot.count
    );
    println!(
        "{:<40} {:>10.0} ns/run over {} runs",
        "sock_ops, all callbacks",
        sockops.run_time().as_nanos() as f64 / sockops.run_count().max(1) as f64,
        sockops.run_count()
    );
    let json = serde_json::json!({
        "connections_each": direct_lat.len(),
        "new_connection": new_conn.json(),
        "keepalive": reuse.json(),
        "empty_program_ns": floor.ns(),
        "connect4_miss_ns": miss.ns(),
        "connect4_redirect_ns": hit.ns(),
        "connect4_miss_connect_loop_ns": miss_hot.ns(),
        "connect4_redirect_connect_loop_ns": hit_hot.ns(),
        "sock_ops_ns": sockops.run_time().as_nanos() as f64 / sockops.run_count().max(1) as f64,
    });
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-redirect.json");
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap());
    println!("wrote {}", out.display());
    drop(guard);
}

/// One connection: connect, send the request, read the 1 KiB answer, close. Returns the time
/// and the peer the socket saw.
fn exchange(addr: SocketAddr) -> (Duration, SocketAddr) {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    let _ = s.set_nodelay(true);
    s.write_all(REQUEST).expect("send");
    let mut buf = [0u8; RESPONSE_LEN];
    s.read_exact(&mut buf).expect("receive");
    let took = start.elapsed();
    let peer = s.peer_addr().expect("peer");
    (took, peer)
}

fn keepalive(addr: SocketAddr) -> Vec<Duration> {
    let mut s = TcpStream::connect(addr).expect("connect");
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; RESPONSE_LEN];
    (0..KEEPALIVE_EXCHANGES)
        .map(|_| {
            let start = Instant::now();
            s.write_all(REQUEST).expect("send");
            s.read_exact(&mut buf).expect("receive");
            start.elapsed()
        })
        .collect()
}

fn serve(bind: &str) -> SocketAddr {
    let listener = TcpListener::bind(bind).expect("bind");
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let answer = vec![b'x'; RESPONSE_LEN];
                let mut reader = BufReader::new(&stream);
                let mut writer = &stream;
                let mut line = Vec::new();
                while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                    if writer.write_all(&answer).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

#[derive(Default)]
struct HookCost {
    ns: u128,
    count: u64,
}

impl HookCost {
    fn add(&mut self, before: &ProgramInfo, after: &ProgramInfo) {
        self.ns += after.run_time().as_nanos() - before.run_time().as_nanos();
        self.count += after.run_count() - before.run_count();
    }

    fn ns(&self) -> f64 {
        self.ns as f64 / self.count.max(1) as f64
    }
}

fn empty_info(ebpf: &aya::Ebpf) -> ProgramInfo {
    let p: &aya::programs::CgroupSockAddr = ebpf
        .program("airlock_empty4")
        .expect("baseline program")
        .try_into()
        .expect("cgroup_sock_addr");
    p.info().expect("baseline info")
}

/// The program behind one of the agent's pinned links.
fn prog(bpffs: &std::path::Path, link: &str) -> ProgramInfo {
    let pinned = PinnedLink::from_pin(bpffs.join("links").join(link)).expect("pinned link");
    let fd_link: aya::programs::links::FdLink = pinned.into();
    let id = fd_link.info().expect("link info").program_id();
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .expect("program of the link")
}

#[derive(Clone, Copy)]
struct Summary {
    p50: Duration,
    p99: Duration,
}

fn summary(samples: &[Duration]) -> Summary {
    let mut s = samples.to_vec();
    s.sort();
    let at = |q: f64| s[((s.len() as f64 - 1.0) * q).round() as usize];
    Summary {
        p50: at(0.50),
        p99: at(0.99),
    }
}

struct Comparison {
    direct: Summary,
    airlock: Summary,
}

impl Comparison {
    fn new(direct: &[Duration], airlock: &[Duration]) -> Comparison {
        Comparison {
            direct: summary(direct),
            airlock: summary(airlock),
        }
    }

    fn print(&self, label: &str, pick: impl Fn(&Summary) -> Duration) {
        let d = pick(&self.direct).as_secs_f64() * 1e6;
        let a = pick(&self.airlock).as_secs_f64() * 1e6;
        println!(
            "{label:<40} {d:>8.1}µs {a:>8.1}µs {:>7.2}× {:>8.1}µs",
            a / d,
            a - d
        );
    }

    fn json(&self) -> serde_json::Value {
        let us = |d: Duration| (d.as_secs_f64() * 1e7).round() / 10.0;
        serde_json::json!({
            "direct_p50_us": us(self.direct.p50), "airlock_p50_us": us(self.airlock.p50),
            "direct_p99_us": us(self.direct.p99), "airlock_p99_us": us(self.airlock.p99),
            "ratio_p50": self.airlock.p50.as_secs_f64() / self.direct.p50.as_secs_f64(),
            "ratio_p99": self.airlock.p99.as_secs_f64() / self.direct.p99.as_secs_f64(),
        })
    }
}

fn cgroup2_root() -> PathBuf {
    airlock::cgroup::resolve(None).expect("cgroup2 mount")
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

/// Leaves the machine as it was: agent stopped, programs detached, cgroup removed (this
/// process moves back to the root cgroup first).
struct Cleanup {
    cgroup: PathBuf,
    agent: Option<Child>,
    config: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(config) = &self.config {
            let _ = Command::new(AIRLOCK)
                .args(["detach", "--config"])
                .arg(config)
                .output();
        }
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        if let Some(root) = self.cgroup.parent() {
            let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        if let Some(dir) = self.config.as_ref().and_then(|c| c.parent()) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
