//! The RAID jobs region: how the datapath, the `raid` service and the metadata service of one
//! node schedule the long work of parity pools — rebuilds and scrubs (issue 16).
//!
//! The per-I/O work of a rebuild or scrub (one stripe window at a time, under the window's
//! lock) runs in the datapath; the `raid` service decides how far each job may go (rate
//! control: the operator's `--rate`, or by default yielding to host I/O), measures its rate
//! and ETA, and says when a position is worth checkpointing; the metadata service commits
//! those checkpoints to the pool's drives (the member's on-disk rebuild position), so a
//! restarted datapath, a takeover or a power cut resumes a rebuild from its checkpoint.
//!
//! A plain region duplexd creates for a node with a metadata service (resource
//! [`RAID_RESOURCE`]) and keeps across the services' restarts. Every field is a 64-bit atomic
//! word with one writer:
//!
//! | offset | writer | field |
//! |---|---|---|
//! | 64 | datapath | rounds: +1 each time the datapath has rewritten the job table |
//! | 72 | raid | the raid service's ticks (+1 each time it has looked at every job) |
//! | 512 + 128 e | datapath | job `e` (0..[`JOBS`]): `seq` (odd while written), key ([`JobKey`] encoded; 0: empty), done, total, host I/Os on the device, position the job started from in this datapath |
//! | 512 + 128 e + 64 | raid | job `e`'s grant: key (0 while written), limit (the datapath may start windows below it) |
//! | 512 + 128 e + 80 | raid | job `e`: measured rate (bytes/s), ETA (ms; `u64::MAX` unknown), checkpoint asked (bytes) |
//! | 512 + 128 e + 104 | metadata | job `e`: the checkpoint committed on the drives (bytes), and the key it is for |
//! | 3584 + 16 r | metadata | rate `r` (0..[`RATES`]): key of a pool device + 1 (0: empty), bytes/s (0: yield to host I/O) |
//!
//! Readers validate what they read (a stale or torn entry is skipped): a confused writer can
//! stall a job or drop a figure, never make a reader panic.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::region::{Region, RegionError, RegionKind};

/// Resource name of the region.
pub const RAID_RESOURCE: &str = "raid-jobs";
/// `params[0]` of the region says it is one.
const TAG: u64 = u64::from_le_bytes(*b"RAIDJOB\x01");
const LEN: usize = 4096;
const ROUNDS: usize = 64;
const TICKS: usize = 72;
const JOB_BASE: usize = 512;
const JOB_LEN: usize = 128;
/// Job entries.
pub const JOBS: usize = 24;
const RATE_BASE: usize = JOB_BASE + JOBS * JOB_LEN;
/// Rate entries (pools with an operator's rate).
pub const RATES: usize = (LEN - RATE_BASE) / 16;

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// A member being rebuilt.
    Rebuild,
    /// Parity checked against data.
    Scrub,
}

/// A job's identity: the pool's datapath device, what it does, and (a rebuild) which member
/// slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct JobKey {
    /// The pool's datapath device index.
    pub device: u32,
    /// Rebuild or scrub.
    pub kind: JobKind,
    /// The member slot rebuilt (0 for a scrub).
    pub slot: u16,
}

impl JobKey {
    /// The key as one nonzero word.
    pub fn encode(self) -> u64 {
        let kind = match self.kind {
            JobKind::Rebuild => 1u64,
            JobKind::Scrub => 2,
        };
        ((u64::from(self.device) + 1) << 32) | (kind << 16) | u64::from(self.slot)
    }

    /// The key a word names, if it names one.
    pub fn decode(w: u64) -> Option<Self> {
        let device = u32::try_from((w >> 32).checked_sub(1)?).ok()?;
        let kind = match (w >> 16) & 0xffff {
            1 => JobKind::Rebuild,
            2 => JobKind::Scrub,
            _ => return None,
        };
        let slot = (w & 0xffff) as u16;
        if kind == JobKind::Scrub && slot != 0 {
            return None;
        }
        Some(Self { device, kind, slot })
    }
}

/// What the datapath says of one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobReport {
    /// Which job.
    pub key: JobKey,
    /// Bytes done (of each member, for a rebuild; of the member length, for a scrub).
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
    /// Host I/Os the pool's device has taken so far (a count that only grows).
    pub host_ios: u64,
    /// Where this datapath started the job (a rebuild resumed from its checkpoint starts
    /// there).
    pub started_at: u64,
}

/// What the raid service says of one job (besides its grant).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobFigures {
    /// Measured rate, bytes/s.
    pub rate: u64,
    /// Estimated time left, ms (`u64::MAX`: unknown).
    pub eta_ms: u64,
    /// The position the metadata service should commit (0: none asked).
    pub checkpoint: u64,
}

/// A job as every side sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobView {
    /// The entry's index.
    pub entry: usize,
    /// The datapath's report.
    pub report: JobReport,
    /// The raid service's limit for this job, if it granted one for this key.
    pub limit: Option<u64>,
    /// The raid service's figures (zero until it looked).
    pub figures: JobFigures,
    /// The checkpoint the metadata service committed for this key (0: none).
    pub committed: u64,
}

/// The region (any side).
#[derive(Debug)]
pub struct RaidRegion {
    region: Region,
}

impl RaidRegion {
    /// duplexd's side: a new, zeroed region.
    pub fn create() -> Result<Self, RegionError> {
        let region = Region::create("raid-jobs", RegionKind::Plain, LEN, [TAG, 0, 0, 0, 0])?;
        Ok(Self { region })
    }

    /// A service's side: attaches the handed-over region, checking it is one.
    pub fn attach(fd: OwnedFd) -> Result<Self, RegionError> {
        let region = Region::attach(fd, RegionKind::Plain)?;
        if region.params()[0] != TAG || region.len() < LEN {
            return Err(RegionError::BadLayout(
                "not a RAID jobs region (tag or size)".into(),
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

    fn job(e: usize) -> usize {
        JOB_BASE + JOB_LEN * e
    }

    // ---- the datapath's side ----

    /// Rewrites the job table with `jobs` (at most [`JOBS`]; the rest are dropped with the
    /// caller told by the return value), keeping each job in the entry it had so the raid
    /// service's grant stays with it. Returns how many jobs did not fit.
    pub fn publish_jobs(&self, jobs: &[JobReport]) -> usize {
        let mut placed = [false; JOBS];
        let mut entry_of = vec![None; jobs.len()];
        // Jobs already in an entry stay there.
        for (j, r) in jobs.iter().enumerate() {
            let key = r.key.encode();
            if let Some(e) = (0..JOBS)
                .find(|&e| !placed[e] && self.word(Self::job(e) + 8).load(Ordering::Acquire) == key)
            {
                placed[e] = true;
                entry_of[j] = Some(e);
            }
        }
        let mut dropped = 0;
        for (j, _) in jobs.iter().enumerate() {
            if entry_of[j].is_some() {
                continue;
            }
            match (0..JOBS).find(|&e| !placed[e]) {
                Some(e) => {
                    placed[e] = true;
                    entry_of[j] = Some(e);
                }
                None => dropped += 1,
            }
        }
        for e in 0..JOBS {
            let report = entry_of.iter().position(|x| *x == Some(e)).map(|j| jobs[j]);
            let base = Self::job(e);
            let seq = self.word(base);
            let odd = seq.load(Ordering::Relaxed) | 1;
            seq.store(odd, Ordering::Release);
            std::sync::atomic::fence(Ordering::Release);
            match report {
                Some(r) => {
                    self.word(base + 8).store(r.key.encode(), Ordering::Relaxed);
                    self.word(base + 16).store(r.done, Ordering::Relaxed);
                    self.word(base + 24).store(r.total, Ordering::Relaxed);
                    self.word(base + 32).store(r.host_ios, Ordering::Relaxed);
                    self.word(base + 40).store(r.started_at, Ordering::Relaxed);
                }
                None => {
                    for off in [8, 16, 24, 32, 40] {
                        self.word(base + off).store(0, Ordering::Relaxed);
                    }
                }
            }
            seq.store(odd + 1, Ordering::Release);
        }
        self.word(ROUNDS).fetch_add(1, Ordering::AcqRel);
        dropped
    }

    // ---- the raid service's side ----

    /// Grants job `entry` (which must still be `key`'s) progress up to `limit` bytes.
    pub fn grant(&self, entry: usize, key: JobKey, limit: u64) {
        if entry >= JOBS {
            return;
        }
        let base = Self::job(entry) + 64;
        self.word(base).store(0, Ordering::Release);
        self.word(base + 8).store(limit, Ordering::Release);
        self.word(base).store(key.encode(), Ordering::Release);
    }

    /// Records job `entry`'s figures.
    pub fn set_figures(&self, entry: usize, f: JobFigures) {
        if entry >= JOBS {
            return;
        }
        let base = Self::job(entry) + 80;
        self.word(base).store(f.rate, Ordering::Release);
        self.word(base + 8).store(f.eta_ms, Ordering::Release);
        self.word(base + 16).store(f.checkpoint, Ordering::Release);
    }

    /// One more look at every job done.
    pub fn tick(&self) {
        self.word(TICKS).fetch_add(1, Ordering::AcqRel);
    }

    // ---- the metadata service's side ----

    /// Records that the checkpoint `at` of `key` is on the drives.
    pub fn set_committed(&self, entry: usize, key: JobKey, at: u64) {
        if entry >= JOBS {
            return;
        }
        let base = Self::job(entry) + 104;
        self.word(base + 8).store(0, Ordering::Release);
        self.word(base).store(at, Ordering::Release);
        self.word(base + 8).store(key.encode(), Ordering::Release);
    }

    /// Sets the operator's rate for the pool at `device` (bytes/s; 0: yield to host I/O).
    /// Returns false when every rate entry is taken by other pools.
    pub fn set_rate(&self, device: u32, rate: u64) -> bool {
        let key = u64::from(device) + 1;
        let slot = (0..RATES)
            .find(|&r| self.word(RATE_BASE + 16 * r).load(Ordering::Acquire) == key)
            .or_else(|| {
                (0..RATES).find(|&r| self.word(RATE_BASE + 16 * r).load(Ordering::Acquire) == 0)
            });
        let Some(r) = slot else { return false };
        self.word(RATE_BASE + 16 * r + 8)
            .store(rate, Ordering::Release);
        self.word(RATE_BASE + 16 * r).store(key, Ordering::Release);
        true
    }

    // ---- the readers' side ----

    /// The operator's rate for the pool at `device` (0: none set, yield to host I/O).
    pub fn rate(&self, device: u32) -> u64 {
        let key = u64::from(device) + 1;
        (0..RATES)
            .find(|&r| self.word(RATE_BASE + 16 * r).load(Ordering::Acquire) == key)
            .map_or(0, |r| {
                self.word(RATE_BASE + 16 * r + 8).load(Ordering::Acquire)
            })
    }

    /// How many times the datapath rewrote the job table.
    pub fn rounds(&self) -> u64 {
        self.word(ROUNDS).load(Ordering::Acquire)
    }

    /// How many times the raid service looked at every job.
    pub fn ticks(&self) -> u64 {
        self.word(TICKS).load(Ordering::Acquire)
    }

    /// Entry `e`'s report, if it holds a job and was read whole.
    fn report(&self, e: usize) -> Option<JobReport> {
        let base = Self::job(e);
        for _ in 0..64 {
            let s1 = self.word(base).load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let key = self.word(base + 8).load(Ordering::Relaxed);
            let done = self.word(base + 16).load(Ordering::Relaxed);
            let total = self.word(base + 24).load(Ordering::Relaxed);
            let host_ios = self.word(base + 32).load(Ordering::Relaxed);
            let started_at = self.word(base + 40).load(Ordering::Relaxed);
            std::sync::atomic::fence(Ordering::Acquire);
            if self.word(base).load(Ordering::Relaxed) != s1 {
                continue;
            }
            let key = JobKey::decode(key)?;
            return Some(JobReport {
                key,
                done: done.min(total),
                total,
                host_ios,
                started_at: started_at.min(total),
            });
        }
        None
    }

    /// Every job the datapath reports, with the raid service's grant and figures and the
    /// metadata service's checkpoint.
    pub fn jobs(&self) -> Vec<JobView> {
        let mut out = Vec::new();
        for e in 0..JOBS {
            let Some(report) = self.report(e) else {
                continue;
            };
            let key = report.key.encode();
            let g = Self::job(e) + 64;
            let k1 = self.word(g).load(Ordering::Acquire);
            let limit = self.word(g + 8).load(Ordering::Acquire);
            let k2 = self.word(g).load(Ordering::Acquire);
            let limit = (k1 == key && k2 == key).then_some(limit);
            let f = Self::job(e) + 80;
            let figures = JobFigures {
                rate: self.word(f).load(Ordering::Acquire),
                eta_ms: self.word(f + 8).load(Ordering::Acquire),
                checkpoint: self.word(f + 16).load(Ordering::Acquire),
            };
            let c = Self::job(e) + 104;
            let k1 = self.word(c + 8).load(Ordering::Acquire);
            let at = self.word(c).load(Ordering::Acquire);
            let k2 = self.word(c + 8).load(Ordering::Acquire);
            let committed = if k1 == key && k2 == key { at } else { 0 };
            out.push(JobView {
                entry: e,
                report,
                limit,
                figures,
                committed,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(device: u32, kind: JobKind, slot: u16) -> JobKey {
        JobKey { device, kind, slot }
    }

    #[test]
    fn keys_round_trip_and_junk_is_refused() {
        for k in [
            key(0, JobKind::Rebuild, 0),
            key(7, JobKind::Rebuild, 63),
            key(u32::MAX - 1, JobKind::Scrub, 0),
        ] {
            assert_eq!(JobKey::decode(k.encode()), Some(k));
            assert_ne!(k.encode(), 0);
        }
        assert_eq!(JobKey::decode(0), None);
        assert_eq!(JobKey::decode((1 << 32) | (3 << 16)), None);
        assert_eq!(JobKey::decode((1 << 32) | (2 << 16) | 5), None);
    }

    #[test]
    fn jobs_keep_their_entries_grants_follow_keys() {
        let r = RaidRegion::create().expect("region");
        let a = key(3, JobKind::Rebuild, 1);
        let b = key(4, JobKind::Scrub, 0);
        let rep = |k, done| JobReport {
            key: k,
            done,
            total: 1 << 20,
            host_ios: 5,
            started_at: 0,
        };
        assert_eq!(r.publish_jobs(&[rep(a, 0), rep(b, 0)]), 0);
        let jobs = r.jobs();
        assert_eq!(jobs.len(), 2);
        let ea = jobs
            .iter()
            .find(|j| j.report.key == a)
            .expect("job a")
            .entry;
        assert_eq!(jobs[0].limit, None);
        r.grant(ea, a, 65536);
        r.set_figures(
            ea,
            JobFigures {
                rate: 10,
                eta_ms: 20,
                checkpoint: 4096,
            },
        );
        r.set_committed(ea, a, 4096);
        // Reordered, a progressed: a keeps its entry and its grant.
        assert_eq!(r.publish_jobs(&[rep(b, 1), rep(a, 65536)]), 0);
        let j = r
            .jobs()
            .into_iter()
            .find(|j| j.report.key == a)
            .expect("job a");
        assert_eq!((j.entry, j.limit, j.report.done), (ea, Some(65536), 65536));
        assert_eq!((j.figures.rate, j.committed), (10, 4096));
        // a finished; a new job in its entry does not inherit its grant or checkpoint.
        let c = key(5, JobKind::Rebuild, 0);
        r.publish_jobs(&[rep(b, 2)]);
        r.publish_jobs(&[rep(b, 3), rep(c, 0)]);
        let j = r
            .jobs()
            .into_iter()
            .find(|j| j.report.key == c)
            .expect("job c");
        assert_eq!((j.limit, j.committed), (None, 0));
        assert_eq!(r.rounds(), 4);
    }

    #[test]
    fn more_jobs_than_entries_are_counted_not_written_over() {
        let r = RaidRegion::create().expect("region");
        let jobs: Vec<JobReport> = (0..JOBS as u32 + 3)
            .map(|d| JobReport {
                key: key(d, JobKind::Scrub, 0),
                done: 0,
                total: 1,
                host_ios: 0,
                started_at: 0,
            })
            .collect();
        assert_eq!(r.publish_jobs(&jobs), 3);
        assert_eq!(r.jobs().len(), JOBS);
    }

    #[test]
    fn rates_per_pool() {
        let r = RaidRegion::create().expect("region");
        assert_eq!(r.rate(2), 0);
        assert!(r.set_rate(2, 1000));
        assert!(r.set_rate(3, 5));
        assert!(r.set_rate(2, 7));
        assert_eq!((r.rate(2), r.rate(3), r.rate(4)), (7, 5, 0));
        for d in 10..10 + RATES as u32 - 2 {
            assert!(r.set_rate(d, 1));
        }
        assert!(!r.set_rate(1000, 1));
    }
}
