//! Who made a connection: the kernel's record (taken at `connect()`, so it cannot be spoofed by
//! the client afterwards) enriched from `/proc` while the process still exists.

use std::{
    collections::HashMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use airlock_common::{ConnMeta, family};
use serde::Serialize;

use crate::keys;

/// The identity of the caller of one redirected connection.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Attribution {
    /// Thread id that called `connect()`.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// User name of `uid`, if it has one.
    pub user: Option<String>,
    /// Group name of `gid`, if it has one.
    pub group: Option<String>,
    /// Name of the calling thread (kernel).
    pub comm: String,
    /// Executable of the process (from `/proc`; `None` if it exited first).
    pub exe: Option<String>,
    pub cmdline: Option<Vec<String>>,
    /// cgroup v2 id (kernel) and path (from `/proc`).
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    /// Where the client meant to connect.
    pub original_dst: SocketAddr,
    /// `ipv4`, `ipv6` or `ipv4-mapped`: how the client addressed it.
    pub family: &'static str,
    /// Whether `/proc` still had the process when we looked.
    pub process_seen: bool,
    /// The caller's network namespace (its cookie; the agent's own for host processes).
    pub netns: u64,
    /// The container the process runs in, read from its cgroup path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
}

/// A container, as its cgroup path names it (Podman, Docker, containerd, CRI-O; Kubernetes
/// pods from the kubelet's path), with the name where the runtime gave it (its OCI hook).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Container {
    /// `podman` | `docker` | `containerd` | `cri-o`.
    pub runtime: String,
    /// The full container id (64 hex digits).
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Kubernetes: the pod's uid (from `kubepods…pod<uid>.slice`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl Container {
    /// The container a cgroup path names, if any. Recognised: `libpod-<id>` (Podman, also
    /// `libpod-<id>.scope`), `docker-<id>.scope` and `/docker/<id>` (Docker),
    /// `cri-containerd-<id>.scope` and `/kubepods/…/<id>` (containerd), `crio-<id>.scope`
    /// (CRI-O); the pod uid from a `pod<uid>` component.
    pub fn from_cgroup(path: &str) -> Option<Container> {
        let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        let pod_uid = path.split('/').find_map(|c| {
            let c = c.strip_suffix(".slice").unwrap_or(c);
            let uid = c
                .rsplit_once("-pod")
                .map(|(_, u)| u)
                .or_else(|| c.strip_prefix("pod"))?;
            let uid = uid.replace('_', "-");
            (uid.len() == 36).then_some(uid)
        });
        let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for (i, c) in components.iter().enumerate().rev() {
            let bare = c.strip_suffix(".scope").unwrap_or(c);
            for (prefix, runtime) in [
                ("libpod-", "podman"),
                ("docker-", "docker"),
                ("cri-containerd-", "containerd"),
                ("crio-", "cri-o"),
            ] {
                if let Some(id) = bare.strip_prefix(prefix)
                    && is_id(id)
                {
                    return Some(Container {
                        runtime: runtime.into(),
                        id: id.into(),
                        name: None,
                        pod_uid,
                    });
                }
            }
            if is_id(bare) && i > 0 {
                let runtime = match components[i - 1] {
                    "docker" => "docker",
                    p if p.starts_with("pod") || p.starts_with("kubepods") => "containerd",
                    _ => continue,
                };
                return Some(Container {
                    runtime: runtime.into(),
                    id: bare.into(),
                    name: None,
                    pod_uid,
                });
            }
        }
        None
    }
}

impl Attribution {
    /// Build from the kernel record, reading `/proc` under `proc_root` (normally `/proc`).
    pub fn from_kernel(meta: &ConnMeta, proc_root: &Path, names: &NameCache) -> Attribution {
        let original_dst = SocketAddr::new(keys::ip_from_words(meta.orig_addr), meta.orig_port);
        let family = match meta.orig_family {
            family::IPV4 => "ipv4",
            family::IPV6 => "ipv6",
            family::IPV4_MAPPED => "ipv4-mapped",
            _ => "unknown",
        };
        let proc = ProcInfo::read(proc_root, meta.tgid, meta.connect_ns);
        Attribution {
            pid: meta.pid,
            tgid: meta.tgid,
            uid: meta.uid,
            gid: meta.gid,
            user: names.user(meta.uid),
            group: names.group(meta.gid),
            comm: keys::comm_str(&meta.comm),
            process_seen: proc.is_some(),
            exe: proc.as_ref().and_then(|p| p.exe.clone()),
            cmdline: proc.as_ref().and_then(|p| p.cmdline.clone()),
            cgroup_id: meta.cgroup_id,
            cgroup: proc.and_then(|p| p.cgroup),
            original_dst,
            family,
            netns: meta.netns,
            container: None,
        }
        .with_container()
    }

    /// A process that made no connection (the client of a stdio server): who it is, from
    /// `/proc`; `None` when it is gone. `original_dst` is unspecified and `family` `stdio`.
    pub fn of_process(tgid: u32, proc_root: &Path, names: &NameCache) -> Option<Attribution> {
        let status = ProcStatus::read(&proc_root.join(tgid.to_string()).join("status")).ok()?;
        let (uid, gid) = (status.number("Uid")?, status.number("Gid")?);
        let comm = status.text("Name").unwrap_or_default().to_owned();
        let proc = ProcInfo::read(proc_root, tgid, 0)?;
        Some(
            Attribution {
                pid: tgid,
                tgid,
                uid,
                gid,
                user: names.user(uid),
                group: names.group(gid),
                comm,
                exe: proc.exe,
                cmdline: proc.cmdline,
                cgroup_id: 0,
                cgroup: proc.cgroup,
                original_dst: SocketAddr::from(([0, 0, 0, 0], 0)),
                family: "stdio",
                process_seen: true,
                netns: 0,
                container: None,
            }
            .with_container(),
        )
    }

    /// The container, from the cgroup path `/proc` gave.
    fn with_container(mut self) -> Attribution {
        self.container = self.cgroup.as_deref().and_then(Container::from_cgroup);
        self
    }
}

/// What `/proc/<tgid>` says about a process.
#[derive(Debug, Default)]
struct ProcInfo {
    exe: Option<String>,
    cmdline: Option<Vec<String>>,
    cgroup: Option<String>,
}

impl ProcInfo {
    /// `None` when the process is gone, or when the pid was reused by a process that started
    /// after the connection was made (the kernel record stays the only truth then).
    fn read(proc_root: &Path, tgid: u32, connect_ns: u64) -> Option<ProcInfo> {
        let dir = proc_root.join(tgid.to_string());
        let stat = fs::read_to_string(dir.join("stat")).ok()?;
        if let Some(start_ns) = start_time_ns(&stat)
            && connect_ns != 0
            && start_ns > connect_ns
        {
            return None;
        }
        Some(ProcInfo {
            exe: fs::read_link(dir.join("exe"))
                .ok()
                .map(|p: PathBuf| p.to_string_lossy().into_owned()),
            cmdline: fs::read(dir.join("cmdline"))
                .ok()
                .map(|raw| parse_cmdline(&raw)),
            cgroup: fs::read_to_string(dir.join("cgroup"))
                .ok()
                .and_then(|s| parse_cgroup_v2(&s)),
        })
    }
}

/// Process start time from `/proc/<pid>/stat` (field 22, clock ticks since boot) in
/// nanoseconds, comparable with `bpf_ktime_get_boot_ns`.
fn start_time_ns(stat: &str) -> Option<u64> {
    // comm (field 2) may contain spaces and parentheses: fields restart after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(ticks.saturating_mul(1_000_000_000 / hz))
}

fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The cgroup v2 path from `/proc/<pid>/cgroup` (the `0::` line).
fn parse_cgroup_v2(s: &str) -> Option<String> {
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// User and group names by id, each kept for a while: NSS lookups read files or ask a
/// directory service, too slow for every connection.
pub struct NameCache {
    ttl: Duration,
    users: Mutex<HashMap<u32, (Option<String>, Instant)>>,
    groups: Mutex<HashMap<u32, (Option<String>, Instant)>>,
}

/// Entries beyond this are dropped wholesale (bounded memory with many distinct ids).
const NAME_CACHE_MAX: usize = 4096;

impl NameCache {
    pub fn new(ttl: Duration) -> NameCache {
        NameCache {
            ttl,
            users: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// Whether both names are cached and fresh (so no NSS lookup is needed).
    pub fn has(&self, uid: u32, gid: u32) -> bool {
        let fresh = |map: &Mutex<HashMap<u32, (Option<String>, Instant)>>, id| {
            map.lock()
                .map(|m| m.get(&id).is_some_and(|(_, at)| at.elapsed() < self.ttl))
                .unwrap_or(false)
        };
        fresh(&self.users, uid) && fresh(&self.groups, gid)
    }

    pub fn user(&self, uid: u32) -> Option<String> {
        self.cached(&self.users, uid, |id| {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(id))
                .ok()
                .flatten()
                .map(|u| u.name)
        })
    }

    pub fn group(&self, gid: u32) -> Option<String> {
        self.cached(&self.groups, gid, |id| {
            nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(id))
                .ok()
                .flatten()
                .map(|g| g.name)
        })
    }

    fn cached(
        &self,
        map: &Mutex<HashMap<u32, (Option<String>, Instant)>>,
        id: u32,
        lookup: impl Fn(u32) -> Option<String>,
    ) -> Option<String> {
        if let Ok(m) = map.lock()
            && let Some((name, at)) = m.get(&id)
            && at.elapsed() < self.ttl
        {
            return name.clone();
        }
        let name = lookup(id);
        if let Ok(mut m) = map.lock() {
            if m.len() >= NAME_CACHE_MAX {
                m.clear();
            }
            m.insert(id, (name.clone(), Instant::now()));
        }
        name
    }
}

/// A process's `/proc/PID/status`, read once, and its fields by name.
pub struct ProcStatus(String);

impl ProcStatus {
    pub fn read(path: &Path) -> std::io::Result<ProcStatus> {
        fs::read_to_string(path).map(ProcStatus)
    }

    /// A field's value, trimmed (`text("Name")`: the command name).
    pub fn text(&self, name: &str) -> Option<&str> {
        self.0.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(str::trim)
        })
    }

    /// A field's first number (`number("Uid")`: the real uid).
    pub fn number(&self, name: &str) -> Option<u32> {
        self.text(name)?.split_whitespace().next()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn proc_status_fields_are_read_by_name() {
        let me = ProcStatus::read(Path::new("/proc/self/status")).unwrap();
        assert_eq!(me.number("Uid"), Some(nix::unistd::getuid().as_raw()));
        assert_eq!(me.number("Tgid"), Some(std::process::id()));
        // `PPid` is not taken for `Pid`, nor `Pid` for `PPid`.
        assert_eq!(me.number("Pid"), Some(std::process::id()));
        assert_eq!(
            me.number("PPid"),
            Some(nix::unistd::getppid().as_raw() as u32)
        );
        assert!(!me.text("Name").unwrap_or_default().is_empty());
        assert_eq!(me.text("NoSuchField"), None);
    }

    use super::*;

    #[test]
    fn containers_are_named_by_their_cgroup_path() {
        let id = "b34d36fde44895840b76e35bcc2e08ed16f2bffba367a5ba47b261d8282575e4";
        let c = Container::from_cgroup(&format!("/libpod_parent/libpod-{id}")).unwrap();
        assert_eq!((c.runtime.as_str(), c.id.as_str()), ("podman", id));
        let c = Container::from_cgroup(&format!("/system.slice/docker-{id}.scope")).unwrap();
        assert_eq!(c.runtime, "docker");
        let c = Container::from_cgroup(&format!("/docker/{id}")).unwrap();
        assert_eq!(c.runtime, "docker");
        let c = Container::from_cgroup(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0d1e2f3a_aaaa_bbbb_cccc_0123456789ab.slice/cri-containerd-{id}.scope"
        ))
        .unwrap();
        assert_eq!(c.runtime, "containerd");
        assert_eq!(
            c.pod_uid.as_deref(),
            Some("0d1e2f3a-aaaa-bbbb-cccc-0123456789ab")
        );
        let c = Container::from_cgroup(&format!("/kubepods.slice/crio-{id}.scope")).unwrap();
        assert_eq!(c.runtime, "cri-o");
        for none in [
            "/",
            "/user.slice/user-1000.slice/session-3.scope",
            "/libpod_parent/libpod-xyz",
            "/airlock-test-1-2-x",
        ] {
            assert_eq!(Container::from_cgroup(none), None, "{none}");
        }
    }

    #[test]
    fn cmdline_splits_on_nul() {
        assert_eq!(
            parse_cmdline(b"python3\0-c\0print(1)\0"),
            vec!["python3", "-c", "print(1)"]
        );
        assert!(parse_cmdline(b"").is_empty());
    }

    #[test]
    fn cgroup_v2_line_is_found_in_a_hybrid_hierarchy() {
        let s = "12:pids:/user.slice\n1:name=systemd:/user.slice\n0::/airlock-test/a\n";
        assert_eq!(parse_cgroup_v2(s).as_deref(), Some("/airlock-test/a"));
        assert_eq!(parse_cgroup_v2("3:cpu:/\n"), None);
    }

    #[test]
    fn start_time_survives_odd_comm() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 777 1000 10";
        let ns = start_time_ns(stat).unwrap();
        // SAFETY: no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        assert_eq!(ns, 777 * (1_000_000_000 / hz));
    }

    #[test]
    fn exited_process_keeps_the_kernel_data() {
        let mut meta = ConnMeta::zeroed();
        meta.tgid = u32::MAX - 1; // no such process
        meta.pid = meta.tgid;
        meta.uid = 0;
        meta.comm[..4].copy_from_slice(b"curl");
        meta.orig_addr = keys::ip_words("10.1.2.3".parse().unwrap());
        meta.orig_port = 443;
        meta.orig_family = family::IPV4_MAPPED;
        let a = Attribution::from_kernel(
            &meta,
            Path::new("/proc"),
            &NameCache::new(Duration::from_secs(1)),
        );
        assert!(!a.process_seen);
        assert_eq!(a.exe, None);
        assert_eq!(a.comm, "curl");
        assert_eq!(a.user.as_deref(), Some("root"));
        assert_eq!(a.original_dst, "10.1.2.3:443".parse().unwrap());
        assert_eq!(a.family, "ipv4-mapped");
    }

    #[test]
    fn names_are_cached_and_expire() {
        let cache = NameCache::new(Duration::from_millis(50));
        let calls = std::sync::atomic::AtomicU32::new(0);
        let lookup = |id: u32| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(format!("u{id}"))
        };
        assert_eq!(cache.cached(&cache.users, 7, lookup).as_deref(), Some("u7"));
        assert_eq!(cache.cached(&cache.users, 7, lookup).as_deref(), Some("u7"));
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
        std::thread::sleep(Duration::from_millis(60));
        cache.cached(&cache.users, 7, lookup);
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert!(!cache.has(0, 0));
        assert_eq!(cache.user(0).as_deref(), Some("root"));
        assert_eq!(cache.group(0).as_deref(), Some("root"));
        assert!(cache.has(0, 0));
    }

    #[test]
    fn live_process_is_enriched() {
        let me = std::process::id();
        let mut meta = ConnMeta::zeroed();
        meta.tgid = me;
        meta.pid = me;
        let a = Attribution::from_kernel(
            &meta,
            Path::new("/proc"),
            &NameCache::new(Duration::from_secs(1)),
        );
        assert!(a.process_seen);
        assert_eq!(
            a.exe,
            std::env::current_exe()
                .ok()
                .map(|p| p.to_string_lossy().into_owned())
        );
        assert!(a.cmdline.is_some_and(|c| !c.is_empty()));
    }
}
