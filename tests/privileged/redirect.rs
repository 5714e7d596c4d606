//! The bypass matrix: what is redirected, what is not, and who it is attributed to.

use std::net::SocketAddr;

use crate::harness::*;

/// Redirect through the agent, then check the relay and the attribution recorded for it.
fn assert_redirected(agent: &Agent, backend: &Backend, res: &ClientResult, original_dst: &str) {
    let response = res.expect_response();
    // The client believes it talks to the backend but its socket's peer is the agent.
    let peer = res.peer.expect("peer");
    assert!(
        peer.ip().is_loopback() || peer.ip().to_string() == "::ffff:127.0.0.1",
        "{peer}"
    );
    assert_eq!(
        peer.port(),
        agent.port,
        "client was not redirected to the agent: {res:?}"
    );
    // The backend answered, and saw the agent's upstream socket, not the client's.
    assert!(response.starts_with("tools saw "), "{response}");
    let client_local = res.local.expect("local");
    let seen = backend.seen();
    assert_eq!(seen.len(), 1, "backend connections: {seen:?}");
    assert_ne!(
        seen[0].port(),
        client_local.port(),
        "backend saw the client directly"
    );

    let conn = agent.connection_of(res.pid);
    assert_eq!(conn["state"], "closed", "{conn:#}");
    assert_eq!(conn["pid"].as_u64(), Some(u64::from(res.pid)), "{conn:#}");
    assert_eq!(conn["tgid"].as_u64(), Some(u64::from(res.pid)), "{conn:#}");
    assert_eq!(conn["uid"], 0);
    assert_eq!(conn["user"], "root");
    assert_eq!(conn["comm"], "python3");
    assert_eq!(conn["backend"], "tools");
    assert_eq!(conn["original_dst"], original_dst);
    assert_eq!(conn["bytes_up"], 6, "\"hello\\n\" went up: {conn:#}");
    assert_eq!(conn["bytes_down"].as_u64(), Some(response.len() as u64));
    assert!(conn["opened_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(conn["closed_at"].as_str().is_some());
    let exe = std::fs::canonicalize(PYTHON).unwrap();
    assert_eq!(conn["exe"].as_str(), exe.to_str());
}

#[test]
fn ipv4_connection_to_a_backend_is_redirected_and_attributed() {
    let Some(Scenario {
        agent, backend, cg, ..
    }) = Scenario::start("v4", "")
    else {
        return;
    };
    let res = run_client(&cg, "127.0.0.2", backend.port(), &ClientOpts::default());
    assert_redirected(
        &agent,
        &backend,
        &res,
        &format!("127.0.0.2:{}", backend.port()),
    );
    assert_eq!(agent.kernel_counter("redirect_ipv4"), 1);
    assert_eq!(agent.kernel_counter("flow_recorded"), 1);
}

#[test]
fn ipv6_connection_to_a_backend_is_redirected() {
    if !privileged() {
        return;
    }
    let name = unique("v6");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "[::1]:0");
    let agent = Agent::start(
        &cg,
        &name,
        &backend_toml("tools", backend.port(), &["::1"]),
        "",
    );
    let res = run_client(&cg, "::1", backend.port(), &ClientOpts::default());
    assert_redirected(&agent, &backend, &res, &format!("[::1]:{}", backend.port()));
    assert_eq!(res.peer.unwrap().ip().to_string(), "::1");
    assert_eq!(agent.kernel_counter("redirect_ipv6"), 1);
    assert_eq!(agent.kernel_counter("redirect_ipv4"), 0);
}

#[test]
fn ipv4_mapped_connection_takes_the_ipv4_path() {
    let Some(Scenario {
        agent, backend, cg, ..
    }) = Scenario::start("mapped", "")
    else {
        return;
    };
    // An AF_INET6 socket addressing an IPv4 backend as ::ffff:127.0.0.2.
    let res = run_client(
        &cg,
        "::ffff:127.0.0.2",
        backend.port(),
        &ClientOpts::default(),
    );
    assert_redirected(
        &agent,
        &backend,
        &res,
        &format!("127.0.0.2:{}", backend.port()),
    );
    assert_eq!(res.peer.unwrap().ip().to_string(), "::ffff:127.0.0.1");
    assert_eq!(agent.kernel_counter("redirect_ipv4_mapped"), 1);
    let conn = agent.connection_of(res.pid);
    assert_eq!(conn["family"], "ipv4-mapped");
}

#[test]
fn tcp_fast_open_cannot_bypass_the_redirect() {
    let Some(Scenario {
        agent, backend, cg, ..
    }) = Scenario::start("tfo", "")
    else {
        return;
    };
    // sendto(MSG_FASTOPEN) connects without connect(); the kernel still runs the connect4 hook.
    let opts = ClientOpts {
        fastopen: true,
        ..Default::default()
    };
    let res = run_client(&cg, "127.0.0.2", backend.port(), &opts);
    assert_redirected(
        &agent,
        &backend,
        &res,
        &format!("127.0.0.2:{}", backend.port()),
    );
}

#[test]
fn other_destinations_ports_and_protocols_are_untouched() {
    if !privileged() {
        return;
    }
    let name = unique("untouched");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "127.0.0.2:0");
    // Same address, other port; same port, other address; both real servers.
    let other_port = Backend::start("other-port", "127.0.0.2:0");
    let other_addr = Backend::start("other-addr", &format!("127.0.0.3:{}", backend.port()));
    let agent = Agent::start(
        &cg,
        &name,
        &backend_toml("tools", backend.port(), &["127.0.0.2"]),
        "",
    );

    for (server, host) in [(&other_port, "127.0.0.2"), (&other_addr, "127.0.0.3")] {
        let res = run_client(&cg, host, server.port(), &ClientOpts::default());
        assert!(res.expect_response().contains(" saw "), "{res:?}");
        // Direct: the client's peer is the server itself, and the server saw the client's port.
        assert_eq!(res.peer, Some(server.addr), "{res:?}");
        assert_eq!(server.seen(), vec![res.local.unwrap()]);
    }
    // UDP to the backend's address and port is not TCP: not redirected.
    let udp = run_client(
        &cg,
        "127.0.0.2",
        backend.port(),
        &ClientOpts {
            udp: true,
            ..Default::default()
        },
    );
    let backend_addr: SocketAddr = format!("127.0.0.2:{}", backend.port()).parse().unwrap();
    assert_eq!(udp.peer, Some(backend_addr), "{udp:?}");

    assert!(backend.seen().is_empty());
    assert_eq!(agent.kernel_counter("miss_not_backend"), 2);
    assert_eq!(agent.kernel_counter("skip_not_tcp"), 1);
    assert_eq!(agent.kernel_counter("redirect_ipv4"), 0);
    assert_eq!(agent.agent_counter("accepted"), 0);
}

#[test]
fn client_running_as_another_user_is_attributed_to_that_user() {
    let Some(Scenario {
        agent,
        backend,
        cg,
        name,
    }) = Scenario::start("nobody", "")
    else {
        return;
    };
    let opts = ClientOpts {
        as_user: Some((65534, 65534)),
        ..Default::default()
    };
    let client = spawn_client(&cg, "127.0.0.2", backend.port(), &opts);
    let pid = client.pid();
    let res = client.wait();
    assert_eq!(res.pid, pid, "setpriv execs the client in place");
    assert!(res.expect_response().starts_with("tools saw "));
    let conn = agent.connection_of(pid);
    assert_eq!(conn["uid"], 65534, "{conn:#}");
    assert_eq!(conn["gid"], 65534, "{conn:#}");
    assert_eq!(conn["user"], "nobody", "{conn:#}");
    assert_eq!(conn["pid"].as_u64(), Some(u64::from(pid)));
    assert_eq!(conn["comm"], "python3");
    let exe = std::fs::canonicalize(PYTHON).unwrap();
    assert_eq!(conn["exe"].as_str(), exe.to_str());
    assert!(
        conn["cgroup"].as_str().is_some_and(|c| c.ends_with(&name)),
        "cgroup path from /proc: {conn:#}"
    );
    assert!(
        conn["cmdline"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.ends_with("/client.py")))),
        "{conn:#}"
    );
}

#[test]
fn agents_own_upstream_is_not_redirected_again() {
    if !privileged() {
        return;
    }
    let name = unique("noloop");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "127.0.0.2:0");
    // The agent runs inside the intercepted cgroup: without its socket tag its own upstream
    // connect() would be redirected back to itself.
    let agent = Agent::start(
        &cg,
        &name,
        &backend_toml("tools", backend.port(), &["127.0.0.2"]),
        "",
    );
    let agent_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", agent.pid())).unwrap();
    assert!(
        agent_cgroup.contains(&name),
        "agent is not in the test cgroup: {agent_cgroup}"
    );
    for _ in 0..3 {
        let res = run_client(&cg, "127.0.0.2", backend.port(), &ClientOpts::default());
        assert!(res.expect_response().starts_with("tools saw "));
    }
    assert_eq!(
        backend.seen().len(),
        3,
        "one upstream connection per client connection"
    );
    assert_eq!(agent.kernel_counter("skip_own"), 3);
    assert_eq!(agent.kernel_counter("redirect_ipv4"), 3);
    assert_eq!(
        agent.agent_counter("accepted"),
        3,
        "no looped connection reached the agent"
    );
    assert_eq!(agent.agent_counter("rejected_unattributed"), 0);
}

#[test]
fn direct_connection_to_the_agent_is_rejected() {
    let Some(Scenario {
        agent,
        backend,
        cg: _cg,
        ..
    }) = Scenario::start("direct", "")
    else {
        return;
    };
    // From the test process (no redirect, so no kernel record) straight to the listeners.
    for addr in [
        format!("127.0.0.1:{}", agent.port),
        format!("[::1]:{}", agent.port),
    ] {
        let got = raw_exchange(addr.parse().unwrap());
        assert!(
            got.as_ref().map(|b| b.is_empty()).unwrap_or(true),
            "agent answered an unattributed connection: {got:?}"
        );
    }
    assert!(
        backend.seen().is_empty(),
        "an unattributed connection reached the backend"
    );
    assert_eq!(agent.agent_counter("rejected_unattributed"), 2);
    let status = agent.status();
    let rejected: Vec<_> = status["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == "rejected")
        .collect();
    assert_eq!(rejected.len(), 2, "{status:#}");
    assert!(
        rejected
            .iter()
            .all(|c| c["reason"].as_str().unwrap().contains("no kernel record"))
    );
}

#[test]
fn backend_host_names_are_resolved_to_a_and_aaaa() {
    if !privileged() {
        return;
    }
    let name = unique("resolve");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "127.0.0.1:0");
    // `localhost` resolves through /etc/hosts to 127.0.0.1 (and ::1 where listed).
    let toml = format!(
        "[[backend]]\nname = \"tools\"\nhost = \"localhost\"\nport = {}\ntls = false\nmode = \"opaque\"\n",
        backend.port()
    );
    let agent = Agent::start(&cg, &name, &toml, "resolve_interval_secs = 1");
    let status = agent.status();
    let targets: Vec<&str> = status["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["address"].as_str().unwrap())
        .collect();
    assert!(
        targets.contains(&format!("127.0.0.1:{}", backend.port()).as_str()),
        "{targets:?}"
    );
    let res = run_client(&cg, "127.0.0.1", backend.port(), &ClientOpts::default());
    assert!(res.expect_response().starts_with("tools saw "));
    assert_eq!(res.peer.unwrap().port(), agent.port);
}

#[test]
fn backend_addresses_follow_dns_changes() {
    if !privileged() {
        return;
    }
    let name = unique("dnsrefresh");
    let cg = TestCgroup::new(&name);
    let old = Backend::start("old", "127.0.0.2:0");
    let port = old.port();
    let new = Backend::start("new", &format!("127.0.0.3:{port}"));
    // The agent resolves through its own /etc/hosts (a bind mount in its mount namespace).
    let hosts = std::env::temp_dir().join(format!("{name}.hosts"));
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.2 mcp-refresh.test\n").unwrap();
    let toml = format!(
        "[[backend]]\nname = \"tools\"\nhost = \"mcp-refresh.test\"\nport = {port}\ntls = false\nmode = \"opaque\"\n"
    );
    let agent = Agent::start_with_hosts(&cg, &name, &toml, "resolve_interval_secs = 1", &hosts);
    let redirected = |host: &str| {
        run_client(&cg, host, port, &ClientOpts::default())
            .peer
            .map(|p| p.port())
            == Some(agent.port)
    };
    assert!(redirected("127.0.0.2"));
    assert!(!redirected("127.0.0.3"));
    // The name moves to another address: written in place, the bind mount sees it.
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.3 mcp-refresh.test\n").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !agent.status()["targets"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["address"] == format!("127.0.0.3:{port}"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "targets not refreshed: {}",
            agent.status()["targets"]
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(redirected("127.0.0.3"), "new address not redirected");
    assert!(!redirected("127.0.0.2"), "old address still redirected");
    assert!(
        agent.log().contains("backend addresses changed"),
        "{}",
        agent.log()
    );
    // Each server: one connection relayed while its address was the backend's, one direct.
    assert_eq!(new.seen().len(), 2);
    assert_eq!(old.seen().len(), 2);
    let _ = std::fs::remove_file(&hosts);
}

/// The bypass of the agent's own sockets cannot be forged: a local user with only
/// CAP_NET_RAW (a container's default) may set any `SO_MARK` since Linux 5.17, and the old
/// public mark used to let such a socket past the redirect. The agent's sockets are now
/// recognised by a tag in socket storage that only the agent writes.
#[test]
fn a_client_setting_the_old_bypass_mark_is_still_redirected() {
    let Some(Scenario {
        agent,
        backend,
        cg,
        name: _name,
    }) = Scenario::start("mark", "")
    else {
        return;
    };
    // (Not a mark with bit 0x2000: once Podman has run on a host, netavark masquerades such
    // marked packets, and a connection whose source address NAT rewrote has no kernel record
    // the agent can find: refused, which is not what this test is about.)
    for mark in [0x4152_4c4b_u32, 1, 0xffff_dfff] {
        let opts = ClientOpts {
            as_user: Some((65534, 65534)),
            mark: Some(mark),
            ..Default::default()
        };
        let res = run_client(&cg, "127.0.0.2", backend.port(), &opts);
        assert_eq!(
            res.mark,
            Some(u64::from(mark)),
            "the mark was not set: {res:?}"
        );
        let peer = res.peer.expect("connected");
        assert_eq!(
            peer.port(),
            agent.port,
            "a marked socket went straight to the backend: {res:?}"
        );
        assert!(res.expect_response().starts_with("tools saw "));
        let conn = agent.connection_of(res.pid);
        assert_eq!(conn["uid"], 65534, "{conn:#}");
        assert_eq!(conn["state"], "closed", "{conn:#}");
    }
    assert_eq!(agent.kernel_counter("redirect_ipv4"), 3);
    // Only the agent's own three upstream sockets (the agent runs in the same cgroup)
    // skipped the redirect.
    assert_eq!(agent.kernel_counter("skip_own"), 3);
    assert_eq!(backend.seen().len(), 3);
}

/// A `connect()` that fails after the hook ran (here: an IPv6-only socket connecting to an
/// IPv4-mapped address, refused with ENETUNREACH after the redirect was decided) leaves no
/// record behind: the caller's record lives in the socket's storage and dies with it. Before,
/// 16,384 such calls filled the pending map for 30 s and every user's connections to every
/// backend were refused.
#[test]
fn failed_connects_leave_nothing_behind_in_the_kernel() {
    let Some(Scenario {
        agent,
        backend,
        cg,
        name: _name,
    }) = Scenario::start("pending", "")
    else {
        return;
    };
    const FLOOD: &str = r#"
import errno, json, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
failed = {}
for _ in range(n):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        s.connect(("::ffff:127.0.0.2", port))
        failed["connected"] = failed.get("connected", 0) + 1
    except OSError as e:
        failed[errno.errorcode.get(e.errno, str(e.errno))] = failed.get(errno.errorcode.get(e.errno, str(e.errno)), 0) + 1
    s.close()
print(json.dumps(failed))
"#;
    let out = cg
        .command("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            PYTHON,
            "-c",
            FLOOD,
        ])
        .arg(backend.port().to_string())
        .arg("20000")
        .output()
        .unwrap();
    let outcome: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(outcome["ENETUNREACH"], 20000, "{outcome}");
    // Another user's connection right after the flood is redirected and served.
    let res = run_client(&cg, "127.0.0.2", backend.port(), &ClientOpts::default());
    assert!(res.expect_response().starts_with("tools saw "), "{res:?}");
    assert_eq!(agent.connection_of(res.pid)["uid"], 0);
    assert_eq!(agent.kernel_counter("refused_no_storage"), 0);
    assert_eq!(agent.kernel_counter("redirect_ipv4_mapped"), 20000);
}
