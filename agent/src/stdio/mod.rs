//! stdio MCP servers of governed jobs, relayed through the pipeline without touching the
//! client's configuration.
//!
//! ```text
//!   airlock govern -- JOB          seccomp filter (notify on exec) + its listener ──▶ govern.sock
//!   agent: one thread per job      exec notification ─▶ exec::Exec (path, argv, fds 0/1)
//!        matches [[stdio_server]]? pidfd_getfd 0,1 (the client's pipes); new pipes put in
//!                                  their place (SECCOMP_IOCTL_NOTIF_ADDFD); `open` record;
//!                                  the exec continues ─▶ relay::Relay (two threads)
//!        already relayed?          an `exec` record in that relay's session (the chain)
//!        otherwise                 the exec continues untouched
//! ```
//!
//! Fail closed: when the agent is gone the kernel fails every exec of a governed job with
//! `ENOSYS`; `airlock govern` refuses to start a job when the agent does not take its
//! listener; an exec the agent cannot relay although it should is refused with `EPERM`.
//! Files: [`seccomp`] (the filter and listener), [`exec`] (what an exec asks for), [`relay`]
//! (the message relay), [`govern`] (the command's side).

pub mod discover;
pub mod exec;
pub mod govern;
mod relay;
pub mod seccomp;
#[cfg(test)]
mod tests_relay;

use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::{
            fs::{MetadataExt as _, PermissionsExt as _},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tracing::{info, warn};

use crate::{
    attribution::{Attribution, NameCache},
    config::StdioServer,
    mcp::session::SessionKey,
    pipeline::{ConnCtx, Pipeline, subject_of},
};
use exec::Exec;
use relay::Relay;
use seccomp::{Listener, Notification};

/// Largest executable hashed for the `open` record (larger ones are named, not hashed).
const MAX_HASHED_EXE: u64 = 256 * 1024 * 1024;
/// Most relays at once (each holds two threads and four pipe ends); a matching server past it
/// is refused (`EPERM`, counted), never run unrelayed.
pub const MAX_RELAYS: u64 = 512;
/// Conn ids of stdio relays start here (the network connections' count from 1).
const CONN_ID_BASE: u64 = 1 << 48;

/// `state_dir/govern.sock`: where `airlock govern` hands over its listener.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("govern.sock")
}

/// The agent's counters of governed jobs (one agent per process: a static, read by `airlock
/// status` and the metrics endpoint through [`counters`]).
#[derive(Debug)]
struct StdioCounters {
    jobs: AtomicU64,
    execs: AtomicU64,
    relayed: AtomicU64,
    live: AtomicU64,
    /// Execs refused because a relay could not be set up for a matching server (or the exec
    /// could not be read).
    refused: AtomicU64,
    /// stdio MCP server processes found running outside governed jobs.
    unmanaged: AtomicU64,
}

static COUNTERS: StdioCounters = StdioCounters {
    jobs: AtomicU64::new(0),
    execs: AtomicU64::new(0),
    relayed: AtomicU64::new(0),
    live: AtomicU64::new(0),
    refused: AtomicU64::new(0),
    unmanaged: AtomicU64::new(0),
};

/// `stdio_jobs`, `stdio_execs`, `stdio_relays`, `stdio_relays_live`, `stdio_execs_refused`,
/// `stdio_unmanaged`.
pub fn counters() -> std::collections::BTreeMap<String, u64> {
    let c = &COUNTERS;
    [
        ("stdio_jobs", &c.jobs),
        ("stdio_execs", &c.execs),
        ("stdio_relays", &c.relayed),
        ("stdio_relays_live", &c.live),
        ("stdio_execs_refused", &c.refused),
        ("stdio_unmanaged", &c.unmanaged),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.load(Ordering::Relaxed)))
    .collect()
}

/// Governed jobs and their stdio relays.
pub struct Stdio {
    pub pipeline: Arc<Pipeline>,
    pub names: Arc<NameCache>,
    pub servers: Vec<StdioServer>,
    pub max_line: usize,
    pub session_prefix: String,
    pub runtime: tokio::runtime::Handle,
    next: AtomicU64,
    /// Live relays by the inode of the server's stdin pipe (what a relayed process's fd 0 is).
    relays: Arc<Mutex<HashMap<u64, Arc<Relay>>>>,
}

impl Stdio {
    pub fn new(
        pipeline: Arc<Pipeline>,
        names: Arc<NameCache>,
        servers: Vec<StdioServer>,
        max_line: usize,
        session_prefix: String,
    ) -> Stdio {
        Stdio {
            pipeline,
            names,
            servers,
            max_line,
            session_prefix,
            runtime: tokio::runtime::Handle::current(),
            next: AtomicU64::new(1),
            relays: Default::default(),
        }
    }

    /// stdio MCP server processes on the host now, relayed or not (`airlock discover`).
    pub fn discover(&self) -> Vec<discover::Found> {
        let relays: std::collections::HashSet<u64> = self
            .relays
            .lock()
            .map(|r| r.keys().copied().collect())
            .unwrap_or_default();
        discover::scan(
            Path::new("/proc"),
            &self.servers,
            &relays,
            &self.names,
            std::process::id(),
        )
    }

    /// Bind `path` (root only, like the admin socket) and take jobs' listeners on a thread.
    pub fn serve(self: &Arc<Self>, path: &Path) -> io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let this = self.clone();
        std::thread::Builder::new()
            .name("airlock-govern".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    if let Err(e) = this.take_job(stream) {
                        warn!(error = %e, "a job's listener was not taken");
                    }
                }
            })?;
        Ok(())
    }

    /// One `airlock govern`: its request line and listener; answered `ok` once a thread
    /// supervises the job (the job's first exec waits for it).
    fn take_job(self: &Arc<Self>, stream: UnixStream) -> Result<(), String> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, sockopt::PeerCredentials};
        let reply = |mut s: &UnixStream, v: Value| {
            let _ = s.write_all(format!("{v}\n").as_bytes());
        };
        let peer = nix::sys::socket::getsockopt(&stream, PeerCredentials)
            .map_err(|e| format!("peer credentials: {e}"))?;
        if peer.uid() != 0 {
            reply(&stream, json!({"error": "only root may hand over a job"}));
            return Err(format!("uid {} tried to hand over a job", peer.uid()));
        }
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| format!("receive: {e}"))?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(|e| e.to_string())? {
            if let ControlMessageOwned::ScmRights(r) = c {
                // SAFETY: the kernel installed these descriptors for us.
                fds.extend(
                    r.into_iter()
                        .map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }),
                );
            }
        }
        let len = msg.bytes;
        let request: Value = serde_json::from_slice(&buf[..len]).unwrap_or(Value::Null);
        let name = request["name"].as_str().map(str::to_owned);
        let Some(fd) = fds.into_iter().next().filter(seccomp::is_listener) else {
            reply(
                &stream,
                json!({"error": "no seccomp listener came with the request"}),
            );
            return Err("a request without a seccomp listener".into());
        };
        let listener = Listener::new(fd).map_err(|e| e.to_string())?;
        let job = COUNTERS.jobs.fetch_add(1, Ordering::Relaxed) + 1;
        let this = self.clone();
        let label = name.clone();
        std::thread::Builder::new()
            .name(format!("airlock-job-{job}"))
            .spawn(move || this.supervise(&listener, label))
            .map_err(|e| e.to_string())?;
        info!(job, name = ?name, "supervising a governed job's execs");
        reply(&stream, json!({"ok": true, "job": job}));
        Ok(())
    }

    /// Answer the job's execs until no process of it is left.
    fn supervise(&self, listener: &Listener, job: Option<String>) {
        loop {
            match listener.recv(1000) {
                Ok(Some(n)) => self.on_exec(listener, n, job.as_deref()),
                Ok(None) => {}
                Err(e) => {
                    info!(job = ?job, reason = %e, "governed job over");
                    return;
                }
            }
        }
    }

    fn on_exec(&self, listener: &Listener, n: Notification, job: Option<&str>) {
        COUNTERS.execs.fetch_add(1, Ordering::Relaxed);
        let respond = |errno| {
            if let Err(e) = listener.respond(n.id, errno) {
                warn!(pid = n.pid, error = %e, "cannot answer an exec");
            }
        };
        // Fast path (most execs of a job): stdin is not a pipe or socket, so this is neither a
        // stdio server nor a relayed one's descendant; its memory is not read.
        if !exec::stdin_piped(n.pid) && listener.still_waiting(n.id) {
            return respond(None);
        }
        let exec = match Exec::read(&n) {
            Ok(e) => e,
            Err(e) => {
                if listener.still_waiting(n.id) {
                    // It waits, yet cannot be read: refuse rather than guess.
                    warn!(pid = n.pid, error = %e, "cannot read an exec of a governed job: refused");
                    COUNTERS.refused.fetch_add(1, Ordering::Relaxed);
                    respond(Some(libc::EPERM));
                }
                return;
            }
        };
        if !listener.still_waiting(n.id) {
            return;
        }
        let relayed = exec
            .stdin_pipe_inode()
            .and_then(|i| self.relays.lock().ok().and_then(|r| r.get(&i).cloned()));
        if let Some(relay) = relayed {
            // A relayed server (or what it starts) execs again: part of its session's record.
            self.record_exec(&relay, &exec);
            return respond(None);
        }
        let server = exec
            .stdio_is_piped()
            .then(|| {
                self.servers
                    .iter()
                    .find(|s| s.matches(&exec.path, &exec.argv))
            })
            .flatten();
        let Some(server) = server else {
            return respond(None);
        };
        match self.start_relay(listener, &n, &exec, server, job) {
            Ok(()) => respond(None),
            Err(e) => {
                warn!(pid = exec.tgid, server = %server.name, error = %e,
                      "cannot relay a stdio server: its exec is refused");
                COUNTERS.refused.fetch_add(1, Ordering::Relaxed);
                respond(Some(libc::EPERM));
            }
        }
    }

    /// Take the process's fds 0 and 1, put the relay's pipes in their place, record `open`,
    /// and start the relay's threads.
    fn start_relay(
        &self,
        listener: &Listener,
        n: &Notification,
        exec: &Exec,
        server: &StdioServer,
        job: Option<&str>,
    ) -> Result<(), String> {
        if COUNTERS.live.load(Ordering::Relaxed) >= MAX_RELAYS {
            return Err(format!("{MAX_RELAYS} stdio servers are relayed already"));
        }
        let pidfd = seccomp::pidfd_open(exec.tgid).map_err(|e| format!("pidfd_open: {e}"))?;
        let client_in = seccomp::pidfd_getfd(&pidfd, 0).map_err(|e| format!("take fd 0: {e}"))?;
        let client_out = seccomp::pidfd_getfd(&pidfd, 1).map_err(|e| format!("take fd 1: {e}"))?;
        let flags = nix::fcntl::OFlag::O_CLOEXEC;
        let (srv_in_r, srv_in_w) = nix::unistd::pipe2(flags).map_err(|e| e.to_string())?;
        let (srv_out_r, srv_out_w) = nix::unistd::pipe2(flags).map_err(|e| e.to_string())?;
        let inode = File::from(srv_in_r.try_clone().map_err(|e| e.to_string())?)
            .metadata()
            .map_err(|e| e.to_string())?
            .ino();

        let relay = Arc::new(self.relay_for(exec, server, client_out)?);
        self.record_open(&relay, exec, job)?;
        if !listener.still_waiting(n.id) {
            return Err("the process went away".into());
        }
        listener
            .set_fd(n.id, &srv_in_r, 0)
            .and_then(|()| listener.set_fd(n.id, &srv_out_w, 1))
            .map_err(|e| format!("install the relay's pipes: {e}"))?;
        drop((srv_in_r, srv_out_w));
        if let Ok(mut r) = self.relays.lock() {
            r.insert(inode, relay.clone());
        }
        COUNTERS.relayed.fetch_add(1, Ordering::Relaxed);
        COUNTERS.live.fetch_add(1, Ordering::Relaxed);
        info!(session = %relay.ctx.session_id, server = %server.name, pid = exec.tgid,
              path = %exec.path, "relaying a stdio MCP server");

        let remaining = Arc::new(AtomicU8::new(2));
        let (r1, left1, table1) = (relay.clone(), remaining.clone(), self.relays.clone());
        std::thread::Builder::new()
            .name("airlock-stdio-c2s".into())
            .spawn(move || {
                let end = r1.client_to_server(File::from(client_in), File::from(srv_in_w));
                finish_one(&table1, inode, &r1, &left1, end);
            })
            .map_err(|e| e.to_string())?;
        let (r2, left2, table2) = (relay, remaining, self.relays.clone());
        std::thread::Builder::new()
            .name("airlock-stdio-s2c".into())
            .spawn(move || {
                let end = r2.server_to_client(File::from(srv_out_r));
                // The server is done: the client sees the end of its output.
                r2.close_client();
                finish_one(&table2, inode, &r2, &left2, end);
            })
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The relay's context: the client (the process that started the server) as the caller,
    /// the server's pattern as the backend.
    fn relay_for(
        &self,
        exec: &Exec,
        server: &StdioServer,
        client_out: OwnedFd,
    ) -> Result<Relay, String> {
        let proc = Path::new("/proc");
        let attribution = Attribution::of_process(exec.ppid, proc, &self.names)
            .or_else(|| Attribution::of_process(exec.tgid, proc, &self.names))
            .ok_or("the process and its parent are gone")?;
        let subject = subject_of(&attribution, &self.names);
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let session_id = format!("{}-stdio-{n}", self.session_prefix);
        let ctx = ConnCtx::new(
            CONN_ID_BASE + n,
            session_id.clone(),
            attribution,
            subject,
            server.name.clone(),
            None,
            Arc::new(AtomicU64::new(0)),
        );
        Ok(Relay::new(
            self.pipeline.clone(),
            ctx,
            SessionKey {
                backend: server.name.clone(),
                id: session_id,
            },
            self.max_line,
            self.runtime.clone(),
            File::from(client_out),
        ))
    }

    /// The `open` record: the server as started (path, SHA-256, arguments, cwd, descriptors)
    /// and the chain of processes above it, masked like a message. Durable (strict) before
    /// the exec continues.
    fn record_open(&self, relay: &Relay, exec: &Exec, job: Option<&str>) -> Result<(), String> {
        let event = json!({
            "event": "open",
            "transport": "stdio",
            "job": job,
            "server": {
                "pid": exec.tgid,
                "path": exec.path,
                "sha256": sha256_of(exec),
                "argv": exec.argv,
                "argv_truncated": exec.argv_truncated,
                "cwd": exec.cwd,
                "stdin": exec.stdin,
                "stdout": exec.stdout,
            },
            "client_cmdline": relay.ctx.attribution.cmdline,
            "parents": parents(exec.ppid),
        });
        relay.record_connection(event)
    }

    fn record_exec(&self, relay: &Relay, exec: &Exec) {
        let event = json!({
            "event": "exec",
            "pid": exec.tgid,
            "path": exec.path,
            "argv": exec.argv,
            "argv_truncated": exec.argv_truncated,
        });
        if let Err(e) = relay.record_connection(event) {
            warn!(session = %relay.ctx.session_id, error = %e, "cannot record an exec");
        }
    }
}

/// How often the host is scanned for unmanaged stdio MCP servers.
const UNMANAGED_SCAN: Duration = Duration::from_secs(10);

/// Every [`UNMANAGED_SCAN`], an event for each stdio MCP server process not seen before that
/// is not relayed (`UnmanagedStdioServer`), and the count `stdio_unmanaged`.
pub async fn report_unmanaged(stdio: Arc<Stdio>) {
    let mut seen: std::collections::HashSet<(u32, u64)> = Default::default();
    loop {
        let s = stdio.clone();
        let found = tokio::task::spawn_blocking(move || s.discover())
            .await
            .unwrap_or_default();
        let now: std::collections::HashSet<(u32, u64)> =
            found.iter().map(|f| (f.pid, f.start)).collect();
        for f in found.into_iter().filter(|f| !f.relayed) {
            if seen.contains(&(f.pid, f.start)) {
                continue;
            }
            COUNTERS.unmanaged.fetch_add(1, Ordering::Relaxed);
            let Some(actor) = Attribution::of_process(f.pid, Path::new("/proc"), &stdio.names)
            else {
                continue;
            };
            warn!(pid = f.pid, server = %f.server, exe = ?f.exe, uid = f.uid,
                  "a stdio MCP server runs outside any governed job");
            crate::observe::event(crate::observe::AgentEvent::UnmanagedStdioServer {
                server: f.server,
                argv: f.argv,
                start: f.start,
                parent_exe: f.parent_exe,
                actor: Box::new(actor),
            });
        }
        seen = now;
        tokio::time::sleep(UNMANAGED_SCAN).await;
    }
}

/// SHA-256 of the file the exec names, read in the process's own root; `None` when it cannot
/// be read or is larger than [`MAX_HASHED_EXE`].
fn sha256_of(exec: &Exec) -> Option<String> {
    let path = format!("/proc/{}/root{}", exec.tid, exec.path);
    let mut f = File::open(path).ok()?;
    if f.metadata().ok()?.len() > MAX_HASHED_EXE {
        return None;
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Some(hex::encode(ctx.finish()))
}

/// The processes above `pid`, nearest first (at most 8): pid, name, executable.
fn parents(mut pid: u32) -> Vec<Value> {
    let mut out = Vec::new();
    while pid > 1 && out.len() < 8 {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            break;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        out.push(json!({"pid": pid, "name": field("Name:"), "exe": exe}));
        pid = field("PPid:").and_then(|p| p.parse().ok()).unwrap_or(0);
    }
    out
}

/// What each of a relay's two threads runs when it ends: the last one forgets the relay and
/// writes its `close` record.
fn finish_one(
    table: &Mutex<HashMap<u64, Arc<Relay>>>,
    inode: u64,
    relay: &Arc<Relay>,
    left: &AtomicU8,
    end: io::Result<()>,
) {
    if let Err(e) = end {
        relay.note_error(e.to_string());
    }
    if left.fetch_sub(1, Ordering::AcqRel) == 1 {
        if let Ok(mut r) = table.lock() {
            r.remove(&inode);
        }
        COUNTERS.live.fetch_sub(1, Ordering::Relaxed);
        relay.finish();
    }
}
