//! Memory-backed volumes (tmpfs, ramfs) mapped into the datapath: a read or write is one copy
//! between the mapping and the pool chunks, with no system call and no page-cache lookup per
//! I/O (what SPDK's malloc bdev does with its RAM). Through the io_uring, such a file would send
//! every I/O to a kernel worker thread (these file systems cannot take `IOCB_NOWAIT`); through
//! `preadv2`, every I/O pays a system call and a page-cache walk.
//!
//! The second module of the crate allowed `unsafe` (after `uring`): the mapping is shared memory
//! other processes may write (the file is the file), so it is only ever touched through raw
//! pointers, never a Rust reference, like the pool.
//!
//! # A file that shrinks under the mapping
//!
//! Someone may truncate the backing file while it is mapped; touching a page past the new end
//! raises `SIGBUS`. The datapath catches it: the handler finds the mapping holding the faulting
//! address, puts an anonymous page there (so the interrupted copy can finish) and marks the
//! mapping *broken*. The transfer that touched it fails with `EIO`, and so does every later one
//! on that volume: from then on the mapping is no longer the file. A `SIGBUS` at any other
//! address is not ours and aborts the process. The handler needs `mmap` (in the common policy)
//! and `rt_sigreturn` (datapath.policy); it is installed before the sandbox is entered, when the
//! first volume is mapped.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

use crate::uring::{Dir, Iov};

/// Mappings the `SIGBUS` handler can attribute a fault to (one per memory-backed volume).
const SLOTS: usize = 64;
/// The granule the handler replaces: the base page size of x86_64 and aarch64 Linux.
const PAGE: usize = 4096;

/// A mapping the handler knows: `[base, base + len)`, and whether a fault broke it.
struct Slot {
    base: AtomicUsize,
    len: AtomicUsize,
    broken: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    broken: AtomicBool::new(false),
};
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static HANDLER: Once = Once::new();
static HANDLER_OK: AtomicBool = AtomicBool::new(false);

/// Errors mapping a volume.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The kernel refused.
    #[error("{what} failed: {source}")]
    Sys {
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Every slot of the fault table is in use.
    #[error("more than {SLOTS} memory-backed volumes are mapped")]
    TooMany,
    /// Nothing to map.
    #[error("an empty volume cannot be mapped")]
    Empty,
    /// More bytes than the address space holds.
    #[error("{0} bytes do not fit the address space")]
    TooLarge(u64),
}

/// A memory-backed volume's file, mapped shared and writable.
#[derive(Debug)]
pub struct MappedFile {
    base: usize,
    len: usize,
    slot: usize,
}

impl MappedFile {
    /// Maps the first `len` bytes of `fd` (the caller checked the file holds them).
    pub fn map(fd: BorrowedFd<'_>, len: u64) -> Result<Self, MapError> {
        if len == 0 {
            return Err(MapError::Empty);
        }
        let len = usize::try_from(len).map_err(|_| MapError::TooLarge(len))?;
        HANDLER.call_once(|| HANDLER_OK.store(install_handler().is_ok(), Ordering::Release));
        if !HANDLER_OK.load(Ordering::Acquire) {
            return Err(MapError::Sys {
                what: "sigaction(SIGBUS)",
                source: std::io::Error::other("the SIGBUS handler could not be installed"),
            });
        }
        let len = len.div_ceil(PAGE) * PAGE;
        // SAFETY: a fresh shared mapping of a file we hold; the kernel picks the address, so no
        // existing memory is affected. The mapping is only ever touched through raw pointers.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MapError::Sys {
                what: "mmap",
                source: std::io::Error::last_os_error(),
            });
        }
        let base = p as usize;
        for (slot, s) in TABLE.iter().enumerate() {
            if s.base
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                // Reserved (base = MAX matches no address); publish len before base.
                s.len.store(len, Ordering::Relaxed);
                s.broken.store(false, Ordering::Relaxed);
                s.base.store(base, Ordering::Release);
                return Ok(Self { base, len, slot });
            }
        }
        // SAFETY: unmapping the mapping made above, which nothing else knows of.
        unsafe { libc::munmap(p, len) };
        Err(MapError::TooMany)
    }

    /// Copies between the file at `offset` and the memory the `iovs` name, in direction `dir`
    /// (a read copies from the file). Returns what the io_uring would: the bytes moved, or a
    /// negated errno (`EINVAL` past the mapping, `EIO` once a fault broke it).
    ///
    /// # Safety
    ///
    /// Every iovec must name memory valid for reads (writes to the file) or writes (reads from
    /// it) of its length for the whole call, that no Rust reference points at (pool chunks
    /// the caller holds, or the ring's zero buffer).
    pub(crate) unsafe fn copy(&self, dir: Dir, offset: u64, iovs: &[Iov]) -> i32 {
        let total: usize = iovs.iter().map(|v| v.len).sum();
        let Ok(mut at) = usize::try_from(offset) else {
            return -libc::EINVAL;
        };
        if at.checked_add(total).is_none_or(|end| end > self.len) {
            return -libc::EINVAL;
        }
        if self.broken() {
            return -libc::EIO;
        }
        for v in iovs {
            let file = (self.base + at) as *mut u8;
            let mem = std::ptr::with_exposed_provenance_mut::<u8>(v.base);
            match dir {
                // SAFETY: [at, at + len) lies inside the mapping (checked above), which lives
                // as long as self; the iovec's memory is valid per the caller's contract. The
                // two never overlap (pool memory is not the file's mapping). A fault on a
                // truncated page is repaired by the handler and the copy resumes.
                Dir::Read => unsafe { std::ptr::copy_nonoverlapping(file, mem, v.len) },
                // SAFETY: as above, the other way.
                Dir::Write { .. } => unsafe { std::ptr::copy_nonoverlapping(mem, file, v.len) },
            }
            at += v.len;
        }
        if self.broken() {
            return -libc::EIO;
        }
        i32::try_from(total).unwrap_or(i32::MAX)
    }

    /// A fault on a shrunken file replaced part of the mapping: it is no longer the file.
    pub fn broken(&self) -> bool {
        TABLE[self.slot].broken.load(Ordering::Acquire)
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // Forget the slot first: a fault on this range is no longer ours to repair.
        TABLE[self.slot].base.store(usize::MAX, Ordering::Release);
        // SAFETY: the mapping made by `map`; no copy is running (copy borrows self).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
        TABLE[self.slot].len.store(0, Ordering::Relaxed);
        TABLE[self.slot].base.store(0, Ordering::Release);
    }
}

fn install_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigbus as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that only reads atomics, calls mmap and abort, all
    // async-signal-safe; the old action is not needed.
    let r = unsafe { libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo.
    let info = unsafe { &*info };
    // SAFETY: si_addr reads the union field that SIGBUS defines.
    let addr = unsafe { info.si_addr() } as usize;
    for s in &TABLE {
        let base = s.base.load(Ordering::Acquire);
        if base == 0 || base == usize::MAX || addr < base {
            continue;
        }
        if addr - base >= s.len.load(Ordering::Relaxed) {
            continue;
        }
        let page = addr & !(PAGE - 1);
        // SAFETY: replaces one page inside one of our own mappings (found above) with fresh
        // anonymous memory; nothing holds a reference into it (copies use raw pointers).
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            // SAFETY: abort is async-signal-safe.
            unsafe { libc::abort() };
        }
        s.broken.store(true, Ordering::Release);
        return;
    }
    // Not a mapping of ours: a real bug. Die loudly rather than return into the same fault.
    // SAFETY: abort is async-signal-safe.
    unsafe { libc::abort() };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;

    /// `MappedFile::copy` over plain buffers.
    fn copy(m: &MappedFile, dir: Dir, offset: u64, bufs: &mut [&mut [u8]]) -> i32 {
        let iovs: Vec<Iov> = bufs
            .iter_mut()
            .map(|b| Iov {
                base: b.as_mut_ptr().expose_provenance(),
                len: b.len(),
            })
            .collect();
        // SAFETY: the buffers are exclusively borrowed for the whole call, so valid for reads
        // and writes of their lengths and referenced by nothing else meanwhile.
        unsafe { m.copy(dir, offset, &iovs) }
    }

    fn shm_file(len: u64) -> std::fs::File {
        let f = tempfile::tempfile_in("/dev/shm").expect("tmpfs file");
        f.set_len(len).expect("size");
        f
    }

    #[test]
    fn copies_move_bytes_both_ways_and_stay_inside_the_file() {
        let mut f = shm_file(64 * 1024);
        let m = MappedFile::map(f.as_fd(), 64 * 1024).expect("map");
        let (mut a, mut b) = (vec![0xA5u8; 4096], vec![0x5Au8; 512]);
        let write = Dir::Write { dsync: false };
        assert_eq!(copy(&m, write, 8192, &mut [&mut a, &mut b]), 4608);
        let mut back = vec![0u8; 4608];
        f.seek(SeekFrom::Start(8192)).expect("seek");
        f.read_exact(&mut back).expect("read back");
        assert!(back[..4096].iter().all(|&x| x == 0xA5));
        assert!(back[4096..].iter().all(|&x| x == 0x5A));
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.write_all(&[9; 100]).expect("write");
        let mut c = vec![0u8; 100];
        assert_eq!(copy(&m, Dir::Read, 0, &mut [&mut c]), 100);
        assert!(c.iter().all(|&x| x == 9));
        // Refused before any byte moves.
        assert_eq!(
            copy(&m, Dir::Read, 64 * 1024 - 50, &mut [&mut c]),
            -libc::EINVAL
        );
        assert_eq!(copy(&m, Dir::Read, u64::MAX, &mut [&mut c]), -libc::EINVAL);
    }

    #[test]
    fn a_file_truncated_under_the_mapping_fails_io_instead_of_killing_the_process() {
        let f = shm_file(64 * 1024);
        let m = MappedFile::map(f.as_fd(), 64 * 1024).expect("map");
        let mut buf = vec![0u8; 4096];
        assert_eq!(copy(&m, Dir::Read, 32 * 1024, &mut [&mut buf]), 4096);
        assert!(!m.broken());
        f.set_len(4096).expect("truncate");
        assert_eq!(copy(&m, Dir::Read, 32 * 1024, &mut [&mut buf]), -libc::EIO);
        assert!(m.broken());
        // Every later transfer fails too, even inside what is left of the file.
        assert_eq!(copy(&m, Dir::Read, 0, &mut [&mut buf]), -libc::EIO);
        // Another mapping is untouched.
        let g = shm_file(8192);
        let n = MappedFile::map(g.as_fd(), 8192).expect("map");
        assert_eq!(copy(&n, Dir::Read, 0, &mut [&mut buf]), 4096);
        assert!(!n.broken());
    }
}
