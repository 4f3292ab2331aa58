//! [`FileBdev`]: a file or block device through the engine's restricted io_uring; a
//! memory-backed file (tmpfs, ramfs) mapped and copied inline instead.
//!
//! Each I/O is an operation with its own io_uring slot (taken from the engine's free list; an
//! operation waits in a queue while none is free) and a state ([`Phase`]): a short transfer
//! continues where it stopped, a `fallocate` the backing store does not support turns into
//! writing zeroes (and the volume skips the `fallocate` from then on), a FUA write-zeroes or
//! deallocate ends with an `fdatasync`, a FUA write is written with `RWF_DSYNC`.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use duplex_ipc::control::RateLimiter;
use duplex_ipc::desc::{STATUS_INTERNAL, STATUS_LBA_OUT_OF_RANGE, STATUS_SUCCESS};

use super::{in_range, Attach, Bdev, Ctx, Done, Io, Op};
use crate::request;
use crate::uring::{Dir, Memory, Transfer, UringError};
use crate::volume::Volume;

/// An operation's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for an io_uring slot.
    Queued,
    /// Reading or writing the chain.
    Transfer,
    /// `fallocate` with this mode in flight.
    Fallocate(i32),
    /// Writing zeroes from the zero buffer.
    Zeroes,
    /// `fdatasync` in flight.
    Sync,
}

#[derive(Debug)]
struct FileOp {
    io: Io,
    phase: Phase,
    /// Bytes moved so far.
    done: u64,
    /// Bytes the operation in flight carries.
    carried: u64,
    /// The io_uring slot it holds.
    slot: Option<u32>,
}

/// A file or block device. See the module docs.
#[derive(Debug)]
pub struct FileBdev {
    vol: Volume,
    leaf: u32,
    file: u32,
    ops: Vec<Option<FileOp>>,
    free_ops: Vec<u32>,
    /// Operations waiting for an io_uring slot, in order.
    queued: VecDeque<u32>,
    /// Ended without an io_uring operation (refusals), reported at the next poll.
    ready: Vec<Done>,
    zero_range_unsupported: bool,
    punch_unsupported: bool,
    error_log: RateLimiter,
}

impl FileBdev {
    /// A block device over a volume's backing store (checked by [`Volume::new`]).
    pub fn new(vol: Volume) -> Self {
        Self {
            vol,
            leaf: u32::MAX,
            file: u32::MAX,
            ops: Vec::new(),
            free_ops: Vec::new(),
            queued: VecDeque::new(),
            ready: Vec::new(),
            zero_range_unsupported: false,
            punch_unsupported: false,
            error_log: RateLimiter::new(10, Duration::from_secs(10)),
        }
    }

    /// The backing store.
    pub fn volume(&self) -> &Volume {
        &self.vol
    }

    fn op_mut(&mut self, i: u32) -> Option<&mut FileOp> {
        self.ops.get_mut(i as usize).and_then(Option::as_mut)
    }

    /// Ends operation `i`: frees its io_uring slot and reports it.
    fn end(&mut self, i: u32, status: u16, ctx: &mut Ctx<'_>, out: &mut Vec<Done>) {
        let Some(op) = self.ops.get_mut(i as usize).and_then(Option::take) else {
            return;
        };
        if let Some(s) = op.slot {
            ctx.uring_free.push(s);
        }
        self.free_ops.push(i);
        out.push(Done {
            token: op.io.token,
            status,
        });
    }

    /// Queues the next step of operation `i` in its current phase.
    fn step(&mut self, i: u32, ctx: &mut Ctx<'_>) -> Result<(), UringError> {
        let file = self.file;
        let mapped = self.vol.mapped();
        let Some(op) = self.ops.get_mut(i as usize).and_then(Option::as_mut) else {
            return Err(UringError::Refused("no such operation"));
        };
        let slot = op
            .slot
            .ok_or(UringError::Refused("operation without a slot"))? as usize;
        let chain = super::chain_of(ctx.chains, ctx.scratch, op.io.chain.id);
        match op.phase {
            Phase::Transfer | Phase::Zeroes => {
                let (dir, memory) = match (op.phase, op.io.op) {
                    (Phase::Zeroes, _) => (Dir::Write { dsync: false }, Memory::Zeroes),
                    (_, Op::Read) => (Dir::Read, Memory::Chain(chain)),
                    _ => (Dir::Write { dsync: op.io.fua }, Memory::Chain(chain)),
                };
                let skip = if op.phase == Phase::Zeroes {
                    op.done
                } else {
                    op.io.chain.skip + op.done
                };
                let t = Transfer {
                    file,
                    dir,
                    memory,
                    skip,
                    len: op.io.len - op.done,
                    offset: op.io.offset + op.done,
                    inline: mapped,
                };
                op.carried = ctx.uring.transfer(slot, t)?;
                Ok(())
            }
            Phase::Fallocate(mode) => {
                ctx.uring
                    .fallocate(slot, file, mode, op.io.offset, op.io.len)
            }
            Phase::Sync => ctx.uring.fdatasync(slot, file),
            Phase::Queued => Err(UringError::Refused("operation not started")),
        }
    }

    /// Gives queued operations the io_uring slots that are free, and starts them.
    fn start_queued(&mut self, ctx: &mut Ctx<'_>, out: &mut Vec<Done>) -> Result<(), UringError> {
        while let Some(&i) = self.queued.front() {
            let Some(slot) = ctx.uring_free.pop() else {
                break;
            };
            self.queued.pop_front();
            if let Some(owner) = ctx.uring_owner.get_mut(slot as usize) {
                *owner = (self.leaf, i);
            }
            let emulate = ctx.emulate_zeroes;
            let (zr, ph) = (self.zero_range_unsupported, self.punch_unsupported);
            let Some(op) = self.op_mut(i) else {
                ctx.uring_free.push(slot);
                continue;
            };
            op.slot = Some(slot);
            op.phase = match op.io.op {
                Op::Read | Op::Write => Phase::Transfer,
                Op::Flush => Phase::Sync,
                Op::WriteZeroes if emulate || zr => Phase::Zeroes,
                Op::Deallocate if emulate || ph => Phase::Zeroes,
                Op::WriteZeroes => {
                    Phase::Fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                }
                Op::Deallocate => {
                    Phase::Fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                }
            };
            if op.phase == Phase::Zeroes {
                ctx.stats.zero_writes += 1;
            }
            let r = self.step(i, ctx);
            self.issued(i, r, ctx, out)?;
        }
        Ok(())
    }

    /// The outcome of queueing a step: a refusal (a bug) fails the operation; a failing ring is
    /// the engine's error.
    fn issued(
        &mut self,
        i: u32,
        r: Result<(), UringError>,
        ctx: &mut Ctx<'_>,
        out: &mut Vec<Done>,
    ) -> Result<(), UringError> {
        match r {
            Ok(()) => Ok(()),
            Err(UringError::Refused(why)) => {
                tracing::error!(
                    volume = self.vol.name(),
                    why,
                    "io_uring refused an operation"
                );
                self.end(i, STATUS_INTERNAL, ctx, out);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// One io_uring operation of operation `i` finished with `res`.
    fn advance(
        &mut self,
        i: u32,
        res: i32,
        ctx: &mut Ctx<'_>,
        out: &mut Vec<Done>,
    ) -> Result<(), UringError> {
        let Some(op) = self.op_mut(i) else {
            tracing::error!(
                volume = self.vol.name(),
                op = i,
                res,
                "completion for no operation"
            );
            return Ok(());
        };
        let (phase, kind) = (op.phase, op.io.op);
        match phase {
            Phase::Transfer | Phase::Zeroes => {
                if res <= 0 {
                    let errno = if res == 0 { libc::EIO } else { -res };
                    let what = if res == 0 {
                        "no progress (end of the backing store)"
                    } else {
                        "I/O failed"
                    };
                    let kind = if phase == Phase::Zeroes {
                        Op::WriteZeroes
                    } else {
                        kind
                    };
                    self.log_error(i, errno, what);
                    self.end(i, request::errno_status(kind, errno), ctx, out);
                    return Ok(());
                }
                let n = u64::try_from(res).unwrap_or(0);
                if n < op.carried {
                    ctx.stats.short_transfers += 1;
                }
                op.done += n.min(op.io.len - op.done);
                if op.done < op.io.len {
                    let r = self.step(i, ctx);
                    return self.issued(i, r, ctx, out);
                }
                self.main_done(i, ctx, out)
            }
            Phase::Fallocate(mode) => {
                if res == -libc::EOPNOTSUPP {
                    let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
                    let flag = if punch {
                        &mut self.punch_unsupported
                    } else {
                        &mut self.zero_range_unsupported
                    };
                    if !*flag {
                        *flag = true;
                        tracing::info!(
                            volume = self.vol.name(),
                            op = kind.name(),
                            "fallocate unsupported by the backing store: writing zeroes instead"
                        );
                    }
                    ctx.stats.zero_writes += 1;
                    if let Some(op) = self.op_mut(i) {
                        op.phase = Phase::Zeroes;
                        op.done = 0;
                    }
                    let r = self.step(i, ctx);
                    self.issued(i, r, ctx, out)
                } else if res < 0 {
                    self.log_error(i, -res, "fallocate failed");
                    self.end(i, request::errno_status(kind, -res), ctx, out);
                    Ok(())
                } else {
                    self.main_done(i, ctx, out)
                }
            }
            Phase::Sync => {
                let status = if res < 0 {
                    self.log_error(i, -res, "fdatasync failed");
                    request::errno_status(Op::Flush, -res)
                } else {
                    STATUS_SUCCESS
                };
                self.end(i, status, ctx, out);
                Ok(())
            }
            Phase::Queued => {
                tracing::error!(
                    volume = self.vol.name(),
                    op = i,
                    "completion for a queued operation"
                );
                Ok(())
            }
        }
    }

    /// The main operation is done: a FUA write-zeroes or deallocate still needs its
    /// `fdatasync` (a FUA write was written with `RWF_DSYNC`); everything else ends.
    fn main_done(
        &mut self,
        i: u32,
        ctx: &mut Ctx<'_>,
        out: &mut Vec<Done>,
    ) -> Result<(), UringError> {
        let Some(op) = self.op_mut(i) else {
            return Ok(());
        };
        if op.io.fua && matches!(op.io.op, Op::WriteZeroes | Op::Deallocate) {
            op.phase = Phase::Sync;
            let r = self.step(i, ctx);
            return self.issued(i, r, ctx, out);
        }
        self.end(i, STATUS_SUCCESS, ctx, out);
        Ok(())
    }

    fn log_error(&mut self, i: u32, errno: i32, what: &str) {
        let Some(op) = self.ops.get(i as usize).and_then(Option::as_ref) else {
            return;
        };
        if let Some(suppressed) = self.error_log.check(Instant::now()) {
            tracing::warn!(
                volume = self.vol.name(),
                op = op.io.op.name(),
                offset = op.io.offset,
                len = op.io.len,
                errno,
                error = %nix::errno::Errno::from_raw(errno),
                suppressed,
                "{what}"
            );
        }
    }
}

impl Bdev for FileBdev {
    fn name(&self) -> &str {
        self.vol.name()
    }

    fn block_size(&self) -> u32 {
        self.vol.block_size()
    }

    fn size(&self) -> u64 {
        self.vol.blocks() * u64::from(self.vol.block_size())
    }

    fn attach(&mut self, ids: &mut Attach) {
        self.leaf = ids.leaf();
        self.file = ids.file();
    }

    fn files<'a>(&'a self, out: &mut Vec<BorrowedFd<'a>>) {
        out.push(self.vol.fd());
    }

    fn submit(&mut self, io: Io, ctx: &mut Ctx<'_>) {
        if !in_range(&io, self.block_size(), self.size()) {
            self.ready.push(Done {
                token: io.token,
                status: STATUS_LBA_OUT_OF_RANGE,
            });
            return;
        }
        if io.op != Op::Flush && io.len == 0 {
            self.ready.push(Done {
                token: io.token,
                status: STATUS_SUCCESS,
            });
            return;
        }
        let op = FileOp {
            io,
            phase: Phase::Queued,
            done: 0,
            carried: 0,
            slot: None,
        };
        let i = match self.free_ops.pop() {
            Some(i) => {
                self.ops[i as usize] = Some(op);
                i
            }
            None => {
                self.ops.push(Some(op));
                u32::try_from(self.ops.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.queued.push_back(i);
        // Start at once when a slot is free (the usual case): the operation goes out with
        // this turn's submit.
        let mut out = std::mem::take(&mut self.ready);
        if let Err(e) = self.start_queued(ctx, &mut out) {
            tracing::error!(volume = self.vol.name(), error = %e, "io_uring failed");
            // Fail what could not be queued; the engine notices the ring at its next submit.
            while let Some(i) = self.queued.pop_front() {
                self.end(i, STATUS_INTERNAL, ctx, &mut out);
            }
        }
        self.ready = out;
    }

    fn poll(&mut self, ctx: &mut Ctx<'_>, out: &mut Vec<Done>) -> bool {
        let mut progress = !self.ready.is_empty();
        out.append(&mut self.ready);
        let leaf = self.leaf as usize;
        let Some(inbox) = ctx.inbox.get_mut(leaf) else {
            return progress;
        };
        let mut got = std::mem::take(inbox);
        progress |= !got.is_empty();
        let mut failed = None;
        for &(i, res) in &got {
            if let Err(e) = self.advance(i, res, ctx, out) {
                failed = Some(e);
            }
        }
        got.clear();
        if let Some(inbox) = ctx.inbox.get_mut(leaf) {
            *inbox = got;
        }
        if let Err(e) = self.start_queued(ctx, out) {
            failed = Some(e);
        }
        if let Some(e) = failed {
            tracing::error!(volume = self.vol.name(), error = %e, "io_uring failed");
        }
        progress
    }

    fn busy(&self) -> bool {
        // Queued operations start when another operation frees a slot, which an io_uring
        // completion (a wakeup) brings; nothing here needs polling.
        !self.ready.is_empty()
    }

    fn inflight(&self) -> usize {
        self.ops.iter().filter(|o| o.is_some()).count() + self.ready.len()
    }
}
