//! Shipping the archive to an S3-compatible bucket (`[ship]`), where a fleet's archives meet.
//!
//! - [`stats`]: [`ShipStats`] (atomics, read by `airlock status` and the metrics);
//! - [`store`]: the bucket (`object_store`'s S3 client), its credentials, the fleet layout;
//! - [`transport`]: the HTTP client `object_store` uses (hyper, rustls with ring, timeouts);
//! - [`fleet`]: `airlock verify` of a fleet copy (the bucket, or a directory synced from it).
//!
//! The shipper runs on its own thread (`airlock-ship`, a current-thread runtime), so uploads
//! never compete with traffic. It follows the host's manifest line by line, in order: for a
//! file's line it uploads the Parquet file, then the line itself (one object per line: object
//! stores do not append); then the line counts as shipped, in `state_dir/ship-state.json`.
//! Every write is create-only (`If-None-Match: *`): an object that exists already is read
//! back and compared; identical, it counts as shipped (a restart after an upload whose state
//! was not saved); different, it is an alarm and shipping stops there — nothing is ever
//! overwritten. It wakes when the publish thread seals a file, and every `retry_secs`; after a
//! failure it retries with a doubling pause (1 s up to `retry_secs`).
//!
//! Local retention keeps every file whose line is not shipped yet (`keep_unshipped`), reading
//! [`ShipStats::lines_shipped`].

pub mod fleet;
pub mod redact;
mod state;
pub mod stats;
pub mod store;
pub mod transport;

use std::{
    fs,
    io::{self, Read as _, Seek as _},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use object_store::{ObjectStore as _, ObjectStoreExt as _, PutMode, PutOptions, PutPayload};
use sha2::Digest as _;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    archive::manifest::{self, Entry, EntryBody},
    config::{Config, ShipConfig},
};
use state::State;
use stats::now_unix;
pub use stats::{ShipStats, ShipStatus};
pub use store::{Credentials, FleetLayout};

/// Why shipping cannot start or a pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("[ship] credentials: {0}")]
    Credentials(String),
    #[error("[ship] ca_file: {0}")]
    CaFile(String),
    #[error("bucket {url}: {message}")]
    Bucket { url: String, message: String },
    #[error(
        "ALARM: {key} already exists in the bucket with different content; it is not overwritten. Another host may ship under the same `host` name, or the bucket was written by someone else: compare the two copies, then `airlock verify --fleet`"
    )]
    Conflict { key: String },
    #[error("local archive {path}: {message}")]
    Local { path: PathBuf, message: String },
    /// The local archive is not what its manifest says (a file or the manifest itself was
    /// modified, cut or replaced): nothing past it is shipped.
    #[error("ALARM: local archive {path}: {message}")]
    Tampered { path: PathBuf, message: String },
    #[error("shipping state {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ShipError {
    /// Possible tampering (a conflicting object in the bucket, a local archive that differs
    /// from its manifest): logged at ERROR, not as a passing failure.
    pub fn is_alarm(&self) -> bool {
        matches!(
            self,
            ShipError::Conflict { .. } | ShipError::Tampered { .. }
        )
    }
}

/// Log a failed pass: an alarm at ERROR, anything else (a bucket down, refused credentials)
/// at WARN.
fn log_failure(e: &ShipError, then: &str, retry_in_secs: Option<u64>) {
    if e.is_alarm() {
        tracing::error!(error = %e, retry_in_secs, "shipping stopped: {then}");
    } else {
        warn!(error = %e, retry_in_secs, "shipping failed: {then}");
    }
}

/// Everything the shipper needs, checked before the agent starts (credentials, state).
pub struct Prepared {
    cfg: ShipConfig,
    layout: FleetLayout,
    store: Arc<dyn object_store::ObjectStore>,
    archive_dir: PathBuf,
    state_path: PathBuf,
    own: transport::OwnDial,
    pub stats: Arc<ShipStats>,
}

impl Prepared {
    /// Load credentials (a root-only file, or the AWS variables) and the shipping state.
    pub fn new(config: &Config, cfg: &ShipConfig) -> Result<Prepared, ShipError> {
        let creds = Credentials::load(cfg)?;
        let own = transport::OwnDial::default();
        let store = store::build(cfg, &creds, own.clone())?;
        let state_path = config.state_dir.join("ship-state.json");
        let stats = Arc::new(ShipStats::default());
        // Checked against the local manifest before anything trusts it (retention's hold, the
        // shipper's resume); anything doubtful starts over from line 0 (the create-only writes
        // make that safe, only slower).
        let manifest = manifest::manifest_path(&config.archive_dir, &config.host);
        let shipped = state::resume(&state_path, &manifest, &cfg.url, &config.host);
        stats.lines_shipped.store(shipped, Ordering::Relaxed);
        Ok(Prepared {
            cfg: cfg.clone(),
            layout: FleetLayout {
                prefix: cfg.prefix.clone(),
            },
            store: Arc::new(store),
            archive_dir: config.archive_dir.clone(),
            state_path,
            own,
            stats,
        })
    }

    /// Start the shipping thread. `published` is notified when the archive seals a file.
    pub fn start(self, host: String, published: Arc<Notify>) -> Shipper {
        let stop = Arc::new(Notify::new());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let stats = self.stats.clone();
        let url = self.cfg.url.clone();
        let worker = Worker {
            host: host.clone(),
            cfg: self.cfg,
            layout: self.layout,
            store: self.store,
            manifest: manifest::manifest_path(&self.archive_dir, &host),
            archive_dir: self.archive_dir,
            state_path: self.state_path,
            stats: self.stats,
            offset: None,
            key_shipped: false,
        };
        let stop2 = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("airlock-ship".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker.run(published, stop2)),
                    Err(e) => warn!(error = %e, "cannot start the shipping thread's runtime"),
                }
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the shipping thread");
        }
        Shipper {
            stats,
            url,
            own: self.own,
            stop,
            done: Mutex::new(Some(done_rx)),
        }
    }
}

/// Handle to the running shipper.
pub struct Shipper {
    pub stats: Arc<ShipStats>,
    pub url: String,
    own: transport::OwnDial,
    stop: Arc<Notify>,
    done: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl Shipper {
    /// Dial the bucket from sockets tagged as the agent's own from now on (once the kernel
    /// programs are up): an upload is never redirected into the agent itself.
    pub fn dial_as_own(&self, own: Arc<crate::kernel::OwnSockets>) {
        self.own.set(own);
    }

    pub fn status(&self) -> ShipStatus {
        self.stats.snapshot(&self.url)
    }

    /// One last pass (what the archive flushed on shutdown), waiting at most `wait`.
    pub async fn finish(&self, wait: Duration) {
        self.stop.notify_one();
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(done) = done
            && tokio::time::timeout(wait, done).await.is_err()
        {
            warn!("shipping did not finish in time; the rest is shipped after the next start");
        }
    }
}

/// The shipping thread's state.
struct Worker {
    host: String,
    cfg: ShipConfig,
    layout: FleetLayout,
    store: Arc<dyn object_store::ObjectStore>,
    /// The host's local manifest, followed line by line.
    manifest: PathBuf,
    archive_dir: PathBuf,
    state_path: PathBuf,
    stats: Arc<ShipStats>,
    /// Byte offset in the local manifest of the first line not shipped.
    offset: Option<u64>,
    key_shipped: bool,
}

/// A manifest line not shipped yet.
struct PendingLine {
    bytes: Vec<u8>,
    entry: Entry,
}

impl Worker {
    async fn run(mut self, published: Arc<Notify>, stop: Arc<Notify>) {
        info!(url = %self.cfg.url, host = %self.host, "shipping the archive");
        let mut backoff = Duration::from_secs(1);
        loop {
            let wait = match self.pass().await {
                Ok(()) => {
                    backoff = Duration::from_secs(1);
                    self.cfg.retry
                }
                Err(e) => {
                    log_failure(
                        &e,
                        "the files stay local and are retried",
                        Some(backoff.as_secs()),
                    );
                    self.stats.error(&e);
                    let wait = backoff;
                    backoff = (backoff * 2).min(self.cfg.retry);
                    wait
                }
            };
            tokio::select! {
                _ = published.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.notified() => {
                    if let Err(e) = self.pass().await {
                        log_failure(&e, "the rest is shipped after the next start", None);
                        self.stats.error(&e);
                    }
                    return;
                }
            }
        }
    }

    /// Ship every line not shipped yet, in order. Stops at the first failure.
    async fn pass(&mut self) -> Result<(), ShipError> {
        let pending = self.pending_lines()?;
        self.account(&pending);
        if !self.key_shipped {
            self.ship_public_key().await?;
        }
        for line in pending {
            self.ship_line(&line).await?;
            let shipped = self.stats.lines_shipped.load(Ordering::Relaxed) + 1;
            state::save(
                &self.state_path,
                &State {
                    url: self.cfg.url.clone(),
                    host: self.host.clone(),
                    lines_shipped: shipped,
                    last_line_sha256: Some(hex::encode(sha2::Sha256::digest(&line.bytes))),
                },
            )?;
            if let Some(o) = self.offset.as_mut() {
                *o += line.bytes.len() as u64;
            }
            // The backlog shrinks before the count grows: a reader never sees a line both
            // shipped and pending.
            self.unaccount(&line);
            self.stats.lines_shipped.store(shipped, Ordering::Relaxed);
            self.stats
                .last_success_unix
                .store(now_unix(), Ordering::Relaxed);
        }
        if self.stats.lines_pending.load(Ordering::Relaxed) == 0 {
            self.stats.oldest_pending_unix.store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Complete lines of the local manifest after the shipped ones.
    fn pending_lines(&mut self) -> Result<Vec<PendingLine>, ShipError> {
        let local = |message: String| ShipError::Local {
            path: self.manifest.clone(),
            message,
        };
        let tampered = |message: String| ShipError::Tampered {
            path: self.manifest.clone(),
            message,
        };
        let mut file = match fs::File::open(&self.manifest) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(local(e.to_string())),
        };
        let shipped = self.stats.lines_shipped.load(Ordering::Relaxed);
        let mut text = Vec::new();
        match self.offset {
            Some(o) => {
                file.seek(io::SeekFrom::Start(o))
                    .map_err(|e| local(e.to_string()))?;
            }
            None => {
                // First pass: find where the shipped lines end.
                let mut all = Vec::new();
                file.read_to_end(&mut all)
                    .map_err(|e| local(e.to_string()))?;
                let mut offset = 0usize;
                for _ in 0..shipped {
                    match all[offset..].iter().position(|b| *b == b'\n') {
                        Some(n) => offset += n + 1,
                        None => {
                            return Err(tampered(format!(
                                "has fewer lines than the {shipped} already shipped: the local manifest was cut or replaced; run `airlock verify`"
                            )));
                        }
                    }
                }
                self.offset = Some(offset as u64);
                text = all.split_off(offset);
            }
        }
        if text.is_empty() {
            file.read_to_end(&mut text)
                .map_err(|e| local(e.to_string()))?;
        }
        let mut lines = Vec::new();
        let mut expected = shipped + 1;
        let mut rest = &text[..];
        // Only complete lines: the publish thread may be appending the next one.
        while let Some(n) = rest.iter().position(|b| *b == b'\n') {
            let (line, tail) = rest.split_at(n + 1);
            rest = tail;
            let entry: Entry = serde_json::from_slice(&line[..n]).map_err(|e| {
                tampered(format!(
                    "line {expected} is not a manifest line ({e}); run `airlock verify`"
                ))
            })?;
            if entry.seq != expected {
                return Err(tampered(format!(
                    "line {expected} carries sequence {}; run `airlock verify`",
                    entry.seq
                )));
            }
            expected += 1;
            lines.push(PendingLine {
                bytes: line.to_vec(),
                entry,
            });
        }
        Ok(lines)
    }

    fn file_of(&self, line: &PendingLine) -> Option<(String, PathBuf, String)> {
        match &line.entry.body {
            EntryBody::File { path, sha256, .. } => {
                Some((path.clone(), self.archive_dir.join(path), sha256.clone()))
            }
            EntryBody::Retention { .. } => None,
        }
    }

    /// The backlog, for `airlock status`.
    fn account(&self, pending: &[PendingLine]) {
        let (mut files, mut bytes) = (0, 0);
        for line in pending {
            if let Some((_, full, _)) = self.file_of(line) {
                files += 1;
                bytes += fs::metadata(full).map_or(0, |m| m.len());
            }
        }
        self.stats
            .lines_pending
            .store(pending.len() as u64, Ordering::Relaxed);
        self.stats.files_pending.store(files, Ordering::Relaxed);
        self.stats.bytes_pending.store(bytes, Ordering::Relaxed);
        let oldest = pending
            .first()
            .and_then(|l| humantime::parse_rfc3339(&l.entry.ts).ok())
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs().max(1));
        self.stats
            .oldest_pending_unix
            .store(oldest, Ordering::Relaxed);
    }

    fn unaccount(&self, line: &PendingLine) {
        let dec = |a: &AtomicU64, n: u64| {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        };
        dec(&self.stats.lines_pending, 1);
        if let Some((_, full, _)) = self.file_of(line) {
            dec(&self.stats.files_pending, 1);
            dec(
                &self.stats.bytes_pending,
                fs::metadata(full).map_or(0, |m| m.len()),
            );
        }
        // The next line's time is not known here; the next pass sets it exactly.
        if let Some(next) = humantime::parse_rfc3339(&line.entry.ts)
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        {
            let _ = self
                .stats
                .oldest_pending_unix
                .fetch_max(next.as_secs().max(1), Ordering::Relaxed);
        }
    }

    async fn ship_public_key(&mut self) -> Result<(), ShipError> {
        let path = manifest::public_key_path(&self.archive_dir, &self.host);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(ShipError::Local {
                    path,
                    message: e.to_string(),
                });
            }
        };
        let key = self.layout.public_key(&self.host);
        self.put_create(&key, bytes).await?;
        self.key_shipped = true;
        Ok(())
    }

    /// A file's line: the file (checked against the line first), then the line.
    async fn ship_line(&mut self, line: &PendingLine) -> Result<(), ShipError> {
        if let Some((rel, full, sha256)) = self.file_of(line) {
            match fs::read(&full) {
                Ok(bytes) => {
                    if hex::encode(sha2::Sha256::digest(&bytes)) != sha256 {
                        return Err(ShipError::Tampered {
                            path: full,
                            message: "differs from its manifest line (modified or truncated): not shipped; run `airlock verify`".into(),
                        });
                    }
                    let len = bytes.len() as u64;
                    self.put_create(&self.layout.file(&self.host, &rel), bytes)
                        .await?;
                    self.stats.files_shipped.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes_shipped.fetch_add(len, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Gone before it was shipped (retention with `keep_unshipped = false`, or
                    // deleted by hand): the line still goes, and a verifier of the bucket names
                    // the missing file.
                    self.stats.files_missing.fetch_add(1, Ordering::Relaxed);
                    let e = ShipError::Local {
                        path: full,
                        message: "listed in the manifest but gone before it was shipped".into(),
                    };
                    warn!(error = %e, "shipping the manifest line without its file");
                    self.stats.error(&e);
                }
                Err(e) => {
                    return Err(ShipError::Local {
                        path: full,
                        message: e.to_string(),
                    });
                }
            }
        }
        let key = self.layout.manifest_line(&self.host, line.entry.seq);
        self.put_create(&key, line.bytes.clone()).await
    }

    /// Create-only write: an existing identical object counts as written; a different one is
    /// an alarm, never overwritten.
    async fn put_create(
        &self,
        key: &object_store::path::Path,
        bytes: Vec<u8>,
    ) -> Result<(), ShipError> {
        let bucket = |e: object_store::Error| ShipError::Bucket {
            url: self.cfg.url.clone(),
            message: redact::error(&e),
        };
        let payload = PutPayload::from(bytes::Bytes::from(bytes));
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self.store.put_opts(key, payload.clone(), opts).await {
            Ok(_) => {
                self.stats.uploads_ok.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing = self.store.get(key).await.map_err(|e| {
                    self.stats.uploads_failed.fetch_add(1, Ordering::Relaxed);
                    bucket(e)
                })?;
                if existing.meta.size != payload.content_length() as u64 {
                    return Err(self.conflict(key));
                }
                let existing = existing.bytes().await.map_err(|e| {
                    self.stats.uploads_failed.fetch_add(1, Ordering::Relaxed);
                    bucket(e)
                })?;
                let ours: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
                if existing[..] == ours[..] {
                    self.stats.already_present.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                } else {
                    Err(self.conflict(key))
                }
            }
            Err(e) => {
                self.stats.uploads_failed.fetch_add(1, Ordering::Relaxed);
                Err(bucket(e))
            }
        }
    }

    /// Counted here; logged (at ERROR, as an alarm) with the pass that stops on it.
    fn conflict(&self, key: &object_store::path::Path) -> ShipError {
        self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
        ShipError::Conflict {
            key: format!("s3://{}/{key}", self.cfg.bucket),
        }
    }
}
