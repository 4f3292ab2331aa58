//! The export table at run time, against a live fabric (real TCP, rings and pool to the memory
//! datapath): namespaces added and removed while hosts are connected (the Namespace Attribute
//! Changed notice, the Changed Namespace List, Identify, I/O), the notice's enable bit and
//! masking, hosts denied and subsystems removed (disconnected, then refused), the discovery
//! log change notice, a fresh or restarted fabric serving the published table, and OAES at its
//! specification offset in the raw Identify Controller data.
//!
//! Every wait is on an event: an asynchronous event completing, a socket closing, a response.

mod common;

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;

use common::*;
use duplex_host::{Completion, Data};
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::exports::{
    AnaGroupState, AnaState, ExportNamespace, ExportRegistrant, ExportReservation, ExportSubsystem,
    ExportTable, ExportsRegion,
};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::{admin, aen, cns, feat, io, lid, DISCOVERY_NQN};
use duplex_nvme::status::{generic, path, specific, Status};
use duplex_nvme::tcp::Digests;

const NONE: Digests = Digests {
    header: false,
    data: false,
};
/// The exported subsystem.
const EXPNQN: &str = "nqn.2026-12.io.duplex:exported";
/// A second host, allowed and then denied.
const OTHER: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000002";

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Namespace `nsid` on volume `volume`, `blocks` blocks of 4 KiB, identifiers from `nsid`.
fn ns(nsid: u32, volume: u32, blocks: u64) -> ExportNamespace {
    ExportNamespace {
        nsid,
        volume,
        block_size: BS,
        blocks,
        nguid: [0x40 + nsid as u8; 16],
        uuid: [0x80 + nsid as u8; 16],
        ana_group: 1,
    }
}

fn table(generation: u64, hosts: &[&str], namespaces: Vec<ExportNamespace>) -> ExportTable {
    ExportTable {
        generation,
        subsystems: vec![ExportSubsystem {
            nqn: EXPNQN.into(),
            serial: "exp1".into(),
            model: "duplex exported".into(),
            allow_any_host: false,
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            secrets: vec![],
            namespaces,
        }],
        ana: vec![AnaGroupState {
            group: 1,
            state: AnaState::Optimized,
        }],
        reservations: vec![],
    }
}

/// [`table`] with group 1 (every namespace's) in `state`.
fn table_in(generation: u64, namespaces: Vec<ExportNamespace>, state: AnaState) -> ExportTable {
    let mut t = table(generation, &[HOSTNQN], namespaces);
    t.ana[0].state = state;
    t
}

/// The metadata service's end: the region it publishes in and the bell it rings.
struct Writer {
    region: ExportsRegion,
    bell: Doorbell,
}

impl Writer {
    fn new() -> Self {
        Self {
            region: ExportsRegion::create(1 << 20).expect("exports region"),
            bell: Doorbell::new().expect("bell"),
        }
    }

    fn publish(&self, t: &ExportTable) {
        self.region.publish(t).expect("publish");
        self.bell.ring();
    }

    /// A fabric reading this region, woken by this bell.
    fn fabric(&self) -> Harness {
        Harness::start_with(Some((
            self.region.region().try_clone_fd().expect("fd"),
            Some(self.bell.try_clone().expect("bell")),
        )))
    }
}

/// An admin queue that keeps Asynchronous Event Requests outstanding while other commands run.
struct Admin {
    h: Host,
    cntlid: u16,
    aers: HashSet<u16>,
    events: VecDeque<u32>,
}

impl Admin {
    fn connect(addr: SocketAddr, subnqn: &str, hostnqn: &str) -> Self {
        let (h, cntlid) = Host::admin_as(addr, NONE, subnqn, hostnqn);
        Self {
            h,
            cntlid,
            aers: HashSet::new(),
            events: VecDeque::new(),
        }
    }

    /// Runs `sqe` (reading `read_len` bytes) to its completion; event completions arriving
    /// meanwhile are kept.
    fn exec(&mut self, sqe: Sqe, read_len: usize) -> Completion {
        let data = if read_len > 0 {
            Data::In(read_len)
        } else {
            Data::None
        };
        let cid = self.h.q.submit(sqe, data).expect("submit");
        loop {
            let c = self.h.q.poll().expect("a completion");
            if c.cid == cid {
                return c;
            }
            self.note_event(c);
        }
    }

    fn note_event(&mut self, c: Completion) {
        assert!(self.aers.remove(&c.cid), "a completion for no command");
        assert!(
            c.status().is_success(),
            "event request failed: {}",
            c.status()
        );
        self.events.push_back(c.cqe.dw0);
    }

    fn ok(&mut self, sqe: Sqe, read_len: usize) -> Vec<u8> {
        let c = self.exec(sqe, read_len);
        assert!(
            c.status().is_success(),
            "admin {:#x}: {}",
            sqe.opcode,
            c.status()
        );
        c.data
    }

    fn set_aec(&mut self, bits: u32) {
        self.ok(
            Sqe {
                opcode: admin::SET_FEATURES,
                cdw10: u32::from(feat::ASYNC_EVENT),
                cdw11: bits,
                ..Sqe::default()
            },
            0,
        );
    }

    /// Sends an Asynchronous Event Request and leaves it outstanding.
    fn request_event(&mut self) {
        let sqe = Sqe {
            opcode: admin::ASYNC_EVENT,
            ..Sqe::default()
        };
        let cid = self.h.q.submit(sqe, Data::None).expect("submit");
        self.h.q.flush().expect("flush");
        self.aers.insert(cid);
    }

    /// Waits for the next asynchronous event (completion dword 0).
    fn next_event(&mut self) -> u32 {
        while self.events.is_empty() {
            let c = self.h.q.poll().expect("an event");
            self.note_event(c);
        }
        self.events.pop_front().unwrap_or_default()
    }

    /// A round trip (Keep Alive): whatever the fabric queued before it has arrived after it.
    fn sync(&mut self) {
        self.ok(
            Sqe {
                opcode: admin::KEEP_ALIVE,
                ..Sqe::default()
            },
            0,
        );
    }

    /// The Changed Namespace List (RAE as given), its non-zero entries.
    fn changed_ns(&mut self, rae: bool) -> Vec<u32> {
        let numd = 4096 / 4 - 1;
        let page = self.ok(
            Sqe {
                opcode: admin::GET_LOG_PAGE,
                nsid: 0xFFFF_FFFF,
                cdw10: u32::from(lid::CHANGED_NS) | u32::from(rae) << 15 | numd << 16,
                ..Sqe::default()
            },
            4096,
        );
        (0..1024)
            .map(|i| u32_at(&page, i * 4))
            .take_while(|&id| id != 0)
            .collect()
    }

    fn identify(&mut self, cns: u8, nsid: u32) -> (Status, Vec<u8>) {
        let c = self.exec(
            Sqe {
                opcode: admin::IDENTIFY,
                nsid,
                cdw10: u32::from(cns),
                ..Sqe::default()
            },
            4096,
        );
        (c.status(), c.data)
    }

    fn active_namespaces(&mut self) -> Vec<u32> {
        let (s, list) = self.identify(cns::ACTIVE_NS_LIST, 0);
        assert!(s.is_success());
        (0..1024)
            .map(|i| u32_at(&list, i * 4))
            .take_while(|&id| id != 0)
            .collect()
    }

    /// An I/O queue of this controller.
    fn io_queue(&mut self, addr: SocketAddr, subnqn: &str, hostnqn: &str) -> Host {
        self.ok(
            Sqe {
                opcode: admin::SET_FEATURES,
                cdw10: u32::from(feat::NUM_QUEUES),
                ..Sqe::default()
            },
            0,
        );
        let mut q = Host::dial(addr, NONE);
        let c = q.connect(1, self.cntlid, subnqn, hostnqn);
        assert!(c.status().is_success(), "io connect: {}", c.status());
        q
    }
}

/// The completion dword 0 of a Namespace Attribute Changed notice.
const NS_CHANGED: u32 = aen::dword0(aen::TYPE_NOTICE, aen::NOTICE_NS_CHANGED, lid::CHANGED_NS);

fn rw(op: u8, nsid: u32, slba: u64, blocks: u32) -> Sqe {
    Sqe {
        opcode: op,
        nsid,
        cdw10: slba as u32,
        cdw11: (slba >> 32) as u32,
        cdw12: blocks - 1,
        ..Sqe::default()
    }
}

fn write(q: &mut Host, nsid: u32, slba: u64, data: &[u8]) -> Status {
    let mut w = rw(io::WRITE, nsid, slba, (data.len() / BS as usize) as u32);
    w.cid = q.cid();
    q.command(w, Some(data), true, 0).0.status()
}

fn read(q: &mut Host, nsid: u32, slba: u64, blocks: u32) -> (Status, Vec<u8>) {
    let mut r = rw(io::READ, nsid, slba, blocks);
    r.cid = q.cid();
    let (c, d) = q.command(r, None, false, blocks as usize * BS as usize);
    (c.status(), d)
}

/// Blocks until the peer closes the connection.
fn closed(h: &Host) -> bool {
    let mut b = [0u8; 1];
    matches!(std::io::Read::read(&mut h.socket(), &mut b), Ok(0))
}

#[test]
fn a_namespace_added_then_removed_raises_the_notice_and_changes_identify_and_io() {
    let w = Writer::new();
    w.publish(&table(1, &[HOSTNQN], vec![ns(1, 11, 1024)]));
    let h = w.fabric();
    let mut a = Admin::connect(h.addr, EXPNQN, HOSTNQN);
    let (s, id) = a.identify(cns::CONTROLLER, 0);
    assert!(s.is_success());
    assert_ne!(
        u32_at(&id, 92) & (1 << 8),
        0,
        "OAES: namespace attribute notices"
    );
    assert_eq!(u32_at(&id, 516), 1024, "NN: every nsid the table may use");
    a.set_aec(aen::CFG_NS_ATTR);
    a.request_event();
    assert_eq!(a.active_namespaces(), vec![1]);
    let mut q = a.io_queue(h.addr, EXPNQN, HOSTNQN);
    assert!(write(&mut q, 1, 3, &[0x11; 4096]).is_success());

    // Added while connected.
    w.publish(&table(2, &[HOSTNQN], vec![ns(1, 11, 1024), ns(5, 12, 512)]));
    assert_eq!(a.next_event(), NS_CHANGED);
    assert_eq!(a.changed_ns(false), vec![5]);
    assert_eq!(
        a.changed_ns(false),
        Vec::<u32>::new(),
        "cleared by the read"
    );
    assert_eq!(a.active_namespaces(), vec![1, 5]);
    let (s, id) = a.identify(cns::NAMESPACE, 5);
    assert!(s.is_success());
    assert_eq!(u32_at(&id, 0), 512, "NSZE");
    assert_eq!(&id[104..120], &[0x45; 16], "NGUID");
    assert_eq!(u32_at(&id, 92), 1, "ANAGRPID");
    let (s, desc) = a.identify(cns::NS_DESC_LIST, 5);
    assert!(s.is_success());
    assert_eq!(&desc[4..20], &[0x45; 16], "NGUID descriptor");
    assert_eq!(&desc[24..40], &[0x85; 16], "UUID descriptor");
    // I/O lands on the namespace's own volume.
    let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    assert!(write(&mut q, 5, 3, &data).is_success());
    assert_eq!(read(&mut q, 5, 3, 1), (Status::SUCCESS, data.clone()));
    assert_eq!(
        read(&mut q, 1, 3, 1).1,
        vec![0x11; 4096],
        "volume 11 untouched"
    );
    assert_eq!(
        read(&mut q, 5, 511, 2).0,
        generic::LBA_RANGE,
        "the namespace's own size bounds it"
    );

    // Removed while connected.
    a.request_event();
    w.publish(&table(3, &[HOSTNQN], vec![ns(1, 11, 1024)]));
    assert_eq!(a.next_event(), NS_CHANGED);
    assert_eq!(a.changed_ns(false), vec![5]);
    assert_eq!(a.active_namespaces(), vec![1]);
    assert_eq!(a.identify(cns::NAMESPACE, 5).0, generic::INVALID_NS);
    assert_eq!(read(&mut q, 5, 3, 1).0, generic::INVALID_NS);
    assert_eq!(write(&mut q, 5, 3, &data), generic::INVALID_NS);
    assert_eq!(read(&mut q, 1, 3, 1).1, vec![0x11; 4096]);

    // Resized: a change too.
    a.request_event();
    w.publish(&table(4, &[HOSTNQN], vec![ns(1, 11, 2048)]));
    assert_eq!(a.next_event(), NS_CHANGED);
    assert_eq!(a.changed_ns(false), vec![1]);
    assert_eq!(u32_at(&a.identify(cns::NAMESPACE, 1).1, 0), 2048);
}

#[test]
fn the_notice_follows_its_enable_bit_and_stays_masked_until_the_log_is_read() {
    let w = Writer::new();
    w.publish(&table(1, &[HOSTNQN], vec![ns(1, 11, 64)]));
    let h = w.fabric();
    // `a` is under test; `b` reads the log at once each time and is the clock: when its event
    // arrives, the fabric has applied the table.
    let mut a = Admin::connect(h.addr, EXPNQN, HOSTNQN);
    let mut b = Admin::connect(h.addr, EXPNQN, HOSTNQN);
    b.set_aec(aen::CFG_NS_ATTR);
    let step = |b: &mut Admin, g: u64, nsids: &[u32]| {
        b.request_event();
        let namespaces = nsids.iter().map(|&n| ns(n, 10 + n, 64)).collect();
        w.publish(&table(g, &[HOSTNQN], namespaces));
        assert_eq!(b.next_event(), NS_CHANGED);
        b.changed_ns(false);
    };

    // Disabled (AEC bit 8 clear): no event, but the log page still lists the change.
    a.request_event();
    step(&mut b, 2, &[1, 2]);
    a.sync();
    assert!(a.events.is_empty(), "an event while the notice is disabled");
    assert_eq!(a.changed_ns(false), vec![2]);

    // Enabled: the next change is reported ...
    a.set_aec(aen::CFG_NS_ATTR);
    step(&mut b, 3, &[1, 2, 3]);
    assert_eq!(a.next_event(), NS_CHANGED);
    // ... and masks the notice: another change is only listed.
    a.request_event();
    step(&mut b, 4, &[1, 2, 3, 4]);
    a.sync();
    assert!(a.events.is_empty(), "an event while masked");
    // Read with RAE set: the list is read (and cleared), the notice stays masked.
    assert_eq!(a.changed_ns(true), vec![3, 4]);
    step(&mut b, 5, &[1, 2, 3, 4, 5]);
    a.sync();
    assert!(a.events.is_empty(), "an event while masked (RAE)");
    // Read with RAE clear: unmasked; the next change is reported again.
    assert_eq!(a.changed_ns(false), vec![5]);
    step(&mut b, 6, &[1, 2, 3, 4, 5, 6]);
    assert_eq!(a.next_event(), NS_CHANGED);
    assert_eq!(a.changed_ns(false), vec![6]);
}

#[test]
fn a_host_no_longer_allowed_is_disconnected_and_refused_and_removed_subsystems_go() {
    let w = Writer::new();
    w.publish(&table(1, &[HOSTNQN, OTHER], vec![ns(1, 11, 64)]));
    let h = w.fabric();
    let mut other = Admin::connect(h.addr, EXPNQN, OTHER);
    let other_io = other.io_queue(h.addr, EXPNQN, OTHER);
    let mut mine = Admin::connect(h.addr, EXPNQN, HOSTNQN);
    let mut disc = Admin::connect(h.addr, DISCOVERY_NQN, HOSTNQN);
    disc.set_aec(aen::CFG_DISC_CHANGE);

    // OTHER leaves the allow-list: its controller (admin and I/O queues) goes, its next
    // Connect is refused; the allowed host is untouched.
    w.publish(&table(2, &[HOSTNQN], vec![ns(1, 11, 64)]));
    assert!(closed(&other.h), "the denied host's admin queue stays open");
    assert!(closed(&other_io), "the denied host's I/O queue stays open");
    let mut again = Host::dial(h.addr, NONE);
    assert_eq!(
        again.connect(0, 0xFFFF, EXPNQN, OTHER).status(),
        specific::CONNECT_INVALID_HOST
    );
    mine.sync();
    assert_eq!(mine.active_namespaces(), vec![1]);

    // The subsystem leaves the table: every controller of it goes; discovery hosts are told.
    disc.request_event();
    w.publish(&ExportTable {
        generation: 3,
        subsystems: vec![],
        ana: vec![],
        reservations: vec![],
    });
    assert_eq!(
        disc.next_event(),
        aen::dword0(aen::TYPE_NOTICE, aen::NOTICE_DISC_CHANGE, lid::DISCOVERY)
    );
    assert!(closed(&mine.h), "a removed subsystem's controller stays");
    let mut gone = Host::dial(h.addr, NONE);
    assert_eq!(
        gone.connect(0, 0xFFFF, EXPNQN, HOSTNQN).status(),
        specific::CONNECT_INVALID_PARAM
    );
    let log = |d: &mut Admin| {
        let numd = 4096 / 4 - 1;
        d.ok(
            Sqe {
                opcode: admin::GET_LOG_PAGE,
                cdw10: u32::from(lid::DISCOVERY) | numd << 16,
                ..Sqe::default()
            },
            4096,
        )
    };
    assert_eq!(
        u32_at(&log(&mut disc), 8),
        2,
        "the static subsystem and discovery"
    );

    // Back again: connectable, and listed.
    disc.request_event();
    w.publish(&table(4, &[HOSTNQN], vec![ns(1, 11, 64)]));
    assert_eq!(
        disc.next_event(),
        aen::dword0(aen::TYPE_NOTICE, aen::NOTICE_DISC_CHANGE, lid::DISCOVERY)
    );
    let page = log(&mut disc);
    assert_eq!(u32_at(&page, 8), 3);
    let entries: Vec<&[u8]> = (0..3)
        .map(|i| &page[1024 * (i + 1)..1024 * (i + 2)])
        .collect();
    assert!(entries
        .iter()
        .any(|e| &e[256..256 + EXPNQN.len()] == EXPNQN.as_bytes()));
    let mut back = Admin::connect(h.addr, EXPNQN, HOSTNQN);
    assert_eq!(back.active_namespaces(), vec![1]);
}

#[test]
fn a_fresh_or_restarted_fabric_serves_the_published_table() {
    let w = Writer::new();
    // The static topology's subsystem wins over a table entry of the same NQN.
    let mut t = table(7, &[HOSTNQN], vec![ns(1, 11, 64), ns(2, 12, 128)]);
    t.subsystems.push(ExportSubsystem {
        nqn: SUBNQN.into(),
        serial: "impostor".into(),
        model: "impostor".into(),
        allow_any_host: true,
        hosts: vec![],
        secrets: vec![],
        namespaces: vec![ns(9, 19, 64)],
    });
    w.publish(&t);
    let check = |h: &Harness| {
        let mut a = Admin::connect(h.addr, EXPNQN, HOSTNQN);
        assert_eq!(a.active_namespaces(), vec![1, 2]);
        let (s, id) = a.identify(cns::NAMESPACE, 2);
        assert!(s.is_success());
        assert_eq!(u32_at(&id, 0), 128);
        assert_eq!(&id[104..120], &[0x42; 16]);
        let mut q = a.io_queue(h.addr, EXPNQN, HOSTNQN);
        assert!(write(&mut q, 2, 1, &[7; 4096]).is_success());
        assert_eq!(read(&mut q, 2, 1, 1), (Status::SUCCESS, vec![7; 4096]));
        let mut s = Admin::connect(h.addr, SUBNQN, HOSTNQN);
        assert_eq!(
            s.active_namespaces(),
            vec![1],
            "the static subsystem as configured"
        );
    };
    // A fresh fabric.
    let first = w.fabric();
    check(&first);
    drop(first);
    // Its successor, on the same region, without a bell (it reads once).
    let second = Harness::start_with(Some((w.region.region().try_clone_fd().expect("fd"), None)));
    check(&second);
    drop(second);
    // A table published while no fabric runs is what the next one serves.
    w.publish(&table(8, &[HOSTNQN], vec![ns(3, 13, 64)]));
    let third = w.fabric();
    let mut a = Admin::connect(third.addr, EXPNQN, HOSTNQN);
    assert_eq!(a.active_namespaces(), vec![3]);
}

/// OAES is bytes 95:92 of Identify Controller (NVMe Base Specification, Identify Controller
/// data structure): decoded here from the raw bytes, not with our own decoder.
#[test]
fn identify_controller_reports_oaes_at_the_spec_offset() {
    let w = Writer::new();
    w.publish(&table(1, &[HOSTNQN], vec![ns(1, 11, 64)]));
    let h = w.fabric();
    for subnqn in [SUBNQN, EXPNQN] {
        let mut a = Admin::connect(h.addr, subnqn, HOSTNQN);
        let (s, id) = a.identify(cns::CONTROLLER, 0);
        assert!(s.is_success());
        let oaes = u32::from_le_bytes([id[92], id[93], id[94], id[95]]);
        assert_ne!(
            oaes & 1 << 8,
            0,
            "{subnqn}: Namespace Attribute Notices (bit 8)"
        );
        assert_ne!(oaes & 1 << 11, 0, "{subnqn}: ANA Change Notices (bit 11)");
        assert_eq!(oaes & 1 << 31, 0, "{subnqn}: not a discovery controller");
    }
    let mut d = Admin::connect(h.addr, DISCOVERY_NQN, HOSTNQN);
    let (s, id) = d.identify(cns::CONTROLLER, 0);
    assert!(s.is_success());
    let oaes = u32::from_le_bytes([id[92], id[93], id[94], id[95]]);
    assert_eq!(oaes & 1 << 8, 0, "discovery: no namespaces");
    assert_ne!(
        oaes & 1 << 31,
        0,
        "discovery: Discovery Log Page Change Notices (bit 31)"
    );
}

/// The ANA log page as the NVMe specification lays it out (and Linux's `nvme_ana_rsp_hdr` and
/// `nvme_ana_group_desc` read it), at literal offsets: header (change count 7:0, number of
/// descriptors 9:8, 16 bytes), then per group: ANAGRPID 3:0, NNSID 7:4, change count 15:8,
/// ANA state in bits 3:0 of byte 16, NSIDs from byte 32.
/// Returns the change count and (group, state, nsids) per descriptor.
fn ana_log(a: &mut Admin, rae: bool) -> (u64, Vec<(u32, u8, Vec<u32>)>) {
    let len = 4096;
    let page = a.ok(
        Sqe {
            opcode: admin::GET_LOG_PAGE,
            nsid: 0xFFFF_FFFF,
            cdw10: u32::from(lid::ANA) | u32::from(rae) << 15 | ((len / 4 - 1) as u32) << 16,
            ..Sqe::default()
        },
        len,
    );
    let change = u64::from_le_bytes(page[0..8].try_into().expect("8 bytes"));
    let count = u16::from_le_bytes([page[8], page[9]]);
    let mut at = 16;
    let mut groups = Vec::new();
    for _ in 0..count {
        let d = &page[at..];
        let nnsid = u32_at(d, 4) as usize;
        let nsids = (0..nnsid).map(|i| u32_at(d, 32 + 4 * i)).collect();
        groups.push((u32_at(d, 0), d[16] & 0x0F, nsids));
        at += 32 + 4 * nnsid;
    }
    (change, groups)
}

/// A fabric serving namespaces 1 and 2 in ANA group 1, optimized; an admin queue with the
/// events `aec` enabled and an I/O queue of its controller.
fn ana_fixture(aec: u32) -> (Writer, Harness, Admin, Host) {
    let w = Writer::new();
    w.publish(&table_in(
        1,
        vec![ns(1, 11, 64), ns(2, 12, 64)],
        AnaState::Optimized,
    ));
    let h = w.fabric();
    let mut a = Admin::connect(h.addr, EXPNQN, HOSTNQN);
    a.set_aec(aec);
    let q = a.io_queue(h.addr, EXPNQN, HOSTNQN);
    (w, h, a, q)
}

/// The completion dword 0 of an ANA change notice.
const ANA_CHANGED: u32 = aen::dword0(aen::TYPE_NOTICE, aen::NOTICE_ANA_CHANGE, lid::ANA);

#[test]
fn ana_state_changes_raise_the_notice_and_a_non_serving_path_returns_only_path_errors() {
    let (w, _h, mut a, mut q) = ana_fixture(aen::CFG_ANA_CHANGE | aen::CFG_NS_ATTR);
    let (c0, groups) = ana_log(&mut a, false);
    assert_eq!(
        groups,
        vec![(1, 1, vec![1, 2])],
        "optimized, both namespaces"
    );
    let old = vec![0x5Au8; 2 * BS as usize];
    assert!(write(&mut q, 1, 0, &old).is_success());

    // Each state that does not serve: the notice, the log saying so, and every I/O command
    // answered with its path error (SCT 3, without Do Not Retry, so a host retries on
    // another path), reads returning no data, writes reaching nothing.
    let mut generation = 1;
    let mut count = c0;
    for (state, code, status) in [
        (AnaState::Inaccessible, 3u8, path::ANA_INACCESSIBLE),
        (AnaState::Change, 0x0F, path::ANA_TRANSITION),
        (AnaState::PersistentLoss, 4, path::ANA_PERSISTENT_LOSS),
    ] {
        a.request_event();
        generation += 1;
        w.publish(&table_in(
            generation,
            vec![ns(1, 11, 64), ns(2, 12, 64)],
            state,
        ));
        assert_eq!(a.next_event(), ANA_CHANGED, "{state:?}");
        let (c, groups) = ana_log(&mut a, false);
        assert!(c > count, "the change count grows ({c} after {count})");
        count = c;
        assert_eq!(groups, vec![(1, code, vec![1, 2])], "{state:?}");
        assert_eq!(status.sct(), 3);
        assert!(!status.is_dnr());
        let new = vec![0xA5u8; 2 * BS as usize];
        assert_eq!(write(&mut q, 1, 0, &new), status, "{state:?} write");
        let (s, data) = read(&mut q, 1, 0, 2);
        assert_eq!(s, status, "{state:?} read");
        assert!(data.is_empty(), "{state:?}: a read returned data");
        // Off the fast path too: a read larger than one transfer, Write Zeroes, Flush to the
        // namespace.
        let mut wz = rw(io::WRITE_ZEROES, 2, 0, 8);
        wz.cid = q.cid();
        assert_eq!(
            q.command(wz, None, false, 0).0.status(),
            status,
            "{state:?} write zeroes"
        );
        // Identify still answers (hosts read it on every path).
        let (s, _) = a.identify(cns::NAMESPACE, 1);
        assert!(s.is_success(), "{state:?} identify: {s}");
    }

    // Optimized again: served, and nothing written meanwhile reached the volume.
    a.request_event();
    w.publish(&table_in(
        generation + 1,
        vec![ns(1, 11, 64), ns(2, 12, 64)],
        AnaState::Optimized,
    ));
    assert_eq!(a.next_event(), ANA_CHANGED);
    assert_eq!(ana_log(&mut a, false).1, vec![(1, 1, vec![1, 2])]);
    let (s, data) = read(&mut q, 1, 0, 2);
    assert!(s.is_success(), "{s}");
    assert_eq!(
        data, old,
        "a write refused on a non-serving path reached the volume"
    );

    // Non-optimized serves I/O.
    a.request_event();
    w.publish(&table_in(
        generation + 2,
        vec![ns(1, 11, 64), ns(2, 12, 64)],
        AnaState::NonOptimized,
    ));
    assert_eq!(a.next_event(), ANA_CHANGED);
    assert_eq!(ana_log(&mut a, false).1, vec![(1, 2, vec![1, 2])]);
    assert!(read(&mut q, 1, 0, 2).0.is_success());

    // The same states again, in a table that adds a namespace: its notice, and no ANA one.
    a.request_event();
    w.publish(&table_in(
        generation + 3,
        vec![ns(1, 11, 64), ns(2, 12, 64), ns(3, 13, 64)],
        AnaState::NonOptimized,
    ));
    assert_eq!(a.next_event(), NS_CHANGED);
    a.request_event();
    a.sync();
    assert!(a.events.is_empty(), "an ANA notice without an ANA change");
}

#[test]
fn a_fenced_datapath_makes_every_group_inaccessible_with_a_notice_and_serves_nothing_more() {
    let (w, h, mut a, mut q) = ana_fixture(aen::CFG_ANA_CHANGE);
    let block = vec![0x3Cu8; BS as usize];
    assert!(write(&mut q, 1, 0, &block).is_success());
    let (c0, groups) = ana_log(&mut a, false);
    assert_eq!(groups, vec![(1, 1, vec![1, 2])]);

    // The datapath is fenced (the peer preempted this node's key): the first command that
    // reaches it comes back fenced, and the host sees the path error.
    h.fence_datapath();
    a.request_event();
    assert_eq!(write(&mut q, 1, 1, &block), path::ANA_INACCESSIBLE);
    assert_eq!(a.next_event(), ANA_CHANGED);
    let (c1, groups) = ana_log(&mut a, false);
    assert!(c1 > c0);
    assert_eq!(groups, vec![(1, 3, vec![1, 2])], "every group inaccessible");
    // From now on nothing is served, namespace 2 (never touched) included, reads too.
    let (s, data) = read(&mut q, 2, 0, 1);
    assert_eq!(s, path::ANA_INACCESSIBLE);
    assert!(data.is_empty());
    assert_eq!(write(&mut q, 1, 0, &block), path::ANA_INACCESSIBLE);
    // A later export table saying optimized does not undo it: only a new process serves again.
    w.publish(&table_in(
        2,
        vec![ns(1, 11, 64), ns(2, 12, 64), ns(3, 13, 64)],
        AnaState::Optimized,
    ));
    while !a.active_namespaces().contains(&3) {
        // The table is applied when namespace 3 appears (each round trip waits for the fabric).
    }
    assert_eq!(ana_log(&mut a, false).1, vec![(1, 3, vec![1, 2, 3])]);
    assert_eq!(read(&mut q, 1, 0, 1).0, path::ANA_INACCESSIBLE);
}

/// A host with its own host identifier: its admin queue and one I/O queue on [`EXPNQN`].
fn host_as(addr: SocketAddr, hostnqn: &str, hostid: [u8; 16]) -> (Host, Host) {
    let (mut a, cntlid) = Host::admin_as_id(addr, NONE, EXPNQN, hostnqn, hostid);
    let (s, _, _) = a.admin_cmd(
        Sqe {
            opcode: admin::SET_FEATURES,
            cdw10: u32::from(feat::NUM_QUEUES),
            ..Sqe::default()
        },
        0,
    );
    assert!(s.is_success(), "{s}");
    let mut q = Host::dial(addr, NONE);
    let c = q.connect_as(1, cntlid, EXPNQN, hostnqn, hostid);
    assert!(c.status().is_success(), "io connect: {}", c.status());
    (a, q)
}

fn flush(q: &mut Host, nsid: u32) -> Status {
    let sqe = Sqe {
        opcode: io::FLUSH,
        nsid,
        cid: q.cid(),
        ..Sqe::default()
    };
    q.command(sqe, None, false, 0).0.status()
}

/// The reservation state the export table publishes for a namespace (kept by the metadata
/// service with the pool on the drives) is what every I/O command meets: under Write Exclusive
/// held by host A, host B (registered, not the holder) reads but its writes and flushes get
/// Reservation Conflict (generic 83h, Do Not Retry) while A writes; under Exclusive Access B's
/// reads conflict too; a table without the state lets B write again. Each table also flips the
/// group between optimized and non-optimized, so the ANA change notice says it was applied.
#[test]
fn published_reservation_state_is_enforced_on_every_io() {
    const A: [u8; 16] = duplex_tests::nvme_host::HOSTID;
    const B: [u8; 16] = [9; 16];
    let nguid = ns(1, 11, 1024).nguid;
    let at = |generation: u64, rtype: Option<u8>| {
        let state = if generation % 2 == 1 {
            AnaState::Optimized
        } else {
            AnaState::NonOptimized
        };
        let mut t = table_in(generation, vec![ns(1, 11, 1024)], state);
        t.subsystems[0].hosts = vec![HOSTNQN.into(), OTHER.into()];
        t.reservations = rtype
            .map(|rtype| ExportReservation {
                nguid,
                version: generation,
                generation: 2,
                rtype,
                ptpl: false,
                holder: A,
                registrants: [A, B]
                    .iter()
                    .map(|&host_id| ExportRegistrant {
                        host_id,
                        key: u64::from(host_id[0]),
                        cntlid: 0xFFFF,
                    })
                    .collect(),
            })
            .into_iter()
            .collect();
        t
    };
    let w = Writer::new();
    w.publish(&at(1, Some(1)));
    let f = w.fabric();
    let mut admin = Admin::connect(f.addr, EXPNQN, HOSTNQN);
    admin.set_aec(aen::CFG_ANA_CHANGE);
    let mut a = admin.io_queue(f.addr, EXPNQN, HOSTNQN);
    // Each notice is followed by a read of the ANA log (which reports the class again).
    ana_log(&mut admin, false);
    let (_b_admin, mut b) = host_as(f.addr, OTHER, B);
    let data = vec![0x5A; BS as usize];
    let conflict = Status::new(0, 0x83).dnr();
    assert_eq!(generic::RESERVATION_CONFLICT, conflict);
    assert!(write(&mut a, 1, 0, &data).is_success());
    assert_eq!(write(&mut b, 1, 0, &data), conflict);
    assert_eq!(flush(&mut b, 1), conflict);
    let (s, d) = read(&mut b, 1, 0, 1);
    assert!(s.is_success(), "{s}");
    assert_eq!(d, data, "B reads what A wrote");
    // Exclusive Access: B's reads conflict too; A goes on.
    admin.request_event();
    w.publish(&at(2, Some(2)));
    assert_eq!(admin.next_event(), ANA_CHANGED);
    ana_log(&mut admin, false);
    assert_eq!(read(&mut b, 1, 0, 1).0, conflict);
    assert!(write(&mut a, 1, 1, &data).is_success());
    assert!(read(&mut a, 1, 1, 1).0.is_success());
    // No reservation state: B writes.
    admin.request_event();
    w.publish(&at(3, None));
    assert_eq!(admin.next_event(), ANA_CHANGED);
    assert!(write(&mut b, 1, 2, &data).is_success());
    assert!(flush(&mut b, 1).is_success());
}
