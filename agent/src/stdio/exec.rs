//! What a process waiting in an exec notification asks to run: the path and arguments read
//! from its memory (`/proc/PID/mem`), its working directory, parent and standard descriptors.
//!
//! The path and arguments are the caller's claims at the time of reading: another thread of
//! the caller can change them before the kernel reads them again. They choose whether to relay
//! (a label, as SECURITY.md says); they never let anything through that would otherwise be
//! stopped.

use std::{fs::File, io, os::unix::fs::FileExt as _};

use super::seccomp::Notification;

/// Longest path read (PATH_MAX).
const MAX_PATH: usize = 4096;
/// Most arguments and bytes of arguments read: the kernel's own limits (32 pages per
/// argument, a quarter of an 8 MiB stack in all). An exec past them is refused, not guessed.
const MAX_ARGS: usize = 65_536;
const MAX_ARG: usize = 128 * 1024;
const MAX_ARGV_BYTES: usize = 2 * 1024 * 1024;
const AT_FDCWD: i64 = -100;
const AT_EMPTY_PATH: u64 = 0x1000;

/// One exec, as the waiting process described it.
#[derive(Debug, Clone)]
pub struct Exec {
    /// The calling thread and its process.
    pub tid: u32,
    pub tgid: u32,
    pub ppid: u32,
    /// The program as the process named it, made absolute in its own view of the file
    /// system (its cwd or the `execveat` directory prepended).
    pub path: String,
    pub argv: Vec<String>,
    /// Arguments beyond [`MAX_ARGS`] or the byte cap, not read.
    pub argv_truncated: bool,
    pub cwd: Option<String>,
    /// What descriptors 0 and 1 are (`pipe:[INODE]`, `socket:[INODE]`, a path).
    pub stdin: Option<String>,
    pub stdout: Option<String>,
    /// Their inodes (a relay's pipes are recognised by them).
    pub stdin_inode: Option<u64>,
    pub stdout_inode: Option<u64>,
    /// Threads of the process: another one could change descriptors 0 and 1 while this one
    /// waits in the exec.
    pub threads: u32,
}

impl Exec {
    /// Read the exec `n` is waiting in.
    pub fn read(n: &Notification) -> io::Result<Exec> {
        let tid = n.pid;
        let status = crate::attribution::ProcStatus::read(std::path::Path::new(&format!(
            "/proc/{tid}/status"
        )))?;
        let tgid = status.number("Tgid").unwrap_or(tid);
        let ppid = status.number("PPid").unwrap_or(0);
        let threads = status.number("Threads").unwrap_or(1);
        let mem = File::open(format!("/proc/{tid}/mem"))?;
        let ptr = n.pointer_size();
        let (path_ptr, argv_ptr) = if n.is_execveat() {
            (n.args[1], n.args[2])
        } else {
            (n.args[0], n.args[1])
        };
        let raw_path = read_str(&mem, path_ptr, MAX_PATH)?;
        let cwd = link(&format!("/proc/{tid}/cwd"));
        let path = if raw_path.starts_with('/') {
            raw_path
        } else if n.is_execveat() && n.args[0] as i32 as i64 != AT_FDCWD {
            let dir = link(&format!("/proc/{tid}/fd/{}", n.args[0] as i32)).unwrap_or_default();
            if raw_path.is_empty() && n.args[4] & AT_EMPTY_PATH != 0 {
                dir
            } else {
                format!("{dir}/{raw_path}")
            }
        } else {
            format!("{}/{raw_path}", cwd.as_deref().unwrap_or(""))
        };
        let (argv, argv_truncated) = read_argv(&mem, argv_ptr, ptr)?;
        Ok(Exec {
            tid,
            tgid,
            ppid,
            path,
            argv,
            argv_truncated,
            cwd,
            stdin: link(&format!("/proc/{tid}/fd/0")),
            stdout: link(&format!("/proc/{tid}/fd/1")),
            stdin_inode: inode(tid, 0),
            stdout_inode: inode(tid, 1),
            threads,
        })
    }
}

fn inode(tid: u32, fd: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/proc/{tid}/fd/{fd}"))
        .ok()
        .map(|m| m.ino())
}

/// Whether descriptor 0 of thread `tid` is `/dev/null` (what it is, by `stat`, not by name):
/// then nothing can reach a server it starts, and the exec is answered without reading it.
pub fn stdin_is_null(tid: u32) -> bool {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    std::fs::metadata(format!("/proc/{tid}/fd/0"))
        .is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == libc::makedev(1, 3))
}

/// Whether a descriptor (`/proc/PID/fd/N`) is a pipe, named or not, or a socket: how a
/// client talks to a server it spawned (by the file's type, not the link's text).
pub fn is_pipe_or_socket(fd_path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(fd_path).is_ok_and(|m| {
        let t = m.file_type();
        t.is_fifo() || t.is_socket()
    })
}

fn link(path: &str) -> Option<String> {
    std::fs::read_link(path)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// A NUL-terminated string at `addr`, read a page at a time (a string may end just before an
/// unmapped page), at most `max` bytes.
fn read_str(mem: &File, addr: u64, max: usize) -> io::Result<String> {
    if addr == 0 {
        return Ok(String::new());
    }
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < max {
        let to_page = 4096 - (at % 4096) as usize;
        let mut buf = vec![0u8; to_page.min(max - out.len())];
        let n = mem.read_at(&mut buf, at)?;
        if n == 0 {
            break;
        }
        if let Some(end) = buf[..n].iter().position(|&b| b == 0) {
            out.extend_from_slice(&buf[..end]);
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend_from_slice(&buf[..n]);
        at += n as u64;
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The argument vector at `addr` (pointers `ptr` bytes wide), bounded.
fn read_argv(mem: &File, addr: u64, ptr: usize) -> io::Result<(Vec<String>, bool)> {
    let mut argv = Vec::new();
    if addr == 0 {
        return Ok((argv, false));
    }
    let mut bytes = 0;
    for i in 0..MAX_ARGS {
        let mut p = [0u8; 8];
        mem.read_exact_at(&mut p[..ptr], addr + (i * ptr) as u64)?;
        let p = u64::from_le_bytes(p);
        if p == 0 {
            return Ok((argv, false));
        }
        let arg = read_str(mem, p, MAX_ARG)?;
        bytes += arg.len();
        argv.push(arg);
        if bytes > MAX_ARGV_BYTES {
            return Ok((argv, true));
        }
    }
    Ok((argv, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own memory read through `/proc/self/mem`, as the agent reads a caller's.
    #[test]
    fn strings_and_argument_vectors_are_read_from_process_memory() {
        let mem = File::open("/proc/self/mem").unwrap();
        let a = b"/usr/bin/npx\0".to_vec();
        let b = b"-y\0".to_vec();
        let ptrs: Vec<u64> = vec![a.as_ptr() as u64, b.as_ptr() as u64, 0];
        assert_eq!(
            read_str(&mem, a.as_ptr() as u64, 4096).unwrap(),
            "/usr/bin/npx"
        );
        assert_eq!(read_str(&mem, a.as_ptr() as u64, 4).unwrap(), "/usr");
        let (argv, cut) = read_argv(&mem, ptrs.as_ptr() as u64, 8).unwrap();
        assert_eq!(argv, ["/usr/bin/npx", "-y"]);
        assert!(!cut);
    }
}
