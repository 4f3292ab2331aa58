//! [`ChecksumBdev`]: integrity records for a drive whose LBA format has no metadata, kept in a
//! checksum area of the drive (ONDISK "Checksum area").
//!
//! It sits between a RAID device and one member drive and covers the pool's data area on that
//! drive: every logical block there has a 16-byte entry in the area, two slots of the record
//! `crate::integrity` defines (`seq32`, CRC-32C over the tag, the drive LBA, `seq32` and the
//! data). Slot 0 describes the newest write of the block, slot 1 the one before; a slot of all
//! zeroes describes a block of zeroes (never written, zeroed or deallocated). A block is good
//! when its data matches either slot, so the two writes a block update needs — its entry and
//! its data — can never leave it unreadable after a power cut:
//!
//! * the entry block (4 KiB, 256 entries) is written with FUA, and the data write is issued
//!   only when it has completed: the data on the medium is the old one or, once issued, the
//!   old or the new one, and the entry on the medium names both;
//! * before an entry's slot 0 moves to slot 1, the data it describes is durable: a block
//!   written since the last completed flush makes its next write wait for a flush (one flush
//!   serves every write waiting for one). So slot 1 always names data that is on the medium.
//! * an entry read from the medium may name in slot 0 a write the drive lost (acknowledged,
//!   never flushed, then a power cut), so before its first rewrite the block's data is read
//!   and the slot it matches is the one kept; and its durability is not known, so that first
//!   rewrite waits for a flush as well. A write or entry write that failed leaves its blocks
//!   unknown the same way.
//!
//! One entry-block write is in flight per entry block; updates arriving meanwhile ride the next
//! one together. Block ranges are locked in this layer (a write excludes every other I/O of its
//! blocks), so an entry changes only while no read of its block is in flight and a read is
//! checked against exactly the entry of the data it read. Entry blocks are cached (bounded;
//! only idle ones whose blocks are all durable are dropped).
//!
//! I/O outside the covered range (superblocks, metadata, journals, the bitmap) passes through
//! unchecked, as do flushes.

use std::collections::{HashMap, VecDeque};
use std::os::fd::BorrowedFd;

use duplex_ipc::desc::{STATUS_INTEGRITY, STATUS_INTERNAL, STATUS_LBA_OUT_OF_RANGE};
use duplex_ipc::pool::Pool;

use super::{
    in_range, Attach, Bdev, BdevBox, ChainRef, Ctx, Done, Io, Op, Scratch, REPORT_VERDICTS,
};
use crate::drives::Drive;
use crate::integrity::{self, Verdict, RECORD_LEN};

/// Bytes of one block's entry (two records).
pub const ENTRY_LEN: u64 = 16;
/// Bytes of an entry block (read and written whole).
pub const ENTRY_BLOCK: u64 = 4096;
/// Entries per entry block.
const PER_BLOCK: u64 = ENTRY_BLOCK / ENTRY_LEN;
/// Entry-block buffers a device owns (its entry-block I/Os in flight at most).
pub const BUFFERS: usize = 16;
/// Entry blocks kept cached (more while they are busy or not durable).
const CACHE_MAX: usize = 4096;

const TAG_SHIFT: u32 = 62;
const TAG_DATA: u64 = 1;
const TAG_ENTRY: u64 = 2;
const TAG_FLUSH: u64 = 3;
/// Verify reads share the entry tag: their slots are above this.
const VERIFY_BASE: u64 = 1 << 40;
/// Zeroing and deallocation are done this many bytes at a time (bounded state per piece).
const PIECE: u64 = 4 << 20;

const UNKNOWN: u8 = 0;
const KNOWN_0: u8 = 1;
const KNOWN_1: u8 = 2;
const INDEX_MASK: u64 = (1 << TAG_SHIFT) - 1;

/// The bytes a checksum area needs for `data_len` bytes of blocks of `block_size` bytes.
pub fn area_len(data_len: u64, block_size: u32) -> u64 {
    let blocks = data_len / u64::from(block_size.max(1));
    blocks.div_ceil(PER_BLOCK) * ENTRY_BLOCK
}

#[derive(Debug)]
struct OpState {
    io: Io,
    /// Inside the covered range (checked); otherwise passed through.
    covered: bool,
    /// First block of the covered range (entry index) and blocks.
    first: u64,
    n: u64,
    /// A write's new slot 0 per block.
    slots: Vec<[u8; RECORD_LEN]>,
    /// A write's entries before it (put back if its entry write fails).
    old: Vec<[u8; 16]>,
    /// Things outstanding in this stage (entry blocks loading or written, a read's data).
    wait: u32,
    /// A piece of a long zeroing ([`Split`]), completed into it rather than to the caller.
    piece_of: Option<usize>,
    status: u16,
}

impl OpState {
    fn is_write(&self) -> bool {
        matches!(self.io.op, Op::Write | Op::WriteZeroes | Op::Deallocate)
    }

    fn entry_blocks(&self) -> std::ops::RangeInclusive<u64> {
        self.first / PER_BLOCK..=(self.first + self.n.max(1) - 1) / PER_BLOCK
    }
}

#[derive(Debug)]
struct EntryBlock {
    /// The entries as on the medium plus the updates not yet written.
    bytes: Vec<u8>,
    /// Per entry: the flush number that makes the data it names durable (0: durable).
    stamps: Vec<u64>,
    /// Per entry: which slot names the data on the drive ([`KNOWN_0`], [`KNOWN_1`], or
    /// [`UNKNOWN`]: read from the medium and not checked against the data since).
    known: Vec<u8>,
    loaded: bool,
    /// Ops waiting for the load.
    loading: Vec<usize>,
    /// Ops whose entries ride the write in flight (`Some` while one is).
    writing: Option<Vec<usize>>,
    /// Ops whose entries are in `bytes` and wait for the next write.
    dirty: Vec<usize>,
    /// Ops in progress that use this block.
    users: u32,
}

impl EntryBlock {
    fn new() -> Self {
        Self {
            bytes: vec![0; ENTRY_BLOCK as usize],
            stamps: vec![0; PER_BLOCK as usize],
            known: vec![UNKNOWN; PER_BLOCK as usize],
            loaded: false,
            loading: Vec::new(),
            writing: None,
            dirty: Vec::new(),
            users: 0,
        }
    }

    fn entry(&self, i: u64) -> [u8; 16] {
        let at = (i % PER_BLOCK * ENTRY_LEN) as usize;
        let mut e = [0u8; 16];
        e.copy_from_slice(&self.bytes[at..at + 16]);
        e
    }

    fn set_entry(&mut self, i: u64, e: &[u8; 16]) {
        let at = (i % PER_BLOCK * ENTRY_LEN) as usize;
        self.bytes[at..at + 16].copy_from_slice(e);
    }
}

/// A long Write Zeroes or Deallocate done in pieces of [`PIECE`] bytes, one after another.
#[derive(Debug, Clone, Copy)]
struct Split {
    io: Io,
    /// The next piece's first byte.
    next: u64,
    status: u16,
}

/// A read of blocks whose entries are unknown, before their first rewrite.
#[derive(Debug, Clone, Copy)]
struct VerifyIo {
    op: usize,
    /// First block (entry index) and blocks.
    first: u64,
    n: u64,
    chain: u32,
}

/// An entry-block I/O in flight or waiting for a buffer.
#[derive(Debug, Clone, Copy)]
struct EntryIo {
    block: u64,
    write: bool,
    chain: u32,
}

/// A member drive with its integrity records in a checksum area. See the module docs.
#[derive(Debug)]
pub struct ChecksumBdev {
    inner: BdevBox,
    name: String,
    block_size: u64,
    /// Covered bytes of the drive: `[lo, hi)`.
    lo: u64,
    hi: u64,
    /// The area's first byte and length.
    area: u64,
    ops: Vec<Option<OpState>>,
    free: Vec<usize>,
    /// Covered ops waiting for their range, in arrival order.
    queued: VecDeque<usize>,
    /// Covered ops past the queue (holding their range).
    active: Vec<usize>,
    cache: HashMap<u64, EntryBlock>,
    entry_ios: Vec<Option<EntryIo>>,
    verify_ios: Vec<Option<VerifyIo>>,
    /// Verify reads waiting for a buffer: (op, first block, blocks).
    verify_wait: VecDeque<(usize, u64, u64)>,
    splits: Vec<Option<Split>>,
    /// Entry-block I/Os waiting for a buffer.
    entry_wait: VecDeque<(u64, bool)>,
    buffers: Vec<u32>,
    all_buffers: Vec<u32>,
    /// Flushes issued (the last one's number) and the highest number completed.
    flushes_issued: u64,
    flushed: u64,
    /// Flush numbers in flight.
    flushing: Vec<u64>,
    /// Writes waiting for a flush.
    durable_wait: Vec<usize>,
    ready: Vec<Done>,
    verdicts: Vec<(u64, Vec<Verdict>)>,
    /// Blocks read that failed their check.
    errors: u64,
    /// Flushes this device issued itself (for the logs and tests).
    own_flushes: u64,
}

impl ChecksumBdev {
    /// Wraps `inner`, covering bytes `[data_offset, data_offset + data_len)` with entries in
    /// `[area, area + area_len)`; takes its entry-block buffers from `pool` (given back by
    /// [`Bdev::take_checksum_inner`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inner: BdevBox,
        data_offset: u64,
        data_len: u64,
        area: u64,
        area_len: u64,
        pool: &Pool,
        scratch: &mut Scratch,
    ) -> Result<Self, (BdevBox, String)> {
        let bs = u64::from(inner.block_size());
        let name = inner.name().to_owned();
        let size = inner.size();
        let bad = |inner, why: String| Err((inner, format!("{name}: checksum area: {why}")));
        if bs == 0 || bs > ENTRY_BLOCK || data_offset % bs != 0 || data_len % bs != 0 {
            return bad(
                inner,
                format!("data area {data_offset}+{data_len} is not on {bs}-byte blocks"),
            );
        }
        if area % ENTRY_BLOCK != 0 || area_len % ENTRY_BLOCK != 0 {
            return bad(
                inner,
                format!("area {area}+{area_len} is not 4 KiB aligned"),
            );
        }
        if area_len < area_len_for(data_len, bs) {
            return bad(
                inner,
                format!(
                    "{area_len} bytes cannot hold the entries of {data_len} bytes of data (needs {})",
                    area_len_for(data_len, bs)
                ),
            );
        }
        let data_end = data_offset.checked_add(data_len);
        let area_end = area.checked_add(area_len);
        match (data_end, area_end) {
            (Some(d), Some(a)) if a <= size && d <= size && (a <= data_offset || area >= d) => {}
            _ => {
                return bad(
                    inner,
                    format!(
                        "area {area}+{area_len} and data {data_offset}+{data_len} overlap or pass the drive's {size} bytes"
                    ),
                )
            }
        }
        let mut buffers = Vec::new();
        for _ in 0..BUFFERS {
            match scratch.take_own(pool, ENTRY_BLOCK) {
                Some(c) => buffers.push(c),
                None => {
                    for c in buffers {
                        scratch.give_own(pool, c);
                    }
                    return bad(
                        inner,
                        "the buffer pool has no room for the entry-block buffers: raise pool_chunks"
                            .into(),
                    );
                }
            }
        }
        Ok(Self {
            inner,
            name,
            block_size: bs,
            lo: data_offset,
            hi: data_offset + data_len,
            area,
            ops: Vec::new(),
            free: Vec::new(),
            queued: VecDeque::new(),
            active: Vec::new(),
            cache: HashMap::new(),
            entry_ios: Vec::new(),
            verify_ios: Vec::new(),
            verify_wait: VecDeque::new(),
            splits: Vec::new(),
            entry_wait: VecDeque::new(),
            all_buffers: buffers.clone(),
            buffers,
            flushes_issued: 0,
            flushed: 0,
            flushing: Vec::new(),
            durable_wait: Vec::new(),
            ready: Vec::new(),
            verdicts: Vec::new(),
            errors: 0,
            own_flushes: 0,
        })
    }

    /// Flushes this device issued to make blocks durable before their entries changed.
    pub fn own_flushes(&self) -> u64 {
        self.own_flushes
    }

    fn new_op(&mut self, op: OpState) -> usize {
        match self.free.pop() {
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

    fn overlaps(a: &OpState, b: &OpState) -> bool {
        (a.is_write() || b.is_write()) && a.first < b.first + b.n && b.first < a.first + a.n
    }

    /// Whether op `i` may take its range now (no held or earlier queued op conflicts).
    fn may_start(&self, i: usize, earlier: &[usize]) -> bool {
        let Some(me) = self.ops[i].as_ref() else {
            return false;
        };
        self.active
            .iter()
            .chain(earlier)
            .filter_map(|&j| self.ops.get(j).and_then(Option::as_ref))
            .all(|o| !Self::overlaps(me, o))
    }

    /// Starts the queued ops that no longer conflict, in order.
    fn run_queue(&mut self, ctx: &mut Ctx<'_>) {
        let mut still = VecDeque::new();
        let mut earlier: Vec<usize> = Vec::new();
        while let Some(i) = self.queued.pop_front() {
            if self.may_start(i, &earlier) {
                self.start(i, ctx);
            } else {
                earlier.push(i);
                still.push_back(i);
            }
        }
        self.queued = still;
    }

    /// Op `i` holds its range: load its entry blocks (and read its data).
    fn start(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        self.active.push(i);
        let Some(op) = self.ops[i].as_mut() else {
            return;
        };
        let blocks = op.entry_blocks();
        let read = op.io.op == Op::Read;
        let mut wait = 0;
        let mut loads = Vec::new();
        for k in blocks {
            let e = self.cache.entry(k).or_insert_with(EntryBlock::new);
            e.users += 1;
            if !e.loaded {
                e.loading.push(i);
                wait += 1;
                if e.loading.len() == 1 {
                    loads.push(k);
                }
            }
        }
        for k in loads {
            self.entry_io(k, false, ctx);
        }
        if read {
            wait += 1;
        }
        if let Some(op) = self.ops[i].as_mut() {
            op.wait = wait;
        }
        if read {
            let io = self.ops[i].as_ref().map(|o| o.io);
            if let Some(io) = io {
                self.inner.submit(
                    Io {
                        token: (TAG_DATA << TAG_SHIFT) | i as u64,
                        seq: 0,
                        ..io
                    },
                    ctx,
                );
            }
        }
        if wait == 0 {
            self.loaded(i, ctx);
        }
    }

    /// Starts an entry-block read or write of block `k` (or queues it for a buffer).
    fn entry_io(&mut self, k: u64, write: bool, ctx: &mut Ctx<'_>) {
        let Some(chain) = self.buffers.pop() else {
            self.entry_wait.push_back((k, write));
            return;
        };
        if write {
            let bytes = self
                .cache
                .get(&k)
                .map(|e| e.bytes.clone())
                .unwrap_or_default();
            if ctx
                .pool
                .copy_in(ctx.scratch.chain(chain), 0, &bytes)
                .is_err()
            {
                tracing::error!(drive = %self.name, block = k, "entry block does not fit its buffer");
            }
        }
        let slot = match self.entry_ios.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.entry_ios.push(None);
                self.entry_ios.len() - 1
            }
        };
        self.entry_ios[slot] = Some(EntryIo {
            block: k,
            write,
            chain,
        });
        self.inner.submit(
            Io {
                token: (TAG_ENTRY << TAG_SHIFT) | slot as u64,
                op: if write { Op::Write } else { Op::Read },
                offset: self.area + k * ENTRY_BLOCK,
                len: ENTRY_BLOCK,
                fua: write,
                chain: ChainRef { id: chain, skip: 0 },
                seq: 0,
            },
            ctx,
        );
    }

    /// Op `i` has its entry blocks (and a read its data).
    fn loaded(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        let Some(op) = self.ops[i].as_ref() else {
            return;
        };
        if op.io.op == Op::Read {
            self.check_read(i, ctx);
            self.finish(i, ctx);
            return;
        }
        if op.status != 0 {
            self.finish(i, ctx);
            return;
        }
        self.verify(i, ctx);
    }

    /// A write: reads the blocks whose entries are unknown (runs of them, a buffer each) to
    /// learn which slot names their data; then on to [`Self::durable`].
    fn verify(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        let Some(op) = self.ops[i].as_ref() else {
            return;
        };
        let (first, n) = (op.first, op.n);
        let max =
            (ctx.scratch.chunk_size().max(ENTRY_BLOCK as usize) as u64 / self.block_size).max(1);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in first..first + n {
            let unknown = self.cache.get(&(b / PER_BLOCK)).is_some_and(|e| {
                let j = (b % PER_BLOCK) as usize;
                e.known[j] == UNKNOWN && e.entry(b) != [0u8; 16]
            });
            if !unknown {
                continue;
            }
            match runs.last_mut() {
                Some((f, c)) if *f + *c == b && *c < max => *c += 1,
                _ => runs.push((b, 1)),
            }
        }
        if runs.is_empty() {
            self.durable(i, ctx);
            return;
        }
        if let Some(op) = self.ops[i].as_mut() {
            op.wait = u32::try_from(runs.len()).unwrap_or(u32::MAX);
        }
        for (f, c) in runs {
            self.verify_io(i, f, c, ctx);
        }
    }

    fn verify_io(&mut self, i: usize, first: u64, n: u64, ctx: &mut Ctx<'_>) {
        let Some(chain) = self.buffers.pop() else {
            self.verify_wait.push_back((i, first, n));
            return;
        };
        let slot = match self.verify_ios.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.verify_ios.push(None);
                self.verify_ios.len() - 1
            }
        };
        self.verify_ios[slot] = Some(VerifyIo {
            op: i,
            first,
            n,
            chain,
        });
        self.inner.submit(
            Io {
                token: (TAG_ENTRY << TAG_SHIFT) | (VERIFY_BASE + slot as u64),
                op: Op::Read,
                offset: self.lo + first * self.block_size,
                len: n * self.block_size,
                fua: false,
                chain: ChainRef { id: chain, skip: 0 },
                seq: 0,
            },
            ctx,
        );
    }

    fn verify_done(&mut self, slot: usize, status: u16, ctx: &mut Ctx<'_>) {
        let Some(v) = self.verify_ios.get_mut(slot).and_then(Option::take) else {
            tracing::error!(drive = %self.name, slot, "verify completion of no I/O");
            return;
        };
        if status == 0 {
            let bs = self.block_size as usize;
            let mut data = vec![0u8; bs];
            for j in 0..v.n {
                let b = v.first + j;
                let ok = ctx
                    .pool
                    .copy_out(ctx.scratch.chain(v.chain), j as usize * bs, &mut data)
                    .is_ok();
                let lba = self.lo / self.block_size + b;
                if let Some(e) = self.cache.get_mut(&(b / PER_BLOCK)) {
                    let entry = e.entry(b);
                    let which = if ok {
                        which_slot(lba, &data, &entry).1
                    } else {
                        None
                    };
                    // A block matching neither slot is bad anyway: its slot 0 is kept.
                    e.known[(b % PER_BLOCK) as usize] =
                        if which == Some(1) { KNOWN_1 } else { KNOWN_0 };
                }
            }
        }
        self.buffers.push(v.chain);
        let i = v.op;
        if let Some(op) = self.ops.get_mut(i).and_then(Option::as_mut) {
            if status != 0 && op.status == 0 {
                op.status = status;
            }
            op.wait = op.wait.saturating_sub(1);
            if op.wait == 0 {
                if op.status != 0 {
                    self.finish(i, ctx);
                } else {
                    self.durable(i, ctx);
                }
            }
        }
        self.more_entry_ios(ctx);
    }

    /// A write: wait until the data its entries' slot 0 describe is durable, then record.
    fn durable(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        let Some(op) = self.ops[i].as_mut() else {
            return;
        };
        let mut need = 0;
        for b in op.first..op.first + op.n {
            if let Some(e) = self.cache.get(&(b / PER_BLOCK)) {
                need = need.max(e.stamps[(b % PER_BLOCK) as usize]);
            }
        }
        if need <= self.flushed {
            self.record(i, ctx);
            return;
        }
        self.durable_wait.push(i);
        if !self.flushing.iter().any(|&f| f >= need) {
            self.own_flush(ctx);
        }
    }

    /// A write: its new entries go into the cached blocks and ride the next entry writes.
    fn record(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        let Some(op) = self.ops[i].as_mut() else {
            return;
        };
        op.old.clear();
        let mut blocks = Vec::new();
        for (j, b) in (op.first..op.first + op.n).enumerate() {
            let k = b / PER_BLOCK;
            let Some(e) = self.cache.get_mut(&k) else {
                continue;
            };
            let old = e.entry(b);
            let within = (b % PER_BLOCK) as usize;
            let prev = if e.known[within] == KNOWN_1 {
                &old[RECORD_LEN..]
            } else {
                &old[..RECORD_LEN]
            };
            let mut new = [0u8; 16];
            new[..RECORD_LEN].copy_from_slice(&op.slots[j]);
            new[RECORD_LEN..].copy_from_slice(prev);
            e.set_entry(b, &new);
            // Until its data write ends well, the block holds either.
            e.known[within] = UNKNOWN;
            op.old.push(old);
            if blocks.last() != Some(&k) {
                blocks.push(k);
            }
        }
        op.wait = u32::try_from(blocks.len()).unwrap_or(u32::MAX);
        for k in blocks {
            let idle = match self.cache.get_mut(&k) {
                Some(e) => {
                    e.dirty.push(i);
                    e.writing.is_none()
                }
                None => false,
            };
            if idle {
                self.write_entries(k, ctx);
            }
        }
    }

    /// Writes entry block `k` with the updates waiting for it.
    fn write_entries(&mut self, k: u64, ctx: &mut Ctx<'_>) {
        let Some(e) = self.cache.get_mut(&k) else {
            return;
        };
        if e.writing.is_some() || e.dirty.is_empty() {
            return;
        }
        e.writing = Some(std::mem::take(&mut e.dirty));
        self.entry_io(k, true, ctx);
    }

    /// A read's data and entries are in: check every block.
    fn check_read(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        let Some(op) = self.ops[i].as_mut() else {
            return;
        };
        if op.status != 0 {
            return;
        }
        let chain = ctx.chain(op.io.chain.id);
        let bs = self.block_size as usize;
        let mut data = vec![0u8; bs];
        let mut verdicts = Vec::with_capacity(op.n as usize);
        let mut learned = Vec::new();
        let mut bad = 0u64;
        for (j, b) in (op.first..op.first + op.n).enumerate() {
            let at = op.io.chain.skip as usize + j * bs;
            let v = match (
                ctx.pool.copy_out(chain, at, &mut data),
                self.cache.get(&(b / PER_BLOCK)),
            ) {
                (Ok(()), Some(e)) if e.loaded => {
                    let entry = e.entry(b);
                    let lba = (self.lo / self.block_size) + b;
                    let (v, which) = which_slot(lba, &data, &entry);
                    learned.push((b, which));
                    v
                }
                _ => Verdict::Bad,
            };
            if v == Verdict::Bad {
                bad += 1;
            }
            verdicts.push(v);
        }
        // What a read saw tells which slot names the data (its durability still unknown).
        for (b, which) in learned {
            if let Some(e) = self.cache.get_mut(&(b / PER_BLOCK)) {
                let k = &mut e.known[(b % PER_BLOCK) as usize];
                if *k == UNKNOWN {
                    match which {
                        Some(0) => *k = KNOWN_0,
                        Some(1) => *k = KNOWN_1,
                        _ => {}
                    }
                }
            }
        }
        if bad > 0 {
            op.status = STATUS_INTEGRITY;
            self.errors += bad;
            tracing::warn!(
                drive = %self.name,
                offset = op.io.offset,
                len = op.io.len,
                bad,
                "blocks read failed their integrity check (checksum area)"
            );
        }
        if op.io.seq == REPORT_VERDICTS {
            let token = op.io.token;
            self.verdicts.retain(|x| x.0 != token);
            self.verdicts.push((token, verdicts));
        }
    }

    /// Op `i` ends: its completion, its range and entry blocks let go.
    fn finish(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        let Some(op) = self.ops[i].take() else {
            return;
        };
        self.free.push(i);
        match op.piece_of {
            Some(s) => self.piece_done(s, op.status),
            None => self.ready.push(Done {
                token: op.io.token,
                status: op.status,
            }),
        }
        if !op.covered {
            return;
        }
        self.active.retain(|&j| j != i);
        for k in op.entry_blocks() {
            if let Some(e) = self.cache.get_mut(&k) {
                e.users = e.users.saturating_sub(1);
            }
        }
        self.evict(ctx);
        self.run_queue(ctx);
        self.next_pieces(ctx);
    }

    /// A piece of split `s` ended.
    fn piece_done(&mut self, s: usize, status: u16) {
        if let Some(sp) = self.splits.get_mut(s).and_then(Option::as_mut) {
            if status != 0 && sp.status == 0 {
                sp.status = status;
            }
            sp.next = sp.next.saturating_add(PIECE);
        }
    }

    /// Splits whose piece ended: the next piece, or the end.
    fn next_pieces(&mut self, ctx: &mut Ctx<'_>) {
        for s in 0..self.splits.len() {
            let Some(sp) = self.splits[s] else {
                continue;
            };
            let busy = self.ops.iter().flatten().any(|o| o.piece_of == Some(s));
            if busy {
                continue;
            }
            let end = sp.io.offset + sp.io.len;
            let at = sp.io.offset + sp.next.min(sp.io.len);
            if sp.status != 0 || at >= end {
                self.splits[s] = None;
                self.ready.push(Done {
                    token: sp.io.token,
                    status: sp.status,
                });
                continue;
            }
            let piece = Io {
                offset: at,
                len: PIECE.min(end - at),
                ..sp.io
            };
            self.submit_covered(piece, Some(s), ctx);
        }
    }

    fn evict(&mut self, ctx: &mut Ctx<'_>) {
        if self.cache.len() <= CACHE_MAX {
            return;
        }
        let flushed = self.flushed;
        self.cache.retain(|_, e| {
            !(e.users == 0
                && (e.loaded || e.loading.is_empty())
                && e.writing.is_none()
                && e.dirty.is_empty()
                && e.stamps.iter().all(|&s| s <= flushed))
        });
        if self.cache.len() > CACHE_MAX && self.flushing.is_empty() {
            // Blocks written since the last flush keep their entry blocks: flush to let
            // them go (a host that never flushes would otherwise grow the cache).
            self.own_flush(ctx);
        }
    }

    fn own_flush(&mut self, ctx: &mut Ctx<'_>) {
        self.flushes_issued += 1;
        self.own_flushes += 1;
        let n = self.flushes_issued;
        self.flushing.push(n);
        self.inner.submit(
            Io {
                token: (TAG_FLUSH << TAG_SHIFT) | n,
                op: Op::Flush,
                offset: 0,
                len: 0,
                fua: false,
                chain: ChainRef { id: 0, skip: 0 },
                seq: 0,
            },
            ctx,
        );
    }

    /// An inner completion.
    fn inner_done(&mut self, d: Done, ctx: &mut Ctx<'_>) {
        let tag = d.token >> TAG_SHIFT;
        let index = d.token & INDEX_MASK;
        match tag {
            TAG_DATA => self.data_done(index as usize, d.status, ctx),
            TAG_ENTRY if index >= VERIFY_BASE => {
                self.verify_done((index - VERIFY_BASE) as usize, d.status, ctx)
            }
            TAG_ENTRY => self.entry_done(index as usize, d.status, ctx),
            TAG_FLUSH => self.flush_done(index, d.status, ctx),
            _ => tracing::error!(drive = %self.name, token = d.token, "completion of no I/O"),
        }
    }

    fn data_done(&mut self, i: usize, status: u16, ctx: &mut Ctx<'_>) {
        let Some(op) = self.ops.get_mut(i).and_then(Option::as_mut) else {
            tracing::error!(drive = %self.name, op = i, "data completion of no I/O");
            return;
        };
        if status != 0 && op.status == 0 {
            op.status = status;
        }
        if !op.covered {
            if op.io.op == Op::Flush && status == 0 {
                // A host flush numbered at submit.
                let n = op.first;
                self.flushing.retain(|&f| f != n);
                self.flushed = self.flushed.max(n);
                self.finish(i, ctx);
                self.flushes_ended(ctx);
                return;
            }
            if op.io.op == Op::Flush {
                // Writes that counted on it issue their own.
                let n = op.first;
                self.flushing.retain(|&f| f != n);
                self.finish(i, ctx);
                self.flushes_ended(ctx);
                return;
            }
            self.finish(i, ctx);
            return;
        }
        if op.io.op == Op::Read {
            op.wait = op.wait.saturating_sub(1);
            if op.wait == 0 {
                self.loaded(i, ctx);
            }
            return;
        }
        // A write's data ended: its blocks' slot 0 now describes data not yet durable (unless
        // it was written with FUA and succeeded).
        let stamp = if status == 0 && op.io.fua {
            0
        } else {
            self.flushes_issued + 1
        };
        let (first, n) = (op.first, op.n);
        for b in first..first + n {
            if let Some(e) = self.cache.get_mut(&(b / PER_BLOCK)) {
                let j = (b % PER_BLOCK) as usize;
                e.stamps[j] = stamp;
                // A failed write may have landed or not: the next rewrite reads the block.
                e.known[j] = if status == 0 { KNOWN_0 } else { UNKNOWN };
            }
        }
        self.finish(i, ctx);
    }

    fn entry_done(&mut self, slot: usize, status: u16, ctx: &mut Ctx<'_>) {
        let Some(eio) = self.entry_ios.get_mut(slot).and_then(Option::take) else {
            tracing::error!(drive = %self.name, slot, "entry-block completion of no I/O");
            return;
        };
        let k = eio.block;
        if !eio.write {
            let mut bytes = vec![0u8; ENTRY_BLOCK as usize];
            let ok = status == 0
                && ctx
                    .pool
                    .copy_out(ctx.scratch.chain(eio.chain), 0, &mut bytes)
                    .is_ok();
            self.buffers.push(eio.chain);
            let waiters = match self.cache.get_mut(&k) {
                Some(e) => {
                    if ok {
                        e.bytes = bytes;
                        e.loaded = true;
                        // Whatever the entries name may sit in the drive's cache only.
                        // (An all-zero entry names zeroes in both slots: nothing to learn.)
                        let unsure = self.flushes_issued + 1;
                        for j in 0..PER_BLOCK {
                            let zero = e.entry(j) == [0u8; 16];
                            e.known[j as usize] = if zero { KNOWN_0 } else { UNKNOWN };
                            e.stamps[j as usize] = if zero { 0 } else { unsure };
                        }
                    }
                    std::mem::take(&mut e.loading)
                }
                None => Vec::new(),
            };
            if !ok {
                tracing::warn!(drive = %self.name, block = k, status, "entry block read failed");
            }
            for i in waiters {
                let Some(op) = self.ops.get_mut(i).and_then(Option::as_mut) else {
                    continue;
                };
                if !ok && op.status == 0 {
                    op.status = if status == 0 { STATUS_INTERNAL } else { status };
                }
                op.wait = op.wait.saturating_sub(1);
                if op.wait == 0 {
                    self.loaded(i, ctx);
                }
            }
        } else {
            self.buffers.push(eio.chain);
            let riders = self
                .cache
                .get_mut(&k)
                .and_then(|e| e.writing.take())
                .unwrap_or_default();
            if status != 0 {
                tracing::warn!(drive = %self.name, block = k, status, "entry block write failed");
            }
            for i in riders {
                let Some(op) = self.ops.get_mut(i).and_then(Option::as_mut) else {
                    continue;
                };
                if status != 0 && op.status == 0 {
                    op.status = status;
                }
                op.wait = op.wait.saturating_sub(1);
                if op.wait == 0 {
                    self.recorded(i, ctx);
                }
            }
            self.write_entries(k, ctx);
        }
        self.more_entry_ios(ctx);
    }

    /// Entry-block I/Os that waited for a buffer.
    fn more_entry_ios(&mut self, ctx: &mut Ctx<'_>) {
        while !self.buffers.is_empty() {
            if let Some((k, write)) = self.entry_wait.pop_front() {
                self.entry_io(k, write, ctx);
            } else if let Some((i, first, n)) = self.verify_wait.pop_front() {
                self.verify_io(i, first, n, ctx);
            } else {
                break;
            }
        }
    }

    /// A write's entries are on the medium: write its data (or, if they failed, put the old
    /// entries back and fail it: its data was not written).
    fn recorded(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        let Some(op) = self.ops[i].as_mut() else {
            return;
        };
        if op.status != 0 {
            for (j, b) in (op.first..op.first + op.n).enumerate() {
                if let (Some(e), Some(old)) = (self.cache.get_mut(&(b / PER_BLOCK)), op.old.get(j))
                {
                    // The medium holds the old entry or the new one: the data (not written)
                    // is checked against the old one before the next rewrite.
                    e.set_entry(b, old);
                    e.known[(b % PER_BLOCK) as usize] = UNKNOWN;
                }
            }
            self.finish(i, ctx);
            return;
        }
        let io = op.io;
        self.inner.submit(
            Io {
                token: (TAG_DATA << TAG_SHIFT) | i as u64,
                ..io
            },
            ctx,
        );
    }

    fn flush_done(&mut self, n: u64, status: u16, ctx: &mut Ctx<'_>) {
        self.flushing.retain(|&f| f != n);
        if status == 0 {
            self.flushed = self.flushed.max(n);
        } else {
            tracing::warn!(drive = %self.name, status, "flush for the checksum area failed");
            for i in std::mem::take(&mut self.durable_wait) {
                if let Some(op) = self.ops.get_mut(i).and_then(Option::as_mut) {
                    op.status = status;
                }
                self.finish(i, ctx);
            }
            return;
        }
        self.flushes_ended(ctx);
    }

    /// Writes that waited for a flush try again.
    fn flushes_ended(&mut self, ctx: &mut Ctx<'_>) {
        for i in std::mem::take(&mut self.durable_wait) {
            self.durable(i, ctx);
        }
    }
    /// A covered I/O (or a piece of a split one) enters: sealed (a write), then queued for
    /// its block range or started.
    fn submit_covered(&mut self, io: Io, piece_of: Option<usize>, ctx: &mut Ctx<'_>) {
        let bs = self.block_size;
        let first = (io.offset - self.lo) / bs;
        let n = io.len / bs;
        let mut slots = Vec::new();
        if io.op == Op::Write {
            let chain = ctx.chain(io.chain.id);
            let mut data = vec![0u8; bs as usize];
            slots.reserve(n as usize);
            for j in 0..n {
                let at = io.chain.skip + j * bs;
                if ctx.pool.copy_out(chain, at as usize, &mut data).is_err() {
                    match piece_of {
                        Some(s) => self.piece_done(s, STATUS_INTERNAL),
                        None => self.ready.push(Done {
                            token: io.token,
                            status: STATUS_INTERNAL,
                        }),
                    }
                    return;
                }
                slots.push(integrity::seal(io.offset / bs + j, io.seq, &data));
            }
        } else if matches!(io.op, Op::WriteZeroes | Op::Deallocate) {
            slots = vec![[0u8; RECORD_LEN]; n as usize];
        }
        let i = self.new_op(OpState {
            io,
            covered: true,
            first,
            n,
            slots,
            old: Vec::new(),
            wait: 0,
            piece_of,
            status: 0,
        });
        let earlier: Vec<usize> = self.queued.iter().copied().collect();
        if self.may_start(i, &earlier) {
            self.start(i, ctx);
        } else {
            self.queued.push_back(i);
        }
    }
}

/// Checks `data` (one block at drive LBA `lba`) against both slots of `entry`: the verdict and
/// which slot it matched (`None`: neither; an unwritten block matching a zero slot counts).
fn which_slot(lba: u64, data: &[u8], entry: &[u8; 16]) -> (Verdict, Option<u8>) {
    match integrity::verify(lba, data, &entry[..RECORD_LEN]) {
        Verdict::Bad => match integrity::verify(lba, data, &entry[RECORD_LEN..]) {
            Verdict::Bad => (Verdict::Bad, None),
            v => (v, Some(1)),
        },
        v => (v, Some(0)),
    }
}

fn area_len_for(data_len: u64, bs: u64) -> u64 {
    (data_len / bs.max(1)).div_ceil(PER_BLOCK) * ENTRY_BLOCK
}

impl Bdev for ChecksumBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn attach(&mut self, ids: &mut Attach) {
        self.inner.attach(ids);
    }

    fn files<'a>(&'a self, out: &mut Vec<BorrowedFd<'a>>) {
        self.inner.files(out);
    }

    fn submit(&mut self, io: Io, ctx: &mut Ctx<'_>) {
        if io.op != Op::Flush && !in_range(&io, self.inner.block_size(), self.inner.size()) {
            self.ready.push(Done {
                token: io.token,
                status: STATUS_LBA_OUT_OF_RANGE,
            });
            return;
        }
        let end = io.offset.saturating_add(io.len);
        let covered = io.op != Op::Flush && io.len > 0 && io.offset < self.hi && end > self.lo;
        if covered && (io.offset < self.lo || end > self.hi) {
            // Nothing above straddles the data area's edge; refuse rather than half-check.
            tracing::error!(drive = %self.name, offset = io.offset, len = io.len, "I/O straddles the checksummed area's edge");
            self.ready.push(Done {
                token: io.token,
                status: STATUS_INTERNAL,
            });
            return;
        }
        if !covered {
            let first = if io.op == Op::Flush {
                self.flushes_issued += 1;
                self.flushing.push(self.flushes_issued);
                self.flushes_issued
            } else {
                0
            };
            let i = self.new_op(OpState {
                io,
                covered: false,
                first,
                n: 0,
                slots: Vec::new(),
                old: Vec::new(),
                wait: 0,
                piece_of: None,
                status: 0,
            });
            self.inner.submit(
                Io {
                    token: (TAG_DATA << TAG_SHIFT) | i as u64,
                    ..io
                },
                ctx,
            );
            return;
        }
        if matches!(io.op, Op::WriteZeroes | Op::Deallocate) && io.len > PIECE {
            let s = match self.splits.iter().position(Option::is_none) {
                Some(s) => s,
                None => {
                    self.splits.push(None);
                    self.splits.len() - 1
                }
            };
            self.splits[s] = Some(Split {
                io,
                next: 0,
                status: 0,
            });
            self.submit_covered(Io { len: PIECE, ..io }, Some(s), ctx);
            return;
        }
        self.submit_covered(io, None, ctx);
    }

    fn poll(&mut self, ctx: &mut Ctx<'_>, out: &mut Vec<Done>) -> bool {
        let mut inner = Vec::new();
        let mut progress = self.inner.poll(ctx, &mut inner);
        for d in inner {
            self.inner_done(d, ctx);
        }
        self.more_entry_ios(ctx);
        progress |= !self.ready.is_empty();
        out.append(&mut self.ready);
        progress
    }

    fn busy(&self) -> bool {
        !self.ready.is_empty() || self.inner.busy()
    }

    fn inflight(&self) -> usize {
        self.ops.iter().filter(|o| o.is_some()).count() + self.ready.len()
    }

    fn idle(&self) -> bool {
        self.inflight() == 0 && self.flushing.is_empty() && self.inner.idle()
    }

    fn retries(&self) -> u64 {
        self.inner.retries()
    }

    fn integrity_errors(&self) -> u64 {
        self.inner.integrity_errors() + self.errors
    }

    fn carries_records(&self) -> bool {
        true
    }

    fn take_verdicts(&mut self, token: u64) -> Option<Vec<Verdict>> {
        let i = self.verdicts.iter().position(|x| x.0 == token)?;
        Some(self.verdicts.swap_remove(i).1)
    }

    fn drives_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Drive>) {
        self.inner.drives_mut(out);
    }

    fn take_checksum_inner(&mut self, pool: &Pool, scratch: &mut Scratch) -> Option<BdevBox> {
        for c in std::mem::take(&mut self.all_buffers) {
            scratch.give_own(pool, c);
        }
        self.buffers.clear();
        let gone: BdevBox = Box::new(super::MissingBdev::new(
            &self.name,
            self.inner.block_size(),
            self.inner.size(),
        ));
        Some(std::mem::replace(&mut self.inner, gone))
    }
}
