//! duplex-cluster: the cluster service, one per node of a two-controller array.
//!
//! * [`membership`]: what this node believes of its peer, from the interconnect and the disk
//!   heartbeats (a pure model).
//! * [`wire`]: the interconnect's messages and frames (`schemas/interconnect.capnp`).
//! * [`service`]: the process: the interconnect listener and dialler, heartbeats, the model,
//!   the lifecycle.
//!
//! Design: `docs/HA.md` and the architecture's section 7. The service's status report is what
//! `duplexctl cluster status` shows (and what mgmt checks before a configuration change). What
//! grows here next: the disk heartbeat, ownership with epochs, fencing and takeover, giveback.

#![forbid(unsafe_code)]

pub mod membership;
pub mod service;
pub mod wire;
