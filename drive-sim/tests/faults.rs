//! The volatile write cache, power loss and every fault variant, observed by a host.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use duplex_drive_sim::{DriveConfig, Fault, FaultOp, PortWrites};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::{admin, feat, io, lid, reg};
use duplex_nvme::status::{generic, media, Status};

const BS: u32 = 512;

fn blocks(seed: u8, n: usize) -> Vec<u8> {
    pattern(seed, n * BS as usize)
}

/// After a power cut: power on, re-enable, one I/O queue pair.
fn reconnect(h: &mut Host, d: &Arc<duplex_drive_sim::Drive>) {
    d.power_on();
    h.queues.clear();
    h.enable();
    h.create_pair(1, 32);
}

#[test]
fn power_cut_loses_exactly_the_unflushed_writes() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    let a = blocks(1, 3);
    let b = blocks(2, 1);
    let c = blocks(3, 4);
    assert_eq!(h.write(1, 0, &a, BS, false).status(), Status::SUCCESS);
    assert_eq!(h.flush(1).status(), Status::SUCCESS);
    assert_eq!(
        h.write(1, 10, &b, BS, true).status(),
        Status::SUCCESS,
        "FUA"
    );
    assert_eq!(h.write(1, 20, &c, BS, false).status(), Status::SUCCESS);
    assert_eq!(d.cached_blocks(), 4);
    // Reads see the cache.
    assert_eq!(h.read(1, 20, 4, BS).1, c);
    assert_eq!(d.read_medium(20, 4).expect("medium"), vec![0; c.len()]);
    let report = d.power_cut();
    assert_eq!(report.lost_blocks, 4);
    assert!(!d.is_powered());
    assert_eq!(h.csts(), 0);
    reconnect(&mut h, &d);
    assert_eq!(h.read(1, 0, 3, BS).1, a, "flushed");
    assert_eq!(h.read(1, 10, 1, BS).1, b, "FUA");
    assert_eq!(h.read(1, 20, 4, BS).1, vec![0; c.len()], "lost");
}

#[test]
fn fua_replaces_a_stale_cached_copy() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    let old = blocks(1, 2);
    let new = blocks(2, 1);
    assert_eq!(h.write(1, 0, &old, BS, false).status(), Status::SUCCESS);
    assert_eq!(h.write(1, 1, &new, BS, true).status(), Status::SUCCESS);
    let mut expect = old[..BS as usize].to_vec();
    expect.extend_from_slice(&new);
    assert_eq!(h.read(1, 0, 2, BS).1, expect);
    assert_eq!(d.power_cut().lost_blocks, 1, "block 0 was only cached");
    reconnect(&mut h, &d);
    let mut after = vec![0; BS as usize];
    after.extend_from_slice(&new);
    assert_eq!(h.read(1, 0, 2, BS).1, after);
}

#[test]
fn lying_flush_loses_flushed_and_fua_writes() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    let id = d.inject(Fault::LyingFlush);
    let a = blocks(4, 2);
    let b = blocks(5, 1);
    assert_eq!(h.write(1, 0, &a, BS, false).status(), Status::SUCCESS);
    assert_eq!(h.flush(1).status(), Status::SUCCESS);
    assert_eq!(h.write(1, 5, &b, BS, true).status(), Status::SUCCESS);
    assert_eq!(d.cached_blocks(), 3);
    assert_eq!(d.faults(), vec![(id, Fault::LyingFlush)]);
    assert_eq!(d.power_cut().lost_blocks, 3);
    reconnect(&mut h, &d);
    assert_eq!(h.read(1, 0, 2, BS).1, vec![0; a.len()]);
    assert_eq!(h.read(1, 5, 1, BS).1, vec![0; b.len()]);
    // Without the fault, flush destages again.
    d.clear_faults();
    assert_eq!(h.write(1, 0, &a, BS, false).status(), Status::SUCCESS);
    assert_eq!(h.flush(1).status(), Status::SUCCESS);
    assert_eq!(d.power_cut().lost_blocks, 0);
}

#[test]
fn disabling_the_write_cache_is_write_through() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    let a = blocks(6, 2);
    assert_eq!(h.write(1, 0, &a, BS, false).status(), Status::SUCCESS);
    assert_eq!(d.cached_blocks(), 2);
    assert_eq!(
        h.set_feature(feat::VOLATILE_WC, 0).status(),
        Status::SUCCESS
    );
    assert_eq!(d.cached_blocks(), 0, "disabling destages");
    assert_eq!(h.get_feature(feat::VOLATILE_WC, 0).dw0, 0);
    assert_eq!(h.write(1, 4, &a, BS, false).status(), Status::SUCCESS);
    assert_eq!(d.cached_blocks(), 0);
    assert_eq!(d.power_cut().lost_blocks, 0);
    reconnect(&mut h, &d);
    assert_eq!(h.read(1, 4, 2, BS).1, a);
    assert_eq!(
        h.get_feature(feat::VOLATILE_WC, 0).dw0,
        1,
        "back on after power loss"
    );

    // A drive without a cache.
    let d = drive(DriveConfig {
        cache_blocks: 0,
        ..small_cfg()
    });
    let mut h = Host::ready(&d, 1, 1, 32);
    let (_, id) = h.identify(duplex_nvme::spec::cns::CONTROLLER, 0);
    assert_eq!(id[525] & 1, 0, "no volatile write cache");
    assert_eq!(h.get_feature(feat::VOLATILE_WC, 0).dw0, 0);
    assert_eq!(
        h.set_feature(feat::VOLATILE_WC, 1).status(),
        generic::INVALID_FIELD
    );
    assert_eq!(h.write(1, 0, &a, BS, false).status(), Status::SUCCESS);
    assert_eq!(d.read_medium(0, 2).expect("medium"), a);
}

#[test]
fn a_full_cache_destages_its_oldest_blocks() {
    let d = drive(small_cfg()); // 64-block cache
    let mut h = Host::ready(&d, 1, 1, 32);
    let data = blocks(7, 80);
    for i in 0..10 {
        let chunk = &data[i * 8 * BS as usize..(i + 1) * 8 * BS as usize];
        assert_eq!(
            h.write(1, i as u64 * 8, chunk, BS, false).status(),
            Status::SUCCESS
        );
    }
    assert_eq!(d.cached_blocks(), 64);
    assert_eq!(
        d.read_medium(0, 16).expect("medium"),
        data[..16 * BS as usize].to_vec(),
        "the 16 oldest blocks reached the file"
    );
    assert_eq!(d.read_medium(16, 1).expect("medium"), vec![0; BS as usize]);
    assert_eq!(h.read(1, 0, 80, BS).1, data);
    assert_eq!(d.power_cut().lost_blocks, 64);
}

#[test]
fn error_faults_fail_matching_commands_and_count_down() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    let base = blocks(8, 4);
    assert_eq!(h.write(1, 12, &base, BS, false).status(), Status::SUCCESS);
    let wf = d.inject(Fault::Error {
        op: FaultOp::Write,
        first_lba: 10,
        last_lba: 13,
        status: 0x280,
        dnr: true,
        remaining: Some(1),
    });
    let new = blocks(9, 4);
    // Outside the range: fine.
    assert_eq!(
        h.write(1, 14, &new[..1024], BS, false).status(),
        Status::SUCCESS
    );
    let c = h.write(1, 12, &new, BS, false);
    assert_eq!(c.status(), media::WRITE_FAULT);
    let mut expect = base.clone();
    expect[1024..].copy_from_slice(&new[..1024]);
    assert_eq!(
        h.read(1, 12, 4, BS).1,
        expect,
        "the failed write changed nothing"
    );
    assert!(d.faults().iter().all(|(id, _)| *id != wf), "used up");
    assert_eq!(h.write(1, 12, &new, BS, false).status(), Status::SUCCESS);

    // A read error until cleared; the host buffer is not touched.
    let rf = d.inject(Fault::Error {
        op: FaultOp::Read,
        first_lba: 0,
        last_lba: u64::MAX,
        status: 0x281,
        dnr: false,
        remaining: None,
    });
    let b = h.buffer(512);
    h.dma.fill(b.prp1, 512, 0xEE).expect("fill");
    for _ in 0..3 {
        let r = h.read_sqe(12, &b, 1);
        let c = h.run(1, r);
        assert_eq!((c.status().sct(), c.status().sc()), (2, 0x81));
        assert!(!c.status().is_dnr());
    }
    assert_eq!(h.contents(&b), vec![0xEE; 512]);
    assert!(d.clear_fault(rf));
    assert_eq!(h.read(1, 12, 4, BS).1, new);
    // Media errors land in the error log and SMART.
    let (_, log) = h.log_page(lid::ERROR, 64, 0, false);
    assert_eq!(u16_at(&log, 8), 1, "SQID");
    assert_eq!(u64_at(&log, 16), 12, "LBA");
    assert_eq!(u16_at(&log, 12) >> 1, 0x281);
    let (_, smart) = h.log_page(lid::SMART, 512, 0, false);
    assert_eq!(u64_at(&smart, 160), 4, "media errors");
    // Flush errors (Flush touches every LBA).
    d.inject(Fault::Error {
        op: FaultOp::Flush,
        first_lba: 5,
        last_lba: 5,
        status: 0x006,
        dnr: false,
        remaining: Some(1),
    });
    assert_eq!(h.flush(1).status(), generic::INTERNAL);
    assert_eq!(h.flush(1).status(), Status::SUCCESS);
}

#[test]
fn stall_until_cleared_wakes_the_controller() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    let wakes = Arc::new(AtomicUsize::new(0));
    let w = Arc::clone(&wakes);
    d.set_waker(
        1,
        Some(Arc::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        })),
    );
    let s = d.inject(Fault::Stall { op: FaultOp::Any });
    let data = blocks(1, 1);
    let b = h.buffer(512);
    h.fill(&b, &data);
    let wsqe = h.write_sqe(3, &b, 1, false);
    let cw = h.submit(1, wsqe);
    let cf = h.submit(
        1,
        Sqe {
            opcode: io::FLUSH,
            nsid: 1,
            ..Sqe::default()
        },
    );
    for _ in 0..3 {
        h.advance(Duration::from_secs(10));
        let p = h.process();
        assert_eq!(p.next_due, None, "stalled commands are never due");
    }
    assert!(h.reap(1).is_empty());
    assert_eq!(d.read_medium(3, 1).expect("medium"), vec![0; 512]);
    assert_eq!(wakes.load(Ordering::SeqCst), 0);
    assert!(d.clear_fault(s));
    assert_eq!(wakes.load(Ordering::SeqCst), 1);
    h.process();
    let c = h.reap(1);
    assert_eq!(c.len(), 2);
    assert_eq!((c[0].cid, c[1].cid), (cw, cf), "in fetch order");
    assert!(c.iter().all(|c| c.status() == Status::SUCCESS));
    assert_eq!(
        d.read_medium(3, 1).expect("medium"),
        data,
        "written and flushed"
    );
}

#[test]
fn latency_then_abort_prevents_the_write() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    d.inject(Fault::Latency {
        op: FaultOp::Write,
        micros: 1_000_000,
    });
    let data = blocks(2, 1);
    let b = h.buffer(512);
    h.fill(&b, &data);
    let w = h.write_sqe(6, &b, 1, false);
    let cid = h.submit(1, w);
    h.process();
    let c = h.admin(Sqe {
        opcode: admin::ABORT,
        cdw10: 1 | (u32::from(cid) << 16),
        ..Sqe::default()
    });
    assert_eq!(c.dw0 & 1, 0);
    let io = h.reap(1);
    assert_eq!((io[0].cid, io[0].status()), (cid, generic::ABORT_REQUESTED));
    h.advance(Duration::from_secs(2));
    h.process();
    assert!(h.reap(1).is_empty());
    d.clear_faults();
    assert_eq!(h.read(1, 6, 1, BS).1, vec![0; 512]);
}

#[test]
fn torn_write_keeps_a_prefix_and_cuts_the_power() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    let old = blocks(1, 4);
    assert_eq!(h.write(1, 8, &old, BS, false).status(), Status::SUCCESS);
    assert_eq!(h.flush(1).status(), Status::SUCCESS);
    let cached = blocks(2, 1);
    assert_eq!(h.write(1, 40, &cached, BS, false).status(), Status::SUCCESS);
    d.inject(Fault::TornWrite {
        first_lba: 9,
        last_lba: 9,
        keep_bytes: 700,
    });
    // Not in the range: unaffected.
    assert_eq!(
        h.write(1, 20, &blocks(3, 1), BS, false).status(),
        Status::SUCCESS
    );
    let new = blocks(4, 4);
    let b = h.buffer(new.len() as u64);
    h.fill(&b, &new);
    let w = h.write_sqe(8, &b, 4, false);
    h.submit(1, w);
    h.process();
    assert!(h.reap(1).is_empty(), "never completes");
    assert!(!d.is_powered());
    assert!(d.faults().is_empty(), "one-shot");
    assert_eq!(h.csts(), 0);
    let mut expect = old.clone();
    expect[..700].copy_from_slice(&new[..700]);
    assert_eq!(d.read_medium(8, 4).expect("medium"), expect);
    reconnect(&mut h, &d);
    assert_eq!(h.read(1, 8, 4, BS).1, expect);
    assert_eq!(
        h.read(1, 40, 1, BS).1,
        vec![0; 512],
        "the cache went with the power"
    );
    // Write Zeroes can tear too.
    d.inject(Fault::TornWrite {
        first_lba: 0,
        last_lba: 100,
        keep_bytes: 512,
    });
    let wz = Sqe {
        opcode: io::WRITE_ZEROES,
        nsid: 1,
        cdw10: 8,
        cdw12: 3,
        ..Sqe::default()
    };
    h.submit(1, wz);
    h.process();
    assert!(!d.is_powered());
    let mut z = expect.clone();
    z[..512].fill(0);
    assert_eq!(d.read_medium(8, 4).expect("medium"), z);
}

#[test]
fn bit_flips_corrupt_reads_not_the_medium() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    let data = blocks(5, 4);
    assert_eq!(h.write(1, 0, &data, BS, false).status(), Status::SUCCESS);
    d.inject(Fault::BitFlip {
        first_lba: 2,
        last_lba: 2,
        bit: 11,
    });
    let got = h.read(1, 0, 4, BS).1;
    let diff: Vec<usize> = (0..got.len()).filter(|&i| got[i] != data[i]).collect();
    assert_eq!(diff, vec![2 * 512 + 1]);
    assert_eq!(got[1025] ^ data[1025], 1 << 3);
    // Compare sees the flipped data too.
    let b = h.buffer(512);
    h.fill(&b, &data[1024..1536]);
    let mut cmp = h.read_sqe(2, &b, 1);
    cmp.opcode = io::COMPARE;
    assert_eq!(h.run(1, cmp).status(), media::COMPARE_FAILURE);
    d.clear_faults();
    assert_eq!(h.run(1, cmp).status(), Status::SUCCESS);
    d.destage().expect("destage");
    assert_eq!(d.read_medium(0, 4).expect("medium"), data);
}

#[test]
fn power_cut_drops_delayed_commands_without_completions() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    d.inject(Fault::Stall { op: FaultOp::Write });
    let data = blocks(6, 1);
    let b = h.buffer(512);
    h.fill(&b, &data);
    let w = h.write_sqe(2, &b, 1, false);
    h.submit(1, w);
    h.process();
    d.power_cut();
    let p = h.process();
    assert!(!p.worked);
    d.clear_faults();
    reconnect(&mut h, &d);
    h.process();
    assert!(h.reap(1).is_empty());
    assert_eq!(h.read(1, 2, 1, BS).1, vec![0; 512]);
}

#[test]
fn an_absent_drive_does_no_work() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    d.set_present(false);
    assert!(!d.is_present());
    let b = h.buffer(512);
    let r = h.read_sqe(0, &b, 1);
    h.submit(1, r);
    assert!(!h.process().worked);
    assert!(h.reap(1).is_empty());
    assert_eq!(h.csts() & reg::CSTS_RDY, reg::CSTS_RDY);
    d.set_present(true);
    h.process();
    assert_eq!(h.reap(1).len(), 1);
}

#[test]
fn faults_apply_to_both_ports() {
    let d = drive(small_cfg());
    let mut a = Host::ready(&d, 1, 1, 32);
    let mut b = Host::ready(&d, 2, 1, 32);
    d.inject(Fault::Error {
        op: FaultOp::Any,
        first_lba: 0,
        last_lba: 0,
        status: 0x281,
        dnr: true,
        remaining: Some(2),
    });
    assert_eq!(a.read(1, 0, 1, BS).0.status(), media::READ_ERROR);
    assert_eq!(b.read(1, 0, 1, BS).0.status(), media::READ_ERROR);
    assert_eq!(a.read(1, 0, 1, BS).0.status(), Status::SUCCESS);
    assert_eq!(d.controllers(), vec![1, 2]);
    drop(b);
    assert_eq!(d.controllers(), vec![1]);
}

/// Every write is counted against the port's controller that made it, in one drive-wide
/// sequence (what a fencing test checks: no write from a preempted port after the preempt's
/// sequence number); failed writes are not counted.
#[test]
fn writes_are_counted_per_port_in_one_sequence() {
    let d = drive(small_cfg());
    let mut a = Host::ready(&d, 1, 1, 32);
    let mut b = Host::ready(&d, 2, 1, 32);
    assert_eq!(d.port_writes(), (0, vec![]));
    let data = blocks(1, 1);
    assert_eq!(a.write(1, 0, &data, BS, false).status(), Status::SUCCESS);
    assert_eq!(b.write(1, 1, &data, BS, false).status(), Status::SUCCESS);
    assert_eq!(a.write(1, 2, &data, BS, false).status(), Status::SUCCESS);
    let (seq, ports) = d.port_writes();
    assert_eq!(seq, 3);
    assert_eq!(
        ports,
        vec![
            PortWrites {
                cntlid: 1,
                writes: 2,
                last_seq: 3
            },
            PortWrites {
                cntlid: 2,
                writes: 1,
                last_seq: 2
            },
        ]
    );
    // A write that fails changes nothing on the medium and is not counted.
    d.inject(Fault::Error {
        op: FaultOp::Write,
        first_lba: 0,
        last_lba: 0,
        status: 0x281,
        dnr: true,
        remaining: Some(1),
    });
    assert_ne!(b.write(1, 0, &data, BS, false).status(), Status::SUCCESS);
    assert_eq!(d.port_writes().0, 3);
    // Reads are not writes.
    assert_eq!(b.read(1, 0, 1, BS).0.status(), Status::SUCCESS);
    assert_eq!(d.port_writes().1[1].writes, 1);
}

/// A lost write is acknowledged and counted, and stores nothing; writes outside its range and
/// writes after it is cleared land.
#[test]
fn lost_writes_are_acknowledged_and_store_nothing() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    let old = blocks(1, 2);
    assert_eq!(h.write(1, 10, &old, BS, true).status(), Status::SUCCESS);
    let id = d.inject(Fault::LostWrite {
        first_lba: 11,
        last_lba: 11,
    });
    let new = blocks(2, 2);
    assert_eq!(h.write(1, 10, &new, BS, true).status(), Status::SUCCESS);
    assert_eq!(d.port_writes().0, 2, "counted as executed");
    assert_eq!(h.read(1, 10, 2, BS).1, old, "nothing stored");
    assert_eq!(h.write(1, 12, &new, BS, true).status(), Status::SUCCESS);
    assert_eq!(h.read(1, 12, 2, BS).1, new, "outside the range");
    assert!(d.clear_fault(id));
    assert_eq!(h.write(1, 10, &new, BS, true).status(), Status::SUCCESS);
    assert_eq!(h.read(1, 10, 2, BS).1, new);
}
