//! Unmanaged stdio MCP servers, found: processes anywhere on the host whose stdin and stdout
//! are pipes or sockets and whose executable or arguments match the stdio server patterns
//! (`[[stdio_server]]` and the shipped launchers), relayed by the agent or not.
//!
//! Record-only and by name: a server whose program and arguments match no pattern is not
//! found, nor one that started and exited between two scans; the bytes on its pipes are not
//! read (a pipe cannot be read without taking them from the server).

use std::{collections::HashSet, fs, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    attribution::{Container, NameCache},
    config::StdioServer,
};

/// Most processes one scan looks at.
const MAX_PROCESSES: usize = 200_000;

/// One stdio MCP server process found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Found {
    pub pid: u32,
    /// Start time (clock ticks after boot): with `pid`, names the process uniquely.
    pub start: u64,
    pub uid: u32,
    pub user: Option<String>,
    /// The `[[stdio_server]]` (or default) name it matched.
    pub server: String,
    pub exe: Option<String>,
    pub argv: Vec<String>,
    /// The process that started it (the client, or a launcher between).
    pub parent_pid: u32,
    pub parent_exe: Option<String>,
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
    /// Whether its stdin is a relay's pipe: relayed through the pipeline (a governed job).
    pub relayed: bool,
}

/// Scan `proc_root` (normally `/proc`). `relays`: the inodes of the relays' server-stdin
/// pipes; `except`: a pid not to report (the agent).
pub fn scan(
    proc_root: &Path,
    servers: &[StdioServer],
    relays: &HashSet<u64>,
    names: &NameCache,
    except: u32,
) -> Vec<Found> {
    let Ok(dir) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten().take(MAX_PROCESSES) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == except {
            continue;
        }
        if let Some(found) = examine(&entry.path(), pid, servers, relays, names) {
            out.push(found);
        }
    }
    out.sort_by_key(|f| f.pid);
    out
}

/// One process: its descriptors first (cheap, rules most out), then what it runs.
fn examine(
    dir: &Path,
    pid: u32,
    servers: &[StdioServer],
    relays: &HashSet<u64>,
    names: &NameCache,
) -> Option<Found> {
    let link = |p: &str| {
        fs::read_link(dir.join(p))
            .ok()
            .map(|l| l.to_string_lossy().into_owned())
    };
    // By the file's type: a named FIFO's link reads as its path.
    let piped = |fd: &str| super::exec::is_pipe_or_socket(&dir.join(fd));
    if !piped("fd/0") || !piped("fd/1") {
        return None;
    }
    let stdin_inode = {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(dir.join("fd/0")).ok().map(|m| m.ino())
    };
    let argv: Vec<String> = fs::read(dir.join("cmdline"))
        .ok()?
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let exe = link("exe");
    let server = servers
        .iter()
        .find(|s| s.matches(exe.as_deref().unwrap_or(""), &argv))?;
    let status = crate::attribution::ProcStatus::read(&dir.join("status")).ok()?;
    let uid = status.number("Uid")?;
    let parent_pid = status.number("PPid").unwrap_or(0);
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    let start = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().nth(19)?.parse().ok())
        .unwrap_or(0);
    let cgroup = fs::read_to_string(dir.join("cgroup")).ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_owned)
    });
    let parent_exe = fs::read_link(dir.with_file_name(parent_pid.to_string()).join("exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    Some(Found {
        pid,
        start,
        uid,
        user: names.user(uid),
        server: server.name.clone(),
        exe,
        argv,
        parent_pid,
        parent_exe,
        container: cgroup.as_deref().and_then(Container::from_cgroup),
        cgroup,
        relayed: stdin_inode.is_some_and(|i| relays.contains(&i)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child of this test whose stdin and stdout are pipes and whose arguments name a
    /// well-known launcher is found; one on /dev/null is not; the relay set decides `relayed`.
    #[test]
    fn a_piped_process_named_like_a_launcher_is_found() {
        use std::{
            os::unix::process::CommandExt as _,
            process::{Command, Stdio},
        };
        let servers = crate::config::default_stdio_servers();
        let mut piped = Command::new("sleep")
            .arg0("mcp-server-fetch")
            .arg("30")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut quiet = Command::new("sleep")
            .arg0("mcp-server-other")
            .arg("30")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let names = NameCache::new(std::time::Duration::from_secs(60));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let found = loop {
            let all = scan(Path::new("/proc"), &servers, &HashSet::new(), &names, 0);
            if let Some(f) = all.iter().find(|f| f.pid == piped.id()) {
                assert!(!all.iter().any(|f| f.pid == quiet.id()), "{all:?}");
                break f.clone();
            }
            assert!(std::time::Instant::now() < deadline, "not found: {all:?}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(found.server, "stdio-mcp");
        assert_eq!(found.parent_pid, std::process::id());
        assert!(!found.relayed);
        let _ = piped.kill();
        let _ = quiet.kill();
        let _ = piped.wait();
        let _ = quiet.wait();
    }
}
