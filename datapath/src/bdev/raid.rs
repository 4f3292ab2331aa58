//! [`RaidBdev`]: RAID 0, 1 and 10, a block device over block devices.
//!
//! The members are grouped in *sets* of copies: RAID 0 has one set per member (no copies),
//! RAID 1 one set holding every member, RAID 10 a set per pair of members (0,1), (2,3), ....
//! The device's address space is striped over the sets in chunks (chunk `c` lives on set
//! `c mod S` at set offset `(c div S) × chunk`); with one set there is no striping. A set's
//! offset `o` is byte `data_offset + o` of each of its members (the data area behind the
//! superblock, metadata and journal areas of the on-disk layout).
//!
//! Per I/O, cut at chunk boundaries into pieces:
//! * a write, write-zeroes or deallocate goes to every *active* member of the piece's set, and
//!   completes when every one has: acknowledged only once on every live copy;
//! * a read goes to one active member of the set (round robin over the set's copies); when it
//!   fails, it is retried on another active copy that was not tried yet;
//! * a flush goes to every active member.
//!
//! A member whose I/O fails is marked [`MemberState::Failed`] (an [`Event::MemberFailed`] for
//! the control plane, which records it in the pool's metadata) if its set keeps another
//! active copy: the device goes on degraded and the I/O succeeds on the copies that remain. A
//! failed member takes no more I/O (its data goes stale; it comes back only by a rebuild).
//! The last active copy of a set is never failed (as md keeps the last working mirror): its
//! errors fail the I/O instead, and so do a RAID 0 member's. Reservation Conflict is not a
//! drive failure but this node being fenced off the drives: it fails the I/O and fails no
//! member.
//!
//! Integrity (members on drives with integrity records, `crate::integrity`): every write gets
//! the device's next sequence number, the same on every copy. A read that a member fails with
//! `STATUS_INTEGRITY` (its data does not match its record) does not fail the member: it is
//! retried on another copy, and when one answers good, that data is written back to the copies
//! that were bad (a *heal*; the parent completes after it) — unless a host write of the range is
//! in flight, which rewrites every copy anyway. A host write that overlaps a heal in flight
//! waits for it, so a heal never lands over newer data. With no good copy left the read fails
//! with `STATUS_INTEGRITY` (a media error to the host, never wrong data).
//!
//! Scrub (RAID 1 and 10, [`Bdev::start_scrub`]): the members' data areas are read window by
//! window ([`SCRUB_WINDOW`] of each set, every active copy into the device's own buffers, host
//! writes of the window held meanwhile). Where a copy fails its integrity check, the window is
//! read again block by block: a bad block with a good copy is rewritten from it (*repaired*);
//! a block with no good copy is reported (*skipped*, and counted unrecoverable). Good copies
//! whose data differ are reported as mismatches (no record says which is right: none is
//! changed). The raid service paces it through [`Bdev::set_job_limit`].

use std::os::fd::BorrowedFd;

use std::collections::VecDeque;

use duplex_ipc::desc::{
    STATUS_FENCED, STATUS_INTEGRITY, STATUS_INTERNAL, STATUS_LBA_OUT_OF_RANGE, STATUS_READ_ERROR,
    STATUS_RESERVATION_CONFLICT, STATUS_SUCCESS,
};

use super::{
    in_range, Attach, Bdev, BdevBox, ChainRef, Ctx, DeviceJob, Done, Event, Io, JobKind, Op,
    ScrubStatus, REPORT_VERDICTS,
};
use crate::integrity::Verdict;

/// Bytes of each set a scrub checks at a time (at most a chunk).
pub const SCRUB_WINDOW: u64 = 64 << 10;

/// RAID levels of the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaidLevel {
    /// Striping, no redundancy.
    Raid0,
    /// Mirroring over every member.
    Raid1,
    /// Striping over mirrored pairs.
    Raid10,
    /// Rotating single parity (P): [`super::ParityBdev`].
    Raid5,
    /// Rotating double parity (P and Q): [`super::ParityBdev`].
    Raid6,
}

impl RaidLevel {
    /// Parity columns per stripe (0 for the mirror and stripe levels).
    pub fn parity(self) -> usize {
        match self {
            Self::Raid5 => 1,
            Self::Raid6 => 2,
            _ => 0,
        }
    }
}

/// A member's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Takes I/O.
    Active,
    /// Failed: takes no I/O; its data is stale.
    Failed,
    /// Being rebuilt (parity levels): takes every write, is read only below `done` (bytes of
    /// its data area rebuilt), rebuilt by the device from there on.
    Rebuilding {
        /// Bytes of the member's data area rebuilt.
        done: u64,
    },
}

/// Why a RAID device cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum RaidError {
    /// The geometry is impossible.
    #[error("RAID device {name}: {why}")]
    Geometry {
        /// The device.
        name: String,
        /// What is wrong.
        why: String,
    },
}

#[derive(Debug)]
struct Member {
    dev: BdevBox,
    state: MemberState,
    /// Its reads that failed their integrity check, lately.
    bad: super::BadReads,
}

/// One I/O of the RAID device's caller.
#[derive(Debug, Clone, Copy)]
struct Parent {
    token: u64,
    op: Op,
    outstanding: u32,
    status: u16,
    /// The device range (for heals and the writes that must not cross them).
    offset: u64,
    len: u64,
}

/// One member I/O.
#[derive(Debug, Clone, Copy)]
struct Child {
    parent: usize,
    set: usize,
    member: usize,
    io: Io,
    /// Members of the set this read was tried on (bit per member index).
    tried: u64,
    /// Raw access to the member (no redundancy, no failure handling).
    raw: bool,
    /// Members of the set this read found bad (integrity), to heal once a copy reads good.
    bad: u64,
    /// A heal: the write of good data over a bad copy (its failure fails no parent).
    heal: bool,
    /// A scrub's read or repair (no parent: the scrub's window accounts it).
    scrub: bool,
    /// The write-intent bitmap's block write, flush or load (no parent).
    intent: bool,
    /// A rebuild window's read of a good copy or write of the rebuilt member (no parent).
    rebuild: bool,
}

/// RAID 0, 1 or 10 over block devices. See the module docs.
#[derive(Debug)]
pub struct RaidBdev {
    name: String,
    level: RaidLevel,
    chunk: u64,
    block_size: u32,
    data_offset: u64,
    /// Bytes of each member's data area used (whole chunks).
    member_len: u64,
    members: Vec<Member>,
    sets: Vec<Vec<usize>>,
    parents: Vec<Option<Parent>>,
    free_parents: Vec<usize>,
    children: Vec<Option<Child>>,
    free_children: Vec<usize>,
    ready: Vec<Done>,
    scratch: Vec<Done>,
    next_read: usize,
    /// Hold write and flush completions while a member failure is not recorded on disk.
    hold_until_recorded: bool,
    /// Failed members whose failure is not recorded yet (bit per member).
    unrecorded: u64,
    /// Completions held until then.
    held: Vec<Done>,
    /// The sequence number the next write gets.
    next_seq: u64,
    /// The committed write sequence mark: no write is numbered at or past it (0: no limit).
    seq_limit: u64,
    /// Host writes wait for a higher mark (said once per wait).
    seq_waiting: bool,
    /// Heals in flight: (parent, device offset, length).
    healing: Vec<(usize, u64, u64)>,
    /// Host writes waiting for a heal of their range to end.
    deferred: VecDeque<Io>,
    /// Blocks read bad and served from another copy, heals written, heals skipped because a
    /// host write of the range was in flight.
    integrity: IntegrityCounts,
    /// The scrub now or last.
    scrub: Option<ScrubStatus>,
    /// Its window in flight.
    window: Option<Window>,
    /// The raid service's grant: scrub windows start only below this set offset.
    scrub_limit: u64,
    /// The scrub is a resync (after an import): until it ends, a host read of a window not
    /// yet synced waits for that window, synced out of turn.
    resyncing: bool,
    /// Windows synced out of turn (set offsets), ahead of the scrub's progress.
    ahead: std::collections::BTreeSet<u64>,
    /// Windows host reads wait for, synced first.
    urgent: VecDeque<u64>,
    /// Host reads waiting for their windows.
    waiting_reads: VecDeque<Io>,
    /// The write-intent bitmap (mirrors with a bitmap area).
    intent: Option<super::intent::Intent>,
    /// Host writes waiting for their regions' bits to be on the members.
    intent_waiting: VecDeque<Io>,
    /// The bitmap's scratch chains in flight (block write: one; load: one per member).
    intent_chains: Vec<(usize, u32)>,
    /// A resync bounded by the bitmap: the regions it need not compare (`true`: clean).
    clean: Option<Vec<bool>>,
    /// The rebuild window in flight: `(member, at, len, chain, tried copies, writing)`.
    rebuilding: Option<(usize, u64, u64, u32, u64, bool)>,
    /// How far the raid service lets the rebuild go (member bytes).
    rebuild_limit: u64,
    /// Where the current rebuild started (a resumed one: its checkpoint).
    rebuild_from: u64,
    /// A rebuild window failed on every copy: no more until a member is replaced again.
    rebuild_stuck: bool,
    /// Rebuilding members (bit = member) that came back stale: only the regions the
    /// write-intent bitmap marks are copied to them.
    marked_rebuild: u64,
    /// This rebuild's bytes copied and skipped (clean regions of a member come back).
    rebuild_copied: u64,
    rebuild_skipped: u64,

    /// Host I/Os submitted.
    host_ios: u64,
}

/// Whose I/O a child without a parent is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Own {
    Scrub,
    Intent,
    Rebuild,
}

/// A scrub window in flight.
#[derive(Debug)]
struct Window {
    /// Set offset and bytes.
    at: u64,
    len: u64,
    /// The device range whose host writes wait for it.
    lock: (u64, u64),
    phase: WPhase,
    pending: u32,
    /// One read per (set, active member): its buffer and how it ended.
    reads: Vec<WRead>,
    /// Block re-reads: (index into `reads`, block, status).
    blocks: Vec<(usize, u64, u16)>,
    /// Repairs decided from the records while other sets of the window are re-read.
    repairs: Vec<(usize, usize, u32, u64, Option<u32>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WPhase {
    Reading,
    Blocks,
    Writing,
}

#[derive(Debug, Clone)]
struct WRead {
    set: usize,
    member: usize,
    chain: u32,
    status: u16,
    /// Each block's integrity verdict (members on drives with metadata).
    verdicts: Option<Vec<Verdict>>,
}

/// Whether `a` is a newer write sequence than `b` (serial arithmetic on 32 bits: sound while
/// they are less than 2^31 writes apart).
fn newer(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// What a RAID device's integrity handling did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntegrityCounts {
    /// Member reads that failed their integrity check.
    pub bad_reads: u64,
    /// Of those, served from another copy.
    pub recovered: u64,
    /// Heal writes that completed.
    pub healed: u64,
    /// Heals not written because a host write of the range was in flight.
    pub heal_skipped: u64,
    /// Reads with no good copy (failed to the caller).
    pub unrecoverable: u64,
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

fn writes_data(op: Op) -> bool {
    matches!(op, Op::Write | Op::WriteZeroes | Op::Deallocate)
}

impl RaidBdev {
    /// Builds a RAID device named `name` over `members` (in slot order), with `chunk`-byte
    /// chunks, using bytes `[data_offset, data_offset + data_len)` of every member. `states`
    /// gives each member's state (a member recorded failed stays out); empty means all active.
    pub fn new(
        name: &str,
        level: RaidLevel,
        chunk: u64,
        data_offset: u64,
        data_len: u64,
        members: Vec<BdevBox>,
        states: &[MemberState],
    ) -> Result<Self, RaidError> {
        let geometry: Vec<(String, u32, u64)> = members
            .iter()
            .map(|m| (m.name().to_owned(), m.block_size(), m.size()))
            .collect();
        let (sets, block_size, member_len) =
            Self::check(name, level, chunk, data_offset, data_len, &geometry, states)?;
        let members: Vec<Member> = members
            .into_iter()
            .enumerate()
            .map(|(i, dev)| Member {
                dev,
                state: states.get(i).copied().unwrap_or(MemberState::Active),
                bad: super::BadReads::default(),
            })
            .collect();
        for (member, m) in members.iter().enumerate() {
            if let MemberState::Rebuilding { done } = m.state {
                tracing::info!(raid = %name, member, from = done, total = member_len, "member rebuilding: the rebuild resumes from its checkpoint");
            }
        }
        Ok(Self {
            name: name.to_owned(),
            level,
            chunk,
            block_size,
            data_offset,
            member_len,
            members,
            sets,
            parents: Vec::new(),
            free_parents: Vec::new(),
            children: Vec::new(),
            free_children: Vec::new(),
            ready: Vec::new(),
            scratch: Vec::new(),
            next_read: 0,
            hold_until_recorded: false,
            unrecorded: 0,
            held: Vec::new(),
            next_seq: 1,
            seq_limit: 0,
            seq_waiting: false,
            healing: Vec::new(),
            deferred: VecDeque::new(),
            integrity: IntegrityCounts::default(),
            scrub: None,
            window: None,
            scrub_limit: u64::MAX,
            resyncing: false,
            ahead: std::collections::BTreeSet::new(),
            urgent: VecDeque::new(),
            waiting_reads: VecDeque::new(),
            intent: None,
            intent_waiting: VecDeque::new(),
            intent_chains: Vec::new(),
            clean: None,
            rebuilding: None,
            rebuild_limit: u64::MAX,
            rebuild_from: states
                .iter()
                .find_map(|s| match s {
                    MemberState::Rebuilding { done } => Some(*done),
                    _ => None,
                })
                .unwrap_or(0),
            rebuild_stuck: false,
            marked_rebuild: 0,
            rebuild_copied: 0,
            rebuild_skipped: 0,
            host_ios: 0,
        })
    }

    /// Starts with a resync: every block of every set compared across its copies, the newest
    /// (by write sequence) written over the others, host reads of a window waiting until it is
    /// synced. What an import after a crash or a power cut needs: a copy that lied about a
    /// flush holds older blocks that read back valid.
    /// Only over members that all carry integrity records (without them the copies cannot
    /// say which is newer) and with a set that has two active copies to compare.
    pub fn with_resync(mut self, on: bool) -> Self {
        if !on || self.level == RaidLevel::Raid0 {
            return self;
        }
        if let Some(i) = self.intent.as_mut() {
            // An import: the members' bitmaps are read before any write goes, resync or not
            // (a degraded pool's marks are what a member coming back needs copied).
            i.want_load();
        }
        let present = |m: &Member| m.state == MemberState::Active;
        if !self
            .members
            .iter()
            .filter(|m| present(m))
            .all(|m| m.dev.carries_records())
        {
            tracing::info!(raid = %self.name, "no resync: the members carry no integrity records (nothing says which copy is newer)");
            return self;
        }
        if !self
            .sets
            .iter()
            .any(|set| set.iter().filter(|&&m| present(&self.members[m])).count() > 1)
        {
            tracing::info!(raid = %self.name, "no resync: no set has two active copies");
            return self;
        }
        {
            self.scrub = Some(ScrubStatus {
                total: self.member_len,
                ..ScrubStatus::default()
            });
            self.resyncing = true;
            if let Some(i) = self.intent.as_mut() {
                // The members' bitmaps say which regions to compare; until they are read,
                // nothing is compared and nothing written.
                i.want_load();
            }
            tracing::info!(raid = %self.name, bitmap = self.intent.is_some(), "resync started: the copies are compared block by block");
        }
        self
    }

    /// Keeps a write-intent bitmap in `spec`'s area (mirror levels): every write waits until
    /// its regions' bits are on the members; a resync ([`RaidBdev::with_resync`], called after
    /// this) compares only the regions the members' bitmaps mark.
    pub fn with_intent(mut self, spec: Option<super::intent::IntentSpec>) -> Self {
        if self.level == RaidLevel::Raid0 {
            return self;
        }
        self.intent = spec.and_then(|s| super::intent::Intent::new(s, self.member_len));
        self
    }

    /// Rebuilds the rebuilding members in `mask` (bit = slot) from the regions the members'
    /// write-intent bitmap marks only: members that came back stale after they failed, whose
    /// every write missed since is marked (bits are not cleared while a member is out). Needs
    /// the bitmap ([`RaidBdev::with_intent`]) and an import ([`RaidBdev::with_resync`], which
    /// reads it); otherwise the members are rebuilt whole.
    pub fn with_marked_rebuild(mut self, mask: u64) -> Self {
        let rebuilding = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| matches!(m.state, MemberState::Rebuilding { .. }))
            .fold(0u64, |acc, (i, _)| {
                acc | 1u64.checked_shl(i as u32).unwrap_or(0)
            });
        let mask = mask & rebuilding;
        if mask == 0 {
            return self;
        }
        match self.intent.as_ref() {
            Some(i) if i.load_wanted || i.loading.is_some() => {
                self.marked_rebuild = mask;
                tracing::info!(raid = %self.name, members = mask, "members came back stale: only the regions the write-intent bitmap marks are copied to them");
            }
            _ => {
                tracing::info!(raid = %self.name, members = mask, "members came back stale, but no bitmap is read: they are rebuilt whole");
            }
        }
        self
    }

    /// Whether a resync runs.
    pub fn resyncing(&self) -> bool {
        self.resyncing
    }

    /// The scrub's window size: windows start at its multiples.
    fn unit(&self) -> u64 {
        SCRUB_WINDOW.min(self.chunk)
    }

    /// Whether set offsets `[at, at + len)` are synced (no resync, or its windows done).
    fn synced(&self, at: u64, len: u64) -> bool {
        if !self.resyncing {
            return true;
        }
        let done = self.scrub.map_or(u64::MAX, |s| s.done);
        let unit = self.unit();
        let mut w = at / unit * unit;
        while w < at + len {
            if w >= done && !self.ahead.contains(&w) && !self.is_clean(w) {
                return false;
            }
            w += unit;
        }
        true
    }

    /// Whether set offset `at` lies in a region the resync's bitmap says is clean.
    fn is_clean(&self, at: u64) -> bool {
        match (&self.clean, &self.intent) {
            (Some(clean), Some(i)) => clean
                .get(usize::try_from(at / i.region).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or(false),
            _ => false,
        }
    }

    /// The bitmap regions a host write of `[offset, offset + len)` touches, on whichever sets,
    /// without allocating; empty without a bitmap. With several sets the range covers the
    /// whole rows (`chunk` bytes of set offsets each) the write's first and last bytes lie in:
    /// every piece is inside them (a piece's set offset is its row's start plus its offset in
    /// the chunk), at the cost of marking a little more than the pieces when a chunk spans
    /// several regions.
    fn write_regions(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let Some(i) = self.intent.as_ref() else {
            return 0..0;
        };
        let nsets = self.sets.len() as u64;
        let end = offset.saturating_add(len.max(1));
        if nsets <= 1 {
            return i.regions_of(offset, end - offset);
        }
        let row = self.chunk.saturating_mul(nsets).max(1);
        let first = offset / row * self.chunk;
        let last = ((end - 1) / row + 1) * self.chunk;
        i.regions_of(first, last - first)
    }

    /// The set offsets of a host I/O's pieces: (set offset, bytes) each.
    fn set_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let nsets = self.sets.len() as u64;
        if nsets == 1 {
            return vec![(offset, len)];
        }
        let mut out = Vec::new();
        let mut at = 0;
        while at < len {
            let off = offset + at;
            let c = off / self.chunk;
            let within = off % self.chunk;
            let n = (self.chunk - within).min(len - at);
            out.push((c / nsets * self.chunk + within, n));
            at += n;
        }
        out
    }

    /// Buffer bytes a scrub of a device over `members` members takes at once.
    pub fn scratch_wanted(members: usize) -> u64 {
        SCRUB_WINDOW * members as u64 + super::intent::BLOCK as u64 * (members as u64 + 1)
    }

    /// Starts the write sequence numbers at `seq` (the pool's committed high-water mark, so
    /// that they never repeat across restarts and owners).
    pub fn with_seq(mut self, seq: u64) -> Self {
        self.next_seq = seq.max(1);
        self
    }

    /// Never numbers a write at or past `limit` (the pool's committed mark; 0: no limit):
    /// host writes wait for [`Bdev::set_seq_limit`] to raise it.
    pub fn with_seq_limit(mut self, limit: u64) -> Self {
        self.seq_limit = limit;
        self
    }

    /// The next write sequence number, if the committed mark allows one.
    fn take_seq(&mut self) -> Option<u64> {
        if self.seq_limit != 0 && self.next_seq >= self.seq_limit {
            return None;
        }
        self.next_seq += 1;
        Some(self.next_seq - 1)
    }

    /// What the integrity handling did so far.
    pub fn integrity_counts(&self) -> IntegrityCounts {
        self.integrity
    }

    /// Holds write and flush completions after a member fails until
    /// [`Bdev::failures_recorded`] says the failure is on disk: until then, a crash could bring
    /// the failed member back as current and serve its stale data, so nothing written
    /// degraded may be acknowledged.
    pub fn hold_until_recorded(mut self, on: bool) -> Self {
        self.hold_until_recorded = on;
        self
    }

    /// Checks a RAID geometry over members of the given `(name, block size, size)`; returns
    /// the copy sets, the block size and the bytes used of each member's data area.
    pub fn check(
        name: &str,
        level: RaidLevel,
        chunk: u64,
        data_offset: u64,
        data_len: u64,
        members: &[(String, u32, u64)],
        states: &[MemberState],
    ) -> Result<(Vec<Vec<usize>>, u32, u64), RaidError> {
        let bad = |why: String| {
            Err(RaidError::Geometry {
                name: name.to_owned(),
                why,
            })
        };
        let n = members.len();
        let sets: Vec<Vec<usize>> = match level {
            RaidLevel::Raid0 if n >= 1 => (0..n).map(|i| vec![i]).collect(),
            RaidLevel::Raid1 if n >= 2 => vec![(0..n).collect()],
            RaidLevel::Raid10 if n >= 4 && n % 2 == 0 => {
                (0..n / 2).map(|p| vec![2 * p, 2 * p + 1]).collect()
            }
            // Parity levels: every member is its own set; losing more than the parity columns
            // loses data.
            RaidLevel::Raid5 if n >= 3 => (0..n).map(|i| vec![i]).collect(),
            RaidLevel::Raid6 if n >= 4 => (0..n).map(|i| vec![i]).collect(),
            _ => return bad(format!("{n} members do not make {level:?}")),
        };
        if n > 64 {
            return bad(format!("{n} members (at most 64)"));
        }
        if !states.is_empty() && states.len() != n {
            return bad(format!("{} member states for {n} members", states.len()));
        }
        let Some(&(_, block_size, _)) = members.first() else {
            return bad("no members".into());
        };
        if let Some((m, bs, _)) = members.iter().find(|m| m.1 != block_size) {
            return bad(format!(
                "member {m} has {bs}-byte blocks, the first member {block_size}-byte ones"
            ));
        }
        if !chunk.is_power_of_two() || chunk < u64::from(block_size) || chunk < 4096 {
            return bad(format!(
                "chunk of {chunk} bytes (a power of two, at least 4 KiB and one block)"
            ));
        }
        if data_offset % u64::from(block_size) != 0 {
            return bad(format!("data offset {data_offset} is not on a block"));
        }
        let member_len = data_len / chunk * chunk;
        if member_len == 0 {
            return bad(format!("a data area of {data_len} bytes holds no chunk"));
        }
        if let Some((m, size, _)) = members
            .iter()
            .map(|(m, _, size)| (m, size, ()))
            .find(|(_, &size, _)| data_offset.checked_add(member_len).is_none_or(|e| e > size))
        {
            return bad(format!(
                "member {m} holds {size} bytes, the data area ends at {}",
                data_offset.saturating_add(member_len)
            ));
        }
        let np = level.parity();
        if level == RaidLevel::Raid0
            && states
                .iter()
                .any(|s| matches!(s, MemberState::Rebuilding { .. }))
        {
            return bad("RAID 0 has no copy to rebuild a member from".into());
        }
        if np > 0 {
            let failed = states.iter().filter(|&&s| s != MemberState::Active).count();
            if failed > np {
                return bad(format!(
                    "{failed} members failed, {level:?} survives at most {np}"
                ));
            }
        } else if sets
            .iter()
            .any(|s| !states.is_empty() && s.iter().all(|&m| states[m] != MemberState::Active))
        {
            return bad("no active copy of some data (failed or being rebuilt)".into());
        }
        Ok((sets, block_size, member_len))
    }

    /// The level.
    pub fn level(&self) -> RaidLevel {
        self.level
    }

    /// Each member's state, in slot order.
    pub fn member_states(&self) -> Vec<MemberState> {
        self.members.iter().map(|m| m.state).collect()
    }

    /// Whether some member has failed.
    pub fn degraded(&self) -> bool {
        self.members.iter().any(|m| m.state == MemberState::Failed)
    }

    /// Active members of set `s` other than `except`.
    fn others_active(&self, s: usize, except: usize) -> bool {
        self.sets[s]
            .iter()
            .any(|&m| m != except && self.members[m].state == MemberState::Active)
    }

    fn new_parent(&mut self, token: u64, op: Op, offset: u64, len: u64) -> usize {
        let p = Parent {
            token,
            op,
            outstanding: 0,
            status: STATUS_SUCCESS,
            offset,
            len,
        };
        match self.free_parents.pop() {
            Some(i) => {
                self.parents[i] = Some(p);
                i
            }
            None => {
                self.parents.push(Some(p));
                self.parents.len() - 1
            }
        }
    }

    /// Sends a member I/O for parent `parent`.
    fn send(&mut self, child: Child, ctx: &mut Ctx<'_>) {
        let i = match self.free_children.pop() {
            Some(i) => i,
            None => {
                self.children.push(None);
                self.children.len() - 1
            }
        };
        let io = Io {
            token: i as u64,
            ..child.io
        };
        self.children[i] = Some(Child { io, ..child });
        if let Some(p) = self.parents[child.parent].as_mut() {
            p.outstanding += 1;
        }
        self.members[child.member].dev.submit(io, ctx);
    }

    /// Records an error on parent `p` (the first one stays).
    fn fail_parent(&mut self, p: usize, status: u16) {
        if let Some(p) = self.parents[p].as_mut() {
            if p.status == STATUS_SUCCESS {
                p.status = status;
            }
        }
    }

    /// One member I/O of parent `p` is accounted; the parent ends when none is left.
    fn settle(&mut self, p: usize) {
        let Some(parent) = self.parents.get_mut(p).and_then(Option::as_mut) else {
            return;
        };
        parent.outstanding = parent.outstanding.saturating_sub(1);
        if parent.outstanding == 0 {
            let done = Done {
                token: parent.token,
                status: parent.status,
            };
            let (op, offset, len) = (parent.op, parent.offset, parent.len);
            if writes_data(op) && self.intent.is_some() {
                let regions = self.write_regions(offset, len);
                let now = std::time::Instant::now();
                if let Some(i) = self.intent.as_mut() {
                    i.end(regions, now);
                }
            }
            if self.unrecorded != 0 && op != Op::Read {
                self.held.push(done);
            } else {
                self.ready.push(done);
            }
            self.parents[p] = None;
            self.free_parents.push(p);
        }
    }

    /// Member `m` of set `s` returned a block its record disowns: past [`super::MAX_BAD_READS`]
    /// in an hour it is failed (if its set keeps another active copy).
    fn note_bad_read(&mut self, m: usize, s: usize, ctx: &mut Ctx<'_>) {
        if self.members[m].bad.note(ctx.now) && self.members[m].state == MemberState::Active {
            tracing::error!(raid = %self.name, member = m, device = self.members[m].dev.name(), bad_reads = self.members[m].bad.count(), "too many reads failed their integrity check: failing the member");
            self.fail_member(m, s, STATUS_INTEGRITY, ctx);
        }
    }

    /// Marks member `m` failed (if its set keeps another active copy; returns whether it did).
    fn fail_member(&mut self, m: usize, s: usize, status: u16, ctx: &mut Ctx<'_>) -> bool {
        if status == STATUS_RESERVATION_CONFLICT
            || status == STATUS_FENCED
            || !self.others_active(s, m)
        {
            return false;
        }
        if self.members[m].state != MemberState::Failed {
            self.members[m].state = MemberState::Failed;
            if self.hold_until_recorded {
                self.unrecorded |= 1 << m;
            }
            tracing::error!(
                raid = %self.name,
                member = m,
                device = self.members[m].dev.name(),
                status,
                "RAID member failed: going on degraded"
            );
            ctx.events.push(Event::MemberFailed {
                device: self.name.clone(),
                member: m,
                name: self.members[m].dev.name().to_owned(),
                status,
            });
        }
        true
    }

    /// A member I/O ended.
    fn child_done(&mut self, d: Done, ctx: &mut Ctx<'_>) {
        let Some(c) = usize::try_from(d.token)
            .ok()
            .and_then(|i| self.children.get_mut(i))
            .and_then(Option::take)
        else {
            tracing::error!(raid = %self.name, token = d.token, "member completion for no I/O");
            return;
        };
        self.free_children.push(d.token as usize);
        if c.intent {
            self.intent_child_done(&c, d.status, ctx);
            return;
        }
        if c.rebuild {
            self.rebuild_child_done(&c, d.status, ctx);
            return;
        }
        if c.scrub {
            self.scrub_child_done(&c, d.status, ctx);
            return;
        }
        if c.heal {
            if let Some(i) = self.healing.iter().position(|h| h.0 == c.parent) {
                self.healing.swap_remove(i);
            }
            if d.status == STATUS_SUCCESS {
                self.integrity.healed += 1;
                tracing::info!(raid = %self.name, member = c.member, device = self.members[c.member].dev.name(), offset = c.io.offset, len = c.io.len, "bad copy rewritten from a good one");
            } else {
                // The copy stays bad; a member that cannot take a write has failed.
                self.fail_member(c.member, c.set, d.status, ctx);
            }
            self.settle(c.parent);
            return;
        }
        if d.status == STATUS_SUCCESS && c.bad != 0 && !c.raw {
            self.integrity.recovered += 1;
            self.heal(&c, ctx);
        }
        if d.status == STATUS_INTEGRITY && c.io.op == Op::Read && !c.raw {
            // The member answered with data its record disowns: not a failed member (unless
            // it keeps doing so); another copy may hold the good data.
            self.integrity.bad_reads += 1;
            self.note_bad_read(c.member, c.set, ctx);
            let tried = c.tried | 1 << c.member;
            let next = self.sets[c.set]
                .iter()
                .copied()
                .find(|&m| tried & 1 << m == 0 && self.members[m].state == MemberState::Active);
            if let Some(m) = next {
                ctx.stats.read_retries += 1;
                tracing::warn!(raid = %self.name, from = c.member, to = m, offset = c.io.offset, "bad data: read retried on another copy");
                self.send(
                    Child {
                        member: m,
                        tried,
                        bad: c.bad | 1 << c.member,
                        ..c
                    },
                    ctx,
                );
            } else {
                self.integrity.unrecoverable += 1;
                tracing::error!(raid = %self.name, offset = c.io.offset, len = c.io.len, "no copy of the data reads good: the read fails");
                self.fail_parent(c.parent, STATUS_INTEGRITY);
            }
            self.settle(c.parent);
            return;
        }
        if d.status == STATUS_SUCCESS || c.raw {
            if d.status != STATUS_SUCCESS {
                self.fail_parent(c.parent, d.status);
            }
            self.settle(c.parent);
            return;
        }
        let failed_over = if self.members[c.member].state == MemberState::Failed {
            // Already failed by another I/O: this copy no longer counts.
            self.others_active(c.set, c.member)
        } else {
            self.fail_member(c.member, c.set, d.status, ctx)
        };
        if c.io.op == Op::Read && failed_over {
            // Try a copy this read has not been tried on.
            let tried = c.tried | 1 << c.member;
            let next = self.sets[c.set]
                .iter()
                .copied()
                .find(|&m| tried & 1 << m == 0 && self.members[m].state == MemberState::Active);
            if let Some(m) = next {
                ctx.stats.read_retries += 1;
                tracing::warn!(raid = %self.name, from = c.member, to = m, "read retried on another copy");
                self.send(
                    Child {
                        member: m,
                        tried,
                        ..c
                    },
                    ctx,
                );
                self.settle(c.parent);
                return;
            }
            self.fail_parent(c.parent, d.status);
        } else if !failed_over {
            self.fail_parent(c.parent, d.status);
        }
        self.settle(c.parent);
    }
}

impl RaidBdev {
    /// A read `c` answered good after copies in `c.bad` answered bad: writes its data (in the
    /// parent's chain) over those copies, unless a host write of the range is in flight.
    fn heal(&mut self, c: &Child, ctx: &mut Ctx<'_>) {
        let Some(parent) = self.parents.get(c.parent).and_then(|p| *p) else {
            return;
        };
        let overwritten = self
            .parents
            .iter()
            .flatten()
            .any(|p| writes_data(p.op) && overlaps(p.offset, p.len, parent.offset, parent.len));
        if overwritten {
            self.integrity.heal_skipped += 1;
            return;
        }
        let Some(seq) = self.take_seq() else {
            // The committed mark is reached: the bad copy stays (a scrub finds it again).
            self.integrity.heal_skipped += 1;
            return;
        };
        for k in 0..self.sets[c.set].len() {
            let m = self.sets[c.set][k];
            if c.bad & 1 << m == 0 || self.members[m].state != MemberState::Active {
                continue;
            }
            self.healing.push((c.parent, parent.offset, parent.len));
            self.send(
                Child {
                    member: m,
                    io: Io {
                        op: Op::Write,
                        fua: true,
                        seq,
                        ..c.io
                    },
                    tried: 0,
                    bad: 0,
                    heal: true,
                    ..*c
                },
                ctx,
            );
        }
    }

    /// The device range whose host writes a scrub window at set offset `at` must hold: the
    /// window itself on one set, the whole row of chunks over several.
    fn window_lock(&self, at: u64, len: u64) -> (u64, u64) {
        let nsets = self.sets.len() as u64;
        if nsets == 1 {
            (at, len)
        } else {
            let row = at / self.chunk;
            (row * nsets * self.chunk, nsets * self.chunk)
        }
    }

    /// Starts the scrub's next window when it may: the grant allows, no host write of its
    /// range is in flight, and the buffers are there.
    fn scrub_step(&mut self, ctx: &mut Ctx<'_>) {
        if self.resyncing
            && self
                .intent
                .as_ref()
                .is_some_and(|i| i.loading.is_some() || i.load_wanted)
        {
            return;
        }
        // A resync skips the regions the bitmap says are clean.
        if self.resyncing && self.window.is_none() {
            if let (Some(st), Some(i)) = (self.scrub.as_mut(), self.intent.as_ref()) {
                let before = st.done;
                while st.done < st.total {
                    let r = usize::try_from(st.done / i.region).unwrap_or(usize::MAX);
                    if self.clean.as_ref().is_none_or(|c| c.get(r) != Some(&true)) {
                        break;
                    }
                    st.done = ((r as u64 + 1) * i.region).min(st.total);
                }
                st.clean += st.done - before;
                if st.done >= st.total && before < st.total {
                    self.ahead.clear();
                    self.resyncing = false;
                    tracing::info!(raid = %self.name, mismatches = st.mismatches, repaired = st.repaired, unrecoverable = st.skipped, skipped_clean = st.clean, "resync complete");
                }
            }
        }
        let Some(st) = self.scrub else {
            return;
        };
        if self.window.is_some() || st.done >= st.total {
            return;
        }
        let unit = self.unit();
        // Windows host reads wait for come first (whatever the grant: a host waits).
        while let Some(&u) = self.urgent.front() {
            if u < st.done || self.ahead.contains(&u) || u >= st.total || self.is_clean(u) {
                self.urgent.pop_front();
            } else {
                break;
            }
        }
        let at = match self.urgent.front() {
            Some(&u) => u,
            None if st.done < self.scrub_limit => st.done,
            None => return,
        };
        let len = unit.min(st.total - at);
        let lock = self.window_lock(at, len);
        if self
            .parents
            .iter()
            .flatten()
            .any(|p| writes_data(p.op) && overlaps(p.offset, p.len, lock.0, lock.1))
        {
            return;
        }
        let mut reads = Vec::new();
        for (set, members) in self.sets.iter().enumerate() {
            for &member in members {
                if self.members[member].state != MemberState::Active {
                    continue;
                }
                match ctx.scratch.take(len) {
                    Some(chain) => reads.push(WRead {
                        set,
                        member,
                        chain,
                        status: STATUS_SUCCESS,
                        verdicts: None,
                    }),
                    None => {
                        for r in &reads {
                            ctx.scratch.give(r.chain);
                        }
                        return;
                    }
                }
            }
        }
        self.healing.push((usize::MAX, lock.0, lock.1));
        let n = reads.len();
        self.window = Some(Window {
            at,
            len,
            lock,
            phase: WPhase::Reading,
            pending: 0,
            reads,
            blocks: Vec::new(),
            repairs: Vec::new(),
        });
        for k in 0..n {
            let Some(r) = self.window.as_ref().map(|w| w.reads[k].clone()) else {
                return;
            };
            let io = Io {
                token: 0,
                op: Op::Read,
                offset: self.data_offset + at,
                len,
                fua: false,
                chain: ChainRef {
                    id: r.chain,
                    skip: 0,
                },
                seq: REPORT_VERDICTS,
            };
            self.scrub_io(r.set, r.member, io, k as u64, ctx);
        }
    }

    /// Sends one of a scrub window's member I/Os (`index`: which read or block it is).
    fn scrub_io(&mut self, set: usize, member: usize, io: Io, index: u64, ctx: &mut Ctx<'_>) {
        if let Some(w) = self.window.as_mut() {
            w.pending += 1;
        }
        self.own_io(Own::Scrub, set, member, io, index, ctx);
    }

    /// Sends the device's own I/O `io` (no parent: a scrub's, the bitmap's or a rebuild's)
    /// to `member` of `set`; `tried` is the child's note for its completion.
    fn own_io(
        &mut self,
        kind: Own,
        set: usize,
        member: usize,
        io: Io,
        tried: u64,
        ctx: &mut Ctx<'_>,
    ) {
        let i = match self.free_children.pop() {
            Some(i) => i,
            None => {
                self.children.push(None);
                self.children.len() - 1
            }
        };
        let io = Io {
            token: i as u64,
            ..io
        };
        self.children[i] = Some(Child {
            parent: usize::MAX,
            set,
            member,
            io,
            tried,
            raw: false,
            bad: 0,
            heal: false,
            scrub: kind == Own::Scrub,
            intent: kind == Own::Intent,
            rebuild: kind == Own::Rebuild,
        });
        self.members[member].dev.submit(io, ctx);
    }

    /// A scrub I/O ended (`c.tried` is its index in the window's reads or blocks).
    fn scrub_child_done(&mut self, c: &Child, status: u16, ctx: &mut Ctx<'_>) {
        let verdicts = if c.io.op == Op::Read && c.io.seq == REPORT_VERDICTS {
            self.members[c.member].dev.take_verdicts(c.io.token)
        } else {
            None
        };
        let Some(w) = self.window.as_mut() else {
            return;
        };
        w.pending = w.pending.saturating_sub(1);
        let k = usize::try_from(c.tried).unwrap_or(usize::MAX);
        match w.phase {
            WPhase::Reading => {
                if let Some(r) = w.reads.get_mut(k) {
                    r.status = status;
                    r.verdicts = verdicts;
                }
            }
            WPhase::Blocks => {
                if let Some(b) = w.blocks.get_mut(k) {
                    b.2 = status;
                }
            }
            WPhase::Writing => {
                if status == STATUS_SUCCESS {
                    if let Some(st) = self.scrub.as_mut() {
                        st.repaired += 1;
                    }
                    self.integrity.healed += 1;
                } else {
                    tracing::error!(raid = %self.name, member = c.member, offset = c.io.offset, status, "scrub: the rewrite of a bad copy failed");
                }
            }
        }
        if self.window.as_ref().is_some_and(|w| w.pending == 0) {
            self.window_step(ctx);
        }
    }

    /// Whether a status says the copy's data is bad (rewriting it may cure it).
    fn bad_copy(status: u16) -> bool {
        status == STATUS_INTEGRITY || status == STATUS_READ_ERROR
    }

    /// The window's reads (or block re-reads, or repairs) all ended: what next.
    fn window_step(&mut self, ctx: &mut Ctx<'_>) {
        let Some(mut w) = self.window.take() else {
            return;
        };
        let bs = u64::from(self.block_size);
        let blocks = w.len / bs;
        match w.phase {
            WPhase::Reading => {
                let mut again = Vec::new();
                let mut repairs = Vec::new();
                for set in 0..self.sets.len() {
                    let copies: Vec<usize> = (0..w.reads.len())
                        .filter(|&k| w.reads[k].set == set)
                        .collect();
                    let judged = copies.iter().all(|&k| {
                        let r = &w.reads[k];
                        (r.status == STATUS_SUCCESS || r.status == STATUS_INTEGRITY)
                            && r.verdicts
                                .as_ref()
                                .is_some_and(|v| v.len() as u64 == blocks)
                    });
                    if judged {
                        for b in 0..blocks {
                            self.judge_block(&w, &copies, b, &mut repairs, ctx);
                        }
                    } else if copies.iter().all(|&k| w.reads[k].status == STATUS_SUCCESS) {
                        for b in 0..blocks {
                            let good: Vec<usize> = copies.clone();
                            self.compare_copies(&w, &good, b, ctx);
                        }
                    } else {
                        for &k in &copies {
                            for b in 0..blocks {
                                again.push((k, b, STATUS_SUCCESS));
                            }
                        }
                    }
                }
                if again.is_empty() {
                    if repairs.is_empty() {
                        self.finish_window(w, ctx);
                    } else {
                        w.phase = WPhase::Writing;
                        let at = w.at;
                        self.window = Some(w);
                        self.send_repairs(at, repairs, ctx);
                    }
                    return;
                }
                // Sets judged by their records are repaired with the re-read ones.
                w.repairs = repairs;
                w.phase = WPhase::Blocks;
                w.blocks = again;
                let list: Vec<(usize, u64)> = w.blocks.iter().map(|b| (b.0, b.1)).collect();
                let reads = w.reads.clone();
                let at = w.at;
                self.window = Some(w);
                for (i, (k, b)) in list.into_iter().enumerate() {
                    let r = &reads[k];
                    let io = Io {
                        token: 0,
                        op: Op::Read,
                        offset: self.data_offset + at + b * bs,
                        len: bs,
                        fua: false,
                        chain: ChainRef {
                            id: r.chain,
                            skip: b * bs,
                        },
                        seq: 0,
                    };
                    self.scrub_io(r.set, r.member, io, i as u64, ctx);
                }
            }
            WPhase::Blocks => {
                let mut repairs = std::mem::take(&mut w.repairs);
                let mut keys: Vec<(usize, u64)> = w
                    .blocks
                    .iter()
                    .map(|&(k, b, _)| (w.reads[k].set, b))
                    .collect();
                keys.sort_unstable();
                keys.dedup();
                for (set, b) in keys {
                    let of_block: Vec<(usize, u16)> = w
                        .blocks
                        .iter()
                        .filter(|&&(k, bb, _)| bb == b && w.reads[k].set == set)
                        .map(|&(k, _, st)| (k, st))
                        .collect();
                    let good: Vec<usize> = of_block
                        .iter()
                        .filter(|x| x.1 == STATUS_SUCCESS)
                        .map(|x| x.0)
                        .collect();
                    let bad: Vec<usize> = of_block
                        .iter()
                        .filter(|x| Self::bad_copy(x.1))
                        .map(|x| x.0)
                        .collect();
                    self.compare_copies(&w, &good, b, ctx);
                    if bad.is_empty() {
                        continue;
                    }
                    let offset = self.data_offset + w.at + b * bs;
                    if let Some(&from) = good.first() {
                        if let Some(st) = self.scrub.as_mut() {
                            st.mismatches += bad.len() as u64;
                        }
                        for k in bad {
                            repairs.push((
                                w.reads[k].set,
                                w.reads[k].member,
                                w.reads[from].chain,
                                b,
                                None,
                            ));
                        }
                    } else {
                        if let Some(st) = self.scrub.as_mut() {
                            st.skipped += 1;
                        }
                        self.integrity.unrecoverable += 1;
                        tracing::error!(raid = %self.name, set, member_offset = offset, "scrub: no copy of a block reads good: reported, not repaired");
                    }
                }
                if repairs.is_empty() {
                    self.finish_window(w, ctx);
                    return;
                }
                w.phase = WPhase::Writing;
                let at = w.at;
                self.window = Some(w);
                self.send_repairs(at, repairs, ctx);
            }
            WPhase::Writing => self.finish_window(w, ctx),
        }
    }

    /// Writes the repairs of a window: `(set, member, good copy's buffer, block, sequence)`
    /// (a copy judged stale keeps the newest copy's sequence; a bad one gets a new one).
    fn send_repairs(
        &mut self,
        at: u64,
        repairs: Vec<(usize, usize, u32, u64, Option<u32>)>,
        ctx: &mut Ctx<'_>,
    ) {
        let bs = u64::from(self.block_size);
        for (set, member, chain, b, keep) in repairs {
            let seq = match keep.map(u64::from).or_else(|| self.take_seq()) {
                Some(s) => s,
                None => {
                    // The committed mark is reached: not repaired now (reported skipped).
                    if let Some(st) = self.scrub.as_mut() {
                        st.skipped += 1;
                    }
                    continue;
                }
            };
            tracing::warn!(raid = %self.name, member, device = self.members[member].dev.name(), member_offset = self.data_offset + at + b * bs, "scrub: a bad or stale copy is rewritten from the newest good one");
            let io = Io {
                token: 0,
                op: Op::Write,
                offset: self.data_offset + at + b * bs,
                len: bs,
                fua: true,
                chain: ChainRef {
                    id: chain,
                    skip: b * bs,
                },
                seq,
            };
            self.scrub_io(set, member, io, u64::MAX, ctx);
        }
    }

    /// Judges block `b` of a window by its copies' records: the newest good copy wins and is
    /// written over every other (bad, unwritten, or older); with no good copy a bad block is
    /// reported; copies none of which has a record are compared.
    fn judge_block(
        &mut self,
        w: &Window,
        copies: &[usize],
        b: u64,
        repairs: &mut Vec<(usize, usize, u32, u64, Option<u32>)>,
        ctx: &mut Ctx<'_>,
    ) {
        let i = usize::try_from(b).unwrap_or(usize::MAX);
        let verdict = |k: usize| {
            w.reads[k]
                .verdicts
                .as_ref()
                .and_then(|v| v.get(i).copied())
                .unwrap_or(Verdict::Bad)
        };
        let mut winner: Option<(usize, u32)> = None;
        for &k in copies {
            if let Verdict::Good { seq } = verdict(k) {
                if winner.is_none_or(|(_, s)| newer(seq, s)) {
                    winner = Some((k, seq));
                }
            }
        }
        match winner {
            Some((from, seq)) => {
                // A good or unwritten copy holding the same data is not stale, whatever its
                // sequence (a rebuild writes its copy with a new one).
                let stale: Vec<usize> = copies
                    .iter()
                    .copied()
                    .filter(|&k| verdict(k) != Verdict::Good { seq })
                    .filter(|&k| {
                        verdict(k) == Verdict::Bad
                            || !same_block(w, k, from, b, self.block_size, ctx)
                    })
                    .collect();
                if stale.is_empty() {
                    return;
                }
                if let Some(st) = self.scrub.as_mut() {
                    st.mismatches += stale.len() as u64;
                }
                for k in stale {
                    repairs.push((
                        w.reads[k].set,
                        w.reads[k].member,
                        w.reads[from].chain,
                        b,
                        Some(seq),
                    ));
                }
            }
            None if copies.iter().any(|&k| verdict(k) == Verdict::Bad) => {
                if let Some(st) = self.scrub.as_mut() {
                    st.skipped += 1;
                }
                self.integrity.unrecoverable += 1;
                tracing::error!(raid = %self.name, member_offset = self.data_offset + w.at + b * u64::from(self.block_size), "scrub: no copy of a block reads good: reported, not repaired");
            }
            None => self.compare_copies(w, copies, b, ctx),
        }
    }

    /// Counts block `b` of the window as a mismatch if the copies `good` (reads that
    /// succeeded) do not all hold the same data.
    fn compare_copies(&mut self, w: &Window, good: &[usize], b: u64, ctx: &mut Ctx<'_>) {
        if good.len() < 2 {
            return;
        }
        let bs = self.block_size as usize;
        let at = usize::try_from(b).unwrap_or(usize::MAX).saturating_mul(bs);
        let mut first = vec![0u8; bs];
        let mut other = vec![0u8; bs];
        if ctx
            .pool
            .copy_out(ctx.scratch.chain(w.reads[good[0]].chain), at, &mut first)
            .is_err()
        {
            return;
        }
        for &k in &good[1..] {
            if ctx
                .pool
                .copy_out(ctx.scratch.chain(w.reads[k].chain), at, &mut other)
                .is_ok()
                && other != first
            {
                if let Some(st) = self.scrub.as_mut() {
                    st.mismatches += 1;
                }
                tracing::error!(raid = %self.name, member_offset = self.data_offset + w.at + b * self.block_size as u64, "scrub: the copies of a block differ and no record says which is right: reported, not changed");
                return;
            }
        }
    }

    /// Ends a scrub window: buffers back, its host writes released, progress.
    fn finish_window(&mut self, w: Window, ctx: &mut Ctx<'_>) {
        for r in &w.reads {
            ctx.scratch.give(r.chain);
        }
        if let Some(i) = self
            .healing
            .iter()
            .position(|h| h.0 == usize::MAX && (h.1, h.2) == w.lock)
        {
            self.healing.swap_remove(i);
        }
        let unit = self.unit();
        if let Some(st) = self.scrub.as_mut() {
            if w.at == st.done {
                st.done = (w.at + w.len).min(st.total);
                while self.ahead.remove(&st.done) {
                    st.done = (st.done + unit).min(st.total);
                }
            } else {
                self.ahead.insert(w.at);
            }
            if st.done >= st.total {
                self.ahead.clear();
                if self.resyncing {
                    self.resyncing = false;
                    tracing::info!(raid = %self.name, mismatches = st.mismatches, repaired = st.repaired, unrecoverable = st.skipped, skipped_clean = st.clean, "resync complete");
                } else {
                    tracing::info!(raid = %self.name, mismatches = st.mismatches, repaired = st.repaired, unrecoverable = st.skipped, "scrub complete");
                }
            }
        }
    }

    /// Sends a bitmap I/O to member `member`.
    fn intent_io(&mut self, member: usize, io: Io, ctx: &mut Ctx<'_>) {
        let set = self
            .sets
            .iter()
            .position(|s| s.contains(&member))
            .unwrap_or(0);
        if let Some(it) = self.intent.as_mut() {
            it.outstanding += 1;
        }
        self.own_io(Own::Intent, set, member, io, 0, ctx);
    }

    /// Moves the bitmap on: the load at import, then block writes setting the bits writes
    /// wait for, then (idle regions, no resync running) a flush of every member and the
    /// block write clearing them.
    fn intent_kick(&mut self, ctx: &mut Ctx<'_>) {
        let Some(i) = self.intent.as_mut() else {
            return;
        };
        if i.outstanding > 0 {
            return;
        }
        let spec = i.spec;
        let block = super::intent::BLOCK as u64;
        if i.load_wanted {
            let targets: Vec<usize> = (0..self.members.len())
                .filter(|&m| self.members[m].state == MemberState::Active)
                .collect();
            let mut chains = Vec::new();
            for &m in &targets {
                match ctx.scratch.take(block) {
                    Some(c) => chains.push((m, c)),
                    None => {
                        for (_, c) in chains {
                            ctx.scratch.give(c);
                        }
                        return;
                    }
                }
            }
            let Some(i) = self.intent.as_mut() else {
                return;
            };
            i.load_wanted = false;
            i.loading = Some((vec![false; i.regions()], false));
            if chains.is_empty() {
                self.intent_settled(ctx);
                return;
            }
            self.intent_chains = chains.clone();
            for (m, c) in chains {
                let io = Io {
                    token: 0,
                    op: Op::Read,
                    offset: spec.offset,
                    len: block,
                    fua: false,
                    chain: ChainRef { id: c, skip: 0 },
                    seq: 0,
                };
                self.intent_io(m, io, ctx);
            }
            return;
        }
        let targets: Vec<usize> = (0..self.members.len())
            .filter(|&m| self.members[m].state != MemberState::Failed)
            .collect();
        if let Some(bytes) = i.next_block() {
            let Some(c) = ctx.scratch.take(block) else {
                i.writing = None;
                return;
            };
            if ctx.pool.copy_in(ctx.scratch.chain(c), 0, &bytes).is_err() {
                ctx.scratch.give(c);
                i.writing = None;
                tracing::error!(raid = %self.name, "cannot place the write-intent block in a buffer");
                return;
            }
            self.intent_chains = vec![(usize::MAX, c)];
            if targets.is_empty() {
                self.intent_settled(ctx);
                return;
            }
            for m in targets {
                let io = Io {
                    token: 0,
                    op: Op::Write,
                    offset: spec.offset,
                    len: block,
                    fua: true,
                    chain: ChainRef { id: c, skip: 0 },
                    seq: 0,
                };
                self.intent_io(m, io, ctx);
            }
            return;
        }
        // Marks stay while a member is out or being rebuilt (they are what it misses) and
        // while a resync runs.
        if self.resyncing || self.members.iter().any(|m| m.state != MemberState::Active) {
            return;
        }
        let clear = i.clearable(ctx.now);
        if clear.is_empty() || targets.is_empty() {
            return;
        }
        i.flushing = Some(clear);
        for m in targets {
            let io = Io {
                token: 0,
                op: Op::Flush,
                offset: 0,
                len: 0,
                fua: false,
                chain: ChainRef { id: 0, skip: 0 },
                seq: 0,
            };
            self.intent_io(m, io, ctx);
        }
    }

    /// A bitmap I/O ended.
    fn intent_child_done(&mut self, c: &Child, status: u16, ctx: &mut Ctx<'_>) {
        let loading = self.intent.as_ref().is_some_and(|i| i.loading.is_some());
        if loading {
            let mut block = None;
            if status == STATUS_SUCCESS {
                if let Some(&(_, chain)) = self.intent_chains.iter().find(|x| x.0 == c.member) {
                    let mut buf = vec![0u8; super::intent::BLOCK];
                    if ctx
                        .pool
                        .copy_out(ctx.scratch.chain(chain), 0, &mut buf)
                        .is_ok()
                    {
                        block = Some(buf);
                    }
                }
            }
            if let Some(i) = self.intent.as_mut() {
                i.loaded(block.as_deref());
            }
        } else if status != STATUS_SUCCESS {
            // A member that cannot take the bitmap's write or flush has failed (the last
            // copy stays: its data writes fail on their own).
            tracing::warn!(raid = %self.name, member = c.member, status, "write-intent bitmap I/O failed");
            self.fail_member(c.member, c.set, status, ctx);
        }
        let Some(i) = self.intent.as_mut() else {
            return;
        };
        i.outstanding = i.outstanding.saturating_sub(1);
        if i.outstanding == 0 {
            self.intent_settled(ctx);
        }
    }

    /// The bitmap's I/O in flight all ended: apply it, let the writes waiting for it go.
    fn intent_settled(&mut self, ctx: &mut Ctx<'_>) {
        for (_, c) in std::mem::take(&mut self.intent_chains) {
            ctx.scratch.give(c);
        }
        let Some(i) = self.intent.as_mut() else {
            return;
        };
        if i.loading.is_some() {
            let dirty = i.load_done(ctx.now);
            let marked = dirty.iter().filter(|&&d| d).count();
            if self.resyncing {
                tracing::info!(raid = %self.name, regions = dirty.len(), marked, region_bytes = i.region, "write-intent bitmap read: the resync compares the marked regions only");
            } else {
                tracing::info!(raid = %self.name, regions = dirty.len(), marked, region_bytes = i.region, "write-intent bitmap read");
            }
            self.clean = Some(dirty.iter().map(|&d| !d).collect());
        } else if i.writing.is_some() {
            i.written();
        } else if let Some(c) = i.flushing.take() {
            // A member whose flush failed has failed: its marks stay.
            if self.members.iter().all(|m| m.state == MemberState::Active) {
                i.flushed(&c);
            }
        }
        for _ in 0..self.intent_waiting.len() {
            let Some(io) = self.intent_waiting.pop_front() else {
                break;
            };
            // `submit` makes it wait again if its bits are still not on the members.
            self.submit(io, ctx);
        }
        self.intent_kick(ctx);
    }

    /// Starts the rebuild's next window when it may: a member is being rebuilt, the grant
    /// allows, no host write of the window's range is in flight, and a buffer is there. The
    /// window is read from an active copy of the member's set and written to the member.
    fn rebuild_step(&mut self, ctx: &mut Ctx<'_>) {
        if self.rebuilding.is_some() || self.rebuild_stuck || self.resyncing {
            return;
        }
        let Some((m, done)) = self
            .members
            .iter()
            .enumerate()
            .find_map(|(i, x)| match x.state {
                MemberState::Rebuilding { done } => Some((i, done)),
                _ => None,
            })
        else {
            return;
        };
        let marked_only = self.marked_rebuild & 1u64.checked_shl(m as u32).unwrap_or(0) != 0;
        let mut done = done;
        if marked_only {
            let Some(i) = self.intent.as_ref() else {
                return;
            };
            if i.load_wanted || i.loading.is_some() {
                // The members' bitmaps are not read yet.
                self.intent_kick(ctx);
                return;
            }
            // Clean regions hold the same data on every copy: passed over (not rate-limited,
            // nothing is read or written).
            let region = i.region;
            let start = done;
            while done < self.member_len && !i.is_marked(i.regions_of(done, 1).start) {
                done = ((done / region + 1) * region).min(self.member_len);
            }
            if done > start {
                self.rebuild_skipped += done - start;
                if let MemberState::Rebuilding { done: d } = &mut self.members[m].state {
                    *d = done;
                }
            }
        }
        if done >= self.member_len {
            self.members[m].state = MemberState::Active;
            self.marked_rebuild &= !1u64.checked_shl(m as u32).unwrap_or(0);
            tracing::info!(raid = %self.name, member = m, device = self.members[m].dev.name(), copied = self.rebuild_copied, skipped = self.rebuild_skipped, "rebuild complete: member active");
            self.rebuild_copied = 0;
            self.rebuild_skipped = 0;
            return;
        }
        if done >= self.rebuild_limit {
            return;
        }
        let len = self.unit().min(self.member_len - done);
        let lock = self.window_lock(done, len);
        if self
            .parents
            .iter()
            .flatten()
            .any(|p| writes_data(p.op) && overlaps(p.offset, p.len, lock.0, lock.1))
            || self
                .healing
                .iter()
                .any(|h| overlaps(h.1, h.2, lock.0, lock.1))
        {
            return;
        }
        let Some(chain) = ctx.scratch.take(len) else {
            return;
        };
        self.healing.push((usize::MAX - 1, lock.0, lock.1));
        self.rebuilding = Some((m, done, len, chain, 0, false));
        self.rebuild_read(ctx);
    }

    /// Reads the rebuild window from an active copy not tried yet; none left: the rebuild
    /// stops (said), the window released.
    fn rebuild_read(&mut self, ctx: &mut Ctx<'_>) {
        let Some((m, at, len, chain, tried, _)) = self.rebuilding else {
            return;
        };
        let set = self.sets.iter().position(|s| s.contains(&m)).unwrap_or(0);
        let Some(src) = self.sets[set].iter().copied().find(|&x| {
            x != m && tried & 1 << x == 0 && self.members[x].state == MemberState::Active
        }) else {
            tracing::error!(raid = %self.name, member = m, at, "rebuild: no copy of a window reads good: the rebuild stops here");
            self.rebuild_stuck = true;
            self.rebuild_release(ctx);
            return;
        };
        if let Some(r) = self.rebuilding.as_mut() {
            r.4 |= 1 << src;
        }
        let io = Io {
            token: 0,
            op: Op::Read,
            offset: self.data_offset + at,
            len,
            fua: false,
            chain: ChainRef { id: chain, skip: 0 },
            seq: 0,
        };
        self.rebuild_io(src, set, io, ctx);
    }

    fn rebuild_io(&mut self, member: usize, set: usize, io: Io, ctx: &mut Ctx<'_>) {
        self.own_io(Own::Rebuild, set, member, io, 0, ctx);
    }

    /// A rebuild window's read or write ended.
    fn rebuild_child_done(&mut self, c: &Child, status: u16, ctx: &mut Ctx<'_>) {
        let Some((m, at, len, chain, _, writing)) = self.rebuilding else {
            return;
        };
        if !writing {
            if status != STATUS_SUCCESS {
                tracing::warn!(raid = %self.name, member = c.member, at, status, "rebuild: a copy's read failed: trying another");
                self.rebuild_read(ctx);
                return;
            }
            // The window's data goes to the member with a new sequence number (the same
            // data as every copy: the window's lock kept host writes out).
            let Some(seq) = self.take_seq() else {
                // The committed mark is reached: read it again later.
                self.rebuild_release(ctx);
                return;
            };
            if let Some(r) = self.rebuilding.as_mut() {
                r.5 = true;
            }
            let io = Io {
                token: 0,
                op: Op::Write,
                offset: self.data_offset + at,
                len,
                fua: false,
                chain: ChainRef { id: chain, skip: 0 },
                seq,
            };
            self.rebuild_io(m, c.set, io, ctx);
            return;
        }
        if status != STATUS_SUCCESS {
            // The new member cannot take writes: it has failed.
            self.fail_member(m, c.set, status, ctx);
        } else if let MemberState::Rebuilding { done } = &mut self.members[m].state {
            *done = (at + len).min(self.member_len);
            self.rebuild_copied += len;
        }
        self.rebuild_release(ctx);
        self.rebuild_step(ctx);
    }

    fn rebuild_release(&mut self, ctx: &mut Ctx<'_>) {
        if let Some((_, _, _, chain, _, _)) = self.rebuilding.take() {
            ctx.scratch.give(chain);
        }
        if let Some(i) = self.healing.iter().position(|h| h.0 == usize::MAX - 1) {
            self.healing.swap_remove(i);
        }
    }

    /// Submits the deferred host writes whose ranges no heal holds any more.
    fn release_deferred(&mut self, ctx: &mut Ctx<'_>) {
        for _ in 0..self.waiting_reads.len() {
            let Some(io) = self.waiting_reads.pop_front() else {
                break;
            };
            // `submit` makes it wait again if its windows are still not synced.
            self.submit(io, ctx);
        }
        if self.deferred.is_empty() {
            return;
        }
        for _ in 0..self.deferred.len() {
            let Some(io) = self.deferred.pop_front() else {
                break;
            };
            // `submit` defers it again if a heal still holds its range.
            self.submit(io, ctx);
        }
    }
}

impl Bdev for RaidBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn size(&self) -> u64 {
        self.member_len * self.sets.len() as u64
    }

    fn attach(&mut self, ids: &mut Attach) {
        for m in &mut self.members {
            m.dev.attach(ids);
        }
    }

    fn files<'a>(&'a self, out: &mut Vec<BorrowedFd<'a>>) {
        for m in &self.members {
            m.dev.files(out);
        }
    }

    fn submit(&mut self, io: Io, ctx: &mut Ctx<'_>) {
        if !in_range(&io, self.block_size, self.size()) {
            self.ready.push(Done {
                token: io.token,
                status: STATUS_LBA_OUT_OF_RANGE,
            });
            return;
        }
        self.host_ios += 1;
        if writes_data(io.op)
            && self
                .healing
                .iter()
                .any(|&(_, o, l)| overlaps(o, l, io.offset, io.len))
        {
            self.host_ios -= 1;
            self.deferred.push_back(io);
            return;
        }
        if io.op == Op::Read && self.resyncing {
            let unit = self.unit();
            let mut wait = false;
            for (at, len) in self.set_ranges(io.offset, io.len) {
                if !self.synced(at, len) {
                    wait = true;
                    let mut u = at / unit * unit;
                    while u < at + len {
                        if !self.synced(u, 1) && !self.urgent.contains(&u) {
                            self.urgent.push_back(u);
                        }
                        u += unit;
                    }
                }
            }
            if wait {
                self.host_ios -= 1;
                self.waiting_reads.push_back(io);
                return;
            }
        }
        let mut io = io;
        // The write-intent bitmap: the regions' bits go to the members before the write.
        let regions = if writes_data(io.op) {
            self.write_regions(io.offset, io.len)
        } else {
            0..0
        };
        if let Some(i) = self.intent.as_mut() {
            if !regions.is_empty() && !i.ready(regions.clone()) {
                i.mark(regions.clone());
                self.host_ios -= 1;
                self.intent_waiting.push_back(io);
                self.intent_kick(ctx);
                return;
            }
        }
        if writes_data(io.op) {
            let Some(seq) = self.take_seq() else {
                if !self.seq_waiting {
                    self.seq_waiting = true;
                    tracing::warn!(raid = %self.name, mark = self.seq_limit, "host writes wait: the pool's committed write sequence mark is reached (the metadata service commits the next one)");
                }
                self.host_ios -= 1;
                self.deferred.push_back(io);
                return;
            };
            io.seq = seq;
        }
        if let Some(i) = self.intent.as_mut() {
            i.start(regions);
        }
        let p = self.new_parent(io.token, io.op, io.offset, io.len);
        // The parent holds one count of its own while its pieces go out, so that a member
        // completing at once cannot end it early.
        if let Some(parent) = self.parents[p].as_mut() {
            parent.outstanding = 1;
        }
        if io.op == Op::Flush {
            for m in 0..self.members.len() {
                if self.members[m].state == MemberState::Active {
                    let set = self.sets.iter().position(|s| s.contains(&m)).unwrap_or(0);
                    self.send(
                        Child {
                            parent: p,
                            set,
                            member: m,
                            io,
                            tried: 0,
                            raw: false,
                            bad: 0,
                            heal: false,
                            scrub: false,
                            intent: false,
                            rebuild: false,
                        },
                        ctx,
                    );
                }
            }
            self.settle(p);
            return;
        }
        let nsets = self.sets.len() as u64;
        let mut at = 0;
        while at < io.len {
            let off = io.offset + at;
            let (set, set_off, len) = if nsets == 1 {
                (0, off, io.len)
            } else {
                let c = off / self.chunk;
                let within = off % self.chunk;
                (
                    (c % nsets) as usize,
                    c / nsets * self.chunk + within,
                    (self.chunk - within).min(io.len - at),
                )
            };
            let piece = Io {
                offset: self.data_offset + set_off,
                len,
                chain: super::ChainRef {
                    id: io.chain.id,
                    skip: io.chain.skip + at,
                },
                ..io
            };
            let active = self.sets[set]
                .iter()
                .filter(|&&m| self.members[m].state == MemberState::Active)
                .count();
            let pick = (io.op == Op::Read && active > 0).then(|| self.next_read % active);
            if active == 0 {
                // Only a bug leaves a set without an active copy (the last is never failed).
                self.fail_parent(p, STATUS_INTERNAL);
            }
            let mut nth = 0;
            for k in 0..self.sets[set].len() {
                let m = self.sets[set][k];
                // Reads from active copies; writes to every copy not failed (a member being
                // rebuilt takes every write, behind the rebuild or ahead of it).
                let takes = match self.members[m].state {
                    MemberState::Active => true,
                    MemberState::Rebuilding { .. } => io.op != Op::Read,
                    MemberState::Failed => false,
                };
                if !takes {
                    continue;
                }
                if self.members[m].state != MemberState::Active {
                    self.send(
                        Child {
                            parent: p,
                            set,
                            member: m,
                            io: piece,
                            tried: 0,
                            raw: false,
                            bad: 0,
                            heal: false,
                            scrub: false,
                            intent: false,
                            rebuild: false,
                        },
                        ctx,
                    );
                    continue;
                }
                nth += 1;
                if pick.is_some_and(|want| want != nth - 1) {
                    continue;
                }
                self.send(
                    Child {
                        parent: p,
                        set,
                        member: m,
                        io: piece,
                        tried: 0,
                        raw: false,
                        bad: 0,
                        heal: false,
                        scrub: false,
                        intent: false,
                        rebuild: false,
                    },
                    ctx,
                );
            }
            if pick.is_some() {
                self.next_read = self.next_read.wrapping_add(1);
            }
            at += len;
        }
        self.settle(p);
    }

    fn poll(&mut self, ctx: &mut Ctx<'_>, out: &mut Vec<Done>) -> bool {
        let mut progress = false;
        let mut scratch = std::mem::take(&mut self.scratch);
        // Member completions may start retries on other members: poll again while members
        // move (a few turns; the engine's loop comes back anyway).
        for _ in 0..4 {
            scratch.clear();
            let mut moved = false;
            for m in &mut self.members {
                moved |= m.dev.poll(ctx, &mut scratch);
            }
            for d in scratch.drain(..) {
                self.child_done(d, ctx);
            }
            progress |= moved;
            if !moved {
                break;
            }
        }
        self.scratch = scratch;
        self.intent_kick(ctx);
        self.scrub_step(ctx);
        self.rebuild_step(ctx);
        self.release_deferred(ctx);
        progress |= !self.ready.is_empty();
        out.append(&mut self.ready);
        progress
    }

    fn busy(&self) -> bool {
        !self.ready.is_empty()
            || self.members.iter().any(|m| m.dev.busy())
            || self
                .scrub
                .is_some_and(|s| s.done < s.total && s.done < self.scrub_limit)
            || !self.urgent.is_empty()
            || !self.waiting_reads.is_empty()
            || !self.intent_waiting.is_empty()
            || self.rebuilding.is_some()
            || (!self.rebuild_stuck
                && self.members.iter().any(|m| {
                    matches!(m.state, MemberState::Rebuilding { done } if done < self.rebuild_limit)
                }))
            || self
                .intent
                .as_ref()
                .is_some_and(|i| i.outstanding > 0 || i.load_wanted)
    }

    fn inflight(&self) -> usize {
        self.parents.iter().filter(|p| p.is_some()).count()
            + self.ready.len()
            + self.held.len()
            + self.deferred.len()
            + self.waiting_reads.len()
            + self.intent_waiting.len()
    }

    fn retries(&self) -> u64 {
        self.members.iter().map(|m| m.dev.retries()).sum()
    }

    fn start_scrub(&mut self) -> Result<(), String> {
        if self.level == RaidLevel::Raid0 {
            return Err(format!("{} is RAID 0: no copy to check against", self.name));
        }
        self.scrub = Some(ScrubStatus::begin(self.scrub, &self.name, self.member_len)?);
        Ok(())
    }

    fn scrub_status(&self) -> Option<ScrubStatus> {
        self.scrub
    }

    fn jobs(&self, out: &mut Vec<DeviceJob>) {
        if let Some((slot, done)) =
            self.members
                .iter()
                .enumerate()
                .find_map(|(i, m)| match m.state {
                    MemberState::Rebuilding { done } if !self.rebuild_stuck => Some((i, done)),
                    _ => None,
                })
        {
            out.push(DeviceJob {
                kind: JobKind::Rebuild,
                slot: u16::try_from(slot).unwrap_or(u16::MAX),
                done,
                total: self.member_len,
                started_at: self.rebuild_from.min(done),
            });
        }
        out.extend(ScrubStatus::job(self.scrub));
    }

    fn host_ios(&self) -> u64 {
        self.host_ios
    }

    fn set_job_limit(&mut self, kind: JobKind, limit: u64) {
        match kind {
            JobKind::Rebuild => self.rebuild_limit = limit,
            JobKind::Scrub => self.scrub_limit = limit,
        }
    }

    fn replace_member(
        &mut self,
        i: usize,
        dev: BdevBox,
        done: u64,
    ) -> Result<BdevBox, (BdevBox, String)> {
        if self.level == RaidLevel::Raid0 {
            return Err((
                dev,
                format!("{} is RAID 0: no member is replaced", self.name),
            ));
        }
        let busy = self.children.iter().flatten().any(|c| c.member == i)
            || self.members.get(i).is_some_and(|m| m.dev.inflight() > 0);
        if let Some(why) = super::replacement_refused(
            i,
            self.members.get(i).map(|m| m.state),
            busy,
            dev.as_ref(),
            self.block_size,
            self.data_offset + self.member_len,
        ) {
            return Err((dev, why));
        }
        let unit = self.unit();
        let done = done.min(self.member_len) / unit * unit;
        self.rebuild_from = done;
        self.rebuild_stuck = false;
        // A new drive: rebuilt whole.
        self.marked_rebuild &= !1u64.checked_shl(i as u32).unwrap_or(0);
        self.rebuild_copied = 0;
        self.rebuild_skipped = 0;
        let old = std::mem::replace(&mut self.members[i].dev, dev);
        self.members[i].state = MemberState::Rebuilding { done };
        tracing::info!(raid = %self.name, member = i, device = self.members[i].dev.name(), from = done, "member replaced: rebuilding");
        Ok(old)
    }

    fn member_integrity_errors(&self, i: usize) -> u64 {
        self.members.get(i).map_or(0, |m| m.dev.integrity_errors())
    }

    fn integrity_counts(&self) -> IntegrityCounts {
        self.integrity
    }

    fn carries_records(&self) -> bool {
        self.members
            .iter()
            .filter(|m| m.state != MemberState::Failed)
            .all(|m| m.dev.carries_records())
    }

    fn seq_headroom(&self) -> Option<u64> {
        (self.level != RaidLevel::Raid0 && self.seq_limit != 0)
            .then(|| self.seq_limit.saturating_sub(self.next_seq))
    }

    fn set_seq_limit(&mut self, limit: u64) {
        if self.seq_limit != 0 && (limit == 0 || limit > self.seq_limit) {
            if self.seq_waiting {
                tracing::info!(raid = %self.name, mark = limit, "host writes go on: a higher write sequence mark is committed");
            }
            self.seq_limit = limit;
            self.seq_waiting = false;
        }
    }

    fn member_geometry(&self, i: usize) -> Option<(u32, u64)> {
        self.members
            .get(i)
            .map(|m| (m.dev.block_size(), m.dev.size()))
    }

    fn submit_member(&mut self, i: usize, io: Io, ctx: &mut Ctx<'_>) -> Result<(), Io> {
        if i >= self.members.len() {
            return Err(io);
        }
        let p = self.new_parent(io.token, Op::Read, 0, 0);
        if let Some(parent) = self.parents[p].as_mut() {
            parent.outstanding = 1;
        }
        let set = self.sets.iter().position(|s| s.contains(&i)).unwrap_or(0);
        self.send(
            Child {
                parent: p,
                set,
                member: i,
                io,
                tried: 0,
                raw: true,
                bad: 0,
                heal: false,
                scrub: false,
                intent: false,
                rebuild: false,
            },
            ctx,
        );
        self.settle(p);
        Ok(())
    }

    fn failures_recorded(&mut self, members: &[usize]) {
        for &m in members {
            if m < 64 {
                self.unrecorded &= !(1 << m);
            }
        }
        if self.unrecorded == 0 && !self.held.is_empty() {
            tracing::info!(raid = %self.name, released = self.held.len(), "member failure recorded: held completions released");
            self.ready.append(&mut self.held);
        }
    }

    fn fail_recorded(&mut self, members: &[usize]) -> Vec<usize> {
        let mut out = Vec::new();
        for &m in members {
            let Some(set) = self.sets.iter().position(|s| s.contains(&m)) else {
                continue;
            };
            if self.members[m].state == MemberState::Active && self.others_active(set, m) {
                self.members[m].state = MemberState::Failed;
                tracing::warn!(
                    raid = %self.name,
                    member = m,
                    device = self.members[m].dev.name(),
                    "RAID member failed by the control plane (recorded on disk): going on degraded"
                );
                out.push(m);
            }
        }
        out
    }

    fn member_states(&self) -> Vec<MemberState> {
        RaidBdev::member_states(self)
    }

    fn held(&self) -> usize {
        self.held.len()
    }

    fn idle(&self) -> bool {
        self.inflight() == 0
            && self.children.iter().all(Option::is_none)
            && self.members.iter().all(|m| m.dev.idle())
    }

    fn release_buffers(&mut self, scratch: &mut super::Scratch) {
        if let Some(w) = self.window.take() {
            for r in w.reads {
                scratch.give(r.chain);
            }
        }
    }

    fn into_members(self: Box<Self>) -> Vec<BdevBox> {
        self.members.into_iter().map(|m| m.dev).collect()
    }

    fn drives_mut<'a>(&'a mut self, out: &mut Vec<&'a mut crate::drives::Drive>) {
        for m in &mut self.members {
            m.dev.drives_mut(out);
        }
    }
}

/// Whether reads `a` and `b` of scrub window `w` hold the same data in block `block`.
fn same_block(w: &Window, a: usize, b: usize, block: u64, block_size: u32, ctx: &Ctx<'_>) -> bool {
    let bs = block_size as usize;
    let at = usize::try_from(block)
        .unwrap_or(usize::MAX)
        .saturating_mul(bs);
    let mut x = vec![0u8; bs];
    let mut y = vec![0u8; bs];
    ctx.pool
        .copy_out(ctx.scratch.chain(w.reads[a].chain), at, &mut x)
        .is_ok()
        && ctx
            .pool
            .copy_out(ctx.scratch.chain(w.reads[b].chain), at, &mut y)
            .is_ok()
        && x == y
}
