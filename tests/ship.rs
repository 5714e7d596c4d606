//! Shipping archives to real S3-compatible servers started by the tests (PyPI `localbucket`,
//! which enforces create-only writes, and `nanio`, which checks SigV4 signatures), through
//! the library: archives written by [`ArchiveWriter`], shipped by the shipper thread, queried
//! across two hosts with the real DuckDB (1.5.5 + the httpfs wheel), verified with
//! `airlock verify --fleet`. The agent end to end is in `tests/privileged/ship.rs`.

/// Retention against the bucket, hosts that vanish, stale shipping state.
#[path = "ship/fleet_checks.rs"]
mod fleet_checks;
/// `verify --fleet` on modified, missing and malformed manifest line objects.
#[path = "ship/line_objects.rs"]
mod line_objects;
/// What the shipper and the command line log: alarms at ERROR, no library INFO lines.
#[path = "ship/logs.rs"]
mod logs;
/// A bucket behind a private CA: `[ship] ca_file`, `verify --fleet --ca-file`.
#[path = "ship/private_ca.rs"]
mod private_ca;
#[path = "support/s3.rs"]
mod s3;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use airlock::{
    archive::{ArchiveWriter, RecordInput, WriterConfig, manifest::public_key_of},
    config::Config,
    policy::{Direction, HashKey, Message, PolicySet, Subject},
    ship::{Prepared, ShipStats, Shipper},
};
use logs::{capture_log, log_lines};
use s3::{S3Server, files_under, free_port};
use serde_json::json;

const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");
const BUCKET: &str = "fleet";

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "airlock-ship-{}-{name}-{}",
        std::process::id(),
        free_port()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// One host: its archive (written here) and the configuration of its shipper.
struct Host {
    name: String,
    dir: PathBuf,
    writer: ArchiveWriter,
    seq: u64,
}

impl Host {
    fn new(dir: &Path, name: &str) -> Host {
        std::fs::create_dir_all(dir.join("state")).unwrap();
        let writer = ArchiveWriter::open(WriterConfig {
            archive_dir: dir.join("archive"),
            signing_key: dir.join("state/archive-signing.key"),
            host: name.into(),
            group: None,
            max_rows: 100_000,
            max_segment_bytes: airlock::archive::writer::MAX_SEGMENT_BYTES,
        })
        .expect("open the archive")
        .0;
        Host {
            name: name.into(),
            dir: dir.to_owned(),
            writer,
            seq: 0,
        }
    }

    /// `rows` records, sealed into one Parquet file and its manifest line.
    fn add_file(&mut self, rows: u64) {
        for _ in 0..rows {
            self.seq += 1;
            self.writer.append(record(&self.name, self.seq)).unwrap();
        }
        self.writer.sync().unwrap();
        self.writer.roll().unwrap().expect("a file was written");
    }

    fn archive(&self) -> PathBuf {
        self.dir.join("archive")
    }

    fn public_key(&self) -> String {
        public_key_of(&self.dir.join("state/archive-signing.key")).unwrap()
    }

    /// A configuration shipping to `endpoint` with these credentials (written 0600).
    fn config(&self, endpoint: &str, access_key: &str, secret: &str) -> Config {
        self.config_with(endpoint, access_key, secret, "")
    }

    /// The same, with more `[ship]` keys.
    fn config_with(&self, endpoint: &str, access_key: &str, secret: &str, more: &str) -> Config {
        let cred = self.dir.join("ship.cred");
        std::fs::write(
            &cred,
            format!("access_key_id = \"{access_key}\"\nsecret_access_key = \"{secret}\"\n"),
        )
        .unwrap();
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "state_dir = \"{d}/state\"\narchive_dir = \"{d}/archive\"\nhost = \"{h}\"\n\
             [[backend]]\nname = \"tools\"\nhost = \"127.0.0.2\"\nport = 8443\n\
             [ship]\nurl = \"s3://{BUCKET}\"\nendpoint = \"{endpoint}\"\nallow_http = true\n\
             credentials_file = \"{cred}\"\nretry_secs = 2\ntimeout_secs = 5\n{more}\n",
            d = self.dir.display(),
            h = self.name,
            cred = cred.display(),
        );
        Config::parse(&self.dir.join("airlock.toml"), &text).expect("valid configuration")
    }

    /// Start a shipper for `config`; returns it and the notifier the publish thread would use.
    fn ship(&self, config: &Config) -> (Shipper, Arc<tokio::sync::Notify>) {
        let prepared = Prepared::new(config, config.ship.as_ref().unwrap()).expect("prepare");
        let published = Arc::new(tokio::sync::Notify::new());
        (
            prepared.start(self.name.clone(), published.clone()),
            published,
        )
    }

    /// Local files (relative) and the manifest.
    fn local_parquet(&self) -> Vec<String> {
        files_under(&self.archive())
            .into_iter()
            .filter(|f| f.ends_with(".parquet"))
            .collect()
    }
}

fn record(host: &str, seq: u64) -> RecordInput {
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
    let (payload, _) = policies.mask_payload(&decision, json!({ "n": seq, "host": host }));
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    RecordInput {
        ts_us: now_us,
        host: host.into(),
        session_id: format!("{host}-s"),
        seq,
        direction: "server_to_client".into(),
        kind: "response".into(),
        method: Some("tools/call".into()),
        tool: Some("read".into()),
        payload: Some(payload),
        decision: "allow".into(),
        ..Default::default()
    }
}

fn wait_until(what: &str, stats: &ShipStats, cond: impl Fn(&ShipStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond(stats) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            stats.snapshot("test")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finish(shipper: &Shipper) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(shipper.finish(Duration::from_secs(10)));
}

fn lines_of(host: &Host) -> u64 {
    std::fs::read_to_string(
        host.archive()
            .join(format!("_manifest/{}.jsonl", host.name)),
    )
    .unwrap()
    .lines()
    .count() as u64
}

/// The host's files, manifest lines and key are in the bucket, byte for byte.
fn assert_identical(host: &Host, server: &S3Server) {
    let bucket = server.data.join(BUCKET);
    let local = host.local_parquet();
    assert!(!local.is_empty());
    for rel in &local {
        let shipped = bucket.join(format!("host={}/{rel}", host.name));
        assert_eq!(
            std::fs::read(host.archive().join(rel)).unwrap(),
            std::fs::read(&shipped)
                .unwrap_or_else(|e| panic!("{} not shipped: {e}", shipped.display())),
            "{rel} differs in the bucket"
        );
    }
    let manifest_dir = bucket.join(format!("host={}/_manifest", host.name));
    let mut lines: Vec<String> = files_under(&manifest_dir)
        .into_iter()
        .filter(|f| f.ends_with(".json"))
        .collect();
    lines.sort();
    let joined: Vec<u8> = lines
        .iter()
        .flat_map(|l| std::fs::read(manifest_dir.join(l)).unwrap())
        .collect();
    assert_eq!(
        joined,
        std::fs::read(
            host.archive()
                .join(format!("_manifest/{}.jsonl", host.name))
        )
        .unwrap(),
        "the manifest line objects, in order, are not the local manifest"
    );
    assert_eq!(
        std::fs::read(manifest_dir.join(format!("{}.pub", host.name))).unwrap(),
        std::fs::read(host.archive().join(format!("_manifest/{}.pub", host.name))).unwrap()
    );
}

#[test]
fn files_and_manifest_lines_ship_byte_identical_and_are_never_overwritten() {
    capture_log();
    let dir = tempdir("localbucket");
    let server = S3Server::localbucket(&dir.join("s3"), free_port(), BUCKET);
    let mut host = Host::new(&dir.join("runner-1"), "runner-1");
    for rows in [3, 5, 2] {
        host.add_file(rows);
    }
    let config = host.config(&server.endpoint(), "any", "thing");
    let (shipper, _) = host.ship(&config);
    let stats = shipper.stats.clone();
    wait_until("three lines shipped", &stats, |s| {
        s.lines_shipped.load(Ordering::Relaxed) == 3
    });
    assert_identical(&host, &server);
    let first = shipper.status();
    assert_eq!(first.files_shipped, 3);
    assert_eq!(first.lines_pending, 0);
    assert_eq!(first.conflicts, 0);
    assert_eq!(first.uploads_ok, 3 + 3 + 1, "{first:?}");
    finish(&shipper);

    // Lost state (a crash before it was saved): every write meets an existing object, which
    // localbucket refuses (412, create-only); identical, each counts as shipped.
    std::fs::remove_file(host.dir.join("state/ship-state.json")).unwrap();
    let before = files_under(&server.data.join(BUCKET));
    let (again, _) = host.ship(&config);
    wait_until("the three lines recognised", &again.stats, |s| {
        s.lines_shipped.load(Ordering::Relaxed) == 3
    });
    let second = again.status();
    assert_eq!(second.uploads_ok, 0, "nothing new written: {second:?}");
    assert_eq!(second.already_present, 7, "{second:?}");
    assert_eq!(second.conflicts, 0);
    assert_eq!(files_under(&server.data.join(BUCKET)), before);
    assert_identical(&host, &server);

    // A different object where the next line goes (another host under the same name, or
    // someone else): an alarm; the object is not overwritten and shipping stops there.
    host.add_file(4);
    let key = format!("host=runner-1/_manifest/{:012}.json", 4);
    let planted = b"{\"not\":\"this host's line\"}\n";
    std::fs::write(server.object(BUCKET, &key), planted).unwrap();
    let (third, published) = {
        finish(&again);
        host.ship(&config)
    };
    published.notify_one();
    wait_until("the conflict", &third.stats, |s| {
        s.conflicts.load(Ordering::Relaxed) >= 1
    });
    let status = third.status();
    assert_eq!(status.lines_shipped, 3, "{status:?}");
    assert_eq!(status.lines_pending, 1, "{status:?}");
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.contains("ALARM") && error.contains(&key),
        "the alarm names the object: {error}"
    );
    assert_eq!(std::fs::read(server.object(BUCKET, &key)).unwrap(), planted);
    finish(&third);
    // Possible tampering is an alarm: logged at ERROR, every time, never as a passing WARN.
    let alarms = log_lines(&format!("s3://{BUCKET}/{key}"));
    assert!(!alarms.is_empty(), "the alarm is logged");
    for line in &alarms {
        assert!(
            line.contains(" ERROR ") && line.contains("ALARM"),
            "an alarm logged below ERROR: {line}"
        );
    }
}

#[test]
fn wrong_credentials_leave_a_visible_backlog_that_retention_keeps_then_ships() {
    let dir = tempdir("nanio");
    let server = S3Server::nanio(
        &dir.join("s3"),
        free_port(),
        BUCKET,
        "airlock",
        "right-secret",
    );
    let mut host = Host::new(&dir.join("runner-2"), "runner-2");
    host.add_file(3);
    host.add_file(2);

    let wrong = host.config(&server.endpoint(), "airlock", "wrong-secret");
    let (shipper, _) = host.ship(&wrong);
    wait_until("a refused upload", &shipper.stats, |s| {
        s.uploads_failed.load(Ordering::Relaxed) >= 1
    });
    let status = shipper.status();
    assert_eq!(status.lines_shipped, 0);
    assert_eq!(status.lines_pending, 2, "{status:?}");
    assert_eq!(status.files_pending, 2, "{status:?}");
    assert!(status.bytes_pending > 0, "{status:?}");
    assert!(status.oldest_pending_age_secs.is_some(), "{status:?}");
    let error = status.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("403") || error.to_lowercase().contains("signature"),
        "the server's refusal is reported: {error}"
    );
    assert!(
        !error.contains("wrong-secret"),
        "no secret in errors: {error}"
    );
    // The server's answer body is not passed on: its status and code, short (an AWS
    // signature error's body echoes the signed request, security token included).
    assert!(
        error.len() <= 512 && error.contains("SignatureDoesNotMatch") && !error.contains('<'),
        "the error is bounded and carries no answer body: {error}"
    );
    assert!(files_under(&server.data.join(BUCKET)).is_empty());

    // Retention far in the future: nothing unshipped goes.
    host.writer
        .hold_retention(shipper.stats.lines_shipped.clone());
    let today = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400) as i64;
    let removed = host.writer.apply_retention(1, today + 30).unwrap();
    assert!(removed.is_empty(), "unshipped files deleted: {removed:?}");
    assert_eq!(host.local_parquet().len(), 2);
    finish(&shipper);

    // The right secret: nanio checks the signature and takes the files.
    let right = host.config(&server.endpoint(), "airlock", "right-secret");
    let (shipper, _) = host.ship(&right);
    wait_until("both lines shipped", &shipper.stats, |s| {
        s.lines_shipped.load(Ordering::Relaxed) == 2
    });
    assert_identical(&host, &server);
    assert_eq!(shipper.status().uploads_failed, 0);
    // Shipped, they may go now.
    host.writer
        .hold_retention(shipper.stats.lines_shipped.clone());
    let removed = host.writer.apply_retention(1, today + 30).unwrap();
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(host.local_parquet().is_empty());
    finish(&shipper);
}

#[test]
fn a_bucket_that_is_down_grows_the_backlog_and_loses_nothing() {
    let dir = tempdir("down");
    let port = free_port();
    let mut host = Host::new(&dir.join("runner-3"), "runner-3");
    host.add_file(2);
    let config = host.config(&format!("http://127.0.0.1:{port}"), "k", "s");
    let (shipper, published) = host.ship(&config);
    wait_until("a failed upload", &shipper.stats, |s| {
        s.uploads_failed.load(Ordering::Relaxed) >= 1
    });
    assert!(
        shipper
            .status()
            .last_error
            .unwrap_or_default()
            .contains(&format!("127.0.0.1:{port}")),
        "{:?}",
        shipper.status()
    );
    host.add_file(3);
    published.notify_one();
    wait_until("two lines pending", &shipper.stats, |s| {
        s.lines_pending.load(Ordering::Relaxed) == 2
    });
    assert_eq!(shipper.status().lines_shipped, 0);

    let server = S3Server::localbucket(&dir.join("s3"), port, BUCKET);
    wait_until("the backlog shipped", &shipper.stats, |s| {
        s.lines_shipped.load(Ordering::Relaxed) == lines_of(&host)
    });
    assert_eq!(shipper.status().lines_pending, 0);
    assert_eq!(shipper.status().oldest_pending_age_secs, None);
    assert_identical(&host, &server);
    finish(&shipper);
}

/// Run SQL in DuckDB 1.5.5 with httpfs against the bucket; rows as JSON arrays.
fn duckdb_s3(port: u16, sql: &str) -> Vec<serde_json::Value> {
    let script = r#"
import duckdb, json, os, sys, duckdb_extension_httpfs
ext = os.path.join(os.path.dirname(duckdb_extension_httpfs.__file__), "extensions", "v1.5.5", "httpfs.duckdb_extension")
con = duckdb.connect()
con.execute(f"INSTALL '{ext}'")
con.execute("LOAD httpfs")
con.execute(f"CREATE SECRET fleet (TYPE s3, KEY_ID 'analyst', SECRET 'analyst', REGION 'us-east-1', ENDPOINT '127.0.0.1:{sys.argv[1]}', URL_STYLE 'path', USE_SSL false)")
for row in con.execute(sys.argv[2]).fetchall():
    print(json.dumps([c if isinstance(c, (int, float, str, type(None))) else str(c) for c in row]))
"#;
    let out = Command::new(s3::venv().join("bin/python"))
        .args(["-c", script, &port.to_string(), sql])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "duckdb failed on {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `select` statements of ARCHIVE.md's "Fleet queries" block (set-up statements left out:
/// the test makes its own secret).
fn documented_fleet_queries() -> Vec<String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../ARCHIVE.md")).unwrap();
    let section = doc
        .split("### Fleet queries")
        .nth(1)
        .expect("ARCHIVE.md has a Fleet queries section");
    let block = section
        .split("```sql\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("an SQL block");
    block
        .split(';')
        .map(|stmt| {
            stmt.lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|s| s.trim_start().starts_with("select"))
        .collect()
}

fn verify(args: &[&str]) -> (i32, String) {
    let out = Command::new(AIRLOCK)
        .args(["--config", "/nonexistent/airlock.toml", "verify"])
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn two_hosts_in_one_bucket_one_duckdb_glob_and_verify_names_what_is_missing() {
    let dir = tempdir("fleet");
    let server = S3Server::localbucket(&dir.join("s3"), free_port(), BUCKET);
    let mut a = Host::new(&dir.join("runner-a"), "runner-a");
    let mut b = Host::new(&dir.join("runner-b"), "runner-b");
    a.add_file(4);
    a.add_file(3);
    b.add_file(5);
    b.add_file(6);
    for host in [&a, &b] {
        let config = host.config(&server.endpoint(), "k", "s");
        let (shipper, _) = host.ship(&config);
        wait_until("shipped", &shipper.stats, |s| {
            s.lines_shipped.load(Ordering::Relaxed) == 2
        });
        finish(&shipper);
        assert_identical(host, &server);
    }

    // The analyst's one glob over the whole fleet (ARCHIVE.md, "Fleet queries").
    let rows = duckdb_s3(
        server.port,
        &format!(
            "select host, count(*) as records, count(distinct date) as days \
             from read_parquet('s3://{BUCKET}/**/*.parquet', hive_partitioning=true) \
             group by host order by host"
        ),
    );
    assert_eq!(
        rows,
        vec![json!(["runner-a", 7, 1]), json!(["runner-b", 11, 1])],
        "one glob reads both hosts"
    );
    let one = duckdb_s3(
        server.port,
        &format!(
            "select count(*) from read_parquet('s3://{BUCKET}/host=runner-b/**/*.parquet', hive_partitioning=true)"
        ),
    );
    assert_eq!(one, vec![json!([11])]);
    // The fleet queries ARCHIVE.md gives, on this bucket.
    let today = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()[..10]
        .to_owned();
    let answers: Vec<Vec<serde_json::Value>> = documented_fleet_queries()
        .iter()
        .map(|sql| {
            let sql = sql
                .replace("s3://airlock-archive/prod", &format!("s3://{BUCKET}"))
                .replace("host=runner-7", "host=runner-a")
                .replace("'2026-11-21'", &format!("'{today}'"));
            duckdb_s3(server.port, &sql)
        })
        .collect();
    assert_eq!(answers.len(), 3, "three fleet queries documented");
    assert_eq!(
        answers[0],
        vec![
            json!(["runner-a", today, 7]),
            json!(["runner-b", today, 11])
        ]
    );
    assert_eq!(
        answers[1],
        Vec::<serde_json::Value>::new(),
        "nothing was blocked"
    );
    assert_eq!(answers[2], vec![json!(["read", 7])]);

    let endpoint = server.endpoint();
    let cred = a.dir.join("ship.cred");
    let (ka, kb) = (
        format!("runner-a={}", a.public_key()),
        format!("runner-b={}", b.public_key()),
    );
    let bucket_args = |extra: &[&str]| -> (i32, String) {
        let mut args = vec![
            "--fleet",
            "s3://fleet",
            "--endpoint",
            &endpoint,
            "--allow-http",
            "--credentials-file",
            cred.to_str().unwrap(),
            "--pubkey",
            &ka,
            "--pubkey",
            &kb,
        ];
        args.extend_from_slice(extra);
        verify(&args)
    };
    let synced = server.data.join(BUCKET);
    let synced_args = |extra: &[&str]| -> (i32, String) {
        let mut args = vec![
            "--fleet",
            synced.to_str().unwrap(),
            "--pubkey",
            &ka,
            "--pubkey",
            &kb,
        ];
        args.extend_from_slice(extra);
        verify(&args)
    };
    let (code, text) = bucket_args(&["--expect-head", "runner-a=2"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("2 host(s), 4 file(s), 18 record(s)"),
        "{text}"
    );
    let (code, text) = synced_args(&[]);
    assert_eq!(code, 0, "{text}");
    // Without runner-b's key, its chain is not trusted.
    let (code, text) = verify(&["--fleet", synced.to_str().unwrap(), "--pubkey", &ka]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("host runner-b: UNTRUSTED"), "{text}");

    // A Parquet object deleted from the bucket is named, by its key.
    let gone = b.local_parquet()[0].clone();
    std::fs::remove_file(server.object(BUCKET, &format!("host=runner-b/{gone}"))).unwrap();
    for (code, text) in [bucket_args(&[]), synced_args(&[])] {
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains(&format!("host=runner-b/{gone}: deleted")),
            "the missing file is named: {text}"
        );
    }
    // The last manifest line of runner-a deleted: the chain is shorter, and the head kept off
    // the bucket shows the cut tail.
    std::fs::remove_file(server.object(BUCKET, &format!("host=runner-a/_manifest/{:012}.json", 2)))
        .unwrap();
    for (code, text) in [
        bucket_args(&["--expect-head", "runner-a=2"]),
        synced_args(&["--expect-head", "runner-a=2"]),
    ] {
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains("host runner-a: the manifest ends at line 1, line 2 was expected"),
            "the cut tail is named: {text}"
        );
    }
    // A line deleted in the middle of a chain is named by its object.
    std::fs::remove_file(server.object(BUCKET, &format!("host=runner-b/_manifest/{:012}.json", 1)))
        .unwrap();
    let (code, text) = synced_args(&[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(
            "host=runner-b/_manifest/000000000001.json: manifest line 1 of host runner-b: missing, though later lines exist: removed"
        ),
        "{text}"
    );
}
