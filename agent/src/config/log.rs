//! The log settings of `airlock.toml` (`log_level`, `log_format`), read by `logging` before
//! the rest of the file, and how log lines may show a URL.

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

/// A URL as logs may show it: scheme, host and port; no user info, path or query.
pub fn redacted_url(uri: &http::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("?");
    let host = uri.host().unwrap_or("?");
    match uri.port_u16() {
        Some(p) => format!("{scheme}://{host}:{p}/…"),
        None => format!("{scheme}://{host}/…"),
    }
}
