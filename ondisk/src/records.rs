//! The records of a pool's configuration and their encoding.
//!
//! A metadata image's body is a sequence of records, each a TLV:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 2 | type |
//! | 2 | 2 | flags (bit 0: must-understand; other bits reserved, zero) |
//! | 4 | 4 | payload length |
//! | 8 | length | payload |
//!
//! A record type this code does not know is skipped when its must-understand flag is clear and
//! refuses the image when it is set. Payloads are fields in order, little-endian, with strings
//! as a u16 byte length and UTF-8, and lists as a count then the items; a known record's payload
//! must be exactly its fields. `docs/ONDISK.md` lists every payload.
//!
//! [`PoolConfig`] is all records of one image; [`PoolConfig::validate`] checks each record's
//! limits and the rules across records. Nothing invalid is ever encoded, and nothing invalid
//! decodes.

use std::collections::BTreeSet;
use std::fmt;

use crate::bytes::{Reader, Writer};
use crate::error::{ConfigError, EncodeError, FormatError, Problem, StringProblem, Structure};
use crate::{Uuid, MAX_NODES};

/// Size of a record's type/flags/length header.
pub const RECORD_HEADER_SIZE: usize = 8;
/// Record flag: a reader that does not know the type must refuse the image.
pub const FLAG_MUST_UNDERSTAND: u16 = 1;

/// Record type: [`Pool`].
pub const TYPE_POOL: u16 = 1;
/// Record type: [`Ownership`].
pub const TYPE_OWNERSHIP: u16 = 2;
/// Record type: the cluster configuration generation.
pub const TYPE_CLUSTER_CONFIG: u16 = 3;
/// Record type: [`Subsystem`].
pub const TYPE_SUBSYSTEM: u16 = 4;
/// Record type: [`Volume`].
pub const TYPE_VOLUME: u16 = 5;
/// Record type: [`Namespace`].
pub const TYPE_NAMESPACE: u16 = 6;
/// Record type: a hot spare of the pool (its drive UUID).
pub const TYPE_SPARE: u16 = 7;
/// Record type: the pool's write sequence mark ([`PoolConfig::write_seq_mark`]).
pub const TYPE_WRITE_SEQ: u16 = 8;
/// Record type: the pool's checksum area ([`PoolConfig::checksum_area`]).
pub const TYPE_CHECKSUM_AREA: u16 = 9;
/// Record type: [`Reservation`], the persistent NVMe reservation state of one namespace.
pub const TYPE_RESERVATION: u16 = 10;
/// Record type: [`HostSecret`], a host's DH-HMAC-CHAP secrets on a subsystem, sealed.
pub const TYPE_HOST_SECRET: u16 = 11;
/// Longest sealed secrets blob of a host ([`crate::secrets`]).
pub const MAX_SEALED_SECRET_BYTES: usize = 512;
/// Most hot spares a pool keeps.
pub const MAX_SPARES: usize = 8;
/// Bytes of one entry of a checksum area (one per logical block of the member data area).
pub const CHECKSUM_ENTRY_BYTES: u16 = 16;
/// The block size a checksum area is sized for: the smallest logical block size (512), so
/// that the area is big enough whatever the members' block size (16 bytes per 512 bytes of
/// data; a member with 4096-byte blocks uses an eighth of it).
pub const CHECKSUM_SIZING_BLOCK: u32 = 512;
/// Checksum areas start and end on multiples of this.
pub const CHECKSUM_ALIGN: u64 = 4096;
/// Most registrants of one namespace's reservation state (the NVMe reservations model's
/// limit: a Register beyond it is refused).
pub const MAX_RESERVATION_REGISTRANTS: usize = 64;
/// Reservation record flag: Persist Through Power Loss ([`Reservation::ptpl`]). The other
/// bits are reserved and refused when set.
pub const RESERVATION_FLAG_PTPL: u8 = 1;
/// Highest NVMe reservation type (RTYPE): 1..=6 are the types, 0 means no reservation.
pub const MAX_RESERVATION_TYPE: u8 = 6;

/// Longest pool or volume name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest NQN, in bytes (NVMe Base Specification).
pub const MAX_NQN_LEN: usize = 223;
/// Longest subsystem serial number (the NVMe Identify field's width).
pub const MAX_SERIAL_LEN: usize = 20;
/// Longest subsystem model number (the NVMe Identify field's width).
pub const MAX_MODEL_LEN: usize = 40;
/// Most allowed hosts of a subsystem.
pub const MAX_HOSTS: usize = 1024;
/// Largest namespace id.
pub const MAX_NSID: u32 = 1024;
/// Most members of a pool.
pub const MAX_MEMBERS: usize = 64;
/// Smallest chunk size.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk size.
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024;

/// Encoded size of one pool member entry.
const MEMBER_SIZE: u64 = 16 + 4 + 1 + 8 + 8;
/// Encoded size of one extent.
const EXTENT_SIZE: u64 = 24;
/// Encoded size of one reservation registrant: host identifier, key, controller id.
const REGISTRANT_SIZE: u64 = 16 + 8 + 2;

/// A pool's RAID level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RaidLevel {
    /// Striping, no redundancy (scratch pools): every member is needed.
    Raid0,
    /// Mirroring across all members: one current member is enough.
    Raid1,
    /// Striping over mirror pairs (member slots 0+1, 2+3, ...): one current member of each
    /// pair is needed.
    Raid10,
    /// Rotating single parity: all members but one are needed.
    Raid5,
    /// Rotating double parity (P and Q): all members but two are needed.
    Raid6,
}

impl RaidLevel {
    /// The level's on-disk code (0, 1, 10, 5 or 6).
    pub fn code(self) -> u8 {
        match self {
            RaidLevel::Raid0 => 0,
            RaidLevel::Raid1 => 1,
            RaidLevel::Raid10 => 10,
            RaidLevel::Raid5 => 5,
            RaidLevel::Raid6 => 6,
        }
    }

    /// Members whose loss the level survives in every case (the parity columns of RAID 5 and
    /// 6; one for RAID 10, whose pairs each survive one; members - 1 for RAID 1).
    pub fn parity(self) -> usize {
        match self {
            RaidLevel::Raid5 => 1,
            RaidLevel::Raid6 => 2,
            _ => 0,
        }
    }
}

impl fmt::Display for RaidLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RAID {}", self.code())
    }
}

/// The state of a member drive (in the pool record and in the drive's own superblock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// In service: receives every write, may be read.
    Active,
    /// Out of service: receives nothing, never read.
    Failed,
    /// Being rebuilt: blocks below `position` are rebuilt (it receives every write; reads are
    /// the raid service's business).
    Rebuilding {
        /// Blocks (of the drive's block size) of the data area already rebuilt.
        position: u64,
    },
}

impl MemberState {
    pub(crate) fn code(self) -> u8 {
        match self {
            MemberState::Active => 1,
            MemberState::Failed => 2,
            MemberState::Rebuilding { .. } => 3,
        }
    }

    /// The rebuild position, 0 unless rebuilding.
    pub fn position(self) -> u64 {
        match self {
            MemberState::Rebuilding { position } => position,
            _ => 0,
        }
    }

    pub(crate) fn from_code(code: u8, position: u64) -> Option<MemberState> {
        Some(match code {
            1 => MemberState::Active,
            2 => MemberState::Failed,
            3 => MemberState::Rebuilding { position },
            _ => return None,
        })
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemberState::Active => f.write_str("active"),
            MemberState::Failed => f.write_str("failed"),
            MemberState::Rebuilding { position } => write!(f, "rebuilding at block {position}"),
        }
    }
}

/// One member drive of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolMember {
    /// The drive (its superblock's drive UUID).
    pub drive_uuid: Uuid,
    /// Its slot: the position in the RAID geometry (`0..members`).
    pub slot: u32,
    /// Its state.
    pub state: MemberState,
    /// The generation of the commit that last changed its state.
    pub changed_generation: u64,
}

/// The pool record: the pool's identity, geometry and members.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pool {
    /// The pool's name (1..=64 bytes, no control characters).
    pub name: String,
    /// The pool's identity (every member's superblock names it).
    pub uuid: Uuid,
    /// The RAID level.
    pub raid_level: RaidLevel,
    /// Chunk (stripe unit) size in bytes: a power of two in 4 KiB..=1 MiB.
    pub chunk_size: u32,
    /// Bytes of each member's data area the pool uses: the smallest member's data area when
    /// the pool was created (fixed for the pool's life).
    pub member_data_bytes: u64,
    /// The members.
    pub members: Vec<PoolMember>,
}

/// Where a pool whose members keep no integrity records in their LBA format's metadata keeps
/// them instead: `len` bytes from byte `offset` of every member drive, after the part of the
/// data area the pool uses, holding one [`CHECKSUM_ENTRY_BYTES`]-byte entry per logical block
/// of the member data area (`docs/ONDISK.md`, "Checksum area").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChecksumArea {
    /// First byte of the area, from the start of each member drive (4 KiB aligned).
    pub offset: u64,
    /// Bytes of the area (a multiple of 4 KiB, at least [`checksum_area_bytes`] of the member
    /// data bytes in 512-byte blocks).
    pub len: u64,
}

/// Bytes of the checksum area for `member_data_bytes` of data in blocks of `block_size` bytes:
/// one 16-byte entry per block (a partial block counts whole), rounded up to 4 KiB.
/// (`block_size` 0 is taken as 512.)
pub fn checksum_area_bytes(member_data_bytes: u64, block_size: u32) -> u64 {
    let bs = u64::from(if block_size == 0 {
        CHECKSUM_SIZING_BLOCK
    } else {
        block_size
    });
    let entries = member_data_bytes.div_ceil(bs);
    // At most 2^64 / 512 entries of 16 bytes: no overflow.
    let bytes = entries.saturating_mul(u64::from(CHECKSUM_ENTRY_BYTES));
    bytes
        .div_ceil(CHECKSUM_ALIGN)
        .saturating_mul(CHECKSUM_ALIGN)
}

/// How a member data area of `data_area_bytes` is shared between a pool's data and its
/// checksum area: the largest whole number of chunks `d` such that `d` and the checksum area
/// for `d` (sized for 512-byte blocks, [`checksum_area_bytes`]) fit. Returns `(d, area
/// bytes)`; `None` when not even one chunk fits (or the chunk size is 0).
pub fn checksum_split(data_area_bytes: u64, chunk_size: u32) -> Option<(u64, u64)> {
    let chunk = u64::from(chunk_size);
    if chunk == 0 {
        return None;
    }
    let fits = |chunks: u64| {
        chunks
            .checked_mul(chunk)
            .map(|d| (d, checksum_area_bytes(d, CHECKSUM_SIZING_BLOCK)))
            .filter(|&(d, area)| d.checked_add(area).is_some_and(|t| t <= data_area_bytes))
    };
    // The area is 1/32 of the data, plus less than 4 KiB of rounding: start from the data's
    // 32/33 of the space and correct by whole chunks.
    let estimate = u128::from(data_area_bytes) * 32 / 33 / u128::from(chunk);
    let mut chunks = u64::try_from(estimate).unwrap_or(u64::MAX);
    while chunks > 0 && fits(chunks).is_none() {
        chunks -= 1;
    }
    while chunks < u64::MAX && fits(chunks + 1).is_some() {
        chunks += 1;
    }
    if chunks == 0 {
        return None;
    }
    fits(chunks)
}

impl ChecksumArea {
    /// Checks the record's own rules: offset and length 4 KiB aligned, length not 0, the end
    /// within `u64`.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |why: String| ConfigError::ChecksumArea {
            offset: self.offset,
            len: self.len,
            why,
        };
        if self.offset % CHECKSUM_ALIGN != 0 || self.len % CHECKSUM_ALIGN != 0 {
            return Err(bad("offset and length must be multiples of 4096".into()));
        }
        if self.len == 0 {
            return Err(bad("it is empty".into()));
        }
        if self.offset.checked_add(self.len).is_none() {
            return Err(bad("it ends past 2^64".into()));
        }
        Ok(())
    }

    /// Checks the area against the pool's member data bytes: its own rules, at least one
    /// entry per 512 bytes of member data, and it starts at or after byte `member_data_bytes`
    /// (every data area starts at or after byte 0: [`ChecksumArea::check_layout`] checks it
    /// against a member's real data area).
    pub fn check_pool(&self, member_data_bytes: u64) -> Result<(), ConfigError> {
        self.check()?;
        let need = checksum_area_bytes(member_data_bytes, CHECKSUM_SIZING_BLOCK);
        if self.len < need {
            return Err(ConfigError::ChecksumArea {
                offset: self.offset,
                len: self.len,
                why: format!(
                    "{member_data_bytes} member data bytes need at least {need} bytes \
                     (16 per 512 bytes, rounded up to 4096)"
                ),
            });
        }
        if self.offset < member_data_bytes {
            return Err(ConfigError::ChecksumArea {
                offset: self.offset,
                len: self.len,
                why: format!(
                    "it starts inside the {member_data_bytes} member data bytes the pool uses"
                ),
            });
        }
        Ok(())
    }

    /// Checks the area against a member drive's layout: inside its data area, after the
    /// `member_data_bytes` the pool uses of it (`[data offset + member data bytes, data
    /// offset + data size)`).
    pub fn check_layout(
        &self,
        layout: &crate::layout::Layout,
        member_data_bytes: u64,
    ) -> Result<(), ConfigError> {
        self.check_pool(member_data_bytes)?;
        let start = layout.data_offset.saturating_add(member_data_bytes);
        let end = layout.data_offset.saturating_add(layout.data_size);
        if self.offset < start || self.offset.saturating_add(self.len) > end {
            return Err(ConfigError::ChecksumArea {
                offset: self.offset,
                len: self.len,
                why: format!(
                    "it is not within bytes {start}..{end} of the drive (its data area after \
                     the pool's {member_data_bytes} member data bytes)"
                ),
            });
        }
        Ok(())
    }
}

/// A run of volume blocks mapped to pool blocks. Both are counted in the volume's blocks:
/// the extent maps volume bytes `volume_block × block_size ..` to pool bytes
/// `pool_block × block_size ..`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    /// First volume block.
    pub volume_block: u64,
    /// First pool block (in the volume's block size).
    pub pool_block: u64,
    /// Length in blocks (at least 1).
    pub blocks: u64,
}

/// A volume: an extent map over the pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Volume {
    /// The volume's name (1..=64 bytes, no control characters; unique in the pool).
    pub name: String,
    /// The volume's identity.
    pub uuid: Uuid,
    /// The NGUID its namespaces report (hosts' multipath merges paths on it; not all zero).
    pub nguid: [u8; 16],
    /// Size in blocks.
    pub size_blocks: u64,
    /// Block size: 512 or 4096.
    pub block_size: u32,
    /// Flags; none are defined yet (bit 0 is reserved for thin provisioning) and a set flag is
    /// refused.
    pub flags: u32,
    /// The volume this one is a snapshot of ([`Uuid::NIL`]: none).
    pub parent: Uuid,
    /// The extent map: covers `0..size_blocks` exactly, without overlap (thick volumes; a
    /// grown volume has more than one extent).
    pub extents: Vec<Extent>,
}

/// An NVMe subsystem (cluster-wide: copied into every pool's image).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Subsystem {
    /// The subsystem NQN (`nqn.`..., at most 223 bytes).
    pub nqn: String,
    /// Whether any host may connect.
    pub allow_any_host: bool,
    /// The host NQNs allowed to connect (when not `allow_any_host`).
    pub hosts: Vec<String>,
    /// Serial number (printable ASCII, at most 20 bytes).
    pub serial: String,
    /// Model number (printable ASCII, at most 40 bytes).
    pub model: String,
}

/// A namespace: a volume of this pool exported by a subsystem.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Namespace {
    /// The subsystem's NQN.
    pub subsystem_nqn: String,
    /// Namespace id, 1..=1024.
    pub nsid: u32,
    /// The volume (of this pool).
    pub volume_uuid: Uuid,
    /// ANA group id (not 0).
    pub ana_group: u32,
}

/// One host registered with a namespace's reservation (NVMe Reservation Register).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReservationRegistrant {
    /// The host identifier (HOSTID) the host connected with (not all zero; unique in its
    /// reservation).
    pub host_id: [u8; 16],
    /// The reservation key it registered.
    pub key: u64,
    /// The controller it registered through (shown by Reservation Report).
    pub cntlid: u16,
}

/// The persistent NVMe reservation state of one namespace (NVMe Base Specification 8.19),
/// kept in the image of the pool whose volume the namespace exports, so that both controllers
/// serve the same registrations and reservation and they survive restarts, takeovers and
/// power loss.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reservation {
    /// The subsystem's NQN (the namespace's, a [`Namespace`] record of this image).
    pub subnqn: String,
    /// The namespace id.
    pub nsid: u32,
    /// Bumped by one with every committed change of this namespace's reservation state: a
    /// controller takes only a newer copy than the one it has.
    pub version: u64,
    /// The reservation generation (PRGEN), as Reservation Report shows it.
    pub generation: u32,
    /// The reservation type (RTYPE): 0 no reservation, 1..=6 the NVMe types (1 Write
    /// Exclusive, 2 Exclusive Access, 3 and 4 their Registrants Only forms, 5 and 6 their All
    /// Registrants forms).
    pub rtype: u8,
    /// Persist Through Power Loss: whether the state survives a power loss of the
    /// subsystem (the metadata service clears the state of a namespace without it when it
    /// imports the pool after a power loss; the format keeps whatever it is given).
    pub ptpl: bool,
    /// The holder's host identifier for types 1..=4 (a registrant's); all zero with no
    /// reservation and for types 5 and 6, where every registrant holds it.
    pub holder: [u8; 16],
    /// The registrants, in registration order (at most [`MAX_RESERVATION_REGISTRANTS`]).
    pub registrants: Vec<ReservationRegistrant>,
}

/// A host's DH-HMAC-CHAP secrets on a subsystem, sealed with the array's secrets key
/// ([`crate::secrets`]): never in clear text on the drives. The host must be on the
/// subsystem's allow-list; a host without a record connects without authentication.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostSecret {
    /// The subsystem's NQN.
    pub subnqn: String,
    /// The host's NQN.
    pub hostnqn: String,
    /// The sealed secrets ([`crate::secrets::seal`]).
    pub sealed: Vec<u8>,
}

impl HostSecret {
    /// Checks the record's own rules: two valid NQNs, a sealed blob of a known version and a
    /// plausible length.
    pub fn check(&self) -> Result<(), ConfigError> {
        check_nqn("Host secret subsystem NQN", &self.subnqn)?;
        check_nqn("Host secret host NQN", &self.hostnqn)?;
        if let Err(why) = crate::secrets::check_sealed(&self.sealed) {
            return Err(ConfigError::HostSecret {
                subsystem: self.subnqn.clone(),
                host: self.hostnqn.clone(),
                why,
            });
        }
        Ok(())
    }
}

/// Who owns the pool: the only node that may write its metadata, under this epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ownership {
    /// The owner's node id.
    pub owner_node: u32,
    /// The ownership epoch (bumped on every change of owner).
    pub epoch: u64,
}

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A pool record.
    Pool(Pool),
    /// An ownership record.
    Ownership(Ownership),
    /// The cluster configuration generation.
    ClusterConfig {
        /// Generation of the cluster-wide configuration (subsystems) this image carries.
        generation: u64,
    },
    /// A subsystem record.
    Subsystem(Subsystem),
    /// A volume record.
    Volume(Volume),
    /// A namespace record.
    Namespace(Namespace),
    /// A hot spare of the pool: its drive UUID.
    Spare(Uuid),
    /// The pool's write sequence mark.
    WriteSeq {
        /// Above every write sequence number the pool's blocks may carry.
        mark: u64,
    },
    /// The pool's checksum area.
    ChecksumArea(ChecksumArea),
    /// A namespace's reservation state.
    Reservation(Reservation),
    /// A host's sealed secrets.
    HostSecret(HostSecret),
    /// A record of a type this code does not know, without the must-understand flag.
    Skipped {
        /// Its type.
        record_type: u16,
        /// Its flags.
        flags: u16,
        /// Offset of its header.
        offset: u64,
        /// Payload length.
        length: u32,
    },
}

/// Everything one metadata image says about a pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolConfig {
    /// The pool record.
    pub pool: Pool,
    /// The ownership record.
    pub ownership: Ownership,
    /// Generation of the cluster-wide configuration (the subsystems) in this image. Every
    /// pool's image carries a copy; on importing several pools the copy with the highest
    /// cluster generation wins.
    pub cluster_generation: u64,
    /// The cluster's subsystems.
    pub subsystems: Vec<Subsystem>,
    /// The pool's volumes.
    pub volumes: Vec<Volume>,
    /// The namespaces that export this pool's volumes.
    pub namespaces: Vec<Namespace>,
    /// The pool's hot spares (drive UUIDs, at most [`MAX_SPARES`]): free drives reserved for
    /// it, put in a failed member's slot when one fails.
    pub spares: Vec<Uuid>,
    /// Mirror levels: every write sequence number a block of the pool carries (in its
    /// integrity record) is below this mark. The owner commits a higher mark before it numbers
    /// writes past it, so that numbers never repeat across restarts and owners and the newer
    /// of two copies is the one with the higher number. 0: none committed (encoded only when
    /// not 0).
    pub write_seq_mark: u64,
    /// Where members keep the integrity records their LBA format has no metadata for
    /// (`None`: no checksum area; the pool's blocks carry records only on drives formatted
    /// with metadata). Fixed for the pool's life; encoded only when set.
    pub checksum_area: Option<ChecksumArea>,
    /// The persistent reservation state of namespaces of this image (at most one per
    /// namespace; none for a namespace nobody registered with). Removing a namespace must
    /// remove its reservation state in the same commit: a reservation of a namespace the image
    /// does not have is refused. Empty: no record is written.
    pub reservations: Vec<Reservation>,
    /// The sealed DH-HMAC-CHAP secrets of allowed hosts (cluster-wide like the subsystems:
    /// every pool's image carries them). Denying a host or deleting its subsystem must remove
    /// its secrets in the same commit.
    pub host_secrets: Vec<HostSecret>,
}

/// Bytes a pool offers for volumes: each member's data area rounded down to whole chunks, times
/// the members that hold distinct data (RAID 0: every member; RAID 1: one; RAID 10: half).
pub fn pool_capacity_bytes(
    level: RaidLevel,
    members: usize,
    data_area_bytes: u64,
    chunk_size: u32,
) -> Result<u64, ConfigError> {
    check_chunk_size(chunk_size)?;
    check_member_count(level, members)?;
    let chunk = u64::from(chunk_size);
    let per_member = data_area_bytes / chunk * chunk;
    if per_member == 0 {
        return Err(ConfigError::DataArea {
            bytes: data_area_bytes,
            chunk: chunk_size,
        });
    }
    let n = members as u64;
    Ok(match level {
        RaidLevel::Raid0 => per_member.saturating_mul(n),
        RaidLevel::Raid1 => per_member,
        RaidLevel::Raid10 => per_member.saturating_mul(n / 2),
        RaidLevel::Raid5 => per_member.saturating_mul(n - 1),
        RaidLevel::Raid6 => per_member.saturating_mul(n - 2),
    })
}

fn check_chunk_size(chunk_size: u32) -> Result<(), ConfigError> {
    if chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(ConfigError::ChunkSize(chunk_size))
    }
}

fn check_member_count(level: RaidLevel, count: usize) -> Result<(), ConfigError> {
    let (ok, rule) = match level {
        RaidLevel::Raid0 => (count >= 1, "RAID 0 needs 1 to 64 members"),
        RaidLevel::Raid1 => (count >= 1, "RAID 1 needs 1 to 64 members"),
        RaidLevel::Raid10 => (
            count >= 4 && count % 2 == 0,
            "RAID 10 needs an even number of members, 4 to 64",
        ),
        RaidLevel::Raid5 => (count >= 3, "RAID 5 needs 3 to 64 members"),
        RaidLevel::Raid6 => (count >= 4, "RAID 6 needs 4 to 64 members"),
    };
    if ok && count <= MAX_MEMBERS {
        Ok(())
    } else {
        Err(ConfigError::MemberCount { level, count, rule })
    }
}

fn bad_string(field: &'static str, value: &str, problem: StringProblem) -> ConfigError {
    ConfigError::BadString {
        field,
        value: value.to_string(),
        problem,
    }
}

fn check_name(field: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(bad_string(field, value, StringProblem::Empty));
    }
    if value.len() > MAX_NAME_LEN {
        let len = value.len();
        let max = MAX_NAME_LEN;
        return Err(bad_string(
            field,
            value,
            StringProblem::TooLong { len, max },
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(bad_string(field, value, StringProblem::ControlCharacter));
    }
    Ok(())
}

fn check_nqn(field: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.len() > MAX_NQN_LEN {
        let len = value.len();
        let max = MAX_NQN_LEN;
        return Err(bad_string(
            field,
            value,
            StringProblem::TooLong { len, max },
        ));
    }
    if !value.starts_with("nqn.") {
        return Err(bad_string(field, value, StringProblem::NotNqn));
    }
    if value.chars().any(char::is_control) {
        return Err(bad_string(field, value, StringProblem::ControlCharacter));
    }
    Ok(())
}

fn check_ascii(field: &'static str, value: &str, max: usize) -> Result<(), ConfigError> {
    if value.len() > max {
        let len = value.len();
        return Err(bad_string(
            field,
            value,
            StringProblem::TooLong { len, max },
        ));
    }
    if !value.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(bad_string(field, value, StringProblem::NotPrintableAscii));
    }
    Ok(())
}

fn check_uuid(uuid: &Uuid, what: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if uuid.is_nil() {
        Err(ConfigError::NilUuid { what: what() })
    } else {
        Ok(())
    }
}

fn check_node(what: &'static str, node: u32) -> Result<(), ConfigError> {
    if node < MAX_NODES {
        Ok(())
    } else {
        Err(ConfigError::NodeId { what, node })
    }
}

impl Pool {
    /// The pool's capacity in bytes ([`pool_capacity_bytes`]).
    pub fn capacity_bytes(&self) -> Result<u64, ConfigError> {
        pool_capacity_bytes(
            self.raid_level,
            self.members.len(),
            self.member_data_bytes,
            self.chunk_size,
        )
    }

    /// The member in `slot`, if any.
    pub fn member_in_slot(&self, slot: u32) -> Option<&PoolMember> {
        self.members.iter().find(|m| m.slot == slot)
    }

    /// Checks the record's own rules: name, UUIDs, chunk size, member count for the level,
    /// slots exactly `0..n`, members unique, at least one chunk per member.
    pub fn check(&self) -> Result<(), ConfigError> {
        check_name("Pool name", &self.name)?;
        check_uuid(&self.uuid, || format!("Pool {:?} UUID", self.name))?;
        self.capacity_bytes()?;
        let count = self.members.len();
        let mut slots = BTreeSet::new();
        let mut drives = BTreeSet::new();
        for m in &self.members {
            check_uuid(&m.drive_uuid, || {
                format!("Drive UUID of pool member slot {}", m.slot)
            })?;
            if m.slot as usize >= count {
                return Err(ConfigError::MemberSlot {
                    slot: m.slot,
                    count,
                    why: "out of range",
                });
            }
            if !slots.insert(m.slot) {
                return Err(ConfigError::MemberSlot {
                    slot: m.slot,
                    count,
                    why: "repeated",
                });
            }
            if !drives.insert(m.drive_uuid) {
                return Err(ConfigError::Duplicate {
                    what: "member drive",
                    value: m.drive_uuid.to_string(),
                });
            }
        }
        Ok(())
    }
}

impl Volume {
    /// Checks the record's own rules: name, UUID, NGUID, block size, size, flags, parent, and
    /// that the extents cover `0..size_blocks` exactly without overlap.
    pub fn check(&self) -> Result<(), ConfigError> {
        check_name("Volume name", &self.name)?;
        check_uuid(&self.uuid, || format!("Volume {:?} UUID", self.name))?;
        if self.nguid == [0; 16] {
            return Err(ConfigError::NilUuid {
                what: format!("Volume {:?} NGUID", self.name),
            });
        }
        let volume = || self.name.clone();
        if self.block_size != 512 && self.block_size != 4096 {
            return Err(ConfigError::VolumeBlockSize {
                volume: volume(),
                block_size: self.block_size,
            });
        }
        if self.size_blocks == 0 {
            return Err(ConfigError::EmptyVolume { volume: volume() });
        }
        if self.flags != 0 {
            return Err(ConfigError::VolumeFlags {
                volume: volume(),
                flags: self.flags,
            });
        }
        if self.parent == self.uuid {
            return Err(ConfigError::SelfParent { volume: volume() });
        }
        let mut order: Vec<usize> = (0..self.extents.len()).collect();
        for (index, e) in self.extents.iter().enumerate() {
            let pool_end = e
                .pool_block
                .checked_add(e.blocks)
                .and_then(|b| b.checked_mul(u64::from(self.block_size)));
            if e.blocks == 0 || e.volume_block.checked_add(e.blocks).is_none() || pool_end.is_none()
            {
                return Err(ConfigError::BadExtent {
                    volume: volume(),
                    index,
                });
            }
        }
        order.sort_by_key(|&i| self.extents.get(i).map_or(0, |e| e.volume_block));
        // Walk in volume order: each extent must start exactly where the previous one ended.
        let mut next = 0u64;
        let mut prev: Option<usize> = None;
        for i in order {
            let Some(e) = self.extents.get(i) else {
                continue;
            };
            if e.volume_block < next {
                return Err(ConfigError::ExtentOverlap {
                    volume: volume(),
                    first: prev.unwrap_or(i),
                    second: i,
                    block: e.volume_block,
                });
            }
            if e.volume_block > next {
                return Err(ConfigError::ExtentCoverage {
                    volume: volume(),
                    start: next,
                    end: e.volume_block,
                    size: self.size_blocks,
                });
            }
            next = e.volume_block.saturating_add(e.blocks);
            prev = Some(i);
        }
        if next != self.size_blocks {
            let (start, end) = if next < self.size_blocks {
                (next, self.size_blocks)
            } else {
                (self.size_blocks, next)
            };
            return Err(ConfigError::ExtentCoverage {
                volume: volume(),
                start,
                end,
                size: self.size_blocks,
            });
        }
        Ok(())
    }
}

impl Subsystem {
    /// Checks the record's own rules: NQN, host NQNs (valid, unique, at most [`MAX_HOSTS`]),
    /// serial and model.
    pub fn check(&self) -> Result<(), ConfigError> {
        check_nqn("Subsystem NQN", &self.nqn)?;
        if self.hosts.len() > MAX_HOSTS {
            return Err(ConfigError::TooMany {
                what: "allowed hosts",
                count: self.hosts.len(),
                max: MAX_HOSTS,
            });
        }
        let mut seen = BTreeSet::new();
        for h in &self.hosts {
            check_nqn("Host NQN", h)?;
            if !seen.insert(h.as_str()) {
                return Err(ConfigError::Duplicate {
                    what: "host NQN",
                    value: format!("{h} in subsystem {}", self.nqn),
                });
            }
        }
        check_ascii("Subsystem serial", &self.serial, MAX_SERIAL_LEN)?;
        check_ascii("Subsystem model", &self.model, MAX_MODEL_LEN)
    }
}

impl Namespace {
    /// Checks the record's own rules: subsystem NQN, nsid range, volume UUID, ANA group id.
    pub fn check(&self) -> Result<(), ConfigError> {
        check_nqn("Namespace subsystem NQN", &self.subsystem_nqn)?;
        if !(1..=MAX_NSID).contains(&self.nsid) {
            return Err(ConfigError::Nsid {
                subsystem: self.subsystem_nqn.clone(),
                nsid: self.nsid,
            });
        }
        check_uuid(&self.volume_uuid, || {
            format!(
                "Volume UUID of namespace {} of {}",
                self.nsid, self.subsystem_nqn
            )
        })?;
        if self.ana_group == 0 {
            return Err(ConfigError::AnaGroup {
                subsystem: self.subsystem_nqn.clone(),
                nsid: self.nsid,
            });
        }
        Ok(())
    }
}

/// The NVMe name of reservation type `rtype`, for messages.
fn reservation_type_name(rtype: u8) -> &'static str {
    match rtype {
        0 => "no reservation",
        1 => "Write Exclusive",
        2 => "Exclusive Access",
        3 => "Write Exclusive - Registrants Only",
        4 => "Exclusive Access - Registrants Only",
        5 => "Write Exclusive - All Registrants",
        6 => "Exclusive Access - All Registrants",
        _ => "unknown",
    }
}

impl Reservation {
    /// Checks the record's own rules: subsystem NQN, nsid range, reservation type 0..=6, at
    /// most [`MAX_RESERVATION_REGISTRANTS`] registrants with distinct host identifiers that
    /// are not all zero; types 1..=4 have a holder that is a registrant, no reservation and
    /// types 5 and 6 have none (all zero), and types 5 and 6 have at least one registrant.
    pub fn check(&self) -> Result<(), ConfigError> {
        check_nqn("Reservation subsystem NQN", &self.subnqn)?;
        let bad = |why: String| ConfigError::Reservation {
            subsystem: self.subnqn.clone(),
            nsid: self.nsid,
            why,
        };
        if !(1..=MAX_NSID).contains(&self.nsid) {
            return Err(bad(format!("nsid is outside 1..={MAX_NSID}")));
        }
        if self.rtype > MAX_RESERVATION_TYPE {
            return Err(bad(format!(
                "reservation type {} is not an NVMe type (0 for none, 1 to 6)",
                self.rtype
            )));
        }
        if self.registrants.len() > MAX_RESERVATION_REGISTRANTS {
            return Err(bad(format!(
                "{} registrants, at most {MAX_RESERVATION_REGISTRANTS}",
                self.registrants.len()
            )));
        }
        let mut hosts = BTreeSet::new();
        for (i, r) in self.registrants.iter().enumerate() {
            if r.host_id == [0; 16] {
                return Err(bad(format!(
                    "registrant {i} has the all-zero host identifier"
                )));
            }
            if !hosts.insert(r.host_id) {
                return Err(bad(format!("host {} is registered twice", Uuid(r.host_id))));
            }
        }
        let name = reservation_type_name(self.rtype);
        let holder = Uuid(self.holder);
        match self.rtype {
            1..=4 if self.holder == [0; 16] => Err(bad(format!(
                "a type {} ({name}) reservation has no holder",
                self.rtype
            ))),
            1..=4 if !hosts.contains(&self.holder) => Err(bad(format!(
                "the holder {holder} of the type {} ({name}) reservation is not a registrant",
                self.rtype
            ))),
            0 if self.holder != [0; 16] => Err(bad(format!(
                "no reservation is held, but holder {holder} is named"
            ))),
            5 | 6 if self.holder != [0; 16] => Err(bad(format!(
                "a type {} ({name}) reservation is held by every registrant, but holder \
                 {holder} is named",
                self.rtype
            ))),
            5 | 6 if self.registrants.is_empty() => Err(bad(format!(
                "a type {} ({name}) reservation has no registrants",
                self.rtype
            ))),
            _ => Ok(()),
        }
    }
}

impl Ownership {
    /// Checks the owner's node id.
    pub fn check(&self) -> Result<(), ConfigError> {
        check_node("Owner", self.owner_node)
    }
}

impl PoolConfig {
    /// The pool's capacity in bytes.
    pub fn capacity_bytes(&self) -> Result<u64, ConfigError> {
        self.pool.capacity_bytes()
    }

    /// Checks every record's own rules, then the rules across records: unique subsystem NQNs,
    /// volume names, UUIDs and NGUIDs, and (subsystem, nsid) pairs; every namespace names a
    /// subsystem of the image and a volume of this pool; at most one reservation per
    /// namespace, of a namespace of this image; every extent lies within the pool's
    /// capacity and no two extents (of one volume or of two) map the same pool byte.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.pool.check()?;
        self.ownership.check()?;
        let mut nqns = BTreeSet::new();
        for s in &self.subsystems {
            s.check()?;
            if !nqns.insert(s.nqn.as_str()) {
                return Err(ConfigError::Duplicate {
                    what: "subsystem NQN",
                    value: s.nqn.clone(),
                });
            }
        }
        let mut names = BTreeSet::new();
        let mut uuids = BTreeSet::new();
        let mut nguids = BTreeSet::new();
        for v in &self.volumes {
            v.check()?;
            if !names.insert(v.name.as_str()) {
                return Err(ConfigError::Duplicate {
                    what: "volume name",
                    value: format!("{:?}", v.name),
                });
            }
            if !uuids.insert(v.uuid) {
                return Err(ConfigError::Duplicate {
                    what: "volume UUID",
                    value: v.uuid.to_string(),
                });
            }
            if !nguids.insert(v.nguid) {
                return Err(ConfigError::Duplicate {
                    what: "volume NGUID",
                    value: Uuid(v.nguid).to_string(),
                });
            }
        }
        if self.spares.len() > MAX_SPARES {
            return Err(ConfigError::TooMany {
                what: "spares",
                count: self.spares.len(),
                max: MAX_SPARES,
            });
        }
        let mut spares = BTreeSet::new();
        for d in &self.spares {
            if !spares.insert(*d) || self.pool.members.iter().any(|m| m.drive_uuid == *d) {
                return Err(ConfigError::Duplicate {
                    what: "drive UUID (a spare is no member and listed once)",
                    value: d.to_string(),
                });
            }
        }
        if let Some(area) = &self.checksum_area {
            area.check_pool(self.pool.member_data_bytes)?;
        }
        let mut nsids = BTreeSet::new();
        for n in &self.namespaces {
            n.check()?;
            if !nsids.insert((n.subsystem_nqn.as_str(), n.nsid)) {
                return Err(ConfigError::Duplicate {
                    what: "namespace",
                    value: format!("{} of {}", n.nsid, n.subsystem_nqn),
                });
            }
            if !nqns.contains(n.subsystem_nqn.as_str()) {
                return Err(ConfigError::UnknownSubsystem {
                    subsystem: n.subsystem_nqn.clone(),
                    nsid: n.nsid,
                });
            }
            if !uuids.contains(&n.volume_uuid) {
                return Err(ConfigError::UnknownVolume {
                    subsystem: n.subsystem_nqn.clone(),
                    nsid: n.nsid,
                    volume: n.volume_uuid,
                });
            }
        }
        let mut reserved = BTreeSet::new();
        for r in &self.reservations {
            r.check()?;
            let bad = |why: &str| ConfigError::Reservation {
                subsystem: r.subnqn.clone(),
                nsid: r.nsid,
                why: why.to_string(),
            };
            if !reserved.insert((r.subnqn.as_str(), r.nsid)) {
                return Err(bad("a second reservation record for this namespace"));
            }
            if !nsids.contains(&(r.subnqn.as_str(), r.nsid)) {
                return Err(bad(
                    "this image has no such namespace (removing a namespace removes its \
                     reservation state)",
                ));
            }
        }
        let mut secrets = BTreeSet::new();
        for h in &self.host_secrets {
            h.check()?;
            let bad = |why: &str| ConfigError::HostSecret {
                subsystem: h.subnqn.clone(),
                host: h.hostnqn.clone(),
                why: why.to_string(),
            };
            if !secrets.insert((h.subnqn.as_str(), h.hostnqn.as_str())) {
                return Err(bad("a second secrets record for this host"));
            }
            let allowed = self
                .subsystems
                .iter()
                .any(|s| s.nqn == h.subnqn && s.hosts.contains(&h.hostnqn));
            if !allowed {
                return Err(bad(
                    "the host is not on the subsystem's allow-list (denying a host removes its \
                     secrets)",
                ));
            }
        }
        self.check_pool_space()
    }

    /// Every extent within the pool's capacity, no pool byte mapped twice.
    fn check_pool_space(&self) -> Result<(), ConfigError> {
        let capacity = self.pool.capacity_bytes()?;
        // (start, end, volume index), in pool bytes.
        let mut spans: Vec<(u128, u128, usize)> = Vec::new();
        for (vi, v) in self.volumes.iter().enumerate() {
            let bs = u128::from(v.block_size);
            for (index, e) in v.extents.iter().enumerate() {
                let start = u128::from(e.pool_block) * bs;
                let end = start + u128::from(e.blocks) * bs;
                if end > u128::from(capacity) {
                    return Err(ConfigError::ExtentOutsidePool {
                        volume: v.name.clone(),
                        index,
                        end,
                        capacity,
                    });
                }
                spans.push((start, end, vi));
            }
        }
        spans.sort_unstable();
        let mut reach: Option<(u128, usize)> = None;
        for (start, end, vi) in spans {
            if let Some((prev_end, prev_vi)) = reach {
                if start < prev_end {
                    let name = |i: usize| self.volumes.get(i).map(|v| v.name.clone());
                    return Err(ConfigError::PoolOverlap {
                        first: name(prev_vi).unwrap_or_default(),
                        second: name(vi).unwrap_or_default(),
                        at: start,
                    });
                }
            }
            reach = Some((end, vi));
        }
        Ok(())
    }

    /// The body of a metadata image: the records in canonical order (pool, ownership, cluster
    /// config, subsystems, volumes, namespaces, spares, write sequence, checksum area,
    /// reservations), each flagged must-understand. Refuses a
    /// configuration that does not [`validate`](Self::validate).
    pub fn encode_body(&self) -> Result<Vec<u8>, EncodeError> {
        self.validate()?;
        let mut out = Vec::new();
        record(&mut out, TYPE_POOL, |w| encode_pool(w, &self.pool));
        record(&mut out, TYPE_OWNERSHIP, |w| {
            w.u32(self.ownership.owner_node);
            w.u64(self.ownership.epoch);
        });
        record(&mut out, TYPE_CLUSTER_CONFIG, |w| {
            w.u64(self.cluster_generation)
        });
        for s in &self.subsystems {
            record(&mut out, TYPE_SUBSYSTEM, |w| encode_subsystem(w, s));
        }
        for v in &self.volumes {
            if u32::try_from(v.extents.len()).is_err() {
                return Err(EncodeError::TooLarge {
                    needed: (v.extents.len() as u64).saturating_mul(EXTENT_SIZE),
                    slot_size: u64::from(u32::MAX),
                });
            }
            record(&mut out, TYPE_VOLUME, |w| encode_volume(w, v));
        }
        for n in &self.namespaces {
            record(&mut out, TYPE_NAMESPACE, |w| {
                w.string(&n.subsystem_nqn);
                w.u32(n.nsid);
                w.uuid(&n.volume_uuid);
                w.u32(n.ana_group);
            });
        }
        for d in &self.spares {
            record(&mut out, TYPE_SPARE, |w| w.uuid(d));
        }
        if self.write_seq_mark != 0 {
            record(&mut out, TYPE_WRITE_SEQ, |w| w.u64(self.write_seq_mark));
        }
        if let Some(area) = &self.checksum_area {
            record(&mut out, TYPE_CHECKSUM_AREA, |w| {
                w.u64(area.offset);
                w.u64(area.len);
                w.u16(CHECKSUM_ENTRY_BYTES);
            });
        }
        for r in &self.reservations {
            record(&mut out, TYPE_RESERVATION, |w| encode_reservation(w, r));
        }
        for h in &self.host_secrets {
            record(&mut out, TYPE_HOST_SECRET, |w| {
                w.string(&h.subnqn);
                w.string(&h.hostnqn);
                // At most MAX_SEALED_SECRET_BYTES after validation.
                w.u16(u16::try_from(h.sealed.len()).unwrap_or(u16::MAX));
                w.buf.extend_from_slice(&h.sealed);
            });
        }
        Ok(out)
    }

    /// Decodes and validates a body on its own (offsets in errors are from the body's start).
    pub fn decode_body(body: &[u8]) -> Result<PoolConfig, FormatError> {
        decode_config(body, 0)
    }
}

/// Appends one record with the must-understand flag; the payload is what `f` writes.
fn record(out: &mut Vec<u8>, record_type: u16, f: impl FnOnce(&mut Writer)) {
    let mut w = Writer::default();
    f(&mut w);
    let len = u32::try_from(w.buf.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&record_type.to_le_bytes());
    out.extend_from_slice(&FLAG_MUST_UNDERSTAND.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&w.buf);
}

fn encode_pool(w: &mut Writer, p: &Pool) {
    w.string(&p.name);
    w.uuid(&p.uuid);
    w.u8(p.raid_level.code());
    w.u32(p.chunk_size);
    w.u64(p.member_data_bytes);
    // At most MAX_MEMBERS after validation.
    w.u16(u16::try_from(p.members.len()).unwrap_or(u16::MAX));
    for m in &p.members {
        w.uuid(&m.drive_uuid);
        w.u32(m.slot);
        w.u8(m.state.code());
        w.u64(m.state.position());
        w.u64(m.changed_generation);
    }
}

fn encode_subsystem(w: &mut Writer, s: &Subsystem) {
    w.string(&s.nqn);
    w.bool(s.allow_any_host);
    w.string(&s.serial);
    w.string(&s.model);
    // At most MAX_HOSTS after validation.
    w.u16(u16::try_from(s.hosts.len()).unwrap_or(u16::MAX));
    for h in &s.hosts {
        w.string(h);
    }
}

fn encode_reservation(w: &mut Writer, r: &Reservation) {
    w.string(&r.subnqn);
    w.u32(r.nsid);
    w.u64(r.version);
    w.u32(r.generation);
    w.u8(r.rtype);
    w.u8(if r.ptpl { RESERVATION_FLAG_PTPL } else { 0 });
    w.buf.extend_from_slice(&r.holder);
    // At most MAX_RESERVATION_REGISTRANTS after validation.
    w.u16(u16::try_from(r.registrants.len()).unwrap_or(u16::MAX));
    for g in &r.registrants {
        w.buf.extend_from_slice(&g.host_id);
        w.u64(g.key);
        w.u16(g.cntlid);
    }
}

fn encode_volume(w: &mut Writer, v: &Volume) {
    w.string(&v.name);
    w.uuid(&v.uuid);
    w.buf.extend_from_slice(&v.nguid);
    w.u64(v.size_blocks);
    w.u32(v.block_size);
    w.u32(v.flags);
    w.uuid(&v.parent);
    w.u32(u32::try_from(v.extents.len()).unwrap_or(u32::MAX));
    for e in &v.extents {
        w.u64(e.volume_block);
        w.u64(e.pool_block);
        w.u64(e.blocks);
    }
}

/// Decodes the records of a body (offsets in errors are from the body's start). Each known
/// record is checked on its own ([`Pool::check`], ...); the rules across records are
/// [`PoolConfig::validate`]'s.
pub fn decode_records(body: &[u8]) -> Result<Vec<Record>, FormatError> {
    Ok(decode_at(body, 0)?.into_iter().map(|(_, r)| r).collect())
}

/// Decodes records, with the offset of each (in reported coordinates: `base` + position).
fn decode_at(body: &[u8], base: u64) -> Result<Vec<(u64, Record)>, FormatError> {
    let mut r = Reader::new(body, base, Structure::RecordHeader);
    let mut out = Vec::new();
    while r.remaining() > 0 {
        let at = r.offset();
        let record_type = r.u16()?;
        let flags = r.u16()?;
        let length = r.u32()?;
        let payload_at = r.offset();
        let payload = r.take(length as usize)?;
        let structure = match record_type {
            TYPE_POOL => Structure::PoolRecord,
            TYPE_OWNERSHIP => Structure::OwnershipRecord,
            TYPE_CLUSTER_CONFIG => Structure::ClusterConfigRecord,
            TYPE_SUBSYSTEM => Structure::SubsystemRecord,
            TYPE_VOLUME => Structure::VolumeRecord,
            TYPE_NAMESPACE => Structure::NamespaceRecord,
            TYPE_SPARE => Structure::SpareRecord,
            TYPE_WRITE_SEQ => Structure::WriteSeqRecord,
            TYPE_CHECKSUM_AREA => Structure::ChecksumAreaRecord,
            TYPE_RESERVATION => Structure::ReservationRecord,
            TYPE_HOST_SECRET => Structure::HostSecretRecord,
            _ if flags & FLAG_MUST_UNDERSTAND != 0 => {
                return Err(r.error_at(at, Problem::UnknownRequiredRecord { record_type }));
            }
            _ => {
                out.push((
                    at,
                    Record::Skipped {
                        record_type,
                        flags,
                        offset: at,
                        length,
                    },
                ));
                continue;
            }
        };
        let mut p = Reader::new(payload, payload_at, structure);
        let rec = match record_type {
            TYPE_POOL => Record::Pool(decode_pool(&mut p)?),
            TYPE_OWNERSHIP => Record::Ownership(Ownership {
                owner_node: p.u32()?,
                epoch: p.u64()?,
            }),
            TYPE_CLUSTER_CONFIG => Record::ClusterConfig {
                generation: p.u64()?,
            },
            TYPE_SUBSYSTEM => Record::Subsystem(decode_subsystem(&mut p)?),
            TYPE_VOLUME => Record::Volume(decode_volume(&mut p)?),
            TYPE_SPARE => Record::Spare(p.uuid()?),
            TYPE_WRITE_SEQ => Record::WriteSeq { mark: p.u64()? },
            TYPE_CHECKSUM_AREA => Record::ChecksumArea(decode_checksum_area(&mut p)?),
            TYPE_RESERVATION => Record::Reservation(decode_reservation(&mut p)?),
            TYPE_HOST_SECRET => Record::HostSecret(decode_host_secret(&mut p)?),
            _ => Record::Namespace(Namespace {
                subsystem_nqn: p.string("subsystem NQN")?,
                nsid: p.u32()?,
                volume_uuid: p.uuid()?,
                ana_group: p.u32()?,
            }),
        };
        p.finish()?;
        let checked = match &rec {
            Record::Pool(x) => x.check(),
            Record::Ownership(x) => x.check(),
            Record::Subsystem(x) => x.check(),
            Record::Volume(x) => x.check(),
            Record::Namespace(x) => x.check(),
            Record::ChecksumArea(x) => x.check(),
            Record::Reservation(x) => x.check(),
            Record::HostSecret(x) => x.check(),
            Record::ClusterConfig { .. }
            | Record::Spare(_)
            | Record::WriteSeq { .. }
            | Record::Skipped { .. } => Ok(()),
        };
        checked.map_err(|e| FormatError::new(structure, at, Problem::Config(e)))?;
        out.push((at, rec));
    }
    Ok(out)
}

fn decode_host_secret(p: &mut Reader<'_>) -> Result<HostSecret, FormatError> {
    let subnqn = p.string("subsystem NQN")?;
    let hostnqn = p.string("host NQN")?;
    let len = usize::from(p.u16()?);
    let at = p.offset();
    if len > MAX_SEALED_SECRET_BYTES {
        return Err(p.error_at(
            at,
            Problem::Config(ConfigError::HostSecret {
                subsystem: subnqn,
                host: hostnqn,
                why: format!("{len} sealed bytes, at most {MAX_SEALED_SECRET_BYTES}"),
            }),
        ));
    }
    let sealed = p.take(len)?.to_vec();
    Ok(HostSecret {
        subnqn,
        hostnqn,
        sealed,
    })
}

fn decode_pool(p: &mut Reader<'_>) -> Result<Pool, FormatError> {
    let name = p.string("pool name")?;
    let uuid = p.uuid()?;
    let level_at = p.offset();
    let raid_level = match p.u8()? {
        0 => RaidLevel::Raid0,
        1 => RaidLevel::Raid1,
        10 => RaidLevel::Raid10,
        5 => RaidLevel::Raid5,
        6 => RaidLevel::Raid6,
        code => {
            return Err(p.error_at(
                level_at,
                Problem::BadValue {
                    field: "RAID level",
                    value: u64::from(code),
                    why: "unknown code",
                },
            ))
        }
    };
    let chunk_size = p.u32()?;
    let member_data_bytes = p.u64()?;
    let count_at = p.offset();
    let count = p.u16()?;
    let count = p.count_fits(count_at, u64::from(count), MEMBER_SIZE)?;
    let mut members = Vec::with_capacity(count);
    for _ in 0..count {
        let drive_uuid = p.uuid()?;
        let slot = p.u32()?;
        let state_at = p.offset();
        let code = p.u8()?;
        let position = p.u64()?;
        let state = MemberState::from_code(code, position).ok_or_else(|| {
            p.error_at(
                state_at,
                Problem::BadValue {
                    field: "member state",
                    value: u64::from(code),
                    why: "unknown code",
                },
            )
        })?;
        if position != 0 && !matches!(state, MemberState::Rebuilding { .. }) {
            return Err(p.error_at(
                state_at + 1,
                Problem::BadValue {
                    field: "member rebuild position",
                    value: position,
                    why: "must be 0 unless the member is rebuilding",
                },
            ));
        }
        members.push(PoolMember {
            drive_uuid,
            slot,
            state,
            changed_generation: p.u64()?,
        });
    }
    Ok(Pool {
        name,
        uuid,
        raid_level,
        chunk_size,
        member_data_bytes,
        members,
    })
}

fn decode_checksum_area(p: &mut Reader<'_>) -> Result<ChecksumArea, FormatError> {
    let offset = p.u64()?;
    let len = p.u64()?;
    let entry_at = p.offset();
    let entry = p.u16()?;
    if entry != CHECKSUM_ENTRY_BYTES {
        return Err(p.error_at(
            entry_at,
            Problem::BadValue {
                field: "checksum entry bytes",
                value: u64::from(entry),
                why: "must be 16",
            },
        ));
    }
    Ok(ChecksumArea { offset, len })
}

fn decode_reservation(p: &mut Reader<'_>) -> Result<Reservation, FormatError> {
    let subnqn = p.string("subsystem NQN")?;
    let nsid = p.u32()?;
    let version = p.u64()?;
    let generation = p.u32()?;
    let rtype_at = p.offset();
    let rtype = p.u8()?;
    if rtype > MAX_RESERVATION_TYPE {
        return Err(p.error_at(
            rtype_at,
            Problem::BadValue {
                field: "reservation type",
                value: u64::from(rtype),
                why: "unknown code (0 for none, 1 to 6 the NVMe types)",
            },
        ));
    }
    let flags_at = p.offset();
    let flags = p.u8()?;
    if flags & !RESERVATION_FLAG_PTPL != 0 {
        return Err(p.error_at(
            flags_at,
            Problem::BadValue {
                field: "reservation flags",
                value: u64::from(flags),
                why: "only bit 0 (Persist Through Power Loss) is defined",
            },
        ));
    }
    let holder = p.array::<16>()?;
    let count_at = p.offset();
    let count = p.u16()?;
    if usize::from(count) > MAX_RESERVATION_REGISTRANTS {
        return Err(p.error_at(
            count_at,
            Problem::BadValue {
                field: "registrant count",
                value: u64::from(count),
                why: "a namespace has at most 64 registrants",
            },
        ));
    }
    let count = p.count_fits(count_at, u64::from(count), REGISTRANT_SIZE)?;
    let mut registrants = Vec::with_capacity(count);
    for _ in 0..count {
        registrants.push(ReservationRegistrant {
            host_id: p.array::<16>()?,
            key: p.u64()?,
            cntlid: p.u16()?,
        });
    }
    Ok(Reservation {
        subnqn,
        nsid,
        version,
        generation,
        rtype,
        ptpl: flags & RESERVATION_FLAG_PTPL != 0,
        holder,
        registrants,
    })
}

fn decode_subsystem(p: &mut Reader<'_>) -> Result<Subsystem, FormatError> {
    let nqn = p.string("subsystem NQN")?;
    let allow_any_host = p.bool("allow any host")?;
    let serial = p.string("serial")?;
    let model = p.string("model")?;
    let count_at = p.offset();
    let count = p.u16()?;
    // Each host takes at least its 2-byte length.
    let count = p.count_fits(count_at, u64::from(count), 2)?;
    let mut hosts = Vec::with_capacity(count);
    for _ in 0..count {
        hosts.push(p.string("host NQN")?);
    }
    Ok(Subsystem {
        nqn,
        allow_any_host,
        hosts,
        serial,
        model,
    })
}

fn decode_volume(p: &mut Reader<'_>) -> Result<Volume, FormatError> {
    let name = p.string("volume name")?;
    let uuid = p.uuid()?;
    let nguid = p.array::<16>()?;
    let size_blocks = p.u64()?;
    let block_size = p.u32()?;
    let flags = p.u32()?;
    let parent = p.uuid()?;
    let count_at = p.offset();
    let count = p.u32()?;
    let count = p.count_fits(count_at, u64::from(count), EXTENT_SIZE)?;
    let mut extents = Vec::with_capacity(count);
    for _ in 0..count {
        extents.push(Extent {
            volume_block: p.u64()?,
            pool_block: p.u64()?,
            blocks: p.u64()?,
        });
    }
    Ok(Volume {
        name,
        uuid,
        nguid,
        size_blocks,
        block_size,
        flags,
        parent,
        extents,
    })
}

/// Decodes a body into a validated [`PoolConfig`]; `base` is the body's offset in reported
/// coordinates (128 inside a metadata slot).
pub(crate) fn decode_config(body: &[u8], base: u64) -> Result<PoolConfig, FormatError> {
    let mut pool = None;
    let mut ownership = None;
    let mut cluster_generation = None;
    let mut subsystems = Vec::new();
    let mut volumes = Vec::new();
    let mut namespaces = Vec::new();
    let mut spares = Vec::new();
    let mut write_seq_mark = None;
    let mut checksum_area = None;
    let mut reservations = Vec::new();
    let mut host_secrets = Vec::new();
    fn once<T>(
        slot: &mut Option<T>,
        v: T,
        at: u64,
        structure: Structure,
        record: &'static str,
    ) -> Result<(), FormatError> {
        if slot.is_some() {
            return Err(FormatError::new(
                structure,
                at,
                Problem::DuplicateRecord { record },
            ));
        }
        *slot = Some(v);
        Ok(())
    }
    for (at, rec) in decode_at(body, base)? {
        match rec {
            Record::Pool(p) => once(&mut pool, p, at, Structure::PoolRecord, "pool")?,
            Record::Ownership(o) => once(
                &mut ownership,
                o,
                at,
                Structure::OwnershipRecord,
                "ownership",
            )?,
            Record::ClusterConfig { generation } => once(
                &mut cluster_generation,
                generation,
                at,
                Structure::ClusterConfigRecord,
                "cluster config",
            )?,
            Record::Subsystem(s) => subsystems.push(s),
            Record::Volume(v) => volumes.push(v),
            Record::Namespace(n) => namespaces.push(n),
            Record::Spare(d) => spares.push(d),
            Record::WriteSeq { mark } => once(
                &mut write_seq_mark,
                mark,
                at,
                Structure::WriteSeqRecord,
                "write sequence",
            )?,
            Record::ChecksumArea(a) => once(
                &mut checksum_area,
                a,
                at,
                Structure::ChecksumAreaRecord,
                "checksum area",
            )?,
            Record::Reservation(r) => reservations.push(r),
            Record::HostSecret(h) => host_secrets.push(h),
            Record::Skipped { .. } => {}
        }
    }
    let missing = |record| {
        FormatError::new(
            Structure::ImageBody,
            base,
            Problem::MissingRecord { record },
        )
    };
    let config = PoolConfig {
        pool: pool.ok_or_else(|| missing("pool"))?,
        ownership: ownership.ok_or_else(|| missing("ownership"))?,
        cluster_generation: cluster_generation.ok_or_else(|| missing("cluster config"))?,
        subsystems,
        volumes,
        namespaces,
        spares,
        write_seq_mark: write_seq_mark.unwrap_or(0),
        checksum_area,
        reservations,
        host_secrets,
    };
    config
        .validate()
        .map_err(|e| FormatError::new(Structure::ImageBody, base, Problem::Config(e)))?;
    Ok(config)
}
