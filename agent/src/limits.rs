//! Resource limits that keep one local user from denying service to everyone else: open
//! intercepted connections and in-flight request-body bytes per uid, and one memory budget, all
//! connections together, for parsed JSON. Each limit refuses (the caller answers with an error
//! and records it) rather than waits, and each refusal is counted for `airlock status`.
//!
//! Permits are RAII: what a permit holds is given back when it is dropped, however the request
//! or connection ended.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

/// The configured limits and what is in use.
#[derive(Debug)]
pub struct Limits {
    per_uid_connections: usize,
    per_uid_bytes: usize,
    parse_budget: usize,
    by_uid: Mutex<HashMap<u32, Use>>,
    parsing: AtomicUsize,
    pub counters: LimitCounters,
}

#[derive(Debug, Default, Clone, Copy)]
struct Use {
    connections: usize,
    bytes: usize,
    parsing: usize,
}

/// Refusals and timeouts, by reason.
#[derive(Debug, Default)]
pub struct LimitCounters {
    pub rejected_uid_connections: AtomicU64,
    pub refused_uid_bytes: AtomicU64,
    pub refused_parse_budget: AtomicU64,
    pub body_read_timeouts: AtomicU64,
    pub sse_event_timeouts: AtomicU64,
}

impl LimitCounters {
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        [
            ("rejected_uid_connections", &self.rejected_uid_connections),
            ("refused_uid_bytes", &self.refused_uid_bytes),
            ("refused_parse_budget", &self.refused_parse_budget),
            ("body_read_timeouts", &self.body_read_timeouts),
            ("sse_event_timeouts", &self.sse_event_timeouts),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.load(Ordering::Relaxed)))
        .collect()
    }
}

/// Why a permit was refused (the message names the configuration key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "uid {uid} already has {limit} intercepted connections open (`max_connections_per_uid`)"
    )]
    Connections { uid: u32, limit: usize },
    #[error(
        "uid {uid} already has {limit} bytes of request bodies in flight (`max_inflight_bytes_per_uid`)"
    )]
    Bytes { uid: u32, limit: usize },
    #[error(
        "parsing this body would take about {needed} bytes and the parsing budget has {free} of {limit} left (`max_parsed_bytes`)"
    )]
    Parse {
        needed: usize,
        free: usize,
        limit: usize,
    },
    #[error(
        "parsing this body would take about {needed} bytes and uid {uid} already uses {used} of the {share} one user may (half of `max_parsed_bytes`)"
    )]
    ParseShare {
        uid: u32,
        needed: usize,
        used: usize,
        share: usize,
    },
}

impl Limits {
    pub fn new(per_uid_connections: usize, per_uid_bytes: usize, parse_budget: usize) -> Limits {
        Limits {
            per_uid_connections,
            per_uid_bytes,
            parse_budget,
            by_uid: Mutex::new(HashMap::new()),
            parsing: AtomicUsize::new(0),
            counters: LimitCounters::default(),
        }
    }

    fn with_use<R>(&self, uid: u32, f: impl FnOnce(&mut Use) -> R) -> R {
        let mut map = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        let u = map.entry(uid).or_default();
        let r = f(u);
        if u.connections == 0 && u.bytes == 0 && u.parsing == 0 {
            map.remove(&uid);
        }
        r
    }

    /// One more intercepted connection for `uid`.
    pub fn connection(self: &Arc<Self>, uid: u32) -> Result<ConnectionPermit, LimitError> {
        let limit = self.per_uid_connections;
        self.with_use(uid, |u| {
            if u.connections >= limit {
                return Err(LimitError::Connections { uid, limit });
            }
            u.connections += 1;
            Ok(())
        })
        .inspect_err(|_| {
            self.counters
                .rejected_uid_connections
                .fetch_add(1, Ordering::Relaxed);
        })?;
        Ok(ConnectionPermit {
            limits: self.clone(),
            uid,
        })
    }

    /// An empty claim on `uid`'s in-flight body bytes, grown as a body arrives.
    pub fn body(self: &Arc<Self>, uid: u32) -> BodyPermit {
        BodyPermit {
            limits: self.clone(),
            uid,
            held: 0,
        }
    }

    /// `estimate` bytes of the parsing budget (see `mcp::strict::parsed_size_estimate`), for
    /// a body sent by or to `uid`: one user may hold at most half of the budget.
    pub fn parse(self: &Arc<Self>, uid: u32, estimate: usize) -> Result<ParsePermit, LimitError> {
        let limit = self.parse_budget;
        let share = limit / 2;
        let refused = |e: LimitError| {
            self.counters
                .refused_parse_budget
                .fetch_add(1, Ordering::Relaxed);
            Err(e)
        };
        let mut map = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        let used = map.get(&uid).map_or(0, |u| u.parsing);
        if used.saturating_add(estimate) > share {
            return refused(LimitError::ParseShare {
                uid,
                needed: estimate,
                used,
                share,
            });
        }
        let current = self.parsing.load(Ordering::Relaxed);
        let free = limit.saturating_sub(current);
        if estimate > free {
            return refused(LimitError::Parse {
                needed: estimate,
                free,
                limit,
            });
        }
        self.parsing.fetch_add(estimate, Ordering::AcqRel);
        map.entry(uid).or_default().parsing += estimate;
        Ok(ParsePermit {
            limits: self.clone(),
            uid,
            held: estimate,
        })
    }

    /// What is in use now, for `airlock status`.
    pub fn in_use(&self) -> BTreeMap<String, u64> {
        let map = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        let bytes: usize = map.values().map(|u| u.bytes).sum();
        BTreeMap::from([
            ("inflight_body_bytes".to_owned(), bytes as u64),
            (
                "parsing_bytes".to_owned(),
                self.parsing.load(Ordering::Relaxed) as u64,
            ),
            ("uids_with_connections".to_owned(), map.len() as u64),
        ])
    }
}

/// An open connection counted against its uid.
#[derive(Debug)]
pub struct ConnectionPermit {
    limits: Arc<Limits>,
    uid: u32,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.limits.with_use(self.uid, |u| {
            u.connections = u.connections.saturating_sub(1)
        });
    }
}

/// Body bytes counted against a uid while a request is read and inspected.
#[derive(Debug)]
pub struct BodyPermit {
    limits: Arc<Limits>,
    uid: u32,
    held: usize,
}

impl BodyPermit {
    /// Hold exactly `n` bytes (more or fewer than now): what a stream holds in one event.
    pub fn set(&mut self, n: usize) -> Result<(), LimitError> {
        if n >= self.held {
            return self.grow(n - self.held);
        }
        let released = self.held - n;
        self.limits
            .with_use(self.uid, |u| u.bytes = u.bytes.saturating_sub(released));
        self.held = n;
        Ok(())
    }

    /// Claim `n` more bytes.
    pub fn grow(&mut self, n: usize) -> Result<(), LimitError> {
        let (uid, limit) = (self.uid, self.limits.per_uid_bytes);
        self.limits
            .with_use(uid, |u| {
                if u.bytes.saturating_add(n) > limit {
                    return Err(LimitError::Bytes { uid, limit });
                }
                u.bytes += n;
                Ok(())
            })
            .inspect_err(|_| {
                self.limits
                    .counters
                    .refused_uid_bytes
                    .fetch_add(1, Ordering::Relaxed);
            })?;
        self.held += n;
        Ok(())
    }
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        let held = self.held;
        if held > 0 {
            self.limits
                .with_use(self.uid, |u| u.bytes = u.bytes.saturating_sub(held));
        }
    }
}

/// A share of the parsing budget, held while a parsed body is alive.
#[derive(Debug)]
pub struct ParsePermit {
    limits: Arc<Limits>,
    uid: u32,
    held: usize,
}

impl Drop for ParsePermit {
    fn drop(&mut self) {
        let held = self.held;
        self.limits.parsing.fetch_sub(held, Ordering::AcqRel);
        self.limits
            .with_use(self.uid, |u| u.parsing = u.parsing.saturating_sub(held));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_per_uid_are_capped_and_given_back() {
        let l = Arc::new(Limits::new(2, 100, 1000));
        let a = l.connection(7).unwrap();
        let _b = l.connection(7).unwrap();
        assert!(matches!(
            l.connection(7),
            Err(LimitError::Connections { uid: 7, limit: 2 })
        ));
        // Another user is not affected.
        let _c = l.connection(8).unwrap();
        drop(a);
        let _d = l.connection(7).unwrap();
        assert_eq!(
            l.counters.rejected_uid_connections.load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn body_bytes_per_uid_are_capped_across_requests() {
        let l = Arc::new(Limits::new(10, 100, 1000));
        let mut one = l.body(7);
        one.grow(60).unwrap();
        let mut two = l.body(7);
        assert!(two.grow(50).is_err());
        two.grow(40).unwrap();
        assert_eq!(l.in_use()["inflight_body_bytes"], 100);
        drop(one);
        two.grow(50).unwrap();
        drop(two);
        assert_eq!(l.in_use()["inflight_body_bytes"], 0);
        assert_eq!(l.in_use()["uids_with_connections"], 0);
    }

    #[test]
    fn the_parse_budget_is_shared_and_no_user_takes_more_than_half() {
        let l = Arc::new(Limits::new(10, 100, 1000));
        let a = l.parse(1, 400).unwrap();
        let err = l.parse(1, 200).unwrap_err();
        assert!(
            matches!(err, LimitError::ParseShare { uid: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("max_parsed_bytes"), "{err}");
        let b = l.parse(2, 500).unwrap();
        assert!(matches!(l.parse(3, 200), Err(LimitError::Parse { .. })));
        drop(a);
        drop(b);
        let _c = l.parse(1, 500).unwrap();
        assert_eq!(l.counters.refused_parse_budget.load(Ordering::Relaxed), 2);
        assert_eq!(l.in_use()["parsing_bytes"], 500);
    }

    #[test]
    fn a_body_permit_can_shrink() {
        let l = Arc::new(Limits::new(10, 100, 1000));
        let mut p = l.body(5);
        p.set(80).unwrap();
        assert!(p.set(101).is_err());
        p.set(10).unwrap();
        assert_eq!(l.in_use()["inflight_body_bytes"], 10);
        drop(p);
        assert_eq!(l.in_use()["inflight_body_bytes"], 0);
    }
}
