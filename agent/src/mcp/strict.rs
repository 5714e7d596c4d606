//! Strict JSON, sans-IO: the one reader of every JSON text Airlock judges (request bodies,
//! JSON responses, SSE data).
//!
//! Real MCP peers are lenient in different ways (notes/MCP-PROTOCOL.md): Python's
//! `json.loads(bytes)` decodes a byte-order mark and UTF-16/32, `pydantic_core` accepts `NaN`,
//! JavaScript's `JSON.parse` keeps lone surrogates and rounds integers past 2^53, Go's
//! `encoding/json` matches object keys case-insensitively, and every one of them lets a repeated
//! key win silently. A text that two parsers read differently is a way around the policy: the
//! policy judges one value, the server executes another. So Airlock accepts only the texts on
//! which they all agree, and refuses the rest with a reason:
//!
//! - UTF-8 only: no byte-order mark, no UTF-16/32, no invalid sequence (serde_json);
//! - no `NaN`, `Infinity`, comments, trailing commas or trailing data (serde_json);
//! - no lone surrogate in a `\u` escape (serde_json);
//! - no two keys of one object that are equal or equal under case folding
//!   (`"name"`/`"Name"`, `"s"`/`"ſ"`, `"k"`/`"K"` — Kelvin sign);
//! - no integer literal beyond the 64-bit range (Python keeps it exact, serde_json and
//!   JavaScript round it: the value judged would not be the value used);
//! - nesting at most [`MAX_DEPTH`] deep.
//!
//! Parsing also has a memory cost far above the text's size (an 8 MiB array of small numbers
//! becomes ~128 MiB of values): [`parsed_size_estimate`] bounds it before a byte is parsed, so
//! the caller can charge it to a budget.

use std::{collections::HashSet, fmt};

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Deepest nesting of arrays and objects accepted.
pub const MAX_DEPTH: usize = 64;
/// Largest integer JavaScript represents exactly (ids are compared within it).
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Why a text was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrictError(pub String);

impl fmt::Display for StrictError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StrictError {}

/// Parse `bytes` as strict JSON (see the module documentation).
pub fn parse(bytes: &[u8]) -> Result<Value, StrictError> {
    if let Some(why) = foreign_encoding(bytes) {
        return Err(StrictError(why.into()));
    }
    check_integer_literals(bytes)?;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = StrictSeed { depth: 0 }
        .deserialize(&mut de)
        .map_err(|e| StrictError(e.to_string()))?;
    de.end().map_err(|e| StrictError(e.to_string()))?;
    Ok(value)
}

/// Integer literals must fit in 64 bits (`i64` or `u64`): serde_json reads a longer one as a
/// float, Python as the exact integer. One pass over the text, strings skipped.
fn check_integer_literals(bytes: &[u8]) -> Result<(), StrictError> {
    let n = bytes.len();
    let mut i = 0;
    while i < n {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < n {
                    match bytes[i] {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while i < n && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                    i += 1;
                }
                let literal = &bytes[start..i];
                if literal.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
                    continue;
                }
                let fits = std::str::from_utf8(literal)
                    .ok()
                    .and_then(|t| t.parse::<i128>().ok())
                    .is_some_and(|v| v >= i128::from(i64::MIN) && v <= i128::from(u64::MAX));
                if !fits {
                    return Err(StrictError(format!(
                        "the integer {} is beyond 64 bits: parsers would read different values",
                        String::from_utf8_lossy(&literal[..literal.len().min(40)])
                    )));
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// A byte-order mark or the NUL bytes of UTF-16/32 text: what Python's `json.loads(bytes)`
/// would decode and Airlock refuses (named, so the error says why).
fn foreign_encoding(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        return Some("a UTF-8 byte-order mark is not allowed before JSON");
    }
    if bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\xFE\xFF") {
        return Some("UTF-16/32 text is not allowed: JSON must be UTF-8");
    }
    if bytes.iter().take(4).any(|b| *b == 0) {
        return Some("UTF-16/32 text (NUL bytes) is not allowed: JSON must be UTF-8");
    }
    None
}

/// Whether `bytes` would be taken for JSON by a lenient reader: decoded as Python's
/// `json.loads(bytes)` decodes (a byte-order mark, or the NUL pattern of UTF-16/32, else
/// UTF-8), after any amount of whitespace (Unicode spaces and controls too), the first
/// character opens an object or an array. Such a body is never passed on as "not JSON".
pub fn looks_like_json(bytes: &[u8]) -> bool {
    let b = |i: usize| bytes.get(i).copied().unwrap_or(1);
    let opens = |c: char| c == '{' || c == '[';
    let skippable = |c: char| c.is_whitespace() || c.is_control() || c == '\u{feff}';
    let first = |chars: &mut dyn Iterator<Item = char>| {
        for c in chars {
            if !skippable(c) {
                return opens(c);
            }
        }
        false
    };
    let units16 = |rest: &[u8], le: bool| -> Vec<u16> {
        rest.chunks_exact(2)
            .map(|c| {
                if le {
                    u16::from_le_bytes([c[0], c[1]])
                } else {
                    u16::from_be_bytes([c[0], c[1]])
                }
            })
            .collect()
    };
    let utf16 = |rest: &[u8], le: bool| {
        let units = units16(rest, le);
        first(&mut char::decode_utf16(units).map(|r| r.unwrap_or('\u{fffd}')))
    };
    let utf32 = |rest: &[u8], le: bool| {
        first(&mut rest.chunks_exact(4).map(|c| {
            let n = if le {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]])
            } else {
                u32::from_be_bytes([c[0], c[1], c[2], c[3]])
            };
            char::from_u32(n).unwrap_or('\u{fffd}')
        }))
    };
    if let Some(rest) = bytes.strip_prefix(b"\xEF\xBB\xBF") {
        return first(&mut String::from_utf8_lossy(rest).chars());
    }
    if let Some(rest) = bytes.strip_prefix(b"\xFF\xFE\x00\x00") {
        return utf32(rest, true);
    }
    if let Some(rest) = bytes.strip_prefix(b"\x00\x00\xFE\xFF") {
        return utf32(rest, false);
    }
    if let Some(rest) = bytes.strip_prefix(b"\xFF\xFE") {
        return utf16(rest, true);
    }
    if let Some(rest) = bytes.strip_prefix(b"\xFE\xFF") {
        return utf16(rest, false);
    }
    if b(0) == 0 {
        return if b(1) == 0 {
            utf32(bytes, false)
        } else {
            utf16(bytes, false)
        };
    }
    if b(1) == 0 {
        return if b(2) == 0 && b(3) == 0 {
            utf32(bytes, true)
        } else {
            utf16(bytes, true)
        };
    }
    // UTF-8 (JavaScript's TextDecoder, and Python without a BOM), lossily, without a horizon.
    first(&mut String::from_utf8_lossy(bytes).chars())
}

/// An upper bound of the memory `parse` can allocate for `bytes`: the text itself twice
/// (strings, and the vectors growing), plus a value slot and its share of a map node per
/// structural character outside strings. Cheap (one pass, no allocation).
pub fn parsed_size_estimate(bytes: &[u8]) -> usize {
    let mut structural = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'[' | b'{' | b',' | b':' => structural += 1,
                _ => {}
            }
        }
    }
    bytes
        .len()
        .saturating_mul(2)
        .saturating_add(structural.saturating_mul(64))
}

/// The estimate of a typical JSON text of `len` bytes (objects of short strings and numbers):
/// a parsing budget must hold at least this for texts of that size to pass.
pub fn parsed_size_estimate_bound(len: usize) -> usize {
    len.saturating_mul(16)
}

/// `key` under simple case folding (what Go's `encoding/json` and friends match on): ASCII
/// lowercased, other characters upper- then lowercased, so `ſ` (U+017F) becomes `s` and the
/// Kelvin sign `K` (U+212A) becomes `k`.
pub fn fold(key: &str) -> std::borrow::Cow<'_, str> {
    if key.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()) {
        return std::borrow::Cow::Borrowed(key);
    }
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else {
            for u in c.to_uppercase() {
                out.extend(u.to_lowercase());
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

struct StrictSeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for StrictSeed {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor { depth: self.depth })
    }
}

struct StrictVisitor {
    depth: usize,
}

impl StrictVisitor {
    fn nested<E: de::Error>(&self) -> Result<usize, E> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(E::custom(format_args!(
                "JSON nested deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(depth)
    }
}

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let depth = self.nested()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(v) = seq.next_element_seed(StrictSeed { depth })? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let depth = self.nested()?;
        let mut out = Map::new();
        // Folded keys seen so far: a linear scan while the object is small, a set after.
        let mut folded: Vec<String> = Vec::new();
        let mut folded_set: Option<HashSet<String>> = None;
        while let Some(key) = map.next_key::<String>()? {
            let f = fold(&key).into_owned();
            let seen = match &mut folded_set {
                Some(set) => !set.insert(f),
                None => {
                    let seen = folded.contains(&f);
                    folded.push(f);
                    if folded.len() > 16 {
                        folded_set = Some(folded.drain(..).collect());
                    }
                    seen
                }
            };
            if seen {
                return Err(de::Error::custom(format_args!(
                    "the key {key:?} appears twice in one object (compared ignoring case): parsers disagree on which one wins"
                )));
            }
            let value = map.next_value_seed(StrictSeed { depth })?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(text: &[u8]) -> String {
        parse(text).expect_err(&String::from_utf8_lossy(text)).0
    }

    #[test]
    fn ordinary_json_parses_to_the_same_value_as_serde_json() {
        for text in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":[1,2.5,-3,true,null,"é\u00e9\ud83d\ude00"]}}}"#,
            "[]",
            " \r\n\t{\"a\" : 1 } \n",
            r#"{"a":9007199254740991,"b":-9007199254740991,"c":1e300,"d":-0}"#,
        ] {
            let strict = parse(text.as_bytes()).unwrap();
            let loose: Value = serde_json::from_str(text).unwrap();
            assert_eq!(strict, loose, "{text}");
        }
    }

    #[test]
    fn encodings_other_than_plain_utf8_are_refused() {
        assert!(refused(b"\xEF\xBB\xBF{}").contains("byte-order mark"));
        assert!(refused(b"\xFF\xFE{\x00}\x00").contains("UTF-16"));
        assert!(refused(b"{\x00}\x00").contains("UTF-16"));
        assert!(refused(b"\x00\x00\x00{").contains("UTF-16"));
        assert!(parse(b"{\"a\":\"\xC3\x28\"}").is_err());
    }

    #[test]
    fn duplicate_and_folded_keys_are_refused() {
        assert!(refused(br#"{"name":"safe","name":"dangerous"}"#).contains("twice"));
        assert!(refused(br#"{"name":"safe","Name":"dangerous"}"#).contains("twice"));
        // Kelvin sign and long s fold onto ASCII letters.
        assert!(refused("{\"kind\":1,\"\u{212A}ind\":2}".as_bytes()).contains("twice"));
        assert!(refused("{\"sql\":1,\"\u{17F}ql\":2}".as_bytes()).contains("twice"));
        // Past the linear scan, the set takes over.
        let mut many: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
        many.push("\"K7\":0".into());
        assert!(refused(format!("{{{}}}", many.join(",")).as_bytes()).contains("twice"));
        // Distinct keys in different objects are fine.
        parse(br#"{"a":{"name":1},"b":{"name":2}}"#).unwrap();
    }

    #[test]
    fn integers_past_64_bits_are_refused() {
        assert!(refused(b"[18446744073709551616]").contains("64 bits"));
        assert!(refused(b"[-9223372036854775809]").contains("64 bits"));
        assert!(refused(b"{\"a\":[1,123456789012345678901234567890]}").contains("64 bits"));
        parse(b"[18446744073709551615,-9223372036854775808,1e16,1e300,-0]").unwrap();
        // Digits inside strings are not numbers.
        parse(b"[\"123456789012345678901234567890\\\"\",1]").unwrap();
        assert!(parse(b"[NaN]").is_err());
        assert!(parse(b"[Infinity]").is_err());
        assert!(parse(b"[1e400]").is_err());
        assert_eq!(parse(b"[1.5e3]").unwrap(), json!([1500.0]));
    }

    #[test]
    fn lone_surrogates_comments_and_trailing_data_are_refused() {
        assert!(parse(br#"["\ud800"]"#).is_err());
        assert!(parse(br#"["\udc00x"]"#).is_err());
        assert!(parse(b"{} {}").is_err());
        assert!(parse(b"[1,]").is_err());
        assert!(parse(b"/*x*/{}").is_err());
        assert!(parse(b"{\"a\":\"\x01\"}").is_err());
    }

    #[test]
    fn depth_is_bounded() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        parse(ok.as_bytes()).unwrap();
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(refused(deep.as_bytes()).contains("deeper"));
        let deeper = "[".repeat(100_000);
        assert!(parse(deeper.as_bytes()).is_err());
    }

    #[test]
    fn lenient_json_detection_sees_through_encodings() {
        assert!(looks_like_json(b"  {\"a\":1}"));
        assert!(looks_like_json(b"\xEF\xBB\xBF{}"));
        assert!(looks_like_json(b"\xFF\xFE{\x00}\x00"));
        assert!(looks_like_json(b"{\x00\"\x00"));
        assert!(looks_like_json("\u{a0}\u{2028}[1]".as_bytes()));
        assert!(looks_like_json(b"\x0c\x0b[1]"));
        assert!(!looks_like_json(b"grant_type=client_credentials"));
        assert!(!looks_like_json(b""));
    }

    #[test]
    fn folding() {
        assert_eq!(fold("Name"), "name");
        assert_eq!(fold("\u{212A}ey"), "key");
        assert_eq!(fold("\u{17F}ql"), "sql");
        assert_eq!(fold("plain"), "plain");
    }

    #[test]
    fn lenient_detection_has_no_horizon() {
        let mut far = vec![b' '; 100_000];
        far.extend_from_slice(b"{\"jsonrpc\":\"2.0\"}");
        assert!(looks_like_json(&far));
        let mut wide = vec![0xFF, 0xFE];
        for c in "\u{2028}  [1]".encode_utf16() {
            wide.extend_from_slice(&c.to_le_bytes());
        }
        assert!(looks_like_json(&wide));
        let mut wide32 = Vec::new();
        for c in " {}".chars() {
            wide32.extend_from_slice(&(c as u32).to_le_bytes());
        }
        assert!(looks_like_json(&wide32));
    }

    #[test]
    fn structure_inside_strings_costs_nothing_extra() {
        let commas = format!("[\"{}\"]", ",".repeat(100_000));
        assert!(parsed_size_estimate(commas.as_bytes()) < 300_000);
    }

    #[test]
    fn parsed_size_is_bounded_above() {
        let small_numbers = format!("[{}1]", "1,".repeat(100_000));
        let est = parsed_size_estimate(small_numbers.as_bytes());
        // 100k values of 32 bytes each at least.
        assert!(est > 100_000 * 32, "{est}");
    }
}
