//! The census of paths (issue 18): every way a local process can open a TCP conversation with
//! a backend, each shown to be judged (redirected through the agent, attributed, recorded) or
//! refused (and recorded). The client is `tests/support/census.py`, run inside the attached
//! cgroup as root, or as `nobody` with `CAP_NET_RAW` only (what a container's default
//! capabilities give). Each crafted method also works directly (the script's header says how
//! it gets a full handshake with only `CAP_NET_RAW`), so a refusal here is Airlock's doing.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

const CENSUS: &str = include_str!("../support/census.py");

/// The census script, written where any user can read it.
fn census_script() -> &'static Path {
    static SCRIPT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("airlock-test-census-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("census dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = dir.join("census.py");
        std::fs::write(&path, CENSUS).expect("write census.py");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        path
    })
}

/// Who runs the census client.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum As {
    Root,
    /// uid 65534 with only `CAP_NET_RAW` (ambient).
    NobodyNetRaw,
}

fn census_command(cg: &TestCgroup, who: As, method: &str, host: &str, port: u16) -> Command {
    let mut cmd = match who {
        As::Root => cg.command(PYTHON),
        As::NobodyNetRaw => {
            let mut c = cg.command("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=+net_raw",
                "--ambient-caps=+net_raw",
                PYTHON,
            ]);
            c
        }
    };
    cmd.arg(census_script())
        .args([method, host, &port.to_string(), "--timeout", "3"])
        .current_dir("/")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn census(cg: &TestCgroup, who: As, method: &str, host: &str, port: u16, extra: &[&str]) -> Value {
    let out = census_command(cg, who, method, host, port)
        .args(extra)
        .output()
        .expect("run census.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().next().unwrap_or_default()).unwrap_or_else(|e| {
        panic!(
            "census {method} {host} printed no JSON ({e}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn peer(v: &Value) -> Option<SocketAddr> {
    let ip: std::net::IpAddr = v.get(0)?.as_str()?.parse().ok()?;
    Some(SocketAddr::new(
        ip,
        u16::try_from(v.get(1)?.as_u64()?).ok()?,
    ))
}

/// Judged: the client's peer is the agent, the backend answered the agent's upstream socket,
/// and `airlock status` holds the connection, attributed to the process, for `backend`.
fn assert_judged(agent: &Agent, r: &Value, what: &str) {
    assert_eq!(r["ok"], true, "{what}: {r}");
    let peer = peer(&r["peer"]).unwrap_or_else(|| panic!("{what}: no peer: {r}"));
    assert_eq!(peer.port(), agent.port, "{what} was not redirected: {r}");
    let response = r["response"].as_str().unwrap_or_default();
    assert!(response.starts_with("tools saw "), "{what}: {r}");
    let pid = r["connect_pid"]
        .as_u64()
        .or(r["pid"].as_u64())
        .expect("pid") as u32;
    let conn = agent.connection_of(pid);
    assert_eq!(conn["backend"], "tools", "{what}: {conn:#}");
    assert_eq!(conn["state"], "closed", "{what}: {conn:#}");
}

/// Every archived row (the agent must have been stopped: SIGTERM publishes everything).
fn archived(agent: &Agent) -> Vec<airlock::archive::record::Record> {
    let mut rows = Vec::new();
    let mut stack = vec![agent.archive.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                if !p.ends_with("_manifest") && !p.ends_with("_wal") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "parquet") {
                rows.extend(airlock::archive::columns::read(&p).expect("read parquet"));
            }
        }
    }
    rows
}

/// The archived refusals with `rule`: their (tgid, uid) and payload.
fn refusals(
    rows: &[airlock::archive::record::Record],
    rule: &str,
) -> Vec<(Option<u32>, Option<u32>, Value)> {
    rows.iter()
        .filter(|r| r.input.rules.iter().any(|x| x == rule))
        .map(|r| {
            let payload = r
                .input
                .payload
                .as_ref()
                .and_then(|p| serde_json::from_str(p.as_str()).ok())
                .unwrap_or(Value::Null);
            (r.input.tgid, r.input.uid, payload)
        })
        .collect()
}

/// (The census keeps to 198.18.0.0–198.18.99.255; the container tests use the range above.)
/// A veth pair with a 198.18.0.0/15 address on one end (an "interface address" of the
/// host; this kernel has no dummy interfaces), removed on drop.
struct Veth {
    name: String,
}

impl Veth {
    fn new(addr: &str) -> Veth {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("alk{}x{seq}", std::process::id() % 100_000);
        let _ = Command::new("ip")
            .args(["link", "del", &name])
            .stderr(Stdio::null())
            .status();
        let peer = format!("{name}p");
        for args in [
            vec!["link", "add", &name, "type", "veth", "peer", "name", &peer],
            vec!["addr", "add", addr, "dev", &name],
            vec!["link", "set", &peer, "up"],
            vec!["link", "set", &name, "up"],
        ] {
            let st = Command::new("ip").args(&args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        }
        Veth { name }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

#[test]
fn every_address_form_and_connect_path_is_judged() {
    if !privileged() {
        return;
    }
    let name = unique("census-forms");
    let cg = TestCgroup::new(&name);
    // The backend's server listens on the wildcard address (both families); the backend is
    // configured by 127.0.0.1 only.
    let backend = Backend::start("tools", "[::]:0");
    let port = backend.port();
    let veth_addr = format!(
        "198.18.{}.{}",
        std::process::id() % 50,
        1 + std::process::id() % 250
    );
    let _veth = Veth::new(&format!("{veth_addr}/32"));
    let mut agent = Agent::start(&cg, &name, &backend_toml("tools", port, &["127.0.0.1"]), "");

    let forms = [
        "127.0.0.1",
        "0.0.0.0",
        "::ffff:0.0.0.0",
        "::",
        "::1",
        "127.0.0.2",
        "127.255.0.9",
        "::ffff:127.0.0.1",
        "::ffff:127.0.0.3",
        "localhost",
        veth_addr.as_str(),
    ];
    for who in [As::Root, As::NobodyNetRaw] {
        for host in forms {
            let r = census(&cg, who, "connect", host, port, &[]);
            assert_judged(&agent, &r, &format!("connect {host} as {who:?}"));
        }
        let r = census(
            &cg,
            who,
            "bind-then-connect-unspecified",
            "127.0.0.4",
            port,
            &[],
        );
        assert_judged(
            &agent,
            &r,
            "connect 0.0.0.0 from a socket bound to 127.0.0.4",
        );
        for method in [
            "tfo-sendto",
            "tfo-connect",
            "io_uring",
            "mptcp",
            "fd-passing",
        ] {
            for host in ["127.0.0.1", "::1"] {
                let r = census(&cg, who, method, host, port, &[]);
                assert_judged(&agent, &r, &format!("{method} {host} as {who:?}"));
            }
        }
        let r = census(&cg, who, "io_uring", "127.0.0.1", port, &["--uring-socket"]);
        assert_judged(&agent, &r, "io_uring with IORING_OP_SOCKET");
    }
    assert!(agent.kernel_counter("redirect_unspecified") >= 4);
    assert!(agent.kernel_counter("redirect_listener") >= 6);
    // Recorded: an open and a close record for each.
    assert!(agent.sigterm().success(), "{}", agent.log());
    let rows = archived(&agent);
    let opens = rows
        .iter()
        .filter(|r| {
            r.input.kind == "connection"
                && r.input.backend.as_deref() == Some("tools")
                && r.input
                    .payload
                    .as_ref()
                    .is_some_and(|p| p.as_str().contains("\"open\""))
        })
        .count();
    assert!(opens >= 2 * (forms.len() + 12), "open records: {opens}");
}

#[test]
fn another_service_on_another_local_address_of_the_port_is_not_the_backend() {
    if !privileged() {
        return;
    }
    let name = unique("census-other");
    let cg = TestCgroup::new(&name);
    // The backend's server bound to 127.0.0.1 only; another service on 127.0.0.5, same port.
    let backend = Backend::start("tools", "127.0.0.1:0");
    let other = Backend::start("other", &format!("127.0.0.5:{}", backend.port()));
    let agent = Agent::start(
        &cg,
        &name,
        &backend_toml("tools", backend.port(), &["127.0.0.1"]),
        "",
    );
    let r = census(&cg, As::Root, "connect", "127.0.0.5", backend.port(), &[]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        peer(&r["peer"]),
        Some(other.addr),
        "went to the other service directly: {r}"
    );
    assert!(
        r["response"].as_str().unwrap().starts_with("other saw "),
        "{r}"
    );
    // And nothing listening on a third address is not the backend either.
    let r = census(&cg, As::Root, "connect", "127.0.0.6", backend.port(), &[]);
    assert_eq!(r["errno"], libc::ECONNREFUSED, "{r}");
    assert!(agent.kernel_counter("miss_other_listener") >= 2);
    assert_eq!(agent.agent_counter("accepted"), 0);
}

#[test]
fn raw_and_packet_sockets_cannot_reach_a_backend_and_are_recorded() {
    if !privileged() {
        return;
    }
    let name = unique("census-raw");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "[::]:0");
    let port = backend.port();
    let mut agent = Agent::start(
        &cg,
        &name,
        &backend_toml("tools", port, &["127.0.0.1", "::1"]),
        "",
    );
    for who in [As::Root, As::NobodyNetRaw] {
        for (method, host) in [
            ("raw-tcp", "127.0.0.1"),
            ("raw-hdrincl", "127.0.0.1"),
            ("raw6-tcp", "::1"),
            ("raw6-hdrincl", "::1"),
        ] {
            let r = census(&cg, who, method, host, port, &[]);
            assert_eq!(
                r["ok"], false,
                "{method} as {who:?} reached the backend: {r}"
            );
            assert_eq!(r["errno"], libc::EPERM, "{method} as {who:?}: {r}");
            assert_eq!(r["stage"], "socket", "{method} as {who:?}: {r}");
        }
        // A packet socket may exist (DHCP, LLDP), but its TCP to a backend never leaves,
        // however it is wrapped (each of these works directly: the census script's header).
        for disguise in ["none", "frag6", "dst5", "vlan3"] {
            let r = census(&cg, who, "packet", "::1", port, &["--disguise", disguise]);
            assert_eq!(
                r["ok"], false,
                "packet ({disguise}) as {who:?} reached the backend: {r}"
            );
            assert_ne!(r["handshake"], "full", "{disguise}: {r}");
        }
    }
    // Nothing crafted reached the server's application.
    assert_eq!(backend.requests(), 0, "{:?}", backend.seen());
    // ping (ICMP) still works from the cgroup, as nobody with ping's own capability.
    let mut ping = cg.command("setpriv");
    ping.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "127.0.0.1",
    ]);
    let out = ping.output().expect("ping");
    assert!(
        out.status.success(),
        "ping: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Ordinary TCP to the backend still goes through the agent.
    let r = census(&cg, As::NobodyNetRaw, "connect", "127.0.0.1", port, &[]);
    assert_judged(&agent, &r, "connect after the refusals");
    assert!(agent.kernel_counter("refused_raw_socket") >= 8);
    // `airlock status` and `airlock check-config` say which mechanisms run.
    let m = &agent.status()["mechanisms"];
    for key in ["redirect", "egress_guard", "socket_guard"] {
        assert_eq!(m[key], true, "{key}: {m}");
    }
    assert!(
        m["packet_guard"]
            .as_array()
            .is_some_and(|l| l.iter().any(|i| i == "lo")),
        "{m}"
    );
    let out = agent.airlock(&["check-config"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("redirect on  egress guard on  socket guard on  packet guard on"),
        "{text}"
    );
    assert!(agent.kernel_counter("refused_packet_socket") >= 8);
    assert!(agent.sigterm().success(), "{}", agent.log());
    let rows = archived(&agent);
    let raw = refusals(&rows, "airlock:raw_socket");
    assert!(!raw.is_empty(), "no raw-socket refusal recorded");
    assert!(raw.iter().any(|(_, uid, _)| *uid == Some(65534)), "{raw:?}");
    assert!(
        raw.iter().all(|(tgid, _, _)| tgid.is_some_and(|t| t > 0)),
        "{raw:?}"
    );
    assert!(
        !refusals(&rows, "airlock:packet_socket").is_empty(),
        "no packet refusal recorded"
    );
}

#[test]
fn a_connection_opened_before_the_agent_is_ended_recorded_and_the_client_reconnects_through_airlock()
 {
    if !privileged() {
        return;
    }
    let name = unique("census-before");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "127.0.0.1:0");
    let port = backend.port();
    // The keep-alive connection is opened while no agent runs (the backend answers per line:
    // a server that keeps the connection is enough for the client to hold it).
    let server = KeepAlive::start();
    let mut hold = census_command(&cg, As::NobodyNetRaw, "hold", "127.0.0.1", server.port())
        .stdin(Stdio::piped())
        .spawn()
        .expect("hold client");
    let mut lines = std::io::BufReader::new(hold.stdout.take().expect("stdout"));
    let first = read_json_line(&mut lines);
    assert_eq!(first["ok"], true, "direct before the agent: {first}");
    assert_eq!(peer(&first["peer"]).map(|p| p.port()), Some(server.port()));
    let mut agent = Agent::start(
        &cg,
        &name,
        &format!(
            "{}{}",
            backend_toml("tools", port, &["127.0.0.1"]),
            backend_toml("held", server.port(), &["127.0.0.1"])
        ),
        "",
    );
    agent.wait_for_connection_text("open before Airlock");
    // The next call on the old connection fails; a new one goes through the agent.
    use std::io::Write as _;
    let stdin = hold.stdin.as_mut().expect("stdin");
    writeln!(stdin, "again").expect("write to the hold client");
    stdin.flush().expect("flush");
    let second = read_json_line(&mut lines);
    assert_eq!(
        second["ok"], false,
        "the old connection still works: {second}"
    );
    drop(hold.stdin.take());
    let _ = hold.wait();
    let r = census(
        &cg,
        As::NobodyNetRaw,
        "connect",
        "127.0.0.1",
        server.port(),
        &[],
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(peer(&r["peer"]).map(|p| p.port()), Some(agent.port), "{r}");
    assert!(agent.agent_counter("ended_unredirected") >= 1);
    assert!(agent.sigterm().success(), "{}", agent.log());
    let ended = refusals(&archived(&agent), "airlock:opened_before_agent");
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(
        ended[0].0,
        first["pid"].as_u64().map(|p| p as u32),
        "{ended:?}"
    );
    assert_eq!(ended[0].1, Some(65534));
    let _ = backend;
}

#[test]
fn a_nat_rule_leading_to_a_backend_is_judged_after_translation() {
    if !privileged() {
        return;
    }
    let name = unique("census-nat");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "127.0.0.1:0");
    let port = backend.port();
    // A port mapping set up before the agent: 198.18.x.y:9 → the backend.
    let front = format!(
        "198.18.{}.{}",
        50 + std::process::id() % 25,
        1 + std::process::id() % 250
    );
    let _veth = Veth::new(&format!("{front}/32"));
    let _nat = Nat::new(&front, 9, &format!("127.0.0.1:{port}"));
    // Directly (no agent), the mapping reaches the backend.
    let r = census(&cg, As::Root, "connect", &front, 9, &[]);
    assert_eq!(
        r["ok"], true,
        "the NAT rule does not work on this host: {r}"
    );
    let before = backend.requests();
    let mut agent = Agent::start(&cg, &name, &backend_toml("tools", port, &["127.0.0.1"]), "");
    let started = Instant::now();
    let r = census(&cg, As::NobodyNetRaw, "connect", &front, 9, &[]);
    assert_eq!(r["ok"], false, "NAT led past the agent to the backend: {r}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the refusal took {:?}",
        started.elapsed()
    );
    assert_eq!(backend.requests(), before);
    assert!(agent.kernel_counter("egress_dropped") >= 1);
    agent.wait_for_connection_text("never redirected");
    assert!(agent.sigterm().success(), "{}", agent.log());
    let dropped = refusals(&archived(&agent), "airlock:unredirected_tcp");
    assert!(!dropped.is_empty(), "no record of the NAT'd connection");
    assert!(
        dropped.iter().any(|(_, uid, _)| *uid == Some(65534)),
        "{dropped:?}"
    );
}

/// An iptables DNAT rule in `nat OUTPUT`, removed on drop.
struct Nat {
    rule: Vec<String>,
}

impl Nat {
    fn new(dst: &str, port: u16, to: &str) -> Nat {
        let rule: Vec<String> = [
            "OUTPUT",
            "-d",
            dst,
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            to,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let st = Command::new("iptables")
            .args(["-t", "nat", "-A"])
            .args(&rule)
            .status()
            .expect("iptables (cargo xtask setup installs it)");
        assert!(st.success(), "iptables -t nat -A {rule:?}");
        Nat { rule }
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        let _ = Command::new("iptables")
            .args(["-t", "nat", "-D"])
            .args(&self.rule)
            .status();
    }
}

/// A loopback server that answers every line on a connection it keeps open.
struct KeepAlive {
    addr: SocketAddr,
}

impl KeepAlive {
    fn start() -> KeepAlive {
        use std::io::{BufRead as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut w = s.try_clone().expect("clone");
                    for line in std::io::BufReader::new(s).lines() {
                        let Ok(line) = line else { break };
                        if writeln!(w, "tools saw {line}").is_err() {
                            break;
                        }
                    }
                });
            }
        });
        KeepAlive { addr }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }
}

fn read_json_line(r: &mut impl std::io::BufRead) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).expect("read from the census client");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

#[test]
fn a_wildcard_listener_of_the_other_family_is_neither_guessed_nor_passed() {
    if !privileged() {
        return;
    }
    let name = unique("census-ambiguous");
    let cg = TestCgroup::new(&name);
    // The backend is served on 0.0.0.0 (IPv4 only); another service holds [::] IPv6-only on
    // the same port. `::1` reaches the other service: which server is that? Refused, recorded.
    let backend = Backend::start("tools", "0.0.0.0:0");
    let port = backend.port();
    let other = v6only_listener(port);
    let mut agent = Agent::start(&cg, &name, &backend_toml("tools", port, &["127.0.0.1"]), "");
    let r = census(&cg, As::NobodyNetRaw, "connect", "::1", port, &[]);
    assert_eq!(r["errno"], libc::EPERM, "{r}");
    assert_eq!(r["stage"], "connect", "{r}");
    // The backend's own addresses are still the backend.
    let r = census(&cg, As::NobodyNetRaw, "connect", "127.0.0.9", port, &[]);
    assert_judged(&agent, &r, "127.0.0.9 on the IPv4 wildcard listener");
    assert_eq!(agent.kernel_counter("refused_ambiguous"), 1);
    assert!(agent.sigterm().success(), "{}", agent.log());
    let refused = refusals(&archived(&agent), "airlock:ambiguous_destination");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].1, Some(65534));
    drop(other);
}

#[test]
fn an_egress_drop_ends_the_socket_that_sent_it_and_no_other() {
    if !privileged() {
        return;
    }
    let name = unique("census-cookie");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "127.0.0.1:0");
    let port = backend.port();
    let front = format!(
        "198.18.{}.{}",
        75 + std::process::id() % 25,
        1 + std::process::id() % 250
    );
    let _veth = Veth::new(&format!("{front}/32"));
    let _nat = Nat::new(&front, 9, &format!("127.0.0.1:{port}"));
    // Outside the cgroup, root holds a connection from 127.0.0.1:SHARED to an ordinary
    // service; inside, a client binds the same local address and port (SO_REUSEADDR) and goes
    // through the NAT rule to the backend.
    let service = KeepAlive::start();
    let shared = free_port();
    let bystander = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 1], shared)).into())
            .unwrap();
        s.connect(&service.addr.into()).unwrap();
        std::net::TcpStream::from(s)
    };
    let mut agent = Agent::start(&cg, &name, &backend_toml("tools", port, &["127.0.0.1"]), "");
    let r = census(
        &cg,
        As::NobodyNetRaw,
        "connect",
        &front,
        9,
        &[
            "--source",
            "127.0.0.1",
            "--source-port",
            &shared.to_string(),
        ],
    );
    assert_eq!(r["ok"], false, "{r}");
    agent.wait_for_connection_text("never redirected");
    // The bystander's connection is untouched.
    use std::io::{BufRead as _, Write as _};
    let mut w = bystander.try_clone().unwrap();
    writeln!(w, "still here").unwrap();
    let mut line = String::new();
    bystander
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    std::io::BufReader::new(&bystander)
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "tools saw still here\n");
    assert!(agent.sigterm().success(), "{}", agent.log());
    let dropped = refusals(&archived(&agent), "airlock:unredirected_tcp");
    assert!(!dropped.is_empty());
    assert!(
        dropped.iter().all(|(_, uid, _)| *uid == Some(65534)),
        "only the client's socket is named: {dropped:?}"
    );
}

/// An IPv6-only listener on `[::]:port` that accepts and keeps its connections.
fn v6only_listener(port: u16) -> std::net::TcpListener {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    s.set_only_v6(true).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())
        .unwrap();
    s.listen(16).unwrap();
    s.into()
}
