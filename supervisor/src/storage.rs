//! The storage part of the node config: volumes, NVMe subsystems with their namespaces and
//! allowed hosts, and the fabric's settings; and what duplexd derives from them.
//!
//! ```toml
//! [[volume]]
//! name = "vol0"
//! path = "volumes/vol0.img"   # relative paths are under node.state_dir
//! size = "1GiB"               # created sparse when missing; must match when present
//! block_size = 4096           # 512 or 4096 (default 4096)
//!
//! [[volume]]                  # a volume on an NVMe drive, through the datapath's driver
//! name = "vol1"
//! drive = "vfio-user:drives/d0-a.sock"   # or "vfio:0000:00:04.0" (bound to vfio-pci)
//! nsid = 1                    # default 1
//! size = "1GiB"               # required: the namespace must hold it
//!
//! [[subsystem]]
//! nqn = "nqn.2026-11.io.duplex:vol0"
//! hosts = ["nqn.2014-08.org.nvmexpress:uuid:…"]   # or allow_any_host = true
//! namespaces = [{ nsid = 1, volume = "vol0" }]
//!
//! [fabric]                    # optional; defaults shown
//! cntlid_base = 1             # first controller id (the peer node uses another range)
//! ana_group = 1
//! io_threads = 1              # fabric I/O threads, each with its own datapath channel (1-4)
//! ring_capacity = 256         # fabric ↔ datapath rings
//! pool_chunks = 8192          # shared buffer pool: 8192 × 4 KiB = 32 MiB
//! chunk_size = 4096
//! ```
//!
//! When the node has a datapath service, a service named `fabric` and at least one subsystem,
//! duplexd adds the channels between them itself (rings `fabric-ioN-sq` and `fabric-ioN-cq`
//! for each fabric I/O thread N, pool `fabric-io`), opens every volume (`O_DIRECT` when the file system allows it, else
//! buffered), and hands both services the same [`Topology`] (resource `topology`); volumes
//! go to the datapath only (`volume:NAME`).
//!
//! Namespace NGUID and UUID are derived from the subsystem NQN, the namespace id and the volume
//! name, so they are the same on every start and on both nodes of a pair (hosts merge
//! multipath paths on them); a namespace may also set them explicitly.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use duplex_ipc::control::ResourceKind;
use duplex_ipc::topology::{
    ChannelSpec, DriveSpec, DriveTransport, IoSpec, ListenerKind, ListenerSpec, NamespaceSpec,
    SubsystemSpec, Topology, VolumeSpec, TOPOLOGY_VERSION,
};
use serde::Deserialize;
use toml::Spanned;

/// Name of the fabric service the storage topology is for.
pub const FABRIC: &str = "fabric";
/// Fabric I/O threads at most (each has a channel of its own to the datapath).
pub const MAX_IO_THREADS: u16 = 4;

/// The derived submission ring of fabric I/O thread `thread`.
pub fn submit_ring(thread: u16) -> String {
    format!("fabric-io{thread}-sq")
}

/// The derived completion ring of fabric I/O thread `thread`.
pub fn complete_ring(thread: u16) -> String {
    format!("fabric-io{thread}-cq")
}
/// The derived pool.
pub const IO_POOL: &str = "fabric-io";
/// Name of the metadata service (pools on the `[[drive]]`s).
pub const METADATA: &str = "metadata";
/// The metadata service's privileged submission ring to the datapath.
pub const META_SUBMIT_RING: &str = "metadata-io-sq";
/// Its completion ring.
pub const META_COMPLETE_RING: &str = "metadata-io-cq";

/// `[[volume]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Unique name.
    pub name: Spanned<String>,
    /// Backing file or block device.
    pub path: Option<Spanned<PathBuf>>,
    /// Or an NVMe drive the datapath drives itself: `"vfio-user:SOCKET"` (a socket path,
    /// relative ones under node.state_dir; `duplex-drive-sim` serves these) or
    /// `"vfio:PCI-ADDRESS"` (a function bound to `vfio-pci`).
    pub drive: Option<Spanned<String>>,
    /// The drive's namespace (default 1).
    pub nsid: Option<Spanned<u32>>,
    /// Size ("1GiB", "512MiB", or bytes); required to create a missing file.
    pub size: Option<Spanned<Size>>,
    /// Logical block size.
    #[serde(default = "default_block_size")]
    pub block_size: Spanned<u32>,
}

fn default_block_size() -> Spanned<u32> {
    Spanned::new(0..0, 4096)
}

/// A size in bytes, written as a number or a string with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses "4096", "64KiB", "1GiB", "2TiB", "10G" (units are binary).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number with an optional unit"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        u => {
            return Err(format!(
                "size {s:?}: unknown unit {u:?} (use KiB, MiB, GiB, TiB)"
            ))
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// `[[subsystem]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsystemConfig {
    /// Subsystem NQN.
    pub nqn: Spanned<String>,
    /// Any host may connect.
    #[serde(default)]
    pub allow_any_host: bool,
    /// Host NQNs allowed to connect.
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    /// Namespaces.
    #[serde(default)]
    pub namespaces: Vec<NamespaceConfig>,
    /// Serial number (default derived from the NQN).
    pub serial: Option<String>,
    /// Model number.
    #[serde(default = "default_model")]
    pub model: String,
}

fn default_model() -> String {
    "duplex".to_owned()
}

/// One namespace of a subsystem.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Namespace id.
    pub nsid: Spanned<u32>,
    /// Volume name.
    pub volume: Spanned<String>,
    /// NGUID as 32 hex digits (default derived).
    pub nguid: Option<Spanned<String>>,
    /// UUID (default derived).
    pub uuid: Option<Spanned<String>>,
}

/// `[fabric]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FabricSettings {
    /// First controller id.
    pub cntlid_base: u16,
    /// ANA group id of this node.
    pub ana_group: u32,
    /// Fabric I/O threads, each with its own channel (ring pair) to the datapath; connections
    /// are dealt out over them in turn.
    pub io_threads: u16,
    /// Slots of each fabric ↔ datapath ring.
    pub ring_capacity: u64,
    /// Chunks in the shared buffer pool.
    pub pool_chunks: u64,
    /// Bytes per chunk.
    pub chunk_size: u64,
}

impl Default for FabricSettings {
    fn default() -> Self {
        Self {
            cntlid_base: 1,
            ana_group: 1,
            io_threads: 1,
            ring_capacity: 256,
            pool_chunks: 8192,
            chunk_size: 4096,
        }
    }
}

/// Checks an NQN: `nqn.yyyy-mm.reverse.domain:anything` or the UUID form, at most 223 bytes.
pub fn valid_nqn(n: &str) -> bool {
    n.len() <= 223
        && n.starts_with("nqn.")
        && n.is_ascii()
        && !n.contains(char::is_whitespace)
        && n.len() > 4
}

/// Parses 32 hex digits (dashes allowed) into 16 bytes.
pub fn parse_id(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// 128-bit FNV-1a of `parts` (separated): the stable identity of a namespace.
pub fn derive_id(parts: &[&str]) -> [u8; 16] {
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013B;
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u128::from(b);
            h = h.wrapping_mul(PRIME);
        }
    }
    h.to_be_bytes()
}

/// A UUID (version 8: vendor-defined, RFC 9562 variant) from derived bytes.
pub fn as_uuid(mut b: [u8; 16]) -> [u8; 16] {
    b[6] = (b[6] & 0x0F) | 0x80;
    b[8] = (b[8] & 0x3F) | 0x80;
    b
}

/// An opened volume.
#[derive(Debug)]
pub struct OpenVolume {
    /// What the services are told.
    pub spec: VolumeSpec,
    /// The resources the datapath gets for it: the open file, or the drive's connection
    /// (vfio-user stream; kernel VFIO container, group, device).
    pub fds: Vec<(String, ResourceKind, std::os::fd::OwnedFd)>,
}

/// Where a drive volume's drive is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriveAddress {
    /// A vfio-user socket path.
    VfioUser(PathBuf),
    /// A PCI address of a function bound to vfio-pci.
    Vfio(String),
}

/// Parses a volume's `drive` ("vfio-user:SOCKET" or "vfio:PCI-ADDRESS").
pub fn parse_drive(s: &str) -> Result<DriveAddress, String> {
    if let Some(p) = s.strip_prefix("vfio-user:") {
        if p.is_empty() {
            return Err("drive \"vfio-user:\" names no socket".into());
        }
        return Ok(DriveAddress::VfioUser(PathBuf::from(p)));
    }
    if let Some(bdf) = s.strip_prefix("vfio:") {
        let ok = bdf.len() == 12
            && bdf.char_indices().all(|(i, c)| match i {
                4 | 7 => c == ':',
                10 => c == '.',
                _ => c.is_ascii_hexdigit(),
            });
        if !ok {
            return Err(format!(
                "drive {s:?}: expected a PCI address like vfio:0000:00:04.0"
            ));
        }
        return Ok(DriveAddress::Vfio(bdf.to_owned()));
    }
    Err(format!(
        "drive {s:?}: expected \"vfio-user:SOCKET\" or \"vfio:PCI-ADDRESS\""
    ))
}

/// Errors opening volumes.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A volume could not be opened or created.
    #[error("volume {name}: {path}: {message}")]
    Volume {
        /// Volume name.
        name: String,
        /// Its path.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// Opens (creating sparse if missing) every volume; connects to the drives of drive volumes.
/// Volume ids are 1, 2, … in config order. `node` names the host identifier this node
/// registers reservations under.
/// `fence_key` is the reservation key a cluster member registers on its drives (0: none).
pub fn open_volumes(
    volumes: &[VolumeConfig],
    state_dir: &Path,
    node: &str,
    fence_key: u64,
) -> Result<Vec<OpenVolume>, StorageError> {
    let mut out = Vec::new();
    for (i, v) in volumes.iter().enumerate() {
        let name = v.name.get_ref().clone();
        let Some(path) = &v.path else {
            out.push(open_drive(v, i, state_dir, node, fence_key)?);
            continue;
        };
        let path = state_dir.join(path.get_ref());
        let fail = |message: String| StorageError::Volume {
            name: name.clone(),
            path: path.display().to_string(),
            message,
        };
        let want = v.size.as_ref().map(|s| s.get_ref().0);
        if !path.exists() {
            let size = want
                .ok_or_else(|| fail("does not exist and has no size to create it with".into()))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| fail(format!("cannot create its directory: {e}")))?;
            }
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| fail(format!("cannot create: {e}")))?;
            f.set_len(size)
                .map_err(|e| fail(format!("cannot size: {e}")))?;
            tracing::info!(volume = %name, path = %path.display(), size, "created sparse volume file");
        }
        let (mut file, direct) = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc_o_direct())
            .open(&path)
        {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(22) => {
                tracing::info!(
                    volume = %name,
                    path = %path.display(),
                    "the file system refuses O_DIRECT (tmpfs?): buffered I/O, flushes still reach the file"
                );
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| fail(format!("cannot open: {e}")))?;
                (f, false)
            }
            Err(e) => return Err(fail(format!("cannot open: {e}"))),
        };
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(|e| fail(format!("cannot size: {e}")))?;
        if let Some(w) = want {
            if w != len {
                return Err(fail(format!(
                    "is {len} bytes but the config says {w}; refusing to resize an existing volume"
                )));
            }
        }
        let bs = u64::from(*v.block_size.get_ref());
        let blocks = len / bs;
        if blocks == 0 || len % bs != 0 {
            return Err(fail(format!(
                "{len} bytes is not a positive multiple of the block size {bs}"
            )));
        }
        out.push(OpenVolume {
            spec: VolumeSpec {
                id: i as u32 + 1,
                name: name.clone(),
                resource: format!("volume:{name}"),
                path: path.display().to_string(),
                block_size: bs as u32,
                blocks,
                direct,
                drive: None,
            },
            fds: vec![(format!("volume:{name}"), ResourceKind::File, file.into())],
        });
    }
    Ok(out)
}

/// Connects to the drive of a drive volume (checked by the config validation).
fn open_drive(
    v: &VolumeConfig,
    i: usize,
    state_dir: &Path,
    node: &str,
    fence_key: u64,
) -> Result<OpenVolume, StorageError> {
    let name = v.name.get_ref().clone();
    let raw = v
        .drive
        .as_ref()
        .map(|d| d.get_ref().clone())
        .unwrap_or_default();
    let fail = |message: String| StorageError::Volume {
        name: name.clone(),
        path: raw.clone(),
        message,
    };
    let bs = *v.block_size.get_ref();
    let size = v
        .size
        .as_ref()
        .map(|s| s.get_ref().0)
        .ok_or_else(|| fail("a drive volume needs a size".into()))?;
    let resource = format!("drive:{name}");
    let (transport, address, fds) = match parse_drive(&raw).map_err(fail)? {
        DriveAddress::VfioUser(p) => {
            let p = state_dir.join(p);
            let stream = std::os::unix::net::UnixStream::connect(&p).map_err(|e| {
                fail(format!(
                    "cannot connect to {}: {e} (is the drive (duplex-drive-sim) running?)",
                    p.display()
                ))
            })?;
            (
                DriveTransport::VfioUser,
                p.display().to_string(),
                vec![(resource.clone(), ResourceKind::Socket, stream.into())],
            )
        }
        DriveAddress::Vfio(bdf) => {
            let h = duplex_vfio::kernel::open(&bdf).map_err(|e| fail(e.to_string()))?;
            (
                DriveTransport::Vfio,
                bdf,
                vec![
                    (
                        format!("{resource}:container"),
                        ResourceKind::File,
                        h.container,
                    ),
                    (format!("{resource}:group"), ResourceKind::File, h.group),
                    (format!("{resource}:device"), ResourceKind::File, h.device),
                ],
            )
        }
    };
    Ok(OpenVolume {
        spec: VolumeSpec {
            id: i as u32 + 1,
            name: name.clone(),
            resource,
            path: address,
            block_size: bs,
            blocks: size / u64::from(bs),
            direct: false,
            drive: Some(DriveSpec {
                transport,
                nsid: v.nsid.as_ref().map_or(1, |n| *n.get_ref()),
                host_id: derive_id(&["host", node]),
                fence_key,
            }),
        },
        fds,
    })
}

fn libc_o_direct() -> i32 {
    nix::fcntl::OFlag::O_DIRECT.bits()
}

/// The listeners the fabric gets, with their kinds.
#[derive(Debug)]
pub struct FabricListener {
    /// Resource name.
    pub resource: String,
    /// Address.
    pub address: std::net::SocketAddr,
    /// Kind.
    pub kind: ListenerKind,
    /// TLS required.
    pub tls: bool,
}

/// Builds the topology for the fabric and the datapath.
pub fn topology(
    node: &str,
    fabric: &FabricSettings,
    subsystems: &[SubsystemConfig],
    volumes: &[OpenVolume],
    listeners: &[FabricListener],
    channel: bool,
) -> Topology {
    topology_with_drives(
        node,
        fabric,
        subsystems,
        volumes,
        listeners,
        channel,
        &[],
        false,
    )
}

/// As [`topology`], with pool drives and (`meta`) the metadata service's channel.
#[allow(clippy::too_many_arguments)]
pub fn topology_with_drives(
    node: &str,
    fabric: &FabricSettings,
    subsystems: &[SubsystemConfig],
    volumes: &[OpenVolume],
    listeners: &[FabricListener],
    channel: bool,
    drives: &[OpenVolume],
    meta: bool,
) -> Topology {
    let subsystems = subsystems
        .iter()
        .map(|s| {
            let nqn = s.nqn.get_ref().clone();
            let serial = s.serial.clone().unwrap_or_else(|| {
                let id = derive_id(&["serial", &nqn]);
                id[..8].iter().map(|b| format!("{b:02x}")).collect()
            });
            SubsystemSpec {
                namespaces: s
                    .namespaces
                    .iter()
                    .filter_map(|n| {
                        let vol = volumes
                            .iter()
                            .find(|v| &v.spec.name == n.volume.get_ref())?;
                        let nsid = *n.nsid.get_ref();
                        let derived =
                            derive_id(&["namespace", &nqn, &nsid.to_string(), &vol.spec.name]);
                        Some(NamespaceSpec {
                            nsid,
                            volume: vol.spec.id,
                            nguid: n
                                .nguid
                                .as_ref()
                                .and_then(|g| parse_id(g.get_ref()))
                                .unwrap_or(derived),
                            uuid: n
                                .uuid
                                .as_ref()
                                .and_then(|u| parse_id(u.get_ref()))
                                .unwrap_or_else(|| as_uuid(derived)),
                        })
                    })
                    .collect(),
                nqn,
                serial,
                model: s.model.clone(),
                allow_any_host: s.allow_any_host,
                hosts: s.hosts.iter().map(|h| h.get_ref().clone()).collect(),
            }
        })
        .collect();
    Topology {
        version: TOPOLOGY_VERSION,
        node: node.to_owned(),
        cntlid_base: fabric.cntlid_base,
        ana_group: fabric.ana_group,
        volumes: volumes.iter().map(|v| v.spec.clone()).collect(),
        subsystems,
        io: IoSpec {
            pool: IO_POOL.to_owned(),
            channels: if channel {
                (0..fabric.io_threads.clamp(1, MAX_IO_THREADS))
                    .map(|t| ChannelSpec {
                        submit: submit_ring(t),
                        complete: complete_ring(t),
                    })
                    .collect()
            } else {
                Vec::new()
            },
        },
        listeners: listeners
            .iter()
            .map(|l| ListenerSpec {
                resource: l.resource.clone(),
                address: l.address.to_string(),
                kind: l.kind,
                tls: l.tls,
            })
            .collect(),
        drives: drives.iter().map(|d| d.spec.clone()).collect(),
        meta: meta.then(|| ChannelSpec {
            submit: META_SUBMIT_RING.to_owned(),
            complete: META_COMPLETE_RING.to_owned(),
        }),
        cluster: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ids() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        let a = derive_id(&["namespace", "nqn.x", "1", "v"]);
        assert_eq!(a, derive_id(&["namespace", "nqn.x", "1", "v"]));
        assert_ne!(a, derive_id(&["namespace", "nqn.x", "2", "v"]));
        assert_ne!(
            derive_id(&["ab", "c"]),
            derive_id(&["a", "bc"]),
            "parts are separated"
        );
        let u = as_uuid(a);
        assert_eq!(u[6] >> 4, 8);
        assert_eq!(
            parse_id("00112233-4455-6677-8899-aabbccddeeff").map(|b| b[15]),
            Some(0xff)
        );
        assert_eq!(parse_id("0011"), None);
        assert!(valid_nqn("nqn.2026-11.io.duplex:a"));
        assert!(!valid_nqn("iqn.x"));
        assert!(!valid_nqn(&format!("nqn.{}", "a".repeat(300))));
    }
}
