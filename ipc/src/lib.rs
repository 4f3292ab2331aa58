//! duplex-ipc: how duplex processes talk to each other.
//!
//! * [`region`]: memfd-backed shared memory regions, sealed against resizing, created by one
//!   process (the supervisor) and attached by others from a passed fd, with a validated header.
//! * [`ring`]: single-producer/single-consumer descriptor rings living in a region, with
//!   free-running indices, batched produce/consume and eventfd doorbells behind "waiting" flags.
//! * [`pool`]: a buffer pool in shared memory: fixed-size chunks named by handles, chains for
//!   large I/O, and a per-chunk ownership word that lets a restarted process reclaim what its dead
//!   predecessor held.
//! * [`control`]: Cap'n Proto control messages over `SOCK_SEQPACKET` with `SCM_RIGHTS` fd passing.
//! * [`lifecycle`]: the service side of the supervisor protocol: handshake, health counter, crash
//!   injection.
//! * [`admin`]: the mgmt → supervisor admin channel (service table, restart, crash injection).
//! * [`topology`]: the storage topology (volumes, subsystems, namespaces, I/O channels) the
//!   supervisor hands to the fabric and the datapath.
//!
//! No Rust reference ever points at shared bytes another process may write: shared words are
//! accessed as atomics, descriptors and payloads are copied with volatile or raw-pointer copies.
//! The restart protocol (who may reclaim what, and what a successor is guaranteed to see) is
//! specified in `docs/IPC.md`.

pub mod admin;
pub mod cluster;
pub mod config;
pub mod control;
pub mod desc;
pub mod doorbell;
pub mod exports;
pub mod keys;
pub mod lifecycle;
pub mod maps;
pub mod metrics;
pub mod pool;
pub mod raid;
pub mod region;
pub mod resv;
pub mod ring;
#[doc(hidden)]
pub mod testkit;
pub mod topology;
