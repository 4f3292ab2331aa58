//! SPSC descriptor rings in shared memory.
//!
//! A ring is a [`Region`] of kind [`RegionKind::Ring`] laid out as:
//!
//! | offset | written by | contents |
//! |---|---|---|
//! | 0 | creator | region header; params = [capacity, descriptor size, descriptor align, ring id, 0] |
//! | 128 | producer | `tail` (free-running) |
//! | 256 | consumer | `head` (free-running) |
//! | 384 | producer | `producer_waiting` (sleeping on a full ring) |
//! | 512 | consumer | `consumer_waiting` (sleeping on an empty ring) |
//! | 640 | producer | `producer_generation`, `producer_restart_tail` |
//! | 768 | consumer | `consumer_generation`, `consumer_restart_head` |
//! | 1024 | producer | `capacity` slots of `T` |
//!
//! Each index lives on its own 128-byte line so the two sides never write the same cache line
//! (adjacent-line prefetch pairs 64-byte lines). Two eventfd [`Doorbell`]s go with each ring:
//! `data` (producer wakes consumer) and `space` (consumer wakes producer).
//!
//! Restart: a successor endpoint attaches with [`StartMode::Restart`], continues from the indices in
//! shared memory, and records where it took over (`*_restart_*`) before publishing its generation,
//! so the peer can tell what the dead incarnation had done. See `docs/IPC.md`.

pub mod core;

use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

pub use self::core::RingError as ProtocolError;
use self::core::{ConsumerCore, ProducerCore, RingMemory};
use crate::doorbell::{Doorbell, DoorbellError};
use crate::region::{Region, RegionError, RegionKind};

const TAIL: usize = 128;
const HEAD: usize = 256;
const PRODUCER_WAITING: usize = 384;
const CONSUMER_WAITING: usize = 512;
const PRODUCER_GENERATION: usize = 640;
const PRODUCER_RESTART_TAIL: usize = 648;
const CONSUMER_GENERATION: usize = 768;
const CONSUMER_RESTART_HEAD: usize = 776;
const SLOTS: usize = 1024;
/// Largest ring capacity accepted (slots).
pub const MAX_CAPACITY: u64 = 1 << 20;

/// Errors of ring endpoints.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The region is unusable.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// A doorbell failed.
    #[error(transparent)]
    Doorbell(#[from] DoorbellError),
    /// The indices in shared memory are impossible.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The ring was created for another descriptor type.
    #[error("Ring holds {found}-byte descriptors aligned to {found_align}, expected {expected} aligned to {expected_align}")]
    DescriptorMismatch {
        /// Size in the header.
        found: u64,
        /// Alignment in the header.
        found_align: u64,
        /// `size_of::<T>()`.
        expected: usize,
        /// `align_of::<T>()`.
        expected_align: usize,
    },
    /// A fresh start found that an earlier endpoint of the same role had used the ring.
    #[error("Fresh start as {role} on a ring a previous {role} used (index {index}, generation {generation}); use restart")]
    NotFresh {
        /// "producer" or "consumer".
        role: &'static str,
        /// That role's index.
        index: u64,
        /// That role's last generation.
        generation: u64,
    },
}

/// Whether an endpoint is the first of its role on a ring or succeeds a dead one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartMode {
    /// First attach: the ring must be unused.
    Fresh,
    /// Successor of a dead endpoint: continue from the shared indices.
    Restart,
}

/// How an endpoint waits when it cannot make progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitPolicy {
    /// Spin until the timeout; never sleep (lowest latency, burns a core).
    Poll,
    /// Sleep on the doorbell at once.
    Doorbell,
    /// Spin for this long, then sleep on the doorbell.
    Adaptive(Duration),
}

impl Default for WaitPolicy {
    fn default() -> Self {
        Self::Adaptive(Duration::from_micros(50))
    }
}

/// A ring region typed by its descriptor.
#[derive(Debug)]
pub struct RingRegion<T> {
    region: Region,
    capacity: u64,
    ring_id: u8,
    _t: PhantomData<T>,
}

impl<T: bytemuck::Pod> RingRegion<T> {
    /// Creates a ring of `capacity` slots (a power of two) with the given id.
    pub fn create(name: &str, capacity: u64, ring_id: u8) -> Result<Self, RingError> {
        if !capacity.is_power_of_two() || capacity > MAX_CAPACITY {
            return Err(RegionError::BadLayout(format!(
                "ring capacity {capacity} is not a power of two <= {MAX_CAPACITY}"
            ))
            .into());
        }
        const { assert!(std::mem::align_of::<T>() <= 64 && std::mem::size_of::<T>() > 0) };
        let len = SLOTS + capacity as usize * std::mem::size_of::<T>();
        let params = [
            capacity,
            std::mem::size_of::<T>() as u64,
            std::mem::align_of::<T>() as u64,
            u64::from(ring_id),
            0,
        ];
        let region = Region::create(name, RegionKind::Ring, len, params)?;
        Ok(Self {
            region,
            capacity,
            ring_id,
            _t: PhantomData,
        })
    }

    /// Attaches a ring region from a handed-over fd, validating its layout against `T`.
    pub fn attach(fd: OwnedFd) -> Result<Self, RingError> {
        let region = Region::attach(fd, RegionKind::Ring)?;
        let [capacity, size, align, ring_id, _] = region.params();
        if size != std::mem::size_of::<T>() as u64 || align != std::mem::align_of::<T>() as u64 {
            return Err(RingError::DescriptorMismatch {
                found: size,
                found_align: align,
                expected: std::mem::size_of::<T>(),
                expected_align: std::mem::align_of::<T>(),
            });
        }
        if !capacity.is_power_of_two() || capacity > MAX_CAPACITY {
            return Err(
                RegionError::BadLayout(format!("ring capacity {capacity} is invalid")).into(),
            );
        }
        let ring_id = u8::try_from(ring_id)
            .map_err(|_| RegionError::BadLayout(format!("ring id {ring_id} is out of range")))?;
        region.check_range(SLOTS, capacity as usize * std::mem::size_of::<T>(), 64)?;
        Ok(Self {
            region,
            capacity,
            ring_id,
            _t: PhantomData,
        })
    }

    /// The underlying region (for its fd).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Number of slots.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The ring's id (used to tag buffers lent through it).
    pub fn ring_id(&self) -> u8 {
        self.ring_id
    }

    /// Current consumer index (for monitoring and reclaim plans).
    pub fn head(&self) -> u64 {
        self.region.atomic_u64(HEAD).load(Ordering::Acquire)
    }

    /// Current producer index (for monitoring and reclaim plans).
    pub fn tail(&self) -> u64 {
        self.region.atomic_u64(TAIL).load(Ordering::Acquire)
    }

    /// Another view of the same ring (same mapping fd, mapped again).
    pub fn try_clone(&self) -> Result<Self, RingError> {
        Self::attach(self.region.try_clone_fd()?)
    }
}

/// Borrows an endpoint's ring and doorbells as a [`RingMemory`], leaving `core` free to borrow.
macro_rules! shm {
    ($e:expr) => {
        ShmRing {
            ring: &$e.ring,
            wake_consumer: &$e.wake_consumer,
            wake_producer: &$e.wake_producer,
        }
    };
}

/// The shared-memory implementation of [`RingMemory`].
struct ShmRing<'a, T> {
    ring: &'a RingRegion<T>,
    wake_consumer: &'a Doorbell,
    wake_producer: &'a Doorbell,
}

impl<T: bytemuck::Pod> ShmRing<'_, T> {
    fn slot_ptr(&self, index: u64) -> *mut T {
        let slot = (index & (self.ring.capacity - 1)) as usize;
        // The slot array was bounds-checked against the mapping at create/attach.
        self.ring
            .region
            .base()
            .as_ptr()
            .wrapping_add(SLOTS + slot * std::mem::size_of::<T>())
            .cast::<T>()
    }
}

impl<T: bytemuck::Pod> RingMemory for ShmRing<'_, T> {
    type Item = T;
    fn capacity(&self) -> u64 {
        self.ring.capacity
    }
    fn load_head(&self, order: Ordering) -> u64 {
        self.ring.region.atomic_u64(HEAD).load(order)
    }
    fn store_head(&self, value: u64, order: Ordering) {
        self.ring.region.atomic_u64(HEAD).store(value, order)
    }
    fn load_tail(&self, order: Ordering) -> u64 {
        self.ring.region.atomic_u64(TAIL).load(order)
    }
    fn store_tail(&self, value: u64, order: Ordering) {
        self.ring.region.atomic_u64(TAIL).store(value, order)
    }
    fn load_consumer_waiting(&self, order: Ordering) -> bool {
        self.ring.region.atomic_u32(CONSUMER_WAITING).load(order) != 0
    }
    fn store_consumer_waiting(&self, value: bool, order: Ordering) {
        self.ring
            .region
            .atomic_u32(CONSUMER_WAITING)
            .store(u32::from(value), order)
    }
    fn load_producer_waiting(&self, order: Ordering) -> bool {
        self.ring.region.atomic_u32(PRODUCER_WAITING).load(order) != 0
    }
    fn store_producer_waiting(&self, value: bool, order: Ordering) {
        self.ring
            .region
            .atomic_u32(PRODUCER_WAITING)
            .store(u32::from(value), order)
    }
    fn fence_seqcst(&self) {
        fence(Ordering::SeqCst)
    }
    unsafe fn read_slot(&self, index: u64) -> T {
        // SAFETY: the slot is inside the mapping (bounds checked at attach, index masked) and
        // aligned (SLOTS is 64-aligned, size_of::<T> is a multiple of align_of::<T> <= 64). T is
        // Pod, so any bytes a peer wrote are a valid T. A volatile copy: no reference is formed.
        unsafe { std::ptr::read_volatile(self.slot_ptr(index)) }
    }
    unsafe fn write_slot(&self, index: u64, item: T) {
        // SAFETY: as for read_slot; the caller owns the slot under the protocol.
        unsafe { std::ptr::write_volatile(self.slot_ptr(index), item) }
    }
    fn wake_consumer(&self) {
        self.wake_consumer.ring()
    }
    fn wake_producer(&self) {
        self.wake_producer.ring()
    }
}

/// What a producer learns when the consumer of its ring was replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumerRestart {
    /// The new consumer's generation.
    pub generation: u64,
    /// Descriptors with index below this were consumed by dead incarnations; those without a
    /// completion will never get one (resubmit or fail them).
    pub consumed_before: u64,
}

/// What a consumer learns when the producer of its ring was replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerRestart {
    /// The new producer's generation.
    pub generation: u64,
    /// Descriptors with index below this were published by dead incarnations.
    pub published_before: u64,
}

/// What an endpoint that cannot make progress does next.
enum Next {
    /// Spin once more and retry.
    Retry,
    /// Arm the waiting flag and sleep on the doorbell for at most this long (`None`: forever).
    Sleep(Option<Duration>),
    /// The timeout passed.
    TimedOut,
}

/// The wait policy applied over one blocking call.
struct Waiter {
    policy: WaitPolicy,
    started: Instant,
    deadline: Option<Instant>,
    spins: u32,
}

impl Waiter {
    fn new(policy: WaitPolicy, timeout: Option<Duration>) -> Self {
        let started = Instant::now();
        Self {
            policy,
            started,
            deadline: timeout.map(|t| started + t),
            spins: 0,
        }
    }

    fn next(&mut self) -> Next {
        self.spins = self.spins.wrapping_add(1);
        let spin_budget = match self.policy {
            WaitPolicy::Doorbell => Duration::ZERO,
            WaitPolicy::Poll => Duration::MAX,
            WaitPolicy::Adaptive(budget) => budget,
        };
        // Reading the clock costs more than a spin: look at it every 64 spins.
        if !spin_budget.is_zero() && self.spins % 64 != 0 {
            std::hint::spin_loop();
            return Next::Retry;
        }
        let now = Instant::now();
        let left = match self.deadline {
            Some(d) if now >= d => return Next::TimedOut,
            Some(d) => Some(d - now),
            None => None,
        };
        if now.duration_since(self.started) < spin_budget {
            std::hint::spin_loop();
            return Next::Retry;
        }
        Next::Sleep(left)
    }
}

/// The producing end of a ring.
#[derive(Debug)]
pub struct Producer<T> {
    ring: RingRegion<T>,
    wake_consumer: Doorbell,
    wake_producer: Doorbell,
    core: ProducerCore,
    policy: WaitPolicy,
    seen_consumer_generation: u64,
}

impl<T: bytemuck::Pod> Producer<T> {
    /// Attaches as producer. `data` wakes the consumer, `space` wakes us.
    pub fn attach(
        ring: RingRegion<T>,
        data: Doorbell,
        space: Doorbell,
        generation: u64,
        mode: StartMode,
    ) -> Result<Self, RingError> {
        let region = &ring.region;
        let (index, generation_before) = (
            ring.tail(),
            region
                .atomic_u64(PRODUCER_GENERATION)
                .load(Ordering::Acquire),
        );
        if mode == StartMode::Fresh && (index != 0 || generation_before != 0) {
            return Err(RingError::NotFresh {
                role: "producer",
                index,
                generation: generation_before,
            });
        }
        let shm = ShmRing {
            ring: &ring,
            wake_consumer: &data,
            wake_producer: &space,
        };
        let core = ProducerCore::attach(&shm)?;
        region
            .atomic_u32(PRODUCER_WAITING)
            .store(0, Ordering::Relaxed);
        region
            .atomic_u64(PRODUCER_RESTART_TAIL)
            .store(core.tail(), Ordering::Relaxed);
        region
            .atomic_u64(PRODUCER_GENERATION)
            .store(generation, Ordering::Release);
        let seen_consumer_generation = region
            .atomic_u64(CONSUMER_GENERATION)
            .load(Ordering::Acquire);
        tracing::debug!(
            ring = ring.ring_id,
            generation,
            ?mode,
            tail = core.tail(),
            "producer attached"
        );
        Ok(Self {
            ring,
            wake_consumer: data,
            wake_producer: space,
            core,
            policy: WaitPolicy::default(),
            seen_consumer_generation,
        })
    }

    /// Sets how [`Producer::push_wait`] waits.
    pub fn set_policy(&mut self, policy: WaitPolicy) {
        self.policy = policy;
    }

    /// The ring.
    pub fn ring(&self) -> &RingRegion<T> {
        &self.ring
    }

    /// Index the next pushed descriptor gets (buffers lent with it are tagged with it).
    pub fn next_index(&self) -> u64 {
        self.core.tail()
    }

    /// Free slots right now.
    pub fn free(&mut self) -> Result<u64, RingError> {
        let shm = shm!(self);
        Ok(self.core.free(&shm, self.ring.capacity)?)
    }

    /// Publishes as many of `items` as fit without waiting. Returns how many.
    pub fn try_push(&mut self, items: &[T]) -> Result<usize, RingError> {
        let shm = shm!(self);
        Ok(self.core.push(&shm, items)?)
    }

    /// Publishes at least one of `items` (waiting for space by the policy), up to all that fit.
    /// Returns 0 only if `timeout` passed with the ring full.
    pub fn push_wait(
        &mut self,
        items: &[T],
        timeout: Option<Duration>,
    ) -> Result<usize, RingError> {
        let mut waiter = Waiter::new(self.policy, timeout);
        loop {
            let n = self.try_push(items)?;
            if n > 0 || items.is_empty() {
                return Ok(n);
            }
            match waiter.next() {
                Next::Retry => {}
                Next::TimedOut => return Ok(0),
                Next::Sleep(left) => {
                    let shm = shm!(self);
                    if !self.core.arm_wait(&shm)? {
                        self.wake_producer.wait(left)?;
                        self.core.disarm_wait(&shm);
                    }
                }
            }
        }
    }

    /// For event loops that sleep elsewhere (an async reactor, io_uring): announces that the
    /// producer is about to wait for space. Returns true if space appeared meanwhile (do not
    /// sleep). Otherwise sleep until [`Producer::space_doorbell`] is readable, drain it, then
    /// call [`Producer::disarm_wait`].
    pub fn arm_wait(&mut self) -> Result<bool, RingError> {
        let shm = shm!(self);
        Ok(self.core.arm_wait(&shm)?)
    }

    /// Clears the waiting flag after a sleep begun with [`Producer::arm_wait`].
    pub fn disarm_wait(&mut self) {
        let shm = shm!(self);
        self.core.disarm_wait(&shm);
    }

    /// The doorbell the consumer rings when it frees space for a waiting producer.
    pub fn space_doorbell(&self) -> &Doorbell {
        &self.wake_producer
    }

    /// The last descriptor this ring's producers published (slot `next_index - 1`), if any.
    /// Only producers write slots, so it stays readable after it was consumed, until the
    /// producer overwrites it: a restarted relay reads it to learn what its predecessor
    /// forwarded last.
    pub fn last_published(&self) -> Option<T> {
        let tail = self.core.tail();
        if tail == 0 {
            return None;
        }
        let shm = shm!(self);
        // SAFETY: only the producer (us) writes slots; slot tail-1 was written by a producer
        // before the tail passed it, and nobody writes it until we push again.
        Some(unsafe { shm.read_slot(tail - 1) })
    }

    /// Reports a replaced consumer once per replacement.
    pub fn consumer_restart(&mut self) -> Option<ConsumerRestart> {
        let region = &self.ring.region;
        let generation = region
            .atomic_u64(CONSUMER_GENERATION)
            .load(Ordering::Acquire);
        if generation == self.seen_consumer_generation {
            return None;
        }
        self.seen_consumer_generation = generation;
        let consumed_before = region
            .atomic_u64(CONSUMER_RESTART_HEAD)
            .load(Ordering::Acquire);
        Some(ConsumerRestart {
            generation,
            consumed_before,
        })
    }
}

/// The consuming end of a ring.
#[derive(Debug)]
pub struct Consumer<T> {
    ring: RingRegion<T>,
    wake_consumer: Doorbell,
    wake_producer: Doorbell,
    core: ConsumerCore,
    policy: WaitPolicy,
    seen_producer_generation: u64,
}

impl<T: bytemuck::Pod> Consumer<T> {
    /// Attaches as consumer. `data` wakes us, `space` wakes the producer.
    pub fn attach(
        ring: RingRegion<T>,
        data: Doorbell,
        space: Doorbell,
        generation: u64,
        mode: StartMode,
    ) -> Result<Self, RingError> {
        let (index, generation_before) = (
            ring.head(),
            ring.region
                .atomic_u64(CONSUMER_GENERATION)
                .load(Ordering::Acquire),
        );
        if mode == StartMode::Fresh && (index != 0 || generation_before != 0) {
            return Err(RingError::NotFresh {
                role: "consumer",
                index,
                generation: generation_before,
            });
        }
        let shm = ShmRing {
            ring: &ring,
            wake_consumer: &data,
            wake_producer: &space,
        };
        let core = ConsumerCore::attach(&shm)?;
        let region = &ring.region;
        region
            .atomic_u32(CONSUMER_WAITING)
            .store(0, Ordering::Relaxed);
        region
            .atomic_u64(CONSUMER_RESTART_HEAD)
            .store(core.head(), Ordering::Relaxed);
        region
            .atomic_u64(CONSUMER_GENERATION)
            .store(generation, Ordering::Release);
        let seen_producer_generation = region
            .atomic_u64(PRODUCER_GENERATION)
            .load(Ordering::Acquire);
        // A producer may have gone to sleep waiting for the dead consumer: wake it.
        space.ring();
        tracing::debug!(
            ring = ring.ring_id,
            generation,
            ?mode,
            head = core.head(),
            "consumer attached"
        );
        Ok(Self {
            ring,
            wake_consumer: data,
            wake_producer: space,
            core,
            policy: WaitPolicy::default(),
            seen_producer_generation,
        })
    }

    /// Sets how [`Consumer::pop_wait`] waits.
    pub fn set_policy(&mut self, policy: WaitPolicy) {
        self.policy = policy;
    }

    /// The ring.
    pub fn ring(&self) -> &RingRegion<T> {
        &self.ring
    }

    /// Index of the next descriptor to be popped.
    pub fn next_index(&self) -> u64 {
        self.core.head()
    }

    /// Pops up to `max` descriptors into `out` without waiting; the first has index
    /// [`Consumer::next_index`] as it was before the call. Popping commits consumption.
    pub fn try_pop(&mut self, out: &mut Vec<T>, max: usize) -> Result<usize, RingError> {
        let shm = shm!(self);
        Ok(self.core.pop(&shm, out, max)?)
    }

    /// Copies up to `max` ready descriptors into `out` without consuming them (see
    /// [`Consumer::commit`]); the first is [`Consumer::next_index`].
    pub fn try_peek(&mut self, out: &mut Vec<T>, max: usize) -> Result<usize, RingError> {
        let shm = shm!(self);
        Ok(self.core.peek(&shm, out, max)?)
    }

    /// Consumes the next `n` descriptors, which the caller has peeked and handled.
    pub fn commit(&mut self, n: u64) -> Result<(), RingError> {
        let shm = shm!(self);
        Ok(self.core.commit(&shm, n)?)
    }

    /// Waits (by the policy) until a descriptor is ready or `timeout` passes, consuming nothing.
    /// Returns whether one is ready.
    pub fn wait_ready(&mut self, timeout: Option<Duration>) -> Result<bool, RingError> {
        let mut waiter = Waiter::new(self.policy, timeout);
        loop {
            let shm = shm!(self);
            if self.core.available(&shm)? > 0 {
                return Ok(true);
            }
            match waiter.next() {
                Next::Retry => {}
                Next::TimedOut => return Ok(false),
                Next::Sleep(left) => {
                    if !self.core.arm_wait(&shm)? {
                        self.wake_consumer.wait(left)?;
                        self.core.disarm_wait(&shm);
                    }
                }
            }
        }
    }

    /// For event loops that sleep elsewhere (an async reactor, io_uring): announces that the
    /// consumer is about to wait for descriptors. Returns true if some appeared meanwhile (do
    /// not sleep). Otherwise sleep until [`Consumer::data_doorbell`] is readable, drain it, then
    /// call [`Consumer::disarm_wait`].
    pub fn arm_wait(&mut self) -> Result<bool, RingError> {
        let shm = shm!(self);
        Ok(self.core.arm_wait(&shm)?)
    }

    /// Clears the waiting flag after a sleep begun with [`Consumer::arm_wait`].
    pub fn disarm_wait(&mut self) {
        let shm = shm!(self);
        self.core.disarm_wait(&shm);
    }

    /// The doorbell the producer rings when it publishes to a waiting consumer.
    pub fn data_doorbell(&self) -> &Doorbell {
        &self.wake_consumer
    }

    /// Pops at least one descriptor (waiting by the policy), up to `max`. Returns 0 only if
    /// `timeout` passed with the ring empty.
    pub fn pop_wait(
        &mut self,
        out: &mut Vec<T>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, RingError> {
        let mut waiter = Waiter::new(self.policy, timeout);
        loop {
            let n = self.try_pop(out, max)?;
            if n > 0 || max == 0 {
                return Ok(n);
            }
            match waiter.next() {
                Next::Retry => {}
                Next::TimedOut => return Ok(0),
                Next::Sleep(left) => {
                    let shm = shm!(self);
                    if !self.core.arm_wait(&shm)? {
                        self.wake_consumer.wait(left)?;
                        self.core.disarm_wait(&shm);
                    }
                }
            }
        }
    }

    /// Reports a replaced producer once per replacement.
    pub fn producer_restart(&mut self) -> Option<ProducerRestart> {
        let region = &self.ring.region;
        let generation = region
            .atomic_u64(PRODUCER_GENERATION)
            .load(Ordering::Acquire);
        if generation == self.seen_producer_generation {
            return None;
        }
        self.seen_producer_generation = generation;
        let published_before = region
            .atomic_u64(PRODUCER_RESTART_TAIL)
            .load(Ordering::Acquire);
        Some(ProducerRestart {
            generation,
            published_before,
        })
    }
}

/// Creates the two doorbells of a ring: `(data, space)`.
pub fn doorbells() -> Result<(Doorbell, Doorbell), RingError> {
    Ok((Doorbell::new()?, Doorbell::new()?))
}
