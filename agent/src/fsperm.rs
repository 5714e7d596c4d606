//! Ownership and mode checks for the places Airlock keeps secrets and evidence. A directory or
//! key file that already exists is trusted only if it belongs to the user running Airlock and
//! nobody else can write it (or, for a secret, read it): a state directory created by another
//! user beforehand would let that user swap the CA key, the signing key or the admin socket.

use std::{
    fs, io,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn refused(path: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{}: {why}", path.display()),
    )
}

/// A directory (not a symlink) owned by us, not writable by group or others.
pub fn check_private_dir(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Err(refused(
            path,
            "not a directory (a symlink is not accepted)".into(),
        ));
    }
    check_owner(path, &meta)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(refused(
            path,
            format!("mode {mode:o}: group or others may write it (chmod go-w)"),
        ));
    }
    Ok(())
}

/// A regular file (not a symlink) owned by us, readable by nobody else.
pub fn check_secret_file(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_file() {
        return Err(refused(
            path,
            "not a regular file (a symlink is not accepted)".into(),
        ));
    }
    check_owner(path, &meta)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(refused(
            path,
            format!("mode {mode:o}: a secret must be readable by its owner only (chmod 600)"),
        ));
    }
    Ok(())
}

fn check_owner(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let me = euid();
    if meta.uid() != me {
        return Err(refused(
            path,
            format!(
                "owned by uid {}, not by uid {me} that runs Airlock: another user could replace what is in it (chown it, or remove it and let Airlock create it)",
                meta.uid()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_symlinks_are_checked() {
        let dir = std::env::temp_dir().join(format!("airlock-fsperm-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o711)).unwrap();
        check_private_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            check_private_dir(&dir)
                .unwrap_err()
                .to_string()
                .contains("may write")
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let key = dir.join("k");
        fs::write(&key, b"x").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_secret_file(&key).is_err());
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        check_secret_file(&key).unwrap();
        let link = dir.join("l");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        assert!(
            check_secret_file(&link)
                .unwrap_err()
                .to_string()
                .contains("symlink")
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_owner_is_refused() {
        if euid() != 0 {
            return; // chown needs root
        }
        let dir = std::env::temp_dir().join(format!("airlock-fsperm-owner-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        assert!(
            check_private_dir(&dir)
                .unwrap_err()
                .to_string()
                .contains("uid 65534")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
