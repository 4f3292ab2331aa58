//! [`ParityBdev`]: RAID 5 and RAID 6, a block device over block devices with rotating parity.
//!
//! The layout and the arithmetic are [`crate::parity`]'s. An I/O is cut into *pieces*, each
//! inside one column of one stripe and one *window* of rows (at most [`WINDOW`] bytes, so that
//! one operation's buffers stay small); the pieces of a write that share a stripe window make
//! one *stripe operation*.
//!
//! * A read of a column whose member is active goes straight to that member, into the
//!   request's buffers. A read of a failed member's column (or one whose member failed under
//!   it) is a stripe operation that reads the other columns and reconstructs it.
//! * A write is a stripe operation, run under the stripe window's lock (operations on one
//!   window run one at a time, in arrival order; different windows run in parallel). With
//!   every member active it picks the cheaper of *read-modify-write* (read the old data it
//!   overwrites and the old parity, fold the change into the parity) and *reconstruct-write*
//!   (read the rows of the columns it does not overwrite, compute the parity afresh); a write
//!   covering whole rows of every data column reads nothing (a full-stripe write). Degraded,
//!   it reads every surviving column and reconstructs the lost ones first when it needs their
//!   old data, otherwise it reconstruct-writes. Then the new data (straight from the request's
//!   buffers) and the new parity go to every active member of the window, and the write
//!   completes when all of them have.
//! * Old data and parity are read into, and new parity written from, chains of the engine's
//!   parity buffers ([`super::Scratch`]); an operation that finds too few free waits for
//!   others to give theirs back.
//! * Write zeroes and deallocate are writes of zeroes (a deallocated block reads as zeroes,
//!   and the parity must agree with it).
//! * A member whose I/O fails is failed (an [`Event::MemberFailed`]) while fewer members than
//!   the parity columns have failed: the I/O goes on degraded (a stripe operation whose read
//!   failed plans again). Past that, the I/O fails; Reservation Conflict fails no member.
//! * A member read that fails its integrity check (members formatted with records) fails no
//!   member: that column is lost to the one operation (its `bad` mask), rebuilt from the
//!   others and written back (a read, a scrub), or replaced by what a write puts there.
//! * The stripe journal ([`JournalSpec`]) logs every partial-stripe write before it is
//!   applied and is replayed at import: the write hole closed.
//!
//! Not yet: the write-intent bitmap.

use std::collections::{HashMap, VecDeque};
use std::os::fd::BorrowedFd;

use duplex_ipc::desc::{
    STATUS_FENCED, STATUS_INTEGRITY, STATUS_INTERNAL, STATUS_LBA_OUT_OF_RANGE, STATUS_READ_ERROR,
    STATUS_RESERVATION_CONFLICT, STATUS_SUCCESS,
};

use super::journal::{self, Header, Kind, HEADER};
use super::raid::{IntegrityCounts, MemberState};
use super::{
    in_range, Attach, Bdev, BdevBox, ChainRef, Ctx, DeviceJob, Done, Event, Io, JobKind, Op,
};
use crate::parity::{self, Geometry};

/// The largest row range one stripe operation covers (its lock and its buffers).
pub const WINDOW: u64 = 64 * 1024;

#[derive(Debug)]
struct Member {
    dev: BdevBox,
    state: MemberState,
    /// Its reads that failed their integrity check, lately.
    bad: super::BadReads,
}

#[derive(Debug, Clone, Copy)]
struct Parent {
    token: u64,
    op: Op,
    /// Its data's chain id.
    chain: u32,
    outstanding: u32,
    status: u16,
}

/// Part of a parent I/O inside one column of one stripe window.
#[derive(Debug, Clone, Copy)]
struct Piece {
    stripe: u64,
    col: usize,
    /// Rows `[a, b)` of the column.
    a: u64,
    b: u64,
    /// Bytes of the parent's chain before row `a`'s byte.
    skip: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// A read straight from a member into the parent's buffers (the piece, to reconstruct
    /// it if the member fails).
    Direct(usize),
    /// A read or write of a stripe operation.
    Stripe(usize),
    /// A flush, or raw member access: no redundancy.
    Plain { parent: usize, raw: bool },
    /// The journal's own work (replay, reset).
    Task,
}

#[derive(Debug, Clone, Copy)]
struct Child {
    owner: Owner,
    member: usize,
    parent: usize,
    piece: Option<Piece>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Read old data and old parity, fold the change in.
    Rmw,
    /// Read the rows not overwritten (of surviving columns), compute the parity afresh.
    Rcw,
    /// Read every surviving column, rebuild the lost ones, then compute (a degraded read, or a
    /// degraded write that needs a lost column's old data).
    Reconstruct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queued,
    Reading,
    /// Parity computed; the journal entry is being written (or waits for ring space).
    Journaling,
    Writing,
}

#[derive(Debug)]
struct StripeOp {
    parent: usize,
    /// Read, Write or WriteZeroes.
    op: Op,
    fua: bool,
    /// The parent's chain.
    chain: u32,
    stripe: u64,
    key: (u64, u64),
    /// Writes: at most one piece per data column. Reads: the one piece to reconstruct.
    pieces: Vec<Piece>,
    lo: u64,
    hi: u64,
    phase: Phase,
    plan: Plan,
    pending: u32,
    scratch: Option<u32>,
    /// Scratch slot of each column (`0..k` data, `k` P, `k + 1` Q), if it has one.
    slots: Vec<Option<u64>>,
    /// A read failed and its member was failed: plan again when the reads are back.
    replan: bool,
    status: u16,
    /// Where the journal entry is built in the scratch chain, and its payload.
    entry_off: u64,
    entry: Option<EntryInfo>,
    /// The data and parity writes, once computed.
    writes: Vec<(usize, Io)>,
    /// Holds ring space in the journal (until its writes are done).
    counted: bool,
    /// A rebuild operation: the member whose column of this window it rebuilds.
    rebuild: Option<usize>,
    /// A scrub operation: check this window's parity against its data, rewrite it if wrong.
    scrub: bool,
    /// Members whose reads of this window failed their integrity check: their columns are
    /// treated as lost here (reconstructed from the others) and, by a read or a scrub,
    /// written back (the member is not failed for a bad block).
    bad: u64,
    /// Heal writes among `writes` (counted healed when they complete).
    heals: u32,
}

/// A computed journal entry's payload (in the op's scratch chain after its header).
#[derive(Debug, Clone)]
struct EntryInfo {
    pieces: Vec<(u16, u64, u64)>,
    payload_len: u64,
    payload_crc: u32,
}

/// Where a parity device keeps its stripe journal: a ring of `len` bytes from byte `offset`
/// of every member (in the journal area), and the pool's tag that its records carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalSpec {
    /// First byte of the ring on every member.
    pub offset: u64,
    /// Bytes of the ring (a multiple of 4 KiB).
    pub len: u64,
    /// The pool's tag.
    pub tag: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JState {
    /// Nothing done yet: the replay starts at the first poll.
    Starting,
    /// Replaying the newest generation's entries; host I/O waits.
    Replaying,
    /// Serving.
    Ready,
    /// Flushing and starting a new generation (the ring was full); journaling waits.
    Resetting,
    /// The replay could not finish: every I/O fails.
    Broken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reading every member's marker.
    Markers,
    /// Reading the next window of member `member`'s ring (from byte `at`).
    Scan { member: usize, at: u64 },
    /// Reading the record of the next entry to replay (the lowest sequence left).
    Fetch,
    /// Writing one replayed entry; then the next.
    Apply,
    /// Flushing every member.
    Flush,
    /// Writing the new generation's marker on every member.
    Mark,
}

#[derive(Debug)]
struct Task {
    stage: Stage,
    pending: u32,
    /// A scratch chain for reads and replayed entries.
    chain: Option<u32>,
    /// Ring bytes read and not parsed yet (of the member being scanned).
    buf: Vec<u8>,
    /// The newest generation found.
    found: u64,
    replayed: u64,
    /// The newest generation's valid entries found on the rings, by sequence (an entry is on
    /// every parity member of its stripe; one copy is enough): where its record is (member,
    /// ring byte) and its header. Replayed in sequence order once every ring is scanned, so
    /// that an older entry never lands over a newer one of the same rows.
    entries: std::collections::BTreeMap<u64, (usize, u64, Header)>,
}

#[derive(Debug)]
struct Journal {
    spec: JournalSpec,
    gen: u64,
    seq: u64,
    /// Next free byte of each member's ring.
    heads: Vec<u64>,
    state: JState,
    /// Operations waiting for ring space.
    waiting: VecDeque<usize>,
    /// Operations holding ring space.
    active: usize,
    /// Host I/O that arrived during the replay.
    held: Vec<Io>,
    /// 4 KiB chain for markers, kept.
    marker: Option<u32>,
    task: Option<Task>,
}

/// Bytes read per replay read.
const SCAN: u64 = 256 * 1024;

/// RAID 5 or RAID 6 over block devices. See the module docs.
#[derive(Debug)]
pub struct ParityBdev {
    name: String,
    geo: Geometry,
    block_size: u32,
    data_offset: u64,
    member_len: u64,
    window: u64,
    members: Vec<Member>,
    parents: Vec<Option<Parent>>,
    free_parents: Vec<usize>,
    ops: Vec<Option<StripeOp>>,
    free_ops: Vec<usize>,
    children: Vec<Option<Child>>,
    free_children: Vec<usize>,
    /// Per stripe window, the operations in arrival order; the front one runs.
    locks: HashMap<(u64, u64), VecDeque<usize>>,
    /// Running operations waiting for parity buffers.
    starved: VecDeque<usize>,
    ready: Vec<Done>,
    scratch_done: Vec<Done>,
    hold_until_recorded: bool,
    unrecorded: u64,
    held: Vec<Done>,
    journal: Option<Journal>,
    /// The rebuild operation in flight (one window at a time).
    rebuilding: Option<usize>,
    /// A rebuild window failed: no more until a member is replaced again.
    rebuild_stuck: bool,
    /// The scrub in progress or last finished, and its operation in flight.
    scrub: Option<ScrubStatus>,
    scrubbing: Option<usize>,
    /// How far the raid service lets the rebuild and the scrub go (member bytes; windows
    /// start only below it). Without a raid service: unlimited.
    rebuild_limit: u64,
    scrub_limit: u64,
    /// Where the current rebuild started in this device (a resumed one: its checkpoint).
    rebuild_from: u64,
    /// Host I/Os submitted to the device (the raid service yields to them).
    host_ios: u64,
    /// What the integrity handling did (members formatted with records).
    integrity: IntegrityCounts,
}

/// How far a scrub got and what it found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubStatus {
    /// Bytes of each member's data area checked (the scrub is done when it reaches `total`).
    pub done: u64,
    /// Bytes of each member's data area.
    pub total: u64,
    /// Windows (at most 64 KiB of rows of a stripe) whose parity disagreed with their data.
    pub mismatches: u64,
    /// Of those, windows whose parity was rewritten from the data.
    pub repaired: u64,
    /// Windows that could not be checked (a column lost, or a read failed).
    pub skipped: u64,
    /// A mirror's resync: bytes of each member's data area skipped as clean (the write-intent
    /// bitmap marked no write there).
    pub clean: u64,
}

impl ScrubStatus {
    /// A new scrub of `total` member bytes on device `name`, refused while `current` runs.
    pub(crate) fn begin(
        current: Option<ScrubStatus>,
        name: &str,
        total: u64,
    ) -> Result<ScrubStatus, String> {
        if current.is_some_and(|s| s.done < s.total) {
            return Err(format!("{name}: a scrub is running"));
        }
        tracing::info!(raid = %name, "scrub started");
        Ok(ScrubStatus {
            total,
            ..ScrubStatus::default()
        })
    }

    /// The scrub as a long job, while it runs.
    pub(crate) fn job(current: Option<ScrubStatus>) -> Option<DeviceJob> {
        current.filter(|s| s.done < s.total).map(|s| DeviceJob {
            kind: JobKind::Scrub,
            slot: 0,
            done: s.done,
            total: s.total,
            started_at: 0,
        })
    }
}

impl ParityBdev {
    /// Builds a RAID 5 (`np` 1) or RAID 6 (`np` 2) device named `name` over `members` (in slot
    /// order) with `chunk`-byte columns, using bytes `[data_offset, data_offset + data_len)`
    /// of every member; `states` as for [`super::RaidBdev::new`]. The geometry must have
    /// passed [`super::RaidBdev::check`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        np: usize,
        chunk: u64,
        data_offset: u64,
        member_len: u64,
        block_size: u32,
        members: Vec<BdevBox>,
        states: &[MemberState],
    ) -> Self {
        let n = members.len();
        let window = chunk.min(WINDOW);
        // A rebuild resumed from a checkpoint starts at the window it falls in.
        let states: Vec<MemberState> = (0..n)
            .map(
                |i| match states.get(i).copied().unwrap_or(MemberState::Active) {
                    MemberState::Rebuilding { done } => MemberState::Rebuilding {
                        done: done.min(member_len) / window * window,
                    },
                    s => s,
                },
            )
            .collect();
        let rebuild_from = states
            .iter()
            .find_map(|s| match s {
                MemberState::Rebuilding { done } => Some(*done),
                _ => None,
            })
            .unwrap_or(0);
        for (member, s) in states.iter().enumerate() {
            if let MemberState::Rebuilding { done } = s {
                tracing::info!(raid = %name, member, from = *done, total = member_len, "member rebuilding: the rebuild resumes from its checkpoint");
            }
        }
        Self {
            name: name.to_owned(),
            geo: Geometry { n, np, chunk },
            block_size,
            data_offset,
            member_len,
            window,
            members: members
                .into_iter()
                .enumerate()
                .map(|(i, dev)| Member {
                    dev,
                    state: states.get(i).copied().unwrap_or(MemberState::Active),
                    bad: super::BadReads::default(),
                })
                .collect(),
            parents: Vec::new(),
            free_parents: Vec::new(),
            ops: Vec::new(),
            free_ops: Vec::new(),
            children: Vec::new(),
            free_children: Vec::new(),
            locks: HashMap::new(),
            starved: VecDeque::new(),
            ready: Vec::new(),
            scratch_done: Vec::new(),
            hold_until_recorded: false,
            unrecorded: 0,
            held: Vec::new(),
            journal: None,
            rebuilding: None,
            rebuild_stuck: false,
            scrub: None,
            scrubbing: None,
            rebuild_limit: u64::MAX,
            scrub_limit: u64::MAX,
            rebuild_from,
            host_ios: 0,
            integrity: IntegrityCounts::default(),
        }
    }

    /// Keeps a stripe journal in `spec`'s ring (if any): every write is logged there before it is
    /// applied, and the device replays the newest generation's entries before it serves (the
    /// write hole closed). Without it, a crash during a write may leave a stripe's parity
    /// disagreeing with its data.
    pub fn with_optional_journal(self, spec: Option<JournalSpec>) -> Self {
        match spec {
            Some(spec) => self.with_journal(spec),
            None => self,
        }
    }

    /// See [`ParityBdev::with_optional_journal`].
    pub fn with_journal(mut self, spec: JournalSpec) -> Self {
        let n = self.geo.n;
        self.journal = Some(Journal {
            spec,
            gen: 0,
            seq: 0,
            heads: vec![HEADER as u64; n],
            state: JState::Starting,
            waiting: VecDeque::new(),
            active: 0,
            held: Vec::new(),
            marker: None,
            task: None,
        });
        self
    }

    /// As [`super::RaidBdev::hold_until_recorded`].
    pub fn hold_until_recorded(mut self, on: bool) -> Self {
        self.hold_until_recorded = on;
        self
    }

    /// Parity buffer bytes the engine should keep for this device: room for a few of its
    /// largest operations at once.
    pub fn scratch_wanted(n: usize, chunk: u64) -> u64 {
        let window = chunk.min(WINDOW);
        // Operations (each at most a window of every member plus its journal entry), and the
        // journal's replay reads and marker.
        4 * n as u64 * window + Self::task_bytes(n, window) + HEADER as u64
    }

    /// The journal task's buffer: a scan window, every member's marker, or the largest entry.
    fn task_bytes(n: usize, window: u64) -> u64 {
        SCAN.max(HEADER as u64 + n as u64 * window)
            .max(n as u64 * HEADER as u64)
    }

    /// Members that cannot serve every read (failed or being rebuilt): the device survives
    /// at most its parity count of them.
    fn degraded_count(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.state != MemberState::Active)
            .count()
    }

    /// Whether member `m` takes writes (it is not failed).
    fn writable(&self, m: usize) -> bool {
        self.members[m].state != MemberState::Failed
    }

    /// Whether column `col` of `stripe` can be read up to row `hi` (its member is active, or
    /// rebuilt that far).
    fn readable(&self, stripe: u64, col: usize, hi: u64) -> bool {
        match self.members[self.geo.member(stripe, col)].state {
            MemberState::Active => true,
            MemberState::Failed => false,
            MemberState::Rebuilding { done } => stripe * self.geo.chunk + hi <= done,
        }
    }

    /// Columns of `stripe` that operation reads cannot use up to row `hi`: members not
    /// readable there, and members in `bad` (their reads failed the integrity check).
    fn lost_cols(&self, stripe: u64, hi: u64, bad: u64) -> Vec<usize> {
        (0..self.geo.n)
            .filter(|&c| {
                let m = self.geo.member(stripe, c);
                !self.readable(stripe, c, hi) || (m < 64 && bad & 1 << m != 0)
            })
            .collect()
    }

    fn member_offset(&self, stripe: u64, row: u64) -> u64 {
        self.data_offset + stripe * self.geo.chunk + row
    }

    fn new_parent(&mut self, token: u64, op: Op, chain: u32) -> usize {
        let p = Parent {
            token,
            op,
            chain,
            // The parent's own count while its pieces go out.
            outstanding: 1,
            status: STATUS_SUCCESS,
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

    fn fail_parent(&mut self, p: usize, status: u16) {
        if let Some(p) = self.parents.get_mut(p).and_then(Option::as_mut) {
            if p.status == STATUS_SUCCESS {
                p.status = status;
            }
        }
    }

    fn hold_parent(&mut self, p: usize) {
        if let Some(p) = self.parents.get_mut(p).and_then(Option::as_mut) {
            p.outstanding += 1;
        }
    }

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
            if self.unrecorded != 0 && parent.op != Op::Read {
                self.held.push(done);
            } else {
                self.ready.push(done);
            }
            self.parents[p] = None;
            self.free_parents.push(p);
        }
    }

    fn send(&mut self, child: Child, io: Io, ctx: &mut Ctx<'_>) {
        let i = match self.free_children.pop() {
            Some(i) => i,
            None => {
                self.children.push(None);
                self.children.len() - 1
            }
        };
        self.children[i] = Some(child);
        let io = Io {
            token: i as u64,
            ..io
        };
        self.members[child.member].dev.submit(io, ctx);
    }

    /// Member `m` returned a block its record disowns: past [`super::MAX_BAD_READS`] in an
    /// hour it is failed (while the parity allows).
    fn note_bad_read(&mut self, m: usize, ctx: &mut Ctx<'_>) {
        if self.members[m].bad.note(ctx.now) && self.members[m].state == MemberState::Active {
            tracing::error!(raid = %self.name, member = m, device = self.members[m].dev.name(), bad_reads = self.members[m].bad.count(), "too many reads failed their integrity check: failing the member");
            self.fail_member(m, STATUS_INTEGRITY, ctx);
        }
    }

    /// Fails member `m` if the device can lose it (fewer members failed than parity columns,
    /// and the error is the drive's, not this node's fencing). Returns whether the device
    /// goes on without it (it was failed now or before).
    fn fail_member(&mut self, m: usize, status: u16, ctx: &mut Ctx<'_>) -> bool {
        if self.members[m].state == MemberState::Failed {
            return true;
        }
        if status == STATUS_RESERVATION_CONFLICT
            || status == STATUS_FENCED
            || (self.members[m].state == MemberState::Active
                && self.degraded_count() >= self.geo.np)
        {
            return false;
        }
        self.members[m].state = MemberState::Failed;
        if self.hold_until_recorded && m < 64 {
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
        true
    }

    /// Cuts `[offset, offset + len)` into pieces (column, then window boundaries).
    fn pieces(&self, io: &Io) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < io.len {
            let place = self.geo.locate(io.offset + at);
            let window_end = (place.row / self.window + 1) * self.window;
            let len = (window_end - place.row).min(io.len - at);
            out.push(Piece {
                stripe: place.stripe,
                col: place.col,
                a: place.row,
                b: place.row + len,
                skip: io.chain.skip + at,
            });
            at += len;
        }
        out
    }

    fn new_op(&mut self, parent: usize, io: &Io, pieces: Vec<Piece>) -> usize {
        let first = pieces[0];
        let lo = pieces.iter().map(|p| p.a).min().unwrap_or(first.a);
        let hi = pieces.iter().map(|p| p.b).max().unwrap_or(first.b);
        let op = StripeOp {
            parent,
            op: match io.op {
                Op::Deallocate | Op::WriteZeroes => Op::WriteZeroes,
                o => o,
            },
            fua: io.fua,
            chain: io.chain.id,
            stripe: first.stripe,
            key: (first.stripe, first.a / self.window),
            pieces,
            lo,
            hi,
            phase: Phase::Queued,
            plan: Plan::Rcw,
            pending: 0,
            scratch: None,
            slots: vec![None; self.geo.n],
            replan: false,
            status: STATUS_SUCCESS,
            entry_off: 0,
            entry: None,
            writes: Vec::new(),
            counted: false,
            rebuild: None,
            scrub: false,
            bad: 0,
            heals: 0,
        };
        self.hold_parent(parent);
        match self.free_ops.pop() {
            Some(i) => {
                self.ops[i] = Some(op);
                i
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        }
    }

    /// Queues operation `o` behind its window's lock; runs it if it is first.
    fn enqueue(&mut self, o: usize, ctx: &mut Ctx<'_>) {
        let Some(key) = self.ops[o].as_ref().map(|op| op.key) else {
            return;
        };
        let q = self.locks.entry(key).or_default();
        q.push_back(o);
        if q.len() == 1 {
            self.run(o, ctx);
        }
    }

    /// Plans operation `o` against the members' states now and sends its reads (or, with
    /// nothing to read, computes and writes).
    fn run(&mut self, o: usize, ctx: &mut Ctx<'_>) {
        let geo = self.geo;
        let (k, np) = (geo.k(), geo.np);
        let Some(op) = self.ops[o].as_ref() else {
            return;
        };
        let (stripe, lo, hi) = (op.stripe, op.lo, op.hi);
        let len = hi - lo;
        let bad = op.bad;
        let lost = self.lost_cols(stripe, hi, bad);
        // Lost only for this operation: read bad, still active (written back afterwards).
        let bad_col = |c: usize| {
            let m = geo.member(stripe, c);
            m < 64 && bad & 1 << m != 0 && self.readable(stripe, c, hi)
        };
        if lost.len() > np {
            let status = if bad != 0 && (op.op == Op::Read || op.scrub) {
                self.integrity.unrecoverable += u64::from(op.op == Op::Read && !op.scrub);
                STATUS_INTEGRITY
            } else if op.op == Op::Read {
                STATUS_READ_ERROR
            } else {
                STATUS_INTERNAL
            };
            tracing::error!(raid = %self.name, stripe, lost = ?lost, bad, "more columns lost than parity can rebuild");
            self.finish(o, status, ctx);
            return;
        }
        // What to read: per column, the rows [a, b) (None: nothing).
        let mut reads: Vec<Option<(u64, u64)>> = vec![None; geo.n];
        let mut slotted = vec![false; geo.n];
        let plan;
        if op.scrub {
            // A column lost to a failed member cannot be checked; one read bad is rebuilt
            // from the others and written back.
            if lost.iter().any(|&c| !bad_col(c)) {
                self.finish(o, STATUS_READ_ERROR, ctx);
                return;
            }
            plan = if lost.is_empty() {
                Plan::Rcw
            } else {
                Plan::Reconstruct
            };
            for c in 0..geo.n {
                if !lost.contains(&c) {
                    reads[c] = Some((lo, hi));
                }
                slotted[c] = true;
            }
        } else if let Some(target) = op.rebuild {
            plan = Plan::Reconstruct;
            for c in 0..geo.n {
                if !lost.contains(&c) {
                    reads[c] = Some((lo, hi));
                    slotted[c] = true;
                }
            }
            slotted[geo.column_of(stripe, target)] = true;
        } else if op.op == Op::Read {
            plan = Plan::Reconstruct;
            for c in 0..geo.n {
                if !lost.contains(&c) {
                    reads[c] = Some((lo, hi));
                    slotted[c] = true;
                }
                // A column read bad gets a slot for its heal write.
                slotted[c] |= bad_col(c);
            }
        } else {
            let piece = |d: usize| op.pieces.iter().find(|p| p.col == d);
            let full = |d: usize| piece(d).is_some_and(|p| p.a == lo && p.b == hi);
            let need_recon = lost.iter().any(|&c| c < k && !full(c));
            if need_recon {
                plan = Plan::Reconstruct;
                for c in 0..geo.n {
                    if !lost.contains(&c) {
                        reads[c] = Some((lo, hi));
                        slotted[c] = true;
                    }
                }
                // New parity also goes to a parity member being rebuilt.
                for (c, s) in slotted.iter_mut().enumerate().skip(k) {
                    *s |= self.writable(geo.member(stripe, c));
                }
            } else {
                let written: u64 = op.pieces.iter().map(|p| p.b - p.a).sum();
                let rmw = written + np as u64 * len;
                let rcw = (0..k).filter(|&d| !full(d)).count() as u64 * len;
                plan = if lost.is_empty() && rmw < rcw {
                    Plan::Rmw
                } else {
                    Plan::Rcw
                };
                match plan {
                    Plan::Rmw => {
                        for p in &op.pieces {
                            reads[p.col] = Some((p.a, p.b));
                            slotted[p.col] = true;
                        }
                        for c in k..k + np {
                            reads[c] = Some((lo, hi));
                            slotted[c] = true;
                        }
                    }
                    _ => {
                        for d in 0..k {
                            if !full(d) && !lost.contains(&d) {
                                reads[d] = Some((lo, hi));
                                slotted[d] = true;
                            }
                        }
                        for (c, s) in slotted.iter_mut().enumerate().skip(k) {
                            *s = self.writable(geo.member(stripe, c));
                        }
                    }
                }
            }
        }
        let nslots = slotted.iter().filter(|s| **s).count() as u64;
        // Buffers: one slot of `len` bytes per slotted column, then (a logged write) the
        // journal entry.
        let entry_off = journal::padded(nslots * len);
        let entry_bytes = if op.op != Op::Read && self.journal.is_some() {
            let pieces: Vec<(u16, u64, u64)> =
                op.pieces.iter().map(|p| (p.col as u16, p.a, p.b)).collect();
            HEADER as u64 + journal::padded(Header::payload_for(&pieces, np as u8, lo, hi))
        } else {
            0
        };
        let need = entry_off + entry_bytes;
        if need > 0 {
            let Some(id) = ctx.scratch.take(need) else {
                if !ctx.scratch.fits(need) {
                    tracing::error!(raid = %self.name, bytes = need, "a stripe operation needs more parity buffers than the reserve holds");
                    self.finish(o, STATUS_INTERNAL, ctx);
                } else if !self.starved.contains(&o) {
                    self.starved.push_back(o);
                }
                return;
            };
            let mut slots = vec![None; geo.n];
            let mut next = 0;
            for c in 0..geo.n {
                if slotted[c] {
                    slots[c] = Some(next);
                    next += 1;
                }
            }
            if let Some(op) = self.ops[o].as_mut() {
                op.scratch = Some(id);
                op.slots = slots;
                op.entry_off = entry_off;
            }
        }
        let parent = match self.ops[o].as_mut() {
            Some(op) => {
                op.plan = plan;
                op.phase = Phase::Reading;
                op.replan = false;
                op.parent
            }
            None => return,
        };
        let mut sent = 0;
        for (c, read) in reads.iter().enumerate() {
            let Some((a, b)) = *read else { continue };
            let Some(op) = self.ops[o].as_ref() else {
                return;
            };
            let (Some(id), Some(slot)) = (op.scratch, op.slots[c]) else {
                continue;
            };
            let io = Io {
                seq: 0,
                token: 0,
                op: Op::Read,
                offset: self.member_offset(stripe, a),
                len: b - a,
                fua: false,
                chain: ChainRef {
                    id,
                    skip: slot * len + (a - lo),
                },
            };
            let member = geo.member(stripe, c);
            if let Some(op) = self.ops[o].as_mut() {
                op.pending += 1;
            }
            sent += 1;
            self.send(
                Child {
                    owner: Owner::Stripe(o),
                    member,
                    parent,
                    piece: None,
                },
                io,
                ctx,
            );
        }
        if sent == 0 {
            self.compute(o, ctx);
        }
    }

    /// Copies column `c`'s slot (or zeroes) into a local buffer.
    fn slot_bytes(&self, op: &StripeOp, c: usize, ctx: &Ctx<'_>) -> Result<Vec<u8>, u16> {
        let len = (op.hi - op.lo) as usize;
        let mut buf = vec![0u8; len];
        if let (Some(id), Some(slot)) = (op.scratch, op.slots.get(c).copied().flatten()) {
            let at = usize::try_from(slot)
                .unwrap_or(usize::MAX)
                .saturating_mul(len);
            ctx.pool
                .copy_out(ctx.scratch.chain(id), at, &mut buf)
                .map_err(|_| STATUS_INTERNAL)?;
        }
        Ok(buf)
    }

    /// The new data of a piece (from the parent's buffers, or zeroes).
    fn new_bytes(&self, op: &StripeOp, p: &Piece, ctx: &Ctx<'_>) -> Result<Vec<u8>, u16> {
        let mut buf = vec![0u8; (p.b - p.a) as usize];
        if op.op == Op::Write {
            ctx.pool
                .copy_out(ctx.chain(op.chain), p.skip as usize, &mut buf)
                .map_err(|_| STATUS_INTERNAL)?;
        }
        Ok(buf)
    }

    /// The reads of operation `o` are back: compute, then write (or, for a read, deliver).
    fn compute(&mut self, o: usize, ctx: &mut Ctx<'_>) {
        match self.compute_inner(o, ctx) {
            Ok(()) => {}
            Err(status) => self.finish(o, status, ctx),
        }
    }

    fn compute_inner(&mut self, o: usize, ctx: &mut Ctx<'_>) -> Result<(), u16> {
        let geo = self.geo;
        let (k, np) = (geo.k(), geo.np);
        let Some(op) = self.ops[o].as_ref() else {
            return Ok(());
        };
        let (stripe, lo, hi) = (op.stripe, op.lo, op.hi);
        let len = (hi - lo) as usize;
        let lost = self.lost_cols(stripe, hi, op.bad);
        let mut cols: Vec<Vec<u8>> = Vec::with_capacity(k);
        let mut par: Vec<Vec<u8>> = Vec::with_capacity(np);
        for c in 0..k {
            cols.push(self.slot_bytes(op, c, ctx)?);
        }
        for c in k..k + np {
            par.push(self.slot_bytes(op, c, ctx)?);
        }
        let split = |par: &mut Vec<Vec<u8>>| -> (Vec<u8>, Option<Vec<u8>>) {
            let q = (par.len() > 1).then(|| par.pop().unwrap_or_default());
            (par.pop().unwrap_or_default(), q)
        };
        let (mut p, mut q) = split(&mut par);
        if op.plan == Plan::Reconstruct {
            let mut refs: Vec<&mut [u8]> = cols.iter_mut().map(Vec::as_mut_slice).collect();
            parity::reconstruct(&mut refs, &mut p, q.as_deref_mut(), &lost).map_err(|e| {
                tracing::error!(raid = %self.name, stripe, error = %e, "reconstruction refused");
                STATUS_INTERNAL
            })?;
        }
        if op.scrub && op.bad != 0 {
            // Columns read bad, rebuilt from the others: written back.
            tracing::warn!(raid = %self.name, stripe, lo, hi, bad = op.bad, "scrub: blocks failed their integrity check: rewriting them from the other columns");
            if let Some(s) = self.scrub.as_mut() {
                s.mismatches += 1;
            }
            let writes = self.heal_writes(op, &lost, &cols, &p, q.as_deref(), ctx)?;
            if let Some(op) = self.ops[o].as_mut() {
                op.heals = writes.len() as u32;
                op.writes = writes;
            }
            self.apply(o, ctx);
            return Ok(());
        }
        if op.scrub {
            let refs: Vec<&[u8]> = cols.iter().map(Vec::as_slice).collect();
            let mut p2 = vec![0u8; len];
            let mut q2 = q.as_ref().map(|_| vec![0u8; len]);
            parity::generate(&refs, &mut p2, q2.as_deref_mut()).map_err(|_| STATUS_INTERNAL)?;
            if p2 == p && q2 == q {
                self.finish(o, STATUS_SUCCESS, ctx);
                return Ok(());
            }
            tracing::warn!(raid = %self.name, stripe, lo, hi, "scrub: parity disagrees with the data: rewriting it");
            if let Some(s) = self.scrub.as_mut() {
                s.mismatches += 1;
            }
            let Some(id) = op.scratch else {
                return Err(STATUS_INTERNAL);
            };
            let mut writes = Vec::new();
            for (c, bytes) in std::iter::once((k, &p2)).chain(q2.as_ref().map(|q| (k + 1, q))) {
                let Some(slot) = op.slots[c] else { continue };
                let at = usize::try_from(slot)
                    .unwrap_or(usize::MAX)
                    .saturating_mul(len);
                ctx.pool
                    .copy_in(ctx.scratch.chain(id), at, bytes)
                    .map_err(|_| STATUS_INTERNAL)?;
                writes.push((
                    geo.member(stripe, c),
                    Io {
                        seq: 0,
                        token: 0,
                        op: Op::Write,
                        offset: self.member_offset(stripe, lo),
                        len: hi - lo,
                        fua: false,
                        chain: ChainRef {
                            id,
                            skip: slot * (hi - lo),
                        },
                    },
                ));
            }
            if let Some(op) = self.ops[o].as_mut() {
                op.writes = writes;
            }
            self.apply(o, ctx);
            return Ok(());
        }
        if let Some(target) = op.rebuild {
            let c = geo.column_of(stripe, target);
            let bytes: &[u8] = if c < k {
                &cols[c]
            } else if c == k {
                &p
            } else {
                q.as_deref().ok_or(STATUS_INTERNAL)?
            };
            let (Some(id), Some(slot)) = (op.scratch, op.slots[c]) else {
                return Err(STATUS_INTERNAL);
            };
            let at = usize::try_from(slot)
                .unwrap_or(usize::MAX)
                .saturating_mul(len);
            ctx.pool
                .copy_in(ctx.scratch.chain(id), at, bytes)
                .map_err(|_| STATUS_INTERNAL)?;
            let io = Io {
                seq: 0,
                token: 0,
                op: Op::Write,
                offset: self.member_offset(stripe, lo),
                len: hi - lo,
                fua: false,
                chain: ChainRef {
                    id,
                    skip: slot * (hi - lo),
                },
            };
            if let Some(op) = self.ops[o].as_mut() {
                op.writes = vec![(target, io)];
            }
            self.apply(o, ctx);
            return Ok(());
        }
        if op.op == Op::Read {
            let Some(piece) = op.pieces.first().copied() else {
                return Err(STATUS_INTERNAL);
            };
            let from = (piece.a - lo) as usize;
            let to = (piece.b - lo) as usize;
            let data = cols
                .get(piece.col)
                .and_then(|c| c.get(from..to))
                .ok_or(STATUS_INTERNAL)?;
            ctx.pool
                .copy_in(ctx.chain(op.chain), piece.skip as usize, data)
                .map_err(|_| STATUS_INTERNAL)?;
            tracing::debug!(raid = %self.name, stripe, col = piece.col, bytes = to - from, "read reconstructed");
            if op.bad != 0 {
                // Served from the other columns; the bad blocks are written back before the
                // read completes (the window's lock keeps host writes out meanwhile).
                self.integrity.recovered += 1;
                let writes = self.heal_writes(op, &lost, &cols, &p, q.as_deref(), ctx)?;
                if let Some(op) = self.ops[o].as_mut() {
                    op.heals = writes.len() as u32;
                    op.writes = writes;
                }
                self.apply(o, ctx);
                return Ok(());
            }
            self.finish(o, STATUS_SUCCESS, ctx);
            return Ok(());
        }
        // A write: the new parity over rows [lo, hi).
        if op.plan == Plan::Rmw {
            for piece in &op.pieces {
                let from = (piece.a - lo) as usize;
                let to = (piece.b - lo) as usize;
                let new = self.new_bytes(op, piece, ctx)?;
                let old = cols
                    .get(piece.col)
                    .and_then(|c| c.get(from..to))
                    .ok_or(STATUS_INTERNAL)?;
                let pr = p.get_mut(from..to).ok_or(STATUS_INTERNAL)?;
                let qr = match q.as_mut() {
                    Some(q) => Some(q.get_mut(from..to).ok_or(STATUS_INTERNAL)?),
                    None => None,
                };
                parity::update(piece.col, old, &new, pr, qr).map_err(|_| STATUS_INTERNAL)?;
            }
        } else {
            for piece in &op.pieces {
                let from = (piece.a - lo) as usize;
                let to = (piece.b - lo) as usize;
                let new = self.new_bytes(op, piece, ctx)?;
                cols.get_mut(piece.col)
                    .and_then(|c| c.get_mut(from..to))
                    .ok_or(STATUS_INTERNAL)?
                    .copy_from_slice(&new);
            }
            let refs: Vec<&[u8]> = cols.iter().map(Vec::as_slice).collect();
            parity::generate(&refs, &mut p, q.as_deref_mut()).map_err(|_| STATUS_INTERNAL)?;
        }
        let id = op.scratch;
        let slots = op.slots.clone();
        let parity_cols: Vec<(usize, &[u8])> = std::iter::once((k, p.as_slice()))
            .chain(q.as_deref().map(|q| (k + 1, q)))
            .collect();
        for &(c, bytes) in &parity_cols {
            if let (Some(id), Some(slot)) = (id, slots[c]) {
                let at = usize::try_from(slot)
                    .unwrap_or(usize::MAX)
                    .saturating_mul(len);
                ctx.pool
                    .copy_in(ctx.scratch.chain(id), at, bytes)
                    .map_err(|_| STATUS_INTERNAL)?;
            }
        }
        // The journal entry's payload: the pieces' new data, then P and Q.
        if self.journal.is_some() {
            if let Some(id) = id {
                let mut payload = Vec::new();
                for piece in &op.pieces {
                    payload.extend_from_slice(&self.new_bytes(op, piece, ctx)?);
                }
                payload.extend_from_slice(&p);
                if let Some(q) = &q {
                    payload.extend_from_slice(q);
                }
                let at = usize::try_from(op.entry_off).unwrap_or(usize::MAX) + HEADER;
                ctx.pool
                    .copy_in(ctx.scratch.chain(id), at, &payload)
                    .map_err(|_| STATUS_INTERNAL)?;
                let info = EntryInfo {
                    pieces: op.pieces.iter().map(|p| (p.col as u16, p.a, p.b)).collect(),
                    payload_len: payload.len() as u64,
                    payload_crc: crc32c::crc32c(&payload),
                };
                if let Some(op) = self.ops[o].as_mut() {
                    op.entry = Some(info);
                }
            }
        }
        let Some(op) = self.ops[o].as_ref() else {
            return Ok(());
        };
        // The writes: new data from the parent's buffers, parity from the slots.
        let mut writes: Vec<(usize, Io)> = Vec::new();
        for piece in &op.pieces {
            if !self.writable(geo.member(stripe, piece.col)) {
                continue;
            }
            writes.push((
                geo.member(stripe, piece.col),
                Io {
                    seq: 0,
                    token: 0,
                    op: op.op,
                    offset: self.member_offset(stripe, piece.a),
                    len: piece.b - piece.a,
                    fua: op.fua,
                    chain: ChainRef {
                        id: op.chain,
                        skip: piece.skip,
                    },
                },
            ));
        }
        for (c, slot) in slots.iter().enumerate().skip(k) {
            if let (Some(id), Some(slot)) = (id, *slot) {
                writes.push((
                    geo.member(stripe, c),
                    Io {
                        seq: 0,
                        token: 0,
                        op: Op::Write,
                        offset: self.member_offset(stripe, lo),
                        len: hi - lo,
                        fua: op.fua,
                        chain: ChainRef {
                            id,
                            skip: slot * (hi - lo),
                        },
                    },
                ));
            }
        }
        let logged = op.entry.is_some();
        if let Some(op) = self.ops[o].as_mut() {
            op.writes = writes;
            op.phase = Phase::Journaling;
        }
        if logged {
            self.log(o, ctx);
        } else {
            self.apply(o, ctx);
        }
        Ok(())
    }

    /// The writes putting back, over the operation's rows, the columns of its members that
    /// read bad and are still active: the rebuilt data (`cols`) or parity (`p`, `q`), through
    /// the columns' slots.
    fn heal_writes(
        &self,
        op: &StripeOp,
        lost: &[usize],
        cols: &[Vec<u8>],
        p: &[u8],
        q: Option<&[u8]>,
        ctx: &mut Ctx<'_>,
    ) -> Result<Vec<(usize, Io)>, u16> {
        let geo = self.geo;
        let k = geo.k();
        let (stripe, lo, hi) = (op.stripe, op.lo, op.hi);
        let len = (hi - lo) as usize;
        let Some(id) = op.scratch else {
            return Err(STATUS_INTERNAL);
        };
        let mut writes = Vec::new();
        for &c in lost {
            let m = geo.member(stripe, c);
            if m >= 64 || op.bad & 1 << m == 0 || self.members[m].state != MemberState::Active {
                continue;
            }
            let bytes: &[u8] = if c < k {
                cols.get(c).ok_or(STATUS_INTERNAL)?
            } else if c == k {
                p
            } else {
                q.ok_or(STATUS_INTERNAL)?
            };
            let Some(slot) = op.slots.get(c).copied().flatten() else {
                return Err(STATUS_INTERNAL);
            };
            let at = usize::try_from(slot)
                .unwrap_or(usize::MAX)
                .saturating_mul(len);
            ctx.pool
                .copy_in(ctx.scratch.chain(id), at, bytes)
                .map_err(|_| STATUS_INTERNAL)?;
            tracing::warn!(raid = %self.name, member = m, device = self.members[m].dev.name(), member_offset = self.member_offset(stripe, lo), bytes = len, "a block read bad is rewritten from the other columns");
            writes.push((
                m,
                Io {
                    seq: 0,
                    token: 0,
                    op: Op::Write,
                    offset: self.member_offset(stripe, lo),
                    len: hi - lo,
                    fua: true,
                    chain: ChainRef {
                        id,
                        skip: slot * (hi - lo),
                    },
                },
            ));
        }
        Ok(writes)
    }

    /// Sends operation `o`'s data and parity writes.
    fn apply(&mut self, o: usize, ctx: &mut Ctx<'_>) {
        let Some(op) = self.ops[o].as_mut() else {
            return;
        };
        let writes = std::mem::take(&mut op.writes);
        let parent = op.parent;
        op.phase = Phase::Writing;
        op.pending = writes.len() as u32;
        if writes.is_empty() {
            self.finish(o, STATUS_SUCCESS, ctx);
            return;
        }
        for (member, io) in writes {
            self.send(
                Child {
                    owner: Owner::Stripe(o),
                    member,
                    parent,
                    piece: None,
                },
                io,
                ctx,
            );
        }
    }

    /// Writes operation `o`'s journal entry (FUA) to the ring of every active parity member
    /// of its stripe, or queues it until the ring has room.
    fn log(&mut self, o: usize, ctx: &mut Ctx<'_>) {
        let geo = self.geo;
        let k = geo.k();
        let Some(op) = self.ops[o].as_ref() else {
            return;
        };
        let Some(info) = op.entry.clone() else {
            self.apply(o, ctx);
            return;
        };
        let (stripe, lo, hi, entry_off, parent) =
            (op.stripe, op.lo, op.hi, op.entry_off, op.parent);
        let Some(id) = op.scratch else {
            self.finish(o, STATUS_INTERNAL, ctx);
            return;
        };
        let targets: Vec<usize> = (k..geo.n)
            .map(|c| geo.member(stripe, c))
            .filter(|&m| self.writable(m))
            .collect();
        let Some(j) = self.journal.as_mut() else {
            self.apply(o, ctx);
            return;
        };
        let record = HEADER as u64 + journal::padded(info.payload_len);
        if record + HEADER as u64 > j.spec.len {
            tracing::error!(raid = %self.name, bytes = record, ring = j.spec.len, "a journal entry larger than the ring");
            self.finish(o, STATUS_INTERNAL, ctx);
            return;
        }
        let fits = targets.iter().all(|&m| j.heads[m] + record <= j.spec.len);
        if j.state != JState::Ready || !fits {
            if !j.waiting.contains(&o) {
                j.waiting.push_back(o);
            }
            self.maybe_reset(ctx);
            return;
        }
        j.seq += 1;
        let header = Header {
            kind: Kind::Entry,
            tag: j.spec.tag,
            gen: j.gen,
            seq: j.seq,
            np: geo.np as u8,
            stripe,
            lo,
            hi,
            pieces: info.pieces,
            payload_len: info.payload_len,
            payload_crc: info.payload_crc,
        };
        let mut at = Vec::new();
        for &m in &targets {
            at.push((m, j.spec.offset + j.heads[m]));
            j.heads[m] += record;
        }
        j.active += 1;
        if ctx
            .pool
            .copy_in(
                ctx.scratch.chain(id),
                usize::try_from(entry_off).unwrap_or(usize::MAX),
                &header.encode(),
            )
            .is_err()
        {
            j.active -= 1;
            self.finish(o, STATUS_INTERNAL, ctx);
            return;
        }
        let Some(op) = self.ops[o].as_mut() else {
            return;
        };
        op.counted = true;
        op.pending = at.len() as u32;
        if at.is_empty() {
            self.apply(o, ctx);
            return;
        }
        for (member, offset) in at {
            let io = Io {
                seq: 0,
                token: 0,
                op: Op::Write,
                offset,
                len: record,
                fua: true,
                chain: ChainRef {
                    id,
                    skip: entry_off,
                },
            };
            self.send(
                Child {
                    owner: Owner::Stripe(o),
                    member,
                    parent,
                    piece: None,
                },
                io,
                ctx,
            );
        }
    }

    /// Ends operation `o` with `status`: buffers back, parent settled, the next operation on
    /// its window started, then any operation that waited for buffers.
    fn finish(&mut self, o: usize, status: u16, ctx: &mut Ctx<'_>) {
        let Some(op) = self.ops.get_mut(o).and_then(Option::take) else {
            return;
        };
        self.free_ops.push(o);
        if let Some(id) = op.scratch {
            ctx.scratch.give(id);
        }
        self.starved.retain(|&s| s != o);
        if let Some(j) = self.journal.as_mut() {
            j.waiting.retain(|&w| w != o);
            if op.counted {
                j.active = j.active.saturating_sub(1);
            }
        }
        let status = if op.status != STATUS_SUCCESS {
            op.status
        } else {
            status
        };
        if status != STATUS_SUCCESS {
            self.fail_parent(op.parent, status);
        } else {
            self.integrity.healed += u64::from(op.heals);
        }
        self.settle(op.parent);
        if let Some(target) = op.rebuild {
            self.rebuilt(target, op.stripe * self.geo.chunk + op.hi, status);
        }
        if op.scrub {
            self.scrubbing = None;
            let repaired = op.phase == Phase::Writing && status == STATUS_SUCCESS;
            if let Some(s) = self.scrub.as_mut() {
                s.done = s.done.max(op.stripe * self.geo.chunk + op.hi);
                if status != STATUS_SUCCESS {
                    s.skipped += 1;
                } else if repaired {
                    s.repaired += 1;
                }
                if s.done >= s.total {
                    tracing::info!(raid = %self.name, mismatches = s.mismatches, repaired = s.repaired, skipped = s.skipped, "scrub finished");
                }
            }
        }
        let next = match self.locks.get_mut(&op.key) {
            Some(q) => {
                q.retain(|&x| x != o);
                let next = q.front().copied();
                if q.is_empty() {
                    self.locks.remove(&op.key);
                }
                next
            }
            None => None,
        };
        if let Some(n) = next {
            if self.ops[n]
                .as_ref()
                .is_some_and(|op| op.phase == Phase::Queued)
            {
                self.run(n, ctx);
            }
        }
        if op.scratch.is_some() {
            let starved: Vec<usize> = self.starved.drain(..).collect();
            for s in starved {
                if self.ops[s].is_some() {
                    self.run(s, ctx);
                }
            }
        }
        if op.counted {
            self.maybe_reset(ctx);
        }
    }

    /// Starts a new journal generation when operations wait for ring space and none holds
    /// any: flush every member (what the old entries describe is then on the media), then
    /// write the new generation's marker, which makes every older entry void.
    fn maybe_reset(&mut self, ctx: &mut Ctx<'_>) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        if j.state != JState::Ready || j.waiting.is_empty() || j.active > 0 {
            return;
        }
        j.state = JState::Resetting;
        tracing::debug!(raid = %self.name, generation = j.gen, "journal ring full: flushing and starting a new generation");
        j.task = Some(Task {
            stage: Stage::Flush,
            pending: 0,
            chain: None,
            buf: Vec::new(),
            found: j.gen,
            replayed: 0,
            entries: std::collections::BTreeMap::new(),
        });
        self.task_flush(ctx);
    }

    /// Sends one I/O of the journal's task to member `m`.
    fn task_io(&mut self, m: usize, io: Io, ctx: &mut Ctx<'_>) {
        if let Some(t) = self.journal.as_mut().and_then(|j| j.task.as_mut()) {
            t.pending += 1;
        }
        self.send(
            Child {
                owner: Owner::Task,
                member: m,
                parent: usize::MAX,
                piece: None,
            },
            io,
            ctx,
        );
    }

    fn task_flush(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(t) = self.journal.as_mut().and_then(|j| j.task.as_mut()) {
            t.stage = Stage::Flush;
        }
        let mut sent = false;
        for m in 0..self.members.len() {
            if self.writable(m) {
                sent = true;
                self.task_io(
                    m,
                    Io {
                        seq: 0,
                        token: 0,
                        op: Op::Flush,
                        offset: 0,
                        len: 0,
                        fua: false,
                        chain: ChainRef { id: 0, skip: 0 },
                    },
                    ctx,
                );
            }
        }
        if !sent {
            self.task_advance(ctx);
        }
    }

    /// The replay starts (at the first poll): every member's marker is read.
    fn journal_start(&mut self, ctx: &mut Ctx<'_>) {
        let geo = self.geo;
        let task_bytes = Self::task_bytes(geo.n, self.window);
        if !ctx.scratch.fits(task_bytes + HEADER as u64) {
            tracing::error!(raid = %self.name, bytes = task_bytes, "the parity buffer reserve cannot hold the journal's replay");
            self.journal_broken(STATUS_INTERNAL, ctx);
            return;
        }
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let Some(marker) = ctx.scratch.take(HEADER as u64) else {
            return;
        };
        let Some(chain) = ctx.scratch.take(task_bytes) else {
            ctx.scratch.give(marker);
            return;
        };
        j.marker = Some(marker);
        j.state = JState::Replaying;
        j.task = Some(Task {
            stage: Stage::Markers,
            pending: 0,
            chain: Some(chain),
            buf: Vec::new(),
            found: 0,
            replayed: 0,
            entries: std::collections::BTreeMap::new(),
        });
        let offset = j.spec.offset;
        let mut sent = false;
        for m in 0..geo.n {
            if self.writable(m) {
                sent = true;
                self.task_io(
                    m,
                    Io {
                        seq: 0,
                        token: 0,
                        op: Op::Read,
                        offset,
                        len: HEADER as u64,
                        fua: false,
                        chain: ChainRef {
                            id: chain,
                            skip: (m * HEADER) as u64,
                        },
                    },
                    ctx,
                );
            }
        }
        if !sent {
            self.task_advance(ctx);
        }
    }

    /// The journal's task finished a step: take the next.
    fn task_advance(&mut self, ctx: &mut Ctx<'_>) {
        let active: Vec<bool> = (0..self.geo.n).map(|m| self.writable(m)).collect();
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let spec = j.spec;
        let Some(t) = j.task.as_mut() else {
            return;
        };
        match t.stage {
            Stage::Markers => {
                let Some(chain) = t.chain else {
                    return;
                };
                let mut found = 0;
                for m in 0..self.geo.n {
                    if self.members[m].state != MemberState::Active {
                        continue;
                    }
                    let mut b = vec![0u8; HEADER];
                    if ctx
                        .pool
                        .copy_out(ctx.scratch.chain(chain), m * HEADER, &mut b)
                        .is_ok()
                    {
                        if let Some(h) = Header::decode(&b) {
                            if h.kind == Kind::Marker && h.tag == spec.tag {
                                found = found.max(h.gen);
                            }
                        }
                    }
                }
                if let Some(t) = self.journal.as_mut().and_then(|j| j.task.as_mut()) {
                    t.found = found;
                }
                if found == 0 {
                    self.task_flush(ctx);
                } else {
                    self.scan_member(0, ctx);
                }
            }
            Stage::Scan { member, at } => {
                if !active[member] {
                    self.scan_member(member + 1, ctx);
                    return;
                }
                let Some(chain) = t.chain else {
                    return;
                };
                let len = SCAN.min(spec.len - at) as usize;
                let from = t.buf.len();
                t.buf.resize(from + len, 0);
                if ctx
                    .pool
                    .copy_out(ctx.scratch.chain(chain), 0, &mut t.buf[from..])
                    .is_err()
                {
                    self.journal_broken(STATUS_INTERNAL, ctx);
                    return;
                }
                self.parse(member, at + len as u64, ctx);
            }
            Stage::Fetch => self.apply_fetched(ctx),
            Stage::Apply => self.replay_next(ctx),
            Stage::Flush => {
                let gen = t.found + 1;
                t.stage = Stage::Mark;
                let Some(marker) = j.marker else {
                    self.journal_broken(STATUS_INTERNAL, ctx);
                    return;
                };
                let h = Header {
                    kind: Kind::Marker,
                    tag: spec.tag,
                    gen,
                    seq: 0,
                    np: self.geo.np as u8,
                    stripe: 0,
                    lo: 0,
                    hi: 0,
                    pieces: Vec::new(),
                    payload_len: 0,
                    payload_crc: 0,
                };
                if ctx
                    .pool
                    .copy_in(ctx.scratch.chain(marker), 0, &h.encode())
                    .is_err()
                {
                    self.journal_broken(STATUS_INTERNAL, ctx);
                    return;
                }
                let mut sent = false;
                for m in 0..self.geo.n {
                    if self.writable(m) {
                        sent = true;
                        self.task_io(
                            m,
                            Io {
                                seq: 0,
                                token: 0,
                                op: Op::Write,
                                offset: spec.offset,
                                len: HEADER as u64,
                                fua: true,
                                chain: ChainRef {
                                    id: marker,
                                    skip: 0,
                                },
                            },
                            ctx,
                        );
                    }
                }
                if !sent {
                    self.task_advance(ctx);
                }
            }
            Stage::Mark => self.journal_ready(ctx),
        }
    }

    /// Starts scanning the ring of the first active member from `from` on (or, past the last,
    /// flushes).
    fn scan_member(&mut self, from: usize, ctx: &mut Ctx<'_>) {
        let next = (from..self.geo.n).find(|&m| self.writable(m));
        if let Some(t) = self.journal.as_mut().and_then(|j| j.task.as_mut()) {
            t.buf.clear();
        }
        match next {
            Some(m) => self.scan_read(m, HEADER as u64, ctx),
            None => self.replay_next(ctx),
        }
    }

    /// Reads the window of member `m`'s ring from `at`.
    fn scan_read(&mut self, m: usize, at: u64, ctx: &mut Ctx<'_>) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let spec = j.spec;
        let Some(t) = j.task.as_mut() else {
            return;
        };
        let Some(chain) = t.chain else {
            return;
        };
        t.stage = Stage::Scan { member: m, at };
        let len = SCAN.min(spec.len - at);
        self.task_io(
            m,
            Io {
                seq: 0,
                token: 0,
                op: Op::Read,
                offset: spec.offset + at,
                len,
                fua: false,
                chain: ChainRef { id: chain, skip: 0 },
            },
            ctx,
        );
    }

    /// Parses what was read of member `m`'s ring (read up to ring byte `next`): notes every
    /// valid entry of the newest generation, then reads on, or moves to the next member.
    fn parse(&mut self, m: usize, next: u64, ctx: &mut Ctx<'_>) {
        let geo = self.geo;
        let (k, np) = (geo.k(), geo.np);
        let stripes = self.member_len / geo.chunk;
        let window = self.window;
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let spec = j.spec;
        let Some(t) = j.task.as_mut() else {
            return;
        };
        while t.buf.len() >= HEADER {
            let h = Header::decode(&t.buf[..HEADER]).filter(|h| {
                h.kind == Kind::Entry
                    && h.tag == spec.tag
                    && h.gen == t.found
                    && usize::from(h.np) == np
                    && h.stripe < stripes
                    && h.hi <= geo.chunk
                    && h.hi - h.lo <= window
                    && h.pieces.iter().all(|p| usize::from(p.0) < k)
            });
            let Some(h) = h else {
                t.buf.drain(..HEADER);
                continue;
            };
            let total = usize::try_from(h.record_len()).unwrap_or(usize::MAX);
            if t.buf.len() < total {
                if next < spec.len {
                    break;
                }
                t.buf.drain(..HEADER);
                continue;
            }
            let payload = &t.buf[HEADER..HEADER + h.payload_len as usize];
            if crc32c::crc32c(payload) != h.payload_crc {
                // Torn: its writes never started.
                t.buf.drain(..HEADER);
                continue;
            }
            let at = next - t.buf.len() as u64;
            t.entries.entry(h.seq).or_insert((m, at, h));
            t.buf.drain(..total);
        }
        if next < spec.len {
            self.scan_read(m, next, ctx);
        } else {
            self.scan_member(m + 1, ctx);
        }
    }

    /// Replays the entry with the lowest sequence left (reads its record first), or, with
    /// none left, flushes every member.
    fn replay_next(&mut self, ctx: &mut Ctx<'_>) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let spec = j.spec;
        let Some(t) = j.task.as_mut() else {
            return;
        };
        let Some(chain) = t.chain else {
            return;
        };
        let Some((&seq, &(m, at, ref h))) = t.entries.iter().next() else {
            self.task_flush(ctx);
            return;
        };
        let len = h.record_len();
        if !self.writable(m) {
            // Its member left since the scan: the entry is read from another ring that holds
            // it, or (none) skipped: its stripe is then degraded, its parity rebuilt later.
            if let Some(t) = self.journal.as_mut().and_then(|j| j.task.as_mut()) {
                t.entries.remove(&seq);
            }
            self.replay_next(ctx);
            return;
        }
        if let Some(t) = self.journal.as_mut().and_then(|j| j.task.as_mut()) {
            t.stage = Stage::Fetch;
        }
        self.task_io(
            m,
            Io {
                seq: 0,
                token: 0,
                op: Op::Read,
                offset: spec.offset + at,
                len,
                fua: false,
                chain: ChainRef { id: chain, skip: 0 },
            },
            ctx,
        );
    }

    /// The record of the next entry is in the task's chain: check it, write its pieces and
    /// parity.
    fn apply_fetched(&mut self, ctx: &mut Ctx<'_>) {
        let geo = self.geo;
        let (k, np) = (geo.k(), geo.np);
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let Some(t) = j.task.as_mut() else {
            return;
        };
        let Some(chain) = t.chain else {
            return;
        };
        let Some((_, (_, _, h))) = t.entries.pop_first() else {
            self.task_flush(ctx);
            return;
        };
        let mut record = vec![0u8; HEADER + h.payload_len as usize];
        let intact = ctx
            .pool
            .copy_out(ctx.scratch.chain(chain), 0, &mut record)
            .is_ok()
            && Header::decode(&record[..HEADER]).is_some_and(|r| r.seq == h.seq)
            && crc32c::crc32c(&record[HEADER..]) == h.payload_crc;
        if !intact {
            // What the scan found is not there any more (the ring changed under it: a bug, or
            // a drive that lies); skipped, loudly.
            tracing::error!(raid = %self.name, seq = h.seq, stripe = h.stripe, "a journal entry reads back changed: not replayed");
            self.replay_next(ctx);
            return;
        }
        t.stage = Stage::Apply;
        t.replayed += 1;
        if ctx
            .pool
            .copy_in(ctx.scratch.chain(chain), 0, &record[HEADER..])
            .is_err()
        {
            self.journal_broken(STATUS_INTERNAL, ctx);
            return;
        }
        tracing::debug!(raid = %self.name, seq = h.seq, stripe = h.stripe, "journal entry replayed");
        let mut writes = Vec::new();
        let mut cursor = 0;
        for &(col, a, b) in &h.pieces {
            writes.push((geo.member(h.stripe, usize::from(col)), a, b - a, cursor));
            cursor += b - a;
        }
        for c in k..k + np {
            writes.push((geo.member(h.stripe, c), h.lo, h.hi - h.lo, cursor));
            cursor += h.hi - h.lo;
        }
        let mut sent = false;
        for (member, row, len, skip) in writes {
            if !self.writable(member) {
                continue;
            }
            sent = true;
            let offset = self.member_offset(h.stripe, row);
            self.task_io(
                member,
                Io {
                    seq: 0,
                    token: 0,
                    op: Op::Write,
                    offset,
                    len,
                    fua: false,
                    chain: ChainRef { id: chain, skip },
                },
                ctx,
            );
        }
        if !sent {
            self.task_advance(ctx);
        }
    }

    /// The replay or the reset is done: serve (the held I/O first), journal what waited.
    fn journal_ready(&mut self, ctx: &mut Ctx<'_>) {
        let n = self.geo.n;
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let Some(t) = j.task.take() else {
            return;
        };
        if let Some(chain) = t.chain {
            ctx.scratch.give(chain);
        }
        let was = j.state;
        j.gen = t.found + 1;
        j.seq = 0;
        j.heads = vec![HEADER as u64; n];
        j.state = JState::Ready;
        if was == JState::Replaying {
            tracing::info!(raid = %self.name, replayed = t.replayed, generation = j.gen, "stripe journal replayed");
        }
        let held = std::mem::take(&mut j.held);
        let waiting: Vec<usize> = j.waiting.drain(..).collect();
        for io in held {
            self.submit(io, ctx);
        }
        for o in waiting {
            self.log(o, ctx);
        }
    }

    /// The journal's task failed past the pool's redundancy: nothing can be served safely.
    fn journal_broken(&mut self, status: u16, ctx: &mut Ctx<'_>) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        tracing::error!(raid = %self.name, status, "the stripe journal cannot be replayed or reset: the pool fails every I/O");
        j.state = JState::Broken;
        if let Some(t) = j.task.take() {
            if let Some(chain) = t.chain {
                ctx.scratch.give(chain);
            }
        }
        let held = std::mem::take(&mut j.held);
        let waiting: Vec<usize> = j.waiting.drain(..).collect();
        for io in held {
            self.ready.push(Done {
                token: io.token,
                status,
            });
        }
        for o in waiting {
            self.finish(o, status, ctx);
        }
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
        let ok = d.status == STATUS_SUCCESS;
        match c.owner {
            Owner::Task => {
                if !ok && !self.fail_member(c.member, d.status, ctx) {
                    self.journal_broken(d.status, ctx);
                    return;
                }
                let Some(task) = self.journal.as_mut().and_then(|j| j.task.as_mut()) else {
                    return;
                };
                task.pending = task.pending.saturating_sub(1);
                if task.pending == 0 {
                    self.task_advance(ctx);
                }
            }
            Owner::Plain { parent, raw } => {
                if !ok && (raw || !self.fail_member(c.member, d.status, ctx)) {
                    self.fail_parent(parent, d.status);
                }
                self.settle(parent);
            }
            Owner::Direct(_) => {
                if !ok {
                    let Some(piece) = c.piece else {
                        self.fail_parent(c.parent, STATUS_INTERNAL);
                        self.settle(c.parent);
                        return;
                    };
                    if d.status == STATUS_INTEGRITY && c.member < 64 {
                        // A bad block, not a bad drive: the column is rebuilt from the others
                        // (under the window's lock) and written back; the member stays.
                        self.integrity.bad_reads += 1;
                        self.note_bad_read(c.member, ctx);
                        ctx.stats.read_retries += 1;
                        tracing::warn!(raid = %self.name, member = c.member, stripe = piece.stripe, "read failed its integrity check: reconstructing from the other members");
                        let o = self.read_op(c.parent, piece);
                        if let Some(op) = self.ops[o].as_mut() {
                            op.bad = 1 << c.member;
                        }
                        self.enqueue(o, ctx);
                    } else if self.fail_member(c.member, d.status, ctx) {
                        ctx.stats.read_retries += 1;
                        tracing::warn!(raid = %self.name, member = c.member, stripe = piece.stripe, "read failed: reconstructing from the other members");
                        let o = self.read_op(c.parent, piece);
                        self.enqueue(o, ctx);
                    } else {
                        self.fail_parent(c.parent, d.status);
                    }
                }
                self.settle(c.parent);
            }
            Owner::Stripe(o) => {
                let Some(op) = self.ops.get_mut(o).and_then(Option::as_mut) else {
                    return;
                };
                op.pending = op.pending.saturating_sub(1);
                let phase = op.phase;
                if !ok && d.status == STATUS_INTEGRITY && phase == Phase::Reading && c.member < 64 {
                    // Read bad: lost for this operation only; planned again without it.
                    self.integrity.bad_reads += 1;
                    op.bad |= 1 << c.member;
                    op.replan = true;
                    self.note_bad_read(c.member, ctx);
                } else if !ok {
                    if self.fail_member(c.member, d.status, ctx) {
                        if phase == Phase::Reading {
                            if let Some(op) = self.ops[o].as_mut() {
                                op.replan = true;
                            }
                        }
                    } else if let Some(op) = self.ops[o].as_mut() {
                        if op.status == STATUS_SUCCESS {
                            op.status = d.status;
                        }
                    }
                }
                let Some(op) = self.ops[o].as_mut() else {
                    return;
                };
                if op.pending > 0 {
                    return;
                }
                if op.status != STATUS_SUCCESS || phase == Phase::Writing {
                    self.finish(o, STATUS_SUCCESS, ctx);
                } else if phase == Phase::Journaling {
                    self.apply(o, ctx);
                } else if op.replan {
                    if let Some(id) = op.scratch.take() {
                        ctx.scratch.give(id);
                    }
                    op.slots = vec![None; self.geo.n];
                    self.run(o, ctx);
                } else {
                    self.compute(o, ctx);
                }
            }
        }
    }

    /// A stripe operation of the device's own (a rebuild or scrub window), for the window of
    /// member byte `at`; returns its index, not yet queued.
    fn own_op(&mut self, at: u64, rebuild: Option<usize>, scrub: bool) -> usize {
        let chunk = self.geo.chunk;
        let stripe = at / chunk;
        let lo = at % chunk / self.window * self.window;
        let hi = (lo + self.window).min(chunk);
        let op = StripeOp {
            parent: usize::MAX,
            op: Op::Read,
            fua: false,
            chain: 0,
            stripe,
            key: (stripe, lo / self.window),
            pieces: Vec::new(),
            lo,
            hi,
            phase: Phase::Queued,
            plan: if scrub { Plan::Rcw } else { Plan::Reconstruct },
            pending: 0,
            scratch: None,
            slots: vec![None; self.geo.n],
            replan: false,
            status: STATUS_SUCCESS,
            entry_off: 0,
            entry: None,
            writes: Vec::new(),
            counted: false,
            rebuild,
            scrub,
            bad: 0,
            heals: 0,
        };
        match self.free_ops.pop() {
            Some(i) => {
                self.ops[i] = Some(op);
                i
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        }
    }

    /// Starts the next scrub window when a scrub runs and none is in flight.
    fn scrub_kick(&mut self, ctx: &mut Ctx<'_>) {
        let Some(s) = self.scrub else { return };
        if self.scrubbing.is_some()
            || s.done >= s.total
            || s.done >= self.scrub_limit
            || self
                .journal
                .as_ref()
                .is_some_and(|j| !matches!(j.state, JState::Ready | JState::Resetting))
        {
            return;
        }
        let o = self.own_op(s.done, None, true);
        self.scrubbing = Some(o);
        self.enqueue(o, ctx);
    }

    /// Starts the next rebuild window when none is in flight: the first member being rebuilt,
    /// from where it stands. One window at a time, under the window's lock, so host I/O keeps
    /// the larger share of the members.
    fn rebuild_kick(&mut self, ctx: &mut Ctx<'_>) {
        if self.rebuilding.is_some()
            || self.rebuild_stuck
            || self
                .journal
                .as_ref()
                .is_some_and(|j| !matches!(j.state, JState::Ready | JState::Resetting))
        {
            return;
        }
        let Some((target, done)) =
            self.members
                .iter()
                .enumerate()
                .find_map(|(i, m)| match m.state {
                    MemberState::Rebuilding { done } if done < self.member_len => Some((i, done)),
                    _ => None,
                })
        else {
            return;
        };
        if done >= self.rebuild_limit {
            return;
        }
        let o = self.own_op(done, Some(target), false);
        self.rebuilding = Some(o);
        self.enqueue(o, ctx);
    }

    /// A rebuild window of member `target` ending at member byte `end` finished.
    fn rebuilt(&mut self, target: usize, end: u64, status: u16) {
        self.rebuilding = None;
        let len = self.member_len;
        let Some(m) = self.members.get_mut(target) else {
            return;
        };
        let MemberState::Rebuilding { done } = m.state else {
            return;
        };
        if status != STATUS_SUCCESS {
            tracing::error!(raid = %self.name, member = target, done, status, "rebuild window failed: the rebuild stops here");
            self.rebuild_stuck = true;
            return;
        }
        let done = done.max(end);
        if done >= len {
            m.state = MemberState::Active;
            tracing::info!(raid = %self.name, member = target, device = m.dev.name(), "rebuild complete: the member is active");
        } else {
            m.state = MemberState::Rebuilding { done };
        }
    }

    /// A stripe operation reconstructing one read piece.
    fn read_op(&mut self, parent: usize, piece: Piece) -> usize {
        let chain = self
            .parents
            .get(parent)
            .and_then(Option::as_ref)
            .map_or(0, |p| p.chain);
        let io = Io {
            seq: 0,
            token: 0,
            op: Op::Read,
            offset: 0,
            len: 0,
            fua: false,
            chain: ChainRef { id: chain, skip: 0 },
        };
        self.new_op(parent, &io, vec![piece])
    }
}

impl Bdev for ParityBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn size(&self) -> u64 {
        self.member_len * self.geo.k() as u64
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
        self.host_ios += 1;
        if let Some(j) = self.journal.as_mut() {
            match j.state {
                JState::Starting | JState::Replaying => {
                    j.held.push(io);
                    return;
                }
                JState::Broken => {
                    self.ready.push(Done {
                        token: io.token,
                        status: STATUS_INTERNAL,
                    });
                    return;
                }
                JState::Ready | JState::Resetting => {}
            }
        }
        if !in_range(&io, self.block_size, self.size()) {
            self.ready.push(Done {
                token: io.token,
                status: STATUS_LBA_OUT_OF_RANGE,
            });
            return;
        }
        let p = self.new_parent(io.token, io.op, io.chain.id);
        match io.op {
            Op::Flush => {
                for m in 0..self.members.len() {
                    if self.writable(m) {
                        self.hold_parent(p);
                        self.send(
                            Child {
                                owner: Owner::Plain {
                                    parent: p,
                                    raw: false,
                                },
                                member: m,
                                parent: p,
                                piece: None,
                            },
                            io,
                            ctx,
                        );
                    }
                }
            }
            Op::Read => {
                for piece in self.pieces(&io) {
                    let member = self.geo.member(piece.stripe, piece.col);
                    if self.readable(piece.stripe, piece.col, piece.b) {
                        self.hold_parent(p);
                        let child_io = Io {
                            offset: self.member_offset(piece.stripe, piece.a),
                            len: piece.b - piece.a,
                            chain: ChainRef {
                                id: io.chain.id,
                                skip: piece.skip,
                            },
                            ..io
                        };
                        self.send(
                            Child {
                                owner: Owner::Direct(p),
                                member,
                                parent: p,
                                piece: Some(piece),
                            },
                            child_io,
                            ctx,
                        );
                    } else {
                        let o = self.read_op(p, piece);
                        self.enqueue(o, ctx);
                    }
                }
            }
            Op::Write | Op::WriteZeroes | Op::Deallocate => {
                let pieces = self.pieces(&io);
                let mut group: Vec<Piece> = Vec::new();
                for piece in pieces {
                    let same = group.first().is_some_and(|g| {
                        g.stripe == piece.stripe && g.a / self.window == piece.a / self.window
                    });
                    if !same && !group.is_empty() {
                        let o = self.new_op(p, &io, std::mem::take(&mut group));
                        self.enqueue(o, ctx);
                    }
                    group.push(piece);
                }
                if !group.is_empty() {
                    let o = self.new_op(p, &io, group);
                    self.enqueue(o, ctx);
                }
            }
        }
        self.settle(p);
    }

    fn poll(&mut self, ctx: &mut Ctx<'_>, out: &mut Vec<Done>) -> bool {
        let mut progress = false;
        if self
            .journal
            .as_ref()
            .is_some_and(|j| j.state == JState::Starting)
        {
            self.journal_start(ctx);
            progress = true;
        }
        let mut scratch = std::mem::take(&mut self.scratch_done);
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
        self.scratch_done = scratch;
        self.rebuild_kick(ctx);
        self.scrub_kick(ctx);
        progress |= !self.ready.is_empty();
        out.append(&mut self.ready);
        progress
    }

    fn busy(&self) -> bool {
        !self.ready.is_empty()
            || self.members.iter().any(|m| m.dev.busy())
            || self.rebuilding.is_some()
            || self.scrubbing.is_some()
            || (!self.rebuild_stuck
                && self.members.iter().any(|m| {
                    matches!(m.state, MemberState::Rebuilding { done } if done < self.rebuild_limit)
                }))
            || self
                .scrub
                .is_some_and(|s| s.done < s.total && s.done < self.scrub_limit)
            || self.journal.as_ref().is_some_and(|j| {
                matches!(
                    j.state,
                    JState::Starting | JState::Replaying | JState::Resetting
                )
            })
    }

    fn inflight(&self) -> usize {
        self.parents.iter().filter(|p| p.is_some()).count()
            + self.ready.len()
            + self.held.len()
            + self.journal.as_ref().map_or(0, |j| j.held.len())
    }

    fn retries(&self) -> u64 {
        self.members.iter().map(|m| m.dev.retries()).sum()
    }

    fn integrity_counts(&self) -> IntegrityCounts {
        self.integrity
    }

    fn member_integrity_errors(&self, i: usize) -> u64 {
        self.members.get(i).map_or(0, |m| m.dev.integrity_errors())
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
        let p = self.new_parent(io.token, Op::Read, io.chain.id);
        self.hold_parent(p);
        self.send(
            Child {
                owner: Owner::Plain {
                    parent: p,
                    raw: true,
                },
                member: i,
                parent: p,
                piece: None,
            },
            io,
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
            let can = match self.members.get(m).map(|x| x.state) {
                Some(MemberState::Active) => self.degraded_count() < self.geo.np,
                Some(MemberState::Rebuilding { .. }) => true,
                _ => false,
            };
            if can {
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
        self.members.iter().map(|m| m.state).collect()
    }

    fn start_scrub(&mut self) -> Result<(), String> {
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
        let done = done.min(self.member_len) / self.window * self.window;
        self.rebuild_from = done;
        let old = std::mem::replace(&mut self.members[i].dev, dev);
        self.members[i].state = MemberState::Rebuilding { done };
        self.rebuild_stuck = false;
        tracing::info!(raid = %self.name, member = i, device = self.members[i].dev.name(), from = done, "member replaced: rebuilding");
        Ok(old)
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
        if let Some(j) = self.journal.as_mut() {
            if let Some(m) = j.marker.take() {
                scratch.give(m);
            }
            if let Some(c) = j.task.as_mut().and_then(|t| t.chain.take()) {
                scratch.give(c);
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
