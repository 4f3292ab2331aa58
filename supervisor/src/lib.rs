//! duplexd, the node supervisor. It is the only process that starts others: it reads the node
//! config, creates every shared region, ring, pool and listening socket, spawns each service
//! sandboxed with exactly its fds, keeps those fds across restarts, and restarts what crashes.
//!
//! * [`config`]: the node config file (TOML), parsed strictly and validated as a whole.
//! * [`lock`]: one duplexd per state directory.
//! * [`node`]: shared resources, the service table and the supervision loop.
//! * [`storage`]: volumes, subsystems and the topology handed to the fabric and datapath.

pub mod config;
pub mod events;
pub mod hostlink;
pub mod lock;
pub mod node;
pub mod storage;
