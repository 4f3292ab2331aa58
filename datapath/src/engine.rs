//! The engine: consumes submissions, drives them through the io_uring, publishes completions.
//!
//! One thread ([`Engine::run`]'s caller) owns the io_uring, every request and every ring
//! endpoint. Its loop:
//!
//! 1. reap io_uring completions and advance each request's state machine ([`Phase`]): a short
//!    transfer continues where it stopped, a `fallocate` the backing store does not support turns
//!    into writing zeroes, a FUA write-zeroes ends with an `fdatasync`; a completed doorbell poll
//!    drains its eventfd;
//! 2. publish finished requests' completions on their channel's completion ring (lending their
//!    buffer chain at the exact index each is published at);
//! 3. consume new submissions, up to the free request slots, from every channel whose completion
//!    ring is not full (backpressure: a full completion ring stops consumption on that channel;
//!    its completions wait, none is dropped);
//! 4. submit the queued operations;
//! 5. nothing done: poll for [`EngineConfig::spin`] (yielding the core each turn, so a fabric
//!    sharing it runs), then announce the waits
//!    (`Consumer::arm_wait` on the submission rings it can consume from, `Producer::arm_wait`
//!    on full completion rings), make sure a poll is queued on each of those rings' doorbells
//!    and on its wake eventfd (all fixed files of the io_uring), and sleep in `io_uring_enter`
//!    until an I/O completes, a doorbell or the wake eventfd ([`Stopper::stop`]) rings, or
//!    [`EngineConfig::max_sleep`] passes (so the heartbeat goes on while idle).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_ipc::control::RateLimiter;
use duplex_ipc::desc::{IoDesc, STATUS_INTERNAL, STATUS_INVALID_FIELD, STATUS_SUCCESS};
use duplex_ipc::doorbell::{Doorbell, DoorbellError};
use duplex_ipc::pool::{BufHandle, ChunkState, Pool, PoolError, NIL};
use duplex_ipc::ring::{Consumer, Producer, RingError};

use crate::channel::Channel;
use crate::drives::{Drive, Finished};
use crate::request::{self, Command, Kind};
use crate::uring::{Dir, Memory, Transfer, Uring, UringError, POLL_BIT};
use crate::volume::Volume;

/// Most descriptors popped from one ring, or published on one, per loop iteration.
const BATCH: usize = 32;
/// Low 48 bits: the incarnation as a pool ownership word records it.
const INCARNATION_MASK: u64 = (1 << 48) - 1;
/// Fixed-file index of the wake eventfd. Channel `c`'s submission data doorbell is `1 + 2c`,
/// its completion space doorbell `2 + 2c`; volume `v` follows them: `1 + 2 * channels + v`.
const WAKE_FILE: u32 = 0;

/// Tunables of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Requests in flight at most (request slots); also sizes the io_uring.
    pub queue_depth: usize,
    /// How long the engine polls its rings and the io_uring before it sleeps.
    pub spin: Duration,
    /// The longest sleep: the beat callback of [`Engine::run`] is called at least this often.
    pub max_sleep: Duration,
    /// After [`Stopper::stop`]: how long the engine waits for room to publish the completions
    /// of requests it had already consumed.
    pub grace: Duration,
    /// Write zeroes and deallocate by writing a zero buffer instead of trying `fallocate` first
    /// (the fallback path, forced: for tests and for backends whose `fallocate` misbehaves).
    pub emulate_zeroes: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_depth: 128,
            spin: Duration::from_micros(50),
            max_sleep: Duration::from_millis(250),
            grace: Duration::from_secs(5),
            emulate_zeroes: false,
        }
    }
}

/// Counters of one [`Engine::run`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Descriptors consumed.
    pub submissions: u64,
    /// Completions published.
    pub completions: u64,
    /// Completions with a status other than success.
    pub errors: u64,
    /// Transfers that came back short and were continued.
    pub short_transfers: u64,
    /// Write-zeroes or deallocate requests done by writing zeroes (forced, or `fallocate`
    /// unsupported by the backing store).
    pub zero_writes: u64,
    /// Times the engine went to sleep.
    pub sleeps: u64,
    /// Completions still unpublished when the engine ended (the fabric did not make room
    /// within the grace period).
    pub unpublished: u64,
}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration cannot work.
    #[error("Datapath engine configuration: {0}")]
    Config(String),
    /// The io_uring failed.
    #[error(transparent)]
    Uring(#[from] UringError),
    /// The wake eventfd could not be created.
    #[error(transparent)]
    Doorbell(#[from] DoorbellError),
}

/// Ends a running engine from another thread (or a signal-free control loop).
#[derive(Clone, Debug)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    wake: Arc<Doorbell>,
}

impl Stopper {
    /// Asks the engine to stop: it consumes no more submissions, finishes the requests it has,
    /// publishes their completions (waiting up to [`EngineConfig::grace`] for room) and returns.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::Release);
        self.wake.ring();
    }

    /// Whether [`Stopper::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// A request's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading or writing the chain: `done` of `len` bytes moved.
    Transfer,
    /// `fallocate` with this mode in flight.
    Fallocate(i32),
    /// Writing zeroes from the zero buffer: `done` of `len` bytes written.
    Zeroes,
    /// `fdatasync` in flight on `outstanding` volumes.
    Sync,
    /// `outstanding` NVMe commands in flight on the volume's drive.
    Drive,
}

/// One consumed submission.
#[derive(Debug)]
struct Request {
    channel: usize,
    desc: IoDesc,
    /// The chain's chunks (snapshot taken when it was taken over); empty without a buffer.
    chain: Vec<u32>,
    has_buf: bool,
    cmd: Command,
    phase: Phase,
    done: u64,
    carried: u64,
    outstanding: u32,
    status: u16,
}

/// One channel as the engine sees it: endpoints, the completions waiting for room, which waits
/// are announced, and whether the channel is dead.
#[derive(Debug)]
struct ChannelState {
    submit: Consumer<IoDesc>,
    complete: Producer<IoDesc>,
    submit_id: u8,
    complete_id: u8,
    pending: VecDeque<IoDesc>,
    armed_data: bool,
    armed_space: bool,
    failed: bool,
}

/// The datapath engine. See the module docs.
#[derive(Debug)]
pub struct Engine {
    volumes: Vec<Volume>,
    drives: Vec<Drive>,
    finished: Vec<Finished>,
    pool: Arc<Pool>,
    channels: Vec<ChannelState>,
    uring: Uring,
    config: EngineConfig,
    stop: Arc<AtomicBool>,
    wake: Arc<Doorbell>,
    slots: Vec<Option<Request>>,
    free: Vec<usize>,
    zero_range_unsupported: Vec<bool>,
    punch_unsupported: Vec<bool>,
    /// A poll is queued on this fixed file.
    polling: Vec<bool>,
    next_channel: usize,
    stats: EngineStats,
    invalid_log: RateLimiter,
    error_log: RateLimiter,
    cqes: Vec<(u64, i32)>,
    batch: Vec<IoDesc>,
}

impl Engine {
    /// Builds an engine serving `volumes` to `channels` with buffers from `pool` (attached as
    /// the datapath's [`duplex_ipc::pool::Holder`]). Creates the restricted io_uring, so call it
    /// before entering the sandbox.
    pub fn new(
        volumes: Vec<Volume>,
        pool: Arc<Pool>,
        channels: Vec<Channel>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        Self::with_drives(volumes, Vec::new(), pool, channels, config)
    }

    /// As [`Engine::new`], with NVMe drives serving the volumes whose [`Volume::on_drive`]
    /// index points into `drives` (the `drives` module).
    pub fn with_drives(
        volumes: Vec<Volume>,
        drives: Vec<Drive>,
        pool: Arc<Pool>,
        channels: Vec<Channel>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let bad = |m: String| Err(EngineError::Config(m));
        if !(1..=4096).contains(&config.queue_depth) {
            return bad(format!("queue depth {} (1..=4096)", config.queue_depth));
        }
        if config.max_sleep.is_zero() {
            return bad("max_sleep must be positive".into());
        }
        for (i, v) in volumes.iter().enumerate() {
            if volumes[..i].iter().any(|o| o.id() == v.id()) {
                return bad(format!("volume id {} used twice", v.id()));
            }
            if v.drive().is_some_and(|d| d >= drives.len()) {
                return bad(format!(
                    "volume {} names a drive that is not there",
                    v.name()
                ));
            }
            if v.direct() && pool.chunk_size() % v.block_size() as usize != 0 {
                return bad(format!(
                    "volume {} uses O_DIRECT with {}-byte blocks, but pool chunks are {} bytes \
                     (must be a multiple of the block size)",
                    v.name(),
                    v.block_size(),
                    pool.chunk_size()
                ));
            }
        }
        let mut ids = Vec::new();
        for c in &channels {
            for id in [c.submit_ring(), c.complete_ring()] {
                if ids.contains(&id) {
                    return bad(format!("ring id {id} used twice"));
                }
                ids.push(id);
            }
        }
        let wake = Arc::new(Doorbell::new()?);
        let mut files = vec![wake.fd()];
        for c in &channels {
            files.push(c.submit.data_doorbell().fd());
            files.push(c.complete.space_doorbell().fd());
        }
        files.extend(volumes.iter().map(Volume::fd));
        let entries = (config.queue_depth + files.len() + 2).next_power_of_two();
        let entries = u32::try_from(entries.min(4096)).unwrap_or(4096);
        let uring = Uring::new(entries, config.queue_depth, &files, Arc::clone(&pool))?;
        let polling = vec![false; files.len()];
        drop(files);
        let channels = channels
            .into_iter()
            .map(|c| ChannelState {
                submit_id: c.submit_ring(),
                complete_id: c.complete_ring(),
                submit: c.submit,
                complete: c.complete,
                pending: VecDeque::new(),
                armed_data: false,
                armed_space: false,
                failed: false,
            })
            .collect::<Vec<_>>();
        let n = volumes.len();
        tracing::info!(
            volumes = n,
            queue_depth = config.queue_depth,
            chunk_size = pool.chunk_size(),
            "datapath engine ready (io_uring restricted)"
        );
        Ok(Self {
            volumes,
            drives,
            finished: Vec::new(),
            pool,
            channels,
            uring,
            stop: Arc::new(AtomicBool::new(false)),
            wake,
            slots: (0..config.queue_depth).map(|_| None).collect(),
            free: (0..config.queue_depth).rev().collect(),
            zero_range_unsupported: vec![false; n],
            punch_unsupported: vec![false; n],
            polling,
            next_channel: 0,
            stats: EngineStats::default(),
            invalid_log: RateLimiter::new(10, Duration::from_secs(10)),
            error_log: RateLimiter::new(10, Duration::from_secs(10)),
            cqes: Vec::with_capacity(256),
            batch: Vec::with_capacity(BATCH),
            config,
        })
    }

    /// A handle that stops [`Engine::run`].
    pub fn stopper(&self) -> Stopper {
        Stopper {
            flag: Arc::clone(&self.stop),
            wake: Arc::clone(&self.wake),
        }
    }

    /// Serves until [`Stopper::stop`] (see the module docs), calling `beat` at least every
    /// [`EngineConfig::max_sleep`] from the serving thread (the heartbeat: it stops when the
    /// loop does).
    pub fn run(mut self, mut beat: impl FnMut()) -> Result<EngineStats, EngineError> {
        let span = tracing::info_span!("datapath", channels = self.channels.len());
        let _entered = span.enter();
        let result = self.serve(&mut beat);
        self.disarm();
        self.stats.unpublished = self.channels.iter().map(|c| c.pending.len() as u64).sum();
        if self.stats.unpublished > 0 {
            tracing::warn!(
                unpublished = self.stats.unpublished,
                "completions left unpublished: the fabric made no room within the grace period"
            );
        }
        tracing::info!(stats = ?self.stats, "datapath engine stopped");
        result.map(|()| self.stats)
    }

    fn serve(&mut self, beat: &mut impl FnMut()) -> Result<(), EngineError> {
        let mut idle_since: Option<Instant> = None;
        let mut stop_at: Option<Instant> = None;
        loop {
            beat();
            let mut progress = self.reap()?;
            progress |= self.poll_drives();
            progress |= self.publish();
            let stopping = self.stop.load(Ordering::Acquire);
            if stopping {
                let since = *stop_at.get_or_insert_with(|| {
                    tracing::info!("stopping: no more submissions are consumed");
                    Instant::now()
                });
                if self.drained() || since.elapsed() >= self.config.grace {
                    return Ok(());
                }
            } else {
                progress |= self.consume()?;
            }
            self.uring.submit()?;
            if progress {
                idle_since = None;
                continue;
            }
            if self.drives.iter().any(Drive::busy) {
                // Drive completions are polled: with commands in flight, keep polling (and
                // let whatever shares the core run between turns).
                std::thread::yield_now();
                continue;
            }
            let first_idle_turn = idle_since.is_none();
            let since = *idle_since.get_or_insert_with(Instant::now);
            // Every idle period polls at least once, however late this thread got the core.
            if first_idle_turn || since.elapsed() < self.config.spin {
                // Give the core away if anything else wants it: on a core shared with the
                // fabric (or the io_uring's workers) a plain spin would only delay the work we
                // are waiting for; on a core of our own this returns at once.
                std::thread::yield_now();
                continue;
            }
            // Announce the waits, then re-check: what arrived meanwhile is handled first.
            let ready = self.arm(stopping)?;
            if ready || self.uring.has_completions() {
                self.disarm();
                continue;
            }
            self.stats.sleeps += 1;
            let timeout = if stopping {
                self.config.max_sleep.min(Duration::from_millis(10))
            } else {
                self.config.max_sleep
            };
            let slept = self.uring.wait(timeout);
            self.disarm();
            slept?;
        }
    }

    /// Polls every drive; accounts the pieces that finished. Returns whether anything moved.
    fn poll_drives(&mut self) -> bool {
        if self.drives.is_empty() {
            return false;
        }
        let now = Instant::now();
        let mut finished = std::mem::take(&mut self.finished);
        finished.clear();
        let mut progress = false;
        for d in &mut self.drives {
            progress |= d.poll(now, &mut finished);
        }
        for f in &finished {
            self.drive_done(f.slot, f.status);
        }
        self.finished = finished;
        progress
    }

    /// One NVMe command of request `slot` ended with `status`.
    fn drive_done(&mut self, slot: usize, status: u16) {
        let Some(req) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            tracing::error!(slot, "drive completion for an empty request slot");
            return;
        };
        req.outstanding = req.outstanding.saturating_sub(1);
        if status != STATUS_SUCCESS && req.status == STATUS_SUCCESS {
            req.status = status;
        }
        if req.outstanding > 0 {
            return;
        }
        let mut status = req.status;
        if status == STATUS_SUCCESS && req.cmd.kind == Kind::Read {
            let bytes = usize::try_from(req.cmd.len).unwrap_or(usize::MAX);
            if let Err(e) = self.pool.set_chain_len(BufHandle(req.desc.buf), bytes) {
                tracing::error!(tag = req.desc.tag, error = %e, "cannot set the read chain's lengths");
                status = STATUS_INTERNAL;
            }
        }
        self.complete(slot, status);
    }

    /// No request in flight and every completion published.
    fn drained(&self) -> bool {
        self.free.len() == self.slots.len()
            && self.uring.io_inflight() == 0
            && self
                .channels
                .iter()
                .all(|c| c.failed || c.pending.is_empty())
    }

    /// Queues a poll on fixed file `file` unless one is queued.
    fn poll(&mut self, file: u32) -> Result<(), UringError> {
        let Some(queued) = self.polling.get_mut(file as usize) else {
            return Err(UringError::Refused("file not registered"));
        };
        if !*queued {
            self.uring.poll_readable(file)?;
            *queued = true;
        }
        Ok(())
    }

    /// Before sleeping: announces a wait for room on every full completion ring and for
    /// submissions on every ring it can consume from, each with a poll on its doorbell, and
    /// polls the wake eventfd. Returns true if a ring became ready meanwhile (do not sleep).
    fn arm(&mut self, stopping: bool) -> Result<bool, EngineError> {
        let mut ready = false;
        let consume = !stopping && !self.free.is_empty();
        for ci in 0..self.channels.len() {
            let ch = &mut self.channels[ci];
            if ch.failed {
                continue;
            }
            let file = if !ch.pending.is_empty() {
                match ch.complete.arm_wait() {
                    Ok(true) => {
                        ready = true;
                        continue;
                    }
                    Ok(false) => {
                        ch.armed_space = true;
                        space_file(ci)
                    }
                    Err(e) => {
                        fail_channel(ch, ci, &e);
                        continue;
                    }
                }
            } else if consume {
                match ch.submit.arm_wait() {
                    Ok(true) => {
                        ready = true;
                        continue;
                    }
                    Ok(false) => {
                        ch.armed_data = true;
                        data_file(ci)
                    }
                    Err(e) => {
                        fail_channel(ch, ci, &e);
                        continue;
                    }
                }
            } else {
                continue;
            };
            self.poll(file)?;
        }
        self.poll(WAKE_FILE)?;
        Ok(ready)
    }

    /// After a sleep (or instead of one): withdraws every announced wait.
    fn disarm(&mut self) {
        for ch in &mut self.channels {
            if std::mem::take(&mut ch.armed_data) {
                ch.submit.disarm_wait();
            }
            if std::mem::take(&mut ch.armed_space) {
                ch.complete.disarm_wait();
            }
        }
    }

    /// Publishes pending completions where the completion ring has room.
    fn publish(&mut self) -> bool {
        let mut progress = false;
        let mut batch = std::mem::take(&mut self.batch);
        for (i, ch) in self.channels.iter_mut().enumerate() {
            if ch.failed || ch.pending.is_empty() {
                continue;
            }
            let producer = &mut ch.complete;
            let free = match producer.free() {
                Ok(f) => f,
                Err(e) => {
                    fail_channel(ch, i, &e);
                    continue;
                }
            };
            let k = usize::try_from(free)
                .unwrap_or(usize::MAX)
                .min(ch.pending.len())
                .min(BATCH);
            if k == 0 {
                continue;
            }
            let base = producer.next_index();
            batch.clear();
            for (j, d) in ch.pending.iter().take(k).enumerate() {
                let mut d = *d;
                lend_buffer(
                    &self.pool,
                    &mut d,
                    ch.complete_id,
                    base + j as u64,
                    &mut self.error_log,
                );
                batch.push(d);
            }
            let pushed = match producer.try_push(&batch) {
                Ok(n) => n,
                Err(e) => {
                    fail_channel(ch, i, &e);
                    0
                }
            };
            // Only this thread produces, and the ring had `free` slots: all k go. Should fewer
            // go, the rest are taken back and stay pending.
            for (j, d) in batch.iter().enumerate().skip(pushed) {
                unlend_buffer(&self.pool, d, ch.complete_id, base + j as u64);
            }
            ch.pending.drain(..pushed);
            self.stats.completions += pushed as u64;
            progress |= pushed > 0;
        }
        self.batch = batch;
        progress
    }

    /// Consumes submissions, round-robin over the channels, up to the free request slots.
    fn consume(&mut self) -> Result<bool, EngineError> {
        let mut progress = false;
        let mut batch = std::mem::take(&mut self.batch);
        let n = self.channels.len();
        for k in 0..n {
            let ci = (self.next_channel + k) % n;
            let max = self.free.len().min(BATCH);
            if max == 0 {
                break;
            }
            let ch = &mut self.channels[ci];
            if ch.failed || !ch.pending.is_empty() {
                continue;
            }
            let consumer = &mut ch.submit;
            if let Some(r) = consumer.producer_restart() {
                tracing::info!(
                    channel = ci,
                    generation = r.generation,
                    published_before = r.published_before,
                    "the fabric was restarted on this channel"
                );
            }
            let base = consumer.next_index();
            batch.clear();
            let popped = match consumer.try_pop(&mut batch, max) {
                Ok(p) => p,
                Err(e) => {
                    fail_channel(ch, ci, &e);
                    continue;
                }
            };
            for (j, d) in batch.iter().take(popped).enumerate() {
                self.start(ci, *d, base + j as u64)?;
            }
            progress |= popped > 0;
        }
        self.next_channel = (self.next_channel + 1) % n.max(1);
        self.batch = batch;
        Ok(progress)
    }

    /// Takes over the chain lent through descriptor `index` of ring `ring`, returning its
    /// chunks, each verified held by us.
    fn take_chain(&self, head: u32, ring: u8, index: u64) -> Result<Vec<u32>, PoolError> {
        self.pool.take_chain(BufHandle(head), ring, index)?;
        let chain = self.pool.chain(BufHandle(head))?;
        let me = self.pool.holder();
        for &h in &chain {
            match self.pool.state(BufHandle(h))? {
                ChunkState::Held { role, incarnation }
                    if role == me.role && incarnation == me.incarnation & INCARNATION_MASK => {}
                actual => {
                    // The peer relinked the chain between our take and our walk.
                    return Err(PoolError::WrongState {
                        handle: h,
                        actual,
                        expected: "held by the datapath after take",
                    });
                }
            }
        }
        Ok(chain)
    }

    /// Starts one consumed descriptor: validation, buffer takeover, first operation. Checks in
    /// this order (the first failing one decides the status): a read, write or unknown opcode
    /// needs a chain lent through this descriptor; opcode; volume; zero blocks; range; chain
    /// capacity.
    fn start(&mut self, ci: usize, desc: IoDesc, index: u64) -> Result<(), EngineError> {
        self.stats.submissions += 1;
        let ring = self.channels[ci].submit_id;
        let data_op = request::kind(desc.opcode).map_or(true, Kind::has_data);
        let mut chain = Vec::new();
        let mut has_buf = false;
        if desc.buf != NIL {
            match self.take_chain(desc.buf, ring, index) {
                Ok(c) => {
                    chain = c;
                    has_buf = true;
                }
                Err(e) if data_op => {
                    self.log_invalid(
                        &desc,
                        ci,
                        "buffer not lent through this descriptor",
                        Some(&e),
                    );
                    self.finish(ci, desc, false, STATUS_INVALID_FIELD, 0);
                    return Ok(());
                }
                Err(e) => {
                    // A command without data whose buffer field is not a lent chain (a zeroed
                    // descriptor names chunk 0): ignore it.
                    tracing::trace!(tag = desc.tag, error = %e, "ignoring the buffer field of a command without data");
                }
            }
        } else if data_op {
            self.log_invalid(&desc, ci, "no buffer", None);
            self.finish(ci, desc, false, STATUS_INVALID_FIELD, 0);
            return Ok(());
        }
        let cmd = match request::decode(&desc, &self.volumes) {
            Ok(c) => c,
            Err(r) => {
                self.log_invalid(&desc, ci, r.why, None);
                self.finish(ci, desc, has_buf, r.status, 0);
                return Ok(());
            }
        };
        if cmd.kind.has_data() {
            let capacity = chain.len() as u64 * self.pool.chunk_size() as u64;
            if capacity < cmd.len {
                self.log_invalid(&desc, ci, "buffer chain shorter than the transfer", None);
                self.finish(ci, desc, true, STATUS_INVALID_FIELD, 0);
                return Ok(());
            }
        }
        if cmd.kind == Kind::Deallocate && cmd.len == 0
            || cmd.kind == Kind::Flush && cmd.volume.is_none() && self.volumes.is_empty()
        {
            self.finish(ci, desc, has_buf, STATUS_SUCCESS, 0);
            return Ok(());
        }
        let Some(slot) = self.free.pop() else {
            // consume() pops no more than there are free slots.
            self.finish(ci, desc, has_buf, STATUS_INTERNAL, 0);
            return Ok(());
        };
        let mut req = Request {
            channel: ci,
            desc,
            chain,
            has_buf,
            cmd,
            phase: Phase::Transfer,
            done: 0,
            carried: 0,
            outstanding: 0,
            status: STATUS_SUCCESS,
        };
        let vol = cmd.volume.unwrap_or(0);
        if let Some(d) = cmd.volume.and_then(|v| self.volumes[v].drive()) {
            req.phase = Phase::Drive;
            let started = self.drives[d].start(slot, &cmd, &req.chain, &self.pool);
            self.slots[slot] = Some(req);
            match started {
                Ok(n) => {
                    if let Some(r) = self.slots[slot].as_mut() {
                        r.outstanding = n;
                    }
                }
                Err(status) => self.complete(slot, status),
            }
            return Ok(());
        }
        let emulate = self.config.emulate_zeroes;
        let first = match cmd.kind {
            Kind::Read | Kind::Write => self.transfer(slot, &mut req),
            Kind::WriteZeroes if emulate || self.zero_range_unsupported[vol] => {
                self.stats.zero_writes += 1;
                req.phase = Phase::Zeroes;
                self.transfer(slot, &mut req)
            }
            Kind::Deallocate if emulate || self.punch_unsupported[vol] => {
                self.stats.zero_writes += 1;
                req.phase = Phase::Zeroes;
                self.transfer(slot, &mut req)
            }
            Kind::WriteZeroes | Kind::Deallocate => {
                let mode = if cmd.kind == Kind::WriteZeroes {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                };
                req.phase = Phase::Fallocate(mode);
                req.outstanding = 1;
                self.uring
                    .fallocate(slot, self.volume_file(vol), mode, cmd.offset, cmd.len)
            }
            Kind::Flush => {
                req.phase = Phase::Sync;
                self.sync(slot, &mut req, cmd.volume)
            }
        };
        let nothing_outstanding = req.outstanding == 0 && req.phase == Phase::Sync;
        let status = req.status;
        self.slots[slot] = Some(req);
        if first.is_ok() && nothing_outstanding {
            // A flush of every volume when every one is on a dead drive.
            self.complete(slot, status);
            return Ok(());
        }
        self.issued(slot, first)
    }

    /// Handles the outcome of queueing an operation for `slot`: a refusal (a bug) fails the
    /// request; a failing ring ends the engine.
    fn issued(&mut self, slot: usize, result: Result<(), UringError>) -> Result<(), EngineError> {
        match result {
            Ok(()) => Ok(()),
            Err(UringError::Refused(why)) => {
                tracing::error!(slot, why, "io_uring refused an operation");
                self.complete(slot, STATUS_INTERNAL);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Queues the next piece of a transfer (chain or zeroes) for `req`.
    fn transfer(&mut self, slot: usize, req: &mut Request) -> Result<(), UringError> {
        let vol = req.cmd.volume.unwrap_or(0);
        let (dir, memory) = match (req.phase, req.cmd.kind) {
            (Phase::Zeroes, _) => (Dir::Write { dsync: false }, Memory::Zeroes),
            (_, Kind::Read) => (Dir::Read, Memory::Chain(&req.chain)),
            _ => (Dir::Write { dsync: req.cmd.fua }, Memory::Chain(&req.chain)),
        };
        let t = Transfer {
            file: self.volume_file(vol),
            dir,
            memory,
            skip: req.done,
            len: req.cmd.len - req.done,
            offset: req.cmd.offset + req.done,
            inline: self.volumes[vol].mapped(),
        };
        req.carried = self.uring.transfer(slot, t)?;
        req.outstanding = 1;
        Ok(())
    }

    /// Queues `fdatasync` of one volume, or of all.
    fn sync(
        &mut self,
        slot: usize,
        req: &mut Request,
        volume: Option<usize>,
    ) -> Result<(), UringError> {
        req.phase = Phase::Sync;
        match volume {
            Some(v) => {
                self.uring.fdatasync(slot, self.volume_file(v))?;
                req.outstanding = 1;
            }
            None => {
                for v in 0..self.volumes.len() {
                    if self.volumes[v].drive().is_some() {
                        continue;
                    }
                    self.uring.fdatasync(slot, self.volume_file(v))?;
                    req.outstanding += 1;
                }
                // And a Flush on every drive: their completions count down the same total.
                for d in 0..self.drives.len() {
                    let flush = Command {
                        kind: Kind::Flush,
                        volume: None,
                        offset: 0,
                        len: 0,
                        fua: false,
                    };
                    match self.drives[d].start(slot, &flush, &[], &self.pool) {
                        Ok(n) => req.outstanding += n,
                        Err(status) => {
                            if req.status == STATUS_SUCCESS {
                                req.status = status;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Reaps io_uring completions and advances their requests.
    fn reap(&mut self) -> Result<bool, EngineError> {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        self.uring.reap(&mut cqes);
        let progress = !cqes.is_empty();
        let mut result = Ok(());
        for &(ud, res) in &cqes {
            if ud & POLL_BIT != 0 {
                self.polled(ud as u32, res);
                continue;
            }
            if let Err(e) = self.advance(ud as usize, res) {
                result = Err(e);
                break;
            }
        }
        self.cqes = cqes;
        result.map(|()| progress)
    }

    /// A poll on fixed file `file` completed: drain that eventfd (the loop then looks at
    /// everything anyway).
    fn polled(&mut self, file: u32, res: i32) {
        if let Some(queued) = self.polling.get_mut(file as usize) {
            *queued = false;
        }
        if res < 0 {
            if let Some(suppressed) = self.error_log.check(Instant::now()) {
                tracing::warn!(file, errno = -res, suppressed, "poll on an eventfd failed");
            }
        }
        let bell = if file == WAKE_FILE {
            Some(&*self.wake)
        } else {
            let ci = (file as usize - 1) / 2;
            self.channels.get(ci).and_then(|ch| {
                if file == data_file(ci) {
                    Some(ch.submit.data_doorbell())
                } else if file == space_file(ci) {
                    Some(ch.complete.space_doorbell())
                } else {
                    None
                }
            })
        };
        if let Some(bell) = bell {
            bell.drain();
        }
    }

    /// Fixed-file index of volume `v`.
    fn volume_file(&self, v: usize) -> u32 {
        u32::try_from(1 + 2 * self.channels.len() + v).unwrap_or(u32::MAX)
    }

    /// One operation of request `slot` finished with `res`.
    fn advance(&mut self, slot: usize, res: i32) -> Result<(), EngineError> {
        let Some(mut req) = self.slots.get_mut(slot).and_then(Option::take) else {
            tracing::error!(slot, res, "completion for an empty request slot");
            return Ok(());
        };
        req.outstanding = req.outstanding.saturating_sub(1);
        let vol = req.cmd.volume.unwrap_or(0);
        let next: Result<(), UringError> = match req.phase {
            Phase::Transfer | Phase::Zeroes => {
                if res <= 0 {
                    let errno = if res == 0 { libc::EIO } else { -res };
                    let what = if res == 0 {
                        "no progress (end of the backing store)"
                    } else {
                        "I/O failed"
                    };
                    let kind = if req.phase == Phase::Zeroes {
                        Kind::WriteZeroes
                    } else {
                        req.cmd.kind
                    };
                    let status = request::errno_status(kind, errno);
                    self.log_error(&req, errno, what);
                    self.slots[slot] = Some(req);
                    self.complete(slot, status);
                    return Ok(());
                }
                let n = u64::try_from(res).unwrap_or(0);
                if n < req.carried {
                    self.stats.short_transfers += 1;
                }
                req.done += n.min(req.cmd.len - req.done);
                if req.done < req.cmd.len {
                    self.transfer(slot, &mut req)
                } else {
                    return self.main_done(slot, req);
                }
            }
            Phase::Fallocate(mode) => {
                if res == -libc::EOPNOTSUPP {
                    let table = if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
                        &mut self.punch_unsupported
                    } else {
                        &mut self.zero_range_unsupported
                    };
                    if !table[vol] {
                        table[vol] = true;
                        tracing::info!(
                            volume = self.volumes[vol].name(),
                            op = req.cmd.kind.name(),
                            "fallocate unsupported by the backing store: writing zeroes instead"
                        );
                    }
                    self.stats.zero_writes += 1;
                    req.phase = Phase::Zeroes;
                    req.done = 0;
                    self.transfer(slot, &mut req)
                } else if res < 0 {
                    self.log_error(&req, -res, "fallocate failed");
                    let status = request::errno_status(req.cmd.kind, -res);
                    self.slots[slot] = Some(req);
                    self.complete(slot, status);
                    return Ok(());
                } else {
                    return self.main_done(slot, req);
                }
            }
            Phase::Drive => {
                // Drive requests never queue io_uring operations.
                tracing::error!(slot, res, "io_uring completion for a drive request");
                Ok(())
            }
            Phase::Sync => {
                if res < 0 && req.status == STATUS_SUCCESS {
                    self.log_error(&req, -res, "fdatasync failed");
                    req.status = request::errno_status(Kind::Flush, -res);
                }
                if req.outstanding == 0 {
                    let status = req.status;
                    self.slots[slot] = Some(req);
                    self.complete(slot, status);
                    return Ok(());
                }
                Ok(())
            }
        };
        self.slots[slot] = Some(req);
        self.issued(slot, next)
    }

    /// The main operation of a request is done: a FUA write-zeroes or deallocate still needs
    /// its `fdatasync` (a FUA write was written with `RWF_DSYNC`); everything else completes.
    fn main_done(&mut self, slot: usize, mut req: Request) -> Result<(), EngineError> {
        if req.cmd.fua && matches!(req.cmd.kind, Kind::WriteZeroes | Kind::Deallocate) {
            let vol = req.cmd.volume;
            let r = self.sync(slot, &mut req, vol);
            self.slots[slot] = Some(req);
            return self.issued(slot, r);
        }
        let mut status = STATUS_SUCCESS;
        if req.cmd.kind == Kind::Read {
            let bytes = usize::try_from(req.cmd.len).unwrap_or(usize::MAX);
            if let Err(e) = self.pool.set_chain_len(BufHandle(req.desc.buf), bytes) {
                tracing::error!(tag = req.desc.tag, error = %e, "cannot set the read chain's lengths");
                status = STATUS_INTERNAL;
            }
        }
        self.slots[slot] = Some(req);
        self.complete(slot, status);
        Ok(())
    }

    /// Ends request `slot` with `status`: frees the slot, queues the completion.
    fn complete(&mut self, slot: usize, status: u16) {
        let Some(req) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        let bytes = if req.cmd.kind == Kind::Read && status == STATUS_SUCCESS {
            req.cmd.len
        } else {
            0
        };
        tracing::trace!(
            tag = req.desc.tag,
            op = req.cmd.kind.name(),
            status,
            "request done"
        );
        self.finish(req.channel, req.desc, req.has_buf, status, bytes);
    }

    /// Queues the completion of `desc` on channel `ci`: status set, `buf` kept only if we hold
    /// its chain, `buf_len` set to the bytes read by a successful read.
    fn finish(&mut self, ci: usize, mut desc: IoDesc, has_buf: bool, status: u16, read: u64) {
        desc.status = status;
        if !has_buf {
            desc.buf = NIL;
        }
        if read > 0 {
            desc.buf_len = u32::try_from(read).unwrap_or(u32::MAX);
        }
        if status != STATUS_SUCCESS {
            self.stats.errors += 1;
        }
        self.channels[ci].pending.push_back(desc);
    }

    fn log_invalid(&mut self, desc: &IoDesc, channel: usize, why: &str, error: Option<&PoolError>) {
        if let Some(suppressed) = self.invalid_log.check(Instant::now()) {
            tracing::warn!(
                channel,
                tag = desc.tag,
                opcode = desc.opcode,
                volume = desc.volume,
                lba = desc.lba,
                blocks = desc.blocks,
                buf = desc.buf,
                error = error.map(tracing::field::display),
                suppressed,
                "invalid submission: {why}"
            );
        }
    }

    fn log_error(&mut self, req: &Request, errno: i32, what: &str) {
        if let Some(suppressed) = self.error_log.check(Instant::now()) {
            let volume = req.cmd.volume.map(|v| self.volumes[v].name());
            tracing::warn!(
                tag = req.desc.tag,
                op = req.cmd.kind.name(),
                volume,
                lba = req.desc.lba,
                blocks = req.desc.blocks,
                errno,
                error = %nix::errno::Errno::from_raw(errno),
                suppressed,
                "{what}"
            );
        }
    }
}

/// Fixed-file index of channel `c`'s submission data doorbell.
fn data_file(c: usize) -> u32 {
    u32::try_from(1 + 2 * c).unwrap_or(u32::MAX)
}

/// Fixed-file index of channel `c`'s completion space doorbell.
fn space_file(c: usize) -> u32 {
    u32::try_from(2 + 2 * c).unwrap_or(u32::MAX)
}

/// Marks a channel dead after a ring error (a corrupt index: the peer is broken). The other
/// channels go on.
fn fail_channel(ch: &mut ChannelState, channel: usize, e: &RingError) {
    if !ch.failed {
        tracing::error!(channel, error = %e, "channel failed: no more I/O on it");
    }
    ch.failed = true;
}

/// Lends `desc`'s chain through index `index` of completion ring `ring`, just before it is
/// published there. If the chain is not ours to lend (a peer tampered with it), the completion
/// goes without it and with an internal error.
fn lend_buffer(pool: &Pool, desc: &mut IoDesc, ring: u8, index: u64, log: &mut RateLimiter) {
    if desc.buf == NIL {
        return;
    }
    if let Err(e) = pool.lend_chain(BufHandle(desc.buf), ring, index) {
        if let Some(suppressed) = log.check(Instant::now()) {
            tracing::error!(tag = desc.tag, error = %e, suppressed, "cannot lend a completion's buffer back");
        }
        desc.buf = NIL;
        desc.status = STATUS_INTERNAL;
    }
}

/// Takes back a chain lent for a completion that was not published after all.
fn unlend_buffer(pool: &Pool, desc: &IoDesc, ring: u8, index: u64) {
    if desc.buf != NIL {
        if let Err(e) = pool.take_chain(BufHandle(desc.buf), ring, index) {
            tracing::error!(tag = desc.tag, error = %e, "cannot take back an unpublished completion's buffer");
        }
    }
}
