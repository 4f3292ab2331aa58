//! duplex's user-space NVMe driver (`duplex-nvme-check --vfio`) against QEMU's emulated NVMe
//! controller through the Linux kernel's VFIO, inside a QEMU guest with an emulated Intel IOMMU
//! (`intel-iommu,caching-mode=on,aw-bits=39`, `intel_iommu=on`), on both Debian kernels (6.1 and
//! 6.12), one guest at a time. The guest binds the NVMe function to `vfio-pci` (the `nvme` driver
//! is never loaded); the tool, built on this machine, opens the group and container, maps BAR0 and
//! its DMA memory, brings the controller up, identifies it, creates two I/O queue pairs, writes a
//! pattern over the first 64 MiB, flushes, reads it back and compares; the test then finds the
//! pattern in the disk image behind the emulated drive. A request larger than the namespace must
//! fail cleanly (exit 1, no panic). A second namespace is formatted with 8 bytes of metadata a
//! block in a separate buffer (`nvme-ns,ms=8,mset=0`): the tool writes duplex's integrity record
//! with every block (at MPTR) and checks every record read back, and the test finds each record
//! where QEMU keeps a namespace's metadata (after its data in the image), checked by the
//! record's definition written out here, not by the datapath's code.
//!
//! The tool and the shared libraries it needs (with their dynamic loader) travel in the 9p share,
//! so the guest's initramfs libraries never have to match this machine's build.
//!
//! About 10-15 s per kernel under TCG (boot 5-7 s, the 64 MiB verify about 2 s); runs in
//! `.ci/run`, needs root (apt) the first time like the other guest tests. `DUPLEX_VFIO_GUEST=off`
//! skips it on a developer machine without QEMU.
#![allow(clippy::unwrap_used)] // test: a failed expectation is a test failure

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use duplex_tests::guest::{Accel, Guest, GuestRun, Kernel, RunSpec};

/// The emulated drive's serial number.
const SERIAL: &str = "DPLXVFIO1";
/// The emulated drive's size.
const DISK_MIB: u64 = 128;
/// What the driver writes and verifies.
const VERIFY_MIB: u64 = 64;
/// The namespace with metadata: its image, and what the driver writes and checks on it.
const MD_DISK_MIB: u64 = 32;
const MD_VERIFY_MIB: u64 = 16;

/// The guest script. Every section starts with a `== name` line; `set -e` stops at the first
/// failing command (each tool run is bounded by `timeout`).
fn script() -> String {
    format!(
        r#"set -eu
section() {{ echo "== $*"; }}
now() {{ cut -d' ' -f1 /proc/uptime; }}

section setup
# The tool and its libraries, off the 9p share onto tmpfs.
mkdir -p /tmp/dx
for f in $(cat libs.txt) duplex-nvme-check; do cp "$f" /tmp/dx/; done
chmod 755 /tmp/dx/*
check() {{ lim=$1; shift; timeout "$lim" /tmp/dx/ld-linux-x86-64.so.2 --library-path /tmp/dx /tmp/dx/duplex-nvme-check "$@"; }}
dmesg | grep -E 'DMAR: (IOMMU enabled|Host address width)|Intel\(R\) Virtualization' || true
modprobe vfio_iommu_type1
modprobe vfio-pci
bdf=
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/class")" = 0x010802 ] && bdf=${{d##*/}}
done
[ -n "$bdf" ] || {{ echo "no NVMe function (class 0x010802) in /sys/bus/pci/devices" >&2; exit 1; }}
D=/sys/bus/pci/devices/$bdf
echo "bdf $bdf vendor $(cat $D/vendor) device $(cat $D/device)"
if [ -e $D/driver ]; then
  echo "unbinding $bdf from $(basename "$(readlink $D/driver)")"
  echo "$bdf" > $D/driver/unbind
fi
echo vfio-pci > $D/driver_override
echo "$bdf" > /sys/bus/pci/drivers_probe
group=$(basename "$(readlink $D/iommu_group)")
echo "driver $(basename "$(readlink $D/driver)") group $group devices $(ls /sys/kernel/iommu_groups/$group/devices | xargs)"
echo "reserved regions:"; cat /sys/kernel/iommu_groups/$group/reserved_regions
[ -c /dev/vfio/$group ] || {{ echo "no /dev/vfio/$group" >&2; ls -l /dev/vfio >&2; exit 1; }}
ls /dev/vfio | xargs echo "dev/vfio:"

section identify
t=$(now)
check 120 --vfio "$bdf" identify
check 120 --vfio "$bdf" --json identify > identify.json
cat identify.json
echo "identify took $(echo "$(now) $t" | awk '{{printf "%.1f", $1 - $2}}') s"

section verify
t=$(now)
check 600 --vfio "$bdf" --json verify --mib {VERIFY_MIB} --queues 2 > verify.json
cat verify.json
echo "verify took $(echo "$(now) $t" | awk '{{printf "%.1f", $1 - $2}}') s"

section records
check 120 --vfio "$bdf" --nsid 2 --json identify > identify2.json
cat identify2.json
t=$(now)
check 600 --vfio "$bdf" --nsid 2 --json verify --mib {MD_VERIFY_MIB} --queues 2 > records.json
cat records.json
echo "records took $(echo "$(now) $t" | awk '{{printf "%.1f", $1 - $2}}') s"

section too-big
rc=0
check 120 --vfio "$bdf" verify --mib 100000 --queues 2 > too-big.out 2>&1 || rc=$?
cat too-big.out
echo "exit $rc"

section dmesg
dmesg | grep -iE 'vfio|dmar|iommu|nvme' | tail -n 30 || true
section done
"#
    )
}

/// True (after saying why) when `DUPLEX_VFIO_GUEST=off`, a developer switch CI never sets.
fn skipped() -> bool {
    if std::env::var_os("DUPLEX_VFIO_GUEST").is_none_or(|v| v != "off") {
        return false;
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: the kernel VFIO guest test (DUPLEX_VFIO_GUEST=off)"
    );
    true
}

/// The shared libraries `bin` needs, and its dynamic loader, as `ldd` resolves them here.
fn shared_libraries(bin: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(bin).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ldd {}: {text}", bin.display());
    let libs: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    assert!(
        libs.iter()
            .any(|l| l.file_name().is_some_and(|n| n == "ld-linux-x86-64.so.2")),
        "no dynamic loader in ldd {}: {text}",
        bin.display()
    );
    libs
}

/// `duplex-nvme-check verify`'s pattern (seed 1, its default) for block `lba`: the test's own
/// copy, to check the disk image on this side of the emulator.
fn pattern(seed: u64, lba: u64, out: &mut [u8]) {
    let mut x = seed ^ lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
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

fn json(run: &GuestRun, file: &str) -> serde_json::Value {
    let bytes = run
        .file(file)
        .unwrap_or_else(|e| panic!("{e}\n{}", run.report()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{file} is not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&bytes),
            run.report()
        )
    })
}

/// The seconds a section reports with `... took N s`.
fn took(run: &GuestRun, name: &str) -> f64 {
    section(run, name)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} took "))?.strip_suffix(" s"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// One guest at a time, also when the test harness runs both tests in parallel.
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn driver_through_kernel_vfio(kernel: Kernel) {
    if skipped() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let image = Guest::image(kernel).unwrap_or_else(|e| panic!("{e}"));
    let built = t.elapsed();
    let tool = duplex_tests::bin("duplex-nvme-check");
    let libs = shared_libraries(&tool);

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("nvme.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_MIB << 20)
        .unwrap();
    let names: Vec<String> = libs
        .iter()
        .map(|l| l.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let md_disk = dir.path().join("nvme-md.img");
    std::fs::File::create(&md_disk)
        .unwrap()
        .set_len(MD_DISK_MIB << 20)
        .unwrap();
    let list = dir.path().join("libs.txt");
    std::fs::write(&list, names.join("\n") + "\n").unwrap();

    // The IOMMU is realised before the NVMe function (and the harness's own devices). Under KVM
    // interrupt remapping needs the split irqchip; TCG has no such thing. A 39-bit address
    // width (QEMU's default is 48) like many real Intel IOMMUs: the driver's IOVAs must fit.
    let mut qemu: Vec<String> = Vec::new();
    if image.accel().unwrap_or_else(|e| panic!("{e}")) == Accel::Kvm {
        qemu.extend(["-machine".into(), "kernel-irqchip=split".into()]);
    }
    qemu.extend([
        "-device".into(),
        "intel-iommu,intremap=on,caching-mode=on,aw-bits=39".into(),
        "-drive".into(),
        format!("file={},if=none,id=d0,format=raw", disk.display()),
        "-drive".into(),
        format!("file={},if=none,id=d1,format=raw", md_disk.display()),
        "-device".into(),
        format!("nvme,id=nvme0,serial={SERIAL}"),
        "-device".into(),
        "nvme-ns,drive=d0,bus=nvme0,nsid=1".into(),
        "-device".into(),
        "nvme-ns,drive=d1,bus=nvme0,nsid=2,ms=8,mset=0,logical_block_size=4096,physical_block_size=4096".into(),
    ]);
    let mut spec = RunSpec::new(script())
        .cmdline("intel_iommu=on")
        .memory_mib(1024)
        .qemu_args(qemu)
        .file("duplex-nvme-check", &tool)
        .file("libs.txt", &list)
        .timeout(Duration::from_secs(600))
        .label(format!("vfio {kernel}"));
    for (name, lib) in names.iter().zip(&libs) {
        spec = spec.file(name.clone(), lib);
    }
    let run = image.run(&spec).unwrap_or_else(|e| panic!("{e}"));
    let _ = writeln!(
        std::io::stderr(),
        "vfio guest {kernel} ({}, {}): image {built:.1?}, boot to script {:.1?}, identify {:.1} s, \
         verify {:.1} s, guest {:.1?}, total {:.1?}",
        run.release,
        run.accel.name(),
        run.boot_time.unwrap_or_default(),
        took(&run, "identify"),
        took(&run, "verify"),
        run.wall_time,
        t.elapsed()
    );
    assert_eq!(run.exit_code, 0, "guest script failed:\n{}", run.report());
    let setup = section(&run, "setup");
    assert!(
        setup.contains("driver vfio-pci group "),
        "the NVMe function is not bound to vfio-pci:\n{setup}\n{}",
        run.report()
    );

    // Identify: QEMU's controller, our serial, the namespace the disk image makes.
    let id = json(&run, "identify.json");
    let report = || format!("identify: {id}\n{}", run.report());
    assert_eq!(id["vid"], 0x1b36, "{}", report());
    assert!(
        id["model"]
            .as_str()
            .is_some_and(|m| m.contains("QEMU NVMe")),
        "{}",
        report()
    );
    assert_eq!(id["serial"], SERIAL, "{}", report());
    assert!(
        id["io_queues"].as_u64().is_some_and(|q| q >= 1),
        "{}",
        report()
    );
    let blocks = id["blocks"].as_u64().unwrap_or(0);
    let block_size = id["block_size"].as_u64().unwrap_or(0);
    assert_eq!(blocks * block_size, DISK_MIB << 20, "{}", report());

    // Verify: 64 MiB written and read back over two queue pairs, with no controller reset.
    let v = json(&run, "verify.json");
    let report = || format!("verify: {v}\n{}", run.report());
    assert_eq!(v["verified_bytes"], VERIFY_MIB << 20, "{}", report());
    assert!(v["queues"].as_u64().is_some_and(|q| q >= 2), "{}", report());
    assert_eq!(v["resets"], 0, "{}", report());

    // More than the namespace holds: a clear error, exit 1, no panic.
    let too_big = section(&run, "too-big");
    assert!(
        too_big.contains("exit 1\n")
            && too_big.contains("100000 MiB is more than the namespace's")
            && !too_big.contains("panicked"),
        "an oversized verify should fail cleanly:\n{too_big}\n{}",
        run.report()
    );
    // On the medium (the image file behind QEMU's controller): the pattern over the first
    // 64 MiB, block by block, and nothing beyond (the oversized request wrote nothing).
    let image_bytes = std::fs::read(&disk).unwrap();
    assert_eq!(image_bytes.len() as u64, DISK_MIB << 20);
    let bs = block_size as usize;
    let mut want = vec![0u8; bs];
    let (written, rest) = image_bytes.split_at((VERIFY_MIB << 20) as usize);
    for (lba, got) in written.chunks(bs).enumerate() {
        pattern(1, lba as u64, &mut want);
        assert!(
            got == want,
            "block {lba} of the disk image does not hold the pattern the driver wrote"
        );
    }
    assert!(
        rest.iter().all(|&b| b == 0),
        "the disk image was written beyond the first {VERIFY_MIB} MiB"
    );

    // The namespace with metadata: 8 bytes a block in a separate buffer, as QEMU identifies
    // it; every block the tool wrote carries its record, checked on the way back.
    let id2 = json(&run, "identify2.json");
    let report = || format!("identify nsid 2: {id2}\n{}", run.report());
    assert_eq!(id2["metadata_size"], 8, "{}", report());
    assert_eq!(id2["metadata_extended"], false, "{}", report());
    assert_eq!(id2["block_size"], 4096, "{}", report());
    let md_blocks = id2["blocks"].as_u64().unwrap_or(0);
    // QEMU sizes such a namespace as the image over (block + metadata) bytes.
    assert_eq!(md_blocks, (MD_DISK_MIB << 20) / (4096 + 8), "{}", report());
    let r = json(&run, "records.json");
    let report = || format!("records: {r}\n{}", run.report());
    let written = (MD_VERIFY_MIB << 20) / 4096;
    assert_eq!(r["verified_bytes"], MD_VERIFY_MIB << 20, "{}", report());
    assert_eq!(r["metadata_size"], 8, "{}", report());
    assert_eq!(r["records_checked"], written, "{}", report());
    assert_eq!(r["resets"], 0, "{}", report());
    // On the medium: block i's data at i × 4096, its metadata at (blocks × 4096) + i × 8 (QEMU
    // keeps a namespace's metadata after its data). The record: the sequence number's low 32
    // bits big endian (the tool numbers block i with seed 1 + i), then CRC-32C big endian over
    // "DPX1", the LBA (u64 little endian), the sequence (u32 little endian) and the data.
    let md_image = std::fs::read(&md_disk).unwrap();
    let moff = (md_blocks * 4096) as usize;
    let mut want = vec![0u8; 4096];
    for lba in 0..written {
        let data = &md_image[(lba * 4096) as usize..((lba + 1) * 4096) as usize];
        pattern(1, lba, &mut want);
        assert!(
            data == want,
            "block {lba} of the namespace with metadata: not the pattern"
        );
        let rec = &md_image[moff + lba as usize * 8..moff + lba as usize * 8 + 8];
        let seq = (1 + lba) as u32;
        let mut h = Vec::with_capacity(16 + 4096);
        h.extend_from_slice(b"DPX1");
        h.extend_from_slice(&lba.to_le_bytes());
        h.extend_from_slice(&seq.to_le_bytes());
        h.extend_from_slice(data);
        assert_eq!(
            rec,
            [
                &seq.to_be_bytes()[..],
                &crc32c::crc32c(&h).to_be_bytes()[..]
            ]
            .concat(),
            "block {lba}'s metadata on QEMU's medium is not its record"
        );
    }
    assert!(
        md_image[moff + written as usize * 8..]
            .iter()
            .all(|&b| b == 0),
        "metadata written beyond the blocks the tool wrote"
    );

    // No DMA fault (the IOMMU would have refused an address the driver did not map) and no
    // kernel trouble, on the console or in the log the script printed.
    let console = run.console();
    let dmesg = section(&run, "dmesg");
    for bad in ["DRHD: handling fault", "DMAR: [DMA ", "BUG:", "Call Trace"] {
        assert!(
            !console.contains(bad) && !dmesg.contains(bad),
            "the guest kernel logged {bad:?}:\n{}",
            run.report()
        );
    }
}

#[test]
fn duplex_driver_through_kernel_vfio_bookworm_kernel() {
    driver_through_kernel_vfio(Kernel::Bookworm);
}

#[test]
fn duplex_driver_through_kernel_vfio_backports_kernel() {
    driver_through_kernel_vfio(Kernel::Backports);
}
