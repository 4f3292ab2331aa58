//! Parity pools across the two controllers (needs root: network namespaces). A RAID-5 pool
//! over three dual-ported simulated drives serves a multipath host's verifying workload of
//! single-block writes (every one a partial-stripe write); the owner is killed (every process)
//! in the middle of them, again and again, alternating nodes. Each time the peer fences it,
//! imports the pool and replays the dead owner's stripe journal before it serves (its log
//! says how many entries). At the end a member is pulled: every block the host wrote is read
//! back through the parity and checked, so a stripe left inconsistent by any kill would show.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use duplex_tests::pair::{finish_multipath, wait_count, Pair};

const BEAT_MS: u64 = 50;
const DEAD_MS: u64 = 600;

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The number after `key=` in a log line.
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn raid5_owner_killed_during_partial_stripe_writes_the_peer_replays_the_journal() {
    let kills = count("DUPLEX_JOURNAL_KILLS", 10);
    let mut p = Pair::with_pool(BEAT_MS, DEAD_MS, 3, "5");
    let stop = p.dir.path().join("stop");
    let workload = [
        "--workload",
        "write",
        "--verify",
        "--qd",
        "8",
        "--span-blocks",
        "4096",
        "--seed",
        "31",
        "--io-timeout-ms",
        "3000",
    ];
    let mut bench = p.multipath(&workload, &stop);
    let mut owner = 0usize;
    let mut takeovers = [0usize; 2];
    let mut replayed = Vec::new();
    for _ in 0..kills {
        let survivor = 1 - owner;
        p.wait_more_writes(owner as u64 + 1, 200);
        p.node(owner).kill_all();
        takeovers[survivor] += 1;
        wait_count(
            &mut p.node(survivor).log,
            &["pool taken over", "tank"],
            takeovers[survivor],
        );
        // The survivor replayed the journal the dead owner was writing.
        wait_count(
            &mut p.node(survivor).log,
            &["stripe journal replayed"],
            takeovers[survivor],
        );
        let n = p
            .node(survivor)
            .log
            .matching(&["stripe journal replayed"])
            .last()
            .and_then(|l| field(l, "replayed"))
            .expect("the survivor's datapath says what it replayed");
        replayed.push(n);
        p.wait_more_writes(survivor as u64 + 1, 200);
        p.node(owner).relaunch();
        takeovers[owner] = 0;
        p.node(owner)
            .log
            .wait_for(&["pool owned by the peer: exported inaccessible here", "tank"]);
        wait_count(
            &mut p.node(survivor).log,
            &["the fenced peer rejoined with a new boot"],
            takeovers[survivor],
        );
        p.wait_status(owner, |v| {
            v["peer"]["state"] == "alive" && v["disk"]["peer_counter"].as_u64().unwrap_or(0) > 0
        });
        p.wait_status(survivor, |v| v["peer"]["state"] == "alive");
        owner = survivor;
    }
    // Each kill cut writes that were logged: the peers replayed entries (a kill right after
    // the owner started a new generation may find none, so the sum counts).
    assert!(
        replayed.iter().sum::<u64>() > 0,
        "nothing replayed in {kills} takeovers: {replayed:?}"
    );
    // A member lost: from now on its columns are rebuilt from the parity on every read,
    // including the final read-back of every block the host wrote.
    p.sim_ctl(2, &["pull"]);
    p.node(owner)
        .log
        .wait_for(&["RAID member failed: going on degraded"]);
    p.wait_more_writes(owner as u64 + 1, 200);
    let r = finish_multipath(&mut bench, &stop);
    eprintln!(
        "raid 5 across {kills} owner kills: journal entries replayed per takeover {replayed:?}; host: {} path switches, {} I/O errors, {} verify errors over {} blocks (read back degraded)",
        r["path_switches"], r["io_errors"], r["verify_errors"], r["blocks_checked"]
    );
}
