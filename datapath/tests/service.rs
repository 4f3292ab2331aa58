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
}

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

impl Duplexd {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Volume 2 lives in memory (tmpfs): the engine maps it and copies, so the policy tests
        // exercise both ways.
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let mut specs = Vec::new();
        let mut volumes = Vec::new();
        for (id, bs, blocks) in [(1_u32, 512_u32, 4096_u64), (2, 4096, 512)] {
            let name = format!("v{id}");
            let path = if id == 2 { shm.path() } else { dir.path() }.join(&name);
            std::fs::File::create(&path)
                .unwrap()
                .set_len(u64::from(bs) * blocks)
                .unwrap();
            // As duplexd opens it: O_DIRECT where the file system allows it.
            let open = |flags| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(flags)
                    .open(&path)
            };
            let (file, direct) = match open(libc::O_DIRECT) {
                Ok(f) => (f, true),
                Err(_) => (open(0).unwrap(), false),
            };
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
        let topology = Topology {
            version: TOPOLOGY_VERSION,
            node: "a".into(),
            cntlid_base: 1,
            ana_group: 1,
            volumes: specs,
            subsystems: vec![],
            io: IoSpec {
                pool: "io".into(),
                channels: vec![ChannelSpec {
                    submit: "io0.sq".into(),
                    complete: "io0.cq".into(),
                }],
            },
            listeners: vec![],
            drives: vec![],
            meta: None,
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
        for (name, id) in [("io0.sq", 1_u8), ("io0.cq", 2)] {
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
        }
    }

    /// The fabric's ends of the channel.
    fn fabric(&self) -> Fabric {
        let clone = |d: &Doorbell| d.try_clone().unwrap();
        let (_, sq, sq_data, sq_space) = &self.rings[0];
        let (_, cq, cq_data, cq_space) = &self.rings[1];
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
            block_sizes: HashMap::from([(1, 512), (2, 4096)]),
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
    // Each step's completions are awaited until they come or the probe dies: a Shutdown that
    // overtook a slow (loaded) probe's work would end it before it ever idled and polled, and
    // the sched_yield rule would look unneeded.
    fn await_completions(f: &mut Fabric, dp: &mut Datapath, got: &mut Vec<IoDesc>, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() < n && Instant::now() < deadline {
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
        let (status, _) = probe_run(&Duplexd::new(), &at);
        if status.signal() != Some(libc::SIGSYS) {
            unneeded.push(format!("{rule} (exit {status:?})"));
        }
    }
    assert!(
        unneeded.is_empty(),
        "rules the datapath does not need (exercise them or remove them):\n{}",
        unneeded.join("\n")
    );
}
