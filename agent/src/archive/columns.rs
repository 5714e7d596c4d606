//! The Parquet side: the Arrow schema (documented column by column in ARCHIVE.md), rows to
//! one RecordBatch per file, zstd Parquet, and reading rows back for `airlock verify`.
//!
//! Types are chosen for DuckDB: `ts` is a UTC timestamp in microseconds, `rules` and
//! `masked_detectors` are lists of strings, ids are unsigned integers.

use std::{fs::File, io, path::Path, sync::Arc};

use arrow_array::{
    Array, ArrayRef, ListArray, RecordBatch, StringArray, TimestampMicrosecondArray, UInt32Array,
    UInt64Array,
    builder::{
        ListBuilder, StringBuilder, TimestampMicrosecondBuilder, UInt32Builder, UInt64Builder,
    },
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::{
    arrow::{ArrowWriter, arrow_reader::ParquetRecordBatchReaderBuilder},
    basic::{Compression, ZstdLevel},
    file::properties::{EnabledStatistics, WriterProperties},
    schema::types::ColumnPath,
};

use super::record::{MaskedPayload, Record, RecordInput};

/// Rows per Parquet row group: small enough that DuckDB's statistics can skip most of a file
/// when one session is asked for (rows are sorted by session).
const ROW_GROUP: usize = 8192;

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

/// Rows to one batch, in the order given.
pub fn to_batch(rows: &[&Record]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let strings = |f: &dyn Fn(&Record) -> Option<&str>| -> ArrayRef {
        Arc::new(rows.iter().map(|r| f(r)).collect::<StringArray>())
    };
    let lists = |f: &dyn Fn(&Record) -> &Vec<String>| -> ArrayRef {
        let mut b = ListBuilder::new(StringBuilder::new());
        for r in rows {
            for s in f(r) {
                b.values().append_value(s);
            }
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let u32s = |f: &dyn Fn(&Record) -> Option<u32>| -> ArrayRef {
        let mut b = UInt32Builder::with_capacity(rows.len());
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let u64s = |f: &dyn Fn(&Record) -> Option<u64>| -> ArrayRef {
        let mut b = UInt64Builder::with_capacity(rows.len());
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let mut ts = TimestampMicrosecondBuilder::with_capacity(rows.len()).with_timezone("UTC");
    for r in rows {
        ts.append_value(r.input.ts_us);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ts.finish()),
        strings(&|r| Some(&r.input.host)),
        strings(&|r| Some(&r.input.session_id)),
        strings(&|r| r.input.mcp_session_id.as_deref()),
        u64s(&|r| Some(r.input.seq)),
        strings(&|r| Some(&r.input.direction)),
        strings(&|r| Some(&r.input.kind)),
        strings(&|r| r.input.method.as_deref()),
        strings(&|r| r.input.tool.as_deref()),
        strings(&|r| r.input.jsonrpc_id.as_deref()),
        strings(&|r| r.input.payload.as_ref().map(MaskedPayload::as_str)),
        strings(&|r| Some(&r.input.decision)),
        lists(&|r| &r.input.rules),
        u32s(&|r| Some(r.input.masked_detectors.len() as u32)),
        lists(&|r| &r.input.masked_detectors),
        u64s(&|r| r.input.latency_us),
        u32s(&|r| r.input.pid),
        u32s(&|r| r.input.tgid),
        u32s(&|r| r.input.uid),
        u32s(&|r| r.input.gid),
        strings(&|r| r.input.user.as_deref()),
        strings(&|r| r.input.comm.as_deref()),
        strings(&|r| r.input.exe.as_deref()),
        strings(&|r| r.input.cgroup.as_deref()),
        strings(&|r| r.input.backend.as_deref()),
        strings(&|r| r.input.server_addr.as_deref()),
        strings(&|r| r.input.sni.as_deref()),
        strings(&|r| r.input.principal_iss.as_deref()),
        strings(&|r| r.input.principal_sub.as_deref()),
        strings(&|r| r.input.policy_hash.as_deref()),
        u64s(&|r| Some(r.archive_seq)),
        strings(&|r| Some(&r.prev_hash)),
        strings(&|r| Some(&r.hash)),
    ];
    RecordBatch::try_new(schema(), columns)
}

/// Write rows (sorted by session, then sequence, for pruning) as zstd Parquet to `file`.
pub fn write(file: File, rows: &[Record]) -> Result<File, parquet::errors::ParquetError> {
    let mut sorted: Vec<&Record> = rows.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.input.session_id, a.input.seq, a.archive_seq).cmp(&(
            &b.input.session_id,
            b.input.seq,
            b.archive_seq,
        ))
    });
    let batch = to_batch(&sorted)?;
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
    let props = props.build();
    let mut writer = ArrowWriter::try_new(file, schema(), Some(props))?;
    writer.write(&batch)?;
    // `into_inner` finishes the file (footer included) and returns it for the fsync; an error
    // here is a failed archive file, never silently a short one.
    writer.into_inner()
}

/// Read every row of an archive file back, in archive (chain) order.
pub fn read(path: &Path) -> Result<Vec<Record>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| format!("not a readable Parquet file: {e}"))?
        .build()
        .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        rows.extend(from_batch(&batch)?);
    }
    rows.sort_by_key(|r| r.archive_seq);
    Ok(rows)
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T, String> {
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
                payload: opt(payload, i).map(MaskedPayload::from_masked),
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
