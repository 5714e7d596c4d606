//! The stages of [`Pipeline::process`] after correlation, in the order they run: the
//! session learns from `initialize` ([`Pipeline::remember_initialize`]), a request's id is
//! taken ([`Pipeline::reserve_id`]), policy and masking ([`Pipeline::judge`]), a listing's
//! hidden tools and pins ([`Pipeline::filter_listing`]), a task's tool
//! ([`Pipeline::note_task`]), the refusal if any ([`Pipeline::refusal`], an approval waits
//! there), the record ([`Pipeline::record_message`]) and Airlock's own answer to a refused
//! message ([`Pipeline::answer`]).

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde_json::Value;

use super::{
    ConnCtx, Outcome, Pipeline, PipelineError, Scope,
    context::message_kind,
    describe,
    rules::{acting_rules, rule},
    started_task,
};
use crate::{
    archive::{MaskedPayload, RecordDecision, RecordKind},
    mcp::{
        jsonrpc::{self, Kind, code},
        session::{ExpectError, Pending, Reservation, SessionKey},
    },
    policy::{self, Decision, Direction, Masking, PolicySet, RecordLevel, Verdict},
};

/// What the stages know of a message once it is correlated.
pub(super) struct Seen {
    pub(super) kind: Kind,
    pub(super) direction: Direction,
    /// The JSON-RPC id as JSON text.
    pub(super) id_text: Option<String>,
    pub(super) scope: Scope,
    pub(super) mcp_session_id: Option<String>,
}

impl Seen {
    fn c2s(&self) -> bool {
        self.direction == Direction::ClientToServer
    }

    fn method(&self) -> Option<&str> {
        self.scope.method.as_deref()
    }

    fn tool(&self) -> Option<&str> {
        self.scope.tool.as_deref()
    }
}

/// The policy's word on a message, and what masking did to it.
pub(super) struct Judged {
    pub(super) set: Arc<PolicySet>,
    decision: Decision,
    /// What an approval is bound to: the call as the client sent it (approve verdicts only).
    approval_digest: Option<String>,
    /// The `tools/call` arguments before masking (when a mask rule matched).
    pub(super) original_args: Option<Value>,
    pub(super) masking: Masking,
}

/// Airlock refuses a message: its JSON-RPC error, the record's decision and the rule behind
/// it.
pub(super) struct Refusal {
    code: i64,
    message: String,
    decision: RecordDecision,
    rule: String,
}

impl Pipeline {
    /// An `initialize` request: the session keeps its protocol version and `clientInfo`.
    pub(super) fn remember_initialize(&self, session: &SessionKey, seen: &Seen, value: &Value) {
        if seen.method() != Some("initialize") || seen.kind != Kind::Request {
            return;
        }
        let params = value.get("params");
        let version = params
            .and_then(|p| p.get("protocolVersion"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let client_info = params.and_then(|p| p.get("clientInfo")).cloned();
        self.sessions.set_info(session, |i| {
            i.protocol_version = version;
            i.client_info = client_info;
        });
    }

    /// A request's id must be free in its session: it is taken now, before anything can wait
    /// (an approval), and given back when the guard returned is dropped (the request is not
    /// forwarded). A client's request whose id cannot be taken (already waiting, or a bound
    /// reached) is refused; a server reusing an id is not (the request that had it keeps its
    /// entry).
    pub(super) fn reserve_id<'a>(
        &'a self,
        ctx: &ConnCtx,
        session: &'a SessionKey,
        seen: &Seen,
    ) -> (Option<Reservation<'a>>, Option<Refusal>) {
        if seen.kind != Kind::Request {
            return (None, None);
        }
        let (Some(id), Some(method)) = (&seen.id_text, &seen.scope.method) else {
            return (None, None);
        };
        let pending = Pending {
            method: method.clone(),
            tool: seen.scope.tool.clone(),
            started: Instant::now(),
            uid: ctx.attribution.uid,
        };
        match self
            .sessions
            .reserve(session, seen.c2s(), id.clone(), pending)
        {
            Ok(r) => (Some(r), None),
            Err(e) if seen.c2s() => {
                self.counters
                    .protocol_refused
                    .fetch_add(1, Ordering::Relaxed);
                let (code, rule) = match e {
                    ExpectError::Duplicate => (code::INVALID_REQUEST, rule::DUPLICATE_ID),
                    ExpectError::Full | ExpectError::UidFull | ExpectError::TableFull => {
                        (code::UNAVAILABLE, rule::PENDING_FULL)
                    }
                };
                let refusal = Refusal {
                    code,
                    message: format!("Airlock: {e}"),
                    decision: RecordDecision::Block,
                    rule: rule.to_owned(),
                };
                (None, Some(refusal))
            }
            Err(_) => (None, None),
        }
    }

    /// Policy: the current set's decision on the message (every mask rule applies when its
    /// scope is unknown), then masking, in place. An approval is bound to the exact call, as
    /// the client sent it: its digest is taken before masking.
    pub(super) fn judge(&self, ctx: &ConnCtx, seen: &Seen, value: &mut Value) -> Judged {
        let set = self.policies.current();
        let arguments = value
            .get("params")
            .and_then(|p| p.get("arguments"))
            .filter(|_| seen.kind == Kind::Request || seen.kind == Kind::Notification);
        let decision = set.decide(
            &ctx.subject,
            &policy::Message {
                backend: &ctx.backend,
                direction: seen.direction,
                method: seen.method(),
                tool: seen.tool(),
                arguments,
                is_call: seen.c2s() && matches!(seen.kind, Kind::Request | Kind::Notification),
                scope_unknown: !seen.scope.known,
            },
        );
        let approval_digest = matches!(decision.verdict, Verdict::Approve { .. }).then(|| {
            crate::policy::approvals::call_digest(
                seen.method().unwrap_or(""),
                seen.tool(),
                arguments,
            )
        });
        let original_args = if decision.masks_anything() {
            arguments.cloned()
        } else {
            None
        };
        // With no mask rule this masks nothing, at no cost; the `Masking` it gives is what
        // lets the message's text be archived ([`Masking::payload`]).
        let masking = set.mask(&decision, value);
        Judged {
            set,
            decision,
            approval_digest,
            original_args,
            masking,
        }
    }

    /// Consistent listing: a tool every call of which this caller would be refused is not
    /// listed to it either, nor (with `tool_changes = "block"`) a tool whose definition
    /// changed since it was pinned. A listing is recognised by its shape, whatever request it
    /// claims to answer. Every listed tool is checked against its pin; a change is alerted and
    /// recorded. The tools taken out, and the rule that hid each one.
    pub(super) async fn filter_listing(
        &self,
        ctx: &ConnCtx,
        seen: &Seen,
        value: &mut Value,
        set: &PolicySet,
    ) -> Result<Vec<(String, String)>, PipelineError> {
        let mut hidden: Vec<(String, String)> = Vec::new();
        let mut pin_alerts: Vec<(String, String, String)> = Vec::new();
        let mut pins_touched = false;
        if seen.kind == Kind::Response
            && seen.direction == Direction::ServerToClient
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
        for (name, pinned, seen_now) in pin_alerts {
            self.record_pin_alert(ctx, seen, set, name, pinned, seen_now)
                .await?;
        }
        Ok(hidden)
    }

    /// A tool's definition changed since it was pinned: logged, announced, and recorded (an
    /// `error` row, decided `block` or `allow` per `tool_changes`).
    async fn record_pin_alert(
        &self,
        ctx: &ConnCtx,
        seen: &Seen,
        set: &PolicySet,
        name: String,
        pinned: String,
        seen_now: String,
    ) -> Result<(), PipelineError> {
        tracing::warn!(backend = %ctx.backend, tool = %name, "a tool's definition changed since it was pinned");
        crate::observe::event(crate::observe::AgentEvent::ToolDefinitionChanged {
            backend: ctx.backend.clone(),
            tool: name.clone(),
            pinned: pinned.clone(),
            seen: seen_now.clone(),
        });
        let mut rec = ctx.record(&self.host, seen.direction, RecordKind::Error);
        rec.mcp_session_id = seen.mcp_session_id.clone();
        rec.method = Some("tools/list".into());
        rec.tool = Some(name.clone());
        rec.decision = match self.tool_changes {
            crate::config::ToolChanges::Block => RecordDecision::Block.into(),
            crate::config::ToolChanges::Alert => RecordDecision::Allow.into(),
        };
        rec.policy_hash = Some(set.hash.clone());
        rec.payload = Some(MaskedPayload::agent_event(&serde_json::json!({
            "alert": "tool_definition_changed",
            "backend": ctx.backend,
            "tool": name,
            "pinned": pinned,
            "seen": seen_now,
            "accept_with": format!("airlock tools accept {} {}", ctx.backend, name),
        })));
        self.archive
            .record(rec)
            .await
            .map_err(|e| PipelineError::Archive(e.to_string()))?;
        Ok(())
    }

    /// A `tools/call` answered with a task: its later results keep the call's tool.
    pub(super) fn note_task(&self, ctx: &ConnCtx, seen: &Seen, value: &Value) {
        if seen.kind == Kind::Response
            && seen.direction == Direction::ServerToClient
            && seen.method() == Some("tools/call")
            && let Some(task_id) = started_task(value)
        {
            self.sessions
                .task_started(&ctx.backend, task_id, seen.scope.tool.clone());
        }
    }

    /// Whether Airlock refuses the message (its id aside, see [`Pipeline::reserve_id`]), and
    /// whether a human approved it: a tool whose definition changed since it was pinned is
    /// refused until accepted; then the verdict: a block, or an approve rule (a notification
    /// cannot wait for a decision, nothing answers it: refused; a request waits for one).
    pub(super) async fn refusal(
        &self,
        ctx: &ConnCtx,
        seen: &Seen,
        value: &Value,
        judged: &Judged,
    ) -> Result<(Option<Refusal>, bool), PipelineError> {
        let changed_tool = seen.kind == Kind::Request
            && seen.c2s()
            && self.tool_changes == crate::config::ToolChanges::Block
            && seen.tool().is_some_and(|t| {
                self.pins
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_changed(&ctx.backend, t)
            });
        let refused = |code, message, rule: &str| Refusal {
            code,
            message,
            decision: RecordDecision::Block,
            rule: rule.to_owned(),
        };
        let refusal = if changed_tool {
            let tool = seen.tool().unwrap_or("");
            refused(
                code::BLOCKED,
                format!(
                    "tool `{tool}` of backend `{}` changed its definition since it was first seen; an operator must accept it (airlock tools accept {} {tool})",
                    ctx.backend, ctx.backend
                ),
                rule::TOOL_CHANGED,
            )
        } else {
            match &judged.decision.verdict {
                Verdict::Allow => return Ok((None, false)),
                Verdict::Block { rule } => refused(
                    code::BLOCKED,
                    format!(
                        "{} blocked by Airlock policy rule `{rule}`",
                        describe(seen.method(), seen.tool())
                    ),
                    rule,
                ),
                Verdict::Approve { rule, .. } if seen.kind != Kind::Request => refused(
                    code::BLOCKED,
                    format!(
                        "{} needs approval (Airlock policy rule `{rule}`) and was sent as a notification",
                        describe(seen.method(), seen.tool())
                    ),
                    rule,
                ),
                Verdict::Approve { rule, timeout } => {
                    return self
                        .await_approval(ctx, seen, value, judged, (rule, *timeout))
                        .await;
                }
            }
        };
        Ok((Some(refusal), false))
    }

    /// A request held until a human decides (`airlock approvals`), at most `timeout`; the
    /// decision is recorded. Approved, it goes on; denied (or not decided in time), refused.
    async fn await_approval(
        &self,
        ctx: &ConnCtx,
        seen: &Seen,
        value: &Value,
        judged: &Judged,
        (rule, timeout): (&str, Duration),
    ) -> Result<(Option<Refusal>, bool), PipelineError> {
        let args = value
            .get("params")
            .and_then(|p| p.get("arguments"))
            .cloned();
        let (id, outcome) = self
            .hold(
                ctx,
                rule,
                timeout,
                judged.approval_digest.clone().unwrap_or_default(),
                seen.scope.method.clone().unwrap_or_default(),
                seen.scope.tool.clone(),
                args,
            )
            .await;
        self.record_approval(
            ctx,
            id,
            rule,
            judged.approval_digest.as_deref().unwrap_or(""),
            &outcome,
            (seen.method(), seen.tool(), seen.id_text.as_deref()),
            seen.mcp_session_id.clone(),
        )
        .await?;
        Ok(match outcome {
            crate::policy::approvals::Outcome::Approved { .. } => (None, true),
            crate::policy::approvals::Outcome::Denied { reason, .. } => {
                let refusal = Refusal {
                    code: code::DENIED,
                    message: format!(
                        "{} was not approved (Airlock policy rule `{rule}`): {reason}",
                        describe(seen.method(), seen.tool())
                    ),
                    decision: RecordDecision::Denied,
                    rule: rule.to_owned(),
                };
                (Some(refusal), false)
            }
        })
    }

    /// The message's record, written before anything is forwarded (fail closed: `Err` when
    /// the archive cannot take it), or added to the caller's `batch`, which it writes before
    /// forwarding. Its payload, at the `full` level: the text as received
    /// when nothing changed, else the message as forwarded. At the `off` level, the observers
    /// alone see it.
    pub(super) async fn record_message(
        &self,
        ctx: &ConnCtx,
        seen: &Seen,
        judged: &Judged,
        (decision, rules): (RecordDecision, Vec<String>),
        (value, raw, changed): (&Value, Option<Bytes>, bool),
        batch: Option<&mut Vec<crate::archive::RecordInput>>,
    ) -> Result<(), PipelineError> {
        let mut record = ctx.record(&self.host, seen.direction, message_kind(seen.kind));
        record.mcp_session_id = seen.mcp_session_id.clone();
        record.method = seen.scope.method.clone();
        record.tool = seen.scope.tool.clone();
        record.jsonrpc_id = seen.id_text.clone();
        record.latency_us = seen.scope.latency_us;
        record.rules = rules;
        record.policy_hash = Some(judged.set.hash.clone());
        record.masked_detectors = judged.masking.detectors();
        record.decision = decision.into();
        let level = judged.decision.record;
        if level == RecordLevel::Full {
            let received = raw
                .as_deref()
                .filter(|_| !changed)
                .and_then(|r| std::str::from_utf8(r).ok());
            record.payload = Some(judged.masking.payload(value, received));
        }
        if level == RecordLevel::Off {
            crate::observe::record(&record);
        } else if let Some(batch) = batch {
            batch.push(record);
        } else if let Err(e) = self.archive.record(record).await {
            return Err(PipelineError::Archive(e.to_string()));
        }
        Ok(())
    }

    /// Airlock's own answer to a refused message: a JSON-RPC error to its sender, counted and
    /// recorded (an `error` row the other way, naming the same rules).
    pub(super) async fn answer(
        &self,
        ctx: &ConnCtx,
        seen: Seen,
        refusal: Refusal,
        rules: Vec<String>,
        (set, value): (&PolicySet, &Value),
    ) -> Result<Outcome, PipelineError> {
        self.counters.blocked.fetch_add(1, Ordering::Relaxed);
        let answer =
            jsonrpc::error_response(jsonrpc::id(value), refusal.code, &refusal.message, None);
        let mut rec = ctx.record(&self.host, seen.direction.reverse(), RecordKind::Error);
        rec.mcp_session_id = seen.mcp_session_id;
        rec.method = seen.scope.method;
        rec.tool = seen.scope.tool;
        rec.jsonrpc_id = seen.id_text;
        rec.decision = refusal.decision.into();
        rec.rules = rules;
        rec.policy_hash = Some(set.hash.clone());
        rec.payload = Some(MaskedPayload::agent_event(&answer));
        self.archive
            .record(rec)
            .await
            .map_err(|e| PipelineError::Archive(e.to_string()))?;
        Ok(Outcome::Answer(answer))
    }
}

/// The record's decision, and the rules it names (the rule behind a refusal or an approval
/// first, see [`acting_rules`]).
pub(super) fn decision_and_rules(
    judged: &Judged,
    refusal: Option<&Refusal>,
    approved: bool,
    hidden: &[(String, String)],
) -> (RecordDecision, Vec<String>) {
    let decision = match refusal {
        Some(r) => r.decision,
        None if approved => RecordDecision::Approved,
        None if judged.masking.total() > 0 => RecordDecision::Mask,
        // A listing with tools hidden by a block rule.
        None if !hidden.is_empty() => RecordDecision::Block,
        None => RecordDecision::Allow,
    };
    let verdict_rule = judged.decision.verdict_rule.as_deref();
    let deciding = match refusal {
        Some(r) => Some(r.rule.as_str()),
        None if approved => verdict_rule,
        None => None,
    };
    let rules = acting_rules(deciding, verdict_rule, &judged.masking, hidden);
    (decision, rules)
}
