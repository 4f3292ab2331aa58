//! The block-device layer: one interface under which files, NVMe drives and RAID compose.
//!
//! Modelled on SPDK's bdev function table: a block device ([`Bdev`]) takes I/O ([`Io`]) and
//! reports each one's end, exactly once, through [`Bdev::poll`]. Leaves move bytes:
//! [`FileBdev`] (a file or block device through the engine's restricted io_uring, or a mapped
//! memory-backed file) and [`NvmeBdev`] (a namespace of an NVMe drive through the user-space
//! driver). [`RaidBdev`] is a block device over block devices (RAID 0, 1 and 10): it cuts an
//! I/O into member I/Os, submits them to its members and completes the parent when they have.
//! The engine sees only the roots of these trees, through the volume maps (`crate::map`).
//!
//! Everything runs on the engine's one thread. An I/O names its data by reference: the
//! request's chain of pool chunks ([`ChainRef`]: which chain, how many bytes in) lives in the
//! engine for as long as the request does, so a layer may look at it again whenever it needs
//! to (a short transfer continues, a mirror read is retried on the other member) without
//! copying it per I/O.
//!
//! # The contract
//!
//! * [`Bdev::submit`] never fails synchronously: every I/O it accepts ends in exactly one
//!   [`Done`] from a later [`Bdev::poll`] (a refusal is a `Done` with an error status).
//! * Offsets and lengths are bytes, whole blocks of the device, inside [`Bdev::size`] (the
//!   caller checks; a device refuses what is not with `STATUS_LBA_OUT_OF_RANGE`).
//! * Tokens are the caller's: a device echoes them and never interprets them.
//! * [`Bdev::poll`] is called on every turn of the engine; a device with work that only
//!   polling finishes (NVMe completions) says so through [`Bdev::busy`], so the engine keeps
//!   turning instead of sleeping.

use std::fmt::Debug;
use std::os::fd::BorrowedFd;
use std::time::Instant;

use duplex_ipc::pool::Pool;
pub use duplex_ipc::raid::JobKind;

use crate::uring::Uring;

mod checksum;
mod file;
pub mod intent;
mod journal;
mod missing;
mod nvme;
mod parity;
mod raid;

pub use checksum::{area_len as checksum_area_len, ChecksumBdev};
pub use file::FileBdev;
pub use intent::IntentSpec;
pub use missing::MissingBdev;
pub use nvme::NvmeBdev;
pub use parity::{JournalSpec, ParityBdev, ScrubStatus, WINDOW as PARITY_WINDOW};
pub use raid::{IntegrityCounts, MemberState, RaidBdev, RaidError, RaidLevel};

pub use crate::request::Kind as Op;

/// A device's long job as it stands (see [`Bdev::jobs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceJob {
    /// Rebuild or scrub.
    pub kind: JobKind,
    /// The member rebuilt (0 for a scrub).
    pub slot: u16,
    /// Member bytes done.
    pub done: u64,
    /// Member bytes in all.
    pub total: u64,
    /// Where the job started in this device (a rebuild resumed from a checkpoint).
    pub started_at: u64,
}

/// Which request chain an I/O's data is in, and where in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainRef {
    /// The engine's chain id (its request slot); meaningless for I/O without data.
    pub id: u32,
    /// Bytes of the chain before this I/O's first byte.
    pub skip: u64,
}

/// One I/O to a block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Io {
    /// The caller's token, echoed in its [`Done`].
    pub token: u64,
    /// What to do.
    pub op: Op,
    /// First byte on the device (0 for a flush).
    pub offset: u64,
    /// Bytes (0 for a flush).
    pub len: u64,
    /// Durable on completion (FUA).
    pub fua: bool,
    /// The data of a read or write.
    pub chain: ChainRef,
    /// A write's sequence number, stamped into the blocks' integrity records by drives with
    /// metadata (`crate::integrity`); RAID devices give both copies of a block the same one.
    /// 0: none given (the record then carries 1). On a read, [`REPORT_VERDICTS`] asks the
    /// device to keep each block's integrity verdict for [`Bdev::take_verdicts`].
    pub seq: u64,
}

/// In [`Io::seq`] of a read: keep the blocks' integrity verdicts (drives with metadata).
pub const REPORT_VERDICTS: u64 = u64::MAX;

/// The end of one I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// The token of the [`Io`].
    pub token: u64,
    /// Descriptor status (`STATUS_SUCCESS` or the error's).
    pub status: u16,
}

/// Something a device reports to the control plane (the engine keeps them for it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A RAID member failed and no longer takes I/O; the device goes on degraded (or, with no
    /// copy left, fails the I/O that needed it).
    MemberFailed {
        /// The RAID device.
        device: String,
        /// The member's index (its slot in the pool).
        member: usize,
        /// The member device's name.
        name: String,
        /// Why (the status of the I/O that failed).
        status: u16,
    },
}

/// Counters the leaves keep (the engine folds them into its stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BdevStats {
    /// Transfers that came back short and were continued.
    pub short_transfers: u64,
    /// Write-zeroes or deallocate requests done by writing zeroes.
    pub zero_writes: u64,
    /// Mirror reads retried on another member after a failure.
    pub read_retries: u64,
}

/// What a device needs from the engine while it works: the pool, the io_uring and its slots,
/// the completions routed to each leaf, the request chains, the clock, counters and events.
#[derive(Debug)]
pub struct Ctx<'a> {
    pub(crate) pool: &'a Pool,
    pub(crate) uring: &'a mut Uring,
    /// Free io_uring operation slots.
    pub(crate) uring_free: &'a mut Vec<u32>,
    /// Owner of each io_uring slot: `(leaf, the leaf's own operation index)`.
    pub(crate) uring_owner: &'a mut [(u32, u32)],
    /// io_uring completions per leaf: `(the leaf's operation index, result)`.
    pub(crate) inbox: &'a mut [Vec<(u32, i32)>],
    /// The chains of the requests in flight, by chain id.
    pub(crate) chains: &'a [Vec<u32>],
    /// The devices' own buffers (parity RAID), chain ids with [`SCRATCH_CHAIN`] set.
    pub(crate) scratch: &'a mut Scratch,
    pub(crate) now: Instant,
    pub(crate) stats: &'a mut BdevStats,
    pub(crate) events: &'a mut Vec<Event>,
    /// Write zeroes by writing a zero buffer, never `fallocate`.
    pub(crate) emulate_zeroes: bool,
}

impl Ctx<'_> {
    /// The chunks of chain `id` (empty if there is none: a bug the callers turn into an error).
    pub(crate) fn chain(&self, id: u32) -> &[u32] {
        chain_of(self.chains, self.scratch, id)
    }
}

/// The chunks of chain `id`: a request's, or (with [`SCRATCH_CHAIN`] set) a device's own.
pub(crate) fn chain_of<'b>(chains: &'b [Vec<u32>], scratch: &'b Scratch, id: u32) -> &'b [u32] {
    if id & SCRATCH_CHAIN != 0 {
        scratch
            .chains
            .get((id & !SCRATCH_CHAIN) as usize)
            .map_or(&[], Vec::as_slice)
    } else {
        chains.get(id as usize).map_or(&[], Vec::as_slice)
    }
}

/// Chain ids with this bit name a device's own buffers in [`Scratch`].
pub const SCRATCH_CHAIN: u32 = 1 << 31;

/// Pool chunks the engine keeps for the devices' own buffers (the old data and parity of a
/// parity RAID's read-modify-write), taken from the shared pool once, when the first device
/// that needs them is built, so that host I/O holding the pool can never starve them. A
/// device takes a chain of them for one operation and gives it back when the operation ends.
#[derive(Debug, Default)]
pub struct Scratch {
    chains: Vec<Vec<u32>>,
    free_ids: Vec<u32>,
    free_chunks: Vec<u32>,
    reserved: usize,
    chunk_size: usize,
}

impl Scratch {
    /// Tops the reserve up to `chunks` chunks from `pool`.
    pub fn reserve(&mut self, pool: &Pool, chunks: usize) -> Result<(), String> {
        self.chunk_size = pool.chunk_size();
        while self.reserved < chunks {
            let Some(h) = pool.alloc() else {
                return Err(format!(
                    "the buffer pool has no room for {chunks} chunks of parity buffers ({} taken): raise pool_chunks",
                    self.reserved
                ));
            };
            self.free_chunks.push(h.0);
            self.reserved += 1;
        }
        Ok(())
    }

    /// Chunks in the reserve.
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// A chain of at least `bytes` bytes, as a chain id; `None` while the reserve has too few
    /// free chunks (the caller waits for other operations to give theirs back).
    pub fn take(&mut self, bytes: u64) -> Option<u32> {
        let cs = self.chunk_size.max(1) as u64;
        let want = usize::try_from(bytes.div_ceil(cs).max(1)).ok()?;
        if want > self.free_chunks.len() {
            return None;
        }
        let chunks = self.free_chunks.split_off(self.free_chunks.len() - want);
        let i = match self.free_ids.pop() {
            Some(i) => {
                self.chains[i as usize] = chunks;
                i
            }
            None => {
                self.chains.push(chunks);
                u32::try_from(self.chains.len() - 1).ok()?
            }
        };
        Some(i | SCRATCH_CHAIN)
    }

    /// Whether a chain of `bytes` could ever be taken.
    pub fn fits(&self, bytes: u64) -> bool {
        bytes.div_ceil(self.chunk_size.max(1) as u64) <= self.reserved as u64
    }

    /// Gives chain `id` back.
    pub fn give(&mut self, id: u32) {
        let i = id & !SCRATCH_CHAIN;
        if let Some(c) = self.chains.get_mut(i as usize) {
            if !c.is_empty() {
                self.free_chunks.append(c);
                self.free_ids.push(i);
            }
        }
    }

    /// A chain of at least `bytes` bytes of fresh chunks from `pool`, outside the reserve,
    /// for a device to keep (give it back with [`Self::give_own`]); `None` if the pool has
    /// too few free chunks.
    pub fn take_own(&mut self, pool: &Pool, bytes: u64) -> Option<u32> {
        if self.chunk_size == 0 {
            self.chunk_size = pool.chunk_size();
        }
        let cs = self.chunk_size.max(1) as u64;
        let want = usize::try_from(bytes.div_ceil(cs).max(1)).ok()?;
        let mut chunks = Vec::with_capacity(want);
        for _ in 0..want {
            match pool.alloc() {
                Some(h) => chunks.push(h.0),
                None => {
                    for c in chunks {
                        let _ = pool.free_chunk(c);
                    }
                    return None;
                }
            }
        }
        let i = match self.free_ids.pop() {
            Some(i) => {
                self.chains[i as usize] = chunks;
                i
            }
            None => {
                self.chains.push(chunks);
                u32::try_from(self.chains.len() - 1).ok()?
            }
        };
        Some(i | SCRATCH_CHAIN)
    }

    /// Gives a chain from [`Self::take_own`] back to `pool`.
    pub fn give_own(&mut self, pool: &Pool, id: u32) {
        let i = id & !SCRATCH_CHAIN;
        if let Some(c) = self.chains.get_mut(i as usize) {
            if !c.is_empty() {
                for h in c.drain(..) {
                    let _ = pool.free_chunk(h);
                }
                self.free_ids.push(i);
            }
        }
    }

    /// The chunks of chain `id`.
    pub fn chain(&self, id: u32) -> &[u32] {
        chain_of(&[], self, id)
    }
}

/// Ids handed out before the engine's io_uring exists: a leaf id per leaf (its inbox) and a
/// fixed-file index per file the io_uring must know.
#[derive(Debug, Default)]
pub struct Attach {
    pub(crate) leaves: u32,
    pub(crate) files: u32,
}

impl Attach {
    /// A new leaf id.
    pub(crate) fn leaf(&mut self) -> u32 {
        self.leaves += 1;
        self.leaves - 1
    }

    /// The next fixed-file index.
    pub(crate) fn file(&mut self) -> u32 {
        self.files += 1;
        self.files - 1
    }
}

/// A block device. See the module docs for the contract.
pub trait Bdev: Debug + Send {
    /// Name, for logs and events.
    fn name(&self) -> &str;
    /// Logical block size in bytes.
    fn block_size(&self) -> u32;
    /// Usable size in bytes.
    fn size(&self) -> u64;
    /// Takes leaf ids and fixed-file indices (called once, before [`Bdev::files`]).
    fn attach(&mut self, ids: &mut Attach);
    /// Appends the fds of the fixed files it took, in the order it took them.
    fn files<'a>(&'a self, out: &mut Vec<BorrowedFd<'a>>);
    /// Starts an I/O; it ends in exactly one [`Done`] from a later [`Bdev::poll`].
    fn submit(&mut self, io: Io, ctx: &mut Ctx<'_>);
    /// Advances the device's work, appending the I/Os that ended to `out`. Returns whether
    /// anything moved.
    fn poll(&mut self, ctx: &mut Ctx<'_>, out: &mut Vec<Done>) -> bool;
    /// Whether work is in flight that only polling finishes (the engine must not sleep).
    fn busy(&self) -> bool;
    /// I/Os accepted and not yet reported done.
    fn inflight(&self) -> usize;
    /// Retried commands (NVMe leaves; composite devices sum their members).
    fn retries(&self) -> u64 {
        0
    }
    /// Blocks this device returned that failed their integrity check (NVMe drives formatted
    /// with metadata; 0 for the rest).
    fn integrity_errors(&self) -> u64 {
        0
    }
    /// Member `i`'s [`Bdev::integrity_errors`] (composite devices).
    fn member_integrity_errors(&self, _i: usize) -> u64 {
        0
    }
    /// Whether the blocks written through this device carry integrity records (a drive
    /// formatted with metadata; a RAID device, when all its present members do).
    fn carries_records(&self) -> bool {
        false
    }
    /// A mirror device with a committed write sequence mark: the numbers left below it
    /// (`None` for the rest).
    fn seq_headroom(&self) -> Option<u64> {
        None
    }
    /// A mirror device: raises the committed write sequence mark, which no write is numbered
    /// at or past (0: no limit; never lowered).
    fn set_seq_limit(&mut self, _limit: u64) {}
    /// The per-block integrity verdicts of the read that ended with `token`, asked for with
    /// [`REPORT_VERDICTS`] (drives with metadata; `None` for the rest or when not asked).
    fn take_verdicts(&mut self, _token: u64) -> Option<Vec<crate::integrity::Verdict>> {
        None
    }
    /// What a RAID device's integrity handling did (zeroes for the rest).
    fn integrity_counts(&self) -> IntegrityCounts {
        IntegrityCounts::default()
    }
    /// Block size and size of member `i` (composite devices).
    fn member_geometry(&self, _i: usize) -> Option<(u32, u64)> {
        None
    }
    /// Starts an I/O on member `i` itself, bypassing the device's geometry and redundancy (the
    /// metadata service's raw access to a pool's drives); it ends like any I/O of this device.
    /// `Err` gives the I/O back when there is no such member.
    fn submit_member(&mut self, _i: usize, io: Io, _ctx: &mut Ctx<'_>) -> Result<(), Io> {
        Err(io)
    }
    /// The failure of these members is recorded on disk (RAID devices release held writes).
    fn failures_recorded(&mut self, _members: &[usize]) {}
    /// The control plane recorded these members failed on its own (one failed a metadata
    /// commit, say): stop using them (RAID devices; a member is kept while it is its set's last
    /// active copy). Returns the members newly failed.
    fn fail_recorded(&mut self, _members: &[usize]) -> Vec<usize> {
        Vec::new()
    }
    /// Puts `dev` in slot `i` in place of a failed member, rebuilt by the device from byte
    /// `done` of the member's data area on (parity devices). Gives back the old member's
    /// device, or `dev` with the reason it was refused.
    fn replace_member(
        &mut self,
        i: usize,
        dev: BdevBox,
        _done: u64,
    ) -> Result<BdevBox, (BdevBox, String)> {
        Err((dev, format!("{} cannot replace member {i}", self.name())))
    }
    /// Starts checking every stripe's parity against its data, rewriting what disagrees
    /// (parity devices).
    fn start_scrub(&mut self) -> Result<(), String> {
        Err(format!("{} has no parity to scrub", self.name()))
    }
    /// The scrub in progress or last finished.
    fn scrub_status(&self) -> Option<ScrubStatus> {
        None
    }
    /// Completions held back until a member failure is recorded (RAID devices).
    /// The device's long jobs (a rebuild, a scrub) as they stand, for the raid service.
    fn jobs(&self, _out: &mut Vec<DeviceJob>) {}

    /// Host I/Os submitted to the device so far (a count that only grows; 0 if not counted).
    fn host_ios(&self) -> u64 {
        0
    }

    /// Lets the device's job of `kind` start work only below member byte `limit` (the raid
    /// service's grant; unlimited until one is set).
    fn set_job_limit(&mut self, _kind: JobKind, _limit: u64) {}

    fn held(&self) -> usize {
        0
    }
    /// Members' states (RAID devices; empty for a leaf).
    fn member_states(&self) -> Vec<MemberState> {
        Vec::new()
    }
    /// Whether nothing of this device is out, its own work on the devices under it included
    /// (a RAID device's rebuild and scrub I/O, a checksum layer's entry writes and flushes):
    /// it may be taken apart.
    fn idle(&self) -> bool {
        self.inflight() == 0
    }
    /// Gives back every buffer of the scratch reserve the device holds for its own work (a
    /// parity journal's marker, a scrub window's reads): called before it is taken apart.
    fn release_buffers(&mut self, _scratch: &mut Scratch) {}
    /// Gives up the members (RAID devices, when idle), in slot order.
    fn into_members(self: Box<Self>) -> Vec<BdevBox> {
        Vec::new()
    }
    /// Appends the NVMe drives under this device (itself, or its members'), for the work the
    /// engine does on drives outside the I/O path: the disk heartbeat and fencing.
    fn drives_mut<'a>(&'a mut self, _out: &mut Vec<&'a mut crate::drives::Drive>) {}

    /// A member wrapped for a pool ([`ChecksumBdev`]): the drive it wraps, taken out (the
    /// wrapper is left with nothing and dropped), its buffers given back; the device must be
    /// idle. `None` for any other device.
    fn take_checksum_inner(&mut self, _pool: &Pool, _scratch: &mut Scratch) -> Option<BdevBox> {
        None
    }
}

/// A boxed block device.
pub type BdevBox = Box<dyn Bdev>;

/// Checks an I/O against a device's geometry: whole blocks inside the device.
pub(crate) fn in_range(io: &Io, block_size: u32, size: u64) -> bool {
    let bs = u64::from(block_size);
    io.op == Op::Flush
        || io.offset % bs == 0
            && io.len % bs == 0
            && io.offset.checked_add(io.len).is_some_and(|end| end <= size)
}

/// Why device `dev` cannot take the place of member `i` of a RAID device (`None`: it can):
/// the member must be failed (`state`) with nothing in flight to it (`busy`), and `dev` must
/// have the members' `block_size` and at least `need` bytes (the data area's end).
pub(crate) fn replacement_refused(
    i: usize,
    state: Option<MemberState>,
    busy: bool,
    dev: &dyn Bdev,
    block_size: u32,
    need: u64,
) -> Option<String> {
    match state {
        None => return Some(format!("no member {i}")),
        Some(MemberState::Failed) => {}
        Some(s) => {
            return Some(format!(
                "member {i} is {s:?}: only a failed member is replaced"
            ))
        }
    }
    if busy {
        return Some(format!("member {i} still has I/O in flight"));
    }
    if dev.block_size() != block_size || dev.size() < need {
        return Some(format!(
            "{} has {}-byte blocks and {} bytes; the pool needs {}-byte blocks and {} bytes",
            dev.name(),
            dev.block_size(),
            dev.size(),
            block_size,
            need
        ));
    }
    None
}

/// Integrity errors a member may return in an hour before its RAID device fails it: a drive
/// that keeps returning data its records disown is failing (ZFS degrades a vdev at 10 checksum
/// errors in 10 minutes, md a member at 20 corrected read errors, halved hourly; this is more
/// lenient: every bad block is healed anyway, and a scrub of a drive with scattered rot must
/// not fail it).
pub const MAX_BAD_READS: u32 = 100;

/// One member's integrity errors, md-style: the count halves every hour.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BadReads {
    count: u32,
    since: Option<std::time::Instant>,
}

impl BadReads {
    /// One more at `now`; whether the member is now past [`MAX_BAD_READS`].
    pub(crate) fn note(&mut self, now: std::time::Instant) -> bool {
        const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);
        let since = *self.since.get_or_insert(now);
        let hours = now.saturating_duration_since(since).as_secs() / HOUR.as_secs();
        if hours > 0 {
            self.count = self
                .count
                .checked_shr(u32::try_from(hours).unwrap_or(u32::MAX))
                .unwrap_or(0);
            self.since = Some(now);
        }
        self.count = self.count.saturating_add(1);
        self.count > MAX_BAD_READS
    }

    /// The count now.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }
}
