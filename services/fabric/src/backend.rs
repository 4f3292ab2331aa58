//! The fabric's end of the datapath channel: a submission ring it produces, a completion ring
//! it consumes, and the shared buffer pool.
//!
//! Each fabric I/O thread has its own backend (its own channel) and everything of it runs on
//! that thread, so the state is in `RefCell`s and no lock is taken. Two ways in:
//!
//! - The fast path (reads and in-capsule writes, [`Backend::try_start`]): the connection's
//!   reader takes the buffer and ring slot at once and leaves a [`Pending`] in the command
//!   table; [`Backend::run`] hands the completion to the [`Finish`] that started it (no task,
//!   no channel, no allocation per command). The backend knows nothing of connections: what
//!   finishing means is the I/O code's ([`crate::io`]).
//! - Everything else runs as a command task: it allocates a chain ([`Backend::alloc`], waiting
//!   while the pool is exhausted: backpressure, not failure), submits a descriptor
//!   ([`Backend::submit`], waiting while the ring is full) and awaits its completion.
//!
//! The command table is a slab indexed by the low bits of the tag (the high bits are a
//! sequence number, so a stale or forged tag finds nothing). A completion whose waiter is gone
//! (its connection died) has its buffer freed; one addressed to a dead predecessor (another
//! epoch) too.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

use duplex_ipc::desc::IoDesc;
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::pool::{BufHandle, Pool, PoolError, ReclaimPlan, NIL};
use duplex_ipc::ring::{Consumer, Producer, RingError};
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit};

/// How long an I/O thread keeps polling its completion ring after the last completion before
/// it sleeps on the doorbell: as long as the datapath's engine polls its rings
/// (`EngineConfig::spin`). A busy thread never sleeps, so neither a host's next command nor the
/// datapath's next completion needs a wake-up; an idle one sleeps 50 µs after its last I/O.
pub const POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// What a fast-path command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastOp {
    /// A read (returning exactly its `bytes`: the SGL asked for no more).
    Read,
    /// A write whose data is in the chain.
    Write,
}

/// A fast-path command in flight: the router hands its completion to `sink`.
pub struct Pending {
    /// Who finishes it (the queue it arrived on).
    pub sink: Rc<dyn Finish>,
    /// Command id.
    pub cid: u16,
    /// Bytes it moves.
    pub bytes: usize,
    /// What it is.
    pub op: FastOp,
    /// Its queue's share of the pool, held until it completes.
    pub permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("cid", &self.cid)
            .field("bytes", &self.bytes)
            .field("op", &self.op)
            .finish_non_exhaustive()
    }
}

/// Finishes fast-path commands (implemented by the connection's queue).
pub trait Finish {
    /// Command `p` completed with `done` (whose buffer, if any, is ours again).
    fn finish(&self, backend: &Rc<Backend>, p: Pending, done: IoDesc);
    /// Command `p` will never complete: the datapath channel failed.
    fn fail(&self, p: Pending);
}

fn finish(backend: &Rc<Backend>, p: Pending, done: IoDesc) {
    let sink = Rc::clone(&p.sink);
    sink.finish(backend, p, done);
}

fn fail(p: Pending) {
    let sink = Rc::clone(&p.sink);
    sink.fail(p);
}

/// Errors talking to the datapath.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A ring failed (corrupt indices: the datapath misbehaved).
    #[error("Datapath ring: {0}")]
    Ring(#[from] RingError),
    /// The pool refused an operation.
    #[error("Buffer pool: {0}")]
    Pool(#[from] PoolError),
    /// The completion router stopped; the request will never complete.
    #[error("Datapath channel closed")]
    Closed,
    /// Registering a doorbell with the reactor failed.
    #[error("Doorbell: {0}")]
    Io(#[from] std::io::Error),
}

struct Channel {
    submit: Producer<IoDesc>,
    complete: Consumer<IoDesc>,
    pending: Table,
}

/// Who waits for a submitted request.
enum Waiter {
    /// A command task.
    Task(oneshot::Sender<IoDesc>),
    /// A fast-path command, finished by the router.
    Io(Pending),
}

/// Requests in flight, by tag: slot index in the low [`Table::INDEX_BITS`] bits, a sequence
/// number above them.
#[derive(Default)]
struct Table {
    slots: Vec<Option<(u64, Waiter)>>,
    free: Vec<u32>,
    seq: u64,
    len: usize,
}

impl Table {
    const INDEX_BITS: u32 = 24;

    /// The tag the next [`Table::insert`] takes.
    fn next_tag(&mut self) -> u64 {
        let index = match self.free.last() {
            Some(i) => *i as usize,
            None => self.slots.len(),
        };
        (self.seq.wrapping_add(1) << Self::INDEX_BITS) | index as u64
    }

    /// Stores `w` under `tag`, which [`Table::next_tag`] just returned.
    fn insert(&mut self, tag: u64, w: Waiter) {
        self.seq = self.seq.wrapping_add(1);
        let index = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        debug_assert_eq!(tag, (self.seq << Self::INDEX_BITS) | index as u64);
        self.slots[index] = Some((tag, w));
        self.len += 1;
    }

    /// Takes the waiter of `tag`, if it is in flight.
    fn remove(&mut self, tag: u64) -> Option<Waiter> {
        let index = (tag & ((1 << Self::INDEX_BITS) - 1)) as usize;
        let slot = self.slots.get_mut(index)?;
        if !matches!(slot, Some((t, _)) if *t == tag) {
            return None;
        }
        let (_, w) = slot.take()?;
        self.free.push(index as u32);
        self.len -= 1;
        Some(w)
    }

    /// Takes every waiter.
    fn drain(&mut self) -> Vec<Waiter> {
        self.free.clear();
        self.len = 0;
        self.slots
            .drain(..)
            .filter_map(|s| s.map(|(_, w)| w))
            .collect()
    }
}

/// The fabric's datapath channel (one per I/O thread; the fabric has one).
pub struct Backend {
    pool: Pool,
    chan: RefCell<Channel>,
    epoch: u64,
    submit_ring: u8,
    complete_ring: u8,
    space: AsyncFd<Bell>,
    data: AsyncFd<Bell>,
    /// Allocations waiting for room in the pool, on every I/O thread (a chain freed on one
    /// thread makes room for all).
    room: &'static PoolRoom,
    closed: Cell<bool>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("epoch", &self.epoch)
            .field("submit_ring", &self.submit_ring)
            .finish_non_exhaustive()
    }
}

/// Allocations waiting for room in the pool, over the backends of every I/O thread. A free
/// wakes them only when there are some: the per-I/O free touches no lock shared between threads.
#[derive(Debug, Default)]
struct PoolRoom {
    waiters: AtomicUsize,
    freed: Notify,
}

impl PoolRoom {
    /// The process's.
    fn get() -> &'static Self {
        static ROOM: std::sync::OnceLock<PoolRoom> = std::sync::OnceLock::new();
        ROOM.get_or_init(PoolRoom::default)
    }

    /// Chunks were freed: wakes the waiting allocations, if any.
    fn freed(&self) {
        // Pairs with the waiter's `fetch_add`: either it sees the chunks freed before this, or
        // this sees it waiting.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }
}

/// One allocation counted as waiting for room while it lives.
struct Waiting(&'static PoolRoom);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Backend {
    /// Wraps attached endpoints. Must run inside a tokio runtime (doorbells join its reactor).
    /// A restarted fabric (`restart`) first frees what its dead predecessor held.
    pub fn new(
        pool: Pool,
        submit: Producer<IoDesc>,
        complete: Consumer<IoDesc>,
        epoch: u64,
        restart: bool,
    ) -> Result<Rc<Self>, BackendError> {
        let submit_ring = submit.ring().ring_id();
        let complete_ring = complete.ring().ring_id();
        if restart {
            let report = pool.reclaim(&ReclaimPlan {
                consumes: &[(complete_ring, complete.next_index())],
                produces: &[(submit_ring, submit.next_index())],
            });
            tracing::info!(?report, "reclaimed the buffers of the previous incarnation");
        }
        // `AsyncFd::new` is deprecated because a `T: AsRawFd` could close its fd while it is
        // registered; `Bell` owns its eventfd and only closes it when dropped with the AsyncFd.
        #[allow(deprecated)]
        let space = AsyncFd::new(Bell(submit.space_doorbell().try_clone()?))?;
        #[allow(deprecated)]
        let data = AsyncFd::new(Bell(complete.data_doorbell().try_clone()?))?;
        Ok(Rc::new(Self {
            pool,
            chan: RefCell::new(Channel {
                submit,
                complete,
                pending: Table::default(),
            }),
            epoch,
            submit_ring,
            complete_ring,
            space,
            data,
            room: PoolRoom::get(),
            closed: Cell::new(false),
        }))
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Allocates a chain of at least `bytes`, waiting while the pool is exhausted.
    pub async fn alloc(&self, bytes: usize) -> Result<BufHandle, BackendError> {
        if let Some(h) = self.try_alloc(bytes)? {
            return Ok(h);
        }
        self.room.waiters.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `PoolRoom::freed`: counted before the pool is looked at again.
        std::sync::atomic::fence(Ordering::SeqCst);
        let _waiting = Waiting(self.room);
        loop {
            let freed = self.room.freed.notified();
            if let Some(h) = self.try_alloc(bytes)? {
                return Ok(h);
            }
            if self.closed.get() {
                return Err(BackendError::Closed);
            }
            freed.await;
        }
    }

    /// A chain of at least `bytes` if the pool has room now.
    fn try_alloc(&self, bytes: usize) -> Result<Option<BufHandle>, BackendError> {
        match self.pool.alloc_chain(bytes) {
            Ok(h) => Ok(Some(h)),
            Err(PoolError::Exhausted { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes responsibility for a chain we hold: it is freed (and `permit`, the queue's share
    /// of the pool it counted against, returned) when the [`Chain`] drops.
    pub fn own(self: &Rc<Self>, head: BufHandle, permit: OwnedSemaphorePermit) -> Chain {
        Chain {
            backend: Rc::clone(self),
            head,
            _permit: permit,
        }
    }

    /// Frees a chain we hold.
    pub fn free(&self, h: BufHandle) {
        if let Err(e) = self.pool.free_chain(h) {
            tracing::error!(error = %e, "cannot free a buffer chain");
        }
        self.room.freed();
    }

    /// Submits `desc` (its `buf`, if any, is a chain we hold) and waits for its completion.
    /// On success the completion's buffer is ours again.
    pub async fn submit(&self, mut desc: IoDesc) -> Result<IoDesc, BackendError> {
        let rx = loop {
            if self.closed.get() {
                return Err(BackendError::Closed);
            }
            if let Some(rx) = self.try_submit(&mut desc)? {
                break rx;
            }
            if self.chan.borrow_mut().submit.arm_wait()? {
                continue;
            }
            let mut guard = self.space.readable().await?;
            guard.clear_ready();
            drain(&self.space);
            self.chan.borrow_mut().submit.disarm_wait();
        };
        rx.await.map_err(|_| BackendError::Closed)
    }

    /// Publishes `desc` if the ring has room; returns the completion's receiver.
    fn try_submit(
        &self,
        desc: &mut IoDesc,
    ) -> Result<Option<oneshot::Receiver<IoDesc>>, BackendError> {
        let mut ch = self.chan.borrow_mut();
        if ch.submit.free()? == 0 {
            return Ok(None);
        }
        self.publish(&mut ch, desc)?;
        let (tx, rx) = oneshot::channel();
        ch.pending.insert(desc.tag, Waiter::Task(tx));
        Ok(Some(rx))
    }

    /// The fast path: publishes `desc` now if the ring has room, and the router finishes the
    /// command `p` from its completion ([`Finish::finish`]). `Err(p)` if the ring is full
    /// or the channel is down; the caller still holds `desc.buf` then.
    pub fn try_start(&self, mut desc: IoDesc, p: Pending) -> Result<(), Pending> {
        if self.closed.get() {
            return Err(p);
        }
        let mut ch = self.chan.borrow_mut();
        if !matches!(ch.submit.free(), Ok(n) if n > 0) {
            return Err(p);
        }
        if let Err(e) = self.publish(&mut ch, &mut desc) {
            tracing::error!(error = %e, "cannot submit to the datapath");
            return Err(p);
        }
        ch.pending.insert(desc.tag, Waiter::Io(p));
        Ok(())
    }

    /// Tags `desc` with the command table's next tag, lends its chain to the ring and
    /// publishes it (the ring has room); the caller then stores the waiter under `desc.tag`.
    /// On failure nothing was published and the chain is the caller's again.
    fn publish(&self, ch: &mut Channel, desc: &mut IoDesc) -> Result<(), BackendError> {
        desc.epoch = self.epoch;
        desc.tag = ch.pending.next_tag();
        let index = ch.submit.next_index();
        if desc.buf != NIL {
            self.pool
                .lend_chain(BufHandle(desc.buf), self.submit_ring, index)?;
        }
        if let Err(e) = ch.submit.try_push(std::slice::from_ref(desc)) {
            if desc.buf != NIL {
                let _ = self
                    .pool
                    .take_chain(BufHandle(desc.buf), self.submit_ring, index);
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Routes completions to their waiters until the channel fails. Run it as a task.
    pub async fn run(self: Rc<Self>) -> Result<(), BackendError> {
        let result = self.route().await;
        self.closed.set(true);
        let waiters = self.chan.borrow_mut().pending.drain();
        for w in waiters {
            // Task waiters see their channel close; fast-path commands fail here.
            if let Waiter::Io(p) = w {
                fail(p);
            }
        }
        // This thread's waiting allocations see the channel closed.
        self.room.freed.notify_waiters();
        result
    }

    async fn route(self: &Rc<Self>) -> Result<(), BackendError> {
        let mut batch = Vec::with_capacity(64);
        loop {
            batch.clear();
            let (first, n) = {
                let mut ch = self.chan.borrow_mut();
                let first = ch.complete.next_index();
                (first, ch.complete.try_pop(&mut batch, 64)?)
            };
            if n == 0 {
                if self.poll_completions().await {
                    continue;
                }
                if self.chan.borrow_mut().complete.arm_wait()? {
                    continue;
                }
                let mut guard = self.data.readable().await?;
                guard.clear_ready();
                drain(&self.data);
                self.chan.borrow_mut().complete.disarm_wait();
                continue;
            }
            for (i, d) in batch.iter().enumerate() {
                self.complete_one(*d, first + i as u64);
            }
        }
    }

    /// Polls the completion ring for up to [`POLL`]; true once a completion is there. Each turn
    /// gives the core away (`sched_yield`: the datapath may share it and is then the one with
    /// work) and the runtime to its other tasks (tokio's yield polls the reactor without a
    /// timeout, so sockets are read without sleeping in `epoll_wait`).
    async fn poll_completions(&self) -> bool {
        let since = std::time::Instant::now();
        while since.elapsed() < POLL {
            // The core goes to the datapath only when it has work of ours: with nothing in
            // flight, the next thing to come is a host's command, and the thread polls for it.
            if self.chan.borrow().pending.len > 0 {
                std::thread::yield_now();
            }
            tokio::task::yield_now().await;
            let ch = self.chan.borrow();
            if ch.complete.ring().tail() != ch.complete.next_index() {
                return true;
            }
        }
        false
    }

    fn complete_one(self: &Rc<Self>, d: IoDesc, index: u64) {
        if d.buf != NIL {
            if let Err(e) = self
                .pool
                .take_chain(BufHandle(d.buf), self.complete_ring, index)
            {
                tracing::error!(tag = d.tag, error = %e, "completion carries a buffer we cannot take");
                // The command fails (a task sees its channel close).
                let waiter = (d.epoch == self.epoch)
                    .then(|| self.chan.borrow_mut().pending.remove(d.tag))
                    .flatten();
                if let Some(Waiter::Io(p)) = waiter {
                    fail(p);
                }
                return;
            }
        }
        let waiter = if d.epoch == self.epoch {
            self.chan.borrow_mut().pending.remove(d.tag)
        } else {
            None
        };
        match waiter {
            Some(Waiter::Task(tx)) => {
                if let Err(d) = tx.send(d) {
                    // The command's connection is gone.
                    self.release(d);
                }
            }
            Some(Waiter::Io(p)) => finish(self, p, d),
            None => {
                tracing::debug!(
                    tag = d.tag,
                    epoch = d.epoch,
                    "completion for a request nobody waits for"
                );
                self.release(d);
            }
        }
    }

    fn release(&self, d: IoDesc) {
        if d.buf != NIL {
            self.free(BufHandle(d.buf));
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.chan.borrow().pending.len
    }
}

/// A chain of the pool this process holds, freed on drop.
pub struct Chain {
    backend: Rc<Backend>,
    head: BufHandle,
    _permit: OwnedSemaphorePermit,
}

impl Chain {
    /// Appends the chain's bytes to `out`; how many, or `None` (logged) if the pool refuses.
    pub fn append_to(&self, out: &mut Vec<u8>) -> Option<usize> {
        match self.backend.pool.read_chain(self.head, out) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::error!(error = %e, "cannot read a completed chain");
                None
            }
        }
    }

    /// Bytes the chain holds, or `None` (logged) if the pool refuses.
    pub fn bytes(&self) -> Option<usize> {
        match self.backend.pool.chain_len(self.head) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::error!(error = %e, "cannot walk a completed chain");
                None
            }
        }
    }

    /// The pool the chain is in.
    pub fn pool(&self) -> &Pool {
        self.backend.pool()
    }

    /// The chain's first `len` bytes, as a piece to send
    /// ([`duplex_ipc::pool::Pool::send_pieces`]).
    pub fn piece(&self, len: usize) -> duplex_ipc::pool::Piece<'static> {
        duplex_ipc::pool::Piece::Chain(self.head, len)
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        self.backend.free(self.head);
    }
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Chain").field(&self.head.0).finish()
    }
}

/// A doorbell registered with the reactor.
struct Bell(Doorbell);

impl AsRawFd for Bell {
    fn as_raw_fd(&self) -> RawFd {
        self.0.fd().as_raw_fd()
    }
}

fn drain(fd: &AsyncFd<Bell>) {
    fd.get_ref().0.drain();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Waiter {
        Waiter::Task(oneshot::channel().0)
    }

    #[test]
    fn the_command_table_finds_only_live_tags() {
        let mut t = Table::default();
        let a = t.next_tag();
        t.insert(a, task());
        let b = t.next_tag();
        t.insert(b, task());
        assert_ne!(a, b);
        assert_eq!(t.len, 2);
        assert!(t.remove(a).is_some());
        // Gone once taken; a slot reused later answers only to its new tag.
        assert!(t.remove(a).is_none());
        let c = t.next_tag();
        t.insert(c, task());
        assert_eq!(c & 0xFF_FFFF, a & 0xFF_FFFF, "the freed slot is reused");
        assert!(t.remove(a).is_none());
        assert!(t.remove(u64::MAX).is_none());
        assert!(t.remove(c).is_some());
        assert_eq!(t.drain().len(), 1);
        assert_eq!(t.len, 0);
        assert!(t.remove(b).is_none());
    }
}
