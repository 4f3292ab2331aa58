//! Configuration changes: allocation of thick volumes (first fit, several extents after
//! deletions, growth appends), and every refusal with its kind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use duplex_metadata::ops::{self, OpError, ALLOC_UNIT};
use duplex_ondisk::{MemberState, Ownership, Pool, PoolConfig, PoolMember, RaidLevel, Uuid};

const MIB: u64 = 1 << 20;

fn u(n: u8) -> Uuid {
    Uuid([n; 16])
}

fn pool(mib: u64) -> PoolConfig {
    PoolConfig {
        pool: Pool {
            name: "tank".into(),
            uuid: u(1),
            raid_level: RaidLevel::Raid1,
            chunk_size: 65536,
            member_data_bytes: mib * MIB,
            members: (0..2)
                .map(|i| PoolMember {
                    drive_uuid: u(10 + i),
                    slot: u32::from(i),
                    state: MemberState::Active,
                    changed_generation: 1,
                })
                .collect(),
        },
        ownership: Ownership {
            owner_node: 0,
            epoch: 1,
        },
        cluster_generation: 1,
        subsystems: vec![],
        volumes: vec![],
        namespaces: vec![],
        spares: vec![],
        write_seq_mark: 0,
        checksum_area: None,
        reservations: vec![],
        host_secrets: Vec::new(),
    }
}

fn vol(cfg: &PoolConfig, name: &str, mib: u64) -> Result<PoolConfig, OpError> {
    let tag = name.bytes().fold(100u8, u8::wrapping_add);
    ops::create_volume(cfg, name, mib * MIB, 4096, u(tag), [tag; 16], &[])
}

#[test]
fn volumes_are_allocated_first_fit_and_grow_by_appending() {
    let cfg = pool(100);
    assert_eq!(ops::free_bytes(&cfg), 100 * MIB);
    let cfg = vol(&cfg, "a", 10).unwrap();
    let cfg = vol(&cfg, "b", 20).unwrap();
    let cfg = vol(&cfg, "c", 10).unwrap();
    cfg.validate().unwrap();
    assert_eq!(ops::free_bytes(&cfg), 60 * MIB);
    let cfg = ops::delete_volume(&cfg, "b").unwrap();
    // 30 MiB: the 20 MiB hole, then after c.
    let cfg = vol(&cfg, "d", 30).unwrap();
    cfg.validate().unwrap();
    let d = cfg.volumes.iter().find(|v| v.name == "d").unwrap();
    assert_eq!(d.extents.len(), 2);
    assert_eq!(d.extents[0].pool_block, 10 * MIB / 4096);
    assert_eq!(d.extents[1].volume_block, 20 * MIB / 4096);
    let cfg = ops::resize_volume(&cfg, "a", 15 * MIB).unwrap();
    cfg.validate().unwrap();
    let a = cfg.volumes.iter().find(|v| v.name == "a").unwrap();
    assert_eq!(a.size_blocks, 15 * MIB / 4096);
    assert_eq!(a.extents.len(), 2);
    assert_eq!(
        ops::free_bytes(&cfg),
        100 * MIB - 15 * MIB - 10 * MIB - 30 * MIB
    );
    // A volume of an odd size keeps its last unit.
    let cfg = ops::create_volume(&cfg, "e", 4096, 4096, u(250), [250; 16], &[]).unwrap();
    assert_eq!(ops::free_bytes(&cfg) % ALLOC_UNIT, 0);
    cfg.validate().unwrap();
}

#[test]
fn refusals_say_what_is_wrong() {
    let cfg = vol(&pool(100), "a", 10).unwrap();
    let kind = |r: Result<PoolConfig, OpError>| r.unwrap_err();
    assert!(matches!(kind(vol(&cfg, "a", 1)), OpError::AlreadyExists(_)));
    assert!(matches!(
        kind(ops::create_volume(
            &cfg,
            "x",
            1,
            4096,
            u(9),
            [9; 16],
            &["x".into()]
        )),
        OpError::AlreadyExists(_)
    ));
    assert!(matches!(
        kind(vol(&cfg, "bad name", 1)),
        OpError::InvalidArgument(_)
    ));
    let e = kind(vol(&cfg, "big", 91));
    assert!(matches!(e, OpError::NoSpace(_)), "{e}");
    assert!(e.to_string().contains("90.0 MiB free"), "{e}");
    assert!(matches!(
        kind(ops::create_volume(
            &cfg,
            "odd",
            1000,
            4096,
            u(9),
            [9; 16],
            &[]
        )),
        OpError::InvalidArgument(_)
    ));
    assert!(matches!(
        kind(ops::resize_volume(&cfg, "a", MIB)),
        OpError::InvalidArgument(_)
    ));
    assert!(matches!(
        kind(ops::resize_volume(&cfg, "zz", MIB)),
        OpError::NotFound(_)
    ));
    assert!(matches!(
        kind(ops::create_subsystem(&cfg, "iqn.bad", "S", "M")),
        OpError::InvalidArgument(_)
    ));
    let nqn = "nqn.2026-12.io.duplex:s1";
    let cfg = ops::create_subsystem(&cfg, nqn, "S", "M").unwrap();
    assert!(matches!(
        kind(ops::create_subsystem(&cfg, nqn, "S", "M")),
        OpError::AlreadyExists(_)
    ));
    let (cfg, nsid) = ops::add_namespace(&cfg, nqn, "a", None, 1, &[1]).unwrap();
    assert_eq!(nsid, 2, "the lowest NSID free in every pool");
    cfg.validate().unwrap();
    let e = ops::add_namespace(&cfg, nqn, "a", None, 1, &[]).unwrap_err();
    assert!(matches!(e, OpError::InUse(_)), "{e}");
    let e = kind(ops::delete_volume(&cfg, "a"));
    assert!(
        matches!(e, OpError::InUse(_)) && e.to_string().contains("namespace 2"),
        "{e}"
    );
    assert!(matches!(
        kind(ops::delete_subsystem(&cfg, nqn)),
        OpError::InUse(_)
    ));
    assert!(matches!(
        kind(ops::remove_namespace(&cfg, nqn, 3)),
        OpError::NotFound(_)
    ));
    // A namespace with reservation state: removing it removes the state too (the image
    // would not validate with a reservation naming no namespace).
    let mut held = cfg.clone();
    held.reservations.push(duplex_ondisk::Reservation {
        subnqn: nqn.into(),
        nsid: 2,
        version: 1,
        generation: 1,
        rtype: 0,
        ptpl: true,
        holder: [0; 16],
        registrants: vec![duplex_ondisk::ReservationRegistrant {
            host_id: [7; 16],
            key: 0xAB,
            cntlid: 0xFFFF,
        }],
    });
    held.validate().unwrap();
    let gone = ops::remove_namespace(&held, nqn, 2).unwrap();
    assert!(gone.reservations.is_empty());
    gone.validate().unwrap();
    let cfg = ops::remove_namespace(&cfg, nqn, 2).unwrap();
    let host = "nqn.2014-08.org.nvmexpress:uuid:0c6b4d7e-2c9f-4a55-9d0b-6ad0e5a3c1f2";
    let cfg = ops::allow_host(&cfg, nqn, host, None).unwrap();
    // Secrets set on an allowed host, replaced, and gone with the host.
    let key = duplex_ondisk::secrets::SecretsKey::from_bytes([5; 32]);
    let sealed = |t: &str| {
        let keys = duplex_ondisk::secrets::HostKeys {
            dhchap: Some(t.into()),
            ..Default::default()
        };
        duplex_ondisk::secrets::seal(&key, nqn, host, &keys, [2; 12])
    };
    let with = ops::allow_host(&cfg, nqn, host, Some(&sealed("DHHC-1:00:a:"))).unwrap();
    with.validate().unwrap();
    let again = ops::allow_host(&with, nqn, host, Some(&sealed("DHHC-1:00:b:"))).unwrap();
    assert_eq!(again.host_secrets.len(), 1);
    assert_ne!(again.host_secrets[0].sealed, with.host_secrets[0].sealed);
    assert!(matches!(
        kind(ops::allow_host(&again, nqn, host, None)),
        OpError::AlreadyExists(_)
    ));
    let denied = ops::deny_host(&again, nqn, host).unwrap();
    assert!(denied.host_secrets.is_empty());
    denied.validate().unwrap();
    assert!(matches!(
        kind(ops::allow_host(&cfg, nqn, "host1", None)),
        OpError::InvalidArgument(_)
    ));
    assert!(matches!(
        kind(ops::deny_host(&cfg, nqn, "nqn.2026-01.x:none")),
        OpError::NotFound(_)
    ));
    let cfg = ops::allow_any_host(&cfg, nqn, true).unwrap();
    cfg.validate().unwrap();
    let cfg = ops::delete_subsystem(&cfg, nqn).unwrap();
    assert!(cfg.subsystems.is_empty());
}
