//! The byte offsets of `docs/ONDISK.md`, written here as literals independently of the code's
//! constants: each test encodes a structure and reads its fields back at the documented
//! offsets, so the document and the code cannot drift apart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use duplex_ondisk::records::{decode_records, Record};
use duplex_ondisk::{Heartbeat, MemberState, MetadataImage, RaidLevel, Role, SuperblockCopy, Uuid};

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
fn crc_zeroed(b: &[u8], at: usize) -> u32 {
    let mut c = b.to_vec();
    c[at..at + 4].fill(0);
    crc32c::crc32c(&c)
}

const MIB: u64 = 1 << 20;

#[test]
fn layout_of_a_one_gib_drive() {
    let l = layout();
    assert_eq!(l.capacity_bytes, 1 << 30);
    assert_eq!(l.block_size, 4096);
    assert_eq!(l.heartbeat_offset, 4096);
    assert_eq!(l.heartbeat_slot_size, 4096);
    assert_eq!(l.heartbeat_slots, 4);
    assert_eq!(l.metadata_offset, MIB);
    assert_eq!(l.metadata_slot_size, 2 * MIB as u32);
    assert_eq!(l.metadata_slots, 8);
    assert_eq!(l.journal_offset, 17 * MIB);
    assert_eq!(l.journal_size, 64 * MIB);
    // A parity pool's stripe journal ring: after the bitmap's 16 MiB of the journal area.
    assert_eq!(l.stripe_journal(), Some((33 * MIB, 16 * MIB)));
    assert_eq!(l.data_offset, 81 * MIB);
    // The secondary superblock is the last 4 KiB; the data area ends at the 1 MiB boundary
    // below it.
    assert_eq!(l.secondary_offset, (1 << 30) - 4096);
    assert_eq!(l.data_end(), 1023 * MIB);
    assert_eq!(l.data_size, (1023 - 81) * MIB);
    assert_eq!(l.metadata_slot_offset(0), Some(MIB));
    assert_eq!(l.metadata_slot_offset(7), Some(15 * MIB));
    assert_eq!(l.metadata_slot_offset(8), None);
    assert_eq!(l.heartbeat_slot_offset(3), Some(4 * 4096));
    assert_eq!(l.heartbeat_slot_offset(4), None);
    assert_eq!(l.next_metadata_slot(7), 0);
}

#[test]
fn minimum_capacity_is_82_mib_and_4_kib() {
    let min = 82 * MIB + 4096;
    assert_eq!(duplex_ondisk::layout::MIN_CAPACITY, min);
    let l = duplex_ondisk::Layout::for_drive(min, 512).unwrap();
    assert_eq!(l.data_size, MIB);
    assert_eq!(l.secondary_offset, 82 * MIB);
    assert!(duplex_ondisk::Layout::for_drive(min - 512, 512).is_err());
}

#[test]
fn superblock_fields_are_where_the_document_says() {
    let sb = duplex_ondisk::Superblock {
        member_slot: 0x0102_0304,
        role: Role::Spare,
        state: MemberState::Rebuilding { position: 0x1122 },
        generation: 0x0a0b_0c0d_0e0f_1011,
        epoch: 0x2122_2324_2526_2728,
        owner_node: 3,
        copy: SuperblockCopy::Secondary,
        ..superblock(uuid(0xd7, 1), 5, SuperblockCopy::Primary)
    };
    let b = sb.encode();
    assert_eq!(b.len(), 4096);
    assert_eq!(&b[0..8], b"DPLXSB01");
    assert_eq!(u32_at(&b[..], 8), 1);
    assert_eq!(u32_at(&b[..], 12), 0x0102_0304);
    assert_eq!(&b[16..32], &CLUSTER.0);
    assert_eq!(&b[32..48], &POOL.0);
    assert_eq!(&b[48..64], &uuid(0xd7, 1).0);
    assert_eq!(b[64], 3, "role spare");
    assert_eq!(b[65], 3, "state rebuilding");
    assert_eq!(b[66], 2, "copy secondary");
    assert_eq!(b[67], 0);
    assert_eq!(u32_at(&b[..], 68), 3);
    assert_eq!(u64_at(&b[..], 72), 0x1122);
    assert_eq!(u64_at(&b[..], 80), 0x0a0b_0c0d_0e0f_1011);
    assert_eq!(u64_at(&b[..], 88), 0x2122_2324_2526_2728);
    assert!(b[96..128].iter().all(|&x| x == 0));
    let l = layout();
    assert_eq!(u64_at(&b[..], 128), l.capacity_bytes);
    assert_eq!(u32_at(&b[..], 136), l.block_size);
    assert_eq!(u32_at(&b[..], 140), l.heartbeat_slots);
    assert_eq!(u64_at(&b[..], 144), l.heartbeat_offset);
    assert_eq!(u32_at(&b[..], 152), l.heartbeat_slot_size);
    assert_eq!(u32_at(&b[..], 156), l.metadata_slots);
    assert_eq!(u64_at(&b[..], 160), l.metadata_offset);
    assert_eq!(u32_at(&b[..], 168), l.metadata_slot_size);
    assert_eq!(u32_at(&b[..], 172), 0);
    assert_eq!(u64_at(&b[..], 176), l.journal_offset);
    assert_eq!(u64_at(&b[..], 184), l.journal_size);
    assert_eq!(u64_at(&b[..], 192), l.data_offset);
    assert_eq!(u64_at(&b[..], 200), l.data_size);
    assert_eq!(u64_at(&b[..], 208), l.secondary_offset);
    assert!(b[216..4092].iter().all(|&x| x == 0));
    assert_eq!(u32_at(&b[..], 4092), crc_zeroed(&b[..], 4092));
}

#[test]
fn state_role_and_copy_codes() {
    for (role, code) in [(Role::Data, 1), (Role::Parity, 2), (Role::Spare, 3)] {
        let b = duplex_ondisk::Superblock {
            role,
            ..superblock(uuid(1, 1), 0, SuperblockCopy::Primary)
        }
        .encode();
        assert_eq!(b[64], code);
        assert_eq!(b[66], 1);
    }
    for (state, code) in [(MemberState::Active, 1), (MemberState::Failed, 2)] {
        let b = duplex_ondisk::Superblock {
            state,
            ..superblock(uuid(1, 1), 0, SuperblockCopy::Primary)
        }
        .encode();
        assert_eq!(b[65], code);
        assert_eq!(u64_at(&b[..], 72), 0);
    }
}

#[test]
fn heartbeat_fields_are_where_the_document_says() {
    let hb = Heartbeat {
        node_id: 2,
        boot_id: uuid(0xbb, 1),
        epoch: 0x0102_0304_0506_0708,
        counter: 0x1112_1314_1516_1718,
        peer_boot_id: uuid(0xbc, 2),
        peer_counter: 0x2122_2324_2526_2728,
    };
    let b = hb.encode();
    assert_eq!(&b[0..8], b"DPLXHB01");
    assert_eq!(u32_at(&b[..], 8), 1);
    assert_eq!(u32_at(&b[..], 12), 2);
    assert_eq!(&b[16..32], &uuid(0xbb, 1).0);
    assert_eq!(u64_at(&b[..], 32), 0x0102_0304_0506_0708);
    assert_eq!(u64_at(&b[..], 40), 0x1112_1314_1516_1718);
    assert_eq!(&b[48..64], &uuid(0xbc, 2).0);
    assert_eq!(u64_at(&b[..], 64), 0x2122_2324_2526_2728);
    assert!(b[72..4092].iter().all(|&x| x == 0));
    assert_eq!(u32_at(&b[..], 4092), crc_zeroed(&b[..], 4092));
}

#[test]
fn image_header_fields_are_where_the_document_says() {
    let image = MetadataImage {
        slot_index: 5,
        generation: 0x0102_0304_0506_0708,
        epoch: 9,
        writer_node: 1,
        config: duplex_ondisk::PoolConfig {
            ownership: duplex_ondisk::Ownership {
                owner_node: 1,
                epoch: 9,
            },
            ..config(RaidLevel::Raid1, 2)
        },
    };
    let b = image.encode(2 << 20).unwrap();
    assert_eq!(b.len() % 4096, 0);
    assert_eq!(&b[0..8], b"DPLXMD01");
    assert_eq!(u32_at(&b, 8), 1);
    assert_eq!(u32_at(&b, 12), 5);
    assert_eq!(&b[16..32], &POOL.0);
    assert_eq!(u64_at(&b, 32), 0x0102_0304_0506_0708);
    assert_eq!(u64_at(&b, 40), 9);
    assert_eq!(u32_at(&b, 48), 1);
    let body_len = u32_at(&b, 52) as usize;
    let body = &b[128..128 + body_len];
    assert_eq!(u32_at(&b, 56), crc32c::crc32c(body));
    assert!(b[60..124].iter().all(|&x| x == 0));
    assert_eq!(u32_at(&b, 124), crc_zeroed(&b[..128], 124));
    assert!(b[128 + body_len..].iter().all(|&x| x == 0), "zero padding");

    // The body's first record is the pool record: type 1, flags must-understand, length, then
    // name (u16 length + UTF-8), uuid, raid level, chunk size, data bytes, member count,
    // members of 37 bytes each.
    assert_eq!(u16_at(body, 0), 1);
    assert_eq!(u16_at(body, 2), 1);
    let len = u32_at(body, 4) as usize;
    let p = &body[8..8 + len];
    assert_eq!(u16_at(p, 0), 5);
    assert_eq!(&p[2..7], b"pool0");
    assert_eq!(&p[7..23], &POOL.0);
    assert_eq!(p[23], 1, "RAID 1");
    assert_eq!(u32_at(p, 24), 64 * 1024);
    assert_eq!(u64_at(p, 28), layout().data_size);
    assert_eq!(u16_at(p, 36), 2);
    let m1 = &p[38 + 37..38 + 74];
    assert_eq!(&m1[0..16], &drive_uuid(1).0);
    assert_eq!(u32_at(m1, 16), 1);
    assert_eq!(m1[20], 1, "active");
    assert_eq!(u64_at(m1, 21), 0);
    assert_eq!(u64_at(m1, 29), 1);
    assert_eq!(len, 38 + 2 * 37);

    // Then ownership (type 2: node u32, epoch u64) and cluster config (type 3: u64).
    let o = &body[8 + len..];
    assert_eq!((u16_at(o, 0), u16_at(o, 2), u32_at(o, 4)), (2, 1, 12));
    assert_eq!((u32_at(o, 8), u64_at(o, 12)), (1, 9));
    let c = &o[20..];
    assert_eq!((u16_at(c, 0), u32_at(c, 4), u64_at(c, 8)), (3, 8, 1));

    // Record types in canonical order.
    let types: Vec<&str> = decode_records(body)
        .unwrap()
        .iter()
        .map(|r| match r {
            Record::Pool(_) => "pool",
            Record::Ownership(_) => "ownership",
            Record::ClusterConfig { .. } => "cluster",
            Record::Subsystem(_) => "subsystem",
            Record::Volume(_) => "volume",
            Record::Namespace(_) => "namespace",
            Record::Spare(_) => "spare",
            Record::WriteSeq { .. } => "write seq",
            Record::ChecksumArea(_) => "checksum area",
            Record::Reservation(_) => "reservation",
            Record::HostSecret(_) => "host secret",
            Record::Skipped { .. } => "skipped",
        })
        .collect();
    assert_eq!(
        types,
        [
            "pool",
            "ownership",
            "cluster",
            "subsystem",
            "volume",
            "volume",
            "namespace",
            "namespace"
        ]
    );
}

#[test]
fn volume_subsystem_and_namespace_payloads() {
    let cfg = config(RaidLevel::Raid1, 2);
    let body = cfg.encode_body().unwrap();
    // Walk the records by their headers.
    let mut at = 0;
    let mut payloads = Vec::new();
    while at < body.len() {
        let t = u16_at(&body, at);
        let len = u32_at(&body, at + 4) as usize;
        payloads.push((t, body[at + 8..at + 8 + len].to_vec()));
        at += 8 + len;
    }
    let sub = &payloads[3];
    assert_eq!(sub.0, 4);
    let s = &sub.1;
    let nqn_len = u16_at(s, 0) as usize;
    assert_eq!(&s[2..2 + nqn_len], SUBSYS.as_bytes());
    let mut o = 2 + nqn_len;
    assert_eq!(s[o], 0, "allow_any_host false");
    o += 1;
    let serial_len = u16_at(s, o) as usize;
    assert_eq!(&s[o + 2..o + 2 + serial_len], b"DPLX0001");
    o += 2 + serial_len;
    let model_len = u16_at(s, o) as usize;
    assert_eq!(&s[o + 2..o + 2 + model_len], b"duplex");
    o += 2 + model_len;
    assert_eq!(u16_at(s, o), 1, "one host");

    let vol = &payloads[4];
    assert_eq!(vol.0, 5);
    let v = &vol.1;
    assert_eq!(u16_at(v, 0), 4);
    assert_eq!(&v[2..6], b"vol0");
    assert_eq!(&v[6..22], &uuid(0xa0, 0).0);
    assert_eq!(&v[22..38], &uuid(0xa1, 0).0);
    assert_eq!(u64_at(v, 38), 1000);
    assert_eq!(u32_at(v, 46), 4096);
    assert_eq!(u32_at(v, 50), 0);
    assert_eq!(&v[54..70], &Uuid::NIL.0);
    assert_eq!(u32_at(v, 70), 2);
    assert_eq!((u64_at(v, 74), u64_at(v, 82), u64_at(v, 90)), (0, 0, 600));
    assert_eq!(
        (u64_at(v, 98), u64_at(v, 106), u64_at(v, 114)),
        (600, 2000, 400)
    );
    assert_eq!(v.len(), 122);

    let ns = &payloads[6];
    assert_eq!(ns.0, 6);
    let n = &ns.1;
    let l = u16_at(n, 0) as usize;
    assert_eq!(&n[2..2 + l], SUBSYS.as_bytes());
    assert_eq!(u32_at(n, 2 + l), 1);
    assert_eq!(&n[6 + l..22 + l], &uuid(0xa0, 0).0);
    assert_eq!(u32_at(n, 22 + l), 1);
    assert_eq!(n.len(), 26 + l);
}

/// A spare record: type 7, must-understand, the drive UUID (16 bytes), after the namespaces.
#[test]
fn a_spare_record_is_its_drive_uuid_last() {
    let mut cfg = config(RaidLevel::Raid5, 3);
    cfg.spares = vec![drive_uuid(7)];
    let body = cfg.encode_body().expect("encodes");
    let tail = &body[body.len() - 24..];
    assert_eq!(
        (u16_at(tail, 0), u16_at(tail, 2), u32_at(tail, 4)),
        (7, 1, 16)
    );
    assert_eq!(&tail[8..24], &drive_uuid(7).0);
    assert!(matches!(
        decode_records(&body).expect("decodes").last(),
        Some(Record::Spare(d)) if *d == drive_uuid(7)
    ));
    // A member listed as a spare too, or a spare twice, is refused.
    let mut bad = config(RaidLevel::Raid5, 3);
    bad.spares = vec![drive_uuid(1)];
    assert!(bad.encode_body().is_err());
    bad.spares = vec![drive_uuid(7), drive_uuid(7)];
    assert!(bad.encode_body().is_err());
}

/// A write sequence record: type 8, must-understand, the mark (u64), last; absent when the mark
/// is 0; twice in one body is refused; a body without one decodes with mark 0.
#[test]
fn a_write_sequence_record_is_the_mark_last() {
    let mut cfg = config(RaidLevel::Raid1, 2);
    let without = cfg.encode_body().expect("encodes");
    assert_eq!(
        duplex_ondisk::PoolConfig::decode_body(&without)
            .expect("decodes")
            .write_seq_mark,
        0
    );
    cfg.spares = vec![drive_uuid(7)];
    cfg.write_seq_mark = 0x0102_0304_0506_0708;
    let body = cfg.encode_body().expect("encodes");
    let tail = &body[body.len() - 16..];
    assert_eq!(
        (u16_at(tail, 0), u16_at(tail, 2), u32_at(tail, 4)),
        (8, 1, 8)
    );
    assert_eq!(u64_at(tail, 8), 0x0102_0304_0506_0708);
    let back = duplex_ondisk::PoolConfig::decode_body(&body).expect("decodes");
    assert_eq!(back.write_seq_mark, 0x0102_0304_0506_0708);
    assert_eq!(back, cfg);
    let mut twice = body.clone();
    twice.extend_from_slice(tail);
    let e = duplex_ondisk::PoolConfig::decode_body(&twice).expect_err("refused");
    assert!(e.to_string().contains("Write sequence record"), "{e}");
    // A reader that did not know type 8 would refuse the image (must-understand), never number
    // writes from 1 over a pool numbered higher.
    assert_eq!(u16_at(tail, 2) & 1, 1);
}

/// A checksum area record: type 9, must-understand, payload 18 bytes — area offset (u64) at 0,
/// area length (u64) at 8, entry bytes (u16, 16) at 16 — last, after the write sequence.
#[test]
fn a_checksum_area_record_is_offset_length_entry_bytes_last() {
    let mut cfg = config(RaidLevel::Raid1, 2);
    // A 1 GiB drive's 942 MiB data area with 64 KiB chunks: 14615 chunks of data, then
    // 16 bytes per 512 of them (7307.5 × 4 KiB, rounded up to 7308 × 4 KiB) from 81 MiB +
    // 14615 × 64 KiB.
    cfg.pool.member_data_bytes = 14615 * 64 * 1024;
    cfg.write_seq_mark = 77;
    cfg.checksum_area = Some(duplex_ondisk::ChecksumArea {
        offset: 81 * MIB + 14615 * 64 * 1024,
        len: 7308 * 4096,
    });
    let body = cfg.encode_body().expect("encodes");
    let tail = &body[body.len() - 26..];
    assert_eq!(
        (u16_at(tail, 0), u16_at(tail, 2), u32_at(tail, 4)),
        (9, 1, 18)
    );
    assert_eq!(u64_at(tail, 8), 1_042_743_296);
    assert_eq!(u64_at(tail, 16), 29_933_568);
    assert_eq!(u16_at(tail, 24), 16);
    // The write sequence record just before it.
    let seq = &body[body.len() - 26 - 16..body.len() - 26];
    assert_eq!((u16_at(seq, 0), u64_at(seq, 8)), (8, 77));
    let back = duplex_ondisk::PoolConfig::decode_body(&body).expect("decodes");
    assert_eq!(back, cfg);
    // The same split as pool creation makes.
    assert_eq!(
        duplex_ondisk::checksum_split(layout().data_size, 64 * 1024),
        Some((14615 * 64 * 1024, 7308 * 4096))
    );
}

/// A reservation record: type 10, must-understand, last (after the checksum area). Payload:
/// subsystem NQN (u16 length + UTF-8) to `s`, then nsid (u32) at s, version (u64) at s+4,
/// generation (u32) at s+12, type (u8) at s+16, flags (u8, bit 0 PTPL) at s+17, holder (16) at
/// s+18, registrant count (u16) at s+34, and from s+36 registrants of 26 bytes: host
/// identifier (16) at +0, key (u64) at +16, controller id (u16) at +24.
#[test]
fn a_reservation_record_is_its_fields_at_the_documented_offsets() {
    let mut cfg = config(RaidLevel::Raid1, 2);
    cfg.write_seq_mark = 77;
    let r = duplex_ondisk::Reservation {
        subnqn: SUBSYS.to_string(),
        nsid: 2,
        version: 0x0102_0304_0506_0708,
        generation: 0x1112_1314,
        rtype: 3,
        ptpl: true,
        holder: [0x22; 16],
        registrants: vec![
            duplex_ondisk::ReservationRegistrant {
                host_id: [0x11; 16],
                key: 0x2122_2324_2526_2728,
                cntlid: 0x3132,
            },
            duplex_ondisk::ReservationRegistrant {
                host_id: [0x22; 16],
                key: 0x4142_4344_4546_4748,
                cntlid: 0x5152,
            },
        ],
    };
    cfg.reservations = vec![r];
    let body = cfg.encode_body().expect("encodes");
    // Walk the records by their headers: the reservation is the last, after the write sequence.
    let mut at = 0;
    let mut records = Vec::new();
    while at < body.len() {
        let len = u32_at(&body, at + 4) as usize;
        records.push((
            u16_at(&body, at),
            u16_at(&body, at + 2),
            body[at + 8..at + 8 + len].to_vec(),
        ));
        at += 8 + len;
    }
    assert_eq!(at, body.len());
    let types: Vec<u16> = records.iter().map(|r| r.0).collect();
    assert_eq!(types, [1, 2, 3, 4, 5, 5, 6, 6, 8, 10]);
    let (t, flags, p) = records.last().unwrap();
    assert_eq!((*t, *flags), (10, 1), "type 10, must-understand");
    let l = SUBSYS.len();
    let s = 2 + l;
    assert_eq!(p.len(), s + 36 + 2 * 26);
    assert_eq!(u16_at(p, 0) as usize, l);
    assert_eq!(&p[2..s], SUBSYS.as_bytes());
    assert_eq!(u32_at(p, s), 2);
    assert_eq!(u64_at(p, s + 4), 0x0102_0304_0506_0708);
    assert_eq!(u32_at(p, s + 12), 0x1112_1314);
    assert_eq!(p[s + 16], 3, "Write Exclusive - Registrants Only");
    assert_eq!(p[s + 17], 1, "PTPL");
    assert_eq!(&p[s + 18..s + 34], &[0x22; 16]);
    assert_eq!(u16_at(p, s + 34), 2);
    let e0 = &p[s + 36..s + 62];
    assert_eq!(&e0[0..16], &[0x11; 16]);
    assert_eq!(u64_at(e0, 16), 0x2122_2324_2526_2728);
    assert_eq!(u16_at(e0, 24), 0x3132);
    let e1 = &p[s + 62..s + 88];
    assert_eq!(&e1[0..16], &[0x22; 16]);
    assert_eq!(u64_at(e1, 16), 0x4142_4344_4546_4748);
    assert_eq!(u16_at(e1, 24), 0x5152);
    // The same, read back.
    assert_eq!(
        duplex_ondisk::PoolConfig::decode_body(&body).expect("decodes"),
        cfg
    );

    // PTPL off is flags 0; no reservation is type 0 with an all-zero holder.
    cfg.reservations[0].ptpl = false;
    cfg.reservations[0].rtype = 0;
    cfg.reservations[0].holder = [0; 16];
    let body = cfg.encode_body().expect("encodes");
    let p = &body[body.len() - (s + 88)..];
    assert_eq!((p[s + 16], p[s + 17]), (0, 0));
    assert!(p[s + 18..s + 34].iter().all(|&x| x == 0));
}
