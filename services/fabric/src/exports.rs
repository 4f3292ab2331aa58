//! The export table feed: reads the exports region ([`duplex_ipc::exports`]) at start and again
//! whenever its doorbell rings, and applies each new table to the target
//! ([`Target::apply_exports`]).
//!
//! The region is mapped before the sandbox is entered, so reading it costs no system call; the
//! doorbell is an eventfd registered with the runtime's reactor (`AsyncFd`), drained before
//! each read so that a publish racing with the read rings again. A table that cannot be read
//! (a corrupt region, a writer lapping the reader) is logged, rate limited, and the target
//! keeps serving the table it applied last; the next ring tries again.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_ipc::control::RateLimiter;
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::exports::ExportsRegion;
use tokio::io::unix::AsyncFd;

use crate::target::{ExportsChange, Target};

/// The doorbell's eventfd, as the reactor wants it.
#[derive(Debug)]
struct Bell(Doorbell);

impl AsRawFd for Bell {
    fn as_raw_fd(&self) -> RawFd {
        self.0.fd().as_raw_fd()
    }
}

/// The exports region and its doorbell, feeding the target.
#[derive(Debug)]
pub struct ExportsFeed {
    region: ExportsRegion,
    bell: Option<AsyncFd<Bell>>,
    warn: RefCell<RateLimiter>,
}

impl ExportsFeed {
    /// A feed reading `region`, woken by `bell` (without one, the table is read once). Must be
    /// called inside the runtime: the bell is registered with its reactor.
    pub fn new(region: ExportsRegion, bell: Option<Doorbell>) -> std::io::Result<Self> {
        // `AsyncFd::new` is deprecated because a `T: AsRawFd` could close its fd while it is
        // registered; `Bell` owns its eventfd and only closes it when dropped with the AsyncFd
        // (as the backend's doorbells do; the fabric has no `unsafe` for `AsyncFd::register`).
        #[allow(deprecated)]
        let bell = bell.map(|b| AsyncFd::new(Bell(b))).transpose()?;
        Ok(Self {
            region,
            bell,
            warn: RefCell::new(RateLimiter::new(10, Duration::from_secs(10))),
        })
    }

    /// Reads the published table and applies it if it is new. Returns what changed, or `None`
    /// when nothing was applied (none published, the same generation, or unreadable).
    pub fn refresh(&self, target: &Target) -> Option<ExportsChange> {
        let table = match self.region.read() {
            Ok(Some(t)) => t,
            Ok(None) => return None,
            Err(e) => {
                if let Some(suppressed) = self.warn.borrow_mut().check(Instant::now()) {
                    tracing::error!(
                        error = %e,
                        suppressed,
                        serving = target.exports_generation(),
                        "cannot read the export table: still serving the one applied last"
                    );
                }
                return None;
            }
        };
        let change = target.apply_exports(&table);
        if !change.applied {
            return None;
        }
        if !change.ignored.is_empty() {
            tracing::warn!(
                subsystems = ?change.ignored,
                "export table names subsystems of the static topology: ignored"
            );
        }
        tracing::info!(
            generation = change.generation,
            added = ?change.added,
            removed = ?change.removed,
            namespaces = change.namespaces,
            denied = change.denied,
            ana_groups = change.ana_groups,
            "export table applied"
        );
        Some(change)
    }

    /// Waits on the doorbell and refreshes after every ring, for as long as the runtime runs.
    /// Returns at once without a doorbell, and if waiting fails.
    pub async fn run(self, target: Arc<Target>) {
        let Some(bell) = &self.bell else {
            return;
        };
        loop {
            match bell.readable().await {
                Ok(mut ready) => {
                    // Drained before reading: a publish after this rings again.
                    ready.get_inner().0.drain();
                    ready.clear_ready();
                }
                Err(e) => {
                    tracing::error!(error = %e, "exports doorbell failed: export table changes are no longer seen");
                    return;
                }
            }
            self.refresh(&target);
        }
    }
}
