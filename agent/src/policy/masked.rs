//! The one form in which a payload reaches the archive: text that went through masking.
//!
//! [`MaskedPayload`] is defined here, not in `archive`, so that only this module can make
//! one from a message: Rust can limit a constructor to the module that defines the type,
//! and the archive sits above the policy (it uses this type; the policy does not use it).

use serde::Serialize;
use serde_json::Value;

/// A payload that went through the policy engine's masking. The archive accepts payloads only
/// in this type; a message's text becomes one only through [`super::PolicySet::mask_payload`]
/// or [`super::Masking::payload`], so an unmasked message cannot reach the archive by
/// mistake. Two other ways in, each for text that carries no message content: the agent's own
/// events ([`MaskedPayload::agent_event`]) and rows the archive reads back from its files
/// ([`MaskedPayload::read_back`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MaskedPayload(String);

impl MaskedPayload {
    /// Text the policy module has just masked (or found nothing to mask in).
    pub(super) fn from_masked(text: String) -> MaskedPayload {
        MaskedPayload(text)
    }

    /// A payload the agent writes itself (connection events: addresses, byte counts,
    /// reasons, Airlock's own JSON-RPC answers), which carries no message content to mask.
    pub(crate) fn agent_event(event: &Value) -> MaskedPayload {
        MaskedPayload(event.to_string())
    }

    /// For the archive alone: a row read back from its own files, masked when it was written.
    pub(crate) fn read_back(text: String) -> MaskedPayload {
        MaskedPayload(text)
    }

    /// Any text, for tests that write rows of their own.
    #[cfg(test)]
    pub(crate) fn for_tests(text: impl Into<String>) -> MaskedPayload {
        MaskedPayload(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// Every file of the agent's sources (`agent/src`) that calls `call`, tests left out.
    fn callers(call: &str) -> Vec<String> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = Vec::new();
        let mut stack: Vec<PathBuf> = vec![src.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path
                    .strip_prefix(&src)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if path.is_dir() {
                    stack.push(path);
                } else if rel.ends_with(".rs")
                    && !rel.split('/').any(|p| p.starts_with("tests"))
                    && rel != "policy/masked.rs"
                    && std::fs::read_to_string(&path).unwrap().contains(call)
                {
                    found.push(rel);
                }
            }
        }
        found.sort();
        found
    }

    /// The two ways into the archive that skip masking are for text without message content:
    /// rows read back (the archive alone), and the agent's own events. A new caller of either
    /// fails here, so that someone looks at what it records.
    #[test]
    fn the_ways_around_masking_have_known_callers() {
        assert_eq!(
            callers("MaskedPayload::read_back"),
            ["archive/columns.rs", "archive/record.rs"]
        );
        assert_eq!(
            callers("MaskedPayload::agent_event"),
            [
                "pipeline/approval.rs",
                "pipeline/stages.rs",
                "proxy/connection.rs",
                "proxy/forward/mod.rs",
                "proxy/refusal.rs",
                "refusals/mod.rs",
            ]
        );
    }
}
