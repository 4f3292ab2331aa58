//! The disk heartbeat and the peer's fencing: the datapath's share of the cluster (issue 15).
//!
//! A cluster member's datapath, every beat interval, on every drive that holds its reservation
//! key (in drive name order):
//! 1. reads the heartbeat area (the four 4 KiB slots at [`HEARTBEAT_OFFSET`]), one command;
//! 2. writes this node's slot (`node_id - 1`) with Force Unit Access: its boot number, a counter
//!    that grows by one per round, and the peer's boot and counter as last read.
//!
//! What it reads goes to the node's cluster state region ([`ClusterRegion`]) for the cluster
//! service, which feeds the peer's slot to its membership model: the second witness that tells
//! a dead peer from a cut interconnect. The datapath is the writer because it is the one process
//! that never restarts (its death halts the node), so a restarting cluster or metadata service
//! never stops the heartbeat; and a datapath that hangs stops it, as it should.
//!
//! The same region carries the cluster service's fence requests: the datapath preempts and
//! aborts the victim's key on every drive in name order ([`crate::fence::Fence`]) and answers.
//! Both run on the engine's thread between two turns, with the drives' commands waited for on
//! their I/O queues (the completions of host I/O seen meanwhile are kept for the next poll).
//!
//! A drive that answers Reservation Conflict fences the node ([`crate::fence::mark_fenced`]):
//! from then on no heartbeat is written, so the peer sees this node's disk heartbeat stop too.

use std::time::{Duration, Instant};

use duplex_ipc::cluster::{ClusterRegion, DriveReservation, FenceOutcome, SlotView, SLOTS};
use duplex_ipc::topology::ClusterSpec;
use duplex_ondisk::heartbeat::{Heartbeat, HEARTBEAT_SIZE};
use duplex_ondisk::layout::HEARTBEAT_OFFSET;
use duplex_ondisk::Uuid;

use crate::drives::Drive;
use crate::fence::{is_fenced, mark_fenced, Fence, FenceError, FenceKey, Reservations, Step};

/// Every this many rounds (and after a fence) the drives' reservations are read for
/// `duplexctl cluster status`: one Reservation Report per drive.
const REPORT_EVERY: u64 = 20;

/// A boot number as the 16-byte boot id of the heartbeat slot (little-endian, zero padded).
pub fn boot_id(boot: u64) -> Uuid {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&boot.to_le_bytes());
    Uuid(b)
}

/// The boot number of a slot's boot id.
pub fn boot_of(id: &Uuid) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.0[..8]);
    u64::from_le_bytes(b)
}

/// The disk heartbeat of one node.
#[derive(Debug)]
pub struct DiskBeat {
    region: ClusterRegion,
    slot: usize,
    peer_slot: usize,
    boot: u64,
    key: FenceKey,
    interval: Duration,
    next: Instant,
    counter: u64,
    peer: SlotView,
    announced: bool,
    /// The node's pool drives in the topology's order (bit `i` of the metadata service's
    /// must-fence mask is `names[i]`).
    names: Vec<String>,
}

impl DiskBeat {
    /// The heartbeat of the node `spec` describes, reporting to `region`; `key` is the node's
    /// reservation key (its fencing identity on the drives).
    pub fn new(region: ClusterRegion, spec: &ClusterSpec, key: u64) -> Self {
        Self {
            region,
            slot: spec.slot(),
            peer_slot: spec.peer_slot(),
            boot: spec.boot,
            key: FenceKey(key),
            interval: Duration::from_millis(spec.beat_ms.max(1)),
            next: Instant::now(),
            counter: 0,
            peer: SlotView::default(),
            announced: false,
            names: Vec::new(),
        }
    }

    /// Names the node's pool drives in the topology's order, for the metadata service's
    /// must-fence mask (without it, every drive must be fenced).
    pub fn with_drive_names(mut self, names: Vec<String>) -> Self {
        self.names = names;
        self
    }

    /// How long until the next round is due (zero: now).
    pub fn due_in(&self, now: Instant) -> Duration {
        self.next.saturating_duration_since(now)
    }

    /// Whether anything is to be done now: a round due or a fence request waiting.
    pub fn wants(&self, now: Instant) -> bool {
        now >= self.next || self.region.fence_request().is_some()
    }

    /// Does what is due on `drives` (every drive of the node; the cluster's are picked).
    /// Returns why, when every cluster drive is lost (dead: its controller did not come back):
    /// the node can serve nothing and must stop, so that its peer sees it silent and takes
    /// its pools over.
    pub fn run(&mut self, now: Instant, drives: Vec<&mut Drive>) -> Option<String> {
        let mut drives: Vec<&mut Drive> = drives
            .into_iter()
            .filter(|d| d.is_cluster_drive())
            .collect();
        drives.sort_by(|a, b| a.name().cmp(b.name()));
        if !self.announced {
            self.announced = true;
            self.region.set_drives(drives.len() as u64);
            tracing::info!(
                drives = drives.len(),
                slot = self.slot,
                interval_ms = self.interval.as_millis() as u64,
                "disk heartbeat on the cluster's drives"
            );
        }
        let mut report = false;
        if let Some((seq, victim)) = self.region.fence_request() {
            let (outcome, preempted) = self.fence(&mut drives, FenceKey(victim));
            self.region.answer_fence(seq, outcome, preempted);
            report = true;
        }
        if now >= self.next {
            self.next = now + self.interval;
            self.round(&mut drives);
            report |= self.counter % REPORT_EVERY == 1;
        }
        if report {
            self.report(&mut drives);
        }
        if is_fenced() {
            self.region.set_fenced();
        }
        if !drives.is_empty() && drives.iter().all(|d| d.is_dead()) {
            let names: Vec<&str> = drives.iter().map(|d| d.name()).collect();
            tracing::error!(drives = %names.join(","), "every drive of this cluster member is lost: stopping so that the peer takes over");
            return Some(names.join(", "));
        }
        None
    }

    /// One heartbeat round.
    fn round(&mut self, drives: &mut [&mut Drive]) {
        if is_fenced() {
            // A fenced node writes nothing more: its peer sees the heartbeat stop.
            self.region.record_round(0, &[None; SLOTS]);
            return;
        }
        self.counter += 1;
        let mut seen: [Option<SlotView>; SLOTS] = [None; SLOTS];
        let mut written = 0u64;
        let mut area = vec![0u8; HEARTBEAT_SIZE * SLOTS];
        for d in drives.iter_mut() {
            if d.is_dead() {
                continue;
            }
            match d.read_sync(HEARTBEAT_OFFSET, &mut area) {
                Ok(()) => {
                    for (s, v) in seen.iter_mut().enumerate() {
                        if s == self.slot {
                            continue;
                        }
                        let Ok(hb) = Heartbeat::parse(&area[s * HEARTBEAT_SIZE..]) else {
                            continue;
                        };
                        if hb.node_id as usize != s {
                            continue;
                        }
                        let boot = boot_of(&hb.boot_id);
                        let v = v.get_or_insert(SlotView {
                            counter: hb.counter,
                            boot,
                            drives: 0,
                            round: 0,
                        });
                        // The newest writer wins: a drive that missed the last writes shows
                        // an older counter of the same boot.
                        if boot != v.boot && hb.counter > 0 && boot > v.boot {
                            v.boot = boot;
                            v.counter = hb.counter;
                        } else if boot == v.boot {
                            v.counter = v.counter.max(hb.counter);
                        }
                        v.drives += 1;
                    }
                }
                Err(e) => {
                    tracing::debug!(drive = d.name(), error = %e, "heartbeat area unreadable");
                }
            }
            if is_fenced() {
                break;
            }
            if let Some(p) = seen[self.peer_slot] {
                self.peer = p;
            }
            let hb = Heartbeat {
                node_id: self.slot as u32,
                boot_id: boot_id(self.boot),
                epoch: 0,
                counter: self.counter,
                peer_boot_id: boot_id(self.peer.boot),
                peer_counter: self.peer.counter,
            };
            let at = HEARTBEAT_OFFSET + (self.slot * HEARTBEAT_SIZE) as u64;
            match d.write_sync(at, &hb.encode()[..]) {
                Ok(()) => written += 1,
                Err(e) => {
                    tracing::debug!(drive = d.name(), error = %e, "heartbeat not written");
                }
            }
            if is_fenced() {
                break;
            }
        }
        if is_fenced() {
            self.region.record_round(0, &[None; SLOTS]);
        } else {
            self.region.record_round(written, &seen);
        }
    }

    /// Reads every drive's reservation (Reservation Report) into the region.
    fn report(&mut self, drives: &mut [&mut Drive]) {
        let list: Vec<DriveReservation> = drives
            .iter_mut()
            .map(|d| {
                let name = d.name().to_owned();
                if d.is_dead() {
                    return DriveReservation {
                        name,
                        error: "dead".into(),
                        ..DriveReservation::default()
                    };
                }
                match d.reservations().report() {
                    Ok(k) => DriveReservation {
                        name,
                        rtype: k.rtype.map_or(0, |t| t.code()),
                        keys: k.keys.iter().map(|(key, h)| (key.0, *h)).collect(),
                        error: String::new(),
                    },
                    Err(e) => DriveReservation {
                        name,
                        error: match e {
                            crate::fence::DriveError::Conflict => "reservation conflict".into(),
                            crate::fence::DriveError::Unreachable(why) => {
                                format!("unreachable: {why}")
                            }
                            crate::fence::DriveError::Failed(why) => why,
                        },
                        ..DriveReservation::default()
                    },
                }
            })
            .collect();
        self.region.record_reservations(self.counter, &list);
    }

    /// Fences `victim` off every drive (in name order); the outcome and the drives on which
    /// its key was preempted now.
    fn fence(&mut self, drives: &mut [&mut Drive], victim: FenceKey) -> (FenceOutcome, u64) {
        if drives.is_empty() {
            return (FenceOutcome::NoDrives, 0);
        }
        if victim.node() == self.key.node() {
            tracing::error!(%victim, "refusing to fence this node's own id");
            return (FenceOutcome::Failed, 0);
        }
        let started = Instant::now();
        let resv = drives.iter_mut().map(|d| d.reservations()).collect();
        let mut fence = Fence::new(resv, self.key);
        // An unreachable drive may be passed over only when the metadata service said which
        // drives hold current pool data, and this is not one of them.
        let must = self.region.must_fence();
        let names = &self.names;
        let r = fence.fence_skipping(victim, |name| {
            must.is_some_and(|mask| {
                names
                    .iter()
                    .position(|n| n == name)
                    .is_some_and(|i| i < 64 && mask & (1 << i) == 0)
            })
        });
        drop(fence);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        match r {
            Ok(steps) => {
                let preempted = steps.iter().filter(|s| **s == Step::Preempted).count() as u64;
                tracing::warn!(%victim, drives = steps.len(), preempted, elapsed_ms = ms, "peer fenced off every drive");
                (FenceOutcome::Fenced, preempted)
            }
            Err(e @ FenceError::Fenced { .. }) => {
                mark_fenced("(fencing the peer)", &e);
                (FenceOutcome::SelfFenced, 0)
            }
            Err(e @ FenceError::Unreachable { .. }) => {
                tracing::error!(%victim, error = %e, elapsed_ms = ms, "fencing the peer failed: no takeover");
                (FenceOutcome::Unreachable, 0)
            }
        }
    }
}
