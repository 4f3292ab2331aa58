//! A user-space NVMe driver: one controller over PCIe registers and DMA, reached through kernel
//! VFIO or vfio-user ([`transport`]), polled (no interrupts).
//!
//! # What it does
//!
//! * Bring-up ([`Controller::new`]): disable (CC.EN 0, wait CSTS.RDY 0 within CAP.TO), program
//!   the admin queue (AQA/ASQ/ACQ), enable with 64-byte SQ and 16-byte CQ entries and 4 KiB
//!   pages, Identify Controller, Set Features Host Identifier (reservations key hosts by it),
//!   Number of Queues, then Create I/O CQ/SQ pairs (physically contiguous, no interrupts).
//! * Commands ([`Controller::submit`], [`Controller::ring`], [`Controller::poll`]): the command
//!   id is the slot index of the queue's outstanding-command table; data is described with PRPs
//!   ([`prp`]) built from device-address segments (the buffer pool, mapped for DMA), a PRP list
//!   page per slot; one doorbell write per batch; completions are taken by phase tag and
//!   checked (queue, slot, SQ head) before they are believed: a completion that cannot be ours
//!   fails the controller ([`NvmeError::BadCompletion`]) rather than being acted on.
//! * Errors are typed ([`CmdError`]): Reservation Conflict is its own variant (a fenced
//!   controller must stop serving), media errors, preempt-and-abort, timeouts, resets.
//! * Timeouts ([`Controller::check_timeouts`]): a command past its deadline gets an Abort
//!   command; if it is still outstanding after the abort timeout, the controller is reset
//!   (CC.EN 1 → 0 → 1, queues recreated) and every outstanding command completes with
//!   [`CmdError::Reset`] for the caller to retry or fail.
//!
//! # Memory
//!
//! Queues, PRP lists and scratch pages live in a [`DmaMem`] (a memfd mapped shared). The
//! driver's `unsafe` is in [`dma`] (raw-pointer access, mapping memory for a device),
//! [`transport`] (the DMA-mapping contract) and [`vfio_kernel`]; no Rust reference ever points
//! into memory the device can write.

pub mod dma;
pub mod driver;
pub mod error;
pub mod prp;
pub mod transport;
pub mod vfio_kernel;
pub mod vfio_user;

pub use dma::DmaMem;
pub use driver::{set_wait_hook, Controller, ControllerId, Done, IoCmd, NamespaceId, Options};
pub use error::{CmdError, NvmeError};
pub use prp::Seg;
pub use transport::{AnyTransport, DmaMapping, Transport, TransportError};
