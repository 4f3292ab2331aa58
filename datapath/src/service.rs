//! The datapath as a duplex service: lifecycle handshake, handed-over resources, sandbox,
//! control thread, engine.
//!
//! Order (everything that needs a system call the policy does not allow comes before the
//! filter): `Hello` → `Start`; attach the health region, read the topology, attach the pool
//! (reclaiming a predecessor's buffers on a restart), the completion rings (produced) then the
//! submission rings (consumed), take the volume fds; build the [`Engine`] (which creates and
//! restricts the io_uring); enter the `datapath` seccomp policy; say `Ready`; serve.
//!
//! Control messages (`Shutdown`, `Inject`) are received by a second thread, which blocks on the
//! lifecycle channel and stops the engine on `Shutdown` (or when the supervisor goes away). The
//! heartbeat is beaten by the engine's serving loop, so a stuck loop stops it; an injected hang
//! (carried out on the control thread) stops it too, through the process-wide flag of
//! `duplex_ipc::lifecycle`.

use std::sync::Arc;
use std::time::Duration;

use duplex_ipc::control::{ControlError, StartMode};
use duplex_ipc::desc::IoDesc;
use duplex_ipc::doorbell::{Doorbell, DoorbellError};
use duplex_ipc::lifecycle::{self, Control, Handed, LifecycleError, Next, Started};
use duplex_ipc::pool::{Holder, Pool, PoolError, ReclaimPlan};
use duplex_ipc::ring::{self, Consumer, Producer, RingError, RingRegion};
use duplex_ipc::topology::{
    DriveTransport, Topology, TopologyError, ROLE_DATAPATH, TOPOLOGY_RESOURCE,
};
use duplex_sandbox::SandboxError;

use crate::bdev::{BdevBox, FileBdev, NvmeBdev};
use crate::channel::Channel;
use crate::drives::{Drive, DriveError, DriveFds};
use crate::engine::{Engine, EngineConfig, EngineError, EngineStats, Stopper};
use crate::map::VolumeMap;
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
    let mut rings = Vec::new();
    for c in &topology.io.channels {
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
    let mut channels = Vec::new();
    for (s, producer) in submits.into_iter().zip(producers) {
        let consumer = Consumer::attach(s.region, s.data, s.space, generation, mode)
            .map_err(ring_err(&s.name))?;
        channels.push(Channel::new(consumer, producer));
    }
    // Each volume is served 1:1 from its own backing file or drive: one device and a map
    // covering it.
    let mut devices: Vec<BdevBox> = Vec::new();
    let mut maps = Vec::new();
    for spec in &topology.volumes {
        let dev: BdevBox = match &spec.drive {
            None => {
                let fd = take(&mut started, &spec.resource)?.fd;
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
                    DriveTransport::VfioUser => {
                        DriveFds::User(take(&mut started, &spec.resource)?.fd)
                    }
                    DriveTransport::Vfio => DriveFds::Kernel {
                        container: take(&mut started, &format!("{}:container", spec.resource))?.fd,
                        group: take(&mut started, &format!("{}:group", spec.resource))?.fd,
                        device: take(&mut started, &format!("{}:device", spec.resource))?.fd,
                    },
                };
                Box::new(NvmeBdev::new(Drive::open(spec, fds, &pool)?))
            }
        };
        let mut map = VolumeMap::whole(spec.id, &spec.name, devices.len(), &dev);
        // A drive's namespace may be larger than the volume: the volume is its first blocks.
        map.blocks = spec.blocks;
        if let Some(e) = map.extents.first_mut() {
            e.blocks = spec.blocks;
        }
        maps.push(map);
        devices.push(dev);
    }
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
    let engine = Engine::with_devices(devices, maps, Arc::new(pool), channels, config)?;
    let stopper = engine.stopper();
    enter().map_err(ServiceError::Sandbox)?;
    started.ready()?;
    tracing::info!(
        generation,
        node = topology.node,
        volumes = topology.volumes.len(),
        channels = topology.io.channels.len(),
        "datapath ready"
    );
    lifecycle::spawn_control_thread(Arc::new(started), move |started, event| {
        control(started, &stopper, event)
    })
    .map_err(ServiceError::Thread)?;
    Ok(engine.run(|| health.beat())?)
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
