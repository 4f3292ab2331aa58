//! Control channels: Cap'n Proto messages over Unix `SOCK_SEQPACKET` sockets, with file
//! descriptors passed as `SCM_RIGHTS`.
//!
//! This module carries the service lifecycle channel (`schemas/lifecycle.capnp`) between the
//! supervisor and each service. It has three layers:
//!
//! * [`Envelope`] and [`Body`]: an owned Rust mirror of the schema, with [`Envelope::encode`],
//!   [`Envelope::decode`] and the bounds every receiver enforces ([`Envelope::validate`]). Decoding
//!   never panics, whatever the bytes: every malformation is a [`ControlError`].
//! * [`ControlChannel`]: one end of a connected `SOCK_SEQPACKET` socket. One datagram is one
//!   message of at most [`MAX_MESSAGE_BYTES`] with at most [`MAX_FDS`] descriptors. Received
//!   descriptors come back as [`OwnedFd`]s, so a message that is rejected closes whatever
//!   descriptors came with it.
//! * [`RequestIds`] and [`RateLimiter`]: request-id allocation and the log limiter that keeps a
//!   misbehaving peer from flooding the log.
//!
//! A receive error that says the peer sent something malformed ([`ControlError::is_malformed`])
//! leaves the channel usable: the datagram is consumed whole, and the next one is read normally.
//! What to do about such a peer (usually: drop it and restart the service) is the caller's
//! decision; the channel only logs, at most [`WARNINGS_PER_SECOND`] times a second.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use duplex_schemas::lifecycle_capnp as wire;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, socketpair, sockopt, AddressFamily, ControlMessage, MsgFlags,
    SockFlag, SockType,
};

/// Largest encoded message, in bytes, that a channel sends or accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Most file descriptors that may travel with one message.
pub const MAX_FDS: usize = 64;
/// Longest service or resource name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest free-text field (shutdown reason, error message), in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Longest status report a service sends (JSON): the cluster service's carries its drives'
/// reservation keys and its recent events.
pub const MAX_REPORT_BYTES: usize = 32 * 1024;
/// Most resources one `Start` may hand over: each names its own descriptor, so no more than the
/// descriptors one message can carry.
pub const MAX_RESOURCES: usize = MAX_FDS;
/// Version of the lifecycle protocol this code speaks, sent in [`Body::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;
/// Most warnings one channel logs per second about malformed messages from its peer.
pub const WARNINGS_PER_SECOND: u32 = 5;

/// Most descriptors the kernel delivers with one message (Linux `SCM_MAX_FD`). The receive
/// buffer has room for this many, although at most [`MAX_FDS`] are accepted, so that every
/// descriptor a peer manages to pass is received, owned, and closed on rejection: a truncated
/// control buffer would leave descriptors installed that nobody could close.
const SCM_MAX_FD: usize = 253;
/// Bytes of a `struct cmsghdr` on this platform: `size_t cmsg_len; int cmsg_level; int
/// cmsg_type;`.
const CMSG_HDR_BYTES: usize = std::mem::size_of::<libc::cmsghdr>();
const _: () = assert!(CMSG_HDR_BYTES == std::mem::size_of::<usize>() + 8);
/// Receive buffer for ancillary data: one `SCM_RIGHTS` header and [`SCM_MAX_FD`] descriptors,
/// with slack for alignment.
const CMSG_BUFFER_BYTES: usize =
    cmsg_align(CMSG_HDR_BYTES) + cmsg_align(SCM_MAX_FD * std::mem::size_of::<RawFd>()) + 64;

/// Words one decode may traverse: every word of the largest acceptable message, twice.
const TRAVERSAL_LIMIT_WORDS: usize = MAX_MESSAGE_BYTES / 8 * 2;
/// Pointer nesting one decode follows. The schema's deepest path (envelope → start → resource
/// list → resource → name) is five levels.
const NESTING_LIMIT: i32 = 8;

/// `CMSG_ALIGN` of Linux: rounds up to the alignment of `size_t`.
const fn cmsg_align(len: usize) -> usize {
    let align = std::mem::size_of::<usize>();
    (len + align - 1) & !(align - 1)
}

/// What can go wrong on a control channel.
///
/// Variants marked "peer" below are what [`ControlChannel::recv`] returns when the peer sent a
/// malformed message ([`ControlError::is_malformed`]); the same bounds checks also refuse to send
/// such a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// A system call on the control socket failed.
    #[error("Control socket {op} failed")]
    Io {
        /// The failing operation (`sendmsg`, `recvmsg`, `poll`, ...).
        op: &'static str,
        /// The error the kernel returned.
        #[source]
        source: Errno,
    },
    /// The descriptor given to [`ControlChannel::from_fd`] is not a `SOCK_SEQPACKET` socket.
    #[error("Descriptor is not a SOCK_SEQPACKET socket")]
    NotSeqPacket,
    /// The peer closed its end of the channel (or sent an empty datagram, which looks the same).
    #[error("Peer closed the control channel")]
    PeerClosed,
    /// Peer: a received datagram was larger than [`MAX_MESSAGE_BYTES`]; it was discarded whole.
    #[error("Received message truncated: it exceeds {max} bytes")]
    Truncated {
        /// The receive limit, [`MAX_MESSAGE_BYTES`].
        max: usize,
    },
    /// A message to send encodes to more than [`MAX_MESSAGE_BYTES`].
    #[error("Message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Encoded length of the message.
        len: usize,
        /// The limit, [`MAX_MESSAGE_BYTES`].
        max: usize,
    },
    /// The kernel sent only part of a datagram (it never should for `SOCK_SEQPACKET`).
    #[error("Sent {sent} of {len} bytes of a control message")]
    ShortSend {
        /// Bytes the kernel accepted.
        sent: usize,
        /// Bytes of the message.
        len: usize,
    },
    /// Peer (or sender): more than [`MAX_FDS`] descriptors with one message. Received ones have
    /// been closed.
    #[error("{count} descriptors passed with one message, over the limit of {max}")]
    TooManyFds {
        /// Descriptors passed (received: at least this many).
        count: usize,
        /// The limit, [`MAX_FDS`].
        max: usize,
    },
    /// Peer: the ancillary data did not fit the receive buffer, or the kernel could not install
    /// every passed descriptor; the descriptors that did arrive have been closed.
    #[error("Ancillary data of a received message was truncated")]
    ControlTruncated,
    /// Peer: ancillary data other than `SCM_RIGHTS` arrived with a message.
    #[error("Unexpected ancillary data (level {level}, type {kind}) with a control message")]
    UnexpectedControlMessage {
        /// `cmsg_level` of the unexpected control message.
        level: i32,
        /// `cmsg_type` of the unexpected control message.
        kind: i32,
    },
    /// Peer: the bytes are not a well-formed Cap'n Proto message of the expected schema.
    #[error("Malformed control message")]
    Decode(#[source] capnp::Error),
    /// Peer: bytes followed the Cap'n Proto message in the datagram.
    #[error("{0} trailing bytes after the control message")]
    TrailingBytes(usize),
    /// Peer: a union discriminant or enumerant this code does not know (a newer or broken peer).
    #[error("Unknown {what} value {value}")]
    UnknownVariant {
        /// Which union or enum, e.g. `Envelope.body`.
        what: &'static str,
        /// The raw discriminant received.
        value: u16,
    },
    /// Peer: a required field was absent or empty.
    #[error("Missing required field {0}")]
    MissingField(&'static str),
    /// Peer: a text field was longer than its bound.
    #[error("Field {field} is {len} bytes long, over the limit of {max}")]
    TextTooLong {
        /// Which field, e.g. `hello.service`.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// Its limit in bytes.
        max: usize,
    },
    /// Peer: a text field was not valid UTF-8.
    #[error("Field {0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// Peer: a list had more entries than its bound.
    #[error("List {field} has {len} entries, over the limit of {max}")]
    TooManyEntries {
        /// Which list, e.g. `start.resources`.
        field: &'static str,
        /// Its length.
        len: usize,
        /// Its limit.
        max: usize,
    },
    /// Peer: a resource names a descriptor beyond those passed with the message.
    #[error("Resource {name:?} names descriptor {index}, but {received} were passed")]
    FdIndexOutOfRange {
        /// The resource's name.
        name: String,
        /// Its `fdIndex`.
        index: u32,
        /// Descriptors passed with the message.
        received: usize,
    },
    /// Peer: two resources name the same descriptor.
    #[error("Descriptor {0} is named by more than one resource")]
    DuplicateFdIndex(u32),
    /// Peer: the number of descriptors passed differs from the number the message names.
    #[error("{received} descriptors were passed, but the message names {named}")]
    FdCountMismatch {
        /// Descriptors passed with the message.
        received: usize,
        /// Descriptors the message's resources name.
        named: usize,
    },
}

impl ControlError {
    /// Whether this error says a message or its ancillary data was malformed or out of bounds.
    ///
    /// Returned by [`ControlChannel::recv`], it means the peer misbehaved: the offending datagram
    /// was consumed whole and the channel can still be read. Returned by
    /// [`ControlChannel::send`], it means the caller tried to send such a message (nothing was
    /// sent).
    pub fn is_malformed(&self) -> bool {
        match self {
            Self::Io { .. }
            | Self::NotSeqPacket
            | Self::PeerClosed
            | Self::TooLarge { .. }
            | Self::ShortSend { .. } => false,
            Self::Truncated { .. }
            | Self::TooManyFds { .. }
            | Self::ControlTruncated
            | Self::UnexpectedControlMessage { .. }
            | Self::Decode(_)
            | Self::TrailingBytes(_)
            | Self::UnknownVariant { .. }
            | Self::MissingField(_)
            | Self::TextTooLong { .. }
            | Self::InvalidUtf8(_)
            | Self::TooManyEntries { .. }
            | Self::FdIndexOutOfRange { .. }
            | Self::DuplicateFdIndex(_)
            | Self::FdCountMismatch { .. } => true,
        }
    }
}

/// One lifecycle control message: routing data common to all messages and exactly one body.
///
/// Mirrors `Envelope` of `schemas/lifecycle.capnp`; see there for the meaning of every field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Sender-chosen id of this message, unique per sender and channel ([`RequestIds`]).
    pub request_id: u64,
    /// The sender's generation (0 before a service has been started).
    pub epoch: u64,
    /// What the message says.
    pub body: Body,
}

/// The body of an [`Envelope`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Service → supervisor: first message, identifies the service.
    Hello {
        /// The service's name, 1..=[`MAX_NAME_BYTES`] bytes.
        service: String,
        /// The service's process id.
        pid: u32,
        /// Lifecycle protocol version the service speaks ([`PROTOCOL_VERSION`]).
        protocol_version: u32,
    },
    /// Supervisor → service: begin serving, with these handed-over resources.
    Start {
        /// The service's generation; it uses it as its epoch from now on.
        generation: u64,
        /// Which init path to take.
        mode: StartMode,
        /// One entry per descriptor passed with the message, at most [`MAX_RESOURCES`].
        resources: Vec<Resource>,
    },
    /// Service → supervisor: initialisation done, the service serves.
    Ready {
        /// The generation from the `Start` this answers.
        generation: u64,
    },
    /// Service → supervisor: still alive.
    Heartbeat {
        /// Monotonic per-generation counter starting at 1.
        counter: u64,
    },
    /// Supervisor → service: stop and exit before the deadline.
    Shutdown {
        /// Why, for logs; at most [`MAX_TEXT_BYTES`] bytes.
        reason: String,
        /// Milliseconds the service has to exit, from receipt.
        deadline_ms: u32,
    },
    /// Either direction: the named request succeeded.
    Ack {
        /// The acknowledged message's `request_id`.
        request_id: u64,
    },
    /// Either direction: the named request (or the channel, if 0) failed.
    Error {
        /// The failed message's `request_id`, or 0.
        request_id: u64,
        /// Class of the failure.
        code: ErrorCode,
        /// Detail for logs; at most [`MAX_TEXT_BYTES`] bytes.
        message: String,
    },
    /// Supervisor → service: crash injection; fail now in this way (no answer).
    Inject {
        /// How to fail.
        fault: Fault,
    },
    /// Service → supervisor: its status report (JSON, at most [`MAX_REPORT_BYTES`] bytes),
    /// replacing the last one (no answer).
    Report {
        /// The report.
        text: String,
    },
    /// Service → supervisor: an event for the node's journal (no answer).
    Event {
        /// How much it matters.
        level: EventLevel,
        /// Machine-readable kind, 1..=[`MAX_EVENT_KIND_BYTES`] bytes of `[a-z0-9-]`.
        kind: String,
        /// One line, at most [`MAX_EVENT_MESSAGE_BYTES`] bytes.
        message: String,
    },
}

/// Longest event kind.
pub const MAX_EVENT_KIND_BYTES: usize = 64;
/// Longest event message.
pub const MAX_EVENT_MESSAGE_BYTES: usize = 1024;

/// How much an event matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventLevel {
    /// Routine.
    Info,
    /// Something degraded or refused.
    Warning,
    /// Something failed.
    Error,
}

impl EventLevel {
    /// Its name (`info`, `warning`, `error`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Error => "error",
        }
    }
}

/// How an injected failure shows ([`Body::Inject`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Panic (services abort on panic: the process dies with `SIGABRT`).
    Panic,
    /// Stop the heartbeat and block forever, as a deadlocked service would.
    Hang,
    /// Attempt a system call the seccomp policy forbids (the sandbox kills with `SIGSYS`).
    ForbiddenSyscall,
}

impl From<Fault> for wire::Fault {
    fn from(fault: Fault) -> Self {
        match fault {
            Fault::Panic => Self::Panic,
            Fault::Hang => Self::Hang,
            Fault::ForbiddenSyscall => Self::ForbiddenSyscall,
        }
    }
}

impl From<wire::Fault> for Fault {
    fn from(fault: wire::Fault) -> Self {
        match fault {
            wire::Fault::Panic => Self::Panic,
            wire::Fault::Hang => Self::Hang,
            wire::Fault::ForbiddenSyscall => Self::ForbiddenSyscall,
        }
    }
}

impl Body {
    /// The schema name of this body's union member, for logs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Start { .. } => "start",
            Self::Ready { .. } => "ready",
            Self::Heartbeat { .. } => "heartbeat",
            Self::Shutdown { .. } => "shutdown",
            Self::Ack { .. } => "ack",
            Self::Error { .. } => "error",
            Self::Inject { .. } => "inject",
            Self::Report { .. } => "report",
            Self::Event { .. } => "event",
        }
    }
}

/// How a service initialises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StartMode {
    /// No predecessor: create state from scratch.
    Fresh,
    /// A predecessor died: re-attach to handed-over shared state and reclaim what it held.
    Restart,
}

/// One handed-over descriptor and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// Stable name, 1..=[`MAX_NAME_BYTES`] bytes.
    pub name: String,
    /// What the descriptor refers to.
    pub kind: ResourceKind,
    /// Index into the descriptors passed with the message.
    pub fd_index: u32,
}

/// What a handed-over descriptor refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// A sealed memfd holding a shared memory region.
    Region,
    /// A sealed memfd holding an SPSC descriptor ring.
    RingRegion,
    /// A sealed memfd holding the shared buffer pool.
    Pool,
    /// An eventfd used as a doorbell.
    Eventfd,
    /// A socket.
    Socket,
    /// An opened file or device node.
    File,
}

/// Classes of lifecycle failures carried by [`Body::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The receiver failed for a reason of its own.
    Internal,
    /// The message could not be decoded or violated a bound.
    Malformed,
    /// The `Hello` protocol version is not supported.
    UnsupportedVersion,
    /// The message is not allowed in the receiver's current state.
    Unexpected,
    /// A handed-over resource could not be used.
    BadResource,
    /// The message carried the epoch of an earlier generation of its sender.
    StaleEpoch,
}

impl From<StartMode> for wire::StartMode {
    fn from(mode: StartMode) -> Self {
        match mode {
            StartMode::Fresh => Self::Fresh,
            StartMode::Restart => Self::Restart,
        }
    }
}

impl From<wire::StartMode> for StartMode {
    fn from(mode: wire::StartMode) -> Self {
        match mode {
            wire::StartMode::Fresh => Self::Fresh,
            wire::StartMode::Restart => Self::Restart,
        }
    }
}

impl From<ResourceKind> for wire::ResourceKind {
    fn from(kind: ResourceKind) -> Self {
        match kind {
            ResourceKind::Region => Self::Region,
            ResourceKind::RingRegion => Self::RingRegion,
            ResourceKind::Pool => Self::Pool,
            ResourceKind::Eventfd => Self::Eventfd,
            ResourceKind::Socket => Self::Socket,
            ResourceKind::File => Self::File,
        }
    }
}

impl From<wire::ResourceKind> for ResourceKind {
    fn from(kind: wire::ResourceKind) -> Self {
        match kind {
            wire::ResourceKind::Region => Self::Region,
            wire::ResourceKind::RingRegion => Self::RingRegion,
            wire::ResourceKind::Pool => Self::Pool,
            wire::ResourceKind::Eventfd => Self::Eventfd,
            wire::ResourceKind::Socket => Self::Socket,
            wire::ResourceKind::File => Self::File,
        }
    }
}

impl From<ErrorCode> for wire::ErrorCode {
    fn from(code: ErrorCode) -> Self {
        match code {
            ErrorCode::Internal => Self::Internal,
            ErrorCode::Malformed => Self::Malformed,
            ErrorCode::UnsupportedVersion => Self::UnsupportedVersion,
            ErrorCode::Unexpected => Self::Unexpected,
            ErrorCode::BadResource => Self::BadResource,
            ErrorCode::StaleEpoch => Self::StaleEpoch,
        }
    }
}

impl From<wire::ErrorCode> for ErrorCode {
    fn from(code: wire::ErrorCode) -> Self {
        match code {
            wire::ErrorCode::Internal => Self::Internal,
            wire::ErrorCode::Malformed => Self::Malformed,
            wire::ErrorCode::UnsupportedVersion => Self::UnsupportedVersion,
            wire::ErrorCode::Unexpected => Self::Unexpected,
            wire::ErrorCode::BadResource => Self::BadResource,
            wire::ErrorCode::StaleEpoch => Self::StaleEpoch,
        }
    }
}

/// Reader options for untrusted control messages: bounded traversal and nesting.
pub(crate) fn reader_options() -> capnp::message::ReaderOptions {
    let mut options = capnp::message::ReaderOptions::new();
    options
        .traversal_limit_in_words(Some(TRAVERSAL_LIMIT_WORDS))
        .nesting_limit(NESTING_LIMIT);
    options
}

/// Reads a text field, enforcing its bound before validating UTF-8.
pub(crate) fn read_text(
    text: capnp::Result<capnp::text::Reader<'_>>,
    field: &'static str,
    max: usize,
) -> Result<String, ControlError> {
    let bytes = text.map_err(ControlError::Decode)?.as_bytes();
    if bytes.len() > max {
        return Err(ControlError::TextTooLong {
            field,
            len: bytes.len(),
            max,
        });
    }
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| ControlError::InvalidUtf8(field))
}

/// Checks a text field's bound; `required` fields must also be non-empty.
pub(crate) fn check_text(
    text: &str,
    field: &'static str,
    max: usize,
    required: bool,
) -> Result<(), ControlError> {
    if required && text.is_empty() {
        return Err(ControlError::MissingField(field));
    }
    if text.len() > max {
        return Err(ControlError::TextTooLong {
            field,
            len: text.len(),
            max,
        });
    }
    Ok(())
}

pub(crate) fn unknown(what: &'static str) -> impl FnOnce(capnp::NotInSchema) -> ControlError {
    move |capnp::NotInSchema(value)| ControlError::UnknownVariant { what, value }
}

impl Envelope {
    /// Encodes the message in the standard unpacked Cap'n Proto stream framing.
    ///
    /// Does not check bounds: [`ControlChannel::send`] calls [`Envelope::validate`] first.
    /// (Encoding an out-of-bounds message is useful to test receivers.)
    pub fn encode(&self) -> Vec<u8> {
        let mut message = capnp::message::Builder::new_default();
        let mut root = message.init_root::<wire::envelope::Builder<'_>>();
        root.set_request_id(self.request_id);
        root.set_epoch(self.epoch);
        let mut body = root.init_body();
        match &self.body {
            Body::Hello {
                service,
                pid,
                protocol_version,
            } => {
                let mut hello = body.init_hello();
                hello.set_service(service.as_str());
                hello.set_pid(*pid);
                hello.set_protocol_version(*protocol_version);
            }
            Body::Start {
                generation,
                mode,
                resources,
            } => {
                let mut start = body.init_start();
                start.set_generation(*generation);
                start.set_mode((*mode).into());
                let len = u32::try_from(resources.len()).unwrap_or(u32::MAX);
                let mut list = start.init_resources(len);
                for (i, resource) in (0..len).zip(resources) {
                    let mut entry = list.reborrow().get(i);
                    entry.set_name(resource.name.as_str());
                    entry.set_kind(resource.kind.into());
                    entry.set_fd_index(resource.fd_index);
                }
            }
            Body::Ready { generation } => body.init_ready().set_generation(*generation),
            Body::Heartbeat { counter } => body.init_heartbeat().set_counter(*counter),
            Body::Shutdown {
                reason,
                deadline_ms,
            } => {
                let mut shutdown = body.init_shutdown();
                shutdown.set_reason(reason.as_str());
                shutdown.set_deadline_ms(*deadline_ms);
            }
            Body::Ack { request_id } => body.init_ack().set_request_id(*request_id),
            Body::Error {
                request_id,
                code,
                message: text,
            } => {
                let mut error = body.init_error();
                error.set_request_id(*request_id);
                error.set_code((*code).into());
                error.set_message(text.as_str());
            }
            Body::Inject { fault } => body.init_inject().set_fault((*fault).into()),
            Body::Report { text } => body.set_report(text.as_str()),
            Body::Event {
                level,
                kind,
                message,
            } => {
                let mut e = body.init_event();
                e.set_level(match level {
                    EventLevel::Info => wire::EventLevel::Info,
                    EventLevel::Warning => wire::EventLevel::Warning,
                    EventLevel::Error => wire::EventLevel::Error,
                });
                e.set_kind(kind.as_str());
                e.set_message(message.as_str());
            }
        }
        capnp::serialize::write_message_to_words(&message)
    }

    /// Decodes one message from exactly `bytes` and checks it against every bound
    /// ([`Envelope::validate`]).
    ///
    /// Never panics: arbitrary input yields either a valid envelope or an error. Descriptor
    /// indices are checked against the descriptors actually received by
    /// [`ControlChannel::recv`] ([`Envelope::check_fds`]), not here.
    pub fn decode(bytes: &[u8]) -> Result<Self, ControlError> {
        let mut rest = bytes;
        let message = capnp::serialize::read_message(&mut rest, reader_options())
            .map_err(ControlError::Decode)?;
        if !rest.is_empty() {
            return Err(ControlError::TrailingBytes(rest.len()));
        }
        let root: wire::envelope::Reader<'_> = message.get_root().map_err(ControlError::Decode)?;
        let body = decode_body(root.get_body())?;
        let envelope = Self {
            request_id: root.get_request_id(),
            epoch: root.get_epoch(),
            body,
        };
        envelope.validate()?;
        Ok(envelope)
    }

    /// Checks every bound of the schema: text lengths, required fields, list lengths, distinct
    /// descriptor indices. [`Envelope::decode`] accepts exactly the encodings of envelopes that
    /// pass this check.
    pub fn validate(&self) -> Result<(), ControlError> {
        match &self.body {
            Body::Hello { service, .. } => {
                check_text(service, "hello.service", MAX_NAME_BYTES, true)
            }
            Body::Start { resources, .. } => {
                if resources.len() > MAX_RESOURCES {
                    return Err(ControlError::TooManyEntries {
                        field: "start.resources",
                        len: resources.len(),
                        max: MAX_RESOURCES,
                    });
                }
                // Lengths of all names first: the order in which decode meets the problems, so
                // that both report the same one.
                for resource in resources {
                    check_text(
                        &resource.name,
                        "start.resources.name",
                        MAX_NAME_BYTES,
                        false,
                    )?;
                }
                for (i, resource) in resources.iter().enumerate() {
                    check_text(&resource.name, "start.resources.name", MAX_NAME_BYTES, true)?;
                    if resources
                        .iter()
                        .take(i)
                        .any(|r| r.fd_index == resource.fd_index)
                    {
                        return Err(ControlError::DuplicateFdIndex(resource.fd_index));
                    }
                }
                Ok(())
            }
            Body::Shutdown { reason, .. } => {
                check_text(reason, "shutdown.reason", MAX_TEXT_BYTES, false)
            }
            Body::Error { message, .. } => {
                check_text(message, "error.message", MAX_TEXT_BYTES, false)
            }
            Body::Report { text } => check_text(text, "report", MAX_REPORT_BYTES, false),
            Body::Event { kind, message, .. } => {
                check_text(kind, "event.kind", MAX_EVENT_KIND_BYTES, true)?;
                if !kind
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                {
                    return Err(ControlError::InvalidUtf8("event.kind"));
                }
                check_text(message, "event.message", MAX_EVENT_MESSAGE_BYTES, false)
            }
            Body::Ready { .. }
            | Body::Heartbeat { .. }
            | Body::Ack { .. }
            | Body::Inject { .. } => Ok(()),
        }
    }

    /// Checks the message against the `received` descriptors that came with it: every resource
    /// names one of them, and every one of them is named (so none is passed by mistake).
    /// Messages other than `Start` name none.
    ///
    /// Assumes [`Envelope::validate`] passed (indices distinct).
    pub fn check_fds(&self, received: usize) -> Result<(), ControlError> {
        let named = match &self.body {
            Body::Start { resources, .. } => {
                for resource in resources {
                    if !usize::try_from(resource.fd_index).is_ok_and(|index| index < received) {
                        return Err(ControlError::FdIndexOutOfRange {
                            name: resource.name.clone(),
                            index: resource.fd_index,
                            received,
                        });
                    }
                }
                resources.len()
            }
            _ => 0,
        };
        if named != received {
            return Err(ControlError::FdCountMismatch { received, named });
        }
        Ok(())
    }
}

/// Decodes the body union, checking what can only be checked on the wire (discriminants,
/// enumerants, UTF-8, list length before iterating).
fn decode_body(body: wire::envelope::body::Reader<'_>) -> Result<Body, ControlError> {
    use wire::envelope::body::Which;

    let which = body.which().map_err(unknown("Envelope.body"))?;
    Ok(match which {
        Which::Hello(hello) => {
            let hello = hello.map_err(ControlError::Decode)?;
            Body::Hello {
                service: read_text(hello.get_service(), "hello.service", MAX_NAME_BYTES)?,
                pid: hello.get_pid(),
                protocol_version: hello.get_protocol_version(),
            }
        }
        Which::Start(start) => {
            let start = start.map_err(ControlError::Decode)?;
            let list = start.get_resources().map_err(ControlError::Decode)?;
            let len = usize::try_from(list.len()).unwrap_or(usize::MAX);
            if len > MAX_RESOURCES {
                return Err(ControlError::TooManyEntries {
                    field: "start.resources",
                    len,
                    max: MAX_RESOURCES,
                });
            }
            let mut resources = Vec::with_capacity(len);
            for entry in list.iter() {
                resources.push(Resource {
                    name: read_text(entry.get_name(), "start.resources.name", MAX_NAME_BYTES)?,
                    kind: entry.get_kind().map_err(unknown("ResourceKind"))?.into(),
                    fd_index: entry.get_fd_index(),
                });
            }
            Body::Start {
                generation: start.get_generation(),
                mode: start.get_mode().map_err(unknown("StartMode"))?.into(),
                resources,
            }
        }
        Which::Ready(ready) => Body::Ready {
            generation: ready.map_err(ControlError::Decode)?.get_generation(),
        },
        Which::Heartbeat(heartbeat) => Body::Heartbeat {
            counter: heartbeat.map_err(ControlError::Decode)?.get_counter(),
        },
        Which::Shutdown(shutdown) => {
            let shutdown = shutdown.map_err(ControlError::Decode)?;
            Body::Shutdown {
                reason: read_text(shutdown.get_reason(), "shutdown.reason", MAX_TEXT_BYTES)?,
                deadline_ms: shutdown.get_deadline_ms(),
            }
        }
        Which::Ack(ack) => Body::Ack {
            request_id: ack.map_err(ControlError::Decode)?.get_request_id(),
        },
        Which::Error(error) => {
            let error = error.map_err(ControlError::Decode)?;
            Body::Error {
                request_id: error.get_request_id(),
                code: error.get_code().map_err(unknown("ErrorCode"))?.into(),
                message: read_text(error.get_message(), "error.message", MAX_TEXT_BYTES)?,
            }
        }
        Which::Inject(inject) => Body::Inject {
            fault: inject
                .map_err(ControlError::Decode)?
                .get_fault()
                .map_err(unknown("Fault"))?
                .into(),
        },
        Which::Report(text) => Body::Report {
            text: read_text(text, "report", MAX_REPORT_BYTES)?,
        },
        Which::Event(e) => {
            let e = e.map_err(ControlError::Decode)?;
            Body::Event {
                level: match e.get_level().map_err(unknown("Event.level"))? {
                    wire::EventLevel::Info => EventLevel::Info,
                    wire::EventLevel::Warning => EventLevel::Warning,
                    wire::EventLevel::Error => EventLevel::Error,
                },
                kind: read_text(e.get_kind(), "event.kind", MAX_EVENT_KIND_BYTES)?,
                message: read_text(e.get_message(), "event.message", MAX_EVENT_MESSAGE_BYTES)?,
            }
        }
    })
}

/// Allocates request ids: 1, 2, 3, ... (never 0), safe to share between threads.
#[derive(Debug)]
pub struct RequestIds(AtomicU64);

impl RequestIds {
    /// A counter whose first id is 1.
    pub const fn new() -> Self {
        Self(AtomicU64::new(1))
    }

    /// The next unused id.
    pub fn next_id(&self) -> u64 {
        loop {
            let id = self.0.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

/// Allows at most `burst` events per `window` and counts the rest, to keep a misbehaving peer
/// from flooding the log.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimiter {
    /// A limiter allowing `burst` events in every `window`.
    pub const fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Records an event at `now`. Returns `Some(suppressed)` if the event may be logged, with the
    /// number of events suppressed since the last one allowed; `None` if it must be dropped.
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }
}

/// One end of a lifecycle control channel: a connected Unix `SOCK_SEQPACKET` socket.
///
/// All methods take `&self`: one thread may receive while another sends. Sends and receives
/// block unless the socket was made non-blocking by whoever created it; [`recv_timeout`] bounds
/// a wait.
///
/// [`recv_timeout`]: ControlChannel::recv_timeout
#[derive(Debug)]
pub struct ControlChannel {
    fd: OwnedFd,
    request_ids: RequestIds,
    warnings: Mutex<RateLimiter>,
}

/// A received message and the descriptors that came with it, in `SCM_RIGHTS` order (the order
/// `fd_index` refers to).
pub type Received = (Envelope, Vec<OwnedFd>);

impl ControlChannel {
    /// A connected pair of channels (`socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)`): the
    /// supervisor keeps one end and hands the other to the service it spawns.
    pub fn pair() -> Result<(Self, Self), ControlError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|source| ControlError::Io {
            op: "socketpair",
            source,
        })?;
        Ok((Self::wrap(a), Self::wrap(b)))
    }

    /// Wraps a connected `SOCK_SEQPACKET` socket, e.g. one inherited from the supervisor.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, ControlError> {
        let kind = getsockopt(&fd, sockopt::SockType).map_err(|source| ControlError::Io {
            op: "getsockopt(SO_TYPE)",
            source,
        })?;
        if kind != SockType::SeqPacket {
            return Err(ControlError::NotSeqPacket);
        }
        Ok(Self::wrap(fd))
    }

    fn wrap(fd: OwnedFd) -> Self {
        Self {
            fd,
            request_ids: RequestIds::new(),
            warnings: Mutex::new(RateLimiter::new(
                WARNINGS_PER_SECOND,
                Duration::from_secs(1),
            )),
        }
    }

    /// Gives up the socket, e.g. to pass it to a child process.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// The next request id for a message sent on this channel (1, 2, 3, ...).
    pub fn next_request_id(&self) -> u64 {
        self.request_ids.next_id()
    }

    /// Sends one message with `fds` attached as `SCM_RIGHTS` (the kernel duplicates them into
    /// the receiver; the caller keeps its own).
    ///
    /// Refuses, without sending anything, a message the peer would reject: one that fails
    /// [`Envelope::validate`] or [`Envelope::check_fds`], encodes to more than
    /// [`MAX_MESSAGE_BYTES`], or carries more than [`MAX_FDS`] descriptors. A closed peer is
    /// [`ControlError::PeerClosed`] (no `SIGPIPE` is raised).
    pub fn send(&self, envelope: &Envelope, fds: &[BorrowedFd<'_>]) -> Result<(), ControlError> {
        if fds.len() > MAX_FDS {
            return Err(ControlError::TooManyFds {
                count: fds.len(),
                max: MAX_FDS,
            });
        }
        envelope.validate()?;
        envelope.check_fds(fds.len())?;
        let bytes = envelope.encode();
        self.send_datagram(&bytes, fds)
    }

    /// Sends raw bytes as one datagram (tests of a receiver's validation only).
    #[doc(hidden)]
    pub fn send_raw_for_tests(&self, bytes: &[u8]) -> Result<(), ControlError> {
        self.send_datagram(bytes, &[])
    }

    /// Sends one already encoded datagram with `fds` attached (limits checked here).
    pub(crate) fn send_datagram(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ControlError> {
        if fds.len() > MAX_FDS {
            return Err(ControlError::TooManyFds {
                count: fds.len(),
                max: MAX_FDS,
            });
        }
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(ControlError::TooLarge {
                len: bytes.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(bytes)];
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(sent) if sent == bytes.len() => return Ok(()),
                Ok(sent) => {
                    return Err(ControlError::ShortSend {
                        sent,
                        len: bytes.len(),
                    })
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN) => {
                    return Err(ControlError::PeerClosed)
                }
                Err(source) => {
                    return Err(ControlError::Io {
                        op: "sendmsg",
                        source,
                    })
                }
            }
        }
    }

    /// Receives one message, blocking until one arrives.
    ///
    /// Returns the decoded, validated envelope and the descriptors that came with it (checked
    /// with [`Envelope::check_fds`]). On any error the datagram has been consumed and every
    /// descriptor that came with it closed; if [`ControlError::is_malformed`], the channel can
    /// be read again (a warning is logged, rate-limited). Peer EOF is
    /// [`ControlError::PeerClosed`].
    pub fn recv(&self) -> Result<Received, ControlError> {
        self.recv_with(MsgFlags::empty())
    }

    /// Like [`ControlChannel::recv`], but waits at most `timeout` for a message to arrive:
    /// `Ok(None)` if none did.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Received>, ControlError> {
        self.recv_timeout_with(timeout, |flags| self.recv_with(flags))
    }

    /// Waits at most `timeout` for the socket to be readable, then calls `recv` with
    /// `MSG_DONTWAIT`.
    pub(crate) fn recv_timeout_with<R>(
        &self,
        timeout: Duration,
        recv: impl Fn(MsgFlags) -> Result<R, ControlError>,
    ) -> Result<Option<R>, ControlError> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let remaining = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            // Round up, so that a sub-millisecond remainder does not turn into a busy loop.
            let millis = remaining.as_nanos().div_ceil(1_000_000);
            let poll_timeout = i32::try_from(millis).map_or(PollTimeout::MAX, |ms| {
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            });
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, poll_timeout) {
                Ok(0) => {
                    if remaining.is_zero() {
                        return Ok(None);
                    }
                }
                Ok(_) => match recv(MsgFlags::MSG_DONTWAIT) {
                    // Readiness without a message (another thread took it): wait again.
                    Err(ControlError::Io {
                        source: Errno::EAGAIN,
                        ..
                    }) => {}
                    other => return other.map(Some),
                },
                Err(Errno::EINTR) => {}
                Err(source) => return Err(ControlError::Io { op: "poll", source }),
            }
        }
    }

    fn recv_with(&self, flags: MsgFlags) -> Result<Received, ControlError> {
        let result = self.recv_raw(flags).and_then(|(bytes, fds)| {
            let envelope = Envelope::decode(&bytes)?;
            envelope.check_fds(fds.len())?;
            Ok((envelope, fds))
        });
        if let Err(err) = &result {
            if err.is_malformed() {
                self.warn_malformed(err);
            }
        }
        result
    }

    /// Receives one datagram and its descriptors, checking the transport-level limits.
    pub(crate) fn recv_raw(
        &self,
        flags: MsgFlags,
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), ControlError> {
        let mut data = vec![0_u8; MAX_MESSAGE_BYTES];
        // Zero-filled up to its full capacity (which is what the kernel may write), so that the
        // ancillary data can be parsed from initialised bytes.
        let mut control = vec![0_u8; CMSG_BUFFER_BYTES];
        control.resize(control.capacity(), 0_u8);
        let (len, msg_flags) = loop {
            let mut iov = [IoSliceMut::new(&mut data)];
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut control),
                flags | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => break (msg.bytes, msg.flags),
                Err(Errno::EINTR) => continue,
                Err(source) => {
                    return Err(ControlError::Io {
                        op: "recvmsg",
                        source,
                    })
                }
            }
        };
        // Take ownership of every received descriptor before anything else, so that each early
        // return below closes them.
        let (fds, unexpected) = take_fds(&control);
        if msg_flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(ControlError::ControlTruncated);
        }
        if msg_flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(ControlError::Truncated {
                max: MAX_MESSAGE_BYTES,
            });
        }
        if let Some((level, kind)) = unexpected {
            return Err(ControlError::UnexpectedControlMessage { level, kind });
        }
        if fds.len() > MAX_FDS {
            return Err(ControlError::TooManyFds {
                count: fds.len(),
                max: MAX_FDS,
            });
        }
        if len == 0 {
            // SOCK_SEQPACKET reports EOF as a zero-length read. (An empty datagram reads the
            // same; a peer sending one is broken either way.)
            return Err(ControlError::PeerClosed);
        }
        data.truncate(len);
        Ok((data, fds))
    }

    pub(crate) fn warn_malformed(&self, err: &ControlError) {
        let allowed = self
            .warnings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check(Instant::now());
        if let Some(suppressed) = allowed {
            let source = std::error::Error::source(err).map(ToString::to_string);
            tracing::warn!(
                fd = self.fd.as_raw_fd(),
                error = %err,
                source = source.as_deref().unwrap_or(""),
                suppressed,
                "Rejected malformed control message from peer"
            );
        }
    }
}

impl AsFd for ControlChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Walks the ancillary data written by `recvmsg` and takes ownership of every `SCM_RIGHTS`
/// descriptor in it. Also returns the first control message of another kind, if any.
///
/// Parses the buffer itself rather than with nix's iterator, because that iterator refuses to
/// run when `MSG_CTRUNC` is set, and the descriptors that did arrive must still be closed. The
/// buffer was zero-filled, so parsing stops at the first zero length.
fn take_fds(control: &[u8]) -> (Vec<OwnedFd>, Option<(i32, i32)>) {
    const USIZE: usize = std::mem::size_of::<usize>();
    const INT: usize = std::mem::size_of::<libc::c_int>();
    let mut fds = Vec::new();
    let mut unexpected = None;
    let mut offset = 0;
    while let Some(header) = control.get(offset..offset + CMSG_HDR_BYTES) {
        let field = |at: usize, width: usize| header.get(at..at + width).unwrap_or_default();
        let cmsg_len = field(0, USIZE).try_into().map_or(0, usize::from_ne_bytes);
        let level = field(USIZE, INT).try_into().map_or(0, i32::from_ne_bytes);
        let kind = field(USIZE + INT, INT)
            .try_into()
            .map_or(0, i32::from_ne_bytes);
        if cmsg_len < CMSG_HDR_BYTES {
            break; // the zero-filled rest of the buffer
        }
        let data_start = offset + cmsg_align(CMSG_HDR_BYTES);
        let Some(data) = control.get(data_start..offset.saturating_add(cmsg_len)) else {
            break;
        };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            for chunk in data.chunks_exact(INT) {
                let fd = chunk.try_into().map_or(-1, RawFd::from_ne_bytes);
                if fd >= 0 {
                    // SAFETY: the kernel installed `fd` in this process's table as part of the
                    // recvmsg that filled `control`; nothing else has seen it, so this OwnedFd is
                    // its only owner and closes it exactly once.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        } else if unexpected.is_none() {
            unexpected = Some((level, kind));
        }
        offset += cmsg_align(cmsg_len);
    }
    (fds, unexpected)
}
