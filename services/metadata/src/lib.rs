//! duplex-metadata: the metadata service's core. It owns the pools' records on their drives
//! (`docs/ONDISK.md`): it formats drives into a pool, commits every configuration change as a
//! new metadata image on every live member (flushed before the change counts), and imports a
//! pool from whatever its drives hold by the import rule of `duplex-ondisk`.
//!
//! * [`disk`]: the [`MetaDisk`] a store reads and writes a drive through (the service's raw
//!   channel to the datapath in production; [`MemDisk`] with crash and fault injection in
//!   tests).
//! * [`store`]: [`PoolStore`]: format, commit, import, superblock updates.
//! * [`ops`]: the configuration changes operators ask for, as pure functions over a
//!   [`duplex_ondisk::PoolConfig`] (each checked, each with a clear error).

#![forbid(unsafe_code)]

pub mod cluster;
pub mod disk;
pub mod ops;
pub mod resv;
pub mod ring;
pub mod service;
pub mod store;

pub use disk::{DiskError, MemDisk, MetaDisk};
pub use store::{PoolStore, StoreError};
