//! What the shipper has done and what waits: atomics for `airlock status` and the metrics.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use super::ShipError;

/// What the shipper has done and what waits; read by `airlock status` and the metrics.
#[derive(Debug, Default)]
pub struct ShipStats {
    /// Manifest lines shipped (with their files), in order: retention keeps the files of later
    /// lines when `keep_unshipped` is on.
    pub lines_shipped: Arc<AtomicU64>,
    /// Manifest lines (and files among them, and those files' bytes) not shipped yet.
    pub lines_pending: AtomicU64,
    pub files_pending: AtomicU64,
    pub bytes_pending: AtomicU64,
    /// Seconds since the epoch of the oldest line not shipped (0: none).
    pub oldest_pending_unix: AtomicU64,
    pub files_shipped: AtomicU64,
    pub bytes_shipped: AtomicU64,
    /// Objects written, and writes that failed (network, credentials, server errors).
    pub uploads_ok: AtomicU64,
    pub uploads_failed: AtomicU64,
    /// Create-only writes that found an identical object (counted as shipped).
    pub already_present: AtomicU64,
    /// Create-only writes that found a different object (alarm; never overwritten).
    pub conflicts: AtomicU64,
    /// Files named by a manifest line but gone locally before they were shipped.
    pub files_missing: AtomicU64,
    pub last_success_unix: AtomicU64,
    pub last_error_unix: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// [`ShipStats`] as `airlock status` shows it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ShipStatus {
    pub url: String,
    pub lines_shipped: u64,
    pub lines_pending: u64,
    pub files_pending: u64,
    pub bytes_pending: u64,
    pub oldest_pending_age_secs: Option<u64>,
    pub files_shipped: u64,
    pub bytes_shipped: u64,
    pub uploads_ok: u64,
    pub uploads_failed: u64,
    pub already_present: u64,
    pub conflicts: u64,
    pub files_missing: u64,
    pub last_success: Option<String>,
    pub last_error_at: Option<String>,
    pub last_error: Option<String>,
}

pub(super) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rfc3339(unix: u64) -> Option<String> {
    (unix > 0).then(|| {
        humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(unix))
            .to_string()
    })
}

impl ShipStats {
    pub fn snapshot(&self, url: &str) -> ShipStatus {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let oldest = get(&self.oldest_pending_unix);
        ShipStatus {
            url: url.to_owned(),
            lines_shipped: get(&self.lines_shipped),
            lines_pending: get(&self.lines_pending),
            files_pending: get(&self.files_pending),
            bytes_pending: get(&self.bytes_pending),
            oldest_pending_age_secs: (oldest > 0).then(|| now_unix().saturating_sub(oldest)),
            files_shipped: get(&self.files_shipped),
            bytes_shipped: get(&self.bytes_shipped),
            uploads_ok: get(&self.uploads_ok),
            uploads_failed: get(&self.uploads_failed),
            already_present: get(&self.already_present),
            conflicts: get(&self.conflicts),
            files_missing: get(&self.files_missing),
            last_success: rfc3339(get(&self.last_success_unix)),
            last_error_at: rfc3339(get(&self.last_error_unix)),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    pub(super) fn error(&self, e: &ShipError) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(super::redact::error(e));
        self.last_error_unix.store(now_unix(), Ordering::Relaxed);
    }
}

impl crate::metrics::ShipStats for ShipStats {
    fn backlog_files(&self) -> u64 {
        self.files_pending.load(Ordering::Relaxed)
    }

    fn backlog_bytes(&self) -> u64 {
        self.bytes_pending.load(Ordering::Relaxed)
    }

    fn failures(&self) -> u64 {
        self.uploads_failed.load(Ordering::Relaxed)
    }

    fn backlog_lines(&self) -> u64 {
        self.lines_pending.load(Ordering::Relaxed)
    }

    fn oldest_pending_seconds(&self) -> u64 {
        match self.oldest_pending_unix.load(Ordering::Relaxed) {
            0 => 0,
            oldest => now_unix().saturating_sub(oldest),
        }
    }

    fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }
}
