//! The device's view of the memory a vfio-user client shares with `DMA_MAP`.
//!
//! [`DmaTable`] maps each shared fd `MAP_SHARED` and copies bytes in and out of it. The client
//! may write that memory at any moment, from another process, so no Rust reference
//! (`&[u8]`, `&mut [u8]`) ever points into it: every access is one `copy_nonoverlapping` between
//! the mapping and the caller's own buffer, through raw pointers. Whatever the memory holds is
//! untrusted bytes to the caller.
//!
//! An access may span adjacent mappings (mapped one after the other in DMA address space); it
//! is checked whole (every byte mapped, with the permission it needs) before any byte is
//! copied.
//!
//! A mapping must lie within the file as it is when mapped (checked with `fstat`): touching a
//! page past a file's end raises `SIGBUS`. A client that shrinks the file afterwards could still
//! cause that; duplex's clients share memfds sealed against shrinking.
//!
//! This is the only module of the crate with `unsafe` code.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::ptr::{self, NonNull};

use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};
use thiserror::Error;
use tracing::warn;

use super::proto::PAGE_SIZE;
use super::Errno;

/// Why a DMA mapping or access was refused.
#[derive(Debug, Error)]
pub enum DmaError {
    /// A mapping of zero bytes.
    #[error("DMA mapping at iova {iova:#x} is empty")]
    Empty {
        /// Its DMA address.
        iova: u64,
    },
    /// A mapping that grants neither read nor write.
    #[error("DMA mapping at iova {iova:#x} grants neither read nor write")]
    NoAccess {
        /// Its DMA address.
        iova: u64,
    },
    /// Address, size or file offset not a multiple of the page size.
    #[error("DMA mapping at iova {iova:#x} of {size:#x} bytes from file offset {file_offset:#x} is not aligned to {PAGE_SIZE} bytes")]
    Unaligned {
        /// Its DMA address.
        iova: u64,
        /// Its size.
        size: u64,
        /// Its offset in the file.
        file_offset: u64,
    },
    /// The mapping's end overflows the DMA address space, the file offsets or this process's
    /// address space.
    #[error("DMA mapping at iova {iova:#x} of {size:#x} bytes from file offset {file_offset:#x} overflows")]
    Overflow {
        /// Its DMA address.
        iova: u64,
        /// Its size.
        size: u64,
        /// Its offset in the file.
        file_offset: u64,
    },
    /// The mapping overlaps one already in the table.
    #[error("DMA mapping at iova {iova:#x} of {size:#x} bytes overlaps the one at {existing:#x}")]
    Overlap {
        /// Its DMA address.
        iova: u64,
        /// Its size.
        size: u64,
        /// The DMA address of the mapping it overlaps.
        existing: u64,
    },
    /// `fstat` of the shared fd failed.
    #[error("fstat of a DMA fd failed: {0}")]
    Stat(io::Error),
    /// The mapping reaches past the end of the shared file.
    #[error("DMA mapping of {size:#x} bytes from file offset {file_offset:#x} goes past the end of the {file_size}-byte file")]
    BeyondFile {
        /// Its offset in the file.
        file_offset: u64,
        /// Its size.
        size: u64,
        /// The file's size.
        file_size: u64,
    },
    /// `mmap` of the shared fd failed.
    #[error("mmap of a DMA fd failed: {0}")]
    Mmap(io::Error),
    /// `unmap` of a range that is not exactly one mapping.
    #[error("no DMA mapping is exactly iova {iova:#x} of {size:#x} bytes")]
    NoSuchMapping {
        /// The DMA address given.
        iova: u64,
        /// The size given.
        size: u64,
    },
    /// An access touching DMA addresses that are not mapped.
    #[error("DMA access of {len} bytes at iova {iova:#x} touches unmapped memory")]
    NotMapped {
        /// Where the access starts.
        iova: u64,
        /// Its length.
        len: usize,
    },
    /// An access the mapping's permissions do not allow.
    #[error("DMA {} of {len} bytes at iova {iova:#x} is not permitted by its mapping", if *.write { "write" } else { "read" })]
    Permission {
        /// Where the access starts.
        iova: u64,
        /// Its length.
        len: usize,
        /// Whether it was a write.
        write: bool,
    },
}

impl DmaError {
    /// The errno to answer a client with: `EEXIST` for an overlap (as the protocol asks),
    /// `EFAULT` for accesses, the system's errno for `fstat`/`mmap` failures, `EINVAL` for the
    /// rest.
    pub fn errno(&self) -> Errno {
        match self {
            DmaError::Overlap { .. } => Errno::EEXIST,
            DmaError::NotMapped { .. } | DmaError::Permission { .. } => Errno::EFAULT,
            DmaError::Stat(error) | DmaError::Mmap(error) => errno_of(error),
            _ => Errno::EINVAL,
        }
    }
}

fn errno_of(error: &io::Error) -> Errno {
    error
        .raw_os_error()
        .and_then(|raw| u32::try_from(raw).ok())
        .map_or(Errno::EIO, Errno)
}

/// One `MAP_SHARED` mapping of a client's fd.
struct Mapping {
    /// Start of the mapping in this process.
    base: NonNull<u8>,
    /// Its length (the DMA size).
    len: usize,
    readable: bool,
    writable: bool,
}

// SAFETY: a `Mapping` owns its mmap: nothing else in this process refers to that memory (no
// reference into it is ever made; only raw-pointer copies while the table is borrowed), and a
// mapping is valid in every thread of the process, so moving it to another thread is sound.
unsafe impl Send for Mapping {}

// SAFETY: shared use only copies bytes through raw pointers to and from memory that another
// process may write at any time anyway; two threads writing the same bytes leave them in an
// unspecified order, exactly as the client's own writes can, and nothing relies on their value.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what `mmap` returned in `DmaTable::map`; this
        // `Mapping` is their only owner and unmaps them once, here; no reference into the
        // memory exists, and no copy is in progress (copies borrow the table, and dropping a
        // mapping needs it mutably).
        let result = unsafe { munmap(self.base.as_ptr().cast(), self.len) };
        if let Err(errno) = result {
            warn!(%errno, len = self.len, "munmap of a DMA mapping failed");
        }
    }
}

/// The DMA memory a client has shared, by DMA address (IOVA).
#[derive(Default)]
pub struct DmaTable {
    /// Mappings by DMA address; they never overlap.
    maps: BTreeMap<u64, Mapping>,
}

impl fmt::Debug for DmaTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.maps.iter().map(|(iova, map)| {
                format!(
                    "{iova:#x}+{:#x} {}{}",
                    map.len,
                    if map.readable { "r" } else { "-" },
                    if map.writable { "w" } else { "-" }
                )
            }))
            .finish()
    }
}

impl DmaTable {
    /// An empty table.
    pub fn new() -> DmaTable {
        DmaTable::default()
    }

    /// How many mappings there are.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// The mappings, as `(iova, size)`, in address order.
    pub fn mappings(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.maps.iter().map(|(&iova, map)| (iova, map.len as u64))
    }

    /// Maps `size` bytes of `fd` from `file_offset` at DMA address `iova`. `readable` and
    /// `writable` are what the device may do with it (`DMA_MAP`'s flags). Refuses an empty,
    /// permissionless, unaligned or overflowing mapping, one overlapping an existing mapping,
    /// and one reaching past the end of the file.
    pub fn map(
        &mut self,
        iova: u64,
        size: u64,
        file_offset: u64,
        readable: bool,
        writable: bool,
        fd: OwnedFd,
    ) -> Result<(), DmaError> {
        if size == 0 {
            return Err(DmaError::Empty { iova });
        }
        if !readable && !writable {
            return Err(DmaError::NoAccess { iova });
        }
        if iova % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || file_offset % PAGE_SIZE != 0 {
            return Err(DmaError::Unaligned {
                iova,
                size,
                file_offset,
            });
        }
        let overflow = DmaError::Overflow {
            iova,
            size,
            file_offset,
        };
        let (Some(end), Some(file_end), Some(len)) = (
            iova.checked_add(size),
            file_offset.checked_add(size),
            usize::try_from(size)
                .ok()
                .filter(|&len| isize::try_from(len).is_ok()),
        ) else {
            return Err(overflow);
        };
        if let Some((&existing, map)) = self.maps.range(..end).next_back() {
            if existing.saturating_add(map.len as u64) > iova {
                return Err(DmaError::Overlap {
                    iova,
                    size,
                    existing,
                });
            }
        }
        let stat = rustix::fs::fstat(&fd).map_err(|errno| DmaError::Stat(errno.into()))?;
        let file_size = u64::try_from(stat.st_size).unwrap_or(0);
        if file_end > file_size {
            return Err(DmaError::BeyondFile {
                file_offset,
                size,
                file_size,
            });
        }
        let mut prot = ProtFlags::empty();
        if readable {
            prot |= ProtFlags::READ;
        }
        if writable {
            prot |= ProtFlags::WRITE;
        }
        // SAFETY: a fresh mapping at an address the kernel picks (null hint, no MAP_FIXED)
        // replaces no existing memory; its length and file range were checked above, and the
        // result is owned by the `Mapping` below, which unmaps it once.
        let base = unsafe {
            mmap(
                ptr::null_mut(),
                len,
                prot,
                MapFlags::SHARED,
                &fd,
                file_offset,
            )
        }
        .map_err(|errno| DmaError::Mmap(errno.into()))?;
        let Some(base) = NonNull::new(base.cast::<u8>()) else {
            return Err(DmaError::Mmap(io::Error::other(
                "mmap returned a null address",
            )));
        };
        // From here the mapping is owned (and unmapped on drop); the fd can go.
        let mapping = Mapping {
            base,
            len,
            readable,
            writable,
        };
        self.maps.insert(iova, mapping);
        Ok(())
    }

    /// Unmaps the mapping at `iova` of `size` bytes (exactly one mapping, as the protocol
    /// requires).
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<(), DmaError> {
        match self.maps.get(&iova) {
            Some(map) if map.len as u64 == size => {
                self.maps.remove(&iova);
                Ok(())
            }
            _ => Err(DmaError::NoSuchMapping { iova, size }),
        }
    }

    /// Unmaps everything.
    pub fn clear(&mut self) {
        self.maps.clear();
    }

    /// Copies `buf.len()` bytes of client memory at DMA address `iova` into `buf`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = buf.len();
        self.walk(iova, len, |map, _, _| {
            map.readable.then_some(()).ok_or(DmaError::Permission {
                iova,
                len,
                write: false,
            })
        })?;
        let dst = buf.as_mut_ptr();
        self.walk(iova, len, |map, offset, (done, count)| {
            let from = map.base.as_ptr().wrapping_add(offset);
            let to = dst.wrapping_add(done);
            // SAFETY: `from..from + count` is inside the live mapping (`walk` gives
            // `offset + count <= map.len`; the table is borrowed, so it cannot be unmapped), which
            // is mapped readable (checked above); `to..to + count` is inside `buf`
            // (`done + count <= buf.len()`), which is exclusively ours; `buf` is ordinary memory
            // and cannot be the mapping, whose address never leaves this module.
            unsafe { ptr::copy_nonoverlapping(from, to, count) };
            Ok(())
        })
    }

    /// Copies `data` into client memory at DMA address `iova`.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let len = data.len();
        self.walk(iova, len, |map, _, _| {
            map.writable.then_some(()).ok_or(DmaError::Permission {
                iova,
                len,
                write: true,
            })
        })?;
        let src = data.as_ptr();
        self.walk(iova, len, |map, offset, (done, count)| {
            let from = src.wrapping_add(done);
            let to = map.base.as_ptr().wrapping_add(offset);
            // SAFETY: `to..to + count` is inside the live mapping (`walk` gives
            // `offset + count <= map.len`; the table is borrowed, so it cannot be unmapped), which
            // is mapped writable (checked above); `from..from + count` is inside `data`
            // (`done + count <= data.len()`); `data` cannot be the mapping, whose address never
            // leaves this module.
            unsafe { ptr::copy_nonoverlapping(from, to, count) };
            Ok(())
        })
    }

    /// Calls `visit(mapping, offset in it, (bytes done before, bytes in it))` for each piece of
    /// `len` bytes from `iova`, in order; fails if any byte is unmapped (before visiting
    /// anything) or when `visit` fails.
    fn walk(
        &self,
        iova: u64,
        len: usize,
        mut visit: impl FnMut(&Mapping, usize, (usize, usize)) -> Result<(), DmaError>,
    ) -> Result<(), DmaError> {
        let not_mapped = || DmaError::NotMapped { iova, len };
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| iova.checked_add(len))
            .ok_or_else(not_mapped)?;
        // First make sure every byte is mapped, so that nothing is visited for an access that
        // fails part-way.
        let mut at = iova;
        while at < end {
            let (&start, map) = self.maps.range(..=at).next_back().ok_or_else(not_mapped)?;
            let map_end = start.saturating_add(map.len as u64);
            if map_end <= at {
                return Err(not_mapped());
            }
            at = map_end;
        }
        let mut at = iova;
        let mut done = 0usize;
        while at < end {
            let (&start, map) = self.maps.range(..=at).next_back().ok_or_else(not_mapped)?;
            let offset = usize::try_from(at - start).map_err(|_| not_mapped())?;
            let count = map.len.saturating_sub(offset).min(len - done);
            if count == 0 {
                return Err(not_mapped());
            }
            visit(map, offset, (done, count))?;
            done += count;
            at = at.saturating_add(count as u64);
        }
        Ok(())
    }
}
