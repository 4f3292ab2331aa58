//! Fencing by drive reservations: the `fence_scsi` model on NVMe reservations.
//!
//! Every node registers a key naming it and its boot ([`FenceKey`]) on every drive, and the
//! drives carry one reservation of type Exclusive Access – Registrants Only: a registered node
//! reads and writes, a node whose key is gone can do neither. Fencing a peer is Reservation
//! Acquire with Preempt and Abort of the peer's key (its registration goes, its queued commands
//! are aborted, and the reservation passes to us if it held it), drive by drive in one fixed
//! order, the same on both nodes ([`Fence::new`] sorts the drives by name).
//!
//! The order is what makes a race safe. Two nodes that each believe the other dead both start
//! at the first drive; the drive executes one preempt first, and the other finds its own key
//! gone there: its command fails with Reservation Conflict, and a report shows it unregistered.
//! It stops at once ([`FenceError::Fenced`]) without touching any later drive. So exactly one
//! node wins, and it wins every drive.
//!
//! A preempt that finds the victim already gone is also answered with Reservation Conflict
//! (no registrant has the key): a report tells the two apart, so fencing again after a crash
//! halfway through finishes the job instead of failing. A drive that cannot be reached stops
//! fencing with [`FenceError::Unreachable`]: without every drive fenced there is no takeover.
//!
//! The drive side is the [`Reservations`] trait; [`NvmeReservations`] runs it on a namespace of
//! the user-space NVMe driver.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use duplex_nvme::resv::{
    Acquire, AcquireAction, Cptpl, Register, RegisterAction, ResvType, STATUS_EXT_ENTRY_LEN,
    STATUS_EXT_HEADER_LEN,
};

use crate::nvme::transport::Transport;
use crate::nvme::{CmdError, Controller};

/// Set once a drive told this (cluster member) process that its key is gone.
static FENCED: AtomicBool = AtomicBool::new(false);

/// A drive answered Reservation Conflict (or aborted a command for another host's preempt) to
/// this cluster member: the peer fenced this node. From now on the engine serves nothing: every
/// request fails with [`duplex_ipc::desc::STATUS_FENCED`] (a path error for hosts), so nothing
/// more is acknowledged; only a new process (a new boot, a new key) serves again.
pub fn mark_fenced(drive: &str, why: &dyn fmt::Display) {
    if !FENCED.swap(true, Ordering::SeqCst) {
        tracing::error!(
            drive,
            %why,
            "FENCED: this node's reservation key is gone from a drive; serving nothing more"
        );
    }
}

/// Whether this process was fenced ([`mark_fenced`]).
pub fn is_fenced() -> bool {
    FENCED.load(Ordering::SeqCst)
}

/// The reservation type the cluster holds on every drive.
pub const FENCE_TYPE: ResvType = ResvType::ExclusiveAccessRegistrantsOnly;

/// A reservation key naming a node and one boot of it: the node id in the top 16 bits, the
/// boot number below (never 0). A node that rejoins after being fenced registers a new key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FenceKey(pub u64);

impl FenceKey {
    /// The key of node `node`, boot `boot` (its low 48 bits; 0 becomes 1).
    pub fn new(node: u16, boot: u64) -> Self {
        let boot = (boot & ((1 << 48) - 1)).max(1);
        Self(u64::from(node) << 48 | boot)
    }

    /// The node it names.
    pub fn node(self) -> u16 {
        (self.0 >> 48) as u16
    }

    /// The boot it names.
    pub fn boot(self) -> u64 {
        self.0 & ((1 << 48) - 1)
    }
}

impl fmt::Display for FenceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node {} boot {} ({:#018x})",
            self.node(),
            self.boot(),
            self.0
        )
    }
}

impl fmt::Debug for FenceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why one reservation command failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriveError {
    /// Reservation Conflict.
    Conflict,
    /// The drive did not answer (pulled, its port down, its controller failed).
    Unreachable(String),
    /// Another status.
    Failed(String),
}

/// A drive's reservation state as its Reservation Report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DriveKeys {
    /// The reservation type held (`None`: no reservation).
    pub rtype: Option<ResvType>,
    /// Registered keys, and whether each holds the reservation.
    pub keys: Vec<(FenceKey, bool)>,
}

impl DriveKeys {
    /// Whether `key` is registered.
    pub fn has(&self, key: FenceKey) -> bool {
        self.keys.iter().any(|(k, _)| *k == key)
    }
}

/// What fencing needs of a drive.
pub trait Reservations {
    /// The drive's name (fencing order is by name).
    fn name(&self) -> &str;
    /// Reservation Register: `key` for this host, replacing whatever key it had (IEKEY).
    fn register(&mut self, key: FenceKey) -> Result<(), DriveError>;
    /// Reservation Acquire of [`FENCE_TYPE`] with `key`.
    fn acquire(&mut self, key: FenceKey) -> Result<(), DriveError>;
    /// Reservation Acquire, Preempt and Abort: `victim`'s registration goes.
    fn preempt_abort(&mut self, mine: FenceKey, victim: FenceKey) -> Result<(), DriveError>;
    /// Reservation Report.
    fn report(&mut self) -> Result<DriveKeys, DriveError>;
}

/// Why joining or fencing stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// Our own key is gone from a drive: the peer fenced us first. Stop serving at once.
    #[error("drive {drive}: this node's key ({key}) is not registered: it was fenced by its peer")]
    Fenced {
        /// The drive.
        drive: String,
        /// Our key.
        key: FenceKey,
    },
    /// A drive cannot be reached or refused: fencing is incomplete, so no takeover.
    #[error("drive {drive} cannot be fenced: {why}")]
    Unreachable {
        /// The drive.
        drive: String,
        /// What happened.
        why: String,
    },
}

/// One fencing step per drive, reported for the closing figures and `cluster status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The victim's key was preempted here.
    Preempted,
    /// The victim was not registered here any more (fenced before).
    AlreadyGone,
    /// Unreachable, and holding no current data of any pool (a failed or replaced member, a
    /// free drive): nothing read later comes from it, so it needs no fence.
    Skipped,
}

/// The drives of one node, in fencing order, and its key.
#[derive(Debug)]
pub struct Fence<D> {
    drives: Vec<D>,
    key: FenceKey,
}

impl<D: Reservations> Fence<D> {
    /// Fencing over `drives` with `key` (the drives are put in name order).
    pub fn new(mut drives: Vec<D>, key: FenceKey) -> Self {
        drives.sort_by(|a, b| a.name().cmp(b.name()));
        Self { drives, key }
    }

    /// This node's key.
    pub fn key(&self) -> FenceKey {
        self.key
    }

    /// Joins: registers this node's key on every drive (replacing a key of an earlier boot)
    /// and creates the reservation where there is none. Every drive or none: the first that
    /// fails stops the join.
    pub fn join(&mut self) -> Result<(), FenceError> {
        let key = self.key;
        for d in &mut self.drives {
            d.register(key)
                .map_err(|e| unreachable(d.name(), "register", e))?;
            let keys = d.report().map_err(|e| unreachable(d.name(), "report", e))?;
            if !keys.has(key) {
                return Err(FenceError::Unreachable {
                    drive: d.name().to_owned(),
                    why: "registered, but the report does not list the key".into(),
                });
            }
            if keys.rtype.is_none() {
                match d.acquire(key) {
                    Ok(()) => {}
                    // The peer created it between our report and our acquire.
                    Err(DriveError::Conflict) => {}
                    Err(e) => return Err(unreachable(d.name(), "acquire", e)),
                }
            }
            tracing::info!(drive = d.name(), %key, "registered");
        }
        Ok(())
    }

    /// Fences `victim` off every drive, in order. Stops at the first drive where this node
    /// turns out fenced itself, or that cannot be reached.
    pub fn fence(&mut self, victim: FenceKey) -> Result<Vec<Step>, FenceError> {
        self.fence_skipping(victim, |_| false)
    }

    /// [`Fence::fence`], except that a drive that cannot be reached and for which `skip(name)`
    /// says it holds no current pool data is passed over ([`Step::Skipped`]) instead of
    /// stopping the fence.
    pub fn fence_skipping(
        &mut self,
        victim: FenceKey,
        skip: impl Fn(&str) -> bool,
    ) -> Result<Vec<Step>, FenceError> {
        let mine = self.key;
        let mut steps = Vec::with_capacity(self.drives.len());
        for d in &mut self.drives {
            let step = match Self::fence_one(d, mine, victim) {
                Err(FenceError::Unreachable { drive, why }) if skip(&drive) => {
                    tracing::warn!(drive, why, %victim, "not fenced: unreachable, and it holds no current pool data");
                    Step::Skipped
                }
                Err(e) => return Err(e),
                Ok(step) => step,
            };
            tracing::info!(drive = d.name(), %victim, ?step, "fenced");
            steps.push(step);
        }
        Ok(steps)
    }

    fn fence_one(d: &mut D, mine: FenceKey, victim: FenceKey) -> Result<Step, FenceError> {
        Ok({
            match d.preempt_abort(mine, victim) {
                Ok(()) => Step::Preempted,
                Err(DriveError::Conflict) => {
                    // Either our key is gone (we lost) or the victim's is (fenced before).
                    let keys = d.report().map_err(|e| unreachable(d.name(), "report", e))?;
                    if !keys.has(mine) {
                        tracing::error!(drive = d.name(), key = %mine, "fenced by the peer");
                        return Err(FenceError::Fenced {
                            drive: d.name().to_owned(),
                            key: mine,
                        });
                    }
                    if keys.has(victim) {
                        return Err(FenceError::Unreachable {
                            drive: d.name().to_owned(),
                            why: format!(
                                "preempting {victim} conflicts, yet both keys are registered"
                            ),
                        });
                    }
                    Step::AlreadyGone
                }
                Err(e) => return Err(unreachable(d.name(), "preempt", e)),
            }
        })
    }

    /// Every drive's keys (a drive that does not answer: its error).
    pub fn keys(&mut self) -> Vec<(String, Result<DriveKeys, DriveError>)> {
        self.drives
            .iter_mut()
            .map(|d| (d.name().to_owned(), d.report()))
            .collect()
    }
}

fn unreachable(drive: &str, what: &str, e: DriveError) -> FenceError {
    FenceError::Unreachable {
        drive: drive.to_owned(),
        why: match e {
            DriveError::Conflict => format!("{what}: reservation conflict"),
            DriveError::Unreachable(why) | DriveError::Failed(why) => format!("{what}: {why}"),
        },
    }
}

/// [`Reservations`] on namespace `nsid` of a drive the user-space driver runs, through I/O
/// queue `qid`.
pub struct NvmeReservations<'a, T: Transport> {
    name: String,
    ctrl: &'a mut Controller<T>,
    qid: u16,
    nsid: u32,
}

impl<T: Transport> fmt::Debug for NvmeReservations<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NvmeReservations")
            .field("name", &self.name)
            .field("qid", &self.qid)
            .field("nsid", &self.nsid)
            .finish_non_exhaustive()
    }
}

impl<'a, T: Transport> NvmeReservations<'a, T> {
    /// Namespace `nsid` of `ctrl`, named `name`, through queue `qid`.
    pub fn new(name: impl Into<String>, ctrl: &'a mut Controller<T>, qid: u16, nsid: u32) -> Self {
        Self {
            name: name.into(),
            ctrl,
            qid,
            nsid,
        }
    }
}

fn drive_error<E: fmt::Display>(r: Result<Result<(), CmdError>, E>) -> Result<(), DriveError> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(CmdError::ReservationConflict)) => Err(DriveError::Conflict),
        Ok(Err(e)) => Err(DriveError::Failed(e.to_string())),
        Err(e) => Err(DriveError::Unreachable(e.to_string())),
    }
}

impl<T: Transport> Reservations for NvmeReservations<'_, T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn register(&mut self, key: FenceKey) -> Result<(), DriveError> {
        let r = Register {
            action: RegisterAction::Replace,
            iekey: true,
            cptpl: Cptpl::NoChange,
            crkey: 0,
            nrkey: key.0,
        };
        // Replace needs an existing registration; a host not registered yet registers.
        match drive_error(self.ctrl.resv_register(self.qid, self.nsid, &r)) {
            Err(DriveError::Conflict) => {
                let r = Register {
                    action: RegisterAction::Register,
                    iekey: false,
                    ..r
                };
                drive_error(self.ctrl.resv_register(self.qid, self.nsid, &r))
            }
            other => other,
        }
    }

    fn acquire(&mut self, key: FenceKey) -> Result<(), DriveError> {
        let a = Acquire {
            action: AcquireAction::Acquire,
            rtype: FENCE_TYPE,
            crkey: key.0,
            prkey: 0,
        };
        drive_error(self.ctrl.resv_acquire(self.qid, self.nsid, &a))
    }

    fn preempt_abort(&mut self, mine: FenceKey, victim: FenceKey) -> Result<(), DriveError> {
        let a = Acquire {
            action: AcquireAction::PreemptAbort,
            rtype: FENCE_TYPE,
            crkey: mine.0,
            prkey: victim.0,
        };
        drive_error(self.ctrl.resv_acquire(self.qid, self.nsid, &a))
    }

    fn report(&mut self) -> Result<DriveKeys, DriveError> {
        let len = STATUS_EXT_HEADER_LEN + 16 * STATUS_EXT_ENTRY_LEN;
        let r = match self.ctrl.resv_report(self.qid, self.nsid, len) {
            Ok(Ok(r)) => r,
            Ok(Err(CmdError::ReservationConflict)) => return Err(DriveError::Conflict),
            Ok(Err(e)) => return Err(DriveError::Failed(e.to_string())),
            Err(e) => return Err(DriveError::Unreachable(e.to_string())),
        };
        parse_report(&r).ok_or_else(|| DriveError::Failed("short reservation report".into()))
    }
}

/// Decodes a Reservation Report (extended data structure, NVMe Base Specification: header of
/// 64 bytes with the generation at 3:0, RTYPE at 4, the number of registrants at 6:5; then 64
/// bytes per registrant: controller id 1:0, RCSTS bit 0 (holds) at 2, key at 15:8).
pub fn parse_report(r: &[u8]) -> Option<DriveKeys> {
    let header = r.get(..STATUS_EXT_HEADER_LEN)?;
    let n = usize::from(u16::from_le_bytes([header[5], header[6]]));
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let at = STATUS_EXT_HEADER_LEN + STATUS_EXT_ENTRY_LEN * i;
        let Some(e) = r.get(at..at + STATUS_EXT_ENTRY_LEN) else {
            break;
        };
        let mut k = [0u8; 8];
        k.copy_from_slice(&e[8..16]);
        keys.push((FenceKey(u64::from_le_bytes(k)), e[2] & 1 != 0));
    }
    Some(DriveKeys {
        rtype: ResvType::from_u8(header[4]),
        keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_node_and_boot() {
        let k = FenceKey::new(2, 7);
        assert_eq!(k.0, 0x0002_0000_0000_0007);
        assert_eq!((k.node(), k.boot()), (2, 7));
        assert_eq!(FenceKey::new(1, 0).boot(), 1, "never the zero key");
        assert_ne!(FenceKey::new(1, 1), FenceKey::new(2, 1));
    }
}
