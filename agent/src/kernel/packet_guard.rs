//! The packet guard: `airlock_pkt_out` attached with tcx to the egress of every interface of
//! the agent's network namespace, so a frame a packet socket of the attached cgroup sends
//! (`AF_PACKET` has no cgroup hook) cannot carry TCP to a backend. Interfaces that appear
//! later (a container's veth) are attached when the agent hears of them (`watch` in
//! `agent.rs`); the links are pinned as `links/tc-<ifindex>` and, like the cgroup links,
//! outlive the agent.

use std::{collections::BTreeMap, fs, os::fd::AsFd as _, path::Path};

use airlock_common::names;
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::TcAttachOptions,
};
use tracing::{info, warn};

use super::{Kernel, KernelError, sys};

/// The interfaces the guard is attached to, by index.
#[derive(Default)]
pub struct PacketGuard {
    links: BTreeMap<u32, (String, FdLink)>,
}

impl PacketGuard {
    pub fn interfaces(&self) -> Vec<String> {
        self.links.values().map(|(n, _)| n.clone()).collect()
    }
}

const PIN_PREFIX: &str = "tc-";

impl Kernel {
    /// Attach the packet guard to every interface it is not on yet, and forget interfaces
    /// that are gone. Returns the names newly guarded. `links_dir` holds the pins (`None`:
    /// bypass mode, nothing pinned).
    pub fn guard_interfaces(
        &mut self,
        links_dir: Option<&Path>,
    ) -> Result<Vec<String>, KernelError> {
        let present: BTreeMap<u32, String> = nix::net::if_::if_nameindex()
            .map(|list| {
                list.iter()
                    .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let mut guard = self.packet_guard.take().unwrap_or_default();
        guard.links.retain(|index, _| present.contains_key(index));
        if let Some(dir) = links_dir {
            remove_stale_pins(dir, &present);
        }
        let mut added = Vec::new();
        for (index, name) in present.iter() {
            let name = name.as_str();
            if guard.links.contains_key(index) {
                continue;
            }
            self.set_interface_header(*index, link_header_len(name));
            match self.attach_packet_guard(*index, name, links_dir) {
                Ok(link) => {
                    guard.links.insert(*index, (name.to_owned(), link));
                    added.push(name.to_owned());
                }
                // An interface that vanished meanwhile is no interface to guard.
                Err(e)
                    if !nix::net::if_::if_nametoindex(name.as_bytes())
                        .is_ok_and(|i| i == *index) =>
                {
                    info!(interface = %name, error = %e, "interface gone before the packet guard was attached");
                }
                Err(e) => {
                    self.packet_guard = Some(guard);
                    return Err(e);
                }
            }
        }
        self.mechanisms.packet_guard = guard.interfaces();
        self.packet_guard = Some(guard);
        Ok(added)
    }

    fn attach_packet_guard(
        &mut self,
        index: u32,
        name: &str,
        links_dir: Option<&Path>,
    ) -> Result<FdLink, KernelError> {
        let prog_name = names::PROG_PACKET_OUT;
        let program_err = |source| KernelError::Program {
            name: prog_name,
            source,
        };
        let program: &mut SchedClassifier = self
            ._ebpf
            .program_mut(prog_name)
            .ok_or(KernelError::Missing(prog_name))?
            .try_into()
            .map_err(program_err)?;
        if program.fd().is_err() {
            program.load().map_err(program_err)?;
        }
        let pin = links_dir.map(|d| d.join(format!("{PIN_PREFIX}{index}")));
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            // A previous agent's link on this interface: swap our program in.
            let prog_fd = program
                .fd()
                .map_err(program_err)?
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| KernelError::Bpffs {
                    path: pin.clone(),
                    message: format!("cannot duplicate the program fd: {e}"),
                })?;
            let swapped =
                sys::obj_get(pin).and_then(|link| sys::link_update(link.as_fd(), prog_fd.as_fd()));
            match swapped {
                Ok(()) => {
                    let pinned = PinnedLink::from_pin(pin).map_err(|e| KernelError::Bpffs {
                        path: pin.clone(),
                        message: e.to_string(),
                    })?;
                    return Ok(pinned.into());
                }
                Err(e) => {
                    // The link's interface was replaced (same index, new device): start over.
                    warn!(interface = name, error = %e, "a pinned packet-guard link could not take the new program; attaching anew");
                    let _ = fs::remove_file(pin);
                }
            }
        }
        let id = program
            .attach_with_options(
                name,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|source| KernelError::AttachInterface {
                interface: name.to_owned(),
                source,
            })?;
        let link: FdLink = program
            .take_link(id)
            .map_err(program_err)?
            .try_into()
            .map_err(|e| KernelError::Bpffs {
                path: format!("interface {name}").into(),
                message: format!("{prog_name} was not attached with a tcx link: {e}"),
            })?;
        info!(interface = name, "packet guard attached");
        match pin {
            Some(pin) => {
                let pinned = link.pin(&pin).map_err(|e| KernelError::Bpffs {
                    path: pin.clone(),
                    message: format!("cannot pin: {e}"),
                })?;
                Ok(pinned.into())
            }
            None => Ok(link),
        }
    }
}

/// The link-layer header length of an interface, from its ARP hardware type: Ethernet and
/// loopback carry 14 bytes; tun, IP tunnels and other raw-IP devices none. Unknown types are
/// read as Ethernet.
fn link_header_len(name: &str) -> u32 {
    let kind = fs::read_to_string(format!("/sys/class/net/{name}/type"))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok());
    match kind {
        // ARPHRD_NONE, ARPHRD_TUNNEL, TUNNEL6, SIT, IPGRE, IP6GRE, RAWIP, PPP.
        Some(65534 | 768 | 769 | 776 | 778 | 823 | 519 | 512) => 0,
        _ => 14,
    }
}

/// Pins of interfaces that no longer exist (their links were detached with the device).
fn remove_stale_pins(dir: &Path, present: &BTreeMap<u32, String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(index) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PIN_PREFIX))
            .and_then(|i| i.parse::<u32>().ok())
        else {
            continue;
        };
        if !present.contains_key(&index) {
            let _ = fs::remove_file(e.path());
        }
    }
}
