//! Sans-IO aggregation of refused connections, so a local user who connects to the agent's
//! port in a loop (each attempt refused: "no kernel record") costs a bounded number of
//! events, and the queues and the webhook's spool keep room for real findings.
//!
//! Per rule (`airlock:over_capacity`, `airlock:unattributed`, ...: the rule that refused),
//! the first refusal of an interval (10 s) is an event as before; the others in that
//! interval are counted, and when it ends one summary event reports how many (OCSF `count`,
//! `start_time`, `end_time`). At most 2 events per rule per interval, at most
//! [`MAX_REASONS`] rules.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

/// Length of one aggregation interval.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Distinct reasons tracked; past it, new reasons share one window (`other`).
pub const MAX_REASONS: usize = 16;

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The first of its interval: an event of its own.
    Emit,
    /// Counted, told in the interval's summary.
    Counted,
}

/// The refusals of one reason in one interval beyond its first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The rule (`airlock:over_capacity`): the events' policy uid.
    pub key: String,
    /// The first refusal's full reason.
    pub reason: String,
    pub count: u64,
    pub start_ms: i64,
    pub end_ms: i64,
}

struct Window {
    start: Instant,
    start_ms: i64,
    last_ms: i64,
    reason: String,
    count: u64,
}

/// The aggregator: time is passed in (`now`, and `now_ms` for the events' timestamps).
pub struct Rejections {
    interval: Duration,
    windows: BTreeMap<String, Window>,
}

impl Default for Rejections {
    fn default() -> Self {
        Rejections::new(INTERVAL)
    }
}

impl Rejections {
    pub fn new(interval: Duration) -> Rejections {
        Rejections {
            interval,
            windows: BTreeMap::new(),
        }
    }

    /// One refusal at `now`: whether it is an event of its own, and the summaries of the
    /// intervals that ended (of any reason).
    pub fn admit(
        &mut self,
        rule: &str,
        reason: &str,
        now: Instant,
        now_ms: i64,
    ) -> (Verdict, Vec<Summary>) {
        let summaries = self.due(now);
        let mut k: String = rule.chars().take(64).collect();
        if !self.windows.contains_key(&k) && self.windows.len() >= MAX_REASONS {
            k = "airlock:other".into();
        }
        if let Some(w) = self.windows.get_mut(&k) {
            w.count += 1;
            w.last_ms = now_ms;
            return (Verdict::Counted, summaries);
        }
        self.windows.insert(
            k,
            Window {
                start: now,
                start_ms: now_ms,
                last_ms: now_ms,
                reason: reason.chars().take(1024).collect(),
                count: 0,
            },
        );
        (Verdict::Emit, summaries)
    }

    /// Close the intervals that ended by `now`: the summaries of those with refusals beyond
    /// their first.
    pub fn due(&mut self, now: Instant) -> Vec<Summary> {
        let ended: Vec<String> = self
            .windows
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.start) >= self.interval)
            .map(|(k, _)| k.clone())
            .collect();
        ended
            .into_iter()
            .filter_map(|k| {
                let w = self.windows.remove(&k)?;
                summary(k, w)
            })
            .collect()
    }

    /// Close every interval now (at shutdown).
    pub fn drain(&mut self) -> Vec<Summary> {
        std::mem::take(&mut self.windows)
            .into_iter()
            .filter_map(|(k, w)| summary(k, w))
            .collect()
    }
}

fn summary(key: String, w: Window) -> Option<Summary> {
    (w.count > 0).then_some(Summary {
        key,
        reason: w.reason,
        count: w.count,
        start_ms: w.start_ms,
        end_ms: w.last_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_RECORD: &str =
        "no kernel record for this connection: only connections redirected by Airlock are served";
    const UNATTRIBUTED: &str = "airlock:unattributed";

    /// A flood of 10,000 refusals over 60 s costs at most 2 events per interval; a refusal
    /// of another reason amid it is an event of its own; every refusal is accounted for.
    #[test]
    fn a_flood_costs_a_bounded_number_of_events() {
        let mut r = Rejections::default();
        let t0 = Instant::now();
        let (mut emitted, mut summaries) = (0u64, Vec::new());
        let mut capacity_events = 0;
        for i in 0..10_000u64 {
            let at = Duration::from_millis(i * 6); // 60 s
            let (v, s) = r.admit(UNATTRIBUTED, NO_RECORD, t0 + at, at.as_millis() as i64);
            emitted += u64::from(v == Verdict::Emit);
            summaries.extend(s);
            if i == 5_000 {
                let (v, s) = r.admit(
                    "airlock:over_capacity",
                    "over capacity: uid 1000 has 64",
                    t0 + at,
                    0,
                );
                capacity_events += u64::from(v == Verdict::Emit);
                summaries.extend(s);
            }
        }
        summaries.extend(r.due(t0 + Duration::from_secs(71)));
        assert_eq!(capacity_events, 1, "another reason is not drowned");
        assert_eq!(emitted, 6, "one event per 10 s interval");
        assert_eq!(summaries.len(), 6, "one summary per interval");
        let counted: u64 = summaries.iter().map(|s| s.count).sum();
        assert_eq!(emitted + counted, 10_000, "every refusal is counted");
        let s = &summaries[0];
        assert_eq!(s.key, UNATTRIBUTED);
        assert_eq!(s.reason, NO_RECORD);
        assert_eq!((s.start_ms, s.count), (0, 1666));
        assert!(s.end_ms > s.start_ms && s.end_ms < 10_000);
        assert!(r.drain().is_empty());
    }

    /// A lone refusal is an event at once and needs no summary; the next one after the
    /// interval is an event again.
    #[test]
    fn single_refusals_are_events_without_summaries() {
        let mut r = Rejections::default();
        let t0 = Instant::now();
        assert_eq!(r.admit(UNATTRIBUTED, NO_RECORD, t0, 0).0, Verdict::Emit);
        assert!(r.due(t0 + INTERVAL).is_empty());
        let (v, s) = r.admit(UNATTRIBUTED, NO_RECORD, t0 + INTERVAL * 2, 20_000);
        assert_eq!((v, s.len()), (Verdict::Emit, 0));
        // At shutdown, an open interval's count is told.
        assert_eq!(
            r.admit(UNATTRIBUTED, NO_RECORD, t0 + INTERVAL * 2, 20_001)
                .0,
            Verdict::Counted
        );
        let d = r.drain();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].count, 1);
    }

    /// Reasons are bounded: past MAX_REASONS they share one window.
    #[test]
    fn distinct_reasons_are_bounded() {
        let mut r = Rejections::default();
        let t0 = Instant::now();
        let mut emitted = 0;
        for i in 0..1000 {
            emitted +=
                u32::from(r.admit(&format!("airlock:rule_{i}"), "x", t0, 0).0 == Verdict::Emit);
        }
        assert_eq!(emitted as usize, MAX_REASONS + 1);
        assert!(r.windows.len() <= MAX_REASONS + 1);
    }
}
