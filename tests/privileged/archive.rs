//! The archive on a disk that fills up (a small tmpfs): strict recording fails closed, buffered
//! recording keeps the records and writes them once there is room again.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use airlock::{
    archive::{
        ArchiveWriter, RecordInput, WriterConfig,
        manifest::public_key_of,
        service::{Archive, Recording},
        verify::{Trust, verify},
    },
    policy::{Direction, HashKey, Message, PolicySet, Subject},
};
use serde_json::json;

use crate::harness::*;

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn new(name: &str, size: &str) -> SmallDisk {
        let dir = std::env::temp_dir().join(unique(name));
        std::fs::create_dir_all(&dir).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .unwrap_or_else(|e| panic!("mount tmpfs on {}: {e}", dir.display()));
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: a writer thread of the test may still hold files open here.
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn writer(disk: &Path, key_dir: &Path) -> ArchiveWriter {
    ArchiveWriter::open(WriterConfig {
        archive_dir: disk.join("archive"),
        signing_key: key_dir.join("signing.key"),
        host: "runner-1".into(),
        group: None,
        max_rows: 1000,
        max_segment_bytes: airlock::archive::writer::MAX_SEGMENT_BYTES,
    })
    .expect("open the archive")
    .0
}

/// A record whose payload is `size` bytes of masked JSON.
fn record(seq: u64, size: usize) -> RecordInput {
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
    let (payload, _) = policies.mask_payload(&decision, json!({ "blob": "x".repeat(size) }));
    RecordInput {
        ts_us: 1_795_000_000_000_000 + seq as i64,
        host: "runner-1".into(),
        session_id: "s".into(),
        seq,
        direction: "server_to_client".into(),
        kind: "response".into(),
        payload: Some(payload),
        decision: "allow".into(),
        ..Default::default()
    }
}

/// A scenario whose archive lives on a fresh 2 MiB tmpfs.
/// The disk comes first: bindings drop in reverse order, so the agent stops before the unmount.
fn on_small_disk(name: &str, extra: &str) -> Option<(SmallDisk, Scenario)> {
    if !privileged() {
        return None;
    }
    let disk = SmallDisk::new(&format!("{name}-disk"), "2m");
    let scenario = Scenario::start_with_archive(name, extra, Some(&disk.0.join("archive")))?;
    Some((disk, scenario))
}

/// Fill the rest of the disk with one file.
fn fill(disk: &Path) -> PathBuf {
    use std::io::Write as _;
    let path = disk.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_recording_fails_closed_when_the_disk_is_full() {
    if !privileged() {
        return;
    }
    let disk = SmallDisk::new("archive-full", "2m");
    let keys = tempdir("keys");
    let archive = Archive::start(
        writer(&disk.0, &keys),
        Recording::Strict,
        Duration::from_secs(3600),
    );
    let mut accepted = 0;
    let mut first_error = None;
    for seq in 0..1000 {
        match archive.record(record(seq, 16 * 1024)).await {
            Ok(_) => accepted += 1,
            Err(e) => {
                first_error = Some(e.to_string());
                break;
            }
        }
    }
    let first_error = first_error.expect("a 2 MiB disk took 16 MiB of records");
    assert!(accepted > 0, "{first_error}");
    assert!(first_error.contains("strict"), "{first_error}");
    // From now on everything is refused at once, even small records.
    let err = archive.record(record(5000, 10)).await.unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
}

/// Group recording (the default) on a full disk: each record that cannot be written is
/// refused (its message is not forwarded) and nothing of it stays in the segment; once the
/// disk has room, records are written again, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_recording_refuses_what_it_cannot_write_and_keeps_the_chain() {
    if !privileged() {
        return;
    }
    let disk = SmallDisk::new("archive-group", "4m");
    let keys = tempdir("keys");
    let w = writer(&disk.0, &keys);
    let archive = Archive::start(w, Recording::Group, Duration::from_secs(3600));
    for seq in 0..5 {
        archive.record(record(seq, 2000)).await.unwrap();
    }
    let filler = fill(&disk.0);
    let mut refused = 0;
    for seq in 5..40 {
        if let Err(e) = archive.record(record(seq, 16 * 1024)).await {
            assert!(e.to_string().contains("refused"), "{e}");
            refused += 1;
        }
    }
    assert!(refused > 0, "a full disk took every record");
    let accepted_while_full = 35 - refused;
    std::fs::remove_file(&filler).unwrap();
    for seq in 100..110 {
        archive
            .record(record(seq, 2000))
            .await
            .expect("written once the disk has room again");
    }
    archive.close().await.unwrap();
    let trust = Trust {
        keys: vec![(
            None,
            public_key_of(&keys.join("signing.key")).unwrap(),
            "test".into(),
        )],
        ..Default::default()
    };
    let report = verify(&disk.0.join("archive"), &trust);
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(report.records_checked, 5 + accepted_while_full + 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_recording_keeps_records_until_the_disk_has_room() {
    if !privileged() {
        return;
    }
    let disk = SmallDisk::new("archive-buffered", "4m");
    let keys = tempdir("keys");
    let w = writer(&disk.0, &keys);
    let filler = fill(&disk.0);
    let archive = Archive::start(w, Recording::Buffered, Duration::from_millis(100));
    for seq in 0..20 {
        archive
            .record(record(seq, 2000))
            .await
            .expect("buffered recording accepts while the disk is full");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while archive
        .stats
        .errors
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(Instant::now() < deadline, "no write failed on a full disk");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while archive
        .stats
        .records
        .load(std::sync::atomic::Ordering::Relaxed)
        < 20
    {
        assert!(
            Instant::now() < deadline,
            "records not written after the disk had room again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    archive.close().await.unwrap();
    let trust = Trust {
        keys: vec![(
            None,
            public_key_of(&keys.join("signing.key")).unwrap(),
            "test".into(),
        )],
        ..Default::default()
    };
    let report = verify(&disk.0.join("archive"), &trust);
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(report.records_checked, 20);
    assert_eq!(
        archive
            .stats
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Run `airlock` with arguments; (exit code, stdout, stderr).
fn airlock(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(AIRLOCK)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn connections_are_archived_with_their_attribution() {
    let Some(Scenario {
        mut agent,
        backend,
        cg,
        ..
    }) = Scenario::start("archived", "")
    else {
        return;
    };
    let opts = ClientOpts {
        as_user: Some((65534, 65534)),
        ..Default::default()
    };
    let res = run_client(&cg, "127.0.0.2", backend.port(), &opts);
    assert!(res.expect_response().starts_with("tools saw "));
    // A direct, unattributed connection is archived as rejected.
    let _ = raw_exchange(format!("127.0.0.1:{}", agent.port).parse().unwrap());
    let conn = agent.connection_of(res.pid);
    assert_eq!(conn["state"], "closed");
    // The rejected connection's record is written by a task of its own: wait for it (open,
    // close and the rejection).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while agent.agent_counter("archive_records") < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "records: {}",
            agent.status()["agent_counters"]
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SIGTERM flushes everything into Parquet.
    assert!(agent.sigterm().success(), "{}", agent.log());
    let archive = agent.archive.to_str().unwrap().to_owned();

    let config = agent.config.to_str().unwrap().to_owned();
    let (code, out, err) = airlock(&["verify", "--archive", &archive, "--config", &config]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = airlock(&[
        "sessions",
        "--archive",
        &archive,
        "--json",
        "--user",
        "nobody",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let sessions: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(sessions.len(), 1, "{out}");
    assert_eq!(sessions[0]["pid"].as_u64(), Some(u64::from(res.pid)));
    assert_eq!(sessions[0]["uid"], 65534);
    assert_eq!(sessions[0]["backend"], "tools");
    assert_eq!(sessions[0]["messages"], 2, "open and close");
    let session = sessions[0]["session_id"].as_str().unwrap().to_owned();
    let (code, out, _) = airlock(&["replay", &session, "--archive", &archive, "--json"]);
    assert_eq!(code, Some(0));
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["input"]["payload"]
                .as_str()
                .map(|p| serde_json::from_str(p).unwrap())
                .unwrap()
        })
        .collect();
    assert_eq!(events[0]["event"], "open");
    assert_eq!(events[1]["event"], "close");
    assert_eq!(events[1]["bytes_up"], 6);
    let (_, out, _) = airlock(&["sessions", "--archive", &archive, "--json"]);
    assert!(
        out.lines().any(|l| l.contains("\"blocked\":1")),
        "the rejected connection: {out}"
    );

    // Archive files: 0640, root and the analysts' group; `nobody` cannot read them.
    use std::os::unix::fs::MetadataExt as _;
    let file = std::fs::read_dir(
        agent.archive.join(
            std::fs::read_dir(&agent.archive)
                .unwrap()
                .filter_map(Result::ok)
                .find(|e| e.file_name().to_string_lossy().starts_with("date="))
                .unwrap()
                .path(),
        ),
    )
    .unwrap()
    .filter_map(Result::ok)
    .next()
    .unwrap()
    .path();
    let file = std::fs::read_dir(&file)
        .unwrap()
        .filter_map(Result::ok)
        .next()
        .unwrap()
        .path();
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o640, "{}", file.display());
    assert_eq!(meta.uid(), 0);
    let group = nix::unistd::Group::from_name("airlock")
        .unwrap()
        .expect("group airlock");
    assert_eq!(meta.gid(), group.gid.as_raw());
    let read = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        !read.status.success(),
        "nobody could read {}",
        file.display()
    );
}

#[test]
fn strict_recording_refuses_connections_it_cannot_record() {
    // The archive on a 2 MiB tmpfs.
    let Some((
        disk,
        Scenario {
            agent, backend, cg, ..
        },
    )) = on_small_disk("strictfull", "recording = \"strict\"")
    else {
        return;
    };
    assert!(
        run_client(&cg, "127.0.0.2", backend.port(), &ClientOpts::default())
            .response
            .is_some()
    );
    let _filler = fill(&disk.0);
    // Records may still fit in the segment's last allocated page; the first one that does not
    // turns the writer's failure into refusals, for good.
    let mut relayed = 1;
    let mut refused_at = None;
    for i in 0..50 {
        let res = run_client(&cg, "127.0.0.2", backend.port(), &ClientOpts::default());
        if res.response.as_deref().is_some_and(|r| !r.is_empty()) {
            relayed += 1;
        } else {
            refused_at = Some(i);
            break;
        }
    }
    assert!(
        refused_at.is_some(),
        "50 connections relayed on a full disk"
    );
    for _ in 0..3 {
        let res = run_client(&cg, "127.0.0.2", backend.port(), &ClientOpts::default());
        assert!(
            res.response.as_deref().is_none_or(str::is_empty),
            "relayed after the archive failed: {res:?}"
        );
    }
    // (The backend may see bare connections: the agent dials while it attributes. No request
    // reaches it unrecorded.)
    assert_eq!(
        backend.requests() as usize,
        relayed,
        "an unrecorded request reached the backend"
    );
    assert!(agent.agent_counter("rejected_archive") >= 4);
    let status = agent.status();
    assert!(
        status["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["reason"]
                .as_str()
                .is_some_and(|r| r.contains("archive unavailable"))),
        "{status:#}"
    );
}

#[test]
fn buffered_recording_keeps_traffic_flowing_on_a_full_disk() {
    // The archive on a 2 MiB tmpfs.
    let Some((
        disk,
        Scenario {
            agent, backend, cg, ..
        },
    )) = on_small_disk("bufferedfull", "recording = \"buffered\"")
    else {
        return;
    };
    let filler = fill(&disk.0);
    let res = run_client(&cg, "127.0.0.2", backend.port(), &ClientOpts::default());
    assert!(res.expect_response().starts_with("tools saw "));
    assert_eq!(agent.agent_counter("rejected_archive"), 0);
    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.agent_counter("archive_records") < 2 {
        assert!(
            Instant::now() < deadline,
            "buffered records never reached the disk"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Strict recording covers HTTP-level exchanges too: once the archive cannot write, a request
/// that carries no MCP message (here an allowed OAuth discovery GET on a connection opened
/// while the disk had room) is refused, not passed on unrecorded.
#[test]
fn strict_recording_refuses_http_exchanges_it_cannot_record() {
    if !privileged() {
        return;
    }
    let disk = SmallDisk::new("http-strict", "3m");
    let name = unique("http-strict");
    let cg = TestCgroup::new(&name);
    let port = free_port();
    let mut agent = Agent::prepare(
        &cg,
        &name,
        &format!(
            "[[backend]]\nname = \"tools\"\nhost = \"{HOST}\"\nport = {port}\naddresses = [\"127.0.0.1\"]\ntls = false\n"
        ),
        "",
        Some(&disk.0.join("archive")),
    );
    let _server = PeerServer::start_with(&agent.dir, port, "json", false);
    agent.spawn();
    const KEEP_ALIVE: &str = r#"
import json, os, socket, sys, time
port, flag = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("mcp.internal.test", port), timeout=20)
def exchange(req):
    s.sendall(req)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += s.recv(65536)
    return int(head.split(b" ")[1]), body.decode(errors="replace")
host = "mcp.internal.test:%d" % port
first = exchange(("GET /.well-known/oauth-protected-resource HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode())
print(json.dumps({"first": first[0]}), flush=True)
while not os.path.exists(flag):
    time.sleep(0.05)
# The segment's last page may still take a few records: ask until the archive says no.
statuses = []
for _ in range(200):
    status, body = exchange(("GET /.well-known/oauth-protected-resource HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode())
    statuses.append(status)
    if status != 404:
        break
print(json.dumps({"statuses": statuses, "body": body}), flush=True)
"#;
    let flag = agent.dir.join("disk-is-full");
    let mut client = with_test_hosts(Some(&cg), &agent.dir, Path::new(PYTHON))
        .args(["-c", KEEP_ALIVE, &port.to_string()])
        .arg(&flag)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(client.stdout.take().unwrap()));
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(
        first["first"], 404,
        "passed through while the archive could write: {first}"
    );
    let _filler = fill(&disk.0);
    std::fs::write(&flag, b"").unwrap();
    let second: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let _ = client.wait();
    let statuses = second["statuses"].as_array().unwrap();
    assert_eq!(statuses.last().unwrap(), 503, "never refused: {second}");
    assert!(
        second["body"]
            .as_str()
            .unwrap()
            .contains("nothing was passed on"),
        "{second}"
    );
}
