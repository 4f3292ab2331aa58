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
//!
//! Integrity: a namespace formatted with metadata (8 bytes or more a block, in a separate
//! buffer) gets an integrity record ([`crate::integrity`]) in every block it is written: the
//! drive keeps a metadata slot of its own DMA memory per command tag (at an IOVA above the
//! pool's, never 0) that MPTR names; a write's records are computed from its data when it is
//! cut into pieces, a read's are checked against the data when it completes. A block whose
//! record disagrees fails the read with `STATUS_INTEGRITY` (a RAID device above then serves it
//! from redundancy) and is counted ([`Drive::integrity_errors`]). Pieces are cut so that a
//! command's metadata fits one slot.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use duplex_ipc::control::RateLimiter;
use duplex_ipc::desc::{
    STATUS_FENCED, STATUS_INTEGRITY, STATUS_INTERNAL, STATUS_LBA_OUT_OF_RANGE, STATUS_READ_ERROR,
    STATUS_RESERVATION_CONFLICT, STATUS_WRITE_FAULT,
};
use duplex_ipc::metrics::{Counter, Gauge, Histogram, Metric, Metrics};
use duplex_ipc::pool::Pool;
use duplex_ipc::topology::{DriveTransport, VolumeSpec};

use crate::bdev::{Io, Op as Kind, REPORT_VERDICTS};
use crate::fence::{mark_fenced, Fence, FenceKey, NvmeReservations};
use crate::integrity::{self, Verdict, RECORD_LEN};
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
/// Bytes of one command's metadata slot.
const MD_SLOT: usize = 4096;
/// Metadata slots: one per command tag the I/O queue can hold, and the last for the
/// synchronous commands.
const MD_SLOTS: usize = 257;
/// The synchronous commands' metadata slot.
const MD_SYNC: usize = MD_SLOTS - 1;

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
    /// When it went to the drive (kept only with metrics).
    sent: Option<Instant>,
    /// Drives with metadata: a write's records, a read's data to check (the pool chunks and
    /// the piece's first byte in them) and first LBA.
    md: Option<Box<PieceMd>>,
}

/// A piece's integrity work.
#[derive(Debug, Clone)]
struct PieceMd {
    lba: u64,
    /// A write's metadata (`ms` bytes a block); empty for a read.
    records: Vec<u8>,
    /// A read's chunks and where the piece starts in them.
    chunks: Vec<u32>,
    from: u64,
    /// A read whose blocks' verdicts are kept ([`Drive::take_verdicts`]).
    report: bool,
}

/// A drive's metadata format and slots.
#[derive(Debug)]
struct MdArea {
    /// Metadata bytes per block.
    ms: usize,
    /// The slots' memory ([`Controller::added_memory`] index).
    mem: usize,
    /// Blocks found bad so far.
    errors: u64,
    log: RateLimiter,
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
    /// Namespaces with metadata: integrity records.
    md: Option<MdArea>,
    /// Verdicts of reads that asked for them: (token, first LBA of the piece, per block).
    verdicts: Vec<(u64, u64, Vec<Verdict>)>,
    /// The drive's metrics, when the node keeps them.
    metrics: Option<DriveMetrics>,
}

/// A drive's metrics: commands and latency by operation (read, write, other), errors,
/// integrity mismatches, controller resets, and whether it is reachable.
#[derive(Debug)]
struct DriveMetrics {
    ops: [(Counter, Histogram); 3],
    errors: Counter,
    integrity: Counter,
    resets: Counter,
    up: Gauge,
}

impl DriveMetrics {
    fn new(m: &Metrics, drive: &str) -> Result<Self, duplex_ipc::metrics::MetricsError> {
        let op = |op: &str| -> Result<(Counter, Histogram), duplex_ipc::metrics::MetricsError> {
            let labels = [("drive", drive), ("op", op)];
            Ok((
                m.counter(Metric::DriveCommands, &labels)?,
                m.histogram(Metric::DriveLatency, &labels)?,
            ))
        };
        let labels = [("drive", drive)];
        Ok(Self {
            ops: [op("read")?, op("write")?, op("other")?],
            errors: m.counter(Metric::DriveErrors, &labels)?,
            integrity: m.counter(Metric::DriveIntegrityErrors, &labels)?,
            resets: m.counter(Metric::DriveResets, &labels)?,
            up: m.gauge(Metric::DriveUp, &labels)?,
        })
    }

    /// A command of `opcode` sent at `sent` is done.
    fn done(&self, opcode: u8, sent: Option<Instant>) {
        let i = match opcode {
            duplex_nvme::spec::io::READ => 0,
            duplex_nvme::spec::io::WRITE => 1,
            _ => 2,
        };
        let (count, latency) = &self.ops[i];
        count.inc();
        if let Some(at) = sent {
            latency.observe_ns(u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }
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
        if ns.metadata_size != 0
            && (ns.metadata_extended || usize::from(ns.metadata_size) < RECORD_LEN)
        {
            return Err(geometry(format!(
                "namespace {} is formatted with {} bytes of metadata per block ({}): duplex needs a format without metadata or with at least {RECORD_LEN} bytes in a separate buffer",
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
        let mut max_piece = if mdts == 0 {
            MAX_PIECE
        } else {
            mdts.min(MAX_PIECE)
        };
        let md = if ns.metadata_size == 0 {
            None
        } else {
            // The slots sit above the pool in the drive's address space, 2 MiB aligned.
            let ms = usize::from(ns.metadata_size);
            let iova = (POOL_IOVA + pool.region().len() as u64).next_multiple_of(1 << 21);
            let mem = DmaMem::create(
                &format!("duplex-drive-md-{}", spec.name),
                MD_SLOT * MD_SLOTS,
                iova,
            )
            .map_err(|e| ctl(e.into()))?;
            let mem = ctrl.add_memory(mem).map_err(ctl)?;
            max_piece = max_piece.min((MD_SLOT / ms) as u64 * u64::from(ns.block_size));
            Some(MdArea {
                ms,
                mem,
                errors: 0,
                log: RateLimiter::new(10, Duration::from_secs(10)),
            })
        };
        tracing::info!(
            volume = %spec.name,
            drive = %address,
            model = %ctrl.identity().model,
            serial = %ctrl.identity().serial,
            blocks = ns.blocks,
            block_size = ns.block_size,
            metadata = ns.metadata_size,
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
            md,
            verdicts: Vec::new(),
            metrics: None,
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
        let mut cmd = IoCmd::write(self.nsid, lba, blocks, self.block_size, true);
        if self.md.is_some() {
            let records = self.seal_slice(lba, data);
            cmd.sqe.mptr = self.put_md(MD_SYNC, &records)?;
        }
        let timeout = self.ctrl.timeout();
        let r = self.ctrl.exec_scratch(1, cmd, Some(data), None, timeout);
        self.sync_result(r)
    }

    /// Reads `out.len()` bytes (whole blocks, at most 64 KiB) at byte `offset`, waiting.
    pub fn read_sync(&mut self, offset: u64, out: &mut [u8]) -> Result<(), String> {
        let (lba, blocks) = self.sync_range(offset, out.len())?;
        let mut cmd = IoCmd::read(self.nsid, lba, blocks, self.block_size);
        if self.md.is_some() {
            cmd.sqe.mptr = self.md_iova(MD_SYNC)?;
        }
        let timeout = self.ctrl.timeout();
        let r = self
            .ctrl
            .exec_scratch(1, cmd, None, Some(&mut *out), timeout);
        self.sync_result(r)?;
        if let Some(ms) = self.md.as_ref().map(|m| m.ms) {
            let mut md = vec![0u8; ms * blocks as usize];
            self.get_md(MD_SYNC, &mut md)?;
            let bs = self.block_size as usize;
            for (i, block) in out.chunks(bs).enumerate() {
                let at = lba + i as u64;
                if integrity::verify(at, block, md.get(i * ms..).unwrap_or(&[])) == Verdict::Bad {
                    self.bad_block(at);
                    return Err(format!("block {at} fails its integrity check"));
                }
            }
        }
        Ok(())
    }

    /// The metadata of `data` (whole blocks) written from `lba`: a record a block.
    fn seal_slice(&self, lba: u64, data: &[u8]) -> Vec<u8> {
        let ms = self.md.as_ref().map_or(0, |m| m.ms);
        let bs = self.block_size as usize;
        let mut out = vec![0u8; ms * (data.len() / bs.max(1))];
        for (i, block) in data.chunks(bs).enumerate() {
            let r = integrity::seal(lba + i as u64, 0, block);
            if let Some(dst) = out.get_mut(i * ms..i * ms + RECORD_LEN) {
                dst.copy_from_slice(&r);
            }
        }
        out
    }

    /// The device address of metadata slot `slot`.
    fn md_iova(&self, slot: usize) -> Result<u64, String> {
        let m = self.md.as_ref().ok_or("no metadata format")?;
        let mem = self
            .ctrl
            .added_memory(m.mem)
            .ok_or("the metadata slots are not mapped")?;
        Ok(mem.iova_of(slot * MD_SLOT))
    }

    /// Puts `md` in slot `slot`; returns the slot's device address.
    fn put_md(&self, slot: usize, md: &[u8]) -> Result<u64, String> {
        let m = self.md.as_ref().ok_or("no metadata format")?;
        let mem = self
            .ctrl
            .added_memory(m.mem)
            .ok_or("the metadata slots are not mapped")?;
        if md.len() > MD_SLOT {
            return Err(format!("{} bytes of metadata do not fit a slot", md.len()));
        }
        mem.write(slot * MD_SLOT, md).map_err(|e| e.to_string())?;
        Ok(mem.iova_of(slot * MD_SLOT))
    }

    /// Reads slot `slot` into `out`.
    fn get_md(&self, slot: usize, out: &mut [u8]) -> Result<(), String> {
        let m = self.md.as_ref().ok_or("no metadata format")?;
        let mem = self
            .ctrl
            .added_memory(m.mem)
            .ok_or("the metadata slots are not mapped")?;
        mem.read(slot * MD_SLOT, out).map_err(|e| e.to_string())
    }

    /// Keeps the drive's metrics in `m` from now on.
    pub fn set_metrics(&mut self, m: &Metrics) {
        match DriveMetrics::new(m, &self.name) {
            Ok(dm) => {
                dm.up.set(u64::from(self.dead.is_none()));
                self.metrics = Some(dm);
            }
            Err(e) => {
                tracing::warn!(drive = %self.name, error = %e, "the drive's metrics are not kept")
            }
        }
    }

    /// Counts and logs a block that failed its check.
    fn bad_block(&mut self, lba: u64) {
        if let Some(dm) = &self.metrics {
            dm.integrity.inc();
        }
        if let Some(m) = &mut self.md {
            m.errors += 1;
            if let Some(suppressed) = m.log.check(Instant::now()) {
                tracing::warn!(
                    drive = %self.name,
                    lba,
                    suppressed,
                    errors = m.errors,
                    "a block read from the drive fails its integrity check"
                );
            }
        }
    }

    /// The verdicts kept for the pieces of I/O `token` (asked for with
    /// [`crate::bdev::REPORT_VERDICTS`]), in LBA order; empty when none were kept.
    pub fn take_verdicts(&mut self, token: u64) -> Vec<Verdict> {
        let mut mine: Vec<(u64, Vec<Verdict>)> = Vec::new();
        self.verdicts.retain_mut(|(t, lba, v)| {
            if *t == token {
                mine.push((*lba, std::mem::take(v)));
                false
            } else {
                true
            }
        });
        mine.sort_unstable_by_key(|m| m.0);
        mine.into_iter().flat_map(|m| m.1).collect()
    }

    /// Blocks whose integrity check failed so far (0 without a metadata format).
    pub fn integrity_errors(&self) -> u64 {
        self.md.as_ref().map_or(0, |m| m.errors)
    }

    /// Metadata bytes per block (0: none, no integrity records).
    pub fn metadata_size(&self) -> usize {
        self.md.as_ref().map_or(0, |m| m.ms)
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
        let ms = self.md.as_ref().map(|m| m.ms);
        let mut queue = |cmd: IoCmd,
                         segs: Vec<Seg>,
                         md: Option<Box<PieceMd>>,
                         backlog: &mut VecDeque<Piece>| {
            count += 1;
            backlog.push_back(Piece {
                token,
                cmd,
                segs,
                tries: 0,
                sent: None,
                md,
            });
        };
        match kind {
            Kind::Flush => queue(IoCmd::flush(self.nsid), Vec::new(), None, &mut self.backlog),
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
                    let md = match ms {
                        None => None,
                        Some(ms) => {
                            let mut md = piece_md(
                                pool,
                                chain,
                                io.chain.skip + at,
                                lba + at / bs,
                                blocks,
                                self.block_size as usize,
                                (kind == Kind::Write).then_some((ms, io.seq)),
                            )?;
                            md.report = kind == Kind::Read && io.seq == REPORT_VERDICTS;
                            Some(Box::new(md))
                        }
                    };
                    queue(cmd, segs, md, &mut self.backlog);
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
                    queue(cmd, Vec::new(), None, &mut self.backlog);
                    left -= n;
                    at += n;
                }
            }
        }
        Ok(count)
    }

    /// Submits what waits, rings, polls completions, checks timeouts. Pieces that are done
    /// (for good: retries exhausted or success) go to `out`. Returns whether anything moved.
    pub fn poll(&mut self, now: Instant, pool: &Pool, out: &mut Vec<Finished>) -> bool {
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
            let mut cmd = p.cmd;
            if let Some(md) = &p.md {
                // `Err(None)`: more tags out than slots (the queue is full): wait.
                let put = if tag >= MD_SYNC {
                    Err(None)
                } else if md.records.is_empty() {
                    self.md_iova(tag).map_err(Some)
                } else {
                    self.put_md(tag, &md.records).map_err(Some)
                };
                match put {
                    Ok(iova) => cmd.sqe.mptr = iova,
                    Err(None) => {
                        self.free_tags.push(tag);
                        self.backlog.push_front(p);
                        break;
                    }
                    Err(Some(e)) => {
                        self.free_tags.push(tag);
                        tracing::error!(drive = %self.name, error = %e, "cannot place a command's metadata");
                        out.push(Finished {
                            token: p.token,
                            status: STATUS_INTERNAL,
                        });
                        progress = true;
                        continue;
                    }
                }
            }
            match self.ctrl.submit(1, cmd, &p.segs, tag as u64) {
                Ok(()) => {
                    let mut p = p;
                    if self.metrics.is_some() {
                        p.sent = Some(now);
                    }
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
                    self.recover(&e.to_string(), pool, out);
                    return true;
                }
            }
        }
        if submitted {
            progress = true;
            if let Err(e) = self.ctrl.ring(1) {
                self.recover(&e.to_string(), pool, out);
                return true;
            }
        }
        let mut done = std::mem::take(&mut self.done);
        done.clear();
        if let Err(e) = self.ctrl.poll(1, &mut done) {
            self.settle(&mut done, pool, out);
            self.recover(&e.to_string(), pool, out);
            return true;
        }
        if now.duration_since(self.last_check) >= TIMEOUT_CHECK {
            self.last_check = now;
            if let Err(e) = self.ctrl.check_timeouts(now, &mut done) {
                self.settle(&mut done, pool, out);
                self.recover(&e.to_string(), pool, out);
                return true;
            }
        }
        progress |= !done.is_empty();
        self.settle(&mut done, pool, out);
        self.done = done;
        progress
    }

    /// Accounts finished commands: success or a final error goes out, a retriable error goes
    /// back to the backlog.
    fn settle(&mut self, done: &mut Vec<Done>, pool: &Pool, out: &mut Vec<Finished>) {
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
            if let Some(dm) = &self.metrics {
                dm.done(p.cmd.sqe.opcode, p.sent);
                if d.result.is_err() {
                    dm.errors.inc();
                }
            }
            match d.result {
                Ok(_) => {
                    let status = match &p.md {
                        Some(md) if !md.chunks.is_empty() => {
                            self.check_read(d.tag as usize, &p, md, pool)
                        }
                        _ => 0,
                    };
                    out.push(Finished {
                        token: p.token,
                        status,
                    });
                }
                Err(e) if e.retriable() && p.tries < RETRIES => {
                    tracing::warn!(drive = %self.name, error = %e, tries = p.tries + 1, "retrying a command");
                    self.retries += 1;
                    self.backlog.push_back(Piece {
                        tries: p.tries + 1,
                        sent: None,
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

    /// Checks the blocks a read piece brought into the pool against the records in the
    /// metadata slot of its tag: 0, or `STATUS_INTEGRITY` when any block is bad.
    fn check_read(&mut self, tag: usize, p: &Piece, md: &PieceMd, pool: &Pool) -> u16 {
        let Some(ms) = self.md.as_ref().map(|m| m.ms) else {
            return 0;
        };
        let bs = self.block_size as usize;
        let blocks = usize::try_from(p.cmd.len).unwrap_or(0) / bs.max(1);
        let mut records = vec![0u8; ms * blocks];
        if let Err(e) = self.get_md(tag, &mut records) {
            tracing::error!(drive = %self.name, error = %e, "cannot read a command's metadata");
            return STATUS_INTERNAL;
        }
        let mut block = vec![0u8; bs];
        let mut status = 0;
        let mut verdicts = Vec::new();
        for i in 0..blocks {
            let at = usize::try_from(md.from)
                .unwrap_or(usize::MAX)
                .saturating_add(i * bs);
            if pool.copy_out(&md.chunks, at, &mut block).is_err() {
                return STATUS_INTERNAL;
            }
            let lba = md.lba + i as u64;
            let record = records.get(i * ms..).unwrap_or(&[]);
            let v = integrity::verify(lba, &block, record);
            if v == Verdict::Bad {
                self.bad_block(lba);
                status = STATUS_INTEGRITY;
            }
            if md.report {
                verdicts.push(v);
            }
        }
        if md.report {
            self.verdicts.push((p.token, md.lba, verdicts));
        }
        status
    }

    /// The controller failed: reset it; what was outstanding comes back (to retry or fail).
    fn recover(&mut self, why: &str, pool: &Pool, out: &mut Vec<Finished>) {
        tracing::error!(drive = %self.name, %why, "drive controller failed; resetting it");
        if let Some(dm) = &self.metrics {
            dm.resets.inc();
        }
        let mut done = Vec::new();
        let r = self.ctrl.reset(&mut done);
        self.settle(&mut done, pool, out);
        if let Err(e) = r {
            tracing::error!(drive = %self.name, error = %e, "drive lost: it did not come back from a reset");
            self.dead = Some(e.to_string());
            if let Some(dm) = &self.metrics {
                dm.up.set(0);
            }
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

/// A read or write piece's integrity work: a write's records (`seal`: the metadata size and
/// the sequence number), sealed from its data now; a read's chunks to check later.
fn piece_md(
    pool: &Pool,
    chain: &[u32],
    from: u64,
    lba: u64,
    blocks: u32,
    bs: usize,
    seal: Option<(usize, u64)>,
) -> Result<PieceMd, u16> {
    let Some((ms, seq)) = seal else {
        return Ok(PieceMd {
            lba,
            records: Vec::new(),
            chunks: chain.to_vec(),
            from,
            report: false,
        });
    };
    let mut records = vec![0u8; ms * blocks as usize];
    let mut block = vec![0u8; bs];
    for i in 0..blocks as usize {
        let at = usize::try_from(from).map_err(|_| STATUS_INTERNAL)? + i * bs;
        pool.copy_out(chain, at, &mut block)
            .map_err(|_| STATUS_INTERNAL)?;
        let r = integrity::seal(lba + i as u64, seq, &block);
        records
            .get_mut(i * ms..i * ms + RECORD_LEN)
            .ok_or(STATUS_INTERNAL)?
            .copy_from_slice(&r);
    }
    Ok(PieceMd {
        lba,
        records,
        chunks: Vec::new(),
        from,
        report: false,
    })
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
