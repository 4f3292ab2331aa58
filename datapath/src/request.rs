//! What a submission asks for: descriptor validation and the errno → status mapping.
//!
//! Pure functions over a descriptor and the volume table, so every field a peer controls is
//! checked in one place (and fuzzed: `tests/fuzz_descriptors.rs`). Buffer ownership is checked by
//! the engine (it needs the pool and the descriptor's ring index).

use duplex_ipc::desc::{
    IoDesc, FLAG_FUA, OP_DEALLOCATE, OP_FLUSH, OP_READ, OP_WRITE, OP_WRITE_ZEROES, STATUS_INTERNAL,
    STATUS_INVALID_FIELD, STATUS_LBA_OUT_OF_RANGE, STATUS_NOT_MAPPED, STATUS_READ_ERROR,
    STATUS_WRITE_FAULT,
};

use crate::map::VolumeMap;

/// `volume` of an `OP_FLUSH` that flushes every volume.
pub const FLUSH_ALL: u32 = u32::MAX;

/// The kinds of request (and of block-device I/O).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Read into the chain.
    Read,
    /// Write from the chain.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Write zeroes.
    WriteZeroes,
    /// Deallocate (reads return zeroes afterwards).
    Deallocate,
}

impl Kind {
    /// For logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Flush => "flush",
            Self::WriteZeroes => "write-zeroes",
            Self::Deallocate => "deallocate",
        }
    }

    /// Whether the opcode moves data through a buffer chain.
    pub fn has_data(self) -> bool {
        matches!(self, Self::Read | Self::Write)
    }
}

/// A validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Command {
    /// What to do.
    pub kind: Kind,
    /// Index in the volume table; `None` for a flush of every volume.
    pub volume: Option<usize>,
    /// First byte.
    pub offset: u64,
    /// Bytes (0 for a flush; may be 0 for a deallocate, which is then a no-op).
    pub len: u64,
    /// `FLAG_FUA`: durable on completion.
    pub fua: bool,
}

/// Why a descriptor is refused: the completion status and a reason for the (rate-limited) log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reject {
    pub status: u16,
    pub why: &'static str,
}

const fn reject(status: u16, why: &'static str) -> Reject {
    Reject { status, why }
}

/// The request kind of an opcode, or a rejection.
pub(crate) fn kind(opcode: u8) -> Result<Kind, Reject> {
    match opcode {
        OP_READ => Ok(Kind::Read),
        OP_WRITE => Ok(Kind::Write),
        OP_FLUSH => Ok(Kind::Flush),
        OP_WRITE_ZEROES => Ok(Kind::WriteZeroes),
        OP_DEALLOCATE => Ok(Kind::Deallocate),
        _ => Err(reject(STATUS_INVALID_FIELD, "unknown opcode")),
    }
}

/// Validates a descriptor's opcode, volume and range against the volume table.
pub(crate) fn decode(desc: &IoDesc, volumes: &[VolumeMap]) -> Result<Command, Reject> {
    let kind = kind(desc.opcode)?;
    let fua = desc.flags & FLAG_FUA != 0;
    if kind == Kind::Flush && desc.volume == FLUSH_ALL {
        return Ok(Command {
            kind,
            volume: None,
            offset: 0,
            len: 0,
            fua,
        });
    }
    let index = volumes
        .iter()
        .position(|v| v.id == desc.volume)
        .ok_or(reject(STATUS_NOT_MAPPED, "volume not mapped here"))?;
    if kind == Kind::Flush {
        return Ok(Command {
            kind,
            volume: Some(index),
            offset: 0,
            len: 0,
            fua,
        });
    }
    if desc.blocks == 0 && kind != Kind::Deallocate {
        return Err(reject(STATUS_INVALID_FIELD, "zero blocks"));
    }
    let (offset, len) = volumes[index]
        .range(desc.lba, desc.blocks)
        .ok_or(reject(STATUS_LBA_OUT_OF_RANGE, "blocks beyond the volume"))?;
    Ok(Command {
        kind,
        volume: Some(index),
        offset,
        len,
        fua,
    })
}

/// The completion status of a failed operation: media errors by direction, everything that
/// points at the datapath itself (bad argument, bad fd, no memory, refused by the ring's
/// restrictions, cancelled) as internal.
pub(crate) fn errno_status(kind: Kind, errno: i32) -> u16 {
    match errno {
        libc::EINVAL
        | libc::EBADF
        | libc::EFAULT
        | libc::EACCES
        | libc::EPERM
        | libc::ENOMEM
        | libc::EAGAIN
        | libc::ECANCELED
        | libc::EOPNOTSUPP
        | libc::ENOSYS => STATUS_INTERNAL,
        _ if kind == Kind::Read => STATUS_READ_ERROR,
        _ => STATUS_WRITE_FAULT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volumes() -> ((), Vec<VolumeMap>) {
        let out = [(1_u32, 512_u32, 100_u64), (7, 4096, 10)]
            .into_iter()
            .map(|(id, bs, blocks)| VolumeMap {
                id,
                name: format!("v{id}"),
                block_size: bs,
                blocks,
                extents: vec![crate::map::Extent {
                    start: 0,
                    blocks,
                    device: 0,
                    device_offset: 0,
                }],
            })
            .collect();
        ((), out)
    }

    fn desc(opcode: u8, volume: u32, lba: u64, blocks: u32) -> IoDesc {
        IoDesc {
            opcode,
            volume,
            lba,
            blocks,
            ..IoDesc::default()
        }
    }

    #[test]
    fn valid_requests_decode_to_byte_ranges() {
        let (_d, v) = volumes();
        let c = decode(&desc(OP_READ, 1, 99, 1), &v).expect("read");
        assert_eq!(
            (c.kind, c.volume, c.offset, c.len),
            (Kind::Read, Some(0), 99 * 512, 512)
        );
        let mut w = desc(OP_WRITE, 7, 2, 8);
        w.flags = FLAG_FUA;
        let c = decode(&w, &v).expect("write");
        assert_eq!(
            (c.volume, c.offset, c.len, c.fua),
            (Some(1), 8192, 32768, true)
        );
        let c = decode(&desc(OP_FLUSH, FLUSH_ALL, 5, 5), &v).expect("flush all");
        assert_eq!(c.volume, None);
        let c = decode(&desc(OP_FLUSH, 7, u64::MAX, 0), &v).expect("flush one");
        assert_eq!(c.volume, Some(1), "a flush ignores lba and blocks");
        let c = decode(&desc(OP_DEALLOCATE, 7, 10, 0), &v).expect("empty deallocate");
        assert_eq!(c.len, 0);
        assert!(decode(&desc(OP_WRITE_ZEROES, 7, 0, 10), &v).is_ok());
    }

    #[test]
    fn invalid_requests_get_their_status() {
        let (_d, v) = volumes();
        let status = |d: IoDesc| decode(&d, &v).map(|_| 0).unwrap_or_else(|r| r.status);
        assert_eq!(status(desc(0x7f, 1, 0, 1)), STATUS_INVALID_FIELD);
        assert_eq!(status(desc(OP_READ, 2, 0, 1)), STATUS_NOT_MAPPED);
        assert_eq!(status(desc(OP_FLUSH, 2, 0, 0)), STATUS_NOT_MAPPED);
        assert_eq!(status(desc(OP_READ, 1, 0, 0)), STATUS_INVALID_FIELD);
        assert_eq!(status(desc(OP_WRITE_ZEROES, 1, 0, 0)), STATUS_INVALID_FIELD);
        assert_eq!(status(desc(OP_READ, 1, 100, 1)), STATUS_LBA_OUT_OF_RANGE);
        assert_eq!(status(desc(OP_WRITE, 1, 99, 2)), STATUS_LBA_OUT_OF_RANGE);
        assert_eq!(
            status(desc(OP_WRITE, 1, u64::MAX, 1)),
            STATUS_LBA_OUT_OF_RANGE
        );
        assert_eq!(
            status(desc(OP_DEALLOCATE, 7, 11, 0)),
            STATUS_LBA_OUT_OF_RANGE
        );
        assert_eq!(
            status(desc(OP_READ, 7, 0, u32::MAX)),
            STATUS_LBA_OUT_OF_RANGE
        );
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno_status(Kind::Read, libc::EIO), STATUS_READ_ERROR);
        assert_eq!(errno_status(Kind::Write, libc::EIO), STATUS_WRITE_FAULT);
        assert_eq!(errno_status(Kind::Flush, libc::ENOSPC), STATUS_WRITE_FAULT);
        assert_eq!(errno_status(Kind::Read, libc::EINVAL), STATUS_INTERNAL);
        assert_eq!(
            errno_status(Kind::Deallocate, libc::EACCES),
            STATUS_INTERNAL
        );
    }
}
