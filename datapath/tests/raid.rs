//! RAID 0, 1 and 10 in the datapath, through the engine's rings: striping lands where the
//! geometry says (checked against the member files, computed independently here); mirrors over
//! `duplex-drive-sim` drives lose a member (pulled, failing writes, power cut) under a verifying
//! workload with no error reaching the host, go on degraded, never read the failed member again
//! (it is put back with stale data, and every block still verifies), and fail I/O only when the
//! last copy fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::sim::{lose, nvme_bdev, raw_node, restore, sim_drive, Loss, SimDrive, BS};
use common::{pattern, Node, Setup};
use duplex_datapath::bdev::{BdevBox, Event, FileBdev, MemberState, RaidBdev, RaidLevel};
use duplex_datapath::control::{PoolSpec, MISSING_DRIVE};
use duplex_datapath::map::VolumeMap;
use duplex_datapath::Volume;
use duplex_drive_sim::{Fault, FaultOp};
use duplex_ipc::desc::{IoDesc, OP_FLUSH, STATUS_SUCCESS};
use duplex_ipc::pool::Pool;
use duplex_ipc::topology::VolumeSpec;

/// Where the data area starts on every member (as the on-disk layout would put it).
const DATA_OFFSET: u64 = 1 << 20;
/// Bytes of each member's data area the tests use.
const DATA_LEN: u64 = 8 << 20;
const CHUNK: u64 = 64 << 10;
/// Blocks per write of the workload (16 KiB: some writes cross chunk ends).
const IO_BLOCKS: u32 = 4;

/// An engine serving volume 1, the whole of a RAID device over `members`.
fn raid_node(level: RaidLevel, members: impl FnOnce(&Pool) -> Vec<BdevBox>) -> (Node, u64) {
    let setup = Setup {
        volumes: vec![],
        ..Setup::default()
    };
    let mut blocks = 0;
    let mut node = Node::start_devices(setup, |pool| {
        let raid = RaidBdev::new(
            "pool0",
            level,
            CHUNK,
            DATA_OFFSET,
            DATA_LEN,
            members(pool),
            &[],
        )
        .unwrap();
        let dev: BdevBox = Box::new(raid);
        let map = VolumeMap::whole(1, "vol1", 0, &dev);
        blocks = map.blocks;
        (vec![dev], vec![map])
    });
    node.fabric[0].block_sizes.insert(1, BS);
    (node, blocks)
}

/// Payload of workload write `i` (a different generation `g` gives different bytes).
fn payload(i: u64, g: u64) -> Vec<u8> {
    pattern(i ^ (g << 32), (IO_BLOCKS * BS) as usize)
}

/// Writes `count` numbered writes from `first` (lba `i * IO_BLOCKS`), `depth` in flight,
/// calling `at(i)` once write `i` is submitted; every completion must succeed.
fn write_run(node: &mut Node, first: u64, count: u64, g: u64, mut at: impl FnMut(u64)) {
    let f = &mut node.fabric[0];
    let mut inflight = 0;
    for i in first..first + count {
        f.write(1, i * u64::from(IO_BLOCKS), &payload(i, g), 0);
        inflight += 1;
        at(i);
        if inflight == 16 {
            for d in f.collect(16).into_values() {
                assert_eq!(d.desc.status, STATUS_SUCCESS, "write failed: {:?}", d.desc);
            }
            inflight = 0;
        }
    }
    for d in f.collect(inflight).into_values() {
        assert_eq!(d.desc.status, STATUS_SUCCESS, "write failed: {:?}", d.desc);
    }
}

/// Reads back writes `first..first+count` and checks them against generation `g`.
fn verify_run(node: &mut Node, first: u64, count: u64, g: u64) {
    let f = &mut node.fabric[0];
    for i in first..first + count {
        let d = f.read_sync(1, i * u64::from(IO_BLOCKS), IO_BLOCKS);
        assert_eq!(d.desc.status, STATUS_SUCCESS, "read of write {i} failed");
        assert!(
            d.data.as_deref() == Some(&payload(i, g)[..]),
            "write {i} read back wrong"
        );
    }
}

fn flush(node: &mut Node) -> u16 {
    let d = node.fabric[0].call(
        IoDesc {
            opcode: OP_FLUSH,
            volume: 1,
            ..IoDesc::default()
        },
        0,
        &[],
    );
    d.desc.status
}

#[test]
fn raid0_stripes_chunks_over_the_members_as_the_geometry_says() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("m{i}"))).collect();
    let (mut node, blocks) = raid_node(RaidLevel::Raid0, |_| {
        paths
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(p)
                    .unwrap();
                f.set_len(DATA_OFFSET + DATA_LEN).unwrap();
                let spec = VolumeSpec {
                    id: i as u32,
                    name: format!("m{i}"),
                    resource: String::new(),
                    path: p.display().to_string(),
                    block_size: BS,
                    blocks: (DATA_OFFSET + DATA_LEN) / u64::from(BS),
                    direct: false,
                    drive: None,
                };
                Box::new(FileBdev::new(Volume::new(&spec, f.into()).unwrap())) as BdevBox
            })
            .collect()
    });
    assert_eq!(blocks * u64::from(BS), 3 * DATA_LEN);
    let count = 200;
    write_run(&mut node, 0, count, 1, |_| {});
    assert_eq!(flush(&mut node), STATUS_SUCCESS);
    verify_run(&mut node, 0, count, 1);
    node.stop();
    // Independently: byte b of the volume is in chunk c = b / CHUNK, on member c % 3, at
    // DATA_OFFSET + (c / 3) * CHUNK + b % CHUNK.
    let files: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    for i in 0..count {
        let want = payload(i, 1);
        let start = i * u64::from(IO_BLOCKS * BS);
        for (k, &byte) in want.iter().enumerate().step_by(509) {
            let b = start + k as u64;
            let c = b / CHUNK;
            let at = DATA_OFFSET + (c / 3) * CHUNK + b % CHUNK;
            assert_eq!(files[(c % 3) as usize][at as usize], byte, "byte {b}");
        }
    }
    // Nothing before the data area was touched (superblock and metadata areas are not ours).
    for f in &files {
        assert!(f[..DATA_OFFSET as usize].iter().all(|&b| b == 0));
    }
}

/// A mirror (RAID 1 over 2 drives, or RAID 10 over 4) loses member `victim` in the middle of
/// a verifying workload: no error reaches the host; the member is failed once; after it comes
/// back with stale data, reads never go to it.
fn mirror_loses_a_member(level: RaidLevel, n: usize, victim: usize, how: Loss) {
    let mut drives: Vec<SimDrive> = (0..n).map(|_| sim_drive()).collect();
    let (mut node, _) = raid_node(level, |pool| {
        drives
            .iter()
            .enumerate()
            .map(|(i, d)| nvme_bdev(d, &format!("d{i}"), pool))
            .collect()
    });
    let count = 400;
    // Generation 1 everywhere, flushed: on every member's medium.
    write_run(&mut node, 0, count, 1, |_| {});
    assert_eq!(flush(&mut node), STATUS_SUCCESS);
    // Generation 2, with the member lost halfway through (writes in flight).
    let mut lost = false;
    write_run(&mut node, 0, count, 2, |i| {
        if i == count / 2 {
            lose(&mut drives[victim], how);
            lost = true;
        }
    });
    assert!(lost);
    assert_eq!(flush(&mut node), STATUS_SUCCESS, "a degraded flush");
    verify_run(&mut node, 0, count, 2);
    // The member comes back, stale (it missed generation 2, or part of it): reads must not
    // go to it, so every block still reads generation 2.
    restore(&mut drives[victim], how);
    verify_run(&mut node, 0, count, 2);
    write_run(&mut node, 0, count / 4, 3, |_| {});
    verify_run(&mut node, 0, count / 4, 3);
    let stats = node.stop();
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert_eq!(stats.member_failures, 1, "{stats:?}");
    // What the failed member holds is stale: it lacks generation 3 entirely.
    let first = drives[victim]
        .drive
        .read_medium(DATA_OFFSET / u64::from(BS), u64::from(IO_BLOCKS))
        .unwrap();
    assert_ne!(
        first,
        payload(0, 3),
        "the failed member got writes after failing"
    );
}

#[test]
fn raid1_survives_a_pulled_member() {
    mirror_loses_a_member(RaidLevel::Raid1, 2, 1, Loss::Pull);
}

#[test]
fn raid1_survives_a_member_failing_every_command() {
    mirror_loses_a_member(RaidLevel::Raid1, 2, 0, Loss::Error);
}

#[test]
fn raid1_survives_a_member_losing_power() {
    mirror_loses_a_member(RaidLevel::Raid1, 2, 1, Loss::PowerCut);
}

#[test]
fn raid10_survives_a_pulled_member() {
    mirror_loses_a_member(RaidLevel::Raid10, 4, 2, Loss::Pull);
}

#[test]
fn raid10_survives_a_member_failing_every_command() {
    mirror_loses_a_member(RaidLevel::Raid10, 4, 3, Loss::Error);
}

#[test]
fn raid10_survives_a_member_losing_power() {
    mirror_loses_a_member(RaidLevel::Raid10, 4, 0, Loss::PowerCut);
}

#[test]
fn the_last_copy_is_never_failed_its_errors_reach_the_host() {
    let mut drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let (mut node, _) = raid_node(RaidLevel::Raid1, |pool| {
        drives
            .iter()
            .enumerate()
            .map(|(i, d)| nvme_bdev(d, &format!("d{i}"), pool))
            .collect()
    });
    write_run(&mut node, 0, 32, 1, |_| {});
    lose(&mut drives[0], Loss::Pull);
    write_run(&mut node, 0, 32, 2, |_| {});
    // The last copy fails a range: those reads fail (no other copy), others go on.
    drives[1].drive.inject(Fault::Error {
        op: FaultOp::Read,
        first_lba: DATA_OFFSET / u64::from(BS),
        last_lba: DATA_OFFSET / u64::from(BS) + u64::from(IO_BLOCKS) - 1,
        status: 0x0281, // Media: Unrecovered Read Error
        dnr: true,
        remaining: None,
    });
    let f = &mut node.fabric[0];
    let bad = f.read_sync(1, 0, IO_BLOCKS);
    assert_ne!(bad.desc.status, STATUS_SUCCESS, "a read with no good copy");
    drives[1].drive.clear_faults();
    verify_run(&mut node, 0, 32, 2);
    let stats = node.stop();
    assert_eq!(stats.member_failures, 1, "{stats:?}");
    assert_eq!(stats.errors, 1, "{stats:?}");
    drop(drives);
}

/// Volume 1 over the whole data area of pool device `pool`.
fn whole_pool_volume(pool: usize) -> VolumeMap {
    let blocks = DATA_LEN / u64::from(BS);
    VolumeMap {
        id: 1,
        name: "vol1".into(),
        block_size: BS,
        blocks,
        extents: vec![duplex_datapath::map::Extent {
            start: 0,
            blocks,
            device: pool,
            device_offset: 0,
        }],
    }
}

fn mirror_spec(hold: bool) -> PoolSpec {
    PoolSpec {
        name: "pool0".into(),
        level: RaidLevel::Raid1,
        chunk: CHUNK,
        data_offset: DATA_OFFSET,
        data_len: DATA_LEN,
        drives: vec![0, 1],
        states: vec![],
        hold_until_recorded: hold,
        journal: None,
        seq_base: 1,
        resync: false,
        seq_limit: 0,
        bitmap: None,
        resync_members: 0,
        checksum: None,
    }
}

#[test]
fn pools_and_volumes_are_published_at_run_time_and_raw_drives_stay_reachable() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    // Raw access before any pool: a label at the start of drive 1.
    let label = pattern(99, BS as usize);
    let d = node.fabric[1].write_sync(1, 0, &label, 0);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    // Nothing is exported yet: volume 1 is unknown.
    let d = node.fabric[0].call(
        IoDesc {
            opcode: OP_FLUSH,
            volume: 1,
            ..IoDesc::default()
        },
        0,
        &[],
    );
    assert_ne!(d.desc.status, STATUS_SUCCESS);
    let ctl = node.control.clone();
    let pool = ctl.publish_pool(5, mirror_spec(false)).unwrap();
    assert_eq!(pool, 2);
    // The same pool again is the same device (a replay); another pool over its drives is
    // refused; so is an older epoch.
    assert_eq!(ctl.publish_pool(5, mirror_spec(false)).unwrap(), pool);
    let mut other = mirror_spec(false);
    other.name = "pool1".into();
    let e = ctl.publish_pool(5, other).unwrap_err();
    assert!(e.contains("not a free drive"), "{e}");
    let status = ctl.status().unwrap();
    assert_eq!(status.len(), 1, "{status:?}");
    assert_eq!(status[0].members.len(), 2);
    let whole = whole_pool_volume(pool);
    let e = ctl.publish_volumes(4, vec![whole.clone()]).unwrap_err();
    assert!(e.contains("older"), "{e}");
    let mut bad = whole.clone();
    bad.blocks += 1;
    bad.extents[0].blocks += 1;
    assert!(ctl.publish_volumes(5, vec![bad]).is_err());
    ctl.publish_volumes(5, vec![whole]).unwrap();
    node.fabric[0].block_sizes.insert(1, BS);
    write_run(&mut node, 0, 64, 1, |_| {});
    verify_run(&mut node, 0, 64, 1);
    // Raw reads of the members see the mirrored data at the data offset, and the label.
    let first = u64::from(DATA_OFFSET as u32 / BS);
    for id in [0, 1] {
        let d = node.fabric[1].read_sync(id, first, IO_BLOCKS);
        assert_eq!(d.desc.status, STATUS_SUCCESS);
        assert!(d.data.as_deref() == Some(&payload(0, 1)[..]), "member {id}");
    }
    let d = node.fabric[1].read_sync(1, 0, 1);
    assert!(d.data.as_deref() == Some(&label[..]));
    node.stop();
}

#[test]
fn writes_after_a_member_fails_wait_until_the_failure_is_recorded() {
    let mut drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    let ctl = node.control.clone();
    let pool = ctl.publish_pool(1, mirror_spec(true)).unwrap();
    ctl.publish_volumes(1, vec![whole_pool_volume(pool)])
        .unwrap();
    node.fabric[0].block_sizes.insert(1, BS);
    write_run(&mut node, 0, 16, 1, |_| {});
    lose(&mut drives[1], Loss::Pull);
    // The next write meets the pulled member: it is failed, and the write is held.
    let tag = node.fabric[0].write(1, 0, &payload(0, 2), 0);
    match ctl.next_event() {
        Some(Event::MemberFailed { member, .. }) => assert_eq!(member, 1),
        other => panic!("expected a member failure, got {other:?}"),
    }
    common::wait_until("the write to be held", || {
        ctl.status().unwrap()[0].held == 1
    });
    assert_eq!(
        node.fabric[0].completions_ready(),
        0,
        "a held write was acknowledged"
    );
    // Reads are not held.
    verify_run(&mut node, 1, 15, 1);
    // Another write after the failure is held too (it skips the failed member).
    let tag2 = node.fabric[0].write(1, IO_BLOCKS.into(), &payload(1, 2), 0);
    common::wait_until("the second write to be held", || {
        ctl.status().unwrap()[0].held == 2
    });
    assert_eq!(node.fabric[0].completions_ready(), 0);
    ctl.failures_recorded(pool, vec![1]).unwrap();
    let done = node.fabric[0].collect(2);
    assert_eq!(done[&tag].desc.status, STATUS_SUCCESS);
    assert_eq!(done[&tag2].desc.status, STATUS_SUCCESS);
    verify_run(&mut node, 0, 2, 2);
    let stats = node.stop();
    assert_eq!(stats.errors, 0, "{stats:?}");
}

#[test]
fn a_pool_with_a_missing_member_serves_degraded_and_a_replayed_publish_is_the_same_device() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    let ctl = node.control.clone();
    let mut spec = mirror_spec(false);
    spec.drives = vec![MISSING_DRIVE, 1];
    let e = ctl.publish_pool(1, spec.clone()).unwrap_err();
    assert!(e.contains("missing but not failed"), "{e}");
    spec.states = vec![MemberState::Failed, MemberState::Active];
    let pool = ctl.publish_pool(1, spec.clone()).unwrap();
    assert_eq!(ctl.publish_pool(1, spec.clone()).unwrap(), pool, "a replay");
    let mut other = spec.clone();
    other.name = "other".into();
    assert!(ctl.publish_pool(1, other).is_err(), "drive 1 is taken");
    ctl.publish_volumes(1, vec![whole_pool_volume(pool)])
        .unwrap();
    node.fabric[0].block_sizes.insert(1, BS);
    write_run(&mut node, 0, 32, 1, |_| {});
    verify_run(&mut node, 0, 32, 1);
    // Drive 0 is still free: raw I/O reaches it, and it never got pool data.
    let d = node.fabric[1].read_sync(0, DATA_OFFSET / u64::from(BS), IO_BLOCKS);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    assert!(d.data.as_deref() != Some(&payload(0, 1)[..]));
    let stats = node.stop();
    assert_eq!(stats.errors, 0, "{stats:?}");
}

/// A member the control plane records failed on its own (it failed a metadata commit, which
/// the RAID device never saw) is failed when the pool is published again: its writes stop; the
/// last active copy of a set is kept whatever the publish says.
#[test]
fn a_member_recorded_failed_by_the_control_plane_is_no_longer_written() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    let ctl = node.control.clone();
    let pool = ctl.publish_pool(1, mirror_spec(false)).unwrap();
    ctl.publish_volumes(1, vec![whole_pool_volume(pool)])
        .unwrap();
    node.fabric[0].block_sizes.insert(1, BS);
    write_run(&mut node, 0, 32, 1, |_| {});
    let mut spec = mirror_spec(false);
    spec.states = vec![MemberState::Active, MemberState::Failed];
    assert_eq!(ctl.publish_pool(1, spec).unwrap(), pool, "the same device");
    let status = ctl.status().unwrap();
    assert_eq!(
        status[0].members,
        vec![MemberState::Active, MemberState::Failed],
        "{status:?}"
    );
    write_run(&mut node, 0, 32, 2, |_| {});
    verify_run(&mut node, 0, 32, 2);
    // Member 1 kept the first generation: it was not written after the publish.
    let first = DATA_OFFSET / u64::from(BS);
    let d = node.fabric[1].read_sync(1, first, IO_BLOCKS);
    assert!(d.data.as_deref() == Some(&payload(0, 1)[..]), "member 1");
    let d = node.fabric[1].read_sync(0, first, IO_BLOCKS);
    assert!(d.data.as_deref() == Some(&payload(0, 2)[..]), "member 0");
    // Both recorded failed: the last copy is kept.
    let mut spec = mirror_spec(false);
    spec.states = vec![MemberState::Failed, MemberState::Failed];
    assert_eq!(ctl.publish_pool(1, spec).unwrap(), pool);
    let status = ctl.status().unwrap();
    assert_eq!(status[0].members[0], MemberState::Active, "{status:?}");
    verify_run(&mut node, 0, 32, 2);
    let stats = node.stop();
    assert_eq!(stats.errors, 0, "{stats:?}");
}

/// A mirror member pulled under load is replaced by a free drive and rebuilt while the host
/// keeps writing: the member turns active again when the rebuild reaches the end, every write
/// (old and new) reads back, and with the other copy pulled afterwards every block comes from
/// the rebuilt member.
#[test]
fn a_mirror_member_is_replaced_and_rebuilt_under_writes() {
    let mut drives: Vec<SimDrive> = (0..3).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    let ctl = node.control.clone();
    let pool = ctl.publish_pool(1, mirror_spec(false)).unwrap();
    ctl.publish_volumes(1, vec![whole_pool_volume(pool)])
        .unwrap();
    node.fabric[0].block_sizes.insert(1, BS);
    let n = DATA_LEN / u64::from(BS) / u64::from(IO_BLOCKS);
    write_run(&mut node, 0, n, 1, |_| {});
    write_run(&mut node, 0, 64, 2, |i| {
        if i == 8 {
            lose(&mut drives[1], Loss::Pull);
        }
    });
    common::wait_until("the failed member to be replaceable", || {
        ctl.replace_member(pool, 1, 2, 0).is_ok()
    });
    // Generation 3 over the first half while the rebuild runs, until it is done.
    let mut rounds = 0u64;
    let half = n / 2;
    loop {
        write_run(&mut node, (rounds * 16) % half, 16, 3, |_| {});
        rounds += 1;
        let st = ctl.status().unwrap();
        let members = &st.iter().find(|d| d.index == pool).unwrap().members;
        if members.iter().all(|m| *m == MemberState::Active) {
            break;
        }
        assert!(
            matches!(members[1], MemberState::Rebuilding { .. }),
            "{members:?}"
        );
        assert!(rounds < 100_000, "the rebuild never finished");
    }
    let written3 = (rounds * 16).min(half);
    let g = |i: u64| {
        if i < written3 {
            3
        } else if i < 64 {
            2
        } else {
            1
        }
    };
    for i in 0..n {
        verify_run(&mut node, i, 1, g(i));
    }
    lose(&mut drives[0], Loss::Pull);
    for i in 0..n {
        verify_run(&mut node, i, 1, g(i));
    }
    let stats = node.stop();
    assert_eq!(stats.errors, 0, "{stats:?}");
}
