//! The heartbeat slot: 4096 bytes per node id, written only by that node's datapath, read by
//! its peer to tell a dead node from a cut interconnect.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `DPLXHB01` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | node id (0..4; equals the slot's index) |
//! | 16 | 16 | boot id of the writer |
//! | 32 | 8 | epoch the writer knows |
//! | 40 | 8 | counter (incremented on every write) |
//! | 48 | 16 | peer boot id last seen |
//! | 64 | 8 | peer counter last seen |
//! | 72 | 4020 | reserved |
//! | 4092 | 4 | CRC-32C of the 4096 bytes with this field zero |

use crate::bytes::fixed::{get, put, put_u32, put_u64, u32_at, u64_at, uuid_at};
use crate::error::{FormatError, Problem, Structure};
use crate::superblock::check_version;
use crate::{crc_with_zeroed_field, Uuid, FORMAT_VERSION, MAX_NODES};

/// Size of a heartbeat slot.
pub const HEARTBEAT_SIZE: usize = 4096;
/// The heartbeat's magic number.
pub const HEARTBEAT_MAGIC: [u8; 8] = *b"DPLXHB01";

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_NODE: usize = 12;
const OFF_BOOT: usize = 16;
const OFF_EPOCH: usize = 32;
const OFF_COUNTER: usize = 40;
const OFF_PEER_BOOT: usize = 48;
const OFF_PEER_COUNTER: usize = 64;
/// Offset of the CRC-32C.
pub const CRC_OFFSET: usize = 4092;

/// One node's heartbeat, as written in its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Heartbeat {
    /// The writer's node id (`0..MAX_NODES`).
    pub node_id: u32,
    /// The writer's boot id (new on every start of the node).
    pub boot_id: Uuid,
    /// The newest ownership epoch the writer knows.
    pub epoch: u64,
    /// Incremented on every write.
    pub counter: u64,
    /// The peer's boot id as last read from the peer's slot.
    pub peer_boot_id: Uuid,
    /// The peer's counter as last read.
    pub peer_counter: u64,
}

impl Heartbeat {
    /// The 4096 bytes of this heartbeat.
    pub fn encode(&self) -> Box<[u8; HEARTBEAT_SIZE]> {
        let mut b = Box::new([0u8; HEARTBEAT_SIZE]);
        let s = &mut b[..];
        put(s, OFF_MAGIC, &HEARTBEAT_MAGIC);
        put_u32(s, OFF_VERSION, FORMAT_VERSION);
        put_u32(s, OFF_NODE, self.node_id);
        put(s, OFF_BOOT, &self.boot_id.0);
        put_u64(s, OFF_EPOCH, self.epoch);
        put_u64(s, OFF_COUNTER, self.counter);
        put(s, OFF_PEER_BOOT, &self.peer_boot_id.0);
        put_u64(s, OFF_PEER_COUNTER, self.peer_counter);
        let crc = crc_with_zeroed_field(s, CRC_OFFSET);
        put_u32(s, CRC_OFFSET, crc);
        b
    }

    /// Parses a heartbeat from the first 4096 bytes of `bytes`: length, magic, version, CRC,
    /// node id in range.
    pub fn parse(bytes: &[u8]) -> Result<Heartbeat, FormatError> {
        let err =
            |offset: usize, problem| FormatError::new(Structure::Heartbeat, offset as u64, problem);
        let Some(b) = bytes.get(..HEARTBEAT_SIZE) else {
            return Err(err(
                0,
                Problem::Truncated {
                    needed: HEARTBEAT_SIZE as u64,
                    available: bytes.len() as u64,
                },
            ));
        };
        let magic: [u8; 8] = get(b, OFF_MAGIC);
        if magic != HEARTBEAT_MAGIC {
            return Err(err(
                OFF_MAGIC,
                Problem::BadMagic {
                    found: magic,
                    expected: HEARTBEAT_MAGIC,
                },
            ));
        }
        check_version(b, OFF_VERSION).map_err(|p| err(OFF_VERSION, p))?;
        let stored = u32_at(b, CRC_OFFSET);
        let computed = crc_with_zeroed_field(b, CRC_OFFSET);
        if stored != computed {
            return Err(err(CRC_OFFSET, Problem::BadChecksum { stored, computed }));
        }
        let node_id = u32_at(b, OFF_NODE);
        if node_id >= MAX_NODES {
            return Err(err(
                OFF_NODE,
                Problem::BadValue {
                    field: "node id",
                    value: u64::from(node_id),
                    why: "node ids are 0..4",
                },
            ));
        }
        Ok(Heartbeat {
            node_id,
            boot_id: uuid_at(b, OFF_BOOT),
            epoch: u64_at(b, OFF_EPOCH),
            counter: u64_at(b, OFF_COUNTER),
            peer_boot_id: uuid_at(b, OFF_PEER_BOOT),
            peer_counter: u64_at(b, OFF_PEER_COUNTER),
        })
    }
}
