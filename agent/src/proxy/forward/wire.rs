//! The HTTP proxy protocol as clients speak it, sans-IO: request heads (`CONNECT host:port`,
//! absolute-form `GET http://host/...`, origin-form requests to the proxy itself), response
//! heads, and where each body ends — so that every request on a kept-alive proxy connection is
//! found and judged, not only the first (after a `407` the client asks again on the same
//! connection, maybe for another target).
//!
//! Strict: whatever two parsers could read differently is refused — both `Content-Length` and
//! `Transfer-Encoding`, a coding other than `chunked`, two `Host` headers, a numeric host that
//! is not a dotted quad (`127.1`, `2130706433`), percent-encoding or user information in a
//! host, chunk syntax beyond the plain one. Nothing here changes a byte: heads are read to
//! judge them, and passed on as they came.

use std::{fmt, net::IpAddr};

use thiserror::Error;

/// The largest request or response head read (large enough for Negotiate/Kerberos tokens).
pub const MAX_HEAD: usize = 64 * 1024;
/// Header lines per head.
const MAX_HEADERS: usize = 100;
/// Longest chunk extension, and trailer section, followed.
const MAX_CHUNK_META: usize = 16 * 1024;
/// Longest host name (RFC 1035).
const MAX_HOST: usize = 253;

/// Why a head (or a body's framing) is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Malformed {
    #[error("the head is larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("the head has more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("{0}")]
    Head(String),
    #[error("the body's chunked framing is not plain RFC 9112 syntax")]
    Chunks,
}

impl Malformed {
    /// The status a client gets for its request head.
    pub fn status(&self) -> u16 {
        match self {
            Malformed::TooLarge | Malformed::TooManyHeaders => 431,
            _ => 400,
        }
    }
}

fn bad(what: impl Into<String>) -> Malformed {
    Malformed::Head(what.into())
}

/// A host as a request names it: a lower-case name without a trailing dot, or an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `CONNECT host:port`: a tunnel.
    Tunnel { host: Host, port: u16 },
    /// Absolute-form (`GET http://host:port/path`): forwarded by the proxy.
    Forward {
        scheme: String,
        host: Host,
        port: u16,
    },
    /// Origin-form or `*`: a request to the proxy itself (its `Host`, if any, is judged too:
    /// a proxy in transparent mode forwards by it).
    Proxy,
}

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
    /// The connection becomes a tunnel: a 2xx to CONNECT, a 101.
    Tunnel,
}

/// A request head: what it asks for, how long it is, how its body is delimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: Target,
    /// The `Host` header's host and port (port 80 when absent), when there is one.
    pub host_header: Option<(Host, u16)>,
    /// Bytes of the head, its final empty line included.
    pub len: usize,
    pub body: Body,
    /// The client closes after this exchange (`Connection: close`, HTTP/1.0).
    pub close: bool,
}

impl RequestHead {
    pub fn is_connect(&self) -> bool {
        self.method == "CONNECT"
    }

    /// `host:port` of the target, for records (never a path: it may carry secrets).
    pub fn authority(&self) -> String {
        match &self.target {
            Target::Tunnel { host, port } | Target::Forward { host, port, .. } => {
                format!("{host}:{port}")
            }
            Target::Proxy => match &self.host_header {
                Some((h, p)) => format!("{h}:{p} (origin-form)"),
                None => "the proxy (origin-form)".to_owned(),
            },
        }
    }
}

/// A response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub len: usize,
    pub body: Body,
    pub close: bool,
}

/// Parse the request head at the start of `input`: `Ok(None)` until it is complete.
pub fn parse_request(input: &[u8]) -> Result<Option<RequestHead>, Malformed> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(input) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if input.len() >= MAX_HEAD => {
            return Err(Malformed::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Malformed::TooManyHeaders),
        Err(e) => return Err(bad(format!("not an HTTP/1.1 request head: {e}"))),
    };
    if len > MAX_HEAD {
        return Err(Malformed::TooLarge);
    }
    // httparse takes a bare LF as a line end; a proxy might not: refused.
    let bare_lf = input[..len]
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || input[i - 1] != b'\r'));
    if bare_lf {
        return Err(bad("a line of the request head does not end in CRLF"));
    }
    let method = req.method.unwrap_or_default().to_owned();
    let path = req.path.unwrap_or_default();
    let http11 = req.version == Some(1);
    let fields = Fields::read(req.headers, http11)?;
    let target = if method == "CONNECT" {
        let (host, port) = parse_authority(path)?;
        let port = port.ok_or_else(|| bad(format!("CONNECT `{path}` has no port")))?;
        Target::Tunnel { host, port }
    } else if path.starts_with('/') || (path == "*" && method == "OPTIONS") {
        Target::Proxy
    } else {
        absolute_form(path)?
    };
    let body = match (&fields.te, fields.length) {
        (Some(te), _) if te.eq_ignore_ascii_case("chunked") => Body::Chunked,
        (Some(te), _) => {
            return Err(bad(format!(
                "Transfer-Encoding `{}`: only `chunked` is accepted in a request",
                clip(te)
            )));
        }
        (None, Some(n)) if n > 0 => Body::Length(n),
        _ => Body::None,
    };
    if method == "CONNECT" && body != Body::None {
        return Err(bad("a CONNECT request with a body"));
    }
    let host_header = match fields.host {
        None => None,
        Some(h) => {
            let (host, port) = parse_authority(&h)?;
            Some((host, port.unwrap_or(80)))
        }
    };
    Ok(Some(RequestHead {
        method,
        target,
        host_header,
        len,
        body,
        close: fields.close,
    }))
}

/// Parse the response head at the start of `input` to a request (`head`: a HEAD request;
/// `connect`: a CONNECT). `Ok(None)` until complete.
pub fn parse_response(
    input: &[u8],
    head: bool,
    connect: bool,
) -> Result<Option<ResponseHead>, Malformed> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(input) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if input.len() >= MAX_HEAD => {
            return Err(Malformed::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Malformed::TooManyHeaders),
        Err(e) => return Err(bad(format!("not an HTTP/1.1 response head: {e}"))),
    };
    if len > MAX_HEAD {
        return Err(Malformed::TooLarge);
    }
    let status = resp.code.unwrap_or(0);
    let http11 = resp.version == Some(1);
    let fields = Fields::read(resp.headers, http11)?;
    let body = if (connect && (200..300).contains(&status)) || status == 101 {
        Body::Tunnel
    } else if head || (100..200).contains(&status) || status == 204 || status == 304 {
        Body::None
    } else if let Some(te) = &fields.te {
        // The last coding decides (RFC 9112 §6.3): chunked, or until the proxy closes.
        let last = te.rsplit(',').next().unwrap_or("").trim();
        if last.eq_ignore_ascii_case("chunked") {
            Body::Chunked
        } else {
            Body::UntilClose
        }
    } else {
        match fields.length {
            Some(0) => Body::None,
            Some(n) => Body::Length(n),
            None => Body::UntilClose,
        }
    };
    Ok(Some(ResponseHead {
        status,
        len,
        body,
        close: fields.close || body == Body::UntilClose,
    }))
}

/// What the header fields say about framing and the connection.
#[derive(Default)]
struct Fields {
    length: Option<u64>,
    /// The `Transfer-Encoding`, when there is one.
    te: Option<String>,
    close: bool,
    host: Option<String>,
}

impl Fields {
    fn read(headers: &[httparse::Header<'_>], http11: bool) -> Result<Fields, Malformed> {
        let mut f = Fields {
            close: !http11,
            ..Fields::default()
        };
        for h in headers {
            let value = std::str::from_utf8(h.value)
                .map_err(|_| bad(format!("the `{}` header is not UTF-8", h.name)))?
                .trim();
            let name = h.name.to_ascii_lowercase();
            match name.as_str() {
                "transfer-encoding" => {
                    if !http11 || f.te.is_some() {
                        return Err(bad("Transfer-Encoding twice, or in HTTP/1.0"));
                    }
                    f.te = Some(value.to_owned());
                }
                "content-length" => {
                    let n = content_length(value)
                        .ok_or_else(|| bad(format!("an invalid Content-Length `{value}`")))?;
                    if f.length.is_some_and(|l| l != n) {
                        return Err(bad("two different Content-Length values"));
                    }
                    f.length = Some(n);
                }
                "connection" | "proxy-connection" => {
                    for token in value.split(',').map(str::trim) {
                        if token.eq_ignore_ascii_case("close") {
                            f.close = true;
                        } else if token.eq_ignore_ascii_case("keep-alive") && !http11 {
                            f.close = false;
                        }
                    }
                }
                "host" => {
                    if f.host.is_some() {
                        return Err(bad("two Host headers"));
                    }
                    f.host = Some(value.to_owned());
                }
                _ => {}
            }
        }
        if f.te.is_some() && f.length.is_some() {
            return Err(bad("both Content-Length and Transfer-Encoding"));
        }
        Ok(f)
    }
}

/// Digits, or a list of equal values.
fn content_length(value: &str) -> Option<u64> {
    let mut out = None;
    for part in value.split(',').map(str::trim) {
        if part.is_empty() || part.len() > 19 || !part.bytes().all(|b| b.is_ascii_digit()) {
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

/// `scheme://authority[/path][?query]` with a known default port, or an explicit one.
fn absolute_form(target: &str) -> Result<Target, Malformed> {
    // Not echoed: a target may carry a token in its query.
    let (scheme, rest) = target.split_once("://").ok_or_else(|| {
        bad("the request target is neither a URL, a path, nor (for CONNECT) host:port")
    })?;
    let valid_scheme = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !valid_scheme {
        return Err(bad("the request target's URL scheme is not valid"));
    }
    let scheme = scheme.to_ascii_lowercase();
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (host, port) = parse_authority(&rest[..end])?;
    let port = match (port, scheme.as_str()) {
        (Some(p), _) => p,
        (None, "http" | "ws") => 80,
        (None, "https" | "wss") => 443,
        (None, "ftp") => 21,
        (None, _) => return Err(bad(format!("`{scheme}://` without a port"))),
    };
    Ok(Target::Forward { scheme, host, port })
}

/// `host[:port]` or `[v6][:port]`, strictly: a name of letters, digits, `-`, `_` and dots
/// (lower-cased, a trailing dot dropped), a dotted-quad IPv4 address, or a bracketed IPv6
/// address without a zone. A name whose last label is numeric is refused: resolvers read
/// `127.1` or `2130706433` as addresses.
pub fn parse_authority(s: &str) -> Result<(Host, Option<u16>), Malformed> {
    if s.contains('@') {
        // Not echoed: user information is a credential.
        return Err(bad("user information in a host (`user@host`)"));
    }
    let invalid = || bad(format!("`{}` is not a host and port", clip(s)));
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or_else(invalid)?;
        let ip: std::net::Ipv6Addr = v6.parse().map_err(|_| invalid())?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(invalid)?),
        };
        (Host::Ip(crate::keys::canonical_ip(IpAddr::V6(ip))), port)
    } else {
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        (parse_host(host).ok_or_else(invalid)?, port)
    };
    let port = match port {
        None => None,
        Some(p) => {
            let ok = (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
            let n: u16 = p
                .parse()
                .ok()
                .filter(|n| ok && *n > 0)
                .ok_or_else(invalid)?;
            Some(n)
        }
    };
    Ok((host, port))
}

fn parse_host(host: &str) -> Option<Host> {
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return Some(Host::Ip(IpAddr::V4(ip)));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > MAX_HOST {
        return None;
    }
    let labels_ok = name.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let last = name.rsplit('.').next().unwrap_or(name);
    let numeric_last = last.bytes().all(|b| b.is_ascii_digit())
        || (last.len() > 2 && last[..2].eq_ignore_ascii_case("0x"));
    (labels_ok && !numeric_last).then(|| Host::Name(name.to_ascii_lowercase()))
}

/// At most 80 characters, for a reason.
fn clip(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// Where a body ends, followed over the bytes as they arrive.
#[derive(Debug)]
pub struct BodyFollower {
    state: Follow,
}

#[derive(Debug, PartialEq, Eq)]
enum Follow {
    Done,
    Length(u64),
    UntilClose,
    /// Hex digits of a chunk size so far (value, count).
    Size(u64, u8),
    /// A chunk extension up to its CR (bytes so far).
    Extension(u64, usize),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// Trailer section (bytes so far, bytes of the current line).
    Trailers(usize, usize),
    TrailerLf(usize, usize),
}

/// What [`BodyFollower::feed`] found: `used` bytes belong to the body; `done` once it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub used: usize,
    pub done: bool,
}

impl BodyFollower {
    /// For a body delimited as `body` (a tunnel is not a body: use a relay).
    pub fn new(body: Body) -> BodyFollower {
        BodyFollower {
            state: match body {
                Body::None | Body::Tunnel => Follow::Done,
                Body::Length(0) => Follow::Done,
                Body::Length(n) => Follow::Length(n),
                Body::Chunked => Follow::Size(0, 0),
                Body::UntilClose => Follow::UntilClose,
            },
        }
    }

    pub fn done(&self) -> bool {
        self.state == Follow::Done
    }

    /// Whether the body ends only when its sender closes.
    pub fn until_close(&self) -> bool {
        self.state == Follow::UntilClose
    }

    /// Follow the body over `input` (the bytes read and not yet passed on).
    pub fn feed(&mut self, input: &[u8]) -> Result<Progress, Malformed> {
        match self.state {
            Follow::Done => Ok(Progress {
                used: 0,
                done: true,
            }),
            Follow::UntilClose => Ok(Progress {
                used: input.len(),
                done: false,
            }),
            Follow::Length(left) => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                let left = left - n as u64;
                self.state = if left == 0 {
                    Follow::Done
                } else {
                    Follow::Length(left)
                };
                Ok(Progress {
                    used: n,
                    done: left == 0,
                })
            }
            _ => self.chunks(input),
        }
    }

    fn chunks(&mut self, input: &[u8]) -> Result<Progress, Malformed> {
        let mut i = 0;
        while i < input.len() {
            if let Follow::Data(left) = self.state {
                let n = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(input.len() - i);
                i += n;
                self.state = match left - n as u64 {
                    0 => Follow::DataCr,
                    left => Follow::Data(left),
                };
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = match (&self.state, b) {
                (Follow::Size(size, digits), _) if b.is_ascii_hexdigit() && *digits < 16 => {
                    let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                    Follow::Size(size * 16 + d, digits + 1)
                }
                (Follow::Size(size, d), b'\r') if *d > 0 => Follow::SizeLf(*size),
                (Follow::Size(size, d), b';') if *d > 0 => Follow::Extension(*size, 0),
                (Follow::Extension(size, _), b'\r') => Follow::SizeLf(*size),
                (Follow::Extension(size, len), _) if b != b'\n' && *len < MAX_CHUNK_META => {
                    Follow::Extension(*size, len + 1)
                }
                (Follow::SizeLf(0), b'\n') => Follow::Trailers(0, 0),
                (Follow::SizeLf(size), b'\n') => Follow::Data(*size),
                (Follow::DataCr, b'\r') => Follow::DataLf,
                (Follow::DataLf, b'\n') => Follow::Size(0, 0),
                (Follow::Trailers(len, line), b'\r') => Follow::TrailerLf(*len, *line),
                (Follow::Trailers(len, line), _) if b != b'\n' && *len < MAX_CHUNK_META => {
                    Follow::Trailers(len + 1, line + 1)
                }
                (Follow::TrailerLf(_, 0), b'\n') => {
                    self.state = Follow::Done;
                    return Ok(Progress {
                        used: i,
                        done: true,
                    });
                }
                (Follow::TrailerLf(len, _), b'\n') => Follow::Trailers(len + 2, 0),
                _ => return Err(Malformed::Chunks),
            };
        }
        Ok(Progress {
            used: input.len(),
            done: false,
        })
    }
}

#[cfg(test)]
mod tests;
