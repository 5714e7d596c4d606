//! An agent in front of one MCP backend on loopback: its configuration, the backend server's
//! CA, Airlock's CA bundle for the clients, policies added while it runs, and calls it holds
//! for approval.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use super::{
    Agent, TestCgroup, airlock_out, free_port,
    peers::{HOST, PeerServer},
    privileged, unique, wait_until,
};

/// A policy that blocks the SDK server's `delete_everything` (and any `delete_*` tool).
pub const BLOCK_POLICY: &str = r#"
[[rule]]
id = "no-destructive-tools"
action = "block"
tools = ["delete_*"]
"#;

/// A cgroup and a prepared (not yet started) agent with one backend `backend` on a free
/// port of `HOST`, served on 127.0.0.1; `backend_extra` lines go into its `[[backend]]`,
/// `top` at the top level. Returns the port too.
pub fn local_backend_agent(
    name: &str,
    backend: &str,
    backend_extra: &str,
    top: &str,
) -> (TestCgroup, Agent, u16) {
    let name = unique(name);
    let cg = TestCgroup::new(&name);
    let port = free_port();
    let agent = Agent::prepare(
        &cg,
        &name,
        &format!(
            "[[backend]]\nname = \"{backend}\"\nhost = \"{HOST}\"\nport = {port}\naddresses = [\"127.0.0.1\"]\n{backend_extra}\n"
        ),
        top,
        None,
    );
    (cg, agent, port)
}

/// Airlock's CA bundle for the clients (`airlock ca show --pem`), written in the agent's
/// directory.
pub fn airlock_ca_bundle(agent: &Agent) -> PathBuf {
    let bundle = agent.dir.join("airlock-ca.pem");
    std::fs::write(
        &bundle,
        airlock_out(&[
            "ca",
            "show",
            "--pem",
            "--config",
            agent.config.to_str().unwrap(),
        ]),
    )
    .unwrap();
    bundle
}

/// An agent for one Python SDK server; `backend_extra` is appended to its `[[backend]]`.
pub fn tls_setup(
    name: &str,
    backend_extra: &str,
) -> Option<(TestCgroup, Agent, PeerServer, u16, PathBuf)> {
    tls_setup_with(name, backend_extra, "")
}

/// Like [`tls_setup`], with top-level configuration keys `top`.
pub fn tls_setup_with(
    name: &str,
    backend_extra: &str,
    top: &str,
) -> Option<(TestCgroup, Agent, PeerServer, u16, PathBuf)> {
    tls_setup_full(name, backend_extra, top, ("json", 1), |_| {})
}

/// The common set-up: a cgroup, the SDK server (`server` = transport, variant) with its own
/// CA, an agent for backend `tools` (`BACKEND_CA` in `backend_extra` becomes that CA's file)
/// started after `before_spawn` had its say, and Airlock's CA bundle for the clients.
pub fn tls_setup_full(
    name: &str,
    backend_extra: &str,
    top: &str,
    server: (&str, u32),
    before_spawn: impl FnOnce(&Agent),
) -> Option<(TestCgroup, Agent, PeerServer, u16, PathBuf)> {
    if !privileged() {
        return None;
    }
    let (cg, mut agent, port) = local_backend_agent(name, "tools", backend_extra, top);
    let dir = agent.dir.clone();
    let server = PeerServer::start_variant(&dir, port, server.0, true, server.1);
    use_backend_ca(&agent, &dir.join("backend-ca.pem"));
    before_spawn(&agent);
    agent.spawn();
    let bundle = airlock_ca_bundle(&agent);
    Some((cg, agent, server, port, bundle))
}

/// Point `BACKEND_CA` in the agent's configuration (`ca_file = "BACKEND_CA"`) at `ca`: the
/// server's CA is made after the configuration was written.
pub fn use_backend_ca(agent: &Agent, ca: &Path) {
    let config = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("BACKEND_CA", ca.to_str().unwrap());
    std::fs::write(&agent.config, config).unwrap();
}

/// Write `text` as the policy file `file` of the running agent and wait until the agent took
/// it (its policy hash changed): the watcher looks every 2 s.
pub fn add_policy(agent: &Agent, file: &str, text: &str) {
    let hash = |a: &Agent| a.status()["agent"]["policy_hash"].clone();
    let before = hash(agent);
    std::fs::write(agent.dir.join("policies").join(file), text).unwrap();
    wait_until(
        Duration::from_secs(20),
        || format!("policy {file} not taken:\n{}", agent.log()),
        || (hash(agent) != before).then_some(()),
    );
}

/// The first call the agent holds for approval, once `airlock approvals list` shows it.
pub fn wait_pending(agent: &Agent) -> Value {
    let config = agent.config.to_str().unwrap();
    wait_until(
        Duration::from_secs(30),
        || format!("no call was held:\n{}", agent.log()),
        || {
            let out = airlock_out(&["approvals", "list", "--json", "--config", config]);
            out.lines().next().map(|l| serde_json::from_str(l).unwrap())
        },
    )
}

/// Calls of `add` held for a human (60 s), of `echo` for 1 s (then denied).
pub const APPROVE_POLICY: &str = r#"
[[rule]]
id = "approve-add"
action = "approve"
tools = ["add"]
timeout_secs = 60

[[rule]]
id = "approve-echo-quickly"
action = "approve"
tools = ["echo"]
timeout_secs = 1
"#;
