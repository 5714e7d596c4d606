//! Parquet session archives: durable, tamper-evident, queryable with DuckDB.
//!
//! - [`record`]: one row, the hash chain linking rows, and [`MaskedPayload`], the only payload
//!   type the archive takes;
//! - [`wal`]: checksummed write-ahead segments (a Parquet file is unreadable until closed);
//! - [`columns`]: the Arrow schema and the Parquet encoding (zstd, rows sorted by session);
//! - [`manifest`]: the Ed25519-signed chain of per-file digests;
//! - [`writer`]: the [`writer::SegmentLog`] (chain, segments) and the [`writer::Publisher`]
//!   (segment on disk → Parquet → manifest), with crash recovery;
//! - [`service`]: the two on their own threads: group commit, strict or buffered recording;
//! - [`verify`]: what `airlock verify` checks (keys, heads; the manifest lines in
//!   [`manifest::verify_lines`]), and [`files`]: each host's files and record chain against
//!   its lines;
//! - [`responder`]: `airlock replay` transcripts and `evidence` bundles;
//! - [`sessions`]: sessions as responders mean them (by MCP session across connections).
//!
//! Layout: `archive_dir/date=YYYY-MM-DD/hour=HH/<host>-<segment>.parquet`,
//! `archive_dir/_manifest/<host>.{jsonl,pub}`, `archive_dir/_wal/<segment>.wal`.

pub mod columns;
pub(crate) mod files;
pub mod labels;
pub mod manifest;
pub mod record;
pub mod responder;
pub mod service;
pub mod sessions;
pub mod verify;
pub mod wal;
pub mod writer;

pub use labels::{RecordDecision, RecordKind};
pub use record::{MaskedPayload, Record, RecordInput};
pub use writer::{ArchiveWriter, WriterConfig};

#[cfg(test)]
mod tests;
