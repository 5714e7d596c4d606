//! The JSON-lines file sink: one OCSF event a line, rotated by size (`path.1` newest, up to
//! `path.<keep>`). Files are 0640 root:`archive_group` (the group a log shipper runs in),
//! 0600 when that group does not exist; never world-readable.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use super::{EventStats, EventsError, Msg, config::FileSink};

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
}

impl Writer {
    fn open(cfg: FileSink, gid: Option<u32>) -> io::Result<Writer> {
        let mut w = Writer {
            cfg,
            gid,
            out: None,
            size: 0,
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
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.cfg.path)?;
        // An existing file keeps no looser mode than ours.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if let Some(g) = self.gid {
            nix::unistd::fchown(&f, None, Some(nix::unistd::Gid::from_raw(g)))
                .map_err(io::Error::from)?;
        }
        self.size = f.metadata()?.len();
        self.out = Some(BufWriter::new(f));
        Ok(())
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
        if self.cfg.keep == 0 {
            std::fs::remove_file(p)?;
        } else {
            let _ = std::fs::remove_file(rotated(p, self.cfg.keep));
            for i in (1..self.cfg.keep).rev() {
                let from = rotated(p, i);
                if from.exists() {
                    std::fs::rename(&from, rotated(p, i + 1))?;
                }
            }
            std::fs::rename(p, rotated(p, 1))?;
        }
        self.reopen()
    }
}

/// `events.jsonl.3`.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}
