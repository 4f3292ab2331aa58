//! duplex-drive-sim: the NVMe controller emulation core of a simulated dual-ported drive.
//!
//! [`port`] serves one PCIe NVMe controller per port over vfio-user (one socket each), and
//! [`control`] the control socket (faults, power, presence); the binary `duplex-drive-sim`
//! runs both. Behind them:
//!
//! * [`Drive`]: one namespace (NSID 1) on a backing file, shared by both ports through an
//!   `Arc`: a volatile write cache, the namespace's reservations
//!   ([`duplex_nvme::resv::Reservations`]), injected [`Fault`]s, power and presence.
//! * [`Controller`]: one NVMe over PCIe controller (BAR0 registers, admin and I/O queues in host
//!   memory reached through [`Dma`], PRPs, interrupts as a vector mask in [`Progress`]).
//! * [`prp`]: PRP entries and lists to host memory segments.
//! * [`VecDma`]: host memory in a vector, for tests and fuzzing.
//!
//! # What is modelled
//!
//! NVM Express Base Specification 2.0 and NVM Command Set 1.0, as far as implemented, for a
//! controller reporting version 1.4: the registers CAP (MQES from the configuration, CQR,
//! TO = 1 s, DSTRD 0, NVM command set, 4 KiB pages only), VS, INTMS/INTMC, CC, CSTS, AQA,
//! ASQ, ACQ and the doorbells (see [`ctrl`] for the access rules, reset and shutdown);
//! admin commands Identify (CNS 00h-03h), Create/Delete I/O SQ/CQ, Get Log Page (01h error
//! information, 02h SMART, 03h firmware slot, 05h commands supported and effects, 80h
//! reservation notification), Get/Set Features (01h, 02h, 04h, 05h, 06h, 07h, 08h, 0Bh, 81h,
//! 82h, 83h), Abort, Asynchronous Event Request (error events for invalid doorbell writes,
//! reservation log page events), Keep Alive; I/O commands Read, Write (FUA), Flush (also NSID
//! FFFFFFFFh), Write Zeroes, Dataset Management (Deallocate zeroes the ranges), Compare and
//! the reservation commands Register, Report, Acquire (including Preempt and Abort across
//! ports) and Release, with the reservation access check before every I/O command.
//!
//! The write cache holds acknowledged writes until a Flush, a FUA write (of its own blocks),
//! a shutdown notification, disabling the cache (Set Features 06h) or eviction (oldest block
//! first) writes them to the file; reads see the cache first; a power cut loses it.
//!
//! # Faults
//!
//! [`Fault`] documents each variant's exact behaviour: an error status for commands touching
//! an LBA range, added latency, stalls, a torn write that cuts the power, a flush that lies,
//! bit flips on reads. [`Drive::power_cut`] / [`Drive::power_on`] model power loss;
//! [`Drive::set_present`] freezes both ports.
//!
//! # Choices where the specification leaves room
//!
//! * Reservation Register, Acquire and Release from a controller whose host identifier is not
//!   set (all zero) fail with Command Sequence Error; Reservation Report works without one.
//!   Changing the host identifier of a host that is a registrant is Command Sequence Error.
//!   Get Features Host Identifier in the other format (EXHID) than it was set is Host
//!   Identifier Inconsistent Format.
//! * A host identifier is per controller; two controllers with the same identifier are the same
//!   host for reservations (notifications and Preempt and Abort reach both).
//! * Preempt and Abort marks the preempted hosts' delayed commands on every controller aborted
//!   before the Acquire completes: they never execute; the issuing controller posts its own
//!   aborted completions before the Acquire's, the other port posts its at its next `process`
//!   (its [`Waker`] is called).
//! * Invalid doorbell writes are ignored and raise an Error asynchronous event (see [`ctrl`]).
//! * Features are not saveable; all revert to defaults on a Controller Level Reset, except the
//!   volatile write cache setting, which belongs to the drive (and reverts on power loss).
//!   Reservation Persistence (83h) can only be changed through Reservation Register's CPTPL.
//! * The Number of Queues feature may be set until the first I/O queue is created (then
//!   Command Sequence Error); without it, all `max_queues` pairs are allocated.
//!
//! # Not modelled
//!
//! SGLs, metadata and protection information, more than one namespace or LBA format, namespace
//! management, Format NVM, sanitize, firmware download, power states other than 0, keep alive
//! timeouts (KAS = 0), weighted round robin arbitration, the controller memory buffer, NVM
//! subsystem reset, SMART events, Persist Through Power Loss (reported, never honoured), and
//! PCIe itself (configuration space, MSI-X table: the glue's).

pub mod control;
pub mod ctrl;
pub mod dma;
pub mod drive;
pub mod port;
pub mod prp;

pub use ctrl::{Controller, Progress, RegError, BAR0_SIZE};
pub use dma::{Dma, DmaFault, VecDma};
pub use drive::{
    Drive, DriveConfig, DriveError, Fault, FaultOp, PortWrites, PowerCutReport, PreemptRecord,
    Waker,
};

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the state is plain
/// data, and a panic is already a bug).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[doc(hidden)]
pub mod ratelimit {
    //! Rate limiting for logs a host can trigger repeatedly.

    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

    /// At most N events per wall-clock second.
    #[derive(Debug)]
    pub struct RateLimit {
        second: AtomicU64,
        count: AtomicU32,
    }

    impl Default for RateLimit {
        fn default() -> Self {
            Self::new()
        }
    }

    impl RateLimit {
        /// A limiter that has seen nothing.
        pub const fn new() -> Self {
            Self {
                second: AtomicU64::new(0),
                count: AtomicU32::new(0),
            }
        }

        /// Whether one more event may be logged this second.
        pub fn allow(&self, per_second: u32) -> bool {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let seen = self.second.load(Ordering::Relaxed);
            if seen != now
                && self
                    .second
                    .compare_exchange(seen, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                self.count.store(0, Ordering::Relaxed);
            }
            self.count.fetch_add(1, Ordering::Relaxed) < per_second
        }
    }
}

/// `tracing::$level!(...)` at most `$per_second` times a second from this call site.
#[doc(hidden)]
#[macro_export]
macro_rules! limited {
    ($level:ident, $per_second:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if LIMIT.allow($per_second) {
            tracing::$level!($($arg)+);
        }
    }};
}
