//! Package and service: an upgrade leaves no window in which a backend is reachable
//! uninspected; `READY=1` means interception is live; the unit's capability set is enough.

use std::{
    os::unix::{fs::MetadataExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use serde_json::Value;

use crate::harness::*;

const ECONNREFUSED: i64 = 111;
const ECONNRESET: i64 = 104;
const EPERM: i64 = 1;
const UNIT: &str = include_str!("../../packaging/airlock.service");

fn refused(res: &ClientResult) -> bool {
    matches!(res.errno, Some(ECONNREFUSED) | Some(EPERM))
}

/// `airlock install --root root` with the binary under test (the "new package").
fn install(root: &Path) -> PathBuf {
    let out = Command::new(AIRLOCK)
        .args(["install", "--root"])
        .arg(root)
        .output()
        .expect("run airlock install");
    assert!(out.status.success(), "airlock install: {out:?}");
    root.join("usr/bin/airlock")
}

/// The sessions `airlock sessions --json` finds in the archive.
fn archived_sessions(agent: &Agent) -> Vec<Value> {
    let out = Command::new(AIRLOCK)
        .args(["sessions", "--json", "--archive"])
        .arg(&agent.archive)
        .output()
        .expect("airlock sessions");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("session JSON"))
        .collect()
}

fn inspected_by(agent: &Agent, res: &ClientResult) {
    assert!(res.expect_response().starts_with("tools saw "), "{res:?}");
    assert_eq!(res.peer.map(|p| p.port()), Some(agent.port), "{res:?}");
    let conn = agent.connection_of(res.pid);
    assert_eq!(conn["backend"], "tools", "{conn}");
    assert_eq!(conn["tgid"].as_u64(), Some(u64::from(res.pid)), "{conn}");
}

#[test]
fn an_upgrade_leaves_no_window_in_which_a_backend_is_reachable_uninspected() {
    if !privileged() {
        return;
    }
    let name = unique("upgrade");
    let cg = Arc::new(TestCgroup::new(&name));
    let backend = Backend::start("tools", "127.0.0.2:0");
    let port = backend.port();
    let mut agent = Agent::prepare(
        &cg,
        &name,
        &backend_toml("tools", port, &["127.0.0.2"]),
        "",
        None,
    );
    // Version A, installed as the package would install it.
    let root = agent.dir.join("root");
    let binary = install(&root);
    agent.spawn_with(&binary, &[], &[]);
    agent.wait_until_ready();
    let first = run_client(&cg, "127.0.0.2", port, &ClientOpts::default());
    inspected_by(&agent, &first);

    // Clients keep connecting during the whole upgrade.
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (stop, cg) = (stop.clone(), cg.clone());
        thread::spawn(move || {
            let mut results = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                results.push(run_client(&cg, "127.0.0.2", port, &ClientOpts::default()));
            }
            results
        })
    };
    thread::sleep(Duration::from_millis(200));
    // The new package is unpacked while A runs: the binary is replaced (a new file; A keeps
    // the old one), as dpkg does.
    let old_inode = std::fs::metadata(&binary).unwrap().ino();
    install(&root);
    assert_ne!(std::fs::metadata(&binary).unwrap().ino(), old_inode);
    // The unit restarts: SIGTERM to A, as systemd sends it.
    assert!(agent.sigterm().success(), "{}", agent.log());
    let seen = backend.seen().len();
    let down = run_client(&cg, "127.0.0.2", port, &ClientOpts::default());
    assert!(
        refused(&down),
        "with A stopped the client must be refused: {down:?}"
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        backend.seen().len(),
        seen,
        "the backend was reached while no agent ran"
    );
    // B: the new binary, the same configuration.
    agent.spawn_with(&binary, &[], &[]);
    agent.wait_until_ready();
    assert!(
        agent.log().contains("took over pinned link"),
        "{}",
        agent.log()
    );
    let after = run_client(&cg, "127.0.0.2", port, &ClientOpts::default());
    inspected_by(&agent, &after);
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let probes = prober.join().unwrap();

    let mut through_agent = 2; // `first` and `after`
    for p in &probes {
        match p.peer {
            Some(peer) => {
                assert_eq!(peer.port(), agent.port, "went around the agent: {p:?}");
                through_agent += 1;
            }
            // Refused while no agent listened, or reset by the stopping agent's listener.
            None => assert!(refused(p) || p.errno == Some(ECONNRESET), "{p:?}"),
        }
    }
    assert!(probes.iter().any(refused), "no probe ran while A was down");
    assert!(
        probes.iter().any(|p| p.response.is_some()),
        "no probe was relayed"
    );
    // Every connection the backend ever saw was an agent's: no more than the clients the
    // agents accepted.
    assert!(
        backend.seen().len() <= through_agent,
        "the backend saw {} connections, the agents relayed {through_agent}",
        backend.seen().len()
    );
    // Both agents recorded theirs, attributed, in the one archive.
    assert!(agent.sigterm().success(), "{}", agent.log());
    let sessions = archived_sessions(&agent);
    for res in [&first, &after] {
        assert!(
            sessions
                .iter()
                .any(|s| s["pid"].as_u64() == Some(u64::from(res.pid)) && s["backend"] == "tools"),
            "pid {} not archived: {sessions:?}",
            res.pid
        );
    }
}

#[test]
fn ready_is_sent_once_interception_is_live_and_stopping_at_shutdown() {
    if !privileged() {
        return;
    }
    let name = unique("notify");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "127.0.0.2:0");
    let port = backend.port();
    let mut agent = Agent::prepare(
        &cg,
        &name,
        &backend_toml("tools", port, &["127.0.0.2"]),
        "",
        None,
    );
    let socket_path = agent.dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notification socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    agent.spawn_with(
        Path::new(AIRLOCK),
        &[],
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification within 30 s ({e}):\n{}", agent.log()));
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "READY=1"), "{message}");
    // At once, no retry: the very first connection is intercepted and attributed.
    let res = run_client(&cg, "127.0.0.2", port, &ClientOpts::default());
    inspected_by(&agent, &res);
    assert_eq!(backend.seen().len(), 1);

    assert!(agent.sigterm().success(), "{}", agent.log());
    let n = socket.recv(&mut buf).expect("STOPPING=1 at shutdown");
    assert_eq!(String::from_utf8_lossy(&buf[..n]), "STOPPING=1");
}

/// `CapabilityBoundingSet=` of the unit, as setpriv's `-all,+bpf,...`.
fn unit_capabilities() -> String {
    let caps = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds capabilities");
    let mut arg = "-all".to_owned();
    for cap in caps.split_whitespace() {
        let name = cap
            .strip_prefix("CAP_")
            .unwrap_or_else(|| panic!("`{cap}` is not a capability name"));
        arg.push_str(&format!(",+{}", name.to_lowercase()));
    }
    arg
}

fn status_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:\t")))
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

#[test]
fn the_unit_capability_set_is_enough_to_intercept_attribute_and_archive() {
    if !privileged() {
        return;
    }
    let name = unique("caps");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "127.0.0.2:0");
    let port = backend.port();
    let mut agent = Agent::prepare(
        &cg,
        &name,
        &backend_toml("tools", port, &["127.0.0.2"]),
        "",
        None,
    );
    // As the unit runs it: only its capabilities, no new privileges, its UMask=.
    let bounding = format!("--bounding-set={}", unit_capabilities());
    let umask = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("UMask="))
        .expect("the unit sets UMask=");
    let shell = format!("umask {umask}; exec \"$@\"");
    let wrapper = [
        "sh",
        "-c",
        &shell,
        "sh",
        "setpriv",
        "--no-new-privs",
        "--inh-caps=-all",
        &bounding,
    ];
    for round in ["start", "restart"] {
        agent.spawn_with(Path::new(AIRLOCK), &wrapper, &[]);
        agent.wait_until_ready();
        let pid = agent.pid();
        let bounded = status_field(pid, "CapBnd");
        assert_eq!(status_field(pid, "CapEff"), bounded);
        const CAP_DAC_OVERRIDE: u64 = 1 << 1;
        const CAP_SYS_ADMIN: u64 = 1 << 21;
        assert_eq!(
            bounded & (CAP_DAC_OVERRIDE | CAP_SYS_ADMIN),
            0,
            "{round}: not bounded"
        );
        if round == "restart" {
            assert!(
                agent.log().contains("took over pinned link"),
                "{}",
                agent.log()
            );
        }
        // Another user's client: its executable is attributed (CAP_SYS_PTRACE).
        let opts = ClientOpts {
            as_user: Some((65534, 65534)),
            ..Default::default()
        };
        let res = run_client(&cg, "127.0.0.2", port, &opts);
        inspected_by(&agent, &res);
        let conn = agent.connection_of(res.pid);
        assert!(
            conn["exe"].as_str().is_some_and(|e| e.contains("python")),
            "{round}: no executable attributed: {conn}"
        );
        assert!(agent.sigterm().success(), "{}", agent.log());
    }
    // The archive is the analysts' group's (CAP_CHOWN) and 0640 under the unit's umask.
    let gid = nix::unistd::Group::from_name("airlock")
        .unwrap()
        .expect("the archive group")
        .gid
        .as_raw();
    let mut parquet = Vec::new();
    let mut dirs = vec![agent.archive.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                parquet.push(path);
            }
        }
    }
    assert!(!parquet.is_empty(), "no archive file");
    for file in parquet {
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.gid(), gid, "{}", file.display());
        assert_eq!(meta.mode() & 0o777, 0o640, "{}", file.display());
    }
}
