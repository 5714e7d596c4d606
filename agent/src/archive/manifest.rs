//! The manifest: one signed line per published archive file (or retention deletion), each
//! naming the SHA-256 of the line before it. Altering, removing or reordering lines breaks a
//! signature or the chain; a file that differs from its line, is missing without a retention
//! line, or has no line at all is reported by `airlock verify`.
//!
//! Lines are Ed25519-signed with a per-installation key (`state_dir/archive-signing.key`,
//! 0600). The public key sits next to the manifest. Root on the host can still rewrite both;
//! shipping manifests off the host is what makes deletions provable (see ARCHIVE.md).

use std::{
    fs::{File, OpenOptions},
    io::{self, BufRead, BufReader, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::record::{GENESIS, hex};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// RFC 3339, UTC.
    pub ts: String,
    pub host: String,
    #[serde(flatten)]
    pub body: EntryBody,
    /// SHA-256 (hex) of the previous line, or [`GENESIS`].
    pub prev: String,
    /// Ed25519 signature (hex) over the line without this field.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EntryBody {
    /// A published Parquet file.
    File {
        /// Relative to the archive directory.
        path: String,
        /// The write-ahead segment the file was made from (file names derive from it).
        segment: u64,
        sha256: String,
        rows: u64,
        first_archive_seq: u64,
        last_archive_seq: u64,
        /// `prev_hash` of the file's first record (the previous file's last hash).
        first_prev_hash: String,
        last_hash: String,
    },
    /// Files deleted by retention: verify then expects them gone.
    Retention {
        removed: Vec<String>,
        retention_days: u32,
    },
}

impl Entry {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.sig.clear();
        serde_json::to_vec(&unsigned).unwrap_or_default()
    }
}

/// Paths that retention lines of `entries` record as deleted.
pub fn retention_removals(entries: &[Entry]) -> std::collections::BTreeSet<String> {
    entries
        .iter()
        .filter_map(|e| match &e.body {
            EntryBody::Retention { removed, .. } => Some(removed.iter().cloned()),
            EntryBody::File { .. } => None,
        })
        .flatten()
        .collect()
}

/// Where a host's manifest and public key live.
pub fn manifest_path(archive_dir: &Path, host: &str) -> PathBuf {
    archive_dir.join("_manifest").join(format!("{host}.jsonl"))
}

pub fn public_key_path(archive_dir: &Path, host: &str) -> PathBuf {
    archive_dir.join("_manifest").join(format!("{host}.pub"))
}

/// Load the signing key, creating it (0600) on first use.
pub fn signing_key(path: &Path) -> io::Result<SigningKey> {
    match std::fs::read(path) {
        Ok(bytes) => {
            // A key another user planted or can read signs nothing.
            crate::fsperm::check_secret_file(path)?;
            let secret: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not a 32-byte key", path.display()),
                )
            })?;
            Ok(SigningKey::from_bytes(&secret))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(|e| io::Error::other(e.to_string()))?;
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(&secret)?;
            f.sync_all()?;
            Ok(SigningKey::from_bytes(&secret))
        }
        Err(e) => Err(e),
    }
}

/// An open manifest, appended to by the archive writer.
pub struct Manifest {
    path: PathBuf,
    key: SigningKey,
    host: String,
    last_line_hash: String,
    next_seq: u64,
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Open (or create) a host's manifest; writes the public key beside it.
    pub fn open(
        archive_dir: &Path,
        host: &str,
        key: SigningKey,
        file_mode: u32,
    ) -> io::Result<Manifest> {
        let path = manifest_path(archive_dir, host);
        let pub_path = public_key_path(archive_dir, host);
        let public = hex(key.verifying_key().as_bytes());
        if std::fs::read_to_string(&pub_path)
            .map(|p| p.trim() != public)
            .unwrap_or(true)
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(file_mode)
                .open(&pub_path)?;
            writeln!(f, "{public}")?;
            f.sync_all()?;
        }
        let (entries, last_line_hash) = match File::open(&path) {
            Ok(f) => read_lines(BufReader::new(f))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Vec::new(), GENESIS.to_owned()),
            Err(e) => return Err(e),
        };
        let next_seq = entries.last().map_or(1, |e| e.seq + 1);
        Ok(Manifest {
            path,
            key,
            host: host.to_owned(),
            last_line_hash,
            next_seq,
            entries,
        })
    }

    /// Sign and append one line, durably.
    pub fn append(&mut self, body: EntryBody, file_mode: u32) -> io::Result<Entry> {
        let mut entry = Entry {
            seq: self.next_seq,
            ts: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            host: self.host.clone(),
            body,
            prev: self.last_line_hash.clone(),
            sig: String::new(),
        };
        entry.sig = hex(&self.key.sign(&entry.signed_bytes()).to_bytes());
        let line = serde_json::to_string(&entry).map_err(io::Error::other)?;
        let created = !self.path.exists();
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(file_mode)
            .open(&self.path)?;
        f.write_all(line.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        if created && let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.last_line_hash = hex(&sha2::Sha256::digest(line.as_bytes()));
        self.next_seq += 1;
        self.entries.push(entry.clone());
        Ok(entry)
    }

    /// The highest segment number a published file came from.
    pub fn last_segment(&self) -> u64 {
        self.entries
            .iter()
            .filter_map(|e| match &e.body {
                EntryBody::File { segment, .. } => Some(*segment),
                EntryBody::Retention { .. } => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// The last record hash and archive sequence the manifest vouches for.
    pub fn chain_tip(&self) -> (String, u64) {
        self.entries
            .iter()
            .rev()
            .find_map(|e| match &e.body {
                EntryBody::File {
                    last_hash,
                    last_archive_seq,
                    ..
                } => Some((last_hash.clone(), *last_archive_seq)),
                EntryBody::Retention { .. } => None,
            })
            .unwrap_or_else(|| (GENESIS.to_owned(), 0))
    }
}

fn read_lines(reader: impl BufRead) -> io::Result<(Vec<Entry>, String)> {
    let mut entries = Vec::new();
    let mut last = GENESIS.to_owned();
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let entry: Entry = serde_json::from_str(&line).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("manifest line {}: {e}", entries.len() + 1),
            )
        })?;
        last = hex(&sha2::Sha256::digest(line.as_bytes()));
        entries.push(entry);
    }
    Ok((entries, last))
}

/// One stored manifest line, as a verifier finds it.
#[derive(Debug, Clone)]
pub struct StoredLine {
    /// What a report's problem with it starts with: `host runner-7: manifest line 12` (a line
    /// of a local file), or a bucket object's key with the host and line as context.
    pub name: String,
    /// How other problems refer to it: `manifest line 12 of host runner-7`, or the key.
    pub mention: String,
    /// The line without its newline; `None`: missing (a bucket's line object between others).
    pub bytes: Option<Vec<u8>>,
    /// How its storage differs from what the writer stored, whatever its content (a bucket
    /// object that is not exactly one line ending in a newline).
    pub defect: Option<String>,
}

/// The lines of a local manifest file, each named `host {host}: manifest line {n}` (its line
/// number in the file). A last line without its newline (a write cut by a crash) is a line.
pub fn stored_lines(path: &Path, host: &str) -> io::Result<Vec<StoredLine>> {
    let bytes = std::fs::read(path)?;
    let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    Ok(lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| StoredLine {
            name: format!("host {host}: manifest line {}", i + 1),
            mention: format!("manifest line {} of host {host}", i + 1),
            bytes: Some(l.to_vec()),
            defect: None,
        })
        .collect())
}

/// A stored line as verified: its entry, and whether it is the host's (its signature
/// verifies). Only valid lines vouch for anything; the others are reported.
#[derive(Debug, Clone)]
pub struct CheckedLine {
    /// [`StoredLine::mention`].
    pub mention: String,
    pub entry: Entry,
    pub valid: bool,
}

/// Check signatures and the line chain. Returns the lines it could parse, in order, and one
/// message per problem, each naming the stored line.
///
/// What the chain lets a verifier conclude, and no more: a line whose signature verifies is
/// the host's, and names its sequence number and the SHA-256 of the line written before it.
/// Between two valid lines with sequence numbers `a < b`, the signer wrote `b - a - 1` lines.
/// Lines that are not valid (modified, forged, unreadable, missing) are reported one by one;
/// when they are exactly as many as the lines written between their valid neighbours (less
/// those found elsewhere), they stand in those lines' places, and the valid line after them
/// is not accused of anything: it cannot name the hash of a line that was rewritten, and that
/// is no fault of its own. Only a count that differs (lines removed or inserted), a sequence
/// out of order, or a valid line that does not name the valid line right before it is a
/// further problem.
pub fn verify_lines(lines: &[StoredLine], public_key_hex: &str) -> (Vec<CheckedLine>, Vec<String>) {
    let key = match decode_key(public_key_hex) {
        Ok(k) => k,
        Err(e) => return (Vec::new(), vec![format!("manifest public key: {e}")]),
    };
    let mut problems = Vec::new();
    let mut checked = Vec::new();
    // Each line: its entry if it parses, and its SHA-256 as the next line names it (the
    // signed line's own bytes, for a valid line stored in another form).
    let mut parsed: Vec<Option<(Entry, bool, String)>> = Vec::with_capacity(lines.len());
    for line in lines {
        let Some(bytes) = &line.bytes else {
            parsed.push(None);
            continue;
        };
        let also = line
            .defect
            .as_deref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        let entry = match serde_json::from_slice::<Entry>(bytes) {
            Ok(e) => e,
            Err(e) => {
                let why = if bytes.iter().all(u8::is_ascii_whitespace) {
                    "empty".to_owned()
                } else {
                    e.to_string()
                };
                problems.push(format!(
                    "{}: unreadable ({why}): modified or truncated{also}",
                    line.name
                ));
                parsed.push(None);
                continue;
            }
        };
        // Strict verification: no malleable signatures, no small-order keys.
        let valid = decode_sig(&entry.sig)
            .is_ok_and(|s| key.verify_strict(&entry.signed_bytes(), &s).is_ok());
        let written = serde_json::to_vec(&entry).unwrap_or_default();
        if !valid {
            problems.push(format!(
                "{}: bad signature: the line was modified{also}",
                line.name
            ));
        } else if written != *bytes || line.defect.is_some() {
            problems.push(format!(
                "{}: not stored as written ({}): modified, though its signed content is intact",
                line.name,
                line.defect
                    .as_deref()
                    .unwrap_or("its bytes differ from the signed line's")
            ));
        }
        let hash = hex(&sha2::Sha256::digest(&written));
        checked.push(CheckedLine {
            mention: line.mention.clone(),
            entry: entry.clone(),
            valid,
        });
        parsed.push(Some((entry, valid, hash)));
    }
    // Sequence numbers of the valid lines, wherever they stand.
    let present: std::collections::BTreeSet<u64> = parsed
        .iter()
        .flatten()
        .filter(|(_, valid, _)| *valid)
        .map(|(e, _, _)| e.seq)
        .collect();
    // The last valid line in order (sequence 0 and the genesis hash before the first), and
    // the lines since that are not valid.
    let (mut at_seq, mut at_hash) = (0u64, GENESIS.to_owned());
    let mut between: Vec<usize> = Vec::new();
    for (i, p) in parsed.iter().enumerate() {
        let Some((entry, true, hash)) = p else {
            between.push(i);
            continue;
        };
        let name = &lines[i].name;
        let s = entry.seq;
        if s <= at_seq {
            problems.push(format!(
                "{name}: holds line {s}, after line {at_seq}: lines were reordered or repeated"
            ));
            continue;
        }
        let written = s - at_seq - 1;
        let elsewhere = present.range(at_seq + 1..s).count() as u64;
        let missing = written - elsewhere;
        let k = between.len() as u64;
        if elsewhere > 0 {
            problems.push(format!(
                "{name}: holds line {s}, after line {at_seq}: {elsewhere} line(s) written between them stand elsewhere: lines were reordered"
            ));
        }
        if missing > k {
            problems.push(format!(
                "{name}: holds line {s}, after line {at_seq}: {} line(s) before it are missing: removed",
                missing - k
            ));
        } else if missing < k {
            problems.push(format!(
                "{name}: holds line {s}, after line {at_seq}: {} line(s) before it were never written: inserted",
                k - missing
            ));
        } else if written == 0 && entry.prev != at_hash {
            problems.push(format!(
                "{name}: does not follow the line before it: lines were removed, inserted or reordered"
            ));
        }
        // A line object missing between others is provably gone once a valid line after it
        // shows the chain went on.
        for &j in &between {
            if lines[j].bytes.is_none() {
                problems.push(format!(
                    "{}: missing, though later lines exist: removed",
                    lines[j].name
                ));
            }
        }
        between.clear();
        at_seq = s;
        at_hash.clone_from(hash);
    }
    (checked, problems)
}

fn decode_key(hex_key: &str) -> Result<VerifyingKey, String> {
    let bytes = unhex(hex_key.trim()).ok_or("not hex")?;
    let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| "not 32 bytes")?;
    let key = VerifyingKey::from_bytes(&arr).map_err(|e| e.to_string())?;
    if key.is_weak() {
        return Err("a weak (small-order) key".into());
    }
    Ok(key)
}

/// `sha256:<hex>` of a public key's 32 bytes: what a verifier pins. `Err` when `hex_key` is
/// not a valid Ed25519 public key.
pub fn fingerprint(hex_key: &str) -> Result<String, String> {
    let key = decode_key(hex_key)?;
    Ok(format!(
        "sha256:{}",
        hex(&sha2::Sha256::digest(key.as_bytes()))
    ))
}

/// The public key (hex) of a signing key file, for a verifier on the host that signs.
pub fn public_key_of(signing_key_path: &Path) -> io::Result<String> {
    let bytes = std::fs::read(signing_key_path)?;
    let secret: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a 32-byte key", signing_key_path.display()),
        )
    })?;
    Ok(hex(SigningKey::from_bytes(&secret)
        .verifying_key()
        .as_bytes()))
}

fn decode_sig(hex_sig: &str) -> Result<Signature, String> {
    let bytes = unhex(hex_sig).ok_or("not hex")?;
    let arr: [u8; 64] = bytes.as_slice().try_into().map_err(|_| "not 64 bytes")?;
    Ok(Signature::from_bytes(&arr))
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
