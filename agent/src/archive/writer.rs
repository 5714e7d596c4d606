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
//!   manifest's chain tip and are skipped.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use super::{
    columns,
    manifest::{EntryBody, Manifest},
    record::{Record, RecordInput, hex},
    wal::{self, SegmentWriter},
};
use sha2::Digest as _;

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
    /// Roll the current segment into Parquet once it holds this many records.
    pub max_rows: usize,
}

/// What opening found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    pub records: usize,
    /// Records found in segments but already archived (crash after the manifest line).
    pub already_archived: usize,
    pub torn_bytes: u64,
}

pub struct ArchiveWriter {
    cfg: WriterConfig,
    manifest: Manifest,
    wal: Option<SegmentWriter>,
    wal_no: u64,
    /// Records of the open segment, kept to write its Parquet file without re-reading.
    pending: Vec<Record>,
    /// How many of `pending` the last successful fsync covered.
    synced: usize,
    /// Durable prefixes of segments abandoned after a write failure, oldest first: published
    /// before anything newer so that files follow the chain's order.
    sealed: Vec<(u64, Vec<Record>)>,
    last_hash: String,
    next_archive_seq: u64,
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
        let mut w = ArchiveWriter {
            cfg,
            manifest,
            wal: None,
            wal_no,
            pending: Vec::new(),
            synced: 0,
            sealed: Vec::new(),
            last_hash,
            next_archive_seq: tip + 1,
        };
        let recovery = w.recover()?;
        Ok((w, recovery))
    }

    fn wal_dir(&self) -> PathBuf {
        self.cfg.archive_dir.join("_wal")
    }

    /// Roll every leftover segment, oldest first; remove unpublished temp files.
    fn recover(&mut self) -> io::Result<Recovery> {
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
            self.wal_no = self.wal_no.max(n);
            let contents = wal::read_segment(&path)?;
            report.segments += 1;
            report.torn_bytes += contents.dropped_bytes;
            let (done, todo): (Vec<Record>, Vec<Record>) = contents
                .records
                .into_iter()
                .partition(|r| r.archive_seq < self.next_archive_seq);
            report.already_archived += done.len();
            report.records += todo.len();
            if let Some(first) = todo.first()
                && first.prev_hash != self.last_hash
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: its first record does not continue the archive's hash chain; move the segment aside and run `airlock verify`",
                        path.display()
                    ),
                ));
            }
            if let Some(last) = todo.last() {
                self.publish(n, &todo)?;
                // What follows continues the chain after the recovered records.
                self.last_hash = last.hash.clone();
                self.next_archive_seq = last.archive_seq + 1;
            }
            fs::remove_file(&path)?;
        }
        remove_temp_files(&self.cfg.archive_dir)?;
        Ok(report)
    }

    /// Chain and append one record to the open segment (opening one if needed). Not durable
    /// until [`ArchiveWriter::sync`]. On failure the input comes back with the error.
    pub fn append(&mut self, input: RecordInput) -> Result<u64, Box<(io::Error, RecordInput)>> {
        if self.wal.is_none() {
            let opened = (|| {
                let path = self.wal_dir().join(format!("{:012}.wal", self.wal_no + 1));
                let seg = SegmentWriter::create(&path, 0o600)?;
                File::open(self.wal_dir())?.sync_all()?;
                Ok::<_, io::Error>(seg)
            })();
            match opened {
                Ok(seg) => {
                    self.wal_no += 1;
                    self.wal = Some(seg);
                }
                Err(e) => return Err(Box::new((e, input))),
            }
        }
        let (record, body) = Record::chain_encoded(self.next_archive_seq, input, &self.last_hash);
        if let Some(wal) = self.wal.as_mut()
            && let Err(e) = wal.append_encoded(&body)
        {
            return Err(Box::new((e, record.input)));
        }
        self.next_archive_seq += 1;
        self.last_hash = record.hash.clone();
        let seq = record.archive_seq;
        self.pending.push(record);
        Ok(seq)
    }

    /// fsync the open segment: every appended record is durable when this returns.
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some(w) = self.wal.as_mut() {
            w.sync()?;
        }
        self.synced = self.pending.len();
        Ok(())
    }

    /// After a failed append or fsync: forget the records that are not durable (their chain
    /// state included) and return their inputs, keep the segment's durable prefix for
    /// publishing, and go on in a fresh segment.
    pub fn abandon_unsynced(&mut self) -> Vec<RecordInput> {
        let dropped: Vec<RecordInput> =
            self.pending.drain(self.synced..).map(|r| r.input).collect();
        self.wal = None;
        if let Some(last) = self.pending.last() {
            self.last_hash = last.hash.clone();
            self.next_archive_seq = last.archive_seq + 1;
            self.sealed
                .push((self.wal_no, std::mem::take(&mut self.pending)));
        } else if let Some((_, rows)) = self.sealed.last()
            && let Some(last) = rows.last()
        {
            self.last_hash = last.hash.clone();
            self.next_archive_seq = last.archive_seq + 1;
        } else {
            let (hash, tip) = self.manifest.chain_tip();
            self.last_hash = hash;
            self.next_archive_seq = tip + 1;
        }
        self.synced = 0;
        dropped
    }

    /// Records not yet in a published file (sealed segments included).
    pub fn pending_rows(&self) -> usize {
        self.pending.len() + self.sealed.iter().map(|(_, r)| r.len()).sum::<usize>()
    }

    pub fn wants_roll(&self) -> bool {
        self.pending.len() >= self.cfg.max_rows
    }

    /// Turn the open segment into a published Parquet file (after any sealed ones). Returns
    /// the path of the last file written, if any.
    pub fn roll(&mut self) -> io::Result<Option<PathBuf>> {
        let mut last = None;
        while !self.sealed.is_empty() {
            let (n, rows) = self.sealed.remove(0);
            match self.publish(n, &rows) {
                Ok(path) => last = Some(path),
                Err(e) => {
                    // Still oldest: it goes back to the front for the next attempt.
                    self.sealed.insert(0, (n, rows));
                    return Err(e);
                }
            }
            remove_if_present(&self.wal_dir().join(format!("{n:012}.wal")))?;
        }
        let Some(mut wal) = self.wal.take() else {
            return Ok(last);
        };
        wal.sync()?;
        let rows = std::mem::take(&mut self.pending);
        self.synced = 0;
        if !rows.is_empty() {
            match self.publish(self.wal_no, &rows) {
                Ok(path) => last = Some(path),
                Err(e) => {
                    // Durable in its segment: kept in order for the next attempt.
                    self.sealed.push((self.wal_no, rows));
                    return Err(e);
                }
            }
        }
        fs::remove_file(wal.path())?;
        Ok(last)
    }

    /// Delete the files of partitions older than `days` days before `today` (days since the
    /// Unix epoch, UTC), recording the deletion in the manifest first so that `airlock verify`
    /// tells retention from tampering. Finishes deletions a crash interrupted. Returns the
    /// files removed.
    pub fn apply_retention(&mut self, days: u32, today: i64) -> io::Result<Vec<String>> {
        let cutoff = today - i64::from(days);
        let removed = super::manifest::retention_removals(&self.manifest.entries);
        let expired: Vec<String> = self
            .manifest
            .entries
            .iter()
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

    /// Write rows as the Parquet file of segment `n`, then its manifest line.
    fn publish(&mut self, n: u64, rows: &[Record]) -> io::Result<PathBuf> {
        let first = &rows[0];
        let last = &rows[rows.len() - 1];
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH
                + std::time::Duration::from_micros(u64::try_from(first.input.ts_us).unwrap_or(0)),
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
        let file = columns::write(file, rows).map_err(columns::io_error)?;
        file.sync_all()?;
        drop(file);
        let final_path = dir.join(&name);
        fs::rename(&tmp, &final_path)?;
        File::open(&dir)?.sync_all()?;
        let sha256 = hex(&sha2::Sha256::digest(fs::read(&final_path)?));
        self.manifest.append(
            EntryBody::File {
                path: rel_dir.join(&name).to_string_lossy().into_owned(),
                segment: n,
                sha256,
                rows: rows.len() as u64,
                first_archive_seq: first.archive_seq,
                last_archive_seq: last.archive_seq,
                first_prev_hash: first.prev_hash.clone(),
                last_hash: last.hash.clone(),
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
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
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
