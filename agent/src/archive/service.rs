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

/// Records taken from the queue per write batch.
pub const GROUP_COMMIT: usize = 1024;
/// Buffered mode: fsync once this many records are unsynced, or after `BUFFERED_SYNC_EVERY`.
const BUFFERED_SYNC_RECORDS: usize = 1024;
const BUFFERED_SYNC_EVERY: Duration = Duration::from_millis(50);
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
    /// Apply retention: (days, today as days since the epoch).
    Retention(u32, i64, oneshot::Sender<io::Result<Vec<String>>>),
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

    /// Delete partitions older than `days` days (manifest line first; see the writer).
    pub async fn retention(&self, days: u32, today: i64) -> io::Result<Vec<String>> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Job::Retention(days, today, ack))
            .await
            .map_err(|_| io::Error::other("the archive writer has stopped"))?;
        done.await
            .map_err(|_| io::Error::other("the archive writer has stopped"))?
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

/// The writer thread's state: what is appended but not yet durable, what failed and waits.
struct State {
    w: ArchiveWriter,
    mode: Recording,
    failed: Arc<AtomicBool>,
    stats: Arc<ArchiveStats>,
    /// Appended, not yet fsynced: acks held until the fsync (strict). Their inputs stay in the
    /// writer, which hands them back if the fsync fails.
    unsynced: Vec<(Option<Ack>, u64)>,
    /// Buffered mode: records a failure left behind, retried first, in order.
    retry: VecDeque<Box<RecordInput>>,
    last_sync: Instant,
    last_roll: Instant,
    flush_interval: Duration,
}

impl State {
    fn append(&mut self, input: Box<RecordInput>, ack: Option<Ack>) {
        if self.mode == Recording::Strict && self.failed.load(Ordering::Relaxed) {
            if let Some(ack) = ack {
                let _ = ack.send(Err(ArchiveError::Failed("an earlier write failed".into())));
            }
            return;
        }
        match self.w.append(*input) {
            Ok(seq) => self.unsynced.push((ack, seq)),
            Err(failure) => {
                let (e, input) = *failure;
                self.fail(e.to_string(), Some((input, ack)))
            }
        }
    }

    /// fsync; then the held acks go out.
    fn sync(&mut self) {
        if self.unsynced.is_empty() {
            return;
        }
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        match self.w.sync() {
            Ok(()) => {
                self.stats
                    .records
                    .fetch_add(self.unsynced.len() as u64, Ordering::Relaxed);
                for (ack, seq) in self.unsynced.drain(..) {
                    if let Some(ack) = ack {
                        let _ = ack.send(Ok(seq));
                    }
                }
                self.last_sync = Instant::now();
            }
            Err(e) => self.fail(e.to_string(), None),
        }
    }

    /// A write or fsync failed: drop what is not durable from the segment, then refuse
    /// (strict) or keep for retry (buffered) every record that was not durable, in order.
    fn fail(&mut self, error: String, failing: Option<(RecordInput, Option<Ack>)>) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        error!(error = %error, "archive write failed");
        let mut inputs = self.w.abandon_unsynced();
        let mut acks: Vec<Option<Ack>> = self.unsynced.drain(..).map(|(a, _)| a).collect();
        if let Some((input, ack)) = failing {
            inputs.push(input);
            acks.push(ack);
        }
        match self.mode {
            Recording::Strict => {
                self.failed.store(true, Ordering::Relaxed);
                for ack in acks.into_iter().flatten() {
                    let _ = ack.send(Err(ArchiveError::Failed(error.clone())));
                }
            }
            Recording::Buffered => {
                for input in inputs.into_iter().rev() {
                    self.retry.push_front(Box::new(input));
                }
                while self.retry.len() > RETRY_MAX {
                    self.retry.pop_back();
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn roll(&mut self) {
        self.sync();
        roll(&mut self.w, &self.stats, self.mode, &self.failed);
        self.last_roll = Instant::now();
    }

    fn retry_all(&mut self) {
        let queued: Vec<_> = self.retry.drain(..).collect();
        for input in queued {
            self.append(input, None);
        }
    }

    /// When the loop must wake up without new work: an fsync due (buffered), a roll due, or
    /// a retry due.
    fn next_deadline(&self) -> Option<Duration> {
        let mut due: Option<Duration> = None;
        let mut at = |d: Duration| due = Some(due.map_or(d, |x| x.min(d)));
        if !self.unsynced.is_empty() {
            at(BUFFERED_SYNC_EVERY.saturating_sub(self.last_sync.elapsed()));
        }
        if self.w.pending_rows() > 0 {
            at(self.flush_due());
        }
        if !self.retry.is_empty() {
            at(RETRY_EVERY);
        }
        due
    }

    /// Time left before the open segment must be rolled into Parquet.
    fn flush_due(&self) -> Duration {
        self.flush_interval.saturating_sub(self.last_roll.elapsed())
    }
}

/// Pause between retries of records a failure left behind (buffered mode).
const RETRY_EVERY: Duration = Duration::from_millis(100);

async fn serve(
    w: ArchiveWriter,
    mut rx: mpsc::Receiver<Job>,
    mode: Recording,
    flush_interval: Duration,
    failed: Arc<AtomicBool>,
    stats: Arc<ArchiveStats>,
) {
    let mut st = State {
        w,
        mode,
        failed,
        stats,
        unsynced: Vec::new(),
        retry: VecDeque::new(),
        last_sync: Instant::now(),
        last_roll: Instant::now(),
        flush_interval,
    };
    loop {
        let first = match st.next_deadline() {
            None => rx.recv().await,
            Some(due) => match tokio::time::timeout(due, rx.recv()).await {
                Ok(job) => job,
                Err(_) => {
                    // Woken by a deadline: retry, make buffered records durable, roll.
                    st.retry_all();
                    st.sync();
                    if st.flush_due().is_zero() {
                        st.roll();
                    }
                    continue;
                }
            },
        };
        let Some(first) = first else {
            // Every handle is gone: finish what is pending.
            st.retry_all();
            st.roll();
            return;
        };
        st.retry_all();
        let mut close = None;
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(job) = next.take() {
            match job {
                Job::Record(input, ack) => st.append(input, ack),
                Job::Retention(days, today, ack) => {
                    let _ = ack.send(st.w.apply_retention(days, today));
                }
                Job::Close(ack) => close = Some(ack),
            }
            taken += 1;
            if taken < GROUP_COMMIT {
                next = rx.try_recv().ok();
            }
        }
        // Strict: every batch is fsynced before its callers hear back. Buffered: callers do
        // not wait, so fsyncs are spaced out, by count and by time.
        let sync_now = match st.mode {
            Recording::Strict => true,
            Recording::Buffered => {
                st.unsynced.len() >= BUFFERED_SYNC_RECORDS
                    || st.last_sync.elapsed() >= BUFFERED_SYNC_EVERY
            }
        };
        if sync_now {
            st.sync();
        }
        if st.w.wants_roll() || st.flush_due().is_zero() {
            st.roll();
        }
        if let Some(ack) = close {
            st.retry_all();
            st.sync();
            let result = st.w.roll().map(drop);
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
