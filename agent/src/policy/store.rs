//! The policy set in force, and its reloading: on SIGHUP and when the files change. A new set
//! that does not validate is not taken: the old one stays in force and the errors are kept
//! for `airlock status`.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::SystemTime,
};

use super::{HashKey, PolicyErrors, PolicySet};

/// Names, sizes and modification times of the policy files: what "changed" means.
type Fingerprint = Vec<(String, u64, Option<SystemTime>)>;

pub struct PolicyStore {
    dir: PathBuf,
    key: HashKey,
    current: RwLock<Arc<PolicySet>>,
    seen: Mutex<Fingerprint>,
    last_error: Mutex<Option<String>>,
    /// Backends that share an address: no set may tell them apart (see
    /// [`PolicySet::check_alike`]).
    shared: Mutex<Vec<(String, String)>>,
}

impl PolicyStore {
    /// Load the initial set; it must be valid, and treat the backends of each `shared` pair
    /// alike.
    pub fn load(
        dir: &Path,
        key: HashKey,
        shared: Vec<(String, String)>,
    ) -> Result<PolicyStore, PolicyErrors> {
        let seen = fingerprint(dir);
        let set = PolicySet::load_dir(dir, key.clone())?;
        set.check_alike(&shared, dir)?;
        Ok(PolicyStore {
            dir: dir.to_owned(),
            key,
            current: RwLock::new(Arc::new(set)),
            seen: Mutex::new(seen),
            last_error: Mutex::new(None),
            shared: Mutex::new(shared),
        })
    }

    /// Backends that now share an address (DNS changed): refused when the set in force tells
    /// them apart, else remembered for later reloads.
    pub fn set_shared(&self, shared: Vec<(String, String)>) -> Result<(), PolicyErrors> {
        self.current().check_alike(&shared, &self.dir)?;
        if let Ok(mut s) = self.shared.lock() {
            *s = shared;
        }
        Ok(())
    }

    /// The set in force.
    pub fn current(&self) -> Arc<PolicySet> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The last reload's errors, if it failed (the previous set is still in force).
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Whether the files differ from the ones last loaded (or tried).
    pub fn changed_on_disk(&self) -> bool {
        let now = fingerprint(&self.dir);
        self.seen.lock().map(|s| *s != now).unwrap_or(true)
    }

    /// Load the files again. On success the new set is in force; on failure the old one stays.
    pub fn reload(&self) -> Result<String, PolicyErrors> {
        if let Ok(mut s) = self.seen.lock() {
            *s = fingerprint(&self.dir);
        }
        let shared = self.shared.lock().map(|s| s.clone()).unwrap_or_default();
        let loaded = PolicySet::load_dir(&self.dir, self.key.clone())
            .and_then(|set| set.check_alike(&shared, &self.dir).map(|()| set));
        match loaded {
            Ok(set) => {
                let hash = set.hash.clone();
                if let Ok(mut c) = self.current.write() {
                    *c = Arc::new(set);
                }
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                Ok(hash)
            }
            Err(errors) => {
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(errors.to_string());
                }
                Err(errors)
            }
        }
    }
}

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out: Fingerprint = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
                .map(|e| {
                    let meta = e.metadata().ok();
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        meta.as_ref().map_or(0, fs::Metadata::len),
                        meta.and_then(|m| m.modified().ok()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The per-installation key of `hash`-style masking (`state_dir/mask.key`, 0600), created on
/// first use.
pub fn mask_key(state_dir: &Path) -> io::Result<HashKey> {
    let path = state_dir.join("mask.key");
    match fs::read(&path) {
        Ok(bytes) => crate::fsperm::check_secret_file(&path).and_then(|()| {
            bytes.as_slice().try_into().map(HashKey).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not a 32-byte key", path.display()),
                )
            })
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).map_err(|e| io::Error::other(e.to_string()))?;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(&key)?;
            f.sync_all()?;
            Ok(HashKey(key))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_takes_valid_sets_and_keeps_the_old_one_otherwise() {
        let dir = std::env::temp_dir().join(format!("airlock-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let rule =
            |id: &str| format!("[[rule]]\nid = \"{id}\"\naction = \"block\"\ntools = [\"x\"]\n");
        fs::write(dir.join("a.toml"), rule("one")).unwrap();
        let store = PolicyStore::load(&dir, HashKey([0; 32]), Vec::new()).unwrap();
        let first = store.current().hash.clone();
        assert!(!store.changed_on_disk());
        fs::write(dir.join("a.toml"), rule("two-longer")).unwrap();
        assert!(store.changed_on_disk());
        let second = store.reload().unwrap();
        assert_ne!(first, second);
        assert_eq!(store.current().hash, second);
        fs::write(
            dir.join("a.toml"),
            "[[rule]]\nid = \"bad\"\naction = \"explode\"\n",
        )
        .unwrap();
        assert!(store.reload().is_err());
        assert_eq!(
            store.current().hash,
            second,
            "an invalid set must not replace a valid one"
        );
        assert!(store.last_error().unwrap().contains("a.toml:3"));
        assert!(
            !store.changed_on_disk(),
            "a failed attempt is not retried until the files change"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mask_key_is_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("airlock-maskkey-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let a = mask_key(&dir).unwrap();
        let b = mask_key(&dir).unwrap();
        assert_eq!(a.0, b.0);
        assert_eq!(
            fs::metadata(dir.join("mask.key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
