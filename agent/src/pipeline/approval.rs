//! Calls held for a human decision (`airlock approvals`), their record, and the webhook that
//! announces them.

use std::time::Instant;

use bytes::Bytes;
use serde_json::Value;

use super::{ConnCtx, Pipeline, PipelineError};
use crate::{
    archive::{MaskedPayload, RecordDecision, RecordKind},
    policy::Direction,
};

impl Pipeline {
    /// Hold a call until an approver decides (or its time runs out). If the client goes away
    /// meanwhile, the call is withdrawn from the list.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn hold(
        &self,
        ctx: &ConnCtx,
        rule: &str,
        timeout: std::time::Duration,
        digest: String,
        method: String,
        tool: Option<String>,
        arguments: Option<Value>,
    ) -> (u64, crate::policy::approvals::Outcome) {
        use crate::policy::approvals::PendingApproval;
        let a = &ctx.attribution;
        let info = PendingApproval {
            id: 0,
            rule: rule.to_owned(),
            digest,
            method,
            tool,
            arguments,
            user: a.user.clone(),
            uid: a.uid,
            pid: a.tgid,
            exe: a.exe.clone(),
            backend: ctx.backend.clone(),
            requested_at: String::new(),
            expires_in_secs: 0,
        };
        let mut announced = info.clone();
        let id = self
            .approvals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .request(info, timeout, Instant::now());
        if let Some((uri, own)) = self.webhook.clone() {
            announced.id = id;
            announced.expires_in_secs = timeout.as_secs();
            let mut body = serde_json::to_value(&announced).unwrap_or_default();
            body["event"] = "approval_pending".into();
            body["approve_with"] = format!(
                "airlock approvals approve {id} --digest {}",
                announced.digest
            )
            .into();
            tokio::spawn(async move {
                if let Err(e) = post_webhook(&uri, &own, &body).await {
                    tracing::warn!(error = %e, webhook = %crate::config::redacted_url(&uri), "approval webhook failed");
                }
            });
        }
        tracing::info!(id, rule, backend = %ctx.backend, "call held for approval (airlock approvals list)");
        crate::observe::event(crate::observe::AgentEvent::CallHeld {
            approval_id: id,
            rule: rule.to_owned(),
            backend: ctx.backend.clone(),
            method: announced.method.clone(),
            tool: announced.tool.clone(),
            session_id: ctx.session_id.clone(),
            timeout_secs: timeout.as_secs(),
            actor: Box::new(ctx.attribution.clone()),
        });
        struct Withdraw<'a>(&'a Pipeline, u64, bool);
        impl Drop for Withdraw<'_> {
            fn drop(&mut self) {
                if !self.2 {
                    self.0
                        .approvals
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .cancel(self.1);
                }
            }
        }
        let mut guard = Withdraw(self, id, false);
        loop {
            let notified = self.approval_decided.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let outcome = self
                .approvals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take_outcome(id, Instant::now());
            if let Some(o) = outcome {
                guard.2 = true;
                return (id, o);
            }
            tokio::select! {
                _ = notified => {}
                // Expiry is decided by the clock, not by an event.
                _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
            }
        }
    }

    /// The `approval` record: who decided what about which call, and how long it waited.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn record_approval(
        &self,
        ctx: &ConnCtx,
        id: u64,
        rule: &str,
        digest: &str,
        outcome: &crate::policy::approvals::Outcome,
        call: (Option<&str>, Option<&str>, Option<&str>),
        mcp_session_id: Option<String>,
    ) -> Result<(), PipelineError> {
        use crate::policy::approvals::Outcome;
        let (decision, by_uid, waited, reason) = match outcome {
            Outcome::Approved { by_uid, waited } => {
                (RecordDecision::Approved, Some(*by_uid), *waited, None)
            }
            Outcome::Denied {
                by_uid,
                waited,
                reason,
            } => (
                RecordDecision::Denied,
                *by_uid,
                *waited,
                Some(reason.clone()),
            ),
        };
        let mut rec = ctx.record(&self.host, Direction::ClientToServer, RecordKind::Approval);
        rec.mcp_session_id = mcp_session_id;
        rec.method = call.0.map(str::to_owned);
        rec.tool = call.1.map(str::to_owned);
        rec.jsonrpc_id = call.2.map(str::to_owned);
        rec.decision = decision.into();
        rec.rules = vec![rule.to_owned()];
        rec.latency_us = Some(waited.as_micros() as u64);
        rec.payload = Some(MaskedPayload::agent_event(&serde_json::json!({
            "approval_id": id,
            "digest": digest,
            "decision": decision.as_str(),
            "by_uid": by_uid,
            "waited_ms": waited.as_millis() as u64,
            "reason": reason,
        })));
        self.archive
            .record(rec)
            .await
            .map(|_| ())
            .map_err(|e| PipelineError::Archive(e.to_string()))
    }
}

/// POST `body` as JSON to `uri` (http or https, system roots), from a socket tagged as the
/// agent's own, within 5 s.
async fn post_webhook(
    uri: &http::Uri,
    own: &crate::kernel::OwnSockets,
    body: &Value,
) -> Result<(), WebhookError> {
    let tls = crate::egress::tls::system_client(&[])?;
    crate::egress::post_json(
        uri,
        own,
        Bytes::from(body.to_string()),
        tls,
        None,
        std::time::Duration::from_secs(5),
    )
    .await?;
    Ok(())
}

/// Why the approval webhook could not be told of a held call.
#[derive(Debug, thiserror::Error)]
enum WebhookError {
    #[error(transparent)]
    Tls(#[from] crate::egress::tls::TlsClientError),
    #[error(transparent)]
    Post(#[from] crate::egress::PostError),
}
