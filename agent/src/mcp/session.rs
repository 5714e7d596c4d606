//! What Airlock remembers about MCP sessions: the requests still waiting for an answer (to
//! give each response its method, tool and latency, even when the answer arrives on another
//! connection — a GET stream, a resumed stream, the legacy `/sse` stream), the protocol
//! version and `clientInfo`. Bounded: a session keeps at most `MAX_PENDING` unanswered
//! requests (a request past that is refused, not forgotten), at most `MAX_TASKS` tasks (the
//! 2026-07-28 tasks extension: a task's later `tasks/get` and `tasks/result` keep the tool of
//! the call that started it), and the table at most `MAX_SESSIONS` sessions (least recently
//! used go first). An id still waiting for its answer cannot be used again in the session.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::Value;

pub const MAX_PENDING: usize = 4096;
const MAX_SESSIONS: usize = 65_536;
const MAX_TASKS: usize = 4096;

/// Why a request cannot be remembered (and is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectError {
    /// The id is already waiting for an answer in this session.
    Duplicate,
    /// The session has `MAX_PENDING` unanswered requests.
    Full,
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
    /// Task id → the tool of the `tools/call` that started it, oldest first.
    tasks: std::collections::VecDeque<(String, Option<String>)>,
    last_used: Instant,
}

#[derive(Debug, Default)]
pub struct Sessions {
    inner: Mutex<HashMap<SessionKey, State>>,
}

impl Sessions {
    pub fn new() -> Sessions {
        Sessions::default()
    }

    fn with<R>(&self, key: &SessionKey, f: impl FnOnce(&mut State) -> R) -> R {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if !map.contains_key(key) && map.len() >= MAX_SESSIONS {
            // Full: drop the least recently used eighth at once, so that a full table costs
            // one sort per MAX_SESSIONS / 8 new sessions, not a scan per session.
            let mut by_age: Vec<(Instant, SessionKey)> =
                map.iter().map(|(k, s)| (s.last_used, k.clone())).collect();
            by_age.sort_unstable_by_key(|(t, _)| *t);
            for (_, k) in by_age.into_iter().take(MAX_SESSIONS / 8) {
                map.remove(&k);
            }
        }
        let state = map.entry(key.clone()).or_insert_with(|| State {
            info: SessionInfo::default(),
            pending: HashMap::new(),
            tasks: std::collections::VecDeque::new(),
            last_used: now,
        });
        state.last_used = now;
        f(state)
    }

    /// Remember a request (`client_to_server` says which way it went). Refused when its id
    /// is already waiting in this session, or the session is full.
    pub fn expect(
        &self,
        key: &SessionKey,
        client_to_server: bool,
        id: String,
        pending: Pending,
    ) -> Result<(), ExpectError> {
        self.with(key, |s| {
            let slot = (client_to_server, id);
            if s.pending.contains_key(&slot) {
                return Err(ExpectError::Duplicate);
            }
            if s.pending.len() >= MAX_PENDING {
                return Err(ExpectError::Full);
            }
            s.pending.insert(slot, pending);
            Ok(())
        })
    }

    /// Whether a request with this id is waiting (checked before a message is judged, so a
    /// duplicate is refused before anything else happens to it).
    pub fn is_pending(&self, key: &SessionKey, client_to_server: bool, id: &str) -> bool {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .is_some_and(|s| s.pending.contains_key(&(client_to_server, id.to_owned())))
    }

    /// Forget a request that will not be answered (the client cancelled it).
    pub fn cancel(&self, key: &SessionKey, client_to_server: bool, id: &str) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get_mut(key) {
            s.pending.remove(&(client_to_server, id.to_owned()));
        }
    }

    /// A `tools/call` was answered with a task: remember which tool it runs.
    pub fn task_started(&self, key: &SessionKey, task_id: &str, tool: Option<String>) {
        self.with(key, |s| {
            s.tasks.retain(|(t, _)| t != task_id);
            if s.tasks.len() >= MAX_TASKS {
                s.tasks.pop_front();
            }
            s.tasks.push_back((task_id.to_owned(), tool));
        })
    }

    /// The tool of the call that started `task_id`, if this session started it.
    pub fn task_tool(&self, key: &SessionKey, task_id: &str) -> Option<Option<String>> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)?
            .tasks
            .iter()
            .find(|(t, _)| t == task_id)
            .map(|(_, tool)| tool.clone())
    }

    /// The request a response answers (`request_client_to_server`: the request's direction),
    /// removed from the table, with the time it took.
    pub fn answer(
        &self,
        key: &SessionKey,
        request_client_to_server: bool,
        id: &str,
    ) -> Option<(Pending, Duration)> {
        // A lookup does not create a session.
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let state = map.get_mut(key)?;
        state.last_used = Instant::now();
        state
            .pending
            .remove(&(request_client_to_server, id.to_owned()))
            .map(|p| {
                let took = p.started.elapsed();
                (p, took)
            })
    }

    /// Move what a connection-keyed session learnt (the `initialize` exchange) to the
    /// session id the server assigned.
    pub fn rename(&self, from: &SessionKey, to: &SessionKey) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = map.remove(from) {
            map.entry(to.clone()).or_insert(state);
        }
    }

    pub fn set_info(&self, key: &SessionKey, update: impl FnOnce(&mut SessionInfo)) {
        self.with(key, |s| update(&mut s.info));
    }

    pub fn info(&self, key: &SessionKey) -> SessionInfo {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).map(|s| s.info.clone()).unwrap_or_default()
    }

    /// The session ended (DELETE, or the connection that keyed it closed).
    pub fn end(&self, key: &SessionKey) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(key);
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        s.expect(
            &key("s1"),
            true,
            "1".into(),
            Pending {
                method: "tools/call".into(),
                tool: Some("add".into()),
                started: Instant::now(),
            },
        )
        .unwrap();
        // The same id again while it waits: refused.
        assert_eq!(
            s.expect(&key("s1"), true, "1".into(), pending("ping")),
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
        }
    }

    #[test]
    fn pending_requests_are_bounded_and_refused_past_the_bound() {
        let s = Sessions::new();
        for i in 0..MAX_PENDING {
            s.expect(&key("s"), true, i.to_string(), pending("ping"))
                .unwrap();
        }
        assert_eq!(
            s.expect(&key("s"), true, "one more".into(), pending("ping")),
            Err(ExpectError::Full)
        );
        // Nothing was forgotten to make room.
        assert!(s.answer(&key("s"), true, "0").is_some());
        assert!(s.answer(&key("s"), true, &(MAX_PENDING - 1).to_string()).is_some());
        s.expect(&key("s"), true, "one more".into(), pending("ping"))
            .unwrap();
    }

    #[test]
    fn tasks_keep_the_tool_of_their_call() {
        let s = Sessions::new();
        s.task_started(&key("s"), "t-1", Some("deploy".into()));
        assert_eq!(s.task_tool(&key("s"), "t-1"), Some(Some("deploy".into())));
        assert_eq!(s.task_tool(&key("s"), "t-2"), None);
        assert_eq!(s.task_tool(&key("other"), "t-1"), None);
        for i in 0..MAX_TASKS {
            s.task_started(&key("s"), &i.to_string(), None);
        }
        // The oldest went first.
        assert_eq!(s.task_tool(&key("s"), "t-1"), None);
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
        let map = s.inner.lock().unwrap();
        assert!(!map.contains_key(&key("0")));
        assert!(map.contains_key(&key("new")));
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
