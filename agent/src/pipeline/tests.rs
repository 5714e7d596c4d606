//! Which rules a record names, and in what order (its audit event's `policy` is the first).

use super::rules::{acting_rules, rule};
use crate::policy::Masking;

fn hidden(rules: &[&str]) -> Vec<(String, String)> {
    rules
        .iter()
        .map(|r| (format!("tool-of-{r}"), r.to_string()))
        .collect()
}

/// (deciding, verdict rule, mask rules that masked, listing hidden by, expected).
type Case<'a> = (
    Option<&'a str>,
    Option<&'a str>,
    &'a [&'a str],
    &'a [&'a str],
    &'a [&'a str],
);

#[test]
fn the_rule_behind_the_decision_comes_first() {
    let cases: &[Case] = &[
        // Blocked: the block rule, then the mask rules that masked its arguments.
        (
            Some("no-drop"),
            Some("no-drop"),
            &["mask-secrets"],
            &[],
            &["no-drop", "mask-secrets"],
        ),
        // Approved (or denied): the approve rule first.
        (
            Some("approve-deploys"),
            Some("approve-deploys"),
            &["mask-secrets"],
            &[],
            &["approve-deploys", "mask-secrets"],
        ),
        // One of Airlock's own refusals overrides the verdict: the verdict did not act.
        (
            Some(rule::DUPLICATE_ID),
            Some("approve-deploys"),
            &[],
            &[],
            &[rule::DUPLICATE_ID],
        ),
        // Masked and allowed by an allow rule: the mask rules decided "mask".
        (
            None,
            Some("allow-search"),
            &["mask-pii", "mask-tokens"],
            &[],
            &["mask-pii", "mask-tokens", "allow-search"],
        ),
        // A listing with tools hidden: the rules that hid them.
        (
            None,
            None,
            &[],
            &["no-drop", rule::TOOL_CHANGED, "no-drop"],
            &["no-drop", rule::TOOL_CHANGED],
        ),
        // Allowed by a rule, or by default.
        (None, Some("allow-search"), &[], &[], &["allow-search"]),
        (None, None, &[], &[], &[]),
    ];
    for (deciding, verdict, masked, hid, want) in cases {
        let m = Masking::for_tests(masked);
        assert_eq!(
            acting_rules(*deciding, *verdict, &m, &hidden(hid)),
            want.to_vec(),
            "{deciding:?} {verdict:?} {masked:?} {hid:?}"
        );
    }
}
