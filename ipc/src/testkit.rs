//! Shared pieces of the multi-process tests and benchmarks: handing fds to a child process, and
//! the ledger region the restart test's processes record into. Not an API for services.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use crate::region::{Region, RegionError, RegionKind};

/// Spawns `cmd` with `fds` inherited (close-on-exec cleared in the child only) and an empty signal
/// mask.
pub fn spawn_with_fds(cmd: &mut Command, fds: &[BorrowedFd<'_>]) -> std::io::Result<Child> {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // Built before the fork: the child must not allocate.
    let no_signals = nix::sys::signal::SigSet::empty();
    let clear_cloexec = move || -> std::io::Result<()> {
        // A parent that blocks signals (duplexd reads its signals from a signalfd) would pass
        // the mask on: a service would then ignore SIGTERM.
        // SAFETY: pthread_sigmask with a valid, initialised set; async-signal-safe.
        if unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, no_signals.as_ref(), std::ptr::null_mut())
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        for &fd in &raw {
            // SAFETY: fcntl(F_SETFD) on an fd number touches no memory of ours.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec and calls only fcntl, which is
    // async-signal-safe; it allocates nothing (the Vec was built before the fork).
    unsafe { cmd.pre_exec(clear_cloexec) };
    cmd.spawn()
}

/// Takes ownership of an fd number inherited from the parent and named on the command line.
pub fn inherited_fd(text: &str) -> Result<OwnedFd, String> {
    let raw: i32 = text
        .parse()
        .map_err(|_| format!("bad fd number {text:?}"))?;
    if raw < 3 {
        return Err(format!("fd {raw} is a standard stream"));
    }
    if nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        return Err(format!("fd {raw} is not open"));
    }
    // SAFETY: the parent handed this fd number to us alone and it is open (checked); nothing
    // else in this process owns it.
    Ok(unsafe { crate::region::owned_from_raw(raw) })
}

/// The ledger of the restart test: where the consumer records what it applied and the producer
/// what it resubmitted, so the tally survives the processes that wrote it.
#[derive(Debug)]
pub struct Ledger {
    region: Region,
    count: u64,
}

const PROGRESS: usize = 128;
const CORRUPT: usize = 136;
const RESTARTS_SEEN: usize = 144;
const APPLIED: usize = 4096;

impl Ledger {
    /// Creates a ledger for `count` sequence numbers.
    pub fn create(count: u64) -> Result<Self, RegionError> {
        let len = APPLIED + 8 * count as usize;
        let region = Region::create("ledger", RegionKind::Plain, len, [count, 0, 0, 0, 0])?;
        Ok(Self { region, count })
    }

    /// Attaches a ledger.
    pub fn attach(fd: OwnedFd) -> Result<Self, RegionError> {
        let region = Region::attach(fd, RegionKind::Plain)?;
        let count = region.params()[0];
        region.check_range(APPLIED, 8 * count as usize, 8)?;
        Ok(Self { region, count })
    }

    /// The region.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Number of sequence numbers.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Completed sequence numbers, as counted by the producer.
    pub fn progress(&self) -> &std::sync::atomic::AtomicU64 {
        self.region.atomic_u64(PROGRESS)
    }

    /// Corrupt payloads or buffer states seen by a consumer.
    pub fn corrupt(&self) -> &std::sync::atomic::AtomicU64 {
        self.region.atomic_u64(CORRUPT)
    }

    /// Consumer restarts the producer noticed.
    pub fn restarts_seen(&self) -> &std::sync::atomic::AtomicU64 {
        self.region.atomic_u64(RESTARTS_SEEN)
    }

    /// How many times `seq` was applied by a consumer.
    pub fn applied(&self, seq: u64) -> &std::sync::atomic::AtomicU32 {
        self.region
            .atomic_u32(APPLIED + 8 * seq.min(self.count.saturating_sub(1)) as usize)
    }

    /// How many times `seq` was resubmitted by the producer.
    pub fn resubmitted(&self, seq: u64) -> &std::sync::atomic::AtomicU32 {
        self.region
            .atomic_u32(APPLIED + 8 * seq.min(self.count.saturating_sub(1)) as usize + 4)
    }
}

/// The deterministic payload of sequence number `seq` (1..=700 bytes), so a consumer can verify
/// content as well as the checksum.
pub fn payload(seq: u64, out: &mut Vec<u8>) {
    let len = 1 + (splitmix(seq ^ 0x5eed) % 700) as usize;
    out.clear();
    let mut s = seq;
    while out.len() < len {
        s = splitmix(s);
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&s.to_le_bytes()[..take]);
    }
}

/// SplitMix64 step.
pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
