//! `airlock.toml`: parsing, defaults, validation, backend address resolution.
//!
//! Every error names the file and the key (`backend[1].addresses[0]`), so the operator can fix
//! it without reading code; `main` maps [`ConfigError`] to exit code 2.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

mod backend;
mod egress_proxy;
pub mod events;
mod log;
mod ship;
mod stdio;

use backend::check_shared_addresses;
pub use backend::{Backend, BackendMode, HttpAllow, UnknownSni, shared_backends};
pub use egress_proxy::{EgressProxy, PROXY_ID_BASE, TargetRef, proxy_id};
pub use events::EventsConfig;
pub use log::{LogFormat, LogSettings, redacted_url, valid_filter};
pub use ship::{ShipConfig, extra_roots, parse_url as parse_ship_url};
pub use stdio::{DEFAULTS as STDIO_DEFAULTS, StdioServer, default_stdio_servers};

/// Where `airlock` looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/airlock/airlock.toml";

/// An invalid configuration. Always names the file and, where one is at fault, the key.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}: `{key}`: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// What happens to connections to backends while the agent is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnAgentDown {
    /// Programs stay attached (pinned in bpffs): connections are refused. The default.
    Block,
    /// Programs detach with the agent: connections go directly to the backend, unobserved.
    Bypass,
}

/// Whether the agent may run without the socket guard (BPF LSM programs refusing raw and
/// packet sockets to governed processes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketGuard {
    /// No start without it (the default): a `CAP_NET_RAW` holder could reach a backend with
    /// a hand-made TCP handshake.
    Require,
    /// Start without it, with a warning at start and in `airlock status`.
    Warn,
}

/// The validated configuration, paths made absolute.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub archive_dir: PathBuf,
    pub policies_dir: PathBuf,
    /// The cgroup the programs attach to; `None` = the cgroup2 mount root.
    pub cgroup: Option<PathBuf>,
    pub on_agent_down: OnAgentDown,
    pub socket_guard: SocketGuard,
    /// Port of the agent's loopback listeners (127.0.0.1 and ::1).
    pub listen_port: u16,
    /// bpffs directory for the pinned links and maps.
    pub bpffs_dir: PathBuf,
    /// Keys that are accepted but no longer do anything (warned about at start).
    pub deprecated: Vec<&'static str>,
    pub resolve_interval: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_connections: usize,
    pub recent_connections: usize,
    /// `strict`: nothing is forwarded until its record is durable; `buffered`: records are
    /// written behind the traffic.
    pub recording: Recording,
    /// Roll write-ahead segments into Parquet at least this often.
    pub flush_interval: Duration,
    /// Delete archive partitions older than this many days (0: keep forever).
    pub retention_days: u32,
    /// Group that may read the archive.
    pub archive_group: String,
    /// The `host` column of the archive (default: this machine's hostname).
    pub host: String,
    /// Largest HTTP body (request or JSON response) Airlock reads to inspect.
    pub max_body_bytes: usize,
    /// Largest single SSE event.
    pub max_sse_event_bytes: usize,
    /// Time a client has to send a request's headers (and its ClientHello).
    pub header_read_timeout: Duration,
    /// A streamed response (SSE) with no byte for this long is closed.
    pub stream_idle_timeout: Duration,
    /// Deadline for reading a whole request body or JSON response, and for completing one SSE
    /// event once it has started (slow senders cannot hold memory and tasks for long).
    pub body_read_timeout: Duration,
    /// Most intercepted connections one uid may have open at once.
    pub max_connections_per_uid: usize,
    /// Most request-body bytes one uid may have in flight (being read or inspected) at once.
    pub max_inflight_bytes_per_uid: usize,
    /// Memory budget, all connections together, for parsed JSON (an estimate charged before
    /// parsing; see `mcp::strict::parsed_size_estimate`).
    pub max_parsed_bytes: usize,
    pub tool_changes: ToolChanges,
    /// POSTed a JSON description of every call held for approval.
    pub approval_webhook: Option<http::Uri>,
    /// `sha256:` fingerprints of archive signing keys, by host: what `airlock verify` trusts
    /// (the keys stored in an archive prove nothing on their own).
    pub archive_key_fingerprints: std::collections::BTreeMap<String, String>,
    /// `[ship]`: upload the archive to an S3-compatible bucket.
    pub ship: Option<ShipConfig>,
    /// Where `GET /metrics` is served (Prometheus/OpenMetrics); `None`: no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    pub backends: Vec<Backend>,
    /// `[[egress_proxy]]`: the HTTP proxies clients use, redirected like backends.
    pub egress_proxies: Vec<EgressProxy>,
    /// `[events]`: OCSF audit events to a file, syslog and/or a webhook (none when absent).
    pub events: Option<EventsConfig>,
    /// `[[stdio_server]]` (and the shipped defaults): the programs of governed jobs whose
    /// stdin/stdout are relayed through the pipeline.
    pub stdio_servers: Vec<StdioServer>,
}

/// What happens when a backend changes a tool's definition after it was first seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolChanges {
    /// Record an alert; the tool stays usable.
    Alert,
    /// Record an alert and refuse (and hide) the tool until `airlock tools accept`.
    Block,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "defaults::state_dir")]
    state_dir: PathBuf,
    #[serde(default = "defaults::archive_dir")]
    archive_dir: PathBuf,
    #[serde(default = "defaults::policies_dir")]
    policies_dir: PathBuf,
    #[serde(default)]
    cgroup: Option<PathBuf>,
    #[serde(default = "defaults::on_agent_down")]
    on_agent_down: OnAgentDown,
    #[serde(default = "defaults::socket_guard")]
    socket_guard: SocketGuard,
    #[serde(default = "defaults::listen_port")]
    listen_port: u16,
    #[serde(default = "defaults::bpffs_dir")]
    bpffs_dir: PathBuf,
    /// No longer used: the agent's sockets are recognised by socket storage, not a mark.
    #[serde(default)]
    bypass_mark: Option<u32>,
    #[serde(default = "defaults::resolve_interval_secs")]
    resolve_interval_secs: u64,
    #[serde(default = "defaults::connect_timeout_secs")]
    connect_timeout_secs: u64,
    #[serde(default = "defaults::idle_timeout_secs")]
    idle_timeout_secs: u64,
    #[serde(default = "defaults::drain_timeout_secs")]
    drain_timeout_secs: u64,
    #[serde(default = "defaults::max_connections")]
    max_connections: usize,
    #[serde(default = "defaults::recent_connections")]
    recent_connections: usize,
    #[serde(default = "defaults::recording")]
    recording: Recording,
    #[serde(default = "defaults::flush_interval_secs")]
    flush_interval_secs: u64,
    #[serde(default = "defaults::retention_days")]
    retention_days: u32,
    #[serde(default = "defaults::archive_group")]
    archive_group: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default = "defaults::max_body_bytes")]
    max_body_bytes: usize,
    #[serde(default = "defaults::max_sse_event_bytes")]
    max_sse_event_bytes: usize,
    #[serde(default = "defaults::header_read_timeout_secs")]
    header_read_timeout_secs: u64,
    #[serde(default = "defaults::stream_idle_timeout_secs")]
    stream_idle_timeout_secs: u64,
    #[serde(default = "defaults::body_read_timeout_secs")]
    body_read_timeout_secs: u64,
    #[serde(default = "defaults::max_connections_per_uid")]
    max_connections_per_uid: usize,
    #[serde(default = "defaults::max_inflight_bytes_per_uid")]
    max_inflight_bytes_per_uid: usize,
    #[serde(default = "defaults::max_parsed_bytes")]
    max_parsed_bytes: usize,
    #[serde(default = "defaults::tool_changes")]
    tool_changes: ToolChanges,
    #[serde(default)]
    approval_webhook: Option<String>,
    /// Read by `logging` before the configuration (see `logging::LogSettings`); checked here.
    #[serde(default)]
    log_level: Option<String>,
    #[serde(default)]
    log_format: Option<LogFormat>,
    #[serde(default)]
    archive_key_fingerprints: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    ship: Option<ship::RawShip>,
    metrics_listen: Option<String>,
    /// Lets `metrics_listen` name a non-loopback address.
    #[serde(default)]
    metrics_allow_remote: bool,
    #[serde(default, rename = "backend")]
    backends: Vec<RawBackend>,
    #[serde(default, rename = "egress_proxy")]
    egress_proxies: Vec<egress_proxy::RawEgressProxy>,
    #[serde(default)]
    events: Option<events::RawEvents>,
    #[serde(default, rename = "stdio_server")]
    stdio_servers: Vec<stdio::RawStdioServer>,
    /// The shipped launcher patterns (`stdio::DEFAULTS`) besides `[[stdio_server]]`.
    #[serde(default = "defaults::tls")]
    stdio_defaults: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: String,
    host: String,
    port: u16,
    #[serde(default = "defaults::tls")]
    tls: bool,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default = "defaults::mode")]
    mode: BackendMode,
    #[serde(default = "defaults::unknown_sni")]
    unknown_sni: UnknownSni,
    #[serde(default)]
    credentials_file: Option<PathBuf>,
    #[serde(default = "defaults::allow_http")]
    allow_http: Vec<String>,
}

mod defaults {
    use super::OnAgentDown;
    use std::path::PathBuf;

    pub fn state_dir() -> PathBuf {
        "/var/lib/airlock".into()
    }
    pub fn archive_dir() -> PathBuf {
        "/var/lib/airlock/archive".into()
    }
    pub fn policies_dir() -> PathBuf {
        "/etc/airlock/policies".into()
    }
    pub fn on_agent_down() -> OnAgentDown {
        OnAgentDown::Block
    }

    pub fn socket_guard() -> super::SocketGuard {
        super::SocketGuard::Require
    }
    /// Below 1024 so that, while the agent is down, no unprivileged process can bind the port
    /// that redirected connections are sent to.
    pub fn listen_port() -> u16 {
        1010
    }
    pub fn bpffs_dir() -> PathBuf {
        "/sys/fs/bpf/airlock".into()
    }
    pub fn resolve_interval_secs() -> u64 {
        30
    }
    pub fn connect_timeout_secs() -> u64 {
        10
    }
    pub fn idle_timeout_secs() -> u64 {
        300
    }
    pub fn drain_timeout_secs() -> u64 {
        10
    }
    pub fn max_connections() -> usize {
        4096
    }
    pub fn recent_connections() -> usize {
        1000
    }
    pub fn recording() -> super::Recording {
        super::Recording::Group
    }
    pub fn flush_interval_secs() -> u64 {
        60
    }
    pub fn retention_days() -> u32 {
        90
    }
    pub fn archive_group() -> String {
        "airlock".into()
    }
    pub fn tls() -> bool {
        true
    }
    pub fn mode() -> super::BackendMode {
        super::BackendMode::Mcp
    }
    pub fn unknown_sni() -> super::UnknownSni {
        super::UnknownSni::Reject
    }
    pub fn max_body_bytes() -> usize {
        8 << 20
    }
    pub fn max_sse_event_bytes() -> usize {
        8 << 20
    }
    pub fn header_read_timeout_secs() -> u64 {
        10
    }
    pub fn stream_idle_timeout_secs() -> u64 {
        3600
    }
    pub fn body_read_timeout_secs() -> u64 {
        30
    }
    pub fn max_connections_per_uid() -> usize {
        256
    }
    pub fn max_inflight_bytes_per_uid() -> usize {
        64 << 20
    }
    pub fn max_parsed_bytes() -> usize {
        512 << 20
    }
    /// OAuth discovery documents (RFC 8414, RFC 9728): the only non-MCP requests that pass by
    /// default.
    pub fn allow_http() -> Vec<String> {
        vec!["GET /.well-known/*".into(), "HEAD /.well-known/*".into()]
    }
    pub fn tool_changes() -> super::ToolChanges {
        super::ToolChanges::Alert
    }
}

impl Config {
    /// Read and validate `path`. Does not resolve host names (see [`Config::resolve`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            key: None,
            message: format!("cannot read the configuration: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parse and validate configuration text; `path` names it in errors and anchors relative
    /// paths (they are relative to the file's directory).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError {
            path: path.to_owned(),
            key: None,
            message: one_line(&e.to_string()),
        })?;
        let raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            ConfigError {
                path: path.to_owned(),
                key: (key != ".").then_some(key),
                message: one_line(&inner.to_string()),
            }
        })?;
        Validator { path }.validate(raw)
    }

    /// Addresses of every backend and egress proxy (the kernel's targets): static ones as
    /// given, host names resolved (A and AAAA). An unresolvable host is an error naming
    /// `backend[i].host` (`egress_proxy[i].host`).
    pub async fn resolve(&self) -> Result<Vec<ResolvedTarget>, ConfigError> {
        let mut targets = BTreeSet::new();
        let hosts = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u32, &b.host, b.port, &b.addresses, "backend", i))
            .chain(self.egress_proxies.iter().enumerate().map(|(i, p)| {
                (
                    proxy_id(i),
                    &p.host,
                    p.port,
                    &p.addresses,
                    "egress_proxy",
                    i,
                )
            }));
        for (id, host, port, addresses, table, i) in hosts {
            let addrs = if addresses.is_empty() {
                resolve_host(host, port)
                    .await
                    .map_err(|message| ConfigError {
                        path: self.path.clone(),
                        key: Some(format!("{table}[{i}].host")),
                        message,
                    })?
            } else {
                addresses.clone()
            };
            for ip in addrs {
                targets.insert(ResolvedTarget {
                    backend_id: id,
                    addr: SocketAddr::new(crate::keys::canonical_ip(ip), port),
                });
            }
        }
        let targets: Vec<ResolvedTarget> = targets.into_iter().collect();
        check_shared_addresses(&self.backends, &targets)
            .and_then(|()| egress_proxy::check_proxy_addresses(&self.backends, &targets))
            .map_err(|(key, message)| ConfigError {
                path: self.path.clone(),
                key: Some(key),
                message,
            })?;
        Ok(targets)
    }

    /// What a kernel target id names: a backend or an egress proxy.
    pub fn target(&self, id: u32) -> Option<TargetRef<'_>> {
        match id.checked_sub(PROXY_ID_BASE) {
            None => self
                .backends
                .get(id as usize)
                .map(|b| TargetRef::Backend(id as usize, b)),
            Some(i) => self
                .egress_proxies
                .get(i as usize)
                .map(|p| TargetRef::Proxy(i as usize, p)),
        }
    }

    /// The name shown for a kernel target id: the backend's, or `proxy <name>`.
    pub fn target_name(&self, id: u32) -> String {
        match self.target(id) {
            Some(TargetRef::Backend(_, b)) => b.name.clone(),
            Some(TargetRef::Proxy(_, p)) => format!("proxy {}", p.name),
            None => String::new(),
        }
    }

    /// Whether any backend or proxy is named by host (its addresses are refreshed).
    pub fn resolves_names(&self) -> bool {
        self.backends.iter().any(|b| b.addresses.is_empty())
            || self.egress_proxies.iter().any(|p| p.addresses.is_empty())
    }

    /// The backends a connection to `addr` may be for: every backend that has `addr` among its
    /// (current) addresses.
    pub fn owners(
        targets: &[ResolvedTarget],
        addr: SocketAddr,
    ) -> impl Iterator<Item = usize> + '_ {
        let addr = SocketAddr::new(crate::keys::canonical_ip(addr.ip()), addr.port());
        targets
            .iter()
            .filter(move |t| t.addr == addr)
            .map(|t| t.backend_id as usize)
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join("admin.sock")
    }
}

/// One address the kernel redirects, and the backend it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResolvedTarget {
    pub backend_id: u32,
    pub addr: SocketAddr,
}

async fn resolve_host(host: &str, port: u16) -> Result<Vec<IpAddr>, String> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve `{host}`: {e}; set `addresses` to pin it"))?;
    let ips: BTreeSet<IpAddr> = addrs.map(|a| a.ip()).collect();
    if ips.is_empty() {
        return Err(format!("`{host}` resolved to no address"));
    }
    Ok(ips.into_iter().collect())
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.to_owned(),
            key: Some(key.into()),
            message: message.into(),
        }
    }

    fn absolute(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            let base = self.path.parent().unwrap_or(Path::new("."));
            let base = std::path::absolute(base).unwrap_or_else(|_| base.to_owned());
            base.join(p)
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.listen_port == 0 {
            return Err(self.err("listen_port", "must be between 1 and 65535"));
        }
        let mut deprecated = Vec::new();
        if raw.bypass_mark.is_some() {
            deprecated.push("bypass_mark");
        }
        for (key, value) in [
            ("resolve_interval_secs", raw.resolve_interval_secs),
            ("connect_timeout_secs", raw.connect_timeout_secs),
            ("idle_timeout_secs", raw.idle_timeout_secs),
        ] {
            if value == 0 {
                return Err(self.err(key, "must be at least 1"));
            }
        }
        for (key, value) in [
            ("header_read_timeout_secs", raw.header_read_timeout_secs),
            ("stream_idle_timeout_secs", raw.stream_idle_timeout_secs),
            ("body_read_timeout_secs", raw.body_read_timeout_secs),
        ] {
            if value == 0 {
                return Err(self.err(key, "must be at least 1"));
            }
        }
        for (key, value) in [
            ("max_body_bytes", raw.max_body_bytes),
            ("max_sse_event_bytes", raw.max_sse_event_bytes),
        ] {
            if !(1024..=(1 << 30)).contains(&value) {
                return Err(self.err(
                    key,
                    format!("must be between 1024 and 1073741824, got {value}"),
                ));
            }
        }
        if let Some(level) = &raw.log_level
            && let Err(e) = valid_filter(level)
        {
            return Err(self.err("log_level", format!("`{level}` is not a log filter: {e}")));
        }
        let _ = raw.log_format;
        let approval_webhook = match raw.approval_webhook {
            None => None,
            Some(u) => {
                let uri: http::Uri = u.parse().map_err(|e| {
                    self.err("approval_webhook", format!("`{u}` is not a URL: {e}"))
                })?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return Err(self.err(
                        "approval_webhook",
                        format!("`{u}` must be an http:// or https:// URL with a host"),
                    ));
                }
                Some(uri)
            }
        };
        let metrics_listen = match &raw.metrics_listen {
            None => None,
            Some(a) => Some(
                parse_listen(a, raw.metrics_allow_remote)
                    .map_err(|e| self.err("metrics_listen", e))?,
            ),
        };
        for (host, fp) in &raw.archive_key_fingerprints {
            let ok = fp
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err(self.err(
                    format!("archive_key_fingerprints.{host}"),
                    "must be `sha256:` and 64 hex digits (as `airlock verify` prints it)",
                ));
            }
        }
        if raw.flush_interval_secs == 0 {
            return Err(self.err("flush_interval_secs", "must be at least 1"));
        }
        if raw.archive_group.trim().is_empty() {
            return Err(self.err("archive_group", "must not be empty"));
        }
        let host = match raw.host {
            Some(h) if h.trim().is_empty() || h.contains('/') || h.contains('=') => {
                return Err(self.err("host", "must be a non-empty name without `/` or `=`"));
            }
            Some(h) => h,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty() && !h.contains('/'))
                .unwrap_or_else(|| "localhost".into()),
        };
        if raw.max_connections == 0 {
            return Err(self.err("max_connections", "must be at least 1"));
        }
        if raw.max_connections_per_uid == 0 {
            return Err(self.err("max_connections_per_uid", "must be at least 1"));
        }
        if raw.max_inflight_bytes_per_uid < raw.max_body_bytes {
            return Err(self.err(
                "max_inflight_bytes_per_uid",
                format!(
                    "must be at least `max_body_bytes` ({}), or no request of the largest size could be read",
                    raw.max_body_bytes
                ),
            ));
        }
        // One user may hold half the budget: that half must hold a body of the largest size.
        let largest = raw.max_body_bytes.max(raw.max_sse_event_bytes);
        if raw.max_parsed_bytes / 2 < crate::mcp::strict::parsed_size_estimate_bound(largest) {
            return Err(self.err(
                "max_parsed_bytes",
                format!(
                    "must be at least {} for bodies of `max_body_bytes`/`max_sse_event_bytes` ({largest}) to be parsed (one user may use half)",
                    2 * crate::mcp::strict::parsed_size_estimate_bound(largest)
                ),
            ));
        }
        if raw.recent_connections < 1000 {
            return Err(self.err(
                "recent_connections",
                format!("must be at least 1000, got {}", raw.recent_connections),
            ));
        }
        let bpffs_dir = self.absolute(raw.bpffs_dir);
        if !bpffs_dir.starts_with("/sys/fs/bpf") {
            return Err(self.err("bpffs_dir", "must be under /sys/fs/bpf"));
        }
        if raw.backends.is_empty() {
            return Err(self.err("backend", "at least one [[backend]] is required"));
        }
        let mut names = BTreeSet::new();
        let mut endpoints = BTreeSet::new();
        let mut backends = Vec::with_capacity(raw.backends.len());
        for (i, b) in raw.backends.into_iter().enumerate() {
            let key = |k: &str| format!("backend[{i}].{k}");
            if b.name.trim().is_empty() {
                return Err(self.err(key("name"), "must not be empty"));
            }
            if !names.insert(b.name.clone()) {
                return Err(self.err(key("name"), format!("`{}` is used twice", b.name)));
            }
            if b.host.trim().is_empty() {
                return Err(self.err(key("host"), "must not be empty"));
            }
            if b.port == 0 {
                return Err(self.err(key("port"), "must be between 1 and 65535"));
            }
            let mut addresses = Vec::with_capacity(b.addresses.len());
            for (j, a) in b.addresses.iter().enumerate() {
                let ip: IpAddr = a.parse().map_err(|_| {
                    self.err(
                        format!("backend[{i}].addresses[{j}]"),
                        format!("`{a}` is not an IPv4 or IPv6 address"),
                    )
                })?;
                let ip = crate::keys::canonical_ip(ip);
                if ip.is_unspecified() {
                    return Err(self.err(
                        format!("backend[{i}].addresses[{j}]"),
                        "the unspecified address cannot be a backend",
                    ));
                }
                if ip.is_loopback() && b.port == raw.listen_port {
                    return Err(self.err(
                        format!("backend[{i}].addresses[{j}]"),
                        format!(
                            "{ip} port {} is the agent's own listener (`listen_port`)",
                            b.port
                        ),
                    ));
                }
                if !endpoints.insert((i, ip, b.port)) {
                    return Err(self.err(
                        format!("backend[{i}].addresses[{j}]"),
                        format!("{ip} is listed twice"),
                    ));
                }
                addresses.push(ip);
            }
            if addresses.is_empty() {
                // A host given as an IP literal is its own static address.
                if let Ok(ip) = b.host.parse::<IpAddr>() {
                    addresses.push(crate::keys::canonical_ip(ip));
                }
            }
            let ca_file = match b.ca_file {
                Some(p) => {
                    let p = self.absolute(p);
                    std::fs::metadata(&p).map_err(|e| {
                        self.err(key("ca_file"), format!("cannot read {}: {e}", p.display()))
                    })?;
                    Some(p)
                }
                None => None,
            };
            let mut allow_http = Vec::with_capacity(b.allow_http.len());
            for (j, text) in b.allow_http.iter().enumerate() {
                allow_http.push(
                    HttpAllow::parse(text)
                        .map_err(|m| self.err(format!("backend[{i}].allow_http[{j}]"), m))?,
                );
            }
            backends.push(Backend {
                allow_http,
                name: b.name,
                host: b.host,
                port: b.port,
                tls: b.tls,
                addresses,
                ca_file,
                mode: b.mode,
                unknown_sni: b.unknown_sni,
                credentials_file: b.credentials_file.map(|p| self.absolute(p)),
            });
        }
        let cgroup = raw.cgroup.map(|p| self.absolute(p));
        let static_targets: Vec<ResolvedTarget> = backends
            .iter()
            .enumerate()
            .flat_map(|(id, b)| {
                b.addresses.iter().map(move |ip| ResolvedTarget {
                    backend_id: id as u32,
                    addr: SocketAddr::new(*ip, b.port),
                })
            })
            .collect();
        check_shared_addresses(&backends, &static_targets).map_err(|(key, m)| self.err(key, m))?;
        let egress_proxies = self.egress_proxies(raw.egress_proxies, raw.listen_port, &backends)?;
        let ship = raw.ship.map(|s| self.ship(s)).transpose()?;
        let state_dir = self.absolute(raw.state_dir);
        let stdio_servers = stdio::validate(raw.stdio_servers, raw.stdio_defaults)
            .map_err(|m| self.err("stdio_server", m))?;
        let events = match raw.events {
            None => None,
            Some(e) => Some(
                e.validate(|p| self.absolute(p), &state_dir)
                    .map_err(|(key, m)| self.err(&key, m))?,
            ),
        };
        Ok(Config {
            ship,
            path: std::path::absolute(self.path).unwrap_or_else(|_| self.path.to_owned()),
            state_dir,
            archive_dir: self.absolute(raw.archive_dir),
            policies_dir: self.absolute(raw.policies_dir),
            cgroup,
            on_agent_down: raw.on_agent_down,
            socket_guard: raw.socket_guard,
            listen_port: raw.listen_port,
            bpffs_dir,
            deprecated,
            resolve_interval: Duration::from_secs(raw.resolve_interval_secs),
            connect_timeout: Duration::from_secs(raw.connect_timeout_secs),
            idle_timeout: Duration::from_secs(raw.idle_timeout_secs),
            drain_timeout: Duration::from_secs(raw.drain_timeout_secs),
            max_connections: raw.max_connections,
            recent_connections: raw.recent_connections,
            recording: raw.recording,
            flush_interval: Duration::from_secs(raw.flush_interval_secs),
            retention_days: raw.retention_days,
            archive_group: raw.archive_group,
            host,
            max_body_bytes: raw.max_body_bytes,
            max_sse_event_bytes: raw.max_sse_event_bytes,
            header_read_timeout: Duration::from_secs(raw.header_read_timeout_secs),
            stream_idle_timeout: Duration::from_secs(raw.stream_idle_timeout_secs),
            body_read_timeout: Duration::from_secs(raw.body_read_timeout_secs),
            max_connections_per_uid: raw.max_connections_per_uid,
            max_inflight_bytes_per_uid: raw.max_inflight_bytes_per_uid,
            max_parsed_bytes: raw.max_parsed_bytes,
            tool_changes: raw.tool_changes,
            approval_webhook,
            archive_key_fingerprints: raw
                .archive_key_fingerprints
                .into_iter()
                .map(|(h, f)| (h, f.to_ascii_lowercase()))
                .collect(),
            metrics_listen,
            backends,
            egress_proxies,
            events,
            stdio_servers,
        })
    }
}

/// `metrics_listen`: an address and port, loopback unless `allow_remote`.
pub fn parse_listen(text: &str, allow_remote: bool) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("`{text}` is not an IP address and port (e.g. \"127.0.0.1:9464\")"))?;
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(format!(
            "`{text}` is not a loopback address: the metrics endpoint has no authentication; \
             scrape it through a local agent, or set `metrics_allow_remote = true` to serve it \
             on {} anyway",
            addr.ip()
        ));
    }
    Ok(addr)
}

/// `recording`: when a record is durable relative to the message it records (ARCHIVE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recording {
    /// Written through to the segment before the message is forwarded; fsynced within 10 ms.
    Group,
    /// Fsynced before the message is forwarded.
    Strict,
    /// Queued to the log thread; a crash may lose what is queued.
    Buffered,
}

impl Recording {
    /// Whether a failed write, fsync or publish refuses the traffic after it.
    pub fn fails_closed(self) -> bool {
        matches!(self, Recording::Group | Recording::Strict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../airlock.example.toml");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/airlock/airlock.toml"), text)
    }

    fn minimal(extra_top: &str, extra_backend: &str) -> String {
        format!(
            "{extra_top}\n[[backend]]\nname = \"tools\"\nhost = \"mcp.internal.test\"\nport = 8443\naddresses = [\"127.0.0.2\"]\n{extra_backend}\n"
        )
    }

    #[test]
    fn shipped_example_parses() {
        let cfg = Config::parse(Path::new("/repo/airlock.example.toml"), EXAMPLE).unwrap();
        assert_eq!(cfg.backends[0].name, "tools");
        assert_eq!(cfg.backends[0].host, "mcp.internal.test");
        assert_eq!(cfg.on_agent_down, OnAgentDown::Block);
        // Relative paths are anchored at the file's directory.
        assert_eq!(cfg.policies_dir, PathBuf::from("/repo/policies"));
    }

    #[test]
    fn a_relative_configuration_path_is_made_absolute_once() {
        let text = minimal("policies_dir = \"policies\"", "");
        let cfg = Config::parse(Path::new("conf/airlock.toml"), &text).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(cfg.path, cwd.join("conf/airlock.toml"));
        assert_eq!(cfg.policies_dir, cwd.join("conf/policies"));
    }

    #[test]
    fn defaults_apply() {
        let cfg = parse(&minimal("", "")).unwrap();
        assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/airlock"));
        assert_eq!(cfg.archive_dir, PathBuf::from("/var/lib/airlock/archive"));
        assert_eq!(cfg.policies_dir, PathBuf::from("/etc/airlock/policies"));
        assert_eq!(cfg.cgroup, None);
        assert_eq!(cfg.on_agent_down, OnAgentDown::Block);
        assert_eq!(cfg.listen_port, 1010);
        assert!(
            cfg.listen_port < 1024,
            "the default port must be privileged"
        );
        assert!(cfg.backends[0].tls);
        assert_eq!(cfg.recent_connections, 1000);
        assert_eq!(cfg.recording, Recording::Group);
        assert_eq!(cfg.flush_interval, Duration::from_secs(60));
        assert_eq!(cfg.archive_group, "airlock");
        assert!(!cfg.host.is_empty());
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let err = parse(&minimal("colour = \"blue\"", "")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/etc/airlock/airlock.toml"), "{text}");
        assert!(text.contains("colour"), "{text}");
    }

    #[test]
    fn unknown_backend_key_is_named_with_its_index() {
        let err = parse(&minimal("", "prot = 1")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("backend[0]"), "{text}");
        assert!(text.contains("prot"), "{text}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (minimal("on_agent_down = \"maybe\"", ""), "on_agent_down"),
            (minimal("socket_guard = \"off\"", ""), "socket_guard"),
            (minimal("listen_port = 0", ""), "listen_port"),
            (minimal("listen_port = 70000", ""), "listen_port"),
            (minimal("body_read_timeout_secs = 0", ""), "body_read_timeout_secs"),
            (minimal("max_connections_per_uid = 0", ""), "max_connections_per_uid"),
            (minimal("max_inflight_bytes_per_uid = 2048", ""), "max_inflight_bytes_per_uid"),
            (minimal("max_parsed_bytes = 4096", ""), "max_parsed_bytes"),
            (minimal("", "allow_http = [\"GET\"]"), "backend[0].allow_http[0]"),
            (minimal("", "allow_http = [\"G@T /x\"]"), "backend[0].allow_http[0]"),
            (minimal("idle_timeout_secs = 0", ""), "idle_timeout_secs"),
            (minimal("recent_connections = 10", ""), "recent_connections"),
            (minimal("recording = \"lazy\"", ""), "recording"),
            (minimal("flush_interval_secs = 0", ""), "flush_interval_secs"),
            (minimal("host = \"a/b\"", ""), "host"),
            (minimal("bpffs_dir = \"/tmp/x\"", ""), "bpffs_dir"),
            (minimal("", "tls = \"yes\""), "backend[0].tls"),
            (
                "[[backend]]\nname = \"a\"\nhost = \"h\"\nport = 0\n".to_string(),
                "backend[0].port",
            ),
            (
                "[[backend]]\nname = \"a\"\nhost = \"h\"\nport = 1\naddresses = [\"1.2.3.4\", \"nope\"]\n"
                    .to_string(),
                "backend[0].addresses[1]",
            ),
            (
                "[[backend]]\nname = \"a\"\nhost = \"h\"\nport = 1010\naddresses = [\"127.0.0.1\"]\n"
                    .to_string(),
                "backend[0].addresses[0]",
            ),
            (
                "[[backend]]\nname = \"a\"\nhost = \"h\"\nport = 1\n[[backend]]\nname = \"a\"\nhost = \"g\"\nport = 2\n"
                    .to_string(),
                "backend[1].name",
            ),
            (minimal("", "ca_file = \"/nonexistent/ca.pem\""), "backend[0].ca_file"),
            ("state_dir = \"/x\"\n".to_string(), "backend"),
        ];
        for (text, key) in cases {
            let err = parse(&text).expect_err(key);
            let shown = err.to_string();
            assert!(
                shown.contains(&format!("`{key}`")) || err.key.as_deref() == Some(key),
                "expected key {key} in: {shown}"
            );
            assert!(shown.contains("airlock.toml"), "{shown}");
        }
    }

    #[test]
    fn syntax_errors_name_the_file_and_line() {
        let err = parse("state_dir = \n").unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains("airlock.toml"), "{shown}");
        assert!(shown.contains("line 1"), "{shown}");
    }

    #[test]
    fn ip_literal_host_is_its_own_address_and_mapped_addresses_are_canonical() {
        let cfg = parse(
            "[[backend]]\nname = \"a\"\nhost = \"::ffff:10.1.2.3\"\nport = 443\n\
             [[backend]]\nname = \"b\"\nhost = \"b.test\"\nport = 443\naddresses = [\"::1\", \"::ffff:127.0.0.9\"]\n",
        )
        .unwrap();
        assert_eq!(
            cfg.backends[0].addresses,
            vec!["10.1.2.3".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            cfg.backends[1].addresses,
            vec![
                "::1".parse::<IpAddr>().unwrap(),
                "127.0.0.9".parse().unwrap()
            ]
        );
    }

    #[test]
    fn backends_sharing_an_address_must_be_alike() {
        let two = |a: &str, b: &str| {
            format!(
                "[[backend]]\nname = \"a\"\nhost = \"a.test\"\nport = 443\naddresses = [\"10.0.0.1\"]\n{a}\n\
                 [[backend]]\nname = \"b\"\nhost = \"b.test\"\nport = 443\naddresses = [\"10.0.0.1\"]\n{b}\n"
            )
        };
        // Alike TLS backends may share (the server name tells them apart).
        let cfg = parse(&two("", "")).unwrap();
        let targets: Vec<ResolvedTarget> = [0u32, 1]
            .into_iter()
            .map(|id| ResolvedTarget {
                backend_id: id,
                addr: "10.0.0.1:443".parse().unwrap(),
            })
            .collect();
        assert_eq!(
            shared_backends(&cfg.backends, &targets),
            vec![("a".to_owned(), "b".to_owned())]
        );
        for (a, b, why) in [
            ("mode = \"opaque\"", "", "mode"),
            ("tls = false", "tls = false", "tls"),
            ("unknown_sni = \"splice\"", "", "unknown_sni"),
            ("", "allow_http = [\"POST /token\"]", "allow_http"),
            ("credentials_file = \"/x\"", "", "credentials_file"),
        ] {
            let err = parse(&two(a, b)).expect_err(why);
            assert_eq!(err.key.as_deref(), Some("backend[1]"), "{err}");
            assert!(err.to_string().contains(why), "{err}");
            assert!(err.to_string().contains("10.0.0.1:443"), "{err}");
        }
        // A different port is not shared.
        parse(&two("", "").replacen("port = 443", "port = 8443", 1)).unwrap();
    }

    #[test]
    fn allow_http_matches_methods_and_plain_paths_only() {
        let a = HttpAllow::parse("GET /.well-known/*").unwrap();
        let get = http::Method::GET;
        assert!(a.allows(&get, "/.well-known/oauth-protected-resource"));
        assert!(a.allows(&get, "/.well-known/oauth-protected-resource/mcp"));
        assert!(!a.allows(&http::Method::POST, "/.well-known/x"));
        assert!(!a.allows(&get, "/mcp"));
        for sneaky in [
            "/.well-known/../mcp",
            "/.well-known/%2e%2e/mcp",
            "/.well-known/%2Fmcp",
            "/.well-known//mcp",
            "/.well-known/x\\..\\mcp",
        ] {
            assert!(!a.allows(&get, sneaky), "{sneaky}");
        }
        let any = HttpAllow::parse("* /oauth/*").unwrap();
        assert!(any.allows(&http::Method::POST, "/oauth/token"));
        assert!(HttpAllow::parse("GET well-known").is_err());
    }

    #[test]
    fn archive_key_fingerprints_are_checked() {
        let ok = format!("sha256:{}", "ab".repeat(32));
        let cfg = parse(&minimal(
            &format!("archive_key_fingerprints = {{ runner-1 = \"{ok}\" }}"),
            "",
        ))
        .unwrap();
        assert_eq!(cfg.archive_key_fingerprints["runner-1"], ok);
        let err = parse(&minimal(
            "archive_key_fingerprints = { runner-1 = \"abc\" }",
            "",
        ))
        .unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("archive_key_fingerprints.runner-1")
        );
    }

    #[tokio::test]
    async fn unresolvable_host_names_the_key() {
        let cfg = parse("[[backend]]\nname = \"a\"\nhost = \"nonexistent.invalid\"\nport = 443\n")
            .unwrap();
        let err = cfg.resolve().await.unwrap_err();
        assert_eq!(err.key.as_deref(), Some("backend[0].host"));
        assert!(err.to_string().contains("nonexistent.invalid"));
    }

    #[tokio::test]
    async fn static_addresses_resolve_without_dns() {
        let cfg = parse(&minimal("", "")).unwrap();
        let targets = cfg.resolve().await.unwrap();
        assert_eq!(
            targets,
            vec![ResolvedTarget {
                backend_id: 0,
                addr: "127.0.0.2:8443".parse().unwrap()
            }]
        );
    }
}
