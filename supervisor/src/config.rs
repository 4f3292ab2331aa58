//! The node config file.
//!
//! TOML, parsed with unknown keys rejected, then validated as a whole (names unique, every
//! reference resolves, dependencies acyclic, sizes sane). Every error is one line naming the file,
//! the line and the key or value at fault.
//!
//! ```toml
//! [node]
//! name = "a"
//! state_dir = "/var/lib/duplex/a"
//!
//! [supervisor]            # optional; defaults shown in SupervisorSettings
//! heartbeat_ms = 100
//!
//! [[service]]
//! name = "datapath"
//! kind = "datapath"       # the datapath is special: if it dies the node stops serving
//!
//! [[service]]
//! name = "fabric"
//! after = ["datapath"]    # started after, stopped before
//!
//! [[ring]]                # an SPSC ring the supervisor creates and hands to both ends
//! name = "io0"
//! producer = "fabric"
//! consumer = "datapath"
//! capacity = 256
//!
//! [[pool]]
//! name = "buffers"
//! chunk_size = 4096
//! chunks = 4096
//! users = ["fabric", "datapath"]
//!
//! [[listener]]            # a socket the supervisor binds and hands to a service
//! name = "nvme"
//! address = "127.0.0.1:4420"
//! service = "fabric"
//! ```

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use duplex_ipc::topology::ListenerKind;
use serde::Deserialize;
use toml::Spanned;

use crate::storage::{
    complete_ring, parse_id, submit_ring, valid_nqn, FabricSettings, SubsystemConfig, VolumeConfig,
    FABRIC, IO_POOL, MAX_IO_THREADS, METADATA, META_COMPLETE_RING, META_SUBMIT_RING,
};

/// Errors reading the node config. Each renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, a missing key or a value of the wrong type.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong (names the key).
        message: String,
    },
    /// Well-formed, but inconsistent.
    #[error("{path}:{line}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// 1-based line of the offending value.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// The whole node config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Identity and state.
    pub node: Node,
    /// Supervisor tunables.
    #[serde(default)]
    pub supervisor: SupervisorSettings,
    /// Services to run.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// Rings between services.
    #[serde(default, rename = "ring")]
    pub rings: Vec<RingConfig>,
    /// Shared buffer pools.
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolConfig>,
    /// Listening sockets handed to services.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Volumes (backing files or block devices) the datapath serves.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    /// Pool drives: the datapath opens them as raw devices, the metadata service builds pools
    /// on them (`duplexctl pool create`). Same keys as `[[volume]]`.
    #[serde(default, rename = "drive")]
    pub drives: Vec<VolumeConfig>,
    /// NVMe subsystems the fabric exports.
    #[serde(default, rename = "subsystem")]
    pub subsystems: Vec<SubsystemConfig>,
    /// Fabric settings.
    #[serde(default)]
    pub fabric: FabricSettings,
    /// Cluster membership (absent: a standalone node).
    #[serde(default)]
    pub cluster: Option<ClusterSettings>,
    /// The array's secrets key (absent: hosts' DH-HMAC-CHAP secrets cannot be stored).
    #[serde(default)]
    pub secrets: Option<SecretsSettings>,
    /// Remote management (absent: duplexctl only through the local socket).
    #[serde(default)]
    pub mgmt: Option<MgmtSettings>,
}

/// `[mgmt]`: the key of the remote management listener (a mgmt `[[listener]]` with
/// `tls = true`): `duplexctl --connect ADDR --key-file FILE` proves it in a TLS 1.3 handshake
/// (PSK), and so does the node. A management port open to anyone is refused by the config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MgmtSettings {
    /// A file holding the key as 64 hexadecimal digits (read by duplexd at start).
    pub key_file: Spanned<PathBuf>,
}

/// `[secrets]`: the array's secrets key, which seals hosts' DH-HMAC-CHAP secrets on the
/// drives. Both controllers of an array need the same key; it is never written to a drive.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsSettings {
    /// A file holding the key as 64 hexadecimal digits (read by duplexd at start).
    pub key_file: Spanned<PathBuf>,
}

/// `[cluster]`: this node as a member of a two-controller array.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// This node's id in the cluster, 1..=4 (the two controllers differ). It names the node
    /// in the reservation key it registers on every drive, and its heartbeat slot and
    /// ownership records on the drives (slot `node_id - 1`).
    pub node_id: Spanned<u16>,
    /// The peer's node id (default: 2 for node 1, 1 for node 2).
    #[serde(default)]
    pub peer_id: Option<Spanned<u16>>,
    /// The array's name, the same on both nodes (default `duplex`).
    #[serde(default)]
    pub name: Option<Spanned<String>>,
    /// The peer's interconnect address (`ip:port`), for the `cluster` service.
    #[serde(default)]
    pub peer: Option<Spanned<std::net::SocketAddr>>,
    /// Interval of the interconnect heartbeat (ms, default 100).
    #[serde(default)]
    pub beat_ms: Option<Spanned<u64>>,
    /// Silence after which a heartbeat counts as stopped (ms, default 3000; more than twice
    /// `beat_ms`).
    #[serde(default)]
    pub dead_ms: Option<Spanned<u64>>,
}

/// The cluster service's name.
pub const CLUSTER: &str = "cluster";
/// The mgmt service's name.
pub const MGMT: &str = "mgmt";
/// The raid service's name (rebuild and scrub scheduling; needs the metadata service).
pub const RAID: &str = "raid";
/// The largest node id (the drives hold four heartbeat slots).
pub const MAX_NODE_ID: u16 = 4;

/// This process's boot number: the wall clock at its start, in milliseconds (48 bits last
/// ~8900 years). Every start of duplexd is a new boot with a new, larger number, so a key
/// registered by an earlier boot is never this boot's; a restarted service keeps it.
fn boot_number() -> u64 {
    static BOOT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64)
            & ((1 << 48) - 1)
    })
}

impl NodeConfig {
    /// The reservation key this node and boot register on their drives: node id in the top
    /// 16 bits, boot number below (`duplex_datapath::fence::FenceKey`). 0 for a standalone
    /// node.
    pub fn fence_key(&self) -> u64 {
        match &self.cluster {
            Some(c) => u64::from(*c.node_id.get_ref()) << 48 | boot_number().max(1),
            None => 0,
        }
    }

    /// The peer's node id: `[cluster] peer_id`, else the other of 1 and 2.
    pub fn peer_id(&self) -> Option<u16> {
        let c = self.cluster.as_ref()?;
        match (&c.peer_id, *c.node_id.get_ref()) {
            (Some(p), _) => Some(*p.get_ref()),
            (None, 1) => Some(2),
            (None, 2) => Some(1),
            (None, _) => None,
        }
    }

    /// What the cluster service is handed (in the topology): `None` without `[cluster]` or
    /// without its `peer`.
    pub fn cluster_spec(&self) -> Option<duplex_ipc::topology::ClusterSpec> {
        let c = self.cluster.as_ref()?;
        let peer = *c.peer.as_ref()?.get_ref();
        Some(duplex_ipc::topology::ClusterSpec {
            name: c
                .name
                .as_ref()
                .map_or_else(|| "duplex".to_owned(), |n| n.get_ref().clone()),
            node_id: *c.node_id.get_ref(),
            peer_id: self.peer_id().unwrap_or(0),
            boot: boot_number().max(1),
            peer,
            listener: self
                .listeners
                .iter()
                .find(|l| l.service.get_ref() == CLUSTER)
                .map(|l| format!("listener:{}", l.name.get_ref())),
            beat_ms: c.beat_ms.as_ref().map_or(100, |v| *v.get_ref()),
            dead_ms: c.dead_ms.as_ref().map_or(3000, |v| *v.get_ref()),
        })
    }
}

/// `[node]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Node name (appears in logs and in `duplexctl status`).
    pub name: Spanned<String>,
    /// Directory for the node's state, lock file and sockets. Services may write only below it.
    pub state_dir: Spanned<PathBuf>,
}

/// `[supervisor]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorSettings {
    /// How often services beat (milliseconds).
    pub heartbeat_ms: u64,
    /// Beats a service may miss before it is declared hung, killed and restarted.
    pub missed_beats: u32,
    /// Delay before the second restart within the crash-loop window (the first is immediate).
    pub backoff_initial_ms: u64,
    /// Cap of the exponential restart backoff.
    pub backoff_max_ms: u64,
    /// This many unexpected exits within `crash_loop_window_s` mark a service failed.
    pub crash_loop_exits: u32,
    /// The crash-loop window (seconds).
    pub crash_loop_window_s: u64,
    /// How long a service has to stop after SIGTERM before it is killed (milliseconds).
    pub stop_timeout_ms: u64,
    /// How long a spawned service has to say Ready before it is killed as hung (milliseconds).
    pub start_timeout_ms: u64,
    /// Sandbox services (seccomp, no_new_privs, capabilities, rlimits). Turning it off is a
    /// development switch and is logged loudly.
    pub sandbox: bool,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            missed_beats: 20,
            backoff_initial_ms: 50,
            backoff_max_ms: 5_000,
            crash_loop_exits: 10,
            crash_loop_window_s: 30,
            stop_timeout_ms: 5_000,
            start_timeout_ms: 10_000,
            sandbox: true,
        }
    }
}

/// What a service is to the node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// An ordinary service: restarted when it dies; I/O goes on.
    #[default]
    Service,
    /// The datapath: if it dies the node stops serving.
    Datapath,
}

/// `[[service]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name (`duplexctl service restart NAME`).
    pub name: Spanned<String>,
    /// Executable; default `duplex-NAME` next to `duplexd`.
    pub binary: Option<PathBuf>,
    /// Extra arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Service or datapath.
    #[serde(default)]
    pub kind: ServiceKind,
    /// Services this one starts after (and stops before).
    #[serde(default)]
    pub after: Vec<Spanned<String>>,
    /// Seccomp policy name; default the service name.
    pub policy: Option<String>,
}

/// `[[ring]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingConfig {
    /// Unique name.
    pub name: Spanned<String>,
    /// Producing service.
    pub producer: Spanned<String>,
    /// Consuming service.
    pub consumer: Spanned<String>,
    /// Slots, a power of two.
    pub capacity: Spanned<u64>,
}

/// `[[pool]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Unique name.
    pub name: Spanned<String>,
    /// Bytes per chunk, a power of two >= 64.
    pub chunk_size: Spanned<u64>,
    /// Number of chunks.
    pub chunks: Spanned<u64>,
    /// Services that map it.
    pub users: Vec<Spanned<String>>,
}

/// `[[listener]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name.
    pub name: Spanned<String>,
    /// Address to bind.
    pub address: Spanned<SocketAddr>,
    /// Service that receives the socket.
    pub service: Spanned<String>,
    /// For the fabric: `nvme` (I/O subsystems and discovery, the default) or `discovery`.
    #[serde(default)]
    pub kind: Option<Spanned<ListenerKind>>,
    /// For the fabric: hosts must connect over TLS 1.3 with their PSK (`tls = true`); a
    /// connection that does not open with a TLS handshake is closed.
    #[serde(default)]
    pub tls: Option<Spanned<bool>>,
}

/// Largest ring accepted from a config.
const MAX_RING: u64 = 1 << 20;
/// Largest pool accepted from a config (bytes).
const MAX_POOL_BYTES: u64 = 64 << 30;

impl NodeConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates config text; `path` names it in errors.
    pub fn parse(path: &str, text: &str) -> Result<Self, ConfigError> {
        let mut config: NodeConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: with_source_line(e.message(), text, line),
            }
        })?;
        config.derive_channel();
        config.validate(path, text)?;
        config.validate_storage(path, text)?;
        Ok(config)
    }

    /// The datapath service, if any.
    pub fn datapath(&self) -> Option<&ServiceConfig> {
        self.services
            .iter()
            .find(|s| s.kind == ServiceKind::Datapath)
    }

    /// Whether the node serves storage: it has a datapath and a fabric service, and either
    /// subsystems of its own or a metadata service (which creates them at run time).
    pub fn serves_storage(&self) -> bool {
        (!self.subsystems.is_empty() || self.has_metadata())
            && self.datapath().is_some()
            && self.services.iter().any(|s| s.name.get_ref() == FABRIC)
    }

    /// Whether the node has the metadata service (pools on the `[[drive]]`s).
    pub fn has_metadata(&self) -> bool {
        self.services.iter().any(|s| s.name.get_ref() == METADATA)
    }

    /// Adds the fabric ↔ datapath rings and pool when the node serves storage.
    fn derive_channel(&mut self) {
        if !self.serves_storage() {
            return;
        }
        let Some(dp) = self.datapath().map(|d| d.name.get_ref().clone()) else {
            return;
        };
        let at = |v: String| Spanned::new(0..0, v);
        let f = &self.fabric;
        let (capacity, chunk_size, chunks) = (f.ring_capacity, f.chunk_size, f.pool_chunks);
        for t in 0..f.io_threads.clamp(1, MAX_IO_THREADS) {
            self.rings.push(RingConfig {
                name: at(submit_ring(t)),
                producer: at(FABRIC.into()),
                consumer: at(dp.clone()),
                capacity: Spanned::new(0..0, capacity),
            });
            self.rings.push(RingConfig {
                name: at(complete_ring(t)),
                producer: at(dp.clone()),
                consumer: at(FABRIC.into()),
                capacity: Spanned::new(0..0, capacity),
            });
        }
        let mut users = vec![at(FABRIC.into()), at(dp.clone())];
        if self.has_metadata() {
            // The metadata service's privileged channel to the datapath, on the same pool.
            self.rings.push(RingConfig {
                name: at(META_SUBMIT_RING.into()),
                producer: at(METADATA.into()),
                consumer: at(dp.clone()),
                capacity: Spanned::new(0..0, 16),
            });
            self.rings.push(RingConfig {
                name: at(META_COMPLETE_RING.into()),
                producer: at(dp),
                consumer: at(METADATA.into()),
                capacity: Spanned::new(0..0, 16),
            });
            users.push(at(METADATA.into()));
        }
        self.pools.push(PoolConfig {
            name: at(IO_POOL.into()),
            chunk_size: Spanned::new(0..0, chunk_size),
            chunks: Spanned::new(0..0, chunks),
            users,
        });
    }

    fn validate_storage(&self, path: &str, text: &str) -> Result<(), ConfigError> {
        let err = |span: std::ops::Range<usize>, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: if span == (0..0) {
                find_line(text, "[fabric]")
            } else {
                line_col(text, span.start).0
            },
            message,
        };
        let threads = self.fabric.io_threads;
        if !(1..=MAX_IO_THREADS).contains(&threads) {
            return Err(err(
                0..0,
                format!("[fabric] io_threads = {threads}: must be from 1 to {MAX_IO_THREADS}"),
            ));
        }
        let mut names = HashSet::new();
        for (what, v) in self
            .volumes
            .iter()
            .map(|v| ("volume", v))
            .chain(self.drives.iter().map(|v| ("drive", v)))
        {
            unique(&mut names, &v.name, what, &err)?;
            let bs = *v.block_size.get_ref();
            if bs != 512 && bs != 4096 {
                return Err(err(
                    v.block_size.span(),
                    format!(
                        "{what} {:?}: block_size {bs} must be 512 or 4096",
                        v.name.get_ref()
                    ),
                ));
            }
            match (&v.path, &v.drive) {
                (Some(_), Some(d)) => {
                    return Err(err(
                        d.span(),
                        format!(
                        "{what} {:?}: give `path` (a file or block device) or `drive`, not both",
                        v.name.get_ref()
                    ),
                    ))
                }
                (None, None) => {
                    return Err(err(
                        v.name.span(),
                        format!(
                            "{what} {:?}: needs `path` (a file or block device) or `drive` \
                             (\"vfio-user:SOCKET\" or \"vfio:PCI-ADDRESS\")",
                            v.name.get_ref()
                        ),
                    ))
                }
                (None, Some(d)) => {
                    if let Err(why) = crate::storage::parse_drive(d.get_ref()) {
                        return Err(err(
                            d.span(),
                            format!("{what} {:?}: {why}", v.name.get_ref()),
                        ));
                    }
                    if v.size.is_none() {
                        return Err(err(
                            d.span(),
                            format!(
                                "{what} {:?}: a drive volume needs `size` (the namespace must hold it)",
                                v.name.get_ref()
                            ),
                        ));
                    }
                }
                (Some(_), None) => {}
            }
            if let Some(n) = &v.nsid {
                if *n.get_ref() == 0 || *n.get_ref() == u32::MAX || v.drive.is_none() {
                    return Err(err(
                        n.span(),
                        format!(
                            "{what} {:?}: nsid {} (only for a drive volume, 1 to 4294967294)",
                            v.name.get_ref(),
                            n.get_ref()
                        ),
                    ));
                }
            }
            if let Some(size) = &v.size {
                let n = size.get_ref().0;
                if n == 0 || n % u64::from(bs) != 0 {
                    return Err(err(
                        size.span(),
                        format!(
                            "{what} {:?}: size {n} must be a positive multiple of the block size {bs}",
                            v.name.get_ref()
                        ),
                    ));
                }
            }
        }
        let mut nqns = HashSet::new();
        for s in &self.subsystems {
            let nqn = s.nqn.get_ref();
            if !valid_nqn(nqn) || nqn == duplex_ipc_discovery_nqn() {
                return Err(err(
                    s.nqn.span(),
                    format!("subsystem nqn {nqn:?}: an NQN starts with \"nqn.\", has no spaces, is at most 223 bytes, and is not the discovery NQN"),
                ));
            }
            if !nqns.insert(nqn.as_str()) {
                return Err(err(
                    s.nqn.span(),
                    format!("subsystem {nqn:?} is defined twice"),
                ));
            }
            if !s.allow_any_host && s.hosts.is_empty() {
                return Err(err(
                    s.nqn.span(),
                    format!("subsystem {nqn:?} allows no host: list `hosts` or set allow_any_host = true"),
                ));
            }
            for h in &s.hosts {
                if !valid_nqn(h.get_ref()) {
                    return Err(err(
                        h.span(),
                        format!("subsystem {nqn:?}: host {:?} is not an NQN", h.get_ref()),
                    ));
                }
            }
            let mut ids = HashSet::new();
            for n in &s.namespaces {
                let id = *n.nsid.get_ref();
                if id == 0 || id >= 0xFFFF_FFFE || !ids.insert(id) {
                    return Err(err(
                        n.nsid.span(),
                        format!(
                            "subsystem {nqn:?}: nsid {id} must be unique and in 1..=4294967293"
                        ),
                    ));
                }
                if !self
                    .volumes
                    .iter()
                    .any(|v| v.name.get_ref() == n.volume.get_ref())
                {
                    return Err(err(
                        n.volume.span(),
                        format!(
                            "subsystem {nqn:?}: nsid {id}: no volume named {:?}",
                            n.volume.get_ref()
                        ),
                    ));
                }
                for g in n.nguid.iter().chain(n.uuid.iter()) {
                    if parse_id(g.get_ref()).is_none() {
                        return Err(err(
                            g.span(),
                            format!(
                                "subsystem {nqn:?}: nsid {id}: {:?} is not 32 hex digits",
                                g.get_ref()
                            ),
                        ));
                    }
                }
            }
        }
        if !self.subsystems.is_empty() && !self.serves_storage() {
            return Err(err(
                self.subsystems[0].nqn.span(),
                "subsystems need a service named \"fabric\" and a service of kind \"datapath\""
                    .into(),
            ));
        }
        for l in &self.listeners {
            if let Some(t) = &l.tls {
                let service = l.service.get_ref();
                if service != FABRIC && service != MGMT {
                    return Err(err(
                        t.span(),
                        format!(
                            "listener {:?}: `tls` is for the fabric's and mgmt's listeners",
                            l.name.get_ref()
                        ),
                    ));
                }
                if service == MGMT && *t.get_ref() && self.mgmt.is_none() {
                    return Err(err(
                        t.span(),
                        format!(
                            "listener {:?}: remote management needs its key: add `[mgmt] key_file = \"PATH\"` (64 hex digits; `openssl rand -hex 32`)",
                            l.name.get_ref()
                        ),
                    ));
                }
            }
            if let Some(k) = &l.kind {
                if l.service.get_ref() != FABRIC {
                    return Err(err(
                        k.span(),
                        format!(
                            "listener {:?}: `kind` is for the fabric's listeners",
                            l.name.get_ref()
                        ),
                    ));
                }
            }
        }
        let f = &self.fabric;
        if f.cntlid_base == 0 || f.cntlid_base > 0xBFEF || f.ana_group == 0 {
            return Err(err(
                0..0,
                "fabric.cntlid_base must be 1..=49135 and fabric.ana_group > 0".into(),
            ));
        }
        Ok(())
    }

    /// The remote management key (`[mgmt] key_file`: 64 hex digits), read now; `None` without
    /// `[mgmt]`. `duplexd --check` reads it too, so that a missing or bad key file is a config
    /// error, not a node that starts and cannot be managed.
    pub fn mgmt_key(&self) -> Result<Option<[u8; 32]>, String> {
        let Some(m) = &self.mgmt else {
            return Ok(None);
        };
        let path = m.key_file.get_ref();
        let bad = |why: String| format!("[mgmt] key_file {}: {why}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let t = text.trim();
        if t.len() != 64 || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "not 64 hexadecimal digits ({} characters; make one with `openssl rand -hex 32`)",
                t.len()
            )));
        }
        let mut key = [0u8; 32];
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|e| bad(e.to_string()))?;
        }
        Ok(Some(key))
    }

    /// Services in start order (every service after the ones it names in `after`).
    pub fn start_order(&self) -> Vec<&ServiceConfig> {
        let mut order = Vec::with_capacity(self.services.len());
        let mut placed = HashSet::new();
        // Validation proved the graph acyclic, so each pass places at least one service.
        while order.len() < self.services.len() {
            let before = order.len();
            for s in &self.services {
                if !placed.contains(s.name.get_ref().as_str())
                    && s.after
                        .iter()
                        .all(|a| placed.contains(a.get_ref().as_str()))
                {
                    placed.insert(s.name.get_ref().as_str());
                    order.push(s);
                }
            }
            if order.len() == before {
                break;
            }
        }
        order
    }

    fn validate(&self, path: &str, text: &str) -> Result<(), ConfigError> {
        let err = |span: std::ops::Range<usize>, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: line_col(text, span.start).0,
            message,
        };
        let name = &self.node.name;
        if !valid_name(name.get_ref()) {
            return Err(err(
                name.span(),
                format!("node.name {:?}: {NAME_RULE}", name.get_ref()),
            ));
        }
        if let Some(c) = &self.cluster {
            let id = *c.node_id.get_ref();
            if !(1..=MAX_NODE_ID).contains(&id) {
                return Err(err(
                    c.node_id.span(),
                    format!("cluster.node_id {id} must be 1..={MAX_NODE_ID} (one heartbeat slot per node on the drives)"),
                ));
            }
            match (&c.peer_id, self.peer_id()) {
                (Some(p), Some(peer)) if peer == id || !(1..=MAX_NODE_ID).contains(&peer) => {
                    return Err(err(
                        p.span(),
                        format!("cluster.peer_id {peer} must be 1..={MAX_NODE_ID} and not this node's id"),
                    ));
                }
                (None, None) => {
                    return Err(err(
                        c.node_id.span(),
                        format!("cluster.node_id {id}: give cluster.peer_id (the peer's node id; the default pairs 1 with 2)"),
                    ));
                }
                _ => {}
            }
            if let Some(n) = &c.name {
                if !valid_name(n.get_ref()) {
                    return Err(err(
                        n.span(),
                        format!("cluster.name {:?}: {NAME_RULE}", n.get_ref()),
                    ));
                }
            }
            let beat = c.beat_ms.as_ref().map_or(100, |v| *v.get_ref());
            if beat == 0 {
                let span = c.beat_ms.as_ref().map_or(0..0, Spanned::span);
                return Err(err(span, "cluster.beat_ms must be at least 1".into()));
            }
            if let Some(d) = &c.dead_ms {
                if *d.get_ref() <= 2 * beat {
                    return Err(err(
                        d.span(),
                        format!(
                            "cluster.dead_ms {} must be more than twice cluster.beat_ms ({beat})",
                            d.get_ref()
                        ),
                    ));
                }
            }
            let has_service = self.services.iter().any(|s| s.name.get_ref() == CLUSTER);
            if has_service && c.peer.is_none() {
                return Err(err(
                    c.node_id.span(),
                    "the cluster service needs cluster.peer (the peer's interconnect address)"
                        .into(),
                ));
            }
        }
        if let Some(raid) = self.services.iter().find(|s| s.name.get_ref() == RAID) {
            if !self.has_metadata() {
                return Err(err(
                    raid.name.span(),
                    "the raid service needs the metadata service (a [[service]] named metadata)"
                        .into(),
                ));
            }
        }
        let state_dir = &self.node.state_dir;
        if !state_dir.get_ref().is_absolute() {
            return Err(err(
                state_dir.span(),
                format!(
                    "node.state_dir {:?} must be an absolute path",
                    state_dir.get_ref()
                ),
            ));
        }
        let s = &self.supervisor;
        if s.heartbeat_ms == 0
            || s.missed_beats == 0
            || s.crash_loop_exits == 0
            || s.start_timeout_ms == 0
        {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: find_line(text, "[supervisor]"),
                message: "supervisor.heartbeat_ms, missed_beats, crash_loop_exits and start_timeout_ms must \
                          be > 0"
                    .into(),
            });
        }

        let mut services: HashMap<&str, &ServiceConfig> = HashMap::new();
        for svc in &self.services {
            let n = svc.name.get_ref();
            if !valid_name(n) {
                return Err(err(
                    svc.name.span(),
                    format!("service name {n:?}: {NAME_RULE}"),
                ));
            }
            if services.insert(n, svc).is_some() {
                return Err(err(
                    svc.name.span(),
                    format!("service {n:?} is defined twice"),
                ));
            }
        }
        let datapaths: Vec<_> = self
            .services
            .iter()
            .filter(|s| s.kind == ServiceKind::Datapath)
            .collect();
        if let Some(second) = datapaths.get(1) {
            return Err(err(
                second.name.span(),
                "a node has at most one datapath service".into(),
            ));
        }
        let known = |r: &Spanned<String>, what: &str| -> Result<(), ConfigError> {
            if services.contains_key(r.get_ref().as_str()) {
                Ok(())
            } else {
                Err(err(
                    r.span(),
                    format!("{what} {:?} is not a defined service", r.get_ref()),
                ))
            }
        };
        for svc in &self.services {
            for a in &svc.after {
                known(a, &format!("service {:?}: after", svc.name.get_ref()))?;
            }
        }
        if self.start_order().len() != self.services.len() {
            let stuck = self.services.iter().find(|s| {
                !self
                    .start_order()
                    .iter()
                    .any(|o| o.name.get_ref() == s.name.get_ref())
            });
            let span = stuck.map_or(0..0, |s| s.name.span());
            return Err(err(span, "services' `after` lists form a cycle".into()));
        }

        let mut names = HashSet::new();
        for r in &self.rings {
            unique(&mut names, &r.name, "ring", &err)?;
            known(
                &r.producer,
                &format!("ring {:?}: producer", r.name.get_ref()),
            )?;
            known(
                &r.consumer,
                &format!("ring {:?}: consumer", r.name.get_ref()),
            )?;
            if r.producer.get_ref() == r.consumer.get_ref() {
                return Err(err(
                    r.consumer.span(),
                    format!(
                        "ring {:?}: producer and consumer are the same service",
                        r.name.get_ref()
                    ),
                ));
            }
            let c = *r.capacity.get_ref();
            if !c.is_power_of_two() || c > MAX_RING {
                return Err(err(
                    r.capacity.span(),
                    format!(
                        "ring {:?}: capacity {c} must be a power of two <= {MAX_RING}",
                        r.name.get_ref()
                    ),
                ));
            }
        }
        for p in &self.pools {
            unique(&mut names, &p.name, "pool", &err)?;
            let (size, chunks) = (*p.chunk_size.get_ref(), *p.chunks.get_ref());
            if !size.is_power_of_two() || !(64..=1 << 30).contains(&size) {
                return Err(err(
                    p.chunk_size.span(),
                    format!(
                        "pool {:?}: chunk_size {size} must be a power of two from 64 to 1 GiB",
                        p.name.get_ref()
                    ),
                ));
            }
            if chunks == 0 || chunks > 1 << 24 || size.saturating_mul(chunks) > MAX_POOL_BYTES {
                return Err(err(
                    p.chunks.span(),
                    format!(
                        "pool {:?}: {chunks} chunks must be 1..=16777216 and at most 64 GiB in all",
                        p.name.get_ref()
                    ),
                ));
            }
            for u in &p.users {
                known(u, &format!("pool {:?}: user", p.name.get_ref()))?;
            }
        }
        let mut addresses = HashSet::new();
        for l in &self.listeners {
            unique(&mut names, &l.name, "listener", &err)?;
            known(
                &l.service,
                &format!("listener {:?}: service", l.name.get_ref()),
            )?;
            if !addresses.insert(*l.address.get_ref()) {
                return Err(err(
                    l.address.span(),
                    format!(
                        "listener {:?}: address {} is used twice",
                        l.name.get_ref(),
                        l.address.get_ref()
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn duplex_ipc_discovery_nqn() -> &'static str {
    "nqn.2014-08.org.nvmexpress.discovery"
}

const NAME_RULE: &str = "names are 1-32 characters of a-z, 0-9 and '-', starting with a letter";

fn valid_name(n: &str) -> bool {
    (1..=32).contains(&n.len())
        && n.starts_with(|c: char| c.is_ascii_lowercase())
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn unique<'a>(
    names: &mut HashSet<&'a str>,
    name: &'a Spanned<String>,
    what: &str,
    err: &dyn Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<(), ConfigError> {
    if !valid_name(name.get_ref()) {
        return Err(err(
            name.span(),
            format!("{what} name {:?}: {NAME_RULE}", name.get_ref()),
        ));
    }
    if !names.insert(name.get_ref()) {
        return Err(err(
            name.span(),
            format!("{what} {:?}: the name is already used", name.get_ref()),
        ));
    }
    Ok(())
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

/// One line: the parser's message, plus the offending line of the file (which names the key).
fn with_source_line(message: &str, text: &str, line: usize) -> String {
    let message = message.trim().replace('\n', "; ");
    match text.lines().nth(line.saturating_sub(1)).map(str::trim) {
        Some(src) if !src.is_empty() && !message.contains(src) => {
            let src: String = src.chars().take(80).collect();
            format!("{message} (in `{src}`)")
        }
        _ => message,
    }
}

fn find_line(text: &str, needle: &str) -> usize {
    text.find(needle).map_or(1, |i| line_col(text, i).0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
name = "a"
state_dir = "/var/lib/duplex/a"

[[service]]
name = "datapath"
kind = "datapath"

[[service]]
name = "fabric"
after = ["datapath"]

[[service]]
name = "mgmt"

[[ring]]
name = "io0"
producer = "fabric"
consumer = "datapath"
capacity = 256

[[pool]]
name = "buffers"
chunk_size = 4096
chunks = 1024
users = ["fabric", "datapath"]

[[listener]]
name = "nvme"
address = "127.0.0.1:4420"
service = "fabric"
"#;

    fn error(text: &str) -> String {
        match NodeConfig::parse("node.toml", text) {
            Ok(_) => "parsed".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_remote_management_listener_needs_the_mgmt_key() {
        let remote = format!(
            "{GOOD}\n[[listener]]\nname = \"ctl\"\naddress = \"127.0.0.1:9440\"\nservice = \"mgmt\"\ntls = true\n"
        );
        let e = error(&remote);
        assert!(
            e.contains("listener \"ctl\"") && e.contains("[mgmt] key_file"),
            "{e}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("mgmt.key");
        let keyed = |body: &str| {
            std::fs::write(&key, body).expect("write key");
            let text = format!(
                "{remote}\n[mgmt]\nkey_file = {:?}\n",
                key.display().to_string()
            );
            NodeConfig::parse("node.toml", &text).expect("parses")
        };
        let good = "0f".repeat(32);
        assert_eq!(keyed(&format!("{good}\n")).mgmt_key(), Ok(Some([0x0f; 32])));
        let e = keyed("0f0f").mgmt_key().expect_err("a short key");
        assert!(
            e.contains("[mgmt] key_file") && e.contains("64 hexadecimal"),
            "{e}"
        );
        std::fs::remove_file(&key).expect("rm");
        let e = keyed_missing(&remote, &key);
        assert!(e.contains("[mgmt] key_file"), "{e}");
        // `tls` on a listener of a service that has no TLS side.
        let e = error(&remote.replace("service = \"mgmt\"\ntls", "service = \"datapath\"\ntls"));
        assert!(
            e.contains("`tls` is for the fabric's and mgmt's listeners"),
            "{e}"
        );
    }

    fn keyed_missing(remote: &str, key: &Path) -> String {
        let text = format!(
            "{remote}\n[mgmt]\nkey_file = {:?}\n",
            key.display().to_string()
        );
        NodeConfig::parse("node.toml", &text)
            .expect("parses")
            .mgmt_key()
            .expect_err("no key file")
    }

    #[test]
    fn a_good_config_parses_with_defaults_and_order() {
        let c = NodeConfig::parse("node.toml", GOOD).expect("parse");
        assert_eq!(c.node.name.get_ref(), "a");
        assert_eq!(c.supervisor.heartbeat_ms, 100);
        assert!(c.supervisor.sandbox);
        let order: Vec<_> = c
            .start_order()
            .iter()
            .map(|s| s.name.get_ref().clone())
            .collect();
        let pos = |n: &str| order.iter().position(|o| o == n).expect("present");
        assert!(pos("datapath") < pos("fabric"));
        assert_eq!(order.len(), 3);
    }

    #[test]
    fn cluster_settings_are_checked_and_give_the_key_and_spec() {
        let c = NodeConfig::parse("node.toml", GOOD).expect("parse");
        assert_eq!(c.fence_key(), 0, "standalone");
        assert!(c.cluster_spec().is_none());
        let with = |extra: &str| format!("{GOOD}\n[cluster]\n{extra}\n");
        let c = NodeConfig::parse("node.toml", &with("node_id = 2")).expect("parse");
        assert_eq!(c.fence_key() >> 48, 2);
        assert!(c.fence_key() & ((1 << 48) - 1) > 0, "a boot number");
        assert!(
            c.cluster_spec().is_none(),
            "no peer, no cluster service spec"
        );
        let c = NodeConfig::parse(
            "node.toml",
            &with("node_id = 2\npeer = \"10.0.0.1:7000\"\nname = \"tank\""),
        )
        .expect("parse");
        let spec = c.cluster_spec().expect("spec");
        assert_eq!(
            (spec.node_id, spec.name.as_str(), spec.beat_ms, spec.dead_ms),
            (2, "tank", 100, 3000)
        );
        assert_eq!(spec.boot, c.fence_key() & ((1 << 48) - 1));
        let e = error(&with("node_id = 0"));
        assert!(e.contains("cluster.node_id 0 must be 1..=4"), "{e}");
        let e = error(&with("node_id = 5"));
        assert!(e.contains("must be 1..=4"), "{e}");
        let e = error(&with("node_id = 3"));
        assert!(e.contains("give cluster.peer_id"), "{e}");
        let e = error(&with("node_id = 3\npeer_id = 3"));
        assert!(e.contains("not this node's id"), "{e}");
        let c = NodeConfig::parse("node.toml", &with("node_id = 3\npeer_id = 4")).expect("parse");
        assert_eq!(c.peer_id(), Some(4));
        let e = error(&with("node_id = 1\nbeat_ms = 100\ndead_ms = 200"));
        assert!(e.contains("more than twice"), "{e}");
        let e = error(&with("node_id = 1\nbeat_ms = 0"));
        assert!(e.contains("beat_ms must be at least 1"), "{e}");
        let e = error(&with("node_id = 1\npeer = \"nowhere\""));
        assert!(e.contains("peer"), "{e}");
        let svc = GOOD.replace("[[ring]]", "[[service]]\nname = \"cluster\"\n\n[[ring]]");
        let e = error(&format!("{svc}\n[cluster]\nnode_id = 1\n"));
        assert!(e.contains("needs cluster.peer"), "{e}");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = GOOD.replace(
            "kind = \"datapath\"",
            "kind = \"datapath\"\nflavour = \"mint\"",
        );
        let e = error(&text);
        assert!(e.starts_with("node.toml:9:"), "{e}");
        assert!(e.contains("flavour"), "{e}");
    }

    #[test]
    fn wrong_type_and_missing_key_are_reported() {
        let e = error(&GOOD.replace("capacity = 256", "capacity = \"big\""));
        assert!(e.starts_with("node.toml:21:"), "{e}");
        let e = error(&GOOD.replace("state_dir = \"/var/lib/duplex/a\"\n", ""));
        assert!(e.contains("state_dir"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_line() {
        let e = error(&GOOD.replace("consumer = \"datapath\"", "consumer = \"raid\""));
        assert_eq!(
            e,
            "node.toml:20: ring \"io0\": consumer \"raid\" is not a defined service"
        );
        let e = error(&GOOD.replace("capacity = 256", "capacity = 100"));
        assert!(
            e.starts_with("node.toml:21: ring \"io0\": capacity 100"),
            "{e}"
        );
        let e = error(&GOOD.replace(
            "name = \"mgmt\"",
            "name = \"mgmt\"\nafter = [\"fabric\"]\n[[service]]\nname = \"mgmt\"",
        ));
        assert!(e.contains("defined twice"), "{e}");
        let e = error(&GOOD.replace("name = \"mgmt\"", "name = \"mgmt\"\nkind = \"datapath\""));
        assert!(e.contains("at most one datapath"), "{e}");
        let e = error(&GOOD.replace(
            "state_dir = \"/var/lib/duplex/a\"",
            "state_dir = \"relative\"",
        ));
        assert!(
            e.starts_with("node.toml:4:") && e.contains("absolute"),
            "{e}"
        );
        let e = error(&GOOD.replace("address = \"127.0.0.1:4420\"", "address = \"localhost\""));
        assert!(
            e.starts_with("node.toml:31:") && e.contains("address = \"localhost\""),
            "{e}"
        );
    }

    #[test]
    fn drive_volumes_are_checked() {
        let vol = |body: &str| format!("{GOOD}\n[[volume]]\nname = \"v\"\n{body}\n");
        let e = error(&vol("drive = \"vfio-user:d.sock\""));
        assert!(
            e.contains("volume \"v\": a drive volume needs `size`"),
            "{e}"
        );
        let e = error(&vol("drive = \"vfio:00:04.0\"\nsize = \"1GiB\""));
        assert!(
            e.contains("expected a PCI address like vfio:0000:00:04.0"),
            "{e}"
        );
        let e = error(&vol("drive = \"nvme0\"\nsize = \"1GiB\""));
        assert!(
            e.contains("expected \"vfio-user:SOCKET\" or \"vfio:PCI-ADDRESS\""),
            "{e}"
        );
        let e = error(&vol(
            "path = \"v.img\"\ndrive = \"vfio-user:d.sock\"\nsize = \"1GiB\"",
        ));
        assert!(e.contains("not both"), "{e}");
        let e = error(&vol("size = \"1GiB\""));
        assert!(e.contains("needs `path`"), "{e}");
        let e = error(&vol("path = \"v.img\"\nnsid = 2"));
        assert!(e.contains("nsid 2 (only for a drive volume"), "{e}");
        let e = error(&vol(
            "drive = \"vfio-user:d.sock\"\nsize = \"1GiB\"\nnsid = 0",
        ));
        assert!(e.contains("nsid 0"), "{e}");
        assert_eq!(
            error(&vol(
                "drive = \"vfio:0000:00:04.0\"\nsize = \"1GiB\"\nnsid = 3"
            )),
            "parsed"
        );
    }

    #[test]
    fn fabric_io_threads_are_checked_and_each_gets_a_channel() {
        let storage = |threads: &str| {
            format!(
                "{GOOD}\n[[volume]]\nname = \"v\"\npath = \"v.img\"\n\n[[subsystem]]\n\
                 nqn = \"nqn.2026-11.io.duplex:v\"\nallow_any_host = true\n\
                 namespaces = [{{ nsid = 1, volume = \"v\" }}]\n\n[fabric]\n{threads}\n"
            )
        };
        for bad in ["io_threads = 0", "io_threads = 5"] {
            let e = error(&storage(bad));
            assert!(
                e.contains(&format!("[fabric] {bad}: must be from 1 to 4")),
                "{e}"
            );
        }
        let config = NodeConfig::parse("node.toml", &storage("io_threads = 3")).expect("parses");
        let rings: Vec<&str> = config
            .rings
            .iter()
            .map(|r| r.name.get_ref().as_str())
            .filter(|n| n.starts_with("fabric-io"))
            .collect();
        assert_eq!(
            rings,
            [
                "fabric-io0-sq",
                "fabric-io0-cq",
                "fabric-io1-sq",
                "fabric-io1-cq",
                "fabric-io2-sq",
                "fabric-io2-cq"
            ]
        );
        assert_eq!(config.fabric.io_threads, 3);
    }

    #[test]
    fn dependency_cycles_are_refused() {
        let text = GOOD.replace(
            "name = \"datapath\"\nkind = \"datapath\"",
            "name = \"datapath\"\nkind = \"datapath\"\nafter = [\"fabric\"]",
        );
        let e = error(&text);
        assert!(e.contains("cycle"), "{e}");
    }

    #[test]
    fn not_toml_is_a_parse_error() {
        let e = error("[node\nname = ");
        assert!(e.starts_with("node.toml:1:"), "{e}");
        assert!(!e.contains('\n'));
    }
}
