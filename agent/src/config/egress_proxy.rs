//! `[[egress_proxy]]`: the HTTP proxies clients reach the network through (`HTTPS_PROXY`).
//! Their addresses go into the kernel's target map beside the backends' (a target of a kind of
//! its own: ids from [`PROXY_ID_BASE`]), so a governed process's connection to a proxy is
//! redirected to the agent and attributed to that process; the agent then reads its proxy
//! requests (`crate::proxy::forward`).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use serde::Deserialize;

use super::{Backend, ConfigError, ResolvedTarget, Validator};

/// Kernel target ids from here on name egress proxies (`PROXY_ID_BASE + index`); below it,
/// backends (their index).
pub const PROXY_ID_BASE: u32 = 1 << 31;

/// One `[[egress_proxy]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressProxy {
    pub name: String,
    /// Its host name or address, as clients' `HTTPS_PROXY` names it.
    pub host: String,
    pub port: u16,
    /// Static addresses; when empty, `host` is resolved (A and AAAA) and refreshed.
    pub addresses: Vec<IpAddr>,
    /// The cgroups (as `/proc/PID/cgroup` names them, below the cgroup2 mount) whose
    /// processes' connections to this proxy are redirected; empty: the whole attached cgroup.
    pub cgroups: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgressProxy {
    name: String,
    host: String,
    port: u16,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    cgroups: Vec<String>,
}

impl EgressProxy {
    /// The kernel scope of this proxy: `None` when it has no `cgroups` (the whole attached
    /// cgroup). Each cgroup must exist below `mount` and within `attached`.
    pub fn scope(
        &self,
        mount: &std::path::Path,
        attached: &std::path::Path,
    ) -> Result<Option<airlock_common::Scope>, String> {
        if self.cgroups.is_empty() {
            return Ok(None);
        }
        let mut scope = airlock_common::Scope::default();
        for (i, rel) in self.cgroups.iter().enumerate() {
            let named = crate::cgroup::named(mount, attached, rel)
                .map_err(|e| format!("egress proxy `{}`: {e}", self.name))?;
            // The validator bounds the list to the array's length.
            let (Some(id), Some(level)) = (scope.ids.get_mut(i), scope.levels.get_mut(i)) else {
                return Err(format!("egress proxy `{}`: too many cgroups", self.name));
            };
            *id = named.id;
            *level = named.level;
            scope.count += 1;
        }
        Ok(Some(scope))
    }
}

/// What a kernel target id (`ConnMeta::backend_id`) names.
#[derive(Debug, Clone, Copy)]
pub enum TargetRef<'a> {
    Backend(usize, &'a Backend),
    Proxy(usize, &'a EgressProxy),
}

/// The kernel target id of the `i`-th egress proxy.
pub fn proxy_id(i: usize) -> u32 {
    PROXY_ID_BASE + i as u32
}

impl Validator<'_> {
    /// Validate the `[[egress_proxy]]` tables against each other and the backends.
    pub(super) fn egress_proxies(
        &self,
        raw: Vec<RawEgressProxy>,
        listen_port: u16,
        backends: &[Backend],
    ) -> Result<Vec<EgressProxy>, ConfigError> {
        if raw.len() > 64 {
            return Err(self.err("egress_proxy", "at most 64 [[egress_proxy]] tables"));
        }
        let mut names: BTreeSet<String> = backends.iter().map(|b| b.name.clone()).collect();
        let taken: BTreeSet<SocketAddr> = backends
            .iter()
            .flat_map(|b| b.addresses.iter().map(|ip| SocketAddr::new(*ip, b.port)))
            .collect();
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, p) in raw.into_iter().enumerate() {
            let key = |k: &str| format!("egress_proxy[{i}].{k}");
            if p.name.trim().is_empty() {
                return Err(self.err(key("name"), "must not be empty"));
            }
            if !names.insert(p.name.clone()) {
                return Err(self.err(
                    key("name"),
                    format!("`{}` is already the name of a backend or proxy", p.name),
                ));
            }
            if p.host.trim().is_empty() {
                return Err(self.err(key("host"), "must not be empty"));
            }
            if p.port == 0 {
                return Err(self.err(key("port"), "must be between 1 and 65535"));
            }
            let mut addresses = Vec::with_capacity(p.addresses.len());
            for (j, a) in p.addresses.iter().enumerate() {
                let k = format!("egress_proxy[{i}].addresses[{j}]");
                let ip: IpAddr = a
                    .parse()
                    .map_err(|_| self.err(&k, format!("`{a}` is not an IPv4 or IPv6 address")))?;
                addresses.push(crate::keys::canonical_ip(ip));
            }
            if addresses.is_empty()
                && let Ok(ip) = p.host.trim_start_matches('[').trim_end_matches(']').parse()
            {
                // A host given as an address is its own static address.
                addresses.push(crate::keys::canonical_ip(ip));
            }
            for ip in &addresses {
                let addr = SocketAddr::new(*ip, p.port);
                let why = if ip.is_unspecified() {
                    Some("the unspecified address cannot be a proxy".to_owned())
                } else if ip.is_loopback() && p.port == listen_port {
                    Some(format!(
                        "{addr} is the agent's own listener (`listen_port`)"
                    ))
                } else if taken.contains(&addr) {
                    Some(format!("{addr} is a backend's address"))
                } else if !seen.insert(addr) {
                    Some(format!("{addr} is listed twice"))
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(self.err(format!("egress_proxy[{i}].addresses"), why));
                }
            }
            let cgroups = self.scope_cgroups(i, p.cgroups)?;
            out.push(EgressProxy {
                name: p.name,
                host: p.host,
                port: p.port,
                addresses,
                cgroups,
            });
        }
        Ok(out)
    }
}

impl Validator<'_> {
    /// `egress_proxy[i].cgroups`: absolute cgroup paths, each once, at most
    /// [`airlock_common::SCOPE_CGROUPS`]. Whether they exist is checked when the agent starts.
    fn scope_cgroups(&self, i: usize, raw: Vec<String>) -> Result<Vec<String>, ConfigError> {
        let key = format!("egress_proxy[{i}].cgroups");
        if raw.len() > airlock_common::SCOPE_CGROUPS {
            return Err(self.err(
                &key,
                format!("at most {} cgroups", airlock_common::SCOPE_CGROUPS),
            ));
        }
        let mut seen = BTreeSet::new();
        for c in &raw {
            let bad = !c.starts_with('/')
                || c.len() < 2
                || c.split('/')
                    .skip(1)
                    .any(|part| part.is_empty() || part == "." || part == "..");
            if bad {
                return Err(self.err(
                    &key,
                    format!(
                        "`{c}` is not a cgroup path as /proc/PID/cgroup shows it (`/system.slice/runner.service`): absolute, no empty, `.` or `..` parts, not the root"
                    ),
                ));
            }
            if !seen.insert(c.as_str()) {
                return Err(self.err(&key, format!("`{c}` is listed twice")));
            }
        }
        Ok(raw)
    }
}

/// An address both a proxy and a backend (or two proxies) have: the kernel could not tell
/// which a connection is for. `Err((key, message))`.
pub(super) fn check_proxy_addresses(
    backends: &[Backend],
    targets: &[ResolvedTarget],
) -> Result<(), (String, String)> {
    let mut owner: std::collections::BTreeMap<SocketAddr, u32> = Default::default();
    // Backends first, so a clash is reported on the proxy.
    let mut sorted: Vec<&ResolvedTarget> = targets.iter().collect();
    sorted.sort_by_key(|t| t.backend_id);
    for t in sorted {
        match owner.get(&t.addr) {
            Some(&other) if t.backend_id >= PROXY_ID_BASE && other != t.backend_id => {
                let i = t.backend_id - PROXY_ID_BASE;
                let what = match backends.get(other as usize) {
                    Some(b) => format!("backend `{}`", b.name),
                    None => format!("egress_proxy[{}]", other - PROXY_ID_BASE),
                };
                return Err((
                    format!("egress_proxy[{i}].host"),
                    format!("{} is also the address of {what}", t.addr),
                ));
            }
            _ => {
                owner.entry(t.addr).or_insert(t.backend_id);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ResolvedTarget, TargetRef, proxy_id};

    const BACKEND: &str = "[[backend]]\nname = \"tools\"\nhost = \"mcp.internal.test\"\nport = 8443\naddresses = [\"127.0.0.2\"]\n";

    fn parse(proxies: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(
            Path::new("/etc/airlock/airlock.toml"),
            &format!("{BACKEND}{proxies}"),
        )
    }

    #[tokio::test]
    async fn proxies_are_targets_of_their_own_kind() {
        let cfg = parse(
            "[[egress_proxy]]\nname = \"corp\"\nhost = \"127.0.0.1\"\nport = 3128\n\
             [[egress_proxy]]\nname = \"v6\"\nhost = \"[::1]\"\nport = 8888\n",
        )
        .unwrap();
        assert_eq!(cfg.egress_proxies.len(), 2);
        assert_eq!(
            cfg.egress_proxies[1].addresses,
            vec!["::1".parse::<std::net::IpAddr>().unwrap()]
        );
        let targets = cfg.resolve().await.unwrap();
        assert!(targets.contains(&ResolvedTarget {
            backend_id: proxy_id(0),
            addr: "127.0.0.1:3128".parse().unwrap()
        }));
        assert!(matches!(cfg.target(proxy_id(1)), Some(TargetRef::Proxy(1, p)) if p.name == "v6"));
        assert!(matches!(cfg.target(0), Some(TargetRef::Backend(0, _))));
        assert!(cfg.target(proxy_id(2)).is_none());
        assert_eq!(cfg.target_name(proxy_id(0)), "proxy corp");
    }

    #[test]
    fn proxies_are_checked_against_backends_and_each_other() {
        for (proxies, key, text) in [
            (
                "[[egress_proxy]]\nname = \"tools\"\nhost = \"p\"\nport = 3128\n",
                "egress_proxy[0].name",
                "already",
            ),
            (
                "[[egress_proxy]]\nname = \"p\"\nhost = \"127.0.0.2\"\nport = 8443\n",
                "egress_proxy[0].addresses",
                "backend's address",
            ),
            (
                "[[egress_proxy]]\nname = \"p\"\nhost = \"p\"\nport = 0\n",
                "egress_proxy[0].port",
                "between",
            ),
            (
                "[[egress_proxy]]\nname = \"p\"\nhost = \"p\"\nport = 3128\naddresses = [\"nope\"]\n",
                "egress_proxy[0].addresses[0]",
                "not an IPv4",
            ),
            (
                "[[egress_proxy]]\nname = \"p\"\nhost = \"127.0.0.1\"\nport = 1010\n",
                "egress_proxy[0].addresses",
                "listen_port",
            ),
            (
                "[[egress_proxy]]\nname = \"p\"\nhost = \"127.0.0.1\"\nport = 3128\n[[egress_proxy]]\nname = \"q\"\nhost = \"127.0.0.1\"\nport = 3128\n",
                "egress_proxy[1].addresses",
                "twice",
            ),
            (
                "[[egress_proxy]]\nname = \"p\"\nhost = \"x\"\nport = 3128\ncgroups = [\"runner\"]\n",
                "egress_proxy[0].cgroups",
                "not a cgroup path",
            ),
            (
                "[[egress_proxy]]\nname = \"p\"\nhost = \"x\"\nport = 3128\ncgroups = [\"/a/../b\"]\n",
                "egress_proxy[0].cgroups",
                "not a cgroup path",
            ),
            (
                "[[egress_proxy]]\nname = \"p\"\nhost = \"x\"\nport = 3128\ncgroups = [\"/\"]\n",
                "egress_proxy[0].cgroups",
                "not the root",
            ),
            (
                "[[egress_proxy]]\nname = \"p\"\nhost = \"x\"\nport = 3128\ncgroups = [\"/a\", \"/a\"]\n",
                "egress_proxy[0].cgroups",
                "twice",
            ),
            (
                "[[egress_proxy]]\nname = \"p\"\nhost = \"x\"\nport = 3128\ncgroups = [\"/1\", \"/2\", \"/3\", \"/4\", \"/5\", \"/6\", \"/7\", \"/8\", \"/9\"]\n",
                "egress_proxy[0].cgroups",
                "at most 8",
            ),
            (
                "[[egress_proxy]]\nname = \"p\"\nhost = \"x\"\nport = 3128\nsecret = 1\n",
                "egress_proxy[0]",
                "unknown field",
            ),
        ] {
            let err = parse(proxies).unwrap_err();
            assert!(
                err.key.as_deref().is_some_and(|k| k.starts_with(key)),
                "{proxies}: {err}"
            );
            assert!(err.to_string().contains(text), "{proxies}: {err}");
        }
    }
}
