//! Property tests of the shared-memory ring: any interleaving of batch sizes on both sides
//! delivers every descriptor exactly once, in order. The index protocol itself is model-checked
//! with loom (`ring::core::loom_tests`).

use std::time::Duration;

use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::ring::{Consumer, Producer, RingError, RingRegion, StartMode, WaitPolicy};
use proptest::prelude::*;

fn endpoints(capacity: u64) -> (Producer<u64>, Consumer<u64>) {
    let ring = RingRegion::<u64>::create("prop", capacity, 9).expect("ring");
    let view = ring.try_clone().expect("clone");
    let data = Doorbell::new().expect("eventfd");
    let space = Doorbell::new().expect("eventfd");
    let p = Producer::attach(
        ring,
        data.try_clone().expect("dup"),
        space.try_clone().expect("dup"),
        1,
        StartMode::Fresh,
    )
    .expect("producer");
    let c = Consumer::attach(view, data, space, 1, StartMode::Fresh).expect("consumer");
    (p, c)
}

proptest! {
    /// One thread, operations interleaved as the strategy chooses.
    #[test]
    fn interleaved_batches_are_fifo_exactly_once(
        cap_log in 0u32..7,
        ops in proptest::collection::vec((any::<bool>(), 1usize..70), 1..200),
    ) {
        let (mut p, mut c) = endpoints(1 << cap_log);
        let (mut next, mut expect) = (0u64, 0u64);
        let mut out = Vec::new();
        for (push, n) in ops {
            if push {
                let items: Vec<u64> = (next..next + n as u64).collect();
                let pushed = p.try_push(&items).expect("push");
                prop_assert!(pushed <= n);
                next += pushed as u64;
            } else {
                out.clear();
                c.try_pop(&mut out, n).expect("pop");
                for v in &out {
                    prop_assert_eq!(*v, expect);
                    expect += 1;
                }
            }
            prop_assert!(next - expect <= 1 << cap_log);
        }
        // Drain: everything pushed comes out.
        loop {
            out.clear();
            if c.try_pop(&mut out, 1000).expect("pop") == 0 { break; }
            for v in &out {
                prop_assert_eq!(*v, expect);
                expect += 1;
            }
        }
        prop_assert_eq!(expect, next);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Two threads, random batch sizes and wait policies on both sides.
    #[test]
    fn threaded_batches_are_fifo_exactly_once(
        cap_log in 0u32..6,
        pb in 1usize..40,
        cb in 1usize..40,
        policy in 0u8..3,
    ) {
        const N: u64 = 20_000;
        let (mut p, mut c) = endpoints(1 << cap_log);
        let policy = match policy {
            0 => WaitPolicy::Doorbell,
            1 => WaitPolicy::Poll,
            _ => WaitPolicy::Adaptive(Duration::from_micros(5)),
        };
        p.set_policy(policy);
        c.set_policy(policy);
        let producer = std::thread::spawn(move || -> Result<(), RingError> {
            let mut next = 0u64;
            while next < N {
                let items: Vec<u64> = (next..(next + pb as u64).min(N)).collect();
                next += p.push_wait(&items, None)? as u64;
            }
            Ok(())
        });
        let mut out = Vec::new();
        let mut expect = 0u64;
        while expect < N {
            out.clear();
            c.pop_wait(&mut out, cb, Some(Duration::from_secs(60))).expect("pop");
            prop_assert!(!out.is_empty(), "consumer starved: a lost wakeup");
            for v in &out {
                prop_assert_eq!(*v, expect);
                expect += 1;
            }
        }
        producer.join().expect("join").expect("producer");
    }
}

#[test]
fn a_corrupt_peer_index_is_an_error_not_a_crash() {
    let (mut p, mut c) = endpoints(8);
    p.try_push(&[1, 2, 3]).expect("push");
    // A broken producer publishes a tail far beyond the ring.
    let region = p.ring().region();
    region
        .atomic_u64(128)
        .store(1_000_000, std::sync::atomic::Ordering::Release);
    let mut out = Vec::new();
    let e = c.try_pop(&mut out, 8).expect_err("must fail");
    assert!(e.to_string().contains("corrupt"), "{e}");
    assert!(out.is_empty());
}

proptest! {
    /// Peeking shows the same descriptors until they are committed; committing part of a peek
    /// consumes exactly that part; over-committing is refused; the producer can always read what
    /// it published last.
    #[test]
    fn peek_then_commit_consumes_exactly_what_was_committed(
        ops in proptest::collection::vec((0u8..3, 1usize..40), 1..200),
    ) {
        let (mut p, mut c) = endpoints(32);
        let (mut next, mut expect) = (0u64, 0u64);
        let mut seen = Vec::new();
        prop_assert_eq!(p.last_published(), None);
        for (op, n) in ops {
            match op {
                0 => {
                    let items: Vec<u64> = (next..next + n as u64).collect();
                    next += p.try_push(&items).expect("push") as u64;
                    if next > 0 {
                        prop_assert_eq!(p.last_published(), Some(next - 1));
                    }
                }
                1 => {
                    seen.clear();
                    let got = c.try_peek(&mut seen, n).expect("peek");
                    let again = {
                        let mut v = Vec::new();
                        c.try_peek(&mut v, n).expect("peek");
                        v
                    };
                    prop_assert_eq!(&seen, &again);
                    for (i, v) in seen.iter().enumerate() {
                        prop_assert_eq!(*v, expect + i as u64);
                    }
                    let take = (got / 2) as u64;
                    c.commit(take).expect("commit");
                    expect += take;
                }
                _ => {
                    let available = next - expect;
                    prop_assert!(c.commit(available + 1).is_err());
                }
            }
        }
    }
}
