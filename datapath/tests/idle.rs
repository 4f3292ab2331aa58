//! An idle datapath sleeps: after its short spin it waits in the io_uring, which polls the rings'
//! doorbells. Alone in its test binary. The test asserts a behaviour, not a speed: sampled while
//! idle, no thread but the sampler is runnable (a polling engine would be runnable in nearly
//! every sample). The CPU it used meanwhile is printed as a figure
//! (`/proc/self/task/*/schedstat`, nanoseconds), never asserted.
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

/// Threads of this process other than the caller that are running or runnable now.
fn runnable_others() -> usize {
    let me = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| Some(t.file_name().to_string_lossy().into_owned()) != me)
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        // The state follows the parenthesised command name.
        .filter(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('R'))
        })
        .count()
}

#[test]
fn an_idle_engine_sleeps() {
    let mut node = Node::start(Setup::default());
    // Some work first, so the engine has been busy and gone idle again.
    for i in 0..100 {
        let d = node.f().write_sync(1, i, &pattern(i, 512), 0);
        assert_eq!(d.desc.status, STATUS_SUCCESS);
    }
    std::thread::sleep(Duration::from_millis(100));
    let before = cpu_ns();
    let samples = 40;
    let mut busy = 0;
    for _ in 0..samples {
        std::thread::sleep(Duration::from_millis(50));
        if runnable_others() > 0 {
            busy += 1;
        }
    }
    let used = cpu_ns() - before;
    eprintln!(
        "FIGURE idle datapath CPU: {} us over {samples} samples of 50 ms",
        used / 1000
    );
    assert!(
        busy < samples / 2,
        "a thread was runnable in {busy} of {samples} idle samples: the engine polls instead of sleeping"
    );
    // Still serving.
    assert_eq!(node.f().read_sync(1, 5, 1).data.unwrap(), pattern(5, 512));
    node.stop();
}
