//! Responder tools over an archive directory: session listing, transcripts, evidence bundles.
//!
//! They read the Parquet files directly, pruned by the `date=`/`hour=` partition when a time
//! window is given: `sessions` reads only the columns it summarises, `replay` only the row
//! groups that can hold its session. Analysts with larger questions use DuckDB (ARCHIVE.md).

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

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
pub(super) fn files_in_window(
    archive_dir: &Path,
    from: Option<Micros>,
    to: Option<Micros>,
) -> Vec<PathBuf> {
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

pub fn rfc3339_micros(ts: Micros) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(u64::try_from(ts).unwrap_or(0));
    humantime::format_rfc3339_micros(t).to_string()
}

/// Connections named on the header line before it summarises.
const HEADER_CONNECTIONS: usize = 8;

/// A session's messages, in the order given, as a readable transcript (ANSI colours when
/// `colour`). Rows of several connections are marked with their connection. The connections'
/// own opening and closing rows (and the full list of connections, when there are many) are
/// shown with `connections`; refusals always are.
pub fn transcript(
    rows: &[Record],
    session: &str,
    colour: bool,
    connections_too: bool,
) -> Option<String> {
    let first = rows.first()?;
    let mut connections: Vec<&str> = Vec::new();
    for r in rows {
        if !connections.contains(&r.input.session_id.as_str()) {
            connections.push(&r.input.session_id);
        }
    }
    let paint = |code: &str, s: &str| {
        if colour {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    };
    let mut out = format!(
        "session {}  user {}  pid {}  exe {}  backend {}\n",
        printable(session),
        printable(first.input.user.as_deref().unwrap_or("?")),
        first
            .input
            .pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into()),
        printable(first.input.exe.as_deref().unwrap_or("?")),
        printable(first.input.backend.as_deref().unwrap_or("?")),
    );
    let hidden = |r: &Record| {
        !connections_too && r.input.kind == "connection" && r.input.decision == "allow"
    };
    let messages = rows.iter().filter(|r| r.input.kind != "connection").count();
    if connections.len() > 1 {
        let named = |(i, c): (usize, &&str)| format!("c{i}={}", printable(c));
        let list = if connections_too || connections.len() <= HEADER_CONNECTIONS {
            connections
                .iter()
                .enumerate()
                .map(named)
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            let last = connections.len() - 1;
            format!(
                "{} … {}",
                connections
                    .iter()
                    .enumerate()
                    .take(3)
                    .map(named)
                    .collect::<Vec<_>>()
                    .join(" "),
                named((last, &connections[last]))
            )
        };
        out.push_str(&format!("{} connections: {list}\n", connections.len()));
    }
    let hidden_rows = rows.iter().filter(|r| hidden(r)).count();
    out.push_str(&format!(
        "{messages} messages, {} – {}{}\n",
        rfc3339_micros(first.input.ts_us),
        rfc3339_micros(rows.last().map_or(first.input.ts_us, |r| r.input.ts_us)),
        if hidden_rows > 0 {
            format!(
                "; {hidden_rows} connection open/close rows not shown (`--connections` shows them)"
            )
        } else {
            String::new()
        }
    ));
    for r in rows.iter().filter(|r| !hidden(r)) {
        let conn = if connections.len() > 1 {
            let i = connections
                .iter()
                .position(|c| *c == r.input.session_id)
                .unwrap_or(0);
            format!("c{i:<3}")
        } else {
            String::new()
        };
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
        let what = printable(&what);
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
            "{}  {conn}#{:<4} {arrow}  {what}  [{decision}]{latency}\n",
            rfc3339_micros(r.input.ts_us),
            r.input.seq
        ));
        if let Some(p) = &r.input.payload {
            out.push_str(&format!("    {}\n", printable(p.as_str())));
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

/// `s` safe to print on a terminal: control characters (C0, DEL, C1: a process can name
/// itself with escape sequences, a server can put them in a tool's name) as `\u{..}`.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    format!("\\u{{{:x}}}", c as u32)
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}
