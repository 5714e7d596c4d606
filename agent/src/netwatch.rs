//! Keeps the programs' view of the host's network current: the local addresses
//! (`AIRLOCK_LOCAL`, from the `local` routing table) and the interfaces the packet guard is
//! attached to. Woken by the kernel's link, address and route notifications (and every 30 s
//! in case one was lost), on a thread of its own (`airlock-netwatch`).

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::{kernel::LocalAddrs, netlink, proxy::Proxy};

/// Multicast groups: links, IPv4/IPv6 addresses and routes.
const GROUPS: u32 = 0x1 /* LINK */ | crate::kernel::LOCAL_CHANGE_GROUPS;
const RESYNC: Duration = Duration::from_secs(30);

pub fn spawn(
    proxy: Arc<Proxy>,
    links_dir: Option<PathBuf>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let socket = netlink::Socket::open(netlink::NETLINK_ROUTE, GROUPS)?;
    socket.set_timeout(Duration::from_millis(250))?;
    std::thread::Builder::new()
        .name("airlock-netwatch".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let changed = socket.recv(&mut buf).is_ok();
                if !changed && last.elapsed() < RESYNC {
                    continue;
                }
                // Let a burst (an interface with its addresses) arrive, then take what is
                // queued: one sync covers it all.
                if changed {
                    std::thread::sleep(Duration::from_millis(20));
                    let _ = socket.set_timeout(Duration::from_millis(1));
                    let mut drained = 0;
                    while drained < 1024 && socket.recv(&mut buf).is_ok_and(|n| n > 0) {
                        drained += 1;
                    }
                    let _ = socket.set_timeout(Duration::from_millis(250));
                }
                last = Instant::now();
                sync(&proxy, links_dir.as_deref());
            }
        })
}

/// Bring the maps and the packet guard in line with the host now.
pub fn sync(proxy: &Proxy, links_dir: Option<&std::path::Path>) {
    let local = match LocalAddrs::read() {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(error = %e, "cannot read the local routing table; the previous local addresses stay");
            None
        }
    };
    let Ok(mut kernel) = proxy.kernel.lock() else {
        return;
    };
    if let Some(local) = local
        && let Err(e) = kernel.set_local(local)
    {
        warn!(error = %e, "cannot update the local addresses of the programs");
    }
    match kernel.guard_interfaces(links_dir) {
        Ok(added) if !added.is_empty() => info!(?added, "packet guard attached to new interfaces"),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot attach the packet guard to a new interface"),
    }
}
