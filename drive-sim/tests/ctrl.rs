//! The controller driven like a PCIe NVMe driver would: registers, enable, Identify, queues,
//! data transfers through PRPs, admin command errors, resets, doorbells, flow control.

mod common;

use std::time::Duration;

use common::*;
use duplex_drive_sim::{DriveConfig, Fault, FaultOp, RegError, BAR0_SIZE};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::{admin, cns, feat, io, lid, reg};
use duplex_nvme::status::{generic, media, specific, Status};

#[test]
fn registers_reset_values_and_access_rules() {
    let d = drive(DriveConfig::default());
    let mut h = Host::new(&d, 1);
    let cap = h.reg64(reg::CAP);
    assert_eq!(reg::cap_mqes(cap), 1023);
    assert_ne!(cap & reg::CAP_CQR, 0);
    assert_eq!(reg::cap_to(cap), 2);
    assert_eq!(reg::cap_dstrd(cap), 0);
    assert_ne!(cap & reg::CAP_CSS_NVM, 0);
    assert_eq!((reg::cap_mpsmin(cap), reg::cap_mpsmax(cap)), (0, 0));
    // 8-byte registers as two halves.
    let lo = u64::from(h.reg32(0));
    let hi = u64::from(h.reg32(4));
    assert_eq!(lo | (hi << 32), cap);
    assert_eq!(h.reg32(reg::VS), 0x0001_0400);
    assert_eq!(h.csts(), 0);
    assert_eq!(h.reg32(reg::CC), 0);
    // Reserved registers read as zero and ignore writes; read-only registers ignore writes.
    assert_eq!(h.reg32(0x38), 0);
    h.set_reg32(0x38, 0xFFFF_FFFF);
    assert_eq!(h.reg32(0x38), 0);
    h.set_reg32(reg::VS, 7);
    assert_eq!(h.reg32(reg::VS), 0x0001_0400);
    h.set_reg32(reg::CSTS, 0xFFFF_FFFF);
    assert_eq!(h.csts(), 0);
    // ASQ written as halves; bits 11:0 are reserved.
    h.set_reg32(reg::ASQ, 0x1234_5FFF);
    h.set_reg32(reg::ASQ + 4, 0x9);
    assert_eq!(h.reg64(reg::ASQ), 0x9_1234_5000);
    h.set_reg64(reg::ACQ, 0xABCD_E000);
    assert_eq!(h.reg64(reg::ACQ), 0xABCD_E000);
    // INTMS/INTMC.
    h.set_reg32(reg::INTMS, 0b101);
    h.set_reg32(reg::INTMC, 0b001);
    assert_eq!(h.reg32(reg::INTMS), 0b100);
    assert_eq!(h.reg32(reg::INTMC), 0b100);
    // Bad accesses.
    let mut b2 = [0u8; 2];
    assert_eq!(
        h.ctrl.read_reg(reg::CSTS, &mut b2),
        Err(RegError::Size {
            offset: reg::CSTS,
            len: 2
        })
    );
    let mut b4 = [0u8; 4];
    assert!(matches!(
        h.ctrl.read_reg(reg::CSTS + 1, &mut b4),
        Err(RegError::Alignment { .. })
    ));
    let mut b8 = [0u8; 8];
    assert!(matches!(
        h.ctrl.read_reg(reg::CC, &mut b8),
        Err(RegError::Alignment { .. })
    ));
    assert!(matches!(
        h.ctrl.write_reg(BAR0_SIZE, &[0; 4]),
        Err(RegError::Range { .. })
    ));
    assert!(matches!(
        h.ctrl.write_reg(u64::MAX - 3, &[0; 4]),
        Err(RegError::Alignment { .. }) | Err(RegError::Range { .. })
    ));
    assert!(h.ctrl.write_reg(reg::CC, &[1]).is_err());
    assert_eq!(h.reg32(reg::CC), 0, "a refused write has no effect");
    // Doorbells read as zero.
    assert_eq!(h.reg32(reg::DOORBELLS), 0);
}

#[test]
fn enable_sequence_and_identify() {
    let cfg = DriveConfig {
        serial: "SIM-SERIAL-1".into(),
        ..DriveConfig::default()
    };
    let d = drive(cfg.clone());
    let mut h = Host::new(&d, 7);
    h.enable();
    let (c, id) = h.identify(cns::CONTROLLER, 0);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(&id[4..16], b"SIM-SERIAL-1");
    assert_eq!(u16_at(&id, 78), 7, "CNTLID");
    assert_eq!(id[76] & 0b11, 0b11, "CMIC: multi-port, multi-controller");
    assert_eq!(id[77], cfg.mdts, "MDTS");
    assert_eq!(u32_at(&id, 80), 0x0001_0400, "VER");
    assert_eq!(u32_at(&id, 516), 1, "NN");
    let oncs = u16_at(&id, 520);
    assert_ne!(oncs & (1 << 5), 0, "ONCS reservations");
    assert_ne!(oncs & (1 << 2), 0, "ONCS DSM");
    assert_ne!(oncs & (1 << 3), 0, "ONCS write zeroes");
    assert_eq!(id[525] & 1, 1, "VWC present");
    assert_eq!(u32_at(&id, 536), 0, "SGLS: PRPs only");
    assert_eq!(u16_at(&id, 256), 0, "OACS");
    assert_eq!(id[259], 3, "AERL");
    assert_eq!((id[512], id[513]), (0x66, 0x44));
    assert_eq!(id[96] & 1, 1, "CTRATT: 128-bit host id");
    assert!(id[1792..1804].iter().all(|&b| b == 0), "no fabrics fields");

    let (c, ns) = h.identify(cns::NAMESPACE, 1);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(u64_at(&ns, 0), cfg.blocks);
    assert_eq!(u64_at(&ns, 8), cfg.blocks);
    assert_eq!(ns[30] & 1, 1, "NMIC shared");
    assert_eq!(ns[31], duplex_nvme::resv::RESCAP);
    assert_eq!((u32_at(&ns, 128) >> 16) & 0xFF, 12, "LBADS 4096");
    assert_eq!(&ns[104..120], &cfg.nguid);
    assert_eq!(&ns[120..128], &cfg.eui64);

    let (c, list) = h.identify(cns::ACTIVE_NS_LIST, 0);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!((u32_at(&list, 0), u32_at(&list, 4)), (1, 0));
    let (_, list) = h.identify(cns::ACTIVE_NS_LIST, 1);
    assert_eq!(u32_at(&list, 0), 0);

    let (c, desc) = h.identify(cns::NS_DESC_LIST, 1);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!((desc[0], desc[1]), (1, 8), "EUI64");
    assert_eq!(&desc[4..12], &cfg.eui64);
    assert_eq!((desc[12], desc[13]), (2, 16), "NGUID");
    assert_eq!(&desc[16..32], &cfg.nguid);
    assert_eq!((desc[32], desc[33]), (3, 16), "UUID");
    assert_eq!(desc[36 + 6] >> 4, 4, "UUID version 4");
    assert_eq!((desc[52], desc[53], desc[56]), (4, 1, 0), "CSI NVM");

    assert_eq!(
        h.identify(cns::NAMESPACE, 2).0.status(),
        generic::INVALID_NS
    );
    assert_eq!(
        h.identify(cns::NS_DESC_LIST, 0).0.status(),
        generic::INVALID_NS
    );
    assert_eq!(h.identify(0x10, 0).0.status(), generic::INVALID_FIELD);
    // Unknown admin opcode; fused; SGL.
    let c = h.admin(Sqe {
        opcode: 0x80,
        ..Sqe::default()
    });
    assert_eq!(c.status(), generic::INVALID_OPCODE);
    let c = h.admin(Sqe {
        opcode: admin::KEEP_ALIVE,
        flags: 1 << 6,
        ..Sqe::default()
    });
    assert_eq!(c.status(), generic::INVALID_FIELD);
    let c = h.admin(Sqe {
        opcode: admin::KEEP_ALIVE,
        ..Sqe::default()
    });
    assert_eq!(c.status(), Status::SUCCESS);
    // Completions report the SQ head after the fetch.
    assert_eq!(u32::from(c.sqhd), h.queues.get(&0).expect("admin").tail);
}

#[test]
fn invalid_enable_sets_cfs_until_reset() {
    let d = drive(DriveConfig::default());
    let mut h = Host::new(&d, 1);
    h.enable_with(ADMIN_ENTRIES, CC_ENABLE | (1 << reg::CC_MPS_SHIFT));
    assert_eq!(h.csts() & 3, reg::CSTS_CFS, "MPS 8 KiB is not supported");
    h.disable();
    assert_eq!(h.csts(), 0);
    h.enable_with(1, CC_ENABLE);
    assert_eq!(h.csts() & 3, reg::CSTS_CFS, "a one-entry admin queue");
    h.disable();
    h.enable_with(ADMIN_ENTRIES, CC_ENABLE | (1 << reg::CC_CSS_SHIFT));
    assert_eq!(h.csts() & 3, reg::CSTS_CFS, "unsupported command set");
    h.disable();
    h.enable();
    assert_eq!(h.identify(cns::CONTROLLER, 0).0.status(), Status::SUCCESS);
}

#[test]
fn queue_pairs_and_round_trips_through_prp_lists() {
    let d = drive(DriveConfig {
        mdts: 10, // 4 MiB: enough pages to chain PRP lists
        ..DriveConfig::default()
    });
    let mut h = Host::ready(&d, 1, 4, 64);
    // A write/read on every queue.
    for q in 1..=4u16 {
        let data = pattern(q as u8, 4096 * 3);
        let c = h.write(q, u64::from(q) * 100, &data, 4096, false);
        assert_eq!(c.status(), Status::SUCCESS);
        let (c, back) = h.read(q, u64::from(q) * 100, 3, 4096);
        assert_eq!(c.status(), Status::SUCCESS);
        assert_eq!(back, data);
    }
    // Offsets, lists in the middle of a page, exact page multiples, chained lists.
    let cases: [(u64, u64, u64); 6] = [
        (8 * 4096, 0, 0),              // exact multiple, one list page
        (8 * 4096, 512, 4096 - 24),    // offset; list of 8 chains after 2 entries
        (2 * 4096, 2048, 0),           // three pages with an offset, list of 2
        (514 * 4096, 0, 0),            // 513 list entries: a chain after 511
        (513 * 4096, 0, 0),            // 512 list entries: exactly one full list page
        (1024 * 4096, 1024, 4096 - 8), // a list page that is only a chain pointer
    ];
    for (i, (len, off, list_off)) in cases.into_iter().enumerate() {
        let nlb = (len / 4096) as u32;
        let data = pattern(i as u8 + 10, len as usize);
        let wb = h.buffer_at(len, off, list_off);
        h.fill(&wb, &data);
        let sqe = h.write_sqe(1000, &wb, nlb, false);
        assert_eq!(h.run(1, sqe).status(), Status::SUCCESS, "write case {i}");
        let rb = h.buffer_at(len, off, list_off);
        let sqe = h.read_sqe(1000, &rb, nlb);
        assert_eq!(h.run(2, sqe).status(), Status::SUCCESS, "read case {i}");
        assert!(h.contents(&rb) == data, "case {i}: data differs");
    }
    // Interrupts: each I/O CQ signals its vector; the admin CQ vector 0.
    assert_eq!(h.irqs & 0b11111, 0b11111);
}

#[test]
fn queue_creation_and_deletion_errors() {
    let d = drive(DriveConfig {
        max_queues: 4,
        mqes: 64,
        ..DriveConfig::default()
    });
    let mut h = Host::new(&d, 1);
    h.enable();
    // Number of Queues: ask for 8, get the 4 there are.
    let c = h.set_feature(feat::NUM_QUEUES, 7 | (7 << 16));
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(c.dw0, 3 | (3 << 16));
    let c = h.set_feature(feat::NUM_QUEUES, 1 | (1 << 16));
    assert_eq!(c.dw0, 1 | (1 << 16), "two pairs");
    assert_eq!(
        h.set_feature(feat::NUM_QUEUES, 0xFFFF).status(),
        generic::INVALID_FIELD
    );
    assert_eq!(h.get_feature(feat::NUM_QUEUES, 0).dw0, 1 | (1 << 16));
    assert_eq!(h.create_cq(0, 16, true, 0).status(), specific::INVALID_QID);
    assert_eq!(h.create_cq(3, 16, true, 0).status(), specific::INVALID_QID);
    assert_eq!(
        h.create_cq(1, 65, true, 0).status(),
        specific::INVALID_QUEUE_SIZE
    );
    assert_eq!(
        h.create_cq(1, 1, true, 0).status(),
        specific::INVALID_QUEUE_SIZE
    );
    assert_eq!(
        h.create_cq(1, 16, true, 5).status().sc(),
        0x08,
        "invalid vector"
    );
    let c = h.admin(Sqe {
        opcode: admin::CREATE_IO_CQ,
        dptr: prp_bytes(0x10000, 0),
        cdw10: 1 | (15 << 16),
        cdw11: 0, // PC = 0
        ..Sqe::default()
    });
    assert_eq!(c.status(), generic::INVALID_FIELD);
    let c = h.admin(Sqe {
        opcode: admin::CREATE_IO_CQ,
        dptr: prp_bytes(0x10010, 0),
        cdw10: 1 | (15 << 16),
        cdw11: 1,
        ..Sqe::default()
    });
    assert_eq!(c.status(), generic::PRP_OFFSET);
    assert_eq!(h.create_sq(1, 16, 1).status(), specific::INVALID_CQ);
    assert_eq!(h.create_cq(1, 16, true, 1).status(), Status::SUCCESS);
    assert_eq!(
        h.create_cq(1, 16, true, 1).status(),
        specific::INVALID_QID,
        "in use"
    );
    assert_eq!(
        h.create_sq(1, 16, 0).status(),
        specific::INVALID_CQ,
        "admin CQ"
    );
    assert_eq!(
        h.create_sq(1, 128, 1).status(),
        specific::INVALID_QUEUE_SIZE
    );
    assert_eq!(h.create_sq(1, 16, 1).status(), Status::SUCCESS);
    assert_eq!(h.create_sq(2, 16, 1).status(), Status::SUCCESS, "CQ shared");
    assert_eq!(h.create_sq(2, 16, 1).status(), specific::INVALID_QID);
    assert_eq!(
        h.set_feature(feat::NUM_QUEUES, 0).status(),
        generic::SEQUENCE,
        "after queues exist"
    );
    let del = |h: &mut Host, op: u8, qid: u16| {
        h.admin(Sqe {
            opcode: op,
            cdw10: u32::from(qid),
            ..Sqe::default()
        })
        .status()
    };
    assert_eq!(
        del(&mut h, admin::DELETE_IO_CQ, 1),
        specific::INVALID_QUEUE_DELETION
    );
    assert_eq!(del(&mut h, admin::DELETE_IO_SQ, 0), specific::INVALID_QID);
    assert_eq!(del(&mut h, admin::DELETE_IO_CQ, 0), specific::INVALID_QID);
    assert_eq!(del(&mut h, admin::DELETE_IO_SQ, 3), specific::INVALID_QID);
    assert_eq!(del(&mut h, admin::DELETE_IO_SQ, 1), Status::SUCCESS);
    assert_eq!(
        del(&mut h, admin::DELETE_IO_CQ, 1),
        specific::INVALID_QUEUE_DELETION
    );
    assert_eq!(del(&mut h, admin::DELETE_IO_SQ, 2), Status::SUCCESS);
    assert_eq!(del(&mut h, admin::DELETE_IO_CQ, 1), Status::SUCCESS);
    assert_eq!(del(&mut h, admin::DELETE_IO_CQ, 1), specific::INVALID_QID);
    // Entry sizes are checked at creation.
    h.disable();
    h.enable_with(ADMIN_ENTRIES, 1);
    assert_eq!(
        h.create_cq(1, 16, true, 1).status(),
        specific::INVALID_QUEUE_SIZE
    );
}

#[test]
fn io_command_errors() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    let blocks = small_cfg().blocks;
    let b = h.buffer(4096);
    let mut sqe = h.read_sqe(blocks - 1, &b, 2);
    assert_eq!(h.run(1, sqe).status(), generic::LBA_RANGE);
    sqe = h.read_sqe(u64::MAX, &b, 2);
    assert_eq!(
        h.run(1, sqe).status(),
        generic::LBA_RANGE,
        "SLBA + NLB overflows"
    );
    sqe = h.read_sqe(blocks - 1, &b, 1);
    assert_eq!(h.run(1, sqe).status(), Status::SUCCESS);
    sqe.nsid = 2;
    assert_eq!(h.run(1, sqe).status(), generic::INVALID_NS);
    sqe.nsid = 0xFFFF_FFFF;
    assert_eq!(h.run(1, sqe).status(), generic::INVALID_NS);
    // MDTS 5: 128 KiB = 256 blocks of 512.
    sqe = h.read_sqe(0, &b, 257);
    assert_eq!(h.run(1, sqe).status(), generic::INVALID_FIELD);
    // Unknown opcode, fused, SGL.
    let mut bad = h.read_sqe(0, &b, 1);
    bad.opcode = 0x7E;
    assert_eq!(h.run(1, bad).status(), generic::INVALID_OPCODE);
    bad = h.read_sqe(0, &b, 1);
    bad.flags = 1;
    assert_eq!(h.run(1, bad).status(), generic::INVALID_FIELD);
    bad.flags = 1 << 6;
    assert_eq!(h.run(1, bad).status(), generic::INVALID_FIELD);
    // PRP1 not dword aligned; PRP2 not page aligned.
    bad = h.read_sqe(0, &b, 1);
    bad.dptr = prp_bytes(b.prp1 + 2, 0);
    assert_eq!(h.run(1, bad).status(), generic::PRP_OFFSET);
    bad = h.read_sqe(0, &b, 8);
    bad.dptr = prp_bytes(b.prp1 + 2048, b.prp1 + 8);
    assert_eq!(h.run(1, bad).status(), generic::PRP_OFFSET);
    // Data outside host memory: Data Transfer Error, and a write changes nothing.
    let data = pattern(3, 512);
    assert_eq!(h.write(1, 5, &data, 512, false).status(), Status::SUCCESS);
    let mut w = h.write_sqe(5, &b, 1, false);
    w.dptr = prp_bytes(MEM as u64 + 4096, 0);
    assert_eq!(h.run(1, w).status(), generic::DATA_TRANSFER);
    let mut r = h.read_sqe(5, &b, 1);
    r.dptr = prp_bytes(MEM as u64 + 8192, 0);
    assert_eq!(h.run(1, r).status(), generic::DATA_TRANSFER);
    assert_eq!(h.read(1, 5, 1, 512).1, data);
    assert_eq!(h.csts() & reg::CSTS_CFS, 0, "data faults are not fatal");
    // Flush with the broadcast NSID; Write Zeroes; Compare.
    let mut f = Sqe {
        opcode: io::FLUSH,
        nsid: 0xFFFF_FFFF,
        ..Sqe::default()
    };
    assert_eq!(h.run(1, f).status(), Status::SUCCESS);
    f.nsid = 3;
    assert_eq!(h.run(1, f).status(), generic::INVALID_NS);
    let wz = Sqe {
        opcode: io::WRITE_ZEROES,
        nsid: 1,
        cdw10: 5,
        cdw12: 0,
        ..Sqe::default()
    };
    assert_eq!(h.run(1, wz).status(), Status::SUCCESS);
    assert_eq!(h.read(1, 5, 1, 512).1, vec![0; 512]);
    let wz_far = Sqe {
        cdw10: (blocks - 2) as u32,
        cdw12: 2,
        ..wz
    };
    assert_eq!(h.run(1, wz_far).status(), generic::LBA_RANGE);
    assert_eq!(h.write(1, 6, &data, 512, false).status(), Status::SUCCESS);
    let cb = h.buffer(512);
    h.fill(&cb, &data);
    let mut cmp = h.read_sqe(6, &cb, 1);
    cmp.opcode = io::COMPARE;
    assert_eq!(h.run(1, cmp).status(), Status::SUCCESS);
    cmp.cdw10 = 7;
    assert_eq!(h.run(1, cmp).status(), media::COMPARE_FAILURE);
}

#[test]
fn dataset_management_deallocate_zeroes_ranges() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    let data = pattern(1, 8 * 512);
    assert_eq!(h.write(1, 0, &data, 512, false).status(), Status::SUCCESS);
    let mut ranges = Vec::new();
    for (slba, n) in [(1u64, 2u32), (6, 1), (0, 0)] {
        ranges.extend_from_slice(&0u32.to_le_bytes());
        ranges.extend_from_slice(&n.to_le_bytes());
        ranges.extend_from_slice(&slba.to_le_bytes());
    }
    let b = h.buffer(ranges.len() as u64);
    h.fill(&b, &ranges);
    let dsm = with_prps(
        Sqe {
            opcode: io::DSM,
            nsid: 1,
            cdw10: 2,
            cdw11: 1 << 2,
            ..Sqe::default()
        },
        &b,
    );
    assert_eq!(h.run(1, dsm).status(), Status::SUCCESS);
    let back = h.read(1, 0, 8, 512).1;
    for blk in 0..8usize {
        let got = &back[blk * 512..(blk + 1) * 512];
        if [1, 2, 6].contains(&blk) {
            assert!(got.iter().all(|&x| x == 0), "block {blk} deallocated");
        } else {
            assert_eq!(got, &data[blk * 512..(blk + 1) * 512]);
        }
    }
    // Without AD it is a hint; a range beyond the namespace fails the whole command.
    let hint = Sqe { cdw11: 1, ..dsm };
    assert_eq!(h.run(1, hint).status(), Status::SUCCESS);
    let mut far = Vec::new();
    far.extend_from_slice(&0u32.to_le_bytes());
    far.extend_from_slice(&2u32.to_le_bytes());
    far.extend_from_slice(&(small_cfg().blocks - 1).to_le_bytes());
    h.fill(&b, &far);
    let far_cmd = Sqe { cdw10: 0, ..dsm };
    assert_eq!(h.run(1, far_cmd).status(), generic::LBA_RANGE);
}

#[test]
fn abort_of_a_stalled_command() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    let stall = d.inject(Fault::Stall { op: FaultOp::Read });
    let b = h.buffer(512);
    let sqe = h.read_sqe(0, &b, 1);
    let cid = h.submit(1, sqe);
    h.process();
    assert!(h.reap(1).is_empty(), "stalled");
    let abort = |h: &mut Host, cid: u16| {
        h.admin(Sqe {
            opcode: admin::ABORT,
            cdw10: 1 | (u32::from(cid) << 16),
            ..Sqe::default()
        })
    };
    let c = abort(&mut h, cid);
    assert_eq!((c.status(), c.dw0 & 1), (Status::SUCCESS, 0), "aborted");
    let io = h.reap(1);
    assert_eq!(io.len(), 1);
    assert_eq!((io[0].cid, io[0].status()), (cid, generic::ABORT_REQUESTED));
    let c = abort(&mut h, cid);
    assert_eq!(
        (c.status(), c.dw0 & 1),
        (Status::SUCCESS, 1),
        "nothing to abort"
    );
    // Clearing the stall releases the others; they then complete normally.
    let cid2 = h.submit(1, sqe);
    h.process();
    assert!(h.reap(1).is_empty());
    assert!(d.clear_fault(stall));
    h.process();
    let io = h.reap(1);
    assert_eq!(io.len(), 1);
    assert_eq!((io[0].cid, io[0].status()), (cid2, Status::SUCCESS));
}

#[test]
fn duplicate_cid_of_an_outstanding_command() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 32);
    d.inject(Fault::Stall { op: FaultOp::Write });
    let b = h.buffer(512);
    let mut w = h.write_sqe(0, &b, 1, false);
    w.cid = 77;
    h.submit_raw(1, w);
    h.submit_raw(1, w);
    h.process();
    let c = h.reap(1);
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].cid, c[0].status()), (77, generic::CID_CONFLICT));
    // AERs are outstanding commands too.
    let aer = Sqe {
        opcode: admin::ASYNC_EVENT,
        cid: 500,
        ..Sqe::default()
    };
    h.submit_raw(0, aer);
    h.submit_raw(0, aer);
    h.process();
    let c = h.reap(0);
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].cid, c[0].status()), (500, generic::CID_CONFLICT));
}

#[test]
fn controller_reset_drops_queues_and_outstanding_commands() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 2, 32);
    let stall = d.inject(Fault::Stall { op: FaultOp::Write });
    let data = pattern(9, 512);
    let b = h.buffer(512);
    h.fill(&b, &data);
    let w = h.write_sqe(3, &b, 1, false);
    h.submit(1, w);
    h.process();
    h.disable();
    assert_eq!(h.csts() & reg::CSTS_RDY, 0);
    d.clear_fault(stall);
    h.enable();
    h.process();
    assert!(h.reap(0).is_empty(), "nothing completes after a reset");
    // The I/O queues are gone: their doorbells are invalid now.
    h.queues.insert(
        1,
        Queue {
            qid: 1,
            sq: 0,
            cq: 0,
            sq_size: 32,
            cq_size: 32,
            tail: 0,
            head: 0,
            phase: true,
        },
    );
    let aer = h.submit(
        0,
        Sqe {
            opcode: admin::ASYNC_EVENT,
            ..Sqe::default()
        },
    );
    h.set_reg32(Host::sq_doorbell(1), 1);
    h.process();
    let c = h.reap(0);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].cid, aer);
    assert_eq!(
        c[0].dw0, 0x01_00_00,
        "error event: invalid doorbell register"
    );
    h.queues.remove(&1);
    h.create_pair(1, 32);
    assert_eq!(
        h.read(1, 3, 1, 512).1,
        vec![0; 512],
        "the write never happened"
    );
}

#[test]
fn delete_sq_aborts_outstanding_commands() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 2, 32);
    let stall = d.inject(Fault::Stall { op: FaultOp::Write });
    let data = pattern(4, 512);
    let b = h.buffer(512);
    h.fill(&b, &data);
    let w = h.write_sqe(8, &b, 1, false);
    let c1 = h.submit(2, w);
    let w2 = h.write_sqe(9, &b, 1, false);
    let c2 = h.submit(2, w2);
    h.process();
    assert!(h.reap(2).is_empty());
    let c = h.admin(Sqe {
        opcode: admin::DELETE_IO_SQ,
        cdw10: 2,
        ..Sqe::default()
    });
    assert_eq!(c.status(), Status::SUCCESS);
    let io = h.reap(2);
    assert_eq!(io.len(), 2);
    assert_eq!(
        (io[0].cid, io[0].status()),
        (c1, generic::ABORTED_SQ_DELETION)
    );
    assert_eq!(
        (io[1].cid, io[1].status()),
        (c2, generic::ABORTED_SQ_DELETION)
    );
    assert_eq!(io[0].sqid, 2);
    d.clear_fault(stall);
    h.process();
    assert_eq!(h.read(1, 8, 2, 512).1, vec![0; 1024]);
}

#[test]
fn invalid_doorbell_writes_raise_error_events() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 2, 16);
    let aer = |h: &mut Host| {
        h.submit(
            0,
            Sqe {
                opcode: admin::ASYNC_EVENT,
                ..Sqe::default()
            },
        )
    };
    let a1 = aer(&mut h);
    h.process();
    assert!(h.reap(0).is_empty(), "AER outstanding");
    // A queue that does not exist.
    h.set_reg32(Host::sq_doorbell(9), 1);
    h.process();
    let c = h.reap(0);
    assert_eq!((c.len(), c[0].cid), (1, a1));
    assert_eq!(c[0].dw0 & 7, 0, "error status event");
    assert_eq!(
        (c[0].dw0 >> 8) & 0xFF,
        0,
        "write to invalid doorbell register"
    );
    assert_eq!((c[0].dw0 >> 16) & 0xFF, u32::from(lid::ERROR));
    // Masked until the error log is read.
    let a2 = aer(&mut h);
    h.set_reg32(Host::sq_doorbell(1), 16); // value >= size
    h.process();
    assert!(h.reap(0).is_empty(), "error events masked");
    // Reading the error log (RAE = 0) unmasks them: the pending event completes the AER
    // right after the Get Log Page.
    let b = h.buffer(4096);
    let glp = h.submit(
        0,
        with_prps(
            Sqe {
                opcode: admin::GET_LOG_PAGE,
                cdw10: u32::from(lid::ERROR) | (1023 << 16),
                ..Sqe::default()
            },
            &b,
        ),
    );
    h.process();
    let c = h.reap(0);
    assert_eq!(c.len(), 2);
    assert_eq!((c[0].cid, c[0].status()), (glp, Status::SUCCESS));
    assert_eq!(c[1].cid, a2);
    assert_eq!((c[1].dw0 >> 8) & 0xFF, 1, "invalid doorbell write value");
    let log = h.contents(&b);
    assert_eq!(u64_at(&log, 0), 2, "newest entry first");
    assert_eq!(u16_at(&log, 8), 1, "SQID of the bad doorbell");
    assert_eq!(u64_at(&log, 64), 1);
    // A CQ head beyond what was posted, then the queues still work.
    h.log_page(lid::ERROR, 64, 0, false);
    let a3 = aer(&mut h);
    h.set_reg32(Host::cq_doorbell(1), 5);
    h.process();
    let c = h.reap(0);
    assert_eq!((c.len(), c[0].cid), (1, a3));
    assert_eq!((c[0].dw0 >> 8) & 0xFF, 1);
    let data = pattern(1, 512);
    assert_eq!(h.write(1, 0, &data, 512, false).status(), Status::SUCCESS);
    assert_eq!(h.read(2, 0, 1, 512).1, data);
    assert_eq!(h.csts() & reg::CSTS_CFS, 0);
    // AER limit: AERL = 3 means four outstanding.
    for _ in 0..4 {
        aer(&mut h);
    }
    let c = h.run(
        0,
        Sqe {
            opcode: admin::ASYNC_EVENT,
            ..Sqe::default()
        },
    );
    assert_eq!(c.status(), specific::AER_LIMIT);
}

#[test]
fn full_completion_queue_holds_completions() {
    let d = drive(small_cfg());
    let mut h = Host::new(&d, 1);
    h.enable();
    assert_eq!(h.create_cq(1, 4, true, 1).status(), Status::SUCCESS);
    assert_eq!(h.create_sq(1, 16, 1).status(), Status::SUCCESS);
    let b = h.buffer(512);
    let mut cids = Vec::new();
    for _ in 0..8 {
        let r = h.read_sqe(0, &b, 1);
        cids.push(h.submit(1, r));
    }
    h.process();
    let first = h.peek(1);
    assert_eq!(first.len(), 3, "a 4-entry CQ holds 3");
    h.process();
    assert!(h.peek(1).is_empty(), "held until the head doorbell moves");
    h.ring_cq(1);
    h.process();
    let second = h.peek(1);
    assert_eq!(second.len(), 3);
    h.ring_cq(1);
    h.process();
    let third = h.reap(1);
    assert_eq!(third.len(), 2);
    let got: Vec<u16> = first
        .iter()
        .chain(&second)
        .chain(&third)
        .map(|c| c.cid)
        .collect();
    assert_eq!(got, cids, "in order, none lost");
    assert!(first
        .iter()
        .chain(&second)
        .chain(&third)
        .all(|c| c.status() == Status::SUCCESS));
}

#[test]
fn sq_fetch_is_bounded_per_call() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 2, 256);
    let b = h.buffer(512);
    for _ in 0..100 {
        let r = h.read_sqe(0, &b, 1);
        h.submit(1, r);
    }
    let r = h.read_sqe(0, &b, 1);
    h.submit(2, r);
    h.process();
    assert_eq!(h.reap(1).len(), 64, "one burst");
    assert_eq!(
        h.reap(2).len(),
        1,
        "the other queue is served in the same call"
    );
    h.process();
    assert_eq!(h.reap(1).len(), 36);
}

#[test]
fn shutdown_destages_the_cache_and_stops() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 16);
    let data = pattern(5, 1024);
    assert_eq!(h.write(1, 10, &data, 512, false).status(), Status::SUCCESS);
    assert_eq!(d.cached_blocks(), 2);
    let cc = h.reg32(reg::CC);
    h.set_reg32(reg::CC, cc | (1 << reg::CC_SHN_SHIFT));
    assert_eq!(h.csts() & reg::CSTS_SHST_MASK, reg::CSTS_SHST_COMPLETE);
    assert_eq!(d.cached_blocks(), 0);
    assert_eq!(d.read_medium(10, 2).expect("medium"), data);
    let b = h.buffer(512);
    let r = h.read_sqe(0, &b, 1);
    h.submit(1, r);
    h.process();
    assert!(h.reap(1).is_empty(), "no processing after shutdown");
    h.disable();
    h.enable();
    h.create_pair(1, 16);
    assert_eq!(h.read(1, 10, 2, 512).1, data);
}

#[test]
fn unreachable_queue_memory_is_fatal() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 16);
    // Point the host's view of SQ 1 somewhere else: the controller reads garbage but fine; now
    // an SQ created beyond host memory.
    let c = h.admin(Sqe {
        opcode: admin::CREATE_IO_SQ,
        dptr: prp_bytes(MEM as u64 + 0x10000, 0),
        cdw10: 2 | (15 << 16),
        cdw11: 1 | (1 << 16),
        ..Sqe::default()
    });
    assert_eq!(c.status(), Status::SUCCESS);
    h.set_reg32(Host::sq_doorbell(2), 1);
    h.process();
    assert_eq!(h.csts() & 3, reg::CSTS_RDY | reg::CSTS_CFS);
    // Nothing more is processed until reset.
    let data = pattern(1, 512);
    let b = h.buffer(512);
    h.fill(&b, &data);
    let w = h.write_sqe(0, &b, 1, false);
    h.submit(1, w);
    h.process();
    assert!(h.reap(1).is_empty());
    h.disable();
    assert_eq!(h.csts(), 0);
    h.enable();
    assert_eq!(h.identify(cns::CONTROLLER, 0).0.status(), Status::SUCCESS);
}

#[test]
fn latency_delays_execution_until_due() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 16);
    d.inject(Fault::Latency {
        op: FaultOp::Write,
        micros: 5000,
    });
    let data = pattern(2, 512);
    let b = h.buffer(512);
    h.fill(&b, &data);
    let w = h.write_sqe(4, &b, 1, false);
    let cid = h.submit(1, w);
    let p = h.process();
    assert!(h.reap(1).is_empty());
    assert_eq!(p.next_due, Some(h.now + Duration::from_micros(5000)));
    d.clear_faults();
    // Not applied yet: a read (no latency now) sees the old data.
    assert_eq!(h.read(1, 4, 1, 512).1, vec![0; 512]);
    h.advance(Duration::from_micros(4999));
    h.process();
    assert!(h.reap(1).is_empty());
    h.advance(Duration::from_micros(1));
    let p = h.process();
    assert_eq!(p.next_due, None);
    let c = h.reap(1);
    assert_eq!(
        (c.len(), c[0].cid, c[0].status()),
        (1, cid, Status::SUCCESS)
    );
    assert_eq!(h.read(1, 4, 1, 512).1, data);
}

#[test]
fn features_and_log_pages() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 16);
    assert_eq!(
        h.set_feature(feat::ARBITRATION, 3).status(),
        Status::SUCCESS
    );
    assert_eq!(h.get_feature(feat::ARBITRATION, 0).dw0, 3);
    assert_eq!(
        h.set_feature(feat::POWER_MGMT, 1).status(),
        generic::INVALID_FIELD
    );
    assert_eq!(h.get_feature(feat::TEMP_THRESHOLD, 0).dw0 & 0xFFFF, 0x157);
    assert_eq!(
        h.set_feature(feat::TEMP_THRESHOLD, 0x160).status(),
        Status::SUCCESS
    );
    assert_eq!(h.get_feature(feat::TEMP_THRESHOLD, 0).dw0 & 0xFFFF, 0x160);
    assert_eq!(
        h.set_feature(feat::TEMP_THRESHOLD, 1 << 16).status(),
        generic::INVALID_FIELD
    );
    assert_eq!(h.get_feature(feat::VOLATILE_WC, 0).dw0, 1);
    assert_eq!(
        h.set_feature(feat::ASYNC_EVENT, 0xFF).status(),
        Status::SUCCESS
    );
    assert_eq!(h.get_feature(feat::ASYNC_EVENT, 0).dw0, 0xFF);
    assert_eq!(
        h.set_feature(feat::IRQ_COALESCE, 0x0A05).status(),
        Status::SUCCESS
    );
    assert_eq!(h.get_feature(feat::IRQ_COALESCE, 0).dw0, 0x0A05);
    assert_eq!(
        h.set_feature(feat::ERROR_RECOVERY, 1 << 16).status(),
        generic::INVALID_FIELD
    );
    assert_eq!(
        h.set_feature(0x0F, 1000).status(),
        generic::INVALID_FIELD,
        "no keep alive"
    );
    assert_eq!(h.set_feature(0xC0, 0).status(), generic::INVALID_FIELD);
    let saved = h.admin(Sqe {
        opcode: admin::SET_FEATURES,
        cdw10: u32::from(feat::ARBITRATION) | (1 << 31),
        ..Sqe::default()
    });
    assert_eq!(saved.status(), specific::FEATURE_NOT_SAVEABLE);
    // SEL: default and capabilities.
    let def = h.admin(Sqe {
        opcode: admin::GET_FEATURES,
        cdw10: u32::from(feat::ARBITRATION) | (1 << 8),
        ..Sqe::default()
    });
    assert_eq!(def.dw0, 0);
    let caps = h.admin(Sqe {
        opcode: admin::GET_FEATURES,
        nsid: 1,
        cdw10: u32::from(duplex_nvme::resv::FEAT_RESV_NOTIFICATION_MASK) | (3 << 8),
        ..Sqe::default()
    });
    assert_eq!(caps.dw0, 0b110);
    // Features revert on a reset.
    h.disable();
    h.enable();
    assert_eq!(h.get_feature(feat::ARBITRATION, 0).dw0, 0);

    // Host identifier: 64-bit, 128-bit, inconsistent format.
    assert_eq!(h.set_host_id(0xABCD).status(), Status::SUCCESS);
    let b = h.buffer(16);
    let g = h.admin(with_prps(
        Sqe {
            opcode: admin::GET_FEATURES,
            cdw10: u32::from(feat::HOST_ID),
            ..Sqe::default()
        },
        &b,
    ));
    assert_eq!(g.status(), Status::SUCCESS);
    assert_eq!(u64_at(&h.contents(&b), 0), 0xABCD);
    let g = h.admin(with_prps(
        Sqe {
            opcode: admin::GET_FEATURES,
            cdw10: u32::from(feat::HOST_ID),
            cdw11: 1,
            ..Sqe::default()
        },
        &b,
    ));
    assert_eq!(g.status(), generic::HOST_ID_INCONSISTENT);
    h.fill(&b, b"0123456789abcdef");
    let s = h.admin(with_prps(
        Sqe {
            opcode: admin::SET_FEATURES,
            cdw10: u32::from(feat::HOST_ID),
            cdw11: 1,
            ..Sqe::default()
        },
        &b,
    ));
    assert_eq!(s.status(), Status::SUCCESS);
    let out = h.buffer(16);
    let g = h.admin(with_prps(
        Sqe {
            opcode: admin::GET_FEATURES,
            cdw10: u32::from(feat::HOST_ID),
            cdw11: 1,
            ..Sqe::default()
        },
        &out,
    ));
    assert_eq!(g.status(), Status::SUCCESS);
    assert_eq!(h.contents(&out), b"0123456789abcdef");

    // Log pages.
    let (c, smart) = h.log_page(lid::SMART, 512, 0, false);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(u16_at(&smart, 1), 273 + 35, "composite temperature");
    let (c, eff) = h.log_page(lid::CMD_EFFECTS, 4096, 0, false);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(u32_at(&eff, 4 * usize::from(admin::IDENTIFY)) & 1, 1);
    assert_eq!(u32_at(&eff, 1024 + 4 * usize::from(io::WRITE)), 0b11);
    let (c, fw) = h.log_page(lid::FW_SLOT, 512, 0, false);
    assert_eq!((c.status(), fw[0]), (Status::SUCCESS, 1));
    let (c, rn) = h.log_page(0x80, 64, 0, false);
    assert_eq!(c.status(), Status::SUCCESS);
    assert!(
        rn.iter().all(|&x| x == 0),
        "empty reservation notification page"
    );
    // Offsets, past-the-end reads are zero-filled.
    let (c, tail) = h.log_page(lid::SMART, 8, 1, false);
    assert_eq!(
        c.status(),
        generic::INVALID_FIELD,
        "offset not dword aligned"
    );
    assert!(tail.iter().all(|&x| x == 0));
    let (c, part) = h.log_page(lid::SMART, 8, 0, false);
    assert_eq!((c.status(), &part[..]), (Status::SUCCESS, &smart[..8]));
    let (c, past) = h.log_page(lid::SMART, 16, 4096, false);
    assert_eq!(c.status(), Status::SUCCESS);
    assert!(past.iter().all(|&x| x == 0));
    assert_eq!(
        h.log_page(0x04, 64, 0, false).0.status(),
        specific::INVALID_LOG_PAGE
    );
    // Larger than MDTS.
    let big = h.admin(Sqe {
        opcode: admin::GET_LOG_PAGE,
        cdw10: u32::from(lid::SMART) | (0xFFFF << 16),
        cdw11: 0xFFFF,
        ..Sqe::default()
    });
    assert_eq!(big.status(), generic::INVALID_FIELD);
}

#[test]
fn interrupts_follow_vectors_and_masks() {
    let d = drive(small_cfg());
    let mut h = Host::new(&d, 1);
    h.enable();
    assert_eq!(h.ctrl.irq_vectors(), 17);
    assert_eq!(h.create_cq(1, 16, true, 5).status(), Status::SUCCESS);
    assert_eq!(h.create_sq(1, 16, 1).status(), Status::SUCCESS);
    assert_eq!(h.create_cq(2, 16, false, 6).status(), Status::SUCCESS);
    assert_eq!(h.create_sq(2, 16, 2).status(), Status::SUCCESS);
    let b = h.buffer(512);
    let r = h.read_sqe(0, &b, 1);
    h.submit(1, r);
    h.submit(2, r);
    let p = h.process();
    assert_eq!(
        p.irqs,
        1 << 5,
        "vector 5 only: CQ 2 has interrupts disabled"
    );
    h.reap(1);
    h.reap(2);
    h.set_reg32(reg::INTMS, 1 << 5);
    h.submit(1, r);
    let p = h.process();
    assert_eq!(p.irqs, 0, "masked");
    h.set_reg32(reg::INTMC, 1 << 5);
    let p = h.process();
    assert_eq!(p.irqs, 1 << 5, "delivered once unmasked");
    let p = h.process();
    assert_eq!(p.irqs, 0);
}

#[test]
fn power_loss_resets_registers_and_refuses_work() {
    let d = drive(small_cfg());
    let mut h = Host::ready(&d, 1, 1, 16);
    assert_eq!(d.power_cut().lost_blocks, 0);
    assert_eq!(h.csts(), 0);
    assert_eq!(h.reg32(reg::CC), 0);
    assert_eq!(h.reg64(reg::ASQ), 0);
    h.set_reg32(reg::AQA, 0x000F_000F);
    h.set_reg32(reg::CC, CC_ENABLE);
    assert_eq!(h.csts(), 0, "no power: writes ignored");
    assert_eq!(h.reg32(reg::AQA), 0);
    d.power_on();
    h.queues.clear();
    h.enable();
    h.create_pair(1, 16);
    assert_eq!(h.read(1, 0, 1, 512).0.status(), Status::SUCCESS);
}

/// LBA formats with metadata: Identify Namespace offers 0, 8 and 64 bytes of metadata per block
/// (separate buffer), FLBAS names the configured one; a write's metadata (at MPTR) reads back
/// with its data, lives and dies with it in the write cache, and a command without a metadata
/// pointer is refused.
#[test]
fn lba_formats_with_metadata_in_a_separate_buffer() {
    let d = drive(DriveConfig {
        metadata_size: 8,
        ..DriveConfig::default()
    });
    let mut h = Host::ready(&d, 1, 1, 16);
    let (c, ns) = h.identify(cns::NAMESPACE, 1);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(ns[25], 2, "NLBAF: three formats (0's based)");
    assert_eq!(ns[26] & 0x0F, 1, "FLBAS: format 1");
    assert_eq!(ns[26] & 0x10, 0, "FLBAS: metadata in a separate buffer");
    assert_eq!(ns[27], 0b10, "MC: separate buffer only");
    for (i, ms) in [0u32, 8, 64].into_iter().enumerate() {
        let lbaf = u32_at(&ns, 128 + 4 * i);
        assert_eq!(lbaf & 0xFFFF, ms, "LBAF{i} MS");
        assert_eq!((lbaf >> 16) & 0xFF, 12, "LBAF{i} LBADS");
    }
    // Write three blocks with their metadata, read both back.
    let write = |h: &mut Host, lba: u64, seed: u8, fua: bool| {
        let data = pattern(seed, 3 * 4096);
        let md = pattern(seed.wrapping_add(100), 3 * 8);
        let b = h.buffer(3 * 4096);
        h.fill(&b, &data);
        let m = h.buffer(4096);
        h.fill(&m, &md);
        let mut sqe = h.write_sqe(lba, &b, 3, fua);
        sqe.mptr = m.prp1;
        (h.run(1, sqe), data, md)
    };
    let read = |h: &mut Host, lba: u64| {
        let b = h.buffer(3 * 4096);
        let m = h.buffer(4096);
        let mut sqe = h.read_sqe(lba, &b, 3);
        sqe.mptr = m.prp1;
        let c = h.run(1, sqe);
        (c, h.contents(&b), h.contents(&m)[..24].to_vec())
    };
    let (c, data, md) = write(&mut h, 10, 1, false);
    assert_eq!(c.status(), Status::SUCCESS);
    let (c, back, mback) = read(&mut h, 10);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!((back, mback), (data.clone(), md.clone()));
    // No metadata pointer: refused.
    let b = h.buffer(4096);
    let sqe = h.read_sqe(10, &b, 1);
    assert_eq!(h.run(1, sqe).status(), generic::INVALID_FIELD);
    // Flushed, then overwritten in the cache and the power cut: the old data and the old
    // metadata come back together.
    assert_eq!(h.flush(1).status(), Status::SUCCESS);
    let (c, _, _) = write(&mut h, 10, 2, false);
    assert_eq!(c.status(), Status::SUCCESS);
    assert!(d.power_cut().lost_blocks >= 3);
    d.power_on();
    h.queues.clear();
    h.enable();
    h.create_pair(1, 16);
    let (c, back, mback) = read(&mut h, 10);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!((back, mback), (data, md));
    // Written through (FUA): survives a power cut with its metadata.
    let (c, data, md) = write(&mut h, 20, 3, true);
    assert_eq!(c.status(), Status::SUCCESS);
    d.power_cut();
    d.power_on();
    h.queues.clear();
    h.enable();
    h.create_pair(1, 16);
    let (c, back, mback) = read(&mut h, 20);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!((back, mback), (data, md));
}
