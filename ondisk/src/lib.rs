//! duplex-ondisk: the on-disk format of duplex pools, as pure code: no I/O, no `unsafe`, and no
//! panic on any input (every parser takes a byte slice of any length and returns a `Result`;
//! fuzzed in `tests/fuzz.rs`). The byte-by-byte specification is `docs/ONDISK.md`.
//!
//! * [`layout`]: where everything lives on a member drive ([`Layout::for_drive`]); recorded in
//!   the superblock so later versions can move things.
//! * [`superblock`]: the 4 KiB [`Superblock`], at the start and (a copy) at the end of a drive.
//! * [`heartbeat`]: the 4 KiB [`Heartbeat`] slot each node writes to show it is alive.
//! * [`records`]: the typed records of a pool's configuration ([`PoolConfig`]) and their TLV
//!   encoding.
//! * [`image`]: a metadata image, one slot of the metadata ring ([`MetadataImage`]): a header
//!   with its own CRC and a body of records.
//! * [`import`]: the import rule ([`plan_import`]): which image wins, which members are
//!   current, stale or missing, what must be repaired, and when import refuses.
//!
//! All integers are little-endian; every checksum is CRC-32C (Castagnoli).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bytes;
pub mod error;
pub mod heartbeat;
pub mod image;
pub mod import;
pub mod layout;
pub mod records;
pub mod secrets;
pub mod superblock;

pub use error::{
    ConfigError, DriveError, EncodeError, FormatError, Problem, StringProblem, Structure,
};
pub use heartbeat::Heartbeat;
pub use image::{ImageHeader, MetadataImage};
pub use import::{
    plan_import, DriveInput, DriveReport, ImportError, ImportPlan, ImportRequest, MemberStatus,
    Repair,
};
pub use layout::{Layout, LayoutError};
pub use records::{
    checksum_area_bytes, checksum_split, pool_capacity_bytes, ChecksumArea, Extent, MemberState,
    Namespace, Ownership, Pool, PoolConfig, PoolMember, RaidLevel, Reservation,
    ReservationRegistrant, Subsystem, Volume, MAX_RESERVATION_REGISTRANTS,
};
pub use superblock::{Role, Superblock, SuperblockCopy};

use std::fmt;

/// The only format version this code writes and reads, of every structure.
pub const FORMAT_VERSION: u32 = 1;

/// Node ids are `0..MAX_NODES` (one heartbeat slot each).
pub const MAX_NODES: u32 = 4;

/// A 128-bit identifier (cluster, pool, drive, volume, boot), stored as its 16 bytes in order.
///
/// Displayed in the usual 8-4-4-4-12 lowercase hexadecimal form. The all-zero value
/// ([`Uuid::NIL`]) means "none" where a field allows it (a volume's parent) and is refused where
/// an identity is required.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// The all-zero identifier: "none".
    pub const NIL: Uuid = Uuid([0; 16]);

    /// Whether this is [`Uuid::NIL`].
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The version of a metadata image or superblock: the ownership epoch it was written under and
/// the pool's metadata generation. Ordered lexicographically, epoch first: an image from an
/// older epoch is a stale writer's leftover and is older than any image of a newer epoch,
/// whatever its generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp {
    /// Ownership epoch (bumped on every change of owner).
    pub epoch: u64,
    /// Metadata generation (bumped on every commit).
    pub generation: u64,
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {} generation {}", self.epoch, self.generation)
    }
}

/// CRC-32C of `bytes` with the 4-byte field at `crc_at` taken as zero.
///
/// `crc_at + 4` must not exceed `bytes.len()`; callers pass fixed-size blocks.
pub(crate) fn crc_with_zeroed_field(bytes: &[u8], crc_at: usize) -> u32 {
    let (head, rest) = bytes.split_at(crc_at.min(bytes.len()));
    let tail = rest.get(4..).unwrap_or(&[]);
    let crc = crc32c::crc32c(head);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, tail)
}
