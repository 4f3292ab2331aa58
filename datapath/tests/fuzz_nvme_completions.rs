//! Fuzz target for the user-space NVMe driver's completion handling: a fake controller that
//! behaves correctly during bring-up (unless the input says otherwise), then answers with
//! completion queue entries and register values the fuzzer chooses.
//!
//! The fake device ([`Dev`]) implements [`Transport`]: a register model (CAP with MQES, TO 0,
//! DSTRD, CSS NVM; CC.EN → CSTS.RDY; AQA/ASQ/ACQ; doorbells at the CAP stride), and DMA by
//! mapping the driver's memfds itself ([`DmaMem::map`] of a clone of the fd), so it reads
//! submission entries and writes completion entries at device addresses. A correct controller's
//! admin commands (Identify, Set Features host id and number of queues, Create I/O CQ/SQ, Get
//! Features, Abort) are executed; every I/O command fetched is remembered as pending.
//!
//! What the fuzzer controls: CAP, the Identify data and the queues granted; per admin command a
//! correct answer, silence, an error status, a duplicate or an arbitrary entry; per I/O doorbell
//! nothing, a completion or an arbitrary entry; and explicit completions and arbitrary entries
//! (any command id — pending, never submitted, of another queue, repeated —, any SQ id, SQ head
//! in or out of range, any status, current, stale or random phase, at the tail or at any slot);
//! CSTS garbage (CFS, all ones, random) for a number of reads; all-ones reads for a while, or
//! a device gone for good (all-ones reads, lost writes); register writes that fail, doorbells
//! that are silently lost. The driver is driven through `submit`,
//! `ring`, `poll`, `check_timeouts` (now, past the command timeout, far in the future), `reset`,
//! `exec` on I/O queues and admin commands.
//!
//! Properties checked on every input:
//! * no panic; every failure is an `NvmeError` (typed by construction);
//! * every `Done` handed to the caller carries a tag the test submitted (never one of the
//!   driver's own, never an invented one), on the queue it was submitted to, at most once;
//! * its result is what an entry the device actually wrote for that command's id said (dword 0
//!   and status; `TimedOut` only from an Abort Requested status), or `Reset`/`ControllerLost`
//!   from a reset that happened during that very call;
//! * `poll` returns an error only when it delivered nothing;
//! * after `BadCompletion` (or any error that fails the controller) `submit` and `exec` return
//!   `NvmeError::Failed` until a reset;
//! * after every reset (explicit, or from `check_timeouts` or `exec`), once the queues are
//!   polled, every submitted tag has been completed exactly once;
//! * at the end, with the device behaving again, a reset succeeds and a command round-trips.
//!
//! Under `cargo test` / `cargo nextest run` the target runs for a bounded number of iterations
//! and wall-clock time (the constants below). Longer:
//!
//! ```text
//! BOLERO_RANDOM_ITERATIONS=1000000 BOLERO_RANDOM_TEST_TIME_MS=600000 \
//!     cargo test --release -p duplex-datapath --test fuzz_nvme_completions
//! ```
//!
//! A failure prints `BOLERO_RANDOM_SEED=...`; set that variable to replay it
//! (`FUZZ_NVME_TRACE=1` and `--nocapture` print each operation and its duration).
//!
//! The tests at the end reproduce driver bugs this target found (all fixed): they keep them
//! fixed.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use duplex_datapath::nvme::{
    CmdError, Controller, DmaMapping, DmaMem, Done, IoCmd, NvmeError, Options, Seg, Transport,
    TransportError,
};
use duplex_nvme::cmd::{Cqe, Sqe};
use duplex_nvme::spec::{admin, cns, feat, reg};
use duplex_nvme::status::Status;

/// Iterations under `cargo test`, unless `BOLERO_RANDOM_ITERATIONS` says otherwise.
const ITERATIONS: usize = 2_000;
/// Wall-clock cap, unless `BOLERO_RANDOM_TEST_TIME_MS` says otherwise (a bound, not an
/// assertion).
const TIME_CAP: Duration = Duration::from_secs(8);
/// Operations per input at most.
const MAX_OPS: usize = 48;
/// Inputs that may make the driver wait out a whole CAP.TO (500 ms: a vanished device during a
/// reset) per test process.
static SLOW_BUDGET: AtomicU32 = AtomicU32::new(3);

const PAGE: usize = 4096;
/// Where the test's data buffers sit in the device's address space.
const DATA_IOVA: u64 = 1 << 40;
const DATA_PAGES: usize = 8;
/// Dword 3 of the test's own commands (dword 2 holds the tag), so the device and the checks
/// can tell which command id the driver gave which tag.
const MARK: u32 = 0xD00D_F00D;
/// The driver's own tags have the top bit set.
const SYNC_TAG: u64 = 1 << 63;
/// The device's default MQES (zero-based).
const MQES: u64 = 63;

fn status15(sct: u8, sc: u8) -> u16 {
    Status::new(sct, sc).0
}

/// A status biased towards success and the statuses the driver gives meaning to.
fn pick_status(raw: u16) -> u16 {
    match raw % 10 {
        0..=4 => 0,
        5 => status15(0, 0x07), // abort requested
        6 => status15(0, 0x83), // reservation conflict
        7 => status15(2, 0x81), // unrecovered read error
        8 => Status::new(0, 0x06).dnr().0,
        _ => raw >> 1,
    }
}

fn cqe_bytes(c: &Cqe) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&c.dw0.to_le_bytes());
    b[4..8].copy_from_slice(&c.dw1.to_le_bytes());
    b[8..10].copy_from_slice(&c.sqhd.to_le_bytes());
    b[10..12].copy_from_slice(&c.sqid.to_le_bytes());
    b[12..14].copy_from_slice(&c.cid.to_le_bytes());
    b[14..16].copy_from_slice(&c.status.to_le_bytes());
    b
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An arbitrary completion entry, described relative to the queue it is written to.
#[derive(Debug, Clone, Copy, Default, bolero::TypeGenerator)]
struct Junk {
    /// Mostly at the device's tail (advancing it), else at slot `raw_slot`.
    slot: u8,
    raw_slot: u16,
    /// A pending command's id, one never submitted, the last one completed again, one pending
    /// on another queue, or `raw_cid`.
    cid: u8,
    raw_cid: u16,
    /// Mostly right, else another queue's or `raw_sqid`.
    sqid: u8,
    raw_sqid: u16,
    /// Mostly right, else the queue size (out of range), all ones or `raw_sqhd`.
    sqhd: u8,
    raw_sqhd: u16,
    /// Mostly the current phase, else stale or random.
    phase: u8,
    status: u16,
    dw0: u32,
}

/// What the device does with the next admin command.
#[derive(Debug, Clone, Copy)]
enum AdminAction {
    Correct,
    Silent,
    Status(u16),
    Junk(Junk),
    Duplicate,
}

impl AdminAction {
    fn decode(kind: u8, status: u16, junk: Junk) -> Self {
        match kind % 5 {
            0 => Self::Correct,
            1 => Self::Silent,
            2 => Self::Status(pick_status(status) | 1),
            3 => Self::Junk(junk),
            _ => Self::Duplicate,
        }
    }
}

/// What the device does with an I/O command when its doorbell is rung.
#[derive(Debug, Clone, Copy)]
enum IoPolicy {
    Hold,
    Complete(u16),
    Junk(Junk),
}

#[derive(Debug, Clone, Copy)]
enum RegGarbage {
    AllOnes,
    Fatal,
    Raw(u32),
}

#[derive(Debug, Clone, Copy)]
struct SqState {
    base: u64,
    size: u32,
    head: u32,
    cqid: u16,
}

#[derive(Debug, Clone, Copy)]
struct CqState {
    base: u64,
    size: u32,
    tail: u32,
    phase: bool,
}

/// The fake controller.
#[derive(Debug)]
struct Dev {
    cap: u64,
    cc: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    /// The driver's memory as the device sees it.
    maps: Vec<DmaMem>,
    sqs: BTreeMap<u16, SqState>,
    cqs: BTreeMap<u16, CqState>,
    /// (base, entries) of every I/O SQ a Create I/O SQ command named, however it was answered.
    named_sqs: BTreeMap<u16, (u64, u32)>,
    /// I/O commands fetched and not completed: (qid, cid).
    pending: Vec<(u16, u16)>,
    /// Command ids ever fetched per queue since it was created.
    fetched: BTreeSet<(u16, u16)>,
    /// Every completion entry written: (CQ id, entry).
    log: Vec<(u16, Cqe)>,
    admin_script: VecDeque<AdminAction>,
    io_policy: IoPolicy,
    identify_seed: Option<u64>,
    grant: Option<u32>,
    abort_completes: bool,
    reg_garbage: Option<(RegGarbage, u32)>,
    /// Register reads left that return all ones (a device dropping off the bus for a moment).
    vanished: u32,
    /// Gone for good: reads return all ones, writes are lost (each costs the driver a whole
    /// CAP.TO wait during a reset, hence [`SLOW_BUDGET`]).
    vanished_forever: bool,
    /// Register writes left that fail with a transport error.
    fail_writes: u32,
    /// Doorbell writes left that are silently lost.
    drop_doorbells: u32,
}

impl Dev {
    fn new() -> Self {
        Self {
            cap: MQES | reg::CAP_CQR | reg::CAP_CSS_NVM,
            cc: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            maps: Vec::new(),
            sqs: BTreeMap::new(),
            cqs: BTreeMap::new(),
            named_sqs: BTreeMap::new(),
            pending: Vec::new(),
            fetched: BTreeSet::new(),
            log: Vec::new(),
            admin_script: VecDeque::new(),
            io_policy: IoPolicy::Hold,
            identify_seed: None,
            grant: None,
            abort_completes: true,
            reg_garbage: None,
            vanished: 0,
            vanished_forever: false,
            fail_writes: 0,
            drop_doorbells: 0,
        }
    }

    /// Back to a well-behaved device (the queues and what it knows stay).
    fn behave(&mut self) {
        self.admin_script.clear();
        self.io_policy = IoPolicy::Complete(0);
        self.reg_garbage = None;
        self.vanished = 0;
        self.vanished_forever = false;
        self.fail_writes = 0;
        self.drop_doorbells = 0;
    }

    fn dma(&self, iova: u64, len: usize) -> Option<(&DmaMem, usize)> {
        self.maps.iter().find_map(|m| {
            let off = usize::try_from(iova.checked_sub(m.iova())?).ok()?;
            (off.checked_add(len)? <= m.len()).then_some((m, off))
        })
    }

    fn dma_read(&self, iova: u64, out: &mut [u8]) -> bool {
        self.dma(iova, out.len())
            .is_some_and(|(m, off)| m.read(off, out).is_ok())
    }

    fn dma_write(&self, iova: u64, data: &[u8]) -> bool {
        self.dma(iova, data.len())
            .is_some_and(|(m, off)| m.write(off, data).is_ok())
    }

    fn csts(&mut self) -> u32 {
        let mut v = if self.cc & reg::CC_EN != 0 {
            reg::CSTS_RDY
        } else {
            0
        };
        if self.cc & (3 << reg::CC_SHN_SHIFT) != 0 {
            v |= reg::CSTS_SHST_COMPLETE;
        }
        if let Some((kind, left)) = &mut self.reg_garbage {
            let g = match *kind {
                RegGarbage::AllOnes => u32::MAX,
                RegGarbage::Fatal => v | reg::CSTS_CFS,
                RegGarbage::Raw(r) => r,
            };
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.reg_garbage = None;
            }
            return g;
        }
        v
    }

    fn read32(&mut self, off: u64) -> u32 {
        if self.vanished_forever {
            return u32::MAX;
        }
        if self.vanished > 0 {
            self.vanished -= 1;
            return u32::MAX;
        }
        match off {
            0x00 => self.cap as u32,
            0x04 => (self.cap >> 32) as u32,
            reg::VS => 0x0001_0400,
            reg::CC => self.cc,
            reg::CSTS => self.csts(),
            reg::AQA => self.aqa,
            0x28 => self.asq as u32,
            0x2C => (self.asq >> 32) as u32,
            0x30 => self.acq as u32,
            0x34 => (self.acq >> 32) as u32,
            _ => 0,
        }
    }

    fn write32(&mut self, off: u64, v: u32) -> Result<(), TransportError> {
        if self.fail_writes > 0 {
            self.fail_writes -= 1;
            return Err(TransportError::new(
                format!("write of {off:#x}"),
                "fake device: link down",
            ));
        }
        if self.vanished_forever {
            return Ok(());
        }
        if off >= reg::DOORBELLS && self.drop_doorbells > 0 {
            self.drop_doorbells -= 1;
            return Ok(());
        }
        let lo = |r: u64| r & !0xFFFF_FFFF | u64::from(v);
        let hi = |r: u64| r & 0xFFFF_FFFF | u64::from(v) << 32;
        match off {
            reg::CC => self.set_cc(v),
            reg::AQA => self.aqa = v,
            0x28 => self.asq = lo(self.asq),
            0x2C => self.asq = hi(self.asq),
            0x30 => self.acq = lo(self.acq),
            0x34 => self.acq = hi(self.acq),
            o if o >= reg::DOORBELLS => self.doorbell(o - reg::DOORBELLS, v),
            _ => {}
        }
        Ok(())
    }

    fn set_cc(&mut self, v: u32) {
        let was = self.cc & reg::CC_EN != 0;
        self.cc = v;
        let now = v & reg::CC_EN != 0;
        if was && !now {
            self.sqs.clear();
            self.cqs.clear();
            self.pending.clear();
        }
        if !was && now {
            self.sqs.clear();
            self.cqs.clear();
            self.pending.clear();
            self.fetched.retain(|&(q, _)| q != 0);
            self.cqs.insert(
                0,
                CqState {
                    base: self.acq,
                    size: (self.aqa >> 16 & 0xFFF) + 1,
                    tail: 0,
                    phase: true,
                },
            );
            self.sqs.insert(
                0,
                SqState {
                    base: self.asq,
                    size: (self.aqa & 0xFFF) + 1,
                    head: 0,
                    cqid: 0,
                },
            );
        }
    }

    fn doorbell(&mut self, rel: u64, v: u32) {
        let stride = 4u64 << reg::cap_dstrd(self.cap);
        if rel % stride != 0 {
            return;
        }
        let idx = rel / stride;
        let Ok(qid) = u16::try_from(idx / 2) else {
            return;
        };
        if idx % 2 == 0 {
            self.fetch(qid, v);
        }
    }

    /// An SQ tail doorbell: fetches and handles every new entry.
    fn fetch(&mut self, qid: u16, tail: u32) {
        loop {
            let Some(sq) = self.sqs.get_mut(&qid) else {
                return;
            };
            if tail >= sq.size || sq.head == tail {
                return;
            }
            let at = sq.base + u64::from(sq.head) * 64;
            sq.head = (sq.head + 1) % sq.size;
            let mut raw = [0u8; 64];
            if !self.dma_read(at, &mut raw) {
                continue;
            }
            let sqe = Sqe::from_bytes(&raw);
            if qid == 0 {
                self.admin(&sqe);
            } else {
                self.io(qid, &sqe);
            }
        }
    }

    fn io(&mut self, qid: u16, sqe: &Sqe) {
        self.pending.push((qid, sqe.cid));
        self.fetched.insert((qid, sqe.cid));
        match self.io_policy {
            IoPolicy::Hold => {}
            IoPolicy::Complete(status) => self.complete(qid, sqe.cid, status, 0),
            IoPolicy::Junk(j) => {
                if let Some(cqid) = self.sqs.get(&qid).map(|s| s.cqid) {
                    self.junk(cqid, j, Some(sqe.cid));
                }
            }
        }
    }

    /// A correct completion of command `cid` of SQ `qid`.
    fn complete(&mut self, qid: u16, cid: u16, status: u16, dw0: u32) {
        if let Some(i) = self.pending.iter().position(|&p| p == (qid, cid)) {
            self.pending.remove(i);
        }
        let Some(sq) = self.sqs.get(&qid).copied() else {
            return;
        };
        self.post(sq.cqid, cid, qid, sq.head as u16, status, dw0);
    }

    /// Writes an entry at the CQ's tail with its current phase, and advances the tail.
    fn post(&mut self, cqid: u16, cid: u16, sqid: u16, sqhd: u16, status: u16, dw0: u32) {
        let Some(cq) = self.cqs.get(&cqid).copied() else {
            return;
        };
        let cqe = Cqe {
            dw0,
            dw1: 0,
            sqhd,
            sqid,
            cid,
            status: status << 1 | u16::from(cq.phase),
        };
        self.write_cqe(cqid, cq.tail, cqe, true);
    }

    fn write_cqe(&mut self, cqid: u16, slot: u32, cqe: Cqe, advance: bool) {
        let Some(cq) = self.cqs.get(&cqid).copied() else {
            return;
        };
        self.dma_write(cq.base + u64::from(slot) * 16, &cqe_bytes(&cqe));
        self.log.push((cqid, cqe));
        if advance {
            if let Some(cq) = self.cqs.get_mut(&cqid) {
                cq.tail = (cq.tail + 1) % cq.size;
                if cq.tail == 0 {
                    cq.phase = !cq.phase;
                }
            }
        }
    }

    /// Writes an arbitrary entry to CQ `cqid`; `own`: the command being answered, if any.
    fn junk(&mut self, cqid: u16, j: Junk, own: Option<u16>) {
        let Some(cq) = self.cqs.get(&cqid).copied() else {
            return;
        };
        // Queue pairs are 1:1: SQ `cqid` completes on CQ `cqid`.
        let sqid = cqid;
        let (head, sq_size) = self
            .sqs
            .get(&sqid)
            .map_or((0, cq.size), |s| (s.head, s.size));
        let mine: Vec<u16> = self
            .pending
            .iter()
            .filter(|p| p.0 == sqid)
            .map(|p| p.1)
            .collect();
        let cid = match j.cid % 8 {
            0..=2 => own
                .or_else(|| {
                    mine.get(usize::from(j.raw_cid) % mine.len().max(1))
                        .copied()
                })
                .unwrap_or(j.raw_cid),
            3 => (0..u16::MAX)
                .find(|c| !self.fetched.contains(&(sqid, *c)))
                .unwrap_or(u16::MAX),
            4 => self
                .log
                .iter()
                .rev()
                .find(|(q, _)| *q == cqid)
                .map_or(j.raw_cid, |(_, c)| c.cid),
            5 => self
                .pending
                .iter()
                .find(|p| p.0 != sqid)
                .map_or(j.raw_cid, |p| p.1),
            _ => j.raw_cid,
        };
        let sqid_field = match j.sqid % 8 {
            0..=4 => sqid,
            5 => sqid.wrapping_add(1),
            6 => sqid ^ 1,
            _ => j.raw_sqid,
        };
        let sqhd = match j.sqhd % 8 {
            0..=4 => head as u16,
            5 => sq_size as u16,
            6 => u16::MAX,
            _ => j.raw_sqhd,
        };
        let phase = match j.phase % 8 {
            0..=5 => cq.phase,
            6 => !cq.phase,
            _ => j.raw_slot & 1 != 0,
        };
        let cqe = Cqe {
            dw0: j.dw0,
            dw1: 0,
            sqhd,
            sqid: sqid_field,
            cid,
            status: pick_status(j.status) << 1 | u16::from(phase),
        };
        if let Some(i) = self.pending.iter().position(|&p| p == (sqid, cid)) {
            self.pending.remove(i);
        }
        if j.slot % 4 == 3 {
            self.write_cqe(cqid, u32::from(j.raw_slot) % cq.size, cqe, false);
        } else {
            self.write_cqe(cqid, cq.tail, cqe, true);
        }
    }

    fn admin(&mut self, sqe: &Sqe) {
        if sqe.opcode == admin::CREATE_IO_SQ {
            let prp1 = prp1(sqe);
            self.named_sqs
                .insert(sqe.cdw10 as u16, (prp1, (sqe.cdw10 >> 16) + 1));
        }
        let head = self.sqs.get(&0).map_or(0, |s| s.head) as u16;
        match self
            .admin_script
            .pop_front()
            .unwrap_or(AdminAction::Correct)
        {
            AdminAction::Correct => {
                let (status, dw0) = self.execute(sqe);
                self.post(0, sqe.cid, 0, head, status, dw0);
            }
            AdminAction::Duplicate => {
                let (status, dw0) = self.execute(sqe);
                self.post(0, sqe.cid, 0, head, status, dw0);
                self.post(0, sqe.cid, 0, head, status, dw0);
            }
            AdminAction::Silent => {}
            AdminAction::Status(s) => self.post(0, sqe.cid, 0, head, s, 0),
            AdminAction::Junk(j) => self.junk(0, j, Some(sqe.cid)),
        }
    }

    /// Executes an admin command as a correct controller would: (status, dword 0).
    fn execute(&mut self, sqe: &Sqe) -> (u16, u32) {
        match sqe.opcode {
            admin::IDENTIFY => {
                let data = self.identify_data(sqe.cdw10 as u8);
                self.dma_write(prp1(sqe), &data);
                (0, 0)
            }
            admin::SET_FEATURES if sqe.cdw10 as u8 == feat::NUM_QUEUES => {
                (0, self.grant.unwrap_or(sqe.cdw11))
            }
            admin::SET_FEATURES | admin::GET_FEATURES => (0, 0),
            admin::CREATE_IO_CQ => {
                let qid = sqe.cdw10 as u16;
                if qid == 0 {
                    return (status15(1, 0x01), 0);
                }
                self.cqs.insert(
                    qid,
                    CqState {
                        base: prp1(sqe),
                        size: (sqe.cdw10 >> 16) + 1,
                        tail: 0,
                        phase: true,
                    },
                );
                (0, 0)
            }
            admin::CREATE_IO_SQ => {
                let (qid, cqid) = (sqe.cdw10 as u16, (sqe.cdw11 >> 16) as u16);
                if qid == 0 || !self.cqs.contains_key(&cqid) {
                    return (status15(1, 0x01), 0);
                }
                self.sqs.insert(
                    qid,
                    SqState {
                        base: prp1(sqe),
                        size: (sqe.cdw10 >> 16) + 1,
                        head: 0,
                        cqid,
                    },
                );
                self.fetched.retain(|&(q, _)| q != qid);
                self.pending.retain(|&(q, _)| q != qid);
                (0, 0)
            }
            admin::ABORT => {
                let (qid, cid) = (sqe.cdw10 as u16, (sqe.cdw10 >> 16) as u16);
                if self.abort_completes && self.pending.contains(&(qid, cid)) {
                    self.complete(qid, cid, status15(0, 0x07), 0);
                    (0, 0)
                } else {
                    (0, 1)
                }
            }
            _ => (status15(0, 0x01), 0),
        }
    }

    fn identify_data(&self, cns_value: u8) -> Vec<u8> {
        let mut d = vec![0u8; 4096];
        if let Some(seed) = self.identify_seed {
            let mut s = seed;
            for chunk in d.chunks_mut(8) {
                chunk.copy_from_slice(&splitmix(&mut s).to_le_bytes());
            }
            return d;
        }
        if cns_value == cns::CONTROLLER {
            d[0..2].copy_from_slice(&0x1B36u16.to_le_bytes());
            d[4..24].copy_from_slice(b"FUZZ0001            ");
            d[24..64].copy_from_slice(&[b' '; 40]);
            d[24..40].copy_from_slice(b"duplex fake nvme");
            d[64..72].copy_from_slice(b"1.0     ");
            d[77] = 0; // MDTS: no limit
            d[78..80].copy_from_slice(&1u16.to_le_bytes());
            d[80..84].copy_from_slice(&0x0001_0400u32.to_le_bytes());
            d[516..520].copy_from_slice(&1u32.to_le_bytes());
        }
        d
    }

    /// The command id the driver gave the test's command `tag` on SQ `qid` (read from the SQ
    /// memory right after `submit`).
    fn cid_of(&self, qid: u16, tag: u64) -> Option<u16> {
        let &(base, size) = self.named_sqs.get(&qid)?;
        (0..u64::from(size)).find_map(|i| {
            let mut raw = [0u8; 64];
            if !self.dma_read(base + i * 64, &mut raw) {
                return None;
            }
            let sqe = Sqe::from_bytes(&raw);
            (sqe.cdw3 == MARK && u64::from(sqe.cdw2) == tag).then_some(sqe.cid)
        })
    }
}

fn prp1(sqe: &Sqe) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&sqe.dptr[0..8]);
    u64::from_le_bytes(b)
}

/// The transport: the driver's handle on the shared fake device.
struct Fake(Rc<RefCell<Dev>>);

impl Transport for Fake {
    fn name(&self) -> &str {
        "fake-nvme"
    }

    fn read32(&mut self, offset: u64) -> Result<u32, TransportError> {
        Ok(self.0.borrow_mut().read32(offset))
    }

    fn write32(&mut self, offset: u64, value: u32) -> Result<(), TransportError> {
        self.0.borrow_mut().write32(offset, value)
    }

    unsafe fn map_dma(&mut self, m: DmaMapping<'_>) -> Result<(), TransportError> {
        if m.file_offset != 0 {
            return Err(TransportError::new(
                "map",
                "fake device maps whole memfds only",
            ));
        }
        let fd =
            m.fd.try_clone_to_owned()
                .map_err(|e| TransportError::new("dup of DMA fd", e))?;
        let len = usize::try_from(m.len).map_err(|e| TransportError::new("map length", e))?;
        let mem = DmaMem::map(fd, len, m.iova).map_err(|e| TransportError::new("map", e))?;
        self.0.borrow_mut().maps.push(mem);
        Ok(())
    }

    fn unmap_dma(&mut self, iova: u64, _len: u64) -> Result<(), TransportError> {
        self.0.borrow_mut().maps.retain(|m| m.iova() != iova);
        Ok(())
    }
}

/// What the test knows about its commands.
#[derive(Debug, Default)]
struct Model {
    /// Tag → (queue, command id the driver gave it).
    submitted: HashMap<u64, (u16, u16)>,
    completed: HashSet<u64>,
    /// The controller has failed and not been reset: commands must be refused.
    must_fail: bool,
    next_tag: u64,
}

impl Model {
    /// Checks and accounts completions handed to the caller; `reset`: a reset happened during
    /// the call that returned them.
    fn deliver(&mut self, done: &[Done], reset: bool, dev: &Dev) {
        for d in done {
            assert!(
                d.tag & SYNC_TAG == 0,
                "the caller got a completion of one of the driver's own commands: {d:?}"
            );
            let Some(&(qid, cid)) = self.submitted.get(&d.tag) else {
                panic!("completion of a tag never submitted: {d:?}");
            };
            assert!(
                self.completed.insert(d.tag),
                "tag {} completed a second time: {d:?}",
                d.tag
            );
            assert_eq!(
                d.qid, qid,
                "completion on another queue than submitted: {d:?}"
            );
            match &d.result {
                Err(CmdError::Reset | CmdError::ControllerLost) => assert!(
                    reset,
                    "{d:?}: a reset result without a reset during this call"
                ),
                result => assert!(
                    dev.log.iter().any(|(q, c)| *q == qid
                        && c.cid == cid
                        && c.sqid == qid
                        && says(c, result)),
                    "{d:?} (cid {cid}) does not match any entry the device wrote for it"
                ),
            }
        }
    }

    fn outstanding(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .submitted
            .keys()
            .filter(|t| !self.completed.contains(t))
            .copied()
            .collect();
        v.sort_unstable();
        v
    }
}

/// Whether entry `c` means `result`.
fn says(c: &Cqe, result: &Result<u32, CmdError>) -> bool {
    let s = c.status();
    match result {
        Ok(dw0) => s.is_success() && c.dw0 == *dw0,
        Err(CmdError::TimedOut) => !s.is_success() && s.sct() == 0 && s.sc() == 0x07,
        Err(e) => CmdError::from_status(s).as_ref() == Some(e),
    }
}

/// An error after which the controller is failed until reset.
fn fails_controller(e: &NvmeError) -> bool {
    matches!(
        e,
        NvmeError::BadCompletion { .. } | NvmeError::Failed(_) | NvmeError::Transport(_)
    )
}

#[derive(Debug, Clone, bolero::TypeGenerator)]
struct Setup {
    io_queues: u8,
    entries: u8,
    mqes: u8,
    host_id: bool,
    abort_completes: bool,
    /// Mostly a correct bring-up; else one fault (CAP, Identify, queues granted, the `nth` admin
    /// command answered wrongly, CSTS garbage).
    fault: u8,
    nth: u8,
    raw: u64,
    status: u16,
    junk: Junk,
}

#[derive(Debug, Clone, bolero::TypeGenerator)]
enum Op {
    Submit {
        q: u8,
        write: bool,
        blocks: u8,
        at: u8,
        ring: bool,
    },
    Ring {
        q: u8,
    },
    Complete {
        q: u8,
        n: u8,
        pick: u8,
        status: u16,
        dw0: u32,
    },
    Junk {
        q: u8,
        n: u8,
        junk: Junk,
    },
    Poll {
        q: u8,
    },
    Control(Control),
    Fault(Fault),
}

/// Calls that may wait, abort or reset (rarer than the I/O operations).
#[derive(Debug, Clone, bolero::TypeGenerator)]
enum Control {
    Timeouts { when: u8 },
    Reset,
    Exec { q: u8, read: bool },
    AdminExec,
}

/// Changes of the device's behaviour (rarer than the I/O operations).
#[derive(Debug, Clone, bolero::TypeGenerator)]
enum Fault {
    IoPolicy { kind: u8, status: u16, junk: Junk },
    AdminScript { kind: u8, status: u16, junk: Junk },
    Registers { kind: u8, count: u8, raw: u32 },
    WriteFail { count: u8, silent: bool },
    Vanish { count: u8, forever: bool, then: u8 },
}

fn options(io_queues: u16, entries: u16, host_id: bool) -> Options {
    Options {
        io_queues,
        queue_entries: entries,
        // Far enough that commands do not time out on their own while the input runs
        // (`check_timeouts` is given instants in the future for that); the abort and admin
        // timeouts are what a reset's bring-up and an unanswered exec wait for.
        timeout: Duration::from_millis(20),
        abort_timeout: Duration::from_millis(1),
        admin_timeout: Duration::from_millis(1),
        host_id: host_id.then_some([7; 16]),
    }
}

struct Run {
    c: Controller<Fake>,
    dev: Rc<RefCell<Dev>>,
    m: Model,
    io_queues: u16,
    /// Resets accounted for so far.
    seen_resets: u64,
}

impl Run {
    fn qid(&self, q: u8) -> u16 {
        if q >= 248 {
            u16::from(q - 248)
        } else {
            u16::from(q) % self.io_queues + 1
        }
    }

    /// Polls every queue the controller may have had, accounting what comes back.
    fn poll_all(&mut self, reset: bool) {
        for qid in 1..=self.io_queues {
            let mut out = Vec::new();
            let r = self.c.poll(qid, &mut out);
            self.after_poll(&r, &out, reset);
        }
    }

    fn after_poll(&mut self, r: &Result<usize, NvmeError>, out: &[Done], reset: bool) {
        match r {
            Ok(n) => assert_eq!(*n, out.len()),
            Err(e) => {
                assert!(out.is_empty(), "poll failed ({e}) after collecting {out:?}");
                if fails_controller(e) {
                    self.m.must_fail = true;
                }
            }
        }
        self.m.deliver(out, reset, &self.dev.borrow());
    }

    /// After a reset: once the queues are polled (what `exec` kept for `poll`), every submitted
    /// command has been completed.
    fn after_reset(&mut self) {
        self.seen_resets = self.c.resets();
        // `exec` keeps other commands' completions, `Reset` ones included, for `poll`.
        self.poll_all(true);
        let left = self.m.outstanding();
        assert!(
            left.is_empty(),
            "after a reset, tags {left:?} were never completed"
        );
    }

    fn refused(&self, what: &str, r: &Result<impl std::fmt::Debug, NvmeError>) {
        if self.m.must_fail {
            assert!(
                matches!(r, Err(NvmeError::Failed(_))),
                "{what} on a failed controller: {r:?}"
            );
        }
    }

    fn submit(&mut self, qid: u16, write: bool, blocks: u8, at: u8) -> Result<u64, NvmeError> {
        let tag = self.m.next_tag;
        self.m.next_tag += 1;
        let blocks = 1 + u32::from(blocks % 24);
        let off = usize::from(at % 4) * PAGE + if at & 0x10 != 0 { 512 } else { 0 };
        let mut cmd = if write {
            IoCmd::write(1, u64::from(at), blocks, 512, at & 0x20 != 0)
        } else {
            IoCmd::read(1, u64::from(at), blocks, 512)
        };
        cmd.sqe.cdw2 = tag as u32;
        cmd.sqe.cdw3 = MARK;
        let segs = [Seg {
            iova: DATA_IOVA + off as u64,
            len: blocks * 512,
        }];
        let r = self.c.submit(qid, cmd, &segs, tag);
        if qid != 0 {
            self.refused("submit", &r);
        }
        r?;
        let cid = self
            .dev
            .borrow()
            .cid_of(qid, tag)
            .expect("a submitted command is in its submission queue");
        self.m.submitted.insert(tag, (qid, cid));
        Ok(tag)
    }

    fn reset(&mut self) {
        let mut out = Vec::new();
        let r = self.c.reset(&mut out);
        self.m.must_fail = r.is_err();
        self.m.deliver(&out, true, &self.dev.borrow());
        self.after_reset();
    }

    fn timeouts(&mut self, when: u8) {
        let now = Instant::now();
        let at = match when % 4 {
            0 => now,
            1 => now + Duration::from_millis(25),
            2 => now + Duration::from_secs(3600),
            _ => now + Duration::from_secs(7200),
        };
        let mut out = Vec::new();
        let resets = self.c.resets();
        let r = self.c.check_timeouts(at, &mut out);
        let reset = self.c.resets() != resets;
        self.m.deliver(&out, reset, &self.dev.borrow());
        if r.is_err() {
            // Only a failed reset or a failed doorbell write make it fail; both fail the
            // controller.
            self.m.must_fail = true;
        } else if reset {
            self.m.must_fail = false;
        }
        if reset {
            self.after_reset();
        }
    }

    fn op(&mut self, op: &Op) {
        match *op {
            Op::Submit {
                q,
                write,
                blocks,
                at,
                ring,
            } => {
                let qid = self.qid(q);
                if self.submit(qid, write, blocks, at).is_ok() && ring {
                    let r = self.c.ring(qid);
                    if r.as_ref().is_err_and(fails_controller) {
                        self.m.must_fail = true;
                    }
                }
            }
            Op::Ring { q } => {
                let r = self.c.ring(self.qid(q));
                if r.as_ref().is_err_and(fails_controller) {
                    self.m.must_fail = true;
                }
            }
            Op::Complete {
                q,
                n,
                pick,
                status,
                dw0,
            } => {
                let qid = self.qid(q);
                let mut dev = self.dev.borrow_mut();
                for k in 0..=usize::from(n % 4) {
                    let mine: Vec<u16> = dev
                        .pending
                        .iter()
                        .filter(|p| p.0 == qid)
                        .map(|p| p.1)
                        .collect();
                    let Some(&cid) = mine.get((usize::from(pick) + k) % mine.len().max(1)) else {
                        break;
                    };
                    dev.complete(qid, cid, pick_status(status), dw0.wrapping_add(k as u32));
                }
            }
            Op::Junk { q, n, junk } => {
                let qid = self.qid(q);
                let mut dev = self.dev.borrow_mut();
                for k in 0..=n % 3 {
                    let j = Junk {
                        raw_cid: junk.raw_cid.wrapping_add(u16::from(k)),
                        ..junk
                    };
                    dev.junk(qid, j, None);
                }
            }
            Op::Poll { q } => {
                let mut out = Vec::new();
                let r = self.c.poll(self.qid(q), &mut out);
                self.after_poll(&r, &out, false);
            }
            Op::Control(ref c) => self.control(c),
            Op::Fault(ref f) => self.fault(f),
        }
        if self.c.resets() != self.seen_resets {
            // A reset inside `exec`: whether it brought the controller back is not visible.
            self.m.must_fail = false;
            self.after_reset();
        }
    }

    fn control(&mut self, op: &Control) {
        match *op {
            Control::Timeouts { when } => self.timeouts(when),
            Control::Reset => self.reset(),
            Control::Exec { q, read } => {
                let qid = self.qid(q);
                let (cmd, segs) = if read {
                    let seg = Seg {
                        iova: DATA_IOVA + 6 * PAGE as u64,
                        len: 512,
                    };
                    (IoCmd::read(1, 0, 1, 512), vec![seg])
                } else {
                    (IoCmd::flush(1), Vec::new())
                };
                let r = self.c.exec(qid, cmd, &segs, Duration::from_millis(1));
                self.refused("exec", &r);
                if r.as_ref().is_err_and(fails_controller) {
                    self.m.must_fail = true;
                }
            }
            Control::AdminExec => {
                let r = self.c.get_features(feat::NUM_QUEUES, 0);
                self.refused("admin command", &r);
                if r.as_ref().is_err_and(fails_controller) {
                    self.m.must_fail = true;
                }
            }
        }
    }

    fn fault(&mut self, op: &Fault) {
        match *op {
            Fault::IoPolicy { kind, status, junk } => {
                self.dev.borrow_mut().io_policy = match kind % 3 {
                    0 => IoPolicy::Hold,
                    1 => IoPolicy::Complete(pick_status(status)),
                    _ => IoPolicy::Junk(junk),
                };
            }
            Fault::AdminScript { kind, status, junk } => {
                let a = AdminAction::decode(kind, status, junk);
                self.dev.borrow_mut().admin_script.push_back(a);
            }
            Fault::Registers { kind, count, raw } => {
                let g = match kind % 3 {
                    0 => RegGarbage::AllOnes,
                    1 => RegGarbage::Fatal,
                    _ => RegGarbage::Raw(raw),
                };
                self.dev.borrow_mut().reg_garbage = Some((g, 1 + u32::from(count % 6)));
            }
            Fault::WriteFail { count, silent } => {
                let mut dev = self.dev.borrow_mut();
                if silent {
                    dev.drop_doorbells = 1 + u32::from(count % 3);
                } else {
                    dev.fail_writes = 1 + u32::from(count % 3);
                }
            }
            Fault::Vanish {
                count,
                forever,
                then,
            } => {
                let forever = forever
                    && SLOW_BUDGET
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                        .is_ok();
                {
                    let mut dev = self.dev.borrow_mut();
                    dev.vanished = u32::from(count % 6);
                    dev.vanished_forever = forever;
                }
                match then % 3 {
                    0 => self.reset(),
                    1 => self.timeouts(2),
                    _ => self.poll_all(false),
                }
                self.dev.borrow_mut().vanished_forever = false;
            }
        }
    }
}

fn run(setup: &Setup, ops: &[Op]) {
    let dev = Rc::new(RefCell::new(Dev::new()));
    let io_queues = 1 + u16::from(setup.io_queues % 3);
    let entries = 2 + u16::from(setup.entries % 15);
    {
        let mut d = dev.borrow_mut();
        d.abort_completes = setup.abort_completes;
        d.io_policy = if setup.nth & 0x80 != 0 {
            IoPolicy::Hold
        } else {
            IoPolicy::Complete(0)
        };
        if setup.mqes % 4 == 0 {
            d.cap = d.cap & !0xFFFF | u64::from(setup.mqes / 4);
        }
        match setup.fault % 32 {
            16 => {
                // Any CAP but a long CAP.TO; half the time one the driver accepts.
                let mut cap = setup.raw & !(0xFF << 24);
                if setup.raw & 1 != 0 {
                    cap = cap & !(0xF << 48) | reg::CAP_CSS_NVM;
                }
                d.cap = cap;
            }
            17 => d.identify_seed = Some(setup.raw),
            18 => d.grant = Some(setup.raw as u32),
            19..=22 => {
                for _ in 0..setup.nth % 8 {
                    d.admin_script.push_back(AdminAction::Correct);
                }
                d.admin_script.push_back(AdminAction::decode(
                    1 + setup.fault % 4,
                    setup.status,
                    setup.junk,
                ));
            }
            23 => {
                let g = match setup.raw % 3 {
                    0 => RegGarbage::AllOnes,
                    1 => RegGarbage::Fatal,
                    _ => RegGarbage::Raw((setup.raw >> 8) as u32),
                };
                d.reg_garbage = Some((g, 1 + (setup.raw >> 40) as u32 % 6));
            }
            _ => {}
        }
    }
    let opts = options(io_queues, entries, setup.host_id);
    let mem = DmaMem::create("driver", opts.dma_len(), 0).expect("driver DMA memory");
    let c = match Controller::new(Fake(dev.clone()), mem, opts) {
        Ok(c) => c,
        Err(e) => {
            // A typed error is all bring-up owes a broken device.
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let mut r = Run {
        c,
        dev,
        m: Model::default(),
        io_queues,
        seen_resets: 0,
    };
    let data = DmaMem::create("data", DATA_PAGES * PAGE, DATA_IOVA).expect("data DMA memory");
    r.c.add_memory(data).expect("map data memory");

    for op in ops.iter().take(MAX_OPS) {
        let t = Instant::now();
        r.op(op);
        if std::env::var_os("FUZZ_NVME_TRACE").is_some() {
            eprintln!("{:?} {op:?}", t.elapsed());
        }
    }

    // The device behaves again: what was delivered is collected, a reset reports every
    // command still outstanding, and the controller works again.
    r.dev.borrow_mut().behave();
    r.poll_all(false);
    let mut out = Vec::new();
    let reset = r.c.reset(&mut out);
    r.m.deliver(&out, true, &r.dev.borrow());
    r.m.must_fail = reset.is_err();
    r.after_reset();
    reset.expect("a reset of a well-behaved device succeeds");
    let tag = r.submit(1, false, 0, 0).expect("submit after reset");
    r.c.ring(1).expect("ring after reset");
    let mut out = Vec::new();
    let n = r.c.poll(1, &mut out).expect("poll after reset");
    assert_eq!(n, 1);
    assert_eq!((out[0].tag, &out[0].result), (tag, &Ok(0)));
}

#[test]
fn garbage_completions_get_typed_errors_and_never_foreign_tags() {
    bolero::check!()
        .with_iterations(ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_type::<(Setup, Vec<Op>)>()
        .for_each(|(setup, ops)| run(setup, ops));
}

// Deterministic cases.

/// A controller on a well-behaved fake device that holds I/O commands until told.
fn rig(io_queues: u16) -> (Controller<Fake>, Rc<RefCell<Dev>>) {
    let dev = Rc::new(RefCell::new(Dev::new()));
    let opts = options(io_queues, 8, false);
    let mem = DmaMem::create("driver", opts.dma_len(), 0).expect("driver DMA memory");
    let mut c = Controller::new(Fake(dev.clone()), mem, opts).expect("bring-up");
    let data = DmaMem::create("data", DATA_PAGES * PAGE, DATA_IOVA).expect("data DMA memory");
    c.add_memory(data).expect("map data memory");
    (c, dev)
}

/// Submits and rings a one-block read tagged `tag` on `qid`; returns its command id.
fn read(c: &mut Controller<Fake>, dev: &Rc<RefCell<Dev>>, qid: u16, tag: u64) -> u16 {
    let mut cmd = IoCmd::read(1, 0, 1, 512);
    cmd.sqe.cdw2 = tag as u32;
    cmd.sqe.cdw3 = MARK;
    let seg = Seg {
        iova: DATA_IOVA,
        len: 512,
    };
    c.submit(qid, cmd, &[seg], tag).expect("submit");
    c.ring(qid).expect("ring");
    dev.borrow().cid_of(qid, tag).expect("command in its queue")
}

fn sq_head(dev: &Rc<RefCell<Dev>>, qid: u16) -> u16 {
    dev.borrow().sqs.get(&qid).expect("queue").head as u16
}

fn assert_failed<T: std::fmt::Debug>(r: Result<T, NvmeError>) {
    assert!(matches!(r, Err(NvmeError::Failed(_))), "{r:?}");
}

#[test]
fn a_completion_for_a_command_never_submitted_fails_the_controller() {
    let (mut c, dev) = rig(1);
    let cid = read(&mut c, &dev, 1, 7);
    let hd = sq_head(&dev, 1);
    dev.borrow_mut().post(1, cid + 1, 1, hd, 0, 0);
    let mut out = Vec::new();
    let r = c.poll(1, &mut out);
    assert!(
        matches!(r, Err(NvmeError::BadCompletion { qid: 1, .. })),
        "{r:?}"
    );
    assert!(out.is_empty());
    assert_failed(c.submit(1, IoCmd::flush(1), &[], 8));
    assert_failed(c.exec(1, IoCmd::flush(1), &[], Duration::from_millis(1)));
    c.reset(&mut out).expect("reset");
    assert_eq!(
        out,
        [Done {
            qid: 1,
            tag: 7,
            result: Err(CmdError::Reset)
        }]
    );
    c.submit(1, IoCmd::flush(1), &[], 9)
        .expect("commands flow again after the reset");
}

#[test]
fn a_completion_naming_another_queue_fails_the_controller() {
    let (mut c, dev) = rig(2);
    read(&mut c, &dev, 1, 1);
    let other = read(&mut c, &dev, 2, 2);
    // On CQ 1, an entry for the command pending on SQ 2 (same cid space, other queue).
    let hd = sq_head(&dev, 2);
    dev.borrow_mut().post(1, other, 2, hd, 0, 0);
    let mut out = Vec::new();
    let r = c.poll(1, &mut out);
    assert!(
        matches!(r, Err(NvmeError::BadCompletion { qid: 1, .. })),
        "{r:?}"
    );
    assert!(out.is_empty());
    assert_failed(c.poll(2, &mut out));
    assert_failed(c.submit(2, IoCmd::flush(1), &[], 3));
    c.reset(&mut out).expect("reset");
    out.sort_by_key(|d| d.tag);
    let tags: Vec<(u16, u64, Result<u32, CmdError>)> =
        out.into_iter().map(|d| (d.qid, d.tag, d.result)).collect();
    assert_eq!(
        tags,
        [(1, 1, Err(CmdError::Reset)), (2, 2, Err(CmdError::Reset))]
    );
}

#[test]
fn a_valid_completion_before_garbage_is_delivered_then_the_error() {
    let (mut c, dev) = rig(1);
    let first = read(&mut c, &dev, 1, 1);
    read(&mut c, &dev, 1, 2);
    {
        let mut d = dev.borrow_mut();
        d.complete(1, first, 0, 0xABCD);
        let hd = d.sqs[&1].head as u16;
        d.post(1, 0x3FF, 1, hd, 0, 0);
    }
    let mut out = Vec::new();
    assert_eq!(c.poll(1, &mut out).expect("the valid one first"), 1);
    assert_eq!(
        out,
        [Done {
            qid: 1,
            tag: 1,
            result: Ok(0xABCD)
        }]
    );
    out.clear();
    match c.poll(1, &mut out) {
        Err(NvmeError::Failed(why)) => assert!(why.contains("bad completion"), "{why}"),
        r => panic!("expected the bad completion's failure, got {r:?}"),
    }
    assert_failed(c.submit(1, IoCmd::flush(1), &[], 3));
    c.reset(&mut out).expect("reset");
    assert_eq!(
        out,
        [Done {
            qid: 1,
            tag: 2,
            result: Err(CmdError::Reset)
        }],
        "only the command still outstanding is reported by the reset"
    );
}

// Reproductions of driver bugs the fuzz target found, kept as regression tests.

/// A command the device answers with an entry for a command id never submitted.
fn garbage_on_doorbell(dev: &Rc<RefCell<Dev>>) {
    dev.borrow_mut().io_policy = IoPolicy::Junk(Junk {
        cid: 3, // the lowest command id never fetched on the queue
        ..Junk::default()
    });
}

#[test]
fn reset_reports_only_the_callers_commands() {
    let (mut c, dev) = rig(1);
    garbage_on_doorbell(&dev);
    let r = c.exec(1, IoCmd::flush(1), &[], Duration::from_millis(1));
    assert!(matches!(r, Err(NvmeError::BadCompletion { .. })), "{r:?}");
    let mut out = Vec::new();
    c.reset(&mut out).expect("reset");
    // Nothing of the caller's was outstanding; today `out` holds the flush's internal tag
    // (1 << 63) with `Err(Reset)`.
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn exec_keeps_completions_found_before_a_bad_entry() {
    let (mut c, dev) = rig(1);
    let cid = read(&mut c, &dev, 1, 1);
    dev.borrow_mut().complete(1, cid, 0, 5);
    garbage_on_doorbell(&dev);
    // exec reaps tag 1's completion, then the bad entry, and returns the error ...
    let r = c.exec(1, IoCmd::flush(1), &[], Duration::from_millis(1));
    assert!(matches!(r, Err(NvmeError::BadCompletion { .. })), "{r:?}");
    let mut out = Vec::new();
    c.reset(&mut out).expect("reset");
    c.poll(1, &mut out).expect("poll");
    // ... and tag 1 must still reach the caller exactly once (as its Ok(5)); today it is
    // gone: not outstanding any more, so not reported by the reset either.
    let mine: Vec<&Done> = out.iter().filter(|d| d.tag & SYNC_TAG == 0).collect();
    assert_eq!(
        mine,
        [&Done {
            qid: 1,
            tag: 1,
            result: Ok(5)
        }]
    );
}

#[test]
fn an_answered_abort_does_not_reset_the_controller() {
    let (mut c, dev) = rig(1);
    read(&mut c, &dev, 1, 1);
    let t0 = Instant::now();
    let mut out = Vec::new();
    // Past the timeout: an Abort goes out; the (correct) device aborts the read and completes
    // the Abort.
    c.check_timeouts(t0 + Duration::from_millis(25), &mut out)
        .expect("abort");
    c.poll(1, &mut out).expect("poll");
    assert_eq!(
        out,
        [Done {
            qid: 1,
            tag: 1,
            result: Err(CmdError::TimedOut)
        }]
    );
    out.clear();
    // Nothing is outstanding any more, yet the Abort's admin slot is still busy (nobody polls
    // the admin queue outside exec): its deadline resets the controller.
    c.check_timeouts(t0 + Duration::from_secs(60), &mut out)
        .expect("check");
    assert_eq!(c.resets(), 0, "nothing was stuck: {out:?}");
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn an_sq_head_beyond_the_tail_is_a_bad_completion() {
    let (mut c, dev) = rig(1);
    let cid = read(&mut c, &dev, 1, 1);
    // One entry submitted (tail 1); the device claims it has fetched two.
    dev.borrow_mut().post(1, cid, 1, 2, 0, 0);
    let mut out = Vec::new();
    let r = c.poll(1, &mut out);
    // Today: accepted, and with nothing outstanding the queue is full for good
    // (`submit` returns QueueFull until a reset).
    assert!(
        matches!(r, Err(NvmeError::BadCompletion { qid: 1, .. })),
        "{r:?}; then submit: {:?} with {} outstanding",
        c.submit(1, IoCmd::flush(1), &[], 2),
        c.outstanding(1)
    );
}

#[test]
fn zero_io_queues_do_not_panic() {
    let dev = Rc::new(RefCell::new(Dev::new()));
    let opts = Options {
        io_queues: 0,
        ..options(1, 8, false)
    };
    let mem = DmaMem::create("driver", opts.dma_len(), 0).expect("driver DMA memory");
    // Today: index out of bounds (bring-up creates `max(1)` queues, the layout has none).
    let c = Controller::new(Fake(dev), mem, opts);
    assert!(c.is_err() || c.is_ok_and(|c| c.io_queues() <= 1));
}

#[test]
fn polling_the_admin_queue_hands_out_no_driver_tags() {
    let (mut c, dev) = rig(1);
    read(&mut c, &dev, 1, 1);
    let mut out = Vec::new();
    // An Abort goes out and the device completes it on the admin queue.
    c.check_timeouts(Instant::now() + Duration::from_millis(25), &mut out)
        .expect("abort");
    // Today: Ok(1) with the Abort's completion (tag 1 << 63 | n, Ok(0)); `submit(0, ..)` is
    // refused with NoQueue(0), `poll(0, ..)` should be too.
    let r = c.poll(0, &mut out);
    assert!(out.iter().all(|d| d.tag & SYNC_TAG == 0), "{r:?}: {out:?}");
}
