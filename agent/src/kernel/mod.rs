//! The kernel side, seen from the agent: load the programs, pin and attach them, keep the
//! backend address map in sync, look up redirected flows, read the counters, detach.
//!
//! Pins under `bpffs_dir` (default `/sys/fs/bpf/airlock`):
//! - `links/{connect4,connect6,sock_ops,egress,socket_create,setsockopt}`: the cgroup links.
//!   While they exist the programs stay attached, agent or no agent: connections to backends
//!   are redirected to a port nobody listens on and are refused, and the guards keep refusing
//!   raw and packet sockets and unredirected TCP to backends (fail closed).
//! - `maps-v{ABI}/AIRLOCK_*`: the maps, so a restarted agent sees the same flows and targets.
//!
//! A restarting agent swaps its freshly loaded programs into the pinned links with
//! `BPF_LINK_UPDATE`, an atomic replacement: there is no moment without a program attached.

use std::{
    collections::HashSet,
    fs, io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use airlock_common::{
    ABI_VERSION, CONFIG_ENABLED, ConnMeta, Counter, FlowKey, LOCAL_TARGETS_PER_PORT, LocalTargets,
    PORT_WORDS, TargetKey, names, port_bit,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::links::FdLink,
};
use tracing::{info, warn};

use crate::{config::ResolvedTarget, keys};

/// The compiled kernel programs (built by `build.rs` from `agent-ebpf`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/airlock-ebpf"));

/// Pinned link name, program name: the cgroup links. The packet guard's tcx links, one per
/// interface, are `links/tc-<ifindex>` (`packet_guard.rs`).
const LINKS: [(&str, &str); 8] = [
    ("connect4", names::PROG_CONNECT4),
    ("connect6", names::PROG_CONNECT6),
    ("bind4", names::PROG_BIND4),
    ("bind6", names::PROG_BIND6),
    ("sock_ops", names::PROG_SOCK_OPS),
    ("egress", names::PROG_EGRESS),
    ("socket_create", names::PROG_SOCKET_CREATE),
    ("setsockopt", names::PROG_SETSOCKOPT),
];

/// The socket guard's programs: without them the operator chose (`socket_guard`) between
/// refusing to start and a warning.
fn socket_guard_program(prog_name: &str) -> bool {
    matches!(
        prog_name,
        names::PROG_SOCKET_CREATE | names::PROG_SETSOCKOPT
    )
}

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
    #[error("cannot attach the packet guard (tcx egress) to interface {interface}: {source}")]
    AttachInterface {
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("bpffs at {path}: {message}")]
    Bpffs { path: PathBuf, message: String },
    #[error(
        "the socket guard cannot run: {0}; a process with CAP_NET_RAW could reach a backend with raw or packet sockets. It needs cgroup sock_create/setsockopt programs and tcx (Linux 6.6); set `socket_guard = \"warn\"` in airlock.toml to run without it"
    )]
    SocketGuard(String),
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
    /// Unpinned links aya cannot wrap (bypass mode's sockopt link).
    _raw_links: Vec<OwnedFd>,
    targets: BpfHashMap<MapData, TargetKey, u32>,
    ports: Array<MapData, u64>,
    /// What `ports` holds, so a change writes only the words that differ.
    ports_shadow: Vec<u64>,
    /// An LRU hash in the kernel; aya reads it through its `HashMap`.
    flows: BpfHashMap<MapData, FlowKey, ConnMeta>,
    counters: PerCpuArray<MapData, u64>,
    local: LpmTrie<MapData, [u32; 4], u32>,
    local_targets: BpfHashMap<MapData, u32, LocalTargets>,
    /// What `local` holds now, and the targets last set (to recompute the local ones).
    local_addrs: LocalAddrs,
    targets_now: Vec<ResolvedTarget>,
    /// Refusals (`AIRLOCK_REPORTS`) and drops (`AIRLOCK_DROPS`) reported by the programs;
    /// taken once by the agent's reader.
    reports: Vec<RingBuf<MapData>>,
    /// Interfaces without an Ethernet header (the packet guard reads IP from their first
    /// byte).
    ifaces: BpfHashMap<MapData, u32, u32>,
    /// Network namespaces the agent listens in (by cookie).
    netns: BpfHashMap<MapData, u64, u32>,
    pub mechanisms: Mechanisms,
    /// The packet guard's program (a duplicate fd) and the interfaces it is attached to.
    packet_guard: Option<packet_guard::PacketGuard>,
}

/// Settings for [`Kernel::start`].
pub struct KernelSetup<'a> {
    pub bpffs_dir: &'a Path,
    pub cgroup: &'a Path,
    pub listen_port: u16,
    /// Pin the links (fail closed when the agent is down) or not (bypass).
    pub pin_links: bool,
    /// Refuse to start without the socket guard, or warn and run without it.
    pub require_socket_guard: bool,
    /// The agent's network namespace (`SO_NETNS_COOKIE`).
    pub host_netns: u64,
    /// Targets redirected only for some cgroups (egress proxies' `cgroups`), by target id.
    pub scopes: &'a [(u32, airlock_common::Scope)],
}

/// Make `AIRLOCK_SCOPES` equal to `scopes` (it may be a pinned map a previous agent filled),
/// before any target is written.
fn set_scopes(
    mut map: aya::maps::HashMap<&mut MapData, u32, airlock_common::Scope>,
    scopes: &[(u32, airlock_common::Scope)],
) -> Result<(), KernelError> {
    let wanted: HashSet<u32> = scopes.iter().map(|(id, _)| *id).collect();
    let stale: Vec<u32> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains(k))
        .collect();
    for id in stale {
        // Gone already is fine: the goal is absence.
        let _ = map.remove(&id);
    }
    for (id, scope) in scopes {
        map.insert(id, scope, 0)
            .map_err(|source| KernelError::Map {
                map: names::SCOPES,
                source,
            })?;
    }
    Ok(())
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
        let mechanisms = Mechanisms::default();
        let cfg = airlock_common::Config {
            agent_ip4: keys::kernel_ip4(Ipv4Addr::LOCALHOST),
            agent_ip6: keys::kernel_ip6(Ipv6Addr::LOCALHOST),
            agent_port: setup.listen_port,
            _pad: 0,
            enabled: CONFIG_ENABLED,
            _pad2: 0,
            host_netns: setup.host_netns,
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
        let local = take_map(&mut ebpf, names::LOCAL)?;
        let local_targets = take_map(&mut ebpf, names::LOCAL_TARGETS)?;
        let reports = vec![
            take_map(&mut ebpf, names::REPORTS)?,
            take_map(&mut ebpf, names::DROPS)?,
        ];
        let ifaces = take_map(&mut ebpf, names::IFACES)?;
        let netns = take_map(&mut ebpf, names::NETNS)?;
        // Borrowed, not taken: the map must outlive the programs' loading (a taken map would
        // be dropped here, its fd closed, and every program using it refused by the kernel).
        let scopes_map = ebpf
            .map_mut(names::SCOPES)
            .ok_or(KernelError::Missing(names::SCOPES))?;
        let scopes_map =
            aya::maps::HashMap::try_from(scopes_map).map_err(|source| KernelError::Map {
                map: names::SCOPES,
                source,
            })?;
        set_scopes(scopes_map, setup.scopes)?;
        let local_addrs = LocalAddrs::read().map_err(|e| KernelError::Bpffs {
            path: PathBuf::from("netlink"),
            message: format!("cannot read the local routing table: {e}"),
        })?;
        let mut kernel = Kernel {
            _ebpf: ebpf,
            _links: Vec::new(),
            _raw_links: Vec::new(),
            targets: targets_map,
            ports,
            ports_shadow,
            flows,
            counters,
            local,
            local_targets,
            local_addrs: LocalAddrs::default(),
            targets_now: Vec::new(),
            reports,
            ifaces,
            netns,
            mechanisms,
            packet_guard: None,
        };
        kernel.set_local(local_addrs)?;
        kernel.set_targets(targets)?;

        let cgroup = fs::File::open(setup.cgroup).map_err(|source| KernelError::Cgroup {
            path: setup.cgroup.to_owned(),
            source,
        })?;
        // The tcx guard runs for every socket of the host: it asks whether a frame's socket
        // is in this cgroup (or below).
        let mut cgroup_map: aya::maps::CgroupArray<MapData> =
            take_map(&mut kernel._ebpf, names::CGROUP)?;
        cgroup_map
            .set(0, cgroup.as_fd(), 0)
            .map_err(|source| KernelError::Map {
                map: names::CGROUP,
                source,
            })?;
        // Load (verify) every program before touching any hook, so a rejected program never
        // leaves a half-attached redirect behind.
        let mut prog_fds = Vec::with_capacity(LINKS.len());
        let mut links = Vec::with_capacity(LINKS.len());
        for (link_name, prog_name) in LINKS {
            match kernel.load_program(prog_name) {
                Ok(fd) => {
                    prog_fds.push(fd);
                    links.push((link_name, prog_name));
                }
                Err(e) if socket_guard_program(prog_name) => {
                    let why = e.to_string();
                    if setup.require_socket_guard {
                        return Err(KernelError::SocketGuard(why));
                    }
                    warn!(program = prog_name, error = %why, "the socket guard is not running (socket_guard = \"warn\")");
                    kernel
                        .mechanisms
                        .notes
                        .push(format!("socket guard off: {why}"));
                }
                Err(e) => return Err(e),
            }
        }
        let fresh = !is_pinned(setup.bpffs_dir);
        for ((link_name, prog_name), prog_fd) in links.into_iter().zip(&prog_fds) {
            match kernel.attach_one(link_name, prog_name, prog_fd, &links_dir, &cgroup, setup) {
                Ok(link) => {
                    kernel._links.extend(link);
                    match prog_name {
                        names::PROG_SOCK_OPS => kernel.mechanisms.redirect = true,
                        names::PROG_EGRESS => kernel.mechanisms.egress_guard = true,
                        names::PROG_SETSOCKOPT => kernel.mechanisms.socket_guard = true,
                        _ => {}
                    }
                }
                Err(e) if socket_guard_program(prog_name) && !setup.require_socket_guard => {
                    warn!(program = prog_name, error = %e, "the socket guard is not running (socket_guard = \"warn\")");
                    kernel
                        .mechanisms
                        .notes
                        .push(format!("socket guard off: {e}"));
                    kernel.mechanisms.socket_guard = false;
                }
                Err(e) => {
                    if fresh {
                        // Undo a partial first attach: no redirect without its hand-off.
                        kernel._links.clear();
                        kernel._raw_links.clear();
                        remove_pins(setup.bpffs_dir);
                    }
                    return Err(e);
                }
            }
        }
        let pin_dir = setup.pin_links.then_some(links_dir.as_path());
        if let Err(e) = kernel.guard_interfaces(pin_dir) {
            if setup.require_socket_guard {
                return Err(KernelError::SocketGuard(e.to_string()));
            }
            warn!(error = %e, "the packet guard is not running (socket_guard = \"warn\")");
            kernel
                .mechanisms
                .notes
                .push(format!("packet guard off: {e}"));
        }
        if !setup.pin_links {
            // Bypass mode keeps nothing in bpffs: when the agent goes, everything goes.
            remove_pins(setup.bpffs_dir);
        }
        remove_old_maps(setup.bpffs_dir);
        Ok((kernel, own))
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
        self.targets_now = targets.to_vec();
        self.sync_local_targets()
    }

    /// Make `AIRLOCK_LOCAL` hold `addrs` (the local routing table), then recompute which
    /// backends are local. New prefixes go in before stale ones come out.
    pub fn set_local(&mut self, addrs: LocalAddrs) -> Result<(), KernelError> {
        if addrs == self.local_addrs {
            return Ok(());
        }
        let map_err = |source| KernelError::Map {
            map: names::LOCAL,
            source,
        };
        let wanted = addrs.trie_keys();
        for (len, words) in &wanted {
            self.local
                .insert(&Key::new(*len, *words), 1, 0)
                .map_err(map_err)?;
        }
        let stale: Vec<Key<[u32; 4]>> = self
            .local
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                !wanted
                    .iter()
                    .any(|(l, w)| k.prefix_len() == *l && k.data() == *w)
            })
            .collect();
        for key in stale {
            let _ = self.local.remove(&key);
        }
        self.local_addrs = addrs;
        self.sync_local_targets()
    }

    /// The local addresses the programs know now.
    pub fn local_addrs(&self) -> &LocalAddrs {
        &self.local_addrs
    }

    /// `AIRLOCK_LTARGET`: per port, the backend addresses that are local to the host.
    fn sync_local_targets(&mut self) -> Result<(), KernelError> {
        let mut by_port: std::collections::BTreeMap<u32, LocalTargets> = Default::default();
        for t in &self.targets_now {
            if !self.local_addrs.contains(t.addr.ip()) {
                continue;
            }
            let entry = by_port.entry(u32::from(t.addr.port())).or_default();
            let n = entry.count as usize;
            if n >= LOCAL_TARGETS_PER_PORT {
                warn!(
                    port = t.addr.port(),
                    "more than {LOCAL_TARGETS_PER_PORT} local backend addresses share a port; other local addresses are matched against the first {LOCAL_TARGETS_PER_PORT}"
                );
                continue;
            }
            entry.addrs[n] = keys::ip_words(t.addr.ip());
            entry.backend_ids[n] = t.backend_id;
            entry.count += 1;
        }
        let map_err = |source| KernelError::Map {
            map: names::LOCAL_TARGETS,
            source,
        };
        for (port, value) in &by_port {
            self.local_targets.insert(port, value, 0).map_err(map_err)?;
        }
        let stale: Vec<u32> = self
            .local_targets
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !by_port.contains_key(p))
            .collect();
        for port in stale {
            let _ = self.local_targets.remove(&port);
        }
        Ok(())
    }

    /// Let connections to backends from network namespace `cookie` through to the agent's
    /// listener there (or, `false`, refuse them again).
    pub fn set_netns(&mut self, cookie: u64, served: bool) -> Result<(), KernelError> {
        let result = if served {
            self.netns.insert(cookie, 1, 0)
        } else {
            self.netns.remove(&cookie).or(Ok(()))
        };
        result.map_err(|source| KernelError::Map {
            map: names::NETNS,
            source,
        })
    }

    /// The ring buffers of refusals and drops, for the agent's reader (once).
    pub fn take_reports(&mut self) -> Vec<RingBuf<MapData>> {
        std::mem::take(&mut self.reports)
    }

    /// Tell the packet guard the link-layer header length of an interface that has no
    /// Ethernet one.
    fn set_interface_header(&mut self, index: u32, len: u32) {
        let result = if len == 14 {
            self.ifaces.remove(&index).or(Ok(()))
        } else {
            self.ifaces.insert(index, len, 0)
        };
        if let Err(e) = result {
            warn!(index, error = %e, "cannot record an interface's header length for the packet guard");
        }
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
    /// The map, to ask sock_diag which sockets carry the tag.
    pub fn map_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.map.as_fd()
    }

    /// Tag `socket` as the agent's own (before its `connect()`).
    pub fn tag(&self, socket: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        sys::sk_storage_set(self.map.as_fd(), socket, 1)
    }

    /// No map (`/dev/null` in its place): for tests that build a proxy without root. Tagging
    /// fails, so nothing is dialled through it.
    #[cfg(test)]
    pub(crate) fn detached() -> io::Result<OwnSockets> {
        Ok(OwnSockets {
            map: std::fs::File::open("/dev/null")?.into(),
        })
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
    let mut pins: Vec<String> = LINKS.iter().map(|(l, _)| (*l).to_owned()).collect();
    if let Ok(entries) = fs::read_dir(bpffs_dir.join("links")) {
        pins.extend(
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("tc-")),
        );
    }
    for link in &pins {
        let link = link.as_str();
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

mod attach;
mod local;
mod mechanisms;
mod packet_guard;
mod sys;

pub use mechanisms::{Mechanisms, probe};

pub use local::{LOCAL_CHANGE_GROUPS, LocalAddrs};
