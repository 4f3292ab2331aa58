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
//!
//! Not yet: the stripe journal that closes the write hole, and the write-intent bitmap.

use std::collections::{HashMap, VecDeque};
use std::os::fd::BorrowedFd;

use duplex_ipc::desc::{
    STATUS_FENCED, STATUS_INTERNAL, STATUS_LBA_OUT_OF_RANGE, STATUS_READ_ERROR,
    STATUS_RESERVATION_CONFLICT, STATUS_SUCCESS,
};

use super::raid::MemberState;
use super::{in_range, Attach, Bdev, BdevBox, ChainRef, Ctx, Done, Event, Io, Op};
use crate::parity::{self, Geometry};

/// The largest row range one stripe operation covers (its lock and its buffers).
pub const WINDOW: u64 = 64 * 1024;

#[derive(Debug)]
struct Member {
    dev: BdevBox,
    state: MemberState,
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
}

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
        Self {
            name: name.to_owned(),
            geo: Geometry { n, np, chunk },
            block_size,
            data_offset,
            member_len,
            window: chunk.min(WINDOW),
            members: members
                .into_iter()
                .enumerate()
                .map(|(i, dev)| Member {
                    dev,
                    state: states.get(i).copied().unwrap_or(MemberState::Active),
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
        }
    }

    /// As [`super::RaidBdev::hold_until_recorded`].
    pub fn hold_until_recorded(mut self, on: bool) -> Self {
        self.hold_until_recorded = on;
        self
    }

    /// Parity buffer bytes the engine should keep for this device: room for a few of its
    /// largest operations at once.
    pub fn scratch_wanted(n: usize, chunk: u64) -> u64 {
        4 * n as u64 * chunk.min(WINDOW)
    }

    fn failed_count(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.state == MemberState::Failed)
            .count()
    }

    fn active(&self, m: usize) -> bool {
        self.members[m].state == MemberState::Active
    }

    fn col_active(&self, stripe: u64, col: usize) -> bool {
        self.active(self.geo.member(stripe, col))
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

    /// Fails member `m` if the device can lose it (fewer members failed than parity columns,
    /// and the error is the drive's, not this node's fencing). Returns whether the device
    /// goes on without it (it was failed now or before).
    fn fail_member(&mut self, m: usize, status: u16, ctx: &mut Ctx<'_>) -> bool {
        if self.members[m].state == MemberState::Failed {
            return true;
        }
        if status == STATUS_RESERVATION_CONFLICT
            || status == STATUS_FENCED
            || self.failed_count() >= self.geo.np
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
        let lost: Vec<usize> = (0..geo.n)
            .filter(|&c| !self.col_active(stripe, c))
            .collect();
        if lost.len() > np {
            let status = if op.op == Op::Read {
                STATUS_READ_ERROR
            } else {
                STATUS_INTERNAL
            };
            tracing::error!(raid = %self.name, stripe, lost = ?lost, "more columns lost than parity can rebuild");
            self.finish(o, status, ctx);
            return;
        }
        // What to read: per column, the rows [a, b) (None: nothing).
        let mut reads: Vec<Option<(u64, u64)>> = vec![None; geo.n];
        let mut slotted = vec![false; geo.n];
        let plan;
        if op.op == Op::Read {
            plan = Plan::Reconstruct;
            for c in 0..geo.n {
                if !lost.contains(&c) {
                    reads[c] = Some((lo, hi));
                    slotted[c] = true;
                }
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
                            *s = !lost.contains(&c);
                        }
                    }
                }
            }
        }
        let nslots = slotted.iter().filter(|s| **s).count() as u64;
        // Buffers: one slot of `len` bytes per slotted column.
        if nslots > 0 {
            let Some(id) = ctx.scratch.take(nslots * len) else {
                if !ctx.scratch.fits(nslots * len) {
                    tracing::error!(raid = %self.name, bytes = nslots * len, "a stripe operation needs more parity buffers than the reserve holds");
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
        let lost: Vec<usize> = (0..geo.n)
            .filter(|&c| !self.col_active(stripe, c))
            .collect();
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
        // The writes: new data from the parent's buffers, parity from the slots.
        let mut writes: Vec<(usize, Io)> = Vec::new();
        for piece in &op.pieces {
            if !self.col_active(stripe, piece.col) {
                continue;
            }
            writes.push((
                geo.member(stripe, piece.col),
                Io {
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
        let parent = op.parent;
        if let Some(op) = self.ops[o].as_mut() {
            op.phase = Phase::Writing;
            op.pending = writes.len() as u32;
        }
        if writes.is_empty() {
            self.finish(o, STATUS_SUCCESS, ctx);
            return Ok(());
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
        Ok(())
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
        let status = if op.status != STATUS_SUCCESS {
            op.status
        } else {
            status
        };
        if status != STATUS_SUCCESS {
            self.fail_parent(op.parent, status);
        }
        self.settle(op.parent);
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
                    if self.fail_member(c.member, d.status, ctx) {
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
                if !ok {
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

    /// A stripe operation reconstructing one read piece.
    fn read_op(&mut self, parent: usize, piece: Piece) -> usize {
        let chain = self
            .parents
            .get(parent)
            .and_then(Option::as_ref)
            .map_or(0, |p| p.chain);
        let io = Io {
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
                    if self.active(m) {
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
                    if self.active(member) {
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
        progress |= !self.ready.is_empty();
        out.append(&mut self.ready);
        progress
    }

    fn busy(&self) -> bool {
        !self.ready.is_empty() || self.members.iter().any(|m| m.dev.busy())
    }

    fn inflight(&self) -> usize {
        self.parents.iter().filter(|p| p.is_some()).count() + self.ready.len() + self.held.len()
    }

    fn retries(&self) -> u64 {
        self.members.iter().map(|m| m.dev.retries()).sum()
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
            if m < self.members.len() && self.active(m) && self.failed_count() < self.geo.np {
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

    fn held(&self) -> usize {
        self.held.len()
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
