//! duplex-host: an NVMe/TCP host (initiator), blocking and pipelined.
//!
//! * [`pdu`]: reading one PDU from a stream, checked against the negotiated digests and limits
//!   (a hostile or broken target gets a [`HostError`], never a panic; fuzzed in
//!   `tests/fuzz_pdu.rs`).
//! * [`Queue`]: one TCP connection = one NVMe queue: ICReq/ICResp, Fabrics Connect, then
//!   commands submitted with in-capsule data when they fit, the rest sent on R2T as H2CData,
//!   controller data gathered from C2HData; any number of commands in flight
//!   ([`Queue::submit`] / [`Queue::poll`]), or one at a time ([`Queue::execute`]).
//! * [`tls`]: the secure channel (TLS 1.3 with a PSK) a queue may open with
//!   ([`Queue::dial_tls`]).
//! * [`auth`]: in-band authentication (DH-HMAC-CHAP) of a queue whose Connect asked for it.
//! * Admin helpers on a [`Queue`] connected as queue 0: enable the controller, Identify, Number
//!   of Queues, Keep Alive, Property Get/Set.
//!
//! The same code serves duplex's system tests and the load generator; it may later carry I/O
//! between the two controllers. Blocking sockets and no runtime: a queue belongs to one thread.

pub mod auth;
pub mod pdu;
mod queue;
pub mod tls;

pub use queue::{Completion, Data, Queue, QueueOptions};

use duplex_nvme::status::Status;
use duplex_nvme::tcp::PduError;

/// Errors of the host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The connection failed or closed.
    #[error("Connection: {0}")]
    Io(#[from] std::io::Error),
    /// The target sent something the protocol does not allow.
    #[error("Target broke the protocol: {0}")]
    Protocol(#[from] PduError),
    /// The target ended the connection with a C2HTermReq.
    #[error("Target terminated the connection (fatal error status {fes:#x}, information {fei})")]
    Terminated {
        /// Fatal error status.
        fes: u16,
        /// Fatal error information.
        fei: u32,
    },
    /// The target answered something that makes no sense here.
    #[error("Unexpected from the target: {0}")]
    Unexpected(String),
    /// A command failed.
    #[error("Command failed: {0}")]
    Status(Status),
}

/// Results of the host.
pub type Result<T> = std::result::Result<T, HostError>;
