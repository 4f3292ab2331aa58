//! One command as the fabric handles it: what it returns ([`Reply`]), how its host data
//! arrives ([`DataIn`]), where it is in its life ([`CmdState`]), and the transfer limits every
//! queue applies. This module depends on nothing above the backend, so the command code
//! ([`crate::admin`], [`crate::io`]) and the connection ([`crate::conn`]) can all use it.

use duplex_nvme::status::Status;

use crate::backend::Chain;

/// In-capsule data accepted on every queue (bytes; IOCCSZ = 64 + this).
pub const IN_CAPSULE_DATA: usize = 8192;
/// Largest data transfer of one command (MDTS = 128 KiB) and MAXH2CDATA.
pub const MAX_TRANSFER: usize = 128 * 1024;
/// MDTS as reported: 2^5 × 4 KiB.
pub const MDTS: u8 = 5;

/// What a command produces.
#[derive(Debug, Default)]
pub struct Reply {
    /// Status.
    pub status: Status,
    /// Completion dword 0.
    pub dw0: u32,
    /// Completion dword 1.
    pub dw1: u32,
    /// Data for the host (sent as C2HData before the response).
    pub data: Option<Payload>,
}

/// Data a command returns to the host.
#[derive(Debug)]
pub enum Payload {
    /// Bytes the fabric built (Identify, log pages).
    Bytes(Vec<u8>),
    /// Read data still in the shared pool: sent from there (zero copy; copied into the PDU
    /// only to compute a data digest), and freed when dropped (also if the connection dies
    /// first).
    Chain(Chain),
}

impl Reply {
    /// A bare status.
    pub fn status(status: Status) -> Self {
        Self {
            status,
            ..Self::default()
        }
    }
    /// Success with dword 0.
    pub fn ok(dw0: u32) -> Self {
        Self {
            dw0,
            ..Self::default()
        }
    }
    /// Success with data.
    pub fn data(data: Vec<u8>) -> Self {
        Self {
            data: Some(Payload::Bytes(data)),
            ..Self::default()
        }
    }
}

impl From<Status> for Reply {
    fn from(s: Status) -> Self {
        Self::status(s)
    }
}

/// How host data for a command arrives.
#[derive(Debug)]
pub enum DataIn {
    /// No data.
    None,
    /// In the capsule.
    InCapsule(Vec<u8>),
    /// To be pulled with R2T: this many bytes.
    Transfer(usize),
}

/// Where a command is in its life. A queue keeps one per outstanding command id (see
/// [`crate::queue::Queue::set_state`]); every change is a trace event (`command` target
/// `duplex_fabric::queue`, with the queue, command id, and the states before and after), and a
/// queue torn down reports the states of the commands it abandoned.
///
/// ```text
/// Received ─┬─▶ InDatapath (fast path: read, in-capsule write) ─────────────────▶ completed
///           └─▶ Executing ─┬─▶ AwaitingBuffer ─▶ Executing
///                          ├─▶ AwaitingData (R2T) ─▶ Executing
///                          └─▶ InDatapath ─▶ Executing ──────────────────────────▶ completed
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdState {
    /// The capsule is parsed and its command id taken.
    Received,
    /// Running in the fabric (a task: admin, fabrics and I/O commands off the fast path).
    Executing,
    /// Waiting for its queue's share of the buffer pool, or for a buffer.
    AwaitingBuffer,
    /// Pulling host data with R2T.
    AwaitingData,
    /// A descriptor of it is on the datapath's ring.
    InDatapath,
}
