//! The controller: bring-up, queues, commands, completions, timeouts and reset.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use duplex_nvme::cmd::{Cqe, Sqe};
use duplex_nvme::resv;
use duplex_nvme::spec::{admin, cns, feat, io, reg};
use duplex_nvme::status::Status;

use super::dma::{DmaMem, PAGE};
use super::error::{CmdError, NvmeError};
use super::prp::{self, Seg};
use super::transport::Transport;

thread_local! {
    static WAIT_HOOK: RefCell<Option<Rc<dyn Fn()>>> = const { RefCell::new(None) };
}

/// Installs (`None`: removes) what the driver calls on this thread while it waits
/// synchronously: for CSTS.RDY when a controller is disabled, enabled or reset (bounded by
/// CAP.TO), for CSTS.SHST at shutdown, and for a synchronous command (bounded by its timeout).
/// The datapath installs its liveness heartbeat here, so a drive slow to reset (a power cut, a
/// hung firmware) is not mistaken for a hung datapath and the whole node's I/O killed with it.
pub fn set_wait_hook(hook: Option<Rc<dyn Fn()>>) {
    WAIT_HOOK.with(|h| *h.borrow_mut() = hook);
}

/// Calls the wait hook, if any.
fn waiting() {
    WAIT_HOOK.with(|h| {
        if let Some(f) = h.borrow().as_ref() {
            f();
        }
    });
}

/// Admin queue entries.
const ADMIN_ENTRIES: u16 = 32;
/// Scratch pages for admin and reservation data (Identify, log pages, reports).
const SCRATCH: usize = 16 * PAGE;
/// How often a waiting loop looks at CSTS.
const CSTS_POLL: Duration = Duration::from_millis(1);

/// What the driver asks of the controller.
#[derive(Debug, Clone)]
pub struct Options {
    /// I/O queue pairs wanted (the controller may grant fewer).
    pub io_queues: u16,
    /// Entries per I/O queue (capped by CAP.MQES).
    pub queue_entries: u16,
    /// A command outstanding this long is aborted (Abort command).
    pub timeout: Duration,
    /// An aborted command still outstanding this much later resets the controller.
    pub abort_timeout: Duration,
    /// Admin commands' timeout.
    pub admin_timeout: Duration,
    /// Host identifier (Set Features 81h, 128-bit) that reservations key this host by.
    pub host_id: Option<[u8; 16]>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            io_queues: 1,
            queue_entries: 128,
            timeout: Duration::from_secs(5),
            abort_timeout: Duration::from_secs(2),
            admin_timeout: Duration::from_secs(5),
            host_id: None,
        }
    }
}

impl Options {
    /// Bytes of DMA memory the driver needs for these options (pass a [`DmaMem`] at least
    /// this large).
    pub fn dma_len(&self) -> usize {
        Layout::new(self.io_queues.max(1), self.queue_entries).len
    }
}

/// Where queues, PRP list pages and scratch live in the driver's DMA memory.
#[derive(Debug, Clone)]
struct Layout {
    admin_sq: usize,
    admin_cq: usize,
    admin_prp: usize,
    scratch: usize,
    /// Per I/O queue: (SQ, CQ, PRP pages) offsets.
    io: Vec<(usize, usize, usize)>,
    len: usize,
}

impl Layout {
    fn new(queues: u16, entries: u16) -> Self {
        let pages = |bytes: usize| bytes.div_ceil(PAGE) * PAGE;
        let mut at = 0;
        let mut take = |bytes: usize| {
            let o = at;
            at += pages(bytes);
            o
        };
        let admin_sq = take(usize::from(ADMIN_ENTRIES) * 64);
        let admin_cq = take(usize::from(ADMIN_ENTRIES) * 16);
        let admin_prp = take(usize::from(ADMIN_ENTRIES - 1) * PAGE);
        let scratch = take(SCRATCH);
        let e = usize::from(entries.max(2));
        let io = (0..queues)
            .map(|_| (take(e * 64), take(e * 16), take((e - 1) * PAGE)))
            .collect();
        Self {
            admin_sq,
            admin_cq,
            admin_prp,
            scratch,
            io,
            len: at,
        }
    }
}

/// One outstanding-command slot (the command id is its index).
#[derive(Debug, Clone, Copy)]
struct Slot {
    busy: bool,
    tag: u64,
    deadline: Instant,
    aborting: bool,
}

/// A submission/completion queue pair.
#[derive(Debug)]
struct Queue {
    qid: u16,
    entries: u16,
    sq: usize,
    cq: usize,
    prp: usize,
    sq_tail: u16,
    sq_head: u16,
    cq_head: u16,
    phase: bool,
    unrung: bool,
    slots: Vec<Slot>,
    free: Vec<u16>,
}

impl Queue {
    fn new(qid: u16, entries: u16, sq: usize, cq: usize, prp: usize) -> Self {
        let now = Instant::now();
        let n = entries - 1;
        Self {
            qid,
            entries,
            sq,
            cq,
            prp,
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            unrung: false,
            slots: vec![
                Slot {
                    busy: false,
                    tag: 0,
                    deadline: now,
                    aborting: false,
                };
                usize::from(n)
            ],
            free: (0..n).rev().collect(),
        }
    }

    fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// A finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// The queue it ran on (0: admin).
    pub qid: u16,
    /// The caller's tag.
    pub tag: u64,
    /// Dword 0 of the completion, or why it failed.
    pub result: Result<u32, CmdError>,
}

/// What Identify Controller said that the driver uses.
#[derive(Debug, Clone)]
pub struct ControllerId {
    /// PCI vendor id.
    pub vid: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Controller id.
    pub cntlid: u16,
    /// Version (VER).
    pub version: u32,
    /// Maximum data transfer size in bytes (0: no limit).
    pub mdts_bytes: u64,
    /// Number of namespaces.
    pub nn: u32,
    /// Optional NVM command support.
    pub oncs: u16,
    /// Volatile write cache present.
    pub vwc: bool,
    /// The whole 4096-byte structure.
    pub raw: Vec<u8>,
}

/// What Identify Namespace said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceId {
    /// Namespace id.
    pub nsid: u32,
    /// Size in logical blocks.
    pub blocks: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Reservation capabilities (RESCAP).
    pub rescap: u8,
    /// Metadata bytes per block of the current LBA format (MS; 0: none).
    pub metadata_size: u16,
    /// Whether that metadata is interleaved with the data (FLBAS bit 4) rather than in a
    /// separate buffer.
    pub metadata_extended: bool,
}

/// A command for an I/O queue: the entry (without command id and data pointer) and the
/// number of bytes it moves.
#[derive(Debug, Clone, Copy)]
pub struct IoCmd {
    /// The submission entry.
    pub sqe: Sqe,
    /// Bytes transferred (0: no data).
    pub len: u64,
}

impl IoCmd {
    fn rw(opcode: u8, nsid: u32, lba: u64, blocks: u32, block_size: u32, fua: bool) -> Self {
        let mut sqe = Sqe {
            opcode,
            nsid,
            cdw10: lba as u32,
            cdw11: (lba >> 32) as u32,
            cdw12: blocks.saturating_sub(1) & 0xFFFF,
            ..Sqe::default()
        };
        if fua {
            sqe.cdw12 |= 1 << 30;
        }
        Self {
            sqe,
            len: u64::from(blocks) * u64::from(block_size),
        }
    }

    /// Read `blocks` (1..=65536) at `lba`.
    pub fn read(nsid: u32, lba: u64, blocks: u32, block_size: u32) -> Self {
        Self::rw(io::READ, nsid, lba, blocks, block_size, false)
    }

    /// Write `blocks` (1..=65536) at `lba`; `fua`: on the medium before completion.
    pub fn write(nsid: u32, lba: u64, blocks: u32, block_size: u32, fua: bool) -> Self {
        Self::rw(io::WRITE, nsid, lba, blocks, block_size, fua)
    }

    /// Write Zeroes of `blocks` at `lba` (no data).
    pub fn write_zeroes(nsid: u32, lba: u64, blocks: u32) -> Self {
        let mut c = Self::rw(io::WRITE_ZEROES, nsid, lba, blocks, 0, false);
        c.len = 0;
        c
    }

    /// Flush the volatile write cache (NSID FFFFFFFFh: every namespace).
    pub fn flush(nsid: u32) -> Self {
        Self {
            sqe: Sqe {
                opcode: io::FLUSH,
                nsid,
                ..Sqe::default()
            },
            len: 0,
        }
    }

    /// Dataset Management, deallocate (`ranges` 16-byte entries follow as data).
    pub fn deallocate(nsid: u32, ranges: u32) -> Self {
        Self {
            sqe: Sqe {
                opcode: io::DSM,
                nsid,
                cdw10: ranges.saturating_sub(1) & 0xFF,
                cdw11: 1 << 2,
                ..Sqe::default()
            },
            len: u64::from(ranges) * 16,
        }
    }

    /// Any command with `len` bytes of data.
    pub fn raw(sqe: Sqe, len: u64) -> Self {
        Self { sqe, len }
    }
}

/// Driver state of one controller.
#[derive(Debug)]
enum State {
    /// Queues up, commands flow.
    Live,
    /// Broken: a bad completion, a fatal status, a failed transport; only reset helps.
    Failed(String),
}

/// An NVMe controller driven from user space: polled completions, no interrupts.
pub struct Controller<T: Transport> {
    /// Declared (so dropped) before the memory: the device loses access first.
    t: T,
    mem: DmaMem,
    /// Data memory mapped for the device ([`Controller::add_memory`]), kept as long as `t`.
    extra: Vec<DmaMem>,
    opts: Options,
    layout: Layout,
    cap: u64,
    dstrd: u32,
    entries: u16,
    admin: Queue,
    io: Vec<Queue>,
    id: ControllerId,
    state: State,
    /// Completions found while waiting for something else.
    stash: Vec<Done>,
    /// PRP list entries of the command being submitted (reused).
    prp_list: Vec<u64>,
    next_tag: u64,
    resets: u64,
    /// Bringing the controller up: an admin command that times out fails the bring-up
    /// instead of resetting (which would bring it up again).
    bringing_up: bool,
}

impl<T: Transport> std::fmt::Debug for Controller<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("transport", &self.t.name())
            .field("cntlid", &self.id.cntlid)
            .field("io_queues", &self.io.len())
            .field("state", &self.state)
            .finish()
    }
}

/// Tags of the driver's own synchronous commands (callers use tags below this).
const SYNC_TAG: u64 = 1 << 63;

impl<T: Transport> Controller<T> {
    /// Brings the controller up: maps `mem`, disables, programs the admin queue, enables,
    /// identifies, sets the host identifier, and creates the I/O queues.
    pub fn new(mut t: T, mem: DmaMem, mut opts: Options) -> Result<Self, NvmeError> {
        // Bring-up creates at least one I/O queue; the layout must have room for it.
        opts.io_queues = opts.io_queues.max(1);
        let layout = Layout::new(opts.io_queues, opts.queue_entries);
        if mem.len() < layout.len {
            return Err(NvmeError::Unsupported(format!(
                "DMA memory of {} bytes; the queues need {}",
                mem.len(),
                layout.len
            )));
        }
        mem.map_for(&mut t)?;
        let cap = t.read64(reg::CAP)?;
        if cap & reg::CAP_CSS_NVM == 0 {
            return Err(NvmeError::Unsupported(format!(
                "CAP {cap:#x}: no NVM command set"
            )));
        }
        if reg::cap_mpsmin(cap) != 0 {
            return Err(NvmeError::Unsupported(format!(
                "CAP {cap:#x}: minimum page size above 4 KiB"
            )));
        }
        let mqes = reg::cap_mqes(cap);
        let entries = u16::try_from((mqes + 1).min(u32::from(opts.queue_entries)))
            .unwrap_or(u16::MAX)
            .max(2);
        let admin_entries = u16::try_from((mqes + 1).min(u32::from(ADMIN_ENTRIES)))
            .unwrap_or(ADMIN_ENTRIES)
            .max(2);
        let admin = Queue::new(
            0,
            admin_entries,
            layout.admin_sq,
            layout.admin_cq,
            layout.admin_prp,
        );
        let mut c = Self {
            t,
            mem,
            opts,
            layout,
            extra: Vec::new(),
            cap,
            dstrd: reg::cap_dstrd(cap),
            entries,
            admin,
            io: Vec::new(),
            id: ControllerId {
                vid: 0,
                serial: String::new(),
                model: String::new(),
                firmware: String::new(),
                cntlid: 0,
                version: 0,
                mdts_bytes: 0,
                nn: 0,
                oncs: 0,
                vwc: false,
                raw: Vec::new(),
            },
            state: State::Live,
            stash: Vec::new(),
            prp_list: Vec::with_capacity(prp::LIST_ENTRIES),
            next_tag: 0,
            resets: 0,
            bringing_up: false,
        };
        c.bring_up()?;
        Ok(c)
    }

    /// The transport (for tests and the owner's bookkeeping).
    pub fn transport(&mut self) -> &mut T {
        &mut self.t
    }

    /// The DMA memory (scratch data is read through it).
    pub fn memory(&self) -> &DmaMem {
        &self.mem
    }

    /// Maps `mem` for the device (data buffers: the pool, a test's buffers) and keeps it for
    /// as long as the controller lives; returns its index for [`Controller::added_memory`].
    pub fn add_memory(&mut self, mem: DmaMem) -> Result<usize, NvmeError> {
        mem.map_for(&mut self.t)?;
        self.extra.push(mem);
        Ok(self.extra.len() - 1)
    }

    /// Memory added with [`Controller::add_memory`].
    pub fn added_memory(&self, index: usize) -> Option<&DmaMem> {
        self.extra.get(index)
    }

    /// Identify Controller, as read at bring-up.
    pub fn identity(&self) -> &ControllerId {
        &self.id
    }

    /// CAP as read at bring-up.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// I/O queues granted (ids 1..=n).
    pub fn io_queues(&self) -> u16 {
        self.io.len() as u16
    }

    /// Entries per I/O queue (commands in flight per queue: one less).
    pub fn queue_entries(&self) -> u16 {
        self.entries
    }

    /// The command timeout the controller was brought up with.
    pub fn timeout(&self) -> Duration {
        self.opts.timeout
    }

    /// Controller resets done since bring-up.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Commands outstanding on I/O queue `qid`.
    pub fn outstanding(&self, qid: u16) -> usize {
        self.queue(qid).map(Queue::outstanding).unwrap_or(0)
    }

    fn queue(&self, qid: u16) -> Option<&Queue> {
        if qid == 0 {
            Some(&self.admin)
        } else {
            self.io.get(usize::from(qid) - 1)
        }
    }

    fn queue_mut(&mut self, qid: u16) -> Result<&mut Queue, NvmeError> {
        if qid == 0 {
            Ok(&mut self.admin)
        } else {
            self.io
                .get_mut(usize::from(qid) - 1)
                .ok_or(NvmeError::NoQueue(qid))
        }
    }

    fn live(&self) -> Result<(), NvmeError> {
        match &self.state {
            State::Live => Ok(()),
            State::Failed(why) => Err(NvmeError::Failed(why.clone())),
        }
    }

    fn fail(&mut self, why: String) {
        tracing::error!(controller = %self.t.name(), %why, "controller failed");
        self.state = State::Failed(why);
    }

    fn doorbell(&self, qid: u16, cq: bool) -> u64 {
        reg::DOORBELLS + (2 * u64::from(qid) + u64::from(cq)) * (4u64 << self.dstrd)
    }

    /// Waits until CSTS.RDY equals `ready` (CAP.TO bounds it), failing on CSTS.CFS.
    fn wait_ready(&mut self, ready: bool) -> Result<(), NvmeError> {
        let to = Duration::from_millis(500 * u64::from(reg::cap_to(self.cap).max(1)));
        let start = Instant::now();
        loop {
            let csts = self.t.read32(reg::CSTS)?;
            if csts != u32::MAX && (csts & reg::CSTS_RDY != 0) == ready {
                return Ok(());
            }
            if ready && csts != u32::MAX && csts & reg::CSTS_CFS != 0 {
                return Err(NvmeError::Fatal(csts));
            }
            if start.elapsed() > to {
                return Err(NvmeError::NotReady {
                    what: if ready { "ready" } else { "disabled" },
                    ms: to.as_millis() as u64,
                    csts,
                });
            }
            waiting();
            std::thread::sleep(CSTS_POLL);
        }
    }

    /// Disable, program the admin queue, enable, identify, host id, I/O queues.
    fn bring_up(&mut self) -> Result<(), NvmeError> {
        self.bringing_up = true;
        let r = self.bring_up_inner();
        self.bringing_up = false;
        r
    }

    fn bring_up_inner(&mut self) -> Result<(), NvmeError> {
        let cc = self.t.read32(reg::CC)?;
        if cc & reg::CC_EN != 0 {
            self.t.write32(reg::CC, cc & !reg::CC_EN)?;
        }
        self.wait_ready(false)?;
        let a = &self.admin;
        let (entries, sq, cq) = (a.entries, a.sq, a.cq);
        self.mem.zero(sq, usize::from(entries) * 64)?;
        self.mem.zero(cq, usize::from(entries) * 16)?;
        self.admin = Queue::new(0, entries, sq, cq, self.layout.admin_prp);
        let aqa = u32::from(entries - 1) | u32::from(entries - 1) << 16;
        self.t.write32(reg::AQA, aqa)?;
        self.t.write64(reg::ASQ, self.mem.iova_of(sq))?;
        self.t.write64(reg::ACQ, self.mem.iova_of(cq))?;
        let cc = reg::CC_EN | 6 << reg::CC_IOSQES_SHIFT | 4 << reg::CC_IOCQES_SHIFT;
        self.t.write32(reg::CC, cc)?;
        self.wait_ready(true)?;
        self.state = State::Live;

        let raw = self.identify(cns::CONTROLLER, 0)?;
        self.id = parse_controller(raw, self.cap);
        // The Host Identifier serves reservations only: a controller without them (ONCS bit 5
        // clear, as QEMU's NVMe) refuses the feature, and is driven without it (a node that
        // must fence with reservations is refused later, when it registers its key).
        if let Some(host) = self.opts.host_id {
            if self.id.oncs & duplex_nvme::identify::ONCS_RESERVATIONS != 0 {
                self.set_features_data(feat::HOST_ID, 1, &host)?;
            }
        }
        let want = u32::from(self.opts.io_queues.max(1) - 1);
        let got = self
            .admin_sync(
                "set features (number of queues)",
                Sqe {
                    opcode: admin::SET_FEATURES,
                    cdw10: u32::from(feat::NUM_QUEUES),
                    cdw11: want | want << 16,
                    ..Sqe::default()
                },
                None,
                None,
            )
            .map(|dw0| (dw0 & 0xFFFF).min(dw0 >> 16) + 1)?;
        let n = got.min(u32::from(self.opts.io_queues.max(1))) as u16;
        self.io.clear();
        for i in 0..n {
            let (sq, cq, prp) = self.layout.io[usize::from(i)];
            let qid = i + 1;
            self.mem.zero(sq, usize::from(self.entries) * 64)?;
            self.mem.zero(cq, usize::from(self.entries) * 16)?;
            let qsize = u32::from(self.entries - 1) << 16 | u32::from(qid);
            self.admin_sync(
                "create I/O completion queue",
                Sqe {
                    opcode: admin::CREATE_IO_CQ,
                    cdw10: qsize,
                    cdw11: 1, // physically contiguous, no interrupts
                    ..with_prp1(self.mem.iova_of(cq))
                },
                None,
                None,
            )?;
            self.admin_sync(
                "create I/O submission queue",
                Sqe {
                    opcode: admin::CREATE_IO_SQ,
                    cdw10: qsize,
                    cdw11: 1 | u32::from(qid) << 16, // physically contiguous, CQ = qid
                    ..with_prp1(self.mem.iova_of(sq))
                },
                None,
                None,
            )?;
            self.io.push(Queue::new(qid, self.entries, sq, cq, prp));
        }
        tracing::info!(
            controller = %self.t.name(),
            cntlid = self.id.cntlid,
            model = %self.id.model,
            io_queues = n,
            entries = self.entries,
            "NVMe controller ready"
        );
        Ok(())
    }

    /// Identify with CNS `cns` for `nsid`: the 4096-byte structure.
    pub fn identify(&mut self, cns: u8, nsid: u32) -> Result<Vec<u8>, NvmeError> {
        let mut out = vec![0u8; 4096];
        self.admin_sync(
            "identify",
            Sqe {
                opcode: admin::IDENTIFY,
                nsid,
                cdw10: u32::from(cns),
                ..Sqe::default()
            },
            None,
            Some(&mut out[..]),
        )?;
        Ok(out)
    }

    /// Identify Namespace `nsid`.
    pub fn namespace(&mut self, nsid: u32) -> Result<NamespaceId, NvmeError> {
        let b = self.identify(cns::NAMESPACE, nsid)?;
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let flbas = usize::from(b[26] & 0xF) | (usize::from(b[26] >> 5 & 3) << 4);
        let lbaf = b.get(128 + 4 * flbas..132 + 4 * flbas).unwrap_or(&[0; 4]);
        let lbads = u32::from(lbaf[2]);
        if !(9..=16).contains(&lbads) {
            return Err(NvmeError::Unsupported(format!(
                "namespace {nsid}: LBA data size 2^{lbads}"
            )));
        }
        Ok(NamespaceId {
            nsid,
            blocks: u64_at(0),
            block_size: 1 << lbads,
            rescap: b[31],
            metadata_size: u16::from_le_bytes([lbaf[0], lbaf[1]]),
            metadata_extended: b[26] & 0x10 != 0,
        })
    }

    /// Get Features `fid` (dword 11 `cdw11`): dword 0 of the completion.
    pub fn get_features(&mut self, fid: u8, cdw11: u32) -> Result<u32, NvmeError> {
        self.admin_sync(
            "get features",
            Sqe {
                opcode: admin::GET_FEATURES,
                cdw10: u32::from(fid),
                cdw11,
                ..Sqe::default()
            },
            None,
            None,
        )
    }

    /// Set Features `fid` with dword 11 `cdw11`: dword 0 of the completion.
    pub fn set_features(&mut self, fid: u8, cdw11: u32) -> Result<u32, NvmeError> {
        self.admin_sync(
            "set features",
            Sqe {
                opcode: admin::SET_FEATURES,
                cdw10: u32::from(fid),
                cdw11,
                ..Sqe::default()
            },
            None,
            None,
        )
    }

    fn set_features_data(&mut self, fid: u8, cdw11: u32, data: &[u8]) -> Result<u32, NvmeError> {
        self.admin_sync(
            "set features",
            Sqe {
                opcode: admin::SET_FEATURES,
                cdw10: u32::from(fid),
                cdw11,
                ..Sqe::default()
            },
            Some(data),
            None,
        )
    }

    /// Get Log Page `lid` (`len` bytes from `offset`, at most the scratch size).
    pub fn get_log_page(
        &mut self,
        lid: u8,
        nsid: u32,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, NvmeError> {
        let mut out = vec![0u8; len];
        let numd = (len / 4).saturating_sub(1) as u32;
        self.admin_sync(
            "get log page",
            Sqe {
                opcode: admin::GET_LOG_PAGE,
                nsid,
                cdw10: u32::from(lid) | (numd & 0xFFFF) << 16,
                cdw11: numd >> 16,
                cdw12: offset as u32,
                cdw13: (offset >> 32) as u32,
                ..Sqe::default()
            },
            None,
            Some(&mut out[..]),
        )?;
        Ok(out)
    }

    /// Runs one admin command to completion, data through the scratch pages (`input` copied in
    /// before, `output` filled after). Times out after the admin timeout.
    fn admin_sync(
        &mut self,
        what: &'static str,
        sqe: Sqe,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
    ) -> Result<u32, NvmeError> {
        let timeout = self.opts.admin_timeout;
        match self.exec_scratch(0, IoCmd::raw(sqe, 0), input, output, timeout)? {
            Ok(dw0) => Ok(dw0),
            Err(CmdError::TimedOut) => Err(NvmeError::AdminTimeout(what)),
            Err(error) => Err(NvmeError::Admin { what, error }),
        }
    }

    /// Runs one command on queue `qid` to completion, with its data (if any) in the scratch
    /// pages: `input` is copied there first, `output` filled from there afterwards. Other
    /// commands' completions seen meanwhile are kept for [`Controller::poll`]. The command
    /// result is the inner `Result`; the outer one is the controller's.
    pub fn exec_scratch(
        &mut self,
        qid: u16,
        mut cmd: IoCmd,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        timeout: Duration,
    ) -> Result<Result<u32, CmdError>, NvmeError> {
        let scratch = self.layout.scratch;
        let len = input
            .map(<[u8]>::len)
            .max(output.as_ref().map(|o| o.len()))
            .unwrap_or(0);
        if len > SCRATCH {
            return Err(NvmeError::TooLarge {
                bytes: len as u64,
                max: SCRATCH as u64,
            });
        }
        if len > 0 {
            self.mem.zero(scratch, len.next_multiple_of(PAGE))?;
            if let Some(i) = input {
                self.mem.write(scratch, i)?;
            }
            cmd.len = len as u64;
        }
        let segs = [Seg {
            iova: self.mem.iova_of(scratch),
            len: len as u32,
        }];
        let r = self.exec(qid, cmd, if len > 0 { &segs[..] } else { &[] }, timeout)?;
        if r.is_ok() {
            if let Some(o) = output {
                self.mem.read(scratch, o)?;
            }
        }
        Ok(r)
    }

    /// Runs one command on queue `qid` with data in `segs`, waiting for it (timeouts abort it,
    /// as for any command). Other completions seen meanwhile are kept for
    /// [`Controller::poll`].
    pub fn exec(
        &mut self,
        qid: u16,
        cmd: IoCmd,
        segs: &[Seg],
        timeout: Duration,
    ) -> Result<Result<u32, CmdError>, NvmeError> {
        let tag = SYNC_TAG | self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1) & !SYNC_TAG;
        self.submit_with_timeout(qid, cmd, segs, tag, timeout)?;
        self.ring(qid)?;
        let mut found = Vec::new();
        let mut spins = 0u32;
        loop {
            found.clear();
            // A step that fails must not lose what the earlier ones collected: other
            // callers' completions go to the stash whatever happens.
            let mut step = self.poll_queue(qid, &mut found);
            if step.is_ok() && qid != 0 {
                // An admin command waited on by nobody (an Abort) must not pile up.
                step = self.poll_queue(0, &mut found);
            }
            if step.is_ok() {
                step = self.check_timeouts_all(Instant::now(), &mut found);
            }
            let mut mine = None;
            for d in found.drain(..) {
                if d.tag == tag {
                    mine = Some(d.result);
                } else if d.tag & SYNC_TAG == 0 {
                    self.stash.push(d);
                }
            }
            if let Some(r) = mine {
                return Ok(r);
            }
            step?;
            if !matches!(self.state, State::Live) {
                self.live()?;
            }
            spins += 1;
            if spins < 1000 {
                std::thread::yield_now();
            } else {
                if spins % 1000 == 0 {
                    waiting();
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Queues a command on I/O queue `qid` (not yet visible to the controller: call
    /// [`Controller::ring`]). `tag` comes back in its [`Done`]; tags with the top bit set are
    /// the driver's own.
    pub fn submit(
        &mut self,
        qid: u16,
        cmd: IoCmd,
        segs: &[Seg],
        tag: u64,
    ) -> Result<(), NvmeError> {
        if qid == 0 {
            return Err(NvmeError::NoQueue(0));
        }
        let timeout = self.opts.timeout;
        self.submit_with_timeout(qid, cmd, segs, tag & !SYNC_TAG, timeout)
    }

    fn submit_with_timeout(
        &mut self,
        qid: u16,
        cmd: IoCmd,
        segs: &[Seg],
        tag: u64,
        timeout: Duration,
    ) -> Result<(), NvmeError> {
        self.live()?;
        let max = self.id.mdts_bytes;
        if max != 0 && cmd.len > max {
            return Err(NvmeError::TooLarge {
                bytes: cmd.len,
                max,
            });
        }
        let q = self.queue_mut(qid)?;
        let next_tail = (q.sq_tail + 1) % q.entries;
        if next_tail == q.sq_head {
            return Err(NvmeError::QueueFull(qid));
        }
        let Some(&cid) = q.free.last() else {
            return Err(NvmeError::QueueFull(qid));
        };
        let (sq_at, prp_page) = (
            q.sq + usize::from(q.sq_tail) * 64,
            q.prp + usize::from(cid) * PAGE,
        );
        let mut sqe = cmd.sqe;
        sqe.cid = cid;
        sqe.flags &= !0xC0; // PSDT 00b: PRPs
        if cmd.len > 0 {
            // Commands without data keep the caller's data pointer (a queue's base address).
            sqe.dptr = [0; 16];
            let (prp1, prp2) = prp::build(
                segs,
                cmd.len,
                self.mem.iova_of(prp_page),
                &mut self.prp_list,
            )?;
            if !self.prp_list.is_empty() {
                for e in &mut self.prp_list {
                    *e = e.to_le();
                }
                self.mem
                    .write(prp_page, bytemuck::cast_slice(&self.prp_list))?;
            }
            sqe.dptr[0..8].copy_from_slice(&prp1.to_le_bytes());
            sqe.dptr[8..16].copy_from_slice(&prp2.to_le_bytes());
        }
        self.mem.write_sqe(sq_at, &sqe)?;
        let q = self.queue_mut(qid)?;
        q.free.pop();
        q.slots[usize::from(cid)] = Slot {
            busy: true,
            tag,
            deadline: Instant::now() + timeout,
            aborting: false,
        };
        q.sq_tail = next_tail;
        q.unrung = true;
        Ok(())
    }

    /// Tells the controller about the commands queued on `qid` since the last ring (one
    /// doorbell write for the batch).
    pub fn ring(&mut self, qid: u16) -> Result<(), NvmeError> {
        let q = self.queue_mut(qid)?;
        if !q.unrung {
            return Ok(());
        }
        q.unrung = false;
        let tail = q.sq_tail;
        let db = self.doorbell(qid, false);
        if let Err(e) = self.t.write32(db, u32::from(tail)) {
            self.fail(format!("SQ {qid} doorbell: {e}"));
            return Err(e.into());
        }
        Ok(())
    }

    /// Collects finished commands of I/O queue `qid` (and those found earlier while waiting)
    /// into `out`; returns how many were added. An error means the controller failed: call
    /// [`Controller::reset`], which reports every command still outstanding.
    pub fn poll(&mut self, qid: u16, out: &mut Vec<Done>) -> Result<usize, NvmeError> {
        if qid == 0 {
            // The admin queue holds only the driver's own commands (reaped by exec and
            // check_timeouts).
            return Err(NvmeError::NoQueue(0));
        }
        let before = out.len();
        let stash = std::mem::take(&mut self.stash);
        for d in stash {
            if d.qid == qid {
                out.push(d);
            } else {
                self.stash.push(d);
            }
        }
        match self.poll_queue(qid, out) {
            // What was found is delivered; the failure shows on the next call.
            Err(_) if out.len() > before => {}
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        Ok(out.len() - before)
    }

    fn poll_queue(&mut self, qid: u16, out: &mut Vec<Done>) -> Result<(), NvmeError> {
        self.live()?;
        let mut reaped = 0;
        let bad = loop {
            let q = self.queue_mut(qid)?;
            let at = q.cq + usize::from(q.cq_head) * 16;
            let phase = q.phase;
            let Some(cqe) = self.mem.read_cqe(at, phase)? else {
                break None;
            };
            let q = self.queue_mut(qid)?;
            q.cq_head += 1;
            if q.cq_head == q.entries {
                q.cq_head = 0;
                q.phase = !q.phase;
            }
            reaped += 1;
            if let Err(why) = Self::take(q, &cqe, out) {
                break Some(why);
            }
        };
        if reaped > 0 {
            let head = self.queue_mut(qid)?.cq_head;
            let db = self.doorbell(qid, true);
            if let Err(e) = self.t.write32(db, u32::from(head)) {
                self.fail(format!("CQ {qid} doorbell: {e}"));
                return Err(e.into());
            }
        }
        if let Some(why) = bad {
            let e = NvmeError::BadCompletion { qid, why };
            self.fail(e.to_string());
            return Err(e);
        }
        Ok(())
    }

    /// Accounts one completion entry of queue `q`; an entry that cannot be ours is an error.
    fn take(q: &mut Queue, cqe: &Cqe, out: &mut Vec<Done>) -> Result<(), String> {
        if cqe.sqid != q.qid {
            return Err(format!("entry names SQ {} (cid {})", cqe.sqid, cqe.cid));
        }
        // The head only moves forward, from the last one reported up to the tail.
        let n = u32::from(q.entries);
        let used = (u32::from(q.sq_tail) + n - u32::from(q.sq_head)) % n;
        let moved = (u32::from(cqe.sqhd) + n - u32::from(q.sq_head)) % n;
        if cqe.sqhd >= q.entries || moved > used {
            return Err(format!(
                "SQ head {} outside {}..={} ({} entries)",
                cqe.sqhd, q.sq_head, q.sq_tail, q.entries
            ));
        }
        let slot = match q.slots.get_mut(usize::from(cqe.cid)) {
            Some(s) if s.busy => s,
            _ => return Err(format!("no command {} outstanding", cqe.cid)),
        };
        let aborting = slot.aborting;
        slot.busy = false;
        let tag = slot.tag;
        q.free.push(cqe.cid);
        q.sq_head = cqe.sqhd;
        let status = cqe.status();
        let result = match CmdError::from_status(status) {
            None => Ok(cqe.dw0),
            Some(_) if aborting && status.sct() == 0 && status.sc() == 0x07 => {
                Err(CmdError::TimedOut)
            }
            Some(e) => Err(e),
        };
        out.push(Done {
            qid: q.qid,
            tag,
            result,
        });
        Ok(())
    }

    /// Handles commands past their deadline: the first time, an Abort command; an aborted
    /// command still outstanding past its second deadline resets the controller, which
    /// completes every outstanding command with [`CmdError::Reset`] into `out`.
    pub fn check_timeouts(&mut self, now: Instant, out: &mut Vec<Done>) -> Result<(), NvmeError> {
        let mut all = Vec::new();
        let r = self.check_timeouts_all(now, &mut all);
        out.extend(all.into_iter().filter(|d| d.tag & SYNC_TAG == 0));
        r
    }

    /// [`Controller::check_timeouts`], the driver's own commands included in `out`.
    fn check_timeouts_all(&mut self, now: Instant, out: &mut Vec<Done>) -> Result<(), NvmeError> {
        if !matches!(self.state, State::Live) {
            return Ok(());
        }
        // Completed Aborts (nobody waits for them) free their admin slots here.
        self.poll_queue(0, out)?;
        let mut abort = Vec::new();
        let mut reset = false;
        for q in std::iter::once(&mut self.admin).chain(self.io.iter_mut()) {
            for (cid, s) in q.slots.iter_mut().enumerate() {
                if !s.busy || s.deadline > now {
                    continue;
                }
                if q.qid == 0 && self.bringing_up {
                    // Bring-up fails instead (the caller sees the admin timeout).
                    s.busy = false;
                    q.free.push(cid as u16);
                    out.push(Done {
                        qid: 0,
                        tag: s.tag,
                        result: Err(CmdError::TimedOut),
                    });
                } else if q.qid == 0 {
                    // An admin command that does not complete: only a reset helps.
                    reset = true;
                } else if s.aborting {
                    reset = true;
                } else {
                    s.aborting = true;
                    s.deadline = now + self.opts.abort_timeout;
                    abort.push((q.qid, cid as u16));
                }
            }
        }
        for (qid, cid) in abort {
            tracing::warn!(controller = %self.t.name(), qid, cid, "command timed out; aborting it");
            let tag = SYNC_TAG | self.next_tag;
            self.next_tag = self.next_tag.wrapping_add(1) & !SYNC_TAG;
            let sqe = Sqe {
                opcode: admin::ABORT,
                cdw10: u32::from(qid) | u32::from(cid) << 16,
                ..Sqe::default()
            };
            let timeout = self.opts.abort_timeout;
            match self.submit_with_timeout(0, IoCmd::raw(sqe, 0), &[], tag, timeout) {
                Ok(()) => self.ring(0)?,
                // No room for the Abort: the reset at the second deadline handles it.
                Err(NvmeError::QueueFull(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if reset {
            tracing::warn!(controller = %self.t.name(), "aborted command still outstanding; resetting the controller");
            self.reset_all(out)?;
        }
        Ok(())
    }

    /// Resets the controller (CC.EN 1 → 0 → 1) and recreates its queues. Every outstanding
    /// command completes into `out` with [`CmdError::Reset`]; if the controller does not come
    /// back, the error says why and it stays failed (later commands fail fast).
    pub fn reset(&mut self, out: &mut Vec<Done>) -> Result<(), NvmeError> {
        let mut all = Vec::new();
        let r = self.reset_all(&mut all);
        out.extend(all.into_iter().filter(|d| d.tag & SYNC_TAG == 0));
        r
    }

    /// [`Controller::reset`], the driver's own commands included in `out`.
    fn reset_all(&mut self, out: &mut Vec<Done>) -> Result<(), NvmeError> {
        self.resets += 1;
        let mut lost = Vec::new();
        for q in std::iter::once(&mut self.admin).chain(self.io.iter_mut()) {
            for s in q.slots.iter_mut().filter(|s| s.busy) {
                s.busy = false;
                lost.push((q.qid, s.tag));
            }
        }
        self.state = State::Live;
        let r = self.bring_up();
        let why = if r.is_ok() {
            CmdError::Reset
        } else {
            CmdError::ControllerLost
        };
        out.extend(lost.into_iter().map(|(qid, tag)| Done {
            qid,
            tag,
            result: Err(why.clone()),
        }));
        match r {
            Ok(()) => {
                tracing::info!(controller = %self.t.name(), resets = self.resets, "controller reset done");
                Ok(())
            }
            Err(e) => {
                self.fail(format!("reset: {e}"));
                self.io.clear();
                Err(e)
            }
        }
    }

    /// Reservation Register on namespace `nsid` through I/O queue `qid`.
    pub fn resv_register(
        &mut self,
        qid: u16,
        nsid: u32,
        r: &resv::Register,
    ) -> Result<Result<(), CmdError>, NvmeError> {
        self.resv_cmd(qid, nsid, resv::opc::REGISTER, r.cdw10(), &r.data())
    }

    /// Reservation Acquire (acquire, preempt, preempt and abort).
    pub fn resv_acquire(
        &mut self,
        qid: u16,
        nsid: u32,
        a: &resv::Acquire,
    ) -> Result<Result<(), CmdError>, NvmeError> {
        self.resv_cmd(qid, nsid, resv::opc::ACQUIRE, a.cdw10(), &a.data())
    }

    /// Reservation Release (release, clear).
    pub fn resv_release(
        &mut self,
        qid: u16,
        nsid: u32,
        r: &resv::Release,
    ) -> Result<Result<(), CmdError>, NvmeError> {
        self.resv_cmd(qid, nsid, resv::opc::RELEASE, r.cdw10(), &r.data())
    }

    fn resv_cmd(
        &mut self,
        qid: u16,
        nsid: u32,
        opcode: u8,
        cdw10: u32,
        data: &[u8],
    ) -> Result<Result<(), CmdError>, NvmeError> {
        let sqe = Sqe {
            opcode,
            nsid,
            cdw10,
            ..Sqe::default()
        };
        let timeout = self.opts.timeout;
        Ok(self
            .exec_scratch(qid, IoCmd::raw(sqe, 0), Some(data), None, timeout)?
            .map(drop))
    }

    /// Reservation Report (extended data structure: 128-bit host identifiers): the raw
    /// report of at most `len` bytes (a multiple of 4, at most the scratch size).
    pub fn resv_report(
        &mut self,
        qid: u16,
        nsid: u32,
        len: usize,
    ) -> Result<Result<Vec<u8>, CmdError>, NvmeError> {
        let len = len.clamp(4, SCRATCH) & !3;
        let sqe = Sqe {
            opcode: resv::opc::REPORT,
            nsid,
            cdw10: (len / 4 - 1) as u32,
            cdw11: 1, // EDS
            ..Sqe::default()
        };
        let mut out = vec![0u8; len];
        let timeout = self.opts.timeout;
        Ok(self
            .exec_scratch(qid, IoCmd::raw(sqe, 0), None, Some(&mut out[..]), timeout)?
            .map(|_| out))
    }

    /// Orderly shutdown (CC.SHN normal, wait for CSTS.SHST complete, bounded by CAP.TO).
    pub fn shutdown(&mut self) -> Result<(), NvmeError> {
        let cc = self.t.read32(reg::CC)?;
        self.t.write32(reg::CC, cc | 1 << reg::CC_SHN_SHIFT)?;
        let to = Duration::from_millis(500 * u64::from(reg::cap_to(self.cap).max(1)));
        let start = Instant::now();
        loop {
            let csts = self.t.read32(reg::CSTS)?;
            if csts & reg::CSTS_SHST_MASK == reg::CSTS_SHST_COMPLETE {
                return Ok(());
            }
            if start.elapsed() > to {
                return Err(NvmeError::NotReady {
                    what: "shut down",
                    ms: to.as_millis() as u64,
                    csts,
                });
            }
            waiting();
            std::thread::sleep(CSTS_POLL);
        }
    }
}

fn with_prp1(iova: u64) -> Sqe {
    let mut s = Sqe::default();
    s.dptr[0..8].copy_from_slice(&iova.to_le_bytes());
    s
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

fn parse_controller(raw: Vec<u8>, cap: u64) -> ControllerId {
    let u16_at = |o: usize| u16::from_le_bytes([raw[o], raw[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
    let mdts = raw[77];
    let page = 4096u64 << reg::cap_mpsmin(cap);
    let mdts_bytes = if mdts == 0 || mdts > 20 {
        0
    } else {
        page << mdts
    };
    ControllerId {
        vid: u16_at(0),
        serial: ascii(&raw[4..24]),
        model: ascii(&raw[24..64]),
        firmware: ascii(&raw[64..72]),
        cntlid: u16_at(78),
        version: u32_at(80),
        mdts_bytes,
        nn: u32_at(516),
        oncs: u16_at(520),
        vwc: raw[525] & 1 != 0,
        raw,
    }
}

/// Status of a completion, for tests that look at raw entries.
pub fn status_of(cqe: &Cqe) -> Status {
    cqe.status()
}
