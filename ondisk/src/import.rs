//! The import rule, as a pure function of what was read from the drives
//! ([`plan_import`]): which metadata image wins, what each member is, what must be repaired,
//! and when import refuses. Nothing is written by this module; the plan is only produced when
//! import may go ahead, so a refusal writes nothing. `docs/ONDISK.md` explains every rule.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::error::{FormatError, Problem, Structure};
use crate::image::{parse_with_body, MetadataImage, IMAGE_HEADER_SIZE};
use crate::records::{MemberState, RaidLevel};
use crate::superblock::{Superblock, SuperblockCopy};
use crate::{Stamp, Uuid};

/// What was read from one drive offered for import.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriveInput {
    /// How the operator knows the drive (its address); errors and reports name it.
    pub label: String,
    /// The primary superblock's 4096 bytes (`None`: the read failed).
    pub primary: Option<Vec<u8>>,
    /// The secondary superblock's 4096 bytes (`None`: the read failed).
    pub secondary: Option<Vec<u8>>,
    /// Every metadata slot's bytes, in ring order, as the chosen superblock's layout places
    /// them (`None`: the read failed). Only the start of a slot (header and body) matters.
    pub slots: Vec<Option<Vec<u8>>>,
}

/// An import: the drives offered, the pool wanted and whether to accept missing members.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportRequest {
    /// The drives offered.
    pub drives: Vec<DriveInput>,
    /// The pool to import; `None`: the one pool the drives' superblocks name.
    pub pool: Option<Uuid>,
    /// Import even though an active member is missing (it may hold newer metadata), or a
    /// superblock records a generation newer than every valid image.
    pub force: bool,
}

/// One superblock copy of a drive, as import saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyState {
    /// Valid, and the copy the drive's superblock is taken from.
    Chosen,
    /// Valid and equal to the chosen copy (apart from the field naming the copy).
    Agrees,
    /// Valid, but older than the chosen copy (or different at the same stamp).
    Outdated {
        /// The copy's (epoch, generation).
        stamp: Stamp,
    },
    /// The read failed.
    Unreadable,
    /// Not a valid superblock (or a copy found at the other copy's place).
    Invalid(FormatError),
}

/// One metadata slot of a drive, as import saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// A valid image of this pool, written to this position.
    Valid {
        /// Its (epoch, generation).
        stamp: Stamp,
    },
    /// The read failed, or the slot was not given.
    Unreadable,
    /// The header is all zero: never written.
    Empty,
    /// Not a valid image (bad header, torn body, bad records).
    Invalid(FormatError),
    /// A valid image of another pool.
    WrongPool {
        /// The pool it names.
        found: Uuid,
    },
    /// A valid image whose slot index is not its position (a misdirected write).
    WrongSlot {
        /// The slot index it records.
        found: u32,
    },
}

/// Why a member is stale (never read from; the raid service resyncs or rebuilds it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaleReason {
    /// The winning image lists it failed.
    Failed,
    /// The winning image lists it rebuilding.
    Rebuilding {
        /// Blocks already rebuilt.
        position: u64,
    },
    /// The winning image lists it active, but its own superblock says failed.
    SelfFailed,
}

/// What a member of the winning pool record is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberStatus {
    /// Active and present: its data is current. Its metadata is rewritten from the winner
    /// (a [`Repair::MetadataSlot`]) when `newest` is not the winner's stamp.
    Current {
        /// The newest valid image it holds (`None`: none).
        newest: Option<Stamp>,
    },
    /// Present or not, it is never read from.
    Stale(StaleReason),
    /// Active in the winner, but not offered (or offered without a valid superblock).
    Missing,
}

/// One member of the winning pool record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberReport {
    /// The member's drive UUID.
    pub drive_uuid: Uuid,
    /// Its slot.
    pub slot: u32,
    /// Its state in the winning image.
    pub state: MemberState,
    /// The offered drive that is this member (its label), if any.
    pub drive: Option<String>,
    /// What import makes of it.
    pub status: MemberStatus,
}

/// What an offered drive is to the import.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriveRole {
    /// A member of the winning pool record.
    Member {
        /// Its slot.
        slot: u32,
        /// Its status.
        status: MemberStatus,
    },
    /// Its superblock names this pool but the winner does not list it: left untouched.
    Foreign,
    /// Its superblock names another pool: left untouched.
    OtherPool {
        /// The pool it names.
        pool: Uuid,
    },
    /// Neither superblock copy is valid: it cannot take part.
    Unusable,
}

/// Everything import found on one offered drive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveReport {
    /// The drive's label.
    pub label: String,
    /// The primary superblock copy.
    pub primary: CopyState,
    /// The secondary superblock copy.
    pub secondary: CopyState,
    /// The drive's superblock (the chosen copy), if either copy is valid.
    pub superblock: Option<Superblock>,
    /// Every slot given, in ring order (empty for drives of another pool or unusable ones).
    pub slots: Vec<SlotState>,
    /// What the drive is.
    pub role: DriveRole,
}

/// Why a superblock copy is rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuperblockRepair {
    /// The copy could not be read.
    Unreadable,
    /// The copy is not valid.
    Invalid,
    /// The copy is older than the other copy.
    Outdated,
    /// The drive's superblock disagrees with the winner about its slot or state.
    Disagrees,
}

/// A write the importer must do before it uses the pool (on current members only: nothing is
/// written to stale, foreign or other drives).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Rewrite one superblock copy of a drive from its chosen superblock (corrected by the
    /// winner's slot and state).
    Superblock {
        /// The drive's label.
        drive: String,
        /// Which copy.
        copy: SuperblockCopy,
        /// Why.
        reason: SuperblockRepair,
    },
    /// Write the winning image into `slot` (the winner's own position) of a current member
    /// that holds no valid copy of it.
    MetadataSlot {
        /// The drive's label.
        drive: String,
        /// The slot to write (the winner's slot index).
        slot: u32,
        /// What that slot holds now.
        found: SlotState,
    },
}

/// Where the winning image was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSource {
    /// The drive's label.
    pub drive: String,
    /// The slot.
    pub slot: u32,
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} slot {}", self.drive, self.slot)
    }
}

/// An active member that was not found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingMember {
    /// Its drive UUID.
    pub drive_uuid: Uuid,
    /// Its slot.
    pub slot: u32,
    /// The generation of the winning image, in which it is active.
    pub generation: u64,
}

/// What import does: produced only when import may go ahead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportPlan {
    /// The pool.
    pub pool: Uuid,
    /// The winning image: the configuration to run.
    pub winner: MetadataImage,
    /// Where it was read (one of possibly several identical copies).
    pub source: ImageSource,
    /// Every member of the winning pool record, in slot order.
    pub members: Vec<MemberReport>,
    /// Every offered drive, in the order given.
    pub drives: Vec<DriveReport>,
    /// The writes to make before the pool is used.
    pub repairs: Vec<Repair>,
    /// The ring position the next commit writes (after the winner's).
    pub next_slot: u32,
}

/// Why import refuses. Nothing has been written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// No offered drive has a valid superblock.
    #[error("No offered drive has a valid superblock: {}", fmt_list(.drives))]
    NoSuperblock {
        /// Each drive's label and why neither copy is valid.
        drives: Vec<(String, String)>,
    },
    /// No pool was named and the drives name several.
    #[error("The offered drives belong to several pools ({}); name the pool to import", fmt_pools(.pools))]
    AmbiguousPool {
        /// Each pool and the labels of its drives.
        pools: Vec<(Uuid, Vec<String>)>,
    },
    /// No offered drive belongs to the pool named.
    #[error("No offered drive belongs to pool {pool}")]
    PoolNotFound {
        /// The pool named.
        pool: Uuid,
    },
    /// Two offered drives have the same drive UUID (a cloned drive).
    #[error("Drives {} all claim drive UUID {drive_uuid}; refusing to guess which is the member", .drives.join(", "))]
    DuplicateDrive {
        /// The UUID.
        drive_uuid: Uuid,
        /// The drives' labels.
        drives: Vec<String>,
    },
    /// No drive of the pool holds a valid image.
    #[error("No valid metadata image on any drive of pool {pool}: {}", fmt_list(.drives))]
    NoValidImage {
        /// The pool.
        pool: Uuid,
        /// Each drive of the pool and what its slots hold.
        drives: Vec<(String, String)>,
    },
    /// Two valid images with the same stamp differ: two writers used one epoch.
    #[error(
        "Drives {} and {} hold different metadata images at {stamp} (slots {} and {}); \
         two writers used one epoch; refusing to choose",
        .first.drive, .second.drive, .first.slot, .second.slot
    )]
    ConflictingImages {
        /// The stamp both carry.
        stamp: Stamp,
        /// One copy.
        first: ImageSource,
        /// A different one.
        second: ImageSource,
    },
    /// Too few current members for the RAID level, even with force.
    #[error(
        "Pool {pool} ({level}) cannot be imported: {rule}; current member slots: {current:?}, \
         not current: {}",
        fmt_not_current(.not_current)
    )]
    TooFewMembers {
        /// The pool.
        pool: Uuid,
        /// Its RAID level.
        level: RaidLevel,
        /// What the level needs.
        rule: &'static str,
        /// Slots of the current members.
        current: Vec<u32>,
        /// The other members: slot, drive label (if offered) and status.
        not_current: Vec<(u32, Option<String>, MemberStatus)>,
    },
    /// Active members are missing and force was not given.
    #[error("{}", fmt_missing(.missing, .unusable))]
    MissingMembers {
        /// The missing members.
        missing: Vec<MissingMember>,
        /// Offered drives without a valid superblock (one may be a missing member).
        unusable: Vec<String>,
    },
    /// A superblock records a stamp newer than every valid image, and force was not given.
    #[error(
        "Drive {drive}'s superblock was written at {superblock}, after the newest valid \
         metadata image ({winner}): newer metadata was lost; import with --force to accept \
         the older image"
    )]
    NewerSuperblock {
        /// The drive's label.
        drive: String,
        /// Its superblock's stamp.
        superblock: Stamp,
        /// The winner's stamp.
        winner: Stamp,
    },
}

fn fmt_list(drives: &[(String, String)]) -> String {
    let v: Vec<String> = drives
        .iter()
        .map(|(d, why)| format!("{d}: {why}"))
        .collect();
    v.join("; ")
}

fn fmt_pools(pools: &[(Uuid, Vec<String>)]) -> String {
    let v: Vec<String> = pools
        .iter()
        .map(|(p, d)| format!("{p} on {}", d.join(", ")))
        .collect();
    v.join("; ")
}

fn fmt_not_current(members: &[(u32, Option<String>, MemberStatus)]) -> String {
    let v: Vec<String> = members
        .iter()
        .map(|(slot, drive, status)| {
            let what = match status {
                MemberStatus::Current { .. } => "current",
                MemberStatus::Stale(StaleReason::Failed) => "failed",
                MemberStatus::Stale(StaleReason::Rebuilding { .. }) => "rebuilding",
                MemberStatus::Stale(StaleReason::SelfFailed) => "failed (its own superblock)",
                MemberStatus::Missing => "missing",
            };
            match drive {
                Some(d) => format!("slot {slot} ({d}) {what}"),
                None => format!("slot {slot} {what}"),
            }
        })
        .collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

fn fmt_missing(missing: &[MissingMember], unusable: &[String]) -> String {
    let v: Vec<String> = missing
        .iter()
        .map(|m| {
            format!(
                "Member {} (slot {}), active in generation {}, is missing; it may hold newer \
                 metadata",
                m.drive_uuid, m.slot, m.generation
            )
        })
        .collect();
    let mut s = v.join("; ");
    if !unusable.is_empty() {
        s.push_str(&format!(
            " (offered drives without a valid superblock: {})",
            unusable.join(", ")
        ));
    }
    s.push_str("; import with --force to accept");
    s
}

/// One parsed superblock copy.
fn parse_copy(bytes: Option<&Vec<u8>>, place: SuperblockCopy) -> Result<Superblock, CopyState> {
    let bytes = bytes.ok_or(CopyState::Unreadable)?;
    let sb = Superblock::parse(bytes).map_err(CopyState::Invalid)?;
    if sb.copy != place {
        return Err(CopyState::Invalid(FormatError::new(
            Structure::Superblock,
            66,
            Problem::Mismatch {
                field: "copy",
                found: sb.copy.to_string(),
                other: "the place it was read from",
                expected: place.to_string(),
            },
        )));
    }
    Ok(sb)
}

fn same_but_copy(a: &Superblock, b: &Superblock) -> bool {
    Superblock { copy: a.copy, ..*b } == *a
}

/// Step a: the drive's superblock from its two copies.
fn choose_superblock(d: &DriveInput) -> (CopyState, CopyState, Option<Superblock>) {
    let p = parse_copy(d.primary.as_ref(), SuperblockCopy::Primary);
    let s = parse_copy(d.secondary.as_ref(), SuperblockCopy::Secondary);
    match (p, s) {
        (Ok(p), Ok(s)) => {
            let (chosen, other) = if s.stamp() > p.stamp() {
                (s, p)
            } else {
                (p, s)
            };
            let other_state = if same_but_copy(&chosen, &other) {
                CopyState::Agrees
            } else {
                CopyState::Outdated {
                    stamp: other.stamp(),
                }
            };
            if chosen.copy == SuperblockCopy::Primary {
                (CopyState::Chosen, other_state, Some(chosen))
            } else {
                (other_state, CopyState::Chosen, Some(chosen))
            }
        }
        (Ok(p), Err(s)) => (CopyState::Chosen, s, Some(p)),
        (Err(p), Ok(s)) => (p, CopyState::Chosen, Some(s)),
        (Err(p), Err(s)) => (p, s, None),
    }
}

fn copy_why(c: &CopyState) -> String {
    match c {
        CopyState::Unreadable => "unreadable".to_string(),
        CopyState::Invalid(e) => e.to_string(),
        CopyState::Chosen | CopyState::Agrees => "valid".to_string(),
        CopyState::Outdated { stamp } => format!("outdated ({stamp})"),
    }
}

/// A valid image found on a drive: (drive index, slot, image, body bytes).
type Candidate<'a> = (usize, u32, MetadataImage, &'a [u8]);

/// Step b: every slot of one drive of the pool.
fn scan_slots<'a>(
    d: &'a DriveInput,
    pool: Uuid,
    drive_index: usize,
    found: &mut Vec<Candidate<'a>>,
) -> Vec<SlotState> {
    let mut states = Vec::with_capacity(d.slots.len());
    for (pos, bytes) in d.slots.iter().enumerate() {
        let Ok(pos) = u32::try_from(pos) else {
            break;
        };
        let state = match bytes {
            None => SlotState::Unreadable,
            Some(b)
                if b.len() >= IMAGE_HEADER_SIZE
                    && b.iter().take(IMAGE_HEADER_SIZE).all(|&x| x == 0) =>
            {
                SlotState::Empty
            }
            Some(b) => match parse_with_body(b) {
                Err(e) => SlotState::Invalid(e),
                Ok((img, _)) if img.pool_uuid() != pool => SlotState::WrongPool {
                    found: img.pool_uuid(),
                },
                Ok((img, _)) if img.slot_index != pos => SlotState::WrongSlot {
                    found: img.slot_index,
                },
                Ok((img, body)) => {
                    let stamp = img.stamp();
                    found.push((drive_index, pos, img, body));
                    SlotState::Valid { stamp }
                }
            },
        };
        states.push(state);
    }
    states
}

fn slots_why(slots: &[SlotState]) -> String {
    if slots.is_empty() {
        return "no slots read".to_string();
    }
    let v: Vec<String> = slots
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            SlotState::Valid { stamp } => format!("slot {i} valid at {stamp}"),
            SlotState::Unreadable => format!("slot {i} unreadable"),
            SlotState::Empty => format!("slot {i} empty"),
            SlotState::Invalid(e) => format!("slot {i}: {e}"),
            SlotState::WrongPool { found } => format!("slot {i} holds pool {found}"),
            SlotState::WrongSlot { found } => format!("slot {i} holds slot {found}'s image"),
        })
        .collect();
    v.join(", ")
}

/// Decides an import: the rule of `docs/ONDISK.md` ("Import"), step by step.
///
/// a. Each drive's superblock is its valid copy with the highest (epoch, generation); a drive
///    with no valid copy cannot take part.
/// b. Each slot of each drive of the pool is valid when its header and body checksums, magic,
///    version and records are, its pool is the drive's, and its slot index is its position.
/// c. The winner is the valid image with the highest (epoch, generation); two valid images at
///    that stamp with different bodies refuse the import.
/// d. Members are classified by the winner's pool record: current, stale, missing; drives of
///    the pool it does not list are foreign.
/// e. Import refuses when there is no valid image, when the current members are too few for
///    the RAID level (even with `force`), and, without `force`, when an active member is
///    missing or a superblock is newer than the winner.
/// f. Otherwise the plan: the winner, every member and drive, the repairs, the next slot.
pub fn plan_import(req: &ImportRequest) -> Result<ImportPlan, ImportError> {
    // a. Superblocks.
    let chosen: Vec<(CopyState, CopyState, Option<Superblock>)> =
        req.drives.iter().map(choose_superblock).collect();

    if chosen.iter().all(|c| c.2.is_none()) {
        return Err(ImportError::NoSuperblock {
            drives: req
                .drives
                .iter()
                .zip(&chosen)
                .map(|(d, (p, s, _))| {
                    let why = format!("primary {}; secondary {}", copy_why(p), copy_why(s));
                    (d.label.clone(), why)
                })
                .collect(),
        });
    }
    let pool = match req.pool {
        Some(p) => p,
        None => {
            let mut by_pool: BTreeMap<Uuid, Vec<String>> = BTreeMap::new();
            for (d, (_, _, sb)) in req.drives.iter().zip(&chosen) {
                if let Some(sb) = sb {
                    let labels = by_pool.entry(sb.pool_uuid).or_default();
                    labels.push(d.label.clone());
                }
            }
            let mut pools: Vec<(Uuid, Vec<String>)> = by_pool.into_iter().collect();
            match (pools.pop(), pools.is_empty()) {
                (Some((p, _)), true) => p,
                (last, _) => {
                    pools.extend(last);
                    return Err(ImportError::AmbiguousPool { pools });
                }
            }
        }
    };

    // The drives of this pool.
    let ours: Vec<usize> = chosen
        .iter()
        .enumerate()
        .filter(|(_, (_, _, sb))| sb.is_some_and(|sb| sb.pool_uuid == pool))
        .map(|(i, _)| i)
        .collect();
    if ours.is_empty() {
        return Err(ImportError::PoolNotFound { pool });
    }
    let sb_of = |i: usize| chosen.get(i).and_then(|c| c.2);
    let label_of = |i: usize| {
        req.drives
            .get(i)
            .map(|d| d.label.clone())
            .unwrap_or_default()
    };
    let mut by_uuid: BTreeMap<Uuid, Vec<usize>> = BTreeMap::new();
    for &i in &ours {
        if let Some(sb) = sb_of(i) {
            by_uuid.entry(sb.drive_uuid).or_default().push(i);
        }
    }
    if let Some((uuid, ds)) = by_uuid.iter().find(|(_, ds)| ds.len() > 1) {
        return Err(ImportError::DuplicateDrive {
            drive_uuid: *uuid,
            drives: ds.iter().map(|&i| label_of(i)).collect(),
        });
    }

    // b. Slots.
    let mut candidates: Vec<Candidate<'_>> = Vec::new();
    let mut slot_states: BTreeMap<usize, Vec<SlotState>> = BTreeMap::new();
    for &i in &ours {
        if let Some(d) = req.drives.get(i) {
            slot_states.insert(i, scan_slots(d, pool, i, &mut candidates));
        }
    }

    // c. The winner.
    let Some(top) = candidates.iter().map(|c| c.2.stamp()).max() else {
        return Err(ImportError::NoValidImage {
            pool,
            drives: ours
                .iter()
                .map(|&i| {
                    let why = slot_states
                        .get(&i)
                        .map(|s| slots_why(s))
                        .unwrap_or_default();
                    (label_of(i), why)
                })
                .collect(),
        });
    };
    let mut at_top = candidates.iter().filter(|c| c.2.stamp() == top);
    let Some((w_drive, w_slot, winner, w_body)) = at_top.next() else {
        return Err(ImportError::NoValidImage {
            pool,
            drives: Vec::new(),
        });
    };
    for (d, s, img, body) in at_top {
        if body != w_body || img.writer_node != winner.writer_node {
            return Err(ImportError::ConflictingImages {
                stamp: top,
                first: ImageSource {
                    drive: label_of(*w_drive),
                    slot: *w_slot,
                },
                second: ImageSource {
                    drive: label_of(*d),
                    slot: *s,
                },
            });
        }
    }
    let newest_on = |i: usize| {
        candidates
            .iter()
            .filter(|c| c.0 == i)
            .map(|c| c.2.stamp())
            .max()
    };

    // d. Members.
    let wpool = &winner.config.pool;
    let mut members: Vec<MemberReport> = Vec::with_capacity(wpool.members.len());
    let mut member_of: BTreeMap<usize, usize> = BTreeMap::new();
    let mut sorted = wpool.members.clone();
    sorted.sort_by_key(|m| m.slot);
    for m in &sorted {
        let drive = by_uuid
            .get(&m.drive_uuid)
            .and_then(|ds| ds.first().copied());
        let status = match (m.state, drive.and_then(sb_of)) {
            (MemberState::Failed, _) => MemberStatus::Stale(StaleReason::Failed),
            (MemberState::Rebuilding { position }, _) => {
                MemberStatus::Stale(StaleReason::Rebuilding { position })
            }
            (MemberState::Active, None) => MemberStatus::Missing,
            (MemberState::Active, Some(sb)) if sb.state == MemberState::Failed => {
                MemberStatus::Stale(StaleReason::SelfFailed)
            }
            (MemberState::Active, Some(_)) => MemberStatus::Current {
                newest: drive.and_then(newest_on),
            },
        };
        if let Some(i) = drive {
            member_of.insert(i, members.len());
        }
        members.push(MemberReport {
            drive_uuid: m.drive_uuid,
            slot: m.slot,
            state: m.state,
            drive: drive.map(label_of),
            status,
        });
    }

    // e. Refusals.
    let is_current = |m: &MemberReport| matches!(m.status, MemberStatus::Current { .. });
    let current: BTreeSet<u32> = members
        .iter()
        .filter(|m| is_current(m))
        .map(|m| m.slot)
        .collect();
    let n = wpool.members.len() as u32;
    let (enough, rule) = match wpool.raid_level {
        RaidLevel::Raid0 => (
            (0..n).all(|s| current.contains(&s)),
            "RAID 0 needs every member current",
        ),
        RaidLevel::Raid1 => (!current.is_empty(), "RAID 1 needs one current member"),
        RaidLevel::Raid10 => (
            (0..n / 2).all(|p| current.contains(&(2 * p)) || current.contains(&(2 * p + 1))),
            "RAID 10 needs a current member in every mirror pair (slots 0+1, 2+3, ...)",
        ),
        RaidLevel::Raid5 => (
            current.len() + 1 >= n as usize,
            "RAID 5 needs every member but one current",
        ),
        RaidLevel::Raid6 => (
            current.len() + 2 >= n as usize,
            "RAID 6 needs every member but two current",
        ),
    };
    if !enough {
        return Err(ImportError::TooFewMembers {
            pool,
            level: wpool.raid_level,
            rule,
            current: current.iter().copied().collect(),
            not_current: members
                .iter()
                .filter(|m| !is_current(m))
                .map(|m| (m.slot, m.drive.clone(), m.status.clone()))
                .collect(),
        });
    }
    let missing: Vec<MissingMember> = members
        .iter()
        .filter(|m| m.status == MemberStatus::Missing)
        .map(|m| MissingMember {
            drive_uuid: m.drive_uuid,
            slot: m.slot,
            generation: winner.generation,
        })
        .collect();
    if !missing.is_empty() && !req.force {
        return Err(ImportError::MissingMembers {
            missing,
            unusable: chosen
                .iter()
                .enumerate()
                .filter(|(_, c)| c.2.is_none())
                .map(|(i, _)| label_of(i))
                .collect(),
        });
    }
    if !req.force {
        for &i in &ours {
            if let Some(sb) = sb_of(i).filter(|sb| sb.stamp() > top) {
                return Err(ImportError::NewerSuperblock {
                    drive: label_of(i),
                    superblock: sb.stamp(),
                    winner: top,
                });
            }
        }
    }

    // f. The plan.
    let mut repairs = Vec::new();
    for m in &members {
        let (MemberStatus::Current { newest }, Some(label)) = (&m.status, &m.drive) else {
            continue;
        };
        let Some(i) = by_uuid
            .get(&m.drive_uuid)
            .and_then(|ds| ds.first().copied())
        else {
            continue;
        };
        let (p, s, sb) = match chosen.get(i) {
            Some(c) => c,
            None => continue,
        };
        let disagrees = sb.is_some_and(|sb| sb.member_slot != m.slot || sb.state != m.state);
        for (copy, state) in [(SuperblockCopy::Primary, p), (SuperblockCopy::Secondary, s)] {
            let reason = match state {
                CopyState::Unreadable => Some(SuperblockRepair::Unreadable),
                CopyState::Invalid(_) => Some(SuperblockRepair::Invalid),
                CopyState::Outdated { .. } => Some(SuperblockRepair::Outdated),
                CopyState::Chosen | CopyState::Agrees if disagrees => {
                    Some(SuperblockRepair::Disagrees)
                }
                CopyState::Chosen | CopyState::Agrees => None,
            };
            if let Some(reason) = reason {
                repairs.push(Repair::Superblock {
                    drive: label.clone(),
                    copy,
                    reason,
                });
            }
        }
        if *newest != Some(top) {
            let found = slot_states
                .get(&i)
                .and_then(|s| s.get(winner.slot_index as usize))
                .cloned()
                .unwrap_or(SlotState::Unreadable);
            repairs.push(Repair::MetadataSlot {
                drive: label.clone(),
                slot: winner.slot_index,
                found,
            });
        }
    }

    let next_slot = sb_of(*w_drive)
        .map(|sb| sb.layout.next_metadata_slot(winner.slot_index))
        .unwrap_or(0);

    let drives = req
        .drives
        .iter()
        .enumerate()
        .zip(chosen.iter())
        .map(|((i, d), (p, s, sb))| {
            let role = match sb {
                None => DriveRole::Unusable,
                Some(sb) if sb.pool_uuid != pool => DriveRole::OtherPool { pool: sb.pool_uuid },
                Some(_) => match member_of.get(&i).and_then(|&mi| members.get(mi)) {
                    Some(m) => DriveRole::Member {
                        slot: m.slot,
                        status: m.status.clone(),
                    },
                    None => DriveRole::Foreign,
                },
            };
            DriveReport {
                label: d.label.clone(),
                primary: p.clone(),
                secondary: s.clone(),
                superblock: *sb,
                slots: slot_states.remove(&i).unwrap_or_default(),
                role,
            }
        })
        .collect();

    Ok(ImportPlan {
        pool,
        winner: winner.clone(),
        source: ImageSource {
            drive: label_of(*w_drive),
            slot: *w_slot,
        },
        members,
        drives,
        repairs,
        next_slot,
    })
}
