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

/// How often the interfaces are looked at.
const EVERY: Duration = Duration::from_millis(100);

/// Whether the interface holding `addr` is up (`None`: no interface holds it, or it cannot
/// be read). The interface is found by its address; it is up when sysfs (the namespace's own
/// under `ip netns exec`) says it is administratively up and has its carrier.
pub fn link_up(addr: IpAddr) -> Option<bool> {
    let all = match getifaddrs() {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(error = %e, "getifaddrs failed");
            return None;
        }
    };
    let mut name = None;
    for ifa in all {
        let Some(a) = ifa.address else { continue };
        let ip = match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) => IpAddr::V6(v6.ip()),
            _ => continue,
        };
        if ip == addr {
            name = Some(ifa.interface_name);
            break;
        }
    }
    let name = name?;
    if name.contains('/') || name.starts_with('.') {
        return None;
    }
    // Administratively up (IFF_UP, bit 0 of `flags`) with its carrier. Not `operstate`: the
    // kernel derives it from the lower device found by index in the interface's own
    // namespace, which for a veth whose peer lives in another namespace can be an unrelated
    // interface (seen: the host veth reported down while the interconnect veth was down).
    let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).ok()?;
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).ok()?;
    if flags & 1 == 0 {
        return Some(false);
    }
    // Reading `carrier` of an interface that is down fails (EINVAL): down.
    let carrier = std::fs::read_to_string(format!("/sys/class/net/{name}/carrier"))
        .is_ok_and(|c| c.trim() == "1");
    Some(carrier)
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
                // An address not found (or a failed lookup) says nothing: only an interface
                // seen without its carrier or administratively down counts as down.
                let Some(up) = link_up(addr) else {
                    std::thread::sleep(EVERY);
                    continue;
                };
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
