//! The fabric's end of the reservation channel ([`duplex_ipc::resv`]): one change at a time to
//! the metadata service, its answer awaited on the reactor (no thread, no blocking).

use std::os::fd::AsRawFd;
use std::time::Duration;

use duplex_ipc::resv::{ResvChannel, ResvReply, ResvRequest, RESTART_NOTICE_ID};
use tokio::io::unix::AsyncFd;

/// How long a change waits for the metadata service's answer.
pub const CALL_PATIENCE: Duration = Duration::from_secs(10);

/// The fabric's end of the reservation channel, registered with the reactor.
#[derive(Debug)]
pub struct ResvClient {
    fd: AsyncFd<Fd>,
    one: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Fd(ResvChannel);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// Why a change was not answered.
#[derive(Debug)]
pub enum CallError {
    /// No answer within [`CALL_PATIENCE`].
    Timeout,
    /// The channel failed.
    Channel(String),
}

impl ResvClient {
    /// Takes the channel (inside the runtime: it is registered with the reactor).
    pub fn new(channel: ResvChannel) -> std::io::Result<Self> {
        let dropped = channel.discard_queued();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "discarded reservation answers meant for a predecessor"
            );
        }
        // `AsyncFd::new` is deprecated because a `T: AsRawFd` could close its fd while it is
        // registered; `Fd` owns the channel's socket and only closes it when dropped with the
        // AsyncFd (as the doorbells of the backend and the exports feed do).
        #[allow(deprecated)]
        let fd = AsyncFd::new(Fd(channel))?;
        Ok(Self {
            fd,
            one: tokio::sync::Mutex::new(()),
        })
    }

    /// Sends `request` and waits for its answer (one at a time).
    pub async fn call(&self, request: &ResvRequest) -> Result<ResvReply, CallError> {
        // The patience covers the wait for the channel too: a change queued behind others
        // still gets its answer within the host's command timeout.
        let deadline = tokio::time::sleep(CALL_PATIENCE);
        tokio::pin!(deadline);
        let _one = tokio::select! {
            () = &mut deadline => return Err(CallError::Timeout),
            one = self.one.lock() => one,
        };
        let channel = &self.fd.get_ref().0;
        // One change at a time: whatever is queued now answers nothing in flight (a late
        // answer, a restart notice sent while nothing waited).
        loop {
            match channel.try_recv_reply() {
                Ok(Some((got, _))) => {
                    tracing::debug!(id = got, "discarding a stale reservation answer");
                }
                Ok(None) => break,
                Err(e) if e.is_malformed() => {}
                Err(e) => return Err(CallError::Channel(e.to_string())),
            }
        }
        let id = channel
            .send_request(request)
            .map_err(|e| CallError::Channel(e.to_string()))?;
        loop {
            let mut ready = tokio::select! {
                () = &mut deadline => return Err(CallError::Timeout),
                r = self.fd.readable() => r.map_err(|e| CallError::Channel(e.to_string()))?,
            };
            match channel.try_recv_reply() {
                Ok(Some((got, reply))) if got == id || got == RESTART_NOTICE_ID => {
                    return Ok(reply)
                }
                Ok(Some((got, _))) => {
                    tracing::debug!(
                        id = got,
                        waiting_for = id,
                        "discarding a late reservation answer"
                    );
                }
                Ok(None) => ready.clear_ready(),
                Err(e) if e.is_malformed() => {}
                Err(e) => return Err(CallError::Channel(e.to_string())),
            }
        }
    }
}
