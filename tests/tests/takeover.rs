//! Takeover (issue 15): two controllers over the same dual-ported drives, as whole processes.
//!
//! Two `duplex-drive-sim` drives; node 1 reaches them through their ports A, node 2 through
//! their ports B; the cluster services beat over loopback (`duplex_tests::pair`, on the
//! machine's loopback). Node 1 builds a mirrored pool and exports a volume; node 2, started
//! after, finds the pool owned by node 1 and exports its namespace inaccessible (no data
//! through its path). Node 1 is killed whole (SIGKILL of every process): node 2 sees both
//! heartbeats stop (the interconnect and node 1's slot on the drives), fences node 1's key off
//! every drive, imports the pool with the next ownership epoch, and serves it: the data the
//! host wrote through node 1 reads back through node 2, block by block.

use duplex_datapath::fence::FenceKey;
use duplex_tests::pair::{finish_multipath, Pair};
use duplex_tests::pool::ctl_json;

#[test]
fn the_peer_fences_a_killed_owner_takes_its_pool_over_and_serves_its_data() {
    let mut p = Pair::on_loopback(50, 600);
    let st = p.wait_status(1, |v| v["disk"]["peer_counter"].as_u64().unwrap_or(0) > 0);
    assert_eq!(st["disk"]["drives"], 2, "{st}");

    // The host writes through the owner.
    let span = ["--span-blocks", "2048", "--seed", "11"];
    let (code, out, err) = p.bench_one(
        1,
        &[
            &[
                "--workload",
                "write",
                "--verify",
                "--ios",
                "2048",
                "--qd",
                "8",
            ][..],
            &span,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}{err}");
    // The non-owner's path returns no data: only the path status.
    let (code, out, err) = p.bench_one(2, &[&["--verify-only"][..], &span].concat());
    let all = format!("{out}{err}");
    assert_ne!(code, 0, "the non-owner returned data: {all}");
    assert!(all.contains("asymmetric access inaccessible"), "{all}");

    // Both keys are on both drives.
    for i in 0..2 {
        let keys = p.drive_keys(i);
        let nodes: Vec<u16> = keys.iter().map(|k| FenceKey(*k).node()).collect();
        assert!(
            nodes.contains(&1) && nodes.contains(&2),
            "drive {i}: {keys:x?}"
        );
    }

    // A multipath host writes through both paths (following ANA: node 1's) and keeps on.
    let stop = p.dir.path().join("stop");
    let mut bench = p.multipath(
        &[
            "--workload",
            "write",
            "--verify",
            "--qd",
            "8",
            "--span-blocks",
            "4096",
            "--seed",
            "12",
            "--io-timeout-ms",
            "5000",
        ],
        &stop,
    );
    p.wait_more_writes(1, 1000);

    // The owner dies whole, under the host's writes.
    p.node(0).kill_all();
    p.node(1).log.wait_for(&["peer dead"]);
    p.node(1)
        .log
        .wait_for(&["TAKEOVER: the peer is fenced off every drive"]);
    let taken = p.node(1).log.wait_for(&["pool taken over", "tank"]);
    assert!(taken.contains("epoch=2"), "{taken}");
    // Only node 2's key is left on the drives.
    for i in 0..2 {
        let keys = p.drive_keys(i);
        assert!(
            keys.iter().all(|k| FenceKey(*k).node() == 2) && keys.len() == 1,
            "drive {i}: {keys:x?}"
        );
    }
    let pool = ctl_json(&p.nodes[1], &["pool", "show", "tank"]);
    assert_eq!(pool["pool"]["owner_node"], 1, "{pool}");
    let st = p.wait_status(1, |v| {
        v["takeover"]
            .as_str()
            .is_some_and(|t| t.contains("taken over"))
    });
    assert_eq!(st["peer"]["state"], "dead", "{st}");

    // The host goes on through node 2; then it stops and reads every block it wrote back
    // (through node 2): what node 1 acknowledged is there.
    p.wait_more_writes(2, 1000);
    let r = finish_multipath(&mut bench, &stop);
    assert!(r["path_switches"].as_u64() >= Some(1), "{r}");
    assert_eq!(r["final_path"], 1, "{r}");
    eprintln!(
        "failover under a multipath host: pause (largest I/O latency) {} us, {} path errors, {} transport failures, {} retries",
        r["max_latency_us"], r["path_errors"], r["transport_failures"], r["retries"]
    );
}
