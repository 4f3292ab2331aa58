//! Pools on disk, end to end: two `duplex-drive-sim` drives (processes) as the node's
//! `[[drive]]`s; the configuration built with `duplexctl` (RAID-1 pool, volume, subsystem,
//! allowed host, namespace) the way an operator would; the host's verified I/O through the
//! fabric, the datapath's RAID 1 and both drives. The configuration survives a restart of
//! duplexd and a SIGKILL of every process of the node: the same pool, volume, NGUID,
//! subsystem and host come back from the drives, and `duplex-bench --verify-only` finds the
//! data. Every wrong command gets one line, exit 1, and changes nothing on the drives.

use std::path::Path;
use std::process::{Command, Stdio};

use duplex_tests::pool::{
    self, ctl_json as json, ctl_ok as ok, drive_sim, pool_node_config, wait_scrub, Rig, RigSpec,
};
use duplex_tests::{bin, duplex_bench, free_port, Node};

const SUBNQN: &str = "nqn.2026-12.io.duplex:pools";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:d0b1e5c4-0000-4000-8000-000000000014";

fn config(port: u16, drives: &[&Path]) -> String {
    pool_node_config(port, drives, "128MiB")
}

/// Starts the node again with its listener on a new port; returns it.
fn relaunch_elsewhere(node: &mut Node, port: u16) -> u16 {
    let new = free_port();
    node.relaunch_replacing(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{new}"));
    new
}

/// What the operator sees of the configuration (and what must come back after restarts),
/// the pools' metadata generation aside: an import of a mirror pool commits the next write
/// sequence mark.
fn snapshot(node: &Node) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    let mut pools = json(node, &["pool", "list"])["pools"].clone();
    if let Some(list) = pools.as_array_mut() {
        for p in list {
            if let Some(p) = p.as_object_mut() {
                p.remove("generation");
                // What runs now, not what the pool is: an import resyncs a mirror whose
                // members carry records (a checksum area on these drives).
                p.remove("scrub");
                p.remove("jobs");
            }
        }
    }
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
    let (_s0, a0) = drive_sim(dir.path(), "d0", "128M");
    let (_s1, a1) = drive_sim(dir.path(), "d1", "128M");
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

    // A clean restart of duplexd (on another port: the old one is free for any test's node).
    assert_eq!(node.stop(), Some(0));
    let port = relaunch_elsewhere(&mut node, port);
    node.log.wait_for(&["pool imported", "tank"]);
    node.log.wait_for(&["metadata service ready"]);
    node.wait_exported(SUBNQN);
    assert_eq!(snapshot(&node), before, "after a restart");
    bench(
        port,
        &[&["--verify-only", "--qd", "16"][..], &SPAN].concat(),
    );

    // Every process of the node killed at once.
    node.kill_all();
    let port = relaunch_elsewhere(&mut node, port);
    node.log.wait_for(&["pool imported", "tank"]);
    node.log.wait_for(&["metadata service ready"]);
    node.wait_exported(SUBNQN);
    assert_eq!(snapshot(&node), before, "after a SIGKILL of the node");
    bench(
        port,
        &[&["--verify-only", "--qd", "16"][..], &SPAN].concat(),
    );
    assert_eq!(node.stop(), Some(0));
}

/// A node over `n` simulated drives with pool `tank` (`raid`) over all of them and volume
/// `vol0` exported as namespace 1 of [`SUBNQN`] to [`HOSTNQN`].
fn rig(n: usize, raid: &str) -> Rig {
    Rig::new(&RigSpec {
        drives: n,
        raid,
        drive_mib: 256,
        volume_size: "16m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: None,
        spares: 0,
        metadata: 0,
    })
}

/// A verifying workload on namespace 1 of `rig`, running while `during` acts.
fn bench_during(rig: &Rig, args: &[&str], during: impl FnOnce()) -> (i32, String, String) {
    let target = format!("127.0.0.1:{}", rig.port);
    let child = Command::new(bin("duplex-bench"))
        .args(["--target", &target, "--nqn", SUBNQN, "--hostnqn", HOSTNQN])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("duplex-bench runs");
    during();
    let out = child.wait_with_output().expect("duplex-bench ends");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn member_states(node: &Node) -> Vec<String> {
    pool::member_states(node, "tank")
}

/// A redundant pool (mirror or parity) loses member `victim` (`how`: pull, error, power-cut)
/// in the middle of a verified workload: the host sees no error and reads back everything; the
/// member is failed on disk. It comes back: after a restart it is taken back and resynced — a
/// mirror's from the regions its write-intent bitmap marked while it was out (the rest passed
/// over), a parity member's whole — and then holds its data (another member pulled,
/// everything still verifies).
fn pool_loses_a_member(n: usize, raid: &str, victim: usize, how: &str) {
    let mut rig = rig(n, raid);
    let args = [
        "--workload",
        "mixed",
        "--verify",
        "--ios",
        "6000",
        "--qd",
        "16",
        "--span-blocks",
        "2048",
        "--seed",
        "21",
        "--json",
    ];
    let (code, out, err) = bench_during(&rig, &args, || {
        rig.wait_writes(victim, 64);
        match how {
            "pull" => {
                rig.sim(victim, &["pull"]);
            }
            "power-cut" => {
                rig.sim(victim, &["power-cut"]);
            }
            _ => {
                rig.sim(
                    victim,
                    &[
                        "inject",
                        "error",
                        "--op",
                        "any",
                        "--lba",
                        "0-999999999",
                        "--status",
                        "0x0280",
                        "--dnr",
                    ],
                );
            }
        }
    });
    assert_eq!(code, 0, "the host saw an error: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(v["verify"]["errors"], 0, "{out}");
    rig.node.log.wait_for(&["member failure recorded on disk"]);
    let states = member_states(&rig.node);
    assert_eq!(states[victim], "failed", "{states:?}");
    assert_eq!(
        json(&rig.node, &["pool", "show", "tank"])["pool"]["state"],
        "degraded"
    );
    // Written degraded (every block once, sequentially), read back from the live copies.
    let seq = "--workload write --verify --ios 2048 --span-blocks 2048 --seed 22 --qd 16";
    bench(rig.port, &seq.split(' ').collect::<Vec<_>>());
    let verify = [
        "--verify-only",
        "--span-blocks",
        "2048",
        "--seed",
        "22",
        "--qd",
        "16",
    ];
    bench(rig.port, &verify);
    // The member comes back; after a restart it is taken back, rebuilding, and resynced
    // under the host's reads: for a mirror only the regions its write-intent bitmap marked
    // while it was out.
    match how {
        "pull" => {
            rig.sim(victim, &["insert"]);
        }
        "power-cut" => {
            rig.sim(victim, &["power-on"]);
        }
        _ => {
            rig.sim(victim, &["clear"]);
        }
    }
    assert_eq!(rig.node.stop(), Some(0));
    rig.port = relaunch_elsewhere(&mut rig.node, rig.port);
    rig.node.log.wait_for(&["metadata service ready"]);
    rig.node.wait_exported(SUBNQN);
    rig.node
        .log
        .wait_for(&["a failed member came back", &format!("slot={victim}")]);
    bench(rig.port, &verify);
    if matches!(raid, "1" | "10") {
        let done = rig
            .node
            .log
            .wait_for(&["rebuild complete: member active", "copied="]);
        let copied = duplex_tests::field(&done, "copied");
        let skipped = duplex_tests::field(&done, "skipped");
        // The workload's 8 MiB span: a few 1 MiB regions per set marked, the rest of the
        // member's data area (most of its 256 MiB drive) passed over.
        assert!(copied > 0 && copied <= 16 << 20, "{done}");
        assert!(skipped >= 128 << 20, "{done}");
    }
    rig.node
        .log
        .wait_for(&["rebuild complete: member active on disk"]);
    let states = member_states(&rig.node);
    assert_eq!(states[victim], "active", "{states:?}");
    let drives = json(&rig.node, &["drive", "list"])["drives"].clone();
    assert_eq!(drives[victim]["state"], "active", "{drives}");
    // The other copy of its set pulled: everything reads back from the member that came back.
    rig.sim(victim ^ 1, &["pull"]);
    bench(rig.port, &verify);
    assert_eq!(rig.node.stop(), Some(0));
    drop(rig.sims);
}

#[test]
fn raid1_loses_a_pulled_member_under_verified_io() {
    pool_loses_a_member(2, "1", 1, "pull");
}

/// A member fails under a verifying workload (every command fails), its drive answers again,
/// and only the metadata service is killed: the restarted service finds the datapath serving
/// the pool (the member failed there) and leaves the member failed — taking it back on that
/// device would leave it rebuilding with nothing running — and the host sees no error.
#[test]
fn a_restarted_metadata_service_does_not_take_a_failed_member_back() {
    let mut rig = rig(2, "1");
    let args = [
        "--workload",
        "mixed",
        "--verify",
        "--ios",
        "4000",
        "--qd",
        "16",
        "--span-blocks",
        "2048",
        "--seed",
        "61",
    ];
    let (code, out, err) = bench_during(&rig, &args, || {
        rig.wait_writes(1, 64);
        rig.sim(
            1,
            &[
                "inject",
                "error",
                "--op",
                "any",
                "--lba",
                "0-999999999",
                "--status",
                "0x0280",
                "--dnr",
            ],
        );
    });
    assert_eq!(code, 0, "the host saw an error: {out}{err}");
    rig.node.log.wait_for(&["member failure recorded on disk"]);
    rig.sim(1, &["clear"]);
    let g = rig.node.service("metadata")["generation"]
        .as_u64()
        .unwrap_or(0);
    ok(
        &rig.node,
        &["service", "crash", "metadata", "--mode", "kill"],
    );
    rig.node.wait_running("metadata", g);
    rig.node
        .log
        .wait_for(&["the datapath serves the pool already", "tank"]);
    assert_eq!(member_states(&rig.node)[1], "failed");
    // The pool goes on degraded: every block written and read back.
    let seq = "--workload write --verify --ios 2048 --span-blocks 2048 --seed 62 --qd 16";
    bench(rig.port, &seq.split(' ').collect::<Vec<_>>());
    let verify = [
        "--verify-only",
        "--span-blocks",
        "2048",
        "--seed",
        "62",
        "--qd",
        "16",
    ];
    bench(rig.port, &verify);
    assert_eq!(rig.node.stop(), Some(0));
}

#[test]
fn raid1_loses_a_member_failing_every_command_under_verified_io() {
    pool_loses_a_member(2, "1", 0, "error");
}

#[test]
fn raid10_loses_a_member_to_a_power_cut_under_verified_io() {
    pool_loses_a_member(4, "10", 2, "power-cut");
}

#[test]
fn raid1_loses_a_member_to_a_power_cut_under_verified_io() {
    pool_loses_a_member(2, "1", 1, "power-cut");
}

#[test]
fn raid10_loses_a_pulled_member_under_verified_io() {
    pool_loses_a_member(4, "10", 1, "pull");
}

#[test]
fn raid5_loses_a_pulled_member_under_verified_io() {
    pool_loses_a_member(3, "5", 1, "pull");
}

#[test]
fn raid5_loses_a_member_to_a_power_cut_under_verified_io() {
    pool_loses_a_member(4, "5", 3, "power-cut");
}

#[test]
fn raid6_loses_a_member_failing_every_command_under_verified_io() {
    pool_loses_a_member(4, "6", 0, "error");
}

/// A RAID-5 member pulled under a verifying workload, replaced by a spare with `duplexctl pool
/// replace` and rebuilt while the workload goes on: the member is committed rebuilding, then
/// active once the datapath has rebuilt it, and the pool is online again; then another member
/// is pulled, and the workload's final read-back of every block it wrote goes through the
/// rebuilt member's columns and the parity. No host error, no verify error.
#[test]
fn raid5_member_replaced_by_a_spare_and_rebuilt_under_verified_io() {
    let mut rig = Rig::new(&RigSpec {
        drives: 3,
        raid: "5",
        drive_mib: 256,
        volume_size: "16m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: None,
        spares: 1,
        metadata: 0,
    });
    let (child, stop) = verifying_load(&rig, "41");
    rig.wait_writes(1, 64);
    rig.sim(1, &["pull"]);
    rig.node.log.wait_for(&["member failure recorded on disk"]);
    // Only a failed member is replaced, only by a free drive, only in a parity pool.
    let (code, _, e) = rig.node.ctl(&["pool", "replace", "tank", "d0", "d3"]);
    assert_eq!(code, 1, "{e}");
    assert!(e.contains("only a failed member is replaced"), "{e}");
    let (code, _, e) = rig.node.ctl(&["pool", "replace", "tank", "d1", "d2"]);
    assert_eq!(code, 1, "{e}");
    assert!(e.contains("not free"), "{e}");
    let out = ok(&rig.node, &["pool", "replace", "tank", "d1", "d3"]);
    assert!(out.contains("rebuilding"), "{out}");
    rig.node
        .log
        .wait_for(&["rebuild complete: member active on disk"]);
    let show = json(&rig.node, &["pool", "show", "tank"]);
    assert_eq!(show["pool"]["state"], "online", "{show}");
    let drives = json(&rig.node, &["drive", "list"])["drives"].clone();
    let d3 = drives
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["name"] == "d3")
        .cloned()
        .unwrap_or_default();
    assert_eq!(d3["state"], "active", "{drives}");
    assert_eq!(d3["slot"], 1, "{drives}");
    // A scrub under the same workload finds the parity consistent everywhere.
    let out = ok(&rig.node, &["pool", "scrub", "tank"]);
    assert!(out.contains("scrub of pool tank started"), "{out}");
    let (code, _, e) = rig.node.ctl(&["pool", "scrub", "tank"]);
    assert!(code == 0 || e.contains("a scrub is running"), "{e}");
    let scrub = wait_scrub(&rig.node, "tank");
    assert_eq!(scrub["mismatches"], 0, "{scrub}");
    assert_eq!(scrub["skipped"], 0, "{scrub}");
    let text = ok(&rig.node, &["pool", "show", "tank"]);
    assert!(text.contains("scrub: finished: 0 mismatches"), "{text}");
    // Another member lost: the rebuilt one now carries the pool.
    rig.sim(0, &["pull"]);
    rig.wait_writes(2, 64);
    let r = finish_load(child, &stop);
    assert!(r["blocks_checked"].as_u64() > Some(0), "{r}");
}

/// A RAID-1 member pulled under a verifying workload is replaced by a free drive and rebuilt
/// from the other copy while the workload goes on; a scrub then finds the copies equal, and
/// with the other member pulled the rebuilt one carries the pool. No host error, no verify
/// error.
#[test]
fn raid1_member_replaced_and_rebuilt_under_verified_io() {
    let mut rig = Rig::new(&RigSpec {
        drives: 2,
        raid: "1",
        drive_mib: 192,
        volume_size: "16m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: None,
        spares: 1,
        metadata: 0,
    });
    let (child, stop) = verifying_load(&rig, "43");
    rig.wait_writes(1, 64);
    rig.sim(1, &["pull"]);
    rig.node.log.wait_for(&["member failure recorded on disk"]);
    let out = ok(&rig.node, &["pool", "replace", "tank", "d1", "d2"]);
    assert!(out.contains("rebuilding"), "{out}");
    rig.node
        .log
        .wait_for(&["rebuild complete: member active on disk"]);
    let show = json(&rig.node, &["pool", "show", "tank"]);
    assert_eq!(show["pool"]["state"], "online", "{show}");
    ok(&rig.node, &["pool", "scrub", "tank"]);
    let scrub = wait_scrub(&rig.node, "tank");
    assert_eq!(scrub["mismatches"], 0, "{scrub}");
    rig.sim(0, &["pull"]);
    rig.wait_writes(2, 64);
    let r = finish_load(child, &stop);
    assert!(r["blocks_checked"].as_u64() > Some(0), "{r}");
}

/// RAID 6 loses two members under a verifying workload (pulled one after the other), both are
/// replaced by spares and rebuilt while the workload goes on (one after the other, at the
/// operator's rate), a scrub afterwards finds the parity consistent, and two other members
/// are then lost: the rebuilt ones carry the pool. No host error, no verify error.
#[test]
fn raid6_two_members_replaced_and_rebuilt_under_verified_io() {
    let mut rig = Rig::new(&RigSpec {
        drives: 4,
        raid: "6",
        drive_mib: 192,
        volume_size: "16m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: None,
        spares: 2,
        metadata: 0,
    });
    let (child, stop) = verifying_load(&rig, "47");
    rig.wait_writes(0, 64);
    rig.sim(1, &["pull"]);
    rig.node.log.wait_for(&["member failure recorded on disk"]);
    rig.wait_writes(0, 64);
    rig.sim(2, &["pull"]);
    wait_lines(&mut rig.node, &["member failure recorded on disk"], 2);
    assert_eq!(
        member_states(&rig.node),
        ["active", "failed", "failed", "active"]
    );
    ok(
        &rig.node,
        &["pool", "replace", "tank", "d1", "d4", "--rate", "256M"],
    );
    ok(&rig.node, &["pool", "replace", "tank", "d2", "d5"]);
    wait_lines(
        &mut rig.node,
        &["rebuild complete: member active on disk"],
        2,
    );
    assert_eq!(member_states(&rig.node), ["active"; 4]);
    ok(&rig.node, &["pool", "scrub", "tank"]);
    let scrub = wait_scrub(&rig.node, "tank");
    assert_eq!(scrub["mismatches"], 0, "{scrub}");
    assert_eq!(scrub["skipped"], 0, "{scrub}");
    // Two of the original members lost: the rebuilt ones carry the pool.
    rig.sim(0, &["pull"]);
    rig.sim(3, &["pull"]);
    rig.wait_writes(4, 64);
    let r = finish_load(child, &stop);
    assert!(r["blocks_checked"].as_u64() > Some(0), "{r}");
}

/// Waits until `node`'s log has `n` lines with every one of `parts`.
fn wait_lines(node: &mut Node, parts: &[&str], n: usize) {
    let deadline = std::time::Instant::now() + duplex_tests::PATIENCE;
    loop {
        node.log.pump();
        if node.log.matching(parts).len() >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than {n} log lines with {parts:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A hot spare: a free drive reserved for a RAID-5 pool (`pool add-spare`) shows as its spare,
/// is known again by a restarted metadata service (from its superblock and the pool's record),
/// and when a member is pulled under a verifying workload it takes the member's slot with no
/// operator, is rebuilt, and the pool is online again with no spare left. No host error.
#[test]
fn a_hot_spare_takes_a_failed_members_place_and_is_rebuilt() {
    hot_spare_takes_a_failed_members_place(3, "5");
}

/// The same for a RAID-1 pool (the mirror rebuild copies the pulled member's data from the
/// other copy); afterwards the other copy is pulled too and the load still verifies, from the
/// spare alone.
#[test]
fn a_hot_spare_takes_a_failed_mirror_members_place_and_is_rebuilt() {
    hot_spare_takes_a_failed_members_place(2, "1");
}

fn hot_spare_takes_a_failed_members_place(n: usize, raid: &str) {
    let spare = format!("d{n}");
    let spare = spare.as_str();
    let mut rig = Rig::new(&RigSpec {
        drives: n,
        raid,
        drive_mib: 192,
        volume_size: "16m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: None,
        spares: 1,
        metadata: 0,
    });
    // Refusals first: a member is no spare, nor is a drive of no known name.
    let (code, _, e) = rig.node.ctl(&["pool", "add-spare", "tank", "d0"]);
    assert_eq!(code, 1, "{e}");
    assert!(e.contains("not free"), "{e}");
    let (code, _, e) = rig.node.ctl(&["pool", "add-spare", "tank", "d9"]);
    assert_eq!(code, 1, "{e}");
    assert!(e.contains("no drive d9"), "{e}");
    let out = ok(&rig.node, &["pool", "add-spare", "tank", spare]);
    assert!(out.contains(&format!("{spare} is a hot spare")), "{out}");
    let drive_state = |node: &Node, name: &str| {
        json(node, &["drive", "list"])["drives"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["name"] == name)
            .map(|d| (d["state"].clone(), d["pool"].clone()))
            .unwrap_or_default()
    };
    assert_eq!(
        drive_state(&rig.node, spare),
        ("spare".into(), "tank".into())
    );
    let show = json(&rig.node, &["pool", "show", "tank"]);
    assert_eq!(show["pool"]["spares"], serde_json::json!([spare]), "{show}");
    // A restarted metadata service knows it again.
    let g = rig.node.service("metadata")["generation"]
        .as_u64()
        .unwrap_or(0);
    ok(
        &rig.node,
        &["service", "crash", "metadata", "--mode", "kill"],
    );
    rig.node.wait_running("metadata", g);
    let deadline = std::time::Instant::now() + duplex_tests::PATIENCE;
    loop {
        let (code, out, _) = rig.node.ctl(&["--json", "drive", "list"]);
        if code == 0 && drive_state(&rig.node, spare).0 == "spare" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the spare is not known after a restart: {out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (child, stop) = verifying_load(&rig, "53");
    rig.wait_writes(1, 64);
    rig.sim(1, &["pull"]);
    rig.node.log.wait_for(&["hot spare taken: rebuilding"]);
    rig.node
        .log
        .wait_for(&["rebuild complete: member active on disk"]);
    let show = json(&rig.node, &["pool", "show", "tank"]);
    assert_eq!(show["pool"]["state"], "online", "{show}");
    assert_eq!(show["pool"]["spares"], serde_json::json!([]), "{show}");
    assert_eq!(drive_state(&rig.node, spare).0, "active");
    rig.wait_writes(n, 64);
    if raid == "1" {
        // The other copy gone: every read from the rebuilt spare, verified.
        rig.sim(0, &["pull"]);
        rig.node
            .log
            .wait_for(&["member failure recorded on disk", "member=0"]);
    }
    finish_load(child, &stop);
}

/// The verifying write load of these tests on namespace 1 of `rig` (the multipath host on one
/// path, seed `seed`), until its stop file exists: the child and that file.
fn verifying_load(rig: &Rig, seed: &str) -> (std::process::Child, std::path::PathBuf) {
    let stop = rig.dir.path().join("stop");
    let target = format!("127.0.0.1:{}", rig.port);
    let stop_arg = stop.display().to_string();
    let child = Command::new(bin("duplex-bench"))
        .args(["--paths", &target, "--nqn", SUBNQN, "--hostnqn", HOSTNQN])
        .args(["--workload", "write", "--verify", "--qd", "8"])
        .args(["--span-blocks", "4096", "--seed", seed, "--json"])
        .args(["--stop-file", &stop_arg])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("duplex-bench runs");
    (child, stop)
}

/// Stops a [`verifying_load`] and checks the host saw no I/O and no verify error; its report.
fn finish_load(child: std::process::Child, stop: &Path) -> serde_json::Value {
    std::fs::write(stop, b"").expect("stop file");
    let out = child.wait_with_output().expect("duplex-bench ends");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the host saw an error: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(&text).expect("JSON report");
    assert_eq!(r["io_errors"], 0, "{r}");
    assert_eq!(r["verify_errors"], 0, "{r}");
    r
}

/// Where pool `tank`'s rebuild stands, as `pool show --json` says: (bytes of the member
/// rebuilt, bytes committed as its checkpoint on the drives), `None` when none runs.
fn rebuild_at(node: &Node) -> Option<(u64, u64)> {
    let p = json(node, &["pool", "show", "tank"])["pool"].clone();
    let done = p["rebuild"][1].as_u64()?;
    Some((done, p["jobs"]["rebuild_checkpoint"].as_u64().unwrap_or(0)))
}

/// The raid service schedules rebuilds: it is crashed 20 times (killed or panicked, alternately;
/// `DUPLEX_RAID_CRASHES` for more) during one rate-limited rebuild under a verifying workload.
/// Each successor takes the job back where it stood — the datapath keeps its place, so the
/// position only grows across crashes and nothing is redone — and the job moves on under it
/// before the next crash. The position is checkpointed on the drives as it goes. The rebuild
/// finishes, a scrub finds nothing, the host sees no error.
#[test]
fn a_rebuild_goes_on_across_20_raid_service_crashes() {
    let crashes: usize = std::env::var("DUPLEX_RAID_CRASHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    rebuild_goes_on_across_raid_service_crashes(3, "5", crashes);
}

/// The same for a mirror rebuild (RAID 1), 5 crashes: the raid service schedules it the same
/// way, the datapath keeps its place.
#[test]
fn a_mirror_rebuild_goes_on_across_raid_service_crashes() {
    rebuild_goes_on_across_raid_service_crashes(2, "1", 5);
}

fn rebuild_goes_on_across_raid_service_crashes(n: usize, raid: &str, crashes: usize) {
    let spare = format!("d{n}");
    let mut rig = Rig::new(&RigSpec {
        drives: n,
        raid,
        drive_mib: 256,
        volume_size: "16m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: None,
        spares: 1,
        metadata: 0,
    });
    let (child, stop) = verifying_load(&rig, "43");
    rig.wait_writes(1, 64);
    rig.sim(1, &["pull"]);
    rig.node.log.wait_for(&["member failure recorded on disk"]);
    // Slow enough that the crashes all land inside the rebuild.
    let out = ok(
        &rig.node,
        &["pool", "replace", "tank", "d1", &spare, "--rate", "2M"],
    );
    assert!(out.contains("rebuilding"), "{out}");
    let text = ok(&rig.node, &["pool", "show", "tank"]);
    assert!(text.contains("(rate limit 2M/s)"), "{text}");
    let member = json(&rig.node, &["pool", "show", "tank"])["pool"]["member_bytes"]
        .as_u64()
        .expect("member bytes");
    let deadline = std::time::Instant::now() + duplex_tests::PATIENCE * 4;
    // Waits until the rebuild stands past `past`; returns where it stands.
    let wait_past = |node: &Node, past: u64| loop {
        assert!(
            std::time::Instant::now() < deadline,
            "hang: the rebuild does not move past {past}"
        );
        match rebuild_at(node) {
            Some((done, _)) if done > past => return done,
            Some(_) => {}
            None => panic!("the rebuild ended before the crashes did (past {past} of {member})"),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut generation = rig.node.service("raid")["generation"].as_u64().unwrap_or(0);
    let mut at_crash = Vec::new();
    let mut after = wait_past(&rig.node, 0);
    for i in 0..crashes {
        let mode = if i % 2 == 0 { "kill" } else { "panic" };
        let before = rebuild_at(&rig.node).expect("rebuilding").0;
        let (code, out, err) = rig.node.ctl(&["service", "crash", "raid", "--mode", mode]);
        assert_eq!(code, 0, "crash {mode}: {out}{err}");
        generation = rig.node.wait_running("raid", generation)["generation"]
            .as_u64()
            .unwrap_or(0);
        // Never back: the successor goes on from where the job stood.
        let now = rebuild_at(&rig.node).expect("rebuilding").0;
        assert!(
            now >= before,
            "crash {i}: the rebuild went back from {before} to {now}"
        );
        // And the job moves under the successor before the next crash.
        after = wait_past(&rig.node, now.max(after));
        at_crash.push(before);
    }
    assert!(at_crash.windows(2).all(|w| w[0] <= w[1]), "{at_crash:?}");
    let checkpoint = rebuild_at(&rig.node).expect("rebuilding").1;
    assert!(
        checkpoint > 0,
        "no checkpoint committed in {crashes} crashes"
    );
    let log = rig
        .node
        .log
        .matching(&["rebuild checkpoint committed"])
        .len();
    eprintln!(
        "raid {raid}: raid service crashed {crashes} times during one rebuild of {member} bytes: position at each crash {at_crash:?}; redone 0 bytes (never back); {log} checkpoints committed, the last at {checkpoint}"
    );
    // Full speed for the rest.
    let out = ok(&rig.node, &["pool", "rate", "tank", "auto"]);
    assert!(out.contains("yield to host I/O"), "{out}");
    rig.node
        .log
        .wait_for(&["rebuild complete: member active on disk"]);
    let out = ok(&rig.node, &["pool", "scrub", "tank"]);
    assert!(out.contains("scrub of pool tank started"), "{out}");
    let scrub = wait_scrub(&rig.node, "tank");
    assert_eq!(scrub["mismatches"], 0, "{scrub}");
    finish_load(child, &stop);
}

#[test]
fn raid10_loses_a_member_failing_every_command_under_verified_io() {
    pool_loses_a_member(4, "10", 3, "error");
}

/// The metadata service is killed or made to panic 50 times while a loop of configuration
/// changes runs and a verifying workload runs on an existing volume: no host error, no verify
/// error, and after each crash every change made so far is there, whole. (A crash inside a
/// commit is proven on the store: `services/metadata/tests/store.rs`, a power loss at every
/// write and flush of a commit.)
#[test]
fn the_metadata_service_crashes_50_times_under_config_changes_and_io() {
    let rig = rig(2, "1");
    let node = &rig.node;
    // The verifying workload: bounded runs back to back until the crashes are done, each
    // checking what it wrote.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = rig.port;
    let flag = std::sync::Arc::clone(&stop);
    let workload = std::thread::spawn(move || {
        let mut runs = Vec::new();
        let mut seed = 100u64;
        while !flag.load(std::sync::atomic::Ordering::Acquire) {
            seed += 1;
            let s = seed.to_string();
            let args = [
                "--workload",
                "mixed",
                "--verify",
                "--ios",
                "1500",
                "--qd",
                "8",
                "--span-blocks",
                "2048",
                "--seed",
                &s,
                "--json",
            ];
            runs.push(duplex_bench(port, SUBNQN, HOSTNQN, &args));
        }
        runs
    });
    rig.wait_writes(0, 64);
    let mut generation = node.service("metadata")["generation"].as_u64().unwrap_or(0);
    let mut crashes = 0;
    for i in 0..50 {
        let name = format!("v{i}");
        ok(
            node,
            &["volume", "create", &name, "--pool", "tank", "--size", "1m"],
        );
        let mode = if i % 2 == 0 { "kill" } else { "panic" };
        let (code, out, err) = node.ctl(&["service", "crash", "metadata", "--mode", mode]);
        assert_eq!(code, 0, "crash {mode}: {out}{err}");
        // Wait for the successor, then look: every change made so far is there, whole.
        let deadline = std::time::Instant::now() + duplex_tests::PATIENCE;
        loop {
            let row = node.service("metadata");
            let g = row["generation"].as_u64().unwrap_or(0);
            if row["state"] == "running" && g > generation {
                generation = g;
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "metadata did not come back: {row}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let volumes = loop {
            let (code, out, _) = node.ctl(&["--json", "volume", "list"]);
            if code == 0 {
                break serde_json::from_str::<serde_json::Value>(&out).expect("JSON")["volumes"]
                    .clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "metadata does not answer"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        for j in 0..=i {
            let want = format!("v{j}");
            let found: Vec<&serde_json::Value> = volumes
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["name"] == want.as_str())
                .collect();
            assert_eq!(found.len(), 1, "{want} after crash {i}: {volumes}");
            assert_eq!(found[0]["size_bytes"], 1 << 20, "{want} whole: {volumes}");
        }
        crashes += 1;
    }
    // Crashes while a change is in flight (often inside its commit: writes and flushes to
    // both drives through the datapath): duplexctl learns at once (the restart notice) that it
    // may or may not have been carried out; afterwards it is wholly present or wholly absent,
    // and present whenever duplexctl said done.
    let (mut present, mut absent) = (0, 0);
    for i in 0..10 {
        let name = format!("w{i}");
        let change = Command::new(bin("duplexctl"))
            .arg("--state-dir")
            .arg(&node.state_dir)
            .args(["volume", "create", &name, "--pool", "tank", "--size", "1m"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("duplexctl runs");
        let mode = if i % 2 == 0 { "kill" } else { "panic" };
        let (code, out, err) = node.ctl(&["service", "crash", "metadata", "--mode", mode]);
        assert_eq!(code, 0, "crash {mode}: {out}{err}");
        let done = change
            .wait_with_output()
            .expect("duplexctl ends")
            .status
            .success();
        let deadline = std::time::Instant::now() + duplex_tests::PATIENCE;
        let volumes = loop {
            let (code, out, _) = node.ctl(&["--json", "volume", "list"]);
            if code == 0 {
                break serde_json::from_str::<serde_json::Value>(&out).expect("JSON")["volumes"]
                    .clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "metadata does not answer"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let found: Vec<&serde_json::Value> = volumes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["name"] == name.as_str())
            .collect();
        match found.as_slice() {
            [v] => {
                assert_eq!(v["size_bytes"], 1 << 20, "{name} whole: {v}");
                present += 1;
            }
            [] => {
                assert!(
                    !done,
                    "duplexctl said {name} was created, but it is not there"
                );
                absent += 1;
            }
            more => panic!("{name} listed {} times", more.len()),
        }
        crashes += 1;
    }
    // The workload ran through all of it.
    stop.store(true, std::sync::atomic::Ordering::Release);
    let runs = workload.join().expect("workload thread");
    assert!(
        runs.len() > 1,
        "the workload did not run during the crashes"
    );
    for (code, out, err) in &runs {
        assert_eq!(*code, 0, "the host saw an error: {out}{err}");
        let v: serde_json::Value = serde_json::from_str(out).expect("JSON report");
        assert_eq!(v["verify"]["errors"], 0, "{out}");
    }
    assert_eq!(crashes, 60);
    eprintln!(
        "crashes: {crashes}; in flight: {present} changes present, {absent} absent; workload runs: {}",
        runs.len()
    );
}

/// Waits until service `name` runs as a generation above `generation`.
fn wait_restarted(node: &Node, name: &str, generation: u64) {
    let deadline = std::time::Instant::now() + duplex_tests::PATIENCE;
    loop {
        let row = node.service(name);
        if row["state"] == "running" && row["generation"].as_u64().unwrap_or(0) > generation {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} did not come back: {row}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// `duplexctl volume list` once the metadata service answers again (after a crash).
fn volumes_when_answering(node: &Node) -> serde_json::Value {
    let deadline = std::time::Instant::now() + duplex_tests::PATIENCE;
    loop {
        let (code, out, _) = node.ctl(&["--json", "volume", "list"]);
        if code == 0 {
            return serde_json::from_str::<serde_json::Value>(&out).expect("JSON")["volumes"]
                .clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metadata does not answer"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The volumes of `list` named `name` (0 or 1 of them, whole, or the test fails).
fn whole_or_absent(list: &serde_json::Value, name: &str) -> bool {
    let found: Vec<&serde_json::Value> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["name"] == name)
        .collect();
    match found.as_slice() {
        [] => false,
        [v] => {
            assert_eq!(v["size_bytes"], 1 << 20, "{name} whole: {v}");
            true
        }
        more => panic!("{name} listed {} times", more.len()),
    }
}

/// The metadata service is crashed at chosen points inside its commits, under duplexd, while a
/// verifying workload runs: with `--crash-in-commit K` (a test hook) it aborts right after the
/// K-th drive write or flush of a configuration request. On a RAID-1 pool a commit is: the
/// image to member 0, the image to member 1, flush member 0, flush member 1; K = 1..=4 crashes
/// after each. Every change is wholly present or wholly absent after the crash, stays so
/// through every later import (the next crash's, and a clean restart without the hook), and
/// the host sees no error.
#[test]
fn the_metadata_service_crashes_at_chosen_points_inside_commits_under_io() {
    const POINTS: u32 = 4;
    const PER_POINT: usize = 3;
    let mut rig = rig(2, "1");
    let plain = "name = \"metadata\"\nafter = [\"datapath\"]";
    // (name, present after its crash)
    let mut outcomes: Vec<(String, bool)> = Vec::new();
    let mut runs = Vec::new();
    let mut seed = 300u64;
    for point in 1..=POINTS {
        assert_eq!(rig.node.stop(), Some(0));
        let from = if point == 1 {
            plain.to_owned()
        } else {
            format!("{plain}\nargs = [\"--crash-in-commit\", \"{}\"]", point - 1)
        };
        let hooked = format!("{plain}\nargs = [\"--crash-in-commit\", \"{point}\"]");
        rig.node.edit_config(&from, &hooked);
        rig.port = relaunch_elsewhere(&mut rig.node, rig.port);
        rig.node.log.wait_for(&["metadata service ready"]);
        rig.node.wait_exported(SUBNQN);
        seed += 1;
        let s = seed.to_string();
        let args = [
            "--workload",
            "mixed",
            "--verify",
            "--ios",
            "12000",
            "--qd",
            "8",
            "--span-blocks",
            "2048",
            "--seed",
            &s,
            "--json",
        ];
        let node = &rig.node;
        runs.push(bench_during(&rig, &args, || {
            rig.wait_writes(0, 64);
            for c in 0..PER_POINT {
                let name = format!("k{point}c{c}");
                let generation = node.service("metadata")["generation"].as_u64().unwrap_or(0);
                let (code, out, err) =
                    node.ctl(&["volume", "create", &name, "--pool", "tank", "--size", "1m"]);
                assert_eq!(code, 1, "the hook did not crash the commit: {out}{err}");
                wait_restarted(node, "metadata", generation);
                let list = volumes_when_answering(node);
                let present = whole_or_absent(&list, &name);
                outcomes.push((name, present));
                // Every earlier change as it was found right after its own crash.
                for (n, p) in &outcomes {
                    assert_eq!(whole_or_absent(&list, n), *p, "{n} changed: {list}");
                }
            }
        }));
        rig.node.log.pump();
        let crashes = rig.node.log.matching(&["crash-in-commit: aborting"]).len();
        assert!(
            crashes >= PER_POINT,
            "{crashes} hook crashes at point {point}"
        );
    }
    // Without the hook: the same set, and the data verifies.
    assert_eq!(rig.node.stop(), Some(0));
    let hooked = format!("{plain}\nargs = [\"--crash-in-commit\", \"{POINTS}\"]");
    rig.node.edit_config(&hooked, plain);
    rig.port = relaunch_elsewhere(&mut rig.node, rig.port);
    rig.node.log.wait_for(&["metadata service ready"]);
    let list = volumes_when_answering(&rig.node);
    for (n, p) in &outcomes {
        assert_eq!(
            whole_or_absent(&list, n),
            *p,
            "{n} after a clean restart: {list}"
        );
    }
    for (code, out, err) in &runs {
        assert_eq!(*code, 0, "the host saw an error: {out}{err}");
        let v: serde_json::Value = serde_json::from_str(out).expect("JSON report");
        assert_eq!(v["verify"]["errors"], 0, "{out}");
    }
    let present = outcomes.iter().filter(|(_, p)| *p).count();
    eprintln!(
        "crashes inside commits: {}; changes present after their crash: {present}, absent: {}",
        outcomes.len(),
        outcomes.len() - present
    );
    assert_eq!(rig.node.stop(), Some(0));
}

// -- Import under corruption, through duplexd: the drives' backing files are damaged while the
//    node is down (the way a drive that lies or decays would present them); the next start
//    imports by the rule and repairs, or refuses with a clear error and writes nothing.

use duplex_ondisk::layout::{METADATA_OFFSET, METADATA_SLOTS, METADATA_SLOT_SIZE, SUPERBLOCK_SIZE};
use duplex_ondisk::{ImageHeader, Superblock};

/// Drive `i`'s backing file.
fn image_of(rig: &Rig, i: usize) -> std::path::PathBuf {
    rig.dir.path().join(format!("d{i}.img"))
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0; len];
    std::fs::File::open(path)
        .expect("backing file")
        .read_exact_at(&mut out, offset)
        .expect("read");
    out
}

/// Overwrites `len` bytes at `offset` with garbage.
fn scribble(path: &Path, offset: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let garbage: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ 0xa5)
        .collect();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("backing file");
    f.write_all_at(&garbage, offset).expect("write");
    f.sync_all().expect("sync");
}

fn secondary_offset(path: &Path) -> u64 {
    std::fs::metadata(path).expect("backing file").len() - SUPERBLOCK_SIZE
}

fn slot_offset(i: u32) -> u64 {
    METADATA_OFFSET + u64::from(i) * u64::from(METADATA_SLOT_SIZE)
}

/// The ring slot holding drive file `path`'s newest valid image header, and its generation.
fn newest_slot(path: &Path) -> Option<(u32, u64)> {
    (0..METADATA_SLOTS)
        .filter_map(|i| {
            ImageHeader::parse(&read_at(path, slot_offset(i), 4096))
                .ok()
                .map(|h| (i, h.generation))
        })
        .max_by_key(|&(_, g)| g)
}

/// Stops the node, lets `damage` act on the stopped drives, starts it again (new port) and
/// returns the metadata service's import line for pool `tank`.
fn restart_after(rig: &mut Rig, damage: impl FnOnce(&Rig)) -> String {
    assert_eq!(rig.node.stop(), Some(0));
    damage(rig);
    rig.port = relaunch_elsewhere(&mut rig.node, rig.port);
    let line = rig.node.log.wait_for(&["pool", "tank", "import"]);
    if line.contains("pool imported") {
        rig.node.wait_exported(SUBNQN);
    }
    line
}

/// Through duplexd: a corrupt primary superblock, a corrupt secondary superblock and a corrupt
/// newest metadata slot are each repaired from the winner at the next start (the repairs are on
/// the drive afterwards, the configuration is unchanged); all copies gone on one member: the
/// pool is imported from the other, degraded, and nothing is written to the blank drive; every
/// metadata slot corrupt on the remaining member too: the pool is not imported, the error says
/// why, and not one byte of either drive changes.
#[test]
fn damaged_metadata_is_repaired_or_refused_at_import_under_duplexd() {
    let mut rig = rig(2, "1");
    bench(
        rig.port,
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
    let before = snapshot(&rig.node);
    let healthy = json(&rig.node, &["pool", "show", "tank"])["pool"]["state"].clone();
    let repairs = |line: &str| duplex_tests::field(line, "repairs");

    // The primary superblock of d0.
    let line = restart_after(&mut rig, |r| scribble(&image_of(r, 0), 0, 4096));
    assert!(
        line.contains("pool imported") && repairs(&line) >= 1,
        "{line}"
    );
    Superblock::parse(&read_at(&image_of(&rig, 0), 0, 4096)).expect("d0's primary repaired");
    assert_eq!(snapshot(&rig.node), before);

    // The secondary superblock of d1.
    let line = restart_after(&mut rig, |r| {
        let p = image_of(r, 1);
        scribble(&p, secondary_offset(&p), 4096);
    });
    assert!(
        line.contains("pool imported") && repairs(&line) >= 1,
        "{line}"
    );
    let p1 = image_of(&rig, 1);
    Superblock::parse(&read_at(&p1, secondary_offset(&p1), 4096)).expect("d1's secondary repaired");
    assert_eq!(snapshot(&rig.node), before);

    // The newest metadata slot of d0.
    let (slot, generation) = newest_slot(&image_of(&rig, 0)).expect("an image on d0");
    let line = restart_after(&mut rig, |r| {
        scribble(&image_of(r, 0), slot_offset(slot), 8192)
    });
    assert!(
        line.contains("pool imported") && repairs(&line) >= 1,
        "{line}"
    );
    assert_eq!(
        newest_slot(&image_of(&rig, 0)),
        newest_slot(&image_of(&rig, 1)),
        "d0's newest slot rewritten from d1's (generation {generation})"
    );
    assert_eq!(snapshot(&rig.node), before);
    // The repairs stuck: the next start has nothing to repair.
    let line = restart_after(&mut rig, |_| {});
    assert!(
        line.contains("pool imported") && repairs(&line) == 0,
        "{line}"
    );
    bench(
        rig.port,
        &[&["--verify-only", "--qd", "16"][..], &SPAN].concat(),
    );

    // Every copy on d0: d0 looks blank, and an active member is missing (it may hold newer
    // metadata): the pool is not imported and neither drive is written to. The operator
    // retries, then forces the import: the missing member is failed on d1, the pool runs
    // degraded on d1 alone, the data is all there, and the next start imports it unforced.
    let uuid = json(&rig.node, &["pool", "show", "tank"])["pool"]["uuid"]
        .as_str()
        .expect("pool uuid")
        .to_owned();
    let blank = |p: &Path| {
        scribble(p, 0, 4096);
        scribble(p, secondary_offset(p), 4096);
        for i in 0..METADATA_SLOTS {
            scribble(p, slot_offset(i), 4096);
        }
    };
    assert_eq!(rig.node.stop(), Some(0));
    blank(&image_of(&rig, 0));
    let files: Vec<Vec<u8>> = (0..2)
        .map(|i| std::fs::read(image_of(&rig, i)).expect("drive"))
        .collect();
    rig.port = relaunch_elsewhere(&mut rig.node, rig.port);
    let line = rig.node.log.wait_for(&["pool not imported"]);
    assert!(
        line.contains("is missing") && line.contains(&uuid),
        "{line}"
    );
    rig.node.log.wait_for(&["metadata service ready"]);
    let drives = json(&rig.node, &["drive", "list"])["drives"].clone();
    assert_eq!(drives[1]["state"], "stale", "{drives}");
    assert_eq!(drives[1]["pool"], uuid.as_str(), "{drives}");
    let (code, out, err) = rig.node.ctl(&["pool", "import", &uuid]);
    assert_eq!(
        code, 1,
        "an unforced import of a pool missing a member: {out}{err}"
    );
    assert!(
        err.contains("is missing") && err.lines().count() == 1,
        "{err}"
    );
    for (i, want) in files.iter().enumerate() {
        let now = std::fs::read(image_of(&rig, i)).expect("drive");
        assert!(now == *want, "d{i} changed although the import was refused");
    }
    let out = ok(&rig.node, &["pool", "import", &uuid, "--force"]);
    assert!(out.contains("degraded"), "{out}");
    rig.node.wait_exported(SUBNQN);
    let pool = json(&rig.node, &["pool", "show", "tank"])["pool"].clone();
    assert_ne!(pool["state"], healthy, "{pool}");
    assert_eq!(member_states(&rig.node)[0], "failed", "{pool}");
    let after = snapshot(&rig.node);
    assert_eq!(
        (&after.1, &after.2),
        (&before.1, &before.2),
        "the same volumes and subsystems"
    );
    bench(
        rig.port,
        &[&["--verify-only", "--qd", "16"][..], &SPAN].concat(),
    );
    assert!(
        std::fs::read(image_of(&rig, 0)).expect("d0") == files[0],
        "the blank d0 was written to"
    );
    let line = restart_after(&mut rig, |_| {});
    assert!(
        line.contains("pool imported"),
        "the forced import is on disk: {line}"
    );
    assert_eq!(member_states(&rig.node)[0], "failed");
    assert_eq!(rig.node.stop(), Some(0));

    // Every metadata slot on d1 too: nothing left to import from. Refused, nothing written.
    let p1 = image_of(&rig, 1);
    for i in 0..METADATA_SLOTS {
        scribble(&p1, slot_offset(i), 4096);
    }
    let files: Vec<Vec<u8>> = (0..2)
        .map(|i| std::fs::read(image_of(&rig, i)).expect("drive"))
        .collect();
    rig.port = relaunch_elsewhere(&mut rig.node, rig.port);
    let line = rig.node.log.wait_for(&["pool not imported"]);
    assert!(line.contains("nothing was written"), "{line}");
    rig.node.log.wait_for(&["metadata service ready"]);
    let pools = json(&rig.node, &["pool", "list"])["pools"].clone();
    assert_eq!(pools.as_array().map(Vec::len), Some(0), "{pools}");
    let (code, out, err) = rig.node.ctl(&["pool", "import", &uuid, "--force"]);
    assert_eq!(code, 1, "no image left, even forced: {out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(rig.node.stop(), Some(0));
    for (i, want) in files.iter().enumerate() {
        let now = std::fs::read(image_of(&rig, i)).expect("drive");
        assert!(now == *want, "d{i} changed although the import was refused");
    }
    eprintln!("refused import: {line}");
}

/// A torn metadata write during a commit, through duplexd and under a verifying workload: drive
/// d0 (drive-sim `torn-write` over the metadata ring) persists only part of the new image and
/// loses power. The commit goes on: d0 is failed in the next generation, written to d1 before
/// duplexctl answers, and the change is there; the host sees no error. When d0 has power again
/// and the node restarts, d0 is stale by its superblock, its torn slot is never read, and the
/// pool, the change and the data come from d1; d0, back in its slot, is taken back and resynced
/// from d1 (the regions written while it was out), after which it alone serves every block.
#[test]
fn a_torn_metadata_write_during_a_commit_fails_the_member_and_import_follows_the_rule() {
    let mut rig = rig(2, "1");
    let bs = 4096;
    let first = METADATA_OFFSET / bs;
    let last =
        (METADATA_OFFSET + u64::from(METADATA_SLOTS) * u64::from(METADATA_SLOT_SIZE)) / bs - 1;
    let range = format!("{first}-{last}");
    let args = [
        "--workload",
        "mixed",
        "--verify",
        "--ios",
        "6000",
        "--qd",
        "16",
        "--span-blocks",
        "2048",
        "--seed",
        "41",
        "--json",
    ];
    let mut change = (0, String::new(), String::new());
    let (code, out, err) = bench_during(&rig, &args, || {
        rig.wait_writes(0, 64);
        let torn = [
            "inject",
            "torn-write",
            "--lba",
            &range,
            "--keep-bytes",
            "6144",
        ];
        rig.sim(0, &torn);
        change = rig
            .node
            .ctl(&["volume", "create", "torn", "--pool", "tank", "--size", "1m"]);
    });
    rig.node.log.pump();
    assert_eq!(
        change.0,
        0,
        "volume create during the torn write: {}{}\nnode log:\n{}",
        change.1,
        change.2,
        rig.node.log.tail(100000)
    );
    assert_eq!(code, 0, "the host saw an error: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(v["verify"]["errors"], 0, "{out}");
    let status = rig.sim(0, &["status"]);
    assert_eq!(
        status["powered"], false,
        "the torn write cut d0's power: {status}"
    );
    assert_eq!(member_states(&rig.node)[0], "failed");
    let torn = newest_slot(&image_of(&rig, 0));
    let whole = newest_slot(&image_of(&rig, 1)).expect("d1's images");
    assert!(
        torn.is_none_or(|(_, g)| g < whole.1),
        "d0's newest valid image ({torn:?}) is older than d1's ({whole:?})"
    );
    // Every block written again while d0 is out; power back, node restarted: d0's torn slot is
    // never read, the pool comes from d1, and d0 is taken back rebuilding (never read until
    // it is rebuilt: it holds none of these writes).
    let seq = "--workload write --verify --ios 2048 --span-blocks 2048 --seed 42 --qd 16";
    bench(rig.port, &seq.split(' ').collect::<Vec<_>>());
    rig.sim(0, &["power-on"]);
    let line = restart_after(&mut rig, |_| {});
    assert!(line.contains("pool imported"), "{line}");
    rig.node
        .log
        .wait_for(&["a failed member came back", "slot=0"]);
    let drives = json(&rig.node, &["drive", "list"])["drives"].clone();
    assert!(
        drives[0]["state"] == "rebuilding" || drives[0]["state"] == "active",
        "{drives}"
    );
    let verify = [
        "--verify-only",
        "--span-blocks",
        "2048",
        "--seed",
        "42",
        "--qd",
        "16",
    ];
    let list = volumes_when_answering(&rig.node);
    assert!(
        whole_or_absent(&list, "torn"),
        "the change is there: {list}"
    );
    bench(rig.port, &verify);
    rig.node
        .log
        .wait_for(&["rebuild complete: member active on disk"]);
    assert_eq!(member_states(&rig.node)[0], "active");
    // d1 pulled: every block from d0.
    rig.sim(1, &["pull"]);
    bench(rig.port, &verify);
    assert_eq!(rig.node.stop(), Some(0));
}

/// More volumes than one config reply holds (128): `volume list` pages through them all, in
/// name order, in the table and in JSON, and they all come back after a restart. (Before the
/// services ran with one malloc arena, the datapath died here of a sandbox kill about half the
/// time: glibc opening /proc/sys/vm/overcommit_memory when a thread's arena shrank.)
#[test]
fn volume_list_pages_past_one_reply() {
    let mut rig = Rig::new(&RigSpec {
        drives: 2,
        raid: "1",
        drive_mib: 512,
        volume_size: "16m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: None,
        spares: 0,
        metadata: 0,
    });
    const MORE: usize = 300;
    for i in 0..MORE {
        let name = format!("p{i:03}");
        let (code, out, err) = rig
            .node
            .ctl(&["volume", "create", &name, "--pool", "tank", "--size", "1m"]);
        if code != 0 {
            rig.node.log.pump();
            panic!(
                "volume create {name}: {out}{err}\n{}",
                rig.node.log.tail(40)
            );
        }
    }
    let check = |node: &Node| {
        let list = volumes_when_answering(node);
        let names: Vec<&str> = list
            .as_array()
            .expect("a list")
            .iter()
            .map(|v| v["name"].as_str().unwrap_or(""))
            .collect();
        let mut want: Vec<String> = (0..MORE).map(|i| format!("p{i:03}")).collect();
        want.push("vol0".into());
        assert_eq!(names, want, "every volume once, in name order");
        let table = ok(node, &["volume", "list"]);
        assert_eq!(table.lines().count(), MORE + 2, "a header and a line each");
    };
    check(&rig.node);
    // 97 namespaces in all (vol0 and 96 more): volume list pages by exports too (96 a reply),
    // and a list that cannot fit one reply (subsystem list) is refused in one line, at once.
    for i in 0..96 {
        ok(
            &rig.node,
            &["namespace", "add", SUBNQN, "--volume", &format!("p{i:03}")],
        );
    }
    check(&rig.node);
    let (code, out, err) = rig.node.ctl(&["subsystem", "list"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("does not fit one reply"), "{err}");
    let line = restart_after(&mut rig, |_| {});
    assert!(line.contains(&format!("volumes={}", MORE + 1)), "{line}");
    check(&rig.node);
    assert_eq!(rig.node.stop(), Some(0));
}

/// The datapath dies (SIGKILL): the node stops serving, and the services that need the
/// datapath (here the metadata service) are not restarted when they then die, instead of
/// failing to start over and over; mgmt still answers, so the operator sees why.
#[test]
fn after_the_datapath_dies_its_dependants_are_not_restarted() {
    let mut rig = rig(2, "1");
    let pid = rig.node.service("datapath")["pid"].as_u64().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the datapath");
    rig.node
        .log
        .wait_for(&["datapath died: node stops serving"]);
    let (code, out, err) = rig
        .node
        .ctl(&["service", "crash", "metadata", "--mode", "kill"]);
    assert_eq!(code, 0, "{out}{err}");
    rig.node
        .log
        .wait_for(&["service=metadata", "not restarted: the datapath is down"]);
    let row = rig.node.service("metadata");
    assert_eq!(row["state"], "failed", "{row}");
    assert_eq!(row["generation"], 1, "never started again: {row}");
    assert_eq!(rig.node.service("datapath")["state"], "failed");
    rig.node.log.pump();
    assert!(
        rig.node
            .log
            .matching(&["service spawned", "service=metadata", "generation=2"])
            .is_empty(),
        "metadata was spawned again"
    );
}
