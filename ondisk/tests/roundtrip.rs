//! Round trips: every structure decodes to what was encoded (and an image without reservation
//! state is byte for byte what it was before record 10).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use duplex_ondisk::records::{decode_records, pool_capacity_bytes, Record};
use duplex_ondisk::{
    Heartbeat, Layout, MemberState, MetadataImage, PoolConfig, RaidLevel, Reservation,
    ReservationRegistrant, Role, Superblock, SuperblockCopy, Uuid,
};
use proptest::prelude::*;

#[test]
fn superblock_round_trips_in_every_role_state_and_copy() {
    for role in [Role::Data, Role::Parity, Role::Spare] {
        for state in [
            MemberState::Active,
            MemberState::Failed,
            MemberState::Rebuilding { position: 0 },
            MemberState::Rebuilding { position: 12345 },
        ] {
            for copy in [SuperblockCopy::Primary, SuperblockCopy::Secondary] {
                let sb = Superblock {
                    role,
                    state,
                    copy,
                    generation: 77,
                    epoch: 3,
                    owner_node: 1,
                    ..superblock(uuid(0xd0, 9), 4, copy)
                };
                assert_eq!(Superblock::parse(&sb.encode()[..]).unwrap(), sb);
                assert_eq!(Superblock::parse(&sb.encode_vec()).unwrap(), sb);
            }
        }
    }
}

#[test]
fn superblock_parse_ignores_bytes_past_4096_and_reserved_bytes() {
    let sb = superblock(uuid(0xd0, 1), 0, SuperblockCopy::Primary);
    let mut b = sb.encode_vec();
    b.extend_from_slice(&[0xff; 100]);
    assert_eq!(Superblock::parse(&b).unwrap(), sb);
    // A later writer of version 1 that uses reserved bytes (with a correct CRC) is read.
    let mut b = sb.encode_vec();
    b[1000] = 0xab;
    b[97] = 0x01;
    b[4092..].fill(0);
    let crc = crc32c::crc32c(&b);
    b[4092..].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(Superblock::parse(&b).unwrap(), sb);
}

#[test]
fn heartbeat_round_trips() {
    for node_id in 0..4 {
        let hb = Heartbeat {
            node_id,
            boot_id: uuid(1, node_id as u8),
            epoch: u64::MAX,
            counter: 1 << 40,
            peer_boot_id: Uuid::NIL,
            peer_counter: 0,
        };
        assert_eq!(Heartbeat::parse(&hb.encode()[..]).unwrap(), hb);
    }
}

#[test]
fn layouts_validate_for_many_capacities_and_both_block_sizes() {
    for block in [512u32, 4096] {
        for cap in [
            duplex_ondisk::layout::MIN_CAPACITY,
            100 << 20,
            (1 << 30) + 512 * 7,
            1 << 40,
            (16u64 << 40) + 4096 * 3,
        ] {
            let cap = cap / u64::from(block) * u64::from(block);
            let Ok(l) = Layout::for_drive(cap, block) else {
                continue;
            };
            l.validate().unwrap();
            for v in [
                l.heartbeat_offset,
                l.metadata_offset,
                l.journal_offset,
                l.data_offset,
                l.data_size,
                l.secondary_offset,
            ] {
                assert_eq!(v % 4096, 0);
                assert_eq!(v % u64::from(block), 0);
            }
            assert_eq!(l.data_offset % (1 << 20), 0);
            assert_eq!(l.data_end() % (1 << 20), 0);
            assert!(l.data_end() <= l.secondary_offset);
            assert!(l.secondary_offset + 4096 <= cap);
            assert!(cap - (l.secondary_offset + 4096) < 4096);
        }
    }
}

#[test]
fn image_round_trips() {
    for (level, n) in [
        (RaidLevel::Raid0, 1),
        (RaidLevel::Raid0, 3),
        (RaidLevel::Raid1, 2),
        (RaidLevel::Raid10, 4),
        (RaidLevel::Raid10, 6),
    ] {
        let mut cfg = config(level, n);
        cfg.pool.members[0].state = MemberState::Rebuilding { position: 99 };
        cfg.subsystems.push(duplex_ondisk::Subsystem {
            nqn: "nqn.2024-01.io.duplex:open".to_string(),
            allow_any_host: true,
            hosts: vec![],
            serial: String::new(),
            model: "model with spaces".to_string(),
        });
        cfg.volumes[1].parent = cfg.volumes[0].uuid;
        cfg.volumes[1].block_size = 512;
        cfg.volumes[1].extents[0].pool_block = 8 * 600; // pool blocks are in its block size
        let image = MetadataImage {
            slot_index: 7,
            generation: 1 << 50,
            epoch: 1,
            writer_node: 3,
            config: cfg,
        };
        let bytes = image.encode(2 << 20).unwrap();
        assert_eq!(MetadataImage::parse(&bytes).unwrap(), image);
        // Padding and whatever follows in the slot are not read.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0xee; 8192]);
        assert_eq!(MetadataImage::parse(&longer).unwrap(), image);
        // The header alone.
        let h = duplex_ondisk::ImageHeader::parse(&bytes).unwrap();
        assert_eq!(h.stamp(), image.stamp());
        assert_eq!(h.pool_uuid, POOL);
    }
}

#[test]
fn unicode_names_round_trip() {
    let mut cfg = config(RaidLevel::Raid1, 2);
    cfg.pool.name = "pöol-日本".to_string();
    cfg.volumes[0].name = "é".repeat(32); // 64 bytes: the limit
    let body = cfg.encode_body().unwrap();
    assert_eq!(PoolConfig::decode_body(&body).unwrap(), cfg);
}

#[test]
fn records_decode_to_the_config() {
    let cfg = config(RaidLevel::Raid10, 4);
    let recs = decode_records(&cfg.encode_body().unwrap()).unwrap();
    assert!(matches!(&recs[0], Record::Pool(p) if *p == cfg.pool));
    assert!(matches!(&recs[1], Record::Ownership(o) if *o == cfg.ownership));
    assert!(matches!(recs[2], Record::ClusterConfig { generation: 1 }));
    assert_eq!(recs.len(), 3 + 1 + 2 + 2);
}

#[test]
fn capacity_helper() {
    let mib = 1u64 << 20;
    let data = 10 * mib + 4096; // rounds down to 10 MiB of 1 MiB chunks
    assert_eq!(
        pool_capacity_bytes(RaidLevel::Raid0, 3, data, 1 << 20).unwrap(),
        30 * mib
    );
    assert_eq!(
        pool_capacity_bytes(RaidLevel::Raid1, 3, data, 1 << 20).unwrap(),
        10 * mib
    );
    assert_eq!(
        pool_capacity_bytes(RaidLevel::Raid10, 6, data, 1 << 20).unwrap(),
        30 * mib
    );
    assert_eq!(
        pool_capacity_bytes(RaidLevel::Raid1, 2, data, 4096).unwrap(),
        data
    );
    assert!(pool_capacity_bytes(RaidLevel::Raid10, 3, data, 4096).is_err());
    assert!(pool_capacity_bytes(RaidLevel::Raid10, 2, data, 4096).is_err());
    assert!(pool_capacity_bytes(RaidLevel::Raid1, 2, data, 3000).is_err());
    assert!(pool_capacity_bytes(RaidLevel::Raid1, 2, data, 2 << 20).is_err());
    assert!(pool_capacity_bytes(RaidLevel::Raid1, 2, 4095, 4096).is_err());
    assert!(pool_capacity_bytes(RaidLevel::Raid0, 0, data, 4096).is_err());
}

/// Every reservation type, with Persist Through Power Loss on and off, with registrants (and
/// without, where the type allows it), two namespaces' states in one image: decodes to what
/// was encoded, on its own and in a whole image, as records of type 10 after every other.
#[test]
fn reservations_round_trip_in_every_type_with_and_without_ptpl() {
    for rtype in 0..=6u8 {
        for ptpl in [false, true] {
            let mut cfg = config(RaidLevel::Raid1, 2);
            let mut other = reservation(2, 0, !ptpl);
            other.version = u64::MAX;
            other.generation = u32::MAX;
            other.registrants[0].key = 0;
            other.registrants[1].cntlid = u16::MAX;
            cfg.reservations = vec![reservation(1, rtype, ptpl), other];
            let body = cfg.encode_body().unwrap();
            assert_eq!(PoolConfig::decode_body(&body).unwrap(), cfg);
            let recs = decode_records(&body).unwrap();
            assert_eq!(recs.len(), 3 + 1 + 2 + 2 + 2);
            assert_eq!(recs[8], Record::Reservation(cfg.reservations[0].clone()));
            assert_eq!(recs[9], Record::Reservation(cfg.reservations[1].clone()));
            let image = MetadataImage {
                slot_index: 2,
                generation: 9,
                epoch: 1,
                writer_node: 1,
                config: cfg.clone(),
            };
            let bytes = image.encode(2 << 20).unwrap();
            assert_eq!(MetadataImage::parse(&bytes).unwrap(), image);
        }
    }
    // No reservation held, nobody registered: a state worth keeping only for its generation
    // and PTPL setting.
    let mut cfg = config(RaidLevel::Raid1, 2);
    let mut empty = reservation(1, 0, true);
    empty.registrants.clear();
    cfg.reservations = vec![empty];
    let body = cfg.encode_body().unwrap();
    assert_eq!(PoolConfig::decode_body(&body).unwrap(), cfg);
}

/// The most registrants a namespace keeps, with the other records of every type.
#[test]
fn a_reservation_with_64_registrants_round_trips_with_every_record() {
    let mut cfg = config(RaidLevel::Raid5, 3);
    cfg.spares = vec![drive_uuid(7)];
    cfg.write_seq_mark = 1 << 24;
    let l = layout();
    let (data, len) = duplex_ondisk::checksum_split(l.data_size, cfg.pool.chunk_size).unwrap();
    cfg.pool.member_data_bytes = data;
    cfg.checksum_area = Some(duplex_ondisk::ChecksumArea {
        offset: l.data_offset + data,
        len,
    });
    let mut r = reservation(2, 6, true);
    r.registrants = (1..=64).map(registrant).collect();
    assert_eq!(
        r.registrants.len(),
        duplex_ondisk::MAX_RESERVATION_REGISTRANTS
    );
    cfg.reservations = vec![r];
    let body = cfg.encode_body().unwrap();
    assert_eq!(PoolConfig::decode_body(&body).unwrap(), cfg);
    assert!(matches!(
        decode_records(&body).unwrap().last(),
        Some(Record::Reservation(r)) if r.registrants.len() == 64
    ));
}

/// An image without reservation state is byte for byte what the code wrote before record 10
/// existed (length and CRC-32C of the bodies, taken from that code), so pools that never saw a
/// reservation are read and written by older software as before.
#[test]
fn a_pool_without_reservations_encodes_as_before_record_10() {
    let cfg = config(RaidLevel::Raid1, 2);
    assert!(cfg.reservations.is_empty());
    let body = cfg.encode_body().unwrap();
    assert_eq!((body.len(), crc32c::crc32c(&body)), (609, 0x8230_56e1));
    assert!(!decode_records(&body)
        .unwrap()
        .iter()
        .any(|r| matches!(r, Record::Reservation(_))));
    // With every other optional record too.
    let mut cfg = config(RaidLevel::Raid5, 3);
    cfg.spares = vec![drive_uuid(7)];
    cfg.write_seq_mark = 1 << 24;
    let l = layout();
    let (data, len) = duplex_ondisk::checksum_split(l.data_size, cfg.pool.chunk_size).unwrap();
    cfg.pool.member_data_bytes = data;
    cfg.checksum_area = Some(duplex_ondisk::ChecksumArea {
        offset: l.data_offset + data,
        len,
    });
    let body = cfg.encode_body().unwrap();
    assert_eq!((body.len(), crc32c::crc32c(&body)), (712, 0x5cee_087e));
    assert_eq!(PoolConfig::decode_body(&body).unwrap().reservations, vec![]);
}

/// Record 11: a host's sealed secrets round trip, and the rules: only for an allowed host,
/// once per host, a sealed blob of the known version.
#[test]
fn host_secrets_round_trip_and_follow_their_rules() {
    use duplex_ondisk::records::HostSecret;
    use duplex_ondisk::secrets::{seal, unseal, HostKeys, SecretsKey};
    let key = SecretsKey::from_bytes([3; 32]);
    let host = "nqn.2014-08.org.nvmexpress:uuid:host-1";
    let mut cfg = config(RaidLevel::Raid1, 2);
    let keys = HostKeys {
        dhchap: Some("DHHC-1:00:x:".into()),
        tls_psk: Some("NVMeTLSkey-1:01:y:".into()),
        ..HostKeys::default()
    };
    let sealed = seal(&key, SUBSYS, host, &keys, [1; 12]);
    cfg.host_secrets = vec![HostSecret {
        subnqn: SUBSYS.into(),
        hostnqn: host.into(),
        sealed: sealed.clone(),
    }];
    let body = cfg.encode_body().unwrap();
    assert!(
        !body.windows(6).any(|w| w == b"DHHC-1"),
        "no secret in clear text on the drives"
    );
    let back = PoolConfig::decode_body(&body).unwrap();
    assert_eq!(back, cfg);
    assert_eq!(
        unseal(&key, SUBSYS, host, &back.host_secrets[0].sealed).unwrap(),
        keys
    );
    // A host not on the allow-list, a second record, a blob of another version.
    let mut bad = cfg.clone();
    bad.host_secrets[0].hostnqn = "nqn.2014-08.org.nvmexpress:uuid:host-2".into();
    assert!(bad.encode_body().is_err());
    let mut twice = cfg.clone();
    twice.host_secrets.push(twice.host_secrets[0].clone());
    assert!(twice.encode_body().is_err());
    let mut version = cfg.clone();
    version.host_secrets[0].sealed[0] = 9;
    assert!(version.encode_body().is_err());
}

fn arb_uuid() -> impl Strategy<Value = Uuid> {
    any::<[u8; 16]>().prop_map(Uuid)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_superblock_round_trips(
        cluster in arb_uuid(), pool in arb_uuid(), drive in arb_uuid(),
        slot in any::<u32>(), role in 0u8..3, state in 0u8..3, position in any::<u64>(),
        generation in any::<u64>(), epoch in any::<u64>(), owner in 0u32..4, secondary in any::<bool>(),
        cap_blocks in (82u64 << 8) + 1..(1u64 << 40), small in any::<bool>(),
    ) {
        let block = if small { 512 } else { 4096 };
        let cap = cap_blocks * u64::from(block);
        let layout = Layout::for_drive(cap, block);
        prop_assume!(layout.is_ok());
        let sb = Superblock {
            cluster_uuid: cluster,
            pool_uuid: pool,
            drive_uuid: drive,
            member_slot: slot,
            role: [Role::Data, Role::Parity, Role::Spare][role as usize],
            state: [MemberState::Active, MemberState::Failed, MemberState::Rebuilding { position }][state as usize],
            generation,
            epoch,
            owner_node: owner,
            copy: if secondary { SuperblockCopy::Secondary } else { SuperblockCopy::Primary },
            layout: layout.unwrap(),
        };
        prop_assert_eq!(Superblock::parse(&sb.encode()[..]).unwrap(), sb);
    }

    /// Any valid reservation state round trips: any version, generation, keys and controller
    /// ids, 0 to 64 registrants, any type the registrants allow, PTPL on or off.
    #[test]
    fn any_reservation_round_trips(
        version in any::<u64>(), generation in any::<u32>(), rtype in 0u8..=6, ptpl in any::<bool>(),
        regs in proptest::collection::vec((any::<u64>(), any::<u16>()), 0..=64),
        holder in any::<prop::sample::Index>(),
    ) {
        let registrants: Vec<ReservationRegistrant> = regs
            .iter()
            .enumerate()
            .map(|(i, &(key, cntlid))| ReservationRegistrant {
                host_id: host_id(i as u8 + 1),
                key,
                cntlid,
            })
            .collect();
        // Types 1 to 6 need a registrant (a holder, or every registrant).
        let rtype = if registrants.is_empty() { 0 } else { rtype };
        let holder = if (1..=4).contains(&rtype) {
            registrants[holder.index(registrants.len())].host_id
        } else {
            [0; 16]
        };
        let mut cfg = config(RaidLevel::Raid1, 2);
        cfg.reservations = vec![Reservation {
            subnqn: SUBSYS.to_string(),
            nsid: 2,
            version,
            generation,
            rtype,
            ptpl,
            holder,
            registrants,
        }];
        let body = cfg.encode_body().unwrap();
        prop_assert_eq!(PoolConfig::decode_body(&body).unwrap(), cfg);
    }

    #[test]
    fn any_heartbeat_round_trips(
        node in 0u32..4, boot in arb_uuid(), epoch in any::<u64>(), counter in any::<u64>(),
        peer in arb_uuid(), peer_counter in any::<u64>(),
    ) {
        let hb = Heartbeat { node_id: node, boot_id: boot, epoch, counter, peer_boot_id: peer, peer_counter };
        prop_assert_eq!(Heartbeat::parse(&hb.encode()[..]).unwrap(), hb);
    }
}
