//! The ring's index protocol, independent of where the ring lives.
//!
//! The same code runs over shared memory ([`super::ShmRing`]) and, under `--cfg loom`, over a
//! model whose atomics and slots are loom's, so the model checker explores the interleavings of
//! exactly the code that runs in production.
//!
//! Protocol (one producer, one consumer, free-running 64-bit indices):
//! * The producer owns slots `[tail, head + capacity)`; it writes them, then publishes with a
//!   `Release` store of `tail`.
//! * The consumer owns slots `[head, tail)` once it has loaded `tail` with `Acquire`; it copies
//!   them out, then releases them with a `Release` store of `head`.
//! * Either side caches the other's index and reloads it only when its cached view is exhausted.
//! * Sleeping: before sleeping a side sets its "waiting" flag, issues a `SeqCst` fence and
//!   re-checks the ring; after moving its index the other side issues a `SeqCst` fence and rings
//!   the doorbell only if the flag is set. The two fences guarantee that at least one side sees
//!   the other's write, so no wakeup is lost and a busy peer makes no system call.
//! * Indices read from the peer are validated: `tail - head` must lie in `[0, capacity]`. A peer
//!   that violates it gets [`RingError::Corrupt`], never an out-of-bounds slot access.

use std::sync::atomic::Ordering;

/// Errors of the ring protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The peer's index is impossible: the ring is corrupt or the peer is broken.
    #[error("Ring is corrupt: head {head}, tail {tail}, capacity {capacity}")]
    Corrupt {
        /// Consumer index as seen.
        head: u64,
        /// Producer index as seen.
        tail: u64,
        /// Ring capacity.
        capacity: u64,
    },
    /// A consumer tried to release more descriptors than it can have seen (a caller bug).
    #[error("Cannot commit {n} descriptors: only {available} are available")]
    OverCommit {
        /// Asked to commit.
        n: u64,
        /// Available.
        available: u64,
    },
}

/// Where a ring's indices, flags and slots live, and how to wake each side.
pub trait RingMemory {
    /// The descriptor type.
    type Item: Copy;
    /// Number of slots, a power of two.
    fn capacity(&self) -> u64;
    /// Loads the consumer index.
    fn load_head(&self, order: Ordering) -> u64;
    /// Stores the consumer index.
    fn store_head(&self, value: u64, order: Ordering);
    /// Loads the producer index.
    fn load_tail(&self, order: Ordering) -> u64;
    /// Stores the producer index.
    fn store_tail(&self, value: u64, order: Ordering);
    /// Loads the flag the consumer sets before sleeping.
    fn load_consumer_waiting(&self, order: Ordering) -> bool;
    /// Stores the flag the consumer sets before sleeping.
    fn store_consumer_waiting(&self, value: bool, order: Ordering);
    /// Loads the flag the producer sets before sleeping on a full ring.
    fn load_producer_waiting(&self, order: Ordering) -> bool;
    /// Stores the flag the producer sets before sleeping on a full ring.
    fn store_producer_waiting(&self, value: bool, order: Ordering);
    /// A sequentially consistent fence.
    fn fence_seqcst(&self);
    /// Reads slot `index % capacity`.
    ///
    /// # Safety
    /// The caller must own the slot under the protocol (consumer: `head <= index < tail` as
    /// loaded with `Acquire`).
    unsafe fn read_slot(&self, index: u64) -> Self::Item;
    /// Writes slot `index % capacity`.
    ///
    /// # Safety
    /// The caller must own the slot under the protocol (producer: `tail <= index < head +
    /// capacity` with `head` loaded with `Acquire`).
    unsafe fn write_slot(&self, index: u64, item: Self::Item);
    /// Wakes a sleeping consumer.
    fn wake_consumer(&self);
    /// Wakes a sleeping producer.
    fn wake_producer(&self);
}

fn check(head: u64, tail: u64, capacity: u64) -> Result<u64, RingError> {
    let used = tail.wrapping_sub(head);
    if used > capacity {
        return Err(RingError::Corrupt {
            head,
            tail,
            capacity,
        });
    }
    Ok(used)
}

/// The producer's private state.
#[derive(Debug, Clone)]
pub struct ProducerCore {
    tail: u64,
    cached_head: u64,
}

impl ProducerCore {
    /// Starts producing at the ring's current indices.
    pub fn attach<M: RingMemory>(m: &M) -> Result<Self, RingError> {
        let tail = m.load_tail(Ordering::Relaxed);
        let head = m.load_head(Ordering::Acquire);
        check(head, tail, m.capacity())?;
        Ok(Self {
            tail,
            cached_head: head,
        })
    }

    /// The index the next pushed descriptor will get.
    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// Free slots, reloading the consumer index if fewer than `want` are known free.
    pub fn free<M: RingMemory>(&mut self, m: &M, want: u64) -> Result<u64, RingError> {
        let cap = m.capacity();
        let mut free = cap - check(self.cached_head, self.tail, cap)?;
        if free < want {
            self.cached_head = m.load_head(Ordering::Acquire);
            free = cap - check(self.cached_head, self.tail, cap)?;
        }
        Ok(free)
    }

    /// Publishes as many of `items` as fit, in order, with one index store. Returns how many.
    pub fn push<M: RingMemory>(&mut self, m: &M, items: &[M::Item]) -> Result<usize, RingError> {
        let free = self.free(m, items.len() as u64)?;
        let n = usize::try_from(free).unwrap_or(usize::MAX).min(items.len());
        if n == 0 {
            return Ok(0);
        }
        for (i, item) in items[..n].iter().enumerate() {
            // SAFETY: tail + i < cached_head + capacity (n <= free), so the slot is ours.
            unsafe { m.write_slot(self.tail.wrapping_add(i as u64), *item) };
        }
        self.tail = self.tail.wrapping_add(n as u64);
        m.store_tail(self.tail, Ordering::Release);
        m.fence_seqcst();
        if m.load_consumer_waiting(Ordering::Relaxed) {
            m.wake_consumer();
        }
        Ok(n)
    }

    /// Announces that the producer is about to sleep because the ring is full. Returns true if
    /// space appeared meanwhile (then do not sleep; the flag is already cleared).
    pub fn arm_wait<M: RingMemory>(&mut self, m: &M) -> Result<bool, RingError> {
        m.store_producer_waiting(true, Ordering::Relaxed);
        m.fence_seqcst();
        if self.free(m, 1)? > 0 {
            m.store_producer_waiting(false, Ordering::Relaxed);
            return Ok(true);
        }
        Ok(false)
    }

    /// Clears the waiting flag after a sleep.
    pub fn disarm_wait<M: RingMemory>(&mut self, m: &M) {
        m.store_producer_waiting(false, Ordering::Relaxed);
    }
}

/// The consumer's private state.
#[derive(Debug, Clone)]
pub struct ConsumerCore {
    head: u64,
    cached_tail: u64,
}

impl ConsumerCore {
    /// Starts consuming at the ring's current indices.
    pub fn attach<M: RingMemory>(m: &M) -> Result<Self, RingError> {
        let head = m.load_head(Ordering::Relaxed);
        let tail = m.load_tail(Ordering::Acquire);
        check(head, tail, m.capacity())?;
        Ok(Self {
            head,
            cached_tail: tail,
        })
    }

    /// The index of the next descriptor to consume.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Descriptors ready, reloading the producer index if none are known.
    pub fn available<M: RingMemory>(&mut self, m: &M) -> Result<u64, RingError> {
        let cap = m.capacity();
        let mut avail = check(self.head, self.cached_tail, cap)?;
        if avail == 0 {
            self.cached_tail = m.load_tail(Ordering::Acquire);
            avail = check(self.head, self.cached_tail, cap)?;
        }
        Ok(avail)
    }

    /// Copies up to `max` descriptors into `out`, in order, then releases their slots with one
    /// index store. Returns how many (0 if the ring is empty).
    pub fn pop<M: RingMemory>(
        &mut self,
        m: &M,
        out: &mut Vec<M::Item>,
        max: usize,
    ) -> Result<usize, RingError> {
        let n = self.peek(m, out, max)?;
        self.commit(m, n as u64)?;
        Ok(n)
    }

    /// Copies up to `max` descriptors into `out`, in order, *without* releasing their slots: the
    /// same descriptors are seen again until [`ConsumerCore::commit`] releases them. A consumer
    /// that must not lose a descriptor when it dies between taking and handling it (a relay)
    /// peeks, handles, then commits.
    pub fn peek<M: RingMemory>(
        &mut self,
        m: &M,
        out: &mut Vec<M::Item>,
        max: usize,
    ) -> Result<usize, RingError> {
        let avail = self.available(m)?;
        let n = usize::try_from(avail).unwrap_or(usize::MAX).min(max);
        out.reserve(n);
        for i in 0..n {
            // SAFETY: head + i < cached_tail, loaded with Acquire: the slot is published and ours
            // until head moves past it.
            out.push(unsafe { m.read_slot(self.head.wrapping_add(i as u64)) });
        }
        Ok(n)
    }

    /// Releases the next `n` descriptors (seen with [`ConsumerCore::peek`]) with one index
    /// store, and wakes a waiting producer. `n` larger than what is available is an error.
    pub fn commit<M: RingMemory>(&mut self, m: &M, n: u64) -> Result<(), RingError> {
        if n == 0 {
            return Ok(());
        }
        let avail = check(self.head, self.cached_tail, m.capacity())?;
        if n > avail {
            return Err(RingError::OverCommit {
                n,
                available: avail,
            });
        }
        self.head = self.head.wrapping_add(n);
        m.store_head(self.head, Ordering::Release);
        m.fence_seqcst();
        if m.load_producer_waiting(Ordering::Relaxed) {
            m.wake_producer();
        }
        Ok(())
    }

    /// Announces that the consumer is about to sleep on an empty ring. Returns true if
    /// descriptors appeared meanwhile (then do not sleep; the flag is already cleared).
    pub fn arm_wait<M: RingMemory>(&mut self, m: &M) -> Result<bool, RingError> {
        m.store_consumer_waiting(true, Ordering::Relaxed);
        m.fence_seqcst();
        if self.available(m)? > 0 {
            m.store_consumer_waiting(false, Ordering::Relaxed);
            return Ok(true);
        }
        Ok(false)
    }

    /// Clears the waiting flag after a sleep.
    pub fn disarm_wait<M: RingMemory>(&mut self, m: &M) {
        m.store_consumer_waiting(false, Ordering::Relaxed);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Model checks of the index and doorbell protocol. Run with
    //! `RUSTFLAGS="--cfg loom" cargo test -p duplex-ipc --lib --release loom`.
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::atomic::{fence, AtomicBool, AtomicU64};
    use loom::sync::{Arc, Notify};

    struct Model {
        cap: u64,
        head: AtomicU64,
        tail: AtomicU64,
        cw: AtomicBool,
        pw: AtomicBool,
        slots: Vec<UnsafeCell<u64>>,
        data_bell: Notify,
        space_bell: Notify,
    }

    impl Model {
        fn new(cap: u64) -> Self {
            Self {
                cap,
                head: AtomicU64::new(0),
                tail: AtomicU64::new(0),
                cw: AtomicBool::new(false),
                pw: AtomicBool::new(false),
                slots: (0..cap).map(|_| UnsafeCell::new(0)).collect(),
                data_bell: Notify::new(),
                space_bell: Notify::new(),
            }
        }
    }

    impl RingMemory for Model {
        type Item = u64;
        fn capacity(&self) -> u64 {
            self.cap
        }
        fn load_head(&self, o: Ordering) -> u64 {
            self.head.load(o)
        }
        fn store_head(&self, v: u64, o: Ordering) {
            self.head.store(v, o)
        }
        fn load_tail(&self, o: Ordering) -> u64 {
            self.tail.load(o)
        }
        fn store_tail(&self, v: u64, o: Ordering) {
            self.tail.store(v, o)
        }
        fn load_consumer_waiting(&self, o: Ordering) -> bool {
            self.cw.load(o)
        }
        fn store_consumer_waiting(&self, v: bool, o: Ordering) {
            self.cw.store(v, o)
        }
        fn load_producer_waiting(&self, o: Ordering) -> bool {
            self.pw.load(o)
        }
        fn store_producer_waiting(&self, v: bool, o: Ordering) {
            self.pw.store(v, o)
        }
        fn fence_seqcst(&self) {
            fence(Ordering::SeqCst)
        }
        unsafe fn read_slot(&self, index: u64) -> u64 {
            // loom's UnsafeCell reports any access that races with a write.
            self.slots[(index % self.cap) as usize].with(|p| {
                // SAFETY: loom tracks the access; the protocol makes it exclusive.
                unsafe { *p }
            })
        }
        unsafe fn write_slot(&self, index: u64, item: u64) {
            self.slots[(index % self.cap) as usize].with_mut(|p| {
                // SAFETY: loom tracks the access; the protocol makes it exclusive.
                unsafe { *p = item }
            })
        }
        fn wake_consumer(&self) {
            self.data_bell.notify()
        }
        fn wake_producer(&self) {
            self.space_bell.notify()
        }
    }

    /// Producer pushes `n` items in batches of `pb`; consumer pops in batches of `cb`; both sleep
    /// on their doorbell when they cannot progress. Loom fails the test on a data race on a slot,
    /// a lost wakeup (deadlock), or a wrong sequence.
    fn run(cap: u64, n: u64, pb: usize, cb: usize) {
        let mut builder = loom::model::Builder::new();
        // Bounding preemptions keeps the search tractable; the bugs this protocol can have (a
        // missing fence, a lost wakeup, a slot reused early) need at most two preemptions.
        if builder.preemption_bound.is_none() {
            builder.preemption_bound = Some(3);
        }
        builder.check(move || {
            let m = Arc::new(Model::new(cap));
            let pm = m.clone();
            let producer = loom::thread::spawn(move || {
                let mut p = ProducerCore::attach(&*pm).expect("attach");
                let mut next = 0u64;
                while next < n {
                    let batch: Vec<u64> = (next..(next + pb as u64).min(n)).collect();
                    let pushed = p.push(&*pm, &batch).expect("push");
                    next += pushed as u64;
                    if pushed == 0 && !p.arm_wait(&*pm).expect("arm") {
                        pm.space_bell.wait();
                        p.disarm_wait(&*pm);
                    }
                }
            });
            let mut c = ConsumerCore::attach(&*m).expect("attach");
            let mut got = Vec::new();
            while (got.len() as u64) < n {
                let popped = c.pop(&*m, &mut got, cb).expect("pop");
                if popped == 0 && !c.arm_wait(&*m).expect("arm") {
                    m.data_bell.wait();
                    c.disarm_wait(&*m);
                }
            }
            assert_eq!(got, (0..n).collect::<Vec<_>>());
            producer.join().expect("join");
        });
    }

    #[test]
    fn loom_single_slot_ring() {
        run(1, 3, 1, 1);
    }

    #[test]
    fn loom_batches_wrap() {
        run(2, 4, 2, 1);
    }

    #[test]
    fn loom_consumer_batches() {
        run(2, 3, 1, 2);
    }
}
