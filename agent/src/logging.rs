//! The agent's own log (stderr; journald under systemd): text or one JSON object per line,
//! the level from `AIRLOCK_LOG`, else `RUST_LOG`, else `log_level` in airlock.toml, else
//! `info`.
//!
//! The other commands (`verify`, `status`, …) log to stderr too, but only warnings and errors,
//! and their own messages ([`CLI_LEVEL`]): a library's chatter (`object_store` retrying at
//! INFO) is no business of someone reading a verification. `log_level` in airlock.toml is the
//! agent's and does not apply to them; `AIRLOCK_LOG` (then `RUST_LOG`) does.
//!
//! What is never logged: message payloads, header values, tokens, keys, credentials, webhook
//! paths and queries (they carry secrets: chat webhooks embed theirs in the path). Log lines
//! name things by id, backend, uid, method and tool, and URLs by scheme, host and port only
//! ([`redacted_url`]). A test runs traffic carrying planted secrets at `trace` level and
//! searches the log for them.

use std::path::Path;

use serde::Deserialize;

/// `--log-format` / `log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The two keys of airlock.toml the log needs before the rest of the file is read.
#[derive(Debug, Default, Deserialize)]
pub struct LogSettings {
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default)]
    pub log_format: Option<LogFormat>,
}

impl LogSettings {
    /// The settings of a configuration file; defaults when it is absent or unreadable (the
    /// configuration's own loading reports that, with the file and key).
    pub fn read(path: &Path) -> LogSettings {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| toml::from_str(&text).ok())
            .unwrap_or_default()
    }
}

/// Whether `directives` is a valid level filter (`info`, `airlock=debug,hyper=warn`).
pub fn valid_filter(directives: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(directives)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Who logs: the agent (`airlock run`), or a command of the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Cli,
}

/// The level of the command line's log unless `AIRLOCK_LOG`/`RUST_LOG` says otherwise: every
/// warning and error, and Airlock's own messages; no library's INFO lines.
pub const CLI_LEVEL: &str = "warn,airlock=info";

/// Install the global subscriber (stderr).
pub fn init(settings: &LogSettings, format: Option<LogFormat>, role: Role) {
    let from_env = ["AIRLOCK_LOG", "RUST_LOG"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()));
    let directives = match role {
        Role::Agent => from_env
            .or_else(|| settings.log_level.clone())
            .unwrap_or_else(|| "info".into()),
        Role::Cli => from_env.unwrap_or_else(|| CLI_LEVEL.into()),
    };
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(&directives)
        .unwrap_or_else(|e| {
            let fallback = match role {
                Role::Agent => "info",
                Role::Cli => CLI_LEVEL,
            };
            eprintln!("airlock: log level `{directives}` is invalid ({e}); using `{fallback}`");
            tracing_subscriber::EnvFilter::new(fallback)
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format.or(settings.log_format).unwrap_or_default() {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// A URL as logs may show it: scheme, host and port; no user info, path or query.
pub fn redacted_url(uri: &http::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("?");
    let host = uri.host().unwrap_or("?");
    match uri.port_u16() {
        Some(p) => format!("{scheme}://{host}:{p}/…"),
        None => format!("{scheme}://{host}/…"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_secrets() {
        let u: http::Uri = "https://hooks.example.com:8443/services/T000/B000/XXXXSECRET?token=abc"
            .parse()
            .unwrap();
        assert_eq!(redacted_url(&u), "https://hooks.example.com:8443/…");
    }

    #[test]
    fn filters_are_checked() {
        assert!(valid_filter("info").is_ok());
        assert!(valid_filter("airlock=debug,hyper=warn").is_ok());
        assert!(valid_filter("airlock=loud").is_err());
    }

    #[test]
    fn settings_are_read_from_the_file_alone() {
        let dir = std::env::temp_dir().join(format!("airlock-logset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.toml");
        std::fs::write(
            &f,
            "log_level = \"debug\"\nlog_format = \"json\"\nlisten_port = 1010\n",
        )
        .unwrap();
        let s = LogSettings::read(&f);
        assert_eq!(s.log_level.as_deref(), Some("debug"));
        assert_eq!(s.log_format, Some(LogFormat::Json));
        assert!(
            LogSettings::read(&dir.join("missing.toml"))
                .log_level
                .is_none()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
