//! Which MCP backend, if any, a proxy request is for, and what becomes of it (sans-IO: the
//! caller resolves names and hands the addresses in).
//!
//! A request names a backend by its host name and port (case and a trailing dot do not count),
//! by one of its current addresses, or — a name that is not the backend's — by resolving to one
//! of them (`alias.example` → the backend's address: the proxy would connect there too). The
//! `Host` header is judged as well: a proxy in transparent mode forwards by it.

use std::net::{IpAddr, SocketAddr};

use super::wire::{Host, RequestHead, Target};
use crate::config::{Backend, BackendMode, Config, ResolvedTarget, UnknownSni};

/// What one host and port reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// This backend, by its name or one of its addresses.
    Backend(usize),
    /// This backend's address, under another name.
    Alias(usize),
    Nothing,
}

impl Found {
    fn backend(self) -> Option<usize> {
        match self {
            Found::Backend(i) | Found::Alias(i) => Some(i),
            Found::Nothing => None,
        }
    }
}

/// What becomes of a proxy request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not for an MCP backend: passed to the real proxy byte for byte.
    Pass,
    /// A tunnel to this MCP backend: opened by the agent, intercepted inside.
    Intercept(usize),
    /// Refused with this status and reason.
    Refuse(u16, String),
}

/// The backend `host:port` names by name or address, without resolving anything.
pub fn by_name(
    backends: &[Backend],
    targets: &[ResolvedTarget],
    host: &Host,
    port: u16,
) -> Option<usize> {
    match host {
        Host::Name(name) => backends.iter().position(|b| {
            b.port == port && b.host.trim_end_matches('.').eq_ignore_ascii_case(name)
        }),
        Host::Ip(ip) => by_addresses(backends, targets, &[*ip], port),
    }
}

/// Whether a name must be resolved to know: some backend serves this port.
pub fn needs_lookup(backends: &[Backend], host: &Host, port: u16) -> bool {
    matches!(host, Host::Name(_)) && backends.iter().any(|b| b.port == port)
}

/// The backend one of `addrs` (on `port`) belongs to.
pub fn by_addresses(
    backends: &[Backend],
    targets: &[ResolvedTarget],
    addrs: &[IpAddr],
    port: u16,
) -> Option<usize> {
    addrs.iter().find_map(|ip| {
        Config::owners(targets, SocketAddr::new(*ip, port)).find(|&id| id < backends.len())
    })
}

/// The verdict on `req`, given what its target and its `Host` header reach.
pub fn decide(req: &RequestHead, target: Found, host: Found, backends: &[Backend]) -> Verdict {
    let name = |i: usize| backends.get(i).map(|b| b.name.as_str()).unwrap_or("?");
    if let Some(j) = host.backend()
        && target.backend() != Some(j)
    {
        let what = match &req.target {
            Target::Proxy => "a request to the proxy itself".to_owned(),
            _ => format!("a request for {}", req.authority()),
        };
        return Verdict::Refuse(
            403,
            format!(
                "{what} whose Host header names MCP backend `{}`: a proxy forwarding by Host would reach it uninspected",
                name(j)
            ),
        );
    }
    let Some(i) = target.backend() else {
        return Verdict::Pass;
    };
    let Some(backend) = backends.get(i) else {
        return Verdict::Pass;
    };
    if backend.mode == BackendMode::Opaque {
        // Relayed and recorded as a connection, like a direct one.
        return Verdict::Pass;
    }
    match (target, &req.target) {
        (Found::Alias(_), _) if backend.unknown_sni == UnknownSni::Splice => Verdict::Pass,
        (Found::Alias(_), _) => Verdict::Refuse(
            403,
            format!(
                "{} reaches an address of MCP backend `{}` under another name; refused as a TLS server name naming no backend is (`unknown_sni = \"reject\"`)",
                req.authority(),
                backend.name
            ),
        ),
        (_, Target::Tunnel { .. }) => Verdict::Intercept(i),
        _ => Verdict::Refuse(
            403,
            format!(
                "plain HTTP to MCP backend `{}` through a proxy (absolute-form {} {}) is refused: a forward proxy connection carries requests for any host, which Airlock does not bind to one judged backend; call it with https:// (CONNECT) or without the proxy (NO_PROXY)",
                backend.name,
                req.method,
                req.authority()
            ),
        ),
    }
}

/// A host and port a request names.
pub type Named<'a> = Option<(&'a Host, u16)>;

/// The names a request reaches the network by: its target's, then its `Host` header's.
pub fn names(req: &RequestHead) -> (Named<'_>, Named<'_>) {
    let target = match &req.target {
        Target::Tunnel { host, port } | Target::Forward { host, port, .. } => Some((host, *port)),
        Target::Proxy => None,
    };
    let host = req.host_header.as_ref().map(|(h, p)| (h, *p));
    (target, host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::forward::wire::parse_request;

    fn backends() -> Vec<Backend> {
        let text = "[[backend]]\nname = \"tools\"\nhost = \"MCP.internal.test\"\nport = 8443\naddresses = [\"127.0.0.2\"]\n\
                    [[backend]]\nname = \"plain\"\nhost = \"plain.internal.test\"\nport = 8080\ntls = false\naddresses = [\"127.0.0.3\"]\n\
                    [[backend]]\nname = \"raw\"\nhost = \"raw.internal.test\"\nport = 9000\nmode = \"opaque\"\naddresses = [\"127.0.0.4\"]\n\
                    [[backend]]\nname = \"shared\"\nhost = \"shared.internal.test\"\nport = 9443\nunknown_sni = \"splice\"\naddresses = [\"127.0.0.5\"]\n";
        Config::parse(std::path::Path::new("/x.toml"), text)
            .unwrap()
            .backends
    }

    fn targets() -> Vec<ResolvedTarget> {
        [
            ("127.0.0.2:8443", 0),
            ("127.0.0.3:8080", 1),
            ("127.0.0.4:9000", 2),
            ("127.0.0.5:9443", 3),
        ]
        .into_iter()
        .map(|(a, id)| ResolvedTarget {
            backend_id: id,
            addr: a.parse().unwrap(),
        })
        .collect()
    }

    /// The verdict on a request, names resolved through `dns`.
    fn verdict(head: &str, dns: &[(&str, &str)]) -> Verdict {
        let req = parse_request(head.as_bytes()).unwrap().unwrap();
        let (b, t) = (backends(), targets());
        let find = |n: Named<'_>| match n {
            None => Found::Nothing,
            Some((host, port)) => {
                if let Some(i) = by_name(&b, &t, host, port) {
                    return Found::Backend(i);
                }
                if !needs_lookup(&b, host, port) {
                    return Found::Nothing;
                }
                let addrs: Vec<IpAddr> = dns
                    .iter()
                    .filter(|(n, _)| Host::Name((*n).into()) == *host)
                    .map(|(_, a)| a.parse().unwrap())
                    .collect();
                by_addresses(&b, &t, &addrs, port).map_or(Found::Nothing, Found::Alias)
            }
        };
        let (target, host) = names(&req);
        decide(&req, find(target), find(host), &b)
    }

    #[test]
    fn connect_to_a_backend_by_name_or_address_is_intercepted() {
        for head in [
            "CONNECT mcp.internal.test:8443 HTTP/1.1\r\nHost: mcp.internal.test:8443\r\n\r\n",
            "CONNECT MCP.INTERNAL.TEST.:8443 HTTP/1.1\r\n\r\n",
            "CONNECT 127.0.0.2:8443 HTTP/1.1\r\nHost: mcp.internal.test:8443\r\n\r\n",
            "CONNECT [::ffff:127.0.0.2]:8443 HTTP/1.1\r\n\r\n",
            "CONNECT plain.internal.test:8080 HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(verdict(head, &[]), Verdict::Intercept(_)),
                "{head}"
            );
        }
    }

    #[test]
    fn other_targets_pass() {
        for head in [
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            "CONNECT mcp.internal.test:443 HTTP/1.1\r\n\r\n",
            "CONNECT raw.internal.test:9000 HTTP/1.1\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
            "GET /squid-internal-static/icons/x HTTP/1.1\r\nHost: proxy.test:3128\r\n\r\n",
            "CONNECT shared-alias.test:9443 HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                verdict(head, &[("shared-alias.test", "127.0.0.5")]),
                Verdict::Pass,
                "{head}"
            );
        }
    }

    #[test]
    fn a_backend_reached_another_way_is_refused() {
        for (head, code) in [
            ("CONNECT alias.test:8443 HTTP/1.1\r\n\r\n", 403),
            (
                "CONNECT example.com:443 HTTP/1.1\r\nHost: mcp.internal.test:8443\r\n\r\n",
                403,
            ),
            (
                "GET / HTTP/1.1\r\nHost: plain.internal.test:8080\r\n\r\n",
                403,
            ),
            (
                "POST http://plain.internal.test:8080/mcp HTTP/1.1\r\nContent-Length: 2\r\n\r\n",
                403,
            ),
            ("GET http://127.0.0.3:8080/mcp HTTP/1.1\r\n\r\n", 403),
        ] {
            match verdict(head, &[("alias.test", "127.0.0.2")]) {
                Verdict::Refuse(c, reason) => {
                    assert_eq!(c, code, "{head}");
                    assert!(reason.contains("MCP backend"), "{reason}");
                }
                v => panic!("{head}: {v:?}"),
            }
        }
    }
}
