//! Audit events for SIEMs, end to end: real MCP traffic through the agent is blocked and
//! masked, and the OCSF events arrive at Debian's `rsyslog` (started here as a plain process)
//! and in the JSON-lines file, with the caller's uid and executable and no secret; a sink
//! that is down neither blocks nor slows the traffic, and what it missed is delivered when
//! it is back (the webhook's spool survives an agent restart).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{harness::*, siem::*};

/// A GitHub token the default policy masks: planted in arguments, it must be in no event.
const PLANTED: &str = "ghp_PLANTEDsecretTOKEN0123456789abcdefAB";

const BLOCK_POLICY: &str = r#"
[[rule]]
id = "no-destructive-tools"
action = "block"
tools = ["delete_*"]
"#;

/// Blocked and masked MCP calls from a real SDK client reach rsyslog (TCP, RFC 5424 with
/// octet counting) and the JSON-lines file as OCSF API Activity events: one event per
/// blocked call, the caller's uid and executable, the rule, counts by detector and never
/// the planted token. Start and stop are Application Lifecycle events. Every event from
/// the run validates against the OCSF schema.
///
/// The block rule is in a file read after the shipped `default.toml` (whose mask rules match
/// every message): each event names the rule that decided — the block rule, or the mask rule
/// that masked a value, not the first rule that matched — as the client's error and the
/// archived record do (issue 19).
#[test]
fn blocked_and_masked_calls_reach_rsyslog_and_the_file() {
    let syslog_port = free_port();
    let top = format!(
        "[events]\n[events.file]\npath = \"EVENTS_DIR/events.jsonl\"\n\
         [events.syslog]\naddress = \"tcp://127.0.0.1:{syslog_port}\"\nfacility = \"local3\"\n"
    );
    let mut rsyslog = None;
    let Some((cg, mut agent, _server, port, bundle)) = tls_setup_full(
        "events",
        "ca_file = \"BACKEND_CA\"",
        &top,
        ("json", 1),
        |agent| {
            let cfg = std::fs::read_to_string(&agent.config)
                .unwrap()
                .replace("EVENTS_DIR", agent.dir.to_str().unwrap());
            std::fs::write(&agent.config, cfg).unwrap();
            // Read after default.toml: its mask rules come first in the set.
            std::fs::write(agent.dir.join("policies/site.toml"), BLOCK_POLICY).unwrap();
            rsyslog = Some(Rsyslog::start(&agent.dir, Some(syslog_port), None));
        },
    ) else {
        return;
    };
    let rsyslog = rsyslog.unwrap();
    let url = format!("https://{HOST}:{port}/mcp");
    // Blocked, with a token in its arguments that `mask-secrets` masks: the block decided.
    let res = finish(spawn_call(
        &cg,
        &agent.dir,
        &bundle,
        &url,
        "delete_everything",
        &format!(r#"{{"reason": "{PLANTED}"}}"#),
    ));
    assert_eq!(res["error"]["code"], -32010, "{res}");
    assert!(
        res["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("rule `no-destructive-tools`")),
        "the client's error names the rule: {res}"
    );
    // An answer with an email: `mask-secrets` matches it and masks nothing, then
    // `mask-personal-data` masks the address.
    let res = finish(spawn_call(&cg, &agent.dir, &bundle, &url, "contact", "{}"));
    assert!(!res.to_string().contains("alice@example.com"), "{res}");
    let res = finish(spawn_call(
        &cg,
        &agent.dir,
        &bundle,
        &url,
        "echo",
        &format!(r#"{{"text": "deploy with {PLANTED}"}}"#),
    ));
    assert!(res.to_string().contains("[MASKED:github_token]"), "{res}");

    let evs = rsyslog.wait_for("the blocked call and the masked echo", |evs| {
        evs.iter().any(|e| blocked_call(e, "delete_everything"))
            && evs
                .iter()
                .any(|e| masked(e) && e["resources"][0]["name"] == "echo")
            && evs
                .iter()
                .any(|e| masked(e) && e["resources"][0]["name"] == "contact")
    });
    let blocked: Vec<_> = evs
        .iter()
        .filter(|e| blocked_call(e, "delete_everything"))
        .collect();
    assert_eq!(blocked.len(), 1, "one event per blocked call: {blocked:#?}");
    let b = blocked[0];
    assert_eq!(b["action_id"], 2);
    assert_eq!(b["type_uid"], 600399);
    assert_eq!(b["api"]["operation"], "tools/call");
    assert_eq!(b["api"]["service"]["name"], "tools");
    assert_eq!(b["policy"]["uid"], "no-destructive-tools", "{b:#}");
    assert_eq!(b["policy"]["name"], "no-destructive-tools", "{b:#}");
    assert_eq!(
        b["unmapped"]["airlock"]["rules"],
        serde_json::json!(["no-destructive-tools", "mask-secrets"]),
        "the rules that acted, the deciding one first: {b:#}"
    );
    // The caller: the SDK client, run as root by the test, and its real executable.
    assert_eq!(b["actor"]["user"]["uid"], "0");
    assert_eq!(b["actor"]["process"]["user"]["uid"], "0");
    let exe = std::fs::canonicalize(venv_python()).unwrap();
    assert_eq!(
        b["actor"]["process"]["file"]["path"],
        exe.to_str().unwrap(),
        "{b:#}"
    );
    assert!(b["actor"]["process"]["pid"].as_u64().unwrap() > 1);
    let m = evs
        .iter()
        .find(|e| masked(e) && e["resources"][0]["name"] == "echo")
        .unwrap();
    assert_eq!(m["disposition_id"], 1);
    // The security-control profile's 4 Modified (not 99 Other): a SIEM rule on
    // `action_id = 4` sees every masked call.
    assert_eq!(m["action_id"], 4, "{m:#}");
    assert_eq!(m["policy"]["uid"], "mask-secrets", "{m:#}");
    let c = evs
        .iter()
        .find(|e| masked(e) && e["resources"][0]["name"] == "contact")
        .unwrap();
    assert_eq!(c["action_id"], 4, "{c:#}");
    assert_eq!(
        c["policy"]["uid"], "mask-personal-data",
        "the rule that masked: {c:#}"
    );
    assert_eq!(
        c["unmapped"]["airlock"]["rules"],
        serde_json::json!(["mask-personal-data"]),
        "{c:#}"
    );
    assert!(
        m["unmapped"]["airlock"]["masked"]["github_token"]
            .as_u64()
            .unwrap()
            >= 1,
        "{m:#}"
    );
    assert!(
        evs.iter().any(|e| is_class(e, 6002, 3)),
        "the start event: {}",
        rsyslog.raw()
    );
    // RFC 5424 header as rsyslog parsed it.
    let (app, facility, _, msgid, _) = rsyslog
        .events()
        .into_iter()
        .find(|e| blocked_call(&e.4, "delete_everything"))
        .unwrap();
    assert_eq!((app.as_str(), facility.as_str()), ("airlock", "local3"));
    assert_eq!(msgid, "ocsf.6003");

    let status = agent.status();
    assert!(
        status["agent_counters"]["events_syslog_sent"]
            .as_u64()
            .unwrap()
            >= 3
    );
    assert_eq!(status["agent_counters"]["events_syslog_dropped"], 0);
    let table = agent.airlock(&["status"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("events_file_sent"));

    assert!(agent.sigterm().success(), "{}", agent.log());
    let file = json_lines(&agent.dir.join("events.jsonl"));
    assert!(file.iter().any(|e| is_class(e, 6002, 4)), "the stop event");
    assert!(file.iter().any(|e| blocked_call(e, "delete_everything")));
    rsyslog.wait_for("the stop event", |evs| {
        evs.iter().any(|e| is_class(e, 6002, 4))
    });
    for text in [
        rsyslog.raw(),
        std::fs::read_to_string(agent.dir.join("events.jsonl")).unwrap(),
    ] {
        assert!(
            !text.contains(PLANTED),
            "an event carries the planted token"
        );
        assert!(
            !text.contains("\"arguments\""),
            "an event carries arguments"
        );
    }
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(agent.dir.join("events.jsonl"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o007, 0, "the events file is not world-readable");
    validate_ocsf(&file);
    // The archive names the same rules as the events and the client's error.
    let records = archived_records(&agent.archive);
    let request = records
        .iter()
        .find(|r| r["kind"] == "request" && r["tool"] == "delete_everything")
        .expect("the blocked request's record");
    assert_eq!(request["decision"], "block");
    assert_eq!(
        request["rules"],
        serde_json::json!(["no-destructive-tools", "mask-secrets"]),
        "{request:#}"
    );
    let answer = records
        .iter()
        .find(|r| r["kind"] == "response" && r["tool"] == "contact")
        .expect("the masked answer's record");
    assert_eq!(answer["decision"], "mask");
    assert_eq!(answer["rules"], serde_json::json!(["mask-personal-data"]));

    // `airlock verify` finds the archive tampered with (a sealed file deleted): the SIEM gets
    // a Detection Finding from the CLI, through the same sinks.
    let parquet = find_parquet(&agent.archive).expect("a sealed Parquet file");
    std::fs::remove_file(&parquet).unwrap();
    let out = agent.airlock(&["verify"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let found = json_lines(&agent.dir.join("events.jsonl"))
        .into_iter()
        .find(|e| is_class(e, 2004, 1) && e["finding_info"]["types"][0] == "Audit Log Tampering")
        .expect("a verification-failed finding in the events file");
    assert!(
        found["message"]
            .as_str()
            .unwrap()
            .contains(parquet.file_name().unwrap().to_str().unwrap()),
        "{found:#}"
    );
    rsyslog.wait_for("the verification finding", |evs| {
        evs.iter().any(|e| is_class(e, 2004, 1))
    });
    validate_ocsf(&[found]);
    drop(cg);
}

fn find_parquet(dir: &Path) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()? {
        let p = entry.ok()?.path();
        if p.is_dir() {
            if let Some(f) = find_parquet(&p) {
                return Some(f);
            }
        } else if p.extension().is_some_and(|e| e == "parquet") {
            return Some(p);
        }
    }
    None
}

/// Syslog over a Unix datagram socket (`/dev/log` style, rsyslog's imuxsock): the agent's
/// start, a refused connection and the stop arrive with app-name `airlock` and the
/// configured facility.
#[test]
fn lifecycle_events_reach_rsyslog_over_a_unix_socket() {
    if !privileged() {
        return;
    }
    let name = unique("events-unix");
    let cg = TestCgroup::new(&name);
    let dir = std::env::temp_dir().join(format!("{name}-rsyslog"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("log.sock");
    let rsyslog = Rsyslog::start(&dir, None, Some(&socket));
    let backend = Backend::start("tools", "127.0.0.2:0");
    let mut agent = Agent::start(
        &cg,
        &name,
        &backend_toml("tools", backend.port(), &["127.0.0.2"]),
        &format!(
            "[events.syslog]\naddress = \"unix://{}\"\nfacility = \"authpriv\"\n",
            socket.display()
        ),
    );
    rsyslog.wait_for("the start event", |evs| {
        evs.iter().any(|e| is_class(e, 6002, 3))
    });
    // A connection straight to the agent's port, which no redirect made: refused, and told.
    let _ = raw_exchange(format!("127.0.0.1:{}", agent.port).parse().unwrap());
    let evs = rsyslog.wait_for("the refused connection", |evs| {
        evs.iter().any(|e| is_class(e, 4001, 5))
    });
    let refused = evs.iter().find(|e| is_class(e, 4001, 5)).unwrap();
    assert_eq!(refused["disposition_id"], 2);
    assert_eq!(refused["src_endpoint"]["ip"], "127.0.0.1");
    validate_ocsf(&evs);
    assert!(agent.sigterm().success(), "{}", agent.log());
    rsyslog.wait_for("the stop event", |evs| {
        evs.iter().any(|e| is_class(e, 6002, 4))
    });
    for (app, facility, _, _, _) in rsyslog.events() {
        assert_eq!((app.as_str(), facility.as_str()), ("airlock", "authpriv"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Times blocked `tools/call`s, each on a new HTTPS connection through the agent (after an
/// MCP handshake); prints each call's seconds.
const TIMED_CALLS: &str = r#"
import json, ssl, sys, time, urllib.request
url, ca, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.create_default_context(cafile=ca)
H = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
def post(body, extra):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={**H, **extra})
    r = urllib.request.urlopen(req, context=ctx, timeout=30)
    return r, r.read()
r, _ = post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "timed", "version": "1"}}}, {})
sid = r.headers.get("Mcp-Session-Id")
extra = {"MCP-Protocol-Version": "2025-06-18"}
if sid:
    extra["Mcp-Session-Id"] = sid
post({"jsonrpc": "2.0", "method": "notifications/initialized"}, extra)
times = []
for i in range(n):
    t = time.monotonic()
    _, body = post({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call",
                    "params": {"name": "delete_everything", "arguments": {}}}, extra)
    times.append(time.monotonic() - t)
    assert b"-32010" in body, body
print(json.dumps(times))
"#;

/// `n` blocked calls; each one's duration as the client saw it.
fn timed_blocked_calls(
    cg: &TestCgroup,
    dir: &Path,
    bundle: &Path,
    url: &str,
    n: usize,
) -> Vec<f64> {
    let out = with_test_hosts(Some(cg), dir, Path::new(PYTHON))
        .args(["-c", TIMED_CALLS, url])
        .arg(bundle)
        .arg(n.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Sinks that are down (the syslog TCP port closed, the webhook receiver not listening):
/// calls complete as promptly as with no events at all, the syslog queue's drops and the
/// failures are counted, the webhook's events wait in the spool. When rsyslog comes up it
/// receives what was queued; the spool survives an agent restart and is delivered to the
/// HTTPS receiver once it listens.
#[test]
fn sinks_that_are_down_do_not_slow_traffic_and_catch_up() {
    let syslog_port = free_port();
    // The webhook's receiver is a black hole at first: connections are accepted by the
    // kernel and never answered, so every POST waits for its timeout.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_port = blackhole.local_addr().unwrap().port();
    let metrics_port = free_port();
    let top = format!(
        "metrics_listen = \"127.0.0.1:{metrics_port}\"\n[events]\nqueue_capacity = 4\n\
         [events.syslog]\naddress = \"tcp://127.0.0.1:{syslog_port}\"\n\
         [events.webhook]\nurl = \"https://localhost:{hook_port}/ingest\"\nca_file = \"EVENTS_DIR/hook-ca.pem\"\n\
         authorization_file = \"EVENTS_DIR/hook.auth\"\ntimeout_secs = 2\n"
    );
    let Some((cg, mut agent, _server, port, bundle)) = tls_setup_full(
        "events-down",
        "ca_file = \"BACKEND_CA\"",
        &top,
        ("json", 1),
        |agent| {
            receiver_pki(&agent.dir);
            let auth = agent.dir.join("hook.auth");
            std::fs::write(&auth, format!("{HOOK_AUTH}\n")).unwrap();
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
            let cfg = std::fs::read_to_string(&agent.config)
                .unwrap()
                .replace("EVENTS_DIR", agent.dir.to_str().unwrap());
            std::fs::write(&agent.config, cfg).unwrap();
            std::fs::write(agent.dir.join("policies/block.toml"), BLOCK_POLICY).unwrap();
        },
    ) else {
        return;
    };
    let url = format!("https://{HOST}:{port}/mcp");
    // Every call is answered at once: a sink waiting on the black hole (2 s a POST) or
    // retrying the closed port would show in each call's time.
    let times = timed_blocked_calls(&cg, &agent.dir, &bundle, &url, 20);
    assert_eq!(times.len(), 20);
    let slowest = times.iter().cloned().fold(0.0, f64::max);
    assert!(
        slowest < 1.0,
        "a call took {slowest:.3} s with the sinks down: {times:?}"
    );
    // The syslog thread holds one event and retries; its queue of 4 is full: drops counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(&agent, "events_syslog_dropped") == 0 {
        assert!(Instant::now() < deadline, "{}", agent.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(counter(&agent, "events_syslog_failed") > 0);
    assert_eq!(counter(&agent, "events_syslog_sent"), 0);
    assert_eq!(counter(&agent, "events_webhook_sent"), 0);
    while counter(&agent, "events_webhook_failed") == 0 {
        assert!(Instant::now() < deadline, "{}", agent.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The same drops and failures in the metrics.
    let metrics = crate::harness::scrape_metrics(metrics_port);
    let sample = |series: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{series} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no `{series}` sample: {metrics}"))
    };
    assert!(sample("airlock_events_dropped_total{sink=\"syslog\"}") >= 1.0);
    assert!(sample("airlock_events_failed_total{sink=\"syslog\"}") >= 1.0);
    assert!(sample("airlock_events_failed_total{sink=\"webhook\"}") >= 1.0);
    assert_eq!(sample("airlock_events_sent_total{sink=\"webhook\"}"), 0.0);
    assert!(sample("airlock_events_emitted_total") >= 20.0);
    let spooled = counter(&agent, "events_webhook_spooled");
    assert!(
        spooled >= 9,
        "start + 8 blocked calls spooled: {}",
        agent.status()
    );
    let queued = counter(&agent, "events_syslog_queued");
    assert!(queued >= 1, "{}", agent.status());

    // rsyslog comes up: what was queued (and the event in hand) is delivered.
    let rsyslog = Rsyslog::start(&agent.dir, Some(syslog_port), None);
    let evs = rsyslog.wait_for("the queued events", |evs| evs.len() as u64 > queued);
    assert!(evs.iter().any(|e| blocked_call(e, "delete_everything")));

    // The agent restarts with the webhook still down: the spool is kept.
    assert!(agent.sigterm().success(), "{}", agent.log());
    let spool = agent.dir.join("state/events-spool");
    let files = std::fs::read_dir(&spool).unwrap().count() as u64;
    assert!(
        files >= spooled,
        "{files} files in the spool, {spooled} before"
    );
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&spool).unwrap().permissions().mode() & 0o777,
        0o700
    );
    agent.spawn();
    drop(blackhole);
    let received = agent.dir.join("received.jsonl");
    let _receiver = HttpsReceiver::start(&agent.dir, hook_port, &received);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let got = json_lines(&received);
        let blocked = got
            .iter()
            .filter(|e| blocked_call(e, "delete_everything"))
            .count();
        if blocked >= 20 && got.iter().filter(|e| is_class(e, 6002, 4)).count() >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the spool was not delivered: {} events received, status {}",
            got.len(),
            agent.status()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(counter(&agent, "events_webhook_sent") >= 20);
    assert!(
        !agent.log().contains("hec-token"),
        "the webhook's Authorization was logged"
    );
    validate_ocsf(&json_lines(&received));
    assert!(agent.sigterm().success(), "{}", agent.log());
    drop(cg);
}

fn call_event(e: &Value, tool: &str, disposition: u64) -> bool {
    e["class_uid"] == 6003
        && e["disposition_id"] == disposition
        && e["resources"][0]["name"] == tool
}

/// A real run of approvals: a policy reload (Entity Management), a held call (disposition
/// Delayed, from the hook at the start of the hold), its approval (Approved) and a call
/// nobody decides on (Rejected, timed out), each with the caller's attribution.
#[test]
fn approvals_and_policy_reloads_are_events() {
    let Some((cg, agent, _server, port, bundle)) = tls_setup_full(
        "events-approve",
        "ca_file = \"BACKEND_CA\"",
        "[events.file]\npath = \"EVENTS_DIR/events.jsonl\"\n",
        ("json", 1),
        |agent| {
            let cfg = std::fs::read_to_string(&agent.config)
                .unwrap()
                .replace("EVENTS_DIR", agent.dir.to_str().unwrap());
            std::fs::write(&agent.config, cfg).unwrap();
        },
    ) else {
        return;
    };
    let events = agent.dir.join("events.jsonl");
    std::fs::write(agent.dir.join("policies/approve.toml"), APPROVE_POLICY).unwrap();
    wait_file(&events, "policy reload", |evs| {
        evs.iter()
            .any(|e| is_class(e, 3004, 3) && e["status_id"] == 1)
    });
    let url = format!("https://{HOST}:{port}/mcp");

    let client = spawn_call(
        &cg,
        &agent.dir,
        &bundle,
        &url,
        "add",
        r#"{"a": 2, "b": 40}"#,
    );
    let evs = wait_file(&events, "held call", |evs| {
        evs.iter().any(|e| call_event(e, "add", 14))
    });
    let held = evs.iter().find(|e| call_event(e, "add", 14)).unwrap();
    assert_eq!(held["action_id"], 99);
    assert_eq!(held["policy"]["uid"], "approve-add");
    assert_eq!(held["actor"]["user"]["uid"], "0");
    let pending = agent.airlock(&["approvals", "list", "--json"]);
    let pending: Value = serde_json::from_slice(
        String::from_utf8_lossy(&pending.stdout)
            .lines()
            .next()
            .expect("a pending approval")
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(
        held["unmapped"]["airlock"]["approval_id"], pending["id"],
        "{held:#}"
    );
    let out = agent.airlock(&[
        "approvals",
        "approve",
        &pending["id"].as_u64().unwrap().to_string(),
        "--digest",
        pending["digest"].as_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(finish(client)["result"][0], "42");
    wait_file(&events, "approved call", |evs| {
        evs.iter()
            .any(|e| call_event(e, "add", 8) && e["action_id"] == 1)
    });

    let res = finish(spawn_call(
        &cg,
        &agent.dir,
        &bundle,
        &url,
        "echo",
        &format!(r#"{{"text": "{PLANTED}"}}"#),
    ));
    assert_eq!(res["error"]["code"], -32013, "{res}");
    let evs = wait_file(&events, "timed-out call", |evs| {
        evs.iter().any(|e| {
            call_event(e, "echo", 25)
                && e["status_detail"]
                    .as_str()
                    .is_some_and(|s| s.contains("timed out"))
        })
    });
    assert!(evs.iter().any(|e| call_event(e, "echo", 14)), "held first");
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(
        !text.contains(PLANTED),
        "an event carries the planted token"
    );
    validate_ocsf(&evs);
    drop(agent);
    drop(cg);
}

/// A backend changes a pinned tool's definition: a Detection Finding (is_alert) naming the
/// tool and backend, and the refused call as a blocked API Activity.
#[test]
fn a_changed_tool_definition_is_a_detection_finding() {
    let Some((cg, agent, server, port, bundle)) = tls_setup_full(
        "events-pins",
        "ca_file = \"BACKEND_CA\"",
        "tool_changes = \"block\"\n[events.file]\npath = \"EVENTS_DIR/events.jsonl\"\n",
        ("json", 1),
        |agent| {
            let cfg = std::fs::read_to_string(&agent.config)
                .unwrap()
                .replace("EVENTS_DIR", agent.dir.to_str().unwrap());
            std::fs::write(&agent.config, cfg).unwrap();
        },
    ) else {
        return;
    };
    let dir = agent.dir.clone();
    let url = format!("https://{HOST}:{port}/mcp");
    let first = finish(spawn_call(
        &cg,
        &dir,
        &bundle,
        &url,
        "echo",
        r#"{"text": "hi"}"#,
    ));
    assert_eq!(first["result"][0], "hi", "{first}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(dir.join("state/tool-pins.json"))
        .unwrap_or_default()
        .contains("echo")
    {
        assert!(Instant::now() < deadline, "tool pins not saved");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(server);
    let _server = PeerServer::start_variant(&dir, port, "json", true, 2);
    let changed = finish(spawn_call(
        &cg,
        &dir,
        &bundle,
        &url,
        "echo",
        r#"{"text": "hi"}"#,
    ));
    assert_eq!(changed["error"]["code"], -32010, "{changed}");
    let evs = wait_file(
        &dir.join("events.jsonl"),
        "the finding and the blocked call",
        |evs| {
            evs.iter().any(|e| is_class(e, 2004, 1)) && evs.iter().any(|e| blocked_call(e, "echo"))
        },
    );
    let f = evs.iter().find(|e| is_class(e, 2004, 1)).unwrap();
    // The refusal is Airlock's own, not the shipped mask rules' (which match every call).
    let refused = evs.iter().find(|e| blocked_call(e, "echo")).unwrap();
    assert_eq!(
        refused["policy"]["uid"], "airlock:tool_changed",
        "{refused:#}"
    );
    assert_eq!(f["is_alert"], true);
    assert_eq!(f["resources"][0]["name"], "echo");
    assert_eq!(f["resources"][0]["group"]["name"], "tools");
    assert_eq!(f["finding_info"]["types"][0], "MCP Tool Definition Change");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("airlock tools accept tools echo")
    );
    validate_ocsf(&evs);
    drop(agent);
    drop(cg);
}

/// Syslog over UDP (rsyslog's imudp): one datagram per event.
#[test]
fn lifecycle_events_reach_rsyslog_over_udp() {
    if !privileged() {
        return;
    }
    let name = unique("events-udp");
    let cg = TestCgroup::new(&name);
    let dir = std::env::temp_dir().join(format!("{name}-rsyslog"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let rsyslog = Rsyslog::start_with(&dir, None, Some(port), None);
    std::thread::sleep(Duration::from_millis(300));
    let backend = Backend::start("tools", "127.0.0.2:0");
    let mut agent = Agent::start(
        &cg,
        &name,
        &backend_toml("tools", backend.port(), &["127.0.0.2"]),
        &format!("[events.syslog]\naddress = \"udp://127.0.0.1:{port}\"\n"),
    );
    rsyslog.wait_for("the start event", |evs| {
        evs.iter().any(|e| is_class(e, 6002, 3))
    });
    assert!(agent.sigterm().success(), "{}", agent.log());
    let evs = rsyslog.wait_for("the stop event", |evs| {
        evs.iter().any(|e| is_class(e, 6002, 4))
    });
    validate_ocsf(&evs);
    for (app, facility, _, msgid, _) in rsyslog.events() {
        assert_eq!((app.as_str(), facility.as_str()), ("airlock", "local0"));
        assert!(msgid.starts_with("ocsf."), "{msgid}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
