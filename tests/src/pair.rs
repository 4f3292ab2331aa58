//! Two controllers over the same dual-ported drives, in network namespaces: the rig of the
//! failure matrix (`tests/failover.rs`) and of the failover figures (`tests/figures_failover.rs`).
//!
//! Two `duplex-drive-sim` drives; node 1 (`a`) reaches them through their ports A (controller
//! id 1 on each drive), node 2 (`b`) through their ports B (controller id 2). Each duplexd runs
//! in its own namespace ([`Net`]): its fabric listens on the host network (10.0.1.2 / 10.0.2.2,
//! port 4420), its cluster service on the interconnect (10.0.3.1 / 10.0.3.2, port 7000); the
//! host's workload runs in the host namespace. Node 1 builds the mirrored pool `tank` with
//! volume `vol0` exported as namespace 1 of [`SUBNQN`] to [`HOSTNQN`]; node 2 starts after and
//! finds the pool its peer's.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::netns::{addr, Net};
use crate::pool::{ctl_ok, drive_sim};
use crate::{bin, free_port, KillOnDrop, Log, Node, PATIENCE};

/// The subsystem.
pub const SUBNQN: &str = "nqn.2026-12.io.duplex:pair";
/// The host.
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:9a1e0000-0000-4000-8000-000000000001";
/// The fabric port on both controllers.
pub const NVME_PORT: u16 = 4420;
/// The interconnect port on both controllers.
pub const IC_PORT: u16 = 7000;
/// The metrics port on both controllers (on the host network).
pub const METRICS_PORT: u16 = 9464;
/// The fabric listener that requires TLS, on both controllers (on the host network).
pub const NVME_TLS_PORT: u16 = 4421;

/// Where the nodes listen.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    /// Each node's fabric listener.
    pub nvme: [SocketAddr; 2],
    /// Each node's interconnect listener.
    pub ic: [SocketAddr; 2],
    /// Each node's metrics listener (mgmt serves Prometheus there).
    pub metrics: [SocketAddr; 2],
    /// Each node's fabric listener that requires TLS (`tls = true`).
    pub tls: [SocketAddr; 2],
}

impl Addresses {
    /// In the namespaces of [`Net`]: fixed addresses.
    pub fn namespaces() -> Self {
        let sa = |ip: &str, port: u16| SocketAddr::new(ip.parse().expect("ip"), port);
        Self {
            nvme: [sa(addr::A_HOST, NVME_PORT), sa(addr::B_HOST, NVME_PORT)],
            ic: [sa(addr::A_PEER, IC_PORT), sa(addr::B_PEER, IC_PORT)],
            metrics: [
                sa(addr::A_HOST, METRICS_PORT),
                sa(addr::B_HOST, METRICS_PORT),
            ],
            tls: [
                sa(addr::A_HOST, NVME_TLS_PORT),
                sa(addr::B_HOST, NVME_TLS_PORT),
            ],
        }
    }

    /// On the machine's loopback: ports free a moment ago.
    pub fn loopback() -> Self {
        let sa = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            nvme: [sa(free_port()), sa(free_port())],
            ic: [sa(free_port()), sa(free_port())],
            metrics: [sa(free_port()), sa(free_port())],
            tls: [sa(free_port()), sa(free_port())],
        }
    }
}

/// Node `id`'s config (1: a, 2: b), with the cluster's timers.
pub fn config(id: u16, dir: &Path, at: &Addresses, beat_ms: u64, dead_ms: u64) -> String {
    config_with_drives(id, dir, at, beat_ms, dead_ms, 2)
}

/// [`config`] over `drives` drives `d0`, `d1`, ....
pub fn config_with_drives(
    id: u16,
    dir: &Path,
    at: &Addresses,
    beat_ms: u64,
    dead_ms: u64,
    drives: usize,
) -> String {
    let i = usize::from(id - 1);
    let (host, me, peer, metrics) = (at.nvme[i], at.ic[i], at.ic[1 - i], at.metrics[i]);
    let tls = at.tls[i];
    let letter = if id == 1 { "a" } else { "b" };
    let mut c = format!(
        r#"
[node]
name = "node{id}"
state_dir = "{{state}}"

[supervisor]
backoff_initial_ms = 1
backoff_max_ms = 20
crash_loop_exits = 1000
crash_loop_window_s = 1

[fabric]
cntlid_base = {base}

[[service]]
name = "datapath"
kind = "datapath"

[[service]]
name = "fabric"
after = ["datapath"]

[[service]]
name = "metadata"
after = ["datapath"]

[[service]]
name = "raid"
after = ["metadata"]

[[service]]
name = "mgmt"
binary = "{{mgmt}}"

[[service]]
name = "cluster"
after = ["datapath"]

[[listener]]
name = "nvme"
address = "{host}"
service = "fabric"

[[listener]]
name = "nvme-tls"
address = "{tls}"
service = "fabric"
tls = true

[[listener]]
name = "interconnect"
address = "{me}"
service = "cluster"

[[listener]]
name = "metrics"
address = "{metrics}"
service = "mgmt"

[cluster]
node_id = {id}
peer = "{peer}"
beat_ms = {beat_ms}
dead_ms = {dead_ms}
"#,
        base = u32::from(id) * 0x1000,
    );
    for i in 0..drives {
        c.push_str(&format!(
            "\n[[drive]]\nname = \"d{i}\"\ndrive = \"vfio-user:{}\"\nsize = \"256MiB\"\n",
            dir.join(format!("d{i}-{letter}.sock")).display()
        ));
    }
    // The array's secrets key, the same for both nodes (hosts' DH-HMAC-CHAP secrets).
    let key = dir.join("secrets.key");
    if !key.exists() {
        std::fs::write(&key, SECRETS_KEY_HEX).expect("secrets key");
    }
    c.push_str(&format!("\n[secrets]\nkey_file = \"{}\"\n", key.display()));
    c
}

/// The pair's secrets key (`[secrets] key_file`).
pub const SECRETS_KEY_HEX: &str =
    "5d1c0ffee0ddba11cafe5eed0b57ac1e5d1c0ffee0ddba11cafe5eed0b57ac1e";

/// The rig. See the module docs.
#[derive(Debug)]
pub struct Pair {
    /// Node 1 and node 2.
    pub nodes: [Node; 2],
    /// The drives.
    pub sims: Vec<KillOnDrop>,
    /// Backing files, sockets, control sockets.
    pub dir: tempfile::TempDir,
    /// Where the nodes listen.
    pub at: Addresses,
    /// The namespaces (dropped last: the processes in them end first); `None` on loopback.
    pub net: Option<Net>,
}

impl Pair {
    /// Builds the rig with the cluster's timers; returns once each node reads the other's
    /// disk heartbeat and hears it over the interconnect.
    pub fn new(beat_ms: u64, dead_ms: u64) -> Self {
        Self::build(
            Some(Net::new()),
            Addresses::namespaces(),
            beat_ms,
            dead_ms,
            "",
        )
    }

    /// [`Pair::new`] with `supervisor` (lines of TOML) added to both nodes' `[supervisor]`.
    pub fn with_supervisor(beat_ms: u64, dead_ms: u64, supervisor: &str) -> Self {
        Self::build(
            Some(Net::new()),
            Addresses::namespaces(),
            beat_ms,
            dead_ms,
            supervisor,
        )
    }

    /// [`Pair::new`] with both nodes on the machine's loopback (for a host in a QEMU guest,
    /// which reaches the machine's loopback through its user-mode network).
    pub fn on_loopback(beat_ms: u64, dead_ms: u64) -> Self {
        Self::build(None, Addresses::loopback(), beat_ms, dead_ms, "")
    }

    /// [`Pair::new`] with pool `tank` of level `raid` (`duplexctl pool create --raid`) over
    /// `drives` drives.
    pub fn with_pool(beat_ms: u64, dead_ms: u64, drives: usize, raid: &str) -> Self {
        Self::build_pool(
            Some(Net::new()),
            Addresses::namespaces(),
            (beat_ms, dead_ms),
            "",
            (drives, 0),
            raid,
        )
    }

    /// [`Pair::with_pool`] with `spares` more drives on both nodes, left free
    /// (`d{drives}`, ...).
    pub fn with_pool_and_spares(
        beat_ms: u64,
        dead_ms: u64,
        drives: usize,
        raid: &str,
        spares: usize,
    ) -> Self {
        Self::build_pool(
            Some(Net::new()),
            Addresses::namespaces(),
            (beat_ms, dead_ms),
            "",
            (drives, spares),
            raid,
        )
    }

    fn build(
        net: Option<Net>,
        at: Addresses,
        beat_ms: u64,
        dead_ms: u64,
        supervisor: &str,
    ) -> Self {
        Self::build_pool(net, at, (beat_ms, dead_ms), supervisor, (2, 0), "1")
    }

    fn build_pool(
        net: Option<Net>,
        at: Addresses,
        (beat_ms, dead_ms): (u64, u64),
        supervisor: &str,
        (pooled, spares): (usize, usize),
        raid: &str,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let names: Vec<String> = (0..pooled).map(|i| format!("d{i}")).collect();
        let names = names.join(",");
        let drives = pooled + spares;
        let sims = (0..drives)
            .map(|i| drive_sim(dir.path(), &format!("d{i}"), "256M").0)
            .collect();
        let a = Node::start_in(
            net.as_ref().map(|n| n.a.as_str()),
            &config_with_drives(1, dir.path(), &at, beat_ms, dead_ms, drives).replace(
                "crash_loop_window_s = 1\n",
                &format!("crash_loop_window_s = 1\n{supervisor}\n"),
            ),
        );
        let mut a = a;
        a.log.wait_for(&["metadata service ready"]);
        ctl_ok(
            &a,
            &["pool", "create", "tank", "--raid", raid, "--drives", &names],
        );
        ctl_ok(
            &a,
            &[
                "volume", "create", "vol0", "--pool", "tank", "--size", "16m",
            ],
        );
        ctl_ok(&a, &["subsystem", "create", SUBNQN]);
        ctl_ok(&a, &["host", "allow", SUBNQN, HOSTNQN]);
        ctl_ok(&a, &["namespace", "add", SUBNQN, "--volume", "vol0"]);
        let mut b = Node::start_in(
            net.as_ref().map(|n| n.b.as_str()),
            &config_with_drives(2, dir.path(), &at, beat_ms, dead_ms, drives).replace(
                "crash_loop_window_s = 1\n",
                &format!("crash_loop_window_s = 1\n{supervisor}\n"),
            ),
        );
        b.log
            .wait_for(&["pool owned by the peer: exported inaccessible here", "tank"]);
        let mut pair = Self {
            nodes: [a, b],
            sims,
            dir,
            at,
            net,
        };
        for i in 0..2 {
            pair.wait_status(i, |v| {
                v["peer"]["state"] == "alive" && v["disk"]["peer_counter"].as_u64().unwrap_or(0) > 0
            });
        }
        pair
    }

    /// The namespaces (the rig must have them).
    pub fn net(&self) -> &Net {
        self.net.as_ref().expect("a rig in network namespaces")
    }

    /// A command run in the host namespace (or here, on loopback).
    pub fn host_command(&self, program: &Path) -> Command {
        match &self.net {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.h]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Node `i` (0: node 1).
    pub fn node(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    /// `duplexctl --json cluster status` on node `i`, once it satisfies `want`.
    pub fn wait_status(
        &mut self,
        i: usize,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_cluster_status(&mut self.nodes[i], want)
    }

    /// Drive `i`'s status as its simulator reports it.
    pub fn sim_status(&self, i: usize) -> serde_json::Value {
        let out = Command::new(bin("duplex-drive-sim"))
            .arg("ctl")
            .arg("--control")
            .arg(self.dir.path().join(format!("d{i}.ctl")))
            .arg("status")
            .output()
            .expect("ctl runs");
        serde_json::from_slice(&out.stdout).expect("JSON")
    }

    /// `duplex-drive-sim ctl ARGS` on drive `i`, which must succeed.
    pub fn sim_ctl(&self, i: usize, args: &[&str]) {
        let out = Command::new(bin("duplex-drive-sim"))
            .arg("ctl")
            .arg("--control")
            .arg(self.dir.path().join(format!("d{i}.ctl")))
            .args(args)
            .output()
            .expect("ctl runs");
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The keys registered on drive `i`.
    pub fn drive_keys(&self, i: usize) -> Vec<u64> {
        self.sim_status(i)["reservation"]["registrants"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k["key"].as_u64())
            .collect()
    }

    /// Writes drive `i` executed through node `node`'s port (1: A, 2: B).
    pub fn port_writes(&self, i: usize, node: u64) -> u64 {
        self.sim_status(i)["port_writes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["cntlid"] == node)
            .and_then(|p| p["writes"].as_u64())
            .unwrap_or(0)
    }

    /// Waits until drive 0 counts `more` writes through node `node`'s port beyond now.
    pub fn wait_more_writes(&self, node: u64, more: u64) {
        let want = self.port_writes(0, node) + more;
        let deadline = Instant::now() + PATIENCE;
        while self.port_writes(0, node) < want {
            assert!(
                Instant::now() < deadline,
                "writes through node {node} stalled"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Starts the host's multipath workload in the host namespace: `duplex-bench --paths`
    /// over both controllers with `args`, `--json`; it stops its load once `stop` exists.
    pub fn multipath(&self, args: &[&str], stop: &Path) -> KillOnDrop {
        let child = self
            .host_command(&bin("duplex-bench"))
            .args(["--nqn", SUBNQN, "--hostnqn", HOSTNQN])
            .arg("--paths")
            .arg(format!("{},{}", self.at.nvme[0], self.at.nvme[1]))
            .args(args)
            .arg("--stop-file")
            .arg(stop)
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("duplex-bench runs");
        KillOnDrop(child)
    }

    /// `duplex-bench` on one path (node `node`'s) from the host namespace: (code, out, err).
    pub fn bench_one(&self, node: usize, args: &[&str]) -> (i32, String, String) {
        let out = self
            .host_command(&bin("duplex-bench"))
            .args(["--nqn", SUBNQN, "--hostnqn", HOSTNQN])
            .arg("--target")
            .arg(self.at.nvme[node - 1].to_string())
            .args(args)
            .output()
            .expect("duplex-bench runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Ends a multipath workload (creates its stop file) and returns its JSON report, which must
/// say 0 I/O errors and 0 verify errors.
pub fn finish_multipath(bench: &mut KillOnDrop, stop: &Path) -> serde_json::Value {
    std::fs::write(stop, b"").expect("stop file");
    let out = bench.wait_output();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the host's workload failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(r["io_errors"], 0, "{r}");
    assert_eq!(r["verify_errors"], 0, "{r}");
    assert!(r["blocks_checked"].as_u64() > Some(0), "{r}");
    r
}

/// `duplexctl --json cluster status` on `node`, once it satisfies `want`.
pub fn wait_cluster_status(
    node: &mut Node,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(Some(status)) = node.duplexd.0.try_wait() {
            // A node that ended answers nothing more: say so at once, with why.
            node.log.drain();
            panic!(
                "duplexd ended ({status}) while its cluster status was awaited; its log:\n{}",
                node.log.tail(300)
            );
        }
        let (code, out, err) = node.ctl(&["--json", "cluster", "status"]);
        if code == 0 {
            let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
            if want(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                node.log.pump();
                panic!(
                    "cluster status never matched: {v}\nthe node's log:\n{}",
                    node.log.tail(200)
                );
            }
        } else if Instant::now() >= deadline {
            node.log.pump();
            panic!(
                "no cluster status: {out}{err}\nthe node's log:\n{}",
                node.log.tail(200)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits until at least `n` lines of `log` contain every one of `parts`.
pub fn wait_count(log: &mut Log, parts: &[&str], n: usize) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        log.pump();
        if log.matching(parts).len() >= n {
            return;
        }
        if Instant::now() >= deadline {
            // Why it did not come is usually in a warning or an error (a takeover that failed,
            // a lost fencing race), which may be far above the tail.
            let mut notable: Vec<&String> = log
                .seen_lines()
                .iter()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            let skip = notable.len().saturating_sub(80);
            notable.drain(..skip);
            panic!(
                "fewer than {n} log lines with {parts:?} within {PATIENCE:?}\nthe log's last warnings and errors:\n{}\nits tail:\n{}",
                notable
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
                log.tail(100)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
