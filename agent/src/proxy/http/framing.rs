//! Where each request of a client connection begins, sans-IO, so that Airlock reads every
//! request head before hyper does: hyper answers a head it cannot parse with an empty 400,
//! Airlock with a 400 (or 431) whose body says what is wrong, and an HTTP/2 connection preface
//! with an HTTP/2 GOAWAY that says Airlock speaks HTTP/1.1.
//!
//! The verdict on a head is httparse's, with hyper's configuration (the same crate hyper
//! parses with, so a head passes here exactly when it would pass there), plus hyper's own
//! checks of `Content-Length` and `Transfer-Encoding`. Bodies are followed by their
//! `Content-Length` or their chunks so the next head is found; a request whose framing is
//! not followed exactly (an upgrade, CONNECT, chunk syntax beyond the plain one) stops the
//! checks for the rest of the connection: hyper still parses everything, this only decides
//! whether Airlock answers first. It never changes a byte.

use http::StatusCode;
use thiserror::Error;

/// The largest request head read (hyper's `max_buf_size` in `super::serve`).
pub const MAX_HEAD: usize = 64 * 1024;
/// Header lines per request (hyper's default).
const MAX_HEADERS: usize = 100;
/// Longest chunk extension or trailer section followed; past it, checks stop.
const MAX_CHUNK_META: usize = 16 * 1024;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Why a request head is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Malformed {
    #[error(
        "an HTTP/2 connection preface (`PRI * HTTP/2.0`): Airlock speaks HTTP/1.1 only, without upgrades"
    )]
    Http2Preface,
    #[error("the request head is larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("the request has more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("{what}{}", quoted(.line))]
    Head { what: String, line: Option<String> },
}

/// `: "the line"` when there is one.
fn quoted(line: &Option<String>) -> String {
    line.as_ref()
        .map(|l| format!(": {l:?}"))
        .unwrap_or_default()
}

impl Malformed {
    pub fn status(&self) -> StatusCode {
        match self {
            Malformed::TooLarge | Malformed::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The bytes Airlock answers with before it closes the connection.
    pub fn answer(&self) -> Vec<u8> {
        if *self == Malformed::Http2Preface {
            return h2_goaway(&format!("Airlock: {self}"));
        }
        let body = format!("Airlock: malformed HTTP request: {self}\n");
        let status = self.status();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }
}

/// An empty SETTINGS frame (the server's connection preface), then GOAWAY with
/// `HTTP_1_1_REQUIRED` (RFC 9113 §7) and `debug` as its debug data.
fn h2_goaway(debug: &str) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    let len = 8 + debug.len();
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&0u32.to_be_bytes()); // last stream id
    out.extend_from_slice(&0xdu32.to_be_bytes()); // HTTP_1_1_REQUIRED
    out.extend_from_slice(debug.as_bytes());
    out
}

/// What to do with the bytes read and not yet handed on.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The first `n` bytes may go to hyper.
    Pass(usize),
    /// Nothing is decided before more bytes arrive.
    More,
    /// The request head at the start of the bytes is refused.
    Refuse(Malformed),
}

/// Where the connection's bytes are.
#[derive(Debug, Default)]
pub struct Framer {
    state: State,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum State {
    /// Before a request head.
    #[default]
    Head,
    /// Inside a body of this many more bytes.
    Length(u64),
    Chunked(Chunk),
    /// Past a request whose framing is not followed: everything passes unchecked.
    Unchecked,
}

/// Inside a chunked body (RFC 9112 §7.1), strictly: anything else ends the checks.
#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of a chunk size read so far (their value, their count).
    Size {
        size: u64,
        digits: u8,
    },
    /// A chunk extension up to its CR (its length so far).
    Extension {
        size: u64,
        len: usize,
    },
    /// The LF after a size line.
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// Trailer lines after the last chunk (bytes so far, bytes of the current line).
    Trailers {
        len: usize,
        line: usize,
    },
    /// The LF ending a trailer line (the line had `line` bytes before its CR).
    TrailerLf {
        len: usize,
        line: usize,
    },
}

impl Framer {
    /// Judge `input`, the bytes read and not yet handed on (at most [`MAX_HEAD`] plus a
    /// read's worth in a head).
    pub fn step(&mut self, input: &[u8]) -> Step {
        match &mut self.state {
            State::Unchecked => Step::Pass(input.len()),
            State::Length(left) => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                *left -= n as u64;
                if *left == 0 {
                    self.state = State::Head;
                }
                Step::Pass(n)
            }
            State::Chunked(_) => Step::Pass(self.chunked(input)),
            State::Head => self.head(input),
        }
    }

    fn head(&mut self, input: &[u8]) -> Step {
        if input.starts_with(&H2_PREFACE[..14]) {
            return Step::Refuse(Malformed::Http2Preface);
        }
        if H2_PREFACE.starts_with(input) {
            return Step::More;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(input) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if input.len() >= MAX_HEAD => {
                return Step::Refuse(Malformed::TooLarge);
            }
            Ok(httparse::Status::Partial) => return Step::More,
            Err(httparse::Error::TooManyHeaders) => {
                return Step::Refuse(Malformed::TooManyHeaders);
            }
            Err(e) => return Step::Refuse(describe(e, req.method.is_some(), input)),
        };
        if len > MAX_HEAD {
            return Step::Refuse(Malformed::TooLarge);
        }
        match body_of(&req) {
            Ok(state) => {
                self.state = state;
                Step::Pass(len)
            }
            Err(m) => Step::Refuse(m),
        }
    }

    /// Follow a chunked body over `input`; how many bytes belong to it.
    fn chunked(&mut self, input: &[u8]) -> usize {
        let mut i = 0;
        while i < input.len() {
            let State::Chunked(chunk) = &mut self.state else {
                return i;
            };
            if let Chunk::Data(left) = *chunk {
                let n = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(input.len() - i);
                i += n;
                *chunk = match left - n as u64 {
                    0 => Chunk::DataCr,
                    left => Chunk::Data(left),
                };
                continue;
            }
            let b = input[i];
            i += 1;
            let next = match *chunk {
                Chunk::Size { size, digits } => match (b as char).to_digit(16) {
                    Some(d) if digits < 16 => Some(Chunk::Size {
                        size: size * 16 + u64::from(d),
                        digits: digits + 1,
                    }),
                    None if digits > 0 && b == b'\r' => Some(Chunk::SizeLf { size }),
                    None if digits > 0 && b == b';' => Some(Chunk::Extension { size, len: 0 }),
                    _ => None,
                },
                Chunk::Extension { size, len } => match b {
                    b'\r' => Some(Chunk::SizeLf { size }),
                    b'\n' => None,
                    _ if len < MAX_CHUNK_META => Some(Chunk::Extension { size, len: len + 1 }),
                    _ => None,
                },
                Chunk::SizeLf { size } => match b {
                    b'\n' if size == 0 => Some(Chunk::Trailers { len: 0, line: 0 }),
                    b'\n' => Some(Chunk::Data(size)),
                    _ => None,
                },
                Chunk::Data(_) => None,
                Chunk::DataCr => (b == b'\r').then_some(Chunk::DataLf),
                Chunk::DataLf => (b == b'\n').then_some(Chunk::Size { size: 0, digits: 0 }),
                Chunk::Trailers { len, line } => match b {
                    b'\r' => Some(Chunk::TrailerLf { len, line }),
                    b'\n' => None,
                    _ if len < MAX_CHUNK_META => Some(Chunk::Trailers {
                        len: len + 1,
                        line: line + 1,
                    }),
                    _ => None,
                },
                Chunk::TrailerLf { len, line } => match b {
                    b'\n' if line == 0 => {
                        // The empty line: the body, and the request, end here.
                        self.state = State::Head;
                        return i;
                    }
                    b'\n' => Some(Chunk::Trailers {
                        len: len + 2,
                        line: 0,
                    }),
                    _ => None,
                },
            };
            match next {
                Some(c) => *chunk = c,
                None => {
                    // Not the plain syntax: hyper decides, Airlock stops checking.
                    self.state = State::Unchecked;
                    return input.len();
                }
            }
        }
        input.len()
    }
}

/// The body framing of a parsed request, as hyper reads it (RFC 9112 §6.3), or why hyper
/// refuses it.
fn body_of(req: &httparse::Request<'_, '_>) -> Result<State, Malformed> {
    let bad = |what: &str, line: Option<String>| Malformed::Head {
        what: what.to_owned(),
        line,
    };
    let method = req.method.unwrap_or_default();
    let path = req.path.unwrap_or_default();
    if http::Method::from_bytes(method.as_bytes()).is_err() {
        return Err(bad(
            "the request method is not a token",
            Some(method.into()),
        ));
    }
    if http::Uri::try_from(path).is_err() {
        return Err(bad("the request target is not a URI", Some(clip(path))));
    }
    let http11 = req.version == Some(1);
    let (mut length, mut chunked, mut te, mut upgrade) = (None, false, false, false);
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let line = || Some(clip(&format!("{}: {value}", h.name)));
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !http11 {
                return Err(bad("Transfer-Encoding in an HTTP/1.0 request", line()));
            }
            te = true;
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") && !te {
            let n =
                content_length(&value).ok_or_else(|| bad("an invalid Content-Length", line()))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("two different Content-Length values", line()));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if te && !chunked {
        return Err(bad(
            "a Transfer-Encoding whose last coding is not chunked",
            None,
        ));
    }
    Ok(if upgrade || method == "CONNECT" {
        // hyper may hand the connection over after these: not followed.
        State::Unchecked
    } else if chunked {
        State::Chunked(Chunk::Size { size: 0, digits: 0 })
    } else {
        match length {
            Some(n) if n > 0 => State::Length(n),
            _ => State::Head,
        }
    })
}

/// A `Content-Length` as hyper reads it: digits, or a list of equal values.
fn content_length(value: &str) -> Option<u64> {
    let mut out = None;
    for part in value.split(',') {
        let part = part.trim();
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = part.parse().ok()?;
        if out.is_some_and(|o| o != n) {
            return None;
        }
        out = Some(n);
    }
    out
}

/// What httparse found wrong, with the line it is on when it can be told.
fn describe(e: httparse::Error, had_method: bool, input: &[u8]) -> Malformed {
    let lines: Vec<&[u8]> = input
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .skip_while(|l| l.is_empty())
        .collect();
    let request_line = lines.first().map(|l| clip(&String::from_utf8_lossy(l)));
    // The first header line that is not `name: value`, for the errors about headers.
    let header_line = lines
        .iter()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .find(|l| !is_field_line(l))
        .map(|l| clip(&String::from_utf8_lossy(l)));
    let (what, line) = match e {
        httparse::Error::Token if !had_method => {
            ("the request method is not a token", request_line)
        }
        httparse::Error::Token => ("the request target is not valid", request_line),
        httparse::Error::Version => (
            "the request line does not end in HTTP/1.0 or HTTP/1.1",
            request_line,
        ),
        httparse::Error::HeaderName => ("a header line is not `name: value`", header_line),
        httparse::Error::HeaderValue => ("a header value holds a forbidden byte", header_line),
        httparse::Error::NewLine => ("a line does not end in CRLF", header_line.or(request_line)),
        _ => ("the request head is not HTTP/1.1", request_line),
    };
    Malformed::Head {
        what: what.to_owned(),
        line,
    }
}

/// `token ":" OWS field-value` with visible characters, spaces, tabs and obs-text.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    !name.is_empty()
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        && value
            .iter()
            .all(|&b| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80)
}

/// At most 80 characters of a line, for a reason.
fn clip(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests;
