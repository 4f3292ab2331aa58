//! The datapath as a duplex service: lifecycle handshake, handed-over resources, sandbox,
//! control thread, maps channel, engine.
//!
//! Order (everything that needs a system call the policy does not allow comes before the
//! filter): `Hello` → `Start`; attach the health region, read the topology, attach the pool
//! (reclaiming a predecessor's buffers on a restart), the completion rings (produced) then the
//! submission rings (consumed), open the volumes' and pool drives' devices, take the maps
//! channel (its socket type is checked with `getsockopt`); build the [`Engine`] (which creates
//! and restricts the io_uring); enter the `datapath` seccomp policy; say `Ready`; start the
//! control and maps threads; serve.
//!
//! Control messages (`Shutdown`, `Inject`) are received by a second thread, which blocks on the
//! lifecycle channel and stops the engine on `Shutdown` (or when the supervisor goes away). The
//! heartbeat is beaten by the engine's serving loop, so a stuck loop stops it; an injected hang
//! (carried out on the control thread) stops it too, through the process-wide flag of
//! `duplex_ipc::lifecycle`.
//!
//! # Devices
//!
//! Device indices, in order: one per topology volume (its file or drive, with a volume map
//! covering it: served 1:1), then one per pool drive (`Topology::drives`, built the same way
//! but with no volume map: raw drive id `Topology::drive_id(i)`, exported only through the
//! pools the metadata service publishes), then the RAID pools as they are published. The
//! metadata service's privileged channel (`Topology::meta`, if any) is attached as a raw
//! channel: its descriptors address raw drive ids, whether or not the drive became a pool
//! member.
//!
//! # The maps channel
//!
//! With the optional resource `maps` (`duplex_ipc::maps`, `schemas/maps.capnp`), the metadata
//! service publishes pools and volume maps and records member failures. Two threads serve it,
//! so the engine's thread never waits on the socket:
//!
//! * `maps` blocks in `recvmsg` for a request, hands it to the engine through
//!   [`EngineControl`] (applied between two turns of the engine's loop) and sends the reply. A
//!   volume table that does not fit one datagram arrives in parts, staged here and handed to
//!   the engine whole with the last one. A malformed request is logged (rate-limited) and
//!   answered with an error when its id could be read, dropped otherwise.
//! * `maps-events` blocks on [`EngineControl::next_event`] and pushes every member failure to
//!   the peer as it happens (the pool named by its device index).
//!
//! The supervisor holds the other end across restarts of the metadata service, so the
//! datapath's end stays connected while no metadata service runs: requests simply stop, and
//! events (and a reply whose requester died) wait in the socket for the successor, which skips
//! replies it did not ask for and reads the current state with `listDevices` (which also says
//! where every raw drive is). Should the socket's buffer fill meanwhile, the two threads block in
//! `sendmsg` until the successor reads; the engine goes on serving. Both threads end when the
//! supervisor closes its end.
//!
//! Everything published this way lives in the engine only: a datapath that restarts (duplexd
//! treats its death as the node's failure, but should it restart one) comes back with the
//! topology's devices and no pools or pool volumes; the metadata service publishes them again.

use duplex_ipc::metrics::{Metrics, METRICS_RESOURCE};
use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_ipc::control::{ControlError, RateLimiter, StartMode};
use duplex_ipc::desc::IoDesc;
use duplex_ipc::doorbell::{Doorbell, DoorbellError};
use duplex_ipc::lifecycle::{self, Control, Handed, LifecycleError, Next, Started};
use duplex_ipc::maps::{self as wire, MapsChannel, MapsError, MapsReply, MapsRequest};
use duplex_ipc::pool::{Holder, Pool, PoolError, ReclaimPlan};
use duplex_ipc::ring::{self, Consumer, Producer, RingError, RingRegion};
use duplex_ipc::topology::{
    DriveTransport, Topology, TopologyError, VolumeSpec, ROLE_DATAPATH, TOPOLOGY_RESOURCE,
};
use duplex_sandbox::SandboxError;

use crate::bdev::{BdevBox, Event, FileBdev, JournalSpec, MemberState, NvmeBdev, RaidLevel};
use crate::channel::Channel;
use crate::control::{ChecksumSpec, DeviceStatus, EngineControl, PoolSpec};
use crate::drives::{Drive, DriveError, DriveFds};
use crate::engine::{Engine, EngineConfig, EngineError, EngineStats, Stopper};
use crate::map::{Extent, VolumeMap};
use crate::volume::{Volume, VolumeError};

/// The service name (and its seccomp policy's).
pub const SERVICE: &str = "datapath";
/// How long the supervisor may take to answer `Hello`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping engine waits for the fabric to make room for its last completions.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Errors of the service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The lifecycle handshake failed.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// The lifecycle channel failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A resource the topology names was not handed over.
    #[error("Supervisor did not hand over `{0}`")]
    Missing(String),
    /// The topology is unusable.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The pool is unusable.
    #[error("Handed-over pool `{name}` is unusable")]
    Pool {
        /// Resource name.
        name: String,
        /// Why.
        #[source]
        source: PoolError,
    },
    /// A ring is unusable.
    #[error("Handed-over ring `{name}` is unusable")]
    Ring {
        /// Resource name.
        name: String,
        /// Why.
        #[source]
        source: RingError,
    },
    /// A doorbell is unusable.
    #[error("Handed-over doorbell `{name}` is unusable")]
    Doorbell {
        /// Resource name.
        name: String,
        /// Why.
        #[source]
        source: DoorbellError,
    },
    /// A volume's backing fd is unusable.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// A drive volume's drive did not come up.
    #[error(transparent)]
    Drive(#[from] DriveError),
    /// The engine could not be built or failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The seccomp policy could not be entered.
    #[error("Cannot enter the sandbox")]
    Sandbox(#[source] SandboxError),
    /// The control thread could not be started.
    #[error("Cannot start the control thread")]
    Thread(#[source] std::io::Error),
    /// The handed-over cluster state region is unusable.
    #[error("Handed-over `{}` is unusable", duplex_ipc::cluster::CLUSTER_RESOURCE)]
    ClusterRegion(#[source] duplex_ipc::region::RegionError),
    /// The handed-over RAID jobs region is unusable.
    #[error("Handed-over `{}` is unusable", duplex_ipc::raid::RAID_RESOURCE)]
    RaidRegion(#[source] duplex_ipc::region::RegionError),
    /// The handed-over maps channel is not a `SOCK_SEQPACKET` socket.
    #[error("Handed-over `{}` is unusable", wire::MAPS_RESOURCE)]
    Maps(#[source] ControlError),
}

fn take(started: &mut Started, name: &str) -> Result<Handed, ServiceError> {
    started
        .take(name)
        .ok_or_else(|| ServiceError::Missing(name.to_owned()))
}

/// One ring's parts, before attaching as either end.
struct RingParts {
    name: String,
    region: RingRegion<IoDesc>,
    data: Doorbell,
    space: Doorbell,
}

fn ring_parts(started: &mut Started, ring: &str) -> Result<RingParts, ServiceError> {
    let name = format!("ring:{ring}");
    let region =
        RingRegion::attach(take(started, &name)?.fd).map_err(|source| ServiceError::Ring {
            name: name.clone(),
            source,
        })?;
    let mut bell = |suffix: &str| {
        let n = format!("{name}:{suffix}");
        let fd = take(started, &n)?.fd;
        Doorbell::from_fd(fd).map_err(|source| ServiceError::Doorbell { name: n, source })
    };
    let data = bell("data")?;
    let space = bell("space")?;
    Ok(RingParts {
        name,
        region,
        data,
        space,
    })
}

/// Runs the datapath service: see the module docs. `enter` puts the seccomp policy on (the
/// binary: `duplex_sandbox::enter("datapath")`); it is called once everything is attached and
/// the io_uring exists, before `Ready`.
pub fn run(enter: impl FnOnce() -> Result<(), SandboxError>) -> Result<EngineStats, ServiceError> {
    let mut started = lifecycle::start(SERVICE, START_TIMEOUT)?;
    let health = started.health()?;
    let topology = Topology::from_memfd(take(&mut started, TOPOLOGY_RESOURCE)?.fd)?;
    let generation = started.generation;
    let mode = match started.mode {
        StartMode::Fresh => ring::StartMode::Fresh,
        StartMode::Restart => ring::StartMode::Restart,
    };
    let pool_name = format!("pool:{}", topology.io.pool);
    let pool = Pool::attach(
        take(&mut started, &pool_name)?.fd,
        Holder {
            role: ROLE_DATAPATH,
            incarnation: generation,
        },
    )
    .map_err(|source| ServiceError::Pool {
        name: pool_name.clone(),
        source,
    })?;
    // The fabric's channels, then the metadata service's raw channel (same pool).
    let mut rings = Vec::new();
    for c in topology.io.channels.iter().chain(&topology.meta) {
        let submit = ring_parts(&mut started, &c.submit)?;
        let complete = ring_parts(&mut started, &c.complete)?;
        rings.push((submit, complete));
    }
    if mode == ring::StartMode::Restart {
        // The datapath is not restarted by duplexd (its death stops the node); should it be,
        // the restart protocol holds: free what a predecessor held or half-moved.
        let consumes: Vec<_> = rings
            .iter()
            .map(|(s, _)| (s.region.ring_id(), s.region.head()))
            .collect();
        let produces: Vec<_> = rings
            .iter()
            .map(|(_, c)| (c.region.ring_id(), c.region.tail()))
            .collect();
        pool.reclaim(&ReclaimPlan {
            consumes: &consumes,
            produces: &produces,
        });
    }
    let ring_err = |name: &str| {
        let name = name.to_owned();
        move |source| ServiceError::Ring { name, source }
    };
    // Produced rings first (docs/IPC.md: a peer that sees our generation on one ring sees the
    // restart marks on the others).
    let (submits, completes): (Vec<_>, Vec<_>) = rings.into_iter().unzip();
    let mut producers = Vec::new();
    for c in completes {
        producers.push(
            Producer::attach(c.region, c.data, c.space, generation, mode)
                .map_err(ring_err(&c.name))?,
        );
    }
    let fabric_channels = topology.io.channels.len();
    let mut channels = Vec::new();
    for (i, (s, producer)) in submits.into_iter().zip(producers).enumerate() {
        let consumer = Consumer::attach(s.region, s.data, s.space, generation, mode)
            .map_err(ring_err(&s.name))?;
        channels.push(if i < fabric_channels {
            Channel::new(consumer, producer)
        } else {
            Channel::raw(consumer, producer)
        });
    }
    let metrics = match started.take(METRICS_RESOURCE) {
        Some(h) => match Metrics::attach(h.fd) {
            Ok(m) => {
                m.start_writing();
                Some(m)
            }
            Err(e) => {
                // Metrics are not worth refusing to serve for.
                tracing::warn!(error = %e, "the metrics region is unusable: no drive metrics");
                None
            }
        },
        None => None,
    };
    // Each volume is served 1:1 from its own backing file or drive: one device and a map
    // covering it.
    let mut devices: Vec<BdevBox> = Vec::new();
    let mut maps = Vec::new();
    for spec in &topology.volumes {
        let dev = open_device(&mut started, spec, &pool, metrics.as_ref())?;
        let mut map = VolumeMap::whole(spec.id, &spec.name, devices.len(), &dev);
        // A drive's namespace may be larger than the volume: the volume is its first blocks.
        map.blocks = spec.blocks;
        if let Some(e) = map.extents.first_mut() {
            e.blocks = spec.blocks;
        }
        maps.push(map);
        devices.push(dev);
    }
    // The pool drives: raw devices, reached through the raw channel and the pools built on
    // them; device index = raw drive id.
    for (i, spec) in topology.drives.iter().enumerate() {
        debug_assert_eq!(topology.drive_id(i) as usize, devices.len());
        devices.push(open_device(&mut started, spec, &pool, metrics.as_ref())?);
    }
    let maps_channel = match started.take(wire::MAPS_RESOURCE) {
        Some(r) => Some(MapsChannel::from_fd(r.fd).map_err(ServiceError::Maps)?),
        None => None,
    };
    let cluster_region = match started.take(duplex_ipc::cluster::CLUSTER_RESOURCE) {
        Some(r) => Some(
            duplex_ipc::cluster::ClusterRegion::attach(r.fd)
                .map_err(ServiceError::ClusterRegion)?,
        ),
        None => None,
    };
    let raid_region = match started.take(duplex_ipc::raid::RAID_RESOURCE) {
        Some(r) => {
            Some(duplex_ipc::raid::RaidRegion::attach(r.fd).map_err(ServiceError::RaidRegion)?)
        }
        None => None,
    };
    for r in &started.resources {
        tracing::debug!(
            resource = r.name,
            "handed-over resource not used by the datapath"
        );
    }
    let config = EngineConfig {
        max_sleep: (health.interval() / 4).max(Duration::from_millis(1)),
        grace: STOP_GRACE,
        ..EngineConfig::default()
    };
    // Which devices keep integrity records in their LBA format's metadata (by device index),
    // for the listing: the metadata service gives a pool over drives that do not a checksum
    // area.
    let records: Arc<[bool]> = devices.iter().map(|d| d.carries_records()).collect();
    let mut engine = Engine::with_devices(devices, maps, Arc::new(pool), channels, config)?;
    // A cluster member: the disk heartbeat and the peer's fencing, on the node's key.
    let key = topology
        .volumes
        .iter()
        .chain(&topology.drives)
        .filter_map(|v| v.drive.as_ref().map(|d| d.fence_key))
        .find(|k| *k != 0);
    match (cluster_region, &topology.cluster, key) {
        (Some(region), Some(spec), Some(key)) => {
            let names = topology.drives.iter().map(|d| d.name.clone()).collect();
            engine.set_disk_beat(
                crate::diskbeat::DiskBeat::new(region, spec, key).with_drive_names(names),
            );
        }
        (Some(_), _, _) => {
            tracing::warn!("a cluster state region but no cluster drives: no disk heartbeat");
        }
        _ => {}
    }
    if let Some(region) = raid_region {
        // Rebuilds and scrubs go as far as the raid service grants.
        engine.set_raid_region(region);
    }
    let stopper = engine.stopper();
    let engine_control = engine.control();
    enter().map_err(ServiceError::Sandbox)?;
    started.ready()?;
    tracing::info!(
        generation,
        node = topology.node,
        volumes = topology.volumes.len(),
        drives = topology.drives.len(),
        channels = topology.io.channels.len(),
        meta = topology.meta.is_some(),
        maps = maps_channel.is_some(),
        "datapath ready"
    );
    lifecycle::spawn_control_thread(Arc::new(started), move |started, event| {
        control(started, &stopper, event)
    })
    .map_err(ServiceError::Thread)?;
    if let Some(channel) = maps_channel {
        spawn_maps_threads(Arc::new(channel), engine_control, records)
            .map_err(ServiceError::Thread)?;
    }
    // The heartbeat goes on while a drive's controller is waited for synchronously (a reset
    // after a power cut takes up to CAP.TO): slow is not hung.
    let health = std::rc::Rc::new(health);
    let during_waits = std::rc::Rc::clone(&health);
    crate::nvme::set_wait_hook(Some(std::rc::Rc::new(move || during_waits.beat())));
    let result = engine.run(|| health.beat());
    crate::nvme::set_wait_hook(None);
    Ok(result?)
}

/// Builds the device of a volume or pool drive: its handed-over file (`spec.resource`) or its
/// NVMe drive (vfio-user: the connected stream `spec.resource`; VFIO: `RESOURCE:container`,
/// `RESOURCE:group`, `RESOURCE:device`).
fn open_device(
    started: &mut Started,
    spec: &VolumeSpec,
    pool: &Pool,
    metrics: Option<&Metrics>,
) -> Result<BdevBox, ServiceError> {
    Ok(match &spec.drive {
        None => {
            let fd = take(started, &spec.resource)?.fd;
            let v = Volume::new(spec, fd)?;
            if v.direct() && pool.chunk_size() % v.block_size() as usize != 0 {
                return Err(EngineError::Config(format!(
                    "volume {} uses O_DIRECT with {}-byte blocks, but pool chunks are {} \
                     bytes (must be a multiple of the block size)",
                    v.name(),
                    v.block_size(),
                    pool.chunk_size()
                ))
                .into());
            }
            Box::new(FileBdev::new(v))
        }
        Some(d) => {
            let fds = match d.transport {
                DriveTransport::VfioUser => DriveFds::User(take(started, &spec.resource)?.fd),
                DriveTransport::Vfio => DriveFds::Kernel {
                    container: take(started, &format!("{}:container", spec.resource))?.fd,
                    group: take(started, &format!("{}:group", spec.resource))?.fd,
                    device: take(started, &format!("{}:device", spec.resource))?.fd,
                },
            };
            let mut drive = Drive::open(spec, fds, pool)?;
            if let Some(m) = metrics {
                drive.set_metrics(m);
            }
            Box::new(NvmeBdev::new(drive))
        }
    })
}

/// The control thread: obeys the supervisor until `Shutdown` or until it goes away. Returns
/// whether to keep listening.
fn control(started: &Started, stop: &Stopper, event: Control) -> bool {
    match event {
        Control::Message(envelope) => {
            if started.handle(&envelope) == Next::Shutdown {
                stop.stop();
                return false;
            }
            true
        }
        Control::Closed => {
            tracing::warn!("the supervisor closed the lifecycle channel: stopping");
            stop.stop();
            false
        }
        Control::Failed(e) => {
            tracing::error!(error = %e, "lifecycle channel failed: stopping");
            stop.stop();
            false
        }
    }
}

const _: () = assert!(wire::MISSING_DRIVE == crate::control::MISSING_DRIVE);

/// Refusals and channel trouble logged per window, per thread (the metadata service is
/// privileged, but a broken one must not flood the log).
const MAPS_LOG_BURST: u32 = 10;
/// The window of [`MAPS_LOG_BURST`].
const MAPS_LOG_WINDOW: Duration = Duration::from_secs(10);

/// Starts the maps channel's two threads (see the module docs).
fn spawn_maps_threads(
    channel: Arc<MapsChannel>,
    control: EngineControl,
    records: Arc<[bool]>,
) -> std::io::Result<()> {
    let events = (Arc::clone(&channel), control.clone());
    let server = MapsServer {
        channel,
        control,
        records,
        staged: None,
        log: RateLimiter::new(MAPS_LOG_BURST, MAPS_LOG_WINDOW),
    };
    std::thread::Builder::new()
        .name("maps".into())
        .spawn(move || server.serve())?;
    std::thread::Builder::new()
        .name("maps-events".into())
        .spawn(move || serve_events(&events.0, &events.1))?;
    Ok(())
}

/// A volume table arriving in parts.
#[derive(Debug)]
struct Staged {
    epoch: u64,
    next_part: u32,
    volumes: Vec<wire::VolumeMap>,
}

/// The `maps` thread's state.
#[derive(Debug)]
struct MapsServer {
    channel: Arc<MapsChannel>,
    control: EngineControl,
    /// Whether each device opened at start (volumes, then pool drives) keeps integrity
    /// records in its LBA format's metadata, by device index.
    records: Arc<[bool]>,
    staged: Option<Staged>,
    log: RateLimiter,
}

impl MapsServer {
    /// Receives requests and answers them until the supervisor closes the channel.
    fn serve(mut self) {
        loop {
            let (id, reply) = match self.channel.recv_request(None) {
                Ok(Some((id, request))) => {
                    let kind = request.kind_name();
                    let reply = self.handle(request);
                    if let MapsReply::Error(why) = &reply {
                        self.warn(|suppressed| {
                            tracing::warn!(
                                request = kind,
                                suppressed,
                                "maps request refused: {why}"
                            );
                        });
                    }
                    (id, reply)
                }
                // No timeout: only a request ends the wait.
                Ok(None) => continue,
                // The channel logged it (rate-limited); answer what can be answered.
                Err(MapsError::Malformed { request_id, source }) => (
                    request_id,
                    MapsReply::Error(bounded_error(format!("malformed request: {source}"))),
                ),
                Err(e) if e.is_malformed() => continue,
                Err(MapsError::Channel(ControlError::PeerClosed)) => {
                    tracing::info!("the supervisor closed the maps channel: no more map changes");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "maps channel failed: no more map changes");
                    return;
                }
            };
            if !self.reply(id, &reply) {
                return;
            }
        }
    }

    /// Sends a reply; one that cannot be sent (out of bounds) becomes an error reply. Returns
    /// whether the channel is still usable.
    fn reply(&mut self, id: u64, reply: &MapsReply) -> bool {
        let e = match self.channel.send_reply(id, reply) {
            Ok(()) => return true,
            Err(ControlError::PeerClosed) => {
                tracing::info!("the supervisor closed the maps channel: no more map changes");
                return false;
            }
            Err(e) => e,
        };
        let error = MapsReply::Error(bounded_error(format!(
            "the reply ({}) cannot be sent: {e}",
            reply.kind_name()
        )));
        match self.channel.send_reply(id, &error) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "maps channel failed: no more map changes");
                false
            }
        }
    }

    fn warn(&mut self, log: impl FnOnce(u64)) {
        if let Some(suppressed) = self.log.check(Instant::now()) {
            log(suppressed);
        }
    }

    /// Carries out one request through the engine's control inlet.
    fn handle(&mut self, request: MapsRequest) -> MapsReply {
        let result = match request {
            MapsRequest::ListDevices => self.list_devices(),
            MapsRequest::PublishPool(spec) => self.publish_pool(spec),
            MapsRequest::PublishVolumes(part) => self.publish_volumes(part),
            MapsRequest::FailuresRecorded { device, members } => self
                .control
                .failures_recorded(
                    device as usize,
                    members.into_iter().map(|m| m as usize).collect(),
                )
                .map(|()| MapsReply::Done),
            MapsRequest::StartScrub(device) => self
                .control
                .scrub(device as usize)
                .map(|()| MapsReply::Done),
            MapsRequest::RetirePool(device) => self
                .control
                .retire_pool(device as usize)
                .map(|()| MapsReply::Done),
            MapsRequest::ReplaceMember {
                device,
                slot,
                drive,
                done,
            } => self
                .control
                .replace_member(device as usize, slot as usize, drive, done)
                .map(|()| MapsReply::Done),
        };
        result.unwrap_or_else(|why| MapsReply::Error(bounded_error(why)))
    }

    fn list_devices(&self) -> Result<MapsReply, String> {
        let devices = self.control.devices()?;
        if devices.len() > wire::MAX_DEVICES {
            return Err(format!(
                "{} devices, more than one listing holds ({})",
                devices.len(),
                wire::MAX_DEVICES
            ));
        }
        Ok(MapsReply::Devices(
            devices
                .iter()
                .map(|d| device_info(d, &self.records))
                .collect(),
        ))
    }

    /// Builds a pool (or, replayed by a restarted metadata service, finds the same pool over
    /// the same drives: the engine answers its index again).
    fn publish_pool(&self, spec: wire::PoolSpec) -> Result<MapsReply, String> {
        let epoch = spec.epoch;
        let spec = PoolSpec {
            name: spec.name,
            level: match spec.level {
                wire::RaidLevel::Raid0 => RaidLevel::Raid0,
                wire::RaidLevel::Raid1 => RaidLevel::Raid1,
                wire::RaidLevel::Raid10 => RaidLevel::Raid10,
                wire::RaidLevel::Raid5 => RaidLevel::Raid5,
                wire::RaidLevel::Raid6 => RaidLevel::Raid6,
            },
            chunk: spec.chunk,
            data_offset: spec.data_offset,
            data_len: spec.data_len,
            drives: spec.drives,
            states: spec
                .states
                .into_iter()
                .enumerate()
                .map(|(i, s)| match member_state(s) {
                    MemberState::Rebuilding { .. } => MemberState::Rebuilding {
                        done: spec.rebuild_from.get(i).copied().unwrap_or(0),
                    },
                    s => s,
                })
                .collect(),
            hold_until_recorded: spec.hold_until_recorded,
            journal: spec
                .journal
                .map(|(offset, len, tag)| JournalSpec { offset, len, tag }),
            seq_base: spec.seq_base,
            resync: spec.resync,
            seq_limit: spec.seq_limit,
            resync_members: spec.resync_members,
            checksum: spec
                .checksum
                .map(|(offset, len)| ChecksumSpec { offset, len }),
            bitmap: spec
                .bitmap
                .map(|(offset, len, tag)| crate::bdev::IntentSpec { offset, len, tag }),
        };
        let index = self.control.publish_pool(epoch, spec)?;
        u32::try_from(index)
            .map(MapsReply::Device)
            .map_err(|_| format!("device index {index} does not fit the wire"))
    }

    /// Stages a part of a volume table; the last part publishes the whole table.
    fn publish_volumes(&mut self, part: wire::PublishVolumes) -> Result<MapsReply, String> {
        let mut staged = match (self.staged.take(), part.part) {
            (_, 0) => Staged {
                epoch: part.epoch,
                next_part: 0,
                volumes: Vec::new(),
            },
            (Some(s), n) if s.next_part == n && s.epoch == part.epoch => s,
            (_, n) => {
                return Err(format!(
                    "volume table part {n} of epoch {} does not follow the staged parts \
                     (dropped them)",
                    part.epoch
                ))
            }
        };
        if staged.volumes.len() + part.volumes.len() > wire::MAX_VOLUMES {
            return Err(format!(
                "volume table of more than {} volumes (dropped it)",
                wire::MAX_VOLUMES
            ));
        }
        staged.volumes.extend(part.volumes);
        staged.next_part = staged.next_part.saturating_add(1);
        if part.more {
            self.staged = Some(staged);
            return Ok(MapsReply::Done);
        }
        let maps = staged.volumes.into_iter().map(volume_map).collect();
        self.control.publish_volumes(staged.epoch, maps)?;
        Ok(MapsReply::Done)
    }
}

/// The `maps-events` thread: pushes member failures to the peer until the engine stops or the
/// supervisor closes the channel.
fn serve_events(channel: &MapsChannel, control: &EngineControl) {
    let mut log = RateLimiter::new(MAPS_LOG_BURST, MAPS_LOG_WINDOW);
    while let Some(event) = control.next_event() {
        let (device, member, name, status) = match event {
            Event::MemberFailed {
                device,
                member,
                name,
                status,
            } => (device, member, name, status),
        };
        let index = control
            .devices()
            .ok()
            .and_then(|all| pool_of(&all, &device, member, &name));
        let (Some(index), Ok(member)) = (
            index.and_then(|i| u32::try_from(i).ok()),
            u32::try_from(member),
        ) else {
            tracing::error!(
                device,
                member,
                "member failure of a device not found: not reported"
            );
            continue;
        };
        let event = wire::MemberFailed {
            device: index,
            member,
            name: wire_name(&name, || format!("member{member}")),
            status,
        };
        match channel.send_event(&event) {
            Ok(()) => {}
            Err(ControlError::PeerClosed) => {
                tracing::info!("the supervisor closed the maps channel: no more events");
                return;
            }
            Err(e) => {
                if let Some(suppressed) = log.check(Instant::now()) {
                    tracing::error!(error = %e, suppressed, ?event, "cannot send a member failure");
                }
            }
        }
    }
}

/// The device index of the pool whose member `member` (device `name`) failed: the pool that
/// raw drive fills that slot of (drive names are unique), else the only pool named `pool`.
fn pool_of(devices: &[DeviceStatus], pool: &str, member: usize, name: &str) -> Option<usize> {
    let by_drive = devices.iter().find_map(|d| match d.member_of {
        Some((root, slot)) if slot == member && d.name == name => Some(root),
        _ => None,
    });
    by_drive.or_else(|| {
        let mut named = devices
            .iter()
            .filter(|d| d.name == pool && !d.members.is_empty());
        match (named.next(), named.next()) {
            (Some(d), None) => Some(d.index),
            _ => None,
        }
    })
}

/// A name as the wire bounds it: cut to [`wire::MAX_NAME_BYTES`], never empty.
fn wire_name(name: &str, fallback: impl FnOnce() -> String) -> String {
    if name.is_empty() {
        return fallback();
    }
    wire::truncate_name(name, wire::MAX_NAME_BYTES)
}

/// An error text as the wire bounds it.
fn bounded_error(text: String) -> String {
    if text.len() <= wire::MAX_ERROR_BYTES {
        return text;
    }
    wire::truncate_name(&text, wire::MAX_ERROR_BYTES)
}

fn member_state(s: wire::MemberState) -> MemberState {
    match s {
        wire::MemberState::Active => MemberState::Active,
        wire::MemberState::Failed => MemberState::Failed,
        // The position comes with the spec (`rebuild_from`), set by the caller.
        wire::MemberState::Rebuilding => MemberState::Rebuilding { done: 0 },
    }
}

fn wire_member_state(s: MemberState) -> wire::MemberState {
    match s {
        MemberState::Active => wire::MemberState::Active,
        MemberState::Failed => wire::MemberState::Failed,
        MemberState::Rebuilding { .. } => wire::MemberState::Rebuilding,
    }
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `records`: whether each device opened at start keeps integrity records (by index; a RAID
/// device, which has members, never says so).
fn device_info(d: &DeviceStatus, records: &[bool]) -> wire::DeviceInfo {
    wire::DeviceInfo {
        index: saturating_u32(d.index),
        name: wire_name(&d.name, || format!("device{}", d.index)),
        size_bytes: d.size,
        block_size: d.block_size,
        members: d.members.iter().copied().map(wire_member_state).collect(),
        inflight: saturating_u32(d.inflight),
        held: saturating_u32(d.held),
        member_of: d.member_of.map(|(device, slot)| wire::PoolSlot {
            device: saturating_u32(device),
            slot: saturating_u32(slot),
        }),
        // The member being rebuilt (the first one: they are rebuilt one after the other).
        rebuild: d.members.iter().enumerate().find_map(|(i, m)| match m {
            MemberState::Rebuilding { done } => Some((saturating_u32(i), *done)),
            _ => None,
        }),
        scrub: d.scrub.map(|s| wire::ScrubInfo {
            done: s.done,
            total: s.total,
            mismatches: s.mismatches,
            repaired: s.repaired,
            skipped: s.skipped,
        }),
        integrity: wire::IntegrityInfo {
            errors: d.integrity_errors,
            recovered: d.integrity.recovered,
            healed: d.integrity.healed,
            unrecoverable: d.integrity.unrecoverable,
        },
        seq_headroom: d
            .seq_headroom
            .map_or(u32::MAX, |h| u32::try_from(h).unwrap_or(u32::MAX)),
        records: d.members.is_empty() && records.get(d.index).copied().unwrap_or(false),
    }
}

fn volume_map(v: wire::VolumeMap) -> VolumeMap {
    VolumeMap {
        id: v.id,
        name: v.name,
        block_size: v.block_size,
        blocks: v.blocks,
        extents: v
            .extents
            .into_iter()
            .map(|e| Extent {
                start: e.start,
                blocks: e.blocks,
                device: e.device as usize,
                device_offset: e.device_offset,
            })
            .collect(),
    }
}
