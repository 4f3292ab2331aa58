//! The drive both ports share: backing file, volatile write cache, reservation state, fault
//! table, power state, and the per-controller records a controller on one port must reach from
//! the other (host identifier, outstanding delayed commands, reservation notifications).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use duplex_nvme::cmd::Sqe;
use duplex_nvme::resv::{HostId, NoticeKind, Reservations};
use duplex_nvme::spec::io;
use duplex_nvme::status::Status;
use serde::{Deserialize, Serialize};

/// Largest number of I/O queue pairs a controller may offer: BAR0 ([`crate::BAR0_SIZE`]) holds
/// the doorbells of the admin queue and this many I/O queues at stride 4.
pub const MAX_IO_QUEUES: u16 = 1535;

/// Largest MDTS accepted (2^16 pages of 4 KiB = 256 MiB, the largest a single Read or Write can
/// move anyway).
pub const MAX_MDTS: u8 = 16;

/// What the simulated drive is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DriveConfig {
    /// Logical block size in bytes: 512 or 4096.
    pub block_size: u32,
    /// Namespace size in logical blocks (NSZE = NCAP = NUSE).
    pub blocks: u64,
    /// Volatile write cache capacity in blocks; 0 = no cache (write-through, VWC not present).
    pub cache_blocks: usize,
    /// Serial number (up to 20 ASCII characters).
    pub serial: String,
    /// Model number (up to 40 ASCII characters).
    pub model: String,
    /// Namespace Globally Unique Identifier (all zero: not reported).
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier (all zero: not reported).
    pub eui64: [u8; 8],
    /// I/O queue pairs per controller, 1 to [`MAX_IO_QUEUES`].
    pub max_queues: u16,
    /// Maximum entries of an I/O queue (at least 2); CAP.MQES reports `mqes - 1`.
    pub mqes: u16,
    /// Maximum data transfer size as a power of two of 4 KiB pages (0: no limit beyond the
    /// commands' own, at most [`MAX_MDTS`]).
    pub mdts: u8,
    /// Metadata bytes per logical block of the namespace's LBA format: 0, 8 or 64 (one of
    /// [`METADATA_SIZES`]). Transferred through a separate buffer (the command's MPTR); kept
    /// with its block, through the write cache and its losses.
    pub metadata_size: u16,
}

/// The metadata sizes of the LBA formats the drive offers (LBAF 0, 1, 2), each with the
/// configured block size.
pub const METADATA_SIZES: [u16; 3] = [0, 8, 64];

impl Default for DriveConfig {
    fn default() -> Self {
        Self {
            block_size: 4096,
            blocks: 65536,
            cache_blocks: 1024,
            serial: "DPLXSIM0000000000001".into(),
            model: "duplex drive-sim dual-port".into(),
            nguid: *b"duplex-drive-sim",
            eui64: [0x00, 0x1d, 0x1d, 0x00, 0x00, 0x00, 0x00, 0x01],
            max_queues: 16,
            mqes: 1024,
            mdts: 5,
            metadata_size: 0,
        }
    }
}

impl DriveConfig {
    fn validate(&self) -> Result<(), DriveError> {
        let bad = |m: &str| Err(DriveError::Config(m.to_owned()));
        if self.block_size != 512 && self.block_size != 4096 {
            return bad("block_size must be 512 or 4096");
        }
        let max_blocks = (i64::MAX as u64) / u64::from(self.block_size);
        if self.blocks == 0 || self.blocks > max_blocks {
            return bad("blocks must be at least 1 and the capacity fit a file offset");
        }
        if self.max_queues == 0 || self.max_queues > MAX_IO_QUEUES {
            return bad("max_queues must be 1 to MAX_IO_QUEUES");
        }
        if self.mqes < 2 {
            return bad("mqes must be at least 2");
        }
        if self.mdts > MAX_MDTS {
            return bad("mdts must be at most MAX_MDTS");
        }
        if !METADATA_SIZES.contains(&self.metadata_size) {
            return bad("metadata_size must be 0, 8 or 64");
        }
        Ok(())
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }

    /// The index of the current LBA format (FLBAS).
    pub fn lba_format(&self) -> u8 {
        METADATA_SIZES
            .iter()
            .position(|&m| m == self.metadata_size)
            .map_or(0, |i| i as u8)
    }
}

/// Why a drive could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The configuration is not one the simulator supports.
    #[error("invalid drive configuration: {0}")]
    Config(String),
    /// The backing file could not be sized or accessed.
    #[error("backing file: {0}")]
    Io(#[from] std::io::Error),
}

/// What a power cut destroyed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PowerCutReport {
    /// Blocks that were in the volatile write cache (acknowledged, never written to the file).
    pub lost_blocks: u64,
}

/// Which commands a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultOp {
    /// Read and Compare.
    Read,
    /// Write, Write Zeroes and Dataset Management.
    Write,
    /// Flush.
    Flush,
    /// All of the above (never the reservation commands nor admin commands).
    Any,
}

/// The command groups faults distinguish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpGroup {
    Read,
    Write,
    Flush,
}

impl OpGroup {
    /// The group of an NVM command set opcode; `None` for commands faults never touch.
    pub(crate) fn of(opcode: u8) -> Option<Self> {
        match opcode {
            io::READ | io::COMPARE => Some(Self::Read),
            io::WRITE | io::WRITE_ZEROES | io::DSM => Some(Self::Write),
            io::FLUSH => Some(Self::Flush),
            _ => None,
        }
    }
}

impl FaultOp {
    fn matches(self, g: OpGroup) -> bool {
        matches!(
            (self, g),
            (Self::Any, _)
                | (Self::Read, OpGroup::Read)
                | (Self::Write, OpGroup::Write)
                | (Self::Flush, OpGroup::Flush)
        )
    }
}

/// An injected fault. Faults are drive-wide (both ports) and act on NVM I/O commands only; a
/// command's LBA range is `SLBA..=SLBA+NLB-1` (Dataset Management: its deallocated ranges;
/// Flush: the whole namespace). Timing faults (`latency`, `stall`) are decided when a command is
/// fetched; the others when it executes (after any delay).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// A command of `op` whose range intersects `first_lba..=last_lba` completes with `status`
    /// (`SCT << 8 | SC`, plus Do Not Retry if `dnr`) and transfers nothing: a write changes
    /// nothing, a read leaves the host buffer untouched. `remaining` counts the commands it
    /// still fails (removed at zero); `None` fails them until cleared. When several match, the
    /// oldest fault applies.
    Error {
        /// Commands affected.
        op: FaultOp,
        /// First LBA of the range.
        first_lba: u64,
        /// Last LBA of the range (inclusive).
        last_lba: u64,
        /// Status to report: status code type in bits 10:8, status code in bits 7:0.
        status: u16,
        /// Set Do Not Retry.
        #[serde(default)]
        dnr: bool,
        /// Commands still to fail; `None`: until cleared.
        #[serde(default)]
        remaining: Option<u32>,
    },
    /// Commands of `op` fetched while this fault exists complete `micros` later: they execute
    /// (transfer data, change the medium) only then, so an Abort, a Preempt and Abort, a queue
    /// deletion, a controller reset or a power cut before then prevents them. Latencies of
    /// several matching faults add up.
    Latency {
        /// Commands affected.
        op: FaultOp,
        /// Added latency in microseconds.
        micros: u64,
    },
    /// Commands of `op` fetched while this fault exists never complete, until the fault is
    /// cleared (they then execute at the controller's next `process`), or they are aborted
    /// (Abort command, Preempt and Abort), their queue is deleted, their controller reset, or
    /// the drive loses power (which drops them without completions). Stall wins over latency.
    Stall {
        /// Commands affected.
        op: FaultOp,
    },
    /// The next Write or Write Zeroes whose range intersects `first_lba..=last_lba` writes only
    /// the first `keep_bytes` bytes of its data straight to the file (a whole block or part of
    /// one), then the drive loses power exactly as [`Drive::power_cut`]: the command never
    /// completes and the cache is lost. One-shot: the fault is removed when it fires.
    TornWrite {
        /// First LBA of the range.
        first_lba: u64,
        /// Last LBA of the range (inclusive).
        last_lba: u64,
        /// Bytes of the write that reach the medium.
        keep_bytes: u64,
    },
    /// Flush completes successfully without destaging the cache, and a FUA write is cached like
    /// any other write, so a later power cut loses data the host was told is durable.
    /// (Shutdown notifications and disabling the cache still destage.)
    LyingFlush,
    /// The firmware hangs: no controller of the drive fetches or completes any command (admin
    /// included; registers still answer) until one of them goes through a Controller Level
    /// Reset (CC.EN 1 → 0), which reboots the firmware and removes this fault. Commands
    /// outstanding when the hang started are lost with the reset, as on a real drive. What a
    /// driver's timeout → Abort → reset escalation is for.
    Hang,
    /// A Write whose range intersects `first_lba..=last_lba` completes successfully and is
    /// counted as executed, but changes nothing: the data never reaches the medium (a drive
    /// that lies). Until cleared. What makes a node's disk heartbeat stop for its peer while
    /// the node believes it goes on: the lost heartbeat of issue 15's row 6.
    LostWrite {
        /// First LBA of the range.
        first_lba: u64,
        /// Last LBA of the range (inclusive).
        last_lba: u64,
    },
    /// Reads and Compares see blocks in `first_lba..=last_lba` with bit `bit` of each block
    /// (bit `bit % 8` of byte `bit / 8`, taken modulo the block size in bits) inverted; the
    /// medium is unchanged.
    BitFlip {
        /// First LBA of the range.
        first_lba: u64,
        /// Last LBA of the range (inclusive).
        last_lba: u64,
        /// Bit index within each block.
        bit: u32,
    },
}

/// A callback the drive invokes (without holding its lock) when it creates work for a
/// controller from outside that controller: another port's Preempt and Abort aborted its
/// commands or queued a reservation notification for it, a cleared stall released its commands,
/// or the power came back. The glue wakes the port's thread, which calls
/// [`crate::Controller::process`].
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// When a delayed command may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// At this time.
    Until(Instant),
    /// When the stall fault with this id is cleared.
    Stall(u64),
    /// At the next `process`.
    Ready,
}

/// A command fetched but not completed: delayed by a latency or stall fault.
#[derive(Clone, Debug)]
pub(crate) struct Pending {
    /// Fetch order.
    pub seq: u64,
    pub sqid: u16,
    pub sqe: Sqe,
    pub wait: Wait,
    /// Set when another party aborted it: complete with this status without executing.
    pub aborted: Option<Status>,
}

/// What a controller shares with the drive.
#[derive(Default)]
pub(crate) struct CtrlShared {
    /// Host Identifier (all zero: not set).
    pub host: HostId,
    /// The host identifier was set as 128 bits (EXHID).
    pub host_ext: bool,
    /// Reservation Notification Mask (feature 82h) for namespace 1: bit n masks log page type n.
    pub resv_mask: u32,
    /// Delayed commands.
    pub pending: Vec<Pending>,
    /// Reservation Notification log pages not yet read: (log page count, type).
    pub notices: VecDeque<(u64, NoticeKind)>,
    /// Last log page count used.
    pub notice_count: u64,
    /// A notice was queued since the controller last looked (raise the AEN).
    pub resv_event: bool,
    pub waker: Option<Waker>,
}

impl CtrlShared {
    /// Controller Level Reset or power loss: everything but the waker.
    pub fn reset(&mut self) {
        let waker = self.waker.take();
        *self = Self {
            waker,
            ..Self::default()
        };
    }
}

/// Most reservation notification pages kept per controller (the log page's Number of
/// Available Log Pages is one byte).
const MAX_NOTICES: usize = 255;

/// SMART counters.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Stats {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub reads: u64,
    pub writes: u64,
    pub media_errors: u64,
}

/// The writes one port's controller made reach the medium (or the cache): how many, and the
/// drive-wide sequence number of the last. A fencing test records the drive's sequence when
/// it preempts a node, then checks that port's `last_seq` never passes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PortWrites {
    /// The port's controller id (port index + 1).
    pub cntlid: u16,
    /// Writes, Write Zeroes and deallocations executed (torn ones included).
    pub writes: u64,
    /// The drive-wide sequence number of the last of them (0: none yet).
    pub last_seq: u64,
}

/// A Reservation Acquire that removed registrations (Preempt, Preempt and Abort): who did it,
/// whose registrations went, and the drive-wide write sequence then. No write of a preempted
/// controller may carry a later sequence number (until it registers again).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PreemptRecord {
    /// The controller that issued the Acquire.
    pub by_cntlid: u16,
    /// The controllers whose registrations it removed.
    pub victims: Vec<u16>,
    /// The drive's `write_seq` when it completed.
    pub write_seq: u64,
    /// Its number among every preempt the drive recorded (1 for the first): the list keeps
    /// only the newest, this says which they are.
    pub seq: u64,
}

/// How many [`PreemptRecord`]s a drive keeps (the newest).
pub const PREEMPT_RECORDS: usize = 64;

/// The volatile write cache: block contents by LBA, destaged oldest first when full.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    capacity: usize,
    blocks: HashMap<u64, (u64, Vec<u8>)>,
    order: BTreeMap<u64, u64>,
    next: u64,
}

impl Cache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    fn get(&self, lba: u64) -> Option<&[u8]> {
        self.blocks.get(&lba).map(|(_, b)| b.as_slice())
    }

    /// Caches `data` for `lba` as the newest block; returns the blocks evicted to make room.
    fn insert(&mut self, lba: u64, data: Vec<u8>) -> Vec<(u64, Vec<u8>)> {
        if let Some((seq, _)) = self.blocks.remove(&lba) {
            self.order.remove(&seq);
        }
        let seq = self.next;
        self.next += 1;
        self.blocks.insert(lba, (seq, data));
        self.order.insert(seq, lba);
        let mut out = Vec::new();
        while self.blocks.len() > self.capacity {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, b)) = self.blocks.remove(&old) {
                out.push((old, b));
            }
        }
        out
    }

    /// Forgets the cached blocks in `lba..lba + n`.
    fn remove_range(&mut self, lba: u64, n: u64) {
        let end = lba.saturating_add(n);
        if n > self.blocks.len() as u64 {
            let gone: Vec<u64> = self
                .blocks
                .keys()
                .copied()
                .filter(|l| (lba..end).contains(l))
                .collect();
            for l in gone {
                if let Some((seq, _)) = self.blocks.remove(&l) {
                    self.order.remove(&seq);
                }
            }
        } else {
            for l in lba..end {
                if let Some((seq, _)) = self.blocks.remove(&l) {
                    self.order.remove(&seq);
                }
            }
        }
    }

    /// Takes every block, in LBA order.
    fn drain(&mut self) -> Vec<(u64, Vec<u8>)> {
        self.order.clear();
        let mut v: Vec<(u64, Vec<u8>)> = self.blocks.drain().map(|(l, (_, b))| (l, b)).collect();
        v.sort_unstable_by_key(|(l, _)| *l);
        v
    }

    /// Drops everything; returns how many blocks were lost.
    fn clear(&mut self) -> usize {
        let n = self.blocks.len();
        self.blocks.clear();
        self.order.clear();
        n
    }
}

/// The drive's mutable state, behind [`Drive`]'s mutex.
pub(crate) struct DriveState {
    file: File,
    /// Block size and count (copies of the configuration).
    pub bs: u64,
    pub blocks: u64,
    /// Metadata bytes per block; the metadata of block `l` lives at `capacity + l × ms` in
    /// the file, and a cached block holds its data and then its metadata.
    pub ms: u64,
    cache_blocks: usize,
    pub cache: Cache,
    /// Volatile Write Cache feature: enabled.
    pub vwc: bool,
    pub resv: Reservations,
    faults: BTreeMap<u64, Fault>,
    next_fault: u64,
    pub powered: bool,
    pub present: bool,
    /// Incremented by every power loss; controllers compare it with the one they saw.
    pub epoch: u64,
    pub ctrls: BTreeMap<u16, CtrlShared>,
    pub stats: Stats,
    /// Writes executed, drive-wide (the sequence [`PortWrites::last_seq`] counts in).
    pub write_seq: u64,
    /// Writes per port's controller, by controller id.
    pub port_writes: BTreeMap<u16, PortWrites>,
    /// The newest preempts (at most [`PREEMPT_RECORDS`]), oldest first.
    pub preempts: std::collections::VecDeque<PreemptRecord>,
    /// Preempts recorded since the drive started.
    preempts_total: u64,
    next_seq: u64,
    powered_since: Instant,
    /// Controllers to wake once the lock is released.
    wake: Vec<u16>,
}

impl DriveState {
    /// Counts a write by controller `cntlid` (it reached the medium or the cache).
    pub(crate) fn record_write(&mut self, cntlid: u16) {
        self.write_seq += 1;
        let seq = self.write_seq;
        let w = self.port_writes.entry(cntlid).or_insert(PortWrites {
            cntlid,
            ..PortWrites::default()
        });
        w.writes += 1;
        w.last_seq = seq;
    }

    /// Records that controller `by` removed the registrations of `victims`.
    pub(crate) fn record_preempt(&mut self, by: u16, victims: Vec<u16>) {
        if self.preempts.len() == PREEMPT_RECORDS {
            self.preempts.pop_front();
        }
        self.preempts_total += 1;
        self.preempts.push_back(PreemptRecord {
            by_cntlid: by,
            victims,
            write_seq: self.write_seq,
            seq: self.preempts_total,
        });
    }

    /// Whether a lost-write fault covers any block of `first..=last`.
    pub(crate) fn lost_write(&self, first: u64, last: u64) -> bool {
        self.faults.values().any(|f| {
            matches!(f, Fault::LostWrite { first_lba, last_lba } if *first_lba <= last && first <= *last_lba)
        })
    }

    /// The shared record of controller `cntlid` (created if missing).
    pub fn ctrl(&mut self, cntlid: u16) -> &mut CtrlShared {
        self.ctrls.entry(cntlid).or_default()
    }

    /// Asks for controller `cntlid` to be woken when the lock is released.
    pub fn wake(&mut self, cntlid: u16) {
        if !self.wake.contains(&cntlid) {
            self.wake.push(cntlid);
        }
    }

    /// The wakers to call after unlocking.
    pub fn take_wakers(&mut self) -> Vec<Waker> {
        let ids = std::mem::take(&mut self.wake);
        ids.iter()
            .filter_map(|id| self.ctrls.get(id).and_then(|c| c.waker.clone()))
            .collect()
    }

    /// The next fetch sequence number.
    pub fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Whether writes are cached.
    pub fn caching(&self) -> bool {
        self.vwc && self.cache_blocks > 0
    }

    pub fn cache_present(&self) -> bool {
        self.cache_blocks > 0
    }

    /// Hours since power on (SMART).
    pub fn power_on_hours(&self) -> u64 {
        self.powered_since.elapsed().as_secs() / 3600
    }

    // --- faults ---

    /// How long a command of group `g` fetched at `now` waits: the oldest matching stall, else
    /// the sum of matching latencies; `None` if it runs at once.
    pub fn delay_for(&self, g: OpGroup, now: Instant) -> Option<Wait> {
        let mut micros: u64 = 0;
        for (id, f) in &self.faults {
            match f {
                Fault::Stall { op } if op.matches(g) => return Some(Wait::Stall(*id)),
                Fault::Latency { op, micros: m } if op.matches(g) => {
                    micros = micros.saturating_add(*m);
                }
                _ => {}
            }
        }
        if micros == 0 {
            return None;
        }
        // A latency beyond what Instant can represent is a stall in all but name.
        Some(
            now.checked_add(Duration::from_micros(micros))
                .map_or(Wait::Stall(u64::MAX), Wait::Until),
        )
    }

    /// The oldest stall fault still matching `g`, if any.
    fn stall_for(&self, g: OpGroup) -> Option<u64> {
        self.faults.iter().find_map(|(id, f)| match f {
            Fault::Stall { op } if op.matches(g) => Some(*id),
            _ => None,
        })
    }

    /// Consumes one use of the oldest Error fault matching `g` and any of `ranges` (inclusive
    /// LBA ranges) and returns its status.
    pub fn take_error(&mut self, g: OpGroup, ranges: &[(u64, u64)]) -> Option<Status> {
        let hit = self.faults.iter().find_map(|(id, f)| match f {
            Fault::Error {
                op,
                first_lba,
                last_lba,
                remaining,
                ..
            } if op.matches(g)
                && *remaining != Some(0)
                && (g == OpGroup::Flush
                    || ranges
                        .iter()
                        .any(|&(a, b)| *first_lba <= b && a <= *last_lba)) =>
            {
                Some(*id)
            }
            _ => None,
        })?;
        let mut remove = false;
        let mut status = None;
        if let Some(Fault::Error {
            status: s,
            dnr,
            remaining,
            ..
        }) = self.faults.get_mut(&hit)
        {
            let st = Status(*s & 0x7FF);
            status = Some(if *dnr { st.dnr() } else { st });
            if let Some(r) = remaining {
                *r = r.saturating_sub(1);
                remove = *r == 0;
            }
        }
        if remove {
            self.faults.remove(&hit);
        }
        if status.is_some_and(|s| s.sct() == 2) {
            self.stats.media_errors += 1;
        }
        status
    }

    /// Removes and returns the `keep_bytes` of the oldest torn-write fault matching the range.
    pub fn take_torn(&mut self, first: u64, last: u64) -> Option<u64> {
        let (id, keep) = self.faults.iter().find_map(|(id, f)| match f {
            Fault::TornWrite {
                first_lba,
                last_lba,
                keep_bytes,
            } if *first_lba <= last && first <= *last_lba => Some((*id, *keep_bytes)),
            _ => None,
        })?;
        self.faults.remove(&id);
        Some(keep)
    }

    /// Whether a hang fault is active.
    pub fn hung(&self) -> bool {
        self.faults.values().any(|f| matches!(f, Fault::Hang))
    }

    /// A controller reset reboots a hung firmware: removes every hang fault.
    pub fn clear_hang(&mut self) {
        self.faults.retain(|_, f| !matches!(f, Fault::Hang));
    }

    /// Whether a lying-flush fault is active.
    pub fn lying_flush(&self) -> bool {
        self.faults.values().any(|f| matches!(f, Fault::LyingFlush))
    }

    /// Applies bit-flip faults to `data`, the contents of blocks from `lba`.
    pub fn flip_bits(&self, lba: u64, data: &mut [u8]) {
        let Ok(bs) = usize::try_from(self.bs) else {
            return;
        };
        for f in self.faults.values() {
            let Fault::BitFlip {
                first_lba,
                last_lba,
                bit,
            } = f
            else {
                continue;
            };
            let bit = u64::from(*bit) % (self.bs * 8);
            for (i, block) in data.chunks_mut(bs).enumerate() {
                let l = lba.saturating_add(i as u64);
                if (*first_lba..=*last_lba).contains(&l) {
                    let byte = usize::try_from(bit / 8).unwrap_or(usize::MAX);
                    if let Some(b) = block.get_mut(byte) {
                        *b ^= 1 << (bit % 8);
                    }
                }
            }
        }
    }

    // --- medium ---

    fn offset(&self, lba: u64) -> std::io::Result<u64> {
        lba.checked_mul(self.bs)
            .ok_or_else(|| std::io::Error::other("LBA beyond any file offset"))
    }

    fn md_offset(&self, lba: u64) -> std::io::Result<u64> {
        lba.checked_mul(self.ms)
            .and_then(|o| o.checked_add(self.blocks.checked_mul(self.bs)?))
            .ok_or_else(|| std::io::Error::other("LBA beyond any file offset"))
    }

    /// Reads `n` blocks from `lba` as a host would see them (cache first). The caller checked
    /// the range.
    pub fn read_blocks(&mut self, lba: u64, n: u64) -> std::io::Result<Vec<u8>> {
        let len = n
            .checked_mul(self.bs)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| std::io::Error::other("read too large"))?;
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, self.offset(lba)?)?;
        if self.cache.len() > 0 {
            let bs = usize::try_from(self.bs).unwrap_or(4096);
            for (i, block) in buf.chunks_mut(bs).enumerate() {
                if let Some(c) = self.cache.get(lba.saturating_add(i as u64)) {
                    if let Some(d) = c.get(..bs) {
                        block.copy_from_slice(d);
                    }
                }
            }
        }
        Ok(buf)
    }

    /// Reads the metadata of `n` blocks from `lba` as a host would see it (cache first).
    pub fn read_metadata(&mut self, lba: u64, n: u64) -> std::io::Result<Vec<u8>> {
        let len = n
            .checked_mul(self.ms)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| std::io::Error::other("read too large"))?;
        let mut buf = vec![0u8; len];
        if len == 0 {
            return Ok(buf);
        }
        self.file.read_exact_at(&mut buf, self.md_offset(lba)?)?;
        if self.cache.len() > 0 {
            let (bs, ms) = (
                usize::try_from(self.bs).unwrap_or(4096),
                usize::try_from(self.ms).unwrap_or(0),
            );
            for (i, m) in buf.chunks_mut(ms).enumerate() {
                if let Some(c) = self.cache.get(lba.saturating_add(i as u64)) {
                    if let Some(d) = c.get(bs..bs + ms) {
                        m.copy_from_slice(d);
                    }
                }
            }
        }
        Ok(buf)
    }

    /// Writes one cached block (its data, then its metadata) to the file.
    fn store(&self, lba: u64, b: &[u8]) -> std::io::Result<()> {
        let bs = usize::try_from(self.bs).unwrap_or(4096);
        self.file
            .write_all_at(b.get(..bs).unwrap_or(b), self.offset(lba)?)?;
        if let Some(md) = b.get(bs..).filter(|m| !m.is_empty()) {
            self.file.write_all_at(md, self.md_offset(lba)?)?;
        }
        Ok(())
    }

    /// Reads `n` blocks at `lba` from the file only.
    pub fn read_file(&self, lba: u64, n: u64) -> std::io::Result<Vec<u8>> {
        let len = n
            .checked_mul(self.bs)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| std::io::Error::other("read too large"))?;
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, self.offset(lba)?)?;
        Ok(buf)
    }

    /// Writes whole blocks from `lba`: into the cache, or straight to the file (dropping any
    /// stale cached copies) when `through` or the cache is off.
    pub fn write_blocks(&mut self, lba: u64, data: &[u8], through: bool) -> std::io::Result<()> {
        let zero =
            vec![0u8; usize::try_from(self.ms).unwrap_or(0) * data.len() / self.bs.max(1) as usize];
        self.write_blocks_md(lba, data, &zero, through)
    }

    /// [`DriveState::write_blocks`] with each block's metadata (`md`: `ms` bytes a block).
    pub fn write_blocks_md(
        &mut self,
        lba: u64,
        data: &[u8],
        md: &[u8],
        through: bool,
    ) -> std::io::Result<()> {
        let bs = usize::try_from(self.bs).unwrap_or(4096);
        let ms = usize::try_from(self.ms).unwrap_or(0);
        let n = (data.len() / bs) as u64;
        if through || !self.caching() {
            self.cache.remove_range(lba, n);
            self.file.write_all_at(data, self.offset(lba)?)?;
            if ms > 0 {
                self.file.write_all_at(md, self.md_offset(lba)?)?;
            }
            return Ok(());
        }
        for (i, block) in data.chunks_exact(bs).enumerate() {
            let mut b = Vec::with_capacity(bs + ms);
            b.extend_from_slice(block);
            b.extend_from_slice(md.get(i * ms..(i + 1) * ms).unwrap_or(&[]));
            b.resize(bs + ms, 0);
            let evicted = self.cache.insert(lba.saturating_add(i as u64), b);
            for (l, b) in evicted {
                self.store(l, &b)?;
            }
        }
        Ok(())
    }

    /// Writes zeroes to `n` blocks from `lba`, in bounded chunks.
    pub fn zero_blocks(&mut self, lba: u64, n: u64, through: bool) -> std::io::Result<()> {
        const CHUNK: u64 = 64;
        let zero = vec![0u8; usize::try_from(CHUNK * self.bs).unwrap_or(0)];
        let mut done = 0;
        while done < n {
            let k = (n - done).min(CHUNK);
            let len = usize::try_from(k * self.bs).unwrap_or(0);
            let chunk = zero.get(..len).unwrap_or(&[]);
            self.write_blocks(lba + done, chunk, through)?;
            done += k;
        }
        Ok(())
    }

    /// Writes raw bytes at byte offset `lba * bs` straight to the file (torn writes).
    pub fn write_raw(&mut self, lba: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, self.offset(lba)?)
    }

    /// Writes every cached block to the file.
    pub fn destage(&mut self) -> std::io::Result<()> {
        let mut result = Ok(());
        for (lba, b) in self.cache.drain() {
            let r = self.store(lba, &b);
            if result.is_ok() {
                result = r;
            }
        }
        // The file is the medium: what reached it survives a simulated power cut. (No fsync:
        // the simulator's durability model does not include the host it runs on crashing.)
        result
    }

    /// Disables or enables the volatile write cache (disabling destages first).
    pub fn set_vwc(&mut self, on: bool) -> std::io::Result<()> {
        if !on {
            self.destage()?;
        }
        self.vwc = on;
        Ok(())
    }

    /// Power loss: the cache, delayed commands, reservations and every controller's shared
    /// state are gone; controllers reset themselves when they next see the new epoch.
    pub fn power_cut(&mut self) -> PowerCutReport {
        let lost = self.cache.clear() as u64;
        self.powered = false;
        self.epoch += 1;
        self.resv = Reservations::new();
        self.vwc = self.cache_blocks > 0;
        let ids: Vec<u16> = self.ctrls.keys().copied().collect();
        for (_, c) in self.ctrls.iter_mut() {
            c.reset();
        }
        for id in ids {
            self.wake(id);
        }
        tracing::info!(lost_blocks = lost, "drive power cut");
        PowerCutReport { lost_blocks: lost }
    }

    /// Releases commands stalled by fault `id` (moving them to another matching stall fault
    /// if one remains).
    fn release_stalled(&mut self, id: u64) {
        let mut moves: Vec<(u16, usize, Wait)> = Vec::new();
        for (cntlid, c) in &self.ctrls {
            for (i, p) in c.pending.iter().enumerate() {
                if p.wait == Wait::Stall(id) {
                    let next = OpGroup::of(p.sqe.opcode)
                        .and_then(|g| self.stall_for(g))
                        .map_or(Wait::Ready, Wait::Stall);
                    moves.push((*cntlid, i, next));
                }
            }
        }
        for (cntlid, i, w) in moves {
            if let Some(p) = self
                .ctrls
                .get_mut(&cntlid)
                .and_then(|c| c.pending.get_mut(i))
            {
                p.wait = w;
            }
            if w == Wait::Ready {
                self.wake(cntlid);
            }
        }
    }

    /// Queues a reservation notification for every controller whose host is `host`, unless
    /// its mask hides that type.
    pub fn notify(&mut self, host: HostId, kind: NoticeKind) {
        if host == HostId::default() {
            return;
        }
        let mut woken = Vec::new();
        for (id, c) in self.ctrls.iter_mut() {
            if c.host != host || c.resv_mask & (1 << (kind as u32)) != 0 {
                continue;
            }
            c.notice_count = c.notice_count.wrapping_add(1);
            if c.notice_count == 0 {
                c.notice_count = 1;
            }
            if c.notices.len() < MAX_NOTICES {
                c.notices.push_back((c.notice_count, kind));
            }
            c.resv_event = true;
            woken.push(*id);
        }
        for id in woken {
            self.wake(id);
        }
    }

    /// Preempt and Abort: marks every delayed command of every controller of `host` aborted
    /// with `status`; they complete (without executing) at their controller's next `process`.
    pub fn abort_host(&mut self, host: HostId, status: Status) {
        if host == HostId::default() {
            return;
        }
        let mut woken = Vec::new();
        for (id, c) in self.ctrls.iter_mut() {
            if c.host != host {
                continue;
            }
            for p in c.pending.iter_mut().filter(|p| p.aborted.is_none()) {
                p.aborted = Some(status);
                p.wait = Wait::Ready;
            }
            woken.push(*id);
        }
        for id in woken {
            self.wake(id);
        }
    }

    /// Removes and returns controller `cntlid`'s delayed commands that may run at `now`
    /// (aborted, released, or due), in fetch order.
    pub fn take_due(&mut self, cntlid: u16, now: Instant) -> Vec<Pending> {
        let Some(c) = self.ctrls.get_mut(&cntlid) else {
            return Vec::new();
        };
        let (mut due, keep): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut c.pending)
            .into_iter()
            .partition(|p| match p.wait {
                Wait::Ready => true,
                Wait::Until(t) => t <= now,
                Wait::Stall(_) => false,
            });
        c.pending = keep;
        due.sort_unstable_by_key(|p| p.seq);
        due
    }

    /// The earliest time one of controller `cntlid`'s delayed commands is due.
    pub fn next_due(&self, cntlid: u16) -> Option<Instant> {
        self.ctrls.get(&cntlid).and_then(|c| {
            c.pending
                .iter()
                .filter_map(|p| match p.wait {
                    Wait::Until(t) => Some(t),
                    _ => None,
                })
                .min()
        })
    }
}

/// A dual-ported drive: one namespace (NSID 1) on a backing file, shared by the controllers of
/// both ports through an `Arc`. All state is behind one mutex; a controller holds it for the
/// duration of one register access or one [`crate::Controller::process`] call.
pub struct Drive {
    cfg: DriveConfig,
    state: Mutex<DriveState>,
}

impl fmt::Debug for Drive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drive").field("cfg", &self.cfg).finish()
    }
}

impl Drive {
    /// A drive on `file` (read and write access), extended to the configured capacity if
    /// shorter. The drive starts powered on and present, with the write cache enabled if it has
    /// one.
    pub fn open(file: File, cfg: DriveConfig) -> Result<Arc<Drive>, DriveError> {
        cfg.validate()?;
        let cap = cfg
            .capacity()
            .saturating_add(cfg.blocks.saturating_mul(u64::from(cfg.metadata_size)));
        if file.metadata()?.len() < cap {
            file.set_len(cap)?;
        }
        let state = DriveState {
            file,
            bs: u64::from(cfg.block_size),
            blocks: cfg.blocks,
            ms: u64::from(cfg.metadata_size),
            cache_blocks: cfg.cache_blocks,
            cache: Cache::new(cfg.cache_blocks),
            vwc: cfg.cache_blocks > 0,
            resv: Reservations::new(),
            faults: BTreeMap::new(),
            next_fault: 1,
            powered: true,
            present: true,
            epoch: 0,
            ctrls: BTreeMap::new(),
            stats: Stats::default(),
            write_seq: 0,
            port_writes: BTreeMap::new(),
            preempts: std::collections::VecDeque::new(),
            preempts_total: 0,
            next_seq: 0,
            powered_since: Instant::now(),
            wake: Vec::new(),
        };
        Ok(Arc::new(Drive {
            cfg,
            state: Mutex::new(state),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &DriveConfig {
        &self.cfg
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, DriveState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state, then calls the wakers it asked for, unlocked.
    fn with<R>(&self, f: impl FnOnce(&mut DriveState) -> R) -> R {
        let mut st = self.lock();
        let r = f(&mut st);
        let wakers = st.take_wakers();
        drop(st);
        for w in wakers {
            w();
        }
        r
    }

    /// Cuts the power: the volatile write cache is lost, every controller of the drive goes to
    /// its power-on reset state (registers cleared, queues gone, CSTS.RDY 0) and ignores
    /// register writes until [`Drive::power_on`]; delayed commands vanish without completions;
    /// registrations and the reservation are cleared (Persist Through Power Loss is reported
    /// but not implemented). Cutting an unpowered drive loses nothing more.
    pub fn power_cut(&self) -> PowerCutReport {
        self.with(|st| {
            if st.powered {
                st.power_cut()
            } else {
                PowerCutReport::default()
            }
        })
    }

    /// Restores power: controllers are in their reset state, waiting for the host to enable
    /// them.
    pub fn power_on(&self) {
        self.with(|st| {
            if !st.powered {
                st.powered = true;
                st.powered_since = Instant::now();
                let ids: Vec<u16> = st.ctrls.keys().copied().collect();
                for id in ids {
                    st.wake(id);
                }
            }
        });
    }

    /// Whether the drive has power.
    pub fn is_powered(&self) -> bool {
        self.lock().powered
    }

    /// Marks the drive present or absent. While absent, controllers do no work in
    /// [`crate::Controller::process`] (no fetches, no completions, delayed commands wait);
    /// registers keep working. The glue models a pulled drive by making its ports vanish.
    pub fn set_present(&self, present: bool) {
        self.with(|st| {
            st.present = present;
            if present {
                let ids: Vec<u16> = st.ctrls.keys().copied().collect();
                for id in ids {
                    st.wake(id);
                }
            }
        });
    }

    /// Whether the drive is present.
    pub fn is_present(&self) -> bool {
        self.lock().present
    }

    /// Adds a fault; returns its id (never 0).
    pub fn inject(&self, fault: Fault) -> u64 {
        self.with(|st| {
            let id = st.next_fault;
            st.next_fault += 1;
            tracing::info!(id, ?fault, "fault injected");
            st.faults.insert(id, fault);
            id
        })
    }

    /// Removes fault `id`; commands it stalled are released. Returns whether it existed.
    pub fn clear_fault(&self, id: u64) -> bool {
        self.with(|st| {
            let existed = st.faults.remove(&id).is_some();
            if existed {
                st.release_stalled(id);
            }
            existed
        })
    }

    /// Removes every fault, releasing stalled commands.
    pub fn clear_faults(&self) {
        self.with(|st| {
            let ids: Vec<u64> = st.faults.keys().copied().collect();
            st.faults.clear();
            for id in ids {
                st.release_stalled(id);
            }
            st.release_stalled(u64::MAX);
        });
    }

    /// The active faults with their ids, oldest first (an Error fault shows its remaining
    /// count).
    pub fn faults(&self) -> Vec<(u64, Fault)> {
        self.lock()
            .faults
            .iter()
            .map(|(id, f)| (*id, f.clone()))
            .collect()
    }

    /// Sets (or removes) the callback that wakes controller `cntlid`'s thread (see [`Waker`]).
    /// A waker may be set before the controller is created; removing one never creates a
    /// record.
    pub fn set_waker(&self, cntlid: u16, waker: Option<Waker>) {
        let mut st = self.lock();
        match waker {
            Some(w) => st.ctrl(cntlid).waker = Some(w),
            None => {
                if let Some(c) = st.ctrls.get_mut(&cntlid) {
                    c.waker = None;
                }
            }
        }
    }

    /// Blocks in the volatile write cache (acknowledged, not on the file).
    pub fn cached_blocks(&self) -> usize {
        self.lock().cache.len()
    }

    /// The drive-wide write sequence and the writes of each port's controller.
    pub fn port_writes(&self) -> (u64, Vec<PortWrites>) {
        let st = self.lock();
        (st.write_seq, st.port_writes.values().copied().collect())
    }

    /// The newest preempts, oldest first ([`PreemptRecord`]).
    pub fn preempts(&self) -> Vec<PreemptRecord> {
        self.lock().preempts.iter().cloned().collect()
    }

    /// The medium rots: bit `bit` (taken modulo the block size in bits) of block `lba` is
    /// inverted where the block lives (its cached copy, or the file), its metadata left as it
    /// was — what a drive returning silently corrupted data looks like to a host checking
    /// records. A later write of the block replaces the rotten data.
    pub fn rot(&self, lba: u64, bit: u32) -> Result<(), DriveError> {
        if lba >= self.cfg.blocks {
            return Err(DriveError::Config("LBA beyond the namespace".into()));
        }
        let mut st = self.lock();
        let mut data = st.read_blocks(lba, 1)?;
        let md = st.read_metadata(lba, 1)?;
        let bits = data.len() as u64 * 8;
        let b = u64::from(bit) % bits.max(1);
        if let Some(byte) = data.get_mut(usize::try_from(b / 8).unwrap_or(0)) {
            *byte ^= 1 << (b % 8);
        }
        let cached = st.cache.get(lba).is_some();
        st.write_blocks_md(lba, &data, &md, !cached)?;
        Ok(())
    }

    /// Writes the cache to the file, as a Flush would (ignoring a lying-flush fault).
    pub fn destage(&self) -> Result<(), DriveError> {
        Ok(self.lock().destage()?)
    }

    /// `n` blocks from `lba` as they are on the file (what would survive a power cut now).
    pub fn read_medium(&self, lba: u64, n: u64) -> Result<Vec<u8>, DriveError> {
        let end = lba.checked_add(n);
        if end.is_none_or(|e| e > self.cfg.blocks) {
            return Err(DriveError::Config("range beyond the namespace".into()));
        }
        Ok(self.lock().read_file(lba, n)?)
    }

    /// The metadata of `n` blocks from `lba` as a read returns it now (cached or on the file;
    /// empty for a format without metadata): what a test checks a host's records against.
    pub fn metadata(&self, lba: u64, n: u64) -> Result<Vec<u8>, DriveError> {
        let end = lba.checked_add(n);
        if end.is_none_or(|e| e > self.cfg.blocks) {
            return Err(DriveError::Config("range beyond the namespace".into()));
        }
        Ok(self.lock().read_metadata(lba, n)?)
    }

    /// A copy of the namespace's reservation state.
    pub fn reservations(&self) -> Reservations {
        self.lock().resv.clone()
    }

    /// The controller ids attached to the drive.
    pub fn controllers(&self) -> Vec<u16> {
        self.lock().ctrls.keys().copied().collect()
    }

    /// Commands controller `cntlid` has fetched and holds back (delayed or stalled), not yet
    /// executed: a test waits on this to know a command is inside the drive.
    pub fn held_commands(&self, cntlid: u16) -> usize {
        self.lock().ctrls.get(&cntlid).map_or(0, |c| {
            c.pending.iter().filter(|p| p.aborted.is_none()).count()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(cache: usize) -> Arc<Drive> {
        let f = tempfile::tempfile().expect("tempfile");
        Drive::open(
            f,
            DriveConfig {
                block_size: 512,
                blocks: 64,
                cache_blocks: cache,
                ..DriveConfig::default()
            },
        )
        .expect("open")
    }

    #[test]
    fn config_is_validated_and_file_extended() {
        let f = tempfile::tempfile().expect("tempfile");
        let f2 = f.try_clone().expect("clone");
        let d = Drive::open(
            f,
            DriveConfig {
                blocks: 10,
                ..DriveConfig::default()
            },
        )
        .expect("open");
        assert_eq!(f2.metadata().expect("meta").len(), 40960);
        assert_eq!(d.config().blocks, 10);
        for bad in [
            DriveConfig {
                block_size: 1024,
                ..DriveConfig::default()
            },
            DriveConfig {
                blocks: 0,
                ..DriveConfig::default()
            },
            DriveConfig {
                max_queues: 0,
                ..DriveConfig::default()
            },
            DriveConfig {
                max_queues: MAX_IO_QUEUES + 1,
                ..DriveConfig::default()
            },
            DriveConfig {
                mqes: 1,
                ..DriveConfig::default()
            },
            DriveConfig {
                mdts: 17,
                ..DriveConfig::default()
            },
            DriveConfig {
                blocks: u64::MAX,
                ..DriveConfig::default()
            },
        ] {
            let f = tempfile::tempfile().expect("tempfile");
            assert!(matches!(Drive::open(f, bad), Err(DriveError::Config(_))));
        }
    }

    #[test]
    fn cache_overlays_reads_and_evicts_oldest() {
        let d = drive(4);
        let mut st = d.lock();
        for lba in 0..4u64 {
            st.write_blocks(lba, &[lba as u8 + 1; 512], false)
                .expect("write");
        }
        assert_eq!(st.cache.len(), 4);
        assert_eq!(st.read_file(0, 1).expect("read"), vec![0; 512]);
        assert_eq!(st.read_blocks(2, 1).expect("read"), vec![3; 512]);
        // Rewriting block 0 makes it the newest; block 1 is now the oldest.
        st.write_blocks(0, &[9; 512], false).expect("write");
        st.write_blocks(10, &[7; 512], false).expect("write");
        assert_eq!(st.cache.len(), 4);
        assert_eq!(st.read_file(1, 1).expect("read"), vec![2; 512]);
        assert_eq!(st.read_file(0, 1).expect("read"), vec![0; 512]);
        // A write-through drops the stale cached copy.
        st.write_blocks(0, &[5; 512], true).expect("write");
        assert_eq!(st.read_blocks(0, 1).expect("read"), vec![5; 512]);
        assert_eq!(st.cache.len(), 3);
        let lost = st.power_cut().lost_blocks;
        assert_eq!(lost, 3);
        assert_eq!(st.read_blocks(10, 1).expect("read"), vec![0; 512]);
        assert_eq!(st.read_blocks(1, 1).expect("read"), vec![2; 512]);
    }

    #[test]
    fn big_writes_through_a_small_cache_and_zeroes() {
        let d = drive(2);
        let mut st = d.lock();
        let data: Vec<u8> = (0..8 * 512).map(|i| (i / 512) as u8 + 1).collect();
        st.write_blocks(0, &data, false).expect("write");
        assert_eq!(st.cache.len(), 2);
        assert_eq!(st.read_blocks(0, 8).expect("read"), data);
        st.zero_blocks(1, 200 - 190, false).expect("zero");
        let r = st.read_blocks(0, 12).expect("read");
        assert_eq!(r.get(..512), Some(&[1u8; 512][..]));
        assert!(r.get(512..).is_some_and(|s| s.iter().all(|&b| b == 0)));
        st.destage().expect("destage");
        assert_eq!(st.cache.len(), 0);
        assert_eq!(st.read_file(0, 12).expect("read"), r);
    }

    #[test]
    fn faults_match_and_count_down() {
        let d = drive(0);
        let id = d.inject(Fault::Error {
            op: FaultOp::Write,
            first_lba: 10,
            last_lba: 20,
            status: 0x280,
            dnr: true,
            remaining: Some(2),
        });
        let mut st = d.lock();
        assert_eq!(st.take_error(OpGroup::Read, &[(0, 63)]), None);
        assert_eq!(st.take_error(OpGroup::Write, &[(0, 9)]), None);
        assert_eq!(st.take_error(OpGroup::Write, &[(21, 30)]), None);
        let s = st.take_error(OpGroup::Write, &[(20, 30)]).expect("hit");
        assert_eq!((s.sct(), s.sc(), s.is_dnr()), (2, 0x80, true));
        assert!(st.take_error(OpGroup::Write, &[(5, 10)]).is_some());
        assert_eq!(st.take_error(OpGroup::Write, &[(5, 10)]), None);
        assert_eq!(st.stats.media_errors, 2);
        drop(st);
        assert!(!d.clear_fault(id));
        let a = d.inject(Fault::Latency {
            op: FaultOp::Read,
            micros: 100,
        });
        d.inject(Fault::Latency {
            op: FaultOp::Any,
            micros: 50,
        });
        let now = Instant::now();
        let st = d.lock();
        assert_eq!(
            st.delay_for(OpGroup::Read, now),
            Some(Wait::Until(now + Duration::from_micros(150)))
        );
        assert_eq!(
            st.delay_for(OpGroup::Flush, now),
            Some(Wait::Until(now + Duration::from_micros(50)))
        );
        drop(st);
        let s = d.inject(Fault::Stall { op: FaultOp::Read });
        assert_eq!(d.lock().delay_for(OpGroup::Read, now), Some(Wait::Stall(s)));
        assert!(d.clear_fault(a));
        assert_eq!(d.faults().len(), 2);
        d.clear_faults();
        assert!(d.faults().is_empty());
        assert_eq!(d.lock().delay_for(OpGroup::Read, now), None);
    }

    #[test]
    fn bit_flips_hit_only_the_range() {
        let d = drive(0);
        d.inject(Fault::BitFlip {
            first_lba: 1,
            last_lba: 1,
            bit: 512 * 8 + 9, // wraps to bit 9: byte 1, bit 1
        });
        let st = d.lock();
        let mut data = vec![0u8; 3 * 512];
        st.flip_bits(0, &mut data);
        assert_eq!(data.iter().filter(|&&b| b != 0).count(), 1);
        assert_eq!(data.get(513), Some(&2));
    }

    #[test]
    fn faults_serialize_with_a_kind_tag() {
        let f = Fault::Error {
            op: FaultOp::Any,
            first_lba: 0,
            last_lba: 7,
            status: 0x281,
            dnr: true,
            remaining: None,
        };
        let j = serde_json::to_string(&f).expect("json");
        assert!(j.contains("\"kind\":\"error\""), "{j}");
        assert!(j.contains("\"op\":\"any\""), "{j}");
        assert_eq!(serde_json::from_str::<Fault>(&j).expect("parse"), f);
        let lf: Fault = serde_json::from_str(r#"{"kind":"lying_flush"}"#).expect("parse");
        assert_eq!(lf, Fault::LyingFlush);
        let e: Fault = serde_json::from_str(
            r#"{"kind":"error","op":"read","first_lba":1,"last_lba":2,"status":640}"#,
        )
        .expect("defaults");
        assert!(matches!(
            e,
            Fault::Error {
                dnr: false,
                remaining: None,
                ..
            }
        ));
        let t: Fault = serde_json::from_str(
            r#"{"kind":"torn_write","first_lba":0,"last_lba":0,"keep_bytes":100}"#,
        )
        .expect("torn");
        assert!(matches!(
            t,
            Fault::TornWrite {
                keep_bytes: 100,
                ..
            }
        ));
    }
}
