//! The pool store over drives in memory: format, commit and import; a commit cut by a power
//! loss at every write or flush it makes (torn or not) leaves the change wholly present or
//! wholly absent; a member failing during a commit is failed in the next generation and is
//! stale when it comes back; a refused import writes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use duplex_metadata::disk::{DiskError, MemDisk, MetaDisk};
use duplex_metadata::ops;
use duplex_metadata::store::{FormatSpec, PoolStore, StoreError};
use duplex_ondisk::import::{MemberStatus, StaleReason};
use duplex_ondisk::{MemberState, PoolConfig, RaidLevel, Uuid};

const CAP: u64 = 256 << 20;

fn uuid(n: u8) -> Uuid {
    let mut u = [0x5a; 16];
    u[0] = n;
    Uuid(u)
}

fn spec(level: RaidLevel, n: usize) -> FormatSpec {
    FormatSpec {
        name: "tank".into(),
        uuid: uuid(1),
        level,
        chunk_size: 64 << 10,
        cluster_uuid: uuid(2),
        node: 0,
        drive_uuids: (0..n).map(|i| uuid(10 + i as u8)).collect(),
        subsystems: vec![],
        host_secrets: vec![],
        cluster_generation: 1,
        // Drives without integrity records in their LBA format (in-memory drives).
        checksum_area: duplex_metadata::store::needs_checksum_area(level, false),
    }
}

/// A drive whose power is shared with the others of its group: after the group's budget of
/// writes and flushes is spent, every drive of the group loses power at once.
#[derive(Clone, Debug)]
struct Node {
    disk: MemDisk,
    budget: Arc<AtomicI64>,
    group: Arc<Vec<MemDisk>>,
    tear: bool,
}

impl Node {
    fn spend(&self) -> bool {
        if self.budget.fetch_sub(1, Ordering::SeqCst) == 1 {
            for d in self.group.iter() {
                if !self.tear || d.label() != self.disk.label() {
                    d.power_cut();
                }
            }
            if self.tear {
                self.disk.crash_after(0, true);
            }
            return true;
        }
        false
    }
}

impl MetaDisk for Node {
    fn label(&self) -> &str {
        self.disk.label()
    }
    fn capacity(&self) -> u64 {
        self.disk.capacity()
    }
    fn block_size(&self) -> u32 {
        self.disk.block_size()
    }
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        self.disk.read(offset, len)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let cut = self.spend();
        let r = self.disk.write(offset, data);
        if cut {
            // A torn write reached the medium in part; the others were lost with the cache.
            for d in self.group.iter() {
                d.power_cut();
            }
        }
        r
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.spend();
        self.disk.flush()
    }
}

fn disks(n: usize) -> Vec<MemDisk> {
    (0..n)
        .map(|i| MemDisk::new(&format!("d{i}"), CAP, 4096))
        .collect()
}

fn with_volume(cfg: &PoolConfig, name: &str) -> PoolConfig {
    let tag = name.bytes().fold(50u8, u8::wrapping_add);
    let mut nguid = [7; 16];
    nguid[0] = tag;
    ops::create_volume(cfg, name, 64 << 20, 4096, uuid(tag), nguid, &[]).unwrap()
}

#[test]
fn a_formatted_pool_imports_with_every_commit() {
    let d = disks(2);
    let mut store = PoolStore::format(&spec(RaidLevel::Raid1, 2), d.clone()).unwrap();
    assert_eq!(store.stamp().generation, 1);
    let cfg = with_volume(store.config(), "v1");
    store.commit(cfg.clone()).unwrap();
    let cfg2 = ops::create_subsystem(&cfg, "nqn.2026-12.io.duplex:s1", "SER1", "duplex").unwrap();
    let stamp = store.commit(cfg2.clone()).unwrap();
    assert_eq!(stamp.generation, 3);
    drop(store);
    let (store, plan, rest) = PoolStore::import(d.clone(), None, false, 0).unwrap();
    assert!(rest.is_empty());
    assert_eq!(store.config(), &cfg2);
    assert_eq!(store.stamp().generation, 3);
    assert!(plan.repairs.is_empty(), "{:?}", plan.repairs);
    // A drive of this pool cannot be formatted into another.
    let e = PoolStore::format(&spec(RaidLevel::Raid1, 2), d).unwrap_err();
    assert!(e.to_string().contains("belongs to pool"), "{e}");
}

/// Runs one commit with the whole node losing power after `budget` writes/flushes (torn or
/// not); returns what import finds afterwards.
fn cut_commit(
    level: RaidLevel,
    n: usize,
    budget: i64,
    tear_on: Option<usize>,
) -> (PoolConfig, PoolConfig, PoolConfig, bool) {
    let d = disks(n);
    let mut store = PoolStore::format(&spec(level, n), d.clone()).unwrap();
    let before = with_volume(store.config(), "v1");
    store.commit(before.clone()).unwrap();
    // The change: a member state change too, so superblocks are rewritten in the commit.
    let mut after = with_volume(&before, "v2");
    after.pool.members[n - 1].state = MemberState::Failed;
    after.pool.members[n - 1].changed_generation = 3;
    drop(store);
    let group = Arc::new(d.clone());
    let counter = Arc::new(AtomicI64::new(budget));
    let nodes: Vec<Node> = d
        .iter()
        .enumerate()
        .map(|(i, disk)| Node {
            disk: disk.clone(),
            budget: Arc::clone(&counter),
            group: Arc::clone(&group),
            tear: tear_on == Some(i),
        })
        .collect();
    let (mut store, _, _) = PoolStore::import(nodes, None, false, 0).unwrap();
    let ok = store.commit(after.clone()).is_ok();
    for disk in &d {
        disk.restart();
    }
    let (found, _, _) = PoolStore::import(d.clone(), None, true, 0).unwrap();
    (before, after, found.config().clone(), ok)
}

#[test]
fn a_commit_cut_anywhere_is_wholly_present_or_wholly_absent() {
    for (level, n) in [
        (RaidLevel::Raid1, 2),
        (RaidLevel::Raid10, 4),
        (RaidLevel::Raid1, 3),
    ] {
        // How many writes and flushes one commit makes.
        let d = disks(n);
        let mut store = PoolStore::format(&spec(level, n), d.clone()).unwrap();
        let cfg = with_volume(store.config(), "v1");
        store.commit(cfg.clone()).unwrap();
        let mut after = with_volume(&cfg, "v2");
        after.pool.members[n - 1].state = MemberState::Failed;
        let w0: u64 = d.iter().map(MemDisk::writes).sum();
        store.commit(after).unwrap();
        let ops_per_commit = d.iter().map(MemDisk::writes).sum::<u64>() - w0;
        assert!(ops_per_commit >= 3 * n as u64, "{ops_per_commit}");
        let mut present = 0;
        let mut absent = 0;
        for budget in 1..=ops_per_commit as i64 + 1 {
            for tear in [None, Some(0), Some(n - 1)] {
                let (before, after, found, ok) = cut_commit(level, n, budget, tear);
                // The failed member's later state is what import sees; volumes decide.
                let has_v2 = found.volumes.iter().any(|v| v.name == "v2");
                if has_v2 {
                    assert_eq!(found.volumes, after.volumes, "{level:?} budget {budget}");
                    present += 1;
                } else {
                    assert_eq!(found.volumes, before.volumes, "{level:?} budget {budget}");
                    assert!(
                        !ok,
                        "an acknowledged commit was lost ({level:?}, budget {budget})"
                    );
                    absent += 1;
                }
            }
        }
        assert!(present > 0 && absent > 0, "{present} {absent}");
    }
}

#[test]
fn a_member_failing_during_a_commit_is_failed_and_stale_when_it_returns() {
    let d = disks(2);
    let mut store = PoolStore::format(&spec(RaidLevel::Raid1, 2), d.clone()).unwrap();
    d[1].set_failed(true);
    let cfg = with_volume(store.config(), "v1");
    let stamp = store.commit(cfg).unwrap();
    assert_eq!(store.config().pool.members[1].state, MemberState::Failed);
    assert!(
        stamp.generation >= 3,
        "the retry is above the partial generation"
    );
    assert_eq!(store.member_labels(), vec![Some("d0".into()), None]);
    drop(store);
    d[1].set_failed(false);
    let (store, plan, rest) = PoolStore::import(d.clone(), None, false, 0).unwrap();
    assert_eq!(
        plan.members[1].status,
        MemberStatus::Stale(StaleReason::Failed)
    );
    assert_eq!(rest.len(), 1, "the stale member is handed back, untouched");
    assert_eq!(store.member_labels(), vec![Some("d0".into()), None]);
    // Without the surviving member, the failed one alone holds an older pool in which
    // d0 is active and missing: refused without force.
    drop(store);
    let e = PoolStore::import(vec![d[1].clone()], None, false, 0).unwrap_err();
    assert!(matches!(e, StoreError::Import(_)), "{e}");
    assert!(e.to_string().contains("missing"), "{e}");
    // Both members failing: the commit fails, saying so.
    let (mut store, _, _) = PoolStore::import(vec![d[0].clone()], None, false, 0).unwrap();
    d[0].set_failed(true);
    let e = store.commit(with_volume(store.config(), "v2")).unwrap_err();
    assert!(matches!(e, StoreError::CommitFailed { .. }), "{e}");
}

#[test]
fn a_refused_import_writes_nothing_and_a_corrupt_copy_is_repaired() {
    let d = disks(2);
    let mut store = PoolStore::format(&spec(RaidLevel::Raid1, 2), d.clone()).unwrap();
    store.commit(with_volume(store.config(), "v1")).unwrap();
    let slot = (store.next_slot() + 7) % 8; // the newest image's slot
    let layout = store.layout(0).unwrap();
    drop(store);
    // The newest image on d0 corrupted: the winner is d1's; d0's slot is rewritten.
    let at = layout.metadata_slot_offset(slot).unwrap();
    d[0].poke(at + 200, &[0xff; 16]);
    d[0].poke(0, &[0xee; 8]); // and its primary superblock
    let (store, plan, _) = PoolStore::import(d.clone(), None, false, 0).unwrap();
    assert_eq!(store.stamp().generation, 2);
    assert_eq!(plan.repairs.len(), 2, "{:?}", plan.repairs);
    drop(store);
    let (_, plan, _) = PoolStore::import(d.clone(), None, false, 0).unwrap();
    assert!(
        plan.repairs.is_empty(),
        "repaired for good: {:?}",
        plan.repairs
    );
    // Every copy of every image on every member destroyed: refused, nothing written.
    for disk in &d {
        for i in 0..8 {
            disk.poke(layout.metadata_slot_offset(i).unwrap(), &[0xab; 4096]);
        }
    }
    let before: Vec<u64> = d.iter().map(MemDisk::writes).collect();
    let e = PoolStore::import(d.clone(), None, true, 0).unwrap_err();
    assert!(matches!(e, StoreError::Import(_)), "{e}");
    let after: Vec<u64> = d.iter().map(MemDisk::writes).collect();
    assert_eq!(before, after, "a refused import wrote");
}

/// Format with a checksum area: the area is in the image (imported back as it was), right
/// after the member data bytes and inside every member's data area; without one (drives that
/// keep records, or RAID 0) the pool uses its whole data area. An image whose area does not lie
/// in a member's data area (here: committed past it) is not imported, and nothing is written.
#[test]
fn a_checksum_area_is_formatted_imported_and_checked_against_the_layout() {
    let layout = duplex_ondisk::Layout::for_drive(CAP, 4096).unwrap();
    let d = disks(2);
    let store = PoolStore::format(&spec(RaidLevel::Raid1, 2), d.clone()).unwrap();
    let cfg = store.config().clone();
    let area = cfg.checksum_area.expect("a checksum area");
    let (data, len) = duplex_ondisk::checksum_split(layout.data_size, 64 << 10).unwrap();
    assert_eq!(cfg.pool.member_data_bytes, data);
    assert_eq!(area.offset, layout.data_offset + data);
    assert_eq!(area.len, len);
    assert!(area.offset + area.len <= layout.data_end());
    drop(store);
    let (mut store, _, _) = PoolStore::import(d.clone(), None, false, 0).unwrap();
    assert_eq!(store.config(), &cfg);

    // A commit cannot change the area.
    let mut bad = cfg.clone();
    bad.checksum_area = Some(duplex_ondisk::ChecksumArea {
        offset: layout.data_end(),
        len: area.len,
    });
    let e = store.commit(bad.clone()).unwrap_err();
    assert!(e.to_string().contains("checksum area"), "{e}");
    drop(store);
    // An image (generation 2, slot 1, on both members) whose area lies past the data area:
    // valid on its own (aligned, large enough, after the data), not on these drives.
    let image = duplex_ondisk::MetadataImage {
        slot_index: 1,
        generation: 2,
        epoch: 1,
        writer_node: 0,
        config: bad,
    }
    .encode(layout.metadata_slot_size as usize)
    .unwrap();
    for disk in &d {
        disk.poke(layout.metadata_slot_offset(1).unwrap(), &image);
    }
    let before: Vec<u64> = d.iter().map(MemDisk::writes).collect();
    let e = PoolStore::import(d.clone(), None, false, 0).unwrap_err();
    assert!(e.to_string().contains("checksum area"), "{e}");
    assert!(e.to_string().contains("not imported"), "{e}");
    assert_eq!(d.iter().map(MemDisk::writes).collect::<Vec<_>>(), before);

    // Without an area (drives that keep records; RAID 0): the whole data area, in chunks.
    for level in [RaidLevel::Raid1, RaidLevel::Raid0] {
        let d = disks(2);
        let mut s = spec(level, 2);
        s.checksum_area = false;
        let store = PoolStore::format(&s, d).unwrap();
        assert_eq!(store.config().checksum_area, None);
        assert_eq!(
            store.config().pool.member_data_bytes,
            layout.data_size / (64 << 10) * (64 << 10)
        );
    }
    assert!(!duplex_metadata::store::needs_checksum_area(
        RaidLevel::Raid0,
        false
    ));
    assert!(!duplex_metadata::store::needs_checksum_area(
        RaidLevel::Raid5,
        true
    ));
    assert!(duplex_metadata::store::needs_checksum_area(
        RaidLevel::Raid5,
        false
    ));
}
