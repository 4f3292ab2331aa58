//! Fuzz target for the controller: two enabled controllers (the two ports of one drive) fed
//! arbitrary register accesses, doorbells, raw and structured commands, host memory contents
//! (queues, PRP lists, data), faults and power cycles.
//!
//! Property: nothing panics, whatever the host does or its memory contains, and the controller
//! keeps answering register reads.
//!
//! Under plain `cargo test` bolero runs the target with its random engine for a bounded
//! number of iterations and at most [`TIME_CAP`]:
//!
//! ```text
//! cargo test -p duplex-drive-sim --test fuzz_ctrl
//! ```
//!
//! To run longer, override the bounds with bolero's environment variables, e.g.
//!
//! ```text
//! BOLERO_RANDOM_TEST_TIME_MS=600000 BOLERO_RANDOM_ITERATIONS=18446744073709551615 \
//!     cargo test --release -p duplex-drive-sim --test fuzz_ctrl
//! ```
//!
//! or fuzz with coverage guidance (nightly, `cargo install cargo-bolero`):
//!
//! ```text
//! cargo +nightly bolero test -p duplex-drive-sim --test fuzz_ctrl arbitrary_host --engine libfuzzer -T 10min
//! ```
//!
//! A failure prints `BOLERO_RANDOM_SEED=...`; set that variable to replay it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_drive_sim::{Controller, Dma, Drive, DriveConfig, Fault, FaultOp, VecDma, BAR0_SIZE};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::resv::opc;
use duplex_nvme::spec::{admin, feat, io, reg};

/// Iterations under `cargo test`, unless `BOLERO_RANDOM_ITERATIONS` says otherwise.
const ITERATIONS: usize = 200_000;
/// Wall-clock cap, unless `BOLERO_RANDOM_TEST_TIME_MS` says otherwise.
const TIME_CAP: Duration = Duration::from_secs(5);

/// Host memory per port: 64 pages.
const MEM: usize = 64 * 4096;
const ASQ: u64 = 0x1000;
const ACQ: u64 = 0x2000;
/// I/O queue pairs 1 and 2: SQ at `IO_SQ + (q - 1) * 0x2000`, CQ one page later.
const IO_SQ: u64 = 0x3000;
/// A PRP list page pointing at the scratch pages.
const LIST: u64 = 0x8000;
/// Scratch data pages.
const SCRATCH: u64 = 0x10000;
const SCRATCH_PAGES: u64 = 32;
const ENTRIES: u32 = 16;
const BLOCKS: u64 = 256;

#[derive(Debug, Clone, bolero::TypeGenerator)]
enum Op {
    /// A 4- or 8-byte register write at a naturally aligned offset.
    Reg {
        port: bool,
        dword: u16,
        value: u64,
        wide: bool,
    },
    /// A register access of any size and offset.
    RawReg {
        port: bool,
        offset: u16,
        len: u8,
        write: bool,
    },
    /// A doorbell write, usually for an existing queue.
    Doorbell {
        port: bool,
        qid: u8,
        cq: bool,
        value: u16,
    },
    /// 64 arbitrary bytes submitted as a command.
    Raw {
        port: bool,
        qid: u8,
        bytes: [u8; 64],
    },
    /// A command built from a table of opcodes, with plausible fields.
    Cmd {
        port: bool,
        qid: u8,
        opcode: u8,
        nsid: u8,
        cdw10: u32,
        cdw11: u32,
        cdw12: u32,
        prp: u8,
    },
    /// Overwrites host memory.
    Poke {
        port: bool,
        page: u8,
        offset: u16,
        bytes: Vec<u8>,
    },
    /// Runs the controller, maybe later.
    Process {
        port: bool,
        advance_us: u16,
    },
    /// Injects a fault.
    Inject {
        which: u8,
        a: u8,
        b: u8,
    },
    ClearFaults,
    /// Power cut and back on, then the standard enable sequence.
    PowerCycle,
    /// Controller reset and the standard enable sequence.
    Reenable {
        port: bool,
    },
}

const OPCODES: [u8; 21] = [
    io::READ,
    io::WRITE,
    io::FLUSH,
    io::WRITE_ZEROES,
    io::DSM,
    io::COMPARE,
    opc::REGISTER,
    opc::REPORT,
    opc::ACQUIRE,
    opc::RELEASE,
    admin::IDENTIFY,
    admin::GET_LOG_PAGE,
    admin::SET_FEATURES,
    admin::GET_FEATURES,
    admin::CREATE_IO_CQ,
    admin::CREATE_IO_SQ,
    admin::DELETE_IO_SQ,
    admin::DELETE_IO_CQ,
    admin::ABORT,
    admin::ASYNC_EVENT,
    admin::KEEP_ALIVE,
];

/// One port: a controller and the host's view of its queues.
struct Port {
    ctrl: Controller,
    dma: VecDma,
    tails: [u32; 3],
    heads: [u32; 3],
    phases: [bool; 3],
    cid: u16,
}

impl Port {
    fn new(drive: &Arc<Drive>, cntlid: u16) -> Self {
        let mut p = Self {
            ctrl: Controller::new(Arc::clone(drive), cntlid),
            dma: VecDma::new(MEM),
            tails: [0; 3],
            heads: [0; 3],
            phases: [true; 3],
            cid: 0,
        };
        // The PRP list page points at the scratch pages in order.
        for i in 0..512u64 {
            let e = SCRATCH + (i % SCRATCH_PAGES) * 4096;
            let _ = p.dma.write(LIST + 8 * i, &e.to_le_bytes());
        }
        p.enable(cntlid);
        p
    }

    fn sq(q: usize) -> u64 {
        if q == 0 {
            ASQ
        } else {
            IO_SQ + (q as u64 - 1) * 0x2000
        }
    }

    fn cq(q: usize) -> u64 {
        if q == 0 {
            ACQ
        } else {
            IO_SQ + (q as u64 - 1) * 0x2000 + 0x1000
        }
    }

    fn w32(&mut self, off: u64, v: u32) {
        let _ = self.ctrl.write_reg(off, &v.to_le_bytes());
    }

    /// The standard bring-up: admin queue, host identifier, two I/O queue pairs.
    fn enable(&mut self, host: u16) {
        self.w32(reg::CC, 0);
        self.tails = [0; 3];
        self.heads = [0; 3];
        self.phases = [true; 3];
        let z = ENTRIES - 1;
        self.w32(reg::AQA, z | (z << 16));
        let _ = self.ctrl.write_reg(reg::ASQ, &ASQ.to_le_bytes());
        let _ = self.ctrl.write_reg(reg::ACQ, &ACQ.to_le_bytes());
        self.w32(reg::CC, 1 | (6 << 16) | (4 << 20));
        let _ = self.dma.write(SCRATCH, &u64::from(host).to_le_bytes());
        self.submit(
            0,
            Sqe {
                opcode: admin::SET_FEATURES,
                cdw10: u32::from(feat::HOST_ID),
                dptr: prp(SCRATCH, 0),
                ..Sqe::default()
            },
        );
        for q in 1..=2u32 {
            self.submit(
                0,
                Sqe {
                    opcode: admin::CREATE_IO_CQ,
                    dptr: prp(Self::cq(q as usize), 0),
                    cdw10: q | (z << 16),
                    cdw11: 0b11 | (q << 16),
                    ..Sqe::default()
                },
            );
            self.submit(
                0,
                Sqe {
                    opcode: admin::CREATE_IO_SQ,
                    dptr: prp(Self::sq(q as usize), 0),
                    cdw10: q | (z << 16),
                    cdw11: 1 | (q << 16),
                    ..Sqe::default()
                },
            );
        }
        self.process(Instant::now());
    }

    fn submit(&mut self, q: usize, mut sqe: Sqe) {
        let Some(tail) = self.tails.get_mut(q) else {
            return;
        };
        self.cid = self.cid.wrapping_add(1);
        if sqe.cid == 0 {
            sqe.cid = self.cid;
        }
        let addr = Self::sq(q) + u64::from(*tail) * 64;
        *tail = (*tail + 1) % ENTRIES;
        let t = *tail;
        let _ = self.dma.write(addr, &sqe.to_bytes());
        self.w32(reg::DOORBELLS + 8 * q as u64, t);
    }

    /// Runs the controller and consumes whatever completions appeared.
    fn process(&mut self, now: Instant) {
        let p = self.ctrl.process(&self.dma, now);
        assert!(p.irqs < (1 << 17), "only vectors the controller has");
        for q in 0..3 {
            let mut n = 0;
            loop {
                let addr = Self::cq(q) + u64::from(self.heads[q]) * 16;
                let Ok(b) = self.dma.read_vec(addr + 14, 2) else {
                    break;
                };
                let phase = b.first().is_some_and(|x| x & 1 != 0);
                if phase != self.phases[q] || n >= ENTRIES {
                    break;
                }
                n += 1;
                self.heads[q] += 1;
                if self.heads[q] == ENTRIES {
                    self.heads[q] = 0;
                    self.phases[q] = !self.phases[q];
                }
            }
            if n > 0 {
                self.w32(reg::DOORBELLS + 8 * q as u64 + 4, self.heads[q]);
            }
        }
    }
}

fn prp(a: u64, b: u64) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&a.to_le_bytes());
    d[8..].copy_from_slice(&b.to_le_bytes());
    d
}

fn run(drive: &Arc<Drive>, ops: &[Op]) {
    drive.clear_faults();
    drive.power_cut();
    drive.power_on();
    drive.set_present(true);
    let mut ports = [Port::new(drive, 1), Port::new(drive, 2)];
    let mut now = Instant::now();
    for op in ops {
        match op.clone() {
            Op::Reg {
                port,
                dword,
                value,
                wide,
            } => {
                let p = &mut ports[usize::from(port)];
                let off = (u64::from(dword) * 4) % BAR0_SIZE;
                if wide {
                    let _ = p.ctrl.write_reg(off & !7, &value.to_le_bytes());
                } else {
                    let _ = p.ctrl.write_reg(off, &(value as u32).to_le_bytes());
                }
            }
            Op::RawReg {
                port,
                offset,
                len,
                write,
            } => {
                let p = &mut ports[usize::from(port)];
                let mut buf = vec![0xA5u8; usize::from(len % 17)];
                let off = u64::from(offset);
                if write {
                    let _ = p.ctrl.write_reg(off, &buf);
                } else {
                    let _ = p.ctrl.read_reg(off, &mut buf);
                }
            }
            Op::Doorbell {
                port,
                qid,
                cq,
                value,
            } => {
                let q = u64::from(qid % 5);
                let off = reg::DOORBELLS + 8 * q + if cq { 4 } else { 0 };
                ports[usize::from(port)].w32(off, u32::from(value % 20));
            }
            Op::Raw { port, qid, bytes } => {
                ports[usize::from(port)].submit(usize::from(qid % 3), Sqe::from_bytes(&bytes));
            }
            Op::Cmd {
                port,
                qid,
                opcode,
                nsid,
                mut cdw10,
                mut cdw11,
                mut cdw12,
                prp: sel,
            } => {
                let opcode = OPCODES[usize::from(opcode) % OPCODES.len()];
                let nsid = match nsid % 4 {
                    0 | 1 => 1,
                    2 => 0xFFFF_FFFF,
                    _ => u32::from(nsid),
                };
                if sel & 0x20 != 0 {
                    cdw10 %= BLOCKS as u32;
                    cdw11 &= 0xFFFF_00FF;
                }
                if sel & 0x40 != 0 {
                    cdw12 &= 0x4000_0007;
                }
                let page = SCRATCH + u64::from(sel % 8) * 4096;
                let off = if sel & 0x80 != 0 { 0x200 } else { 0 };
                let dptr = match sel % 3 {
                    0 => prp(page + off, page + 4096),
                    1 => prp(page + off, LIST),
                    _ => prp(u64::from(cdw12).wrapping_mul(0x1001), u64::from(cdw11) << 3),
                };
                ports[usize::from(port)].submit(
                    usize::from(qid % 3),
                    Sqe {
                        opcode,
                        nsid,
                        cdw10,
                        cdw11,
                        cdw12,
                        dptr,
                        ..Sqe::default()
                    },
                );
            }
            Op::Poke {
                port,
                page,
                offset,
                bytes,
            } => {
                let addr = u64::from(page % 64) * 4096 + u64::from(offset % 4096);
                let _ = ports[usize::from(port)].dma.write(addr, &bytes);
            }
            Op::Process { port, advance_us } => {
                now += Duration::from_micros(u64::from(advance_us));
                ports[usize::from(port)].process(now);
            }
            Op::Inject { which, a, b } => {
                let (first, last) = (u64::from(a.min(b)), u64::from(a.max(b)));
                let op = [FaultOp::Read, FaultOp::Write, FaultOp::Flush, FaultOp::Any]
                    [usize::from(b % 4)];
                let f = match which % 6 {
                    0 => Fault::Error {
                        op,
                        first_lba: first,
                        last_lba: last,
                        status: u16::from(a) | (u16::from(b) << 8),
                        dnr: a & 1 == 0,
                        remaining: if b & 1 == 0 { None } else { Some(u32::from(a)) },
                    },
                    1 => Fault::Latency {
                        op,
                        micros: u64::from(a) * 100,
                    },
                    2 => Fault::Stall { op },
                    3 => Fault::TornWrite {
                        first_lba: first,
                        last_lba: last,
                        keep_bytes: u64::from(a) * 37,
                    },
                    4 => Fault::LyingFlush,
                    _ => Fault::BitFlip {
                        first_lba: first,
                        last_lba: last,
                        bit: u32::from(a) * 257,
                    },
                };
                drive.inject(f);
            }
            Op::ClearFaults => drive.clear_faults(),
            Op::PowerCycle => {
                drive.power_cut();
                drive.power_on();
                for (i, p) in ports.iter_mut().enumerate() {
                    p.enable(i as u16 + 1);
                }
            }
            Op::Reenable { port } => {
                let i = usize::from(port);
                ports[i].enable(i as u16 + 1);
            }
        }
    }
    // Whatever happened, both controllers still answer and finish their work.
    drive.clear_faults();
    for p in &mut ports {
        let mut b = [0u8; 4];
        p.ctrl
            .read_reg(reg::CSTS, &mut b)
            .expect("CSTS is always readable");
        p.process(now + Duration::from_secs(100));
    }
}

#[test]
fn arbitrary_host() {
    let file = tempfile::tempfile().expect("backing file");
    let drive = Drive::open(
        file,
        DriveConfig {
            block_size: 512,
            blocks: BLOCKS,
            cache_blocks: 16,
            max_queues: 4,
            mqes: 64,
            ..DriveConfig::default()
        },
    )
    .expect("drive");
    bolero::check!()
        .with_type::<Vec<Op>>()
        .with_iterations(ITERATIONS)
        .with_test_time(TIME_CAP)
        .for_each(|ops| run(&drive, ops));
}

#[test]
fn standard_bring_up_works() {
    // The fuzz harness's enable sequence really produces working queues.
    let file = tempfile::tempfile().expect("backing file");
    let drive = Drive::open(
        file,
        DriveConfig {
            block_size: 512,
            blocks: BLOCKS,
            ..DriveConfig::default()
        },
    )
    .expect("drive");
    let mut p = Port::new(&drive, 1);
    let mut b = [0u8; 4];
    p.ctrl.read_reg(reg::CSTS, &mut b).expect("CSTS");
    assert_eq!(u32::from_le_bytes(b) & 3, reg::CSTS_RDY);
    let _ = p.dma.write(SCRATCH + 4096, &[0x5A; 512]);
    p.submit(
        1,
        Sqe {
            opcode: io::WRITE,
            nsid: 1,
            dptr: prp(SCRATCH + 4096, 0),
            ..Sqe::default()
        },
    );
    p.process(Instant::now());
    assert_eq!(p.heads[1], 1, "one completion on CQ 1");
    assert_eq!(p.heads[0], 5, "five admin completions");
    drive.destage().expect("destage");
    assert_eq!(drive.read_medium(0, 1).expect("medium"), vec![0x5A; 512]);
}
