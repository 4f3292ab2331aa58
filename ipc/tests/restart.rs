//! Restartable endpoints, proven with real processes and SIGKILL.
//!
//! A producer process streams sequence-numbered descriptors with checksummed payloads in pool
//! buffers to a consumer process, which this test SIGKILLs at random points and replaces (fds
//! handed over by this process, as duplexd will). The ledger region outlives every process; at
//! the end it must show every sequence number applied, none corrupt, duplicates only where the
//! documented protocol allows them (consumed by a dead incarnation, then resubmitted), and every
//! pool chunk free again.
//!
//! `DUPLEX_RESTART_COUNT` overrides the number of descriptors (default 10 million),
//! `DUPLEX_TEST_SEED` the random seed (printed on every run).

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use duplex_ipc::desc::IoDesc;
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::pool::{Holder, Pool};
use duplex_ipc::ring::RingRegion;
use duplex_ipc::testkit::{spawn_with_fds, splitmix, Ledger};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const PEER: &str = env!("CARGO_BIN_EXE_duplex-ipc-peer");
/// Liveness guard: how long the stream may make no progress at all before the test reports a
/// stall (with diagnostics). Not a performance expectation.
const STALL_GUARD: Duration = Duration::from_secs(120);

struct Setup {
    r: RingRegion<IoDesc>,
    q: RingRegion<IoDesc>,
    bells: [Doorbell; 4],
    pool: Pool,
    ledger: Ledger,
}

impl Setup {
    fn spawn(&self, role: &str, generation: u64, mode: &str) -> Child {
        let fds = [
            self.r.region().fd(),
            self.bells[0].fd(),
            self.bells[1].fd(),
            self.q.region().fd(),
            self.bells[2].fd(),
            self.bells[3].fd(),
            self.pool.region().fd(),
            self.ledger.region().fd(),
        ];
        let names = [
            "r", "r_data", "r_space", "q", "q_data", "q_space", "pool", "ledger",
        ];
        let mut cmd = Command::new(PEER);
        cmd.arg(role)
            .arg(format!("generation={generation}"))
            .arg(format!("mode={mode}"))
            .stdin(Stdio::null());
        for (name, fd) in names.iter().zip(fds.iter()) {
            use std::os::fd::AsRawFd;
            cmd.arg(format!("{name}={}", fd.as_raw_fd()));
        }
        spawn_with_fds(&mut cmd, &fds).expect("spawn peer")
    }
}

impl Setup {
    fn diagnostics(&self) -> String {
        format!(
            "request ring head {} tail {}, completion ring head {} tail {}, free chunks {}/{}",
            self.r.head(),
            self.r.tail(),
            self.q.head(),
            self.q.tail(),
            self.pool.free_count(),
            self.pool.capacity()
        )
    }
}

struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn consumer_sigkilled_many_times_loses_nothing() {
    let count: u64 = std::env::var("DUPLEX_RESTART_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let seed: u64 = std::env::var("DUPLEX_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("restart test: {count} descriptors, DUPLEX_TEST_SEED={seed}");

    let setup = Setup {
        r: RingRegion::create("req", 256, 1).expect("ring"),
        q: RingRegion::create("cpl", 256, 2).expect("ring"),
        bells: std::array::from_fn(|_| Doorbell::new().expect("eventfd")),
        pool: Pool::create(
            "pool",
            256,
            4096,
            Holder {
                role: 0,
                incarnation: 0,
            },
        )
        .expect("pool"),
        ledger: Ledger::create(count).expect("ledger"),
    };
    let full = setup.pool.free_count();

    // Kill points: 25 random progress values, so the kill count does not depend on speed.
    let mut rng = seed;
    let mut points: Vec<u64> = (0..25)
        .map(|_| {
            rng = splitmix(rng);
            rng % count.max(1)
        })
        .collect();
    points.sort_unstable();

    let mut reaper = Reaper(vec![
        setup.spawn("producer", 1, "fresh"),
        setup.spawn("consumer", 1, "fresh"),
    ]);
    let mut generation = 1;
    let mut kills = 0;
    let start = Instant::now();
    let mut next_point = 0;
    let (mut last_progress, mut last_change) = (0u64, Instant::now());
    let producer_status = loop {
        let progress = setup.ledger.progress().load(Ordering::Relaxed);
        if progress != last_progress {
            (last_progress, last_change) = (progress, Instant::now());
        }
        assert!(
            last_change.elapsed() < STALL_GUARD,
            "stream stalled at {progress}/{count}: {} (seed {seed})",
            setup.diagnostics()
        );
        if let Some(status) = reaper.0[0].try_wait().expect("wait producer") {
            break status;
        }
        if let Some(status) = reaper.0[1].try_wait().expect("wait consumer") {
            // A clean exit means it consumed the end-of-stream marker: the producer is done.
            assert!(
                status.success(),
                "consumer generation {generation} failed: {status} (seed {seed})"
            );
            break reaper.0[0].wait().expect("wait producer");
        }
        if next_point < points.len() && progress >= points[next_point] {
            next_point += 1;
            // A random extra delay so kills land anywhere in the consumer's loop.
            rng = splitmix(rng);
            std::thread::sleep(Duration::from_micros(rng % 2000));
            let pid = Pid::from_raw(reaper.0[1].id() as i32);
            kill(pid, Signal::SIGKILL).expect("kill consumer");
            reaper.0[1].wait().expect("reap consumer");
            kills += 1;
            generation += 1;
            reaper.0[1] = setup.spawn("consumer", generation, "restart");
            continue;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(
        producer_status.success(),
        "producer failed: {producer_status} (seed {seed})"
    );
    // The consumer stops at the end-of-stream descriptor.
    last_change = Instant::now();
    let consumer_status = loop {
        if let Some(s) = reaper.0[1].try_wait().expect("wait") {
            break s;
        }
        assert!(
            last_change.elapsed() < STALL_GUARD,
            "consumer did not stop after the producer finished: {} (seed {seed})",
            setup.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        consumer_status.success(),
        "last consumer failed: {consumer_status}"
    );

    let ledger = &setup.ledger;
    let (mut gaps, mut dups_allowed, mut dups_unexplained, mut resubmits) =
        (0u64, 0u64, 0u64, 0u64);
    for seq in 0..count {
        let applied = u64::from(ledger.applied(seq).load(Ordering::Relaxed));
        let resubmitted = u64::from(ledger.resubmitted(seq).load(Ordering::Relaxed));
        resubmits += resubmitted;
        if applied == 0 {
            gaps += 1;
        } else if applied > 1 + resubmitted {
            dups_unexplained += 1;
        } else if applied > 1 {
            dups_allowed += applied - 1;
        }
    }
    let restarts_seen = ledger.restarts_seen().load(Ordering::Relaxed);
    let corrupt = ledger.corrupt().load(Ordering::Relaxed);
    let free = setup.pool.free_count();
    println!(
        "kills {kills}, restarts seen by producer {restarts_seen}, resubmitted {resubmits}, \
         re-applied {dups_allowed}, gaps {gaps}, unexplained duplicates {dups_unexplained}, \
         corrupt {corrupt}, free chunks {free}/{full}, {:.1?}",
        start.elapsed()
    );
    assert!(kills >= 20, "only {kills} kills");
    assert_eq!(gaps, 0, "descriptors never applied (seed {seed})");
    assert_eq!(
        dups_unexplained, 0,
        "duplicates the protocol does not allow (seed {seed})"
    );
    assert_eq!(corrupt, 0, "corrupt payloads (seed {seed})");
    // Each restart may resubmit at most what a dead consumer could have consumed: the request
    // ring plus what it could have parked in the completion ring.
    assert!(
        resubmits <= (restarts_seen.max(1)) * (setup.r.capacity() + setup.q.capacity()),
        "{resubmits} resubmissions for {restarts_seen} restarts"
    );
    assert_eq!(
        free, full,
        "pool chunks leaked across restarts (seed {seed})"
    );
}

/// The producer side of the protocol, step by step in one process: a producer "dies" (its
/// endpoint is dropped without cleanup) holding a chunk, having lent one it never published, and
/// with a completion addressed to it still in the completion ring. Its successor reclaims exactly
/// what the dead one was responsible for, continues at the shared index, and recognises the stale
/// completion by its epoch; the consumer learns where the new producer took over.
#[test]
fn producer_restart_reclaims_and_discards_stale_completions() {
    use duplex_ipc::desc::{OP_WRITE, STATUS_ABORTED_BY_RESTART};
    use duplex_ipc::pool::{BufHandle, ChunkState, ReclaimPlan, ReclaimReport, NIL};
    use duplex_ipc::ring::{Consumer, Producer, StartMode};

    let r = RingRegion::<IoDesc>::create("req", 8, 1).expect("ring");
    let q = RingRegion::<IoDesc>::create("cpl", 8, 2).expect("ring");
    let bells: [Doorbell; 4] = std::array::from_fn(|_| Doorbell::new().expect("eventfd"));
    let dup = |i: usize| bells[i].try_clone().expect("dup");
    let pool = Pool::create(
        "pool",
        64,
        16,
        Holder {
            role: 0,
            incarnation: 0,
        },
    )
    .expect("pool");
    let view = |role, incarnation| {
        Pool::attach(
            pool.region().try_clone_fd().expect("dup"),
            Holder { role, incarnation },
        )
        .expect("attach")
    };
    let full = pool.free_count();

    // Generation 1 of the producer (role 1) and the consumer (role 2).
    let p_pool = view(1, 1);
    let c_pool = view(2, 1);
    let mut p = Producer::attach(
        r.try_clone().expect("r"),
        dup(0),
        dup(1),
        1,
        StartMode::Fresh,
    )
    .expect("p");
    let p_in = Consumer::attach(
        q.try_clone().expect("q"),
        dup(2),
        dup(3),
        1,
        StartMode::Fresh,
    )
    .expect("pq");
    let mut c = Consumer::attach(
        r.try_clone().expect("r"),
        dup(0),
        dup(1),
        1,
        StartMode::Fresh,
    )
    .expect("c");
    let mut c_out = Producer::attach(
        q.try_clone().expect("q"),
        dup(2),
        dup(3),
        1,
        StartMode::Fresh,
    )
    .expect("cq");

    // Published request 0 with chunk a; chunk b lent at index 1 but never published; chunk h held.
    let a = p_pool.alloc_chain(10).expect("a");
    p_pool.lend_chain(a, r.ring_id(), 0).expect("lend a");
    let req = IoDesc {
        tag: 7,
        epoch: 1,
        buf: a.0,
        buf_len: 10,
        opcode: OP_WRITE,
        ..IoDesc::default()
    };
    assert_eq!(p.try_push(&[req]).expect("push"), 1);
    let b = p_pool.alloc_chain(10).expect("b");
    p_pool.lend_chain(b, r.ring_id(), 1).expect("lend b");
    let h = p_pool.alloc().expect("h");

    // The consumer takes request 0 and completes it, handing chunk a back through the completion ring.
    let mut got = Vec::new();
    c.try_pop(&mut got, 8).expect("pop");
    c_pool.take_chain(a, r.ring_id(), 0).expect("take a");
    c_pool
        .lend_chain(a, q.ring_id(), c_out.next_index())
        .expect("lend back");
    let cpl = IoDesc {
        tag: 7,
        epoch: got[0].epoch,
        buf: a.0,
        ..IoDesc::default()
    };
    assert_eq!(c_out.try_push(&[cpl]).expect("complete"), 1);

    // The producer dies.
    drop((p, p_in, p_pool));

    // Generation 2 reclaims, then attaches (produced ring first).
    let p2_pool = view(1, 2);
    let report = p2_pool.reclaim(&ReclaimPlan {
        consumes: &[(q.ring_id(), q.head())],
        produces: &[(r.ring_id(), r.tail())],
    });
    assert_eq!(
        report,
        ReclaimReport {
            held: 1,
            consumed: 0,
            unpublished: 1
        }
    );
    assert_eq!(p2_pool.state(b).expect("b"), ChunkState::Free);
    assert_eq!(p2_pool.state(BufHandle(h.0)).expect("h"), ChunkState::Free);
    assert_eq!(
        p2_pool.state(a).expect("a"),
        ChunkState::Lent {
            ring: q.ring_id(),
            index: 0
        },
        "a is in flight"
    );
    let mut p2 = Producer::attach(
        r.try_clone().expect("r"),
        dup(0),
        dup(1),
        2,
        StartMode::Restart,
    )
    .expect("p2");
    let mut p2_in = Consumer::attach(
        q.try_clone().expect("q"),
        dup(2),
        dup(3),
        2,
        StartMode::Restart,
    )
    .expect("p2q");
    assert_eq!(
        p2.next_index(),
        1,
        "continues after the last published request"
    );
    assert!(
        Producer::attach(
            r.try_clone().expect("r"),
            dup(0),
            dup(1),
            3,
            StartMode::Fresh
        )
        .is_err(),
        "a fresh start on a used ring is refused"
    );

    // The stale completion arrives: epoch 1 is not ours; release its buffer and drop it.
    let mut cpls = Vec::new();
    let first = p2_in.next_index();
    p2_in.try_pop(&mut cpls, 8).expect("pop cpl");
    assert_eq!(cpls.len(), 1);
    assert_ne!(
        cpls[0].epoch, 2,
        "completion addressed to the dead incarnation"
    );
    p2_pool
        .take_chain(BufHandle(cpls[0].buf), q.ring_id(), first)
        .expect("take stale");
    p2_pool
        .free_chain(BufHandle(cpls[0].buf))
        .expect("free stale");

    // The consumer learns where the new producer took over.
    let restart = c.producer_restart().expect("restart seen");
    assert_eq!((restart.generation, restart.published_before), (2, 1));
    assert_eq!(c.producer_restart(), None, "reported once");

    // The new producer works: a request flows and completes with its epoch.
    let req = IoDesc {
        tag: 8,
        epoch: 2,
        buf: NIL,
        opcode: OP_WRITE,
        ..IoDesc::default()
    };
    assert_eq!(p2.try_push(&[req]).expect("push"), 1);
    got.clear();
    c.try_pop(&mut got, 8).expect("pop");
    assert_eq!(got[0].tag, 8);
    let cpl = IoDesc {
        tag: 8,
        epoch: 2,
        buf: NIL,
        status: 0,
        ..IoDesc::default()
    };
    c_out.try_push(&[cpl]).expect("complete");
    cpls.clear();
    p2_in.try_pop(&mut cpls, 8).expect("pop");
    assert_eq!((cpls[0].tag, cpls[0].epoch), (8, 2));
    assert_ne!(cpls[0].status, STATUS_ABORTED_BY_RESTART);
    assert_eq!(pool.free_count(), full, "nothing leaked");
}
