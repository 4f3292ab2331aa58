//! The service end of the lifecycle channel with the supervisor.
//!
//! A service is spawned with its end of a `SOCK_SEQPACKET` control socket at the fd named by
//! [`CONTROL_FD_ENV`] and nothing else. It says `Hello`; the supervisor answers `Start` with the
//! service's generation, whether this is a fresh start or a restart, and every resource (regions,
//! rings, pools, doorbells, sockets) as fds passed with `SCM_RIGHTS`; the service attaches them and
//! says `Ready`. From then on the supervisor may send `Shutdown` or `Inject`.
//!
//! # Health
//!
//! Each service is handed a small region of its own, [`HEALTH_RESOURCE`], holding a heartbeat
//! counter. The service's main loop calls [`Health::beat`] (one relaxed atomic add, no syscall)
//! at least every [`Health::interval`]; the supervisor samples the counter and kills a service
//! whose counter stood still for `missed_beats` intervals. The region belongs to the supervisor
//! and outlives the service, so a successor beats on the same counter.
//!
//! # Crash injection
//!
//! [`Started::handle`] carries out `Inject`: a panic (services abort on panic, see
//! [`abort_on_panic`]), a hang (no more beats, the thread blocks forever) or a forbidden system
//! call (the sandbox kills the process).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::control::{
    Body, ControlChannel, ControlError, Envelope, Fault, ResourceKind, StartMode,
};
use crate::region::{Region, RegionError, RegionKind, HEADER_SIZE};
use crate::testkit::inherited_fd;

/// Environment variable holding the control socket's fd number.
pub const CONTROL_FD_ENV: &str = "DUPLEX_CONTROL_FD";
/// Lifecycle protocol version spoken by this build.
pub const PROTOCOL_VERSION: u32 = crate::control::PROTOCOL_VERSION;

/// Name of the health region every service is handed.
pub const HEALTH_RESOURCE: &str = "health";
/// `params[0]` of a health region says it is one.
const HEALTH_TAG: u64 = u64::from_le_bytes(*b"HEALTH\0\x01");
/// Offset of the beat counter in a health region.
const BEAT_OFFSET: usize = HEADER_SIZE;

/// Set by an injected hang: from then on [`Health::beat`] does nothing.
static HUNG: AtomicBool = AtomicBool::new(false);

/// A service's heartbeat counter in shared memory.
#[derive(Debug)]
pub struct Health {
    region: Region,
}

impl Health {
    /// Supervisor side: a new health region for `service`, beating every `interval`.
    pub fn create(service: &str, interval: Duration) -> Result<Self, RegionError> {
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let region = Region::create(
            &format!("health:{service}"),
            RegionKind::Plain,
            HEADER_SIZE + 64,
            [HEALTH_TAG, ms, 0, 0, 0],
        )?;
        Ok(Self { region })
    }

    /// Service side: attaches the handed-over region, checking it is a health region.
    pub fn attach(fd: OwnedFd) -> Result<Self, RegionError> {
        let region = Region::attach(fd, RegionKind::Plain)?;
        let params = region.params();
        if params[0] != HEALTH_TAG || params[1] == 0 || region.len() < BEAT_OFFSET + 8 {
            return Err(RegionError::BadLayout(
                "not a health region (tag, interval or size)".into(),
            ));
        }
        Ok(Self { region })
    }

    /// The region (the supervisor keeps its fd across restarts).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// How often the service must beat.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.region.params()[1])
    }

    fn counter(&self) -> &AtomicU64 {
        self.region.atomic_u64(BEAT_OFFSET)
    }

    /// One beat: a relaxed atomic increment. Does nothing once a hang was injected.
    pub fn beat(&self) {
        if !HUNG.load(Ordering::Relaxed) {
            self.counter().fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counter (supervisor side).
    pub fn count(&self) -> u64 {
        self.counter().load(Ordering::Relaxed)
    }
}

/// Makes every panic, on any thread, abort the process after the default panic message, so a
/// service never limps on with a dead thread; the supervisor sees `SIGABRT` and restarts it.
pub fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        std::process::abort();
    }));
}

/// Carries out an injected fault. Returns only for [`Fault::ForbiddenSyscall`] when the call
/// was *not* stopped (the sandbox is off), with a description of what happened.
pub fn inject(fault: Fault) -> String {
    match fault {
        Fault::Panic => {
            tracing::warn!("injected panic");
            panic!("injected panic (crash injection)");
        }
        Fault::Hang => {
            tracing::warn!("injected hang: no more heartbeats, this thread blocks forever");
            HUNG.store(true, Ordering::Relaxed);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Fault::ForbiddenSyscall => {
            tracing::warn!("injected forbidden system call: opening /etc/hostname");
            match std::fs::File::open("/etc/hostname") {
                Ok(_) => {
                    tracing::error!("forbidden open succeeded: the sandbox is NOT in force");
                    "forbidden open succeeded: the sandbox is not in force".into()
                }
                Err(e) => format!("forbidden open failed without a kill: {e}"),
            }
        }
    }
}

/// What a service does after [`Started::handle`] looked at a control message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Carry on serving.
    Continue,
    /// The supervisor asked for an orderly stop: exit (status 0) before the deadline.
    Shutdown,
}

/// Errors starting a service.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The control fd is missing or unusable.
    #[error("No usable control channel ({CONTROL_FD_ENV}): {0}")]
    NoChannel(String),
    /// The channel failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The supervisor sent something other than what the protocol expects now.
    #[error("Supervisor sent {0} where start was expected")]
    Unexpected(&'static str),
    /// A resource the service needs was not handed over.
    #[error("Supervisor did not hand over `{0}`")]
    MissingResource(&'static str),
    /// A handed-over resource failed validation.
    #[error("Handed-over `{0}` is unusable")]
    BadResource(&'static str, #[source] RegionError),
    /// The supervisor did not answer in time.
    #[error("Supervisor did not send start within {0:?}")]
    Timeout(Duration),
}

/// One handed-over resource.
#[derive(Debug)]
pub struct Handed {
    /// Its name in the node config.
    pub name: String,
    /// What it is.
    pub kind: ResourceKind,
    /// The fd.
    pub fd: OwnedFd,
}

/// A started service: its channel, generation, start mode and resources.
#[derive(Debug)]
pub struct Started {
    /// The control channel to the supervisor.
    pub channel: ControlChannel,
    /// This incarnation's generation.
    pub generation: u64,
    /// Fresh start or restart after a crash.
    pub mode: StartMode,
    /// Resources not yet taken.
    pub resources: Vec<Handed>,
}

impl Started {
    /// Takes the resource called `name`.
    pub fn take(&mut self, name: &str) -> Option<Handed> {
        let at = self.resources.iter().position(|r| r.name == name)?;
        Some(self.resources.swap_remove(at))
    }

    /// Takes and attaches the health region.
    pub fn health(&mut self) -> Result<Health, LifecycleError> {
        let r = self
            .take(HEALTH_RESOURCE)
            .ok_or(LifecycleError::MissingResource(HEALTH_RESOURCE))?;
        Health::attach(r.fd).map_err(|e| LifecycleError::BadResource(HEALTH_RESOURCE, e))
    }

    /// Handles one message from the supervisor: `Shutdown` → [`Next::Shutdown`]; `Inject` →
    /// the fault happens (see [`inject`]); anything else is logged and ignored.
    pub fn handle(&self, envelope: &Envelope) -> Next {
        match &envelope.body {
            Body::Shutdown { reason, .. } => {
                tracing::info!(reason = %reason, "shutdown requested");
                Next::Shutdown
            }
            Body::Inject { fault } => {
                let what = inject(*fault);
                tracing::warn!("{what}");
                Next::Continue
            }
            other => {
                tracing::debug!(kind = other.kind_name(), "ignoring control message");
                Next::Continue
            }
        }
    }

    /// Tells the supervisor this incarnation is ready.
    pub fn ready(&self) -> Result<(), ControlError> {
        let env = Envelope {
            request_id: self.channel.next_request_id(),
            epoch: self.generation,
            body: Body::Ready {
                generation: self.generation,
            },
        };
        self.channel.send(&env, &[])
    }

    /// Sends the service's status report (JSON, at most
    /// [`crate::control::MAX_REPORT_BYTES`] bytes) to the supervisor, replacing its last one.
    pub fn report(&self, text: &str) -> Result<(), ControlError> {
        let env = Envelope {
            request_id: self.channel.next_request_id(),
            epoch: self.generation,
            body: Body::Report {
                text: text.to_owned(),
            },
        };
        env.validate()?;
        self.channel.send(&env, &[])
    }
}

impl Started {
    /// Sends an event for the node's journal (`duplexctl events`). A message too long is cut
    /// at a character boundary; a kind outside `[a-z0-9-]{1,64}` is refused. The supervisor
    /// rate-limits what it records.
    pub fn event(
        &self,
        level: crate::control::EventLevel,
        kind: &str,
        message: &str,
    ) -> Result<(), ControlError> {
        let mut message = message.replace(['\n', '\r'], " ");
        if message.len() > crate::control::MAX_EVENT_MESSAGE_BYTES {
            let mut end = crate::control::MAX_EVENT_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let env = Envelope {
            request_id: self.channel.next_request_id(),
            epoch: self.generation,
            body: Body::Event {
                level,
                kind: kind.to_owned(),
                message,
            },
        };
        env.validate()?;
        self.channel.send(&env, &[])
    }
}

/// What a service's control thread saw on the lifecycle channel.
#[derive(Debug)]
pub enum Control {
    /// A message for [`Started::handle`].
    Message(Envelope),
    /// The supervisor closed the channel (it is gone or stopping us).
    Closed,
    /// The channel failed.
    Failed(ControlError),
}

/// Spawns the thread that receives lifecycle messages (a blocking `recvmsg`) and hands each to
/// `deliver`. Malformed datagrams are skipped (the channel logs them, rate-limited). The thread
/// ends after delivering [`Control::Closed`] or [`Control::Failed`], or when `deliver` returns
/// false.
pub fn spawn_control_thread(
    started: std::sync::Arc<Started>,
    mut deliver: impl FnMut(&Started, Control) -> bool + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("lifecycle".into())
        .spawn(move || loop {
            let event = match started.channel.recv() {
                Ok((envelope, _fds)) => Control::Message(envelope),
                Err(ControlError::PeerClosed) => Control::Closed,
                Err(e) if e.is_malformed() => continue,
                Err(e) => Control::Failed(e),
            };
            let last = !matches!(event, Control::Message(_));
            if !deliver(&started, event) || last {
                return;
            }
        })
}

/// Spawns the control thread ([`spawn_control_thread`]) for a service that only needs to know
/// when to stop: the returned flag is set once the supervisor asks it to shut down (answered
/// by [`Started::handle`]) or the channel closes or fails.
pub fn spawn_stop_flag(
    started: std::sync::Arc<Started>,
) -> std::io::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&stop);
    spawn_control_thread(started, move |started, event| match event {
        Control::Message(envelope) => {
            if started.handle(&envelope) == Next::Shutdown {
                flag.store(true, Ordering::Release);
                return false;
            }
            true
        }
        Control::Closed | Control::Failed(_) => {
            flag.store(true, Ordering::Release);
            false
        }
    })?;
    Ok(stop)
}

/// Logging for a service process: plain lines on stderr, level from `RUST_LOG` (default
/// `info`), no timestamps (duplexd prefixes every line with its own, and with service, pid and
/// generation).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .init();
}

/// Connects to the supervisor: Hello, then waits (up to `timeout`) for Start.
pub fn start(service: &str, timeout: Duration) -> Result<Started, LifecycleError> {
    let fd_text =
        std::env::var(CONTROL_FD_ENV).map_err(|e| LifecycleError::NoChannel(e.to_string()))?;
    let fd = inherited_fd(&fd_text).map_err(LifecycleError::NoChannel)?;
    let channel = ControlChannel::from_fd(fd)?;
    let hello = Envelope {
        request_id: channel.next_request_id(),
        epoch: 0,
        body: Body::Hello {
            service: service.to_owned(),
            pid: std::process::id(),
            protocol_version: PROTOCOL_VERSION,
        },
    };
    channel.send(&hello, &[])?;
    let Some((env, fds)) = channel.recv_timeout(timeout)? else {
        return Err(LifecycleError::Timeout(timeout));
    };
    let Body::Start {
        generation,
        mode,
        resources,
    } = env.body
    else {
        return Err(LifecycleError::Unexpected(env.body.kind_name()));
    };
    // The channel checked that fd indices are distinct and in range.
    let mut slots: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let resources = resources
        .into_iter()
        .filter_map(|r| {
            let fd = slots.get_mut(r.fd_index as usize)?.take()?;
            Some(Handed {
                name: r.name,
                kind: r.kind,
                fd,
            })
        })
        .collect();
    Ok(Started {
        channel,
        generation,
        mode,
        resources,
    })
}
