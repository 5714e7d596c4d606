//! `metrics_listen`, scraped by the real Prometheus server (Debian's package, unpacked by
//! `cargo xtask setup`) while real MCP traffic is masked, blocked, allowed and held; the
//! values are read back through Prometheus's HTTP API. Both formats the endpoint speaks are
//! linted by the same package's `promtool check metrics`.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

/// `target/test-prometheus/usr/bin/prometheus`; `cargo xtask setup` unpacks it.
fn prometheus_binary() -> PathBuf {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-prometheus/usr/bin/prometheus");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup` (it unpacks Debian's prometheus package)",
        p.display()
    );
    p
}

/// `target/test-prometheus/usr/bin/promtool`, from the same Debian package.
fn promtool_binary() -> PathBuf {
    let p = prometheus_binary().with_file_name("promtool");
    assert!(
        p.exists(),
        "{} is missing: Debian's prometheus package ships it; rerun `cargo xtask setup`",
        p.display()
    );
    p
}

/// `promtool check metrics` on `text`: whether it passed, and what it said.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new(promtool_binary())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// A Prometheus server scraping `target` every second, killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, target: &str) -> Prometheus {
        let dir = dir.join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: airlock\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Prometheus { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.get("/-/ready").is_none_or(|(status, _)| status != 200) {
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` (HTTP/1.0: the answer is the rest of the stream): status and body.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.set_write_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).ok()?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    }

    /// An API call's `data`.
    fn api(&self, path: &str) -> Value {
        let (status, body) = self
            .get(path)
            .unwrap_or_else(|| panic!("no answer to {path}:\n{}", self.log()));
        assert_eq!(status, 200, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{path}: {body}");
        v["data"].clone()
    }

    /// An instant query: each series' labels and value.
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(promql)));
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let v = r["value"][1].as_str().unwrap().parse().unwrap();
                (r["metric"].clone(), v)
            })
            .collect()
    }

    /// The single value of `promql`, once it satisfies `ok` (within 30 s).
    fn wait_value(&self, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.query(promql);
            if let [(_, v)] = got.as_slice()
                && ok(*v)
            {
                return *v;
            }
            assert!(
                Instant::now() < deadline,
                "{promql}: {got:?} after 30 s\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

const APPROVE_ADD: &str = r#"
[[rule]]
id = "approve-add"
action = "approve"
tools = ["add"]
timeout_secs = 60
"#;

/// The whole exchange: Prometheus scrapes the agent before and during traffic; the counters
/// it stores moved as the traffic says, a blocked call counts once, a held call shows as
/// pending and then as denied, and no series is labelled by user, pid or session. The
/// endpoint answers the Prometheus text format 0.0.4 unless OpenMetrics is asked for, and
/// `promtool check metrics` finds nothing wrong with it (issue 19).
#[test]
fn prometheus_scrapes_what_the_traffic_did() {
    let metrics_port = free_port();
    let Some((cg, mut agent, server, port, bundle)) = tls_setup_full(
        "metrics",
        "ca_file = \"BACKEND_CA\"",
        // An events sink too: its families are linted with the others.
        &format!(
            "metrics_listen = \"127.0.0.1:{metrics_port}\"\nflush_interval_secs = 1\n\
             [events.file]\npath = \"EVENTS_DIR/events.jsonl\"\n"
        ),
        ("json", 1),
        |agent| {
            let cfg = std::fs::read_to_string(&agent.config)
                .unwrap()
                .replace("EVENTS_DIR", agent.dir.to_str().unwrap());
            std::fs::write(&agent.config, cfg).unwrap();
            std::fs::write(agent.dir.join("policies/block.toml"), BLOCK_POLICY).unwrap()
        },
    ) else {
        return;
    };
    let dir = agent.dir.clone();
    let prom = Prometheus::start(&dir, &format!("127.0.0.1:{metrics_port}"));
    // Scraped before any traffic: up, the build, nothing blocked yet.
    prom.wait_value("up{job=\"airlock\"}", |v| v == 1.0);
    let build = prom.query("airlock_build_info");
    assert_eq!(build.len(), 1, "{build:?}");
    assert_eq!(build[0].1, 1.0);
    assert_eq!(build[0].0["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        prom.query("airlock_mcp_blocked_calls_total").is_empty(),
        "nothing blocked yet"
    );

    // Real traffic, twice: each run calls tools (allowed), gets an email masked in an answer
    // and has `delete_everything` blocked.
    let url = format!("https://{HOST}:{port}/mcp");
    for _ in 0..2 {
        let through = run_sdk_client(
            Sdk::Python,
            Some(&cg),
            &dir,
            &bundle,
            &url,
            "streamable",
            &[],
        )
        .unwrap_or_else(|e| panic!("through Airlock: {e}\nagent log:\n{}", agent.log()));
        assert_eq!(through["errors"]["delete_everything"]["code"], -32010);
    }

    // Two blocked calls: two, not four (each also has Airlock's error answer).
    prom.wait_value(
        "sum(airlock_mcp_blocked_calls_total{backend=\"tools\"})",
        |v| v == 2.0,
    );
    let by_decision =
        prom.query("sum by (decision) (airlock_mcp_messages_total{backend=\"tools\"})");
    let decision = |d: &str| {
        by_decision
            .iter()
            .find(|(m, _)| m["decision"] == d)
            .map(|(_, v)| *v)
            .unwrap_or(0.0)
    };
    assert!(decision("allow") > 0.0, "{by_decision:?}");
    assert!(decision("mask") >= 2.0, "{by_decision:?}");
    // Blocked messages: the two refused requests, Airlock's two error answers, and the two
    // tool listings that had `delete_everything` taken out.
    assert_eq!(decision("block"), 6.0, "{by_decision:?}");
    let blocked_kinds = prom.query(
        "sum by (kind, direction) (airlock_mcp_messages_total{backend=\"tools\",decision=\"block\"})",
    );
    for (kind, direction) in [
        ("request", "client_to_server"),
        ("error", "server_to_client"),
        ("response", "server_to_client"),
    ] {
        assert!(
            blocked_kinds
                .iter()
                .any(|(m, v)| m["kind"] == kind && m["direction"] == direction && *v == 2.0),
            "{kind}: {blocked_kinds:?}"
        );
    }
    prom.wait_value(
        "sum(airlock_mcp_masked_values_total{backend=\"tools\",detector=\"email\"})",
        |v| v >= 2.0,
    );
    prom.wait_value(
        "sum(airlock_mcp_operation_duration_seconds_count{backend=\"tools\",method=\"tools/call\"})",
        |v| v > 0.0,
    );
    prom.wait_value("airlock_connections_accepted_total", |v| v >= 2.0);
    prom.wait_value(
        "sum(airlock_kernel_events_total{counter=~\"redirect_ipv4|redirect_ipv4_mapped\"})",
        |v| v > 0.0,
    );
    prom.wait_value("airlock_archive_records_total", |v| v > 0.0);
    prom.wait_value("airlock_archive_commit_duration_seconds_count", |v| v > 0.0);
    // Segments roll every second: files and bytes published, and the backlog drains.
    prom.wait_value("airlock_archive_files_total", |v| v > 0.0);
    prom.wait_value("airlock_archive_written_bytes_total", |v| v > 1000.0);
    prom.wait_value("airlock_archive_unpublished_records", |v| v == 0.0);
    prom.wait_value("airlock_archive_publish_lag_seconds", |v| v == 0.0);
    assert!(
        prom.query("airlock_connections_rejected_total")
            .iter()
            .all(|(m, _)| m["reason"].is_string()),
    );

    // A held call: pending while it waits, then denied. Adding the policy is a reload.
    std::fs::write(dir.join("policies/approve.toml"), APPROVE_ADD).unwrap();
    prom.wait_value(
        "sum(airlock_policy_reloads_total{result=\"applied\"})",
        |v| v >= 1.0,
    );
    let config = agent.config.to_str().unwrap().to_owned();
    let client = spawn_call(&cg, &dir, &bundle, &url, "add", r#"{"a": 1, "b": 1}"#);
    prom.wait_value("airlock_approvals_pending", |v| v == 1.0);
    let held: Value = serde_json::from_str(
        airlock_out(&["approvals", "list", "--json", "--config", &config])
            .lines()
            .next()
            .expect("a held call"),
    )
    .unwrap();
    airlock_out(&[
        "approvals",
        "deny",
        &held["id"].as_u64().unwrap().to_string(),
        "--config",
        &config,
    ]);
    let res = finish(client);
    assert_eq!(res["error"]["code"], -32013, "{res}");
    prom.wait_value(
        "sum(airlock_mcp_held_calls_total{backend=\"tools\",outcome=\"denied\"})",
        |v| v == 1.0,
    );
    prom.wait_value("airlock_approvals_pending", |v| v == 0.0);
    // A denied call is not a blocked one.
    assert_eq!(prom.query("sum(airlock_mcp_blocked_calls_total)")[0].1, 2.0);

    // Bounded labels: nothing names a user, a process, a session, a tool or a call.
    let labels = prom.api("/api/v1/labels");
    for forbidden in [
        "user",
        "pid",
        "uid",
        "session",
        "session_id",
        "tool",
        "jsonrpc_id",
    ] {
        assert!(
            !labels.as_array().unwrap().iter().any(|l| l == forbidden),
            "label {forbidden}: {labels}"
        );
    }
    let series = prom.api(&format!(
        "/api/v1/series?match[]={}",
        url_encode("{job=\"airlock\"}")
    ));
    for s in series.as_array().unwrap() {
        let name = s["__name__"].as_str().unwrap();
        assert!(
            name.starts_with("airlock_") || name == "up" || name.starts_with("scrape_"),
            "{s}"
        );
        for (k, v) in s.as_object().unwrap() {
            assert!(
                !v.as_str().unwrap_or("").contains("delete_everything"),
                "{k}={v}: a tool name in a label"
            );
        }
    }

    // The endpoint itself: the Prometheus text format 0.0.4 without a preference or when it
    // is asked for, every family with its HELP and TYPE: promtool finds nothing to say.
    for accept in [None, Some("text/plain;version=0.0.4")] {
        let (head, text) = raw_http_accept(metrics_port, "GET /metrics", accept);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{accept:?}: {head}"
        );
        assert!(head.contains("vary: accept"), "{head}");
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        for family in [
            "airlock_mcp_blocked_calls_total",
            "airlock_connections_rejected_total",
            "airlock_kernel_events_total",
            "airlock_events_emitted_total",
            "airlock_archive_commit_duration_seconds",
        ] {
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{family}: {text}"
            );
        }
        let (ok, said) = promtool_check(&text);
        assert!(
            ok && said.trim().is_empty(),
            "promtool check metrics ({accept:?}):\n{said}\n{text}"
        );
    }
    // OpenMetrics when asked for (Prometheus itself asks for it, and has scraped it above).
    let (head, text) = raw_http_accept(
        metrics_port,
        "GET /metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    // promtool 2.42 reads whatever it is given as the 0.0.4 text format, where a counter's
    // HELP would name its `_total` sample; in OpenMetrics it names the family, without the
    // suffix. That is its only complaint allowed here, and only for a family declared as a
    // counter with its HELP: anything else (a name, a unit, a missing HELP) fails.
    let (_, said) = promtool_check(&text);
    for complaint in said.lines().filter(|l| !l.trim().is_empty()) {
        let family = complaint
            .strip_suffix(" no help text")
            .and_then(|s| s.strip_suffix("_total"))
            .unwrap_or_else(|| panic!("promtool on OpenMetrics: {complaint}\n{said}\n{text}"));
        assert!(
            text.contains(&format!("# HELP {family} "))
                && text.contains(&format!("# TYPE {family} counter\n")),
            "promtool on OpenMetrics: {complaint}\n{text}"
        );
    }
    assert!(
        raw_http(metrics_port, "POST /metrics")
            .0
            .starts_with("HTTP/1.1 405")
    );
    assert!(
        raw_http(metrics_port, "GET /")
            .0
            .starts_with("HTTP/1.1 404")
    );

    assert!(agent.sigterm().success(), "{}", agent.log());
    drop(server);
}

/// One request to the agent's metrics endpoint: the head and the body.
fn raw_http(port: u16, request_line: &str) -> (String, String) {
    raw_http_accept(port, request_line, None)
}

/// One request with an `Accept` header (when given).
fn raw_http_accept(port: u16, request_line: &str, accept: Option<&str>) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{request_line} HTTP/1.1\r\nHost: 127.0.0.1\r\n{accept}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

/// A `metrics_listen` port already taken stops the agent at start with a message naming the
/// key; a non-loopback address is refused at config load.
#[test]
fn metrics_listen_errors_are_clear() {
    if !privileged() {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let name = unique("metrics-taken");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "127.0.0.2:0");
    let agent = Agent::prepare(
        &cg,
        &name,
        &backend_toml("tools", backend.port(), &["127.0.0.2"]),
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
        None,
    );
    let run = |config: &Path| {
        let out = Command::new(AIRLOCK)
            .args(["run", "--config"])
            .arg(config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&agent.config);
    assert!(
        err.contains(&format!("cannot serve metrics on 127.0.0.1:{port}"))
            && err.contains("metrics_listen"),
        "{err}"
    );
    // Refused before the programs were attached: nothing pinned.
    assert!(!agent.bpffs_dir.join("links").exists(), "{err}");
    let remote = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace(&format!("127.0.0.1:{port}"), "0.0.0.0:9464");
    std::fs::write(&agent.config, remote).unwrap();
    let err = run(&agent.config);
    assert!(
        err.contains("metrics_listen") && err.contains("metrics_allow_remote"),
        "{err}"
    );
}
