//! The Linux kernel NVMe/TCP host (nvme-cli + fio, in a QEMU guest) against a node serving a
//! RAID-1 pool over two `duplex-drive-sim` drives, configured with `duplexctl`. NEEDS: root
//! (apt installs QEMU and the guest's packages on first use) and QEMU; runs in TCG where KVM does
//! not work, so it is slow (minutes per kernel) and speed says nothing about duplex.
//!
//! Per kernel (Debian bookworm 6.1 and bookworm-backports 6.12), one guest:
//! 1. connects to the subsystem (vol0 of pool `tank` as namespace 1);
//! 2. asks this test (a file in the share) to add a namespace: the test runs `duplexctl volume
//!    create vol1` and `duplexctl namespace add --nsid 2` while the host stays connected; the
//!    guest must see `/dev/nvme0n2` and `nvme list` show it, with the same controller (same
//!    cntlid, no new controller in the kernel log): the Namespace Attribute Changed event, the
//!    Changed Namespace List log and the rescan, as the Linux host runs them;
//! 3. runs fio random write + crc32c verify on namespace 1 and, once fio's writes are reaching the
//!    drives, asks this test to pull the pool's second drive (`duplex-drive-sim ctl pull`): fio
//!    must end with no I/O and no verify error; then a verify-only pass reads it all back from
//!    the surviving member; fio write + verify on namespace 2 as well;
//! 4. the test checks the pulled member is failed on disk and the pool degraded.
//!
//! Runs in `.ci/run`. `DUPLEX_INTEROP=off` skips it on a developer machine without QEMU.

use std::time::Duration;

use duplex_tests::guest::{wait_guest_file, Guest, Kernel, RunSpec};
use duplex_tests::pool::{ctl_json, ctl_ok, member_states, Rig, RigSpec};

const SUBNQN: &str = "nqn.2026-12.io.duplex:interop-pools";
const HOSTID: &str = "1d9c7a52-3e4f-4a6b-8c0d-2f3a4b5c6d7e";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:1d9c7a52-3e4f-4a6b-8c0d-2f3a4b5c6d7e";
/// The drive pulled mid-run.
const VICTIM: usize = 1;

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
FIO="fio --name=v --ioengine=libaio --direct=1 --bs=4k --iodepth=16 --verify=crc32c --verify_fatal=1"

step connect
nvme connect -t tcp -a $A -s {port} -n $NQN -i 2 || die "connect"
wait_blk /dev/nvme0n1
nvme list > list1.txt
cat list1.txt
nvme id-ctrl /dev/nvme0 -o json > idctrl.json || die "id-ctrl json"
nvme ana-log /dev/nvme0 > ana.txt || die "ana-log"
cat ana.txt
cat /sys/class/nvme/nvme0/cntlid > cntlid-before.txt
dmesg | grep -c "new ctrl" > ctrls-before.txt

step a namespace added with duplexctl while connected
touch addns
wait_file added
wait_blk /dev/nvme0n2
nvme list > list2.txt
cat list2.txt
grep -q nvme0n2 list2.txt || die "nvme list does not show the added namespace"
cat /sys/class/nvme/nvme0/cntlid > cntlid-after.txt
cmp cntlid-before.txt cntlid-after.txt || die "the controller changed: the host reconnected"
dmesg | grep -c "new ctrl" > ctrls-after.txt
cmp ctrls-before.txt ctrls-after.txt || die "a new controller was created: the host reconnected"
nvme id-ns /dev/nvme0n2 > idns2.txt || die "id-ns of the added namespace"
dmesg | grep -i nvme | tail -20

step fio write and verify on the mirror while a member is pulled
$FIO --filename=/dev/nvme0n1 --size=32M --randseed=4242 --rw=randwrite > fio1.txt 2>&1 &
FIOPID=$!
touch pullme
wait_file pulled
kill -0 $FIOPID 2>/dev/null || die "fio ended before the member was pulled"
wait $FIOPID || {{ cat fio1.txt; die "fio across a member pull"; }}
tail -20 fio1.txt

step verify only, degraded
$FIO --filename=/dev/nvme0n1 --size=32M --randseed=4242 --rw=randread --verify_only > fio2.txt 2>&1 || {{ cat fio2.txt; die "fio verify_only on the degraded mirror"; }}
tail -5 fio2.txt

step fio write and verify on the added namespace
$FIO --filename=/dev/nvme0n2 --size=8M --randseed=77 --rw=randwrite > fio3.txt 2>&1 || {{ cat fio3.txt; die "fio on the added namespace"; }}
tail -5 fio3.txt
dmesg | grep -i nvme | tail -10
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
        volume_size: "64m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: None,
        spares: 0,
        metadata: 0,
    });
    rig.node.log.wait_for(&["fabric ready"]);
    let spec = RunSpec::new(script(rig.port))
        .host(HOSTNQN, HOSTID)
        .memory_mib(1024)
        .cpus(2)
        .timeout(Duration::from_secs(1500))
        .label(format!("{} pools", image.release));
    let guest = image.spawn(&spec).expect("guest");
    let share = guest.share().to_path_buf();
    let mut added = false;
    let mut pulled = false;
    if wait_guest_file(&share, "addns") {
        ctl_ok(
            &rig.node,
            &[
                "volume", "create", "vol1", "--pool", "tank", "--size", "16m",
            ],
        );
        ctl_ok(
            &rig.node,
            &[
                "namespace",
                "add",
                SUBNQN,
                "--volume",
                "vol1",
                "--nsid",
                "2",
            ],
        );
        std::fs::write(share.join("added"), b"1").expect("share");
        added = true;
        if wait_guest_file(&share, "pullme") {
            // Pulled once fio's writes are reaching the drive (not on a clock).
            rig.wait_writes(VICTIM, 64);
            rig.sim(VICTIM, &["pull"]);
            std::fs::write(share.join("pulled"), b"1").expect("share");
            pulled = true;
        }
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
    assert!(added && pulled, "the guest never asked for both steps");
    let file = |n: &str| String::from_utf8_lossy(&result.file(n).unwrap_or_default()).into_owned();
    assert!(
        file("list2.txt").contains("nvme0n2"),
        "{}",
        file("list2.txt")
    );
    assert!(
        !file("list1.txt").contains("nvme0n2"),
        "{}",
        file("list1.txt")
    );
    // An exported subsystem may use every ANA group id up to MAX_ANA_GROUP; the host must
    // read that and keep ANA on (a one-byte shift once made it compute a 1 MiB ANA log and
    // give up: "ANA log page size ... larger than MDTS ... disabling ANA support").
    let id: serde_json::Value =
        serde_json::from_str(&file("idctrl.json")).expect("nvme id-ctrl -o json");
    for (field, want) in [
        ("anatt", 10),
        ("anacap", 0x5f),
        ("anagrpmax", 128),
        ("nanagrpid", 128),
        ("cmic", 0b1011),
    ] {
        assert_eq!(
            id[field], want,
            "id-ctrl {field} as the Linux host reads it:\n{id}"
        );
    }
    let dmesg = file("dmesg.txt");
    assert!(
        !dmesg.contains("disabling ANA support"),
        "the host disabled ANA:\n{dmesg}"
    );
    assert!(
        file("ana.txt").to_lowercase().contains("optimized"),
        "{}",
        file("ana.txt")
    );
    let idns2 = file("idns2.txt");
    assert!(
        idns2.contains("nsze    : 0x1000"),
        "16 MiB of 4 KiB blocks in id-ns:\n{idns2}"
    );
    // The pulled member is failed on the drives, the pool degraded: and the host never knew.
    rig.node.log.wait_for(&["member failure recorded on disk"]);
    let states = member_states(&rig.node, "tank");
    assert_eq!(states[VICTIM], "failed", "{states:?}");
    let pool = ctl_json(&rig.node, &["pool", "show", "tank"]);
    assert_eq!(pool["pool"]["state"], "degraded", "{pool}");
    assert_eq!(rig.node.stop(), Some(0));
}

#[test]
fn linux_6_12_host_sees_a_namespace_added_and_verifies_across_a_member_pull() {
    run(Kernel::Backports);
}

#[test]
fn linux_6_1_host_sees_a_namespace_added_and_verifies_across_a_member_pull() {
    run(Kernel::Bookworm);
}
