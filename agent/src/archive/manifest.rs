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

/// Check signatures and the line chain. Returns the lines it could parse and one message per
/// problem, each naming the line.
pub fn verify(path: &Path, public_key_hex: &str) -> (Vec<Entry>, Vec<String>) {
    let mut problems = Vec::new();
    let key = match decode_key(public_key_hex) {
        Ok(k) => k,
        Err(e) => return (Vec::new(), vec![format!("manifest public key: {e}")]),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return (
                Vec::new(),
                vec![format!("manifest {}: {e}", path.display())],
            );
        }
    };
    let mut entries = Vec::new();
    let mut prev = GENESIS.to_owned();
    let mut expected_seq = 1;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let n = i + 1;
        let entry: Entry = match serde_json::from_str(line) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!(
                    "manifest line {n}: unreadable ({e}): modified or truncated"
                ));
                prev = hex(&sha2::Sha256::digest(line.as_bytes()));
                continue;
            }
        };
        // Strict verification: no malleable signatures, no small-order keys.
        let sig_ok = decode_sig(&entry.sig)
            .is_ok_and(|s| key.verify_strict(&entry.signed_bytes(), &s).is_ok());
        if !sig_ok {
            problems.push(format!(
                "manifest line {n}: bad signature: the line was modified"
            ));
        }
        if entry.prev != prev {
            problems.push(format!("manifest line {n}: does not follow the line before it: lines were removed, inserted or reordered"));
        }
        if entry.seq != expected_seq {
            problems.push(format!(
                "manifest line {n}: sequence {} where {expected_seq} was expected",
                entry.seq
            ));
        }
        expected_seq = entry.seq + 1;
        prev = hex(&sha2::Sha256::digest(line.as_bytes()));
        entries.push(entry);
    }
    (entries, problems)
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
