//! The reservation channel: the fabric carries a host's Reservation Register, Acquire, Release
//! and Reservation Persistence setting to the metadata service, which applies it to the state
//! kept with the pool on the drives and answers with the state after it.
//!
//! Mirrors `schemas/resv.capnp`. One `SOCK_SEQPACKET` socket pair, created by the supervisor;
//! the fabric holds one end, metadata the other. The transport (datagram limits, truncation
//! checks, rate-limited warnings) is [`ControlChannel`]'s; decoding is validated: unknown union
//! members are errors, identifiers are exactly 16 bytes, every text and list is bounded before
//! it is read.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use duplex_schemas::resv_capnp as wire;
use nix::errno::Errno;
use nix::sys::socket::MsgFlags;

use crate::control::{
    check_text, read_text, reader_options, unknown, ControlChannel, ControlError,
};
use crate::exports::ExportRegistrant;

/// Resource name of either end.
pub const RESV_RESOURCE: &str = "resv";
/// The request id of the restart notice a restarted metadata service sends.
pub const RESTART_NOTICE_ID: u64 = 0;
/// Longest NQN (NVMe: 223 bytes).
pub const MAX_NQN_BYTES: usize = 223;
/// Longest command data buffer (Register and Acquire: 16 bytes).
pub const MAX_DATA_BYTES: usize = 16;
/// Most registrants of one namespace (as `duplex_nvme::resv::MAX_REGISTRANTS`).
pub const MAX_REGISTRANTS: usize = 64;
/// Most aborts, and most notices, in one reply.
pub const MAX_OUTCOMES: usize = 128;
/// Longest error text.
pub const MAX_TEXT_BYTES: usize = 4096;

/// A reservation command as the host sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResvCommand {
    /// Reservation Register: dword 10 and the data buffer.
    Register {
        /// Dword 10.
        cdw10: u32,
        /// The data buffer (16 bytes).
        data: Vec<u8>,
    },
    /// Reservation Acquire.
    Acquire {
        /// Dword 10.
        cdw10: u32,
        /// The data buffer (16 bytes).
        data: Vec<u8>,
    },
    /// Reservation Release.
    Release {
        /// Dword 10.
        cdw10: u32,
        /// The data buffer (8 bytes).
        data: Vec<u8>,
    },
    /// Set Features Reservation Persistence: the PTPL bit.
    SetPtpl(bool),
}

impl ResvCommand {
    /// Its name, for log lines.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Register { .. } => "register",
            Self::Acquire { .. } => "acquire",
            Self::Release { .. } => "release",
            Self::SetPtpl(_) => "set-ptpl",
        }
    }
}

/// One request: a host's command on one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResvRequest {
    /// The subsystem's NQN.
    pub subnqn: String,
    /// The namespace id.
    pub nsid: u32,
    /// The host identifier of the host that sent it.
    pub host_id: [u8; 16],
    /// The controller it came through.
    pub cntlid: u16,
    /// The command.
    pub command: ResvCommand,
}

/// A namespace's reservation state, versioned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResvStateMsg {
    /// Bumped by every committed change.
    pub version: u64,
    /// PRGEN.
    pub generation: u32,
    /// Reservation type (0: none).
    pub rtype: u8,
    /// Persist Through Power Loss.
    pub ptpl: bool,
    /// The single holder (all zero: none, or every registrant).
    pub holder: [u8; 16],
    /// The registrants.
    pub registrants: Vec<ExportRegistrant>,
}

/// A controller of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResvCtrl {
    /// Host identifier.
    pub host_id: [u8; 16],
    /// Controller id as registered.
    pub cntlid: u16,
}

/// A Reservation Notification log page event to raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResvNotice {
    /// Whom.
    pub to: ResvCtrl,
    /// Log page type: 1 registration preempted, 2 reservation released, 3 reservation
    /// preempted.
    pub kind: u8,
}

/// What a carried-out (or model-refused) command gives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResvDone {
    /// NVMe status (`duplex_nvme::status::Status` bits); 0 success.
    pub status: u16,
    /// The state after the command.
    pub state: ResvStateMsg,
    /// Controllers whose outstanding commands are aborted (Preempt and Abort).
    pub aborts: Vec<ResvCtrl>,
    /// Notices to raise.
    pub notices: Vec<ResvNotice>,
}

/// The metadata service's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResvReply {
    /// Carried out, or refused by the reservation model.
    Done(ResvDone),
    /// The namespace's pool is the peer's.
    NotOwner,
    /// Not carried out, and why.
    Error(String),
}

fn read(
    bytes: &[u8],
) -> Result<capnp::message::Reader<capnp::serialize::OwnedSegments>, ControlError> {
    let mut rest: &[u8] = bytes;
    let message = capnp::serialize::read_message(&mut rest, reader_options())
        .map_err(ControlError::Decode)?;
    if !rest.is_empty() {
        return Err(ControlError::TrailingBytes(rest.len()));
    }
    Ok(message)
}

fn id16(
    data: capnp::Result<capnp::data::Reader<'_>>,
    field: &'static str,
) -> Result<[u8; 16], ControlError> {
    let d = data.map_err(ControlError::Decode)?;
    <[u8; 16]>::try_from(d).map_err(|_| ControlError::MissingField(field))
}

fn too_many(field: &'static str, len: usize, max: usize) -> Result<(), ControlError> {
    if len > max {
        return Err(ControlError::TooManyEntries { field, len, max });
    }
    Ok(())
}

impl ResvRequest {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), ControlError> {
        check_text(&self.subnqn, "resv.subnqn", MAX_NQN_BYTES, true)?;
        match &self.command {
            ResvCommand::Register { data, .. }
            | ResvCommand::Acquire { data, .. }
            | ResvCommand::Release { data, .. } => {
                too_many("resv.data", data.len(), MAX_DATA_BYTES)
            }
            ResvCommand::SetPtpl(_) => Ok(()),
        }
    }

    /// Encodes with `request_id`.
    pub fn encode(&self, request_id: u64) -> Vec<u8> {
        let mut message = capnp::message::Builder::new_default();
        let mut root = message.init_root::<wire::resv_request::Builder<'_>>();
        root.set_request_id(request_id);
        root.set_subnqn(self.subnqn.as_str());
        root.set_nsid(self.nsid);
        root.set_host_id(&self.host_id);
        root.set_cntlid(self.cntlid);
        let body = root.init_body();
        let (mut c, cdw10, data) = match &self.command {
            ResvCommand::Register { cdw10, data } => (body.init_register(), cdw10, data),
            ResvCommand::Acquire { cdw10, data } => (body.init_acquire(), cdw10, data),
            ResvCommand::Release { cdw10, data } => (body.init_release(), cdw10, data),
            ResvCommand::SetPtpl(on) => {
                let mut body = body;
                body.set_set_ptpl(*on);
                return capnp::serialize::write_message_to_words(&message);
            }
        };
        c.set_cdw10(*cdw10);
        c.set_data(data);
        capnp::serialize::write_message_to_words(&message)
    }

    /// Decodes and validates; never panics.
    pub fn decode(bytes: &[u8]) -> Result<(u64, Self), ControlError> {
        let message = read(bytes)?;
        let root: wire::resv_request::Reader<'_> =
            message.get_root().map_err(ControlError::Decode)?;
        let command =
            |c: capnp::Result<wire::command::Reader<'_>>| -> Result<(u32, Vec<u8>), ControlError> {
                let c = c.map_err(ControlError::Decode)?;
                let data = c.get_data().map_err(ControlError::Decode)?;
                too_many("resv.data", data.len(), MAX_DATA_BYTES)?;
                Ok((c.get_cdw10(), data.to_vec()))
            };
        let command = match root
            .get_body()
            .which()
            .map_err(unknown("ResvRequest.body"))?
        {
            wire::resv_request::body::Register(c) => {
                let (cdw10, data) = command(c)?;
                ResvCommand::Register { cdw10, data }
            }
            wire::resv_request::body::Acquire(c) => {
                let (cdw10, data) = command(c)?;
                ResvCommand::Acquire { cdw10, data }
            }
            wire::resv_request::body::Release(c) => {
                let (cdw10, data) = command(c)?;
                ResvCommand::Release { cdw10, data }
            }
            wire::resv_request::body::SetPtpl(on) => ResvCommand::SetPtpl(on),
        };
        let request = Self {
            subnqn: read_text(root.get_subnqn(), "resv.subnqn", MAX_NQN_BYTES)?,
            nsid: root.get_nsid(),
            host_id: id16(root.get_host_id(), "resv.hostId")?,
            cntlid: root.get_cntlid(),
            command,
        };
        request.validate()?;
        Ok((root.get_request_id(), request))
    }
}

fn write_ctrl(mut b: wire::host_ctrl::Builder<'_>, c: &ResvCtrl) {
    b.set_host_id(&c.host_id);
    b.set_cntlid(c.cntlid);
}

fn read_ctrl(r: wire::host_ctrl::Reader<'_>) -> Result<ResvCtrl, ControlError> {
    Ok(ResvCtrl {
        host_id: id16(r.get_host_id(), "resv.hostCtrl.hostId")?,
        cntlid: r.get_cntlid(),
    })
}

impl ResvReply {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), ControlError> {
        match self {
            Self::Done(d) => {
                too_many(
                    "resv.state.registrants",
                    d.state.registrants.len(),
                    MAX_REGISTRANTS,
                )?;
                too_many("resv.aborts", d.aborts.len(), MAX_OUTCOMES)?;
                too_many("resv.notices", d.notices.len(), MAX_OUTCOMES)
            }
            Self::NotOwner => Ok(()),
            Self::Error(m) => check_text(m, "resv.error", MAX_TEXT_BYTES, false),
        }
    }

    /// Encodes with the id of the request answered.
    pub fn encode(&self, request_id: u64) -> Vec<u8> {
        let mut message = capnp::message::Builder::new_default();
        let mut root = message.init_root::<wire::resv_reply::Builder<'_>>();
        root.set_request_id(request_id);
        let mut body = root.init_body();
        match self {
            Self::Done(d) => {
                let mut b = body.init_done();
                b.set_status(d.status);
                {
                    let mut s = b.reborrow().init_state();
                    s.set_version(d.state.version);
                    s.set_generation(d.state.generation);
                    s.set_rtype(d.state.rtype);
                    s.set_ptpl(d.state.ptpl);
                    s.set_holder(&d.state.holder);
                    let mut list = s.init_registrants(len_u32(d.state.registrants.len()));
                    for (i, g) in d.state.registrants.iter().enumerate() {
                        let mut e = list.reborrow().get(len_u32(i));
                        e.set_host_id(&g.host_id);
                        e.set_key(g.key);
                        e.set_cntlid(g.cntlid);
                    }
                }
                {
                    let mut list = b.reborrow().init_aborts(len_u32(d.aborts.len()));
                    for (i, c) in d.aborts.iter().enumerate() {
                        write_ctrl(list.reborrow().get(len_u32(i)), c);
                    }
                }
                let mut list = b.init_notices(len_u32(d.notices.len()));
                for (i, n) in d.notices.iter().enumerate() {
                    let mut e = list.reborrow().get(len_u32(i));
                    write_ctrl(e.reborrow().init_to(), &n.to);
                    e.set_kind(n.kind);
                }
            }
            Self::NotOwner => body.set_not_owner(()),
            Self::Error(m) => body.set_error(m.as_str()),
        }
        capnp::serialize::write_message_to_words(&message)
    }

    /// Decodes and validates; never panics.
    pub fn decode(bytes: &[u8]) -> Result<(u64, Self), ControlError> {
        let message = read(bytes)?;
        let root: wire::resv_reply::Reader<'_> =
            message.get_root().map_err(ControlError::Decode)?;
        let reply = match root.get_body().which().map_err(unknown("ResvReply.body"))? {
            wire::resv_reply::body::Done(d) => {
                let d = d.map_err(ControlError::Decode)?;
                let s = d.get_state().map_err(ControlError::Decode)?;
                let regs = s.get_registrants().map_err(ControlError::Decode)?;
                too_many(
                    "resv.state.registrants",
                    regs.len() as usize,
                    MAX_REGISTRANTS,
                )?;
                let mut registrants = Vec::with_capacity(regs.len() as usize);
                for g in regs.iter() {
                    registrants.push(ExportRegistrant {
                        host_id: id16(g.get_host_id(), "resv.registrant.hostId")?,
                        key: g.get_key(),
                        cntlid: g.get_cntlid(),
                    });
                }
                let holder = s.get_holder().map_err(ControlError::Decode)?;
                let holder = if holder.is_empty() {
                    [0; 16]
                } else {
                    <[u8; 16]>::try_from(holder)
                        .map_err(|_| ControlError::MissingField("resv.state.holder"))?
                };
                let list = d.get_aborts().map_err(ControlError::Decode)?;
                too_many("resv.aborts", list.len() as usize, MAX_OUTCOMES)?;
                let mut aborts = Vec::with_capacity(list.len() as usize);
                for c in list.iter() {
                    aborts.push(read_ctrl(c)?);
                }
                let list = d.get_notices().map_err(ControlError::Decode)?;
                too_many("resv.notices", list.len() as usize, MAX_OUTCOMES)?;
                let mut notices = Vec::with_capacity(list.len() as usize);
                for n in list.iter() {
                    notices.push(ResvNotice {
                        to: read_ctrl(n.get_to().map_err(ControlError::Decode)?)?,
                        kind: n.get_kind(),
                    });
                }
                Self::Done(ResvDone {
                    status: d.get_status(),
                    state: ResvStateMsg {
                        version: s.get_version(),
                        generation: s.get_generation(),
                        rtype: s.get_rtype(),
                        ptpl: s.get_ptpl(),
                        holder,
                        registrants,
                    },
                    aborts,
                    notices,
                })
            }
            wire::resv_reply::body::NotOwner(()) => Self::NotOwner,
            wire::resv_reply::body::Error(m) => {
                Self::Error(read_text(m, "resv.error", MAX_TEXT_BYTES)?)
            }
        };
        Ok((root.get_request_id(), reply))
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// One end of the reservation channel: the fabric's (requests out) or metadata's (requests in).
#[derive(Debug)]
pub struct ResvChannel {
    inner: ControlChannel,
    next_id: std::sync::atomic::AtomicU64,
}

impl ResvChannel {
    /// A connected pair: `(fabric end, metadata end)`.
    pub fn pair() -> Result<(Self, Self), ControlError> {
        let (a, b) = ControlChannel::pair()?;
        Ok((Self::wrap(a), Self::wrap(b)))
    }

    /// Wraps a handed-over `SOCK_SEQPACKET` socket.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, ControlError> {
        Ok(Self::wrap(ControlChannel::from_fd(fd)?))
    }

    fn wrap(inner: ControlChannel) -> Self {
        Self {
            inner,
            next_id: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Numbers this end's requests from `first` on (0 is taken as 1). The fabric passes
    /// `generation << 32`: the channel outlives it, and a late answer to its predecessor's
    /// request must not match one of its own.
    #[must_use]
    pub fn with_first_request_id(self, first: u64) -> Self {
        self.next_id
            .store(first.max(1), std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Gives up the socket.
    pub fn into_fd(self) -> OwnedFd {
        self.inner.into_fd()
    }

    /// Sends a request; returns its id. Refuses (sending nothing) one out of bounds.
    pub fn send_request(&self, request: &ResvRequest) -> Result<u64, ControlError> {
        request.validate()?;
        let mut id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if id == RESTART_NOTICE_ID {
            id = self
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.inner.send_datagram(&request.encode(id), &[])?;
        Ok(id)
    }

    /// Sends the reply to `request_id`. Refuses (sending nothing) one out of bounds.
    pub fn send_reply(&self, request_id: u64, reply: &ResvReply) -> Result<(), ControlError> {
        reply.validate()?;
        self.inner.send_datagram(&reply.encode(request_id), &[])
    }

    /// Sends the restart notice (metadata's end, when it starts as a restart).
    pub fn send_restart_notice(&self) -> Result<(), ControlError> {
        let reply = ResvReply::Error(
            "the metadata service restarted while the request was in flight; it may or may not \
             have been carried out"
                .into(),
        );
        self.inner
            .send_datagram(&reply.encode(RESTART_NOTICE_ID), &[])
    }

    /// Sends raw bytes (tests of the receiver's validation).
    #[doc(hidden)]
    pub fn send_raw_for_tests(&self, bytes: &[u8]) -> Result<(), ControlError> {
        self.inner.send_datagram(bytes, &[])
    }

    fn recv_decoded<R>(
        &self,
        timeout: Duration,
        decode: fn(&[u8]) -> Result<R, ControlError>,
    ) -> Result<Option<R>, ControlError> {
        let got = self.inner.recv_timeout_with(timeout, |flags| {
            let (bytes, fds) = self.inner.recv_raw(flags)?;
            if !fds.is_empty() {
                return Err(ControlError::FdCountMismatch {
                    received: fds.len(),
                    named: 0,
                });
            }
            decode(&bytes)
        });
        if let Err(e) = &got {
            if e.is_malformed() {
                self.inner.warn_malformed(e);
            }
        }
        got
    }

    /// Receives a request (metadata's end), waiting at most `timeout`.
    pub fn recv_request(
        &self,
        timeout: Duration,
    ) -> Result<Option<(u64, ResvRequest)>, ControlError> {
        self.recv_decoded(timeout, ResvRequest::decode)
    }

    /// Receives a reply (the fabric's end), waiting at most `timeout`.
    pub fn recv_reply(&self, timeout: Duration) -> Result<Option<(u64, ResvReply)>, ControlError> {
        self.recv_decoded(timeout, ResvReply::decode)
    }

    /// Takes a reply already queued, without waiting and without `poll` (the fabric waits for
    /// readiness on its reactor): `Ok(None)` if none is.
    pub fn try_recv_reply(&self) -> Result<Option<(u64, ResvReply)>, ControlError> {
        let got = match self.inner.recv_raw(MsgFlags::MSG_DONTWAIT) {
            Ok((_, fds)) if !fds.is_empty() => Err(ControlError::FdCountMismatch {
                received: fds.len(),
                named: 0,
            }),
            Ok((bytes, _)) => ResvReply::decode(&bytes).map(Some),
            Err(ControlError::Io {
                source: Errno::EAGAIN,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        };
        if let Err(e) = &got {
            if e.is_malformed() {
                self.inner.warn_malformed(e);
            }
        }
        got
    }

    /// Discards every datagram already queued for this end; returns how many.
    pub fn discard_queued(&self) -> usize {
        let mut discarded = 0;
        loop {
            match self.inner.recv_raw(MsgFlags::MSG_DONTWAIT) {
                Ok(_) => discarded += 1,
                Err(ControlError::Io {
                    source: Errno::EAGAIN,
                    ..
                })
                | Err(ControlError::PeerClosed) => return discarded,
                Err(e) if e.is_malformed() => discarded += 1,
                Err(_) => return discarded,
            }
        }
    }

    /// Sends `request` and waits at most `timeout` for its reply (late replies to earlier
    /// requests are skipped). `Ok(None)`: no reply in time.
    pub fn call(
        &self,
        request: &ResvRequest,
        timeout: Duration,
    ) -> Result<Option<ResvReply>, ControlError> {
        // Whatever is queued before the request answers nothing in flight.
        while let Ok(Some(_)) = self.try_recv_reply() {}
        let id = self.send_request(request)?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_reply(left) {
                Ok(Some((got, reply))) if got == id || got == RESTART_NOTICE_ID => {
                    return Ok(Some(reply))
                }
                Ok(Some((got, _))) => {
                    tracing::debug!(
                        id = got,
                        waiting_for = id,
                        "discarding a late reservation reply"
                    );
                }
                Ok(None) => return Ok(None),
                // A malformed reply (warned about) is not the one awaited: keep waiting.
                Err(e) if e.is_malformed() => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsFd for ResvChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn request(command: ResvCommand) -> ResvRequest {
        ResvRequest {
            subnqn: "nqn.2026-01.io.duplex:s".into(),
            nsid: 1,
            host_id: [7; 16],
            cntlid: 0xFFFF,
            command,
        }
    }

    #[test]
    fn requests_and_replies_round_trip_over_the_socket() {
        let (fabric, metadata) = ResvChannel::pair().unwrap();
        for command in [
            ResvCommand::Register {
                cdw10: 0x4000_0000,
                data: vec![1; 16],
            },
            ResvCommand::Acquire {
                cdw10: 0x0102,
                data: vec![2; 16],
            },
            ResvCommand::Release {
                cdw10: 0x0100,
                data: vec![3; 8],
            },
            ResvCommand::SetPtpl(true),
        ] {
            let r = request(command);
            let id = fabric.send_request(&r).unwrap();
            let (got_id, got) = metadata
                .recv_request(Duration::from_secs(5))
                .unwrap()
                .unwrap();
            assert_eq!((got_id, &got), (id, &r));
        }
        let done = ResvReply::Done(ResvDone {
            status: 0x4283,
            state: ResvStateMsg {
                version: 9,
                generation: 4,
                rtype: 1,
                ptpl: true,
                holder: [7; 16],
                registrants: vec![ExportRegistrant {
                    host_id: [7; 16],
                    key: 5,
                    cntlid: 0xFFFF,
                }],
            },
            aborts: vec![ResvCtrl {
                host_id: [8; 16],
                cntlid: 3,
            }],
            notices: vec![ResvNotice {
                to: ResvCtrl {
                    host_id: [8; 16],
                    cntlid: 3,
                },
                kind: 1,
            }],
        });
        for reply in [
            done,
            ResvReply::NotOwner,
            ResvReply::Error("no such namespace".into()),
        ] {
            metadata.send_reply(42, &reply).unwrap();
            assert_eq!(
                fabric.recv_reply(Duration::from_secs(5)).unwrap().unwrap(),
                (42, reply)
            );
        }
    }

    #[test]
    fn out_of_bounds_messages_are_refused_before_sending_and_on_receipt() {
        let (fabric, metadata) = ResvChannel::pair().unwrap();
        let long = request(ResvCommand::Register {
            cdw10: 0,
            data: vec![0; 17],
        });
        assert!(fabric.send_request(&long).is_err());
        fabric.send_raw_for_tests(&long.encode(5)).unwrap();
        assert!(metadata
            .recv_request(Duration::from_secs(5))
            .expect_err("refused")
            .is_malformed());
        let mut short_id = request(ResvCommand::SetPtpl(false));
        short_id.subnqn = String::new();
        assert!(fabric.send_request(&short_id).is_err());
        fabric.send_raw_for_tests(&[1, 2, 3]).unwrap();
        assert!(metadata
            .recv_request(Duration::from_secs(5))
            .expect_err("garbage")
            .is_malformed());
        // The channel still works after malformed datagrams.
        let ok = request(ResvCommand::SetPtpl(true));
        fabric.send_request(&ok).unwrap();
        assert_eq!(
            metadata
                .recv_request(Duration::from_secs(5))
                .unwrap()
                .unwrap()
                .1,
            ok
        );
    }

    #[test]
    fn a_host_id_not_16_bytes_is_malformed() {
        let mut message = capnp::message::Builder::new_default();
        let mut root = message.init_root::<wire::resv_request::Builder<'_>>();
        root.set_request_id(1);
        root.set_subnqn("nqn.x");
        root.set_host_id(&[1; 15]);
        root.init_body().set_set_ptpl(true);
        let bytes = capnp::serialize::write_message_to_words(&message);
        assert!(ResvRequest::decode(&bytes)
            .expect_err("short id")
            .is_malformed());
    }

    #[test]
    fn every_truncation_of_a_message_is_an_error_not_a_panic() {
        let r = request(ResvCommand::Acquire {
            cdw10: 0x0102,
            data: vec![2; 16],
        })
        .encode(3);
        for n in 0..r.len() {
            assert!(ResvRequest::decode(&r[..n]).is_err());
        }
        let reply = ResvReply::Done(ResvDone::default()).encode(3);
        for n in 0..reply.len() {
            assert!(ResvReply::decode(&reply[..n]).is_err());
        }
    }
}
