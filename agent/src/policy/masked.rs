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
