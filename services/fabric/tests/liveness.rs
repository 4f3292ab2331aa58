//! The fabric's I/O threads prove themselves to the heartbeat: a real worker thread ticks its
//! counter from its runtime, and the watch the heartbeat consults stays open for it and closes
//! for a thread that does not tick (a counted thread that never runs). A real worker stopped
//! inside a whole fabric is `tests/tests/fabric_threads.rs`'s
//! `a_stuck_io_thread_stops_the_fabric_heartbeat_and_the_fabric_is_restarted`. Waits on counts
//! and on the watch's verdict, never on a clock.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_fabric::server::{Liveness, LivenessWatch, Worker};
use duplex_fabric::target::Target;

/// Polls `cond` until it holds; gives up (failing the test) after a minute of polling, far
/// beyond anything the condition needs.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..60_000 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("gave up waiting for {what}");
}

#[test]
fn worker_threads_tick_and_the_watch_closes_on_the_one_that_does_not() {
    let target = Arc::new(Target::new(common::topology(), Vec::new()));
    // Two workers are counted; only thread 1 is started, so thread 2 never ticks.
    let live = Liveness::new(2);
    let tick = Duration::from_millis(1);
    let _worker = Worker::start(1, target, Arc::clone(&live), tick, || Ok(None))
        .expect("worker thread starts");
    wait_for("thread 1 to tick five times", || live.count(1) >= 5);
    assert_eq!(live.count(2), 0);

    let limit = Duration::from_millis(50);
    let mut watch = LivenessWatch::new(&live, limit, Instant::now());
    // The watch closes, on thread 2 alone, while thread 1 keeps running.
    wait_for(
        "the watch to find thread 2 stalled and thread 1 running",
        || !watch.all_alive(&live, Instant::now()) && watch.is_stalled(2) && !watch.is_stalled(1),
    );
    let before = live.count(1);
    wait_for("thread 1 to keep ticking", || live.count(1) > before + 5);
    // Thread 2 comes back: the watch opens again.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let (live, stop) = (Arc::clone(&live), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                live.tick(2);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    wait_for("the watch to open again", || {
        watch.all_alive(&live, Instant::now()) && !watch.is_stalled(2)
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ticker.join().expect("ticker");
}
