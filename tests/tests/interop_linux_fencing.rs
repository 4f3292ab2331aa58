//! The Linux kernel NVMe/TCP host (in a QEMU guest) against a cluster member that its peer
//! fences: the ANA states, the ANA change notice and the ANA log as the real host reads them.
//! NEEDS: root and QEMU (as the other interop tests); runs in TCG where KVM does not work.
//!
//! Per kernel (Debian bookworm 6.1 and bookworm-backports 6.12), one guest:
//! 1. connects to a node with `[cluster] node_id = 1` serving a RAID-1 pool over two
//!    `duplex-drive-sim` drives, writes and verifies with fio; the path is `optimized` (sysfs
//!    `ana_state`, `nvme ana-log`);
//! 2. asks this test to fence the node: the test, as the peer, joins and preempts the node's key
//!    through the drives' other ports, then sends one write of its own (`duplex-bench`), which
//!    the node answers with the path error as it learns it is fenced;
//! 3. waits, without I/O of its own (a Linux multipath host queues I/O while its only path is
//!    inaccessible), for the kernel to take the ANA change notice, read the ANA log and show
//!    the path `inaccessible` in sysfs; `nvme ana-log` says so too; then disconnects.
//!
//! Runs in `.ci/run`. `DUPLEX_INTEROP=off` skips it on a developer machine without QEMU.

use std::time::Duration;

use duplex_datapath::fence::FenceKey;
use duplex_tests::duplex_bench;
use duplex_tests::guest::{wait_guest_file, Guest, Kernel, RunSpec};
use duplex_tests::pool::{Rig, RigSpec};

const SUBNQN: &str = "nqn.2026-12.io.duplex:interop-fencing";
const HOSTID: &str = "5e1f0a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5e1f0a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b";

fn script(port: u16) -> String {
    format!(
        r#"
set -x
A=10.0.2.2
NQN={SUBNQN}
step() {{ echo "== $*"; }}
die() {{ echo "FAILED: $*"; exit 1; }}
wait_blk() {{
  for i in $(seq 1 600); do [ -b $1 ] && return 0; sleep 0.2; done
  die "no $1"
}}
wait_file() {{
  for i in $(seq 1 3000); do [ -f $1 ] && return 0; sleep 0.2; done
  die "the host test never wrote $1"
}}
ana_state() {{ cat /sys/class/nvme/nvme0/nvme0c*n1/ana_state 2>/dev/null || cat /sys/block/nvme0n1/ana_state 2>/dev/null; }}

step connect
nvme connect -t tcp -a $A -s {port} -n $NQN || die "connect"
wait_blk /dev/nvme0n1
ls /sys/class/nvme/nvme0/ /sys/class/nvme/nvme0/nvme0c*n1/ || true
ana_state > state-before.txt
cat state-before.txt
nvme ana-log /dev/nvme0 > ana-before.txt || die "ana-log"
cat ana-before.txt
fio --name=v --ioengine=libaio --direct=1 --bs=4k --iodepth=8 --verify=crc32c --verify_fatal=1 \
    --filename=/dev/nvme0n1 --size=8M --rw=randwrite > fio.txt 2>&1 || {{ cat fio.txt; die "fio"; }}

step fenced by the peer
touch fenceme
wait_file fenced
for i in $(seq 1 600); do
  s=$(ana_state)
  [ "$s" = "inaccessible" ] && break
  sleep 0.2
done
ana_state > state-after.txt
cat state-after.txt
grep -qx inaccessible state-after.txt || die "the path did not become inaccessible"
nvme ana-log /dev/nvme0 > ana-after.txt || die "ana-log after"
cat ana-after.txt
dmesg | grep -i nvme | tail -20
nvme disconnect -n $NQN || die "disconnect"
dmesg > dmesg.txt
echo ALL-OK
"#
    )
}

fn run(kernel: Kernel) {
    if std::env::var("DUPLEX_INTEROP").is_ok_and(|v| v == "off") {
        eprintln!("SKIPPED: DUPLEX_INTEROP=off (a developer switch; CI never sets it)");
        return;
    }
    let image = Guest::image(kernel).expect("guest image");
    let mut rig = Rig::new(&RigSpec {
        drives: 2,
        raid: "1",
        drive_mib: 256,
        volume_size: "32m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: Some(1),
        spares: 0,
        metadata: 0,
    });
    rig.node.log.wait_for(&["fabric ready"]);
    let spec = RunSpec::new(script(rig.port))
        .host(HOSTNQN, HOSTID)
        .memory_mib(1024)
        .cpus(2)
        .timeout(Duration::from_secs(1200))
        .label(format!("{} fencing", image.release));
    let guest = image.spawn(&spec).expect("guest");
    let share = guest.share().to_path_buf();
    let mut fenced = false;
    if wait_guest_file(&share, "fenceme") {
        // As the peer would: node 2 joins through the drives' ports B and preempts node 1.
        let mut peer = rig.peer_controllers(2, 0xC2);
        rig.fence_node(&mut peer, FenceKey::new(2, 1), 1);
        // The node learns it is fenced from its first drive command after the preempt.
        let (code, out, err) = duplex_bench(
            rig.port,
            SUBNQN,
            HOSTNQN,
            &["--workload", "write", "--ios", "1", "--qd", "1"],
        );
        assert_ne!(code, 0, "a fenced node acknowledged a write: {out}{err}");
        rig.node.log.wait_for(&["FENCED"]);
        std::fs::write(share.join("fenced"), b"1").expect("share");
        fenced = true;
    }
    let result = guest.wait().expect("guest result");
    eprintln!("{}", result.report());
    rig.node.log.pump();
    let out = &result.stdout;
    assert_eq!(
        result.exit_code,
        0,
        "guest script failed:\n{out}\n{}\nnode log tail:\n{}",
        result.stderr,
        rig.node.log.tail(40)
    );
    assert!(out.contains("ALL-OK"));
    assert!(fenced, "the guest never asked for the fence");
    let file = |n: &str| String::from_utf8_lossy(&result.file(n).unwrap_or_default()).into_owned();
    assert_eq!(file("state-before.txt").trim(), "optimized");
    assert_eq!(file("state-after.txt").trim(), "inaccessible");
    let (before, after) = (file("ana-before.txt"), file("ana-after.txt"));
    assert!(before.contains("optimized"), "{before}");
    assert!(after.contains("inaccessible"), "{after}");
    let dmesg = file("dmesg.txt");
    assert!(
        !dmesg.contains("disabling ANA support"),
        "the host disabled ANA:\n{dmesg}"
    );
}

#[test]
fn linux_6_12_host_sees_a_fenced_node_turn_inaccessible() {
    run(Kernel::Backports);
}

#[test]
fn linux_6_1_host_sees_a_fenced_node_turn_inaccessible() {
    run(Kernel::Bookworm);
}
