//! duplex-raid: the raid service, one per node (issue 16).
//!
//! * [`sched`]: the scheduling model (pure): how far each rebuild and scrub may go next, its
//!   rate and ETA, and when its position is worth a checkpoint.
//! * [`service`]: the process: the RAID jobs region (`duplex_ipc::raid`), a tick every
//!   [`service::TICK`], the lifecycle.
//!
//! The per-I/O work of a rebuild or scrub runs in the datapath, one stripe window at a time
//! under the window's lock; the checkpoints are committed to the pool's drives by the metadata
//! service. This service only decides: killing it stops no rebuild for longer than its grant
//! (a quarter of a second of work at most), and its successor reads the grants, rates and
//! checkpoints back from the region and goes on.

#![forbid(unsafe_code)]

pub mod sched;
pub mod service;
