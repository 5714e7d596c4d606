//! Responder tools over an archive directory: session listing, transcripts, evidence bundles.
//!
//! They read the Parquet files directly (every file under the archive, pruned by the
//! `date=` partition when a time window is given); analysts with larger questions use DuckDB
//! (ARCHIVE.md).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{columns, record::Record, verify};

/// Microseconds since the epoch.
pub type Micros = i64;

/// Every record under `archive_dir` whose timestamp is in `[from, to)` (either bound open).
pub fn load(
    archive_dir: &Path,
    from: Option<Micros>,
    to: Option<Micros>,
) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    for file in files_in_window(archive_dir, from, to) {
        let rows = columns::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        out.extend(rows.into_iter().filter(|r| {
            from.is_none_or(|f| r.input.ts_us >= f) && to.is_none_or(|t| r.input.ts_us < t)
        }));
    }
    out.sort_by_key(|r| (r.input.ts_us, r.archive_seq));
    Ok(out)
}

/// Every record of one session, oldest first: only the row groups whose statistics can hold
/// the session are read (files are sorted by session).
pub fn load_session(archive_dir: &Path, session: &str) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    for file in files_in_window(archive_dir, None, None) {
        out.extend(
            columns::read_session(&file, session)
                .map_err(|e| format!("{}: {e}", file.display()))?,
        );
    }
    out.sort_by_key(|r| (r.input.ts_us, r.archive_seq));
    Ok(out)
}

/// Parquet files whose `date=`/`hour=` partition can hold records of the window.
fn files_in_window(archive_dir: &Path, from: Option<Micros>, to: Option<Micros>) -> Vec<PathBuf> {
    const HOUR: i64 = 3_600_000_000;
    let mut out = Vec::new();
    let Ok(dates) = fs::read_dir(archive_dir) else {
        return out;
    };
    for date in dates.filter_map(Result::ok) {
        let dname = date.file_name().to_string_lossy().into_owned();
        let Some(day) = dname.strip_prefix("date=").and_then(parse_day) else {
            continue;
        };
        let Ok(hours) = fs::read_dir(date.path()) else {
            continue;
        };
        for hour in hours.filter_map(Result::ok) {
            let hname = hour.file_name().to_string_lossy().into_owned();
            let Some(h) = hname
                .strip_prefix("hour=")
                .and_then(|h| h.parse::<i64>().ok())
            else {
                continue;
            };
            let start = day * 24 * HOUR + h * HOUR;
            if from.is_some_and(|f| start + HOUR <= f) || to.is_some_and(|t| start >= t) {
                continue;
            }
            let Ok(files) = fs::read_dir(hour.path()) else {
                continue;
            };
            out.extend(
                files
                    .filter_map(Result::ok)
                    .map(|f| f.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "parquet")),
            );
        }
    }
    out.sort();
    out
}

fn parse_day(s: &str) -> Option<i64> {
    let y = s.get(..4)?.parse().ok()?;
    let m = s.get(5..7)?.parse().ok()?;
    let d = s.get(8..10)?.parse().ok()?;
    Some(super::writer::days_from_civil(y, m, d))
}

/// One line of `airlock sessions`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionSummary {
    pub session_id: String,
    pub user: Option<String>,
    pub uid: Option<u32>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub exe: Option<String>,
    pub backend: Option<String>,
    pub started: String,
    pub duration_ms: u64,
    pub messages: u64,
    pub blocked: u64,
    pub masked: u64,
}

/// Sessions of `records` matching the filters, oldest first.
pub fn sessions(
    records: &[Record],
    user: Option<&str>,
    backend: Option<&str>,
) -> Vec<SessionSummary> {
    let mut by_session: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_session
            .entry(r.input.session_id.as_str())
            .or_default()
            .push(r);
    }
    let mut out: Vec<SessionSummary> = by_session
        .into_iter()
        .filter_map(|(id, rows)| {
            let first = rows.first()?;
            let who = rows
                .iter()
                .find(|r| r.input.user.is_some() || r.input.pid.is_some())
                .unwrap_or(first);
            let start = rows.iter().map(|r| r.input.ts_us).min()?;
            let end = rows.iter().map(|r| r.input.ts_us).max()?;
            let summary = SessionSummary {
                session_id: id.to_owned(),
                user: who.input.user.clone(),
                uid: who.input.uid,
                pid: who.input.pid,
                comm: who.input.comm.clone(),
                exe: who.input.exe.clone(),
                backend: rows.iter().find_map(|r| r.input.backend.clone()),
                started: rfc3339_micros(start),
                duration_ms: u64::try_from((end - start) / 1000).unwrap_or(0),
                messages: rows.len() as u64,
                blocked: rows
                    .iter()
                    .filter(|r| matches!(r.input.decision.as_str(), "block" | "denied"))
                    .count() as u64,
                masked: rows
                    .iter()
                    .map(|r| r.input.masked_detectors.len() as u64)
                    .sum(),
            };
            let keep = user.is_none_or(|u| summary.user.as_deref() == Some(u))
                && backend.is_none_or(|b| summary.backend.as_deref() == Some(b));
            keep.then_some(summary)
        })
        .collect();
    out.sort_by(|a, b| a.started.cmp(&b.started));
    out
}

pub fn rfc3339_micros(ts: Micros) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(u64::try_from(ts).unwrap_or(0));
    humantime::format_rfc3339_micros(t).to_string()
}

/// The session's messages in order, as a readable transcript (ANSI colours when `colour`).
pub fn transcript(records: &[Record], session: &str, colour: bool) -> Option<String> {
    let mut rows: Vec<&Record> = records
        .iter()
        .filter(|r| r.input.session_id == session)
        .collect();
    if rows.is_empty() {
        return None;
    }
    rows.sort_by_key(|r| (r.input.seq, r.archive_seq));
    let paint = |code: &str, s: &str| {
        if colour {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    };
    let first = rows[0];
    let mut out = format!(
        "session {session}  user {}  pid {}  exe {}  backend {}\n",
        first.input.user.as_deref().unwrap_or("?"),
        first
            .input
            .pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into()),
        first.input.exe.as_deref().unwrap_or("?"),
        first.input.backend.as_deref().unwrap_or("?"),
    );
    for r in rows {
        let arrow = if r.input.direction == "client_to_server" {
            paint("36", "client → server")
        } else {
            paint("35", "server → client")
        };
        let what = [
            r.input.kind.as_str(),
            r.input.method.as_deref().unwrap_or(""),
            r.input.tool.as_deref().unwrap_or(""),
        ]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
        let decision = match r.input.decision.as_str() {
            "block" | "denied" => paint("31;1", &r.input.decision),
            "mask" => paint("33", "mask"),
            other => other.to_owned(),
        };
        let latency = r
            .input
            .latency_us
            .map(|l| format!("  {l} µs"))
            .unwrap_or_default();
        out.push_str(&format!(
            "{}  #{:<4} {arrow}  {what}  [{decision}]{latency}\n",
            rfc3339_micros(r.input.ts_us),
            r.input.seq
        ));
        if let Some(p) = &r.input.payload {
            out.push_str(&format!("    {}\n", p.as_str()));
        }
    }
    Some(out)
}

/// Write an evidence bundle: the archive files of the window, every manifest and public key,
/// the policy files, and a verification report of the whole archive. Returns the report.
pub fn evidence(
    archive_dir: &Path,
    policies_dir: Option<&Path>,
    from: Micros,
    to: Micros,
    out: &Path,
) -> io::Result<verify::Report> {
    let report = verify::verify(archive_dir);
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut listing = String::new();
    for f in files_in_window(archive_dir, Some(from), Some(to)) {
        let rel = f.strip_prefix(archive_dir).unwrap_or(&f);
        tar.append_path_with_name(&f, Path::new("archive").join(rel))?;
        listing.push_str(&format!("{}\n", rel.display()));
    }
    let manifest_dir = archive_dir.join("_manifest");
    if manifest_dir.is_dir() {
        tar.append_dir_all("archive/_manifest", &manifest_dir)?;
    }
    if let Some(p) = policies_dir.filter(|p| p.is_dir()) {
        for entry in fs::read_dir(p)?.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "toml") {
                tar.append_path_with_name(&path, Path::new("policies").join(entry.file_name()))?;
            }
        }
    }
    let mut text = format!(
        "Airlock evidence bundle\nwindow: {} .. {}\narchive: {}\nfiles in window:\n{listing}\nverification of the whole archive: {}\n",
        rfc3339_micros(from),
        rfc3339_micros(to),
        archive_dir.display(),
        if report.intact() {
            "intact"
        } else {
            "PROBLEMS FOUND"
        },
    );
    text.push_str(&format!(
        "{} file(s), {} record(s) checked, {} file(s) removed by retention\n",
        report.files_checked, report.records_checked, report.retained_deletions
    ));
    for p in &report.problems {
        text.push_str(&format!("TAMPERED {p}\n"));
    }
    let mut header = tar::Header::new_gnu();
    header.set_size(text.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    header.set_cksum();
    tar.append_data(&mut header, "VERIFICATION.txt", text.as_bytes())?;
    let gz = tar.into_inner()?;
    let mut file = gz.finish()?;
    file.flush()?;
    file.sync_all()?;
    Ok(report)
}
