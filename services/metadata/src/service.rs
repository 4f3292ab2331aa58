//! The metadata service process (`duplex-metadata`): sandboxed, restartable, one per node.
//!
//! Resources from duplexd: `topology` (the pool drives and the privileged channel's rings),
//! the shared pool and the rings of `topology.meta` (it produces the submission ring, consumes
//! the completion ring, holding pool buffers as the metadata role), `config` (requests from
//! mgmt), `maps` (to the datapath: pools and volume maps; member failures back), `exports` and
//! `exports-bell` (the export table the fabric serves).
//!
//! Fresh or restarted, it does the same: reads every drive through the datapath, imports the
//! pools by the import rule, publishes pools, volume maps and the export table (the datapath
//! finds an already-built pool again; the export table is republished with a newer
//! generation), then serves requests one at a time. A restart loses nothing: every change it
//! acknowledged is on the drives, and the datapath kept serving the maps it had.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use duplex_ipc::config::ConfigChannel;
use duplex_ipc::desc::IoDesc;
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::exports::{
    AnaGroupState, ExportSubsystem, ExportTable, ExportsRegion, EXPORTS_BELL_RESOURCE,
    EXPORTS_RESOURCE,
};
use duplex_ipc::lifecycle::{self, Health, Started};
use duplex_ipc::maps::{self, MapsChannel, MAPS_RESOURCE};
use duplex_ipc::pool::{Holder, Pool};
use duplex_ipc::raid::{JobKey, JobView, RaidRegion, RAID_RESOURCE};
use duplex_ipc::ring::{self, Consumer, Producer, RingRegion, WaitPolicy};
use duplex_ipc::topology::{Topology, ROLE_METADATA, TOPOLOGY_RESOURCE};
use duplex_ondisk::RaidLevel;

use crate::cluster::{Cluster, Drive, PoolPublish, Publisher, VolumePublish};
use crate::ring::{CrashPoint, RingClient, RingDisk};

/// The service's name (its seccomp policy).
pub const SERVICE: &str = "metadata";
/// Resource name of the config channel.
pub const CONFIG_RESOURCE: &str = "config";
/// How long a request to the datapath may take.
const MAPS_TIMEOUT: Duration = Duration::from_secs(10);

fn take(started: &mut Started, name: &str) -> anyhow::Result<std::os::fd::OwnedFd> {
    started
        .take(name)
        .map(|h| h.fd)
        .ok_or_else(|| anyhow!("resource `{name}` was not handed over"))
}

fn ring_parts(
    started: &mut Started,
    name: &str,
) -> anyhow::Result<(RingRegion<IoDesc>, Doorbell, Doorbell)> {
    let region = RingRegion::<IoDesc>::attach(take(started, &format!("ring:{name}"))?)
        .with_context(|| format!("ring {name}"))?;
    let data = Doorbell::from_fd(take(started, &format!("ring:{name}:data"))?)?;
    let space = Doorbell::from_fd(take(started, &format!("ring:{name}:space"))?)?;
    Ok((region, data, space))
}

/// Publishes to the datapath (maps channel) and the fabric (exports region).
#[derive(Debug)]
struct ServicePublisher {
    /// The lifecycle channel, for events.
    started: Arc<Started>,
    maps: MapsChannel,
    exports: ExportsRegion,
    bell: Doorbell,
    /// The RAID jobs region, when the node runs a raid service.
    raid: Option<RaidRegion>,
}

fn level(l: RaidLevel) -> maps::RaidLevel {
    match l {
        RaidLevel::Raid0 => maps::RaidLevel::Raid0,
        RaidLevel::Raid1 => maps::RaidLevel::Raid1,
        RaidLevel::Raid10 => maps::RaidLevel::Raid10,
        RaidLevel::Raid5 => maps::RaidLevel::Raid5,
        RaidLevel::Raid6 => maps::RaidLevel::Raid6,
    }
}

impl Publisher for ServicePublisher {
    fn event(&mut self, level: &str, kind: &str, message: &str) {
        let level = match level {
            "error" => duplex_ipc::control::EventLevel::Error,
            "warning" => duplex_ipc::control::EventLevel::Warning,
            _ => duplex_ipc::control::EventLevel::Info,
        };
        if let Err(e) = self.started.event(level, kind, message) {
            tracing::warn!(error = %e, kind, "cannot send an event to duplexd");
        }
    }

    fn publish_pool(&mut self, epoch: u64, pool: &PoolPublish) -> Result<u32, String> {
        let spec = maps::PoolSpec {
            epoch,
            name: pool.name.clone(),
            level: level(pool.level),
            chunk: pool.chunk,
            data_offset: pool.data_offset,
            data_len: pool.data_len,
            drives: pool.drives.clone(),
            states: pool
                .failed
                .iter()
                .zip(pool.rebuilding.iter().chain(std::iter::repeat(&None)))
                .map(|(&f, r)| {
                    if f {
                        maps::MemberState::Failed
                    } else if r.is_some() {
                        maps::MemberState::Rebuilding
                    } else {
                        maps::MemberState::Active
                    }
                })
                .collect(),
            hold_until_recorded: true,
            journal: pool.journal,
            seq_base: pool.seq_base,
            resync: pool.resync,
            seq_limit: pool.seq_limit,
            bitmap: pool.bitmap,
            resync_members: pool.resync_members,
            checksum: pool.checksum,
            rebuild_from: if pool.rebuilding.iter().any(Option::is_some) {
                (0..pool.drives.len())
                    .map(|i| pool.rebuilding.get(i).copied().flatten().unwrap_or(0))
                    .collect()
            } else {
                Vec::new()
            },
        };
        self.maps
            .publish_pool(spec, MAPS_TIMEOUT)
            .map_err(|e| e.to_string())
    }

    fn jobs(&mut self) -> Vec<JobView> {
        self.raid.as_ref().map(RaidRegion::jobs).unwrap_or_default()
    }

    fn job_committed(&mut self, entry: usize, key: JobKey, at: u64) {
        if let Some(r) = &self.raid {
            r.set_committed(entry, key, at);
        }
    }

    fn set_rate(&mut self, device: u32, rate: u64) -> Result<(), String> {
        match &self.raid {
            Some(r) if r.set_rate(device, rate) => Ok(()),
            Some(_) => Err("every rate entry of the RAID jobs region is taken".into()),
            None => {
                Err("this node runs no raid service: rebuilds and scrubs run unscheduled".into())
            }
        }
    }

    fn rate(&mut self, device: u32) -> u64 {
        self.raid.as_ref().map_or(0, |r| r.rate(device))
    }

    fn retire_pool(&mut self, device: u32) -> Result<(), String> {
        self.maps
            .retire_pool(device, MAPS_TIMEOUT)
            .map_err(|e| e.to_string())
    }

    fn start_scrub(&mut self, device: u32) -> Result<(), String> {
        self.maps
            .start_scrub(device, MAPS_TIMEOUT)
            .map_err(|e| e.to_string())
    }

    fn progress(
        &mut self,
    ) -> Vec<(
        u32,
        Option<(u32, u64)>,
        Option<duplex_ipc::config::PoolScrub>,
    )> {
        match self.maps.list_devices(MAPS_TIMEOUT) {
            Ok(list) => list
                .iter()
                .filter(|d| d.rebuild.is_some() || d.scrub.is_some())
                .map(|d| {
                    (
                        d.index,
                        d.rebuild,
                        d.scrub.map(|s| duplex_ipc::config::PoolScrub {
                            done_bytes: s.done,
                            mismatches: s.mismatches,
                            repaired: s.repaired,
                            skipped: s.skipped,
                        }),
                    )
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the datapath's progress");
                Vec::new()
            }
        }
    }

    fn replace_member(&mut self, device: u32, slot: u32, drive: u32) -> Result<(), String> {
        // The failed member's last commands may still be ending (a pulled drive's time out):
        // the datapath swaps it only once idle, so ask again while it says so.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self
                .maps
                .replace_member(device, slot, drive, 0, MAPS_TIMEOUT)
            {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.to_string().contains("in flight")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn seq_headroom(&mut self) -> Vec<(u32, u64)> {
        match self.maps.list_devices(MAPS_TIMEOUT) {
            Ok(list) => list
                .iter()
                .filter(|d| d.seq_headroom != u32::MAX)
                .map(|d| (d.index, u64::from(d.seq_headroom)))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the datapath's write sequence numbers");
                Vec::new()
            }
        }
    }

    fn integrity(&mut self) -> Vec<(u32, maps::IntegrityInfo)> {
        match self.maps.list_devices(MAPS_TIMEOUT) {
            Ok(list) => list
                .iter()
                .filter(|d| d.integrity != maps::IntegrityInfo::default())
                .map(|d| (d.index, d.integrity))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the datapath's integrity counts");
                Vec::new()
            }
        }
    }

    fn serves_pool(&mut self, name: &str) -> bool {
        match self.maps.list_devices(MAPS_TIMEOUT) {
            Ok(list) => list.iter().any(|d| d.name == name && !d.members.is_empty()),
            Err(e) => {
                tracing::warn!(pool = name, error = %e, "cannot list the datapath's devices: taken as serving the pool");
                true
            }
        }
    }

    fn active_members(&mut self, device: u32) -> Result<Vec<bool>, String> {
        let list = self
            .maps
            .list_devices(MAPS_TIMEOUT)
            .map_err(|e| e.to_string())?;
        Ok(list
            .iter()
            .find(|d| d.index == device)
            .map(|d| {
                d.members
                    .iter()
                    .map(|&m| m == maps::MemberState::Active)
                    .collect()
            })
            .unwrap_or_default())
    }

    fn publish_volumes(&mut self, epoch: u64, volumes: &[VolumePublish]) -> Result<(), String> {
        let maps: Vec<maps::VolumeMap> = volumes
            .iter()
            .map(|v| maps::VolumeMap {
                id: v.id,
                name: v.name.clone(),
                block_size: v.block_size,
                blocks: v.blocks,
                extents: v
                    .extents
                    .iter()
                    .map(|&(start, blocks, device, device_offset)| maps::Extent {
                        start,
                        blocks,
                        device,
                        device_offset,
                    })
                    .collect(),
            })
            .collect();
        self.maps
            .publish_volumes(epoch, &maps, MAPS_TIMEOUT)
            .map_err(|e| e.to_string())
    }

    fn failures_recorded(&mut self, device: u32, members: &[u32]) -> Result<(), String> {
        self.maps
            .failures_recorded(device, members.to_vec(), MAPS_TIMEOUT)
            .map_err(|e| e.to_string())
    }

    fn inflight(&mut self, device: u32) -> Result<u32, String> {
        let devices = self
            .maps
            .list_devices(MAPS_TIMEOUT)
            .map_err(|e| e.to_string())?;
        devices
            .iter()
            .find(|d| d.index == device)
            .map(|d| d.inflight + d.held)
            .ok_or_else(|| format!("the datapath has no device {device}"))
    }

    fn publish_exports(
        &mut self,
        subsystems: Vec<ExportSubsystem>,
        ana: Vec<AnaGroupState>,
        reservations: Vec<duplex_ipc::exports::ExportReservation>,
    ) -> Result<(), String> {
        let table = ExportTable {
            generation: self.exports.current_generation() + 1,
            subsystems,
            ana,
            reservations,
        };
        self.exports.publish(&table).map_err(|e| e.to_string())?;
        self.bell.ring();
        Ok(())
    }
}

/// Runs the service; `enter` puts the seccomp policy on once every resource is taken.
pub fn run(enter: impl FnOnce() -> anyhow::Result<()>, crash: CrashPoint) -> anyhow::Result<()> {
    let mut started = lifecycle::start(SERVICE, Duration::from_secs(10))?;
    let health: Health = started.health()?;
    let topology = Topology::from_memfd(take(&mut started, TOPOLOGY_RESOURCE)?)?;
    let meta = topology
        .meta
        .clone()
        .ok_or_else(|| anyhow!("the topology has no metadata channel"))?;
    let mode = match started.mode {
        duplex_ipc::control::StartMode::Fresh => ring::StartMode::Fresh,
        duplex_ipc::control::StartMode::Restart => ring::StartMode::Restart,
    };
    let restart = mode == ring::StartMode::Restart;
    let pool = Pool::attach(
        take(&mut started, &format!("pool:{}", topology.io.pool))?,
        Holder {
            role: ROLE_METADATA,
            incarnation: started.generation,
        },
    )?;
    let (r, d, s) = ring_parts(&mut started, &meta.submit)?;
    let mut submit = Producer::attach(r, d, s, started.generation, mode)?;
    submit.set_policy(WaitPolicy::Doorbell);
    let (r, d, s) = ring_parts(&mut started, &meta.complete)?;
    let mut complete = Consumer::attach(r, d, s, started.generation, mode)?;
    complete.set_policy(WaitPolicy::Doorbell);
    let config = ConfigChannel::from_fd(take(&mut started, CONFIG_RESOURCE)?)?;
    // The fabric's reservation commands (optional: a node without a fabric has none).
    let resv = started
        .take(duplex_ipc::resv::RESV_RESOURCE)
        .map(|h| duplex_ipc::resv::ResvChannel::from_fd(h.fd))
        .transpose()?;
    let maps_channel = MapsChannel::from_fd(take(&mut started, MAPS_RESOURCE)?)?
        .with_first_request_id(started.generation << 32);
    let exports = ExportsRegion::attach(take(&mut started, EXPORTS_RESOURCE)?)?;
    let bell = Doorbell::from_fd(take(&mut started, EXPORTS_BELL_RESOURCE)?)?;
    let cluster_region = match started.take(duplex_ipc::cluster::CLUSTER_RESOURCE) {
        Some(h) => Some(
            duplex_ipc::cluster::ClusterRegion::attach(h.fd).context("the cluster state region")?,
        ),
        None => None,
    };
    let raid_region = match started.take(RAID_RESOURCE) {
        Some(h) => Some(RaidRegion::attach(h.fd).context("the RAID jobs region")?),
        None => None,
    };
    let secrets_key = match started.take(duplex_ipc::keys::SECRETS_KEY_RESOURCE) {
        Some(h) => Some(duplex_ondisk::secrets::SecretsKey::from_bytes(
            duplex_ipc::keys::attach(h.fd).context("the secrets key")?,
        )),
        None => None,
    };
    enter()?;
    // Whatever a predecessor left queued on the config channel is not acted on now: its
    // caller is told at once (the restart notice) that it may or may not have been carried
    // out, as is the caller of a request the predecessor took and never answered.
    let dropped = config.discard_queued();
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "discarded config requests a predecessor left unanswered"
        );
    }
    if let Some(r) = &resv {
        let dropped = r.discard_queued();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "discarded reservation requests a predecessor left unanswered"
            );
        }
    }
    if mode == ring::StartMode::Restart {
        if let Err(e) = config.send_restart_notice() {
            tracing::warn!(error = %e, "cannot send the restart notice to mgmt");
        }
        if let Some(r) = &resv {
            if let Err(e) = r.send_restart_notice() {
                tracing::warn!(error = %e, "cannot send the restart notice to the fabric");
            }
        }
    }
    let started = Arc::new(started);
    started.ready()?;
    let stop = lifecycle::spawn_stop_flag(Arc::clone(&started))?;
    let client = Rc::new(RefCell::new(RingClient::new(
        Arc::new(pool),
        submit,
        complete,
        started.generation,
        restart,
    )));
    client.borrow_mut().set_crash_point(crash);
    let health = Rc::new(health);
    let beat = Rc::clone(&health);
    client
        .borrow_mut()
        .set_heartbeat(Rc::new(move || beat.beat()));
    if let Some(after) = crash.after {
        tracing::warn!(
            after,
            "test hook: every configuration request aborts this service after its {after}th drive write or flush"
        );
    }
    let mut maps_channel = maps_channel;
    // The datapath's view of the drives: their ids, sizes, block sizes, and whether they keep
    // integrity records in their LBA format's metadata.
    let devices = maps_channel
        .list_devices(MAPS_TIMEOUT)
        .map_err(|e| anyhow!("the datapath did not list its devices: {e}"))?;
    let mut drives = Vec::new();
    for (i, spec) in topology.drives.iter().enumerate() {
        let id = topology.drive_id(i);
        let Some(dev) = devices.iter().find(|d| d.index == id) else {
            tracing::error!(drive = %spec.name, id, "the datapath has no such drive");
            continue;
        };
        // A drive taken into a pool reports the drive's own size through its member slot.
        let capacity = spec.blocks * u64::from(spec.block_size);
        let disk = RingDisk::new(
            Rc::clone(&client),
            id,
            &spec.path,
            capacity,
            dev.block_size.max(spec.block_size),
        );
        drives.push(Drive {
            name: spec.name.clone(),
            address: spec.path.clone(),
            id,
            capacity,
            block_size: spec.block_size,
            disk,
            state: duplex_ipc::config::DriveState::Free,
            pool: String::new(),
            slot: 0,
            spare: None,
            records: dev.records,
        });
    }
    health.beat();
    let publisher = ServicePublisher {
        started: Arc::clone(&started),
        maps: maps_channel,
        exports,
        bell,
        raid: raid_region,
    };
    // A cluster member owns the pools whose ownership record names its slot; the others are
    // the peer's until the cluster service claims them (the peer fenced).
    let node = topology.cluster.as_ref().map_or(0, |c| c.slot() as u32);
    // The join handshake: a cluster member's new boot serves none of its pools until the
    // cluster service has joined it (the peer acknowledged that it takes nothing of this node
    // over, or is dead, or was never heard); meanwhile requests are answered "not ready". A
    // restart of this service within the boot finds the node joined.
    if let Some(r) = &cluster_region {
        let mut told = false;
        while !r.joined() {
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            if !told {
                told = true;
                tracing::info!("waiting for the cluster join before importing this node's pools");
            }
            health.beat();
            if let Some(r) = &resv {
                if let Ok(Some((id, _))) = r.recv_request(Duration::ZERO) {
                    let reply = duplex_ipc::resv::ResvReply::Error(
                        "this node is joining the cluster: its pools are not served yet".into(),
                    );
                    if let Err(e) = r.send_reply(id, &reply) {
                        tracing::warn!(error = %e, "cannot answer the fabric");
                    }
                }
            }
            match config.recv_request(Duration::from_millis(20)) {
                Ok(Some((id, request))) => {
                    tracing::info!(
                        request = request.kind_name(),
                        "config request while joining"
                    );
                    let reply = duplex_ipc::config::ConfigReply::Error {
                        kind: duplex_ipc::config::ConfigErrorKind::NotReady,
                        message: "this node is joining the cluster (waiting for the peer to acknowledge it, or to be found dead): try again shortly; `duplexctl cluster status` says more".into(),
                    };
                    if let Err(e) = config.send_reply(id, &reply) {
                        tracing::warn!(error = %e, "cannot answer mgmt");
                    }
                }
                Ok(None) => {}
                Err(e) if e.is_malformed() => {
                    tracing::warn!(error = %e, "malformed config request dropped");
                }
                Err(e) => return Err(anyhow!("config channel failed: {e}")),
            }
        }
    }
    let claims = cluster_region.as_ref().map(|r| r.claims().0);
    let mut cluster = Cluster::start_member(drives, node, claims, topology.ana_group, publisher);
    if let Some(key) = secrets_key {
        cluster.set_secrets_key(key);
    }
    // A boot of the node (not a restart of this service within one) is a power on of the
    // pools it imported: reservations without Persist Through Power Loss are gone.
    if mode == ring::StartMode::Fresh {
        cluster.power_on_reservations();
    }
    tracing::info!(
        generation = started.generation,
        restart,
        drives = topology.drives.len(),
        "metadata service ready"
    );
    let mut seen_peer_gen = 0u64;
    let mut evacuate_at: Option<std::time::Instant> = None;
    let mut told_changes = cluster.changes();
    let mut rebuilds_at = std::time::Instant::now();
    while !stop.load(Ordering::Acquire) {
        health.beat();
        // A rebuild the datapath finished is recorded on disk (checked twice a second).
        if rebuilds_at.elapsed() >= Duration::from_millis(500) {
            rebuilds_at = std::time::Instant::now();
            cluster.check_rebuilds();
            cluster.renew_write_seqs();
            // Hot spares: found on the drives, taken for failed members.
            cluster.label_spares();
            cluster.take_spares();
            // Which drives a takeover must fence (those holding current pool data).
            if let Some(r) = &cluster_region {
                let names = cluster.current_member_drives();
                let mask = topology
                    .drives
                    .iter()
                    .enumerate()
                    .take(64)
                    .filter(|(_, d)| names.contains(&d.name))
                    .fold(0u64, |m, (i, _)| m | 1 << i);
                r.set_must_fence(mask);
            }
        }
        // Wait for whichever channel speaks first (at most 50 ms), then serve both.
        let wait = match &resv {
            Some(r) => {
                use std::os::fd::AsFd;
                let mut fds = [
                    nix::poll::PollFd::new(config.as_fd(), nix::poll::PollFlags::POLLIN),
                    nix::poll::PollFd::new(r.as_fd(), nix::poll::PollFlags::POLLIN),
                ];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u8));
                Duration::ZERO
            }
            None => Duration::from_millis(50),
        };
        if let Some(r) = &resv {
            match r.recv_request(Duration::ZERO) {
                Ok(Some((id, request))) => {
                    let reply = cluster.reservation(&request);
                    health.beat();
                    if let Err(e) = r.send_reply(id, &reply) {
                        tracing::warn!(error = %e, "cannot answer the fabric");
                    }
                }
                Ok(None) => {}
                Err(e) if e.is_malformed() => {
                    tracing::warn!(error = %e, "malformed reservation request dropped");
                }
                Err(e) => return Err(anyhow!("reservation channel failed: {e}")),
            }
        }
        match config.recv_request(wait) {
            Ok(Some((id, request))) => {
                tracing::info!(request = request.kind_name(), "config request");
                client.borrow_mut().arm_crash_point(true);
                let changes = !request.is_read_only();
                let kind = request.kind_name();
                let reply = cluster.handle(request);
                client.borrow_mut().arm_crash_point(false);
                if let (true, duplex_ipc::config::ConfigReply::Done(d)) = (changes, &reply) {
                    cluster.publisher_mut().event(
                        "info",
                        "config-changed",
                        &format!("{kind}: {}", d.message),
                    );
                }
                health.beat();
                if let Err(e) = config.send_reply(id, &reply) {
                    // A reply one message cannot carry (a list past its bound) still gets an
                    // answer, so the operator learns why instead of waiting for a timeout.
                    let why = format!("the answer does not fit one reply: {e}");
                    tracing::warn!(error = %e, "cannot answer mgmt; answering with the reason");
                    let refusal = duplex_ipc::config::ConfigReply::Error {
                        kind: duplex_ipc::config::ConfigErrorKind::Refused,
                        message: why,
                    };
                    if let Err(e) = config.send_reply(id, &refusal) {
                        tracing::warn!(error = %e, "cannot answer mgmt");
                    }
                }
            }
            Ok(None) => {}
            Err(e) if e.is_malformed() => {
                tracing::warn!(error = %e, "malformed config request dropped");
            }
            Err(e) => return Err(anyhow!("config channel failed: {e}")),
        }
        if let Some(r) = &cluster_region {
            let (claims, _) = r.claims();
            if cluster.claims(claims) {
                health.beat();
            }
            r.set_settled(cluster.settled());
            // The peer is visible on the drives when its slot was read in the last rounds.
            if let Some(spec) = &topology.cluster {
                let rounds = r.rounds();
                // A move also needs the interconnect: the peer learns of it by the next beat.
                let visible = r.peer_linked()
                    && r.slot(spec.peer_slot())
                        .is_some_and(|v| v.drives > 0 && v.round + 2 >= rounds);
                cluster.set_peer_visible(visible);
            }
            // The peer changed its pools on the drives: read them again.
            let peer_gen = r.peer_config_generation();
            if peer_gen != seen_peer_gen {
                seen_peer_gen = peer_gen;
                cluster.rescan();
                health.beat();
            }
            // The host link down: hosts cannot reach this node; its pools go to the peer
            // (tried again every second while some stay).
            if let Some(spec) = &topology.cluster {
                if r.host_link_down() {
                    if evacuate_at
                        .is_none_or(|t: std::time::Instant| t.elapsed() >= Duration::from_secs(1))
                    {
                        evacuate_at = Some(std::time::Instant::now());
                        if cluster.evacuate(spec.peer_id) == 0 {
                            // Everything moved: nothing more to do while the link stays down.
                            evacuate_at =
                                Some(std::time::Instant::now() + Duration::from_secs(3600));
                        }
                        health.beat();
                    }
                } else {
                    evacuate_at = None;
                }
            }
            // This node changed its pools: the peer hears it with the next beat.
            let changes = cluster.changes();
            if changes != told_changes {
                told_changes = changes;
                r.bump_config_generation();
            }
        }
        // Member failures the datapath reported: record them, then release its writes.
        loop {
            let event = cluster_event(&mut cluster);
            match event {
                Some((device, member)) => {
                    if let Err(e) = cluster.member_failed(device, member) {
                        tracing::error!(device, member, error = %e, "recording a member failure failed");
                    }
                }
                None => break,
            }
        }
    }
    tracing::info!("metadata service stopping");
    Ok(())
}

fn cluster_event(c: &mut Cluster<RingDisk, ServicePublisher>) -> Option<(u32, u32)> {
    match c.publisher_mut().maps.recv_event(Duration::ZERO) {
        Ok(Some(e)) => Some((e.device, e.member)),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "maps channel");
            None
        }
    }
}
