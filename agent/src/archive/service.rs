//! The archive as the agent uses it: two dedicated threads. The log thread owns the
//! [`SegmentLog`], is fed by a bounded channel and commits in groups (one fsync for every batch
//! it finds waiting, at most [`GROUP_COMMIT`] records); every `flush_interval` or `max_rows`,
//! and on close, it seals the segment and hands it to the publish thread, which owns the
//! [`Publisher`] and turns sealed segments into Parquet files and manifest lines. Encoding a
//! file (hundreds of milliseconds for 100,000 rows) never delays an acknowledgement.
//!
//! Three modes (`recording` in airlock.toml):
//! - `group` (default): [`Archive::record`] chains the record and writes it through to the
//!   open segment itself, on the caller's thread (one `write(2)`, no hand-off to another
//!   thread), and resolves once it is in the kernel: killing the agent loses nothing it was
//!   told. The log thread fsyncs what was written at most [`GROUP_COMMIT_EVERY`] later (one
//!   fsync per window, taken without holding up writers), so a power loss can lose at most
//!   the records of that window plus one fsync. A failed write refuses that message (the
//!   segment is cut back); a failed fsync or publish refuses everything after it;
//! - `strict`: [`Archive::record`] resolves only once the record is durable (fsynced); if the
//!   writer fails, every later call fails too, so the caller refuses the message — fail
//!   closed;
//! - `buffered`: [`Archive::record`] resolves once the record is queued (waiting only when the
//!   queue is full: back-pressure, never loss); write errors are logged and counted, and the
//!   writer retries on the next batch. Killing the agent loses what was queued.

use std::{
    collections::VecDeque,
    io,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::{
    RecordInput,
    writer::{ArchiveWriter, Publisher, Sealed, SegmentLog},
};

/// Records taken from the queue per write batch.
pub const GROUP_COMMIT: usize = 1024;
/// Buffered mode: fsync once this many records are unsynced, or after `BUFFERED_SYNC_EVERY`.
const BUFFERED_SYNC_RECORDS: usize = 1024;
const BUFFERED_SYNC_EVERY: Duration = Duration::from_millis(50);
/// Group mode: what was written is fsynced at most this long after it was written (plus the
/// fsync itself): the window a power loss can cost.
pub const GROUP_COMMIT_EVERY: Duration = Duration::from_millis(10);
/// Records kept in memory for retry after a write failure (buffered mode); beyond this the
/// oldest are dropped and counted in `ArchiveStats::dropped`.
pub const RETRY_MAX: usize = 100_000;
const QUEUE: usize = 4096;
/// Sealed segments waiting for the publish thread before the log thread waits (back-pressure).
const PUBLISH_QUEUE: usize = 2;
/// Pause between attempts to publish a segment after a failure.
const PUBLISH_RETRY: Duration = Duration::from_secs(1);

pub use crate::config::Recording;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(
        "the archive writer has failed ({0}); recording fails closed (group or strict), so traffic is refused"
    )]
    Failed(String),
    #[error("the archive writer has stopped")]
    Stopped,
}

enum Job {
    Record(Box<RecordInput>, Option<Ack>),
    /// Group mode: records were written through since the last commit.
    Commit,
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
    /// Notified when a manifest line was appended (a file published, retention): wakes the
    /// shipper.
    pub published: Arc<tokio::sync::Notify>,
    /// Bytes of the Parquet files published.
    pub bytes: AtomicU64,
    /// The `archive_seq` after the last durable record, and the first one not yet in a
    /// published Parquet file: between them, the records waiting for their file.
    pub durable_seq: AtomicU64,
    pub published_seq: AtomicU64,
    /// Unix time (µs) since which durable records have been waiting for a Parquet file
    /// (to within one publish); 0 when none wait.
    pub unpublished_since_us: AtomicU64,
    /// How long each write-ahead commit (fsync) took.
    pub commits: CommitTimes,
}

impl ArchiveStats {
    /// Durable records not yet in a published Parquet file.
    pub fn unpublished(&self) -> u64 {
        self.durable_seq
            .load(Ordering::Relaxed)
            .saturating_sub(self.published_seq.load(Ordering::Relaxed))
    }

    /// Seconds the oldest unpublished record has waited (0 when none waits).
    pub fn publish_lag_secs(&self, now_us: u64) -> f64 {
        let since = self.unpublished_since_us.load(Ordering::Relaxed);
        if since == 0 || self.unpublished() == 0 {
            return 0.0;
        }
        now_us.saturating_sub(since) as f64 / 1e6
    }
}

/// Upper bounds (seconds) of the commit-duration buckets.
pub const COMMIT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A histogram of commit durations, lock-free (the log thread writes, a scrape reads).
#[derive(Default, Debug)]
pub struct CommitTimes {
    /// Commits at or below each bound of [`COMMIT_BUCKETS`] (not cumulative).
    buckets: [AtomicU64; COMMIT_BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl CommitTimes {
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = COMMIT_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// (sum in seconds, count, cumulative buckets with `+Inf` last).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let count = self.count.load(Ordering::Relaxed);
        let mut acc = 0;
        let mut out: Vec<(f64, u64)> = COMMIT_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(b, n)| {
                acc += n.load(Ordering::Relaxed);
                (*b, acc)
            })
            .collect();
        out.push((f64::INFINITY, count.max(acc)));
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count.max(acc), out)
    }
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}

type Ack = oneshot::Sender<Result<u64, ArchiveError>>;

/// Handle to the archive (its log thread; the publish thread is behind it).
#[derive(Clone)]
pub struct Archive {
    tx: mpsc::Sender<Job>,
    mode: Recording,
    failed: Arc<AtomicBool>,
    pub stats: Arc<ArchiveStats>,
    /// The write-ahead log, shared with the log thread (group mode writes through it from
    /// the caller's thread; the other modes only from the log thread).
    log: SharedLog,
    /// Group mode: written since the log thread last took a commit point.
    dirty: Arc<AtomicBool>,
    /// Group mode: a caller found the open segment full and woke the log thread to roll it.
    roll_asked: Arc<AtomicBool>,
    /// Shown every record before it is written (metrics and audit events watch through it);
    /// set by whoever sits above the archive, so the archive calls nothing above itself.
    tap: fn(&RecordInput),
}

type SharedLog = Arc<Mutex<SegmentLog>>;

fn lock(log: &SharedLog) -> MutexGuard<'_, SegmentLog> {
    // A panic while holding the lock leaves the log as consistent as any write failure.
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Archive {
    pub fn start(writer: ArchiveWriter, mode: Recording, flush_interval: Duration) -> Archive {
        let (tx, rx) = mpsc::channel(QUEUE);
        let failed = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ArchiveStats::default());
        let (log, publisher) = writer.into_parts();
        stats
            .durable_seq
            .store(log.durable_next_seq(), Ordering::Relaxed);
        let log = Arc::new(Mutex::new(log));
        let dirty = Arc::new(AtomicBool::new(false));
        let roll_asked = Arc::new(AtomicBool::new(false));
        stats
            .published_seq
            .store(publisher.next_archive_seq(), Ordering::Relaxed);
        let (publish_tx, publish_rx) = std::sync::mpsc::sync_channel(PUBLISH_QUEUE);
        let (f, s) = (failed.clone(), stats.clone());
        let publishing = thread::Builder::new()
            .name("airlock-publish".into())
            .spawn(move || publish_loop(publisher, publish_rx, mode, &f, &s));
        let st = State {
            w: log.clone(),
            dirty: dirty.clone(),
            roll_asked: roll_asked.clone(),
            publish: publish_tx,
            mode,
            failed: failed.clone(),
            stats: stats.clone(),
            unsynced: Vec::new(),
            retry: VecDeque::new(),
            last_sync: Instant::now(),
            last_roll: Instant::now(),
            flush_interval,
        };
        match publishing {
            Ok(_) => thread::Builder::new()
                .name("airlock-archive".into())
                .spawn(move || run(st, rx))
                .map(drop)
                .unwrap_or_else(|e| error!(error = %e, "cannot start the archive log thread")),
            Err(e) => error!(error = %e, "cannot start the archive publish thread"),
        }
        Archive {
            tx,
            mode,
            failed,
            stats,
            log,
            dirty,
            roll_asked,
            tap: |_| {},
        }
    }

    /// Show every record to `tap` before it is written (the agent passes
    /// `observe::record`: metrics and audit events).
    pub fn with_tap(mut self, tap: fn(&RecordInput)) -> Archive {
        self.tap = tap;
        self
    }

    /// Archive one record: returns once it is written through (group mode), durable
    /// (strict) or queued (buffered).
    pub async fn record(&self, input: RecordInput) -> Result<u64, ArchiveError> {
        (self.tap)(&input);
        if self.mode.fails_closed() && self.failed.load(Ordering::Relaxed) {
            return Err(ArchiveError::Failed("an earlier write failed".into()));
        }
        match self.mode {
            Recording::Group => {
                // A write to the page cache: microseconds, like a log line; no thread hop.
                let (written, full) = {
                    let mut log = lock(&self.log);
                    let written = log.append_written(&input);
                    (written, log.wants_roll())
                };
                self.written_through(written, full)
            }
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

    /// Archive several records in order, as [`Archive::record`] does one; in group mode with
    /// one `write(2)` for all of them (a batch of a stream's events). On failure none of them
    /// is written (group) or some may be (the other modes): the caller refuses them all.
    pub async fn record_all(&self, inputs: Vec<RecordInput>) -> Result<(), ArchiveError> {
        match self.mode {
            Recording::Group => {
                for input in &inputs {
                    (self.tap)(input);
                }
                if self.failed.load(Ordering::Relaxed) {
                    return Err(ArchiveError::Failed("an earlier write failed".into()));
                }
                if inputs.is_empty() {
                    return Ok(());
                }
                let (written, full) = {
                    let mut log = lock(&self.log);
                    let written = log.append_written_all(&inputs);
                    (written, log.wants_roll())
                };
                self.written_through(written, full).map(drop)
            }
            Recording::Strict => {
                // Queued together, so one fsync (group commit) covers them all.
                let mut acks = Vec::with_capacity(inputs.len());
                for input in inputs {
                    (self.tap)(&input);
                    if self.failed.load(Ordering::Relaxed) {
                        return Err(ArchiveError::Failed("an earlier write failed".into()));
                    }
                    let (ack, done) = oneshot::channel();
                    self.tx
                        .send(Job::Record(Box::new(input), Some(ack)))
                        .await
                        .map_err(|_| ArchiveError::Stopped)?;
                    acks.push(done);
                }
                for done in acks {
                    done.await.map_err(|_| ArchiveError::Stopped)??;
                }
                Ok(())
            }
            Recording::Buffered => {
                for input in inputs {
                    self.record(input).await?;
                }
                Ok(())
            }
        }
    }

    /// Group mode: after records were written through from the caller's thread.
    fn written_through(&self, written: io::Result<u64>, full: bool) -> Result<u64, ArchiveError> {
        match written {
            Ok(seq) => {
                // The first record since the last commit point wakes the log thread, and so
                // does the one that fills the segment (`max_rows` or its byte cap), once per
                // segment: the log thread rolls it then, not at its next commit deadline. A
                // full queue means the log thread is awake and will see both after its batch.
                let first = !self.dirty.swap(true, Ordering::AcqRel);
                if first || (full && !self.roll_asked.swap(true, Ordering::AcqRel)) {
                    let _ = self.tx.try_send(Job::Commit);
                }
                Ok(seq)
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, "archive write failed; the message is refused");
                Err(ArchiveError::Failed(e.to_string()))
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

fn run(st: State, rx: mpsc::Receiver<Job>) {
    // A private single-threaded runtime: the receiver is async (callers get back-pressure
    // without blocking their runtime), the file I/O stays on this thread.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the archive log thread's runtime");
            st.failed.store(true, Ordering::Relaxed);
            return;
        }
    };
    rt.block_on(serve(st, rx));
}

/// The log thread's state: what is appended but not yet durable, what failed and waits.
struct State {
    w: SharedLog,
    dirty: Arc<AtomicBool>,
    roll_asked: Arc<AtomicBool>,
    publish: std::sync::mpsc::SyncSender<PublishJob>,
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
    fn w(&self) -> MutexGuard<'_, SegmentLog> {
        lock(&self.w)
    }

    fn append(&mut self, input: Box<RecordInput>, ack: Option<Ack>) {
        if self.mode.fails_closed() && self.failed.load(Ordering::Relaxed) {
            if let Some(ack) = ack {
                let _ = ack.send(Err(ArchiveError::Failed("an earlier write failed".into())));
            }
            return;
        }
        let appended = self.w().append(*input);
        match appended {
            Ok(seq) => self.unsynced.push((ack, seq)),
            Err(failure) => {
                let (e, input) = *failure;
                self.fail(e.to_string(), Some((input, ack)))
            }
        }
    }

    /// fsync; then the held acks go out.
    fn sync(&mut self) {
        if self.mode == Recording::Group {
            return self.commit_group();
        }
        if self.unsynced.is_empty() {
            return;
        }
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let synced = self.w().sync();
        match synced {
            Ok(()) => {
                self.stats.commits.observe(started.elapsed());
                self.note_durable();
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

    /// Group mode: fsync what callers have written through, without holding the log (they
    /// go on writing meanwhile).
    fn commit_group(&mut self) {
        // Cleared before the point is taken: a record written after it sets it again.
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        let Some(point) = self.w().commit_point() else {
            return;
        };
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        match point.file.sync_data() {
            Ok(()) => {
                self.stats.commits.observe(started.elapsed());
                self.w().committed(point);
                self.note_durable();
                self.last_sync = Instant::now();
            }
            // What was written stays in the segment (its messages were forwarded), but may
            // not be on the disk: `fail` refuses everything from now on.
            Err(e) => self.fail(format!("commit (fsync): {e}"), None),
        }
    }

    /// Count the records that became durable since the last call.
    fn note_durable(&mut self) {
        let now = self.w().durable_next_seq();
        let before = self.stats.durable_seq.swap(now, Ordering::Relaxed);
        self.stats
            .records
            .fetch_add(now.saturating_sub(before), Ordering::Relaxed);
        if now > before {
            // Records wait for a Parquet file from now, unless older ones already do.
            let _ = self.stats.unpublished_since_us.compare_exchange(
                0,
                unix_us(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// A write or fsync failed: drop what is not durable from the segment, then refuse
    /// (strict) or keep for retry (buffered) every record that was not durable, in order.
    /// In group mode the segment keeps what was written (forwarded messages) and everything
    /// after is refused.
    fn fail(&mut self, error: String, failing: Option<(RecordInput, Option<Ack>)>) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        error!(error = %error, "archive write failed");
        if self.mode == Recording::Group {
            self.failed.store(true, Ordering::Relaxed);
            return;
        }
        let (mut inputs, sealed) = self.w().abandon_unsynced();
        if let Some(sealed) = sealed {
            self.hand_over(PublishJob::Segment(sealed));
        }
        let mut acks: Vec<Option<Ack>> = self.unsynced.drain(..).map(|(a, _)| a).collect();
        if let Some((input, ack)) = failing {
            inputs.push(input);
            acks.push(ack);
        }
        if self.mode == Recording::Buffered {
            for input in inputs.into_iter().rev() {
                self.retry.push_front(Box::new(input));
            }
            while self.retry.len() > RETRY_MAX {
                self.retry.pop_back();
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        // Strict: every record that was not durable is refused, and everything after it.
        self.failed.store(true, Ordering::Relaxed);
        for ack in acks.into_iter().flatten() {
            let _ = ack.send(Err(ArchiveError::Failed(error.clone())));
        }
    }

    /// Seal the open segment and hand it to the publish thread.
    fn roll(&mut self) {
        self.sync();
        // Cleared before the seal: a caller that fills the next segment asks again.
        self.roll_asked.store(false, Ordering::Release);
        // Bound first: the log is not held while the publish thread is waited for.
        let sealed = self.w().seal();
        self.note_durable();
        match sealed {
            Ok(Some(sealed)) => self.hand_over(PublishJob::Segment(sealed)),
            Ok(None) => {}
            Err(e) => self.fail(e.to_string(), None),
        }
        self.last_roll = Instant::now();
    }

    /// Send to the publish thread (waiting while it is [`PUBLISH_QUEUE`] segments behind).
    fn hand_over(&mut self, job: PublishJob) {
        if self.publish.send(job).is_err() {
            // Its segments stay on disk and are published on the next start.
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            error!("the archive publish thread has stopped");
            if self.mode.fails_closed() {
                self.failed.store(true, Ordering::Relaxed);
            }
        }
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
        if self.dirty.load(Ordering::Acquire) {
            at(GROUP_COMMIT_EVERY.saturating_sub(self.last_sync.elapsed()));
        }
        if self.w().pending_rows() > 0 {
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

async fn serve(mut st: State, mut rx: mpsc::Receiver<Job>) {
    loop {
        let first = match st.next_deadline() {
            None => rx.recv().await,
            Some(due) => match tokio::time::timeout(due, rx.recv()).await {
                Ok(job) => job,
                Err(_) => {
                    // Woken by a deadline: retry, make buffered records durable, roll.
                    st.retry_all();
                    st.sync();
                    // Group mode: callers may have filled the segment while the loop slept.
                    let wants_roll = st.w().wants_roll();
                    if wants_roll || st.flush_due().is_zero() {
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
                // `dirty` is set: the commit is timed below.
                Job::Commit => {}
                Job::Retention(days, today, ack) => {
                    st.hand_over(PublishJob::Retention(days, today, ack));
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
            // Group: one commit per window; the deadline wakes the loop for the next.
            Recording::Group => st.last_sync.elapsed() >= GROUP_COMMIT_EVERY,
        };
        if sync_now {
            st.sync();
        }
        let wants_roll = st.w().wants_roll();
        if wants_roll || st.flush_due().is_zero() {
            st.roll();
        }
        if let Some(ack) = close {
            st.retry_all();
            st.roll();
            // The publish thread answers once everything sealed is published.
            st.hand_over(PublishJob::Close(ack));
            return;
        }
    }
}

/// What the log thread hands to the publish thread.
enum PublishJob {
    Segment(Sealed),
    Retention(u32, i64, oneshot::Sender<io::Result<Vec<String>>>),
    /// Publish everything, answer, stop.
    Close(oneshot::Sender<io::Result<()>>),
}

/// The publish thread: sealed segments into Parquet files, in order, retrying after
/// failures; retention. Ends when the log thread closes or is gone, after publishing what it
/// has.
fn publish_loop(
    mut p: Publisher,
    rx: std::sync::mpsc::Receiver<PublishJob>,
    mode: Recording,
    failed: &AtomicBool,
    stats: &ArchiveStats,
) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        let job = if p.queued() == 0 {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(PUBLISH_RETRY)
        };
        match job {
            Ok(PublishJob::Segment(sealed)) => {
                p.submit(sealed);
                let _ = publish(&mut p, mode, failed, stats);
            }
            Ok(PublishJob::Retention(days, today, ack)) => {
                let result = p.apply_retention(days, today);
                if result.as_ref().is_ok_and(|r| !r.is_empty()) {
                    stats.published.notify_one();
                }
                let _ = ack.send(result);
            }
            Ok(PublishJob::Close(ack)) => {
                let _ = ack.send(publish(&mut p, mode, failed, stats));
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = publish(&mut p, mode, failed, stats);
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = publish(&mut p, mode, failed, stats);
                return;
            }
        }
    }
}

fn publish(
    p: &mut Publisher,
    mode: Recording,
    failed: &AtomicBool,
    stats: &ArchiveStats,
) -> io::Result<()> {
    let queued = p.queued();
    let result = p.publish_queued().map(drop);
    let published = (queued - p.queued()) as u64;
    stats.files.fetch_add(published, Ordering::Relaxed);
    if published > 0 {
        stats.published.notify_one();
    }
    stats.bytes.store(p.published_bytes(), Ordering::Relaxed);
    stats
        .published_seq
        .store(p.next_archive_seq(), Ordering::Relaxed);
    // What still waits arrived after the segment just published was sealed: about now.
    let waiting = stats.unpublished() > 0;
    if !waiting || queued > p.queued() {
        stats
            .unpublished_since_us
            .store(if waiting { unix_us() } else { 0 }, Ordering::Relaxed);
    }
    if let Err(e) = &result {
        // The records stay in their segments: retried here, and recovered on the next start.
        stats.errors.fetch_add(1, Ordering::Relaxed);
        warn!(error = %e, "cannot publish an archive segment as Parquet");
        if mode.fails_closed() {
            failed.store(true, Ordering::Relaxed);
        }
    }
    result
}
