//! duplexctl's side of the management RPC: connecting to `mgmt.sock`, making one call, and
//! telling apart the ways a node can fail to answer.
//!
//! # Why the answer did not come
//!
//! The supervisor holds the listening socket, so while mgmt restarts a client still connects (the
//! kernel queues it in the listen backlog) but nobody answers; a connection mgmt had accepted
//! drops when mgmt dies. The client:
//!
//! 1. connects (a missing socket or a refused connection are final: no node, or no duplexd);
//! 2. for a request that changes the node (restart, crash), first proves that a live mgmt
//!    accepted the connection (see `probe`), so that such a request never sits in the backlog to
//!    be carried out by the next mgmt after the client gave up;
//! 3. sends the request and waits for its answer.
//!
//! A connection that drops before step 3 is retried (reconnect) for every request, until the
//! timeout. One that drops after step 3 is retried only for idempotent requests (status, list,
//! and the storage configuration requests that only read: drive, pool, volume and subsystem
//! lists, pool show); for restart, crash and the configuration changes the outcome is unknown
//! ([`ClientError::Interrupted`]), unless the target was mgmt itself, whose going down is the
//! expected outcome ([`Outcome::MgmtWentDown`]). When the time runs out without an answer,
//! `<state_dir>/duplexd.lock` says whether duplexd is alive ([`ClientError::Restarting`]) or not
//! ([`ClientError::NotAnswering`]).
//!
//! A configuration request, once sent, is given at least [`CONFIG_ANSWER_WAIT`] to be answered
//! (mgmt itself waits up to [`crate::server::CONFIG_TIMEOUT`] for the metadata service, whose
//! commits flush drives), whatever the timeout for reaching mgmt.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use duplex_ipc::admin::{
    read_service, read_status, CrashMode, NodeStatus, ServiceInfo, MAX_SERVICES,
};
use duplex_ipc::config::{ConfigErrorKind, ConfigReply, ConfigRequest};
use duplex_schemas::mgmt_capnp::management;
use tokio::time::Instant;

use crate::io::Stream;

/// The prefix `capnp-rpc` puts before the reason of an error the server sent.
const REMOTE: &str = "remote exception: ";
/// Words one answer may hold: 8 MiB, far above the largest service table.
const TRAVERSAL_LIMIT_WORDS: usize = 1024 * 1024;
/// First pause before reconnecting; doubles up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Longest pause between reconnects.
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// The least time a sent configuration request is given to be answered: mgmt's own wait for
/// the metadata service, and a margin.
pub const CONFIG_ANSWER_WAIT: Duration =
    Duration::from_secs(crate::server::CONFIG_TIMEOUT.as_secs() + 5);

/// One management call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The node summary.
    Status,
    /// The service table.
    ListServices,
    /// Restart a service.
    Restart(String),
    /// Crash-inject a service.
    Crash {
        /// The service.
        name: String,
        /// How.
        mode: CrashMode,
    },
    /// A storage configuration request, for the metadata service.
    Config(ConfigRequest),
    /// The last status report of a service.
    Report(String),
    /// The node's events numbered above this one.
    Events(u64),
}

impl Request {
    /// Whether repeating the request is harmless (it only reads).
    pub fn idempotent(&self) -> bool {
        match self {
            Self::Status | Self::ListServices | Self::Report(_) | Self::Events(_) => true,
            Self::Config(request) => request.is_read_only(),
            Self::Restart(_) | Self::Crash { .. } => false,
        }
    }

    /// The service the request acts on.
    pub fn target(&self) -> Option<&str> {
        match self {
            Self::Restart(name) | Self::Crash { name, .. } => Some(name),
            Self::Status
            | Self::ListServices
            | Self::Config(_)
            | Self::Report(_)
            | Self::Events(_) => None,
        }
    }

    /// How long the answer may take once the request is sent, given the client's `timeout`.
    pub fn answer_wait(&self, timeout: Duration) -> Duration {
        match self {
            Self::Config(_) => timeout.max(CONFIG_ANSWER_WAIT),
            _ => timeout,
        }
    }

    /// Whether the request asks mgmt itself to go down (restart or crash of `mgmt`).
    pub fn stops_mgmt(&self) -> bool {
        self.target() == Some(crate::server::SERVICE)
    }
}

/// mgmt's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// To [`Request::Status`].
    Status(NodeStatus),
    /// To [`Request::ListServices`].
    Services(Vec<ServiceInfo>),
    /// To [`Request::Restart`] and [`Request::Crash`]: what the supervisor did.
    Done(String),
    /// To [`Request::Config`]: the metadata service's reply, never an error (that is
    /// [`ClientError::Config`]), and one that fits the request.
    Config(ConfigReply),
    /// To [`Request::Events`]: a JSON array of events.
    Events(String),
    /// To [`Request::Report`]: the generation that sent it (0: none yet) and the report.
    Report {
        /// Generation of the sender.
        generation: u64,
        /// The report (JSON; empty: none).
        text: String,
    },
}

/// How a call ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// mgmt answered.
    Answer(Answer),
    /// The request restarted or crashed mgmt itself, which ended the connection before the
    /// answer (or, for a hang, kept it from coming): the expected outcome.
    MgmtWentDown,
}

/// Where the node is and how long to try.
#[derive(Debug, Clone)]
pub struct Target {
    /// The node's state directory (holds `duplexd.lock`).
    pub state_dir: PathBuf,
    /// The management socket.
    pub socket: PathBuf,
    /// How long to keep trying for an answer.
    pub timeout: Duration,
    /// A node managed from afar (`--connect`): its remote management address and key; the
    /// socket and state directory are then not used.
    pub remote: Option<Remote>,
}

/// A remote management port and the key it is managed with.
#[derive(Clone)]
pub struct Remote {
    /// `host:port`, as the operator gave it.
    pub addr: String,
    /// The node's mgmt key.
    pub key: crate::remote::MgmtKey,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Why a call failed. Each message is one line, for `duplexctl: <message>`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket does not exist.
    #[error("no duplex node at {dir}: {socket} does not exist (is duplexd running?)")]
    NoNode {
        /// State directory.
        dir: String,
        /// Socket path.
        socket: String,
    },
    /// Nobody holds the listening socket.
    #[error("duplexd is not running: {socket} refuses connections (a stale socket)")]
    Refused {
        /// Socket path.
        socket: String,
    },
    /// Connecting failed otherwise.
    #[error("cannot connect to {socket}: {source}")]
    Connect {
        /// Socket path.
        socket: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Nothing listens at a remote management address.
    #[error("no duplex node answers at {addr}: connection refused (is it the node's remote management listener?)")]
    RemoteRefused {
        /// The address.
        addr: String,
    },
    /// Connecting to a remote management address failed otherwise.
    #[error("cannot connect to {addr}: {source}")]
    RemoteConnect {
        /// The address.
        addr: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake with a remote node failed (a wrong key, or not the node).
    #[error(
        "the TLS handshake with {addr} failed ({why}): is --key-file the node's [mgmt] key_file?"
    )]
    RemoteKey {
        /// The address.
        addr: String,
        /// OpenSSL's reason.
        why: String,
    },
    /// A remote node did not answer in time.
    #[error("mgmt at {addr} is not answering ({why})")]
    RemoteNotAnswering {
        /// The address.
        addr: String,
        /// What was seen last.
        why: String,
    },
    /// duplexd is alive but mgmt did not answer in time.
    #[error("node reachable (duplexd pid {pid}) but mgmt is restarting; try again")]
    Restarting {
        /// duplexd's pid, from `duplexd.lock`.
        pid: i32,
    },
    /// Nothing answered and duplexd does not seem to run.
    #[error("mgmt is not answering on {socket} and duplexd does not seem to run ({why})")]
    NotAnswering {
        /// Socket path.
        socket: String,
        /// What `duplexd.lock` said.
        why: String,
    },
    /// The connection dropped after a restart or crash request was sent.
    #[error("mgmt restarted during the request; it may or may not have been carried out")]
    Interrupted,
    /// A restart or crash request was sent but not answered in time.
    #[error(
        "mgmt did not answer within {}; the request may or may not have been carried out",
        human_duration(*.0)
    )]
    Unanswered(Duration),
    /// mgmt refused or failed the request; its message.
    #[error("{0}")]
    Remote(String),
    /// The metadata service refused or failed a configuration request; nothing was changed.
    #[error("{message}")]
    Config {
        /// Class.
        kind: ConfigErrorKind,
        /// Its message, on one line.
        message: String,
    },
    /// The answer made no sense.
    #[error("bad answer from mgmt: {0}")]
    Protocol(String),
    /// The client itself could not run (its async runtime).
    #[error("cannot start: {0}")]
    Runtime(#[source] io::Error),
}

/// What one connection attempt came to.
#[derive(Debug)]
enum Attempt {
    Answer(Answer),
    Remote(String),
    Protocol(String),
    /// Nobody took the connection yet (backlog full, or the connection dropped before the
    /// request was sent): safe to retry any request.
    NotSent,
    /// The connection dropped after the request was sent.
    Dropped,
    /// The time ran out.
    TimedOut {
        sent: bool,
    },
}

/// Makes `request` on the node at `target`, retrying as described in the module docs.
pub fn call(target: &Target, request: &Request) -> Result<Outcome, ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ClientError::Runtime)?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, call_async(target, request))
}

async fn call_async(target: &Target, request: &Request) -> Result<Outcome, ClientError> {
    let deadline = Instant::now() + target.timeout;
    let mut pause = FIRST_RETRY_PAUSE;
    loop {
        match attempt(target, request, deadline).await? {
            Attempt::Answer(Answer::Config(ConfigReply::Error { kind, message })) => {
                return Err(ClientError::Config {
                    kind,
                    message: crate::server::one_line(&message),
                })
            }
            Attempt::Answer(a) => return Ok(Outcome::Answer(a)),
            Attempt::Remote(m) => return Err(ClientError::Remote(m)),
            Attempt::Protocol(m) => return Err(ClientError::Protocol(m)),
            Attempt::Dropped if request.stops_mgmt() => return Ok(Outcome::MgmtWentDown),
            Attempt::Dropped if !request.idempotent() => return Err(ClientError::Interrupted),
            Attempt::TimedOut { sent: true } if !request.idempotent() => {
                let hang = matches!(
                    request,
                    Request::Crash {
                        mode: CrashMode::Hang,
                        ..
                    }
                );
                return if hang && request.stops_mgmt() {
                    Ok(Outcome::MgmtWentDown)
                } else {
                    Err(ClientError::Unanswered(request.answer_wait(target.timeout)))
                };
            }
            Attempt::TimedOut { .. } => return Err(diagnose(target)),
            Attempt::NotSent | Attempt::Dropped => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(diagnose(target));
                }
                tokio::time::sleep(pause.min(deadline - now)).await;
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
            }
        }
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

async fn attempt(
    target: &Target,
    request: &Request,
    deadline: Instant,
) -> Result<Attempt, ClientError> {
    if let Some(remote) = &target.remote {
        let connect = crate::remote::connect(&remote.addr, &remote.key);
        return match tokio::time::timeout_at(deadline, connect).await {
            Err(_) => Ok(Attempt::TimedOut { sent: false }),
            Ok(Ok(tls)) => {
                let (reader, writer) = tokio::io::split(tls);
                Ok(rpc_exchange(reader, writer, request, deadline).await)
            }
            Ok(Err(crate::remote::Failure::Connect(e))) => match e.kind() {
                io::ErrorKind::ConnectionRefused => Err(ClientError::RemoteRefused {
                    addr: remote.addr.clone(),
                }),
                _ => Err(ClientError::RemoteConnect {
                    addr: remote.addr.clone(),
                    source: e,
                }),
            },
            Ok(Err(crate::remote::Failure::Handshake(why))) => Err(ClientError::RemoteKey {
                addr: remote.addr.clone(),
                why,
            }),
            // mgmt restarting: duplexd holds the listener, the next mgmt takes the connection.
            Ok(Err(crate::remote::Failure::Dropped(_))) => Ok(Attempt::NotSent),
        };
    }
    let connect = tokio::net::UnixStream::connect(&target.socket);
    let stream = match tokio::time::timeout_at(deadline, connect).await {
        Err(_) => return Ok(Attempt::TimedOut { sent: false }),
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            return match e.kind() {
                io::ErrorKind::NotFound => Err(ClientError::NoNode {
                    dir: display(&target.state_dir),
                    socket: display(&target.socket),
                }),
                io::ErrorKind::ConnectionRefused => Err(ClientError::Refused {
                    socket: display(&target.socket),
                }),
                // The listen backlog is full: mgmt is down or swamped.
                io::ErrorKind::WouldBlock => Ok(Attempt::NotSent),
                _ => Err(ClientError::Connect {
                    socket: display(&target.socket),
                    source: e,
                }),
            };
        }
    };
    let (reader, writer) = stream.into_split();
    Ok(rpc_exchange(reader, writer, request, deadline).await)
}

/// One request on a connected stream: the RPC system, the bootstrap capability, the exchange.
async fn rpc_exchange<R, W>(reader: R, writer: W, request: &Request, deadline: Instant) -> Attempt
where
    R: tokio::io::AsyncRead + Unpin + 'static,
    W: tokio::io::AsyncWrite + Unpin + 'static,
{
    let mut options = capnp::message::ReaderOptions::new();
    options.traversal_limit_in_words(Some(TRAVERSAL_LIMIT_WORDS));
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(Stream::new(reader)),
        futures::io::BufWriter::new(Stream::new(writer)),
        Side::Client,
        options,
    );
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let client: management::Client = rpc.bootstrap(Side::Server);
    let driver = tokio::task::spawn_local(rpc);
    let result = exchange(&client, request, deadline).await;
    driver.abort();
    result
}

async fn exchange(client: &management::Client, request: &Request, deadline: Instant) -> Attempt {
    if !request.idempotent() {
        match tokio::time::timeout_at(deadline, probe(client)).await {
            Err(_) => return Attempt::TimedOut { sent: false },
            Ok(Err(e)) => return classify(e, false),
            Ok(Ok(())) => {}
        }
    }
    // Once sent, a request may take longer than reaching mgmt did (configuration commits).
    let deadline = deadline.max(Instant::now() + request.answer_wait(Duration::ZERO));
    match tokio::time::timeout_at(deadline, send(client, request)).await {
        Err(_) => Attempt::TimedOut { sent: true },
        Ok(Ok(answer)) => Attempt::Answer(answer),
        Ok(Err(e)) => classify(e, true),
    }
}

/// An interface id no duplex server implements (the ids of real interfaces are random 64-bit
/// numbers with the top bit set).
const PROBE_INTERFACE: u64 = 0x0064_7570_6c65_7870;

/// Proves, without side effects, that a live mgmt accepted this connection: a call on an
/// interface nobody implements is answered "not implemented" by the RPC layer of whoever
/// accepted it. Until then the connection may sit in the listen backlog, where a request would
/// wait to be carried out by the *next* mgmt, perhaps after this client gave up and said "try
/// again". (Waiting for the bootstrap capability to resolve would say the same, but capnp-rpc
/// 0.27 never resolves a bootstrap promise client, so `when_resolved` does not return.)
async fn probe(client: &management::Client) -> Result<(), capnp::Error> {
    let call = client
        .client
        .new_call::<capnp::any_pointer::Owned, capnp::any_pointer::Owned>(PROBE_INTERFACE, 0, None);
    match call.send().promise.await {
        Ok(_) => Ok(()),
        Err(e) if e.extra.starts_with(REMOTE) => Ok(()),
        Err(e) => Err(e),
    }
}

fn classify(e: capnp::Error, sent: bool) -> Attempt {
    if let Some(reason) = e.extra.strip_prefix(REMOTE) {
        return Attempt::Remote(crate::server::one_line(reason));
    }
    match e.kind {
        capnp::ErrorKind::Disconnected | capnp::ErrorKind::PrematureEndOfFile => {
            if sent {
                Attempt::Dropped
            } else {
                Attempt::NotSent
            }
        }
        _ => Attempt::Protocol(crate::server::one_line(&e.to_string())),
    }
}

fn bad(e: impl std::fmt::Display) -> capnp::Error {
    capnp::Error::failed(e.to_string())
}

async fn send(client: &management::Client, request: &Request) -> Result<Answer, capnp::Error> {
    match request {
        Request::Status => {
            let reply = client.status_request().send().promise.await?;
            let status = read_status(reply.get()?.get_status()?).map_err(bad)?;
            Ok(Answer::Status(status))
        }
        Request::ListServices => {
            let reply = client.list_services_request().send().promise.await?;
            let list = reply.get()?.get_services()?;
            if list.len() as usize > MAX_SERVICES {
                return Err(bad(format!(
                    "{} services, more than the {MAX_SERVICES} a node may have",
                    list.len()
                )));
            }
            let services = list
                .iter()
                .map(read_service)
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad)?;
            Ok(Answer::Services(services))
        }
        Request::Restart(name) => {
            let mut call = client.restart_service_request();
            call.get().set_name(name.as_str());
            let reply = call.send().promise.await?;
            Ok(Answer::Done(text(reply.get()?.get_message())?))
        }
        Request::Crash { name, mode } => {
            let mut call = client.crash_service_request();
            call.get().set_name(name.as_str());
            call.get().set_mode((*mode).into());
            let reply = call.send().promise.await?;
            Ok(Answer::Done(text(reply.get()?.get_message())?))
        }
        Request::Report(name) => {
            let mut call = client.service_report_request();
            call.get().set_name(name.as_str());
            let reply = call.send().promise.await?;
            let reply = reply.get()?;
            Ok(Answer::Report {
                generation: reply.get_generation(),
                text: text(reply.get_report())?,
            })
        }
        Request::Events(after) => {
            let mut call = client.events_request();
            call.get().set_after(*after);
            let reply = call.send().promise.await?;
            Ok(Answer::Events(text(reply.get()?.get_events())?))
        }
        Request::Config(request) => {
            let mut call = client.config_request();
            request.write_body(call.get().init_request());
            let reply = call.send().promise.await?;
            let reply = reply.get()?;
            if !reply.has_reply() {
                return Err(bad("a config answer without a reply"));
            }
            let reply = ConfigReply::read_body(reply.get_reply()?).map_err(bad)?;
            if !reply.answers(request) {
                return Err(bad(format!(
                    "mgmt answered {} with {}",
                    request.kind_name(),
                    reply.kind_name()
                )));
            }
            Ok(Answer::Config(reply))
        }
    }
}

fn text(t: capnp::Result<capnp::text::Reader<'_>>) -> Result<String, capnp::Error> {
    Ok(t?.to_str().map_err(bad)?.to_owned())
}

/// Why nothing answered: is duplexd (the pid in `duplexd.lock`) alive?
fn diagnose(target: &Target) -> ClientError {
    if let Some(remote) = &target.remote {
        return ClientError::RemoteNotAnswering {
            addr: remote.addr.clone(),
            why: "no answer within the timeout: duplexd restarting mgmt, or the network".into(),
        };
    }
    let lock = target.state_dir.join("duplexd.lock");
    let not_answering = |why: String| ClientError::NotAnswering {
        socket: display(&target.socket),
        why,
    };
    let text = match std::fs::read_to_string(&lock) {
        Ok(text) => text,
        Err(e) => return not_answering(format!("cannot read {}: {e}", lock.display())),
    };
    match text.trim().parse::<i32>() {
        Ok(pid) if pid > 0 => {
            if process_alive(pid) {
                ClientError::Restarting { pid }
            } else {
                not_answering(format!(
                    "{} names pid {pid}, which is not running",
                    lock.display()
                ))
            }
        }
        _ => not_answering(format!("{} holds no pid", lock.display())),
    }
}

/// Whether a process with this pid exists (signal 0; `EPERM` means it exists but is not ours).
fn process_alive(pid: i32) -> bool {
    matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Ok(()) | Err(nix::errno::Errno::EPERM)
    )
}

/// A duration for humans: `850ms`, `12s`, `3m12s`, `2h05m`, `3d04h`.
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    if s < 60 {
        let tenths = (ms % 1000) / 100;
        return if tenths == 0 || s >= 10 {
            format!("{s}s")
        } else {
            format!("{s}.{tenths}s")
        };
    }
    let (m, s) = (s / 60, s % 60);
    if m < 60 {
        return format!("{m}m{s:02}s");
    }
    let (h, m) = (m / 60, m % 60);
    if h < 24 {
        return format!("{h}h{m:02}m");
    }
    format!("{}d{:02}h", h / 24, h % 24)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        let cases = [
            (0, "0ms"),
            (850, "850ms"),
            (1_000, "1s"),
            (1_500, "1.5s"),
            (12_400, "12s"),
            (192_000, "3m12s"),
            (7_500_000, "2h05m"),
            (273_600_000, "3d04h"),
        ];
        for (ms, want) in cases {
            assert_eq!(human_duration(Duration::from_millis(ms)), want, "{ms}");
        }
    }

    #[test]
    fn only_reads_are_idempotent() {
        assert!(Request::Status.idempotent());
        assert!(Request::ListServices.idempotent());
        assert!(!Request::Restart("x".into()).idempotent());
        let crash = Request::Crash {
            name: "mgmt".into(),
            mode: CrashMode::Kill,
        };
        assert!(!crash.idempotent());
        assert!(crash.stops_mgmt());
        assert!(!Request::Restart("fabric".into()).stops_mgmt());
        assert!(Request::Config(ConfigRequest::ListPools).idempotent());
        assert!(Request::Config(ConfigRequest::ShowPool("tank".into())).idempotent());
        assert!(!Request::Config(ConfigRequest::DeleteVolume("v".into())).idempotent());
        assert!(!Request::Config(ConfigRequest::ListDrives).stops_mgmt());
    }

    #[test]
    fn config_requests_get_time_for_a_commit() {
        let short = Duration::from_secs(1);
        let config = Request::Config(ConfigRequest::DeleteVolume("v".into()));
        assert_eq!(config.answer_wait(short), CONFIG_ANSWER_WAIT);
        assert_eq!(
            config.answer_wait(Duration::from_secs(99)),
            Duration::from_secs(99)
        );
        assert_eq!(Request::Status.answer_wait(short), short);
        assert!(CONFIG_ANSWER_WAIT > crate::server::CONFIG_TIMEOUT);
    }

    #[test]
    fn errors_are_classified() {
        let remote = capnp::Error::failed(format!("{REMOTE}no service\nnamed x"));
        assert!(matches!(classify(remote, true), Attempt::Remote(m) if m == "no service named x"));
        let gone = capnp::Error::disconnected("Peer disconnected.".into());
        assert!(matches!(classify(gone.clone(), true), Attempt::Dropped));
        assert!(matches!(classify(gone, false), Attempt::NotSent));
        let junk = capnp::Error::failed("Message has 99999999 words".into());
        assert!(matches!(classify(junk, true), Attempt::Protocol(_)));
    }
}
