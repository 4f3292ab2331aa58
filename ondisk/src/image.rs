//! A metadata image: what one commit writes into one slot of the metadata ring of every live
//! member. A 128-byte header with its own CRC, then the body (records, [`crate::records`]) with
//! its CRC in the header.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `DPLXMD01` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | slot index (the ring position written) |
//! | 16 | 16 | pool UUID |
//! | 32 | 8 | generation |
//! | 40 | 8 | epoch |
//! | 48 | 4 | writer node |
//! | 52 | 4 | body length |
//! | 56 | 4 | body CRC-32C |
//! | 60 | 64 | reserved |
//! | 124 | 4 | header CRC-32C (of bytes 0..128 with this field zero) |
//! | 128 | body length | body |
//!
//! A write covers the header and body rounded up to 4 KiB; the rest of the slot is not
//! written and never read.

use crate::bytes::fixed::{get, put, put_u32, put_u64, u32_at, u64_at, uuid_at};
use crate::error::{ConfigError, EncodeError, FormatError, Problem, Structure};
use crate::records::{decode_config, PoolConfig};
use crate::superblock::check_version;
use crate::{crc_with_zeroed_field, Stamp, Uuid, FORMAT_VERSION, MAX_NODES};

/// The metadata image's magic number.
pub const IMAGE_MAGIC: [u8; 8] = *b"DPLXMD01";
/// Size of the image header; the body follows it.
pub const IMAGE_HEADER_SIZE: usize = 128;
/// Encoded images are padded with zeros to a multiple of this.
pub const IMAGE_WRITE_ALIGN: usize = 4096;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_SLOT: usize = 12;
const OFF_POOL: usize = 16;
const OFF_GENERATION: usize = 32;
const OFF_EPOCH: usize = 40;
const OFF_WRITER: usize = 48;
const OFF_BODY_LEN: usize = 52;
const OFF_BODY_CRC: usize = 56;
/// Offset of the header CRC-32C.
pub const HEADER_CRC_OFFSET: usize = 124;

/// The header of a metadata image, on its own: enough to tell a torn body (header valid, body
/// checksum wrong) from a slot that was never written or is garbage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImageHeader {
    /// The ring position the image was written to.
    pub slot_index: u32,
    /// The pool.
    pub pool_uuid: Uuid,
    /// Metadata generation (one per commit).
    pub generation: u64,
    /// Ownership epoch of the writer.
    pub epoch: u64,
    /// The node that wrote it.
    pub writer_node: u32,
    /// Body length in bytes.
    pub body_len: u32,
    /// CRC-32C of the body.
    pub body_crc: u32,
}

impl ImageHeader {
    /// The image's (epoch, generation).
    pub fn stamp(&self) -> Stamp {
        Stamp {
            epoch: self.epoch,
            generation: self.generation,
        }
    }

    /// Parses the first 128 bytes of `bytes`: length, magic, version, header CRC, writer node.
    pub fn parse(bytes: &[u8]) -> Result<ImageHeader, FormatError> {
        let err = |offset: usize, problem| {
            FormatError::new(Structure::ImageHeader, offset as u64, problem)
        };
        let Some(b) = bytes.get(..IMAGE_HEADER_SIZE) else {
            return Err(err(
                0,
                Problem::Truncated {
                    needed: IMAGE_HEADER_SIZE as u64,
                    available: bytes.len() as u64,
                },
            ));
        };
        let magic: [u8; 8] = get(b, OFF_MAGIC);
        if magic != IMAGE_MAGIC {
            return Err(err(
                OFF_MAGIC,
                Problem::BadMagic {
                    found: magic,
                    expected: IMAGE_MAGIC,
                },
            ));
        }
        check_version(b, OFF_VERSION).map_err(|p| err(OFF_VERSION, p))?;
        let stored = u32_at(b, HEADER_CRC_OFFSET);
        let computed = crc_with_zeroed_field(b, HEADER_CRC_OFFSET);
        if stored != computed {
            return Err(err(
                HEADER_CRC_OFFSET,
                Problem::BadChecksum { stored, computed },
            ));
        }
        let writer_node = u32_at(b, OFF_WRITER);
        if writer_node >= MAX_NODES {
            return Err(err(
                OFF_WRITER,
                Problem::BadValue {
                    field: "writer node",
                    value: u64::from(writer_node),
                    why: "node ids are 0..4",
                },
            ));
        }
        Ok(ImageHeader {
            slot_index: u32_at(b, OFF_SLOT),
            pool_uuid: uuid_at(b, OFF_POOL),
            generation: u64_at(b, OFF_GENERATION),
            epoch: u64_at(b, OFF_EPOCH),
            writer_node,
            body_len: u32_at(b, OFF_BODY_LEN),
            body_crc: u32_at(b, OFF_BODY_CRC),
        })
    }
}

/// One metadata image: the header's fields and the configuration its body holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MetadataImage {
    /// The ring position it is written to.
    pub slot_index: u32,
    /// Metadata generation: one more than the image it replaces.
    pub generation: u64,
    /// The writer's ownership epoch (equal to `config.ownership.epoch`).
    pub epoch: u64,
    /// The node that wrote it.
    pub writer_node: u32,
    /// The pool's configuration (its UUID is the header's pool UUID).
    pub config: PoolConfig,
}

impl MetadataImage {
    /// The image's (epoch, generation).
    pub fn stamp(&self) -> Stamp {
        Stamp {
            epoch: self.epoch,
            generation: self.generation,
        }
    }

    /// The pool the image belongs to.
    pub fn pool_uuid(&self) -> Uuid {
        self.config.pool.uuid
    }

    /// The bytes to write at the start of the slot: header and body, zero-padded to a multiple
    /// of 4 KiB (but never past `slot_size`). Refuses an invalid configuration, an epoch that
    /// differs from the ownership record's, a writer node out of range, and an image larger
    /// than `slot_size`.
    pub fn encode(&self, slot_size: usize) -> Result<Vec<u8>, EncodeError> {
        if self.writer_node >= MAX_NODES {
            return Err(ConfigError::NodeId {
                what: "Writer",
                node: self.writer_node,
            }
            .into());
        }
        if self.config.ownership.epoch != self.epoch {
            return Err(ConfigError::EpochMismatch {
                ownership: self.config.ownership.epoch,
                header: self.epoch,
            }
            .into());
        }
        let body = self.config.encode_body()?;
        let needed = IMAGE_HEADER_SIZE as u64 + body.len() as u64;
        let body_len = u32::try_from(body.len()).ok();
        let Some(body_len) = body_len.filter(|_| needed <= slot_size as u64) else {
            return Err(EncodeError::TooLarge {
                needed,
                slot_size: slot_size as u64,
            });
        };
        let len = (IMAGE_HEADER_SIZE + body.len()).div_ceil(IMAGE_WRITE_ALIGN) * IMAGE_WRITE_ALIGN;
        let mut out = vec![0u8; len.min(slot_size)];
        put(&mut out, OFF_MAGIC, &IMAGE_MAGIC);
        put_u32(&mut out, OFF_VERSION, FORMAT_VERSION);
        put_u32(&mut out, OFF_SLOT, self.slot_index);
        put(&mut out, OFF_POOL, &self.config.pool.uuid.0);
        put_u64(&mut out, OFF_GENERATION, self.generation);
        put_u64(&mut out, OFF_EPOCH, self.epoch);
        put_u32(&mut out, OFF_WRITER, self.writer_node);
        put_u32(&mut out, OFF_BODY_LEN, body_len);
        put_u32(&mut out, OFF_BODY_CRC, crc32c::crc32c(&body));
        put(&mut out, IMAGE_HEADER_SIZE, &body);
        let crc = crc_with_zeroed_field(&out[..IMAGE_HEADER_SIZE], HEADER_CRC_OFFSET);
        put_u32(&mut out, HEADER_CRC_OFFSET, crc);
        Ok(out)
    }

    /// Parses an image from the start of a slot's bytes (bytes past the body are ignored).
    ///
    /// Checked in this order: the header ([`ImageHeader::parse`]), the body length against
    /// the bytes given, the body CRC (a torn write: header valid, body not), the records and
    /// the rules across them ([`PoolConfig::validate`]), and that the header's pool UUID and
    /// epoch equal the pool and ownership records'.
    pub fn parse(bytes: &[u8]) -> Result<MetadataImage, FormatError> {
        parse_with_body(bytes).map(|(image, _)| image)
    }
}

/// [`MetadataImage::parse`], also returning the body bytes.
pub(crate) fn parse_with_body(bytes: &[u8]) -> Result<(MetadataImage, &[u8]), FormatError> {
    let h = ImageHeader::parse(bytes)?;
    let body_at = IMAGE_HEADER_SIZE as u64;
    let available = bytes.len().saturating_sub(IMAGE_HEADER_SIZE);
    let Some(body) =
        bytes.get(IMAGE_HEADER_SIZE..IMAGE_HEADER_SIZE.saturating_add(h.body_len as usize))
    else {
        return Err(FormatError::new(
            Structure::ImageBody,
            body_at,
            Problem::Truncated {
                needed: u64::from(h.body_len),
                available: available as u64,
            },
        ));
    };
    let computed = crc32c::crc32c(body);
    if computed != h.body_crc {
        return Err(FormatError::new(
            Structure::ImageBody,
            body_at,
            Problem::BadChecksum {
                stored: h.body_crc,
                computed,
            },
        ));
    }
    let config = decode_config(body, body_at)?;
    if config.pool.uuid != h.pool_uuid {
        return Err(FormatError::new(
            Structure::ImageHeader,
            OFF_POOL as u64,
            Problem::Mismatch {
                field: "pool UUID",
                found: h.pool_uuid.to_string(),
                other: "the pool record's UUID",
                expected: config.pool.uuid.to_string(),
            },
        ));
    }
    if config.ownership.epoch != h.epoch {
        return Err(FormatError::new(
            Structure::ImageHeader,
            OFF_EPOCH as u64,
            Problem::Mismatch {
                field: "epoch",
                found: h.epoch.to_string(),
                other: "the ownership record's epoch",
                expected: config.ownership.epoch.to_string(),
            },
        ));
    }
    Ok((
        MetadataImage {
            slot_index: h.slot_index,
            generation: h.generation,
            epoch: h.epoch,
            writer_node: h.writer_node,
            config,
        },
        body,
    ))
}
