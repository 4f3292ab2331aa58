//! The test's own little supervisor: it creates what duplexd would (listening `mgmt.sock`, admin
//! channel, config channel, health region), spawns the real `duplex-mgmt` with the environment
//! duplexd gives it, does the lifecycle handshake, answers admin requests with canned replies,
//! plays the metadata service on the config channel (canned replies too), and runs the real
//! `duplexctl` against the socket.
//!
//! Two knobs for working on the seccomp policy (off by default):
//! * `MGMT_TEST_SANDBOX=off` spawns mgmt with `DUPLEX_SANDBOX=off`;
//! * `MGMT_TEST_STRACE=DIR` runs every mgmt under `strace -f`, writing `DIR/mgmt.<pid>.strace`.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use duplex_ipc::admin::{
    AdminChannel, AdminErrorCode, AdminReply, AdminRequest, NodeStatus, ServiceInfo, ServiceState,
};
use duplex_ipc::config::{
    examples, ConfigChannel, ConfigErrorKind, ConfigReply, ConfigRequest, Done, DriveState,
};
use duplex_ipc::control::{Body, ControlChannel, Envelope, Resource, ResourceKind, StartMode};
use duplex_ipc::lifecycle::{Health, CONTROL_FD_ENV};

/// How long any single wait in a test may take before the test fails (a deadline, not a timing
/// assertion: the waits end as soon as the condition holds).
pub const DEADLINE: Duration = Duration::from_secs(20);
/// The health interval the test hands out.
pub const BEAT_INTERVAL: Duration = Duration::from_millis(50);

/// A service the canned supervisor knows.
pub fn canned_services() -> Vec<ServiceInfo> {
    vec![
        ServiceInfo {
            name: "datapath".into(),
            datapath: true,
            state: ServiceState::Running,
            pid: 4100,
            generation: 1,
            restarts: 0,
            uptime_ms: 3_723_000,
            hangs: 0,
            last_exit: String::new(),
            last_restart_ms: 0,
        },
        ServiceInfo {
            name: "fabric".into(),
            datapath: false,
            state: ServiceState::Backoff,
            pid: 0,
            generation: 3,
            restarts: 2,
            uptime_ms: 0,
            hangs: 1,
            last_exit: "signal 9 (SIGKILL)".into(),
            last_restart_ms: 42,
        },
        ServiceInfo {
            name: "mgmt".into(),
            datapath: false,
            state: ServiceState::Running,
            pid: 4102,
            generation: 1,
            restarts: 0,
            uptime_ms: 61_000,
            hangs: 0,
            last_exit: String::new(),
            last_restart_ms: 0,
        },
    ]
}

pub fn canned_status() -> NodeStatus {
    NodeStatus {
        node: "node-a".into(),
        supervisor_pid: std::process::id(),
        uptime_ms: 7_500_000,
        failed: false,
        services_running: 2,
        services_total: 3,
        sandbox: true,
    }
}

/// A service name that makes the canned supervisor kill mgmt instead of answering (as if mgmt
/// crashed while the request was under way).
pub const VANISHING: &str = "vanishing";
/// A service name the canned supervisor never answers about.
pub const SILENT: &str = "silent";

/// The canned supervisor's answer, and whether it kills mgmt instead.
/// The cluster service's report the fake supervisor answers with.
pub const CANNED_REPORT: &str = r#"{"cluster":"duplex","node":1,"boot":17,"peer":{"node":2,"boot":5,"address":"127.0.0.1:7400","state":"alive","link_heard_ms_ago":40},"link_out":"up","disk_heartbeat":"not written yet"}"#;

/// The node's events the fake supervisor answers with (above 0; none above anything else),
/// stamped in 1970 so that none is recent.
pub const CANNED_EVENTS: &str = r#"[{"seq":1,"at_unix_ms":1000,"node":"n1","source":"duplexd","level":"info","kind":"node-started","message":"duplexd started node n1"},{"seq":2,"at_unix_ms":2500,"node":"n1","source":"cluster","level":"warning","kind":"takeover","message":"taking over\u0007 the peer"}]"#;

fn answer(request: &AdminRequest) -> Option<AdminReply> {
    let known = |name: &str| canned_services().iter().any(|s| s.name == name);
    let unknown = |name: &str| AdminReply::Error {
        code: AdminErrorCode::UnknownService,
        message: format!("no service named `{name}`"),
    };
    Some(match request {
        AdminRequest::ListServices => AdminReply::Services(canned_services()),
        AdminRequest::NodeStatus => AdminReply::Status(canned_status()),
        AdminRequest::ServiceReport(name) if name == "cluster" => AdminReply::Report {
            generation: 4,
            text: CANNED_REPORT.into(),
        },
        AdminRequest::ServiceReport(name) if known(name) => AdminReply::Report {
            generation: 0,
            text: String::new(),
        },
        AdminRequest::ServiceReport(name) => unknown(name),
        AdminRequest::Events(after) => AdminReply::Events(if *after == 0 {
            CANNED_EVENTS.into()
        } else {
            "[]".into()
        }),
        AdminRequest::RestartService(name) if known(name) => {
            AdminReply::Done(format!("restarting {name}"))
        }
        AdminRequest::CrashService { name, mode } if known(name) => {
            AdminReply::Done(format!("crashing {name} ({})", mode.name()))
        }
        AdminRequest::RestartService(name) | AdminRequest::CrashService { name, .. } => {
            if name == SILENT {
                return None;
            }
            unknown(name)
        }
    })
}

fn kill_mgmt(mgmt_pid: &AtomicI32) {
    let pid = mgmt_pid.load(Ordering::Relaxed);
    if pid > 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The supervisor end of the admin channel, answered by a thread.
pub struct AdminResponder {
    pub requests: Arc<Mutex<Vec<AdminRequest>>>,
    /// When set, the next `NodeStatus` request kills mgmt instead of being answered.
    pub kill_on_status: Arc<AtomicBool>,
    /// When set, the service table lists a `metadata` service in this state.
    pub metadata_state: Arc<Mutex<Option<ServiceState>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminResponder {
    fn start(channel: AdminChannel, mgmt_pid: Arc<AtomicI32>) -> Self {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let kill_on_status = Arc::new(AtomicBool::new(false));
        let metadata_state = Arc::new(Mutex::new(None));
        let thread = {
            let requests = Arc::clone(&requests);
            let stop = Arc::clone(&stop);
            let kill_on_status = Arc::clone(&kill_on_status);
            let metadata_state = Arc::clone(&metadata_state);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Some((id, request))) = channel.recv_request(Duration::from_millis(50))
                    else {
                        continue;
                    };
                    requests.lock().unwrap().push(request.clone());
                    let kills_mgmt = match &request {
                        AdminRequest::RestartService(n)
                        | AdminRequest::CrashService { name: n, .. } => {
                            n == "mgmt" || n == VANISHING
                        }
                        AdminRequest::NodeStatus => kill_on_status.swap(false, Ordering::Relaxed),
                        AdminRequest::ListServices
                        | AdminRequest::ServiceReport(_)
                        | AdminRequest::Events(_) => false,
                    };
                    if kills_mgmt {
                        // What duplexd does for restart/crash of mgmt: the process goes away
                        // before mgmt can answer.
                        kill_mgmt(&mgmt_pid);
                        continue;
                    }
                    if let Some(mut reply) = answer(&request) {
                        if let (AdminReply::Services(list), Some(state)) =
                            (&mut reply, *metadata_state.lock().unwrap())
                        {
                            list.push(ServiceInfo {
                                name: "metadata".into(),
                                datapath: false,
                                state,
                                pid: 0,
                                generation: 4,
                                restarts: 3,
                                uptime_ms: 0,
                                hangs: 0,
                                last_exit: "signal 6 (SIGABRT)".into(),
                                last_restart_ms: 0,
                            });
                        }
                        let _ = channel.send_reply(id, &reply);
                    }
                }
            })
        };
        Self {
            requests,
            kill_on_status,
            metadata_state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn taken(&self) -> Vec<AdminRequest> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

/// A pool name the fake metadata service refuses to create (its drives are in use).
pub const BUSY_POOL: &str = "busy";
/// A pool name the fake metadata service answers `pool show` about with two pools.
pub const TWO_POOLS: &str = "two";
/// The error message of [`BUSY_POOL`] (with a line break mgmt or duplexctl must flatten).
pub const BUSY_MESSAGE: &str = "drive d0 belongs to\npool tank";

/// The drives the fake metadata service knows.
pub fn canned_drives() -> Vec<duplex_ipc::config::DriveInfo> {
    vec![
        examples::drive("d0", "tank", 0, DriveState::Active),
        examples::drive("d1", "tank", 1, DriveState::Failed),
        examples::drive("d2", "", 0, DriveState::Free),
    ]
}

/// The fake metadata service's answer.
fn config_answer(request: &ConfigRequest) -> ConfigReply {
    let done = |message: String| {
        ConfigReply::Done(Done {
            message,
            ..Done::default()
        })
    };
    match request {
        ConfigRequest::ListDrives => ConfigReply::Drives(canned_drives()),
        ConfigRequest::ListPools => ConfigReply::Pools(vec![
            examples::pool("tank", 2),
            examples::pool("scratch", 1),
        ]),
        ConfigRequest::ShowPool(name) if name == "tank" => {
            ConfigReply::Pools(vec![examples::pool("tank", 2)])
        }
        ConfigRequest::ShowPool(name) if name == TWO_POOLS => ConfigReply::Pools(vec![
            examples::pool("tank", 2),
            examples::pool("scratch", 1),
        ]),
        ConfigRequest::ShowPool(name) => ConfigReply::Error {
            kind: ConfigErrorKind::NotFound,
            message: format!("no pool named `{name}`"),
        },
        ConfigRequest::ListVolumes => ConfigReply::Volumes(vec![examples::volume("vol0")]),
        // One page, then the end.
        ConfigRequest::ListVolumesAfter(after) if after.is_empty() => {
            ConfigReply::Volumes(vec![examples::volume("vol0")])
        }
        ConfigRequest::ListVolumesAfter(_) => ConfigReply::Volumes(vec![]),
        ConfigRequest::ListSubsystems => {
            ConfigReply::Subsystems(vec![examples::subsystem("nqn.2026-11.io.duplex:vol0")])
        }
        ConfigRequest::CreatePool { name, .. } if name == BUSY_POOL => ConfigReply::Error {
            kind: ConfigErrorKind::InUse,
            message: BUSY_MESSAGE.into(),
        },
        ConfigRequest::CreatePool {
            name, raid, drives, ..
        } => ConfigReply::Done(Done {
            message: format!(
                "created pool {name} ({}, {} drives)",
                raid.name(),
                drives.len()
            ),
            nsid: 0,
            uuid: "0b1e5c7a-2f4d-4e8a-9c3b-5d6e7f809a1b".into(),
        }),
        // Says nothing: duplexctl words the line itself.
        ConfigRequest::AddNamespace { nsid, .. } => ConfigReply::Done(Done {
            message: String::new(),
            nsid: if *nsid == 0 { 3 } else { *nsid },
            uuid: String::new(),
        }),
        other => done(format!("did {}", other.kind_name())),
    }
}

/// The metadata end of the config channel, answered by a thread.
pub struct MetadataResponder {
    pub requests: Arc<Mutex<Vec<ConfigRequest>>>,
    /// When set, the next request kills mgmt instead of being answered.
    pub kill_next: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetadataResponder {
    fn start(channel: ConfigChannel, mgmt_pid: Arc<AtomicI32>) -> Self {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let kill_next = Arc::new(AtomicBool::new(false));
        let thread = {
            let requests = Arc::clone(&requests);
            let stop = Arc::clone(&stop);
            let kill_next = Arc::clone(&kill_next);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Some((id, request))) = channel.recv_request(Duration::from_millis(50))
                    else {
                        continue;
                    };
                    requests.lock().unwrap().push(request.clone());
                    if kill_next.swap(false, Ordering::Relaxed) {
                        kill_mgmt(&mgmt_pid);
                        continue;
                    }
                    let _ = channel.send_reply(id, &config_answer(&request));
                }
            })
        };
        Self {
            requests,
            kill_next,
            stop,
            thread: Some(thread),
        }
    }

    pub fn taken(&self) -> Vec<ConfigRequest> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

impl Drop for MetadataResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AdminResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What to hand to a spawned mgmt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handout {
    /// health, admin, mgmt-socket, config.
    All,
    /// Without the config channel (a node without a metadata service).
    NoConfig,
    /// Without the admin channel.
    NoAdmin,
    /// The health region handed over as the listening socket.
    WrongSocket,
}

/// A test node: the resources duplexd would hold across mgmt restarts.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub listener: UnixListener,
    pub health: Health,
    admin_mgmt_end: OwnedFd,
    pub admin: AdminResponder,
    config_mgmt_end: OwnedFd,
    pub metadata: MetadataResponder,
    mgmt_pid: Arc<AtomicI32>,
    generation: u64,
    /// A remote management listener and the mgmt-key region, when the node has them.
    pub remote: Option<Remote>,
}

/// What duplexd holds for remote management: the TCP listener and the key's region.
pub struct Remote {
    pub listener: std::net::TcpListener,
    pub key: [u8; 32],
    region: duplex_ipc::region::Region,
    pub key_file: PathBuf,
}

impl Remote {
    /// `127.0.0.1:port` of the listener.
    pub fn addr(&self) -> String {
        self.listener.local_addr().unwrap().to_string()
    }
}

impl Node {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("mgmt.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let health = Health::create("mgmt", BEAT_INTERVAL).unwrap();
        let (sup, mgmt) = AdminChannel::pair().unwrap();
        let mgmt_pid = Arc::new(AtomicI32::new(0));
        let admin = AdminResponder::start(sup, Arc::clone(&mgmt_pid));
        let (config_mgmt_end, metadata_end) = ConfigChannel::pair().unwrap();
        let metadata = MetadataResponder::start(metadata_end, Arc::clone(&mgmt_pid));
        // duplexd writes its pid into the lock file; this test plays duplexd.
        std::fs::write(
            dir.path().join("duplexd.lock"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        Self {
            dir,
            socket,
            listener,
            health,
            admin_mgmt_end: mgmt.into_fd(),
            admin,
            config_mgmt_end: config_mgmt_end.into_fd(),
            metadata,
            mgmt_pid,
            generation: 0,
            remote: None,
        }
    }

    /// The node with a remote management listener on 127.0.0.1 and a key (also written to
    /// `<dir>/mgmt.key`, as an operator's copy).
    pub fn with_remote() -> Self {
        let mut node = Self::new();
        let key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x5a);
        let key_file = node.dir.path().join("mgmt.key");
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&key_file, format!("{hex}\n")).unwrap();
        node.remote = Some(Remote {
            listener: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            key,
            region: duplex_ipc::keys::create_mgmt(&key).unwrap(),
            key_file,
        });
        node
    }

    /// Runs the real duplexctl against this node's remote listener with `key_file`.
    pub fn remote_ctl(&self, key_file: &Path, args: &[&str]) -> Ctl {
        let r = self.remote.as_ref().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_duplexctl"));
        // A state directory with nothing in it: the remote node is reached by address alone.
        cmd.arg("--state-dir")
            .arg("/nonexistent")
            .arg("--connect")
            .arg(r.addr())
            .arg("--key-file")
            .arg(key_file);
        ctl(&mut cmd, args)
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Spawns mgmt and completes the handshake (Hello → Start → Ready).
    pub fn start_mgmt(&mut self) -> Mgmt {
        self.start_mgmt_with(Handout::All)
    }

    /// Spawns mgmt and completes the handshake, handing over `handout`.
    pub fn start_mgmt_with(&mut self, handout: Handout) -> Mgmt {
        let mut m = self.spawn_mgmt();
        self.handshake(&mut m, handout);
        m
    }

    /// Spawns mgmt (no handshake yet).
    pub fn spawn_mgmt(&mut self) -> Mgmt {
        let (ours, theirs) = ControlChannel::pair().unwrap();
        let theirs = theirs.into_fd();
        self.generation += 1;
        let exe = env!("CARGO_BIN_EXE_duplex-mgmt");
        let strace = std::env::var_os("MGMT_TEST_STRACE");
        let mut cmd = match &strace {
            Some(dir) => {
                let mut c = Command::new("/usr/bin/strace");
                c.arg("-f")
                    .arg("-qq")
                    .arg("-ff")
                    .arg("-o")
                    .arg(Path::new(dir).join("mgmt"))
                    .arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.env_clear()
            .env(CONTROL_FD_ENV, theirs.as_raw_fd().to_string())
            .env("DUPLEX_SERVICE", "mgmt")
            .env("DUPLEX_GENERATION", self.generation.to_string())
            .env(
                "DUPLEX_START_MODE",
                if self.generation == 1 {
                    "fresh"
                } else {
                    "restart"
                },
            )
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if std::env::var_os("MGMT_TEST_SANDBOX").is_some_and(|v| v == "off") {
            cmd.env("DUPLEX_SANDBOX", "off");
        }
        let mut child = duplex_ipc::testkit::spawn_with_fds(&mut cmd, &[theirs.as_fd()]).unwrap();
        drop(theirs);
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let reader = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut buf = [0_u8; 4096];
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        };
        let pid = if strace.is_some() {
            0
        } else {
            child.id() as i32
        };
        self.mgmt_pid.store(pid, Ordering::Relaxed);
        Mgmt {
            child,
            control: ours,
            log,
            reader: Some(reader),
            pid,
            generation: self.generation,
        }
    }

    /// Answers Hello with Start (handing over `handout`) and, for a complete handout, waits for
    /// Ready.
    pub fn handshake(&mut self, m: &mut Mgmt, handout: Handout) {
        let (hello, _) = m
            .control
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|e| panic!("no hello: {e}; log:\n{}", m.log()))
            .unwrap_or_else(|| panic!("no hello in time; log:\n{}", m.log()));
        let Body::Hello { service, pid, .. } = hello.body else {
            panic!("expected hello, got {:?}", hello.body);
        };
        assert_eq!(service, "mgmt");
        if m.pid == 0 {
            // Under strace the child is strace; the pid mgmt reports is the real one.
            m.pid = pid as i32;
            self.mgmt_pid.store(m.pid, Ordering::Relaxed);
        } else {
            assert_eq!(pid as i32, m.pid);
        }
        let mut resources = Vec::new();
        let mut fds = Vec::new();
        let mut add = |name: &str, kind, fd| {
            resources.push(Resource {
                name: name.into(),
                kind,
                fd_index: fds.len() as u32,
            });
            fds.push(fd);
        };
        add("health", ResourceKind::Region, self.health.region().fd());
        if handout != Handout::NoAdmin {
            add("admin", ResourceKind::Socket, self.admin_mgmt_end.as_fd());
        }
        if handout != Handout::NoConfig {
            add("config", ResourceKind::Socket, self.config_mgmt_end.as_fd());
        }
        if let Some(r) = &self.remote {
            add("remote:ctl", ResourceKind::Socket, r.listener.as_fd());
            add("mgmt-key", ResourceKind::Region, r.region.fd());
        }
        if handout == Handout::WrongSocket {
            add(
                "mgmt-socket",
                ResourceKind::Socket,
                self.health.region().fd(),
            );
        } else {
            add("mgmt-socket", ResourceKind::Socket, self.listener.as_fd());
        }
        let start = Envelope {
            request_id: m.control.next_request_id(),
            epoch: 1,
            body: Body::Start {
                generation: m.generation,
                mode: if m.generation == 1 {
                    StartMode::Fresh
                } else {
                    StartMode::Restart
                },
                resources,
            },
        };
        m.control.send(&start, &fds).unwrap();
        if !matches!(handout, Handout::All | Handout::NoConfig) {
            return;
        }
        let (ready, _) = m
            .control
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|e| panic!("no ready: {e}; log:\n{}", m.log()))
            .unwrap_or_else(|| panic!("no ready in time; log:\n{}", m.log()));
        assert_eq!(
            ready.body,
            Body::Ready {
                generation: m.generation
            },
            "log:\n{}",
            m.log()
        );
    }

    /// Runs the real duplexctl against this node.
    pub fn ctl(&self, args: &[&str]) -> Ctl {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_duplexctl"));
        cmd.arg("--state-dir").arg(self.state_dir());
        ctl(&mut cmd, args)
    }
}

/// Runs duplexctl with `args` (after whatever `cmd` already has).
pub fn ctl(cmd: &mut Command, args: &[&str]) -> Ctl {
    let out: Output = cmd
        .args(args)
        .env_remove("DUPLEX_STATE_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Ctl {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// What a duplexctl run printed.
#[derive(Debug)]
pub struct Ctl {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    /// Asserts success and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "{self:?}");
        assert!(self.stderr.is_empty(), "{self:?}");
        &self.stdout
    }

    /// Asserts failure with `code` and exactly one line on stderr; returns the line.
    pub fn failed(&self, code: i32) -> &str {
        assert_eq!(self.code, Some(code), "{self:?}");
        assert!(self.stdout.is_empty(), "{self:?}");
        let line = self
            .stderr
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("{self:?}"));
        assert!(!line.contains('\n'), "more than one line: {self:?}");
        assert!(line.starts_with("duplexctl: "), "{self:?}");
        line
    }
}

/// A running mgmt.
pub struct Mgmt {
    pub child: Child,
    pub control: ControlChannel,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    pub pid: i32,
    pub generation: u64,
}

impl Mgmt {
    /// What it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends a lifecycle message.
    pub fn send(&self, body: Body) {
        let env = Envelope {
            request_id: self.control.next_request_id(),
            epoch: 1,
            body,
        };
        self.control.send(&env, &[]).unwrap();
    }

    /// Waits (up to [`DEADLINE`]) for it to exit; returns the status and the whole log.
    pub fn wait(&mut self) -> (ExitStatus, String) {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return (status, self.log());
            }
            assert!(
                Instant::now() < until,
                "mgmt did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGKILLs it and reaps it.
    pub fn kill(&mut self) {
        if self.pid > 0 && self.pid as u32 != self.child.id() {
            // Under strace: the traced mgmt would outlive its tracer.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `/proc/<pid>/task/*/status` of every thread.
    pub fn thread_statuses(&self) -> Vec<String> {
        let dir = format!("/proc/{}/task", self.pid);
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path().join("status")).unwrap())
            .collect()
    }
}

impl Drop for Mgmt {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The signal that ended `status`, if any.
pub fn signal(status: ExitStatus) -> Option<i32> {
    status.signal()
}

/// Polls `cond` until it holds or [`DEADLINE`] passes.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < until, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
