//! [`RingDisk`]: a drive reached through the datapath, on the metadata service's privileged
//! channel (an SPSC descriptor ring pair whose descriptors address raw drives by id; buffers
//! from the shared pool, held as the metadata role). One request at a time: the service is
//! not on the I/O path, and a commit's writes are few.
//!
//! A restarted metadata service frees what its predecessor held (pool reclaim) and discards
//! completions of requests it did not send (their tags carry the incarnation).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_ipc::desc::{IoDesc, OP_FLUSH, OP_READ, OP_WRITE, STATUS_SUCCESS};
use duplex_ipc::pool::{BufHandle, Pool, ReclaimPlan, NIL};
use duplex_ipc::ring::{Consumer, Producer};

use crate::disk::{DiskError, MetaDisk};

/// How long one drive request may take before it is given up (a drive that does not answer
/// is failing; its commit fails on it).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the heartbeat is called while a request is waited for.
const BEAT_EVERY: Duration = Duration::from_millis(100);

/// The channel to the datapath.
pub struct RingClient {
    pool: Arc<Pool>,
    submit: Producer<IoDesc>,
    complete: Consumer<IoDesc>,
    incarnation: u64,
    next_tag: u64,
    timeout: Duration,
    crash: CrashPoint,
    heartbeat: Option<Rc<dyn Fn()>>,
}

impl std::fmt::Debug for RingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingClient")
            .field("incarnation", &self.incarnation)
            .field("next_tag", &self.next_tag)
            .field("timeout", &self.timeout)
            .field("crash", &self.crash)
            .finish_non_exhaustive()
    }
}

/// A test hook (`duplex-metadata --crash-in-commit K`): while armed, the service aborts right
/// after the `K`-th drive write or flush completes, so a system test can crash it at a chosen
/// point inside a commit (after the first member's image, between the images and the flushes,
/// between two members' flushes, ...). Armed for one configuration request at a time.
#[derive(Debug, Default, Clone, Copy)]
pub struct CrashPoint {
    /// The write or flush after which to abort; `None`: never.
    pub after: Option<u32>,
    armed: bool,
    done: u32,
}

impl CrashPoint {
    /// Aborting after the `after`-th write or flush of an armed request.
    pub fn after(after: Option<u32>) -> Self {
        Self {
            after,
            ..Self::default()
        }
    }
}

impl RingClient {
    /// Wraps attached endpoints; `restart`: first free what a dead predecessor held.
    pub fn new(
        pool: Arc<Pool>,
        submit: Producer<IoDesc>,
        complete: Consumer<IoDesc>,
        incarnation: u64,
        restart: bool,
    ) -> Self {
        if restart {
            let report = pool.reclaim(&ReclaimPlan {
                consumes: &[(complete.ring().ring_id(), complete.next_index())],
                produces: &[(submit.ring().ring_id(), submit.next_index())],
            });
            tracing::info!(?report, "reclaimed the buffers of the previous incarnation");
        }
        Self {
            pool,
            submit,
            complete,
            incarnation,
            next_tag: 0,
            timeout: REQUEST_TIMEOUT,
            crash: CrashPoint::default(),
            heartbeat: None,
        }
    }

    /// What to call while a request is waited for (the service's liveness heartbeat: a drive
    /// the datapath is still resetting is slow, not a hung service).
    pub fn set_heartbeat(&mut self, beat: Rc<dyn Fn()>) {
        self.heartbeat = Some(beat);
    }

    /// Installs the crash hook (see [`CrashPoint`]).
    pub fn set_crash_point(&mut self, crash: CrashPoint) {
        self.crash = crash;
    }

    /// Arms (`true`, counting from zero) or disarms the crash hook.
    pub fn arm_crash_point(&mut self, armed: bool) {
        self.crash.armed = armed;
        self.crash.done = 0;
    }

    /// Counts a completed write or flush; aborts the process at the chosen one.
    fn crash_point(&mut self, opcode: u8, drive: u32, lba: u64) {
        let Some(after) = self.crash.after else {
            return;
        };
        if !self.crash.armed || !(opcode == OP_WRITE || opcode == OP_FLUSH) {
            return;
        }
        self.crash.done += 1;
        if self.crash.done == after {
            let op = if opcode == OP_WRITE { "write" } else { "flush" };
            tracing::error!(
                after,
                op,
                drive,
                lba,
                "crash-in-commit: aborting after this drive operation of a configuration request (test hook)"
            );
            std::process::abort();
        }
    }

    /// Sets the per-request timeout.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// One request: `data` written (a write), or `read` bytes read back (a read), or a flush.
    fn call(
        &mut self,
        opcode: u8,
        drive: u32,
        lba: u64,
        blocks: u32,
        data: Option<&[u8]>,
        read: usize,
    ) -> Result<Vec<u8>, String> {
        self.next_tag += 1;
        let tag = (self.incarnation << 40) | (self.next_tag & ((1 << 40) - 1));
        let len = data.map_or(read, <[u8]>::len);
        let mut desc = IoDesc {
            tag,
            epoch: self.incarnation,
            opcode,
            volume: drive,
            lba,
            blocks,
            buf: NIL,
            ..IoDesc::default()
        };
        if len > 0 {
            let h = self
                .pool
                .alloc_chain(len)
                .map_err(|e| format!("no buffer for {len} bytes: {e}"))?;
            if let Some(d) = data {
                self.pool
                    .write_chain(h, d)
                    .map_err(|e| format!("filling the buffer: {e}"))?;
            }
            let ring = self.submit.ring().ring_id();
            if let Err(e) = self.pool.lend_chain(h, ring, self.submit.next_index()) {
                let _ = self.pool.free_chain(h);
                return Err(format!("lending the buffer: {e}"));
            }
            desc.buf = h.0;
            desc.buf_len = u32::try_from(len).unwrap_or(u32::MAX);
        }
        let pushed = self
            .submit
            .push_wait(std::slice::from_ref(&desc), Some(self.timeout))
            .map_err(|e| format!("submission ring: {e}"))?;
        if pushed != 1 {
            return Err("the datapath did not take the request (ring full)".into());
        }
        let mut got = Vec::new();
        loop {
            got.clear();
            let index = self.complete.next_index();
            let deadline = Instant::now() + self.timeout;
            let n = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let n = self
                    .complete
                    .pop_wait(&mut got, 1, Some(left.min(BEAT_EVERY)))
                    .map_err(|e| format!("completion ring: {e}"))?;
                if n > 0 || left.is_zero() {
                    break n;
                }
                if let Some(beat) = &self.heartbeat {
                    beat();
                }
            };
            if n == 0 {
                return Err(format!(
                    "the datapath did not answer within {:?}",
                    self.timeout
                ));
            }
            let c = got[0];
            let mut bytes = Vec::new();
            if c.buf != NIL {
                let h = BufHandle(c.buf);
                let ring = self.complete.ring().ring_id();
                match self.pool.take_chain(h, ring, index) {
                    Ok(()) => {
                        if c.tag == tag && opcode == OP_READ && c.status == STATUS_SUCCESS {
                            let _ = self.pool.read_chain(h, &mut bytes);
                        }
                        let _ = self.pool.free_chain(h);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "a completion's buffer was not lent to us")
                    }
                }
            }
            if c.tag != tag {
                tracing::debug!(tag = c.tag, "discarding a completion of an earlier request");
                continue;
            }
            if c.status != STATUS_SUCCESS {
                return Err(format!("status {:#06x}", c.status));
            }
            if opcode == OP_READ && bytes.len() < read {
                return Err(format!("short read: {} of {read} bytes", bytes.len()));
            }
            bytes.truncate(read);
            self.crash_point(opcode, drive, lba);
            return Ok(bytes);
        }
    }
}

/// A drive on the privileged channel. Clones share the channel.
#[derive(Clone, Debug)]
pub struct RingDisk {
    client: Rc<RefCell<RingClient>>,
    id: u32,
    label: String,
    capacity: u64,
    block_size: u32,
}

impl RingDisk {
    /// Drive `id` (its raw drive id at the datapath), known as `label`.
    pub fn new(
        client: Rc<RefCell<RingClient>>,
        id: u32,
        label: &str,
        capacity: u64,
        block_size: u32,
    ) -> Self {
        Self {
            client,
            id,
            label: label.to_owned(),
            capacity,
            block_size,
        }
    }

    fn err(&self, op: &'static str, offset: u64, len: u64, why: String) -> DiskError {
        DiskError {
            op,
            offset,
            len,
            why,
        }
    }

    fn range(&self, op: &'static str, offset: u64, len: usize) -> Result<(u64, u32), DiskError> {
        let bs = u64::from(self.block_size);
        let len64 = len as u64;
        if offset % bs != 0
            || len64 % bs != 0
            || offset.checked_add(len64).is_none_or(|e| e > self.capacity)
        {
            return Err(self.err(
                op,
                offset,
                len64,
                "outside the drive or not whole blocks".into(),
            ));
        }
        let blocks = u32::try_from(len64 / bs)
            .map_err(|_| self.err(op, offset, len64, "too long for one request".into()))?;
        Ok((offset / bs, blocks))
    }
}

impl MetaDisk for RingDisk {
    fn label(&self) -> &str {
        &self.label
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        let (lba, blocks) = self.range("read", offset, len)?;
        self.client
            .borrow_mut()
            .call(OP_READ, self.id, lba, blocks, None, len)
            .map_err(|why| self.err("read", offset, len as u64, why))
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let (lba, blocks) = self.range("write", offset, data.len())?;
        self.client
            .borrow_mut()
            .call(OP_WRITE, self.id, lba, blocks, Some(data), 0)
            .map(|_| ())
            .map_err(|why| self.err("write", offset, data.len() as u64, why))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        self.client
            .borrow_mut()
            .call(OP_FLUSH, self.id, 0, 0, None, 0)
            .map(|_| ())
            .map_err(|why| self.err("flush", 0, 0, why))
    }
}
