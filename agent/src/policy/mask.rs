//! Masking: detectors applied to every string leaf of a JSON value (or to one string, such as
//! an `Mcp-Param-*` header), in a fixed order, each match replaced in the chosen style.
//!
//! Types are kept where the secret is in a string: only string leaves change, and they stay
//! strings, so the masked value is valid JSON of the same shape (a client validating
//! `structuredContent` against an output schema still accepts it). A secret in a number (a card
//! number sent as a JSON number) or an object key cannot be masked in place: the number becomes
//! the masked string, the key is renamed to it. The secret never passes; the shape changes only
//! where it was.

use std::collections::BTreeMap;

use hmac::{KeyInit as _, Mac as _};
use regex::RegexSet;
use serde_json::Value;

use super::detectors::Detector;

/// How a detected value is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    /// `[MASKED:email]`
    Redact,
    /// All but the last four characters replaced by `*`.
    Partial,
    /// `[email:3fa29c04d1e87b21]`: an HMAC of the value under the installation's key, so
    /// analysts can correlate equal values without seeing them.
    Hash,
}

/// Per-installation secret for [`Style::Hash`].
#[derive(Clone)]
pub struct HashKey(pub [u8; 32]);

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(..)")
    }
}

/// Masked-value counts by detector name.
pub type MaskCounts = BTreeMap<String, u32>;

/// An ordered list of detectors with one style, and a prefilter that tells which of them can
/// match a string at all.
#[derive(Debug, Clone)]
pub struct Masker {
    detectors: Vec<Detector>,
    prefilter: RegexSet,
    style: Style,
    key: HashKey,
}

impl Masker {
    pub fn new(
        detectors: Vec<Detector>,
        style: Style,
        key: HashKey,
    ) -> Result<Masker, regex::Error> {
        let prefilter = RegexSet::new(detectors.iter().map(|d| d.regex.as_str()))?;
        Ok(Masker {
            detectors,
            prefilter,
            style,
            key,
        })
    }

    /// The masked text, or `None` when nothing was found.
    pub fn mask_str(&self, text: &str, counts: &mut MaskCounts) -> Option<String> {
        // Most strings hold nothing: `is_match` can stop early and use the set's literal
        // prefilters, which the overlapping search of `matches` cannot (that search was ~6%
        // of the agent's CPU when run on every string).
        if !self.prefilter.is_match(text) {
            return None;
        }
        let candidates = self.prefilter.matches(text);
        let mut current: Option<String> = None;
        for i in candidates.iter() {
            let detector = &self.detectors[i];
            let source = current.as_deref().unwrap_or(text);
            let ranges = detector.find(source);
            if ranges.is_empty() {
                continue;
            }
            let mut out = String::with_capacity(source.len());
            let mut last = 0;
            for r in &ranges {
                out.push_str(&source[last..r.start]);
                out.push_str(&self.replacement(&detector.name, &source[r.clone()]));
                last = r.end;
            }
            out.push_str(&source[last..]);
            *counts.entry(detector.name.clone()).or_default() += ranges.len() as u32;
            current = Some(out);
        }
        current
    }

    /// Mask every string leaf of `value` in place; returns how many values were masked.
    ///
    /// Numbers are read as text too (a card number sent as a JSON number): a number with a
    /// detected value becomes the masked string, so the secret is gone at the price of the
    /// type. Object keys with a detected value are renamed the same way.
    pub fn mask_json(&self, value: &mut Value, counts: &mut MaskCounts) -> u32 {
        match value {
            Value::String(s) => match self.mask_str(s, counts) {
                Some(masked) => {
                    *s = masked;
                    1
                }
                None => 0,
            },
            Value::Number(n) => match self.mask_str(&n.to_string(), counts) {
                Some(masked) => {
                    *value = Value::String(masked);
                    1
                }
                None => 0,
            },
            Value::Array(items) => items.iter_mut().map(|v| self.mask_json(v, counts)).sum(),
            Value::Object(map) => {
                let mut n = 0;
                let renamed: Vec<(String, String)> = map
                    .keys()
                    .filter_map(|k| self.mask_str(k, counts).map(|m| (k.clone(), m)))
                    .collect();
                for (old, new) in renamed {
                    if let Some(v) = map.remove(&old) {
                        map.insert(new, v);
                        n += 1;
                    }
                }
                n + map
                    .values_mut()
                    .map(|v| self.mask_json(v, counts))
                    .sum::<u32>()
            }
            Value::Null | Value::Bool(_) => 0,
        }
    }

    fn replacement(&self, detector: &str, value: &str) -> String {
        match self.style {
            Style::Redact => format!("[MASKED:{detector}]"),
            Style::Partial => {
                // Short values are masked whole: four characters of eight say too much.
                let chars: Vec<char> = value.chars().collect();
                let keep = if chars.len() > 8 { 4 } else { 0 };
                let mut out: String = "*".repeat(chars.len() - keep);
                out.extend(&chars[chars.len() - keep..]);
                out
            }
            Style::Hash => {
                let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key.0)
                    .expect("HMAC accepts any key length");
                mac.update(detector.as_bytes());
                mac.update(&[0]);
                mac.update(value.as_bytes());
                let tag = mac.finalize().into_bytes();
                let hex: String = tag[..8].iter().map(|b| format!("{b:02x}")).collect();
                format!("[{detector}:{hex}]")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::detectors;
    use proptest::prelude::*;
    use serde_json::json;

    /// One masker per style for the whole test run: compiling the detectors is the slow part.
    fn masker(style: Style) -> &'static Masker {
        static MASKERS: std::sync::OnceLock<Vec<Masker>> = std::sync::OnceLock::new();
        let all = MASKERS.get_or_init(|| {
            [Style::Redact, Style::Partial, Style::Hash]
                .into_iter()
                .map(|style| {
                    let ds = detectors::BUILTIN
                        .iter()
                        .filter_map(|n| detectors::builtin(n))
                        .collect();
                    Masker::new(ds, style, HashKey([7; 32])).unwrap()
                })
                .collect()
        });
        &all[style as usize]
    }

    #[test]
    fn redacts_inside_structures_and_keeps_types() {
        let m = masker(Style::Redact);
        let mut v = json!({
            "content": [{"type": "text", "text": "mail bob@example.com, card 4111 1111 1111 1111"}],
            "structuredContent": {"email": "bob@example.com", "count": 3, "ok": true, "none": null},
            "isError": false
        });
        let mut counts = MaskCounts::new();
        let changed = m.mask_json(&mut v, &mut counts);
        assert_eq!(changed, 2);
        assert_eq!(
            v["content"][0]["text"],
            "mail [MASKED:email], card [MASKED:credit_card]"
        );
        assert_eq!(v["structuredContent"]["email"], "[MASKED:email]");
        assert_eq!(v["structuredContent"]["count"], 3);
        assert_eq!(v["structuredContent"]["ok"], true);
        assert_eq!(counts.get("email"), Some(&2));
        assert_eq!(counts.get("credit_card"), Some(&1));
    }

    #[test]
    fn partial_keeps_the_last_four() {
        let m = masker(Style::Partial);
        let mut counts = MaskCounts::new();
        assert_eq!(
            m.mask_str("card 4111111111111111", &mut counts).unwrap(),
            "card ************1111"
        );
    }

    #[test]
    fn hash_is_stable_per_key_and_hides_the_value() {
        let m = masker(Style::Hash);
        let mut counts = MaskCounts::new();
        let a = m.mask_str("alice@example.com", &mut counts).unwrap();
        let b = m.mask_str("alice@example.com", &mut counts).unwrap();
        let c = m.mask_str("carol@example.com", &mut counts).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with("[email:") && !a.contains("alice"));
        let other = Masker::new(
            vec![detectors::builtin("email").unwrap()],
            Style::Hash,
            HashKey([8; 32]),
        )
        .unwrap();
        assert_ne!(other.mask_str("alice@example.com", &mut counts).unwrap(), a);
    }

    #[test]
    fn nothing_found_means_no_allocation() {
        let m = masker(Style::Redact);
        assert_eq!(
            m.mask_str("plain text, no secrets, 42", &mut MaskCounts::new()),
            None
        );
    }

    /// Valid secrets, one per built-in detector, that the property test plants.
    const SECRETS: &[&str] = &[
        "alice.smith@example.com",
        "+1 415-555-2671",
        "4111 1111 1111 1111",
        "DE89370400440532013000",
        "123-45-6789",
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_abcdefghijklmnopqrstuvwxyzABCDEF0123",
        "glpat-xxxxxxxxxxxxxxxxxxxx",
        "xoxb-123456789012-abcdefghij",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg\n-----END EC PRIVATE KEY-----",
    ];

    /// Text around a planted secret: words and punctuation that cannot glue onto it.
    fn filler() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-z ,;:!?()\\[\\]{}\"'\n\t]{0,20}").unwrap()
    }

    fn planted_string() -> impl Strategy<Value = (String, Option<usize>)> {
        prop_oneof![
            filler().prop_map(|s| (s, None)),
            (filler(), 0..SECRETS.len(), filler())
                .prop_map(|(a, i, b)| (format!("{a} {} {b}", SECRETS[i]), Some(i))),
        ]
    }

    fn json_with_secrets() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            planted_string().prop_map(|(s, _)| Value::String(s)),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z]{1,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Same shape: same types everywhere, same keys, same lengths, equal non-string leaves;
    /// except that a number holding a detected value (a Luhn-valid card number) becomes its
    /// masked string.
    fn same_shape(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::String(_), Value::String(_)) => true,
            (Value::Number(n), Value::String(s)) => {
                detectors::valid_card(&n.to_string()) && !s.contains(&n.to_string())
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_shape(p, q))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, v)| y.get(k).is_some_and(|w| same_shape(v, w)))
            }
            (p, q) => p == q,
        }
    }

    fn numbers(v: &Value) -> Vec<String> {
        match v {
            Value::Number(n) => vec![n.to_string()],
            Value::Array(items) => items.iter().flat_map(numbers).collect(),
            Value::Object(m) => m.values().flat_map(numbers).collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn card_numbers_sent_as_json_numbers_and_secrets_in_keys_are_masked() {
        let m = masker(Style::Redact);
        let mut v = json!({"card": 4111111111111111u64, "count": 42, "alice.smith@example.com": 1});
        m.mask_json(&mut v, &mut MaskCounts::new());
        assert_eq!(v["card"], "[MASKED:credit_card]");
        assert_eq!(v["count"], 42);
        assert_eq!(v["[MASKED:email]"], 1);
    }

    proptest! {
        // Each case compiles nothing and masks a small tree; 256 cases keep the debug build quick.
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn masked_output_never_contains_a_planted_secret(v in json_with_secrets(), style_ix in 0..3usize) {
            let style = [Style::Redact, Style::Partial, Style::Hash][style_ix];
            let m = masker(style);
            let mut masked = v.clone();
            m.mask_json(&mut masked, &mut MaskCounts::new());
            let text = serde_json::to_string(&masked).unwrap();
            let reparsed: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(&reparsed, &masked);
            prop_assert!(same_shape(&v, &masked));
            // Numbers that are card numbers do not pass either.
            for n in numbers(&v) {
                if detectors::valid_card(&n) {
                    prop_assert!(!text.contains(&n), "{} survived in {}", n, text);
                }
            }
            for secret in SECRETS {
                let escaped = serde_json::to_string(secret).unwrap();
                let inner = &escaped[1..escaped.len() - 1];
                prop_assert!(!text.contains(inner), "{} survived in {}", secret, text);
            }
        }
    }
}
