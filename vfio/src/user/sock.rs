//! Whole-message send and receive, with file descriptors, over a blocking UNIX stream socket.
//!
//! Both ends use this. The client gives every exchange (request out, reply in) one deadline and
//! keeps the socket's `SO_RCVTIMEO`/`SO_SNDTIMEO` at no more than the time left (within
//! [`SLACK`]), so a peer that trickles bytes cannot stretch a reply past the timeout. The server
//! has no deadline: it waits for its client as long as the client stays connected.
//!
//! Descriptors are received with `MSG_CMSG_CLOEXEC` straight into `OwnedFd`s, at most
//! [`MAX_MSG_FDS`] per message; any beyond that, and any the kernel had to drop for lack of
//! control-buffer room, are closed and reported as lost so the caller can refuse the message.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

use super::proto::MAX_MSG_FDS;

/// How far a socket timeout may run past the exchange's deadline before it is lowered (each
/// lowering is a `setsockopt`; exchanges that finish in one read need none).
const SLACK: Duration = Duration::from_millis(10);

/// Control-buffer room for [`MAX_MSG_FDS`] descriptors.
const FD_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_MSG_FDS as usize));

/// Why a send or receive did not complete.
#[derive(Debug)]
pub(crate) enum SockError {
    /// The peer closed the connection after `got` bytes of the buffer were filled.
    Closed { got: usize },
    /// The exchange's deadline passed.
    Timeout,
    /// The socket failed.
    Io(io::Error),
}

/// Whether a socket error means the peer has gone (writing to a closed peer, or a peer that
/// closed with our bytes unread).
pub(crate) fn is_hang_up(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// A connected stream socket and the current exchange's deadline.
#[derive(Debug)]
pub(crate) struct Link {
    stream: UnixStream,
    /// The whole time an exchange may take; `None`: wait forever.
    timeout: Option<Duration>,
    /// When the current exchange must be over.
    deadline: Option<Instant>,
    /// The receive timeout currently set on the socket.
    read_armed: Option<Duration>,
    /// The send timeout currently set on the socket.
    write_armed: Option<Duration>,
    /// Whether the socket timeouts follow each exchange's deadline (a `setsockopt` whenever
    /// the time left drifts by more than [`SLACK`]); when off they stay as set at creation.
    rearm: bool,
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

impl Link {
    /// Takes over `stream`, making it blocking. With a `timeout`, exchanges have deadlines;
    /// without, the socket's own timeouts (if any) are left as they are.
    pub(crate) fn new(stream: UnixStream, timeout: Option<Duration>) -> io::Result<Link> {
        stream.set_nonblocking(false)?;
        if timeout.is_some() {
            stream.set_read_timeout(timeout)?;
            stream.set_write_timeout(timeout)?;
        }
        Ok(Link {
            stream,
            timeout,
            deadline: None,
            read_armed: timeout,
            write_armed: timeout,
            rearm: true,
        })
    }

    /// Stops (or resumes) adjusting the socket timeouts to each exchange's deadline. Off,
    /// every system call waits at most the timeout set at creation, so an exchange of a few
    /// calls may take a small multiple of it; no `setsockopt` is made after set-up (for a
    /// process whose seccomp policy allows none).
    pub(crate) fn set_rearm(&mut self, on: bool) {
        self.rearm = on;
    }

    /// The socket.
    pub(crate) fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Starts an exchange: its deadline is the timeout from now.
    pub(crate) fn begin(&mut self) {
        self.deadline = self.timeout.map(|timeout| Instant::now() + timeout);
    }

    /// Sets the socket timeout for `direction` to the time left, if the one set differs by more
    /// than [`SLACK`]; fails with `Timeout` once no time is left.
    fn arm(&mut self, direction: Direction) -> Result<(), SockError> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SockError::Timeout);
        }
        let armed = match direction {
            Direction::Read => &mut self.read_armed,
            Direction::Write => &mut self.write_armed,
        };
        let close_enough = !self.rearm
            || armed.is_some_and(|armed| armed <= left + SLACK && armed + SLACK >= left);
        if !close_enough {
            let set = match direction {
                Direction::Read => self.stream.set_read_timeout(Some(left)),
                Direction::Write => self.stream.set_write_timeout(Some(left)),
            };
            set.map_err(SockError::Io)?;
            *armed = Some(left);
        }
        Ok(())
    }

    /// A would-block error: a timeout once the deadline has passed, otherwise worth retrying
    /// (`Ok`). Without a deadline the socket was made non-blocking behind our back: an error.
    fn would_block(&self) -> Result<(), SockError> {
        match self.deadline {
            None => Err(SockError::Io(io::ErrorKind::WouldBlock.into())),
            Some(deadline) if Instant::now() >= deadline => Err(SockError::Timeout),
            Some(_) => Ok(()),
        }
    }

    /// Sends `parts` as one message, with `fds` on its first byte.
    pub(crate) fn send(
        &mut self,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), SockError> {
        if fds.len() > MAX_MSG_FDS as usize {
            return Err(SockError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} descriptors, at most {MAX_MSG_FDS} go with one message",
                    fds.len()
                ),
            )));
        }
        let total: usize = parts.iter().map(|part| part.len()).sum();
        let mut sent = 0usize;
        let mut space = [MaybeUninit::<u8>::uninit(); FD_SPACE];
        while sent < total {
            self.arm(Direction::Write)?;
            let slices = remaining(parts, sent);
            let mut control = SendAncillaryBuffer::new(&mut space);
            if sent == 0 && !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(SockError::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "descriptors do not fit the control buffer",
                )));
            }
            match sendmsg(&self.stream, &slices, &mut control, SendFlags::NOSIGNAL) {
                Ok(0) => return Err(SockError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => sent = sent.saturating_add(n),
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => self.would_block()?,
                Err(errno) => return Err(SockError::Io(errno.into())),
            }
        }
        Ok(())
    }

    /// Fills `buf` from the socket. Descriptors that arrive are appended to `fds` (up to
    /// [`MAX_MSG_FDS`] in all); `fds_lost` is set when any had to be closed instead.
    pub(crate) fn recv_exact(
        &mut self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        fds_lost: &mut bool,
    ) -> Result<(), SockError> {
        let mut got = 0usize;
        while let Some(rest) = buf.get_mut(got..).filter(|rest| !rest.is_empty()) {
            self.arm(Direction::Read)?;
            let mut space = [MaybeUninit::<u8>::uninit(); FD_SPACE];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(rest)];
            let result = recvmsg(
                &self.stream,
                &mut iov,
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            );
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = message {
                    for fd in received {
                        if fds.len() < MAX_MSG_FDS as usize {
                            fds.push(fd);
                        } else {
                            *fds_lost = true;
                        }
                    }
                }
            }
            match result {
                Ok(msg) => {
                    if msg.flags.contains(ReturnFlags::CTRUNC) {
                        *fds_lost = true;
                    }
                    if msg.bytes == 0 {
                        return Err(SockError::Closed { got });
                    }
                    got = got.saturating_add(msg.bytes);
                }
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => self.would_block()?,
                Err(errno) => return Err(SockError::Io(errno.into())),
            }
        }
        Ok(())
    }

    /// Reads and throws away `len` bytes (and closes any descriptors with them).
    pub(crate) fn discard(&mut self, mut len: usize) -> Result<(), SockError> {
        let mut scratch = [0u8; 4096];
        let mut fds = Vec::new();
        let mut lost = false;
        while len > 0 {
            let chunk = len.min(scratch.len());
            self.recv_exact(&mut scratch[..chunk], &mut fds, &mut lost)?;
            fds.clear();
            len -= chunk;
        }
        Ok(())
    }
}

/// The parts of a message not yet sent, after the first `sent` bytes.
fn remaining<'a>(parts: &[&'a [u8]], mut sent: usize) -> Vec<IoSlice<'a>> {
    let mut slices = Vec::with_capacity(parts.len());
    for part in parts {
        if sent >= part.len() {
            sent -= part.len();
            continue;
        }
        slices.push(IoSlice::new(part.get(sent..).unwrap_or_default()));
        sent = 0;
    }
    slices
}
