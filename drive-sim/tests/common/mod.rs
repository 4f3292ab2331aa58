//! A tiny NVMe host driving a [`Controller`] through [`VecDma`] the way a PCIe driver would:
//! queues in host memory, doorbells through BAR0 writes, completions found by their phase tag.

#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_drive_sim::{Controller, Dma, Drive, DriveConfig, Progress, VecDma};
use duplex_nvme::cmd::{Cqe, Sqe};
use duplex_nvme::resv;
use duplex_nvme::spec::{admin, feat, io, reg};
use duplex_nvme::status::Status;

/// Host memory size.
pub const MEM: usize = 64 << 20;
/// Memory page size.
pub const PAGE: u64 = 4096;
/// Admin queue entries.
pub const ADMIN_ENTRIES: u32 = 32;
/// CC for an enable: EN, IOSQES 6, IOCQES 4.
pub const CC_ENABLE: u32 = 1 | (6 << 16) | (4 << 20);

/// A drive on a temporary file.
pub fn drive(cfg: DriveConfig) -> Arc<Drive> {
    let f = tempfile::tempfile().expect("temporary backing file");
    Drive::open(f, cfg).expect("drive opens")
}

/// A small drive with 512-byte blocks (so a few blocks per page).
pub fn small_cfg() -> DriveConfig {
    DriveConfig {
        block_size: 512,
        blocks: 4096,
        cache_blocks: 64,
        ..DriveConfig::default()
    }
}

/// The host side of one queue pair.
#[derive(Debug, Clone)]
pub struct Queue {
    pub qid: u16,
    pub sq: u64,
    pub cq: u64,
    pub sq_size: u32,
    pub cq_size: u32,
    pub tail: u32,
    pub head: u32,
    pub phase: bool,
}

/// A data buffer scattered over non-contiguous pages, with its PRPs.
#[derive(Debug, Clone)]
pub struct Buffer {
    pub pages: Vec<u64>,
    pub offset: u64,
    pub len: u64,
    pub prp1: u64,
    pub prp2: u64,
}

pub struct Host {
    pub ctrl: Controller,
    pub dma: VecDma,
    next_page: u64,
    pub queues: BTreeMap<u16, Queue>,
    next_cid: u16,
    pub now: Instant,
    /// Interrupt vectors signalled so far.
    pub irqs: u64,
}

impl Host {
    pub fn new(drive: &Arc<Drive>, cntlid: u16) -> Self {
        Self {
            ctrl: Controller::new(Arc::clone(drive), cntlid),
            dma: VecDma::new(MEM),
            next_page: PAGE,
            queues: BTreeMap::new(),
            next_cid: 1,
            now: Instant::now(),
            irqs: 0,
        }
    }

    /// An enabled host with `pairs` I/O queue pairs of `entries` entries (qids 1..=pairs).
    pub fn ready(drive: &Arc<Drive>, cntlid: u16, pairs: u16, entries: u32) -> Self {
        let mut h = Self::new(drive, cntlid);
        h.enable();
        for q in 1..=pairs {
            h.create_pair(q, entries);
        }
        h
    }

    /// `pages` contiguous zeroed pages of host memory.
    pub fn alloc(&mut self, pages: u64) -> u64 {
        let a = self.next_page;
        self.next_page += pages * PAGE;
        assert!(self.next_page <= MEM as u64, "test host memory exhausted");
        a
    }

    pub fn reg32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ctrl.read_reg(off, &mut b).expect("register read");
        u32::from_le_bytes(b)
    }

    pub fn reg64(&mut self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.ctrl.read_reg(off, &mut b).expect("register read");
        u64::from_le_bytes(b)
    }

    pub fn set_reg32(&mut self, off: u64, v: u32) {
        self.ctrl
            .write_reg(off, &v.to_le_bytes())
            .expect("register write");
    }

    pub fn set_reg64(&mut self, off: u64, v: u64) {
        self.ctrl
            .write_reg(off, &v.to_le_bytes())
            .expect("register write");
    }

    pub fn csts(&mut self) -> u32 {
        self.reg32(reg::CSTS)
    }

    /// Programs the admin queue and sets CC (EN included in `cc`).
    pub fn enable_with(&mut self, entries: u32, cc: u32) {
        let sq = self.alloc(1);
        let cq = self.alloc(1);
        let z = entries - 1;
        self.set_reg32(reg::AQA, z | (z << 16));
        self.set_reg64(reg::ASQ, sq);
        self.set_reg64(reg::ACQ, cq);
        self.set_reg32(reg::CC, cc);
        self.queues.insert(
            0,
            Queue {
                qid: 0,
                sq,
                cq,
                sq_size: entries,
                cq_size: entries,
                tail: 0,
                head: 0,
                phase: true,
            },
        );
    }

    /// The standard enable sequence; asserts CSTS.RDY.
    pub fn enable(&mut self) {
        self.enable_with(ADMIN_ENTRIES, CC_ENABLE);
        assert_eq!(self.csts() & 3, reg::CSTS_RDY, "controller ready");
    }

    /// Clears CC.EN (Controller Level Reset) and forgets the host's queues.
    pub fn disable(&mut self) {
        let cc = self.reg32(reg::CC);
        self.set_reg32(reg::CC, cc & !1);
        self.queues.clear();
    }

    pub fn process(&mut self) -> Progress {
        let p = self.ctrl.process(&self.dma, self.now);
        self.irqs |= p.irqs;
        p
    }

    pub fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    pub fn sq_doorbell(qid: u16) -> u64 {
        reg::DOORBELLS + 8 * u64::from(qid)
    }

    pub fn cq_doorbell(qid: u16) -> u64 {
        reg::DOORBELLS + 8 * u64::from(qid) + 4
    }

    /// Places `sqe` (with its own CID) in queue `qid` and rings the doorbell.
    pub fn submit_raw(&mut self, qid: u16, sqe: Sqe) {
        let q = self.queues.get_mut(&qid).expect("queue exists on the host");
        let addr = q.sq + u64::from(q.tail) * 64;
        q.tail = (q.tail + 1) % q.sq_size;
        let tail = q.tail;
        self.dma.write(addr, &sqe.to_bytes()).expect("SQ in memory");
        self.set_reg32(Self::sq_doorbell(qid), tail);
    }

    /// Submits `sqe` with a fresh CID; returns the CID.
    pub fn submit(&mut self, qid: u16, mut sqe: Sqe) -> u16 {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        sqe.cid = cid;
        self.submit_raw(qid, sqe);
        cid
    }

    /// New completions of queue `qid`, without ringing the CQ head doorbell.
    pub fn peek(&mut self, qid: u16) -> Vec<Cqe> {
        let q = self.queues.get_mut(&qid).expect("queue exists on the host");
        let mut out = Vec::new();
        loop {
            let addr = q.cq + u64::from(q.head) * 16;
            let b = self.dma.read_vec(addr, 16).expect("CQ in memory");
            let mut a = [0u8; 16];
            a.copy_from_slice(&b);
            let cqe: Cqe = cqe_from(&a);
            if (cqe.status & 1 != 0) != q.phase {
                break;
            }
            out.push(cqe);
            q.head += 1;
            if q.head == q.cq_size {
                q.head = 0;
                q.phase = !q.phase;
            }
        }
        out
    }

    /// New completions of queue `qid`; rings the CQ head doorbell if there were any.
    pub fn reap(&mut self, qid: u16) -> Vec<Cqe> {
        let out = self.peek(qid);
        if !out.is_empty() {
            self.ring_cq(qid);
        }
        out
    }

    pub fn ring_cq(&mut self, qid: u16) {
        let head = self.queues.get(&qid).expect("queue").head;
        self.set_reg32(Self::cq_doorbell(qid), head);
    }

    /// Submits, processes, and returns the one completion.
    pub fn run(&mut self, qid: u16, sqe: Sqe) -> Cqe {
        let cid = self.submit(qid, sqe);
        self.process();
        let c = self.reap(qid);
        assert_eq!(c.len(), 1, "exactly one completion for cid {cid}: {c:?}");
        let c = c.into_iter().next().expect("one completion");
        assert_eq!(c.cid, cid);
        assert_eq!(c.sqid, qid);
        c
    }

    pub fn admin(&mut self, sqe: Sqe) -> Cqe {
        self.run(0, sqe)
    }

    /// A buffer of `len` bytes starting `offset` into its first page, over non-contiguous
    /// pages; a PRP list (if needed) starts `list_off` bytes into its page.
    pub fn buffer_at(&mut self, len: u64, offset: u64, list_off: u64) -> Buffer {
        let n = (offset + len).div_ceil(PAGE).max(1);
        // Every other page, highest first: never contiguous, never ascending.
        let base = self.alloc(2 * n);
        let pages: Vec<u64> = (0..n).rev().map(|i| base + 2 * i * PAGE).collect();
        let first = pages.first().copied().unwrap_or(0);
        let prp1 = first + offset;
        let prp2 = match pages.len() {
            0 | 1 => 0,
            2 => pages.get(1).copied().unwrap_or(0),
            _ => self.prp_list(pages.get(1..).unwrap_or(&[]), list_off),
        };
        Buffer {
            pages,
            offset,
            len,
            prp1,
            prp2,
        }
    }

    pub fn buffer(&mut self, len: u64) -> Buffer {
        self.buffer_at(len, 0, 0)
    }

    /// Writes a PRP list for `entries`, chaining through the last entry of each list page.
    fn prp_list(&mut self, entries: &[u64], list_off: u64) -> u64 {
        let start = self.alloc(1) + list_off;
        let mut at = start;
        let mut i = 0;
        loop {
            let slots = ((PAGE - at % PAGE) / 8) as usize;
            let rest = entries.get(i..).unwrap_or(&[]);
            if rest.len() <= slots {
                for (k, e) in rest.iter().enumerate() {
                    self.dma
                        .write(at + 8 * k as u64, &e.to_le_bytes())
                        .expect("list in memory");
                }
                return start;
            }
            for (k, e) in rest.iter().take(slots - 1).enumerate() {
                self.dma
                    .write(at + 8 * k as u64, &e.to_le_bytes())
                    .expect("list in memory");
            }
            let next = self.alloc(1);
            self.dma
                .write(at + 8 * (slots as u64 - 1), &next.to_le_bytes())
                .expect("list in memory");
            at = next;
            i += slots - 1;
        }
    }

    /// Copies `data` into the buffer.
    pub fn fill(&self, b: &Buffer, data: &[u8]) {
        let mut off = b.offset;
        let mut done = 0usize;
        for p in &b.pages {
            if done >= data.len() {
                break;
            }
            let n = ((PAGE - off) as usize).min(data.len() - done);
            self.dma
                .write(p + off, data.get(done..done + n).expect("in range"))
                .expect("buffer in memory");
            done += n;
            off = 0;
        }
    }

    /// The buffer's contents.
    pub fn contents(&self, b: &Buffer) -> Vec<u8> {
        let mut out = Vec::new();
        let mut off = b.offset;
        let len = b.len as usize;
        for p in &b.pages {
            if out.len() >= len {
                break;
            }
            let n = ((PAGE - off) as usize).min(len - out.len());
            out.extend(self.dma.read_vec(p + off, n).expect("buffer in memory"));
            off = 0;
        }
        out
    }

    pub fn identify(&mut self, cns: u8, nsid: u32) -> (Cqe, Vec<u8>) {
        let b = self.buffer(4096);
        let c = self.admin(with_prps(
            Sqe {
                opcode: admin::IDENTIFY,
                nsid,
                cdw10: u32::from(cns),
                ..Sqe::default()
            },
            &b,
        ));
        (c, self.contents(&b))
    }

    /// Create I/O CQ `qid` (interrupts on vector `qid`) and SQ `qid` using it.
    pub fn create_pair(&mut self, qid: u16, entries: u32) {
        let c = self.create_cq(qid, entries, true, qid);
        assert_eq!(c.status(), Status::SUCCESS, "create CQ {qid}");
        let c = self.create_sq(qid, entries, qid);
        assert_eq!(c.status(), Status::SUCCESS, "create SQ {qid}");
    }

    pub fn create_cq(&mut self, qid: u16, entries: u32, ien: bool, iv: u16) -> Cqe {
        let pages = (u64::from(entries) * 16).div_ceil(PAGE);
        let cq = self.alloc(pages);
        let c = self.admin(Sqe {
            opcode: admin::CREATE_IO_CQ,
            dptr: prp_bytes(cq, 0),
            cdw10: u32::from(qid) | ((entries - 1) << 16),
            cdw11: 1 | (u32::from(ien) << 1) | (u32::from(iv) << 16),
            ..Sqe::default()
        });
        if c.status() == Status::SUCCESS {
            let q = self.queues.entry(qid).or_insert(Queue {
                qid,
                sq: 0,
                cq,
                sq_size: 0,
                cq_size: entries,
                tail: 0,
                head: 0,
                phase: true,
            });
            q.cq = cq;
            q.cq_size = entries;
            q.head = 0;
            q.phase = true;
        }
        c
    }

    pub fn create_sq(&mut self, qid: u16, entries: u32, cqid: u16) -> Cqe {
        let pages = (u64::from(entries) * 64).div_ceil(PAGE);
        let sq = self.alloc(pages);
        let c = self.admin(Sqe {
            opcode: admin::CREATE_IO_SQ,
            dptr: prp_bytes(sq, 0),
            cdw10: u32::from(qid) | ((entries - 1) << 16),
            cdw11: 1 | (u32::from(cqid) << 16),
            ..Sqe::default()
        });
        if c.status() == Status::SUCCESS {
            if let Some(q) = self.queues.get_mut(&qid) {
                q.sq = sq;
                q.sq_size = entries;
                q.tail = 0;
            }
        }
        c
    }

    pub fn write_sqe(&mut self, lba: u64, b: &Buffer, nlb: u32, fua: bool) -> Sqe {
        with_prps(
            Sqe {
                opcode: io::WRITE,
                nsid: 1,
                cdw10: lba as u32,
                cdw11: (lba >> 32) as u32,
                cdw12: (nlb - 1) | (u32::from(fua) << 30),
                ..Sqe::default()
            },
            b,
        )
    }

    pub fn read_sqe(&mut self, lba: u64, b: &Buffer, nlb: u32) -> Sqe {
        with_prps(
            Sqe {
                opcode: io::READ,
                nsid: 1,
                cdw10: lba as u32,
                cdw11: (lba >> 32) as u32,
                cdw12: nlb - 1,
                ..Sqe::default()
            },
            b,
        )
    }

    /// Writes `data` (whole blocks of `bs`) at `lba` on queue `qid`.
    pub fn write(&mut self, qid: u16, lba: u64, data: &[u8], bs: u32, fua: bool) -> Cqe {
        let b = self.buffer(data.len() as u64);
        self.fill(&b, data);
        let sqe = self.write_sqe(lba, &b, (data.len() / bs as usize) as u32, fua);
        self.run(qid, sqe)
    }

    /// Reads `nlb` blocks of `bs` at `lba` on queue `qid`.
    pub fn read(&mut self, qid: u16, lba: u64, nlb: u32, bs: u32) -> (Cqe, Vec<u8>) {
        let b = self.buffer(u64::from(nlb) * u64::from(bs));
        let sqe = self.read_sqe(lba, &b, nlb);
        let c = self.run(qid, sqe);
        (c, self.contents(&b))
    }

    pub fn flush(&mut self, qid: u16) -> Cqe {
        self.run(
            qid,
            Sqe {
                opcode: io::FLUSH,
                nsid: 1,
                ..Sqe::default()
            },
        )
    }

    pub fn set_feature(&mut self, fid: u8, cdw11: u32) -> Cqe {
        self.admin(Sqe {
            opcode: admin::SET_FEATURES,
            nsid: 1,
            cdw10: u32::from(fid),
            cdw11,
            ..Sqe::default()
        })
    }

    pub fn get_feature(&mut self, fid: u8, cdw11: u32) -> Cqe {
        self.admin(Sqe {
            opcode: admin::GET_FEATURES,
            nsid: 1,
            cdw10: u32::from(fid),
            cdw11,
            ..Sqe::default()
        })
    }

    /// Set Features Host Identifier, 64-bit.
    pub fn set_host_id(&mut self, id: u64) -> Cqe {
        let b = self.buffer(8);
        self.fill(&b, &id.to_le_bytes());
        self.admin(with_prps(
            Sqe {
                opcode: admin::SET_FEATURES,
                cdw10: u32::from(feat::HOST_ID),
                ..Sqe::default()
            },
            &b,
        ))
    }

    /// Get Log Page `lid`, `len` bytes at `offset`.
    pub fn log_page(&mut self, lid: u8, len: u32, offset: u64, rae: bool) -> (Cqe, Vec<u8>) {
        let b = self.buffer(u64::from(len));
        let numd = len / 4 - 1;
        let c = self.admin(with_prps(
            Sqe {
                opcode: admin::GET_LOG_PAGE,
                nsid: 0xFFFF_FFFF,
                cdw10: u32::from(lid) | (u32::from(rae) << 15) | ((numd & 0xFFFF) << 16),
                cdw11: numd >> 16,
                cdw12: offset as u32,
                cdw13: (offset >> 32) as u32,
                ..Sqe::default()
            },
            &b,
        ));
        (c, self.contents(&b))
    }

    /// A reservation command with its data on queue `qid`.
    pub fn resv_cmd(&mut self, qid: u16, opcode: u8, cdw10: u32, data: &[u8]) -> Cqe {
        let b = self.buffer(data.len() as u64);
        self.fill(&b, data);
        self.run(
            qid,
            with_prps(
                Sqe {
                    opcode,
                    nsid: 1,
                    cdw10,
                    ..Sqe::default()
                },
                &b,
            ),
        )
    }

    pub fn register(&mut self, qid: u16, key: u64) -> Cqe {
        let r = resv::Register {
            action: resv::RegisterAction::Register,
            iekey: false,
            cptpl: resv::Cptpl::NoChange,
            crkey: 0,
            nrkey: key,
        };
        self.resv_cmd(qid, resv::opc::REGISTER, r.cdw10(), &r.data())
    }

    pub fn acquire(
        &mut self,
        qid: u16,
        action: resv::AcquireAction,
        rtype: resv::ResvType,
        crkey: u64,
        prkey: u64,
    ) -> Cqe {
        let a = resv::Acquire {
            action,
            rtype,
            crkey,
            prkey,
        };
        self.resv_cmd(qid, resv::opc::ACQUIRE, a.cdw10(), &a.data())
    }

    pub fn release(&mut self, qid: u16, action: resv::ReleaseAction, rtype: u8, key: u64) -> Cqe {
        let r = resv::Release {
            action,
            rtype,
            crkey: key,
        };
        self.resv_cmd(qid, resv::opc::RELEASE, r.cdw10(), &r.data())
    }

    /// Reservation Report (`len` bytes, EDS as given).
    pub fn report(&mut self, qid: u16, len: u32, eds: bool) -> (Cqe, Vec<u8>) {
        let b = self.buffer(u64::from(len));
        let c = self.run(
            qid,
            with_prps(
                Sqe {
                    opcode: resv::opc::REPORT,
                    nsid: 1,
                    cdw10: len / 4 - 1,
                    cdw11: u32::from(eds),
                    ..Sqe::default()
                },
                &b,
            ),
        );
        (c, self.contents(&b))
    }
}

/// The PRP fields of an SQE.
pub fn prp_bytes(prp1: u64, prp2: u64) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&prp1.to_le_bytes());
    d[8..].copy_from_slice(&prp2.to_le_bytes());
    d
}

pub fn with_prps(mut sqe: Sqe, b: &Buffer) -> Sqe {
    sqe.dptr = prp_bytes(b.prp1, b.prp2);
    sqe
}

pub fn cqe_from(b: &[u8; 16]) -> Cqe {
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    Cqe {
        dw0: u32_at(0),
        dw1: u32_at(4),
        sqhd: u16_at(8),
        sqid: u16_at(10),
        cid: u16_at(12),
        status: u16_at(14),
    }
}

/// Little-endian readers for test assertions.
pub fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// A recognisable pattern of `len` bytes.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}
