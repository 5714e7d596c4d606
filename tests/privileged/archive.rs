//! The archive on a disk that fills up (a small tmpfs): strict recording fails closed, buffered
//! recording keeps the records and writes them once there is room again.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use airlock::{
    archive::{
        ArchiveWriter, RecordInput, WriterConfig,
        service::{Archive, Recording},
        verify::verify,
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
        let _ = nix::mount::umount(&self.0);
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
        is_request: false,
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
    let report = verify(&disk.0.join("archive"));
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
