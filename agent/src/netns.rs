//! One agent, every network namespace (containers): the agent listens *inside* each
//! namespace that holds processes of the attached cgroup, as Istio ambient's ztunnel does for
//! pods, and dials their backends from there.
//!
//! Enrolling a namespace: a thread of its own (`airlock-ns-<n>`) `setns`es into it once and
//! stays there: it brings `lo` up, creates the listeners (127.0.0.1 and, where IPv6 is on,
//! [::1] at `listen_port`, tagged as the agent's own before `bind`, which the kernel's bind
//! program requires there), and afterwards creates the upstream sockets of that namespace's
//! connections on request. Sockets keep their namespace for life, so the listeners are served
//! by the normal accept loops and connection threads. The namespace's cookie goes into
//! `AIRLOCK_NETNS`: from then on its `connect()`s to backends are redirected to its own
//! loopback, where the agent listens; before, they are refused (`EPERM`) and reported, which
//! enrols it (the fallback when no runtime hook did).
//!
//! A namespace is found three ways: scanning `/proc` at start, the container runtimes' hooks
//! (`airlock hook`, over the admin socket, before the container's process runs), and the
//! kernel's report of a refused `connect()`. It is released when no process is left in it.

use std::{
    collections::HashMap,
    fs, io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::kernel::OwnSockets;

/// An enrolled network namespace.
pub struct Netns {
    /// `bpf_get_netns_cookie` of the namespace.
    pub cookie: u64,
    /// The inode of `/proc/<pid>/ns/net`: how `/proc` names it.
    pub inode: u64,
    /// How it was found: `scan`, `hook`, `refused connect`.
    pub source: &'static str,
    pub enrolled_at: std::time::SystemTime,
    /// The container it belongs to, when its cgroup says so.
    pub container: Option<crate::attribution::Container>,
    /// Asks the namespace's thread for sockets (dropping it ends the thread).
    maker: Mutex<mpsc::Sender<Request>>,
}

/// What a namespace's thread is asked to do.
enum Request {
    /// A TCP socket of this family (`AF_INET`/`AF_INET6`), created in the namespace.
    Socket(libc::c_int, mpsc::Sender<io::Result<OwnedFd>>),
    /// Work that must happen inside the namespace (sock_diag: its sockets are its own).
    Run(Box<dyn FnOnce() + Send>),
}

/// The listeners made for a namespace (IPv6 may be off there).
pub struct Listeners {
    pub v4: std::net::TcpListener,
    pub v6: Option<std::net::TcpListener>,
}

impl Netns {
    /// A TCP socket for `addr`'s family in this namespace.
    pub fn socket(&self, addr: SocketAddr) -> io::Result<OwnedFd> {
        let family = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let (tx, rx) = mpsc::channel();
        self.maker
            .lock()
            .map_err(|_| io::Error::other("namespace thread poisoned"))?
            .send(Request::Socket(family, tx))
            .map_err(|_| io::Error::other("the namespace's thread is gone (namespace released)"))?;
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| io::Error::other("the namespace's thread did not answer"))?
    }
}

impl Netns {
    /// Run `work` on the namespace's thread (inside the namespace) and return its result.
    pub fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = mpsc::channel();
        self.maker
            .lock()
            .map_err(|_| io::Error::other("namespace thread poisoned"))?
            .send(Request::Run(Box::new(move || {
                let _ = tx.send(work());
            })))
            .map_err(|_| io::Error::other("the namespace's thread is gone (namespace released)"))?;
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| io::Error::other("the namespace's thread did not answer"))
    }
}

/// Open the network namespace of process `pid` (its inode and an fd on it).
pub fn open(pid: u32) -> io::Result<(u64, OwnedFd)> {
    let path = format!("/proc/{pid}/ns/net");
    let file = fs::File::open(&path)?;
    let inode = file.metadata()?.ino();
    Ok((inode, OwnedFd::from(file)))
}

/// The inode of the agent's own network namespace.
pub fn host_inode() -> io::Result<u64> {
    Ok(fs::metadata("/proc/self/ns/net")?.ino())
}

/// Make the namespace behind `fd` servable: its thread, `lo` up, the listeners. Returns the
/// namespace (cookie known) and its listeners.
pub fn enter(
    fd: OwnedFd,
    inode: u64,
    port: u16,
    own: Arc<OwnSockets>,
    source: &'static str,
    container: Option<crate::attribution::Container>,
) -> io::Result<(Arc<Netns>, Listeners)> {
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<(Listeners, u64)>>();
    let (tx, rx) = mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name(format!("airlock-ns-{inode}"))
        .stack_size(128 * 1024)
        .spawn(move || {
            // This thread never leaves the namespace: it is its own for its whole life.
            // SAFETY: setns on a namespace fd we own; affects only this thread.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = ready_tx.send(Err(io::Error::last_os_error()));
                return;
            }
            drop(fd);
            let made = loopback_up().and_then(|()| listeners(port, &own));
            let ok = made.is_ok();
            let _ = ready_tx.send(made);
            if !ok {
                return;
            }
            while let Ok(req) = rx.recv() {
                match req {
                    Request::Socket(family, reply) => {
                        let _ = reply.send(tcp_socket(family));
                    }
                    Request::Run(work) => work(),
                }
            }
        })?;
    let (listeners, cookie) = ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| io::Error::other("the namespace's thread did not start"))??;
    Ok((
        Arc::new(Netns {
            cookie,
            inode,
            source,
            enrolled_at: std::time::SystemTime::now(),
            container,
            maker: Mutex::new(tx),
        }),
        listeners,
    ))
}

fn tcp_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The agent's listeners of this (the calling thread's) namespace, tagged as the agent's own
/// before `bind`, and the namespace's cookie.
fn listeners(port: u16, own: &OwnSockets) -> io::Result<(Listeners, u64)> {
    let listen = |addr: SocketAddr| -> io::Result<std::net::TcpListener> {
        let domain = if addr.is_ipv4() {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        own.tag(s.as_fd())?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        Ok(s.into())
    };
    let v4 = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    // IPv6 may be disabled in a container's namespace: IPv4 is enough to serve it.
    let v6 = match listen(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(error = %e, "no IPv6 listener in this network namespace");
            None
        }
    };
    let cookie = crate::keys::netns_cookie(v4.as_fd())?;
    Ok((Listeners { v4, v6 }, cookie))
}

/// Bring `lo` up in this thread's namespace (a new namespace starts with it down).
fn loopback_up() -> io::Result<()> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: a valid ifreq for the two ioctls.
    unsafe {
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) != 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = req.ifr_ifru.ifru_flags;
        if flags & libc::IFF_UP as libc::c_short == 0 {
            req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
            if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &raw mut req) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The namespaces the agent serves, by cookie and by inode.
#[derive(Default)]
pub struct Registry {
    by_cookie: HashMap<u64, Entry>,
    /// inode → cookie.
    by_inode: HashMap<u64, u64>,
}

struct Entry {
    ns: Arc<Netns>,
    /// The accept loops of its listeners (aborted on release).
    tasks: Vec<tokio::task::AbortHandle>,
    /// When a process was last seen in it.
    seen: Instant,
}

impl Registry {
    pub fn get(&self, cookie: u64) -> Option<Arc<Netns>> {
        self.by_cookie.get(&cookie).map(|e| e.ns.clone())
    }

    pub fn has_inode(&self, inode: u64) -> bool {
        self.by_inode.contains_key(&inode)
    }

    pub fn by_inode(&self, inode: u64) -> Option<Arc<Netns>> {
        self.by_inode.get(&inode).and_then(|c| self.get(*c))
    }

    pub fn insert(&mut self, ns: Arc<Netns>, tasks: Vec<tokio::task::AbortHandle>) {
        self.by_inode.insert(ns.inode, ns.cookie);
        self.by_cookie.insert(
            ns.cookie,
            Entry {
                ns,
                tasks,
                seen: Instant::now(),
            },
        );
    }

    pub fn list(&self) -> Vec<Arc<Netns>> {
        self.by_cookie.values().map(|e| e.ns.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.by_cookie.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_cookie.is_empty()
    }

    /// Namespaces no process is in any more (given the inodes that have processes), after a
    /// grace period: taken out (their accept loops stopped) and returned.
    pub fn release_empty(
        &mut self,
        alive: &std::collections::HashSet<u64>,
        grace: Duration,
    ) -> Vec<Arc<Netns>> {
        let now = Instant::now();
        let mut gone = Vec::new();
        for e in self.by_cookie.values_mut() {
            if alive.contains(&e.ns.inode) {
                e.seen = now;
            }
        }
        let empty: Vec<u64> = self
            .by_cookie
            .iter()
            .filter(|(_, e)| now.duration_since(e.seen) >= grace)
            .map(|(c, _)| *c)
            .collect();
        for cookie in empty {
            if let Some(e) = self.by_cookie.remove(&cookie) {
                self.by_inode.remove(&e.ns.inode);
                for t in &e.tasks {
                    t.abort();
                }
                gone.push(e.ns);
            }
        }
        gone
    }
}

/// Every process's network namespace inode (`/proc/*/ns/net`), with the pid of one process
/// in it and that process's cgroup v2 path. Bounded by `limit` processes.
pub fn scan(limit: usize) -> HashMap<u64, (u32, Option<String>)> {
    let mut out = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten().take(limit) {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(meta) = fs::metadata(e.path().join("ns/net")) else {
            continue;
        };
        out.entry(meta.ino()).or_insert_with(|| {
            let cgroup = fs::read_to_string(e.path().join("cgroup"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("0::"))
                        .map(str::to_owned)
                });
            (pid, cgroup)
        });
    }
    out
}

/// Whether cgroup path `cgroup` (as `/proc/<pid>/cgroup` gives it, relative to the cgroup2
/// mount) is `attached` or below it.
pub fn governed(cgroup: &str, attached: &Path, mount: &Path) -> bool {
    let full = mount.join(cgroup.trim_start_matches('/'));
    full.starts_with(attached)
}

/// Log an enrolment.
pub fn announce(ns: &Netns, elapsed: Duration) {
    info!(
        cookie = ns.cookie,
        inode = ns.inode,
        source = ns.source,
        container = ns.container.as_ref().map(|c| c.id.as_str()).unwrap_or("-"),
        elapsed_us = elapsed.as_micros() as u64,
        "serving a network namespace"
    );
}
