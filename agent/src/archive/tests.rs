use std::{
    fs,
    path::{Path, PathBuf},
};

use super::{writer::*, *};

/// Verify an archive written by these tests, trusting the key they signed with.
fn verify(archive_dir: &Path) -> verify::Report {
    let key_file = archive_dir.parent().unwrap().join("archive-signing.key");
    let key = manifest::public_key_of(&key_file).unwrap();
    let trust = verify::Trust {
        keys: vec![(None, key, "test".into())],
        ..Default::default()
    };
    verify::verify(archive_dir, &trust)
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("airlock-archive-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The first write-ahead segment of the archive under `dir` (these tests write one at a time).
fn first_segment(dir: &Path) -> PathBuf {
    fs::read_dir(dir.join("archive/_wal"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

fn config(dir: &Path) -> WriterConfig {
    WriterConfig {
        archive_dir: dir.join("archive"),
        signing_key: dir.join("archive-signing.key"),
        host: "runner-1".into(),
        group: None,
        max_rows: 100,
        max_segment_bytes: writer::MAX_SEGMENT_BYTES,
    }
}

fn input(session: &str, seq: u64) -> RecordInput {
    RecordInput {
        ts_us: 1_795_000_000_000_000 + seq as i64 * 1000,
        host: "runner-1".into(),
        session_id: session.into(),
        seq,
        direction: if seq.is_multiple_of(2) {
            "server_to_client"
        } else {
            "client_to_server"
        }
        .into(),
        kind: if seq.is_multiple_of(2) {
            "response"
        } else {
            "request"
        }
        .into(),
        method: Some("tools/call".into()),
        tool: Some("search".into()),
        jsonrpc_id: Some(seq.to_string()),
        payload: Some(MaskedPayload::for_tests(format!(
            "{{\"q\":\"item {seq}\",\"mail\":\"[MASKED:email]\"}}"
        ))),
        decision: "mask".into(),
        rules: vec!["mask-secrets".into()],
        masked_detectors: vec!["email".into()],
        latency_us: Some(120 + seq),
        pid: Some(4242),
        tgid: Some(4242),
        uid: Some(1000),
        gid: Some(1000),
        user: Some("ci".into()),
        comm: Some("node".into()),
        exe: Some("/usr/bin/node".into()),
        cgroup: Some("/ci/job".into()),
        backend: Some("tools".into()),
        server_addr: Some("127.0.0.2:8443".into()),
        sni: Some("mcp.internal.test".into()),
        policy_hash: Some("sha256:abc".into()),
        ..Default::default()
    }
}

/// Write `files` Parquet files of `rows` records each, sessions interleaved.
fn archive_with(dir: &Path, files: usize, rows: u64) -> Vec<PathBuf> {
    let (mut w, _) = ArchiveWriter::open(config(dir)).unwrap();
    let mut out = Vec::new();
    for f in 0..files {
        for i in 0..rows {
            let seq = f as u64 * rows + i;
            w.append(input(
                if seq.is_multiple_of(3) { "s-b" } else { "s-a" },
                seq,
            ))
            .unwrap();
        }
        w.sync().unwrap();
        out.push(w.roll().unwrap().unwrap());
    }
    out
}

#[test]
fn records_round_trip_through_parquet_sorted_by_session() {
    let t = TempDir::new("roundtrip");
    let files = archive_with(&t.0, 1, 10);
    let rows = columns::read(&files[0]).unwrap();
    assert_eq!(rows.len(), 10);
    assert_eq!(
        rows.iter().map(|r| r.archive_seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(rows[3].input, input("s-b", 3));
    assert!(rows.iter().all(Record::hash_is_valid));
    // Stored sorted by session for row-group pruning; `read` restores chain order.
    let rel = files[0]
        .strip_prefix(t.0.join("archive"))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(rel.starts_with("date=2026-11-18/hour="), "{rel}");
    assert!(rel.ends_with("runner-1-000000000001.parquet"), "{rel}");
    let report = verify(&t.0.join("archive"));
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(report.records_checked, 10);
}

#[test]
fn the_chain_continues_across_files_and_restarts() {
    let t = TempDir::new("restart");
    archive_with(&t.0, 2, 5);
    let (mut w, rec) = ArchiveWriter::open(config(&t.0)).unwrap();
    assert_eq!(rec, writer::Recovery::default());
    w.append(input("s-c", 100)).unwrap();
    w.sync().unwrap();
    w.roll().unwrap();
    let report = verify(&t.0.join("archive"));
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(report.files_checked, 3);
    assert_eq!(report.records_checked, 11);
}

#[test]
fn a_crash_before_the_roll_loses_nothing_synced() {
    let t = TempDir::new("crash-wal");
    {
        let (mut w, _) = ArchiveWriter::open(config(&t.0)).unwrap();
        for i in 0..7 {
            w.append(input("s", i)).unwrap();
        }
        w.sync().unwrap();
        // Dropped without a roll: the process died.
    }
    let (_, rec) = ArchiveWriter::open(config(&t.0)).unwrap();
    assert_eq!(rec.segments, 1);
    assert_eq!(rec.records, 7);
    let report = verify(&t.0.join("archive"));
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(report.records_checked, 7);
}

#[test]
fn one_session_is_read_from_its_row_groups_only() {
    // `airlock replay` reads one session without reading the archive: files are sorted by
    // session, and row groups whose statistics cannot hold it are skipped.
    let t = TempDir::new("session-groups");
    let (mut w, _) = ArchiveWriter::open(WriterConfig {
        max_rows: 1_000_000,
        ..config(&t.0)
    })
    .unwrap();
    // 30 sessions of 1,000 records, interleaved: about four row groups of 8,192 rows.
    for seq in 0..30_000u64 {
        w.append(input(&format!("s{:02}", seq % 30), seq)).unwrap();
    }
    w.sync().unwrap();
    let file = w.roll().unwrap().unwrap();
    let (groups, total) = columns::session_row_groups(&file, "s17").unwrap();
    assert!(total >= 3, "{total} row groups");
    assert!(groups.len() <= 2, "{groups:?} of {total} row groups read");
    let rows = columns::read_session(&file, "s17").unwrap();
    assert_eq!(rows.len(), 1000);
    assert!(rows.iter().all(|r| r.input.session_id == "s17"));
    assert!(rows.windows(2).all(|p| p[0].archive_seq < p[1].archive_seq));
    assert_eq!(rows[0].input, input("s17", 17));
    assert!(columns::read_session(&file, "s99").unwrap().is_empty());
    assert_eq!(
        responder::load_session(&t.0.join("archive"), "s03")
            .unwrap()
            .len(),
        1000
    );
}

#[test]
fn records_written_but_never_synced_never_reach_a_file() {
    // Parquet files are made from the segment on disk: entries that reached the file but
    // whose fsync failed (so were refused or retried) must stay out.
    let t = TempDir::new("unsynced-tail");
    let (mut w, _) = ArchiveWriter::open(config(&t.0)).unwrap();
    for i in 0..3 {
        w.append(input("s", i)).unwrap();
    }
    w.sync().unwrap();
    // Big enough to leave the write buffer for the file; then the fsync "fails".
    let big = |seq| RecordInput {
        payload: Some(MaskedPayload::for_tests(format!(
            "\"{}\"",
            "x".repeat(300_000)
        ))),
        ..input("s", seq)
    };
    w.append(big(3)).unwrap();
    w.append(big(4)).unwrap();
    let seg = t.0.join("archive/_wal/000000000001.wal");
    assert!(
        wal::read_segment(&seg).unwrap().records.len() >= 4,
        "the test needs an unsynced entry in the segment file"
    );
    let back = w.abandon_unsynced();
    assert_eq!(back, vec![big(3), big(4)]);
    // Cut off the file too: a crash now would not recover them.
    let left = wal::read_segment(&seg).unwrap();
    assert_eq!((left.records.len(), left.dropped_bytes), (3, 0));
    // What follows continues the chain from the last durable record.
    w.append(input("s", 5)).unwrap();
    w.sync().unwrap();
    w.roll().unwrap();
    let report = verify(&t.0.join("archive"));
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(report.records_checked, 4);
    let seqs: Vec<u64> = fs::read_dir(t.0.join("archive/date=2026-11-18"))
        .unwrap()
        .flat_map(|hour| fs::read_dir(hour.unwrap().path()).unwrap())
        .flat_map(|f| columns::read(&f.unwrap().path()).unwrap())
        .map(|r| r.input.seq)
        .collect();
    let mut seqs = seqs;
    seqs.sort();
    assert_eq!(seqs, vec![0, 1, 2, 5]);
    assert!(!seg.exists(), "a published segment is deleted");
}

#[test]
fn records_appended_after_a_recovery_continue_the_chain() {
    // Found by the SIGKILL loop: a restart recovered a segment but went on chaining from the
    // tip before it, so the next crash's recovery found a segment that did not continue.
    let t = TempDir::new("crash-twice");
    for round in 0..3u64 {
        let (mut w, rec) = ArchiveWriter::open(config(&t.0)).unwrap();
        assert_eq!(rec.records, if round == 0 { 0 } else { 3 }, "round {round}");
        for i in 0..3 {
            w.append(input("s", round * 10 + i)).unwrap();
        }
        w.sync().unwrap();
        // Dropped without a roll: killed again.
    }
    let (_, rec) = ArchiveWriter::open(config(&t.0)).unwrap();
    assert_eq!(rec.records, 3);
    let report = verify(&t.0.join("archive"));
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(report.records_checked, 9);
}

#[test]
fn a_torn_tail_is_dropped_and_the_rest_recovered() {
    let t = TempDir::new("torn");
    let seg;
    {
        let (mut w, _) = ArchiveWriter::open(config(&t.0)).unwrap();
        for i in 0..5 {
            w.append(input("s", i)).unwrap();
        }
        w.sync().unwrap();
        seg = first_segment(&t.0);
    }
    let len = fs::metadata(&seg).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    let (_, rec) = ArchiveWriter::open(config(&t.0)).unwrap();
    assert_eq!(rec.records, 4);
    assert!(rec.torn_bytes > 0);
    assert!(verify(&t.0.join("archive")).intact());
}

#[test]
fn a_crash_after_the_manifest_line_does_not_duplicate() {
    let t = TempDir::new("crash-after");
    let seg_copy = t.0.join("saved.wal");
    {
        let (mut w, _) = ArchiveWriter::open(config(&t.0)).unwrap();
        for i in 0..4 {
            w.append(input("s", i)).unwrap();
        }
        w.sync().unwrap();
        let seg = first_segment(&t.0);
        fs::copy(&seg, &seg_copy).unwrap();
        w.roll().unwrap();
        // Put the segment back, as if the process died before deleting it.
        fs::copy(&seg_copy, &seg).unwrap();
    }
    let (_, rec) = ArchiveWriter::open(config(&t.0)).unwrap();
    assert_eq!(rec.already_archived, 4);
    assert_eq!(rec.records, 0);
    let report = verify(&t.0.join("archive"));
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(report.records_checked, 4);
}

#[test]
fn a_crash_between_rename_and_manifest_rewrites_the_same_file() {
    let t = TempDir::new("crash-rename");
    let files = archive_with(&t.0, 1, 3);
    // Simulate: the file was renamed into place but its manifest line never written, and the
    // segment is still there.
    let manifest = manifest::manifest_path(&t.0.join("archive"), "runner-1");
    let (mut w, _) = ArchiveWriter::open(config(&t.0)).unwrap();
    for i in 10..13 {
        w.append(input("s", i)).unwrap();
    }
    w.sync().unwrap();
    let before = fs::read_to_string(&manifest).unwrap();
    let second = w.roll().unwrap().unwrap();
    fs::write(&manifest, &before).unwrap(); // the line never made it
    let seg = t.0.join("archive/_wal/000000000002.wal");
    drop(w);
    // Rebuild the segment the crash left behind from the published rows.
    let mut sw = wal::SegmentWriter::create(&seg, 0o600).unwrap();
    for r in columns::read(&second).unwrap() {
        sw.append(&r).unwrap();
    }
    sw.sync().unwrap();
    drop(sw);
    let (_, rec) = ArchiveWriter::open(config(&t.0)).unwrap();
    assert_eq!(rec.records, 3);
    let report = verify(&t.0.join("archive"));
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(report.files_checked, 2);
    assert!(files[0].exists());
}

fn problems_after(name: &str, tamper: impl FnOnce(&Path, &[PathBuf])) -> Vec<String> {
    let t = TempDir::new(name);
    let files = archive_with(&t.0, 3, 6);
    assert!(verify(&t.0.join("archive")).intact());
    tamper(&t.0.join("archive"), &files);
    let report = verify(&t.0.join("archive"));
    assert!(!report.intact(), "{name}: tampering not detected");
    report.problems
}

fn rel(file: &Path) -> String {
    let s = file.to_string_lossy();
    s[s.find("date=").unwrap()..].to_owned()
}

#[test]
fn verify_names_a_modified_file() {
    let p = problems_after("flip", |_, files| {
        let mut b = fs::read(&files[1]).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x01;
        fs::write(&files[1], b).unwrap();
    });
    assert!(p.iter().any(|m| m.contains("modified")), "{p:?}");
}

#[test]
fn verify_names_a_truncated_file() {
    let mut name = String::new();
    let p = problems_after("trunc", |_, files| {
        name = rel(&files[0]);
        let len = fs::metadata(&files[0]).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&files[0])
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    });
    assert!(p.iter().any(|m| m.starts_with(&name)), "{p:?}");
}

#[test]
fn verify_names_a_deleted_file() {
    let mut name = String::new();
    let p = problems_after("delete", |_, files| {
        name = rel(&files[2]);
        fs::remove_file(&files[2]).unwrap();
    });
    assert!(
        p.iter()
            .any(|m| m.starts_with(&name) && m.contains("deleted")),
        "{p:?}"
    );
}

#[test]
fn verify_names_an_inserted_file() {
    let p = problems_after("insert", |archive, files| {
        let fake = archive.join("date=2026-11-18/hour=00/runner-1-999.parquet");
        fs::create_dir_all(fake.parent().unwrap()).unwrap();
        fs::copy(&files[0], &fake).unwrap();
    });
    assert!(
        p.iter()
            .any(|m| m.contains("runner-1-999.parquet") && m.contains("inserted")),
        "{p:?}"
    );
}

#[test]
fn verify_names_reordered_files() {
    let p = problems_after("reorder", |_, files| {
        let tmp = files[0].with_extension("swap");
        fs::rename(&files[0], &tmp).unwrap();
        fs::rename(&files[1], &files[0]).unwrap();
        fs::rename(&tmp, &files[1]).unwrap();
    });
    assert!(
        p.iter().filter(|m| m.contains("modified")).count() >= 2,
        "{p:?}"
    );
}

#[test]
fn verify_names_a_record_rewritten_with_a_valid_file() {
    // Rewrite a file with one record removed and the manifest left alone: the digest, the
    // row count and the chain all disagree.
    let p = problems_after("record", |_, files| {
        let mut rows = columns::read(&files[1]).unwrap();
        rows.remove(2);
        let f = fs::File::create(&files[1]).unwrap();
        columns::write(f, &rows).unwrap();
    });
    assert!(
        p.iter()
            .any(|m| m.contains("records where the manifest says")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|m| m.contains("removed, inserted or reordered")),
        "{p:?}"
    );
}

/// Rewrite runner-1's manifest lines (text, without newlines) with `edit`.
fn edit_manifest(archive: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let m = manifest::manifest_path(archive, "runner-1");
    let mut lines: Vec<String> = fs::read_to_string(&m)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    edit(&mut lines);
    fs::write(&m, lines.join("\n") + "\n").unwrap();
}

/// A line with one field changed (its signature no longer verifies).
fn altered(line: &str, from: &str, to: &str) -> String {
    assert!(line.contains(from), "{line} lacks {from}");
    line.replacen(from, to, 1)
}

/// Every problem, exactly: what the chain proves, and nothing an untouched line or file did
/// not do. Three files of six records, three manifest lines.
#[test]
fn verify_names_manifest_tampering_exactly() {
    let bad_sig = |n: usize| {
        format!("host runner-1: manifest line {n}: bad signature: the line was modified")
    };
    // A line modified in place: that line, not the untouched one after it (its `prev` names
    // the original line, which is gone), nor the untouched files.
    let p = problems_after("manifest-edit", |archive, _| {
        edit_manifest(archive, |l| {
            l[1] = altered(&l[1], "\"rows\":6", "\"rows\":5")
        });
    });
    assert_eq!(p, vec![bad_sig(2)]);
    let p = problems_after("manifest-edit-first", |archive, _| {
        edit_manifest(archive, |l| {
            l[0] = altered(&l[0], "\"ts\":\"20", "\"ts\":\"19")
        });
    });
    assert_eq!(p, vec![bad_sig(1)]);
    // Its path changed, to nothing: the file it listed still fills the chain's gap.
    let p = problems_after("manifest-path", |archive, _| {
        edit_manifest(archive, |l| {
            l[1] = altered(&l[1], "runner-1-0000000000", "runner-1-0000000009")
        });
    });
    assert_eq!(p, vec![bad_sig(2)]);
    // Made unreadable: the same.
    let p = problems_after("manifest-cut", |archive, _| {
        edit_manifest(archive, |l| l[1].truncate(40));
    });
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("host runner-1: manifest line 2: unreadable"),
        "{p:?}"
    );
    // The last line modified: nothing after it vouches for its file.
    let mut last = String::new();
    let p = problems_after("manifest-last", |archive, files| {
        last = rel(&files[2]);
        edit_manifest(archive, |l| {
            l[2] = altered(&l[2], "\"rows\":6", "\"rows\":7")
        });
    });
    assert_eq!(
        p,
        vec![
            bad_sig(3),
            format!(
                "{last}: listed only by manifest line 3 of host runner-1, which is not valid, and no valid line after it vouches for its records: cannot be verified"
            )
        ]
    );
    // A line removed: named once, and its file (untouched, chaining into its place) is not
    // called inserted.
    let p = problems_after("manifest-drop", |archive, _| {
        edit_manifest(archive, |l| {
            l.remove(1);
        });
    });
    assert_eq!(
        p,
        vec![
            "host runner-1: manifest line 2: holds line 3, after line 1: 1 line(s) before it are missing: removed"
        ]
    );
    // A forged line inserted: it, and the count after it.
    let p = problems_after("manifest-insert", |archive, _| {
        edit_manifest(archive, |l| {
            let forged = altered(&l[1], "\"ts\":\"20", "\"ts\":\"19");
            l.insert(2, forged);
        });
    });
    assert_eq!(
        p,
        vec![
            bad_sig(3),
            "host runner-1: manifest line 4: holds line 3, after line 2: 1 line(s) before it were never written: inserted".to_owned()
        ]
    );
    // Two lines swapped: the order, not the files (they chain in the signed order).
    let p = problems_after("manifest-swap", |archive, _| {
        edit_manifest(archive, |l| l.swap(1, 2));
    });
    assert_eq!(
        p,
        vec![
            "host runner-1: manifest line 2: holds line 3, after line 1: 1 line(s) written between them stand elsewhere: lines were reordered",
            "host runner-1: manifest line 3: holds line 2, after line 3: lines were reordered or repeated"
        ]
    );
    // Stored in another form (a carriage return), its signed content intact.
    let p = problems_after("manifest-cr", |archive, _| {
        edit_manifest(archive, |l| l[0].push('\r'));
    });
    assert_eq!(
        p,
        vec![
            "host runner-1: manifest line 1: not stored as written (its bytes differ from the signed line's): modified, though its signed content is intact"
        ]
    );
}

/// A line and its file both rewritten: the file's own records, or the chain into the next
/// valid line's file, still show it.
#[test]
fn verify_sees_a_file_rewritten_with_its_line() {
    use sha2::Digest as _;
    let rewrite = |file: &Path, rechain: bool| -> String {
        let mut rows = columns::read(file).unwrap();
        rows.sort_by_key(|r| r.archive_seq);
        rows[2].input.tool = Some("exfiltrate".into());
        if rechain {
            let mut prev = rows[0].prev_hash.clone();
            for r in &mut rows {
                *r = record::Record::chain(r.archive_seq, r.input.clone(), &prev);
                prev = r.hash.clone();
            }
        }
        columns::write(fs::File::create(file).unwrap(), &rows).unwrap();
        record::hex(&sha2::Sha256::digest(fs::read(file).unwrap()))
    };
    let sha_of = |line: &str| {
        let at = line.find("\"sha256\":\"").unwrap() + 10;
        line[at..at + 64].to_owned()
    };
    // A record changed, its hash left: that record.
    let mut second = String::new();
    let p = problems_after("file-and-line", |archive, files| {
        second = rel(&files[1]);
        let digest = rewrite(&files[1], false);
        edit_manifest(archive, |l| {
            let old = sha_of(&l[1]);
            l[1] = altered(&l[1], &old, &digest);
        });
    });
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p[0].contains("manifest line 2: bad signature"), "{p:?}");
    assert!(
        p[1].starts_with(&second) && p[1].contains("content does not match its hash: modified"),
        "{p:?}"
    );
    // The chain recomputed after it: the next valid line's file no longer continues it.
    let mut third = String::new();
    let p = problems_after("file-and-line-rechained", |archive, files| {
        second = rel(&files[1]);
        third = rel(&files[2]);
        let digest = rewrite(&files[1], true);
        edit_manifest(archive, |l| {
            let old = sha_of(&l[1]);
            l[1] = altered(&l[1], &old, &digest);
        });
    });
    assert_eq!(
        p,
        vec![
            "host runner-1: manifest line 2: bad signature: the line was modified".to_owned(),
            format!(
                "{third}: does not continue the records of {second}, which only manifest line 2 of host runner-1 lists (not valid): {second} was modified, or files between them were removed"
            )
        ]
    );
}

#[test]
fn archive_files_are_not_world_readable() {
    use std::os::unix::fs::PermissionsExt as _;
    let t = TempDir::new("modes");
    let files = archive_with(&t.0, 1, 2);
    assert_eq!(
        fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777,
        FILE_MODE
    );
    assert_eq!(
        fs::metadata(files[0].parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        DIR_MODE
    );
    let key = fs::metadata(t.0.join("archive-signing.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key, 0o600);
    let m = manifest::manifest_path(&t.0.join("archive"), "runner-1");
    assert_eq!(
        fs::metadata(m).unwrap().permissions().mode() & 0o777,
        FILE_MODE
    );
}

#[test]
fn civil_days() {
    assert_eq!(days_from_civil(1970, 1, 1), 0);
    assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    assert_eq!(days_from_civil(2026, 11, 21), 20_778);
}

#[test]
fn retention_deletes_old_partitions_and_verify_tells_it_from_tampering() {
    let t = TempDir::new("retention");
    let (mut w, _) = ArchiveWriter::open(config(&t.0)).unwrap();
    // Three files on three days: 2026-11-18, -19 and -20.
    for day in 0..3i64 {
        for i in 0..4u64 {
            let mut r = input("s", day as u64 * 10 + i);
            r.ts_us = (days_from_civil(2026, 11, 18) + day) * 86_400_000_000 + i as i64;
            w.append(r).unwrap();
        }
        w.sync().unwrap();
        w.roll().unwrap();
    }
    let today = days_from_civil(2026, 11, 21);
    let removed = w.apply_retention(2, today).unwrap();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(removed[0].starts_with("date=2026-11-18/"));
    assert!(
        !t.0.join("archive/date=2026-11-18").exists(),
        "empty partition left behind"
    );
    assert!(
        w.apply_retention(2, today).unwrap().is_empty(),
        "retention is idempotent"
    );
    let report = verify(&t.0.join("archive"));
    assert!(report.intact(), "{:?}", report.problems);
    assert_eq!(report.retained_deletions, 1);
    assert_eq!(report.records_checked, 8);
    // Deleting a file retention did not remove is still tampering.
    let victim = fs::read_dir(t.0.join("archive/date=2026-11-19/hour=00"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    fs::remove_file(&victim).unwrap();
    let report = verify(&t.0.join("archive"));
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("deleted (no retention line covers it)")),
        "{:?}",
        report.problems
    );
}

mod service {
    use super::*;
    use crate::archive::service::{Archive, Recording};
    use std::time::Duration;

    fn rows_in_archive(dir: &Path) -> u64 {
        let report = verify(&dir.join("archive"));
        assert!(report.intact(), "{:?}", report.problems);
        report.records_checked
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn strict_acknowledges_only_durable_records() {
        let t = TempDir::new("strict");
        let (w, _) = ArchiveWriter::open(config(&t.0)).unwrap();
        let archive = Archive::start(w, Recording::Strict, Duration::from_secs(3600));
        let seq = archive.record(input("s", 1)).await.unwrap();
        assert_eq!(seq, 1);
        // Acknowledged means on disk: the segment holds it before any roll.
        let seg = first_segment(&t.0);
        let on_disk = wal::read_segment(&seg).unwrap();
        assert_eq!(on_disk.records.len(), 1);
        assert_eq!(on_disk.records[0].input, input("s", 1));
        archive.close().await.unwrap();
        assert_eq!(rows_in_archive(&t.0), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_acknowledges_written_records_and_commits_them_within_the_window() {
        use std::sync::atomic::Ordering::Relaxed;
        let t = TempDir::new("groupmode");
        let (w, _) = ArchiveWriter::open(config(&t.0)).unwrap();
        let archive = Archive::start(w, Recording::Group, Duration::from_secs(3600));
        // Acknowledged means written through to the kernel: another reader of the segment
        // (what a restarted agent recovers after a SIGKILL) sees each record at once.
        for i in 0..30 {
            let seq = archive.record(input("g", i)).await.unwrap();
            assert_eq!(seq, i + 1);
            let seg = first_segment(&t.0);
            let on_disk = wal::read_segment(&seg).unwrap();
            assert_eq!(on_disk.records.len() as u64, i + 1);
            assert_eq!(on_disk.records[i as usize].input, input("g", i));
            assert_eq!(on_disk.dropped_bytes, 0);
        }
        // The log thread commits them (fsync) on its own, without a roll or a close.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while archive.stats.records.load(Relaxed) < 30 {
            assert!(std::time::Instant::now() < deadline, "never committed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let fsyncs = archive.stats.fsyncs.load(Relaxed);
        assert!((1..30).contains(&fsyncs), "{fsyncs} fsyncs for 30 records");
        assert_eq!(archive.stats.durable_seq.load(Relaxed), 31);
        archive.close().await.unwrap();
        assert_eq!(rows_in_archive(&t.0), 30);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_written_through_at_once_and_chained_like_single_records() {
        for mode in [Recording::Group, Recording::Strict, Recording::Buffered] {
            let t = TempDir::new("batch");
            let (w, _) = ArchiveWriter::open(config(&t.0)).unwrap();
            let archive = Archive::start(w, mode, Duration::from_secs(3600));
            archive.record(input("b", 0)).await.unwrap();
            archive
                .record_all((1..6).map(|i| input("b", i)).collect())
                .await
                .unwrap();
            archive.record_all(Vec::new()).await.unwrap();
            archive.record(input("b", 6)).await.unwrap();
            if mode != Recording::Buffered {
                // Acknowledged: every record of the batch is in the segment, in order.
                let seg = first_segment(&t.0);
                let on_disk = wal::read_segment(&seg).unwrap();
                let got: Vec<_> = on_disk.records.iter().map(|r| r.input.clone()).collect();
                let want: Vec<_> = (0..7).map(|i| input("b", i)).collect();
                assert_eq!(got, want, "{mode:?}");
                assert_eq!(on_disk.dropped_bytes, 0);
            }
            archive.close().await.unwrap();
            // One chain through single records and the batch: verify checks every link.
            assert_eq!(rows_in_archive(&t.0), 7, "{mode:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_records_from_many_tasks_keep_one_chain_across_rolls() {
        let t = TempDir::new("groupmany");
        let (w, _) = ArchiveWriter::open(WriterConfig {
            max_rows: 100,
            ..config(&t.0)
        })
        .unwrap();
        let archive = Archive::start(w, Recording::Group, Duration::from_secs(3600));
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let a = archive.clone();
                tokio::spawn(async move { a.record(input(&format!("s{}", i % 10), i)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // A full segment is rolled when it fills, whether or not the log thread was asleep
        // then, not at the flush interval (an hour here) or on close: soon no more than
        // `max_rows - 1` records wait outside Parquet files. (How many files that makes
        // depends on scheduling: callers never wait for the log thread, so a segment holds
        // what was written before the log thread got to roll it.)
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let published = verify(&t.0.join("archive")).records_checked;
            if published > 900 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{published} of 1000 records published: a full segment was left open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        archive.close().await.unwrap();
        let report = verify(&t.0.join("archive"));
        assert!(report.intact(), "{:?}", report.problems);
        assert_eq!(report.records_checked, 1000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_share_fsyncs() {
        let t = TempDir::new("group");
        let (w, _) = ArchiveWriter::open(WriterConfig {
            max_rows: 10_000,
            ..config(&t.0)
        })
        .unwrap();
        let archive = Archive::start(w, Recording::Strict, Duration::from_secs(3600));
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let a = archive.clone();
                tokio::spawn(async move { a.record(input(&format!("s{}", i % 10), i)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let fsyncs = archive
            .stats
            .fsyncs
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            fsyncs < 1000,
            "no group commit: {fsyncs} fsyncs for 1000 records"
        );
        archive.close().await.unwrap();
        assert_eq!(rows_in_archive(&t.0), 1000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn buffered_records_and_timed_rolls() {
        let t = TempDir::new("buffered");
        let (w, _) = ArchiveWriter::open(config(&t.0)).unwrap();
        let archive = Archive::start(w, Recording::Buffered, Duration::from_millis(200));
        for i in 0..50 {
            archive.record(input("s", i)).await.unwrap();
        }
        // No close: the flush interval alone publishes a Parquet file.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while verify(&t.0.join("archive")).records_checked < 50 {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing rolled after the flush interval"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        archive.close().await.unwrap();
        assert_eq!(rows_in_archive(&t.0), 50);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_segment_rolls_at_its_byte_cap() {
        // Memory stays bounded however large the records: a segment is published once it
        // holds `max_segment_bytes`, whatever `max_rows` says.
        let t = TempDir::new("bytecap");
        let (w, _) = ArchiveWriter::open(WriterConfig {
            max_rows: 1_000_000,
            max_segment_bytes: 8 * 1024,
            ..config(&t.0)
        })
        .unwrap();
        let archive = Archive::start(w, Recording::Strict, Duration::from_secs(3600));
        let big = |seq| RecordInput {
            payload: Some(MaskedPayload::for_tests(format!(
                "\"{}\"",
                "y".repeat(3000)
            ))),
            ..input("s", seq)
        };
        for i in 0..20 {
            archive.record(big(i)).await.unwrap();
        }
        archive.close().await.unwrap();
        let report = verify(&t.0.join("archive"));
        assert!(report.intact(), "{:?}", report.problems);
        assert_eq!(report.records_checked, 20);
        // About 3 KiB a record, 8 KiB a segment: at most 3 records per file.
        assert!(report.files_checked >= 7, "{} files", report.files_checked);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn max_rows_rolls_a_file() {
        let t = TempDir::new("maxrows");
        let (w, _) = ArchiveWriter::open(WriterConfig {
            max_rows: 10,
            ..config(&t.0)
        })
        .unwrap();
        let archive = Archive::start(w, Recording::Strict, Duration::from_secs(3600));
        for i in 0..25 {
            archive.record(input("s", i)).await.unwrap();
        }
        archive.close().await.unwrap();
        let report = verify(&t.0.join("archive"));
        assert!(report.intact(), "{:?}", report.problems);
        assert_eq!(report.records_checked, 25);
        assert!(report.files_checked >= 3, "{} files", report.files_checked);
    }
}
