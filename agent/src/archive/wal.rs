//! Write-ahead segments: the durable home of a record until it is in a finished Parquet file.
//!
//! Format: the 8-byte magic `AIRWAL2\n`, then entries `[len: u32 LE][crc32: u32 LE][len bytes
//! of body]`, the body being [`Record::encode`]'s binary layout (the canonical encoding the
//! record hash covers, so a record is encoded once for both). A crash can leave a torn last entry; reading stops at the first entry that is
//! short or fails its checksum and reports how many bytes were dropped, which can only be
//! records that were never acknowledged (acknowledgement follows the fsync).

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Read as _, Seek as _, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use super::record::{Record, RecordRef};

const MAGIC: &[u8; 8] = b"AIRWAL2\n";
/// Largest entry accepted when reading (a record is a few KiB; a payload is capped upstream).
pub const MAX_ENTRY: u32 = 64 * 1024 * 1024;

/// An open segment being appended to.
pub struct SegmentWriter {
    path: PathBuf,
    out: BufWriter<File>,
    /// The same file, for an fsync taken without the writer (group commit: the log thread
    /// syncs while callers go on appending).
    handle: std::sync::Arc<File>,
    /// One entry (header and body) for [`SegmentWriter::write_through`].
    entry: Vec<u8>,
    /// A partial entry could not be cut off: nothing more may be written to this segment.
    broken: bool,
    /// Bytes appended (magic included), and how many of them the last fsync covered.
    written: u64,
    synced: u64,
}

impl SegmentWriter {
    /// Create a new segment (fails if it exists: segments are never reopened for writing).
    pub fn create(path: &Path, mode: u32) -> io::Result<SegmentWriter> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        let handle = std::sync::Arc::new(file.try_clone()?);
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        out.write_all(MAGIC)?;
        Ok(SegmentWriter {
            path: path.to_owned(),
            out,
            handle,
            entry: Vec::new(),
            broken: false,
            written: MAGIC.len() as u64,
            synced: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Buffer one record (not durable until [`SegmentWriter::sync`]).
    pub fn append(&mut self, record: &Record) -> io::Result<()> {
        let mut body = Vec::new();
        record.encode(&mut body);
        self.append_encoded(&body)
    }

    /// Buffer one record already encoded (see `record::chain_into`).
    pub fn append_encoded(&mut self, body: &[u8]) -> io::Result<()> {
        let len = entry_len(body)?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&crc32fast::hash(body).to_le_bytes())?;
        self.out.write_all(body)?;
        self.written += 8 + u64::from(len);
        Ok(())
    }

    /// Write one record already encoded straight to the file (one `write(2)`): when this
    /// returns, the entry is in the kernel and survives the process being killed. On failure
    /// the file is cut back to where it was, so no partial entry stays behind.
    pub fn write_through(&mut self, body: &[u8]) -> io::Result<()> {
        self.write_through_all(std::slice::from_ref(&body))
    }

    /// [`SegmentWriter::write_through`] for several records at once: one `write(2)` for all
    /// of them; on failure none of them stays in the file.
    pub fn write_through_all(&mut self, bodies: &[&[u8]]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other(
                "an earlier partial write could not be cut off this segment",
            ));
        }
        self.out.flush()?;
        self.entry.clear();
        for body in bodies {
            let len = entry_len(body)?;
            self.entry.extend_from_slice(&len.to_le_bytes());
            self.entry
                .extend_from_slice(&crc32fast::hash(body).to_le_bytes());
            self.entry.extend_from_slice(body);
        }
        if let Err(e) = self.out.get_mut().write_all(&self.entry) {
            // Cut the partial entry off, and write the next one where it began (the file
            // position moved past what was written: appending there would leave a hole).
            let file = self.out.get_mut();
            if let Err(cut) = file
                .set_len(self.written)
                .and_then(|()| file.seek(io::SeekFrom::Start(self.written)))
            {
                self.broken = true;
                return Err(io::Error::other(format!(
                    "{e}; then cutting the partial entry off failed: {cut}"
                )));
            }
            return Err(e);
        }
        self.written += self.entry.len() as u64;
        if self.entry.capacity() > ENTRY_KEEP {
            // A large batch's buffer is not kept for the small writes that follow.
            self.entry = Vec::new();
        }
        Ok(())
    }

    /// Bytes written so far (magic included) and a handle to fsync them with.
    pub fn commit_point(&self) -> (std::sync::Arc<File>, u64) {
        (self.handle.clone(), self.written)
    }

    /// An fsync through [`SegmentWriter::commit_point`]'s handle covered `len` bytes.
    pub fn synced_through(&mut self, len: u64) {
        self.synced = self.synced.max(len);
    }

    /// Write out and fsync: everything appended so far is durable when this returns.
    pub fn sync(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
        self.synced = self.written;
        Ok(())
    }

    /// After a failed append or fsync: drop what the last fsync did not cover, from the
    /// buffer and from the file, so that nothing unacknowledged is ever read back.
    pub fn truncate_to_synced(self) -> io::Result<()> {
        // `into_parts` hands the buffer back instead of writing it out.
        let (file, _unwritten) = self.out.into_parts();
        file.set_len(self.synced)?;
        file.sync_all()
    }
}

/// The write-through buffer kept between writes (a larger one is freed after its write).
const ENTRY_KEEP: usize = 256 * 1024;

fn entry_len(body: &[u8]) -> io::Result<u32> {
    u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_ENTRY)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "record larger than a WAL entry may be",
            )
        })
}

/// What a segment held.
#[derive(Debug)]
pub struct SegmentContents {
    pub records: Vec<Record>,
    /// Bytes after the last good entry (a torn write), 0 when the segment ended cleanly.
    pub dropped_bytes: u64,
}

/// Read every intact entry of a segment.
pub fn read_segment(path: &Path) -> io::Result<SegmentContents> {
    let mut records = Vec::new();
    let dropped_bytes = scan_segment(path, |r| records.push(r.to_owned()))?;
    Ok(SegmentContents {
        records,
        dropped_bytes,
    })
}

/// Call `each` with every intact entry of a segment, borrowed, in order. Returns the bytes
/// after the last good entry (a torn write), 0 when the segment ended cleanly. Reads through
/// a 1 MiB buffer: memory does not grow with the segment.
pub fn scan_segment(path: &Path, mut each: impl FnMut(RecordRef<'_>)) -> io::Result<u64> {
    scan_entries(path, |_, r| each(r))
}

/// Where an entry sits in its segment, for [`EntryReader::read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryAt {
    /// Offset of its header.
    pub offset: u64,
    /// Length of its body.
    pub len: u32,
}

/// [`scan_segment`], with where each entry sits.
pub fn scan_entries(path: &Path, mut each: impl FnMut(EntryAt, RecordRef<'_>)) -> io::Result<u64> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut input = io::BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; MAGIC.len()];
    match input.read_exact(&mut magic) {
        // Created but the magic never reached the disk: nothing was acknowledged from it.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(size),
        Err(e) => return Err(e),
        Ok(()) if &magic != MAGIC => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: not a write-ahead segment of this Airlock version (expected {:?})",
                    path.display(),
                    String::from_utf8_lossy(MAGIC).trim_end()
                ),
            ));
        }
        Ok(()) => {}
    }
    let mut pos = MAGIC.len() as u64;
    let mut body = Vec::new();
    loop {
        let mut header = [0u8; 8];
        match input.read_exact(&mut header) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_ENTRY || pos + 8 + u64::from(len) > size {
            break;
        }
        body.resize(len as usize, 0);
        match input.read_exact(&mut body) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        if crc32fast::hash(&body) != crc {
            break;
        }
        match RecordRef::decode(&body) {
            Some(r) => each(EntryAt { offset: pos, len }, r),
            None => break,
        }
        pos += 8 + u64::from(len);
    }
    Ok(size - pos)
}

/// Reads entries of a segment again, one at a time by position (from [`scan_entries`]), each
/// checked against its header and checksum; one entry in memory.
pub struct EntryReader {
    file: File,
    entry: Vec<u8>,
}

impl EntryReader {
    pub fn open(path: &Path) -> io::Result<EntryReader> {
        Ok(EntryReader {
            file: File::open(path)?,
            entry: Vec::new(),
        })
    }

    /// The entry at `at` (one `pread`).
    pub fn read(&mut self, at: EntryAt) -> io::Result<RecordRef<'_>> {
        use std::os::unix::fs::FileExt as _;
        let invalid = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("write-ahead entry at {}: {what}", at.offset),
            )
        };
        if at.len > MAX_ENTRY {
            return Err(invalid("too long"));
        }
        self.entry.resize(8 + at.len as usize, 0);
        self.file.read_exact_at(&mut self.entry, at.offset)?;
        let (header, body) = self.entry.split_at(8);
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len != at.len || crc32fast::hash(body) != crc {
            return Err(invalid("changed since it was read"));
        }
        RecordRef::decode(body).ok_or_else(|| invalid("undecodable"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::record::{GENESIS, RecordInput};

    fn records(n: u64) -> Vec<Record> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|i| {
                let r = Record::chain(
                    i,
                    RecordInput {
                        seq: i,
                        session_id: "s".into(),
                        ..Default::default()
                    },
                    &prev,
                );
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let dir = std::env::temp_dir().join(format!("airlock-wal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("1.wal");
        let _ = std::fs::remove_file(&path);
        let mut w = SegmentWriter::create(&path, 0o600).unwrap();
        for r in records(5) {
            w.append(&r).unwrap();
        }
        w.sync().unwrap();
        assert!(
            SegmentWriter::create(&path, 0o600).is_err(),
            "segments are never reopened"
        );
        let full = read_segment(&path).unwrap();
        assert_eq!(full.records, records(5));
        assert_eq!(full.dropped_bytes, 0);

        // Cut the file at every byte of the last entry: the first four always survive.
        let bytes = std::fs::read(&path).unwrap();
        let last_start = {
            let mut w = SegmentWriter::create(&dir.join("4.wal"), 0o600).unwrap();
            for r in records(4) {
                w.append(&r).unwrap();
            }
            w.sync().unwrap();
            std::fs::metadata(dir.join("4.wal")).unwrap().len() as usize
        };
        for cut in last_start..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let got = read_segment(&path).unwrap();
            assert_eq!(got.records.len(), 4, "cut at {cut}");
            assert_eq!(got.dropped_bytes as usize, cut - last_start);
        }
        // A flipped byte inside an entry stops reading there.
        let mut corrupt = bytes.clone();
        corrupt[last_start + 12] ^= 0xff;
        std::fs::write(&path, &corrupt).unwrap();
        assert_eq!(read_segment(&path).unwrap().records.len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
