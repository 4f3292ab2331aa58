//! An idle datapath uses (almost) no CPU: after its short spin it sleeps in the io_uring, which
//! polls the rings' doorbells. Alone in its test binary, so the process's CPU time is the
//! engine's (summed over every thread from `/proc/self/task/*/schedstat`, in nanoseconds).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use duplex_ipc::desc::STATUS_SUCCESS;

/// CPU nanoseconds used so far by every thread of this process.
fn cpu_ns() -> u64 {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn an_idle_engine_uses_almost_no_cpu() {
    let mut node = Node::start(Setup::default());
    // Some work first, so the engine has been busy and gone idle again.
    for i in 0..100 {
        let d = node.f().write_sync(1, i, &pattern(i, 512), 0);
        assert_eq!(d.desc.status, STATUS_SUCCESS);
    }
    std::thread::sleep(Duration::from_millis(100));
    let before = cpu_ns();
    let window = Duration::from_secs(2);
    std::thread::sleep(window);
    let used = cpu_ns() - before;
    // Busy polling would be ~2 s; sleeping with a 250 ms heartbeat tick is well under a
    // millisecond per second (measured: ~0.2 ms/s).
    assert!(
        used < 10_000_000,
        "idle engine used {} ms of CPU in {window:?}",
        used / 1_000_000
    );
    eprintln!("idle CPU: {} µs in {window:?}", used / 1000);
    // Still serving.
    assert_eq!(node.f().read_sync(1, 5, 1).data.unwrap(), pattern(5, 512));
    node.stop();
}
