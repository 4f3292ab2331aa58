//! Host reservations through a live fabric (real TCP, rings to the memory datapath) whose
//! reservation channel ends in an in-memory metadata service applying the model: the commands'
//! round trip, Report from the state the answers brought, conflicts on I/O, the notices of a
//! preempted host (asynchronous event, Reservation Notification log page, its mask), the
//! Reservation Persistence feature, Identify's ONCS and RESCAP at their specification offsets,
//! and an error answer completing as Command Interrupted.
//!
//! Every wait is on an event: a completion, an asynchronous event.

mod common;

use common::*;
use duplex_host::Data;
use duplex_ipc::exports::ExportsRegion;
use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::{admin, cns, io};
use duplex_tests::resv::{conflict, ok, Io};

const HOST_A: [u8; 16] = [0xA1; 16];
const HOST_B: [u8; 16] = [0xB2; 16];

const SUBNQN: &str = RESV_SUBNQN;

fn start(error_every: u64) -> (Harness, FakeMetadata, ExportsRegion) {
    Harness::with_reservations(error_every)
}

fn admin_ok(h: &mut Host, sqe: Sqe, read_len: usize) -> (Vec<u8>, u32) {
    let (s, d, dw0) = h.admin_cmd(sqe, read_len);
    assert!(s.is_success(), "admin {:#x}: {s}", sqe.opcode);
    (d, dw0)
}

#[test]
fn two_hosts_reserve_conflict_preempt_and_are_notified() {
    let (h, meta, _exports) = start(0);
    let mut a = Io::connect(h.addr, SUBNQN, HOSTNQN, HOST_A);
    let mut b = Io::connect(h.addr, SUBNQN, HOSTNQN, HOST_B);

    // Identify: ONCS bit 5 (Reservations) at bytes 521:520 of Identify Controller; RESCAP at
    // byte 31 of Identify Namespace (NVMe Base 2.0, figures 275 and 280).
    let (ctrl, _) = admin_ok(
        &mut a.admin,
        Sqe {
            opcode: admin::IDENTIFY,
            cdw10: u32::from(cns::CONTROLLER),
            ..Sqe::default()
        },
        4096,
    );
    assert_eq!(u16::from_le_bytes([ctrl[520], ctrl[521]]) & 0x20, 0x20);
    let (ns, _) = admin_ok(
        &mut a.admin,
        Sqe {
            opcode: admin::IDENTIFY,
            nsid: 1,
            cdw10: u32::from(cns::NAMESPACE),
            ..Sqe::default()
        },
        4096,
    );
    assert_eq!(ns[31], 0xFF, "RESCAP");

    ok(a.register(0, 3, 0, 0xA), "A registers, PTPL set");
    ok(b.register(0, 0, 0, 0xB), "B registers");
    ok(a.acquire(0, 1, 0xA, 0), "A acquires Write Exclusive");
    let (generation, rtype, regs) = b.report();
    assert_eq!((generation, rtype), (2, 1));
    assert_eq!(regs, vec![(HOST_A, 0xA, true), (HOST_B, 0xB, false)]);
    conflict(b.rw(io::WRITE, 3), "B writes");
    ok(b.rw(io::READ, 3), "B reads");
    ok(a.rw(io::WRITE, 3), "A writes");
    // Get Features Reservation Persistence (83h): PTPL as A set it.
    let (_, dw0) = admin_ok(
        &mut b.admin,
        Sqe {
            opcode: admin::GET_FEATURES,
            nsid: 1,
            cdw10: 0x83,
            ..Sqe::default()
        },
        0,
    );
    assert_eq!(dw0, 1, "PTPL");

    // A waits for an event; B preempts A: A is notified (registration preempted).
    let aer = a
        .admin
        .q
        .submit(
            Sqe {
                opcode: admin::ASYNC_EVENT,
                ..Sqe::default()
            },
            Data::None,
        )
        .expect("AER");
    ok(b.acquire(1, 1, 0xB, 0xA), "B preempts A");
    let event = a.admin.q.poll().expect("the event");
    assert_eq!(event.cid, aer);
    // Type 6 (I/O command specific), information 0 (Reservation Log Page Available), log 80h.
    assert_eq!(event.cqe.dw0, 6 | 0x80 << 16, "{:#x}", event.cqe.dw0);
    let log = |h: &mut Host| {
        admin_ok(
            h,
            Sqe {
                opcode: admin::GET_LOG_PAGE,
                nsid: 0xFFFF_FFFF,
                cdw10: 0x80 | (64 / 4 - 1) << 16,
                ..Sqe::default()
            },
            64,
        )
        .0
    };
    let page = log(&mut a.admin);
    assert_ne!(
        u64::from_le_bytes(page[0..8].try_into().expect("8")),
        0,
        "log page count"
    );
    assert_eq!(page[8], 1, "registration preempted");
    assert_eq!(page[9], 0, "no more pages");
    assert_eq!(
        u32::from_le_bytes(page[12..16].try_into().expect("4")),
        1,
        "nsid"
    );
    // Read again: empty.
    assert_eq!(log(&mut a.admin)[8], 0);
    conflict(a.rw(io::WRITE, 4), "A writes once preempted");
    ok(b.rw(io::WRITE, 4), "B writes as the holder");

    // Registrants-only reservations notify the other registrants when released; the
    // Reservation Notification Mask (feature 82h) of a namespace hides a type.
    ok(
        b.release(0, 1, 0xB),
        "B releases its Write Exclusive (nobody is notified)",
    );
    ok(a.register(0, 0, 0, 0xA), "A registers again");
    let mask = |h: &mut Host, bits: u32| {
        admin_ok(
            h,
            Sqe {
                opcode: admin::SET_FEATURES,
                nsid: 1,
                cdw10: 0x82,
                cdw11: bits,
                ..Sqe::default()
            },
            0,
        );
        let (_, got) = admin_ok(
            h,
            Sqe {
                opcode: admin::GET_FEATURES,
                nsid: 1,
                cdw10: 0x82,
                ..Sqe::default()
            },
            0,
        );
        assert_eq!(got, bits);
    };
    // A masks "reservation released" (type 2, bit 2): B's release of Write Exclusive -
    // Registrants Only (type 3) leaves no page for A.
    mask(&mut a.admin, 1 << 2);
    ok(b.acquire(0, 3, 0xB, 0), "B acquires WE registrants only");
    ok(b.release(0, 3, 0xB), "B releases it");
    assert_eq!(log(&mut a.admin)[8], 0, "masked");
    // Unmasked: the same release leaves A a "reservation released" page.
    mask(&mut a.admin, 0);
    ok(
        b.acquire(0, 3, 0xB, 0),
        "B acquires WE registrants only again",
    );
    ok(b.release(0, 3, 0xB), "B releases it again");
    let page = log(&mut a.admin);
    assert_eq!(
        (page[8], page[12]),
        (2, 1),
        "reservation released, namespace 1"
    );
    assert_eq!(
        log(&mut b.admin)[8],
        0,
        "the releasing host is not notified"
    );
    assert_eq!(a.report().1, 0, "no reservation");
    // Every change went to the metadata service; nothing else did.
    assert_eq!(meta.answered.load(std::sync::atomic::Ordering::Relaxed), 10);
}

#[test]
fn an_error_answer_completes_as_command_interrupted_and_changes_nothing() {
    // Every second request is answered with an error.
    let (h, _meta, _exports) = start(2);
    let mut a = Io::connect(h.addr, SUBNQN, HOSTNQN, HOST_A);
    ok(a.register(0, 0, 0, 0xA), "the first register");
    let s = a.register(2, 0, 0xA, 0xC);
    assert_eq!((s.sct(), s.sc(), s.is_dnr()), (0, 0x21, false), "{s}");
    let (_, _, regs) = a.report();
    assert_eq!(
        regs,
        vec![(HOST_A, 0xA, false)],
        "the interrupted replace did not happen"
    );
}
