//! The kernel side, seen from the agent: load the programs, pin and attach them, keep the
//! backend address map in sync, look up redirected flows, read the counters, detach.
//!
//! Pins under `bpffs_dir` (default `/sys/fs/bpf/airlock`):
//! - `links/{connect4,connect6,sock_ops}`: the cgroup links. While they exist the programs stay
//!   attached, agent or no agent: connections to backends are redirected to a port nobody
//!   listens on and are refused (fail closed).
//! - `maps-v{ABI}/AIRLOCK_*`: the maps, so a restarted agent sees the same flows and targets.
//!
//! A restarting agent swaps its freshly loaded programs into the pinned links with
//! `BPF_LINK_UPDATE`, an atomic replacement: there is no moment without a program attached.

use std::{
    collections::HashSet,
    fs, io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use airlock_common::{
    ABI_VERSION, CONFIG_ENABLED, ConnMeta, Counter, FlowKey, PORT_WORDS, TargetKey, names, port_bit,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use tracing::{info, warn};

use crate::{config::ResolvedTarget, keys};

/// The compiled kernel programs (built by `build.rs` from `agent-ebpf`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/airlock-ebpf"));

const LINKS: [(&str, &str); 3] = [
    ("connect4", names::PROG_CONNECT4),
    ("connect6", names::PROG_CONNECT6),
    ("sock_ops", names::PROG_SOCK_OPS),
];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "cannot load the eBPF programs: {0}; Airlock needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and a kernel with cgroup sock_addr and sock_ops programs"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {0}; the agent binary is broken, rebuild it")]
    Missing(&'static str),
    #[error("cannot load program {name} (rejected by the kernel): {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "cannot open cgroup {path}: {source}; set `cgroup` in airlock.toml to a cgroup v2 directory"
    )]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach {name} to cgroup {cgroup}: {source}")]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("bpffs at {path}: {message}")]
    Bpffs { path: PathBuf, message: String },
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Loaded and attached programs plus handles on the maps the agent uses at run time.
pub struct Kernel {
    _ebpf: Ebpf,
    /// Links held by this process. In `block` mode they are also pinned and outlive us; in
    /// `bypass` mode they are not, so the programs detach when the agent exits.
    _links: Vec<FdLink>,
    targets: BpfHashMap<MapData, TargetKey, u32>,
    ports: Array<MapData, u64>,
    /// What `ports` holds, so a change writes only the words that differ.
    ports_shadow: Vec<u64>,
    /// An LRU hash in the kernel; aya reads it through its `HashMap`.
    flows: BpfHashMap<MapData, FlowKey, ConnMeta>,
    counters: PerCpuArray<MapData, u64>,
}

/// Settings for [`Kernel::start`].
pub struct KernelSetup<'a> {
    pub bpffs_dir: &'a Path,
    pub cgroup: &'a Path,
    pub listen_port: u16,
    /// Pin the links (fail closed when the agent is down) or not (bypass).
    pub pin_links: bool,
}

impl Kernel {
    /// Load the programs against the pinned maps (creating them on first start), write the
    /// configuration, then attach: swap into pinned links if there are some, else attach anew.
    /// `targets` is written before the programs can see any traffic.
    pub fn start(
        setup: &KernelSetup<'_>,
        targets: &[ResolvedTarget],
    ) -> Result<(Kernel, OwnSockets), KernelError> {
        ensure_bpffs(setup.bpffs_dir)?;
        let maps_dir = maps_dir(setup.bpffs_dir);
        let links_dir = setup.bpffs_dir.join("links");
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(|e| KernelError::Bpffs {
                path: dir.clone(),
                message: format!("cannot create: {e}"),
            })?;
        }
        let mut loader = EbpfLoader::new();
        let pin_paths: Vec<(&'static str, PathBuf)> =
            names::MAPS.iter().map(|n| (*n, maps_dir.join(n))).collect();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(KernelError::Load)?;

        // Configuration first, then the targets: the programs pass everything through until
        // `enabled` is set, and are attached only after both are written.
        let mut config: Array<MapData, airlock_common::Config> =
            take_map(&mut ebpf, names::CONFIG)?;
        let cfg = airlock_common::Config {
            agent_ip4: keys::kernel_ip4(Ipv4Addr::LOCALHOST),
            agent_ip6: keys::kernel_ip6(Ipv6Addr::LOCALHOST),
            agent_port: setup.listen_port,
            _pad: 0,
            enabled: CONFIG_ENABLED,
        };
        config.set(0, cfg, 0).map_err(|source| KernelError::Map {
            map: names::CONFIG,
            source,
        })?;
        let targets_map = take_map(&mut ebpf, names::TARGETS)?;
        let ports: Array<MapData, u64> = take_map(&mut ebpf, names::PORTS)?;
        // The map may be a pinned one from a previous agent: start from what it holds.
        let ports_shadow = (0..PORT_WORDS)
            .map(|i| ports.get(&i, 0).unwrap_or(0))
            .collect();
        // The map object stays with the programs (its fd must outlive their loading); the
        // agent tags sockets through a duplicate of the fd.
        let own =
            match ebpf.map(names::OWN) {
                Some(aya::maps::Map::SkStorage(data)) => OwnSockets {
                    map: data.fd().as_fd().try_clone_to_owned().map_err(|e| {
                        KernelError::Bpffs {
                            path: maps_dir.join(names::OWN),
                            message: format!("cannot duplicate the map fd: {e}"),
                        }
                    })?,
                },
                _ => return Err(KernelError::Missing(names::OWN)),
            };
        let flows = take_map(&mut ebpf, names::FLOWS)?;
        let counters = take_map(&mut ebpf, names::COUNTERS)?;
        let mut kernel = Kernel {
            _ebpf: ebpf,
            _links: Vec::new(),
            targets: targets_map,
            ports,
            ports_shadow,
            flows,
            counters,
        };
        kernel.set_targets(targets)?;

        let cgroup = fs::File::open(setup.cgroup).map_err(|source| KernelError::Cgroup {
            path: setup.cgroup.to_owned(),
            source,
        })?;
        // Load (verify) all three programs before touching any hook, so a rejected program
        // never leaves a half-attached redirect behind.
        let mut prog_fds = Vec::with_capacity(LINKS.len());
        for (_, prog_name) in LINKS {
            prog_fds.push(kernel.load_program(prog_name)?);
        }
        let fresh = !is_pinned(setup.bpffs_dir);
        for ((link_name, prog_name), prog_fd) in LINKS.into_iter().zip(&prog_fds) {
            match kernel.attach_one(link_name, prog_name, prog_fd, &links_dir, &cgroup, setup) {
                Ok(link) => kernel._links.push(link),
                Err(e) => {
                    if fresh {
                        // Undo a partial first attach: no redirect without its hand-off.
                        kernel._links.clear();
                        remove_pins(setup.bpffs_dir);
                    }
                    return Err(e);
                }
            }
        }
        if !setup.pin_links {
            // Bypass mode keeps nothing in bpffs: when the agent goes, everything goes.
            remove_pins(setup.bpffs_dir);
        }
        remove_old_maps(setup.bpffs_dir);
        Ok((kernel, own))
    }

    /// Load one program into the kernel (the verifier runs here) and return a duplicate of its
    /// fd, for a possible `BPF_LINK_UPDATE`.
    fn load_program(&mut self, prog_name: &'static str) -> Result<OwnedFd, KernelError> {
        let program = self
            ._ebpf
            .program_mut(prog_name)
            .ok_or(KernelError::Missing(prog_name))?;
        let program_err = |source| KernelError::Program {
            name: prog_name,
            source,
        };
        let dup_err = |e: io::Error| KernelError::Bpffs {
            path: PathBuf::from(prog_name),
            message: format!("cannot duplicate the program fd: {e}"),
        };
        if prog_name == names::PROG_SOCK_OPS {
            let p: &mut SockOps = program.try_into().map_err(program_err)?;
            p.load().map_err(program_err)?;
            p.fd()
                .map_err(program_err)?
                .as_fd()
                .try_clone_to_owned()
                .map_err(dup_err)
        } else {
            let p: &mut CgroupSockAddr = program.try_into().map_err(program_err)?;
            p.load().map_err(program_err)?;
            p.fd()
                .map_err(program_err)?
                .as_fd()
                .try_clone_to_owned()
                .map_err(dup_err)
        }
    }

    fn attach_one(
        &mut self,
        link_name: &'static str,
        prog_name: &'static str,
        prog_fd: &OwnedFd,
        links_dir: &Path,
        cgroup: &fs::File,
        setup: &KernelSetup<'_>,
    ) -> Result<FdLink, KernelError> {
        let pin = links_dir.join(link_name);
        if pin.exists() {
            // A previous agent left the link pinned: swap our program in atomically.
            let link_fd = sys::obj_get(&pin).map_err(bpffs_io(&pin))?;
            sys::link_update(link_fd.as_fd(), prog_fd.as_fd()).map_err(|e| KernelError::Bpffs {
                path: pin.clone(),
                message: format!("cannot replace the program of the pinned link: {e}; run `airlock detach` and start again"),
            })?;
            info!(link = link_name, "took over pinned link");
            let pinned = PinnedLink::from_pin(&pin).map_err(|e| KernelError::Bpffs {
                path: pin.clone(),
                message: e.to_string(),
            })?;
            return Ok(pinned.into());
        }

        let program = self
            ._ebpf
            .program_mut(prog_name)
            .ok_or(KernelError::Missing(prog_name))?;
        let program_err = |source| KernelError::Program {
            name: prog_name,
            source,
        };
        let attach_err = |source| KernelError::Attach {
            name: prog_name,
            cgroup: setup.cgroup.to_owned(),
            source,
        };
        // On kernels >= 5.7 aya attaches cgroup programs with bpf_link (implicitly
        // multi-attach, so other tools' programs on the same cgroup keep working).
        let not_a_link = |e: aya::programs::links::LinkError| KernelError::Bpffs {
            path: pin.clone(),
            message: format!("{prog_name} was not attached with a bpf_link: {e}"),
        };
        let link: FdLink = if prog_name == names::PROG_SOCK_OPS {
            let p: &mut SockOps = program.try_into().map_err(program_err)?;
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            p.take_link(id)
                .map_err(attach_err)?
                .try_into()
                .map_err(not_a_link)?
        } else {
            let p: &mut CgroupSockAddr = program.try_into().map_err(program_err)?;
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            p.take_link(id)
                .map_err(attach_err)?
                .try_into()
                .map_err(not_a_link)?
        };
        info!(link = link_name, cgroup = %setup.cgroup.display(), "attached");
        if !setup.pin_links {
            return Ok(link);
        }
        let pinned = link.pin(&pin).map_err(|e| KernelError::Bpffs {
            path: pin.clone(),
            message: format!("cannot pin: {e}"),
        })?;
        Ok(pinned.into())
    }

    /// Make `AIRLOCK_TARGETS` (and the port bitmap gating it) equal to `targets`. New entries
    /// go in before stale ones come out, so an address present before and after is never
    /// missing.
    pub fn set_targets(&mut self, targets: &[ResolvedTarget]) -> Result<(), KernelError> {
        let wanted: HashSet<TargetKey> = targets.iter().map(|t| keys::target_key(t.addr)).collect();
        let mut bitmap = vec![0u64; PORT_WORDS as usize];
        for t in targets {
            let (word, bit) = port_bit(t.addr.port());
            bitmap[word as usize] |= bit;
        }
        let map_err = |map, source| KernelError::Map { map, source };
        for t in targets {
            self.targets
                .insert(keys::target_key(t.addr), t.backend_id, 0)
                .map_err(|e| map_err(names::TARGETS, e))?;
        }
        // Set bits first (union of old and new), clear the unused ones after the removals.
        for (i, (old, new)) in self.ports_shadow.clone().iter().zip(&bitmap).enumerate() {
            if old | new != *old {
                self.ports
                    .set(i as u32, old | new, 0)
                    .map_err(|e| map_err(names::PORTS, e))?;
                self.ports_shadow[i] = old | new;
            }
        }
        let stale: Vec<TargetKey> = self
            .targets
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            // Gone already is fine: the goal is absence.
            let _ = self.targets.remove(&key);
        }
        for (i, new) in bitmap.iter().enumerate() {
            if self.ports_shadow[i] != *new {
                self.ports
                    .set(i as u32, *new, 0)
                    .map_err(|e| map_err(names::PORTS, e))?;
                self.ports_shadow[i] = *new;
            }
        }
        Ok(())
    }

    /// Take the kernel's record of an accepted connection (it is removed: one accept, one use).
    pub fn take_flow(&mut self, key: &FlowKey) -> Option<ConnMeta> {
        let meta = self.flows.get(key, 0).ok()?;
        let _ = self.flows.remove(key);
        Some(meta)
    }

    /// The kernel counters, summed over CPUs, by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|c| {
                let total = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (c.name(), total)
            })
            .collect()
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::Missing(name))?;
    T::try_from(map).map_err(|source| KernelError::Map { map: name, source })
}

fn bpffs_io(path: &Path) -> impl Fn(io::Error) -> KernelError + '_ {
    move |e| KernelError::Bpffs {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn maps_dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join(format!("maps-v{ABI_VERSION}"))
}

/// Maps pinned by an agent of an older map layout: no program uses them once the links run
/// this agent's programs.
fn remove_old_maps(bpffs_dir: &Path) {
    for old in 1..ABI_VERSION {
        let dir = bpffs_dir.join(format!("maps-v{old}"));
        if let Ok(entries) = fs::read_dir(&dir) {
            for pin in entries.flatten() {
                let _ = fs::remove_file(pin.path());
            }
            if fs::remove_dir(&dir).is_ok() {
                info!(dir = %dir.display(), "removed the maps of an older agent");
            }
        }
    }
}

/// The agent's handle on `AIRLOCK_OWN`: it tags each of its own upstream sockets before
/// connecting, and the connect programs let tagged sockets through. The tag lives in the
/// socket (socket storage) and goes with it; only holders of the map (root) can write it.
pub struct OwnSockets {
    map: OwnedFd,
}

impl OwnSockets {
    /// Tag `socket` as the agent's own (before its `connect()`).
    pub fn tag(&self, socket: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        sys::sk_storage_set(self.map.as_fd(), socket, 1)
    }
}

/// Whether pinned links exist, i.e. the programs are attached and fail closed.
pub fn is_pinned(bpffs_dir: &Path) -> bool {
    LINKS
        .iter()
        .any(|(l, _)| bpffs_dir.join("links").join(l).exists())
}

/// Detach everything Airlock pinned under `bpffs_dir` and remove the pins: connections go
/// directly to their destination again. Links are detached with `BPF_LINK_DETACH` first, so
/// this works even while another process still holds a link.
pub fn detach(bpffs_dir: &Path) -> io::Result<Vec<String>> {
    let mut done = Vec::new();
    for (link, _) in LINKS {
        let pin = bpffs_dir.join("links").join(link);
        if !pin.exists() {
            continue;
        }
        match sys::obj_get(&pin) {
            Ok(fd) => {
                if let Err(e) = sys::link_detach(fd.as_fd()) {
                    warn!(link, error = %e, "BPF_LINK_DETACH failed; removing the pin still releases it");
                }
            }
            Err(e) => warn!(link, error = %e, "cannot open pinned link"),
        }
        fs::remove_file(&pin)?;
        done.push(format!("detached {link}"));
    }
    remove_pins(bpffs_dir);
    Ok(done)
}

/// Remove map and link pins (best effort) and the directories.
fn remove_pins(bpffs_dir: &Path) {
    let Ok(entries) = fs::read_dir(bpffs_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Ok(inner) = fs::read_dir(&path) {
                for pin in inner.flatten() {
                    let _ = fs::remove_file(pin.path());
                }
            }
            let _ = fs::remove_dir(&path);
        }
    }
    let _ = fs::remove_dir(bpffs_dir);
}

/// Make sure a bpffs is mounted at or above `dir` (mount one on /sys/fs/bpf if not).
fn ensure_bpffs(dir: &Path) -> Result<(), KernelError> {
    let mounts = fs::read_to_string("/proc/self/mounts")
        .map_err(bpffs_io(Path::new("/proc/self/mounts")))?;
    let mounted = mounts.lines().any(|line| {
        let mut f = line.split_whitespace();
        let (_, mount_point, fstype) = (f.next(), f.next(), f.next());
        fstype == Some("bpf") && mount_point.is_some_and(|m| dir.starts_with(m))
    });
    if mounted {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    fs::create_dir_all(root).map_err(bpffs_io(root))?;
    nix::mount::mount(
        Some("bpffs"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| KernelError::Bpffs {
        path: root.to_owned(),
        message: format!("no bpffs mounted and mounting one failed: {e}"),
    })?;
    info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

/// The `bpf()` commands aya 0.14 does not expose (cgroup links; a socket storage write that
/// needs no lock on the map object).
mod sys {
    use super::*;
    use aya_obj::generated::{bpf_attr, bpf_cmd};
    use std::{ffi::CString, os::unix::ffi::OsStrExt as _};

    fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
        // SAFETY: `attr` is a valid, zero-initialised bpf_attr of the size we pass; the
        // kernel reads (and for some commands writes) only within it.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd as libc::c_long,
                attr as *mut bpf_attr,
                std::mem::size_of::<bpf_attr>(),
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    /// Open a pinned object (`BPF_OBJ_GET`).
    pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: bpf_attr is plain data; all-zero is its documented initial state.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.__bindgen_anon_4.pathname = c_path.as_ptr() as u64;
        let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
        // SAFETY: on success the kernel returned a new file descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Atomically replace the program of a link (`BPF_LINK_UPDATE`).
    pub fn link_update(
        link: std::os::fd::BorrowedFd<'_>,
        prog: std::os::fd::BorrowedFd<'_>,
    ) -> io::Result<()> {
        // SAFETY: as above.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.link_update.link_fd = link.as_raw_fd() as u32;
        attr.link_update.__bindgen_anon_1.new_prog_fd = prog.as_raw_fd() as u32;
        bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
    }

    /// Set a socket storage value from userspace (`BPF_MAP_UPDATE_ELEM`, the socket's fd as
    /// the key).
    pub fn sk_storage_set(
        map: std::os::fd::BorrowedFd<'_>,
        socket: std::os::fd::BorrowedFd<'_>,
        value: u32,
    ) -> io::Result<()> {
        let key: i32 = socket.as_raw_fd();
        // SAFETY: as above; `key` and `value` outlive the call.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.__bindgen_anon_2.map_fd = map.as_raw_fd() as u32;
        attr.__bindgen_anon_2.key = (&raw const key) as u64;
        attr.__bindgen_anon_2.__bindgen_anon_1.value = (&raw const value) as u64;
        attr.__bindgen_anon_2.flags = 0;
        bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }

    /// Detach a link from its hook whoever else holds it (`BPF_LINK_DETACH`).
    pub fn link_detach(link: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: as above.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.link_detach.link_fd = link.as_raw_fd() as u32;
        bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr).map(drop)
    }
}
