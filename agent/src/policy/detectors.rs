//! Sensitive-value detectors: a regex to find candidates, and where the format has one, a
//! checksum or structural check to keep false positives out (Luhn for cards, mod-97 for IBANs,
//! SSN area rules, a JSON header for JWTs).
//!
//! A detector whose pattern has a capture group masks only that group (e.g. the token after
//! `Bearer `), otherwise the whole match.

use std::sync::OnceLock;

use base64::Engine as _;
use regex::Regex;

/// A compiled detector.
#[derive(Debug, Clone)]
pub struct Detector {
    pub name: String,
    pub regex: Regex,
    pub validate: Option<Validator>,
}

impl Detector {
    /// Every validated occurrence in `text`, as byte ranges of the part to mask.
    pub fn find(&self, text: &str) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        for caps in self.regex.captures_iter(text) {
            let m = caps.get(1).or_else(|| caps.get(0));
            let Some(m) = m else { continue };
            if self.validate.is_none_or(|v| v(m.as_str())) {
                out.push(m.range());
            }
        }
        out
    }
}

/// Names of the built-in detectors, in the order they are applied (longest, most specific
/// first, so a private key block is masked whole before anything inside it).
pub const BUILTIN: &[&str] = &[
    "private_key",
    "jwt",
    "bearer_token",
    "github_token",
    "gitlab_token",
    "slack_token",
    "aws_access_key",
    "aws_secret_key",
    "credit_card",
    "iban",
    "us_ssn",
    "email",
    "phone",
];

/// An extra check on a regex match (a checksum, a structure).
type Validator = fn(&str) -> bool;

/// A built-in detector by name.
pub fn builtin(name: &str) -> Option<Detector> {
    let (pattern, validate): (&str, Option<Validator>) = match name {
        "private_key" => (
            r"(?s)-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----",
            None,
        ),
        "jwt" => (
            r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}",
            Some(valid_jwt),
        ),
        "bearer_token" => (r"(?i)\bbearer\s+([A-Za-z0-9._~+/=-]{16,})", None),
        "github_token" => (
            r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b",
            None,
        ),
        "gitlab_token" => (r"\bglpat-[A-Za-z0-9_-]{20,}", None),
        "slack_token" => (r"\bxox[abposr]-[A-Za-z0-9-]{10,}", None),
        "aws_access_key" => (r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b", None),
        "aws_secret_key" => (
            r#"(?i)aws[a-z0-9_ .-]{0,20}(?:secret|key)[a-z0-9_ .-]{0,20}["'\s:=]{1,4}([A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+=]|$)"#,
            None,
        ),
        "credit_card" => (r"\b\d(?:[ -]?\d){12,18}\b", Some(valid_card)),
        "iban" => (r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b", Some(valid_iban)),
        "us_ssn" => (r"\b\d{3}-\d{2}-\d{4}\b", Some(valid_ssn)),
        "email" => (
            r"(?i)\b[a-z0-9][a-z0-9._%+-]{0,63}@[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?)*\.[a-z]{2,24}\b",
            None,
        ),
        "phone" => (
            r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\b\d{2,4})[ .-]\d{3,4}[ .-]\d{3,4}\b|\+\d{8,15}\b",
            Some(valid_phone),
        ),
        _ => return None,
    };
    // ASCII word boundaries: every built-in format is ASCII, and a Unicode `\b` keeps the
    // regex engine off its fast DFA path whenever the text holds a non-ASCII character.
    let pattern = pattern.replace(r"\b", r"(?-u:\b)");
    // Built-in patterns are constants: a failure to compile is a bug caught by the tests.
    let regex = Regex::new(&pattern).ok()?;
    Some(Detector {
        name: name.to_owned(),
        regex,
        validate,
    })
}

/// Luhn checksum over the digits, 13 to 19 of them, not all the same digit.
pub fn valid_card(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) || digits.iter().all(|d| *d == digits[0]) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// ISO 13616: length for the country where known, mod 97 == 1.
pub fn valid_iban(s: &str) -> bool {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    if let Some(len) = iban_length(&compact[..2])
        && compact.len() != len
    {
        return false;
    }
    let rearranged = compact[4..].chars().chain(compact[..4].chars());
    let mut rem: u32 = 0;
    for c in rearranged {
        let v = match c {
            '0'..='9' => c as u32 - '0' as u32,
            'A'..='Z' => c as u32 - 'A' as u32 + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn iban_length(country: &str) -> Option<usize> {
    static TABLE: OnceLock<std::collections::HashMap<&'static str, usize>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            [
                ("AT", 20),
                ("BE", 16),
                ("BG", 22),
                ("CH", 21),
                ("CY", 28),
                ("CZ", 24),
                ("DE", 22),
                ("DK", 18),
                ("EE", 20),
                ("ES", 24),
                ("FI", 18),
                ("FR", 27),
                ("GB", 22),
                ("GR", 27),
                ("HR", 21),
                ("HU", 28),
                ("IE", 22),
                ("IS", 26),
                ("IT", 27),
                ("LI", 21),
                ("LT", 20),
                ("LU", 20),
                ("LV", 21),
                ("MT", 31),
                ("NL", 18),
                ("NO", 15),
                ("PL", 28),
                ("PT", 25),
                ("RO", 24),
                ("SE", 24),
                ("SI", 19),
                ("SK", 24),
            ]
            .into_iter()
            .collect()
        })
        .get(country)
        .copied()
}

/// SSA rules: area not 000, 666 or 9xx; group not 00; serial not 0000.
pub fn valid_ssn(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let [area, group, serial] = parts.as_slice() else {
        return false;
    };
    *area != "000"
        && *area != "666"
        && !area.starts_with('9')
        && *group != "00"
        && *serial != "0000"
}

/// A phone number has 10 to 15 digits (E.164 allows 15; fewer is more often a date, a version
/// or part of an address).
pub fn valid_phone(s: &str) -> bool {
    let digits = s.chars().filter(char::is_ascii_digit).count();
    (10..=15).contains(&digits)
}

/// A JWT's first segment is base64url JSON with an `alg`.
pub fn valid_jwt(s: &str) -> bool {
    let Some(header) = s.split('.').next() else {
        return false;
    };
    let Ok(bytes) =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header.trim_end_matches('='))
    else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&bytes).is_ok_and(|v| v.get("alg").is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hits(name: &str, text: &str) -> Vec<String> {
        let d = builtin(name).unwrap_or_else(|| panic!("no detector {name}"));
        d.find(text)
            .into_iter()
            .map(|r| text[r].to_owned())
            .collect()
    }

    /// (detector, text, the exact parts that must be found)
    const POSITIVE: &[(&str, &str, &[&str])] = &[
        (
            "email",
            "write to alice.smith+mcp@example.co.uk today",
            &["alice.smith+mcp@example.co.uk"],
        ),
        ("email", "BOB@EXAMPLE.COM", &["BOB@EXAMPLE.COM"]),
        ("phone", "call +1 415-555-2671 now", &["+1 415-555-2671"]),
        ("phone", "tel (020) 7946 0958", &["(020) 7946 0958"]),
        ("phone", "e164 +4915112345678", &["+4915112345678"]),
        (
            "credit_card",
            "card 4111 1111 1111 1111 exp",
            &["4111 1111 1111 1111"],
        ),
        (
            "credit_card",
            "5500-0000-0000-0004",
            &["5500-0000-0000-0004"],
        ),
        ("credit_card", "amex 378282246310005", &["378282246310005"]),
        (
            "iban",
            "IBAN DE89 3704 0044 0532 0130 00 please",
            &["DE89 3704 0044 0532 0130 00"],
        ),
        (
            "iban",
            "GB82WEST12345698765432",
            &["GB82WEST12345698765432"],
        ),
        ("us_ssn", "ssn 123-45-6789.", &["123-45-6789"]),
        (
            "aws_access_key",
            "key AKIAIOSFODNN7EXAMPLE",
            &["AKIAIOSFODNN7EXAMPLE"],
        ),
        (
            "aws_secret_key",
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
            &["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"],
        ),
        (
            "github_token",
            "token ghp_abcdefghijklmnopqrstuvwxyzABCDEF0123",
            &["ghp_abcdefghijklmnopqrstuvwxyzABCDEF0123"],
        ),
        (
            "github_token",
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
            &["github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"],
        ),
        (
            "gitlab_token",
            "glpat-xxxxxxxxxxxxxxxxxxxx",
            &["glpat-xxxxxxxxxxxxxxxxxxxx"],
        ),
        (
            "slack_token",
            "xoxb-123456789012-abcdefghij",
            &["xoxb-123456789012-abcdefghij"],
        ),
        (
            "jwt",
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            &[
                "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            ],
        ),
        (
            "bearer_token",
            "Authorization: Bearer abcdef0123456789abcdef",
            &["abcdef0123456789abcdef"],
        ),
        (
            "private_key",
            "x -----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAK\n-----END RSA PRIVATE KEY----- y",
            &["-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAK\n-----END RSA PRIVATE KEY-----"],
        ),
        (
            "private_key",
            "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----",
            &["-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----"],
        ),
    ];

    /// (detector, text that must not be found)
    const NEGATIVE: &[(&str, &str)] = &[
        ("email", "not an address: alice@localhost"),
        ("email", "@handle and user@"),
        ("phone", "date 2026-11-21"),
        ("phone", "version 1.2.3 and ip 192.168.100.200"),
        ("phone", "short 555-1234"),
        ("credit_card", "4111 1111 1111 1112"),
        ("credit_card", "order 1234567890123"),
        ("credit_card", "0000 0000 0000 0000"),
        ("credit_card", "12 digits 123456789012"),
        ("iban", "DE89 3704 0044 0532 0130 01"),
        ("iban", "GB82WEST1234569876543"),
        ("iban", "HELLO WORLD ABCDEFGHIJKL"),
        ("us_ssn", "000-12-3456"),
        ("us_ssn", "666-12-3456"),
        ("us_ssn", "912-34-5678"),
        ("us_ssn", "123-00-4567"),
        ("us_ssn", "123-45-0000"),
        ("us_ssn", "phone 555-123-4567"),
        ("aws_access_key", "AKIAIOSFODNN7EXAMPL"),
        ("aws_access_key", "XKIAIOSFODNN7EXAMPLE"),
        (
            "aws_secret_key",
            "a random 40-char string wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
        ("github_token", "ghp_short"),
        ("gitlab_token", "glpat-short"),
        ("slack_token", "xoxz-123456789012-abcdefghij"),
        ("jwt", "eyJub3QiOiJhIGp3dCJ9.eyJzdWIiOiIxIn0.sig-sig-sig"),
        ("jwt", "eyJhbGciOiJIUzI1NiJ9"),
        ("bearer_token", "Bearer short"),
        ("bearer_token", "the bearer of bad news"),
        (
            "private_key",
            "-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----",
        ),
        (
            "private_key",
            "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----",
        ),
    ];

    #[test]
    fn every_builtin_compiles() {
        for name in BUILTIN {
            assert!(builtin(name).is_some(), "{name} does not compile");
        }
        assert!(builtin("nope").is_none());
    }

    #[test]
    fn positive_corpus_is_found() {
        for (name, text, want) in POSITIVE {
            assert_eq!(hits(name, text), *want, "{name} on {text:?}");
        }
        // Every built-in detector has positive cases.
        for name in BUILTIN {
            assert!(
                POSITIVE.iter().any(|(n, _, _)| n == name),
                "no positive case for {name}"
            );
        }
    }

    #[test]
    fn negative_corpus_is_not_found() {
        for (name, text) in NEGATIVE {
            assert!(
                hits(name, text).is_empty(),
                "{name} wrongly found {:?} in {text:?}",
                hits(name, text)
            );
        }
        for name in BUILTIN {
            assert!(
                NEGATIVE.iter().any(|(n, _)| n == name),
                "no negative case for {name}"
            );
        }
    }

    #[test]
    fn checksums() {
        assert!(valid_card("4111111111111111"));
        assert!(!valid_card("4111111111111112"));
        assert!(valid_iban("DE89370400440532013000"));
        assert!(!valid_iban("DE89370400440532013001"));
        assert!(valid_iban("NO9386011117947"));
        assert!(valid_ssn("123-45-6789"));
        assert!(!valid_ssn("666-45-6789"));
    }
}
