//! The `airlock` command line without privileges: configuration errors name the file and the
//! key and exit with 2; talking to an agent that is not running says so and exits with 3.

use std::{path::PathBuf, process::Command};

const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");

fn write_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("airlock-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("airlock.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn airlock(args: &[&str], config: &PathBuf) -> (Option<i32>, String, String) {
    let out = Command::new(AIRLOCK)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD_BACKEND: &str = "[[backend]]\nname = \"tools\"\nhost = \"mcp.internal.test\"\nport = 8443\naddresses = [\"127.0.0.2\", \"::1\"]\n";

#[test]
fn every_subcommand_rejects_an_unknown_key_naming_it_and_the_file() {
    let cfg = write_config("unknown", &format!("state_dirr = \"/x\"\n{GOOD_BACKEND}"));
    for sub in [
        &["run"][..],
        &["status"],
        &["status", "--json"],
        &["detach"],
        &["check-config"],
    ] {
        let (code, _, err) = airlock(sub, &cfg);
        assert_eq!(code, Some(2), "{sub:?}: {err}");
        assert!(err.contains("state_dirr"), "{sub:?}: {err}");
        assert!(err.contains(cfg.to_str().unwrap()), "{sub:?}: {err}");
    }
}

#[test]
fn bad_value_names_the_nested_key() {
    let cfg = write_config(
        "badvalue",
        "[[backend]]\nname = \"tools\"\nhost = \"h\"\nport = 8443\naddresses = [\"127.0.0.2\", \"300.1.1.1\"]\n",
    );
    let (code, _, err) = airlock(&["check-config"], &cfg);
    assert_eq!(code, Some(2));
    assert!(err.contains("backend[0].addresses[1]"), "{err}");
    assert!(err.contains("300.1.1.1"), "{err}");
}

#[test]
fn unresolvable_host_exits_2_naming_the_key() {
    let cfg = write_config(
        "unresolvable",
        "[[backend]]\nname = \"tools\"\nhost = \"no-such-host.invalid\"\nport = 443\n",
    );
    let (code, _, err) = airlock(&["check-config"], &cfg);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("backend[0].host"), "{err}");
    assert!(err.contains("no-such-host.invalid"), "{err}");
}

#[test]
fn missing_config_file_exits_2() {
    let (code, _, err) = airlock(&["status"], &PathBuf::from("/nonexistent/airlock.toml"));
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/airlock.toml"), "{err}");
}

#[test]
fn check_config_lists_the_redirected_addresses() {
    let cfg = write_config("good", GOOD_BACKEND);
    let (code, out, err) = airlock(&["check-config"], &cfg);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("127.0.0.2:8443"), "{out}");
    assert!(out.contains("[::1]:8443"), "{out}");
}

#[test]
fn status_without_an_agent_says_it_is_not_running() {
    let cfg = write_config(
        "notrunning",
        &format!(
            "state_dir = \"/nonexistent-airlock-state\"\nbpffs_dir = \"/sys/fs/bpf/airlock-cli-none\"\n{GOOD_BACKEND}"
        ),
    );
    let (code, out, _) = airlock(&["status", "--json"], &cfg);
    assert_eq!(code, Some(3));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["running"], false);
    assert_eq!(v["programs_pinned"], false);
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../airlock.example.toml");
    let (code, out, err) = airlock(&["check-config"], &example);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("127.0.0.2:8443"), "{out}");
}

#[test]
fn policy_check_accepts_the_shipped_defaults() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let out = Command::new(AIRLOCK)
        .args(["policy", "check"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("default.toml: ok"), "{stdout}");
    assert!(stdout.contains("policy set sha256:"), "{stdout}");
    // Without DIR it reads `policies_dir` from the configuration.
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../airlock.example.toml");
    let (code, out, err) = airlock(&["policy", "check"], &example);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("default.toml: ok"), "{out}");
}

#[test]
fn policy_check_reports_file_and_line() {
    let dir = std::env::temp_dir().join(format!("airlock-cli-{}-policy", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.toml"),
        "[[rule]]\nid = \"m\"\naction = \"mask\"\ndetectors = [\"emial\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("b.toml"),
        "\n[[rule]]\nid = \"b\"\naction = \"block\"\nrecord = \"off\"\n",
    )
    .unwrap();
    let out = Command::new(AIRLOCK)
        .args(["policy", "check"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{}:1: rule `m`: unknown detector `emial`",
            dir.join("a.toml").display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}:2: rule `b`", dir.join("b.toml").display())),
        "{err}"
    );
}

/// `airlock ca`: init is idempotent, show lists roots and the bundle, install writes every
/// trusted root into the store directory and runs the update command, rotate stages a root
/// that is trusted at once and signs later.
#[test]
fn ca_init_show_install_and_rotate() {
    let dir = std::env::temp_dir().join(format!("airlock-cli-{}-ca", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = write_config(
        "ca",
        &format!("state_dir = \"{}/state\"\n{GOOD_BACKEND}", dir.display()),
    );
    let (code, out, err) = airlock(&["ca", "show"], &cfg);
    assert_eq!(code, Some(1), "no CA yet: {out}{err}");
    assert!(err.contains("airlock ca init"), "{err}");
    let (code, out, _) = airlock(&["ca", "init"], &cfg);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("created"), "{out}");
    let (code, out, _) = airlock(&["ca", "init"], &cfg);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("already present"), "{out}");
    use std::os::unix::fs::PermissionsExt as _;
    let key = dir.join("state/ca/root-1.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (_, out, _) = airlock(&["ca", "show"], &cfg);
    assert!(out.contains("root #1  active"), "{out}");
    assert!(out.contains("mcp.internal.test (tools)"), "{out}");
    let (_, pem, _) = airlock(&["ca", "show", "--pem"], &cfg);
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 1);

    let (code, out, err) = airlock(&["ca", "rotate", "--overlap-hours", "24"], &cfg);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("root #2 created; it signs in 24 h"), "{out}");
    let (_, out, _) = airlock(&["ca", "show"], &cfg);
    assert!(out.contains("root #1  active"), "{out}");
    assert!(out.contains("root #2  pending (signs from"), "{out}");
    let (_, pem, _) = airlock(&["ca", "show", "--pem"], &cfg);
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2, "both trusted");

    let store = dir.join("store");
    let marker = dir.join("updated");
    let (code, out, err) = airlock(
        &[
            "ca",
            "install",
            "--store-dir",
            store.to_str().unwrap(),
            "--update-command",
            &format!("touch {}", marker.display()),
        ],
        &cfg,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("airlock-root-2.crt"), "{out}");
    assert!(store.join("airlock-root-1.crt").exists());
    assert!(marker.exists(), "update command ran");
    // A failing update command is an error.
    let (code, _, err) = airlock(
        &[
            "ca",
            "install",
            "--store-dir",
            store.to_str().unwrap(),
            "--update-command",
            "false",
        ],
        &cfg,
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("failed"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
