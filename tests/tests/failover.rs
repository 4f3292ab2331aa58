//! The failure matrix of issue 15, as whole processes in network namespaces
//! (`duplex_tests::pair`): two controllers over two dual-ported `duplex-drive-sim` drives, the
//! host's verifying multipath workload (`duplex-bench --paths`, following ANA) running through
//! every row. Each row checks: host I/O errors 0, verify errors 0 (the final read-back of every
//! block written, acknowledged ones included, through the path in use at the end), and prints
//! the host-visible pause (the largest latency of an I/O from its first try).
//!
//! Needs root (namespaces). Long counts: `DUPLEX_FAILOVER_KILLS` (row 1, default 4 here; the
//! full run is 50: see docs/HA.md), `DUPLEX_FAILOVER_RACES` (row 6, default 20, the full count)
//! and `DUPLEX_FAILOVER_CRASHES` (row 9, default 10; 50 full). `DUPLEX_TEST_DUMP=DIR` keeps
//! row 6's node logs (every launch) in DIR.

use duplex_datapath::fence::FenceKey;
use duplex_tests::netns::{addr, in_netns, Cable};
use duplex_tests::pair::{finish_multipath, wait_count, Pair, HOSTNQN, NVME_PORT, SUBNQN};

const BEAT_MS: u64 = 50;
const DEAD_MS: u64 = 600;

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn workload(seed: &str) -> Vec<String> {
    [
        "--workload",
        "write",
        "--verify",
        "--qd",
        "8",
        "--span-blocks",
        "4096",
        "--seed",
        seed,
        "--io-timeout-ms",
        "3000",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn report(row: &str, r: &serde_json::Value) {
    eprintln!(
        "row {row}: pause {} us (largest I/O latency), {} path errors, {} transport failures, {} retries, {} path switches; I/O errors {}, verify errors {} over {} blocks",
        r["max_latency_us"],
        r["path_errors"],
        r["transport_failures"],
        r["retries"],
        r["path_switches"],
        r["io_errors"],
        r["verify_errors"],
        r["blocks_checked"]
    );
}

/// Row 1: the owner killed (every process), the peer fences it and takes over; the dead node
/// comes back as the standby, and the next kill is of the new owner: alternating nodes.
#[test]
fn row1_owner_killed_alternating_with_rejoin() {
    let kills = count("DUPLEX_FAILOVER_KILLS", 4);
    let mut p = Pair::new(BEAT_MS, DEAD_MS);
    let stop = p.dir.path().join("stop");
    let w = workload("21");
    let mut bench = p.multipath(&args(&w), &stop);
    let mut owner = 0usize;
    // Takeovers and rejoins in each node's log since its last launch.
    let mut takeovers = [0usize; 2];
    // Per kill: kill → peer dead → fenced → pool imported (ms, from the survivor's log).
    let mut steps: Vec<[f64; 3]> = Vec::new();
    for k in 0..kills {
        let survivor = 1 - owner;
        p.wait_more_writes(owner as u64 + 1, 200);
        let killed_at = day_seconds_now();
        p.node(owner).kill_all();
        takeovers[survivor] += 1;
        wait_count(
            &mut p.node(survivor).log,
            &["pool taken over", "tank"],
            takeovers[survivor],
        );
        let log = &p.node(survivor).log;
        let at = |what: &str| {
            log.matching(&[what])
                .last()
                .and_then(|l| day_seconds(l))
                .map_or(f64::NAN, |t| (t - killed_at) * 1e3)
        };
        steps.push([
            at("peer dead: both heartbeats"),
            at("TAKEOVER: the peer is fenced"),
            at("pool taken over"),
        ]);
        // Only the survivor's key is left on the drives.
        for d in 0..2 {
            let keys = p.drive_keys(d);
            assert!(
                keys.len() == 1 && FenceKey(keys[0]).node() == survivor as u16 + 1,
                "kill {k}, drive {d}: {keys:x?}"
            );
        }
        // And `duplexctl cluster status` says so (the drives' reservations as its datapath
        // reads them; the pool's owner and epoch).
        let st = p.wait_status(survivor, |v| {
            v["drives"]["list"].as_array().is_some_and(|l| {
                l.len() == 2
                    && l.iter().all(|d| {
                        d["keys"].as_array().is_some_and(|k| {
                            k.len() == 1
                                && k[0]["node"] == survivor as u64 + 1
                                && k[0]["holder"] == true
                        })
                    })
            }) && v["pools"][0]["owner"] == survivor as u64 + 1
        });
        assert_eq!(st["pools"][0]["here"], "owner", "{st}");
        p.wait_more_writes(survivor as u64 + 1, 200);
        // The dead node comes back: the pool is its peer's now.
        p.node(owner).relaunch();
        takeovers[owner] = 0;
        p.node(owner)
            .log
            .wait_for(&["pool owned by the peer: exported inaccessible here", "tank"]);
        wait_count(
            &mut p.node(survivor).log,
            &["the fenced peer rejoined with a new boot"],
            takeovers[survivor],
        );
        p.wait_status(owner, |v| {
            v["peer"]["state"] == "alive" && v["disk"]["peer_counter"].as_u64().unwrap_or(0) > 0
        });
        p.wait_status(survivor, |v| v["peer"]["state"] == "alive");
        owner = survivor;
    }
    p.wait_more_writes(owner as u64 + 1, 200);
    let r = finish_multipath(&mut bench, &stop);
    assert!(r["path_switches"].as_u64() >= Some(kills as u64), "{r}");
    report(&format!("1 ({kills} kills)"), &r);
    let mut pauses: Vec<f64> = r["failovers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["pause_us"].as_f64())
        .collect();
    let mut gaps: Vec<f64> = r["failovers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["gap_us"].as_f64())
        .collect();
    eprintln!(
        "row 1 figures over {} failovers (beat {BEAT_MS} ms, dead time {DEAD_MS} ms): host pause ms median {:.0} p99 {:.0} max {:.0}; I/O gap ms median {:.0} p99 {:.0}",
        pauses.len(),
        quantile(&mut pauses, 0.5) / 1e3,
        quantile(&mut pauses, 0.99) / 1e3,
        quantile(&mut pauses, 1.0) / 1e3,
        quantile(&mut gaps, 0.5) / 1e3,
        quantile(&mut gaps, 0.99) / 1e3,
    );
    for (i, name) in ["peer declared dead", "peer fenced", "pool imported"]
        .iter()
        .enumerate()
    {
        let mut v: Vec<f64> = steps
            .iter()
            .map(|s| s[i])
            .filter(|x| x.is_finite())
            .collect();
        eprintln!(
            "row 1 figures: kill → {name}: ms median {:.0} p99 {:.0} (over {})",
            quantile(&mut v, 0.5),
            quantile(&mut v, 0.99),
            v.len()
        );
    }
}

/// The `q` quantile (nearest rank) of `v`.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Seconds since midnight UTC, now.
fn day_seconds_now() -> f64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    t % 86_400.0
}

/// Seconds since midnight UTC of a log line's timestamp (`2026-12-02T19:45:10.419723Z ...`).
fn day_seconds(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let time = ts.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Row 3: the interconnect cut, both alive: no takeover, each keeps serving its pools,
/// configuration changes refused, an event logged; the cable back: normal.
#[test]
fn row3_interconnect_down_both_alive_no_takeover() {
    let mut p = Pair::new(BEAT_MS, DEAD_MS);
    let stop = p.dir.path().join("stop");
    let w = workload("23");
    let mut bench = p.multipath(&args(&w), &stop);
    p.wait_more_writes(1, 200);
    p.net().pull(Cable::Interconnect);
    for i in 0..2 {
        p.node(i).log.wait_for(&["peer interconnect down"]);
        // The event, as `duplexctl cluster events` shows it.
        p.wait_status(i, |v| has_event(v, "peer-interconnect-down"));
        let (code, out, _) = p.node(i).ctl(&["cluster", "events"]);
        assert_eq!(code, 0);
        assert!(out.contains("warning peer-interconnect-down: "), "{out}");
    }
    let (code, out, err) = p
        .node(0)
        .ctl(&["volume", "create", "x", "--pool", "tank", "--size", "1m"]);
    assert_ne!(
        code, 0,
        "a change was accepted with the interconnect down: {out}"
    );
    assert!(err.contains("interconnect"), "{err}");
    // Past the dead time, the owner still serves the host.
    for _ in 0..3 {
        p.wait_more_writes(1, 200);
    }
    p.net().plug(Cable::Interconnect);
    for i in 0..2 {
        wait_count(&mut p.node(i).log, &["peer alive"], 2);
        let v = p.wait_status(i, |v| {
            v["events"]
                .as_array()
                .and_then(|e| e.last())
                .is_some_and(|e| e["kind"] == "peer-alive")
        });
        assert!(!has_event(&v, "peer-dead"), "{v}");
        assert!(!has_event(&v, "fencing"), "{v}");
    }
    p.wait_more_writes(1, 200);
    let r = finish_multipath(&mut bench, &stop);
    assert_eq!(r["path_switches"], 0, "{r}");
    for i in 0..2 {
        p.node(i).log.pump();
        assert!(
            p.node(i).log.matching(&["peer dead"]).is_empty(),
            "node {}",
            i + 1
        );
        assert!(
            p.node(i).log.matching(&["TAKEOVER"]).is_empty(),
            "node {}",
            i + 1
        );
    }
    report("3", &r);
}

/// Row 4: the interconnect cut, then the owner killed: the peer sees the disk heartbeat stop
/// too, fences and takes over.
#[test]
fn row4_interconnect_down_then_owner_killed() {
    let mut p = Pair::new(BEAT_MS, DEAD_MS);
    let stop = p.dir.path().join("stop");
    let w = workload("24");
    let mut bench = p.multipath(&args(&w), &stop);
    p.wait_more_writes(1, 200);
    p.net().pull(Cable::Interconnect);
    p.node(1).log.wait_for(&["peer interconnect down"]);
    p.wait_more_writes(1, 200);
    p.node(0).kill_all();
    p.node(1)
        .log
        .wait_for(&["peer dead", "from=\"interconnect-down\""]);
    p.node(1).log.wait_for(&["pool taken over", "tank"]);
    p.wait_more_writes(2, 200);
    let r = finish_multipath(&mut bench, &stop);
    assert!(r["path_switches"].as_u64() >= Some(1), "{r}");
    report("4", &r);
}

/// Row 8: stale data, proven impossible. The owner is frozen (SIGSTOP of every process) past
/// the dead time; the peer fences it, takes over, and the host writes new data through it.
/// The old owner resumed (SIGCONT): none of its writes reaches a drive, and a read of every
/// block through its path returns only a path status, never data.
#[test]
fn row8_a_frozen_owner_resumed_serves_no_stale_data() {
    // The resumed owner's own watchdog would find its services silent for the freeze and
    // halt the node, racing its datapath's first drive command; what is proven here is that
    // the drives refuse that command, so the watchdog lets a frozen service be.
    let mut p = Pair::with_supervisor(BEAT_MS, DEAD_MS, "missed_beats = 1000000");
    let stop = p.dir.path().join("stop");
    let w = workload("28");
    let mut bench = p.multipath(&args(&w), &stop);
    p.wait_more_writes(1, 200);
    let pids: Vec<i32> = p
        .node(0)
        .service_pids()
        .into_iter()
        .chain(std::iter::once(p.node(0).pid() as i32))
        .collect();
    let signal = |s| {
        for &x in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(x), s);
        }
    };
    signal(nix::sys::signal::Signal::SIGSTOP);
    p.node(1).log.wait_for(&["pool taken over", "tank"]);
    p.wait_more_writes(2, 500);
    let frozen: Vec<u64> = (0..2).map(|d| p.port_writes(d, 1)).collect();
    let r = finish_multipath(&mut bench, &stop);
    report("8", &r);
    signal(nix::sys::signal::Signal::SIGCONT);
    // The old owner finds itself fenced at its first drive command.
    p.node(0).log.wait_for(&["FENCED"]);
    // Every block through its path: a path status, no data.
    let blocks = 4096u32;
    let (path_errors, with_data, other) = in_netns(&p.net().h, || {
        let target: std::net::SocketAddr = format!("{}:{NVME_PORT}", addr::A_HOST)
            .parse()
            .expect("address");
        let digests = duplex_nvme::tcp::Digests::default();
        let (mut admin, cntlid) =
            duplex_tests::nvme_host::Host::admin_as(target, digests, SUBNQN, HOSTNQN);
        let queues = duplex_nvme::cmd::Sqe {
            opcode: duplex_nvme::spec::admin::SET_FEATURES,
            cdw10: u32::from(duplex_nvme::spec::feat::NUM_QUEUES),
            ..Default::default()
        };
        assert!(admin.admin_cmd(queues, 0).0.is_success());
        let mut io = duplex_tests::nvme_host::Host::dial(target, digests);
        assert!(io.connect(1, cntlid, SUBNQN, HOSTNQN).status().is_success());
        let (mut path, mut data, mut other) = (0u32, 0u32, Vec::new());
        for lba in 0..blocks {
            let sqe = duplex_nvme::cmd::Sqe {
                opcode: duplex_nvme::spec::io::READ,
                nsid: 1,
                cdw10: lba,
                ..Default::default()
            };
            let (cqe, d) = io.command(sqe, None, false, 4096);
            let st = cqe.status();
            if st.sct() == 3 {
                path += 1;
            } else {
                other.push(format!("block {lba}: {st}"));
            }
            if !d.is_empty() {
                data += 1;
            }
        }
        (path, data, other)
    });
    assert_eq!(with_data, 0, "the old owner returned data");
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(path_errors, blocks);
    // Nor does a write through it reach a drive.
    let (code, out, err) = p.bench_one(1, &["--workload", "write", "--ios", "64", "--qd", "4"]);
    assert_ne!(code, 0, "the old owner acknowledged a write: {out}{err}");
    let after: Vec<u64> = (0..2).map(|d| p.port_writes(d, 1)).collect();
    assert_eq!(
        frozen, after,
        "writes of the fenced owner reached the drives"
    );
}

/// Row 9: the owner's cluster service killed again and again under load: a restarting cluster
/// service is not a dead node (its datapath goes on writing the disk heartbeat): no takeover,
/// no error. Then the watchdog: the owner's datapath hangs, its node halts whole, and the peer
/// takes over.
#[test]
fn row9_cluster_service_crashes_are_no_death_and_a_hung_datapath_is() {
    let crashes = count("DUPLEX_FAILOVER_CRASHES", 10);
    let mut p = Pair::new(BEAT_MS, DEAD_MS);
    let stop = p.dir.path().join("stop");
    let w = workload("29");
    let mut bench = p.multipath(&args(&w), &stop);
    p.wait_more_writes(1, 200);
    // Each node's cluster service killed `crashes` times, alternately.
    for i in 0..crashes {
        for n in 0..2 {
            let gen = p.node(n).service("cluster")["generation"]
                .as_u64()
                .unwrap_or(0);
            let (code, out, err) = p
                .node(n)
                .ctl(&["service", "crash", "cluster", "--mode", "kill"]);
            assert_eq!(code, 0, "node {}, crash {i}: {out}{err}", n + 1);
            p.node(n).wait_running("cluster", gen);
            p.wait_more_writes(1, 50);
        }
    }
    p.wait_more_writes(1, 200);
    for n in 0..2 {
        p.node(n).log.pump();
        assert!(
            p.node(n).log.matching(&["peer dead"]).is_empty(),
            "node {}",
            n + 1
        );
        assert!(
            p.node(n).log.matching(&["TAKEOVER"]).is_empty(),
            "node {}",
            n + 1
        );
    }

    // The watchdog: node 1's datapath frozen; node 1 stops whole; node 2 takes over.
    let datapath = p.node(0).service("datapath")["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(datapath),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    p.node(0)
        .log
        .wait_for(&["stopping the whole node so that its peer takes over"]);
    p.node(1).log.wait_for(&["pool taken over", "tank"]);
    p.wait_more_writes(2, 200);
    let r = finish_multipath(&mut bench, &stop);
    assert_eq!(r["path_switches"], 1, "{r}");
    report(
        &format!("9 ({crashes} cluster service crashes on each node, then a hung datapath)"),
        &r,
    );
}

/// Row 5: the owner loses its drives (its ports pulled): it stops serving (every drive lost,
/// the node halts whole) and the peer takes over.
#[test]
fn row5_owner_loses_its_drives_the_peer_takes_over() {
    let mut p = Pair::new(BEAT_MS, DEAD_MS);
    let stop = p.dir.path().join("stop");
    let w = workload("25");
    let mut bench = p.multipath(&args(&w), &stop);
    p.wait_more_writes(1, 200);
    for d in 0..2 {
        p.sim_ctl(d, &["pull", "--port", "0"]);
    }
    p.node(0)
        .log
        .wait_for(&["every drive of this cluster member is lost"]);
    let status = p.node(0).wait_exit();
    assert_ne!(status, Some(0), "node 1 went on as if all were well");
    p.node(1).log.wait_for(&["pool taken over", "tank"]);
    p.wait_more_writes(2, 200);
    let r = finish_multipath(&mut bench, &stop);
    assert!(r["path_switches"].as_u64() >= Some(1), "{r}");
    report("5", &r);
}

/// Row 7: fencing impossible (the survivor cannot reach a drive): no takeover, the pool stays
/// offline, the refusal is logged and shown, and the fence is tried again while the peer
/// stays dead. Nothing of the dead owner's is touched: its key stays on the drive fencing did
/// not reach.
#[test]
fn row7_fencing_impossible_no_takeover() {
    let mut p = Pair::new(BEAT_MS, DEAD_MS);
    // Node 2 loses its port to d0 (the first drive in fencing order).
    p.sim_ctl(0, &["pull", "--port", "1"]);
    p.node(0).kill_all();
    p.node(1).log.wait_for(&["peer dead"]);
    wait_count(
        &mut p.node(1).log,
        &["NO TAKEOVER", "a drive is unreachable"],
        2,
    );
    let st = p.wait_status(1, |v| {
        v["takeover"]
            .as_str()
            .is_some_and(|t| t.starts_with("refused"))
    });
    assert_eq!(st["peer"]["state"], "dead", "{st}");
    assert!(has_event(&st, "peer-dead"), "{st}");
    let st = p.wait_status(1, |v| has_event(v, "takeover-refused"));
    assert!(!has_event(&st, "takeover"), "{st}");
    p.node(1).log.pump();
    assert!(p.node(1).log.matching(&["pool taken over"]).is_empty());
    // d1 was never reached by the fence: node 1's key is still there.
    let keys = p.drive_keys(1);
    assert!(keys.iter().any(|k| FenceKey(*k).node() == 1), "{keys:x?}");
    // The host finds no path serving the pool: node 2's says inaccessible.
    let (code, out, err) = p.bench_one(2, &["--verify-only", "--span-blocks", "16"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        format!("{out}{err}").contains("asymmetric access inaccessible"),
        "{out}{err}"
    );
}

/// A planned move (giveback) under I/O, there and back: the pool's group goes to change, its
/// I/O drains, its ownership goes to the peer with the next epoch, and the peer serves it
/// once it has heard of the change; 0 host errors.
#[test]
fn planned_move_there_and_back_under_io() {
    let mut p = Pair::new(BEAT_MS, DEAD_MS);
    let stop = p.dir.path().join("stop");
    let w = workload("26");
    let mut bench = p.multipath(&args(&w), &stop);
    p.wait_more_writes(1, 200);
    let out = duplex_tests::pool::ctl_ok(p.node(0), &["pool", "move", "tank", "--to", "2"]);
    assert!(out.contains("moved pool tank to node 2 (epoch 2)"), "{out}");
    p.node(1)
        .log
        .wait_for(&["pool moved here by the peer", "tank", "epoch=2"]);
    p.wait_more_writes(2, 200);
    // Moving it again from node 1 is refused with the owner named.
    let (code, _, err) = p.node(0).ctl(&["pool", "move", "tank", "--to", "2"]);
    assert_ne!(code, 0);
    assert!(err.contains("owned by node 2"), "{err}");
    let out = duplex_tests::pool::ctl_ok(p.node(1), &["pool", "move", "tank", "--to", "1"]);
    assert!(out.contains("(epoch 3)"), "{out}");
    p.node(0)
        .log
        .wait_for(&["pool moved here by the peer", "tank", "epoch=3"]);
    p.wait_more_writes(1, 200);
    let r = finish_multipath(&mut bench, &stop);
    assert!(r["path_switches"].as_u64() >= Some(2), "{r}");
    assert_eq!(r["transport_failures"], 0, "{r}");
    report("giveback (there and back)", &r);
    for n in 0..2 {
        p.node(n).log.pump();
        assert!(p.node(n).log.matching(&["TAKEOVER"]).is_empty());
    }
}

/// Row 2: the owner's host-facing link down, the node alive: duplexd sees the interface of
/// its fabric listener down for the dead time, the metadata service moves its pools to the
/// peer (a planned move), and the host goes on through the peer.
#[test]
fn row2_owner_host_link_down_pools_move_to_the_peer() {
    let mut p = Pair::new(BEAT_MS, DEAD_MS);
    let stop = p.dir.path().join("stop");
    let w = workload("22");
    let mut bench = p.multipath(&args(&w), &stop);
    p.wait_more_writes(1, 200);
    p.net().pull(Cable::HostA);
    p.node(0).log.wait_for(&["HOST LINK DOWN"]);
    p.node(0).log.wait_for(&["pool moved to the peer", "tank"]);
    p.node(1)
        .log
        .wait_for(&["pool moved here by the peer", "tank", "epoch=2"]);
    p.wait_more_writes(2, 200);
    let r = finish_multipath(&mut bench, &stop);
    assert!(r["path_switches"].as_u64() >= Some(1), "{r}");
    report("2", &r);
    p.net().plug(Cable::HostA);
    p.node(0).log.wait_for(&["host link up again"]);
    for n in 0..2 {
        p.node(n).log.pump();
        assert!(p.node(n).log.matching(&["TAKEOVER"]).is_empty());
    }
}

/// Row 6: both nodes believe the other dead. The interconnect is cut, then every heartbeat
/// write is lost on both drives (`lost-write` on the heartbeat area: each node's own rounds
/// go on, the peer's slot stops changing — a disk heartbeat delayed past the dead time), so
/// each node judges its peer dead and fences it; they race on the drives in name order. In
/// each race: exactly one node wins (fenced its peer off every drive), the other is fenced
/// (`FENCED`, its status `fenced`); on every drive one preempt, by the winner's port, of the
/// loser's; no write through the loser's port after that preempt (the drive's write
/// sequence); the host's verifying workload goes on through the winner with 0 errors. The
/// loser then comes back with a new boot and key, and the next race starts.
/// `DUPLEX_FAILOVER_RACES` races (default 20).
#[test]
fn row6_both_believe_the_other_dead_exactly_one_wins_the_race() {
    use duplex_ondisk::heartbeat::HEARTBEAT_SIZE;
    use duplex_ondisk::layout::{HEARTBEAT_OFFSET, HEARTBEAT_SLOTS};
    let races = count("DUPLEX_FAILOVER_RACES", 20);
    let mut p = Pair::new(BEAT_MS, DEAD_MS);
    let stop = p.dir.path().join("stop");
    let w = workload("26");
    let mut bench = p.multipath(&args(&w), &stop);
    // The simulated drives' 4 KiB blocks of the heartbeat area.
    let first = HEARTBEAT_OFFSET / 4096;
    let last = first + (HEARTBEAT_SLOTS as u64 * HEARTBEAT_SIZE as u64) / 4096 - 1;
    let lba = format!("{first}-{last}");
    let mut owner = 0usize;
    let mut wins = [0usize; 2];
    let mut both_judged = 0usize;
    for race in 0..races {
        p.wait_more_writes(owner as u64 + 1, 100);
        // The number of the newest preempt each drive recorded so far (it keeps the newest 64).
        let preempts_before: Vec<u64> = (0..2)
            .map(|d| {
                p.sim_status(d)["preempts"]
                    .as_array()
                    .and_then(|a| a.last())
                    .and_then(|r| r["seq"].as_u64())
                    .unwrap_or(0)
            })
            .collect();
        p.net().pull(Cable::Interconnect);
        for i in 0..2 {
            p.wait_status(i, |v| v["peer"]["state"] == "interconnect-down");
        }
        for d in 0..2 {
            p.sim_ctl(d, &["inject", "lost-write", "--lba", &lba]);
        }
        // One wins, one is fenced.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let (winner, loser) = loop {
            let s: Vec<serde_json::Value> = (0..2).map(|i| p.wait_status(i, |_| true)).collect();
            let won = |v: &serde_json::Value| {
                v["takeover"]
                    .as_str()
                    .is_some_and(|t| t.contains("taken over"))
            };
            let fenced = |v: &serde_json::Value| v["disk"]["fenced"] == true;
            assert!(
                !(won(&s[0]) && won(&s[1])),
                "race {race}: both nodes won: {s:?}"
            );
            assert!(
                !(fenced(&s[0]) && fenced(&s[1])),
                "race {race}: both nodes fenced: {s:?}"
            );
            if won(&s[0]) && fenced(&s[1]) {
                break (0, 1);
            }
            if won(&s[1]) && fenced(&s[0]) {
                break (1, 0);
            }
            if std::time::Instant::now() >= deadline {
                dump(&mut p, 0);
                dump(&mut p, 1);
                panic!(
                    "race {race}: no winner: {s:?}; drives: {} / {}",
                    p.sim_status(0),
                    p.sim_status(1)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        wins[winner] += 1;
        p.node(loser).log.wait_for(&["FENCED"]);
        p.wait_status(loser, |v| has_event(v, "fenced"));
        p.wait_status(winner, |v| has_event(v, "takeover"));
        for i in 0..2 {
            p.node(i).log.pump();
        }
        if !p
            .node(loser)
            .log
            .matching(&["peer dead: fencing it off"])
            .is_empty()
        {
            both_judged += 1;
        }
        if winner != owner {
            p.node(winner).log.wait_for(&["pool taken over", "tank"]);
        }
        // The host goes on through the winner.
        p.wait_more_writes(winner as u64 + 1, 100);
        // The drives' record: one preempt each, the winner's of the loser, and nothing the
        // loser wrote after it.
        for (d, &before) in preempts_before.iter().enumerate() {
            let st = p.sim_status(d);
            let preempts = st["preempts"].as_array().cloned().unwrap_or_default();
            let new: Vec<&serde_json::Value> = preempts
                .iter()
                .filter(|r| r["seq"].as_u64().unwrap_or(0) > before)
                .collect();
            assert_eq!(new.len(), 1, "race {race}, drive {d}: {new:?}");
            let pre = &new[0];
            assert_eq!(pre["by_cntlid"], winner as u64 + 1, "race {race}: {pre}");
            assert_eq!(
                pre["victims"],
                serde_json::json!([loser as u64 + 1]),
                "race {race}: {pre}"
            );
            let loser_last = st["port_writes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|w| w["cntlid"] == loser as u64 + 1)
                .and_then(|w| w["last_seq"].as_u64())
                .unwrap_or(0);
            assert!(
                loser_last <= pre["write_seq"].as_u64().unwrap_or(0),
                "race {race}, drive {d}: node {}'s write (sequence {loser_last}) reached the drive after the preempt ({pre})",
                loser + 1
            );
            let keys = p.drive_keys(d);
            assert!(
                keys.len() == 1 && FenceKey(keys[0]).node() == winner as u16 + 1,
                "race {race}, drive {d}: {keys:x?}"
            );
        }
        // Heal, and the loser comes back with a new boot and key.
        for d in 0..2 {
            p.sim_ctl(d, &["clear"]);
        }
        p.net().plug(Cable::Interconnect);
        p.node(loser).kill_all();
        dump(&mut p, loser);
        p.node(loser).relaunch();
        p.node(loser)
            .log
            .wait_for(&["pool owned by the peer: exported inaccessible here", "tank"]);
        p.wait_status(loser, |v| {
            v["peer"]["state"] == "alive" && v["disk"]["peer_counter"].as_u64().unwrap_or(0) > 0
        });
        p.wait_status(winner, |v| {
            v["peer"]["state"] == "alive" && v["takeover"] == "none"
        });
        owner = winner;
    }
    p.wait_more_writes(owner as u64 + 1, 100);
    dump(&mut p, 0);
    dump(&mut p, 1);
    let r = finish_multipath(&mut bench, &stop);
    report(&format!("6 ({races} races)"), &r);
    eprintln!(
        "row 6: {races} races: node 1 won {}, node 2 won {}; both nodes judged the other dead (and asked to fence) in {both_judged}",
        wins[0], wins[1]
    );
}

/// Whether a cluster status report holds an event of `kind`.
fn has_event(v: &serde_json::Value, kind: &str) -> bool {
    v["events"]
        .as_array()
        .is_some_and(|e| e.iter().any(|e| e["kind"] == kind))
}

fn dump(p: &mut Pair, i: usize) {
    use std::io::Write;
    if let Ok(dir) = std::env::var("DUPLEX_TEST_DUMP") {
        p.node(i).log.pump();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{dir}/node{}.log", i + 1))
            .expect("dump");
        let _ = f.write_all(p.node(i).log.tail(100000).as_bytes());
    }
}

/// The join handshake: a node that comes back while its peer is still taking its pools over
/// serves none of them until the peer says it is done. The survivor's metadata service is
/// frozen (SIGSTOP; its watchdog set not to mind) before the owner is killed, so the survivor
/// fences the owner and claims its pool but cannot import it yet; the owner restarted then
/// hears the survivor's beats saying a takeover of it is pending, and waits: not joined,
/// storage requests answered "joining the cluster", the pool not imported. The survivor's
/// metadata service resumed imports the pool with the next epoch; then the owner joins and
/// finds the pool its peer's. Without the handshake the restarted owner would read its own
/// name in the pool's ownership record (not yet rewritten) and import it too.
#[test]
fn a_node_back_during_its_peers_takeover_waits_to_join() {
    // Watchdogs that let a frozen service be.
    let mut p = Pair::with_supervisor(BEAT_MS, DEAD_MS, "missed_beats = 1000000");
    let metadata = p
        .node(1)
        .services()
        .iter()
        .find(|s| s["name"] == "metadata")
        .and_then(|s| s["pid"].as_i64())
        .expect("node 2's metadata service") as i32;
    let signal = |s| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(metadata), s).expect("signal");
    };
    signal(nix::sys::signal::Signal::SIGSTOP);
    p.node(0).kill_all();
    // Node 2 fences node 1 and claims its pool; its frozen metadata service cannot import it.
    p.wait_status(1, |v| {
        v["takeover"]
            .as_str()
            .is_some_and(|t| t.contains("taken over"))
            && v["takeover_pending"] == true
    });
    p.node(0).relaunch();
    p.node(0)
        .log
        .wait_for(&["waiting for the cluster join before importing this node's pools"]);
    // Node 1 hears node 2 (whose beats say the takeover is pending) and does not join.
    let st = p.wait_status(0, |v| v["peer"]["state"] == "alive");
    assert_eq!(st["joined"], false, "{st}");
    let (code, _, err) = p.node(0).ctl(&["pool", "list"]);
    assert_ne!(code, 0);
    assert!(err.contains("joining the cluster"), "{err}");
    let st = p.wait_status(0, |v| v["peer"]["state"] == "alive");
    assert_eq!(st["joined"], false, "{st}");
    // Node 2's metadata service resumed: it takes the pool over; then node 1 joins.
    signal(nix::sys::signal::Signal::SIGCONT);
    p.node(1).log.wait_for(&["pool taken over", "tank"]);
    p.wait_status(0, |v| v["joined"] == true);
    p.node(0)
        .log
        .wait_for(&["pool owned by the peer: exported inaccessible here", "tank"]);
    p.node(1)
        .log
        .wait_for(&["the fenced peer rejoined with a new boot"]);
    p.node(0).log.pump();
    assert!(
        p.node(0).log.matching(&["pool imported"]).is_empty(),
        "node 1 imported a pool its peer was taking over"
    );
    let st = p.wait_status(0, |v| v["pools"][0]["owner"] == 2);
    assert_eq!(st["pools"][0]["here"], "standby", "{st}");
    assert!(has_event(&st, "joined"), "{st}");
}
