//! Where metrics and audit events see what the agent decided.
//!
//! Every archived record passes [`record`] (the archive's tap, and the pipeline calls it for
//! the messages a policy keeps out of the archive), and every decision that has no record of
//! its own (start, stop, a policy reload, a rejected connection, ...) passes [`event`].
//! Observers are installed once at start-up; with none installed both are a read of an empty
//! list. An observer must not block: it counts, or queues (bounded) and returns.

use std::sync::{Arc, RwLock};

use crate::archive::RecordInput;

/// A decision or a state change that is not (only) an archive row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// The programs are attached and the listeners accept.
    Started { version: String },
    /// The agent is shutting down (`reason`: a signal, `airlock detach`, ...).
    Stopped { reason: String },
    /// A policy set was loaded (`reason`: start, SIGHUP, file change).
    PolicyReloaded { hash: String, reason: String },
    /// A policy set was refused; the previous set stays in force.
    PolicyRefused { error: String, reason: String },
    /// A tool's definition differs from its pin.
    ToolDefinitionChanged {
        backend: String,
        tool: String,
        pinned: String,
        seen: String,
    },
    /// A connection was refused before any message was read. `actor` when the caller is
    /// known (over capacity), `destination` the address the client meant to reach.
    ConnectionRejected {
        /// The rule that refused it (`airlock:unattributed`, `airlock:raw_socket`, ...): the
        /// archive record's and the event's `policy.uid`.
        rule: String,
        reason: String,
        client: String,
        actor: Option<Box<crate::attribution::Attribution>>,
        destination: Option<String>,
    },
    /// A call is held for a human decision (`airlock approvals`); its outcome is the
    /// `approval` record.
    CallHeld {
        approval_id: u64,
        rule: String,
        backend: String,
        method: String,
        tool: Option<String>,
        session_id: String,
        timeout_secs: u64,
        actor: Box<crate::attribution::Attribution>,
    },
    /// A stdio MCP server runs outside any governed job (found by the agent's scan of
    /// `/proc`; `actor` is the server process, `start` its start time in clock ticks).
    UnmanagedStdioServer {
        server: String,
        start: u64,
        parent_exe: Option<String>,
        actor: Box<crate::attribution::Attribution>,
    },
    /// `airlock verify` (or a fleet check) found the archive not as signed.
    VerificationFailed { host: String, problem: String },
}

/// Something that watches records and events (metrics, audit sinks).
pub trait Observer: Send + Sync + 'static {
    fn on_record(&self, _record: &RecordInput) {}
    fn on_event(&self, _event: &AgentEvent) {}
}

static OBSERVERS: RwLock<Vec<Arc<dyn Observer>>> = RwLock::new(Vec::new());

/// Add an observer (at start-up, before traffic).
pub fn install(observer: Arc<dyn Observer>) {
    OBSERVERS
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .push(observer);
}

/// Tell every observer about a record (called before it is archived).
pub fn record(record: &RecordInput) {
    for o in OBSERVERS.read().unwrap_or_else(|p| p.into_inner()).iter() {
        o.on_record(record);
    }
}

/// Tell every observer about an event.
pub fn event(event: AgentEvent) {
    for o in OBSERVERS.read().unwrap_or_else(|p| p.into_inner()).iter() {
        o.on_event(&event);
    }
}
