//! Responder tools over an archive directory: session listing, transcripts, evidence bundles.
//!
//! They read the Parquet files directly, pruned by the `date=`/`hour=` partition when a time
//! window is given: `sessions` reads only the columns it summarises, `replay` only the row
//! groups that can hold its session. Analysts with larger questions use DuckDB (ARCHIVE.md).

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

/// What `airlock sessions` keeps per session while it reads.
struct Tally {
    start: Micros,
    end: Micros,
    /// The earliest row naming a user or a process (else the earliest row): who it was.
    who: (bool, Micros),
    user: Option<String>,
    uid: Option<u32>,
    pid: Option<u32>,
    comm: Option<String>,
    exe: Option<String>,
    /// The earliest row naming a backend.
    backend: Option<(Micros, String)>,
    messages: u64,
    blocked: u64,
    masked: u64,
}

/// The columns `airlock sessions` reads: payloads and hashes stay on disk.
const SESSION_COLUMNS: [&str; 10] = [
    "session_id",
    "ts",
    "user",
    "uid",
    "pid",
    "comm",
    "exe",
    "backend",
    "decision",
    "masked_count",
];

/// Sessions with records since `since` (all when `None`) that match the filters, oldest
/// first. Reads only the columns it needs, file by file: memory grows with the number of
/// sessions, not of records.
pub fn sessions(
    archive_dir: &Path,
    since: Option<Micros>,
    user: Option<&str>,
    backend: Option<&str>,
) -> Result<Vec<SessionSummary>, String> {
    use arrow_array::{Array as _, StringArray, TimestampMicrosecondArray, UInt32Array};
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    for file in files_in_window(archive_dir, since, None) {
        let named = |e: String| format!("{}: {e}", file.display());
        let builder = columns::open_reader(&file).map_err(named)?;
        let mask = parquet::arrow::ProjectionMask::columns(
            builder.parquet_schema(),
            SESSION_COLUMNS.iter().copied(),
        );
        let reader = builder
            .with_projection(mask)
            .build()
            .map_err(|e| named(e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| named(e.to_string()))?;
            let text = |name| columns::column::<StringArray>(&batch, name).map_err(named);
            let ids = |name| columns::column::<UInt32Array>(&batch, name).map_err(named);
            let (session, users, comms, exes, backends, decisions) = (
                text("session_id")?,
                text("user")?,
                text("comm")?,
                text("exe")?,
                text("backend")?,
                text("decision")?,
            );
            let (uids, pids, masked) = (ids("uid")?, ids("pid")?, ids("masked_count")?);
            let ts = columns::column::<TimestampMicrosecondArray>(&batch, "ts").map_err(named)?;
            let opt = |a: &StringArray, i| (!a.is_null(i)).then(|| a.value(i).to_owned());
            let opt32 = |a: &UInt32Array, i| (!a.is_null(i)).then(|| a.value(i));
            for i in 0..batch.num_rows() {
                let at = ts.value(i);
                if since.is_some_and(|s| at < s) {
                    continue;
                }
                let id = session.value(i);
                if !tallies.contains_key(id) {
                    tallies.insert(
                        id.to_owned(),
                        Tally {
                            start: at,
                            end: at,
                            who: (false, Micros::MAX),
                            user: None,
                            uid: None,
                            pid: None,
                            comm: None,
                            exe: None,
                            backend: None,
                            messages: 0,
                            blocked: 0,
                            masked: 0,
                        },
                    );
                }
                let Some(t) = tallies.get_mut(id) else {
                    continue;
                };
                t.start = t.start.min(at);
                t.end = t.end.max(at);
                t.messages += 1;
                t.blocked += u64::from(matches!(decisions.value(i), "block" | "denied"));
                t.masked += u64::from(masked.value(i));
                let names = !users.is_null(i) || !pids.is_null(i);
                if (names && !t.who.0) || (names == t.who.0 && at < t.who.1) {
                    t.who = (names, at);
                    t.user = opt(users, i);
                    t.uid = opt32(uids, i);
                    t.pid = opt32(pids, i);
                    t.comm = opt(comms, i);
                    t.exe = opt(exes, i);
                }
                if !backends.is_null(i) && t.backend.as_ref().is_none_or(|(b, _)| at < *b) {
                    t.backend = Some((at, backends.value(i).to_owned()));
                }
            }
        }
    }
    let mut out: Vec<SessionSummary> = tallies
        .into_iter()
        .map(|(id, t)| SessionSummary {
            session_id: id,
            user: t.user,
            uid: t.uid,
            pid: t.pid,
            comm: t.comm,
            exe: t.exe,
            backend: t.backend.map(|(_, b)| b),
            started: rfc3339_micros(t.start),
            duration_ms: u64::try_from((t.end - t.start) / 1000).unwrap_or(0),
            messages: t.messages,
            blocked: t.blocked,
            masked: t.masked,
        })
        .filter(|s| {
            user.is_none_or(|u| s.user.as_deref() == Some(u))
                && backend.is_none_or(|b| s.backend.as_deref() == Some(b))
        })
        .collect();
    out.sort_by(|a, b| a.started.cmp(&b.started));
    Ok(out)
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
    (from, to): (Micros, Micros),
    trust: &verify::Trust,
    out: &Path,
) -> io::Result<verify::Report> {
    let report = verify::verify(archive_dir, trust);
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
    for h in &report.heads {
        text.push_str(&format!("{}\n", verify::head_line(h)));
    }
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
