//! The real `duplex-datapath` process under its seccomp policy, with this test playing duplexd
//! (lifecycle handshake, handed-over health region, topology, pool, rings, doorbells, volume
//! files) and the fabric (I/O through the rings). Also proves every rule of
//! `sandbox/policies/datapath.policy` needed, with `duplex-datapath-probe` (the same service,
//! entering the policy without one rule).
//!
//! No timing assertions beyond generous deadlines; every spawned process is killed and reaped
//! when its handle drops. `DATAPATH_TEST_STRACE=DIR` runs each process under `strace -f` (one
//! file per thread in DIR; the `/proc` checks are then skipped, they would see strace): how the
//! policy was written.
#![cfg(target_arch = "x86_64")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use duplex_ipc::control::{
    Body, ControlChannel, Envelope, Fault, Resource, ResourceKind, StartMode,
};
use duplex_ipc::desc::{
    IoDesc, FLAG_FUA, OP_DEALLOCATE, OP_FLUSH, OP_WRITE_ZEROES, STATUS_LBA_OUT_OF_RANGE,
    STATUS_SUCCESS,
};
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::lifecycle::{Health, CONTROL_FD_ENV};
use duplex_ipc::maps::{
    Extent, MapsChannel, MapsMessage, MapsReply, MapsRequest, MemberState, PoolSlot, PoolSpec,
    PublishVolumes, RaidLevel, VolumeMap, MAPS_RESOURCE,
};
use duplex_ipc::pool::{Holder, Pool};
use duplex_ipc::ring::{self, Consumer, Producer, RingRegion, WaitPolicy};
use duplex_ipc::topology::{
    ChannelSpec, IoSpec, Topology, VolumeSpec, ROLE_FABRIC, TOPOLOGY_VERSION,
};
use duplex_sandbox::Policy;

const DATAPATH: &str = env!("CARGO_BIN_EXE_duplex-datapath");
const PROBE: &str = env!("CARGO_BIN_EXE_duplex-datapath-probe");

/// What duplexd holds for the datapath, and the fabric's ends.
struct Duplexd {
    _dir: (tempfile::TempDir, tempfile::TempDir),
    health: Health,
    topology: OwnedFd,
    pool: Arc<Pool>,
    rings: Vec<(
        String,
        RingRegion<duplex_ipc::desc::IoDesc>,
        Doorbell,
        Doorbell,
    )>,
    volumes: Vec<(String, std::fs::File)>,
    /// Pool drives: resource, opened file, path.
    drives: Vec<(String, std::fs::File, std::path::PathBuf)>,
    /// The maps channel: the datapath's end (handed over) and the metadata service's (kept
    /// across its incarnations, as duplexd keeps it).
    maps: Option<(MapsChannel, MapsChannel)>,
}

/// What a test node hands the datapath.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// How many of the two standard volumes (v1: 512-byte blocks on disk, v2: 4 KiB blocks in
    /// memory).
    volumes: usize,
    /// The fabric's channel `io0`.
    io: bool,
    /// Pool drives (sparse files of [`DRIVE_BYTES`], 4 KiB blocks).
    drives: usize,
    /// The metadata service's raw channel `meta`.
    meta: bool,
    /// The maps channel.
    maps: bool,
}

impl Layout {
    /// The layout of the original tests: two volumes, one fabric channel.
    const STANDARD: Self = Self {
        volumes: 2,
        io: true,
        drives: 0,
        meta: false,
        maps: false,
    };
}

/// Size of each pool drive.
const DRIVE_BYTES: u64 = 96 << 20;
/// Block size of the pool drives.
const DRIVE_BS: u32 = 4096;

/// The datapath process.
struct Datapath {
    child: Child,
    control: ControlChannel,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Datapath {
    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for the process to end (killing it after `within`).
    fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Everything it wrote is in the log once the reader saw the pipe's end.
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "datapath did not exit within {within:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn send(&self, body: Body) {
        let env = Envelope {
            request_id: self.control.next_request_id(),
            epoch: 1,
            body,
        };
        self.control.send(&env, &[]).unwrap();
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a sparse file of `bytes` at `path` and opens it as duplexd would: O_DIRECT where
/// the file system allows it. Returns the file and whether it is direct.
fn backing_file(path: &std::path::Path, bytes: u64) -> (std::fs::File, bool) {
    std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
    let open = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_DIRECT) {
        Ok(f) => (f, true),
        Err(_) => (open(0).unwrap(), false),
    }
}

impl Duplexd {
    fn new() -> Self {
        Self::build(Layout::STANDARD)
    }

    fn build(layout: Layout) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Volume 2 lives in memory (tmpfs): the engine maps it and copies, so the policy tests
        // exercise both ways.
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let mut specs = Vec::new();
        let mut volumes = Vec::new();
        for (id, bs, blocks) in [(1_u32, 512_u32, 4096_u64), (2, 4096, 512)]
            .into_iter()
            .take(layout.volumes)
        {
            let name = format!("v{id}");
            let path = if id == 2 { shm.path() } else { dir.path() }.join(&name);
            let (file, direct) = backing_file(&path, u64::from(bs) * blocks);
            specs.push(VolumeSpec {
                id,
                name: name.clone(),
                resource: format!("volume:{name}"),
                path: path.display().to_string(),
                block_size: bs,
                blocks,
                direct,
                drive: None,
            });
            volumes.push((format!("volume:{name}"), file));
        }
        let mut drive_specs = Vec::new();
        let mut drives = Vec::new();
        for i in 0..layout.drives {
            let name = format!("d{i}");
            let path = dir.path().join(&name);
            let (file, direct) = backing_file(&path, DRIVE_BYTES);
            drive_specs.push(VolumeSpec {
                id: i as u32,
                name: name.clone(),
                resource: format!("drive:{name}"),
                path: path.display().to_string(),
                block_size: DRIVE_BS,
                blocks: DRIVE_BYTES / u64::from(DRIVE_BS),
                direct,
                drive: None,
            });
            drives.push((format!("drive:{name}"), file, path));
        }
        let channel = |name: &str| ChannelSpec {
            submit: format!("{name}.sq"),
            complete: format!("{name}.cq"),
        };
        let topology = Topology {
            version: TOPOLOGY_VERSION,
            node: "a".into(),
            cntlid_base: 1,
            ana_group: 1,
            volumes: specs,
            subsystems: vec![],
            io: IoSpec {
                pool: "io".into(),
                channels: if layout.io {
                    vec![channel("io0")]
                } else {
                    vec![]
                },
            },
            listeners: vec![],
            drives: drive_specs,
            meta: layout.meta.then(|| channel("meta")),
            cluster: None,
        };
        let pool = Pool::create(
            "pool:io",
            4096,
            1024,
            Holder {
                role: ROLE_FABRIC,
                incarnation: EPOCH,
            },
        )
        .unwrap();
        let mut rings = Vec::new();
        let names = [("io0.sq", 1_u8), ("io0.cq", 2)]
            .into_iter()
            .filter(|_| layout.io)
            .chain(
                [("meta.sq", 3), ("meta.cq", 4)]
                    .into_iter()
                    .filter(|_| layout.meta),
            );
        for (name, id) in names {
            let region = RingRegion::create(name, 64, id).unwrap();
            let (data, space) = ring::doorbells().unwrap();
            rings.push((name.to_owned(), region, data, space));
        }
        Self {
            _dir: (dir, shm),
            health: Health::create("datapath", Duration::from_millis(100)).unwrap(),
            topology: topology.to_memfd().unwrap(),
            pool: Arc::new(pool),
            rings,
            volumes,
            drives,
            maps: layout.maps.then(|| MapsChannel::pair().unwrap()),
        }
    }

    /// The fabric's ends of the channel.
    fn fabric(&self) -> Fabric {
        self.ends("io0", HashMap::from([(1, 512), (2, 4096)]))
    }

    /// The metadata service's ends of its raw channel (volume = raw drive id).
    fn meta(&self) -> Fabric {
        let ids = (0..self.drives.len() as u32).map(|i| (i + self.volumes.len() as u32, DRIVE_BS));
        self.ends("meta", ids.collect())
    }

    /// One incarnation of the metadata service's end of the maps channel (`generation` numbers
    /// its requests, as the metadata service does).
    fn metadata(&self, generation: u64) -> MapsChannel {
        let (_, theirs) = self.maps.as_ref().expect("a node with a maps channel");
        let fd = theirs.as_fd().try_clone_to_owned().unwrap();
        MapsChannel::from_fd(fd)
            .unwrap()
            .with_first_request_id(generation << 32)
    }

    /// The submitting ends of channel `name`.
    fn ends(&self, name: &str, block_sizes: HashMap<u32, u32>) -> Fabric {
        let clone = |d: &Doorbell| d.try_clone().unwrap();
        let ring = |n: String| {
            self.rings
                .iter()
                .find(|r| r.0 == n)
                .unwrap_or_else(|| panic!("no ring {n}"))
        };
        let (_, sq, sq_data, sq_space) = ring(format!("{name}.sq"));
        let (_, cq, cq_data, cq_space) = ring(format!("{name}.cq"));
        let mut p = Producer::attach(
            sq.try_clone().unwrap(),
            clone(sq_data),
            clone(sq_space),
            EPOCH,
            ring::StartMode::Fresh,
        )
        .unwrap();
        let mut c = Consumer::attach(
            cq.try_clone().unwrap(),
            clone(cq_data),
            clone(cq_space),
            EPOCH,
            ring::StartMode::Fresh,
        )
        .unwrap();
        p.set_policy(WaitPolicy::Doorbell);
        c.set_policy(WaitPolicy::Doorbell);
        Fabric {
            pool: Arc::clone(&self.pool),
            sq: p,
            cq: c,
            next_tag: 0,
            block_sizes,
        }
    }

    /// Spawns `exe` as duplexd would (empty environment but the lifecycle variables and
    /// `RUST_LOG`), answers its Hello with Start and the resources (all but `leave_out`).
    fn spawn(&self, exe: &str, args: &[&str], leave_out: Option<&str>) -> Datapath {
        let (ours, theirs) = ControlChannel::pair().unwrap();
        let theirs = theirs.into_fd();
        let strace = std::env::var_os("DATAPATH_TEST_STRACE");
        let mut cmd = match &strace {
            Some(dir) => {
                let mut c = Command::new("strace");
                c.args(["-f", "-qq", "-ff", "-o"])
                    .arg(std::path::Path::new(dir).join("datapath"))
                    .arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.args(args)
            .env_clear()
            .env(CONTROL_FD_ENV, theirs.as_raw_fd().to_string())
            .env("DUPLEX_SERVICE", "datapath")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = duplex_ipc::testkit::spawn_with_fds(&mut cmd, &[theirs.as_fd()]).unwrap();
        drop(theirs);
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            let mut buf = [0_u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let dp = Datapath {
            child,
            control: ours,
            log,
            reader: Some(reader),
        };
        let (hello, _) = dp
            .control
            .recv_timeout(DEADLINE)
            .unwrap()
            .unwrap_or_else(|| panic!("no hello; log:\n{}", dp.log()));
        let Body::Hello { service, .. } = hello.body else {
            panic!("expected hello, got {:?}", hello.body);
        };
        assert_eq!(service, "datapath");
        let mut resources = Vec::new();
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        let mut add = |name: &str, kind, fd| {
            if leave_out == Some(name) {
                return;
            }
            resources.push(Resource {
                name: name.into(),
                kind,
                fd_index: fds.len() as u32,
            });
            fds.push(fd);
        };
        add("health", ResourceKind::Region, self.health.region().fd());
        add("topology", ResourceKind::File, self.topology.as_fd());
        add("pool:io", ResourceKind::Pool, self.pool.region().fd());
        for (name, region, data, space) in &self.rings {
            add(
                &format!("ring:{name}"),
                ResourceKind::RingRegion,
                region.region().fd(),
            );
            add(
                &format!("ring:{name}:data"),
                ResourceKind::Eventfd,
                data.fd(),
            );
            add(
                &format!("ring:{name}:space"),
                ResourceKind::Eventfd,
                space.fd(),
            );
        }
        for (name, file) in &self.volumes {
            add(name, ResourceKind::File, file.as_fd());
        }
        for (name, file, _) in &self.drives {
            add(name, ResourceKind::File, file.as_fd());
        }
        if let Some((ours, _)) = &self.maps {
            add(MAPS_RESOURCE, ResourceKind::Socket, ours.as_fd());
        }
        let start = Envelope {
            request_id: dp.control.next_request_id(),
            epoch: 1,
            body: Body::Start {
                generation: 1,
                mode: StartMode::Fresh,
                resources,
            },
        };
        dp.control.send(&start, &fds).unwrap();
        dp
    }

    /// Spawns the real datapath and waits for Ready.
    fn start(&self) -> Datapath {
        let dp = self.spawn(DATAPATH, &[], None);
        let (ready, _) = dp
            .control
            .recv_timeout(DEADLINE)
            .unwrap()
            .unwrap_or_else(|| panic!("no ready; log:\n{}", dp.log()));
        assert_eq!(
            ready.body,
            Body::Ready { generation: 1 },
            "log:\n{}",
            dp.log()
        );
        dp
    }
}

/// The `status` files of every thread of `pid`.
fn thread_statuses(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .collect()
}

/// The scenario of the policy probe: whatever it gets to do before it dies (Ready, one I/O,
/// Shutdown). Returns how it ended.
fn probe_run(node: &Duplexd, omit: &str) -> (ExitStatus, String) {
    let mut dp = node.spawn(PROBE, &["--omit", omit], None);
    let _ = dp.control.recv_timeout(Duration::from_secs(5));
    let mut f = node.fabric();
    f.read(1, 0, 1);
    f.write(2, 0, &[7; 4096], 0);
    f.read(2, 0, 1);
    let mut got = Vec::new();
    // Each step's completions are awaited until they come or the probe dies, with no clock
    // bound: a Shutdown that overtook a slow (loaded) probe's work would end it before it ever
    // idled and polled, or before the shrunken file faulted, and the sched_yield or rt_sigreturn
    // rule would look unneeded (a 30 s bound did, once, on a loaded CI machine).
    fn await_completions(f: &mut Fabric, dp: &mut Datapath, got: &mut Vec<IoDesc>, n: usize) {
        while got.len() < n {
            if dp.child.try_wait().unwrap().is_some() {
                return;
            }
            let _ = f.cq.pop_wait(got, n, Some(Duration::from_millis(100)));
        }
    }
    await_completions(&mut f, &mut dp, &mut got, 3);
    // Volume 2's file shrinks under the datapath's mapping: the read past the new end faults
    // (SIGBUS), the handler repairs the mapping and returns (rt_sigreturn), the read fails.
    node.volumes[1].1.set_len(4096).unwrap();
    f.read(2, 100, 1);
    await_completions(&mut f, &mut dp, &mut got, 4);
    let env = Envelope {
        request_id: dp.control.next_request_id(),
        epoch: 1,
        body: Body::Shutdown {
            reason: "test".into(),
            deadline_ms: 5000,
        },
    };
    let _ = dp.control.send(&env, &[]);
    let status = dp.wait(DEADLINE);
    assert_ne!(
        status.code(),
        Some(2),
        "probe usage error; log:\n{}",
        dp.log()
    );
    (status, dp.log())
}

/// Every opcode once, checked.
fn exercise(f: &mut Fabric) {
    for (vol, bs) in [(1_u32, 512_usize), (2, 4096)] {
        for blocks in [1, 8, 32] {
            let data = pattern(blocks as u64 ^ u64::from(vol), bs * blocks);
            let w = f.write_sync(vol, 3, &data, if blocks == 8 { FLAG_FUA } else { 0 });
            assert_eq!(w.desc.status, STATUS_SUCCESS, "{:?}", w.desc);
            assert_eq!(f.read_sync(vol, 3, blocks as u32).data.unwrap(), data);
        }
        for opcode in [OP_WRITE_ZEROES, OP_DEALLOCATE] {
            let d = f.call(
                IoDesc {
                    opcode,
                    volume: vol,
                    lba: 4,
                    blocks: 2,
                    ..IoDesc::default()
                },
                0,
                &[],
            );
            assert_eq!(d.desc.status, STATUS_SUCCESS);
            assert!(f.read_sync(vol, 4, 2).data.unwrap().iter().all(|&b| b == 0));
        }
    }
    let flush = f.call(
        IoDesc {
            opcode: OP_FLUSH,
            volume: duplex_datapath::FLUSH_ALL,
            ..IoDesc::default()
        },
        0,
        &[],
    );
    assert_eq!(flush.desc.status, STATUS_SUCCESS);
    let bad = f.call(
        IoDesc {
            opcode: OP_WRITE_ZEROES,
            volume: 2,
            lba: 512,
            blocks: 1,
            ..IoDesc::default()
        },
        0,
        &[],
    );
    assert_eq!(bad.desc.status, STATUS_LBA_OUT_OF_RANGE);
}

#[test]
fn serves_io_under_its_policy_beats_and_stops_on_shutdown() {
    let node = Duplexd::new();
    let mut dp = node.start();
    let traced = std::env::var_os("DATAPATH_TEST_STRACE").is_some();
    for s in thread_statuses(dp.child.id()).iter().filter(|_| !traced) {
        assert!(s.contains("\nSeccomp:\t2\n"), "{s}");
        assert!(s.contains("\nNoNewPrivs:\t1\n"), "{s}");
    }
    let mut f = node.fabric();
    exercise(&mut f);
    // Beats while idle (interval 100 ms: at least every 25 ms).
    let before = node.health.count();
    std::thread::sleep(Duration::from_millis(300));
    assert!(node.health.count() >= before + 3, "log:\n{}", dp.log());
    dp.send(Body::Shutdown {
        reason: "test".into(),
        deadline_ms: 5000,
    });
    let status = dp.wait(DEADLINE);
    assert!(status.success(), "{status:?}; log:\n{}", dp.log());
    let log = dp.log();
    assert!(log.contains("datapath ready"), "{log}");
    assert!(log.contains("seccomp policy in force"), "{log}");
    assert!(log.contains("datapath engine stopped"), "{log}");
    assert_eq!(
        node.pool.free_count(),
        node.pool.capacity() as usize,
        "every chunk came back"
    );
}

#[test]
fn injected_faults_kill_abort_or_hang_it() {
    let node = Duplexd::new();
    // A forbidden system call: killed by seccomp.
    let mut dp = node.start();
    dp.send(Body::Inject {
        fault: Fault::ForbiddenSyscall,
    });
    let status = dp.wait(DEADLINE);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "log:\n{}", dp.log());
    drop(dp);

    // A panic aborts.
    let node = Duplexd::new();
    let mut dp = node.start();
    dp.send(Body::Inject {
        fault: Fault::Panic,
    });
    let status = dp.wait(DEADLINE);
    assert_eq!(status.signal(), Some(libc::SIGABRT), "log:\n{}", dp.log());
    drop(dp);

    // A hang stops the heartbeat (the watchdog would kill it).
    let node = Duplexd::new();
    let mut dp = node.start();
    dp.send(Body::Inject { fault: Fault::Hang });
    let deadline = Instant::now() + DEADLINE;
    loop {
        let before = node.health.count();
        std::thread::sleep(Duration::from_millis(200));
        if node.health.count() == before {
            break;
        }
        assert!(Instant::now() < deadline, "the heartbeat never stopped");
    }
    assert!(
        dp.child.try_wait().unwrap().is_none(),
        "a hang is not an exit"
    );
}

#[test]
fn a_missing_resource_fails_the_start_naming_it() {
    let node = Duplexd::new();
    let mut dp = node.spawn(DATAPATH, &[], Some("volume:v2"));
    let status = dp.wait(DEADLINE);
    assert_eq!(status.code(), Some(1), "log:\n{}", dp.log());
    assert!(dp.log().contains("`volume:v2`"), "log:\n{}", dp.log());
}

#[test]
fn it_stops_when_the_supervisor_goes_away() {
    let node = Duplexd::new();
    let mut dp = node.start();
    let mut f = node.fabric();
    assert_eq!(
        f.read_sync(1, 0, 1).desc.status,
        STATUS_SUCCESS,
        "log:\n{}",
        dp.log()
    );
    let (ours, _) = ControlChannel::pair().unwrap();
    drop(std::mem::replace(&mut dp.control, ours));
    let status = dp.wait(DEADLINE);
    assert!(status.success(), "{status:?}; log:\n{}", dp.log());
}

#[test]
fn every_datapath_rule_is_needed() {
    let policy = Policy::for_service("datapath").unwrap();
    let mut unneeded = Vec::new();
    let rules: Vec<_> = policy
        .rules()
        .iter()
        .filter(|r| r.file() == "datapath.policy")
        .collect();
    assert!(!rules.is_empty());
    // The probe itself, with the whole policy installed its way, runs the scenario cleanly:
    // the deaths below are the omitted rules'.
    let (status, log) = probe_run(&Duplexd::new(), "none");
    assert!(status.success(), "{status:?}; log:\n{log}");
    assert!(log.contains("datapath engine stopped"), "{log}");
    for rule in rules {
        let at = format!("{}:{}", rule.file(), rule.line());
        // One run killed for the missing rule proves it is needed; a rule only some runs reach
        // (the scheduler decides whether the engine idles) gets three runs to show it.
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let (status, _) = probe_run(&Duplexd::new(), &at);
            statuses.push(status);
            if status.signal() == Some(libc::SIGSYS) {
                break;
            }
        }
        if statuses.last().and_then(|s| s.signal()) != Some(libc::SIGSYS) {
            unneeded.push(format!("{rule} (exits {statuses:?})"));
        }
    }
    assert!(
        unneeded.is_empty(),
        "rules the datapath does not need (exercise them or remove them):\n{}",
        unneeded.join("\n")
    );
}

// -- Pool drives, the metadata service's raw channel and the maps channel.

/// Where the pools' data areas start on each drive (block aligned, well inside the drive).
const DATA_OFFSET: u64 = 81 << 20;
/// Bytes of each member's data area.
const DATA_LEN: u64 = 8 << 20;
/// Stripe chunk.
const CHUNK: u64 = 64 << 10;

/// A RAID 1 pool over raw drives `drives`, holding writes after a member failure until it is
/// recorded.
fn mirror(name: &str, epoch: u64, drives: Vec<u32>) -> PoolSpec {
    PoolSpec {
        epoch,
        name: name.into(),
        level: RaidLevel::Raid1,
        chunk: CHUNK,
        data_offset: DATA_OFFSET,
        data_len: DATA_LEN,
        drives,
        states: vec![],
        hold_until_recorded: true,
        journal: None,
        seq_base: 1,
        resync: false,
        seq_limit: 0,
        bitmap: None,
        resync_members: 0,
        rebuild_from: vec![],
        checksum: None,
    }
}

/// A volume of `blocks` 4 KiB blocks at byte `offset` of device `device`.
fn volume(id: u32, device: u32, offset: u64, blocks: u64) -> VolumeMap {
    VolumeMap {
        id,
        name: format!("vol{id}"),
        block_size: DRIVE_BS,
        blocks,
        extents: vec![Extent {
            start: 0,
            blocks,
            device,
            device_offset: offset,
        }],
    }
}

/// `len` bytes of the file at `path` from `offset`, read past the datapath (no O_DIRECT).
fn file_bytes(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut out, offset)
        .unwrap();
    out
}

/// Flushes everything reachable through `f`.
fn flush_all(f: &mut Fabric) {
    let d = f.call(
        IoDesc {
            opcode: OP_FLUSH,
            volume: duplex_datapath::FLUSH_ALL,
            ..IoDesc::default()
        },
        0,
        &[],
    );
    assert_eq!(d.desc.status, STATUS_SUCCESS);
}

/// Asks for an orderly stop and checks it happened, with nothing logged as a panic.
fn shut_down(mut dp: Datapath) {
    dp.send(Body::Shutdown {
        reason: "test".into(),
        deadline_ms: 5000,
    });
    let status = dp.wait(DEADLINE);
    assert!(status.success(), "{status:?}; log:\n{}", dp.log());
    assert!(!dp.log().contains("panicked"), "{}", dp.log());
}

/// Every thread of the datapath (the maps threads included) runs under its policy.
fn assert_sandboxed(dp: &Datapath) {
    if std::env::var_os("DATAPATH_TEST_STRACE").is_some() {
        return;
    }
    // The maps threads start after Ready.
    common::wait_until("engine, lifecycle, maps and maps-events threads", || {
        thread_statuses(dp.child.id()).len() >= 4
    });
    for s in thread_statuses(dp.child.id()) {
        assert!(s.contains("\nSeccomp:\t2\n"), "{s}");
    }
}

#[test]
fn pools_and_volumes_published_on_the_maps_channel_are_served_to_the_fabric() {
    // Volume v1 (device 0), then the pool drives d0, d1 (raw drive ids 1, 2).
    let node = Duplexd::build(Layout {
        volumes: 1,
        io: true,
        drives: 2,
        meta: false,
        maps: true,
    });
    let dp = node.start();
    assert_sandboxed(&dp);
    let mut md = node.metadata(1);
    let devices = md.list_devices(DEADLINE).unwrap();
    assert_eq!(devices.len(), 3, "{devices:?}");
    assert_eq!((devices[0].index, devices[0].name.as_str()), (0, "v1"));
    for (i, d) in devices[1..].iter().enumerate() {
        assert_eq!(d.index, 1 + i as u32);
        assert_eq!(d.name, format!("d{i}"));
        assert_eq!((d.size_bytes, d.block_size), (DRIVE_BYTES, DRIVE_BS));
        assert!(d.members.is_empty() && d.member_of.is_none(), "{d:?}");
        // Plain files keep no integrity records: a pool over them gets a checksum area.
        assert!(!d.records, "{d:?}");
    }

    // Garbage is dropped; a request whose id can be read but whose body is broken (an unknown
    // RAID level) is answered with an error; the channel serves on.
    md.send_raw_for_tests(b"garbage, not a request").unwrap();
    let mut bad = MapsRequest::PublishPool(mirror("p", 1, vec![1, 2])).encode(4242);
    assert_eq!(&bad[48..50], &[1, 0], "layout of PoolSpec.level changed");
    bad[48] = 9;
    md.send_raw_for_tests(&bad).unwrap();
    match md.recv_message(DEADLINE).unwrap() {
        Some(MapsMessage::Reply {
            request_id: 4242,
            reply: MapsReply::Error(why),
        }) => assert!(why.contains("malformed"), "{why}"),
        other => panic!("expected the error reply to 4242, got {other:?}"),
    }

    // RAID 1 over both drives, then a volume table in two parts: vol7 is the first half of the
    // pool's data area, vol8 the second.
    let pool = md
        .publish_pool(mirror("tank", 1, vec![1, 2]), DEADLINE)
        .unwrap();
    assert_eq!(pool, 3);
    // Replayed (as a restarted metadata service does): the same device. Another pool over
    // the same drives is refused.
    let again = md.publish_pool(mirror("tank", 1, vec![1, 2]), DEADLINE);
    assert_eq!(again.unwrap(), pool);
    let other = md.publish_pool(mirror("other", 1, vec![1, 2]), DEADLINE);
    assert!(other.is_err(), "a second pool over taken drives: {other:?}");
    let half = DATA_LEN / 2;
    let blocks = half / u64::from(DRIVE_BS);
    let part = |part, more, v: VolumeMap| {
        MapsRequest::PublishVolumes(PublishVolumes {
            epoch: 1,
            volumes: vec![v],
            part,
            more,
        })
    };
    let vol7 = volume(7, pool, 0, blocks);
    let vol8 = volume(8, pool, half, blocks);
    for request in [part(0, true, vol7.clone()), part(1, false, vol8.clone())] {
        assert_eq!(md.call(&request, DEADLINE).unwrap(), MapsReply::Done);
    }
    // A part out of order is refused.
    let reply = md.call(&part(3, false, vol7), DEADLINE).unwrap();
    assert!(matches!(reply, MapsReply::Error(_)), "{reply:?}");

    // The fabric writes the volumes; the data lands at the data offset of both drives.
    let mut f = node.ends(
        "io0",
        HashMap::from([(1, 512), (7, DRIVE_BS), (8, DRIVE_BS)]),
    );
    let bs = DRIVE_BS as usize;
    let writes = [(7_u32, 0_u64, 8_usize), (7, 100, 3), (8, 3, 16)];
    for (i, &(vol, lba, n)) in writes.iter().enumerate() {
        let d = f.write_sync(vol, lba, &pattern(i as u64 + 1, n * bs), 0);
        assert_eq!(d.desc.status, STATUS_SUCCESS, "{d:?}; log:\n{}", dp.log());
    }
    flush_all(&mut f);
    for (i, &(vol, lba, n)) in writes.iter().enumerate() {
        let data = pattern(i as u64 + 1, n * bs);
        assert_eq!(f.read_sync(vol, lba, n as u32).data.unwrap(), data);
        let at = DATA_OFFSET + if vol == 8 { half } else { 0 } + lba * u64::from(DRIVE_BS);
        for (_, _, path) in &node.drives {
            assert!(file_bytes(path, at, data.len()) == data, "{path:?} at {at}");
        }
    }
    let devices = md.list_devices(DEADLINE).unwrap();
    assert_eq!(devices.len(), 4, "{devices:?}");
    assert_eq!(devices[3].name, "tank");
    assert_eq!(devices[3].size_bytes, DATA_LEN);
    assert_eq!(
        devices[3].members,
        vec![MemberState::Active, MemberState::Active]
    );
    for slot in 0..2 {
        assert_eq!(
            devices[1 + slot].member_of,
            Some(PoolSlot {
                device: pool,
                slot: slot as u32
            })
        );
    }

    // The metadata service goes away. Meanwhile drive d1 (slot 1) loses its data area: the
    // next read sent to it fails, the member is failed, and the reads succeed from d0.
    drop(md);
    node.drives[1].1.set_len(DATA_OFFSET).unwrap();
    for _ in 0..4 {
        let d = f.read_sync(7, 0, 8);
        assert_eq!(d.desc.status, STATUS_SUCCESS, "log:\n{}", dp.log());
        assert_eq!(d.data.unwrap(), pattern(1, 8 * bs));
    }
    // Its successor gets the event that waited in the socket.
    let mut md = node.metadata(2);
    let e = md
        .recv_event(DEADLINE)
        .unwrap()
        .unwrap_or_else(|| panic!("no member failure; log:\n{}", dp.log()));
    assert_eq!((e.device, e.member, e.name.as_str()), (pool, 1, "d1"));
    // A write now is held until the failure is recorded.
    let data = pattern(99, 2 * bs);
    let tag = f.write(7, 10, &data, 0);
    common::wait_until("the write to be held", || {
        md.list_devices(DEADLINE).unwrap()[3].held == 1
    });
    assert_eq!(f.completions_ready(), 0, "a held write was acknowledged");
    md.failures_recorded(pool, vec![1], DEADLINE).unwrap();
    let done = f.collect(1);
    assert_eq!(done[&tag].desc.status, STATUS_SUCCESS);
    assert_eq!(f.read_sync(7, 10, 2).data.unwrap(), data);
    let devices = md.list_devices(DEADLINE).unwrap();
    assert_eq!(
        devices[3].members,
        vec![MemberState::Active, MemberState::Failed]
    );
    assert_eq!(devices[3].held, 0);
    shut_down(dp);
}

#[test]
fn raw_drives_are_reached_through_the_metadata_channel_in_and_out_of_pools() {
    let node = Duplexd::build(Layout {
        volumes: 0,
        io: false,
        drives: 2,
        meta: true,
        maps: true,
    });
    let dp = node.start();
    let mut md = node.metadata(1);
    let devices = md.list_devices(DEADLINE).unwrap();
    let names: Vec<_> = devices.iter().map(|d| (d.index, d.name.as_str())).collect();
    assert_eq!(names, vec![(0, "d0"), (1, "d1")]);
    // Raw writes (by raw drive id) land where they say: a label at the start of d0, a block
    // deep into d1.
    let mut m = node.meta();
    let bs = DRIVE_BS as usize;
    let label = pattern(1, bs);
    let deep = pattern(2, 4 * bs);
    for (id, lba, data) in [(0, 0, &label), (1, 1000, &deep)] {
        let d = m.write_sync(id, lba, data, 0);
        assert_eq!(d.desc.status, STATUS_SUCCESS, "{d:?}; log:\n{}", dp.log());
    }
    flush_all(&mut m);
    assert!(file_bytes(&node.drives[0].2, 0, bs) == label);
    assert!(file_bytes(&node.drives[1].2, 1000 * 4096, 4 * bs) == deep);
    assert_eq!(m.read_sync(1, 1000, 4).data.unwrap(), deep);
    // Once the drives are a pool's members they are still reached whole, metadata areas
    // included.
    let pool = md
        .publish_pool(mirror("tank", 1, vec![0, 1]), DEADLINE)
        .unwrap();
    assert_eq!(pool, 2);
    let superblock = pattern(3, bs);
    let d = m.write_sync(1, 8, &superblock, 0);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    flush_all(&mut m);
    assert!(file_bytes(&node.drives[1].2, 8 * 4096, bs) == superblock);
    assert_eq!(m.read_sync(0, 0, 1).data.unwrap(), label);
    let devices = md.list_devices(DEADLINE).unwrap();
    assert_eq!(devices.len(), 3, "{devices:?}");
    for (slot, d) in devices.iter().take(2).enumerate() {
        assert_eq!(d.size_bytes, DRIVE_BYTES);
        assert_eq!(
            d.member_of,
            Some(PoolSlot {
                device: pool,
                slot: slot as u32
            })
        );
    }
    shut_down(dp);
}
