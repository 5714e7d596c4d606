//! Prometheus/OpenMetrics metrics: `GET /metrics` on `metrics_listen`, in the Prometheus text
//! format 0.0.4, or OpenMetrics 1.0.0 when the scraper's `Accept` asks for it ([`Format`]).
//!
//! - this file: the families the data path feeds, through the [`crate::observe`] tap
//!   ([`Metrics`] is an observer: per record, an index into counters resolved on first use
//!   and an atomic add — about 40 ns, no allocation, never a wait on I/O; masked values add a
//!   family lookup);
//! - [`collect`]: values read at scrape time (connection and kernel counters, the archive,
//!   pending approvals, shipping);
//! - [`server`]: the HTTP endpoint (hyper, HTTP/1.1, bounded and timed).
//!
//! Labels are bounded: backends by their names in airlock.toml, methods by the MCP
//! specification's names, detectors by the policies (capped), decisions, directions and kinds
//! by the pipeline's fixed sets. Never a user, pid, session, tool, argument or JSON-RPC id:
//! those belong in the archive.

pub mod collect;
pub mod server;
#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock, RwLock};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::{
    archive::RecordInput,
    observe::{AgentEvent, Observer},
};

/// The exposition formats `GET /metrics` answers in, chosen by the scraper's `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0 text (`# UNIT`, `# EOF`; a counter's family has no `_total`).
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (what `promtool check metrics` and most tools read;
    /// HELP and TYPE name a counter with its `_total`).
    Prometheus,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }

    /// The format an `Accept` header asks for (sans-IO; the header is the scraper's, read
    /// leniently): OpenMetrics only when it names `application/openmetrics-text` with a
    /// quality above 0 and not below the best of `text/plain`, `text/*` and `*/*`;
    /// otherwise, and without a header, the Prometheus text format 0.0.4.
    pub fn negotiate<'a>(accept: impl IntoIterator<Item = &'a str>) -> Format {
        let mut openmetrics = 0.0f32;
        let mut text = 0.0f32;
        for range in accept.into_iter().flat_map(|h| h.split(',')) {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut q = 1.0f32;
            for param in parts {
                if let Some((k, v)) = param.split_once('=')
                    && k.trim().eq_ignore_ascii_case("q")
                {
                    // An unreadable quality counts as "not acceptable".
                    q = v
                        .trim()
                        .parse()
                        .ok()
                        .filter(|q: &f32| q.is_finite())
                        .unwrap_or(0.0);
                }
            }
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }
}

pub use crate::config::parse_listen;

/// Shipping's view for the metrics (the `[ship]` uploader implements it); when shipping is
/// off there is none and its gauges are absent.
pub trait ShipStats: Send + Sync + std::fmt::Debug + 'static {
    /// Sealed files not yet uploaded.
    fn backlog_files(&self) -> u64;
    /// Their size.
    fn backlog_bytes(&self) -> u64;
    /// Uploads that failed (each retry counts).
    fn failures(&self) -> u64;
    /// Manifest lines not yet uploaded.
    fn backlog_lines(&self) -> u64;
    /// Seconds the oldest line not yet uploaded has waited (0 when none waits).
    fn oldest_pending_seconds(&self) -> u64;
    /// Objects in the bucket that differ from the local file they should be (never
    /// overwritten: shipping stops there).
    fn conflicts(&self) -> u64;
}

/// Most distinct detector names counted; later ones are counted as `other`.
const MAX_DETECTORS: usize = 64;
/// Longest detector name used as a label value.
const MAX_DETECTOR_LEN: usize = 64;

/// Upper bounds (seconds) of the MCP operation duration buckets.
const OPERATION_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MessageLabels {
    backend: &'static str,
    direction: &'static str,
    kind: &'static str,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DetectorLabels {
    backend: &'static str,
    detector: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BackendLabels {
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HeldLabels {
    backend: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OperationLabels {
    backend: &'static str,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    result: &'static str,
}

type OperationFamily = Family<OperationLabels, Histogram, fn() -> Histogram>;

fn operation_histogram() -> Histogram {
    Histogram::new(OPERATION_BUCKETS)
}

/// The families fed by records and events. Cloning shares them (a family is a handle).
#[derive(Clone)]
pub struct Metrics {
    /// Backend names from airlock.toml, leaked once per agent start (a handful of strings)
    /// so that label sets are `&'static str` and a lookup allocates nothing.
    backends: Arc<[&'static str]>,
    detectors: Arc<RwLock<Vec<&'static str>>>,
    messages: Family<MessageLabels, Counter>,
    /// `messages` by (backend, direction, kind, decision) index.
    message_slots: Arc<Slots<Counter>>,
    /// `operations` by (backend, method) index.
    operation_slots: Arc<Slots<Histogram>>,
    masked: Family<DetectorLabels, Counter>,
    blocked_calls: Family<BackendLabels, Counter>,
    held_calls: Family<HeldLabels, Counter>,
    operations: OperationFamily,
    policy_reloads: Family<ResultLabels, Counter>,
    tool_changes: Family<BackendLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Families for these backends (their names in airlock.toml).
    pub fn new<'a>(backends: impl IntoIterator<Item = &'a str>) -> Metrics {
        let backends: Vec<&'static str> = backends
            .into_iter()
            .map(|b| &*Box::leak(b.to_owned().into_boxed_str()))
            .collect();
        // Backends: those configured, then `other`, then `none`.
        let b = backends.len() + 2;
        let methods = crate::mcp::jsonrpc::REQUEST_METHODS.len() + 1;
        Metrics {
            message_slots: Arc::new(Slots::new(
                b * DIRECTIONS.len() * KINDS.len() * DECISIONS.len(),
            )),
            operation_slots: Arc::new(Slots::new(b * methods)),
            backends: backends.into(),
            detectors: Default::default(),
            messages: Family::default(),
            masked: Family::default(),
            blocked_calls: Family::default(),
            held_calls: Family::default(),
            operations: Family::new_with_constructor(operation_histogram as fn() -> Histogram),
            policy_reloads: Family::default(),
            tool_changes: Family::default(),
        }
    }

    /// A registry with these families, the build info and `collector`'s scrape-time values.
    pub fn registry(&self, collector: Option<collect::AgentCollector>) -> Registry {
        let mut r = Registry::default();
        r.register(
            "airlock_mcp_messages",
            "MCP messages by backend, direction, kind (request, response, notification, error) and decision",
            self.messages.clone(),
        );
        r.register(
            "airlock_mcp_masked_values",
            "Values masked in MCP messages, by the detector that found them",
            self.masked.clone(),
        );
        r.register(
            "airlock_mcp_blocked_calls",
            "Calls (client requests and notifications) refused by a block rule, a changed tool or the protocol checks; one per call",
            self.blocked_calls.clone(),
        );
        r.register(
            "airlock_mcp_held_calls",
            "Calls held for approval, by outcome (approved, denied, timed_out)",
            self.held_calls.clone(),
        );
        r.register_with_unit(
            "airlock_mcp_operation_duration",
            "Time from an MCP request to its answer, by backend and method (methods outside the MCP specification: other)",
            Unit::Seconds,
            self.operations.clone(),
        );
        r.register(
            "airlock_policy_reloads",
            "Policy reloads, by result (applied, refused: the previous policies stay in force)",
            self.policy_reloads.clone(),
        );
        r.register(
            "airlock_tool_definition_changes",
            "Tool definitions that differ from their pin",
            self.tool_changes.clone(),
        );
        r.register_collector(Box::new(collect::BuildInfo));
        if let Some(c) = collector {
            r.register_collector(Box::new(c));
        }
        r
    }

    /// The backend's index: configured ones first, then `other`, then `none`.
    fn backend_index(&self, name: Option<&str>) -> usize {
        let n = self.backends.len();
        match name {
            None => n + 1,
            Some(name) => self.backends.iter().position(|b| *b == name).unwrap_or(n),
        }
    }

    fn backend_name(&self, i: usize) -> &'static str {
        match self.backends.get(i) {
            Some(b) => b,
            None if i == self.backends.len() => "other",
            None => "none",
        }
    }

    fn backend(&self, name: Option<&str>) -> &'static str {
        self.backend_name(self.backend_index(name))
    }

    /// The detector's name as a label value: one of at most [`MAX_DETECTORS`] names.
    fn detector(&self, name: &str) -> &'static str {
        if let Some(d) = self
            .detectors
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|d| **d == name)
        {
            return d;
        }
        if name.len() > MAX_DETECTOR_LEN {
            return "other";
        }
        let mut known = self.detectors.write().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = known.iter().find(|d| **d == name) {
            return d;
        }
        if known.len() >= MAX_DETECTORS {
            return "other";
        }
        let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
        known.push(leaked);
        leaked
    }
}

const DIRECTIONS: [&str; 3] = ["client_to_server", "server_to_client", "other"];
const KINDS: [&str; 4] = ["request", "response", "notification", "error"];
const DECISIONS: [&str; 6] = ["allow", "mask", "block", "approved", "denied", "other"];

/// Index of `value` in `table`, else of its last entry (`other`).
fn index_or_other(table: &[&str], value: &str) -> usize {
    table
        .iter()
        .position(|t| *t == value)
        .unwrap_or(table.len() - 1)
}

/// A method named by the MCP specification (its index in `REQUEST_METHODS`), else `other`
/// (the index past the end): methods are client-chosen.
fn method_index(m: Option<&str>) -> usize {
    let known = crate::mcp::jsonrpc::REQUEST_METHODS;
    m.and_then(|m| known.iter().position(|k| *k == m))
        .unwrap_or(known.len())
}

fn method_name(i: usize) -> &'static str {
    crate::mcp::jsonrpc::REQUEST_METHODS
        .get(i)
        .copied()
        .unwrap_or("other")
}

/// Metrics of a fixed label space, resolved from their family once (on first use, so that
/// a label set never seen is not exported) and then reached by index: no hashing, no lock.
struct Slots<M> {
    slots: Box<[OnceLock<M>]>,
}

impl<M: Clone> Slots<M> {
    fn new(len: usize) -> Slots<M> {
        Slots {
            slots: (0..len).map(|_| OnceLock::new()).collect(),
        }
    }

    fn get(&self, i: usize, create: impl FnOnce() -> M) -> Option<&M> {
        Some(self.slots.get(i)?.get_or_init(create))
    }
}

impl Observer for Metrics {
    fn on_record(&self, r: &RecordInput) {
        if r.kind == "approval" {
            self.held_calls
                .get_or_create(&HeldLabels {
                    backend: self.backend(r.backend.as_deref()),
                    outcome: approval_outcome(r),
                })
                .inc();
            return;
        }
        // MCP messages only: connection and http rows are counted elsewhere.
        let Some(kind) = KINDS.iter().position(|k| *k == r.kind) else {
            return;
        };
        let b = self.backend_index(r.backend.as_deref());
        let direction = index_or_other(&DIRECTIONS, &r.direction);
        let decision = index_or_other(&DECISIONS, &r.decision);
        let slot =
            ((b * DIRECTIONS.len() + direction) * KINDS.len() + kind) * DECISIONS.len() + decision;
        let backend = self.backend_name(b);
        if let Some(c) = self.message_slots.get(slot, || {
            self.messages.get_or_create_owned(&MessageLabels {
                backend,
                direction: DIRECTIONS[direction],
                kind: KINDS[kind],
                decision: DECISIONS[decision],
            })
        }) {
            c.inc();
        }
        // One entry per masked value, grouped by detector (the pipeline writes them in runs).
        let mut detectors = r.masked_detectors.iter().peekable();
        while let Some(d) = detectors.next() {
            let mut n = 1;
            while detectors.next_if(|next| *next == d).is_some() {
                n += 1;
            }
            self.masked
                .get_or_create(&DetectorLabels {
                    backend,
                    detector: self.detector(d),
                })
                .inc_by(n);
        }
        let (kind, direction, decision) = (KINDS[kind], DIRECTIONS[direction], DECISIONS[decision]);
        // A refused call has two rows (the request, and Airlock's error answer): the request
        // is the call.
        if decision == "block"
            && direction == "client_to_server"
            && matches!(kind, "request" | "notification")
        {
            self.blocked_calls
                .get_or_create(&BackendLabels { backend })
                .inc();
        }
        if let (Some(us), "response" | "error") = (r.latency_us, kind) {
            let m = method_index(r.method.as_deref());
            let methods = crate::mcp::jsonrpc::REQUEST_METHODS.len() + 1;
            if let Some(h) = self.operation_slots.get(b * methods + m, || {
                self.operations.get_or_create_owned(&OperationLabels {
                    backend,
                    method: method_name(m),
                })
            }) {
                h.observe(us as f64 / 1e6);
            }
        }
    }

    fn on_event(&self, event: &AgentEvent) {
        let counter = match event {
            AgentEvent::PolicyReloaded { .. } => self
                .policy_reloads
                .get_or_create_owned(&ResultLabels { result: "applied" }),
            AgentEvent::PolicyRefused { .. } => self
                .policy_reloads
                .get_or_create_owned(&ResultLabels { result: "refused" }),
            AgentEvent::ToolDefinitionChanged { backend, .. } => {
                self.tool_changes.get_or_create_owned(&BackendLabels {
                    backend: self.backend(Some(backend)),
                })
            }
            _ => return,
        };
        counter.inc();
    }
}

/// `approved`, `denied` (by an approver) or `timed_out` (nobody decided in time: the
/// approval record names no approver).
fn approval_outcome(r: &RecordInput) -> &'static str {
    match r.decision.as_str() {
        "approved" => "approved",
        "denied" => {
            let by_nobody = r
                .payload
                .as_ref()
                .and_then(|p| serde_json::from_str::<serde_json::Value>(p.as_str()).ok())
                .is_some_and(|v| v.get("by_uid").is_some_and(serde_json::Value::is_null));
            if by_nobody { "timed_out" } else { "denied" }
        }
        _ => "other",
    }
}

/// The registry's text in `format`; every family has its HELP and TYPE in both.
pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry)?,
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?
        }
    }
    Ok(out)
}
