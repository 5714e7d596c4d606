//! The webhook's on-disk queue: one file per event in `state_dir/events-spool` (0700, root),
//! named so that name order is arrival order. Bounded in files and bytes: when full, the
//! oldest events are dropped and counted. Files are written to a temporary name and renamed,
//! so a crash leaves whole events only (a leftover `.tmp` is removed at open). Events survive
//! an agent restart; they are not fsynced one by one (a power loss can lose the newest).

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// Largest event file read back (events are a few KiB; anything else is not ours).
const MAX_EVENT_BYTES: u64 = 1024 * 1024;

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    max_files: usize,
    /// (files, bytes) in the spool, kept in step with the directory.
    usage: Mutex<(usize, u64)>,
    counter: AtomicU64,
}

impl Spool {
    /// Open (create, 0700) the spool and count what an earlier run left in it.
    pub fn open(dir: &Path, max_bytes: u64, max_files: usize) -> io::Result<Spool> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        crate::fsperm::check_private_dir(dir)?;
        let mut usage = (0, 0);
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            } else if name.ends_with(".json") {
                usage.0 += 1;
                usage.1 += entry.metadata()?.len();
            }
        }
        Ok(Spool {
            dir: dir.to_owned(),
            max_bytes,
            max_files,
            usage: Mutex::new(usage),
            counter: AtomicU64::new(0),
        })
    }

    /// Events and bytes spooled now.
    pub fn usage(&self) -> (usize, u64) {
        *self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add one event; returns how many of the oldest were dropped to make room.
    pub fn push(&self, body: &[u8]) -> io::Result<u64> {
        let len = body.len() as u64;
        if len > MAX_EVENT_BYTES || len > self.max_bytes {
            return Err(io::Error::other("event larger than the spool"));
        }
        let mut dropped = 0;
        loop {
            let (files, bytes) = self.usage();
            if files < self.max_files && bytes + len <= self.max_bytes {
                break;
            }
            match self.oldest()? {
                Some(p) => {
                    if self.remove(&p)? {
                        dropped += 1;
                    }
                }
                None => {
                    // The counts drifted (files removed by hand): recount.
                    *self.usage.lock().unwrap_or_else(|p| p.into_inner()) = (0, 0);
                    break;
                }
            }
        }
        let now = std::time::SystemTime::now()
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
        let written = f.write_all(body).and_then(|()| {
            drop(f);
            fs::rename(&tmp, self.dir.join(format!("{name}.json")))
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let mut u = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        u.0 += 1;
        u.1 += len;
        Ok(dropped)
    }

    /// The oldest spooled event's file.
    pub fn oldest(&self) -> io::Result<Option<PathBuf>> {
        let mut oldest: Option<std::ffi::OsString> = None;
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            if !name.to_string_lossy().ends_with(".json") {
                continue;
            }
            if oldest.as_ref().is_none_or(|o| name < *o) {
                oldest = Some(name);
            }
        }
        Ok(oldest.map(|n| self.dir.join(n)))
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
        let len = fs::symlink_metadata(path).map(|m| m.len());
        match fs::remove_file(path) {
            Ok(()) => {
                let mut u = self.usage.lock().unwrap_or_else(|p| p.into_inner());
                u.0 = u.0.saturating_sub(1);
                u.1 = u.1.saturating_sub(len.unwrap_or(0));
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_oldest_first_and_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("airlock-spool-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let s = Spool::open(&dir, 1 << 20, 3).unwrap();
        for i in 0..5 {
            let dropped = s.push(format!("{{\"n\":{i}}}").as_bytes()).unwrap();
            assert_eq!(dropped, u64::from(i >= 3));
        }
        assert_eq!(s.usage().0, 3);
        let first = s.oldest().unwrap().unwrap();
        assert_eq!(s.read(&first).unwrap(), b"{\"n\":2}");
        drop(s);
        let s = Spool::open(&dir, 1 << 20, 3).unwrap();
        assert_eq!(s.usage(), (3, 21));
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(s.remove(&first).unwrap());
        assert!(!s.remove(&first).unwrap());
        assert_eq!(s.read(&s.oldest().unwrap().unwrap()).unwrap(), b"{\"n\":3}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
