//! The cluster service between two nodes (issue 15), as whole processes on loopback: each node
//! runs `cluster` with an interconnect listener and the other's address as its peer. Both see
//! the peer alive; the cluster service killed again and again on one node comes back each time
//! with the same boot and links up again; a node killed whole is seen with the interconnect
//! down (configuration changes then refused, accepted again once the peer is back) and,
//! started again, heard with its new boot; a stranger on the interconnect port
//! (garbage, another array's name) is refused without harm. (When silence means death — both
//! heartbeats silent — is the membership model's, proven by its unit tests; the disk heartbeat
//! is not written yet, so here a silent link is only ever "interconnect down".)

use std::io::Write;
use std::net::TcpStream;

use duplex_tests::pair::{wait_cluster_status, wait_count};
use duplex_tests::{free_port, storage_config, Node};

const SUBNQN: &str = "nqn.2026-12.io.duplex:cluster";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:c1c1c1c1-0000-4000-8000-000000000001";
/// Kills of one node's cluster service (the issue asks at least 50 under load, with the
/// takeover machinery; this is the membership's share).
const CRASHES: u64 = 20;

/// A storage node (a file volume) with mgmt and the cluster service: node `id`, interconnect
/// on 127.0.0.1:`ic`, the peer's on 127.0.0.1:`peer`.
fn config(name: &str, dir: &std::path::Path, id: u16, ic: u16, peer: u16) -> String {
    let volume = dir.join(format!("{name}.img"));
    let mut c = storage_config(
        name,
        free_port(),
        &format!("path = \"{}\"\nsize = \"16MiB\"", volume.display()),
        SUBNQN,
        HOSTNQN,
    );
    c.push_str(&format!(
        r#"
[supervisor]
backoff_initial_ms = 1
backoff_max_ms = 20
crash_loop_exits = 1000
crash_loop_window_s = 1

[[service]]
name = "mgmt"
binary = "{{mgmt}}"

[[service]]
name = "metadata"
after = ["datapath"]

[[service]]
name = "cluster"
after = ["datapath"]

[[listener]]
name = "interconnect"
address = "127.0.0.1:{ic}"
service = "cluster"

[cluster]
node_id = {id}
peer = "127.0.0.1:{peer}"
beat_ms = 50
dead_ms = 600
"#
    ));
    c
}

#[test]
fn two_nodes_see_each_other_and_a_restarted_cluster_service_keeps_its_node_and_boot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ic_a, ic_b) = (free_port(), free_port());
    let mut a = Node::start(&config("a", dir.path(), 1, ic_a, ic_b));
    let mut b = Node::start(&config("b", dir.path(), 2, ic_b, ic_a));
    a.log.wait_for(&["peer alive", "peer=2"]);
    b.log.wait_for(&["peer alive", "peer=1"]);
    // What the operator sees on A: itself, and B alive.
    let st = wait_cluster_status(&mut a, |v| {
        v["peer"]["state"] == "alive" && v["link_out"] == "up"
    });
    assert_eq!(
        (st["node"].as_u64(), st["peer"]["node"].as_u64()),
        (Some(1), Some(2)),
        "{st}"
    );
    assert_eq!(st["link_out"], "up", "{st}");
    let (code, text, err) = a.ctl(&["cluster", "status"]);
    assert_eq!(code, 0, "{err}");
    // With the peer heard, a configuration change reaches the metadata service (which has no
    // pool here to keep it in, and says so).
    let (code, out, err) = a.ctl(&["subsystem", "create", "nqn.2026-12.io.duplex:x"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(!err.contains("interconnect"), "{err}");
    assert!(text.contains("peer: node 2 boot"), "{text}");
    assert!(text.contains(": alive"), "{text}");
    let boot_b = b
        .log
        .matching(&["cluster service ready"])
        .first()
        .and_then(|l| l.split("boot=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .map(str::to_owned)
        .expect("b's boot in its log");

    let boot_b_n: u64 = boot_b.parse().expect("a boot number");
    // B's cluster service killed again and again: each incarnation links up to A again, with
    // the node's boot (a restarted service is the same node and boot, never a new one).
    wait_count(&mut b.log, &["interconnect link to the peer up"], 1);
    for i in 0..CRASHES {
        let gen = b.service("cluster")["generation"].as_u64().unwrap_or(0);
        let (code, out, err) = b.ctl(&["service", "crash", "cluster", "--mode", "kill"]);
        assert_eq!(code, 0, "crash {i}: {out}{err}");
        b.wait_running("cluster", gen);
        wait_count(
            &mut b.log,
            &["interconnect link to the peer up"],
            i as usize + 2,
        );
    }
    let boots: Vec<String> = b
        .log
        .matching(&["cluster service ready"])
        .iter()
        .filter_map(|l| l.split("boot=").nth(1))
        .filter_map(|s| s.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert_eq!(boots.len(), CRASHES as usize + 1);
    assert!(boots.iter().all(|x| *x == boot_b), "boots: {boots:?}");
    a.log.pump();
    assert!(
        a.log.matching(&["peer rebooted"]).is_empty(),
        "a restarted cluster service was taken for a new boot"
    );

    // A stranger on A's interconnect port: garbage, then a frame naming another array. A
    // refuses both and keeps hearing B.
    let mut s = TcpStream::connect(("127.0.0.1", ic_a)).expect("connect");
    let _ = s.write_all(&[0xFF; 64]);
    drop(s);
    let foreign = duplex_cluster::wire::Message {
        cluster: "another-array".into(),
        node: 2,
        boot: 5,
        body: duplex_cluster::wire::Body::Beat {
            seq: 1,
            state: duplex_cluster::wire::NodeState::Serving,
            config_generation: 0,
            takeover_pending: false,
        },
    };
    let mut s = TcpStream::connect(("127.0.0.1", ic_a)).expect("connect");
    let _ = s.write_all(&foreign.frame().expect("frame"));
    a.log
        .wait_for(&["closing an interconnect connection", "another-array"]);
    drop(s);
    // Connections that say nothing hold a slot only for a while, and only so many are read.
    let idle: Vec<TcpStream> = (0..duplex_cluster::service::MAX_ACCEPTED)
        .map(|_| TcpStream::connect(("127.0.0.1", ic_a)).expect("connect"))
        .collect();
    a.log
        .wait_for(&["interconnect connections open: refusing another"]);
    a.log.wait_for(&["silent for twice the dead time"]);
    drop(idle);
    // B, linked before, is heard throughout.
    wait_cluster_status(&mut a, |v| v["peer"]["state"] == "alive");

    // B killed whole: A sees the interconnect down (without the disk heartbeat, the second
    // witness, that is all it can say).
    a.log.pump();
    let alive = a.log.matching(&["peer alive", "peer=2"]).len();
    b.kill_all();
    a.log.wait_for(&["peer interconnect down", "peer=2"]);
    let st = wait_cluster_status(&mut a, |v| v["peer"]["state"] == "interconnect-down");
    assert_eq!(st["peer"]["boot"].as_u64(), Some(boot_b_n), "{st}");
    // Configuration changes are refused while the interconnect is down; reads are not.
    let (code, out, err) = a.ctl(&["subsystem", "create", "nqn.2026-12.io.duplex:x"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("refused while the interconnect to the peer (node 2) is down"),
        "{err}"
    );
    let (code, out, err) = a.ctl(&["subsystem", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    // B again, a new boot: A hears it alive again, rebooted, naming the old boot.
    b.relaunch();
    let rebooted = a.log.wait_for(&["peer rebooted"]);
    assert!(
        rebooted.contains(&format!("old_boot={boot_b}")),
        "the old boot named: {rebooted}"
    );
    wait_count(&mut a.log, &["peer alive", "peer=2"], alive + 1);
    let st = wait_cluster_status(&mut a, |p| {
        p["peer"]["state"] == "alive" && p["peer"]["boot"].as_u64() != Some(boot_b_n)
    });
    assert_eq!(st["peer"]["node"], 2, "{st}");
    // The interconnect back: changes reach the metadata service again.
    let (code, out, err) = a.ctl(&["subsystem", "create", "nqn.2026-12.io.duplex:x"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(!err.contains("interconnect"), "{err}");
}
