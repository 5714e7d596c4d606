//! Credential brokering: the upstream credential lives in a root-only secrets file and is added
//! by Airlock to the requests it forwards; whatever credential the client sent is removed. The
//! agents on the host never hold the MCP server's token.
//!
//! Secrets file (TOML, owned by root, mode 0600 or 0400):
//! ```toml
//! default = "Bearer s3cr3t-for-everyone"          # optional
//! [users]                                          # optional, by user name
//! alice = "Bearer token-of-alice"
//! [uids]                                           # optional, by uid
//! 1001 = "Bearer token-of-uid-1001"
//! ```
//! The value is the whole `Authorization` header value. Lookup order: uid, user, default.

use std::{collections::BTreeMap, fmt, os::unix::fs::MetadataExt as _, path::Path};

use serde::Deserialize;

/// A credential. Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[credential]")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecrets {
    default: Option<String>,
    #[serde(default)]
    users: BTreeMap<String, String>,
    #[serde(default)]
    uids: BTreeMap<String, String>,
}

#[derive(Debug)]
pub struct Credentials {
    default: Option<Secret>,
    users: BTreeMap<String, Secret>,
    uids: BTreeMap<u32, Secret>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{path}: {message}")]
    Bad { path: String, message: String },
}

impl Credentials {
    /// Load a secrets file; refuses one that someone other than root could read or change.
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let bad = |message: String| CredentialsError::Bad {
            path: path.display().to_string(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        if meta.uid() != 0 {
            return Err(bad(format!(
                "must be owned by root (owner uid is {})",
                meta.uid()
            )));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(bad(format!(
                "must be readable by root only (mode is {:o}; chmod 600)",
                meta.mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        Self::parse(&text).map_err(bad)
    }

    /// Parse the file's text. Error messages never include a credential.
    pub fn parse(text: &str) -> Result<Credentials, String> {
        let raw: RawSecrets = toml::from_str(text).map_err(|e| {
            // toml's messages quote the offending line, which may hold a secret: keep the
            // position and the kind of error only.
            let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1)).unwrap_or(0);
            format!("line {line}: not a valid secrets file (expected `default`, [users] and [uids] of strings)")
        })?;
        let mut uids = BTreeMap::new();
        for (k, v) in raw.uids {
            let uid: u32 = k
                .parse()
                .map_err(|_| format!("[uids]: `{k}` is not a uid"))?;
            uids.insert(uid, Secret(v));
        }
        Ok(Credentials {
            default: raw.default.map(Secret),
            users: raw.users.into_iter().map(|(k, v)| (k, Secret(v))).collect(),
            uids,
        })
    }

    /// The credential for a caller: by uid, then user name, then the default.
    pub fn for_caller(&self, uid: u32, user: Option<&str>) -> Option<&Secret> {
        self.uids
            .get(&uid)
            .or_else(|| user.and_then(|u| self.users.get(u)))
            .or(self.default.as_ref())
    }
}

/// Headers a client may use to present credentials; all removed before forwarding.
pub const CLIENT_CREDENTIAL_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie"];

/// Rewrite a request's headers (name, value) for brokering: strip the client's credentials,
/// add the brokered one.
pub fn broker_headers(headers: &mut Vec<(String, String)>, credential: Option<&Secret>) {
    headers.retain(|(name, _)| {
        !CLIENT_CREDENTIAL_HEADERS.contains(&name.to_ascii_lowercase().as_str())
    });
    if let Some(c) = credential {
        headers.push(("authorization".to_owned(), c.expose().to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "default = \"Bearer everyone\"\n[users]\nalice = \"Bearer alice-token\"\n[uids]\n1001 = \"Bearer uid-1001\"\n";

    #[test]
    fn lookup_order_uid_user_default() {
        let c = Credentials::parse(FILE).unwrap();
        assert_eq!(
            c.for_caller(1001, Some("alice")).unwrap().expose(),
            "Bearer uid-1001"
        );
        assert_eq!(
            c.for_caller(1000, Some("alice")).unwrap().expose(),
            "Bearer alice-token"
        );
        assert_eq!(
            c.for_caller(5, Some("bob")).unwrap().expose(),
            "Bearer everyone"
        );
        let none = Credentials::parse("[users]\nalice = \"x\"\n").unwrap();
        assert!(none.for_caller(5, Some("bob")).is_none());
    }

    #[test]
    fn secrets_never_show_in_debug_display_or_errors() {
        let c = Credentials::parse(FILE).unwrap();
        let shown = format!("{c:?} {}", c.for_caller(5, None).unwrap());
        assert!(
            !shown.contains("everyone") && !shown.contains("alice-token"),
            "{shown}"
        );
        let err = Credentials::parse("default = \"Bearer topsecret\"\nusers = 3\n").unwrap_err();
        assert!(!err.contains("topsecret"), "{err}");
        let err = Credentials::parse("default = \"Bearer topsecret\ncolour = 1\n").unwrap_err();
        assert!(!err.contains("topsecret"), "{err}");
    }

    #[test]
    fn headers_are_stripped_and_replaced() {
        let c = Credentials::parse(FILE).unwrap();
        let mut h = vec![
            ("Authorization".to_owned(), "Bearer client-held".to_owned()),
            ("Cookie".to_owned(), "session=abc".to_owned()),
            ("Content-Type".to_owned(), "application/json".to_owned()),
        ];
        broker_headers(&mut h, c.for_caller(1000, Some("alice")));
        assert_eq!(
            h,
            vec![
                ("Content-Type".to_owned(), "application/json".to_owned()),
                ("authorization".to_owned(), "Bearer alice-token".to_owned())
            ]
        );
    }

    #[test]
    fn the_file_must_be_root_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("airlock-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secrets.toml");
        std::fs::write(&path, FILE).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Credentials::load(&path).unwrap_err().to_string();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(err.contains("root only"), "{err}");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert!(Credentials::load(&path).is_ok());
        } else {
            assert!(err.contains("owned by root"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
