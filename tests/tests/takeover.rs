//! Takeover (issue 15): two controllers over the same dual-ported drives, as whole processes.
//!
//! Two `duplex-drive-sim` drives; node 1 (`a`) reaches them through their ports A, node 2 (`b`)
//! through their ports B; the cluster services beat over loopback. Node 1 builds a mirrored pool
//! and exports a volume; node 2, started after, finds the pool owned by node 1 and exports its
//! namespace inaccessible (no data through its path). Node 1 is killed whole (SIGKILL of every
//! process): node 2 sees both heartbeats stop (the interconnect and node 1's slot on the drives),
//! fences node 1's key off every drive, imports the pool with the next ownership epoch, and
//! serves it: the data the host wrote through node 1 reads back through node 2, block by block.

use std::path::Path;
use std::time::Instant;

use duplex_datapath::fence::FenceKey;
use duplex_tests::pool::{ctl_json, ctl_ok, drive_sim};
use duplex_tests::{duplex_bench, free_port, Node, PATIENCE};

const SUBNQN: &str = "nqn.2026-12.io.duplex:takeover";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:7a4e0000-0000-4000-8000-000000000001";

/// Node `id` of the cluster: fabric on `port`, interconnect on `ic`, the peer's on `peer`,
/// drives through `port_letter` sockets.
fn config(id: u16, port: u16, ic: u16, peer: u16, dir: &Path, port_letter: &str) -> String {
    let mut c = format!(
        r#"
[node]
name = "node{id}"
state_dir = "{{state}}"

[supervisor]
backoff_initial_ms = 1
backoff_max_ms = 20
crash_loop_exits = 1000
crash_loop_window_s = 1

[fabric]
cntlid_base = {base}

[[service]]
name = "datapath"
kind = "datapath"

[[service]]
name = "fabric"
after = ["datapath"]

[[service]]
name = "metadata"
after = ["datapath"]

[[service]]
name = "mgmt"
binary = "{{mgmt}}"

[[service]]
name = "cluster"
after = ["datapath"]

[[listener]]
name = "nvme"
address = "127.0.0.1:{port}"
service = "fabric"

[[listener]]
name = "interconnect"
address = "127.0.0.1:{ic}"
service = "cluster"

[cluster]
node_id = {id}
peer = "127.0.0.1:{peer}"
beat_ms = 50
dead_ms = 600
"#,
        base = u32::from(id) * 0x1000,
    );
    for i in 0..2 {
        c.push_str(&format!(
            "\n[[drive]]\nname = \"d{i}\"\ndrive = \"vfio-user:{}\"\nsize = \"256MiB\"\n",
            dir.join(format!("d{i}-{port_letter}.sock")).display()
        ));
    }
    c
}

/// `duplexctl --json cluster status` on `node`, once it satisfies `want`.
fn wait_status(node: &Node, want: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (code, out, _) = node.ctl(&["--json", "cluster", "status"]);
        if code == 0 {
            let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
            if want(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "cluster status never matched: {v}"
            );
        }
        assert!(Instant::now() < deadline, "no cluster status");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The keys registered on drive `i`.
fn drive_keys(dir: &Path, i: usize) -> Vec<u64> {
    let out = std::process::Command::new(duplex_tests::bin("duplex-drive-sim"))
        .arg("ctl")
        .arg("--control")
        .arg(dir.join(format!("d{i}.ctl")))
        .arg("status")
        .output()
        .expect("ctl runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["reservation"]["registrants"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["key"].as_u64())
        .collect()
}

#[test]
fn the_peer_fences_a_killed_owner_takes_its_pool_over_and_serves_its_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _sims: Vec<_> = (0..2)
        .map(|i| drive_sim(dir.path(), &format!("d{i}"), "256M").0)
        .collect();
    let (port_a, port_b, ic_a, ic_b) = (free_port(), free_port(), free_port(), free_port());
    let mut a = Node::start(&config(1, port_a, ic_a, ic_b, dir.path(), "a"));
    a.log.wait_for(&["metadata service ready"]);
    ctl_ok(
        &a,
        &["pool", "create", "tank", "--raid", "1", "--drives", "d0,d1"],
    );
    ctl_ok(
        &a,
        &[
            "volume", "create", "vol0", "--pool", "tank", "--size", "16m",
        ],
    );
    ctl_ok(&a, &["subsystem", "create", SUBNQN]);
    ctl_ok(&a, &["host", "allow", SUBNQN, HOSTNQN]);
    ctl_ok(&a, &["namespace", "add", SUBNQN, "--volume", "vol0"]);

    let mut b = Node::start(&config(2, port_b, ic_b, ic_a, dir.path(), "b"));
    b.log
        .wait_for(&["pool owned by the peer: exported inaccessible here", "tank"]);
    a.log.wait_for(&["peer alive", "peer=2"]);
    b.log.wait_for(&["peer alive", "peer=1"]);
    // Each node reads the other's disk heartbeat.
    let st = wait_status(&b, |v| v["disk"]["peer_counter"].as_u64().unwrap_or(0) > 0);
    assert_eq!(st["disk"]["drives"], 2, "{st}");
    wait_status(&a, |v| v["disk"]["peer_counter"].as_u64().unwrap_or(0) > 0);

    // The host writes through the owner.
    let span = ["--span-blocks", "2048", "--seed", "11"];
    let (code, out, err) = duplex_bench(
        port_a,
        SUBNQN,
        HOSTNQN,
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
    let (code, out, err) = duplex_bench(
        port_b,
        SUBNQN,
        HOSTNQN,
        &[&["--verify-only"][..], &span].concat(),
    );
    let all = format!("{out}{err}");
    assert_ne!(code, 0, "the non-owner returned data: {all}");
    assert!(all.contains("asymmetric access inaccessible"), "{all}");

    // Both keys are on both drives.
    for i in 0..2 {
        let keys = drive_keys(dir.path(), i);
        let nodes: Vec<u16> = keys.iter().map(|k| FenceKey(*k).node()).collect();
        assert!(
            nodes.contains(&1) && nodes.contains(&2),
            "drive {i}: {keys:x?}"
        );
    }

    // A multipath host writes through both paths (following ANA: node 1's) and keeps on.
    let before_a = port_writes(dir.path(), 0, 1);
    let stop = dir.path().join("stop");
    let bench = std::process::Command::new(duplex_tests::bin("duplex-bench"))
        .args(["--nqn", SUBNQN, "--hostnqn", HOSTNQN])
        .arg("--paths")
        .arg(format!("127.0.0.1:{port_a},127.0.0.1:{port_b}"))
        .args(["--workload", "write", "--verify", "--qd", "8"])
        .args([
            "--span-blocks",
            "4096",
            "--seed",
            "12",
            "--io-timeout-ms",
            "5000",
        ])
        .arg("--stop-file")
        .arg(&stop)
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("duplex-bench runs");
    let mut bench = duplex_tests::KillOnDrop(bench);
    wait_port_writes(dir.path(), 0, 1, before_a + 1000);

    // The owner dies whole, under the host's writes.
    a.kill_all();
    b.log.wait_for(&["peer dead"]);
    b.log
        .wait_for(&["TAKEOVER: the peer is fenced off every drive"]);
    let taken = b.log.wait_for(&["pool taken over", "tank"]);
    assert!(taken.contains("epoch=2"), "{taken}");
    // Only node 2's key is left on the drives.
    for i in 0..2 {
        let keys = drive_keys(dir.path(), i);
        assert!(
            keys.iter().all(|k| FenceKey(*k).node() == 2) && keys.len() == 1,
            "drive {i}: {keys:x?}"
        );
    }
    let pool = ctl_json(&b, &["pool", "show", "tank"]);
    assert_eq!(pool["pool"]["owner_node"], 1, "{pool}");
    let st = wait_status(&b, |v| {
        v["takeover"]
            .as_str()
            .is_some_and(|t| t.contains("taken over"))
    });
    assert_eq!(st["peer"]["state"], "dead", "{st}");

    // The host goes on through node 2; then it stops and reads every block it wrote back
    // (through node 2): what node 1 acknowledged is there.
    let before_b = port_writes(dir.path(), 0, 2);
    wait_port_writes(dir.path(), 0, 2, before_b + 1000);
    std::fs::write(&stop, b"").expect("stop file");
    let out = bench.wait_output();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(r["io_errors"], 0, "{r}");
    assert_eq!(r["verify_errors"], 0, "{r}");
    assert!(r["path_switches"].as_u64() >= Some(1), "{r}");
    assert_eq!(r["final_path"], 1, "{r}");
    assert!(r["blocks_checked"].as_u64() > Some(0), "{r}");
    eprintln!(
        "failover under a multipath host: pause (largest I/O latency) {} us, {} path errors, {} transport failures, {} retries",
        r["max_latency_us"], r["path_errors"], r["transport_failures"], r["retries"]
    );
}

/// Writes drive `i` executed through the port of controller `cntlid` (port A: 1, port B: 2).
fn port_writes(dir: &Path, i: usize, cntlid: u64) -> u64 {
    let out = std::process::Command::new(duplex_tests::bin("duplex-drive-sim"))
        .arg("ctl")
        .arg("--control")
        .arg(dir.join(format!("d{i}.ctl")))
        .arg("status")
        .output()
        .expect("ctl runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["port_writes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["cntlid"] == cntlid)
        .and_then(|p| p["writes"].as_u64())
        .unwrap_or(0)
}

/// Waits until drive `i` counts at least `n` writes through controller `cntlid`.
fn wait_port_writes(dir: &Path, i: usize, cntlid: u64, n: u64) {
    let deadline = Instant::now() + PATIENCE;
    while port_writes(dir, i, cntlid) < n {
        assert!(
            Instant::now() < deadline,
            "writes through controller {cntlid} stalled"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
