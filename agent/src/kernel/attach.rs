//! Loading and attaching the programs: each verified before any hook is touched, each link
//! pinned (block mode) or swapped into the pin a previous agent left (`BPF_LINK_UPDATE`).

use std::{
    fs, io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use airlock_common::names;
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, CgroupSockopt,
    SockOps,
    links::{FdLink, PinnedLink},
};
use tracing::info;

use super::{Kernel, KernelError, KernelSetup, bpffs_io, sys};

impl Kernel {
    /// Load one program into the kernel (the verifier runs here) and return a duplicate of its
    /// fd, for a possible `BPF_LINK_UPDATE`.
    pub(super) fn load_program(&mut self, prog_name: &'static str) -> Result<OwnedFd, KernelError> {
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
        } else if prog_name == names::PROG_EGRESS {
            let p: &mut CgroupSkb = program.try_into().map_err(program_err)?;
            p.load().map_err(program_err)?;
            p.fd()
                .map_err(program_err)?
                .as_fd()
                .try_clone_to_owned()
                .map_err(dup_err)
        } else if prog_name == names::PROG_SOCKET_CREATE {
            let p: &mut CgroupSock = program.try_into().map_err(program_err)?;
            p.load().map_err(program_err)?;
            p.fd()
                .map_err(program_err)?
                .as_fd()
                .try_clone_to_owned()
                .map_err(dup_err)
        } else if prog_name == names::PROG_SETSOCKOPT {
            let p: &mut CgroupSockopt = program.try_into().map_err(program_err)?;
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

    pub(super) fn attach_one(
        &mut self,
        link_name: &'static str,
        prog_name: &'static str,
        prog_fd: &OwnedFd,
        links_dir: &Path,
        cgroup: &fs::File,
        setup: &KernelSetup<'_>,
    ) -> Result<Option<FdLink>, KernelError> {
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
            return Ok(Some(pinned.into()));
        }

        if prog_name == names::PROG_SETSOCKOPT {
            // aya 0.14 cannot hand over a sockopt link: created and pinned here.
            let link = sys::cgroup_link_create(
                prog_fd.as_fd(),
                cgroup.as_fd(),
                aya_obj::generated::bpf_attach_type::BPF_CGROUP_SETSOCKOPT,
            )
            .map_err(|e| KernelError::Bpffs {
                path: setup.cgroup.to_owned(),
                message: format!("cannot attach {prog_name}: {e}"),
            })?;
            info!(link = link_name, cgroup = %setup.cgroup.display(), "attached");
            if setup.pin_links {
                sys::obj_pin(link.as_fd(), &pin).map_err(|e| KernelError::Bpffs {
                    path: pin.clone(),
                    message: format!("cannot pin: {e}"),
                })?;
                let pinned = PinnedLink::from_pin(&pin).map_err(|e| KernelError::Bpffs {
                    path: pin.clone(),
                    message: e.to_string(),
                })?;
                return Ok(Some(pinned.into()));
            }
            self._raw_links.push(link);
            return Ok(None);
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
        } else if prog_name == names::PROG_EGRESS {
            let p: &mut CgroupSkb = program.try_into().map_err(program_err)?;
            let id = p
                .attach(
                    cgroup,
                    CgroupSkbAttachType::Egress,
                    CgroupAttachMode::Single,
                )
                .map_err(attach_err)?;
            p.take_link(id)
                .map_err(attach_err)?
                .try_into()
                .map_err(not_a_link)?
        } else if prog_name == names::PROG_SOCKET_CREATE {
            let p: &mut CgroupSock = program.try_into().map_err(program_err)?;
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
            return Ok(Some(link));
        }
        let pinned = link.pin(&pin).map_err(|e| KernelError::Bpffs {
            path: pin.clone(),
            message: format!("cannot pin: {e}"),
        })?;
        Ok(Some(pinned.into()))
    }
}
