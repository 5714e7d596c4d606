//! Which of the mechanisms closing the ways around the redirect run (`airlock status`), and
//! which this kernel accepts (`airlock check-config`, [`probe`]).

use airlock_common::names;
use aya::EbpfLoader;

use super::{EBPF_OBJECT, LINKS};

/// Which of the mechanisms that close the ways around the redirect run on this kernel
/// (`airlock status`, `airlock check-config`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Mechanisms {
    /// connect4/connect6 + sock_ops: the redirect itself.
    pub redirect: bool,
    /// The egress guard: TCP to a backend from a socket never redirected is dropped.
    pub egress_guard: bool,
    /// The socket guard (cgroup `sock_create`/`setsockopt`): raw IP sockets (but ICMP),
    /// `IP_HDRINCL`, `PACKET_QDISC_BYPASS` and `AF_XDP` refused.
    pub socket_guard: bool,
    /// The packet guard (tcx egress on every interface): TCP to a backend from a packet socket
    /// of the cgroup dropped. The interfaces it is attached to.
    pub packet_guard: Vec<String>,
    /// Why a mechanism is missing, for the operator.
    pub notes: Vec<String>,
}

impl Mechanisms {
    /// Lines for `airlock status` and `airlock check-config`.
    pub fn describe(&self) -> String {
        let on = |b: bool| if b { "on" } else { "OFF" };
        let mut out = format!(
            "mechanisms: redirect {}  egress guard {}  socket guard {}  packet guard {}\n",
            on(self.redirect),
            on(self.egress_guard),
            on(self.socket_guard),
            if self.packet_guard.is_empty() {
                "OFF".to_owned()
            } else {
                format!("on ({})", self.packet_guard.join(", "))
            },
        );
        for note in &self.notes {
            out.push_str(&format!("  note: {note}\n"));
        }
        out
    }
}

/// Which mechanisms this kernel accepts: every program is loaded (verified) into maps of its
/// own, none is attached. Needs root; without it, every mechanism reads as off with a note.
pub fn probe() -> Mechanisms {
    let mut m = Mechanisms {
        redirect: true,
        socket_guard: true,
        ..Default::default()
    };
    let mut ebpf = match EbpfLoader::new().load(EBPF_OBJECT) {
        Ok(e) => e,
        Err(e) => {
            m.notes
                .push(format!("cannot load the programs: {e} (run as root)"));
            return m;
        }
    };
    for (_, prog_name) in LINKS.iter().chain([("", names::PROG_PACKET_OUT)].iter()) {
        let Some(program) = ebpf.program_mut(prog_name) else {
            m.notes
                .push(format!("{prog_name}: missing from the object"));
            continue;
        };
        let loaded = match program {
            aya::programs::Program::CgroupSockAddr(p) => p.load(),
            aya::programs::Program::SockOps(p) => p.load(),
            aya::programs::Program::CgroupSkb(p) => p.load(),
            aya::programs::Program::CgroupSock(p) => p.load(),
            aya::programs::Program::CgroupSockopt(p) => p.load(),
            aya::programs::Program::SchedClassifier(p) => p.load(),
            _ => continue,
        };
        let ok = match loaded {
            Ok(()) => true,
            Err(e) => {
                m.notes
                    .push(format!("{prog_name}: rejected by this kernel: {e}"));
                false
            }
        };
        match *prog_name {
            names::PROG_CONNECT4 | names::PROG_CONNECT6 | names::PROG_SOCK_OPS => {
                m.redirect &= ok;
            }
            names::PROG_EGRESS => m.egress_guard = ok,
            names::PROG_SOCKET_CREATE | names::PROG_SETSOCKOPT => m.socket_guard &= ok,
            names::PROG_PACKET_OUT if ok => {
                // tcx links (Linux 6.6) are what the guard attaches with.
                if tcx_supported() {
                    m.packet_guard = vec!["every interface".into()];
                } else {
                    m.notes
                        .push("packet guard: tcx links need Linux 6.6 or later".into());
                }
            }
            _ => {}
        }
    }
    m
}

/// Whether the running kernel is 6.6 or later (tcx).
fn tcx_supported() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}
