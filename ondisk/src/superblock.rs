//! The drive superblock: 4096 bytes at byte 0 of every member drive, with a copy in the last
//! whole 4 KiB ([`crate::layout::secondary_superblock_offset`]).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `DPLXSB01` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | member slot |
//! | 16 | 16 | cluster UUID |
//! | 32 | 16 | pool UUID |
//! | 48 | 16 | drive UUID |
//! | 64 | 1 | role (1 data, 2 parity, 3 spare) |
//! | 65 | 1 | state (1 active, 2 failed, 3 rebuilding) |
//! | 66 | 1 | copy (1 primary, 2 secondary) |
//! | 67 | 1 | reserved |
//! | 68 | 4 | owner node |
//! | 72 | 8 | rebuild position (blocks; 0 unless rebuilding) |
//! | 80 | 8 | generation at the last update |
//! | 88 | 8 | epoch at the last update |
//! | 96 | 32 | reserved |
//! | 128 | 88 | layout (see [`LAYOUT_OFFSET`] and `docs/ONDISK.md`) |
//! | 216 | 3876 | reserved |
//! | 4092 | 4 | CRC-32C of the 4096 bytes with this field zero |
//!
//! Reserved bytes are written zero and ignored on read.

use crate::bytes::fixed::{get, put, put_u32, put_u64, u32_at, u64_at, u8_at, uuid_at};
use crate::error::{FormatError, Problem, Structure};
use crate::layout::Layout;
use crate::records::MemberState;
use crate::{crc_with_zeroed_field, Stamp, Uuid, FORMAT_VERSION, MAX_NODES};

/// Size of a superblock.
pub const SUPERBLOCK_SIZE: usize = 4096;
/// The superblock's magic number.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"DPLXSB01";

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_SLOT: usize = 12;
const OFF_CLUSTER: usize = 16;
const OFF_POOL: usize = 32;
const OFF_DRIVE: usize = 48;
const OFF_ROLE: usize = 64;
const OFF_STATE: usize = 65;
const OFF_COPY: usize = 66;
const OFF_OWNER: usize = 68;
const OFF_REBUILD: usize = 72;
const OFF_GENERATION: usize = 80;
const OFF_EPOCH: usize = 88;
/// Offset of the recorded layout.
pub const LAYOUT_OFFSET: usize = 128;
const OFF_CAPACITY: usize = 128;
const OFF_BLOCK_SIZE: usize = 136;
const OFF_HB_SLOTS: usize = 140;
const OFF_HB_OFFSET: usize = 144;
const OFF_HB_SLOT_SIZE: usize = 152;
const OFF_MD_SLOTS: usize = 156;
const OFF_MD_OFFSET: usize = 160;
const OFF_MD_SLOT_SIZE: usize = 168;
const OFF_JOURNAL_OFFSET: usize = 176;
const OFF_JOURNAL_SIZE: usize = 184;
const OFF_DATA_OFFSET: usize = 192;
const OFF_DATA_SIZE: usize = 200;
const OFF_SECONDARY: usize = 208;
/// Offset of the CRC-32C.
pub const CRC_OFFSET: usize = 4092;

/// What a drive is to its pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Holds data (every member of RAID 0, 1 and 10).
    Data,
    /// Holds parity (reserved for RAID 5 and 6).
    Parity,
    /// A spare, not yet a member.
    Spare,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Data => 1,
            Role::Parity => 2,
            Role::Spare => 3,
        }
    }
    fn from_code(code: u8) -> Option<Role> {
        Some(match code {
            1 => Role::Data,
            2 => Role::Parity,
            3 => Role::Spare,
            _ => return None,
        })
    }
}

/// Which of the two copies a superblock is: it records its own place, so that a copy found at
/// the other place (a misdirected write) is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SuperblockCopy {
    /// At byte 0.
    Primary,
    /// In the last whole 4 KiB of the drive.
    Secondary,
}

impl SuperblockCopy {
    fn code(self) -> u8 {
        match self {
            SuperblockCopy::Primary => 1,
            SuperblockCopy::Secondary => 2,
        }
    }
}

impl std::fmt::Display for SuperblockCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SuperblockCopy::Primary => "primary",
            SuperblockCopy::Secondary => "secondary",
        })
    }
}

/// A drive superblock: who the drive is, which pool and slot it belongs to, its state, the
/// pool's generation and epoch when it was last written, and the drive's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Superblock {
    /// The cluster the pool belongs to.
    pub cluster_uuid: Uuid,
    /// The pool the drive belongs to.
    pub pool_uuid: Uuid,
    /// The drive's own identity (written once, at format).
    pub drive_uuid: Uuid,
    /// The drive's member slot in the pool.
    pub member_slot: u32,
    /// The drive's role.
    pub role: Role,
    /// The drive's state (with the rebuild position while rebuilding, in blocks of the
    /// layout's block size).
    pub state: MemberState,
    /// The pool's metadata generation when this superblock was written.
    pub generation: u64,
    /// The ownership epoch when this superblock was written.
    pub epoch: u64,
    /// The node that owned the pool when this superblock was written.
    pub owner_node: u32,
    /// Which copy this is.
    pub copy: SuperblockCopy,
    /// Where everything is on this drive.
    pub layout: Layout,
}

impl Superblock {
    /// The (epoch, generation) this superblock was written at.
    pub fn stamp(&self) -> Stamp {
        Stamp {
            epoch: self.epoch,
            generation: self.generation,
        }
    }

    /// The 4096 bytes of this superblock. Reserved bytes are zero.
    pub fn encode(&self) -> Box<[u8; SUPERBLOCK_SIZE]> {
        let mut b = Box::new([0u8; SUPERBLOCK_SIZE]);
        let s = &mut b[..];
        put(s, OFF_MAGIC, &SUPERBLOCK_MAGIC);
        put_u32(s, OFF_VERSION, FORMAT_VERSION);
        put_u32(s, OFF_SLOT, self.member_slot);
        put(s, OFF_CLUSTER, &self.cluster_uuid.0);
        put(s, OFF_POOL, &self.pool_uuid.0);
        put(s, OFF_DRIVE, &self.drive_uuid.0);
        put(s, OFF_ROLE, &[self.role.code()]);
        put(s, OFF_STATE, &[self.state.code()]);
        put(s, OFF_COPY, &[self.copy.code()]);
        put_u32(s, OFF_OWNER, self.owner_node);
        put_u64(s, OFF_REBUILD, self.state.position());
        put_u64(s, OFF_GENERATION, self.generation);
        put_u64(s, OFF_EPOCH, self.epoch);
        let l = &self.layout;
        put_u64(s, OFF_CAPACITY, l.capacity_bytes);
        put_u32(s, OFF_BLOCK_SIZE, l.block_size);
        put_u32(s, OFF_HB_SLOTS, l.heartbeat_slots);
        put_u64(s, OFF_HB_OFFSET, l.heartbeat_offset);
        put_u32(s, OFF_HB_SLOT_SIZE, l.heartbeat_slot_size);
        put_u32(s, OFF_MD_SLOTS, l.metadata_slots);
        put_u64(s, OFF_MD_OFFSET, l.metadata_offset);
        put_u32(s, OFF_MD_SLOT_SIZE, l.metadata_slot_size);
        put_u64(s, OFF_JOURNAL_OFFSET, l.journal_offset);
        put_u64(s, OFF_JOURNAL_SIZE, l.journal_size);
        put_u64(s, OFF_DATA_OFFSET, l.data_offset);
        put_u64(s, OFF_DATA_SIZE, l.data_size);
        put_u64(s, OFF_SECONDARY, l.secondary_offset);
        let crc = crc_with_zeroed_field(s, CRC_OFFSET);
        put_u32(s, CRC_OFFSET, crc);
        b
    }

    /// The 4096 bytes of this superblock as a `Vec`.
    pub fn encode_vec(&self) -> Vec<u8> {
        self.encode().to_vec()
    }

    /// Parses a superblock from the first 4096 bytes of `bytes` (more are ignored).
    ///
    /// Checked in this order: length, magic, version (0 is invalid; a newer version is refused
    /// before its checksum is looked at, since a newer format may place it elsewhere), CRC,
    /// then every field: role, state and copy codes, a zero rebuild position unless
    /// rebuilding, the owner node, and the recorded layout ([`Layout::validate`]).
    pub fn parse(bytes: &[u8]) -> Result<Superblock, FormatError> {
        let err = |offset: usize, problem| {
            FormatError::new(Structure::Superblock, offset as u64, problem)
        };
        let Some(b) = bytes.get(..SUPERBLOCK_SIZE) else {
            return Err(err(
                0,
                Problem::Truncated {
                    needed: SUPERBLOCK_SIZE as u64,
                    available: bytes.len() as u64,
                },
            ));
        };
        let magic: [u8; 8] = get(b, OFF_MAGIC);
        if magic != SUPERBLOCK_MAGIC {
            return Err(err(
                OFF_MAGIC,
                Problem::BadMagic {
                    found: magic,
                    expected: SUPERBLOCK_MAGIC,
                },
            ));
        }
        check_version(b, OFF_VERSION).map_err(|p| err(OFF_VERSION, p))?;
        let stored = u32_at(b, CRC_OFFSET);
        let computed = crc_with_zeroed_field(b, CRC_OFFSET);
        if stored != computed {
            return Err(err(CRC_OFFSET, Problem::BadChecksum { stored, computed }));
        }
        let code = |off: usize, field: &'static str| {
            err(
                off,
                Problem::BadValue {
                    field,
                    value: u64::from(u8_at(b, off)),
                    why: "unknown code",
                },
            )
        };
        let role = Role::from_code(u8_at(b, OFF_ROLE)).ok_or_else(|| code(OFF_ROLE, "role"))?;
        let position = u64_at(b, OFF_REBUILD);
        let state = MemberState::from_code(u8_at(b, OFF_STATE), position)
            .ok_or_else(|| code(OFF_STATE, "state"))?;
        if position != 0 && !matches!(state, MemberState::Rebuilding { .. }) {
            return Err(err(
                OFF_REBUILD,
                Problem::BadValue {
                    field: "rebuild position",
                    value: position,
                    why: "must be 0 unless the drive is rebuilding",
                },
            ));
        }
        let copy = match u8_at(b, OFF_COPY) {
            1 => SuperblockCopy::Primary,
            2 => SuperblockCopy::Secondary,
            _ => return Err(code(OFF_COPY, "copy")),
        };
        let owner_node = u32_at(b, OFF_OWNER);
        if owner_node >= MAX_NODES {
            return Err(err(
                OFF_OWNER,
                Problem::BadValue {
                    field: "owner node",
                    value: u64::from(owner_node),
                    why: "node ids are 0..4",
                },
            ));
        }
        let layout = Layout {
            capacity_bytes: u64_at(b, OFF_CAPACITY),
            block_size: u32_at(b, OFF_BLOCK_SIZE),
            heartbeat_offset: u64_at(b, OFF_HB_OFFSET),
            heartbeat_slot_size: u32_at(b, OFF_HB_SLOT_SIZE),
            heartbeat_slots: u32_at(b, OFF_HB_SLOTS),
            metadata_offset: u64_at(b, OFF_MD_OFFSET),
            metadata_slot_size: u32_at(b, OFF_MD_SLOT_SIZE),
            metadata_slots: u32_at(b, OFF_MD_SLOTS),
            journal_offset: u64_at(b, OFF_JOURNAL_OFFSET),
            journal_size: u64_at(b, OFF_JOURNAL_SIZE),
            data_offset: u64_at(b, OFF_DATA_OFFSET),
            data_size: u64_at(b, OFF_DATA_SIZE),
            secondary_offset: u64_at(b, OFF_SECONDARY),
        };
        layout
            .validate()
            .map_err(|e| err(LAYOUT_OFFSET, Problem::Layout(e)))?;
        Ok(Superblock {
            cluster_uuid: uuid_at(b, OFF_CLUSTER),
            pool_uuid: uuid_at(b, OFF_POOL),
            drive_uuid: uuid_at(b, OFF_DRIVE),
            member_slot: u32_at(b, OFF_SLOT),
            role,
            state,
            generation: u64_at(b, OFF_GENERATION),
            epoch: u64_at(b, OFF_EPOCH),
            owner_node,
            copy,
            layout,
        })
    }
}

/// Checks a format version field: 1 is read, 0 is invalid, anything newer is refused.
pub(crate) fn check_version(b: &[u8], off: usize) -> Result<(), Problem> {
    match u32_at(b, off) {
        FORMAT_VERSION => Ok(()),
        0 => Err(Problem::BadValue {
            field: "format version",
            value: 0,
            why: "versions start at 1",
        }),
        found => Err(Problem::UnsupportedVersion {
            found,
            supported: FORMAT_VERSION,
        }),
    }
}
