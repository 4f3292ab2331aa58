//! Eventfd doorbells.
//!
//! A doorbell wakes a sleeping ring endpoint. Rings only ring it when the other side has said it
//! is about to sleep (the "waiting" flag in the ring header), so a busy producer makes no system
//! call per descriptor. An eventfd is a counter: rings coalesce, and a spurious wakeup is harmless
//! because the woken side re-checks the ring indices.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// Errors of a doorbell.
#[derive(Debug, thiserror::Error)]
pub enum DoorbellError {
    /// A system call failed.
    #[error("Doorbell {what} failed: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// The handed-over fd is not an eventfd.
    #[error("Fd {0} handed over as a doorbell is not an eventfd ({1})")]
    NotEventfd(i32, String),
}

/// An eventfd used as a doorbell.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    /// Creates a non-blocking, close-on-exec eventfd.
    pub fn new() -> Result<Self, DoorbellError> {
        let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(
            |source| DoorbellError::Sys {
                what: "eventfd",
                source,
            },
        )?;
        Ok(Self { fd: efd.into() })
    }

    /// Wraps an eventfd handed over by another process, checking that it is one.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, DoorbellError> {
        let raw = fd.as_raw_fd();
        let link = std::fs::read_link(format!("/proc/self/fd/{raw}"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|e| format!("unreadable: {e}"));
        if link != "anon_inode:[eventfd]" {
            return Err(DoorbellError::NotEventfd(raw, link));
        }
        // Make sure reads never block: waiting is done with poll.
        let flags = nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFL).map_err(|source| {
            DoorbellError::Sys {
                what: "F_GETFL",
                source,
            }
        })?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(|source| {
            DoorbellError::Sys {
                what: "F_SETFL",
                source,
            }
        })?;
        Ok(Self { fd })
    }

    /// Rings: adds one to the counter, waking a poller.
    pub fn ring(&self) {
        match nix::unistd::write(&self.fd, &1u64.to_ne_bytes()) {
            // EAGAIN means the counter is saturated: the bell is already ringing.
            Ok(_) | Err(Errno::EAGAIN) => {}
            Err(e) => tracing::warn!(error = %e, "doorbell write failed"),
        }
    }

    /// Waits until the bell has rung (or `timeout` passes) and clears it.
    ///
    /// Returns whether it had rung. `None` waits forever.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool, DoorbellError> {
        let timeout = match timeout {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => Ok(false),
            Ok(_) => Ok(self.drain()),
            Err(source) => Err(DoorbellError::Sys {
                what: "poll",
                source,
            }),
        }
    }

    /// Clears the counter without waiting. Returns whether it had rung.
    pub fn drain(&self) -> bool {
        let mut buf = [0u8; 8];
        matches!(nix::unistd::read(self.fd.as_raw_fd(), &mut buf), Ok(8))
    }

    /// The eventfd, to hand to another process or add to an epoll set.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Duplicates the eventfd.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
        })
    }
}
