//! What Airlock remembers about MCP sessions: the requests still waiting for an answer (to
//! give each response its method, tool and latency, even when the answer arrives on another
//! connection — a GET stream, a resumed stream, the legacy `/sse` stream), the protocol
//! version and `clientInfo`, and which tool started each task (the tasks extension: a task's
//! later `tasks/get` and `tasks/result` keep the tool of the call that started it, whatever
//! connection or session asks).
//!
//! Bounded, and refusing rather than forgetting: a request past `MAX_PENDING` unanswered ones
//! in its session, `MAX_PENDING_PER_UID` for its caller (requests unanswered for
//! `STALE_PENDING` make room first) or `MAX_PENDING_TOTAL` in all is refused (ids and names
//! are bounded in size by validation, so the table's memory is too);
//! an id still waiting for its answer cannot be used again in the session. At most
//! `MAX_SESSIONS` sessions (least recently used go first, their pending requests with them)
//! and `MAX_TASKS` tasks per backend.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::Value;

pub const MAX_PENDING: usize = 4096;
pub const MAX_PENDING_PER_UID: usize = 4096;
pub const MAX_PENDING_TOTAL: usize = 65_536;
const MAX_SESSIONS: usize = 65_536;
const MAX_TASKS: usize = 4096;
/// A request unanswered for this long no longer counts against its caller's bound when that
/// bound is reached (a server that never answers cannot lock a user out for a session's life);
/// an answer that comes later finds no request and gets every mask rule.
pub const STALE_PENDING: Duration = Duration::from_secs(15 * 60);

/// Why a request cannot be remembered (and is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectError {
    /// The id is already waiting for an answer in this session.
    Duplicate,
    /// The session has `MAX_PENDING` unanswered requests.
    Full,
    /// The caller has `MAX_PENDING_PER_UID` unanswered requests, all sessions together.
    UidFull,
    /// `MAX_PENDING_TOTAL` requests are waiting, all callers together.
    TableFull,
}

impl std::fmt::Display for ExpectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectError::Duplicate => f.write_str(
                "a request with this id is already waiting for its answer in this session",
            ),
            ExpectError::Full => write!(
                f,
                "this session already has {MAX_PENDING} requests waiting for an answer"
            ),
            ExpectError::UidFull => write!(
                f,
                "this user already has {MAX_PENDING_PER_UID} requests waiting for an answer"
            ),
            ExpectError::TableFull => write!(
                f,
                "{MAX_PENDING_TOTAL} requests are waiting for an answer on this host"
            ),
        }
    }
}

/// A session as the peers name it: per backend, by `Mcp-Session-Id`, by the legacy
/// transport's `session_id`, or (stateless, or before `initialize` is answered) by the
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub backend: String,
    pub id: String,
}

/// A request waiting for its response.
#[derive(Debug, Clone)]
pub struct Pending {
    pub method: String,
    pub tool: Option<String>,
    pub started: Instant,
    /// Who sent it (requests are counted per caller).
    pub uid: u32,
}

/// A request's id taken in its session (see [`Sessions::reserve`]): given back when the
/// guard is dropped (the request was refused, could not be recorded, or its handling was
/// abandoned), unless [`keep`](Reservation::keep) says that the request goes on and its answer
/// is awaited (the answer, a cancellation by the transport, or the session's end frees it
/// then).
#[must_use = "a dropped reservation gives its id back at once"]
#[derive(Debug)]
pub struct Reservation<'a> {
    sessions: &'a Sessions,
    key: &'a SessionKey,
    client_to_server: bool,
    /// `None` once kept.
    id: Option<String>,
}

impl Reservation<'_> {
    /// The request goes on: its id stays taken until its answer comes.
    pub fn keep(mut self) {
        self.id = None;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.sessions.cancel(self.key, self.client_to_server, &id);
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct SessionInfo {
    pub protocol_version: Option<String>,
    pub client_info: Option<Value>,
}

#[derive(Debug)]
struct State {
    info: SessionInfo,
    /// Keyed by (request travels client→server?, JSON-RPC id text).
    pending: HashMap<(bool, String), Pending>,
    last_used: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<SessionKey, State>,
    /// Unanswered requests by caller, and in all.
    by_uid: HashMap<u32, usize>,
    total: usize,
    /// By backend: task id → the tool of the call that started it, oldest first.
    tasks: HashMap<String, VecDeque<(String, Option<String>)>>,
}

impl Inner {
    fn forget(&mut self, p: &Pending) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.by_uid.get_mut(&p.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_uid.remove(&p.uid);
            }
        }
    }

    fn drop_session(&mut self, key: &SessionKey) {
        if let Some(state) = self.sessions.remove(key) {
            for p in state.pending.values() {
                self.forget(p);
            }
        }
    }

    /// Forget `uid`'s requests older than `STALE_PENDING`.
    fn sweep_stale(&mut self, uid: u32) {
        let mut stale = Vec::new();
        for (key, state) in &self.sessions {
            for (slot, p) in &state.pending {
                if p.uid == uid && p.started.elapsed() > STALE_PENDING {
                    stale.push((key.clone(), slot.clone()));
                }
            }
        }
        for (key, slot) in stale {
            self.take(&key, &slot);
        }
    }

    fn take(&mut self, key: &SessionKey, slot: &(bool, String)) -> Option<Pending> {
        let p = self.sessions.get_mut(key)?.pending.remove(slot)?;
        self.forget(&p);
        Some(p)
    }
}

#[derive(Debug, Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

impl Sessions {
    pub fn new() -> Sessions {
        Sessions::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with<R>(&self, key: &SessionKey, f: impl FnOnce(&mut Inner, &SessionKey) -> R) -> R {
        let mut inner = self.lock();
        let now = Instant::now();
        if !inner.sessions.contains_key(key) && inner.sessions.len() >= MAX_SESSIONS {
            // Full: drop the least recently used eighth at once, so that a full table costs
            // one sort per MAX_SESSIONS / 8 new sessions, not a scan per session.
            let mut by_age: Vec<(Instant, SessionKey)> = inner
                .sessions
                .iter()
                .map(|(k, s)| (s.last_used, k.clone()))
                .collect();
            by_age.sort_unstable_by_key(|(t, _)| *t);
            for (_, k) in by_age.into_iter().take(MAX_SESSIONS / 8) {
                inner.drop_session(&k);
            }
        }
        let state = inner.sessions.entry(key.clone()).or_insert_with(|| State {
            info: SessionInfo::default(),
            pending: HashMap::new(),
            last_used: now,
        });
        state.last_used = now;
        f(&mut inner, key)
    }

    /// Take a request's id in its session (`client_to_server` says which way the request
    /// went) until it is answered. Refused when the id is already waiting in this session, or
    /// a bound is reached. The id is given back when the [`Reservation`] is dropped, unless
    /// it is [kept](Reservation::keep).
    pub fn reserve<'a>(
        &'a self,
        key: &'a SessionKey,
        client_to_server: bool,
        id: String,
        pending: Pending,
    ) -> Result<Reservation<'a>, ExpectError> {
        self.expect(key, client_to_server, id.clone(), pending)?;
        Ok(Reservation {
            sessions: self,
            key,
            client_to_server,
            id: Some(id),
        })
    }

    /// Remember a request. Refused when its id is already waiting in this session, or a bound
    /// is reached.
    fn expect(
        &self,
        key: &SessionKey,
        client_to_server: bool,
        id: String,
        pending: Pending,
    ) -> Result<(), ExpectError> {
        self.with(key, |inner, key| {
            let slot = (client_to_server, id);
            if inner.by_uid.get(&pending.uid).copied().unwrap_or(0) >= MAX_PENDING_PER_UID {
                inner.sweep_stale(pending.uid);
            }
            let uid_count = inner.by_uid.get(&pending.uid).copied().unwrap_or(0);
            let total = inner.total;
            let Some(state) = inner.sessions.get_mut(key) else {
                return Err(ExpectError::TableFull);
            };
            if state.pending.contains_key(&slot) {
                return Err(ExpectError::Duplicate);
            }
            if state.pending.len() >= MAX_PENDING {
                return Err(ExpectError::Full);
            }
            if uid_count >= MAX_PENDING_PER_UID {
                return Err(ExpectError::UidFull);
            }
            if total >= MAX_PENDING_TOTAL {
                return Err(ExpectError::TableFull);
            }
            let uid = pending.uid;
            state.pending.insert(slot, pending);
            *inner.by_uid.entry(uid).or_default() += 1;
            inner.total += 1;
            Ok(())
        })
    }

    /// Forget a request that will not be answered (the client cancelled it, the server
    /// answered its POST without it, or it was refused).
    pub fn cancel(&self, key: &SessionKey, client_to_server: bool, id: &str) {
        self.lock().take(key, &(client_to_server, id.to_owned()));
    }

    /// A `tools/call` was answered with a task: remember which tool it runs, per backend.
    pub fn task_started(&self, backend: &str, task_id: &str, tool: Option<String>) {
        let mut inner = self.lock();
        let tasks = inner.tasks.entry(backend.to_owned()).or_default();
        tasks.retain(|(t, _)| t != task_id);
        if tasks.len() >= MAX_TASKS {
            tasks.pop_front();
        }
        tasks.push_back((task_id.to_owned(), tool));
    }

    /// The tool of the call that started `task_id` on `backend`, if Airlock saw it start.
    pub fn task_tool(&self, backend: &str, task_id: &str) -> Option<Option<String>> {
        self.lock()
            .tasks
            .get(backend)?
            .iter()
            .find(|(t, _)| t == task_id)
            .map(|(_, tool)| tool.clone())
    }

    /// The request a response answers (`request_client_to_server`: the request's direction),
    /// removed from the table, with the time it took. An id echoed as a string for a number
    /// (or the other way round) still finds its request, as the SDK clients match them.
    pub fn answer(
        &self,
        key: &SessionKey,
        request_client_to_server: bool,
        id: &str,
    ) -> Option<(Pending, Duration)> {
        // A lookup does not create a session.
        let mut inner = self.lock();
        inner.sessions.get_mut(key)?.last_used = Instant::now();
        let alternate = match id.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            Some(inner_text) if inner_text.parse::<i64>().is_ok() => Some(inner_text.to_owned()),
            Some(_) => None,
            None if id.parse::<i64>().is_ok() => Some(format!("\"{id}\"")),
            None => None,
        };
        let p = inner
            .take(key, &(request_client_to_server, id.to_owned()))
            .or_else(|| inner.take(key, &(request_client_to_server, alternate?)))?;
        let took = p.started.elapsed();
        Some((p, took))
    }

    /// Move what a connection-keyed session learnt (the `initialize` exchange) to the
    /// session id the server assigned.
    pub fn rename(&self, from: &SessionKey, to: &SessionKey) {
        let mut inner = self.lock();
        if let Some(state) = inner.sessions.remove(from) {
            if inner.sessions.contains_key(to) {
                // The target exists already: what `from` waited for is forgotten.
                for p in state.pending.values() {
                    inner.forget(p);
                }
            } else {
                inner.sessions.insert(to.clone(), state);
            }
        }
    }

    pub fn set_info(&self, key: &SessionKey, update: impl FnOnce(&mut SessionInfo)) {
        self.with(key, |inner, key| {
            if let Some(s) = inner.sessions.get_mut(key) {
                update(&mut s.info);
            }
        });
    }

    pub fn info(&self, key: &SessionKey) -> SessionInfo {
        self.lock()
            .sessions
            .get(key)
            .map(|s| s.info.clone())
            .unwrap_or_default()
    }

    /// The session ended (DELETE, or the connection that keyed it closed).
    pub fn end(&self, key: &SessionKey) {
        self.lock().drop_session(key);
    }

    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Unanswered requests in all.
    pub fn pending_total(&self) -> usize {
        self.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> SessionKey {
        SessionKey {
            backend: "b".into(),
            id: id.into(),
        }
    }

    #[test]
    fn responses_find_their_request_once() {
        let s = Sessions::new();
        s.reserve(
            &key("s1"),
            true,
            "1".into(),
            Pending {
                method: "tools/call".into(),
                tool: Some("add".into()),
                started: Instant::now(),
                uid: 0,
            },
        )
        .map(Reservation::keep)
        .unwrap();
        // The same id again while it waits: refused.
        assert_eq!(
            s.reserve(&key("s1"), true, "1".into(), pending("ping"))
                .map(Reservation::keep),
            Err(ExpectError::Duplicate)
        );
        // A server→client request with the same id is another entry.
        assert!(s.answer(&key("s1"), false, "1").is_none());
        let (p, _) = s.answer(&key("s1"), true, "1").unwrap();
        assert_eq!(p.tool.as_deref(), Some("add"));
        assert!(s.answer(&key("s1"), true, "1").is_none());
        assert!(s.answer(&key("s2"), true, "1").is_none());
    }

    fn pending(method: &str) -> Pending {
        Pending {
            method: method.into(),
            tool: None,
            started: Instant::now(),
            uid: 0,
        }
    }

    #[test]
    fn pending_requests_are_bounded_and_refused_past_the_bound() {
        let s = Sessions::new();
        for i in 0..MAX_PENDING {
            s.reserve(&key("s"), true, i.to_string(), pending("ping"))
                .map(Reservation::keep)
                .unwrap();
        }
        assert_eq!(
            s.reserve(&key("s"), true, "one more".into(), pending("ping"))
                .map(Reservation::keep),
            Err(ExpectError::Full)
        );
        // Nothing was forgotten to make room.
        assert!(s.answer(&key("s"), true, "0").is_some());
        assert!(
            s.answer(&key("s"), true, &(MAX_PENDING - 1).to_string())
                .is_some()
        );
        s.reserve(&key("s"), true, "one more".into(), pending("ping"))
            .map(Reservation::keep)
            .unwrap();
    }

    #[test]
    fn a_dropped_reservation_gives_its_id_back_a_kept_one_holds_it() {
        let s = Sessions::new();
        let k = key("s");
        drop(s.reserve(&k, true, "1".into(), pending("ping")).unwrap());
        assert_eq!(s.pending_total(), 0);
        s.reserve(&k, true, "1".into(), pending("ping"))
            .unwrap()
            .keep();
        assert_eq!(
            s.reserve(&k, true, "1".into(), pending("ping"))
                .map(Reservation::keep),
            Err(ExpectError::Duplicate)
        );
        assert!(s.answer(&k, true, "1").is_some());
        assert_eq!(s.pending_total(), 0);
    }

    #[test]
    fn tasks_keep_the_tool_of_their_call_per_backend() {
        let s = Sessions::new();
        s.task_started("b", "t-1", Some("deploy".into()));
        assert_eq!(s.task_tool("b", "t-1"), Some(Some("deploy".into())));
        assert_eq!(s.task_tool("b", "t-2"), None);
        assert_eq!(s.task_tool("other", "t-1"), None);
        for i in 0..MAX_TASKS {
            s.task_started("b", &i.to_string(), None);
        }
        // The oldest went first.
        assert_eq!(s.task_tool("b", "t-1"), None);
    }

    #[test]
    fn pending_requests_are_bounded_per_user_and_in_all_and_counted_back() {
        let s = Sessions::new();
        let by = |uid| Pending {
            uid,
            ..pending("ping")
        };
        for i in 0..MAX_PENDING_PER_UID {
            s.reserve(&key(&format!("s{}", i % 7)), true, i.to_string(), by(7))
                .map(Reservation::keep)
                .unwrap();
        }
        assert_eq!(
            s.reserve(&key("fresh"), true, "x".into(), by(7))
                .map(Reservation::keep),
            Err(ExpectError::UidFull)
        );
        // Another user is not affected.
        s.reserve(&key("fresh"), true, "x".into(), by(8))
            .map(Reservation::keep)
            .unwrap();
        assert_eq!(s.pending_total(), MAX_PENDING_PER_UID + 1);
        // Ended sessions and answers give their counts back.
        for i in 0..7 {
            s.end(&key(&format!("s{i}")));
        }
        assert_eq!(s.pending_total(), 1);
        s.reserve(&key("again"), true, "y".into(), by(7))
            .map(Reservation::keep)
            .unwrap();
        assert!(s.answer(&key("fresh"), true, "x").is_some());
        assert_eq!(s.pending_total(), 1);
    }

    #[test]
    fn ids_echoed_as_strings_or_numbers_find_their_request() {
        let s = Sessions::new();
        s.reserve(&key("s"), true, "1".into(), pending("tools/call"))
            .map(Reservation::keep)
            .unwrap();
        assert!(s.answer(&key("s"), true, "\"1\"").is_some());
        s.reserve(&key("s"), true, "\"7\"".into(), pending("ping"))
            .map(Reservation::keep)
            .unwrap();
        assert!(s.answer(&key("s"), true, "7").is_some());
        s.reserve(&key("s"), true, "\"a\"".into(), pending("ping"))
            .map(Reservation::keep)
            .unwrap();
        assert!(s.answer(&key("s"), true, "a").is_none());
    }

    #[test]
    fn lookups_do_not_create_sessions_and_a_full_table_evicts_the_oldest() {
        let s = Sessions::new();
        assert!(s.answer(&key("nobody"), true, "1").is_none());
        assert_eq!(s.info(&key("nobody")).protocol_version, None);
        assert!(s.is_empty());
        for i in 0..MAX_SESSIONS {
            s.set_info(&key(&i.to_string()), |_| {});
        }
        s.set_info(&key("first"), |_| {});
        s.set_info(&key("new"), |_| {});
        assert!(s.len() <= MAX_SESSIONS);
        // The oldest went, the newest stayed.
        let inner = s.inner.lock().unwrap();
        assert!(!inner.sessions.contains_key(&key("0")));
        assert!(inner.sessions.contains_key(&key("new")));
    }

    #[test]
    fn rename_keeps_what_initialize_taught() {
        let s = Sessions::new();
        s.set_info(&key("conn-1"), |i| {
            i.protocol_version = Some("2025-11-25".into())
        });
        s.rename(&key("conn-1"), &key("abc"));
        assert_eq!(
            s.info(&key("abc")).protocol_version.as_deref(),
            Some("2025-11-25")
        );
    }
}
