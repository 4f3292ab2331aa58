//! What can go wrong: one command ([`CmdError`]) or the controller ([`NvmeError`]).

use duplex_nvme::status::Status;

use super::dma::DmaError;
use super::prp::PrpError;
use super::transport::TransportError;

/// Why one command failed, with the storage meaning the datapath acts on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdError {
    /// Reservation Conflict: another host holds the namespace's reservation. A controller
    /// whose writes get this has been fenced and must stop serving.
    #[error("reservation conflict")]
    ReservationConflict,
    /// The LBA range is outside the namespace.
    #[error("LBA out of range")]
    LbaOutOfRange,
    /// Unrecovered read error: the drive could not read the blocks.
    #[error("unrecovered read error")]
    ReadError,
    /// Write fault: the drive could not write the blocks.
    #[error("write fault")]
    WriteFault,
    /// Another host's Reservation Acquire (preempt and abort) aborted the command.
    #[error("aborted by another host's preempt and abort")]
    PreemptAborted,
    /// The command timed out and was aborted with an Abort command; whether a write reached
    /// the medium is unknown.
    #[error("timed out and aborted")]
    TimedOut,
    /// The controller was reset while the command was outstanding; whether a write reached
    /// the medium is unknown.
    #[error("controller reset while outstanding")]
    Reset,
    /// The controller is gone (transport failed, or it did not come back from a reset).
    #[error("controller lost")]
    ControllerLost,
    /// Any other status the controller completed the command with.
    #[error("{0}")]
    Status(Status),
}

impl CmdError {
    /// The error a completion status means (`None` for success).
    pub fn from_status(s: Status) -> Option<Self> {
        if s.is_success() {
            return None;
        }
        Some(match (s.sct(), s.sc()) {
            (0, 0x83) => Self::ReservationConflict,
            (0, 0x80) => Self::LbaOutOfRange,
            (2, 0x81) => Self::ReadError,
            (2, 0x80) => Self::WriteFault,
            (0, 0x1B) => Self::PreemptAborted,
            _ => Self::Status(s),
        })
    }

    /// Whether repeating the command may succeed (the controller did not set Do Not Retry, or
    /// the failure was the path's, not the command's).
    pub fn retriable(&self) -> bool {
        match self {
            Self::TimedOut | Self::Reset => true,
            Self::Status(s) => !s.is_dnr(),
            Self::ReservationConflict
            | Self::LbaOutOfRange
            | Self::ReadError
            | Self::WriteFault
            | Self::PreemptAborted
            | Self::ControllerLost => false,
        }
    }
}

/// A controller-level failure.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// Register access or DMA mapping failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The driver's DMA memory refused an access (a layout bug).
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// CSTS did not reach the expected state within the controller's CAP.TO.
    #[error("controller did not become {what} within {ms} ms (CSTS {csts:#x})")]
    NotReady {
        /// "ready" or "disabled".
        what: &'static str,
        /// How long we waited.
        ms: u64,
        /// Last CSTS read.
        csts: u32,
    },
    /// CSTS.CFS: the controller reports a fatal error.
    #[error("controller fatal status (CSTS {0:#x})")]
    Fatal(u32),
    /// The controller cannot be driven (no NVM command set, page size, entry sizes).
    #[error("unsupported controller: {0}")]
    Unsupported(String),
    /// The device wrote a completion entry that cannot be ours (unknown command id, wrong
    /// queue, impossible SQ head): a broken or malicious device; the controller needs a reset.
    #[error("bad completion on queue {qid}: {why}")]
    BadCompletion {
        /// Completion queue.
        qid: u16,
        /// What was wrong.
        why: String,
    },
    /// An admin command failed.
    #[error("{what} failed: {error}")]
    Admin {
        /// Which command.
        what: &'static str,
        /// How.
        error: CmdError,
    },
    /// The admin command did not complete in time.
    #[error("{0} timed out")]
    AdminTimeout(&'static str),
    /// No such I/O queue.
    #[error("no I/O queue {0}")]
    NoQueue(u16),
    /// The submission queue has no free entry; poll for completions first.
    #[error("queue {0} is full")]
    QueueFull(u16),
    /// The data cannot be described with PRPs.
    #[error(transparent)]
    Prp(#[from] PrpError),
    /// The transfer is larger than the controller's MDTS.
    #[error("{bytes} bytes exceed the controller's maximum transfer of {max}")]
    TooLarge {
        /// Requested.
        bytes: u64,
        /// MDTS in bytes.
        max: u64,
    },
    /// The controller failed earlier and has not been reset since.
    #[error("controller failed ({0}); reset it first")]
    Failed(String),
}
