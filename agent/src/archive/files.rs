//! `airlock verify`, one host's files: each Parquet file against its manifest line, and the
//! record hash chain across the files in manifest order.
//!
//! A valid line (its signature verifies) vouches for its file: digest, row count, first and
//! last record, and where the chain stands before and after it. A line that is not valid
//! (reported by [`manifest::verify_lines`]) vouches for nothing, and nothing is concluded from
//! what it says: its file, when present, is checked on its own (every record's hash, the chain
//! inside it) and against the chain around it. Once the next valid line's file continues its
//! records, they are the host's: a hash chain cannot be rewritten to end where a valid line
//! says it ends. Where the chain breaks after lines that are not valid (or missing), files no
//! line lists are tried in the gap: a file whose line was modified or removed still chains into
//! its place, and is neither called inserted nor missed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Component, Path, PathBuf},
};

use sha2::Digest as _;

use super::{
    columns,
    manifest::{CheckedLine, EntryBody},
    record::{GENESIS, hex},
    verify::Report,
};

/// What the manifests list, across hosts (anything else on disk is reported).
#[derive(Default)]
pub(super) struct Listed {
    pub paths: BTreeSet<PathBuf>,
    /// Every Parquet file under the archive (read once).
    pub on_disk: Vec<PathBuf>,
    /// Each host's lines that are not valid: a file of the host's that no line lists may be
    /// one such a line listed, and is not "inserted" for sure.
    pub not_valid: BTreeMap<String, usize>,
}

impl Listed {
    /// What to say of a file on disk no line lists.
    pub fn unlisted(&self, rel: &Path) -> String {
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        match self
            .not_valid
            .iter()
            .find(|(host, n)| **n > 0 && is_file_of(host, name))
        {
            Some((host, n)) => format!(
                "{}: in no valid manifest line: inserted, or listed by one of host {host}'s {n} line(s) that are not valid",
                rel.display()
            ),
            None => format!("{}: inserted: not in any manifest", rel.display()),
        }
    }
}

/// One record's place in the chain: `archive_seq`, `prev_hash`, `hash`, and whether the hash
/// is what its content gives.
struct Link {
    seq: u64,
    prev: String,
    hash: String,
    valid: bool,
}

/// Where the record chain stands after a file.
struct Point {
    hash: String,
    next_seq: u64,
    /// The file's path and its line's name, when that line is not valid (the point is only
    /// what the file's records say, until a valid line's file continues them).
    unvouched: Option<(String, String)>,
    /// Before the first file: where a host's chain starts (the genesis hash, record 1), which
    /// a first file may not continue (nothing says so); used only to fill a gap.
    start: bool,
}

/// A present file no line lists, that may fill a gap in the chain.
struct Loose {
    rel: String,
    first_seq: u64,
    last_hash: String,
    last_seq: u64,
    records: u64,
}

/// Check `host`'s files against its checked manifest lines, in the order of their sequence
/// numbers.
pub(super) fn check(
    archive_dir: &Path,
    host: &str,
    lines: &[CheckedLine],
    report: &mut Report,
    listed: &mut Listed,
) {
    let mut removed: BTreeSet<&str> = BTreeSet::new();
    // Files that only a line that is not valid says retention removed: its claim proves
    // nothing, but the report says where it came from.
    let mut claimed: BTreeMap<&str, &str> = BTreeMap::new();
    let mut valid_paths: BTreeSet<&str> = BTreeSet::new();
    let mut named: BTreeSet<&str> = BTreeSet::new();
    for line in lines {
        match &line.entry.body {
            EntryBody::Retention { removed: r, .. } if line.valid => {
                removed.extend(r.iter().map(String::as_str));
            }
            EntryBody::Retention { removed: r, .. } => {
                for p in r {
                    claimed.entry(p.as_str()).or_insert(line.mention.as_str());
                }
            }
            EntryBody::File { path, .. } => {
                named.insert(path.as_str());
                if line.valid {
                    valid_paths.insert(path.as_str());
                }
            }
        }
    }
    report.retained_deletions += removed.len();
    let mut loose: Option<BTreeMap<String, Loose>> = None;
    let mut at = Point {
        hash: GENESIS.to_owned(),
        next_seq: 1,
        unvouched: None,
        start: true,
    };
    // A line that is not valid, or a valid line's sequence jump, since `at` was set: the
    // chain may have a gap that files no line lists fill.
    let mut gap = false;
    let mut last_valid_seq = 0;
    let mut seen_paths: BTreeMap<&str, u64> = BTreeMap::new();
    for line in lines {
        if line.valid && line.entry.seq <= last_valid_seq {
            // A repeated line (reported with the lines): its file goes with the first one.
            continue;
        }
        if !line.valid || line.entry.seq != last_valid_seq + 1 {
            gap = true;
        }
        if line.valid {
            last_valid_seq = last_valid_seq.max(line.entry.seq);
        }
        let EntryBody::File {
            path,
            sha256,
            rows,
            first_archive_seq,
            last_archive_seq,
            first_prev_hash,
            last_hash,
            ..
        } = &line.entry.body
        else {
            continue;
        };
        if line.valid {
            listed.paths.insert(PathBuf::from(path));
            if let Some(first_line) = seen_paths.insert(path, line.entry.seq) {
                report.problems.push(format!(
                    "{path}: listed twice in the manifest (lines {first_line} and {})",
                    line.entry.seq
                ));
            }
            if *first_prev_hash != at.hash || *first_archive_seq != at.next_seq {
                let filled = gap && {
                    let loose =
                        loose.get_or_insert_with(|| loose_files(archive_dir, host, &named, listed));
                    fill(
                        &at,
                        first_prev_hash,
                        *first_archive_seq,
                        loose,
                        report,
                        listed,
                    )
                };
                if !filled && !at.start {
                    report_break(path, &at, first_prev_hash, *first_archive_seq, report);
                }
            }
            at = Point {
                hash: last_hash.clone(),
                next_seq: last_archive_seq + 1,
                unvouched: None,
                start: false,
            };
            gap = false;
            let full = archive_dir.join(path);
            // Deleted by retention here, it may still be elsewhere (the fleet's bucket keeps
            // what hosts delete locally, or a backup brought it back): present, it is checked
            // like any other file — being listed for removal is no licence to differ from its
            // line.
            if removed.contains(path.as_str()) && fs::symlink_metadata(&full).is_err() {
                continue;
            }
            let Ok(bytes) = fs::read(&full) else {
                report.problems.push(match claimed.get(path.as_str()) {
                    Some(by) => format!(
                        "{path}: deleted; only {by}, which is not valid, says retention removed it"
                    ),
                    None => format!("{path}: deleted (no retention line covers it)"),
                });
                continue;
            };
            report.files_checked += 1;
            if hex(&sha2::Sha256::digest(&bytes)) != *sha256 {
                report.problems.push(format!(
                    "{path}: modified or truncated: its SHA-256 differs from the manifest"
                ));
            }
            let links = match read_links(&full) {
                Ok(l) => l,
                Err(e) => {
                    report.problems.push(format!("{path}: unreadable: {e}"));
                    continue;
                }
            };
            report.records_checked += links.len() as u64;
            if links.len() as u64 != *rows {
                report.problems.push(format!(
                    "{path}: {} records where the manifest says {rows}: records removed or inserted",
                    links.len()
                ));
            }
            walk(
                path,
                &links,
                first_prev_hash,
                *first_archive_seq,
                &mut report.problems,
            );
            if links.last().is_some_and(|l| l.hash != *last_hash) {
                report.problems.push(format!(
                    "{path}: last record is not the one the manifest names: truncated"
                ));
            }
        } else {
            // Its file is checked with its valid line, if one lists it; a path outside the
            // host's layout is not followed at all (the line is reported already).
            if valid_paths.contains(path.as_str())
                || listed.paths.contains(Path::new(path))
                || !in_layout(host, path)
            {
                continue;
            }
            let full = archive_dir.join(path);
            if fs::symlink_metadata(&full).is_err() {
                // What the line names is not there: the chain goes on without it, and the
                // next valid line's file shows whether records are missing.
                continue;
            }
            listed.paths.insert(PathBuf::from(path));
            let links = match read_links(&full) {
                Ok(l) => l,
                Err(e) => {
                    report.problems.push(format!("{path}: unreadable: {e}"));
                    continue;
                }
            };
            report.files_checked += 1;
            report.records_checked += links.len() as u64;
            let (Some(first), Some(last)) = (links.first(), links.last()) else {
                continue;
            };
            walk(path, &links, &first.prev, first.seq, &mut report.problems);
            if first.prev != at.hash || first.seq != at.next_seq {
                let filled = gap && {
                    let loose =
                        loose.get_or_insert_with(|| loose_files(archive_dir, host, &named, listed));
                    fill(&at, &first.prev, first.seq, loose, report, listed)
                };
                if !filled && !at.start {
                    report.problems.push(format!(
                        "{path}: listed only by {}, which is not valid, and its records do not continue the chain before it: inserted or modified, or files before it were removed",
                        line.mention
                    ));
                }
            }
            at = Point {
                hash: last.hash.clone(),
                next_seq: last.seq + 1,
                unvouched: Some((path.clone(), line.mention.clone())),
                start: false,
            };
            gap = false;
        }
    }
    match &at {
        Point {
            unvouched: Some((path, name)),
            ..
        } => {
            report.problems.push(format!(
                "{path}: listed only by {name}, which is not valid, and no valid line after it vouches for its records: cannot be verified"
            ));
        }
        Point { start: true, .. } => {}
        a => {
            // Files that continue the chain past the last line: the manifest's tail is gone
            // (or their lines are still to be written: a file is published before its line).
            let loose = loose.get_or_insert_with(|| loose_files(archive_dir, host, &named, listed));
            let (mut hash, mut next) = (a.hash.clone(), a.next_seq);
            while let Some(f) = loose.remove(&hash).filter(|f| f.first_seq == next) {
                report.problems.push(format!(
                    "{}: in no manifest line, but its records continue host {host}'s chain after its last line: the manifest's tail was cut, or its line is not written yet",
                    f.rel
                ));
                listed.paths.insert(PathBuf::from(&f.rel));
                report.files_checked += 1;
                report.records_checked += f.records;
                (hash, next) = (f.last_hash, f.last_seq + 1);
            }
        }
    }
}

/// The chain breaks before `path`, whose records start at `seq` after `prev`.
fn report_break(path: &str, a: &Point, prev: &str, seq: u64, report: &mut Report) {
    match &a.unvouched {
        None => {
            if prev != a.hash {
                report.problems.push(format!(
                    "{path}: does not continue the previous file's hash chain: files were removed or reordered"
                ));
            }
            if seq != a.next_seq {
                report.problems.push(format!(
                    "{path}: starts at record {seq}, {} expected: records are missing between files",
                    a.next_seq
                ));
            }
        }
        Some((before, name)) => report.problems.push(format!(
            "{path}: does not continue the records of {before}, which only {name} lists (not valid): {before} was modified, or files between them were removed"
        )),
    }
}

/// Follow files no line lists from `a` to where the next file starts (`prev`, `seq`); when
/// they lead there exactly, they are the files of the lines that are not valid: counted as
/// checked and listed.
fn fill(
    a: &Point,
    prev: &str,
    seq: u64,
    loose: &mut BTreeMap<String, Loose>,
    report: &mut Report,
    listed: &mut Listed,
) -> bool {
    let (mut hash, mut next) = (a.hash.clone(), a.next_seq);
    let mut used = Vec::new();
    while hash != prev || next != seq {
        let Some(f) = loose
            .get(&hash)
            .filter(|f| f.first_seq == next && !used.contains(&hash))
        else {
            return false;
        };
        used.push(hash.clone());
        (hash, next) = (f.last_hash.clone(), f.last_seq + 1);
    }
    for key in used {
        if let Some(f) = loose.remove(&key) {
            listed.paths.insert(PathBuf::from(f.rel));
            report.files_checked += 1;
            report.records_checked += f.records;
        }
    }
    true
}

/// `host`'s present files that no line names and nothing listed yet, whose records are
/// intact by themselves, by the hash their first record continues.
fn loose_files(
    archive_dir: &Path,
    host: &str,
    named: &BTreeSet<&str>,
    listed: &Listed,
) -> BTreeMap<String, Loose> {
    let mut out = BTreeMap::new();
    for full in &listed.on_disk {
        let Some(rel) = full
            .strip_prefix(archive_dir)
            .ok()
            .and_then(|r| r.to_str())
            .map(str::to_owned)
        else {
            continue;
        };
        if named.contains(rel.as_str()) || listed.paths.contains(Path::new(&rel)) {
            continue;
        }
        let name = rel.rsplit('/').next().unwrap_or_default();
        if !is_file_of(host, name) {
            continue;
        }
        let Ok(links) = read_links(full) else {
            continue;
        };
        let (Some(first), Some(last)) = (links.first(), links.last()) else {
            continue;
        };
        let mut problems = Vec::new();
        walk(&rel, &links, &first.prev, first.seq, &mut problems);
        if problems.is_empty() {
            out.entry(first.prev.clone()).or_insert(Loose {
                rel,
                first_seq: first.seq,
                last_hash: last.hash.clone(),
                last_seq: last.seq,
                records: links.len() as u64,
            });
        }
    }
    out
}

/// A file's records in chain order. Rows are stored by session: only each one's place in the
/// chain is kept (not its content).
fn read_links(full: &Path) -> Result<Vec<Link>, String> {
    let mut links = Vec::new();
    columns::for_each_row(full, |r| {
        let valid = r.hash_is_valid();
        links.push(Link {
            seq: r.archive_seq,
            prev: r.prev_hash,
            hash: r.hash,
            valid,
        });
    })?;
    links.sort_by_key(|l| l.seq);
    Ok(links)
}

/// Walk `links` from the record before them (`prev`, and `seq` for the first): one problem per
/// record out of place or modified.
fn walk(path: &str, links: &[Link], prev: &str, seq: u64, problems: &mut Vec<String>) {
    let mut prev = prev.to_owned();
    let mut seq = seq;
    for l in links {
        if l.seq != seq {
            problems.push(format!(
                "{path}: record {}: {seq} expected: records removed, inserted or reordered",
                l.seq
            ));
        }
        if !l.valid {
            problems.push(format!(
                "{path}: record {}: content does not match its hash: modified",
                l.seq
            ));
        }
        if l.prev != prev {
            problems.push(format!(
                "{path}: record {}: does not follow the record before it: removed, inserted or reordered",
                l.seq
            ));
        }
        prev.clone_from(&l.hash);
        seq = l.seq + 1;
    }
}

/// Whether `file` is named as the writer names `host`'s files: `{host}-<digits>.parquet`
/// (a prefix test alone would let host `a` hold host `a-b`'s files).
pub(crate) fn is_file_of(host: &str, file: &str) -> bool {
    file.strip_prefix(host)
        .and_then(|f| f.strip_prefix('-'))
        .and_then(|f| f.strip_suffix(".parquet"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether a path a line that is not valid names could be one of `host`'s files: relative,
/// no `..`, named as the writer names them. Nothing else is opened on such a line's word.
fn in_layout(host: &str, rel: &str) -> bool {
    let path = Path::new(rel);
    path.components().all(|c| matches!(c, Component::Normal(_)))
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| is_file_of(host, n))
}

/// Every `*.parquet` under the archive (not the manifest or WAL directories).
pub(super) fn parquet_files(dir: &Path) -> Vec<PathBuf> {
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_file_belongs_to_the_host_it_is_named_for_exactly() {
        assert!(super::is_file_of("a", "a-000000000001.parquet"));
        assert!(super::is_file_of("a-b", "a-b-000000000001.parquet"));
        assert!(!super::is_file_of("a", "a-b-000000000001.parquet"));
        assert!(!super::is_file_of("a", "a-.parquet"));
        assert!(!super::is_file_of("a", "ab-000000000001.parquet"));
        assert!(!super::is_file_of("a", "a-000000000001.parquet.x"));
    }

    #[test]
    fn a_line_that_is_not_valid_opens_nothing_outside_the_layout() {
        assert!(super::in_layout(
            "h",
            "date=2026-11-21/hour=14/h-000000000001.parquet"
        ));
        assert!(!super::in_layout("h", "../h-000000000001.parquet"));
        assert!(!super::in_layout("h", "/etc/h-000000000001.parquet"));
        assert!(!super::in_layout(
            "h",
            "date=x/../../h-000000000001.parquet"
        ));
        assert!(!super::in_layout(
            "h",
            "date=x/hour=1/other-000000000001.parquet"
        ));
    }
}
