//! Host reservations from the test process: one host's queues and the reservation commands,
//! built from the specification's field layout (NVMe Base 2.0, 7.2-7.5; 5.27 the Reservation
//! Status data structure), independently of the target's decoders.

use std::net::SocketAddr;

use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::{admin, feat, io};
use duplex_nvme::status::Status;
use duplex_nvme::tcp::Digests;

use crate::nvme_host::Host;

/// Reservation Conflict (generic status 83h).
pub const CONFLICT: u8 = 0x83;

/// A Reservation Report: generation, type, and each registrant's (host id, key, holds).
pub type Reported = (u32, u8, Vec<([u8; 16], u64, bool)>);

/// One host's I/O queue to namespace 1 through one node.
#[derive(Debug)]
pub struct Io {
    /// The admin queue.
    pub admin: Host,
    /// The I/O queue.
    pub q: Host,
}

impl Io {
    /// Connects an admin and an I/O queue to `subnqn` through `addr` as `hostnqn` with host
    /// identifier `hostid`.
    pub fn connect(addr: SocketAddr, subnqn: &str, hostnqn: &str, hostid: [u8; 16]) -> Self {
        let digests = Digests::default();
        let (mut admin, cntlid) = Host::admin_as_id(addr, digests, subnqn, hostnqn, hostid);
        let queues = Sqe {
            opcode: admin::SET_FEATURES,
            cdw10: u32::from(feat::NUM_QUEUES),
            ..Sqe::default()
        };
        assert!(admin.admin_cmd(queues, 0).0.is_success());
        let mut q = Host::dial(addr, digests);
        let c = q.connect_as(1, cntlid, subnqn, hostnqn, hostid);
        assert!(c.status().is_success(), "I/O connect: {}", c.status());
        Self { admin, q }
    }

    /// A command with host data in the capsule: its status.
    pub fn out(&mut self, opcode: u8, cdw10: u32, data: &[u8]) -> Status {
        let sqe = Sqe {
            opcode,
            nsid: 1,
            cdw10,
            ..Sqe::default()
        };
        self.q.command(sqe, Some(data), true, 0).0.status()
    }

    /// Reservation Register (0Dh): RREGA bits 2:0, CPTPL bits 31:30; data CRKEY, NRKEY.
    pub fn register(&mut self, rrega: u32, cptpl: u32, crkey: u64, nrkey: u64) -> Status {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&crkey.to_le_bytes());
        d[8..].copy_from_slice(&nrkey.to_le_bytes());
        self.out(0x0D, rrega | cptpl << 30, &d)
    }

    /// Reservation Acquire (11h): RACQA bits 2:0, RTYPE bits 15:8; data CRKEY, PRKEY.
    pub fn acquire(&mut self, racqa: u32, rtype: u32, crkey: u64, prkey: u64) -> Status {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&crkey.to_le_bytes());
        d[8..].copy_from_slice(&prkey.to_le_bytes());
        self.out(0x11, racqa | rtype << 8, &d)
    }

    /// Reservation Release (15h): RRELA bits 2:0, RTYPE bits 15:8; data CRKEY.
    pub fn release(&mut self, rrela: u32, rtype: u32, crkey: u64) -> Status {
        self.out(0x15, rrela | rtype << 8, &crkey.to_le_bytes())
    }

    /// Reservation Report (0Eh), extended data structure (EDS, cdw11 bit 0): (generation,
    /// type, [(host id, key, holds)]).
    pub fn report(&mut self) -> Reported {
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

    /// Waits until this path serves namespace 1: a read of block 0 answered with anything but
    /// a path status (an ANA group still inaccessible, or in transition, after a takeover or a
    /// restart). The bound ([`crate::PATIENCE`]) only stops a hang: `what` says which.
    pub fn wait_serving(&mut self, what: &str) {
        let hang = std::time::Instant::now() + crate::PATIENCE;
        while self.rw(io::READ, 0).sct() == 3 {
            assert!(std::time::Instant::now() < hang, "{what}");
            std::thread::yield_now();
        }
    }

    /// A one-block read or write of block `lba`: its status.
    pub fn rw(&mut self, opcode: u8, lba: u32) -> Status {
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

/// Asserts success.
pub fn ok(s: Status, what: &str) {
    assert!(s.is_success(), "{what}: {s}");
}

/// Asserts Reservation Conflict.
pub fn conflict(s: Status, what: &str) {
    assert_eq!((s.sct(), s.sc()), (0, CONFLICT), "{what}: {s}");
}
