//! The appliance image: `images/build` builds it (reproducibly: a second build gives the same
//! bytes; the manifest says what went in), `images/boot` boots it under QEMU (TCG) with two
//! emulated NVMe drives behind an emulated IOMMU and a config partition (node name, the number
//! of drives it must have, the remote management key), and it comes up serving: duplex's
//! datapath drives QEMU's NVMe controllers through VFIO, the console says
//! `DUPLEX-APPLIANCE-SERVING`. Then, from outside the VM:
//! 1. `duplexctl --connect` (TLS with the partition's key, through the forwarded port) is
//!    refused with a wrong key, and with the right one creates a RAID-1 pool, a volume, a
//!    subsystem, allows a host and exports the volume;
//! 2. the Linux host guest (Debian bookworm, 6.1) connects through the forwarded NVMe/TCP port
//!    and passes fio write + crc32c verify;
//! 3. the appliance VM loses power (QEMU killed) and boots again from the same drives and
//!    partition: the pool is imported (`duplexctl --connect pool list`), and a second 6.1 guest
//!    reads every block back and verifies it.
//!
//! Bad configurations boot to a clear console message and a node that serves nothing (no
//! panic, no silent hang): an unknown key on the kernel command line; a missing drive (the
//! partition wants three, the VM has two).
//!
//! NEEDS: root and QEMU (as the guest tests); `DUPLEX_INTEROP=off` skips it on a developer
//! machine without QEMU.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use duplex_nvme::tcp;
use duplex_tests::guest::{Guest, Kernel, RunSpec};
use duplex_tests::{free_port, KillOnDrop};

const SUBNQN: &str = "nqn.2026-12.io.duplex:appliance";
const HOSTID: &str = "5e0f3c1a-7b2d-4e6f-9a8b-0c1d2e3f4a5b";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5e0f3c1a-7b2d-4e6f-9a8b-0c1d2e3f4a5b";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Waits until the console log holds `marker` (the boot's own progress, read as it comes);
/// panics with the console if it says `DUPLEX-APPLIANCE-ERROR` first or QEMU ends.
fn wait_console(console: &Path, qemu: &mut KillOnDrop, marker: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text =
            String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).into_owned();
        if let Some(l) = text.lines().find(|l| l.contains(marker)) {
            return l.to_owned();
        }
        if marker != "DUPLEX-APPLIANCE-ERROR" && text.contains("DUPLEX-APPLIANCE-ERROR") {
            panic!("the appliance refused to serve:\n{text}");
        }
        if let Ok(Some(status)) = qemu.0.try_wait() {
            panic!("QEMU ended ({status}) before {marker:?}:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "no {marker:?} on the console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The forwarded ports of one boot.
#[derive(Clone, Copy)]
struct Ports {
    nvme: u16,
    mgmt: u16,
}

impl Ports {
    fn new() -> Self {
        Self {
            nvme: free_port(),
            mgmt: free_port(),
        }
    }
}

fn boot(
    image: &Path,
    state: &Path,
    config: Option<&Path>,
    console: &Path,
    ports: Ports,
    extra: &[&str],
) -> KillOnDrop {
    let _ = std::fs::remove_file(console);
    let mut cmd = Command::new(root().join("images/boot"));
    if let Some(dir) = config {
        cmd.env("CONFIG_DIR", dir);
    }
    let child = cmd
        .args(if extra.is_empty() {
            vec![]
        } else {
            [&["--"], extra].concat()
        })
        .env("IMAGE_DIR", image)
        .env("STATE", state)
        .env("CONSOLE", console)
        .env("NVME_PORT", ports.nvme.to_string())
        .env("MGMT_PORT", ports.mgmt.to_string())
        .env("DISCOVERY_PORT", free_port().to_string())
        .env("DRIVE_SIZE", "256M")
        .stdin(Stdio::null())
        .spawn()
        .expect("images/boot");
    KillOnDrop(child)
}

/// `duplexctl --connect 127.0.0.1:PORT --key-file KEY --timeout 120 ARGS` (a VM under TCG
/// may take a while to answer): exit code, stdout, stderr.
fn remote(port: u16, key: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let args = [&["--timeout", "120"][..], args].concat();
    duplex_tests::remote_ctl(&format!("127.0.0.1:{port}"), key, &args)
}

/// `remote`, which must succeed; its stdout.
fn remote_ok(port: u16, key: &Path, args: &[&str]) -> String {
    let args = [&["--timeout", "120"][..], args].concat();
    duplex_tests::remote_ctl_ok(&format!("127.0.0.1:{port}"), key, &args)
}

/// The Linux host guest's script: connect through the forwarded port, then fio (`mode`:
/// `write` writes and verifies, `verify` only reads back and verifies what `write` wrote).
fn host_script(nvme: u16, mode: &str) -> String {
    let fio = "fio --name=v --ioengine=libaio --direct=1 --bs=4k --iodepth=16 --verify=crc32c \\
  --verify_fatal=1 --filename=/dev/nvme0n1 --size=16M --randseed=1818";
    let run = if mode == "write" {
        format!("{fio} --rw=randwrite > fio.txt 2>&1 || {{ cat fio.txt; die fio write+verify; }}")
    } else {
        format!(
            "{fio} --rw=randread --verify_only > fio.txt 2>&1 || {{ cat fio.txt; die fio verify_only; }}"
        )
    };
    format!(
        r#"
set -x
die() {{ echo "FAILED: $*"; exit 1; }}
nvme connect -t tcp -a 10.0.2.2 -s {nvme} -n {SUBNQN} -i 1 || die connect
for i in $(seq 1 600); do [ -b /dev/nvme0n1 ] && break; sleep 0.2; done
[ -b /dev/nvme0n1 ] || die "no /dev/nvme0n1"
nvme list
{run}
tail -8 fio.txt
nvme disconnect -n {SUBNQN} || die disconnect
echo ALL-OK
"#
    )
}

fn host_guest(nvme: u16, mode: &str) {
    let image = Guest::image(Kernel::Bookworm).expect("guest image");
    let spec = RunSpec::new(host_script(nvme, mode))
        .host(HOSTNQN, HOSTID)
        .memory_mib(768)
        .timeout(Duration::from_secs(1200))
        .label(format!("{} host ({mode})", image.release));
    let result = image.run(&spec).expect("guest");
    eprintln!("{}", result.report());
    assert_eq!(
        result.exit_code, 0,
        "the Linux host ({mode}) failed:\n{}\n{}",
        result.stdout, result.stderr
    );
    assert!(result.stdout.contains("ALL-OK"), "{}", result.stdout);
}

#[test]
fn the_appliance_builds_reproducibly_serves_a_linux_host_survives_a_power_cut_and_refuses_bad_configs(
) {
    if std::env::var("DUPLEX_INTEROP").is_ok_and(|v| v == "off") {
        eprintln!("SKIPPED: DUPLEX_INTEROP=off (a developer switch; CI never sets it)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let image = target.join("appliance-test");
    let build = |what: &str| {
        let out = Command::new(root().join("images/build"))
            .arg(&image)
            .output()
            .expect("images/build");
        assert!(
            out.status.success(),
            "images/build ({what}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
        std::fs::read(image.join("initramfs.cpio")).expect("initramfs")
    };
    let first = build("first");
    let again = build("again");
    assert!(first == again, "a second build gave other bytes");
    let manifest = std::fs::read_to_string(image.join("manifest")).expect("manifest");
    for part in [
        "base: kernel linux-image-",
        "binary: ",
        "opt/duplex/bin/duplexd",
        "initramfs ",
    ] {
        assert!(
            manifest.contains(part),
            "manifest without {part:?}:\n{manifest}"
        );
    }

    // The config partition: name, drives, the remote management key.
    let config = dir.path().join("config");
    std::fs::create_dir(&config).expect("config dir");
    std::fs::write(
        config.join("duplex.conf"),
        "# the appliance under test\nname = app1\ndrives=2\n",
    )
    .expect("duplex.conf");
    let key = config.join("mgmt.key");
    let hex: String = (0..32u8)
        .map(|i| format!("{:02x}", i.wrapping_mul(73) ^ 0xc3))
        .collect();
    std::fs::write(&key, format!("{hex}\n")).expect("mgmt.key");
    let state = dir.path().join("state");
    let console = dir.path().join("console.log");
    let ports = Ports::new();
    let mut qemu = boot(&image, &state, Some(&config), &console, ports, &[]);
    let serving = wait_console(
        &console,
        &mut qemu,
        "DUPLEX-APPLIANCE-SERVING",
        Duration::from_secs(600),
    );
    eprintln!("{serving}");
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    for line in [
        "drive d0: ",
        "drive d1: ",
        "vfio-pci",
        "config partition /dev/vda: duplex.conf mgmt.key",
        "remote management on port 9440",
        "watchdog armed: softdog",
    ] {
        assert!(text.contains(line), "no {line:?} on the console:\n{text}");
    }
    // The forwarded NVMe/TCP port: an ICReq gets its ICResp from the appliance's fabric.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", ports.nvme)).expect("forwarded port");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let icreq = tcp::IcReq {
        pfv: 0,
        hpda: 0,
        digests: tcp::Digests::default(),
        maxr2t: 0,
    };
    s.write_all(&icreq.encode()).expect("ICReq");
    let mut resp = [0u8; 128];
    s.read_exact(&mut resp)
        .expect("ICResp through the forwarded port");
    assert_eq!(resp[0], tcp::PduType::IcResp as u8);
    drop(s);

    // Remote management: a wrong key is refused; the right one configures the node.
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, "5a".repeat(32)).expect("wrong key");
    let (code, out, err) = remote(ports.mgmt, &wrong, &["drive", "list"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("TLS handshake with"), "{err}");
    let drives: serde_json::Value =
        serde_json::from_str(&remote_ok(ports.mgmt, &key, &["--json", "drive", "list"]))
            .expect("drive list json");
    assert_eq!(
        drives["drives"].as_array().map(Vec::len),
        Some(2),
        "{drives}"
    );
    for args in [
        &["pool", "create", "tank", "--raid", "1", "--drives", "d0,d1"][..],
        &["volume", "create", "v0", "--pool", "tank", "--size", "48m"],
        &["subsystem", "create", SUBNQN],
        &["host", "allow", SUBNQN, HOSTNQN],
        &["namespace", "add", SUBNQN, "--volume", "v0"],
    ] {
        eprintln!("{}", remote_ok(ports.mgmt, &key, args).trim());
    }

    // The Linux host writes and verifies through the forwarded port.
    host_guest(ports.nvme, "write");

    // A power cut; the same drives and partition boot again.
    drop(qemu);
    let console2 = dir.path().join("console2.log");
    let ports2 = Ports::new();
    let mut qemu = boot(&image, &state, None, &console2, ports2, &[]);
    eprintln!(
        "{}",
        wait_console(
            &console2,
            &mut qemu,
            "DUPLEX-APPLIANCE-SERVING",
            Duration::from_secs(600),
        )
    );
    let pools: serde_json::Value =
        serde_json::from_str(&remote_ok(ports2.mgmt, &key, &["--json", "pool", "list"]))
            .expect("pool list json");
    let tank = &pools["pools"][0];
    assert_eq!(tank["name"], "tank", "{pools}");
    assert_eq!(tank["state"], "online", "{pools}");
    host_guest(ports2.nvme, "verify");
    drop(qemu);

    // Bad configurations: a clear message, nothing served, no panic.
    let refused_boot = |name: &str, config: Option<&Path>, extra: &[&str], want: &str| {
        let console = dir.path().join(format!("{name}.log"));
        let state = dir.path().join(format!("{name}-state"));
        let mut bad = boot(&image, &state, config, &console, Ports::new(), extra);
        let refused = wait_console(
            &console,
            &mut bad,
            "DUPLEX-APPLIANCE-ERROR",
            Duration::from_secs(600),
        );
        eprintln!("{name}: {refused}");
        assert!(refused.contains(want), "{refused}");
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(!text.contains("Kernel panic"), "{text}");
        assert!(!text.contains("DUPLEX-APPLIANCE-SERVING"), "{text}");
    };
    refused_boot(
        "unknown-key",
        None,
        &["duplex.bogus=1"],
        "unknown key bogus",
    );
    let three = dir.path().join("three");
    std::fs::create_dir(&three).expect("dir");
    std::fs::write(three.join("duplex.conf"), "drives=3\n").expect("duplex.conf");
    refused_boot(
        "missing-drive",
        Some(&three),
        &[],
        "missing drive: the configuration wants 3 NVMe drives, found 2",
    );
}
