//! The Parquet side: the Arrow schema (documented column by column in ARCHIVE.md), a file's
//! rows sorted by their keys ([`Plan`]) and gathered column by column one row group at a time
//! ([`Rows`]), zstd Parquet, and reading rows back for `airlock verify`.
//!
//! Types are chosen for DuckDB: `ts` is a UTC timestamp in microseconds, `rules` and
//! `masked_detectors` are lists of strings, ids are unsigned integers.

use std::{collections::HashMap, fs::File, io, path::Path, sync::Arc};

use arrow_array::{
    Array, ArrayRef, ListArray, RecordBatch, StringArray, TimestampMicrosecondArray, UInt32Array,
    UInt64Array,
    builder::{
        ArrayBuilder as _, ListBuilder, StringBuilder, TimestampMicrosecondBuilder, UInt32Builder,
        UInt64Builder,
    },
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::{
    arrow::{ArrowWriter, arrow_reader::ParquetRecordBatchReaderBuilder},
    basic::{Compression, ZstdLevel},
    file::properties::{EnabledStatistics, WriterProperties},
    schema::types::ColumnPath,
};

use super::{
    record::{MaskedPayload, Record, RecordInput, RecordRef},
    wal::EntryAt,
};

/// Rows per Parquet row group: small enough that DuckDB's statistics can skip most of a file
/// when one session is asked for (rows are sorted by session). Also what bounds the memory of
/// writing a file: only one row group is gathered into columns and encoded at a time.
pub const ROW_GROUP: usize = 8192;

/// A row group also ends before its records (their write-ahead entries) pass this many bytes,
/// unless it holds one record only: with large payloads, [`ROW_GROUP`] rows could take
/// gigabytes. Rows of ordinary traffic (about 1 KiB) fill [`ROW_GROUP`] rows well under it.
pub const ROW_GROUP_BYTES: u64 = 32 << 20;

fn utf8(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

fn list_of_utf8(name: &str) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
        false,
    )
}

/// The archive schema, in column order.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        utf8("host", false),
        utf8("session_id", false),
        utf8("mcp_session_id", true),
        Field::new("seq", DataType::UInt64, false),
        utf8("direction", false),
        utf8("kind", false),
        utf8("method", true),
        utf8("tool", true),
        utf8("jsonrpc_id", true),
        utf8("payload", true),
        utf8("decision", false),
        list_of_utf8("rules"),
        Field::new("masked_count", DataType::UInt32, false),
        list_of_utf8("masked_detectors"),
        Field::new("latency_us", DataType::UInt64, true),
        Field::new("pid", DataType::UInt32, true),
        Field::new("tgid", DataType::UInt32, true),
        Field::new("uid", DataType::UInt32, true),
        Field::new("gid", DataType::UInt32, true),
        utf8("user", true),
        utf8("comm", true),
        utf8("exe", true),
        utf8("cgroup", true),
        utf8("backend", true),
        utf8("server_addr", true),
        utf8("sni", true),
        utf8("principal_iss", true),
        utf8("principal_sub", true),
        utf8("policy_hash", true),
        Field::new("archive_seq", DataType::UInt64, false),
        utf8("prev_hash", false),
        utf8("hash", false),
    ]))
}

type Text = for<'a, 'b> fn(&'a RecordRef<'b>) -> Option<&'b str>;
type Int32 = fn(&RecordRef<'_>) -> Option<u32>;
type Int64 = fn(&RecordRef<'_>) -> Option<u64>;
type Strings = for<'a, 'b> fn(&'a RecordRef<'b>) -> &'a [&'b str];

/// The Utf8 columns and where each comes from.
const TEXT: [(&str, Text); 22] = [
    ("host", |r| Some(r.host)),
    ("session_id", |r| Some(r.session_id)),
    ("mcp_session_id", |r| r.mcp_session_id),
    ("direction", |r| Some(r.direction)),
    ("kind", |r| Some(r.kind)),
    ("method", |r| r.method),
    ("tool", |r| r.tool),
    ("jsonrpc_id", |r| r.jsonrpc_id),
    ("payload", |r| r.payload),
    ("decision", |r| Some(r.decision)),
    ("user", |r| r.user),
    ("comm", |r| r.comm),
    ("exe", |r| r.exe),
    ("cgroup", |r| r.cgroup),
    ("backend", |r| r.backend),
    ("server_addr", |r| r.server_addr),
    ("sni", |r| r.sni),
    ("principal_iss", |r| r.principal_iss),
    ("principal_sub", |r| r.principal_sub),
    ("policy_hash", |r| r.policy_hash),
    ("prev_hash", |r| Some(r.prev_hash)),
    ("hash", |r| Some(r.hash)),
];

const UINT32: [(&str, Int32); 5] = [
    ("masked_count", |r| {
        Some(u32::try_from(r.masked_detectors.len()).unwrap_or(u32::MAX))
    }),
    ("pid", |r| r.pid),
    ("tgid", |r| r.tgid),
    ("uid", |r| r.uid),
    ("gid", |r| r.gid),
];

const UINT64: [(&str, Int64); 3] = [
    ("seq", |r| Some(r.seq)),
    ("latency_us", |r| r.latency_us),
    ("archive_seq", |r| Some(r.archive_seq)),
];

const LISTS: [(&str, Strings); 2] = [
    ("rules", |r| &r.rules),
    ("masked_detectors", |r| &r.masked_detectors),
];

/// Where a run of rows sits in the host's chain: what a manifest line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub rows: u64,
    pub first_archive_seq: u64,
    pub last_archive_seq: u64,
    /// `prev_hash` of the first row: the hash this run continues from.
    pub first_prev_hash: String,
    pub last_hash: String,
    /// `ts` of the first row (in chain order): the file's partition.
    pub first_ts_us: i64,
}

/// Rows gathered column by column as they arrive, for one row group: appending copies a
/// record's values into the column buffers while it is still in cache, and the record itself
/// can be dropped.
pub struct Rows {
    ts: TimestampMicrosecondBuilder,
    text: Vec<StringBuilder>,
    uint32: Vec<UInt32Builder>,
    uint64: Vec<UInt64Builder>,
    lists: Vec<ListBuilder<StringBuilder>>,
    /// Bytes a row of each Utf8 column took in the last row group: the next one's capacity
    /// (growing a column by doubling holds the old and the new buffer at once).
    text_row_bytes: Vec<usize>,
}

impl Default for Rows {
    fn default() -> Rows {
        Rows {
            ts: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            text: TEXT.iter().map(|_| StringBuilder::new()).collect(),
            uint32: UINT32.iter().map(|_| UInt32Builder::new()).collect(),
            uint64: UINT64.iter().map(|_| UInt64Builder::new()).collect(),
            lists: LISTS
                .iter()
                .map(|_| ListBuilder::new(StringBuilder::new()))
                .collect(),
            text_row_bytes: vec![0; TEXT.len()],
        }
    }
}

impl Rows {
    /// Append one record.
    pub fn push(&mut self, r: &RecordRef<'_>) {
        self.ts.append_value(r.ts_us);
        for ((_, get), b) in TEXT.iter().zip(&mut self.text) {
            b.append_option(get(r));
        }
        for ((_, get), b) in UINT32.iter().zip(&mut self.uint32) {
            b.append_option(get(r));
        }
        for ((_, get), b) in UINT64.iter().zip(&mut self.uint64) {
            b.append_option(get(r));
        }
        for ((_, get), b) in LISTS.iter().zip(&mut self.lists) {
            for s in get(r) {
                b.values().append_value(s);
            }
            b.append(true);
        }
    }

    /// Make room for `rows` rows in the empty Utf8 columns, as many bytes a row as the last
    /// row group took (and a sixteenth more).
    fn reserve(&mut self, rows: usize) {
        for (b, per_row) in self.text.iter_mut().zip(&self.text_row_bytes) {
            if b.is_empty() && *per_row > 0 {
                let bytes = per_row.saturating_mul(rows);
                *b = StringBuilder::with_capacity(rows, bytes.saturating_add(bytes / 16));
            }
        }
    }

    /// Finish the columns as a batch and start over.
    fn finish(&mut self) -> Result<RecordBatch, parquet::errors::ParquetError> {
        let mut named: Vec<(&str, ArrayRef)> = vec![("ts", Arc::new(self.ts.finish()))];
        for (((name, _), b), per_row) in TEXT
            .iter()
            .zip(&mut self.text)
            .zip(&mut self.text_row_bytes)
        {
            *per_row = b.values_slice().len().div_ceil(b.len().max(1));
            named.push((name, Arc::new(b.finish())));
        }
        for ((name, _), b) in UINT32.iter().zip(&mut self.uint32) {
            named.push((name, Arc::new(b.finish())));
        }
        for ((name, _), b) in UINT64.iter().zip(&mut self.uint64) {
            named.push((name, Arc::new(b.finish())));
        }
        for ((name, _), b) in LISTS.iter().zip(&mut self.lists) {
            named.push((name, Arc::new(b.finish())));
        }
        let columns = schema()
            .fields()
            .iter()
            .filter_map(|f| {
                named
                    .iter()
                    .find(|(n, _)| *n == f.name())
                    .map(|(_, a)| a.clone())
            })
            .collect();
        Ok(RecordBatch::try_new(schema(), columns)?)
    }
}

/// One row of a [`Plan`]: its sort key and where to read it again (32 bytes).
#[derive(Debug, Clone, Copy)]
struct Planned {
    /// Index of its `session_id` in [`Plan::sessions`]' order of arrival.
    session: u32,
    seq: u64,
    archive_seq: u64,
    /// Its [`EntryAt`], flat.
    offset: u64,
    len: u32,
}

impl Planned {
    fn at(&self) -> EntryAt {
        EntryAt {
            offset: self.offset,
            len: self.len,
        }
    }
}

/// The rows of one file before they are gathered into columns: each row's sort key and where
/// its record is (32 bytes a row), the distinct session ids, and the run's [`Span`].
/// [`Plan::write`] reads the records again one row group at a time, so memory holds one row
/// group, never the whole file.
#[derive(Default)]
pub struct Plan {
    sessions: HashMap<String, u32>,
    rows: Vec<Planned>,
    span: Option<Span>,
}

impl Plan {
    /// Add one record, found at `at` (records come in chain order).
    pub fn push(&mut self, r: &RecordRef<'_>, at: EntryAt) {
        let next = u32::try_from(self.sessions.len()).unwrap_or(u32::MAX);
        let session = match self.sessions.get(r.session_id) {
            Some(i) => *i,
            None => *self.sessions.entry(r.session_id.to_owned()).or_insert(next),
        };
        self.rows.push(Planned {
            session,
            seq: r.seq,
            archive_seq: r.archive_seq,
            offset: at.offset,
            len: at.len,
        });
        match &mut self.span {
            None => {
                self.span = Some(Span {
                    rows: 1,
                    first_archive_seq: r.archive_seq,
                    last_archive_seq: r.archive_seq,
                    first_prev_hash: r.prev_hash.to_owned(),
                    last_hash: r.hash.to_owned(),
                    first_ts_us: r.ts_us,
                })
            }
            Some(span) => {
                span.rows += 1;
                span.last_archive_seq = r.archive_seq;
                span.last_hash.clear();
                span.last_hash.push_str(r.hash);
            }
        }
    }

    /// Where the rows sit in the chain; `None` when there are none.
    pub fn span(&self) -> Option<&Span> {
        self.span.as_ref()
    }

    /// The last row's hash, if any.
    pub fn last_hash(&self) -> Option<&str> {
        self.span.as_ref().map(|s| s.last_hash.as_str())
    }

    /// Write the rows as zstd Parquet to `out`, sorted by session, then sequence (then chain
    /// order), so that row-group statistics let a reader skip what one session does not
    /// touch. `read` pushes the record at a position onto the columns; it is called one row
    /// group at a time (see [`row_groups`]), each row group written and flushed before the
    /// next is read. Returns `out` once the file is complete (footer included), for the
    /// fsync; an error is a failed file, never silently a short one.
    pub fn write<W: io::Write + Send>(
        mut self,
        out: W,
        mut read: impl FnMut(EntryAt, &mut Rows) -> io::Result<()>,
    ) -> io::Result<W> {
        self.sort();
        let mut writer = ArrowWriter::try_new(out, schema(), Some(properties().map_err(io_error)?))
            .map_err(io_error)?;
        let mut columns = Rows::default();
        for group in row_groups(&self.rows) {
            columns.reserve(group.len());
            for row in group {
                read(row.at(), &mut columns)?;
            }
            writer
                .write(&columns.finish().map_err(io_error)?)
                .map_err(io_error)?;
            writer.flush().map_err(io_error)?;
        }
        writer.into_inner().map_err(io_error)
    }

    /// Sort the rows by session id, `seq`, `archive_seq`: session ids are few against rows,
    /// so they are ranked once and rows sorted on integers.
    fn sort(&mut self) {
        let mut ids: Vec<(&str, u32)> = self
            .sessions
            .iter()
            .map(|(s, i)| (s.as_str(), *i))
            .collect();
        ids.sort_unstable();
        let mut rank = vec![u32::MAX; ids.len()];
        for ((_, i), r) in ids.iter().zip(0u32..) {
            if let Some(slot) = rank.get_mut(*i as usize) {
                *slot = r;
            }
        }
        let rank_of = |row: &Planned| rank.get(row.session as usize).copied().unwrap_or(u32::MAX);
        self.rows
            .sort_unstable_by_key(|row| (rank_of(row), row.seq, row.archive_seq));
    }
}

/// Consecutive rows into row groups of at most [`ROW_GROUP`] rows and [`ROW_GROUP_BYTES`]
/// bytes of records (or a single row, however large).
fn row_groups(rows: &[Planned]) -> impl Iterator<Item = &[Planned]> {
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0u64;
        let mut n = 0;
        while let Some(row) = rest.get(n).filter(|_| n < ROW_GROUP) {
            bytes += u64::from(row.len);
            if n > 0 && bytes > ROW_GROUP_BYTES {
                break;
            }
            n += 1;
        }
        let (group, tail) = rest.split_at(n);
        rest = tail;
        Some(group)
    })
}

/// Write rows (in any order) as one Parquet file, as [`Plan::write`] does (tests and tools
/// that rewrite a file).
pub fn write<W: io::Write + Send>(out: W, rows: &[Record]) -> io::Result<W> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|i| rows.get(*i).map(|r| r.archive_seq));
    let mut plan = Plan::default();
    let mut body = Vec::new();
    for (i, r) in order.iter().filter_map(|i| Some((*i, rows.get(*i)?))) {
        body.clear();
        r.encode(&mut body);
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        plan.push(
            &r.as_ref(),
            EntryAt {
                offset: i as u64,
                len,
            },
        );
    }
    plan.write(out, |at, columns| {
        if let Some(r) = usize::try_from(at.offset).ok().and_then(|i| rows.get(i)) {
            columns.push(&r.as_ref());
        }
        Ok(())
    })
}

/// The writer settings: zstd, row groups small enough to prune, no dictionary or statistics
/// where they cannot pay, a bloom filter on `session_id`.
fn properties() -> Result<WriterProperties, parquet::errors::ParquetError> {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
        .set_max_row_group_row_count(Some(ROW_GROUP));
    // Columns whose values (almost) never repeat: a dictionary only costs time there.
    for column in [
        "payload",
        "prev_hash",
        "hash",
        "jsonrpc_id",
        "ts",
        "archive_seq",
        "latency_us",
    ] {
        props = props.set_column_dictionary_enabled(ColumnPath::from(column), false);
    }
    // Hashes are random: statistics on them prune nothing.
    for column in ["payload", "prev_hash", "hash"] {
        props =
            props.set_column_statistics_enabled(ColumnPath::from(column), EnabledStatistics::None);
    }
    // One session's transcript: a bloom filter lets readers skip row groups without it.
    props = props.set_column_bloom_filter_enabled(ColumnPath::from("session_id"), true);
    Ok(props.build())
}

/// Read every row of an archive file back, in archive (chain) order.
pub fn read(path: &Path) -> Result<Vec<Record>, String> {
    read_rows(path, None)
}

/// The rows of one session in an archive file, in archive order, reading only the row groups
/// whose `session_id` statistics can hold it (files are sorted by session).
pub fn read_session(path: &Path, session: &str) -> Result<Vec<Record>, String> {
    read_rows(path, Some(session))
}

pub(crate) fn open_reader(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| format!("not a readable Parquet file: {e}"))
}

/// The row groups of a file that may hold `session`, and how many it has.
pub fn session_row_groups(path: &Path, session: &str) -> Result<(Vec<usize>, usize), String> {
    Ok(select_row_groups(&open_reader(path)?, session))
}

fn select_row_groups(
    builder: &ParquetRecordBatchReaderBuilder<File>,
    session: &str,
) -> (Vec<usize>, usize) {
    let key = session.as_bytes();
    let column = builder
        .parquet_schema()
        .columns()
        .iter()
        .position(|c| c.name() == "session_id");
    let groups = builder.metadata().row_groups();
    let selected = groups
        .iter()
        .enumerate()
        .filter(|(_, rg)| {
            // Without statistics a row group may hold anything. Truncated statistics stay
            // bounds (a shorter min, a larger max), so the comparison stays safe.
            let Some(stats) = column.and_then(|c| rg.column(c).statistics()) else {
                return true;
            };
            stats.min_bytes_opt().is_none_or(|min| min <= key)
                && stats.max_bytes_opt().is_none_or(|max| key <= max)
        })
        .map(|(i, _)| i)
        .collect();
    (selected, groups.len())
}

fn read_rows(path: &Path, session: Option<&str>) -> Result<Vec<Record>, String> {
    let mut rows = Vec::new();
    scan_rows(path, session, |r| rows.push(r))?;
    rows.sort_by_key(|r| r.archive_seq);
    Ok(rows)
}

/// Every row of an archive file, in file order (sorted by session), one batch in memory at a
/// time.
pub fn for_each_row(path: &Path, each: impl FnMut(Record)) -> Result<(), String> {
    scan_rows(path, None, each)
}

fn scan_rows(
    path: &Path,
    session: Option<&str>,
    mut each: impl FnMut(Record),
) -> Result<(), String> {
    let mut builder = open_reader(path)?;
    if let Some(session) = session {
        let (groups, _) = select_row_groups(&builder, session);
        builder = builder.with_row_groups(groups);
    }
    let reader = builder.build().map_err(|e| e.to_string())?;
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        from_batch(&batch)?
            .into_iter()
            .filter(|r| session.is_none_or(|s| r.input.session_id == s))
            .for_each(&mut each);
    }
    Ok(())
}

pub(crate) fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T, String> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| format!("column `{name}` is missing or has the wrong type"))
}

fn from_batch(batch: &RecordBatch) -> Result<Vec<Record>, String> {
    let s = |name| column::<StringArray>(batch, name);
    let (host, session_id, mcp_session_id) = (s("host")?, s("session_id")?, s("mcp_session_id")?);
    let (direction, kind, method, tool, jsonrpc_id) = (
        s("direction")?,
        s("kind")?,
        s("method")?,
        s("tool")?,
        s("jsonrpc_id")?,
    );
    let (payload, decision, user, comm, exe) = (
        s("payload")?,
        s("decision")?,
        s("user")?,
        s("comm")?,
        s("exe")?,
    );
    let (cgroup, backend, server_addr, sni, policy_hash) = (
        s("cgroup")?,
        s("backend")?,
        s("server_addr")?,
        s("sni")?,
        s("policy_hash")?,
    );
    let (prev_hash, hash) = (s("prev_hash")?, s("hash")?);
    let (principal_iss, principal_sub) = (s("principal_iss")?, s("principal_sub")?);
    let ts = column::<TimestampMicrosecondArray>(batch, "ts")?;
    let seq = column::<UInt64Array>(batch, "seq")?;
    let archive_seq = column::<UInt64Array>(batch, "archive_seq")?;
    let latency = column::<UInt64Array>(batch, "latency_us")?;
    let u = |name| column::<UInt32Array>(batch, name);
    let (pid, tgid, uid, gid) = (u("pid")?, u("tgid")?, u("uid")?, u("gid")?);
    let rules = column::<ListArray>(batch, "rules")?;
    let masked = column::<ListArray>(batch, "masked_detectors")?;
    let opt = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_owned());
    let list = |a: &ListArray, i: usize| -> Vec<String> {
        let v = a.value(i);
        v.as_any()
            .downcast_ref::<StringArray>()
            .map(|sa| (0..sa.len()).map(|j| sa.value(j).to_owned()).collect())
            .unwrap_or_default()
    };
    let u32opt = |a: &UInt32Array, i: usize| (!a.is_null(i)).then(|| a.value(i));
    Ok((0..batch.num_rows())
        .map(|i| Record {
            archive_seq: archive_seq.value(i),
            input: RecordInput {
                ts_us: ts.value(i),
                host: host.value(i).to_owned(),
                session_id: session_id.value(i).to_owned(),
                mcp_session_id: opt(mcp_session_id, i),
                seq: seq.value(i),
                direction: direction.value(i).to_owned(),
                kind: kind.value(i).to_owned(),
                method: opt(method, i),
                tool: opt(tool, i),
                jsonrpc_id: opt(jsonrpc_id, i),
                payload: opt(payload, i).map(MaskedPayload::read_back),
                decision: decision.value(i).to_owned(),
                rules: list(rules, i),
                masked_detectors: list(masked, i),
                latency_us: (!latency.is_null(i)).then(|| latency.value(i)),
                pid: u32opt(pid, i),
                tgid: u32opt(tgid, i),
                uid: u32opt(uid, i),
                gid: u32opt(gid, i),
                user: opt(user, i),
                comm: opt(comm, i),
                exe: opt(exe, i),
                cgroup: opt(cgroup, i),
                backend: opt(backend, i),
                server_addr: opt(server_addr, i),
                sni: opt(sni, i),
                principal_iss: opt(principal_iss, i),
                principal_sub: opt(principal_sub, i),
                policy_hash: opt(policy_hash, i),
            },
            prev_hash: prev_hash.value(i).to_owned(),
            hash: hash.value(i).to_owned(),
        })
        .collect())
}

/// An I/O error from a Parquet error.
pub fn io_error(e: parquet::errors::ParquetError) -> io::Error {
    io::Error::other(e)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::archive::record::GENESIS;

    /// Counts the bytes that reach it: what the Parquet writer has put out so far.
    struct Counted {
        bytes: Vec<u8>,
        written: Arc<AtomicU64>,
    }

    impl io::Write for Counted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.bytes.extend_from_slice(buf);
            self.written.fetch_add(buf.len() as u64, Ordering::Relaxed);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn chain(n: u64) -> Vec<Record> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|i| {
                let r = Record::chain(
                    i,
                    RecordInput {
                        ts_us: 1_795_000_000_000_000 + i as i64,
                        seq: i,
                        session_id: format!("s{}", i % 7),
                        payload: Some(MaskedPayload::for_tests(format!("payload {i}"))),
                        ..Default::default()
                    },
                    &prev,
                );
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    /// The file is written one row group at a time: no more than a row group's records are
    /// read before the output grows, so a segment is never gathered whole into columns.
    #[test]
    fn writes_one_row_group_at_a_time() {
        let records = chain(2 * ROW_GROUP as u64 + 100);
        let mut plan = Plan::default();
        for (i, r) in records.iter().enumerate() {
            plan.push(
                &r.as_ref(),
                EntryAt {
                    offset: i as u64,
                    len: 200,
                },
            );
        }
        assert_eq!(plan.span().map(|s| s.rows), Some(records.len() as u64));
        let written = Arc::new(AtomicU64::new(0));
        let out = Counted {
            bytes: Vec::new(),
            written: written.clone(),
        };
        let (mut seen, mut run, mut longest) = (0, 0, 0);
        let out = plan
            .write(out, |at, columns| {
                let now = written.load(Ordering::Relaxed);
                if now != seen {
                    (seen, run) = (now, 0);
                }
                run += 1;
                longest = longest.max(run);
                columns.push(&records[at.offset as usize].as_ref());
                Ok(())
            })
            .unwrap();
        assert_eq!(
            longest, ROW_GROUP,
            "records read with nothing written in between"
        );

        let file = parquet::file::reader::SerializedFileReader::new(bytes::Bytes::from(out.bytes))
            .unwrap();
        use parquet::file::reader::FileReader as _;
        let groups: Vec<i64> = file
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect();
        assert_eq!(groups, [ROW_GROUP as i64, ROW_GROUP as i64, 100]);
    }

    /// Row groups end at `ROW_GROUP` rows or `ROW_GROUP_BYTES` of records, whichever comes
    /// first; a record larger than that alone is a row group of its own.
    #[test]
    fn row_groups_are_bounded_in_rows_and_bytes() {
        let rows = |lens: &[u32]| -> Vec<Planned> {
            lens.iter()
                .zip(0u64..)
                .map(|(len, i)| Planned {
                    session: 0,
                    seq: i,
                    archive_seq: i,
                    offset: i,
                    len: *len,
                })
                .collect()
        };
        let sizes = |rows: &[Planned]| -> Vec<usize> { row_groups(rows).map(<[_]>::len).collect() };
        assert_eq!(
            sizes(&rows(&vec![100; 2 * ROW_GROUP + 1])),
            [ROW_GROUP, ROW_GROUP, 1]
        );
        let mib = 1 << 20;
        // 32 MiB of 1 MiB records, then the rest.
        assert_eq!(sizes(&rows(&[mib; 40])), [32, 8]);
        // Larger than the cap: alone.
        assert_eq!(sizes(&rows(&[10, 40 * mib, 10])), [1, 1, 1]);
        assert_eq!(sizes(&rows(&[])), Vec::<usize>::new());
    }
}
