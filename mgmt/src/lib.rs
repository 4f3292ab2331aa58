//! duplex-mgmt: the node's management plane.
//!
//! * [`server`] — the `mgmt` service (binary `duplex-mgmt`), a sandboxed process the supervisor
//!   spawns. It serves the management RPC interface (`schemas/mgmt.capnp`, Cap'n Proto RPC over
//!   the Unix stream socket `<state_dir>/mgmt.sock`, which the supervisor creates and hands over)
//!   and carries each call out as one request on its admin channel to the supervisor
//!   (`schemas/admin.capnp`), or, for the storage configuration, on its config channel to the
//!   metadata service (`schemas/config.capnp`).
//! * [`client`] — the client side used by `duplexctl`: one call, reconnecting while mgmt
//!   restarts, and telling apart "no node", "duplexd not running" and "mgmt is restarting".
//! * [`render`] — duplexctl's tables and JSON documents.
//! * [`units`] — sizes as operators write (`10G`) and read (`1.50G`) them.
//! * [`metrics`] — the Prometheus text exposition of the node's metrics regions and pools, and
//!   the small HTTP server mgmt serves it with.
//! * [`remote`] — remote management: the RPC over TCP inside TLS 1.3 with the node's mgmt key
//!   (`duplexctl --connect`).
//! * [`io`] — the adapter between tokio sockets and the `futures` I/O traits `capnp-rpc` uses.
//!
//! The operator's guide to `duplexctl` is `docs/OPERATOR.md`.

pub mod client;
pub mod io;
pub mod metrics;
pub mod remote;
pub mod render;
pub mod server;
pub mod units;
