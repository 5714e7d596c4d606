//! Media types (RFC 9110 §8.3.1), sans-IO: what a `Content-Type` header says, parsed rather
//! than compared as a string. Real clients are lenient (the Python SDK takes any type that
//! *starts with* `application/json`, the TypeScript SDK any that *contains* it), so Airlock
//! decides on the parsed type and refuses what it cannot parse: lists, duplicates, charsets
//! other than UTF-8.

/// A parsed `type/subtype; name=value` header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaType {
    /// `type/subtype`, lowercase.
    pub essence: String,
    /// Parameters, names lowercase, values unquoted.
    pub params: Vec<(String, String)>,
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl MediaType {
    /// Parse one header value; `None` when it is not exactly one well-formed media type.
    pub fn parse(value: &str) -> Option<MediaType> {
        let mut parts = split_params(value)?.into_iter();
        let essence = parts.next()?;
        let (ty, sub) = essence.trim().split_once('/')?;
        if !is_token(ty) || !is_token(sub) {
            return None;
        }
        let mut params = Vec::new();
        for p in parts {
            let p = p.trim();
            if p.is_empty() {
                continue;
            }
            let (name, v) = p.split_once('=')?;
            if !is_token(name) {
                return None;
            }
            let v = if let Some(q) = v.strip_prefix('"') {
                let inner = q.strip_suffix('"')?;
                let mut out = String::new();
                let mut chars = inner.chars();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => out.push(chars.next()?),
                        '"' => return None,
                        c => out.push(c),
                    }
                }
                out
            } else if is_token(v) {
                v.to_owned()
            } else {
                return None;
            };
            params.push((name.to_ascii_lowercase(), v));
        }
        Some(MediaType {
            essence: format!("{}/{}", ty.to_ascii_lowercase(), sub.to_ascii_lowercase()),
            params,
        })
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// No `charset`, or `charset=utf-8` (any case, once): the only text Airlock reads.
    pub fn utf8(&self) -> bool {
        let charsets: Vec<&str> = self
            .params
            .iter()
            .filter(|(n, _)| n == "charset")
            .map(|(_, v)| v.as_str())
            .collect();
        match charsets.as_slice() {
            [] => true,
            [c] => c.eq_ignore_ascii_case("utf-8") || c.eq_ignore_ascii_case("utf8"),
            _ => false,
        }
    }
}

/// Split at `;` outside quoted strings. `None` when the value holds a list (`,` outside
/// quotes) or an unterminated quote.
fn split_params(value: &str) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in value.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                out.push(&value[start..i]);
                start = i + 1;
            }
            ',' if !quoted => return None,
            _ => {}
        }
    }
    if quoted {
        return None;
    }
    out.push(&value[start..]);
    Some(out)
}

/// The `Content-Type` of a header map: `Ok(None)` without one, `Err` when there are several
/// or it does not parse.
pub fn content_type(headers: &http::HeaderMap) -> Result<Option<MediaType>, String> {
    let mut values = headers.get_all(http::header::CONTENT_TYPE).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("more than one Content-Type header".into());
    }
    let text = first
        .to_str()
        .map_err(|_| "a Content-Type that is not visible ASCII".to_owned())?;
    MediaType::parse(text)
        .map(Some)
        .ok_or_else(|| format!("a Content-Type that is not one media type: {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_types_and_parameters() {
        let m = MediaType::parse("Application/JSON ; Charset=\"UTF-8\"").unwrap();
        assert_eq!(m.essence, "application/json");
        assert_eq!(m.param("charset"), Some("UTF-8"));
        assert!(m.utf8());
        let m = MediaType::parse("text/event-stream").unwrap();
        assert_eq!(m.essence, "text/event-stream");
        assert!(m.utf8());
        assert_eq!(
            MediaType::parse("text/plain; x=\"a;b,c\"")
                .unwrap()
                .param("x"),
            Some("a;b,c")
        );
    }

    #[test]
    fn refuses_what_lenient_clients_read_differently() {
        for bad in [
            "application/json, text/plain",
            "application/json text/plain",
            "application/json; charset",
            "application/json; charset=\"utf-8",
            "text/plain; x=application/json",
            "json",
            "/json",
            "application/",
            "",
        ] {
            assert_eq!(MediaType::parse(bad), None, "{bad}");
        }
        // Parsed, but not what a JSON or an event-stream response is.
        for other in [
            "application/jsonx",
            "application/json-rpc",
            "text/plain; x=\"application/json\"",
            "application/vnd.api+json",
        ] {
            let m = MediaType::parse(other).unwrap();
            assert_ne!(m.essence, "application/json", "{other}");
        }
        assert!(
            !MediaType::parse("application/json; charset=utf-16")
                .unwrap()
                .utf8()
        );
        assert!(
            !MediaType::parse("application/json; charset=utf-8; charset=latin1")
                .unwrap()
                .utf8()
        );
    }

    #[test]
    fn header_maps_with_several_types_are_refused() {
        let mut h = http::HeaderMap::new();
        assert_eq!(content_type(&h), Ok(None));
        h.append(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        );
        assert!(content_type(&h).unwrap().is_some());
        h.append(http::header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(content_type(&h).is_err());
    }
}
