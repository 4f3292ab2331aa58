//! The maps channel: the metadata service tells the datapath what to serve (RAID pools over raw
//! drives, volume maps over the pools, recorded member failures), and the datapath tells it when
//! a pool member fails.
//!
//! Mirrors `schemas/maps.capnp` (see there for who holds which end, the conversation, epochs and
//! restarts). One `SOCK_SEQPACKET` socket pair, created by the supervisor, which keeps both ends
//! across restarts: the datapath gets one as resource [`MAPS_RESOURCE`], the metadata service
//! the other, so holding the metadata end *is* the privilege to change what the datapath
//! serves; no other message travels on it, and no file descriptors do. The transport (datagram
//! limit, `MSG_TRUNC`/`MSG_CTRUNC` checks, rate-limited warnings) and the decoding limits
//! (traversal, nesting) are [`ControlChannel`]'s; the messages are their own types.
//!
//! Decoding is validated ([`MapsRequest::decode`], [`MapsMessage::decode`]): unknown union
//! members and enumerants are errors, every text is bounded and UTF-8, every list is bounded
//! before it is read. These are the wire rules only; whether a geometry or a map makes sense is
//! the datapath engine's to decide (it refuses, with a reason, what it cannot serve).
//!
//! [`MapsChannel`] has both ends' methods: the metadata end [`MapsChannel::call`]s (and uses the
//! typed helpers built on it), keeping the `memberFailed` events that arrive meanwhile for
//! [`MapsChannel::recv_event`]; the datapath end receives requests
//! ([`MapsChannel::recv_request`], which can block in `recvmsg` alone, as the datapath's sandbox
//! allows no `poll`) and sends replies and events from any thread.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use duplex_schemas::maps_capnp as wire;
use nix::sys::socket::MsgFlags;

use crate::control::{
    check_text, read_text as text, reader_options, unknown, ControlChannel, ControlError,
    MAX_MESSAGE_BYTES, MAX_TEXT_BYTES,
};

/// Name of the datapath's resource carrying its end of the channel.
pub const MAPS_RESOURCE: &str = "maps";
/// Longest device, pool, volume or member name, in bytes (docs/ONDISK.md).
pub const MAX_NAME_BYTES: usize = 64;
/// Longest error text, in bytes.
pub const MAX_ERROR_BYTES: usize = MAX_TEXT_BYTES;
/// In [`PoolSpec::drives`]: a member that is not there (missing, or stale and kept out); its
/// state must be [`MemberState::Failed`].
pub const MISSING_DRIVE: u32 = u32::MAX;
/// Most members of a pool (the RAID layer tracks members in a 64-bit mask).
pub const MAX_MEMBERS: usize = 64;
/// Most extents of one volume.
pub const MAX_EXTENTS: usize = 256;
/// Most volumes in a volume table (over all its parts).
pub const MAX_VOLUMES: usize = 4096;
/// Most devices in a `listDevices` answer: the largest answer within the bounds fits one
/// datagram (checked by a test).
pub const MAX_DEVICES: usize = 184;

/// RAID levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RaidLevel {
    /// Striping.
    Raid0,
    /// Mirroring over every member.
    Raid1,
    /// Striping over mirrored pairs.
    Raid10,
    /// Rotating single parity.
    Raid5,
    /// Rotating double parity.
    Raid6,
}

/// A pool member's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// Takes I/O.
    Active,
    /// Failed: takes no I/O.
    Failed,
    /// Being rebuilt: takes writes, read only where rebuilt.
    Rebuilding,
}

/// A RAID pool to build over raw drives (`PoolSpec` of the schema).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// Epoch of the map this pool belongs to.
    pub epoch: u64,
    /// Name, 1..=[`MAX_NAME_BYTES`] bytes.
    pub name: String,
    /// Level.
    pub level: RaidLevel,
    /// Stripe chunk in bytes.
    pub chunk: u64,
    /// Where the data area starts on each member, in bytes.
    pub data_offset: u64,
    /// Bytes of each member's data area.
    pub data_len: u64,
    /// The members in slot order, as raw drive ids ([`MISSING_DRIVE`] for one that is not
    /// there); 1..=[`MAX_MEMBERS`].
    pub drives: Vec<u32>,
    /// Each member's recorded state: empty (all active) or one per drive.
    pub states: Vec<MemberState>,
    /// Hold write and flush completions after a member fails until the failure is recorded.
    pub hold_until_recorded: bool,
    /// Parity levels: `(offset, length, tag)` of the stripe journal ring on every member.
    pub journal: Option<(u64, u64, u64)>,
    /// Where each rebuilding member resumes (member bytes): empty (from 0) or one per drive.
    pub rebuild_from: Vec<u64>,
    /// Mirror levels: the first write sequence number (0: from 1).
    pub seq_base: u64,
    /// Mirror levels: resync before serving (an import after a crash).
    pub resync: bool,
    /// Mirror levels: the committed write sequence mark, which no write is numbered at or
    /// past (0: no limit).
    pub seq_limit: u64,
    /// Mirror levels: `(offset, length, tag)` of the write-intent bitmap area on every member.
    pub bitmap: Option<(u64, u64, u64)>,
    /// Mirror levels with a bitmap: rebuilding members (bit = slot) that came back stale;
    /// only the regions the bitmap marks are copied to them.
    pub resync_members: u64,
    /// `(offset, length)` of the pool's checksum area on every member (bytes from the
    /// drive's start): members without integrity records in their LBA format's metadata keep
    /// them there. `None`: no area (a length of 0 on the wire).
    pub checksum: Option<(u64, u64)>,
}

/// `blocks` blocks of a volume from volume block `start` live on device `device` from byte
/// `device_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First volume block.
    pub start: u64,
    /// Blocks.
    pub blocks: u64,
    /// Datapath device index.
    pub device: u32,
    /// Byte offset on the device.
    pub device_offset: u64,
}

/// A volume as an extent map over the datapath's devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMap {
    /// Volume id used in the fabric's descriptors.
    pub id: u32,
    /// Name, 1..=[`MAX_NAME_BYTES`] bytes.
    pub name: String,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in blocks.
    pub blocks: u64,
    /// Extents in volume order, 1..=[`MAX_EXTENTS`].
    pub extents: Vec<Extent>,
}

/// One part of a volume table (`PublishVolumes` of the schema).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishVolumes {
    /// Epoch of the table.
    pub epoch: u64,
    /// This part's volumes (at most [`MAX_VOLUMES`] over all parts).
    pub volumes: Vec<VolumeMap>,
    /// Which part: 0 starts a new table.
    pub part: u32,
    /// More parts follow.
    pub more: bool,
}

/// A request from the metadata service.
// A pool's spec is the large variant: requests are built and sent one at a time (never stored
// in numbers), so boxing it would only cost an allocation and every caller's match.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapsRequest {
    /// Every device of the datapath.
    ListDevices,
    /// Build a RAID device over free raw drives (the same pool again: the same device).
    PublishPool(PoolSpec),
    /// Replace the volume table (or stage one part of it).
    PublishVolumes(PublishVolumes),
    /// These members' failure is recorded on disk.
    FailuresRecorded {
        /// The pool's device index.
        device: u32,
        /// Member slots, 1..=[`MAX_MEMBERS`].
        members: Vec<u32>,
    },
    /// Start scrubbing the parity pool at this device index.
    StartScrub(u32),
    /// Take the pool device at this index apart: its jobs stop, their I/O ends, its members
    /// become free raw drives again (the pool moved to the peer).
    RetirePool(u32),
    /// Put free raw drive `drive` in failed member slot `slot` of pool device `device`, to be
    /// rebuilt from byte `done` of its data area on.
    ReplaceMember {
        /// The pool's device index.
        device: u32,
        /// The member slot.
        slot: u32,
        /// The raw drive id.
        drive: u32,
        /// Bytes already rebuilt.
        done: u64,
    },
}

/// Which pool slot a raw drive fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolSlot {
    /// The pool's device index.
    pub device: u32,
    /// The member slot.
    pub slot: u32,
}

/// One device of the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device index (for a drive: its raw drive id).
    pub index: u32,
    /// Name, 1..=[`MAX_NAME_BYTES`] bytes.
    pub name: String,
    /// Usable size in bytes.
    pub size_bytes: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// A pool's members' states, in slot order (at most [`MAX_MEMBERS`]); empty otherwise.
    pub members: Vec<MemberState>,
    /// I/Os in flight.
    pub inflight: u32,
    /// Completions held until a member failure is recorded.
    pub held: u32,
    /// For a drive taken into a pool: where.
    pub member_of: Option<PoolSlot>,
    /// A parity pool rebuilding a member: `(slot, bytes of its data area rebuilt)`.
    pub rebuild: Option<(u32, u64)>,
    /// A parity pool's scrub, now or last.
    pub scrub: Option<ScrubInfo>,
    /// Integrity findings (see [`IntegrityInfo`]).
    pub integrity: IntegrityInfo,
    /// A mirror pool: write sequence numbers left below its committed mark (writes wait at
    /// 0); saturating, `u32::MAX` for a device without a mark.
    pub seq_headroom: u32,
    /// A drive: it keeps integrity records in its LBA format's metadata.
    pub records: bool,
}

/// What integrity checking found on a device since the datapath started (counts above 2^32 - 1
/// travel as 2^32 - 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntegrityInfo {
    /// A drive: blocks it returned that failed their integrity check.
    pub errors: u64,
    /// A pool: reads served from a good copy after a bad one.
    pub recovered: u64,
    /// A pool: bad copies rewritten.
    pub healed: u64,
    /// A pool: reads with no good copy.
    pub unrecoverable: u64,
}

/// A parity pool's scrub as the datapath reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubInfo {
    /// Bytes of each member's data area checked.
    pub done: u64,
    /// Of so many.
    pub total: u64,
    /// Windows whose parity disagreed with the data.
    pub mismatches: u64,
    /// Of those, rewritten from the data.
    pub repaired: u64,
    /// Windows that could not be checked.
    pub skipped: u64,
}

/// A reply from the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapsReply {
    /// Applied.
    Done,
    /// The new pool's device index.
    Device(u32),
    /// Every device (at most [`MAX_DEVICES`]).
    Devices(Vec<DeviceInfo>),
    /// Refused or failed; nothing changed. At most [`MAX_ERROR_BYTES`] bytes.
    Error(String),
}

/// A pool member failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberFailed {
    /// The pool's device index.
    pub device: u32,
    /// The member's slot.
    pub member: u32,
    /// The member device's name, 1..=[`MAX_NAME_BYTES`] bytes.
    pub name: String,
    /// NVMe status of the I/O that failed.
    pub status: u16,
}

/// A message from the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapsMessage {
    /// The answer to request `request_id`.
    Reply {
        /// The request answered.
        request_id: u64,
        /// The answer.
        reply: MapsReply,
    },
    /// A member failed.
    MemberFailed(MemberFailed),
}

/// Errors of the maps channel beyond the transport's.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// The channel failed, or a message was malformed (see [`ControlError::is_malformed`]).
    #[error(transparent)]
    Channel(#[from] ControlError),
    /// Peer: request `request_id` could not be decoded (answer it with an error).
    #[error("Maps request {request_id} is malformed")]
    Malformed {
        /// The request's id.
        request_id: u64,
        /// What is wrong.
        #[source]
        source: ControlError,
    },
    /// No reply in time.
    #[error("No reply to maps request {request_id} within {timeout:?}")]
    Timeout {
        /// The request.
        request_id: u64,
        /// How long the caller waited.
        timeout: Duration,
    },
    /// The datapath refused the request.
    #[error("Datapath refused {request}: {reason}")]
    Refused {
        /// The request's schema name.
        request: &'static str,
        /// The datapath's reason.
        reason: String,
    },
    /// The datapath answered with a reply of the wrong kind.
    #[error("Datapath answered {request} with {reply}")]
    UnexpectedReply {
        /// The request's schema name.
        request: &'static str,
        /// The reply's kind.
        reply: &'static str,
    },
    /// A volume table that cannot be sent (a single volume too large for one datagram).
    #[error("Volume table cannot be sent: {0}")]
    Unsendable(String),
}

impl MapsError {
    /// Whether the peer sent something malformed (the channel can be read again).
    pub fn is_malformed(&self) -> bool {
        match self {
            Self::Channel(e) => e.is_malformed(),
            Self::Malformed { .. } => true,
            Self::Timeout { .. }
            | Self::Refused { .. }
            | Self::UnexpectedReply { .. }
            | Self::Unsendable(_) => false,
        }
    }
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
enum_map!(MemberState, wire::MemberState, Active, Failed, Rebuilding);

fn name(t: &str, field: &'static str) -> Result<(), ControlError> {
    check_text(t, field, MAX_NAME_BYTES, true)
}

fn bounded(len: usize, field: &'static str, min: usize, max: usize) -> Result<(), ControlError> {
    if len > max {
        return Err(ControlError::TooManyEntries { field, len, max });
    }
    if len < min {
        return Err(ControlError::MissingField(field));
    }
    Ok(())
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn list_len(len: u32) -> usize {
    usize::try_from(len).unwrap_or(usize::MAX)
}

fn read(
    bytes: &[u8],
) -> Result<capnp::message::Reader<capnp::serialize::OwnedSegments>, ControlError> {
    let mut rest = bytes;
    let message = capnp::serialize::read_message(&mut rest, reader_options())
        .map_err(ControlError::Decode)?;
    if !rest.is_empty() {
        return Err(ControlError::TrailingBytes(rest.len()));
    }
    Ok(message)
}

impl PoolSpec {
    fn validate(&self) -> Result<(), ControlError> {
        name(&self.name, "maps.publishPool.name")?;
        bounded(self.drives.len(), "maps.publishPool.drives", 1, MAX_MEMBERS)?;
        bounded(self.states.len(), "maps.publishPool.states", 0, MAX_MEMBERS)?;
        // Empty (all active) or one state per drive.
        if self.states.len() > self.drives.len() {
            return Err(ControlError::TooManyEntries {
                field: "maps.publishPool.states",
                len: self.states.len(),
                max: self.drives.len(),
            });
        }
        if !self.states.is_empty() && self.states.len() < self.drives.len() {
            return Err(ControlError::MissingField("maps.publishPool.states"));
        }
        if !self.rebuild_from.is_empty() && self.rebuild_from.len() != self.drives.len() {
            return Err(ControlError::TooManyEntries {
                field: "maps.publishPool.rebuildFrom",
                len: self.rebuild_from.len(),
                max: self.drives.len(),
            });
        }
        Ok(())
    }
}

impl VolumeMap {
    fn validate(&self) -> Result<(), ControlError> {
        name(&self.name, "maps.publishVolumes.name")?;
        bounded(
            self.extents.len(),
            "maps.publishVolumes.extents",
            1,
            MAX_EXTENTS,
        )
    }

    /// An upper bound of the bytes this volume takes in an encoded message.
    fn encoded_bound(&self) -> usize {
        // The struct (2 data words, 2 pointers), its name (NUL-terminated, padded to words),
        // its extents (a tag word, 4 words each), and a word of slack for a far pointer.
        8 * (4 + (self.name.len() + 8) / 8 + 1 + 4 * self.extents.len() + 2)
    }
}

impl MapsRequest {
    /// The schema's name of the request, for logs and errors.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::ListDevices => "listDevices",
            Self::PublishPool(_) => "publishPool",
            Self::PublishVolumes(_) => "publishVolumes",
            Self::FailuresRecorded { .. } => "failuresRecorded",
            Self::ReplaceMember { .. } => "replaceMember",
            Self::StartScrub(_) => "startScrub",
            Self::RetirePool(_) => "retirePool",
        }
    }

    /// Checks the bounds of the schema.
    pub fn validate(&self) -> Result<(), ControlError> {
        match self {
            Self::ListDevices => Ok(()),
            Self::PublishPool(spec) => spec.validate(),
            Self::PublishVolumes(p) => {
                bounded(
                    p.volumes.len(),
                    "maps.publishVolumes.volumes",
                    0,
                    MAX_VOLUMES,
                )?;
                if p.part as usize >= MAX_VOLUMES {
                    return Err(ControlError::TooManyEntries {
                        field: "maps.publishVolumes.part",
                        len: p.part as usize,
                        max: MAX_VOLUMES - 1,
                    });
                }
                p.volumes.iter().try_for_each(VolumeMap::validate)
            }
            Self::FailuresRecorded { members, .. } => bounded(
                members.len(),
                "maps.failuresRecorded.members",
                1,
                MAX_MEMBERS,
            ),
            Self::StartScrub(_) | Self::RetirePool(_) => Ok(()),
            Self::ReplaceMember { slot, .. } => {
                if *slot as usize >= MAX_MEMBERS {
                    return Err(ControlError::TooManyEntries {
                        field: "maps.replaceMember.slot",
                        len: *slot as usize,
                        max: MAX_MEMBERS - 1,
                    });
                }
                Ok(())
            }
        }
    }

    /// Encodes with `request_id` (bounds are not checked: see [`MapsRequest::validate`]).
    pub fn encode(&self, request_id: u64) -> Vec<u8> {
        let mut message = capnp::message::Builder::new_default();
        let mut root = message.init_root::<wire::maps_request::Builder<'_>>();
        root.set_request_id(request_id);
        let mut body = root.init_body();
        match self {
            Self::ListDevices => body.set_list_devices(()),
            Self::PublishPool(s) => {
                let mut p = body.init_publish_pool();
                p.set_epoch(s.epoch);
                p.set_name(s.name.as_str());
                p.set_level(s.level.into());
                p.set_chunk(s.chunk);
                p.set_data_offset(s.data_offset);
                p.set_data_len(s.data_len);
                p.set_hold_until_recorded(s.hold_until_recorded);
                if let Some((offset, len, tag)) = s.journal {
                    p.set_journal_offset(offset);
                    p.set_journal_len(len);
                    p.set_journal_tag(tag);
                }
                if let Some((offset, len, tag)) = s.bitmap {
                    p.set_bitmap_offset(offset);
                    p.set_bitmap_len(len);
                    p.set_bitmap_tag(tag);
                }
                if let Some((offset, len)) = s.checksum {
                    p.set_checksum_offset(offset);
                    p.set_checksum_len(len);
                }
                let len = len_u32(s.drives.len());
                let mut drives = p.reborrow().init_drives(len);
                for (i, &d) in (0..len).zip(&s.drives) {
                    drives.set(i, d);
                }
                let len = len_u32(s.states.len());
                let mut states = p.reborrow().init_states(len);
                for (i, &m) in (0..len).zip(&s.states) {
                    states.set(i, m.into());
                }
                p.set_seq_base(s.seq_base);
                p.set_resync(s.resync);
                p.set_seq_limit(s.seq_limit);
                p.set_resync_members(s.resync_members);
                let len = len_u32(s.rebuild_from.len());
                let mut from = p.init_rebuild_from(len);
                for (i, &at) in (0..len).zip(&s.rebuild_from) {
                    from.set(i, at);
                }
            }
            Self::PublishVolumes(v) => {
                let mut p = body.init_publish_volumes();
                p.set_epoch(v.epoch);
                p.set_part(v.part);
                p.set_more(v.more);
                let len = len_u32(v.volumes.len());
                let mut list = p.init_volumes(len);
                for (i, vol) in (0..len).zip(&v.volumes) {
                    write_volume(list.reborrow().get(i), vol);
                }
            }
            Self::FailuresRecorded { device, members } => {
                let mut f = body.init_failures_recorded();
                f.set_device(*device);
                let len = len_u32(members.len());
                let mut list = f.init_members(len);
                for (i, &m) in (0..len).zip(members) {
                    list.set(i, m);
                }
            }
            Self::StartScrub(device) => body.set_start_scrub(*device),
            Self::RetirePool(device) => body.set_retire_pool(*device),
            Self::ReplaceMember {
                device,
                slot,
                drive,
                done,
            } => {
                let mut r = body.init_replace_member();
                r.set_device(*device);
                r.set_slot(*slot);
                r.set_drive(*drive);
                r.set_done(*done);
            }
        }
        capnp::serialize::write_message_to_words(&message)
    }

    /// Decodes and validates (a request id of 0 is refused too); never panics.
    pub fn decode(bytes: &[u8]) -> Result<(u64, Self), ControlError> {
        use wire::maps_request::body::Which;
        let message = read(bytes)?;
        let root: wire::maps_request::Reader<'_> =
            message.get_root().map_err(ControlError::Decode)?;
        let request = match root
            .get_body()
            .which()
            .map_err(unknown("MapsRequest.body"))?
        {
            Which::ListDevices(()) => Self::ListDevices,
            Which::PublishPool(p) => {
                Self::PublishPool(read_pool(p.map_err(ControlError::Decode)?)?)
            }
            Which::PublishVolumes(p) => {
                let p = p.map_err(ControlError::Decode)?;
                let list = p.get_volumes().map_err(ControlError::Decode)?;
                bounded(
                    list_len(list.len()),
                    "maps.publishVolumes.volumes",
                    0,
                    MAX_VOLUMES,
                )?;
                let mut volumes = Vec::with_capacity(list_len(list.len()));
                for v in list.iter() {
                    volumes.push(read_volume(v)?);
                }
                Self::PublishVolumes(PublishVolumes {
                    epoch: p.get_epoch(),
                    volumes,
                    part: p.get_part(),
                    more: p.get_more(),
                })
            }
            Which::FailuresRecorded(f) => {
                let f = f.map_err(ControlError::Decode)?;
                let list = f.get_members().map_err(ControlError::Decode)?;
                bounded(
                    list_len(list.len()),
                    "maps.failuresRecorded.members",
                    1,
                    MAX_MEMBERS,
                )?;
                Self::FailuresRecorded {
                    device: f.get_device(),
                    members: list.iter().collect(),
                }
            }
            Which::StartScrub(d) => Self::StartScrub(d),
            Which::RetirePool(d) => Self::RetirePool(d),
            Which::ReplaceMember(r) => {
                let r = r.map_err(ControlError::Decode)?;
                Self::ReplaceMember {
                    device: r.get_device(),
                    slot: r.get_slot(),
                    drive: r.get_drive(),
                    done: r.get_done(),
                }
            }
        };
        request.validate()?;
        let id = root.get_request_id();
        if id == 0 {
            // Never a request's id; also what a message of another schema reads as.
            return Err(ControlError::MissingField("maps.requestId"));
        }
        Ok((id, request))
    }

    /// The request id of a datagram that is a `MapsRequest` as far as its root goes, even if its
    /// body is malformed (so that the answer can be an error instead of silence). 0 (never a
    /// request's id) counts as none.
    pub fn request_id_of(bytes: &[u8]) -> Option<u64> {
        let message = read(bytes).ok()?;
        let root: wire::maps_request::Reader<'_> = message.get_root().ok()?;
        Some(root.get_request_id()).filter(|&id| id != 0)
    }
}

fn write_volume(mut out: wire::volume_map::Builder<'_>, v: &VolumeMap) {
    out.set_id(v.id);
    out.set_name(v.name.as_str());
    out.set_block_size(v.block_size);
    out.set_blocks(v.blocks);
    let len = len_u32(v.extents.len());
    let mut list = out.init_extents(len);
    for (i, e) in (0..len).zip(&v.extents) {
        let mut x = list.reborrow().get(i);
        x.set_start(e.start);
        x.set_blocks(e.blocks);
        x.set_device(e.device);
        x.set_device_offset(e.device_offset);
    }
}

fn read_volume(v: wire::volume_map::Reader<'_>) -> Result<VolumeMap, ControlError> {
    let list = v.get_extents().map_err(ControlError::Decode)?;
    bounded(
        list_len(list.len()),
        "maps.publishVolumes.extents",
        1,
        MAX_EXTENTS,
    )?;
    let extents = list
        .iter()
        .map(|e| Extent {
            start: e.get_start(),
            blocks: e.get_blocks(),
            device: e.get_device(),
            device_offset: e.get_device_offset(),
        })
        .collect();
    Ok(VolumeMap {
        id: v.get_id(),
        name: text(v.get_name(), "maps.publishVolumes.name", MAX_NAME_BYTES)?,
        block_size: v.get_block_size(),
        blocks: v.get_blocks(),
        extents,
    })
}

fn read_states(
    list: capnp::Result<capnp::enum_list::Reader<'_, wire::MemberState>>,
    field: &'static str,
) -> Result<Vec<MemberState>, ControlError> {
    let list = list.map_err(ControlError::Decode)?;
    bounded(list_len(list.len()), field, 0, MAX_MEMBERS)?;
    list.iter()
        .map(|s| s.map(MemberState::from).map_err(unknown("MemberState")))
        .collect()
}

fn read_pool(p: wire::pool_spec::Reader<'_>) -> Result<PoolSpec, ControlError> {
    let drives = p.get_drives().map_err(ControlError::Decode)?;
    bounded(
        list_len(drives.len()),
        "maps.publishPool.drives",
        1,
        MAX_MEMBERS,
    )?;
    Ok(PoolSpec {
        epoch: p.get_epoch(),
        name: text(p.get_name(), "maps.publishPool.name", MAX_NAME_BYTES)?,
        level: p.get_level().map_err(unknown("RaidLevel"))?.into(),
        chunk: p.get_chunk(),
        data_offset: p.get_data_offset(),
        data_len: p.get_data_len(),
        drives: drives.iter().collect(),
        states: read_states(p.get_states(), "maps.publishPool.states")?,
        rebuild_from: {
            let l = p.get_rebuild_from().map_err(ControlError::Decode)?;
            bounded(
                list_len(l.len()),
                "maps.publishPool.rebuildFrom",
                0,
                MAX_MEMBERS,
            )?;
            l.iter().collect()
        },
        hold_until_recorded: p.get_hold_until_recorded(),
        seq_base: p.get_seq_base(),
        resync: p.get_resync(),
        seq_limit: p.get_seq_limit(),
        resync_members: p.get_resync_members(),
        checksum: (p.get_checksum_len() > 0)
            .then(|| (p.get_checksum_offset(), p.get_checksum_len())),
        bitmap: (p.get_bitmap_len() > 0).then(|| {
            (
                p.get_bitmap_offset(),
                p.get_bitmap_len(),
                p.get_bitmap_tag(),
            )
        }),
        journal: (p.get_journal_len() > 0).then(|| {
            (
                p.get_journal_offset(),
                p.get_journal_len(),
                p.get_journal_tag(),
            )
        }),
    })
}

impl MapsReply {
    /// What kind of reply this is, for messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Device(_) => "a device index",
            Self::Devices(_) => "a device list",
            Self::Error(_) => "an error",
        }
    }

    /// Checks the bounds of the schema.
    pub fn validate(&self) -> Result<(), ControlError> {
        match self {
            Self::Done | Self::Device(_) => Ok(()),
            Self::Devices(list) => {
                bounded(list.len(), "maps.devices", 0, MAX_DEVICES)?;
                for d in list {
                    name(&d.name, "maps.devices.name")?;
                    bounded(d.members.len(), "maps.devices.members", 0, MAX_MEMBERS)?;
                }
                Ok(())
            }
            Self::Error(t) => check_text(t, "maps.error", MAX_ERROR_BYTES, false),
        }
    }
}

impl MemberFailed {
    fn validate(&self) -> Result<(), ControlError> {
        name(&self.name, "maps.memberFailed.name")
    }
}

impl MapsMessage {
    /// Checks the bounds of the schema.
    pub fn validate(&self) -> Result<(), ControlError> {
        match self {
            Self::Reply { reply, .. } => reply.validate(),
            Self::MemberFailed(e) => e.validate(),
        }
    }

    /// Encodes (bounds are not checked: see [`MapsMessage::validate`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut message = capnp::message::Builder::new_default();
        let root = message.init_root::<wire::maps_message::Builder<'_>>();
        let body = root.init_body();
        match self {
            Self::Reply { request_id, reply } => {
                let mut r = body.init_reply();
                r.set_request_id(*request_id);
                let mut b = r.init_body();
                match reply {
                    MapsReply::Done => b.set_done(()),
                    MapsReply::Device(d) => b.set_device(*d),
                    MapsReply::Error(t) => b.set_error(t.as_str()),
                    MapsReply::Devices(list) => {
                        let len = len_u32(list.len());
                        let mut out = b.init_devices(len);
                        for (i, d) in (0..len).zip(list) {
                            write_device(out.reborrow().get(i), d);
                        }
                    }
                }
            }
            Self::MemberFailed(e) => {
                let mut m = body.init_member_failed();
                m.set_device(e.device);
                m.set_member(e.member);
                m.set_name(e.name.as_str());
                m.set_status(e.status);
            }
        }
        capnp::serialize::write_message_to_words(&message)
    }

    /// Decodes and validates; never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, ControlError> {
        use wire::maps_message::body::Which;
        use wire::maps_reply::body::Which as Reply;
        let message = read(bytes)?;
        let root: wire::maps_message::Reader<'_> =
            message.get_root().map_err(ControlError::Decode)?;
        let decoded = match root
            .get_body()
            .which()
            .map_err(unknown("MapsMessage.body"))?
        {
            Which::Reply(r) => {
                let r = r.map_err(ControlError::Decode)?;
                let reply = match r.get_body().which().map_err(unknown("MapsReply.body"))? {
                    Reply::Done(()) => MapsReply::Done,
                    Reply::Device(d) => MapsReply::Device(d),
                    Reply::Error(t) => MapsReply::Error(text(t, "maps.error", MAX_ERROR_BYTES)?),
                    Reply::Devices(list) => {
                        let list = list.map_err(ControlError::Decode)?;
                        bounded(list_len(list.len()), "maps.devices", 0, MAX_DEVICES)?;
                        let mut out = Vec::with_capacity(list_len(list.len()));
                        for d in list.iter() {
                            out.push(read_device(d)?);
                        }
                        MapsReply::Devices(out)
                    }
                };
                Self::Reply {
                    request_id: r.get_request_id(),
                    reply,
                }
            }
            Which::MemberFailed(m) => {
                let m = m.map_err(ControlError::Decode)?;
                Self::MemberFailed(MemberFailed {
                    device: m.get_device(),
                    member: m.get_member(),
                    name: text(m.get_name(), "maps.memberFailed.name", MAX_NAME_BYTES)?,
                    status: m.get_status(),
                })
            }
        };
        decoded.validate()?;
        Ok(decoded)
    }
}

fn write_device(mut out: wire::device_info::Builder<'_>, d: &DeviceInfo) {
    out.set_index(d.index);
    out.set_name(d.name.as_str());
    out.set_size_bytes(d.size_bytes);
    out.set_block_size(d.block_size);
    out.set_inflight(d.inflight);
    out.set_held(d.held);
    let len = len_u32(d.members.len());
    let mut members = out.reborrow().init_members(len);
    for (i, &m) in (0..len).zip(&d.members) {
        members.set(i, m.into());
    }
    let (slot, done) = d.rebuild.unwrap_or((u32::MAX, 0));
    out.set_rebuild_slot(slot);
    out.set_rebuild_done(done);
    if let Some(s) = d.scrub {
        out.set_scrubbed(true);
        out.set_scrub_done(s.done);
        out.set_scrub_total(s.total);
        out.set_scrub_mismatches(s.mismatches);
        out.set_scrub_repaired(s.repaired);
        out.set_scrub_skipped(s.skipped);
    }
    let sat = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    out.set_integrity_errors(sat(d.integrity.errors));
    out.set_integrity_recovered(sat(d.integrity.recovered));
    out.set_integrity_healed(sat(d.integrity.healed));
    out.set_integrity_unrecoverable(sat(d.integrity.unrecoverable));
    out.set_seq_headroom(d.seq_headroom);
    out.set_records(d.records);
    let mut of = out.init_member_of();
    match d.member_of {
        None => of.set_none(()),
        Some(s) => {
            let mut p = of.init_pool();
            p.set_device(s.device);
            p.set_slot(s.slot);
        }
    }
}

fn read_device(d: wire::device_info::Reader<'_>) -> Result<DeviceInfo, ControlError> {
    use wire::device_info::member_of::Which;
    let member_of = match d
        .get_member_of()
        .which()
        .map_err(unknown("DeviceInfo.memberOf"))?
    {
        Which::None(()) => None,
        Which::Pool(p) => Some(PoolSlot {
            device: p.get_device(),
            slot: p.get_slot(),
        }),
    };
    Ok(DeviceInfo {
        index: d.get_index(),
        name: text(d.get_name(), "maps.devices.name", MAX_NAME_BYTES)?,
        size_bytes: d.get_size_bytes(),
        block_size: d.get_block_size(),
        members: read_states(d.get_members(), "maps.devices.members")?,
        inflight: d.get_inflight(),
        held: d.get_held(),
        member_of,
        rebuild: (d.get_rebuild_slot() != u32::MAX)
            .then(|| (d.get_rebuild_slot(), d.get_rebuild_done())),
        scrub: d.get_scrubbed().then(|| ScrubInfo {
            done: d.get_scrub_done(),
            total: d.get_scrub_total(),
            mismatches: d.get_scrub_mismatches(),
            repaired: d.get_scrub_repaired(),
            skipped: d.get_scrub_skipped(),
        }),
        integrity: IntegrityInfo {
            errors: d.get_integrity_errors().into(),
            recovered: d.get_integrity_recovered().into(),
            healed: d.get_integrity_healed().into(),
            unrecoverable: d.get_integrity_unrecoverable().into(),
        },
        seq_headroom: d.get_seq_headroom(),
        records: d.get_records(),
    })
}

/// Cuts `text` to at most `max` bytes at a character boundary (for names the datapath reports
/// from a topology that does not bound them).
pub fn truncate_name(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// One end of the maps channel. See the module docs for which methods each end uses.
#[derive(Debug)]
pub struct MapsChannel {
    inner: ControlChannel,
    next_id: AtomicU64,
    /// Events that arrived while a call waited for its reply.
    events: VecDeque<MemberFailed>,
}

impl MapsChannel {
    /// A connected pair: `(datapath end, metadata end)`.
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
            events: VecDeque::new(),
        }
    }

    /// Numbers this end's requests from `first` on (0 is taken as 1). The metadata service
    /// passes `generation << 32`, so that no two of its generations share an id.
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

    /// Receives one datagram: blocking in `recvmsg` alone when `timeout` is `None`, else with a
    /// `poll` first.
    fn recv_datagram(&self, timeout: Option<Duration>) -> Result<Option<Vec<u8>>, ControlError> {
        let got = match timeout {
            None => self.recv_bytes(MsgFlags::empty()).map(Some),
            Some(t) => self
                .inner
                .recv_timeout_with(t, |flags| self.recv_bytes(flags)),
        };
        if let Err(e) = &got {
            if e.is_malformed() {
                self.inner.warn_malformed(e);
            }
        }
        got
    }

    // -- The datapath end.

    /// Receives a request, blocking in `recvmsg` until one arrives when `timeout` is `None`
    /// (no `poll`: the datapath's sandbox allows none), else waiting at most `timeout`.
    ///
    /// A malformed request is an error ([`MapsError::is_malformed`]), logged rate-limited;
    /// [`MapsError::Malformed`] when its id could be read, so it can be answered. The channel
    /// can be read again after it.
    pub fn recv_request(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Option<(u64, MapsRequest)>, MapsError> {
        let Some(bytes) = self.recv_datagram(timeout)? else {
            return Ok(None);
        };
        match MapsRequest::decode(&bytes) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                self.inner.warn_malformed(&e);
                Err(match MapsRequest::request_id_of(&bytes) {
                    Some(request_id) => MapsError::Malformed {
                        request_id,
                        source: e,
                    },
                    None => MapsError::Channel(e),
                })
            }
        }
    }

    /// Sends the reply to request `request_id`. Refuses (sending nothing) a reply out of bounds
    /// or larger than one datagram.
    pub fn send_reply(&self, request_id: u64, reply: &MapsReply) -> Result<(), ControlError> {
        self.send_message(&MapsMessage::Reply {
            request_id,
            reply: reply.clone(),
        })
    }

    /// Sends a member-failure event.
    pub fn send_event(&self, event: &MemberFailed) -> Result<(), ControlError> {
        self.send_message(&MapsMessage::MemberFailed(event.clone()))
    }

    fn send_message(&self, message: &MapsMessage) -> Result<(), ControlError> {
        message.validate()?;
        self.inner.send_datagram(&message.encode(), &[])
    }

    // -- The metadata end.

    /// Sends a request; returns its id. Refuses (sending nothing) a request out of bounds or
    /// larger than one datagram.
    pub fn send_request(&self, request: &MapsRequest) -> Result<u64, ControlError> {
        request.validate()?;
        let id = self.next_request_id();
        self.inner.send_datagram(&request.encode(id), &[])?;
        Ok(id)
    }

    /// Receives the next message from the datapath as it comes, reply or event, waiting at most
    /// `timeout` (for a caller that does its own bookkeeping; [`MapsChannel::call`] and
    /// [`MapsChannel::recv_event`] are the usual way). Malformed ones are skipped (logged,
    /// rate-limited) and waiting goes on.
    pub fn recv_message(&self, timeout: Duration) -> Result<Option<MapsMessage>, MapsError> {
        Ok(self.recv_until(Instant::now() + timeout)?)
    }

    /// As [`MapsChannel::recv_message`], until `deadline`.
    fn recv_until(&self, deadline: Instant) -> Result<Option<MapsMessage>, ControlError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(bytes) = self.recv_datagram(Some(left))? else {
                return Ok(None);
            };
            match MapsMessage::decode(&bytes) {
                Ok(m) => return Ok(Some(m)),
                Err(e) => self.inner.warn_malformed(&e),
            }
        }
    }

    /// Sends `request` and waits at most `timeout` for its reply. Replies to other ids (late
    /// ones, to a request that timed out, or meant for a predecessor) are discarded; member
    /// failures that arrive meanwhile are kept for [`MapsChannel::recv_event`].
    pub fn call(
        &mut self,
        request: &MapsRequest,
        timeout: Duration,
    ) -> Result<MapsReply, MapsError> {
        let id = self.send_request(request)?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv_until(deadline)? {
                Some(MapsMessage::Reply { request_id, reply }) if request_id == id => {
                    return Ok(reply)
                }
                Some(MapsMessage::Reply { request_id, reply }) => {
                    tracing::debug!(
                        id = request_id,
                        waiting_for = id,
                        reply = reply.kind_name(),
                        "discarding a late maps reply"
                    );
                }
                Some(MapsMessage::MemberFailed(e)) => self.events.push_back(e),
                None => {
                    return Err(MapsError::Timeout {
                        request_id: id,
                        timeout,
                    })
                }
            }
        }
    }

    /// The next member failure: one kept by an earlier call, or the next to arrive within
    /// `timeout` (late replies arriving meanwhile are discarded).
    pub fn recv_event(&mut self, timeout: Duration) -> Result<Option<MemberFailed>, MapsError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv_until(deadline)? {
                Some(MapsMessage::MemberFailed(e)) => return Ok(Some(e)),
                Some(MapsMessage::Reply { request_id, reply }) => {
                    tracing::debug!(
                        id = request_id,
                        reply = reply.kind_name(),
                        "discarding a maps reply nobody waits for"
                    );
                }
                None => return Ok(None),
            }
        }
    }

    fn expect(&mut self, request: &MapsRequest, timeout: Duration) -> Result<MapsReply, MapsError> {
        match self.call(request, timeout)? {
            MapsReply::Error(reason) => Err(MapsError::Refused {
                request: request.kind_name(),
                reason,
            }),
            reply => Ok(reply),
        }
    }

    fn unexpected(request: &MapsRequest, reply: &MapsReply) -> MapsError {
        MapsError::UnexpectedReply {
            request: request.kind_name(),
            reply: reply.kind_name(),
        }
    }

    /// `listDevices`.
    pub fn list_devices(&mut self, timeout: Duration) -> Result<Vec<DeviceInfo>, MapsError> {
        let request = MapsRequest::ListDevices;
        match self.expect(&request, timeout)? {
            MapsReply::Devices(list) => Ok(list),
            other => Err(Self::unexpected(&request, &other)),
        }
    }

    /// `publishPool`: returns the pool's device index.
    pub fn publish_pool(&mut self, spec: PoolSpec, timeout: Duration) -> Result<u32, MapsError> {
        let request = MapsRequest::PublishPool(spec);
        match self.expect(&request, timeout)? {
            MapsReply::Device(d) => Ok(d),
            other => Err(Self::unexpected(&request, &other)),
        }
    }

    /// `failuresRecorded`.
    pub fn failures_recorded(
        &mut self,
        device: u32,
        members: Vec<u32>,
        timeout: Duration,
    ) -> Result<(), MapsError> {
        let request = MapsRequest::FailuresRecorded { device, members };
        match self.expect(&request, timeout)? {
            MapsReply::Done => Ok(()),
            other => Err(Self::unexpected(&request, &other)),
        }
    }

    /// `startScrub`.
    pub fn start_scrub(&mut self, device: u32, timeout: Duration) -> Result<(), MapsError> {
        let request = MapsRequest::StartScrub(device);
        match self.expect(&request, timeout)? {
            MapsReply::Done => Ok(()),
            other => Err(Self::unexpected(&request, &other)),
        }
    }

    /// `retirePool`.
    pub fn retire_pool(&mut self, device: u32, timeout: Duration) -> Result<(), MapsError> {
        let request = MapsRequest::RetirePool(device);
        match self.expect(&request, timeout)? {
            MapsReply::Done => Ok(()),
            other => Err(Self::unexpected(&request, &other)),
        }
    }

    /// `replaceMember`.
    pub fn replace_member(
        &mut self,
        device: u32,
        slot: u32,
        drive: u32,
        done: u64,
        timeout: Duration,
    ) -> Result<(), MapsError> {
        let request = MapsRequest::ReplaceMember {
            device,
            slot,
            drive,
            done,
        };
        match self.expect(&request, timeout)? {
            MapsReply::Done => Ok(()),
            other => Err(Self::unexpected(&request, &other)),
        }
    }

    /// `publishVolumes`: replaces the volume table with `volumes`, in as many parts as one
    /// datagram each needs ([`volume_parts`]); each part waits at most `timeout`.
    pub fn publish_volumes(
        &mut self,
        epoch: u64,
        volumes: &[VolumeMap],
        timeout: Duration,
    ) -> Result<(), MapsError> {
        for part in volume_parts(epoch, volumes)? {
            let request = MapsRequest::PublishVolumes(part);
            match self.expect(&request, timeout)? {
                MapsReply::Done => {}
                other => return Err(Self::unexpected(&request, &other)),
            }
        }
        Ok(())
    }
}

/// Cuts a volume table into the parts of `publishVolumes`, each fitting one datagram.
pub fn volume_parts(epoch: u64, volumes: &[VolumeMap]) -> Result<Vec<PublishVolumes>, MapsError> {
    if volumes.len() > MAX_VOLUMES {
        return Err(MapsError::Unsendable(format!(
            "{} volumes, over the limit of {MAX_VOLUMES}",
            volumes.len()
        )));
    }
    // Room for the request's own words (segment table, root, body, list tag) and slack.
    let budget = MAX_MESSAGE_BYTES - 512;
    let mut parts: Vec<PublishVolumes> = Vec::new();
    let mut current: Vec<VolumeMap> = Vec::new();
    let mut used = 0;
    for v in volumes {
        let size = v.encoded_bound();
        if size > budget {
            return Err(MapsError::Unsendable(format!(
                "volume {} alone does not fit one datagram",
                v.name
            )));
        }
        if used + size > budget {
            parts.push(PublishVolumes {
                epoch,
                volumes: std::mem::take(&mut current),
                part: 0,
                more: true,
            });
            used = 0;
        }
        used += size;
        current.push(v.clone());
    }
    parts.push(PublishVolumes {
        epoch,
        volumes: current,
        part: 0,
        more: false,
    });
    for (i, p) in parts.iter_mut().enumerate() {
        p.part = len_u32(i);
    }
    Ok(parts)
}

impl AsFd for MapsChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

/// Example messages (tests and fuzzing corpora).
#[doc(hidden)]
pub mod examples {
    use super::*;

    /// A volume with `extents` extents.
    pub fn volume(id: u32, extents: usize) -> VolumeMap {
        let per = 256;
        VolumeMap {
            id,
            name: format!("vol{id}"),
            block_size: 4096,
            blocks: per * extents as u64,
            extents: (0..extents as u64)
                .map(|i| Extent {
                    start: i * per,
                    blocks: per,
                    device: 2 + (i % 2) as u32,
                    device_offset: i * per * 4096,
                })
                .collect(),
        }
    }

    /// One request of every kind.
    pub fn requests() -> Vec<MapsRequest> {
        vec![
            MapsRequest::ListDevices,
            MapsRequest::PublishPool(PoolSpec {
                epoch: 3,
                name: "tank".into(),
                level: RaidLevel::Raid10,
                chunk: 64 << 10,
                data_offset: 81 << 20,
                data_len: 8 << 20,
                drives: vec![0, 1, 2, 3],
                states: vec![
                    MemberState::Active,
                    MemberState::Failed,
                    MemberState::Active,
                    MemberState::Active,
                ],
                hold_until_recorded: true,
                journal: Some((17 << 20, 16 << 20, 0x1234)),
                rebuild_from: vec![0, 1 << 20, 0, 0],
                seq_base: 1 << 40,
                resync: true,
                seq_limit: (1 << 40) + (1 << 24),
                bitmap: Some((17 << 20, 16 << 20, 0x5678)),
                resync_members: 0b10,
                checksum: Some(((81 << 20) + (8 << 20), 256 << 10)),
            }),
            MapsRequest::PublishPool(PoolSpec {
                epoch: 1,
                name: "p".into(),
                level: RaidLevel::Raid0,
                chunk: 4096,
                data_offset: 0,
                data_len: 4096,
                drives: vec![7],
                states: vec![],
                hold_until_recorded: false,
                journal: None,
                rebuild_from: vec![],
                seq_base: 0,
                resync: false,
                seq_limit: 0,
                bitmap: None,
                resync_members: 0,
                checksum: None,
            }),
            MapsRequest::PublishVolumes(PublishVolumes {
                epoch: 3,
                volumes: vec![volume(1, 1), volume(2, 3)],
                part: 0,
                more: false,
            }),
            MapsRequest::PublishVolumes(PublishVolumes {
                epoch: 4,
                volumes: vec![],
                part: 2,
                more: true,
            }),
            MapsRequest::FailuresRecorded {
                device: 4,
                members: vec![1, 3],
            },
            MapsRequest::StartScrub(5),
            MapsRequest::RetirePool(6),
            MapsRequest::ReplaceMember {
                device: 4,
                slot: 2,
                drive: 9,
                done: 1 << 30,
            },
        ]
    }

    /// A device as listed.
    pub fn device(index: u32, members: usize) -> DeviceInfo {
        DeviceInfo {
            index,
            name: format!("dev{index}"),
            size_bytes: 96 << 20,
            block_size: 4096,
            members: (0..members)
                .map(|i| {
                    if i % 3 == 1 {
                        MemberState::Failed
                    } else {
                        MemberState::Active
                    }
                })
                .collect(),
            inflight: 3,
            held: 1,
            member_of: (members == 0).then_some(PoolSlot {
                device: 9,
                slot: index,
            }),
            rebuild: (members > 0).then_some((1, 123 << 20)),
            scrub: (members > 0).then_some(ScrubInfo {
                done: 5 << 20,
                total: 96 << 20,
                mismatches: 2,
                repaired: 2,
                skipped: 1,
            }),
            integrity: IntegrityInfo {
                errors: u64::from(index / 2),
                recovered: 4,
                healed: 3,
                unrecoverable: 1,
            },
            seq_headroom: if members > 0 { 12345 } else { u32::MAX },
            records: members == 0 && index % 2 == 0,
        }
    }

    /// One message of every kind.
    pub fn messages() -> Vec<MapsMessage> {
        let reply = |request_id, reply| MapsMessage::Reply { request_id, reply };
        let mut plain = device(5, 0);
        plain.member_of = None;
        vec![
            reply(1, MapsReply::Done),
            reply(2, MapsReply::Device(4)),
            reply(
                3,
                MapsReply::Devices(vec![device(0, 0), plain, device(4, 2)]),
            ),
            reply(4, MapsReply::Error("drive 9 is not a free drive".into())),
            MapsMessage::MemberFailed(MemberFailed {
                device: 4,
                member: 1,
                name: "d1".into(),
                status: 0x0280,
            }),
        ]
    }

    /// The largest listing the bounds allow.
    pub fn largest_listing() -> MapsMessage {
        MapsMessage::Reply {
            request_id: u64::MAX,
            reply: MapsReply::Devices(
                (0..MAX_DEVICES)
                    .map(|i| {
                        let mut d = device(u32::MAX - len_u32(i), MAX_MEMBERS);
                        d.name = "n".repeat(MAX_NAME_BYTES);
                        d.records = true;
                        d.member_of = Some(PoolSlot {
                            device: u32::MAX,
                            slot: u32::MAX,
                        });
                        d
                    })
                    .collect(),
            ),
        }
    }
}
