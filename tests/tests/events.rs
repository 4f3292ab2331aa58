//! The node's events (issue 17), as whole processes: a two-node array whose owner is killed;
//! the peer takes the pool over, then loses a member (a drive pulled under a host's writes)
//! and rebuilds onto a free drive. `duplexctl events --json` on the peer lists the takeover,
//! the failed member, the replacement and the finished rebuild in that order; the same list
//! after mgmt is crashed and restarted, and after duplexd itself is stopped and started again
//! (the journal is in the state directory).
//!
//! The events the other node saw are its own: each node keeps its journal. `duplexctl status`
//! on the peer shows the pool served there and the dead peer as an alert.

use duplex_tests::pair::{finish_multipath, Pair};
use duplex_tests::pool::{ctl_json, ctl_ok};

/// The events `duplexctl events --json` lists on `node` of the pair.
fn events(p: &Pair, node: usize) -> Vec<serde_json::Value> {
    ctl_json(&p.nodes[node], &["events"])["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The position of the first event of `kind` (whose message contains `says`) after `from`.
fn find(list: &[serde_json::Value], from: usize, kind: &str, says: &str) -> usize {
    list.iter()
        .enumerate()
        .skip(from)
        .find(|(_, e)| e["kind"] == kind && e["message"].as_str().is_some_and(|m| m.contains(says)))
        .map(|(i, _)| i)
        .unwrap_or_else(|| {
            panic!(
                "no {kind} event saying {says:?} after #{from}: {}",
                serde_json::to_string_pretty(list).unwrap_or_default()
            )
        })
}

#[test]
fn a_takeover_a_pulled_drive_and_a_rebuild_are_listed_in_order_across_restarts() {
    let mut p = Pair::with_pool_and_spares(50, 600, 2, "1", 1);
    let stop = p.dir.path().join("stop");
    let mut bench = p.multipath(
        &[
            "--workload",
            "write",
            "--verify",
            "--qd",
            "8",
            "--span-blocks",
            "2048",
            "--seed",
            "41",
            "--io-timeout-ms",
            "5000",
        ],
        &stop,
    );
    p.wait_more_writes(1, 200);
    // The owner dies whole; the peer takes the pool over.
    p.node(0).kill_all();
    p.node(1).log.wait_for(&["pool taken over", "tank"]);
    p.wait_more_writes(2, 200);
    // A member is pulled under the host's writes, then replaced and rebuilt.
    p.sim_ctl(1, &["pull"]);
    p.node(1).log.wait_for(&["member failure recorded on disk"]);
    let out = ctl_ok(p.node(1), &["pool", "replace", "tank", "d1", "d2"]);
    assert!(out.contains("rebuilding"), "{out}");
    p.node(1)
        .log
        .wait_for(&["rebuild complete: member active on disk"]);
    p.wait_more_writes(2, 100);
    let r = finish_multipath(&mut bench, &stop);
    assert_eq!(r["verify_errors"], 0, "{r}");

    let list = events(&p, 1);
    let started = find(&list, 0, "node-started", "");
    let takeover = find(&list, started, "pool-taken-over", "pool tank");
    let failed = find(&list, takeover, "member-failed", "pool tank");
    let replaced = find(&list, failed, "config-changed", "tank");
    find(&list, replaced, "rebuild-finished", "pool tank");
    // Numbered in order, each once, and attributed to the service that saw it.
    let seqs: Vec<u64> = list
        .iter()
        .map(|e| e["seq"].as_u64().unwrap_or(0))
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert_eq!(list[takeover]["source"], "metadata");
    assert!(list
        .iter()
        .any(|e| e["source"] == "cluster" && e["kind"] == "peer-dead"));
    assert!(list
        .iter()
        .any(|e| e["source"] == "fabric" && e["kind"] == "ana-changed"));
    assert!(list.iter().all(|e| e["node"] == list[0]["node"]));

    // The one screen an operator reads first says the same, as it stands now.
    let st = ctl_json(&p.nodes[1], &["status"]);
    assert_eq!(st["pools"][0]["name"], "tank", "{st}");
    assert_eq!(st["pools"][0]["served_here"], true, "{st}");
    assert_eq!(st["pools"][0]["ana"], "optimized", "{st}");
    assert_eq!(st["cluster"]["peer_state"], "dead", "{st}");
    assert!(
        st["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "peer node 1 is dead")),
        "{st}"
    );
    assert!(
        st["recent_errors"].as_u64() >= Some(1),
        "the member failure: {st}"
    );
    let text = ctl_ok(p.node(1), &["status"]);
    assert!(text.contains("served here (ANA optimized)"), "{text}");

    // mgmt crashes and comes back: the same events (duplexd keeps them).
    let (code, out, err) = p.nodes[1].ctl(&["service", "crash", "mgmt", "--mode", "kill"]);
    assert!(
        code == 0 || out.contains("went down") || err.contains("went down"),
        "{out}{err}"
    );
    p.node(1).wait_running("mgmt", 1);
    let again = events(&p, 1);
    assert!(again.len() >= list.len());
    assert_eq!(&again[..list.len()], &list[..], "after an mgmt restart");
    assert!(again[list.len()..]
        .iter()
        .any(|e| e["kind"] == "service-exited"
            && e["message"].as_str().is_some_and(|m| m.contains("mgmt"))));

    // duplexd itself stops and starts again: the journal is read back from the state
    // directory; numbering goes on.
    // (The pulled drive goes back in first: a node starts only with its drives present.)
    p.sim_ctl(1, &["insert"]);
    let before = events(&p, 1);
    assert_eq!(p.node(1).stop(), Some(0));
    p.node(1).relaunch();
    p.node(1).log.wait_for(&["metadata service ready"]);
    let after = events(&p, 1);
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "after a duplexd restart"
    );
    let restarted = find(&after, before.len(), "node-started", "");
    let last = before.last().and_then(|e| e["seq"].as_u64()).unwrap_or(0);
    assert!(
        after[restarted]["seq"].as_u64() > Some(last),
        "numbering goes on"
    );
    let seqs: Vec<u64> = after
        .iter()
        .map(|e| e["seq"].as_u64().unwrap_or(0))
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // The text form: one line per event.
    let text = ctl_ok(p.node(1), &["events", "--after", &before.len().to_string()]);
    assert!(text.lines().any(|l| l.contains("node-started")), "{text}");
    assert!(
        !text.contains("pool-taken-over"),
        "--after skips older ones: {text}"
    );
}
