//! The message pipeline: every MCP message, whichever transport carried it, becomes a
//! [`Msg`] that goes through one policy stage (pass, rewrite, or answer instead of
//! forwarding) and then one record sink (the archive), before anything is forwarded.
//!
//! ```text
//!   http/ (POST body, JSON answer, SSE event)
//!       └─▶ Pipeline::process(ctx, msg)
//!             1. correlate   responses get their request's method, tool and latency
//!             2. reserve     a request's id taken in its session (given back unless forwarded)
//!             3. policy      PolicySet::decide + mask (inline, both directions), listings
//!             4. refuse      Airlock's own refusals, the verdict (approvals wait here)
//!             5. record      archive row (strict: durable before we return)
//!             6. answer      a refused message's JSON-RPC error, recorded
//!       ◀── Outcome::Forward(value) | Outcome::Answer(error)
//! ```
//!
//! Fail closed: when the record cannot be written in strict mode the caller gets an error and
//! refuses the message rather than forwarding it unrecorded.
//!
//! Files: this one (the message, its outcome, correlation), [`stages`] (the stages after
//! correlation), [`context`] (what a connection's messages share),
//! [`approval`] (held calls and the approval webhook), [`rules`] (which rules a record
//! names), [`unaddressed`] (masking and records of what is not an MCP message).

pub(crate) mod approval;
mod context;
mod rules;
mod stages;
mod unaddressed;

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use serde_json::Value;

pub(crate) use context::subject_of;
pub use context::{ConnCtx, direction_str, now_us};
use stages::{Seen, decision_and_rules};

use crate::{
    archive::service::Archive,
    mcp::{
        jsonrpc::{self, Kind},
        session::{SessionKey, Sessions},
    },
    policy::{Direction, store::PolicyStore},
};

/// One MCP message on its way through.
#[derive(Debug)]
pub struct Msg {
    pub direction: Direction,
    pub value: Value,
    pub session: SessionKey,
    pub mcp_session_id: Option<String>,
    /// The message's text as received, when it came alone (one message per body or event):
    /// recorded as is when nothing was masked, saving a serialisation.
    pub raw: Option<Bytes>,
    /// The client request whose response stream carries this (server→client) message.
    pub origin: Option<Origin>,
}

/// The request a response stream answers: what the messages on it belong to.
#[derive(Debug, Clone)]
pub struct Origin {
    pub method: String,
    pub tool: Option<String>,
}

/// What a message belongs to (see [`Pipeline::correlate`]).
struct Scope {
    method: Option<String>,
    tool: Option<String>,
    latency_us: Option<u64>,
    known: bool,
}

/// The task id of a `tools/call` result that started a task: `result.task.taskId`
/// (2025-11-25), or a flat `result.taskId` with `resultType = "task"` (the 2026-07-28 tasks
/// extension).
fn started_task(value: &Value) -> Option<&str> {
    let result = value.get("result")?;
    if let Some(id) = result.get("task").and_then(|t| t.get("taskId")) {
        return id.as_str();
    }
    (result.get("resultType")?.as_str()? == "task")
        .then(|| result.get("taskId")?.as_str())
        .flatten()
}

/// What to do with a message.
#[derive(Debug)]
pub enum Outcome {
    /// Forward `value` (rewritten when `changed`). `original_args` are the `tools/call`
    /// arguments before masking (to keep mirrored headers in step); `kind` is what the
    /// message is.
    Forward {
        value: Value,
        changed: bool,
        original_args: Option<Value>,
        kind: Kind,
    },
    /// Do not forward; answer the sender with this (a JSON-RPC error response).
    Answer(Value),
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("the archive cannot record this message: {0}")]
    Archive(String),
    #[error("not a valid JSON-RPC message: {0}")]
    Invalid(String),
}

/// The stages, shared by every connection.
pub struct Pipeline {
    pub policies: Arc<PolicyStore>,
    pub archive: Archive,
    pub sessions: Arc<Sessions>,
    pub host: String,
    pub counters: PipelineCounters,
    /// Where pending approvals are announced (`approval_webhook`), from the agent's own
    /// (tagged) sockets.
    pub webhook: Option<(http::Uri, Arc<crate::kernel::OwnSockets>)>,
    /// First-seen tool definitions (`state_dir/tool-pins.json`) and what a change does.
    pub pins: Arc<Mutex<crate::policy::pins::ToolPins>>,
    /// Wakes the task that saves the pins (off the request path, batched).
    pub pins_dirty: Arc<tokio::sync::Notify>,
    /// How many times that task wrote the pins file.
    pub pin_saves: Arc<AtomicU64>,
    pub tool_changes: crate::config::ToolChanges,
    /// Brokered upstream credentials by backend name (`credentials_file`).
    pub credentials: std::collections::HashMap<String, crate::policy::credentials::Credentials>,
    /// Calls held for a human decision (`airlock approvals`), and the signal that one was
    /// decided.
    pub approvals: Mutex<crate::policy::approvals::Approvals>,
    pub approval_decided: tokio::sync::Notify,
    /// Open legacy (2024-11-05) `/sse` streams by session: where Airlock puts its own answers
    /// to POSTs it refused, since that transport answers every POST on the stream.
    pub legacy_streams:
        Mutex<std::collections::HashMap<SessionKey, tokio::sync::mpsc::Sender<Value>>>,
}

#[derive(Debug, Default)]
pub struct PipelineCounters {
    pub messages: AtomicU64,
    pub blocked: AtomicU64,
    pub masked_values: AtomicU64,
    pub malformed: AtomicU64,
    /// Requests refused for their id: already waiting in the session, or the session full.
    pub protocol_refused: AtomicU64,
    /// HTTP requests refused before any message was read (Host, size, encoding, limits).
    pub refused_requests: AtomicU64,
    /// Server answers not passed on (content type, encoding, not JSON-RPC, bad events).
    pub refused_answers: AtomicU64,
}

impl Pipeline {
    /// Run one message through the stages: correlate (responses get their request's method,
    /// tool and latency), take a request's id, policy and masking, a listing's hidden tools,
    /// the refusal (an approval waits there), the record, and Airlock's own answer when the
    /// message is refused. See [`stages`].
    pub async fn process(&self, ctx: &ConnCtx, msg: Msg) -> Result<Outcome, PipelineError> {
        self.process_into(ctx, msg, None).await
    }

    /// [`Pipeline::process`], but a forwarded message's record is added to `batch` instead of
    /// being written: the caller writes the batch ([`Pipeline::record_batch`]) before it
    /// forwards any of its messages (a stream's events judged together: one write, not one
    /// per event). A refused message's records are written at once, after what `batch` holds.
    pub async fn process_into(
        &self,
        ctx: &ConnCtx,
        msg: Msg,
        mut batch: Option<&mut Vec<crate::archive::RecordInput>>,
    ) -> Result<Outcome, PipelineError> {
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        let Msg {
            direction,
            mut value,
            session,
            mcp_session_id,
            raw,
            origin,
        } = msg;
        // Callers hand over validated messages only; a message that is not is refused here too.
        let kind = jsonrpc::validate(&value).map_err(|e| PipelineError::Invalid(e.0))?;
        let id_text = jsonrpc::id_text(&value);
        let scope = self.correlate(
            kind,
            direction,
            &value,
            (&session, &ctx.backend),
            id_text.as_deref(),
            origin,
        );
        let seen = Seen {
            kind,
            direction,
            id_text,
            scope,
            mcp_session_id,
        };
        self.remember_initialize(&session, &seen, &value);
        // The id is given back if the request is not forwarded (the guard is kept only when
        // it is). A cancellation does not free its request's id: the server may read the id
        // otherwise (1.0 for 1) and go on with the request; the id stays taken until its
        // answer comes or the session ends.
        let (mut reserved, protocol_refusal) = self.reserve_id(ctx, &session, &seen);
        let judged = self.judge(ctx, &seen, &mut value);
        let hidden = self
            .filter_listing(ctx, &seen, &mut value, &judged.set)
            .await?;
        self.note_task(ctx, &seen, &value);
        let masked = judged.masking.total();
        if masked > 0 {
            self.counters
                .masked_values
                .fetch_add(masked as u64, Ordering::Relaxed);
        }
        let (refusal, approved) = match protocol_refusal {
            Some(r) => (Some(r), false),
            None => self.refusal(ctx, &seen, &value, &judged).await?,
        };
        // Refused: the id it took is free again now, before the records are written (a
        // duplicate of a waiting one took none).
        if refusal.is_some() {
            drop(reserved.take());
            // Its records follow those of the messages before it.
            if let Some(b) = batch.take() {
                self.record_batch(b).await?;
            }
        }
        let (decision, rules) = decision_and_rules(&judged, refusal.as_ref(), approved, &hidden);
        let changed = masked > 0 || !hidden.is_empty();
        // Not recorded: not forwarded either, and `reserved` gives the id back.
        self.record_message(
            ctx,
            &seen,
            &judged,
            (decision, rules.clone()),
            (&value, raw, changed),
            batch,
        )
        .await?;
        if let Some(refusal) = refusal {
            return self
                .answer(ctx, seen, refusal, rules, (&judged.set, &value))
                .await;
        }
        // Forwarded: the id stays taken until the answer comes.
        if let Some(r) = reserved {
            r.keep();
        }
        Ok(Outcome::Forward {
            value,
            changed,
            original_args: judged.original_args,
            kind,
        })
    }

    /// Write the records [`Pipeline::process_into`] left in `batch`, in order, with one write
    /// (group recording). `Err`: none of them may be forwarded.
    pub async fn record_batch(
        &self,
        batch: &mut Vec<crate::archive::RecordInput>,
    ) -> Result<(), PipelineError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.archive
            .record_all(std::mem::take(batch))
            .await
            .map_err(|e| PipelineError::Archive(e.to_string()))
    }

    /// What a message belongs to: its own method and tool (a request or notification; a
    /// `tasks/*` request takes the tool of the call that started the task), or those of the
    /// request it answers. `known` is false when a server→client message cannot be tied to a
    /// request: then every mask rule applies to it, whatever tools or methods it names.
    fn correlate(
        &self,
        kind: Kind,
        direction: Direction,
        value: &Value,
        (session, backend): (&SessionKey, &str),
        id: Option<&str>,
        origin: Option<Origin>,
    ) -> Scope {
        match kind {
            Kind::Request | Kind::Notification => {
                let method = jsonrpc::method(value).map(str::to_owned);
                let own_tool = jsonrpc::tool(value).map(str::to_owned);
                let is_task = matches!(
                    method.as_deref(),
                    Some("tasks/get" | "tasks/result" | "tasks/cancel" | "tasks/update")
                );
                let task_tool = is_task
                    .then(|| {
                        value
                            .get("params")
                            .and_then(|p| p.get("taskId"))
                            .and_then(Value::as_str)
                            .and_then(|t| self.sessions.task_tool(backend, t))
                    })
                    .flatten();
                let (tool, known) = match (own_tool, task_tool, origin) {
                    (Some(t), _, _) => (Some(t), true),
                    (None, Some(t), _) => (t, true),
                    // A task Airlock did not see start: its answer gets every mask rule.
                    (None, None, _) if is_task => (None, false),
                    // A server's request or notification on the stream of a client's call
                    // belongs to that call.
                    (None, None, Some(o)) if direction == Direction::ServerToClient => {
                        (o.tool, true)
                    }
                    (None, None, _) => (None, direction == Direction::ClientToServer),
                };
                Scope {
                    method,
                    tool,
                    latency_us: None,
                    known,
                }
            }
            Kind::Response | Kind::Error => {
                let request_c2s = direction == Direction::ServerToClient;
                match id.and_then(|id| self.sessions.answer(session, request_c2s, id)) {
                    Some((p, took)) => Scope {
                        method: Some(p.method),
                        tool: p.tool,
                        latency_us: Some(took.as_micros() as u64),
                        known: true,
                    },
                    None => Scope {
                        method: None,
                        tool: None,
                        latency_us: None,
                        known: false,
                    },
                }
            }
        }
    }
}

fn describe(method: Option<&str>, tool: Option<&str>) -> String {
    match (method, tool) {
        (_, Some(t)) => format!("tools/call `{t}`"),
        (Some(m), None) => format!("`{m}`"),
        (None, None) => "this message".into(),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod tests_process;
