//! The Linux kernel NVMe/TCP host (nvme-cli + fio, in a QEMU guest) against a whole duplex node
//! (duplexd, datapath, fabric, mgmt) on this machine. NEEDS: root (apt installs QEMU and the
//! guest's packages on first use) and QEMU; runs in TCG where KVM does not work, so it is slow
//! (minutes per kernel) and speed says nothing about duplex.
//!
//! The node runs two fabric I/O threads (`[fabric] io_threads = 2`): the host's queues are
//! dealt out over both, each thread with its own channel to the datapath.
//!
//! Per kernel (Debian bookworm 6.1 and bookworm-backports 6.12), one guest runs:
//! discovery on 8009 → connect with 2 I/O queues → `nvme list`, `id-ctrl`, `id-ns`, `ana-log`
//! → fio random write + crc32c verify (64 MiB, iodepth 16) → disconnect → reconnect → fio
//! verify-only → disconnect; then the same with header and data digests, during which the test
//! SIGKILLs the fabric service (the host reconnects by itself and fio must finish without an
//! I/O or verify error); finally a host NQN not on the allow-list must fail to connect.
//!
//! Runs in `.ci/run`. `DUPLEX_INTEROP=off` skips it on a developer machine without QEMU.

use std::time::Duration;

use duplex_tests::guest::{Guest, Kernel, RunSpec};
use duplex_tests::{free_port, Node};

const SUBNQN: &str = "nqn.2026-11.io.duplex:interop";
const HOSTID: &str = "6f1c2a4e-5b7d-4e8f-9a01-23456789abcd";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:6f1c2a4e-5b7d-4e8f-9a01-23456789abcd";

fn config(io_port: u16, disc_port: u16) -> String {
    format!(
        r#"
[node]
name = "interop"
state_dir = "{{state}}"

[supervisor]
heartbeat_ms = 100

[[service]]
name = "datapath"
kind = "datapath"

[[service]]
name = "fabric"
after = ["datapath"]

[[service]]
name = "mgmt"
binary = "{{mgmt}}"

# Two fabric I/O threads: the host's admin and I/O queues are dealt out over both.
[fabric]
io_threads = 2

[[listener]]
name = "nvme"
address = "127.0.0.1:{io_port}"
service = "fabric"

[[listener]]
name = "discovery"
address = "127.0.0.1:{disc_port}"
service = "fabric"
kind = "discovery"

[[volume]]
name = "vol0"
path = "vol0.img"
size = "256MiB"

[[subsystem]]
nqn = "{SUBNQN}"
hosts = ["{HOSTNQN}"]
namespaces = [{{ nsid = 1, volume = "vol0" }}]
"#
    )
}

fn script(io_port: u16, disc_port: u16) -> String {
    format!(
        r#"
set -x
A=10.0.2.2
NQN={SUBNQN}
step() {{ echo "== $*"; }}
die() {{ echo "FAILED: $*"; exit 1; }}
wait_dev() {{
  for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] && return 0; sleep 0.2; done
  die "no /dev/nvme0n1"
}}
gone_dev() {{
  for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] || return 0; sleep 0.2; done
  die "/dev/nvme0n1 stayed after disconnect"
}}
FIO="fio --name=v --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 --bs=4k --iodepth=16 --size=64M --verify=crc32c --verify_fatal=1 --randseed=4242"

step discover
nvme discover -t tcp -a $A -s {disc_port} > disc.txt || die "discover"
cat disc.txt
grep -q "$NQN" disc.txt || die "subsystem not in the discovery log"

step connect
nvme connect -t tcp -a $A -s {io_port} -n $NQN -i 2 || die "connect"
wait_dev
nvme list
nvme list-subsys
nvme id-ctrl /dev/nvme0 > idctrl.txt || die "id-ctrl"
nvme id-ctrl /dev/nvme0 -o json > idctrl.json || die "id-ctrl json"
nvme id-ns /dev/nvme0n1 > idns.txt || die "id-ns"
nvme id-ns /dev/nvme0n1 -o json > idns.json || true
nvme ns-descs /dev/nvme0n1 > descs.txt || true
nvme ana-log /dev/nvme0 > ana.txt || die "ana-log"
cat idctrl.txt | head -40; cat idns.txt | head -30; cat descs.txt; cat ana.txt
ls /sys/class/nvme/nvme0/ > sysfs.txt; cat /sys/class/nvme/nvme0/queue_count > queues.txt 2>/dev/null || true
cat /sys/block/nvme0c*n1/ana_state > ana_state.txt 2>/dev/null || true

step fio write and verify
$FIO --rw=randwrite > fio1.txt 2>&1 || {{ cat fio1.txt; die "fio write+verify"; }}
cat fio1.txt | tail -20
nvme disconnect -n $NQN || die "disconnect"
gone_dev

step reconnect and verify only
nvme connect -t tcp -a $A -s {io_port} -n $NQN -i 2 || die "reconnect"
wait_dev
$FIO --rw=randread --verify_only > fio2.txt 2>&1 || {{ cat fio2.txt; die "fio verify_only"; }}
nvme disconnect -n $NQN || die "disconnect"
gone_dev

step digests, with the fabric killed during fio
nvme connect -t tcp -a $A -s {io_port} -n $NQN -i 2 --hdr-digest --data-digest --reconnect-delay=1 --ctrl-loss-tmo=60 || die "connect with digests"
wait_dev
$FIO --rw=randwrite --randseed=777 > fio3.txt 2>&1 &
FIOPID=$!
sleep 5
touch killme
for i in $(seq 1 150); do [ -f killed ] && break; sleep 0.2; done
[ -f killed ] || die "the host test did not kill the fabric"
kill -0 $FIOPID 2>/dev/null || die "fio ended before the fabric was killed"
wait $FIOPID || {{ cat fio3.txt; die "fio across a fabric kill"; }}
cat fio3.txt | tail -20
dmesg | grep -i nvme | tail -20
dmesg | grep -q "reconnected" || die "the host never reconnected after the fabric was killed"
nvme id-ns /dev/nvme0n1 | grep -i nguid > nguid-after.txt
grep -i nguid idns.txt > nguid-before.txt
cmp nguid-before.txt nguid-after.txt || die "the NGUID changed across the fabric restart"

nvme disconnect -n $NQN || die "disconnect"
gone_dev
nvme connect -t tcp -a $A -s {io_port} -n $NQN -i 2 --hdr-digest --data-digest || die "reconnect with digests"
wait_dev
$FIO --rw=randread --randseed=777 --verify_only > fio4.txt 2>&1 || {{ cat fio4.txt; die "fio verify_only with digests"; }}
nvme disconnect -n $NQN || die "disconnect"

step a host that is not allowed
if nvme connect -t tcp -a $A -s {io_port} -n $NQN --hostnqn=nqn.2014-08.org.nvmexpress:uuid:00000000-dead-beef-0000-000000000000 > refused.txt 2>&1; then
  die "a host off the allow-list connected"
fi
cat refused.txt
dmesg | grep -i "nvme" | tail -5
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
    let (io_port, disc_port) = (free_port(), free_port());
    let mut node = Node::start(&config(io_port, disc_port));
    let ready = node.log.wait_for(&["fabric ready"]);
    assert!(ready.contains("io_threads=2"), "{ready}");
    let spec = RunSpec::new(script(io_port, disc_port))
        .host(HOSTNQN, HOSTID)
        .memory_mib(1024)
        .cpus(2)
        .timeout(Duration::from_secs(1500))
        .label(image.release.clone());
    let guest = image.spawn(&spec).expect("guest");
    // Kill the fabric while the digest run's fio is in flight.
    let killme = guest.share().join("killme");
    let deadline = std::time::Instant::now() + Duration::from_secs(1400);
    let mut killed = false;
    while std::time::Instant::now() < deadline {
        if killme.exists() {
            let (code, out, err) = node.ctl(&["service", "crash", "fabric", "--mode", "kill"]);
            assert_eq!(code, 0, "duplexctl crash fabric: {out}{err}");
            let _ = std::fs::write(guest.share().join("killed"), b"1");
            killed = true;
            break;
        }
        if guest.share().join("status").exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let result = guest.wait().expect("guest result");
    eprintln!("{}", result.report());
    node.log.pump();
    for l in node
        .log
        .matching(&["fabric"])
        .iter()
        .filter(|l| !l.contains("DEBUG"))
    {
        eprintln!("node: {l}");
    }
    let out = &result.stdout;
    assert_eq!(
        result.exit_code, 0,
        "guest script failed:\n{out}\n{}",
        result.stderr
    );
    assert!(out.contains("ALL-OK"));
    assert!(killed, "the fabric was never killed during fio");
    let file = |n: &str| String::from_utf8_lossy(&result.file(n).unwrap_or_default()).into_owned();
    let idctrl = file("idctrl.txt");
    assert!(
        idctrl.contains("mn        : duplex"),
        "model in id-ctrl:\n{idctrl}"
    );
    assert!(idctrl.contains(SUBNQN), "subnqn in id-ctrl");
    let idns = file("idns.txt");
    assert!(
        idns.contains("nsze    : 0x10000"),
        "65536 blocks in id-ns:\n{idns}"
    );
    assert!(
        !idns.contains("nguid   : 00000000000000000000000000000000"),
        "an NGUID"
    );
    // Identify Controller as the Linux host decodes it (nvme-cli's JSON), against the values
    // duplex means to report: the host's reading, not our decoder, is what counts.
    let id: serde_json::Value =
        serde_json::from_str(&file("idctrl.json")).expect("nvme id-ctrl -o json");
    for (field, want) in [
        ("anatt", 10),    // ANA transition time, seconds
        ("anacap", 0x5f), // optimized, non-optimized, inaccessible, persistent loss, change; grpid fixed
        ("anagrpmax", 1), // one ANA group (a file-configured subsystem: the node's group)
        ("nanagrpid", 1),
        ("cmic", 0b1011), // multi-port, multi-controller, ANA reporting
        ("mdts", 5),      // 128 KiB in 4 KiB pages
        ("oaes", 0x900),  // namespace attribute and ANA change notices
        ("kas", 10),      // keep alive granularity, 100 ms units
        ("sqes", 0x66),
        ("cqes", 0x44),
        ("maxcmd", 128),
        ("nn", 1),
        ("mnan", 1),
        ("vwc", 7),
        ("sgls", 0x10_0001),
        ("ioccsz", (64 + 8192) / 16),
        ("iorcsz", 1),
        ("icdoff", 0),
        ("msdbd", 1),
        ("cntrltype", 1),
    ] {
        assert_eq!(
            id[field], want,
            "id-ctrl {field} as the Linux host reads it:\n{id}"
        );
    }
    assert_eq!(id["subnqn"], SUBNQN);
    let dmesg = file("dmesg.txt");
    assert!(
        !dmesg.contains("disabling ANA support"),
        "the host disabled ANA:\n{dmesg}"
    );
    let ana = file("ana.txt");
    assert!(
        ana.to_lowercase().contains("optimized"),
        "ANA state optimized:\n{ana}"
    );
    assert!(file("ana_state.txt").contains("optimized"));
    assert!(file("disc.txt").contains(SUBNQN));
    let queues: u32 = file("queues.txt").trim().parse().unwrap_or(0);
    assert!(queues >= 3, "admin + at least 2 I/O queues, got {queues}");
    // The fabric came back as a new generation and the datapath never restarted.
    let (_, list, _) = node.ctl(&["service", "list", "--json"]);
    assert!(list.contains("\"fabric\""), "{list}");
    node.stop();
}

#[test]
fn linux_6_12_host_discovers_connects_and_verifies() {
    run(Kernel::Backports);
}

#[test]
fn linux_6_1_host_discovers_connects_and_verifies() {
    run(Kernel::Bookworm);
}
