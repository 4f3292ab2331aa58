//! Figures, not assertions: a whole node (duplexd, datapath, fabric) serving a tmpfs-backed
//! volume over loopback NVMe/TCP, driven by the tests' pipelined host (one connection, one I/O
//! queue), beside a reference measured in the same run: synchronous 4 KiB `pread`/`pwrite` on
//! the same file. Prints `FIGURE` lines; checks only that every I/O succeeded.
//!
//! The host here is a blocking test client, not a tuned load generator, and the node is a debug
//! or release build as the suite was built; the project's benchmark is `duplex-bench` (issue 5).

use std::os::unix::fs::FileExt;
use std::time::Instant;

use duplex_nvme::tcp::Digests;
use duplex_tests::nvme_host::{Host, Load, LoadResult};
use duplex_tests::{free_port, storage_config, Node};

const SUBNQN: &str = "nqn.2026-11.io.duplex:figures";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:0f0f0f0f-0000-4000-8000-000000000001";
const BLOCKS: u64 = 65536; // 256 MiB of 4 KiB blocks

fn print(name: &str, r: &LoadResult, io_size: usize) {
    eprintln!(
        "FIGURE {name:<28} {:>9.0} IOPS {:>8.1} MiB/s  mean latency {:>7.1} us  ({} I/Os in {:.2} s)",
        r.iops(),
        r.iops() * io_size as f64 / (1 << 20) as f64,
        r.mean_latency.as_secs_f64() * 1e6,
        r.ios,
        r.elapsed.as_secs_f64()
    );
}

#[test]
fn figures_io_over_loopback_against_a_tmpfs_volume() {
    let volume = format!("/dev/shm/duplex-figures-{}.img", std::process::id());
    let _ = std::fs::remove_file(&volume);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cleanup = Cleanup(volume.clone());
    let port = free_port();
    let mut node = Node::start(&storage_config(
        "figures",
        port,
        &format!("path = \"{volume}\"\nsize = \"256MiB\""),
        SUBNQN,
        HOSTNQN,
    ));
    node.log.wait_for(&["fabric ready"]);
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    let none = Digests::default();
    let (mut admin, cntlid) = Host::admin_as(addr, none, SUBNQN, HOSTNQN);
    let set = duplex_nvme::cmd::Sqe {
        opcode: duplex_nvme::spec::admin::SET_FEATURES,
        cdw10: u32::from(duplex_nvme::spec::feat::NUM_QUEUES),
        ..Default::default()
    };
    assert!(admin.admin_cmd(set, 0).0.is_success());
    let mut q = Host::dial(addr, none);
    assert!(q.connect(1, cntlid, SUBNQN, HOSTNQN).status().is_success());

    let load = |write, random, io_size, queue_depth, ios| Load {
        write,
        random,
        io_size,
        queue_depth,
        ios,
        block_size: 4096,
        blocks: BLOCKS,
    };
    // Fill the volume first so reads read written data.
    let fill = q.run_load(load(true, false, 128 << 10, 16, (BLOCKS / 32) as usize));
    print("128KiB seq write QD16", &fill, 128 << 10);
    let r = q.run_load(load(false, false, 128 << 10, 16, 4096));
    print("128KiB seq read QD16", &r, 128 << 10);
    for (name, write, qd, ios) in [
        ("4KiB randread QD1", false, 1, 5_000),
        ("4KiB randread QD32", false, 32, 40_000),
        ("4KiB randwrite QD1", true, 1, 5_000),
        ("4KiB randwrite QD32", true, 32, 40_000),
    ] {
        let r = q.run_load(load(write, true, 4096, qd, ios));
        print(name, &r, 4096);
    }

    // Reference, same run, same file: synchronous 4 KiB pread / pwrite from this process.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&volume)
        .expect("volume file");
    let mut buf = vec![0u8; 4096];
    let mut x: u64 = 12345;
    for write in [false, true] {
        let n = 100_000u64;
        let t = Instant::now();
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % BLOCKS) * 4096;
            if write {
                f.write_all_at(&buf, off).expect("pwrite");
            } else {
                f.read_exact_at(&mut buf, off).expect("pread");
            }
        }
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "FIGURE reference: 4KiB rand {} (sync, same tmpfs file) {:>9.0} IOPS  mean {:>6.2} us",
            if write { "pwrite" } else { "pread" },
            n as f64 / secs,
            secs / n as f64 * 1e6
        );
    }
    node.stop();
}
