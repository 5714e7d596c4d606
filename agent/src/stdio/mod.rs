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
/// Live relays by the inode of the server's stdin pipe, with the inode of its stdout pipe.
type Relays = Arc<Mutex<HashMap<u64, (Arc<Relay>, u64)>>>;

/// Most relays one governed job may have at once (so one job cannot take them all).
pub const MAX_RELAYS_PER_JOB: u64 = 64;

/// One governed job, as its supervising thread knows it.
struct Job {
    name: Option<String>,
    /// Its relays now.
    relays: Arc<AtomicU64>,
}
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
    relays: Relays,
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
    fn supervise(&self, listener: &Listener, name: Option<String>) {
        let job = Job {
            name,
            relays: Default::default(),
        };
        loop {
            match listener.recv(1000) {
                Ok(Some(n)) => self.on_exec(listener, n, &job),
                Ok(None) => {}
                Err(e) => {
                    info!(job = ?job.name, reason = %e, "governed job over");
                    return;
                }
            }
        }
    }

    fn on_exec(&self, listener: &Listener, n: Notification, job: &Job) {
        COUNTERS.execs.fetch_add(1, Ordering::Relaxed);
        let respond = |errno| {
            if let Err(e) = listener.respond(n.id, errno) {
                warn!(pid = n.pid, error = %e, "cannot answer an exec");
            }
        };
        // Fast path (most execs of a job): stdin is /dev/null, so nothing can reach a server
        // this starts; its memory is not read.
        if exec::stdin_is_null(n.pid) && listener.still_waiting(n.id) {
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
        // Both ends a relay's: a relayed server (or what it starts) execs again, part of its
        // session's record. Only one of them: judged as a new exec (a server whose output
        // would bypass its relay is relayed on its own, or refused).
        let relayed = match (exec.stdin_inode, exec.stdout_inode) {
            (Some(i), Some(o)) => self.relays.lock().ok().and_then(|r| {
                r.get(&i)
                    .filter(|(_, out)| *out == o)
                    .map(|(r, _)| r.clone())
            }),
            _ => None,
        };
        if let Some(relay) = relayed {
            self.record_exec(&relay, &exec);
            return respond(None);
        }
        if exec.argv_truncated {
            warn!(
                pid = exec.tgid,
                "an exec with more arguments than the kernel allows read: refused"
            );
            COUNTERS.refused.fetch_add(1, Ordering::Relaxed);
            return respond(Some(libc::E2BIG));
        }
        let Some(server) = self
            .servers
            .iter()
            .find(|s| s.matches(&exec.path, &exec.argv))
        else {
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
    /// and start the relay's threads. Whatever fds 0 and 1 are (pipes, a FIFO, a terminal, a
    /// file): a matching server talks only to its relay.
    fn start_relay(
        &self,
        listener: &Listener,
        n: &Notification,
        exec: &Exec,
        server: &StdioServer,
        job: &Job,
    ) -> Result<(), String> {
        if COUNTERS.live.load(Ordering::Relaxed) >= MAX_RELAYS {
            return Err(format!("{MAX_RELAYS} stdio servers are relayed already"));
        }
        if job.relays.load(Ordering::Relaxed) >= MAX_RELAYS_PER_JOB {
            return Err(format!(
                "this job has {MAX_RELAYS_PER_JOB} stdio servers relayed already"
            ));
        }
        if exec.threads > 1 {
            // Another thread shares the descriptor table until the exec replaces the process:
            // it could put its own descriptors back after ours.
            return Err(format!(
                "the process has {} threads; a stdio server is relayed only from a \
                 single-threaded exec (fork, then exec)",
                exec.threads
            ));
        }
        let pidfd = seccomp::pidfd_open(exec.tgid).map_err(|e| format!("pidfd_open: {e}"))?;
        let client_in = seccomp::pidfd_getfd(&pidfd, 0).map_err(|e| format!("take fd 0: {e}"))?;
        let client_out = seccomp::pidfd_getfd(&pidfd, 1).map_err(|e| format!("take fd 1: {e}"))?;
        let flags = nix::fcntl::OFlag::O_CLOEXEC;
        let (srv_in_r, srv_in_w) = nix::unistd::pipe2(flags).map_err(|e| e.to_string())?;
        let (srv_out_r, srv_out_w) = nix::unistd::pipe2(flags).map_err(|e| e.to_string())?;
        let ino = |fd: &OwnedFd| -> Result<u64, String> {
            Ok(File::from(fd.try_clone().map_err(|e| e.to_string())?)
                .metadata()
                .map_err(|e| e.to_string())?
                .ino())
        };
        let (inode, out_inode) = (ino(&srv_in_r)?, ino(&srv_out_w)?);

        let relay = Arc::new(self.relay_for(exec, server, client_out)?);
        self.record_open(&relay, exec, job.name.as_deref())?;
        // From here on a failure ends the session it opened (a `close` naming why).
        let installed = if listener.still_waiting(n.id) {
            listener
                .set_fd(n.id, &srv_in_r, 0)
                .and_then(|()| listener.set_fd(n.id, &srv_out_w, 1))
                .map_err(|e| format!("install the relay's pipes: {e}"))
        } else {
            Err("the process went away".into())
        };
        if let Err(e) = installed {
            relay.note_error(e.clone());
            relay.finish();
            return Err(e);
        }
        drop((srv_in_r, srv_out_w));
        if let Ok(mut r) = self.relays.lock() {
            r.insert(inode, (relay.clone(), out_inode));
        }
        COUNTERS.relayed.fetch_add(1, Ordering::Relaxed);
        COUNTERS.live.fetch_add(1, Ordering::Relaxed);
        job.relays.fetch_add(1, Ordering::Relaxed);
        info!(session = %relay.ctx.session_id, server = %server.name, pid = exec.tgid,
              path = %exec.path, "relaying a stdio MCP server");

        let ends = Ends {
            table: self.relays.clone(),
            inode,
            job: job.relays.clone(),
            left: Arc::new(AtomicU8::new(2)),
        };
        let (r1, e1) = (relay.clone(), ends.clone());
        let c2s = std::thread::Builder::new()
            .name("airlock-stdio-c2s".into())
            .spawn(move || {
                let end = r1.client_to_server(File::from(client_in), File::from(srv_in_w));
                e1.finish_one(&r1, end);
            });
        let (r2, e2) = (relay.clone(), ends.clone());
        let c2s_started = c2s.is_ok();
        let s2c = c2s.and_then(|_| {
            std::thread::Builder::new()
                .name("airlock-stdio-s2c".into())
                .spawn(move || {
                    let end = r2.server_to_client(File::from(srv_out_r));
                    // The server is done: the client sees the end of its output, and the
                    // other direction stops waiting for the client.
                    r2.close_client();
                    e2.finish_one(&r2, end);
                })
        });
        if let Err(e) = s2c {
            // The process holds pipes nobody serves: its exec is refused, the session ends.
            relay.close_client();
            relay.note_error(format!("cannot start the relay: {e}"));
            if c2s_started {
                // The running direction stops waiting for the client and ends itself.
                relay.stop();
            } else {
                ends.finish_one(&relay, Ok(()));
            }
            ends.finish_one(&relay, Ok(()));
            return Err(e.to_string());
        }
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
        // The process itself, before its exec, is a fork of the client: its user, groups and
        // cgroup are the client's and cannot be changed by re-parenting. The parent names the
        // client better (its program, not `sh`) and is taken when it is the same user in the
        // same cgroup; a double fork that hands the server to init or a subreaper is not.
        let proc = Path::new("/proc");
        let own =
            Attribution::of_process(exec.tgid, proc, &self.names).ok_or("the process went away")?;
        let attribution = Attribution::of_process(exec.ppid, proc, &self.names)
            .filter(|p| p.uid == own.uid && p.gid == own.gid && p.cgroup == own.cgroup)
            .unwrap_or(own);
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
        Relay::new(
            self.pipeline.clone(),
            ctx,
            SessionKey {
                backend: server.name.clone(),
                id: session_id,
            },
            self.max_line,
            self.runtime.clone(),
            File::from(client_out),
        )
        .map_err(|e| format!("cannot make the relay's stop signal: {e}"))
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
            // No arguments in the event: they can carry secrets no detector knows
            // (`postgresql://u:PASSWORD@db`); `airlock discover` (root) shows them.
            crate::observe::event(crate::observe::AgentEvent::UnmanagedStdioServer {
                server: f.server,
                start: f.start,
                parent_exe: f.parent_exe,
                actor: Box::new(actor),
            });
        }
        seen = now;
        tokio::time::sleep(UNMANAGED_SCAN).await;
    }
}

/// SHA-256 of the file the exec names, opened in the process's own root (`openat2` with
/// `RESOLVE_IN_ROOT`: its symlinks resolve there, never in the agent's), without blocking
/// (`O_NONBLOCK`: a FIFO does not hang the job's thread), only when it is a regular file, and
/// at most [`MAX_HASHED_EXE`] bytes read. `None` otherwise.
fn sha256_of(exec: &Exec) -> Option<String> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let root = File::open(format!("/proc/{}/root", exec.tid)).ok()?;
    let path = std::ffi::CString::new(exec.path.trim_start_matches('/')).ok()?;
    // SAFETY: open_how is plain data; zeroed, then the fields we use are set.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid pointers for the call; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new descriptor we own.
    let mut f = unsafe { File::from_raw_fd(fd as i32) };
    let meta = f.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_HASHED_EXE {
        return None;
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > MAX_HASHED_EXE {
            return None;
        }
        ctx.update(&buf[..n]);
    }
    Some(hex::encode(ctx.finish()))
}

/// The processes above `pid`, nearest first (at most 8): pid, name, executable.
fn parents(mut pid: u32) -> Vec<Value> {
    let mut out = Vec::new();
    while pid > 1 && out.len() < 8 {
        let path = format!("/proc/{pid}/status");
        let Ok(status) = crate::attribution::ProcStatus::read(std::path::Path::new(&path)) else {
            break;
        };
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        out.push(json!({"pid": pid, "name": status.text("Name"), "exe": exe}));
        pid = status.number("PPid").unwrap_or(0);
    }
    out
}

/// What each of a relay's two threads runs when it ends: the last one forgets the relay,
/// gives back its place in the job's and the host's counts, and writes its `close` record.
#[derive(Clone)]
struct Ends {
    table: Relays,
    inode: u64,
    job: Arc<AtomicU64>,
    left: Arc<AtomicU8>,
}

impl Ends {
    fn finish_one(&self, relay: &Arc<Relay>, end: io::Result<()>) {
        if let Err(e) = end {
            relay.note_error(e.to_string());
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Ok(mut r) = self.table.lock() {
                r.remove(&self.inode);
            }
            COUNTERS.live.fetch_sub(1, Ordering::Relaxed);
            self.job.fetch_sub(1, Ordering::Relaxed);
            relay.finish();
        }
    }
}
