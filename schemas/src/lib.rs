//! duplex-schemas: the Cap'n Proto schemas of duplex's control channels and their generated Rust
//! code.
//!
//! One schema file per channel, in this crate's directory:
//!
//! * `lifecycle.capnp` → [`lifecycle_capnp`]: the service lifecycle channel between the
//!   supervisor (`duplexd`) and each service (hello, start, ready, heartbeat, shutdown, ack,
//!   error, inject).
//! * `admin.capnp` → [`admin_capnp`]: the admin channel from the mgmt service to the supervisor
//!   (service table, restart, crash injection, node status). Only mgmt holds one.
//! * `mgmt.capnp` → [`mgmt_capnp`]: the management RPC interface (`capnp-rpc`) that `duplexctl`
//!   calls on the mgmt service.
//! * `config.capnp` → [`config_capnp`]: the config channel from the mgmt service to the metadata
//!   service (pools, volumes, subsystems, namespaces, hosts). Only mgmt holds its sending end.
//! * `maps.capnp` → [`maps_capnp`]: the maps channel between the metadata service and the
//!   datapath (pools over raw drives, volume maps, recorded failures; member-failure events).
//!   Only the metadata service holds its requesting end.
//! * `interconnect.capnp` → [`interconnect_capnp`]: the interconnect between the two nodes'
//!   cluster services (heartbeats), over TCP.
//! * `resv.capnp` → [`resv_capnp`]: the reservation channel from the fabric to the metadata
//!   service (a host's Reservation Register, Acquire, Release and PTPL setting, applied to the
//!   state kept on the drives).
//!
//! The generated code is committed under `src/generated/` so that a machine without the `capnp`
//! compiler can build the workspace. `tests/fresh.rs` regenerates it and fails if the committed
//! copy is stale. After editing a schema, rewrite the committed code with:
//!
//! ```text
//! DUPLEX_REGENERATE_SCHEMAS=1 cargo test -p duplex-schemas --test fresh
//! ```
//!
//! Most code should not use these modules directly but the owned, validated mirrors of the
//! messages in `duplex_ipc::control`.

#![deny(missing_docs)]

/// Generated code for `lifecycle.capnp`, the supervisor ↔ service lifecycle channel.
///
/// Produced by `capnpc`; do not edit (see the crate documentation for how to regenerate).
// The generated code is not written to this workspace's standards: its items have no docs, its
// builders and pipelines do not implement Debug, and its setters `unwrap()` results that cannot
// fail for the values they are given. Allowing exactly those lints, on this module only, keeps
// them strict for hand-written code.
#[allow(missing_docs, missing_debug_implementations, clippy::unwrap_used)]
pub mod lifecycle_capnp {
    include!("generated/lifecycle_capnp.rs");
}

/// Generated code for `admin.capnp`, the mgmt → supervisor admin channel.
///
/// Produced by `capnpc`; do not edit.
#[allow(missing_docs, missing_debug_implementations, clippy::unwrap_used)]
pub mod admin_capnp {
    include!("generated/admin_capnp.rs");
}

/// Generated code for `config.capnp`, the mgmt → metadata config channel.
///
/// Produced by `capnpc`; do not edit.
#[allow(missing_docs, missing_debug_implementations, clippy::unwrap_used)]
pub mod config_capnp {
    include!("generated/config_capnp.rs");
}

/// Generated code for `maps.capnp`, the metadata ↔ datapath maps channel.
///
/// Produced by `capnpc`; do not edit.
#[allow(missing_docs, missing_debug_implementations, clippy::unwrap_used)]
pub mod maps_capnp {
    include!("generated/maps_capnp.rs");
}

/// Generated code for `mgmt.capnp`, the management RPC interface served by mgmt.
///
/// Produced by `capnpc`; do not edit.
#[allow(missing_docs, missing_debug_implementations, clippy::unwrap_used)]
pub mod mgmt_capnp {
    include!("generated/mgmt_capnp.rs");
}

/// Generated code for `resv.capnp`, the fabric → metadata reservation channel.
///
/// Produced by `capnpc`; do not edit.
#[allow(missing_docs, missing_debug_implementations, clippy::unwrap_used)]
pub mod resv_capnp {
    include!("generated/resv_capnp.rs");
}

/// Generated code for `interconnect.capnp`, the link between the two nodes' cluster services.
///
/// Produced by `capnpc`; do not edit.
#[allow(missing_docs, missing_debug_implementations, clippy::unwrap_used)]
pub mod interconnect_capnp {
    include!("generated/interconnect_capnp.rs");
}

/// File names of the schemas in this crate's directory and the generated files (under
/// `src/generated/`) they compile to. Used by `tests/fresh.rs`.
pub const SCHEMAS: &[(&str, &str)] = &[
    ("lifecycle.capnp", "lifecycle_capnp.rs"),
    ("admin.capnp", "admin_capnp.rs"),
    ("mgmt.capnp", "mgmt_capnp.rs"),
    ("config.capnp", "config_capnp.rs"),
    ("maps.capnp", "maps_capnp.rs"),
    ("interconnect.capnp", "interconnect_capnp.rs"),
    ("resv.capnp", "resv_capnp.rs"),
];
