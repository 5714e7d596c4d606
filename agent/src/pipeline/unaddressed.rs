//! Masking and records of what is not an MCP message: a mirrored header, an error body, a
//! connection's command line, an HTTP exchange, a refusal. Nothing ties these to a request, so
//! every mask rule that applies to the caller and backend applies.

use std::sync::{Arc, atomic::Ordering};

use serde_json::Value;

use super::{ConnCtx, Pipeline, PipelineError};
use crate::{
    archive::{MaskedPayload, RecordDecision, RecordKind},
    policy::{self, Direction, MaskCounts, Subject},
};

impl Pipeline {
    /// The policy set in force and its decision for something that is not an MCP message
    /// (no method or tool): which mask rules apply to this caller and backend.
    fn unaddressed(
        &self,
        subject: &Subject,
        backend: &str,
        direction: Direction,
    ) -> (Arc<crate::policy::PolicySet>, crate::policy::Decision) {
        let set = self.policies.current();
        let decision = set.decide(
            subject,
            &policy::Message {
                backend,
                direction,
                method: None,
                tool: None,
                arguments: None,
                is_call: false,
                // Nothing ties it to a request: every mask rule applies.
                scope_unknown: true,
            },
        );
        (set, decision)
    }

    /// Mask one string with the rules that apply to `ctx` (a mirrored header, a query string).
    pub fn mask_str(&self, ctx: &ConnCtx, direction: Direction, text: &str) -> Option<String> {
        let (set, decision) = self.unaddressed(&ctx.subject, &ctx.backend, direction);
        set.mask_str(&decision, text, &mut MaskCounts::new())
    }

    /// Mask a JSON document that is not an MCP message (an error body) with every mask rule
    /// that applies to this caller and backend; how many values were masked.
    pub fn mask_value(&self, ctx: &ConnCtx, direction: Direction, value: &mut Value) -> u32 {
        let (set, decision) = self.unaddressed(&ctx.subject, &ctx.backend, direction);
        let n = set.mask(&decision, value).total();
        if n > 0 {
            self.counters
                .masked_values
                .fetch_add(u64::from(n), Ordering::Relaxed);
        }
        n
    }

    /// Mask an event the agent writes about a connection (its command line can hold secrets:
    /// `--token=…`), with the mask rules that apply to this caller and backend.
    pub fn mask_event(&self, subject: &Subject, backend: &str, event: Value) -> MaskedPayload {
        let (set, d) = self.unaddressed(subject, backend, Direction::ClientToServer);
        set.mask_payload(&d, event).0
    }

    /// Record something that is not an MCP message (an HTTP exchange, a malformed body, an
    /// upstream failure); `details` is masked like a message before it is written.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_event(
        &self,
        ctx: &ConnCtx,
        direction: Direction,
        kind: RecordKind,
        decision: RecordDecision,
        details: Value,
        latency_us: Option<u64>,
        mcp_session_id: Option<String>,
    ) -> Result<(), PipelineError> {
        let (set, d) = self.unaddressed(&ctx.subject, &ctx.backend, direction);
        let (payload, masking) = set.mask_payload(&d, details);
        let mut rec = ctx.record(&self.host, direction, kind);
        rec.decision = decision.into();
        rec.latency_us = latency_us;
        rec.mcp_session_id = mcp_session_id;
        rec.policy_hash = Some(set.hash.clone());
        // The rules that masked something: an event about this record names them.
        rec.rules = masking.rules().to_vec();
        rec.masked_detectors = masking.detectors();
        rec.payload = Some(payload);
        self.archive
            .record(rec)
            .await
            .map(|_| ())
            .map_err(|e| PipelineError::Archive(e.to_string()))
    }
}
