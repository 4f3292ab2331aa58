//! End-to-end integrity through a whole node: a RAID-1 pool on two `duplex-drive-sim` drives
//! formatted with 8 bytes of metadata a block (`--metadata 8`), so that the datapath keeps an
//! integrity record beside every block. Blocks of the volume rot on the drives' media (one bit
//! each, the record left as it was: `duplex-drive-sim ctl rot`); the host reads everything
//! back verified through the fabric and sees only the data it wrote; `duplexctl drive list`
//! counts the bad blocks per drive, `pool show` the reads served from the good copy and the
//! copies rewritten, and every bad copy is counted once (it was rewritten when first met). A
//! block rotten on both copies fails the host's read with a media error — never wrong data —
//! and is counted as unrecoverable.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use duplex_ondisk::layout::Layout;
use duplex_tests::pool::{ctl_json as json, ctl_ok as ok, wait_scrub, Rig, RigSpec};
use duplex_tests::{bin, duplex_bench, free_port};

const SUBNQN: &str = "nqn.2026-12.io.duplex:integrity";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:d0b1e5c4-0000-4000-8000-000000000016";
const DRIVE_MIB: u64 = 128;
/// Blocks of the volume the host writes and reads (4 KiB each; the volume is 16 MiB).
const SPAN: u64 = 4096;

fn bench(port: u16, args: &str) -> (i32, serde_json::Value, String) {
    let args: Vec<&str> = args.split(' ').collect();
    let (code, out, err) = duplex_bench(port, SUBNQN, HOSTNQN, &[&args[..], &["--json"]].concat());
    let report = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
    (code, report, format!("{out}{err}"))
}

/// Each drive's CKSUM count, by name.
fn cksum(rig: &Rig) -> Vec<(String, u64)> {
    json(&rig.node, &["drive", "list"])["drives"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            (
                d["name"].as_str().unwrap_or("").to_owned(),
                d["integrity_errors"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

fn integrity(rig: &Rig) -> serde_json::Value {
    json(&rig.node, &["pool", "show", "tank"])["pool"]["integrity"].clone()
}

#[test]
fn rotten_blocks_on_a_mirror_never_reach_the_host_and_are_rewritten() {
    let rig = Rig::new(&RigSpec {
        drives: 2,
        raid: "1",
        drive_mib: DRIVE_MIB,
        volume_size: "16m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: None,
        spares: 0,
        metadata: 8,
    });
    assert_eq!(cksum(&rig), vec![("d0".into(), 0), ("d1".into(), 0)]);
    // Every block of the span written once, verified.
    let write =
        format!("--workload write --verify --ios {SPAN} --span-blocks {SPAN} --seed 61 --qd 16");
    let (code, r, text) = bench(rig.port, &write);
    assert_eq!(code, 0, "{text}");
    assert_eq!(r["verify"]["errors"], 0, "{text}");
    // The volume is the first extent of the pool: block b of it is block data + b of each
    // member.
    let data = Layout::for_drive(DRIVE_MIB << 20, 4096)
        .expect("layout")
        .data_offset
        / 4096;
    // 24 blocks rot on d0, 24 others on d1, spread over the span (odd and even blocks on
    // each: which copy a read goes to is the datapath's business).
    let mut rotten = Vec::new();
    for k in 0..48u64 {
        let drive = (k / 2 % 2) as usize;
        let b = (k * 83 + 7) % SPAN;
        let lba = (data + b).to_string();
        let bit = (k * 977).to_string();
        rig.sim(drive, &["rot", "--lba", &lba, "--bit", &bit]);
        rotten.push((drive, b));
    }
    // The host reads everything back, four times over (reads alternate between the copies):
    // all of it right.
    let verify = format!("--verify-only --span-blocks {SPAN} --seed 61 --qd 16");
    for pass in 0..4 {
        let (code, r, text) = bench(rig.port, &verify);
        assert_eq!(code, 0, "pass {pass}: {text}");
        assert_eq!(r["verify"]["blocks_checked"], SPAN, "pass {pass}: {text}");
        assert_eq!(r["verify"]["errors"], 0, "pass {pass}: {text}");
    }
    let counts = cksum(&rig);
    let found: u64 = counts.iter().map(|c| c.1).sum();
    let i = integrity(&rig);
    // Bad copies were met on both drives, each at most once (rewritten when met, so a later
    // read of it is good), and every one met was served from the good copy and rewritten.
    assert!(counts.iter().all(|c| c.1 > 0), "{counts:?}");
    assert!(
        found <= rotten.len() as u64,
        "{counts:?}: a bad copy was met twice"
    );
    assert_eq!(i["recovered"], found, "{i}");
    assert_eq!(i["healed"], found, "{i}");
    assert_eq!(i["unrecoverable"], 0, "{i}");
    let show = json(&rig.node, &["pool", "show", "tank"]);
    assert_eq!(show["pool"]["state"], "online", "no member failed: {show}");
    let (code, text, _) = rig.node.ctl(&["drive", "list"]);
    assert_eq!(code, 0);
    assert!(text.contains("CKSUM"), "{text}");
    let (_, text, _) = rig.node.ctl(&["pool", "show", "tank"]);
    assert!(
        text.contains(&format!(
            "integrity: {found} reads served from a good copy, {found} bad copies rewritten"
        )),
        "{text}"
    );

    // More rot, in the half of the volume the next load does not write; a scrub under the
    // host's verified load finds every bad copy no read met, and rewrites it: a second scrub
    // finds nothing.
    let mut more = 0;
    for k in 0..8u64 {
        let b = SPAN / 2 + (k * 211 + 50) % (SPAN / 2);
        let lba = (data + b).to_string();
        rig.sim((k % 2) as usize, &["rot", "--lba", &lba, "--bit", "3"]);
        more += 1;
    }
    let (child, stop) = verifying_load(&rig);
    let out = ok(&rig.node, &["pool", "scrub", "tank"]);
    assert!(out.contains("scrub of pool tank started"), "{out}");
    let found = wait_scrub(&rig.node, "tank");
    finish_load(child, &stop);
    assert!(found["repaired"].as_u64().unwrap_or(0) >= more, "{found}");
    assert_eq!(found["mismatches"], found["repaired"], "{found}");
    assert_eq!(found["skipped"], 0, "{found}");
    ok(&rig.node, &["pool", "scrub", "tank"]);
    let found = wait_scrub(&rig.node, "tank");
    assert_eq!(
        (&found["mismatches"], &found["repaired"], &found["skipped"]),
        (&0.into(), &0.into(), &0.into()),
        "{found}"
    );

    // One block rots on both copies: the host's read of it fails (a media error), and no
    // wrong data is ever returned; the rest still verifies.
    let b = 1234;
    let lba = (data + b).to_string();
    rig.sim(0, &["rot", "--lba", &lba, "--bit", "5"]);
    rig.sim(1, &["rot", "--lba", &lba, "--bit", "6"]);
    let (code, _, text) = bench(rig.port, &verify);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("block 1234 failed: end-to-end guard check error"),
        "the read must fail with a media error, never return data: {text}"
    );
    let i = integrity(&rig);
    assert!(i["unrecoverable"].as_u64().unwrap_or(0) >= 1, "{i}");
    // A scrub reports it (no good copy: not repaired).
    ok(&rig.node, &["pool", "scrub", "tank"]);
    let found = wait_scrub(&rig.node, "tank");
    assert_eq!(found["skipped"], 1, "{found}");
    assert_eq!(found["repaired"], 0, "{found}");
    // The host writes it again: both copies take it, and everything verifies.
    let (code, _, text) = bench(rig.port, &write);
    assert_eq!(code, 0, "{text}");
    let (code, r, text) = bench(rig.port, &verify);
    assert_eq!(code, 0, "{text}");
    assert_eq!(r["verify"]["errors"], 0, "{text}");
}

/// A verifying write load on the first half of the volume until its stop file exists.
fn verifying_load(rig: &Rig) -> (Child, PathBuf) {
    let stop = rig.dir.path().join("stop");
    let target = format!("127.0.0.1:{}", rig.port);
    let half = (SPAN / 2).to_string();
    let child = Command::new(bin("duplex-bench"))
        .args(["--paths", &target, "--nqn", SUBNQN, "--hostnqn", HOSTNQN])
        .args(["--workload", "write", "--verify", "--qd", "8"])
        .args(["--span-blocks", &half, "--seed", "62", "--json"])
        .arg("--stop-file")
        .arg(&stop)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("duplex-bench runs");
    (child, stop)
}

/// Stops a [`verifying_load`]: the host saw no I/O error and no wrong data.
fn finish_load(child: Child, stop: &Path) {
    std::fs::write(stop, b"").expect("stop file");
    let out = child.wait_with_output().expect("duplex-bench ends");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the host saw an error: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(&text).expect("JSON report");
    assert_eq!(r["io_errors"], 0, "{r}");
    assert_eq!(r["verify_errors"], 0, "{r}");
}

/// Blocks `[0, SPAN)` of the volume as drive `i`'s medium holds them (its backing file: what
/// survived the power cut).
fn medium(rig: &Rig, i: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let data = Layout::for_drive(DRIVE_MIB << 20, 4096)
        .expect("layout")
        .data_offset;
    let file = std::fs::File::open(rig.dir.path().join(format!("d{i}.img"))).expect("image");
    let mut buf = vec![0u8; (SPAN * 4096) as usize];
    file.read_exact_at(&mut buf, data).expect("read the medium");
    buf
}

/// Blocks of the span whose copies differ between the two drives' media.
fn differing(rig: &Rig) -> u64 {
    let (a, b) = (medium(rig, 0), medium(rig, 1));
    a.chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count() as u64
}

/// A mirror member that lies about flushes, then a power cut of the whole node: the honest
/// member holds the newest data, the liar the older blocks, each with a valid record of its
/// own. After the restart the copies are resynced by their write sequence numbers: every read
/// (during the resync too) returns the data last written and flushed, the resync counts and
/// rewrites exactly the stale copies, and the media agree afterwards. Writes after the
/// restart are numbered above everything before it (the pool's committed mark): a second
/// power cut with the liar still lying leaves nothing stale either.
#[test]
fn a_mirror_member_lying_about_flushes_loses_nothing_across_a_power_cut() {
    let mut rig = Rig::new(&RigSpec {
        drives: 2,
        raid: "1",
        drive_mib: DRIVE_MIB,
        volume_size: "16m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: None,
        spares: 0,
        metadata: 8,
    });
    let write = |port: u16, seed: u64| {
        let (code, r, text) = bench(
            port,
            &format!(
                "--workload write --verify --flush --ios {SPAN} --span-blocks {SPAN} --seed {seed} --qd 16"
            ),
        );
        assert_eq!(code, 0, "{text}");
        assert_eq!(r["verify"]["errors"], 0, "{text}");
    };
    let verify = |port: u16, seed: u64| {
        let (code, r, text) = bench(
            port,
            &format!("--verify-only --span-blocks {SPAN} --seed {seed} --qd 16"),
        );
        assert_eq!(code, 0, "{text}");
        assert_eq!(r["verify"]["blocks_checked"], SPAN, "{text}");
        assert_eq!(
            r["verify"]["errors"], 0,
            "stale data reached the host: {text}"
        );
    };
    let mut seed = 61;
    write(rig.port, seed);
    for round in 0..2 {
        // d1 starts lying: its flushes succeed and leave the data in its volatile cache.
        rig.sim(1, &["inject", "lying-flush"]);
        seed += 1;
        write(rig.port, seed);
        // The whole node loses power: the controller and both drives.
        rig.node.kill_all();
        for i in 0..2 {
            rig.sim(i, &["power-cut"]);
            rig.sim(i, &["clear"]);
            rig.sim(i, &["power-on"]);
        }
        let stale = differing(&rig);
        eprintln!("round {round}: {stale} blocks stale on the lying member after the power cut");
        assert!(
            stale > 0,
            "round {round}: the lying flush lost nothing: the test proves nothing"
        );
        let old = rig.port;
        rig.port = free_port();
        rig.node.relaunch_replacing(
            &format!("127.0.0.1:{old}"),
            &format!("127.0.0.1:{}", rig.port),
        );
        rig.node.wait_exported(SUBNQN);
        // The host reads while the resync runs: its reads wait for their windows.
        verify(rig.port, seed);
        let line = rig.node.log.wait_for(&["resync complete", "tank"]);
        assert_eq!(
            duplex_tests::field(&line, "mismatches"),
            stale,
            "round {round}: exactly the stale copies: {line}"
        );
        assert_eq!(duplex_tests::field(&line, "repaired"), stale, "{line}");
        assert_eq!(duplex_tests::field(&line, "unrecoverable"), 0, "{line}");
        // The write-intent bitmap bounded it: the 16 MiB the host wrote are marked, the rest
        // of each member's data area was skipped.
        let member_bytes = json(&rig.node, &["pool", "show", "tank"])["pool"]["member_bytes"]
            .as_u64()
            .unwrap_or(0);
        let skipped = duplex_tests::field(&line, "skipped_clean");
        assert!(
            skipped > 0 && skipped <= member_bytes.saturating_sub(SPAN * 4096),
            "round {round}: {skipped} of {member_bytes} bytes skipped: {line}"
        );
        let found = wait_scrub(&rig.node, "tank");
        assert_eq!(found["repaired"], stale, "{found}");
        verify(rig.port, seed);
        // The repairs are on both media.
        for i in 0..2 {
            rig.sim(i, &["flush"]);
        }
        assert_eq!(differing(&rig), 0, "round {round}: the copies still differ");
    }
    let line = rig
        .node
        .log
        .wait_for(&["write sequence numbers leased", "tank"]);
    assert!(duplex_tests::field(&line, "first") > 1, "{line}");
}

/// A RAID-6 pool on five drives formatted with metadata: blocks rot on every member's medium
/// (data and parity columns alike, inside the stripes the volume's blocks occupy). The host's
/// verified reads see only its data, no member fails, `drive list` counts the bad blocks and
/// `pool show` the reads served by reconstruction and the blocks rewritten; a scrub rewrites
/// the rot no read met (parity), and a second scrub finds nothing.
#[test]
fn rotten_blocks_on_a_raid6_pool_never_reach_the_host_and_are_rewritten() {
    let rig = Rig::new(&RigSpec {
        drives: 5,
        raid: "6",
        drive_mib: DRIVE_MIB,
        volume_size: "16m",
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
        cluster_node: None,
        spares: 0,
        metadata: 8,
    });
    let write =
        format!("--workload write --verify --ios {SPAN} --span-blocks {SPAN} --seed 71 --qd 16");
    let (code, r, text) = bench(rig.port, &write);
    assert_eq!(code, 0, "{text}");
    assert_eq!(r["verify"]["errors"], 0, "{text}");
    let data = Layout::for_drive(DRIVE_MIB << 20, 4096)
        .expect("layout")
        .data_offset
        / 4096;
    // The volume's 16 MiB over three data columns fill the first 5.3 MiB of every member's
    // data area: rot inside the first 4 MiB, on every member.
    let rotten = 40u64;
    for k in 0..rotten {
        let drive = (k % 5) as usize;
        let b = (k * 173 + 11) % 1024;
        let lba = (data + b).to_string();
        let bit = (k * 613).to_string();
        rig.sim(drive, &["rot", "--lba", &lba, "--bit", &bit]);
    }
    let verify = format!("--verify-only --span-blocks {SPAN} --seed 71 --qd 16");
    for pass in 0..2 {
        let (code, r, text) = bench(rig.port, &verify);
        assert_eq!(code, 0, "pass {pass}: {text}");
        assert_eq!(r["verify"]["errors"], 0, "pass {pass}: {text}");
    }
    let counts = cksum(&rig);
    let found: u64 = counts.iter().map(|c| c.1).sum();
    assert!(found > 0 && found <= rotten, "{counts:?}");
    let i = integrity(&rig);
    assert!(i["recovered"].as_u64().unwrap_or(0) > 0, "{i}");
    assert!(i["healed"].as_u64().unwrap_or(0) > 0, "{i}");
    assert_eq!(i["unrecoverable"], 0, "{i}");
    let show = json(&rig.node, &["pool", "show", "tank"]);
    assert_eq!(show["pool"]["state"], "online", "no member failed: {show}");
    ok(&rig.node, &["pool", "scrub", "tank"]);
    let first = wait_scrub(&rig.node, "tank");
    assert_eq!(first["skipped"], 0, "{first}");
    assert_eq!(first["mismatches"], first["repaired"], "{first}");
    ok(&rig.node, &["pool", "scrub", "tank"]);
    let second = wait_scrub(&rig.node, "tank");
    assert_eq!(
        (
            &second["mismatches"],
            &second["repaired"],
            &second["skipped"]
        ),
        (&0.into(), &0.into(), &0.into()),
        "{second}"
    );
    // Every rotten block was met by a read or the scrub: the drives counted each once at most
    // per read that met it, and none is left.
    let after: u64 = cksum(&rig).iter().map(|c| c.1).sum();
    assert!(after >= found, "{after} < {found}");
    let (code, r, text) = bench(rig.port, &verify);
    assert_eq!(code, 0, "{text}");
    assert_eq!(r["verify"]["errors"], 0, "{text}");
}
