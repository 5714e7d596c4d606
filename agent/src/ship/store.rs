//! The bucket: credentials, the `object_store` S3 client, and where each object goes.
//!
//! Fleet layout under `s3://bucket/prefix/`:
//!
//! ```text
//! host=<host>/date=YYYY-MM-DD/hour=HH/<host>-<segment>.parquet   the local file, byte for byte
//! host=<host>/_manifest/<line, 12 digits>.json                    one manifest line (with its \n)
//! host=<host>/_manifest/<host>.pub                                the local public key file
//! ```
//!
//! The manifest line objects, concatenated in order, are the local `_manifest/<host>.jsonl`.

use std::{path::PathBuf, sync::Arc};

use object_store::{
    aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut},
    path::Path as ObjectPath,
};
use serde::Deserialize;

use super::{ShipError, transport::Connector};
use crate::config::ShipConfig;

/// Keys of the fleet layout.
#[derive(Debug, Clone, Default)]
pub struct FleetLayout {
    /// Key prefix (no leading or trailing `/`; may be empty).
    pub prefix: String,
}

impl FleetLayout {
    fn key(&self, rest: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(rest)
        } else {
            ObjectPath::from(format!("{}/{rest}", self.prefix))
        }
    }

    /// A Parquet file, from its path relative to the local archive (`date=…/hour=…/f.parquet`).
    pub fn file(&self, host: &str, rel: &str) -> ObjectPath {
        self.key(&format!("host={host}/{rel}"))
    }

    /// Manifest line `seq` (1-based).
    pub fn manifest_line(&self, host: &str, seq: u64) -> ObjectPath {
        self.key(&format!("host={host}/_manifest/{seq:012}.json"))
    }

    pub fn public_key(&self, host: &str) -> ObjectPath {
        self.key(&format!("host={host}/_manifest/{host}.pub"))
    }

    /// Everything under the prefix.
    pub fn root(&self) -> Option<ObjectPath> {
        (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()))
    }
}

/// Access keys for the bucket.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default)]
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, nor the token.
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// From `credentials_file` (root's, 0600 or 0400: `access_key_id = "…"`,
    /// `secret_access_key = "…"`, optional `session_token`), else from `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
    pub fn load(cfg: &ShipConfig) -> Result<Credentials, ShipError> {
        match &cfg.credentials_file {
            Some(path) => Self::from_file(path),
            None => Self::from_env(),
        }
    }

    pub fn from_file(path: &std::path::Path) -> Result<Credentials, ShipError> {
        let fail = |m: String| ShipError::Credentials(format!("{}: {m}", path.display()));
        crate::fsperm::check_secret_file(path).map_err(|e| fail(e.to_string()))?;
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        // The parse error could quote the secret: say where, not what.
        let creds: Credentials = toml::from_str(&text).map_err(|e| {
            fail(format!(
                "not `access_key_id = \"…\"` and `secret_access_key = \"…\"` (and optionally `session_token`){}",
                e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default()
            ))
        })?;
        if creds.access_key_id.trim().is_empty() || creds.secret_access_key.trim().is_empty() {
            return Err(fail(
                "`access_key_id` and `secret_access_key` must not be empty".into(),
            ));
        }
        Ok(creds)
    }

    pub fn from_env() -> Result<Credentials, ShipError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
                access_key_id,
                secret_access_key,
                session_token: var("AWS_SESSION_TOKEN"),
            }),
            _ => Err(ShipError::Credentials(
                "none: set `credentials_file` in [ship] (a root-only file), or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the agent's environment".into(),
            )),
        }
    }
}

/// The S3 client for `cfg`'s bucket.
pub fn build(
    cfg: &ShipConfig,
    creds: &Credentials,
    own: super::transport::OwnDial,
) -> Result<AmazonS3, ShipError> {
    let extra_roots = match &cfg.ca_file {
        Some(path) => crate::config::extra_roots(path).map_err(ShipError::CaFile)?,
        None => Vec::new(),
    };
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(&cfg.bucket)
        .with_region(&cfg.region)
        .with_access_key_id(&creds.access_key_id)
        .with_secret_access_key(&creds.secret_access_key)
        .with_allow_http(cfg.allow_http)
        .with_virtual_hosted_style_request(cfg.virtual_hosted_style)
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        .with_retry(object_store::RetryConfig {
            // The shipper has its own retry loop: fail fast, count, back off.
            max_retries: 2,
            retry_timeout: cfg.timeout,
            ..Default::default()
        })
        .with_http_connector(Connector {
            allow_http: cfg.allow_http,
            timeout: cfg.timeout,
            own,
            extra_roots: Arc::new(extra_roots),
        });
    if let Some(token) = &creds.session_token {
        b = b.with_token(token);
    }
    if let Some(endpoint) = &cfg.endpoint {
        b = b.with_endpoint(endpoint);
    }
    b.build().map_err(|e| ShipError::Bucket {
        url: cfg.url.clone(),
        message: super::redact::error(&e),
    })
}

/// A store and a layout, for `airlock verify --fleet s3://…`.
pub fn open(cfg: &ShipConfig) -> Result<(Arc<AmazonS3>, FleetLayout), ShipError> {
    let creds = Credentials::load(cfg)?;
    Ok((
        // The command line, without the agent: plain sockets.
        Arc::new(build(cfg, &creds, Default::default())?),
        FleetLayout {
            prefix: cfg.prefix.clone(),
        },
    ))
}

/// Where a synced copy of the bucket keeps an object.
pub fn synced_path(dir: &std::path::Path, key: &ObjectPath) -> PathBuf {
    dir.join(key.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn layout_keys() {
        let l = FleetLayout {
            prefix: "prod/eu".into(),
        };
        assert_eq!(
            l.file(
                "runner-7",
                "date=2026-11-21/hour=14/runner-7-000000000003.parquet"
            )
            .as_ref(),
            "prod/eu/host=runner-7/date=2026-11-21/hour=14/runner-7-000000000003.parquet"
        );
        assert_eq!(
            l.manifest_line("runner-7", 12).as_ref(),
            "prod/eu/host=runner-7/_manifest/000000000012.json"
        );
        assert_eq!(
            FleetLayout::default().public_key("runner-7").as_ref(),
            "host=runner-7/_manifest/runner-7.pub"
        );
    }

    #[test]
    fn credentials_file_must_be_private_and_errors_never_quote_it() {
        let dir = std::env::temp_dir().join(format!("airlock-ship-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ship.toml");
        std::fs::write(
            &path,
            "access_key_id = \"AKIA1\"\nsecret_access_key = \"s3cr3t-value\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Credentials::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Credentials::from_file(&path).unwrap();
        assert_eq!(c.access_key_id, "AKIA1");
        assert!(
            !format!("{c:?}").contains("s3cr3t"),
            "Debug hides the secret"
        );
        std::fs::write(
            &path,
            "access_key_id = \"AKIA1\"\nsecret = \"s3cr3t-value\"\n",
        )
        .unwrap();
        let e = Credentials::from_file(&path).unwrap_err().to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        assert!(e.contains("secret_access_key"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
