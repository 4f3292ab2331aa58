//! The raid service process: one per node with a metadata service, sandboxed (policy `raid`),
//! restartable.
//!
//! Resources: the RAID jobs region (`raid-jobs`, shared with the datapath and the metadata
//! service; see `duplex_ipc::raid`). Every [`TICK`] it reads the jobs the datapath reports,
//! runs the [`Scheduler`], and writes each job's grant (how far it may go), figures (rate,
//! ETA) and checkpoint ask back; it beats its health region on every tick, so a service that
//! stops deciding is killed by duplexd's watchdog and restarted (its successor reads its
//! state back from the region).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use duplex_ipc::lifecycle;
use duplex_ipc::raid::{JobKind, RaidRegion, RAID_RESOURCE};

use crate::sched::{Note, Scheduler};

/// The service's name (its `[[service]]` and sandbox policy).
pub const SERVICE: &str = "raid";
/// How often the service decides.
pub const TICK: Duration = Duration::from_millis(100);
/// How often a running job's progress is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Runs the service; `enter` puts the seccomp policy on once every resource is taken.
pub fn run(enter: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut started = lifecycle::start(SERVICE, Duration::from_secs(10))?;
    let health = started.health()?;
    let region = started
        .take(RAID_RESOURCE)
        .ok_or_else(|| anyhow!("duplexd did not hand over `{RAID_RESOURCE}`"))?;
    let region = RaidRegion::attach(region.fd).context("the RAID jobs region")?;
    enter()?;
    let started = Arc::new(started);
    started.ready()?;
    let stop = lifecycle::spawn_stop_flag(Arc::clone(&started))?;
    tracing::info!(generation = started.generation, "raid service ready");
    let clock = Instant::now();
    let mut sched = Scheduler::new();
    let mut logged = Instant::now();
    while !stop.load(Ordering::Acquire) {
        health.beat();
        let now_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        let views = region.jobs();
        let (decisions, notes) = sched.tick(now_ms, &views, |d| region.rate(d));
        for d in &decisions {
            region.grant(d.entry, d.key, d.limit);
            region.set_figures(d.entry, d.figures);
        }
        region.tick();
        for n in notes {
            match n {
                Note::Seen {
                    key,
                    from,
                    done,
                    total,
                    inherited,
                } => tracing::info!(
                    device = key.device,
                    job = kind(key.kind),
                    slot = key.slot,
                    from,
                    done,
                    total,
                    inherited,
                    "job scheduled"
                ),
                Note::Ended { key, done, total } => tracing::info!(
                    device = key.device,
                    job = kind(key.kind),
                    slot = key.slot,
                    done,
                    total,
                    "job ended"
                ),
            }
        }
        if logged.elapsed() >= LOG_EVERY && !decisions.is_empty() {
            logged = Instant::now();
            for (d, v) in decisions.iter().zip(&views) {
                tracing::info!(
                    device = d.key.device,
                    job = kind(d.key.kind),
                    done = v.report.done,
                    total = v.report.total,
                    rate = d.figures.rate,
                    eta_ms = d.figures.eta_ms,
                    checkpoint = v.committed,
                    "job progress"
                );
            }
        }
        std::thread::sleep(TICK);
    }
    tracing::info!("raid service stopping");
    Ok(())
}

fn kind(k: JobKind) -> &'static str {
    match k {
        JobKind::Rebuild => "rebuild",
        JobKind::Scrub => "scrub",
    }
}
