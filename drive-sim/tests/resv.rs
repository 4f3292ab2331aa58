//! NVMe reservations across the two ports of one drive: each port is a controller with its
//! own host identifier.

mod common;

use common::*;
use duplex_drive_sim::{Fault, FaultOp};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::resv::{opc, AcquireAction, ReleaseAction, ResvType, RESCAP};
use duplex_nvme::spec::{admin, feat, io};
use duplex_nvme::status::{generic, Status};

const BS: u32 = 512;
const KA: u64 = 0xAAAA_0001;
const KB: u64 = 0xBBBB_0002;
const HOST_A: u64 = 0xA;
const HOST_B: u64 = 0xB;

/// Two hosts, one per port, each with one I/O queue pair and its host identifier set.
fn two_ports() -> (std::sync::Arc<duplex_drive_sim::Drive>, Host, Host) {
    let d = drive(small_cfg());
    let mut a = Host::ready(&d, 1, 1, 32);
    let mut b = Host::ready(&d, 2, 1, 32);
    assert_eq!(a.set_host_id(HOST_A).status(), Status::SUCCESS);
    assert_eq!(b.set_host_id(HOST_B).status(), Status::SUCCESS);
    (d, a, b)
}

fn aer(h: &mut Host) -> u16 {
    h.submit(
        0,
        Sqe {
            opcode: admin::ASYNC_EVENT,
            ..Sqe::default()
        },
    )
}

#[test]
fn reservation_commands_need_a_host_identifier() {
    let d = drive(small_cfg());
    let mut a = Host::ready(&d, 1, 1, 32);
    let (_, ns) = a.identify(duplex_nvme::spec::cns::NAMESPACE, 1);
    assert_eq!(ns[31], RESCAP);
    assert_eq!(a.register(1, KA).status(), generic::SEQUENCE);
    let (c, rep) = a.report(1, 24, false);
    assert_eq!(c.status(), Status::SUCCESS, "report needs no host id");
    assert_eq!(u16_at(&rep, 5), 0);
    assert_eq!(a.set_host_id(HOST_A).status(), Status::SUCCESS);
    assert_eq!(a.register(1, KA).status(), Status::SUCCESS);
    // The identifier of a registrant cannot change (re-setting the same one is fine).
    assert_eq!(a.set_host_id(HOST_B).status(), generic::SEQUENCE);
    assert_eq!(a.set_host_id(HOST_A).status(), Status::SUCCESS);
    // Bad data length/fields come from the model.
    let bad = a.resv_cmd(1, opc::REGISTER, 7, &[0; 16]);
    assert_eq!(bad.status(), generic::INVALID_FIELD);
    // A controller reset forgets the host id; the registration stays with the namespace.
    a.disable();
    a.enable();
    a.create_pair(1, 32);
    assert_eq!(a.register(1, KA).status(), generic::SEQUENCE);
    assert_eq!(d.reservations().registrants().len(), 1);
    // Power loss clears registrations (no Persist Through Power Loss).
    d.power_cut();
    d.power_on();
    assert!(d.reservations().registrants().is_empty());
}

#[test]
fn reservation_matrix_across_two_ports() {
    let (d, mut a, mut b) = two_ports();
    let data = pattern(1, 512);
    assert_eq!(a.write(1, 0, &data, BS, false).status(), Status::SUCCESS);
    assert_eq!(a.register(1, KA).status(), Status::SUCCESS);
    assert_eq!(b.register(1, KB).status(), Status::SUCCESS);

    // A holds Write Exclusive: B reads, but neither writes nor flushes.
    let c = a.acquire(1, AcquireAction::Acquire, ResvType::WriteExclusive, KA, 0);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(
        b.write(1, 0, &pattern(2, 512), BS, false).status(),
        generic::RESERVATION_CONFLICT
    );
    assert_eq!(b.flush(1).status(), generic::RESERVATION_CONFLICT);
    let (c, got) = b.read(1, 0, 1, BS);
    assert_eq!((c.status(), got), (Status::SUCCESS, data.clone()));
    assert_eq!(a.write(1, 1, &data, BS, false).status(), Status::SUCCESS);
    // B cannot acquire a held reservation.
    let c = b.acquire(1, AcquireAction::Acquire, ResvType::WriteExclusive, KB, 0);
    assert_eq!(c.status(), generic::RESERVATION_CONFLICT);

    // Report from B shows both, A holding.
    let (c, rep) = b.report(1, 4096, false);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(u32_at(&rep, 0), 2, "generation: two registrations");
    assert_eq!(rep[4], ResvType::WriteExclusive as u8);
    assert_eq!(u16_at(&rep, 5), 2);
    assert_eq!(
        (
            u16_at(&rep, 24),
            rep[26],
            u64_at(&rep, 32),
            u64_at(&rep, 40)
        ),
        (1, 1, HOST_A, KA)
    );
    assert_eq!(
        (
            u16_at(&rep, 48),
            rep[50],
            u64_at(&rep, 56),
            u64_at(&rep, 64)
        ),
        (2, 0, HOST_B, KB)
    );

    // Exclusive Access (changing the type by preempting itself): B cannot read either.
    let c = a.acquire(1, AcquireAction::Preempt, ResvType::ExclusiveAccess, KA, KA);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(
        b.read(1, 0, 1, BS).0.status(),
        generic::RESERVATION_CONFLICT
    );

    // B preempts A: B holds Write Exclusive, A is no longer registered.
    let b_aer = aer(&mut b);
    let a_aer = aer(&mut a);
    let seq = d.port_writes().0;
    assert!(
        d.preempts().is_empty(),
        "a preempt of itself removes no one"
    );
    let c = b.acquire(1, AcquireAction::Preempt, ResvType::WriteExclusive, KB, KA);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(
        d.preempts(),
        vec![duplex_drive_sim::PreemptRecord {
            by_cntlid: 2,
            victims: vec![1],
            write_seq: seq,
            seq: 1,
        }],
        "the preempt is recorded with the write sequence then"
    );
    assert_eq!(
        a.write(1, 0, &data, BS, false).status(),
        generic::RESERVATION_CONFLICT
    );
    assert_eq!(d.port_writes().0, seq, "a refused write is not counted");
    assert_eq!(a.read(1, 0, 1, BS).0.status(), Status::SUCCESS);
    // A was told: an AER (I/O command specific, reservation log) and the log page.
    a.process();
    let ev = a.reap(0);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].cid, a_aer);
    assert_eq!(ev[0].dw0, 6 | (0x80 << 16));
    let (c, page) = a.log_page(0x80, 64, 0, false);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(u64_at(&page, 0), 1, "log page count");
    assert_eq!(page[8], 1, "registration preempted");
    assert_eq!(u32_at(&page, 12), 1, "NSID");
    let (_, empty) = a.log_page(0x80, 64, 0, false);
    assert!(empty.iter().all(|&x| x == 0), "consumed");
    // B was told earlier, when A changed the type (Reservation Released); not about its own
    // preempt.
    b.process();
    let ev = b.reap(0);
    assert_eq!((ev.len(), ev[0].cid), (1, b_aer));
    let (_, page) = b.log_page(0x80, 64, 0, false);
    assert_eq!(page[8], 2, "reservation released");
    assert_eq!(page[9], 0, "no more pages");
    let (_, page) = b.log_page(0x80, 64, 0, false);
    assert!(
        page.iter().all(|&x| x == 0),
        "the issuer is not notified of its own preempt"
    );

    // Preempt and Abort: A re-registers and preempts B while B has a stalled write. The write
    // completes with Command Aborted due to Preempt and Abort and is never applied.
    assert_eq!(a.register(1, KA).status(), Status::SUCCESS);
    let stall = d.inject(Fault::Stall { op: FaultOp::Write });
    let victim = pattern(3, 512);
    let vb = b.buffer(512);
    b.fill(&vb, &victim);
    let w = b.write_sqe(7, &vb, 1, false);
    let vcid = b.submit(1, w);
    b.process();
    assert!(b.reap(1).is_empty(), "stalled");
    let c = a.acquire(
        1,
        AcquireAction::PreemptAbort,
        ResvType::WriteExclusive,
        KA,
        KB,
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let r = d.reservations();
    assert_eq!(
        r.holder(),
        Some(duplex_nvme::resv::HostId::from_u64(HOST_A))
    );
    assert_eq!(r.registrants().len(), 1);
    b.process();
    let io = b.reap(1);
    assert_eq!(io.len(), 1);
    assert_eq!(
        (io[0].cid, io[0].status()),
        (vcid, generic::ABORTED_PREEMPT)
    );
    assert!(d.clear_fault(stall));
    b.process();
    a.process();
    assert!(b.reap(1).is_empty());
    assert_eq!(a.read(1, 7, 1, BS).1, vec![0; 512], "never applied");
    // B got its notice.
    let (_, page) = b.log_page(0x80, 64, 0, false);
    assert_eq!(page[8], 1);

    // Release: nobody holds it, both register again, everyone writes.
    let c = a.release(
        1,
        ReleaseAction::Release,
        ResvType::WriteExclusive as u8,
        KA,
    );
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(b.register(1, KB).status(), Status::SUCCESS);
    assert_eq!(b.write(1, 7, &victim, BS, false).status(), Status::SUCCESS);
    let (c, rep) = a.report(1, 4096, true);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(rep[4], 0, "no reservation");
    assert_eq!(u16_at(&rep, 5), 2);
    assert_eq!((u16_at(&rep, 64), u64_at(&rep, 72)), (1, KA));
    assert_eq!((u16_at(&rep, 128), u64_at(&rep, 136)), (2, KB));
    assert_eq!(&rep[80..88], &HOST_A.to_le_bytes());
    assert_eq!(&rep[144..152], &HOST_B.to_le_bytes());

    // Clear from B removes everything.
    let c = b.release(1, ReleaseAction::Clear, 0, KB);
    assert_eq!(c.status(), Status::SUCCESS);
    assert!(d.reservations().registrants().is_empty());
}

#[test]
fn preempt_and_abort_of_the_issuer_completes_its_aborted_commands_first() {
    // Both hosts registered with the same key and no reservation: A's Preempt and Abort with
    // that key unregisters both, A included, and aborts A's own stalled write too.
    let (d, mut a, mut b) = two_ports();
    assert_eq!(a.register(1, KA).status(), Status::SUCCESS);
    assert_eq!(b.register(1, KA).status(), Status::SUCCESS);
    d.inject(Fault::Stall { op: FaultOp::Write });
    let data = pattern(4, 512);
    let wb = a.buffer(512);
    a.fill(&wb, &data);
    let w = a.write_sqe(9, &wb, 1, false);
    let wcid = a.submit(1, w);
    a.process();
    let acq = resv_acquire_sqe(&mut a, AcquireAction::PreemptAbort, KA, KA);
    let acid = a.submit(1, acq);
    a.process();
    let c = a.reap(1);
    assert_eq!(c.len(), 2);
    assert_eq!((c[0].cid, c[0].status()), (wcid, generic::ABORTED_PREEMPT));
    assert_eq!((c[1].cid, c[1].status()), (acid, Status::SUCCESS));
    assert!(d.reservations().registrants().is_empty());
    d.clear_faults();
    a.process();
    b.process();
    assert_eq!(d.read_medium(9, 1).expect("medium"), vec![0; 512]);
}

fn resv_acquire_sqe(h: &mut Host, action: AcquireAction, crkey: u64, prkey: u64) -> Sqe {
    let acq = duplex_nvme::resv::Acquire {
        action,
        rtype: ResvType::WriteExclusive,
        crkey,
        prkey,
    };
    let b = h.buffer(16);
    h.fill(&b, &acq.data());
    with_prps(
        Sqe {
            opcode: opc::ACQUIRE,
            nsid: 1,
            cdw10: acq.cdw10(),
            ..Sqe::default()
        },
        &b,
    )
}

#[test]
fn notification_mask_and_exclusive_access_registrants_only() {
    let (d, mut a, mut b) = two_ports();
    assert_eq!(a.register(1, KA).status(), Status::SUCCESS);
    assert_eq!(b.register(1, KB).status(), Status::SUCCESS);
    // B masks Registration Preempted notices.
    assert_eq!(
        b.set_feature(duplex_nvme::resv::FEAT_RESV_NOTIFICATION_MASK, 1 << 1)
            .status(),
        Status::SUCCESS
    );
    assert_eq!(
        b.get_feature(duplex_nvme::resv::FEAT_RESV_NOTIFICATION_MASK, 0)
            .dw0,
        1 << 1
    );
    let c = a.acquire(
        1,
        AcquireAction::Acquire,
        ResvType::ExclusiveAccessRegistrantsOnly,
        KA,
        0,
    );
    assert_eq!(c.status(), Status::SUCCESS);
    // Registrants read and write; a third, unregistered port cannot.
    let mut c3 = Host::ready(&d, 3, 1, 32);
    assert_eq!(c3.set_host_id(0xC).status(), Status::SUCCESS);
    assert_eq!(
        b.write(1, 0, &pattern(1, 512), BS, false).status(),
        Status::SUCCESS
    );
    assert_eq!(
        c3.read(1, 0, 1, BS).0.status(),
        generic::RESERVATION_CONFLICT
    );
    let wz = Sqe {
        opcode: io::WRITE_ZEROES,
        nsid: 1,
        ..Sqe::default()
    };
    assert_eq!(c3.run(1, wz).status(), generic::RESERVATION_CONFLICT);
    // A preempts B: B's notice is masked, so its log stays empty.
    let c = a.acquire(
        1,
        AcquireAction::Preempt,
        ResvType::ExclusiveAccessRegistrantsOnly,
        KA,
        KB,
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let (_, page) = b.log_page(0x80, 64, 0, false);
    assert!(page.iter().all(|&x| x == 0));
    // Reservation Persistence: readable, changeable only via Register's CPTPL.
    assert_eq!(
        a.get_feature(duplex_nvme::resv::FEAT_RESV_PERSISTENCE, 0)
            .dw0,
        0
    );
    assert_eq!(
        a.set_feature(duplex_nvme::resv::FEAT_RESV_PERSISTENCE, 1)
            .status()
            .sc(),
        0x0E
    );
    assert_eq!(
        a.set_feature(duplex_nvme::resv::FEAT_RESV_PERSISTENCE, 0)
            .status(),
        Status::SUCCESS
    );
    let _ = feat::HOST_ID;
}

#[test]
fn same_host_on_both_ports_shares_registrations() {
    // One host reaching the drive through both ports sets the same identifier on each: it is
    // one registrant, and a Preempt and Abort against it aborts commands on both ports.
    let d = drive(small_cfg());
    let mut p1 = Host::ready(&d, 1, 1, 32);
    let mut p2 = Host::ready(&d, 2, 1, 32);
    let mut other = Host::ready(&d, 3, 1, 32);
    for h in [&mut p1, &mut p2] {
        assert_eq!(h.set_host_id(0x5A).status(), Status::SUCCESS);
    }
    assert_eq!(other.set_host_id(0x77).status(), Status::SUCCESS);
    assert_eq!(p1.register(1, KA).status(), Status::SUCCESS);
    assert_eq!(
        p2.register(1, KA).status(),
        Status::SUCCESS,
        "same key: no change"
    );
    assert_eq!(p2.register(1, KB).status(), generic::RESERVATION_CONFLICT);
    assert_eq!(other.register(1, KB).status(), Status::SUCCESS);
    assert_eq!(d.reservations().registrants().len(), 2);
    d.inject(Fault::Stall { op: FaultOp::Read });
    let b1 = p1.buffer(512);
    let r1 = p1.read_sqe(0, &b1, 1);
    let c1 = p1.submit(1, r1);
    let b2 = p2.buffer(512);
    let r2 = p2.read_sqe(0, &b2, 1);
    let c2 = p2.submit(1, r2);
    p1.process();
    p2.process();
    let c = other.acquire(
        1,
        AcquireAction::PreemptAbort,
        ResvType::ExclusiveAccess,
        KB,
        KA,
    );
    assert_eq!(c.status(), Status::SUCCESS);
    p1.process();
    p2.process();
    let (x, y) = (p1.reap(1), p2.reap(1));
    assert_eq!((x[0].cid, x[0].status()), (c1, generic::ABORTED_PREEMPT));
    assert_eq!((y[0].cid, y[0].status()), (c2, generic::ABORTED_PREEMPT));
    // Both ports got the notice.
    for h in [&mut p1, &mut p2] {
        let (_, page) = h.log_page(0x80, 64, 0, false);
        assert_eq!(page[8], 1);
    }
}
