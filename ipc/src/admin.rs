//! The admin channel: the mgmt service asks the supervisor about and acts on the service table.
//!
//! Mirrors `schemas/admin.capnp`. One `SOCK_SEQPACKET` socket, handed to mgmt only, so holding
//! it *is* the privilege to restart and crash-inject services; no other message travels on it,
//! and no file descriptors do. The transport (datagram limits, `MSG_TRUNC`/`MSG_CTRUNC` checks,
//! rate-limited warnings) and the decoding bounds (traversal, nesting, text lengths) are
//! [`ControlChannel`]'s; the messages are their own types, so a
//! lifecycle message cannot be sent here by mistake, nor an admin request on a lifecycle socket.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use duplex_schemas::admin_capnp as wire;
use nix::sys::socket::MsgFlags;

use crate::control::{
    check_text, read_text as text, reader_options, unknown, ControlChannel, ControlError,
    MAX_NAME_BYTES, MAX_REPORT_BYTES, MAX_TEXT_BYTES,
};

/// The most services a [`AdminReply::Services`] may list.
pub const MAX_SERVICES: usize = 64;

/// A request from mgmt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRequest {
    /// The service table.
    ListServices,
    /// Restart the named service.
    RestartService(String),
    /// Crash-inject the named service.
    CrashService {
        /// The service.
        name: String,
        /// How.
        mode: CrashMode,
    },
    /// The node summary.
    NodeStatus,
    /// The named service's last status report.
    ServiceReport(String),
    /// The node's events numbered above this one.
    Events(u64),
}

/// Longest answer to [`AdminRequest::Events`].
pub const MAX_EVENTS_JSON_BYTES: usize = 48 * 1024;

/// How `duplexctl service crash` makes a service fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrashMode {
    /// The supervisor sends `SIGKILL`.
    Kill,
    /// The service panics (and aborts).
    Panic,
    /// The service stops its heartbeat and blocks.
    Hang,
    /// The service attempts a forbidden system call.
    ForbiddenSyscall,
}

impl CrashMode {
    /// All modes, in schema order.
    pub const ALL: [Self; 4] = [Self::Kill, Self::Panic, Self::Hang, Self::ForbiddenSyscall];

    /// The name `duplexctl` uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::Panic => "panic",
            Self::Hang => "hang",
            Self::ForbiddenSyscall => "forbidden-syscall",
        }
    }

    /// Parses [`CrashMode::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// A reply from the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminReply {
    /// The service table.
    Services(Vec<ServiceInfo>),
    /// What was done, for humans.
    Done(String),
    /// The request failed.
    Error {
        /// Class.
        code: AdminErrorCode,
        /// For humans.
        message: String,
    },
    /// Node summary.
    Status(NodeStatus),
    /// Events (a JSON array, at most [`MAX_EVENTS_JSON_BYTES`]).
    Events(String),
    /// A service's last status report: the generation that sent it (0: none yet) and the
    /// report (JSON; empty: none).
    Report {
        /// Generation of the sender.
        generation: u64,
        /// The report.
        text: String,
    },
}

/// Classes of admin failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdminErrorCode {
    /// No service of that name.
    UnknownService,
    /// Refused for this service.
    NotAllowed,
    /// Tried and failed.
    Failed,
    /// The request was malformed.
    Malformed,
}

/// One row of the service table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Name.
    pub name: String,
    /// Whether it is the datapath.
    pub datapath: bool,
    /// State.
    pub state: ServiceState,
    /// Process id, 0 if none runs.
    pub pid: u32,
    /// Generation.
    pub generation: u64,
    /// Starts after the first.
    pub restarts: u32,
    /// Since the current process was spawned.
    pub uptime_ms: u64,
    /// Times found hung.
    pub hangs: u32,
    /// How the previous process ended.
    pub last_exit: String,
    /// Death of the previous process to Ready of the current one.
    pub last_restart_ms: u64,
}

/// A service's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceState {
    /// Spawned, handshake not finished.
    Starting,
    /// Ready and serving.
    Running,
    /// Died; waiting out the backoff.
    Backoff,
    /// Crash loop (or datapath death): not restarted.
    Failed,
    /// Stopped by the supervisor.
    Stopped,
}

impl ServiceState {
    /// Lower-case name for tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Backoff => "backoff",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

/// The node summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Node name.
    pub node: String,
    /// duplexd's pid.
    pub supervisor_pid: u32,
    /// Since duplexd started.
    pub uptime_ms: u64,
    /// The datapath died.
    pub failed: bool,
    /// Services running.
    pub services_running: u32,
    /// Services in the table.
    pub services_total: u32,
    /// Seccomp in force for services.
    pub sandbox: bool,
}

macro_rules! enum_map {
    ($ours:ty, $theirs:ty, $($a:ident),+) => {
        impl From<$ours> for $theirs {
            fn from(v: $ours) -> Self {
                match v { $(<$ours>::$a => Self::$a),+ }
            }
        }
        impl From<$theirs> for $ours {
            fn from(v: $theirs) -> Self {
                match v { $(<$theirs>::$a => Self::$a),+ }
            }
        }
    };
}
enum_map!(
    CrashMode,
    wire::CrashMode,
    Kill,
    Panic,
    Hang,
    ForbiddenSyscall
);
enum_map!(
    ServiceState,
    wire::ServiceState,
    Starting,
    Running,
    Backoff,
    Failed,
    Stopped
);
enum_map!(
    AdminErrorCode,
    wire::AdminErrorCode,
    UnknownService,
    NotAllowed,
    Failed,
    Malformed
);

fn check(t: &str, field: &'static str, max: usize) -> Result<(), ControlError> {
    check_text(t, field, max, false)
}

fn read<'a>(
    bytes: &'a [u8],
) -> Result<capnp::message::Reader<capnp::serialize::OwnedSegments>, ControlError> {
    let mut rest: &'a [u8] = bytes;
    let message = capnp::serialize::read_message(&mut rest, reader_options())
        .map_err(ControlError::Decode)?;
    if !rest.is_empty() {
        return Err(ControlError::TrailingBytes(rest.len()));
    }
    Ok(message)
}

impl AdminRequest {
    /// Checks the bounds of the schema.
    pub fn validate(&self) -> Result<(), ControlError> {
        match self {
            Self::RestartService(name)
            | Self::CrashService { name, .. }
            | Self::ServiceReport(name) => {
                if name.is_empty() {
                    return Err(ControlError::MissingField("admin.name"));
                }
                check(name, "admin.name", MAX_NAME_BYTES)
            }
            Self::ListServices | Self::NodeStatus | Self::Events(_) => Ok(()),
        }
    }

    /// Encodes with `request_id`.
    pub fn encode(&self, request_id: u64) -> Vec<u8> {
        let mut message = capnp::message::Builder::new_default();
        let mut root = message.init_root::<wire::admin_request::Builder<'_>>();
        root.set_request_id(request_id);
        let mut body = root.init_body();
        match self {
            Self::ListServices => body.set_list_services(()),
            Self::NodeStatus => body.set_node_status(()),
            Self::RestartService(name) => body.set_restart_service(name.as_str()),
            Self::ServiceReport(name) => body.set_service_report(name.as_str()),
            Self::Events(after) => body.set_events(*after),
            Self::CrashService { name, mode } => {
                let mut c = body.init_crash_service();
                c.set_name(name.as_str());
                c.set_mode((*mode).into());
            }
        }
        capnp::serialize::write_message_to_words(&message)
    }

    /// Decodes and validates; never panics.
    pub fn decode(bytes: &[u8]) -> Result<(u64, Self), ControlError> {
        use wire::admin_request::body::Which;
        let message = read(bytes)?;
        let root: wire::admin_request::Reader<'_> =
            message.get_root().map_err(ControlError::Decode)?;
        let request = match root
            .get_body()
            .which()
            .map_err(unknown("AdminRequest.body"))?
        {
            Which::ListServices(()) => Self::ListServices,
            Which::NodeStatus(()) => Self::NodeStatus,
            Which::RestartService(name) => {
                Self::RestartService(text(name, "admin.name", MAX_NAME_BYTES)?)
            }
            Which::ServiceReport(name) => {
                Self::ServiceReport(text(name, "admin.name", MAX_NAME_BYTES)?)
            }
            Which::Events(after) => Self::Events(after),
            Which::CrashService(c) => {
                let c = c.map_err(ControlError::Decode)?;
                Self::CrashService {
                    name: text(c.get_name(), "admin.name", MAX_NAME_BYTES)?,
                    mode: c.get_mode().map_err(unknown("CrashMode"))?.into(),
                }
            }
        };
        request.validate()?;
        Ok((root.get_request_id(), request))
    }
}

impl AdminReply {
    /// Checks the bounds of the schema.
    pub fn validate(&self) -> Result<(), ControlError> {
        match self {
            Self::Services(list) => {
                if list.len() > MAX_SERVICES {
                    return Err(ControlError::TooManyEntries {
                        field: "admin.services",
                        len: list.len(),
                        max: MAX_SERVICES,
                    });
                }
                for s in list {
                    check(&s.name, "admin.services.name", MAX_NAME_BYTES)?;
                    check(&s.last_exit, "admin.services.lastExit", MAX_TEXT_BYTES)?;
                }
                Ok(())
            }
            Self::Done(t) => check(t, "admin.done", MAX_TEXT_BYTES),
            Self::Error { message, .. } => check(message, "admin.error.message", MAX_TEXT_BYTES),
            Self::Status(s) => check(&s.node, "admin.status.node", MAX_NAME_BYTES),
            Self::Report { text, .. } => check(text, "admin.report.text", MAX_REPORT_BYTES),
            Self::Events(t) => check(t, "admin.events", MAX_EVENTS_JSON_BYTES),
        }
    }

    /// Encodes with the `request_id` of the request answered.
    pub fn encode(&self, request_id: u64) -> Vec<u8> {
        let mut message = capnp::message::Builder::new_default();
        let mut root = message.init_root::<wire::admin_reply::Builder<'_>>();
        root.set_request_id(request_id);
        let mut body = root.init_body();
        match self {
            Self::Services(list) => {
                let len = u32::try_from(list.len()).unwrap_or(u32::MAX);
                let mut out = body.init_services(len);
                for (i, s) in (0..len).zip(list) {
                    write_service(out.reborrow().get(i), s);
                }
            }
            Self::Done(t) => body.set_done(t.as_str()),
            Self::Error { code, message } => {
                let mut e = body.init_error();
                e.set_code((*code).into());
                e.set_message(message.as_str());
            }
            Self::Status(s) => write_status(body.init_status(), s),
            Self::Report { generation, text } => {
                let mut r = body.init_report();
                r.set_generation(*generation);
                r.set_text(text.as_str());
            }
            Self::Events(t) => body.set_events(t.as_str()),
        }
        capnp::serialize::write_message_to_words(&message)
    }

    /// Decodes and validates; never panics.
    pub fn decode(bytes: &[u8]) -> Result<(u64, Self), ControlError> {
        use wire::admin_reply::body::Which;
        let message = read(bytes)?;
        let root: wire::admin_reply::Reader<'_> =
            message.get_root().map_err(ControlError::Decode)?;
        let reply = match root
            .get_body()
            .which()
            .map_err(unknown("AdminReply.body"))?
        {
            Which::Services(list) => {
                let list = list.map_err(ControlError::Decode)?;
                let len = list.len() as usize;
                if len > MAX_SERVICES {
                    return Err(ControlError::TooManyEntries {
                        field: "admin.services",
                        len,
                        max: MAX_SERVICES,
                    });
                }
                let mut out = Vec::with_capacity(len);
                for s in list.iter() {
                    out.push(read_service(s)?);
                }
                Self::Services(out)
            }
            Which::Done(t) => Self::Done(text(t, "admin.done", MAX_TEXT_BYTES)?),
            Which::Error(e) => {
                let e = e.map_err(ControlError::Decode)?;
                Self::Error {
                    code: e.get_code().map_err(unknown("AdminErrorCode"))?.into(),
                    message: text(e.get_message(), "admin.error.message", MAX_TEXT_BYTES)?,
                }
            }
            Which::Status(s) => Self::Status(read_status(s.map_err(ControlError::Decode)?)?),
            Which::Report(r) => {
                let r = r.map_err(ControlError::Decode)?;
                Self::Report {
                    generation: r.get_generation(),
                    text: text(r.get_text(), "admin.report.text", MAX_REPORT_BYTES)?,
                }
            }
            Which::Events(t) => Self::Events(text(t, "admin.events", MAX_EVENTS_JSON_BYTES)?),
        };
        reply.validate()?;
        Ok((root.get_request_id(), reply))
    }
}

/// Writes a [`ServiceInfo`] into its schema struct (also used by mgmt's RPC answers).
pub fn write_service(mut out: wire::service_info::Builder<'_>, s: &ServiceInfo) {
    out.set_name(s.name.as_str());
    out.set_kind(if s.datapath {
        wire::ServiceKind::Datapath
    } else {
        wire::ServiceKind::Service
    });
    out.set_state(s.state.into());
    out.set_pid(s.pid);
    out.set_generation(s.generation);
    out.set_restarts(s.restarts);
    out.set_uptime_ms(s.uptime_ms);
    out.set_hangs(s.hangs);
    out.set_last_exit(s.last_exit.as_str());
    out.set_last_restart_ms(s.last_restart_ms);
}

/// Reads a [`ServiceInfo`] from its schema struct, enforcing bounds (also used by `duplexctl`).
pub fn read_service(s: wire::service_info::Reader<'_>) -> Result<ServiceInfo, ControlError> {
    Ok(ServiceInfo {
        name: text(s.get_name(), "admin.services.name", MAX_NAME_BYTES)?,
        datapath: s.get_kind().map_err(unknown("ServiceKind"))? == wire::ServiceKind::Datapath,
        state: s.get_state().map_err(unknown("ServiceState"))?.into(),
        pid: s.get_pid(),
        generation: s.get_generation(),
        restarts: s.get_restarts(),
        uptime_ms: s.get_uptime_ms(),
        hangs: s.get_hangs(),
        last_exit: text(s.get_last_exit(), "admin.services.lastExit", MAX_TEXT_BYTES)?,
        last_restart_ms: s.get_last_restart_ms(),
    })
}

/// Writes a [`NodeStatus`] into its schema struct.
pub fn write_status(mut out: wire::node_status::Builder<'_>, s: &NodeStatus) {
    out.set_node(s.node.as_str());
    out.set_supervisor_pid(s.supervisor_pid);
    out.set_uptime_ms(s.uptime_ms);
    out.set_failed(s.failed);
    out.set_services_running(s.services_running);
    out.set_services_total(s.services_total);
    out.set_sandbox(s.sandbox);
}

/// Reads a [`NodeStatus`] from its schema struct, enforcing bounds.
pub fn read_status(s: wire::node_status::Reader<'_>) -> Result<NodeStatus, ControlError> {
    Ok(NodeStatus {
        node: text(s.get_node(), "admin.status.node", MAX_NAME_BYTES)?,
        supervisor_pid: s.get_supervisor_pid(),
        uptime_ms: s.get_uptime_ms(),
        failed: s.get_failed(),
        services_running: s.get_services_running(),
        services_total: s.get_services_total(),
        sandbox: s.get_sandbox(),
    })
}

/// One end of the admin channel.
#[derive(Debug)]
pub struct AdminChannel {
    inner: ControlChannel,
}

impl AdminChannel {
    /// A connected pair: `(supervisor end, mgmt end)`.
    pub fn pair() -> Result<(Self, Self), ControlError> {
        let (a, b) = ControlChannel::pair()?;
        Ok((Self { inner: a }, Self { inner: b }))
    }

    /// Wraps a handed-over `SOCK_SEQPACKET` socket.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, ControlError> {
        Ok(Self {
            inner: ControlChannel::from_fd(fd)?,
        })
    }

    /// Gives up the socket.
    pub fn into_fd(self) -> OwnedFd {
        self.inner.into_fd()
    }

    /// Sends a request; returns its id.
    pub fn send_request(&self, request: &AdminRequest) -> Result<u64, ControlError> {
        request.validate()?;
        let id = self.inner.next_request_id();
        self.inner.send_datagram(&request.encode(id), &[])?;
        Ok(id)
    }

    /// Sends the reply to request `request_id`.
    pub fn send_reply(&self, request_id: u64, reply: &AdminReply) -> Result<(), ControlError> {
        reply.validate()?;
        self.inner.send_datagram(&reply.encode(request_id), &[])
    }

    /// Sends raw bytes (tests of the receiver's validation).
    #[doc(hidden)]
    pub fn send_raw_for_tests(&self, bytes: &[u8]) -> Result<(), ControlError> {
        self.inner.send_datagram(bytes, &[])
    }

    fn recv_bytes(&self, flags: MsgFlags) -> Result<Vec<u8>, ControlError> {
        let (bytes, fds) = self.inner.recv_raw(flags)?;
        if !fds.is_empty() {
            // Dropping them closes them.
            return Err(ControlError::FdCountMismatch {
                received: fds.len(),
                named: 0,
            });
        }
        Ok(bytes)
    }

    fn recv_decoded<R>(
        &self,
        timeout: Duration,
        decode: fn(&[u8]) -> Result<R, ControlError>,
    ) -> Result<Option<R>, ControlError> {
        let got = self.inner.recv_timeout_with(timeout, |flags| {
            self.recv_bytes(flags).and_then(|b| decode(&b))
        });
        if let Err(e) = &got {
            if e.is_malformed() {
                self.inner.warn_malformed(e);
            }
        }
        got
    }

    /// Receives a request, waiting at most `timeout`.
    pub fn recv_request(
        &self,
        timeout: Duration,
    ) -> Result<Option<(u64, AdminRequest)>, ControlError> {
        self.recv_decoded(timeout, AdminRequest::decode)
    }

    /// Receives a reply, waiting at most `timeout`.
    pub fn recv_reply(&self, timeout: Duration) -> Result<Option<(u64, AdminReply)>, ControlError> {
        self.recv_decoded(timeout, AdminReply::decode)
    }

    /// Sends `request` and waits at most `timeout` for its reply (replies to other ids, left
    /// over from a request that timed out earlier, are skipped).
    pub fn call(
        &self,
        request: &AdminRequest,
        timeout: Duration,
    ) -> Result<Option<AdminReply>, ControlError> {
        let id = self.send_request(request)?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.recv_reply(left)? {
                Some((got, reply)) if got == id => return Ok(Some(reply)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }
}

impl AsFd for AdminChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            AdminRequest::ListServices,
            AdminRequest::NodeStatus,
            AdminRequest::ServiceReport("cluster".into()),
            AdminRequest::RestartService("relay".into()),
            AdminRequest::CrashService {
                name: "mgmt".into(),
                mode: CrashMode::Hang,
            },
        ] {
            let bytes = r.encode(7);
            assert_eq!(AdminRequest::decode(&bytes).ok(), Some((7, r)));
        }
    }

    #[test]
    fn replies_round_trip() {
        let info = ServiceInfo {
            name: "mgmt".into(),
            datapath: false,
            state: ServiceState::Running,
            pid: 42,
            generation: 3,
            restarts: 2,
            uptime_ms: 1000,
            hangs: 1,
            last_exit: "signal 9 (SIGKILL)".into(),
            last_restart_ms: 12,
        };
        for r in [
            AdminReply::Services(vec![info.clone(), info]),
            AdminReply::Done("ok".into()),
            AdminReply::Error {
                code: AdminErrorCode::UnknownService,
                message: "no service x".into(),
            },
            AdminReply::Report {
                generation: 7,
                text: r#"{"peer":{}}"#.into(),
            },
            AdminReply::Report {
                generation: 0,
                text: String::new(),
            },
            AdminReply::Status(NodeStatus {
                node: "a".into(),
                supervisor_pid: 1,
                uptime_ms: 2,
                failed: false,
                services_running: 3,
                services_total: 4,
                sandbox: true,
            }),
        ] {
            let bytes = r.encode(9);
            assert_eq!(AdminReply::decode(&bytes).ok(), Some((9, r)));
        }
    }

    #[test]
    fn garbage_and_bounds_are_errors() {
        assert!(AdminRequest::decode(b"not capnp at all").is_err());
        assert!(AdminRequest::decode(&[]).is_err());
        let long = AdminRequest::RestartService("x".repeat(MAX_NAME_BYTES + 1)).encode(1);
        assert!(matches!(
            AdminRequest::decode(&long),
            Err(ControlError::TextTooLong { .. })
        ));
        let empty = AdminRequest::RestartService(String::new()).encode(1);
        assert!(AdminRequest::decode(&empty).is_err());
        // A truncated datagram is an error, not a shorter message.
        let bytes = AdminReply::Done("x".into()).encode(1);
        let mut truncated = bytes.clone();
        truncated.truncate(bytes.len() - 8);
        assert!(AdminReply::decode(&truncated).is_err());
    }

    #[test]
    fn call_over_a_pair() {
        let (sup, mgmt) = AdminChannel::pair().expect("pair");
        let server = std::thread::spawn(move || {
            let (id, req) = sup
                .recv_request(Duration::from_secs(5))
                .expect("recv")
                .expect("a request");
            assert_eq!(req, AdminRequest::NodeStatus);
            sup.send_reply(id, &AdminReply::Done("fine".into()))
                .expect("reply");
        });
        let reply = mgmt
            .call(&AdminRequest::NodeStatus, Duration::from_secs(5))
            .expect("call");
        assert_eq!(reply, Some(AdminReply::Done("fine".into())));
        server.join().expect("server");
    }
}
