//! The mgmt service: serves the management RPC interface (`schemas/mgmt.capnp`) on the listening
//! socket the supervisor hands over, and carries every call out as one request on the admin
//! channel to the supervisor (`schemas/admin.capnp`) or, for the storage configuration (`config`),
//! on the config channel to the metadata service (`schemas/config.capnp`): the two privileges
//! mgmt holds. The config channel is handed over only when the node runs a metadata service.
//!
//! # Threads and tasks
//!
//! * The **runtime thread** (main) runs a tokio current-thread runtime with a `LocalSet`
//!   (`capnp-rpc` is `!Send`): the accept loop, one `RpcSystem` per connection, the heartbeat
//!   task, and the task that acts on lifecycle messages by calling [`Started::handle`] — on this
//!   thread, so an injected hang blocks the whole runtime and the heartbeat stops with it, as a
//!   deadlocked service would look to the supervisor's watchdog.
//! * The **lifecycle thread** only receives on the lifecycle channel (blocking `recvmsg`) and
//!   passes each message to the runtime thread. (tokio's `AsyncFd` would need `unsafe` to
//!   register a borrowed fd; a thread needs nothing the policy does not already allow.)
//! * The **admin thread** owns the admin channel and makes the blocking
//!   [`AdminChannel::call`]s one at a time (so calls are serialised, and a slow supervisor never
//!   stalls the runtime, hence never the heartbeat). RPC handlers queue jobs to it (at most
//!   [`MAX_QUEUED_CALLS`]) and await the answer on a oneshot channel.
//! * The **config thread**, when there is a config channel, does the same for
//!   [`ConfigChannel::call`]s, with [`CONFIG_TIMEOUT`] (a commit flushes drives): a slow commit
//!   never delays a `status` or `service list`. Before a config request is queued, mgmt asks the
//!   supervisor whether the metadata service runs, so that a request is not left in the channel
//!   for a metadata service that is down (it would be carried out when it comes back, after the
//!   client was told it failed).
//!
//! # Untrusted clients
//!
//! Anything that can connect to `mgmt.sock` is a client. A client can only lose its own
//! connection: framing and decoding are `capnp-rpc`'s, with reader limits
//! ([`TRAVERSAL_LIMIT_WORDS`], [`NESTING_LIMIT`]); at most [`MAX_CONNECTIONS`] connections are
//! served at once (more are closed at once, with a rate-limited warning); a connection on which no
//! byte moved for [`IDLE_TIMEOUT`] is closed; every per-connection log line is rate-limited.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use duplex_ipc::admin::{
    write_service, write_status, AdminChannel, AdminReply, AdminRequest, CrashMode, ServiceState,
};
use duplex_ipc::config::{ConfigChannel, ConfigReply, ConfigRequest};
use duplex_ipc::control::{ControlError, RateLimiter, ResourceKind, MAX_NAME_BYTES};
use duplex_ipc::lifecycle::{
    self, Control, Health, LifecycleError, Next, Started, HEALTH_RESOURCE,
};
use duplex_ipc::metrics::{Metrics, METRICS_READER_PREFIX};
use duplex_schemas::mgmt_capnp::management;
use futures::channel::{mpsc as mpsc_async, oneshot};
use futures::StreamExt;
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrLike, SockaddrStorage};

use crate::io::{Activity, Stream};
use crate::remote::RemoteServer;
use duplex_ipc::keys::{attach_mgmt, MGMT_KEY_RESOURCE, REMOTE_LISTENER_PREFIX};

/// The service's name (its policy, its `Hello`).
pub const SERVICE: &str = "mgmt";
/// Resource name of the admin channel (a connected `SOCK_SEQPACKET` socket).
pub const ADMIN_RESOURCE: &str = "admin";
/// Resource name of the listening socket (`<state_dir>/mgmt.sock`, `SOCK_STREAM`).
pub const SOCKET_RESOURCE: &str = "mgmt-socket";
/// Resource name of mgmt's end of the config channel (a connected `SOCK_SEQPACKET` socket);
/// handed over only when the node runs a metadata service.
pub const CONFIG_RESOURCE: &str = "config";
/// The service at the other end of the config channel.
pub const METADATA_SERVICE: &str = "metadata";
/// How long mgmt waits for the supervisor's `Start`.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one admin call may take before the RPC fails with "supervisor did not answer".
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one config call may take before the RPC fails with "the metadata service did not
/// answer": a commit writes and flushes every member drive of a pool.
pub const CONFIG_TIMEOUT: Duration = Duration::from_secs(30);
/// Calls that may wait for the admin thread (and, separately, for the config thread); more fail
/// at once ("mgmt is busy").
pub const MAX_QUEUED_CALLS: usize = 32;
/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection on which no byte moved for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Words one incoming RPC message may hold (and a decode traverse): 512 KiB. duplexctl's
/// requests are a few dozen words.
pub const TRAVERSAL_LIMIT_WORDS: usize = 64 * 1024;
/// Pointer nesting one incoming RPC message may use.
pub const NESTING_LIMIT: i32 = 16;
/// How long a remote connection may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Remote connections in their TLS handshake at once; more are closed as soon as accepted. They
/// hold no connection slot: peers without the key cannot crowd out anyone who has it.
pub const MAX_HANDSHAKES: usize = 8;
/// Connection slots only the local socket may take: remote connections, even with the key,
/// never leave the node's own console (and the appliance's watchdog) without one.
pub const LOCAL_RESERVE: usize = 8;
/// Log lines per second about misbehaving connections.
const WARNINGS_PER_SECOND: u32 = 5;

/// Why mgmt could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    /// The lifecycle handshake failed.
    #[error("Lifecycle handshake failed")]
    Lifecycle(#[from] LifecycleError),
    /// The lifecycle channel failed while serving.
    #[error("Lifecycle channel failed")]
    Control(#[from] ControlError),
    /// A resource mgmt needs was not handed over.
    #[error("Supervisor did not hand over `{0}`")]
    MissingResource(&'static str),
    /// A resource was handed over as the wrong kind.
    #[error("Handed-over `{name}` is a {got:?} resource, not a {want:?}")]
    WrongKind {
        /// The resource.
        name: &'static str,
        /// What the supervisor said it is.
        got: ResourceKind,
        /// What mgmt needs.
        want: ResourceKind,
    },
    /// A resource is of the right kind but unusable.
    #[error("Handed-over `{name}` is unusable: {why}")]
    BadResource {
        /// The resource.
        name: &'static str,
        /// Why.
        why: String,
    },
    /// A system resource (runtime, thread, socket registration) could not be set up.
    #[error("Cannot {what}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn setup(what: &'static str) -> impl FnOnce(std::io::Error) -> MgmtError {
    move |source| MgmtError::Setup { what, source }
}

/// What the supervisor handed to mgmt.
#[derive(Debug)]
pub struct Resources {
    /// The heartbeat counter.
    pub health: Health,
    /// The admin channel to the supervisor.
    pub admin: AdminChannel,
    /// The listening socket clients connect to.
    pub listener: StdUnixListener,
    /// The config channel to the metadata service, when the node runs one.
    pub config: Option<ConfigChannel>,
    /// The TCP listener metrics are served on, when the node exposes them.
    pub metrics_listener: Option<std::net::TcpListener>,
    /// The metrics regions of the services and duplexd.
    pub regions: crate::metrics::Regions,
    /// The remote management listeners (TLS with the mgmt key; `remote:` resources).
    pub remote_listeners: Vec<std::net::TcpListener>,
    /// The remote management key, when the node has one.
    pub mgmt_key: Option<crate::remote::MgmtKey>,
}

fn take_fd(
    started: &mut Started,
    name: &'static str,
    want: ResourceKind,
) -> Result<OwnedFd, MgmtError> {
    let handed = started.take(name).ok_or(MgmtError::MissingResource(name))?;
    if handed.kind != want {
        return Err(MgmtError::WrongKind {
            name,
            got: handed.kind,
            want,
        });
    }
    Ok(handed.fd)
}

/// Takes and checks the three resources mgmt needs: the health region, the admin channel and the
/// listening `AF_UNIX` stream socket; and the config channel if there is one. Its requests are
/// numbered from `generation << 32`, so that no reply meant for an earlier mgmt is taken for an
/// answer; whatever such replies are already queued are discarded.
pub fn take_resources(started: &mut Started) -> Result<Resources, MgmtError> {
    match started.resources.iter().find(|r| r.name == HEALTH_RESOURCE) {
        None => return Err(MgmtError::MissingResource(HEALTH_RESOURCE)),
        Some(r) if r.kind != ResourceKind::Region => {
            return Err(MgmtError::WrongKind {
                name: HEALTH_RESOURCE,
                got: r.kind,
                want: ResourceKind::Region,
            })
        }
        Some(_) => {}
    }
    let health = started.health()?;
    let admin = AdminChannel::from_fd(take_fd(started, ADMIN_RESOURCE, ResourceKind::Socket)?)
        .map_err(|e| MgmtError::BadResource {
            name: ADMIN_RESOURCE,
            why: e.to_string(),
        })?;
    let fd = take_fd(started, SOCKET_RESOURCE, ResourceKind::Socket)?;
    check_listener(&fd).map_err(|why| MgmtError::BadResource {
        name: SOCKET_RESOURCE,
        why,
    })?;
    let config = match started.take(CONFIG_RESOURCE) {
        None => None,
        Some(handed) if handed.kind != ResourceKind::Socket => {
            return Err(MgmtError::WrongKind {
                name: CONFIG_RESOURCE,
                got: handed.kind,
                want: ResourceKind::Socket,
            })
        }
        Some(handed) => {
            let channel = ConfigChannel::from_fd(handed.fd)
                .map_err(|e| MgmtError::BadResource {
                    name: CONFIG_RESOURCE,
                    why: e.to_string(),
                })?
                .with_first_request_id(started.generation << 32);
            let stale = channel.discard_queued();
            if stale > 0 {
                tracing::info!(stale, "discarded config replies meant for an earlier mgmt");
            }
            Some(channel)
        }
    };
    let names: Vec<String> = started.resources.iter().map(|r| r.name.clone()).collect();
    let mut regions = crate::metrics::Regions::default();
    let mut metrics_listener = None;
    let mut remote_listeners = Vec::new();
    let mut mgmt_key = None;
    for name in names {
        if let Some(source) = name.strip_prefix(METRICS_READER_PREFIX) {
            let Some(handed) = started.take(&name) else {
                continue;
            };
            match Metrics::attach(handed.fd) {
                Ok(m) => regions.0.push((source.to_owned(), m)),
                // One unusable region costs its metrics, not the service.
                Err(e) => tracing::warn!(resource = %name, error = %e, "metrics region unusable"),
            }
        } else if name == MGMT_KEY_RESOURCE {
            let Some(handed) = started.take(&name) else {
                continue;
            };
            mgmt_key = Some(attach_mgmt(handed.fd).map_err(|e| MgmtError::BadResource {
                name: MGMT_KEY_RESOURCE,
                why: e.to_string(),
            })?);
        } else if name.starts_with(REMOTE_LISTENER_PREFIX) {
            let Some(handed) = started.take(&name) else {
                continue;
            };
            let socket = std::net::TcpListener::from(handed.fd);
            let addr = socket.local_addr().map_err(|e| MgmtError::BadResource {
                name: "remote listener",
                why: format!("{name} is not a TCP listener: {e}"),
            })?;
            tracing::info!(%addr, "serving remote management (TLS with the mgmt key) on this address");
            remote_listeners.push(socket);
        } else if name.starts_with("listener:") {
            let Some(handed) = started.take(&name) else {
                continue;
            };
            let socket = std::net::TcpListener::from(handed.fd);
            match socket.local_addr() {
                Ok(addr) if metrics_listener.is_none() => {
                    tracing::info!(%addr, "serving metrics (Prometheus) on this address");
                    metrics_listener = Some(socket);
                }
                Ok(addr) => tracing::warn!(%addr, "a second listener for mgmt: not used"),
                Err(e) => {
                    return Err(MgmtError::BadResource {
                        name: "listener",
                        why: format!("{name} is not a TCP listener: {e}"),
                    })
                }
            }
        }
    }
    Ok(Resources {
        health,
        admin,
        listener: StdUnixListener::from(fd),
        config,
        metrics_listener,
        regions,
        remote_listeners,
        mgmt_key,
    })
}

/// A listening `AF_UNIX` `SOCK_STREAM` socket, or why not.
fn check_listener(fd: &OwnedFd) -> Result<(), String> {
    let kind = getsockopt(fd, sockopt::SockType).map_err(|e| format!("not a socket: {e}"))?;
    if kind != SockType::Stream {
        return Err(format!("a {kind:?} socket, not a stream socket"));
    }
    if !getsockopt(fd, sockopt::AcceptConn).map_err(|e| e.to_string())? {
        return Err("a socket that is not listening".into());
    }
    let addr = getsockname::<SockaddrStorage>(fd.as_raw_fd()).map_err(|e| e.to_string())?;
    if addr.as_unix_addr().is_none() {
        return Err(format!(
            "a socket of family {:?}, not AF_UNIX",
            addr.family()
        ));
    }
    Ok(())
}

/// The whole service after the sandbox is on: handshake, resources, `Ready`, serve until the
/// supervisor says `Shutdown` or closes the lifecycle channel.
///
/// `remote` is the TLS side of remote management, prepared before the sandbox.
pub fn run(remote: RemoteServer) -> Result<(), MgmtError> {
    let mut started = lifecycle::start(SERVICE, START_TIMEOUT)?;
    let resources = take_resources(&mut started)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(setup("build the tokio runtime"))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(started, resources, remote))
}

/// Receives lifecycle messages on a thread of its own (blocking `recvmsg`) and hands them to the
/// runtime thread, which acts on them.
fn spawn_lifecycle_thread(
    started: Arc<Started>,
) -> Result<mpsc_async::UnboundedReceiver<Control>, MgmtError> {
    let (events, received) = mpsc_async::unbounded();
    lifecycle::spawn_control_thread(started, move |_, event| {
        events.unbounded_send(event).is_ok()
    })
    .map_err(setup("start the lifecycle thread"))?;
    Ok(received)
}

async fn serve(
    started: Started,
    resources: Resources,
    remote: RemoteServer,
) -> Result<(), MgmtError> {
    let Resources {
        health,
        admin,
        listener,
        config,
        metrics_listener,
        regions,
        remote_listeners,
        mgmt_key,
    } = resources;
    let admin = Worker::spawn(
        "admin",
        "start the admin thread",
        "the supervisor",
        move |request| admin_call(&admin, request),
    )?;
    let admin = Rc::new(admin);
    let config = match config {
        Some(channel) => Some(Rc::new(Worker::spawn(
            "config",
            "start the config thread",
            "the metadata service",
            move |request| config_call(&channel, request, CONFIG_TIMEOUT),
        )?)),
        None => {
            tracing::info!("no config channel: this node runs no metadata service");
            None
        }
    };
    listener
        .set_nonblocking(true)
        .map_err(setup("make the mgmt socket non-blocking"))?;
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(setup("register the mgmt socket"))?;
    let started = Arc::new(started);
    let events = spawn_lifecycle_thread(Arc::clone(&started))?;
    let beat_every = (health.interval() / 4).max(Duration::from_millis(1));
    tokio::task::spawn_local(heartbeat(health, beat_every));
    started.ready()?;
    tracing::info!(generation = started.generation, mode = ?started.mode, "mgmt ready");
    if let Some(l) = metrics_listener {
        l.set_nonblocking(true)
            .map_err(setup("make the metrics listener non-blocking"))?;
        let l =
            tokio::net::TcpListener::from_std(l).map_err(setup("register the metrics listener"))?;
        let scrape = Rc::new(Scrape {
            admin: Rc::clone(&admin),
            config: config.clone(),
        });
        tokio::task::spawn_local(crate::metrics::serve(l, Rc::new(regions), scrape));
    }
    let bootstrap: management::Client = capnp_rpc::new_client(Management { admin, config });
    let active = Rc::new(Cell::new(0_usize));
    if !remote_listeners.is_empty() {
        match mgmt_key {
            Some(key) => {
                remote.set_key(key);
                let remote = Rc::new(remote);
                for l in remote_listeners {
                    l.set_nonblocking(true)
                        .map_err(setup("make a remote listener non-blocking"))?;
                    let l = tokio::net::TcpListener::from_std(l)
                        .map_err(setup("register a remote listener"))?;
                    tokio::task::spawn_local(remote_accept_loop(
                        l,
                        Rc::clone(&remote),
                        bootstrap.clone(),
                        Rc::clone(&active),
                    ));
                }
            }
            // duplexd's config check refuses this; should it come, the port stays closed.
            None => {
                tracing::error!("remote management listeners but no mgmt key: not serving them")
            }
        }
    }
    tokio::select! {
        r = watch_lifecycle(&started, events) => r,
        () = accept_loop(listener, bootstrap, active) => Ok(()),
    }
}

async fn heartbeat(health: Health, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        health.beat();
    }
}

/// Acts on the supervisor's lifecycle messages until `Shutdown` or the channel closes (both end
/// the service with status 0).
async fn watch_lifecycle(
    started: &Started,
    mut events: mpsc_async::UnboundedReceiver<Control>,
) -> Result<(), MgmtError> {
    while let Some(event) = events.next().await {
        match event {
            Control::Message(envelope) => {
                // On the runtime thread: an injected hang blocks the runtime here, and the
                // heartbeat task stops with it.
                if started.handle(&envelope) == Next::Shutdown {
                    return Ok(());
                }
            }
            Control::Closed => {
                tracing::info!("supervisor closed the lifecycle channel; exiting");
                return Ok(());
            }
            Control::Failed(e) => return Err(e.into()),
        }
    }
    Err(MgmtError::Setup {
        what: "keep the lifecycle thread running",
        source: std::io::Error::other("it ended"),
    })
}

/// Counts served connections; the count drops when the connection's task ends.
struct Slot(Rc<Cell<usize>>);

impl Slot {
    fn take(active: &Rc<Cell<usize>>) -> Option<Self> {
        Self::take_below(active, MAX_CONNECTIONS)
    }

    /// A slot while fewer than `limit` are taken.
    fn take_below(active: &Rc<Cell<usize>>, limit: usize) -> Option<Self> {
        let n = active.get();
        (n < limit).then(|| {
            active.set(n + 1);
            Self(Rc::clone(active))
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

type Limiter = Rc<RefCell<RateLimiter>>;

fn limiter() -> Limiter {
    Rc::new(RefCell::new(RateLimiter::new(
        WARNINGS_PER_SECOND,
        Duration::from_secs(1),
    )))
}

fn allowed(limiter: &Limiter) -> Option<u64> {
    limiter.borrow_mut().check(Instant::now())
}

async fn accept_loop(
    listener: tokio::net::UnixListener,
    bootstrap: management::Client,
    active: Rc<Cell<usize>>,
) {
    let refused = limiter();
    let failed = limiter();
    let ended = limiter();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match Slot::take(&active) {
                Some(slot) => {
                    let (reader, writer) = stream.into_split();
                    tokio::task::spawn_local(serve_connection(
                        reader,
                        writer,
                        bootstrap.clone(),
                        slot,
                        Rc::clone(&ended),
                    ));
                }
                None => {
                    if let Some(suppressed) = allowed(&refused) {
                        tracing::warn!(
                            max = MAX_CONNECTIONS,
                            suppressed,
                            "too many management connections; closing a new one"
                        );
                    }
                }
            },
            Err(e) => {
                if let Some(suppressed) = allowed(&failed) {
                    tracing::warn!(error = %e, suppressed, "accept on the mgmt socket failed");
                }
                // Out of fds or memory: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Accepts remote management connections: at most [`MAX_HANDSHAKES`] at once may be in their
/// TLS handshake, which must finish with the mgmt key within [`HANDSHAKE_TIMEOUT`]; only then
/// does the connection take a slot, and never one of the [`LOCAL_RESERVE`] kept for the local
/// socket. Failures are logged, rate limited: a remote peer triggers them.
async fn remote_accept_loop(
    listener: tokio::net::TcpListener,
    remote: Rc<RemoteServer>,
    bootstrap: management::Client,
    active: Rc<Cell<usize>>,
) {
    let refused = limiter();
    let failed = limiter();
    let ended = limiter();
    let denied = limiter();
    let handshakes = Rc::new(Cell::new(0_usize));
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let Some(pending) = Slot::take_below(&handshakes, MAX_HANDSHAKES) else {
                    if let Some(suppressed) = allowed(&refused) {
                        tracing::warn!(max = MAX_HANDSHAKES, suppressed, %peer, "too many remote management handshakes at once; closing a new one");
                    }
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let remote = Rc::clone(&remote);
                let bootstrap = bootstrap.clone();
                let ended = Rc::clone(&ended);
                let denied = Rc::clone(&denied);
                let refused = Rc::clone(&refused);
                let active = Rc::clone(&active);
                tokio::task::spawn_local(async move {
                    let shaken = tokio::time::timeout(HANDSHAKE_TIMEOUT, remote.accept(tcp)).await;
                    drop(pending);
                    let tls = match shaken {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(why)) => {
                            if let Some(suppressed) = allowed(&denied) {
                                tracing::warn!(%peer, suppressed, "remote management connection refused: {why}");
                            }
                            return;
                        }
                        Err(_) => {
                            if let Some(suppressed) = allowed(&denied) {
                                tracing::warn!(%peer, suppressed, timeout = ?HANDSHAKE_TIMEOUT, "remote management connection closed: no TLS handshake in time");
                            }
                            return;
                        }
                    };
                    let Some(slot) = Slot::take_below(&active, MAX_CONNECTIONS - LOCAL_RESERVE)
                    else {
                        if let Some(suppressed) = allowed(&refused) {
                            tracing::warn!(max = MAX_CONNECTIONS - LOCAL_RESERVE, suppressed, %peer, "too many management connections; closing a new remote one");
                        }
                        return;
                    };
                    tracing::info!(%peer, "remote management connection (TLS, mgmt key proven)");
                    let (reader, writer) = tokio::io::split(tls);
                    serve_connection(reader, writer, bootstrap, slot, ended).await;
                });
            }
            Err(e) => {
                if let Some(suppressed) = allowed(&failed) {
                    tracing::warn!(error = %e, suppressed, "accept on a remote management listener failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn reader_options() -> capnp::message::ReaderOptions {
    let mut options = capnp::message::ReaderOptions::new();
    options
        .traversal_limit_in_words(Some(TRAVERSAL_LIMIT_WORDS))
        .nesting_limit(NESTING_LIMIT);
    options
}

async fn serve_connection<R, W>(
    reader: R,
    writer: W,
    bootstrap: management::Client,
    _slot: Slot,
    ended: Limiter,
) where
    R: tokio::io::AsyncRead + Unpin + 'static,
    W: tokio::io::AsyncWrite + Unpin + 'static,
{
    let activity: Activity = Rc::new(Cell::new(Instant::now()));
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(Stream::tracked(reader, Rc::clone(&activity))),
        futures::io::BufWriter::new(Stream::tracked(writer, Rc::clone(&activity))),
        Side::Server,
        reader_options(),
    );
    let rpc = RpcSystem::new(Box::new(network), Some(bootstrap.client));
    tokio::select! {
        r = rpc => {
            if let Err(e) = r {
                if let Some(suppressed) = allowed(&ended) {
                    tracing::warn!(error = %e, suppressed, "management connection failed; closed");
                }
            }
        }
        () = idle(activity) => {
            if let Some(suppressed) = allowed(&ended) {
                tracing::info!(idle = ?IDLE_TIMEOUT, suppressed, "closing an idle management connection");
            }
        }
    }
}

/// Resolves once no byte moved for [`IDLE_TIMEOUT`].
async fn idle(activity: Activity) {
    loop {
        let deadline = activity.get() + IDLE_TIMEOUT;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// One job for a worker thread: the request, and where its answer (or a one-line reason for the
/// RPC error) goes.
struct Job<Q, A> {
    request: Q,
    reply: oneshot::Sender<Result<A, String>>,
}

/// A thread that owns a channel and makes blocking calls on it one at a time, for requests
/// queued by RPC handlers (at most [`MAX_QUEUED_CALLS`]).
struct Worker<Q, A> {
    jobs: mpsc::SyncSender<Job<Q, A>>,
    /// The thread's name (`admin`, `config`).
    name: &'static str,
    /// Who answers, for messages ("the supervisor").
    peer: &'static str,
}

impl<Q: Send + 'static, A: Send + 'static> Worker<Q, A> {
    /// Starts thread `name`; `starting` says what failed if it cannot start ("start the admin
    /// thread"), `peer` who answers its calls.
    fn spawn(
        name: &'static str,
        starting: &'static str,
        peer: &'static str,
        mut call: impl FnMut(&Q) -> Result<A, String> + Send + 'static,
    ) -> Result<Self, MgmtError> {
        let (jobs, queue) = mpsc::sync_channel::<Job<Q, A>>(MAX_QUEUED_CALLS);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // Ends when every sender is gone (the runtime is shutting down).
                while let Ok(job) = queue.recv() {
                    let result = call(&job.request);
                    // The RPC may have been cancelled (client gone); nothing to do then.
                    let _ = job.reply.send(result);
                }
            })
            .map_err(setup(starting))?;
        Ok(Self { jobs, name, peer })
    }

    async fn call(&self, request: Q) -> Result<A, capnp::Error> {
        let (reply, answer) = oneshot::channel();
        let gone = || capnp::Error::failed(format!("mgmt's {} thread is gone", self.name));
        self.jobs
            .try_send(Job { request, reply })
            .map_err(|e| match e {
                mpsc::TrySendError::Full(_) => capnp::Error::overloaded(format!(
                    "mgmt is busy: too many requests are waiting for {}; try again",
                    self.peer
                )),
                mpsc::TrySendError::Disconnected(_) => gone(),
            })?;
        match answer.await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(message)) => Err(capnp::Error::failed(message)),
            Err(oneshot::Canceled) => Err(gone()),
        }
    }
}

/// One request on the admin channel, with the failure cases turned into one-line messages.
fn admin_call(channel: &AdminChannel, request: &AdminRequest) -> Result<AdminReply, String> {
    match channel.call(request, ADMIN_TIMEOUT) {
        Ok(Some(AdminReply::Error { message, .. })) => Err(one_line(&message)),
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err("supervisor did not answer".into()),
        Err(ControlError::PeerClosed) => Err("supervisor closed the admin channel".into()),
        Err(e) if e.is_malformed() => Err(format!("supervisor sent a malformed reply: {e}")),
        Err(e) => {
            let source = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            Err(format!("admin channel failed: {e}{source}"))
        }
    }
}

/// One request on the config channel, with the failure cases turned into one-line messages.
/// An `error` reply is an answer (it goes back to the client as such), not a failure here.
fn config_call(
    channel: &ConfigChannel,
    request: &ConfigRequest,
    timeout: Duration,
) -> Result<ConfigReply, String> {
    let outcome = if request.is_read_only() {
        ""
    } else {
        "; the request may or may not have been carried out"
    };
    // A restart notice left from an earlier restart is no answer to this request.
    let stale = channel.discard_queued();
    if stale > 0 {
        tracing::debug!(stale, "discarded config replies nobody waits for");
    }
    match channel.call(request, timeout) {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(format!(
            "the metadata service did not answer within {}{outcome}",
            crate::client::human_duration(timeout)
        )),
        Err(ControlError::PeerClosed) => Err(format!(
            "the metadata service is not running (its config channel is closed){outcome}"
        )),
        Err(e) if e.is_malformed() => Err(format!(
            "the metadata service sent a malformed reply: {e}{outcome}"
        )),
        Err(e) => {
            let source = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            Err(format!("config channel failed: {e}{source}{outcome}"))
        }
    }
}

/// `text` on one line: line breaks and other control characters become spaces, runs of
/// whitespace one space.
pub fn one_line(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn unexpected(reply: &AdminReply) -> capnp::Error {
    let what = match reply {
        AdminReply::Services(_) => "a service list",
        AdminReply::Done(_) => "a done message",
        AdminReply::Error { .. } => "an error",
        AdminReply::Status(_) => "a node status",
        AdminReply::Report { .. } => "a service report",
        AdminReply::Events(_) => "events",
    };
    capnp::Error::failed(format!(
        "supervisor answered with {what}, which does not fit"
    ))
}

fn service_name(name: capnp::Result<capnp::text::Reader<'_>>) -> Result<String, capnp::Error> {
    let name = name?
        .to_str()
        .map_err(|_| capnp::Error::failed("service name is not valid UTF-8".into()))?;
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(capnp::Error::failed(format!(
            "service name must be 1 to {MAX_NAME_BYTES} bytes long"
        )));
    }
    Ok(name.to_owned())
}

/// The cluster service's name (its report says whether the interconnect is down).
pub const CLUSTER_SERVICE: &str = "cluster";

/// Why a config request cannot be forwarded at all: the node has no metadata service.
pub const NO_METADATA: &str =
    "the metadata service is not running: this node has none (no service named `metadata` in its config)";

/// The RPC interface: each method is one admin request, or one config request.
struct Management {
    admin: Rc<Worker<AdminRequest, AdminReply>>,
    config: Option<Rc<Worker<ConfigRequest, ConfigReply>>>,
}

/// How long a scrape waits for the pools (Prometheus' own timeout is 10 s by default).
const SCRAPE_POOLS_TIMEOUT: Duration = Duration::from_secs(5);

/// What a scrape asks of the supervisor and the metadata service.
struct Scrape {
    admin: Rc<Worker<AdminRequest, AdminReply>>,
    config: Option<Rc<Worker<ConfigRequest, ConfigReply>>>,
}

impl crate::metrics::Gather for Scrape {
    async fn gather(self: Rc<Self>) -> Vec<duplex_ipc::metrics::Sample> {
        use crate::metrics::{pool_samples, source_up};
        let mut out = Vec::new();
        let Some(config) = &self.config else {
            return out;
        };
        // This node's id, when it is a cluster member (whether it serves a pool).
        let services = match self.admin.call(AdminRequest::ListServices).await {
            Ok(AdminReply::Services(list)) => list,
            _ => {
                out.push(source_up("duplexd", false));
                return out;
            }
        };
        out.push(source_up("duplexd", true));
        let node = if services.iter().any(|s| s.name == CLUSTER_SERVICE) {
            match self
                .admin
                .call(AdminRequest::ServiceReport(CLUSTER_SERVICE.into()))
                .await
            {
                Ok(AdminReply::Report { text, .. }) => {
                    serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .and_then(|v| v["node"].as_u64())
                }
                _ => None,
            }
        } else {
            None
        };
        let metadata_runs = services
            .iter()
            .any(|s| s.name == METADATA_SERVICE && s.state == ServiceState::Running);
        let pools = if metadata_runs {
            tokio::time::timeout(SCRAPE_POOLS_TIMEOUT, config.call(ConfigRequest::ListPools)).await
        } else {
            Ok(Err(capnp::Error::failed("metadata not running".into())))
        };
        match pools {
            Ok(Ok(ConfigReply::Pools(list))) => {
                out.push(source_up("metadata", true));
                let cluster_member = services.iter().any(|s| s.name == CLUSTER_SERVICE);
                let mut samples = pool_samples(&list, node);
                if cluster_member && node.is_none() {
                    // Who serves what is unknown without the cluster service's word.
                    samples.retain(|s| s.def.name != "duplex_pool_served_here");
                }
                out.extend(samples);
            }
            _ => out.push(source_up("metadata", false)),
        }
        out
    }
}

impl management::Server for Management {
    async fn status(
        self: Rc<Self>,
        _: management::StatusParams,
        mut results: management::StatusResults,
    ) -> Result<(), capnp::Error> {
        match self.admin.call(AdminRequest::NodeStatus).await? {
            AdminReply::Status(s) => {
                write_status(results.get().init_status(), &s);
                Ok(())
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn list_services(
        self: Rc<Self>,
        _: management::ListServicesParams,
        mut results: management::ListServicesResults,
    ) -> Result<(), capnp::Error> {
        match self.admin.call(AdminRequest::ListServices).await? {
            AdminReply::Services(list) => {
                let len = u32::try_from(list.len())
                    .map_err(|_| capnp::Error::failed("service table too large".into()))?;
                let mut out = results.get().init_services(len);
                for (i, s) in (0..len).zip(&list) {
                    write_service(out.reborrow().get(i), s);
                }
                Ok(())
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn restart_service(
        self: Rc<Self>,
        params: management::RestartServiceParams,
        mut results: management::RestartServiceResults,
    ) -> Result<(), capnp::Error> {
        let name = service_name(params.get()?.get_name())?;
        let message = self.done(AdminRequest::RestartService(name)).await?;
        results.get().set_message(message.as_str());
        Ok(())
    }

    async fn crash_service(
        self: Rc<Self>,
        params: management::CrashServiceParams,
        mut results: management::CrashServiceResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let name = service_name(params.get_name())?;
        let mode: CrashMode = params
            .get_mode()
            .map_err(|capnp::NotInSchema(v)| {
                capnp::Error::failed(format!("unknown crash mode {v}"))
            })?
            .into();
        let message = self.done(AdminRequest::CrashService { name, mode }).await?;
        results.get().set_message(message.as_str());
        Ok(())
    }

    async fn service_report(
        self: Rc<Self>,
        params: management::ServiceReportParams,
        mut results: management::ServiceReportResults,
    ) -> Result<(), capnp::Error> {
        let name = service_name(params.get()?.get_name())?;
        match self.admin.call(AdminRequest::ServiceReport(name)).await? {
            AdminReply::Report { generation, text } => {
                let mut r = results.get();
                r.set_generation(generation);
                r.set_report(text.as_str());
                Ok(())
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn events(
        self: Rc<Self>,
        params: management::EventsParams,
        mut results: management::EventsResults,
    ) -> Result<(), capnp::Error> {
        let after = params.get()?.get_after();
        match self.admin.call(AdminRequest::Events(after)).await? {
            AdminReply::Events(text) => {
                results.get().set_events(text.as_str());
                Ok(())
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn config(
        self: Rc<Self>,
        params: management::ConfigParams,
        mut results: management::ConfigResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        if !params.has_request() {
            return Err(capnp::Error::failed("config call without a request".into()));
        }
        let request = ConfigRequest::read_body(params.get_request()?)
            .map_err(|e| capnp::Error::failed(format!("malformed config request: {e}")))?;
        let Some(config) = &self.config else {
            return Err(capnp::Error::failed(NO_METADATA.into()));
        };
        self.check_metadata_runs().await?;
        if !request.is_read_only() {
            if let Some(why) = self.cluster_refuses_changes().await {
                tracing::warn!(request = request.kind_name(), "{why}");
                let reply = ConfigReply::Error {
                    kind: duplex_ipc::config::ConfigErrorKind::Refused,
                    message: why,
                };
                reply.write_body(results.get().init_reply());
                return Ok(());
            }
        }
        tracing::debug!(request = request.kind_name(), "config request");
        let reply = config.call(request.clone()).await?;
        if !reply.answers(&request) {
            return Err(capnp::Error::failed(format!(
                "the metadata service answered {} with {}, which does not fit",
                request.kind_name(),
                reply.kind_name()
            )));
        }
        reply.write_body(results.get().init_reply());
        Ok(())
    }
}

impl Management {
    /// Fails at once, with nothing sent, when the supervisor says the metadata service is down
    /// (backoff, failed, stopped). Starting counts as up: it answers once it is ready. When the
    /// supervisor cannot say, the request goes ahead (and times out if nobody answers).
    async fn check_metadata_runs(&self) -> Result<(), capnp::Error> {
        let services = match self.admin.call(AdminRequest::ListServices).await {
            Ok(AdminReply::Services(list)) => list,
            Ok(other) => {
                tracing::debug!(reply = ?other, "cannot tell whether metadata runs");
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot tell whether metadata runs");
                return Ok(());
            }
        };
        match services.iter().find(|s| s.name == METADATA_SERVICE) {
            Some(s) if !matches!(s.state, ServiceState::Starting | ServiceState::Running) => {
                Err(capnp::Error::failed(format!(
                    "the metadata service is not running (it is {}; see `duplexctl service list`)",
                    s.state.name()
                )))
            }
            _ => Ok(()),
        }
    }

    /// Why configuration changes are refused now, if they are: the node is a cluster member
    /// whose cluster service reports the interconnect to its peer down while the peer is
    /// alive (a change made here would not reach it; the two nodes' configurations would part).
    /// A node without a cluster service, or whose report says nothing yet, accepts changes.
    async fn cluster_refuses_changes(&self) -> Option<String> {
        let report = match self
            .admin
            .call(AdminRequest::ServiceReport(CLUSTER_SERVICE.into()))
            .await
        {
            Ok(AdminReply::Report { text, .. }) => text,
            _ => return None,
        };
        let v: serde_json::Value = serde_json::from_str(&report).ok()?;
        (v["peer"]["state"] == "interconnect-down").then(|| {
            format!(
                "configuration changes are refused while the interconnect to the peer (node {}) is down: the peer may be alive and would not learn of them (`duplexctl cluster status`)",
                v["peer"]["node"]
            )
        })
    }

    /// A restart or crash request: the supervisor's "done" message.
    async fn done(&self, request: AdminRequest) -> Result<String, capnp::Error> {
        match self.admin.call(request).await? {
            AdminReply::Done(message) => Ok(message),
            other => Err(unexpected(&other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_flattens() {
        assert_eq!(one_line("a\nb\r\n  c\t\u{1b}[31m"), "a b c [31m");
        assert_eq!(one_line(""), "");
    }

    #[test]
    fn slots_are_bounded_and_returned() {
        let active = Rc::new(Cell::new(0));
        let slots: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|_| Slot::take(&active).expect("a slot"))
            .collect();
        assert!(Slot::take(&active).is_none());
        drop(slots);
        assert_eq!(active.get(), 0);
        assert!(Slot::take(&active).is_some());
    }

    #[test]
    fn admin_errors_are_one_line_messages() {
        let (sup, mgmt) = AdminChannel::pair().expect("pair");
        let server = std::thread::spawn(move || {
            let (id, _) = sup
                .recv_request(Duration::from_secs(5))
                .expect("recv")
                .expect("a request");
            sup.send_reply(
                id,
                &AdminReply::Error {
                    code: duplex_ipc::admin::AdminErrorCode::UnknownService,
                    message: "no service\nnamed x".into(),
                },
            )
            .expect("reply");
            // Then the supervisor goes away.
        });
        assert_eq!(
            admin_call(&mgmt, &AdminRequest::RestartService("x".into())),
            Err("no service named x".into())
        );
        server.join().expect("server");
        assert_eq!(
            admin_call(&mgmt, &AdminRequest::ListServices),
            Err("supervisor closed the admin channel".into())
        );
    }

    #[test]
    fn config_failures_are_one_line_messages_that_say_what_is_known() {
        use duplex_ipc::config::ConfigErrorKind;
        let (mgmt, metadata) = ConfigChannel::pair().expect("pair");
        let wait = Duration::from_millis(20);
        // Nobody answers: a read says so; a change also says its outcome is unknown.
        assert_eq!(
            config_call(&mgmt, &ConfigRequest::ListPools, wait),
            Err("the metadata service did not answer within 20ms".into())
        );
        assert_eq!(
            config_call(&mgmt, &ConfigRequest::DeleteVolume("v".into()), wait),
            Err("the metadata service did not answer within 20ms; the request may or may not have been carried out".into())
        );
        assert_eq!(mgmt.discard_queued(), 0, "mgmt's end holds no requests");
        assert_eq!(metadata.discard_queued(), 2, "both requests were sent");
        // An error reply is an answer, passed on as such.
        let server = std::thread::spawn(move || {
            let (id, _) = metadata
                .recv_request(Duration::from_secs(5))
                .expect("recv")
                .expect("a request");
            metadata
                .send_reply(
                    id,
                    &ConfigReply::Error {
                        kind: ConfigErrorKind::InUse,
                        message: "volume v is exported".into(),
                    },
                )
                .expect("reply");
            // The next request is answered with junk (sent only once it is asked: mgmt
            // discards whatever is queued before each call, so junk sent ahead could be
            // discarded, and the test raced on that).
            let _ = metadata.recv_request(Duration::from_secs(5));
            metadata.send_raw_for_tests(b"junk").expect("junk");
            // Then the metadata end is gone for good.
        });
        assert_eq!(
            config_call(
                &mgmt,
                &ConfigRequest::DeleteVolume("v".into()),
                Duration::from_secs(5)
            ),
            Ok(ConfigReply::Error {
                kind: ConfigErrorKind::InUse,
                message: "volume v is exported".into()
            })
        );
        let malformed = config_call(&mgmt, &ConfigRequest::ListDrives, Duration::from_secs(5));
        assert!(
            malformed
                .as_ref()
                .is_err_and(|m| m.starts_with("the metadata service sent a malformed reply")),
            "{malformed:?}"
        );
        server.join().expect("server");
        assert_eq!(
            config_call(&mgmt, &ConfigRequest::ListDrives, Duration::from_secs(5)),
            Err("the metadata service is not running (its config channel is closed)".into())
        );
    }
}
