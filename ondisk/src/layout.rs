//! Where everything lives on a member drive.
//!
//! ```text
//! 0        primary superblock                 4 KiB
//! 4 KiB    heartbeat slots                    4 × 4 KiB (node ids 0..3)
//! 20 KiB   (reserved, zero)
//! 1 MiB    metadata ring                      8 slots × 2 MiB
//! 17 MiB   journal area                       64 MiB (write-intent bitmap, partial parity log)
//! 81 MiB   data area                          up to the 1 MiB boundary at or below the secondary
//! ...      tail reserve (zero)
//! end-4KiB secondary superblock               4 KiB, in the last whole 4 KiB of the drive
//! ```
//!
//! Every offset and size is a multiple of 4 KiB (and so of the 512- or 4096-byte block size).
//! The layout is recorded in the superblock: readers use the recorded one, so a later version
//! can move areas without breaking older pools. Only the two superblock locations are fixed
//! forever, since they must be found without reading anything else: byte 0, and the last whole
//! 4 KiB of the drive ([`secondary_superblock_offset`]).

/// Everything is aligned to this many bytes.
pub const ALIGN: u64 = 4096;
const MIB: u64 = 1024 * 1024;

/// Size of a superblock copy.
pub const SUPERBLOCK_SIZE: u64 = 4096;
/// Offset of the first heartbeat slot in a new layout.
pub const HEARTBEAT_OFFSET: u64 = 4096;
/// Size of one heartbeat slot in a new layout.
pub const HEARTBEAT_SLOT_SIZE: u32 = 4096;
/// Heartbeat slots in a new layout: one per node id (`0..MAX_NODES`).
pub const HEARTBEAT_SLOTS: u32 = crate::MAX_NODES;
/// Offset of the metadata ring in a new layout.
pub const METADATA_OFFSET: u64 = MIB;
/// Size of one metadata slot in a new layout.
pub const METADATA_SLOT_SIZE: u32 = 2 * 1024 * 1024;
/// Metadata slots (the ring's length) in a new layout.
pub const METADATA_SLOTS: u32 = 8;
/// Size of the journal area in a new layout.
pub const JOURNAL_SIZE: u64 = 64 * MIB;
/// The part of the journal area kept for the write-intent bitmap (first in the area).
pub const BITMAP_AREA: u64 = 16 * MIB;
/// Bytes of a parity pool's stripe journal ring (after the bitmap's part).
pub const STRIPE_JOURNAL: u64 = 16 * MIB;
/// The data area starts and ends on multiples of this in a new layout.
pub const DATA_ALIGN: u64 = MIB;
/// The smallest data area [`Layout::for_drive`] accepts.
pub const MIN_DATA_SIZE: u64 = MIB;

const JOURNAL_OFFSET: u64 = METADATA_OFFSET + METADATA_SLOTS as u64 * METADATA_SLOT_SIZE as u64;
const DATA_OFFSET: u64 = (JOURNAL_OFFSET + JOURNAL_SIZE).div_ceil(DATA_ALIGN) * DATA_ALIGN;

/// The smallest drive [`Layout::for_drive`] accepts: a [`MIN_DATA_SIZE`] data area after the
/// fixed areas, then the secondary superblock (82 MiB + 4 KiB with the current constants).
pub const MIN_CAPACITY: u64 = DATA_OFFSET + MIN_DATA_SIZE + SUPERBLOCK_SIZE;

// Limits a recorded layout must respect (wider than what this version creates).
const MAX_HEARTBEAT_SLOTS: u32 = 64;
const MAX_HEARTBEAT_SLOT_SIZE: u32 = 1024 * 1024;
const MIN_METADATA_SLOTS: u32 = 2;
const MAX_METADATA_SLOTS: u32 = 1024;
const MAX_METADATA_SLOT_SIZE: u32 = 256 * 1024 * 1024;

/// Offset of the secondary superblock on a drive of `capacity` bytes: the last whole 4 KiB.
/// `None` when the drive has no room for two copies.
pub fn secondary_superblock_offset(capacity: u64) -> Option<u64> {
    let end = capacity / ALIGN * ALIGN;
    if end < 2 * SUPERBLOCK_SIZE {
        return None;
    }
    Some(end - SUPERBLOCK_SIZE)
}

/// Where the areas of one drive are, in bytes from the start of the drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    /// The drive's capacity when it was formatted.
    pub capacity_bytes: u64,
    /// The drive's logical block size: 512 or 4096.
    pub block_size: u32,
    /// First heartbeat slot.
    pub heartbeat_offset: u64,
    /// Bytes per heartbeat slot.
    pub heartbeat_slot_size: u32,
    /// Number of heartbeat slots (node ids `0..heartbeat_slots`).
    pub heartbeat_slots: u32,
    /// First metadata slot.
    pub metadata_offset: u64,
    /// Bytes per metadata slot.
    pub metadata_slot_size: u32,
    /// Number of metadata slots in the ring.
    pub metadata_slots: u32,
    /// Journal area.
    pub journal_offset: u64,
    /// Journal area size.
    pub journal_size: u64,
    /// Data area.
    pub data_offset: u64,
    /// Data area size.
    pub data_size: u64,
    /// The secondary superblock (always [`secondary_superblock_offset`] of the capacity).
    pub secondary_offset: u64,
}

/// Why a layout cannot be made or is not valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A block size other than 512 or 4096.
    #[error("Layout: block size {0} is not 512 or 4096")]
    BlockSize(u32),
    /// The capacity is not a whole number of blocks.
    #[error("Layout: drive capacity of {capacity} bytes is not a multiple of its block size {block_size}")]
    CapacityNotBlockMultiple {
        /// The capacity.
        capacity: u64,
        /// The block size.
        block_size: u32,
    },
    /// The drive is smaller than a layout needs.
    #[error(
        "Layout: drive of {capacity} bytes is too small; a pool member needs at least \
         {minimum} bytes (82 MiB + 4 KiB: superblocks, heartbeats, metadata ring, journal \
         and a 1 MiB data area)"
    )]
    TooSmall {
        /// The capacity.
        capacity: u64,
        /// The smallest capacity accepted.
        minimum: u64,
    },
    /// A field that must be a multiple of 4 KiB is not.
    #[error("Layout: {field} = {value} is not a multiple of 4096")]
    Misaligned {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A count or size outside its limits.
    #[error("Layout: {field} = {value} is outside {min}..={max}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The smallest value allowed.
        min: u64,
        /// The largest value allowed.
        max: u64,
    },
    /// An area starts before the previous one ends.
    #[error("Layout: {second} (at byte {start}) starts before {first} ends (at byte {end})")]
    Overlap {
        /// The earlier area.
        first: &'static str,
        /// End of the earlier area.
        end: u64,
        /// The later area.
        second: &'static str,
        /// Start of the later area.
        start: u64,
    },
    /// An area's end overflows.
    #[error("Layout: the end of the {area} overflows")]
    Overflow {
        /// The area.
        area: &'static str,
    },
    /// The drive is smaller than the capacity its layout records.
    #[error(
        "Layout: the drive has {actual} bytes but its superblock records {recorded}; \
         it is not the drive that was formatted, or it shrank"
    )]
    DriveShrank {
        /// The capacity recorded in the layout.
        recorded: u64,
        /// The drive's capacity now.
        actual: u64,
    },
    /// The secondary superblock is not in the last whole 4 KiB of the drive.
    #[error(
        "Layout: secondary superblock at byte {found}, but a drive of {capacity} bytes keeps it \
         at byte {expected}"
    )]
    SecondaryMisplaced {
        /// The recorded offset.
        found: u64,
        /// Where it must be.
        expected: u64,
        /// The recorded capacity.
        capacity: u64,
    },
}

impl Layout {
    /// The layout of a new pool member of `capacity_bytes` with `block_size`-byte blocks.
    pub fn for_drive(capacity_bytes: u64, block_size: u32) -> Result<Layout, LayoutError> {
        check_block_size(capacity_bytes, block_size)?;
        let too_small = LayoutError::TooSmall {
            capacity: capacity_bytes,
            minimum: MIN_CAPACITY,
        };
        if capacity_bytes < MIN_CAPACITY {
            return Err(too_small);
        }
        let secondary_offset = secondary_superblock_offset(capacity_bytes).ok_or(too_small)?;
        let data_end = secondary_offset / DATA_ALIGN * DATA_ALIGN;
        let layout = Layout {
            capacity_bytes,
            block_size,
            heartbeat_offset: HEARTBEAT_OFFSET,
            heartbeat_slot_size: HEARTBEAT_SLOT_SIZE,
            heartbeat_slots: HEARTBEAT_SLOTS,
            metadata_offset: METADATA_OFFSET,
            metadata_slot_size: METADATA_SLOT_SIZE,
            metadata_slots: METADATA_SLOTS,
            journal_offset: JOURNAL_OFFSET,
            journal_size: JOURNAL_SIZE,
            data_offset: DATA_OFFSET,
            data_size: data_end.saturating_sub(DATA_OFFSET),
            secondary_offset,
        };
        layout.validate()?;
        Ok(layout)
    }

    /// Checks that the layout is self-consistent and within the drive: sizes and counts within
    /// limits, everything 4 KiB aligned, the areas in order without overlap (primary
    /// superblock, heartbeats, metadata ring, journal, data, secondary superblock), and the
    /// secondary superblock in the last whole 4 KiB of the recorded capacity.
    pub fn validate(&self) -> Result<(), LayoutError> {
        check_block_size(self.capacity_bytes, self.block_size)?;
        for (field, value) in [
            ("heartbeat_offset", self.heartbeat_offset),
            ("heartbeat_slot_size", u64::from(self.heartbeat_slot_size)),
            ("metadata_offset", self.metadata_offset),
            ("metadata_slot_size", u64::from(self.metadata_slot_size)),
            ("journal_offset", self.journal_offset),
            ("journal_size", self.journal_size),
            ("data_offset", self.data_offset),
            ("data_size", self.data_size),
            ("secondary_offset", self.secondary_offset),
        ] {
            if value % ALIGN != 0 {
                return Err(LayoutError::Misaligned { field, value });
            }
        }
        range(
            "heartbeat_slots",
            u64::from(self.heartbeat_slots),
            1,
            u64::from(MAX_HEARTBEAT_SLOTS),
        )?;
        range(
            "heartbeat_slot_size",
            u64::from(self.heartbeat_slot_size),
            ALIGN,
            u64::from(MAX_HEARTBEAT_SLOT_SIZE),
        )?;
        range(
            "metadata_slots",
            u64::from(self.metadata_slots),
            u64::from(MIN_METADATA_SLOTS),
            u64::from(MAX_METADATA_SLOTS),
        )?;
        range(
            "metadata_slot_size",
            u64::from(self.metadata_slot_size),
            ALIGN,
            u64::from(MAX_METADATA_SLOT_SIZE),
        )?;
        range("data_size", self.data_size, ALIGN, u64::MAX)?;

        let expected =
            secondary_superblock_offset(self.capacity_bytes).ok_or(LayoutError::TooSmall {
                capacity: self.capacity_bytes,
                minimum: MIN_CAPACITY,
            })?;
        if self.secondary_offset != expected {
            return Err(LayoutError::SecondaryMisplaced {
                found: self.secondary_offset,
                expected,
                capacity: self.capacity_bytes,
            });
        }

        let heartbeat_len = u64::from(self.heartbeat_slots) * u64::from(self.heartbeat_slot_size);
        let metadata_len = u64::from(self.metadata_slots) * u64::from(self.metadata_slot_size);
        let areas = [
            ("primary superblock", 0, SUPERBLOCK_SIZE),
            ("heartbeat area", self.heartbeat_offset, heartbeat_len),
            ("metadata area", self.metadata_offset, metadata_len),
            ("journal area", self.journal_offset, self.journal_size),
            ("data area", self.data_offset, self.data_size),
            (
                "secondary superblock",
                self.secondary_offset,
                SUPERBLOCK_SIZE,
            ),
        ];
        let mut prev: (&'static str, u64) = ("start of the drive", 0);
        for (area, start, len) in areas {
            if start < prev.1 {
                return Err(LayoutError::Overlap {
                    first: prev.0,
                    end: prev.1,
                    second: area,
                    start,
                });
            }
            let end = start
                .checked_add(len)
                .ok_or(LayoutError::Overflow { area })?;
            prev = (area, end);
        }
        // The secondary superblock ends at most at the capacity by construction of `expected`.
        Ok(())
    }

    /// Checks the recorded layout against the drive as it is now: a drive smaller than the
    /// recorded capacity is refused (a larger one is fine: the pool uses what it recorded).
    pub fn check_capacity(&self, actual_capacity: u64) -> Result<(), LayoutError> {
        if actual_capacity < self.capacity_bytes {
            return Err(LayoutError::DriveShrank {
                recorded: self.capacity_bytes,
                actual: actual_capacity,
            });
        }
        Ok(())
    }

    /// Byte offset of metadata slot `index`, if the ring has it.
    pub fn metadata_slot_offset(&self, index: u32) -> Option<u64> {
        (index < self.metadata_slots).then(|| {
            self.metadata_offset
                .saturating_add(u64::from(index) * u64::from(self.metadata_slot_size))
        })
    }

    /// Byte offset of node `node`'s heartbeat slot, if there is one.
    pub fn heartbeat_slot_offset(&self, node: u32) -> Option<u64> {
        (node < self.heartbeat_slots).then(|| {
            self.heartbeat_offset
                .saturating_add(u64::from(node) * u64::from(self.heartbeat_slot_size))
        })
    }

    /// Where a parity pool's stripe journal ring is: the journal area's bytes after the
    /// write-intent bitmap's part ([`BITMAP_AREA`]), at most [`STRIPE_JOURNAL`] of them;
    /// `None` when the area is too small to hold 1 MiB of it.
    pub fn stripe_journal(&self) -> Option<(u64, u64)> {
        let start = self.journal_offset.checked_add(BITMAP_AREA)?;
        let len = STRIPE_JOURNAL.min(self.journal_size.checked_sub(BITMAP_AREA)?);
        (len >= 1024 * 1024).then_some((start, len))
    }

    /// Where a mirror's write-intent bitmap is: the journal area's first [`BITMAP_AREA`]
    /// bytes; `None` when the area is smaller.
    pub fn write_intent(&self) -> Option<(u64, u64)> {
        (self.journal_size >= BITMAP_AREA).then_some((self.journal_offset, BITMAP_AREA))
    }

    /// Byte offset just past the data area.
    pub fn data_end(&self) -> u64 {
        self.data_offset.saturating_add(self.data_size)
    }

    /// The ring position after `index` (where the next commit goes).
    pub fn next_metadata_slot(&self, index: u32) -> u32 {
        match self.metadata_slots {
            0 => 0,
            n => (index % n + 1) % n,
        }
    }
}

fn check_block_size(capacity: u64, block_size: u32) -> Result<(), LayoutError> {
    if block_size != 512 && block_size != 4096 {
        return Err(LayoutError::BlockSize(block_size));
    }
    if capacity % u64::from(block_size) != 0 {
        return Err(LayoutError::CapacityNotBlockMultiple {
            capacity,
            block_size,
        });
    }
    Ok(())
}

fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), LayoutError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(LayoutError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    }
}
