//! The archive as the agent uses it: a dedicated thread owning the [`ArchiveWriter`], fed by a
//! bounded channel, committing in groups (one fsync for every batch it finds waiting, at most
//! [`GROUP_COMMIT`] records), rolling segments into Parquet every `flush_interval` or
//! `max_rows`, and on close.
//!
//! Two modes (`recording` in airlock.toml):
//! - `strict` (default): [`Archive::record`] resolves only once the record is durable; if the
//!   writer fails, every later call fails too, so the caller refuses the message — fail closed;
//! - `buffered`: [`Archive::record`] resolves once the record is queued (waiting only when the
//!   queue is full: back-pressure, never loss); write errors are logged and counted, and the
//!   writer retries on the next batch.

use std::{
    collections::VecDeque,
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::{RecordInput, writer::ArchiveWriter};

/// Records fsynced together at most.
pub const GROUP_COMMIT: usize = 64;
/// Records kept in memory for retry after a write failure (buffered mode); beyond this the
/// oldest are dropped and counted in `ArchiveStats::dropped`.
pub const RETRY_MAX: usize = 100_000;
const QUEUE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recording {
    Strict,
    Buffered,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the archive writer has failed ({0}); recording is strict, so traffic is refused")]
    Failed(String),
    #[error("the archive writer has stopped")]
    Stopped,
}

enum Job {
    Record(Box<RecordInput>, Option<Ack>),
    Close(oneshot::Sender<io::Result<()>>),
}

/// Counters for `airlock status`.
#[derive(Default, Debug)]
pub struct ArchiveStats {
    pub records: AtomicU64,
    pub fsyncs: AtomicU64,
    pub files: AtomicU64,
    pub errors: AtomicU64,
    /// Buffered records given up after the retry queue filled (never in strict mode).
    pub dropped: AtomicU64,
}

type Ack = oneshot::Sender<Result<u64, ArchiveError>>;

/// Handle to the archive thread.
#[derive(Clone)]
pub struct Archive {
    tx: mpsc::Sender<Job>,
    mode: Recording,
    failed: Arc<AtomicBool>,
    pub stats: Arc<ArchiveStats>,
}

impl Archive {
    pub fn start(writer: ArchiveWriter, mode: Recording, flush_interval: Duration) -> Archive {
        let (tx, rx) = mpsc::channel(QUEUE);
        let failed = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ArchiveStats::default());
        let (f, s) = (failed.clone(), stats.clone());
        thread::Builder::new()
            .name("airlock-archive".into())
            .spawn(move || run(writer, rx, mode, flush_interval, f, s))
            .map(drop)
            .unwrap_or_else(|e| error!(error = %e, "cannot start the archive thread"));
        Archive {
            tx,
            mode,
            failed,
            stats,
        }
    }

    /// Archive one record: in strict mode, returns once it is durable.
    pub async fn record(&self, input: RecordInput) -> Result<u64, ArchiveError> {
        if self.mode == Recording::Strict && self.failed.load(Ordering::Relaxed) {
            return Err(ArchiveError::Failed("an earlier write failed".into()));
        }
        match self.mode {
            Recording::Strict => {
                let (ack, done) = oneshot::channel();
                self.tx
                    .send(Job::Record(Box::new(input), Some(ack)))
                    .await
                    .map_err(|_| ArchiveError::Stopped)?;
                done.await.map_err(|_| ArchiveError::Stopped)?
            }
            Recording::Buffered => {
                self.tx
                    .send(Job::Record(Box::new(input), None))
                    .await
                    .map_err(|_| ArchiveError::Stopped)?;
                Ok(0)
            }
        }
    }

    /// Flush everything pending into Parquet and stop the thread.
    pub async fn close(&self) -> io::Result<()> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Job::Close(ack))
            .await
            .map_err(|_| io::Error::other("the archive writer has stopped"))?;
        done.await
            .map_err(|_| io::Error::other("the archive writer has stopped"))?
    }
}

fn run(
    w: ArchiveWriter,
    rx: mpsc::Receiver<Job>,
    mode: Recording,
    flush_interval: Duration,
    failed: Arc<AtomicBool>,
    stats: Arc<ArchiveStats>,
) {
    // A private single-threaded runtime: the receiver is async (callers get back-pressure
    // without blocking their runtime), the file I/O stays on this thread.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the archive thread's runtime");
            failed.store(true, Ordering::Relaxed);
            return;
        }
    };
    rt.block_on(serve(w, rx, mode, flush_interval, failed, stats));
}

async fn serve(
    mut w: ArchiveWriter,
    mut rx: mpsc::Receiver<Job>,
    mode: Recording,
    flush_interval: Duration,
    failed: Arc<AtomicBool>,
    stats: Arc<ArchiveStats>,
) {
    let mut last_roll = Instant::now();
    let mut retry: VecDeque<Box<RecordInput>> = VecDeque::new();
    loop {
        // Nothing pending: wait for work. Something pending: wait no longer than its roll.
        let first = if w.pending_rows() == 0 && retry.is_empty() {
            rx.recv().await
        } else {
            let due = flush_interval.saturating_sub(last_roll.elapsed());
            match tokio::time::timeout(due, rx.recv()).await {
                Ok(job) => job,
                Err(_) if !retry.is_empty() => {
                    // Time to retry the records a failure left behind.
                    roll(&mut w, &stats, mode, &failed);
                    last_roll = Instant::now();
                    retry.pop_front().map(|input| Job::Record(input, None))
                }
                Err(_) => {
                    roll(&mut w, &stats, mode, &failed);
                    last_roll = Instant::now();
                    continue;
                }
            }
        };
        let Some(first) = first else {
            // Every handle is gone: finish what is pending.
            let _ = w.sync();
            roll(&mut w, &stats, mode, &failed);
            return;
        };
        // Records that failed earlier (buffered mode) go first, in their original order.
        let mut batch: Vec<Job> = retry
            .drain(..)
            .map(|input| Job::Record(input, None))
            .collect();
        batch.push(first);
        while batch.len() < GROUP_COMMIT {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut appended: Vec<(Box<RecordInput>, Option<Ack>, u64)> = Vec::new();
        let mut unwritten: Vec<(Box<RecordInput>, Option<Ack>)> = Vec::new();
        let mut close = None;
        let mut error: Option<String> = None;
        for job in batch {
            let (input, ack) = match job {
                Job::Record(input, ack) => (input, ack),
                Job::Close(ack) => {
                    close = Some(ack);
                    continue;
                }
            };
            if error.is_some() || (mode == Recording::Strict && failed.load(Ordering::Relaxed)) {
                unwritten.push((input, ack));
                continue;
            }
            match w.append((*input).clone()) {
                Ok(seq) => appended.push((input, ack, seq)),
                Err(e) => {
                    error = Some(e.to_string());
                    unwritten.push((input, ack));
                }
            }
        }
        if error.is_none()
            && !appended.is_empty()
            && let Err(e) = w.sync()
        {
            error = Some(e.to_string());
        }
        stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        match error {
            None => {
                stats
                    .records
                    .fetch_add(appended.len() as u64, Ordering::Relaxed);
                for (_, ack, seq) in appended {
                    if let Some(ack) = ack {
                        let _ = ack.send(Ok(seq));
                    }
                }
            }
            Some(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, "archive write failed");
                w.abandon_unsynced();
                let lost = appended
                    .into_iter()
                    .map(|(input, ack, _)| (input, ack))
                    .chain(unwritten);
                match mode {
                    Recording::Strict => {
                        failed.store(true, Ordering::Relaxed);
                        for (_, ack) in lost {
                            if let Some(ack) = ack {
                                let _ = ack.send(Err(ArchiveError::Failed(e.clone())));
                            }
                        }
                    }
                    Recording::Buffered => {
                        for (input, _) in lost {
                            if retry.len() == RETRY_MAX {
                                retry.pop_front();
                                stats.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            retry.push_back(input);
                        }
                        // Give the disk a moment before the next attempt.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                unwritten = Vec::new();
            }
        }
        for (_, ack) in unwritten {
            if let Some(ack) = ack {
                let _ = ack.send(Err(ArchiveError::Failed("an earlier write failed".into())));
            }
        }
        if w.wants_roll() || last_roll.elapsed() >= flush_interval {
            roll(&mut w, &stats, mode, &failed);
            last_roll = Instant::now();
        }
        if let Some(ack) = close {
            let result = w.sync().and_then(|()| w.roll().map(drop));
            let _ = ack.send(result);
            return;
        }
    }
}

fn roll(w: &mut ArchiveWriter, stats: &ArchiveStats, mode: Recording, failed: &AtomicBool) {
    match w.roll() {
        Ok(Some(_)) => {
            stats.files.fetch_add(1, Ordering::Relaxed);
        }
        Ok(None) => {}
        Err(e) => {
            // The records stay in their segment and are recovered on the next start.
            stats.errors.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "cannot roll the archive segment into Parquet");
            if mode == Recording::Strict {
                failed.store(true, Ordering::Relaxed);
            }
        }
    }
}
