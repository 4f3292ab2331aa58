//! `duplex-bench --verify` against a whole duplex node (duplexd, datapath, fabric) over
//! loopback: a mixed verifying run passes; a block corrupted behind the target's back is found
//! by `--verify-only` and fails the run; bad arguments are one line and exit 2.

use std::os::unix::fs::FileExt;

use duplex_tests::{duplex_bench, free_port, storage_config, Node};

const SUBNQN: &str = "nqn.2026-11.io.duplex:bench";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:d0b1e5c4-0000-4000-8000-000000000001";

#[test]
fn duplex_bench_verifies_against_duplex_and_catches_corruption() {
    let volume = format!("/dev/shm/duplex-bench-test-{}.img", std::process::id());
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
        "bench",
        port,
        &format!("path = \"{volume}\"\nsize = \"64MiB\""),
        SUBNQN,
        HOSTNQN,
    ));
    node.log.wait_for(&["fabric ready"]);

    // A mixed verifying run on two queues: 4 KiB; 128 KiB with digests (read data copied to
    // compute them); 128 KiB without (read data sent straight from the pool, write data pulled
    // straight into it) with the host polling its sockets.
    for extra in [
        &["--bs", "4k"][..],
        &["--bs", "128k", "--digests"][..],
        &["--bs", "128k", "--busy-poll"][..],
    ] {
        let mut args = vec![
            "--workload",
            "mixed",
            "--verify",
            "--ios",
            "6000",
            "--qd",
            "16",
            "--queues",
            "2",
            "--json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = duplex_bench(port, SUBNQN, HOSTNQN, &args);
        assert_eq!(code, 0, "duplex-bench {args:?}: {out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
        assert_eq!(v["verify"]["errors"], 0, "{out}");
        assert!(
            v["verify"]["blocks_checked"].as_u64().unwrap_or(0) > 0,
            "{out}"
        );
        assert!(v["reads"].as_u64().unwrap_or(0) > 0 && v["writes"].as_u64().unwrap_or(0) > 0);
        assert!(v["latency_us"]["p99"].as_f64().unwrap_or(0.0) > 0.0);
    }

    // Write 64 blocks once, check them, corrupt one behind the target's back, check again.
    let span = ["--span-blocks", "64", "--seed", "9", "--qd", "4"];
    let (code, out, err) = duplex_bench(
        port,
        SUBNQN,
        HOSTNQN,
        &[
            &["--workload", "write", "--verify", "--ios", "64"][..],
            &span,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = duplex_bench(
        port,
        SUBNQN,
        HOSTNQN,
        &[&["--verify-only"][..], &span].concat(),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("64 blocks checked, 0 errors"), "{out}");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&volume)
        .expect("volume");
    f.write_all_at(b"rot!", 10 * 4096 + 100).expect("corrupt");
    let (code, out, _) = duplex_bench(
        port,
        SUBNQN,
        HOSTNQN,
        &[&["--verify-only"][..], &span].concat(),
    );
    assert_eq!(code, 1, "corruption must fail the run: {out}");
    assert!(
        out.contains("1 errors") && out.contains("block 10"),
        "{out}"
    );

    // Bad arguments: one line, exit 2.
    let (code, _, err) = duplex_bench(port, SUBNQN, HOSTNQN, &["--bs", "3q"]);
    assert_eq!(code, 2);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    node.stop();
}
