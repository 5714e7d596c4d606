//! Media types (RFC 9110 §8.3.1), sans-IO: what a `Content-Type` header says, parsed rather
//! than compared as a string. Real clients are lenient (the Python SDK takes any type that
//! *starts with* `application/json`, the TypeScript SDK any that *contains* it), so Airlock
//! decides on the parsed type and refuses what it cannot parse: lists, duplicates, charsets
//! other than UTF-8.
//!
//! Parameters are read as RFC 2045, 2231 and 8187 define them, because the header parsers of
//! real clients do: Python's `email.message` (httpx and httpx2 take a response's charset from
//! it, and decode event streams with it) honours `charset*=utf-8''utf-7` and continuations
//! (`charset*0=utf; charset*1=-7`) as well as `charset=utf-7`. Names compare without case;
//! values may be quoted strings; an extended value (`name*=charset'language'%XX...`) is
//! percent-decoded in its own charset. For the charset itself Airlock is stricter than any
//! of them: one declaration, in one notation, not split into sections, naming UTF-8 — else
//! the header is refused (what a client would decode the body with is then in doubt).

use thiserror::Error;

/// Why a `Content-Type` is refused; the text names the header's problem for the peer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MediaError {
    #[error("more than one Content-Type header")]
    Several,
    #[error("a Content-Type that is not visible ASCII")]
    NotAscii,
    #[error("a Content-Type that is not one media type: {0:?}")]
    Malformed(String),
    #[error("a Content-Type that declares its charset more than once")]
    CharsetTwice,
    #[error(
        "a Content-Type that declares its charset in two notations (`charset=` and `charset*=`)"
    )]
    CharsetTwoNotations,
    #[error("a Content-Type that splits its charset into sections (`{0}=`)")]
    CharsetSections(String),
    #[error("a Content-Type whose extended charset parameter is malformed: {0:?}")]
    CharsetExtended(String),
    #[error(
        "a Content-Type whose extended charset parameter is itself written in `{0}`: only UTF-8 or US-ASCII are read"
    )]
    CharsetEncodedIn(String),
    #[error("a Content-Type that declares charset `{0}`: only UTF-8 is accepted")]
    NotUtf8(String),
}

/// A parsed `type/subtype; name=value` header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaType {
    /// `type/subtype`, lowercase.
    pub essence: String,
    /// Parameters in the order written, names lowercase, values unquoted (an extended value
    /// still percent-encoded).
    params: Vec<Param>,
}

/// One `name=value` as written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Param {
    /// The name before any `*`, lowercase (`charset` for `Charset*0*`).
    base: String,
    notation: Notation,
    value: String,
}

/// How a parameter is written (RFC 2231 §3, §4).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Notation {
    /// `name=value` or `name="value"`.
    Plain,
    /// `name*=charset'language'percent-encoded`.
    Extended,
    /// `name*N=value` or `name*N*=percent-encoded`: section N of a continued value.
    Section { index: u32, extended: bool },
    /// `name*something-else`: no notation any parser agrees on.
    Unknown(String),
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl MediaType {
    /// Parse one header value: exactly one well-formed media type, its parameters tokens or
    /// quoted strings.
    pub fn parse(value: &str) -> Result<MediaType, MediaError> {
        let malformed = || MediaError::Malformed(value.to_owned());
        let mut parts = split_params(value).ok_or_else(malformed)?.into_iter();
        let essence = parts.next().ok_or_else(malformed)?;
        let (ty, sub) = essence.trim().split_once('/').ok_or_else(malformed)?;
        if !is_token(ty) || !is_token(sub) {
            return Err(malformed());
        }
        let mut params = Vec::new();
        for p in parts {
            let p = p.trim();
            if p.is_empty() {
                continue;
            }
            let (name, v) = p.split_once('=').ok_or_else(malformed)?;
            if !is_token(name) {
                return Err(malformed());
            }
            let v = if let Some(q) = v.strip_prefix('"') {
                unquote(q).ok_or_else(malformed)?
            } else if is_token(v) {
                v.to_owned()
            } else {
                return Err(malformed());
            };
            let name = name.to_ascii_lowercase();
            let (base, notation) = notation(&name);
            params.push(Param {
                base: base.to_owned(),
                notation,
                value: v,
            });
        }
        Ok(MediaType {
            essence: format!("{}/{}", ty.to_ascii_lowercase(), sub.to_ascii_lowercase()),
            params,
        })
    }

    /// The value of parameter `name` (lowercase), as RFC 2231 reads it: a plain value, an
    /// extended one decoded, or sections joined. `None` when it is absent, or given in a way
    /// that does not read as one value (twice, in two notations, malformed).
    pub fn param(&self, name: &str) -> Option<String> {
        let mine: Vec<&Param> = self.params.iter().filter(|p| p.base == name).collect();
        match mine.as_slice() {
            [] => None,
            [p] if p.notation == Notation::Plain => Some(p.value.clone()),
            [p] if p.notation == Notation::Extended => decode_extended(&p.value).ok(),
            sections => join_sections(sections),
        }
    }

    /// The declared charset, lowercase: `None` when there is none. Refused when it is given
    /// more than once, in two notations, in sections, or in an extended value that is
    /// malformed or written in an encoding that is not ASCII-compatible.
    pub fn charset(&self) -> Result<Option<String>, MediaError> {
        let declared: Vec<&Param> = self.params.iter().filter(|p| p.base == "charset").collect();
        for p in &declared {
            match &p.notation {
                Notation::Section { index, extended } => {
                    let star = if *extended { "*" } else { "" };
                    return Err(MediaError::CharsetSections(format!(
                        "charset*{index}{star}"
                    )));
                }
                Notation::Unknown(name) => {
                    return Err(MediaError::CharsetSections(name.clone()));
                }
                Notation::Plain | Notation::Extended => {}
            }
        }
        let p = match declared.as_slice() {
            [] => return Ok(None),
            [p] => p,
            several if several.iter().all(|p| p.notation == several[0].notation) => {
                return Err(MediaError::CharsetTwice);
            }
            _ => return Err(MediaError::CharsetTwoNotations),
        };
        let value = match p.notation {
            Notation::Extended => decode_extended(&p.value)?,
            _ => p.value.clone(),
        };
        Ok(Some(value.to_ascii_lowercase()))
    }

    /// No charset, or one charset naming UTF-8 (`utf-8` or `utf8` in any case, quoted or in
    /// extended notation: the spellings both Python's codecs and the WHATWG Encoding
    /// standard know): the only text Airlock reads.
    pub fn require_utf8(&self) -> Result<(), MediaError> {
        match self.charset()? {
            None => Ok(()),
            Some(c) if matches!(c.as_str(), "utf-8" | "utf8") => Ok(()),
            Some(c) => Err(MediaError::NotUtf8(c)),
        }
    }
}

/// `base` and notation of a lowercase parameter name (`charset*1*` → `charset`, section 1,
/// extended).
fn notation(name: &str) -> (&str, Notation) {
    let Some((base, rest)) = name.split_once('*') else {
        return (name, Notation::Plain);
    };
    if rest.is_empty() {
        return (base, Notation::Extended);
    }
    let (digits, extended) = match rest.strip_suffix('*') {
        Some(d) => (d, true),
        None => (rest, false),
    };
    let canonical = digits == "0" || (!digits.starts_with('0') && digits.len() <= 9);
    match digits.parse::<u32>() {
        Ok(index) if canonical && digits.bytes().all(|b| b.is_ascii_digit()) => {
            (base, Notation::Section { index, extended })
        }
        _ => (base, Notation::Unknown(name.to_owned())),
    }
}

/// The inside of a quoted string (after its opening quote): its value with quoted pairs
/// resolved; `None` unless it ends exactly at its closing quote.
fn unquote(q: &str) -> Option<String> {
    let inner = q.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// An extended value `charset'language'percent-encoded` (RFC 8187 §3.2), decoded. Its own
/// charset must be empty, UTF-8 or US-ASCII (the ones every reader decodes alike).
fn decode_extended(value: &str) -> Result<String, MediaError> {
    let malformed = || MediaError::CharsetExtended(value.to_owned());
    let mut parts = value.splitn(3, '\'');
    let (Some(charset), Some(_language), Some(encoded)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let charset = charset.to_ascii_lowercase();
    if !ascii_compatible(&charset) {
        return Err(MediaError::CharsetEncodedIn(charset));
    }
    let bytes = percent_decode(encoded).ok_or_else(malformed)?;
    String::from_utf8(bytes).map_err(|_| malformed())
}

/// The charsets of an extended value that every reader decodes alike (lowercase).
fn ascii_compatible(charset: &str) -> bool {
    matches!(charset, "" | "utf-8" | "utf8" | "us-ascii")
}

/// `%XX` escapes decoded; `None` for a `%` without two hex digits, or a character RFC 8187
/// requires to be escaped (`'`, `*`, `%` itself).
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'\'' | b'*' => return None,
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Sections `name*0`, `name*1`... joined (RFC 2231 §3, §4.1): numbered from 0 without gaps
/// or repeats, section 0 extended or not, no plain or extended value beside them.
fn join_sections(params: &[&Param]) -> Option<String> {
    let mut sections: Vec<(u32, bool, &str)> = Vec::with_capacity(params.len());
    for p in params {
        match p.notation {
            Notation::Section { index, extended } => sections.push((index, extended, &p.value)),
            _ => return None,
        }
    }
    sections.sort_by_key(|s| s.0);
    let mut out = Vec::new();
    let mut first_charset_ok = true;
    for (i, (index, extended, value)) in sections.iter().enumerate() {
        if *index as usize != i {
            return None;
        }
        if !extended {
            out.extend_from_slice(value.as_bytes());
        } else if i == 0 {
            let (charset, rest) = value.split_once('\'')?;
            let (_language, encoded) = rest.split_once('\'')?;
            first_charset_ok = ascii_compatible(&charset.to_ascii_lowercase());
            out.extend(percent_decode(encoded)?);
        } else {
            out.extend(percent_decode(value)?);
        }
    }
    if !first_charset_ok {
        return None;
    }
    String::from_utf8(out).ok()
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
pub fn content_type(headers: &http::HeaderMap) -> Result<Option<MediaType>, MediaError> {
    let mut values = headers.get_all(http::header::CONTENT_TYPE).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(MediaError::Several);
    }
    let text = first.to_str().map_err(|_| MediaError::NotAscii)?;
    MediaType::parse(text).map(Some)
}

/// The `Content-Type` of a header map when it says nothing but UTF-8 text may follow: none,
/// or one media type whose charset (if any) is UTF-8, declared once.
pub fn utf8_content_type(headers: &http::HeaderMap) -> Result<Option<MediaType>, MediaError> {
    let ct = content_type(headers)?;
    if let Some(m) = &ct {
        m.require_utf8()?;
    }
    Ok(ct)
}

#[cfg(test)]
mod tests;
