//! The red team (issue 10): crafted requests against real MCP servers, hostile answers against
//! real MCP clients, through Airlock's redirect and TLS interception.
//!
//! Requests: `tests/support/redteam/attack.py` sends 81 crafted requests (body encodings,
//! media types, charsets in every notation, duplicate and case-folded keys, escapes, batches,
//! notifications, odd ids, paths, chunking, the stateless 2026-07-28 route...) that each try
//! to run the tool `dangerous`, which a policy blocks, on four real servers: the Python SDK 2.x
//! and 1.x, FastMCP and the TypeScript SDK. The same cases sent directly show which of them
//! each server really executes (so the suite proves something); through Airlock none may run,
//! and each one's refusal is in the archive.
//!
//! Answers: `hostile.py` answers a tool call with a planted secret (an email address and an
//! AWS key id, both masked by the shipped policy) in 44 framings (content types, charsets in
//! RFC 2231/8187 notations, encodings, byte-order marks, batches, SSE event types and line
//! ends (U+2028 too), ids, status codes, trailers, notifications, a backslashed redirect). Real
//! clients (Python SDK 2.x and 1.x, TypeScript SDK) print everything they handed to the
//! application; through Airlock the secret reaches none of them, while directly it reaches
//! each of them in several framings.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

const SUPPORT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/support/redteam");
const SECRETS: [&str; 2] = ["planted.secret@example.com", "AKIAIOSFODNN7EXAMPLE"];

/// Requests (`attack.py`) declaring a charset in RFC 2231 notation or in two notations.
const CHARSET_NOTATION_CASES: [&str; 4] = [
    "ct_charset_ext_utf16",
    "ct_charset_sections_utf16",
    "ct_charset_ext_plain",
    "ct_charset_two_notations",
];

/// Answers (`hostile.py`) declaring a charset other than UTF-8 in some notation; the
/// extended and continued ones are what Python clients (httpx, via `email.message`) read and
/// decode an event stream with: the UTF-8 comment Airlock passed on becomes, in UTF-7, the
/// planted answer.
const CHARSET_FRAMINGS: [&str; 8] = [
    "sse_charset_utf7",
    "sse_charset_ext",
    "sse_charset_ext_pct",
    "sse_charset_ext_utf16_value",
    "sse_charset_sections",
    "sse_charset_sections_ext",
    "sse_charset_two_notations",
    "json_charset_ext",
];

const BLOCK_DANGEROUS: &str = r#"
[[rule]]
id = "no-dangerous"
action = "block"
tools = ["dangerous"]
"#;

/// The servers under attack: name, the program and its arguments before the common ones.
fn servers() -> Vec<(&'static str, PathBuf, Vec<String>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let py = |venv: &str, sdk: &str| {
        let python = root.join(venv).join("bin/python");
        assert!(
            python.exists(),
            "{} is missing: run `cargo xtask setup`",
            python.display()
        );
        (
            python,
            vec![format!("{SUPPORT}/servers.py"), "--sdk".into(), sdk.into()],
        )
    };
    let (mcp2, a2) = py("test-venv", "mcp2");
    let (mcp1, a1) = py("test-venv-mcp1", "mcp1");
    let (fast, af) = py("test-venv-fastmcp", "fastmcp");
    vec![
        ("mcp2", mcp2, a2),
        ("mcp1", mcp1, a1),
        ("fastmcp", fast, af),
        ("ts", node(), vec![format!("{SUPPORT}/server.mjs")]),
    ]
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Run a support script (`program` with `args`) with the test hosts file, in `cg` when given
/// (then through Airlock), and collect its JSON lines.
fn json_lines(
    cg: Option<&TestCgroup>,
    dir: &Path,
    program: &Path,
    args: &[String],
    env: &[(&str, &Path)],
) -> Vec<Value> {
    let mut cmd = with_test_hosts(cg, dir, program);
    cmd.args(args).env("NODE_PATH", node_modules());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        !lines.is_empty(),
        "{} printed nothing: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    lines
}

fn marker_lines(marker: &Path) -> Vec<Value> {
    std::fs::read_to_string(marker)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// One agent with a backend per server (and one for the hostile server), on free ports of
/// `HOST`, blocking `dangerous`.
fn agent_for(name: &str, backends: &[(&str, u16)]) -> (TestCgroup, Agent) {
    let name = unique(name);
    let cg = TestCgroup::new(&name);
    // The backends' CA is made in the test directory once `Agent::prepare` has made it.
    let ca = std::env::temp_dir().join(&name).join("backend-ca.pem");
    let toml: String = backends
        .iter()
        .map(|(b, port)| {
            format!(
                "[[backend]]\nname = \"{b}\"\nhost = \"{HOST}\"\nport = {port}\naddresses = [\"127.0.0.1\"]\nca_file = \"{}\"\n",
                ca.display()
            )
        })
        .collect();
    // Buffered recording: hundreds of short connections, and durability is not what is tested.
    let mut agent = Agent::prepare(&cg, &name, &toml, "recording = \"buffered\"", None);
    server_pki(&agent.dir);
    std::fs::write(agent.dir.join("policies/redteam.toml"), BLOCK_DANGEROUS).unwrap();
    agent.spawn();
    (cg, agent)
}

#[test]
fn crafted_requests_never_run_a_blocked_tool_on_real_servers() {
    if !privileged() {
        return;
    }
    let servers = servers();
    let ports: Vec<u16> = servers.iter().map(|_| free_port()).collect();
    let backends: Vec<(&str, u16)> = servers
        .iter()
        .map(|s| s.0)
        .zip(ports.iter().copied())
        .collect();
    let (cg, mut agent) = agent_for("redteam-req", &backends);
    let dir = agent.dir.clone();
    let bundle = airlock_ca_bundle(&agent);
    let mut running = Vec::new();
    for ((sdk, program, args), port) in servers.iter().zip(&ports) {
        let marker = dir.join(format!("{sdk}.marker"));
        let mut cmd = Command::new(program);
        cmd.args(args)
            .args(["--port", &port.to_string(), "--hostname", HOST, "--marker"])
            .arg(&marker)
            .arg("--cert")
            .arg(dir.join("server.pem"))
            .arg("--key")
            .arg(dir.join("server.key"))
            .env("NODE_PATH", node_modules())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{sdk}.log"))).unwrap());
        running.push(Killed(cmd.spawn().unwrap()));
        wait_listening(*port, sdk);
    }
    let attack = |cg: Option<&TestCgroup>, port: u16, ca: &Path| {
        json_lines(
            cg,
            &dir,
            Path::new(PYTHON),
            &[
                format!("{SUPPORT}/attack.py"),
                "--all".into(),
                // Generous: the machine is shared with the other tests.
                "--case-timeout".into(),
                "6".into(),
                "--url".into(),
                format!("https://{HOST}:{port}/mcp"),
                "--ca".into(),
                ca.display().to_string(),
            ],
            &[],
        )
    };
    let mut report = Vec::new();
    let mut request_stage = 0;
    for ((sdk, _, _), port) in servers.iter().zip(&ports) {
        let marker = dir.join(format!("{sdk}.marker"));
        // Directly: which crafted requests does this server really execute?
        let direct = attack(None, *port, &dir.join("backend-ca.pem"));
        let ran_directly: BTreeSet<String> = marker_lines(&marker)
            .iter()
            .filter_map(|l| l["text"].as_str().map(str::to_owned))
            .collect();
        assert!(
            ran_directly.contains("plain") && ran_directly.len() >= 8,
            "{sdk}: the cases do not reach the server directly ({ran_directly:?}); {direct:?}"
        );
        std::fs::remove_file(&marker).unwrap();
        // Through Airlock: none.
        let through = attack(Some(&cg), *port, &bundle);
        assert_eq!(through.len(), direct.len(), "{sdk}: {through:?}");
        request_stage += through.iter().filter(|c| c["stage"] == "request").count();
        // A charset in a notation other than `charset=` (or in two) is refused for what it
        // is, whatever the body: not merely blocked by the policy, or refused as not JSON.
        for case in through.iter().filter(|c| {
            c["case"]
                .as_str()
                .is_some_and(|n| CHARSET_NOTATION_CASES.contains(&n))
        }) {
            assert!(
                case["status"] == 415
                    && case["body_head"]
                        .as_str()
                        .is_some_and(|b| b.contains("charset")),
                "{sdk}: not refused for its charset: {case}"
            );
        }
        let ran: Vec<Value> = marker_lines(&marker);
        assert!(
            ran.is_empty(),
            "{sdk}: ran through Airlock: {ran:?}\nanswers: {through:#?}"
        );
        let slow: Vec<&str> = through
            .iter()
            .filter(|c| c["error"].as_str().is_some_and(|e| e.contains("timed out")))
            .filter_map(|c| c["case"].as_str())
            .collect();
        report.push(format!(
            "{sdk}: {} of {} cases run directly, none through Airlock (no answer in time: {slow:?})",
            ran_directly.len(),
            direct.len()
        ));
    }
    eprintln!("{}", report.join("\n"));
    // Every crafted request that reached Airlock was refused or blocked, on the record.
    assert!(agent.sigterm().success(), "{}", agent.log());
    let blocked = archived_records(&agent.archive)
        .iter()
        .filter(|r| r["decision"] == "block" && r["direction"] == "client_to_server")
        .count();
    assert!(
        blocked >= request_stage,
        "{blocked} refusals recorded for {request_stage} crafted requests"
    );
    drop(running);
}

#[test]
fn hostile_answers_never_hand_a_planted_secret_to_real_clients() {
    if !privileged() {
        return;
    }
    let port = free_port();
    let (cg, mut agent) = agent_for("redteam-resp", &[("hostile", port)]);
    let dir = agent.dir.clone();
    let bundle = airlock_ca_bundle(&agent);
    let _hostile = Killed(
        Command::new(PYTHON)
            .arg(format!("{SUPPORT}/hostile.py"))
            .args(["--port", &port.to_string(), "--cert"])
            .arg(dir.join("server.pem"))
            .arg("--key")
            .arg(dir.join("server.key"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("hostile.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_listening(port, "hostile.py");
    let framings = String::from_utf8(
        Command::new(PYTHON)
            .arg(format!("{SUPPORT}/hostile.py"))
            .arg("--list")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .lines()
    .collect::<Vec<_>>()
    .join(",");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let clients: [(&str, PathBuf, &str); 3] = [
        (
            "python mcp 2.x",
            root.join("test-venv/bin/python"),
            "sdk_client.py",
        ),
        (
            "python mcp 1.x",
            root.join("test-venv-mcp1/bin/python"),
            "sdk_client.py",
        ),
        ("typescript sdk", node(), "sdk_client.mjs"),
    ];
    for (client, program, script) in &clients {
        let run = |cg: Option<&TestCgroup>, ca: &Path| {
            json_lines(
                cg,
                &dir,
                program,
                &[
                    format!("{SUPPORT}/{script}"),
                    "--url-template".into(),
                    format!("https://{HOST}:{port}/f/{{framing}}/mcp"),
                    "--framings".into(),
                    framings.clone(),
                    // Generous: the machine is shared with the other tests.
                    "--timeout".into(),
                    "8".into(),
                ],
                &[("SSL_CERT_FILE", ca), ("NODE_EXTRA_CA_CERTS", ca)],
            )
        };
        let leaks = |lines: &[Value]| -> Vec<String> {
            lines
                .iter()
                .filter(|l| {
                    let text = l.to_string();
                    SECRETS.iter().any(|s| text.contains(s))
                })
                .map(|l| l["framing"].as_str().unwrap_or("?").to_owned())
                .collect()
        };
        // Directly, the secret is real: it reaches the application in several framings.
        let direct = run(None, &dir.join("backend-ca.pem"));
        let leaked_directly = leaks(&direct);
        assert!(
            leaked_directly.contains(&"json".to_owned()) && leaked_directly.len() >= 5,
            "{client}: the planted secret does not reach the client directly: {leaked_directly:?}"
        );
        if client.starts_with("python") {
            // The charset notations are real to Python clients: directly, they decode the
            // stream as UTF-7 and get the planted answer.
            for framing in &CHARSET_FRAMINGS[1..6] {
                assert!(
                    leaked_directly.iter().any(|l| l == framing),
                    "{client}: {framing} does not reach the client directly: {leaked_directly:?}"
                );
            }
        }
        // Through Airlock: never; the control framings still deliver a (masked) result.
        let through = run(Some(&cg), &bundle);
        assert_eq!(through.len(), direct.len(), "{client}: {through:?}");
        let leaked = leaks(&through);
        assert!(
            leaked.is_empty(),
            "{client}: the planted secret reached the client through Airlock in {leaked:?}:\n{:#?}",
            through
                .iter()
                .filter(|l| leaked.contains(&l["framing"].as_str().unwrap_or("").to_owned()))
                .collect::<Vec<_>>()
        );
        // Every answer declaring another charset is refused, in whatever notation.
        for framing in CHARSET_FRAMINGS {
            let line = through.iter().find(|l| l["framing"] == framing).unwrap();
            assert_eq!(line["ok"], false, "{client} {framing}: {line}");
        }
        for control in ["json", "sse"] {
            let line = through.iter().find(|l| l["framing"] == control).unwrap();
            assert_eq!(line["ok"], true, "{client} {control}: {line}");
            assert!(
                line.to_string().contains("[MASKED:aws_access_key]"),
                "{client} {control}: {line}"
            );
        }
        eprintln!(
            "{client}: leaked directly in {} of {} framings ({}), through Airlock in none",
            leaked_directly.len(),
            direct.len(),
            leaked_directly.join(" ")
        );
    }
    assert!(agent.sigterm().success(), "{}", agent.log());
    // The refused answers are on the record.
    let refused = archived_records(&agent.archive)
        .iter()
        .filter(|r| r["decision"] == "block" && r["direction"] == "server_to_client")
        .count();
    assert!(refused >= 3 * 5, "{refused} refusals recorded");
}
