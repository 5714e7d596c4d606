//! `airlock install` / `airlock uninstall`: the Debian package's files, for hosts without the
//! package.
//!
//! One source for both: the unit, the sysusers.d entry, the default configuration and the
//! policies are the files of `packaging/`, `airlock.example.toml` and `policies/`, compiled
//! in here; `cargo xtask package` stages the package's tree by running `airlock install
//! --root STAGE` of the release binary, so the two cannot drift apart.
//!
//! Configuration files follow dpkg's conffile rule: one that exists is never overwritten.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

/// Where the binary goes (the unit's `ExecStart`).
pub const BINARY: &str = "usr/bin/airlock";
pub const UNIT: &str = "usr/lib/systemd/system/airlock.service";
pub const SYSUSERS: &str = "usr/lib/sysusers.d/airlock.conf";
/// The OCI runtime hook Podman and CRI-O read from their default hooks folder: it has the
/// agent serve a container's network namespace before the container's process runs.
pub const OCI_HOOK: &str = "usr/share/containers/oci/hooks.d/airlock.json";
pub const CONFIG_DIR: &str = "etc/airlock";
pub const STATE_DIR: &str = "var/lib/airlock";
pub const UNIT_NAME: &str = "airlock.service";
/// `bpffs_dir`'s default, for `airlock uninstall` on a host whose configuration is gone.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/airlock";

pub const UNIT_TEXT: &str = include_str!("../../packaging/airlock.service");
pub const SYSUSERS_TEXT: &str = include_str!("../../packaging/airlock.sysusers");
pub const OCI_HOOK_TEXT: &str = include_str!("../../packaging/oci-hook.json");

/// The configuration files (conffiles in the package), relative to the root.
pub const CONFFILES: &[(&str, &str)] = &[
    (
        "etc/airlock/airlock.toml",
        include_str!("../../airlock.example.toml"),
    ),
    (
        "etc/airlock/policies/default.toml",
        include_str!("../../policies/default.toml"),
    ),
    (
        "etc/airlock/policies/README.md",
        include_str!("../../policies/README.md"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot find the running binary to install: {0}")]
    CurrentExe(#[source] io::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot create the archive group `airlock`: {0}; create it (`groupadd --system airlock`) and run `airlock install` again"
    )]
    Group(String),
    #[error("`airlock {0}` on this host needs root (or pass --root DIR to prepare a tree)")]
    NotRoot(&'static str),
    #[error("cannot govern unit `{unit}`: {message}")]
    Unit { unit: String, message: String },
}

mod govern_unit;
pub use govern_unit::govern_unit;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What one step did, for the operator (one line each).
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
}

impl Report {
    fn note(&mut self, line: String) {
        self.lines.push(line);
    }
}

/// True when `root` is this host's `/` (steps with effects beyond files run only then).
pub fn is_live(root: &Path) -> bool {
    fs::canonicalize(root).is_ok_and(|r| r == Path::new("/"))
}

/// Put the binary, the unit, the sysusers.d entry, the configuration and policies (unless
/// present) and the state directory under `root`; on the live root also create the archive
/// group and reload systemd.
pub fn install(root: &Path) -> Result<Report, InstallError> {
    let live = is_live(root);
    if live && !nix::unistd::geteuid().is_root() {
        return Err(InstallError::NotRoot("install"));
    }
    let mut report = Report::default();
    let exe = std::env::current_exe().map_err(InstallError::CurrentExe)?;
    let binary = root.join(BINARY);
    install_binary(&exe, &binary)?;
    report.note(format!("installed {}", binary.display()));
    for (rel, text) in [
        (UNIT, UNIT_TEXT),
        (SYSUSERS, SYSUSERS_TEXT),
        (OCI_HOOK, OCI_HOOK_TEXT),
    ] {
        let path = root.join(rel);
        write_atomically(&path, text.as_bytes(), 0o644)?;
        report.note(format!("installed {}", path.display()));
    }
    for (rel, text) in CONFFILES {
        let path = root.join(rel);
        if path.symlink_metadata().is_ok() {
            report.note(format!("kept {} (yours)", path.display()));
            continue;
        }
        write_atomically(&path, text.as_bytes(), 0o644)?;
        report.note(format!("installed {}", path.display()));
    }
    let state = root.join(STATE_DIR);
    if !state.exists() {
        fs::create_dir_all(&state).map_err(io_err(&state))?;
        fs::set_permissions(&state, fs::Permissions::from_mode(0o711)).map_err(io_err(&state))?;
        report.note(format!("created {}", state.display()));
    }
    if live {
        create_group(&mut report)?;
        if systemd_running() {
            run_quiet("systemctl", &["daemon-reload"]);
            report.note(format!(
                "next: edit /etc/airlock/airlock.toml, then `systemctl enable --now {UNIT_NAME}`"
            ));
        }
    }
    Ok(report)
}

/// Remove the binary, the unit and the sysusers.d entry under `root`; with `purge`, also the
/// configuration and the state directory (keys, CA, the default archive). The caller stops
/// the unit and detaches the programs first on the live root ([`stop_unit`]).
pub fn uninstall(root: &Path, purge: bool) -> Result<Report, InstallError> {
    let live = is_live(root);
    if live && !nix::unistd::geteuid().is_root() {
        return Err(InstallError::NotRoot("uninstall"));
    }
    let mut report = Report::default();
    for rel in [UNIT, SYSUSERS, OCI_HOOK, BINARY] {
        let path = root.join(rel);
        match fs::remove_file(&path) {
            Ok(()) => report.note(format!("removed {}", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    if live && systemd_running() {
        run_quiet("systemctl", &["daemon-reload"]);
    }
    for rel in [CONFIG_DIR, STATE_DIR] {
        let path = root.join(rel);
        if !path.exists() {
            continue;
        }
        if purge {
            fs::remove_dir_all(&path).map_err(io_err(&path))?;
            report.note(format!("removed {}", path.display()));
        } else {
            report.note(format!("kept {} (--purge removes it)", path.display()));
        }
    }
    Ok(report)
}

/// On the live root under systemd: stop and disable the unit (it would restart an agent that
/// `airlock detach` shut down).
pub fn stop_unit() -> Option<String> {
    if !systemd_running() {
        return None;
    }
    run_quiet("systemctl", &["disable", "--now", UNIT_NAME])
        .then(|| format!("stopped and disabled {UNIT_NAME}"))
}

fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Run a command, its output discarded; whether it succeeded.
fn run_quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The archive group: through systemd-sysusers (the entry just installed), else groupadd.
fn create_group(report: &mut Report) -> Result<(), InstallError> {
    let exists = || nix::unistd::Group::from_name("airlock").is_ok_and(|g| g.is_some());
    if exists() {
        return Ok(());
    }
    let sysusers = Path::new("/").join(SYSUSERS);
    if !run_quiet("systemd-sysusers", &[&sysusers.to_string_lossy()]) || !exists() {
        let out = Command::new("groupadd")
            .args(["--system", "airlock"])
            .output()
            .map_err(|e| InstallError::Group(format!("cannot run groupadd: {e}")))?;
        if !out.status.success() {
            return Err(InstallError::Group(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
    }
    report.note("created the group airlock".into());
    Ok(())
}

/// Copy the running binary into place through a temporary file and a rename: a running agent
/// keeps its (old) file, and nobody sees a half-written one.
fn install_binary(exe: &Path, dest: &Path) -> Result<(), InstallError> {
    if fs::canonicalize(dest).is_ok_and(|d| fs::canonicalize(exe).is_ok_and(|e| e == d)) {
        return Ok(());
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(".airlock.new");
    fs::copy(exe, &tmp).map_err(io_err(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, dest).map_err(io_err(dest))
}

/// Write `bytes` to `path` (parents created) through a temporary file and a rename.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(
        ".{}.new",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_starts_the_installed_binary_with_the_installed_config() {
        assert!(
            UNIT_TEXT.contains(&format!(
                "ExecStart=/{BINARY} run --config /{}",
                CONFFILES[0].0
            )),
            "{UNIT_TEXT}"
        );
        assert!(UNIT_TEXT.contains("Type=notify"));
        assert!(SYSUSERS_TEXT.lines().any(|l| l == "g airlock - -"));
    }

    #[test]
    fn the_installed_config_is_valid_and_uses_the_installed_paths() {
        let dir = std::env::temp_dir().join(format!("airlock-install-unit-{}", std::process::id()));
        let root = dir.join("root");
        let conf = root.join(CONFFILES[0].0);
        fs::create_dir_all(conf.parent().unwrap()).unwrap();
        fs::write(&conf, CONFFILES[0].1).unwrap();
        let c = crate::config::Config::load(&conf).unwrap();
        assert_eq!(c.policies_dir, root.join("etc/airlock/policies"));
        assert_eq!(c.state_dir, Path::new("/").join(STATE_DIR));
        assert_eq!(c.archive_group, "airlock");
        assert_eq!(c.bpffs_dir, Path::new(DEFAULT_BPFFS_DIR));
        let _ = fs::remove_dir_all(&dir);
    }
}
