//! Which rules a record names (its `rules` column, and its audit event's `policy`): the ones
//! that acted on the message, the one behind the record's decision first.

use crate::policy;

/// Rule ids of Airlock's own refusals (not policy rules), as records and events name them.
pub(crate) mod rule {
    /// A tool whose definition changed since it was pinned (`tool_changes = "block"`).
    pub const TOOL_CHANGED: &str = "airlock:tool_changed";
    /// A request reusing the id of one still waiting in its session.
    pub const DUPLICATE_ID: &str = "airlock:duplicate_id";
    /// A request past the session's (or the caller's) bound of requests waiting.
    pub const PENDING_FULL: &str = "airlock:pending_full";
}

/// The rules that acted on a message, for its record's `rules` and its audit event's
/// `policy`: the rule behind the record's decision first, then the others that acted, each
/// once. Behind the decision: `deciding`, the rule of a refusal (a block or approve rule, or
/// one of Airlock's own, `airlock:…`) or of an approval; otherwise (an allowed message) the
/// mask rules that masked a value, or the rules that hid tools from a listing, or the
/// `allow` rule that allowed it. A mask rule that matched but masked nothing did not act, and
/// neither did a verdict that one of Airlock's own refusals overrode.
pub(super) fn acting_rules(
    deciding: Option<&str>,
    verdict_rule: Option<&str>,
    masking: &policy::Masking,
    hidden: &[(String, String)],
) -> Vec<String> {
    let mut rules: Vec<String> = Vec::new();
    let mut add = |r: &str| {
        if !rules.iter().any(|x| x == r) {
            rules.push(r.to_owned());
        }
    };
    match deciding {
        Some(r) => add(r),
        None => {
            masking.rules().iter().for_each(|r| add(r));
            hidden.iter().for_each(|(_, r)| add(r));
            if let Some(r) = verdict_rule {
                add(r);
            }
        }
    }
    // A refused call whose arguments were masked: the mask rules acted too.
    masking.rules().iter().for_each(|r| add(r));
    rules
}
