//! The agent's life and death: fail closed, restart without a gap, detach, bypass, SIGTERM.

use std::{net::SocketAddr, thread, time::Duration};

use crate::harness::*;

const ECONNREFUSED: i64 = 111;
const EPERM: i64 = 1;
const ECONNRESET: i64 = 104;

fn refused(res: &ClientResult) -> bool {
    matches!(res.errno, Some(ECONNREFUSED) | Some(EPERM))
}

#[test]
fn killed_agent_fails_closed_restart_resumes_and_detach_restores_direct() {
    if !privileged() {
        return;
    }
    let name = unique("failclosed");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "127.0.0.2:0");
    let port = backend.port();
    let mut agent = Agent::start(&cg, &name, &backend_toml("tools", port, &["127.0.0.2"]), "");
    assert!(
        run_client(&cg, "127.0.0.2", port, &ClientOpts::default())
            .response
            .is_some()
    );
    assert_eq!(backend.seen().len(), 1);

    agent.sigkill();
    let res = run_client(&cg, "127.0.0.2", port, &ClientOpts::default());
    assert!(
        refused(&res),
        "with the agent dead the client must be refused: {res:?}"
    );
    assert_eq!(
        backend.seen().len(),
        1,
        "the refused client reached the backend directly"
    );
    // Unrelated traffic still flows.
    let other = Backend::start("other", "127.0.0.2:0");
    assert!(
        run_client(&cg, "127.0.0.2", other.port(), &ClientOpts::default())
            .response
            .is_some()
    );
    // The CLI says so too.
    let status = agent.airlock(&["status", "--json"]);
    assert_eq!(status.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["running"], false);
    assert_eq!(v["programs_pinned"], true);

    // Restart: the new agent swaps its programs into the pinned links.
    agent.spawn();
    assert!(
        agent.log().contains("took over pinned link"),
        "{}",
        agent.log()
    );
    let res = run_client(&cg, "127.0.0.2", port, &ClientOpts::default());
    assert!(res.expect_response().starts_with("tools saw "));
    assert_eq!(res.peer.unwrap().port(), agent.port);
    assert_eq!(backend.seen().len(), 2);

    // Detach: everything removed, connections go straight to the backend.
    agent.detach();
    assert!(
        !agent.bpffs_dir.exists(),
        "pins left in {}",
        agent.bpffs_dir.display()
    );
    let res = run_client(&cg, "127.0.0.2", port, &ClientOpts::default());
    assert!(res.expect_response().starts_with("tools saw "));
    assert_eq!(
        res.peer,
        Some(backend.addr),
        "not direct after detach: {res:?}"
    );
    assert_eq!(backend.seen().last(), res.local.as_ref());
}

#[test]
fn restart_leaves_no_window_of_unredirected_traffic() {
    if !privileged() {
        return;
    }
    let name = unique("nowindow");
    let cg = std::sync::Arc::new(TestCgroup::new(&name));
    let backend = Backend::start("tools", "127.0.0.2:0");
    let port = backend.port();
    let mut agent = Agent::start(&cg, &name, &backend_toml("tools", port, &["127.0.0.2"]), "");
    // Clients connect in a loop while the agent is stopped and started again; every one is
    // either relayed by the agent or refused, none reaches the backend directly.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        let cg = cg.clone();
        thread::spawn(move || {
            let mut results = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                results.push(run_client(&cg, "127.0.0.2", port, &ClientOpts::default()));
            }
            results
        })
    };
    thread::sleep(Duration::from_millis(300));
    agent.sigterm();
    thread::sleep(Duration::from_millis(300));
    agent.spawn();
    thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = prober.join().unwrap();
    assert!(results.len() >= 3, "too few probes: {}", results.len());
    for r in &results {
        if let Some(peer) = r.peer {
            assert_eq!(
                peer.port(),
                agent.port,
                "a connection went around the agent: {r:?}"
            );
        } else {
            // connect() failed: refused while nobody listened, or reset when the stopping
            // agent closed its listener with the handshake in its backlog.
            assert!(
                refused(r) || r.errno == Some(ECONNRESET),
                "unexpected failure: {r:?}"
            );
        }
    }
    // (Every probe that connected had the agent as its peer, checked above: a client that went
    // around the agent would have had the backend as its peer. Comparing the backend's peers
    // with the clients' local ports would not do: the agent's upstream sockets may reuse those
    // port numbers towards another destination.)
    assert!(
        results.iter().any(refused),
        "no probe ran while the agent was down"
    );
    assert!(
        results.iter().any(|r| r.response.is_some()),
        "no probe was relayed"
    );
}

#[test]
fn bypass_mode_lets_connections_through_when_the_agent_dies() {
    let Some(Scenario {
        mut agent,
        backend,
        cg,
        ..
    }) = Scenario::start("bypass", "on_agent_down = \"bypass\"")
    else {
        return;
    };
    let port = backend.port();
    let res = run_client(&cg, "127.0.0.2", port, &ClientOpts::default());
    assert_eq!(
        res.peer.unwrap().port(),
        agent.port,
        "redirected while the agent runs"
    );
    assert!(
        !agent.bpffs_dir.join("links").exists(),
        "bypass mode must not pin links"
    );
    agent.sigkill();
    let res = run_client(&cg, "127.0.0.2", port, &ClientOpts::default());
    assert_eq!(
        res.peer,
        Some(backend.addr),
        "bypass: direct once the agent is gone: {res:?}"
    );
    assert!(res.expect_response().starts_with("tools saw "));
}

#[test]
fn sigterm_drains_live_connections_then_exits_cleanly() {
    if !privileged() {
        return;
    }
    let name = unique("drain");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "127.0.0.2:0");
    let port = backend.port();
    let mut agent = Agent::start(&cg, &name, &backend_toml("tools", port, &["127.0.0.2"]), "");
    // The client connects, then waits 1.5 s before sending: the agent is told to stop meanwhile.
    let opts = ClientOpts {
        pause_secs: Some(1.5),
        ..Default::default()
    };
    let client = spawn_client(&cg, "127.0.0.2", port, &opts);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while agent.status()["agent"]["live_connections"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "connection never went live"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let status = agent.sigterm();
    assert!(
        status.success(),
        "agent exit after SIGTERM: {status}\n{}",
        agent.log()
    );
    let res = client.wait();
    assert!(
        res.expect_response().starts_with("tools saw "),
        "drained connection lost: {res:?}"
    );
    // After the drain, new connections are refused (block mode keeps the pins).
    let res = run_client(&cg, "127.0.0.2", port, &ClientOpts::default());
    assert!(refused(&res), "{res:?}");
}

/// While the agent is down, a redirected connection is refused but its flow record stays in
/// the kernel. A later connection reusing that 4-tuple must not be served under the first
/// caller's identity.
fn leave_a_stale_record(cg: &TestCgroup, agent: &mut Agent, backend_port: u16) -> u16 {
    let source_port = free_port();
    agent.sigkill();
    let opts = ClientOpts {
        source_port: Some(source_port),
        ..Default::default()
    };
    let res = run_client(cg, "127.0.0.2", backend_port, &opts);
    assert!(refused(&res), "{res:?}");
    assert_eq!(
        flow_records_from_port(agent, source_port),
        1,
        "the refused connection left a record"
    );
    source_port
}

#[test]
fn stale_flow_record_is_not_inherited_after_restart() {
    let Some(Scenario {
        mut agent,
        backend,
        cg,
        ..
    }) = Scenario::start("stale", "")
    else {
        return;
    };
    let source_port = leave_a_stale_record(&cg, &mut agent, backend.port());
    agent.spawn();
    // This test process is outside the intercepted cgroup: no program sees its connect().
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_reuse_address(true).unwrap();
    let from: SocketAddr = format!("127.0.0.1:{source_port}").parse().unwrap();
    let to: SocketAddr = format!("127.0.0.1:{}", agent.port).parse().unwrap();
    sock.bind(&from.into()).unwrap();
    sock.connect(&to.into()).unwrap();
    let mut stream: std::net::TcpStream = sock.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = std::io::Write::write_all(&mut stream, b"hello\n");
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stream, &mut got);
    assert!(
        got.is_empty(),
        "the agent served a stale record: {}",
        String::from_utf8_lossy(&got)
    );
    assert!(backend.seen().is_empty(), "the backend was reached");
    assert_eq!(agent.agent_counter("rejected_stale"), 1);
}

#[test]
fn connection_to_the_agent_port_erases_a_stale_record_in_the_kernel() {
    let Some(Scenario {
        mut agent,
        backend,
        cg,
        ..
    }) = Scenario::start("erase", "")
    else {
        return;
    };
    let source_port = leave_a_stale_record(&cg, &mut agent, backend.port());
    // A process in the cgroup reuses the 4-tuple, straight to the agent's port (nobody listens).
    let opts = ClientOpts {
        source_port: Some(source_port),
        ..Default::default()
    };
    let res = run_client(&cg, "127.0.0.1", agent.port, &opts);
    assert!(refused(&res), "{res:?}");
    assert_eq!(
        flow_records_from_port(&agent, source_port),
        0,
        "sock_ops left the stale record"
    );
}

#[test]
fn policies_reload_on_sighup_and_on_change_and_invalid_sets_are_refused() {
    // Bound (not `..`): the cgroup and the backend must live as long as the test.
    let Some(Scenario {
        agent,
        backend: _backend,
        cg: _cg,
        ..
    }) = Scenario::start("policy", "")
    else {
        return;
    };
    let hash = |a: &Agent| {
        a.status()["agent"]["policy_hash"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let first = hash(&agent);
    assert!(first.starts_with("sha256:"));
    let wait_for = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    };
    // A valid new file is taken when the files change.
    let extra = agent.dir.join("policies/20-extra.toml");
    std::fs::write(
        &extra,
        "[[rule]]\nid = \"no-drop\"\naction = \"block\"\ntools = [\"drop_*\"]\n",
    )
    .unwrap();
    wait_for("the reload", &|| hash(&agent) != first);
    let second = hash(&agent);
    // An invalid one is refused: the previous set stays, the error is shown.
    std::fs::write(&extra, "[[rule]]\nid = \"no-drop\"\naction = \"explode\"\n").unwrap();
    wait_for("the refusal", &|| {
        agent.status()["agent"]["policy_error"].is_string()
    });
    assert_eq!(hash(&agent), second);
    let err = agent.status()["agent"]["policy_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(err.contains("20-extra.toml:3"), "{err}");
    // Fixed and signalled: taken, error cleared.
    std::fs::remove_file(&extra).unwrap();
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    wait_for("the SIGHUP reload", &|| hash(&agent) == first);
    assert!(agent.status()["agent"]["policy_error"].is_null());
    assert!(agent.log().contains("policies reloaded"), "{}", agent.log());
}

#[test]
fn invalid_policies_stop_the_agent_from_starting() {
    if !privileged() {
        return;
    }
    let name = unique("badpolicy");
    let dir = std::env::temp_dir().join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(
        dir.join("policies/a.toml"),
        "[[rule]]\nid = \"a\"\naction = \"mask\"\ndetectors = [\"emial\"]\n",
    )
    .unwrap();
    let config = dir.join("airlock.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{d}/state\"\narchive_dir = \"{d}/archive\"\npolicies_dir = \"{d}/policies\"\nbpffs_dir = \"/sys/fs/bpf/{name}\"\n{}",
            backend_toml("tools", 9, &["127.0.0.2"]),
            d = dir.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(AIRLOCK)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("a.toml:1") && err.contains("emial"), "{err}");
    assert!(
        !std::path::Path::new(&format!("/sys/fs/bpf/{name}")).exists(),
        "attached despite invalid policies"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_agent_on_the_same_state_refuses_to_start() {
    let Some(Scenario {
        mut agent,
        backend,
        cg,
        ..
    }) = Scenario::start("twice", "")
    else {
        return;
    };
    assert!(
        run_client(&cg, "127.0.0.2", backend.port(), &ClientOpts::default())
            .response
            .is_some()
    );
    let second = agent.airlock(&["run"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("another agent is running"), "{err}");
    // The first one is untouched: it still relays, and its archive is whole.
    assert!(
        run_client(&cg, "127.0.0.2", backend.port(), &ClientOpts::default())
            .response
            .is_some()
    );
    assert!(agent.sigterm().success());
    let verify = agent.airlock(&["verify", "--archive", agent.archive.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{out}");
    assert!(
        out.contains("4 record(s) checked"),
        "two connections, open and close each: {out}"
    );
}
