//! The service end of the lifecycle channel with the supervisor.
//!
//! A service is spawned with its end of a `SOCK_SEQPACKET` control socket at the fd named by
//! [`CONTROL_FD_ENV`] and nothing else. It says `Hello`; the supervisor answers `Start` with the
//! service's generation, whether this is a fresh start or a restart, and every resource (regions,
//! rings, pools, doorbells, sockets) as fds passed with `SCM_RIGHTS`; the service attaches them and
//! says `Ready`. From then on the supervisor may send `Shutdown`.

use std::os::fd::OwnedFd;
use std::time::Duration;

use crate::control::{Body, ControlChannel, ControlError, Envelope, ResourceKind, StartMode};
use crate::testkit::inherited_fd;

/// Environment variable holding the control socket's fd number.
pub const CONTROL_FD_ENV: &str = "DUPLEX_CONTROL_FD";
/// Lifecycle protocol version spoken by this build.
pub const PROTOCOL_VERSION: u32 = crate::control::PROTOCOL_VERSION;

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
