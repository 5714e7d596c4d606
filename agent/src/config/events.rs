//! The `[events]` section of `airlock.toml`: which sinks get the OCSF events.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Validated `[events]`: every sink is optional, any combination works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsConfig {
    /// Events each sink may have waiting in memory; past it, new events are dropped and
    /// counted (the traffic never waits for a sink).
    pub queue_capacity: usize,
    pub file: Option<FileSink>,
    pub syslog: Option<SyslogSink>,
    pub webhook: Option<WebhookSink>,
}

/// A JSON-lines file, rotated by size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSink {
    pub path: PathBuf,
    /// Rotate when the file would pass this size.
    pub max_bytes: u64,
    /// Rotated files kept (`path.1` newest ... `path.<keep>` oldest).
    pub keep: u32,
}

/// Syslog (RFC 5424), the JSON event as MSG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogSink {
    pub transport: SyslogTransport,
    /// Facility code (`local0` = 16).
    pub facility: u8,
    pub app_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTransport {
    /// Octet-counting framing (RFC 6587 3.4.1).
    Tcp(String),
    /// One datagram per event.
    Udp(String),
    /// A datagram Unix socket (`/dev/log`).
    UnixDatagram(PathBuf),
    /// A stream Unix socket, octet-counting framing.
    UnixStream(PathBuf),
}

/// An HTTPS (or http) endpoint that receives each event as a JSON POST. Its `Debug` shows the
/// URL as scheme, host and port only (a chat webhook's token is in the path).
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSink {
    pub url: http::Uri,
    /// Extra CA certificate(s) (PEM) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// A root-only (0600) file whose content is the `Authorization` header value (e.g.
    /// `Splunk <HEC token>`); read at start, never logged.
    pub authorization_file: Option<PathBuf>,
    pub timeout_secs: u64,
    /// The on-disk queue: `state_dir/events-spool` (0700).
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub spool_max_files: usize,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink")
            .field("url", &crate::config::redacted_url(&self.url))
            .field("ca_file", &self.ca_file)
            .field("authorization_file", &self.authorization_file)
            .field("timeout_secs", &self.timeout_secs)
            .field("spool_dir", &self.spool_dir)
            .field("spool_max_bytes", &self.spool_max_bytes)
            .field("spool_max_files", &self.spool_max_files)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEvents {
    #[serde(default = "defaults::queue_capacity")]
    queue_capacity: usize,
    #[serde(default)]
    file: Option<RawFile>,
    #[serde(default)]
    syslog: Option<RawSyslog>,
    #[serde(default)]
    webhook: Option<RawWebhook>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: PathBuf,
    #[serde(default = "defaults::max_bytes")]
    max_bytes: u64,
    #[serde(default = "defaults::keep")]
    keep: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSyslog {
    address: String,
    #[serde(default = "defaults::facility")]
    facility: String,
    #[serde(default = "defaults::app_name")]
    app_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    authorization_file: Option<PathBuf>,
    #[serde(default = "defaults::timeout_secs")]
    timeout_secs: u64,
    #[serde(default = "defaults::spool_max_bytes")]
    spool_max_bytes: u64,
    #[serde(default = "defaults::spool_max_files")]
    spool_max_files: usize,
}

mod defaults {
    pub fn queue_capacity() -> usize {
        4096
    }
    pub fn max_bytes() -> u64 {
        100 * 1024 * 1024
    }
    pub fn keep() -> u32 {
        5
    }
    pub fn facility() -> String {
        "local0".into()
    }
    pub fn app_name() -> String {
        "airlock".into()
    }
    pub fn timeout_secs() -> u64 {
        5
    }
    pub fn spool_max_bytes() -> u64 {
        64 * 1024 * 1024
    }
    pub fn spool_max_files() -> usize {
        10_000
    }
}

const FACILITIES: &[(&str, u8)] = &[
    ("kern", 0),
    ("user", 1),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("authpriv", 10),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

impl RawEvents {
    /// Validate; `absolute` anchors relative paths at the configuration's directory. Errors
    /// are (key under `events`, message).
    pub(crate) fn validate(
        self,
        absolute: impl Fn(PathBuf) -> PathBuf,
        state_dir: &Path,
    ) -> Result<EventsConfig, (String, String)> {
        let err = |k: &str, m: String| (format!("events.{k}"), m);
        if !(1..=1_000_000).contains(&self.queue_capacity) {
            return Err(err(
                "queue_capacity",
                format!("must be between 1 and 1000000, got {}", self.queue_capacity),
            ));
        }
        let file = match self.file {
            None => None,
            Some(f) => {
                if f.max_bytes < 4096 {
                    return Err(err(
                        "file.max_bytes",
                        format!("must be at least 4096, got {}", f.max_bytes),
                    ));
                }
                if f.keep > 1000 {
                    return Err(err(
                        "file.keep",
                        format!("must be at most 1000, got {}", f.keep),
                    ));
                }
                Some(FileSink {
                    path: absolute(f.path),
                    max_bytes: f.max_bytes,
                    keep: f.keep,
                })
            }
        };
        let syslog = match self.syslog {
            None => None,
            Some(s) => {
                let transport = parse_address(&s.address).map_err(|m| err("syslog.address", m))?;
                let facility = FACILITIES
                    .iter()
                    .find(|(n, _)| *n == s.facility)
                    .map(|(_, c)| *c)
                    .ok_or_else(|| {
                        err(
                            "syslog.facility",
                            format!(
                                "`{}` is not a facility; use one of {}",
                                s.facility,
                                FACILITIES
                                    .iter()
                                    .map(|(n, _)| *n)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )
                    })?;
                let app_ok = (1..=48).contains(&s.app_name.len())
                    && s.app_name.bytes().all(|b| (33..=126).contains(&b));
                if !app_ok {
                    return Err(err(
                        "syslog.app_name",
                        "must be 1 to 48 printable ASCII characters without spaces".into(),
                    ));
                }
                Some(SyslogSink {
                    transport,
                    facility,
                    app_name: s.app_name,
                })
            }
        };
        let webhook = match self.webhook {
            None => None,
            Some(w) => {
                let url: http::Uri = w
                    .url
                    .parse()
                    .map_err(|e| err("webhook.url", format!("not a URL: {e}")))?;
                if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
                    return Err(err(
                        "webhook.url",
                        "must be an https:// (or http://) URL with a host".into(),
                    ));
                }
                if !(1..=300).contains(&w.timeout_secs) {
                    return Err(err(
                        "webhook.timeout_secs",
                        format!("must be between 1 and 300, got {}", w.timeout_secs),
                    ));
                }
                if w.spool_max_files == 0 || w.spool_max_bytes < 65536 {
                    return Err(err(
                        "webhook.spool_max_bytes",
                        "the spool needs at least 1 file and 65536 bytes".into(),
                    ));
                }
                Some(WebhookSink {
                    url,
                    ca_file: w.ca_file.map(&absolute),
                    authorization_file: w.authorization_file.map(&absolute),
                    timeout_secs: w.timeout_secs,
                    spool_dir: state_dir.join("events-spool"),
                    spool_max_bytes: w.spool_max_bytes,
                    spool_max_files: w.spool_max_files,
                })
            }
        };
        Ok(EventsConfig {
            queue_capacity: self.queue_capacity,
            file,
            syslog,
            webhook,
        })
    }
}

/// `tcp://host:port`, `udp://host:port`, `unix:///dev/log` (datagram) or
/// `unix-stream:///path`.
fn parse_address(a: &str) -> Result<SyslogTransport, String> {
    let hostport = |rest: &str| {
        if rest
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            Ok(rest.to_owned())
        } else {
            Err(format!("`{a}`: expected host:port after the scheme"))
        }
    };
    if let Some(rest) = a.strip_prefix("tcp://") {
        return hostport(rest).map(SyslogTransport::Tcp);
    }
    if let Some(rest) = a.strip_prefix("udp://") {
        return hostport(rest).map(SyslogTransport::Udp);
    }
    if let Some(rest) = a.strip_prefix("unix-stream://") {
        return Ok(SyslogTransport::UnixStream(rest.into()));
    }
    if let Some(rest) = a.strip_prefix("unix://") {
        return Ok(SyslogTransport::UnixDatagram(rest.into()));
    }
    Err(format!(
        "`{a}`: use tcp://host:port, udp://host:port, unix:///dev/log or unix-stream:///path"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EventsConfig, (String, String)> {
        let raw: RawEvents = toml::from_str(text).unwrap();
        raw.validate(
            |p| Path::new("/etc/airlock").join(p),
            Path::new("/var/lib/airlock"),
        )
    }

    #[test]
    fn sinks_parse_with_defaults() {
        let c = parse(
            r#"
            [file]
            path = "events.jsonl"
            [syslog]
            address = "tcp://127.0.0.1:6514"
            [webhook]
            url = "https://siem.example/in"
            "#,
        )
        .unwrap();
        assert_eq!(c.queue_capacity, 4096);
        let f = c.file.unwrap();
        assert_eq!(f.path, Path::new("/etc/airlock/events.jsonl"));
        assert_eq!((f.max_bytes, f.keep), (100 * 1024 * 1024, 5));
        let s = c.syslog.unwrap();
        assert_eq!(s.transport, SyslogTransport::Tcp("127.0.0.1:6514".into()));
        assert_eq!((s.facility, s.app_name.as_str()), (16, "airlock"));
        let w = c.webhook.unwrap();
        assert_eq!(w.spool_dir, Path::new("/var/lib/airlock/events-spool"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = parse("[syslog]\naddress = \"10.0.0.1:514\"").unwrap_err();
        assert_eq!(e.0, "events.syslog.address");
        let e = parse("[syslog]\naddress = \"udp://h:514\"\nfacility = \"local9\"").unwrap_err();
        assert_eq!(e.0, "events.syslog.facility");
        let e = parse("[webhook]\nurl = \"ftp://x/\"").unwrap_err();
        assert_eq!(e.0, "events.webhook.url");
        assert_eq!(
            parse("[syslog]\naddress = \"unix:///dev/log\"")
                .unwrap()
                .syslog
                .unwrap()
                .transport,
            SyslogTransport::UnixDatagram("/dev/log".into())
        );
    }
}
