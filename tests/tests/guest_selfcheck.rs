//! Proves the guest harness against nothing duplex wrote: in one guest per kernel, the Linux
//! kernel's own NVMe/TCP target (nvmet, configured through configfs, null_blk namespace) on
//! 127.0.0.1:4420 and the Linux NVMe/TCP host with nvme-cli and fio, without and with header
//! and data digests.
//!
//! Slow under TCG (a build of about a minute per kernel when cold, then tens of seconds per
//! guest); runs in `.ci/run`, needs root (apt) the first time. `DUPLEX_GUEST_SELFCHECK=off` skips
//! it on a developer machine without QEMU.
#![allow(clippy::unwrap_used)] // test: a failed expectation is a test failure

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use duplex_tests::guest::{Guest, GuestRun, Kernel, RunSpec};

const NQN: &str = "nqn.2014-08.io.duplex:selfcheck";
const HOST_NQN: &str = "nqn.2014-08.io.duplex:host:selfcheck";
const HOST_ID: &str = "6b8c3f3e-6f0a-4c49-9d64-2f7c1f5f0c11";
const SERIAL: &str = "DPLXSELFCHECK01";

/// One guest at a time, also when the test harness runs both tests in parallel.
static ONE_GUEST: Mutex<()> = Mutex::new(());

/// The guest script: target setup, then the host flow twice (plain, then digests). Every
/// section starts with a `== name` line the assertions look for; `set -e` stops at the first
/// failing command.
fn script() -> String {
    let fio = "fio --name=v --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 \
               --rw=randwrite --bs=4k --iodepth=16 --size=16M --verify=crc32c";
    format!(
        r#"set -eu
NQN={NQN}
section() {{ echo "== $*"; }}
wait_for() {{ for i in $(seq 100); do [ -e "$1" ] && return 0; sleep 0.1; done; echo "no $1" >&2; return 1; }}

section target
modprobe null_blk nr_devices=1 gb=1 memory_backed=1 bs=4096
modprobe nvmet-tcp
T=/sys/kernel/config/nvmet
mkdir $T/subsystems/$NQN
echo 1 > $T/subsystems/$NQN/attr_allow_any_host
echo -n {SERIAL} > $T/subsystems/$NQN/attr_serial
mkdir $T/subsystems/$NQN/namespaces/1
echo -n /dev/nullb0 > $T/subsystems/$NQN/namespaces/1/device_path
echo 1 > $T/subsystems/$NQN/namespaces/1/enable
mkdir $T/ports/1
echo tcp > $T/ports/1/addr_trtype
echo ipv4 > $T/ports/1/addr_adrfam
echo 127.0.0.1 > $T/ports/1/addr_traddr
echo 4420 > $T/ports/1/addr_trsvcid
ln -s $T/subsystems/$NQN $T/ports/1/subsystems/$NQN
echo "hostnqn $(cat /etc/nvme/hostnqn) hostid $(cat /etc/nvme/hostid)"

flow() {{
  section "discover $1"
  nvme discover -t tcp -a 127.0.0.1 -s 4420
  section "connect $1"
  # -vv prints the option string handed to the kernel (digest flags included).
  nvme connect -t tcp -a 127.0.0.1 -s 4420 -n $NQN -i 2 $2 -vv 2>&1
  wait_for /dev/nvme0n1
  echo "transport $(cat /sys/class/nvme/nvme0/transport) state $(cat /sys/class/nvme/nvme0/state)"
  echo "queue_count $(cat /sys/class/nvme/nvme0/queue_count)"
  echo "ctrl hostnqn $(cat /sys/class/nvme/nvme0/hostnqn)"
  section "list $1"
  nvme list
  section "list-subsys $1"
  nvme list-subsys
  section "id-ctrl $1"
  nvme id-ctrl /dev/nvme0
  section "id-ns $1"
  nvme id-ns /dev/nvme0n1
  section "ana-log $1"
  nvme ana-log /dev/nvme0
  if [ "$1" = digests ]; then
    section "verify-only $1"
    {fio} --verify_only
  fi
  section "fio $1"
  {fio}
  section "disconnect $1"
  nvme disconnect -n $NQN
  [ ! -e /dev/nvme0n1 ] || {{ sleep 1; [ ! -e /dev/nvme0n1 ]; }}
}}
flow plain ""
flow digests "--hdr-digest --data-digest"
section dmesg
dmesg | grep -E 'nvme|nvmet' | tail -n 30
section done
"#
    )
}

/// True (after saying why) when `DUPLEX_GUEST_SELFCHECK=off`, a developer switch CI never sets.
/// Written past the test harness's capture so a log shows the skip.
fn skipped(what: &str) -> bool {
    if std::env::var_os("DUPLEX_GUEST_SELFCHECK").is_none_or(|v| v != "off") {
        return false;
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {what} (DUPLEX_GUEST_SELFCHECK=off)"
    );
    true
}

/// The text between `== name` and the next `== ` line.
fn section<'a>(run: &'a GuestRun, name: &str) -> &'a str {
    let head = format!("== {name}\n");
    let start = run
        .stdout
        .find(&head)
        .unwrap_or_else(|| panic!("no section {name:?}\n{}", run.report()))
        + head.len();
    let rest = &run.stdout[start..];
    &rest[..rest.find("\n== ").map_or(rest.len(), |i| i + 1)]
}

fn expect(run: &GuestRun, name: &str, wanted: &[&str]) {
    let text = section(run, name);
    for w in wanted {
        assert!(
            text.contains(w),
            "section {name:?} lacks {w:?}:\n{text}\n\n{}",
            run.report()
        );
    }
}

fn selfcheck(kernel: Kernel) {
    if skipped(&format!("the {kernel} guest selfcheck")) {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let image = Guest::image(kernel).unwrap_or_else(|e| panic!("{e}"));
    let built = t.elapsed();
    let spec = RunSpec::new(script())
        .host(HOST_NQN, HOST_ID)
        .cpus(2)
        .timeout(Duration::from_secs(900))
        .label(format!("selfcheck {kernel}"));
    let run = image.run(&spec).unwrap_or_else(|e| panic!("{e}"));
    // Straight to stderr (not captured): the figures are worth seeing in a passing run too.
    let _ = writeln!(
        std::io::stderr(),
        "selfcheck {kernel} ({}, {}): image {built:.1?}, boot to script {:.1?}, guest {:.1?}, \
         total {:.1?}",
        run.release,
        run.accel.name(),
        run.boot_time.unwrap_or_default(),
        run.wall_time,
        t.elapsed()
    );
    assert_eq!(run.exit_code, 0, "guest script failed:\n{}", run.report());
    let major_minor = match kernel {
        Kernel::Bookworm => "6.1.",
        Kernel::Backports => "6.12.",
    };
    assert!(
        run.release.starts_with(major_minor),
        "{kernel} booted {}",
        run.release
    );
    expect(
        &run,
        "target",
        &[&format!("hostnqn {HOST_NQN} hostid {HOST_ID}")],
    );
    for mode in ["plain", "digests"] {
        expect(
            &run,
            &format!("discover {mode}"),
            &[
                "Discovery Log Number of Records",
                &format!("subnqn:  {NQN}"),
                "trsvcid: 4420",
                "traddr:  127.0.0.1",
                "trtype:  tcp",
            ],
        );
        let digests = section(&run, &format!("connect {mode}")).contains("hdr_digest,data_digest");
        assert_eq!(
            digests,
            mode == "digests",
            "connect {mode}:\n{}",
            run.report()
        );
        expect(
            &run,
            &format!("connect {mode}"),
            &[
                &format!("nvme0: {NQN} connected"),
                "transport tcp state live",
                // The admin queue and the two I/O queues asked for with -i 2.
                "queue_count 3",
                &format!("ctrl hostnqn {HOST_NQN}"),
            ],
        );
        expect(
            &run,
            &format!("list {mode}"),
            &["/dev/nvme0n1", SERIAL, "Linux"],
        );
        expect(
            &run,
            &format!("list-subsys {mode}"),
            &[&format!("NQN={NQN}"), "tcp traddr=127.0.0.1,trsvcid=4420"],
        );
        expect(
            &run,
            &format!("id-ctrl {mode}"),
            &[
                "NVME Identify Controller",
                &format!("subnqn    : {NQN}"),
                SERIAL,
            ],
        );
        // 1 GiB null_blk in 4 KiB blocks.
        expect(&run, &format!("id-ns {mode}"), &["nsze    : 0x40000"]);
        expect(
            &run,
            &format!("ana-log {mode}"),
            &["Asymmetric Namespace Access Log", "state\t:\toptimized"],
        );
        // Written, then read back and verified: 4096 of each.
        expect(
            &run,
            &format!("fio {mode}"),
            &[
                "err= 0",
                "issued rwts: total=4096,4096,0,0",
                "WRITE: bw=",
                "READ: bw=",
            ],
        );
        expect(
            &run,
            &format!("disconnect {mode}"),
            &[&format!("NQN:{NQN} disconnected 1 controller(s)")],
        );
    }
    // After a disconnect and a reconnect (with digests), the data written before is still there:
    // read back and verified, nothing written.
    expect(
        &run,
        "verify-only digests",
        &["err= 0", "READ: bw=", "io=16.0MiB"],
    );
    assert!(
        !section(&run, "verify-only digests").contains("WRITE: bw="),
        "{}",
        run.report()
    );
    expect(&run, "done", &[]);
    assert!(
        !run.stdout.contains("verify: bad") && !run.stderr.contains("verify: bad"),
        "{}",
        run.report()
    );
}

#[test]
fn selfcheck_bookworm_kernel() {
    selfcheck(Kernel::Bookworm);
}

#[test]
fn selfcheck_backports_kernel() {
    selfcheck(Kernel::Backports);
}

/// The harness itself: exit code, stdout/stderr kept apart, files in and out, the host
/// identity (given and default), a forwarded port, and a timeout that kills QEMU.
#[test]
fn harness_reports_what_the_guest_did() {
    if skipped("the guest harness check") {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let image = Guest::image(Kernel::Bookworm).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    std::fs::write(&input, "input-from-host\n").unwrap();
    let port = duplex_tests::free_port();
    let script = r#"
echo out-line
echo err-line >&2
cat input.txt
echo written-by-guest > written.txt
echo "hostnqn $(cat /etc/nvme/hostnqn) hostid $(cat /etc/nvme/hostid)"
echo pong-from-guest > /tmp/msg
nc -l -p 7777 < /tmp/msg &
sleep 1
touch listening
wait
exit 3
"#;
    let spec = RunSpec::new(script)
        .host(HOST_NQN, HOST_ID)
        .file("input.txt", &input)
        .hostfwd(port, 7777)
        .timeout(Duration::from_secs(300))
        .label("harness");
    let guest = image.spawn(&spec).unwrap_or_else(|e| panic!("{e}"));
    assert!(guest.wait_ready(Duration::from_secs(240)), "never ready");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !guest.share().join("listening").exists() {
        assert!(Instant::now() < deadline, "the guest never listened");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut got = String::new();
    while !got.contains("pong-from-guest") {
        assert!(Instant::now() < deadline, "no answer on the forwarded port");
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::Read;
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap_or(0);
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let run = guest.wait().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run.exit_code, 3, "{}", run.report());
    assert!(run.stdout.contains("out-line\n"), "{}", run.report());
    assert!(!run.stdout.contains("err-line"), "{}", run.report());
    assert!(run.stderr.contains("err-line\n"), "{}", run.report());
    assert!(run.stdout.contains("input-from-host"), "{}", run.report());
    assert!(
        run.stdout
            .contains(&format!("hostnqn {HOST_NQN} hostid {HOST_ID}")),
        "{}",
        run.report()
    );
    assert_eq!(run.file("written.txt").unwrap(), b"written-by-guest\n");
    assert!(run.console().contains("DUPLEX-GUEST-RESULT 3"));
    assert!(run.boot_time.is_some_and(|b| b < run.wall_time));

    // Default identity, and a guest that outlives its timeout is killed and reported.
    let t = Instant::now();
    let spec = RunSpec::new("cat /etc/nvme/hostnqn /etc/nvme/hostid\nsleep 100000\n")
        .timeout(Duration::from_secs(60))
        .label("harness-timeout");
    match image.run(&spec) {
        Err(duplex_tests::guest::GuestError::Timeout {
            script_started,
            output,
            ..
        }) => {
            assert!(script_started);
            assert!(
                output.contains("nqn.2014-08.org.nvmexpress:uuid:"),
                "{output}"
            );
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(90));
}
