//! One `[[backend]]`: what it is, which non-MCP requests may reach it (`allow_http`), and
//! when backends may share an address.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::Deserialize;

use super::ResolvedTarget;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    /// The name clients use.
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// Static addresses; when empty, `host` is resolved (A and AAAA) and refreshed.
    pub addresses: Vec<IpAddr>,
    pub ca_file: Option<PathBuf>,
    pub mode: BackendMode,
    pub unknown_sni: UnknownSni,
    /// Root-only secrets file: Airlock adds the upstream credential and strips the client's.
    pub credentials_file: Option<PathBuf>,
    /// Requests that are not MCP and may pass (forwarded and recorded at HTTP level): OAuth
    /// discovery and the like. Everything else must be JSON-RPC Airlock parsed.
    pub allow_http: Vec<HttpAllow>,
}

/// One `allow_http` entry: `"METHOD /path-glob"` (`*` for any method).
#[derive(Debug, Clone)]
pub struct HttpAllow {
    pub text: String,
    method: Option<http::Method>,
    path: globset::GlobMatcher,
}

impl PartialEq for HttpAllow {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for HttpAllow {}

impl HttpAllow {
    pub fn parse(text: &str) -> Result<HttpAllow, String> {
        let (method, path) = text.trim().split_once(' ').ok_or_else(|| {
            format!("`{text}` must be \"METHOD /path\" (e.g. \"GET /.well-known/*\")")
        })?;
        let path = path.trim();
        if !path.starts_with('/') {
            return Err(format!("`{text}`: the path must start with `/`"));
        }
        let method = match method {
            "*" => None,
            m => Some(
                http::Method::from_bytes(m.as_bytes())
                    .map_err(|_| format!("`{text}`: `{m}` is not an HTTP method"))?,
            ),
        };
        let path = globset::Glob::new(path)
            .map_err(|e| format!("`{text}`: bad path glob: {e}"))?
            .compile_matcher();
        Ok(HttpAllow {
            text: text.trim().to_owned(),
            method,
            path,
        })
    }

    /// Whether a request may pass as non-MCP traffic. A path a server could read as another
    /// (dot segments, encoded separators, backslashes) never matches.
    pub fn allows(&self, method: &http::Method, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        if !plain_path(path) {
            return false;
        }
        self.path.is_match(path)
    }
}

/// A path every server reads the same way: no `.`/`..` segments, no empty segments, no
/// percent-encoded `/`, `\\` or `.`, no backslash.
fn plain_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    !(lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains("%2e")
        || lower.contains('\\')
        || lower.contains("//")
        || lower.split('/').any(|seg| seg == "." || seg == ".."))
}

/// How Airlock handles a backend's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendMode {
    /// Terminate TLS (when `tls`), parse HTTP and MCP, apply policies, record every message.
    Mcp,
    /// Relay bytes untouched; only the connection is attributed and recorded.
    Opaque,
}

/// What happens to a TLS connection whose SNI names no configured backend (a shared address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownSni {
    /// Refuse it (the default: fail closed).
    Reject,
    /// Pass it through untouched, recorded as an opaque connection.
    Splice,
}

/// Backends may share an address and port only when nothing but their name and host tells
/// them apart: the same mode, TLS, SNI handling, brokered credentials and allowed HTTP (the
/// policy set is checked against shared addresses too, see `policy::PolicySet`). Otherwise
/// which one a connection meets would decide how it is judged. Plaintext backends can never
/// share (nothing but the client's `Host` claim would tell them apart).
pub(super) fn check_shared_addresses(
    backends: &[Backend],
    targets: &[ResolvedTarget],
) -> Result<(), (String, String)> {
    let mut by_addr: std::collections::BTreeMap<SocketAddr, Vec<usize>> = Default::default();
    // Egress proxies (ids past the backends) are checked on their own.
    for t in targets
        .iter()
        .filter(|t| (t.backend_id as usize) < backends.len())
    {
        by_addr
            .entry(t.addr)
            .or_default()
            .push(t.backend_id as usize);
    }
    for (addr, ids) in by_addr {
        let mut ids = ids;
        ids.sort_unstable();
        ids.dedup();
        let Some((&first, rest)) = ids.split_first() else {
            continue;
        };
        let a = &backends[first];
        for &other in rest {
            let b = &backends[other];
            let differs = if !(a.tls && b.tls) {
                Some("they are not both `tls = true` (only a TLS server name can tell them apart)")
            } else if a.mode != b.mode {
                Some("their `mode` differs")
            } else if a.unknown_sni != b.unknown_sni {
                Some("their `unknown_sni` differs")
            } else if a.credentials_file != b.credentials_file {
                Some("their `credentials_file` differs")
            } else if a.allow_http != b.allow_http {
                Some("their `allow_http` differs")
            } else {
                None
            };
            if let Some(why) = differs {
                return Err((
                    format!("backend[{other}]"),
                    format!(
                        "`{}` and `{}` share {addr} but {why}; give them separate addresses or make them alike",
                        a.name, b.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Pairs of backends (by name) that share an address: a policy set must not tell them apart.
pub fn shared_backends(backends: &[Backend], targets: &[ResolvedTarget]) -> Vec<(String, String)> {
    let mut pairs = std::collections::BTreeSet::new();
    let is_backend = |t: &&ResolvedTarget| (t.backend_id as usize) < backends.len();
    for t in targets.iter().filter(is_backend) {
        for u in targets.iter().filter(is_backend) {
            if t.addr == u.addr && t.backend_id < u.backend_id {
                pairs.insert((
                    backends[t.backend_id as usize].name.clone(),
                    backends[u.backend_id as usize].name.clone(),
                ));
            }
        }
    }
    pairs.into_iter().collect()
}
