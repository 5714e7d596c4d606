//! The archive writer: records into a write-ahead segment (group-commit fsync), segments into
//! Parquet files (temp file, fsync, rename, directory fsync), each file into the signed
//! manifest, then the segment is deleted. On open, leftover segments are recovered.
//!
//! Crash points and why nothing is lost or doubled:
//! - before the WAL fsync: the records were not acknowledged (strict mode) — gone by design;
//! - after the fsync, before the Parquet rename: the segment is still there and is rolled on
//!   the next open;
//! - after the rename, before the manifest line: the segment is still there; rolling it again
//!   writes the same file name (derived from the segment number) over the orphan;
//! - after the manifest line, before the segment is deleted: its records are at or below the
//!   manifest's chain tip and are skipped;
//! - with several sealed segments waiting for the publish thread: they are published oldest
//!   first on the next open, each continuing the chain of the one before;
//! - after a failed fsync: the unsynced tail was cut off the segment (and, should that fail
//!   too, the publisher reads only up to the last durable record it was told of).

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use super::{
    columns,
    manifest::{EntryBody, Manifest},
    record::{self, RecordInput, hex},
    wal::{self, SegmentWriter},
};
use sha2::Digest as _;
use tracing::warn;

/// Mode of archive files (root and the analysts group may read).
pub const FILE_MODE: u32 = 0o640;
pub const DIR_MODE: u32 = 0o750;

/// Where and how to write.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub archive_dir: PathBuf,
    /// The signing key file (under `state_dir`).
    pub signing_key: PathBuf,
    pub host: String,
    /// Group that may read the archive (files are root:group 0640).
    pub group: Option<u32>,
    /// Roll the current segment into Parquet once it holds this many records...
    pub max_rows: usize,
    /// ...or this many bytes. Publishing reads a segment twice: once for the sort keys and
    /// positions of its rows (32 bytes a row), then one row group at a time (see
    /// [`columns::ROW_GROUP`]), so memory does not grow with this.
    pub max_segment_bytes: u64,
}

/// Default `max_segment_bytes`.
pub const MAX_SEGMENT_BYTES: u64 = 128 * 1024 * 1024;

/// What opening found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    pub records: usize,
    /// Records found in segments but already archived (crash after the manifest line).
    pub already_archived: usize,
    pub torn_bytes: u64,
}

/// The archive written from one thread: a [`SegmentLog`] (chain and write-ahead segments)
/// and a [`Publisher`] (segments into Parquet files and manifest lines). The agent runs the
/// two on their own threads ([`ArchiveWriter::into_parts`]), so that encoding a Parquet file
/// never holds up the records waiting for their fsync. Files are always made from the
/// durable segments on disk (checksummed entries), by the same code after a crash as in
/// normal operation.
pub struct ArchiveWriter {
    log: SegmentLog,
    publisher: Publisher,
}

/// The write-ahead side: chains records and appends them to the open segment.
pub struct SegmentLog {
    wal_dir: PathBuf,
    max_rows: usize,
    wal: Option<SegmentWriter>,
    wal_no: u64,
    max_bytes: u64,
    /// Appended to the open segment, not yet fsynced: handed back if the fsync fails.
    unsynced: Vec<RecordInput>,
    /// Records and bytes in the open segment.
    rows: usize,
    bytes: u64,
    last_hash: String,
    next_archive_seq: u64,
    /// The chain after the last durable record: where to go on after a failure.
    durable_tip: (String, u64),
    /// Encoding buffer for one write-ahead entry.
    body: Vec<u8>,
}

/// See [`SegmentLog::commit_point`].
pub struct CommitPoint {
    segment: u64,
    pub file: std::sync::Arc<File>,
    len: u64,
    tip: (String, u64),
}

/// A closed segment on its way into a Parquet file.
pub struct Sealed {
    segment: u64,
    path: PathBuf,
    /// The last durable record: anything after it in the segment file was never
    /// acknowledged and is left out.
    last_archive_seq: u64,
}

/// The publishing side: sealed segments, oldest first, into Parquet files (temp file, fsync,
/// rename, directory fsync) and signed manifest lines; then the segment is deleted.
pub struct Publisher {
    cfg: WriterConfig,
    manifest: Manifest,
    queue: std::collections::VecDeque<Sealed>,
    /// The chain as published so far: every file must continue it.
    last_hash: String,
    next_archive_seq: u64,
    /// Manifest lines shipped off the host (`[ship]` with `keep_unshipped`): retention keeps
    /// the files of later lines.
    retention_hold: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Bytes of the Parquet files this publisher wrote (metrics).
    published_bytes: u64,
}

impl ArchiveWriter {
    pub fn open(cfg: WriterConfig) -> io::Result<(ArchiveWriter, Recovery)> {
        for dir in [
            cfg.archive_dir.clone(),
            cfg.archive_dir.join("_manifest"),
            cfg.archive_dir.join("_wal"),
        ] {
            create_dir(&dir, cfg.group)?;
        }
        let key = super::manifest::signing_key(&cfg.signing_key)?;
        let manifest = Manifest::open(&cfg.archive_dir, &cfg.host, key, FILE_MODE)?;
        for path in [
            super::manifest::manifest_path(&cfg.archive_dir, &cfg.host),
            super::manifest::public_key_path(&cfg.archive_dir, &cfg.host),
        ] {
            if path.exists() {
                set_owner(&path, cfg.group)?;
            }
        }
        let (last_hash, tip) = manifest.chain_tip();
        // Segment numbers never repeat: file names derive from them.
        let wal_no = manifest.last_segment();
        let mut publisher = Publisher {
            cfg: cfg.clone(),
            manifest,
            queue: Default::default(),
            last_hash,
            next_archive_seq: tip + 1,
            retention_hold: None,
            published_bytes: 0,
        };
        let (recovery, wal_no) = publisher.recover(wal_no)?;
        let log = SegmentLog {
            wal_dir: cfg.archive_dir.join("_wal"),
            max_rows: cfg.max_rows,
            max_bytes: cfg.max_segment_bytes,
            wal: None,
            wal_no,
            unsynced: Vec::new(),
            rows: 0,
            bytes: 0,
            last_hash: publisher.last_hash.clone(),
            next_archive_seq: publisher.next_archive_seq,
            durable_tip: (publisher.last_hash.clone(), publisher.next_archive_seq),
            body: Vec::new(),
        };
        Ok((ArchiveWriter { log, publisher }, recovery))
    }

    /// The two halves, for running on separate threads.
    pub fn into_parts(self) -> (SegmentLog, Publisher) {
        (self.log, self.publisher)
    }

    /// See [`SegmentLog::append`].
    pub fn append(&mut self, input: RecordInput) -> Result<u64, Box<(io::Error, RecordInput)>> {
        self.log.append(input)
    }

    /// See [`SegmentLog::sync`].
    pub fn sync(&mut self) -> io::Result<()> {
        self.log.sync()
    }

    /// See [`SegmentLog::abandon_unsynced`]; the durable prefix goes to the publisher.
    pub fn abandon_unsynced(&mut self) -> Vec<RecordInput> {
        let (dropped, sealed) = self.log.abandon_unsynced();
        if let Some(s) = sealed {
            self.publisher.submit(s);
        }
        dropped
    }

    /// Records of the open segment.
    pub fn pending_rows(&self) -> usize {
        self.log.pending_rows()
    }

    pub fn wants_roll(&self) -> bool {
        self.log.wants_roll()
    }

    /// Turn the open segment into a published Parquet file (after any waiting ones). Returns
    /// the path of the last file written, if any.
    pub fn roll(&mut self) -> io::Result<Option<PathBuf>> {
        if let Some(sealed) = self.log.seal()? {
            self.publisher.submit(sealed);
        }
        self.publisher.publish_queued()
    }

    /// Retention keeps every file whose manifest line is past `shipped` (the count of lines
    /// shipped, read at each pass).
    pub fn hold_retention(&mut self, shipped: std::sync::Arc<std::sync::atomic::AtomicU64>) {
        self.publisher.retention_hold = Some(shipped);
    }

    /// See [`Publisher::apply_retention`].
    pub fn apply_retention(&mut self, days: u32, today: i64) -> io::Result<Vec<String>> {
        self.publisher.apply_retention(days, today)
    }
}

impl SegmentLog {
    /// Chain and append one record to the open segment (opening one if needed). Not durable
    /// until [`SegmentLog::sync`]. On failure the input comes back with the error.
    pub fn append(&mut self, input: RecordInput) -> Result<u64, Box<(io::Error, RecordInput)>> {
        if let Err(e) = self.open_segment() {
            return Err(Box::new((e, input)));
        }
        let archive_seq = self.next_archive_seq;
        let hash = record::chain_into(archive_seq, &input, &self.last_hash, &mut self.body);
        if let Some(wal) = self.wal.as_mut()
            && let Err(e) = wal.append_encoded(&self.body)
        {
            return Err(Box::new((e, input)));
        }
        self.appended(&hash);
        self.unsynced.push(input);
        Ok(archive_seq)
    }

    /// Group commit: chain one record and write it through to the open segment (one
    /// `write(2)`), so it survives the agent being killed once this returns; durable at the
    /// next [`SegmentLog::commit_point`] fsync. On failure nothing of it stays in the
    /// segment and the chain is where it was.
    pub fn append_written(&mut self, input: &RecordInput) -> io::Result<u64> {
        self.open_segment()?;
        let archive_seq = self.next_archive_seq;
        let hash = record::chain_into(archive_seq, input, &self.last_hash, &mut self.body);
        if let Some(wal) = self.wal.as_mut() {
            wal.write_through(&self.body)?;
        }
        self.appended(&hash);
        Ok(archive_seq)
    }

    /// [`SegmentLog::append_written`] for several records: each chained after the one before,
    /// all written with one `write(2)`. On failure none of them is in the segment and the
    /// chain is where it was. The first record's `archive_seq`.
    pub fn append_written_all(&mut self, inputs: &[RecordInput]) -> io::Result<u64> {
        self.open_segment()?;
        let first = self.next_archive_seq;
        let mut tip = self.last_hash.clone();
        let mut bodies = Vec::with_capacity(inputs.len());
        for (seq, input) in (first..).zip(inputs) {
            let mut body = Vec::new();
            let hash = record::chain_into(seq, input, &tip, &mut body);
            tip.clear();
            // Hex digits are ASCII.
            tip.push_str(std::str::from_utf8(&hash).unwrap_or_default());
            bodies.push(body);
        }
        if let Some(wal) = self.wal.as_mut() {
            let all: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
            wal.write_through_all(&all)?;
        }
        for body in &bodies {
            self.next_archive_seq += 1;
            self.rows += 1;
            self.bytes += body.len() as u64 + 8;
        }
        self.last_hash = tip;
        Ok(first)
    }

    /// What an fsync taken now (without this log) would make durable: the segment's file,
    /// its length, and the chain tip after its last record. `None` when no segment is open.
    pub fn commit_point(&self) -> Option<CommitPoint> {
        let wal = self.wal.as_ref()?;
        let (file, len) = wal.commit_point();
        Some(CommitPoint {
            segment: self.wal_no,
            file,
            len,
            tip: (self.last_hash.clone(), self.next_archive_seq),
        })
    }

    /// The fsync of `point` succeeded.
    pub fn committed(&mut self, point: CommitPoint) {
        if let Some(wal) = self.wal.as_mut()
            && point.segment == self.wal_no
            && point.tip.1 > self.durable_tip.1
        {
            wal.synced_through(point.len);
            self.durable_tip = point.tip;
        }
    }

    fn open_segment(&mut self) -> io::Result<()> {
        if self.wal.is_some() {
            return Ok(());
        }
        let path = self.wal_dir.join(format!("{:012}.wal", self.wal_no + 1));
        let seg = SegmentWriter::create(&path, 0o600)?;
        File::open(&self.wal_dir)?.sync_all()?;
        self.wal_no += 1;
        self.wal = Some(seg);
        Ok(())
    }

    /// The chain moves on past a record just appended (encoded in `self.body`).
    fn appended(&mut self, hash: &[u8]) {
        self.next_archive_seq += 1;
        self.last_hash.clear();
        // Hex digits are ASCII.
        self.last_hash
            .push_str(std::str::from_utf8(hash).unwrap_or_default());
        self.rows += 1;
        self.bytes += self.body.len() as u64 + 8;
    }

    /// fsync the open segment: every appended record is durable when this returns.
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some(w) = self.wal.as_mut() {
            w.sync()?;
        }
        // Records written through (group commit) are not in `unsynced`: compare the tips.
        if self.durable_tip.1 != self.next_archive_seq {
            self.durable_tip = (self.last_hash.clone(), self.next_archive_seq);
        }
        self.unsynced.clear();
        Ok(())
    }

    /// After a failed append or fsync: forget the records that are not durable (their chain
    /// state included) and return their inputs, close the segment (its durable prefix is
    /// returned sealed, for publishing), and go on in a fresh segment.
    pub fn abandon_unsynced(&mut self) -> (Vec<RecordInput>, Option<Sealed>) {
        let dropped = std::mem::take(&mut self.unsynced);
        let sealed = self.wal.take().map(|w| {
            let sealed = self.sealed(&w);
            if let Err(e) = w.truncate_to_synced() {
                // The publisher still leaves out everything after the durable prefix.
                warn!(error = %e, segment = %sealed.path.display(), "cannot cut the unsynced tail off a write-ahead segment");
            }
            sealed
        });
        (self.last_hash, self.next_archive_seq) = self.durable_tip.clone();
        (dropped, sealed)
    }

    fn sealed(&mut self, wal: &SegmentWriter) -> Sealed {
        (self.rows, self.bytes) = (0, 0);
        Sealed {
            segment: self.wal_no,
            path: wal.path().to_owned(),
            last_archive_seq: self.durable_tip.1.saturating_sub(1),
        }
    }

    /// fsync and close the open segment, for publishing; `None` if no segment is open.
    pub fn seal(&mut self) -> io::Result<Option<Sealed>> {
        if self.wal.is_none() {
            return Ok(None);
        }
        self.sync()?;
        Ok(self.wal.take().map(|w| self.sealed(&w)))
    }

    /// Records of the open segment.
    pub fn pending_rows(&self) -> usize {
        self.rows
    }

    /// The `archive_seq` the next record takes once every appended one is durable: records
    /// before it are in the write-ahead log (or published).
    pub fn durable_next_seq(&self) -> u64 {
        self.durable_tip.1
    }

    pub fn wants_roll(&self) -> bool {
        self.rows >= self.max_rows || self.bytes >= self.max_bytes
    }
}

impl Publisher {
    /// Roll every leftover segment, oldest first; remove unpublished temp files. Returns
    /// what it found and the highest segment number seen.
    fn recover(&mut self, mut wal_no: u64) -> io::Result<(Recovery, u64)> {
        let mut report = Recovery::default();
        let mut segments: Vec<(u64, PathBuf)> = fs::read_dir(self.wal_dir())?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let p = e.path();
                let n = p.file_stem()?.to_str()?.parse::<u64>().ok()?;
                (p.extension()? == "wal").then_some((n, p))
            })
            .collect();
        segments.sort();
        for (n, path) in segments {
            wal_no = wal_no.max(n);
            report.segments += 1;
            let mut last_archive_seq = 0;
            report.torn_bytes += wal::scan_segment(&path, |r| {
                if r.archive_seq < self.next_archive_seq {
                    report.already_archived += 1;
                } else {
                    report.records += 1;
                }
                last_archive_seq = r.archive_seq;
            })?;
            self.submit(Sealed {
                segment: n,
                path,
                last_archive_seq,
            });
            self.publish_queued()?;
        }
        remove_temp_files(&self.cfg.archive_dir)?;
        Ok((report, wal_no))
    }

    fn wal_dir(&self) -> PathBuf {
        self.cfg.archive_dir.join("_wal")
    }

    /// Queue a sealed segment (published in order by [`Publisher::publish_queued`]).
    pub fn submit(&mut self, sealed: Sealed) {
        self.queue.push_back(sealed);
    }

    /// Sealed segments waiting to be published.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The first `archive_seq` not yet in a published Parquet file.
    pub fn next_archive_seq(&self) -> u64 {
        self.next_archive_seq
    }

    /// Bytes of the Parquet files written since this publisher started.
    pub fn published_bytes(&self) -> u64 {
        self.published_bytes
    }

    /// Publish every queued segment, oldest first, then delete it. On failure it and the
    /// rest stay queued for a retry. Returns the path of the last file written, if any.
    pub fn publish_queued(&mut self) -> io::Result<Option<PathBuf>> {
        let mut last = None;
        while let Some(sealed) = self.queue.front() {
            let (segment, path, upto) =
                (sealed.segment, sealed.path.clone(), sealed.last_archive_seq);
            if let Some(file) = self.publish_segment(segment, &path, upto)? {
                last = Some(file);
            }
            self.queue.pop_front();
        }
        Ok(last)
    }

    /// One segment's durable records not yet archived (up to `last_archive_seq`) into its
    /// Parquet file, after checking that they continue the published chain; then delete the
    /// segment.
    fn publish_segment(
        &mut self,
        segment: u64,
        wal_path: &Path,
        last_archive_seq: u64,
    ) -> io::Result<Option<PathBuf>> {
        let mut plan = columns::Plan::default();
        let mut broken = false;
        let mut expected = self.next_archive_seq;
        wal::scan_entries(wal_path, |at, r| {
            if !(self.next_archive_seq..=last_archive_seq).contains(&r.archive_seq) {
                return;
            }
            let prev = plan.last_hash().unwrap_or(self.last_hash.as_str());
            broken |= r.archive_seq != expected || r.prev_hash != prev;
            expected = r.archive_seq + 1;
            plan.push(&r, at);
        })?;
        if broken {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: its records do not continue the archive's hash chain; move the segment aside and run `airlock verify`",
                    wal_path.display()
                ),
            ));
        }
        let mut file = None;
        if let Some(span) = plan.span().cloned() {
            let mut entries = wal::EntryReader::open(wal_path)?;
            file = Some(self.publish(segment, &span, |out| {
                plan.write(out, |at, columns| {
                    columns.push(&entries.read(at)?);
                    Ok(())
                })
            })?);
            self.last_hash = span.last_hash;
            self.next_archive_seq = span.last_archive_seq + 1;
        }
        remove_if_present(wal_path)?;
        Ok(file)
    }

    /// Delete the files of partitions older than `days` days before `today` (days since the
    /// Unix epoch, UTC), recording the deletion in the manifest first so that `airlock verify`
    /// tells retention from tampering. Finishes deletions a crash interrupted. Returns the
    /// files removed.
    pub fn apply_retention(&mut self, days: u32, today: i64) -> io::Result<Vec<String>> {
        let cutoff = today - i64::from(days);
        let removed = super::manifest::retention_removals(&self.manifest.entries);
        let shipped = self
            .retention_hold
            .as_ref()
            .map(|h| h.load(std::sync::atomic::Ordering::Relaxed));
        let expired: Vec<String> = self
            .manifest
            .entries
            .iter()
            // Not shipped yet: kept, whatever its age.
            .filter(|e| shipped.is_none_or(|s| e.seq <= s))
            .filter_map(|e| match &e.body {
                EntryBody::File { path, .. } if !removed.contains(path) => partition_day(path)
                    .filter(|d| *d < cutoff)
                    .map(|_| path.clone()),
                _ => None,
            })
            .collect();
        if !expired.is_empty() {
            self.manifest.append(
                EntryBody::Retention {
                    removed: expired.clone(),
                    retention_days: days,
                },
                FILE_MODE,
            )?;
        }
        for path in removed.iter().chain(&expired) {
            let full = self.cfg.archive_dir.join(path);
            remove_if_present(&full)?;
            // Drop the hour and date directories once empty.
            for dir in full.ancestors().skip(1).take(2) {
                if fs::remove_dir(dir).is_err() {
                    break;
                }
            }
        }
        Ok(expired)
    }

    /// Write the Parquet file of segment `n` (its rows, `span`, written by `write`), then its
    /// manifest line.
    fn publish(
        &mut self,
        n: u64,
        span: &columns::Span,
        write: impl FnOnce(Hashed) -> io::Result<Hashed>,
    ) -> io::Result<PathBuf> {
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH
                + std::time::Duration::from_micros(u64::try_from(span.first_ts_us).unwrap_or(0)),
        )
        .to_string();
        // `2026-11-21T21:05:07Z` → date=2026-11-21/hour=21
        let (date, hour) = (&when[..10], &when[11..13]);
        let rel_dir = PathBuf::from(format!("date={date}")).join(format!("hour={hour}"));
        let dir = self.cfg.archive_dir.join(&rel_dir);
        create_dir(
            &self.cfg.archive_dir.join(format!("date={date}")),
            self.cfg.group,
        )?;
        create_dir(&dir, self.cfg.group)?;
        let name = format!("{}-{n:012}.parquet", self.cfg.host);
        let tmp = dir.join(format!(".{name}.tmp"));
        let _ = fs::remove_file(&tmp);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        set_owner(&tmp, self.cfg.group)?;
        let written = write(Hashed {
            file,
            sha256: sha2::Sha256::new(),
            len: 0,
        })?;
        written.file.sync_all()?;
        drop(written.file);
        let final_path = dir.join(&name);
        fs::rename(&tmp, &final_path)?;
        File::open(&dir)?.sync_all()?;
        self.published_bytes += written.len;
        let sha256 = hex(&written.sha256.finalize());
        self.manifest.append(
            EntryBody::File {
                path: rel_dir.join(&name).to_string_lossy().into_owned(),
                segment: n,
                sha256,
                rows: span.rows,
                first_archive_seq: span.first_archive_seq,
                last_archive_seq: span.last_archive_seq,
                first_prev_hash: span.first_prev_hash.clone(),
                last_hash: span.last_hash.clone(),
            },
            FILE_MODE,
        )?;
        // The manifest is created by its first line: give it to the analysts' group too.
        set_owner(
            &super::manifest::manifest_path(&self.cfg.archive_dir, &self.cfg.host),
            self.cfg.group,
        )?;
        Ok(final_path)
    }
}

/// A Parquet file being written, hashed on the way (its manifest line's `sha256`: the bytes
/// written, without reading the file back).
struct Hashed {
    file: File,
    sha256: sha2::Sha256,
    len: u64,
}

impl io::Write for Hashed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        let done = buf.get(..n).unwrap_or(buf);
        self.sha256.update(done);
        self.len += done.len() as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Days since the Unix epoch of a `date=YYYY-MM-DD/...` path.
fn partition_day(path: &str) -> Option<i64> {
    let date = path.strip_prefix("date=")?.get(..10)?;
    let y: i64 = date.get(..4)?.parse().ok()?;
    let m: i64 = date.get(5..7)?.parse().ok()?;
    let d: i64 = date.get(8..10)?.parse().ok()?;
    Some(days_from_civil(y, m, d))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn create_dir(dir: &Path, group: Option<u32>) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
            set_owner(dir, group)
        }
        // One that existed before must be ours and not writable by others: the archive is
        // evidence.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => crate::fsperm::check_private_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                create_dir(parent, group)?;
            }
            create_dir(dir, group)
        }
        Err(e) => Err(e),
    }
}

fn set_owner(path: &Path, group: Option<u32>) -> io::Result<()> {
    match group {
        Some(gid) => std::os::unix::fs::chown(path, Some(0), Some(gid)),
        None => Ok(()),
    }
}

/// Remove `.*.tmp` files left by a crash between creating and renaming a Parquet file.
fn remove_temp_files(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)?.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() && !name.starts_with('_') {
            remove_temp_files(&path)?;
        } else if name.starts_with('.') && name.ends_with(".tmp") {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}
