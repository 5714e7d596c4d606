//! Helpers for the privileged tests: a child cgroup per test, an agent attached to it, backend
//! servers on loopback, and a real socket client (Python, stdlib) started inside the cgroup.
//!
//! Nothing here talks to anything but loopback addresses.
//!
//! The tests' prelude (`use crate::harness::*`): this file's helpers and those of
//! - [`peers`]: the MCP SDK server and clients, and stdlib HTTPS probes;
//! - [`mcp_backend`]: an agent in front of one MCP backend (TLS set-up, policies, approvals);
//! - [`records`]: reading an archive back (`airlock replay`, DuckDB).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod mcp_backend;
pub mod peers;
pub mod records;

pub use mcp_backend::*;
pub use peers::*;
pub use records::*;

pub const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");
pub const PYTHON: &str = "/usr/bin/python3";
pub const CLIENT: &str = include_str!("../support/client.py");

/// True when the test may run. Without root it skips locally, and fails in CI (`CI=true`):
/// a privileged test that silently skips there would look like a pass.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(
            Path::new(PYTHON).exists(),
            "{PYTHON} is missing: `cargo xtask setup` installs it"
        );
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("privileged tests need root and must not be skipped in CI (CI=true)");
    }
    eprintln!("skipping: this test needs root (cgroups, eBPF)");
    false
}

fn cgroup2_root() -> PathBuf {
    airlock::cgroup::resolve(None).expect("the privileged tests need a cgroup v2 mount")
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique name for this test's cgroup, pins and state.
pub fn unique(name: &str) -> String {
    format!(
        "airlock-test-{}-{}-{name}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A child cgroup of the cgroup2 root; processes started with [`TestCgroup::command`] run in it.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> TestCgroup {
        let path = cgroup2_root().join(name);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TestCgroup { path }
    }

    /// A command whose process joins this cgroup before it execs.
    pub fn command(&self, program: &str) -> Command {
        let procs = self.path.join("cgroup.procs");
        let mut cmd = Command::new(program);
        // SAFETY: the closure only writes a file, which is async-signal-safe enough for a
        // freshly forked child (no locks held by other threads are touched).
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, b"0"));
        }
        cmd
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Children a test made (and left behind when it failed) first, deepest first: a cgroup
        // with children cannot be removed.
        let mut dirs = vec![self.path.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(entries) = std::fs::read_dir(&dirs[i]) {
                dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            i += 1;
        }
        for dir in dirs.iter().rev() {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
                    // SAFETY: plain kill(2).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// What the Python client printed.
#[derive(Debug)]
pub struct ClientResult {
    pub pid: u32,
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    pub response: Option<String>,
    /// Python exception name, for failure messages.
    #[allow(dead_code)]
    pub error: Option<String>,
    pub errno: Option<i64>,
    /// The `SO_MARK` the client set and read back (`--mark`).
    pub mark: Option<u64>,
}

fn sockaddr(v: &Value) -> Option<SocketAddr> {
    let ip: std::net::IpAddr = v.get(0)?.as_str()?.parse().ok()?;
    let port = u16::try_from(v.get(1)?.as_u64()?).ok()?;
    Some(SocketAddr::new(ip, port))
}

impl ClientResult {
    fn parse(out: &Output) -> ClientResult {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "client printed no JSON ({e}): stdout={stdout} stderr={}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        ClientResult {
            pid: v["pid"].as_u64().expect("pid") as u32,
            local: sockaddr(&v["local"]),
            peer: sockaddr(&v["peer"]),
            response: v["response"].as_str().map(str::to_owned),
            error: v["error"].as_str().map(str::to_owned),
            errno: v["errno"].as_i64(),
            mark: v["mark"].as_u64(),
        }
    }

    /// The response, or a panic with what went wrong.
    pub fn expect_response(&self) -> &str {
        self.response
            .as_deref()
            .unwrap_or_else(|| panic!("client got no response: {self:?}"))
    }
}

/// How to run the client.
#[derive(Default, Clone)]
pub struct ClientOpts {
    /// Run as this uid/gid (via setpriv) instead of root.
    pub as_user: Option<(u32, u32)>,
    pub udp: bool,
    /// TCP Fast Open: data in the SYN, via sendto(MSG_FASTOPEN) instead of connect().
    pub fastopen: bool,
    pub pause_secs: Option<f64>,
    /// Bind this local port before connecting.
    pub source_port: Option<u16>,
    /// Set this `SO_MARK` before connecting (the test gives the client CAP_NET_RAW).
    pub mark: Option<u32>,
}

/// Run the client in `cg`, connecting to `host:port`; waits for it.
pub fn run_client(cg: &TestCgroup, host: &str, port: u16, opts: &ClientOpts) -> ClientResult {
    spawn_client(cg, host, port, opts).wait()
}

pub struct RunningClient(Child);

impl RunningClient {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn wait(self) -> ClientResult {
        let out = self.0.wait_with_output().expect("wait for client");
        ClientResult::parse(&out)
    }
}

/// The client script, written once per test run where any user can read it.
fn client_script() -> &'static Path {
    static SCRIPT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("airlock-test-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("client dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = dir.join("client.py");
        std::fs::write(&path, CLIENT).expect("write client.py");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        path
    })
}

pub fn spawn_client(cg: &TestCgroup, host: &str, port: u16, opts: &ClientOpts) -> RunningClient {
    let mut cmd = match opts.as_user {
        Some((uid, gid)) => {
            let mut c = cg.command("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
            ]);
            if opts.mark.is_some() {
                // CAP_NET_RAW alone lets a process set SO_MARK (Linux >= 5.17): what a
                // container's default capabilities give.
                c.args(["--inh-caps=+net_raw", "--ambient-caps=+net_raw"]);
            }
            c.arg(PYTHON);
            c
        }
        None => cg.command(PYTHON),
    };
    cmd.arg(client_script()).arg(host).arg(port.to_string());
    if opts.udp {
        cmd.arg("--udp");
    }
    if opts.fastopen {
        cmd.arg("--fastopen");
    }
    if let Some(p) = opts.pause_secs {
        cmd.args(["--pause", &p.to_string()]);
    }
    if let Some(p) = opts.source_port {
        cmd.args(["--source-port", &p.to_string()]);
    }
    if let Some(m) = opts.mark {
        cmd.args(["--mark", &m.to_string()]);
    }
    cmd.current_dir("/")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    RunningClient(cmd.spawn().expect("spawn the python client"))
}

/// A loopback TCP server standing in for an MCP backend: answers each connection with
/// `<name> saw <peer> <first line>` and remembers the peers it saw.
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<SocketAddr>>>,
    /// Requests that arrived (a line of data), as opposed to bare connections.
    pub requests: Arc<Mutex<u32>>,
}

impl Backend {
    pub fn start(name: &str, bind: &str) -> Backend {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(0u32));
        let name = name.to_owned();
        let seen2 = seen.clone();
        let requests2 = requests.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let Ok(peer) = stream.peer_addr() else {
                    continue;
                };
                seen2.lock().unwrap().push(peer);
                let name = name.clone();
                let requests = requests2.clone();
                thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut line = String::new();
                    let _ = BufReader::new(&stream).read_line(&mut line);
                    if !line.is_empty() {
                        *requests.lock().unwrap() += 1;
                    }
                    let _ = write!(stream, "{name} saw {peer} {line}");
                });
            }
        });
        Backend {
            addr,
            seen,
            requests,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many requests (not bare connections) arrived.
    pub fn requests(&self) -> u32 {
        *self.requests.lock().unwrap()
    }

    pub fn seen(&self) -> Vec<SocketAddr> {
        self.seen.lock().unwrap().clone()
    }
}

static PORT: AtomicU16 = AtomicU16::new(0);

/// A privileged port for an agent; distinct per test in this run.
fn next_agent_port() -> u16 {
    let base = 900 + (std::process::id() % 40) as u16;
    base + PORT.fetch_add(1, Ordering::Relaxed)
}

/// An `airlock run` attached to a test cgroup (and running inside it, so that its own
/// upstream connections meet the hook too).
pub struct Agent {
    pub dir: PathBuf,
    pub archive: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    pub bpffs_dir: PathBuf,
    cgroup_procs: PathBuf,
    child: Option<Child>,
    /// Run the agent in its own mount namespace with this file bind-mounted on /etc/hosts
    /// (so a test controls what its backend names resolve to, touching nothing else).
    pub hosts_file: Option<PathBuf>,
}

impl Agent {
    /// Write a config (`backends` is the `[[backend]]` TOML, `extra` top-level keys) and start.
    pub fn start(cg: &TestCgroup, name: &str, backends: &str, extra: &str) -> Agent {
        Self::start_with_archive(cg, name, backends, extra, None)
    }

    /// Like [`Agent::start`], with the archive in `archive` (default: inside the test dir).
    pub fn start_with_archive(
        cg: &TestCgroup,
        name: &str,
        backends: &str,
        extra: &str,
        archive: Option<&Path>,
    ) -> Agent {
        let mut agent = Self::prepare(cg, name, backends, extra, archive);
        agent.spawn();
        agent
    }

    /// Like [`Agent::start`], resolving names through `hosts` instead of /etc/hosts.
    pub fn start_with_hosts(
        cg: &TestCgroup,
        name: &str,
        backends: &str,
        extra: &str,
        hosts: &Path,
    ) -> Agent {
        let mut agent = Self::prepare(cg, name, backends, extra, None);
        agent.hosts_file = Some(hosts.to_owned());
        agent.spawn();
        agent
    }

    /// Write the test directory and configuration; does not start the agent.
    pub fn prepare(
        cg: &TestCgroup,
        name: &str,
        backends: &str,
        extra: &str,
        archive: Option<&Path>,
    ) -> Agent {
        let dir = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let archive = archive
            .map(Path::to_owned)
            .unwrap_or_else(|| dir.join("archive"));
        // The shipped default policies: the agent refuses to start without valid ones.
        std::fs::create_dir_all(dir.join("policies")).expect("policies dir");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default.toml"),
            dir.join("policies/default.toml"),
        )
        .expect("copy the default policy");
        let port = next_agent_port();
        let bpffs_dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
        let config = dir.join("airlock.toml");
        let text = format!(
            "state_dir = \"{dir}/state\"\narchive_dir = \"{archive}\"\npolicies_dir = \"{dir}/policies\"\n\
             cgroup = \"{cg}\"\nbpffs_dir = \"{bpffs}\"\nlisten_port = {port}\ndrain_timeout_secs = 5\n{extra}\n{backends}\n",
            dir = dir.display(),
            archive = archive.display(),
            cg = cg.path.display(),
            bpffs = bpffs_dir.display(),
        );
        std::fs::write(&config, text).expect("write config");
        Agent {
            dir,
            archive,
            config,
            port,
            bpffs_dir,
            cgroup_procs: cg.path.join("cgroup.procs"),
            child: None,
            hosts_file: None,
        }
    }

    /// Start the agent process and wait until its admin socket answers.
    pub fn spawn(&mut self) {
        self.spawn_with(Path::new(AIRLOCK), &[], &[]);
        self.wait_until_ready();
    }

    /// Start `program run --config ...` (behind `wrapper`, e.g. `setpriv ...`, with `envs`)
    /// without waiting for it to be ready.
    pub fn spawn_with(&mut self, program: &Path, wrapper: &[&str], envs: &[(&str, &str)]) {
        assert!(self.child.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent log");
        let procs = self.cgroup_procs.clone();
        let mut cmd = match &self.hosts_file {
            None => {
                let mut c = match wrapper.split_first() {
                    Some((first, rest)) => {
                        let mut c = Command::new(first);
                        c.args(rest).arg(program);
                        c
                    }
                    None => Command::new(program),
                };
                c.args(["run", "--config"]).arg(&self.config);
                c
            }
            Some(hosts) => {
                // unshare and sh exec in place: the child's pid is the agent's.
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(r#"mount --bind "$1" /etc/hosts && exec "$2" run --config "$3""#)
                    .arg("sh")
                    .arg(hosts)
                    .arg(program)
                    .arg(&self.config);
                c
            }
        };
        // A test that sets `log_level` in the configuration gets that level.
        let config = std::fs::read_to_string(&self.config).unwrap_or_default();
        if config.contains("log_level") {
            cmd.env_remove("RUST_LOG").env_remove("AIRLOCK_LOG");
        } else {
            cmd.env("RUST_LOG", "info,airlock=debug");
        }
        cmd.envs(envs.iter().copied());
        cmd.stdout(log.try_clone().expect("log")).stderr(log);
        // SAFETY: only writes a file in the forked child.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, b"0"));
        }
        self.child = Some(cmd.spawn().expect("spawn airlock run"));
    }

    /// Wait until the admin socket of the started agent answers.
    pub fn wait_until_ready(&mut self) {
        let mut child = self.child.take().expect("agent started");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!("airlock run exited early with {status}:\n{}", self.log());
            }
            if self.try_status().is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after 20 s:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    fn try_status(&self) -> Option<Value> {
        let out = self.airlock(&["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `airlock status --json` of the running agent.
    pub fn status(&self) -> Value {
        let out = self.airlock(&["status", "--json"]);
        assert!(
            out.status.success(),
            "airlock status failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Run an `airlock` subcommand with this agent's config.
    pub fn airlock(&self, args: &[&str]) -> Output {
        Command::new(AIRLOCK)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run airlock")
    }

    /// The status entry of the connection made by process `pid`, waiting briefly for it to be
    /// closed (the relay finishes just after the client).
    pub fn connection_of(&self, pid: u32) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = self.status();
            let found = status["connections"]
                .as_array()
                .expect("connections")
                .iter()
                .find(|c| c["tgid"].as_u64() == Some(u64::from(pid)))
                .cloned();
            if let Some(c) = &found
                && c["state"] != "open"
                && c["state"] != "connecting"
            {
                return c.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no finished connection of pid {pid} in status: {status:#}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait (up to 5 s) until a connection in `airlock status` mentions `text` (a reason:
    /// a refused connection takes a moment to close).
    pub fn wait_for_connection_text(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let conns = self.status()["connections"].to_string();
            if conns.contains(text) {
                return;
            }
            assert!(Instant::now() < deadline, "no `{text}` in {conns}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kernel_counter(&self, name: &str) -> u64 {
        self.status()["kernel_counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no kernel counter {name}"))
    }

    pub fn agent_counter(&self, name: &str) -> u64 {
        self.status()["agent_counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no agent counter {name}"))
    }

    pub fn sigkill(&mut self) {
        let mut child = self.child.take().expect("agent running");
        child.kill().expect("SIGKILL agent");
        child.wait().expect("reap agent");
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent running");
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit after SIGTERM:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `airlock detach`; asserts success.
    pub fn detach(&mut self) {
        let out = self.airlock(&["detach"]);
        assert!(
            out.status.success(),
            "airlock detach failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().expect("try_wait").is_none() {
                assert!(
                    Instant::now() < deadline,
                    "agent still running after detach"
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Leave no programs attached and no pins behind, whatever the test did.
        let _ = self.airlock(&["detach"]);
        // AIRLOCK_TEST_KEEP=1 keeps the test directory (logs, archive) for a post-mortem.
        if std::env::var_os("AIRLOCK_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Connect straight to `addr` from this (test) process, outside any test cgroup; returns what
/// the peer sent before closing, or the error.
pub fn raw_exchange(addr: SocketAddr) -> Result<Vec<u8>, std::io::Error> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"hello\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(buf)
}

/// `[[backend]]` TOML for one backend with static addresses.
pub fn backend_toml(name: &str, port: u16, addresses: &[&str]) -> String {
    let addrs: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[backend]]\nname = \"{name}\"\nhost = \"{name}.internal.test\"\nport = {port}\ntls = false\nmode = \"opaque\"\naddresses = [{}]\n",
        addrs.join(", ")
    )
}

/// Flow records currently in the agent's pinned `AIRLOCK_FLOWS` map whose client port is `port`.
pub fn flow_records_from_port(agent: &Agent, port: u16) -> usize {
    use airlock_common::{ABI_VERSION, ConnMeta, FlowKey};
    let path = agent
        .bpffs_dir
        .join(format!("maps-v{ABI_VERSION}"))
        .join("AIRLOCK_FLOWS");
    let data = aya::maps::MapData::from_pin(&path).expect("open pinned AIRLOCK_FLOWS");
    let map: aya::maps::HashMap<_, FlowKey, ConnMeta> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("flows map");
    map.keys()
        .filter_map(Result::ok)
        .filter(|k| k.src_port == port)
        .count()
}

/// Run `airlock ARGS`, asserting success; what it printed.
pub fn airlock_out(args: &[&str]) -> String {
    let out = Command::new(AIRLOCK).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "airlock {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Poll `ready` every 50 ms until it gives a value; past `timeout`, panic with what `failure`
/// says then (it may read a log or the last state).
pub fn wait_until<T>(
    timeout: Duration,
    failure: impl FnOnce() -> String,
    mut ready: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = ready() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("{}", failure());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The set-up most tests share: a cgroup, a backend on 127.0.0.2, an agent redirecting it.
/// `None` when the test may not run (see [`privileged`]). Bind every part you keep (`cg: _cg`
/// rather than `..`): an unbound part is dropped at once, and the cgroup's drop kills the agent.
pub struct Scenario {
    pub agent: Agent,
    pub backend: Backend,
    pub cg: TestCgroup,
    pub name: String,
}

impl Scenario {
    pub fn start(name: &str, extra: &str) -> Option<Scenario> {
        Self::start_with_archive(name, extra, None)
    }

    /// Like [`Scenario::start`], with the archive in `archive`.
    pub fn start_with_archive(name: &str, extra: &str, archive: Option<&Path>) -> Option<Scenario> {
        if !privileged() {
            return None;
        }
        let name = unique(name);
        let cg = TestCgroup::new(&name);
        let backend = Backend::start("tools", "127.0.0.2:0");
        let agent = Agent::start_with_archive(
            &cg,
            &name,
            &backend_toml("tools", backend.port(), &["127.0.0.2"]),
            extra,
            archive,
        );
        Some(Scenario {
            agent,
            backend,
            cg,
            name,
        })
    }
}

/// `GET /metrics` from the agent's endpoint, the body.
pub fn scrape_metrics(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}
