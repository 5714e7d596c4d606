//! Sessions as responders mean them: one MCP session, however many connections its client
//! spread it over.
//!
//! A row belongs to the MCP session it names (`mcp_session_id`: the `Mcp-Session-Id` the
//! server assigned, or the legacy HTTP+SSE transport's `session_id`), keyed by host, backend
//! (two servers may hand out the same name) and the uid of the connection's process: the name
//! is chosen by the server (or claimed by the client), so a server that hands every client the
//! same name cannot merge two users' calls into one session. A row that names none (the connection's
//! `open`/`close`, an `initialize` sent before the server named the session, a refused request)
//! belongs to the first MCP session its connection carried, and a connection that carried none
//! is a session of its own. `View::Connection` keeps the per-connection view.
//!
//! Counts are of calls, not of messages: a blocked call is counted at the message that was
//! blocked, not again at the error Airlock answered it with or at its approval record; a
//! masked call once, however many of its messages (request, answer) had values masked.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use serde::Serialize;

use super::{
    columns,
    record::Record,
    responder::{Micros, files_in_window, rfc3339_micros},
};

/// How rows are grouped into sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// By MCP session across connections (connections without one are sessions of their own).
    Mcp,
    /// One session per intercepted connection (the archive's `session_id`).
    Connection,
}

/// One line of `airlock sessions`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionSummary {
    /// The MCP session's name, or the connection's `session_id`.
    pub session_id: String,
    /// `mcp_session` or `connection`.
    pub grouped_by: &'static str,
    /// The connections (`session_id`s) the session was carried on, in order of first use.
    pub connections: Vec<String>,
    pub host: String,
    pub user: Option<String>,
    pub uid: Option<u32>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub exe: Option<String>,
    /// The caller's container (`runtime:id`), from its cgroup path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    pub backend: Option<String>,
    pub started: String,
    pub duration_ms: u64,
    pub messages: u64,
    /// Requests the client sent.
    pub calls: u64,
    /// Calls (and refused connections or exchanges) that were blocked or denied.
    pub blocked: u64,
    /// Calls with at least one masked value (in the request or the answer).
    pub masked: u64,
    /// Values masked, all messages.
    pub masked_values: u64,
}

/// The columns a session listing reads: payloads and hashes stay on disk.
const COLUMNS: [&str; 16] = [
    "session_id",
    "mcp_session_id",
    "host",
    "ts",
    "user",
    "uid",
    "pid",
    "comm",
    "exe",
    "cgroup",
    "backend",
    "direction",
    "kind",
    "jsonrpc_id",
    "decision",
    "masked_count",
];

/// A group's key: (host, backend, MCP session) or the connection.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Key {
    /// (host, backend, uid, MCP session).
    Mcp(String, String, Option<u32>, String),
    Conn(String),
}

impl Key {
    fn name(&self) -> &str {
        match self {
            Key::Mcp(_, _, _, m) => m,
            Key::Conn(c) => c,
        }
    }
}

/// What is kept per (connection, MCP session or none) while reading.
#[derive(Default)]
struct Tally {
    start: Micros,
    end: Micros,
    /// The earliest row naming a user or a process (else the earliest row): who it was.
    who: Option<(bool, Micros)>,
    user: Option<String>,
    uid: Option<u32>,
    pid: Option<u32>,
    comm: Option<String>,
    exe: Option<String>,
    cgroup: Option<String>,
    messages: u64,
    calls: u64,
    blocked: u64,
    /// Calls (see [`call_key`]) with masked values (a call counts once), and messages
    /// without an id that had some.
    masked_ids: HashSet<u64>,
    masked_unaddressed: u64,
    masked_values: u64,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        if self.who.is_none() {
            (self.start, self.end) = (o.start, o.end);
        }
        self.start = self.start.min(o.start);
        self.end = self.end.max(o.end);
        if let Some(w) = o.who
            && self
                .who
                .is_none_or(|s| (w.0 && !s.0) || (w.0 == s.0 && w.1 < s.1))
        {
            self.who = Some(w);
            (self.user, self.uid, self.pid) = (o.user, o.uid, o.pid);
            (self.comm, self.exe, self.cgroup) = (o.comm, o.exe, o.cgroup);
        }
        self.messages += o.messages;
        self.calls += o.calls;
        self.blocked += o.blocked;
        self.masked_ids.extend(o.masked_ids);
        self.masked_unaddressed += o.masked_unaddressed;
        self.masked_values += o.masked_values;
    }
}

/// What is known of a connection: its host and backend, and the first MCP session it carried.
#[derive(Default)]
struct Conn {
    host: String,
    /// The uid of the process the connection was attributed to.
    uid: Option<u32>,
    backend: Option<(Micros, String)>,
    first_mcp: Option<(Micros, String)>,
    first_seen: Micros,
}

/// Everything read from the archive, before grouping.
#[derive(Default)]
struct Scan {
    pieces: HashMap<(String, Option<String>), Tally>,
    conns: HashMap<String, Conn>,
    /// Files that could not be read (damaged, truncated, not Parquet), with why.
    skipped: Vec<(std::path::PathBuf, String)>,
}

/// A call's key: who sent its request and its JSON-RPC id, hashed (8 bytes a masked call).
fn call_key(client_called: bool, id: &str) -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    h.write_u8(u8::from(client_called));
    h.write(id.as_bytes());
    h.finish()
}

/// Whether a row is a blocked call (or a refusal that is no call: a connection, an exchange,
/// a stream). Not counted: the error Airlock answers a refused call with (it carries the
/// call's id), the approval record (the held request carries the decision) and a listing
/// answered with tools hidden (no call was refused).
fn is_blocked(kind: &str, decision: &str, has_id: bool) -> bool {
    matches!(decision, "block" | "denied")
        && match kind {
            "request" | "notification" | "connection" | "http" => true,
            "error" => !has_id,
            _ => false,
        }
}

/// The columns `scan` reads of one file, every batch checked to carry them: a file that cannot
/// be read whole is skipped whole (named in `Scan::skipped`), never half counted.
fn read_file(file: &Path) -> Result<Vec<arrow_array::RecordBatch>, String> {
    let builder = columns::open_reader(file)?;
    let mask =
        parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), COLUMNS.iter().copied());
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| e.to_string())?;
    let mut batches = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        merge_batch(&mut Scan::default(), &batch, Some(Micros::MAX))?;
        batches.push(batch);
    }
    Ok(batches)
}

fn scan(archive_dir: &Path, since: Option<Micros>) -> Result<Scan, String> {
    let mut out = Scan::default();
    for file in files_in_window(archive_dir, since, None) {
        match read_file(&file) {
            Ok(batches) => {
                for batch in &batches {
                    merge_batch(&mut out, batch, since)
                        .map_err(|e| format!("{}: {e}", file.display()))?;
                }
            }
            Err(e) => out.skipped.push((file, e)),
        }
    }
    Ok(out)
}

/// Add one batch's rows (those at or after `since`) to `out`. Fails only when a column is
/// missing or of another type.
fn merge_batch(
    out: &mut Scan,
    batch: &arrow_array::RecordBatch,
    since: Option<Micros>,
) -> Result<(), String> {
    use arrow_array::{Array as _, StringArray, TimestampMicrosecondArray, UInt32Array};
    {
        {
            let named = |e: String| e;
            let text = |name| columns::column::<StringArray>(batch, name).map_err(named);
            let ids = |name| columns::column::<UInt32Array>(batch, name).map_err(named);
            let (session, mcp, host, users, comms, exes) = (
                text("session_id")?,
                text("mcp_session_id")?,
                text("host")?,
                text("user")?,
                text("comm")?,
                text("exe")?,
            );
            let cgroups = text("cgroup")?;
            let (backends, directions, kinds, jsonrpc_ids, decisions) = (
                text("backend")?,
                text("direction")?,
                text("kind")?,
                text("jsonrpc_id")?,
                text("decision")?,
            );
            let (uids, pids, masked) = (ids("uid")?, ids("pid")?, ids("masked_count")?);
            let ts = columns::column::<TimestampMicrosecondArray>(batch, "ts").map_err(named)?;
            let opt = |a: &StringArray, i| (!a.is_null(i)).then(|| a.value(i).to_owned());
            let opt32 = |a: &UInt32Array, i| (!a.is_null(i)).then(|| a.value(i));
            for i in 0..batch.num_rows() {
                let at = ts.value(i);
                if since.is_some_and(|s| at < s) {
                    continue;
                }
                let conn_id = session.value(i);
                let mcp_id = opt(mcp, i);
                let conn = out.conns.entry(conn_id.to_owned()).or_insert_with(|| Conn {
                    host: host.value(i).to_owned(),
                    first_seen: at,
                    ..Conn::default()
                });
                conn.first_seen = conn.first_seen.min(at);
                if conn.uid.is_none() {
                    conn.uid = opt32(uids, i);
                }
                if !backends.is_null(i) && conn.backend.as_ref().is_none_or(|(b, _)| at < *b) {
                    conn.backend = Some((at, backends.value(i).to_owned()));
                }
                if let Some(m) = &mcp_id
                    && conn.first_mcp.as_ref().is_none_or(|(t, _)| at < *t)
                {
                    conn.first_mcp = Some((at, m.clone()));
                }
                let t = out
                    .pieces
                    .entry((conn_id.to_owned(), mcp_id))
                    .or_insert_with(|| Tally {
                        start: at,
                        end: at,
                        ..Tally::default()
                    });
                t.start = t.start.min(at);
                t.end = t.end.max(at);
                t.messages += 1;
                let (kind, id) = (kinds.value(i), opt(jsonrpc_ids, i));
                let c2s = directions.value(i) == "client_to_server";
                t.calls += u64::from(kind == "request" && c2s);
                t.blocked += u64::from(is_blocked(kind, decisions.value(i), id.is_some()));
                let n = masked.value(i);
                if n > 0 {
                    t.masked_values += u64::from(n);
                    match id {
                        // A call is named by its id and by who sent its request: a request
                        // travels its own direction, its answer the other one.
                        Some(id) => {
                            let client_called = c2s == (kind == "request");
                            t.masked_ids.insert(call_key(client_called, &id));
                        }
                        None => t.masked_unaddressed += 1,
                    }
                }
                let names = !users.is_null(i) || !pids.is_null(i);
                if t.who
                    .is_none_or(|(n, w)| (names && !n) || (names == n && at < w))
                {
                    t.who = Some((names, at));
                    t.user = opt(users, i);
                    t.uid = opt32(uids, i);
                    t.pid = opt32(pids, i);
                    t.comm = opt(comms, i);
                    t.exe = opt(exes, i);
                    t.cgroup = opt(cgroups, i);
                }
            }
        }
    }
    Ok(())
}

/// The group a piece (connection, MCP session named by its rows) belongs to.
fn key_of(scan: &Scan, conn_id: &str, mcp: Option<&str>, view: View) -> Key {
    let conn = scan.conns.get(conn_id);
    let mcp = match view {
        View::Connection => None,
        View::Mcp => mcp.or(conn.and_then(|c| c.first_mcp.as_ref().map(|(_, m)| m.as_str()))),
    };
    match mcp {
        Some(m) => Key::Mcp(
            conn.map(|c| c.host.clone()).unwrap_or_default(),
            conn.and_then(|c| c.backend.as_ref().map(|(_, b)| b.clone()))
                .unwrap_or_default(),
            conn.and_then(|c| c.uid),
            m.to_owned(),
        ),
        None => Key::Conn(conn_id.to_owned()),
    }
}

/// What `sessions` found: the sessions, and the files it could not read (damaged,
/// truncated or tampered: `airlock verify` says which), skipped whole.
pub struct Found {
    pub sessions: Vec<SessionSummary>,
    pub skipped: Vec<(std::path::PathBuf, String)>,
}

/// Sessions with records since `since` (all when `None`) that match the filters, oldest
/// first. Reads only the columns it needs, file by file: memory grows with the number of
/// connections and sessions, not of records.
pub fn sessions(
    archive_dir: &Path,
    since: Option<Micros>,
    user: Option<&str>,
    backend: Option<&str>,
    view: View,
) -> Result<Found, String> {
    let mut scan = scan(archive_dir, since)?;
    let skipped = std::mem::take(&mut scan.skipped);
    let pieces = std::mem::take(&mut scan.pieces);
    let mut groups: BTreeMap<Key, (Tally, Vec<(Micros, String)>)> = BTreeMap::new();
    for ((conn_id, mcp), tally) in pieces {
        let key = key_of(&scan, &conn_id, mcp.as_deref(), view);
        let first = scan.conns.get(&conn_id).map_or(0, |c| c.first_seen);
        let g = groups.entry(key).or_default();
        g.0.merge(tally);
        if !g.1.iter().any(|(_, c)| *c == conn_id) {
            g.1.push((first, conn_id));
        }
    }
    let mut out: Vec<SessionSummary> = groups
        .into_iter()
        .map(|(key, (t, mut conns))| {
            conns.sort();
            let first_conn = conns.first().and_then(|(_, c)| scan.conns.get(c));
            let (host, backend) = match &key {
                Key::Mcp(h, b, _, _) => (h.clone(), (!b.is_empty()).then(|| b.clone())),
                Key::Conn(_) => (
                    first_conn.map(|c| c.host.clone()).unwrap_or_default(),
                    first_conn.and_then(|c| c.backend.as_ref().map(|(_, b)| b.clone())),
                ),
            };
            SessionSummary {
                session_id: key.name().to_owned(),
                grouped_by: match key {
                    Key::Mcp(..) => "mcp_session",
                    Key::Conn(_) => "connection",
                },
                connections: conns.into_iter().map(|(_, c)| c).collect(),
                host,
                user: t.user,
                uid: t.uid,
                pid: t.pid,
                comm: t.comm,
                exe: t.exe,
                container: t
                    .cgroup
                    .as_deref()
                    .and_then(crate::attribution::Container::from_cgroup)
                    .map(|c| format!("{}:{}", c.runtime, c.id)),
                backend,
                started: rfc3339_micros(t.start),
                duration_ms: u64::try_from((t.end - t.start) / 1000).unwrap_or(0),
                messages: t.messages,
                calls: t.calls,
                blocked: t.blocked,
                masked: t.masked_ids.len() as u64 + t.masked_unaddressed,
                masked_values: t.masked_values,
            }
        })
        .filter(|s| {
            user.is_none_or(|u| s.user.as_deref() == Some(u))
                && backend.is_none_or(|b| s.backend.as_deref() == Some(b))
        })
        .collect();
    out.sort_by(|a, b| a.started.cmp(&b.started));
    Ok(Found {
        sessions: out,
        skipped,
    })
}

/// One session's records, oldest first. `id` names an MCP
/// session or (when no MCP session has that name, or `view` is `Connection`) a connection;
/// `backend` and `uid` choose among MCP sessions of that name (on several backends or hosts,
/// or of several users).
pub fn load(
    archive_dir: &Path,
    id: &str,
    view: View,
    (backend, uid): (Option<&str>, Option<u32>),
) -> Result<Vec<Record>, String> {
    let scan = scan(archive_dir, None)?;
    let mut matches: BTreeMap<Key, BTreeSet<String>> = BTreeMap::new();
    for (conn_id, mcp) in scan.pieces.keys() {
        let key = key_of(&scan, conn_id, mcp.as_deref(), view);
        let wanted = key.name() == id
            && match &key {
                Key::Mcp(_, b, u, _) => {
                    backend.is_none_or(|want| want == b) && uid.is_none_or(|want| Some(want) == *u)
                }
                Key::Conn(_) => true,
            };
        if wanted {
            matches.entry(key).or_default().insert(conn_id.clone());
        }
    }
    if matches.len() > 1 {
        let named: Vec<String> = matches
            .keys()
            .map(|k| match k {
                Key::Mcp(h, b, u, _) => format!(
                    "MCP session on host {h}, backend {b}, uid {}",
                    u.map_or_else(|| "?".to_owned(), |u| u.to_string())
                ),
                Key::Conn(c) => format!("connection {c}"),
            })
            .collect();
        return Err(format!(
            "`{id}` names {} sessions ({}); choose with `--backend`, `--uid` or `--connection`",
            named.len(),
            named.join("; ")
        ));
    }
    let Some((key, conns)) = matches.into_iter().next() else {
        return Err(format!("no session `{id}` in {}", archive_dir.display()));
    };
    let mut rows = Vec::new();
    let files = files_in_window(archive_dir, None, None);
    for conn in &conns {
        for file in &files {
            for r in
                columns::read_session(file, conn).map_err(|e| format!("{}: {e}", file.display()))?
            {
                let belongs = match &key {
                    Key::Conn(_) => true,
                    Key::Mcp(..) => {
                        key_of(&scan, conn, r.input.mcp_session_id.as_deref(), view) == key
                    }
                };
                if belongs {
                    rows.push(r);
                }
            }
        }
    }
    // One connection: its own order; several: time (each connection's clock is the host's).
    if conns.len() == 1 {
        rows.sort_by_key(|r| (r.input.seq, r.archive_seq));
    } else {
        rows.sort_by_key(|r| (r.input.ts_us, r.archive_seq));
    }
    Ok(rows)
}
