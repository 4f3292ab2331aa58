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

/// A rebuild resumes from its checkpoint after a takeover: a RAID-5 member is pulled under the
/// multipath host's verifying workload and replaced by a spare on the owner, whose raid
/// service rebuilds it slowly (`--rate`) while its metadata service commits checkpoints; the
/// owner is killed mid-rebuild. The peer fences it, imports the pool with the member still
/// rebuilding, and its datapath resumes the rebuild from the checkpoint on the drives, not
/// from zero; it finishes there, a scrub finds the parity consistent, the host sees no error.
#[test]
fn raid5_rebuild_resumes_from_its_checkpoint_after_a_takeover() {
    rebuild_resumes_after_a_takeover(3, "5");
}

/// The same for a RAID-1 pool: the mirror rebuild (copied from the other member) resumes on
/// the peer from the checkpoint; the scrub finds the copies equal.
#[test]
fn raid1_rebuild_resumes_from_its_checkpoint_after_a_takeover() {
    rebuild_resumes_after_a_takeover(2, "1");
}

fn rebuild_resumes_after_a_takeover(n: usize, raid: &str) {
    use duplex_tests::pool::{ctl_json, ctl_ok, wait_scrub};
    let spare = format!("d{n}");
    let mut p = Pair::with_pool_and_spares(BEAT_MS, DEAD_MS, n, raid, 1);
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
        "37",
        "--io-timeout-ms",
        "3000",
    ];
    let mut bench = p.multipath(&workload, &stop);
    p.wait_more_writes(1, 200);
    p.sim_ctl(1, &["pull"]);
    p.node(0).log.wait_for(&["member failure recorded on disk"]);
    let out = ctl_ok(
        p.node(0),
        &["pool", "replace", "tank", "d1", &spare, "--rate", "4M"],
    );
    assert!(out.contains("rebuilding"), "{out}");
    // Wait for checkpoints on the drives, with the rebuild still far from done.
    let deadline = std::time::Instant::now() + duplex_tests::PATIENCE;
    let (done, checkpoint, member) = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "hang: no rebuild checkpoint committed"
        );
        let pool = ctl_json(p.node(0), &["pool", "show", "tank"])["pool"].clone();
        let member = pool["member_bytes"].as_u64().unwrap();
        let done = pool["rebuild"][1].as_u64().expect("rebuilding");
        let checkpoint = pool["jobs"]["rebuild_checkpoint"].as_u64().unwrap_or(0);
        if checkpoint >= 8 << 20 {
            assert!(done < member, "the rebuild outran the test: {pool}");
            break (done, checkpoint, member);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    p.node(0).kill_all();
    wait_count(&mut p.node(1).log, &["pool taken over", "tank"], 1);
    let line = p
        .node(1)
        .log
        .wait_for(&["the rebuild resumes from its checkpoint"]);
    let from = field(&line, "from").expect("from=");
    assert!(
        from >= checkpoint && from <= done + (1 << 20),
        "resumed at {from}: checkpoint {checkpoint}, position at the kill at least {done}"
    );
    p.node(1)
        .log
        .wait_for(&["rebuild complete: member active on disk"]);
    let out = ctl_ok(p.node(1), &["pool", "scrub", "tank"]);
    assert!(out.contains("scrub of pool tank started"), "{out}");
    let scrub = wait_scrub(p.node(1), "tank");
    assert_eq!(scrub["mismatches"], 0, "{scrub}");
    p.wait_more_writes(2, 200);
    let r = finish_multipath(&mut bench, &stop);
    eprintln!(
        "raid {raid}: rebuild of {member} bytes: owner killed at {done}+ with checkpoint {checkpoint}; the peer resumed at {from} (redone at most {} bytes, {} saved); host: {} path switches, {} I/O errors, {} verify errors",
        done.saturating_sub(from),
        from,
        r["path_switches"],
        r["io_errors"],
        r["verify_errors"]
    );
}
