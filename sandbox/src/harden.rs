//! Hardening a service between fork and exec: fds, rlimits, capabilities, namespaces.
//!
//! Everything here that runs in the child ([`harden_child`], [`move_fds_into_place`]) makes raw
//! syscalls on data computed before the fork: no allocation, no locks, nothing that is not
//! async-signal-safe, as the child of a multi-threaded supervisor requires.

use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

use crate::SandboxError;

/// The most fds a [`Hardening`] may hand over (the child stages them in a fixed-size array).
pub const MAX_KEPT_FDS: usize = 64;

/// The first fd number a handed-over fd lands on in the child.
const FIRST_KEPT_FD: RawFd = 3;

/// A Linux capability, by number (`capability.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Capability(u8);

impl Capability {
    /// `CAP_CHOWN`.
    pub const CHOWN: Self = Self(0);
    /// `CAP_DAC_OVERRIDE`.
    pub const DAC_OVERRIDE: Self = Self(1);
    /// `CAP_KILL`.
    pub const KILL: Self = Self(5);
    /// `CAP_SETPCAP`.
    pub const SETPCAP: Self = Self(8);
    /// `CAP_NET_BIND_SERVICE`: bind ports below 1024 (NVMe/TCP's 4420 does not need it).
    pub const NET_BIND_SERVICE: Self = Self(10);
    /// `CAP_NET_ADMIN`.
    pub const NET_ADMIN: Self = Self(12);
    /// `CAP_IPC_LOCK`: lock memory beyond `RLIMIT_MEMLOCK` (DMA buffers).
    pub const IPC_LOCK: Self = Self(14);
    /// `CAP_SYS_RAWIO`.
    pub const SYS_RAWIO: Self = Self(17);
    /// `CAP_SYS_ADMIN`.
    pub const SYS_ADMIN: Self = Self(21);
    /// `CAP_SYS_NICE`.
    pub const SYS_NICE: Self = Self(23);
    /// `CAP_SYS_RESOURCE`.
    pub const SYS_RESOURCE: Self = Self(24);

    /// A capability by its number; `None` past 63.
    pub fn from_raw(n: u8) -> Option<Self> {
        (n < 64).then_some(Self(n))
    }

    /// Its number.
    pub fn raw(self) -> u8 {
        self.0
    }

    fn bit(self) -> u64 {
        1u64 << self.0
    }
}

/// What [`harden_child`] does to a child before it execs a service. Build it before the fork.
///
/// Defaults: no fds kept beyond stdio, every capability dropped, core dumps off
/// (`RLIMIT_CORE` 0), other rlimits inherited, no new mount namespace.
#[derive(Debug, Clone)]
pub struct Hardening {
    keep_fds: Vec<RawFd>,
    keep_caps: u64,
    nofile: Option<u64>,
    core: u64,
    nproc: Option<u64>,
    address_space: Option<u64>,
    memlock: Option<u64>,
    private_mounts: bool,
}

impl Default for Hardening {
    fn default() -> Self {
        Self::new()
    }
}

impl Hardening {
    /// The defaults (see the type's documentation).
    pub fn new() -> Self {
        Self {
            keep_fds: Vec::new(),
            keep_caps: 0,
            nofile: None,
            core: 0,
            nproc: None,
            address_space: None,
            memlock: None,
            private_mounts: false,
        }
    }

    /// The fds to hand over, in order: the first becomes fd 3 in the service, the next fd 4, and
    /// so on. Every other fd above 2 is closed at exec. Numbers must be 3 or more (stdio is
    /// `Command`'s business) and at most [`MAX_KEPT_FDS`] of them. Repeats are allowed.
    pub fn keep_fds(mut self, fds: &[RawFd]) -> Result<Self, SandboxError> {
        if fds.len() > MAX_KEPT_FDS {
            return Err(SandboxError::TooManyFds(fds.len()));
        }
        if let Some(bad) = fds.iter().find(|fd| **fd < FIRST_KEPT_FD) {
            return Err(SandboxError::BadFd(*bad));
        }
        self.keep_fds = fds.to_vec();
        Ok(self)
    }

    /// The capabilities the service keeps (effective, permitted, inheritable, ambient and
    /// bounding); all others are dropped. The supervisor must hold them itself.
    pub fn keep_capabilities(mut self, caps: &[Capability]) -> Self {
        self.keep_caps = caps.iter().fold(0, |acc, c| acc | c.bit());
        self
    }

    /// `RLIMIT_NOFILE` (soft and hard): one more than the highest fd number the service may open.
    pub fn max_open_files(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// `RLIMIT_CORE` in bytes (soft and hard); 0, the default, means no core dumps.
    pub fn max_core_bytes(mut self, n: u64) -> Self {
        self.core = n;
        self
    }

    /// `RLIMIT_NPROC` (soft and hard). Counted per real uid, and not enforced for a process that
    /// keeps `CAP_SYS_RESOURCE` or `CAP_SYS_ADMIN`.
    pub fn max_processes(mut self, n: u64) -> Self {
        self.nproc = Some(n);
        self
    }

    /// `RLIMIT_AS` in bytes (soft and hard).
    pub fn max_address_space(mut self, n: u64) -> Self {
        self.address_space = Some(n);
        self
    }

    /// `RLIMIT_MEMLOCK` in bytes (soft and hard).
    pub fn max_locked_memory(mut self, n: u64) -> Self {
        self.memlock = Some(n);
        self
    }

    /// Whether the child gets its own mount namespace (`unshare(CLONE_NEWNS)`) with every mount
    /// made private (`MS_REC | MS_PRIVATE`), so nothing it mounts or unmounts reaches the host.
    /// Needs `CAP_SYS_ADMIN` in the supervisor; without it [`harden_child`] fails with `EPERM`.
    pub fn private_mounts(mut self, on: bool) -> Self {
        self.private_mounts = on;
        self
    }

    /// The fds to hand over, in order.
    pub fn kept_fds(&self) -> &[RawFd] {
        &self.keep_fds
    }
}

/// Hardens the calling process, a child between fork and exec, as `opts` says. Meant for
/// `std::os::unix::process::CommandExt::pre_exec`:
///
/// ```no_run
/// # use std::os::unix::process::CommandExt;
/// # fn f(region_fd: i32, sock_fd: i32) -> Result<(), Box<dyn std::error::Error>> {
/// let h = duplex_sandbox::Hardening::new()
///     .keep_fds(&[region_fd, sock_fd])?
///     .max_open_files(256);
/// let mut cmd = std::process::Command::new("/usr/libexec/duplex/mgmt");
/// let harden = move || {
///     // SAFETY: pre_exec runs this in the forked child, just before exec.
///     unsafe { duplex_sandbox::harden_child(&h) }
/// };
/// // SAFETY: the closure only calls harden_child, which is async-signal-safe.
/// unsafe { cmd.pre_exec(harden) };
/// let child = cmd.spawn()?;
/// # Ok(()) }
/// ```
///
/// In order: hands over the fds ([`move_fds_into_place`]); enters a mount namespace with private
/// propagation if asked; sets the rlimits; clears the ambient set and drops every capability not
/// kept from the bounding set, then sets effective = permitted = inheritable = the kept set and
/// raises the kept ones as ambient (so they survive the exec for a non-root uid too); sets
/// `PR_SET_NO_NEW_PRIVS` last. The first failure is returned, and `Command::spawn` reports it.
///
/// Without `CAP_SETPCAP` (an unprivileged supervisor) the bounding set cannot be changed and is
/// left alone: the permitted set is still emptied, and `no_new_privs` stops `execve` from granting
/// anything back. Asking to keep a capability the supervisor does not hold fails with `EPERM`.
///
/// # Safety
///
/// Call it only in a forked child that is about to exec (such as inside `pre_exec`): it closes and
/// replaces fds that `OwnedFd`s elsewhere in the process may own.
pub unsafe fn harden_child(opts: &Hardening) -> io::Result<()> {
    // SAFETY: forwarded from this function's contract.
    unsafe { move_fds_into_place(&opts.keep_fds) }?;
    if opts.private_mounts {
        private_mount_namespace()?;
    }
    set_rlimit(libc::RLIMIT_CORE, Some(opts.core))?;
    set_rlimit(libc::RLIMIT_NOFILE, opts.nofile)?;
    set_rlimit(libc::RLIMIT_NPROC, opts.nproc)?;
    set_rlimit(libc::RLIMIT_AS, opts.address_space)?;
    set_rlimit(libc::RLIMIT_MEMLOCK, opts.memlock)?;
    drop_capabilities(opts.keep_caps)?;
    crate::set_no_new_privs()
}

/// Moves `keep[0]` to fd 3, `keep[1]` to fd 4, … and marks every other fd from `3 + keep.len()`
/// up close-on-exec, so that after exec the process holds stdio and exactly the kept fds, in
/// order. The kept fds end up without `FD_CLOEXEC`. Async-signal-safe; at most
/// [`MAX_KEPT_FDS`] fds (`EINVAL` beyond).
///
/// The rest are marked close-on-exec rather than closed because `std::process::Command` reports
/// a failed exec through a close-on-exec pipe whose fd number it chose before the fork. For the
/// same reason, a target slot (3 ..= 2 + `keep.len()`) holding a pipe that is not itself handed
/// over makes this fail with `EBUSY` instead of silently replacing what may be that pipe: call
/// [`reserve_low_fds`] at supervisor start so that the low slots are never free for it.
///
/// # Safety
///
/// Call it only in a forked child that is about to exec: it replaces and closes fds that
/// `OwnedFd`s elsewhere in the process may own.
pub unsafe fn move_fds_into_place(keep: &[RawFd]) -> io::Result<()> {
    let n = keep.len();
    if n > MAX_KEPT_FDS || keep.iter().any(|fd| *fd < FIRST_KEPT_FD) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // `n <= MAX_KEPT_FDS`, so this cannot overflow.
    let end = FIRST_KEPT_FD + n as RawFd;
    for slot in FIRST_KEPT_FD..end {
        if !keep.contains(&slot) && is_pipe(slot) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
    }
    // 1. Copy every kept fd above all sources and all targets: F_DUPFD never replaces an open fd.
    let floor = keep.iter().copied().fold(end, RawFd::max);
    let mut staged = [-1 as RawFd; MAX_KEPT_FDS];
    for (src, dst) in keep.iter().zip(staged.iter_mut()) {
        // SAFETY: F_DUPFD_CLOEXEC takes an integer argument and touches no memory.
        let fd = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, floor) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        *dst = fd;
    }
    // 2. Put them in place. dup3 without O_CLOEXEC leaves the new fd open across exec; the
    //    staged copies are all above `end`, so source and target never coincide.
    for (i, fd) in staged.iter().take(n).enumerate() {
        // `i < n <= MAX_KEPT_FDS`.
        let target = FIRST_KEPT_FD + i as RawFd;
        // SAFETY: dup3 takes integer arguments only; the caller allows fds to be replaced.
        if unsafe { libc::dup3(*fd, target, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    for fd in staged.iter().take(n) {
        // SAFETY: closes a staged copy this function made; nothing else refers to it.
        unsafe { libc::close(*fd) };
    }
    // 3. Everything else closes at exec.
    cloexec_from(end)
}

/// Marks every fd from `first` up close-on-exec.
fn cloexec_from(first: RawFd) -> io::Result<()> {
    // SAFETY: close_range takes integer arguments only; with CLOSE_RANGE_CLOEXEC it closes
    // nothing now, it only sets FD_CLOEXEC.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    // Kernels before 5.11 lack CLOSE_RANGE_CLOEXEC (EINVAL) or close_range (ENOSYS): walk the
    // fd table up to the fd limit instead.
    if !matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
        return Err(err);
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit to the valid pointer given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let last = RawFd::try_from(lim.rlim_cur.min(1 << 20)).unwrap_or(1 << 20);
    for fd in first..last {
        // SAFETY: F_GETFD takes no pointer; an fd that is not open fails with EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 {
            // SAFETY: F_SETFD takes an integer argument only.
            unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        }
    }
    Ok(())
}

fn is_pipe(fd: RawFd) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes one `struct stat` to the valid pointer given.
    let rc = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    st.st_mode & libc::S_IFMT == libc::S_IFIFO
}

/// Fills every free fd slot from 3 up to `2 + count` with `/dev/null` (close-on-exec), so the
/// supervisor never has an fd of its own there that [`move_fds_into_place`] would replace in a
/// child, in particular not `std::process::Command`'s exec-error pipe. Call it once, first thing
/// in the supervisor's `main`, with the most fds any service is handed. The reserved fds stay
/// open for the life of the process. Never replaces an open fd, so it is safe alongside threads.
pub fn reserve_low_fds(count: usize) -> io::Result<()> {
    let end = usize::try_from(FIRST_KEPT_FD)
        .unwrap_or(3)
        .saturating_add(count);
    loop {
        let f = std::fs::File::open("/dev/null")?;
        if usize::try_from(f.as_raw_fd()).unwrap_or(usize::MAX) >= end {
            return Ok(());
        }
        // Deliberately leaked: it holds the slot.
        let _ = f.into_raw_fd();
    }
}

fn private_mount_namespace() -> io::Result<()> {
    // SAFETY: unshare takes integer flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: all pointers are NUL-terminated string literals or null, as mount(2) allows for a
    // propagation change.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_rlimit(resource: libc::__rlimit_resource_t, value: Option<u64>) -> io::Result<()> {
    let Some(v) = value else { return Ok(()) };
    let lim = libc::rlimit {
        rlim_cur: v,
        rlim_max: v,
    };
    // SAFETY: setrlimit reads one rlimit from the valid pointer given.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `capget` of the calling thread: (effective, permitted) as 64-bit masks.
fn capget() -> io::Result<(u64, u64)> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget with a version-3 header writes two CapData to the valid array given.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
    ))
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> libc::c_int {
    // SAFETY: every prctl option used here takes integer arguments only.
    unsafe {
        libc::prctl(
            option,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    }
}

fn drop_capabilities(keep: u64) -> io::Result<()> {
    let (effective, permitted) = capget()?;
    if keep & !permitted != 0 {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    // Ambient set: empty it (EINVAL before Linux 4.3, where it does not exist).
    let clear = libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong;
    if prctl(libc::PR_CAP_AMBIENT, clear) != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
    }
    // Bounding set: PR_CAPBSET_READ fails with EINVAL past the last capability the kernel knows.
    let can_drop = effective & Capability::SETPCAP.bit() != 0;
    for cap in 0..64u8 {
        let present = prctl(libc::PR_CAPBSET_READ, cap.into());
        if present < 0 {
            break;
        }
        let drop = present == 1 && keep & (1u64 << cap) == 0 && can_drop;
        if drop && prctl(libc::PR_CAPBSET_DROP, cap.into()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // Effective, permitted, inheritable: exactly the kept set.
    let (lo, hi) = (keep as u32, (keep >> 32) as u32);
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: lo,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: hi,
        },
    ];
    // SAFETY: capset with a version-3 header reads two CapData from the valid array given.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Ambient: the kept ones, so that they survive exec for a non-root uid as well.
    for cap in 0..64u8 {
        if keep & (1u64 << cap) != 0 {
            let raise = libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong;
            // SAFETY: PR_CAP_AMBIENT takes integer arguments only.
            let rc =
                unsafe { libc::prctl(libc::PR_CAP_AMBIENT, raise, libc::c_ulong::from(cap), 0, 0) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}
