//! Nodes over simulated drives with a pool built through `duplexctl`, shared by the pool system
//! tests (`tests/pools.rs`) and the Linux host's pool test (`tests/interop_linux_pools.rs`).
//!
//! A [`Rig`] starts `n` `duplex-drive-sim` processes (two ports each; the node uses port A), a
//! node with the `metadata` service whose `[[drive]]`s are those drives, and then, as an
//! operator would: `pool create tank`, `volume create vol0`, `subsystem create`, `host allow`,
//! `namespace add` (vol0 as namespace 1).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use duplex_datapath::fence::{Fence, FenceKey, NvmeReservations, Step};
use duplex_datapath::nvme::vfio_user::VfioUser;
use duplex_datapath::nvme::{Controller, DmaMem, Options};

use crate::{bin, free_port, KillOnDrop, Node, PATIENCE};

/// A simulated drive of `size` (drive-sim's syntax: `256M`) with 4 KiB blocks under `dir`;
/// returns the process and its port A socket. Its control socket is `dir/NAME.ctl`.
pub fn drive_sim(dir: &Path, name: &str, size: &str) -> (KillOnDrop, PathBuf) {
    drive_sim_with_metadata(dir, name, size, 0)
}

/// [`drive_sim`] formatted with `metadata` bytes of metadata a block (`--metadata`: 0, 8 or
/// 64): the node then keeps an integrity record in every block's metadata.
pub fn drive_sim_with_metadata(
    dir: &Path,
    name: &str,
    size: &str,
    metadata: u16,
) -> (KillOnDrop, PathBuf) {
    let a = dir.join(format!("{name}-a.sock"));
    let mut sim = Command::new(bin("duplex-drive-sim"))
        .arg("serve")
        .arg("--backing")
        .arg(dir.join(format!("{name}.img")))
        .args(["--size", size, "--block-size", "4096"])
        .args(["--metadata", &metadata.to_string()])
        .arg("--socket")
        .arg(&a)
        .arg("--socket")
        .arg(dir.join(format!("{name}-b.sock")))
        .arg("--control")
        .arg(dir.join(format!("{name}.ctl")))
        .stdout(Stdio::piped())
        .spawn()
        .expect("duplex-drive-sim starts");
    let mut ready = String::new();
    BufReader::new(sim.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("ready line");
    assert!(ready.starts_with("ready "), "{ready}");
    (KillOnDrop(sim), a)
}

/// A node config with the metadata service, one NVMe/TCP listener on `port` and `drives` (port
/// A sockets) as `[[drive]]`s `d0`, `d1`, ... of `size` (duplexd's syntax: `256MiB`). Services
/// restart at once however often they are crashed.
pub fn pool_node_config(port: u16, drives: &[&Path], size: &str) -> String {
    let mut c = format!(
        r#"
[node]
name = "pools"
state_dir = "{{state}}"

[supervisor]
# Services are crashed on purpose here, many times in a row: restart them at once, never call
# it a crash loop.
backoff_initial_ms = 1
backoff_max_ms = 20
crash_loop_exits = 1000
crash_loop_window_s = 1

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

[[listener]]
name = "nvme"
address = "127.0.0.1:{port}"
service = "fabric"
"#
    );
    for (i, d) in drives.iter().enumerate() {
        c.push_str(&format!(
            "\n[[drive]]\nname = \"d{i}\"\ndrive = \"vfio-user:{}\"\nsize = \"{size}\"\n",
            d.display()
        ));
    }
    c
}

/// `duplexctl --json ARGS` on `node`, which must succeed; its JSON.
pub fn ctl_json(node: &Node, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = node.ctl(&all);
    assert_eq!(code, 0, "duplexctl {args:?}: {out}{err}");
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("duplexctl {args:?}: not JSON ({e}): {out}"))
}

/// `duplexctl ARGS` on `node`, which must succeed; its output.
pub fn ctl_ok(node: &Node, args: &[&str]) -> String {
    let (code, out, err) = node.ctl(args);
    assert_eq!(code, 0, "duplexctl {args:?}: {out}{err}");
    out
}

/// Waits until the scrub of pool `pool` on `node` has checked every member byte (a hang guard
/// of [`crate::PATIENCE`]); its findings as `pool show --json` gives them.
pub fn wait_scrub(node: &Node, pool: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + crate::PATIENCE;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "hang: the scrub never finished"
        );
        let p = ctl_json(node, &["pool", "show", pool])["pool"].clone();
        let s = p["scrub"].clone();
        if s.is_object() && s["done_bytes"].as_u64() >= p["member_bytes"].as_u64() {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The states of pool `pool`'s members, in member order, as `duplexctl pool show` gives them.
pub fn member_states(node: &Node, pool: &str) -> Vec<String> {
    ctl_json(node, &["pool", "show", pool])["pool"]["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["state"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// What a [`Rig`] builds.
#[derive(Debug, Clone)]
pub struct RigSpec<'a> {
    /// How many drives (all in the pool).
    pub drives: usize,
    /// `--raid` of the pool: `0`, `1`, `10`, `5` or `6`.
    pub raid: &'a str,
    /// Each drive's size (drive-sim's syntax, `256M`; the node's `[[drive]]` size follows).
    pub drive_mib: u64,
    /// `--size` of `vol0` (`16m`).
    pub volume_size: &'a str,
    /// The subsystem vol0 is exported by.
    pub subnqn: &'a str,
    /// The one host allowed.
    pub hostnqn: &'a str,
    /// `[cluster] node_id` of the node (`None`: a standalone node).
    pub cluster_node: Option<u16>,
    /// Drives beyond the pool's, left free (`d{drives}`, ...): spares.
    pub spares: usize,
    /// Metadata bytes a block of every drive's format (0: none, no integrity records).
    pub metadata: u16,
}

/// A node over simulated drives with pool `tank` over all of them and volume `vol0` exported as
/// namespace 1 of the spec's subsystem to its host.
#[derive(Debug)]
pub struct Rig {
    /// The node.
    pub node: Node,
    /// Its NVMe/TCP port (127.0.0.1).
    pub port: u16,
    /// Where the drives' backing files and sockets are.
    pub dir: tempfile::TempDir,
    /// The drive-sim processes, `d0`, `d1`, ...
    pub sims: Vec<KillOnDrop>,
}

impl Rig {
    /// Starts the drives and the node and builds the configuration with `duplexctl`.
    pub fn new(spec: &RigSpec<'_>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sims = Vec::new();
        let mut socks = Vec::new();
        for i in 0..spec.drives + spec.spares {
            let (sim, a) = drive_sim_with_metadata(
                dir.path(),
                &format!("d{i}"),
                &format!("{}M", spec.drive_mib),
                spec.metadata,
            );
            sims.push(sim);
            socks.push(a);
        }
        let port = free_port();
        let refs: Vec<&Path> = socks.iter().map(|p| p.as_path()).collect();
        let mut config = pool_node_config(port, &refs, &format!("{}MiB", spec.drive_mib));
        if let Some(id) = spec.cluster_node {
            config.push_str(&format!("\n[cluster]\nnode_id = {id}\n"));
        }
        let mut node = Node::start(&config);
        node.log.wait_for(&["metadata service ready"]);
        let names: Vec<String> = (0..spec.drives).map(|i| format!("d{i}")).collect();
        let names = names.join(",");
        let create = ["pool", "create", "tank", "--raid", spec.raid, "--drives"];
        ctl_ok(&node, &[&create[..], &[names.as_str()]].concat());
        ctl_ok(
            &node,
            &[
                "volume",
                "create",
                "vol0",
                "--pool",
                "tank",
                "--size",
                spec.volume_size,
            ],
        );
        ctl_ok(&node, &["subsystem", "create", spec.subnqn]);
        ctl_ok(&node, &["host", "allow", spec.subnqn, spec.hostnqn]);
        ctl_ok(
            &node,
            &["namespace", "add", spec.subnqn, "--volume", "vol0"],
        );
        Self {
            node,
            port,
            dir,
            sims,
        }
    }

    /// `duplex-drive-sim ctl` on drive `i`, which must succeed; its JSON answer (or null).
    pub fn sim(&self, i: usize, args: &[&str]) -> serde_json::Value {
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
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Waits until drive `i` has executed at least `writes` more writes than when called, or
    /// holds that many blocks unflushed in its cache: a workload is under way. (Pools whose
    /// members keep records in a checksum area flush often — a block rewritten before a flush
    /// costs one — so the cache alone may never fill.)
    pub fn wait_writes(&self, i: usize, writes: u64) {
        let deadline = Instant::now() + PATIENCE;
        let seq = |st: &serde_json::Value| st["write_seq"].as_u64().unwrap_or(0);
        let start = seq(&self.sim(i, &["status"]));
        loop {
            let st = self.sim(i, &["status"]);
            if st["cached_blocks"].as_u64().unwrap_or(0) >= writes || seq(&st) >= start + writes {
                break;
            }
            assert!(Instant::now() < deadline, "no writes reached drive {i}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl Rig {
    /// Controllers on every drive's port B, as the peer node reaches the drives, under host
    /// identifier `[host; 16]`.
    pub fn peer_controllers(&self, drives: usize, host: u8) -> Vec<Controller<VfioUser>> {
        (0..drives)
            .map(|i| {
                let t = VfioUser::connect(
                    &self.dir.path().join(format!("d{i}-b.sock")),
                    std::time::Duration::from_secs(5),
                )
                .expect("port B");
                let opts = Options {
                    io_queues: 1,
                    host_id: Some([host; 16]),
                    ..Options::default()
                };
                let mem = DmaMem::create("peer", opts.dma_len(), 0).expect("DMA memory");
                Controller::new(t, mem, opts).expect("port B controller")
            })
            .collect()
    }

    /// Plays the peer node `peer`: joins through the controllers `ctrls` (one per drive, in
    /// drive order) and fences node `victim`'s key (found in the drives' reports). Returns the
    /// key fenced and the steps.
    pub fn fence_node(
        &self,
        ctrls: &mut [Controller<VfioUser>],
        peer: FenceKey,
        victim: u16,
    ) -> (FenceKey, Vec<Step>) {
        let drives = ctrls
            .iter_mut()
            .enumerate()
            .map(|(i, c)| NvmeReservations::new(format!("d{i}"), c, 1, 1))
            .collect();
        let mut fence = Fence::new(drives, peer);
        fence.join().expect("the peer joins");
        let key = fence
            .keys()
            .into_iter()
            .flat_map(|(_, k)| k.expect("report").keys)
            .map(|(k, _)| k)
            .find(|k| k.node() == victim)
            .expect("the victim's key on the drives");
        let steps = fence.fence(key).expect("the peer fences the node");
        (key, steps)
    }
}
