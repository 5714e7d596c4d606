//! Benchmark: MCP `tools/call` over TLS through Airlock (redirect, TLS termination, HTTP and
//! JSON-RPC parsing, the shipped masking policies, archive in buffered mode) against the same
//! call sent directly to the same server, in the same run.
//!
//! Needs root (`cargo xtask bench`). Prints a table and writes `target/bench-tls.json`.
//!
//! Set-up: the server is this binary re-run with `--serve` (its own process, one thread, so
//! its CPU time and memory can be read from /proc), listening on two ports of 127.0.0.2: one a
//! configured backend (redirected), one not (direct). The load generator (this process) moves
//! into the cgroup the programs attach to; the agent runs outside it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};

const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");
const HOST: &str = "mcp.internal.test";
const KEEPALIVE: usize = 5000;
const NEW_CONNECTIONS: usize = 300;
const THROUGHPUT_SECS: u64 = 3;
const CONCURRENCY: usize = 16;
const IDLE_CONNECTIONS: usize = 500;

fn request_for(tool: &str) -> Bytes {
    let text = "x".repeat(200);
    Bytes::from(format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"{tool}","arguments":{{"text":"{text}"}}}}}}"#
    ))
}

/// A 1 KiB result with values the shipped policies mask (emails, a card, an AWS key id).
fn secret_response_body() -> Bytes {
    let mut text = String::new();
    for i in 0..6 {
        text.push_str(&format!(
            "contact user{i}@example.com about card 4111 1111 1111 1111; "
        ));
    }
    text.push_str("key AKIAIOSFODNN7EXAMPLE ");
    while text.len() < 900 {
        text.push('z');
    }
    Bytes::from(format!(
        r#"{{"jsonrpc":"2.0","id":7,"result":{{"content":[{{"type":"text","text":"{text}"}}],"isError":false}}}}"#
    ))
}

fn response_body() -> Bytes {
    let text = "y".repeat(900);
    Bytes::from(format!(
        r#"{{"jsonrpc":"2.0","id":7,"result":{{"content":[{{"type":"text","text":"{text}"}}],"isError":false}}}}"#
    ))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if args.get(1).map(String::as_str) == Some("--serve") {
        return serve(&args[2], &args[3], &args[4..]);
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
        config: None,
        dir: dir.clone(),
    };

    // Backend PKI and the server process.
    let (ca_pem, cert, key) = pki(&dir);
    let (backend_port, direct_port) = (free_port(), free_port());
    let server = Command::new(std::env::current_exe().unwrap())
        .arg("--serve")
        .arg(&cert)
        .arg(&key)
        .args([backend_port.to_string(), direct_port.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let server_pid = server.id();
    guard.children.push(server);
    for p in [backend_port, direct_port] {
        wait_port(p);
    }

    let recording = std::env::var("BENCH_RECORDING").unwrap_or_else(|_| "buffered".into());
    let config = dir.join("airlock.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{d}/state\"\narchive_dir = \"{d}/archive\"\npolicies_dir = \"{d}/policies\"\nrecording = \"{recording}\"\ncgroup = \"{cg}\"\nbpffs_dir = \"/sys/fs/bpf/{name}\"\nlisten_port = 991\n\
             [[backend]]\nname = \"bench\"\nhost = \"{HOST}\"\nport = {backend_port}\naddresses = [\"127.0.0.2\"]\nca_file = \"{ca}\"\n",
            d = dir.display(),
            cg = cgroup.display(),
            ca = ca_pem.display(),
        ),
    )
    .unwrap();
    guard.config = Some(config.clone());
    let agent = Command::new(AIRLOCK)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .envs(
            std::env::var("BENCH_AGENT_THREADS")
                .ok()
                .map(|n| ("TOKIO_WORKER_THREADS", n)),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let agent_pid = agent.id();
    guard.children.push(agent);
    wait_ready(&config);
    let bundle = Command::new(AIRLOCK)
        .args(["ca", "show", "--pem", "--config"])
        .arg(&config)
        .output()
        .unwrap()
        .stdout;

    // The client trusts both: the backend CA (direct) and Airlock's (redirected).
    let mut roots = rustls::RootCertStore::empty();
    for pem in [std::fs::read(&ca_pem).unwrap(), bundle] {
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
    let direct = std::net::SocketAddr::from(([127, 0, 0, 2], direct_port));
    let backend = std::net::SocketAddr::from(([127, 0, 0, 2], backend_port));

    let results = rt.block_on(async {
        // Warm up both paths (and check the redirect: only Airlock's leaf verifies there).
        for addr in [direct, backend] {
            let mut s = Session::open(&client, addr).await;
            for _ in 0..200 {
                s.call().await;
            }
        }
        // Memory per idle connection first, before other phases grow the allocators' caches.
        let mut mem = Vec::new();
        for (addr, pid) in [(direct, server_pid), (backend, agent_pid)] {
            let before = rss_kib(pid);
            let mut held = Vec::new();
            for _ in 0..IDLE_CONNECTIONS {
                let mut s = Session::open(&client, addr).await;
                s.call().await;
                held.push(s);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let after = rss_kib(pid);
            mem.push((after.saturating_sub(before)) as f64 / IDLE_CONNECTIONS as f64);
            drop(held);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let mut ka = [Vec::new(), Vec::new()];
        let mut nc = [Vec::new(), Vec::new()];
        for round in 0..2 {
            for (i, addr) in [direct, backend].into_iter().enumerate() {
                let mut s = Session::open(&client, addr).await;
                for _ in 0..KEEPALIVE / 2 {
                    let t = Instant::now();
                    s.call().await;
                    ka[i].push(t.elapsed());
                }
                for _ in 0..NEW_CONNECTIONS / 2 {
                    let t = Instant::now();
                    let mut s = Session::open(&client, addr).await;
                    s.call().await;
                    nc[i].push(t.elapsed());
                }
            }
            let _ = round;
        }
        // The cost of masking: the same call through Airlock, answered with a clean result or
        // with one holding values the shipped policies mask.
        let mut masking = [Vec::new(), Vec::new()];
        {
            let mut s = Session::open(&client, backend).await;
            for _ in 0..2000 {
                for (i, tool) in ["echo", "contact"].into_iter().enumerate() {
                    let t = Instant::now();
                    s.call_tool(tool).await;
                    masking[i].push(t.elapsed());
                }
            }
        }
        // Throughput at saturation, and the CPU it cost the server (direct) or the agent.
        let mut tput = Vec::new();
        for (addr, pid) in [(direct, server_pid), (backend, agent_pid)] {
            let cpu0 = cpu_secs(pid);
            let server0 = cpu_secs(server_pid);
            let n = saturate(&client, addr).await;
            let cpu = cpu_secs(pid) - cpu0;
            let server_cpu = cpu_secs(server_pid) - server0;
            tput.push((n, cpu, server_cpu));
        }
        (ka, nc, tput, mem, masking)
    });
    let (ka, nc, tput, mem, masking) = results;

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
    let mint_us = t.elapsed().as_secs_f64() * 1e6 / 200.0;

    let p = |v: &Vec<Duration>, q: f64| {
        let mut s = v.clone();
        s.sort();
        s[((s.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e6
    };
    println!("tls bench (recording = {recording}, shipped masking policies)");
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "", "direct", "airlock", "ratio"
    );
    let row = |label: &str, d: f64, a: f64, unit: &str| {
        println!("{label:<44} {d:>8.1}{unit} {a:>8.1}{unit} {:>7.2}×", a / d);
        serde_json::json!({"direct": d, "airlock": a, "ratio": a / d})
    };
    let ka50 = row(
        "keep-alive tools/call, p50",
        p(&ka[0], 0.5),
        p(&ka[1], 0.5),
        "µs",
    );
    let ka99 = row(
        "keep-alive tools/call, p99",
        p(&ka[0], 0.99),
        p(&ka[1], 0.99),
        "µs",
    );
    let nc50 = row(
        "new connection + TLS + first call, p50",
        p(&nc[0], 0.5),
        p(&nc[1], 0.5),
        "µs",
    );
    let nc99 = row(
        "new connection + TLS + first call, p99",
        p(&nc[0], 0.99),
        p(&nc[1], 0.99),
        "µs",
    );
    let per_core = |(n, cpu, _): (usize, f64, f64)| n as f64 / cpu.max(1e-9);
    let (d_pc, a_pc) = (per_core(tput[0]), per_core(tput[1]));
    println!(
        "{:<44} {:>8.0}/s {:>8.0}/s {:>7.2}×",
        "throughput, req/s at saturation (16 conns)",
        tput[0].0 as f64 / THROUGHPUT_SECS as f64,
        tput[1].0 as f64 / THROUGHPUT_SECS as f64,
        tput[1].0 as f64 / tput[0].0 as f64
    );
    println!(
        "{:<44} {:>8.0}/s {:>8.0}/s {:>7.2}×",
        "requests per CPU-second (server vs agent)",
        d_pc,
        a_pc,
        a_pc / d_pc
    );
    let mem_row = row("resident memory per idle connection", mem[0], mem[1], "KiB");
    println!(
        "{:<44} {:>8.1}µs {:>8.1}µs {:>+7.1}µs",
        "through Airlock: clean vs masked result, p50",
        p(&masking[0], 0.5),
        p(&masking[1], 0.5),
        p(&masking[1], 0.5) - p(&masking[0], 0.5)
    );
    println!(
        "{:<44} {mint_us:>8.1}µs",
        "leaf-cache miss (mint + sign a leaf)"
    );
    let json = serde_json::json!({
        "recording": recording,
        "keepalive_p50_us": ka50, "keepalive_p99_us": ka99,
        "new_connection_p50_us": nc50, "new_connection_p99_us": nc99,
        "throughput": {
            "direct_rps": tput[0].0 as f64 / THROUGHPUT_SECS as f64,
            "airlock_rps": tput[1].0 as f64 / THROUGHPUT_SECS as f64,
            "direct_per_cpu_second": d_pc, "airlock_per_cpu_second": a_pc,
            "per_core_ratio": a_pc / d_pc,
        },
        "idle_connection_kib": mem_row,
        "leaf_mint_us": mint_us,
        "masking_p50_us": {"clean": p(&masking[0], 0.5), "masked": p(&masking[1], 0.5)},
    });
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tls.json");
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap());
    println!("wrote {}", out.display());
    drop(guard);
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One keep-alive HTTPS connection speaking MCP's POST.
struct Session {
    sender: Sender,
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
        Session { sender }
    }

    async fn call(&mut self) {
        self.call_tool("echo").await
    }

    async fn call_tool(&mut self, tool: &str) {
        let req = http::Request::post("/mcp")
            .header("host", HOST)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(Full::new(request_for(tool)))
            .unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(body.len() > 900);
    }
}

async fn saturate(client: &Arc<rustls::ClientConfig>, addr: std::net::SocketAddr) -> usize {
    let deadline = Instant::now() + Duration::from_secs(THROUGHPUT_SECS);
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = Session::open(&client, addr).await;
            let mut n = 0;
            while Instant::now() < deadline {
                s.call().await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

/// The server: HTTPS, one thread, answers every request with a 1 KiB JSON-RPC result.
fn serve(cert: &str, key: &str, ports: &[String]) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(airlock::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut listeners = Vec::new();
        for p in ports {
            listeners.push(
                tokio::net::TcpListener::bind(("127.0.0.2", p.parse::<u16>().unwrap()))
                    .await
                    .unwrap(),
            );
        }
        let body = response_body();
        let mut handles = Vec::new();
        for l in listeners {
            let acceptor = acceptor.clone();
            let body = body.clone();
            handles.push(tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = l.accept().await else {
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let body = body.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let svc = hyper::service::service_fn(
                            move |req: http::Request<hyper::body::Incoming>| {
                                let body = body.clone();
                                async move {
                                    let req = req
                                        .into_body()
                                        .collect()
                                        .await
                                        .map(|c| c.to_bytes())
                                        .unwrap_or_default();
                                    let secret =
                                        req.windows(16).any(|w| w == b"\"name\":\"contact\"");
                                    let body = if secret { secret_response_body() } else { body };
                                    let mut r = http::Response::new(Full::new(body));
                                    r.headers_mut().insert(
                                        "content-type",
                                        "application/json".parse().unwrap(),
                                    );
                                    Ok::<_, std::convert::Infallible>(r)
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                            .await;
                    });
                }
            }));
        }
        for h in handles {
            let _ = h.await;
        }
    });
}

fn pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![HOST.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.2", port)).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// utime + stime of a process, seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

struct Cleanup {
    cgroup: PathBuf,
    children: Vec<Child>,
    config: Option<PathBuf>,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(config) = &self.config {
            let _ = Command::new(AIRLOCK)
                .args(["detach", "--config"])
                .arg(config)
                .output();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(root) = self.cgroup.parent() {
            let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
