//! The node's storage as the metadata service runs it: every drive the node has, every pool
//! imported from them, and the operators' configuration requests (`duplexctl pool|volume|
//! subsystem|namespace|host ...`, through mgmt's config channel).
//!
//! A request is checked against the configuration in force, turned into new pool
//! configurations (pure functions of [`crate::ops`]), committed to the drives ([`PoolStore::commit`]:
//! durable on every live member before it counts), and only then published: the volume maps to
//! the datapath, the export table (subsystems, namespaces, hosts) to the fabric, and the
//! answer to the operator. A refused request changes nothing anywhere.
//!
//! Subsystems are cluster-wide: every pool's image carries a copy with the cluster
//! generation, and a change to them is committed to every pool (the copy with the highest
//! generation wins at the next start). Namespaces live in the pool of their volume.
//!
//! Volume ids (the datapath's and fabric's name for a volume in every I/O descriptor) are a
//! function of the volume's UUID ([`volume_id`]), so they are the same after a restart of this
//! service, of the node, or on the peer node; a new volume's UUID is drawn again until its id
//! is unused.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use duplex_ipc::config::{
    ConfigErrorKind, ConfigReply, ConfigRequest, DriveInfo, DriveState, Export, NamespaceInfo,
    PoolInfo, PoolIntegrity, PoolJobs, PoolMember as PoolMemberInfo, PoolScrub, PoolState,
    SubsystemInfo, VolumeInfo,
};
use duplex_ipc::exports::{
    AnaGroupState, AnaState, ExportNamespace, ExportSubsystem, MAX_ANA_GROUP,
};
use duplex_ipc::raid::{JobKey, JobKind, JobView};
use duplex_ondisk::import::{MemberStatus, StaleReason};
use duplex_ondisk::{MemberState, PoolConfig, RaidLevel, Uuid};

use crate::disk::MetaDisk;
use crate::ops::{self, OpError};
use crate::store::{probe, FormatSpec, PoolStore, StoreError};

/// Where pool volume ids start (the node config's file volumes use small ids).
pub const VOLUME_ID_BASE: u32 = 0x4000_0000;
/// A member that is not there, in [`PoolPublish::drives`].
pub const MISSING: u32 = u32::MAX;
/// Chunk size when the operator gives none.
pub const DEFAULT_CHUNK: u32 = 64 << 10;
/// Model number of the subsystems (what hosts see).
pub const MODEL: &str = "duplex";

/// The id a volume is served under.
pub fn volume_id(uuid: &Uuid) -> u32 {
    VOLUME_ID_BASE
        | (u32::from_le_bytes([uuid.0[0], uuid.0[1], uuid.0[2], uuid.0[3]]) & 0x3fff_ffff)
}

/// A RAID device for the datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPublish {
    /// Pool name.
    pub name: String,
    /// Level.
    pub level: RaidLevel,
    /// Chunk bytes.
    pub chunk: u64,
    /// Where each member's data area starts.
    pub data_offset: u64,
    /// Bytes of each member's data area.
    pub data_len: u64,
    /// Raw drive ids in slot order ([`MISSING`] where no current member is).
    pub drives: Vec<u32>,
    /// Whether each member is failed (kept out).
    pub failed: Vec<bool>,
    /// Each member being rebuilt (written, not read; rebuilt by the datapath): the position
    /// (member bytes) its rebuild resumes from, the checkpoint on the drives.
    pub rebuilding: Vec<Option<u64>>,
    /// Parity levels: `(offset, length, tag)` of the stripe journal ring on every member.
    pub journal: Option<(u64, u64, u64)>,
    /// Mirror levels: the first write sequence number (0: from 1).
    pub seq_base: u64,
    /// Mirror levels: resync the copies before serving (an import).
    pub resync: bool,
    /// Mirror levels: the committed write sequence mark (no write is numbered at or past
    /// it); 0: no limit.
    pub seq_limit: u64,
    /// Mirror levels: `(offset, length, tag)` of the write-intent bitmap on every member.
    pub bitmap: Option<(u64, u64, u64)>,
    /// Mirror levels with a bitmap: rebuilding members (bit = slot) that came back stale:
    /// only the regions the bitmap marks are copied to them.
    pub resync_members: u64,
    /// `(offset, length)` of the pool's checksum area on every member (ONDISK "Checksum
    /// area"): its drives keep no integrity records in their LBA format's metadata.
    pub checksum: Option<(u64, u64)>,
}

/// A volume map for the datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumePublish {
    /// Id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Block size.
    pub block_size: u32,
    /// Blocks.
    pub blocks: u64,
    /// Extents: (first volume block, blocks, device, byte offset on the device).
    pub extents: Vec<(u64, u64, u32, u64)>,
}

/// Long work on one pool device at the datapath: its index, the member being rebuilt
/// `(slot, bytes done)`, the scrub now or last.
pub type Progress = (u32, Option<(u32, u64)>, Option<PoolScrub>);

/// A pool's jobs as the raid service sees them (`device`: the pool's datapath device).
fn pool_jobs(device: Option<u32>, jobs: &[JobView], rate_limit: u64) -> PoolJobs {
    let mut out = PoolJobs {
        rate_limit,
        ..PoolJobs::default()
    };
    let Some(device) = device else {
        return out;
    };
    for j in jobs.iter().filter(|j| j.report.key.device == device) {
        match j.report.key.kind {
            JobKind::Rebuild => {
                out.rebuild_rate = j.figures.rate;
                out.rebuild_eta_ms = j.figures.eta_ms;
                out.rebuild_from = j.report.started_at;
                out.rebuild_checkpoint = j.committed;
            }
            JobKind::Scrub => {
                out.scrub_rate = j.figures.rate;
                out.scrub_eta_ms = j.figures.eta_ms;
            }
        }
    }
    out
}

/// Where the metadata service's decisions go: the datapath (maps) and the fabric (exports).
pub trait Publisher {
    /// An event for the node's journal (`duplexctl events`): `level` is `info`, `warning` or
    /// `error`, `kind` `[a-z0-9-]{1,64}`. Default: dropped (tests, tools).
    fn event(&mut self, level: &str, kind: &str, message: &str) {
        let _ = (level, kind, message);
    }
    /// Builds (or finds again) a pool's RAID device; returns its device index.
    fn publish_pool(&mut self, epoch: u64, pool: &PoolPublish) -> Result<u32, String>;
    /// Replaces the volume maps.
    fn publish_volumes(&mut self, epoch: u64, volumes: &[VolumePublish]) -> Result<(), String>;
    /// Member failures are recorded on disk.
    fn failures_recorded(&mut self, device: u32, members: &[u32]) -> Result<(), String>;
    /// Puts raw drive `drive` in failed member slot `slot` of pool device `device`, to be
    /// rebuilt by the datapath.
    fn replace_member(&mut self, device: u32, slot: u32, drive: u32) -> Result<(), String> {
        let _ = (device, slot, drive);
        Err("this publisher cannot replace members".into())
    }
    /// Takes pool device `device` apart at the datapath (the pool moves to the peer): its jobs
    /// stop and its members become free raw drives; answered once they are.
    fn retire_pool(&mut self, device: u32) -> Result<(), String> {
        let _ = device;
        Err("this publisher cannot take pool devices apart".into())
    }
    /// Starts a scrub of pool device `device`.
    fn start_scrub(&mut self, device: u32) -> Result<(), String> {
        let _ = device;
        Err("this publisher cannot scrub".into())
    }
    /// Long work at the datapath: per pool device, the member being rebuilt `(slot, bytes
    /// done)` and the scrub now or last.
    fn progress(&mut self) -> Vec<Progress> {
        Vec::new()
    }
    /// Integrity findings at the datapath, per device index (drives: blocks read bad; pools:
    /// recovered, healed, unrecoverable); devices with nothing to say may be left out.
    fn integrity(&mut self) -> Vec<(u32, duplex_ipc::maps::IntegrityInfo)> {
        Vec::new()
    }
    /// Mirror pool devices at the datapath with a committed mark: `(device, write sequence
    /// numbers left below it)` (saturating at `u32::MAX`).
    fn seq_headroom(&mut self) -> Vec<(u32, u64)> {
        Vec::new()
    }
    /// Whether each member of pool device `device` is active at the datapath (a rebuilt
    /// member turns active there first).
    fn active_members(&mut self, _device: u32) -> Result<Vec<bool>, String> {
        Ok(Vec::new())
    }
    /// I/Os in flight (and completions held) at a device of the datapath.
    fn inflight(&mut self, _device: u32) -> Result<u32, String> {
        Ok(0)
    }
    /// The rebuilds and scrubs the datapath runs, as the raid service schedules them (none
    /// without a raid service).
    fn jobs(&mut self) -> Vec<JobView> {
        Vec::new()
    }
    /// Says that job `key`'s checkpoint `at` (member bytes) is on the drives.
    fn job_committed(&mut self, _entry: usize, _key: JobKey, _at: u64) {}
    /// Sets the rate of the rebuilds and scrubs of pool device `device` (bytes/s; 0: yield
    /// to host I/O).
    fn set_rate(&mut self, _device: u32, _rate: u64) -> Result<(), String> {
        Err("this node runs no raid service: rebuilds and scrubs run unscheduled".into())
    }
    /// The rate set for pool device `device` (0: none).
    fn rate(&mut self, _device: u32) -> u64 {
        0
    }
    /// Whether the datapath already has a RAID device for pool `name` (a restarted metadata
    /// service finds it built; a device it has keeps its members' states). When the datapath
    /// cannot be asked, `true` (the cautious answer).
    fn serves_pool(&mut self, _name: &str) -> bool {
        false
    }
    /// Replaces the fabric's export table: the subsystems, the ANA state of every group
    /// their namespaces name, and the reservation state of the namespaces that have one.
    fn publish_exports(
        &mut self,
        subsystems: Vec<ExportSubsystem>,
        ana: Vec<AnaGroupState>,
        reservations: Vec<duplex_ipc::exports::ExportReservation>,
    ) -> Result<(), String>;
}

/// A drive of the node.
#[derive(Debug)]
pub struct Drive<D> {
    /// The node config's name.
    pub name: String,
    /// Where it is reached.
    pub address: String,
    /// Raw drive id at the datapath.
    pub id: u32,
    /// Capacity.
    pub capacity: u64,
    /// Block size.
    pub block_size: u32,
    /// The drive (a handle: a pool's store holds a clone of it).
    pub disk: D,
    /// What it is.
    pub state: DriveState,
    /// Its pool (name) when a member, stale member or foreign.
    pub pool: String,
    /// Its slot when a member.
    pub slot: u32,
    /// Its drive UUID when it is a hot spare of `pool`.
    pub spare: Option<Uuid>,
    /// It keeps integrity records in its LBA format's metadata (the datapath's listing says
    /// so): a pool over drives that do not all keep them gets a checksum area.
    pub records: bool,
}

#[derive(Debug)]
struct PoolEntry<D: MetaDisk> {
    store: PoolStore<D>,
    /// Its RAID device at the datapath.
    device: Option<u32>,
    /// Raw drive ids by slot (`MISSING` where no current member).
    drives: Vec<u32>,
    /// Mirror levels: the write sequence numbers this process leased, `(first, mark)`: the
    /// mark is committed; the datapath numbers from `first` and never reaches the mark.
    seq: Option<(u64, u64)>,
    /// Imported from the drives (not created here): its mirror copies are resynced when the
    /// datapath builds its device (a crash or power cut may have left them apart).
    imported: bool,
    /// Members (bit = slot) that came back after they failed and are rebuilt on their own
    /// drive ([`Cluster::readd_returned`]): for mirrors the datapath copies only the regions
    /// the write-intent bitmap marks. Known to this process only (a restart rebuilds them
    /// whole from their checkpoint).
    readded: u64,
}

/// Write sequence numbers a pool's owner leases at once (committed as the pool's mark).
pub const SEQ_LEASE: u64 = 1 << 24;

/// Mirror levels: takes the next lease of write sequence numbers into `cfg` (its mark moves
/// one lease up, at least past `used`); returns `(first, mark)`. `None` for other levels.
fn lease_seq(cfg: &mut PoolConfig, used: u64) -> Option<(u64, u64)> {
    if !matches!(cfg.pool.raid_level, RaidLevel::Raid1 | RaidLevel::Raid10) {
        return None;
    }
    let first = cfg.write_seq_mark.max(used).max(1);
    let mark = first.saturating_add(SEQ_LEASE);
    cfg.write_seq_mark = mark;
    Some((first, mark))
}

/// A pool the peer controller owns, as read (never written) from its drives: this node
/// exports its namespaces as inaccessible, and imports it only when the cluster service says
/// the peer is fenced ([`Cluster::claims`]).
#[derive(Debug, Clone)]
struct PeerPool {
    uuid: Uuid,
    config: PoolConfig,
    /// The metadata generation of the image read (the owner's last commit seen).
    generation: u64,
}

/// What every pool's image carries of the cluster.
#[derive(Debug, Default)]
struct ClusterWide {
    generation: u64,
    subsystems: Vec<duplex_ondisk::Subsystem>,
    host_secrets: Vec<duplex_ondisk::records::HostSecret>,
}

/// How long after a failed takeover it is tried again.
pub const TAKEOVER_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The node's storage. See the module docs.
#[derive(Debug)]
pub struct Cluster<D: MetaDisk + Clone, P: Publisher> {
    node: u32,
    /// A member of a two-controller cluster: pools another node owns are the peer's.
    clustered: bool,
    /// Pools the peer owns.
    peer_pools: Vec<PeerPool>,
    /// The node slots whose pools the cluster service said are this node's (the peer fenced).
    claims: u64,
    /// Claimed slots with a pool whose takeover failed (an import or ownership commit error),
    /// tried again at `retry_at`: a takeover is never given up while the slot stays claimed.
    retry: u64,
    retry_at: Option<std::time::Instant>,
    /// Whether the peer's disk heartbeat is seen (a move to it may go ahead).
    peer_visible: bool,
    /// A pool being moved away: its group in ANA change, its volumes unmapped.
    moving: Option<Uuid>,
    /// Changes of pools on the drives (commits, moves), for the peer.
    changes: u64,
    ana_group: u32,
    cluster_uuid: Uuid,
    drives: Vec<Drive<D>>,
    pools: Vec<PoolEntry<D>>,
    publisher: P,
    random: RandomState,
    counter: u64,
    /// The array's secrets key (hosts' secrets are sealed with it; `None`: refused).
    secrets_key: Option<duplex_ondisk::secrets::SecretsKey>,
}

fn err(kind: ConfigErrorKind, message: impl Into<String>) -> ConfigReply {
    ConfigReply::Error {
        kind,
        message: message.into(),
    }
}

fn op_err(e: OpError) -> ConfigReply {
    let kind = match e {
        OpError::InvalidArgument(_) => ConfigErrorKind::InvalidArgument,
        OpError::NotFound(_) => ConfigErrorKind::NotFound,
        OpError::AlreadyExists(_) => ConfigErrorKind::AlreadyExists,
        OpError::InUse(_) => ConfigErrorKind::InUse,
        OpError::NoSpace(_) => ConfigErrorKind::NoSpace,
    };
    err(kind, e.to_string())
}

fn store_err(e: StoreError) -> ConfigReply {
    let kind = match e {
        StoreError::Config(_) => ConfigErrorKind::InvalidArgument,
        StoreError::Unsuitable { .. } => ConfigErrorKind::Refused,
        StoreError::Import(_) | StoreError::NameTaken { .. } => ConfigErrorKind::Refused,
        StoreError::Disk { .. } | StoreError::CommitFailed { .. } => ConfigErrorKind::IoError,
    };
    err(kind, e.to_string())
}

fn done(message: String) -> ConfigReply {
    ConfigReply::Done(duplex_ipc::config::Done {
        message,
        ..Default::default()
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn raid_from(r: duplex_ipc::config::RaidLevel) -> RaidLevel {
    match r {
        duplex_ipc::config::RaidLevel::Raid0 => RaidLevel::Raid0,
        duplex_ipc::config::RaidLevel::Raid1 => RaidLevel::Raid1,
        duplex_ipc::config::RaidLevel::Raid10 => RaidLevel::Raid10,
        duplex_ipc::config::RaidLevel::Raid5 => RaidLevel::Raid5,
        duplex_ipc::config::RaidLevel::Raid6 => RaidLevel::Raid6,
    }
}

fn raid_to(r: RaidLevel) -> duplex_ipc::config::RaidLevel {
    match r {
        RaidLevel::Raid0 => duplex_ipc::config::RaidLevel::Raid0,
        RaidLevel::Raid1 => duplex_ipc::config::RaidLevel::Raid1,
        RaidLevel::Raid10 => duplex_ipc::config::RaidLevel::Raid10,
        RaidLevel::Raid5 => duplex_ipc::config::RaidLevel::Raid5,
        RaidLevel::Raid6 => duplex_ipc::config::RaidLevel::Raid6,
    }
}

impl<D: MetaDisk + Clone, P: Publisher> Cluster<D, P> {
    /// Takes the node's drives, imports every pool found on them (a pool that cannot be
    /// imported stays offline, its drives reported, nothing written to them), and publishes
    /// the pools, volumes and exports.
    pub fn start(drives: Vec<Drive<D>>, node: u32, ana_group: u32, publisher: P) -> Self {
        Self::start_member(drives, node, None, ana_group, publisher)
    }

    /// [`Cluster::start`] for a member of a two-controller cluster (`claims`: `Some`, the node
    /// slots whose pools are this node's to take over): a pool whose ownership record names
    /// another node is the peer's. It is read, never written: its namespaces are exported with
    /// their ANA group inaccessible here, and it is imported (and its ownership moved to this
    /// node, epoch + 1) only once its owner's slot is claimed.
    pub fn start_member(
        drives: Vec<Drive<D>>,
        node: u32,
        claims: Option<u64>,
        ana_group: u32,
        publisher: P,
    ) -> Self {
        let mut c = Self {
            node,
            clustered: claims.is_some(),
            peer_pools: Vec::new(),
            claims: claims.unwrap_or(0),
            retry: 0,
            retry_at: None,
            peer_visible: false,
            moving: None,
            changes: 0,
            ana_group,
            cluster_uuid: Uuid::NIL,
            drives,
            pools: Vec::new(),
            publisher,
            random: RandomState::new(),
            counter: 0,
            secrets_key: None,
        };
        // Group the drives by the pool their superblocks name.
        let mut groups: Vec<Uuid> = Vec::new();
        for d in &mut c.drives {
            if let Some(sb) = probe(&mut d.disk) {
                if c.cluster_uuid.is_nil() {
                    c.cluster_uuid = sb.cluster_uuid;
                }
                if !groups.contains(&sb.pool_uuid) {
                    groups.push(sb.pool_uuid);
                }
                d.state = DriveState::Stale;
                d.pool = sb.pool_uuid.to_string();
            }
        }
        for pool in groups {
            if c.clustered {
                match c.owner_of(pool) {
                    Some((owner, config, generation)) if owner != c.node => {
                        if c.claims & (1 << owner) == 0 {
                            c.add_peer_pool(pool, config, generation);
                        } else {
                            c.take_over(pool);
                        }
                        continue;
                    }
                    _ => {}
                }
            }
            if let Err(e) = c.import(pool, false) {
                tracing::error!(pool = %pool, error = %e, "pool not imported: nothing was written to its drives (`duplexctl pool import {pool}` retries, `--force` accepts what the error names)");
            }
        }
        c.label_spares();
        if let Err(e) = c.publish_all() {
            tracing::error!(error = %e, "publishing the imported configuration failed");
        }
        c
    }

    /// Commits the next lease of write sequence numbers for every mirror pool whose datapath
    /// device numbers within half a lease of its committed mark, and publishes the new mark
    /// (the datapath holds writes at the mark, never past it). Checked twice a second: a
    /// lease is far more writes than a device does in that time.
    pub fn renew_write_seqs(&mut self) {
        let room = self.publisher.seq_headroom();
        for i in 0..self.pools.len() {
            let (Some(device), Some((first, mark))) = (self.pools[i].device, self.pools[i].seq)
            else {
                continue;
            };
            let Some(&(_, left)) = room.iter().find(|(d, _)| *d == device) else {
                continue;
            };
            if left > SEQ_LEASE / 2 {
                continue;
            }
            let next = mark.saturating_sub(left);
            let mut cfg = self.pools[i].store.config().clone();
            let Some((_, new_mark)) = lease_seq(&mut cfg, next) else {
                continue;
            };
            let name = cfg.pool.name.clone();
            self.changes += 1;
            if let Err(e) = self.pools[i].store.commit(cfg) {
                tracing::error!(pool = %name, error = %e, mark, next, "cannot commit the next write sequence mark: the pool's writes wait at the mark");
                continue;
            }
            self.pools[i].seq = Some((first, new_mark));
            match self.publish_pool(i) {
                Ok(()) => {
                    tracing::info!(pool = %name, next, mark = new_mark, "write sequence mark moved up")
                }
                Err(e) => {
                    tracing::error!(pool = %name, error = %e, "the next write sequence mark is committed but not published")
                }
            }
        }
    }

    /// Names the hot spares among the drives: a spare superblock whose pool (this node's or
    /// the peer's) lists its drive UUID among its spares. A spare superblock its pool no longer
    /// lists (taken, or the pool's record lost it) leaves the drive as it was classified.
    pub fn label_spares(&mut self) {
        let pools: Vec<(Uuid, String, Vec<Uuid>)> = self
            .pools
            .iter()
            .map(|p| p.store.config())
            .chain(self.peer_pools.iter().map(|p| &p.config))
            .map(|c| (c.pool.uuid, c.pool.name.clone(), c.spares.clone()))
            .collect();
        for d in &mut self.drives {
            if matches!(d.state, DriveState::Active | DriveState::Rebuilding) {
                continue;
            }
            let Some(sb) = probe(&mut d.disk) else {
                continue;
            };
            if sb.role != duplex_ondisk::superblock::Role::Spare {
                continue;
            }
            if let Some((_, name, _)) = pools
                .iter()
                .find(|(u, _, spares)| *u == sb.pool_uuid && spares.contains(&sb.drive_uuid))
            {
                d.state = DriveState::Spare;
                d.pool.clone_from(name);
                d.slot = u32::MAX;
                d.spare = Some(sb.drive_uuid);
            }
        }
    }

    /// The owner node and configuration of `pool` as its drives say (read only).
    fn owner_of(&mut self, pool: Uuid) -> Option<(u32, PoolConfig, u64)> {
        let text = pool.to_string();
        let mut disks: Vec<D> = self
            .drives
            .iter()
            .filter(|d| d.pool == text)
            .map(|d| d.disk.clone())
            .collect();
        match crate::store::plan(&mut disks, Some(pool), false) {
            Ok(plan) => Some((
                plan.winner.config.ownership.owner_node,
                plan.winner.config,
                plan.winner.generation,
            )),
            Err(e) => {
                tracing::warn!(pool = %pool, error = %e, "cannot read the pool's ownership");
                None
            }
        }
    }

    /// Records a pool the peer owns (read only) and its drives.
    fn add_peer_pool(&mut self, pool: Uuid, config: PoolConfig, generation: u64) {
        tracing::info!(pool = %config.pool.name, owner = config.ownership.owner_node, epoch = config.ownership.epoch, "pool owned by the peer: exported inaccessible here");
        self.label_peer_drives(pool, &config);
        self.peer_pools.retain(|p| p.uuid != pool);
        self.peer_pools.push(PeerPool {
            uuid: pool,
            config,
            generation,
        });
    }

    /// Names the drives of the peer's pool `pool` (found by the pool's UUID) after it, each in
    /// its slot (its superblock's drive UUID in the pool record).
    fn label_peer_drives(&mut self, pool: Uuid, config: &PoolConfig) {
        let text = pool.to_string();
        for d in &mut self.drives {
            if d.pool != text {
                continue;
            }
            d.pool = config.pool.name.clone();
            d.state = DriveState::Active;
            if let Some(sb) = probe(&mut d.disk) {
                if let Some(slot) = config
                    .pool
                    .members
                    .iter()
                    .position(|m| m.drive_uuid == sb.drive_uuid)
                {
                    d.slot = slot as u32;
                } else if config.spares.contains(&sb.drive_uuid) {
                    d.state = DriveState::Spare;
                    d.slot = u32::MAX;
                    d.spare = Some(sb.drive_uuid);
                }
            }
        }
    }

    /// Takes over the peer's pool `pool` (the peer is fenced): imports it and commits its
    /// ownership to this node with the next epoch. Returns whether it is this node's now.
    fn take_over(&mut self, pool: Uuid) -> bool {
        let started = std::time::Instant::now();
        let text = pool.to_string();
        // The peer pool's drives carry its name now; the import looks them up by UUID.
        let name = self
            .peer_pools
            .iter()
            .find(|p| p.uuid == pool)
            .map(|p| p.config.pool.name.clone());
        if let Some(name) = &name {
            for d in &mut self.drives {
                if &d.pool == name {
                    d.pool = text.clone();
                }
            }
        }
        let i = match self.import(pool, false) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(pool = %text, error = %e, "TAKEOVER of a pool failed: not imported; it stays offline here");
                if let Some(name) = &name {
                    for d in &mut self.drives {
                        if d.pool == text {
                            d.pool = name.clone();
                        }
                    }
                }
                return false;
            }
        };
        let mut cfg = self.pools[i].store.config().clone();
        let from = cfg.ownership;
        cfg.ownership.owner_node = self.node;
        cfg.ownership.epoch = from.epoch + 1;
        // The write sequence lease rides on the ownership commit (no second commit in the
        // takeover's pause); taken before the commit, which may publish.
        self.pools[i].seq = lease_seq(&mut cfg, 0);
        let name = cfg.pool.name.clone();
        if let Err(e) = self.commit_pool(i, cfg) {
            tracing::error!(pool = %name, error = %e, "TAKEOVER of a pool failed: its ownership could not be committed; not served");
            self.pools.remove(i);
            return false;
        }
        self.peer_pools.retain(|p| p.uuid != pool);
        tracing::warn!(pool = %name, from_node = from.owner_node, epoch = from.epoch + 1, elapsed_ms = started.elapsed().as_millis() as u64, "pool taken over: this node owns it now");
        self.publisher.event(
            "warning",
            "pool-taken-over",
            &format!(
                "pool {name} taken over from node {} (epoch {}): this node serves it now",
                from.owner_node + 1,
                from.epoch + 1
            ),
        );
        true
    }

    /// The cluster service's claims (node slots whose pools are this node's to take over):
    /// takes over the peer pools of newly claimed slots and publishes. Returns whether
    /// anything changed. A takeover that failed is tried again, once every
    /// [`TAKEOVER_RETRY`], while its slot stays claimed.
    pub fn claims(&mut self, claims: u64) -> bool {
        self.claims_at(claims, std::time::Instant::now())
    }

    /// [`Cluster::claims`] at the time `now`.
    pub fn claims_at(&mut self, claims: u64, now: std::time::Instant) -> bool {
        if !self.clustered {
            return false;
        }
        let mut new = claims & !self.claims;
        self.retry &= claims;
        if self.retry != 0 && self.retry_at.is_none_or(|t| now >= t) {
            new |= self.retry;
        }
        self.claims = claims;
        if new == 0 {
            return false;
        }
        let taken: Vec<Uuid> = self
            .peer_pools
            .iter()
            .filter(|p| {
                p.config.ownership.owner_node < 64
                    && new & (1 << p.config.ownership.owner_node) != 0
            })
            .map(|p| p.uuid)
            .collect();
        let mut changed = false;
        for pool in taken {
            changed |= self.take_over(pool);
        }
        // What is still the peer's in the slots just tried failed: again later (with the
        // retries that were not due yet).
        let failed = self
            .peer_pools
            .iter()
            .filter(|p| p.config.ownership.owner_node < 64)
            .fold(0u64, |m, p| m | 1 << p.config.ownership.owner_node)
            & new;
        self.retry = (self.retry & !new) | failed;
        if failed != 0 {
            self.retry_at = Some(now + TAKEOVER_RETRY);
            tracing::warn!(
                slots = format!("{failed:#x}"),
                retry_in_ms = TAKEOVER_RETRY.as_millis() as u64,
                "a takeover failed: trying it again"
            );
        }
        if changed {
            if let Err(e) = self.publish_all() {
                tracing::error!(error = %e, "publishing after the takeover failed");
            }
        }
        changed
    }

    /// The claimed node slots whose pools are all imported here (none of theirs left as the
    /// peer's): what the cluster service waits for before the fenced peer may rejoin.
    pub fn settled(&self) -> u64 {
        let left = self
            .peer_pools
            .iter()
            .filter(|p| p.config.ownership.owner_node < 64)
            .fold(0u64, |m, p| m | 1 << p.config.ownership.owner_node);
        self.claims & !left
    }

    /// Changes of pools on the drives so far (the service tells the peer when it moves).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Whether the peer is alive on the interconnect and its disk heartbeat seen now.
    pub fn set_peer_visible(&mut self, visible: bool) {
        self.peer_visible = visible;
    }

    /// `duplexctl pool move NAME --to NODE`: a planned move of a pool this node owns to the
    /// peer. The pool's ANA group goes to change and its volumes are unmapped (the fabric
    /// answers its I/O with ANA Transition, which hosts retry), the I/O already in the
    /// datapath drains, its ownership record is committed to the peer with the next epoch, and
    /// the pool becomes the peer's here (inaccessible). The peer imports it when it hears of
    /// the change (the next interconnect beat).
    fn move_pool(&mut self, name: &str, node: u16) -> ConfigReply {
        if !self.clustered {
            return err(
                ConfigErrorKind::Refused,
                "this node is not a member of a two-controller cluster: there is no peer to move a pool to",
            );
        }
        if !(1..=4).contains(&node) {
            return err(
                ConfigErrorKind::InvalidArgument,
                format!("node {node}: node ids are 1..=4"),
            );
        }
        let slot = u32::from(node - 1);
        let i = match self.own_pool(name, "move it from there") {
            Ok(i) => i,
            Err(refused) => return refused,
        };
        if slot == self.node {
            return err(
                ConfigErrorKind::AlreadyExists,
                format!("pool {name} is owned by node {node} already"),
            );
        }
        if !self.peer_visible {
            return err(
                ConfigErrorKind::Refused,
                format!("node {node} is not alive on the interconnect with its disk heartbeat seen on the drives: it could not take pool {name}; not moved"),
            );
        }
        let started = std::time::Instant::now();
        let uuid = self.pools[i].store.config().pool.uuid;
        // 1. Hosts are told the group is in transition (the fabric answers its I/O with ANA
        // Transition), then its volumes are unmapped (what still reaches the datapath gets the
        // same path status): no new I/O reaches the pool.
        self.moving = Some(uuid);
        if let Err(e) = self.publish_exports().and_then(|()| self.publish_volumes()) {
            self.moving = None;
            let _ = self.publish_all();
            return err(
                ConfigErrorKind::IoError,
                format!("pool {name} not moved: stopping its I/O failed: {e}"),
            );
        }
        // 2. What is in flight drains.
        if let Some(device) = self.pools[i].device {
            let deadline = started + std::time::Duration::from_secs(30);
            loop {
                match self.publisher.inflight(device) {
                    Ok(0) => break,
                    Ok(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Ok(n) => {
                        self.moving = None;
                        let _ = self.publish_all();
                        return err(
                            ConfigErrorKind::IoError,
                            format!("pool {name} not moved: {n} I/Os did not drain in 30 s"),
                        );
                    }
                    Err(e) => {
                        self.moving = None;
                        let _ = self.publish_all();
                        return err(
                            ConfigErrorKind::IoError,
                            format!("pool {name} not moved: {e}"),
                        );
                    }
                }
            }
        }
        let drained_ms = started.elapsed().as_millis() as u64;
        // 3. The datapath takes the pool's device apart: its rebuilds and scrubs stop, and
        // nothing of this node's (a cached checksum entry, a write sequence counter, a bitmap)
        // outlives the move to be served stale if the pool comes back. The metadata goes to
        // the drives directly from here on.
        if let Some(device) = self.pools[i].device.take() {
            if let Err(e) = self.publisher.retire_pool(device) {
                // Not taken apart: the datapath keeps serving it (it says so within its own
                // patience, inside this request's timeout).
                self.pools[i].device = Some(device);
                self.moving = None;
                let _ = self.publish_all();
                return err(
                    ConfigErrorKind::IoError,
                    format!("pool {name} not moved: stopping its device failed: {e}"),
                );
            }
            // Should the move fail from here and the pool be built again here, the new device
            // numbers its writes from a new lease, above every number the old one used.
            self.pools[i].seq = None;
        }
        // 4. The ownership record names the peer, with the next epoch.
        let mut cfg = self.pools[i].store.config().clone();
        let epoch = cfg.ownership.epoch + 1;
        cfg.ownership.owner_node = slot;
        cfg.ownership.epoch = epoch;
        if let Err(e) = self.commit_pool(i, cfg) {
            self.moving = None;
            let _ = self.publish_all();
            return store_err(e);
        }
        // 5. The pool is the peer's here.
        let entry = self.pools.remove(i);
        let config = entry.store.config().clone();
        let generation = entry.store.stamp().generation;
        self.moving = None;
        self.add_peer_pool(uuid, config, generation);
        if let Err(e) = self.publish_all() {
            tracing::error!(pool = %name, error = %e, "publishing after the move failed");
        }
        tracing::warn!(pool = %name, to_node = node, epoch, drained_ms, elapsed_ms = started.elapsed().as_millis() as u64, "pool moved to the peer");
        self.publisher.event(
            "info",
            "pool-moved",
            &format!("pool {name} moved to node {} (epoch {epoch})", node + 1),
        );
        done(format!(
            "moved pool {name} to node {node} (epoch {epoch}); node {node} serves it once it has read the change"
        ))
    }

    /// The host link is down: every pool this node owns is moved to the peer (`node`), one by
    /// one, as `pool move` does. Returns how many are still here (a move refused or failed).
    pub fn evacuate(&mut self, node: u16) -> usize {
        let names: Vec<String> = self
            .pools
            .iter()
            .map(|p| p.store.config().pool.name.clone())
            .collect();
        for name in names {
            tracing::warn!(pool = %name, to_node = node, "host link down: moving the pool to the peer");
            if let ConfigReply::Error { message, .. } = self.move_pool(&name, node) {
                tracing::error!(pool = %name, error = %message, "host link down, but the pool could not be moved");
            }
        }
        self.pools.len()
    }

    /// Reads the pools this node does not own again (the peer changed them): pools now
    /// owned by this node (moved here) are imported and served, the others' configurations
    /// (and new pools of the peer) are taken as they are on the drives. Nothing is written.
    pub fn rescan(&mut self) {
        if !self.clustered {
            return;
        }
        let own: Vec<String> = self
            .pools
            .iter()
            .map(|p| p.store.config().pool.name.clone())
            .collect();
        let mut groups: Vec<Uuid> = Vec::new();
        for d in &mut self.drives {
            if own.contains(&d.pool) {
                continue;
            }
            if let Some(sb) = probe(&mut d.disk) {
                if !groups.contains(&sb.pool_uuid) {
                    groups.push(sb.pool_uuid);
                }
                d.pool = sb.pool_uuid.to_string();
                d.state = DriveState::Stale;
            }
        }
        let mut changed = false;
        for pool in groups {
            match self.owner_of(pool) {
                Some((owner, _, _)) if owner == self.node => {
                    self.peer_pools.retain(|p| p.uuid != pool);
                    match self.import(pool, false) {
                        Ok(i) => {
                            let c = self.pools[i].store.config();
                            tracing::warn!(pool = %c.pool.name, epoch = c.ownership.epoch, "pool moved here by the peer: imported, served by this node");
                            changed = true;
                        }
                        Err(e) => {
                            tracing::error!(pool = %pool, error = %e, "a pool moved here could not be imported")
                        }
                    }
                }
                Some((_, config, generation)) => {
                    let known = self
                        .peer_pools
                        .iter()
                        .any(|p| p.uuid == pool && p.config == config);
                    if !known {
                        changed = true;
                    }
                    self.label_peer_drives(pool, &config);
                    self.peer_pools.retain(|p| p.uuid != pool);
                    self.peer_pools.push(PeerPool {
                        uuid: pool,
                        config,
                        generation,
                    });
                }
                None => {}
            }
        }
        if changed {
            if let Err(e) = self.publish_all() {
                tracing::error!(error = %e, "publishing after re-reading the peer's pools failed");
            }
        }
    }

    /// Imports one pool from the drives that name it; returns its index in `pools`. On an
    /// error nothing was written and the pool's drives are reported stale.
    fn import(&mut self, pool: Uuid, force: bool) -> Result<usize, StoreError> {
        let pool_text = pool.to_string();
        let mut disks = Vec::new();
        let mut ids = Vec::new();
        for d in &self.drives {
            if d.pool == pool_text {
                disks.push(d.disk.clone());
                ids.push(d.id);
            }
        }
        let labels: Vec<String> = disks.iter().map(|d| d.label().to_owned()).collect();
        let started = std::time::Instant::now();
        // Names are unique on the node: a pool named like one imported already is refused
        // before the import writes anything (its repairs).
        let mut looked = disks.clone();
        let taken = crate::store::plan(&mut looked, Some(pool), force).map(|plan| {
            let name = plan.winner.config.pool.name;
            self.pools
                .iter()
                .map(|p| &p.store.config().pool)
                .find(|p| p.name == name)
                .map(|other| (name, other.uuid))
        });
        let result = match taken {
            Ok(Some((name, other))) => Err(StoreError::NameTaken { pool, name, other }),
            Ok(None) | Err(_) => PoolStore::import(disks, Some(pool), force, self.node),
        };
        match result {
            Ok((store, plan, rest)) => {
                let name = store.config().pool.name.clone();
                let mut slots = vec![MISSING; store.config().pool.members.len()];
                for m in &plan.members {
                    let Some(label) = &m.drive else { continue };
                    let Some(i) = labels.iter().position(|l| l == label) else {
                        continue;
                    };
                    let d = self.drives.iter_mut().find(|d| d.id == ids[i]);
                    if let Some(d) = d {
                        d.pool = name.clone();
                        d.slot = m.slot;
                        d.state = match m.status {
                            MemberStatus::Current { .. } => {
                                if let Some(s) = slots.get_mut(m.slot as usize) {
                                    *s = d.id;
                                }
                                DriveState::Active
                            }
                            // Being rebuilt: in the pool (it takes writes), rebuilt again.
                            MemberStatus::Stale(StaleReason::Rebuilding { .. }) => {
                                if let Some(s) = slots.get_mut(m.slot as usize) {
                                    *s = d.id;
                                }
                                DriveState::Rebuilding
                            }
                            MemberStatus::Stale(_) => DriveState::Stale,
                            MemberStatus::Missing => DriveState::Missing,
                        };
                    }
                }
                drop(rest);
                tracing::info!(pool = %name, stamp = %store.stamp(), repairs = plan.repairs.len(), force, volumes = store.config().volumes.len(), elapsed_ms = started.elapsed().as_millis() as u64, "pool imported");
                self.pools.push(PoolEntry {
                    store,
                    device: None,
                    drives: slots,
                    seq: None,
                    imported: true,
                    readded: 0,
                });
                let i = self.pools.len() - 1;
                self.readd_returned(i);
                Ok(i)
            }
            Err(e) => {
                for d in &mut self.drives {
                    if d.pool == pool_text {
                        d.state = DriveState::Stale;
                    }
                }
                Err(e)
            }
        }
    }

    /// Members of pool `i` (just imported) that failed and came back: the drive is here,
    /// readable, and its superblock still names its slot of this pool. Each is committed
    /// rebuilding on its own drive (generation + 1, before the pool is published), so the
    /// datapath resyncs it under I/O: a mirror with a write-intent bitmap copies only the
    /// regions marked since it failed (marks are kept while a member is out), parity levels
    /// rebuild it whole. A drive that fails again is failed again.
    fn readd_returned(&mut self, i: usize) {
        let cfg = self.pools[i].store.config().clone();
        if cfg.pool.raid_level == RaidLevel::Raid0 {
            return;
        }
        let name = cfg.pool.name.clone();
        let returned = cfg.pool.members.iter().enumerate().any(|(slot, m)| {
            m.state == MemberState::Failed
                && self.drives.iter().any(|d| {
                    d.pool == name && d.slot == slot as u32 && d.state == DriveState::Stale
                })
        });
        if !returned {
            return;
        }
        // A device the datapath already has (this service restarted, the datapath did not)
        // keeps its failed members failed: taking one back is for the import that builds it.
        if self.publisher.serves_pool(&name) {
            tracing::info!(pool = %name, "a failed member's drive is here, but the datapath serves the pool already: it is taken back when the pool is next imported by a starting node (or replaced)");
            return;
        }
        for (slot, m) in cfg.pool.members.iter().enumerate() {
            if m.state != MemberState::Failed {
                continue;
            }
            let Some(n) = self.drives.iter().position(|d| {
                d.pool == name && d.slot == slot as u32 && d.state == DriveState::Stale
            }) else {
                continue;
            };
            let same = probe(&mut self.drives[n].disk).is_some_and(|sb| {
                sb.pool_uuid == cfg.pool.uuid
                    && sb.drive_uuid == m.drive_uuid
                    && sb.member_slot == slot as u32
                    && sb.role == duplex_ondisk::superblock::Role::Data
            });
            if !same {
                continue;
            }
            let drive = self.drives[n].name.clone();
            // A parity member's stripe journal ring still holds the entries it took before it
            // failed, in a generation the others may still be in: replayed, they would put old
            // data back. The ring is zeroed (flushed) before the member is taken back.
            if let Some((offset, len)) = (cfg.pool.raid_level.parity() > 0)
                .then(|| (0..cfg.pool.members.len()).find_map(|s| self.pools[i].store.layout(s)))
                .flatten()
                .and_then(|l| l.stripe_journal())
            {
                if let Err(e) = zero_area(&mut self.drives[n].disk, offset, len) {
                    tracing::error!(pool = %name, slot, drive, error = %e, "a failed member came back but its stripe journal cannot be cleared: it stays out (`duplexctl pool replace` rebuilds onto another drive)");
                    continue;
                }
            }
            let disk = self.drives[n].disk.clone();
            self.changes += 1;
            match self.pools[i].store.replace_member(slot, disk, m.drive_uuid) {
                Ok(_) => {
                    self.drives[n].state = DriveState::Rebuilding;
                    self.pools[i].drives[slot] = self.drives[n].id;
                    self.pools[i].readded |= 1u64.checked_shl(slot as u32).unwrap_or(0);
                    tracing::warn!(pool = %name, slot, drive, "a failed member came back: committed rebuilding on its own drive (a mirror copies only the regions its write-intent bitmap marks)");
                }
                Err(e) => {
                    tracing::error!(pool = %name, slot, drive, error = %e, "a failed member came back but could not be taken back: it stays out (`duplexctl pool replace` rebuilds onto another drive)");
                }
            }
        }
    }

    /// `duplexctl pool import UUID [--force]`: a pool found on the drives but not imported at
    /// start. With `force`, its active members that are missing are failed in a new
    /// generation (written before the answer): a drive that comes back later is stale.
    fn import_request(&mut self, text: &str, force: bool) -> ConfigReply {
        if let Some(p) = self
            .pools
            .iter()
            .find(|p| p.store.config().pool.uuid.to_string() == text)
        {
            let name = &p.store.config().pool.name;
            return err(
                ConfigErrorKind::AlreadyExists,
                format!("pool {text} is imported already, as {name}"),
            );
        }
        let uuid = self
            .drives
            .iter_mut()
            .filter(|d| d.pool == text)
            .find_map(|d| probe(&mut d.disk).map(|sb| sb.pool_uuid))
            .filter(|u| u.to_string() == text);
        let Some(uuid) = uuid else {
            return err(
                ConfigErrorKind::NotFound,
                format!("no drive of this node holds pool {text} (`duplexctl drive list` names the pool of every drive)"),
            );
        };
        let i = match self.import(uuid, force) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(pool = %text, error = %e, "pool not imported: nothing was written to its drives");
                return store_err(e);
            }
        };
        // Active members the import did not find are failed now, on the drives.
        let mut cfg = self.pools[i].store.config().clone();
        let next = self.pools[i].store.stamp().generation + 1;
        let mut failed = Vec::new();
        for (slot, m) in cfg.pool.members.iter_mut().enumerate() {
            if self.pools[i].drives[slot] == MISSING && m.state != MemberState::Failed {
                m.state = MemberState::Failed;
                m.changed_generation = next;
                failed.push(slot.to_string());
            }
        }
        let name = cfg.pool.name.clone();
        if !failed.is_empty() {
            if let Err(e) = self.pools[i].store.commit(cfg) {
                self.pools.remove(i);
                return store_err(e);
            }
            tracing::warn!(pool = %name, members = %failed.join(","), "missing members failed by a forced import");
        }
        if let Err(e) = self.publish_all() {
            return err(
                ConfigErrorKind::IoError,
                format!("pool {name} imported, but publishing it failed: {e}"),
            );
        }
        if failed.is_empty() {
            done(format!("imported pool {name} ({text})"))
        } else {
            done(format!(
                "imported pool {name} ({text}) degraded: missing member slot(s) {} failed",
                failed.join(", ")
            ))
        }
    }

    /// Publishes every pool's device, the volume maps and the exports.
    fn publish_all(&mut self) -> Result<(), String> {
        for i in 0..self.pools.len() {
            self.publish_pool(i)?;
        }
        self.publish_volumes()?;
        self.publish_exports()
    }

    /// The epoch of the maps published: the newest ownership epoch of any pool this node knows
    /// (its own and the peer's, so that moving a pool away never lowers it).
    fn epoch(&self) -> u64 {
        self.configs().map(|c| c.ownership.epoch).max().unwrap_or(0)
    }

    fn publish_pool(&mut self, i: usize) -> Result<(), String> {
        // A mirror pool's first publish in this process leases write sequence numbers: the
        // mark is committed before the datapath may number a write with them.
        if self.pools[i].seq.is_none() {
            let mut cfg = self.pools[i].store.config().clone();
            if let Some(lease) = lease_seq(&mut cfg, 0) {
                self.changes += 1;
                self.pools[i]
                    .store
                    .commit(cfg)
                    .map_err(|e| format!("committing its write sequence mark failed: {e}"))?;
                self.pools[i].seq = Some(lease);
                tracing::info!(pool = %self.pools[i].store.config().pool.name, first = lease.0, mark = lease.1, "write sequence numbers leased");
            }
        }
        let epoch = self.epoch();
        let p = &self.pools[i];
        let cfg = p.store.config();
        let layout = (0..cfg.pool.members.len())
            .find_map(|s| p.store.layout(s))
            .ok_or_else(|| format!("pool {}: no member is open", cfg.pool.name))?;
        let spec = PoolPublish {
            name: cfg.pool.name.clone(),
            level: cfg.pool.raid_level,
            chunk: u64::from(cfg.pool.chunk_size),
            data_offset: layout.data_offset,
            data_len: cfg.pool.member_data_bytes,
            drives: p.drives.clone(),
            failed: cfg
                .pool
                .members
                .iter()
                .zip(&p.drives)
                .map(|(m, &d)| d == MISSING || matches!(m.state, MemberState::Failed))
                .collect(),
            rebuilding: cfg
                .pool
                .members
                .iter()
                .zip(&p.drives)
                .enumerate()
                .map(|(slot, (m, &d))| match m.state {
                    MemberState::Rebuilding { position } if d != MISSING => Some(
                        position.saturating_mul(u64::from(p.store.block_size(slot).unwrap_or(0))),
                    ),
                    _ => None,
                })
                .collect(),
            journal: (cfg.pool.raid_level.parity() > 0)
                .then(|| layout.stripe_journal())
                .flatten()
                .map(|(offset, len)| (offset, len, journal_tag(&cfg.pool.uuid))),
            bitmap: matches!(cfg.pool.raid_level, RaidLevel::Raid1 | RaidLevel::Raid10)
                .then(|| layout.write_intent())
                .flatten()
                .map(|(offset, len)| (offset, len, journal_tag(&cfg.pool.uuid))),
            seq_base: p.seq.map_or(0, |s| s.0),
            seq_limit: p.seq.map_or(0, |s| s.1),
            resync_members: p.readded,
            checksum: cfg.checksum_area.map(|a| (a.offset, a.len)),
            // Only a device built now resyncs (the datapath ignores it for one it has).
            resync: p.imported,
        };
        let device = self.publisher.publish_pool(epoch, &spec)?;
        self.pools[i].device = Some(device);
        Ok(())
    }

    fn volume_maps(&self) -> Vec<VolumePublish> {
        let mut out = Vec::new();
        for p in &self.pools {
            let Some(device) = p.device else { continue };
            if self.moving == Some(p.store.config().pool.uuid) {
                continue;
            }
            for v in &p.store.config().volumes {
                let bs = u64::from(v.block_size);
                out.push(VolumePublish {
                    id: volume_id(&v.uuid),
                    name: v.name.clone(),
                    block_size: v.block_size,
                    blocks: v.size_blocks,
                    extents: v
                        .extents
                        .iter()
                        .map(|e| (e.volume_block, e.blocks, device, e.pool_block * bs))
                        .collect(),
                });
            }
        }
        out
    }

    fn publish_volumes(&mut self) -> Result<(), String> {
        let maps = self.volume_maps();
        let epoch = self.epoch();
        self.publisher.publish_volumes(epoch, &maps)
    }

    /// Keeps hosts' secrets sealed with `key` from now on.
    pub fn set_secrets_key(&mut self, key: duplex_ondisk::secrets::SecretsKey) {
        self.secrets_key = Some(key);
    }

    /// `given` merged with what `host` already has on `nqn`: each kind given (the DH-HMAC-CHAP
    /// pair, the TLS PSK) replaces the one stored, a kind not given is kept — giving a host a
    /// TLS PSK never drops its DH-HMAC-CHAP secrets (which would let it in unauthenticated on
    /// plain listeners). Stored keys this node cannot unseal are not guessed at: refused.
    fn merged_secrets(
        &self,
        nqn: &str,
        host: &str,
        given: duplex_ipc::config::HostSecrets,
    ) -> Result<duplex_ipc::config::HostSecrets, ConfigReply> {
        let wide = self.cluster_wide();
        let Some(stored) = wide
            .host_secrets
            .iter()
            .find(|h| h.subnqn == nqn && h.hostnqn == host)
        else {
            return Ok(given);
        };
        let old = self
            .secrets_key
            .as_ref()
            .map(|k| duplex_ondisk::secrets::unseal(k, nqn, host, &stored.sealed));
        let old = match old {
            Some(Ok(keys)) => keys,
            Some(Err(e)) => {
                return Err(err(
                    ConfigErrorKind::Refused,
                    format!(
                        "the host's stored keys cannot be unsealed ({e}): deny the host and \
                         allow it again with all its keys"
                    ),
                ))
            }
            // No key: seal() refuses with the reason.
            None => return Ok(given),
        };
        let (host_secret, ctrl) = match given.host {
            Some(h) => (Some(h), given.ctrl),
            None => (old.dhchap, old.dhchap_ctrl),
        };
        Ok(duplex_ipc::config::HostSecrets {
            host: host_secret,
            ctrl,
            tls_psk: given.tls_psk.or(old.tls_psk),
        })
    }

    /// `secrets` checked and sealed for `host` on `nqn`, or the error to answer.
    fn seal(
        &self,
        nqn: &str,
        host: &str,
        secrets: &duplex_ipc::config::HostSecrets,
    ) -> Result<Vec<u8>, ConfigReply> {
        let bad = |which: &str, e: duplex_nvme::auth::SecretError| {
            err(
                ConfigErrorKind::InvalidArgument,
                format!("the {which} DH-HMAC-CHAP secret: {e}"),
            )
        };
        if let Some(h) = &secrets.host {
            duplex_nvme::auth::Secret::parse(h).map_err(|e| bad("host's", e))?;
        }
        if let Some(c) = &secrets.ctrl {
            duplex_nvme::auth::Secret::parse(c).map_err(|e| bad("controller's", e))?;
            if Some(c) == secrets.host.as_ref() {
                return Err(err(
                    ConfigErrorKind::InvalidArgument,
                    "the controller's secret is the host's: give each its own (a host could \
                     otherwise answer for the controller)",
                ));
            }
        }
        if let Some(t) = &secrets.tls_psk {
            let k = duplex_nvme::tls::ConfiguredKey::parse(t).map_err(|e| {
                err(
                    ConfigErrorKind::InvalidArgument,
                    format!("the host's TLS PSK: {e}"),
                )
            })?;
            if k.psk_hash() != duplex_nvme::tls::PskHash::Sha256 {
                return Err(err(
                    ConfigErrorKind::InvalidArgument,
                    "the host's TLS PSK is a SHA-384 key: only SHA-256 PSKs \
                     (NVMeTLSkey-1:01:, TLS_AES_128_GCM_SHA256) are supported",
                ));
            }
        }
        let Some(key) = &self.secrets_key else {
            return Err(err(
                ConfigErrorKind::Refused,
                "this node has no secrets key ([secrets] key_file in its node config; the same \
                 on both controllers): a host's DH-HMAC-CHAP secrets and TLS PSK are never \
                 stored in clear",
            ));
        };
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| {
            err(
                ConfigErrorKind::IoError,
                format!("no random bytes for sealing the secrets: {e}"),
            )
        })?;
        let keys = duplex_ondisk::secrets::HostKeys {
            dhchap: secrets.host.clone(),
            dhchap_ctrl: secrets.ctrl.clone(),
            tls_psk: secrets.tls_psk.clone(),
        };
        Ok(duplex_ondisk::secrets::seal(key, nqn, host, &keys, nonce))
    }

    /// The cluster's subsystems: the copy with the highest cluster generation.
    fn subsystems(&self) -> (u64, Vec<duplex_ondisk::Subsystem>) {
        let w = self.cluster_wide();
        (w.generation, w.subsystems)
    }

    /// What every pool's image carries of the cluster (the subsystems, their hosts' sealed
    /// secrets): the copy with the highest cluster generation.
    fn cluster_wide(&self) -> ClusterWide {
        self.configs()
            .max_by_key(|c| c.cluster_generation)
            .map(|c| ClusterWide {
                generation: c.cluster_generation,
                subsystems: c.subsystems.clone(),
                host_secrets: c.host_secrets.clone(),
            })
            .unwrap_or_default()
    }

    /// `base` with the winning copy of what is cluster-wide.
    fn with_cluster_wide(&self, mut base: PoolConfig) -> PoolConfig {
        let w = self.cluster_wide();
        base.cluster_generation = w.generation;
        base.subsystems = w.subsystems;
        base.host_secrets = w.host_secrets;
        base
    }

    fn export_table(&self) -> Vec<ExportSubsystem> {
        let wide = self.cluster_wide();
        wide.subsystems
            .clone()
            .into_iter()
            .map(|s| {
                let mut namespaces: Vec<ExportNamespace> = self
                    .configs()
                    .flat_map(|c| {
                        c.namespaces
                            .iter()
                            .filter(|n| n.subsystem_nqn == s.nqn)
                            .filter_map(|n| {
                                let v = c.volumes.iter().find(|v| v.uuid == n.volume_uuid)?;
                                Some(ExportNamespace {
                                    nsid: n.nsid,
                                    volume: volume_id(&v.uuid),
                                    block_size: v.block_size,
                                    blocks: v.size_blocks,
                                    nguid: v.nguid,
                                    uuid: v.uuid.0,
                                    ana_group: n.ana_group,
                                })
                            })
                    })
                    .collect();
                namespaces.sort_by_key(|n| n.nsid);
                let secrets = wide
                    .host_secrets
                    .iter()
                    .filter(|h| h.subnqn == s.nqn)
                    .map(|h| duplex_ipc::exports::ExportSecret {
                        host: h.hostnqn.clone(),
                        sealed: h.sealed.clone(),
                    })
                    .collect();
                ExportSubsystem {
                    nqn: s.nqn,
                    serial: s.serial,
                    model: s.model,
                    allow_any_host: s.allow_any_host,
                    hosts: s.hosts,
                    secrets,
                    namespaces,
                }
            })
            .collect()
    }

    /// Every pool's configuration: this node's, then the peer's.
    fn configs(&self) -> impl Iterator<Item = &PoolConfig> {
        self.pools
            .iter()
            .map(|p| p.store.config())
            .chain(self.peer_pools.iter().map(|p| &p.config))
    }

    fn publish_exports(&mut self) -> Result<(), String> {
        let table = self.export_table();
        let ana = self.ana_states(&table);
        let reservations = self.export_reservations(&table);
        self.publisher.publish_exports(table, ana, reservations)
    }

    /// The reservation state kept with the pools (ONDISK record 10) of every namespace the
    /// table exports, by the NGUID of the volume it exports.
    fn export_reservations(
        &self,
        table: &[ExportSubsystem],
    ) -> Vec<duplex_ipc::exports::ExportReservation> {
        let exported: std::collections::HashSet<[u8; 16]> = table
            .iter()
            .flat_map(|s| s.namespaces.iter().map(|n| n.nguid))
            .collect();
        self.configs()
            .flat_map(|c| {
                c.reservations.iter().filter_map(move |r| {
                    let n = c
                        .namespaces
                        .iter()
                        .find(|n| n.subsystem_nqn == r.subnqn && n.nsid == r.nsid)?;
                    let v = c.volumes.iter().find(|v| v.uuid == n.volume_uuid)?;
                    Some(duplex_ipc::exports::ExportReservation {
                        nguid: v.nguid,
                        version: r.version,
                        generation: r.generation,
                        rtype: r.rtype,
                        ptpl: r.ptpl,
                        holder: r.holder,
                        registrants: r
                            .registrants
                            .iter()
                            .map(|g| duplex_ipc::exports::ExportRegistrant {
                                host_id: g.host_id,
                                key: g.key,
                                cntlid: g.cntlid,
                            })
                            .collect(),
                    })
                })
            })
            .filter(|r| exported.contains(&r.nguid))
            .collect()
    }

    /// The ANA state of every group the table's namespaces name: optimized for the pools this
    /// node owns, inaccessible for the peer's.
    fn ana_states(&self, table: &[ExportSubsystem]) -> Vec<AnaGroupState> {
        let peer_groups: Vec<u32> = self
            .peer_pools
            .iter()
            .flat_map(|p| p.config.namespaces.iter().map(|n| n.ana_group))
            .collect();
        let moving_groups: Vec<u32> = self
            .pools
            .iter()
            .map(|p| p.store.config())
            .filter(|c| Some(c.pool.uuid) == self.moving)
            .flat_map(|c| c.namespaces.iter().map(|n| n.ana_group))
            .collect();
        let mut groups: Vec<u32> = table
            .iter()
            .flat_map(|s| s.namespaces.iter().map(|n| n.ana_group))
            .collect();
        groups.sort_unstable();
        groups.dedup();
        groups
            .into_iter()
            .map(|group| AnaGroupState {
                group,
                state: if moving_groups.contains(&group) {
                    AnaState::Change
                } else if peer_groups.contains(&group) {
                    AnaState::Inaccessible
                } else {
                    AnaState::Optimized
                },
            })
            .collect()
    }

    /// The ANA group of pool `i`'s namespaces: one group per pool, so that a pool moves
    /// between controllers as one ANA group. The group its namespaces have already; for a pool
    /// without namespaces, the lowest group no other pool's namespaces use.
    fn pool_group(&self, i: usize) -> u32 {
        if let Some(n) = self.pools[i].store.config().namespaces.first() {
            return n.ana_group;
        }
        let used: Vec<u32> = self
            .pools
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .flat_map(|(_, p)| p.store.config().namespaces.iter().map(|n| n.ana_group))
            .chain(
                self.peer_pools
                    .iter()
                    .flat_map(|p| p.config.namespaces.iter().map(|n| n.ana_group)),
            )
            .collect();
        (1..=MAX_ANA_GROUP)
            .find(|g| !used.contains(g))
            .unwrap_or(self.ana_group)
    }

    /// A fresh UUID (random, from the process's random hash keys and a counter).
    fn new_uuid(&mut self) -> Uuid {
        let mut out = [0u8; 16];
        for half in 0..2 {
            self.counter += 1;
            let mut h = self.random.build_hasher();
            h.write_u64(self.counter);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            out[half * 8..half * 8 + 8].copy_from_slice(&h.finish().to_le_bytes());
        }
        // RFC 9562 version 4, variant 10.
        out[6] = (out[6] & 0x0f) | 0x40;
        out[8] = (out[8] & 0x3f) | 0x80;
        Uuid(out)
    }

    /// Where decisions are published.
    pub fn publisher(&self) -> &P {
        &self.publisher
    }

    /// Where decisions are published (to receive its events).
    pub fn publisher_mut(&mut self) -> &mut P {
        &mut self.publisher
    }

    /// Answers one request. See the module docs.
    pub fn handle(&mut self, req: ConfigRequest) -> ConfigReply {
        match req {
            ConfigRequest::ListDrives => {
                let integrity = self.publisher.integrity();
                ConfigReply::Drives(self.drive_infos(&integrity))
            }
            ConfigRequest::ListPools => {
                let progress = self.progress();
                ConfigReply::Pools(self.pool_infos(&progress))
            }
            ConfigRequest::ScrubPool(name) => self.scrub_pool(&name),
            ConfigRequest::ShowPool(name) => {
                let progress = self.progress();
                let pools: Vec<PoolInfo> = self
                    .pool_infos(&progress)
                    .into_iter()
                    .filter(|p| p.name == name)
                    .collect();
                if pools.is_empty() {
                    err(ConfigErrorKind::NotFound, format!("no pool {name}"))
                } else {
                    ConfigReply::Pools(pools)
                }
            }
            ConfigRequest::ListVolumes => ConfigReply::Volumes(self.volume_page("")),
            ConfigRequest::ListVolumesAfter(after) => {
                ConfigReply::Volumes(self.volume_page(&after))
            }
            ConfigRequest::ListSubsystems => ConfigReply::Subsystems(self.subsystem_infos()),
            ConfigRequest::CreatePool {
                name,
                raid,
                drives,
                chunk_bytes,
            } => self.create_pool(&name, raid_from(raid), &drives, chunk_bytes),
            ConfigRequest::DestroyPool { name, force } => self.destroy_pool(&name, force),
            ConfigRequest::MovePool { name, node } => self.move_pool(&name, node),
            ConfigRequest::ReplaceMember { pool, old, new } => {
                self.replace_member(&pool, &old, &new)
            }
            ConfigRequest::SetPoolRate { pool, rate } => self.set_pool_rate(&pool, rate),
            ConfigRequest::AddSpare { pool, drive } => self.add_spare(&pool, &drive),
            ConfigRequest::ImportPool { pool, force } => self.import_request(&pool, force),
            ConfigRequest::CreateVolume {
                name,
                pool,
                size_bytes,
            } => self.create_volume(&name, &pool, size_bytes),
            ConfigRequest::ResizeVolume { name, size_bytes } => self
                .in_volume_pool(&name, |cfg| ops::resize_volume(cfg, &name, size_bytes))
                .unwrap_or_else(|r| r),
            ConfigRequest::DeleteVolume(name) => self
                .in_volume_pool(&name, |cfg| ops::delete_volume(cfg, &name))
                .unwrap_or_else(|r| r),
            ConfigRequest::CreateSubsystem(nqn) => {
                let serial = serial_of(&nqn);
                self.everywhere(&format!("subsystem {nqn} created"), |cfg| {
                    ops::create_subsystem(cfg, &nqn, &serial, MODEL)
                })
            }
            ConfigRequest::DeleteSubsystem(nqn) => self
                .everywhere(&format!("subsystem {nqn} deleted"), |cfg| {
                    ops::delete_subsystem(cfg, &nqn)
                }),
            ConfigRequest::AllowHost {
                nqn,
                host_nqn,
                secrets,
            } => {
                let what = match &secrets {
                    None => format!("host {host_nqn} allowed on {nqn}"),
                    Some(sec) => format!(
                        "host {host_nqn} allowed on {nqn} with {}",
                        match (sec.host.is_some(), sec.tls_psk.is_some()) {
                            (true, true) => "DH-HMAC-CHAP secrets and a TLS PSK",
                            (true, false) => "DH-HMAC-CHAP secrets",
                            _ => "a TLS PSK",
                        }
                    ),
                };
                let secrets = match secrets.map(|sec| self.merged_secrets(&nqn, &host_nqn, sec)) {
                    None => None,
                    Some(Ok(sec)) => Some(sec),
                    Some(Err(reply)) => return reply,
                };
                let sealed = match secrets.map(|sec| self.seal(&nqn, &host_nqn, &sec)) {
                    None => None,
                    Some(Ok(sealed)) => Some(sealed),
                    Some(Err(reply)) => return reply,
                };
                self.everywhere(&what, |cfg| {
                    ops::allow_host(cfg, &nqn, &host_nqn, sealed.as_deref())
                })
            }
            ConfigRequest::DenyHost { nqn, host_nqn } => self
                .everywhere(&format!("host {host_nqn} denied on {nqn}"), |cfg| {
                    ops::deny_host(cfg, &nqn, &host_nqn)
                }),
            ConfigRequest::AllowAnyHost { nqn, any } => self.everywhere(
                &format!(
                    "{} host may connect to {nqn}",
                    if any { "any" } else { "only an allowed" }
                ),
                |cfg| ops::allow_any_host(cfg, &nqn, any),
            ),
            ConfigRequest::AddNamespace { nqn, volume, nsid } => {
                self.add_namespace(&nqn, &volume, nsid)
            }
            ConfigRequest::RemoveNamespace { nqn, nsid } => {
                let Some(i) = self.pools.iter().position(|p| {
                    p.store
                        .config()
                        .namespaces
                        .iter()
                        .any(|n| n.subsystem_nqn == nqn && n.nsid == nsid)
                }) else {
                    if self.subsystems().1.iter().all(|s| s.nqn != nqn) {
                        return err(ConfigErrorKind::NotFound, format!("no subsystem {nqn}"));
                    }
                    return err(
                        ConfigErrorKind::NotFound,
                        format!("subsystem {nqn} has no namespace {nsid}"),
                    );
                };
                match ops::remove_namespace(self.pools[i].store.config(), &nqn, nsid) {
                    Ok(cfg) => self.commit_and_publish(
                        i,
                        cfg,
                        format!("namespace {nsid} removed from {nqn}"),
                    ),
                    Err(e) => op_err(e),
                }
            }
        }
    }

    /// Carries out a host's reservation command (from the fabric): applied to the namespace's
    /// state kept with its pool, committed to the pool's drives, published in the export
    /// table, then answered. A namespace of a pool the peer owns is `NotOwner` (the host uses
    /// the owner's path); a refusal of the reservation model changes nothing.
    pub fn reservation(
        &mut self,
        req: &duplex_ipc::resv::ResvRequest,
    ) -> duplex_ipc::resv::ResvReply {
        use crate::resv::{apply, has_namespace, Applied};
        use duplex_ipc::resv::ResvReply;
        let Some(i) = self
            .pools
            .iter()
            .position(|p| has_namespace(p.store.config(), &req.subnqn, req.nsid))
        else {
            if self
                .peer_pools
                .iter()
                .any(|p| has_namespace(&p.config, &req.subnqn, req.nsid))
            {
                return ResvReply::NotOwner;
            }
            return ResvReply::Error(format!(
                "no namespace {} of {} on this node",
                req.nsid, req.subnqn
            ));
        };
        match apply(self.pools[i].store.config(), req) {
            Applied::Answer(a) => a,
            Applied::Commit(mut cfg, mut done) => {
                // Versions follow the pool's commits, so they only grow, also for a namespace
                // removed and added again (its record starts afresh; a fabric may still hold
                // the old one's version).
                let version = done
                    .state
                    .version
                    .max(self.pools[i].store.stamp().generation + 1);
                done.state.version = version;
                if let Some(r) = cfg
                    .reservations
                    .iter_mut()
                    .find(|r| r.subnqn == req.subnqn && r.nsid == req.nsid)
                {
                    r.version = version;
                }
                let pool = self.pools[i].store.config().pool.name.clone();
                if let Err(e) = self.commit_pool(i, *cfg) {
                    tracing::error!(%pool, error = %e, "a reservation change could not be committed");
                    return ResvReply::Error(format!(
                        "the reservation change could not be committed to pool {pool}: {e}"
                    ));
                }
                tracing::info!(%pool, subnqn = %req.subnqn, nsid = req.nsid,
                    command = req.command.name(), version = done.state.version,
                    generation = done.state.generation, "reservation state committed");
                if let Err(e) = self.publish_exports() {
                    // On the drives already; the fabric takes the state from the answer.
                    tracing::warn!(%pool, error = %e, "publishing the export table failed");
                }
                ResvReply::Done(done)
            }
        }
    }

    /// A power on of this node's pools (the node booted and imported them: no controller
    /// served their namespaces meanwhile): the reservation state of every namespace without
    /// Persist Through Power Loss is cleared, as the specification asks of a power loss, and
    /// committed. Returns how many namespaces lost their state. Not called for a takeover (the
    /// peer served them until it died) nor for a restart of this service within a boot.
    pub fn power_on_reservations(&mut self) -> usize {
        let mut cleared = 0;
        for i in 0..self.pools.len() {
            let cfg = self.pools[i].store.config();
            let held = |r: &&duplex_ondisk::Reservation| {
                !r.ptpl && (r.rtype != 0 || !r.registrants.is_empty())
            };
            let gone = cfg.reservations.iter().filter(held).count();
            if gone == 0 {
                continue;
            }
            let floor = self.pools[i].store.stamp().generation + 1;
            let mut next = cfg.clone();
            // Registrants and the reservation go; the generation stays (hosts compare it).
            for r in next.reservations.iter_mut().filter(|r| !r.ptpl) {
                if r.rtype != 0 || !r.registrants.is_empty() {
                    r.rtype = 0;
                    r.holder = [0; 16];
                    r.registrants.clear();
                    r.version = (r.version + 1).max(floor);
                }
            }
            let pool = next.pool.name.clone();
            match self.commit_pool(i, next) {
                Ok(()) => {
                    cleared += gone;
                    tracing::info!(%pool, namespaces = gone,
                        "power on: reservation state without Persist Through Power Loss cleared");
                }
                Err(e) => {
                    tracing::error!(%pool, error = %e,
                        "power on: clearing reservation state without Persist Through Power Loss failed; it stays");
                }
            }
        }
        if cleared > 0 {
            if let Err(e) = self.publish_exports() {
                tracing::warn!(error = %e, "publishing the export table failed");
            }
        }
        cleared
    }

    /// The refusal for a change to `pool`, a pool the peer owns (`None`: not one).
    fn peer_owned_pool(&self, pool: &str) -> Option<ConfigReply> {
        let p = self
            .peer_pools
            .iter()
            .find(|p| p.config.pool.name == pool)?;
        let owner = p.config.ownership.owner_node + 1;
        Some(err(
            ConfigErrorKind::Refused,
            format!(
                "pool {pool} is owned by node {owner}: make this change there (`duplexctl` on node {owner}); this node serves it only if node {owner} fails or moves it here"
            ),
        ))
    }

    /// The refusal for a change to `volume`, a volume of a pool the peer owns (`None`: not
    /// one).
    fn peer_owned_volume(&self, volume: &str) -> Option<ConfigReply> {
        let p = self
            .peer_pools
            .iter()
            .find(|p| p.config.volumes.iter().any(|v| v.name == volume))?;
        let owner = p.config.ownership.owner_node + 1;
        Some(err(
            ConfigErrorKind::Refused,
            format!(
                "volume {volume} is in pool {}, owned by node {owner}: make this change there (`duplexctl` on node {owner})",
                p.config.pool.name
            ),
        ))
    }

    /// Commits `cfg` to pool `i`. A member that failed during the commit is failed in it (see
    /// `PoolStore::commit`); the datapath's RAID device is told at once, so it stops using a
    /// member the drives now record as failed.
    fn commit_pool(&mut self, i: usize, cfg: PoolConfig) -> Result<(), StoreError> {
        let before: Vec<MemberState> = cfg.pool.members.iter().map(|m| m.state).collect();
        self.changes += 1;
        self.pools[i].store.commit(cfg)?;
        let after = &self.pools[i].store.config().pool.members;
        if after.iter().map(|m| m.state).ne(before.iter().copied()) {
            if let Err(e) = self.publish_pool(i) {
                tracing::error!(pool = %self.pools[i].store.config().pool.name, error = %e,
                    "members failed during a commit; telling the datapath failed");
            }
        }
        Ok(())
    }

    /// Commits `cfg` to pool `i`, then publishes maps and exports.
    fn commit_and_publish(&mut self, i: usize, cfg: PoolConfig, message: String) -> ConfigReply {
        if let Err(e) = self.commit_pool(i, cfg) {
            return store_err(e);
        }
        if let Err(e) = self.publish_volumes().and_then(|()| self.publish_exports()) {
            // The change is on the drives; the datapath or fabric did not take it (they get
            // everything again when they or this service restart).
            return err(
                ConfigErrorKind::IoError,
                format!("{message}, but publishing it failed: {e}"),
            );
        }
        done(message)
    }

    /// Applies a cluster-wide change (subsystems, hosts) to every pool, with the cluster
    /// generation + 1.
    fn everywhere(
        &mut self,
        message: &str,
        change: impl Fn(&PoolConfig) -> Result<PoolConfig, OpError>,
    ) -> ConfigReply {
        if self.pools.is_empty() {
            if let Some(p) = self.peer_pools.first() {
                let owner = p.config.ownership.owner_node + 1;
                return err(
                    ConfigErrorKind::Refused,
                    format!(
                        "subsystems and hosts are stored on the pools' drives, and every pool is owned by node {owner}: make this change there (`duplexctl` on node {owner})"
                    ),
                );
            }
            return err(
                ConfigErrorKind::NotReady,
                "no pool: subsystems and hosts are stored on the pools' drives; create a pool first",
            );
        }
        let generation = self.cluster_wide().generation;
        let mut changed = Vec::new();
        for p in &self.pools {
            // Every pool gets the winning copy of the subsystems before the change.
            let base = self.with_cluster_wide(p.store.config().clone());
            match change(&base) {
                Ok(mut cfg) => {
                    cfg.cluster_generation = generation + 1;
                    changed.push(cfg);
                }
                Err(e) => return op_err(e),
            }
        }
        // Namespaces of other pools may name a subsystem being deleted.
        for (i, cfg) in changed.iter().enumerate() {
            for (j, p) in self.pools.iter().enumerate() {
                if i == j {
                    continue;
                }
                if let Some(n) = p
                    .store
                    .config()
                    .namespaces
                    .iter()
                    .find(|n| cfg.subsystems.iter().all(|s| s.nqn != n.subsystem_nqn))
                {
                    return err(
                        ConfigErrorKind::InUse,
                        format!(
                            "subsystem {} has namespace {}: remove its namespaces first",
                            n.subsystem_nqn, n.nsid
                        ),
                    );
                }
            }
        }
        for (i, cfg) in changed.into_iter().enumerate() {
            if let Err(e) = self.commit_pool(i, cfg) {
                return store_err(e);
            }
        }
        if let Err(e) = self.publish_exports() {
            return err(
                ConfigErrorKind::IoError,
                format!("{message}, but publishing it failed: {e}"),
            );
        }
        done(message.to_owned())
    }

    fn in_volume_pool(
        &mut self,
        name: &str,
        change: impl Fn(&PoolConfig) -> Result<PoolConfig, OpError>,
    ) -> Result<ConfigReply, ConfigReply> {
        let i = self
            .pools
            .iter()
            .position(|p| p.store.config().volumes.iter().any(|v| v.name == name))
            .ok_or_else(|| {
                self.peer_owned_volume(name)
                    .unwrap_or_else(|| err(ConfigErrorKind::NotFound, format!("no volume {name}")))
            })?;
        let cfg = change(self.pools[i].store.config()).map_err(op_err)?;
        let size = cfg
            .volumes
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.size_blocks * u64::from(v.block_size));
        let message = match size {
            Some(s) => format!("volume {name} is {}", ops::human(s)),
            None => format!("volume {name} deleted"),
        };
        Ok(self.commit_and_publish(i, cfg, message))
    }

    fn create_pool(
        &mut self,
        name: &str,
        level: RaidLevel,
        drives: &[String],
        chunk: u32,
    ) -> ConfigReply {
        if let Err(e) = ops::check_name("Pool", name) {
            return op_err(e);
        }
        if self
            .pools
            .iter()
            .any(|p| p.store.config().pool.name == name)
        {
            return err(
                ConfigErrorKind::AlreadyExists,
                format!("pool {name} exists"),
            );
        }
        let chunk = if chunk == 0 { DEFAULT_CHUNK } else { chunk };
        let need = match level {
            RaidLevel::Raid0 => !drives.is_empty(),
            RaidLevel::Raid1 => drives.len() >= 2,
            RaidLevel::Raid10 => drives.len() >= 4 && drives.len() % 2 == 0,
            RaidLevel::Raid5 => drives.len() >= 3,
            RaidLevel::Raid6 => drives.len() >= 4,
        };
        if !need {
            return err(
                ConfigErrorKind::InvalidArgument,
                format!(
                    "{level} needs {}; {} given",
                    match level {
                        RaidLevel::Raid0 => "at least 1 drive",
                        RaidLevel::Raid1 => "at least 2 drives",
                        RaidLevel::Raid10 => "an even number of drives, at least 4",
                        RaidLevel::Raid5 => "at least 3 drives",
                        RaidLevel::Raid6 => "at least 4 drives",
                    },
                    drives.len()
                ),
            );
        }
        let mut idx = Vec::new();
        for d in drives {
            let Some(i) = self.drives.iter().position(|x| &x.name == d) else {
                return err(ConfigErrorKind::NotFound, format!("no drive {d}"));
            };
            if idx.contains(&i) {
                return err(
                    ConfigErrorKind::InvalidArgument,
                    format!("drive {d} named twice"),
                );
            }
            let x = &self.drives[i];
            if x.state != DriveState::Free {
                return err(
                    ConfigErrorKind::InUse,
                    format!(
                        "drive {d} is not free ({}{})",
                        x.state.name(),
                        if x.pool.is_empty() {
                            String::new()
                        } else {
                            format!(" in pool {}", x.pool)
                        }
                    ),
                );
            }
            idx.push(i);
        }
        if self.cluster_uuid.is_nil() {
            self.cluster_uuid = self.new_uuid();
        }
        let ClusterWide {
            generation,
            subsystems,
            host_secrets,
        } = self.cluster_wide();
        let uuid = self.new_uuid();
        let drive_uuids: Vec<Uuid> = idx.iter().map(|_| self.new_uuid()).collect();
        let records = idx.iter().all(|&i| self.drives[i].records);
        let spec = FormatSpec {
            name: name.to_owned(),
            uuid,
            level,
            chunk_size: chunk,
            cluster_uuid: self.cluster_uuid,
            node: self.node,
            drive_uuids,
            subsystems,
            host_secrets,
            cluster_generation: generation,
            checksum_area: crate::store::needs_checksum_area(level, records),
        };
        let disks: Vec<D> = idx.iter().map(|&i| self.drives[i].disk.clone()).collect();
        match PoolStore::format(&spec, disks) {
            Ok(store) => {
                let ids: Vec<u32> = idx.iter().map(|&i| self.drives[i].id).collect();
                for (slot, &i) in idx.iter().enumerate() {
                    let d = &mut self.drives[i];
                    d.state = DriveState::Active;
                    d.pool = name.to_owned();
                    d.slot = slot as u32;
                }
                self.pools.push(PoolEntry {
                    store,
                    device: None,
                    drives: ids,
                    seq: None,
                    imported: false,
                    readded: 0,
                });
                let i = self.pools.len() - 1;
                if let Err(e) = self.publish_pool(i) {
                    return err(
                        ConfigErrorKind::IoError,
                        format!("pool {name} created, but the datapath did not take it: {e}"),
                    );
                }
                let capacity = ops::capacity(self.pools[i].store.config());
                ConfigReply::Done(duplex_ipc::config::Done {
                    message: format!(
                        "pool {name} created: {level} over {} drives, {} usable",
                        idx.len(),
                        ops::human(capacity)
                    ),
                    nsid: 0,
                    uuid: uuid.to_string(),
                })
            }
            Err(e) => store_err(e),
        }
    }

    fn destroy_pool(&mut self, name: &str, force: bool) -> ConfigReply {
        let Some(i) = self
            .pools
            .iter()
            .position(|p| p.store.config().pool.name == name)
        else {
            return self
                .peer_owned_pool(name)
                .unwrap_or_else(|| err(ConfigErrorKind::NotFound, format!("no pool {name}")));
        };
        let cfg = self.pools[i].store.config();
        if !cfg.volumes.is_empty() && !force {
            return err(
                ConfigErrorKind::InUse,
                format!(
                    "pool {name} has {} volume(s): delete them, or destroy with --force",
                    cfg.volumes.len()
                ),
            );
        }
        if self.pools[i].device.is_some() {
            return err(
                ConfigErrorKind::Refused,
                format!("pool {name} is served by the datapath, and this build cannot take a pool out of a running datapath yet"),
            );
        }
        let entry = self.pools.remove(i);
        match entry.store.destroy() {
            Ok(disks) => {
                for disk in disks {
                    if let Some(d) = self.drives.iter_mut().find(|d| d.address == disk.label()) {
                        d.state = DriveState::Free;
                        d.pool.clear();
                        d.slot = 0;
                    }
                }
                let _ = self.publish_volumes().and_then(|()| self.publish_exports());
                done(format!("pool {name} destroyed"))
            }
            Err(e) => store_err(e),
        }
    }

    fn create_volume(&mut self, name: &str, pool: &str, size: u64) -> ConfigReply {
        let Some(i) = self
            .pools
            .iter()
            .position(|p| p.store.config().pool.name == pool)
        else {
            return self
                .peer_owned_pool(pool)
                .unwrap_or_else(|| err(ConfigErrorKind::NotFound, format!("no pool {pool}")));
        };
        let taken: Vec<String> = self
            .pools
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, p)| p.store.config().volumes.iter().map(|v| v.name.clone()))
            .collect();
        let ids: Vec<u32> = self
            .pools
            .iter()
            .flat_map(|p| p.store.config().volumes.iter().map(|v| volume_id(&v.uuid)))
            .collect();
        let mut uuid = self.new_uuid();
        while ids.contains(&volume_id(&uuid)) {
            uuid = self.new_uuid();
        }
        let mut nguid = self.new_uuid().0;
        nguid[..8].copy_from_slice(&uuid.0[..8]);
        let cfg = match ops::create_volume(
            self.pools[i].store.config(),
            name,
            size,
            4096,
            uuid,
            nguid,
            &taken,
        ) {
            Ok(c) => c,
            Err(e) => return op_err(e),
        };
        match self.commit_and_publish(
            i,
            cfg,
            format!("volume {name} created in {pool}: {}", ops::human(size)),
        ) {
            ConfigReply::Done(mut d) => {
                d.uuid = uuid.to_string();
                ConfigReply::Done(d)
            }
            other => other,
        }
    }

    fn add_namespace(&mut self, nqn: &str, volume: &str, nsid: u32) -> ConfigReply {
        if self.subsystems().1.iter().all(|s| s.nqn != nqn) {
            return err(ConfigErrorKind::NotFound, format!("no subsystem {nqn}"));
        }
        let Some(i) = self
            .pools
            .iter()
            .position(|p| p.store.config().volumes.iter().any(|v| v.name == volume))
        else {
            return self
                .peer_owned_volume(volume)
                .unwrap_or_else(|| err(ConfigErrorKind::NotFound, format!("no volume {volume}")));
        };
        let taken: Vec<u32> = self
            .pools
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, p)| {
                p.store
                    .config()
                    .namespaces
                    .iter()
                    .filter(|n| n.subsystem_nqn == nqn)
                    .map(|n| n.nsid)
                    .collect::<Vec<_>>()
            })
            .collect();
        // The pool's copy of the subsystems may be older than the winning one.
        let base = self.with_cluster_wide(self.pools[i].store.config().clone());
        let nsid = (nsid != 0).then_some(nsid);
        let group = self.pool_group(i);
        match ops::add_namespace(&base, nqn, volume, nsid, group, &taken) {
            Ok((cfg, nsid)) => match self.commit_and_publish(
                i,
                cfg,
                format!("volume {volume} is namespace {nsid} of {nqn}"),
            ) {
                ConfigReply::Done(mut d) => {
                    d.nsid = nsid;
                    ConfigReply::Done(d)
                }
                other => other,
            },
            Err(e) => op_err(e),
        }
    }

    /// `duplexctl pool replace POOL OLD NEW`: a free drive takes a failed member's slot of a
    /// parity pool this node owns. Committed first (the slot names the new drive, rebuilding),
    /// then the datapath swaps it in and rebuilds it under I/O; [`Cluster::check_rebuilds`]
    /// commits it active once the datapath reports it rebuilt.
    fn replace_member(&mut self, pool: &str, old: &str, new: &str) -> ConfigReply {
        let i = match self.own_pool(pool, "replace its member there") {
            Ok(i) => i,
            Err(refused) => return refused,
        };
        let cfg = self.pools[i].store.config().clone();
        if cfg.pool.raid_level == RaidLevel::Raid0 {
            return err(
                ConfigErrorKind::Refused,
                format!(
                    "pool {pool} is {}: it keeps no copy to rebuild a member from",
                    cfg.pool.raid_level
                ),
            );
        }
        // The old member: a drive of the pool by name, or a missing one by its drive UUID.
        let slot = match self.drives.iter().find(|d| d.name == old && d.pool == pool) {
            Some(d) => d.slot as usize,
            None => match cfg
                .pool
                .members
                .iter()
                .position(|m| m.drive_uuid.to_string() == old)
            {
                Some(s) => s,
                None => {
                    return err(
                        ConfigErrorKind::NotFound,
                        format!("drive {old} is not a member of pool {pool}"),
                    )
                }
            },
        };
        let Some(member) = cfg.pool.members.get(slot) else {
            return err(
                ConfigErrorKind::NotFound,
                format!("pool {pool} has no slot {slot}"),
            );
        };
        if member.state != MemberState::Failed {
            return err(
                ConfigErrorKind::Refused,
                format!(
                    "member {old} (slot {slot}) of pool {pool} is {}: only a failed member is replaced",
                    member.state
                ),
            );
        }
        let Some(n) = self.drives.iter().position(|d| d.name == new) else {
            return err(ConfigErrorKind::NotFound, format!("no drive {new}"));
        };
        if self.drives[n].state != DriveState::Free {
            return err(
                ConfigErrorKind::InUse,
                format!("drive {new} is not free ({})", self.drives[n].state.name()),
            );
        }
        if let Some(refused) = self.unchecked_member(i, n) {
            return refused;
        }
        let uuid = self.new_uuid();
        if let Err(e) = self.replace_slot(i, slot, n, uuid) {
            return e;
        }
        done(format!(
            "pool {pool}: {old} (slot {slot}) replaced by {new}; rebuilding under I/O"
        ))
    }

    /// A refusal if drive `n` would join pool `i` as a member whose blocks nothing checks: it
    /// keeps no integrity records in its LBA format's metadata and the pool has no checksum
    /// area to keep them in (its members all had metadata when it was created).
    fn unchecked_member(&self, i: usize, n: usize) -> Option<ConfigReply> {
        let cfg = self.pools[i].store.config();
        let d = &self.drives[n];
        (!d.records
            && cfg.checksum_area.is_none()
            && crate::store::needs_checksum_area(cfg.pool.raid_level, false))
        .then(|| {
            err(
                ConfigErrorKind::Refused,
                format!(
                    "drive {} keeps no integrity records (its LBA format has no metadata) and pool {} has no checksum area to keep them in: use a drive formatted with metadata",
                    d.name, cfg.pool.name
                ),
            )
        })
    }

    /// Puts drive `n` (free, or a spare of the pool) in failed slot `slot` of pool `i` as drive
    /// `uuid`: committed rebuilding, then handed to the datapath to rebuild.
    fn replace_slot(
        &mut self,
        i: usize,
        slot: usize,
        n: usize,
        uuid: Uuid,
    ) -> Result<(), ConfigReply> {
        let pool = self.pools[i].store.config().pool.name.clone();
        let new = self.drives[n].name.clone();
        let Some(device) = self.pools[i].device else {
            return Err(err(
                ConfigErrorKind::IoError,
                format!("pool {pool} is not served by the datapath: not replaced"),
            ));
        };
        let disk = self.drives[n].disk.clone();
        self.changes += 1;
        if let Err(e) = self.pools[i].store.replace_member(slot, disk, uuid) {
            return Err(store_err(e));
        }
        let id = self.drives[n].id;
        if let Some(d) = self
            .drives
            .iter_mut()
            .find(|d| d.pool == pool && d.slot == slot as u32 && d.state != DriveState::Spare)
        {
            d.state = DriveState::Stale;
        }
        let d = &mut self.drives[n];
        d.state = DriveState::Rebuilding;
        d.pool.clone_from(&pool);
        d.slot = slot as u32;
        d.spare = None;
        self.pools[i].drives[slot] = id;
        self.pools[i].readded &= !1u64.checked_shl(slot as u32).unwrap_or(0);
        tracing::info!(pool, new, slot, "member replaced on disk: rebuilding");
        if let Err(e) = self.publisher.replace_member(device, slot as u32, id) {
            return Err(err(
                ConfigErrorKind::IoError,
                format!("{new} is pool {pool}'s member on disk, but the datapath did not take it: {e}; it is rebuilt when the pool is imported again"),
            ));
        }
        Ok(())
    }

    /// Members the datapath reports rebuilt are committed active (called on the service's
    /// loop; cheap when no pool rebuilds).
    pub fn check_rebuilds(&mut self) {
        self.checkpoint_rebuilds();
        for i in 0..self.pools.len() {
            let cfg = self.pools[i].store.config();
            if !cfg
                .pool
                .members
                .iter()
                .any(|m| matches!(m.state, MemberState::Rebuilding { .. }))
            {
                continue;
            }
            let Some(device) = self.pools[i].device else {
                continue;
            };
            let active = match self.publisher.active_members(device) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the datapath's member states");
                    continue;
                }
            };
            let mut cfg = cfg.clone();
            let next = self.pools[i].store.stamp().generation + 1;
            let mut rebuilt = Vec::new();
            for (slot, m) in cfg.pool.members.iter_mut().enumerate() {
                if matches!(m.state, MemberState::Rebuilding { .. })
                    && active.get(slot) == Some(&true)
                {
                    m.state = MemberState::Active;
                    m.changed_generation = next;
                    rebuilt.push(slot as u32);
                }
            }
            if rebuilt.is_empty() {
                continue;
            }
            let name = cfg.pool.name.clone();
            if let Err(e) = self.commit_pool(i, cfg) {
                tracing::error!(pool = %name, error = %e, "recording a finished rebuild failed");
                continue;
            }
            for d in self.drives.iter_mut() {
                if d.pool == name && rebuilt.contains(&d.slot) {
                    d.state = DriveState::Active;
                }
            }
            for &s in &rebuilt {
                self.pools[i].readded &= !1u64.checked_shl(s).unwrap_or(0);
            }
            tracing::info!(pool = %name, members = ?rebuilt, "rebuild complete: member active on disk");
            self.publisher.event(
                "info",
                "rebuild-finished",
                &format!("pool {name}: rebuild complete, member slots {rebuilt:?} active"),
            );
        }
    }

    /// The drives holding current data of some pool this node knows (its own and the
    /// peer's, by their newest records): a member in service or being rebuilt. Only these
    /// must be fenced in a takeover; a drive that is unreachable and not among them (a failed
    /// or replaced member, a free drive) is passed over. A drive this node cannot read counts
    /// when its last known place (pool, slot) is a current member that no readable drive
    /// carries.
    pub fn current_member_drives(&mut self) -> Vec<String> {
        let configs: Vec<PoolConfig> = self
            .pools
            .iter()
            .map(|p| p.store.config().clone())
            .chain(self.peer_pools.iter().map(|p| p.config.clone()))
            .collect();
        let current = |s: MemberState| !matches!(s, MemberState::Failed);
        let mut out = Vec::new();
        let mut carried = Vec::new();
        let mut unread = Vec::new();
        for (i, d) in self.drives.iter_mut().enumerate() {
            match probe(&mut d.disk) {
                Some(sb) => {
                    carried.push(sb.drive_uuid);
                    if configs.iter().any(|c| {
                        c.pool.uuid == sb.pool_uuid
                            && c.pool
                                .members
                                .iter()
                                .any(|m| m.drive_uuid == sb.drive_uuid && current(m.state))
                    }) {
                        out.push(d.name.clone());
                    }
                }
                None => unread.push(i),
            }
        }
        for i in unread {
            let d = &self.drives[i];
            let member = configs
                .iter()
                .find(|c| c.pool.name == d.pool || c.pool.uuid.to_string() == d.pool)
                .and_then(|c| c.pool.members.get(d.slot as usize));
            if member.is_some_and(|m| current(m.state) && !carried.contains(&m.drive_uuid)) {
                out.push(d.name.clone());
            }
        }
        out
    }

    /// Commits the rebuild positions the raid service asks for (each at most what the
    /// datapath reports rebuilt), so a rebuild resumes there after a restart or a takeover.
    fn checkpoint_rebuilds(&mut self) {
        let jobs = self.publisher.jobs();
        for job in jobs {
            let key = job.report.key;
            if key.kind != JobKind::Rebuild {
                continue;
            }
            let Some(i) = self.pools.iter().position(|p| p.device == Some(key.device)) else {
                continue;
            };
            let slot = usize::from(key.slot);
            let cfg = self.pools[i].store.config();
            let Some(MemberState::Rebuilding { position }) =
                cfg.pool.members.get(slot).map(|m| m.state)
            else {
                continue;
            };
            let Some(bs) = self.pools[i].store.block_size(slot).map(u64::from) else {
                continue;
            };
            let on_disk = position.saturating_mul(bs);
            if job.committed != on_disk {
                self.publisher.job_committed(job.entry, key, on_disk);
            }
            // Never past what the datapath says it rebuilt; whole blocks only.
            let want = job.figures.checkpoint.min(job.report.done) / bs;
            if want <= position || want.saturating_mul(bs) >= cfg.pool.member_data_bytes {
                // Nothing new; the end is committed as the member turning active.
                continue;
            }
            // An event at each tenth of the way (checkpoints come every second or so; the
            // journal would hold little else during a long rebuild).
            let member = cfg.pool.member_data_bytes.max(1);
            let tenth = |blocks: u64| u128::from(blocks * bs) * 10 / u128::from(member);
            let milestone = (tenth(want) > tenth(position)).then(|| tenth(want) * 10);
            let mut cfg = cfg.clone();
            let name = cfg.pool.name.clone();
            cfg.pool.members[slot].state = MemberState::Rebuilding { position: want };
            match self.commit_pool(i, cfg) {
                Ok(()) => {
                    tracing::info!(pool = %name, slot, at = want * bs, "rebuild checkpoint committed");
                    if let Some(percent) = milestone {
                        self.publisher.event(
                            "info",
                            "rebuild-progress",
                            &format!(
                                "pool {name}: rebuild of slot {slot} {percent}% done (checkpoint at {} MiB)",
                                (want * bs) >> 20
                            ),
                        );
                    }
                    self.publisher.job_committed(job.entry, key, want * bs);
                }
                Err(e) => {
                    tracing::warn!(pool = %name, error = %e, "committing a rebuild checkpoint failed");
                }
            }
        }
    }

    /// A member of the pool at `device` failed (the datapath's event): record it on disk, then
    /// tell the datapath it is recorded (it holds writes until then).
    pub fn member_failed(&mut self, device: u32, member: u32) -> Result<(), String> {
        let Some(i) = self.pools.iter().position(|p| p.device == Some(device)) else {
            return Err(format!("no pool at device {device}"));
        };
        let mut cfg = self.pools[i].store.config().clone();
        let next = self.pools[i].store.stamp().generation + 1;
        let name = cfg.pool.name.clone();
        self.pools[i].readded &= !1u64.checked_shl(member).unwrap_or(0);
        if let Some(m) = cfg.pool.members.get_mut(member as usize) {
            if m.state != MemberState::Failed {
                m.state = MemberState::Failed;
                m.changed_generation = next;
                self.commit_pool(i, cfg).map_err(|e| e.to_string())?;
            }
        }
        if let Some(d) = self
            .drives
            .iter_mut()
            .find(|d| d.pool == name && d.slot == member)
        {
            d.state = DriveState::Failed;
        }
        tracing::warn!(pool = %name, member, "member failure recorded on disk");
        self.publisher.event(
            "error",
            "member-failed",
            &format!(
                "pool {name}: member {member} failed (recorded on disk); the pool runs degraded"
            ),
        );
        self.publisher.failures_recorded(device, &[member])
    }

    fn drive_infos(&self, integrity: &[(u32, duplex_ipc::maps::IntegrityInfo)]) -> Vec<DriveInfo> {
        let mut out: Vec<DriveInfo> = self
            .drives
            .iter()
            .map(|d| DriveInfo {
                name: d.name.clone(),
                address: d.address.clone(),
                capacity_bytes: d.capacity,
                block_size: d.block_size,
                model: String::new(),
                serial: String::new(),
                pool: d.pool.clone(),
                slot: d.slot,
                state: d.state,
                integrity_errors: integrity
                    .iter()
                    .find(|x| x.0 == d.id)
                    .map_or(0, |x| x.1.errors),
            })
            .collect();
        for p in &self.pools {
            let cfg = p.store.config();
            for (slot, m) in cfg.pool.members.iter().enumerate() {
                let known = self
                    .drives
                    .iter()
                    .any(|d| d.pool == cfg.pool.name && d.slot == slot as u32);
                if !known {
                    out.push(DriveInfo {
                        name: String::new(),
                        address: String::new(),
                        capacity_bytes: 0,
                        block_size: 0,
                        model: String::new(),
                        serial: m.drive_uuid.to_string(),
                        pool: cfg.pool.name.clone(),
                        slot: slot as u32,
                        state: DriveState::Missing,
                        integrity_errors: 0,
                    });
                }
            }
        }
        out
    }

    fn pool_infos(&mut self, progress: &[Progress]) -> Vec<PoolInfo> {
        let jobs = self.publisher.jobs();
        let integrity = self.publisher.integrity();
        let rates: Vec<u64> = self
            .pools
            .iter()
            .map(|p| p.device.map_or(0, |d| self.publisher.rate(d)))
            .collect();
        self.pools
            .iter()
            .enumerate()
            .map(|(idx, p)| {
                let cfg = p.store.config();
                let members: Vec<PoolMemberInfo> = cfg
                    .pool
                    .members
                    .iter()
                    .enumerate()
                    .map(|(slot, m)| {
                        let drive = self
                            .drives
                            .iter()
                            .find(|d| d.pool == cfg.pool.name && d.slot == slot as u32);
                        let state = match (m.state, p.drives.get(slot)) {
                            (MemberState::Failed, _) => DriveState::Failed,
                            (MemberState::Rebuilding { .. }, _) => DriveState::Rebuilding,
                            (MemberState::Active, Some(&MISSING)) => {
                                drive.map_or(DriveState::Missing, |d| d.state)
                            }
                            (MemberState::Active, _) => DriveState::Active,
                        };
                        PoolMemberInfo {
                            drive: drive.map(|d| d.name.clone()).unwrap_or_default(),
                            drive_uuid: m.drive_uuid.to_string(),
                            slot: slot as u32,
                            state,
                        }
                    })
                    .collect();
                let degraded = members.iter().any(|m| m.state != DriveState::Active);
                let stamp = p.store.stamp();
                let at = p
                    .device
                    .and_then(|d| progress.iter().find(|x| x.0 == d))
                    .copied();
                PoolInfo {
                    name: cfg.pool.name.clone(),
                    uuid: cfg.pool.uuid.to_string(),
                    raid: raid_to(cfg.pool.raid_level),
                    chunk_bytes: cfg.pool.chunk_size,
                    capacity_bytes: ops::capacity(cfg),
                    free_bytes: ops::free_bytes(cfg),
                    state: if p.device.is_none() {
                        PoolState::Offline
                    } else if degraded {
                        PoolState::Degraded
                    } else {
                        PoolState::Online
                    },
                    generation: stamp.generation,
                    epoch: stamp.epoch,
                    owner_node: cfg.ownership.owner_node,
                    members,
                    member_bytes: cfg.pool.member_data_bytes,
                    rebuild: at.and_then(|a| a.1),
                    scrub: at.and_then(|a| a.2),
                    jobs: pool_jobs(p.device, &jobs, rates[idx]),
                    spares: cfg.spares.iter().map(|u| self.spare_name(u)).collect(),
                    integrity: p
                        .device
                        .and_then(|d| integrity.iter().find(|x| x.0 == d))
                        .map(|x| PoolIntegrity {
                            recovered: x.1.recovered,
                            healed: x.1.healed,
                            unrecoverable: x.1.unrecoverable,
                        })
                        .unwrap_or_default(),
                }
            })
            .chain(self.peer_pools.iter().map(|p| self.peer_pool_info(p)))
            .collect()
    }

    /// A pool the peer owns, as its drives last said (read only here): its members' states
    /// are the owner's record.
    fn peer_pool_info(&self, p: &PeerPool) -> PoolInfo {
        let cfg = &p.config;
        let members: Vec<PoolMemberInfo> = cfg
            .pool
            .members
            .iter()
            .enumerate()
            .map(|(slot, m)| PoolMemberInfo {
                drive: self
                    .drives
                    .iter()
                    .find(|d| d.pool == cfg.pool.name && d.slot == slot as u32)
                    .map(|d| d.name.clone())
                    .unwrap_or_default(),
                drive_uuid: m.drive_uuid.to_string(),
                slot: slot as u32,
                state: match m.state {
                    MemberState::Failed => DriveState::Failed,
                    MemberState::Rebuilding { .. } => DriveState::Rebuilding,
                    MemberState::Active => DriveState::Active,
                },
            })
            .collect();
        let degraded = members.iter().any(|m| m.state != DriveState::Active);
        PoolInfo {
            name: cfg.pool.name.clone(),
            uuid: cfg.pool.uuid.to_string(),
            raid: raid_to(cfg.pool.raid_level),
            chunk_bytes: cfg.pool.chunk_size,
            capacity_bytes: ops::capacity(cfg),
            free_bytes: ops::free_bytes(cfg),
            state: if degraded {
                PoolState::Degraded
            } else {
                PoolState::Online
            },
            generation: p.generation,
            epoch: cfg.ownership.epoch,
            owner_node: cfg.ownership.owner_node,
            members,
            member_bytes: cfg.pool.member_data_bytes,
            rebuild: None,
            scrub: None,
            jobs: PoolJobs::default(),
            spares: cfg.spares.iter().map(|u| self.spare_name(u)).collect(),
            integrity: PoolIntegrity::default(),
        }
    }

    /// The datapath's long work on this node's redundant pools (nothing asked when none is).
    fn progress(&mut self) -> Vec<Progress> {
        if self
            .pools
            .iter()
            .any(|p| p.store.config().pool.raid_level != RaidLevel::Raid0)
        {
            self.publisher.progress()
        } else {
            Vec::new()
        }
    }

    /// A spare's drive name, as this node sees it (its UUID when no drive carries it).
    fn spare_name(&self, uuid: &Uuid) -> String {
        self.drives
            .iter()
            .find(|d| d.state == DriveState::Spare && d.spare == Some(*uuid))
            .map_or_else(|| uuid.to_string(), |d| d.name.clone())
    }

    /// `duplexctl pool add-spare POOL DRIVE`: a free drive reserved for a parity pool this
    /// node owns, taken into a failed member's slot when one fails ([`Cluster::take_spares`]).
    fn add_spare(&mut self, pool: &str, drive: &str) -> ConfigReply {
        let i = match self.own_pool(pool, "add its spares there") {
            Ok(i) => i,
            Err(refused) => return refused,
        };
        let level = self.pools[i].store.config().pool.raid_level;
        if level == RaidLevel::Raid0 {
            return err(
                ConfigErrorKind::Refused,
                format!("pool {pool} is {level}: a hot spare needs a pool that can rebuild"),
            );
        }
        let Some(n) = self.drives.iter().position(|d| d.name == drive) else {
            return err(ConfigErrorKind::NotFound, format!("no drive {drive}"));
        };
        if self.drives[n].state != DriveState::Free {
            return err(
                ConfigErrorKind::InUse,
                format!(
                    "drive {drive} is not free ({})",
                    self.drives[n].state.name()
                ),
            );
        }
        if let Some(refused) = self.unchecked_member(i, n) {
            return refused;
        }
        let uuid = self.new_uuid();
        let disk = self.drives[n].disk.clone();
        self.changes += 1;
        if let Err(e) = self.pools[i].store.add_spare(disk, uuid) {
            return store_err(e);
        }
        let d = &mut self.drives[n];
        d.state = DriveState::Spare;
        d.pool = pool.to_owned();
        d.slot = u32::MAX;
        d.spare = Some(uuid);
        tracing::info!(pool, drive, "hot spare added");
        // A member may have failed already.
        self.take_spares();
        done(format!("pool {pool}: {drive} is a hot spare"))
    }

    /// Puts a hot spare in the slot of each failed member of the parity pools this node owns
    /// and serves, while spares last (called after a member failure is recorded, and on the
    /// service's loop).
    pub fn take_spares(&mut self) {
        for i in 0..self.pools.len() {
            loop {
                let cfg = self.pools[i].store.config();
                if cfg.pool.raid_level == RaidLevel::Raid0
                    || cfg.spares.is_empty()
                    || self.pools[i].device.is_none()
                {
                    break;
                }
                let Some(slot) = cfg
                    .pool
                    .members
                    .iter()
                    .position(|m| m.state == MemberState::Failed)
                else {
                    break;
                };
                let name = cfg.pool.name.clone();
                let spares = cfg.spares.clone();
                let Some(n) = self.drives.iter().position(|d| {
                    d.state == DriveState::Spare
                        && d.pool == name
                        && d.spare.is_some_and(|u| spares.contains(&u))
                }) else {
                    break;
                };
                let spare = self.drives[n].name.clone();
                let old = self
                    .drives
                    .iter()
                    .find(|d| d.pool == name && d.slot == slot as u32)
                    .map_or_else(
                        || cfg.pool.members[slot].drive_uuid.to_string(),
                        |d| d.name.clone(),
                    );
                tracing::warn!(pool = %name, slot, failed = %old, spare = %spare, "a member failed: taking a hot spare");
                let uuid = self.drives[n].spare.unwrap_or_else(|| self.new_uuid());
                match self.replace_slot(i, slot, n, uuid) {
                    Ok(()) => {
                        self.drives[n].spare = None;
                        tracing::info!(pool = %name, slot, spare = %spare, "hot spare taken: rebuilding");
                        self.publisher.event(
                            "warning",
                            "spare-taken",
                            &format!("pool {name}: hot spare {spare} took slot {slot}; rebuilding"),
                        );
                    }
                    Err(e) => {
                        tracing::error!(pool = %name, slot, spare = %spare, error = ?e, "taking a hot spare failed");
                        break;
                    }
                }
            }
        }
    }

    /// The index of pool `name` among this node's own pools; otherwise the answer: refused
    /// for a pool the peer owns (`there` says what to do on the owner), not found for none.
    fn own_pool(&self, name: &str, there: &str) -> Result<usize, ConfigReply> {
        if let Some(i) = self
            .pools
            .iter()
            .position(|p| p.store.config().pool.name == name)
        {
            return Ok(i);
        }
        if let Some(p) = self.peer_pools.iter().find(|p| p.config.pool.name == name) {
            return Err(err(
                ConfigErrorKind::Refused,
                format!(
                    "pool {name} is owned by node {}: {there}",
                    p.config.ownership.owner_node + 1
                ),
            ));
        }
        Err(err(
            ConfigErrorKind::NotFound,
            format!("no pool named {name}"),
        ))
    }

    /// `duplexctl pool rate POOL RATE`: the rate of a parity pool's rebuilds and scrubs, for
    /// the raid service (kept while this node's services run; a takeover or a restart of
    /// duplexd goes back to the default, yielding to host I/O).
    fn set_pool_rate(&mut self, name: &str, rate: u64) -> ConfigReply {
        let i = match self.own_pool(name, "set its rate there") {
            Ok(i) => i,
            Err(refused) => return refused,
        };
        let level = self.pools[i].store.config().pool.raid_level;
        if level == RaidLevel::Raid0 {
            return err(
                ConfigErrorKind::Refused,
                format!("pool {name} is {level}: it has no rebuild or scrub to pace"),
            );
        }
        let Some(device) = self.pools[i].device else {
            return err(
                ConfigErrorKind::IoError,
                format!("pool {name} is not served by the datapath"),
            );
        };
        match self.publisher.set_rate(device, rate) {
            Ok(()) if rate == 0 => done(format!(
                "pool {name}: rebuilds and scrubs yield to host I/O (the default)"
            )),
            Ok(()) => done(format!(
                "pool {name}: rebuilds and scrubs at most {rate} bytes/s of each member"
            )),
            Err(e) => err(ConfigErrorKind::Refused, format!("pool {name}: {e}")),
        }
    }

    /// `duplexctl pool scrub POOL`: starts the datapath's scrub of a parity pool this node
    /// owns (progress and findings in `pool show`).
    fn scrub_pool(&mut self, name: &str) -> ConfigReply {
        let i = match self.own_pool(name, "scrub it there") {
            Ok(i) => i,
            Err(refused) => return refused,
        };
        let level = self.pools[i].store.config().pool.raid_level;
        if level == RaidLevel::Raid0 {
            return err(
                ConfigErrorKind::Refused,
                format!(
                    "pool {name} is {level}: no copy or parity to check against (scrub checks RAID 1, 10, 5 and 6)"
                ),
            );
        }
        let Some(device) = self.pools[i].device else {
            return err(
                ConfigErrorKind::IoError,
                format!("pool {name} is not served by the datapath"),
            );
        };
        match self.publisher.start_scrub(device) {
            Ok(()) => done(format!(
                "scrub of pool {name} started (`duplexctl pool show {name}`: progress, findings)"
            )),
            Err(e) => err(ConfigErrorKind::Refused, format!("pool {name}: {e}")),
        }
    }

    /// The volumes named after `after`, in name order, as many as one reply holds.
    fn volume_page(&self, after: &str) -> Vec<VolumeInfo> {
        let mut all: Vec<VolumeInfo> = self
            .volume_infos()
            .into_iter()
            .filter(|v| v.name.as_str() > after)
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let mut exports = 0;
        let mut page = Vec::new();
        for v in all {
            exports += v.exports.len();
            if page.len() == duplex_ipc::config::MAX_VOLUMES
                || (exports > duplex_ipc::config::MAX_NAMESPACES && !page.is_empty())
            {
                break;
            }
            page.push(v);
        }
        page
    }

    fn volume_infos(&self) -> Vec<VolumeInfo> {
        let mut out = Vec::new();
        let configs = self
            .pools
            .iter()
            .map(|p| p.store.config())
            .chain(self.peer_pools.iter().map(|p| &p.config));
        for cfg in configs {
            for v in &cfg.volumes {
                out.push(VolumeInfo {
                    name: v.name.clone(),
                    uuid: v.uuid.to_string(),
                    nguid: hex(&v.nguid),
                    pool: cfg.pool.name.clone(),
                    size_bytes: v.size_blocks * u64::from(v.block_size),
                    block_size: v.block_size,
                    exports: cfg
                        .namespaces
                        .iter()
                        .filter(|n| n.volume_uuid == v.uuid)
                        .map(|n| Export {
                            nqn: n.subsystem_nqn.clone(),
                            nsid: n.nsid,
                        })
                        .collect(),
                });
            }
        }
        out
    }

    fn subsystem_infos(&self) -> Vec<SubsystemInfo> {
        self.export_table()
            .into_iter()
            .map(|s| SubsystemInfo {
                // Hosts that must authenticate in band: those with a DH-HMAC-CHAP secret (not
                // those with only a TLS PSK); keys this node cannot unseal count as secrets.
                hosts_authenticate: if s.secrets.is_empty() {
                    Vec::new()
                } else {
                    s.hosts
                        .iter()
                        .map(|h| {
                            s.secrets.iter().any(|x| {
                                x.host == *h
                                    && self.secrets_key.as_ref().is_none_or(|k| {
                                        duplex_ondisk::secrets::unseal(k, &s.nqn, h, &x.sealed)
                                            .map_or(true, |keys| keys.dhchap.is_some())
                                    })
                            })
                        })
                        .collect()
                },
                nqn: s.nqn,
                allow_any_host: s.allow_any_host,
                hosts: s.hosts,
                namespaces: s
                    .namespaces
                    .iter()
                    .map(|n| NamespaceInfo {
                        nsid: n.nsid,
                        volume: self
                            .pools
                            .iter()
                            .flat_map(|p| &p.store.config().volumes)
                            .chain(self.peer_pools.iter().flat_map(|p| &p.config.volumes))
                            .find(|v| v.uuid.0 == n.uuid)
                            .map(|v| v.name.clone())
                            .unwrap_or_default(),
                        nguid: hex(&n.nguid),
                        ana_group: n.ana_group,
                    })
                    .collect(),
            })
            .collect()
    }
}

/// A subsystem's serial number: 20 hex digits of a hash of its NQN (the same on both nodes).
fn serial_of(nqn: &str) -> String {
    let crc = crc32(nqn.as_bytes());
    let crc2 = crc32(&[nqn.as_bytes(), b"/2"].concat());
    format!("{crc:08x}{crc2:08x}dplx")
}

/// Writes zeroes over `len` bytes of `disk` from `offset` (1 MiB at a time), then flushes.
fn zero_area<D: MetaDisk>(
    disk: &mut D,
    offset: u64,
    len: u64,
) -> Result<(), crate::disk::DiskError> {
    const CHUNK: u64 = 1 << 20;
    let zero = vec![0u8; CHUNK as usize];
    let mut at = 0;
    while at < len {
        let n = CHUNK.min(len - at) as usize;
        disk.write(offset + at, &zero[..n])?;
        at += n as u64;
    }
    disk.flush()
}

/// CRC-32 (IEEE), enough to derive serials.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The tag a pool's stripe journal records carry: the first 8 bytes of its UUID (so records
/// a destroyed pool left on a drive never count for a new one).
fn journal_tag(uuid: &duplex_ondisk::Uuid) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&uuid.0[..8]);
    u64::from_le_bytes(b)
}
