//! Conformance of the datapath's user-space NVMe driver against `duplex-drive-sim`, over
//! vfio-user: the simulator's ports serve real sockets (in this process, on their own threads)
//! and the driver reaches them through `VfioUser`, as the datapath does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use duplex_datapath::nvme::vfio_user::VfioUser;
use duplex_datapath::nvme::{CmdError, Controller, DmaMem, IoCmd, NvmeError, Options, Seg};
use duplex_drive_sim::port::Ports;
use duplex_drive_sim::{Drive, DriveConfig, Fault, FaultOp};
use duplex_nvme::resv::{
    Acquire, AcquireAction, Cptpl, Register, RegisterAction, Release, ReleaseAction, ResvType,
};

const PAGE: usize = 4096;
/// Segments of a transfer: (offset in data memory, length).
type Layout = Vec<(usize, usize)>;
/// Where test data buffers sit in the device's address space.
const DATA_IOVA: u64 = 1 << 40;

struct Rig {
    _dir: tempfile::TempDir,
    sockets: Vec<PathBuf>,
    ports: Ports,
    drive: Arc<Drive>,
}

fn rig(cfg: DriveConfig) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = tempfile::tempfile_in(dir.path()).expect("backing file");
    let drive = Drive::open(file, cfg).expect("drive");
    let sockets = vec![dir.path().join("a.sock"), dir.path().join("b.sock")];
    let ports = Ports::start(drive.clone(), &sockets).expect("ports");
    Rig {
        _dir: dir,
        sockets,
        ports,
        drive,
    }
}

fn cfg(block_size: u32) -> DriveConfig {
    DriveConfig {
        block_size,
        blocks: (64 << 20) / u64::from(block_size),
        cache_blocks: 1 << 16,
        ..DriveConfig::default()
    }
}

fn host_id(n: u8) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0] = n;
    h[15] = 0xAA;
    h
}

fn connect(r: &Rig, port: usize, opts: Options) -> Controller<VfioUser> {
    let t = VfioUser::connect(&r.sockets[port], Duration::from_secs(5)).expect("connect");
    let mem = DmaMem::create("driver", opts.dma_len(), 0).expect("DMA memory");
    Controller::new(t, mem, opts).expect("bring-up")
}

fn opts(queues: u16, host: u8) -> Options {
    Options {
        io_queues: queues,
        host_id: Some(host_id(host)),
        ..Options::default()
    }
}

/// Data memory of `pages` pages, mapped for the controller; returns its index.
fn data(c: &mut Controller<VfioUser>, pages: usize) -> usize {
    let m = DmaMem::create("data", pages * PAGE, DATA_IOVA).expect("data memory");
    c.add_memory(m).expect("map data memory")
}

fn fill(seed: u64, out: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in out.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// Writes `bytes` at `lba` from `segs` (offsets into data memory `mem`), synchronously.
fn write_at(
    c: &mut Controller<VfioUser>,
    mem: usize,
    lba: u64,
    bs: u32,
    segs: &[(usize, usize)],
    bytes: &[u8],
    fua: bool,
) -> Result<u32, CmdError> {
    let m = c.added_memory(mem).expect("memory");
    let mut at = 0;
    let mut list = Vec::new();
    for &(off, len) in segs {
        m.write(off, &bytes[at..at + len]).expect("fill segment");
        at += len;
        list.push(Seg {
            iova: m.iova_of(off),
            len: len as u32,
        });
    }
    assert_eq!(at, bytes.len());
    let blocks = (bytes.len() / bs as usize) as u32;
    c.exec(1, IoCmd::write(1, lba, blocks, bs, fua), &list, c.timeout())
        .expect("controller")
}

/// Reads `len` bytes at `lba` into `segs` and returns them.
fn read_at(
    c: &mut Controller<VfioUser>,
    qid: u16,
    mem: usize,
    lba: u64,
    bs: u32,
    segs: &[(usize, usize)],
) -> Result<Vec<u8>, CmdError> {
    let len: usize = segs.iter().map(|s| s.1).sum();
    let list: Vec<Seg> = {
        let m = c.added_memory(mem).expect("memory");
        for &(off, l) in segs {
            m.zero(off, l).expect("clear");
        }
        segs.iter()
            .map(|&(off, l)| Seg {
                iova: m.iova_of(off),
                len: l as u32,
            })
            .collect()
    };
    let blocks = (len / bs as usize) as u32;
    c.exec(qid, IoCmd::read(1, lba, blocks, bs), &list, c.timeout())
        .expect("controller")?;
    let m = c.added_memory(mem).expect("memory");
    let mut out = vec![0u8; len];
    let mut at = 0;
    for &(off, l) in segs {
        m.read(off, &mut out[at..at + l]).expect("read segment");
        at += l;
    }
    Ok(out)
}

fn flush(c: &mut Controller<VfioUser>) -> Result<u32, CmdError> {
    c.exec(1, IoCmd::flush(1), &[], c.timeout())
        .expect("controller")
}

#[test]
fn identify_and_several_queue_pairs() {
    let r = rig(cfg(4096));
    let mut a = connect(&r, 0, opts(4, 1));
    let mut b = connect(&r, 1, opts(2, 2));
    assert_eq!(a.io_queues(), 4);
    assert_eq!(b.io_queues(), 2);
    assert_eq!(a.identity().cntlid, 1);
    assert_eq!(b.identity().cntlid, 2);
    assert!(!a.identity().model.is_empty());
    assert!(a.identity().vwc, "the simulator has a volatile write cache");
    let ns = a.namespace(1).expect("identify namespace");
    assert_eq!((ns.blocks, ns.block_size), ((64 << 20) / 4096, 4096));
    assert_ne!(ns.rescap, 0, "reservations are reported");
    assert_eq!((ns.metadata_size, ns.metadata_extended), (0, false));
    match a.namespace(7) {
        Err(NvmeError::Admin { error, .. }) => assert!(!error.retriable(), "{error}"),
        other => panic!("namespace 7 exists? {other:?}"),
    }
    // Every queue pair carries I/O; what one port writes, the other reads.
    let mem = data(&mut a, 4);
    let bmem = data(&mut b, 4);
    for qid in 1..=4u16 {
        let mut block = vec![0u8; 4096];
        fill(u64::from(qid), &mut block);
        let m = a.added_memory(mem).expect("memory");
        m.write(0, &block).expect("fill");
        let seg = [Seg {
            iova: m.iova_of(0),
            len: 4096,
        }];
        a.exec(
            qid,
            IoCmd::write(1, u64::from(qid), 1, 4096, false),
            &seg,
            a.timeout(),
        )
        .expect("controller")
        .expect("write");
        let back = read_at(&mut a, qid, mem, u64::from(qid), 4096, &[(4096, 4096)]).expect("read");
        assert_eq!(back, block, "queue {qid}");
        let other = read_at(&mut b, 2, bmem, u64::from(qid), 4096, &[(0, 4096)]).expect("read B");
        assert_eq!(other, block, "port B sees queue {qid}'s write");
    }
}

#[test]
fn prp_lists_crossing_pages_are_verified() {
    for bs in [512u32, 4096] {
        let r = rig(cfg(bs));
        let mut c = connect(&r, 0, opts(1, 1));
        let mem = data(&mut c, 256);
        let p = PAGE;
        // (write layout, read layout): (offset in data memory, length) segments. Joins between
        // segments fall on page boundaries, as PRPs demand; starts may be anywhere dword
        // aligned in the first page.
        let shapes: Vec<(Layout, Layout)> = vec![
            // one page at an offset: two PRPs
            (vec![(0x200, p)], vec![(3 * p + 0xE00, p)]),
            // nine pages and a bit from an offset: a PRP list
            (vec![(p + 0x600, 9 * p)], vec![(40 * p + 0x200, 9 * p)]),
            // scattered: a tail of one page, eight whole pages elsewhere, a head of another
            (
                vec![(20 * p + 0xE00, 0x200), (60 * p, 8 * p), (90 * p, 0x600)],
                vec![(100 * p + 0x800, 0x800), (130 * p, 8 * p)],
            ),
            // the drive's largest transfer (MDTS, 128 KiB) from an offset: 33 pages
            (
                vec![(150 * p + 0x800, 32 * p)],
                vec![(200 * p + 0x400, 32 * p)],
            ),
        ];
        let mut lba = 0u64;
        for (i, (w, rd)) in shapes.iter().enumerate() {
            let len: usize = w.iter().map(|s| s.1).sum();
            assert_eq!(len, rd.iter().map(|s| s.1).sum::<usize>());
            if len % bs as usize != 0 {
                continue;
            }
            let mut bytes = vec![0u8; len];
            fill(i as u64 + 100 * u64::from(bs), &mut bytes);
            write_at(&mut c, mem, lba, bs, w, &bytes, false).expect("write");
            let back = read_at(&mut c, 1, mem, lba, bs, rd).expect("read");
            assert!(back == bytes, "block size {bs}, shape {i}: data differs");
            lba += (len / bs as usize) as u64 + 3;
        }
        // What the drive holds is what was written (its medium, after a flush).
        flush(&mut c).expect("flush");
    }
}

#[test]
fn flush_makes_writes_survive_a_power_cut_and_unflushed_ones_are_lost() {
    let mut r = rig(cfg(4096));
    let mut c = connect(&r, 0, opts(1, 1));
    let mem = data(&mut c, 16);
    let block = |seed: u64, n: usize| {
        let mut b = vec![0u8; n * 4096];
        fill(seed, &mut b);
        b
    };
    let (a, b, fua) = (block(1, 8), block(2, 8), block(3, 1));
    write_at(&mut c, mem, 0, 4096, &[(0, 8 * PAGE)], &a, false).expect("write A");
    flush(&mut c).expect("flush");
    write_at(&mut c, mem, 8, 4096, &[(0, 8 * PAGE)], &b, false).expect("write B");
    write_at(&mut c, mem, 16, 4096, &[(0, PAGE)], &fua, true).expect("FUA write");
    // Before the power cut, the cache serves B.
    assert_eq!(
        read_at(&mut c, 1, mem, 8, 4096, &[(0, 8 * PAGE)]).expect("read"),
        b
    );
    let report = r.drive.power_cut();
    assert_eq!(
        report.lost_blocks, 8,
        "exactly B's blocks were in the cache"
    );
    r.ports.pull();
    // The controller is gone: typed errors, no panic.
    let gone = c.exec(1, IoCmd::flush(1), &[], Duration::from_secs(2));
    assert!(gone.is_err(), "a pulled drive answered: {gone:?}");
    drop(c);
    r.drive.power_on();
    r.ports.insert().expect("insert");
    let mut c = connect(&r, 0, opts(1, 1));
    let mem = data(&mut c, 16);
    assert_eq!(
        read_at(&mut c, 1, mem, 0, 4096, &[(0, 8 * PAGE)]).expect("read A"),
        a
    );
    assert_eq!(
        read_at(&mut c, 1, mem, 8, 4096, &[(0, 8 * PAGE)]).expect("read B"),
        vec![0u8; 8 * PAGE],
        "unflushed writes are lost"
    );
    assert_eq!(
        read_at(&mut c, 1, mem, 16, 4096, &[(0, PAGE)]).expect("read FUA"),
        fua
    );

    // A drive told to lie about flushes loses flushed data; the checksummed pattern the
    // reader expects shows exactly which blocks are stale.
    r.drive.inject(Fault::LyingFlush);
    let d = block(4, 4);
    write_at(&mut c, mem, 32, 4096, &[(0, 4 * PAGE)], &d, false).expect("write D");
    flush(&mut c).expect("the lying flush says yes");
    r.drive.power_cut();
    r.ports.pull();
    drop(c);
    r.drive.power_on();
    r.drive.clear_faults();
    r.ports.insert().expect("insert");
    let mut c = connect(&r, 0, opts(1, 1));
    let mem = data(&mut c, 16);
    let back = read_at(&mut c, 1, mem, 32, 4096, &[(0, 4 * PAGE)]).expect("read D");
    let stale: Vec<usize> = (0..4)
        .filter(|&i| back[i * PAGE..(i + 1) * PAGE] != d[i * PAGE..(i + 1) * PAGE])
        .collect();
    assert_eq!(
        stale,
        vec![0, 1, 2, 3],
        "the lie is detected on every block"
    );
}

fn register(c: &mut Controller<VfioUser>, key: u64) -> Result<(), CmdError> {
    c.resv_register(
        1,
        1,
        &Register {
            action: RegisterAction::Register,
            iekey: false,
            cptpl: Cptpl::NoChange,
            crkey: 0,
            nrkey: key,
        },
    )
    .expect("controller")
}

fn acquire(
    c: &mut Controller<VfioUser>,
    action: AcquireAction,
    rtype: ResvType,
    crkey: u64,
    prkey: u64,
) -> Result<(), CmdError> {
    c.resv_acquire(
        1,
        1,
        &Acquire {
            action,
            rtype,
            crkey,
            prkey,
        },
    )
    .expect("controller")
}

/// Registrants in a Reservation Report (extended): (cntlid, holds, key).
fn report(c: &mut Controller<VfioUser>) -> (u32, u8, Vec<(u16, bool, u64)>) {
    let r = c
        .resv_report(1, 1, 4096)
        .expect("controller")
        .expect("report");
    let gen = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
    let rtype = r[4];
    let n = usize::from(u16::from_le_bytes([r[5], r[6]]));
    let regs = (0..n)
        .map(|i| {
            let e = &r[64 + 64 * i..128 + 64 * i];
            (
                u16::from_le_bytes([e[0], e[1]]),
                e[2] & 1 != 0,
                u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")),
            )
        })
        .collect();
    (gen, rtype, regs)
}

#[test]
fn reservation_matrix_across_both_ports() {
    let r = rig(cfg(4096));
    let mut a = connect(
        &r,
        0,
        Options {
            timeout: Duration::from_secs(30),
            ..opts(1, 1)
        },
    );
    let mut b = connect(&r, 1, opts(1, 2));
    let (amem, bmem) = (data(&mut a, 4), data(&mut b, 4));
    let (ka, kb) = (0xA11CE, 0xB0B);
    let page = vec![7u8; PAGE];
    register(&mut a, ka).expect("A registers");
    register(&mut b, kb).expect("B registers");
    acquire(
        &mut a,
        AcquireAction::Acquire,
        ResvType::WriteExclusive,
        ka,
        0,
    )
    .expect("A acquires");
    let (_, rtype, regs) = report(&mut b);
    assert_eq!(rtype, ResvType::WriteExclusive as u8);
    assert_eq!(
        regs,
        vec![(1, true, ka), (2, false, kb)],
        "both registrants, A holds"
    );

    // Write Exclusive: the holder writes, the other registrant only reads.
    write_at(&mut a, amem, 0, 4096, &[(0, PAGE)], &page, false).expect("A writes");
    assert_eq!(
        write_at(&mut b, bmem, 0, 4096, &[(0, PAGE)], &page, false),
        Err(CmdError::ReservationConflict),
        "B is fenced"
    );
    assert_eq!(
        read_at(&mut b, 1, bmem, 0, 4096, &[(0, PAGE)]).expect("B reads"),
        page
    );
    // Acquiring what another holds conflicts; so does a wrong key.
    assert_eq!(
        acquire(
            &mut b,
            AcquireAction::Acquire,
            ResvType::WriteExclusive,
            kb,
            0
        ),
        Err(CmdError::ReservationConflict)
    );
    assert_eq!(
        acquire(
            &mut b,
            AcquireAction::Preempt,
            ResvType::WriteExclusive,
            kb + 1,
            ka
        ),
        Err(CmdError::ReservationConflict),
        "a wrong current key"
    );

    // B preempts A: A's registration is gone, B holds, A is fenced.
    acquire(
        &mut b,
        AcquireAction::Preempt,
        ResvType::WriteExclusive,
        kb,
        ka,
    )
    .expect("preempt");
    let (_, _, regs) = report(&mut a);
    assert_eq!(regs, vec![(2, true, kb)]);
    assert_eq!(
        write_at(&mut a, amem, 1, 4096, &[(0, PAGE)], &page, false),
        Err(CmdError::ReservationConflict)
    );
    write_at(&mut b, bmem, 1, 4096, &[(0, PAGE)], &page, false).expect("B writes now");

    // Preempt and abort: A (registered again, holding Write Exclusive) has a write stalled
    // in the drive when B takes over; the write is aborted and never reaches the medium.
    register(&mut a, ka).expect("A registers again");
    c_release(&mut b, kb, ResvType::WriteExclusive).expect("B releases");
    acquire(
        &mut a,
        AcquireAction::Acquire,
        ResvType::WriteExclusive,
        ka,
        0,
    )
    .expect("A acquires");
    let stall = r.drive.inject(Fault::Stall { op: FaultOp::Write });
    let m = a.added_memory(amem).expect("memory");
    let fresh = vec![0x5Au8; PAGE];
    m.write(0, &fresh).expect("fill");
    let seg = [Seg {
        iova: m.iova_of(0),
        len: PAGE as u32,
    }];
    a.submit(1, IoCmd::write(1, 9, 1, 4096, false), &seg, 77)
        .expect("submit");
    a.ring(1).expect("ring");
    // The write is inside the drive (fetched, stalled) before B preempts: fetched after the
    // preempt it would fail with Reservation Conflict instead (seen once on a loaded machine).
    while r.drive.held_commands(1) == 0 {
        std::thread::yield_now();
    }
    acquire(
        &mut b,
        AcquireAction::PreemptAbort,
        ResvType::WriteExclusive,
        kb,
        ka,
    )
    .expect("preempt and abort");
    r.drive.clear_fault(stall);
    let mut done = Vec::new();
    while done.is_empty() {
        a.poll(1, &mut done).expect("poll");
    }
    assert_eq!(done[0].tag, 77);
    assert_eq!(done[0].result, Err(CmdError::PreemptAborted));
    assert_ne!(
        read_at(&mut b, 1, bmem, 9, 4096, &[(0, PAGE)]).expect("read"),
        fresh,
        "the aborted write never happened"
    );
    assert_eq!(
        write_at(&mut a, amem, 9, 4096, &[(0, PAGE)], &fresh, false),
        Err(CmdError::ReservationConflict),
        "A is fenced after preempt and abort"
    );

    // Release by the holder; then nobody holds and anyone writes.
    c_release(&mut b, kb, ResvType::WriteExclusive).expect("release");
    let (_, rtype, regs) = report(&mut a);
    assert_eq!((rtype, regs), (0, vec![(2, false, kb)]));
    write_at(&mut a, amem, 10, 4096, &[(0, PAGE)], &fresh, false)
        .expect("A writes, no reservation");

    // Exclusive Access keeps the other registrant from reading too; Clear ends it all.
    register(&mut a, ka).expect("A registers");
    acquire(
        &mut b,
        AcquireAction::Acquire,
        ResvType::ExclusiveAccess,
        kb,
        0,
    )
    .expect("EA");
    assert_eq!(
        read_at(&mut a, 1, amem, 0, 4096, &[(0, PAGE)]),
        Err(CmdError::ReservationConflict)
    );
    b.resv_release(
        1,
        1,
        &Release {
            action: ReleaseAction::Clear,
            rtype: 0,
            crkey: kb,
        },
    )
    .expect("controller")
    .expect("clear");
    let (_, rtype, regs) = report(&mut a);
    assert_eq!((rtype, regs.len()), (0, 0));
    read_at(&mut a, 1, amem, 0, 4096, &[(0, PAGE)]).expect("A reads again");
}

fn c_release(c: &mut Controller<VfioUser>, key: u64, rtype: ResvType) -> Result<(), CmdError> {
    c.resv_release(
        1,
        1,
        &Release {
            action: ReleaseAction::Release,
            rtype: rtype as u8,
            crkey: key,
        },
    )
    .expect("controller")
}

#[test]
fn a_stalled_command_is_aborted_after_its_timeout() {
    let r = rig(cfg(4096));
    let mut c = connect(
        &r,
        0,
        Options {
            timeout: Duration::from_millis(300),
            abort_timeout: Duration::from_millis(300),
            ..opts(1, 1)
        },
    );
    let mem = data(&mut c, 2);
    let stall = r.drive.inject(Fault::Stall { op: FaultOp::Read });
    assert_eq!(
        read_at(&mut c, 1, mem, 0, 4096, &[(0, PAGE)]),
        Err(CmdError::TimedOut)
    );
    assert_eq!(c.resets(), 0, "the Abort command was enough");
    r.drive.clear_fault(stall);
    read_at(&mut c, 1, mem, 0, 4096, &[(0, PAGE)]).expect("reads work again");
}

#[test]
fn a_hung_controller_is_reset_and_recovers() {
    let r = rig(cfg(4096));
    let mut c = connect(
        &r,
        0,
        Options {
            timeout: Duration::from_millis(300),
            abort_timeout: Duration::from_millis(300),
            ..opts(2, 1)
        },
    );
    let mem = data(&mut c, 2);
    let page = vec![3u8; PAGE];
    write_at(&mut c, mem, 5, 4096, &[(0, PAGE)], &page, false).expect("write");
    r.drive.inject(Fault::Hang);
    // The read times out, its Abort never completes, the controller is reset: the read
    // comes back as Reset (retriable) and the queues are up again.
    let e = read_at(&mut c, 1, mem, 5, 4096, &[(0, PAGE)]).expect_err("hung");
    assert_eq!(e, CmdError::Reset);
    assert!(e.retriable());
    assert_eq!(c.resets(), 1);
    assert_eq!(c.io_queues(), 2, "queues recreated");
    assert_eq!(
        read_at(&mut c, 2, mem, 5, 4096, &[(0, PAGE)]).expect("read after reset"),
        page
    );
}

#[test]
fn fault_statuses_come_back_typed() {
    let r = rig(cfg(4096));
    let mut c = connect(&r, 0, opts(1, 1));
    let mem = data(&mut c, 2);
    let page = vec![1u8; PAGE];
    r.drive.inject(Fault::Error {
        op: FaultOp::Read,
        first_lba: 100,
        last_lba: 199,
        status: 0x281,
        dnr: true,
        remaining: None,
    });
    r.drive.inject(Fault::Error {
        op: FaultOp::Write,
        first_lba: 300,
        last_lba: 300,
        status: 0x280,
        dnr: true,
        remaining: Some(1),
    });
    r.drive.inject(Fault::Error {
        op: FaultOp::Write,
        first_lba: 400,
        last_lba: 400,
        status: 0x006, // Internal Error, retriable
        dnr: false,
        remaining: Some(1),
    });
    assert_eq!(
        read_at(&mut c, 1, mem, 150, 4096, &[(0, PAGE)]),
        Err(CmdError::ReadError)
    );
    read_at(&mut c, 1, mem, 200, 4096, &[(0, PAGE)]).expect("outside the range");
    assert_eq!(
        write_at(&mut c, mem, 300, 4096, &[(0, PAGE)], &page, false),
        Err(CmdError::WriteFault)
    );
    write_at(&mut c, mem, 300, 4096, &[(0, PAGE)], &page, false).expect("the fault was one-shot");
    let e = write_at(&mut c, mem, 400, 4096, &[(0, PAGE)], &page, false).expect_err("internal");
    assert!(e.retriable(), "{e}");
    write_at(&mut c, mem, 400, 4096, &[(0, PAGE)], &page, false).expect("the retry succeeds");
    let last = (64 << 20) / 4096;
    assert_eq!(
        read_at(&mut c, 1, mem, last, 4096, &[(0, PAGE)]),
        Err(CmdError::LbaOutOfRange)
    );
    // Bit rot on read: the data comes back changed, with success (only checksums catch it).
    r.drive.inject(Fault::BitFlip {
        first_lba: 300,
        last_lba: 300,
        bit: 9,
    });
    let back = read_at(&mut c, 1, mem, 300, 4096, &[(0, PAGE)]).expect("read");
    let diff: Vec<usize> = (0..PAGE).filter(|&i| back[i] != page[i]).collect();
    assert_eq!(diff, vec![1]);
}

#[test]
fn latency_torn_writes_and_a_pulled_drive_behave_as_documented() {
    let mut r = rig(cfg(4096));
    let mut c = connect(
        &r,
        0,
        Options {
            timeout: Duration::from_millis(400),
            abort_timeout: Duration::from_millis(400),
            ..opts(1, 1)
        },
    );
    let mem = data(&mut c, 4);
    let page = vec![9u8; PAGE];
    // Latency below the timeout is only latency; above it, the command is aborted.
    let slow = r.drive.inject(Fault::Latency {
        op: FaultOp::Write,
        micros: 50_000,
    });
    write_at(&mut c, mem, 1, 4096, &[(0, PAGE)], &page, false).expect("a slow write");
    r.drive.clear_fault(slow);
    let stuck = r.drive.inject(Fault::Latency {
        op: FaultOp::Read,
        micros: 10_000_000,
    });
    assert_eq!(
        read_at(&mut c, 1, mem, 1, 4096, &[(0, PAGE)]),
        Err(CmdError::TimedOut)
    );
    r.drive.clear_fault(stuck);
    assert_eq!(
        read_at(&mut c, 1, mem, 1, 4096, &[(0, PAGE)]).expect("read"),
        page
    );

    // A torn write: half of it reaches the medium, then the power fails. The write never
    // completes; the driver times out, cannot reset a drive without power, and says so.
    let mut two = vec![0xC3u8; 2 * PAGE];
    two[PAGE..].fill(0x3C);
    flush(&mut c).expect("flush");
    r.drive.inject(Fault::TornWrite {
        first_lba: 10,
        last_lba: 11,
        keep_bytes: PAGE as u64,
    });
    let m = c.added_memory(mem).expect("memory");
    m.write(0, &two).expect("fill");
    let seg = [Seg {
        iova: m.iova_of(0),
        len: 2 * PAGE as u32,
    }];
    let torn = c.exec(1, IoCmd::write(1, 10, 2, 4096, false), &seg, c.timeout());
    assert!(
        !matches!(torn, Ok(Ok(_))),
        "a torn write must not complete: {torn:?}"
    );
    assert!(!r.drive.is_powered(), "the torn write cut the power");
    r.ports.pull();
    drop(c);
    r.drive.power_on();
    r.ports.insert().expect("insert");
    let mut c = connect(&r, 0, opts(1, 1));
    let mem = data(&mut c, 4);
    let back = read_at(&mut c, 1, mem, 10, 4096, &[(0, 2 * PAGE)]).expect("read");
    assert_eq!(
        &back[..PAGE],
        &two[..PAGE],
        "the first half reached the medium"
    );
    assert_eq!(
        &back[PAGE..],
        &vec![0u8; PAGE][..],
        "the second half never did"
    );

    // A pulled drive: typed errors, no panic, and the controller stays failed.
    r.ports.pull();
    let e = c.exec(1, IoCmd::flush(1), &[], c.timeout());
    assert!(e.is_err(), "{e:?}");
    let again = c.exec(1, IoCmd::flush(1), &[], c.timeout());
    assert!(
        matches!(again, Err(NvmeError::Failed(_))),
        "later commands fail fast: {again:?}"
    );
}

/// One port's cable pulled (`pull --port`): that port's controller loses its drive (typed
/// errors, then failed), the other port's goes on reading and writing; plugged back in, a new
/// controller on that port sees every write the other made, and the drive counted each write
/// against the port that made it.
#[test]
fn a_pulled_port_cable_leaves_the_other_port_serving() {
    let mut r = rig(cfg(4096));
    let mut a = connect(&r, 0, opts(1, 1));
    let mut b = connect(&r, 1, opts(1, 2));
    let (ma, mb) = (data(&mut a, 2), data(&mut b, 2));
    let mut one = vec![0u8; PAGE];
    fill(1, &mut one);
    write_at(&mut a, ma, 0, 4096, &[(0, PAGE)], &one, true).expect("write via A");
    r.ports.pull_port(0).expect("pull port 0");
    assert_eq!(r.ports.ports_present(), vec![false, true]);
    assert!(r.drive.is_present(), "the drive itself stays");
    let e = a.exec(1, IoCmd::flush(1), &[], a.timeout());
    assert!(e.is_err(), "port A's controller lost its drive: {e:?}");
    let mut two = vec![0u8; PAGE];
    fill(2, &mut two);
    write_at(&mut b, mb, 1, 4096, &[(0, PAGE)], &two, true).expect("write via B");
    let back = read_at(&mut b, 1, mb, 0, 4096, &[(0, PAGE)]).expect("read via B");
    assert_eq!(
        back, one,
        "B reads what A wrote before its cable was pulled"
    );
    assert!(r.ports.pull_port(2).is_err(), "no port 2");
    r.ports.insert_port(0).expect("plug port 0 back");
    assert_eq!(r.ports.ports_present(), vec![true, true]);
    drop(a);
    let mut a = connect(&r, 0, opts(1, 1));
    let ma = data(&mut a, 2);
    let back = read_at(&mut a, 1, ma, 1, 4096, &[(0, PAGE)]).expect("read via A again");
    assert_eq!(back, two, "A sees B's write");
    let (seq, ports) = r.drive.port_writes();
    assert_eq!(seq, 2);
    let by: Vec<(u16, u64, u64)> = ports
        .iter()
        .map(|p| (p.cntlid, p.writes, p.last_seq))
        .collect();
    assert_eq!(by, vec![(1, 1, 1), (2, 1, 2)]);
}

/// A namespace formatted with metadata (8 bytes a block, separate buffer) is read as such from
/// Identify Namespace (the current LBA format's MS, FLBAS bit 4).
#[test]
fn a_format_with_metadata_is_identified() {
    let r = rig(DriveConfig {
        metadata_size: 8,
        ..cfg(4096)
    });
    let mut a = connect(&r, 0, opts(1, 1));
    let ns = a.namespace(1).expect("identify namespace");
    assert_eq!(ns.block_size, 4096);
    assert_eq!((ns.metadata_size, ns.metadata_extended), (8, false));
}
