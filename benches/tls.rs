//! Benchmark: MCP `tools/call` over TLS three ways, in the same run, against the same server:
//! directly; through nginx (the reference: a plain TLS-terminating, re-encrypting reverse
//! proxy with keep-alive upstream connections, no inspection); and through Airlock (redirect,
//! TLS both sides, JSON-RPC parsing, the shipped masking policies, the shipped recording
//! mode).
//!
//! Needs root (`cargo xtask bench`). Prints a table and writes `target/bench-tls.json`.
//!
//! Set-up: the server is this binary re-run with `--serve` (its own process, one thread, so
//! its CPU time and memory can be read from /proc), listening on two ports of 127.0.0.2: one a
//! configured backend (redirected to Airlock), one not (direct; nginx's upstream). The load
//! generator (this process, one thread) moves into the cgroup the programs attach to; the
//! agent and nginx run outside it. Phases are separate: latency at 1 connection, throughput at
//! 32 (closed loop), CPU per request at a fixed offered load (open loop). The agent is
//! restarted (and so publishes what it holds) before each heavy phase: no Parquet file is
//! written inside a measured window.

#[path = "tls/peers.rs"]
mod peers;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use peers::{HOST, Nginx, cpu_ns, free_port, request_for, rss_kib};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};

const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");
const ROUNDS: usize = 3;
const KEEPALIVE_PER_ROUND: usize = 2000;
const NEW_CONNECTIONS: usize = 150;
const THROUGHPUT_SECS: u64 = 3;
const CONNECTIONS: usize = 32;
/// Offered load of the open-loop phase, requests per second.
const OPEN_LOOP_RATE: u64 = 2000;
const OPEN_LOOP_SECS: u64 = 3;
const IDLE_CONNECTIONS: usize = 500;
const SSE_STREAMS: usize = 3;

const DIRECT: usize = 0;
const NGINX: usize = 1;
const AIRLOCK_PATH: usize = 2;
const PATHS: [&str; 3] = ["direct", "nginx", "airlock"];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if args.get(1).map(String::as_str) == Some("--serve") {
        return peers::serve(&args[2], &args[3], &args[4..]);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("tls bench: needs root (cargo xtask bench)");
        std::process::exit(1);
    }
    let name = format!("airlock-bench-tls-{}", std::process::id());
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    // BENCH_POLICIES=none measures without any rule (no masking).
    if std::env::var("BENCH_POLICIES").as_deref() != Ok("none") {
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default.toml"),
            dir.join("policies/default.toml"),
        )
        .unwrap();
    }
    let cgroup = airlock::cgroup::resolve(None).unwrap().join(&name);
    std::fs::create_dir_all(&cgroup).unwrap();
    let mut guard = Cleanup {
        cgroup: cgroup.clone(),
        children: Vec::new(),
        others: Vec::new(),
        agent: None,
        config: None,
        dir: dir.clone(),
    };

    let pki = peers::pki(&dir);
    let (backend_port, direct_port, nginx_port) = (free_port(), free_port(), free_port());
    let server = Command::new(std::env::current_exe().unwrap())
        .arg("--serve")
        .arg(&pki.cert)
        .arg(&pki.key)
        .args([backend_port.to_string(), direct_port.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let server_pid = server.id();
    guard.children.push(server);
    for p in [backend_port, direct_port] {
        peers::wait_port(p);
    }
    let agent_threads: usize = std::env::var("BENCH_AGENT_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let nginx = Nginx::start(&dir, nginx_port, direct_port, &pki, agent_threads);
    let nginx_pids = nginx.pids();
    guard.children.push(nginx.child);
    // Its workers outlive a killed master: they are killed by pid too.
    guard.others = nginx_pids.clone();

    // The shipped default recording mode, unless BENCH_RECORDING names one.
    let default_recording = std::env::var("BENCH_RECORDING").ok();
    let agent = Agent {
        dir: dir.clone(),
        cgroup: cgroup.clone(),
        name: name.clone(),
        backend_port,
        ca: pki.ca.clone(),
        threads: std::env::var("BENCH_AGENT_THREADS").ok(),
    };
    let config = agent.write_config(default_recording.as_deref());
    guard.config = Some(config.clone());
    guard.agent = Some(agent.start());
    let bundle = Command::new(AIRLOCK)
        .args(["ca", "show", "--pem", "--config"])
        .arg(&config)
        .output()
        .unwrap()
        .stdout;

    // The client trusts both: the backend CA (direct, nginx) and Airlock's (redirected).
    let mut roots = rustls::RootCertStore::empty();
    for pem in [std::fs::read(&pki.ca).unwrap(), bundle] {
        for c in CertificateDer::pem_slice_iter(&pem) {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let client = Arc::new({
        let mut c = rustls::ClientConfig::builder_with_provider(airlock::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        c
    });

    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let at = |port| std::net::SocketAddr::from(([127, 0, 0, 2], port));
    let addrs = [at(direct_port), at(nginx_port), at(backend_port)];
    let pids = |path: usize, agent: u32| match path {
        DIRECT => vec![server_pid],
        NGINX => nginx_pids.clone(),
        _ => vec![agent],
    };

    let mut report = Report::default();
    // `BENCH_ONLY_IDLE=1`: stop after the idle-connection memory (to profile just that, e.g.
    // with the agent under heaptrack).
    let only_idle = std::env::var_os("BENCH_ONLY_IDLE").is_some();
    rt.block_on(async {
        for addr in addrs {
            let mut s = Session::open(&client, addr).await;
            for _ in 0..200 {
                s.call().await;
            }
        }
        // Memory per idle connection first, before other phases grow the allocators' caches.
        let agent_pid = guard.agent.as_ref().map_or(0, Child::id);
        for (path, addr) in addrs.into_iter().enumerate() {
            let who = pids(path, agent_pid);
            let before = rss_kib(&who);
            let mut held = Vec::new();
            for _ in 0..IDLE_CONNECTIONS {
                let mut s = Session::open(&client, addr).await;
                s.call().await;
                held.push(s);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            report.idle_kib[path] =
                rss_kib(&who).saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64;
            drop(held);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if only_idle {
            return;
        }
        // Latency, one keep-alive connection; new connection + first call. Interleaved.
        for _ in 0..ROUNDS {
            for (path, addr) in addrs.into_iter().enumerate() {
                let mut s = Session::open(&client, addr).await;
                report.keepalive[path].extend(s.timed_calls("echo", KEEPALIVE_PER_ROUND).await);
                for _ in 0..NEW_CONNECTIONS / ROUNDS {
                    let t = Instant::now();
                    let mut s = Session::open(&client, addr).await;
                    s.call().await;
                    report.new_connection[path].push(t.elapsed());
                }
            }
        }
        // The cost of masking: a clean result against one holding values the policies mask.
        {
            let mut s = Session::open(&client, addrs[AIRLOCK_PATH]).await;
            for _ in 0..2000 {
                for (i, tool) in ["echo", "contact"].into_iter().enumerate() {
                    let t = Instant::now();
                    s.call_tool(tool).await;
                    report.masking[i].push(t.elapsed());
                }
            }
        }
        // SSE: events per second in one streamed answer.
        for (path, addr) in addrs.into_iter().enumerate() {
            let mut s = Session::open(&client, addr).await;
            let mut rates = Vec::new();
            let streams = std::env::var("BENCH_SSE_STREAMS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(SSE_STREAMS);
            // `BENCH_PERF_SSE=FILE`: a `perf record -g` of the agent over its SSE streams
            // (with `BENCH_SSE_STREAMS` raised, long enough to sample).
            let perf = match std::env::var_os("BENCH_PERF_SSE") {
                Some(out) if path == AIRLOCK_PATH => perf_record(agent_pid, &out, None),
                _ => None,
            };
            for _ in 0..streams {
                let t = Instant::now();
                let events = s.stream().await;
                assert_eq!(events, peers::SSE_EVENTS + 1, "{}", PATHS[path]);
                rates.push(events as f64 / t.elapsed().as_secs_f64());
            }
            if let Some(mut p) = perf {
                // perf writes its file when interrupted.
                let _ = Command::new("kill")
                    .args(["-INT", &p.id().to_string()])
                    .status();
                let _ = p.wait();
            }
            rates.sort_by(f64::total_cmp);
            report.sse_events_per_sec[path] = rates[rates.len() / 2];
        }
    });
    if only_idle {
        println!(
            "resident KiB per idle connection (direct, nginx, airlock): {:?}",
            report.idle_kib
        );
        drop(guard);
        return;
    }

    // Throughput, closed loop, then CPU per request at a fixed offered load, each with a
    // freshly started agent (its archive published: no Parquet file is made in the window).
    for phase in 0..2 {
        guard.restart_agent(&agent, default_recording.as_deref());
        let agent_pid = guard.agent.as_ref().map_or(0, Child::id);
        rt.block_on(async {
            for (path, addr) in addrs.into_iter().enumerate() {
                let who = pids(path, agent_pid);
                let (cpu0, server0) = (cpu_ns(&who), cpu_ns(&[server_pid]));
                // `BENCH_PERF=FILE`: a `perf record -g` of the agent over the throughput
                // phase (the profiles BENCHMARKS.md quotes).
                let perf = match std::env::var_os("BENCH_PERF") {
                    Some(out) if phase == 0 && path == AIRLOCK_PATH => {
                        perf_record(agent_pid, &out, Some("2.5"))
                    }
                    _ => None,
                };
                let t = Instant::now();
                let n = if phase == 0 {
                    saturate(&client, addr).await
                } else {
                    open_loop(&client, addr).await
                };
                let secs = t.elapsed().as_secs_f64();
                let cpu = (cpu_ns(&who) - cpu0) as f64 / n as f64;
                let server_cpu = (cpu_ns(&[server_pid]) - server0) as f64 / n as f64;
                if let Some(mut p) = perf {
                    let _ = p.wait();
                }
                if phase == 0 {
                    report.rps[path] = n as f64 / secs;
                } else {
                    report.cpu_ns_per_request[path] = (cpu, server_cpu);
                    report.open_loop_rps[path] = n as f64 / secs;
                }
            }
        });
    }

    // The recording modes side by side: added latency at one connection, each against direct
    // in the same round; the modes take turns round by round (the agent restarted for each),
    // so a noisy minute on the host does not land on one mode only.
    let modes = ["buffered", "group", "strict"];
    let mut samples: Vec<(Vec<Duration>, Vec<Duration>)> = vec![Default::default(); modes.len()];
    for _ in 0..ROUNDS {
        for (m, mode) in modes.into_iter().enumerate() {
            guard.restart_agent(&agent, Some(mode));
            rt.block_on(async {
                let mut s = Session::open(&client, addrs[DIRECT]).await;
                samples[m]
                    .0
                    .extend(s.timed_calls("echo", KEEPALIVE_PER_ROUND / 2).await);
                let mut s = Session::open(&client, addrs[AIRLOCK_PATH]).await;
                samples[m]
                    .1
                    .extend(s.timed_calls("echo", KEEPALIVE_PER_ROUND / 2).await);
            });
        }
    }
    for (mode, (d, a)) in modes.into_iter().zip(&samples) {
        report
            .recording
            .push((mode, pct(a, 0.5) - pct(d, 0.5), pct(a, 0.99) - pct(d, 0.99)));
    }

    // A leaf-cache miss: mint a leaf (keygen + sign) with the agent's own code.
    let ca = airlock::tls::ca::Ca::load(&dir.join("state/ca")).unwrap();
    let cfg = airlock::config::Config::load(&config).unwrap();
    let minter = airlock::tls::Minter::new(&ca, &cfg.backends, "bench").unwrap();
    let t = Instant::now();
    for _ in 0..200 {
        minter
            .mint(&airlock::tls::LeafName::Dns(HOST.into()))
            .unwrap();
    }
    report.mint_us = t.elapsed().as_secs_f64() * 1e6 / 200.0;
    report.print(
        default_recording.as_deref().unwrap_or("shipped default"),
        agent_threads,
    );
    drop(guard);
}

/// `perf record -g` of `pid` into `out`: for `secs`, or (`None`) until it is sent SIGINT.
fn perf_record(pid: u32, out: &std::ffi::OsStr, secs: Option<&str>) -> Option<Child> {
    let mut perf = Command::new("perf");
    perf.args(["record", "-q", "-F", "2999", "-g", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(secs) = secs {
        perf.args(["--", "sleep", secs]);
    }
    perf.spawn().ok()
}

fn pct(v: &[Duration], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort();
    s[((s.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e6
}

#[derive(Default)]
struct Report {
    keepalive: [Vec<Duration>; 3],
    new_connection: [Vec<Duration>; 3],
    masking: [Vec<Duration>; 2],
    idle_kib: [f64; 3],
    sse_events_per_sec: [f64; 3],
    rps: [f64; 3],
    open_loop_rps: [f64; 3],
    /// (the path's own process, the server), ns of CPU per request.
    cpu_ns_per_request: [(f64, f64); 3],
    /// (mode, added p50, added p99), µs.
    recording: Vec<(&'static str, f64, f64)>,
    mint_us: f64,
}

impl Report {
    fn print(&self, recording: &str, threads: usize) {
        let ka = |q| self.keepalive.each_ref().map(|v| pct(v, q));
        let nc = |q| self.new_connection.each_ref().map(|v| pct(v, q));
        let (ka50, ka99, nc50) = (ka(0.5), ka(0.99), nc(0.5));
        let added = |v: [f64; 3], p: usize| v[p] - v[DIRECT];
        println!(
            "tls bench: recording = {recording}, shipped masking policies, {threads} agent threads / nginx workers"
        );
        println!(
            "{:<46} {:>10} {:>10} {:>10} {:>14}",
            "", "direct", "nginx", "airlock", "airlock/nginx"
        );
        let row = |label: &str, v: [f64; 3], unit: &str, ratio: f64| {
            println!(
                "{label:<46} {:>8.1}{unit} {:>8.1}{unit} {:>8.1}{unit} {ratio:>13.2}×",
                v[0], v[1], v[2]
            );
        };
        row(
            "keep-alive tools/call, p50",
            ka50,
            "µs",
            added(ka50, AIRLOCK_PATH) / added(ka50, NGINX),
        );
        row(
            "keep-alive tools/call, p99",
            ka99,
            "µs",
            added(ka99, AIRLOCK_PATH) / added(ka99, NGINX),
        );
        println!(
            "{:<46} {:>10} {:>+8.1}µs {:>+8.1}µs   (ratio of added)",
            "  added over direct, p50",
            "",
            added(ka50, NGINX),
            added(ka50, AIRLOCK_PATH)
        );
        println!(
            "{:<46} {:>10} {:>+8.1}µs {:>+8.1}µs",
            "  added over direct, p99",
            "",
            added(ka99, NGINX),
            added(ka99, AIRLOCK_PATH)
        );
        row(
            "new connection + TLS + first call, p50",
            nc50,
            "µs",
            nc50[AIRLOCK_PATH] / nc50[DIRECT],
        );
        println!("{:<46} (last column: airlock/direct)", "");
        let rps = self.rps;
        println!(
            "{:<46} {:>8.0}/s {:>8.0}/s {:>8.0}/s {:>13.2}×",
            "throughput, 32 connections (closed loop)",
            rps[0],
            rps[1],
            rps[2],
            rps[2] / rps[1]
        );
        let cpu = self.cpu_ns_per_request.map(|(own, _)| own / 1000.0);
        println!(
            "{:<46} {:>8.1}µs {:>8.1}µs {:>8.1}µs {:>13.2}×",
            format!("CPU per request at {OPEN_LOOP_RATE}/s (open loop)"),
            cpu[0],
            cpu[1],
            cpu[2],
            cpu[2] / cpu[1]
        );
        println!(
            "{:<46} {:>10} {:>9.2}× {:>9.2}×",
            "  the proxy's CPU / the server's",
            "",
            cpu[1] / cpu[0],
            cpu[2] / cpu[0]
        );
        let sse = self.sse_events_per_sec;
        println!(
            "{:<46} {:>8.0}/s {:>8.0}/s {:>8.0}/s {:>13.2}×",
            "SSE events per second, one stream",
            sse[0],
            sse[1],
            sse[2],
            sse[2] / sse[0]
        );
        println!("{:<46} (last column: airlock/direct)", "");
        let mem = self.idle_kib;
        println!(
            "{:<46} {:>7.1}KiB {:>7.1}KiB {:>7.1}KiB {:>13.2}×",
            "resident memory per idle connection",
            mem[0],
            mem[1],
            mem[2],
            mem[2] / mem[0]
        );
        println!("{:<46} (last column: airlock/direct)", "");
        let (clean, masked) = (pct(&self.masking[0], 0.5), pct(&self.masking[1], 0.5));
        println!(
            "{:<46} {clean:>8.1}µs clean, {masked:>8.1}µs masked ({:+.1}µs)",
            "through Airlock: masking, p50",
            masked - clean
        );
        for (mode, p50, p99) in &self.recording {
            println!(
                "{:<46} {p50:>+8.1}µs p50, {p99:>+8.1}µs p99 over direct",
                format!("  recording = \"{mode}\"")
            );
        }
        println!(
            "{:<46} {:>8.1}µs",
            "leaf-cache miss (mint + sign a leaf)", self.mint_us
        );
        let three =
            |v: [f64; 3]| serde_json::json!({"direct": v[0], "nginx": v[1], "airlock": v[2]});
        let json = serde_json::json!({
            "recording": recording,
            "agent_threads": threads,
            "keepalive_p50_us": three(ka50),
            "keepalive_p99_us": three(ka99),
            "added_p50_ratio_airlock_to_nginx": added(ka50, AIRLOCK_PATH) / added(ka50, NGINX),
            "added_p99_ratio_airlock_to_nginx": added(ka99, AIRLOCK_PATH) / added(ka99, NGINX),
            "new_connection_p50_us": three(nc50),
            "throughput_rps": three(rps),
            "open_loop_rps": three(self.open_loop_rps),
            "cpu_us_per_request": three(cpu),
            "server_cpu_us_per_request": three(self.cpu_ns_per_request.map(|(_, s)| s / 1000.0)),
            "sse_events_per_sec": three(sse),
            "idle_connection_kib": three(mem),
            "masking_p50_us": {"clean": clean, "masked": masked},
            "recording_added_us": self.recording.iter().map(|(m, p50, p99)| serde_json::json!({"mode": m, "p50": p50, "p99": p99})).collect::<Vec<_>>(),
            "leaf_mint_us": self.mint_us,
        });
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tls.json");
        let _ = std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap());
        println!("wrote {}", out.display());
    }
}

/// How to (re)start the agent under test.
struct Agent {
    dir: PathBuf,
    cgroup: PathBuf,
    name: String,
    backend_port: u16,
    ca: PathBuf,
    threads: Option<String>,
}

impl Agent {
    fn config(&self) -> PathBuf {
        self.dir.join("airlock.toml")
    }

    fn write_config(&self, recording: Option<&str>) -> PathBuf {
        let recording = recording.map_or(String::new(), |r| format!("recording = \"{r}\"\n"));
        std::fs::write(
            self.config(),
            format!(
                "state_dir = \"{d}/state\"\narchive_dir = \"{d}/archive\"\npolicies_dir = \"{d}/policies\"\n{recording}cgroup = \"{cg}\"\nbpffs_dir = \"/sys/fs/bpf/{name}\"\nlisten_port = 991\nmax_connections_per_uid = 4096\n\
                 [[backend]]\nname = \"bench\"\nhost = \"{HOST}\"\nport = {port}\naddresses = [\"127.0.0.2\"]\nca_file = \"{ca}\"\n",
                d = self.dir.display(),
                cg = self.cgroup.display(),
                name = self.name,
                port = self.backend_port,
                ca = self.ca.display(),
            ),
        )
        .unwrap();
        self.config()
    }

    fn start(&self) -> Child {
        let child = Command::new(AIRLOCK)
            .args(["run", "--config"])
            .arg(self.config())
            .env("RUST_LOG", "warn")
            .envs(self.threads.clone().map(|n| ("TOKIO_WORKER_THREADS", n)))
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("agent.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        wait_ready(&self.config());
        child
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One keep-alive HTTPS connection speaking MCP's POST.
struct Session {
    sender: Sender,
    /// `Host`: the name and port connected to (Airlock checks it names its backend).
    authority: String,
}

impl Session {
    async fn open(client: &Arc<rustls::ClientConfig>, addr: std::net::SocketAddr) -> Session {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let tls = tokio_rustls::TlsConnector::from(client.clone())
            .connect(ServerName::try_from(HOST).unwrap(), tcp)
            .await
            .unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        Session {
            sender,
            authority: format!("{HOST}:{}", addr.port()),
        }
    }

    async fn call(&mut self) {
        self.call_tool("echo").await;
    }

    async fn timed_calls(&mut self, tool: &str, n: usize) -> Vec<Duration> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.call_tool(tool).await;
            out.push(t.elapsed());
        }
        out
    }

    async fn send(&mut self, tool: &str) -> http::Response<hyper::body::Incoming> {
        let req = http::Request::post("/mcp")
            .header("host", &self.authority)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(Full::new(request_for(tool)))
            .unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp
    }

    async fn call_tool(&mut self, tool: &str) {
        let body = self.send(tool).await.into_body().collect().await;
        assert!(body.unwrap().to_bytes().len() > 900);
    }

    /// The `stream` tool: an SSE answer; returns the events read.
    async fn stream(&mut self) -> usize {
        let mut body = self.send("stream").await.into_body();
        let (mut events, mut tail) = (0, Vec::new());
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.unwrap().into_data() else {
                continue;
            };
            tail.extend_from_slice(&data);
            while let Some(at) = tail.windows(2).position(|w| w == b"\n\n") {
                events += 1;
                tail.drain(..at + 2);
            }
        }
        events
    }
}

/// Closed loop: [`CONNECTIONS`] connections each sending the next call as soon as the last
/// is answered, for [`THROUGHPUT_SECS`]. Returns the calls answered.
async fn saturate(client: &Arc<rustls::ClientConfig>, addr: std::net::SocketAddr) -> usize {
    let mut sessions = Vec::new();
    for _ in 0..CONNECTIONS {
        sessions.push(Session::open(client, addr).await);
    }
    let deadline = Instant::now() + Duration::from_secs(THROUGHPUT_SECS);
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut n = 0;
                while Instant::now() < deadline {
                    s.call().await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

/// Open loop: calls offered at [`OPEN_LOOP_RATE`] per second, spread over [`CONNECTIONS`]
/// connections, whether or not earlier ones were answered. Returns the calls answered.
async fn open_loop(client: &Arc<rustls::ClientConfig>, addr: std::net::SocketAddr) -> usize {
    let mut queues = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut s = Session::open(client, addr).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        queues.push(tx);
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while rx.recv().await.is_some() {
                s.call().await;
                n += 1;
            }
            n
        }));
    }
    let total = OPEN_LOOP_RATE * OPEN_LOOP_SECS;
    let start = tokio::time::Instant::now();
    for k in 0..total {
        tokio::time::sleep_until(start + Duration::from_nanos(k * 1_000_000_000 / OPEN_LOOP_RATE))
            .await;
        let _ = queues[k as usize % CONNECTIONS].send(());
    }
    drop(queues);
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap();
    }
    answered
}

fn wait_ready(config: &Path) {
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
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("agent not ready");
}

struct Cleanup {
    cgroup: PathBuf,
    children: Vec<Child>,
    /// Processes that are not our children (nginx workers).
    others: Vec<u32>,
    agent: Option<Child>,
    config: Option<PathBuf>,
    dir: PathBuf,
}

impl Cleanup {
    /// Stop the agent (SIGTERM: it publishes what it holds) and start it again.
    fn restart_agent(&mut self, agent: &Agent, recording: Option<&str>) {
        if let Some(mut old) = self.agent.take() {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(old.id() as i32, libc::SIGTERM) };
            let _ = old.wait();
        }
        agent.write_config(recording);
        self.agent = Some(agent.start());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(config) = &self.config {
            let _ = Command::new(AIRLOCK)
                .args(["detach", "--config"])
                .arg(config)
                .output();
        }
        for pid in &self.others {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        for c in self.children.iter_mut().chain(self.agent.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(root) = self.cgroup.parent() {
            let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        if std::env::var_os("BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
