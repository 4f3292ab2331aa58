//! Host reservations with the Linux kernel host (issue 17), in a QEMU guest with native NVMe
//! multipath over both controllers of a two-node array.
//! NEEDS: root and QEMU (as the other interop tests); runs in TCG where KVM does not work.
//!
//! Per kernel (Debian bookworm 6.1 and bookworm-backports 6.12), one guest is host A (its own
//! host NQN and host identifier); host B is this test process (another host NQN and host
//! identifier, `duplex_tests::resv`):
//! 1. A connects both paths, reads Identify Controller (ONCS reservations bit) and Identify
//!    Namespace (RESCAP) as nvme-cli decodes them, registers with Persist Through Power Loss
//!    set (`nvme resv-register`), acquires Write Exclusive (`nvme resv-acquire`), reports
//!    (`nvme resv-report`, extended) and writes as the holder;
//! 2. B registers through the owner: its writes meet Reservation Conflict, its reads succeed;
//! 3. the owner is killed whole; the peer takes the pool over; A reports through the peer:
//!    the same holder, type and generation;
//! 4. B preempts and aborts A through the peer: A's writes now fail, its reads succeed, and its
//!    report shows B alone holding;
//! 5. the whole array goes down and comes back (both nodes killed and started again): A's
//!    report shows the same registrations (PTPL).
//!
//! Runs in `.ci/run`. `DUPLEX_INTEROP=off` skips it on a developer machine without QEMU.

use std::path::Path;
use std::time::Duration;

use duplex_nvme::spec::io;
use duplex_tests::guest::{wait_guest_file, Guest, Kernel, RunSpec};
use duplex_tests::pair::{Pair, HOSTNQN, SUBNQN};
use duplex_tests::resv::{conflict, ok, Io};

/// Host A's (the guest's) host identifier, and its bytes as the kernel sends them.
const HOSTID: &str = "9a1e0000-0000-4000-8000-000000000001";
/// Host B (this process).
const HOSTNQN_B: &str = "nqn.2014-08.org.nvmexpress:uuid:9a1e0000-0000-4000-8000-0000000000b2";
const HOST_B: [u8; 16] = [0xB2; 16];
const KEY_A: u64 = 0xA1A1;
const KEY_B: u64 = 0xB2B2;

fn script(port_a: u16, port_b: u16) -> String {
    format!(
        r#"
set -x
A=10.0.2.2
NQN={SUBNQN}
DEV=/dev/nvme0n1
step() {{ echo "== $*"; }}
die() {{ echo "FAILED: $*"; dmesg | tail -60; exit 1; }}
wait_blk() {{
  for i in $(seq 1 600); do [ -b $1 ] && return 0; sleep 0.2; done
  die "no $1"
}}
wait_file() {{
  for i in $(seq 1 3000); do [ -f $1 ] && return 0; sleep 0.2; done
  die "the host test never wrote $1"
}}
paths() {{
  for c in /sys/class/nvme/nvme*; do
    grep -q "$NQN" $c/subsysnqn 2>/dev/null || continue
    port=$(sed -n 's/.*trsvcid=\([0-9]*\).*/\1/p' $c/address)
    st=$(cat $c/state)
    ana=$(cat $c/nvme*c*n1/ana_state 2>/dev/null | head -1)
    echo "$port $st $ana"
  done | sort
}}
path_of() {{ paths | awk -v p=$1 '$1 == p {{ print $2 " " $3 }}'; }}
EDS=--cdw11=1
nvme resv-report --help 2>&1 | grep -q -- '--eds' && EDS=--eds
report() {{ nvme resv-report $DEV $EDS -o json > $1 || die "resv-report $1"; cat $1; }}
write_block() {{ dd if=/dev/urandom of=$DEV bs=4k count=1 seek=$1 oflag=direct 2>&1; }}
read_block() {{ dd if=$DEV of=/dev/null bs=4k count=1 skip=$1 iflag=direct 2>&1; }}

step connect both paths
nvme connect -t tcp -a $A -s {port_a} -n $NQN || die "connect a"
nvme connect -t tcp -a $A -s {port_b} -n $NQN || die "connect b"
wait_blk $DEV
for i in $(seq 1 300); do [ "$(path_of {port_b})" = "live inaccessible" ] && break; sleep 0.2; done
paths
nvme id-ctrl /dev/nvme0 -o json > idctrl.json || die "id-ctrl"
nvme id-ns $DEV -o json > idns.json || die "id-ns"

step register, acquire Write Exclusive, report, write as the holder
nvme resv-register $DEV --nrkey={KEY_A} --rrega=0 --cptpl=3 || die "resv-register"
nvme resv-acquire $DEV --crkey={KEY_A} --rtype=1 --racqa=0 || die "resv-acquire"
report report-1.json
write_block 100 || die "the holder's write"
touch held
wait_file hostb-checked

step the owner killed
touch killme
wait_file killed
for i in $(seq 1 600); do [ "$(path_of {port_b})" = "live optimized" ] && break; sleep 0.2; done
paths
report report-2.json
write_block 101 || die "the holder's write through the peer"
touch reported

step preempted by host B
wait_file preempted
if write_block 102; then echo wrote > after-preempt.txt; else echo refused > after-preempt.txt; fi
read_block 102 && echo ok > read-after-preempt.txt
report report-3.json
touch checked

step the whole array restarted
wait_file restarted
for i in $(seq 1 900); do
  nvme resv-report $DEV $EDS -o json > report-4.json 2>/dev/null && break
  sleep 0.2
done
cat report-4.json
paths
dmesg > dmesg.txt
nvme disconnect -n $NQN || true
echo ALL-OK
"#
    )
}

/// What `nvme resv-report -o json` says: generation, type, and each registrant's (key,
/// holds). Read leniently: nvme-cli versions name the registrant list differently, and print
/// numbers as numbers or as hex strings.
fn parse_report(text: &str) -> (u64, u64, Vec<(u64, bool)>) {
    let v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("resv-report JSON ({e}): {text}"));
    let num = |v: &serde_json::Value| -> u64 {
        match v {
            serde_json::Value::Number(n) => n.as_u64().unwrap_or(u64::MAX),
            serde_json::Value::String(s) => {
                let s = s.trim();
                s.strip_prefix("0x")
                    .map(|h| u64::from_str_radix(h, 16))
                    .unwrap_or_else(|| s.parse())
                    .unwrap_or(u64::MAX)
            }
            _ => u64::MAX,
        }
    };
    fn entries(v: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
        match v {
            serde_json::Value::Object(m) if m.contains_key("rkey") => out.push(v.clone()),
            serde_json::Value::Object(m) => m.values().for_each(|x| entries(x, out)),
            serde_json::Value::Array(a) => a.iter().for_each(|x| entries(x, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    entries(&v, &mut found);
    let mut regs: Vec<(u64, bool)> = found
        .iter()
        .map(|e| (num(&e["rkey"]), num(&e["rcsts"]) & 1 == 1))
        .collect();
    regs.sort_unstable();
    (num(&v["gen"]), num(&v["rtype"]), regs)
}

fn run(kernel: Kernel) {
    if std::env::var("DUPLEX_INTEROP").is_ok_and(|v| v == "off") {
        eprintln!("SKIPPED: DUPLEX_INTEROP=off (a developer switch; CI never sets it)");
        return;
    }
    let image = Guest::image(kernel).expect("guest image");
    let mut p = Pair::on_loopback(50, 600);
    let (code, out, err) = p.nodes[0].ctl(&["host", "allow", SUBNQN, HOSTNQN_B]);
    assert_eq!(code, 0, "{out}{err}");
    let (port_a, port_b) = (p.at.nvme[0].port(), p.at.nvme[1].port());
    let spec = RunSpec::new(script(port_a, port_b))
        .host(HOSTNQN, HOSTID)
        .memory_mib(1024)
        .cpus(2)
        .timeout(Duration::from_secs(1200))
        .label(format!("{} reservations", image.release));
    let guest = image.spawn(&spec).expect("guest");
    let share = guest.share().to_path_buf();
    let touch = |share: &Path, name: &str| std::fs::write(share.join(name), b"1").expect("share");

    let mut steps = Vec::new();
    let mut seen_by_b = None;
    if wait_guest_file(&share, "held") {
        // Host B through the owner.
        let mut b = Io::connect(p.at.nvme[0], SUBNQN, HOSTNQN_B, HOST_B);
        ok(b.register(0, 0, 0, KEY_B), "B registers");
        conflict(b.rw(io::WRITE, 200), "B writes under A's Write Exclusive");
        ok(b.rw(io::READ, 200), "B reads under A's Write Exclusive");
        seen_by_b = Some(b.report());
        touch(&share, "hostb-checked");
        steps.push("b");
    }
    if wait_guest_file(&share, "killme") {
        p.node(0).kill_all();
        p.node(1).log.wait_for(&["pool taken over", "tank"]);
        touch(&share, "killed");
        steps.push("killed");
    }
    if wait_guest_file(&share, "reported") {
        let mut b = Io::connect(p.at.nvme[1], SUBNQN, HOSTNQN_B, HOST_B);
        ok(b.acquire(2, 1, KEY_B, KEY_A), "B preempts and aborts A");
        ok(b.rw(io::WRITE, 201), "B writes as the holder");
        touch(&share, "preempted");
        steps.push("preempted");
    }
    if wait_guest_file(&share, "checked") {
        // The whole array down, then up: node 2 (the owner now) first, then node 1.
        p.node(1).kill_all();
        p.node(1).relaunch();
        p.node(1).wait_exported(SUBNQN);
        p.node(0).relaunch();
        p.node(0).wait_exported(SUBNQN);
        touch(&share, "restarted");
        steps.push("restarted");
    }
    let result = guest.wait().expect("guest result");
    eprintln!("{}", result.report());
    let out = &result.stdout;
    p.node(1).log.pump();
    assert_eq!(
        result.exit_code,
        0,
        "guest script failed:\n{out}\n{}\nnode 2 log tail:\n{}",
        result.stderr,
        p.node(1).log.tail(40)
    );
    assert!(out.contains("ALL-OK"));
    assert_eq!(steps, ["b", "killed", "preempted", "restarted"]);
    let file = |n: &str| String::from_utf8_lossy(&result.file(n).unwrap_or_default()).into_owned();

    // What the real host decodes from Identify: reservations supported, every type.
    let id: serde_json::Value = serde_json::from_str(&file("idctrl.json")).expect("id-ctrl JSON");
    assert_eq!(id["oncs"].as_u64().map(|o| o & 0x20), Some(0x20), "{id}");
    let ns: serde_json::Value = serde_json::from_str(&file("idns.json")).expect("id-ns JSON");
    assert_eq!(ns["rescap"], 255, "{ns}");

    // A holds Write Exclusive (type 1), alone registered.
    let r1 = parse_report(&file("report-1.json"));
    assert_eq!((r1.1, &r1.2), (1, &vec![(KEY_A, true)]), "{r1:?}");
    // B registered: its own report (through the owner) and A's (through the peer, after the
    // takeover) agree on holder, type and generation.
    let (gen_b, type_b, regs_b) = seen_by_b.expect("host B's report");
    assert_eq!(type_b, 1);
    assert_eq!(
        gen_b as u64,
        r1.0 + 1,
        "B's registration bumps the generation"
    );
    let mut keys_b: Vec<(u64, bool)> = regs_b.iter().map(|r| (r.1, r.2)).collect();
    keys_b.sort_unstable();
    let r2 = parse_report(&file("report-2.json"));
    assert_eq!(
        r2,
        (u64::from(gen_b), 1, keys_b),
        "the report through the peer"
    );
    // Preempted: A's write refused (Reservation Conflict), its read served; B alone holds.
    assert_eq!(file("after-preempt.txt").trim(), "refused", "{out}");
    assert_eq!(file("read-after-preempt.txt").trim(), "ok", "{out}");
    let r3 = parse_report(&file("report-3.json"));
    assert_eq!((r3.1, &r3.2), (1, &vec![(KEY_B, true)]), "{r3:?}");
    assert!(r3.0 > r2.0, "preempt bumps the generation: {r3:?} {r2:?}");
    // After the whole array restarted: the same (Persist Through Power Loss).
    assert_eq!(
        parse_report(&file("report-4.json")),
        r3,
        "after the array restart"
    );
}

#[test]
fn linux_6_12_host_reservations_survive_takeover_and_restart() {
    run(Kernel::Backports);
}

#[test]
fn linux_6_1_host_reservations_survive_takeover_and_restart() {
    run(Kernel::Bookworm);
}
