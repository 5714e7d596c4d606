//! `airlock install --govern-unit UNIT`: a systemd drop-in that runs a runner service's job
//! under `airlock govern` (its stdio MCP servers relayed through the agent).
//!
//! The drop-in starts the unit's own `ExecStart` through `airlock govern` as root (so the
//! exec filter needs no `no_new_privs` and `sudo` keeps working inside the job), dropping to
//! the unit's `User=`/`Group=` with `--user`/`--group` before the command runs, and orders
//! the unit after `airlock.service`.

use std::{fs, path::Path};

use super::{BINARY, InstallError, Report, io_err, write_atomically};

/// Where unit files are looked for, most specific first (below the root).
const UNIT_DIRS: &[&str] = &[
    "etc/systemd/system",
    "run/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
];
/// The drop-in's file name.
pub const DROP_IN: &str = "airlock-govern.conf";

/// What the drop-in needs from the unit.
#[derive(Debug, PartialEq, Eq)]
struct Unit {
    exec_start: String,
    user: Option<String>,
    group: Option<String>,
}

/// Write the drop-in for `unit` under `root`; on the live root, reload systemd.
pub fn govern_unit(root: &Path, unit: &str) -> Result<Report, InstallError> {
    let unit = if unit.contains('.') {
        unit.to_owned()
    } else {
        format!("{unit}.service")
    };
    let bad = |m: String| InstallError::Unit {
        unit: unit.clone(),
        message: m,
    };
    if !unit.ends_with(".service")
        || !unit
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_.@-\\".contains(&b))
    {
        return Err(bad("not a service unit name".into()));
    }
    let (path, text) = UNIT_DIRS
        .iter()
        .map(|d| root.join(d).join(&unit))
        .find_map(|p| fs::read_to_string(&p).ok().map(|t| (p, t)))
        .ok_or_else(|| bad(format!("no unit file in {}", UNIT_DIRS.join(", "))))?;
    let mut parsed = parse(&text).map_err(|m| bad(format!("{}: {m}", path.display())))?;
    let dir = root.join("etc/systemd/system").join(format!("{unit}.d"));
    // Other drop-ins may change what we read: take their `ExecStart`/`User`/`Group` too, in
    // systemd's order (by file name; a name in a more specific directory hides the others).
    let mut confs = std::collections::BTreeMap::new();
    for d in UNIT_DIRS.iter().rev() {
        let Ok(entries) = fs::read_dir(root.join(d).join(format!("{unit}.d"))) else {
            continue;
        };
        for p in entries.flatten().map(|e| e.path()) {
            if let Some(name) = p.file_name().map(|n| n.to_owned())
                && p.extension().is_some_and(|e| e == "conf")
                && name != DROP_IN
            {
                confs.insert(name, p);
            }
        }
    }
    for conf in confs.values() {
        let text = fs::read_to_string(conf).map_err(io_err(conf))?;
        overlay(&mut parsed, &text).map_err(|m| bad(format!("{}: {m}", conf.display())))?;
    }
    let mut govern = format!(
        "{} govern --name {unit}",
        Path::new("/").join(BINARY).display()
    );
    if let Some(u) = &parsed.user {
        govern.push_str(&format!(" --user {u}"));
    }
    if let Some(g) = &parsed.group {
        govern.push_str(&format!(" --group {g}"));
    }
    let text = format!(
        "# Written by `airlock install --govern-unit {unit}`: the service's job runs under\n\
         # `airlock govern`, so the stdio MCP servers it starts are relayed through Airlock.\n\
         # Remove this file (and `systemctl daemon-reload`) to undo.\n\
         [Unit]\nWants=airlock.service\nAfter=airlock.service\n\n\
         [Service]\nUser=root\nGroup=root\nExecStart=\nExecStart={govern} -- {}\n",
        parsed.exec_start
    );
    let out = dir.join(DROP_IN);
    write_atomically(&out, text.as_bytes(), 0o644)?;
    let mut report = Report::default();
    report.note(format!("wrote {}", out.display()));
    if super::is_live(root) && super::systemd_running() {
        if super::run_quiet("systemctl", &["daemon-reload"]) {
            report.note(format!(
                "systemd reloaded: restart {unit} to govern its job"
            ));
        } else {
            report.note("`systemctl daemon-reload` failed: run it yourself".into());
        }
    }
    Ok(report)
}

/// `ExecStart=`, `User=`, `Group=` of the `[Service]` section.
fn parse(text: &str) -> Result<Unit, String> {
    let mut unit = Unit {
        exec_start: String::new(),
        user: None,
        group: None,
    };
    overlay(&mut unit, text)?;
    if unit.exec_start.is_empty() {
        return Err("no `ExecStart=`".into());
    }
    Ok(unit)
}

/// Apply one file's `[Service]` settings (a drop-in's empty `ExecStart=` resets it).
fn overlay(unit: &mut Unit, text: &str) -> Result<(), String> {
    let mut in_service = false;
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let mut line = line.trim().to_owned();
        while line.ends_with('\\') {
            line.pop();
            line.push(' ');
            line.push_str(lines.next().unwrap_or("").trim());
        }
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "ExecStart" if value.is_empty() => unit.exec_start.clear(),
            "ExecStart" if !unit.exec_start.is_empty() => {
                return Err(
                    "more than one `ExecStart=` (a oneshot with several commands): \
                            govern each command's unit, or wrap them in one script"
                        .into(),
                );
            }
            "ExecStart" => {
                if value.starts_with(['-', '@', '+', '!', ':', '|']) {
                    return Err(format!(
                        "`ExecStart={value}` has a prefix (`-@+!:|`) that a wrapped command \
                         cannot keep: remove it or write the drop-in yourself"
                    ));
                }
                unit.exec_start = value.to_owned();
            }
            "User" => unit.user = Some(value.to_owned()).filter(|v| !v.is_empty()),
            "Group" => unit.group = Some(value.to_owned()).filter(|v| !v.is_empty()),
            "DynamicUser" if value == "yes" || value == "true" => {
                return Err("`DynamicUser=yes`: no fixed user to drop to".into());
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drop_in_wraps_the_units_command_and_drops_to_its_user() {
        let root = std::env::temp_dir().join(format!("airlock-govern-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let units = root.join("usr/lib/systemd/system");
        fs::create_dir_all(&units).unwrap();
        fs::write(
            units.join("actions-runner.service"),
            "[Unit]\nDescription=runner\n[Service]\nUser=runner\nExecStart=/opt/runner/run.sh \\\n  --once\nRestart=always\n",
        )
        .unwrap();
        govern_unit(&root, "actions-runner").unwrap();
        let text = fs::read_to_string(
            root.join("etc/systemd/system/actions-runner.service.d")
                .join(DROP_IN),
        )
        .unwrap();
        assert!(text.contains("After=airlock.service"), "{text}");
        assert!(text.contains("User=root\n"), "{text}");
        assert!(
            text.contains(
                "ExecStart=\nExecStart=/usr/bin/airlock govern --name actions-runner.service --user runner -- /opt/runner/run.sh  --once\n"
            ),
            "{text}"
        );
        // Refusals name the reason.
        fs::write(
            units.join("two.service"),
            "[Service]\nExecStart=/a\nExecStart=/b\n",
        )
        .unwrap();
        let e = govern_unit(&root, "two").unwrap_err().to_string();
        assert!(e.contains("more than one"), "{e}");
        fs::write(units.join("pre.service"), "[Service]\nExecStart=-/a\n").unwrap();
        let e = govern_unit(&root, "pre").unwrap_err().to_string();
        assert!(e.contains("prefix"), "{e}");
        let e = govern_unit(&root, "missing").unwrap_err().to_string();
        assert!(e.contains("no unit file"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }
}
