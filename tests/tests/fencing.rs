//! A cluster member fenced by its peer (issue 15), as whole processes: a node with `[cluster]
//! node_id = 1` over two `duplex-drive-sim` drives (a mirrored pool; the node on their ports A)
//! registers its key (node and boot) on every drive at start and holds the cluster's
//! reservation. The test plays the peer through the drives' ports B with the datapath's driver
//! and fencing code: it joins, then preempts the node's key in fencing order. From then on the
//! node serves nothing: a host's writes and reads fail with a path error (Asymmetric Access
//! Inaccessible, which a multipath host retries on its other path), never with data, and the
//! drives count no write through the node's port after the preempt.

use duplex_datapath::fence::{FenceKey, Step};
use duplex_tests::duplex_bench;
use duplex_tests::pool::{Rig, RigSpec};

const SUBNQN: &str = "nqn.2026-12.io.duplex:fence";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:fe4ce000-0000-4000-8000-000000000001";

/// Drive `i`'s registered keys, and its reservation type, as the simulator reports them.
fn drive_keys(rig: &Rig, i: usize) -> (Vec<u64>, String) {
    let r = &rig.sim(i, &["status"])["reservation"];
    let keys = r["registrants"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["key"].as_u64())
        .collect();
    (keys, r["type"].as_str().unwrap_or("none").to_owned())
}

/// Writes drive `i` executed through port A (the node's: controller id 1).
fn node_writes(rig: &Rig, i: usize) -> u64 {
    rig.sim(i, &["status"])["port_writes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["cntlid"] == 1)
        .and_then(|p| p["writes"].as_u64())
        .unwrap_or(0)
}

/// Node 1 of a cluster over two drives in a RAID-1 pool, volume `vol0` exported to the host.
fn member_rig() -> Rig {
    Rig::new(&RigSpec {
        drives: 2,
        raid: "1",
        drive_mib: 256,
        volume_size: "16m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: Some(1),
        spares: 0,
        metadata: 0,
    })
}

#[test]
fn a_node_whose_key_its_peer_preempts_stops_serving_and_writes_nothing_more() {
    let mut rig = member_rig();

    // The node's key (node 1, this boot) is on both drives, under the cluster's reservation.
    let mut node_key = None;
    for i in 0..2 {
        let (keys, rtype) = drive_keys(&rig, i);
        assert_eq!(keys.len(), 1, "drive {i}: {keys:x?}");
        assert_eq!(FenceKey(keys[0]).node(), 1, "drive {i}: {keys:x?}");
        assert_eq!(rtype, "ExclusiveAccessRegistrantsOnly", "drive {i}");
        assert!(node_key.is_none_or(|k| k == keys[0]), "one key per boot");
        node_key = Some(keys[0]);
    }
    let node_key = FenceKey(node_key.expect("a key"));
    assert!(node_key.boot() > 1, "the boot number is the start time");

    // A verified workload while the node is a member.
    let span = ["--span-blocks", "2048", "--seed", "7"];
    let (code, out, err) = duplex_bench(
        rig.port,
        SUBNQN,
        HOSTNQN,
        &[
            &[
                "--workload",
                "write",
                "--verify",
                "--ios",
                "256",
                "--qd",
                "4",
            ][..],
            &span,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}{err}");

    // The peer joins and fences the node, in fencing order.
    let mut peer = rig.peer_controllers(2, 0xB2);
    let peer_key = FenceKey::new(2, 1);
    let (fenced, steps) = rig.fence_node(&mut peer, peer_key, 1);
    assert_eq!(fenced, node_key);
    assert_eq!(steps, vec![Step::Preempted; 2]);
    for i in 0..2 {
        assert_eq!(drive_keys(&rig, i).0, vec![peer_key.0], "drive {i}");
    }
    let before: Vec<u64> = (0..2).map(|i| node_writes(&rig, i)).collect();

    // The host: writes and reads now fail with the path error, never with data.
    let (code, out, err) = duplex_bench(
        rig.port,
        SUBNQN,
        HOSTNQN,
        &[
            &["--workload", "write", "--ios", "16", "--qd", "1"][..],
            &span,
        ]
        .concat(),
    );
    let all = format!("{out}{err}");
    assert_ne!(code, 0, "a write was acknowledged by a fenced node: {all}");
    assert!(
        all.contains("asymmetric access inaccessible"),
        "the host sees a path error: {all}"
    );
    rig.node.log.wait_for(&["FENCED"]);
    let (code, out, err) = duplex_bench(
        rig.port,
        SUBNQN,
        HOSTNQN,
        &[&["--verify-only"][..], &span].concat(),
    );
    let all = format!("{out}{err}");
    assert_ne!(code, 0, "a fenced node returned data: {all}");
    assert!(all.contains("asymmetric access inaccessible"), "{all}");

    // Nothing the node tried after the preempt reached a drive.
    let after: Vec<u64> = (0..2).map(|i| node_writes(&rig, i)).collect();
    assert_eq!(
        before, after,
        "writes of the fenced node reached the drives"
    );
}

#[test]
fn a_cluster_member_whose_datapath_hangs_is_stopped_whole_by_its_watchdog() {
    let mut rig = member_rig();
    let pids: Vec<i32> = rig
        .node
        .services()
        .iter()
        .filter_map(|s| s["pid"].as_i64())
        .filter(|&p| p > 0)
        .map(|p| p as i32)
        .collect();
    let datapath = rig.node.service("datapath")["pid"]
        .as_i64()
        .expect("datapath pid") as i32;
    // The datapath stops making progress (frozen): its heartbeat stands still.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(datapath),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    rig.node
        .log
        .wait_for(&["stopping the whole node so that its peer takes over"]);
    // duplexd ends, failed, and takes every service with it: nothing of the node goes on.
    let status = rig.node.wait_exit();
    assert_ne!(status, Some(0), "duplexd exited as if all were well");
    rig.node.log.drain();
    let died = rig
        .node
        .log
        .matching(&["datapath died: node stops serving"]);
    assert_eq!(died.len(), 1, "{died:?}");
    assert!(
        died[0].contains("cause=\"hung\""),
        "the watchdog found it: {}",
        died[0]
    );
    for p in pids {
        let gone =
            std::fs::read_to_string(format!("/proc/{p}/stat")).map_or(true, |s| s.contains(") Z "));
        assert!(gone, "process {p} of the halted node still runs");
    }
}
