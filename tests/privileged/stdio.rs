//! stdio MCP servers of a governed job (`airlock govern`): a real client (the Python SDK's
//! stdio transport) spawning a real server through `sh -c`, relayed through the pipeline with
//! no change to either; and the job failing closed when the agent is down or dies.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::{
    AIRLOCK, Agent, TestCgroup, backend_toml, free_port, node, node_modules, privileged,
    query_archive, unique, venv_python, wait_pending,
};

const PEER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/support/stdio_peer.py"
);

const BLOCK: &str = r#"
[[rule]]
id = "no-table-drops"
action = "block"
tools = ["drop_*"]
"#;

/// An agent whose `[[stdio_server]]` names the test server's script, with a block rule
/// (`more_policy` beside it) and more tables after the `[[stdio_server]]` (e.g.
/// `[events.file]`).
fn agent_with(cg: &TestCgroup, name: &str, more_policy: &str, tables: &str) -> Agent {
    let backend = backend_toml("unused", free_port(), &["127.0.0.1"]);
    let extra = format!(
        "stdio_defaults = true\n\n[[stdio_server]]\nname = \"notes\"\nargs = [\"*/notes_server.py\"]\n{tables}\n"
    );
    let mut agent = Agent::prepare(cg, name, &backend, &extra, None);
    std::fs::write(
        agent.dir.join("policies/20-block.toml"),
        format!("{BLOCK}\n{more_policy}"),
    )
    .unwrap();
    agent.spawn();
    agent
}

/// What the stdio tests start from: a cgroup, an agent (see [`agent_with`]), the test server's
/// script copied into the agent's directory under the name its `[[stdio_server]]` matches,
/// and the file the server writes what reached it to.
struct Governed {
    // Dropped before the cgroup, as a test's own locals were.
    agent: Agent,
    cg: TestCgroup,
    script: PathBuf,
    marker: PathBuf,
}

impl Governed {
    /// `name` is made unique; `more_policy` goes beside the block rule.
    fn start(name: &str, more_policy: &str) -> Governed {
        Self::start_with(name, more_policy, "")
    }

    /// Like [`Governed::start`], with more tables in the configuration (see [`agent_with`]).
    fn start_with(name: &str, more_policy: &str, tables: &str) -> Governed {
        let name = unique(name);
        let cg = TestCgroup::new(&name);
        let agent = agent_with(&cg, &name, more_policy, tables);
        let script = agent.dir.join("notes_server.py");
        std::fs::copy(PEER, &script).unwrap();
        let marker = agent.dir.join("reached");
        Governed {
            agent,
            cg,
            script,
            marker,
        }
    }

    /// `airlock govern` of the Python SDK's stdio client spawning the copied server script;
    /// `extra` are more client arguments.
    fn python_client(&self, extra: &[&str]) -> Command {
        let py = venv_python().display().to_string();
        let (m, s) = (
            self.marker.display().to_string(),
            self.script.display().to_string(),
        );
        let mut args = vec![
            py.as_str(),
            PEER,
            "client",
            "--marker",
            &m,
            "--server-script",
            &s,
        ];
        args.extend_from_slice(extra);
        govern(&self.cg, &self.agent, &args)
    }
}

fn govern(cg: &TestCgroup, agent: &Agent, job: &[&str]) -> Command {
    let mut cmd = cg.command(AIRLOCK);
    cmd.arg("--config")
        .arg(&agent.config)
        .args(["govern", "--name", "ci-job", "--"])
        .args(job);
    cmd
}

fn govern_as(cg: &TestCgroup, agent: &Agent, user: &str, job: &[&str]) -> Command {
    let mut cmd = cg.command(AIRLOCK);
    cmd.arg("--config")
        .arg(&agent.config)
        .args(["govern", "--name", "ci-job", "--user", user, "--"])
        .args(job);
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_governed_jobs_stdio_server_is_masked_blocked_and_recorded_without_changing_the_client() {
    if !privileged() {
        return;
    }
    let mut g = Governed::start("stdio", "");
    let out = g.python_client(&[]).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), g.agent.log());
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The blocked tool is hidden from the listing, as for an HTTP backend.
    assert_eq!(seen["tools"], serde_json::json!(["big", "echo"]), "{seen}");
    // Masked before the server saw it, and on the way back.
    let echoed = seen["calls"]["echo"][0].as_str().unwrap();
    assert!(
        !echoed.contains("bob@example.com") && echoed.starts_with("write to "),
        "{seen}"
    );
    let reached = std::fs::read_to_string(&g.marker).unwrap();
    assert!(
        reached.contains("echo write to ") && !reached.contains("bob@example.com"),
        "{reached}"
    );
    // 1 MiB through the relay.
    assert_eq!(seen["calls"]["big"], 1024 * 1024, "{seen}");
    // Blocked: the client got the JSON-RPC error naming the rule; the server never saw it.
    assert_eq!(seen["errors"]["drop_table"]["code"], -32010, "{seen}");
    let why = seen["errors"]["drop_table"]["message"].as_str().unwrap();
    assert!(why.contains("no-table-drops"), "{why}");
    assert!(!reached.contains("DROP REACHED"), "{reached}");
    assert_eq!(seen["calls"]["echo_after"][0], "still here", "{seen}");
    // Counted; the relay ends once both sides are done.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = g.agent.status()["agent_counters"].clone();
        assert_eq!(c["stdio_relays"], 1, "{c}");
        assert!(
            c["stdio_jobs"] == 1 && c["stdio_execs"].as_u64() >= Some(3),
            "{c}"
        );
        if c["stdio_relays_live"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the relay never ended: {c}");
        thread::sleep(Duration::from_millis(20));
    }

    g.agent.sigterm();
    let rows = query_archive(
        &g.agent.archive,
        "select kind, decision, tool, uid, json_extract_string(payload, '$.event') \
         from ARCHIVE where backend = 'notes' order by session_id, seq",
    );
    let has = |kind: &str, decision: &str, tool: Option<&str>| {
        rows.iter()
            .any(|r| r[0] == kind && r[1] == decision && tool.is_none_or(|t| r[2] == t))
    };
    assert!(has("connection", "allow", None), "{rows:?}");
    assert!(has("request", "block", Some("drop_table")), "{rows:?}");
    assert!(has("request", "mask", Some("echo")), "{rows:?}");
    assert!(has("response", "allow", Some("big")), "{rows:?}");
    assert!(
        rows.iter().any(|r| r[4] == "open") && rows.iter().any(|r| r[4] == "close"),
        "{rows:?}"
    );
    assert!(
        rows.iter().all(|r| r[3] == 0),
        "attributed to the client (root): {rows:?}"
    );
    // The open record names the server as started, with its executable's digest.
    let open = query_archive(
        &g.agent.archive,
        "select payload from ARCHIVE where backend = 'notes' \
         and json_extract_string(payload, '$.event') = 'open'",
    );
    let open: Value = serde_json::from_str(open[0][0].as_str().unwrap()).unwrap();
    assert_eq!(open["transport"], "stdio", "{open}");
    assert_eq!(open["job"], "ci-job", "{open}");
    assert_eq!(
        open["server"]["sha256"].as_str().map(str::len),
        Some(64),
        "{open}"
    );
    assert!(
        open["server"]["argv"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().ends_with("notes_server.py")),
        "{open}"
    );
}

#[test]
fn the_typescript_sdks_stdio_client_spawning_server_everything_through_npx_is_relayed() {
    if !privileged() {
        return;
    }
    let more = "[[rule]]\nid = \"no-env-dumps\"\naction = \"block\"\ntools = [\"get-env\"]\n";
    let mut g = Governed::start("stdio-node", more);
    let modules = node_modules();
    let parent = modules.parent().unwrap().display().to_string();
    let node = node().display().to_string();
    let client = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/support/stdio_client.mjs"
    );
    let out = govern(&g.cg, &g.agent, &[&node, client, &parent, "get-env"])
        .env("NODE_PATH", &modules)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), g.agent.log());
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Matched by the shipped launcher patterns (no `[[stdio_server]]` names it).
    assert_eq!(seen["errors"]["get-env"]["code"], -32010, "{seen}");
    assert!(
        !seen["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "get-env"),
        "{seen}"
    );
    let echo = seen["calls"]["echo"][0].as_str().unwrap();
    assert!(
        echo.starts_with("Echo: mail ") && !echo.contains("alice@example.com"),
        "{seen}"
    );
    assert_eq!(seen["calls"]["echo_after"][0], "Echo: still here", "{seen}");
    g.agent.sigterm();
    let rows = query_archive(
        &g.agent.archive,
        "select distinct backend from ARCHIVE where tool = 'get-env' and decision = 'block'",
    );
    assert_eq!(rows, vec![serde_json::json!(["stdio-mcp"])]);
}

/// The standalone `fastmcp` package's server (PyPI `fastmcp`), spawned through `sh -c` by the
/// Python SDK's stdio client: relayed, masked and blocked the same way.
#[test]
fn a_fastmcp_package_server_is_relayed_the_same_way() {
    if !privileged() {
        return;
    }
    let fastmcp =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv-fastmcp/bin/python");
    assert!(
        fastmcp.exists(),
        "{} is missing: `cargo xtask setup`",
        fastmcp.display()
    );
    let g = Governed::start("stdio-fastmcp", "");
    let fp = fastmcp.display().to_string();
    let out = g
        .python_client(&["--server-python", &fp])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), g.agent.log());
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["tools"], serde_json::json!(["big", "echo"]), "{seen}");
    assert_eq!(seen["errors"]["drop_table"]["code"], -32010, "{seen}");
    assert_eq!(seen["calls"]["big"], 1024 * 1024, "{seen}");
    let reached = std::fs::read_to_string(&g.marker).unwrap();
    assert!(
        reached.contains("echo write to ") && !reached.contains("bob@example.com"),
        "{reached}"
    );
    assert!(!reached.contains("DROP REACHED"), "{reached}");
}

/// A server whose stdin and stdout are named FIFOs (not the pipes a client's spawn makes) is
/// relayed too: the hostile client's blocked call is answered by Airlock and never reaches it.
#[test]
fn a_server_on_named_fifos_is_relayed_like_one_on_pipes() {
    if !privileged() {
        return;
    }
    let g = Governed::start("stdio-fifo", "");
    let client = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/support/stdio_fifo_client.py"
    );
    let py = venv_python().display().to_string();
    let (d, s, m) = (
        g.agent.dir.display().to_string(),
        g.script.display().to_string(),
        g.marker.display().to_string(),
    );
    let out = govern(&g.cg, &g.agent, &[&py, client, &d, &py, &s, &m])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), g.agent.log());
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["id"], 1, "{lines:?}");
    assert_eq!(lines[1]["error"]["code"], -32010, "{lines:?}");
    assert!(
        !std::fs::read_to_string(&g.marker)
            .unwrap_or_default()
            .contains("DROP")
    );
    assert_eq!(g.agent.status()["agent_counters"]["stdio_relays"], 1);
}

/// A call held for approval over stdio (the legacy `initialize` handshake this time): the
/// client waits until `airlock approvals approve`, then gets the server's answer.
#[test]
fn a_stdio_call_held_for_approval_goes_through_once_approved_legacy_handshake() {
    if !privileged() {
        return;
    }
    let approve = "[[rule]]\nid = \"approve-big\"\naction = \"approve\"\ntools = [\"big\"]\ntimeout_secs = 60\n";
    let g = Governed::start("stdio-approve", approve);
    let client = g
        .python_client(&["--mode", "legacy"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pending = wait_pending(&g.agent);
    assert_eq!(pending["tool"], "big", "{pending}");
    // Held: the server has not seen it.
    assert!(
        !std::fs::read_to_string(&g.marker)
            .unwrap_or_default()
            .contains("big")
    );
    let id = pending["id"].as_u64().unwrap().to_string();
    let out = g.agent.airlock(&["approvals", "approve", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), g.agent.log());
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["calls"]["big"], 1024 * 1024, "{seen}");
    assert_eq!(seen["errors"]["drop_table"]["code"], -32010, "{seen}");
}

/// The agent restarts while a client talks to its stdio server: the relay ends with the
/// agent (the client sees the server gone, it does not hang), and the restarted agent governs
/// new jobs again.
#[test]
fn a_relay_ends_visibly_when_the_agent_dies_and_new_jobs_are_governed_after_a_restart() {
    if !privileged() {
        return;
    }
    let mut g = Governed::start("stdio-restart", "");
    let job = |g: &Governed, extra: &[&str]| {
        g.python_client(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // A client that pauses (waiting for a file) after its first call.
    let gate = g.agent.dir.join("gate");
    let gate_arg = gate.display().to_string();
    let client = job(&g, &["--pause-until", &gate_arg]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&g.marker)
        .unwrap_or_default()
        .contains("echo")
    {
        assert!(
            Instant::now() < deadline,
            "the first call never reached the server"
        );
        thread::sleep(Duration::from_millis(20));
    }
    g.agent.sigkill();
    std::fs::write(&gate, "go").unwrap();
    let out = client.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the client went on without its server: {}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&g.marker)
            .unwrap()
            .matches("big")
            .count(),
        0
    );
    g.agent.spawn();
    let out = job(&g, &[]).wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), g.agent.log());
}

/// `airlock discover` lists a stdio server running outside any governed job as unmanaged and
/// a relayed one as relayed; the agent's scan sends one finding for the unmanaged one.
#[test]
fn discover_finds_an_unmanaged_stdio_server_and_tells_a_relayed_one_apart() {
    use std::os::unix::process::CommandExt as _;
    if !privileged() {
        return;
    }
    // A shadow server (named like a launcher, stdio piped), started before the agent.
    let mut shadow = std::process::Command::new("sleep")
        .arg0("mcp-server-shadow")
        .arg("120")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let events = std::env::temp_dir().join(format!("{}-events.jsonl", unique("stdio-discover")));
    let tables = format!("[events.file]\npath = \"{}\"\n", events.display());
    let g = Governed::start_with("stdio-discover", "", &tables);
    let gate = g.agent.dir.join("gate");
    let gate_arg = gate.display().to_string();
    let client = g
        .python_client(&["--pause-until", &gate_arg])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let found: Vec<Value> = loop {
        let out = g.agent.airlock(&["discover", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let found: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let relayed = found
            .iter()
            .any(|f| f["relayed"] == true && f["server"] == "notes");
        if relayed && found.iter().any(|f| f["pid"] == shadow.id()) {
            break found;
        }
        assert!(Instant::now() < deadline, "not both found: {found:?}");
        thread::sleep(Duration::from_millis(50));
    };
    let shadowed = found.iter().find(|f| f["pid"] == shadow.id()).unwrap();
    assert_eq!(shadowed["relayed"], false, "{shadowed}");
    assert_eq!(shadowed["server"], "stdio-mcp", "{shadowed}");
    assert_eq!(shadowed["parent_pid"], std::process::id(), "{shadowed}");
    // One finding for the shadow server (servers of other tests running now may have theirs).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = std::fs::read_to_string(&events).unwrap_or_default();
        let findings: Vec<Value> = lines
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["finding_info"]["types"][0] == "Unmanaged MCP Server")
            .collect();
        let ours = findings
            .iter()
            .filter(|e| e["actor"]["process"]["pid"] == shadow.id())
            .count();
        // The relayed server's process is not reported; no event carries arguments.
        let relayed_pids: Vec<Value> = found
            .iter()
            .filter(|f| f["relayed"] == true)
            .map(|f| f["pid"].clone())
            .collect();
        let relayed_reported = findings
            .iter()
            .any(|e| relayed_pids.contains(&e["actor"]["process"]["pid"]));
        assert!(
            !relayed_reported,
            "the relayed server was reported: {findings:?}"
        );
        assert!(
            !lines.contains("notes_server.py"),
            "arguments in an event: {lines}"
        );
        if ours > 0 {
            assert_eq!(ours, 1, "{findings:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no finding in {lines}");
        thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&gate, "go").unwrap();
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), g.agent.log());
    let _ = shadow.kill();
    let _ = shadow.wait();
    let _ = std::fs::remove_file(&events);
}

#[test]
fn a_governed_job_runs_as_its_user_does_not_start_without_the_agent_and_cannot_exec_once_it_died() {
    if !privileged() {
        return;
    }
    let mut g = Governed::start("stdio-down", "");
    // The job waits on a FIFO, execs, waits again, execs again.
    let fifo = g.agent.dir.join("go");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let log = g.agent.dir.join("job.out");
    let f = fifo.display();
    let script = format!(
        "echo \"uid=$(id -u)\"; read a < {f}; /bin/true; echo \"first=$?\"; read b < {f}; /bin/true; echo \"second=$?\""
    );
    // Dropped to another user after the hand-over (`--user`): the filter stays.
    let mut job = govern_as(&g.cg, &g.agent, "nobody", &["/bin/sh", "-c", &script])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let go = || {
        let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        w.write_all(b"go\n").unwrap();
    };
    let wait_for = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(what)
        {
            assert!(Instant::now() < deadline, "no {what:?} from the job");
            thread::sleep(Duration::from_millis(20));
        }
    };
    go();
    wait_for("first=0");
    assert!(std::fs::read_to_string(&log).unwrap().contains("uid=65534"));
    g.agent.sigkill();
    go();
    let status = job.wait().unwrap();
    let out = std::fs::read_to_string(&log).unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut job.stderr.take().unwrap(), &mut err).unwrap();
    assert!(out.contains("second="), "{out}\n{err}");
    assert!(
        !out.contains("second=0"),
        "an exec ran with the agent dead: {out}\n{err}"
    );
    assert!(
        err.contains("Function not implemented") || err.contains("not implemented"),
        "{err}"
    );
    let _ = status;

    // With no agent at all, the job does not start.
    let out = govern(&g.cg, &g.agent, &["/bin/true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not answer") && err.contains("does not start without it"),
        "{err}"
    );
}
