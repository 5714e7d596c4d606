//! Why a connection is refused before it is served, and the one way every refusal leaves:
//! counted, listed in the registry, logged, recorded in the archive and evented — the same
//! for each reason — and the client reset.

use std::{net::SocketAddr, sync::atomic::AtomicU64};

use tokio::net::TcpStream;
use tracing::warn;

use super::state::{AgentCounters, DialError, Proxy};
use crate::{
    archive::MaskedPayload,
    attribution::Attribution,
    registry::{ConnGuard, ConnState},
};

/// A connection refused before it was served.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// Not redirected by Airlock's programs (or its record was lost): never an open proxy.
    #[error(
        "no kernel record for this connection: only connections redirected by Airlock are served"
    )]
    Unattributed,
    /// The kernel's record predates this agent's listeners: a connection refused while no
    /// agent listened, whose 4-tuple a later one reused.
    #[error(
        "stale kernel record: made before this agent listened (a refused connection's 4-tuple, reused)"
    )]
    Stale,
    /// Reading the caller's attribution failed.
    #[error("attribution failed: {0}")]
    Attribution(String),
    /// More live connections than `max_connections`, or than the uid may have.
    #[error("over capacity: {0}")]
    OverCapacity(String),
    /// The backend (or egress proxy) could not be reached.
    #[error("upstream unreachable: {0}")]
    Upstream(#[from] DialError),
    /// The archive could not record the connection's opening (group or strict recording).
    #[error("archive unavailable: {0}")]
    Archive(String),
}

impl Refusal {
    /// The rule records and events name (`policy.uid`).
    pub fn rule(&self) -> &'static str {
        match self {
            Refusal::Unattributed => "airlock:unattributed",
            Refusal::Stale => "airlock:stale_record",
            Refusal::Attribution(_) => "airlock:attribution_failed",
            Refusal::OverCapacity(_) => "airlock:over_capacity",
            Refusal::Upstream(_) => "airlock:upstream_unreachable",
            Refusal::Archive(_) => "airlock:archive_unavailable",
        }
    }

    fn counter<'a>(&self, c: &'a AgentCounters) -> &'a AtomicU64 {
        match self {
            Refusal::Unattributed => &c.rejected_unattributed,
            Refusal::Stale => &c.rejected_stale,
            Refusal::Attribution(_) => &c.rejected_attribution,
            Refusal::OverCapacity(_) => &c.rejected_over_capacity,
            Refusal::Upstream(_) => &c.upstream_failed,
            Refusal::Archive(_) => &c.rejected_archive,
        }
    }

    /// A backend that cannot be reached is a failure; the rest are refusals.
    fn state(&self) -> ConnState {
        match self {
            Refusal::Upstream(_) => ConnState::Failed,
            _ => ConnState::Rejected,
        }
    }
}

/// Who a refused connection was, as far as it got.
pub(crate) struct Refused<'a> {
    pub client: TcpStream,
    pub peer: SocketAddr,
    pub attribution: Option<&'a Attribution>,
    /// Its entry in the registry, once it has one.
    pub guard: Option<ConnGuard>,
    /// The backend (`proxy NAME` for an egress proxy) the kernel matched.
    pub backend: Option<&'a str>,
}

impl Proxy {
    /// The one exit of a refused connection.
    pub(crate) async fn refuse(&self, who: Refused<'_>, refusal: Refusal) {
        use std::sync::atomic::Ordering::Relaxed;
        refusal.counter(&self.counters).fetch_add(1, Relaxed);
        let reason = refusal.to_string();
        let rule = refusal.rule();
        let guard = who.guard.unwrap_or_else(|| {
            self.registry.open(
                who.peer,
                who.attribution.cloned(),
                who.backend.map(str::to_owned),
            )
        });
        tracing::Span::current().record("id", guard.id());
        warn!(id = guard.id(), client = %who.peer, uid = who.attribution.map(|a| a.uid), rule, %reason, "refused a connection");
        crate::observe::event(crate::observe::AgentEvent::ConnectionRejected {
            rule: rule.to_owned(),
            reason: reason.clone(),
            client: who.peer.to_string(),
            destination: who.attribution.map(|a| a.original_dst.to_string()),
            actor: who.attribution.map(|a| Box::new(a.clone())),
        });
        let mut record = self.connection_record(guard.id(), 0, who.attribution, who.backend);
        record.decision = crate::archive::RecordDecision::Block.into();
        record.rules = vec![rule.to_owned()];
        record.payload = Some(MaskedPayload::agent_event(&serde_json::json!({
            "event": "rejected",
            "client": who.peer.to_string(),
            "reason": reason,
        })));
        guard.finish(refusal.state(), reason);
        reset(who.client);
        if let Err(e) = self.archive.record(record).await {
            warn!(error = %e, rule, "cannot archive a refused connection");
        }
    }
}

/// Close with a RST so the client sees a failure at once rather than a clean empty response.
pub(crate) fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
