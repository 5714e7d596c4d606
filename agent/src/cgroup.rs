//! Finding the cgroup v2 hierarchy the programs attach to.
//!
//! Hosts differ: unified (`/sys/fs/cgroup`), hybrid (`/sys/fs/cgroup/unified`), or a container's
//! view. The mount is read from `/proc/self/mounts`, never assumed.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup2 filesystem is mounted (read /proc/self/mounts); mount one or set `cgroup` in airlock.toml"
    )]
    NotMounted,
    #[error("cannot read /proc/self/mounts: {0}")]
    Mounts(#[source] std::io::Error),
    #[error(
        "`cgroup` = {0}: not a cgroup v2 directory; set `cgroup` in airlock.toml to a directory of the cgroup2 mount"
    )]
    NotCgroup2(PathBuf),
}

/// The first cgroup2 mount point in a mounts table (`/proc/self/mounts` format).
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next()?;
        let mount_point = fields.next()?;
        let fstype = fields.next()?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(mount_point)))
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The cgroup to attach to: the configured one (checked to be cgroup v2) or the mount root.
pub fn resolve(configured: Option<&Path>) -> Result<PathBuf, CgroupError> {
    let path = match configured {
        Some(p) => p.to_owned(),
        None => {
            let mounts =
                std::fs::read_to_string("/proc/self/mounts").map_err(CgroupError::Mounts)?;
            cgroup2_mount_in(&mounts).ok_or(CgroupError::NotMounted)?
        }
    };
    if !is_cgroup2(&path) {
        return Err(CgroupError::NotCgroup2(path));
    }
    Ok(path)
}

/// The ids of `root` and every cgroup below it (for telling which sockets belong to the
/// attached subtree). Bounded: at most `limit` cgroups are listed.
pub fn subtree_ids(root: &Path, limit: usize) -> std::collections::HashSet<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut ids = std::collections::HashSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        if ids.len() >= limit {
            break;
        }
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        ids.insert(meta.ino());
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    ids
}

/// A cgroup named by its path below the cgroup2 mount (`/system.slice/runner.service`), as the
/// kernel programs match it: its id and its depth (the root is 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub dir: PathBuf,
    pub id: u64,
    pub level: u32,
}

/// Find `rel` below `mount`; it must exist, be a cgroup2 directory and lie within `attached`
/// (elsewhere nothing is redirected). The error says which of these failed.
pub fn named(mount: &Path, attached: &Path, rel: &str) -> Result<Named, String> {
    use std::os::unix::fs::MetadataExt as _;
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    let dir = parts.iter().fold(mount.to_owned(), |d, p| d.join(p));
    let meta =
        std::fs::metadata(&dir).map_err(|e| format!("cgroup `{rel}` ({}): {e}", dir.display()))?;
    if !meta.is_dir() || !is_cgroup2(&dir) {
        return Err(format!(
            "cgroup `{rel}` ({}) is not a cgroup v2 directory",
            dir.display()
        ));
    }
    if !dir.starts_with(attached) {
        return Err(format!(
            "cgroup `{rel}` is outside the attached cgroup {}: nothing there is redirected",
            attached.display()
        ));
    }
    Ok(Named {
        id: meta.ino(),
        level: parts.len() as u32,
        dir,
    })
}

/// Whether `path` is a directory on a cgroup2 filesystem.
pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_hierarchy_is_found() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw,relatime 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            cgroup2_mount_in(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unified_hierarchy_is_found() {
        let mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(
            cgroup2_mount_in(mounts),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn v1_only_has_none() {
        assert_eq!(
            cgroup2_mount_in("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }

    #[test]
    fn escaped_mount_points() {
        let mounts = "none /mnt/my\\040cgroups cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(mounts),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        assert!(!is_cgroup2(Path::new("/tmp")));
        assert!(matches!(
            resolve(Some(Path::new("/tmp"))),
            Err(CgroupError::NotCgroup2(_))
        ));
    }

    #[test]
    fn named_cgroups_are_checked_and_measured() {
        let tmp = std::env::temp_dir();
        let err = named(&tmp, &tmp, "/").unwrap_err();
        assert!(err.contains("not a cgroup v2 directory"), "{err}");
        let err = named(&tmp, &tmp, "/no/such/airlock-cgroup").unwrap_err();
        assert!(err.contains("/no/such/airlock-cgroup"), "{err}");
        // The machines this runs on have a cgroup2 mount (the privileged tests need one).
        let mount = resolve(None).expect("a cgroup2 mount");
        let root = named(&mount, &mount, "/").unwrap();
        assert_eq!(root.level, 0);
        let child = std::fs::read_dir(&mount)
            .unwrap()
            .flatten()
            .find(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned());
        if let Some(child) = child {
            let below = named(&mount, &mount, &format!("/{child}")).unwrap();
            assert_eq!(below.level, 1);
            assert_ne!(below.id, root.id);
            let err = named(&mount, &mount.join("elsewhere"), &format!("/{child}")).unwrap_err();
            assert!(err.contains("outside the attached cgroup"), "{err}");
        }
    }
}
