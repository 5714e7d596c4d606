//! The JSON-lines file sink: one OCSF event a line, rotated by size (`path.1` newest, up to
//! `path.<keep>`). Files are 0640 root:`archive_group` (the group a log shipper runs in),
//! 0600 when that group does not exist; never world-readable.
//!
//! The file opened must be a regular file with one link, owned by the agent's user: a
//! hardlink planted at the path (to `/etc/shadow`, say) is refused, never appended to or
//! chmod-ed. A file removed or moved away by hand or by logrotate is noticed (its path no
//! longer names the open file) and a new one is created; rotation of a file that is gone
//! just starts the new one.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use super::{EventStats, EventsError, Msg};
use crate::config::events::FileSink;

/// Start the file sink's thread; the file is opened (created) before this returns.
pub fn spawn(
    cfg: FileSink,
    gid: Option<u32>,
    rx: std::sync::mpsc::Receiver<Msg>,
    stats: Arc<EventStats>,
) -> Result<std::thread::JoinHandle<()>, EventsError> {
    let err = |source| EventsError::File {
        path: cfg.path.clone(),
        source,
    };
    if let Some(dir) = cfg.path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut writer = Writer::open(cfg.clone(), gid).map_err(err)?;
    std::thread::Builder::new()
        .name("airlock-events-file".into())
        .spawn(move || {
            let s = &stats.file;
            let handle = |msg: Msg, writer: &mut Writer| match msg {
                Msg::Event(e) => match writer.write(&e.json, &stats) {
                    Ok(()) => {
                        s.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        s.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(path = %writer.cfg.path.display(), error = %e, "cannot write an event to the events file");
                    }
                },
                Msg::Flush(ack) => {
                    let _ = writer.flush();
                    let _ = ack.try_send(());
                }
            };
            while let Some(msg) = super::next(&rx, s) {
                // Removed or moved away (by hand, by logrotate): write to a new file, not to
                // an unlinked one. One stat per batch.
                writer.follow_path();
                handle(msg, &mut writer);
                // What else is queued goes out in the same write; then the file is current
                // for a `tail -f` or a log shipper.
                for _ in 0..1024 {
                    match super::try_next(&rx, s) {
                        Some(m) => handle(m, &mut writer),
                        None => break,
                    }
                }
                if let Err(e) = writer.flush() {
                    s.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "cannot write the events file");
                    writer.out = None;
                }
            }
        })
        .map_err(|e| EventsError::Thread("file", e))
}

struct Writer {
    cfg: FileSink,
    gid: Option<u32>,
    out: Option<BufWriter<File>>,
    size: u64,
    /// (device, inode) of the open file.
    id: (u64, u64),
}

impl Writer {
    fn open(cfg: FileSink, gid: Option<u32>) -> io::Result<Writer> {
        let mut w = Writer {
            cfg,
            gid,
            out: None,
            size: 0,
            id: (0, 0),
        };
        w.reopen()?;
        Ok(w)
    }

    fn reopen(&mut self) -> io::Result<()> {
        let mode = if self.gid.is_some() { 0o640 } else { 0o600 };
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(mode)
            // O_NONBLOCK: a FIFO planted at the path fails the open instead of blocking.
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&self.cfg.path)?;
        let meta = f.metadata()?;
        check_ours(&self.cfg.path, &meta, nix::unistd::geteuid().as_raw())?;
        // An existing file keeps no looser mode than ours.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if let Some(g) = self.gid {
            nix::unistd::fchown(&f, None, Some(nix::unistd::Gid::from_raw(g)))
                .map_err(io::Error::from)?;
        }
        self.size = meta.len();
        self.id = (meta.dev(), meta.ino());
        self.out = Some(BufWriter::new(f));
        Ok(())
    }

    /// When the path no longer names the open file (removed, moved away), close it: the next
    /// write creates a new one.
    fn follow_path(&mut self) {
        if self.out.is_none() {
            return;
        }
        let same =
            std::fs::symlink_metadata(&self.cfg.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if !same {
            let _ = self.flush();
            self.out = None;
            self.size = 0;
        }
    }

    fn write(&mut self, line: &str, stats: &EventStats) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.cfg.max_bytes {
            self.rotate()?;
            stats.file.rotations.fetch_add(1, Ordering::Relaxed);
        }
        if self.out.is_none() {
            self.reopen()?;
        }
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("not open"))?;
        let r = out
            .write_all(line.as_bytes())
            .and_then(|()| out.write_all(b"\n"));
        if r.is_err() {
            // Reopen at the next event (the file may have been removed or the disk filled).
            self.out = None;
        }
        r?;
        self.size += len;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.out.as_mut() {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }

    /// `path` → `path.1` → ... → `path.<keep>` (dropped past it), then a new `path`.
    fn rotate(&mut self) -> io::Result<()> {
        self.flush()?;
        self.out = None;
        let p = &self.cfg.path;
        // The file may be gone (removed or moved away by hand or by logrotate): then there
        // is nothing to rotate, and the new file starts empty.
        let gone = |r: io::Result<()>| match r {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        };
        if self.cfg.keep == 0 {
            gone(std::fs::remove_file(p))?;
        } else {
            let _ = std::fs::remove_file(rotated(p, self.cfg.keep));
            for i in (1..self.cfg.keep).rev() {
                let from = rotated(p, i);
                if from.exists() {
                    std::fs::rename(&from, rotated(p, i + 1))?;
                }
            }
            gone(std::fs::rename(p, rotated(p, 1)))?;
        }
        self.size = 0;
        self.reopen()
    }
}

/// `events.jsonl.3`.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The events file must be a regular file with one link, owned by the agent's user.
fn check_ours(path: &Path, meta: &std::fs::Metadata, uid: u32) -> io::Result<()> {
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} {why}: refused; remove it (the agent creates the events file itself)",
                path.display()
            ),
        ))
    };
    if !meta.file_type().is_file() {
        return refuse("is not a regular file".into());
    }
    if meta.nlink() != 1 {
        return refuse(format!(
            "has {} hard links (another name points at the same file)",
            meta.nlink()
        ));
    }
    if meta.uid() != uid {
        return refuse(format!(
            "is owned by uid {}, not by the agent's uid {uid}",
            meta.uid()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(name: &str, max_bytes: u64) -> (PathBuf, FileSink) {
        let dir = std::env::temp_dir().join(format!("airlock-efile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        (
            dir,
            FileSink {
                path,
                max_bytes,
                keep: 2,
            },
        )
    }

    fn lines(p: &Path) -> usize {
        std::fs::read_to_string(p).map_or(0, |t| t.lines().count())
    }

    /// A hardlink planted at the path, a file of another user, a FIFO: refused, untouched.
    #[test]
    fn open_refuses_a_hardlink_another_owner_and_a_non_file() {
        let (dir, cfg) = setup("refuse", 1 << 20);
        let target = dir.join("shadow");
        std::fs::write(&target, b"root:x:\n").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::hard_link(&target, &cfg.path).unwrap();
        let err = Writer::open(cfg.clone(), None).err().expect("a hardlink");
        assert!(err.to_string().contains("2 hard links"), "{err}");
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o640,
            "not chmod-ed"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"root:x:\n", "not written");
        std::fs::remove_file(&cfg.path).unwrap();
        // Another owner (the check itself, as root could chown).
        std::fs::write(&cfg.path, b"").unwrap();
        let meta = std::fs::metadata(&cfg.path).unwrap();
        let err = check_ours(&cfg.path, &meta, meta.uid() + 1).unwrap_err();
        assert!(err.to_string().contains("owned by uid"), "{err}");
        std::fs::remove_file(&cfg.path).unwrap();
        nix::unistd::mkfifo(&cfg.path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(Writer::open(cfg.clone(), None).is_err(), "a FIFO");
        std::fs::remove_file(&cfg.path).unwrap();
        // A plain file of ours is fine.
        Writer::open(cfg, None).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The file removed under a running writer: rotation does not fail for good, and the
    /// events land in a new file.
    #[test]
    fn a_removed_file_is_recreated_and_rotation_goes_on() {
        let (dir, cfg) = setup("gone", 4096);
        let stats = EventStats::default();
        let mut w = Writer::open(cfg.clone(), None).unwrap();
        let line = "x".repeat(999);
        for _ in 0..3 {
            w.write(&line, &stats).unwrap();
        }
        w.flush().unwrap();
        // Removed by hand just before a rotation is due: the rotation finds no file.
        std::fs::remove_file(&cfg.path).unwrap();
        for _ in 0..3 {
            w.write(&line, &stats).unwrap();
        }
        w.flush().unwrap();
        assert!(cfg.path.exists(), "a new file");
        assert_eq!(stats.file.rotations.load(Ordering::Relaxed), 1);
        // Removed between rotations: the path is followed, the next batch goes to a new file.
        std::fs::remove_file(&cfg.path).unwrap();
        w.follow_path();
        w.write(&line, &stats).unwrap();
        w.flush().unwrap();
        assert_eq!(lines(&cfg.path), 1);
        // Moved away (logrotate without copytruncate): the same.
        std::fs::rename(&cfg.path, dir.join("moved")).unwrap();
        w.follow_path();
        w.write(&line, &stats).unwrap();
        w.flush().unwrap();
        assert_eq!(lines(&cfg.path), 1);
        assert_eq!(lines(&dir.join("moved")), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The sink's thread: the file deleted while it runs, later events land in a new file.
    #[test]
    fn the_sink_writes_to_a_new_file_after_the_old_one_is_deleted() {
        let (dir, cfg) = setup("sink", 1 << 20);
        let config = super::super::EventsConfig {
            queue_capacity: 100,
            file: Some(cfg.clone()),
            syslog: None,
            webhook: None,
        };
        let events = super::super::Events::start(&config, "h", None).unwrap();
        let ev = serde_json::json!({"class_uid": 6002, "severity_id": 1, "time": 0});
        for _ in 0..5 {
            events.emit(&ev);
        }
        assert!(events.flush(std::time::Duration::from_secs(5)));
        assert_eq!(lines(&cfg.path), 5);
        std::fs::remove_file(&cfg.path).unwrap();
        for _ in 0..4 {
            events.emit(&ev);
        }
        assert!(events.flush(std::time::Duration::from_secs(5)));
        assert_eq!(lines(&cfg.path), 4, "the events after the removal");
        assert_eq!(events.stats.file.failed.load(Ordering::Relaxed), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
