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

pub use crate::config::{LogFormat, LogSettings, redacted_url, valid_filter};

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
