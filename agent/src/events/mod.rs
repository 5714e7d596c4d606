//! Audit events for SIEMs: every decision an analyst alerts on, as one OCSF 1.7.0 JSON event,
//! to any combination of a rotated JSON-lines file, syslog (RFC 5424) and an HTTPS webhook.
//!
//! # Layout
//! - [`ocsf`]: sans-IO mapping of records and agent events to OCSF (EVENTS.md documents it).
//! - [`config`]: the `[events]` section.
//! - [`file`], [`syslog`], [`webhook`]: one sink each, a thread (the webhook: a thread that
//!   spools and a thread with its own runtime that delivers) draining its own bounded queue.
//! - [`spool`]: the webhook's bounded on-disk queue (survives restarts).
//! - [`rejections`]: refused connections aggregated per rule, so a flood costs a bounded
//!   number of events.
//!
//! The observer ([`Events`]) runs on the traffic's path, so it never waits: it maps the
//! decision, serialises it once, and `try_send`s it to each sink's queue, counting a full
//! queue as a drop. Sinks retry and reconnect on their own time.

pub mod file;
pub mod ocsf;
pub mod rejections;
pub mod spool;
pub mod syslog;
pub mod webhook;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant},
};

pub use crate::config::EventsConfig;

use crate::{
    archive::RecordInput,
    observe::{AgentEvent, Observer},
};

/// A sink could not start; the agent refuses to run without the sinks it was told to use.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error(
        "events file {path}: {source}; check `events.file.path` (its directory must exist or be creatable by root)"
    )]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "events spool {path}: {source}; it lives under `state_dir` and must be root's, mode 0700"
    )]
    Spool {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("events.webhook.ca_file {path}: {message}")]
    CaFile {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(
        "events.webhook.authorization_file {path}: {message} (a root-only file, mode 0600, holding the Authorization header value)"
    )]
    Authorization {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("cannot start the {0} events thread: {1}")]
    Thread(&'static str, #[source] std::io::Error),
}

/// One serialised event, with what syslog needs for its header.
#[derive(Debug)]
pub struct Event {
    pub json: String,
    pub class_uid: u32,
    pub severity_id: u8,
    pub time_ms: i64,
}

impl Event {
    pub fn new(value: &serde_json::Value) -> Event {
        Event {
            json: value.to_string(),
            class_uid: value["class_uid"].as_u64().unwrap_or(0) as u32,
            severity_id: value["severity_id"].as_u64().unwrap_or(0) as u8,
            time_ms: value["time"].as_i64().unwrap_or(0),
        }
    }
}

/// What a sink's queue carries: events, and a flush request answered once everything
/// before it is written (or spooled).
pub enum Msg {
    Event(Arc<Event>),
    Flush(SyncSender<()>),
}

/// Counters of one sink.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Events written (file), sent (syslog) or acknowledged with a 2xx (webhook).
    pub sent: AtomicU64,
    /// Events dropped because the sink's memory queue was full.
    pub dropped: AtomicU64,
    /// Failed writes, sends, connects or POSTs (each retried).
    pub failed: AtomicU64,
    /// Events in the memory queue now.
    pub queued: AtomicU64,
    /// Webhook: events in the on-disk spool now.
    pub spooled: AtomicU64,
    /// Webhook: the oldest spooled events dropped because the spool was full.
    pub spool_dropped: AtomicU64,
    /// File: rotations.
    pub rotations: AtomicU64,
}

/// Counters of the events pipeline (`airlock status`, the metrics).
#[derive(Debug, Default)]
pub struct EventStats {
    /// OCSF events produced (before the sinks).
    pub emitted: AtomicU64,
    pub file: SinkStats,
    pub syslog: SinkStats,
    pub webhook: SinkStats,
}

impl EventStats {
    /// Counters by name (`events_<sink>_<counter>`), for the configured sinks.
    pub fn snapshot(&self, sinks: &[&str]) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        m.insert(
            "events_emitted".into(),
            self.emitted.load(Ordering::Relaxed),
        );
        for &name in sinks {
            let s = match name {
                "file" => &self.file,
                "syslog" => &self.syslog,
                _ => &self.webhook,
            };
            let mut put = |k: &str, v: &AtomicU64| {
                m.insert(format!("events_{name}_{k}"), v.load(Ordering::Relaxed));
            };
            put("sent", &s.sent);
            put("dropped", &s.dropped);
            put("failed", &s.failed);
            put("queued", &s.queued);
            if name == "webhook" {
                put("spooled", &s.spooled);
                put("spool_dropped", &s.spool_dropped);
            }
            if name == "file" {
                put("rotations", &s.rotations);
            }
        }
        m
    }
}

static RUNNING: OnceLock<Arc<Events>> = OnceLock::new();

/// The counters of the running agent's events (empty without `[events]`).
pub fn counters() -> BTreeMap<String, u64> {
    RUNNING
        .get()
        .map(|e| e.stats.snapshot(&e.sink_names()))
        .unwrap_or_default()
}

/// The events observer: maps and fans out to the sinks' queues.
pub struct Events {
    pub stats: Arc<EventStats>,
    host: String,
    version: String,
    sinks: Vec<(&'static str, SyncSender<Msg>)>,
    /// Webhook: wakes the delivery task when something was spooled.
    spool: Option<Arc<webhook::Delivery>>,
    /// Refused connections, aggregated per rule.
    rejections: Mutex<rejections::Rejections>,
}

impl Events {
    /// Start the sinks' threads for a CLI (`airlock verify`): the webhook's events go to its
    /// spool only (the agent delivers them), and no temporary file of the spool is touched.
    pub fn start(
        config: &EventsConfig,
        host: &str,
        file_gid: Option<u32>,
    ) -> Result<Arc<Events>, EventsError> {
        Events::start_as(config, host, file_gid, spool::Role::Writer)
    }

    fn start_as(
        config: &EventsConfig,
        host: &str,
        file_gid: Option<u32>,
        role: spool::Role,
    ) -> Result<Arc<Events>, EventsError> {
        let stats = Arc::new(EventStats::default());
        let mut sinks = Vec::new();
        let cap = config.queue_capacity;
        if let Some(f) = &config.file {
            let (tx, rx) = sync_channel(cap);
            file::spawn(f.clone(), file_gid, rx, stats.clone())?;
            sinks.push(("file", tx));
        }
        if let Some(s) = &config.syslog {
            let (tx, rx) = sync_channel(cap);
            syslog::spawn(s.clone(), host.to_owned(), rx, stats.clone())?;
            sinks.push(("syslog", tx));
        }
        let mut spool = None;
        if let Some(w) = &config.webhook {
            let (tx, rx) = sync_channel(cap);
            let delivery = Arc::new(webhook::Delivery::open(w.clone(), stats.clone(), role)?);
            webhook::spawn_spooler(delivery.clone(), rx)?;
            sinks.push(("webhook", tx));
            spool = Some(delivery);
        }
        Ok(Arc::new(Events {
            stats,
            host: host.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            sinks,
            spool,
            rejections: Mutex::new(rejections::Rejections::default()),
        }))
    }

    /// For the agent: start the sinks, deliver the webhook's spool from a socket tagged as
    /// the agent's own, and observe every decision.
    pub fn start_agent(
        config: &EventsConfig,
        host: &str,
        file_gid: Option<u32>,
        own: Arc<crate::kernel::OwnSockets>,
    ) -> Result<Arc<Events>, EventsError> {
        let events = Events::start_as(config, host, file_gid, spool::Role::Owner)?;
        if let Some(d) = &events.spool {
            webhook::spawn_delivery(d.clone(), own)?;
        }
        spawn_ticker(Arc::downgrade(&events))?;
        let _ = RUNNING.set(events.clone());
        crate::observe::install(events.clone());
        Ok(events)
    }

    fn sink_names(&self) -> Vec<&str> {
        self.sinks.iter().map(|(n, _)| *n).collect()
    }

    /// Queue one OCSF event to every sink; never waits. An event larger than
    /// [`ocsf::MAX_EVENT_BYTES`] (a syslog datagram) is cut to it, never dropped.
    pub fn emit(&self, value: &serde_json::Value) {
        self.stats.emitted.fetch_add(1, Ordering::Relaxed);
        let mut event = Event::new(value);
        if event.json.len() > ocsf::MAX_EVENT_BYTES {
            let mut v = value.clone();
            ocsf::fit(&mut v, ocsf::MAX_EVENT_BYTES);
            event = Event::new(&v);
        }
        let event = Arc::new(event);
        for (name, tx) in &self.sinks {
            let s = self.sink_stats(name);
            match tx.try_send(Msg::Event(event.clone())) {
                Ok(()) => {
                    s.queued.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    s.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn sink_stats(&self, name: &str) -> &SinkStats {
        match name {
            "file" => &self.stats.file,
            "syslog" => &self.stats.syslog,
            _ => &self.stats.webhook,
        }
    }

    /// Summaries of the rejection intervals that ended by `now` (all, with `all`).
    fn emit_rejection_summaries(&self, now: Instant, all: bool) {
        let due = {
            let mut r = self.rejections.lock().unwrap_or_else(|p| p.into_inner());
            if all { r.drain() } else { r.due(now) }
        };
        for sum in &due {
            self.emit(&ocsf::rejections_summary(
                sum,
                &self.host,
                &self.version,
                now_ms(),
            ));
        }
    }

    /// Wait (up to `within`) until every sink wrote, sent or spooled what was queued before
    /// this call (the summaries of refused connections still open included). Returns
    /// whether all did. Blocks the calling thread.
    pub fn flush(&self, within: Duration) -> bool {
        self.emit_rejection_summaries(Instant::now(), true);
        let deadline = Instant::now() + within;
        let mut acks = Vec::new();
        for (_, tx) in &self.sinks {
            let (ack_tx, ack_rx) = sync_channel(1);
            let mut msg = Msg::Flush(ack_tx);
            loop {
                match tx.try_send(msg) {
                    Ok(()) => {
                        acks.push(ack_rx);
                        break;
                    }
                    Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                        msg = m;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => return false,
                }
            }
        }
        acks.iter().all(|rx| {
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_ok()
        })
    }

    /// The OCSF event of a CLI finding (`airlock verify`), sent and flushed.
    pub fn emit_event_now(&self, event: &AgentEvent, within: Duration) -> bool {
        self.emit(&ocsf::from_event(
            event,
            &self.host,
            &self.version,
            now_ms(),
        ));
        self.flush(within)
    }
}

/// `airlock verify` found problems: one Detection Finding to the configured sinks (file and
/// syslog directly; the webhook's spool, which the agent delivers). Returns whether every
/// sink took it within 5 s.
pub fn report_verification_failure(
    config: &EventsConfig,
    host: &str,
    file_gid: Option<u32>,
    archive_hosts: &[String],
    problems: &[String],
) -> Result<bool, EventsError> {
    let events = Events::start(config, host, file_gid)?;
    let mut problem = format!("{} problem(s): ", problems.len());
    problem.push_str(
        &problems
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("; "),
    );
    let hosts = if archive_hosts.is_empty() {
        "unknown".to_owned()
    } else {
        archive_hosts.join(",")
    };
    Ok(events.emit_event_now(
        &AgentEvent::VerificationFailed {
            host: hosts,
            problem,
        },
        Duration::from_secs(5),
    ))
}

impl Observer for Events {
    fn on_record(&self, record: &RecordInput) {
        if let Some(v) = ocsf::from_record(record, &self.version) {
            self.emit(&v);
        }
    }

    fn on_event(&self, event: &AgentEvent) {
        if let AgentEvent::ConnectionRejected { rule, reason, .. } = event {
            // A flood of refusals (anyone may connect to the port) costs a bounded number
            // of events: the first per rule and interval, then a summary.
            let (verdict, due) = self
                .rejections
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .admit(rule, reason, Instant::now(), now_ms());
            for sum in &due {
                self.emit(&ocsf::rejections_summary(
                    sum,
                    &self.host,
                    &self.version,
                    now_ms(),
                ));
            }
            if verdict == rejections::Verdict::Counted {
                return;
            }
        }
        self.emit(&ocsf::from_event(
            event,
            &self.host,
            &self.version,
            now_ms(),
        ));
    }
}

/// The thread that sends the summaries of refused connections when their interval ends
/// (also without a later refusal); it ends with the events pipeline.
fn spawn_ticker(events: Weak<Events>) -> Result<(), EventsError> {
    std::thread::Builder::new()
        .name("airlock-events-tick".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                match events.upgrade() {
                    Some(e) => e.emit_rejection_summaries(Instant::now(), false),
                    None => return,
                }
            }
        })
        .map(|_| ())
        .map_err(|e| EventsError::Thread("events timer", e))
}

/// Receive the next message, counting it out of the memory queue.
pub(crate) fn next(rx: &Receiver<Msg>, stats: &SinkStats) -> Option<Msg> {
    let m = rx.recv().ok()?;
    if matches!(m, Msg::Event(_)) {
        stats.queued.fetch_sub(1, Ordering::Relaxed);
    }
    Some(m)
}

/// The next message if one is queued now.
pub(crate) fn try_next(rx: &Receiver<Msg>, stats: &SinkStats) -> Option<Msg> {
    let m = rx.try_recv().ok()?;
    if matches!(m, Msg::Event(_)) {
        stats.queued.fetch_sub(1, Ordering::Relaxed);
    }
    Some(m)
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Exponential backoff between retries of a sink: 100 ms doubling to `max`.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_millis(100),
            max,
        }
    }
    pub(crate) fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
    pub(crate) fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_limits;
