//! Bringing network namespaces (containers) in and letting them go: `netns.rs` makes a
//! namespace servable; this decides which ones, from where, and when they end.
//!
//! - at start, every namespace of a process in the attached cgroup (`scan`);
//! - a container runtime's hook (`airlock hook`, admin request `enroll`), before the
//!   container's process runs;
//! - the kernel's report of a `connect()` it refused for want of a listener there (the
//!   fallback: that first call fails with `EPERM`, the next ones are served);
//! - every 2 s, namespaces no process is in any more (for 5 s) are released.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::{
    attribution::Container,
    netns::{self, Netns},
    proxy::Proxy,
};

/// How often namespaces are checked for processes, and how long an empty one is kept.
const SWEEP: Duration = Duration::from_secs(2);
const GRACE: Duration = Duration::from_secs(5);
/// Processes looked at in one `/proc` scan.
const SCAN_LIMIT: usize = 1 << 20;

impl Proxy {
    /// Serve the network namespace of process `pid` (nothing to do for the agent's own, or
    /// one already served). Needs a tokio runtime context (the accept loops are spawned on
    /// it); blocks for the few milliseconds the namespace's thread takes to start.
    pub fn enroll(
        self: &Arc<Self>,
        pid: u32,
        source: &'static str,
        name: Option<String>,
    ) -> Result<Option<Arc<Netns>>, String> {
        let started = Instant::now();
        let _one_at_a_time = self
            .enrolling
            .lock()
            .map_err(|_| "enrolment lock poisoned".to_owned())?;
        let host =
            netns::host_inode().map_err(|e| format!("cannot read our own namespace: {e}"))?;
        let (inode, fd) = netns::open(pid)
            .map_err(|e| format!("cannot open the network namespace of pid {pid}: {e}"))?;
        if inode == host {
            return Ok(None);
        }
        if let Some(ns) = self.namespaces.lock().ok().and_then(|r| r.by_inode(inode)) {
            return Ok(Some(ns));
        }
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .map(str::to_owned)
            });
        if let Some(cg) = &cgroup
            && !netns::governed(cg, &self.cgroup, &self.cgroup_mount)
        {
            return Err(format!(
                "pid {pid} is not in the attached cgroup ({}): its namespace is not Airlock's to serve",
                self.cgroup.display()
            ));
        }
        let mut container = cgroup.as_deref().and_then(Container::from_cgroup);
        if let Some(c) = container.as_mut() {
            c.name = name;
        }
        let (ns, listeners) = netns::enter(
            fd,
            inode,
            self.config.listen_port,
            self.own.clone(),
            source,
            container,
        )
        .map_err(|e| format!("cannot listen in the network namespace of pid {pid}: {e}"))?;
        self.kernel
            .lock()
            .map_err(|_| "kernel lock poisoned".to_owned())?
            .set_netns(ns.cookie, true)
            .map_err(|e| e.to_string())?;
        let threads = self
            .threads
            .get()
            .cloned()
            .ok_or("the connection threads are not running yet")?;
        let mut tasks = Vec::new();
        for l in std::iter::once(listeners.v4).chain(listeners.v6) {
            let l = tokio::net::TcpListener::from_std(l)
                .map_err(|e| format!("cannot serve a namespace's listener: {e}"))?;
            let task = tokio::spawn(self.clone().accept_loop(l, threads.clone(), ns.cookie));
            tasks.push(task.abort_handle());
        }
        if let Ok(mut r) = self.namespaces.lock() {
            r.insert(ns.clone(), tasks);
        }
        netns::announce(&ns, started.elapsed());
        // Connections to backends opened in it before it was served (before the agent ran,
        // or before the programs were attached) are ended, as the host's are at start.
        if let Ok(map) = self.own.map_fd().try_clone_to_owned() {
            crate::refusals::sweep_in(self, &self.cgroup, &map, Some(&ns));
        }
        Ok(Some(ns))
    }

    /// Serve every namespace a process of the attached cgroup is in (at start).
    pub fn enroll_all(self: &Arc<Self>) -> usize {
        let Ok(host) = netns::host_inode() else {
            return 0;
        };
        let mut n = 0;
        for (inode, (pid, cgroup)) in netns::scan(SCAN_LIMIT) {
            if inode == host
                || !cgroup
                    .as_deref()
                    .is_some_and(|cg| netns::governed(cg, &self.cgroup, &self.cgroup_mount))
            {
                continue;
            }
            match self.enroll(pid, "scan", None) {
                Ok(Some(_)) => n += 1,
                Ok(None) => {}
                // The process may have gone meanwhile.
                Err(e) => warn!(pid, error = %e, "cannot serve a network namespace found at start"),
            }
        }
        n
    }

    /// Release the namespaces no process is in any more (run every `SWEEP`).
    pub async fn sweep_namespaces(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SWEEP).await;
            if self.namespaces.lock().map(|r| r.is_empty()).unwrap_or(true) {
                continue;
            }
            let alive = tokio::task::spawn_blocking(|| {
                netns::scan(SCAN_LIMIT)
                    .into_keys()
                    .collect::<std::collections::HashSet<u64>>()
            })
            .await
            .unwrap_or_default();
            let gone = match self.namespaces.lock() {
                Ok(mut r) => r.release_empty(&alive, GRACE),
                Err(_) => continue,
            };
            for ns in gone {
                if let Ok(mut k) = self.kernel.lock()
                    && let Err(e) = k.set_netns(ns.cookie, false)
                {
                    warn!(cookie = ns.cookie, error = %e, "cannot forget a released namespace in the kernel");
                }
                info!(
                    cookie = ns.cookie,
                    container = ns.container.as_ref().map(|c| c.id.as_str()).unwrap_or("-"),
                    "released a network namespace (no process left in it)"
                );
            }
        }
    }
}

/// Whether `path` names the agent's own network namespace file (for the hook).
pub fn is_host_namespace(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(path), netns::host_inode()) {
        (Ok(m), Ok(host)) => m.ino() == host,
        _ => false,
    }
}

/// The watcher for runtimes that run no hook (Docker, containerd): a new cgroup under the
/// attached one is watched (inotify) until a process appears in it, whose namespace is then
/// served. A runtime creates the container's cgroup and puts its init process there before
/// it execs the container's command, so this usually wins the race to the first call; when
/// it does not, that call is refused and recorded, and the next is served.
pub fn watch_cgroups(
    proxy: Arc<Proxy>,
    runtime: tokio::runtime::Handle,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let flags = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ONLYDIR;
    std::thread::Builder::new()
        .name("airlock-cgwatch".into())
        .spawn(move || {
            let _in_runtime = runtime.enter();
            let mut dirs: std::collections::HashMap<nix::sys::inotify::WatchDescriptor, std::path::PathBuf> =
                Default::default();
            let add = |dirs: &mut std::collections::HashMap<_, _>, dir: &Path| {
                if dirs.len() >= WATCH_LIMIT {
                    return;
                }
                if let Ok(wd) = inotify.add_watch(dir, flags) {
                    dirs.insert(wd, dir.to_owned());
                }
            };
            // The attached cgroup and everything below it now.
            let mut stack = vec![proxy.cgroup.clone()];
            while let Some(d) = stack.pop() {
                add(&mut dirs, &d);
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
            // New cgroups waiting for their first process.
            let mut pending: Vec<(std::path::PathBuf, Instant)> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut fds = [nix::poll::PollFd::new(
                    std::os::fd::AsFd::as_fd(&inotify),
                    nix::poll::PollFlags::POLLIN,
                )];
                let wait = if pending.is_empty() { 250u16 } else { 2 };
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(wait));
                if let Ok(events) = inotify.read_events() {
                    for ev in events {
                        let (Some(parent), Some(name)) = (dirs.get(&ev.wd).cloned(), ev.name) else {
                            continue;
                        };
                        let dir = parent.join(name);
                        add(&mut dirs, &dir);
                        pending.push((dir, Instant::now()));
                    }
                }
                // A runtime puts its own helper in the cgroup before the container's
                // namespaces exist: a cgroup stays watched until one of its processes is in
                // a namespace other than the host's (served then), or for `WATCH_PENDING`.
                pending.retain(|(dir, since)| {
                    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                        match proxy.enroll(pid, "cgroup watcher", None) {
                            Ok(Some(_)) => return false,
                            Ok(None) => {}
                            Err(e) => {
                                tracing::debug!(pid, error = %e, "a new cgroup's process could not be served");
                            }
                        }
                    }
                    since.elapsed() < WATCH_PENDING
                });
            }
        })
}

/// Cgroups watched at most (inotify watches are a per-user kernel resource).
const WATCH_LIMIT: usize = 8192;
/// How long a new cgroup is watched for its first process.
const WATCH_PENDING: Duration = Duration::from_secs(5);
