//! The storage topology the supervisor hands to the fabric and the datapath.
//!
//! The node config (`supervisor/src/config.rs`) declares volumes, subsystems, namespaces, allowed
//! hosts and listeners. The supervisor validates it, opens the volumes' backing files, derives
//! what services must agree on (volume ids, NGUID/UUID of each namespace, the fabric↔datapath
//! rings and pool) and hands every storage service the same [`Topology`]: JSON in a memfd sealed
//! against writes (resource [`TOPOLOGY_RESOURCE`]), read once at start. A service cannot open
//! files in its sandbox, and a restarted one gets the very same bytes.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use serde::{Deserialize, Serialize};

/// Name of the resource carrying the topology.
pub const TOPOLOGY_RESOURCE: &str = "topology";
/// Format version; a service refuses another.
pub const TOPOLOGY_VERSION: u32 = 1;
/// Pool holder role of the datapath (see `pool::Holder`).
pub const ROLE_DATAPATH: u8 = 1;
/// Pool holder role of the fabric.
pub const ROLE_FABRIC: u8 = 2;
/// Pool holder role of the metadata service (its privileged channel's buffers).
pub const ROLE_METADATA: u8 = 3;
/// Largest topology accepted (bytes).
pub const MAX_TOPOLOGY_BYTES: u64 = 1 << 20;

/// Errors handing over or reading the topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A system call failed.
    #[error("Topology memfd: {what}: {source}")]
    Sys {
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The fd is not a memfd sealed against writes, or is too large.
    #[error("Topology fd is unusable: {0}")]
    BadFd(String),
    /// The content is not a topology this build understands.
    #[error("Topology is malformed: {0}")]
    Malformed(String),
}

/// Everything the storage services must agree on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// [`TOPOLOGY_VERSION`].
    pub version: u32,
    /// Node name.
    pub node: String,
    /// First controller id this node hands out (the peer uses another range).
    pub cntlid_base: u16,
    /// This node's ANA group id.
    pub ana_group: u32,
    /// Volumes (backing stores), by id.
    pub volumes: Vec<VolumeSpec>,
    /// NVMe subsystems exported to hosts.
    pub subsystems: Vec<SubsystemSpec>,
    /// The fabric ↔ datapath channels.
    pub io: IoSpec,
    /// NVMe/TCP listeners of the fabric.
    pub listeners: Vec<ListenerSpec>,
    /// Drives the metadata service builds pools on: the datapath opens each as a raw device
    /// (device index = its position after the volumes), exported only through pools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<VolumeSpec>,
    /// The metadata service's privileged channel to the datapath: descriptors address the
    /// drives above by raw drive id (their datapath device index), on the same pool as `io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<ChannelSpec>,
    /// Cluster membership (`[cluster]`), for the cluster service; absent on a standalone node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterSpec>,
}

/// This node as a member of a two-controller array.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// The array's name (both nodes say the same; the interconnect refuses another).
    pub name: String,
    /// This node's id (1..=4; its heartbeat slot and on-disk owner number is `node_id - 1`).
    pub node_id: u16,
    /// The peer's node id (1..=4).
    pub peer_id: u16,
    /// This boot's number (duplexd's start time in ms, 48 bits).
    pub boot: u64,
    /// The peer's interconnect address.
    pub peer: std::net::SocketAddr,
    /// The resource of the interconnect listener (`listener:NAME`), if the node has one.
    pub listener: Option<String>,
    /// Interval of the interconnect heartbeat (ms).
    pub beat_ms: u64,
    /// Silence after which a heartbeat counts as stopped (ms).
    pub dead_ms: u64,
}

impl ClusterSpec {
    /// This node's heartbeat slot and on-disk owner number.
    pub fn slot(&self) -> usize {
        usize::from(self.node_id.saturating_sub(1))
    }

    /// The peer's.
    pub fn peer_slot(&self) -> usize {
        usize::from(self.peer_id.saturating_sub(1))
    }
}

/// One volume: a backing file or block device the datapath serves blocks from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Id used in I/O descriptors.
    pub id: u32,
    /// Name in the node config.
    pub name: String,
    /// Resource carrying the opened backing file (`volume:NAME`).
    pub resource: String,
    /// Backing path, for messages only (the service never opens it).
    pub path: String,
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    /// Size in logical blocks.
    pub blocks: u64,
    /// The backing fd was opened with `O_DIRECT`.
    pub direct: bool,
    /// Served from a namespace of an NVMe drive through the datapath's own driver instead of
    /// a file: `resource` and `path` then name the drive's handed-over connection and address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drive: Option<DriveSpec>,
}

/// How the datapath reaches the NVMe drive behind a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriveTransport {
    /// A vfio-user socket (`duplex-drive-sim`, or any vfio-user NVMe device): the volume's
    /// resource is the connected stream.
    VfioUser,
    /// A PCIe function bound to `vfio-pci`: resources `RESOURCE:container`, `RESOURCE:group`
    /// and `RESOURCE:device`.
    Vfio,
}

/// The drive behind a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveSpec {
    /// Transport.
    pub transport: DriveTransport,
    /// Namespace id on the drive.
    pub nsid: u32,
    /// Host identifier the node registers reservations under (Set Features 81h).
    pub host_id: [u8; 16],
    /// The reservation key of this node and boot when the node is a cluster member
    /// (`duplex_datapath::fence::FenceKey`): registered on the drive at bring-up, and a
    /// Reservation Conflict then means the peer fenced this node. 0: not a cluster member
    /// (conflicts reach the host as they are).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fence_key: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One NVMe subsystem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsystemSpec {
    /// Subsystem NQN.
    pub nqn: String,
    /// Serial number reported by its controllers (ASCII, at most 20 bytes).
    pub serial: String,
    /// Model number (ASCII, at most 40 bytes).
    pub model: String,
    /// Any host may connect.
    pub allow_any_host: bool,
    /// Host NQNs allowed to connect (when not `allow_any_host`).
    pub hosts: Vec<String>,
    /// Namespaces.
    pub namespaces: Vec<NamespaceSpec>,
}

/// One namespace of a subsystem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    /// Namespace id (1-based).
    pub nsid: u32,
    /// Volume id.
    pub volume: u32,
    /// Namespace globally unique identifier (stable: derived from config, not from a run).
    pub nguid: [u8; 16],
    /// Namespace UUID (stable as the NGUID).
    pub uuid: [u8; 16],
}

/// The rings and pool between the fabric and the datapath.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoSpec {
    /// Pool resource name without the `pool:` prefix.
    pub pool: String,
    /// One channel per fabric I/O thread.
    pub channels: Vec<ChannelSpec>,
}

/// A submission ring (fabric → datapath) and its completion ring (datapath → fabric). Ring
/// resources are `ring:NAME`, `ring:NAME:data`, `ring:NAME:space`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    /// Submission ring name.
    pub submit: String,
    /// Completion ring name.
    pub complete: String,
}

/// What a fabric listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// I/O subsystems (and the discovery subsystem).
    Nvme,
    /// The discovery subsystem only.
    Discovery,
}

/// One listening socket of the fabric.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    /// Resource name (`listener:NAME`).
    pub resource: String,
    /// Bound address (as reported in the discovery log).
    pub address: String,
    /// What it serves.
    pub kind: ListenerKind,
    /// Hosts must connect over TLS 1.3 with a PSK.
    #[serde(default)]
    pub tls: bool,
}

impl Topology {
    /// The volume with id `id`.
    pub fn volume(&self, id: u32) -> Option<&VolumeSpec> {
        self.volumes.iter().find(|v| v.id == id)
    }

    /// The raw drive id (datapath device index) of pool drive `i`.
    pub fn drive_id(&self, i: usize) -> u32 {
        u32::try_from(self.volumes.len() + i).unwrap_or(u32::MAX)
    }

    /// Writes the topology into a new memfd sealed against any change.
    pub fn to_memfd(&self) -> Result<OwnedFd, TopologyError> {
        let json = serde_json::to_vec(self).map_err(|e| TopologyError::Malformed(e.to_string()))?;
        let fd = memfd_create(
            c"duplex:topology",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .map_err(|e| TopologyError::Sys {
            what: "memfd_create",
            source: e.into(),
        })?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&json).map_err(|source| TopologyError::Sys {
            what: "write",
            source,
        })?;
        let fd = OwnedFd::from(file);
        let seals = SealFlag::F_SEAL_WRITE
            | SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_SEAL;
        fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(|e| TopologyError::Sys {
            what: "F_ADD_SEALS",
            source: e.into(),
        })?;
        Ok(fd)
    }

    /// Reads a topology from a handed-over memfd, refusing one that is not sealed against
    /// writes, too large, of another version, or inconsistent.
    pub fn from_memfd(fd: OwnedFd) -> Result<Self, TopologyError> {
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS)
            .map_err(|e| TopologyError::BadFd(format!("not a memfd ({e})")))?;
        let seals = SealFlag::from_bits_truncate(seals);
        if !seals.contains(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK) {
            return Err(TopologyError::BadFd(
                "memfd is not sealed against writes".into(),
            ));
        }
        // The memfd is one open file shared by every service it was handed to: read with
        // explicit offsets (pread), never through the shared file position.
        let file = std::fs::File::from(fd);
        let len = file
            .metadata()
            .map_err(|source| TopologyError::Sys {
                what: "fstat",
                source,
            })?
            .len();
        if len > MAX_TOPOLOGY_BYTES {
            return Err(TopologyError::BadFd(format!(
                "{len} bytes is more than the {MAX_TOPOLOGY_BYTES} accepted"
            )));
        }
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|source| TopologyError::Sys {
                what: "pread",
                source,
            })?;
        Self::from_json(&bytes)
    }

    /// Parses and checks a topology.
    pub fn from_json(bytes: &[u8]) -> Result<Self, TopologyError> {
        let t: Self =
            serde_json::from_slice(bytes).map_err(|e| TopologyError::Malformed(e.to_string()))?;
        t.validate()?;
        Ok(t)
    }

    /// Checks internal consistency (what the supervisor guarantees; a service re-checks).
    pub fn validate(&self) -> Result<(), TopologyError> {
        let bad = |m: String| Err(TopologyError::Malformed(m));
        if self.version != TOPOLOGY_VERSION {
            return bad(format!(
                "version {} (this build reads {TOPOLOGY_VERSION})",
                self.version
            ));
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if !matches!(v.block_size, 512 | 4096) {
                return bad(format!("volume {}: block size {}", v.name, v.block_size));
            }
            if v.blocks == 0 || v.blocks.checked_mul(u64::from(v.block_size)).is_none() {
                return bad(format!("volume {}: {} blocks", v.name, v.blocks));
            }
            if self.volumes[..i].iter().any(|o| o.id == v.id) {
                return bad(format!("volume id {} used twice", v.id));
            }
        }
        for (i, d) in self.drives.iter().enumerate() {
            if !matches!(d.block_size, 512 | 4096) || d.blocks == 0 {
                return bad(format!(
                    "drive {}: {} blocks of {}",
                    d.name, d.blocks, d.block_size
                ));
            }
            if self.drives[..i].iter().any(|o| o.name == d.name)
                || self.volumes.iter().any(|o| o.name == d.name)
            {
                return bad(format!("drive name {} used twice", d.name));
            }
        }
        for s in &self.subsystems {
            for (i, n) in s.namespaces.iter().enumerate() {
                if n.nsid == 0 || n.nsid == u32::MAX {
                    return bad(format!("{}: namespace id {}", s.nqn, n.nsid));
                }
                if self.volume(n.volume).is_none() {
                    return bad(format!("{}: nsid {} names no volume", s.nqn, n.nsid));
                }
                if s.namespaces[..i].iter().any(|o| o.nsid == n.nsid) {
                    return bad(format!("{}: nsid {} used twice", s.nqn, n.nsid));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Topology {
        Topology {
            version: TOPOLOGY_VERSION,
            node: "a".into(),
            cntlid_base: 1,
            ana_group: 1,
            volumes: vec![VolumeSpec {
                id: 1,
                name: "vol0".into(),
                resource: "volume:vol0".into(),
                path: "/tmp/vol0".into(),
                block_size: 4096,
                blocks: 256,
                direct: false,
                drive: None,
            }],
            subsystems: vec![SubsystemSpec {
                nqn: "nqn.2026-11.io.duplex:a".into(),
                serial: "s".into(),
                model: "m".into(),
                allow_any_host: true,
                hosts: vec![],
                namespaces: vec![NamespaceSpec {
                    nsid: 1,
                    volume: 1,
                    nguid: [1; 16],
                    uuid: [2; 16],
                }],
            }],
            io: IoSpec {
                pool: "io".into(),
                channels: vec![ChannelSpec {
                    submit: "io0.sq".into(),
                    complete: "io0.cq".into(),
                }],
            },
            listeners: vec![],
            drives: vec![],
            meta: None,
            cluster: None,
        }
    }

    #[test]
    fn round_trips_through_a_sealed_memfd() {
        let t = sample();
        let fd = t.to_memfd().expect("memfd");
        assert_eq!(Topology::from_memfd(fd).expect("read"), t);
    }

    #[test]
    fn readers_sharing_one_open_file_each_read_it_whole() {
        let fd = sample().to_memfd().expect("memfd");
        let other = fd.try_clone().expect("dup");
        // A reader that moved the shared file position (as another service's read does).
        let mut f = std::fs::File::from(other.try_clone().expect("dup"));
        std::io::Read::read_to_end(&mut f, &mut Vec::new()).expect("read");
        assert_eq!(
            Topology::from_memfd(other).expect("second reader"),
            sample()
        );
        assert_eq!(Topology::from_memfd(fd).expect("third reader"), sample());
    }

    #[test]
    fn refuses_unsealed_and_inconsistent() {
        let fd = crate::region::raw_memfd_for_tests(10, false, b"{}").expect("memfd");
        assert!(matches!(
            Topology::from_memfd(fd),
            Err(TopologyError::BadFd(_))
        ));
        let mut t = sample();
        t.subsystems[0].namespaces[0].volume = 9;
        let json = serde_json::to_vec(&t).expect("json");
        assert!(Topology::from_json(&json).is_err());
        assert!(Topology::from_json(b"{\"version\":1}").is_err());
        let mut t = sample();
        t.version = 2;
        assert!(Topology::from_json(&serde_json::to_vec(&t).expect("json")).is_err());
    }
}
