//! Property test of the import rule over generated pool histories.
//!
//! A history of commits (config changes, changes of owner, members failing, superblock
//! rewrites, and possibly a last commit that reached only some live members) is written to 2–4
//! members; then random copies are damaged (metadata slots, superblock copies: bytes flipped,
//! reads failed, blocks zeroed, bodies torn), but never the one copy of the newest image on one
//! live member that the case protects. Properties:
//!
//! * whenever import returns a plan without `--force`, its winner is the true newest image
//!   (stamp and configuration); with `--force`, too, as long as the protected member still has
//!   a valid superblock (forcing past a missing member may legitimately pick older metadata);
//! * when every live member kept a valid superblock copy, import succeeds; live members are
//!   current, failed ones stale; every live member without a valid copy of the winner gets
//!   the winner's slot rewritten, and every damaged superblock copy of a live member is
//!   repaired.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::*;
use duplex_ondisk::import::{plan_import, MemberStatus, Repair};
use duplex_ondisk::{MemberState, RaidLevel, SuperblockCopy};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Change,
    AddVolume,
    TakeOver(u32),
    Fail(usize),
    Superblocks,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Change),
        2 => Just(Op::AddVolume),
        1 => (0u32..4).prop_map(Op::TakeOver),
        1 => (0usize..4).prop_map(Op::Fail),
        1 => Just(Op::Superblocks),
    ]
}

/// What to damage: (drive, target: 0 primary, 1 secondary, 2.. slot, byte, mode).
type Damage = (usize, usize, usize, u8);

fn arb_damage() -> impl Strategy<Value = Damage> {
    (any::<usize>(), 0usize..10, any::<usize>(), 0u8..4)
}

fn may_fail(sim: &Sim, i: usize) -> bool {
    let members = &sim.config.pool.members;
    if members[i].state != MemberState::Active {
        return false;
    }
    match sim.config.pool.raid_level {
        RaidLevel::Raid0 => false,
        RaidLevel::Raid1 => sim.live().len() > 1,
        RaidLevel::Raid10 => members[i ^ 1].state == MemberState::Active,
        RaidLevel::Raid5 | RaidLevel::Raid6 => {
            members
                .iter()
                .filter(|m| m.state == MemberState::Failed)
                .count()
                < sim.config.pool.raid_level.parity()
        }
    }
}

fn damage(bytes: &mut Option<Vec<u8>>, at: usize, mode: u8) {
    match mode {
        0 => flip(bytes, at),
        1 => *bytes = None,
        2 => {
            if let Some(b) = bytes {
                b.fill(0);
            }
        }
        _ => {
            // Torn: the first 128 bytes (an image header) survive, a later byte does not.
            if let Some(b) = bytes {
                if b.len() > 128 {
                    let at = 128 + at % (b.len() - 128);
                    b[at] ^= 0xa5;
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn import_picks_the_newest_valid_image(
        n in 2usize..=4,
        level_sel in 0u8..5,
        ops in proptest::collection::vec(arb_op(), 0..14),
        partial_mask in any::<u8>(),
        damages in proptest::collection::vec(arb_damage(), 0..24),
        protected_sel in any::<usize>(),
    ) {
        let level = match level_sel {
            0 => RaidLevel::Raid0,
            1 => RaidLevel::Raid1,
            2 if n == 4 => RaidLevel::Raid10,
            3 if n >= 3 => RaidLevel::Raid5,
            4 if n >= 4 => RaidLevel::Raid6,
            _ => RaidLevel::Raid1,
        };
        let mut sim = Sim::new(level, n);
        for op in ops {
            match op {
                Op::Change => sim.commit(|c| c.cluster_generation += 1),
                Op::AddVolume => sim.add_volume(),
                Op::TakeOver(node) => sim.take_over(node),
                Op::Fail(i) if may_fail(&sim, i % n) => sim.fail(i % n),
                Op::Fail(_) => {}
                Op::Superblocks => sim.write_superblocks(&sim.live()),
            }
        }
        // Maybe a last commit that reached only some live members before the owner died.
        let live = sim.live();
        let partial: Vec<usize> =
            live.iter().copied().filter(|&i| partial_mask & (1 << i) != 0).collect();
        if partial_mask & 0x80 != 0 && !partial.is_empty() {
            sim.commit_to(&partial, |c| c.cluster_generation += 1000);
        }
        let newest = sim.image();
        let newest_bytes = Some(sim.image_bytes());
        let slot = sim.slot as usize;
        let holders: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&i| sim.drives[i].slots[slot] == newest_bytes)
            .collect();
        prop_assert!(!holders.is_empty());
        let protected = holders[protected_sel % holders.len()];

        let mut damaged_sb: BTreeSet<(usize, SuperblockCopy)> = BTreeSet::new();
        let before: Vec<_> = sim
            .drives
            .iter()
            .map(|d| (d.primary.clone(), d.secondary.clone()))
            .collect();
        for (d, target, at, mode) in damages {
            let d = d % n;
            let drive = &mut sim.drives[d];
            match target {
                0 => {
                    damage(&mut drive.primary, at, mode);
                    damaged_sb.insert((d, SuperblockCopy::Primary));
                }
                1 => {
                    damage(&mut drive.secondary, at, mode);
                    damaged_sb.insert((d, SuperblockCopy::Secondary));
                }
                s if d == protected && s - 2 == slot => {}
                s => damage(&mut drive.slots[s - 2], at, mode),
            }
        }
        // Two flips of the same byte cancel: a copy counts as damaged only if it differs.
        damaged_sb.retain(|&(d, copy)| match copy {
            SuperblockCopy::Primary => sim.drives[d].primary != before[d].0,
            SuperblockCopy::Secondary => sim.drives[d].secondary != before[d].1,
        });
        let sb_intact = |d: usize| {
            !damaged_sb.contains(&(d, SuperblockCopy::Primary))
                || !damaged_sb.contains(&(d, SuperblockCopy::Secondary))
        };

        for force in [false, true] {
            let result = plan_import(&sim.request(force));
            if let Ok(plan) = &result {
                if !force || sb_intact(protected) {
                    prop_assert_eq!(&plan.winner, &newest);
                }
                prop_assert!(plan.winner.stamp() <= newest.stamp());
            }
            if live.iter().all(|&d| sb_intact(d)) {
                let plan = result.map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&plan.winner, &newest);
                for m in &plan.members {
                    let i = m.slot as usize;
                    if live.contains(&i) {
                        prop_assert!(matches!(m.status, MemberStatus::Current { .. }), "{:?}", m);
                        let has_winner = plan.drives[i].slots.get(slot)
                            == Some(&duplex_ondisk::import::SlotState::Valid { stamp: newest.stamp() });
                        let rewritten = plan.repairs.iter().any(|r| matches!(r,
                            Repair::MetadataSlot { drive, slot: s, .. }
                                if *drive == format!("d{i}") && *s as usize == slot));
                        prop_assert_eq!(has_winner, !rewritten, "member {}: {:?}", i, plan.repairs);
                        for copy in [SuperblockCopy::Primary, SuperblockCopy::Secondary] {
                            let repaired = plan.repairs.iter().any(|r| matches!(r,
                                Repair::Superblock { drive, copy: c, .. }
                                    if *drive == format!("d{i}") && *c == copy));
                            if damaged_sb.contains(&(i, copy)) {
                                prop_assert!(repaired, "member {}: {:?}", i, plan.repairs);
                            }
                        }
                    } else {
                        prop_assert!(matches!(m.status, MemberStatus::Stale(_)), "{:?}", m);
                    }
                }
                prop_assert_eq!(
                    plan.next_slot as usize,
                    (slot + 1) % layout().metadata_slots as usize
                );
            }
        }
    }
}
