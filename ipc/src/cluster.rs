//! The cluster state region: what the datapath, the cluster service and the metadata service of
//! one node tell each other about the peer (issue 15).
//!
//! A plain region duplexd creates for a cluster member (resource [`CLUSTER_RESOURCE`]) and keeps,
//! handed to the datapath, the cluster service and the metadata service, so any of the two
//! services can restart and find it as it was. Every field is a 64-bit atomic word with one
//! writer:
//!
//! | offset | writer | field |
//! |---|---|---|
//! | 64 | datapath | disk heartbeat rounds done (+1 per round that wrote this node's slot on at least one drive) |
//! | 72 | datapath | drives written in the last round |
//! | 80 | datapath | cluster drives (the drives the node heartbeats on) |
//! | 88 | datapath | 1 once this node is fenced (a drive said its key is gone) |
//! | 128 + 64 s | datapath | slot `s` (0..4) as read in the last rounds: `seq` (odd while written), counter, boot, drives that showed it, round |
//! | 448 | cluster | fence request: sequence number (published last, release) |
//! | 456 | cluster | fence request: the victim's reservation key |
//! | 512 | datapath | fence answer: the request's sequence number (published last, release) |
//! | 520 | datapath | fence answer: outcome ([`FenceOutcome`]) |
//! | 528 | datapath | fence answer: drives on which the victim's key was preempted |
//! | 576 | cluster | pools taken over: bit `s` set = the pools owned by node slot `s` are this node's to import (the peer is fenced) |
//! | 584 | cluster | the fenced peer's key of that takeover |
//! | 640 | metadata | this node's configuration generation (+1 whenever its metadata service changed a pool on the drives) |
//! | 648 | cluster | the peer's configuration generation, as its last beat said |
//! | 656 | duplexd | 1 while the host link (the fabric listener's interface) has been down for the dead time |
//! | 664 | cluster | 1 while the peer is alive on the interconnect |
//! | 672 | cluster | 1 once this boot of the node has joined the cluster (the join handshake; stays 1 across the services' restarts) |
//! | 680 | metadata | the claimed node slots whose pools it has all imported (bit `s`) |
//! | 688 | metadata | the drives holding current data of some pool (bit `i`: the topology's pool drive `i`): only those must be fenced; an unreachable other one is passed over |
//! | 696 | metadata | 1 once the mask at 688 was written (before: every drive must be fenced) |
//! | 1024 | datapath | drive reservations: `seq` (odd while written) |
//! | 1032 | datapath | drive reservations: how many drives (at most [`MAX_REPORTED_DRIVES`]) |
//! | 1040 | datapath | drive reservations: the heartbeat round they were read in |
//! | 1088 + 128 d | datapath | drive `d` (name order): name (32 bytes, NUL padded), reservation type (NVMe RTYPE; 0: none), key count (at most [`KEYS_PER_DRIVE`]), holder mask (bit `k`: key `k` holds), 0, keys |
//!
//! The datapath answers a fence request once, in order; the cluster service waits for the
//! answer whose sequence number is its request's. Values read from the region are validated by
//! their readers (a slot index, an outcome code): a confused writer can make a reader wait or
//! refuse, never panic.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::region::{Region, RegionError, RegionKind, HEADER_SIZE};

/// Resource name of the region.
pub const CLUSTER_RESOURCE: &str = "cluster-state";
/// `params[0]` of the region says it is one.
const TAG: u64 = u64::from_le_bytes(*b"CLUSTER\x01");
/// Node slots (the on-disk heartbeat slots).
pub const SLOTS: usize = 4;
const LEN: usize = 4096;

const ROUNDS: usize = HEADER_SIZE;
const WRITTEN: usize = HEADER_SIZE + 8;
const DRIVES: usize = HEADER_SIZE + 16;
const FENCED: usize = HEADER_SIZE + 24;
const SLOT_BASE: usize = 128;
const FENCE_REQ_SEQ: usize = 448;
const FENCE_REQ_KEY: usize = 456;
const FENCE_ANS_SEQ: usize = 512;
const FENCE_ANS_OUTCOME: usize = 520;
const FENCE_ANS_DRIVES: usize = 528;
const TAKEOVER: usize = 576;
const TAKEOVER_KEY: usize = 584;
const CONFIG_GEN: usize = 640;
const PEER_CONFIG_GEN: usize = 648;
const HOST_LINK_DOWN: usize = 656;
const PEER_LINKED: usize = 664;
const JOINED: usize = 672;
const SETTLED: usize = 680;
const MUST_FENCE: usize = 688;
const MUST_FENCE_SET: usize = 696;
const RESV_SEQ: usize = 1024;
const RESV_COUNT: usize = 1032;
const RESV_ROUND: usize = 1040;
const RESV_BASE: usize = 1088;
const RESV_ENTRY: usize = 128;
/// Drives whose reservations the region reports (the first, in name order).
pub const MAX_REPORTED_DRIVES: usize = 8;
/// Keys reported per drive.
pub const KEYS_PER_DRIVE: usize = 4;
/// Bytes of a drive name the region keeps.
const NAME_BYTES: usize = 32;

/// One drive's reservation as the datapath last read it (Reservation Report).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriveReservation {
    /// The drive's name (at most 32 bytes kept).
    pub name: String,
    /// The reservation type (NVMe RTYPE: 1 Write Exclusive ... 6 Exclusive Access – All
    /// Registrants); 0: no reservation, or the report failed (`keys` empty then too).
    pub rtype: u8,
    /// The registered keys (at most [`KEYS_PER_DRIVE`]) and whether each holds the
    /// reservation.
    pub keys: Vec<(u64, bool)>,
    /// Why the drive could not be read (empty: it was).
    pub error: String,
}

/// The result of fencing the peer on this node's drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceOutcome {
    /// The victim's key is gone from every drive (preempted here or already gone).
    Fenced,
    /// This node's own key turned out gone: the peer fenced this node first.
    SelfFenced,
    /// A drive could not be reached: fencing stopped there; no takeover.
    Unreachable,
    /// A drive refused otherwise: no takeover.
    Failed,
    /// The node has no cluster drives to fence on.
    NoDrives,
}

impl FenceOutcome {
    fn code(self) -> u64 {
        match self {
            Self::Fenced => 1,
            Self::SelfFenced => 2,
            Self::Unreachable => 3,
            Self::Failed => 4,
            Self::NoDrives => 5,
        }
    }

    fn from_code(c: u64) -> Option<Self> {
        Some(match c {
            1 => Self::Fenced,
            2 => Self::SelfFenced,
            3 => Self::Unreachable,
            4 => Self::Failed,
            5 => Self::NoDrives,
            _ => return None,
        })
    }

    /// A name for logs and status reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fenced => "fenced",
            Self::SelfFenced => "this node was fenced",
            Self::Unreachable => "a drive is unreachable",
            Self::Failed => "a drive refused",
            Self::NoDrives => "no cluster drives",
        }
    }
}

/// One node slot's heartbeat as the datapath last read it from the drives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotView {
    /// The writer's counter (the highest read on any drive).
    pub counter: u64,
    /// The writer's boot number.
    pub boot: u64,
    /// Drives on which the slot held a valid heartbeat in the round that read it.
    pub drives: u64,
    /// The datapath's round in which this was read.
    pub round: u64,
}

/// A fence answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FenceAnswer {
    /// The request it answers.
    pub seq: u64,
    /// What happened (`None`: an outcome code this build does not know).
    pub outcome: Option<FenceOutcome>,
    /// Drives on which the key was preempted now.
    pub preempted: u64,
}

/// The region (any side).
#[derive(Debug)]
pub struct ClusterRegion {
    region: Region,
}

impl ClusterRegion {
    /// duplexd's side: a new, zeroed region.
    pub fn create() -> Result<Self, RegionError> {
        let region = Region::create("cluster-state", RegionKind::Plain, LEN, [TAG, 0, 0, 0, 0])?;
        Ok(Self { region })
    }

    /// A service's side: attaches the handed-over region, checking it is one.
    pub fn attach(fd: OwnedFd) -> Result<Self, RegionError> {
        let region = Region::attach(fd, RegionKind::Plain)?;
        if region.params()[0] != TAG || region.len() < LEN {
            return Err(RegionError::BadLayout(
                "not a cluster state region (tag or size)".into(),
            ));
        }
        Ok(Self { region })
    }

    /// The region (duplexd keeps its fd).
    pub fn region(&self) -> &Region {
        &self.region
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        self.region.atomic_u64(offset)
    }

    // ---- the datapath's side ----

    /// Records the number of cluster drives.
    pub fn set_drives(&self, n: u64) {
        self.word(DRIVES).store(n, Ordering::Release);
    }

    /// Records a round: `written` drives took this node's slot; `slots` what was read.
    pub fn record_round(&self, written: u64, slots: &[Option<SlotView>; SLOTS]) {
        let round = if written > 0 {
            self.word(ROUNDS).fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.word(ROUNDS).load(Ordering::Acquire)
        };
        self.word(WRITTEN).store(written, Ordering::Release);
        for (s, v) in slots.iter().enumerate() {
            let Some(v) = v else { continue };
            let base = SLOT_BASE + 64 * s;
            let seq = self.word(base);
            let odd = seq.load(Ordering::Relaxed) | 1;
            seq.store(odd, Ordering::Release);
            std::sync::atomic::fence(Ordering::Release);
            self.word(base + 8).store(v.counter, Ordering::Relaxed);
            self.word(base + 16).store(v.boot, Ordering::Relaxed);
            self.word(base + 24).store(v.drives, Ordering::Relaxed);
            self.word(base + 32).store(round, Ordering::Relaxed);
            seq.store(odd + 1, Ordering::Release);
        }
    }

    /// Marks this node fenced.
    pub fn set_fenced(&self) {
        self.word(FENCED).store(1, Ordering::Release);
    }

    /// The newest fence request not answered yet: `(seq, victim key)`.
    pub fn fence_request(&self) -> Option<(u64, u64)> {
        let seq = self.word(FENCE_REQ_SEQ).load(Ordering::Acquire);
        let key = self.word(FENCE_REQ_KEY).load(Ordering::Acquire);
        let answered = self.word(FENCE_ANS_SEQ).load(Ordering::Acquire);
        (seq != 0 && seq != answered).then_some((seq, key))
    }

    /// Answers fence request `seq`.
    pub fn answer_fence(&self, seq: u64, outcome: FenceOutcome, preempted: u64) {
        self.word(FENCE_ANS_OUTCOME)
            .store(outcome.code(), Ordering::Release);
        self.word(FENCE_ANS_DRIVES)
            .store(preempted, Ordering::Release);
        self.word(FENCE_ANS_SEQ).store(seq, Ordering::Release);
    }

    // ---- the readers' side ----

    /// Disk heartbeat rounds the datapath has done.
    pub fn rounds(&self) -> u64 {
        self.word(ROUNDS).load(Ordering::Acquire)
    }

    /// Drives written in the last round, of how many.
    pub fn written(&self) -> (u64, u64) {
        (
            self.word(WRITTEN).load(Ordering::Acquire),
            self.word(DRIVES).load(Ordering::Acquire),
        )
    }

    /// Whether the datapath found this node fenced.
    pub fn fenced(&self) -> bool {
        self.word(FENCED).load(Ordering::Acquire) != 0
    }

    /// Slot `s` as last read (`None`: never read, out of range, or being written now for
    /// longer than a few tries).
    pub fn slot(&self, s: usize) -> Option<SlotView> {
        if s >= SLOTS {
            return None;
        }
        let base = SLOT_BASE + 64 * s;
        for _ in 0..64 {
            let before = self.word(base).load(Ordering::Acquire);
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let v = SlotView {
                counter: self.word(base + 8).load(Ordering::Relaxed),
                boot: self.word(base + 16).load(Ordering::Relaxed),
                drives: self.word(base + 24).load(Ordering::Relaxed),
                round: self.word(base + 32).load(Ordering::Relaxed),
            };
            std::sync::atomic::fence(Ordering::Acquire);
            if self.word(base).load(Ordering::Acquire) == before {
                return (before != 0).then_some(v);
            }
        }
        None
    }

    /// Asks the datapath to fence `victim` (a reservation key); returns the request's number.
    pub fn request_fence(&self, victim: u64) -> u64 {
        let seq = self
            .word(FENCE_REQ_SEQ)
            .load(Ordering::Acquire)
            .wrapping_add(1)
            .max(1);
        self.word(FENCE_REQ_KEY).store(victim, Ordering::Release);
        self.word(FENCE_REQ_SEQ).store(seq, Ordering::Release);
        seq
    }

    /// The newest fence answer, if any.
    pub fn fence_answer(&self) -> Option<FenceAnswer> {
        let seq = self.word(FENCE_ANS_SEQ).load(Ordering::Acquire);
        (seq != 0).then(|| FenceAnswer {
            seq,
            outcome: FenceOutcome::from_code(self.word(FENCE_ANS_OUTCOME).load(Ordering::Acquire)),
            preempted: self.word(FENCE_ANS_DRIVES).load(Ordering::Acquire),
        })
    }

    /// The cluster service records that the pools of node slot `slot` are this node's now (the
    /// peer, key `key`, is fenced off every drive).
    pub fn claim(&self, slot: usize, key: u64) {
        if slot < SLOTS {
            self.word(TAKEOVER_KEY).store(key, Ordering::Release);
            self.word(TAKEOVER).fetch_or(1 << slot, Ordering::AcqRel);
        }
    }

    /// Withdraws the claims (a giveback, or the peer rejoined).
    pub fn release_claims(&self, slots: u64) {
        self.word(TAKEOVER).fetch_and(!slots, Ordering::AcqRel);
    }

    /// The metadata service changed a pool on the drives (a commit, a move): the peer is told
    /// with the next beat.
    pub fn bump_config_generation(&self) {
        self.word(CONFIG_GEN).fetch_add(1, Ordering::AcqRel);
    }

    /// This node's configuration generation.
    pub fn config_generation(&self) -> u64 {
        self.word(CONFIG_GEN).load(Ordering::Acquire)
    }

    /// The cluster service records the peer's configuration generation.
    pub fn set_peer_config_generation(&self, g: u64) {
        self.word(PEER_CONFIG_GEN).store(g, Ordering::Release);
    }

    /// The peer's configuration generation as last heard.
    pub fn peer_config_generation(&self) -> u64 {
        self.word(PEER_CONFIG_GEN).load(Ordering::Acquire)
    }

    /// duplexd records whether the host link is down.
    pub fn set_host_link_down(&self, down: bool) {
        self.word(HOST_LINK_DOWN)
            .store(u64::from(down), Ordering::Release);
    }

    /// The cluster service records whether the peer is alive on the interconnect.
    pub fn set_peer_linked(&self, alive: bool) {
        self.word(PEER_LINKED)
            .store(u64::from(alive), Ordering::Release);
    }

    /// Whether the peer is alive on the interconnect (a planned move needs it: the peer
    /// learns of the move by it).
    pub fn peer_linked(&self) -> bool {
        self.word(PEER_LINKED).load(Ordering::Acquire) != 0
    }

    /// Whether the host link is down (for the dead time).
    pub fn host_link_down(&self) -> bool {
        self.word(HOST_LINK_DOWN).load(Ordering::Acquire) != 0
    }

    /// The metadata service says which pool drives hold current data of some pool (bit `i`:
    /// the topology's pool drive `i`).
    pub fn set_must_fence(&self, mask: u64) {
        self.word(MUST_FENCE).store(mask, Ordering::Release);
        self.word(MUST_FENCE_SET).store(1, Ordering::Release);
    }

    /// The must-fence mask, once the metadata service wrote one.
    pub fn must_fence(&self) -> Option<u64> {
        (self.word(MUST_FENCE_SET).load(Ordering::Acquire) == 1)
            .then(|| self.word(MUST_FENCE).load(Ordering::Acquire))
    }

    /// The datapath records the drives' reservations (read in heartbeat round `round`).
    pub fn record_reservations(&self, round: u64, drives: &[DriveReservation]) {
        let seq = self.word(RESV_SEQ);
        let odd = seq.load(Ordering::Relaxed) | 1;
        seq.store(odd, Ordering::Release);
        std::sync::atomic::fence(Ordering::Release);
        let n = drives.len().min(MAX_REPORTED_DRIVES);
        self.word(RESV_COUNT).store(n as u64, Ordering::Relaxed);
        self.word(RESV_ROUND).store(round, Ordering::Relaxed);
        for (d, r) in drives.iter().take(n).enumerate() {
            let base = RESV_BASE + RESV_ENTRY * d;
            let mut name = [0u8; NAME_BYTES];
            // An unreadable drive is reported by name with no keys; its error is not kept
            // (the datapath's log has it): a type of 0xFF says so.
            let len = r.name.len().min(NAME_BYTES);
            name[..len].copy_from_slice(&r.name.as_bytes()[..len]);
            for (i, w) in name.chunks(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                self.word(base + 8 * i)
                    .store(u64::from_le_bytes(b), Ordering::Relaxed);
            }
            let rtype = if r.error.is_empty() { r.rtype } else { 0xFF };
            let keys = r.keys.len().min(KEYS_PER_DRIVE);
            let holders = r
                .keys
                .iter()
                .take(keys)
                .enumerate()
                .fold(0u64, |m, (k, (_, h))| if *h { m | 1 << k } else { m });
            self.word(base + 32)
                .store(u64::from(rtype), Ordering::Relaxed);
            self.word(base + 40).store(keys as u64, Ordering::Relaxed);
            self.word(base + 48).store(holders, Ordering::Relaxed);
            for (k, (key, _)) in r.keys.iter().take(keys).enumerate() {
                self.word(base + 64 + 8 * k).store(*key, Ordering::Relaxed);
            }
        }
        seq.store(odd + 1, Ordering::Release);
    }

    /// The drives' reservations as last recorded, and the round they were read in (`None`:
    /// never recorded, or being written for longer than a few tries). Names are cut at 32
    /// bytes and made printable; a drive that could not be read says so in `error`.
    pub fn reservations(&self) -> Option<(u64, Vec<DriveReservation>)> {
        for _ in 0..64 {
            let before = self.word(RESV_SEQ).load(Ordering::Acquire);
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let n =
                (self.word(RESV_COUNT).load(Ordering::Relaxed) as usize).min(MAX_REPORTED_DRIVES);
            let round = self.word(RESV_ROUND).load(Ordering::Relaxed);
            let mut out = Vec::with_capacity(n);
            for d in 0..n {
                let base = RESV_BASE + RESV_ENTRY * d;
                let mut name = Vec::with_capacity(NAME_BYTES);
                for i in 0..NAME_BYTES / 8 {
                    name.extend_from_slice(
                        &self
                            .word(base + 8 * i)
                            .load(Ordering::Relaxed)
                            .to_le_bytes(),
                    );
                }
                let end = name.iter().position(|&b| b == 0).unwrap_or(NAME_BYTES);
                let name: String = String::from_utf8_lossy(&name[..end])
                    .chars()
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect();
                let rtype = self.word(base + 32).load(Ordering::Relaxed);
                let keys =
                    (self.word(base + 40).load(Ordering::Relaxed) as usize).min(KEYS_PER_DRIVE);
                let holders = self.word(base + 48).load(Ordering::Relaxed);
                let keys = (0..keys)
                    .map(|k| {
                        (
                            self.word(base + 64 + 8 * k).load(Ordering::Relaxed),
                            holders & (1 << k) != 0,
                        )
                    })
                    .collect();
                out.push(if rtype == 0xFF {
                    DriveReservation {
                        name,
                        error: "unreadable".into(),
                        ..DriveReservation::default()
                    }
                } else {
                    DriveReservation {
                        name,
                        rtype: u8::try_from(rtype).unwrap_or(0),
                        keys,
                        error: String::new(),
                    }
                });
            }
            std::sync::atomic::fence(Ordering::Acquire);
            if self.word(RESV_SEQ).load(Ordering::Acquire) == before {
                return (before != 0).then_some((round, out));
            }
        }
        None
    }

    /// The cluster service: this boot has joined the cluster (the peer acknowledged it, or is
    /// dead, or was never heard for the dead time).
    pub fn set_joined(&self) {
        self.word(JOINED).store(1, Ordering::Release);
    }

    /// Whether this boot has joined the cluster: until then the metadata service serves none
    /// of this node's pools.
    pub fn joined(&self) -> bool {
        self.word(JOINED).load(Ordering::Acquire) != 0
    }

    /// The metadata service: the claimed node slots whose pools it has all imported.
    pub fn set_settled(&self, slots: u64) {
        self.word(SETTLED).store(slots, Ordering::Release);
    }

    /// The claimed node slots whose pools the metadata service has all imported.
    pub fn settled(&self) -> u64 {
        self.word(SETTLED).load(Ordering::Acquire)
    }

    /// The node slots whose pools this node has taken over (bit `s`), and the fenced key.
    pub fn claims(&self) -> (u64, u64) {
        (
            self.word(TAKEOVER).load(Ordering::Acquire) & ((1 << SLOTS) - 1),
            self.word(TAKEOVER_KEY).load(Ordering::Acquire),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_agree_through_one_region() {
        let dp = ClusterRegion::create().expect("test");
        let other = ClusterRegion::attach(dp.region().try_clone_fd().expect("test")).expect("test");
        assert_eq!(other.rounds(), 0);
        assert_eq!(other.slot(1), None, "never read");
        let mut slots = [None; SLOTS];
        slots[1] = Some(SlotView {
            counter: 9,
            boot: 77,
            drives: 2,
            round: 0,
        });
        dp.set_drives(2);
        dp.record_round(2, &slots);
        assert_eq!(other.rounds(), 1);
        assert_eq!(other.written(), (2, 2));
        let v = other.slot(1).expect("test");
        assert_eq!((v.counter, v.boot, v.drives, v.round), (9, 77, 2, 1));
        assert_eq!(other.slot(0), None);
        assert_eq!(other.slot(9), None, "out of range");
        // A round that wrote nothing does not count.
        dp.record_round(0, &[None; SLOTS]);
        assert_eq!(other.rounds(), 1);
        assert_eq!(other.written(), (0, 2));

        assert_eq!(dp.fence_request(), None);
        let seq = other.request_fence(0xabc);
        assert_eq!(dp.fence_request(), Some((seq, 0xabc)));
        assert_eq!(other.fence_answer(), None);
        dp.answer_fence(seq, FenceOutcome::Unreachable, 1);
        assert_eq!(dp.fence_request(), None, "answered once");
        let a = other.fence_answer().expect("test");
        assert_eq!(
            (a.seq, a.outcome, a.preempted),
            (seq, Some(FenceOutcome::Unreachable), 1)
        );
        let seq2 = other.request_fence(0xdef);
        assert!(seq2 > seq);
        assert_eq!(dp.fence_request(), Some((seq2, 0xdef)));

        other.claim(1, 0xdef);
        other.claim(7, 1);
        assert_eq!(dp.claims(), (0b10, 0xdef));
        other.release_claims(0b10);
        assert_eq!(dp.claims().0, 0);
        assert_eq!(dp.config_generation(), 0);
        other.bump_config_generation();
        assert_eq!(dp.config_generation(), 1);
        dp.set_peer_config_generation(7);
        assert_eq!(other.peer_config_generation(), 7);
        assert!(!other.host_link_down());
        dp.set_host_link_down(true);
        assert!(other.host_link_down());
        assert!(!other.fenced());
        dp.set_fenced();
        assert!(other.fenced());

        assert!(!dp.joined());
        other.set_joined();
        assert!(dp.joined());
        other.set_settled(0b10);
        assert_eq!(dp.settled(), 0b10);

        assert_eq!(other.reservations(), None, "never recorded");
        let long = "a-drive-name-longer-than-thirty-two-bytes";
        let drives = vec![
            DriveReservation {
                name: "d0".into(),
                rtype: 3,
                keys: vec![
                    (0x0001_0000_0000_0007, true),
                    (0x0002_0000_0000_0009, false),
                ],
                error: String::new(),
            },
            DriveReservation {
                name: long.into(),
                rtype: 3,
                keys: (1..=6).map(|k| (k, false)).collect(),
                error: String::new(),
            },
            DriveReservation {
                name: "d\n2".into(),
                rtype: 0,
                keys: vec![],
                error: "pulled".into(),
            },
        ];
        dp.record_reservations(5, &drives);
        let (round, got) = other.reservations().expect("recorded");
        assert_eq!(round, 5);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], drives[0]);
        assert_eq!(got[1].name, &long[..32], "names cut at 32 bytes");
        assert_eq!(got[1].keys.len(), KEYS_PER_DRIVE, "at most four keys");
        assert_eq!(got[2].error, "unreadable");
        assert_eq!(got[2].name, "d?2", "control characters do not pass");
        assert!(got[2].keys.is_empty());
        // Fewer drives the next time: only those.
        dp.record_reservations(6, &drives[..1]);
        assert_eq!(other.reservations().expect("recorded").1.len(), 1);
    }

    #[test]
    fn another_region_is_refused() {
        let r = Region::create("x", RegionKind::Plain, LEN, [1, 0, 0, 0, 0]).expect("test");
        let e = ClusterRegion::attach(r.try_clone_fd().expect("test")).expect_err("refused");
        assert!(e.to_string().contains("cluster state"), "{e}");
    }
}
