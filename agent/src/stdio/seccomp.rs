//! seccomp user notification on `execve`/`execveat`: the filter a governed job runs under
//! (installed by `airlock govern`, inherited by every descendant, not removable by them) and
//! the agent's side of its listener (receive a notification, check it is still live, put a
//! file descriptor into the caller, let the exec continue).
//!
//! The filter notifies on the exec calls of every ABI an x86-64 kernel runs (x86-64, x32,
//! i386) and kills a process that makes a system call under any other architecture value.
//! When the listener is closed (the agent is gone), the kernel fails every notified call with
//! `ENOSYS`: a governed job cannot start programs while the agent is down.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// x86-64 `execve` and `execveat`.
pub const NR_EXECVE: i32 = 59;
pub const NR_EXECVEAT: i32 = 322;
const X32_EXECVE: u32 = X32_SYSCALL_BIT | 520;
const X32_EXECVEAT: u32 = X32_SYSCALL_BIT | 545;
const I386_EXECVE: u32 = 11;
const I386_EXECVEAT: u32 = 358;

const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const RET_K: u16 = 0x06;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_USER_NOTIF: u32 = 0x7fc0_0000;
/// `offsetof(struct seccomp_data, nr)` and `arch`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: JEQ_K,
        jt,
        jf,
        k,
    }
}

/// The classic BPF program: exec calls of each ABI → notify; other calls → allow; an unknown
/// architecture → kill.
pub fn exec_filter() -> Vec<libc::sock_filter> {
    vec![
        /* 0 */ stmt(LD_W_ABS, OFF_ARCH),
        /* 1 */ jeq(AUDIT_ARCH_X86_64, 0, 6), // → 8
        /* 2 */ stmt(LD_W_ABS, OFF_NR),
        /* 3 */ jeq(NR_EXECVE as u32, 10, 0), // → 14
        /* 4 */ jeq(NR_EXECVEAT as u32, 9, 0),
        /* 5 */ jeq(X32_EXECVE, 8, 0),
        /* 6 */ jeq(X32_EXECVEAT, 7, 0),
        /* 7 */ stmt(RET_K, RET_ALLOW),
        /* 8 */ jeq(AUDIT_ARCH_I386, 0, 4), // → 13
        /* 9 */ stmt(LD_W_ABS, OFF_NR),
        /* 10 */ jeq(I386_EXECVE, 3, 0),
        /* 11 */ jeq(I386_EXECVEAT, 2, 0),
        /* 12 */ stmt(RET_K, RET_ALLOW),
        /* 13 */ stmt(RET_K, RET_KILL_PROCESS),
        /* 14 */ stmt(RET_K, RET_USER_NOTIF),
    ]
}

/// Install the exec filter on the calling thread (before it execs the job) and return its
/// listener. Without `CAP_SYS_ADMIN`, `no_new_privs` is set first, as the kernel requires.
pub fn install_exec_filter() -> io::Result<OwnedFd> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // SAFETY: plain prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let mut filter = exec_filter();
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // Once the agent has received an exec, only a fatal signal ends the wait (5.19+): a
    // process cannot leave the exec, keeping the relay's descriptors, with a signal of its own.
    // Older kernels: without it.
    let install = |flags: libc::c_ulong| {
        // SAFETY: `prog` points at `filter`, alive for the call.
        unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &prog as *const libc::sock_fprog,
            )
        }
    };
    let mut fd = install(
        libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
    );
    if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        fd = install(libc::SECCOMP_FILTER_FLAG_NEW_LISTENER);
    }
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether `fd` is a seccomp listener (what `airlock govern` must hand over).
pub fn is_listener(fd: &OwnedFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|p| p.as_os_str() == "anon_inode:seccomp notify")
}

/// One exec a governed process is waiting in.
#[derive(Debug, Clone, Copy)]
pub struct Notification {
    pub id: u64,
    /// The calling thread, in the agent's pid namespace.
    pub pid: u32,
    pub nr: i32,
    pub arch: u32,
    pub args: [u64; 6],
}

impl Notification {
    /// Pointers in the caller's memory are 4 bytes wide under the i386 and x32 ABIs.
    pub fn pointer_size(&self) -> usize {
        if self.arch == AUDIT_ARCH_X86_64 && (self.nr as u32) & X32_SYSCALL_BIT == 0 {
            8
        } else {
            4
        }
    }

    /// Whether this is an `execveat` (path relative to a descriptor) of any ABI.
    pub fn is_execveat(&self) -> bool {
        let nr = self.nr as u32;
        nr == NR_EXECVEAT as u32 || nr == X32_EXECVEAT || nr == I386_EXECVEAT
    }
}

/// The agent's end of one job's filter.
pub struct Listener {
    fd: OwnedFd,
    /// `struct seccomp_notif` as this kernel sizes it (it may be larger than libc's).
    notif_size: usize,
}

impl Listener {
    pub fn new(fd: OwnedFd) -> io::Result<Listener> {
        let mut sizes = libc::seccomp_notif_sizes {
            seccomp_notif: 0,
            seccomp_notif_resp: 0,
            seccomp_data: 0,
        };
        // SAFETY: the kernel fills `sizes`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_GET_NOTIF_SIZES,
                0,
                &mut sizes as *mut libc::seccomp_notif_sizes,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let notif_size =
            (sizes.seccomp_notif as usize).max(std::mem::size_of::<libc::seccomp_notif>());
        Ok(Listener { fd, notif_size })
    }

    /// Wait up to `timeout_ms` for a notification: `Ok(None)` on timeout, `Err` with
    /// `ConnectionAborted` when no process uses the filter any more (the job is over).
    pub fn recv(&self, timeout_ms: i32) -> io::Result<Option<Notification>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, alive for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(None);
        }
        if pfd.revents & libc::POLLIN == 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "no process uses the filter any more",
            ));
        }
        // u64 words: aligned for the struct, zeroed as the kernel requires.
        let mut buf = vec![0u64; self.notif_size.div_ceil(8)];
        // SAFETY: `buf` is at least as large as the kernel's `struct seccomp_notif`.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV,
                buf.as_mut_ptr(),
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            // ENOENT: the caller went away (killed) between poll and receive.
            return match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: the kernel wrote a `seccomp_notif` at the start of `buf`.
        let n: libc::seccomp_notif =
            unsafe { std::ptr::read(buf.as_ptr() as *const libc::seccomp_notif) };
        Ok(Some(Notification {
            id: n.id,
            pid: n.pid,
            nr: n.data.nr,
            arch: n.data.arch,
            args: n.data.args,
        }))
    }

    /// Whether the process is still waiting in notification `id` (so what was read of it
    /// from `/proc` was read of that process, not of one that reused its pid).
    pub fn still_waiting(&self, id: u64) -> bool {
        // SAFETY: the ioctl reads one u64.
        unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
                &id as *const u64,
            ) == 0
        }
    }

    /// Put `src` into the waiting process as descriptor `target` (replacing what was there).
    pub fn set_fd(&self, id: u64, src: &OwnedFd, target: u32) -> io::Result<()> {
        let add = libc::seccomp_notif_addfd {
            id,
            flags: libc::SECCOMP_ADDFD_FLAG_SETFD as u32,
            srcfd: src.as_raw_fd() as u32,
            newfd: target,
            newfd_flags: 0,
        };
        // SAFETY: the ioctl reads `add`.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ADDFD,
                &add as *const libc::seccomp_notif_addfd,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Answer notification `id`: let the call run (`None`), or fail it with `errno`.
    pub fn respond(&self, id: u64, errno: Option<i32>) -> io::Result<()> {
        let resp = libc::seccomp_notif_resp {
            id,
            val: 0,
            error: errno.map_or(0, |e| -e),
            flags: if errno.is_none() {
                libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32
            } else {
                0
            },
        };
        // SAFETY: the ioctl reads `resp`.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND,
                &resp as *const libc::seccomp_notif_resp,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            // The caller was killed while we decided: nothing waits for the answer.
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
}

/// `pidfd_open(pid)`.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_getfd`: a duplicate of descriptor `target` of the process behind `pidfd`.
pub fn pidfd_getfd(pidfd: &OwnedFd, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every jump of the program lands inside it, on the instruction the comments name.
    #[test]
    fn the_filter_jumps_land_where_intended() {
        let f = exec_filter();
        let target = |i: usize, off: u8| i + 1 + off as usize;
        for (i, ins) in f.iter().enumerate() {
            if ins.code == JEQ_K {
                assert!(target(i, ins.jt) < f.len() && target(i, ins.jf) < f.len());
            }
        }
        // Every exec number of every ABI reaches the notify return; the arch checks fall
        // through to the allow returns otherwise.
        for i in [3, 4, 5, 6] {
            assert_eq!(f[target(i, f[i].jt)].k, RET_USER_NOTIF);
        }
        for i in [10, 11] {
            assert_eq!(f[target(i, f[i].jt)].k, RET_USER_NOTIF);
        }
        assert_eq!(f[target(1, f[1].jf)].k, AUDIT_ARCH_I386);
        assert_eq!(f[target(8, f[8].jf)].k, RET_KILL_PROCESS);
        assert_eq!(f[7].k, RET_ALLOW);
        assert_eq!(f[12].k, RET_ALLOW);
    }
}
