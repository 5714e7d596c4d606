//! `[ship]` end to end: a running agent archives real traffic and ships it to real
//! S3-compatible servers (PyPI `localbucket`, `nanio`); `airlock status` shows the backlog.

#[path = "../support/s3.rs"]
mod s3;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use s3::{S3Server, files_under, free_port};
use serde_json::Value;

use crate::harness::*;

const BUCKET: &str = "fleet";

fn credentials(dir: &Path, secret: &str) -> PathBuf {
    let path = dir.join("ship.cred");
    std::fs::write(
        &path,
        format!("access_key_id = \"airlock\"\nsecret_access_key = \"{secret}\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn ship_toml(host: &str, server: &S3Server, cred: &Path) -> String {
    format!(
        "flush_interval_secs = 1\nhost = \"{host}\"\n\n[ship]\nurl = \"s3://{BUCKET}\"\nendpoint = \"{}\"\nallow_http = true\ncredentials_file = \"{}\"\nretry_secs = 1\ntimeout_secs = 3\n",
        server.endpoint(),
        cred.display()
    )
}

/// Poll `airlock status --json` until `cond` holds for its `ship` section.
fn wait_for_ship(agent: &Agent, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ship = agent.status()["ship"].clone();
        if cond(&ship) {
            return ship;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {ship}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_agent_ships_its_archive_byte_identical() {
    if !privileged() {
        return;
    }
    let dir = scratch("ship-s3");
    let server = S3Server::localbucket(&dir.join("s3"), free_port(), BUCKET);
    let cred = credentials(&dir, "anything");
    let Some(Scenario {
        mut agent,
        backend,
        cg,
        ..
    }) = Scenario::start("ship", &ship_toml("fleet-host-1", &server, &cred))
    else {
        return;
    };
    for _ in 0..3 {
        let res = run_client(&cg, "127.0.0.2", backend.port(), &ClientOpts::default());
        assert!(res.expect_response().starts_with("tools saw "));
    }
    let ship = wait_for_ship(&agent, "a shipped file", |s| {
        s["files_shipped"].as_u64() >= Some(1) && s["lines_pending"].as_u64() == Some(0)
    });
    assert_eq!(ship["url"], "s3://fleet");
    assert_eq!(ship["conflicts"], 0);
    let text = agent.airlock(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("shipping to s3://fleet:"), "{text}");
    // What was flushed at shutdown is shipped too.
    assert!(agent.sigterm().success(), "{}", agent.log());

    let local: Vec<String> = files_under(&agent.archive)
        .into_iter()
        .filter(|f| f.ends_with(".parquet"))
        .collect();
    assert!(!local.is_empty());
    let bucket = server.data.join(BUCKET).join("host=fleet-host-1");
    for rel in &local {
        assert_eq!(
            std::fs::read(agent.archive.join(rel)).unwrap(),
            std::fs::read(bucket.join(rel))
                .unwrap_or_else(|e| panic!("{rel} not in the bucket: {e}\n{}", agent.log())),
            "{rel}"
        );
    }
    let manifest = std::fs::read(agent.archive.join("_manifest/fleet-host-1.jsonl")).unwrap();
    let lines: Vec<u8> = files_under(&bucket.join("_manifest"))
        .into_iter()
        .filter(|f| f.ends_with(".json"))
        .flat_map(|f| std::fs::read(bucket.join("_manifest").join(f)).unwrap())
        .collect();
    assert_eq!(
        lines, manifest,
        "the manifest line objects are the manifest"
    );
    // The bucket verifies with the host's key (fleet copy = the synced directory).
    let key =
        airlock::archive::manifest::public_key_of(&agent.dir.join("state/archive-signing.key"))
            .unwrap();
    let out = agent.airlock(&[
        "verify",
        "--fleet",
        server.data.join(BUCKET).to_str().unwrap(),
        "--pubkey",
        &format!("fleet-host-1={key}"),
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn refused_credentials_show_in_status_and_the_backlog_ships_once_fixed() {
    if !privileged() {
        return;
    }
    let dir = scratch("ship-nanio");
    let server = S3Server::nanio(&dir.join("s3"), free_port(), BUCKET, "airlock", "right");
    let cred = credentials(&dir, "wrong");
    let metrics_port = free_port();
    let config = format!(
        "metrics_listen = \"127.0.0.1:{metrics_port}\"\n{}",
        ship_toml("fleet-host-2", &server, &cred)
    );
    let Some(Scenario {
        mut agent,
        backend,
        cg,
        ..
    }) = Scenario::start("ship-auth", &config)
    else {
        return;
    };
    let res = run_client(&cg, "127.0.0.2", backend.port(), &ClientOpts::default());
    assert!(res.expect_response().starts_with("tools saw "));
    let ship = wait_for_ship(&agent, "a refused upload with a backlog", |s| {
        s["uploads_failed"].as_u64() >= Some(1) && s["files_pending"].as_u64() >= Some(1)
    });
    assert!(ship["bytes_pending"].as_u64() > Some(0), "{ship}");
    assert!(ship["oldest_pending_age_secs"].is_u64(), "{ship}");
    assert_eq!(ship["lines_shipped"], 0, "{ship}");
    let error = ship["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("403"), "{error}");
    assert!(!error.contains("wrong"), "no secret in the status: {error}");
    let text = agent.airlock(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("last error"), "{text}");
    assert!(files_under(&server.data.join(BUCKET)).is_empty());
    // The same backlog and failures in the metrics.
    let metrics = crate::harness::scrape_metrics(metrics_port);
    let sample = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no `{name}` sample: {metrics}"))
    };
    assert!(sample("airlock_ship_failures_total") >= 1.0, "{metrics}");
    assert!(sample("airlock_ship_backlog_files") >= 1.0, "{metrics}");
    assert!(sample("airlock_ship_backlog_lines") >= 1.0, "{metrics}");
    assert!(sample("airlock_ship_backlog_bytes") > 0.0, "{metrics}");
    assert_eq!(sample("airlock_ship_conflicts_total"), 0.0, "{metrics}");

    // Fixed credentials, agent restarted: nanio checks the signature and takes the backlog.
    assert!(agent.sigterm().success(), "{}", agent.log());
    credentials(&dir, "right");
    agent.spawn();
    let ship = wait_for_ship(&agent, "the backlog shipped", |s| {
        s["lines_pending"].as_u64() == Some(0) && s["lines_shipped"].as_u64() >= Some(1)
    });
    assert_eq!(ship["uploads_failed"], 0, "{ship}");
    let local: Vec<String> = files_under(&agent.archive)
        .into_iter()
        .filter(|f| f.ends_with(".parquet"))
        .collect();
    for rel in &local {
        assert_eq!(
            std::fs::read(agent.archive.join(rel)).unwrap(),
            std::fs::read(server.data.join(BUCKET).join("host=fleet-host-2").join(rel)).unwrap(),
        );
    }
    assert!(agent.sigterm().success(), "{}", agent.log());
}

/// Records dated `days_ago`, as one published file of `host` in the agent's archive (written
/// before the agent starts, with the agent's signing key).
fn old_file(agent: &Agent, host: &str, days_ago: u64) -> String {
    use airlock::{
        archive::{ArchiveWriter, RecordInput, WriterConfig},
        policy::{Direction, HashKey, Message, PolicySet, Subject},
    };
    std::fs::create_dir_all(agent.dir.join("state")).unwrap();
    let mut writer = ArchiveWriter::open(WriterConfig {
        archive_dir: agent.archive.clone(),
        signing_key: agent.dir.join("state/archive-signing.key"),
        host: host.into(),
        group: None,
        max_rows: 1000,
        max_segment_bytes: airlock::archive::writer::MAX_SEGMENT_BYTES,
    })
    .unwrap()
    .0;
    let policies = PolicySet::parse(&[], HashKey([0; 32])).unwrap();
    let msg = Message {
        backend: "tools",
        direction: Direction::ServerToClient,
        method: Some("tools/call"),
        tool: Some("read"),
        arguments: None,
        is_call: false,
        scope_unknown: false,
    };
    let decision = policies.decide(&Subject::default(), &msg);
    let then = std::time::SystemTime::now() - Duration::from_secs(days_ago * 86_400);
    let ts_us = then
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    for seq in 1..=3 {
        let (payload, _) = policies.mask_payload(&decision, serde_json::json!({ "n": seq }));
        writer
            .append(RecordInput {
                ts_us,
                host: host.into(),
                session_id: "old".into(),
                seq,
                direction: "server_to_client".into(),
                kind: "response".into(),
                payload: Some(payload),
                decision: "allow".into(),
                ..Default::default()
            })
            .unwrap();
    }
    writer.sync().unwrap();
    let path = writer.roll().unwrap().expect("a file");
    path.strip_prefix(&agent.archive)
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn retention_keeps_what_is_not_shipped() {
    if !privileged() {
        return;
    }
    let dir = scratch("ship-retention");
    let server = S3Server::nanio(&dir.join("s3"), free_port(), BUCKET, "airlock", "right");
    let cred = credentials(&dir, "wrong");
    let name = unique("ship-retention");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "127.0.0.2:0");
    let mut agent = Agent::prepare(
        &cg,
        &name,
        &backend_toml("tools", backend.port(), &["127.0.0.2"]),
        &format!(
            "retention_days = 30\n{}",
            ship_toml("fleet-host-3", &server, &cred)
        ),
        None,
    );
    let old = old_file(&agent, "fleet-host-3", 400);
    assert!(old.starts_with("date="), "{old}");

    // Past retention but not shipped (the bucket refuses the credentials): kept.
    agent.spawn();
    wait_for_ship(&agent, "a refused upload", |s| {
        s["uploads_failed"].as_u64() >= Some(1) && s["files_pending"].as_u64() == Some(1)
    });
    assert!(
        agent.archive.join(&old).exists(),
        "retention deleted an unshipped file\n{}",
        agent.log()
    );
    assert!(agent.sigterm().success(), "{}", agent.log());

    // Shipped: the next retention pass may delete it locally; the bucket keeps it.
    credentials(&dir, "right");
    agent.spawn();
    wait_for_ship(&agent, "the old file shipped", |s| {
        s["files_shipped"].as_u64() == Some(1) && s["lines_pending"].as_u64() == Some(0)
    });
    assert!(agent.archive.join(&old).exists());
    assert!(agent.sigterm().success(), "{}", agent.log());
    let shipped = server
        .data
        .join(BUCKET)
        .join("host=fleet-host-3")
        .join(&old);
    let bytes = std::fs::read(agent.archive.join(&old)).unwrap();
    agent.spawn();
    assert!(
        !agent.archive.join(&old).exists(),
        "a shipped file past retention stays\n{}",
        agent.log()
    );
    assert_eq!(std::fs::read(&shipped).unwrap(), bytes);
    // The retention line goes to the bucket too.
    wait_for_ship(&agent, "the retention line shipped", |s| {
        s["lines_pending"].as_u64() == Some(0) && s["lines_shipped"].as_u64() >= Some(2)
    });
    assert!(agent.sigterm().success(), "{}", agent.log());
}

/// A bucket endpoint whose address is also an intercepted backend: the shipper dials it from
/// a socket tagged as the agent's own (the agent runs inside the test cgroup, so an untagged
/// socket would be redirected into the agent itself).
#[test]
fn the_shipper_dials_the_bucket_as_the_agents_own_socket() {
    if !privileged() {
        return;
    }
    let dir = scratch("ship-own");
    let server = S3Server::localbucket(&dir.join("s3"), free_port(), BUCKET);
    let cred = credentials(&dir, "anything");
    let name = unique("ship-own");
    let cg = TestCgroup::new(&name);
    let backend = Backend::start("tools", "127.0.0.2:0");
    let agent = Agent::start(
        &cg,
        &name,
        &format!(
            "{}\n{}",
            backend_toml("tools", backend.port(), &["127.0.0.2"]),
            backend_toml("bucket", server.port, &["127.0.0.1"])
        ),
        &ship_toml("fleet-host-4", &server, &cred),
    );
    // One call (one redirected connection), archived into a file the shipper then uploads
    // while the redirect is in place.
    let res = run_client(&cg, "127.0.0.2", backend.port(), &ClientOpts::default());
    assert!(res.expect_response().starts_with("tools saw "));
    wait_for_ship(&agent, "a file shipped", |s| {
        s["files_shipped"].as_u64() >= Some(1) && s["lines_pending"].as_u64() == Some(0)
    });
    assert_eq!(
        agent.kernel_counter("redirect_ipv4"),
        1,
        "only the client's connection is redirected, not the uploads\n{}",
        agent.log()
    );
    // The agent's upstream connection and at least the file's and its line's uploads.
    assert!(agent.kernel_counter("skip_own") >= 3, "{}", agent.log());
}

/// A bucket behind a private CA (nanio behind nginx terminating TLS): the agent ships to it
/// once `[ship] ca_file` names the CA, dialling from its own sockets.
#[test]
fn the_agent_ships_to_a_bucket_behind_a_private_ca() {
    if !privileged() {
        return;
    }
    let dir = scratch("ship-private-ca");
    let server = S3Server::nanio(&dir.join("s3"), free_port(), BUCKET, "airlock", "right");
    let front = s3::TlsFront::start(&dir.join("nginx"), server.port);
    let cred = credentials(&dir, "right");
    let config = format!(
        "flush_interval_secs = 1\nhost = \"fleet-host-5\"\n\n[ship]\nurl = \"s3://{BUCKET}\"\nendpoint = \"{}\"\ncredentials_file = \"{}\"\nca_file = \"{}\"\nretry_secs = 1\ntimeout_secs = 3\n",
        front.endpoint(),
        cred.display(),
        front.ca.display()
    );
    let Some(Scenario {
        mut agent,
        backend,
        cg,
        ..
    }) = Scenario::start("ship-ca", &config)
    else {
        return;
    };
    let res = run_client(&cg, "127.0.0.2", backend.port(), &ClientOpts::default());
    assert!(res.expect_response().starts_with("tools saw "));
    let ship = wait_for_ship(&agent, "a file shipped over TLS", |s| {
        s["files_shipped"].as_u64() >= Some(1) && s["lines_pending"].as_u64() == Some(0)
    });
    assert_eq!(ship["uploads_failed"], 0, "{ship}\n{}", agent.log());
    assert!(agent.sigterm().success(), "{}", agent.log());
    let local: Vec<String> = files_under(&agent.archive)
        .into_iter()
        .filter(|f| f.ends_with(".parquet"))
        .collect();
    assert!(!local.is_empty());
    for rel in &local {
        assert_eq!(
            std::fs::read(agent.archive.join(rel)).unwrap(),
            std::fs::read(server.data.join(BUCKET).join("host=fleet-host-5").join(rel))
                .unwrap_or_else(|e| panic!("{rel} not in the bucket: {e}\n{}", agent.log())),
        );
    }
}
