//! The Linux kernel NVMe/TCP host (nvme-cli + fio, in a QEMU guest) against a node serving a
//! RAID-6 pool over four `duplex-drive-sim` drives and a spare. NEEDS: root (apt installs QEMU
//! and the guest's packages on first use) and QEMU; runs in TCG where KVM does not work, so it
//! is slow and speed says nothing about duplex.
//!
//! One guest (Debian bookworm-backports, Linux 6.12):
//! 1. connects to the subsystem (vol0 of pool `tank` as namespace 1);
//! 2. runs fio random write + crc32c verify passes back to back on it, each with its own seed,
//!    until this test says the rebuild is done; meanwhile, once fio's writes reach the drives,
//!    the test pulls a member (`duplex-drive-sim ctl pull`), replaces it by the spare
//!    (`duplexctl pool replace`), and waits for the rebuild under the host's load to finish;
//! 3. a verify-only pass of the last run reads everything back from the rebuilt pool.
//!
//! Every fio pass must end with no I/O and no verify error; afterwards the pool is online
//! with the spare active in the pulled member's slot, and a scrub finds the parity
//! consistent. Runs in `.ci/run`. `DUPLEX_INTEROP=off` skips it on a developer machine
//! without QEMU.

use std::time::Duration;

use duplex_tests::guest::{wait_guest_file, Guest, Kernel, RunSpec};
use duplex_tests::pool::{ctl_json, ctl_ok, member_states, wait_scrub, Rig, RigSpec};

const SUBNQN: &str = "nqn.2026-12.io.duplex:interop-raid6";
const HOSTID: &str = "2e8d6b41-4f5a-4b7c-9d1e-3a4b5c6d7e8f";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:2e8d6b41-4f5a-4b7c-9d1e-3a4b5c6d7e8f";
/// The drive pulled mid-run, and the spare that replaces it.
const VICTIM: usize = 2;
const SPARE: &str = "d4";

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
FIO="fio --name=v --ioengine=libaio --direct=1 --bs=4k --iodepth=16 --verify=crc32c --verify_fatal=1"

step connect
nvme connect -t tcp -a $A -s {port} -n $NQN -i 2 || die "connect"
wait_blk /dev/nvme0n1
nvme list

step fio write and verify passes while a member is pulled, replaced and rebuilt
touch pullme
seed=100
runs=0
while [ ! -f rebuilt ]; do
  seed=$((seed + 1))
  $FIO --filename=/dev/nvme0n1 --size=24M --randseed=$seed --rw=randwrite > fio.txt 2>&1 || {{ cat fio.txt; die "fio pass $seed"; }}
  runs=$((runs + 1))
  [ $runs -le 400 ] || die "the rebuild never finished"
done
tail -20 fio.txt
echo "fio passes: $runs"

step verify only, after the rebuild
$FIO --filename=/dev/nvme0n1 --size=24M --randseed=$seed --rw=randread --verify_only > fio2.txt 2>&1 || {{ cat fio2.txt; die "fio verify_only after the rebuild"; }}
tail -5 fio2.txt
dmesg | grep -i nvme | tail -10
nvme disconnect -n $NQN || die "disconnect"
echo ALL-OK
"#
    )
}

#[test]
fn linux_6_12_host_verifies_a_raid6_volume_while_a_member_is_pulled_and_rebuilt() {
    if std::env::var("DUPLEX_INTEROP").is_ok_and(|v| v == "off") {
        eprintln!("SKIPPED: DUPLEX_INTEROP=off (a developer switch; CI never sets it)");
        return;
    }
    let image = Guest::image(Kernel::Backports).expect("guest image");
    let mut rig = Rig::new(&RigSpec {
        drives: 4,
        raid: "6",
        drive_mib: 192,
        volume_size: "32m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: None,
        spares: 1,
        metadata: 0,
    });
    rig.node.log.wait_for(&["fabric ready"]);
    let spec = RunSpec::new(script(rig.port))
        .host(HOSTNQN, HOSTID)
        .memory_mib(1024)
        .cpus(2)
        .timeout(Duration::from_secs(1500))
        .label(format!("{} raid6", image.release));
    let guest = image.spawn(&spec).expect("guest");
    let share = guest.share().to_path_buf();
    let mut rebuilt = false;
    if wait_guest_file(&share, "pullme") {
        // Pulled once fio's writes are reaching the drive (not on a clock).
        rig.wait_writes(VICTIM, 64);
        rig.sim(VICTIM, &["pull"]);
        rig.node.log.wait_for(&["member failure recorded on disk"]);
        let victim = format!("d{VICTIM}");
        let out = ctl_ok(&rig.node, &["pool", "replace", "tank", &victim, SPARE]);
        assert!(out.contains("rebuilding"), "{out}");
        rig.node
            .log
            .wait_for(&["rebuild complete: member active on disk"]);
        std::fs::write(share.join("rebuilt"), b"1").expect("share");
        rebuilt = true;
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
    assert!(rebuilt, "the guest never asked for the pull");
    let states = member_states(&rig.node, "tank");
    assert_eq!(states, ["active"; 4], "{states:?}");
    let pool = ctl_json(&rig.node, &["pool", "show", "tank"]);
    assert_eq!(pool["pool"]["state"], "online", "{pool}");
    // The parity the rebuild and the host's writes left is consistent everywhere.
    ctl_ok(&rig.node, &["pool", "scrub", "tank"]);
    let scrub = wait_scrub(&rig.node, "tank");
    assert_eq!(scrub["mismatches"], 0, "{scrub}");
    assert_eq!(rig.node.stop(), Some(0));
}
