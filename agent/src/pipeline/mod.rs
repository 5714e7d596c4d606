//! The message pipeline: every MCP message, whichever transport carried it, becomes a
//! [`Msg`] that goes through one policy stage (pass, rewrite, or answer instead of
//! forwarding) and then one record sink (the archive), before anything is forwarded.
//!
//! ```text
//!   http/ (POST body, JSON answer, SSE event)
//!       └─▶ Pipeline::process(ctx, msg)
//!             1. correlate   responses get their request's method, tool and latency
//!             2. policy      PolicySet::decide + mask (inline, both directions)
//!             3. record      archive row (strict: durable before we return)
//!       ◀── Outcome::Forward(value) | Outcome::Answer(error)
//! ```
//!
//! Fail closed: when the record cannot be written in strict mode the caller gets an error and
//! refuses the message rather than forwarding it unrecorded.
//!
//! Files: this one (the stages), [`context`] (what a connection's messages share),
//! [`approval`] (held calls and the approval webhook), [`rules`] (which rules a record
//! names), [`unaddressed`] (masking and records of what is not an MCP message).

pub(crate) mod approval;
mod context;
mod rules;
mod unaddressed;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use serde_json::Value;

pub(crate) use context::subject_of;
pub use context::{ConnCtx, direction_str, now_us};
use rules::{acting_rules, rule};

use crate::{
    archive::{MaskedPayload, service::Archive},
    mcp::{
        jsonrpc::{self, Kind, code},
        session::{ExpectError, Pending, Reservation, SessionKey, Sessions},
    },
    policy::{self, Direction, Masking, RecordLevel, Verdict, store::PolicyStore},
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
    /// Run one message through policy and record.
    pub async fn process(&self, ctx: &ConnCtx, msg: Msg) -> Result<Outcome, PipelineError> {
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
        let c2s = direction == Direction::ClientToServer;
        let scope = self.correlate(
            kind,
            direction,
            &value,
            (&session, &ctx.backend),
            id_text.as_deref(),
            origin,
        );
        let Scope {
            method,
            tool,
            latency_us,
            known,
        } = scope;
        if method.as_deref() == Some("initialize") && kind == Kind::Request {
            let params = value.get("params");
            let version = params
                .and_then(|p| p.get("protocolVersion"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            let client_info = params.and_then(|p| p.get("clientInfo")).cloned();
            self.sessions.set_info(&session, |i| {
                i.protocol_version = version;
                i.client_info = client_info;
            });
        }
        // A request's id must be free in its session: it is taken now, before anything can
        // wait (an approval), and given back if the request is not forwarded (the guard is
        // kept only when it is).
        let mut protocol_refusal: Option<(i64, String, &'static str)> = None;
        let mut reserved: Option<Reservation<'_>> = None;
        if kind == Kind::Request
            && let (Some(id), Some(m)) = (&id_text, &method)
        {
            let pending = Pending {
                method: m.clone(),
                tool: tool.clone(),
                started: Instant::now(),
                uid: ctx.attribution.uid,
            };
            match self.sessions.reserve(&session, c2s, id.clone(), pending) {
                Ok(r) => reserved = Some(r),
                Err(e) if c2s => {
                    self.counters
                        .protocol_refused
                        .fetch_add(1, Ordering::Relaxed);
                    let (code, rule) = match e {
                        ExpectError::Duplicate => (code::INVALID_REQUEST, rule::DUPLICATE_ID),
                        ExpectError::Full | ExpectError::UidFull | ExpectError::TableFull => {
                            (code::UNAVAILABLE, rule::PENDING_FULL)
                        }
                    };
                    protocol_refusal = Some((code, format!("Airlock: {e}"), rule));
                }
                // A server reusing an id: the request that had it keeps its entry.
                Err(_) => {}
            }
        }
        // A cancellation does not free its request's id: the server may read the id otherwise
        // (1.0 for 1) and go on with the request; the id stays taken until its answer comes or
        // the session ends.
        let set = self.policies.current();
        let arguments = value
            .get("params")
            .and_then(|p| p.get("arguments"))
            .filter(|_| kind == Kind::Request || kind == Kind::Notification);
        let decision = set.decide(
            &ctx.subject,
            &policy::Message {
                backend: &ctx.backend,
                direction,
                method: method.as_deref(),
                tool: tool.as_deref(),
                arguments,
                is_call: c2s && matches!(kind, Kind::Request | Kind::Notification),
                scope_unknown: !known,
            },
        );
        // An approval is bound to the exact call, as the client sent it.
        let approval_digest = matches!(decision.verdict, Verdict::Approve { .. }).then(|| {
            crate::policy::approvals::call_digest(
                method.as_deref().unwrap_or(""),
                tool.as_deref(),
                arguments,
            )
        });
        let original_args = if decision.masks_anything() {
            arguments.cloned()
        } else {
            None
        };
        let masking = if decision.masks_anything() {
            set.mask(&decision, &mut value)
        } else {
            Masking::default()
        };
        let masked = masking.total();
        // Consistent listing: a tool every call of which this caller would be refused is not
        // listed to it either. A listing is recognised by its shape, whatever request it
        // claims to answer.
        // The tools taken out of a listing, and the rule that hid each one.
        let mut hidden: Vec<(String, String)> = Vec::new();
        let mut pin_alerts: Vec<(String, String, String)> = Vec::new();
        let mut pins_touched = false;
        if kind == Kind::Response
            && direction == Direction::ServerToClient
            && let Some(tools) = value
                .get_mut("result")
                .and_then(|r| r.get_mut("tools"))
                .and_then(Value::as_array_mut)
        {
            let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
            let block_changed = self.tool_changes == crate::config::ToolChanges::Block;
            tools.retain(|t| {
                let name = t.get("name").and_then(Value::as_str).unwrap_or("");
                match pins.check(&ctx.backend, t) {
                    crate::policy::pins::PinCheck::Changed { pinned, seen } => {
                        pin_alerts.push((name.to_owned(), pinned, seen));
                        pins_touched = true;
                    }
                    crate::policy::pins::PinCheck::New => pins_touched = true,
                    crate::policy::pins::PinCheck::Unchanged => {}
                }
                let hidden_by = match set.tool_hidden_by(&ctx.subject, &ctx.backend, name) {
                    Some(rule) => Some(rule),
                    None if block_changed && pins.is_changed(&ctx.backend, name) => {
                        Some(rule::TOOL_CHANGED)
                    }
                    None => None,
                };
                if let Some(rule) = hidden_by {
                    hidden.push((name.to_owned(), rule.to_owned()));
                }
                hidden_by.is_none()
            });
        }
        if pins_touched {
            self.pins_dirty.notify_one();
        }
        for (name, pinned, seen) in pin_alerts {
            tracing::warn!(backend = %ctx.backend, tool = %name, "a tool's definition changed since it was pinned");
            crate::observe::event(crate::observe::AgentEvent::ToolDefinitionChanged {
                backend: ctx.backend.clone(),
                tool: name.clone(),
                pinned: pinned.clone(),
                seen: seen.clone(),
            });
            let mut rec = ctx.record(&self.host, direction, "error");
            rec.mcp_session_id = mcp_session_id.clone();
            rec.method = Some("tools/list".into());
            rec.tool = Some(name.clone());
            rec.decision = match self.tool_changes {
                crate::config::ToolChanges::Block => "block".into(),
                crate::config::ToolChanges::Alert => "allow".into(),
            };
            rec.policy_hash = Some(set.hash.clone());
            rec.payload = Some(MaskedPayload::agent_event(&serde_json::json!({
                "alert": "tool_definition_changed",
                "backend": ctx.backend,
                "tool": name,
                "pinned": pinned,
                "seen": seen,
                "accept_with": format!("airlock tools accept {} {}", ctx.backend, name),
            })));
            self.archive
                .record(rec)
                .await
                .map_err(|e| PipelineError::Archive(e.to_string()))?;
        }
        // A `tools/call` answered with a task: its later results keep the call's tool.
        if kind == Kind::Response
            && direction == Direction::ServerToClient
            && method.as_deref() == Some("tools/call")
            && let Some(task_id) = started_task(&value)
        {
            self.sessions
                .task_started(&ctx.backend, task_id, tool.clone());
        }
        if masked > 0 {
            self.counters
                .masked_values
                .fetch_add(masked as u64, Ordering::Relaxed);
        }
        let mut approved = false;
        // A tool whose definition changed since it was pinned is refused until accepted.
        let changed_tool = kind == Kind::Request
            && c2s
            && self.tool_changes == crate::config::ToolChanges::Block
            && tool.as_deref().is_some_and(|t| {
                self.pins
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_changed(&ctx.backend, t)
            });
        // A refusal: its JSON-RPC error, the record's decision and the rule behind it.
        let refusal = if let Some((code, message, rule)) = protocol_refusal {
            Some((code, message, "block", rule.to_owned()))
        } else if changed_tool {
            Some((
                code::BLOCKED,
                format!(
                    "tool `{}` of backend `{}` changed its definition since it was first seen; an operator must accept it (airlock tools accept {} {})",
                    tool.as_deref().unwrap_or(""),
                    ctx.backend,
                    ctx.backend,
                    tool.as_deref().unwrap_or("")
                ),
                "block",
                rule::TOOL_CHANGED.to_owned(),
            ))
        } else {
            match &decision.verdict {
                Verdict::Allow => None,
                Verdict::Block { rule } => Some((
                    code::BLOCKED,
                    format!(
                        "{} blocked by Airlock policy rule `{rule}`",
                        describe(method.as_deref(), tool.as_deref())
                    ),
                    "block",
                    rule.clone(),
                )),
                // A notification cannot wait for a decision (nothing answers it): refused.
                Verdict::Approve { rule, .. } if kind != Kind::Request => Some((
                    code::BLOCKED,
                    format!(
                        "{} needs approval (Airlock policy rule `{rule}`) and was sent as a notification",
                        describe(method.as_deref(), tool.as_deref())
                    ),
                    "block",
                    rule.clone(),
                )),
                Verdict::Approve { rule, timeout } => {
                    let args = value
                        .get("params")
                        .and_then(|p| p.get("arguments"))
                        .cloned();
                    let (id, outcome) = self
                        .hold(
                            ctx,
                            rule,
                            *timeout,
                            approval_digest.clone().unwrap_or_default(),
                            method.clone().unwrap_or_default(),
                            tool.clone(),
                            args,
                        )
                        .await;
                    self.record_approval(
                        ctx,
                        id,
                        rule,
                        approval_digest.as_deref().unwrap_or(""),
                        &outcome,
                        (method.as_deref(), tool.as_deref(), id_text.as_deref()),
                        mcp_session_id.clone(),
                    )
                    .await?;
                    match outcome {
                        crate::policy::approvals::Outcome::Approved { .. } => {
                            approved = true;
                            None
                        }
                        crate::policy::approvals::Outcome::Denied { reason, .. } => Some((
                            code::DENIED,
                            format!(
                                "{} was not approved (Airlock policy rule `{rule}`): {reason}",
                                describe(method.as_deref(), tool.as_deref())
                            ),
                            "denied",
                            rule.clone(),
                        )),
                    }
                }
            }
        };
        // Refused: the id it took is free again now, before the records are written (a
        // duplicate of a waiting one took none).
        if refusal.is_some() {
            drop(reserved.take());
        }
        let decision_name = match &refusal {
            Some((_, _, d, _)) => *d,
            None if approved => "approved",
            None if masked > 0 => "mask",
            // A listing with tools hidden by a block rule.
            None if !hidden.is_empty() => "block",
            None => "allow",
        };
        // The rule behind a refusal or an approval comes first.
        let deciding = match &refusal {
            Some((_, _, _, rule)) => Some(rule.as_str()),
            None if approved => decision.verdict_rule.as_deref(),
            None => None,
        };
        let rules = acting_rules(
            deciding,
            decision.verdict_rule.as_deref(),
            &masking,
            &hidden,
        );
        let mut record = ctx.record(&self.host, direction, kind.as_str());
        record.mcp_session_id = mcp_session_id.clone();
        record.method = method.clone();
        record.tool = tool.clone();
        record.jsonrpc_id = id_text.clone();
        record.latency_us = latency_us;
        record.rules = rules.clone();
        record.policy_hash = Some(set.hash.clone());
        record.masked_detectors = masking.detectors();
        record.decision = decision_name.into();
        let level = decision.record;
        if level == RecordLevel::Full {
            let text = match raw.as_deref().map(std::str::from_utf8) {
                Some(Ok(t)) if masked == 0 && hidden.is_empty() => t.trim().to_owned(),
                _ => value.to_string(),
            };
            record.payload = Some(MaskedPayload::from_masked(text));
        }
        if level == RecordLevel::Off {
            crate::observe::record(&record);
        } else if let Err(e) = self.archive.record(record).await {
            // Not forwarded: `reserved` gives the id back.
            return Err(PipelineError::Archive(e.to_string()));
        }
        if let Some((code, message, decision_name, _)) = refusal {
            self.counters.blocked.fetch_add(1, Ordering::Relaxed);
            let answer = jsonrpc::error_response(jsonrpc::id(&value), code, &message, None);
            let mut rec = ctx.record(&self.host, direction.reverse(), "error");
            rec.mcp_session_id = mcp_session_id;
            rec.method = method;
            rec.tool = tool;
            rec.jsonrpc_id = id_text;
            rec.decision = decision_name.into();
            rec.rules = rules;
            rec.policy_hash = Some(set.hash.clone());
            rec.payload = Some(MaskedPayload::agent_event(&answer));
            self.archive
                .record(rec)
                .await
                .map_err(|e| PipelineError::Archive(e.to_string()))?;
            return Ok(Outcome::Answer(answer));
        }
        // Forwarded: the id stays taken until the answer comes.
        if let Some(r) = reserved {
            r.keep();
        }
        Ok(Outcome::Forward {
            value,
            changed: masked > 0 || !hidden.is_empty(),
            original_args,
            kind,
        })
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
