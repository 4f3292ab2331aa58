//! Host reservations through a two-controller array (issue 17), as whole processes: two hosts
//! (two host identifiers) register with the namespace the pair exports; one holds Write
//! Exclusive; the other's writes meet Reservation Conflict and its reads succeed. The holder's
//! controller is killed whole: the peer takes the pool over, and through it the reservation
//! still holds (Report shows the same holder and generation, the state came off the drives);
//! the second host preempts and aborts the first, and from then on it is the first host's
//! writes that conflict.
//!
//! Commands are built here from the specification's field layout (NVMe Base 2.0, 7.2-7.5,
//! 5.27: Reservation Status data structure), independently of the target's decoders.

use std::net::SocketAddr;

use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::{admin, feat, io};
use duplex_nvme::status::Status;
use duplex_nvme::tcp::Digests;
use duplex_tests::nvme_host::Host;
use duplex_tests::pair::{Pair, HOSTNQN, SUBNQN};

const HOST_A: [u8; 16] = [0xA1; 16];
const HOST_B: [u8; 16] = [0xB2; 16];
const KEY_A: u64 = 0xAAAA_0000_0000_0001;
const KEY_B: u64 = 0xBBBB_0000_0000_0002;
/// Reservation Conflict (generic status 83h).
const CONFLICT: u8 = 0x83;

/// A Reservation Report: generation, type, and each registrant's (host id, key, holds).
type Reported = (u32, u8, Vec<([u8; 16], u64, bool)>);

/// One host's I/O queue to namespace 1 through one node.
struct Io {
    _admin: Host,
    q: Host,
}

impl Io {
    fn connect(addr: SocketAddr, hostid: [u8; 16]) -> Self {
        let digests = Digests::default();
        let (mut admin, cntlid) = Host::admin_as_id(addr, digests, SUBNQN, HOSTNQN, hostid);
        let queues = Sqe {
            opcode: admin::SET_FEATURES,
            cdw10: u32::from(feat::NUM_QUEUES),
            ..Sqe::default()
        };
        assert!(admin.admin_cmd(queues, 0).0.is_success());
        let mut q = Host::dial(addr, digests);
        let c = q.connect_as(1, cntlid, SUBNQN, HOSTNQN, hostid);
        assert!(c.status().is_success(), "I/O connect: {}", c.status());
        Self { _admin: admin, q }
    }

    fn out(&mut self, opcode: u8, cdw10: u32, data: &[u8]) -> Status {
        let sqe = Sqe {
            opcode,
            nsid: 1,
            cdw10,
            ..Sqe::default()
        };
        self.q.command(sqe, Some(data), true, 0).0.status()
    }

    /// Reservation Register (0Dh): RREGA bits 2:0, CPTPL bits 31:30; data CRKEY, NRKEY.
    fn register(&mut self, rrega: u32, cptpl: u32, crkey: u64, nrkey: u64) -> Status {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&crkey.to_le_bytes());
        d[8..].copy_from_slice(&nrkey.to_le_bytes());
        self.out(0x0D, rrega | cptpl << 30, &d)
    }

    /// Reservation Acquire (11h): RACQA bits 2:0, RTYPE bits 15:8; data CRKEY, PRKEY.
    fn acquire(&mut self, racqa: u32, rtype: u32, crkey: u64, prkey: u64) -> Status {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&crkey.to_le_bytes());
        d[8..].copy_from_slice(&prkey.to_le_bytes());
        self.out(0x11, racqa | rtype << 8, &d)
    }

    /// Reservation Release (15h): RRELA bits 2:0, RTYPE bits 15:8; data CRKEY.
    #[allow(dead_code)]
    fn release(&mut self, rrela: u32, rtype: u32, crkey: u64) -> Status {
        self.out(0x15, rrela | rtype << 8, &crkey.to_le_bytes())
    }

    /// Reservation Report (0Eh), extended data structure (EDS, cdw11 bit 0): (generation,
    /// type, [(host id, key, holds)]).
    fn report(&mut self) -> Reported {
        let len = 64 + 64 * 8;
        let sqe = Sqe {
            opcode: 0x0E,
            nsid: 1,
            cdw10: (len / 4 - 1) as u32,
            cdw11: 1,
            ..Sqe::default()
        };
        let (c, d) = self.q.command(sqe, None, false, len);
        assert!(c.status().is_success(), "report: {}", c.status());
        assert_eq!(d.len(), len);
        let generation = u32::from_le_bytes(d[0..4].try_into().unwrap_or_default());
        let rtype = d[4];
        let regctl = u16::from_le_bytes([d[5], d[6]]) as usize;
        let entries = (0..regctl)
            .map(|i| {
                let e = &d[64 + 64 * i..128 + 64 * i];
                let key = u64::from_le_bytes(e[8..16].try_into().unwrap_or_default());
                let mut host = [0u8; 16];
                host.copy_from_slice(&e[16..32]);
                (host, key, e[2] & 1 != 0)
            })
            .collect();
        (generation, rtype, entries)
    }

    fn rw(&mut self, opcode: u8, lba: u32) -> Status {
        let sqe = Sqe {
            opcode,
            nsid: 1,
            cdw10: lba,
            ..Sqe::default()
        };
        if opcode == io::WRITE {
            self.q.command(sqe, Some(&[0x5A; 4096]), true, 0).0.status()
        } else {
            self.q.command(sqe, None, false, 4096).0.status()
        }
    }
}

fn ok(s: Status, what: &str) {
    assert!(s.is_success(), "{what}: {s}");
}

fn conflict(s: Status, what: &str) {
    assert_eq!((s.sct(), s.sc()), (0, CONFLICT), "{what}: {s}");
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
    // Wait for the peer's path to serve (its ANA group optimized after the takeover); the
    // bound only stops a hang.
    let hang = std::time::Instant::now() + duplex_tests::PATIENCE;
    while a.rw(io::READ, 0).sct() == 3 {
        assert!(
            std::time::Instant::now() < hang,
            "the peer's path never served"
        );
        std::thread::yield_now();
    }
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
    let hang = std::time::Instant::now() + duplex_tests::PATIENCE;
    while b.rw(io::READ, 0).sct() == 3 {
        assert!(
            std::time::Instant::now() < hang,
            "the restarted node never served"
        );
        std::thread::yield_now();
    }
    assert_eq!(b.report(), (g2, t2, regs2), "after a power cycle (PTPL)");
    let mut a = Io::connect(peer, HOST_A);
    conflict(a.rw(io::WRITE, 9), "A writes after the power cycle");
}
