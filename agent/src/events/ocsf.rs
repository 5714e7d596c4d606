//! Sans-IO mapping of Airlock's decisions to OCSF 1.7.0 events (JSON values).
//!
//! Which record or agent event becomes which OCSF class, field by field, is documented in
//! EVENTS.md; every enum value used here is the OCSF 1.7.0 schema's, with its profiles (the
//! `ocsf_schema_validates_every_kind` test validates one event of each kind against the
//! official 1.7.0 export, as PyPI `ocsf-json-schema` ships it, and with PyPI `pydantic-ocsf`).
//! Events never carry payloads or arguments: masked values are counted by detector, never
//! copied, and command lines (which carry tokens) are left out.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::{archive::RecordInput, attribution::Attribution, observe::AgentEvent};

/// Longest string a client chose (method, tool, session id, principal) kept in an event.
const FIELD_MAX: usize = 1024;

/// Host names a verification-failed finding names (the count says how many there were).
const HOSTS_SHOWN: usize = 8;

/// Largest serialised event: with the RFC 5424 header (at most ~400 bytes: PRI, timestamp,
/// a 255-byte host, a 48-byte app name, PID, MSGID) it stays under a UDP datagram's 65,507
/// bytes, and far under the webhook spool's 1 MiB per event. [`fit`] cuts any event to it.
pub const MAX_EVENT_BYTES: usize = 64_000;

/// OCSF schema version of every event.
pub const OCSF_VERSION: &str = "1.7.0";

/// OCSF class uids Airlock emits.
pub mod class {
    pub const DETECTION_FINDING: u32 = 2004;
    pub const ENTITY_MANAGEMENT: u32 = 3004;
    pub const NETWORK_ACTIVITY: u32 = 4001;
    pub const APPLICATION_LIFECYCLE: u32 = 6002;
    pub const API_ACTIVITY: u32 = 6003;
}

/// `severity_id` values (OCSF base event).
mod severity {
    pub const INFORMATIONAL: u8 = 1;
    pub const LOW: u8 = 2;
    pub const MEDIUM: u8 = 3;
    pub const HIGH: u8 = 4;
}

/// The decision an MCP-call event reports, with its security-control profile values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallDecision {
    Blocked,
    Held,
    Approved,
    Denied,
    TimedOut,
    Masked,
}

impl CallDecision {
    /// (`action_id`, `action`, `disposition_id`, `disposition`, `status_id`, `severity_id`).
    /// `action_id` is the security-control profile's enum (0 Unknown, 1 Allowed, 2 Denied,
    /// 3 Observed, 4 Modified, 99 Other): a masked call went on modified (4); a held one is
    /// neither allowed nor denied yet, nor modified: 99 with "Held" in `action`.
    fn profile(self) -> (u8, &'static str, u8, &'static str, u8, u8) {
        match self {
            CallDecision::Blocked => (2, "Denied", 2, "Blocked", 2, severity::MEDIUM),
            CallDecision::Held => (99, "Held", 14, "Delayed", 0, severity::LOW),
            CallDecision::Approved => (1, "Allowed", 8, "Approved", 1, severity::INFORMATIONAL),
            CallDecision::Denied => (2, "Denied", 25, "Rejected", 2, severity::LOW),
            CallDecision::TimedOut => (2, "Denied", 25, "Rejected", 2, severity::LOW),
            CallDecision::Masked => (4, "Modified", 1, "Allowed", 1, severity::MEDIUM),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CallDecision::Blocked => "blocked",
            CallDecision::Held => "held",
            CallDecision::Approved => "approved",
            CallDecision::Denied => "denied",
            CallDecision::TimedOut => "timed_out",
            CallDecision::Masked => "masked",
        }
    }
}

/// Which decision (if any) an archived record reports to a SIEM. A blocked call yields a
/// request row and Airlock's `error` answer: only the first is an event. Approvals are
/// reported by their `approval` row, not by the request rows around it.
pub fn record_decision(r: &RecordInput) -> Option<CallDecision> {
    match (r.kind.as_str(), r.decision.as_str()) {
        ("approval", "approved") => Some(CallDecision::Approved),
        ("approval", "denied") => Some(if approval_timed_out(r) {
            CallDecision::TimedOut
        } else {
            CallDecision::Denied
        }),
        ("approval", _) => None,
        // Airlock's own refusal of a call it already reported, and tool-pin alerts (their
        // own event); a connection refusal is reported by `ConnectionRejected`.
        ("error", "block" | "denied") | ("connection", _) => None,
        // A listing with tools hidden by a block rule: no call was refused.
        ("response", "block") if r.method.as_deref().is_some_and(|m| m.ends_with("/list")) => None,
        (_, "block") => Some(CallDecision::Blocked),
        (_, "denied") => None,
        _ if !r.masked_detectors.is_empty() => Some(CallDecision::Masked),
        _ => None,
    }
}

/// An `approval` row is a time-out when nobody decided (`by_uid` is null in its payload,
/// which Airlock wrote itself).
fn approval_timed_out(r: &RecordInput) -> bool {
    r.payload
        .as_ref()
        .and_then(|p| serde_json::from_str::<Value>(p.as_str()).ok())
        .is_some_and(|v| v.get("by_uid").is_some_and(Value::is_null))
}

/// The OCSF event for a record, when it reports a decision.
pub fn from_record(r: &RecordInput, version: &str) -> Option<Value> {
    let decision = record_decision(r)?;
    let mut ev = api_activity(r, decision, version);
    declare_container_profile(&mut ev);
    Some(ev)
}

/// One API Activity (6003) event for an MCP call decision.
pub fn api_activity(r: &RecordInput, decision: CallDecision, version: &str) -> Value {
    let (action_id, action, disposition_id, disposition, status_id, severity_id) =
        decision.profile();
    // Strings a client chose are bounded: an event stays well under a syslog datagram.
    let method = bounded(r.method.as_deref().unwrap_or(&r.kind), FIELD_MAX);
    let tool = r.tool.as_deref().map(|t| bounded(t, FIELD_MAX));
    let (activity_id, activity_name) = api_activity_id(&method);
    let counts = detector_counts(&r.masked_detectors);
    let masked_total: usize = r.masked_detectors.len();
    let what = describe(&method, tool.as_deref());
    let message = match decision {
        CallDecision::Masked => format!(
            "{what}: {masked_total} value(s) masked ({})",
            counts
                .iter()
                .map(|(d, n)| format!("{d}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        CallDecision::Blocked => format!("{what} blocked"),
        CallDecision::Approved => format!("{what} approved"),
        CallDecision::Denied => format!("{what} denied by an approver"),
        CallDecision::TimedOut => format!("{what} not approved in time"),
        CallDecision::Held => format!("{what} held for approval"),
    };
    let mut ev = base(
        class::API_ACTIVITY,
        activity_id,
        severity_id,
        r.ts_us / 1000,
        &r.host,
        version,
    );
    ev["activity_name"] = activity_name.into();
    ev["metadata"]["uid"] = format!("{}:{}", r.session_id, r.seq).into();
    let mcp_session = r.mcp_session_id.as_deref().map(|m| bounded(m, FIELD_MAX));
    ev["metadata"]["correlation_uid"] = mcp_session
        .clone()
        .unwrap_or_else(|| r.session_id.clone())
        .into();
    ev["metadata"]["profiles"] = json!(["security_control", "host"]);
    ev["message"] = message.into();
    // A held call has no outcome yet: no status.
    if status_id != 0 {
        ev["status_id"] = status_id.into();
    }
    ev["action_id"] = action_id.into();
    ev["action"] = action.into();
    ev["disposition_id"] = disposition_id.into();
    ev["disposition"] = disposition.into();
    ev["actor"] = actor_of_record(r);
    let mut api = json!({ "operation": method });
    if let Some(b) = &r.backend {
        api["service"] = json!({ "name": b });
    }
    if let Some(id) = &r.jsonrpc_id {
        api["request"] = json!({ "uid": id });
    }
    ev["api"] = api;
    if let Some(tool) = &tool {
        ev["resources"] = json!([{ "name": tool, "type": "tool" }]);
    }
    ev["src_endpoint"] = json!({ "hostname": r.host });
    ev["dst_endpoint"] = endpoint(
        r.server_addr.as_deref(),
        r.backend.as_deref(),
        r.sni.as_deref(),
    );
    // The rule that decided: records name it first (the block or approve rule of a refusal,
    // a hold or an approval; the first mask rule that masked a value of a masked message).
    if let Some(rule) = r.rules.first() {
        let mut policy = json!({ "uid": rule, "name": rule, "is_applied": true });
        if let Some(h) = &r.policy_hash {
            policy["version"] = h.clone().into();
        }
        ev["policy"] = policy;
    }
    if let Some(l) = r.latency_us {
        ev["duration"] = (l / 1000).into();
    }
    if decision == CallDecision::TimedOut {
        ev["status_detail"] = "timed out: no approver decided".into();
    }
    ev["unmapped"] = json!({
        "airlock": {
            "decision": decision.name(),
            "session_id": r.session_id,
            "seq": r.seq,
            "mcp_session_id": mcp_session,
            "kind": r.kind,
            "direction": r.direction,
            "rules": r.rules,
            "masked": counts,
            "gid": r.gid,
            "cgroup": r.cgroup,
            "principal_iss": r.principal_iss.as_deref().map(|p| bounded(p, FIELD_MAX)),
            "principal_sub": r.principal_sub.as_deref().map(|p| bounded(p, FIELD_MAX)),
        }
    });
    strip_nulls(&mut ev);
    ev
}

/// The OCSF event for an agent event, at `now_ms`, from `host`.
pub fn from_event(e: &AgentEvent, host: &str, version: &str, now_ms: i64) -> Value {
    let mut ev = match e {
        AgentEvent::Started { version: v } => {
            lifecycle(3, &format!("Airlock {v} started"), host, version, now_ms)
        }
        AgentEvent::Stopped { reason } => lifecycle(
            4,
            &format!("Airlock stopped ({reason})"),
            host,
            version,
            now_ms,
        ),
        AgentEvent::PolicyReloaded { hash, reason } => {
            let mut ev = policy_change(host, version, now_ms, severity::INFORMATIONAL, 1);
            ev["message"] = format!("policy set {hash} loaded ({reason})").into();
            ev["entity"]["uid"] = hash.clone().into();
            ev["entity"]["version"] = hash.clone().into();
            ev
        }
        AgentEvent::PolicyRefused { error, reason } => {
            let mut ev = policy_change(host, version, now_ms, severity::MEDIUM, 2);
            ev["message"] = "policy set refused; the previous one stays in force".into();
            ev["status_detail"] = format!("{reason}: {}", bounded(error, 2000)).into();
            ev
        }
        AgentEvent::ToolDefinitionChanged {
            backend,
            tool,
            pinned,
            seen,
        } => {
            // The name is the server's choice: bounded.
            let tool = &bounded(tool, FIELD_MAX);
            let mut ev = finding(
                host,
                version,
                now_ms,
                &format!("tool-changed:{backend}:{tool}:{seen}"),
                "MCP tool definition changed since it was pinned",
                &format!(
                    "tool `{tool}` of backend `{backend}` changed its definition (pinned {pinned}, seen {seen}); accept with `airlock tools accept {backend} {tool}`"
                ),
            );
            ev["finding_info"]["types"] = json!(["MCP Tool Definition Change"]);
            ev["resources"] = json!([{
                "name": tool,
                "type": "tool",
                "group": { "name": backend },
                "version": seen,
            }]);
            ev["evidences"] = json!([{
                "api": { "operation": "tools/list", "service": { "name": backend } },
                "data": { "pinned": pinned, "seen": seen },
            }]);
            ev
        }
        AgentEvent::UnmanagedStdioServer {
            server,
            start,
            parent_exe,
            actor,
        } => {
            let exe = actor.exe.as_deref().unwrap_or(&actor.comm);
            let desc = format!(
                "stdio MCP server `{}` (pid {}, uid {}) runs outside a governed job: its messages are not inspected",
                bounded(exe, FIELD_MAX),
                actor.tgid,
                actor.uid
            );
            let mut ev = finding(
                host,
                version,
                now_ms,
                &format!("stdio-unmanaged:{}:{start}", actor.tgid),
                "Unmanaged stdio MCP server",
                &desc,
            );
            ev["severity_id"] = severity::MEDIUM.into();
            ev["finding_info"]["types"] = json!(["Unmanaged MCP Server"]);
            ev["actor"] = actor_of_attribution(actor);
            ev["resources"] =
                json!([{ "name": bounded(server, FIELD_MAX), "type": "stdio MCP server" }]);
            ev["evidences"] = json!([{
                "process": {
                    "pid": actor.tgid,
                    "name": bounded(&actor.comm, FIELD_MAX),
                },
            }]);
            ev["unmapped"] = json!({ "airlock": { "parent_exe": parent_exe } });
            ev
        }
        AgentEvent::VerificationFailed { host: h, problem } => {
            // `h` is the archive's hosts, comma-separated; in fleet mode they come from the
            // bucket's keys (anyone who can write there chooses them): the count and the
            // first few, each bounded.
            let all: Vec<&str> = h.split(',').filter(|n| !n.is_empty()).collect();
            let shown: Vec<String> = all
                .iter()
                .take(HOSTS_SHOWN)
                .map(|n| bounded(n, FIELD_MAX))
                .collect();
            let first = shown.first().map_or("unknown", String::as_str);
            let (uid, whose) = match all.len() {
                0 | 1 => (
                    format!("verify:{first}:{now_ms}"),
                    format!("the archive of host `{first}` is"),
                ),
                n => {
                    let mut list = shown
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    if n > shown.len() {
                        list.push_str(&format!(" and {} more", n - shown.len()));
                    }
                    (
                        format!("verify:{first}+{}:{now_ms}", n - 1),
                        format!("the archives of {n} hosts ({list}) are"),
                    )
                }
            };
            let mut ev = finding(
                host,
                version,
                now_ms,
                &uid,
                "Airlock archive verification failed",
                &format!("{whose} not as signed: {}", bounded(problem, 2000)),
            );
            ev["finding_info"]["types"] = json!(["Audit Log Tampering"]);
            ev["resources"] = if shown.is_empty() {
                json!([{ "name": "unknown", "type": "archive" }])
            } else {
                shown
                    .iter()
                    .map(|n| json!({ "name": n, "type": "archive" }))
                    .collect()
            };
            ev["unmapped"] = json!({ "airlock": { "hosts": all.len() } });
            ev
        }
        AgentEvent::ConnectionRejected {
            rule,
            reason,
            client,
            actor,
            destination,
        } => {
            let mut ev = base(
                class::NETWORK_ACTIVITY,
                5,
                severity::MEDIUM,
                now_ms,
                host,
                version,
            );
            ev["activity_name"] = "Refuse".into();
            ev["metadata"]["profiles"] = json!(["security_control", "host"]);
            ev["message"] = format!("connection refused: {reason}").into();
            ev["status_id"] = 2.into();
            ev["status_detail"] = reason.clone().into();
            ev["action_id"] = 2.into();
            ev["action"] = "Denied".into();
            ev["disposition_id"] = 2.into();
            ev["disposition"] = "Blocked".into();
            ev["src_endpoint"] = endpoint(Some(client), None, None);
            ev["src_endpoint"]["hostname"] = host.into();
            if let Some(d) = destination {
                ev["dst_endpoint"] = endpoint(Some(d), None, None);
            }
            if let Some(a) = actor {
                ev["actor"] = actor_of_attribution(a);
                ev["src_endpoint"]["owner"] = user_of(Some(a.uid), a.user.as_deref());
            }
            ev["policy"] = json!({
                "uid": rule,
                "name": "Airlock connection admission",
                "is_applied": true,
            });
            ev
        }
        AgentEvent::CallHeld {
            approval_id,
            rule,
            backend,
            method,
            tool,
            session_id,
            timeout_secs,
            actor,
        } => {
            let r = RecordInput {
                ts_us: now_ms * 1000,
                host: host.to_owned(),
                session_id: session_id.clone(),
                seq: 0,
                direction: "client_to_server".into(),
                kind: "request".into(),
                method: Some(method.clone()),
                tool: tool.clone(),
                decision: "held".into(),
                rules: vec![rule.clone()],
                pid: Some(actor.pid),
                tgid: Some(actor.tgid),
                uid: Some(actor.uid),
                gid: Some(actor.gid),
                user: actor.user.clone(),
                comm: Some(actor.comm.clone()),
                exe: actor.exe.clone(),
                cgroup: actor.cgroup.clone(),
                backend: Some(backend.clone()),
                server_addr: Some(actor.original_dst.to_string()),
                ..Default::default()
            };
            let mut ev = api_activity(&r, CallDecision::Held, version);
            ev["metadata"]["uid"] = format!("approval:{session_id}:{approval_id}").into();
            ev["status_detail"] = format!(
                "held as approval {approval_id}; decide within {timeout_secs} s with `airlock approvals`"
            )
            .into();
            ev["unmapped"]["airlock"]["approval_id"] = (*approval_id).into();
            ev["unmapped"]["airlock"]["timeout_secs"] = (*timeout_secs).into();
            ev
        }
    };
    strip_nulls(&mut ev);
    declare_container_profile(&mut ev);
    ev
}

/// The summary of refused connections of one reason beyond the first of an interval
/// (Network Activity 4001, Refuse, with `count`, `start_time` and `end_time`).
pub fn rejections_summary(
    sum: &super::rejections::Summary,
    host: &str,
    version: &str,
    now_ms: i64,
) -> Value {
    let mut ev = base(
        class::NETWORK_ACTIVITY,
        5,
        severity::MEDIUM,
        now_ms,
        host,
        version,
    );
    let reason = bounded(&sum.reason, FIELD_MAX);
    ev["activity_name"] = "Refuse".into();
    ev["metadata"]["profiles"] = json!(["security_control", "host"]);
    ev["message"] = format!(
        "{} more connection(s) refused between {} and {} (one event each interval): {reason}",
        sum.count, sum.start_ms, sum.end_ms
    )
    .into();
    ev["count"] = sum.count.into();
    ev["start_time"] = sum.start_ms.into();
    ev["end_time"] = sum.end_ms.into();
    ev["status_id"] = 2.into();
    ev["status_detail"] = reason.into();
    ev["action_id"] = 2.into();
    ev["action"] = "Denied".into();
    ev["disposition_id"] = 2.into();
    ev["disposition"] = "Blocked".into();
    ev["src_endpoint"] = json!({ "hostname": host });
    ev["policy"] = json!({
        "uid": sum.key,
        "name": "Airlock connection admission",
        "is_applied": true,
    });
    ev["unmapped"] = json!({ "airlock": { "summary": true } });
    ev
}

/// The base event: class, activity, severity, time, metadata, device.
fn base(
    class_uid: u32,
    activity_id: u32,
    severity_id: u8,
    time_ms: i64,
    host: &str,
    version: &str,
) -> Value {
    json!({
        "category_uid": class_uid / 1000,
        "class_uid": class_uid,
        "activity_id": activity_id,
        "type_uid": class_uid * 100 + activity_id,
        "severity_id": severity_id,
        "time": time_ms,
        "metadata": {
            "version": OCSF_VERSION,
            "product": {
                "name": "Airlock",
                "vendor_name": "Airlock",
                "version": version,
            },
            "profiles": ["host"],
            "log_name": "airlock.events",
        },
        "device": { "hostname": host, "type_id": 0 },
    })
}

fn lifecycle(activity_id: u32, message: &str, host: &str, version: &str, now_ms: i64) -> Value {
    let mut ev = base(
        class::APPLICATION_LIFECYCLE,
        activity_id,
        severity::INFORMATIONAL,
        now_ms,
        host,
        version,
    );
    ev["activity_name"] = if activity_id == 3 { "Start" } else { "Stop" }.into();
    ev["app"] = json!({ "name": "Airlock", "vendor_name": "Airlock", "version": version });
    ev["message"] = message.into();
    ev["status_id"] = 1.into();
    ev
}

/// Entity Management (3004), activity Update, on the policy set; `status_id` 1 loaded, 2
/// refused.
fn policy_change(host: &str, version: &str, now_ms: i64, severity_id: u8, status_id: u8) -> Value {
    let mut ev = base(
        class::ENTITY_MANAGEMENT,
        3,
        severity_id,
        now_ms,
        host,
        version,
    );
    ev["activity_name"] = "Update".into();
    ev["status_id"] = status_id.into();
    ev["entity"] = json!({ "name": "Airlock policy set", "type": "Policy" });
    ev["actor"] = json!({ "app_name": "Airlock" });
    ev
}

/// Detection Finding (2004), activity Create, severity High.
fn finding(host: &str, version: &str, now_ms: i64, uid: &str, title: &str, desc: &str) -> Value {
    let mut ev = base(
        class::DETECTION_FINDING,
        1,
        severity::HIGH,
        now_ms,
        host,
        version,
    );
    ev["activity_name"] = "Create".into();
    ev["metadata"]["profiles"] = json!(["security_control", "host"]);
    ev["status_id"] = 1.into();
    ev["is_alert"] = true.into();
    ev["message"] = desc.into();
    ev["finding_info"] = json!({
        "uid": uid,
        "title": title,
        "desc": desc,
        "created_time": now_ms,
        "product": { "name": "Airlock", "vendor_name": "Airlock", "version": version },
    });
    ev
}

/// `activity_id` of API Activity for an MCP method: listings and reads are Read (2), every
/// other method (a tool call, a notification, ...) is Other (99) with the method as
/// `activity_name`.
fn api_activity_id(method: &str) -> (u32, String) {
    let read = method.ends_with("/list") || matches!(method, "resources/read" | "prompts/get");
    if read {
        (2, "Read".into())
    } else {
        (99, method.to_owned())
    }
}

fn actor_of_record(r: &RecordInput) -> Value {
    let user = user_of(r.uid, r.user.as_deref());
    let container = r
        .cgroup
        .as_deref()
        .and_then(crate::attribution::Container::from_cgroup);
    with_container(
        actor(
            json!(r.tgid),
            json!(r.pid),
            json!(r.comm),
            user,
            r.exe.as_deref(),
        ),
        container.as_ref(),
    )
}

fn actor_of_attribution(a: &Attribution) -> Value {
    let user = user_of(Some(a.uid), a.user.as_deref());
    with_container(
        actor(
            json!(a.tgid),
            json!(a.pid),
            json!(a.comm),
            user,
            a.exe.as_deref(),
        ),
        a.container.as_ref(),
    )
}

/// `actor.process.container` (OCSF's container profile): the runtime's id, its name, the
/// runtime, and the Kubernetes pod.
fn with_container(mut actor: Value, c: Option<&crate::attribution::Container>) -> Value {
    if let Some(c) = c {
        let mut container = json!({ "uid": c.id, "runtime": c.runtime });
        if let Some(name) = &c.name {
            container["name"] = name.clone().into();
        }
        if let Some(pod) = &c.pod_uid {
            container["pod_uuid"] = pod.clone().into();
            container["orchestrator"] = "kubernetes".into();
        }
        actor["process"]["container"] = container;
    }
    actor
}

/// Declare the container profile on an event whose actor runs in a container.
pub(crate) fn declare_container_profile(ev: &mut Value) {
    if ev["actor"]["process"]["container"].is_object()
        && let Some(p) = ev["metadata"]["profiles"].as_array_mut()
        && !p.iter().any(|x| x == "container")
    {
        p.push("container".into());
    }
}

/// `actor`: the process (thread group as `pid`, thread as `tid`) and its user.
fn actor(pid: Value, tid: Value, name: Value, user: Value, exe: Option<&str>) -> Value {
    let mut process = json!({
        "pid": pid,
        "tid": tid,
        "name": name,
        "user": user,
    });
    if let Some(exe) = exe {
        process["file"] = file_of(exe);
    }
    json!({ "process": process, "user": user })
}

fn user_of(uid: Option<u32>, name: Option<&str>) -> Value {
    json!({ "uid": uid.map(|u| u.to_string()), "name": name })
}

fn file_of(path: &str) -> Value {
    let name = path.rsplit('/').next().unwrap_or(path);
    json!({ "name": name, "path": path, "type_id": 1 })
}

/// A network endpoint from `ip:port` text (the server address as the client addressed it).
fn endpoint(addr: Option<&str>, svc: Option<&str>, sni: Option<&str>) -> Value {
    let mut ep = json!({});
    if let Some(sa) = addr.and_then(|a| a.parse::<std::net::SocketAddr>().ok()) {
        ep["ip"] = sa.ip().to_string().into();
        ep["port"] = sa.port().into();
    }
    if let Some(s) = svc {
        ep["svc_name"] = s.into();
    }
    if let Some(h) = sni {
        ep["hostname"] = h.into();
    }
    ep
}

fn detector_counts(detectors: &[String]) -> BTreeMap<&str, u64> {
    let mut counts = BTreeMap::new();
    for d in detectors {
        *counts.entry(d.as_str()).or_default() += 1;
    }
    counts
}

fn describe(method: &str, tool: Option<&str>) -> String {
    match tool {
        Some(t) => format!("{method} `{t}`"),
        None => method.to_owned(),
    }
}

/// Cut `ev` until its JSON is at most `max` bytes: the longest string is shortened (ending
/// in "…"), or when strings are short already, the longest array halved; an event is cut,
/// never dropped. Returns whether anything was cut.
pub fn fit(ev: &mut Value, max: usize) -> bool {
    let mut cut = false;
    for _ in 0..256 {
        let len = ev.to_string().len();
        if len <= max {
            return cut;
        }
        cut = true;
        let excess = len - max;
        let mut found = Longest::default();
        longest(ev, &mut String::new(), &mut found);
        if found.string_len > 64
            && let Some(Value::String(s)) = ev.pointer_mut(&found.string)
        {
            // Each byte costs at least one in JSON: this removes the excess (escaped text may
            // take another round).
            let keep = s.len().saturating_sub(excess + 8);
            *s = bounded(s, keep.max(32));
        } else if found.array_len > 1
            && let Some(Value::Array(a)) = ev.pointer_mut(&found.array)
        {
            a.truncate(a.len() / 2);
        } else {
            break;
        }
    }
    // Nothing left to cut (not so for Airlock's events): the class and a note.
    if ev.to_string().len() > max
        && let Value::Object(m) = ev
    {
        let keep = [
            "class_uid",
            "category_uid",
            "activity_id",
            "type_uid",
            "severity_id",
            "time",
        ];
        m.retain(|k, _| keep.contains(&k.as_str()));
        m.insert("message".into(), "event too large; cut".into());
    }
    cut
}

/// JSON pointers to the longest string (bytes) and the longest array (elements).
#[derive(Default)]
struct Longest {
    string: String,
    string_len: usize,
    array: String,
    array_len: usize,
}

fn longest(v: &Value, at: &mut String, found: &mut Longest) {
    match v {
        Value::String(x) if x.len() > found.string_len => {
            found.string_len = x.len();
            found.string = at.clone();
        }
        Value::Array(x) => {
            if x.len() > found.array_len {
                found.array_len = x.len();
                found.array = at.clone();
            }
            for (i, item) in x.iter().enumerate() {
                let n = at.len();
                at.push_str(&format!("/{i}"));
                longest(item, at, found);
                at.truncate(n);
            }
        }
        Value::Object(m) => {
            for (k, item) in m {
                let n = at.len();
                at.push('/');
                at.push_str(&k.replace('~', "~0").replace('/', "~1"));
                longest(item, at, found);
                at.truncate(n);
            }
        }
        _ => {}
    }
}

fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// OCSF attributes are absent rather than null.
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, v| !v.is_null());
            for v in m.values_mut() {
                strip_nulls(v);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}
