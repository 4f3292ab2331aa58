//! The fixed-size descriptors that travel in the I/O rings.

use bytemuck::{Pod, Zeroable};

/// One I/O request or completion between the fabric and the datapath (64 bytes, one cache line).
///
/// Submissions and completions use the same layout: a completion echoes `tag` and `epoch` and
/// sets `status`. `epoch` is the submitter's generation, so a restarted submitter recognises (and
/// discards, after releasing its buffers) completions addressed to a dead predecessor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct IoDesc {
    /// Submitter's request tag, echoed in the completion.
    pub tag: u64,
    /// Submitter's generation when it submitted.
    pub epoch: u64,
    /// First logical block.
    pub lba: u64,
    /// Volume id.
    pub volume: u32,
    /// Number of logical blocks.
    pub blocks: u32,
    /// Head of the buffer chain in the shared pool, or [`crate::pool::NIL`].
    pub buf: u32,
    /// Payload bytes in the chain.
    pub buf_len: u32,
    /// One of the `OP_*` constants.
    pub opcode: u8,
    /// Request flags (`FLAG_*`).
    pub flags: u8,
    /// Completion status (0 = success); NVMe status code space.
    pub status: u16,
    /// CRC32C of the payload when [`FLAG_CHECKSUM`] is set.
    pub checksum: u32,
    /// Reserved, zero.
    pub reserved: [u64; 2],
}

const _: () = assert!(std::mem::size_of::<IoDesc>() == 64);
const _: () = assert!(std::mem::align_of::<IoDesc>() == 8);

/// Read blocks.
pub const OP_READ: u8 = 0x02;
/// Write blocks.
pub const OP_WRITE: u8 = 0x01;
/// Flush the volatile cache.
pub const OP_FLUSH: u8 = 0x00;
/// Write zeroes to `blocks` blocks from `lba` (no buffer).
pub const OP_WRITE_ZEROES: u8 = 0x08;
/// Deallocate (trim) `blocks` blocks from `lba` (no buffer); later reads return zeroes.
pub const OP_DEALLOCATE: u8 = 0x09;
/// `checksum` holds the CRC32C of the payload.
pub const FLAG_CHECKSUM: u8 = 1;
/// Force unit access: the write is durable when it completes.
pub const FLAG_FUA: u8 = 2;

/// Completion status: success.
pub const STATUS_SUCCESS: u16 = 0x0000;
/// Completion status: invalid field (unknown opcode, bad volume, bad buffer chain).
pub const STATUS_INVALID_FIELD: u16 = 0x0002;
/// Completion status: internal error.
pub const STATUS_INTERNAL: u16 = 0x0006;
/// Completion status: LBA out of range.
pub const STATUS_LBA_OUT_OF_RANGE: u16 = 0x0080;
/// Completion status: reservation conflict (the drive is reserved by another controller: this
/// node has been fenced off it).
pub const STATUS_RESERVATION_CONFLICT: u16 = 0x0083;
/// Completion status: this node is fenced (a drive answered Reservation Conflict to a node
/// that registered a cluster key): nothing more is served. As the fabric reports it: path
/// status Asymmetric Access Inaccessible (SCT 3, SC 02h), so a host retries on its other path.
pub const STATUS_FENCED: u16 = 0x0302;
/// Completion status: the volume is not mapped here (the control plane took it away: a pool
/// moved to the peer controller, or a map change under way). As the fabric reports it: path
/// status Asymmetric Access Transition (SCT 3, SC 03h), so a host retries (on its other path,
/// or once the ANA log says where to).
pub const STATUS_NOT_MAPPED: u16 = 0x0303;
/// Completion status: media error, write fault.
pub const STATUS_WRITE_FAULT: u16 = 0x0280;
/// Completion status: media error, unrecovered read error.
pub const STATUS_READ_ERROR: u16 = 0x0281;
/// Completion status: media error, end-to-end guard check error: a block's protection record
/// (duplex's checksum of its data, LBA and write sequence) does not match what the drive
/// returned. Inside the datapath a RAID device serves such a read from redundancy; a host sees
/// it only where no good copy exists.
pub const STATUS_INTEGRITY: u16 = 0x0282;
/// Completion status: the request was consumed by an incarnation that died before completing it.
pub const STATUS_ABORTED_BY_RESTART: u16 = 0x0107;
