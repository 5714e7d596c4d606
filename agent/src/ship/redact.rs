//! Bucket errors as operators see them (logs, `airlock status`, `last_error`): short, and
//! without what a server echoes back.
//!
//! `object_store` puts the server's whole answer body in its error text. An S3
//! `SignatureDoesNotMatch` body carries the `CanonicalRequest` and `StringToSign` the server
//! computed — every signed header, `x-amz-security-token` included. Kept: the text before the
//! body (method, URL, status), the body's `<Code>` and, cut short, its `<Message>`; never the
//! rest of the body.

/// The most an error text may take, in bytes.
pub const MAX_ERROR_BYTES: usize = 512;
/// The most a server's `<Message>` may take, in bytes.
const MAX_MESSAGE_BYTES: usize = 160;

/// `e` as it may be logged and shown.
pub fn error(e: &dyn std::fmt::Display) -> String {
    text(&e.to_string())
}

/// Redact and bound an error text.
pub fn text(full: &str) -> String {
    // The answer body starts at its XML (or at the first echo of a signing input, if a server
    // sent those outside XML).
    let body_at = ["<?xml", "<Error", "CanonicalRequest", "StringToSign"]
        .iter()
        .filter_map(|m| full.find(m))
        .min();
    let mut out = match body_at {
        None => full.to_owned(),
        Some(at) => {
            let (head, body) = full.split_at(at);
            let mut out = head.trim_end().trim_end_matches(':').to_owned();
            if let Some(code) = element(body, "Code") {
                out.push_str(&format!(": {}", cut(code, 64)));
            }
            if let Some(message) = element(body, "Message") {
                out.push_str(&format!(" ({})", cut(message, MAX_MESSAGE_BYTES)));
            }
            out
        }
    };
    // A message or URL with a signing input in it is not shown at all.
    for marker in ["CanonicalRequest", "StringToSign", "x-amz-security-token"] {
        if let Some(at) = out.find(marker) {
            out.truncate(at);
            out.push_str("[redacted]");
        }
    }
    cut(&out, MAX_ERROR_BYTES).to_owned()
}

/// The text of the first `<name>…</name>`, if any (no nested elements in S3 error bodies).
fn element<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find(&format!("</{name}>"))?;
    Some(body[start..start + len].trim())
}

/// At most `max` bytes of `s`, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_error_keeps_status_and_code_but_not_the_signing_input() {
        let full = format!(
            "Generic S3 error: Error performing PUT http://127.0.0.1:9000/fleet/k in 3ms - Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match</Message><CanonicalRequest>PUT\n/fleet/k\nx-amz-security-token:SECRET-TOKEN\n{}</CanonicalRequest><StringToSign>AWS4-HMAC-SHA256</StringToSign></Error>",
            "x".repeat(5000)
        );
        let t = text(&full);
        assert!(t.len() <= MAX_ERROR_BYTES, "{t}");
        assert!(t.contains("403 Forbidden"), "{t}");
        assert!(t.contains("SignatureDoesNotMatch"), "{t}");
        assert!(t.contains("does not match"), "{t}");
        assert!(
            !t.contains("SECRET-TOKEN") && !t.contains("CanonicalRequest"),
            "{t}"
        );
        let plain = "connection refused";
        assert_eq!(text(plain), plain);
        let long = "é".repeat(1000);
        assert!(text(&long).len() <= MAX_ERROR_BYTES);
    }
}
