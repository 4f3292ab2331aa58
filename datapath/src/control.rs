//! The engine's control inlet: what the control plane (the metadata service, through the
//! datapath service's control thread) changes while the engine serves, and what the engine
//! reports back.
//!
//! Commands are applied by the engine's own thread between two turns of its loop, so a change
//! is atomic with respect to I/O: a request resolves its volume map when it starts and finishes
//! on the devices it started on. Each command carries the epoch of the map it publishes; an
//! epoch older than the engine's current one is refused (a restarted control plane replaying
//! an old decision must not roll the maps back), the same epoch is accepted again (idempotent
//! replay).

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use duplex_ipc::doorbell::Doorbell;

use crate::bdev::{Event, MemberState, RaidLevel};
use crate::map::VolumeMap;

/// In [`PoolSpec::drives`]: a member that is not there (missing, or stale and kept out); its
/// state must be [`MemberState::Failed`].
pub const MISSING_DRIVE: u32 = u32::MAX;

/// A RAID device to build over raw drives (engine device indices that are drives).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    /// Name (logs, events).
    pub name: String,
    /// Level.
    pub level: RaidLevel,
    /// Chunk size in bytes.
    pub chunk: u64,
    /// Where the data area starts on each member.
    pub data_offset: u64,
    /// Bytes of each member's data area.
    pub data_len: u64,
    /// The members, in slot order: raw drive ids ([`MISSING_DRIVE`] for one not there).
    pub drives: Vec<u32>,
    /// Each member's recorded state (a failed member stays out).
    pub states: Vec<MemberState>,
    /// Hold write and flush completions after a member fails until the control plane says the
    /// failure is recorded on disk ([`Command::FailuresRecorded`]): a write is acknowledged
    /// only once the on-disk metadata can no longer present the failed member as current.
    pub hold_until_recorded: bool,
    /// Parity levels: where the stripe journal is (`None`: no journal, the write hole open).
    pub journal: Option<crate::bdev::JournalSpec>,
    /// Mirror levels: the first write sequence number to use (above every one the pool's
    /// drives may hold: the control plane's committed mark).
    pub seq_base: u64,
    /// Mirror levels: resync before serving reads of a region (an import after a crash or a
    /// power cut: copies may disagree, the newest by sequence wins).
    pub resync: bool,
    /// Mirror levels: the control plane's committed write sequence mark: no write is
    /// numbered at or past it (writes wait for a higher one). 0: no limit. Publishing the
    /// same pool again raises it on the built device.
    pub seq_limit: u64,
    /// Mirror levels: the write-intent bitmap's area (`None`: no bitmap; a resync compares
    /// everything).
    pub bitmap: Option<crate::bdev::IntentSpec>,
    /// Mirror levels with a bitmap: rebuilding members (bit = slot) that came back stale
    /// (kept out since they failed): only the regions the bitmap marks are copied to them.
    pub resync_members: u64,
    /// Members without integrity records in their LBA format's metadata keep them in a
    /// checksum area (`None`: no area; the pool's blocks are checked only by drives that
    /// carry records themselves).
    pub checksum: Option<ChecksumSpec>,
}

/// A pool's checksum area on every member (ONDISK "Checksum area"): one 16-byte entry per
/// logical block of the member's data area, in `len` bytes from byte `offset` of the drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChecksumSpec {
    /// First byte of the area on each member (4 KiB aligned, after the data area's used part).
    pub offset: u64,
    /// Bytes of the area (a multiple of 4 KiB, at least 16 per block of the data area).
    pub len: u64,
}

/// What a device looks like now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStatus {
    /// Engine device index.
    pub index: usize,
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// RAID members' states (empty for a leaf).
    pub members: Vec<MemberState>,
    /// I/Os in flight (held ones included).
    pub inflight: usize,
    /// Completions held until a member failure is recorded.
    pub held: usize,
    /// For a raw drive taken into a RAID device: that device's index and the drive's member
    /// slot ([`EngineControl::devices`] only; such drives are not roots).
    pub member_of: Option<(usize, usize)>,
    /// A parity device's scrub in progress or last finished.
    pub scrub: Option<crate::bdev::ScrubStatus>,
    /// A drive's blocks read bad (integrity records).
    pub integrity_errors: u64,
    /// A RAID device's integrity handling.
    pub integrity: crate::bdev::IntegrityCounts,
    /// A mirror device: write sequence numbers left below its committed mark (`None`:
    /// no mark, or not a mirror).
    pub seq_headroom: Option<u64>,
}

/// Replies to commands: `Err` carries a one-line reason.
pub type Reply<T> = Sender<Result<T, String>>;

/// A change for the engine.
#[derive(Debug)]
pub enum Command {
    /// Replace the volume table (maps over the current devices).
    PublishVolumes {
        /// Epoch of this map.
        epoch: u64,
        /// The volumes.
        maps: Vec<VolumeMap>,
        /// Answered when applied.
        reply: Reply<()>,
    },
    /// Build a RAID device over idle raw drives; answers its device index.
    PublishPool {
        /// Epoch of this map.
        epoch: u64,
        /// The device.
        spec: PoolSpec,
        /// Answered when built.
        reply: Reply<usize>,
    },
    /// The failure of these members of device `device` is recorded on disk: release the
    /// writes held since.
    FailuresRecorded {
        /// Engine device index of the RAID device.
        device: usize,
        /// Member indices.
        members: Vec<usize>,
        /// Answered when applied.
        reply: Reply<()>,
    },
    /// Puts free raw drive `drive` into slot `slot` of RAID device `device` in place of a
    /// failed member, to be rebuilt from byte `done` of its data area on; the old member goes
    /// back to the free drives (a missing one is dropped).
    ReplaceMember {
        /// Engine device index of the RAID device.
        device: usize,
        /// The member slot.
        slot: usize,
        /// The raw drive id of the new member.
        drive: u32,
        /// Bytes of its data area already rebuilt (a checkpoint), 0 for a fresh drive.
        done: u64,
        /// Answered when swapped.
        reply: Reply<()>,
    },
    /// Starts a scrub of parity device `device` (its parity checked against its data
    /// everywhere, rewritten where it disagrees); progress in [`DeviceStatus::scrub`].
    Scrub {
        /// Engine device index.
        device: usize,
        /// Answered when started.
        reply: Reply<()>,
    },
    /// Takes RAID device `device` apart (its pool moved to the peer): its rebuilds and scrubs
    /// stop starting work, what they have out ends, then its members (unwrapped from their
    /// checksum layer) become free raw drives again and the device is gone. Refused while a
    /// volume maps it or host I/O is in flight.
    RetirePool {
        /// Engine device index.
        device: usize,
        /// Answered once the members are free.
        reply: Reply<()>,
    },
    /// The devices as they are now.
    Status {
        /// Answered at once.
        reply: Reply<Vec<DeviceStatus>>,
    },
    /// Every device by index: the roots as [`Command::Status`] has them, and the raw drives
    /// taken into RAID devices (their leaf geometry, where they are).
    Devices {
        /// Answered at once.
        reply: Reply<Vec<DeviceStatus>>,
    },
}

/// The control plane's handle on a running engine ([`crate::Engine::control`]).
#[derive(Debug, Clone)]
pub struct EngineControl {
    pub(crate) tx: Sender<Command>,
    pub(crate) wake: Arc<Doorbell>,
    pub(crate) events: Arc<Mutex<Receiver<Event>>>,
}

/// The engine's end.
#[derive(Debug)]
pub(crate) struct Inlet {
    pub(crate) rx: Receiver<Command>,
    pub(crate) events: Sender<Event>,
}

pub(crate) fn pair(wake: Arc<Doorbell>) -> (EngineControl, Inlet) {
    let (tx, rx) = mpsc::channel();
    let (etx, erx) = mpsc::channel();
    (
        EngineControl {
            tx,
            wake,
            events: Arc::new(Mutex::new(erx)),
        },
        Inlet { rx, events: etx },
    )
}

impl Inlet {
    /// The next command, if one waits.
    pub(crate) fn next(&self) -> Option<Command> {
        self.rx.try_recv().ok()
    }
}

impl EngineControl {
    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, String> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(make(tx))
            .map_err(|_| "the engine has stopped".to_owned())?;
        self.wake.ring();
        rx.recv()
            .map_err(|_| "the engine stopped before answering".to_owned())?
    }

    /// Replaces the volume table (see [`Command::PublishVolumes`]).
    pub fn publish_volumes(&self, epoch: u64, maps: Vec<VolumeMap>) -> Result<(), String> {
        self.call(|reply| Command::PublishVolumes { epoch, maps, reply })
    }

    /// Builds a RAID device (see [`Command::PublishPool`]); returns its device index.
    pub fn publish_pool(&self, epoch: u64, spec: PoolSpec) -> Result<usize, String> {
        self.call(|reply| Command::PublishPool { epoch, spec, reply })
    }

    /// Releases writes held after member failures (see [`Command::FailuresRecorded`]).
    pub fn failures_recorded(&self, device: usize, members: Vec<usize>) -> Result<(), String> {
        self.call(|reply| Command::FailuresRecorded {
            device,
            members,
            reply,
        })
    }

    /// Replaces a failed member (see [`Command::ReplaceMember`]).
    pub fn replace_member(
        &self,
        device: usize,
        slot: usize,
        drive: u32,
        done: u64,
    ) -> Result<(), String> {
        self.call(|reply| Command::ReplaceMember {
            device,
            slot,
            drive,
            done,
            reply,
        })
    }

    /// Starts a scrub (see [`Command::Scrub`]).
    pub fn scrub(&self, device: usize) -> Result<(), String> {
        self.call(|reply| Command::Scrub { device, reply })
    }

    /// Takes a pool device apart (see [`Command::RetirePool`]).
    pub fn retire_pool(&self, device: usize) -> Result<(), String> {
        self.call(|reply| Command::RetirePool { device, reply })
    }

    /// The devices now: the roots of the block-device trees (volumes' devices, free drives,
    /// RAID devices).
    pub fn status(&self) -> Result<Vec<DeviceStatus>, String> {
        self.call(|reply| Command::Status { reply })
    }

    /// Every device now, by index: [`EngineControl::status`] and the drives taken into RAID
    /// devices (so a control plane can map every raw drive id to its name and geometry).
    pub fn devices(&self) -> Result<Vec<DeviceStatus>, String> {
        self.call(|reply| Command::Devices { reply })
    }

    /// Events reported since the last call (member failures).
    pub fn events(&self) -> Vec<Event> {
        let Ok(rx) = self.events.lock() else {
            return Vec::new();
        };
        rx.try_iter().collect()
    }

    /// Waits for the next event (for tests and the control thread).
    pub fn next_event(&self) -> Option<Event> {
        self.events.lock().ok()?.recv().ok()
    }
}
