//! `airlock verify`: check an archive directory against its signed manifests.
//!
//! Reports, each naming the file (and record where it applies): a modified, truncated,
//! deleted, inserted or reordered file; a modified, removed, inserted or reordered record;
//! an altered, removed or reordered manifest line. Files removed by retention are expected.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use sha2::Digest as _;

use super::{
    columns,
    manifest::{self, EntryBody},
    record::hex,
};

#[derive(Debug, Default)]
pub struct Report {
    pub hosts: Vec<String>,
    pub files_checked: usize,
    pub records_checked: u64,
    pub retained_deletions: usize,
    pub problems: Vec<String>,
}

impl Report {
    pub fn intact(&self) -> bool {
        self.problems.is_empty()
    }
}

pub fn verify(archive_dir: &Path) -> Report {
    let mut report = Report::default();
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
    if hosts.is_empty() {
        report.problems.push(format!(
            "{}: no manifest: nothing can be verified",
            manifest_dir.display()
        ));
    }
    let mut listed: BTreeSet<PathBuf> = BTreeSet::new();
    for host in &hosts {
        verify_host(archive_dir, host, &mut report, &mut listed);
    }
    // Files on disk that no manifest lists were put there by someone else.
    for path in parquet_files(archive_dir) {
        let rel = path.strip_prefix(archive_dir).unwrap_or(&path).to_owned();
        if !listed.contains(&rel) {
            report
                .problems
                .push(format!("{}: inserted: not in any manifest", rel.display()));
        }
    }
    report.hosts = hosts;
    report
}

fn verify_host(
    archive_dir: &Path,
    host: &str,
    report: &mut Report,
    listed: &mut BTreeSet<PathBuf>,
) {
    let public = match fs::read_to_string(manifest::public_key_path(archive_dir, host)) {
        Ok(k) => k,
        Err(e) => {
            report
                .problems
                .push(format!("host {host}: public key unreadable: {e}"));
            return;
        }
    };
    let (entries, problems) =
        manifest::verify(&manifest::manifest_path(archive_dir, host), &public);
    report
        .problems
        .extend(problems.into_iter().map(|p| format!("host {host}: {p}")));
    let removed = manifest::retention_removals(&entries);
    report.retained_deletions += removed.len();
    // The record chain runs across this host's files in manifest order.
    let mut expected_prev: Option<String> = None;
    let mut expected_seq: Option<u64> = None;
    let mut seen_paths: BTreeMap<String, u64> = BTreeMap::new();
    for entry in &entries {
        let EntryBody::File {
            path,
            sha256,
            rows,
            first_archive_seq,
            last_archive_seq,
            first_prev_hash,
            last_hash,
            ..
        } = &entry.body
        else {
            continue;
        };
        listed.insert(PathBuf::from(path));
        if let Some(first_line) = seen_paths.insert(path.clone(), entry.seq) {
            report.problems.push(format!(
                "{path}: listed twice in the manifest (lines {first_line} and {})",
                entry.seq
            ));
        }
        if let Some(exp) = &expected_prev
            && first_prev_hash != exp
        {
            report.problems.push(format!("{path}: does not continue the previous file's hash chain: files were removed or reordered"));
        }
        if let Some(exp) = expected_seq
            && *first_archive_seq != exp
        {
            report.problems.push(format!("{path}: starts at record {first_archive_seq}, {exp} expected: records are missing between files"));
        }
        expected_prev = Some(last_hash.clone());
        expected_seq = Some(last_archive_seq + 1);
        let full = archive_dir.join(path);
        if removed.contains(path) {
            if full.exists() {
                report.problems.push(format!(
                    "{path}: recorded as deleted by retention, but present"
                ));
            }
            continue;
        }
        let bytes = match fs::read(&full) {
            Ok(b) => b,
            Err(_) => {
                report
                    .problems
                    .push(format!("{path}: deleted (no retention line covers it)"));
                continue;
            }
        };
        report.files_checked += 1;
        if hex(&sha2::Sha256::digest(&bytes)) != *sha256 {
            report.problems.push(format!(
                "{path}: modified or truncated: its SHA-256 differs from the manifest"
            ));
        }
        // Rows are stored by session: keep each one's place in the chain (not its content),
        // then walk the chain in order.
        let mut links: Vec<(u64, String, String, bool)> = Vec::new();
        let read = columns::for_each_row(&full, |r| {
            let valid = r.hash_is_valid();
            links.push((r.archive_seq, r.prev_hash, r.hash, valid));
        });
        if let Err(e) = read {
            report.problems.push(format!("{path}: unreadable: {e}"));
            continue;
        }
        links.sort_by_key(|l| l.0);
        report.records_checked += links.len() as u64;
        if links.len() as u64 != *rows {
            report.problems.push(format!(
                "{path}: {} records where the manifest says {rows}: records removed or inserted",
                links.len()
            ));
        }
        let mut prev = first_prev_hash.clone();
        let mut seq = *first_archive_seq;
        for (archive_seq, prev_hash, hash, valid) in &links {
            if *archive_seq != seq {
                report.problems.push(format!(
                    "{path}: record {archive_seq}: {seq} expected: records removed, inserted or reordered"
                ));
            }
            if !valid {
                report.problems.push(format!(
                    "{path}: record {archive_seq}: content does not match its hash: modified"
                ));
            }
            if *prev_hash != prev {
                report.problems.push(format!("{path}: record {archive_seq}: does not follow the record before it: removed, inserted or reordered"));
            }
            prev.clone_from(hash);
            seq = archive_seq + 1;
        }
        if links.last().is_some_and(|l| l.2 != *last_hash) {
            report.problems.push(format!(
                "{path}: last record is not the one the manifest names: truncated"
            ));
        }
    }
}

/// Every `*.parquet` under the archive (not the manifest or WAL directories).
fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.filter_map(Result::ok) {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if !name.starts_with('_') {
                out.extend(parquet_files(&p));
            }
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
    out.sort();
    out
}
