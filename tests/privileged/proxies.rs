//! Egress proxies end to end: Debian's squid and tinyproxy run as plain processes with the
//! test's own configurations (loopback ports, log and pid files in the test directory) and
//! outside the attached cgroup, as a proxy on another host is: its own connections to the
//! backend are not redirected. The clients run in the cgroup and honour `HTTPS_PROXY` (upper
//! and lower case, `NO_PROXY` empty): the Python SDK client (httpx), the TypeScript SDK client
//! (undici's `EnvHttpProxyAgent`), curl with NTLM, and raw sockets.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

mod parts;
use parts::*;

/// A cgroup, the Python SDK server for `HOST`, a real proxy (`start`: from the test directory
/// and the backend's port), and an agent redirecting both the backend and the proxy.
struct Proxied {
    agent: Agent,
    proxy: RealProxy,
    _server: PeerServer,
    port: u16,
    bundle: PathBuf,
    cg: TestCgroup,
}

fn proxied(name: &str, start: impl FnOnce(&Path, u16) -> RealProxy) -> Option<Proxied> {
    proxied_with(name, |_| String::new(), start)
}

/// [`proxied`] with more keys in the `[[egress_proxy]]` table (`extra`, given the cgroup).
fn proxied_with(
    name: &str,
    extra: impl FnOnce(&TestCgroup) -> String,
    start: impl FnOnce(&Path, u16) -> RealProxy,
) -> Option<Proxied> {
    if !privileged() {
        return None;
    }
    // Audit events in the test directory (relative paths are the configuration file's).
    let events = "[events.file]\npath = \"events.jsonl\"\n";
    let (cg, mut agent, port) =
        local_backend_agent(name, "tools", "ca_file = \"BACKEND_CA\"", events);
    let dir = agent.dir.clone();
    let server = PeerServer::start(&dir, port, "json");
    let proxy = start(&dir, port);
    let config = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("BACKEND_CA", dir.join("backend-ca.pem").to_str().unwrap());
    std::fs::write(
        &agent.config,
        format!(
            "{config}\n[[egress_proxy]]\nname = \"corp\"\nhost = \"127.0.0.1\"\nport = {}\n{}\n",
            proxy.port,
            extra(&cg)
        ),
    )
    .unwrap();
    std::fs::write(dir.join("policies/block.toml"), BLOCK_POLICY).unwrap();
    // The agent resolves names as the proxy does (the alias test).
    agent.hosts_file = Some(hosts(&dir));
    agent.spawn();
    let bundle = airlock_ca_bundle(&agent);
    Some(Proxied {
        agent,
        proxy,
        _server: server,
        port,
        bundle,
        cg,
    })
}

impl Proxied {
    /// An SDK client in the cgroup behind `proxy_url`: its pid and what it printed.
    fn sdk(&self, sdk: Sdk, proxy_url: &str) -> (u32, Result<Value, String>) {
        let url = format!("https://{HOST}:{}/mcp", self.port);
        let mut cmd = sdk_client_command(
            sdk,
            Some(&self.cg),
            &self.agent.dir,
            &self.bundle,
            &url,
            "streamable",
            &[],
        );
        proxy_env(&mut cmd, proxy_url);
        let (pid, out) = run(cmd);
        (pid, sdk_client_output(&out))
    }

    /// Stop the agent; every archived record.
    fn records(&mut self) -> Vec<Value> {
        assert!(self.agent.sigterm().success(), "{}", self.agent.log());
        archived_records(&self.agent.archive)
    }
}

/// What a client saw is what it sees directly, masked and blocked by the policies.
fn assert_intercepted(through: &Value) {
    assert_eq!(through["calls"]["add"][0], "42", "{through}");
    let contact = through["calls"]["contact"][0].as_str().unwrap();
    assert!(
        !contact.contains("alice@example.com"),
        "not masked: {contact}"
    );
    assert!(contact.starts_with("write to "), "{contact}");
    assert_eq!(
        through["errors"]["delete_everything"]["code"], -32010,
        "{through}"
    );
    assert!(
        !through["tools"].to_string().contains("delete_everything"),
        "{through}"
    );
}

/// The payload of a connection record, parsed.
fn payload(r: &Value) -> Value {
    serde_json::from_str(r["payload"].as_str().unwrap_or("null")).unwrap_or(Value::Null)
}

/// The `proxy_request` records of process `pid`.
fn proxy_requests(records: &[Value], pid: u32) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["kind"] == "connection" && r["tgid"] == pid)
        .map(payload)
        .filter(|p| p["event"] == "proxy_request")
        .collect()
}

/// Calls of both SDKs through squid: intercepted as if direct (leaf for the backend's name,
/// masking, blocking, the archive), attributed to the client process — not to squid — and
/// dialled upstream through squid's tunnel.
#[test]
fn sdk_calls_through_squid_are_intercepted_and_attributed_to_the_client() {
    let Some(mut p) = proxied("proxy-squid-sdk", |dir, _| {
        RealProxy::squid(dir, "http_access allow all")
    }) else {
        return;
    };
    let mut pids = Vec::new();
    for sdk in [Sdk::Python, Sdk::Node] {
        let (pid, through) = p.sdk(sdk, &p.proxy.url());
        let through =
            through.unwrap_or_else(|e| panic!("{sdk:?} through squid: {e}\n{}", p.agent.log()));
        assert_intercepted(&through);
        pids.push(pid);
    }
    // Upstream went through the proxy: squid tunnelled to the backend for the agent.
    p.proxy.wait_for_log(&format!("CONNECT {HOST}:{} ", p.port));
    assert!(
        p.proxy.log().contains("TCP_TUNNEL/200"),
        "{}",
        p.proxy.log()
    );
    let records = p.records();
    for pid in &pids {
        let calls: Vec<&Value> = records
            .iter()
            .filter(|r| r["kind"] == "request" && r["tool"] == "add" && r["tgid"] == *pid)
            .collect();
        assert!(!calls.is_empty(), "no call of pid {pid}: {records:#?}");
        assert!(calls.iter().all(|r| r["backend"] == "tools"));
        let tunnels = proxy_requests(&records, *pid);
        assert!(
            tunnels.iter().any(|t| t["decision"] == "intercept"
                && t["target"] == format!("{HOST}:{}", p.port)
                && t["mcp_backend"] == "tools"
                && t["status"] == 200),
            "{tunnels:#?}"
        );
    }
    // Listed under the backend they reached, not the proxy.
    let listed = airlock_out(&[
        "sessions",
        "--archive",
        p.agent.archive.to_str().unwrap(),
        "--backend",
        "tools",
        "--json",
    ]);
    for pid in &pids {
        assert!(listed.contains(&format!("\"pid\":{pid}")), "{listed}");
    }
    // Every message is the clients'; none is attributed to anyone else (squid included).
    for r in records.iter().filter(|r| r["kind"] == "request") {
        assert!(pids.iter().any(|pid| r["tgid"] == *pid), "{r}");
    }
    let blocked: Vec<_> = records
        .iter()
        .filter(|r| {
            r["kind"] == "request" && r["tool"] == "delete_everything" && r["decision"] == "block"
        })
        .collect();
    assert_eq!(blocked.len(), 2, "one blocked call per client");
    assert!(
        records
            .iter()
            .all(|r| !r.to_string().contains("alice@example.com")),
        "an unmasked value reached the archive"
    );
}

/// A non-MCP HTTPS server behind the same proxy: reached untouched (the client trusts only
/// that server's own CA), by Python (httpx) and Node (undici), recorded by target.
#[test]
fn non_mcp_https_through_the_proxy_passes_untouched() {
    let Some(mut p) = proxied("proxy-squid-other", |dir, _| {
        RealProxy::squid(dir, "http_access allow all")
    }) else {
        return;
    };
    let dir = p.agent.dir.clone();
    let (ca, cert, key) = other_pki(&dir);
    let other_port = free_port();
    let _server = KillOnDrop(
        Command::new(PYTHON)
            .args(["-c", OTHER_SERVER, &other_port.to_string()])
            .arg(&cert)
            .arg(&key)
            .spawn()
            .unwrap(),
    );
    wait_listening(other_port);
    let url = format!("https://{OTHER}:{other_port}/");
    let mut python = p.cg.command(venv_python().to_str().unwrap());
    python.args(["-c", HTTPX_GET, &url]).arg(&ca);
    proxy_env(&mut python, &p.proxy.url());
    let node_script = dir.join("get.mjs");
    std::fs::write(&node_script, NODE_GET).unwrap();
    let mut node_cmd = p.cg.command(node().to_str().unwrap());
    node_cmd
        .arg(&node_script)
        .arg(&url)
        .env("NODE_PATH", node_modules())
        .env("NODE_EXTRA_CA_CERTS", &ca);
    proxy_env(&mut node_cmd, &p.proxy.url());
    let mut pids = Vec::new();
    for cmd in [python, node_cmd] {
        let (pid, out) = run(cmd);
        let got = json_of(&out);
        assert_eq!(got["status"], 200, "{got}\n{}", p.agent.log());
        assert_eq!(got["body"], "hello from other\n");
        pids.push(pid);
    }
    let records = p.records();
    for pid in pids {
        let passed = proxy_requests(&records, pid);
        assert!(
            passed.iter().any(|x| x["decision"] == "pass"
                && x["method"] == "CONNECT"
                && x["target"] == format!("{OTHER}:{other_port}")),
            "{passed:#?}"
        );
    }
}

/// NTLM (squid's fake helper) authenticates the connection: curl's three-step handshake works
/// through Airlock for a non-MCP host and for the MCP backend (blocked by policy, attributed to
/// curl), and a client that authenticates for one host and then asks, on the same connection,
/// for the backend is intercepted all the same. No NTLM token reaches the archive or the log.
#[test]
fn ntlm_proxy_authentication_works_and_every_request_on_a_connection_is_judged() {
    let Some(mut p) = proxied("proxy-squid-ntlm", |dir, _| {
        RealProxy::squid(
            dir,
            "auth_param ntlm program /usr/lib/squid/ntlm_fake_auth\nauth_param ntlm children 2\n\
             acl authed proxy_auth REQUIRED\nhttp_access allow authed\nhttp_access deny all",
        )
    }) else {
        return;
    };
    let dir = p.agent.dir.clone();
    let (ca, cert, key) = other_pki(&dir);
    let other_port = free_port();
    let _server = KillOnDrop(
        Command::new(PYTHON)
            .args(["-c", OTHER_SERVER, &other_port.to_string()])
            .arg(&cert)
            .arg(&key)
            .spawn()
            .unwrap(),
    );
    wait_listening(other_port);
    let curl = |url: &str, ca: &Path, extra: &[&str]| {
        let mut cmd = p.cg.command("curl");
        cmd.args(["-sS", "--max-time", "20", "--proxy", &p.proxy.url()])
            .args(["--proxy-ntlm", "--proxy-user", "alice:ntlm-pw"])
            .arg("--cacert")
            .arg(ca)
            .args(extra)
            .arg(url);
        run(cmd)
    };
    let (_, out) = curl(&format!("https://{OTHER}:{other_port}/"), &ca, &[]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from other\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_everything","arguments":{}}}"#;
    let (curl_pid, out) = curl(
        &format!("https://{HOST}:{}/mcp", p.port),
        &p.bundle,
        &[
            "-H",
            "Content-Type: application/json",
            "-H",
            "Accept: application/json, text/event-stream",
            "--data",
            call,
        ],
    );
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains("-32010"), "{answer}\n{}", p.agent.log());

    // From a file: a command line is recorded, and this script holds NTLM tokens.
    let script = dir.join("ntlm_switch.py");
    std::fs::write(&script, NTLM_SWITCH).unwrap();
    let mut switch = p.cg.command(PYTHON);
    switch
        .arg(&script)
        .arg(p.proxy.port.to_string())
        .arg(format!("{HOST}:{}", p.port))
        .arg(format!("{OTHER}:{other_port}"))
        .arg(&p.bundle);
    let (switch_pid, out) = run(switch);
    let got = json_of(&out);
    assert_eq!(
        (got["first"].as_u64(), got["second"].as_u64()),
        (Some(407), Some(200)),
        "{got}"
    );
    // The second CONNECT was judged: the TLS inside it is Airlock's.
    assert!(
        got["issuer"].to_string().contains("Airlock"),
        "{got}\n{}",
        p.agent.log()
    );
    let log = p.agent.log();
    let records = p.records();
    let switched = proxy_requests(&records, switch_pid);
    assert_eq!(switched.len(), 2, "{switched:#?}");
    assert_eq!(switched[0]["decision"], "pass");
    assert_eq!(switched[1]["decision"], "intercept");
    assert!(
        records.iter().any(|r| r["tgid"] == curl_pid
            && r["tool"] == "delete_everything"
            && r["decision"] == "block"),
        "{records:#?}"
    );
    for text in [records.iter().map(Value::to_string).collect(), log] {
        assert!(
            !text.contains("TlRMTVNT"),
            "an NTLM token was recorded or logged"
        );
        assert!(!text.to_lowercase().contains("proxy-authorization: "));
    }
}

/// Basic proxy credentials (tinyproxy) reach the proxy with the agent's tunnel, and nothing of
/// them reaches the archive or the log; wrong ones get the proxy's own refusal, recorded.
#[test]
fn proxy_credentials_pass_through_and_are_never_recorded() {
    let Some(mut p) = proxied("proxy-tiny-basic", |dir, port| {
        RealProxy::tinyproxy(dir, &[port], "agent", PROXY_PASSWORD)
    }) else {
        return;
    };
    let good = format!("http://agent:{PROXY_PASSWORD}@127.0.0.1:{}", p.proxy.port);
    for sdk in [Sdk::Python, Sdk::Node] {
        let (_, through) = p.sdk(sdk, &good);
        assert_intercepted(&through.unwrap_or_else(|e| panic!("{sdk:?}: {e}\n{}", p.agent.log())));
    }
    p.proxy
        .wait_for_log(&format!("CONNECT {HOST}:{} HTTP/1.1", p.port));
    let bad = format!("http://agent:wrong@127.0.0.1:{}", p.proxy.port);
    let (bad_pid, refused) = p.sdk(Sdk::Python, &bad);
    assert!(refused.is_err(), "{refused:?}");
    let log = p.agent.log();
    let records = p.records();
    let denied = proxy_requests(&records, bad_pid);
    assert!(
        denied
            .iter()
            .any(|x| x["decision"] == "refused_by_proxy" && x["status"] == 401),
        "{denied:#?}"
    );
    use base64::Engine as _;
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("agent:{PROXY_PASSWORD}"));
    for text in [
        records.iter().map(Value::to_string).collect::<String>(),
        log,
    ] {
        assert!(
            !text.contains(PROXY_PASSWORD),
            "the proxy password was recorded or logged"
        );
        assert!(
            !text.contains(&encoded),
            "the proxy credentials were recorded or logged"
        );
    }
}

/// What is not a proxy request Airlock can stand behind is refused with a reason, recorded,
/// and never reaches the proxy: garbage, plain HTTP to the MCP backend, a numeric host a
/// resolver reads as an address, another name for the backend's address, a `Host` header
/// naming the backend, TLS to the proxy.
#[test]
fn unparseable_and_unsafe_proxy_requests_are_refused_with_a_reason() {
    let Some(mut p) = proxied("proxy-squid-refuse", |dir, _| {
        RealProxy::squid(dir, "http_access allow all")
    }) else {
        return;
    };
    let port = p.port;
    let cases = [
        ("hello\r\n\r\n".to_owned(), "400", "malformed proxy request"),
        (
            format!("GET http://{HOST}:{port}/mcp HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"),
            "403",
            "plain HTTP to MCP backend `tools`",
        ),
        (
            format!("CONNECT 127.1:{port} HTTP/1.1\r\n\r\n"),
            "400",
            "not a host and port",
        ),
        (
            format!("CONNECT {ALIAS}:{port} HTTP/1.1\r\nHost: {ALIAS}:{port}\r\n\r\n"),
            "403",
            "under another name",
        ),
        (
            format!("CONNECT {OTHER}:443 HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"),
            "403",
            "Host header names MCP backend",
        ),
        ("\u{16}\u{3}\u{1}\u{0}\u{5}hello".to_owned(), "", ""),
    ];
    let requests: Vec<&str> = cases.iter().map(|c| c.0.as_str()).collect();
    let mut cmd = p.cg.command(PYTHON);
    cmd.args(["-c", PROBES, &p.proxy.port.to_string()])
        .arg(serde_json::to_string(&requests).unwrap());
    let (pid, out) = run(cmd);
    let got = json_of(&out);
    for ((_, status, reason), answer) in cases.iter().zip(got["answers"].as_array().unwrap()) {
        let answer = answer.as_str().unwrap();
        if status.is_empty() {
            assert_eq!(answer, "", "no HTTP answer to TLS");
        } else {
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{answer}"
            );
            assert!(answer.contains(reason), "{answer}");
        }
    }
    let records = p.records();
    let refused: Vec<Value> = proxy_requests(&records, pid)
        .into_iter()
        .filter(|x| x["decision"] == "block")
        .collect();
    assert_eq!(refused.len(), cases.len(), "{refused:#?}");
    assert!(
        refused
            .iter()
            .any(|x| x["reason"].as_str().unwrap().contains("TLS to the proxy")),
        "{refused:#?}"
    );
    // None of them reached squid as a request.
    assert!(!p.proxy.log().contains("CONNECT"), "{}", p.proxy.log());
    // The SIEM hears of them as refused connections, attributed: the first one of the 10 s
    // interval, then a summary counting the others (a flood costs two events).
    let events: Vec<Value> = std::fs::read_to_string(p.agent.dir.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &Value| e["policy"]["uid"] == "airlock:proxy_request_refused")
        .collect();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(events[0]["class_uid"], 4001);
    assert_eq!(events[0]["actor"]["process"]["pid"], pid);
    assert_eq!(events[1]["count"], cases.len() - 1);
}

/// A client connection's exchanges share one tunnel; when the server closes it (uvicorn after
/// 5 s idle), the next exchange gets a new tunnel through the proxy, asked for with the
/// client's credentials (squid requires them).
#[test]
fn a_tunnel_the_server_closed_is_opened_again_with_the_clients_credentials() {
    let Some(p) = proxied("proxy-squid-redial", |dir, _| {
        RealProxy::squid(
            dir,
            "auth_param basic program /usr/lib/squid/basic_fake_auth\n\
             acl authed proxy_auth REQUIRED\nhttp_access allow authed\nhttp_access deny all",
        )
    }) else {
        return;
    };
    let dir = p.agent.dir.clone();
    let script = dir.join("redial.py");
    std::fs::write(&script, REDIAL).unwrap();
    let go = dir.join("go");
    let mut cmd = p.cg.command(PYTHON);
    cmd.arg(&script)
        .arg(p.proxy.port.to_string())
        .arg(HOST)
        .arg(p.port.to_string())
        .arg(&p.bundle)
        .arg(&go)
        .stdout(Stdio::piped());
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(child.0.stdout.take().unwrap()));
    assert_eq!(lines.next().unwrap().unwrap(), "two calls");
    // squid logs a tunnel when it ends: once the server closed the idle one.
    let tunnel = format!("CONNECT {HOST}:{} ", p.port);
    p.proxy.wait_for_log(&tunnel);
    assert_eq!(
        p.proxy.log().matches(&tunnel).count(),
        1,
        "two exchanges, one tunnel: {}",
        p.proxy.log()
    );
    std::fs::write(&go, "").unwrap();
    let done = lines.next().and_then(Result::ok).unwrap_or_default();
    let done: Value = serde_json::from_str(&done).unwrap_or_else(|e| {
        panic!(
            "the third call: {e} ({done:?})\nagent: {}\nproxy: {}",
            p.agent.log(),
            p.proxy.log()
        )
    });
    assert_eq!(
        done["statuses"],
        serde_json::json!([200, 200, 200]),
        "{}",
        p.agent.log()
    );
    drop(lines);
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.proxy.log().matches(&tunnel).count() < 2 {
        assert!(Instant::now() < deadline, "{}", p.proxy.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = p.proxy.log();
    let last = log.lines().filter(|l| l.contains(&tunnel)).nth(1).unwrap();
    assert!(
        last.contains(" bob "),
        "the new tunnel carried the client's credentials: {last}"
    );
}

/// With the agent down, a governed process's connection to the proxy is refused by the kernel
/// (the programs stay pinned) — never a way around interception; a process outside the
/// attached cgroup still reaches the proxy.
#[test]
fn connections_to_the_proxy_fail_closed_while_the_agent_is_down() {
    let Some(mut p) = proxied("proxy-squid-down", |dir, _| {
        RealProxy::squid(dir, "http_access allow all")
    }) else {
        return;
    };
    p.agent.sigkill();
    let res = run_client(&p.cg, "127.0.0.1", p.proxy.port, &ClientOpts::default());
    assert_eq!(res.errno, Some(i64::from(libc::ECONNREFUSED)), "{res:?}");
    let outside = raw_exchange(([127, 0, 0, 1], p.proxy.port).into()).unwrap();
    assert!(
        String::from_utf8_lossy(&outside).starts_with("HTTP/1.1 400"),
        "squid answers whoever is not governed"
    );
}

/// A proxy with `cgroups` is intercepted for processes in those cgroups only: a process of the
/// attached cgroup outside them reaches the real proxy directly (neither redirected nor
/// dropped by the egress guard), and its requests are not Airlock's to judge or record.
#[test]
fn a_proxy_scoped_to_cgroups_is_intercepted_for_them_only() {
    let Some(mut p) = proxied_with(
        "proxy-squid-scope",
        |cg| {
            // Children of the attached cgroup, made before the agent checks they exist.
            for child in ["in", "out"] {
                std::fs::create_dir_all(cg.path.join(child)).unwrap();
            }
            let name = cg.path.file_name().unwrap().to_str().unwrap();
            format!("cgroups = [\"/{name}/in\"]")
        },
        |dir, _| RealProxy::squid(dir, "http_access allow all"),
    ) else {
        return;
    };
    let sub = |child: &str| TestCgroup {
        path: p.cg.path.join(child),
    };
    let (inside, outside) = (sub("in"), sub("out"));
    let probe = |cg: &TestCgroup| {
        let mut cmd = cg.command(PYTHON);
        cmd.args(["-c", PROBES, &p.proxy.port.to_string()])
            .arg(serde_json::to_string(&["hello\r\n\r\n"]).unwrap());
        let (pid, out) = run(cmd);
        let got = json_of(&out);
        (pid, got["answers"][0].as_str().unwrap().to_owned())
    };
    let (in_pid, in_answer) = probe(&inside);
    assert!(
        in_answer.starts_with("HTTP/1.1 400 ") && in_answer.contains("malformed proxy request"),
        "Airlock answers the scoped cgroup: {in_answer}"
    );
    let (out_pid, out_answer) = probe(&outside);
    assert!(
        out_answer.starts_with("HTTP/1.1 400 ") && !out_answer.contains("malformed proxy request"),
        "squid answers the rest: {out_answer}"
    );
    assert!(p.agent.kernel_counter("miss_out_of_scope") >= 1);
    let records = p.records();
    assert_eq!(proxy_requests(&records, in_pid).len(), 1, "{records:#?}");
    assert!(
        records.iter().all(|r| r["tgid"] != out_pid),
        "nothing recorded for the process outside the scope"
    );
    drop((inside, outside));
}
