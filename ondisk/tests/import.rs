//! The import rule, scenario by scenario (`docs/ONDISK.md`, "Import").

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use duplex_ondisk::import::{
    plan_import, CopyState, DriveRole, ImportError, ImportPlan, MemberStatus, Repair, SlotState,
    StaleReason, SuperblockRepair,
};
use duplex_ondisk::{MemberState, RaidLevel, Stamp, SuperblockCopy, Uuid};

fn stamp(epoch: u64, generation: u64) -> Stamp {
    Stamp { epoch, generation }
}

fn status(plan: &ImportPlan, slot: u32) -> &MemberStatus {
    &plan.members.iter().find(|m| m.slot == slot).unwrap().status
}

fn sb_repairs(plan: &ImportPlan) -> Vec<(String, SuperblockCopy, SuperblockRepair)> {
    plan.repairs
        .iter()
        .filter_map(|r| match r {
            Repair::Superblock {
                drive,
                copy,
                reason,
            } => Some((drive.clone(), *copy, *reason)),
            _ => None,
        })
        .collect()
}

fn slot_repairs(plan: &ImportPlan) -> Vec<(String, u32)> {
    plan.repairs
        .iter()
        .filter_map(|r| match r {
            Repair::MetadataSlot { drive, slot, .. } => Some((drive.clone(), *slot)),
            _ => None,
        })
        .collect()
}

/// A three-way mirror with a few commits: generations 1..=4, newest in slot 3.
fn mirror() -> Sim {
    let mut sim = Sim::new(RaidLevel::Raid1, 3);
    sim.add_volume();
    sim.add_volume();
    sim.add_volume();
    sim
}

#[test]
fn clean_pool_imports_without_repairs() {
    let sim = mirror();
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(plan.pool, POOL);
    assert_eq!(plan.winner, sim.image());
    assert_eq!(plan.winner.stamp(), stamp(1, 4));
    assert_eq!(plan.source.drive, "d0");
    assert_eq!(plan.source.slot, 3);
    assert_eq!(plan.next_slot, 4);
    assert!(plan.repairs.is_empty(), "{:?}", plan.repairs);
    for s in 0..3 {
        assert_eq!(
            *status(&plan, s),
            MemberStatus::Current {
                newest: Some(stamp(1, 4))
            }
        );
    }
    let d0 = &plan.drives[0];
    assert_eq!(d0.primary, CopyState::Chosen);
    assert_eq!(d0.secondary, CopyState::Agrees);
    assert_eq!(d0.slots[0], SlotState::Valid { stamp: stamp(1, 1) });
    assert_eq!(d0.slots[7], SlotState::Empty);
    assert!(matches!(d0.role, DriveRole::Member { slot: 0, .. }));
    // Naming the pool explicitly gives the same plan.
    let mut req = sim.request(false);
    req.pool = Some(POOL);
    assert_eq!(plan_import(&req).unwrap(), plan);
}

#[test]
fn ring_wraps() {
    let mut sim = mirror();
    for _ in 0..6 {
        sim.commit(|c| c.cluster_generation += 1);
    }
    // Generation 10 is in slot 1 (generation 1 was in slot 0).
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(plan.winner.generation, 10);
    assert_eq!(plan.source.slot, 1);
    assert_eq!(plan.next_slot, 2);
    assert_eq!(plan.winner.config.cluster_generation, 7);
}

#[test]
fn corrupt_primary_superblock() {
    let mut sim = mirror();
    flip(&mut sim.drives[1].primary, 80);
    let plan = plan_import(&sim.request(false)).unwrap();
    assert!(matches!(plan.drives[1].primary, CopyState::Invalid(_)));
    assert_eq!(plan.drives[1].secondary, CopyState::Chosen);
    assert_eq!(
        sb_repairs(&plan),
        [(
            "d1".to_string(),
            SuperblockCopy::Primary,
            SuperblockRepair::Invalid
        )]
    );
    assert!(slot_repairs(&plan).is_empty());
}

#[test]
fn corrupt_or_unreadable_secondary_superblock() {
    let mut sim = mirror();
    flip(&mut sim.drives[2].secondary, 3000);
    sim.drives[0].secondary = None;
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(
        sb_repairs(&plan),
        [
            (
                "d0".to_string(),
                SuperblockCopy::Secondary,
                SuperblockRepair::Unreadable
            ),
            (
                "d2".to_string(),
                SuperblockCopy::Secondary,
                SuperblockRepair::Invalid
            ),
        ]
    );
}

#[test]
fn a_copy_at_the_wrong_place_is_invalid() {
    let mut sim = mirror();
    sim.drives[1].secondary = sim.drives[1].primary.clone();
    let plan = plan_import(&sim.request(false)).unwrap();
    assert!(matches!(plan.drives[1].secondary, CopyState::Invalid(_)));
    assert_eq!(sb_repairs(&plan).len(), 1);
}

#[test]
fn outdated_superblock_copy_is_repaired_from_the_newer_one() {
    let mut sim = mirror();
    let old_secondary = sim.drives[0].secondary.clone();
    sim.take_over(1); // rewrites superblocks at epoch 2
    let taken_over = sim.clone();
    sim.drives[0].secondary = old_secondary;
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(plan.drives[0].primary, CopyState::Chosen);
    assert_eq!(
        plan.drives[0].secondary,
        CopyState::Outdated { stamp: stamp(1, 1) }
    );
    assert_eq!(
        sb_repairs(&plan),
        [(
            "d0".to_string(),
            SuperblockCopy::Secondary,
            SuperblockRepair::Outdated
        )]
    );
    // The newer copy wins even when it is the secondary.
    let mut sim2 = taken_over;
    sim2.drives[0].primary = mirror().drives[0].primary.clone();
    let plan = plan_import(&sim2.request(false)).unwrap();
    assert_eq!(plan.drives[0].secondary, CopyState::Chosen);
    assert_eq!(
        plan.drives[0].primary,
        CopyState::Outdated { stamp: stamp(1, 1) }
    );
    assert_eq!(plan.drives[0].superblock.unwrap().epoch, 2);
}

#[test]
fn both_superblocks_bad_means_the_drive_cannot_take_part() {
    let mut sim = mirror();
    flip(&mut sim.drives[2].primary, 10);
    sim.drives[2].secondary = None;
    // Member 2 is active and now missing.
    let e = plan_import(&sim.request(false)).unwrap_err();
    let ImportError::MissingMembers { missing, unusable } = &e else {
        panic!("{e}");
    };
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0].drive_uuid, drive_uuid(2));
    assert_eq!(unusable, &["d2".to_string()]);
    let msg = e.to_string();
    assert!(msg.contains("d2"), "{msg}");
    let plan = plan_import(&sim.request(true)).unwrap();
    assert_eq!(plan.drives[2].role, DriveRole::Unusable);
    assert_eq!(*status(&plan, 2), MemberStatus::Missing);
    assert!(plan.drives[2].slots.is_empty());
}

#[test]
fn corrupt_newest_slot_on_one_member() {
    let mut sim = mirror();
    flip(&mut sim.drives[1].slots[3], 20); // header CRC
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(plan.winner.stamp(), stamp(1, 4));
    assert_eq!(
        *status(&plan, 1),
        MemberStatus::Current {
            newest: Some(stamp(1, 3))
        }
    );
    assert!(matches!(plan.drives[1].slots[3], SlotState::Invalid(_)));
    assert_eq!(slot_repairs(&plan), [("d1".to_string(), 3)]);
    assert!(sb_repairs(&plan).is_empty());
}

#[test]
fn torn_newest_slot_header_valid_body_not() {
    let mut sim = mirror();
    // The header (first 128 bytes) was written, the body's last block was not.
    let torn = {
        let mut b = sim.drives[0].slots[3].clone().unwrap();
        let prev = sim.drives[0].slots[2].clone().unwrap();
        let n = b.len().min(prev.len());
        b[128..n].copy_from_slice(&prev[128..n]);
        b
    };
    sim.drives[0].slots[3] = Some(torn);
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(plan.winner.stamp(), stamp(1, 4));
    assert_ne!(plan.source.drive, "d0");
    let SlotState::Invalid(e) = &plan.drives[0].slots[3] else {
        panic!("{:?}", plan.drives[0].slots[3]);
    };
    assert_eq!(e.structure, duplex_ondisk::Structure::ImageBody);
    assert_eq!(slot_repairs(&plan), [("d0".to_string(), 3)]);
}

#[test]
fn a_commit_that_reached_only_one_member() {
    let mut sim = mirror();
    // Generation 5 written to member 2 only, then the owner died: it wins (it was valid where
    // written), and the others get it rewritten.
    sim.commit_to(&[2], |c| c.cluster_generation = 42);
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(plan.winner.generation, 5);
    assert_eq!(plan.winner.config.cluster_generation, 42);
    assert_eq!(plan.source.drive, "d2");
    assert_eq!(
        slot_repairs(&plan),
        [("d0".to_string(), 4), ("d1".to_string(), 4)]
    );
    let Repair::MetadataSlot { found, .. } = &plan.repairs[0] else {
        panic!()
    };
    assert_eq!(*found, SlotState::Empty);
}

#[test]
fn all_copies_gone_on_one_member() {
    let mut sim = mirror();
    for s in sim.drives[1].slots.iter_mut() {
        *s = None;
    }
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(*status(&plan, 1), MemberStatus::Current { newest: None });
    assert_eq!(slot_repairs(&plan), [("d1".to_string(), 3)]);
    let Repair::MetadataSlot { found, .. } = &plan.repairs[0] else {
        panic!()
    };
    assert_eq!(*found, SlotState::Unreadable);
}

#[test]
fn all_copies_gone_on_all_members_refuses() {
    let mut sim = mirror();
    for d in sim.drives.iter_mut() {
        for (i, s) in d.slots.iter_mut().enumerate() {
            if i % 2 == 0 {
                *s = None;
            } else {
                flip(s, 200 + i);
            }
        }
    }
    let e = plan_import(&sim.request(true)).unwrap_err();
    let ImportError::NoValidImage { pool, drives } = &e else {
        panic!("{e}");
    };
    assert_eq!(*pool, POOL);
    assert_eq!(drives.len(), 3);
    let msg = e.to_string();
    assert!(
        msg.starts_with("No valid metadata image on any drive of pool"),
        "{msg}"
    );
    assert!(msg.contains("d1: slot 0 unreadable"), "{msg}");
}

#[test]
fn an_older_epoch_never_wins_even_with_a_higher_generation() {
    let mut sim = mirror();
    let stale_writer = sim.clone();
    sim.take_over(1); // epoch 2, generation 5
    assert_eq!(sim.image().stamp(), stamp(2, 5));
    // The old owner, not yet fenced, writes generations 5..=7 at epoch 1 to member 0.
    let mut old = stale_writer;
    for _ in 0..3 {
        old.commit_to(&[0], |c| c.cluster_generation += 100);
    }
    assert_eq!(old.image().stamp(), stamp(1, 7));
    // Its generation 7 lands in slot 6, generation 6 in slot 5 (the new owner's generation 5
    // is in slot 4 on every member).
    sim.drives[0].slots[5] = old.drives[0].slots[5].clone();
    sim.drives[0].slots[6] = old.drives[0].slots[6].clone();
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(plan.winner.stamp(), stamp(2, 5));
    assert_eq!(plan.winner, sim.image());
    assert_eq!(
        plan.drives[0].slots[6],
        SlotState::Valid { stamp: stamp(1, 7) }
    );
}

#[test]
fn same_stamp_different_bodies_refuses() {
    let mut sim = mirror();
    let mut other = sim.clone();
    sim.commit_to(&[0, 1], |c| c.cluster_generation = 100);
    other.commit_to(&[2], |c| c.cluster_generation = 200);
    sim.drives[2].slots[4] = other.drives[2].slots[4].clone();
    let e = plan_import(&sim.request(true)).unwrap_err();
    let ImportError::ConflictingImages {
        stamp: s,
        first,
        second,
    } = &e
    else {
        panic!("{e}");
    };
    assert_eq!(*s, stamp(1, 5));
    assert_eq!(first.drive, "d0");
    assert_eq!(second.drive, "d2");
    let msg = e.to_string();
    assert!(msg.contains("d0") && msg.contains("d2"), "{msg}");
}

#[test]
fn a_failed_member_coming_back_is_stale() {
    let mut sim = mirror();
    let returning = sim.drives[2].clone();
    sim.fail(2); // generation 5 lists member 2 failed; written to 0 and 1
    sim.add_volume(); // generation 6, members 0 and 1
    sim.drives[2] = returning; // member 2 still says active at generation 1 in its superblock
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(plan.winner.generation, 6);
    assert_eq!(*status(&plan, 2), MemberStatus::Stale(StaleReason::Failed));
    assert_eq!(plan.members[2].drive.as_deref(), Some("d2"));
    assert_eq!(plan.members[2].state, MemberState::Failed);
    // Nothing is written to it.
    assert!(plan.repairs.iter().all(|r| !matches!(r,
        Repair::Superblock { drive, .. } | Repair::MetadataSlot { drive, .. } if drive == "d2")));
    // Alone, it cannot be imported without force (the others may hold newer metadata).
    let mut alone = sim.request(false);
    alone.drives.retain(|d| d.label == "d2");
    let e = plan_import(&alone).unwrap_err();
    assert!(matches!(e, ImportError::MissingMembers { ref missing, .. } if missing.len() == 2));
    assert!(
        e.to_string().starts_with(&format!(
            "Member {} (slot 0), active in generation 4, is missing; it may hold newer metadata",
            drive_uuid(0)
        )),
        "{e}"
    );
    assert!(
        e.to_string().ends_with("import with --force to accept"),
        "{e}"
    );
}

#[test]
fn a_member_whose_own_superblock_says_failed_is_stale() {
    let mut sim = mirror();
    let mut sb = duplex_ondisk::Superblock::parse(sim.drives[1].primary.as_ref().unwrap()).unwrap();
    sb.state = MemberState::Failed;
    sim.drives[1].primary = Some(sb.encode_vec());
    sb.copy = SuperblockCopy::Secondary;
    sim.drives[1].secondary = Some(sb.encode_vec());
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(
        *status(&plan, 1),
        MemberStatus::Stale(StaleReason::SelfFailed)
    );
}

#[test]
fn a_rebuilding_member_is_stale() {
    let mut sim = mirror();
    sim.commit(|c| c.pool.members[2].state = MemberState::Rebuilding { position: 4096 });
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(
        *status(&plan, 2),
        MemberStatus::Stale(StaleReason::Rebuilding { position: 4096 })
    );
}

#[test]
fn missing_active_member_without_and_with_force() {
    let mut sim = mirror();
    sim.drives.remove(1);
    let e = plan_import(&sim.request(false)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "Member {} (slot 1), active in generation 4, is missing; it may hold newer \
             metadata; import with --force to accept",
            drive_uuid(1)
        )
    );
    let plan = plan_import(&sim.request(true)).unwrap();
    assert_eq!(*status(&plan, 1), MemberStatus::Missing);
    assert_eq!(plan.members[1].drive, None);
    assert!(plan.repairs.is_empty());
}

#[test]
fn foreign_and_other_pool_drives_are_reported_and_untouched() {
    let mut sim = mirror();
    // A spare of this pool the winner does not list.
    let mut spare = Sim::new(RaidLevel::Raid1, 4).drives[3].clone();
    spare.label = "spare".into();
    flip(&mut spare.primary, 1); // even with a bad copy: foreign drives get no repairs
    sim.drives.push(spare);
    // A drive of another pool.
    let mut other = Sim::new(RaidLevel::Raid1, 1);
    let mut sb =
        duplex_ondisk::Superblock::parse(other.drives[0].primary.as_ref().unwrap()).unwrap();
    sb.pool_uuid = Uuid([0x77; 16]);
    other.drives[0].primary = Some(sb.encode_vec());
    other.drives[0].secondary = None;
    other.drives[0].label = "other".into();
    sim.drives.push(other.drives[0].clone());

    // Without a pool named, the drives name two pools.
    let e = plan_import(&sim.request(false)).unwrap_err();
    assert!(matches!(e, ImportError::AmbiguousPool { .. }), "{e}");
    assert!(e.to_string().contains("other"), "{e}");

    let mut req = sim.request(false);
    req.pool = Some(POOL);
    let plan = plan_import(&req).unwrap();
    assert_eq!(plan.drives[3].role, DriveRole::Foreign);
    assert_eq!(
        plan.drives[4].role,
        DriveRole::OtherPool {
            pool: Uuid([0x77; 16])
        }
    );
    assert!(plan.repairs.is_empty(), "{:?}", plan.repairs);
    assert_eq!(plan.members.len(), 3);

    req.pool = Some(Uuid([0x99; 16]));
    assert!(matches!(
        plan_import(&req),
        Err(ImportError::PoolNotFound { .. })
    ));
}

#[test]
fn no_superblock_anywhere() {
    let mut sim = mirror();
    for d in sim.drives.iter_mut() {
        d.primary = Some(vec![0; 4096]);
        d.secondary = None;
    }
    let e = plan_import(&sim.request(true)).unwrap_err();
    assert!(matches!(e, ImportError::NoSuperblock { ref drives } if drives.len() == 3));
    assert!(
        e.to_string()
            .contains("d1: primary Superblock at byte 0: bad magic"),
        "{e}"
    );
    assert!(matches!(
        plan_import(&duplex_ondisk::ImportRequest::default()),
        Err(ImportError::NoSuperblock { .. })
    ));
}

#[test]
fn a_cloned_drive_is_refused() {
    let mut sim = mirror();
    let mut clone = sim.drives[1].clone();
    clone.label = "clone".into();
    sim.drives.push(clone);
    let e = plan_import(&sim.request(true)).unwrap_err();
    assert!(
        matches!(&e, ImportError::DuplicateDrive { drives, .. } if drives == &["d1".to_string(), "clone".to_string()]),
        "{e}"
    );
}

#[test]
fn a_superblock_newer_than_every_image_needs_force() {
    let mut sim = mirror();
    sim.commit(|c| c.cluster_generation = 9);
    sim.write_superblocks(&[0, 1, 2]); // superblocks at generation 5
    for d in sim.drives.iter_mut() {
        flip(&mut d.slots[4], 300); // every copy of generation 5 lost
    }
    let e = plan_import(&sim.request(false)).unwrap_err();
    assert!(matches!(e, ImportError::NewerSuperblock { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("Drive d0's superblock was written at epoch 1 generation 5"),
        "{e}"
    );
    let plan = plan_import(&sim.request(true)).unwrap();
    assert_eq!(plan.winner.generation, 4);
}

#[test]
fn superblock_disagreeing_with_the_winner_is_repaired() {
    let mut sim = mirror();
    // Member 1 finished rebuilding (generation 5 lists it active) but its superblock still
    // says rebuilding.
    sim.commit(|c| c.pool.members[1].state = MemberState::Rebuilding { position: 8 });
    sim.write_superblocks(&[1]);
    sim.commit(|c| c.pool.members[1].state = MemberState::Active);
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(
        *status(&plan, 1),
        MemberStatus::Current {
            newest: Some(stamp(1, 6))
        }
    );
    assert_eq!(
        sb_repairs(&plan),
        [
            (
                "d1".to_string(),
                SuperblockCopy::Primary,
                SuperblockRepair::Disagrees
            ),
            (
                "d1".to_string(),
                SuperblockCopy::Secondary,
                SuperblockRepair::Disagrees
            ),
        ]
    );
}

#[test]
fn raid0_needs_every_member() {
    let mut sim = Sim::new(RaidLevel::Raid0, 3);
    sim.add_volume();
    plan_import(&sim.request(false)).unwrap();
    let mut gone = sim.clone();
    gone.drives.remove(2);
    let e = plan_import(&gone.request(true)).unwrap_err();
    assert!(
        matches!(&e, ImportError::TooFewMembers { level: RaidLevel::Raid0, current, .. } if current == &[0, 1]),
        "{e}"
    );
    assert!(
        e.to_string().contains("RAID 0 needs every member current"),
        "{e}"
    );
    assert!(e.to_string().contains("slot 2 missing"), "{e}");
}

#[test]
fn raid1_needs_one_member() {
    let mut sim = Sim::new(RaidLevel::Raid1, 2);
    sim.fail(1);
    let mut req = sim.request(false);
    req.drives.truncate(1);
    let plan = plan_import(&req).unwrap();
    assert_eq!(*status(&plan, 1), MemberStatus::Stale(StaleReason::Failed));
    assert_eq!(plan.members[1].drive, None);
    // Member 0 alone, but its superblock says failed: nothing current.
    let mut sb = duplex_ondisk::Superblock::parse(req.drives[0].primary.as_ref().unwrap()).unwrap();
    sb.state = MemberState::Failed;
    req.drives[0].primary = Some(sb.encode_vec());
    req.drives[0].secondary = None;
    let e = plan_import(&req).unwrap_err();
    assert!(matches!(e, ImportError::TooFewMembers { .. }), "{e}");
}

#[test]
fn raid10_needs_one_member_of_each_pair() {
    let sim = Sim::new(RaidLevel::Raid10, 4);
    // One of each pair: fine with force (the others are missing).
    let mut req = sim.request(true);
    req.drives.retain(|d| d.label == "d1" || d.label == "d2");
    let plan = plan_import(&req).unwrap();
    assert_eq!(*status(&plan, 0), MemberStatus::Missing);
    assert!(matches!(status(&plan, 1), MemberStatus::Current { .. }));
    // Both of pair (2, 3) gone: refused even with force.
    let mut req = sim.request(true);
    req.drives.retain(|d| d.label == "d0" || d.label == "d1");
    let e = plan_import(&req).unwrap_err();
    assert!(
        matches!(&e, ImportError::TooFewMembers { level: RaidLevel::Raid10, current, .. } if current == &[0, 1]),
        "{e}"
    );
    assert!(e.to_string().contains("mirror pair"), "{e}");
}

#[test]
fn parity_pools_need_all_members_but_their_parity_count() {
    // RAID 5 over 4: any 3 import (forced, the fourth missing); 2 are refused.
    let sim = Sim::new(RaidLevel::Raid5, 4);
    let mut req = sim.request(true);
    req.drives.retain(|d| d.label != "d2");
    let plan = plan_import(&req).unwrap();
    assert_eq!(*status(&plan, 2), MemberStatus::Missing);
    let mut req = sim.request(true);
    req.drives.retain(|d| d.label == "d0" || d.label == "d3");
    let e = plan_import(&req).unwrap_err();
    assert!(
        matches!(&e, ImportError::TooFewMembers { level: RaidLevel::Raid5, current, .. } if current == &[0, 3]),
        "{e}"
    );
    assert!(e.to_string().contains("every member but one"), "{e}");
    // RAID 6 over 5: any 3 import; 2 are refused.
    let sim = Sim::new(RaidLevel::Raid6, 5);
    let mut req = sim.request(true);
    req.drives.retain(|d| d.label != "d0" && d.label != "d4");
    plan_import(&req).unwrap();
    let mut req = sim.request(true);
    req.drives.retain(|d| d.label == "d1" || d.label == "d2");
    let e = plan_import(&req).unwrap_err();
    assert!(e.to_string().contains("every member but two"), "{e}");
}

#[test]
fn slots_of_another_pool_or_position_are_not_valid() {
    let mut sim = mirror();
    // A slot copied to another position (misdirected write).
    sim.drives[0].slots[6] = sim.drives[0].slots[3].clone();
    // Another pool's image in slot 5.
    let mut other = mirror();
    other.config.pool.uuid = Uuid([0x55; 16]);
    other.add_volume(); // generation 5 in slot 4
    sim.drives[1].slots[4] = other.drives[1].slots[4].clone();
    let plan = plan_import(&sim.request(false)).unwrap();
    assert_eq!(plan.drives[0].slots[6], SlotState::WrongSlot { found: 3 });
    assert_eq!(
        plan.drives[1].slots[4],
        SlotState::WrongPool {
            found: Uuid([0x55; 16])
        }
    );
    assert_eq!(plan.winner.stamp(), stamp(1, 4));
    assert!(plan.repairs.is_empty());
}

#[test]
fn errors_name_drives() {
    let mut sim = mirror();
    sim.drives[0].label = "0000:01:00.0".into();
    sim.drives.remove(2);
    let msg = plan_import(&sim.request(false)).unwrap_err().to_string();
    assert!(msg.starts_with("Member "), "{msg}");
    let mut sim = mirror();
    for d in sim.drives.iter_mut() {
        d.slots.clear();
    }
    sim.drives[0].label = "0000:01:00.0".into();
    let msg = plan_import(&sim.request(false)).unwrap_err().to_string();
    assert!(msg.contains("0000:01:00.0: no slots read"), "{msg}");
}
