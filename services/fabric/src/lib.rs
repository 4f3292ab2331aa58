//! duplex-fabric: the NVMe/TCP target.
//!
//! The fabric service accepts hosts on the listeners duplexd bound for it, speaks NVMe/TCP
//! (ICReq/ICResp, command and response capsules, in-capsule data, R2T/H2CData, C2HData, header
//! and data digests), serves the discovery subsystem and the NVM subsystems of the node's
//! topology (and of the export table, which changes at run time) through the dynamic controller model (one controller per admin Connect, host NQN
//! allow-lists, keep-alive enforced, asynchronous events, ANA reporting), and turns I/O
//! commands into descriptors on the datapath's rings, with data in the shared buffer pool.
//!
//! One file per concern, as in SPDK's `lib/nvmf`, layered so that each uses only those listed
//! before it (no module cycles):
//! * [`backend`]: the ring and pool client of the datapath channel (fast-path commands are
//!   finished through the [`backend::Finish`] trait, so it knows nothing of connections).
//! * [`subsystem`]: subsystems, namespaces, allowed hosts, ports.
//! * [`controller`]: controller state (properties, features, AEN queue, keep-alive).
//! * [`resv_channel`]: the fabric's end of the reservation channel to the metadata service.
//! * [`target`]: what one process serves: the subsystems and the controller registry; merging
//!   export tables.
//! * [`command`]: one command: its reply, its data, its explicit state, the transfer limits.
//! * [`writer`]: the outbox and the writer task of a connection.
//! * [`queue`]: the queue state commands share: outstanding commands and their states, R2T
//!   transfers, the pool budget, completion.
//! * [`resv`]: reservation commands (Register, Acquire, Release carried to the metadata
//!   service; Report answered here), the Reservation Persistence feature, notices.
//! * [`admin`]: admin commands (Identify, logs, features, AER, keep alive) and discovery.
//! * [`io`]: NVM I/O commands → datapath descriptors.
//! * [`conn`]: one connection = one queue: PDU reading, admission, Connect, fabrics commands.
//! * [`server`], [`service`]: listeners, accept loops, the I/O threads; the service lifecycle.
//! * [`exports`]: the export table feed (the exports region and its doorbell).
//! * [`cells`] (under all of them): the locks and cells of what threads share.
//!
//! A connection runs on one of the I/O threads (`[fabric] io_threads`, each a tokio
//! current-thread runtime with its own datapath channel): its tasks and queue state are
//! `Rc`/`RefCell` on that thread. The target, subsystems and controllers are shared by every
//! thread (`Arc`, atomics, short locks never held across an `.await`).

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cells;
pub mod command;
pub mod conn;
pub mod controller;
pub mod exports;
pub mod io;
pub mod queue;
pub mod resv;
pub mod resv_channel;
pub mod server;
pub mod service;
pub mod stream;
pub mod subsystem;
pub mod target;
pub mod tls;
pub mod writer;
