//! The host link watch of a cluster member: is the interface that carries the fabric's
//! listener up? duplexd (which, unlike the sandboxed services, sees the node's interfaces)
//! checks every 100 ms; a link down for the dead time is written to the node's cluster state
//! region, where the metadata service reads it and moves the pools this node owns to the peer
//! (failure matrix row 2: the owner's host-facing link down, the node alive). A link back up is
//! written at once.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use duplex_ipc::cluster::ClusterRegion;
use nix::ifaddrs::getifaddrs;
use nix::net::if_::InterfaceFlags;

/// How often the interfaces are looked at.
const EVERY: Duration = Duration::from_millis(100);

/// Whether an interface holding `addr` is up with its carrier (`None`: no interface holds it).
pub fn link_up(addr: IpAddr) -> Option<bool> {
    let mut found = None;
    for ifa in getifaddrs().ok()? {
        let Some(a) = ifa.address else { continue };
        let ip = match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) => IpAddr::V6(v6.ip()),
            _ => continue,
        };
        if ip == addr {
            let up = ifa.flags.contains(InterfaceFlags::IFF_UP)
                && ifa.flags.contains(InterfaceFlags::IFF_RUNNING);
            found = Some(found.unwrap_or(false) || up);
        }
    }
    found
}

/// Watches the interface of `addr` for the life of the process, writing to `region`.
pub fn spawn(addr: IpAddr, dead: Duration, region: ClusterRegion) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("host-link".into())
        .spawn(move || {
            tracing::info!(%addr, "watching the host link (the interface of the fabric's listener)");
            let mut down_since: Option<Instant> = None;
            let mut reported_down = false;
            loop {
                let up = link_up(addr).unwrap_or(false);
                if up {
                    down_since = None;
                    if reported_down {
                        reported_down = false;
                        region.set_host_link_down(false);
                        tracing::warn!(%addr, "host link up again");
                    }
                } else {
                    let since = *down_since.get_or_insert_with(Instant::now);
                    if !reported_down && since.elapsed() >= dead {
                        reported_down = true;
                        region.set_host_link_down(true);
                        tracing::error!(%addr, down_ms = since.elapsed().as_millis() as u64, "HOST LINK DOWN: hosts cannot reach this node; its pools go to the peer");
                    }
                }
                std::thread::sleep(EVERY);
            }
        })
        .map(drop)
}
