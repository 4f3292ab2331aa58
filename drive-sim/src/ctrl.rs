//! One NVMe over PCIe controller (one port of the drive): BAR0 registers, admin and I/O queues,
//! command fetch, execution and completion.
//!
//! The glue calls [`Controller::read_reg`] / [`Controller::write_reg`] for BAR0 accesses and
//! [`Controller::process`] after every register write, when [`Progress::next_due`] passes, and
//! when the drive's [`crate::Waker`] for this controller fires; it signals the MSI-X vectors in
//! [`Progress::irqs`].
//!
//! # Register access rules
//!
//! * Accesses must be 4 or 8 bytes, naturally aligned, inside [`BAR0_SIZE`]; anything else is a
//!   [`RegError`] and has no effect. An 8-byte access is two 4-byte accesses, low dword first,
//!   so CAP, ASQ and ACQ may be accessed whole or as halves (and an 8-byte doorbell write sets a
//!   queue's SQ tail then its CQ head).
//! * Reserved and unimplemented registers below 0x1000 (NSSR, CMB, BP, PMR, ...) read as zero
//!   and ignore writes; so do writes to read-only registers (CAP, VS, CSTS). Doorbells read as
//!   zero.
//! * INTMS/INTMC set and clear a mask over [`Progress::irqs`] (both read back the mask): a
//!   masked vector's interrupt is held and reported once unmasked. (They are meant for pin and
//!   MSI interrupts; a host using MSI-X never touches them.)
//! * CC.EN 0→1 validates the configuration: CSS must be 000b (NVM), MPS 0 (4 KiB pages), AMS
//!   000b (round robin), AQA's queue sizes at least 2 entries; ASQ and ACQ are page aligned by
//!   construction (their bits 11:0 are reserved and read as zero). A bad configuration sets
//!   CSTS.CFS and leaves RDY 0 (as QEMU does); the host recovers by clearing EN. IOSQES and
//!   IOCQES are checked when I/O queues are created (they must be 6 and 4 then; otherwise
//!   Invalid Queue Size). A valid configuration creates the admin queues and sets RDY at once.
//! * CC.EN 1→0 is a Controller Level Reset: every queue is deleted, delayed commands and
//!   outstanding Asynchronous Event Requests are dropped without completions, features revert
//!   to their defaults (including the host identifier and the reservation notification mask),
//!   pending events and reservation notifications are discarded, CSTS.RDY and CSTS.CFS clear.
//!   Registrations and the reservation belong to the namespace and stay.
//! * CC.SHN 00b→01b/10b: the cache is destaged (whatever faults say), CSTS.SHST becomes 10b
//!   (complete) and the controller processes nothing more until it is reset; CC.SHN back to
//!   00b clears SHST, as does enabling.
//! * While the drive has no power, registers read as after a power-on reset (CSTS = 0) and
//!   writes are ignored.
//!
//! # Doorbells
//!
//! Doorbells are honoured only while CSTS.RDY is 1 and CSTS.CFS is 0 (ignored otherwise). A
//! write to the doorbell of a queue that does not exist, an SQ tail or CQ head not below the
//! queue size, or a CQ head beyond the last entry posted is ignored (the queue is unchanged)
//! and raises an Error asynchronous event (type 0h, information 00h Write to Invalid Doorbell
//! Register or 01h Invalid Doorbell Write Value, log page 01h) with an Error Information log
//! entry, as the specification describes and QEMU does. The controller keeps running.
//!
//! # Flow control
//!
//! Each `process` fetches at most [`FETCH_BURST`] commands per submission queue (the admin
//! queue first, then the I/O queues round robin from a rotating start). A queue is not fetched
//! while its completion queue has completions waiting for room, nor while it has as many
//! delayed commands as it has entries: the host sees its SQ head stop moving, as with a real
//! controller out of resources. A completion that finds its CQ full is held and posted, in
//! order, once the host's CQ head doorbell makes room.
//!
//! A DMA fault while fetching a command or posting a completion sets CSTS.CFS: the controller
//! stops until reset. A DMA fault on a command's data is Data Transfer Error for that command.

mod admin;
mod nvm;

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use duplex_nvme::cmd::{Cqe, Sqe};
use duplex_nvme::spec::{aen, lid, reg};
use duplex_nvme::status::{generic, Status};

use crate::dma::Dma;
use crate::drive::{Drive, DriveState};
use crate::limited;
use crate::prp::{self, Segment};

/// Size of BAR0: registers and the doorbells of the admin queue and up to
/// [`crate::drive::MAX_IO_QUEUES`] I/O queues.
pub const BAR0_SIZE: u64 = 16 * 1024;

/// Most interrupt vectors a controller uses ([`Progress::irqs`] is a 64-bit mask).
pub const MAX_IRQ_VECTORS: u16 = 64;

/// Most commands fetched from one submission queue per [`Controller::process`] call.
pub const FETCH_BURST: u32 = 64;

/// PCI vendor id reported in Identify Controller (VID and SSVID); the glue's PCI configuration
/// space should use the same.
pub const PCI_VENDOR_ID: u16 = 0x1d1d;

/// Version reported by VS and Identify Controller: NVMe 1.4.
pub const VERSION: u32 = 0x0001_0400;

/// CAP.TO: worst-case time to ready, in 500 ms units.
const CAP_TO: u64 = 2;
/// Asynchronous Event Request Limit (zero-based): four outstanding AERs.
const AERL: u8 = 3;
/// Abort Command Limit (zero-based).
const ACL: u8 = 3;
/// Error Log Page Entries (zero-based).
const ELPE: u8 = 63;
/// Memory page size (CC.MPS = 0 is the only one supported).
const PAGE_SIZE: u64 = 4096;
/// Size of a submission queue entry.
const SQE_SIZE: u64 = 64;
/// Size of a completion queue entry.
const CQE_SIZE: u64 = 16;

/// Status codes `duplex_nvme::status` does not define (yet).
pub(crate) mod more_status {
    use duplex_nvme::status::Status;
    /// Invalid Interrupt Vector (command specific 08h).
    pub const INVALID_INTERRUPT_VECTOR: Status = Status::new(1, 0x08).dnr();
    /// Feature Not Changeable (command specific 0Eh).
    pub const FEATURE_NOT_CHANGEABLE: Status = Status::new(1, 0x0E).dnr();
}

/// A refused BAR0 access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegError {
    /// Only 4- and 8-byte accesses are supported.
    #[error("{len}-byte register access at {offset:#x}: only 4 and 8 bytes are supported")]
    Size {
        /// Offset in BAR0.
        offset: u64,
        /// Access size.
        len: usize,
    },
    /// The access is not naturally aligned.
    #[error("{len}-byte register access at {offset:#x} is not naturally aligned")]
    Alignment {
        /// Offset in BAR0.
        offset: u64,
        /// Access size.
        len: usize,
    },
    /// The access is (partly) outside BAR0.
    #[error("{len}-byte register access at {offset:#x} is outside BAR0")]
    Range {
        /// Offset in BAR0.
        offset: u64,
        /// Access size.
        len: usize,
    },
}

/// What a [`Controller::process`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Something happened: a command was fetched, executed or completed.
    pub worked: bool,
    /// When the earliest delayed command of this controller is due (call `process` then).
    pub next_due: Option<Instant>,
    /// Interrupt vectors to signal (bit n: vector n), for completion queues created with
    /// interrupts enabled (the admin CQ always is, on vector 0), minus vectors masked by INTMS.
    pub irqs: u64,
}

/// A completion to post.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Completion {
    pub sqid: u16,
    pub cqid: u16,
    /// SQ head to report if the SQ no longer exists when this is posted.
    pub sqhd: u16,
    pub cid: u16,
    pub dw0: u32,
    pub status: Status,
}

#[derive(Clone, Debug)]
struct Sq {
    base: u64,
    size: u32,
    head: u32,
    tail: u32,
    cqid: u16,
}

#[derive(Clone, Debug)]
struct Cq {
    base: u64,
    size: u32,
    head: u32,
    tail: u32,
    phase: bool,
    ien: bool,
    iv: u16,
    /// Completions waiting for room.
    held: VecDeque<Completion>,
    /// Submission queues using this CQ.
    users: u32,
}

impl Cq {
    fn full(&self) -> bool {
        (self.tail + 1) % self.size == self.head
    }
}

/// Feature values kept by the controller (the host identifier and reservation notification
/// mask live in the drive, where the other port can see them).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Features {
    arbitration: u32,
    power: u32,
    temp_over: u16,
    temp_under: u16,
    error_recovery: u32,
    /// Allocated I/O submission / completion queues, zero-based.
    nsqa: u16,
    ncqa: u16,
    irq_coalescing: u32,
    async_config: u32,
}

impl Features {
    fn new(max_queues: u16) -> Self {
        Self {
            arbitration: 0,
            power: 0,
            temp_over: 0x157, // 70 C, WCTEMP
            temp_under: 0,
            error_recovery: 0,
            nsqa: max_queues.saturating_sub(1),
            ncqa: max_queues.saturating_sub(1),
            irq_coalescing: 0,
            async_config: 0,
        }
    }
}

/// An NVMe over PCIe controller: one port of the dual-ported drive.
///
/// The controller id is chosen by the glue (e.g. 1 and 2 for the two ports) and must be
/// unique among the drive's live controllers: it is what Identify Controller and Reservation
/// Report show, and it keys the controller's record in the drive. Creating a controller
/// attaches it to the drive; dropping it detaches it (its delayed commands vanish).
pub struct Controller {
    drive: Arc<Drive>,
    cntlid: u16,
    epoch: u64,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    intms: u32,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    feat: Features,
    /// Outstanding Asynchronous Event Requests (CIDs), oldest first.
    aers: VecDeque<u16>,
    /// Events not yet reported (completion dword 0 values).
    events: VecDeque<u32>,
    /// Event types (bit per type) reported and not yet cleared by reading their log page.
    masked_events: u8,
    /// Error Information log entries, newest first.
    errors: VecDeque<[u8; 64]>,
    error_count: u64,
    irq_pending: u64,
    rr: usize,
}

impl fmt::Debug for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Controller")
            .field("cntlid", &self.cntlid)
            .field("cc", &format_args!("{:#x}", self.cc))
            .field("csts", &format_args!("{:#x}", self.csts))
            .finish_non_exhaustive()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.drive.lock().ctrls.remove(&self.cntlid);
    }
}

/// Little-endian u64 from the first 8 bytes of `b` (0 if shorter).
pub(crate) fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(..8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Writes `v` little-endian at `off` of `b` if it fits.
pub(crate) fn put(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(off..off + v.len()) {
        d.copy_from_slice(v);
    }
}

impl Controller {
    /// Controller `cntlid` of `drive`, in its power-on reset state (CC.EN 0).
    pub fn new(drive: Arc<Drive>, cntlid: u16) -> Controller {
        let (epoch, max) = {
            let mut st = drive.lock();
            st.ctrl(cntlid).reset();
            (st.epoch, drive.config().max_queues)
        };
        let n = usize::from(max) + 1;
        Controller {
            cntlid,
            epoch,
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            intms: 0,
            sqs: vec![None; n],
            cqs: vec![None; n],
            feat: Features::new(max),
            aers: VecDeque::new(),
            events: VecDeque::new(),
            masked_events: 0,
            errors: VecDeque::new(),
            error_count: 0,
            irq_pending: 0,
            rr: 0,
            drive,
        }
    }

    /// The controller id.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }

    /// The drive.
    pub fn drive(&self) -> &Arc<Drive> {
        &self.drive
    }

    /// Interrupt vectors the controller may use (the glue's MSI-X table size):
    /// `min(max_queues + 1, 64)`. Create I/O Completion Queue rejects higher vectors.
    pub fn irq_vectors(&self) -> u16 {
        self.drive
            .config()
            .max_queues
            .saturating_add(1)
            .min(MAX_IRQ_VECTORS)
    }

    fn max_queues(&self) -> u16 {
        self.drive.config().max_queues
    }

    /// CAP.
    fn cap(&self) -> u64 {
        u64::from(self.drive.config().mqes.saturating_sub(1))
            | reg::CAP_CQR
            | (CAP_TO << 24)
            | reg::CAP_CSS_NVM
    }

    /// Reads BAR0 at `offset` into `buf` (4 or 8 bytes; see the module documentation).
    pub fn read_reg(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), RegError> {
        check_access(offset, buf.len())?;
        {
            let drive = Arc::clone(&self.drive);
            let mut st = drive.lock();
            self.sync(&mut st);
        }
        for (i, chunk) in buf.chunks_exact_mut(4).enumerate() {
            let v = self.read32(offset + 4 * i as u64);
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    /// Writes `data` (4 or 8 bytes) to BAR0 at `offset` (see the module documentation).
    pub fn write_reg(&mut self, offset: u64, data: &[u8]) -> Result<(), RegError> {
        check_access(offset, data.len())?;
        let drive = Arc::clone(&self.drive);
        let mut st = drive.lock();
        self.sync(&mut st);
        if st.powered {
            for (i, chunk) in data.chunks_exact(4).enumerate() {
                let mut b = [0u8; 4];
                b.copy_from_slice(chunk);
                self.write32(&mut st, offset + 4 * i as u64, u32::from_le_bytes(b));
            }
        }
        let wakers = st.take_wakers();
        drop(st);
        for w in wakers {
            w();
        }
        Ok(())
    }

    fn read32(&self, off: u64) -> u32 {
        let cap = self.cap();
        match off {
            0x00 => cap as u32,
            0x04 => (cap >> 32) as u32,
            reg::VS => VERSION,
            reg::INTMS | reg::INTMC => self.intms,
            reg::CC => self.cc,
            reg::CSTS => self.csts,
            reg::AQA => self.aqa,
            0x28 => self.asq as u32,
            0x2C => (self.asq >> 32) as u32,
            0x30 => self.acq as u32,
            0x34 => (self.acq >> 32) as u32,
            _ => 0,
        }
    }

    fn write32(&mut self, st: &mut DriveState, off: u64, v: u32) {
        match off {
            reg::INTMS => self.intms |= v,
            reg::INTMC => self.intms &= !v,
            reg::CC => self.write_cc(st, v),
            reg::AQA => self.aqa = v & 0x0FFF_0FFF,
            0x28 => self.asq = (self.asq & !0xFFFF_FFFF) | u64::from(v & !0xFFF),
            0x2C => self.asq = (self.asq & 0xFFFF_FFFF) | (u64::from(v) << 32),
            0x30 => self.acq = (self.acq & !0xFFFF_FFFF) | u64::from(v & !0xFFF),
            0x34 => self.acq = (self.acq & 0xFFFF_FFFF) | (u64::from(v) << 32),
            o if o >= reg::DOORBELLS => self.doorbell(o, v),
            _ => {}
        }
    }

    fn write_cc(&mut self, st: &mut DriveState, v: u32) {
        let old = self.cc;
        let new = v & 0x01FF_FFF1;
        self.cc = new;
        let shn = |c: u32| (c >> reg::CC_SHN_SHIFT) & 3;
        if shn(old) == 0 && shn(new) != 0 {
            if let Err(e) = st.destage() {
                limited!(warn, 5, error = %e, "destage on shutdown failed");
            }
            self.csts = (self.csts & !reg::CSTS_SHST_MASK) | reg::CSTS_SHST_COMPLETE;
            tracing::debug!(cntlid = self.cntlid, "shutdown complete");
        } else if shn(old) != 0 && shn(new) == 0 {
            self.csts &= !reg::CSTS_SHST_MASK;
        }
        let en = |c: u32| c & reg::CC_EN != 0;
        if !en(old) && en(new) {
            self.enable();
        } else if en(old) && !en(new) {
            self.reset(st);
        }
    }

    fn enable(&mut self) {
        let cc = self.cc;
        let css = (cc >> reg::CC_CSS_SHIFT) & 7;
        let mps = (cc >> reg::CC_MPS_SHIFT) & 0xF;
        let ams = (cc >> reg::CC_AMS_SHIFT) & 7;
        let asqs = (self.aqa & 0xFFF) + 1;
        let acqs = ((self.aqa >> 16) & 0xFFF) + 1;
        if css != 0 || mps != 0 || ams != 0 || asqs < 2 || acqs < 2 {
            limited!(
                debug,
                20,
                cc,
                aqa = self.aqa,
                "invalid enable: controller fatal"
            );
            self.csts |= reg::CSTS_CFS;
            return;
        }
        self.clear_queues();
        if let Some(s) = self.sqs.get_mut(0) {
            *s = Some(Sq {
                base: self.asq,
                size: asqs,
                head: 0,
                tail: 0,
                cqid: 0,
            });
        }
        if let Some(c) = self.cqs.get_mut(0) {
            *c = Some(Cq {
                base: self.acq,
                size: acqs,
                head: 0,
                tail: 0,
                phase: true,
                ien: true,
                iv: 0,
                held: VecDeque::new(),
                users: 1,
            });
        }
        self.csts = reg::CSTS_RDY;
        tracing::debug!(cntlid = self.cntlid, "controller enabled");
    }

    fn clear_queues(&mut self) {
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
    }

    /// Controller Level Reset (CC.EN 1→0).
    fn reset(&mut self, st: &mut DriveState) {
        st.clear_hang();
        self.clear_queues();
        st.ctrl(self.cntlid).reset();
        self.feat = Features::new(self.max_queues());
        self.aers.clear();
        self.events.clear();
        self.masked_events = 0;
        self.irq_pending = 0;
        self.csts &= reg::CSTS_SHST_MASK;
        tracing::debug!(cntlid = self.cntlid, "controller reset");
    }

    /// Catches up with a power loss (or a detach) that happened since the last call.
    fn sync(&mut self, st: &mut DriveState) {
        if st.epoch != self.epoch || !st.ctrls.contains_key(&self.cntlid) {
            self.epoch = st.epoch;
            self.reset(st);
            self.cc = 0;
            self.csts = 0;
            self.aqa = 0;
            self.asq = 0;
            self.acq = 0;
            self.intms = 0;
            self.errors.clear();
            self.error_count = 0;
        }
    }

    /// Whether the controller processes commands now.
    fn running(&self, st: &DriveState) -> bool {
        st.powered
            && st.present
            && st.epoch == self.epoch
            && self.csts & reg::CSTS_RDY != 0
            && self.csts & reg::CSTS_CFS == 0
            && self.csts & reg::CSTS_SHST_MASK == 0
    }

    fn fatal(&mut self, why: &str) {
        limited!(
            warn,
            5,
            cntlid = self.cntlid,
            why,
            "controller fatal status"
        );
        self.csts |= reg::CSTS_CFS;
    }

    fn doorbell(&mut self, off: u64, v: u32) {
        if self.csts & reg::CSTS_RDY == 0 || self.csts & reg::CSTS_CFS != 0 {
            return;
        }
        let idx = (off - reg::DOORBELLS) / 4;
        let qid = usize::try_from(idx / 2).unwrap_or(usize::MAX);
        let is_cq = idx % 2 == 1;
        let q16 = u16::try_from(qid).unwrap_or(u16::MAX);
        let ok = if is_cq {
            match self.cqs.get_mut(qid) {
                Some(Some(cq)) => {
                    let dist = |a: u32, b: u32| (b + cq.size - a) % cq.size;
                    if v >= cq.size || dist(cq.head, v) > dist(cq.head, cq.tail) {
                        Err(1)
                    } else {
                        cq.head = v;
                        Ok(())
                    }
                }
                _ => Err(0),
            }
        } else {
            match self.sqs.get_mut(qid) {
                Some(Some(sq)) => {
                    if v >= sq.size {
                        Err(1)
                    } else {
                        sq.tail = v;
                        Ok(())
                    }
                }
                _ => Err(0),
            }
        };
        if let Err(info) = ok {
            limited!(
                debug,
                20,
                qid,
                is_cq,
                value = v,
                info,
                "invalid doorbell write"
            );
            self.log_error(q16, 0xFFFF, Status::SUCCESS, 0, 0);
            self.raise(aen::dword0(0, info, lid::ERROR));
        }
    }

    /// Queues an asynchronous event (once).
    fn raise(&mut self, dw0: u32) {
        if !self.events.contains(&dw0) && self.events.len() < 16 {
            self.events.push_back(dw0);
        }
    }

    /// Adds an Error Information log entry.
    fn log_error(&mut self, sqid: u16, cid: u16, status: Status, lba: u64, nsid: u32) {
        self.error_count = self.error_count.wrapping_add(1).max(1);
        let mut e = [0u8; 64];
        put(&mut e, 0, &self.error_count.to_le_bytes());
        put(&mut e, 8, &sqid.to_le_bytes());
        put(&mut e, 10, &cid.to_le_bytes());
        put(&mut e, 12, &status.cqe_bits().to_le_bytes());
        put(&mut e, 14, &0xFFFFu16.to_le_bytes()); // parameter error location: n/a
        put(&mut e, 16, &lba.to_le_bytes());
        put(&mut e, 24, &nsid.to_le_bytes());
        self.errors.push_front(e);
        self.errors.truncate(usize::from(ELPE) + 1);
    }

    /// Does all work that is ready at `now`: posts held completions, runs delayed commands that
    /// are due (or were aborted or released), fetches and executes new commands, completes
    /// Asynchronous Event Requests for pending events.
    pub fn process(&mut self, dma: &dyn Dma, now: Instant) -> Progress {
        let drive = Arc::clone(&self.drive);
        let mut st = drive.lock();
        let mut p = Progress::default();
        self.sync(&mut st);
        if self.running(&st) {
            self.process_locked(&mut st, dma, now, &mut p);
        }
        if st.epoch != self.epoch {
            // This controller's own command cut the power (torn write).
            self.sync(&mut st);
        }
        p.next_due = if self.running(&st) {
            st.next_due(self.cntlid)
        } else {
            None
        };
        let fire = self.irq_pending & !u64::from(self.intms);
        self.irq_pending &= !fire;
        p.irqs = fire;
        let wakers = st.take_wakers();
        drop(st);
        for w in wakers {
            w();
        }
        p
    }

    fn process_locked(
        &mut self,
        st: &mut DriveState,
        dma: &dyn Dma,
        now: Instant,
        p: &mut Progress,
    ) {
        if st.hung() {
            return;
        }
        self.post_held(dma, p);
        if !self.running(st) {
            return;
        }
        let c = st.ctrl(self.cntlid);
        if std::mem::take(&mut c.resv_event) {
            self.raise(aen::dword0(
                duplex_nvme::resv::AEN_TYPE_IO_SPECIFIC,
                duplex_nvme::resv::AEN_INFO_RESERVATION_LOG,
                duplex_nvme::resv::LID_RESERVATION_NOTIFICATION,
            ));
        }
        self.run_due(st, dma, now, p);
        if !self.running(st) {
            return;
        }
        // Admin queue first, then the I/O queues round robin from a rotating start.
        let n = self.sqs.len().saturating_sub(1);
        let mut order = vec![0usize];
        if n > 0 {
            self.rr = (self.rr + 1) % n;
            order.extend((0..n).map(|i| 1 + (self.rr + i) % n));
        }
        for qid in order {
            if !self.running(st) {
                return;
            }
            if self.sqs.get(qid).is_some_and(Option::is_some) {
                self.fetch(st, dma, qid, now, p);
            }
        }
        if self.running(st) {
            self.deliver_events(dma, p);
        }
    }

    /// Posts completions held for lack of room, oldest first, as far as room allows.
    fn post_held(&mut self, dma: &dyn Dma, p: &mut Progress) {
        for cqid in 0..self.cqs.len() {
            while let Some(Some(cq)) = self.cqs.get_mut(cqid) {
                if cq.full() {
                    break;
                }
                let Some(c) = cq.held.pop_front() else {
                    break;
                };
                if !self.post(dma, c, p) {
                    return;
                }
            }
        }
    }

    /// Runs this controller's delayed commands that may run now.
    fn run_due(&mut self, st: &mut DriveState, dma: &dyn Dma, now: Instant, p: &mut Progress) {
        for pend in st.take_due(self.cntlid, now) {
            if !self.running(st) {
                return;
            }
            p.worked = true;
            let done = match pend.aborted {
                Some(s) => Some(self.completion(pend.sqid, pend.sqe.cid, s, 0)),
                None => self.exec_io(st, dma, pend.sqid, &pend.sqe, p),
            };
            if let Some(c) = done {
                self.complete(dma, c, p);
            }
        }
    }

    /// Completes this controller's commands that another party marked aborted (now, before the
    /// command that aborted them completes).
    fn complete_aborted(&mut self, st: &mut DriveState, dma: &dyn Dma, p: &mut Progress) {
        let c = st.ctrl(self.cntlid);
        let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut c.pending)
            .into_iter()
            .partition(|x| x.aborted.is_some());
        c.pending = keep;
        for pend in gone {
            let s = pend.aborted.unwrap_or(generic::ABORT_REQUESTED);
            let c = self.completion(pend.sqid, pend.sqe.cid, s, 0);
            self.complete(dma, c, p);
        }
    }

    /// Fetches and handles up to [`FETCH_BURST`] commands of submission queue `qid`.
    fn fetch(
        &mut self,
        st: &mut DriveState,
        dma: &dyn Dma,
        qid: usize,
        now: Instant,
        p: &mut Progress,
    ) {
        let sqid = u16::try_from(qid).unwrap_or(u16::MAX);
        let mut delayed = st
            .ctrls
            .get(&self.cntlid)
            .map_or(0, |c| c.pending.iter().filter(|x| x.sqid == sqid).count());
        for _ in 0..FETCH_BURST {
            if !self.running(st) {
                return;
            }
            let Some(Some(sq)) = self.sqs.get(qid) else {
                return;
            };
            if sq.head == sq.tail || delayed >= sq.size as usize {
                return;
            }
            let (base, head, size, cqid) = (sq.base, sq.head, sq.size, sq.cqid);
            match self.cqs.get(usize::from(cqid)) {
                Some(Some(cq)) if cq.held.is_empty() => {}
                _ => return,
            }
            let Some(addr) = u64::from(head)
                .checked_mul(SQE_SIZE)
                .and_then(|o| base.checked_add(o))
            else {
                self.fatal("SQ entry address overflows");
                return;
            };
            let mut raw = [0u8; 64];
            if dma.read(addr, &mut raw).is_err() {
                self.fatal("SQ entry not readable");
                return;
            }
            if let Some(Some(sq)) = self.sqs.get_mut(qid) {
                sq.head = (head + 1) % size;
            }
            p.worked = true;
            let sqe = Sqe::from_bytes(&raw);
            let done = if qid == 0 {
                self.admin(st, dma, sqe, p)
            } else {
                match self.io_submit(st, dma, sqid, sqe, now, p) {
                    nvm::Submit::Done(c) => c,
                    nvm::Submit::Deferred => {
                        delayed += 1;
                        None
                    }
                }
            };
            if let Some(c) = done {
                self.complete(dma, c, p);
            }
        }
    }

    /// A completion for command `cid` of `sqid`, routed to that SQ's CQ.
    fn completion(&self, sqid: u16, cid: u16, status: Status, dw0: u32) -> Completion {
        let (cqid, sqhd) = match self.sqs.get(usize::from(sqid)) {
            Some(Some(sq)) => (sq.cqid, u16::try_from(sq.head).unwrap_or(0)),
            _ => (u16::MAX, 0),
        };
        Completion {
            sqid,
            cqid,
            sqhd,
            cid,
            dw0,
            status,
        }
    }

    /// Posts `c`, or holds it if its CQ is full or already holds completions.
    fn complete(&mut self, dma: &dyn Dma, c: Completion, p: &mut Progress) {
        let Some(Some(cq)) = self.cqs.get_mut(usize::from(c.cqid)) else {
            return; // its queues are gone
        };
        if !cq.held.is_empty() || cq.full() {
            cq.held.push_back(c);
            return;
        }
        self.post(dma, c, p);
    }

    /// Writes `c` into its CQ (which has room). Returns false on a DMA fault (CFS set).
    fn post(&mut self, dma: &dyn Dma, c: Completion, p: &mut Progress) -> bool {
        let sqhd = match self.sqs.get(usize::from(c.sqid)) {
            Some(Some(sq)) if sq.cqid == c.cqid => u16::try_from(sq.head).unwrap_or(0),
            _ => c.sqhd,
        };
        let Some(Some(cq)) = self.cqs.get_mut(usize::from(c.cqid)) else {
            return true;
        };
        let cqe = Cqe {
            dw0: c.dw0,
            dw1: 0,
            sqhd,
            sqid: c.sqid,
            cid: c.cid,
            status: c.status.cqe_bits() | u16::from(cq.phase),
        };
        let addr = u64::from(cq.tail)
            .checked_mul(CQE_SIZE)
            .and_then(|o| cq.base.checked_add(o));
        let bytes: [u8; 16] = cqe_bytes(&cqe);
        let ok = addr.is_some_and(|a| dma.write(a, &bytes).is_ok());
        if !ok {
            self.fatal("CQ entry not writable");
            return false;
        }
        cq.tail += 1;
        if cq.tail == cq.size {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        if cq.ien && cq.iv < 64 {
            self.irq_pending |= 1 << cq.iv;
        }
        p.worked = true;
        true
    }

    /// Completes outstanding AERs with pending events whose type is not masked.
    fn deliver_events(&mut self, dma: &dyn Dma, p: &mut Progress) {
        while !self.aers.is_empty() {
            let masked = self.masked_events;
            let Some(i) = self
                .events
                .iter()
                .position(|e| masked & (1 << (e & 7)) == 0)
            else {
                return;
            };
            let (Some(ev), Some(cid)) = (self.events.remove(i), self.aers.pop_front()) else {
                return;
            };
            self.masked_events |= 1 << (ev & 7);
            let c = self.completion(0, cid, Status::SUCCESS, ev);
            self.complete(dma, c, p);
        }
    }

    /// The PRP segments of a `len`-byte transfer of `sqe`.
    fn prps(&self, dma: &dyn Dma, sqe: &Sqe, len: u64) -> Result<Vec<Segment>, Status> {
        let prp1 = le64(&sqe.dptr);
        let prp2 = le64(sqe.dptr.get(8..).unwrap_or(&[]));
        prp::segments(prp1, prp2, len, PAGE_SIZE, |a, b| dma.read(a, b)).map_err(|e| {
            limited!(debug, 20, error = %e, "PRP error");
            e.status()
        })
    }

    /// Largest data transfer in bytes (MDTS; 0 = the 256 MiB a maximal I/O needs).
    fn max_transfer(&self) -> u64 {
        match self.drive.config().mdts {
            0 => PAGE_SIZE << crate::drive::MAX_MDTS,
            m => PAGE_SIZE << m.min(crate::drive::MAX_MDTS),
        }
    }
}

/// The 16 bytes of a CQE.
fn cqe_bytes(c: &Cqe) -> [u8; 16] {
    let mut b = [0u8; 16];
    put(&mut b, 0, &c.dw0.to_le_bytes());
    put(&mut b, 4, &c.dw1.to_le_bytes());
    put(&mut b, 8, &c.sqhd.to_le_bytes());
    put(&mut b, 10, &c.sqid.to_le_bytes());
    put(&mut b, 12, &c.cid.to_le_bytes());
    put(&mut b, 14, &c.status.to_le_bytes());
    b
}

/// Reads `len` bytes from the host through `segs`.
fn from_host(dma: &dyn Dma, segs: &[Segment], len: u64) -> Result<Vec<u8>, Status> {
    let mut buf = vec![0u8; usize::try_from(len).map_err(|_| generic::INVALID_FIELD)?];
    let mut at = 0usize;
    for s in segs {
        let n = usize::try_from(s.len).map_err(|_| generic::DATA_TRANSFER)?;
        let dst = buf.get_mut(at..at + n).ok_or(generic::DATA_TRANSFER)?;
        dma.read(s.addr, dst).map_err(|_| generic::DATA_TRANSFER)?;
        at += n;
    }
    Ok(buf)
}

/// Writes `data` to the host through `segs`, zero-filling segments beyond its end.
fn to_host(dma: &dyn Dma, segs: &[Segment], data: &[u8]) -> Result<(), Status> {
    let zero = [0u8; PAGE_SIZE as usize];
    let mut at = 0usize;
    for s in segs {
        let n = usize::try_from(s.len).map_err(|_| generic::DATA_TRANSFER)?;
        let end = at.saturating_add(n);
        let src = match data.get(at..end) {
            Some(d) => d,
            None => {
                let avail = data.get(at..).unwrap_or(&[]);
                if avail.is_empty() {
                    zero.get(..n).ok_or(generic::DATA_TRANSFER)?
                } else {
                    // Partly data, partly zeroes: write the data, then the zeroes.
                    dma.write(s.addr, avail)
                        .map_err(|_| generic::DATA_TRANSFER)?;
                    let rest = zero.get(..n - avail.len()).ok_or(generic::DATA_TRANSFER)?;
                    let addr = s
                        .addr
                        .checked_add(avail.len() as u64)
                        .ok_or(generic::DATA_TRANSFER)?;
                    dma.write(addr, rest).map_err(|_| generic::DATA_TRANSFER)?;
                    at = end;
                    continue;
                }
            }
        };
        dma.write(s.addr, src).map_err(|_| generic::DATA_TRANSFER)?;
        at = end;
    }
    Ok(())
}

fn check_access(offset: u64, len: usize) -> Result<(), RegError> {
    if len != 4 && len != 8 {
        return Err(RegError::Size { offset, len });
    }
    if offset % len as u64 != 0 {
        return Err(RegError::Alignment { offset, len });
    }
    if offset.checked_add(len as u64).is_none_or(|e| e > BAR0_SIZE) {
        return Err(RegError::Range { offset, len });
    }
    Ok(())
}
