//! `[ship]`: where the archive is shipped (an S3-compatible bucket) and how.
//!
//! ```toml
//! [ship]
//! url = "s3://airlock-archive/fleet"      # bucket and optional prefix
//! endpoint = "https://s3.eu-west-1.amazonaws.com"   # optional (AWS by region otherwise)
//! region = "eu-west-1"                    # default us-east-1
//! credentials_file = "/etc/airlock/ship-credentials"   # root-only; else AWS_* variables
//! ca_file = "/etc/airlock/bucket-ca.pem"  # optional: roots of a private CA, besides the system's
//! ```

use std::{path::PathBuf, time::Duration};

use rustls_pki_types::pem::PemObject as _;
use serde::Deserialize;

use super::{ConfigError, Validator};

/// The validated `[ship]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipConfig {
    /// `s3://bucket/prefix`, as given (normalised: no trailing `/`).
    pub url: String,
    pub bucket: String,
    /// Key prefix inside the bucket (`""` or `a/b`, no leading or trailing `/`).
    pub prefix: String,
    /// S3 endpoint (`https://host[:port]`); `None`: AWS, by region.
    pub endpoint: Option<String>,
    pub region: String,
    /// Allow an `http://` endpoint (tests, a bucket on the same host). Off by default.
    pub allow_http: bool,
    /// Virtual-hosted-style requests (`bucket.endpoint/key`) instead of path-style.
    pub virtual_hosted_style: bool,
    /// Root-only file with `access_key_id`, `secret_access_key` (and `session_token`); `None`:
    /// the `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` variables.
    pub credentials_file: Option<PathBuf>,
    /// PEM certificates trusted as roots for the bucket's TLS certificate, in addition to the
    /// system's (an object store behind a private CA). Checked when the configuration is read.
    pub ca_file: Option<PathBuf>,
    /// The longest pause between attempts after a failure, and between periodic passes.
    pub retry: Duration,
    /// Timeout of one request (connect, send, answer) to the bucket.
    pub timeout: Duration,
    /// Local retention never deletes a file that has not been shipped.
    pub keep_unshipped: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShip {
    url: String,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default = "default_region")]
    region: String,
    #[serde(default)]
    allow_http: bool,
    #[serde(default)]
    virtual_hosted_style: bool,
    #[serde(default)]
    credentials_file: Option<PathBuf>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default = "default_retry_secs")]
    retry_secs: u64,
    #[serde(default = "default_timeout_secs")]
    timeout_secs: u64,
    #[serde(default = "default_keep_unshipped")]
    keep_unshipped: bool,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_retry_secs() -> u64 {
    60
}
fn default_timeout_secs() -> u64 {
    30
}
fn default_keep_unshipped() -> bool {
    true
}

/// Split `s3://bucket/prefix` into bucket and prefix; `Err` says what is wrong.
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("`{url}` must start with s3:// (s3://bucket/prefix)"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let ok_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    if !ok_bucket {
        return Err(format!(
            "`{bucket}` is not a bucket name (3 to 63 lower-case letters, digits, `-` and `.`)"
        ));
    }
    let prefix = prefix.trim_end_matches('/');
    if prefix
        .split('/')
        .any(|s| (s.is_empty() && !prefix.is_empty()) || s == "." || s == "..")
        || prefix.chars().any(char::is_control)
    {
        return Err(format!(
            "the prefix `{prefix}` has an empty, `.` or `..` segment or a control character"
        ));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

impl Validator<'_> {
    pub(super) fn ship(&self, raw: RawShip) -> Result<ShipConfig, ConfigError> {
        let (bucket, prefix) = parse_url(raw.url.trim()).map_err(|m| self.err("ship.url", m))?;
        let endpoint = match raw.endpoint {
            None => None,
            Some(e) => {
                let uri: http::Uri = e.parse().map_err(|err| {
                    self.err("ship.endpoint", format!("`{e}` is not a URL: {err}"))
                })?;
                match uri.scheme_str() {
                    Some("https") => {}
                    Some("http") if raw.allow_http => {}
                    Some("http") => {
                        return Err(self.err(
                            "ship.endpoint",
                            format!("`{e}` is plain http: the archive would travel unencrypted; use https://, or set `allow_http = true` for a bucket on this host"),
                        ));
                    }
                    _ => {
                        return Err(
                            self.err("ship.endpoint", format!("`{e}` must be an https:// URL"))
                        );
                    }
                }
                if uri.host().is_none() || uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
                    return Err(self.err(
                        "ship.endpoint",
                        format!("`{e}` must be scheme://host[:port], without a path"),
                    ));
                }
                Some(e.trim_end_matches('/').to_owned())
            }
        };
        if raw.region.trim().is_empty() {
            return Err(self.err("ship.region", "must not be empty"));
        }
        // Read and parsed now, so a bad file stops `check-config` and the agent's start (exit
        // 2) rather than every upload later.
        let ca_file = match raw.ca_file {
            None => None,
            Some(p) => {
                let p = self.absolute(p);
                extra_roots(&p).map_err(|m| self.err("ship.ca_file", m))?;
                Some(p)
            }
        };
        if !(1..=86_400).contains(&raw.retry_secs) {
            return Err(self.err("ship.retry_secs", "must be between 1 and 86400"));
        }
        if !(1..=3600).contains(&raw.timeout_secs) {
            return Err(self.err("ship.timeout_secs", "must be between 1 and 3600"));
        }
        Ok(ShipConfig {
            url: format!(
                "s3://{bucket}{}{prefix}",
                if prefix.is_empty() { "" } else { "/" }
            ),
            bucket,
            prefix,
            endpoint,
            region: raw.region,
            allow_http: raw.allow_http,
            virtual_hosted_style: raw.virtual_hosted_style,
            credentials_file: raw.credentials_file.map(|p| self.absolute(p)),
            ca_file,
            retry: Duration::from_secs(raw.retry_secs),
            timeout: Duration::from_secs(raw.timeout_secs),
            keep_unshipped: raw.keep_unshipped,
        })
    }
}

/// The certificates of a PEM file of extra trusted roots (`[ship] ca_file`, `airlock verify
/// --fleet --ca-file`): every `CERTIFICATE` block, each one usable as a trust anchor. `Err`
/// says what is wrong with the file, naming it.
pub fn extra_roots(
    path: &std::path::Path,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM file of certificates ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    let mut scratch = rustls::RootCertStore::empty();
    for (i, c) in certs.iter().enumerate() {
        scratch.add(c.clone()).map_err(|e| {
            format!(
                "{}: certificate {} cannot be a trusted root ({e})",
                path.display(),
                i + 1
            )
        })?;
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(ship: &str) -> Result<crate::config::Config, ConfigError> {
        crate::config::Config::parse(
            Path::new("/etc/airlock/airlock.toml"),
            &format!(
                "[[backend]]\nname = \"tools\"\nhost = \"mcp.internal.test\"\nport = 8443\naddresses = [\"127.0.0.2\"]\n\n[ship]\n{ship}\n"
            ),
        )
    }

    #[test]
    fn defaults_and_normalisation() {
        let s = parse("url = \"s3://fleet-archive/prod/eu/\"")
            .unwrap()
            .ship
            .unwrap();
        assert_eq!(s.bucket, "fleet-archive");
        assert_eq!(s.prefix, "prod/eu");
        assert_eq!(s.url, "s3://fleet-archive/prod/eu");
        assert_eq!(s.region, "us-east-1");
        assert!(!s.allow_http);
        assert!(s.keep_unshipped);
        assert_eq!(s.retry, Duration::from_secs(60));
        assert_eq!(s.endpoint, None);
        let s = parse("url = \"s3://fleet-archive\"\ncredentials_file = \"ship.cred\"")
            .unwrap()
            .ship
            .unwrap();
        assert_eq!(s.prefix, "");
        assert_eq!(
            s.credentials_file.as_deref(),
            Some(Path::new("/etc/airlock/ship.cred"))
        );
        assert!(parse("").is_err(), "url is required");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key, words) in [
            ("url = \"https://b/x\"", "ship.url", "s3://"),
            ("url = \"s3://B_x\"", "ship.url", "bucket name"),
            ("url = \"s3://bucket/a//b\"", "ship.url", "empty"),
            ("url = \"s3://bucket/../b\"", "ship.url", "`..`"),
            (
                "url = \"s3://bucket\"\nendpoint = \"http://127.0.0.1:9000\"",
                "ship.endpoint",
                "allow_http",
            ),
            (
                "url = \"s3://bucket\"\nendpoint = \"ftp://x\"",
                "ship.endpoint",
                "https://",
            ),
            (
                "url = \"s3://bucket\"\nendpoint = \"https://h/path\"",
                "ship.endpoint",
                "without a path",
            ),
            (
                "url = \"s3://bucket\"\nretry_secs = 0",
                "ship.retry_secs",
                "between",
            ),
            (
                "url = \"s3://bucket\"\ntimeout_secs = 0",
                "ship.timeout_secs",
                "between",
            ),
            (
                "url = \"s3://bucket\"\nregion = \" \"",
                "ship.region",
                "empty",
            ),
            ("url = \"s3://bucket\"\ncolour = 1", "ship", "colour"),
        ] {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(key), "{text}: {e}");
            assert!(e.contains(words), "{text}: {e}");
        }
        let ok =
            parse("url = \"s3://bucket\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true")
                .unwrap()
                .ship
                .unwrap();
        assert_eq!(ok.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
    }

    #[test]
    fn ca_file_is_read_when_the_configuration_is() {
        let dir = std::env::temp_dir().join(format!("airlock-ship-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        let s = parse(&format!(
            "url = \"s3://b-1\"\nca_file = \"{}\"",
            good.display()
        ))
        .unwrap()
        .ship
        .unwrap();
        assert_eq!(s.ca_file.as_deref(), Some(good.as_path()));
        assert_eq!(
            parse("url = \"s3://b-1\"").unwrap().ship.unwrap().ca_file,
            None
        );
        // A key, text, or nothing at all where the certificates should be: the key is named.
        let only_key = dir.join("key.pem");
        std::fs::write(&only_key, key.serialize_pem()).unwrap();
        let text = dir.join("text.pem");
        std::fs::write(&text, "not a certificate\n").unwrap();
        let broken = dir.join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let not_der = dir.join("not-der.pem");
        std::fs::write(
            &not_der,
            "-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        for (file, words) in [
            (only_key, "no PEM certificate"),
            (text, "no PEM certificate"),
            (broken, "not a PEM file"),
            (not_der, "certificate 1 cannot be a trusted root"),
            (dir.join("missing.pem"), "cannot read"),
            (dir.clone(), "cannot read"),
        ] {
            let e = parse(&format!(
                "url = \"s3://b-1\"\nca_file = \"{}\"",
                file.display()
            ))
            .expect_err(&file.display().to_string())
            .to_string();
            assert!(
                e.contains("ship.ca_file") && e.contains(words),
                "{}: {e}",
                file.display()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
