//! The scheduling model: given the jobs the datapath reports (with what this service and the
//! metadata service last wrote beside them), how far each may go next, its rate and ETA, and
//! which position is worth a checkpoint. Pure: time comes in as milliseconds, so it is tested
//! tick by tick.
//!
//! Rate control. A job's rate is the operator's (`duplexctl pool rate`, bytes per second of
//! each member) if set; otherwise it yields to host I/O: unlimited while the pool's device
//! took no host I/O since the last tick, [`BUSY_RATE`] while it did (md's `speed_limit_min`
//! idea, measured on the pool itself rather than the whole disk). The grant is a token bucket
//! over the position: each tick adds `rate × elapsed` to the last limit, never more than
//! [`BURST_MS`] of work ahead of where the job stands, so a job that overshot (the datapath
//! works in whole 64 KiB windows) waits until the bucket catches up.
//!
//! Checkpoints. A rebuild's position is asked to be committed when it moved and either
//! [`CHECKPOINT_EVERY_MS`] passed since the last ask or it moved by a sixteenth of the member;
//! the metadata service commits at most what the datapath reports done.
//!
//! Restarts. Everything this model keeps it can read back from the region: a new instance
//! takes each job's last limit, rate and checkpoint from what its predecessor wrote, so a
//! crashed raid service costs no work and no regress of the figures. A job whose start
//! position changed or whose progress went back belongs to a new datapath (a restart, a
//! takeover): its history is dropped.

use std::collections::HashMap;

use duplex_ipc::raid::{JobFigures, JobKey, JobKind, JobView};

/// Bytes per second of each member a job may take while hosts use its pool (the default,
/// without an operator's rate).
pub const BUSY_RATE: u64 = 16 << 20;
/// How far ahead of its position a rate-limited job is granted, in milliseconds of its rate.
pub const BURST_MS: u64 = 250;
/// How far a job's position may run ahead of its last limit before the limit follows it:
/// more than a window (one started below the limit ends past it), as much as a bitmap region
/// (a rebuild passes over the clean regions of a member that came back, reading nothing).
pub const AHEAD_SLACK: u64 = 1 << 20;
/// The shortest time between two checkpoint asks of one rebuild.
pub const CHECKPOINT_EVERY_MS: u64 = 1000;

/// What this service tells the datapath and the metadata service about one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The job's entry in the region.
    pub entry: usize,
    /// The job.
    pub key: JobKey,
    /// How far it may go (member bytes; `u64::MAX`: unlimited).
    pub limit: u64,
    /// Rate, ETA, checkpoint asked.
    pub figures: JobFigures,
}

/// Something worth a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Note {
    /// A job seen for the first time by this instance: `done` of `total`, started at `from`.
    Seen {
        /// The job.
        key: JobKey,
        /// Where the datapath started it.
        from: u64,
        /// Where it stands.
        done: u64,
        /// Its length.
        total: u64,
        /// Whether a predecessor of this service had granted it already.
        inherited: bool,
    },
    /// A job left the datapath's list (finished, or its pool went away).
    Ended {
        /// The job.
        key: JobKey,
        /// Where it stood last.
        done: u64,
        /// Its length.
        total: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Track {
    started_at: u64,
    total: u64,
    last_done: u64,
    last_ios: u64,
    last_ms: u64,
    /// Bytes per second (0: not measured).
    rate: f64,
    limit: Option<u64>,
    asked: u64,
    /// When the last checkpoint was asked (`None`: by a predecessor, ask again at once).
    asked_ms: Option<u64>,
}

/// The model (see the module docs).
#[derive(Debug, Default)]
pub struct Scheduler {
    jobs: HashMap<JobKey, Track>,
}

impl Scheduler {
    /// A model knowing no job.
    pub fn new() -> Self {
        Self::default()
    }

    /// One tick at `now_ms` over every job `views` shows; `rate_of(device)` is the operator's
    /// rate of a pool (0: none). Returns what to write for each job and what to log.
    pub fn tick(
        &mut self,
        now_ms: u64,
        views: &[JobView],
        rate_of: impl Fn(u32) -> u64,
    ) -> (Vec<Decision>, Vec<Note>) {
        let mut decisions = Vec::with_capacity(views.len());
        let mut notes = Vec::new();
        for v in views {
            let r = v.report;
            let fresh = || Track {
                started_at: r.started_at,
                total: r.total,
                last_done: r.done,
                last_ios: r.host_ios,
                last_ms: now_ms,
                rate: 0.0,
                limit: None,
                // Where the datapath started the job is on the drives already.
                asked: r.started_at,
                asked_ms: Some(now_ms),
            };
            let t = match self.jobs.get_mut(&r.key) {
                Some(t) if t.started_at == r.started_at && r.done >= t.last_done => t,
                known => {
                    // New to this instance: take what a predecessor wrote, if the job is the
                    // one it wrote for (its checkpoint not past the job's position).
                    let inherited = known.is_none() && v.limit.is_some();
                    let mut t = fresh();
                    if inherited {
                        t.limit = v.limit;
                        t.rate = v.figures.rate as f64;
                        if v.figures.checkpoint <= r.done {
                            t.asked = v.figures.checkpoint;
                        }
                        t.asked_ms = None;
                    }
                    notes.push(Note::Seen {
                        key: r.key,
                        from: r.started_at,
                        done: r.done,
                        total: r.total,
                        inherited,
                    });
                    self.jobs.insert(r.key, t);
                    self.jobs.get_mut(&r.key).expect("just inserted")
                }
            };
            let dt = now_ms.saturating_sub(t.last_ms);
            if dt > 0 {
                let inst = (r.done - t.last_done) as f64 * 1000.0 / dt as f64;
                t.rate = if t.rate == 0.0 {
                    inst
                } else {
                    0.7 * t.rate + 0.3 * inst
                };
            }
            let busy = r.host_ios != t.last_ios;
            let rate = match rate_of(r.key.device) {
                0 if busy => BUSY_RATE,
                0 => 0,
                n => n,
            };
            let limit = if rate == 0 {
                u64::MAX
            } else {
                // Never far behind the position: skipped regions cost no rate.
                let base = match t.limit {
                    Some(l) if l != u64::MAX => l.max(r.done.saturating_sub(AHEAD_SLACK)),
                    _ => r.done,
                };
                let add = rate.saturating_mul(dt) / 1000;
                let cap = r.done.saturating_add(rate.saturating_mul(BURST_MS) / 1000);
                base.saturating_add(add).min(cap)
            };
            if r.key.kind == JobKind::Rebuild
                && r.done > t.asked
                && (t
                    .asked_ms
                    .is_none_or(|at| now_ms.saturating_sub(at) >= CHECKPOINT_EVERY_MS)
                    || r.done - t.asked >= r.total / 16)
            {
                t.asked = r.done;
                t.asked_ms = Some(now_ms);
            }
            let eta_ms = if t.rate >= 1.0 {
                ((r.total - r.done) as f64 * 1000.0 / t.rate) as u64
            } else {
                u64::MAX
            };
            t.last_done = r.done;
            t.last_ios = r.host_ios;
            t.last_ms = now_ms;
            t.limit = Some(limit);
            t.total = r.total;
            decisions.push(Decision {
                entry: v.entry,
                key: r.key,
                limit,
                figures: JobFigures {
                    rate: t.rate as u64,
                    eta_ms,
                    checkpoint: t.asked,
                },
            });
        }
        let ended: Vec<JobKey> = self
            .jobs
            .keys()
            .filter(|k| !views.iter().any(|v| v.report.key == **k))
            .copied()
            .collect();
        for key in ended {
            if let Some(t) = self.jobs.remove(&key) {
                notes.push(Note::Ended {
                    key,
                    done: t.last_done,
                    total: t.total,
                });
            }
        }
        (decisions, notes)
    }
}

#[cfg(test)]
mod tests {
    use duplex_ipc::raid::JobReport;

    use super::*;

    const MIB: u64 = 1 << 20;
    const WINDOW: u64 = 64 << 10;

    fn rebuild(device: u32) -> JobKey {
        JobKey {
            device,
            kind: JobKind::Rebuild,
            slot: 1,
        }
    }

    /// A datapath that runs each job in whole windows up to its limit at once.
    struct Datapath {
        done: u64,
        total: u64,
        ios: u64,
        started_at: u64,
        limit: Option<u64>,
        figures: JobFigures,
    }

    impl Datapath {
        fn view(&self) -> JobView {
            JobView {
                entry: 0,
                report: JobReport {
                    key: rebuild(0),
                    done: self.done,
                    total: self.total,
                    host_ios: self.ios,
                    started_at: self.started_at,
                },
                limit: self.limit,
                figures: self.figures,
                committed: 0,
            }
        }

        fn apply(&mut self, d: &Decision) {
            self.limit = Some(d.limit);
            self.figures = d.figures;
            while self.done < d.limit.min(self.total) {
                self.done = (self.done + WINDOW).min(self.total);
            }
        }
    }

    fn datapath(total: u64) -> Datapath {
        Datapath {
            done: 0,
            total,
            ios: 0,
            started_at: 0,
            limit: None,
            figures: JobFigures::default(),
        }
    }

    #[test]
    fn an_operators_rate_is_honoured_over_time() {
        let mut s = Scheduler::new();
        let mut dp = datapath(1 << 40);
        let rate = 10 * MIB;
        for tick in 0..=100u64 {
            let (d, _) = s.tick(tick * 100, &[dp.view()], |_| rate);
            dp.apply(&d[0]);
        }
        // 10 s at 10 MiB/s: within one window and one burst of the rate.
        let want = 100 * MIB;
        assert!(dp.done + WINDOW >= want, "{} < {want}", dp.done);
        assert!(
            dp.done <= want + rate * BURST_MS / 1000 + WINDOW,
            "{}",
            dp.done
        );
        // The measured rate says so.
        let (d, _) = s.tick(10_100, &[dp.view()], |_| rate);
        let measured = d[0].figures.rate;
        assert!(measured > rate / 2 && measured < rate * 2, "{measured}");
    }

    #[test]
    fn a_rebuild_passing_over_clean_regions_is_not_held_back_by_them() {
        let mut s = Scheduler::new();
        let mut dp = datapath(1 << 40);
        let rate = 10 * MIB;
        for tick in 0..10u64 {
            let (d, _) = s.tick(tick * 100, &[dp.view()], |_| rate);
            dp.apply(&d[0]);
        }
        // 64 MiB of clean regions passed over at once (nothing read or written).
        dp.done += 64 * MIB;
        let jumped = dp.done;
        for tick in 10..12u64 {
            let (d, _) = s.tick(tick * 100, &[dp.view()], |_| rate);
            dp.apply(&d[0]);
        }
        // Two ticks of the rate past the new position, not 6.4 s of waiting.
        assert!(dp.done > jumped, "{} <= {jumped}", dp.done);
        assert!(dp.done <= jumped + 2 * rate / 10 + WINDOW, "{}", dp.done);
    }

    #[test]
    fn a_rate_below_one_window_a_tick_is_still_honoured() {
        let mut s = Scheduler::new();
        let mut dp = datapath(1 << 40);
        let rate = 100 << 10; // 100 KiB/s: a 64 KiB window every 0.64 s
        for tick in 0..=200u64 {
            let (d, _) = s.tick(tick * 100, &[dp.view()], |_| rate);
            dp.apply(&d[0]);
        }
        let want = 20 * rate;
        assert!(dp.done <= want + 2 * WINDOW, "{} > {want}", dp.done);
        assert!(dp.done + 2 * WINDOW >= want, "{} < {want}", dp.done);
    }

    #[test]
    fn by_default_unlimited_while_idle_and_the_busy_rate_while_hosts_work() {
        let mut s = Scheduler::new();
        let mut dp = datapath(1 << 40);
        let (d, _) = s.tick(0, &[dp.view()], |_| 0);
        assert_eq!(d[0].limit, u64::MAX);
        dp.limit = Some(u64::MAX);
        dp.done = 5 * MIB;
        dp.ios = 10;
        let (d, _) = s.tick(100, &[dp.view()], |_| 0);
        assert_eq!(d[0].limit, dp.done + BUSY_RATE * 100 / 1000);
        dp.apply(&d[0]);
        // Hosts stop: unlimited again.
        let (d, _) = s.tick(200, &[dp.view()], |_| 0);
        assert_eq!(d[0].limit, u64::MAX);
    }

    #[test]
    fn checkpoints_are_asked_at_most_once_a_second_and_never_past_the_position() {
        let mut s = Scheduler::new();
        let mut dp = datapath(1 << 40);
        let mut asks = Vec::new();
        for tick in 0..=50u64 {
            dp.done += WINDOW;
            let (d, _) = s.tick(tick * 100, &[dp.view()], |_| 0);
            assert!(d[0].figures.checkpoint <= dp.done);
            if asks.last() != Some(&d[0].figures.checkpoint) && d[0].figures.checkpoint > 0 {
                asks.push(d[0].figures.checkpoint);
            }
        }
        assert_eq!(asks.len(), 5, "{asks:?}");
        // A sixteenth of the member asks at once.
        let mut s = Scheduler::new();
        let mut dp = datapath(16 * WINDOW);
        s.tick(0, &[dp.view()], |_| 0);
        dp.done = WINDOW;
        let (d, _) = s.tick(1, &[dp.view()], |_| 0);
        assert_eq!(d[0].figures.checkpoint, WINDOW);
    }

    #[test]
    fn a_successor_takes_over_grants_rates_and_checkpoints() {
        let mut s = Scheduler::new();
        let mut dp = datapath(1 << 40);
        for tick in 0..30u64 {
            let (d, _) = s.tick(tick * 100, &[dp.view()], |_| 10 * MIB);
            dp.apply(&d[0]);
        }
        let before = dp.figures;
        let limit = dp.limit.expect("granted");
        // Killed; the successor starts from the region.
        let mut s = Scheduler::new();
        let (d, notes) = s.tick(3000, &[dp.view()], |_| 10 * MIB);
        assert!(
            matches!(
                notes[0],
                Note::Seen {
                    inherited: true,
                    ..
                }
            ),
            "{notes:?}"
        );
        assert!(d[0].limit >= limit.min(dp.done), "{} < {limit}", d[0].limit);
        // Asked again at once: the successor does not know when its predecessor asked.
        assert_eq!(d[0].figures.checkpoint, dp.done);
        assert!(before.checkpoint <= dp.done);
        assert_eq!(d[0].figures.rate, before.rate);
    }

    #[test]
    fn a_new_datapath_job_drops_the_old_history_and_ended_jobs_are_noted() {
        let mut s = Scheduler::new();
        let mut dp = datapath(1 << 30);
        dp.done = 100 * MIB;
        s.tick(0, &[dp.view()], |_| 0);
        // The datapath restarted: resumed from its checkpoint.
        dp.started_at = 64 * MIB;
        dp.done = 64 * MIB;
        let (d, notes) = s.tick(100, &[dp.view()], |_| 0);
        assert!(matches!(notes[0], Note::Seen { from, .. } if from == 64 * MIB));
        // Nothing asked beyond where it resumed (its checkpoint).
        assert_eq!(d[0].figures.checkpoint, 64 * MIB);
        let (d, notes) = s.tick(200, &[], |_| 0);
        assert!(d.is_empty());
        assert!(matches!(notes[0], Note::Ended { .. }), "{notes:?}");
    }
}
