//! Pools on disk, end to end: two `duplex-drive-sim` drives (processes) as the node's
//! `[[drive]]`s; the configuration built with `duplexctl` (RAID-1 pool, volume, subsystem,
//! allowed host, namespace) the way an operator would; the host's verified I/O through the
//! fabric, the datapath's RAID 1 and both drives. The configuration survives a restart of
//! duplexd and a SIGKILL of every process of the node: the same pool, volume, NGUID,
//! subsystem and host come back from the drives, and `duplex-bench --verify-only` finds the
//! data. Every wrong command gets one line, exit 1, and changes nothing on the drives.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use duplex_tests::{bin, duplex_bench, free_port, KillOnDrop, Node};

const SUBNQN: &str = "nqn.2026-12.io.duplex:pools";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:d0b1e5c4-0000-4000-8000-000000000014";

/// A simulated drive of `size` under `dir`; returns the process and its port A socket.
fn drive(dir: &Path, name: &str, size: &str) -> (KillOnDrop, std::path::PathBuf) {
    let a = dir.join(format!("{name}-a.sock"));
    let mut sim = Command::new(bin("duplex-drive-sim"))
        .arg("serve")
        .arg("--backing")
        .arg(dir.join(format!("{name}.img")))
        .args(["--size", size, "--block-size", "4096"])
        .arg("--socket")
        .arg(&a)
        .arg("--socket")
        .arg(dir.join(format!("{name}-b.sock")))
        .arg("--control")
        .arg(dir.join(format!("{name}.ctl")))
        .stdout(Stdio::piped())
        .spawn()
        .expect("duplex-drive-sim starts");
    let mut ready = String::new();
    BufReader::new(sim.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("ready line");
    assert!(ready.starts_with("ready "), "{ready}");
    (KillOnDrop(sim), a)
}

fn config(port: u16, drives: &[&Path]) -> String {
    let mut c = format!(
        r#"
[node]
name = "pools"
state_dir = "{{state}}"

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

[[listener]]
name = "nvme"
address = "127.0.0.1:{port}"
service = "fabric"
"#
    );
    for (i, d) in drives.iter().enumerate() {
        c.push_str(&format!(
            "\n[[drive]]\nname = \"d{i}\"\ndrive = \"vfio-user:{}\"\nsize = \"128MiB\"\n",
            d.display()
        ));
    }
    c
}

/// `duplexctl --json ARGS`, which must succeed; its JSON.
fn json(node: &Node, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = node.ctl(&all);
    assert_eq!(code, 0, "duplexctl {args:?}: {out}{err}");
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("duplexctl {args:?}: not JSON ({e}): {out}"))
}

/// `duplexctl ARGS`, which must succeed.
fn ok(node: &Node, args: &[&str]) -> String {
    let (code, out, err) = node.ctl(args);
    assert_eq!(code, 0, "duplexctl {args:?}: {out}{err}");
    out
}

/// What the operator sees of the configuration (and what must come back after restarts).
fn snapshot(node: &Node) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    let pools = json(node, &["pool", "list"])["pools"].clone();
    let volumes = json(node, &["volume", "list"])["volumes"].clone();
    let subsystems = json(node, &["subsystem", "list"])["subsystems"].clone();
    (pools, volumes, subsystems)
}

fn bench(port: u16, args: &[&str]) {
    let (code, out, err) = duplex_bench(port, SUBNQN, HOSTNQN, args);
    assert_eq!(code, 0, "duplex-bench {args:?}: {out}{err}");
}

const SPAN: [&str; 4] = ["--span-blocks", "2048", "--seed", "11"];

#[test]
fn a_pool_built_with_duplexctl_survives_restarts_and_a_sigkill_of_the_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_s0, a0) = drive(dir.path(), "d0", "128M");
    let (_s1, a1) = drive(dir.path(), "d1", "128M");
    let port = free_port();
    let mut node = Node::start(&config(port, &[&a0, &a1]));
    node.log.wait_for(&["metadata service ready"]);

    let drives = json(&node, &["drive", "list"])["drives"].clone();
    assert_eq!(drives.as_array().map(Vec::len), Some(2), "{drives}");
    assert!(
        drives
            .as_array()
            .into_iter()
            .flatten()
            .all(|d| d["state"] == "free"),
        "{drives}"
    );
    ok(
        &node,
        &["pool", "create", "tank", "--raid", "1", "--drives", "d0,d1"],
    );
    ok(
        &node,
        &[
            "volume", "create", "vol0", "--pool", "tank", "--size", "16m",
        ],
    );
    ok(&node, &["subsystem", "create", SUBNQN]);
    ok(&node, &["host", "allow", SUBNQN, HOSTNQN]);
    ok(&node, &["namespace", "add", SUBNQN, "--volume", "vol0"]);
    let before = snapshot(&node);
    assert_eq!(before.0[0]["state"], "online", "{}", before.0);
    assert_eq!(before.2[0]["namespaces"][0]["nsid"], 1, "{}", before.2);

    // The host writes (verified) through RAID 1 on both drives.
    bench(
        port,
        &[
            &[
                "--workload",
                "write",
                "--verify",
                "--ios",
                "2048",
                "--qd",
                "16",
            ][..],
            &SPAN,
        ]
        .concat(),
    );

    // Wrong commands: one line, exit 1, nothing changed on the drives.
    let generation = |n: &Node| json(n, &["pool", "show", "tank"])["pool"]["generation"].clone();
    let g = generation(&node);
    for args in [
        &["pool", "create", "tank", "--raid", "0", "--drives", "d0"][..],
        &["pool", "create", "p2", "--raid", "1", "--drives", "d0,d1"],
        &["pool", "create", "p2", "--raid", "1", "--drives", "d7,d1"],
        &["pool", "show", "nope"],
        &["pool", "destroy", "tank"],
        &["volume", "create", "vol0", "--pool", "tank", "--size", "1m"],
        &["volume", "create", "v2", "--pool", "nope", "--size", "1m"],
        &["volume", "create", "v2", "--pool", "tank", "--size", "10g"],
        &["volume", "resize", "vol0", "--size", "1m"],
        &["volume", "delete", "vol0"],
        &["subsystem", "create", SUBNQN],
        &["subsystem", "delete", SUBNQN],
        &["namespace", "add", SUBNQN, "--volume", "nope"],
        &["namespace", "remove", SUBNQN, "9"],
        &[
            "host",
            "deny",
            SUBNQN,
            "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000000",
        ],
    ] {
        let (code, out, err) = node.ctl(args);
        assert_eq!(code, 1, "duplexctl {args:?} should fail: {out}{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
    assert_eq!(
        generation(&node),
        g,
        "a refused command committed something"
    );
    assert_eq!(snapshot(&node), before);

    // A clean restart of duplexd.
    assert_eq!(node.stop(), Some(0));
    node.relaunch();
    node.log.wait_for(&["pool imported", "tank"]);
    node.log.wait_for(&["metadata service ready"]);
    assert_eq!(snapshot(&node), before, "after a restart");
    bench(
        port,
        &[&["--verify-only", "--qd", "16"][..], &SPAN].concat(),
    );

    // Every process of the node killed at once.
    node.kill_all();
    node.relaunch();
    node.log.wait_for(&["pool imported", "tank"]);
    node.log.wait_for(&["metadata service ready"]);
    assert_eq!(snapshot(&node), before, "after a SIGKILL of the node");
    bench(
        port,
        &[&["--verify-only", "--qd", "16"][..], &SPAN].concat(),
    );
    assert_eq!(node.stop(), Some(0));
}
