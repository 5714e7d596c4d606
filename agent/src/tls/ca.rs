//! The managed certificate authority, on disk under `state_dir/ca/`.
//!
//! - `root-N.pem` (0644) and `root-N.key` (0600, root-owned): ECDSA P-256 roots, ten years.
//! - `roots.json`: which root signs (`active`), which one is staged by `airlock ca rotate`
//!   (`pending`, with the time it takes over) and which ones stay trusted after they stopped
//!   signing (`retired`, until their last leaves have expired).
//!
//! The root never signs a leaf itself: the agent makes a short-lived intermediate, name
//! constrained to the configured backends (trust stores often ignore constraints on roots),
//! at start and every day. Rotation is staged so that no client breaks: the new root goes
//! into the trust bundle at once (`airlock ca show --pem`, `airlock ca install`) and signs
//! only after the overlap period, by which time hosts have picked it up.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// How long a retired root stays in the trust bundle after it stopped signing: longer than
/// any leaf or intermediate it signed.
const RETIRED_GRACE: Duration = Duration::from_secs(8 * 24 * 3600);
const ROOT_VALIDITY_DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("no CA in {0}: run `airlock ca init` (or `airlock run`, which creates it)")]
    Missing(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Pending {
    id: u32,
    /// Unix seconds.
    activate_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Retired {
    id: u32,
    /// Unix seconds: dropped from the bundle after this.
    until: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct RootsFile {
    active: u32,
    #[serde(default)]
    pending: Option<Pending>,
    #[serde(default)]
    retired: Vec<Retired>,
}

/// One root: its certificate and (for the active one) its key.
#[derive(Debug, Clone)]
pub struct Root {
    pub id: u32,
    pub pem: String,
    pub der: Vec<u8>,
    /// `active`, `pending (signs from …)` or `retired (trusted until …)`.
    pub role: String,
}

impl Root {
    pub fn fingerprint(&self) -> String {
        hex::encode(sha2::Sha256::digest(&self.der))
    }
}

/// The CA directory, loaded.
#[derive(Debug)]
pub struct Ca {
    dir: PathBuf,
    roots: RootsFile,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Ca {
    pub fn dir_of(state_dir: &Path) -> PathBuf {
        state_dir.join("ca")
    }

    /// Create the CA if there is none; `Ok(true)` when it was created.
    pub fn init(dir: &Path, host: &str) -> Result<bool, CaError> {
        if dir.join("roots.json").exists() {
            Ca::load(dir)?;
            return Ok(false);
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_err(dir))?;
        write_root(dir, 1, host)?;
        let ca = Ca {
            dir: dir.to_owned(),
            roots: RootsFile {
                active: 1,
                pending: None,
                retired: Vec::new(),
            },
        };
        ca.save()?;
        Ok(true)
    }

    /// Load, applying what time has decided: a pending root whose time has come becomes the
    /// active one, retired roots past their grace are dropped (and the change saved).
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let path = dir.join("roots.json");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CaError::Missing(dir.to_owned()));
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let roots: RootsFile = serde_json::from_str(&text).map_err(|e| CaError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut ca = Ca {
            dir: dir.to_owned(),
            roots,
        };
        if ca.advance(now_secs()) {
            // Best effort: a reader without write access still gets the right answer.
            let _ = ca.save();
        }
        Ok(ca)
    }

    /// Apply due transitions; true when something changed.
    fn advance(&mut self, now: u64) -> bool {
        let mut changed = false;
        if let Some(p) = self.roots.pending.clone()
            && p.activate_at <= now
        {
            self.roots.retired.push(Retired {
                id: self.roots.active,
                until: now + RETIRED_GRACE.as_secs(),
            });
            self.roots.active = p.id;
            self.roots.pending = None;
            changed = true;
        }
        let before = self.roots.retired.len();
        self.roots.retired.retain(|r| r.until > now);
        changed || before != self.roots.retired.len()
    }

    fn save(&self) -> Result<(), CaError> {
        let path = self.dir.join("roots.json");
        let tmp = self.dir.join("roots.json.tmp");
        let text = serde_json::to_string_pretty(&self.roots).unwrap_or_default();
        fs::write(&tmp, text).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// Stage a new root. With `overlap` zero it signs at once (a compromised key); otherwise
    /// it is trusted now and signs once `overlap` has passed.
    pub fn rotate(&mut self, overlap: Duration, host: &str) -> Result<u32, CaError> {
        let next = 1 + [self.roots.active]
            .into_iter()
            .chain(self.roots.pending.iter().map(|p| p.id))
            .chain(self.roots.retired.iter().map(|r| r.id))
            .max()
            .unwrap_or(0);
        write_root(&self.dir, next, host)?;
        if let Some(old) = self.roots.pending.take() {
            // A rotation staged earlier and not yet active is replaced: its root never signed.
            let _ = fs::remove_file(self.dir.join(format!("root-{}.key", old.id)));
            let _ = fs::remove_file(self.dir.join(format!("root-{}.pem", old.id)));
        }
        let now = now_secs();
        self.roots.pending = Some(Pending {
            id: next,
            activate_at: now + overlap.as_secs(),
        });
        self.advance(now);
        self.save()?;
        Ok(next)
    }

    fn read_root(&self, id: u32, role: String) -> Result<Root, CaError> {
        let path = self.dir.join(format!("root-{id}.pem"));
        let pem = fs::read_to_string(&path).map_err(io_err(&path))?;
        let der = pem_to_der(&pem).ok_or_else(|| CaError::Invalid {
            path: path.clone(),
            message: "not a PEM certificate".into(),
        })?;
        Ok(Root { id, pem, der, role })
    }

    /// Every root a client must trust now: active, pending, retired.
    pub fn trusted_roots(&self) -> Result<Vec<Root>, CaError> {
        let mut out = vec![self.read_root(self.roots.active, "active".into())?];
        if let Some(p) = &self.roots.pending {
            out.push(self.read_root(
                p.id,
                format!("pending (signs from {})", rfc3339(p.activate_at)),
            )?);
        }
        for r in &self.roots.retired {
            out.push(self.read_root(
                r.id,
                format!("retired (trusted until {})", rfc3339(r.until)),
            )?);
        }
        Ok(out)
    }

    /// The trust bundle: every trusted root, PEM.
    pub fn bundle_pem(&self) -> Result<String, CaError> {
        Ok(self
            .trusted_roots()?
            .into_iter()
            .map(|r| r.pem)
            .collect::<Vec<_>>()
            .join(""))
    }

    /// The active root as an issuer (needs its private key: root only).
    pub fn active_issuer(&self) -> Result<(Issuer<'static, KeyPair>, Vec<u8>), CaError> {
        let id = self.roots.active;
        let key_path = self.dir.join(format!("root-{id}.key"));
        check_key_mode(&key_path)?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: key_path.clone(),
            message: e.to_string(),
        })?;
        let root = self.read_root(id, "active".into())?;
        let issuer = Issuer::from_ca_cert_pem(&root.pem, key).map_err(|e| CaError::Invalid {
            path: self.dir.join(format!("root-{id}.pem")),
            message: e.to_string(),
        })?;
        Ok((issuer, root.der))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Refuse a key file that others can read: it would let anyone on the host mint trusted
/// certificates.
fn check_key_mode(path: &Path) -> Result<(), CaError> {
    // Owner first (a key planted by another user), then the mode.
    if let Err(e) = crate::fsperm::check_secret_file(path)
        && e.to_string().contains("owned by")
    {
        return Err(CaError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        });
    }
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(CaError::Invalid {
            path: path.to_owned(),
            message: format!(
                "mode {:o}: a CA key must be readable by its owner only (chmod 600)",
                meta.permissions().mode() & 0o777
            ),
        });
    }
    Ok(())
}

fn write_root(dir: &Path, id: u32, host: &str) -> Result<(), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Airlock");
    dn.push(DnType::CommonName, format!("Airlock CA {host} #{id}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(ROOT_VALIDITY_DAYS);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    let key_path = dir.join(format!("root-{id}.key"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io_err(&key_path))?;
    f.write_all(key.serialize_pem().as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io_err(&key_path))?;
    let cert_path = dir.join(format!("root-{id}.pem"));
    fs::write(&cert_path, cert.pem()).map_err(io_err(&cert_path))?;
    fs::set_permissions(&cert_path, fs::Permissions::from_mode(0o644))
        .map_err(io_err(&cert_path))?;
    Ok(())
}

pub fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    let _ = getrandom::fill(&mut bytes);
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

fn rfc3339(secs: u64) -> String {
    crate::registry::rfc3339(UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("airlock-ca-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn init_creates_a_root_with_a_private_key_only_its_owner_reads() {
        let dir = tmp("init");
        assert!(Ca::init(&dir, "h").unwrap());
        assert!(!Ca::init(&dir, "h").unwrap(), "second init keeps the CA");
        let mode = fs::metadata(dir.join("root-1.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let ca = Ca::load(&dir).unwrap();
        assert_eq!(ca.trusted_roots().unwrap().len(), 1);
        ca.active_issuer().unwrap();
        // A key readable by others is refused.
        fs::set_permissions(dir.join("root-1.key"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(ca.active_issuer(), Err(CaError::Invalid { .. })));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn rotation_is_trusted_first_and_signs_after_the_overlap() {
        let dir = tmp("rotate");
        Ca::init(&dir, "h").unwrap();
        let mut ca = Ca::load(&dir).unwrap();
        let first = ca.active_issuer().unwrap().1;
        let next = ca.rotate(Duration::from_secs(3600), "h").unwrap();
        assert_eq!(next, 2);
        let ca = Ca::load(&dir).unwrap();
        // Both trusted, the old one still signs.
        assert_eq!(ca.trusted_roots().unwrap().len(), 2);
        assert_eq!(ca.active_issuer().unwrap().1, first);
        // Once the overlap has passed the new one signs; the old one stays trusted a while.
        let mut ca = ca;
        assert!(ca.advance(now_secs() + 3601));
        assert_eq!(ca.roots.active, 2);
        assert_eq!(ca.trusted_roots().unwrap().len(), 2);
        assert!(ca.advance(now_secs() + 3601 + RETIRED_GRACE.as_secs() + 1));
        assert_eq!(ca.trusted_roots().unwrap().len(), 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn immediate_rotation_signs_at_once() {
        let dir = tmp("rotate-now");
        Ca::init(&dir, "h").unwrap();
        let mut ca = Ca::load(&dir).unwrap();
        let first = ca.active_issuer().unwrap().1;
        ca.rotate(Duration::ZERO, "h").unwrap();
        let ca = Ca::load(&dir).unwrap();
        assert_ne!(ca.active_issuer().unwrap().1, first);
        assert_eq!(
            ca.trusted_roots().unwrap().len(),
            2,
            "old root kept for its leaves"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_ca_is_a_clear_error() {
        let err = Ca::load(&tmp("missing")).unwrap_err();
        assert!(err.to_string().contains("airlock ca init"), "{err}");
    }
}
