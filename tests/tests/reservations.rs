//! Host reservations through a two-controller array (issue 17), as whole processes: two hosts
//! (two host identifiers) register with the namespace the pair exports; one holds Write
//! Exclusive; the other's writes meet Reservation Conflict and its reads succeed. The holder's
//! controller is killed whole: the peer takes the pool over, and through it the reservation
//! still holds (Report shows the same holder and generation, the state came off the drives);
//! the second host preempts and aborts the first, and from then on it is the first host's
//! writes that conflict.

use duplex_nvme::spec::io;
use duplex_tests::pair::{Pair, HOSTNQN, SUBNQN};
use duplex_tests::resv::{conflict, ok, Io as Q};

const HOST_A: [u8; 16] = [0xA1; 16];
const HOST_B: [u8; 16] = [0xB2; 16];
const KEY_A: u64 = 0xAAAA_0000_0000_0001;
const KEY_B: u64 = 0xBBBB_0000_0000_0002;

struct Io;

impl Io {
    fn connect(addr: std::net::SocketAddr, hostid: [u8; 16]) -> Q {
        Q::connect(addr, SUBNQN, HOSTNQN, hostid)
    }
}

#[test]
fn a_reservation_holds_through_a_takeover_and_the_peer_honours_preempt_and_abort() {
    let mut p = Pair::on_loopback(50, 600);
    p.wait_status(1, |v| v["disk"]["peer_counter"].as_u64().unwrap_or(0) > 0);
    let owner = p.at.nvme[0];

    let mut a = Io::connect(owner, HOST_A);
    let mut b = Io::connect(owner, HOST_B);
    ok(a.register(0, 3, 0, KEY_A), "A registers (PTPL set)");
    ok(b.register(0, 0, 0, KEY_B), "B registers");
    // A registering again with another key: Reservation Conflict (the spec's answer).
    conflict(a.register(0, 0, 0, KEY_B), "A registers a second key");
    ok(a.acquire(0, 1, KEY_A, 0), "A acquires Write Exclusive");
    let (generation, rtype, regs) = a.report();
    assert_eq!(rtype, 1);
    assert_eq!(generation, 2, "two registrations bump the generation");
    assert!(regs.contains(&(HOST_A, KEY_A, true)), "{regs:x?}");
    assert!(regs.contains(&(HOST_B, KEY_B, false)), "{regs:x?}");
    // B may read, not write; A may do both.
    conflict(b.rw(io::WRITE, 7), "B writes under A's Write Exclusive");
    ok(b.rw(io::READ, 7), "B reads under A's Write Exclusive");
    ok(a.rw(io::WRITE, 7), "A writes");
    // B cannot take it with a wrong key.
    conflict(b.acquire(0, 1, KEY_A, 0), "B acquires with A's key");

    // The fabric crashes: its successor has the state from the export table.
    drop(a);
    drop(b);
    let (code, out, err) = p.nodes[0].ctl(&["service", "crash", "fabric", "--mode", "kill"]);
    assert_eq!(code, 0, "{out}{err}");
    p.node(0).wait_running("fabric", 1);
    let mut b = Io::connect(owner, HOST_B);
    assert_eq!(
        b.report(),
        (generation, rtype, regs.clone()),
        "after a fabric crash"
    );
    conflict(b.rw(io::WRITE, 7), "B writes after a fabric crash");
    drop(b);

    // The holder's controller dies whole; the peer takes the pool over.
    p.node(0).kill_all();
    p.node(1).log.wait_for(&["pool taken over", "tank"]);
    p.node(1).wait_exported(SUBNQN);
    let peer = p.at.nvme[1];
    let mut a = Io::connect(peer, HOST_A);
    let mut b = Io::connect(peer, HOST_B);
    // Wait for the peer's path to serve (its ANA group optimized after the takeover).
    a.wait_serving("the peer's path never served");
    let after = b.report();
    assert_eq!(
        after,
        (generation, rtype, regs),
        "the reservation as the peer reports it"
    );
    conflict(
        b.rw(io::WRITE, 7),
        "B writes under A's reservation, through the peer",
    );
    ok(b.rw(io::READ, 7), "B reads through the peer");

    // B preempts A and aborts its commands: B holds, A is no registrant.
    ok(b.acquire(2, 1, KEY_B, KEY_A), "B preempts and aborts A");
    let (g2, t2, regs2) = b.report();
    assert_eq!(t2, 1);
    assert!(g2 > generation, "preempt bumps the generation");
    assert_eq!(regs2, vec![(HOST_B, KEY_B, true)], "{regs2:x?}");
    conflict(a.rw(io::WRITE, 9), "A writes after being preempted");
    ok(b.rw(io::WRITE, 9), "B writes as the holder");

    // The whole array loses power and comes back: A set Persist Through Power Loss, so the
    // registration and the reservation are still there.
    drop(a);
    drop(b);
    p.node(1).kill_all();
    p.node(1).relaunch();
    p.node(1).wait_exported(SUBNQN);
    let mut b = Io::connect(peer, HOST_B);
    b.wait_serving("the restarted node never served");
    assert_eq!(b.report(), (g2, t2, regs2), "after a power cycle (PTPL)");
    let mut a = Io::connect(peer, HOST_A);
    conflict(a.rw(io::WRITE, 9), "A writes after the power cycle");
}

#[test]
fn a_power_cycle_clears_a_reservation_without_persist_through_power_loss_and_a_service_restart_does_not(
) {
    let mut p = Pair::on_loopback(50, 600);
    p.wait_status(1, |v| v["disk"]["peer_counter"].as_u64().unwrap_or(0) > 0);
    let owner = p.at.nvme[0];
    let mut a = Io::connect(owner, HOST_A);
    ok(a.register(0, 0, 0, KEY_A), "A registers (PTPL not set)");
    ok(a.acquire(0, 2, KEY_A, 0), "A acquires Exclusive Access");
    let held = a.report();
    assert_eq!((held.1, held.2.len()), (2, 1), "{held:x?}");
    drop(a);
    // The metadata service restarts within the boot: nothing is lost.
    let (code, out, err) = p.nodes[0].ctl(&["service", "crash", "metadata", "--mode", "kill"]);
    assert_eq!(code, 0, "{out}{err}");
    p.node(0).wait_running("metadata", 1);
    p.node(0)
        .log
        .wait_for(&["metadata service ready", "restart=true"]);
    let mut b = Io::connect(owner, HOST_B);
    conflict(b.rw(io::READ, 1), "B reads under A's Exclusive Access");
    assert_eq!(b.report(), held, "after a metadata service restart");
    drop(b);
    // Both nodes lose power; the owner comes back first.
    p.node(1).kill_all();
    p.node(0).kill_all();
    p.node(0).relaunch();
    p.node(0).log.wait_for(&[
        "power on: reservation state without Persist Through Power Loss cleared",
        "tank",
    ]);
    p.node(0).wait_exported(SUBNQN);
    let mut b = Io::connect(owner, HOST_B);
    b.wait_serving("the restarted node never served");
    let (generation, rtype, regs) = b.report();
    assert_eq!(
        (rtype, regs.len()),
        (0, 0),
        "after a power cycle without PTPL"
    );
    assert!(generation >= held.0, "the generation does not go back");
    ok(b.rw(io::WRITE, 1), "B writes once the reservation is gone");
}
