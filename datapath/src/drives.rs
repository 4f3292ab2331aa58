//! Volumes on NVMe drives: the engine's side of the user-space driver ([`crate::nvme`]).
//!
//! Each drive is one controller (one I/O queue pair, polled by the engine's thread) with the
//! buffer pool mapped for its DMA at [`POOL_IOVA`]: a read or write moves data between the
//! drive and the pool chunks of the request's chain directly, the chunks described with PRPs.
//! A request becomes one or more *pieces* (one NVMe command each: transfers are cut at the
//! drive's maximum transfer size, Write Zeroes at 65536 blocks); the request completes when all
//! its pieces have.
//!
//! Errors: a retriable failure (a timeout that was aborted, a controller reset, a status
//! without Do Not Retry) is retried up to [`RETRIES`] times; anything else fails the request
//! with the status the fabric reports to the host: Reservation Conflict stays Reservation
//! Conflict (the node has been fenced off the drive), media errors stay media errors, a lost
//! controller is an internal error (retriable: the host may try another path). A controller
//! that fails (bad completion, transport gone) is reset; if it does not come back, the drive
//! is dead and every request on it fails.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use duplex_ipc::desc::{
    STATUS_FENCED, STATUS_INTERNAL, STATUS_LBA_OUT_OF_RANGE, STATUS_READ_ERROR,
    STATUS_RESERVATION_CONFLICT, STATUS_WRITE_FAULT,
};
use duplex_ipc::pool::Pool;
use duplex_ipc::topology::{DriveTransport, VolumeSpec};

use crate::bdev::{Io, Op as Kind};
use crate::fence::{mark_fenced, Fence, FenceKey, NvmeReservations};
use crate::nvme::vfio_kernel::KernelVfio;
use crate::nvme::vfio_user::VfioUser;
use crate::nvme::{
    AnyTransport, CmdError, Controller, DmaMem, Done, IoCmd, NvmeError, Options, Seg,
};

/// Where the buffer pool sits in a drive's DMA address space (below 2^39, the smallest IOMMU
/// address width QEMU and most hardware give).
pub const POOL_IOVA: u64 = 1 << 32;
/// Times a retriable piece is tried again.
pub const RETRIES: u8 = 3;
/// How often outstanding commands are checked for timeouts.
const TIMEOUT_CHECK: Duration = Duration::from_millis(10);
/// The largest piece when the drive sets no limit (the driver's one PRP list page allows a
/// little more).
const MAX_PIECE: u64 = 1 << 20;
/// Timeout of the vfio-user request/reply exchanges.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors bringing a drive up.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The resources handed over do not make a drive.
    #[error("Volume {volume}: {why}")]
    Resources {
        /// Volume.
        volume: String,
        /// What is wrong.
        why: String,
    },
    /// The controller did not come up, or its namespace does not fit the volume.
    #[error("Volume {volume} on drive {address}: {error}")]
    Controller {
        /// Volume.
        volume: String,
        /// Socket or PCI address.
        address: String,
        /// Why.
        error: NvmeError,
    },
    /// The namespace does not match the volume's geometry.
    #[error("Volume {volume} on drive {address}: {why}")]
    Geometry {
        /// Volume.
        volume: String,
        /// Socket or PCI address.
        address: String,
        /// What differs.
        why: String,
    },
}

/// The fds duplexd hands over for one drive volume.
#[derive(Debug)]
pub enum DriveFds {
    /// The connected vfio-user stream.
    User(OwnedFd),
    /// Kernel VFIO: container, group, device.
    Kernel {
        /// `/dev/vfio/vfio` with the group attached.
        container: OwnedFd,
        /// `/dev/vfio/N`.
        group: OwnedFd,
        /// The device.
        device: OwnedFd,
    },
}

/// One NVMe command of a request.
#[derive(Debug, Clone)]
struct Piece {
    token: u64,
    cmd: IoCmd,
    segs: Vec<Seg>,
    tries: u8,
}

/// One drive.
#[derive(Debug)]
pub struct Drive {
    name: String,
    ctrl: Controller<AnyTransport>,
    nsid: u32,
    block_size: u32,
    blocks: u64,
    max_piece: u64,
    /// Pieces in flight, by tag.
    inflight: Vec<Option<Piece>>,
    free_tags: Vec<usize>,
    /// Pieces waiting for room on the queue.
    backlog: VecDeque<Piece>,
    /// Why the drive is dead (its controller did not come back from a reset).
    dead: Option<String>,
    last_check: Instant,
    /// Retried pieces (for the logs and tests).
    retries: u64,
    /// Completions of one poll (reused).
    done: Vec<Done>,
    /// This node's cluster reservation key (0: standalone): a Reservation Conflict then means
    /// the node was fenced ([`crate::fence::mark_fenced`]).
    fence_key: u64,
}

/// A piece (or a request's share of it) that finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// The token of the I/O the piece belongs to.
    pub token: u64,
    /// The descriptor status (`STATUS_SUCCESS` or the error's).
    pub status: u16,
}

impl Drive {
    /// Brings up the drive behind `spec` (before the sandbox): connects the controller over the
    /// handed-over fds, maps its DMA memory and the pool, identifies the namespace and checks it
    /// holds the volume.
    pub fn open(spec: &VolumeSpec, fds: DriveFds, pool: &Pool) -> Result<Self, DriveError> {
        let volume = spec.name.clone();
        let address = spec.path.clone();
        let bad = |why: String| DriveError::Resources {
            volume: volume.clone(),
            why,
        };
        let Some(d) = &spec.drive else {
            return Err(bad("not a drive volume".into()));
        };
        let ctl = |error: NvmeError| DriveError::Controller {
            volume: volume.clone(),
            address: address.clone(),
            error,
        };
        let t = match (d.transport, fds) {
            (DriveTransport::VfioUser, DriveFds::User(fd)) => {
                let mut t =
                    VfioUser::from_stream(UnixStream::from(fd), address.clone(), SOCKET_TIMEOUT)
                        .map_err(|e| ctl(e.into()))?;
                t.fix_timeouts();
                AnyTransport::User(t)
            }
            (
                DriveTransport::Vfio,
                DriveFds::Kernel {
                    container,
                    group,
                    device,
                },
            ) => {
                let t = KernelVfio::from_fds(container, device, Some(group), &address)
                    .map_err(|e| ctl(e.into()))?;
                if !t.bar0_mapped() {
                    // Register access would need pread/pwrite, which the sandbox does not allow.
                    return Err(bad("BAR0 cannot be mapped".into()));
                }
                AnyTransport::Kernel(t)
            }
            _ => return Err(bad("the handed-over fds do not match the transport".into())),
        };
        let opts = Options {
            io_queues: 1,
            queue_entries: 256,
            host_id: Some(d.host_id),
            ..Options::default()
        };
        let mem = DmaMem::create(&format!("duplex-drive-{}", spec.name), opts.dma_len(), 0)
            .map_err(|e| ctl(e.into()))?;
        let mut ctrl = Controller::new(t, mem, opts).map_err(ctl)?;
        let pool_fd = pool
            .region()
            .try_clone_fd()
            .map_err(|e| bad(format!("cannot share the buffer pool: {e}")))?;
        if pool.chunk_size() % 4096 != 0 {
            return Err(bad(format!(
                "pool chunks of {} bytes: a drive volume needs chunks of whole 4 KiB pages",
                pool.chunk_size()
            )));
        }
        let pool_mem =
            DmaMem::map(pool_fd, pool.region().len(), POOL_IOVA).map_err(|e| ctl(e.into()))?;
        ctrl.add_memory(pool_mem).map_err(ctl)?;
        let ns = ctrl.namespace(d.nsid).map_err(ctl)?;
        let geometry = |why: String| DriveError::Geometry {
            volume: volume.clone(),
            address: address.clone(),
            why,
        };
        if ns.block_size != spec.block_size {
            return Err(geometry(format!(
                "namespace {} has {}-byte blocks, the volume {}-byte ones",
                d.nsid, ns.block_size, spec.block_size
            )));
        }
        if ns.metadata_size != 0 {
            // Commands would need a metadata buffer this driver does not give yet.
            return Err(geometry(format!(
                "namespace {} is formatted with {} bytes of metadata per block ({}): only formats without metadata are supported yet",
                d.nsid,
                ns.metadata_size,
                if ns.metadata_extended { "interleaved" } else { "separate buffer" }
            )));
        }
        if ns.blocks < spec.blocks {
            return Err(geometry(format!(
                "namespace {} holds {} blocks, the volume needs {}",
                d.nsid, ns.blocks, spec.blocks
            )));
        }
        if d.fence_key != 0 {
            // A cluster member: this node and boot's key on the drive, and the cluster's
            // reservation on it, before anything is served.
            let key = FenceKey(d.fence_key);
            let drive = NvmeReservations::new(spec.name.clone(), &mut ctrl, 1, d.nsid);
            Fence::new(vec![drive], key)
                .join()
                .map_err(|e| bad(format!("cannot join the cluster's reservation: {e}")))?;
        }
        let mdts = ctrl.identity().mdts_bytes;
        let max_piece = if mdts == 0 {
            MAX_PIECE
        } else {
            mdts.min(MAX_PIECE)
        };
        tracing::info!(
            volume = %spec.name,
            drive = %address,
            model = %ctrl.identity().model,
            serial = %ctrl.identity().serial,
            blocks = ns.blocks,
            block_size = ns.block_size,
            "drive volume ready"
        );
        Ok(Self {
            name: spec.name.clone(),
            ctrl,
            nsid: d.nsid,
            block_size: ns.block_size,
            blocks: spec.blocks,
            max_piece: max_piece / u64::from(ns.block_size) * u64::from(ns.block_size),
            inflight: Vec::new(),
            free_tags: Vec::new(),
            backlog: VecDeque::new(),
            dead: None,
            last_check: Instant::now(),
            retries: 0,
            done: Vec::new(),
            fence_key: d.fence_key,
        })
    }

    /// Name (the volume's, for logs).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Logical block size of the namespace.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Blocks of the namespace the volume uses.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether commands are in flight or waiting.
    pub fn busy(&self) -> bool {
        !self.backlog.is_empty() || self.free_tags.len() < self.inflight.len()
    }

    /// Whether the drive belongs to a cluster member (its key is registered on it).
    pub fn is_cluster_drive(&self) -> bool {
        self.fence_key != 0
    }

    /// Whether the drive is dead (its controller did not come back).
    pub fn is_dead(&self) -> bool {
        self.dead.is_some()
    }

    /// Writes `data` (whole blocks, at most 64 KiB) at byte `offset` with FUA, waiting for it
    /// on the I/O queue (other commands' completions are kept for the engine's poll). For the
    /// disk heartbeat: a conflict there fences the node as any other would.
    pub fn write_sync(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let (lba, blocks) = self.sync_range(offset, data.len())?;
        let cmd = IoCmd::write(self.nsid, lba, blocks, self.block_size, true);
        let timeout = self.ctrl.timeout();
        let r = self.ctrl.exec_scratch(1, cmd, Some(data), None, timeout);
        self.sync_result(r)
    }

    /// Reads `out.len()` bytes (whole blocks, at most 64 KiB) at byte `offset`, waiting.
    pub fn read_sync(&mut self, offset: u64, out: &mut [u8]) -> Result<(), String> {
        let (lba, blocks) = self.sync_range(offset, out.len())?;
        let cmd = IoCmd::read(self.nsid, lba, blocks, self.block_size);
        let timeout = self.ctrl.timeout();
        let r = self.ctrl.exec_scratch(1, cmd, None, Some(out), timeout);
        self.sync_result(r)
    }

    fn sync_range(&self, offset: u64, len: usize) -> Result<(u64, u32), String> {
        if let Some(why) = &self.dead {
            return Err(format!("drive dead: {why}"));
        }
        let bs = u64::from(self.block_size);
        let len = len as u64;
        if offset % bs != 0 || len % bs != 0 || len == 0 {
            return Err(format!(
                "{len} bytes at {offset} are not whole {bs}-byte blocks"
            ));
        }
        if (offset + len) / bs > self.blocks {
            return Err(format!("{len} bytes at {offset} are past the end"));
        }
        Ok((offset / bs, (len / bs) as u32))
    }

    fn sync_result(&mut self, r: Result<Result<u32, CmdError>, NvmeError>) -> Result<(), String> {
        match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                let conflict =
                    matches!(e, CmdError::ReservationConflict | CmdError::PreemptAborted);
                if conflict && self.fence_key != 0 {
                    mark_fenced(&self.name, &e);
                }
                Err(e.to_string())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// The drive's reservations, for fencing the peer ([`crate::fence::Fence`]).
    pub fn reservations(&mut self) -> NvmeReservations<'_, AnyTransport> {
        NvmeReservations::new(self.name.clone(), &mut self.ctrl, 1, self.nsid)
    }

    /// Pieces retried so far.
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Starts an I/O: cuts it into pieces and submits them. `chain` holds the pool chunks of a
    /// read or write (the I/O's data starts `io.chain.skip` bytes into it). Returns how many
    /// pieces were made (the I/O's outstanding count); `Err(status)` when it fails at once.
    pub(crate) fn start(&mut self, io: &Io, chain: &[u32], pool: &Pool) -> Result<u32, u16> {
        if let Some(why) = &self.dead {
            tracing::debug!(drive = %self.name, %why, "request on a dead drive");
            return Err(STATUS_INTERNAL);
        }
        let queued = self.backlog.len();
        let r = self.queue_pieces(io, chain, pool);
        if r.is_err() {
            // Nothing of a request that cannot be described goes to the drive.
            self.backlog.truncate(queued);
        }
        r
    }

    /// Cuts a request into commands and queues them on the backlog; returns how many.
    fn queue_pieces(&mut self, io: &Io, chain: &[u32], pool: &Pool) -> Result<u32, u16> {
        let (kind, len, fua, token) = (io.op, io.len, io.fua, io.token);
        let bs = u64::from(self.block_size);
        let lba = io.offset / bs;
        let mut count = 0u32;
        let mut queue = |cmd: IoCmd, segs: Vec<Seg>, backlog: &mut VecDeque<Piece>| {
            count += 1;
            backlog.push_back(Piece {
                token,
                cmd,
                segs,
                tries: 0,
            });
        };
        match kind {
            Kind::Flush => queue(IoCmd::flush(self.nsid), Vec::new(), &mut self.backlog),
            Kind::Read | Kind::Write => {
                let mut at = 0;
                while at < len {
                    let n = self.max_piece.min(len - at);
                    let blocks = u32::try_from(n / bs).map_err(|_| STATUS_INTERNAL)?;
                    let cmd = if kind == Kind::Read {
                        IoCmd::read(self.nsid, lba + at / bs, blocks, self.block_size)
                    } else {
                        IoCmd::write(self.nsid, lba + at / bs, blocks, self.block_size, fua)
                    };
                    let segs =
                        chain_segs(pool, chain, io.chain.skip + at, n).ok_or(STATUS_INTERNAL)?;
                    queue(cmd, segs, &mut self.backlog);
                    at += n;
                }
            }
            Kind::WriteZeroes | Kind::Deallocate => {
                let mut left = len / bs;
                let mut at = lba;
                while left > 0 {
                    let n = left.min(1 << 16);
                    let mut cmd = IoCmd::write_zeroes(self.nsid, at, n as u32);
                    if kind == Kind::Deallocate {
                        cmd.sqe.cdw12 |= 1 << 25; // DEAC: deallocate (reads return zeroes)
                    }
                    if fua {
                        cmd.sqe.cdw12 |= 1 << 30;
                    }
                    queue(cmd, Vec::new(), &mut self.backlog);
                    left -= n;
                    at += n;
                }
            }
        }
        Ok(count)
    }

    /// Submits what waits, rings, polls completions, checks timeouts. Pieces that are done
    /// (for good: retries exhausted or success) go to `out`. Returns whether anything moved.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Finished>) -> bool {
        let mut progress = false;
        if let Some(why) = &self.dead {
            // Fail whatever still waits.
            let why = why.clone();
            while let Some(p) = self.backlog.pop_front() {
                tracing::debug!(drive = %self.name, %why, "failing a piece on a dead drive");
                out.push(Finished {
                    token: p.token,
                    status: STATUS_INTERNAL,
                });
                progress = true;
            }
            return progress;
        }
        let mut submitted = false;
        while let Some(p) = self.backlog.pop_front() {
            let tag = match self.free_tags.pop() {
                Some(t) => t,
                None => {
                    self.inflight.push(None);
                    self.inflight.len() - 1
                }
            };
            match self.ctrl.submit(1, p.cmd, &p.segs, tag as u64) {
                Ok(()) => {
                    self.inflight[tag] = Some(p);
                    submitted = true;
                }
                Err(NvmeError::QueueFull(_)) => {
                    self.free_tags.push(tag);
                    self.backlog.push_front(p);
                    break;
                }
                Err(e) => {
                    self.free_tags.push(tag);
                    self.backlog.push_front(p);
                    self.recover(&e.to_string(), out);
                    return true;
                }
            }
        }
        if submitted {
            progress = true;
            if let Err(e) = self.ctrl.ring(1) {
                self.recover(&e.to_string(), out);
                return true;
            }
        }
        let mut done = std::mem::take(&mut self.done);
        done.clear();
        if let Err(e) = self.ctrl.poll(1, &mut done) {
            self.settle(&mut done, out);
            self.recover(&e.to_string(), out);
            return true;
        }
        if now.duration_since(self.last_check) >= TIMEOUT_CHECK {
            self.last_check = now;
            if let Err(e) = self.ctrl.check_timeouts(now, &mut done) {
                self.settle(&mut done, out);
                self.recover(&e.to_string(), out);
                return true;
            }
        }
        progress |= !done.is_empty();
        self.settle(&mut done, out);
        self.done = done;
        progress
    }

    /// Accounts finished commands: success or a final error goes out, a retriable error goes
    /// back to the backlog.
    fn settle(&mut self, done: &mut Vec<Done>, out: &mut Vec<Finished>) {
        for d in done.drain(..) {
            let Some(p) = usize::try_from(d.tag)
                .ok()
                .and_then(|t| self.inflight.get_mut(t))
                .and_then(Option::take)
            else {
                tracing::error!(drive = %self.name, tag = d.tag, "completion for no piece");
                continue;
            };
            self.free_tags.push(d.tag as usize);
            match d.result {
                Ok(_) => out.push(Finished {
                    token: p.token,
                    status: 0,
                }),
                Err(e) if e.retriable() && p.tries < RETRIES => {
                    tracing::warn!(drive = %self.name, error = %e, tries = p.tries + 1, "retrying a command");
                    self.retries += 1;
                    self.backlog.push_back(Piece {
                        tries: p.tries + 1,
                        ..p
                    });
                }
                Err(e) => {
                    let mut status = status_of(&e);
                    let preempted =
                        matches!(e, CmdError::ReservationConflict | CmdError::PreemptAborted);
                    if preempted && self.fence_key != 0 {
                        // The peer took this node's key away: stop serving everything.
                        mark_fenced(&self.name, &e);
                        status = STATUS_FENCED;
                    } else if e == CmdError::ReservationConflict {
                        tracing::error!(drive = %self.name, "reservation conflict: this node is fenced off the drive");
                    } else {
                        tracing::warn!(drive = %self.name, error = %e, status, "command failed");
                    }
                    out.push(Finished {
                        token: p.token,
                        status,
                    });
                }
            }
        }
    }

    /// The controller failed: reset it; what was outstanding comes back (to retry or fail).
    fn recover(&mut self, why: &str, out: &mut Vec<Finished>) {
        tracing::error!(drive = %self.name, %why, "drive controller failed; resetting it");
        let mut done = Vec::new();
        let r = self.ctrl.reset(&mut done);
        self.settle(&mut done, out);
        if let Err(e) = r {
            tracing::error!(drive = %self.name, error = %e, "drive lost: it did not come back from a reset");
            self.dead = Some(e.to_string());
            // Nothing is outstanding any more; fail what waits.
            for p in std::mem::take(&mut self.inflight).into_iter().flatten() {
                out.push(Finished {
                    token: p.token,
                    status: STATUS_INTERNAL,
                });
            }
            self.free_tags.clear();
            while let Some(p) = self.backlog.pop_front() {
                out.push(Finished {
                    token: p.token,
                    status: STATUS_INTERNAL,
                });
            }
        }
    }
}

/// The descriptor status of a final command error.
fn status_of(e: &CmdError) -> u16 {
    match e {
        CmdError::ReservationConflict => STATUS_RESERVATION_CONFLICT,
        CmdError::LbaOutOfRange => STATUS_LBA_OUT_OF_RANGE,
        CmdError::ReadError => STATUS_READ_ERROR,
        CmdError::WriteFault => STATUS_WRITE_FAULT,
        CmdError::Status(s) => (u16::from(s.sct()) << 8) | u16::from(s.sc()),
        CmdError::PreemptAborted => 0x001B,
        // The host may retry elsewhere (internal errors are the retriable status).
        CmdError::TimedOut | CmdError::Reset | CmdError::ControllerLost => STATUS_INTERNAL,
    }
}

/// The device-address segments of bytes `[from, from + len)` of a chain of pool chunks.
fn chain_segs(pool: &Pool, chain: &[u32], from: u64, len: u64) -> Option<Vec<Seg>> {
    let cs = pool.chunk_size() as u64;
    let mut segs = Vec::new();
    let mut at = from;
    let end = from.checked_add(len)?;
    while at < end {
        let k = usize::try_from(at / cs).ok()?;
        let h = *chain.get(k)?;
        let within = at % cs;
        let n = (cs - within).min(end - at);
        let base = pool.chunk_offset(h)? as u64;
        segs.push(Seg {
            iova: POOL_IOVA + base + within,
            len: u32::try_from(n).ok()?,
        });
        at += n;
    }
    Some(segs)
}
