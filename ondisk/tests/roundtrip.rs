//! Round trips: every structure decodes to what was encoded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use duplex_ondisk::records::{decode_records, pool_capacity_bytes, Record};
use duplex_ondisk::{
    Heartbeat, Layout, MemberState, MetadataImage, PoolConfig, RaidLevel, Role, Superblock,
    SuperblockCopy, Uuid,
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

    #[test]
    fn any_heartbeat_round_trips(
        node in 0u32..4, boot in arb_uuid(), epoch in any::<u64>(), counter in any::<u64>(),
        peer in arb_uuid(), peer_counter in any::<u64>(),
    ) {
        let hb = Heartbeat { node_id: node, boot_id: boot, epoch, counter, peer_boot_id: peer, peer_counter };
        prop_assert_eq!(Heartbeat::parse(&hb.encode()[..]).unwrap(), hb);
    }
}
