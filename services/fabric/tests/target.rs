//! The fabric against a test host over real TCP, with real rings and pool to a memory datapath:
//! per-PDU and per-command behaviour, errors, and protocol violations.

mod common;

use common::*;
use duplex_host::HostError;
use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::{admin, cns, feat, io, lid, prop, DISCOVERY_NQN};
use duplex_nvme::status::{generic, media, specific};
use duplex_nvme::tcp::{self, fes, Digests, PduType};

const NONE: Digests = Digests {
    header: false,
    data: false,
};
const BOTH: Digests = Digests {
    header: true,
    data: true,
};

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn identify(cns: u8, nsid: u32) -> Sqe {
    Sqe {
        opcode: admin::IDENTIFY,
        nsid,
        cdw10: u32::from(cns),
        ..Sqe::default()
    }
}

fn log_page(lid: u8, len: usize) -> Sqe {
    let numd = (len / 4 - 1) as u32;
    Sqe {
        opcode: admin::GET_LOG_PAGE,
        nsid: 0xFFFF_FFFF,
        cdw10: u32::from(lid) | (numd & 0xFFFF) << 16,
        cdw11: numd >> 16,
        ..Sqe::default()
    }
}

#[test]
fn admin_queue_properties_identify_logs_features() {
    let h = Harness::start();
    let (mut a, cntlid) = admin(h.addr, NONE);
    let cap = a.prop_get(prop::CAP, true);
    assert_eq!(cap.dw0 & 0xFFFF, 127, "MQES");
    assert_eq!(a.prop_get(prop::VS, false).dw0, 0x0001_0400);
    assert_eq!(
        a.prop_get(prop::CSTS, false).dw0 & 1,
        1,
        "ready after CC.EN"
    );

    let (s, id, _) = a.admin_cmd(identify(cns::CONTROLLER, 0), 4096);
    assert!(s.is_success());
    assert_eq!(u16::from_le_bytes([id[78], id[79]]), cntlid, "CNTLID");
    assert_ne!(u16::from_le_bytes([id[320], id[321]]), 0, "KAS");
    assert_eq!(&id[4..11], b"serial1");
    assert_eq!(&id[768..768 + SUBNQN.len()], SUBNQN.as_bytes());
    assert_eq!(id[76] & 0b1000, 0b1000, "ANA reporting");

    let (s, list, _) = a.admin_cmd(identify(cns::ACTIVE_NS_LIST, 0), 4096);
    assert!(s.is_success());
    assert_eq!((u32_at(&list, 0), u32_at(&list, 4)), (1, 0));
    let (s, ns, _) = a.admin_cmd(identify(cns::NAMESPACE, 1), 4096);
    assert!(s.is_success());
    assert_eq!(u32_at(&ns, 0), BLOCKS as u32, "NSZE");
    assert_eq!(&ns[104..120], &[0x11; 16], "NGUID");
    assert_eq!(ns[30] & 1, 1, "shared namespace");
    let (s, desc, _) = a.admin_cmd(identify(cns::NS_DESC_LIST, 1), 4096);
    assert!(s.is_success());
    assert_eq!((desc[0], desc[1]), (2, 16));
    assert_eq!(&desc[4..20], &[0x11; 16]);
    assert_eq!(&desc[24..40], &[0x22; 16], "UUID");
    assert_eq!(
        a.admin_cmd(identify(cns::NAMESPACE, 9), 4096).0,
        generic::INVALID_NS
    );
    assert_eq!(
        a.admin_cmd(identify(0x55, 0), 4096).0,
        generic::INVALID_FIELD
    );

    let (s, ana, _) = a.admin_cmd(log_page(lid::ANA, 4096), 4096);
    assert!(s.is_success());
    assert_eq!(ana[8], 1, "one ANA group");
    assert_eq!(
        (u32_at(&ana, 16), u32_at(&ana, 20), ana[32]),
        (1, 1, 1),
        "group 1, 1 ns, optimized"
    );
    assert_eq!(u32_at(&ana, 48), 1);
    for (l, len) in [
        (lid::ERROR, 64),
        (lid::SMART, 512),
        (lid::FW_SLOT, 512),
        (lid::CHANGED_NS, 4096),
        (lid::CMD_EFFECTS, 4096),
    ] {
        let (s, d, _) = a.admin_cmd(log_page(l, len), len);
        assert!(s.is_success(), "log {l:#x}: {s}");
        assert_eq!(d.len(), len);
    }
    assert_eq!(
        a.admin_cmd(log_page(0x42, 512), 512).0,
        specific::INVALID_LOG_PAGE
    );

    let (s, _, dw0) = a.admin_cmd(
        Sqe {
            opcode: admin::SET_FEATURES,
            cdw10: u32::from(feat::NUM_QUEUES),
            cdw11: 3 | 3 << 16,
            ..Sqe::default()
        },
        0,
    );
    assert!(s.is_success());
    assert_eq!(dw0, 3 | 3 << 16);
    let (s, _, dw0) = a.admin_cmd(
        Sqe {
            opcode: admin::GET_FEATURES,
            cdw10: u32::from(feat::VOLATILE_WC),
            ..Sqe::default()
        },
        0,
    );
    assert!(s.is_success());
    assert_eq!(dw0, 1, "write cache enabled");
    assert!(a
        .admin_cmd(
            Sqe {
                opcode: admin::KEEP_ALIVE,
                ..Sqe::default()
            },
            0
        )
        .0
        .is_success());
    assert_eq!(
        a.admin_cmd(
            Sqe {
                opcode: 0x99,
                ..Sqe::default()
            },
            0
        )
        .0,
        generic::INVALID_OPCODE
    );
}

fn io_queue(h: &Harness, digests: Digests) -> (Host, Host) {
    let (mut a, cntlid) = admin(h.addr, digests);
    let (s, _, _) = a.admin_cmd(
        Sqe {
            opcode: admin::SET_FEATURES,
            cdw10: u32::from(feat::NUM_QUEUES),
            cdw11: 1 | 1 << 16,
            ..Sqe::default()
        },
        0,
    );
    assert!(s.is_success());
    let mut q = Host::dial(h.addr, digests);
    let c = q.connect(1, cntlid, SUBNQN, HOSTNQN);
    assert!(c.status().is_success(), "io connect: {}", c.status());
    (a, q)
}

fn rw(op: u8, slba: u64, blocks: u32) -> Sqe {
    Sqe {
        opcode: op,
        nsid: 1,
        cdw10: slba as u32,
        cdw11: (slba >> 32) as u32,
        cdw12: blocks - 1,
        ..Sqe::default()
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn io_in_capsule_and_r2t_with_and_without_digests() {
    let h = Harness::start();
    for (round, digests) in [NONE, BOTH].into_iter().enumerate() {
        let (_a, mut q) = io_queue(&h, digests);
        let seed = round as u8 * 7;
        // 4 KiB in the capsule, 96 KiB pulled with R2T.
        let small = pattern(seed, 4096);
        let mut w = rw(io::WRITE, 10, 1);
        w.cid = q.cid();
        assert!(q.command(w, Some(&small), true, 0).0.status().is_success());
        let big = pattern(seed + 1, 96 * 1024);
        let mut w = rw(io::WRITE, 100, 24);
        w.cid = q.cid();
        assert!(q.command(w, Some(&big), false, 0).0.status().is_success());
        let mut r = rw(io::READ, 10, 1);
        r.cid = q.cid();
        let (c, d) = q.command(r, None, false, 4096);
        assert!(c.status().is_success());
        assert_eq!(d, small);
        let mut r = rw(io::READ, 100, 24);
        r.cid = q.cid();
        let (c, d) = q.command(r, None, false, 96 * 1024);
        assert!(c.status().is_success());
        assert!(d == big, "96 KiB read back differs");
        // Compare: equal, then different.
        let mut c1 = rw(io::COMPARE, 10, 1);
        c1.cid = q.cid();
        assert!(q.command(c1, Some(&small), true, 0).0.status().is_success());
        let mut c2 = rw(io::COMPARE, 10, 1);
        c2.cid = q.cid();
        assert_eq!(
            q.command(c2, Some(&big[..4096]), true, 0).0.status(),
            media::COMPARE_FAILURE
        );
        // Write zeroes and deallocate read back as zeroes.
        let mut z = rw(io::WRITE_ZEROES, 10, 1);
        z.cid = q.cid();
        assert!(q.command(z, None, false, 0).0.status().is_success());
        let mut range = vec![0u8; 16];
        range[4..8].copy_from_slice(&24u32.to_le_bytes());
        range[8..16].copy_from_slice(&100u64.to_le_bytes());
        let dsm = Sqe {
            opcode: io::DSM,
            nsid: 1,
            cdw10: 0,
            cdw11: 1 << 2,
            cid: q.cid(),
            ..Sqe::default()
        };
        assert!(q
            .command(dsm, Some(&range), true, 0)
            .0
            .status()
            .is_success());
        for (lba, n) in [(10, 1u32), (100, 24)] {
            let mut r = rw(io::READ, lba, n);
            r.cid = q.cid();
            let (c, d) = q.command(r, None, false, n as usize * 4096);
            assert!(c.status().is_success());
            assert!(d.iter().all(|&b| b == 0), "zeroed range at {lba}");
        }
        let f = Sqe {
            opcode: io::FLUSH,
            nsid: 1,
            cid: q.cid(),
            ..Sqe::default()
        };
        assert!(q.command(f, None, false, 0).0.status().is_success());
        // Errors: out of range, unknown namespace, unknown opcode, SGL length mismatch.
        let mut r = rw(io::READ, BLOCKS - 1, 2);
        r.cid = q.cid();
        assert_eq!(
            q.command(r, None, false, 8192).0.status(),
            generic::LBA_RANGE
        );
        let mut r = rw(io::READ, 0, 1);
        r.nsid = 5;
        r.cid = q.cid();
        assert_eq!(
            q.command(r, None, false, 4096).0.status(),
            generic::INVALID_NS
        );
        let mut r = rw(0x7E, 0, 1);
        r.cid = q.cid();
        assert_eq!(
            q.command(r, None, false, 0).0.status(),
            generic::INVALID_OPCODE
        );
        let mut r = rw(io::READ, 0, 2);
        r.cid = q.cid();
        assert_eq!(
            q.command(r, None, false, 4096).0.status(),
            generic::SGL_LENGTH
        );
    }
}

/// Commands a host sends together (one buffer, as a host at depth does) are read out of the
/// target's read buffer in one go: every one is answered, each with its own data.
#[test]
fn commands_sent_together_are_each_answered_with_their_own_data() {
    use duplex_host::Data;
    let h = Harness::start();
    for digests in [NONE, BOTH] {
        let (_a, mut q) = io_queue(&h, digests);
        // 24 writes of 4 KiB in their capsules, queued, then flushed in one send by the first poll.
        let mut lba_of = std::collections::HashMap::new();
        for i in 0..24u64 {
            let cid =
                q.q.submit(rw(io::WRITE, 300 + i, 1), Data::Out(pattern(i as u8, 4096)))
                    .expect("submit");
            lba_of.insert(cid, i);
        }
        for _ in 0..24 {
            let c = q.q.poll().expect("write completion");
            assert!(c.status().is_success(), "write: {}", c.status());
            assert!(
                lba_of.remove(&c.cid).is_some(),
                "unknown or repeated cid {}",
                c.cid
            );
        }
        // And read back together.
        for i in 0..24u64 {
            let cid =
                q.q.submit(rw(io::READ, 300 + i, 1), Data::In(4096))
                    .expect("submit");
            lba_of.insert(cid, i);
        }
        for _ in 0..24 {
            let c = q.q.poll().expect("read completion");
            assert!(c.status().is_success(), "read: {}", c.status());
            let i = lba_of.remove(&c.cid).expect("a cid of ours, once");
            assert!(
                c.data == pattern(i as u8, 4096),
                "block {} read back differs",
                300 + i
            );
        }
    }
}

#[test]
fn hosts_off_the_allow_list_and_unknown_subsystems_are_refused() {
    let h = Harness::start();
    let mut x = Host::dial(h.addr, NONE);
    let c = x.connect(0, 0xFFFF, SUBNQN, "nqn.2014-08.org.nvmexpress:uuid:bad");
    assert_eq!(c.status(), specific::CONNECT_INVALID_HOST);
    assert_eq!(c.dw0, 1 << 16 | 512, "IATTR data, IPO hostnqn");
    let mut y = Host::dial(h.addr, NONE);
    let c = y.connect(0, 0xFFFF, "nqn.2026-11.io.duplex:nope", HOSTNQN);
    assert_eq!(c.status(), specific::CONNECT_INVALID_PARAM);
    assert_eq!(c.dw0, 1 << 16 | 256);
    // An I/O queue for a controller that does not exist.
    let mut z = Host::dial(h.addr, NONE);
    assert_eq!(
        z.connect(1, 77, SUBNQN, HOSTNQN).status(),
        specific::CONNECT_INVALID_PARAM
    );
}

#[test]
fn discovery_log_lists_the_subsystem() {
    let h = Harness::start();
    let mut d = Host::dial(h.addr, NONE);
    let c = d.connect(0, 0xFFFF, DISCOVERY_NQN, HOSTNQN);
    assert!(c.status().is_success());
    assert!(d.prop_set(prop::CC, 1).status().is_success());
    let (s, id, _) = d.admin_cmd(identify(cns::CONTROLLER, 0), 4096);
    assert!(s.is_success());
    assert_eq!(id[111], 2, "discovery controller");
    let (s, page, _) = d.admin_cmd(log_page(lid::DISCOVERY, 4096), 4096);
    assert!(s.is_success());
    let numrec = u32_at(&page, 8);
    assert_eq!(
        numrec, 2,
        "the subsystem and the discovery subsystem itself"
    );
    let e = &page[1024..2048];
    assert_eq!((e[0], e[2]), (3, 2), "TCP, NVM subsystem");
    assert_eq!(&e[256..256 + SUBNQN.len()], SUBNQN.as_bytes());
    let port = h.addr.port().to_string();
    assert_eq!(&e[32..32 + port.len()], port.as_bytes());
    assert_eq!(&e[512..521], b"127.0.0.1");
}

/// Sends `pdu` on a fresh connection (after ICReq, and after an admin Connect when `connected`)
/// and expects a C2HTermReq with `fes`, then the connection closed.
fn expect_term(h: &Harness, digests: Digests, connected: bool, pdu: &[u8], fes: u16) {
    let mut x = if connected {
        admin(h.addr, digests).0
    } else {
        Host::dial(h.addr, digests)
    };
    x.raw(pdu);
    match x.read_pdu() {
        Err(HostError::Terminated { fes: got, .. }) => assert_eq!(got, fes),
        other => panic!("expected a C2HTermReq, got {other:?}"),
    }
    let mut b = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut x.socket(), &mut b).unwrap_or(0),
        0,
        "closed after TermReq"
    );
}

#[test]
fn malformed_pdus_get_term_req_and_close_only_that_connection() {
    let h = Harness::start();
    let (_a, mut good) = io_queue(&h, NONE);
    let mut cmd = tcp::capsule_cmd(&Sqe::default(), 0, NONE, 0);
    // Unknown PDU type.
    cmd[0] = 0x0F;
    expect_term(&h, NONE, false, &cmd, fes::INVALID_HEADER_FIELD);
    // HLEN wrong for the type.
    let mut c = tcp::capsule_cmd(&Sqe::default(), 0, NONE, 0);
    c[2] = 40;
    expect_term(&h, NONE, false, &c, fes::INVALID_HEADER_FIELD);
    // PLEN shorter than the header.
    let mut c = tcp::capsule_cmd(&Sqe::default(), 0, NONE, 0);
    c[4..8].copy_from_slice(&16u32.to_le_bytes());
    expect_term(&h, NONE, false, &c, fes::INVALID_HEADER_FIELD);
    // Header digest mismatch.
    let mut c = tcp::capsule_cmd(&Sqe::default(), 0, BOTH, 0);
    c[73] ^= 0xFF;
    expect_term(&h, BOTH, false, &c, fes::HEADER_DIGEST);
    // Data digest mismatch on in-capsule data.
    let mut c = tcp::capsule_cmd(&Sqe::default(), 512, BOTH, 0);
    c.extend_from_slice(&[1u8; 512]);
    c.extend_from_slice(&[0, 0, 0, 0]);
    expect_term(&h, BOTH, true, &c, fes::HEADER_DIGEST);
    // H2CData for no R2T.
    let d = tcp::DataHeader {
        cccid: 1,
        ttag: 9,
        datao: 0,
        datal: 512,
    };
    let mut p = tcp::data_pdu(PduType::H2CData, &d, tcp::FLAG_DATA_LAST, NONE, 0);
    p.extend_from_slice(&[0u8; 512]);
    expect_term(&h, NONE, true, &p, fes::INVALID_HEADER_FIELD);
    // More data than the limit.
    let mut c = tcp::capsule_cmd(&Sqe::default(), 0, NONE, 0);
    c[3] = 72;
    c[4..8].copy_from_slice(&(72u32 + (1 << 20)).to_le_bytes());
    expect_term(&h, NONE, false, &c, fes::DATA_LIMIT);

    // H2CData outside the window its R2T asked for: a write pulled with R2T, answered at the
    // wrong offset.
    let (_a2, mut q) = io_queue(&h, NONE);
    let mut w = rw(io::WRITE, 0, 2);
    w.cid = 40;
    w.flags = 1 << 6;
    w.set_sgl(duplex_nvme::cmd::Sgl {
        address: 0,
        length: 8192,
        id: duplex_nvme::spec::sgl::TRANSPORT_DATA_BLOCK,
    });
    q.raw(&tcp::capsule_cmd(&w, 0, NONE, 0));
    let p = q.read_pdu().expect("R2T");
    assert_eq!(p.pdu_type, PduType::R2T);
    let r = tcp::parse_r2t(&p.header).expect("r2t");
    let d = tcp::DataHeader {
        cccid: r.cccid,
        ttag: r.ttag,
        datao: 4096,
        datal: 8192,
    };
    let mut p = tcp::data_pdu(PduType::H2CData, &d, tcp::FLAG_DATA_LAST, NONE, 0);
    p.extend_from_slice(&[0u8; 8192]);
    q.raw(&p);
    match q.read_pdu() {
        Err(HostError::Terminated { fes: got, .. }) => assert_eq!(got, fes::DATA_OUT_OF_RANGE),
        other => panic!("expected a C2HTermReq, got {other:?}"),
    }

    // The first connection never noticed.
    let data = pattern(3, 4096);
    let mut w = rw(io::WRITE, 5, 1);
    w.cid = good.cid();
    assert!(good
        .command(w, Some(&data), true, 0)
        .0
        .status()
        .is_success());
    let mut r = rw(io::READ, 5, 1);
    r.cid = good.cid();
    assert_eq!(good.command(r, None, false, 4096).1, data);
}

#[test]
fn keep_alive_timeout_tears_the_controller_down() {
    let h = Harness::start();
    let mut a = Host::dial(h.addr, NONE);
    let cid = a.cid();
    let mut sqe = duplex_nvme::cmd::ConnectCmd {
        recfmt: 0,
        qid: 0,
        sqsize: 31,
        cattr: 0,
        kato: 1000,
    }
    .to_sqe(cid);
    sqe.cid = cid;
    let data = duplex_nvme::cmd::ConnectData {
        hostid: [1; 16],
        cntlid: 0xFFFF,
        subnqn: SUBNQN.into(),
        hostnqn: HOSTNQN.into(),
    }
    .to_bytes();
    let (c, _) = a.command(sqe, Some(&data), true, 0);
    assert!(c.status().is_success());
    // Silence: the controller must go, and with it the connection.
    let mut b = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut a.socket(), &mut b).unwrap_or(0),
        0,
        "closed on KATO expiry"
    );
}

#[test]
fn ana_log_as_nvme_cli_asks_for_it() {
    let h = Harness::start();
    let (mut a, _) = admin(h.addr, NONE);
    let (s, d, _) = a.admin_cmd(
        Sqe {
            opcode: admin::GET_LOG_PAGE,
            nsid: 0,
            cdw10: 0x03ff_800c,
            ..Sqe::default()
        },
        4096,
    );
    assert!(s.is_success(), "{s}");
    assert_eq!(d[32], 1);
}

#[test]
fn a_stalled_host_holds_only_its_share_of_the_pool() {
    let h = Harness::start();
    // The harness pool: 512 chunks of 4 KiB; a queue's share is an eighth (64 chunks).
    let share = 512 / 8;
    let (_a, mut stalled) = io_queue(&h, NONE);
    // 64 reads of 128 KiB (8 MiB) queued, and no response ever read.
    for i in 0..64u64 {
        let mut r = rw(io::READ, i * 32, 32);
        r.cid = 1000 + i as u16;
        r.flags = 1 << 6;
        r.set_sgl(duplex_nvme::cmd::Sgl {
            address: 0,
            length: 128 * 1024,
            id: duplex_nvme::spec::sgl::TRANSPORT_DATA_BLOCK,
        });
        stalled.raw(&tcp::capsule_cmd(&r, 0, NONE, 0));
    }
    // Another host is served meanwhile, and the stalled one never holds more than its share.
    let (_b, mut other) = io_queue(&h, NONE);
    // Read data goes from the pool to the socket, and its chain is freed just after the send:
    // the other host may already hold its 64 KiB (16 chunks) when we look.
    let limit = share + 16;
    for round in 0..20u8 {
        assert!(h.pool_in_use() <= limit, "pool in use: {}", h.pool_in_use());
        let data = pattern(round, 64 * 1024);
        let mut w = rw(io::WRITE, 4000 % BLOCKS, 16);
        w.cid = other.cid();
        assert!(other
            .command(w, Some(&data), false, 0)
            .0
            .status()
            .is_success());
        let mut r = rw(io::READ, 4000 % BLOCKS, 16);
        r.cid = other.cid();
        let (c, d) = other.command(r, None, false, 64 * 1024);
        assert!(c.status().is_success());
        assert!(d == data, "round {round}");
    }
    assert!(h.pool_in_use() <= limit, "pool in use: {}", h.pool_in_use());
    // Once the stalled host reads, every one of its reads completes.
    let mut done = 0;
    while done < 64 {
        let p = stalled.read_pdu().expect("pdu");
        if p.pdu_type == PduType::CapsuleResp {
            let cqe: duplex_nvme::cmd::Cqe =
                bytemuck::cast(<[u8; 16]>::try_from(&p.header[8..24]).expect("cqe"));
            assert!(cqe.status().is_success());
            done += 1;
        }
    }
}

/// A write pulled with R2T whose host sends part of the data and goes away: the chain the
/// data was going into returns to the pool (a hostile host cannot leak the pool this way).
#[test]
fn a_host_that_vanishes_mid_transfer_leaves_no_buffer_behind() {
    let h = Harness::start();
    for round in 0..4u16 {
        let (a, mut q) = io_queue(&h, NONE);
        let mut w = rw(io::WRITE, 0, 32);
        w.cid = 7 + round;
        w.flags = 1 << 6;
        w.set_sgl(duplex_nvme::cmd::Sgl {
            address: 0,
            length: 128 * 1024,
            id: duplex_nvme::spec::sgl::TRANSPORT_DATA_BLOCK,
        });
        q.raw(&tcp::capsule_cmd(&w, 0, NONE, 0));
        let p = q.read_pdu().expect("R2T");
        assert_eq!(p.pdu_type, PduType::R2T);
        let r = tcp::parse_r2t(&p.header).expect("r2t");
        let d = tcp::DataHeader {
            cccid: r.cccid,
            ttag: r.ttag,
            datao: 0,
            datal: 8192,
        };
        let mut p = tcp::data_pdu(PduType::H2CData, &d, 0, NONE, 0);
        p.extend_from_slice(&[5u8; 8192]);
        q.raw(&p);
        assert!(h.pool_in_use() <= 32, "pool in use: {}", h.pool_in_use());
        drop((a, q));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.pool_in_use() != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(h.pool_in_use(), 0, "chains left behind by vanished hosts");
}
