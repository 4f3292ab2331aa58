//! The running node: resources the supervisor owns, the service table, and the event loop that
//! starts services, answers their lifecycle messages, restarts them when they die and stops them
//! in reverse dependency order.
//!
//! Each service is spawned with exactly one fd, its end of a `SOCK_SEQPACKET` control socket
//! (named by `DUPLEX_CONTROL_FD`); everything else (ring and pool regions, doorbells, listening
//! sockets) reaches it in the `Start` message with `SCM_RIGHTS`, and the supervisor keeps its own
//! copies so a successor gets the very same objects.

use std::collections::VecDeque;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use duplex_ipc::control::{Body, ControlChannel, Envelope, Resource, ResourceKind, StartMode};
use duplex_ipc::desc::IoDesc;
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::lifecycle::CONTROL_FD_ENV;
use duplex_ipc::pool::{Holder, Pool};
use duplex_ipc::ring::RingRegion;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

use crate::config::{NodeConfig, ServiceKind};

/// Errors bringing the node up.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A listener could not be bound (e.g. the port is in use).
    #[error("listener {name}: cannot bind {address}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        address: std::net::SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A service binary is missing.
    #[error("service {name}: binary {path} does not exist or is not executable")]
    MissingBinary {
        /// Service name.
        name: String,
        /// The path.
        path: PathBuf,
    },
    /// Creating a shared resource failed.
    #[error("creating {what}: {message}")]
    Resource {
        /// Which resource.
        what: String,
        /// Why.
        message: String,
    },
    /// A system call of the event loop failed.
    #[error("supervisor {what} failed: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
}

/// A service's state in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceState {
    /// Spawned, lifecycle handshake not finished.
    Starting,
    /// Said Ready.
    Running,
    /// Died; waiting out the backoff before the next start.
    Backoff,
    /// Crash loop (or the datapath died): not restarted.
    Failed,
    /// Stopped by the supervisor.
    Stopped,
}

struct Shared {
    name: String,
    kind: ResourceKind,
    fd: OwnedFd,
}

struct Service {
    name: String,
    kind: ServiceKind,
    binary: PathBuf,
    args: Vec<String>,
    /// Indices into `Node::shared` of what this service gets.
    resources: Vec<usize>,
    state: ServiceState,
    child: Option<Child>,
    channel: Option<ControlChannel>,
    generation: u64,
    restarts: u32,
    exits: VecDeque<Instant>,
    next_start: Option<Instant>,
    started: Instant,
}

/// The node.
pub struct Node {
    config: NodeConfig,
    shared: Vec<Shared>,
    services: Vec<Service>,
    signals: SignalFd,
    failed: bool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node", self.config.node.name.get_ref())
            .finish_non_exhaustive()
    }
}

fn res_err(what: impl Into<String>) -> impl FnOnce(String) -> NodeError {
    let what = what.into();
    move |message| NodeError::Resource { what, message }
}

impl Node {
    /// Creates every resource the config declares and the service table. Binds listeners (so a
    /// port in use is refused here, before any service starts). `signals` must already be
    /// blocked in every thread.
    pub fn new(config: NodeConfig, exe_dir: PathBuf) -> Result<Self, NodeError> {
        let mut shared = Vec::new();
        let mut wants: Vec<(String, usize)> = Vec::new();
        let mut add =
            |shared: &mut Vec<Shared>, name: String, kind, fd: OwnedFd, users: &[&str]| {
                shared.push(Shared { name, kind, fd });
                for u in users {
                    wants.push(((*u).to_owned(), shared.len() - 1));
                }
            };
        for (i, r) in config.rings.iter().enumerate() {
            let name = r.name.get_ref();
            let id = u8::try_from(i + 1)
                .map_err(|_| res_err(format!("ring {name}"))("too many rings".into()))?;
            let ring = RingRegion::<IoDesc>::create(name, *r.capacity.get_ref(), id)
                .map_err(|e| res_err(format!("ring {name}"))(e.to_string()))?;
            let users = [r.producer.get_ref().as_str(), r.consumer.get_ref().as_str()];
            let fd = ring
                .region()
                .try_clone_fd()
                .map_err(|e| res_err(format!("ring {name}"))(e.to_string()))?;
            add(
                &mut shared,
                format!("ring:{name}"),
                ResourceKind::RingRegion,
                fd,
                &users,
            );
            for bell in ["data", "space"] {
                let d = Doorbell::new()
                    .map_err(|e| res_err(format!("ring {name} doorbell"))(e.to_string()))?;
                let fd = d
                    .fd()
                    .try_clone_to_owned()
                    .map_err(|e| res_err(format!("ring {name} doorbell"))(e.to_string()))?;
                add(
                    &mut shared,
                    format!("ring:{name}:{bell}"),
                    ResourceKind::Eventfd,
                    fd,
                    &users,
                );
            }
        }
        for p in &config.pools {
            let name = p.name.get_ref();
            let chunks = u32::try_from(*p.chunks.get_ref()).unwrap_or(u32::MAX);
            let pool = Pool::create(
                name,
                *p.chunk_size.get_ref() as usize,
                chunks,
                Holder {
                    role: 0,
                    incarnation: 0,
                },
            )
            .map_err(|e| res_err(format!("pool {name}"))(e.to_string()))?;
            let fd = pool
                .region()
                .try_clone_fd()
                .map_err(|e| res_err(format!("pool {name}"))(e.to_string()))?;
            let users: Vec<&str> = p.users.iter().map(|u| u.get_ref().as_str()).collect();
            add(
                &mut shared,
                format!("pool:{name}"),
                ResourceKind::Pool,
                fd,
                &users,
            );
        }
        for l in &config.listeners {
            let name = l.name.get_ref();
            let address = *l.address.get_ref();
            let listener = TcpListener::bind(address).map_err(|source| NodeError::Bind {
                name: name.clone(),
                address,
                source,
            })?;
            add(
                &mut shared,
                format!("listener:{name}"),
                ResourceKind::Socket,
                OwnedFd::from(listener),
                &[l.service.get_ref().as_str()],
            );
        }

        let mut services = Vec::new();
        for s in config.start_order() {
            let name = s.name.get_ref().clone();
            let binary = s
                .binary
                .clone()
                .unwrap_or_else(|| exe_dir.join(format!("duplex-{name}")));
            if !is_executable(&binary) {
                return Err(NodeError::MissingBinary { name, path: binary });
            }
            let resources = wants
                .iter()
                .filter(|(u, _)| *u == name)
                .map(|(_, i)| *i)
                .collect();
            services.push(Service {
                name,
                kind: s.kind,
                binary,
                args: s.args.clone(),
                resources,
                state: ServiceState::Stopped,
                child: None,
                channel: None,
                generation: 0,
                restarts: 0,
                exits: VecDeque::new(),
                next_start: None,
                started: Instant::now(),
            });
        }
        let signals = SignalFd::with_flags(
            &Self::signal_mask(),
            SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
        )
        .map_err(|source| NodeError::Sys {
            what: "signalfd",
            source,
        })?;
        Ok(Self {
            config,
            shared,
            services,
            signals,
            failed: false,
        })
    }

    /// The signals the node handles; block them in every thread before [`Node::new`].
    pub fn signal_mask() -> SigSet {
        let mut mask = SigSet::empty();
        for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
            mask.add(s);
        }
        mask
    }

    /// Starts every service and supervises until SIGTERM/SIGINT; then stops them in reverse
    /// start order. Returns whether the node failed (datapath died).
    pub fn run(mut self) -> Result<bool, NodeError> {
        for i in 0..self.services.len() {
            self.spawn(i, StartMode::Fresh);
        }
        loop {
            let now = Instant::now();
            let mut timeout = Duration::from_millis(self.config.supervisor.heartbeat_ms.max(10));
            for s in &self.services {
                if let Some(t) = s.next_start {
                    timeout = timeout.min(t.saturating_duration_since(now));
                }
            }
            let watched: Vec<usize> = (0..self.services.len())
                .filter(|&i| self.services[i].channel.is_some())
                .collect();
            let (sig_ready, ready) = {
                let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
                for &i in &watched {
                    if let Some(c) = &self.services[i].channel {
                        fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
                    }
                }
                let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
                match poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(source) => {
                        return Err(NodeError::Sys {
                            what: "poll",
                            source,
                        })
                    }
                }
                let is_ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                let ready: Vec<usize> = watched
                    .iter()
                    .zip(&fds[1..])
                    .filter(|(_, f)| is_ready(f))
                    .map(|(i, _)| *i)
                    .collect();
                (is_ready(&fds[0]), ready)
            };
            for i in ready {
                self.on_message(i);
            }
            if sig_ready {
                let mut stop = false;
                while let Ok(Some(info)) = self.signals.read_signal() {
                    match Signal::try_from(info.ssi_signo as i32) {
                        Ok(Signal::SIGCHLD) => {}
                        Ok(s) => {
                            tracing::info!(signal = ?s, "stopping node");
                            stop = true;
                        }
                        Err(_) => {}
                    }
                }
                self.reap();
                if stop {
                    self.stop_all();
                    return Ok(self.failed);
                }
            }
            let now = Instant::now();
            for i in 0..self.services.len() {
                if self.services[i].next_start.is_some_and(|t| t <= now) {
                    self.services[i].next_start = None;
                    self.spawn(i, StartMode::Restart);
                }
            }
        }
    }

    fn spawn(&mut self, i: usize, mode: StartMode) {
        let s = &mut self.services[i];
        let (ours, theirs) = match ControlChannel::pair() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(service = %s.name, error = %e, "cannot create control channel");
                s.state = ServiceState::Failed;
                return;
            }
        };
        let theirs = theirs.into_fd();
        s.generation += 1;
        let mut cmd = Command::new(&s.binary);
        cmd.args(&s.args)
            .env(CONTROL_FD_ENV, theirs.as_raw_fd().to_string())
            .env("DUPLEX_SERVICE", &s.name)
            .env("DUPLEX_GENERATION", s.generation.to_string())
            .env(
                "DUPLEX_START_MODE",
                if mode == StartMode::Fresh {
                    "fresh"
                } else {
                    "restart"
                },
            );
        match duplex_ipc::testkit::spawn_with_fds(&mut cmd, &[theirs.as_fd()]) {
            Ok(child) => {
                tracing::info!(service = %s.name, pid = child.id(), generation = s.generation, ?mode, "service spawned");
                s.child = Some(child);
                s.channel = Some(ours);
                s.state = ServiceState::Starting;
                s.started = Instant::now();
            }
            Err(e) => {
                tracing::error!(service = %s.name, binary = %s.binary.display(), error = %e, "cannot spawn service");
                s.state = ServiceState::Failed;
            }
        }
    }

    fn on_message(&mut self, i: usize) {
        let s = &mut self.services[i];
        let Some(channel) = &s.channel else { return };
        let pid = s.child.as_ref().map_or(0, Child::id);
        match channel.recv() {
            Ok((env, _fds)) => match env.body {
                Body::Hello {
                    service,
                    protocol_version,
                    ..
                } => {
                    if service != s.name
                        || protocol_version != duplex_ipc::lifecycle::PROTOCOL_VERSION
                    {
                        tracing::warn!(service = %s.name, pid, said = %service, protocol_version, "bad hello; dropping the service");
                        s.channel = None;
                        kill_child(s);
                        return;
                    }
                    let mode = if s.generation == 1 {
                        StartMode::Fresh
                    } else {
                        StartMode::Restart
                    };
                    let mut resources = Vec::new();
                    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
                    for (n, &r) in s.resources.iter().enumerate() {
                        let res = &self.shared[r];
                        resources.push(Resource {
                            name: res.name.clone(),
                            kind: res.kind,
                            fd_index: n as u32,
                        });
                        fds.push(res.fd.as_fd());
                    }
                    let start = Envelope {
                        request_id: channel.next_request_id(),
                        epoch: s.generation,
                        body: Body::Start {
                            generation: s.generation,
                            mode,
                            resources,
                        },
                    };
                    if let Err(e) = channel.send(&start, &fds) {
                        tracing::warn!(service = %s.name, pid, error = %e, "cannot send start");
                    }
                }
                Body::Ready { generation } if generation == s.generation => {
                    s.state = ServiceState::Running;
                    tracing::info!(service = %s.name, pid, generation, "service ready");
                }
                other => {
                    tracing::debug!(service = %s.name, pid, kind = other.kind_name(), "control message");
                }
            },
            Err(e) if e.is_malformed() => {
                // A malformed message: that peer is dropped; the node runs on.
                tracing::warn!(service = %s.name, pid, error = %e, "malformed control message; killing the service");
                s.channel = None;
                kill_child(s);
            }
            Err(_) => {
                // Closed or failed: the service is exiting; SIGCHLD will follow.
                s.channel = None;
            }
        }
    }

    fn reap(&mut self) {
        let settings = &self.config.supervisor;
        for i in 0..self.services.len() {
            let s = &mut self.services[i];
            let Some(child) = s.child.as_mut() else {
                continue;
            };
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            let pid = child.id();
            s.child = None;
            s.channel = None;
            if s.state == ServiceState::Stopped {
                continue;
            }
            let now = Instant::now();
            tracing::warn!(service = %s.name, pid, generation = s.generation, %status, uptime = ?now - s.started, "service exited unexpectedly");
            if s.kind == ServiceKind::Datapath {
                tracing::error!(service = %s.name, "datapath died: node stops serving");
                s.state = ServiceState::Failed;
                self.failed = true;
                // Close listeners so hosts fail over to the peer at once.
                self.shared.retain(|r| r.kind != ResourceKind::Socket);
                continue;
            }
            let window = Duration::from_secs(settings.crash_loop_window_s);
            s.exits.push_back(now);
            while s
                .exits
                .front()
                .is_some_and(|t| now.duration_since(*t) > window)
            {
                s.exits.pop_front();
            }
            let recent = s.exits.len() as u32;
            if recent >= settings.crash_loop_exits {
                s.state = ServiceState::Failed;
                tracing::error!(service = %s.name, exits = recent, window_s = settings.crash_loop_window_s, event = "crash-loop", "service is crash-looping: marked failed");
                continue;
            }
            let delay = if recent <= 1 {
                Duration::ZERO
            } else {
                let factor = 1u64 << (recent - 2).min(20);
                Duration::from_millis(
                    settings
                        .backoff_initial_ms
                        .saturating_mul(factor)
                        .min(settings.backoff_max_ms),
                )
            };
            s.restarts += 1;
            s.state = ServiceState::Backoff;
            s.next_start = Some(now + delay);
            tracing::info!(service = %s.name, restarts = s.restarts, delay = ?delay, "restarting service");
        }
    }

    fn stop_all(&mut self) {
        let deadline_ms = u32::try_from(self.config.supervisor.stop_timeout_ms).unwrap_or(u32::MAX);
        // Reverse start order: dependants stop before what they depend on.
        for i in (0..self.services.len()).rev() {
            let s = &mut self.services[i];
            s.state = ServiceState::Stopped;
            s.next_start = None;
            let Some(child) = s.child.as_mut() else {
                continue;
            };
            let pid = child.id();
            if let Some(channel) = &s.channel {
                let msg = Envelope {
                    request_id: channel.next_request_id(),
                    epoch: s.generation,
                    body: Body::Shutdown {
                        reason: "node stopping".into(),
                        deadline_ms,
                    },
                };
                let _ = channel.send(&msg, &[]);
            }
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_millis(u64::from(deadline_ms));
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    tracing::info!(service = %s.name, pid, %status, "service stopped");
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(service = %s.name, pid, "service did not stop in time; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            s.child = None;
            s.channel = None;
        }
    }
}

fn kill_child(s: &mut Service) {
    if let Some(child) = s.child.as_mut() {
        let _ = child.kill();
    }
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
