//! The config channel: the mgmt service asks the metadata service for, and changes, the node's
//! storage configuration (drives, pools, volumes, subsystems, namespaces, hosts).
//!
//! Mirrors `schemas/config.capnp`. One `SOCK_SEQPACKET` socket pair, created by the supervisor;
//! mgmt holds one end, metadata the other, so holding mgmt's end *is* the privilege to change the
//! configuration; no other message travels on it, and no file descriptors do. The transport
//! (datagram limits, `MSG_TRUNC`/`MSG_CTRUNC` checks, rate-limited warnings) and the decoding
//! limits (traversal, nesting) are [`ControlChannel`]'s; the messages are their own types.
//!
//! Decoding is validated ([`ConfigRequest::decode`], [`ConfigReply::decode`], and the
//! `read_body` functions mgmt uses on the bodies its RPC clients send): unknown union members and
//! enumerants are errors, every text is bounded and UTF-8, every list is bounded before it is
//! read, and the bounds ([`MAX_DRIVES`], [`MAX_VOLUMES`], ...) are chosen so that the largest
//! reply within them fits one datagram (checked by a test). These are the wire rules only: what
//! makes a good name, NQN, size or chunk is the metadata service's to decide (the same rules for
//! names and NQNs that `duplexctl` checks before sending are here too: [`check_name`],
//! [`check_nqn`]).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use duplex_schemas::config_capnp as wire;
use nix::errno::Errno;
use nix::sys::socket::MsgFlags;
use serde::Serialize;

use crate::control::{
    check_text, read_text as text, reader_options, unknown, ControlChannel, ControlError,
    MAX_TEXT_BYTES,
};

/// Longest drive, pool or volume name, in bytes (`docs/ONDISK.md`); names are never empty.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest NQN, in bytes (NVMe Base Specification); NQNs are never empty.
pub const MAX_NQN_BYTES: usize = 223;
/// Longest drive address (`vfio:BDF`, `vfio-user:PATH`), in bytes.
pub const MAX_ADDRESS_BYTES: usize = 256;
/// Longest drive model number (the NVMe Identify field's width).
pub const MAX_MODEL_BYTES: usize = 40;
/// Longest drive serial number (the NVMe Identify field's width).
pub const MAX_SERIAL_BYTES: usize = 20;
/// A UUID as text: canonical lowercase `8-4-4-4-12` form.
pub const UUID_TEXT_BYTES: usize = 36;
/// An NGUID as text: 32 lowercase hex digits.
pub const NGUID_TEXT_BYTES: usize = 32;
/// Longest `done` or `error` message, in bytes.
pub const MAX_MESSAGE_BYTES: usize = MAX_TEXT_BYTES;
/// Most drives one `drives` reply lists.
pub const MAX_DRIVES: usize = 64;
/// Most pools one `pools` reply lists.
pub const MAX_POOLS: usize = 16;
/// Most members of one pool (`docs/ONDISK.md`), and most drives one `createPool` names.
pub const MAX_POOL_MEMBERS: usize = 64;
/// Most members in all the pools of one `pools` reply.
pub const MAX_MEMBERS_PER_REPLY: usize = 128;
/// Most volumes one `volumes` reply lists.
pub const MAX_VOLUMES: usize = 128;
/// Most subsystems one `subsystems` reply lists.
pub const MAX_SUBSYSTEMS: usize = 32;
/// Most namespaces in one reply: in all the subsystems of a `subsystems` reply, and in all the
/// exports of a `volumes` reply.
pub const MAX_NAMESPACES: usize = 96;
/// Longest DH-HMAC-CHAP secret representation accepted (`DHHC-1:03:` and 92 base64 bytes of a
/// 64-byte key and its CRC, with room to spare).
pub const MAX_SECRET_BYTES: usize = 128;

/// A host's DH-HMAC-CHAP secrets (the standard representation, `DHHC-1:XX:base64:`) and TLS
/// PSK (`NVMeTLSkey-1:HH:base64:`) as the operator gave them, checked by the metadata service,
/// which stores them sealed. At least one of `host` and `tls_psk`.
#[derive(Clone, PartialEq, Eq)]
pub struct HostSecrets {
    /// The host's secret: the controller checks the host's response with it.
    pub host: Option<String>,
    /// The controller's secret, for bidirectional authentication (the host checks the
    /// controller's response with it). Needs `host`.
    pub ctrl: Option<String>,
    /// The host's configured TLS PSK.
    pub tls_psk: Option<String>,
}

impl std::fmt::Debug for HostSecrets {
    /// Never the secrets themselves (they go to logs otherwise).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSecrets")
            .field("host", &self.host.as_ref().map(|_| "<secret>"))
            .field("ctrl", &self.ctrl.as_ref().map(|_| "<secret>"))
            .field("tls_psk", &self.tls_psk.as_ref().map(|_| "<secret>"))
            .finish()
    }
}

/// Most allowed hosts in all the subsystems of one `subsystems` reply.
pub const MAX_HOSTS: usize = 128;
/// The chunk of a pool created with `chunkBytes` 0.
pub const DEFAULT_CHUNK_BYTES: u32 = 64 * 1024;
/// Smallest chunk a pool may have.
pub const MIN_CHUNK_BYTES: u32 = 4 * 1024;
/// Largest chunk a pool may have.
pub const MAX_CHUNK_BYTES: u32 = 1024 * 1024;

/// The request id of the restart notice ([`ConfigChannel::send_restart_notice`]): never a
/// request's.
pub const RESTART_NOTICE_ID: u64 = 0;

/// A request from mgmt to the metadata service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigRequest {
    /// Every drive the node sees (and the members it misses).
    ListDrives,
    /// Make a pool of free drives.
    CreatePool {
        /// Its name.
        name: String,
        /// Its RAID level.
        raid: RaidLevel,
        /// Free drives, in slot order.
        drives: Vec<String>,
        /// Stripe chunk in bytes; 0 for [`DEFAULT_CHUNK_BYTES`].
        chunk_bytes: u32,
    },
    /// Every pool.
    ListPools,
    /// One pool, by name.
    ShowPool(String),
    /// Forget a pool (its drives become free).
    DestroyPool {
        /// The pool.
        name: String,
        /// Also delete its volumes and their namespaces.
        force: bool,
    },
    /// A volume in a pool.
    CreateVolume {
        /// Its name.
        name: String,
        /// The pool.
        pool: String,
        /// Its size.
        size_bytes: u64,
    },
    /// Every volume.
    ListVolumes,
    /// Change a volume's size.
    ResizeVolume {
        /// The volume.
        name: String,
        /// The new size.
        size_bytes: u64,
    },
    /// Delete a volume.
    DeleteVolume(String),
    /// A subsystem with this NQN.
    CreateSubsystem(String),
    /// Every subsystem.
    ListSubsystems,
    /// Delete a subsystem.
    DeleteSubsystem(String),
    /// Export a volume as a namespace.
    AddNamespace {
        /// The subsystem.
        nqn: String,
        /// The volume.
        volume: String,
        /// The nsid; 0 for the lowest free one.
        nsid: u32,
    },
    /// Stop exporting a namespace.
    RemoveNamespace {
        /// The subsystem.
        nqn: String,
        /// The namespace.
        nsid: u32,
    },
    /// Allow a host to connect to a subsystem (or set its DH-HMAC-CHAP secrets).
    AllowHost {
        /// The subsystem.
        nqn: String,
        /// The host.
        host_nqn: String,
        /// Its DH-HMAC-CHAP secrets (`None`: it connects without authentication).
        secrets: Option<HostSecrets>,
    },
    /// Remove a host from a subsystem's allow-list.
    DenyHost {
        /// The subsystem.
        nqn: String,
        /// The host.
        host_nqn: String,
    },
    /// Let any host connect (or only those allowed).
    AllowAnyHost {
        /// The subsystem.
        nqn: String,
        /// Any host, or only the allowed ones.
        any: bool,
    },
    /// A page of volumes: those whose names sort after this one (empty: from the first).
    ListVolumesAfter(String),
    /// Import a pool found on the drives but not imported at start.
    ImportPool {
        /// The pool's uuid (canonical text).
        pool: String,
        /// Accept missing active members (failed in a new generation) and overrule a
        /// superblock newer than every image.
        force: bool,
    },
    /// A planned move of a pool to the peer controller.
    MovePool {
        /// The pool.
        name: String,
        /// The node id to move it to (1..=4).
        node: u16,
    },
    /// Start a scrub of a parity pool.
    ScrubPool(String),
    /// Reserve a free drive as a hot spare of a parity pool.
    AddSpare {
        /// The pool.
        pool: String,
        /// The free drive.
        drive: String,
    },
    /// Set the rate of a pool's rebuilds and scrubs (bytes/s of each member; 0: yield to host
    /// I/O).
    SetPoolRate {
        /// The pool.
        pool: String,
        /// Bytes per second; 0 for the default.
        rate: u64,
    },
    /// Replace a failed member of a parity pool by a free drive (rebuilt under I/O).
    ReplaceMember {
        /// The pool.
        pool: String,
        /// The failed member's drive name.
        old: String,
        /// The free drive.
        new: String,
    },
}

/// A pool's RAID level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RaidLevel {
    /// Striping, no redundancy.
    Raid0,
    /// Mirroring across all members.
    Raid1,
    /// Striping over mirror pairs.
    Raid10,
    /// Rotating single parity.
    Raid5,
    /// Rotating double parity.
    Raid6,
}

impl RaidLevel {
    /// Lower-case name for tables and JSON (`raid0`, `raid1`, `raid10`, `raid5`, `raid6`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Raid0 => "raid0",
            Self::Raid1 => "raid1",
            Self::Raid10 => "raid10",
            Self::Raid5 => "raid5",
            Self::Raid6 => "raid6",
        }
    }
}

/// A drive's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriveState {
    /// In no pool.
    Free,
    /// A current member of its pool.
    Active,
    /// A member the pool stopped using after an error.
    Failed,
    /// Holds a superblock its pool no longer counts as current.
    Stale,
    /// A member being brought up to date.
    Rebuilding,
    /// A member the pool expects that the node does not see.
    Missing,
    /// A hot spare of its pool.
    Spare,
}

impl DriveState {
    /// Lower-case name for tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Active => "active",
            Self::Failed => "failed",
            Self::Stale => "stale",
            Self::Rebuilding => "rebuilding",
            Self::Missing => "missing",
            Self::Spare => "spare",
        }
    }
}

/// A pool's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolState {
    /// Every member current.
    Online,
    /// Serving with less redundancy than configured.
    Degraded,
    /// Not serving.
    Offline,
}

impl PoolState {
    /// Lower-case name for tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Degraded => "degraded",
            Self::Offline => "offline",
        }
    }
}

/// Classes of config failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigErrorKind {
    /// The request breaks a rule.
    InvalidArgument,
    /// Something named does not exist.
    NotFound,
    /// A name, NQN, nsid or host is taken.
    AlreadyExists,
    /// The object is used by another.
    InUse,
    /// Not enough capacity, or a node limit would be exceeded.
    NoSpace,
    /// The metadata service cannot act now.
    NotReady,
    /// Writing or flushing a drive failed; nothing changed.
    IoError,
    /// Understood but not allowed.
    Refused,
}

impl ConfigErrorKind {
    /// snake_case name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::InUse => "in_use",
            Self::NoSpace => "no_space",
            Self::NotReady => "not_ready",
            Self::IoError => "io_error",
            Self::Refused => "refused",
        }
    }
}

/// What a change did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Done {
    /// For humans, one line.
    pub message: String,
    /// `AddNamespace`: the nsid assigned; 0 otherwise.
    pub nsid: u32,
    /// `CreatePool`, `CreateVolume`: the UUID created; empty otherwise.
    pub uuid: String,
}

/// A reply from the metadata service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigReply {
    /// A change was made and is durable.
    Done(Done),
    /// Answer to [`ConfigRequest::ListDrives`].
    Drives(Vec<DriveInfo>),
    /// Answer to [`ConfigRequest::ListPools`] and [`ConfigRequest::ShowPool`] (one pool).
    Pools(Vec<PoolInfo>),
    /// Answer to [`ConfigRequest::ListVolumes`].
    Volumes(Vec<VolumeInfo>),
    /// Answer to [`ConfigRequest::ListSubsystems`].
    Subsystems(Vec<SubsystemInfo>),
    /// The request failed; nothing was changed.
    Error {
        /// Class.
        kind: ConfigErrorKind,
        /// For humans, one line.
        message: String,
    },
}

/// One drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DriveInfo {
    /// The node's name for it.
    pub name: String,
    /// Where it is reached; empty when missing.
    pub address: String,
    /// Capacity.
    pub capacity_bytes: u64,
    /// 512 or 4096; 0 when missing.
    pub block_size: u32,
    /// NVMe model number.
    pub model: String,
    /// NVMe serial number.
    pub serial: String,
    /// Its pool; empty when free.
    pub pool: String,
    /// Its slot in the pool; 0 when free.
    pub slot: u32,
    /// State.
    pub state: DriveState,
    /// Blocks it returned that failed their integrity check.
    pub integrity_errors: u64,
}

/// One pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolInfo {
    /// Name.
    pub name: String,
    /// UUID, canonical text.
    pub uuid: String,
    /// RAID level.
    pub raid: RaidLevel,
    /// Stripe chunk.
    pub chunk_bytes: u32,
    /// Usable capacity (after redundancy).
    pub capacity_bytes: u64,
    /// Not allocated to volumes.
    pub free_bytes: u64,
    /// State.
    pub state: PoolState,
    /// Of the newest metadata image.
    pub generation: u64,
    /// Ownership epoch.
    pub epoch: u64,
    /// The owning node's id.
    pub owner_node: u32,
    /// Members in slot order.
    pub members: Vec<PoolMember>,
    /// Bytes of each member's data area.
    pub member_bytes: u64,
    /// The member being rebuilt: `(slot, bytes of it rebuilt)`.
    pub rebuild: Option<(u32, u64)>,
    /// The scrub now or last.
    pub scrub: Option<PoolScrub>,
    /// The raid service's view of the pool's rebuild and scrub.
    pub jobs: PoolJobs,
    /// Hot spares, by drive name (or UUID), at most [`MAX_SPARES`].
    pub spares: Vec<String>,
    /// What integrity checking found and did.
    pub integrity: PoolIntegrity,
}

/// A pool's integrity findings since the datapath started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolIntegrity {
    /// Reads served from a good copy after a bad one.
    pub recovered: u64,
    /// Bad copies rewritten.
    pub healed: u64,
    /// Reads with no good copy.
    pub unrecoverable: u64,
}

/// Most hot spares a pool lists.
pub const MAX_SPARES: usize = 8;

/// How a pool's rebuild and scrub go, as the raid service schedules and measures them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PoolJobs {
    /// The operator's rate, bytes/s of each member (0: yield to host I/O).
    pub rate_limit: u64,
    /// The rebuild's measured rate, bytes/s.
    pub rebuild_rate: u64,
    /// The rebuild's time left, ms ([`u64::MAX`]: unknown).
    pub rebuild_eta_ms: u64,
    /// Where this run of the rebuild started (a resumed one: its checkpoint), bytes.
    pub rebuild_from: u64,
    /// The rebuild position committed on the drives, bytes.
    pub rebuild_checkpoint: u64,
    /// The scrub's measured rate, bytes/s.
    pub scrub_rate: u64,
    /// The scrub's time left, ms ([`u64::MAX`]: unknown).
    pub scrub_eta_ms: u64,
}

impl Default for PoolJobs {
    fn default() -> Self {
        Self {
            rate_limit: 0,
            rebuild_rate: 0,
            rebuild_eta_ms: u64::MAX,
            rebuild_from: 0,
            rebuild_checkpoint: 0,
            scrub_rate: 0,
            scrub_eta_ms: u64::MAX,
        }
    }
}

/// A pool's scrub (its datapath's, since that started).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolScrub {
    /// Bytes of each member checked (done at [`PoolInfo::member_bytes`]).
    pub done_bytes: u64,
    /// Windows whose parity disagreed with their data.
    pub mismatches: u64,
    /// Of those, rewritten from the data.
    pub repaired: u64,
    /// Windows that could not be checked (a member lost).
    pub skipped: u64,
}

/// One member of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolMember {
    /// The drive's name (empty if the node never saw the drive).
    pub drive: String,
    /// The drive's UUID in the pool.
    pub drive_uuid: String,
    /// Slot.
    pub slot: u32,
    /// State (`active`, `failed`, `rebuilding` or `missing`).
    pub state: DriveState,
}

/// One volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// UUID, canonical text.
    pub uuid: String,
    /// NGUID, 32 hex digits.
    pub nguid: String,
    /// Its pool.
    pub pool: String,
    /// Size.
    pub size_bytes: u64,
    /// Block size.
    pub block_size: u32,
    /// The namespaces exporting it.
    pub exports: Vec<Export>,
}

/// A namespace exporting a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Export {
    /// The subsystem.
    pub nqn: String,
    /// The namespace.
    pub nsid: u32,
}

/// One subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubsystemInfo {
    /// NQN.
    pub nqn: String,
    /// Whether any host may connect.
    pub allow_any_host: bool,
    /// Allowed host NQNs.
    pub hosts: Vec<String>,
    /// Parallel to `hosts`: whether each must authenticate (DH-HMAC-CHAP secrets set); empty
    /// when none must.
    pub hosts_authenticate: Vec<bool>,
    /// Namespaces in nsid order.
    pub namespaces: Vec<NamespaceInfo>,
}

/// One namespace of a subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespaceInfo {
    /// Namespace id.
    pub nsid: u32,
    /// The volume it exports.
    pub volume: String,
    /// NGUID, 32 hex digits.
    pub nguid: String,
    /// ANA group id.
    pub ana_group: u32,
}

macro_rules! enum_map {
    ($ours:ty, $theirs:ty, $($a:ident),+) => {
        impl From<$ours> for $theirs {
            fn from(v: $ours) -> Self {
                match v { $(<$ours>::$a => Self::$a),+ }
            }
        }
        impl From<$theirs> for $ours {
            fn from(v: $theirs) -> Self {
                match v { $(<$theirs>::$a => Self::$a),+ }
            }
        }
    };
}
enum_map!(
    RaidLevel,
    wire::RaidLevel,
    Raid0,
    Raid1,
    Raid10,
    Raid5,
    Raid6
);
enum_map!(
    DriveState,
    wire::DriveState,
    Free,
    Active,
    Failed,
    Stale,
    Rebuilding,
    Missing,
    Spare
);
enum_map!(PoolState, wire::PoolState, Online, Degraded, Offline);
enum_map!(
    ConfigErrorKind,
    wire::ConfigErrorKind,
    InvalidArgument,
    NotFound,
    AlreadyExists,
    InUse,
    NoSpace,
    NotReady,
    IoError,
    Refused
);

/// Why a name or NQN breaks the rules `duplexctl` checks before sending (the metadata service
/// checks them again, with its own, possibly stricter, rules).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// Empty or too long.
    #[error("{what} must be 1 to {max} bytes long")]
    Length {
        /// What kind of text (`a name`, `an NQN`).
        what: &'static str,
        /// Its limit.
        max: usize,
    },
    /// Holds a control character.
    #[error("{what} must not contain control characters")]
    Control {
        /// What kind of text.
        what: &'static str,
    },
    /// An NQN that does not start with `nqn.`.
    #[error("an NQN starts with \"nqn.\"")]
    NqnPrefix,
    /// An NQN with white space.
    #[error("an NQN has no white space")]
    NqnSpace,
}

/// Checks a drive, pool or volume name: 1..=[`MAX_NAME_BYTES`] bytes, no control characters.
pub fn check_name(name: &str) -> Result<(), RuleError> {
    const WHAT: &str = "a name";
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(RuleError::Length {
            what: WHAT,
            max: MAX_NAME_BYTES,
        });
    }
    if name.chars().any(char::is_control) {
        return Err(RuleError::Control { what: WHAT });
    }
    Ok(())
}

/// Checks an NQN the obvious way: starts with `nqn.`, at most [`MAX_NQN_BYTES`] bytes, no white
/// space or control characters.
pub fn check_nqn(nqn: &str) -> Result<(), RuleError> {
    const WHAT: &str = "an NQN";
    if nqn.is_empty() || nqn.len() > MAX_NQN_BYTES {
        return Err(RuleError::Length {
            what: WHAT,
            max: MAX_NQN_BYTES,
        });
    }
    if !nqn.starts_with("nqn.") || nqn.len() == 4 {
        return Err(RuleError::NqnPrefix);
    }
    if nqn.chars().any(char::is_control) {
        return Err(RuleError::Control { what: WHAT });
    }
    if nqn.chars().any(char::is_whitespace) {
        return Err(RuleError::NqnSpace);
    }
    Ok(())
}

fn required(t: &str, field: &'static str, max: usize) -> Result<(), ControlError> {
    check_text(t, field, max, true)
}

fn optional(t: &str, field: &'static str, max: usize) -> Result<(), ControlError> {
    check_text(t, field, max, false)
}

fn bounded(len: usize, field: &'static str, max: usize) -> Result<(), ControlError> {
    if len > max {
        return Err(ControlError::TooManyEntries { field, len, max });
    }
    Ok(())
}

fn read<'a>(
    bytes: &'a [u8],
) -> Result<capnp::message::Reader<capnp::serialize::OwnedSegments>, ControlError> {
    let mut rest: &'a [u8] = bytes;
    let message = capnp::serialize::read_message(&mut rest, reader_options())
        .map_err(ControlError::Decode)?;
    if !rest.is_empty() {
        return Err(ControlError::TrailingBytes(rest.len()));
    }
    Ok(message)
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

impl ConfigRequest {
    /// Whether the request only reads (so repeating it is harmless).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Self::ListDrives
                | Self::ListPools
                | Self::ShowPool(_)
                | Self::ListVolumes
                | Self::ListVolumesAfter(_)
                | Self::ListSubsystems
        )
    }

    /// The schema's name of the request (`createPool`, ...), for logs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::ListDrives => "listDrives",
            Self::CreatePool { .. } => "createPool",
            Self::ListPools => "listPools",
            Self::ShowPool(_) => "showPool",
            Self::DestroyPool { .. } => "destroyPool",
            Self::CreateVolume { .. } => "createVolume",
            Self::ListVolumes => "listVolumes",
            Self::ResizeVolume { .. } => "resizeVolume",
            Self::DeleteVolume(_) => "deleteVolume",
            Self::CreateSubsystem(_) => "createSubsystem",
            Self::ListSubsystems => "listSubsystems",
            Self::DeleteSubsystem(_) => "deleteSubsystem",
            Self::AddNamespace { .. } => "addNamespace",
            Self::RemoveNamespace { .. } => "removeNamespace",
            Self::AllowHost { .. } => "allowHost",
            Self::DenyHost { .. } => "denyHost",
            Self::AllowAnyHost { .. } => "allowAnyHost",
            Self::ImportPool { .. } => "importPool",
            Self::MovePool { .. } => "movePool",
            Self::ReplaceMember { .. } => "replaceMember",
            Self::SetPoolRate { .. } => "setPoolRate",
            Self::AddSpare { .. } => "addSpare",
            Self::ScrubPool(_) => "scrubPool",
            Self::ListVolumesAfter(_) => "listVolumesAfter",
        }
    }

    /// Checks the bounds of the schema.
    pub fn validate(&self) -> Result<(), ControlError> {
        match self {
            Self::ListDrives | Self::ListPools | Self::ListVolumes | Self::ListSubsystems => Ok(()),
            Self::CreatePool { name, drives, .. } => {
                required(name, "config.createPool.name", MAX_NAME_BYTES)?;
                if drives.is_empty() {
                    return Err(ControlError::MissingField("config.createPool.drives"));
                }
                bounded(drives.len(), "config.createPool.drives", MAX_POOL_MEMBERS)?;
                drives
                    .iter()
                    .try_for_each(|d| required(d, "config.createPool.drives", MAX_NAME_BYTES))
            }
            Self::ShowPool(name) => required(name, "config.showPool", MAX_NAME_BYTES),
            Self::DestroyPool { name, .. } => {
                required(name, "config.destroyPool.name", MAX_NAME_BYTES)
            }
            Self::CreateVolume { name, pool, .. } => {
                required(name, "config.createVolume.name", MAX_NAME_BYTES)?;
                required(pool, "config.createVolume.pool", MAX_NAME_BYTES)
            }
            Self::ResizeVolume { name, .. } => {
                required(name, "config.resizeVolume.name", MAX_NAME_BYTES)
            }
            Self::DeleteVolume(name) => required(name, "config.deleteVolume", MAX_NAME_BYTES),
            Self::CreateSubsystem(nqn) => required(nqn, "config.createSubsystem", MAX_NQN_BYTES),
            Self::DeleteSubsystem(nqn) => required(nqn, "config.deleteSubsystem", MAX_NQN_BYTES),
            Self::AddNamespace { nqn, volume, .. } => {
                required(nqn, "config.addNamespace.nqn", MAX_NQN_BYTES)?;
                required(volume, "config.addNamespace.volume", MAX_NAME_BYTES)
            }
            Self::RemoveNamespace { nqn, .. } => {
                required(nqn, "config.removeNamespace.nqn", MAX_NQN_BYTES)
            }
            Self::AllowHost {
                nqn,
                host_nqn,
                secrets,
            } => {
                required(nqn, "config.hostAccess.nqn", MAX_NQN_BYTES)?;
                required(host_nqn, "config.hostAccess.hostNqn", MAX_NQN_BYTES)?;
                if let Some(sec) = secrets {
                    if let Some(h) = &sec.host {
                        required(h, "config.hostAccess.dhchapSecret", MAX_SECRET_BYTES)?;
                    }
                    if let Some(c) = &sec.ctrl {
                        required(c, "config.hostAccess.dhchapCtrlSecret", MAX_SECRET_BYTES)?;
                        if sec.host.is_none() {
                            return Err(ControlError::MissingField(
                                "config.hostAccess.dhchapSecret",
                            ));
                        }
                    }
                    if let Some(t) = &sec.tls_psk {
                        required(t, "config.hostAccess.tlsPsk", MAX_SECRET_BYTES)?;
                    }
                    if sec.host.is_none() && sec.tls_psk.is_none() {
                        return Err(ControlError::MissingField("config.hostAccess.dhchapSecret"));
                    }
                }
                Ok(())
            }
            Self::DenyHost { nqn, host_nqn } => {
                required(nqn, "config.hostAccess.nqn", MAX_NQN_BYTES)?;
                required(host_nqn, "config.hostAccess.hostNqn", MAX_NQN_BYTES)
            }
            Self::ImportPool { pool, .. } => {
                required(pool, "config.importPool.pool", UUID_TEXT_BYTES)
            }
            // The node is checked by the metadata service (it must be the peer's id).
            Self::MovePool { name, .. } => required(name, "config.movePool.name", MAX_NAME_BYTES),
            Self::ScrubPool(name) => required(name, "config.scrubPool", MAX_NAME_BYTES),
            Self::SetPoolRate { pool, .. } => {
                required(pool, "config.setPoolRate.pool", MAX_NAME_BYTES)
            }
            Self::AddSpare { pool, drive } => {
                required(pool, "config.addSpare.pool", MAX_NAME_BYTES)?;
                required(drive, "config.addSpare.drive", MAX_NAME_BYTES)
            }
            Self::ReplaceMember { pool, old, new } => {
                required(pool, "config.replaceMember.pool", MAX_NAME_BYTES)?;
                required(old, "config.replaceMember.old", MAX_NAME_BYTES)?;
                required(new, "config.replaceMember.new", MAX_NAME_BYTES)
            }
            Self::ListVolumesAfter(name) => {
                optional(name, "config.listVolumesAfter", MAX_NAME_BYTES)
            }
            Self::AllowAnyHost { nqn, .. } => {
                required(nqn, "config.allowAnyHost.nqn", MAX_NQN_BYTES)
            }
        }
    }

    /// Writes the request into its schema struct (also what duplexctl sends to mgmt).
    pub fn write_body(&self, mut body: wire::config_request_body::Builder<'_>) {
        match self {
            Self::ListDrives => body.set_list_drives(()),
            Self::CreatePool {
                name,
                raid,
                drives,
                chunk_bytes,
            } => {
                let mut p = body.init_create_pool();
                p.set_name(name.as_str());
                p.set_raid((*raid).into());
                p.set_chunk_bytes(*chunk_bytes);
                let len = len_u32(drives.len());
                let mut list = p.init_drives(len);
                for (i, d) in (0..len).zip(drives) {
                    list.set(i, d.as_str());
                }
            }
            Self::ListPools => body.set_list_pools(()),
            Self::ShowPool(name) => body.set_show_pool(name.as_str()),
            Self::DestroyPool { name, force } => {
                let mut p = body.init_destroy_pool();
                p.set_name(name.as_str());
                p.set_force(*force);
            }
            Self::CreateVolume {
                name,
                pool,
                size_bytes,
            } => {
                let mut v = body.init_create_volume();
                v.set_name(name.as_str());
                v.set_pool(pool.as_str());
                v.set_size_bytes(*size_bytes);
            }
            Self::ListVolumes => body.set_list_volumes(()),
            Self::ResizeVolume { name, size_bytes } => {
                let mut v = body.init_resize_volume();
                v.set_name(name.as_str());
                v.set_size_bytes(*size_bytes);
            }
            Self::DeleteVolume(name) => body.set_delete_volume(name.as_str()),
            Self::CreateSubsystem(nqn) => body.set_create_subsystem(nqn.as_str()),
            Self::ListSubsystems => body.set_list_subsystems(()),
            Self::DeleteSubsystem(nqn) => body.set_delete_subsystem(nqn.as_str()),
            Self::AddNamespace { nqn, volume, nsid } => {
                let mut n = body.init_add_namespace();
                n.set_nqn(nqn.as_str());
                n.set_volume(volume.as_str());
                n.set_nsid(*nsid);
            }
            Self::RemoveNamespace { nqn, nsid } => {
                let mut n = body.init_remove_namespace();
                n.set_nqn(nqn.as_str());
                n.set_nsid(*nsid);
            }
            Self::AllowHost {
                nqn,
                host_nqn,
                secrets,
            } => {
                let mut h = body.init_allow_host();
                h.set_nqn(nqn.as_str());
                h.set_host_nqn(host_nqn.as_str());
                if let Some(sec) = secrets {
                    if let Some(s) = &sec.host {
                        h.set_dhchap_secret(s.as_str());
                    }
                    if let Some(c) = &sec.ctrl {
                        h.set_dhchap_ctrl_secret(c.as_str());
                    }
                    if let Some(t) = &sec.tls_psk {
                        h.set_tls_psk(t.as_str());
                    }
                }
            }
            Self::DenyHost { nqn, host_nqn } => {
                let mut h = body.init_deny_host();
                h.set_nqn(nqn.as_str());
                h.set_host_nqn(host_nqn.as_str());
            }
            Self::AllowAnyHost { nqn, any } => {
                let mut a = body.init_allow_any_host();
                a.set_nqn(nqn.as_str());
                a.set_any(*any);
            }
            Self::ListVolumesAfter(name) => body.set_list_volumes_after(name.as_str()),
            Self::ImportPool { pool, force } => {
                let mut p = body.init_import_pool();
                p.set_pool(pool.as_str());
                p.set_force(*force);
            }
            Self::MovePool { name, node } => {
                let mut p = body.init_move_pool();
                p.set_name(name.as_str());
                p.set_node(*node);
            }
            Self::ScrubPool(name) => body.set_scrub_pool(name.as_str()),
            Self::AddSpare { pool, drive } => {
                let mut r = body.init_add_spare();
                r.set_pool(pool.as_str());
                r.set_drive(drive.as_str());
            }
            Self::SetPoolRate { pool, rate } => {
                let mut r = body.init_set_pool_rate();
                r.set_pool(pool.as_str());
                r.set_rate(*rate);
            }
            Self::ReplaceMember { pool, old, new } => {
                let mut r = body.init_replace_member();
                r.set_pool(pool.as_str());
                r.set_old(old.as_str());
                r.set_new(new.as_str());
            }
        }
    }

    /// Reads and validates a request from its schema struct (also what mgmt does with the body
    /// an RPC client sent); never panics.
    pub fn read_body(body: wire::config_request_body::Reader<'_>) -> Result<Self, ControlError> {
        use wire::config_request_body::Which;
        let d = ControlError::Decode;
        let request = match body.which().map_err(unknown("ConfigRequestBody"))? {
            Which::ListDrives(()) => Self::ListDrives,
            Which::CreatePool(p) => {
                let p = p.map_err(d)?;
                let list = p.get_drives().map_err(d)?;
                bounded(
                    list.len() as usize,
                    "config.createPool.drives",
                    MAX_POOL_MEMBERS,
                )?;
                let mut drives = Vec::with_capacity(list.len() as usize);
                for t in list.iter() {
                    drives.push(text(t, "config.createPool.drives", MAX_NAME_BYTES)?);
                }
                Self::CreatePool {
                    name: text(p.get_name(), "config.createPool.name", MAX_NAME_BYTES)?,
                    raid: p.get_raid().map_err(unknown("RaidLevel"))?.into(),
                    drives,
                    chunk_bytes: p.get_chunk_bytes(),
                }
            }
            Which::ListPools(()) => Self::ListPools,
            Which::ShowPool(t) => Self::ShowPool(text(t, "config.showPool", MAX_NAME_BYTES)?),
            Which::DestroyPool(p) => {
                let p = p.map_err(d)?;
                Self::DestroyPool {
                    name: text(p.get_name(), "config.destroyPool.name", MAX_NAME_BYTES)?,
                    force: p.get_force(),
                }
            }
            Which::CreateVolume(v) => {
                let v = v.map_err(d)?;
                Self::CreateVolume {
                    name: text(v.get_name(), "config.createVolume.name", MAX_NAME_BYTES)?,
                    pool: text(v.get_pool(), "config.createVolume.pool", MAX_NAME_BYTES)?,
                    size_bytes: v.get_size_bytes(),
                }
            }
            Which::ListVolumes(()) => Self::ListVolumes,
            Which::ResizeVolume(v) => {
                let v = v.map_err(d)?;
                Self::ResizeVolume {
                    name: text(v.get_name(), "config.resizeVolume.name", MAX_NAME_BYTES)?,
                    size_bytes: v.get_size_bytes(),
                }
            }
            Which::DeleteVolume(t) => {
                Self::DeleteVolume(text(t, "config.deleteVolume", MAX_NAME_BYTES)?)
            }
            Which::CreateSubsystem(t) => {
                Self::CreateSubsystem(text(t, "config.createSubsystem", MAX_NQN_BYTES)?)
            }
            Which::ListSubsystems(()) => Self::ListSubsystems,
            Which::DeleteSubsystem(t) => {
                Self::DeleteSubsystem(text(t, "config.deleteSubsystem", MAX_NQN_BYTES)?)
            }
            Which::AddNamespace(n) => {
                let n = n.map_err(d)?;
                Self::AddNamespace {
                    nqn: text(n.get_nqn(), "config.addNamespace.nqn", MAX_NQN_BYTES)?,
                    volume: text(n.get_volume(), "config.addNamespace.volume", MAX_NAME_BYTES)?,
                    nsid: n.get_nsid(),
                }
            }
            Which::RemoveNamespace(n) => {
                let n = n.map_err(d)?;
                Self::RemoveNamespace {
                    nqn: text(n.get_nqn(), "config.removeNamespace.nqn", MAX_NQN_BYTES)?,
                    nsid: n.get_nsid(),
                }
            }
            Which::AllowHost(h) => {
                let h = h.map_err(d)?;
                let host = text(
                    h.get_dhchap_secret(),
                    "config.hostAccess.dhchapSecret",
                    MAX_SECRET_BYTES,
                )?;
                let ctrl = text(
                    h.get_dhchap_ctrl_secret(),
                    "config.hostAccess.dhchapCtrlSecret",
                    MAX_SECRET_BYTES,
                )?;
                let tls = text(
                    h.get_tls_psk(),
                    "config.hostAccess.tlsPsk",
                    MAX_SECRET_BYTES,
                )?;
                if host.is_empty() && !ctrl.is_empty() {
                    // A controller secret needs the host's.
                    return Err(ControlError::MissingField("config.hostAccess.dhchapSecret"));
                }
                let given = |t: String| (!t.is_empty()).then_some(t);
                let any = !host.is_empty() || !tls.is_empty();
                Self::AllowHost {
                    nqn: text(h.get_nqn(), "config.hostAccess.nqn", MAX_NQN_BYTES)?,
                    host_nqn: text(h.get_host_nqn(), "config.hostAccess.hostNqn", MAX_NQN_BYTES)?,
                    secrets: any.then(|| HostSecrets {
                        host: given(host),
                        ctrl: given(ctrl),
                        tls_psk: given(tls),
                    }),
                }
            }
            Which::DenyHost(h) => {
                let h = h.map_err(d)?;
                Self::DenyHost {
                    nqn: text(h.get_nqn(), "config.hostAccess.nqn", MAX_NQN_BYTES)?,
                    host_nqn: text(h.get_host_nqn(), "config.hostAccess.hostNqn", MAX_NQN_BYTES)?,
                }
            }
            Which::AllowAnyHost(a) => {
                let a = a.map_err(d)?;
                Self::AllowAnyHost {
                    nqn: text(a.get_nqn(), "config.allowAnyHost.nqn", MAX_NQN_BYTES)?,
                    any: a.get_any(),
                }
            }
            Which::ListVolumesAfter(t) => {
                Self::ListVolumesAfter(text(t, "config.listVolumesAfter", MAX_NAME_BYTES)?)
            }
            Which::ImportPool(p) => {
                let p = p.map_err(d)?;
                Self::ImportPool {
                    pool: text(p.get_pool(), "config.importPool.pool", UUID_TEXT_BYTES)?,
                    force: p.get_force(),
                }
            }
            Which::MovePool(p) => {
                let p = p.map_err(d)?;
                Self::MovePool {
                    name: text(p.get_name(), "config.movePool.name", MAX_NAME_BYTES)?,
                    node: p.get_node(),
                }
            }
            Which::ScrubPool(t) => Self::ScrubPool(text(t, "config.scrubPool", MAX_NAME_BYTES)?),
            Which::AddSpare(r) => {
                let r = r.map_err(d)?;
                Self::AddSpare {
                    pool: text(r.get_pool(), "config.addSpare.pool", MAX_NAME_BYTES)?,
                    drive: text(r.get_drive(), "config.addSpare.drive", MAX_NAME_BYTES)?,
                }
            }
            Which::SetPoolRate(r) => {
                let r = r.map_err(d)?;
                Self::SetPoolRate {
                    pool: text(r.get_pool(), "config.setPoolRate.pool", MAX_NAME_BYTES)?,
                    rate: r.get_rate(),
                }
            }
            Which::ReplaceMember(r) => {
                let r = r.map_err(d)?;
                Self::ReplaceMember {
                    pool: text(r.get_pool(), "config.replaceMember.pool", MAX_NAME_BYTES)?,
                    old: text(r.get_old(), "config.replaceMember.old", MAX_NAME_BYTES)?,
                    new: text(r.get_new(), "config.replaceMember.new", MAX_NAME_BYTES)?,
                }
            }
        };
        request.validate()?;
        Ok(request)
    }

    /// Encodes with `request_id`. Does not check bounds ([`ConfigChannel::send_request`] does).
    pub fn encode(&self, request_id: u64) -> Vec<u8> {
        let mut message = capnp::message::Builder::new_default();
        let mut root = message.init_root::<wire::config_request::Builder<'_>>();
        root.set_request_id(request_id);
        self.write_body(root.init_body());
        capnp::serialize::write_message_to_words(&message)
    }

    /// Decodes and validates; never panics.
    pub fn decode(bytes: &[u8]) -> Result<(u64, Self), ControlError> {
        let message = read(bytes)?;
        let root: wire::config_request::Reader<'_> =
            message.get_root().map_err(ControlError::Decode)?;
        if !root.has_body() {
            return Err(ControlError::MissingField("ConfigRequest.body"));
        }
        let request = Self::read_body(root.get_body().map_err(ControlError::Decode)?)?;
        Ok((root.get_request_id(), request))
    }
}

impl ConfigReply {
    /// Whether this is a fitting answer to `request` (an error always is; `ShowPool` is
    /// answered by exactly one pool).
    pub fn answers(&self, request: &ConfigRequest) -> bool {
        match (self, request) {
            (Self::Error { .. }, _)
            | (Self::Drives(_), ConfigRequest::ListDrives)
            | (Self::Pools(_), ConfigRequest::ListPools)
            | (Self::Volumes(_), ConfigRequest::ListVolumes | ConfigRequest::ListVolumesAfter(_))
            | (Self::Subsystems(_), ConfigRequest::ListSubsystems) => true,
            (Self::Pools(p), ConfigRequest::ShowPool(_)) => p.len() == 1,
            (Self::Done(_), r) => !r.is_read_only(),
            _ => false,
        }
    }

    /// What kind of reply this is, for messages ("a pool list", ...).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Done(_) => "a done message",
            Self::Drives(_) => "a drive list",
            Self::Pools(_) => "a pool list",
            Self::Volumes(_) => "a volume list",
            Self::Subsystems(_) => "a subsystem list",
            Self::Error { .. } => "an error",
        }
    }

    /// Checks the bounds of the schema.
    pub fn validate(&self) -> Result<(), ControlError> {
        match self {
            Self::Done(d) => {
                optional(&d.message, "config.done.message", MAX_MESSAGE_BYTES)?;
                optional(&d.uuid, "config.done.uuid", UUID_TEXT_BYTES)
            }
            Self::Error { message, .. } => {
                optional(message, "config.error.message", MAX_MESSAGE_BYTES)
            }
            Self::Drives(list) => {
                bounded(list.len(), "config.drives", MAX_DRIVES)?;
                list.iter().try_for_each(validate_drive)
            }
            Self::Pools(list) => {
                bounded(list.len(), "config.pools", MAX_POOLS)?;
                let members: usize = list.iter().map(|p| p.members.len()).sum();
                bounded(members, "config.pools.members (all)", MAX_MEMBERS_PER_REPLY)?;
                list.iter().try_for_each(validate_pool)
            }
            Self::Volumes(list) => {
                bounded(list.len(), "config.volumes", MAX_VOLUMES)?;
                let exports: usize = list.iter().map(|v| v.exports.len()).sum();
                bounded(exports, "config.volumes.exports (all)", MAX_NAMESPACES)?;
                list.iter().try_for_each(validate_volume)
            }
            Self::Subsystems(list) => {
                bounded(list.len(), "config.subsystems", MAX_SUBSYSTEMS)?;
                let hosts: usize = list.iter().map(|s| s.hosts.len()).sum();
                bounded(hosts, "config.subsystems.hosts (all)", MAX_HOSTS)?;
                let namespaces: usize = list.iter().map(|s| s.namespaces.len()).sum();
                bounded(
                    namespaces,
                    "config.subsystems.namespaces (all)",
                    MAX_NAMESPACES,
                )?;
                list.iter().try_for_each(validate_subsystem)
            }
        }
    }

    /// Writes the reply into its schema struct (also what mgmt returns to its RPC client).
    pub fn write_body(&self, body: wire::config_reply_body::Builder<'_>) {
        match self {
            Self::Done(done) => {
                let mut d = body.init_done();
                d.set_message(done.message.as_str());
                d.set_nsid(done.nsid);
                d.set_uuid(done.uuid.as_str());
            }
            Self::Error { kind, message } => {
                let mut e = body.init_error();
                e.set_kind((*kind).into());
                e.set_message(message.as_str());
            }
            Self::Drives(list) => {
                let len = len_u32(list.len());
                let mut out = body.init_drives(len);
                for (i, drive) in (0..len).zip(list) {
                    write_drive(out.reborrow().get(i), drive);
                }
            }
            Self::Pools(list) => {
                let len = len_u32(list.len());
                let mut out = body.init_pools(len);
                for (i, pool) in (0..len).zip(list) {
                    write_pool(out.reborrow().get(i), pool);
                }
            }
            Self::Volumes(list) => {
                let len = len_u32(list.len());
                let mut out = body.init_volumes(len);
                for (i, volume) in (0..len).zip(list) {
                    write_volume(out.reborrow().get(i), volume);
                }
            }
            Self::Subsystems(list) => {
                let len = len_u32(list.len());
                let mut out = body.init_subsystems(len);
                for (i, subsystem) in (0..len).zip(list) {
                    write_subsystem(out.reborrow().get(i), subsystem);
                }
            }
        }
    }

    /// Reads and validates a reply from its schema struct (also what duplexctl does with the
    /// body mgmt returns); never panics. Every list is bounded before it is read.
    pub fn read_body(body: wire::config_reply_body::Reader<'_>) -> Result<Self, ControlError> {
        use wire::config_reply_body::Which;
        let d = ControlError::Decode;
        let reply = match body.which().map_err(unknown("ConfigReplyBody"))? {
            Which::Done(done) => {
                let done = done.map_err(d)?;
                Self::Done(Done {
                    message: text(done.get_message(), "config.done.message", MAX_MESSAGE_BYTES)?,
                    nsid: done.get_nsid(),
                    uuid: text(done.get_uuid(), "config.done.uuid", UUID_TEXT_BYTES)?,
                })
            }
            Which::Error(e) => {
                let e = e.map_err(d)?;
                Self::Error {
                    kind: e.get_kind().map_err(unknown("ConfigErrorKind"))?.into(),
                    message: text(e.get_message(), "config.error.message", MAX_MESSAGE_BYTES)?,
                }
            }
            Which::Drives(list) => {
                let list = list.map_err(d)?;
                bounded(list.len() as usize, "config.drives", MAX_DRIVES)?;
                Self::Drives(list.iter().map(read_drive).collect::<Result<_, _>>()?)
            }
            Which::Pools(list) => {
                let list = list.map_err(d)?;
                bounded(list.len() as usize, "config.pools", MAX_POOLS)?;
                let mut members = 0_usize;
                let mut pools = Vec::with_capacity(list.len() as usize);
                for p in list.iter() {
                    // Counted before the members are read, so that no reply makes more than
                    // the bound's worth of them.
                    members += p.reborrow().get_members().map_err(d)?.len() as usize;
                    bounded(members, "config.pools.members (all)", MAX_MEMBERS_PER_REPLY)?;
                    pools.push(read_pool(p)?);
                }
                Self::Pools(pools)
            }
            Which::Volumes(list) => {
                let list = list.map_err(d)?;
                bounded(list.len() as usize, "config.volumes", MAX_VOLUMES)?;
                let mut exports = 0_usize;
                let mut volumes = Vec::with_capacity(list.len() as usize);
                for v in list.iter() {
                    exports += v.reborrow().get_exports().map_err(d)?.len() as usize;
                    bounded(exports, "config.volumes.exports (all)", MAX_NAMESPACES)?;
                    volumes.push(read_volume(v)?);
                }
                Self::Volumes(volumes)
            }
            Which::Subsystems(list) => {
                let list = list.map_err(d)?;
                bounded(list.len() as usize, "config.subsystems", MAX_SUBSYSTEMS)?;
                let (mut hosts, mut namespaces) = (0_usize, 0_usize);
                let mut subsystems = Vec::with_capacity(list.len() as usize);
                for s in list.iter() {
                    hosts += s.reborrow().get_hosts().map_err(d)?.len() as usize;
                    bounded(hosts, "config.subsystems.hosts (all)", MAX_HOSTS)?;
                    namespaces += s.reborrow().get_namespaces().map_err(d)?.len() as usize;
                    bounded(
                        namespaces,
                        "config.subsystems.namespaces (all)",
                        MAX_NAMESPACES,
                    )?;
                    subsystems.push(read_subsystem(s)?);
                }
                Self::Subsystems(subsystems)
            }
        };
        reply.validate()?;
        Ok(reply)
    }

    /// Encodes with the `request_id` of the request answered. Does not check bounds
    /// ([`ConfigChannel::send_reply`] does).
    pub fn encode(&self, request_id: u64) -> Vec<u8> {
        let mut message = capnp::message::Builder::new_default();
        let mut root = message.init_root::<wire::config_reply::Builder<'_>>();
        root.set_request_id(request_id);
        self.write_body(root.init_body());
        capnp::serialize::write_message_to_words(&message)
    }

    /// Decodes and validates; never panics.
    pub fn decode(bytes: &[u8]) -> Result<(u64, Self), ControlError> {
        let message = read(bytes)?;
        let root: wire::config_reply::Reader<'_> =
            message.get_root().map_err(ControlError::Decode)?;
        if !root.has_body() {
            return Err(ControlError::MissingField("ConfigReply.body"));
        }
        let reply = Self::read_body(root.get_body().map_err(ControlError::Decode)?)?;
        Ok((root.get_request_id(), reply))
    }
}

fn validate_drive(d: &DriveInfo) -> Result<(), ControlError> {
    required(&d.name, "config.drives.name", MAX_NAME_BYTES)?;
    optional(&d.address, "config.drives.address", MAX_ADDRESS_BYTES)?;
    optional(&d.model, "config.drives.model", MAX_MODEL_BYTES)?;
    optional(&d.serial, "config.drives.serial", MAX_SERIAL_BYTES)?;
    optional(&d.pool, "config.drives.pool", MAX_NAME_BYTES)
}

fn validate_pool(p: &PoolInfo) -> Result<(), ControlError> {
    required(&p.name, "config.pools.name", MAX_NAME_BYTES)?;
    optional(&p.uuid, "config.pools.uuid", UUID_TEXT_BYTES)?;
    bounded(p.members.len(), "config.pools.members", MAX_POOL_MEMBERS)?;
    p.members.iter().try_for_each(|m| {
        optional(&m.drive, "config.pools.members.drive", MAX_NAME_BYTES)?;
        optional(
            &m.drive_uuid,
            "config.pools.members.driveUuid",
            UUID_TEXT_BYTES,
        )
    })
}

fn validate_volume(v: &VolumeInfo) -> Result<(), ControlError> {
    required(&v.name, "config.volumes.name", MAX_NAME_BYTES)?;
    optional(&v.uuid, "config.volumes.uuid", UUID_TEXT_BYTES)?;
    optional(&v.nguid, "config.volumes.nguid", NGUID_TEXT_BYTES)?;
    required(&v.pool, "config.volumes.pool", MAX_NAME_BYTES)?;
    v.exports
        .iter()
        .try_for_each(|e| required(&e.nqn, "config.volumes.exports.nqn", MAX_NQN_BYTES))
}

fn validate_subsystem(s: &SubsystemInfo) -> Result<(), ControlError> {
    required(&s.nqn, "config.subsystems.nqn", MAX_NQN_BYTES)?;
    s.hosts
        .iter()
        .try_for_each(|h| required(h, "config.subsystems.hosts", MAX_NQN_BYTES))?;
    s.namespaces.iter().try_for_each(|n| {
        required(
            &n.volume,
            "config.subsystems.namespaces.volume",
            MAX_NAME_BYTES,
        )?;
        optional(
            &n.nguid,
            "config.subsystems.namespaces.nguid",
            NGUID_TEXT_BYTES,
        )
    })
}

fn write_drive(mut out: wire::drive_info::Builder<'_>, d: &DriveInfo) {
    out.set_name(d.name.as_str());
    out.set_address(d.address.as_str());
    out.set_capacity_bytes(d.capacity_bytes);
    out.set_block_size(d.block_size);
    out.set_model(d.model.as_str());
    out.set_serial(d.serial.as_str());
    out.set_pool(d.pool.as_str());
    out.set_slot(d.slot);
    out.set_state(d.state.into());
    out.set_integrity_errors(d.integrity_errors);
}

fn read_drive(d: wire::drive_info::Reader<'_>) -> Result<DriveInfo, ControlError> {
    Ok(DriveInfo {
        name: text(d.get_name(), "config.drives.name", MAX_NAME_BYTES)?,
        address: text(d.get_address(), "config.drives.address", MAX_ADDRESS_BYTES)?,
        capacity_bytes: d.get_capacity_bytes(),
        block_size: d.get_block_size(),
        model: text(d.get_model(), "config.drives.model", MAX_MODEL_BYTES)?,
        serial: text(d.get_serial(), "config.drives.serial", MAX_SERIAL_BYTES)?,
        pool: text(d.get_pool(), "config.drives.pool", MAX_NAME_BYTES)?,
        slot: d.get_slot(),
        state: d.get_state().map_err(unknown("DriveState"))?.into(),
        integrity_errors: d.get_integrity_errors(),
    })
}

fn write_pool(mut out: wire::pool_info::Builder<'_>, p: &PoolInfo) {
    out.set_name(p.name.as_str());
    out.set_uuid(p.uuid.as_str());
    out.set_raid(p.raid.into());
    out.set_chunk_bytes(p.chunk_bytes);
    out.set_capacity_bytes(p.capacity_bytes);
    out.set_free_bytes(p.free_bytes);
    out.set_state(p.state.into());
    out.set_generation(p.generation);
    out.set_epoch(p.epoch);
    out.set_owner_node(p.owner_node);
    out.set_member_bytes(p.member_bytes);
    let (slot, done) = p.rebuild.unwrap_or((u32::MAX, 0));
    out.set_rebuild_slot(slot);
    out.set_rebuild_done(done);
    if let Some(s) = p.scrub {
        out.set_scrubbed(true);
        out.set_scrub_done(s.done_bytes);
        out.set_scrub_mismatches(s.mismatches);
        out.set_scrub_repaired(s.repaired);
        out.set_scrub_skipped(s.skipped);
    }
    out.set_rate_limit(p.jobs.rate_limit);
    out.set_rebuild_rate(p.jobs.rebuild_rate);
    out.set_rebuild_eta_ms(p.jobs.rebuild_eta_ms);
    out.set_rebuild_from(p.jobs.rebuild_from);
    out.set_rebuild_checkpoint(p.jobs.rebuild_checkpoint);
    out.set_scrub_rate(p.jobs.scrub_rate);
    out.set_scrub_eta_ms(p.jobs.scrub_eta_ms);
    out.set_integrity_recovered(p.integrity.recovered);
    out.set_integrity_healed(p.integrity.healed);
    out.set_integrity_unrecoverable(p.integrity.unrecoverable);
    let len = len_u32(p.spares.len());
    let mut spares = out.reborrow().init_spares(len);
    for (i, d) in (0..len).zip(&p.spares) {
        spares.set(i, d.as_str());
    }
    let len = len_u32(p.members.len());
    let mut members = out.init_members(len);
    for (i, m) in (0..len).zip(&p.members) {
        let mut o = members.reborrow().get(i);
        o.set_drive(m.drive.as_str());
        o.set_drive_uuid(m.drive_uuid.as_str());
        o.set_slot(m.slot);
        o.set_state(m.state.into());
    }
}

fn read_pool(p: wire::pool_info::Reader<'_>) -> Result<PoolInfo, ControlError> {
    let list = p.get_members().map_err(ControlError::Decode)?;
    bounded(
        list.len() as usize,
        "config.pools.members",
        MAX_POOL_MEMBERS,
    )?;
    let mut members = Vec::with_capacity(list.len() as usize);
    for m in list.iter() {
        members.push(PoolMember {
            drive: text(m.get_drive(), "config.pools.members.drive", MAX_NAME_BYTES)?,
            drive_uuid: text(
                m.get_drive_uuid(),
                "config.pools.members.driveUuid",
                UUID_TEXT_BYTES,
            )?,
            slot: m.get_slot(),
            state: m.get_state().map_err(unknown("DriveState"))?.into(),
        });
    }
    Ok(PoolInfo {
        name: text(p.get_name(), "config.pools.name", MAX_NAME_BYTES)?,
        uuid: text(p.get_uuid(), "config.pools.uuid", UUID_TEXT_BYTES)?,
        raid: p.get_raid().map_err(unknown("RaidLevel"))?.into(),
        chunk_bytes: p.get_chunk_bytes(),
        capacity_bytes: p.get_capacity_bytes(),
        free_bytes: p.get_free_bytes(),
        state: p.get_state().map_err(unknown("PoolState"))?.into(),
        generation: p.get_generation(),
        epoch: p.get_epoch(),
        owner_node: p.get_owner_node(),
        members,
        member_bytes: p.get_member_bytes(),
        rebuild: (p.get_rebuild_slot() != u32::MAX)
            .then(|| (p.get_rebuild_slot(), p.get_rebuild_done())),
        scrub: p.get_scrubbed().then(|| PoolScrub {
            done_bytes: p.get_scrub_done(),
            mismatches: p.get_scrub_mismatches(),
            repaired: p.get_scrub_repaired(),
            skipped: p.get_scrub_skipped(),
        }),
        integrity: PoolIntegrity {
            recovered: p.get_integrity_recovered(),
            healed: p.get_integrity_healed(),
            unrecoverable: p.get_integrity_unrecoverable(),
        },
        spares: {
            let list = p.get_spares().map_err(ControlError::Decode)?;
            bounded(list.len() as usize, "config.pools.spares", MAX_SPARES)?;
            let mut out = Vec::with_capacity(list.len() as usize);
            for t in list.iter() {
                out.push(text(t, "config.pools.spares", MAX_NAME_BYTES)?);
            }
            out
        },
        jobs: PoolJobs {
            rate_limit: p.get_rate_limit(),
            rebuild_rate: p.get_rebuild_rate(),
            rebuild_eta_ms: p.get_rebuild_eta_ms(),
            rebuild_from: p.get_rebuild_from(),
            rebuild_checkpoint: p.get_rebuild_checkpoint(),
            scrub_rate: p.get_scrub_rate(),
            scrub_eta_ms: p.get_scrub_eta_ms(),
        },
    })
}

fn write_volume(mut out: wire::volume_info::Builder<'_>, v: &VolumeInfo) {
    out.set_name(v.name.as_str());
    out.set_uuid(v.uuid.as_str());
    out.set_nguid(v.nguid.as_str());
    out.set_pool(v.pool.as_str());
    out.set_size_bytes(v.size_bytes);
    out.set_block_size(v.block_size);
    let len = len_u32(v.exports.len());
    let mut exports = out.init_exports(len);
    for (i, e) in (0..len).zip(&v.exports) {
        let mut o = exports.reborrow().get(i);
        o.set_nqn(e.nqn.as_str());
        o.set_nsid(e.nsid);
    }
}

fn read_volume(v: wire::volume_info::Reader<'_>) -> Result<VolumeInfo, ControlError> {
    let list = v.get_exports().map_err(ControlError::Decode)?;
    bounded(
        list.len() as usize,
        "config.volumes.exports",
        MAX_NAMESPACES,
    )?;
    let mut exports = Vec::with_capacity(list.len() as usize);
    for e in list.iter() {
        exports.push(Export {
            nqn: text(e.get_nqn(), "config.volumes.exports.nqn", MAX_NQN_BYTES)?,
            nsid: e.get_nsid(),
        });
    }
    Ok(VolumeInfo {
        name: text(v.get_name(), "config.volumes.name", MAX_NAME_BYTES)?,
        uuid: text(v.get_uuid(), "config.volumes.uuid", UUID_TEXT_BYTES)?,
        nguid: text(v.get_nguid(), "config.volumes.nguid", NGUID_TEXT_BYTES)?,
        pool: text(v.get_pool(), "config.volumes.pool", MAX_NAME_BYTES)?,
        size_bytes: v.get_size_bytes(),
        block_size: v.get_block_size(),
        exports,
    })
}

fn write_subsystem(mut out: wire::subsystem_info::Builder<'_>, s: &SubsystemInfo) {
    out.set_nqn(s.nqn.as_str());
    out.set_allow_any_host(s.allow_any_host);
    let len = len_u32(s.hosts.len());
    let mut hosts = out.reborrow().init_hosts(len);
    for (i, h) in (0..len).zip(&s.hosts) {
        hosts.set(i, h.as_str());
    }
    if s.hosts_authenticate.iter().any(|a| *a) {
        let len = len_u32(s.hosts_authenticate.len());
        let mut auth = out.reborrow().init_hosts_authenticate(len);
        for (i, a) in (0..len).zip(&s.hosts_authenticate) {
            auth.set(i, *a);
        }
    }
    let len = len_u32(s.namespaces.len());
    let mut namespaces = out.init_namespaces(len);
    for (i, n) in (0..len).zip(&s.namespaces) {
        let mut o = namespaces.reborrow().get(i);
        o.set_nsid(n.nsid);
        o.set_volume(n.volume.as_str());
        o.set_nguid(n.nguid.as_str());
        o.set_ana_group(n.ana_group);
    }
}

fn read_subsystem(s: wire::subsystem_info::Reader<'_>) -> Result<SubsystemInfo, ControlError> {
    let list = s.get_hosts().map_err(ControlError::Decode)?;
    bounded(list.len() as usize, "config.subsystems.hosts", MAX_HOSTS)?;
    let mut hosts = Vec::with_capacity(list.len() as usize);
    for h in list.iter() {
        hosts.push(text(h, "config.subsystems.hosts", MAX_NQN_BYTES)?);
    }
    let auth = s.get_hosts_authenticate().map_err(ControlError::Decode)?;
    if !auth.is_empty() && auth.len() as usize != hosts.len() {
        return Err(ControlError::Decode(capnp::Error::failed(format!(
            "config.subsystems.hostsAuthenticate: {} entries for {} hosts",
            auth.len(),
            hosts.len()
        ))));
    }
    // No host flagged is the same as no list (the writer sends none then).
    let mut hosts_authenticate: Vec<bool> = auth.iter().collect();
    if !hosts_authenticate.iter().any(|a| *a) {
        hosts_authenticate.clear();
    }
    let list = s.get_namespaces().map_err(ControlError::Decode)?;
    bounded(
        list.len() as usize,
        "config.subsystems.namespaces",
        MAX_NAMESPACES,
    )?;
    let mut namespaces = Vec::with_capacity(list.len() as usize);
    for n in list.iter() {
        namespaces.push(NamespaceInfo {
            nsid: n.get_nsid(),
            volume: text(
                n.get_volume(),
                "config.subsystems.namespaces.volume",
                MAX_NAME_BYTES,
            )?,
            nguid: text(
                n.get_nguid(),
                "config.subsystems.namespaces.nguid",
                NGUID_TEXT_BYTES,
            )?,
            ana_group: n.get_ana_group(),
        });
    }
    Ok(SubsystemInfo {
        nqn: text(s.get_nqn(), "config.subsystems.nqn", MAX_NQN_BYTES)?,
        allow_any_host: s.get_allow_any_host(),
        hosts,
        hosts_authenticate,
        namespaces,
    })
}

/// One end of the config channel: mgmt's (requests out, replies in) or metadata's (requests
/// in, replies out).
///
/// Request ids are this end's own counter, starting at 1 or where
/// [`ConfigChannel::with_first_request_id`] says: the channel outlives both peers, so a
/// restarted mgmt must not reuse an id whose late reply may still be queued.
#[derive(Debug)]
pub struct ConfigChannel {
    inner: ControlChannel,
    next_id: AtomicU64,
}

impl ConfigChannel {
    /// A connected pair: `(mgmt end, metadata end)`.
    pub fn pair() -> Result<(Self, Self), ControlError> {
        let (a, b) = ControlChannel::pair()?;
        Ok((Self::wrap(a), Self::wrap(b)))
    }

    /// Wraps a handed-over `SOCK_SEQPACKET` socket.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, ControlError> {
        Ok(Self::wrap(ControlChannel::from_fd(fd)?))
    }

    fn wrap(inner: ControlChannel) -> Self {
        Self {
            inner,
            next_id: AtomicU64::new(1),
        }
    }

    /// Numbers this end's requests from `first` on (0 is taken as 1). mgmt passes
    /// `generation << 32`, so that no two of its generations share an id.
    #[must_use]
    pub fn with_first_request_id(self, first: u64) -> Self {
        self.next_id.store(first.max(1), Ordering::Relaxed);
        self
    }

    /// Gives up the socket.
    pub fn into_fd(self) -> OwnedFd {
        self.inner.into_fd()
    }

    fn next_request_id(&self) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if id == 0 {
            // Wrapped around (after 2^64 requests): 0 is never an id.
            self.next_id.fetch_add(1, Ordering::Relaxed)
        } else {
            id
        }
    }

    /// Sends a request; returns its id. Refuses (sending nothing) a request out of bounds.
    pub fn send_request(&self, request: &ConfigRequest) -> Result<u64, ControlError> {
        request.validate()?;
        let id = self.next_request_id();
        self.inner.send_datagram(&request.encode(id), &[])?;
        Ok(id)
    }

    /// Sends the restart notice (metadata's end, when it starts as a restart): a reply with
    /// request id [`RESTART_NOTICE_ID`], an error saying the service restarted. A request its
    /// predecessor had taken and not answered is lost; the caller waiting for it gets this
    /// notice as its answer at once instead of waiting out its timeout.
    pub fn send_restart_notice(&self) -> Result<(), ControlError> {
        let reply = ConfigReply::Error {
            kind: ConfigErrorKind::NotReady,
            message: "the metadata service restarted while the request was in flight; it may or \
                      may not have been carried out"
                .into(),
        };
        self.inner
            .send_datagram(&reply.encode(RESTART_NOTICE_ID), &[])
    }

    /// Sends the reply to request `request_id`. Refuses (sending nothing) a reply out of bounds
    /// or larger than one datagram.
    pub fn send_reply(&self, request_id: u64, reply: &ConfigReply) -> Result<(), ControlError> {
        reply.validate()?;
        self.inner.send_datagram(&reply.encode(request_id), &[])
    }

    /// Sends raw bytes (tests of the receiver's validation).
    #[doc(hidden)]
    pub fn send_raw_for_tests(&self, bytes: &[u8]) -> Result<(), ControlError> {
        self.inner.send_datagram(bytes, &[])
    }

    fn recv_bytes(&self, flags: MsgFlags) -> Result<Vec<u8>, ControlError> {
        let (bytes, fds) = self.inner.recv_raw(flags)?;
        if !fds.is_empty() {
            // Dropping them closes them.
            return Err(ControlError::FdCountMismatch {
                received: fds.len(),
                named: 0,
            });
        }
        Ok(bytes)
    }

    fn recv_decoded<R>(
        &self,
        timeout: Duration,
        decode: fn(&[u8]) -> Result<R, ControlError>,
    ) -> Result<Option<R>, ControlError> {
        let got = self.inner.recv_timeout_with(timeout, |flags| {
            self.recv_bytes(flags).and_then(|b| decode(&b))
        });
        if let Err(e) = &got {
            if e.is_malformed() {
                self.inner.warn_malformed(e);
            }
        }
        got
    }

    /// Receives a request (metadata's end), waiting at most `timeout`. A malformed one is an
    /// error; the channel can be read again after it.
    pub fn recv_request(
        &self,
        timeout: Duration,
    ) -> Result<Option<(u64, ConfigRequest)>, ControlError> {
        self.recv_decoded(timeout, ConfigRequest::decode)
    }

    /// Receives a reply (mgmt's end), waiting at most `timeout`.
    pub fn recv_reply(
        &self,
        timeout: Duration,
    ) -> Result<Option<(u64, ConfigReply)>, ControlError> {
        self.recv_decoded(timeout, ConfigReply::decode)
    }

    /// Discards every datagram already queued for this end, well-formed or not; returns how
    /// many. mgmt calls it when it starts, for replies meant for its predecessor.
    pub fn discard_queued(&self) -> usize {
        let mut discarded = 0;
        loop {
            match self.inner.recv_raw(MsgFlags::MSG_DONTWAIT) {
                Ok(_) => discarded += 1,
                Err(ControlError::Io {
                    source: Errno::EAGAIN,
                    ..
                })
                | Err(ControlError::PeerClosed) => return discarded,
                // A malformed datagram was consumed too.
                Err(e) if e.is_malformed() => discarded += 1,
                Err(_) => return discarded,
            }
        }
    }

    /// Sends `request` and waits at most `timeout` for its reply (replies to other ids, left
    /// over from a request that timed out earlier, are skipped). `Ok(None)`: no reply in time.
    pub fn call(
        &self,
        request: &ConfigRequest,
        timeout: Duration,
    ) -> Result<Option<ConfigReply>, ControlError> {
        let id = self.send_request(request)?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_reply(left)? {
                Some((got, reply)) if got == id || got == RESTART_NOTICE_ID => {
                    return Ok(Some(reply))
                }
                Some((got, reply)) => {
                    tracing::debug!(
                        id = got,
                        waiting_for = id,
                        reply = reply.kind_name(),
                        "discarding a late config reply"
                    );
                }
                None => return Ok(None),
            }
        }
    }
}

impl AsFd for ConfigChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

/// Examples of every message, within bounds (tests, fuzz corpora).
#[doc(hidden)]
pub mod examples {
    use super::*;

    /// One request of every kind.
    pub fn requests() -> Vec<ConfigRequest> {
        let nqn = "nqn.2026-11.io.duplex:vol0".to_owned();
        let host =
            "nqn.2014-08.org.nvmexpress:uuid:5c1a3d6e-0000-4000-8000-000000000001".to_owned();
        vec![
            ConfigRequest::ListDrives,
            ConfigRequest::CreatePool {
                name: "tank".into(),
                raid: RaidLevel::Raid10,
                drives: vec!["d0".into(), "d1".into(), "d2".into(), "d3".into()],
                chunk_bytes: 128 * 1024,
            },
            ConfigRequest::ListPools,
            ConfigRequest::ShowPool("tank".into()),
            ConfigRequest::DestroyPool {
                name: "tank".into(),
                force: true,
            },
            ConfigRequest::CreateVolume {
                name: "vol0".into(),
                pool: "tank".into(),
                size_bytes: 10 << 30,
            },
            ConfigRequest::ListVolumes,
            ConfigRequest::ResizeVolume {
                name: "vol0".into(),
                size_bytes: 20 << 30,
            },
            ConfigRequest::DeleteVolume("vol0".into()),
            ConfigRequest::CreateSubsystem(nqn.clone()),
            ConfigRequest::ListSubsystems,
            ConfigRequest::DeleteSubsystem(nqn.clone()),
            ConfigRequest::AddNamespace {
                nqn: nqn.clone(),
                volume: "vol0".into(),
                nsid: 0,
            },
            ConfigRequest::RemoveNamespace {
                nqn: nqn.clone(),
                nsid: 1,
            },
            ConfigRequest::AllowHost {
                nqn: nqn.clone(),
                host_nqn: host.clone(),
                secrets: None,
            },
            ConfigRequest::AllowHost {
                nqn: nqn.clone(),
                host_nqn: host.clone(),
                secrets: Some(HostSecrets {
                    host: Some(
                        "DHHC-1:00:c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmX4Vuew:".into(),
                    ),
                    ctrl: Some(
                        "DHHC-1:01:b3RoZXJzZWNyZXRvdGhlcnNlY3JldG90aGVyc2VjcmV0b3RohMTIcg==:"
                            .into(),
                    ),
                    tls_psk: None,
                }),
            },
            ConfigRequest::AllowHost {
                nqn: nqn.clone(),
                host_nqn: host.clone(),
                secrets: Some(HostSecrets {
                    host: None,
                    ctrl: None,
                    tls_psk: Some(
                        "NVMeTLSkey-1:01:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:".into(),
                    ),
                }),
            },
            ConfigRequest::DenyHost {
                nqn: nqn.clone(),
                host_nqn: host,
            },
            ConfigRequest::AllowAnyHost { nqn, any: true },
            ConfigRequest::ImportPool {
                pool: "0f1e2d3c-4b5a-4968-8776-655443322110".into(),
                force: true,
            },
            ConfigRequest::ListVolumesAfter("vol7".into()),
            ConfigRequest::MovePool {
                name: "tank".into(),
                node: 2,
            },
        ]
    }

    /// A drive.
    pub fn drive(name: &str, pool: &str, slot: u32, state: DriveState) -> DriveInfo {
        DriveInfo {
            name: name.into(),
            address: format!("vfio-user:drives/{name}-a.sock"),
            capacity_bytes: 1 << 30,
            block_size: 4096,
            model: "duplex-drive-sim".into(),
            serial: format!("SIM-{name}"),
            pool: pool.into(),
            slot,
            state,
            integrity_errors: u64::from(slot) * 3,
        }
    }

    /// A pool with `members` members.
    pub fn pool(name: &str, members: u32) -> PoolInfo {
        PoolInfo {
            integrity: PoolIntegrity {
                recovered: 5,
                healed: 4,
                unrecoverable: 1,
            },
            name: name.into(),
            uuid: "0b1e5c7a-2f4d-4e8a-9c3b-5d6e7f809a1b".into(),
            raid: RaidLevel::Raid1,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            capacity_bytes: 1 << 30,
            free_bytes: 768 << 20,
            state: PoolState::Degraded,
            generation: 42,
            epoch: 3,
            owner_node: 0,
            members: (0..members)
                .map(|slot| PoolMember {
                    drive: format!("d{slot}"),
                    drive_uuid: format!("6f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e{slot:02x}"),
                    slot,
                    state: if slot == 1 {
                        DriveState::Failed
                    } else {
                        DriveState::Active
                    },
                })
                .collect(),
            member_bytes: 512 << 20,
            rebuild: (members > 2).then_some((2, 128 << 20)),
            scrub: (members > 2).then_some(PoolScrub {
                done_bytes: 256 << 20,
                mismatches: 1,
                repaired: 1,
                skipped: 0,
            }),
            spares: if members > 2 {
                vec!["d9".into()]
            } else {
                Vec::new()
            },
            jobs: if members > 2 {
                PoolJobs {
                    rate_limit: 0,
                    rebuild_rate: 64 << 20,
                    rebuild_eta_ms: 6_000,
                    rebuild_from: 0,
                    rebuild_checkpoint: 96 << 20,
                    scrub_rate: 0,
                    scrub_eta_ms: u64::MAX,
                }
            } else {
                PoolJobs::default()
            },
        }
    }

    /// A volume exported once.
    pub fn volume(name: &str) -> VolumeInfo {
        VolumeInfo {
            name: name.into(),
            uuid: "3d2c1b0a-9f8e-4d7c-a6b5-c4d3e2f1a0b9".into(),
            nguid: "00112233445566778899aabbccddeeff".into(),
            pool: "tank".into(),
            size_bytes: 256 << 20,
            block_size: 4096,
            exports: vec![Export {
                nqn: "nqn.2026-11.io.duplex:vol0".into(),
                nsid: 1,
            }],
        }
    }

    /// A subsystem with one host and one namespace.
    pub fn subsystem(nqn: &str) -> SubsystemInfo {
        SubsystemInfo {
            nqn: nqn.into(),
            allow_any_host: false,
            hosts: vec!["nqn.2014-08.org.nvmexpress:uuid:host-a".into()],
            hosts_authenticate: vec![true],
            namespaces: vec![NamespaceInfo {
                nsid: 1,
                volume: "vol0".into(),
                nguid: "00112233445566778899aabbccddeeff".into(),
                ana_group: 1,
            }],
        }
    }

    /// One reply of every kind.
    pub fn replies() -> Vec<ConfigReply> {
        vec![
            ConfigReply::Done(Done {
                message: "created volume vol0 in pool tank (10 GiB)".into(),
                nsid: 0,
                uuid: "3d2c1b0a-9f8e-4d7c-a6b5-c4d3e2f1a0b9".into(),
            }),
            ConfigReply::Done(Done {
                message: "added namespace 3".into(),
                nsid: 3,
                uuid: String::new(),
            }),
            ConfigReply::Drives(vec![
                drive("d0", "tank", 0, DriveState::Active),
                drive("d1", "", 0, DriveState::Free),
            ]),
            ConfigReply::Pools(vec![pool("tank", 2), pool("scratch", 1)]),
            ConfigReply::Volumes(vec![volume("vol0"), volume("vol1")]),
            ConfigReply::Subsystems(vec![subsystem("nqn.2026-11.io.duplex:vol0")]),
            ConfigReply::Error {
                kind: ConfigErrorKind::InUse,
                message: "drive d3 belongs to pool tank".into(),
            },
        ]
    }

    /// The largest reply of each list kind the bounds allow: every list and text at its bound.
    pub fn largest_replies() -> Vec<ConfigReply> {
        let name = |c: char| c.to_string().repeat(MAX_NAME_BYTES);
        let nqn =
            |i: usize| format!("nqn.{i:04}-").repeat(MAX_NQN_BYTES)[..MAX_NQN_BYTES].to_owned();
        let uuid = "u".repeat(UUID_TEXT_BYTES);
        let nguid = "f".repeat(NGUID_TEXT_BYTES);
        let drives = (0..MAX_DRIVES)
            .map(|_| DriveInfo {
                name: name('d'),
                address: "a".repeat(MAX_ADDRESS_BYTES),
                capacity_bytes: u64::MAX,
                block_size: u32::MAX,
                model: "m".repeat(MAX_MODEL_BYTES),
                serial: "s".repeat(MAX_SERIAL_BYTES),
                pool: name('p'),
                slot: u32::MAX,
                state: DriveState::Rebuilding,
                integrity_errors: u64::MAX,
            })
            .collect();
        let members_each = MAX_MEMBERS_PER_REPLY.div_ceil(MAX_POOLS);
        let mut members_left = MAX_MEMBERS_PER_REPLY;
        let pools = (0..MAX_POOLS)
            .map(|_| {
                let n = members_each.min(members_left);
                members_left -= n;
                PoolInfo {
                    integrity: PoolIntegrity {
                        recovered: u64::MAX,
                        healed: u64::MAX,
                        unrecoverable: u64::MAX,
                    },
                    name: name('p'),
                    uuid: uuid.clone(),
                    raid: RaidLevel::Raid10,
                    chunk_bytes: u32::MAX,
                    capacity_bytes: u64::MAX,
                    free_bytes: u64::MAX,
                    state: PoolState::Offline,
                    generation: u64::MAX,
                    epoch: u64::MAX,
                    owner_node: u32::MAX,
                    members: (0..n)
                        .map(|_| PoolMember {
                            drive: name('d'),
                            drive_uuid: uuid.clone(),
                            slot: u32::MAX,
                            state: DriveState::Missing,
                        })
                        .collect(),
                    member_bytes: u64::MAX,
                    rebuild: Some((u32::MAX - 1, u64::MAX)),
                    scrub: Some(PoolScrub {
                        done_bytes: u64::MAX,
                        mismatches: u64::MAX,
                        repaired: u64::MAX,
                        skipped: u64::MAX,
                    }),
                    spares: (0..MAX_SPARES)
                        .map(|_| "d".repeat(MAX_NAME_BYTES))
                        .collect(),
                    jobs: PoolJobs {
                        rate_limit: u64::MAX,
                        rebuild_rate: u64::MAX,
                        rebuild_eta_ms: u64::MAX,
                        rebuild_from: u64::MAX,
                        rebuild_checkpoint: u64::MAX,
                        scrub_rate: u64::MAX,
                        scrub_eta_ms: u64::MAX,
                    },
                }
            })
            .collect();
        let mut exports_left = MAX_NAMESPACES;
        let volumes = (0..MAX_VOLUMES)
            .map(|i| {
                let n = usize::from(exports_left > 0);
                exports_left -= n;
                VolumeInfo {
                    name: name('v'),
                    uuid: uuid.clone(),
                    nguid: nguid.clone(),
                    pool: name('p'),
                    size_bytes: u64::MAX,
                    block_size: u32::MAX,
                    exports: (0..n)
                        .map(|_| Export {
                            nqn: nqn(i),
                            nsid: u32::MAX,
                        })
                        .collect(),
                }
            })
            .collect();
        let hosts_each = MAX_HOSTS.div_ceil(MAX_SUBSYSTEMS);
        let namespaces_each = MAX_NAMESPACES.div_ceil(MAX_SUBSYSTEMS);
        let subsystems = (0..MAX_SUBSYSTEMS)
            .map(|i| SubsystemInfo {
                nqn: nqn(i),
                allow_any_host: true,
                hosts: (0..hosts_each).map(nqn).collect(),
                // The largest reply: every host's flag too.
                hosts_authenticate: vec![true; hosts_each],
                namespaces: (0..namespaces_each)
                    .map(|_| NamespaceInfo {
                        nsid: u32::MAX,
                        volume: name('v'),
                        nguid: nguid.clone(),
                        ana_group: u32::MAX,
                    })
                    .collect(),
            })
            .collect();
        vec![
            ConfigReply::Drives(drives),
            ConfigReply::Pools(pools),
            ConfigReply::Volumes(volumes),
            ConfigReply::Subsystems(subsystems),
            ConfigReply::Error {
                kind: ConfigErrorKind::Refused,
                message: "e".repeat(MAX_MESSAGE_BYTES),
            },
            ConfigReply::Done(Done {
                message: "e".repeat(MAX_MESSAGE_BYTES),
                nsid: u32::MAX,
                uuid,
            }),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::examples::*;
    use super::*;
    use crate::control::MAX_MESSAGE_BYTES as MAX_DATAGRAM_BYTES;

    #[test]
    fn every_request_round_trips() {
        let requests = requests();
        assert_eq!(
            requests.len(),
            22,
            "one of every schema member (allowHost with DH-HMAC-CHAP secrets, a TLS PSK, none)"
        );
        for (i, r) in requests.into_iter().enumerate() {
            let id = u64::try_from(i).unwrap_or(0) + (7 << 32);
            let bytes = r.encode(id);
            assert_eq!(ConfigRequest::decode(&bytes).ok(), Some((id, r)));
        }
    }

    #[test]
    fn every_reply_round_trips() {
        for r in replies().into_iter().chain(largest_replies()) {
            let bytes = r.encode(9);
            assert_eq!(
                ConfigReply::decode(&bytes).ok(),
                Some((9, r.clone())),
                "{}",
                r.kind_name()
            );
        }
    }

    #[test]
    fn the_largest_replies_fit_one_datagram() {
        for r in largest_replies() {
            assert!(r.validate().is_ok(), "{}", r.kind_name());
            let len = r.encode(u64::MAX).len();
            assert!(
                len <= MAX_DATAGRAM_BYTES,
                "{}: {len} bytes, more than one datagram",
                r.kind_name()
            );
        }
    }

    #[test]
    fn garbage_is_rejected() {
        for bytes in [&b"not capnp at all"[..], &[], &[0; 8], &[0xff; 64]] {
            assert!(ConfigRequest::decode(bytes).is_err());
            assert!(ConfigReply::decode(bytes).is_err());
        }
        // A truncated datagram is an error, not a shorter message.
        let bytes = ConfigReply::Pools(vec![pool("tank", 2)]).encode(1);
        for cut in [8, 16, bytes.len() / 2, bytes.len() - 8] {
            assert!(ConfigReply::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // Trailing bytes too.
        let mut long = ConfigRequest::ListPools.encode(1);
        long.extend_from_slice(&[0; 8]);
        assert!(matches!(
            ConfigRequest::decode(&long),
            Err(ControlError::TrailingBytes(8))
        ));
    }

    /// Byte offset of word `word` of a one-segment message (after its 8-byte segment table).
    fn word(word: usize) -> usize {
        8 + 8 * word
    }

    /// `encoded` with the u16 at `at` changed from `find` to `set`.
    fn patched(mut bytes: Vec<u8>, at: usize, find: u16, set: u16) -> Vec<u8> {
        assert_eq!(
            u16::from_le_bytes([bytes[at], bytes[at + 1]]),
            find,
            "layout assumption"
        );
        bytes[at..at + 2].copy_from_slice(&set.to_le_bytes());
        bytes
    }

    #[test]
    fn unknown_union_members_and_enumerants_are_rejected() {
        // Layout: root pointer (word 0), root data (1: requestId), root's body pointer (2), the
        // body's data (3: its union discriminant) and pointer (4).
        let bytes = patched(ConfigRequest::ListSubsystems.encode(1), word(3), 10, 99);
        assert!(matches!(
            ConfigRequest::decode(&bytes),
            Err(ControlError::UnknownVariant {
                what: "ConfigRequestBody",
                value: 99
            })
        ));
        let bytes = patched(ConfigReply::Volumes(Vec::new()).encode(1), word(3), 3, 6);
        assert!(matches!(
            ConfigReply::decode(&bytes),
            Err(ControlError::UnknownVariant {
                what: "ConfigReplyBody",
                value: 6
            })
        ));
        // An enumerant beyond the schema's: the error struct (word 5) holds only the kind.
        let error = ConfigReply::Error {
            kind: ConfigErrorKind::Refused,
            message: "x".into(),
        };
        let bytes = patched(error.encode(1), word(5), 7, 8);
        assert!(matches!(
            ConfigReply::decode(&bytes),
            Err(ControlError::UnknownVariant {
                what: "ConfigErrorKind",
                value: 8
            })
        ));
    }

    #[test]
    fn bounds_and_required_fields_are_enforced() {
        let long = ConfigRequest::ShowPool("x".repeat(MAX_NAME_BYTES + 1)).encode(1);
        assert!(matches!(
            ConfigRequest::decode(&long),
            Err(ControlError::TextTooLong {
                field: "config.showPool",
                ..
            })
        ));
        let empty = ConfigRequest::DeleteVolume(String::new()).encode(1);
        assert!(matches!(
            ConfigRequest::decode(&empty),
            Err(ControlError::MissingField("config.deleteVolume"))
        ));
        let no_drives = ConfigRequest::CreatePool {
            name: "tank".into(),
            raid: RaidLevel::Raid0,
            drives: Vec::new(),
            chunk_bytes: 0,
        };
        assert!(ConfigRequest::decode(&no_drives.encode(1)).is_err());
        let too_many = ConfigRequest::CreatePool {
            name: "tank".into(),
            raid: RaidLevel::Raid0,
            drives: (0..=MAX_POOL_MEMBERS).map(|i| format!("d{i}")).collect(),
            chunk_bytes: 0,
        };
        assert!(matches!(
            ConfigRequest::decode(&too_many.encode(1)),
            Err(ControlError::TooManyEntries { .. })
        ));
        // Totals across a reply.
        let pools = ConfigReply::Pools((0..3).map(|i| pool(&format!("p{i}"), 60)).collect());
        assert!(matches!(
            ConfigReply::decode(&pools.encode(1)),
            Err(ControlError::TooManyEntries {
                field: "config.pools.members (all)",
                ..
            })
        ));
        let drives = ConfigReply::Drives(
            (0..=MAX_DRIVES)
                .map(|i| drive(&format!("d{i}"), "", 0, DriveState::Free))
                .collect(),
        );
        assert!(matches!(
            ConfigReply::decode(&drives.encode(1)),
            Err(ControlError::TooManyEntries {
                field: "config.drives",
                ..
            })
        ));
        // Invalid UTF-8 in a name.
        let mut bytes = ConfigRequest::ShowPool("tank".into()).encode(1);
        let at = bytes
            .windows(4)
            .position(|w| w == b"tank")
            .unwrap_or_default();
        bytes[at] = 0xff;
        assert!(matches!(
            ConfigRequest::decode(&bytes),
            Err(ControlError::InvalidUtf8("config.showPool"))
        ));
        // A root without a body is not a listDrives.
        let mut message = capnp::message::Builder::new_default();
        message
            .init_root::<wire::config_request::Builder<'_>>()
            .set_request_id(1);
        let bytes = capnp::serialize::write_message_to_words(&message);
        assert!(matches!(
            ConfigRequest::decode(&bytes),
            Err(ControlError::MissingField("ConfigRequest.body"))
        ));
        // Nothing out of bounds is sent.
        let (mgmt, _metadata) = ConfigChannel::pair().expect("pair");
        assert!(mgmt
            .send_request(&ConfigRequest::DeleteVolume(String::new()))
            .is_err());
    }

    #[test]
    fn replies_fit_their_requests() {
        let one = ConfigReply::Pools(vec![pool("tank", 1)]);
        let two = ConfigReply::Pools(vec![pool("tank", 1), pool("b", 1)]);
        assert!(one.answers(&ConfigRequest::ShowPool("tank".into())));
        assert!(!two.answers(&ConfigRequest::ShowPool("tank".into())));
        assert!(two.answers(&ConfigRequest::ListPools));
        assert!(!two.answers(&ConfigRequest::ListVolumes));
        let done = ConfigReply::Done(Done::default());
        assert!(done.answers(&ConfigRequest::DeleteVolume("v".into())));
        assert!(!done.answers(&ConfigRequest::ListDrives));
        let error = ConfigReply::Error {
            kind: ConfigErrorKind::NotFound,
            message: "no".into(),
        };
        assert!(requests().iter().all(|r| error.answers(r)));
        assert_eq!(
            requests().iter().filter(|r| r.is_read_only()).count(),
            6,
            "list drives, pools, volumes (and a page of them), subsystems; show pool"
        );
    }

    #[test]
    fn names_and_nqns_follow_the_obvious_rules() {
        assert!(check_name("tank").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
        assert!(check_name("a\nb").is_err());
        assert!(check_nqn("nqn.2026-11.io.duplex:vol0").is_ok());
        assert_eq!(check_nqn("iqn.x"), Err(RuleError::NqnPrefix));
        assert_eq!(check_nqn("nqn."), Err(RuleError::NqnPrefix));
        assert_eq!(check_nqn("nqn.a b"), Err(RuleError::NqnSpace));
        assert!(check_nqn(&format!("nqn.{}", "x".repeat(219))).is_ok());
        assert!(matches!(
            check_nqn(&format!("nqn.{}", "x".repeat(220))),
            Err(RuleError::Length { max: 223, .. })
        ));
    }

    #[test]
    fn call_over_a_pair_skips_late_replies() {
        let (mgmt, metadata) = ConfigChannel::pair().expect("pair");
        let mgmt = mgmt.with_first_request_id(2 << 32);
        // A reply to a request of an earlier mgmt generation, still queued.
        metadata
            .send_reply(1 << 32, &ConfigReply::Done(Done::default()))
            .expect("late reply");
        let server = std::thread::spawn(move || {
            let (id, req) = metadata
                .recv_request(Duration::from_secs(5))
                .expect("recv")
                .expect("a request");
            assert_eq!(id, 2 << 32);
            assert_eq!(req, ConfigRequest::ListPools);
            metadata
                .send_reply(id, &ConfigReply::Pools(vec![pool("tank", 2)]))
                .expect("reply");
            metadata
        });
        let reply = mgmt
            .call(&ConfigRequest::ListPools, Duration::from_secs(5))
            .expect("call");
        assert_eq!(reply, Some(ConfigReply::Pools(vec![pool("tank", 2)])));
        let metadata = server.join().expect("server");
        // Nobody answers: None, not a hang.
        assert_eq!(
            mgmt.call(&ConfigRequest::ListDrives, Duration::from_millis(10))
                .expect("call"),
            None
        );
        // Queued leftovers (one good, one garbage) are discarded.
        metadata
            .send_reply(5, &ConfigReply::Done(Done::default()))
            .expect("reply");
        metadata.send_raw_for_tests(b"garbage!").expect("raw");
        assert_eq!(mgmt.discard_queued(), 2);
        assert_eq!(mgmt.discard_queued(), 0);
    }
}
