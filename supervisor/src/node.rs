//! The running node: resources the supervisor owns, the service table, and the event loop that
//! starts services, answers their lifecycle messages, watches their heartbeats, carries out
//! admin requests from mgmt, restarts services when they die and stops them in reverse
//! dependency order.
//!
//! Each service is spawned hardened ([`duplex_sandbox::harden_child`]: no capabilities, no new
//! privileges, rlimits, its own mount namespace when duplexd is root) with exactly one fd beyond
//! stdio, its end of a `SOCK_SEQPACKET` control socket, at fd 3; its stdout and stderr go to a
//! pipe duplexd reads. Everything else (its health region, ring and pool regions, doorbells,
//! listening sockets, for mgmt the admin channel and `mgmt.sock`, and for mgmt and metadata
//! their ends of the config channel) reaches it in the `Start` message with `SCM_RIGHTS`, and the
//! supervisor keeps its own copies so a successor gets the very same objects. The service enters its seccomp policy itself, first thing in `main`.

use std::collections::VecDeque;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use duplex_ipc::admin::{
    AdminChannel, AdminErrorCode, AdminReply, AdminRequest, CrashMode, NodeStatus, ServiceInfo,
    ServiceState,
};
use duplex_ipc::config::ConfigChannel;
use duplex_ipc::control::{
    Body, ControlChannel, Envelope, Fault, Resource, ResourceKind, StartMode,
};
use duplex_ipc::desc::IoDesc;
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::exports::{
    ExportsRegion, DEFAULT_EXPORTS_SIZE, EXPORTS_BELL_RESOURCE, EXPORTS_RESOURCE,
};
use duplex_ipc::lifecycle::{Health, CONTROL_FD_ENV, HEALTH_RESOURCE};
use duplex_ipc::maps::{MapsChannel, MAPS_RESOURCE};
use duplex_ipc::metrics::{
    Counter, Gauge, Metric, Metrics, METRICS_READER_PREFIX, METRICS_RESOURCE,
};
use duplex_ipc::pool::{Holder, Pool};
use duplex_ipc::ring::RingRegion;
use duplex_sandbox::{harden_child, Hardening, SANDBOX_ENV};
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

use crate::config::{NodeConfig, ServiceKind};
use crate::storage;
use duplex_ipc::topology::{ListenerKind, TOPOLOGY_RESOURCE};

/// The glibc tunable every service runs with (see where services are spawned).
pub const MALLOC_ENV: (&str, &str) = ("GLIBC_TUNABLES", "glibc.malloc.arena_max=1");

/// The service that gets the admin channel and `mgmt.sock`.
pub const MGMT_SERVICE: &str = "mgmt";
/// Name of the admin channel resource handed to mgmt.
pub const ADMIN_RESOURCE: &str = "admin";
/// Name of the management socket resource handed to mgmt.
pub const MGMT_SOCKET_RESOURCE: &str = "mgmt-socket";
/// File name of the management socket in the state directory.
pub const MGMT_SOCKET_FILE: &str = "mgmt.sock";
/// The service at the other end of mgmt's config channel.
pub const METADATA_SERVICE: &str = "metadata";
/// Name of the config channel resource: mgmt and metadata each get their own end under it.
pub const CONFIG_RESOURCE: &str = "config";
/// Longest log line passed on whole; longer ones are split.
const MAX_LOG_LINE: usize = 4096;
/// `RLIMIT_NOFILE` of a service.
const SERVICE_MAX_FILES: u64 = 1024;

/// Errors bringing the node up.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A listener could not be bound (e.g. the port is in use).
    #[error("listener {name}: cannot bind {address}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        address: std::net::SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The management socket could not be bound.
    #[error("cannot bind the management socket {path}: {source}")]
    BindMgmt {
        /// Its path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A service binary is missing.
    #[error("service {name}: binary {path} does not exist or is not executable")]
    MissingBinary {
        /// Service name.
        name: String,
        /// The path.
        path: PathBuf,
    },
    /// Creating a shared resource failed.
    #[error("creating {what}: {message}")]
    Resource {
        /// Which resource.
        what: String,
        /// Why.
        message: String,
    },
    /// A system call of the event loop failed.
    #[error("supervisor {what} failed: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
}

struct Shared {
    name: String,
    kind: ResourceKind,
    fd: OwnedFd,
}

/// Why the current process of a service is expected to die.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expected {
    /// Nothing: a death is a crash.
    Nothing,
    /// Crash-injected at this time.
    Injected(CrashMode, Instant),
    /// Found hung and killed.
    Hung(Instant),
    /// Asked to stop by an operator restart; restart at once, not counted as a crash.
    OperatorRestart,
}

struct Service {
    name: String,
    kind: ServiceKind,
    binary: PathBuf,
    args: Vec<String>,
    /// Indices into `Node::shared` of what this service gets (the health region first).
    resources: Vec<usize>,
    health: Health,
    state: ServiceState,
    child: Option<Child>,
    channel: Option<ControlChannel>,
    generation: u64,
    restarts: u32,
    hangs: u32,
    exits: VecDeque<Instant>,
    next_start: Option<Instant>,
    started: Instant,
    /// When the previous process died (or was killed on purpose), until the next Ready.
    down_since: Option<Instant>,
    last_restart: Option<Duration>,
    /// The last status report the service sent (lifecycle `report`) and the generation that
    /// sent it (kept across restarts: the newest one known).
    report: Option<(u64, String)>,
    last_exit: String,
    expected: Expected,
    /// Heartbeat sampling: last counter value and when it last moved.
    last_beat: u64,
    beat_moved: Instant,
    /// SIGKILL at this time if the process has not exited (operator restart, stop).
    kill_at: Option<Instant>,
    /// Starts after the datapath (`after`): it serves or feeds the datapath, so it is not
    /// restarted once the datapath has died.
    needs_datapath: bool,
    /// Times it was marked failed for exiting too often.
    crash_loops: u32,
}

impl Service {
    /// The current process's pid; 0 when none runs.
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn info(&self, now: Instant) -> ServiceInfo {
        ServiceInfo {
            name: self.name.clone(),
            datapath: self.kind == ServiceKind::Datapath,
            state: self.state,
            pid: self.pid(),
            generation: self.generation,
            restarts: self.restarts,
            uptime_ms: if self.child.is_some() {
                millis(now.duration_since(self.started))
            } else {
                0
            },
            hangs: self.hangs,
            last_exit: self.last_exit.clone(),
            last_restart_ms: self.last_restart.map_or(0, millis),
        }
    }
}

/// One service process's output pipe, read until EOF (which may come after the process died).
struct LogPipe {
    service: String,
    pid: u32,
    generation: u64,
    fd: OwnedFd,
    pending: Vec<u8>,
}

/// duplexd's metrics region and, by service index, its restarts, crash loops and up gauge.
#[derive(Debug)]
struct NodeMetrics {
    metrics: Metrics,
    services: Vec<(Counter, Counter, Gauge)>,
}

/// The node.
pub struct Node {
    /// duplexd's own metrics (restarts, crash loops, which services run), when the node
    /// exposes metrics.
    metrics: Option<NodeMetrics>,
    config: NodeConfig,
    shared: Vec<Shared>,
    services: Vec<Service>,
    logs: Vec<LogPipe>,
    admin: Option<AdminChannel>,
    mgmt_socket_path: Option<PathBuf>,
    signals: SignalFd,
    failed: bool,
    /// A cluster member whose datapath died: the whole node stops at once (every process
    /// killed, duplexd exits), so that its peer sees it silent and takes over.
    halt: bool,
    born: Instant,
    private_mounts: bool,
    /// The node's event journal (`duplexctl events`).
    events: crate::events::Journal,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node", self.config.node.name.get_ref())
            .finish_non_exhaustive()
    }
}

fn res_err(what: impl Into<String>) -> impl FnOnce(String) -> NodeError {
    let what = what.into();
    move |message| NodeError::Resource { what, message }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Node {
    /// Creates every resource the config declares and the service table. Binds listeners (so a
    /// port in use is refused here, before any service starts). `signals` must already be
    /// blocked in every thread, and the caller must hold the state directory's lock.
    pub fn new(config: NodeConfig, exe_dir: PathBuf) -> Result<Self, NodeError> {
        let mut shared = Vec::new();
        let mut wants: Vec<(String, usize)> = Vec::new();
        let mut add =
            |shared: &mut Vec<Shared>, name: String, kind, fd: OwnedFd, users: &[&str]| {
                shared.push(Shared { name, kind, fd });
                for u in users {
                    wants.push(((*u).to_owned(), shared.len() - 1));
                }
            };
        for (i, r) in config.rings.iter().enumerate() {
            let name = r.name.get_ref();
            let id = u8::try_from(i + 1)
                .map_err(|_| res_err(format!("ring {name}"))("too many rings".into()))?;
            let ring = RingRegion::<IoDesc>::create(name, *r.capacity.get_ref(), id)
                .map_err(|e| res_err(format!("ring {name}"))(e.to_string()))?;
            let users = [r.producer.get_ref().as_str(), r.consumer.get_ref().as_str()];
            let fd = ring
                .region()
                .try_clone_fd()
                .map_err(|e| res_err(format!("ring {name}"))(e.to_string()))?;
            add(
                &mut shared,
                format!("ring:{name}"),
                ResourceKind::RingRegion,
                fd,
                &users,
            );
            for bell in ["data", "space"] {
                let d = Doorbell::new()
                    .map_err(|e| res_err(format!("ring {name} doorbell"))(e.to_string()))?;
                let fd = d
                    .fd()
                    .try_clone_to_owned()
                    .map_err(|e| res_err(format!("ring {name} doorbell"))(e.to_string()))?;
                add(
                    &mut shared,
                    format!("ring:{name}:{bell}"),
                    ResourceKind::Eventfd,
                    fd,
                    &users,
                );
            }
        }
        for p in &config.pools {
            let name = p.name.get_ref();
            let chunks = u32::try_from(*p.chunks.get_ref()).unwrap_or(u32::MAX);
            let pool = Pool::create(
                name,
                *p.chunk_size.get_ref() as usize,
                chunks,
                Holder {
                    role: 0,
                    incarnation: 0,
                },
            )
            .map_err(|e| res_err(format!("pool {name}"))(e.to_string()))?;
            let fd = pool
                .region()
                .try_clone_fd()
                .map_err(|e| res_err(format!("pool {name}"))(e.to_string()))?;
            let users: Vec<&str> = p.users.iter().map(|u| u.get_ref().as_str()).collect();
            add(
                &mut shared,
                format!("pool:{name}"),
                ResourceKind::Pool,
                fd,
                &users,
            );
        }
        for l in &config.listeners {
            let name = l.name.get_ref();
            let address = *l.address.get_ref();
            let listener = TcpListener::bind(address).map_err(|source| NodeError::Bind {
                name: name.clone(),
                address,
                source,
            })?;
            // mgmt's TLS listeners are remote management (`remote:`), kept when the node stops
            // serving hosts (the operator still reaches it); the others are `listener:`.
            let remote =
                l.service.get_ref() == MGMT_SERVICE && l.tls.as_ref().is_some_and(|t| *t.get_ref());
            add(
                &mut shared,
                format!(
                    "{}{name}",
                    if remote {
                        duplex_ipc::keys::REMOTE_LISTENER_PREFIX
                    } else {
                        "listener:"
                    }
                ),
                ResourceKind::Socket,
                OwnedFd::from(listener),
                &[l.service.get_ref().as_str()],
            );
        }

        if config.serves_storage() {
            let state_dir = config.node.state_dir.get_ref();
            let name = config.node.name.get_ref();
            let key = config.fence_key();
            if key != 0 {
                tracing::info!(key = format!("{key:#018x}"), "cluster member: registering this node and boot's reservation key on its drives");
            }
            let volumes = storage::open_volumes(&config.volumes, state_dir, name, key)
                .map_err(|e| res_err("storage")(e.to_string()))?;
            // Pool drives: raw devices of the datapath, for the metadata service's pools.
            let drives = storage::open_volumes(&config.drives, state_dir, name, key)
                .map_err(|e| res_err("storage")(e.to_string()))?;
            let metadata = config.has_metadata();
            let listeners: Vec<storage::FabricListener> = config
                .listeners
                .iter()
                .filter(|l| l.service.get_ref() == storage::FABRIC)
                .map(|l| storage::FabricListener {
                    resource: format!("listener:{}", l.name.get_ref()),
                    address: *l.address.get_ref(),
                    kind: l.kind.as_ref().map_or(ListenerKind::Nvme, |k| *k.get_ref()),
                    tls: l.tls.as_ref().is_some_and(|t| *t.get_ref()),
                })
                .collect();
            let mut topology = storage::topology_with_drives(
                config.node.name.get_ref(),
                &config.fabric,
                &config.subsystems,
                &volumes,
                &listeners,
                true,
                &drives,
                metadata,
            );
            topology.cluster = config.cluster_spec();
            let datapath = config
                .datapath()
                .map(|d| d.name.get_ref().clone())
                .unwrap_or_default();
            let fd = topology
                .to_memfd()
                .map_err(|e| res_err("topology")(e.to_string()))?;
            add(
                &mut shared,
                TOPOLOGY_RESOURCE.to_owned(),
                ResourceKind::File,
                fd,
                &[
                    storage::FABRIC,
                    datapath.as_str(),
                    METADATA_SERVICE,
                    crate::config::CLUSTER,
                ],
            );
            let has_drives =
                !topology.drives.is_empty() || topology.volumes.iter().any(|v| v.drive.is_some());
            if topology.cluster.is_some() && has_drives {
                // The node's cluster state (disk heartbeats seen, fence requests and answers,
                // pools taken over), held here across restarts of the services.
                let region = duplex_ipc::cluster::ClusterRegion::create()
                    .map_err(|e| res_err("cluster state region")(e.to_string()))?;
                let fd = region
                    .region()
                    .try_clone_fd()
                    .map_err(|e| res_err("cluster state region")(e.to_string()))?;
                add(
                    &mut shared,
                    duplex_ipc::cluster::CLUSTER_RESOURCE.into(),
                    ResourceKind::Region,
                    fd,
                    &[datapath.as_str(), METADATA_SERVICE, crate::config::CLUSTER],
                );
                // The host link watch: the interface of the fabric's (first) listener.
                let spec = topology.cluster.as_ref();
                match listeners.first().map(|l| l.address.ip()) {
                    Some(ip) if !ip.is_unspecified() => {
                        let dead =
                            std::time::Duration::from_millis(spec.map_or(3000, |c| c.dead_ms));
                        let watcher = region
                            .region()
                            .try_clone_fd()
                            .map_err(|e| res_err("cluster state region")(e.to_string()))
                            .and_then(|fd| {
                                duplex_ipc::cluster::ClusterRegion::attach(fd)
                                    .map_err(|e| res_err("cluster state region")(e.to_string()))
                            })?;
                        crate::hostlink::spawn(ip, dead, watcher)
                            .map_err(|e| res_err("host link watch")(e.to_string()))?;
                    }
                    Some(_) => tracing::warn!(
                        "the fabric listens on every address: the host link is not watched"
                    ),
                    None => {}
                }
            }
            for d in drives {
                tracing::info!(
                    drive = %d.spec.name,
                    path = %d.spec.path,
                    blocks = d.spec.blocks,
                    block_size = d.spec.block_size,
                    "pool drive opened"
                );
                for (resource, kind, fd) in d.fds {
                    add(&mut shared, resource, kind, fd, &[datapath.as_str()]);
                }
            }
            if metadata {
                // The maps channel (metadata → datapath: pools and volume maps) and the export
                // table (metadata → fabric), both held here across restarts of either end.
                let (ours, theirs) =
                    MapsChannel::pair().map_err(|e| res_err("maps channel")(e.to_string()))?;
                add(
                    &mut shared,
                    MAPS_RESOURCE.into(),
                    ResourceKind::Socket,
                    ours.into_fd(),
                    &[METADATA_SERVICE],
                );
                add(
                    &mut shared,
                    MAPS_RESOURCE.into(),
                    ResourceKind::Socket,
                    theirs.into_fd(),
                    &[datapath.as_str()],
                );
                let exports = ExportsRegion::create(DEFAULT_EXPORTS_SIZE)
                    .map_err(|e| res_err("exports region")(e.to_string()))?;
                let fd = exports
                    .region()
                    .try_clone_fd()
                    .map_err(|e| res_err("exports region")(e.to_string()))?;
                add(
                    &mut shared,
                    EXPORTS_RESOURCE.into(),
                    ResourceKind::Region,
                    fd,
                    &[storage::FABRIC, METADATA_SERVICE],
                );
                let bell =
                    Doorbell::new().map_err(|e| res_err("exports doorbell")(e.to_string()))?;
                let fd = bell
                    .fd()
                    .try_clone_to_owned()
                    .map_err(|e| res_err("exports doorbell")(e.to_string()))?;
                add(
                    &mut shared,
                    EXPORTS_BELL_RESOURCE.into(),
                    ResourceKind::Eventfd,
                    fd,
                    &[storage::FABRIC, METADATA_SERVICE],
                );
                if config
                    .services
                    .iter()
                    .any(|s| s.name.get_ref() == crate::config::RAID)
                {
                    // The RAID jobs region (rebuilds and scrubs: the datapath reports them,
                    // the raid service grants their progress, the metadata service commits
                    // their checkpoints), held here across restarts of the three. Without a
                    // raid service it is not made, and the datapath runs its jobs unlimited.
                    let region = duplex_ipc::raid::RaidRegion::create()
                        .map_err(|e| res_err("RAID jobs region")(e.to_string()))?;
                    let fd = region
                        .region()
                        .try_clone_fd()
                        .map_err(|e| res_err("RAID jobs region")(e.to_string()))?;
                    add(
                        &mut shared,
                        duplex_ipc::raid::RAID_RESOURCE.into(),
                        ResourceKind::Region,
                        fd,
                        &[datapath.as_str(), METADATA_SERVICE, crate::config::RAID],
                    );
                }
            }
            for v in volumes {
                tracing::info!(
                    volume = %v.spec.name,
                    path = %v.spec.path,
                    blocks = v.spec.blocks,
                    block_size = v.spec.block_size,
                    direct = v.spec.direct,
                    drive = v.spec.drive.is_some(),
                    "volume opened"
                );
                for (resource, kind, fd) in v.fds {
                    add(&mut shared, resource, kind, fd, &[datapath.as_str()]);
                }
            }
        }

        // mgmt: the admin channel (the privilege to act on the service table) and the
        // management socket clients connect to. Both outlive mgmt's restarts.
        let mut admin = None;
        let mut mgmt_socket_path = None;
        if config
            .services
            .iter()
            .any(|s| s.name.get_ref() == MGMT_SERVICE)
        {
            let (ours, theirs) =
                AdminChannel::pair().map_err(|e| res_err("admin channel")(e.to_string()))?;
            add(
                &mut shared,
                ADMIN_RESOURCE.into(),
                ResourceKind::Socket,
                theirs.into_fd(),
                &[MGMT_SERVICE],
            );
            admin = Some(ours);
            let path = config.node.state_dir.get_ref().join(MGMT_SOCKET_FILE);
            // We hold the state directory's lock: a socket file left there is stale.
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed stale management socket"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(NodeError::BindMgmt { path, source }),
            }
            let listener = UnixListener::bind(&path).map_err(|source| NodeError::BindMgmt {
                path: path.clone(),
                source,
            })?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|source| NodeError::BindMgmt {
                    path: path.clone(),
                    source,
                })?;
            add(
                &mut shared,
                MGMT_SOCKET_RESOURCE.into(),
                ResourceKind::Socket,
                OwnedFd::from(listener),
                &[MGMT_SERVICE],
            );
            mgmt_socket_path = Some(path);
            // The remote management key, for mgmt alone.
            if let Some(key) = config.mgmt_key().map_err(res_err("the mgmt key"))? {
                let region = duplex_ipc::keys::create_mgmt(&key)
                    .map_err(|e| res_err("the mgmt key")(e.to_string()))?;
                add(
                    &mut shared,
                    duplex_ipc::keys::MGMT_KEY_RESOURCE.into(),
                    ResourceKind::Region,
                    region
                        .try_clone_fd()
                        .map_err(|e| res_err("the mgmt key")(e.to_string()))?,
                    &[MGMT_SERVICE],
                );
                tracing::info!(
                    "mgmt key loaded: duplexctl --connect may manage this node over TLS"
                );
            }
        }

        // mgmt and metadata: the config channel (the privilege to change the storage
        // configuration). duplexd holds both ends, so the channel outlives either's restarts.
        let has = |name: &str| config.services.iter().any(|s| s.name.get_ref() == name);
        if has(MGMT_SERVICE) && has(METADATA_SERVICE) {
            let (mgmt_end, metadata_end) =
                ConfigChannel::pair().map_err(|e| res_err("config channel")(e.to_string()))?;
            add(
                &mut shared,
                CONFIG_RESOURCE.into(),
                ResourceKind::Socket,
                mgmt_end.into_fd(),
                &[MGMT_SERVICE],
            );
            add(
                &mut shared,
                CONFIG_RESOURCE.into(),
                ResourceKind::Socket,
                metadata_end.into_fd(),
                &[METADATA_SERVICE],
            );
        }

        // fabric and metadata: the reservation channel (the privilege to change a namespace's
        // reservation state on a host's command). duplexd holds both ends, so it outlives
        // either's restarts.
        if has(storage::FABRIC) && has(METADATA_SERVICE) {
            let (fabric_end, metadata_end) = duplex_ipc::resv::ResvChannel::pair()
                .map_err(|e| res_err("reservation channel")(e.to_string()))?;
            add(
                &mut shared,
                duplex_ipc::resv::RESV_RESOURCE.into(),
                ResourceKind::Socket,
                fabric_end.into_fd(),
                &[storage::FABRIC],
            );
            add(
                &mut shared,
                duplex_ipc::resv::RESV_RESOURCE.into(),
                ResourceKind::Socket,
                metadata_end.into_fd(),
                &[METADATA_SERVICE],
            );
        }

        // The array's secrets key, for the services that seal (metadata) and unseal (fabric)
        // hosts' secrets.
        if let Some(sec) = &config.secrets {
            let path = sec.key_file.get_ref();
            let text = std::fs::read_to_string(path).map_err(|e| {
                res_err("the secrets key")(format!("cannot read {}: {e}", path.display()))
            })?;
            let key = duplex_ondisk::secrets::SecretsKey::from_hex(&text)
                .map_err(|e| res_err("the secrets key")(format!("{}: {e}", path.display())))?;
            if let Ok(meta) = std::fs::metadata(path) {
                use std::os::unix::fs::PermissionsExt;
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(file = %path.display(), "the secrets key file is readable by others than its owner (chmod 600 it)");
                }
            }
            let region = duplex_ipc::keys::create(key.bytes())
                .map_err(|e| res_err("the secrets key")(e.to_string()))?;
            for user in [METADATA_SERVICE, storage::FABRIC] {
                add(
                    &mut shared,
                    duplex_ipc::keys::SECRETS_KEY_RESOURCE.into(),
                    ResourceKind::Region,
                    region
                        .try_clone_fd()
                        .map_err(|e| res_err("the secrets key")(e.to_string()))?,
                    &[user],
                );
            }
            tracing::info!(key_id = ?key, "secrets key loaded: hosts' DH-HMAC-CHAP secrets can be stored");
        }

        // Metrics: kept only when the node exposes them (a listener handed to mgmt, which
        // serves them to Prometheus): one region per service, written by it, kept across its
        // restarts, and read by mgmt.
        let exposes_metrics = config.listeners.iter().any(|l| {
            l.service.get_ref() == MGMT_SERVICE && !l.tls.as_ref().is_some_and(|t| *t.get_ref())
        }) && config
            .services
            .iter()
            .any(|s| s.name.get_ref() == MGMT_SERVICE);
        let node_metrics = if exposes_metrics {
            let m = Metrics::create("duplexd")
                .map_err(|e| res_err("metrics region of duplexd")(e.to_string()))?;
            add(
                &mut shared,
                format!("{METRICS_READER_PREFIX}duplexd"),
                ResourceKind::Region,
                m.region()
                    .try_clone_fd()
                    .map_err(|e| res_err("metrics region of duplexd")(e.to_string()))?,
                &[MGMT_SERVICE],
            );
            Some(NodeMetrics {
                metrics: m,
                services: Vec::new(),
            })
        } else {
            None
        };
        if exposes_metrics {
            for s in config
                .services
                .iter()
                .filter(|s| s.name.get_ref() != MGMT_SERVICE)
            {
                let name = s.name.get_ref();
                let metrics = Metrics::create(name)
                    .map_err(|e| res_err(format!("metrics region of {name}"))(e.to_string()))?;
                let fd = |m: &Metrics| {
                    m.region()
                        .try_clone_fd()
                        .map_err(|e| res_err(format!("metrics region of {name}"))(e.to_string()))
                };
                add(
                    &mut shared,
                    METRICS_RESOURCE.into(),
                    ResourceKind::Region,
                    fd(&metrics)?,
                    &[name.as_str()],
                );
                add(
                    &mut shared,
                    format!("{METRICS_READER_PREFIX}{name}"),
                    ResourceKind::Region,
                    fd(&metrics)?,
                    &[MGMT_SERVICE],
                );
            }
        }

        let beat = Duration::from_millis(config.supervisor.heartbeat_ms);
        let datapaths: Vec<&str> = config
            .services
            .iter()
            .filter(|s| s.kind == ServiceKind::Datapath)
            .map(|s| s.name.get_ref().as_str())
            .collect();
        let mut services = Vec::new();
        for s in config.start_order() {
            let needs_datapath = s
                .after
                .iter()
                .any(|a| datapaths.contains(&a.get_ref().as_str()));
            let name = s.name.get_ref().clone();
            let binary = s
                .binary
                .clone()
                .unwrap_or_else(|| exe_dir.join(format!("duplex-{name}")));
            if !is_executable(&binary) {
                return Err(NodeError::MissingBinary { name, path: binary });
            }
            let health = Health::create(&name, beat)
                .map_err(|e| res_err(format!("health region of {name}"))(e.to_string()))?;
            let mut resources = vec![shared.len()];
            shared.push(Shared {
                name: HEALTH_RESOURCE.into(),
                kind: ResourceKind::Region,
                fd: health
                    .region()
                    .try_clone_fd()
                    .map_err(|e| res_err(format!("health region of {name}"))(e.to_string()))?,
            });
            resources.extend(wants.iter().filter(|(u, _)| *u == name).map(|(_, i)| *i));
            let now = Instant::now();
            services.push(Service {
                name,
                kind: s.kind,
                binary,
                args: s.args.clone(),
                resources,
                health,
                state: ServiceState::Stopped,
                child: None,
                channel: None,
                generation: 0,
                restarts: 0,
                hangs: 0,
                exits: VecDeque::new(),
                next_start: None,
                started: now,
                down_since: None,
                last_restart: None,
                report: None,
                last_exit: String::new(),
                expected: Expected::Nothing,
                last_beat: 0,
                beat_moved: now,
                kill_at: None,
                needs_datapath,
                crash_loops: 0,
            });
        }
        let signals = SignalFd::with_flags(
            &Self::signal_mask(),
            SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
        )
        .map_err(|source| NodeError::Sys {
            what: "signalfd",
            source,
        })?;
        let private_mounts = nix::unistd::geteuid().is_root();
        if !config.supervisor.sandbox {
            let msg = format!(
                "!!! supervisor.sandbox = false: services run WITHOUT their seccomp policies \
                 ({SANDBOX_ENV}=off). Development only. !!!"
            );
            tracing::warn!("{msg}");
            eprintln!("{msg}");
        }
        let mut events = crate::events::Journal::open(
            config.node.name.get_ref(),
            Some(config.node.state_dir.get_ref().clone()),
        );
        events.record(
            "duplexd",
            "info",
            "node-started",
            &format!("duplexd started node {}", config.node.name.get_ref()),
        );
        Ok(Self {
            metrics: node_metrics,
            events,
            config,
            shared,
            services,
            logs: Vec::new(),
            admin,
            mgmt_socket_path,
            signals,
            failed: false,
            halt: false,
            born: Instant::now(),
            private_mounts,
        })
    }

    /// The signals the node handles; block them in every thread before [`Node::new`].
    pub fn signal_mask() -> SigSet {
        let mut mask = SigSet::empty();
        for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
            mask.add(s);
        }
        mask
    }

    /// Starts every service and supervises until SIGTERM/SIGINT; then stops them in reverse
    /// start order. Returns whether the node failed (datapath died).
    pub fn run(mut self) -> Result<bool, NodeError> {
        for i in 0..self.services.len() {
            self.spawn(i);
        }
        let tick = Duration::from_millis(self.config.supervisor.heartbeat_ms.clamp(1, 1000));
        loop {
            let now = Instant::now();
            let mut timeout = tick;
            for s in &self.services {
                for t in [s.next_start, s.kill_at].into_iter().flatten() {
                    timeout = timeout.min(t.saturating_duration_since(now));
                }
            }
            let ready = self.wait(timeout)?;
            if ready.admin {
                self.on_admin();
            }
            for i in ready.services {
                self.on_message(i);
            }
            for i in ready.logs.into_iter().rev() {
                self.on_log(i);
            }
            if ready.signals {
                let mut stop = false;
                while let Ok(Some(info)) = self.signals.read_signal() {
                    match Signal::try_from(info.ssi_signo as i32) {
                        Ok(Signal::SIGCHLD) => {}
                        Ok(s) => {
                            tracing::info!(signal = ?s, "stopping node");
                            stop = true;
                        }
                        Err(_) => {}
                    }
                }
                self.reap();
                if self.halt {
                    self.halt_all();
                    self.drain_logs();
                    if let Some(path) = &self.mgmt_socket_path {
                        let _ = std::fs::remove_file(path);
                    }
                    return Ok(true);
                }
                if stop {
                    self.stop_all();
                    self.drain_logs();
                    if let Some(path) = &self.mgmt_socket_path {
                        let _ = std::fs::remove_file(path);
                    }
                    return Ok(self.failed);
                }
            }
            self.watchdog();
            self.publish_metrics();
            let now = Instant::now();
            for i in 0..self.services.len() {
                if self.services[i].next_start.is_some_and(|t| t <= now) {
                    self.services[i].next_start = None;
                    if self.failed && self.services[i].needs_datapath {
                        let s = &mut self.services[i];
                        s.state = ServiceState::Failed;
                        tracing::warn!(service = %s.name, "restart cancelled: the datapath is down, the node no longer serves");
                        continue;
                    }
                    self.spawn(i);
                }
            }
        }
    }

    /// Polls every fd the loop serves.
    fn wait(&self, timeout: Duration) -> Result<Ready, NodeError> {
        let watched: Vec<usize> = (0..self.services.len())
            .filter(|&i| self.services[i].channel.is_some())
            .collect();
        let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
        let admin_at = self.admin.as_ref().map(|a| {
            fds.push(PollFd::new(a.as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let services_at = fds.len();
        for &i in &watched {
            if let Some(c) = &self.services[i].channel {
                fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
            }
        }
        let logs_at = fds.len();
        for l in &self.logs {
            fds.push(PollFd::new(l.fd.as_fd(), PollFlags::POLLIN));
        }
        let ms = u16::try_from(timeout.as_millis().max(1)).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(source) => {
                return Err(NodeError::Sys {
                    what: "poll",
                    source,
                })
            }
        }
        let is_ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        Ok(Ready {
            signals: is_ready(&fds[0]),
            admin: admin_at.is_some_and(|at| is_ready(&fds[at])),
            services: watched
                .iter()
                .zip(&fds[services_at..logs_at])
                .filter(|(_, f)| is_ready(f))
                .map(|(i, _)| *i)
                .collect(),
            logs: (0..self.logs.len())
                .filter(|&j| is_ready(&fds[logs_at + j]))
                .collect(),
        })
    }

    fn spawn(&mut self, i: usize) {
        let sandbox = self.config.supervisor.sandbox;
        let private_mounts = self.private_mounts;
        if self.services[i].name == MGMT_SERVICE {
            self.drain_admin();
        }
        let s = &mut self.services[i];
        let mode = if s.generation == 0 {
            StartMode::Fresh
        } else {
            StartMode::Restart
        };
        let (ours, theirs) = match ControlChannel::pair() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(service = %s.name, error = %e, "cannot create control channel");
                s.state = ServiceState::Failed;
                return;
            }
        };
        let theirs = theirs.into_fd();
        let (log_read, log_write) = match nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(service = %s.name, error = %e, "cannot create log pipe");
                s.state = ServiceState::Failed;
                return;
            }
        };
        // The service's end blocks (a service must not see EAGAIN on stderr); duplexd's end
        // does not, and duplexd drains it promptly.
        if let Err(e) = nix::fcntl::fcntl(
            log_write.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()),
        ) {
            tracing::warn!(service = %s.name, error = %e, "cannot make the log pipe blocking");
        }
        let hardening = match Hardening::new().keep_fds(&[theirs.as_raw_fd()]) {
            Ok(h) => h
                .keep_capabilities(&[])
                .max_open_files(SERVICE_MAX_FILES)
                .max_core_bytes(0)
                .private_mounts(private_mounts),
            Err(e) => {
                tracing::error!(service = %s.name, error = %e, "cannot prepare the sandbox");
                s.state = ServiceState::Failed;
                return;
            }
        };
        s.generation += 1;
        let mut cmd = Command::new(&s.binary);
        cmd.args(&s.args)
            .env_clear()
            .env(CONTROL_FD_ENV, "3")
            .env("DUPLEX_SERVICE", &s.name)
            .env("DUPLEX_GENERATION", s.generation.to_string())
            .env(
                "DUPLEX_START_MODE",
                if mode == StartMode::Fresh {
                    "fresh"
                } else {
                    "restart"
                },
            )
            // One malloc arena: glibc's per-thread arenas, when one shrinks, read
            // /proc/sys/vm/overcommit_memory, an open no sandbox policy allows (the datapath
            // died of it publishing a few hundred volume maps). The main arena trims with brk.
            .env(MALLOC_ENV.0, MALLOC_ENV.1)
            .stdin(Stdio::null());
        if let Ok(filter) = std::env::var("RUST_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        if !sandbox {
            cmd.env(SANDBOX_ENV, "off");
        }
        match log_write.try_clone() {
            Ok(dup) => {
                cmd.stdout(Stdio::from(dup)).stderr(Stdio::from(log_write));
            }
            Err(e) => {
                tracing::warn!(service = %s.name, error = %e, "cannot share the log pipe; stdout is discarded");
                cmd.stdout(Stdio::null()).stderr(Stdio::from(log_write));
            }
        }
        let harden = move || {
            // SAFETY: runs in the forked child just before exec; harden_child only makes
            // async-signal-safe raw syscalls on data prepared before the fork.
            unsafe { harden_child(&hardening) }
        };
        // SAFETY: the closure is async-signal-safe (see above) and touches no parent state.
        unsafe { cmd.pre_exec(harden) };
        let result = cmd.spawn();
        // Our copy of the child's control end (the child has its own after the fork).
        drop(theirs);
        // The Command still holds the log pipe's write ends: drop it so EOF is seen when the
        // service exits.
        drop(cmd);
        match result {
            Ok(child) => {
                let pid = child.id();
                tracing::info!(service = %s.name, pid, generation = s.generation, ?mode, "service spawned");
                self.logs.push(LogPipe {
                    service: s.name.clone(),
                    pid,
                    generation: s.generation,
                    fd: log_read,
                    pending: Vec::new(),
                });
                s.child = Some(child);
                s.channel = Some(ours);
                s.state = ServiceState::Starting;
                s.started = Instant::now();
                s.kill_at = None;
                s.expected = Expected::Nothing;
                if mode == StartMode::Restart {
                    s.restarts += 1;
                }
            }
            Err(e) => {
                tracing::error!(service = %s.name, binary = %s.binary.display(), error = %e, "cannot spawn service");
                s.state = ServiceState::Failed;
            }
        }
    }

    fn on_message(&mut self, i: usize) {
        let s = &mut self.services[i];
        let Some(channel) = &s.channel else { return };
        let pid = s.pid();
        match channel.recv() {
            Ok((env, _fds)) => match env.body {
                Body::Hello {
                    service,
                    protocol_version,
                    ..
                } => {
                    if service != s.name
                        || protocol_version != duplex_ipc::lifecycle::PROTOCOL_VERSION
                    {
                        tracing::warn!(service = %s.name, pid, said = %service, protocol_version, "bad hello; dropping the service");
                        s.channel = None;
                        kill_child(s);
                        return;
                    }
                    let mode = if s.generation == 1 {
                        StartMode::Fresh
                    } else {
                        StartMode::Restart
                    };
                    let mut resources = Vec::new();
                    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
                    for (n, &r) in s.resources.iter().enumerate() {
                        let res = &self.shared[r];
                        resources.push(Resource {
                            name: res.name.clone(),
                            kind: res.kind,
                            fd_index: n as u32,
                        });
                        fds.push(res.fd.as_fd());
                    }
                    let start = Envelope {
                        request_id: channel.next_request_id(),
                        epoch: s.generation,
                        body: Body::Start {
                            generation: s.generation,
                            mode,
                            resources,
                        },
                    };
                    if let Err(e) = channel.send(&start, &fds) {
                        tracing::warn!(service = %s.name, pid, error = %e, "cannot send start");
                    }
                }
                Body::Ready { generation } if generation == s.generation => {
                    let now = Instant::now();
                    s.state = ServiceState::Running;
                    s.last_beat = s.health.count();
                    s.beat_moved = now;
                    let down = s.down_since.take().map(|t| now.duration_since(t));
                    if let Some(d) = down {
                        s.last_restart = Some(d);
                    }
                    let down_us = down.map_or(0, |d| d.as_micros());
                    tracing::info!(service = %s.name, pid, generation, down_us, "service ready");
                    if generation > 1 {
                        self.events.record(
                            "duplexd",
                            "info",
                            "service-restarted",
                            &format!(
                                "service {} serves again (generation {generation}, down {} ms)",
                                s.name,
                                down_us / 1000
                            ),
                        );
                    }
                }
                Body::Report { text } => {
                    s.report = Some((s.generation, text));
                }
                Body::Event {
                    level,
                    kind,
                    message,
                } => {
                    self.events.record(&s.name, level.name(), &kind, &message);
                }
                other => {
                    tracing::debug!(service = %s.name, pid, kind = other.kind_name(), "control message");
                }
            },
            Err(e) if e.is_malformed() => {
                // A malformed message: that peer is dropped; the node runs on.
                tracing::warn!(service = %s.name, pid, error = %e, "malformed control message; killing the service");
                s.channel = None;
                kill_child(s);
            }
            Err(_) => {
                // Closed or failed: the service is exiting; SIGCHLD will follow.
                s.channel = None;
            }
        }
    }

    /// Reads what a service wrote and passes it on, one log event per line, tagged with the
    /// service, its pid and generation. Never blocks: the pipe is non-blocking and duplexd's
    /// own log writer is a lossy queue drained by its own thread.
    fn on_log(&mut self, j: usize) {
        let mut buf = [0_u8; 16 * 1024];
        let eof = loop {
            match nix::unistd::read(self.logs[j].fd.as_raw_fd(), &mut buf) {
                Ok(0) => break true,
                Ok(n) => {
                    self.logs[j].pending.extend_from_slice(&buf[..n]);
                    emit_lines(&mut self.logs[j], false);
                    if n < buf.len() {
                        break false;
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => break false,
                Err(e) => {
                    tracing::warn!(service = %self.logs[j].service, error = %e, "reading service output failed");
                    break true;
                }
            }
        };
        if eof {
            let mut log = self.logs.swap_remove(j);
            emit_lines(&mut log, true);
        }
    }

    /// At stop: passes on what is left in every pipe.
    fn drain_logs(&mut self) {
        for j in (0..self.logs.len()).rev() {
            self.on_log(j);
        }
    }

    /// Heartbeats, start timeouts and kill deadlines.
    fn watchdog(&mut self) {
        let now = Instant::now();
        let settings = &self.config.supervisor;
        let hung_after =
            Duration::from_millis(settings.heartbeat_ms * u64::from(settings.missed_beats));
        let start_timeout = Duration::from_millis(settings.start_timeout_ms);
        for s in &mut self.services {
            if s.child.is_none() {
                continue;
            }
            if s.kill_at.is_some_and(|t| t <= now) {
                tracing::warn!(service = %s.name, pid = s.pid(), "service did not stop in time; killing it");
                s.kill_at = None;
                kill_child(s);
                continue;
            }
            let hung = match s.state {
                ServiceState::Running => {
                    let count = s.health.count();
                    if count != s.last_beat {
                        s.last_beat = count;
                        s.beat_moved = now;
                        false
                    } else {
                        now.duration_since(s.beat_moved) > hung_after
                    }
                }
                ServiceState::Starting => now.duration_since(s.started) > start_timeout,
                _ => false,
            };
            if hung && !matches!(s.expected, Expected::Hung(_)) {
                s.hangs += 1;
                tracing::warn!(service = %s.name, pid = s.pid(), generation = s.generation, state = s.state.name(), silent_ms = millis(now.duration_since(s.beat_moved.max(s.started))), event = "hung", "service is hung (no heartbeat or no ready): killing it");
                s.expected = Expected::Hung(now);
                s.down_since = Some(now);
                kill_child(s);
            }
        }
    }

    fn reap(&mut self) {
        let settings = &self.config.supervisor;
        for i in 0..self.services.len() {
            let s = &mut self.services[i];
            let Some(child) = s.child.as_mut() else {
                continue;
            };
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            let pid = s.pid();
            s.child = None;
            s.channel = None;
            s.kill_at = None;
            s.last_exit = status.to_string();
            if s.state == ServiceState::Stopped {
                continue;
            }
            let now = Instant::now();
            let expected = std::mem::replace(&mut s.expected, Expected::Nothing);
            // Restart latency counts from the moment the death was caused, when we caused it.
            s.down_since = Some(match expected {
                Expected::Injected(_, at) | Expected::Hung(at) => at,
                Expected::Nothing | Expected::OperatorRestart => now,
            });
            let cause = match expected {
                Expected::Nothing => "crash",
                Expected::Injected(mode, _) => mode.name(),
                Expected::Hung(_) => "hung",
                Expected::OperatorRestart => "operator restart",
            };
            if s.kind == ServiceKind::Datapath {
                tracing::error!(service = %s.name, pid, %status, cause, "datapath died: node stops serving");
                s.state = ServiceState::Failed;
                self.failed = true;
                if self.config.cluster.is_some() {
                    // A cluster member: nothing of this node may go on (a fabric answering
                    // hosts, a cluster service beating the peer); the peer takes over.
                    tracing::error!(
                        "cluster member: stopping the whole node so that its peer takes over"
                    );
                    self.halt = true;
                }
                // Close the listeners so hosts fail over to the peer at once.
                self.shared.retain(|r| !r.name.starts_with("listener:"));
                continue;
            }
            if self.failed && s.needs_datapath {
                // The node no longer serves: what needs the datapath stays down (restarting it
                // would only fail, over and over, without the datapath's resources).
                s.state = ServiceState::Failed;
                tracing::warn!(service = %s.name, pid, %status, "service exited and is not restarted: the datapath is down, the node no longer serves");
                continue;
            }
            if expected == Expected::OperatorRestart {
                tracing::info!(service = %s.name, pid, %status, "service stopped for restart");
                s.state = ServiceState::Backoff;
                s.next_start = Some(now);
                continue;
            }
            tracing::warn!(service = %s.name, pid, generation = s.generation, %status, cause, uptime = ?now - s.started, "service exited unexpectedly");
            self.events.record(
                "duplexd",
                "warning",
                "service-exited",
                &format!(
                    "service {} (pid {pid}, generation {}) exited unexpectedly: {status} ({cause})",
                    s.name, s.generation
                ),
            );
            let window = Duration::from_secs(settings.crash_loop_window_s);
            s.exits.push_back(now);
            while s
                .exits
                .front()
                .is_some_and(|t| now.duration_since(*t) > window)
            {
                s.exits.pop_front();
            }
            let recent = s.exits.len() as u32;
            if recent >= settings.crash_loop_exits {
                s.state = ServiceState::Failed;
                s.crash_loops += 1;
                tracing::error!(service = %s.name, exits = recent, window_s = settings.crash_loop_window_s, event = "crash-loop", "service is crash-looping: marked failed");
                self.events.record(
                    "duplexd",
                    "error",
                    "crash-loop",
                    &format!(
                        "service {} exited {recent} times within {} s: marked failed, not restarted",
                        s.name, settings.crash_loop_window_s
                    ),
                );
                continue;
            }
            let delay = if recent <= 1 {
                Duration::ZERO
            } else {
                let factor = 1u64 << (recent - 2).min(20);
                Duration::from_millis(
                    settings
                        .backoff_initial_ms
                        .saturating_mul(factor)
                        .min(settings.backoff_max_ms),
                )
            };
            s.state = ServiceState::Backoff;
            s.next_start = Some(now + delay);
            tracing::info!(service = %s.name, delay_ms = millis(delay), "restarting service");
        }
    }

    /// Discards whatever a previous mgmt left queued on the admin channel (both directions), so
    /// a new mgmt never receives an answer meant for its predecessor.
    fn drain_admin(&mut self) {
        if let Some(admin) = &self.admin {
            while let Ok(Some(_)) = admin.recv_request(Duration::ZERO) {}
        }
        if let Some(r) = self.shared.iter().find(|r| r.name == ADMIN_RESOURCE) {
            if let Ok(fd) = r.fd.try_clone() {
                if let Ok(theirs) = AdminChannel::from_fd(fd) {
                    while let Ok(Some(_)) = theirs.recv_reply(Duration::ZERO) {}
                }
            }
        }
    }

    fn on_admin(&mut self) {
        let Some(admin) = &self.admin else { return };
        let got = admin.recv_request(Duration::ZERO);
        let (id, request) = match got {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) if e.is_malformed() => {
                tracing::warn!(error = %e, "malformed admin request: dropping mgmt");
                if let Some(i) = self.index_of(MGMT_SERVICE) {
                    kill_child(&mut self.services[i]);
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin channel read failed");
                return;
            }
        };
        tracing::debug!(?request, "admin request");
        let reply = self.admin_request(request);
        if let Some(admin) = &self.admin {
            if let Err(e) = admin.send_reply(id, &reply) {
                tracing::warn!(error = %e, "cannot answer mgmt");
            }
        }
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.services.iter().position(|s| s.name == name)
    }

    fn admin_request(&mut self, request: AdminRequest) -> AdminReply {
        let now = Instant::now();
        let error = |code, message: String| AdminReply::Error { code, message };
        match request {
            AdminRequest::ListServices => {
                AdminReply::Services(self.services.iter().map(|s| s.info(now)).collect())
            }
            AdminRequest::NodeStatus => AdminReply::Status(NodeStatus {
                node: self.config.node.name.get_ref().clone(),
                supervisor_pid: std::process::id(),
                uptime_ms: millis(now.duration_since(self.born)),
                failed: self.failed,
                services_running: self
                    .services
                    .iter()
                    .filter(|s| s.state == ServiceState::Running)
                    .count() as u32,
                services_total: self.services.len() as u32,
                sandbox: self.config.supervisor.sandbox,
            }),
            AdminRequest::Events(after) => {
                // As many as fit one reply.
                let mut out = Vec::new();
                let mut len = 2;
                for e in self.events.after(after, 256) {
                    let Ok(v) = serde_json::to_value(&e) else {
                        continue;
                    };
                    let n = v.to_string().len() + 1;
                    if len + n > duplex_ipc::admin::MAX_EVENTS_JSON_BYTES {
                        break;
                    }
                    len += n;
                    out.push(v);
                }
                AdminReply::Events(serde_json::Value::Array(out).to_string())
            }
            AdminRequest::ServiceReport(name) => {
                let Some(i) = self.index_of(&name) else {
                    return error(
                        AdminErrorCode::UnknownService,
                        format!("no service named {name:?}"),
                    );
                };
                let (generation, text) = self.services[i].report.clone().unwrap_or_default();
                AdminReply::Report { generation, text }
            }
            AdminRequest::RestartService(name) => {
                let Some(i) = self.index_of(&name) else {
                    return error(
                        AdminErrorCode::UnknownService,
                        format!("no service named {name:?}"),
                    );
                };
                if self.services[i].kind == ServiceKind::Datapath {
                    return error(
                        AdminErrorCode::NotAllowed,
                        format!("{name} is the datapath: restarting it would stop the node's I/O"),
                    );
                }
                let stop_ms = self.config.supervisor.stop_timeout_ms;
                let s = &mut self.services[i];
                if s.child.is_some() {
                    s.expected = Expected::OperatorRestart;
                    s.kill_at = Some(now + Duration::from_millis(stop_ms));
                    if let Some(channel) = &s.channel {
                        let msg = Envelope {
                            request_id: channel.next_request_id(),
                            epoch: s.generation,
                            body: Body::Shutdown {
                                reason: "restart requested by an operator".into(),
                                deadline_ms: u32::try_from(stop_ms).unwrap_or(u32::MAX),
                            },
                        };
                        let _ = channel.send(&msg, &[]);
                    }
                    let _ = kill(Pid::from_raw(s.pid() as i32), Signal::SIGTERM);
                    tracing::info!(service = %name, pid = s.pid(), "restart requested by an operator");
                    AdminReply::Done(format!(
                        "restarting {name} (pid {} stopping, generation {} next)",
                        s.pid(),
                        s.generation + 1
                    ))
                } else {
                    let was = s.state;
                    s.exits.clear();
                    s.next_start = Some(now);
                    s.state = ServiceState::Backoff;
                    tracing::info!(service = %name, "start requested by an operator");
                    AdminReply::Done(format!("starting {name} (was {})", was.name()))
                }
            }
            AdminRequest::CrashService { name, mode } => {
                let Some(i) = self.index_of(&name) else {
                    return error(
                        AdminErrorCode::UnknownService,
                        format!("no service named {name:?}"),
                    );
                };
                let s = &mut self.services[i];
                if s.kind == ServiceKind::Datapath {
                    return error(
                        AdminErrorCode::NotAllowed,
                        format!(
                            "{name} is the datapath: crashing it fails the node; kill the process \
                             yourself if that is what you want"
                        ),
                    );
                }
                if s.child.is_none() || s.state != ServiceState::Running {
                    return error(
                        AdminErrorCode::Failed,
                        format!("{name} is not running (state {})", s.state.name()),
                    );
                }
                let pid = s.pid();
                match mode {
                    CrashMode::Kill => {
                        kill_child(s);
                    }
                    CrashMode::Panic | CrashMode::Hang | CrashMode::ForbiddenSyscall => {
                        let fault = match mode {
                            CrashMode::Panic => Fault::Panic,
                            CrashMode::Hang => Fault::Hang,
                            _ => Fault::ForbiddenSyscall,
                        };
                        let Some(channel) = &s.channel else {
                            return error(
                                AdminErrorCode::Failed,
                                format!("{name} has no control channel"),
                            );
                        };
                        let msg = Envelope {
                            request_id: channel.next_request_id(),
                            epoch: s.generation,
                            body: Body::Inject { fault },
                        };
                        if let Err(e) = channel.send(&msg, &[]) {
                            return error(
                                AdminErrorCode::Failed,
                                format!("cannot reach {name}: {e}"),
                            );
                        }
                    }
                }
                // Restart latency counts from now. An injected hang is the exception: the
                // watchdog that finds it records the kill as a hang, timed from its detection.
                s.expected = Expected::Injected(mode, now);
                tracing::info!(service = %name, pid, mode = mode.name(), event = "crash-injected", "crash injected");
                AdminReply::Done(format!("injected {} into {name} (pid {pid})", mode.name()))
            }
        }
    }

    /// Kills every service at once (no shutdown request, no grace time) and reaps them: a
    /// cluster member whose datapath died must go silent now.
    /// Sets duplexd's metrics from the service table (restarts, crash loops, running).
    fn publish_metrics(&mut self) {
        let Some(m) = self.metrics.as_mut() else {
            return;
        };
        for (i, s) in self.services.iter().enumerate() {
            if m.services.len() <= i {
                let labels = [("service", s.name.as_str())];
                let made = (|| {
                    Ok::<_, duplex_ipc::metrics::MetricsError>((
                        m.metrics.counter(Metric::ServiceRestarts, &labels)?,
                        m.metrics.counter(Metric::ServiceCrashLoops, &labels)?,
                        m.metrics.gauge(Metric::ServiceUp, &labels)?,
                    ))
                })();
                match made {
                    Ok(h) => m.services.push(h),
                    Err(e) => {
                        tracing::warn!(error = %e, "duplexd's metrics not kept");
                        self.metrics = None;
                        return;
                    }
                }
            }
            let (restarts, loops, up) = &m.services[i];
            restarts.store(u64::from(s.restarts));
            loops.store(u64::from(s.crash_loops));
            up.set(u64::from(
                s.child.is_some() && matches!(s.state, ServiceState::Running),
            ));
        }
    }

    fn halt_all(&mut self) {
        for s in &mut self.services {
            s.state = ServiceState::Stopped;
            s.next_start = None;
            if let Some(child) = s.child.as_mut() {
                let pid = child.id();
                let _ = child.kill();
                let status = child.wait();
                tracing::info!(service = %s.name, pid, ?status, "service killed: node halting");
            }
            s.child = None;
            s.channel = None;
        }
    }

    fn stop_all(&mut self) {
        let deadline_ms = u32::try_from(self.config.supervisor.stop_timeout_ms).unwrap_or(u32::MAX);
        // Reverse start order: dependants stop before what they depend on.
        for i in (0..self.services.len()).rev() {
            let s = &mut self.services[i];
            s.state = ServiceState::Stopped;
            s.next_start = None;
            let Some(child) = s.child.as_mut() else {
                continue;
            };
            let pid = child.id();
            if let Some(channel) = &s.channel {
                let msg = Envelope {
                    request_id: channel.next_request_id(),
                    epoch: s.generation,
                    body: Body::Shutdown {
                        reason: "node stopping".into(),
                        deadline_ms,
                    },
                };
                let _ = channel.send(&msg, &[]);
            }
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_millis(u64::from(deadline_ms));
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    tracing::info!(service = %s.name, pid, %status, "service stopped");
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(service = %s.name, pid, "service did not stop in time; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            s.child = None;
            s.channel = None;
        }
    }
}

/// What the poll found readable.
struct Ready {
    signals: bool,
    admin: bool,
    services: Vec<usize>,
    logs: Vec<usize>,
}

fn emit_lines(log: &mut LogPipe, flush: bool) {
    let mut start = 0;
    while let Some(nl) = log.pending[start..].iter().position(|&b| b == b'\n') {
        emit(log, start, start + nl);
        start += nl + 1;
    }
    // An overlong line without a newline goes out in pieces.
    while log.pending.len() - start >= MAX_LOG_LINE {
        emit(log, start, start + MAX_LOG_LINE);
        start += MAX_LOG_LINE;
    }
    if flush && start < log.pending.len() {
        emit(log, start, log.pending.len());
        start = log.pending.len();
    }
    log.pending.drain(..start);
}

fn emit(log: &LogPipe, from: usize, to: usize) {
    let text = String::from_utf8_lossy(&log.pending[from..to]);
    let text = text.trim_end_matches('\r');
    tracing::info!(target: "service", service = %log.service, pid = log.pid, generation = log.generation, "{text}");
}

fn kill_child(s: &mut Service) {
    if let Some(child) = s.child.as_mut() {
        let _ = child.kill();
    }
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use duplex_ipc::config::ConfigRequest;

    /// A node of `services` (each binary a stub: nothing is spawned) in a fresh state directory.
    fn new_node(services: &[&str]) -> (tempfile::TempDir, Node) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut text = format!(
            "[node]\nname = \"a\"\nstate_dir = \"{}\"\n",
            dir.path().display()
        );
        for name in services {
            let binary = dir.path().join(format!("duplex-{name}"));
            std::fs::write(&binary, "#!/bin/sh\n").expect("stub");
            std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            text.push_str(&format!("[[service]]\nname = \"{name}\"\n"));
        }
        let config = NodeConfig::parse("node.toml", &text).expect("config");
        let node = Node::new(config, dir.path().to_owned()).expect("node");
        (dir, node)
    }

    /// The config channel ends `service` is handed.
    fn config_ends(node: &Node, service: &str) -> Vec<ConfigChannel> {
        let s = node
            .services
            .iter()
            .find(|s| s.name == service)
            .expect("service");
        s.resources
            .iter()
            .map(|&r| &node.shared[r])
            .filter(|r| r.name == CONFIG_RESOURCE && r.kind == ResourceKind::Socket)
            .map(|r| ConfigChannel::from_fd(r.fd.try_clone().expect("dup")).expect("channel"))
            .collect()
    }

    #[test]
    fn mgmt_and_metadata_get_the_two_ends_of_one_config_channel() {
        let (_dir, node) = new_node(&[MGMT_SERVICE, METADATA_SERVICE]);
        let mgmt = config_ends(&node, MGMT_SERVICE);
        let metadata = config_ends(&node, METADATA_SERVICE);
        assert_eq!((mgmt.len(), metadata.len()), (1, 1));
        let id = mgmt[0]
            .send_request(&ConfigRequest::ListPools)
            .expect("send");
        assert_eq!(
            metadata[0]
                .recv_request(Duration::from_secs(5))
                .expect("recv"),
            Some((id, ConfigRequest::ListPools))
        );

        // Without both, nobody gets one.
        let (_dir, node) = new_node(&[MGMT_SERVICE]);
        assert!(config_ends(&node, MGMT_SERVICE).is_empty());
        let (_dir, node) = new_node(&[METADATA_SERVICE]);
        assert!(config_ends(&node, METADATA_SERVICE).is_empty());
    }
}
