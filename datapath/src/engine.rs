//! The engine: consumes submissions, drives them through the io_uring, publishes completions.
//!
//! One thread ([`Engine::run`]'s caller) owns the io_uring, every request and every ring
//! endpoint. Its loop:
//!
//! 1. reap io_uring completions and advance each request's state machine ([`Phase`]): a short
//!    transfer continues where it stopped, a `fallocate` the backing store does not support turns
//!    into writing zeroes, a FUA write-zeroes ends with an `fdatasync`; a completed doorbell poll
//!    drains its eventfd;
//! 2. publish finished requests' completions on their channel's completion ring (lending their
//!    buffer chain at the exact index each is published at);
//! 3. consume new submissions, up to the free request slots, from every channel whose completion
//!    ring is not full (backpressure: a full completion ring stops consumption on that channel;
//!    its completions wait, none is dropped);
//! 4. submit the queued operations;
//! 5. nothing done: poll for [`EngineConfig::spin`] (yielding the core each turn, so a fabric
//!    sharing it runs), then announce the waits
//!    (`Consumer::arm_wait` on the submission rings it can consume from, `Producer::arm_wait`
//!    on full completion rings), make sure a poll is queued on each of those rings' doorbells
//!    and on its wake eventfd (all fixed files of the io_uring), and sleep in `io_uring_enter`
//!    until an I/O completes, a doorbell or the wake eventfd ([`Stopper::stop`]) rings, or
//!    [`EngineConfig::max_sleep`] passes (so the heartbeat goes on while idle).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_ipc::control::RateLimiter;
use duplex_ipc::desc::{
    IoDesc, STATUS_FENCED, STATUS_INTERNAL, STATUS_INVALID_FIELD, STATUS_SUCCESS,
};
use duplex_ipc::doorbell::{Doorbell, DoorbellError};
use duplex_ipc::pool::{BufHandle, ChunkState, Pool, PoolError, NIL};
use duplex_ipc::ring::{Consumer, Producer, RingError};

use crate::bdev::{
    Attach, BdevBox, BdevStats, ChainRef, Ctx, Done, Event, FileBdev, Io, MemberState, MissingBdev,
    ParityBdev, RaidBdev,
};
use crate::channel::Channel;
use crate::control::MISSING_DRIVE;
use crate::control::{self, Command as Control, DeviceStatus, EngineControl, Inlet, PoolSpec};
use crate::map::{Extent, VolumeMap};
use crate::request::{self, Command, Kind};
use crate::uring::{Uring, UringError, POLL_BIT};
use crate::volume::Volume;

/// Most descriptors popped from one ring, or published on one, per loop iteration.
const BATCH: usize = 32;
/// Low 48 bits: the incarnation as a pool ownership word records it.
const INCARNATION_MASK: u64 = (1 << 48) - 1;
/// Fixed-file index of the wake eventfd. Channel `c`'s submission data doorbell is `1 + 2c`,
/// its completion space doorbell `2 + 2c`; volume `v` follows them: `1 + 2 * channels + v`.
const WAKE_FILE: u32 = 0;
/// io_uring operation slots per request slot: a request fans out to several file operations
/// through RAID (copies, pieces per chunk); operations beyond this wait for a free slot.
const URING_FANOUT: usize = 4;

/// Tunables of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Requests in flight at most (request slots); also sizes the io_uring.
    pub queue_depth: usize,
    /// How long the engine polls its rings and the io_uring before it sleeps.
    pub spin: Duration,
    /// The longest sleep: the beat callback of [`Engine::run`] is called at least this often.
    pub max_sleep: Duration,
    /// After [`Stopper::stop`]: how long the engine waits for room to publish the completions
    /// of requests it had already consumed.
    pub grace: Duration,
    /// Write zeroes and deallocate by writing a zero buffer instead of trying `fallocate` first
    /// (the fallback path, forced: for tests and for backends whose `fallocate` misbehaves).
    pub emulate_zeroes: bool,
    /// How long a pool device being taken apart ([`crate::control::Command::RetirePool`]) may
    /// take to have nothing out before the request is refused and the device stays in service
    /// (well inside the metadata service's 10 s for a maps request).
    pub retire_patience: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_depth: 128,
            spin: Duration::from_micros(50),
            max_sleep: Duration::from_millis(250),
            grace: Duration::from_secs(5),
            emulate_zeroes: false,
            retire_patience: Duration::from_secs(5),
        }
    }
}

/// Counters of one [`Engine::run`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Descriptors consumed.
    pub submissions: u64,
    /// Completions published.
    pub completions: u64,
    /// Completions with a status other than success.
    pub errors: u64,
    /// Transfers that came back short and were continued.
    pub short_transfers: u64,
    /// Write-zeroes or deallocate requests done by writing zeroes (forced, or `fallocate`
    /// unsupported by the backing store).
    pub zero_writes: u64,
    /// Times the engine went to sleep.
    pub sleeps: u64,
    /// Completions still unpublished when the engine ended (the fabric did not make room
    /// within the grace period).
    pub unpublished: u64,
    /// Mirror reads retried on another copy after a failure.
    pub read_retries: u64,
    /// RAID members failed (each once).
    pub member_failures: u64,
}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration cannot work.
    #[error("Datapath engine configuration: {0}")]
    Config(String),
    /// The io_uring failed.
    #[error(transparent)]
    Uring(#[from] UringError),
    /// The wake eventfd could not be created.
    #[error(transparent)]
    Doorbell(#[from] DoorbellError),
    /// A cluster member lost every drive: it can serve nothing, and must stop so that its
    /// peer takes its pools over.
    #[error(
        "every drive of this cluster member is lost ({0}): stopping so that the peer takes over"
    )]
    DrivesLost(String),
}

/// Ends a running engine from another thread (or a signal-free control loop).
#[derive(Clone, Debug)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    wake: Arc<Doorbell>,
}

impl Stopper {
    /// Asks the engine to stop: it consumes no more submissions, finishes the requests it has,
    /// publishes their completions (waiting up to [`EngineConfig::grace`] for room) and returns.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::Release);
        self.wake.ring();
    }

    /// Whether [`Stopper::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// One consumed submission.
#[derive(Debug)]
struct Request {
    channel: usize,
    desc: IoDesc,
    has_buf: bool,
    cmd: Command,
    /// Device I/Os in flight.
    outstanding: u32,
    /// The first error of those that ended.
    status: u16,
}

/// One channel as the engine sees it: endpoints, the completions waiting for room, which waits
/// are announced, and whether the channel is dead.
#[derive(Debug)]
struct ChannelState {
    submit: Consumer<IoDesc>,
    complete: Producer<IoDesc>,
    submit_id: u8,
    complete_id: u8,
    pending: VecDeque<IoDesc>,
    armed_data: bool,
    armed_space: bool,
    failed: bool,
    raw: bool,
}

/// Where a raw drive is: root device `r`, or member `m` of root `r`.
type DriveLoc = (usize, Option<usize>);

/// The datapath engine. See the module docs.
#[derive(Debug)]
pub struct Engine {
    /// The roots of the block-device trees (`None`: taken into a RAID device).
    devices: Vec<Option<BdevBox>>,
    /// The volumes, as extent maps over the devices.
    maps: Vec<VolumeMap>,
    /// Raw drives for privileged channels: a map per drive id whose extent names the drive id.
    raw_maps: Vec<VolumeMap>,
    /// Where each raw drive is: a root, or member `m` of a root.
    drive_loc: Vec<DriveLoc>,
    /// RAID devices whose members keep their records in a checksum area: device index →
    /// (data offset, data length, the area), to wrap a replacement member the same way.
    checksummed: std::collections::HashMap<usize, (u64, u64, control::ChecksumSpec)>,
    /// RAID devices being taken apart ([`Command::RetirePool`]), each with the replies waiting
    /// for it: their jobs start nothing more, and once nothing of theirs is out their members
    /// go back to being free drives.
    retiring: Vec<(usize, Instant, control::Reply<()>)>,
    /// Epoch of the maps now served.
    epoch: u64,
    inlet: Inlet,
    control: EngineControl,
    pool: Arc<Pool>,
    channels: Vec<ChannelState>,
    uring: Uring,
    config: EngineConfig,
    stop: Arc<AtomicBool>,
    wake: Arc<Doorbell>,
    slots: Vec<Option<Request>>,
    /// Each request's chain of pool chunks, by request slot (the bdev layer's chain ids).
    chains: Vec<Vec<u32>>,
    /// The devices' own buffers (parity RAID).
    scratch: crate::bdev::Scratch,
    free: Vec<usize>,
    /// A poll is queued on this fixed file.
    polling: Vec<bool>,
    /// Free io_uring operation slots, and each slot's owner `(leaf, operation)`.
    uring_free: Vec<u32>,
    uring_owner: Vec<(u32, u32)>,
    /// io_uring completions per leaf device.
    inbox: Vec<Vec<(u32, i32)>>,
    bstats: BdevStats,
    events: Vec<Event>,
    next_channel: usize,
    stats: EngineStats,
    invalid_log: RateLimiter,
    error_log: RateLimiter,
    cqes: Vec<(u64, i32)>,
    done: Vec<Done>,
    batch: Vec<IoDesc>,
    /// A cluster member's disk heartbeat and fencing (between turns).
    disk_beat: Option<crate::diskbeat::DiskBeat>,
    /// The node's RAID jobs region: rebuilds and scrubs reported, the raid service's grants
    /// applied (between turns, every [`RAID_SYNC`]); without it, jobs run unlimited.
    raid: Option<(duplex_ipc::raid::RaidRegion, Instant, bool)>,
}

/// How often the engine reports its RAID jobs and takes the raid service's grants.
const RAID_SYNC: Duration = Duration::from_millis(10);

impl Engine {
    /// Builds an engine serving `volumes` (each from its own backing file) to `channels` with
    /// buffers from `pool` (attached as the datapath's [`duplex_ipc::pool::Holder`]). Creates
    /// the restricted io_uring, so call it before entering the sandbox.
    pub fn new(
        volumes: Vec<Volume>,
        pool: Arc<Pool>,
        channels: Vec<Channel>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let mut devices: Vec<BdevBox> = Vec::new();
        let mut maps = Vec::new();
        for (i, v) in volumes.into_iter().enumerate() {
            if v.direct() && pool.chunk_size() % v.block_size() as usize != 0 {
                return Err(EngineError::Config(format!(
                    "volume {} uses O_DIRECT with {}-byte blocks, but pool chunks are {} bytes \
                     (must be a multiple of the block size)",
                    v.name(),
                    v.block_size(),
                    pool.chunk_size()
                )));
            }
            let (id, name) = (v.id(), v.name().to_owned());
            let dev: BdevBox = Box::new(FileBdev::new(v));
            maps.push(VolumeMap::whole(id, &name, i, &dev));
            devices.push(dev);
        }
        Self::with_devices(devices, maps, pool, channels, config)
    }

    /// Builds an engine serving `maps` (volumes as extent maps) over `devices` (files, drives,
    /// RAID devices: the roots of the block-device trees).
    pub fn with_devices(
        mut devices: Vec<BdevBox>,
        maps: Vec<VolumeMap>,
        pool: Arc<Pool>,
        channels: Vec<Channel>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let bad = |m: String| Err(EngineError::Config(m));
        if !(1..=4096).contains(&config.queue_depth) {
            return bad(format!("queue depth {} (1..=4096)", config.queue_depth));
        }
        if config.max_sleep.is_zero() {
            return bad("max_sleep must be positive".into());
        }
        for (i, m) in maps.iter().enumerate() {
            if maps[..i].iter().any(|o| o.id == m.id) {
                return bad(format!("volume id {} used twice", m.id));
            }
            if let Err(why) = m.validate(&devices) {
                return bad(why);
            }
        }
        let mut ids = Vec::new();
        for c in &channels {
            for id in [c.submit_ring(), c.complete_ring()] {
                if ids.contains(&id) {
                    return bad(format!("ring id {id} used twice"));
                }
                ids.push(id);
            }
        }
        let wake = Arc::new(Doorbell::new()?);
        let mut attach = Attach {
            leaves: 0,
            files: u32::try_from(1 + 2 * channels.len()).unwrap_or(u32::MAX),
        };
        for d in &mut devices {
            d.attach(&mut attach);
        }
        let mut files = vec![wake.fd()];
        for c in &channels {
            files.push(c.submit.data_doorbell().fd());
            files.push(c.complete.space_doorbell().fd());
        }
        for d in &devices {
            d.files(&mut files);
        }
        if files.len() != attach.files as usize {
            return bad("devices registered files they did not take".into());
        }
        let uring_slots = config.queue_depth * URING_FANOUT;
        let entries = (uring_slots + files.len() + 2).next_power_of_two();
        let entries = u32::try_from(entries.min(4096)).unwrap_or(4096);
        let uring = Uring::new(entries, uring_slots, &files, Arc::clone(&pool))?;
        let polling = vec![false; files.len()];
        drop(files);
        let channels = channels
            .into_iter()
            .map(|c| ChannelState {
                submit_id: c.submit_ring(),
                complete_id: c.complete_ring(),
                submit: c.submit,
                complete: c.complete,
                pending: VecDeque::new(),
                armed_data: false,
                armed_space: false,
                failed: false,
                raw: c.raw,
            })
            .collect::<Vec<_>>();
        let raw_maps = devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let bs = d.block_size();
                let blocks = d.size() / u64::from(bs);
                VolumeMap {
                    id: u32::try_from(i).unwrap_or(u32::MAX),
                    name: d.name().to_owned(),
                    block_size: bs,
                    blocks,
                    extents: vec![Extent {
                        start: 0,
                        blocks,
                        device: i,
                        device_offset: 0,
                    }],
                }
            })
            .collect();
        let drive_loc = (0..devices.len()).map(|i| (i, None)).collect();
        let (control, inlet) = control::pair(Arc::clone(&wake));
        tracing::info!(
            volumes = maps.len(),
            devices = devices.len(),
            queue_depth = config.queue_depth,
            chunk_size = pool.chunk_size(),
            "datapath engine ready (io_uring restricted)"
        );
        let uring_slots = u32::try_from(uring_slots).unwrap_or(u32::MAX);
        Ok(Self {
            devices: devices.into_iter().map(Some).collect(),
            maps,
            raw_maps,
            drive_loc,
            retiring: Vec::new(),
            checksummed: std::collections::HashMap::new(),
            epoch: 0,
            inlet,
            control,
            pool,
            channels,
            uring,
            stop: Arc::new(AtomicBool::new(false)),
            wake,
            slots: (0..config.queue_depth).map(|_| None).collect(),
            chains: (0..config.queue_depth).map(|_| Vec::new()).collect(),
            scratch: crate::bdev::Scratch::default(),
            free: (0..config.queue_depth).rev().collect(),
            polling,
            uring_free: (0..uring_slots).rev().collect(),
            uring_owner: vec![(u32::MAX, u32::MAX); uring_slots as usize],
            inbox: (0..attach.leaves).map(|_| Vec::new()).collect(),
            bstats: BdevStats::default(),
            events: Vec::new(),
            next_channel: 0,
            stats: EngineStats::default(),
            invalid_log: RateLimiter::new(10, Duration::from_secs(10)),
            error_log: RateLimiter::new(10, Duration::from_secs(10)),
            cqes: Vec::with_capacity(256),
            done: Vec::with_capacity(256),
            batch: Vec::with_capacity(BATCH),
            disk_beat: None,
            raid: None,
            config,
        })
    }

    /// The control plane's handle: publishes maps and pools while the engine runs, and
    /// receives its events.
    pub fn control(&self) -> EngineControl {
        self.control.clone()
    }

    /// Runs a cluster member's disk heartbeat and fence requests between turns.
    pub fn set_disk_beat(&mut self, beat: crate::diskbeat::DiskBeat) {
        self.disk_beat = Some(beat);
    }

    /// Lets the raid service schedule this engine's rebuilds and scrubs through `region`.
    pub fn set_raid_region(&mut self, region: duplex_ipc::raid::RaidRegion) {
        self.raid = Some((region, Instant::now(), false));
    }

    /// Reports the devices' jobs to the raid region and applies the grants (when due).
    fn raid_work(&mut self) {
        let Some((region, at, _)) = self.raid.as_mut() else {
            return;
        };
        let now = Instant::now();
        if now.duration_since(*at) < RAID_SYNC {
            return;
        }
        *at = now;
        let mut reports = Vec::new();
        let mut jobs = Vec::new();
        for (i, d) in self.devices.iter().enumerate() {
            let Some(d) = d else { continue };
            jobs.clear();
            d.jobs(&mut jobs);
            let Ok(device) = u32::try_from(i) else {
                continue;
            };
            for j in &jobs {
                reports.push(duplex_ipc::raid::JobReport {
                    key: duplex_ipc::raid::JobKey {
                        device,
                        kind: j.kind,
                        slot: j.slot,
                    },
                    done: j.done,
                    total: j.total,
                    host_ios: d.host_ios(),
                    started_at: j.started_at,
                });
            }
        }
        let dropped = region.publish_jobs(&reports);
        if dropped > 0 && self.error_log.check(now).is_some() {
            tracing::warn!(
                dropped,
                "RAID jobs do not fit the jobs region: they wait unscheduled"
            );
        }
        let views = region.jobs();
        if let Some(r) = self.raid.as_mut() {
            r.2 = !reports.is_empty();
        }
        for r in &reports {
            let limit = views
                .iter()
                .find(|v| v.report.key == r.key)
                .and_then(|v| v.limit)
                .unwrap_or(0);
            // A device being taken apart starts nothing more.
            let limit = if self
                .retiring
                .iter()
                .any(|(d, _, _)| *d == r.key.device as usize)
            {
                0
            } else {
                limit
            };
            if let Some(Some(d)) = self.devices.get_mut(r.key.device as usize) {
                d.set_job_limit(r.key.kind, limit);
            }
        }
    }

    /// The disk heartbeat's work, when due: on the engine's thread, between two turns.
    fn cluster_work(&mut self) -> Result<(), EngineError> {
        let now = Instant::now();
        let Some(beat) = self.disk_beat.as_mut() else {
            return Ok(());
        };
        if !beat.wants(now) {
            return Ok(());
        }
        let mut drives = Vec::new();
        for d in self.devices.iter_mut().flatten() {
            d.drives_mut(&mut drives);
        }
        match beat.run(now, drives) {
            Some(lost) => Err(EngineError::DrivesLost(lost)),
            None => Ok(()),
        }
    }

    /// A handle that stops [`Engine::run`].
    pub fn stopper(&self) -> Stopper {
        Stopper {
            flag: Arc::clone(&self.stop),
            wake: Arc::clone(&self.wake),
        }
    }

    /// Serves until [`Stopper::stop`] (see the module docs), calling `beat` at least every
    /// [`EngineConfig::max_sleep`] from the serving thread (the heartbeat: it stops when the
    /// loop does).
    pub fn run(mut self, mut beat: impl FnMut()) -> Result<EngineStats, EngineError> {
        let span = tracing::info_span!("datapath", channels = self.channels.len());
        let _entered = span.enter();
        let result = self.serve(&mut beat);
        self.disarm();
        self.stats.unpublished = self.channels.iter().map(|c| c.pending.len() as u64).sum();
        if self.stats.unpublished > 0 {
            tracing::warn!(
                unpublished = self.stats.unpublished,
                "completions left unpublished: the fabric made no room within the grace period"
            );
        }
        tracing::info!(stats = ?self.stats, "datapath engine stopped");
        result.map(|()| self.stats)
    }

    fn serve(&mut self, beat: &mut impl FnMut()) -> Result<(), EngineError> {
        let mut idle_since: Option<Instant> = None;
        let mut stop_at: Option<Instant> = None;
        loop {
            beat();
            self.cluster_work()?;
            self.raid_work();
            let mut progress = self.apply_commands();
            progress |= self.reap()?;
            progress |= self.poll_devices();
            progress |= self.finish_retiring();
            progress |= self.publish();
            let stopping = self.stop.load(Ordering::Acquire);
            if stopping {
                let since = *stop_at.get_or_insert_with(|| {
                    tracing::info!("stopping: no more submissions are consumed");
                    Instant::now()
                });
                if self.drained() || since.elapsed() >= self.config.grace {
                    return Ok(());
                }
            } else {
                progress |= self.consume()?;
            }
            self.uring.submit()?;
            if progress {
                idle_since = None;
                continue;
            }
            if !self.retiring.is_empty() || self.devices.iter().flatten().any(|d| d.busy()) {
                // Drive completions are polled: with commands in flight, keep polling (and
                // let whatever shares the core run between turns).
                std::thread::yield_now();
                continue;
            }
            let first_idle_turn = idle_since.is_none();
            let since = *idle_since.get_or_insert_with(Instant::now);
            // Every idle period polls at least once, however late this thread got the core.
            if first_idle_turn || since.elapsed() < self.config.spin {
                // Give the core away if anything else wants it: on a core shared with the
                // fabric (or the io_uring's workers) a plain spin would only delay the work we
                // are waiting for; on a core of our own this returns at once.
                std::thread::yield_now();
                continue;
            }
            // Announce the waits, then re-check: what arrived meanwhile is handled first.
            let ready = self.arm(stopping)?;
            if ready || self.uring.has_completions() {
                self.disarm();
                continue;
            }
            self.stats.sleeps += 1;
            let mut timeout = if stopping {
                self.config.max_sleep.min(Duration::from_millis(10))
            } else {
                self.config.max_sleep
            };
            if let Some(b) = &self.disk_beat {
                timeout = timeout.min(b.due_in(Instant::now()).max(Duration::from_millis(1)));
            }
            if self.raid.as_ref().is_some_and(|r| r.2) {
                // Jobs wait on the raid service's grants: look again soon.
                timeout = timeout.min(RAID_SYNC);
            }
            let slept = self.uring.wait(timeout);
            self.disarm();
            slept?;
        }
    }
    /// Polls every device; accounts the I/Os that ended. Returns whether anything moved.
    fn poll_devices(&mut self) -> bool {
        let mut done = std::mem::take(&mut self.done);
        done.clear();
        let mut progress = false;
        let mut ctx = Ctx {
            pool: &self.pool,
            uring: &mut self.uring,
            uring_free: &mut self.uring_free,
            uring_owner: &mut self.uring_owner,
            inbox: &mut self.inbox,
            chains: &self.chains,
            scratch: &mut self.scratch,
            now: Instant::now(),
            stats: &mut self.bstats,
            events: &mut self.events,
            emulate_zeroes: self.config.emulate_zeroes,
        };
        for d in self.devices.iter_mut().flatten() {
            progress |= d.poll(&mut ctx, &mut done);
        }
        for d in &done {
            self.device_done(d.token, d.status);
        }
        self.done = done;
        self.fold_stats();
        progress
    }

    /// Takes the devices' counters and events into the engine's.
    fn fold_stats(&mut self) {
        self.stats.short_transfers = self.bstats.short_transfers;
        self.stats.zero_writes = self.bstats.zero_writes;
        self.stats.read_retries = self.bstats.read_retries;
        for e in self.events.drain(..) {
            match &e {
                Event::MemberFailed { .. } => self.stats.member_failures += 1,
            }
            tracing::warn!(event = ?e, "device event");
            // The control plane may be gone (or restarting): the event is logged either way.
            let _ = self.inlet.events.send(e);
        }
    }

    /// Applies what the control plane sent (between two turns: atomic with respect to I/O).
    /// Returns whether anything was applied.
    fn apply_commands(&mut self) -> bool {
        let mut any = false;
        while let Some(c) = self.inlet.next() {
            any = true;
            match c {
                Control::PublishVolumes { epoch, maps, reply } => {
                    let r = self.publish_volumes(epoch, maps);
                    let _ = reply.send(r);
                }
                Control::PublishPool { epoch, spec, reply } => {
                    let r = self.publish_pool(epoch, spec);
                    let _ = reply.send(r);
                }
                Control::FailuresRecorded {
                    device,
                    members,
                    reply,
                } => {
                    let r = match self.devices.get_mut(device).and_then(Option::as_mut) {
                        Some(d) => {
                            d.failures_recorded(&members);
                            Ok(())
                        }
                        None => Err(format!("no device {device}")),
                    };
                    let _ = reply.send(r);
                }
                Control::ReplaceMember {
                    device,
                    slot,
                    drive,
                    done,
                    reply,
                } => {
                    let r = self.replace_member(device, slot, drive, done);
                    let _ = reply.send(r);
                }
                Control::Scrub { device, reply } => {
                    let r = match self.devices.get_mut(device).and_then(Option::as_mut) {
                        Some(d) => d.start_scrub(),
                        None => Err(format!("no device {device}")),
                    };
                    let _ = reply.send(r);
                }
                Control::RetirePool { device, reply } => {
                    if let Err(why) = self.start_retire(device) {
                        let _ = reply.send(Err(why));
                    } else {
                        self.retiring.push((device, Instant::now(), reply));
                    }
                }
                Control::Status { reply } => {
                    let _ = reply.send(Ok(self.device_status(false)));
                }
                Control::Devices { reply } => {
                    let _ = reply.send(Ok(self.device_status(true)));
                }
            }
        }
        any
    }

    /// The roots' status, by index; with `taken`, the drives taken into RAID devices too.
    fn device_status(&self, taken: bool) -> Vec<DeviceStatus> {
        let mut out = Vec::new();
        for (index, d) in self.devices.iter().enumerate() {
            match d {
                Some(d) => out.push(DeviceStatus {
                    index,
                    name: d.name().to_owned(),
                    size: d.size(),
                    block_size: d.block_size(),
                    members: d.member_states(),
                    inflight: d.inflight(),
                    held: d.held(),
                    member_of: None,
                    scrub: d.scrub_status(),
                    integrity_errors: d.integrity_errors(),
                    integrity: d.integrity_counts(),
                    seq_headroom: d.seq_headroom(),
                }),
                None if taken => {
                    let Some(&(root, Some(m))) = self.drive_loc.get(index) else {
                        continue;
                    };
                    let geometry = self
                        .devices
                        .get(root)
                        .and_then(Option::as_ref)
                        .and_then(|r| r.member_geometry(m));
                    let integrity_errors = self
                        .devices
                        .get(root)
                        .and_then(Option::as_ref)
                        .map_or(0, |r| r.member_integrity_errors(m));
                    let (Some((block_size, size)), Some(raw)) =
                        (geometry, self.raw_maps.get(index))
                    else {
                        continue;
                    };
                    out.push(DeviceStatus {
                        index,
                        name: raw.name.clone(),
                        size,
                        block_size,
                        members: Vec::new(),
                        inflight: 0,
                        held: 0,
                        member_of: Some((root, m)),
                        scrub: None,
                        integrity_errors,
                        integrity: Default::default(),
                        seq_headroom: None,
                    });
                }
                None => {}
            }
        }
        out
    }

    /// Checks an epoch against the one served: older is refused.
    fn check_epoch(&mut self, epoch: u64) -> Result<(), String> {
        if epoch < self.epoch {
            return Err(format!(
                "epoch {epoch} is older than the epoch {} served",
                self.epoch
            ));
        }
        self.epoch = epoch;
        Ok(())
    }

    fn publish_volumes(&mut self, epoch: u64, maps: Vec<VolumeMap>) -> Result<(), String> {
        if epoch < self.epoch {
            return Err(format!(
                "epoch {epoch} is older than the epoch {} served",
                self.epoch
            ));
        }
        for (i, m) in maps.iter().enumerate() {
            if maps[..i].iter().any(|o| o.id == m.id) {
                return Err(format!("volume id {} used twice", m.id));
            }
            m.validate_with(|d| {
                self.devices
                    .get(d)
                    .and_then(Option::as_ref)
                    .map(|d| (d.name().to_owned(), d.block_size(), d.size()))
            })?;
        }
        self.check_epoch(epoch)?;
        tracing::info!(epoch, volumes = maps.len(), "volume maps published");
        self.maps = maps;
        Ok(())
    }

    fn publish_pool(&mut self, epoch: u64, spec: PoolSpec) -> Result<usize, String> {
        if epoch < self.epoch {
            return Err(format!(
                "epoch {epoch} is older than the epoch {} served",
                self.epoch
            ));
        }
        // Published already (a restarted control plane replays its decisions): the same
        // device, if it is the same pool over the same drives.
        let placed: Vec<Option<DriveLoc>> = spec
            .drives
            .iter()
            .map(|&d| self.drive_loc.get(d as usize).copied())
            .collect();
        let present: Vec<(usize, &Option<DriveLoc>)> = placed
            .iter()
            .enumerate()
            .filter(|(i, _)| spec.drives[*i] != MISSING_DRIVE)
            .collect();
        if let Some((_, Some((root, Some(_))))) = present.first() {
            let same = present.iter().all(|(i, p)| **p == Some((*root, Some(*i))))
                && self
                    .devices
                    .get(*root)
                    .and_then(Option::as_ref)
                    .is_some_and(|d| d.name() == spec.name);
            if same {
                self.check_epoch(epoch)?;
                let root = *root;
                // Members the control plane has since recorded failed (one failed a
                // metadata commit, which this device never saw).
                let failed: Vec<usize> = (0..spec.drives.len())
                    .filter(|&i| spec.states.get(i) == Some(&MemberState::Failed))
                    .collect();
                if let Some(dev) = self.devices.get_mut(root).and_then(Option::as_mut) {
                    let newly = dev.fail_recorded(&failed);
                    if !newly.is_empty() {
                        tracing::warn!(pool = %spec.name, members = ?newly, "members failed as published");
                    }
                    // A higher committed write sequence mark (never lowered).
                    dev.set_seq_limit(spec.seq_limit);
                }
                return Ok(root);
            }
        }
        let mut roots = Vec::new();
        for (i, &d) in spec.drives.iter().enumerate() {
            if d == MISSING_DRIVE {
                if spec.states.get(i) != Some(&MemberState::Failed) {
                    return Err(format!("member {i} is missing but not failed"));
                }
                roots.push(usize::MAX);
                continue;
            }
            let loc = self.drive_loc.get(d as usize).copied();
            let Some((root, None)) = loc else {
                return Err(format!("drive {d} is not a free drive"));
            };
            let Some(dev) = self.devices.get(root).and_then(Option::as_ref) else {
                return Err(format!("drive {d} is not there"));
            };
            if dev.inflight() > 0
                || self
                    .maps
                    .iter()
                    .any(|m| m.extents.iter().any(|e| e.device == root))
            {
                return Err(format!("drive {d} ({}) is in use", dev.name()));
            }
            if roots.contains(&root) {
                return Err(format!("drive {d} named twice"));
            }
            roots.push(root);
        }
        // A missing member takes the geometry of the first present one.
        let Some(model) = roots
            .iter()
            .find(|&&r| r != usize::MAX)
            .and_then(|&r| self.devices.get(r).and_then(Option::as_ref))
            .map(|d| (d.block_size(), d.size()))
        else {
            return Err("no member of the pool is present".into());
        };
        let geometry: Vec<(String, u32, u64)> = roots
            .iter()
            .enumerate()
            .map(
                |(i, &r)| match self.devices.get(r).and_then(Option::as_ref) {
                    Some(d) => (d.name().to_owned(), d.block_size(), d.size()),
                    None => (format!("{}-missing-{i}", spec.name), model.0, model.1),
                },
            )
            .collect();
        RaidBdev::check(
            &spec.name,
            spec.level,
            spec.chunk,
            spec.data_offset,
            spec.data_len,
            &geometry,
            &spec.states,
        )
        .map_err(|e| e.to_string())?;
        // Everything that can refuse comes before the members leave the device table.
        let np = spec.level.parity();
        let want = if np > 0 {
            ParityBdev::scratch_wanted(geometry.len(), spec.chunk)
        } else if spec.level != crate::bdev::RaidLevel::Raid0 {
            RaidBdev::scratch_wanted(geometry.len())
        } else {
            0
        };
        if want > 0 {
            let chunks = usize::try_from(want.div_ceil(self.pool.chunk_size() as u64))
                .unwrap_or(usize::MAX)
                .max(self.scratch.reserved());
            self.scratch.reserve(&self.pool, chunks)?;
        }
        // Records in a checksum area: every member's area must lie on it, apart from the data.
        let checksum = spec
            .checksum
            .filter(|_| spec.level != crate::bdev::RaidLevel::Raid0);
        if let Some(c) = checksum {
            let need = crate::bdev::checksum_area_len(spec.data_len, model.0);
            let data_end = spec.data_offset.saturating_add(spec.data_len);
            let area_end = c.offset.saturating_add(c.len);
            if c.len < need
                || c.offset % 4096 != 0
                || c.len % 4096 != 0
                || (c.offset < data_end && area_end > spec.data_offset)
                || geometry.iter().any(|g| area_end > g.2)
            {
                return Err(format!(
                    "checksum area {}+{} does not fit the members beside data {}+{} (needs {need} bytes)",
                    c.offset, c.len, spec.data_offset, spec.data_len
                ));
            }
        }
        self.check_epoch(epoch)?;
        let mut members: Vec<BdevBox> = Vec::with_capacity(roots.len());
        let mut wrap_err = None;
        for (&r, g) in roots.iter().zip(&geometry) {
            let Some(d) = self.devices.get_mut(r).and_then(Option::take) else {
                members.push(Box::new(MissingBdev::new(&g.0, g.1, g.2)));
                continue;
            };
            let Some(c) = checksum.filter(|_| wrap_err.is_none()) else {
                members.push(d);
                continue;
            };
            match crate::bdev::ChecksumBdev::new(
                d,
                spec.data_offset,
                spec.data_len,
                c.offset,
                c.len,
                &self.pool,
                &mut self.scratch,
            ) {
                Ok(w) => members.push(Box::new(w)),
                Err((d, why)) => {
                    members.push(d);
                    wrap_err = Some(why);
                }
            }
        }
        if let Some(why) = wrap_err {
            // Every member back where it was, unwrapped.
            for (&r, mut m) in roots.iter().zip(members) {
                if let Some(slot) = self.devices.get_mut(r) {
                    *slot = Some(
                        m.take_checksum_inner(&self.pool, &mut self.scratch)
                            .unwrap_or(m),
                    );
                }
            }
            return Err(why);
        }
        let device: BdevBox = if np > 0 {
            let (_, block_size, member_len) = RaidBdev::check(
                &spec.name,
                spec.level,
                spec.chunk,
                spec.data_offset,
                spec.data_len,
                &geometry,
                &spec.states,
            )
            .map_err(|e| e.to_string())?;
            Box::new(
                ParityBdev::new(
                    &spec.name,
                    np,
                    spec.chunk,
                    spec.data_offset,
                    member_len,
                    block_size,
                    members,
                    &spec.states,
                )
                .hold_until_recorded(spec.hold_until_recorded)
                .with_optional_journal(spec.journal),
            )
        } else {
            let raid = RaidBdev::new(
                &spec.name,
                spec.level,
                spec.chunk,
                spec.data_offset,
                spec.data_len,
                members,
                &spec.states,
            )
            .map_err(|e| e.to_string())?;
            Box::new(
                raid.hold_until_recorded(spec.hold_until_recorded)
                    .with_seq(spec.seq_base)
                    .with_seq_limit(spec.seq_limit)
                    .with_intent(spec.bitmap)
                    .with_resync(spec.resync)
                    .with_marked_rebuild(spec.resync_members),
            )
        };
        let index = self.devices.len();
        self.devices.push(Some(device));
        if let Some(c) = checksum {
            self.checksummed
                .insert(index, (spec.data_offset, spec.data_len, c));
        }
        for (m, &d) in spec.drives.iter().enumerate() {
            if d == MISSING_DRIVE {
                continue;
            }
            if let Some(loc) = self.drive_loc.get_mut(d as usize) {
                *loc = (index, Some(m));
            }
        }
        tracing::info!(epoch, pool = %spec.name, device = index, level = ?spec.level, "pool device built");
        Ok(index)
    }

    /// Starts taking RAID device `device` apart (see [`Command::RetirePool`]): refused while
    /// a volume maps it or host I/O is in flight; its jobs are stopped.
    fn start_retire(&mut self, device: usize) -> Result<(), String> {
        let is_pool = self
            .drive_loc
            .iter()
            .any(|&(r, m)| r == device && m.is_some())
            || self.checksummed.contains_key(&device)
            || self.retiring.iter().any(|(d, _, _)| *d == device);
        let Some(dev) = self.devices.get_mut(device).and_then(Option::as_mut) else {
            return Err(format!("no device {device}"));
        };
        if !is_pool || device < self.drive_loc.len() {
            return Err(format!("device {device} ({}) is not a pool", dev.name()));
        }
        if self
            .maps
            .iter()
            .any(|m| m.extents.iter().any(|e| e.device == device))
        {
            return Err(format!(
                "pool {} is mapped by a volume: unmap its volumes first",
                dev.name()
            ));
        }
        if dev.inflight() > 0 {
            return Err(format!(
                "pool {} has {} host I/Os in flight",
                dev.name(),
                dev.inflight()
            ));
        }
        dev.set_job_limit(crate::bdev::JobKind::Rebuild, 0);
        dev.set_job_limit(crate::bdev::JobKind::Scrub, 0);
        tracing::info!(pool = %dev.name(), device, "taking the pool device apart: its jobs stop");
        Ok(())
    }

    /// Takes apart the retiring devices with nothing left out: members unwrapped and back in
    /// their drives' places as free drives, the device gone. Returns whether any was.
    fn finish_retiring(&mut self) -> bool {
        if self.retiring.is_empty() {
            return false;
        }
        let mut any = false;
        let mut i = 0;
        while i < self.retiring.len() {
            let (device, since) = (self.retiring[i].0, self.retiring[i].1);
            let state = self
                .devices
                .get(device)
                .map(|d| d.as_ref().map(|d| d.idle()));
            let result = match state {
                Some(Some(false)) if since.elapsed() < self.config.retire_patience => {
                    // Its jobs may have been granted work since: nothing more starts.
                    if let Some(Some(d)) = self.devices.get_mut(device) {
                        d.set_job_limit(crate::bdev::JobKind::Rebuild, 0);
                        d.set_job_limit(crate::bdev::JobKind::Scrub, 0);
                    }
                    i += 1;
                    continue;
                }
                Some(Some(false)) => {
                    // A member that does not answer (its commands wait for the driver's
                    // timeouts and a controller reset): the device stays whole and in
                    // service, its jobs free to go on (the raid service's grants apply
                    // again), and the control plane is told, well inside its own timeout.
                    let mut name = String::new();
                    if let Some(Some(d)) = self.devices.get_mut(device) {
                        name = d.name().to_owned();
                        d.set_job_limit(crate::bdev::JobKind::Rebuild, u64::MAX);
                        d.set_job_limit(crate::bdev::JobKind::Scrub, u64::MAX);
                    }
                    tracing::warn!(pool = %name, device, "pool device still busy: not taken apart");
                    Err(format!(
                        "pool {name} still has I/O out after {} ms: not taken apart",
                        self.config.retire_patience.as_millis()
                    ))
                }
                Some(Some(true)) => {
                    self.retire(device);
                    Ok(())
                }
                // Taken apart already (asked twice).
                _ => Ok(()),
            };
            let (_, _, reply) = self.retiring.swap_remove(i);
            let _ = reply.send(result);
            any = true;
        }
        any
    }

    /// Takes idle RAID device `device` apart.
    fn retire(&mut self, device: usize) {
        let Some(dev) = self.devices.get_mut(device).and_then(Option::take) else {
            return;
        };
        let name = dev.name().to_owned();
        self.checksummed.remove(&device);
        let mut dev = dev;
        dev.release_buffers(&mut self.scratch);
        let mut freed = Vec::new();
        for (slot, mut m) in dev.into_members().into_iter().enumerate() {
            let m = m
                .take_checksum_inner(&self.pool, &mut self.scratch)
                .unwrap_or(m);
            // The drive in this slot (a missing member has none: it is dropped).
            let Some(d) = self
                .drive_loc
                .iter()
                .position(|&loc| loc == (device, Some(slot)))
            else {
                continue;
            };
            self.drive_loc[d] = (d, None);
            if let Some(place) = self.devices.get_mut(d) {
                *place = Some(m);
                freed.push(d);
            }
        }
        tracing::info!(pool = %name, device, drives = ?freed, "pool device taken apart: its drives are free");
    }

    /// Swaps free raw drive `drive` into slot `slot` of RAID device `device` (a failed member's
    /// place); the old member's drive becomes free again.
    fn replace_member(
        &mut self,
        device: usize,
        slot: usize,
        drive: u32,
        done: u64,
    ) -> Result<(), String> {
        let d = drive as usize;
        let Some(&(root, None)) = self.drive_loc.get(d) else {
            return Err(format!("drive {drive} is not a free drive"));
        };
        if root == device || self.devices.get(device).and_then(Option::as_ref).is_none() {
            return Err(format!("no RAID device {device}"));
        }
        let idle = self
            .devices
            .get(root)
            .and_then(Option::as_ref)
            .is_some_and(|dev| dev.inflight() == 0)
            && !self
                .maps
                .iter()
                .any(|m| m.extents.iter().any(|e| e.device == root));
        if !idle {
            return Err(format!("drive {drive} is in use"));
        }
        let Some(mut new) = self.devices.get_mut(root).and_then(Option::take) else {
            return Err(format!("drive {drive} is not there"));
        };
        if self.devices.get(device).and_then(Option::as_ref).is_none() {
            self.devices[root] = Some(new);
            return Err(format!("no RAID device {device}"));
        }
        if let Some(&(offset, len, c)) = self.checksummed.get(&device) {
            match crate::bdev::ChecksumBdev::new(
                new,
                offset,
                len,
                c.offset,
                c.len,
                &self.pool,
                &mut self.scratch,
            ) {
                Ok(w) => new = Box::new(w),
                Err((d, why)) => {
                    self.devices[root] = Some(d);
                    return Err(why);
                }
            }
        }
        let Some(raid) = self.devices.get_mut(device).and_then(Option::as_mut) else {
            return Err(format!("no RAID device {device}"));
        };
        match raid.replace_member(slot, new, done) {
            Err((mut new, why)) => {
                self.devices[root] = Some(
                    new.take_checksum_inner(&self.pool, &mut self.scratch)
                        .unwrap_or(new),
                );
                Err(why)
            }
            Ok(mut old) => {
                let old = old
                    .take_checksum_inner(&self.pool, &mut self.scratch)
                    .unwrap_or(old);
                // The old member's drive (if it was one) is free again.
                if let Some(old_d) = self
                    .drive_loc
                    .iter()
                    .position(|&l| l == (device, Some(slot)))
                {
                    self.devices[old_d] = Some(old);
                    self.drive_loc[old_d] = (old_d, None);
                }
                self.drive_loc[d] = (device, Some(slot));
                tracing::info!(device, slot, drive, done, "member replaced");
                Ok(())
            }
        }
    }

    /// One device I/O of request `slot` ended with `status`.
    fn device_done(&mut self, token: u64, status: u16) {
        let slot = usize::try_from(token).unwrap_or(usize::MAX);
        let Some(req) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            tracing::error!(token, "device completion for an empty request slot");
            return;
        };
        req.outstanding = req.outstanding.saturating_sub(1);
        if status != STATUS_SUCCESS && req.status == STATUS_SUCCESS {
            req.status = status;
        }
        if req.outstanding > 0 {
            return;
        }
        let mut status = req.status;
        if status == STATUS_SUCCESS && req.cmd.kind == Kind::Read {
            let bytes = usize::try_from(req.cmd.len).unwrap_or(usize::MAX);
            if let Err(e) = self.pool.set_chain_len(BufHandle(req.desc.buf), bytes) {
                tracing::error!(tag = req.desc.tag, error = %e, "cannot set the read chain's lengths");
                status = STATUS_INTERNAL;
            }
        }
        self.complete(slot, status);
    }

    /// No request in flight and every completion published.
    fn drained(&self) -> bool {
        self.free.len() == self.slots.len()
            && self.uring.io_inflight() == 0
            && self
                .channels
                .iter()
                .all(|c| c.failed || c.pending.is_empty())
    }

    /// Queues a poll on fixed file `file` unless one is queued.
    fn poll(&mut self, file: u32) -> Result<(), UringError> {
        let Some(queued) = self.polling.get_mut(file as usize) else {
            return Err(UringError::Refused("file not registered"));
        };
        if !*queued {
            self.uring.poll_readable(file)?;
            *queued = true;
        }
        Ok(())
    }

    /// Before sleeping: announces a wait for room on every full completion ring and for
    /// submissions on every ring it can consume from, each with a poll on its doorbell, and
    /// polls the wake eventfd. Returns true if a ring became ready meanwhile (do not sleep).
    fn arm(&mut self, stopping: bool) -> Result<bool, EngineError> {
        let mut ready = false;
        let consume = !stopping && !self.free.is_empty();
        for ci in 0..self.channels.len() {
            let ch = &mut self.channels[ci];
            if ch.failed {
                continue;
            }
            let file = if !ch.pending.is_empty() {
                match ch.complete.arm_wait() {
                    Ok(true) => {
                        ready = true;
                        continue;
                    }
                    Ok(false) => {
                        ch.armed_space = true;
                        space_file(ci)
                    }
                    Err(e) => {
                        fail_channel(ch, ci, &e);
                        continue;
                    }
                }
            } else if consume {
                match ch.submit.arm_wait() {
                    Ok(true) => {
                        ready = true;
                        continue;
                    }
                    Ok(false) => {
                        ch.armed_data = true;
                        data_file(ci)
                    }
                    Err(e) => {
                        fail_channel(ch, ci, &e);
                        continue;
                    }
                }
            } else {
                continue;
            };
            self.poll(file)?;
        }
        self.poll(WAKE_FILE)?;
        Ok(ready)
    }

    /// After a sleep (or instead of one): withdraws every announced wait.
    fn disarm(&mut self) {
        for ch in &mut self.channels {
            if std::mem::take(&mut ch.armed_data) {
                ch.submit.disarm_wait();
            }
            if std::mem::take(&mut ch.armed_space) {
                ch.complete.disarm_wait();
            }
        }
    }

    /// Publishes pending completions where the completion ring has room.
    fn publish(&mut self) -> bool {
        let mut progress = false;
        let mut batch = std::mem::take(&mut self.batch);
        for (i, ch) in self.channels.iter_mut().enumerate() {
            if ch.failed || ch.pending.is_empty() {
                continue;
            }
            let producer = &mut ch.complete;
            let free = match producer.free() {
                Ok(f) => f,
                Err(e) => {
                    fail_channel(ch, i, &e);
                    continue;
                }
            };
            let k = usize::try_from(free)
                .unwrap_or(usize::MAX)
                .min(ch.pending.len())
                .min(BATCH);
            if k == 0 {
                continue;
            }
            let base = producer.next_index();
            batch.clear();
            for (j, d) in ch.pending.iter().take(k).enumerate() {
                let mut d = *d;
                lend_buffer(
                    &self.pool,
                    &mut d,
                    ch.complete_id,
                    base + j as u64,
                    &mut self.error_log,
                );
                batch.push(d);
            }
            let pushed = match producer.try_push(&batch) {
                Ok(n) => n,
                Err(e) => {
                    fail_channel(ch, i, &e);
                    0
                }
            };
            // Only this thread produces, and the ring had `free` slots: all k go. Should fewer
            // go, the rest are taken back and stay pending.
            for (j, d) in batch.iter().enumerate().skip(pushed) {
                unlend_buffer(&self.pool, d, ch.complete_id, base + j as u64);
            }
            ch.pending.drain(..pushed);
            self.stats.completions += pushed as u64;
            progress |= pushed > 0;
        }
        self.batch = batch;
        progress
    }

    /// Consumes submissions, round-robin over the channels, up to the free request slots.
    fn consume(&mut self) -> Result<bool, EngineError> {
        let mut progress = false;
        let mut batch = std::mem::take(&mut self.batch);
        let n = self.channels.len();
        for k in 0..n {
            let ci = (self.next_channel + k) % n;
            let max = self.free.len().min(BATCH);
            if max == 0 {
                break;
            }
            let ch = &mut self.channels[ci];
            if ch.failed || !ch.pending.is_empty() {
                continue;
            }
            let consumer = &mut ch.submit;
            if let Some(r) = consumer.producer_restart() {
                tracing::info!(
                    channel = ci,
                    generation = r.generation,
                    published_before = r.published_before,
                    "the fabric was restarted on this channel"
                );
            }
            let base = consumer.next_index();
            batch.clear();
            let popped = match consumer.try_pop(&mut batch, max) {
                Ok(p) => p,
                Err(e) => {
                    fail_channel(ch, ci, &e);
                    continue;
                }
            };
            for (j, d) in batch.iter().take(popped).enumerate() {
                self.start(ci, *d, base + j as u64)?;
            }
            progress |= popped > 0;
        }
        self.next_channel = (self.next_channel + 1) % n.max(1);
        self.batch = batch;
        Ok(progress)
    }

    /// Takes over the chain lent through descriptor `index` of ring `ring`, returning its
    /// chunks, each verified held by us.
    fn take_chain(&self, head: u32, ring: u8, index: u64) -> Result<Vec<u32>, PoolError> {
        self.pool.take_chain(BufHandle(head), ring, index)?;
        let chain = self.pool.chain(BufHandle(head))?;
        let me = self.pool.holder();
        for &h in &chain {
            match self.pool.state(BufHandle(h))? {
                ChunkState::Held { role, incarnation }
                    if role == me.role && incarnation == me.incarnation & INCARNATION_MASK => {}
                actual => {
                    // The peer relinked the chain between our take and our walk.
                    return Err(PoolError::WrongState {
                        handle: h,
                        actual,
                        expected: "held by the datapath after take",
                    });
                }
            }
        }
        Ok(chain)
    }

    /// Starts one consumed descriptor: validation, buffer takeover, first operation. Checks in
    /// this order (the first failing one decides the status): a read, write or unknown opcode
    /// needs a chain lent through this descriptor; opcode; volume; zero blocks; range; chain
    /// capacity.
    fn start(&mut self, ci: usize, desc: IoDesc, index: u64) -> Result<(), EngineError> {
        self.stats.submissions += 1;
        let ring = self.channels[ci].submit_id;
        let data_op = request::kind(desc.opcode).map_or(true, Kind::has_data);
        let mut chain = Vec::new();
        let mut has_buf = false;
        if desc.buf != NIL {
            match self.take_chain(desc.buf, ring, index) {
                Ok(c) => {
                    chain = c;
                    has_buf = true;
                }
                Err(e) if data_op => {
                    self.log_invalid(
                        &desc,
                        ci,
                        "buffer not lent through this descriptor",
                        Some(&e),
                    );
                    self.finish(ci, desc, false, STATUS_INVALID_FIELD, 0);
                    return Ok(());
                }
                Err(e) => {
                    // A command without data whose buffer field is not a lent chain (a zeroed
                    // descriptor names chunk 0): ignore it.
                    tracing::trace!(tag = desc.tag, error = %e, "ignoring the buffer field of a command without data");
                }
            }
        } else if data_op {
            self.log_invalid(&desc, ci, "no buffer", None);
            self.finish(ci, desc, false, STATUS_INVALID_FIELD, 0);
            return Ok(());
        }
        if crate::fence::is_fenced() {
            // The peer fenced this node: nothing more is served or acknowledged.
            self.finish(ci, desc, has_buf, STATUS_FENCED, 0);
            return Ok(());
        }
        let raw = self.channels[ci].raw;
        let table = if raw { &self.raw_maps } else { &self.maps };
        let cmd = match request::decode(&desc, table) {
            Ok(c) => c,
            Err(r) => {
                self.log_invalid(&desc, ci, r.why, None);
                self.finish(ci, desc, has_buf, r.status, 0);
                return Ok(());
            }
        };
        if cmd.kind.has_data() {
            let capacity = chain.len() as u64 * self.pool.chunk_size() as u64;
            if capacity < cmd.len {
                self.log_invalid(&desc, ci, "buffer chain shorter than the transfer", None);
                self.finish(ci, desc, true, STATUS_INVALID_FIELD, 0);
                return Ok(());
            }
        }
        if cmd.kind == Kind::Deallocate && cmd.len == 0
            || cmd.kind == Kind::Flush && cmd.volume.is_none() && self.maps.is_empty()
        {
            self.finish(ci, desc, has_buf, STATUS_SUCCESS, 0);
            return Ok(());
        }
        let Some(slot) = self.free.pop() else {
            // consume() pops no more than there are free slots.
            self.finish(ci, desc, has_buf, STATUS_INTERNAL, 0);
            return Ok(());
        };
        let req = Request {
            channel: ci,
            desc,
            has_buf,
            cmd,
            outstanding: 0,
            status: STATUS_SUCCESS,
        };
        self.chains[slot] = chain;
        self.slots[slot] = Some(req);
        // Every device I/O goes out before any can be accounted (ends come from poll), so
        // the count below is complete before the first one ends.
        let mut ios = 0u32;
        let mut ctx = Ctx {
            pool: &self.pool,
            uring: &mut self.uring,
            uring_free: &mut self.uring_free,
            uring_owner: &mut self.uring_owner,
            inbox: &mut self.inbox,
            chains: &self.chains,
            scratch: &mut self.scratch,
            now: Instant::now(),
            stats: &mut self.bstats,
            events: &mut self.events,
            emulate_zeroes: self.config.emulate_zeroes,
        };
        let token = slot as u64;
        let chain_id = u32::try_from(slot).unwrap_or(u32::MAX);
        let ndev = self.devices.len();
        let devices = &mut self.devices;
        let drive_loc = &self.drive_loc;
        let mut io = |device: usize, offset: u64, len: u64, skip: u64| {
            let io = Io {
                seq: 0,
                token,
                op: cmd.kind,
                offset,
                len,
                fua: cmd.fua,
                chain: ChainRef { id: chain_id, skip },
            };
            // On a raw channel `device` is a drive id: the drive itself or a pool's member.
            let (root, member) = if raw {
                drive_loc.get(device).copied().unwrap_or((usize::MAX, None))
            } else {
                (device, None)
            };
            let Some(d) = devices.get_mut(root).and_then(Option::as_mut) else {
                return;
            };
            match member {
                None => {
                    d.submit(io, &mut ctx);
                    ios += 1;
                }
                Some(m) => {
                    if d.submit_member(m, io, &mut ctx).is_ok() {
                        ios += 1;
                    }
                }
            }
        };
        let table = if raw { &self.raw_maps } else { &self.maps };
        match (cmd.kind, cmd.volume) {
            (Kind::Flush, None) if raw => {
                for d in 0..drive_loc.len() {
                    io(d, 0, 0, 0);
                }
            }
            (Kind::Flush, None) => {
                for d in 0..ndev {
                    io(d, 0, 0, 0);
                }
            }
            (Kind::Flush, Some(v)) => table[v].devices(|d| io(d, 0, 0, 0)),
            (_, Some(v)) => {
                table[v].pieces(cmd.offset, cmd.len, |p| {
                    io(p.device, p.device_offset, p.len, p.skip);
                });
            }
            (_, None) => {}
        }
        match self.slots[slot].as_mut() {
            Some(r) if ios > 0 => r.outstanding = ios,
            _ => self.complete(slot, STATUS_SUCCESS),
        }
        Ok(())
    }

    /// Reaps io_uring completions: doorbell polls are handled, I/O completions go to the inbox
    /// of the leaf device that owns their slot (it advances them when polled).
    fn reap(&mut self) -> Result<bool, EngineError> {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        self.uring.reap(&mut cqes);
        let progress = !cqes.is_empty();
        for &(ud, res) in &cqes {
            if ud & POLL_BIT != 0 {
                self.polled(ud as u32, res);
                continue;
            }
            let owner = usize::try_from(ud)
                .ok()
                .and_then(|s| self.uring_owner.get(s))
                .copied();
            match owner.and_then(|(leaf, op)| Some((self.inbox.get_mut(leaf as usize)?, op))) {
                Some((inbox, op)) => inbox.push((op, res)),
                None => tracing::error!(ud, res, "io_uring completion of no device"),
            }
        }
        self.cqes = cqes;
        Ok(progress)
    }

    /// A poll on fixed file `file` completed: drain that eventfd (the loop then looks at
    /// everything anyway).
    fn polled(&mut self, file: u32, res: i32) {
        if let Some(queued) = self.polling.get_mut(file as usize) {
            *queued = false;
        }
        if res < 0 {
            if let Some(suppressed) = self.error_log.check(Instant::now()) {
                tracing::warn!(file, errno = -res, suppressed, "poll on an eventfd failed");
            }
        }
        let bell = if file == WAKE_FILE {
            Some(&*self.wake)
        } else {
            let ci = (file as usize - 1) / 2;
            self.channels.get(ci).and_then(|ch| {
                if file == data_file(ci) {
                    Some(ch.submit.data_doorbell())
                } else if file == space_file(ci) {
                    Some(ch.complete.space_doorbell())
                } else {
                    None
                }
            })
        };
        if let Some(bell) = bell {
            bell.drain();
        }
    }

    /// Ends request `slot` with `status`: frees the slot, queues the completion.
    fn complete(&mut self, slot: usize, status: u16) {
        let Some(req) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        if let Some(c) = self.chains.get_mut(slot) {
            c.clear();
        }
        let bytes = if req.cmd.kind == Kind::Read && status == STATUS_SUCCESS {
            req.cmd.len
        } else {
            0
        };
        tracing::trace!(
            tag = req.desc.tag,
            op = req.cmd.kind.name(),
            status,
            "request done"
        );
        self.finish(req.channel, req.desc, req.has_buf, status, bytes);
    }

    /// Queues the completion of `desc` on channel `ci`: status set, `buf` kept only if we hold
    /// its chain, `buf_len` set to the bytes read by a successful read.
    fn finish(&mut self, ci: usize, mut desc: IoDesc, has_buf: bool, status: u16, read: u64) {
        desc.status = status;
        if !has_buf {
            desc.buf = NIL;
        }
        if read > 0 {
            desc.buf_len = u32::try_from(read).unwrap_or(u32::MAX);
        }
        if status != STATUS_SUCCESS {
            self.stats.errors += 1;
        }
        self.channels[ci].pending.push_back(desc);
    }

    fn log_invalid(&mut self, desc: &IoDesc, channel: usize, why: &str, error: Option<&PoolError>) {
        if let Some(suppressed) = self.invalid_log.check(Instant::now()) {
            tracing::warn!(
                channel,
                tag = desc.tag,
                opcode = desc.opcode,
                volume = desc.volume,
                lba = desc.lba,
                blocks = desc.blocks,
                buf = desc.buf,
                error = error.map(tracing::field::display),
                suppressed,
                "invalid submission: {why}"
            );
        }
    }
}

/// Fixed-file index of channel `c`'s submission data doorbell.
fn data_file(c: usize) -> u32 {
    u32::try_from(1 + 2 * c).unwrap_or(u32::MAX)
}

/// Fixed-file index of channel `c`'s completion space doorbell.
fn space_file(c: usize) -> u32 {
    u32::try_from(2 + 2 * c).unwrap_or(u32::MAX)
}

/// Marks a channel dead after a ring error (a corrupt index: the peer is broken). The other
/// channels go on.
fn fail_channel(ch: &mut ChannelState, channel: usize, e: &RingError) {
    if !ch.failed {
        tracing::error!(channel, error = %e, "channel failed: no more I/O on it");
    }
    ch.failed = true;
}

/// Lends `desc`'s chain through index `index` of completion ring `ring`, just before it is
/// published there. If the chain is not ours to lend (a peer tampered with it), the completion
/// goes without it and with an internal error.
fn lend_buffer(pool: &Pool, desc: &mut IoDesc, ring: u8, index: u64, log: &mut RateLimiter) {
    if desc.buf == NIL {
        return;
    }
    if let Err(e) = pool.lend_chain(BufHandle(desc.buf), ring, index) {
        if let Some(suppressed) = log.check(Instant::now()) {
            tracing::error!(tag = desc.tag, error = %e, suppressed, "cannot lend a completion's buffer back");
        }
        desc.buf = NIL;
        desc.status = STATUS_INTERNAL;
    }
}

/// Takes back a chain lent for a completion that was not published after all.
fn unlend_buffer(pool: &Pool, desc: &IoDesc, ring: u8, index: u64) {
    if desc.buf != NIL {
        if let Err(e) = pool.take_chain(BufHandle(desc.buf), ring, index) {
            tracing::error!(tag = desc.tag, error = %e, "cannot take back an unpublished completion's buffer");
        }
    }
}
