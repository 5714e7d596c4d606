//! `airlock install` / `airlock uninstall` against a `--root` tree, and the unit they install
//! checked by systemd's own tools (`systemd-analyze verify` and `security`, which work
//! without systemd running).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");
/// `systemd-analyze security` rates the unit 3.1 ("OK") with systemd 252; above 3.5 it fails.
/// (`--threshold` counts tenths: 35 is an exposure of 3.5.)
const EXPOSURE_THRESHOLD_TENTHS: u32 = 35;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn tree(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("airlock-install-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn airlock(args: &[&str], root: &Path) -> Output {
    let out = Command::new(AIRLOCK)
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .expect("run airlock");
    assert!(
        out.status.success(),
        "airlock {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read(path: PathBuf) -> String {
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn install_puts_the_package_files_in_place_and_never_overwrites_a_config() {
    let root = tree("files");
    airlock(&["install"], &root);
    let binary = root.join("usr/bin/airlock");
    let meta = fs::metadata(&binary).unwrap();
    assert_eq!(meta.len(), fs::metadata(AIRLOCK).unwrap().len());
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    // One source: the files of packaging/, the example configuration, the policies.
    assert_eq!(
        read(root.join("usr/lib/systemd/system/airlock.service")),
        read(repo("packaging/airlock.service"))
    );
    assert_eq!(
        read(root.join("usr/lib/sysusers.d/airlock.conf")),
        read(repo("packaging/airlock.sysusers"))
    );
    // The OCI hook where Podman and CRI-O look, running the installed binary.
    let hook = read(root.join("usr/share/containers/oci/hooks.d/airlock.json"));
    assert_eq!(hook, read(repo("packaging/oci-hook.json")));
    let hook: serde_json::Value = serde_json::from_str(&hook).unwrap();
    assert_eq!(hook["hook"]["path"], "/usr/bin/airlock");
    assert_eq!(hook["stages"], serde_json::json!(["createRuntime"]));
    assert_eq!(
        read(root.join("etc/airlock/airlock.toml")),
        read(repo("airlock.example.toml"))
    );
    assert_eq!(
        read(root.join("etc/airlock/policies/default.toml")),
        read(repo("policies/default.toml"))
    );
    let state = fs::metadata(root.join("var/lib/airlock")).unwrap();
    assert_eq!(state.permissions().mode() & 0o777, 0o711);
    // The installed binary runs and finds the installed policies.
    let out = Command::new(&binary)
        .args(["policy", "check", "--config"])
        .arg(root.join("etc/airlock/airlock.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // An operator's configuration survives a second install (dpkg's conffile rule).
    let mine = "# mine\n";
    fs::write(root.join("etc/airlock/airlock.toml"), mine).unwrap();
    fs::remove_file(root.join("etc/airlock/policies/default.toml")).unwrap();
    let out = airlock(&["install"], &root);
    assert_eq!(read(root.join("etc/airlock/airlock.toml")), mine);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kept"),
        "{out:?}"
    );
    // A removed policy file comes back (as dpkg would not: it is the operator's, but an
    // install on a host without dpkg has no record of the removal).
    assert!(root.join("etc/airlock/policies/default.toml").exists());
    let _ = fs::remove_dir_all(&root);
}

#[test]
fn uninstall_removes_the_program_and_keeps_config_and_archive_unless_purged() {
    let root = tree("uninstall");
    airlock(&["install"], &root);
    let archived = root.join("var/lib/airlock/archive/date=2026-11-30/records.parquet");
    fs::create_dir_all(archived.parent().unwrap()).unwrap();
    fs::write(&archived, b"evidence").unwrap();

    airlock(&["uninstall"], &root);
    for gone in [
        "usr/bin/airlock",
        "usr/lib/systemd/system/airlock.service",
        "usr/lib/sysusers.d/airlock.conf",
        "usr/share/containers/oci/hooks.d/airlock.json",
    ] {
        assert!(!root.join(gone).exists(), "{gone} still there");
    }
    assert!(root.join("etc/airlock/airlock.toml").exists());
    assert_eq!(fs::read(&archived).unwrap(), b"evidence");

    airlock(&["uninstall", "--purge"], &root);
    assert!(!root.join("etc/airlock").exists());
    assert!(!root.join("var/lib/airlock").exists());
    let _ = fs::remove_dir_all(&root);
}

/// A root in which `systemd-analyze verify` finds what the unit refers to: the installed
/// binary, /bin/kill (ExecReload) and the host's targets, slices and mounts.
fn verify_root(name: &str) -> PathBuf {
    let root = tree(name);
    airlock(&["install"], &root);
    let units = root.join("lib/systemd/system");
    fs::create_dir_all(&units).unwrap();
    for entry in fs::read_dir("/lib/systemd/system").expect("systemd's units (apt: systemd)") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if [".target", ".slice", ".mount"]
            .iter()
            .any(|s| name.ends_with(s))
            && path.is_file()
        {
            fs::copy(&path, units.join(&name)).unwrap();
        }
    }
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy("/bin/kill", root.join("bin/kill")).unwrap();
    root
}

fn analyze(args: &[&str], root: &Path) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .arg(format!("--root={}", root.display()))
        .output()
        .expect("systemd-analyze (apt: systemd; `cargo xtask setup`)")
}

#[test]
fn the_installed_unit_passes_systemd_analyze_verify_and_security() {
    let root = verify_root("analyze");
    let unit = root.join("usr/lib/systemd/system/airlock.service");
    let unit = unit.to_str().unwrap();
    let out = analyze(&["verify", "--man=no", unit], &root);
    // verify exits 0 on unknown keys, only warning: anything printed is a failure too.
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = analyze(
        &[
            "security",
            "--offline=true",
            &format!("--threshold={EXPOSURE_THRESHOLD_TENTHS}"),
            "airlock.service",
        ],
        &root,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exposure above {EXPOSURE_THRESHOLD_TENTHS} tenths: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let overall = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for airlock.service: ")
                .nth(1)
        })
        .unwrap_or_else(|| panic!("no overall exposure in {text}"));
    let level: f64 = overall.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        level * 10.0 <= f64::from(EXPOSURE_THRESHOLD_TENTHS),
        "{overall}"
    );
    // The hardening the README promises is in force.
    for passed in [
        "✓ CapabilityBoundingSet=~CAP_SYS_MODULE",
        "✓ CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)",
        "✓ NoNewPrivileges=",
        "✓ ProtectHome=",
        "✓ PrivateTmp=",
        "✓ CapabilityBoundingSet=~CAP_SYS_ADMIN",
    ] {
        assert!(text.contains(passed), "no `{passed}` in {text}");
    }
    let _ = fs::remove_dir_all(&root);
}

#[test]
fn systemd_analyze_verify_catches_a_unit_whose_binary_is_missing() {
    // The check above has teeth: the same unit without its binary fails verification.
    let root = verify_root("analyze-missing");
    fs::remove_file(root.join("usr/bin/airlock")).unwrap();
    let unit = root.join("usr/lib/systemd/system/airlock.service");
    let out = analyze(&["verify", "--man=no", unit.to_str().unwrap()], &root);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/usr/bin/airlock is not executable"),
        "{out:?}"
    );
    let _ = fs::remove_dir_all(&root);
}
