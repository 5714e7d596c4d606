//! `airlock verify`: check an archive directory against its signed manifests.
//!
//! Reports, each naming the file (and record where it applies): a modified, truncated,
//! deleted, inserted or reordered file; a modified, removed, inserted or reordered record;
//! an altered, removed or reordered manifest line. Files removed by retention may be gone; if
//! present (a fleet's bucket keeps them, a backup restored them) they are checked like any other.
//!
//! Trust does not come from the archive: the public key stored next to a manifest proves
//! nothing to someone who could rewrite both. Each host's key must come from the verifier
//! ([`Trust`]: a key passed with `--pubkey`, a fingerprint pinned in the configuration, or the
//! signing key of the host the verifier runs on); a host without one is reported as
//! untrusted. Signatures are checked strictly (no malleable signatures, no weak keys). The
//! chain head of each host (last manifest line, its time, last record) is reported, so a cut
//! tail shows against the head a verifier kept elsewhere (`--expect-head`).

use std::{collections::BTreeMap, fs, path::Path};

use super::{
    files,
    manifest::{self, EntryBody},
};

#[derive(Debug, Default)]
pub struct Report {
    pub hosts: Vec<String>,
    pub files_checked: usize,
    pub records_checked: u64,
    pub retained_deletions: usize,
    pub problems: Vec<String>,
    /// Each host's chain head, with the key it was verified with.
    pub heads: Vec<Head>,
}

/// Where a host's chain ends, as verified.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Head {
    pub host: String,
    /// The last manifest line (its sequence number) and its time.
    pub manifest_seq: u64,
    pub manifest_ts: String,
    /// The archive sequence number of the last record a manifest line lists.
    pub last_record_seq: Option<u64>,
    pub key_fingerprint: String,
    /// Where trust in the key came from (`None`: nowhere, the host is untrusted).
    pub trusted_by: Option<String>,
}

/// What the verifier trusts: keys and fingerprints it brings, heads it expects.
#[derive(Debug, Default, Clone)]
pub struct Trust {
    /// Public keys (hex) by host; `None` applies to every host.
    pub keys: Vec<(Option<String>, String, String)>,
    /// Pinned `sha256:` fingerprints of public keys, by host, and where each was pinned.
    pub fingerprints: BTreeMap<String, (String, String)>,
    /// The least manifest line each host's chain must reach.
    pub expected_heads: BTreeMap<String, u64>,
    /// A fleet copy (`verify --fleet`): every host the verifier pinned a fingerprint for is
    /// expected in it too (a local archive holds one host; a fleet-wide configuration pins
    /// them all).
    pub fleet: bool,
}

impl Trust {
    /// From the command line — `--pubkey [HOST=]KEY` (hex, or a file holding it) and
    /// `--expect-head HOST=LINE` — and, when there is one, the configuration: its pinned
    /// `archive_key_fingerprints`, and the public half of this host's own signing key.
    pub fn build(
        pubkeys: &[String],
        heads: &[String],
        config: Option<&crate::config::Config>,
    ) -> Result<Trust, String> {
        let mut trust = Trust::default();
        for arg in pubkeys {
            let (host, key) = match arg.split_once('=') {
                Some((h, k)) if !h.is_empty() && !h.contains('/') => (Some(h.to_owned()), k),
                _ => (None, arg.as_str()),
            };
            let hex_key = if Path::new(key).is_file() {
                fs::read_to_string(key)
                    .map_err(|e| format!("--pubkey {key}: {e}"))?
                    .trim()
                    .to_owned()
            } else {
                key.trim().to_owned()
            };
            manifest::fingerprint(&hex_key)
                .map_err(|e| format!("--pubkey {arg}: not an Ed25519 public key ({e})"))?;
            trust.keys.push((host, hex_key, "--pubkey".into()));
        }
        for arg in heads {
            let (host, line) = arg
                .split_once('=')
                .ok_or_else(|| format!("--expect-head {arg}: HOST=LINE expected"))?;
            let line: u64 = line
                .parse()
                .map_err(|_| format!("--expect-head {arg}: LINE must be a number"))?;
            trust.expected_heads.insert(host.to_owned(), line);
        }
        if let Some(config) = config {
            for (host, fp) in &config.archive_key_fingerprints {
                trust.fingerprints.insert(
                    host.clone(),
                    (fp.clone(), format!("pinned in {}", config.path.display())),
                );
            }
            let own = config.state_dir.join("archive-signing.key");
            if !trust
                .keys
                .iter()
                .any(|(h, _, _)| h.as_deref() == Some(&config.host))
                && let Ok(key) = manifest::public_key_of(&own)
            {
                trust.keys.push((
                    Some(config.host.clone()),
                    key,
                    format!("signing key {}", own.display()),
                ));
            }
        }
        Ok(trust)
    }

    /// Hosts the archive must hold, and why: named by `--expect-head` or `--pubkey HOST=KEY`,
    /// and for a fleet copy pinned in `archive_key_fingerprints` too. A host that vanished
    /// whole is missing, not merely unverified.
    fn expected_hosts(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for host in self.expected_heads.keys() {
            out.insert(
                host.clone(),
                "a head was expected (--expect-head)".to_owned(),
            );
        }
        for (host, _, via) in &self.keys {
            if let Some(host) = host
                && via == "--pubkey"
            {
                out.entry(host.clone())
                    .or_insert_with(|| "its key was given (--pubkey)".to_owned());
            }
        }
        if self.fleet {
            for (host, (_, pinned)) in &self.fingerprints {
                out.entry(host.clone())
                    .or_insert_with(|| format!("its key is pinned ({pinned})"));
            }
        }
        out
    }

    /// A key for `host` (hex) and where it came from.
    fn key_for(&self, host: &str) -> Option<(&str, &str)> {
        self.keys
            .iter()
            .find(|(h, _, _)| h.as_deref() == Some(host))
            .or_else(|| self.keys.iter().find(|(h, _, _)| h.is_none()))
            .map(|(_, k, via)| (k.as_str(), via.as_str()))
    }
}

impl Report {
    pub fn intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verify a local archive directory: each host's manifest in `_manifest/<host>.jsonl`.
pub fn verify(archive_dir: &Path, trust: &Trust) -> Report {
    let manifest_dir = archive_dir.join("_manifest");
    let mut hosts: Vec<String> = fs::read_dir(&manifest_dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let p = e.path();
                    (p.extension()? == "jsonl")
                        .then(|| p.file_stem()?.to_str().map(str::to_owned))?
                })
                .collect()
        })
        .unwrap_or_default();
    hosts.sort();
    let manifests = hosts
        .into_iter()
        .map(|host| {
            let path = manifest::manifest_path(archive_dir, &host);
            let lines = manifest::stored_lines(&path, &host)
                .map_err(|e| format!("host {host}: manifest {}: {e}", path.display()));
            (host, lines)
        })
        .collect();
    verify_manifests(archive_dir, trust, manifests)
}

/// Verify an archive directory whose manifests are given line by line (a fleet copy: one
/// bucket object per line, named by its key). Public keys and files are in `archive_dir`.
pub fn verify_manifests(
    archive_dir: &Path,
    trust: &Trust,
    manifests: BTreeMap<String, Result<Vec<manifest::StoredLine>, String>>,
) -> Report {
    let mut report = Report::default();
    if manifests.is_empty() {
        report.problems.push(format!(
            "{}: no manifest: nothing can be verified",
            archive_dir.join("_manifest").display()
        ));
    }
    let mut listed = files::Listed {
        on_disk: files::parquet_files(archive_dir),
        ..Default::default()
    };
    for (host, lines) in &manifests {
        match lines {
            Ok(lines) => verify_host(archive_dir, host, lines, trust, &mut report, &mut listed),
            Err(e) => report.problems.push(e.clone()),
        }
    }
    let hosts: Vec<String> = manifests.into_keys().collect();
    // A host the verifier expects and the archive lacks: its files are gone whole.
    for (host, why) in trust.expected_hosts() {
        if !hosts.contains(&host) {
            report.problems.push(format!(
                "host {host}: no manifest, but {why}: the host's archive is missing"
            ));
        }
    }
    // Files on disk that no manifest lists were put there by someone else — or, when some
    // lines are not valid, may be what such a line listed.
    for path in &listed.on_disk {
        let rel = path.strip_prefix(archive_dir).unwrap_or(path).to_owned();
        if !listed.paths.contains(&rel) {
            report.problems.push(listed.unlisted(&rel));
        }
    }
    report.hosts = hosts;
    report
}

fn verify_host(
    archive_dir: &Path,
    host: &str,
    lines: &[manifest::StoredLine],
    trust: &Trust,
    report: &mut Report,
    listed: &mut files::Listed,
) {
    let stored = fs::read_to_string(manifest::public_key_path(archive_dir, host))
        .map(|k| k.trim().to_owned());
    let (public, trusted_by) = match (trust.key_for(host), trust.fingerprints.get(host)) {
        (Some((key, via)), pinned) => {
            if stored
                .as_deref()
                .is_ok_and(|s| !s.eq_ignore_ascii_case(key.trim()))
            {
                report.problems.push(format!(
                    "host {host}: the public key stored in the archive is not the trusted one: replaced"
                ));
            }
            // Every source of trust must agree: a key brought for the host (or for all hosts)
            // that is not the one pinned for it is a mistake or a substitution.
            if let Some((fp, pinned_where)) = pinned
                && manifest::fingerprint(key).as_ref() != Ok(fp)
            {
                report.problems.push(format!(
                    "host {host}: the key from {via} is not the one pinned ({fp}, {pinned_where})"
                ));
            }
            (key.trim().to_owned(), Some(via.to_owned()))
        }
        (None, Some((pinned, via))) => match &stored {
            Ok(k) if manifest::fingerprint(k).as_ref() == Ok(pinned) => {
                (k.clone(), Some(via.clone()))
            }
            Ok(k) => {
                report.problems.push(format!(
                    "host {host}: the archive's public key ({}) is not the pinned {pinned}: replaced",
                    manifest::fingerprint(k).unwrap_or_else(|e| e)
                ));
                return;
            }
            Err(e) => {
                report
                    .problems
                    .push(format!("host {host}: public key unreadable: {e}"));
                return;
            }
        },
        (None, None) => match &stored {
            Ok(k) => {
                report.problems.push(format!(
                    "host {host}: UNTRUSTED: no key from the verifier (pass --pubkey {host}=KEY or pin its fingerprint in `archive_key_fingerprints`); the key stored in the archive proves nothing"
                ));
                (k.clone(), None)
            }
            Err(e) => {
                report
                    .problems
                    .push(format!("host {host}: public key unreadable: {e}"));
                return;
            }
        },
    };
    let (checked, problems) = manifest::verify_lines(lines, &public);
    report.problems.extend(problems);
    // The head is the furthest valid line: a forged line proves nothing, not even a length.
    let valid: Vec<&manifest::Entry> = checked
        .iter()
        .filter(|l| l.valid)
        .map(|l| &l.entry)
        .collect();
    listed
        .not_valid
        .insert(host.to_owned(), lines.len() - valid.len());
    let last = valid.iter().max_by_key(|e| e.seq);
    let head = Head {
        host: host.to_owned(),
        manifest_seq: last.map_or(0, |e| e.seq),
        manifest_ts: last.map(|e| e.ts.clone()).unwrap_or_default(),
        last_record_seq: valid
            .iter()
            .filter_map(|e| match &e.body {
                EntryBody::File {
                    last_archive_seq, ..
                } => Some(*last_archive_seq),
                EntryBody::Retention { .. } => None,
            })
            .max(),
        key_fingerprint: manifest::fingerprint(&public).unwrap_or_else(|e| format!("invalid: {e}")),
        trusted_by,
    };
    if let Some(expected) = trust.expected_heads.get(host)
        && head.manifest_seq < *expected
    {
        report.problems.push(if valid.len() < lines.len() {
            format!(
                "host {host}: the valid lines end at line {}, line {expected} was expected: its tail was cut, or is among the lines that are not valid",
                head.manifest_seq
            )
        } else {
            format!(
                "host {host}: the manifest ends at line {}, line {expected} was expected: its tail was cut",
                head.manifest_seq
            )
        });
    }
    report.heads.push(head);
    // Files chain in the order their lines were signed in; lines stored out of that order are
    // a problem of the manifest, reported above, not of the files.
    let mut ordered = checked;
    ordered.sort_by_key(|l| l.entry.seq);
    files::check(archive_dir, host, &ordered, report, listed);
}

/// One line on a host's head: what a verifier keeps off-host to detect a cut tail later.
pub fn head_line(h: &Head) -> String {
    format!(
        "HEAD host={} manifest_line={} at={} last_record={} key={} trusted={}",
        h.host,
        h.manifest_seq,
        if h.manifest_ts.is_empty() {
            "-"
        } else {
            &h.manifest_ts
        },
        h.last_record_seq.map_or("-".into(), |s| s.to_string()),
        h.key_fingerprint,
        h.trusted_by.as_deref().unwrap_or("NO (untrusted)"),
    )
}
