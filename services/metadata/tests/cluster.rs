//! The metadata service's brain over drives in memory and a recording publisher: operators'
//! requests become commits and publications; a restart (a new instance over the same drives)
//! finds the same pools, volumes (same ids), subsystems, namespaces and hosts and publishes
//! them again; wrong requests get their error kind and change nothing on the drives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use duplex_ipc::config::{
    ConfigErrorKind, ConfigReply, ConfigRequest, DriveState, PoolState, RaidLevel,
};
use duplex_ipc::exports::{AnaGroupState, AnaState, ExportSubsystem};
use duplex_metadata::cluster::{
    Cluster, Drive, PoolPublish, Publisher, VolumePublish, MISSING, SEQ_LEASE,
};
use duplex_metadata::disk::MemDisk;

#[derive(Debug, Default)]
struct Recorder {
    pools: Vec<PoolPublish>,
    volumes: Vec<VolumePublish>,
    exports: Vec<ExportSubsystem>,
    ana: Vec<AnaGroupState>,
    recorded: Vec<(u32, Vec<u32>)>,
    replaced: Vec<(u32, u32, u32)>,
    retired: Vec<u32>,
    reservations: Vec<duplex_ipc::exports::ExportReservation>,
    /// What `active_members` answers (the datapath's view).
    active: Vec<bool>,
    /// What `seq_headroom` answers.
    room: Vec<(u32, u64)>,
    /// Pools whose device the datapath has already (a restarted metadata service).
    serving: Vec<String>,
}

impl Publisher for Recorder {
    fn serves_pool(&mut self, name: &str) -> bool {
        self.serving.iter().any(|n| n == name)
    }

    fn publish_pool(&mut self, _epoch: u64, pool: &PoolPublish) -> Result<u32, String> {
        let i = match self.pools.iter().position(|p| p.name == pool.name) {
            Some(i) => {
                self.pools[i] = pool.clone();
                i
            }
            None => {
                self.pools.push(pool.clone());
                self.pools.len() - 1
            }
        };
        Ok(100 + i as u32)
    }
    fn publish_volumes(&mut self, _epoch: u64, volumes: &[VolumePublish]) -> Result<(), String> {
        self.volumes = volumes.to_vec();
        Ok(())
    }
    fn failures_recorded(&mut self, device: u32, members: &[u32]) -> Result<(), String> {
        self.recorded.push((device, members.to_vec()));
        Ok(())
    }
    fn replace_member(&mut self, device: u32, slot: u32, drive: u32) -> Result<(), String> {
        self.replaced.push((device, slot, drive));
        Ok(())
    }
    fn retire_pool(&mut self, device: u32) -> Result<(), String> {
        self.retired.push(device);
        Ok(())
    }
    fn active_members(&mut self, _device: u32) -> Result<Vec<bool>, String> {
        Ok(self.active.clone())
    }
    fn seq_headroom(&mut self) -> Vec<(u32, u64)> {
        self.room.clone()
    }
    fn publish_exports(
        &mut self,
        subsystems: Vec<ExportSubsystem>,
        ana: Vec<AnaGroupState>,
        reservations: Vec<duplex_ipc::exports::ExportReservation>,
    ) -> Result<(), String> {
        self.exports = subsystems;
        self.ana = ana;
        self.reservations = reservations;
        Ok(())
    }
}

fn drives(disks: &[MemDisk]) -> Vec<Drive<MemDisk>> {
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| Drive {
            name: format!("d{i}"),
            address: format!("sim:{i}"),
            id: 10 + i as u32,
            capacity: 256 << 20,
            block_size: 4096,
            disk: d.clone(),
            state: DriveState::Free,
            pool: String::new(),
            slot: 0,
            spare: None,
            // In-memory drives, like plain files, keep no integrity records: pools over them
            // get a checksum area.
            records: false,
        })
        .collect()
}

fn disks(n: usize) -> Vec<MemDisk> {
    (0..n)
        .map(|i| MemDisk::new(&format!("sim:{i}"), 256 << 20, 4096))
        .collect()
}

fn ok(r: ConfigReply) -> duplex_ipc::config::Done {
    match r {
        ConfigReply::Done(d) => d,
        other => panic!("expected done, got {other:?}"),
    }
}

fn kind(r: ConfigReply) -> ConfigErrorKind {
    match r {
        ConfigReply::Error { kind, message } => {
            assert!(!message.contains('\n'), "one line: {message}");
            kind
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

const NQN: &str = "nqn.2026-12.io.duplex:tank";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0c6b4d7e-2c9f-4a55-9d0b-6ad0e5a3c1f2";

#[test]
fn a_configuration_built_by_requests_survives_a_restart() {
    let d = disks(3);
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    assert_eq!(
        kind(c.handle(ConfigRequest::CreateSubsystem(NQN.into()))),
        ConfigErrorKind::NotReady
    );
    let done = ok(c.handle(ConfigRequest::CreatePool {
        name: "tank".into(),
        raid: RaidLevel::Raid1,
        drives: vec!["d0".into(), "d1".into()],
        chunk_bytes: 0,
    }));
    assert!(!done.uuid.is_empty());
    ok(c.handle(ConfigRequest::CreateVolume {
        name: "vol0".into(),
        pool: "tank".into(),
        size_bytes: 64 << 20,
    }));
    ok(c.handle(ConfigRequest::CreateSubsystem(NQN.into())));
    let ns = ok(c.handle(ConfigRequest::AddNamespace {
        nqn: NQN.into(),
        volume: "vol0".into(),
        nsid: 0,
    }));
    assert_eq!(ns.nsid, 1);
    ok(c.handle(ConfigRequest::AllowHost {
        nqn: NQN.into(),
        host_nqn: HOST.into(),
        secrets: None,
    }));
    ok(c.handle(ConfigRequest::ResizeVolume {
        name: "vol0".into(),
        size_bytes: 96 << 20,
    }));
    let before_volumes = c_volumes(&mut c);
    let before_subs = c_subsystems(&mut c);
    let published = {
        let ConfigReply::Pools(p) = c.handle(ConfigRequest::ListPools) else {
            panic!()
        };
        p
    };
    assert_eq!(published[0].state, PoolState::Online);
    drop(c);
    // A restart: everything comes back from the drives, published again.
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    assert_eq!(c_volumes(&mut c), before_volumes);
    assert_eq!(c_subsystems(&mut c), before_subs);
    let ConfigReply::Drives(ds) = c.handle(ConfigRequest::ListDrives) else {
        panic!()
    };
    let states: Vec<_> = ds
        .iter()
        .map(|d| (d.name.as_str(), d.state, d.pool.as_str()))
        .collect();
    assert_eq!(
        states,
        vec![
            ("d0", DriveState::Active, "tank"),
            ("d1", DriveState::Active, "tank"),
            ("d2", DriveState::Free, "")
        ]
    );
}

fn c_volumes(c: &mut Cluster<MemDisk, Recorder>) -> Vec<duplex_ipc::config::VolumeInfo> {
    let ConfigReply::Volumes(v) = c.handle(ConfigRequest::ListVolumes) else {
        panic!()
    };
    v
}

fn c_subsystems(c: &mut Cluster<MemDisk, Recorder>) -> Vec<duplex_ipc::config::SubsystemInfo> {
    let ConfigReply::Subsystems(s) = c.handle(ConfigRequest::ListSubsystems) else {
        panic!()
    };
    s
}

#[test]
fn wrong_requests_get_their_kind_and_write_nothing() {
    let d = disks(3);
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    ok(c.handle(ConfigRequest::CreatePool {
        name: "tank".into(),
        raid: RaidLevel::Raid1,
        drives: vec!["d0".into(), "d1".into()],
        chunk_bytes: 0,
    }));
    ok(c.handle(ConfigRequest::CreateVolume {
        name: "vol0".into(),
        pool: "tank".into(),
        size_bytes: 64 << 20,
    }));
    ok(c.handle(ConfigRequest::CreateSubsystem(NQN.into())));
    ok(c.handle(ConfigRequest::AddNamespace {
        nqn: NQN.into(),
        volume: "vol0".into(),
        nsid: 0,
    }));
    let writes = || d.iter().map(MemDisk::writes).sum::<u64>();
    let w = writes();
    let cases = vec![
        (
            ConfigRequest::CreatePool {
                name: "tank".into(),
                raid: RaidLevel::Raid0,
                drives: vec!["d2".into()],
                chunk_bytes: 0,
            },
            ConfigErrorKind::AlreadyExists,
        ),
        (
            ConfigRequest::CreatePool {
                name: "p2".into(),
                raid: RaidLevel::Raid1,
                drives: vec!["d1".into(), "d2".into()],
                chunk_bytes: 0,
            },
            ConfigErrorKind::InUse,
        ),
        (
            ConfigRequest::CreatePool {
                name: "p2".into(),
                raid: RaidLevel::Raid1,
                drives: vec!["d2".into()],
                chunk_bytes: 0,
            },
            ConfigErrorKind::InvalidArgument,
        ),
        (
            ConfigRequest::CreatePool {
                name: "p2".into(),
                raid: RaidLevel::Raid0,
                drives: vec!["nope".into()],
                chunk_bytes: 0,
            },
            ConfigErrorKind::NotFound,
        ),
        (
            ConfigRequest::CreateVolume {
                name: "vol0".into(),
                pool: "tank".into(),
                size_bytes: 1 << 20,
            },
            ConfigErrorKind::AlreadyExists,
        ),
        (
            ConfigRequest::CreateVolume {
                name: "v2".into(),
                pool: "nope".into(),
                size_bytes: 1 << 20,
            },
            ConfigErrorKind::NotFound,
        ),
        (
            ConfigRequest::CreateVolume {
                name: "v2".into(),
                pool: "tank".into(),
                size_bytes: 1 << 40,
            },
            ConfigErrorKind::NoSpace,
        ),
        (
            ConfigRequest::CreateSubsystem("iqn.2001-04.com.example:x".into()),
            ConfigErrorKind::InvalidArgument,
        ),
        (
            ConfigRequest::DeleteVolume("vol0".into()),
            ConfigErrorKind::InUse,
        ),
        (
            ConfigRequest::DestroyPool {
                name: "tank".into(),
                force: false,
            },
            ConfigErrorKind::InUse,
        ),
        (
            ConfigRequest::DeleteSubsystem(NQN.into()),
            ConfigErrorKind::InUse,
        ),
        (
            ConfigRequest::AddNamespace {
                nqn: NQN.into(),
                volume: "vol0".into(),
                nsid: 5,
            },
            ConfigErrorKind::InUse,
        ),
        (
            ConfigRequest::RemoveNamespace {
                nqn: NQN.into(),
                nsid: 9,
            },
            ConfigErrorKind::NotFound,
        ),
        (
            ConfigRequest::DenyHost {
                nqn: NQN.into(),
                host_nqn: HOST.into(),
            },
            ConfigErrorKind::NotFound,
        ),
        (
            ConfigRequest::ShowPool("nope".into()),
            ConfigErrorKind::NotFound,
        ),
    ];
    for (req, want) in cases {
        let got = kind(c.handle(req.clone()));
        assert_eq!(got, want, "{req:?}");
    }
    assert_eq!(writes(), w, "a refused request wrote to the drives");
}

#[test]
fn a_failed_member_is_recorded_then_released_and_rebuilt_when_it_comes_back() {
    let d = disks(2);
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    ok(c.handle(ConfigRequest::CreatePool {
        name: "tank".into(),
        raid: RaidLevel::Raid1,
        drives: vec!["d0".into(), "d1".into()],
        chunk_bytes: 0,
    }));
    c.member_failed(100, 1).unwrap();
    assert_eq!(c.publisher().recorded, vec![(100, vec![1])]);
    let ConfigReply::Pools(p) = c.handle(ConfigRequest::ShowPool("tank".into())) else {
        panic!()
    };
    assert_eq!(p[0].state, PoolState::Degraded);
    assert_eq!(p[0].members[1].state, DriveState::Failed);
    drop(c);
    // The failed member's drive is still here and names its slot: at the next import it is
    // committed rebuilding on its own drive and given to the datapath to resync (only the
    // regions the write-intent bitmap marks: `resync_members`).
    let c2 = Cluster::start(drives(&d), 0, 1, Recorder::default());
    let mut c2 = c2;
    let ConfigReply::Pools(p) = c2.handle(ConfigRequest::ShowPool("tank".into())) else {
        panic!()
    };
    assert_eq!(
        p[0].members[1].state,
        DriveState::Rebuilding,
        "taken back, rebuilding"
    );
    let ConfigReply::Drives(ds) = c2.handle(ConfigRequest::ListDrives) else {
        panic!()
    };
    assert_eq!(ds[1].state, DriveState::Rebuilding);
    let pool = &c2.publisher().pools[0];
    assert_eq!(
        pool.drives,
        vec![10, 11],
        "the member is given to the datapath"
    );
    assert_eq!(pool.failed, vec![false, false]);
    assert_eq!(pool.rebuilding, vec![None, Some(0)]);
    assert_eq!(pool.resync_members, 0b10);
    drop(c2);
    // Recorded on disk: a third start sees it rebuilding (whole from its checkpoint: the
    // bitmap-bounded resync is this process's knowledge only).
    let mut c3 = Cluster::start(drives(&d), 0, 1, Recorder::default());
    let ConfigReply::Pools(p) = c3.handle(ConfigRequest::ShowPool("tank".into())) else {
        panic!()
    };
    assert_eq!(
        p[0].members[1].state,
        DriveState::Rebuilding,
        "recorded on disk"
    );
    let pool = &c3.publisher().pools[0];
    assert_eq!(pool.rebuilding, vec![None, Some(0)]);
    assert_eq!(pool.resync_members, 0);
}

/// A RAID-1 pool `tank` on `d` whose member 1 failed (recorded on disk); the service stopped.
fn raid1_tank_with_member_1_failed(d: &[MemDisk]) {
    let mut c = Cluster::start(drives(d), 0, 1, Recorder::default());
    ok(c.handle(ConfigRequest::CreatePool {
        name: "tank".into(),
        raid: RaidLevel::Raid1,
        drives: vec!["d0".into(), "d1".into()],
        chunk_bytes: 0,
    }));
    c.member_failed(100, 1).unwrap();
}

/// A restarted metadata service (the datapath kept the pool's device, with the member failed)
/// does not take a returning member back: the device it would publish to keeps its members'
/// states; the next import by a starting node does.
#[test]
fn a_restarted_metadata_service_leaves_a_failed_member_to_the_next_import() {
    let d = disks(2);
    raid1_tank_with_member_1_failed(&d);
    let serving = Recorder {
        serving: vec!["tank".into()],
        ..Recorder::default()
    };
    let mut c2 = Cluster::start(drives(&d), 0, 1, serving);
    let ConfigReply::Pools(p) = c2.handle(ConfigRequest::ShowPool("tank".into())) else {
        panic!()
    };
    assert_eq!(p[0].members[1].state, DriveState::Failed);
    let pool = &c2.publisher().pools[0];
    assert_eq!(pool.failed, vec![false, true]);
    assert_eq!(pool.resync_members, 0);
    drop(c2);
    let mut c3 = Cluster::start(drives(&d), 0, 1, Recorder::default());
    let ConfigReply::Pools(p) = c3.handle(ConfigRequest::ShowPool("tank".into())) else {
        panic!()
    };
    assert_eq!(p[0].members[1].state, DriveState::Rebuilding);
}

/// A failed member whose drive does not come back stays failed: nothing is given to the
/// datapath for its slot.
#[test]
fn a_failed_member_that_does_not_come_back_stays_failed() {
    let d = disks(2);
    raid1_tank_with_member_1_failed(&d);
    let mut c2 = Cluster::start(drives(&d[..1]), 0, 1, Recorder::default());
    let ConfigReply::Pools(p) = c2.handle(ConfigRequest::ShowPool("tank".into())) else {
        panic!()
    };
    assert_eq!(
        p[0].members[1].state,
        DriveState::Failed,
        "recorded on disk"
    );
    let pool = &c2.publisher().pools[0];
    assert_eq!(pool.drives, vec![10, MISSING]);
    assert_eq!(pool.failed, vec![false, true]);
    assert_eq!(pool.resync_members, 0);
}

/// A RAID-1 pool whose member 0 is gone at start is not imported (it may hold newer
/// metadata) and nothing is written; `importPool` without force is refused the same way; with
/// force the pool is imported from member 1, member 0 failed on the drive first, so the next
/// start imports it unforced, degraded.
#[test]
fn a_pool_missing_a_member_waits_for_a_forced_import() {
    let d = disks(2);
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    let uuid = ok(c.handle(ConfigRequest::CreatePool {
        name: "tank".into(),
        raid: RaidLevel::Raid1,
        drives: vec!["d0".into(), "d1".into()],
        chunk_bytes: 0,
    }))
    .uuid;
    ok(c.handle(ConfigRequest::CreateVolume {
        name: "vol0".into(),
        pool: "tank".into(),
        size_bytes: 64 << 20,
    }));
    drop(c);
    let only_d1 = || {
        let mut ds = drives(&d);
        ds.remove(0);
        ds
    };
    let writes = || d.iter().map(MemDisk::writes).sum::<u64>();
    let mut c = Cluster::start(only_d1(), 0, 1, Recorder::default());
    let ConfigReply::Pools(p) = c.handle(ConfigRequest::ListPools) else {
        panic!()
    };
    assert!(p.is_empty(), "not imported: {p:?}");
    let ConfigReply::Drives(ds) = c.handle(ConfigRequest::ListDrives) else {
        panic!()
    };
    let d1 = ds.iter().find(|x| x.name == "d1").unwrap();
    assert_eq!(
        (d1.state, d1.pool.as_str()),
        (DriveState::Stale, uuid.as_str())
    );
    let w = writes();
    let import = |force| ConfigRequest::ImportPool {
        pool: uuid.clone(),
        force,
    };
    assert_eq!(kind(c.handle(import(false))), ConfigErrorKind::Refused);
    assert_eq!(writes(), w, "a refused import writes nothing");
    assert_eq!(
        kind(c.handle(ConfigRequest::ImportPool {
            pool: "00000000-0000-4000-8000-000000000000".into(),
            force: true
        })),
        ConfigErrorKind::NotFound
    );
    let done = ok(c.handle(import(true)));
    assert!(done.message.contains("degraded"), "{}", done.message);
    assert!(writes() > w, "member 0's failure is written");
    let ConfigReply::Pools(p) = c.handle(ConfigRequest::ListPools) else {
        panic!()
    };
    assert_eq!(p[0].state, PoolState::Degraded);
    assert_eq!(c.publisher().pools[0].failed, vec![true, false]);
    assert_eq!(c_volumes(&mut c).len(), 1);
    assert_eq!(kind(c.handle(import(true))), ConfigErrorKind::AlreadyExists);
    drop(c);
    // The failure is on the drive: the next start needs no force.
    let mut c = Cluster::start(only_d1(), 0, 1, Recorder::default());
    let ConfigReply::Pools(p) = c.handle(ConfigRequest::ListPools) else {
        panic!()
    };
    assert_eq!(p.len(), 1, "imported unforced");
    assert_eq!(p[0].state, PoolState::Degraded);
}

/// Two pools named alike (made on different nodes, their drives now on one): the first found
/// is imported, the other refused before anything is written to its drives, its drives
/// reported stale with its uuid.
#[test]
fn a_pool_named_like_an_imported_one_is_not_imported() {
    let d = disks(4);
    let make = |pair: &[MemDisk]| {
        let mut c = Cluster::start(drives(pair), 0, 1, Recorder::default());
        ok(c.handle(ConfigRequest::CreatePool {
            name: "tank".into(),
            raid: RaidLevel::Raid1,
            drives: vec!["d0".into(), "d1".into()],
            chunk_bytes: 0,
        }))
        .uuid
    };
    let _first = make(&d[0..2]);
    let second = make(&d[2..4]);
    let writes = |ds: &[MemDisk]| ds.iter().map(MemDisk::writes).sum::<u64>();
    let w = writes(&d[2..4]);
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    let ConfigReply::Pools(p) = c.handle(ConfigRequest::ListPools) else {
        panic!()
    };
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        writes(&d[2..4]),
        w,
        "nothing written to the refused pool's drives"
    );
    let ConfigReply::Drives(ds) = c.handle(ConfigRequest::ListDrives) else {
        panic!()
    };
    for x in &ds[2..4] {
        assert_eq!(
            (x.state, x.pool.as_str()),
            (DriveState::Stale, second.as_str())
        );
    }
    let r = c.handle(ConfigRequest::ImportPool {
        pool: second.clone(),
        force: true,
    });
    match r {
        ConfigReply::Error { kind, message } => {
            assert_eq!(kind, ConfigErrorKind::Refused);
            assert!(message.contains("names are unique"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(writes(&d[2..4]), w);
}

#[test]
fn each_pool_is_one_ana_group_with_its_state_published() {
    let d = disks(4);
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    for (pool, drives) in [("tank", ["d0", "d1"]), ("vat", ["d2", "d3"])] {
        ok(c.handle(ConfigRequest::CreatePool {
            name: pool.into(),
            raid: RaidLevel::Raid1,
            drives: drives.iter().map(|d| (*d).into()).collect(),
            chunk_bytes: 0,
        }));
        for v in 0..2 {
            ok(c.handle(ConfigRequest::CreateVolume {
                name: format!("{pool}{v}"),
                pool: pool.into(),
                size_bytes: 16 << 20,
            }));
        }
    }
    ok(c.handle(ConfigRequest::CreateSubsystem(NQN.into())));
    for v in ["tank0", "vat0", "tank1", "vat1"] {
        ok(c.handle(ConfigRequest::AddNamespace {
            nqn: NQN.into(),
            volume: v.into(),
            nsid: 0,
        }));
    }
    let groups = |c: &Cluster<MemDisk, Recorder>| -> Vec<(u32, u32)> {
        c.publisher().exports[0]
            .namespaces
            .iter()
            .map(|n| (n.nsid, n.ana_group))
            .collect()
    };
    // Namespaces 1 and 3 are tank's, 2 and 4 vat's: one group per pool, distinct.
    assert_eq!(groups(&c), vec![(1, 1), (2, 2), (3, 1), (4, 2)]);
    let ana = |c: &Cluster<MemDisk, Recorder>| c.publisher().ana.clone();
    let optimized = |group| AnaGroupState {
        group,
        state: AnaState::Optimized,
    };
    assert_eq!(ana(&c), vec![optimized(1), optimized(2)]);
    drop(c);
    // The groups are on the drives: the same after a restart.
    let c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    assert_eq!(groups(&c), vec![(1, 1), (2, 2), (3, 1), (4, 2)]);
    assert_eq!(ana(&c), vec![optimized(1), optimized(2)]);
}

/// The standby of a two-controller pair lists the peer's pools and volumes as the drives say
/// (owner, epoch, generation), and refuses every change to them with one line naming the
/// owner, writing nothing.
#[test]
fn the_standby_lists_the_peers_pools_and_refuses_changes_to_them_naming_the_owner() {
    let d = disks(2);
    let mut owner = Cluster::start_member(drives(&d), 0, Some(0), 1, Recorder::default());
    ok(owner.handle(ConfigRequest::CreatePool {
        name: "tank".into(),
        raid: RaidLevel::Raid1,
        drives: vec!["d0".into(), "d1".into()],
        chunk_bytes: 0,
    }));
    ok(owner.handle(ConfigRequest::CreateVolume {
        name: "vol0".into(),
        pool: "tank".into(),
        size_bytes: 16 << 20,
    }));
    ok(owner.handle(ConfigRequest::CreateSubsystem(NQN.into())));
    ok(owner.handle(ConfigRequest::AddNamespace {
        nqn: NQN.into(),
        volume: "vol0".into(),
        nsid: 1,
    }));
    let ConfigReply::Pools(mine) = owner.handle(ConfigRequest::ListPools) else {
        panic!("pools");
    };
    let writes: Vec<u64> = d.iter().map(MemDisk::writes).collect();

    let mut standby = Cluster::start_member(drives(&d), 1, Some(0), 1, Recorder::default());
    let ConfigReply::Pools(seen) = standby.handle(ConfigRequest::ListPools) else {
        panic!("pools");
    };
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].name, "tank");
    assert_eq!(seen[0].owner_node, 0, "node 1's");
    assert_eq!(seen[0].epoch, mine[0].epoch);
    assert_eq!(seen[0].generation, mine[0].generation);
    assert_eq!(seen[0].state, PoolState::Online);
    assert_eq!(seen[0].members.len(), 2);
    assert_eq!(seen[0].members[1].drive, "d1");
    let vols = c_volumes(&mut standby);
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0].name, "vol0");
    assert_eq!(vols[0].exports.len(), 1);
    let subs = c_subsystems(&mut standby);
    assert_eq!(subs[0].namespaces[0].volume, "vol0");

    let refusals = [
        ConfigRequest::CreateVolume {
            name: "x".into(),
            pool: "tank".into(),
            size_bytes: 1 << 20,
        },
        ConfigRequest::ResizeVolume {
            name: "vol0".into(),
            size_bytes: 32 << 20,
        },
        ConfigRequest::DeleteVolume("vol0".into()),
        ConfigRequest::DestroyPool {
            name: "tank".into(),
            force: true,
        },
        ConfigRequest::AddNamespace {
            nqn: NQN.into(),
            volume: "vol0".into(),
            nsid: 2,
        },
        ConfigRequest::AllowHost {
            nqn: NQN.into(),
            host_nqn: HOST.into(),
            secrets: None,
        },
        ConfigRequest::MovePool {
            name: "tank".into(),
            node: 2,
        },
    ];
    for req in refusals {
        match standby.handle(req.clone()) {
            ConfigReply::Error { kind, message } => {
                assert_eq!(kind, ConfigErrorKind::Refused, "{req:?}: {message}");
                assert!(message.contains("node 1"), "{req:?}: {message}");
                assert!(!message.contains('\n'));
            }
            other => panic!("{req:?}: {other:?}"),
        }
    }
    assert_eq!(
        d.iter().map(MemDisk::writes).collect::<Vec<_>>(),
        writes,
        "the standby wrote nothing"
    );
}

/// `pool replace`: a failed RAID-5 member's slot taken by a free drive, committed rebuilding
/// and handed to the datapath; a restart imports the pool with the member still rebuilding
/// (published so, on the new drive); once the datapath reports it active, it is committed
/// active and stays so after another restart. Wrong replacements write nothing.
#[test]
fn a_failed_parity_member_is_replaced_rebuilt_and_committed_active() {
    let d = disks(4);
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    ok(c.handle(ConfigRequest::CreatePool {
        name: "tank".into(),
        raid: RaidLevel::Raid5,
        drives: vec!["d0".into(), "d1".into(), "d2".into()],
        chunk_bytes: 0,
    }));
    let replace = |old: &str, new: &str| ConfigRequest::ReplaceMember {
        pool: "tank".into(),
        old: old.into(),
        new: new.into(),
    };
    // An active member is not replaced.
    assert_eq!(
        kind(c.handle(replace("d1", "d3"))),
        ConfigErrorKind::Refused
    );
    c.member_failed(100, 1).unwrap();
    assert_eq!(kind(c.handle(replace("d1", "d2"))), ConfigErrorKind::InUse);
    assert_eq!(
        kind(c.handle(replace("d1", "nope"))),
        ConfigErrorKind::NotFound
    );
    assert_eq!(
        kind(c.handle(replace("d3", "d3"))),
        ConfigErrorKind::NotFound
    );
    ok(c.handle(replace("d1", "d3")));
    assert_eq!(c.publisher_mut().replaced, vec![(100, 1, 13)]);
    let state = |c: &mut Cluster<MemDisk, Recorder>, name: &str| match c
        .handle(ConfigRequest::ListDrives)
    {
        ConfigReply::Drives(list) => list.into_iter().find(|x| x.name == name).map(|x| x.state),
        other => panic!("{other:?}"),
    };
    assert_eq!(state(&mut c, "d3"), Some(DriveState::Rebuilding));
    // Not rebuilt yet at the datapath: nothing committed.
    c.check_rebuilds();
    drop(c);
    // A restart: the member is imported rebuilding, on d3, published so.
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    let p = c.publisher_mut().pools[0].clone();
    assert_eq!(p.drives[1], 13, "{p:?}");
    assert_eq!(p.rebuilding, vec![None, Some(0), None], "{p:?}");
    assert_eq!(p.failed, vec![false, false, false], "{p:?}");
    assert_eq!(state(&mut c, "d3"), Some(DriveState::Rebuilding));
    // The datapath reports it rebuilt: committed active.
    c.publisher_mut().active = vec![true; 3];
    c.check_rebuilds();
    assert_eq!(state(&mut c, "d3"), Some(DriveState::Active));
    drop(c);
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    let p = c.publisher_mut().pools[0].clone();
    assert_eq!(p.rebuilding, vec![None; 3], "{p:?}");
    assert_eq!(state(&mut c, "d3"), Some(DriveState::Active));
    match c.handle(ConfigRequest::ShowPool("tank".into())) {
        ConfigReply::Pools(p) => assert_eq!(p[0].state, PoolState::Online, "{p:?}"),
        other => panic!("{other:?}"),
    }
}

/// A mirror pool's write sequence numbers: leased (the mark committed) before the datapath
/// gets them, numbered from the last committed mark after every start, never twice; the
/// mark moves up when the datapath comes within half a lease of it; a resync is asked for
/// when the pool is imported, not when it is created.
#[test]
fn a_mirror_pools_write_sequence_mark_is_committed_before_use_and_moves_up() {
    let d = disks(2);
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    ok(c.handle(ConfigRequest::CreatePool {
        name: "tank".into(),
        raid: RaidLevel::Raid1,
        drives: vec!["d0".into(), "d1".into()],
        chunk_bytes: 0,
    }));
    let p = c.publisher().pools[0].clone();
    assert_eq!(
        (p.seq_base, p.seq_limit, p.resync),
        (1, 1 + SEQ_LEASE, false)
    );
    drop(c);
    // A restart numbers from the mark committed, with a resync.
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    let p = c.publisher().pools[0].clone();
    let mark = 1 + 2 * SEQ_LEASE;
    assert_eq!(
        (p.seq_base, p.seq_limit, p.resync),
        (1 + SEQ_LEASE, mark, true)
    );
    // More than half a lease left: nothing committed.
    c.publisher_mut().room = vec![(100, SEQ_LEASE / 2 + 1)];
    let changes = c.changes();
    c.renew_write_seqs();
    assert_eq!(c.changes(), changes);
    assert_eq!(c.publisher().pools[0].seq_limit, mark);
    // Within half a lease: the next mark is committed and published.
    c.publisher_mut().room = vec![(100, 10)];
    c.renew_write_seqs();
    assert_eq!(c.changes(), changes + 1);
    let p = c.publisher().pools[0].clone();
    assert_eq!((p.seq_base, p.seq_limit), (1 + SEQ_LEASE, mark + SEQ_LEASE));
    drop(c);
    let c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    assert_eq!(c.publisher().pools[0].seq_base, mark + SEQ_LEASE);
    // RAID 0 has no copies to order: no lease, no resync.
    let d = disks(2);
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    ok(c.handle(ConfigRequest::CreatePool {
        name: "fast".into(),
        raid: RaidLevel::Raid0,
        drives: vec!["d0".into(), "d1".into()],
        chunk_bytes: 0,
    }));
    drop(c);
    let c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    let p = c.publisher().pools[0].clone();
    assert_eq!((p.seq_base, p.seq_limit), (0, 0));
}

/// `disks` as the datapath lists them, each keeping integrity records in its LBA format's
/// metadata or not (`records`).
fn drives_keeping(disks: &[MemDisk], records: &[bool]) -> Vec<Drive<MemDisk>> {
    let mut list = drives(disks);
    for (d, &r) in list.iter_mut().zip(records) {
        d.records = r;
    }
    list
}

fn create<D: duplex_metadata::MetaDisk + Clone>(
    c: &mut Cluster<D, Recorder>,
    raid: RaidLevel,
    names: &[&str],
) {
    ok(c.handle(ConfigRequest::CreatePool {
        name: "tank".into(),
        raid,
        drives: names.iter().map(|n| (*n).to_owned()).collect(),
        chunk_bytes: 0,
    }));
}

/// The layout of the tests' 256 MiB drives.
fn layout_256() -> duplex_ondisk::Layout {
    duplex_ondisk::Layout::for_drive(256 << 20, 4096).unwrap()
}

/// A pool over drives without integrity records in their LBA format (any of them) gets a
/// checksum area: published with the pool, after the member data bytes (reduced to make room
/// for it, whole chunks), inside every member's data area, 16 bytes per 512 bytes of data
/// rounded up to 4 KiB; a restart publishes the same area (it is on the drives).
#[test]
fn a_pool_over_drives_without_records_gets_a_checksum_area() {
    let l = layout_256();
    for (level, n, records) in [
        (RaidLevel::Raid1, 2, vec![false, false]),
        (RaidLevel::Raid1, 2, vec![true, false]),
        (RaidLevel::Raid10, 4, vec![false; 4]),
        (RaidLevel::Raid5, 3, vec![false; 3]),
        (RaidLevel::Raid6, 4, vec![false; 4]),
    ] {
        let d = disks(n);
        let mut c = Cluster::start(drives_keeping(&d, &records), 0, 1, Recorder::default());
        let names: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        create(&mut c, level, &names);
        let p = c.publisher_mut().pools[0].clone();
        let (offset, len) = p
            .checksum
            .unwrap_or_else(|| panic!("{level:?}: no area: {p:?}"));
        assert_eq!(p.data_offset, l.data_offset);
        assert!(p.data_len < l.data_size, "{p:?}");
        assert_eq!(p.data_len % p.chunk, 0, "{p:?}");
        assert_eq!(offset, p.data_offset + p.data_len, "right after the data");
        assert_eq!(offset % 4096, 0);
        assert_eq!(len, (p.data_len / 512 * 16).div_ceil(4096) * 4096);
        assert!(
            offset + len <= l.data_offset + l.data_size,
            "inside the data area"
        );
        // As large as the data area allows: one more chunk and its area would not fit.
        let more = p.data_len + p.chunk;
        assert!(more + (more / 512 * 16).div_ceil(4096) * 4096 > l.data_size);
        drop(c);
        let mut c = Cluster::start(drives_keeping(&d, &records), 0, 1, Recorder::default());
        let again = c.publisher_mut().pools[0].clone();
        assert_eq!(again.checksum, Some((offset, len)));
        assert_eq!(again.data_len, p.data_len);
    }
}

/// A pool over drives that all keep integrity records in their LBA format's metadata gets no
/// checksum area and uses its whole data area (whole chunks); neither does a RAID 0 pool over
/// drives without records (no copy to repair from: it keeps no records at all).
#[test]
fn pools_over_drives_with_records_and_raid0_pools_get_no_checksum_area() {
    let l = layout_256();
    for (level, records) in [
        (RaidLevel::Raid1, true),
        (RaidLevel::Raid5, true),
        (RaidLevel::Raid0, false),
        (RaidLevel::Raid0, true),
    ] {
        let d = disks(3);
        let keep = [records; 3];
        let mut c = Cluster::start(drives_keeping(&d, &keep), 0, 1, Recorder::default());
        create(&mut c, level, &["d0", "d1", "d2"]);
        let p = c.publisher_mut().pools[0].clone();
        assert_eq!(p.checksum, None, "{level:?} {records}: {p:?}");
        assert_eq!(p.data_len, l.data_size / p.chunk * p.chunk);
        drop(c);
        let mut c = Cluster::start(drives_keeping(&d, &keep), 0, 1, Recorder::default());
        assert_eq!(c.publisher_mut().pools[0].checksum, None);
    }
}

/// A hot spare or a replacement must hold the pool's checksum area too: a drive whose data
/// area holds the pool's data bytes but not the area after them is refused (nothing
/// written); a drive as large as the members is taken.
#[test]
fn spares_and_replacements_need_room_for_the_checksum_area() {
    let mut d = disks(4);
    // 251 MiB: a 169 MiB data area, more than the pool's data (about 168.7 MiB of the
    // members' 174 MiB) but not enough for its checksum area (5.3 MiB) after it.
    d.push(MemDisk::new("sim:4", 251 << 20, 4096));
    let mut list = drives(&d);
    list[4].capacity = 251 << 20;
    let mut c = Cluster::start(list, 0, 1, Recorder::default());
    create(&mut c, RaidLevel::Raid5, &["d0", "d1", "d2"]);
    let p = c.publisher_mut().pools[0].clone();
    let (offset, len) = p.checksum.unwrap();
    let small = duplex_ondisk::Layout::for_drive(251 << 20, 4096).unwrap();
    assert!(small.data_size >= p.data_len, "the data alone would fit");
    assert!(small.data_offset + small.data_size < offset + len);
    let before = d[4].writes();
    let spare = |drive: &str| ConfigRequest::AddSpare {
        pool: "tank".into(),
        drive: drive.into(),
    };
    let r = c.handle(spare("d4"));
    assert!(
        matches!(&r, ConfigReply::Error { message, .. } if message.contains("checksum area")),
        "{r:?}"
    );
    c.member_failed(100, 1).unwrap();
    let replace = |new: &str| ConfigRequest::ReplaceMember {
        pool: "tank".into(),
        old: "d1".into(),
        new: new.into(),
    };
    assert_eq!(kind(c.handle(replace("d4"))), ConfigErrorKind::Refused);
    assert_eq!(
        d[4].writes(),
        before,
        "nothing written to the refused drive"
    );
    ok(c.handle(replace("d3")));
    assert_eq!(c.publisher_mut().replaced, vec![(100, 1, 13)]);
    assert_eq!(c.publisher_mut().pools[0].checksum, Some((offset, len)));
}

/// A pool without a checksum area (its members all keep records in their LBA format's
/// metadata) takes no spare or replacement that keeps none: nothing would check that member's
/// blocks. Refused, nothing written; a drive with metadata is taken.
#[test]
fn a_pool_without_a_checksum_area_refuses_a_drive_without_records() {
    let d = disks(5);
    let mut c = Cluster::start(
        drives_keeping(&d, &[true, true, true, false, true]),
        0,
        1,
        Recorder::default(),
    );
    create(&mut c, RaidLevel::Raid5, &["d0", "d1", "d2"]);
    assert_eq!(c.publisher_mut().pools[0].checksum, None);
    let before = d[3].writes();
    let r = c.handle(ConfigRequest::AddSpare {
        pool: "tank".into(),
        drive: "d3".into(),
    });
    assert!(
        matches!(&r, ConfigReply::Error { kind: ConfigErrorKind::Refused, message } if message.contains("keeps no integrity records")),
        "{r:?}"
    );
    c.member_failed(100, 1).unwrap();
    let replace = |new: &str| ConfigRequest::ReplaceMember {
        pool: "tank".into(),
        old: "d1".into(),
        new: new.into(),
    };
    assert_eq!(kind(c.handle(replace("d3"))), ConfigErrorKind::Refused);
    assert_eq!(
        d[3].writes(),
        before,
        "nothing written to the refused drive"
    );
    ok(c.handle(replace("d4")));
    assert_eq!(c.publisher_mut().replaced, vec![(100, 1, 14)]);
}

/// A namespace's reservation state kept with its pool on the drives (ONDISK record 10) is
/// published in the export table by the NGUID of the volume the namespace exports, after a
/// restart too; a namespace removed takes its state with it (the table has none then).
#[test]
fn reservation_state_on_the_drives_is_published_with_the_namespace() {
    let d = disks(2);
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    create(&mut c, RaidLevel::Raid1, &["d0", "d1"]);
    ok(c.handle(ConfigRequest::CreateVolume {
        name: "vol0".into(),
        pool: "tank".into(),
        size_bytes: 64 << 20,
    }));
    ok(c.handle(ConfigRequest::CreateSubsystem(NQN.into())));
    ok(c.handle(ConfigRequest::AddNamespace {
        nqn: NQN.into(),
        volume: "vol0".into(),
        nsid: 0,
    }));
    assert!(c.publisher_mut().reservations.is_empty());
    let nguid = c.publisher_mut().exports[0].namespaces[0].nguid;
    drop(c);
    // Written to the drives as the reservation path will: Write Exclusive held by the first of
    // two registrants, PTPL on.
    let (mut store, _, _) =
        duplex_metadata::store::PoolStore::import(d.clone(), None, false, 0).unwrap();
    let mut cfg = store.config().clone();
    cfg.reservations.push(duplex_ondisk::Reservation {
        subnqn: NQN.into(),
        nsid: 1,
        version: 3,
        generation: 4,
        rtype: 1,
        ptpl: true,
        holder: [0xA; 16],
        registrants: vec![
            duplex_ondisk::ReservationRegistrant {
                host_id: [0xA; 16],
                key: 0xA1,
                cntlid: 0xFFFF,
            },
            duplex_ondisk::ReservationRegistrant {
                host_id: [0xB; 16],
                key: 0xB1,
                cntlid: 0xFFFF,
            },
        ],
    });
    store.commit(cfg).unwrap();
    drop(store);
    let mut c = Cluster::start(drives(&d), 0, 1, Recorder::default());
    let r = c.publisher_mut().reservations.clone();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].nguid, nguid);
    assert_eq!(
        (
            r[0].version,
            r[0].generation,
            r[0].rtype,
            r[0].ptpl,
            r[0].holder
        ),
        (3, 4, 1, true, [0xA; 16])
    );
    let keys: Vec<(u8, u64)> = r[0]
        .registrants
        .iter()
        .map(|g| (g.host_id[0], g.key))
        .collect();
    assert_eq!(keys, vec![(0xA, 0xA1), (0xB, 0xB1)]);
    // The table the fabric reads accepts it.
    duplex_ipc::exports::ExportTable {
        generation: 1,
        subsystems: c.publisher_mut().exports.clone(),
        ana: c.publisher_mut().ana.clone(),
        reservations: r,
    }
    .validate()
    .unwrap();
    ok(c.handle(ConfigRequest::RemoveNamespace {
        nqn: NQN.into(),
        nsid: 1,
    }));
    assert!(c.publisher_mut().reservations.is_empty());
}

/// A host's reservation command for the property test: who, and what (keys from a small set
/// so that keys collide and conflicts happen).
#[derive(Clone, Debug)]
enum ResvOp {
    Register {
        rrega: u32,
        cptpl: u32,
        crkey: u64,
        nrkey: u64,
    },
    Acquire {
        racqa: u32,
        rtype: u32,
        crkey: u64,
        prkey: u64,
    },
    Release {
        rrela: u32,
        rtype: u32,
        crkey: u64,
    },
    SetPtpl(bool),
}

impl ResvOp {
    fn command(&self) -> duplex_ipc::resv::ResvCommand {
        use duplex_ipc::resv::ResvCommand;
        let two = |a: u64, b: u64| [a.to_le_bytes(), b.to_le_bytes()].concat();
        match *self {
            Self::Register {
                rrega,
                cptpl,
                crkey,
                nrkey,
            } => ResvCommand::Register {
                cdw10: rrega | cptpl << 30,
                data: two(crkey, nrkey),
            },
            Self::Acquire {
                racqa,
                rtype,
                crkey,
                prkey,
            } => ResvCommand::Acquire {
                cdw10: racqa | rtype << 8,
                data: two(crkey, prkey),
            },
            Self::Release {
                rrela,
                rtype,
                crkey,
            } => ResvCommand::Release {
                cdw10: rrela | rtype << 8,
                data: crkey.to_le_bytes().to_vec(),
            },
            Self::SetPtpl(on) => ResvCommand::SetPtpl(on),
        }
    }

    /// The model's answer, applied to `m`.
    fn apply(&self, m: &mut duplex_nvme::resv::Reservations, host: [u8; 16]) -> Result<(), u16> {
        use duplex_ipc::resv::ResvCommand;
        use duplex_nvme::resv::{Acquire, HostCtrl, HostId, Register, Release};
        let who = HostCtrl {
            host: HostId(host),
            cntlid: 0xFFFF,
        };
        let r = match self.command() {
            ResvCommand::Register { cdw10, data } => {
                Register::decode(cdw10, &data).and_then(|c| m.register(who, &c))
            }
            ResvCommand::Acquire { cdw10, data } => {
                Acquire::decode(cdw10, &data).and_then(|c| m.acquire(who.host, &c))
            }
            ResvCommand::Release { cdw10, data } => {
                Release::decode(cdw10, &data).and_then(|c| m.release(who.host, &c))
            }
            ResvCommand::SetPtpl(on) => {
                m.set_ptpl(on);
                Ok(Default::default())
            }
        };
        r.map(|_| ()).map_err(|s| s.0)
    }
}

fn resv_op() -> impl proptest::strategy::Strategy<Value = ResvOp> {
    use proptest::prelude::*;
    let key = 0u64..4;
    prop_oneof![
        (
            0u32..3,
            prop_oneof![Just(0u32), Just(2), Just(3)],
            key.clone(),
            key.clone()
        )
            .prop_map(|(rrega, cptpl, crkey, nrkey)| ResvOp::Register {
                rrega,
                cptpl,
                crkey,
                nrkey
            }),
        (0u32..3, 1u32..7, key.clone(), key.clone()).prop_map(|(racqa, rtype, crkey, prkey)| {
            ResvOp::Acquire {
                racqa,
                rtype,
                crkey,
                prkey,
            }
        }),
        (0u32..2, 1u32..7, key).prop_map(|(rrela, rtype, crkey)| ResvOp::Release {
            rrela,
            rtype,
            crkey
        }),
        any::<bool>().prop_map(ResvOp::SetPtpl),
    ]
}

/// A drive of a controller that may be killed: every drive of it counts down the same budget
/// of writes and flushes; the one that exhausts it fails (its write torn or not) and every
/// drive of the controller loses what it had not flushed and fails from then on, as when the
/// metadata service (or its whole node) dies mid-commit.
#[derive(Clone, Debug)]
struct Killable {
    disk: MemDisk,
    all: Vec<MemDisk>,
    budget: std::rc::Rc<std::cell::Cell<Option<(u64, bool)>>>,
}

impl Killable {
    fn spend(&mut self) {
        match self.budget.get() {
            Some((0, tear)) => {
                self.budget.set(None);
                self.disk.crash_after(0, tear);
                for d in &self.all {
                    if !d.crashed() {
                        d.power_cut();
                    }
                }
                // The crashing drive's own unflushed writes go with its crash.
            }
            Some((n, tear)) => self.budget.set(Some((n - 1, tear))),
            None => {}
        }
    }
}

impl duplex_metadata::MetaDisk for Killable {
    fn label(&self) -> &str {
        self.disk.label()
    }
    fn capacity(&self) -> u64 {
        self.disk.capacity()
    }
    fn block_size(&self) -> u32 {
        self.disk.block_size()
    }
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, duplex_metadata::DiskError> {
        self.disk.read(offset, len)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), duplex_metadata::DiskError> {
        self.spend();
        self.disk.write(offset, data)
    }
    fn flush(&mut self) -> Result<(), duplex_metadata::DiskError> {
        self.spend();
        self.disk.flush()
    }
}

type Budget = std::rc::Rc<std::cell::Cell<Option<(u64, bool)>>>;

fn killable_drives(d: &[MemDisk], budget: &Budget) -> Vec<Drive<Killable>> {
    drives(d)
        .into_iter()
        .map(|x| Drive {
            name: x.name,
            address: x.address,
            id: x.id,
            capacity: x.capacity,
            block_size: x.block_size,
            disk: Killable {
                disk: x.disk,
                all: d.to_vec(),
                budget: budget.clone(),
            },
            state: x.state,
            pool: x.pool,
            slot: x.slot,
            spare: x.spare,
            records: x.records,
        })
        .collect()
}

/// The state the metadata service published for the namespace (none yet: the empty state).
fn published_resv(c: &mut Cluster<Killable, Recorder>) -> duplex_nvme::resv::ResvState {
    let r = c.publisher_mut().reservations.clone();
    assert!(r.len() <= 1, "{r:?}");
    r.first().map_or_else(Default::default, |r| {
        duplex_nvme::resv::ResvState::from_kept(
            r.registrants.iter().map(|g| (g.host_id, g.cntlid, g.key)),
            r.rtype,
            r.holder,
            r.generation,
            r.ptpl,
        )
    })
}

fn exported_mirror(d: &[MemDisk], budget: &Budget) -> Cluster<Killable, Recorder> {
    let mut c = Cluster::start(killable_drives(d, budget), 0, 1, Recorder::default());
    create(&mut c, RaidLevel::Raid1, &["d0", "d1"]);
    ok(c.handle(ConfigRequest::CreateVolume {
        name: "vol0".into(),
        pool: "tank".into(),
        size_bytes: 16 << 20,
    }));
    ok(c.handle(ConfigRequest::CreateSubsystem(NQN.into())));
    ok(c.handle(ConfigRequest::AddNamespace {
        nqn: NQN.into(),
        volume: "vol0".into(),
        nsid: 1,
    }));
    c
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// Random reservation commands from three hosts, with the metadata service killed at random
    /// points (a drive write or flush fails mid-commit, torn or not, every drive loses what it
    /// had not flushed, and a new service imports the pool): what the service publishes is
    /// always the model's state after the commands it answered; a command cut off by the kill
    /// is either wholly there or wholly not.
    #[test]
    fn reservation_state_through_random_kills_is_the_models(
        steps in proptest::collection::vec(
            (0u8..3, resv_op(), proptest::option::weighted(0.25, (0u64..12, proptest::bool::ANY))),
            1..24,
        )
    ) {
        let d = disks(2);
        let budget: Budget = std::rc::Rc::new(std::cell::Cell::new(None));
        let mut c = exported_mirror(&d, &budget);
        let mut model = duplex_nvme::resv::Reservations::new();
        for (host, op, kill) in steps {
            let host = [host + 1; 16];
            budget.set(kill);
            let request = duplex_ipc::resv::ResvRequest {
                subnqn: NQN.into(),
                nsid: 1,
                host_id: host,
                cntlid: 0xFFFF,
                command: op.command(),
            };
            let reply = c.reservation(&request);
            let mut next = model.clone();
            let expected = op.apply(&mut next, host);
            let crashed = d.iter().any(MemDisk::crashed);
            match reply {
                duplex_ipc::resv::ResvReply::Done(done) => {
                    proptest::prop_assert_eq!(done.status != 0, expected.is_err(), "{:?} {:?}", op, done);
                    if let Err(status) = expected {
                        proptest::prop_assert_eq!(done.status, status);
                    } else {
                        model = next.clone();
                    }
                }
                other => {
                    // Only a kill stops a command the model takes or refuses.
                    proptest::prop_assert!(crashed, "{:?} answered {:?}", op, other);
                }
            }
            if crashed || kill.is_some() {
                // The service dies; the drives come back with what reached them.
                drop(c);
                for disk in &d {
                    disk.restart();
                }
                budget.set(None);
                c = Cluster::start(killable_drives(&d, &budget), 0, 1, Recorder::default());
                let got = published_resv(&mut c);
                if got != model.state() {
                    // The command under way at the kill: all of it or none.
                    proptest::prop_assert!(expected.is_ok() && got == next.state(),
                        "after a kill: {:?}, model {:?}, with the command {:?}", got, model.state(), next.state());
                    model = next;
                }
            }
            proptest::prop_assert_eq!(published_resv(&mut c), model.state());
        }
    }
}

/// A takeover that fails (the drives unreadable at the moment the peer's slot is claimed) is
/// not given up: it is tried again once [`TAKEOVER_RETRY`] has passed, while the slot stays
/// claimed, and then succeeds (ownership to this node, epoch + 1).
#[test]
fn a_failed_takeover_is_tried_again_until_it_succeeds() {
    let d = disks(2);
    let mut owner = Cluster::start_member(drives(&d), 0, Some(0), 1, Recorder::default());
    ok(owner.handle(ConfigRequest::CreatePool {
        name: "tank".into(),
        raid: RaidLevel::Raid1,
        drives: vec!["d0".into(), "d1".into()],
        chunk_bytes: 0,
    }));
    let ConfigReply::Pools(before) = owner.handle(ConfigRequest::ListPools) else {
        panic!("pools");
    };
    drop(owner);
    let mut standby = Cluster::start_member(drives(&d), 1, Some(0), 1, Recorder::default());
    let t0 = std::time::Instant::now();
    for disk in &d {
        disk.set_failed(true);
    }
    assert!(
        !standby.claims_at(1, t0),
        "taken over from unreadable drives"
    );
    for disk in &d {
        disk.set_failed(false);
    }
    // Not yet due: nothing tried, nothing changed.
    assert!(!standby.claims_at(1, t0));
    let ConfigReply::Pools(seen) = standby.handle(ConfigRequest::ListPools) else {
        panic!("pools");
    };
    assert_eq!(seen[0].owner_node, 0, "still the peer's");
    // Due: tried again, and taken over.
    assert!(standby.claims_at(1, t0 + duplex_metadata::cluster::TAKEOVER_RETRY));
    let ConfigReply::Pools(after) = standby.handle(ConfigRequest::ListPools) else {
        panic!("pools");
    };
    assert_eq!(after[0].owner_node, 1, "this node's now");
    assert_eq!(after[0].epoch, before[0].epoch + 1);
    // Nothing left to retry.
    assert!(!standby.claims_at(1, t0 + 10 * duplex_metadata::cluster::TAKEOVER_RETRY));
}
