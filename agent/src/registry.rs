//! The table of live and recently closed connections that `airlock status` shows.
//!
//! A connection enters as a [`ConnGuard`]; dropping the guard (normal end, error or panic of
//! its task) moves it to the bounded `recent` ring, so nothing is lost from the view.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde::Serialize;

use crate::attribution::Attribution;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    /// Attributed, dialling the backend.
    Connecting,
    /// Relaying.
    Open,
    /// Ended normally.
    Closed,
    /// Ended by an error (upstream unreachable, idle timeout, reset...).
    Failed,
    /// Refused by the agent: no kernel record (not an open proxy), or over capacity.
    Rejected,
}

impl ConnState {
    fn from_u8(v: u8) -> ConnState {
        match v {
            0 => ConnState::Connecting,
            1 => ConnState::Open,
            2 => ConnState::Closed,
            3 => ConnState::Failed,
            _ => ConnState::Rejected,
        }
    }
}

/// One row of `airlock status --json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ConnSnapshot {
    pub id: u64,
    pub pid: Option<u32>,
    pub tgid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub comm: Option<String>,
    pub exe: Option<String>,
    pub cmdline: Option<Vec<String>>,
    pub cgroup: Option<String>,
    pub cgroup_id: Option<u64>,
    /// The caller's container (runtime, id, name), when its cgroup names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<crate::attribution::Container>,
    pub backend: Option<String>,
    pub original_dst: Option<String>,
    pub family: Option<String>,
    /// The client's socket as the agent saw it.
    pub client: String,
    pub state: String,
    pub reason: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub opened_at: String,
    pub closed_at: Option<String>,
}

struct Entry {
    id: u64,
    client: SocketAddr,
    attribution: Option<Attribution>,
    backend: Option<String>,
    opened_at: SystemTime,
    state: AtomicU8,
    reason: Mutex<Option<String>>,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    /// `airlock sessions kill`: the connection's task ends when this fires.
    kill: tokio::sync::Notify,
}

impl Entry {
    fn snapshot(&self, closed_at: Option<SystemTime>) -> ConnSnapshot {
        let a = self.attribution.as_ref();
        ConnSnapshot {
            id: self.id,
            pid: a.map(|a| a.pid),
            tgid: a.map(|a| a.tgid),
            uid: a.map(|a| a.uid),
            gid: a.map(|a| a.gid),
            user: a.and_then(|a| a.user.clone()),
            group: a.and_then(|a| a.group.clone()),
            comm: a.map(|a| a.comm.clone()),
            exe: a.and_then(|a| a.exe.clone()),
            cmdline: a.and_then(|a| a.cmdline.clone()),
            cgroup: a.and_then(|a| a.cgroup.clone()),
            cgroup_id: a.map(|a| a.cgroup_id),
            container: a.and_then(|a| a.container.clone()),
            backend: self.backend.clone(),
            original_dst: a.map(|a| a.original_dst.to_string()),
            family: a.map(|a| a.family.to_string()),
            client: self.client.to_string(),
            state: state_name(ConnState::from_u8(self.state.load(Ordering::Relaxed))),
            reason: self.reason.lock().ok().and_then(|r| r.clone()),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            opened_at: rfc3339(self.opened_at),
            closed_at: closed_at.map(rfc3339),
        }
    }
}

fn state_name(s: ConnState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// Live connections and a bounded history of closed ones.
pub struct Registry {
    next_id: AtomicU64,
    recent_capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    live: BTreeMap<u64, Arc<Entry>>,
    recent: VecDeque<ConnSnapshot>,
}

impl Registry {
    pub fn new(recent_capacity: usize) -> Registry {
        Registry {
            next_id: AtomicU64::new(1),
            recent_capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Register a connection. The returned guard updates it and retires it when dropped.
    pub fn open(
        self: &Arc<Self>,
        client: SocketAddr,
        attribution: Option<Attribution>,
        backend: Option<String>,
    ) -> ConnGuard {
        let entry = Arc::new(Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            client,
            attribution,
            backend,
            opened_at: SystemTime::now(),
            state: AtomicU8::new(ConnState::Connecting as u8),
            reason: Mutex::new(None),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            kill: tokio::sync::Notify::new(),
        });
        if let Ok(mut inner) = self.inner.lock() {
            inner.live.insert(entry.id, entry.clone());
        }
        ConnGuard {
            registry: self.clone(),
            entry,
        }
    }

    pub fn live_count(&self) -> usize {
        self.inner.lock().map(|i| i.live.len()).unwrap_or(0)
    }

    /// Live connections first (oldest first), then the closed ones (oldest first).
    pub fn snapshot(&self) -> (Vec<ConnSnapshot>, Vec<ConnSnapshot>) {
        let Ok(inner) = self.inner.lock() else {
            return (Vec::new(), Vec::new());
        };
        let live = inner.live.values().map(|e| e.snapshot(None)).collect();
        let recent = inner.recent.iter().cloned().collect();
        (live, recent)
    }

    /// End every live connection `matches` selects (containment); returns their ids.
    pub fn kill(&self, matches: impl Fn(u64, Option<&Attribution>) -> bool) -> Vec<u64> {
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        let mut ids = Vec::new();
        for e in inner.live.values() {
            if matches(e.id, e.attribution.as_ref()) {
                // A stored permit: the task ends even if it is not waiting right now.
                e.kill.notify_one();
                ids.push(e.id);
            }
        }
        ids
    }

    fn retire(&self, entry: &Entry) {
        let snap = entry.snapshot(Some(SystemTime::now()));
        if let Ok(mut inner) = self.inner.lock() {
            inner.live.remove(&entry.id);
            if inner.recent.len() == self.recent_capacity {
                inner.recent.pop_front();
            }
            inner.recent.push_back(snap);
        }
    }
}

/// A registered connection; dropping it moves the connection to the history.
pub struct ConnGuard {
    registry: Arc<Registry>,
    entry: Arc<Entry>,
}

impl ConnGuard {
    pub fn id(&self) -> u64 {
        self.entry.id
    }

    pub fn set_state(&self, state: ConnState) {
        self.entry.state.store(state as u8, Ordering::Relaxed);
    }

    /// End state and its reason, shown by `airlock status`.
    pub fn finish(&self, state: ConnState, reason: impl Into<String>) {
        self.set_state(state);
        if let Ok(mut r) = self.entry.reason.lock() {
            *r = Some(reason.into());
        }
    }

    pub fn bytes_up(&self) -> &AtomicU64 {
        &self.entry.bytes_up
    }

    /// Resolves when an operator kills this connection.
    pub async fn killed(&self) {
        self.entry.kill.notified().await
    }

    pub fn bytes_down(&self) -> &AtomicU64 {
        &self.entry.bytes_down
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let state = ConnState::from_u8(self.entry.state.load(Ordering::Relaxed));
        if matches!(state, ConnState::Connecting | ConnState::Open) {
            // Ended without a recorded outcome (task cancelled at shutdown, or a panic).
            self.finish(
                ConnState::Failed,
                "ended without an outcome (agent shutdown?)",
            );
        }
        self.registry.retire(&self.entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_connections_move_to_a_bounded_history() {
        let reg = Arc::new(Registry::new(3));
        let client: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        for i in 0..5 {
            let g = reg.open(client, None, Some(format!("b{i}")));
            g.bytes_up().fetch_add(i, Ordering::Relaxed);
            g.finish(ConnState::Closed, "eof");
        }
        let live_guard = reg.open(client, None, None);
        live_guard.set_state(ConnState::Open);
        let (live, recent) = reg.snapshot();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].state, "open");
        assert_eq!(live[0].closed_at, None);
        assert_eq!(recent.len(), 3);
        assert_eq!(
            recent.iter().map(|r| r.bytes_up).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert!(
            recent
                .iter()
                .all(|r| r.state == "closed" && r.closed_at.is_some())
        );
    }

    #[test]
    fn dropped_without_outcome_is_failed_not_lost() {
        let reg = Arc::new(Registry::new(1000));
        let g = reg.open("127.0.0.1:1".parse().unwrap(), None, None);
        g.set_state(ConnState::Open);
        drop(g);
        let (live, recent) = reg.snapshot();
        assert!(live.is_empty());
        assert_eq!(recent[0].state, "failed");
        assert!(recent[0].reason.is_some());
    }
}
