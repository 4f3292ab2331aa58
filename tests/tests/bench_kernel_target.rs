//! `duplex-bench --verify` against a target nobody here wrote: the Linux kernel's nvmet
//! (nvmet-tcp, a memory-backed null_blk namespace) in a QEMU guest, reached through a forwarded
//! port. Proves the host library and the load generator conform (Connect, Identify, queues,
//! in-capsule data, R2T, C2HData, digests). Functional only: the guest runs in software
//! emulation, so its speed means nothing. NEEDS root (apt) and QEMU, like the interop tests;
//! `DUPLEX_INTEROP=off` skips it on a developer machine.

use std::process::Command;
use std::time::{Duration, Instant};

use duplex_tests::guest::{Guest, Kernel, RunSpec};
use duplex_tests::{bin, free_port};

const NQN: &str = "nqn.2026-11.io.duplex:kernel-target";

const SCRIPT: &str = r#"set -eu
NQN=nqn.2026-11.io.duplex:kernel-target
modprobe null_blk nr_devices=1 gb=1 memory_backed=1 bs=4096
modprobe nvmet-tcp
T=/sys/kernel/config/nvmet
mkdir $T/subsystems/$NQN
echo 1 > $T/subsystems/$NQN/attr_allow_any_host
mkdir $T/subsystems/$NQN/namespaces/1
echo -n /dev/nullb0 > $T/subsystems/$NQN/namespaces/1/device_path
echo 1 > $T/subsystems/$NQN/namespaces/1/enable
mkdir $T/ports/1
echo tcp > $T/ports/1/addr_trtype
echo ipv4 > $T/ports/1/addr_adrfam
echo 0.0.0.0 > $T/ports/1/addr_traddr
echo 4420 > $T/ports/1/addr_trsvcid
ln -s $T/subsystems/$NQN $T/ports/1/subsystems/$NQN
echo target up
touch target-ready
while [ ! -e stop ]; do sleep 0.2; done
dmesg | grep -i nvmet | tail -n 20
echo STOPPED
"#;

#[test]
fn duplex_bench_verifies_against_the_linux_kernel_target() {
    if std::env::var("DUPLEX_INTEROP").is_ok_and(|v| v == "off") {
        eprintln!("SKIPPED: DUPLEX_INTEROP=off (a developer switch; CI never sets it)");
        return;
    }
    let image = Guest::image(Kernel::Backports).expect("guest image");
    let port = free_port();
    let spec = RunSpec::new(SCRIPT)
        .hostfwd(port, 4420)
        .memory_mib(1536)
        .timeout(Duration::from_secs(900))
        .label(format!("nvmet {}", image.release));
    let guest = image.spawn(&spec).expect("guest");
    let ready = guest.share().join("target-ready");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the kernel target never came up");
        assert!(
            !guest.share().join("status").exists(),
            "the guest ended before the target was up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let target = format!("127.0.0.1:{port}");
    let run = |args: &[&str]| {
        let out = Command::new(bin("duplex-bench"))
            .args(["--target", &target, "--nqn", NQN])
            .args(args)
            .output()
            .expect("duplex-bench runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("duplex-bench {args:?}: {text}");
        (out.status.code().unwrap_or(-1), text)
    };
    let mut results = Vec::new();
    for args in [
        &[
            "--workload",
            "mixed",
            "--verify",
            "--ios",
            "1500",
            "--qd",
            "8",
            "--queues",
            "2",
        ][..],
        &[
            "--workload",
            "mixed",
            "--verify",
            "--ios",
            "300",
            "--qd",
            "4",
            "--bs",
            "64k",
            "--digests",
        ][..],
        &[
            "--workload",
            "write",
            "--verify",
            "--ios",
            "64",
            "--span-blocks",
            "64",
            "--seed",
            "5",
        ][..],
        &[
            "--verify-only",
            "--span-blocks",
            "64",
            "--seed",
            "5",
            "--digests",
        ][..],
    ] {
        results.push(run(args));
    }
    let _ = std::fs::write(guest.share().join("stop"), b"1");
    let guest_run = guest.wait().expect("guest result");
    for (code, text) in &results {
        assert_eq!(*code, 0, "{text}");
        assert!(text.contains(" 0 errors"), "{text}");
    }
    assert!(
        results[3].1.contains("64 blocks checked"),
        "{}",
        results[3].1
    );
    assert!(
        guest_run.stdout.contains("STOPPED"),
        "{}",
        guest_run.report()
    );
}
