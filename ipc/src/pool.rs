//! A buffer pool in shared memory whose chunks survive the death of whoever holds them.
//!
//! Layout of a [`RegionKind::Pool`] region: the header (params = [chunk size, chunk count,
//! metadata offset, data offset, 0]), then one 16-byte metadata record per chunk (`state: u64`,
//! `next: u32`, `len: u32`), then the chunks themselves, page aligned.
//!
//! Chunks are named by [`BufHandle`]s (indices, never pointers). A large buffer is a *chain*:
//! chunks linked through `next`, each carrying how many of its bytes are used.
//!
//! ## Ownership word
//! Every chunk's `state` says who is responsible for it, in one atomic word:
//!
//! | state | meaning | set by |
//! |---|---|---|
//! | `FREE` | allocatable | the owner when done; a successor's reclaim |
//! | `HELD(role, incarnation)` | owned by one incarnation of one process role | `alloc` (CAS from FREE), `take_chain` |
//! | `LENT(ring, index)` | travelling in the descriptor at `index` of `ring` | the ring's producer, before publishing |
//!
//! A `LENT` chunk belongs to the ring's producer while `index >= tail` (not yet published), sits
//! in the ring while `head <= index < tail`, and belongs to the ring's consumer once
//! `index < head` (consumed). So ownership of every chunk can be decided from the state word and
//! the ring indices alone, and a process that dies leaves no ambiguity.
//!
//! ## Reclaim protocol
//! A successor incarnation of role `R`, before it uses the pool or its rings, calls
//! [`Pool::reclaim`] with its rings' indices. For every chunk:
//! 1. `HELD(R, i)` with `i` not the successor's incarnation → `FREE` (the predecessor held it).
//! 2. `LENT(r, x)` for a ring `r` that `R` consumes and `x < head(r)` → `FREE` (the predecessor
//!    had consumed it and never finished).
//! 3. `LENT(r, x)` for a ring `r` that `R` produces and `x >= tail(r)` → `FREE` (the
//!    predecessor lent it but died before publishing).
//!
//! Every transition is a compare-and-swap from the observed state, so a live peer's concurrent
//! change is never overwritten. Indices are compared in a 48-bit window, which is exact while no
//! chunk stays lent for 2^47 descriptors.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::region::{page_size, Region, RegionError, RegionKind, HEADER_SIZE};

/// Most iovecs one [`Pool::send_pieces`] call passes (`IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// One piece of what [`Pool::send_pieces`] sends.
#[derive(Clone, Copy, Debug)]
pub enum Piece<'a> {
    /// Bytes of the caller's.
    Bytes(&'a [u8]),
    /// The first `len` bytes of a chain the caller holds.
    Chain(BufHandle, usize),
}

/// Name of a chunk: its index in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufHandle(pub u32);

/// "No chunk": ends a chain; in a descriptor, "no buffer".
pub const NIL: u32 = u32::MAX;

const META: usize = 128;
const META_SIZE: usize = 16;
const LOW_BITS: u32 = 48;
const LOW_MASK: u64 = (1 << LOW_BITS) - 1;
const TAG_HELD: u64 = 1 << 62;
const TAG_LENT: u64 = 2 << 62;
const TAG_MASK: u64 = 3 << 62;
/// Largest pool accepted (chunks).
pub const MAX_CHUNKS: u64 = 1 << 24;

/// A process role's identity in the pool: which service, which incarnation of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The service role (assigned by the supervisor, unique per process).
    pub role: u8,
    /// The incarnation (the supervisor's generation counter for the service).
    pub incarnation: u64,
}

/// Chunks of a chain kept inline by [`Chunks`] (a 128 KiB transfer in 4 KiB chunks).
const CHAIN_INLINE: usize = 32;

/// The chunks of a chain: inline up to [`CHAIN_INLINE`], on the heap beyond (longer chains
/// are rare: transfers larger than 128 KiB, or smaller chunks).
#[derive(Debug)]
struct Chunks {
    n: usize,
    inline: [u32; CHAIN_INLINE],
    heap: Vec<u32>,
}

impl Default for Chunks {
    fn default() -> Self {
        Self {
            n: 0,
            inline: [0; CHAIN_INLINE],
            heap: Vec::new(),
        }
    }
}

impl Chunks {
    fn push(&mut self, h: u32) {
        if self.heap.is_empty() && self.n < CHAIN_INLINE {
            self.inline[self.n] = h;
            self.n += 1;
        } else {
            if self.heap.is_empty() {
                self.heap.extend_from_slice(&self.inline[..self.n]);
            }
            self.heap.push(h);
        }
    }
}

impl std::ops::Deref for Chunks {
    type Target = [u32];

    fn deref(&self) -> &[u32] {
        if self.heap.is_empty() {
            &self.inline[..self.n]
        } else {
            &self.heap
        }
    }
}

/// A decoded chunk ownership word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkState {
    /// Allocatable.
    Free,
    /// Owned by an incarnation of a role (incarnation in 48 bits).
    Held {
        /// Role.
        role: u8,
        /// Low 48 bits of the incarnation.
        incarnation: u64,
    },
    /// Travelling in a ring descriptor.
    Lent {
        /// Ring id.
        ring: u8,
        /// Low 48 bits of the descriptor's ring index.
        index: u64,
    },
    /// A word no correct process writes.
    Invalid(u64),
}

impl ChunkState {
    fn decode(word: u64) -> Self {
        let id = ((word >> LOW_BITS) & 0xff) as u8;
        let low = word & LOW_MASK;
        let reserved = word & !(TAG_MASK | (0xff << LOW_BITS) | LOW_MASK);
        match (word & TAG_MASK, reserved) {
            (0, _) if word == 0 => Self::Free,
            (TAG_HELD, 0) => Self::Held {
                role: id,
                incarnation: low,
            },
            (TAG_LENT, 0) => Self::Lent {
                ring: id,
                index: low,
            },
            _ => Self::Invalid(word),
        }
    }
}

fn held(h: Holder) -> u64 {
    TAG_HELD | (u64::from(h.role) << LOW_BITS) | (h.incarnation & LOW_MASK)
}

fn lent(ring: u8, index: u64) -> u64 {
    TAG_LENT | (u64::from(ring) << LOW_BITS) | (index & LOW_MASK)
}

/// True if `x` comes before `bound` in the 48-bit index window.
fn before(x: u64, bound: u64) -> bool {
    let d = bound.wrapping_sub(x) & LOW_MASK;
    d != 0 && d < (1 << (LOW_BITS - 1))
}

/// Errors of the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The region is unusable.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// No free chunk (or not enough for a chain).
    #[error("Buffer pool exhausted: {wanted} chunks wanted")]
    Exhausted {
        /// Chunks asked for.
        wanted: usize,
    },
    /// A handle outside the pool (from a broken or hostile peer).
    #[error("Buffer handle {0} is outside the pool")]
    BadHandle(u32),
    /// A chain that loops or exceeds the pool.
    #[error("Buffer chain from {0} is malformed (loop or too long)")]
    BadChain(u32),
    /// A chunk is not in the state the operation requires.
    #[error("Chunk {handle} is {actual:?}, expected {expected}")]
    WrongState {
        /// The chunk.
        handle: u32,
        /// What it is.
        actual: ChunkState,
        /// What it should have been.
        expected: &'static str,
    },
    /// Data does not fit the chain.
    #[error("Buffer chain from {handle} holds {capacity} bytes, {wanted} requested")]
    TooLong {
        /// The chain.
        handle: u32,
        /// Its capacity.
        capacity: usize,
        /// Bytes requested.
        wanted: usize,
    },
}

/// What [`Pool::reclaim`] freed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Chunks held by dead incarnations of our role.
    pub held: usize,
    /// Chunks consumed from our input rings by a dead incarnation.
    pub consumed: usize,
    /// Chunks lent on our output rings but never published.
    pub unpublished: usize,
}

/// Ring indices a successor passes to [`Pool::reclaim`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ReclaimPlan<'a> {
    /// `(ring id, head)` of every ring this role consumes.
    pub consumes: &'a [(u8, u64)],
    /// `(ring id, tail)` of every ring this role produces.
    pub produces: &'a [(u8, u64)],
}

/// A process's view of a shared buffer pool.
#[derive(Debug)]
pub struct Pool {
    region: Region,
    chunk_size: usize,
    count: u32,
    data: usize,
    me: Holder,
    cursor: AtomicU32,
}

impl Pool {
    /// Creates a pool of `count` chunks of `chunk_size` bytes (a power of two >= 64).
    pub fn create(
        name: &str,
        chunk_size: usize,
        count: u32,
        me: Holder,
    ) -> Result<Self, PoolError> {
        if !chunk_size.is_power_of_two()
            || chunk_size < 64
            || u64::from(count) > MAX_CHUNKS
            || count == 0
        {
            return Err(RegionError::BadLayout(format!(
                "pool of {count} chunks of {chunk_size} bytes: need 1..={MAX_CHUNKS} chunks of a power of two >= 64 bytes"
            ))
            .into());
        }
        let data = (META + count as usize * META_SIZE).next_multiple_of(page_size());
        let len = data + chunk_size * count as usize;
        let params = [
            chunk_size as u64,
            u64::from(count),
            META as u64,
            data as u64,
            0,
        ];
        let region = Region::create(name, RegionKind::Pool, len, params)?;
        Ok(Self {
            region,
            chunk_size,
            count,
            data,
            me,
            cursor: AtomicU32::new(0),
        })
    }

    /// Attaches a pool from a handed-over fd as `me`, validating its layout.
    pub fn attach(fd: OwnedFd, me: Holder) -> Result<Self, PoolError> {
        let region = Region::attach(fd, RegionKind::Pool)?;
        let [chunk_size, count, meta, data, _] = region.params();
        let bad = |why: &str| -> PoolError {
            RegionError::BadLayout(format!(
                "pool chunk size {chunk_size}, count {count}, meta {meta}, data {data}: {why}"
            ))
            .into()
        };
        if !chunk_size.is_power_of_two() || !(64..=1 << 30).contains(&chunk_size) {
            return Err(bad("bad chunk size"));
        }
        if count == 0 || count > MAX_CHUNKS || meta != META as u64 {
            return Err(bad("bad chunk count or metadata offset"));
        }
        let (chunk_size, count32, data) = (chunk_size as usize, count as u32, data as usize);
        if data < HEADER_SIZE + count as usize * META_SIZE || data % 64 != 0 {
            return Err(bad("data overlaps metadata"));
        }
        region.check_range(META, count as usize * META_SIZE, 8)?;
        region.check_range(data, chunk_size * count as usize, 64)?;
        Ok(Self {
            region,
            chunk_size,
            count: count32,
            data,
            me,
            cursor: AtomicU32::new(0),
        })
    }

    /// The region (for its fd).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Number of chunks.
    pub fn capacity(&self) -> u32 {
        self.count
    }

    /// Who this view allocates as.
    pub fn holder(&self) -> Holder {
        self.me
    }

    fn check(&self, h: u32) -> Result<(), PoolError> {
        if h < self.count {
            Ok(())
        } else {
            Err(PoolError::BadHandle(h))
        }
    }

    fn state_word(&self, h: u32) -> &AtomicU64 {
        self.region.atomic_u64(META + h as usize * META_SIZE)
    }

    fn next_word(&self, h: u32) -> &AtomicU32 {
        self.region.atomic_u32(META + h as usize * META_SIZE + 8)
    }

    fn len_word(&self, h: u32) -> &AtomicU32 {
        self.region.atomic_u32(META + h as usize * META_SIZE + 12)
    }

    /// The ownership state of a chunk.
    pub fn state(&self, h: BufHandle) -> Result<ChunkState, PoolError> {
        self.check(h.0)?;
        Ok(ChunkState::decode(
            self.state_word(h.0).load(Ordering::Acquire),
        ))
    }

    /// Allocates one chunk, held by us.
    pub fn alloc(&self) -> Option<BufHandle> {
        let start = self.cursor.load(Ordering::Relaxed) % self.count;
        let mine = held(self.me);
        for i in 0..self.count {
            let h = (start + i) % self.count;
            let word = self.state_word(h);
            if word.load(Ordering::Relaxed) == 0
                && word
                    .compare_exchange(0, mine, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                self.cursor.store(h.wrapping_add(1), Ordering::Relaxed);
                self.next_word(h).store(NIL, Ordering::Relaxed);
                self.len_word(h).store(0, Ordering::Relaxed);
                return Some(BufHandle(h));
            }
        }
        None
    }

    /// Allocates a chain able to hold `bytes` (at least one chunk), held by us.
    pub fn alloc_chain(&self, bytes: usize) -> Result<BufHandle, PoolError> {
        let n = bytes.div_ceil(self.chunk_size).max(1);
        let mut chunks = Chunks::default();
        for _ in 0..n {
            match self.alloc() {
                Some(h) => chunks.push(h.0),
                None => {
                    for &h in chunks.iter() {
                        self.state_word(h).store(0, Ordering::Release);
                    }
                    return Err(PoolError::Exhausted { wanted: n });
                }
            }
        }
        for pair in chunks.windows(2) {
            self.next_word(pair[0]).store(pair[1], Ordering::Relaxed);
        }
        Ok(BufHandle(chunks[0]))
    }

    /// The chunks of a chain, validated, held on the stack up to [`CHAIN_INLINE`] chunks: the
    /// per-I/O paths' snapshot of a chain (checked first, then changed, chunk by chunk).
    fn chunks(&self, head: BufHandle) -> Result<Chunks, PoolError> {
        let mut out = Chunks::default();
        self.walk(head, |h| {
            out.push(h);
            true
        })?;
        Ok(out)
    }

    /// The chunks of a chain, validated: in bounds, no loop.
    pub fn chain(&self, head: BufHandle) -> Result<Vec<u32>, PoolError> {
        Ok(self.chunks(head)?.to_vec())
    }

    /// Calls `f` on each chunk of a chain, in order, until it returns false; fails (possibly
    /// after some calls) on a chunk out of bounds or a chain longer than the pool (a loop).
    /// [`Pool::chain`] without the allocation, for the per-I/O paths.
    fn walk(&self, head: BufHandle, mut f: impl FnMut(u32) -> bool) -> Result<(), PoolError> {
        let mut h = head.0;
        self.check(h)?;
        let mut seen = 0_u32;
        while h != NIL {
            self.check(h)?;
            if seen >= self.count {
                return Err(PoolError::BadChain(head.0));
            }
            seen += 1;
            if !f(h) {
                break;
            }
            h = self.next_word(h).load(Ordering::Relaxed);
        }
        Ok(())
    }

    fn expect_state(&self, h: u32, want: u64, what: &'static str) -> Result<(), PoolError> {
        let word = self.state_word(h).load(Ordering::Acquire);
        if word != want {
            return Err(PoolError::WrongState {
                handle: h,
                actual: ChunkState::decode(word),
                expected: what,
            });
        }
        Ok(())
    }

    /// Frees a chain we hold.
    pub fn free_chain(&self, head: BufHandle) -> Result<(), PoolError> {
        let chunks = self.chunks(head)?;
        let mine = held(self.me);
        for &h in chunks.iter() {
            self.expect_state(h, mine, "held by us")?;
        }
        for &h in chunks.iter() {
            self.state_word(h).store(0, Ordering::Release);
        }
        Ok(())
    }

    /// Marks a chain we hold as travelling in descriptor `index` of ring `ring`.
    /// Call before publishing the descriptor.
    pub fn lend_chain(&self, head: BufHandle, ring: u8, index: u64) -> Result<(), PoolError> {
        let chunks = self.chunks(head)?;
        let mine = held(self.me);
        for &h in chunks.iter() {
            self.expect_state(h, mine, "held by us")?;
        }
        for &h in chunks.iter() {
            self.state_word(h)
                .store(lent(ring, index), Ordering::Release);
        }
        Ok(())
    }

    /// Takes ownership of a chain that arrived in descriptor `index` of ring `ring`. Fails,
    /// changing nothing, if any chunk was not lent through exactly that descriptor.
    pub fn take_chain(&self, head: BufHandle, ring: u8, index: u64) -> Result<(), PoolError> {
        let chunks = self.chunks(head)?;
        let want = lent(ring, index);
        for &h in chunks.iter() {
            self.expect_state(h, want, "lent through this descriptor")?;
        }
        let mine = held(self.me);
        for &h in chunks.iter() {
            self.state_word(h).store(mine, Ordering::Release);
        }
        Ok(())
    }

    /// Copies `data` into a chain we hold, setting each chunk's used length.
    pub fn write_chain(&self, head: BufHandle, data: &[u8]) -> Result<(), PoolError> {
        let chunks = self.chunks(head)?;
        let capacity = chunks.len() * self.chunk_size;
        if data.len() > capacity {
            return Err(PoolError::TooLong {
                handle: head.0,
                capacity,
                wanted: data.len(),
            });
        }
        let mut rest = data;
        for &h in chunks.iter() {
            let n = rest.len().min(self.chunk_size);
            let (now, later) = rest.split_at(n);
            // SAFETY: chunk_ptr(h) points at chunk_size bytes inside the mapping (h checked by
            // chain(), data range checked at attach) and n <= chunk_size. The chunk is held by us,
            // so no correct peer writes it concurrently; the copy goes through raw pointers and no
            // reference to shared memory is formed.
            unsafe { std::ptr::copy_nonoverlapping(now.as_ptr(), self.chunk_ptr(h), n) };
            self.len_word(h).store(n as u32, Ordering::Relaxed);
            rest = later;
        }
        Ok(())
    }

    /// Copies `data` into a chain we hold at byte `offset` of its packed contents (chunk `i`
    /// holds bytes `[i * chunk_size, (i + 1) * chunk_size)`), leaving the used lengths alone:
    /// for a chain filled piece by piece, finished with [`Pool::set_chain_len`].
    pub fn write_at(&self, head: BufHandle, offset: usize, data: &[u8]) -> Result<(), PoolError> {
        let chunks = self.chunks(head)?;
        let capacity = chunks.len() * self.chunk_size;
        let end = offset.checked_add(data.len()).filter(|&e| e <= capacity);
        if end.is_none() {
            return Err(PoolError::TooLong {
                handle: head.0,
                capacity,
                wanted: offset.saturating_add(data.len()),
            });
        }
        let mut rest = data;
        let mut at = offset;
        while !rest.is_empty() {
            let h = chunks[at / self.chunk_size];
            let intra = at % self.chunk_size;
            let n = rest.len().min(self.chunk_size - intra);
            let (now, later) = rest.split_at(n);
            // SAFETY: chunk h (checked by chain()) spans chunk_size bytes inside the mapping and
            // intra + n <= chunk_size. The chunk is held by us, so no correct peer writes it
            // concurrently; raw-pointer copy, no reference to shared memory is formed.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    now.as_ptr(),
                    self.chunk_ptr(h).wrapping_add(intra),
                    n,
                )
            };
            at += n;
            rest = later;
        }
        Ok(())
    }

    /// Copies bytes `[offset, offset + out.len())` of the packed contents of `chunks` (chunk
    /// `i` holds bytes `[i * chunk_size, (i + 1) * chunk_size)`) into `out`: the CPU's view of
    /// data a device moved into the pool (parity, checks). The caller holds the chunks.
    pub fn copy_out(&self, chunks: &[u32], offset: usize, out: &mut [u8]) -> Result<(), PoolError> {
        self.check_span(chunks, offset, out.len())?;
        let mut at = offset;
        let mut done = 0;
        while done < out.len() {
            let h = chunks[at / self.chunk_size];
            let intra = at % self.chunk_size;
            let n = (out.len() - done).min(self.chunk_size - intra);
            // SAFETY: h < count (check_span), so chunk h spans chunk_size bytes inside the
            // mapping, and intra + n <= chunk_size; the destination holds n bytes from `done`.
            // The chunks are held by the caller; raw-pointer copy, no reference to shared
            // memory is formed.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.chunk_ptr(h).wrapping_add(intra),
                    out[done..].as_mut_ptr(),
                    n,
                )
            };
            at += n;
            done += n;
        }
        Ok(())
    }

    /// Copies `data` into bytes `[offset, offset + data.len())` of the packed contents of
    /// `chunks` (as [`Pool::copy_out`] reads them), leaving the used lengths alone.
    pub fn copy_in(&self, chunks: &[u32], offset: usize, data: &[u8]) -> Result<(), PoolError> {
        self.check_span(chunks, offset, data.len())?;
        let mut at = offset;
        let mut done = 0;
        while done < data.len() {
            let h = chunks[at / self.chunk_size];
            let intra = at % self.chunk_size;
            let n = (data.len() - done).min(self.chunk_size - intra);
            // SAFETY: h < count (check_span), so chunk h spans chunk_size bytes inside the
            // mapping, and intra + n <= chunk_size; the source holds n bytes from `done`. The
            // chunks are held by the caller, so no correct peer touches them; raw-pointer copy.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data[done..].as_ptr(),
                    self.chunk_ptr(h).wrapping_add(intra),
                    n,
                )
            };
            at += n;
            done += n;
        }
        Ok(())
    }

    /// Checks that `len` bytes from `offset` lie inside `chunks`, every one of them a chunk of
    /// this pool.
    fn check_span(&self, chunks: &[u32], offset: usize, len: usize) -> Result<(), PoolError> {
        let capacity = chunks.len().saturating_mul(self.chunk_size);
        if offset.checked_add(len).is_none_or(|end| end > capacity) {
            return Err(PoolError::TooLong {
                handle: chunks.first().copied().unwrap_or(NIL),
                capacity,
                wanted: offset.saturating_add(len),
            });
        }
        if len == 0 {
            return Ok(());
        }
        let first = offset / self.chunk_size;
        let last = (offset + len - 1) / self.chunk_size;
        for &h in &chunks[first..=last] {
            self.check(h)?;
        }
        Ok(())
    }

    /// Frees one chunk we hold (allocated by [`Pool::alloc`]).
    pub fn free_chunk(&self, h: u32) -> Result<(), PoolError> {
        self.check(h)?;
        self.expect_state(h, held(self.me), "held by us")?;
        self.next_word(h).store(NIL, Ordering::Relaxed);
        self.state_word(h).store(0, Ordering::Release);
        Ok(())
    }

    /// Sets the used lengths of a chain we hold to describe `bytes` bytes packed from its head:
    /// full chunks, then the remainder, then zero for any chunks left over. For a chain filled
    /// in place (zero-copy I/O into [`Pool::chunk_ptr`]), where [`Pool::write_chain`] did not set
    /// them.
    pub fn set_chain_len(&self, head: BufHandle, bytes: usize) -> Result<(), PoolError> {
        let chunks = self.chunks(head)?;
        let capacity = chunks.len() * self.chunk_size;
        if bytes > capacity {
            return Err(PoolError::TooLong {
                handle: head.0,
                capacity,
                wanted: bytes,
            });
        }
        let mut rest = bytes;
        for &h in chunks.iter() {
            let n = rest.min(self.chunk_size);
            // n <= chunk_size <= 1 << 30 (checked at create/attach), so it fits a u32.
            self.len_word(h).store(n as u32, Ordering::Relaxed);
            rest -= n;
        }
        Ok(())
    }

    /// Appends the used bytes of every chunk of a chain to `out`. Returns how many.
    pub fn read_chain(&self, head: BufHandle, out: &mut Vec<u8>) -> Result<usize, PoolError> {
        let chunks = self.chunks(head)?;
        let mut total = 0;
        for &h in chunks.iter() {
            let n = (self.len_word(h).load(Ordering::Relaxed) as usize).min(self.chunk_size);
            let at = out.len();
            out.resize(at + n, 0);
            // SAFETY: n <= chunk_size bytes of chunk h, which lies inside the mapping; the
            // destination was just resized to hold them. Raw-pointer copy, no shared reference.
            unsafe { std::ptr::copy_nonoverlapping(self.chunk_ptr(h), out[at..].as_mut_ptr(), n) };
            total += n;
        }
        Ok(total)
    }

    /// Bytes a chain holds (the sum of its chunks' lengths).
    pub fn chain_len(&self, head: BufHandle) -> Result<usize, PoolError> {
        let mut total = 0;
        self.walk(head, |h| {
            total += (self.len_word(h).load(Ordering::Relaxed) as usize).min(self.chunk_size);
            true
        })?;
        Ok(total)
    }

    /// Zero-copy send: one `sendmsg` on socket `fd` of `pieces` (bytes of ours, and the first
    /// bytes of chains of the pool) back to back, starting `skip` bytes into that sequence.
    /// Returns what the call sent, which may be less than asked (a non-blocking socket with a
    /// full buffer, or more than [`MAX_IOVECS`] pieces): call again with `skip` advanced. The
    /// kernel reads the chunks straight from the mapping; no Rust reference to them is formed.
    /// The caller must hold the chains.
    pub fn send_pieces(
        &self,
        fd: BorrowedFd<'_>,
        pieces: &[Piece<'_>],
        skip: usize,
    ) -> std::io::Result<usize> {
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(pieces.len().min(MAX_IOVECS) + 8);
        let mut at = 0_usize; // position in the whole sequence
        let push = |iovs: &mut Vec<libc::iovec>, base: *const u8, n: usize, at: usize| {
            // The part of [at, at + n) at or after `skip`.
            if at + n > skip {
                let from = skip.saturating_sub(at);
                iovs.push(libc::iovec {
                    iov_base: base.wrapping_add(from).cast_mut().cast(),
                    iov_len: n - from,
                });
            }
        };
        for piece in pieces {
            match *piece {
                Piece::Bytes(b) => {
                    if iovs.len() >= MAX_IOVECS {
                        break;
                    }
                    push(&mut iovs, b.as_ptr(), b.len(), at);
                    at += b.len();
                }
                Piece::Chain(head, len) => {
                    let end = at + len;
                    let mut full = false;
                    self.walk(head, |h| {
                        if at >= end {
                            return false;
                        }
                        if iovs.len() >= MAX_IOVECS {
                            full = true;
                            return false;
                        }
                        let n = (self.len_word(h).load(Ordering::Relaxed) as usize)
                            .min(self.chunk_size)
                            .min(end - at);
                        // In bounds: walk() checked h, and n <= chunk_size.
                        push(&mut iovs, self.chunk_ptr(h), n, at);
                        at += n;
                        true
                    })
                    .map_err(std::io::Error::other)?;
                    if full {
                        break;
                    }
                    if at < end {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!("chain {} holds fewer than the {len} bytes to send", head.0),
                        ));
                    }
                }
            }
        }
        iovs.retain(|v| v.iov_len > 0);
        if iovs.is_empty() {
            return Ok(0);
        }
        // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = iovs.len();
        // SAFETY: every iovec points into a `Piece::Bytes` slice (borrowed for this call) or
        // into one chunk of this pool's mapping (handle bounds-checked by chain(), length
        // within the chunk), which `self` keeps mapped for the duration of the call; `msg`
        // names only `iovs`. sendmsg only reads them and returns before we do; no reference to
        // pool memory is created. MSG_NOSIGNAL: a closed peer is an EPIPE, not a signal.
        let r = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(usize::try_from(r).unwrap_or(0))
    }

    /// Raw address of chunk `h` (for zero-copy I/O into the pool). The caller must hold the
    /// chunk and never form a Rust reference to it.
    pub fn chunk_ptr(&self, h: u32) -> *mut u8 {
        let h = h.min(self.count.saturating_sub(1));
        self.region
            .base()
            .as_ptr()
            .wrapping_add(self.data + h as usize * self.chunk_size)
    }

    /// Offset of chunk `h` from the start of the region (where a device that maps the whole
    /// region for DMA finds it); `None` for a handle outside the pool.
    pub fn chunk_offset(&self, h: u32) -> Option<usize> {
        (h < self.count).then(|| self.data + h as usize * self.chunk_size)
    }

    /// Number of free chunks (a scan; for monitoring and tests).
    pub fn free_count(&self) -> usize {
        (0..self.count)
            .filter(|&h| self.state_word(h).load(Ordering::Relaxed) == 0)
            .count()
    }

    /// Frees what dead incarnations of our role left behind; see the module docs.
    pub fn reclaim(&self, plan: &ReclaimPlan<'_>) -> ReclaimReport {
        let mut report = ReclaimReport::default();
        let me = self.me.incarnation & LOW_MASK;
        for h in 0..self.count {
            let word = self.state_word(h);
            let seen = word.load(Ordering::Acquire);
            let kind = match ChunkState::decode(seen) {
                ChunkState::Held { role, incarnation }
                    if role == self.me.role && incarnation != me =>
                {
                    &mut report.held
                }
                ChunkState::Lent { ring, index }
                    if plan
                        .consumes
                        .iter()
                        .any(|&(r, head)| r == ring && before(index, head)) =>
                {
                    &mut report.consumed
                }
                ChunkState::Lent { ring, index }
                    if plan
                        .produces
                        .iter()
                        .any(|&(r, tail)| r == ring && !before(index, tail)) =>
                {
                    &mut report.unpublished
                }
                _ => continue,
            };
            if word
                .compare_exchange(seen, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                *kind += 1;
            }
        }
        if report != ReclaimReport::default() {
            tracing::info!(
                role = self.me.role,
                incarnation = self.me.incarnation,
                ?report,
                "reclaimed buffers of a dead incarnation"
            );
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Holder = Holder {
        role: 1,
        incarnation: 1,
    };
    const B: Holder = Holder {
        role: 2,
        incarnation: 1,
    };

    fn pair() -> (Pool, Pool) {
        let a = Pool::create("t", 64, 8, A).expect("create");
        let b = Pool::attach(a.region().try_clone_fd().expect("dup"), B).expect("attach");
        (a, b)
    }

    #[test]
    fn chain_roundtrip_and_lend_take() {
        let (a, b) = pair();
        let data: Vec<u8> = (0..150u8).collect();
        let h = a.alloc_chain(data.len()).expect("alloc");
        assert_eq!(a.chain(h).expect("chain").len(), 3);
        a.write_chain(h, &data).expect("write");
        a.lend_chain(h, 7, 42).expect("lend");
        assert!(
            b.take_chain(h, 7, 41).is_err(),
            "wrong index must be refused"
        );
        b.take_chain(h, 7, 42).expect("take");
        let mut out = Vec::new();
        b.read_chain(h, &mut out).expect("read");
        assert_eq!(out, data);
        assert!(a.free_chain(h).is_err(), "A no longer holds it");
        b.free_chain(h).expect("free");
        assert_eq!(a.free_count(), 8);
    }

    #[test]
    fn send_pieces_sends_bytes_and_chains_resuming_at_any_offset() {
        use std::io::Read;
        use std::os::fd::AsFd;
        let (a, _b) = pair();
        let data: Vec<u8> = (0..150u8).collect();
        let h = a.alloc_chain(data.len()).expect("alloc");
        a.write_chain(h, &data).expect("write");
        let h2 = a.alloc_chain(64).expect("alloc");
        a.write_chain(h2, &[9; 64]).expect("write");
        assert_eq!(a.chain_len(h).expect("len"), 150);
        let pieces = [
            Piece::Bytes(b"header--"),
            Piece::Chain(h, 130),
            Piece::Bytes(b""),
            Piece::Bytes(b"resp"),
            Piece::Chain(h2, 64),
        ];
        let mut want = b"header--".to_vec();
        want.extend_from_slice(&data[..130]);
        want.extend_from_slice(b"resp");
        want.extend_from_slice(&[9; 64]);
        for skip in [0, 3, 8, 9, 63, 72, 100, 137, 138, 141, 142, 200] {
            let (mut rx, tx) = std::os::unix::net::UnixStream::pair().expect("pair");
            let mut at = skip;
            while at < want.len() {
                let n = a.send_pieces(tx.as_fd(), &pieces, at).expect("sendmsg");
                assert!(n > 0);
                at += n;
            }
            drop(tx);
            let mut got = Vec::new();
            rx.read_to_end(&mut got).expect("read");
            assert_eq!(got, want[skip..], "skip {skip}");
        }
        let (_rx, tx) = std::os::unix::net::UnixStream::pair().expect("pair");
        let e = a
            .send_pieces(tx.as_fd(), &[Piece::Chain(h, 151)], 0)
            .expect_err("longer than the chain");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(a
            .send_pieces(tx.as_fd(), &[Piece::Chain(BufHandle(99), 1)], 0)
            .is_err());
    }

    #[test]
    fn write_at_fills_a_chain_piece_by_piece() {
        let (a, _b) = pair();
        let h = a.alloc_chain(64 * 3).expect("alloc");
        let data: Vec<u8> = (0..170u8).collect();
        for (from, to) in [(0, 10), (10, 64), (64, 65), (65, 150), (150, 170)] {
            a.write_at(h, from, &data[from..to]).expect("write_at");
        }
        a.set_chain_len(h, 170).expect("len");
        let mut out = Vec::new();
        a.read_chain(h, &mut out).expect("read");
        assert_eq!(out, data);
        assert!(matches!(
            a.write_at(h, 190, &[0; 3]),
            Err(PoolError::TooLong { wanted: 193, .. })
        ));
        assert!(a.write_at(h, usize::MAX, &[0; 3]).is_err());
        a.write_at(h, 192, &[]).expect("empty at the end");
    }

    #[test]
    fn set_chain_len_describes_packed_bytes() {
        let (a, _b) = pair();
        let h = a.alloc_chain(64 * 3).expect("alloc");
        a.write_chain(h, &[7; 64 * 3]).expect("fill");
        a.set_chain_len(h, 100).expect("set");
        let mut out = Vec::new();
        assert_eq!(a.read_chain(h, &mut out).expect("read"), 100);
        assert_eq!(out, vec![7; 100]);
        a.set_chain_len(h, 0).expect("set");
        assert_eq!(a.read_chain(h, &mut Vec::new()).expect("read"), 0);
        assert!(matches!(
            a.set_chain_len(h, 64 * 3 + 1),
            Err(PoolError::TooLong { wanted: 193, .. })
        ));
        assert!(matches!(
            a.set_chain_len(BufHandle(8), 1),
            Err(PoolError::BadHandle(8))
        ));
    }

    #[test]
    fn exhaustion_rolls_back() {
        let (a, _b) = pair();
        assert!(matches!(
            a.alloc_chain(64 * 9),
            Err(PoolError::Exhausted { wanted: 9 })
        ));
        assert_eq!(a.free_count(), 8);
    }

    #[test]
    fn reclaim_rules() {
        let (a, b) = pair();
        // A (producer of ring 3) lends chunks at indices 10 (consumed by B), 11 (in the ring),
        // 12 (not yet published); B holds one chunk itself.
        let hs: Vec<_> = (0..3).map(|_| a.alloc_chain(1).expect("alloc")).collect();
        for (i, h) in hs.iter().enumerate() {
            a.lend_chain(*h, 3, 10 + i as u64).expect("lend");
        }
        let own = b.alloc().expect("alloc");
        // B dies. Its successor consumes ring 3 with head 11.
        let b2 = Pool::attach(
            a.region().try_clone_fd().expect("dup"),
            Holder {
                role: 2,
                incarnation: 2,
            },
        )
        .expect("attach");
        let r = b2.reclaim(&ReclaimPlan {
            consumes: &[(3, 11)],
            produces: &[],
        });
        assert_eq!(
            r,
            ReclaimReport {
                held: 1,
                consumed: 1,
                unpublished: 0
            }
        );
        assert_eq!(b2.state(own).expect("state"), ChunkState::Free);
        assert_eq!(
            b2.state(hs[1]).expect("state"),
            ChunkState::Lent { ring: 3, index: 11 }
        );
        // A dies before publishing index 12 (tail is 12). Its successor reclaims it.
        let a2 = Pool::attach(
            a.region().try_clone_fd().expect("dup"),
            Holder {
                role: 1,
                incarnation: 2,
            },
        )
        .expect("attach");
        let r = a2.reclaim(&ReclaimPlan {
            consumes: &[],
            produces: &[(3, 12)],
        });
        assert_eq!(
            r,
            ReclaimReport {
                held: 0,
                consumed: 0,
                unpublished: 1
            }
        );
        assert_eq!(a2.free_count(), 7);
    }

    #[test]
    fn hostile_chains_are_refused() {
        let (a, _b) = pair();
        let h = a.alloc_chain(64 * 2).expect("alloc");
        let chunks = a.chain(h).expect("chain");
        // Make a loop.
        a.next_word(chunks[1]).store(chunks[0], Ordering::Relaxed);
        assert!(matches!(a.chain(h), Err(PoolError::BadChain(_))));
        a.next_word(chunks[1]).store(1000, Ordering::Relaxed);
        assert!(matches!(a.chain(h), Err(PoolError::BadHandle(1000))));
        assert!(matches!(
            a.state(BufHandle(8)),
            Err(PoolError::BadHandle(8))
        ));
    }

    #[test]
    fn window_compare() {
        assert!(before(1, 2));
        assert!(!before(2, 2));
        assert!(!before(3, 2));
        assert!(before(LOW_MASK, 1), "wraps");
        assert!(!before(1, LOW_MASK));
    }
}
