//! `cargo xtask package`: the Debian package and a tarball of the same tree, in
//! `target/package/`, checked by lintian.
//!
//! The tree is staged by the release binary itself (`airlock install --root STAGE`: the unit,
//! the sysusers.d entry, the configuration and policies come from the one source the binary
//! compiles in), then completed with what Debian requires (copyright, changelog, man page,
//! maintainer scripts from `packaging/`) and built with `dpkg-deb --build`.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// Build the release binary's package; returns the `.deb` path.
pub fn package(root: &Path) -> Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let out_dir = target.join("package");
    let name = format!("airlock-{version}-{arch}");
    let stage = out_dir.join(&name);
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;
    let packaging = root.join("packaging");
    check_changelog(&packaging.join("changelog"), version)?;

    // The installed files, from the binary (one source with `airlock install`).
    crate::run(
        Command::new(target.join("release/airlock"))
            .arg("install")
            .arg("--root")
            .arg(&stage),
    )?;
    // The state directory belongs to the host, not to the package (postinst and the unit's
    // StateDirectory= create it).
    fs::remove_dir_all(stage.join("var")).context("removing the staged var/")?;
    let binary = stage.join("usr/bin/airlock");
    crate::run(
        Command::new("strip")
            .args([
                "--strip-unneeded",
                "--remove-section=.comment",
                "--remove-section=.note",
            ])
            .arg(&binary),
    )?;

    // What Debian requires beside the files.
    let doc = stage.join("usr/share/doc/airlock");
    fs::create_dir_all(doc.join("examples"))?;
    fs::copy(packaging.join("copyright"), doc.join("copyright"))?;
    gzip(&packaging.join("changelog"), &doc.join("changelog.gz"))?;
    gzip(&root.join("README.md"), &doc.join("README.md.gz"))?;
    fs::copy(
        packaging.join("runner-dropin.conf"),
        doc.join("examples/runner-airlock.conf"),
    )?;
    let man = stage.join("usr/share/man/man1");
    fs::create_dir_all(&man)?;
    gzip(&packaging.join("airlock.1"), &man.join("airlock.1.gz"))?;
    let overrides = stage.join("usr/share/lintian/overrides");
    fs::create_dir_all(&overrides)?;
    fs::copy(
        packaging.join("lintian-overrides"),
        overrides.join("airlock"),
    )?;
    normalise_modes(&stage)?;

    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    for script in ["postinst", "prerm", "postrm"] {
        let dest = debian.join(script);
        fs::copy(packaging.join(script), &dest)?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))?;
    }
    let conffiles: Vec<String> = [
        "airlock.toml",
        "policies/README.md",
        "policies/default.toml",
    ]
    .iter()
    .map(|f| format!("/etc/airlock/{f}\n"))
    .collect();
    write(&debian.join("conffiles"), &conffiles.concat())?;
    let depends = shlib_depends(&binary, &out_dir)?;
    let installed_kib = tree_size(&stage, &debian)?.div_ceil(1024);
    write(
        &debian.join("control"),
        &format!(
            "Package: airlock\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: Airlock maintainers <airlock@users.noreply.github.com>\n\
             Installed-Size: {installed_kib}\n\
             Depends: {depends}\n\
             Section: net\n\
             Priority: optional\n\
             Description: transparent interceptor for MCP traffic\n \
             Airlock attaches eBPF programs to a cgroup so that connections to the\n \
             MCP backends named in /etc/airlock/airlock.toml reach a local agent\n \
             instead. The agent attributes each connection to a process and user,\n \
             masks, blocks or holds messages by policy, and records them in a signed\n \
             Parquet archive. While the agent is down, connections to the backends\n \
             are refused.\n"
        ),
    )?;
    md5sums(&stage)?;
    fs::set_permissions(&debian, fs::Permissions::from_mode(0o755))?;
    for f in ["control", "conffiles", "md5sums"] {
        fs::set_permissions(debian.join(f), fs::Permissions::from_mode(0o644))?;
    }

    let deb = out_dir.join(format!("airlock_{version}_{arch}.deb"));
    crate::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    // The same tree for hosts without dpkg: unpack, then `./NAME/usr/bin/airlock install`.
    let tarball = out_dir.join(format!("{name}.tar.gz"));
    crate::run(
        Command::new("tar")
            .current_dir(&out_dir)
            .args([
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--sort=name",
                "--exclude",
                &format!("{name}/DEBIAN"),
                "-czf",
            ])
            .arg(&tarball)
            .arg(&name),
    )?;
    lintian(&deb)?;
    eprintln!("xtask: built {} and {}", deb.display(), tarball.display());
    Ok(deb)
}

/// lintian on the package: any error, warning or info tag not overridden (with its reason)
/// in `packaging/lintian-overrides` fails.
pub fn lintian(deb: &Path) -> Result<()> {
    crate::run(
        Command::new("lintian")
            .args([
                "--fail-on",
                "error,warning,info",
                "--display-info",
                "--info",
            ])
            .arg(deb),
    )
}

/// The changelog's newest entry must be this version (lintian and `dpkg -s` read it).
fn check_changelog(path: &Path, version: &str) -> Result<()> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let first = text.lines().next().unwrap_or_default();
    if !first.starts_with(&format!("airlock ({version}) ")) {
        bail!(
            "{}: the newest entry is `{first}`, not version {version}: add an entry for {version}",
            path.display()
        );
    }
    Ok(())
}

/// `Depends:` for the binary's shared libraries, from dpkg-shlibdeps (it wants a
/// debian/control beside it).
fn shlib_depends(binary: &Path, out_dir: &Path) -> Result<String> {
    let work = out_dir.join("shlibdeps");
    fs::create_dir_all(work.join("debian"))?;
    write(
        &work.join("debian/control"),
        "Source: airlock\n\nPackage: airlock\nArchitecture: any\n",
    )?;
    let out = output(
        Command::new("dpkg-shlibdeps")
            .current_dir(&work)
            .arg("-O")
            .arg(format!("-e{}", binary.display())),
    )?;
    let deps = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {out}"))?;
    Ok(deps.to_owned())
}

/// Directories 0755, files 0644, the binary 0755 (lintian checks modes).
fn normalise_modes(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
            normalise_modes(&path)?;
        } else if meta.is_file() {
            let mode = if path.ends_with("usr/bin/airlock") {
                0o755
            } else {
                0o644
            };
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Bytes of the files under `dir`, `skip` excluded.
fn tree_size(dir: &Path, skip: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path == skip {
            continue;
        }
        let meta = fs::symlink_metadata(&path)?;
        total += if meta.is_dir() {
            tree_size(&path, skip)?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// DEBIAN/md5sums: every file but DEBIAN's and the conffiles (dpkg keeps their sums itself).
fn md5sums(stage: &Path) -> Result<()> {
    let list = output(
        Command::new("sh")
            .current_dir(stage)
            .arg("-c")
            .arg("find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 md5sum"),
    )?;
    write(&stage.join("DEBIAN/md5sums"), &format!("{list}\n"))
}

fn gzip(src: &Path, dest: &Path) -> Result<()> {
    let out = Command::new("gzip")
        .args(["-9n", "-c"])
        .arg(src)
        .output()
        .with_context(|| format!("gzip {}", src.display()))?;
    if !out.status.success() {
        bail!(
            "gzip {} failed: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fs::write(dest, out.stdout).with_context(|| format!("writing {}", dest.display()))
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A command's stdout (trimmed), failing on a non-zero exit.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
