//! The fabric's end of the datapath channel: a submission ring it produces, a completion ring
//! it consumes, and the shared buffer pool.
//!
//! Everything runs on the fabric's single runtime thread, so the state is in `RefCell`s and
//! no lock is taken. A command task allocates a chain ([`Backend::alloc`], waiting while the
//! pool is exhausted: backpressure, not failure), submits a descriptor ([`Backend::submit`],
//! waiting while the ring is full) and awaits its completion, which [`Backend::run`] routes by
//! tag. A completion whose waiter is gone (its connection died) has its buffer freed; one
//! addressed to a dead predecessor (another epoch) too.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use duplex_ipc::desc::IoDesc;
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::pool::{BufHandle, Pool, PoolError, ReclaimPlan, NIL};
use duplex_ipc::ring::{Consumer, Producer, RingError};
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit};

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
    pending: HashMap<u64, oneshot::Sender<IoDesc>>,
    next_tag: u64,
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
    pool_freed: Notify,
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
                pending: HashMap::new(),
                next_tag: 1,
            }),
            epoch,
            submit_ring,
            complete_ring,
            space,
            data,
            pool_freed: Notify::new(),
            closed: Cell::new(false),
        }))
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Allocates a chain of at least `bytes`, waiting while the pool is exhausted.
    pub async fn alloc(&self, bytes: usize) -> Result<BufHandle, BackendError> {
        loop {
            let freed = self.pool_freed.notified();
            match self.pool.alloc_chain(bytes) {
                Ok(h) => return Ok(h),
                Err(PoolError::Exhausted { .. }) => {
                    if self.closed.get() {
                        return Err(BackendError::Closed);
                    }
                    freed.await;
                }
                Err(e) => return Err(e.into()),
            }
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
        self.pool_freed.notify_waiters();
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
        let tag = ch.next_tag;
        ch.next_tag += 1;
        desc.tag = tag;
        desc.epoch = self.epoch;
        if desc.buf != NIL {
            let index = ch.submit.next_index();
            self.pool
                .lend_chain(BufHandle(desc.buf), self.submit_ring, index)?;
        }
        ch.submit.try_push(std::slice::from_ref(desc))?;
        let (tx, rx) = oneshot::channel();
        ch.pending.insert(tag, tx);
        Ok(Some(rx))
    }

    /// Routes completions to their waiters until the channel fails. Run it as a task.
    pub async fn run(self: Rc<Self>) -> Result<(), BackendError> {
        let result = self.route().await;
        self.closed.set(true);
        self.chan.borrow_mut().pending.clear();
        self.pool_freed.notify_waiters();
        result
    }

    async fn route(&self) -> Result<(), BackendError> {
        let mut batch = Vec::with_capacity(64);
        loop {
            batch.clear();
            let (first, n) = {
                let mut ch = self.chan.borrow_mut();
                let first = ch.complete.next_index();
                (first, ch.complete.try_pop(&mut batch, 64)?)
            };
            if n == 0 {
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

    fn complete_one(&self, d: IoDesc, index: u64) {
        if d.buf != NIL {
            if let Err(e) = self
                .pool
                .take_chain(BufHandle(d.buf), self.complete_ring, index)
            {
                tracing::error!(tag = d.tag, error = %e, "completion carries a buffer we cannot take");
                self.chan.borrow_mut().pending.remove(&d.tag);
                return;
            }
        }
        let waiter = if d.epoch == self.epoch {
            self.chan.borrow_mut().pending.remove(&d.tag)
        } else {
            None
        };
        match waiter {
            Some(tx) => {
                if let Err(d) = tx.send(d) {
                    // The command's connection is gone.
                    self.release(d);
                }
            }
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
        self.chan.borrow().pending.len()
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
