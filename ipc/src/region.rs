//! Shared memory regions: memfd-backed, sealed against resizing, with a validated header.
//!
//! A region is created by one process (the supervisor), which writes its header once, seals the
//! memfd (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) and hands the fd to the processes that
//! attach it. Sealing is what makes attaching safe: a peer cannot truncate the file under a
//! mapping and turn our next access into `SIGBUS`.
//!
//! The header is `#[repr(C)]` and is copied out of shared memory with a volatile read before it is
//! validated, so a scribbling peer can make validation fail but never make us read a torn value
//! twice. Nothing in this module hands out a Rust reference to shared bytes other than atomics.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::stat::fstat;

/// Magic number at offset 0 of every duplex region: "DUPLXSHM" little-endian.
pub const REGION_MAGIC: u64 = u64::from_le_bytes(*b"DUPLXSHM");
/// Version of the region header and of the layouts defined in this crate.
pub const REGION_VERSION: u32 = 1;
/// Size of [`RegionHeader`]; layouts place their own data after it.
pub const HEADER_SIZE: usize = std::mem::size_of::<RegionHeader>();
/// Number of kind-specific parameters stored in the header.
pub const PARAM_COUNT: usize = 5;

/// What a region holds. Attaching checks it, so a pool fd cannot be attached as a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RegionKind {
    /// An SPSC descriptor ring (see [`crate::ring`]).
    Ring = 1,
    /// A buffer pool (see [`crate::pool`]).
    Pool = 2,
    /// Free-form shared state (heartbeat counters, test ledgers).
    Plain = 3,
}

impl RegionKind {
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Ring),
            2 => Some(Self::Pool),
            3 => Some(Self::Plain),
            _ => None,
        }
    }
}

/// The header at offset 0 of every region. Written once by the creator before the fd is shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct RegionHeader {
    /// [`REGION_MAGIC`].
    pub magic: u64,
    /// [`REGION_VERSION`].
    pub version: u32,
    /// A [`RegionKind`] as `u32`.
    pub kind: u32,
    /// Total bytes the layout occupies; must equal the memfd's size.
    pub layout_size: u64,
    /// Kind-specific parameters (ring capacity, descriptor size, chunk size, ...).
    pub params: [u64; PARAM_COUNT],
}

const _: () = assert!(std::mem::size_of::<RegionHeader>() == 64);

/// Errors creating or attaching a region.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// A system call failed.
    #[error("Shared region {what} failed: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// Mapping the memfd failed.
    #[error("Mapping shared region failed: {0}")]
    Map(#[source] std::io::Error),
    /// The fd is not a sealable memfd (a regular file, a socket, a pipe...).
    #[error("Fd is not a memfd shared region (F_GET_SEALS failed: {0})")]
    NotMemfd(#[source] nix::Error),
    /// The memfd is missing the seals that make mapping it safe.
    #[error("Shared region is not sealed against resizing (seals {0:#x})")]
    NotSealed(i32),
    /// The file is smaller than the header or than the layout the header claims.
    #[error("Shared region is truncated: {actual} bytes, need {needed}")]
    Truncated {
        /// Bytes in the file.
        actual: u64,
        /// Bytes needed.
        needed: u64,
    },
    /// Wrong magic number: not a duplex region.
    #[error("Shared region has wrong magic {0:#018x}: not a duplex region")]
    BadMagic(u64),
    /// A region of another layout version.
    #[error("Shared region has version {found}, this build understands {expected}")]
    BadVersion {
        /// Version in the header.
        found: u32,
        /// [`REGION_VERSION`].
        expected: u32,
    },
    /// A region of another kind.
    #[error("Shared region is of kind {found}, expected {expected:?}")]
    WrongKind {
        /// Kind number in the header.
        found: u32,
        /// Kind asked for.
        expected: RegionKind,
    },
    /// Header's layout size does not match the file size.
    #[error("Shared region header claims {claimed} bytes but the memfd has {actual}")]
    SizeMismatch {
        /// `layout_size` from the header.
        claimed: u64,
        /// The memfd's size.
        actual: u64,
    },
    /// The kind-specific layout parameters are inconsistent.
    #[error("Shared region layout is invalid: {0}")]
    BadLayout(String),
}

type Result<T> = std::result::Result<T, RegionError>;

const REQUIRED_SEALS: SealFlag = SealFlag::F_SEAL_SHRINK
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_SEAL);

/// A mapped, validated shared memory region.
#[derive(Debug)]
pub struct Region {
    map: MmapRaw,
    fd: OwnedFd,
    header: RegionHeader,
}

impl Region {
    /// Creates a memfd of `len` bytes (rounded up to a page), writes the header and seals it.
    ///
    /// `name` shows in `/proc/PID/fd` and `/proc/PID/maps` (as `memfd:NAME`).
    pub fn create(
        name: &str,
        kind: RegionKind,
        len: usize,
        params: [u64; PARAM_COUNT],
    ) -> Result<Self> {
        if len < HEADER_SIZE {
            return Err(RegionError::BadLayout(format!(
                "length {len} is smaller than the header"
            )));
        }
        let page = page_size();
        let len = len.div_ceil(page) * page;
        let cname = CString::new(format!("duplex:{name}")).map_err(|_| {
            RegionError::BadLayout(format!("region name {name:?} contains a NUL byte"))
        })?;
        let fd = memfd_create(
            &cname,
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .map_err(|source| RegionError::Sys {
            what: "memfd_create",
            source,
        })?;
        let file = File::from(fd);
        file.set_len(len as u64).map_err(RegionError::Map)?;
        let fd = OwnedFd::from(file);
        fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(REQUIRED_SEALS)).map_err(|source| {
            RegionError::Sys {
                what: "F_ADD_SEALS",
                source,
            }
        })?;
        let map = map_fd(&fd, len)?;
        let header = RegionHeader {
            magic: REGION_MAGIC,
            version: REGION_VERSION,
            kind: kind as u32,
            layout_size: len as u64,
            params,
        };
        // SAFETY: the mapping is at least HEADER_SIZE bytes long (checked above), page aligned
        // (so aligned for RegionHeader), and nobody else has the fd yet.
        unsafe { std::ptr::write_volatile(map.as_mut_ptr().cast::<RegionHeader>(), header) };
        tracing::debug!(name, ?kind, len, "created shared region");
        Ok(Self { map, fd, header })
    }

    /// Attaches a region from an fd handed over by its creator, validating it.
    ///
    /// Fails with a clear error for a foreign fd (not a memfd), an unsealed or truncated memfd,
    /// wrong magic, version or kind, or a header whose size disagrees with the file.
    pub fn attach(fd: OwnedFd, expected: RegionKind) -> Result<Self> {
        let st = fstat(fd.as_raw_fd()).map_err(|source| RegionError::Sys {
            what: "fstat",
            source,
        })?;
        let actual = u64::try_from(st.st_size).unwrap_or(0);
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).map_err(RegionError::NotMemfd)?;
        if actual < HEADER_SIZE as u64 {
            return Err(RegionError::Truncated {
                actual,
                needed: HEADER_SIZE as u64,
            });
        }
        let seals_flags = SealFlag::from_bits_truncate(seals);
        if !seals_flags.contains(REQUIRED_SEALS) {
            return Err(RegionError::NotSealed(seals));
        }
        let len = usize::try_from(actual)
            .map_err(|_| RegionError::BadLayout(format!("size {actual} does not fit in memory")))?;
        let map = map_fd(&fd, len)?;
        // SAFETY: the mapping is at least HEADER_SIZE bytes (checked) and page aligned. The read is
        // a volatile copy: we never hold a reference to the shared header.
        let header = unsafe { std::ptr::read_volatile(map.as_ptr().cast::<RegionHeader>()) };
        if header.magic != REGION_MAGIC {
            return Err(RegionError::BadMagic(header.magic));
        }
        if header.version != REGION_VERSION {
            return Err(RegionError::BadVersion {
                found: header.version,
                expected: REGION_VERSION,
            });
        }
        if RegionKind::from_u32(header.kind) != Some(expected) {
            return Err(RegionError::WrongKind {
                found: header.kind,
                expected,
            });
        }
        if header.layout_size > actual {
            return Err(RegionError::Truncated {
                actual,
                needed: header.layout_size,
            });
        }
        if header.layout_size != actual {
            return Err(RegionError::SizeMismatch {
                claimed: header.layout_size,
                actual,
            });
        }
        Ok(Self { map, fd, header })
    }

    /// The header as validated at attach (or written at create).
    pub fn header(&self) -> &RegionHeader {
        &self.header
    }

    /// The kind-specific parameters.
    pub fn params(&self) -> [u64; PARAM_COUNT] {
        self.header.params
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: a region holds at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memfd, to hand to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Duplicates the memfd (for handing over while keeping our own).
    pub fn try_clone_fd(&self) -> Result<OwnedFd> {
        self.fd
            .try_clone()
            .map_err(|e| RegionError::Map(std::io::Error::new(e.kind(), format!("dup: {e}"))))
    }

    /// Base address of the mapping. Only for raw-pointer access by this crate.
    pub(crate) fn base(&self) -> NonNull<u8> {
        // A successful mmap never returns null.
        NonNull::new(self.map.as_mut_ptr()).unwrap_or(NonNull::dangling())
    }

    /// Checks that `[offset, offset+len)` lies inside the mapping and is aligned to `align`.
    pub(crate) fn check_range(&self, offset: usize, len: usize, align: usize) -> Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| {
            RegionError::BadLayout(format!("range at {offset} of {len} bytes overflows"))
        })?;
        if end > self.len() || offset % align != 0 {
            return Err(RegionError::BadLayout(format!(
                "range {offset}..{end} (align {align}) is outside the {} byte region",
                self.len()
            )));
        }
        Ok(())
    }

    /// The shared 64-bit word at `offset`.
    ///
    /// Panics if the offset is out of bounds or misaligned: offsets come from layouts validated
    /// at attach, never from a peer.
    pub fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset % 8 == 0 && offset + 8 <= self.len(),
            "atomic_u64 offset {offset} outside region"
        );
        let ptr = self.base().as_ptr().wrapping_add(offset).cast::<u64>();
        // SAFETY: in bounds and 8-byte aligned (asserted; the mapping is page aligned). The memory
        // lives as long as `self` (the mapping is unmapped on drop). Every process accesses this
        // word only through atomics, so the aliasing rules of AtomicU64::from_ptr hold.
        unsafe { AtomicU64::from_ptr(ptr) }
    }

    /// The shared 32-bit word at `offset`. Same rules as [`Region::atomic_u64`].
    pub fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset % 4 == 0 && offset + 4 <= self.len(),
            "atomic_u32 offset {offset} outside region"
        );
        let ptr = self.base().as_ptr().wrapping_add(offset).cast::<u32>();
        // SAFETY: in bounds and 4-byte aligned (asserted), lives as long as `self`, accessed only
        // through atomics by every process.
        unsafe { AtomicU32::from_ptr(ptr) }
    }
}

fn map_fd(fd: &OwnedFd, len: usize) -> Result<MmapRaw> {
    MmapOptions::new()
        .len(len)
        .map_raw(fd.as_raw_fd())
        .map_err(RegionError::Map)
}

/// The system page size.
pub fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|v| usize::try_from(v).ok())
        .unwrap_or(4096)
}

/// Creates an unsealed memfd of `len` bytes with arbitrary content: for tests of attach errors.
#[doc(hidden)]
pub fn raw_memfd_for_tests(len: u64, seal: bool, content: &[u8]) -> std::io::Result<OwnedFd> {
    use std::io::Write;
    let fd = memfd_create(
        c"duplex:test",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    file.write_all(content)?;
    file.set_len(len)?;
    let fd = OwnedFd::from(file);
    if seal {
        fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(REQUIRED_SEALS))?;
    }
    Ok(fd)
}

/// Wraps a raw fd number inherited from a parent (e.g. passed on the command line).
///
/// # Safety
/// `raw` must be an open fd that nothing else in this process owns.
pub unsafe fn owned_from_raw(raw: i32) -> OwnedFd {
    // SAFETY: forwarded to the caller.
    unsafe { OwnedFd::from_raw_fd(raw) }
}
