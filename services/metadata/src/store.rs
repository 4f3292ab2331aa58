//! [`PoolStore`]: one pool's records on its member drives.
//!
//! * **Format** ([`PoolStore::format`]): every member gets the first image (generation 1) in
//!   slot 0, all flushed, then its two superblocks, all flushed. A drive that already carries a
//!   valid superblock is refused (it belongs to a pool). A pool whose drives keep no integrity
//!   records in their LBA format's metadata ([`needs_checksum_area`]) gets a checksum area on
//!   every member, after the part of the data area its data uses
//!   ([`duplex_ondisk::checksum_split`]); replacements and spares must have room for it too.
//! * **Commit** ([`PoolStore::commit`]): the next image (generation + 1, the owner's epoch) is
//!   written to the next ring slot of every live member, every member is flushed, and only
//!   then does the change count (the caller answers the operator after `commit` returns). When
//!   member states, the owner or the epoch change, the superblocks of the live members are
//!   rewritten after the image is durable (primary, then secondary). A member whose write or
//!   flush fails is failed in a follow-up commit to the others, as long as the pool keeps
//!   enough members; otherwise the commit fails (and says that the change reached only some
//!   members: whether it is in effect is decided by the next import).
//! * **Import** ([`PoolStore::import`]): reads both superblocks and every slot of every drive
//!   offered, lets [`duplex_ondisk::plan_import`] decide, makes the repairs it lists (torn or
//!   corrupt slots and superblocks rewritten from the winner, on current members only), and
//!   opens the pool on its current members. A refusal writes nothing.

use duplex_ondisk::image::IMAGE_HEADER_SIZE;
use duplex_ondisk::import::{MemberStatus, Repair};
use duplex_ondisk::layout::secondary_superblock_offset;
use duplex_ondisk::superblock::SUPERBLOCK_SIZE;
use duplex_ondisk::{
    checksum_split, plan_import, ChecksumArea, DriveInput, ImageHeader, ImportError, ImportPlan,
    ImportRequest, Layout, MemberState, MetadataImage, Ownership, Pool, PoolConfig, PoolMember,
    RaidLevel, Role, Stamp, Subsystem, Superblock, SuperblockCopy, Uuid,
};

use crate::disk::{DiskError, MetaDisk};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A drive operation failed.
    #[error("Drive {drive}: {error}")]
    Disk {
        /// The drive's label.
        drive: String,
        /// What failed.
        error: DiskError,
    },
    /// The drive cannot hold a pool member.
    #[error("Drive {drive}: {why}")]
    Unsuitable {
        /// The drive's label.
        drive: String,
        /// Why.
        why: String,
    },
    /// The configuration is not valid (nothing was written).
    #[error("Invalid pool configuration: {0}")]
    Config(String),
    /// Import refused (nothing was written).
    #[error(transparent)]
    Import(#[from] ImportError),
    /// Import refused (nothing was written): a pool of the same name is imported already.
    #[error("Pool {pool} is named {name}, as is pool {other}, imported already: it is not imported (nothing was written to its drives); names are unique on a node")]
    NameTaken {
        /// The pool not imported.
        pool: Uuid,
        /// Its name.
        name: String,
        /// The pool imported under that name.
        other: Uuid,
    },
    /// A commit did not reach enough members to count; it may be in effect on the members it
    /// reached, which the next import decides.
    #[error("Pool {pool}: commit of generation {generation} failed on too many members ({why}); the change reached only some of them")]
    CommitFailed {
        /// The pool.
        pool: String,
        /// The generation that was being written.
        generation: u64,
        /// The failures.
        why: String,
    },
}

/// What a new pool is.
#[derive(Clone, Debug)]
pub struct FormatSpec {
    /// Pool name.
    pub name: String,
    /// Pool UUID.
    pub uuid: Uuid,
    /// RAID level.
    pub level: RaidLevel,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// The cluster's UUID.
    pub cluster_uuid: Uuid,
    /// The node formatting it (its first owner).
    pub node: u32,
    /// A UUID for each drive, in slot order.
    pub drive_uuids: Vec<Uuid>,
    /// The cluster's subsystems now (copied into every pool's image).
    pub subsystems: Vec<Subsystem>,
    /// Their hosts' sealed secrets (cluster-wide like them).
    pub host_secrets: Vec<duplex_ondisk::records::HostSecret>,
    /// Their generation.
    pub cluster_generation: u64,
    /// Give the pool a checksum area ([`needs_checksum_area`]): the member data bytes are
    /// what is left of the smallest data area once the area for them fits after them.
    pub checksum_area: bool,
}

/// Whether a new pool at `level` gets a checksum area: when not every drive keeps integrity
/// records in its LBA format's metadata (`all_drives_keep_records` false), except RAID 0,
/// which has no other copy to repair a bad block from and keeps no records at all.
pub fn needs_checksum_area(level: RaidLevel, all_drives_keep_records: bool) -> bool {
    !all_drives_keep_records && level != RaidLevel::Raid0
}

/// Whether a drive of `layout` can hold a member of the pool `config` whose members have the
/// layout `model`: its data area starts where theirs does, holds the pool's member data
/// bytes, and (with a checksum area) the area after them. `Err` says why not.
fn room_for(layout: &Layout, model: &Layout, config: &PoolConfig) -> Result<(), String> {
    let mdb = config.pool.member_data_bytes;
    if layout.data_offset != model.data_offset
        || layout.journal_offset != model.journal_offset
        || layout.data_size < mdb
    {
        return Err(format!(
            "its data area ({} bytes from {}) cannot hold the pool's ({} bytes from {})",
            layout.data_size, layout.data_offset, mdb, model.data_offset
        ));
    }
    if let Some(area) = &config.checksum_area {
        area.check_layout(layout, mdb).map_err(|e| {
            format!(
                "its data area ({} bytes from {}) cannot hold the pool's {} data bytes and \
                 its checksum area ({} bytes at byte {}): {e}",
                layout.data_size, layout.data_offset, mdb, area.len, area.offset
            )
        })?;
    }
    Ok(())
}

/// One member drive of an open pool.
#[derive(Debug)]
struct Member<D> {
    disk: D,
    sb: Superblock,
}

/// One pool's records on its drives. See the module docs.
#[derive(Debug)]
pub struct PoolStore<D: MetaDisk> {
    node: u32,
    /// Members by slot; `None`: missing, stale or failed (not written any more).
    members: Vec<Option<Member<D>>>,
    image: MetadataImage,
    next_slot: u32,
    /// The highest generation ever written (a failed commit may have put one on some
    /// members: the next must be above it).
    written: u64,
}

fn disk_err<D: MetaDisk>(d: &D) -> impl FnOnce(DiskError) -> StoreError + '_ {
    move |error| StoreError::Disk {
        drive: d.label().to_owned(),
        error,
    }
}

/// Rounds `n` up to whole blocks of `bs`.
fn round_up(n: usize, bs: u32) -> usize {
    let bs = bs as usize;
    n.div_ceil(bs) * bs
}

/// Reads a drive's superblock copies (the valid one with the highest stamp), if any.
pub fn probe<D: MetaDisk>(disk: &mut D) -> Option<Superblock> {
    let input = read_superblocks(disk);
    [input.0, input.1]
        .into_iter()
        .flatten()
        .filter_map(|b| Superblock::parse(&b).ok())
        .max_by_key(Superblock::stamp)
}

fn read_superblocks<D: MetaDisk>(disk: &mut D) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let primary = disk.read(0, SUPERBLOCK_SIZE).ok();
    let secondary = secondary_superblock_offset(disk.capacity())
        .and_then(|at| disk.read(at, SUPERBLOCK_SIZE).ok());
    (primary, secondary)
}

/// What importing `pool` from `disks` would do, by the import rule: reads only.
pub fn plan<D: MetaDisk>(
    disks: &mut [D],
    pool: Option<Uuid>,
    force: bool,
) -> Result<ImportPlan, StoreError> {
    let drives: Vec<DriveInput> = disks.iter_mut().map(read_drive).collect();
    Ok(plan_import(&ImportRequest {
        drives,
        pool,
        force,
    })?)
}

/// Reads what the import rule needs from a drive: both superblocks and the start (header and
/// body) of every metadata slot its superblock's layout places.
pub fn read_drive<D: MetaDisk>(disk: &mut D) -> DriveInput {
    let (primary, secondary) = read_superblocks(disk);
    let layout = [&primary, &secondary]
        .into_iter()
        .flatten()
        .filter_map(|b| Superblock::parse(b).ok())
        .max_by_key(Superblock::stamp)
        .map(|sb| sb.layout);
    let mut slots = Vec::new();
    if let Some(l) = layout {
        let bs = disk.block_size();
        for i in 0..l.metadata_slots {
            let Some(at) = l.metadata_slot_offset(i) else {
                slots.push(None);
                continue;
            };
            let first = round_up(IMAGE_HEADER_SIZE, bs).max(4096);
            let Ok(head) = disk.read(at, first) else {
                slots.push(None);
                continue;
            };
            let want = ImageHeader::parse(&head)
                .ok()
                .map(|h| round_up(IMAGE_HEADER_SIZE + h.body_len as usize, bs))
                .filter(|&n| n > head.len() && n <= l.metadata_slot_size as usize);
            match want {
                Some(n) => slots.push(disk.read(at, n).ok()),
                None => slots.push(Some(head)),
            }
        }
    }
    DriveInput {
        label: disk.label().to_owned(),
        primary,
        secondary,
        slots,
    }
}

impl<D: MetaDisk> PoolStore<D> {
    /// Makes a new pool on `disks` (slot order). See the module docs.
    pub fn format(spec: &FormatSpec, mut disks: Vec<D>) -> Result<Self, StoreError> {
        if spec.drive_uuids.len() != disks.len() {
            return Err(StoreError::Config(format!(
                "{} drive UUIDs for {} drives",
                spec.drive_uuids.len(),
                disks.len()
            )));
        }
        let mut layouts = Vec::new();
        for d in &mut disks {
            let label = d.label().to_owned();
            let unsuitable = |why: String| StoreError::Unsuitable {
                drive: label.clone(),
                why,
            };
            if let Some(sb) = probe(d) {
                return Err(unsuitable(format!("it belongs to pool {}", sb.pool_uuid)));
            }
            let layout = Layout::for_drive(d.capacity(), d.block_size())
                .map_err(|e| unsuitable(e.to_string()))?;
            layouts.push(layout);
        }
        let smallest = layouts.iter().map(|l| l.data_size).min().unwrap_or(0);
        let chunk = u64::from(spec.chunk_size.max(1));
        let (member_data_bytes, checksum_area) = if spec.checksum_area {
            let (Some((data, len)), Some(first)) =
                (checksum_split(smallest, spec.chunk_size), layouts.first())
            else {
                return Err(StoreError::Config(format!(
                    "the smallest data area ({smallest} bytes) holds no {chunk}-byte chunk \
                     with its checksum area"
                )));
            };
            // `data` is whole chunks (multiples of 4 KiB) and the data area starts 4 KiB
            // aligned: the area is aligned too.
            let area = ChecksumArea {
                offset: first.data_offset.saturating_add(data),
                len,
            };
            (data, Some(area))
        } else {
            (smallest / chunk * chunk, None)
        };
        let config = PoolConfig {
            pool: Pool {
                name: spec.name.clone(),
                uuid: spec.uuid,
                raid_level: spec.level,
                chunk_size: spec.chunk_size,
                member_data_bytes,
                members: spec
                    .drive_uuids
                    .iter()
                    .enumerate()
                    .map(|(i, &u)| PoolMember {
                        drive_uuid: u,
                        slot: i as u32,
                        state: MemberState::Active,
                        changed_generation: 1,
                    })
                    .collect(),
            },
            ownership: Ownership {
                owner_node: spec.node,
                epoch: 1,
            },
            cluster_generation: spec.cluster_generation,
            subsystems: spec.subsystems.clone(),
            volumes: Vec::new(),
            namespaces: Vec::new(),
            spares: Vec::new(),
            write_seq_mark: 0,
            checksum_area,
            reservations: Vec::new(),
            host_secrets: spec.host_secrets.clone(),
        };
        config
            .validate()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        if let Some(first) = layouts.first() {
            for (d, layout) in disks.iter().zip(&layouts) {
                room_for(layout, first, &config).map_err(|why| StoreError::Unsuitable {
                    drive: d.label().to_owned(),
                    why,
                })?;
            }
        }
        let image = MetadataImage {
            slot_index: 0,
            generation: 1,
            epoch: 1,
            writer_node: spec.node,
            config,
        };
        let mut members = Vec::new();
        for (i, (disk, layout)) in disks.into_iter().zip(layouts).enumerate() {
            let sb = Superblock {
                cluster_uuid: spec.cluster_uuid,
                pool_uuid: spec.uuid,
                drive_uuid: spec.drive_uuids[i],
                member_slot: i as u32,
                role: Role::Data,
                state: MemberState::Active,
                generation: 1,
                epoch: 1,
                owner_node: spec.node,
                copy: SuperblockCopy::Primary,
                layout,
            };
            members.push(Some(Member { disk, sb }));
        }
        let mut store = Self {
            node: spec.node,
            members,
            image,
            next_slot: 0,
            written: 1,
        };
        // The checksum area zeroed first (a zero entry means "a block of zeroes"; what a
        // drive held before must not read as entries), then the image on every member,
        // flushed; then the superblocks that make the drives recognisable as members: a
        // crash in between leaves drives that no import takes for a pool.
        if let Some(area) = store.image.config.checksum_area {
            const CHUNK: u64 = 1 << 20;
            let zero = vec![0u8; CHUNK as usize];
            for m in store.members.iter_mut().flatten() {
                let mut at = 0;
                while at < area.len {
                    let n = CHUNK.min(area.len - at);
                    m.disk
                        .write(area.offset + at, &zero[..n as usize])
                        .map_err(disk_err(&m.disk))?;
                    at += n;
                }
            }
        }
        let bytes = store.encode_image(&store.image)?;
        for m in store.members.iter_mut().flatten() {
            let at = slot_offset(&m.sb, 0)?;
            m.disk.write(at, &bytes).map_err(disk_err(&m.disk))?;
        }
        for m in store.members.iter_mut().flatten() {
            m.disk.flush().map_err(disk_err(&m.disk))?;
        }
        store.write_superblocks()?;
        store.next_slot = 1 % store.slots();
        Ok(store)
    }

    /// Imports the pool on `disks` (see the module docs). Returns the store (over the current
    /// members), the plan that was followed, and the disks that are not current members
    /// (stale, foreign, other pools), untouched.
    pub fn import(
        disks: Vec<D>,
        pool: Option<Uuid>,
        force: bool,
        node: u32,
    ) -> Result<(Self, ImportPlan, Vec<D>), StoreError> {
        let mut disks = disks;
        let drives: Vec<DriveInput> = disks.iter_mut().map(read_drive).collect();
        let plan = plan_import(&ImportRequest {
            drives,
            pool,
            force,
        })?;
        let winner = plan.winner.clone();
        let slots = winner.config.pool.members.len();
        let mut members: Vec<Option<Member<D>>> = (0..slots).map(|_| None).collect();
        let mut rest = Vec::new();
        for (disk, report) in disks.into_iter().zip(&plan.drives) {
            // Current members, and members being rebuilt: those are opened too (they take
            // the metadata and every write) but never read; the datapath rebuilds them again.
            let current = plan.members.iter().find(|m| {
                m.drive.as_deref() == Some(report.label.as_str())
                    && matches!(
                        m.status,
                        MemberStatus::Current { .. }
                            | MemberStatus::Stale(
                                duplex_ondisk::import::StaleReason::Rebuilding { .. }
                            )
                    )
            });
            match (current, report.superblock) {
                (Some(m), Some(mut sb)) if (m.slot as usize) < slots => {
                    // The superblock as the winner has it (repairs write this).
                    sb.member_slot = m.slot;
                    sb.state = m.state;
                    members[m.slot as usize] = Some(Member { disk, sb });
                }
                _ => rest.push(disk),
            }
        }
        let written = plan
            .drives
            .iter()
            .flat_map(|d| &d.slots)
            .filter_map(|s| match s {
                duplex_ondisk::import::SlotState::Valid { stamp } => Some(stamp.generation),
                _ => None,
            })
            .max()
            .unwrap_or(0)
            .max(winner.generation);
        // The checksum area must lie in every member's data area, after the pool's data (a
        // datapath keeping records past it would write over whatever follows).
        if let Some(area) = &winner.config.checksum_area {
            for m in members.iter().flatten() {
                area.check_layout(&m.sb.layout, winner.config.pool.member_data_bytes)
                    .map_err(|e| StoreError::Unsuitable {
                        drive: m.disk.label().to_owned(),
                        why: format!(
                            "pool {} is not imported (nothing was written): its layout \
                             cannot hold the pool: {e}",
                            winner.config.pool.name
                        ),
                    })?;
            }
        }
        let mut store = Self {
            node,
            members,
            image: winner,
            next_slot: plan.next_slot,
            written,
        };
        store.repair(&plan.repairs)?;
        Ok((store, plan, rest))
    }

    /// Makes the repairs of an import plan (on current members only).
    fn repair(&mut self, repairs: &[Repair]) -> Result<(), StoreError> {
        let bytes = self.encode_image(&self.image)?;
        let winner_slot = self.image.slot_index;
        for r in repairs {
            let (drive, what) = match r {
                Repair::Superblock { drive, copy, .. } => (drive, Some(*copy)),
                Repair::MetadataSlot { drive, .. } => (drive, None),
            };
            let Some(m) = self
                .members
                .iter_mut()
                .flatten()
                .find(|m| m.disk.label() == drive.as_str())
            else {
                continue;
            };
            match what {
                Some(copy) => {
                    let sb = Superblock { copy, ..m.sb };
                    let at = sb_offset(&sb, copy)?;
                    m.disk
                        .write(at, &sb.encode_vec())
                        .map_err(disk_err(&m.disk))?;
                }
                None => {
                    let at = slot_offset(&m.sb, winner_slot)?;
                    m.disk.write(at, &bytes).map_err(disk_err(&m.disk))?;
                }
            }
            tracing::info!(drive = %drive, repair = ?r, "import repair");
        }
        if !repairs.is_empty() {
            for m in self.members.iter_mut().flatten() {
                m.disk.flush().map_err(disk_err(&m.disk))?;
            }
        }
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> &PoolConfig {
        &self.image.config
    }

    /// The stamp of the configuration in force.
    pub fn stamp(&self) -> Stamp {
        self.image.stamp()
    }

    /// The ring slot the next commit writes.
    pub fn next_slot(&self) -> u32 {
        self.next_slot
    }

    /// The layout of member `slot`, if it is open.
    pub fn layout(&self, slot: usize) -> Option<Layout> {
        self.members.get(slot)?.as_ref().map(|m| m.sb.layout)
    }

    /// The open members' labels by slot (`None`: not written any more).
    pub fn member_labels(&self) -> Vec<Option<String>> {
        self.members
            .iter()
            .map(|m| m.as_ref().map(|m| m.disk.label().to_owned()))
            .collect()
    }

    /// Gives up the drives (slot order, `None` where no member is open).
    pub fn into_disks(self) -> Vec<Option<D>> {
        self.members
            .into_iter()
            .map(|m| m.map(|m| m.disk))
            .collect()
    }

    fn slots(&self) -> u32 {
        self.members
            .iter()
            .flatten()
            .map(|m| m.sb.layout.metadata_slots)
            .next()
            .unwrap_or(1)
            .max(1)
    }

    fn encode_image(&self, image: &MetadataImage) -> Result<Vec<u8>, StoreError> {
        let slot_size = self
            .members
            .iter()
            .flatten()
            .map(|m| m.sb.layout.metadata_slot_size)
            .min()
            .unwrap_or(0);
        let mut bytes = image
            .encode(slot_size as usize)
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let bs = self
            .members
            .iter()
            .flatten()
            .map(|m| m.disk.block_size())
            .max()
            .unwrap_or(512);
        bytes.resize(round_up(bytes.len(), bs), 0);
        Ok(bytes)
    }

    /// The block size of the drive open in member slot `slot`.
    pub fn block_size(&self, slot: usize) -> Option<u32> {
        self.members
            .get(slot)?
            .as_ref()
            .map(|m| m.disk.block_size())
    }

    /// Puts `disk` in failed member slot `slot` as drive `drive_uuid`, rebuilding from its
    /// start: the next generation names it rebuilding, is written to it with every other open
    /// member, then its superblocks (as every member's: the states changed). Returns the old
    /// member's disk, if it was open. Refused, with nothing written, for a slot that is not
    /// failed, a drive of another pool, or one too small for the pool's layout (its data and
    /// its checksum area, if it has one).
    pub fn replace_member(
        &mut self,
        slot: usize,
        mut disk: D,
        drive_uuid: Uuid,
    ) -> Result<Option<D>, StoreError> {
        let mut config = self.image.config.clone();
        let Some(m) = config.pool.members.get(slot) else {
            return Err(StoreError::Config(format!("pool has no slot {slot}")));
        };
        if m.state != MemberState::Failed {
            return Err(StoreError::Config(format!(
                "member slot {slot} is {}: only a failed member is replaced",
                m.state
            )));
        }
        let label = disk.label().to_owned();
        let unsuitable = |why: String| StoreError::Unsuitable {
            drive: label.clone(),
            why,
        };
        if let Some(sb) = probe(&mut disk) {
            if sb.pool_uuid != config.pool.uuid {
                return Err(unsuitable(format!("it belongs to pool {}", sb.pool_uuid)));
            }
        }
        let layout = Layout::for_drive(disk.capacity(), disk.block_size())
            .map_err(|e| unsuitable(e.to_string()))?;
        let Some(model) = self.members.iter().flatten().next().map(|m| m.sb) else {
            return Err(StoreError::Config("no member of the pool is open".into()));
        };
        room_for(&layout, &model.layout, &config).map_err(unsuitable)?;
        let generation = self.written + 1;
        let state = MemberState::Rebuilding { position: 0 };
        // A hot spare taken: no longer a spare in the same generation.
        config.spares.retain(|d| *d != drive_uuid);
        config.pool.members[slot] = PoolMember {
            drive_uuid,
            slot: slot as u32,
            state,
            changed_generation: generation,
        };
        let sb = Superblock {
            drive_uuid,
            member_slot: slot as u32,
            role: Role::Data,
            state,
            copy: SuperblockCopy::Primary,
            layout,
            ..model
        };
        let old = self.members[slot].replace(Member { disk, sb });
        match self.commit(config) {
            Ok(_) => Ok(old.map(|m| m.disk)),
            Err(e) => {
                self.members[slot] = old;
                Err(e)
            }
        }
    }

    /// Reserves `disk` as a hot spare of the pool, as drive `drive_uuid`: the next generation
    /// lists it among the spares, then the drive gets a spare superblock naming the pool (so
    /// every node sees it taken). Refused, with nothing written, for a drive of another pool,
    /// one too small for the pool's layout (its data and its checksum area, if it has one), or
    /// a pool with all its spares.
    pub fn add_spare(&mut self, mut disk: D, drive_uuid: Uuid) -> Result<(), StoreError> {
        let mut config = self.image.config.clone();
        if config.spares.len() >= duplex_ondisk::records::MAX_SPARES {
            return Err(StoreError::Config(format!(
                "the pool has {} spares, the most it keeps",
                config.spares.len()
            )));
        }
        let label = disk.label().to_owned();
        let unsuitable = |why: String| StoreError::Unsuitable {
            drive: label.clone(),
            why,
        };
        if let Some(sb) = probe(&mut disk) {
            return Err(unsuitable(format!("it belongs to pool {}", sb.pool_uuid)));
        }
        let layout = Layout::for_drive(disk.capacity(), disk.block_size())
            .map_err(|e| unsuitable(e.to_string()))?;
        let Some(model) = self.members.iter().flatten().next().map(|m| m.sb) else {
            return Err(StoreError::Config("no member of the pool is open".into()));
        };
        room_for(&layout, &model.layout, &config).map_err(unsuitable)?;
        config.spares.push(drive_uuid);
        self.commit(config)?;
        let sb = Superblock {
            drive_uuid,
            member_slot: u32::MAX,
            role: Role::Spare,
            state: MemberState::Active,
            generation: self.image.generation,
            layout,
            ..model
        };
        for copy in [SuperblockCopy::Primary, SuperblockCopy::Secondary] {
            let sb = Superblock { copy, ..sb };
            let at = sb_offset(&sb, copy)?;
            disk.write(at, &sb.encode_vec()).map_err(disk_err(&disk))?;
        }
        disk.flush().map_err(disk_err(&disk))?;
        Ok(())
    }

    /// Commits `config` as the next generation (see the module docs). Returns its stamp.
    pub fn commit(&mut self, config: PoolConfig) -> Result<Stamp, StoreError> {
        config
            .validate()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        if config.pool.uuid != self.image.config.pool.uuid
            || config.pool.members.len() != self.members.len()
        {
            return Err(StoreError::Config(
                "a commit cannot change the pool's identity or members".into(),
            ));
        }
        if config.checksum_area != self.image.config.checksum_area {
            return Err(StoreError::Config(
                "a commit cannot change the pool's checksum area (fixed when it is made)".into(),
            ));
        }
        let mut config = config;
        let started = std::time::Instant::now();
        loop {
            let failed = self.write_generation(&config)?;
            if failed.is_empty() {
                tracing::info!(
                    pool = %config.pool.name,
                    generation = self.written,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "metadata committed"
                );
                return Ok(self.stamp());
            }
            // Members whose write or flush failed: fail them in the next generation.
            let generation = self.written + 1;
            for &(slot, _) in &failed {
                if let Some(m) = config.pool.members.get_mut(slot) {
                    m.state = MemberState::Failed;
                    m.changed_generation = generation;
                }
                self.members[slot] = None;
            }
            let why = failed
                .iter()
                .map(|(_, e)| e.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            tracing::error!(pool = %config.pool.name, %why, "members failed during a commit: failing them");
            if !enough(&config.pool) || self.members.iter().all(Option::is_none) {
                return Err(StoreError::CommitFailed {
                    pool: config.pool.name.clone(),
                    generation: self.written,
                    why,
                });
            }
        }
    }

    /// Writes one generation to every open member; on success it is in force. Returns the
    /// members that failed (their slot and error); with any, nothing changed in memory.
    fn write_generation(
        &mut self,
        config: &PoolConfig,
    ) -> Result<Vec<(usize, StoreError)>, StoreError> {
        let image = MetadataImage {
            slot_index: self.next_slot,
            generation: self.written + 1,
            epoch: config.ownership.epoch,
            writer_node: self.node,
            config: config.clone(),
        };
        let bytes = self.encode_image(&image)?;
        self.written = image.generation;
        let mut failed = Vec::new();
        for (slot, m) in self.members.iter_mut().enumerate() {
            let Some(m) = m else { continue };
            let at = slot_offset(&m.sb, image.slot_index)?;
            if let Err(e) = m.disk.write(at, &bytes) {
                failed.push((slot, disk_err(&m.disk)(e)));
            }
        }
        for (slot, m) in self.members.iter_mut().enumerate() {
            let Some(m) = m else { continue };
            if failed.iter().any(|(s, _)| *s == slot) {
                continue;
            }
            if let Err(e) = m.disk.flush() {
                failed.push((slot, disk_err(&m.disk)(e)));
            }
        }
        if !failed.is_empty() {
            // The slot was (partly) written: the next attempt goes to the next one, so a
            // complete older image stays on every member.
            self.next_slot = (self.next_slot + 1) % self.slots();
            return Ok(failed);
        }
        let old = std::mem::replace(&mut self.image, image);
        self.next_slot = (self.next_slot + 1) % self.slots();
        let states_changed = old
            .config
            .pool
            .members
            .iter()
            .zip(&self.image.config.pool.members)
            .any(|(a, b)| a.state != b.state)
            || old.config.ownership != self.image.config.ownership;
        if states_changed {
            self.write_superblocks()?;
        }
        Ok(Vec::new())
    }

    /// Rewrites the superblocks of the open members from the configuration in force: every
    /// primary, flush, every secondary, flush (a crash leaves one good copy on each).
    fn write_superblocks(&mut self) -> Result<(), StoreError> {
        let generation = self.image.generation;
        let ownership = self.image.config.ownership;
        let states: Vec<MemberState> = self
            .image
            .config
            .pool
            .members
            .iter()
            .map(|m| m.state)
            .collect();
        for copy in [SuperblockCopy::Primary, SuperblockCopy::Secondary] {
            for (slot, m) in self.members.iter_mut().enumerate() {
                let Some(m) = m else { continue };
                m.sb.generation = generation;
                m.sb.epoch = ownership.epoch;
                m.sb.owner_node = ownership.owner_node;
                if let Some(&s) = states.get(slot) {
                    m.sb.state = s;
                }
                let sb = Superblock { copy, ..m.sb };
                let at = sb_offset(&sb, copy)?;
                m.disk
                    .write(at, &sb.encode_vec())
                    .map_err(disk_err(&m.disk))?;
            }
            for m in self.members.iter_mut().flatten() {
                m.disk.flush().map_err(disk_err(&m.disk))?;
            }
        }
        Ok(())
    }

    /// Erases the pool from its open members: both superblocks zeroed (the drives become
    /// free; the metadata slots are left, unreachable without a superblock).
    pub fn destroy(mut self) -> Result<Vec<D>, StoreError> {
        let zero = vec![0u8; SUPERBLOCK_SIZE];
        for m in self.members.iter_mut().flatten() {
            for copy in [SuperblockCopy::Primary, SuperblockCopy::Secondary] {
                let at = sb_offset(&m.sb, copy)?;
                m.disk.write(at, &zero).map_err(disk_err(&m.disk))?;
            }
            m.disk.flush().map_err(disk_err(&m.disk))?;
        }
        Ok(self.into_disks().into_iter().flatten().collect())
    }
}

/// Whether the members that are not failed still hold all the data.
fn enough(pool: &Pool) -> bool {
    let ok = |m: &PoolMember| !matches!(m.state, MemberState::Failed);
    match pool.raid_level {
        RaidLevel::Raid0 => pool.members.iter().all(ok),
        RaidLevel::Raid1 => pool.members.iter().any(ok),
        RaidLevel::Raid10 => pool.members.chunks(2).all(|pair| pair.iter().any(ok)),
        RaidLevel::Raid5 | RaidLevel::Raid6 => {
            pool.members.iter().filter(|m| !ok(m)).count() <= pool.raid_level.parity()
        }
    }
}

fn slot_offset(sb: &Superblock, slot: u32) -> Result<u64, StoreError> {
    sb.layout
        .metadata_slot_offset(slot)
        .ok_or_else(|| StoreError::Config(format!("metadata slot {slot} is not in the layout")))
}

fn sb_offset(sb: &Superblock, copy: SuperblockCopy) -> Result<u64, StoreError> {
    match copy {
        SuperblockCopy::Primary => Ok(0),
        SuperblockCopy::Secondary => Ok(sb.layout.secondary_offset),
    }
}
