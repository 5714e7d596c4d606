//! The webhook's on-disk queue: one file per event in `state_dir/events-spool` (0700, root),
//! named so that name order is arrival order. Bounded in files and bytes: when full, the
//! oldest events are dropped and counted. Files are written to a temporary name and renamed,
//! so a crash leaves whole events only. Events survive an agent restart; they are not fsynced
//! one by one (a power loss can lose the newest).
//!
//! The spool keeps a sorted in-memory index of its events (name → size), read from the
//! directory once at open and kept in step by [`Spool::push`] and [`Spool::remove`]: nothing
//! scans the directory per event. The agent merges what other processes (`airlock verify`)
//! added with [`Spool::rescan`], every few seconds, from the delivery thread.
//!
//! Only the spool's owner (the agent, [`Role::Owner`]) removes temporary files, and only stale
//! ones (older than [`STALE_TMP`]): a CLI opening the spool never touches a file the running
//! agent is writing.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

/// Largest event file read back (events are a few KiB; anything else is not ours).
const MAX_EVENT_BYTES: u64 = 1024 * 1024;

/// A temporary file older than this is a crashed writer's leftover.
pub const STALE_TMP: Duration = Duration::from_secs(60);

/// Who opens the spool: the agent owns it (cleans stale temporary files); a CLI only adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Owner,
    Writer,
}

#[derive(Default)]
struct Index {
    /// File name → size, in name (arrival) order.
    entries: BTreeMap<String, u64>,
    bytes: u64,
}

impl Index {
    fn insert(&mut self, name: String, len: u64) {
        if let Some(old) = self.entries.insert(name, len) {
            self.bytes = self.bytes.saturating_sub(old);
        }
        self.bytes += len;
    }

    fn forget(&mut self, name: &str) -> bool {
        match self.entries.remove(name) {
            Some(len) => {
                self.bytes = self.bytes.saturating_sub(len);
                true
            }
            None => false,
        }
    }
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    max_files: usize,
    index: Mutex<Index>,
    counter: AtomicU64,
    /// Directory scans so far (open and rescans): never one per event.
    scans: AtomicU64,
}

impl Spool {
    /// Open (create, 0700) the spool and index what an earlier run left in it. The owner
    /// also removes stale temporary files.
    pub fn open(dir: &Path, max_bytes: u64, max_files: usize, role: Role) -> io::Result<Spool> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        crate::fsperm::check_private_dir(dir)?;
        let spool = Spool {
            dir: dir.to_owned(),
            max_bytes,
            max_files,
            index: Mutex::new(Index::default()),
            counter: AtomicU64::new(0),
            scans: AtomicU64::new(0),
        };
        spool.scan(role == Role::Owner)?;
        Ok(spool)
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read the directory into the index (replacing it); with `clean`, remove temporary
    /// files older than [`STALE_TMP`].
    fn scan(&self, clean: bool) -> io::Result<()> {
        self.scans.fetch_add(1, Ordering::Relaxed);
        let mut fresh = Index::default();
        let now = SystemTime::now();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.ends_with(".tmp") {
                if clean {
                    let stale = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|m| now.duration_since(m).ok())
                        .is_some_and(|age| age >= STALE_TMP);
                    if stale {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            } else if name.ends_with(".json") {
                let Ok(meta) = entry.metadata() else {
                    continue; // removed meanwhile
                };
                fresh.insert(name, meta.len());
            }
        }
        *self.index() = fresh;
        Ok(())
    }

    /// Re-read the directory: events another process spooled, files removed by hand; the
    /// owner also cleans stale temporary files. One scan, not per event.
    pub fn rescan(&self, clean: bool) -> io::Result<()> {
        self.scan(clean)
    }

    /// Directory scans done so far.
    pub fn scans(&self) -> u64 {
        self.scans.load(Ordering::Relaxed)
    }

    /// Events and bytes spooled now.
    pub fn usage(&self) -> (usize, u64) {
        let i = self.index();
        (i.entries.len(), i.bytes)
    }

    /// Add one event; returns how many of the oldest were dropped to make room.
    pub fn push(&self, body: &[u8]) -> io::Result<u64> {
        let len = body.len() as u64;
        if len > MAX_EVENT_BYTES || len > self.max_bytes {
            return Err(io::Error::other("event larger than the spool"));
        }
        let mut dropped = 0;
        loop {
            let oldest = {
                let i = self.index();
                if i.entries.len() < self.max_files && i.bytes + len <= self.max_bytes {
                    break;
                }
                i.entries.keys().next().cloned()
            };
            let Some(name) = oldest else { break };
            if self.remove_name(&name)? {
                dropped += 1;
            }
        }
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{now:024}-{:010}-{n:010}", std::process::id());
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        let json = format!("{name}.json");
        let written = f.write_all(body).and_then(|()| {
            drop(f);
            fs::rename(&tmp, self.dir.join(&json))
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.index().insert(json, len);
        Ok(dropped)
    }

    /// The oldest spooled event's file.
    pub fn oldest(&self) -> Option<PathBuf> {
        self.index().entries.keys().next().map(|n| self.dir.join(n))
    }

    /// Read a spooled event (bounded).
    pub fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let meta = fs::symlink_metadata(path)?;
        if !meta.is_file() || meta.len() > MAX_EVENT_BYTES {
            return Err(io::Error::other("not an event file"));
        }
        fs::read(path)
    }

    /// Remove a spooled event; `false` when it was already gone.
    pub fn remove(&self, path: &Path) -> io::Result<bool> {
        match path.file_name().and_then(|n| n.to_str()) {
            Some(name) if path.parent() == Some(self.dir.as_path()) => self.remove_name(name),
            _ => Err(io::Error::other("not a file of the spool")),
        }
    }

    fn remove_name(&self, name: &str) -> io::Result<bool> {
        match fs::remove_file(self.dir.join(name)) {
            Ok(()) => Ok(self.index().forget(name)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Removed by hand (or by another process): the index follows.
                self.index().forget(name);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("airlock-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn bounded_oldest_first_and_survives_reopen() {
        let dir = temp("bounded");
        let s = Spool::open(&dir, 1 << 20, 3, Role::Owner).unwrap();
        for i in 0..5 {
            let dropped = s.push(format!("{{\"n\":{i}}}").as_bytes()).unwrap();
            assert_eq!(dropped, u64::from(i >= 3));
        }
        assert_eq!(s.usage().0, 3);
        let first = s.oldest().unwrap();
        assert_eq!(s.read(&first).unwrap(), b"{\"n\":2}");
        drop(s);
        let s = Spool::open(&dir, 1 << 20, 3, Role::Owner).unwrap();
        assert_eq!(s.usage(), (3, 21));
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(s.remove(&first).unwrap());
        assert!(!s.remove(&first).unwrap());
        assert_eq!(s.read(&s.oldest().unwrap()).unwrap(), b"{\"n\":3}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// 2,000 events, pushed past a full spool and drained oldest first, cost no directory
    /// scan beyond the one at open, in bounded time; the index after a restart is what is
    /// on disk.
    #[test]
    fn many_events_drain_from_the_index_in_bounded_time() {
        let dir = temp("many");
        let s = Spool::open(&dir, 64 << 20, 1500, Role::Owner).unwrap();
        let started = std::time::Instant::now();
        let mut dropped = 0;
        for i in 0..2000 {
            dropped += s.push(format!("{{\"n\":{i}}}").as_bytes()).unwrap();
        }
        assert_eq!(dropped, 500, "the oldest dropped when full");
        assert_eq!(s.usage().0, 1500);
        // A restart: the index is the directory's content.
        drop(s);
        let s = Spool::open(&dir, 64 << 20, 1500, Role::Owner).unwrap();
        let on_disk = fs::read_dir(&dir).unwrap().count();
        assert_eq!(s.usage().0, on_disk);
        let bytes: u64 = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(s.usage().1, bytes);
        for i in 0..500 {
            s.push(format!("{{\"m\":{i}}}").as_bytes()).unwrap();
        }
        // Drain: oldest first, in order.
        let mut n = 0;
        let mut last = None;
        while let Some(p) = s.oldest() {
            let body = s.read(&p).unwrap();
            if n == 0 {
                assert_eq!(body, b"{\"n\":1000}");
            }
            assert!(last.as_ref() < Some(&p), "arrival order");
            assert!(s.remove(&p).unwrap());
            last = Some(p);
            n += 1;
        }
        assert_eq!(n, 1500);
        assert_eq!(s.usage(), (0, 0));
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        assert_eq!(s.scans(), 1, "one scan at open, none per event");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "took {took:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Events another process spooled, and files removed by hand, are picked up by a rescan.
    #[test]
    fn rescan_merges_other_writers() {
        let dir = temp("rescan");
        let agent = Spool::open(&dir, 1 << 20, 100, Role::Owner).unwrap();
        agent.push(b"{\"a\":1}").unwrap();
        let cli = Spool::open(&dir, 1 << 20, 100, Role::Writer).unwrap();
        cli.push(b"{\"cli\":1}").unwrap();
        assert_eq!(agent.usage().0, 1);
        agent.rescan(true).unwrap();
        assert_eq!(agent.usage().0, 2);
        let first = agent.oldest().unwrap();
        fs::remove_file(&first).unwrap();
        assert!(!agent.remove(&first).unwrap());
        assert_eq!(agent.usage().0, 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A CLI opening the spool leaves every temporary file alone (the agent may be writing
    /// one); the agent removes only stale ones.
    #[test]
    fn only_the_owner_removes_temporary_files_and_only_stale_ones() {
        let dir = temp("tmp");
        drop(Spool::open(&dir, 1 << 20, 100, Role::Owner).unwrap());
        let fresh = dir.join("00000000000000000000001-x.tmp");
        let stale = dir.join("00000000000000000000000-x.tmp");
        fs::write(&fresh, b"{").unwrap();
        fs::write(&stale, b"{").unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(old)
            .unwrap();
        drop(Spool::open(&dir, 1 << 20, 100, Role::Writer).unwrap());
        assert!(fresh.exists() && stale.exists(), "a CLI removes nothing");
        let s = Spool::open(&dir, 1 << 20, 100, Role::Owner).unwrap();
        assert!(fresh.exists(), "a file being written is kept");
        assert!(!stale.exists(), "a crashed writer's leftover is removed");
        assert_eq!(s.usage().0, 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
