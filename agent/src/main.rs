//! The `airlock` command line. Exit codes: 0 success, 1 runtime failure, 2 bad configuration.

use std::{path::PathBuf, process::ExitCode};

use airlock::archive::verify::Trust;
use airlock::{
    admin::{self, Request, Response, Status},
    config::{self, Config, ConfigError},
    kernel,
};
use clap::{Parser, Subcommand};

mod responder_cli;

/// mimalloc: the data path allocates per message on several threads; glibc's malloc showed up
/// at ~9% of the agent's CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "Transparent interceptor for MCP traffic on this host"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, value_name = "PATH", default_value = config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Log format (default: `log_format` of the configuration, else text).
    #[arg(long, global = true, value_enum)]
    log_format: Option<airlock::logging::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the redirect programs and serve redirected connections until SIGTERM.
    Run,
    /// Run COMMAND as a governed job: its stdio MCP servers (`[[stdio_server]]`) are relayed
    /// through the agent. Needs a running agent; execs fail while it is down.
    Govern {
        /// A label for the job in logs and records.
        #[arg(long)]
        name: Option<String>,
        /// Run the job as this user (with its groups) once the filter is handed over.
        #[arg(long)]
        user: Option<String>,
        /// ... and this group instead of the user's own.
        #[arg(long, requires = "user")]
        group: Option<String>,
        #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
    /// stdio MCP server processes on this host: relayed (governed jobs) or not (shadow MCP).
    Discover {
        /// Machine-readable output (one JSON object per process).
        #[arg(long)]
        json: bool,
    },
    /// Live and recently closed connections and the kernel counters.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Stop the agent and remove the programs: connections to backends go direct again.
    Detach,
    /// Validate the configuration and show the addresses that would be redirected.
    CheckConfig,
    /// Check the archive against its signed manifests: exit 0 when intact, 1 naming every
    /// modified, truncated, deleted, inserted or reordered file or record, and every host
    /// whose signing key the verifier does not trust.
    Verify {
        /// Archive directory (default: `archive_dir` of the configuration).
        #[arg(long, value_name = "DIR")]
        archive: Option<PathBuf>,
        #[command(flatten)]
        trust: TrustArgs,
        #[command(flatten)]
        fleet: FleetArgs,
        /// Machine-readable report (heads, problems).
        #[arg(long)]
        json: bool,
    },
    /// Sessions in the archive: who, which process, backend, start, duration, counts
    /// (`airlock sessions kill` ends live ones).
    Sessions {
        #[command(subcommand)]
        command: Option<SessionsCommand>,
        /// Only sessions with records at or after this time (RFC 3339, e.g. 2026-11-21T14:00:00Z).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        backend: Option<String>,
        #[arg(long)]
        json: bool,
        /// One session per intercepted connection instead of per MCP session.
        #[arg(long)]
        by_connection: bool,
        /// Archive directory (default: `archive_dir` of the configuration).
        #[arg(long, value_name = "DIR")]
        archive: Option<PathBuf>,
    },
    /// One session (an MCP session across its connections, or a connection) as a
    /// chronological transcript.
    Replay {
        session_id: String,
        /// One JSON record per line instead of the transcript.
        #[arg(long)]
        json: bool,
        /// SESSION_ID names a connection (`airlock sessions --by-connection`).
        #[arg(long)]
        connection: bool,
        /// List every connection of the session and show their opening and closing rows
        /// (by default: a summary, and refusals only).
        #[arg(long)]
        connections: bool,
        /// The backend of the MCP session, when several have one of that name.
        #[arg(long)]
        backend: Option<String>,
        /// The uid of the MCP session's client, when several users' sessions have that name.
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long, value_name = "DIR")]
        archive: Option<PathBuf>,
    },
    /// Bundle the archive files of a time window, the manifests, the policy files and a
    /// verification report into a .tar.gz.
    Evidence {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, value_name = "FILE.tar.gz")]
        out: PathBuf,
        #[arg(long, value_name = "DIR")]
        archive: Option<PathBuf>,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Calls held by `action = "approve"` rules: list them, let one through, refuse one.
    Approvals {
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
    /// OCI runtime hook (`createRuntime`): reads the container's state on stdin and has the
    /// agent serve the container's network namespace before its process runs. Never fails the
    /// container: without an agent, its connections to backends are refused until one runs.
    Hook,
    /// Tool definitions pinned when first seen.
    Tools {
        #[command(subcommand)]
        command: ToolsCommand,
    },
    /// The managed certificate authority that intercepted TLS connections are signed by.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Install this binary, the systemd unit, the sysusers.d entry, and the default
    /// configuration and policies (never over existing ones): the package's files, for hosts
    /// without it.
    Install {
        /// Install into this tree instead of the host (no group, no systemd reload).
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Only write a drop-in that runs this systemd service's job under `airlock govern`
        /// (its stdio MCP servers relayed), as its `User=` (repeatable).
        #[arg(long, value_name = "UNIT")]
        govern_unit: Vec<String>,
    },
    /// Stop the unit and detach the programs (on the host), remove the binary and the unit;
    /// the configuration and the archive stay unless --purge.
    Uninstall {
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Also remove /etc/airlock and /var/lib/airlock (keys, CA, the default archive).
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Subcommand)]
enum ApprovalsCommand {
    /// Held calls, oldest first: id, rule, who, what (arguments masked), time left.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Let held call ID through. With --digest, only if it is still that exact call.
    Approve {
        id: u64,
        #[arg(long)]
        digest: Option<String>,
    },
    /// Refuse held call ID (the client gets JSON-RPC error -32013).
    Deny { id: u64 },
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// End live intercepted connections now (containment). Every filter given must match.
    Kill {
        /// User name of the calling process.
        #[arg(long)]
        user: Option<String>,
        /// Process (or thread) id of the caller.
        #[arg(long)]
        pid: Option<u32>,
        /// A `session_id` as shown by `airlock sessions` / `airlock status`.
        #[arg(long)]
        session: Option<String>,
    },
}

#[derive(Subcommand)]
enum ToolsCommand {
    /// Accept the changed definition of TOOL on BACKEND (with `tool_changes = "block"`, it
    /// is refused until then).
    Accept { backend: String, tool: String },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the CA under `state_dir/ca` if there is none (`airlock run` does it too).
    Init,
    /// The trusted roots: fingerprints and validity, or with --pem the trust bundle clients
    /// need (SSL_CERT_FILE, NODE_EXTRA_CA_CERTS, REQUESTS_CA_BUNDLE).
    Show {
        #[arg(long)]
        pem: bool,
    },
    /// Add the trusted roots to the system trust store and refresh it.
    Install {
        /// Where the system store takes extra roots.
        #[arg(
            long,
            value_name = "DIR",
            default_value = "/usr/local/share/ca-certificates"
        )]
        store_dir: PathBuf,
        /// The command that rebuilds the system bundle ("" to skip).
        #[arg(long, default_value = "update-ca-certificates")]
        update_command: String,
    },
    /// Make a new root. It is trusted at once and signs after the overlap (hours; 0 = now,
    /// e.g. after a key compromise). The old root stays trusted while its leaves live.
    Rotate {
        #[arg(long, default_value_t = 168)]
        overlap_hours: u64,
    },
}

/// A fleet copy to verify instead of a local archive: the bucket the hosts ship to, or a
/// directory synced from it. Bucket options default to `[ship]` of the configuration.
#[derive(clap::Args, Clone, Default)]
struct FleetArgs {
    /// `s3://bucket/prefix`, or a directory holding the bucket's `host=…/` layout.
    #[arg(long, value_name = "S3_URL|DIR")]
    fleet: Option<String>,
    /// S3 endpoint (`https://host[:port]`).
    #[arg(long, value_name = "URL", requires = "fleet")]
    endpoint: Option<String>,
    #[arg(long, requires = "fleet")]
    region: Option<String>,
    /// Allow a plain-http endpoint.
    #[arg(long, requires = "fleet")]
    allow_http: bool,
    /// Root-only file with `access_key_id` and `secret_access_key` (else `AWS_*` variables).
    #[arg(long, value_name = "FILE", requires = "fleet")]
    credentials_file: Option<PathBuf>,
    /// PEM certificates trusted as roots for the bucket, besides the system's (a private CA).
    #[arg(long, value_name = "PEM", requires = "fleet")]
    ca_file: Option<PathBuf>,
}

/// What the verifier trusts (never the key stored in the archive).
#[derive(clap::Args, Clone, Default)]
struct TrustArgs {
    /// A trusted archive public key: `[HOST=]HEX` or `[HOST=]FILE` (repeatable; without
    /// `HOST=` it applies to every host). Fingerprints pinned in the configuration
    /// (`archive_key_fingerprints`) and this host's own signing key are trusted too.
    #[arg(long, value_name = "[HOST=]KEY")]
    pubkey: Vec<String>,
    /// The least manifest line a host's chain must reach (from a head kept off-host):
    /// `HOST=LINE` (repeatable).
    #[arg(long, value_name = "HOST=LINE")]
    expect_head: Vec<String>,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate every *.toml in DIR (default: `policies_dir` of the configuration); errors are
    /// reported as FILE:LINE: message, all at once, exit code 2.
    Check { dir: Option<PathBuf> },
}

/// `airlock govern`: returns only when the job could not be started.
fn govern(
    config: &std::path::Path,
    name: Option<&str>,
    run_as: airlock::stdio::govern::RunAs<'_>,
    command: &[std::ffi::OsString],
) -> ExitCode {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("airlock govern: {e}");
            return ExitCode::from(2);
        }
    };
    let socket = airlock::stdio::socket_path(&config.state_dir);
    let e = airlock::stdio::govern::run(&socket, name, run_as, command);
    eprintln!("airlock govern: {e}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    airlock::logging::init(
        &airlock::logging::LogSettings::read(&cli.config),
        cli.log_format,
        match cli.command {
            Command::Run => airlock::logging::Role::Agent,
            _ => airlock::logging::Role::Cli,
        },
    );
    if let Command::Policy {
        command: PolicyCommand::Check { dir: Some(dir) },
    } = &cli.command
    {
        return policy_check(dir);
    }
    if let Command::Verify {
        fleet: fleet @ FleetArgs { fleet: Some(_), .. },
        trust,
        json,
        ..
    } = &cli.command
    {
        let config = Config::load(&cli.config).ok();
        return verify_fleet(fleet, trust, config.as_ref(), *json);
    }
    if let Command::Verify {
        archive: Some(dir),
        trust,
        json,
        ..
    } = &cli.command
    {
        // A configuration, when there is one, adds pinned fingerprints and this host's key.
        let config = Config::load(&cli.config).ok();
        return verify(dir, trust, config.as_ref(), *json);
    }
    if let Command::Govern {
        name,
        user,
        group,
        command,
    } = &cli.command
    {
        let run_as = airlock::stdio::govern::RunAs {
            user: user.as_deref(),
            group: group.as_deref(),
        };
        return govern(&cli.config, name.as_deref(), run_as, command);
    }
    match &cli.command {
        Command::Install { root, govern_unit } if !govern_unit.is_empty() => {
            for unit in govern_unit {
                match airlock::install::govern_unit(root, unit) {
                    Ok(report) => report.lines.iter().for_each(|l| println!("{l}")),
                    Err(e) => return fail(e),
                }
            }
            return ExitCode::SUCCESS;
        }
        Command::Install { root, .. } => return install(root),
        Command::Uninstall { root, purge } => return uninstall(&cli.config, root, *purge),
        _ => {}
    }
    // Responder commands given `--archive` work without a configuration file.
    match &cli.command {
        Command::Sessions {
            command: None,
            archive: Some(dir),
            since,
            user,
            backend,
            json,
            by_connection,
        } => {
            return responder_cli::sessions(
                dir,
                since.as_deref(),
                (user.as_deref(), backend.as_deref()),
                *by_connection,
                *json,
            );
        }
        Command::Replay {
            archive: Some(dir),
            session_id,
            json,
            connection,
            connections,
            backend,
            uid,
        } => {
            return responder_cli::replay(
                dir,
                session_id,
                *connection,
                (backend.as_deref(), *uid),
                (*json, *connections),
            );
        }
        Command::Evidence {
            archive: Some(dir),
            from,
            to,
            out,
            trust,
        } => {
            let config = Config::load(&cli.config).ok();
            return evidence(dir, None, (from, to), (trust, config.as_ref()), out);
        }
        _ => {}
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("airlock: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run => match airlock::agent::run(config).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(airlock::agent::RunError::Config(e)) => config_error(&e),
                Err(
                    e @ (airlock::agent::RunError::Policy(_)
                    | airlock::agent::RunError::Credentials(_)
                    | airlock::agent::RunError::Ship(_)),
                ) => {
                    eprintln!("airlock: {e}");
                    ExitCode::from(2)
                }
                Err(e) => fail(e),
            },
            Command::Status { json } => status(&config, json).await,
            Command::Discover { json } => discover(&config, json).await,
            Command::Detach => detach(&config).await,
            Command::Policy {
                command: PolicyCommand::Check { .. },
            } => policy_check(&config.policies_dir),
            Command::Verify { trust, json, .. } => {
                verify(&config.archive_dir, &trust, Some(&config), json)
            }
            Command::Sessions {
                command: Some(SessionsCommand::Kill { user, pid, session }),
                ..
            } => admin_command(&config, Request::Kill { user, pid, session }).await,
            Command::Sessions {
                since,
                user,
                backend,
                json,
                by_connection,
                ..
            } => responder_cli::sessions(
                &config.archive_dir,
                since.as_deref(),
                (user.as_deref(), backend.as_deref()),
                by_connection,
                json,
            ),
            Command::Replay {
                session_id,
                json,
                connection,
                connections,
                backend,
                uid,
                ..
            } => responder_cli::replay(
                &config.archive_dir,
                &session_id,
                connection,
                (backend.as_deref(), uid),
                (json, connections),
            ),
            Command::Evidence {
                from,
                to,
                out,
                trust,
                ..
            } => evidence(
                &config.archive_dir,
                Some(&config.policies_dir),
                (&from, &to),
                (&trust, Some(&config)),
                &out,
            ),
            Command::Ca { command } => ca(&config, command),
            Command::Install { .. } | Command::Uninstall { .. } | Command::Govern { .. } => unreachable!("handled above"),
            Command::Hook => hook(&config).await,
            Command::Approvals { command } => approvals(&config, command).await,
            Command::Tools {
                command: ToolsCommand::Accept { backend, tool },
            } => admin_command(&config, Request::AcceptTool { backend, tool }).await,
            Command::CheckConfig => match config.resolve().await {
                Ok(targets) => {
                    println!("{}: ok", config.path.display());
                    for t in targets {
                        let name = match config.target(t.backend_id) {
                            Some(airlock::config::TargetRef::Proxy(_, p)) if p.cgroups.is_empty() => {
                                format!("egress proxy {}", p.name)
                            }
                            Some(airlock::config::TargetRef::Proxy(_, p)) => {
                                format!("egress proxy {}, for cgroups {}", p.name, p.cgroups.join(" "))
                            }
                            _ => format!("backend {}", config.target_name(t.backend_id)),
                        };
                        println!("  redirect {} -> agent ({name})", t.addr);
                    }
                    if let Err(e) = check_scopes(&config) {
                        eprintln!("airlock: {e}: `airlock run` would refuse to start");
                        return ExitCode::from(1);
                    }
                    // What this kernel accepts of the programs (loaded and verified, never
                    // attached).
                    let mechanisms = airlock::kernel::probe();
                    print!("{}", mechanisms.describe());
                    let guard_missing = !mechanisms.socket_guard || mechanisms.packet_guard.is_empty();
                    if !mechanisms.redirect || !mechanisms.egress_guard {
                        eprintln!("airlock: this kernel cannot run the redirect: `airlock run` would refuse to start");
                        ExitCode::from(1)
                    } else if guard_missing
                        && config.socket_guard == airlock::config::SocketGuard::Require
                    {
                        eprintln!("airlock: the socket guard cannot run here: `airlock run` would refuse to start (socket_guard = \"require\")");
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => config_error(&e),
            },
        }
    })
}

/// Whether every egress proxy's `cgroups` exist within the attached cgroup.
fn check_scopes(config: &Config) -> Result<(), String> {
    if config.egress_proxies.iter().all(|p| p.cgroups.is_empty()) {
        return Ok(());
    }
    let mount = airlock::cgroup::resolve(None).map_err(|e| e.to_string())?;
    let attached = airlock::cgroup::resolve(config.cgroup.as_deref()).map_err(|e| e.to_string())?;
    for p in &config.egress_proxies {
        p.scope(&mount, &attached)?;
    }
    Ok(())
}

/// An RFC 3339 time as microseconds since the epoch, or a usage error.
pub(crate) fn parse_time(what: &str, s: &str) -> Result<i64, ExitCode> {
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_micros()).ok())
        .ok_or_else(|| {
            eprintln!(
                "airlock: `{what}`: `{s}` is not an RFC 3339 time (e.g. 2026-11-21T14:00:00Z)"
            );
            ExitCode::from(2)
        })
}

fn evidence(
    dir: &std::path::Path,
    policies: Option<&std::path::Path>,
    (from, to): (&str, &str),
    (trust, config): (&TrustArgs, Option<&Config>),
    out: &std::path::Path,
) -> ExitCode {
    let (from, to) = match (parse_time("--from", from), parse_time("--to", to)) {
        (Ok(f), Ok(t)) if f < t => (f, t),
        (Ok(_), Ok(_)) => {
            eprintln!("airlock: `--from` must be before `--to`");
            return ExitCode::from(2);
        }
        (Err(code), _) | (_, Err(code)) => return code,
    };
    let trust = match Trust::build(&trust.pubkey, &trust.expect_head, config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("airlock: {e}");
            return ExitCode::from(2);
        }
    };
    match airlock::archive::responder::evidence(dir, policies, (from, to), &trust, out) {
        Ok(report) => {
            println!("wrote {}", out.display());
            if report.intact() {
                println!("archive verified intact");
                ExitCode::SUCCESS
            } else {
                println!(
                    "archive verification found {} problem(s): see VERIFICATION.txt in the bundle",
                    report.problems.len()
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => fail(format!("cannot write {}: {e}", out.display())),
    }
}

fn verify(
    dir: &std::path::Path,
    trust: &TrustArgs,
    config: Option<&Config>,
    json: bool,
) -> ExitCode {
    let trust = match Trust::build(&trust.pubkey, &trust.expect_head, config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("airlock: {e}");
            return ExitCode::from(2);
        }
    };
    let report = airlock::archive::verify::verify(dir, &trust);
    emit_verification_failure(&report, config);
    print_report(&dir.display().to_string(), &report, json)
}

fn verify_fleet(
    args: &FleetArgs,
    trust: &TrustArgs,
    config: Option<&Config>,
    json: bool,
) -> ExitCode {
    use airlock::ship::{fleet::Source, store};
    let trust = match Trust::build(&trust.pubkey, &trust.expect_head, config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("airlock: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(target) = args.fleet.as_deref() else {
        return ExitCode::from(2);
    };
    let source = if target.starts_with("s3://") {
        // The configuration's [ship], when there is one, fills in what the flags leave out.
        let base = config.and_then(|c| c.ship.clone());
        let (bucket, prefix) = match config::parse_ship_url(target) {
            Ok(bp) => bp,
            Err(e) => {
                eprintln!("airlock: --fleet: {e}");
                return ExitCode::from(2);
            }
        };
        let cfg = config::ShipConfig {
            url: target.trim_end_matches('/').to_owned(),
            bucket,
            prefix,
            endpoint: args
                .endpoint
                .clone()
                .or_else(|| base.as_ref().and_then(|b| b.endpoint.clone())),
            region: args
                .region
                .clone()
                .or_else(|| base.as_ref().map(|b| b.region.clone()))
                .unwrap_or_else(|| "us-east-1".into()),
            allow_http: args.allow_http || base.as_ref().is_some_and(|b| b.allow_http),
            virtual_hosted_style: base.as_ref().is_some_and(|b| b.virtual_hosted_style),
            credentials_file: args
                .credentials_file
                .clone()
                .or_else(|| base.as_ref().and_then(|b| b.credentials_file.clone())),
            ca_file: match &args.ca_file {
                Some(path) => {
                    if let Err(e) = airlock::config::extra_roots(path) {
                        eprintln!("airlock: --ca-file: {e}");
                        return ExitCode::from(2);
                    }
                    Some(path.clone())
                }
                None => base.as_ref().and_then(|b| b.ca_file.clone()),
            },
            retry: std::time::Duration::from_secs(60),
            timeout: base
                .as_ref()
                .map_or(std::time::Duration::from_secs(30), |b| b.timeout),
            keep_unshipped: true,
        };
        match store::open(&cfg) {
            Ok((store, layout)) => Source::Bucket {
                store,
                layout,
                url: cfg.url,
            },
            Err(e) => return fail(e),
        }
    } else {
        Source::Directory(PathBuf::from(target))
    };
    match airlock::ship::fleet::verify(&source, &trust) {
        Ok(report) => {
            emit_verification_failure(&report, config);
            print_report(target, &report, json)
        }
        Err(e) => fail(e),
    }
}

fn print_report(name: &str, report: &airlock::archive::verify::Report, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "archive": name,
                "intact": report.intact(),
                "files_checked": report.files_checked,
                "records_checked": report.records_checked,
                "retained_deletions": report.retained_deletions,
                "heads": report.heads,
                "problems": report.problems,
            })
        );
        return if report.intact() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    println!(
        "{}: {} host(s), {} file(s), {} record(s) checked, {} file(s) removed by retention",
        name,
        report.hosts.len(),
        report.files_checked,
        report.records_checked,
        report.retained_deletions
    );
    for h in &report.heads {
        println!("{}", airlock::archive::verify::head_line(h));
    }
    if report.intact() {
        println!("intact");
        return ExitCode::SUCCESS;
    }
    for p in &report.problems {
        println!("TAMPERED {p}");
    }
    eprintln!("airlock: {} problem(s) found", report.problems.len());
    ExitCode::FAILURE
}

fn policy_check(dir: &std::path::Path) -> ExitCode {
    // The hash key only shapes `hash`-style tokens, which a check does not produce.
    match airlock::policy::PolicySet::load_dir(dir, airlock::policy::HashKey([0; 32])) {
        Ok(set) => {
            for f in &set.files {
                println!("{}: ok", f.display());
            }
            println!("{} rules; policy set {}", set.rule_count(), set.hash);
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("airlock: {} error(s) in {}", errors.0.len(), dir.display());
            ExitCode::from(2)
        }
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("airlock: invalid configuration: {e}");
    ExitCode::from(2)
}

pub(crate) fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("airlock: {e}");
    ExitCode::FAILURE
}

/// `airlock discover`: the agent's scan, one line (or JSON object) per process.
async fn discover(config: &Config, json: bool) -> ExitCode {
    let found = match admin::request(&config.admin_socket(), &Request::Discover).await {
        Ok(Response::Discovered { found }) => found,
        Ok(Response::Error { message }) => return fail(message),
        Ok(other) => return fail(format!("unexpected answer {other:?}")),
        Err(e) => return fail(e),
    };
    for f in &found {
        if json {
            match serde_json::to_string(f) {
                Ok(s) => println!("{s}"),
                Err(e) => return fail(e),
            }
        } else {
            println!(
                "{pid:>7} {user:<12} {server:<16} {state:<9} {exe} {argv}  (parent {ppid} {pexe})",
                pid = f.pid,
                user = f.user.clone().unwrap_or_else(|| f.uid.to_string()),
                server = f.server,
                state = if f.relayed { "relayed" } else { "UNMANAGED" },
                exe = f.exe.as_deref().unwrap_or("?"),
                argv = f.argv.join(" "),
                ppid = f.parent_pid,
                pexe = f.parent_exe.as_deref().unwrap_or("?"),
            );
        }
    }
    if !json && found.is_empty() {
        println!("no stdio MCP server processes found");
    }
    ExitCode::SUCCESS
}

async fn status(config: &Config, json: bool) -> ExitCode {
    let status = match admin::request(&config.admin_socket(), &Request::Status).await {
        Ok(Response::Status(s)) => s,
        Ok(Response::Error { message }) => return fail(message),
        Ok(other) => return fail(format!("unexpected answer {other:?}")),
        Err(e @ admin::ClientError::NotRunning(_)) => {
            let pinned = kernel::is_pinned(&config.bpffs_dir);
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "running": false, "programs_pinned": pinned, "error": e.to_string() })
                );
            } else {
                eprintln!("airlock: {e}");
                if pinned {
                    eprintln!(
                        "programs are pinned in {}: connections to backends are refused (fail closed) until the agent runs again or `airlock detach`",
                        config.bpffs_dir.display()
                    );
                }
            }
            return ExitCode::from(3);
        }
        Err(e) => return fail(e),
    };
    if json {
        match serde_json::to_string_pretty(&status) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail(e),
        }
    } else {
        print_table(&status);
    }
    ExitCode::SUCCESS
}

fn print_table(s: &Status) {
    let a = &s.agent;
    println!(
        "agent pid {} since {}  cgroup {}  on_agent_down {}  listening {}",
        a.pid,
        a.started_at,
        a.cgroup,
        a.on_agent_down,
        a.listen.join(" ")
    );
    print!("{}", s.mechanisms.describe());
    for ns in &s.namespaces {
        println!(
            "namespace {} (netns cookie {}, {} since {}){}",
            ns.inode,
            ns.cookie,
            ns.source,
            ns.enrolled_at,
            ns.container
                .as_ref()
                .map(|c| format!(
                    "  container {} {}{}",
                    c.runtime,
                    &c.id[..c.id.len().min(12)],
                    c.name
                        .as_ref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                ))
                .unwrap_or_default()
        );
    }
    println!(
        "targets: {}",
        s.targets
            .iter()
            .map(|t| format!("{}={}", t.backend, t.address))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!(
        "{:>6} {:<9} {:>7} {:>7} {:<10} {:<16} {:<10} {:<24} {:>9} {:>9} {:<27} EXE",
        "ID",
        "STATE",
        "PID",
        "TGID",
        "USER",
        "COMM",
        "BACKEND",
        "ORIGINAL_DST",
        "UP",
        "DOWN",
        "OPENED"
    );
    for c in &s.connections {
        let dash = || "-".to_owned();
        println!(
            "{:>6} {:<9} {:>7} {:>7} {:<10} {:<16} {:<10} {:<24} {:>9} {:>9} {:<27} {}",
            c.id,
            c.state,
            c.pid.map(|p| p.to_string()).unwrap_or_else(dash),
            c.tgid.map(|p| p.to_string()).unwrap_or_else(dash),
            c.user
                .clone()
                .or(c.uid.map(|u| u.to_string()))
                .unwrap_or_else(dash),
            c.comm.clone().unwrap_or_else(dash),
            c.backend.clone().unwrap_or_else(dash),
            c.original_dst
                .clone()
                .unwrap_or_else(|| format!("(from {})", c.client)),
            c.bytes_up,
            c.bytes_down,
            c.opened_at,
            c.exe.clone().unwrap_or_else(dash),
        );
    }
    println!();
    println!("kernel counters:");
    for (k, v) in &s.kernel_counters {
        println!("  {k:<24} {v}");
    }
    println!("agent counters:");
    for (k, v) in &s.agent_counters {
        println!("  {k:<24} {v}");
    }
    if let Some(ship) = &s.ship {
        println!("shipping to {}:", ship.url);
        println!(
            "  pending                  {} line(s), {} file(s), {} byte(s){}",
            ship.lines_pending,
            ship.files_pending,
            ship.bytes_pending,
            ship.oldest_pending_age_secs
                .map(|a| format!(", oldest {a} s old"))
                .unwrap_or_default()
        );
        println!(
            "  shipped                  {} line(s), {} file(s), {} byte(s); last success {}",
            ship.lines_shipped,
            ship.files_shipped,
            ship.bytes_shipped,
            ship.last_success.as_deref().unwrap_or("never")
        );
        println!(
            "  uploads                  {} ok, {} failed, {} already present, {} conflicting (ALARM if > 0), {} file(s) gone before shipping",
            ship.uploads_ok,
            ship.uploads_failed,
            ship.already_present,
            ship.conflicts,
            ship.files_missing
        );
        if let Some(e) = &ship.last_error {
            println!(
                "  last error               {} at {}",
                e,
                ship.last_error_at.as_deref().unwrap_or("?")
            );
        }
    }
}

async fn detach(config: &Config) -> ExitCode {
    // Detach first, so no connection is refused while the agent drains and exits.
    let removed = match kernel::detach(&config.bpffs_dir) {
        Ok(r) => r,
        Err(e) => {
            return fail(format!(
                "cannot remove pins under {}: {e}",
                config.bpffs_dir.display()
            ));
        }
    };
    for line in &removed {
        println!("{line}");
    }
    match admin::request(&config.admin_socket(), &Request::Shutdown).await {
        Ok(Response::Ok { message }) => println!("agent: {message}"),
        Ok(Response::Error { message }) => return fail(message),
        Ok(_) => {}
        Err(admin::ClientError::NotRunning(_)) => println!("agent: not running"),
        Err(e) => return fail(e),
    }
    println!("detached: connections to backends go direct");
    ExitCode::SUCCESS
}

fn install(root: &std::path::Path) -> ExitCode {
    match airlock::install::install(root) {
        Ok(report) => {
            for line in &report.lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// On the host: stop the unit, detach the programs (as `airlock detach`), then remove files.
fn uninstall(config_path: &std::path::Path, root: &std::path::Path, purge: bool) -> ExitCode {
    if airlock::install::is_live(root) {
        if let Some(line) = airlock::install::stop_unit() {
            println!("{line}");
        }
        let detached = match Config::load(config_path) {
            Ok(config) => match tokio::runtime::Runtime::new() {
                Ok(rt) => rt.block_on(detach(&config)),
                Err(e) => fail(format!("cannot start the async runtime: {e}")),
            },
            // No configuration to read `bpffs_dir` from: the default one.
            Err(_) => {
                match kernel::detach(std::path::Path::new(airlock::install::DEFAULT_BPFFS_DIR)) {
                    Ok(lines) => {
                        lines.iter().for_each(|l| println!("{l}"));
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(e),
                }
            }
        };
        if detached != ExitCode::SUCCESS {
            eprintln!("airlock: not uninstalled: the programs could not be detached");
            return detached;
        }
    }
    match airlock::install::uninstall(root, purge) {
        Ok(report) => {
            for line in &report.lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn ca(config: &Config, command: CaCommand) -> ExitCode {
    use airlock::tls::ca::Ca;
    let dir = Ca::dir_of(&config.state_dir);
    let result = (|| -> Result<(), String> {
        match command {
            CaCommand::Init => {
                let created = Ca::init(&dir, &config.host).map_err(|e| e.to_string())?;
                println!(
                    "{} {}",
                    if created {
                        "created"
                    } else {
                        "already present:"
                    },
                    dir.display()
                );
                Ok(())
            }
            CaCommand::Show { pem } => {
                let ca = Ca::load(&dir).map_err(|e| e.to_string())?;
                if pem {
                    print!("{}", ca.bundle_pem().map_err(|e| e.to_string())?);
                    return Ok(());
                }
                for root in ca.trusted_roots().map_err(|e| e.to_string())? {
                    println!("root #{}  {}", root.id, root.role);
                    println!("  sha256 {}", root.fingerprint());
                    println!(
                        "  file   {}",
                        dir.join(format!("root-{}.pem", root.id)).display()
                    );
                }
                println!("intermediate: made by the agent at start, name-constrained to:");
                for b in config.backends.iter().filter(|b| b.tls) {
                    println!("  {} ({})", b.host, b.name);
                }
                Ok(())
            }
            CaCommand::Install {
                store_dir,
                update_command,
            } => {
                let ca = Ca::load(&dir).map_err(|e| e.to_string())?;
                std::fs::create_dir_all(&store_dir)
                    .map_err(|e| format!("{}: {e}", store_dir.display()))?;
                // Remove roots this host no longer needs, then write the current ones.
                if let Ok(entries) = std::fs::read_dir(&store_dir) {
                    for e in entries.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if name.starts_with("airlock-root-") && name.ends_with(".crt") {
                            let _ = std::fs::remove_file(e.path());
                        }
                    }
                }
                for root in ca.trusted_roots().map_err(|e| e.to_string())? {
                    let path = store_dir.join(format!("airlock-root-{}.crt", root.id));
                    std::fs::write(&path, &root.pem)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    println!("installed {}", path.display());
                }
                if !update_command.trim().is_empty() {
                    let status = std::process::Command::new("sh")
                        .arg("-c")
                        .arg(&update_command)
                        .status()
                        .map_err(|e| format!("`{update_command}`: {e}"))?;
                    if !status.success() {
                        return Err(format!("`{update_command}` failed: {status}"));
                    }
                }
                Ok(())
            }
            CaCommand::Rotate { overlap_hours } => {
                let mut ca = Ca::load(&dir).map_err(|e| e.to_string())?;
                let id = ca
                    .rotate(
                        std::time::Duration::from_secs(overlap_hours * 3600),
                        &config.host,
                    )
                    .map_err(|e| e.to_string())?;
                println!(
                    "root #{id} created; it signs {}. Run `airlock ca install` (and update bundles given to runtimes) now; restart the agent {}.",
                    if overlap_hours == 0 {
                        "now".to_owned()
                    } else {
                        format!("in {overlap_hours} h")
                    },
                    if overlap_hours == 0 {
                        "now"
                    } else {
                        "after that (it also switches at its next start)"
                    }
                );
                Ok(())
            }
        }
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock ca: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn approvals(config: &Config, command: ApprovalsCommand) -> ExitCode {
    let (req, json) = match command {
        ApprovalsCommand::List { json } => (Request::Approvals, json),
        ApprovalsCommand::Approve { id, digest } => (Request::Approve { id, digest }, false),
        ApprovalsCommand::Deny { id } => (Request::Deny { id }, false),
    };
    match admin::request(&config.admin_socket(), &req).await {
        Ok(Response::Approvals { pending }) => {
            if json {
                for p in &pending {
                    println!("{}", serde_json::to_string(p).unwrap_or_default());
                }
            } else if pending.is_empty() {
                println!("no call is waiting for approval");
            } else {
                for p in &pending {
                    println!(
                        "#{}  rule {}  {} {}  by {} (uid {}, pid {}, {})  backend {}  {} s left",
                        p.id,
                        p.rule,
                        p.method,
                        p.tool.as_deref().unwrap_or(""),
                        p.user.as_deref().unwrap_or("?"),
                        p.uid,
                        p.pid,
                        p.exe.as_deref().unwrap_or("?"),
                        p.backend,
                        p.expires_in_secs
                    );
                    if let Some(args) = &p.arguments {
                        println!("    arguments {args}");
                    }
                    println!("    digest {}", p.digest);
                }
            }
            ExitCode::SUCCESS
        }
        other => report(other),
    }
}

/// Send a request whose answer is a one-line message (`kill`, `accept_tool`).
/// `airlock hook`: the OCI state (`pid`, `annotations`) from stdin to an `enroll` request.
async fn hook(config: &Config) -> ExitCode {
    use std::io::Read as _;
    let mut state = String::new();
    if let Err(e) = std::io::stdin().take(1 << 20).read_to_string(&mut state) {
        eprintln!("airlock hook: cannot read the container state: {e}");
        return ExitCode::SUCCESS;
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&state) else {
        eprintln!("airlock hook: the container state on stdin is not JSON");
        return ExitCode::SUCCESS;
    };
    let Some(pid) = v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()) else {
        eprintln!(
            "airlock hook: the container state names no pid (run me as a createRuntime hook)"
        );
        return ExitCode::SUCCESS;
    };
    let a = &v["annotations"];
    let name = [
        "io.kubernetes.cri.container-name",
        "io.kubernetes.container.name",
        "nerdctl/name",
        "com.docker.compose.container-name",
    ]
    .iter()
    .find_map(|k| a[*k].as_str())
    .map(str::to_owned);
    let req = Request::Enroll { pid, name };
    match tokio::time::timeout(
        std::time::Duration::from_secs(10),
        admin::request(&config.admin_socket(), &req),
    )
    .await
    {
        Ok(Ok(Response::Ok { .. })) => {}
        Ok(Ok(Response::Error { message })) => eprintln!("airlock hook: {message}"),
        Ok(Ok(_)) => eprintln!("airlock hook: unexpected answer from the agent"),
        Ok(Err(e)) => eprintln!(
            "airlock hook: {e} (the container's connections to backends are refused until an agent serves it)"
        ),
        Err(_) => eprintln!("airlock hook: the agent did not answer within 10 s"),
    }
    ExitCode::SUCCESS
}

async fn admin_command(config: &Config, req: Request) -> ExitCode {
    report(admin::request(&config.admin_socket(), &req).await)
}

/// Print an admin answer: the message (exit 0), the agent's error (1), or that no agent runs (3).
fn report(answer: Result<Response, admin::ClientError>) -> ExitCode {
    match answer {
        Ok(Response::Ok { message }) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Ok(Response::Error { message }) => fail(message),
        Ok(_) => fail("unexpected answer from the agent"),
        Err(e @ admin::ClientError::NotRunning(_)) => {
            eprintln!("airlock: {e}");
            ExitCode::from(3)
        }
        Err(e) => fail(e),
    }
}

/// A failed verification is an audit event too (file, syslog; the webhook's spool, which the
/// running agent sends), when the configuration has `[events]`.
fn emit_verification_failure(report: &airlock::archive::verify::Report, config: Option<&Config>) {
    if !report.intact()
        && let Some(c) = config
        && let Some(events) = &c.events
    {
        // The SIEM hears of it too (file, syslog; the webhook's spool, which the agent sends).
        // The events file keeps the agent's group (a log shipper reads it through it).
        let gid = nix::unistd::Group::from_name(&c.archive_group)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw());
        match airlock::events::report_verification_failure(
            events,
            &c.host,
            gid,
            &report.hosts,
            &report.problems,
        ) {
            Ok(true) => {}
            Ok(false) => eprintln!(
                "airlock: the verification-failed event did not reach every events sink within 5 s"
            ),
            Err(e) => eprintln!("airlock: cannot send the verification-failed event: {e}"),
        }
    }
}
