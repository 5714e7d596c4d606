//! Just-in-time approvals, sans-IO: a held call waits for a human, bound to a SHA-256 of the
//! exact method, tool and arguments, and expires (denied) after its rule's timeout.
//!
//! The binding matters: an approver who said yes to `deploy {"env":"staging"}` has not said
//! yes to `deploy {"env":"prod"}`, even if the client reuses the JSON-RPC id.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use serde_json::Value;
use sha2::Digest as _;

/// SHA-256 (hex) of the canonical JSON of `[method, tool, arguments]` (object keys sorted,
/// no insignificant whitespace).
pub fn call_digest(method: &str, tool: Option<&str>, arguments: Option<&Value>) -> String {
    let mut text = String::new();
    canonical(
        &Value::Array(vec![
            Value::String(method.to_owned()),
            tool.map_or(Value::Null, |t| Value::String(t.to_owned())),
            arguments.cloned().unwrap_or(Value::Null),
        ]),
        &mut text,
    );
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// JSON with object keys in sorted order, whatever the map type keeps.
pub fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// What an approver sees (`airlock approvals list`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PendingApproval {
    pub id: u64,
    pub rule: String,
    pub digest: String,
    pub method: String,
    pub tool: Option<String>,
    /// Masked arguments, for the approver's eyes.
    pub arguments: Option<Value>,
    pub user: Option<String>,
    pub uid: u32,
    pub pid: u32,
    pub exe: Option<String>,
    pub backend: String,
    pub requested_at: String,
    pub expires_in_secs: u64,
}

/// The outcome of a held call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Approved {
        by_uid: u32,
        waited: Duration,
    },
    Denied {
        by_uid: Option<u32>,
        waited: Duration,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApprovalError {
    #[error("no pending approval {0} (decided already, expired, or never asked)")]
    Unknown(u64),
    #[error("approval {id} is for another call: digest {actual}, you approved {expected}")]
    DigestMismatch {
        id: u64,
        expected: String,
        actual: String,
    },
}

struct Held {
    info: PendingApproval,
    since: Instant,
    timeout: Duration,
}

/// Pending approvals; the caller drives time with `now`.
#[derive(Default)]
pub struct Approvals {
    next_id: u64,
    pending: BTreeMap<u64, Held>,
    decided: BTreeMap<u64, Outcome>,
}

impl Approvals {
    /// Hold a call; returns its id.
    pub fn request(&mut self, mut info: PendingApproval, timeout: Duration, now: Instant) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        info.id = id;
        info.requested_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        info.expires_in_secs = timeout.as_secs();
        self.pending.insert(
            id,
            Held {
                info,
                since: now,
                timeout,
            },
        );
        id
    }

    /// How many calls wait for a decision (expired ones count until their holder wakes).
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Pending calls, oldest first, with their remaining time.
    pub fn list(&mut self, now: Instant) -> Vec<PendingApproval> {
        self.expire(now);
        self.pending
            .values()
            .map(|h| {
                let mut info = h.info.clone();
                info.expires_in_secs = h
                    .timeout
                    .saturating_sub(now.duration_since(h.since))
                    .as_secs();
                info
            })
            .collect()
    }

    /// Approve `id`. When `digest` is given it must be the held call's: the approver names
    /// exactly what they approve.
    pub fn approve(
        &mut self,
        id: u64,
        digest: Option<&str>,
        by_uid: u32,
        now: Instant,
    ) -> Result<Outcome, ApprovalError> {
        self.expire(now);
        let held = self.pending.get(&id).ok_or(ApprovalError::Unknown(id))?;
        if let Some(d) = digest
            && d != held.info.digest
        {
            return Err(ApprovalError::DigestMismatch {
                id,
                expected: d.to_owned(),
                actual: held.info.digest.clone(),
            });
        }
        let held = self.pending.remove(&id).ok_or(ApprovalError::Unknown(id))?;
        let outcome = Outcome::Approved {
            by_uid,
            waited: now.duration_since(held.since),
        };
        self.decided.insert(id, outcome.clone());
        Ok(outcome)
    }

    pub fn deny(&mut self, id: u64, by_uid: u32, now: Instant) -> Result<Outcome, ApprovalError> {
        self.expire(now);
        let held = self.pending.remove(&id).ok_or(ApprovalError::Unknown(id))?;
        let outcome = Outcome::Denied {
            by_uid: Some(by_uid),
            waited: now.duration_since(held.since),
            reason: format!("denied by uid {by_uid}"),
        };
        self.decided.insert(id, outcome.clone());
        Ok(outcome)
    }

    /// Forget a held call nobody waits for any more (its client went away).
    pub fn cancel(&mut self, id: u64) {
        self.pending.remove(&id);
        self.decided.remove(&id);
    }

    /// The decision for `id`, once there is one (taken: each decision is read once).
    pub fn take_outcome(&mut self, id: u64, now: Instant) -> Option<Outcome> {
        self.expire(now);
        self.decided.remove(&id)
    }

    /// Deny every call whose time ran out.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, h)| now.duration_since(h.since) >= h.timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(h) = self.pending.remove(&id) {
                self.decided.insert(
                    id,
                    Outcome::Denied {
                        by_uid: None,
                        waited: h.timeout,
                        reason: format!("no decision within {} s", h.timeout.as_secs()),
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(digest: &str) -> PendingApproval {
        PendingApproval {
            id: 0,
            rule: "approve-deploys".into(),
            digest: digest.into(),
            method: "tools/call".into(),
            tool: Some("deploy".into()),
            arguments: Some(json!({"env": "prod"})),
            user: Some("ci".into()),
            uid: 1000,
            pid: 42,
            exe: None,
            backend: "tools".into(),
            requested_at: String::new(),
            expires_in_secs: 0,
        }
    }

    #[test]
    fn digest_binds_method_tool_and_arguments_not_key_order() {
        let a = call_digest(
            "tools/call",
            Some("deploy"),
            Some(&json!({"env": "prod", "force": true})),
        );
        let b = call_digest(
            "tools/call",
            Some("deploy"),
            Some(&json!({"force": true, "env": "prod"})),
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            call_digest(
                "tools/call",
                Some("deploy"),
                Some(&json!({"env": "staging", "force": true}))
            )
        );
        assert_ne!(
            a,
            call_digest(
                "tools/call",
                Some("deploy2"),
                Some(&json!({"env": "prod", "force": true}))
            )
        );
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn approve_deny_and_expiry() {
        let t0 = Instant::now();
        let mut ap = Approvals::default();
        let d = call_digest("tools/call", Some("deploy"), Some(&json!({"env": "prod"})));
        let a = ap.request(info(&d), Duration::from_secs(120), t0);
        let b = ap.request(info(&d), Duration::from_secs(120), t0);
        let c = ap.request(info(&d), Duration::from_secs(5), t0);
        assert_eq!(ap.list(t0).len(), 3);
        // A digest for another call is refused and leaves the request pending.
        let wrong = call_digest(
            "tools/call",
            Some("deploy"),
            Some(&json!({"env": "staging"})),
        );
        assert!(matches!(
            ap.approve(a, Some(&wrong), 0, t0),
            Err(ApprovalError::DigestMismatch { .. })
        ));
        assert!(matches!(
            ap.approve(a, Some(&d), 0, t0 + Duration::from_secs(3)).unwrap(),
            Outcome::Approved { by_uid: 0, waited } if waited == Duration::from_secs(3)
        ));
        assert!(matches!(
            ap.deny(b, 0, t0).unwrap(),
            Outcome::Denied {
                by_uid: Some(0),
                ..
            }
        ));
        assert_eq!(
            ap.approve(a, None, 0, t0),
            Err(ApprovalError::Unknown(a)),
            "decided only once"
        );
        // c expires after 5 s: denied without an approver.
        let later = t0 + Duration::from_secs(6);
        assert!(ap.list(later).is_empty());
        assert!(matches!(
            ap.take_outcome(c, later),
            Some(Outcome::Denied { by_uid: None, .. })
        ));
        assert!(ap.take_outcome(a, later).is_some());
        assert!(
            ap.take_outcome(a, later).is_none(),
            "each outcome is read once"
        );
    }
}
