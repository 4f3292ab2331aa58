//! Memory an NVMe controller reads and writes by DMA: the driver's queues, PRP list pages and
//! scratch buffers.
//!
//! One of the modules of the crate allowed `unsafe`. The device writes this memory whenever it
//! likes (completion entries, read data), so it is only ever touched through raw pointers with
//! volatile or `copy_nonoverlapping` accesses, never through a Rust reference. Every access is
//! bounds-checked against the mapping first.
//!
//! The memory is a memfd, mapped shared, so that a vfio-user device (another process) can map
//! the same pages from the fd, and kernel VFIO can pin them (`VFIO_IOMMU_MAP_DMA` of the
//! mapping's address).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};

use duplex_nvme::cmd::{Cqe, Sqe};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use super::transport::{DmaMapping, Transport, TransportError};

/// The page size the driver programs (CC.MPS = 0) and aligns everything to.
pub const PAGE: usize = 4096;

/// Errors creating or touching DMA memory.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// A system call failed.
    #[error("{what} failed: {cause}")]
    Sys {
        /// Which call.
        what: &'static str,
        /// Why.
        cause: nix::Error,
    },
    /// An access outside the mapping (a driver bug, never device-controlled: the driver only
    /// computes offsets from its own layout).
    #[error("DMA access of {len} bytes at offset {offset} is outside the {size}-byte region")]
    OutOfBounds {
        /// Offset of the access.
        offset: usize,
        /// Its length.
        len: usize,
        /// The region's size.
        size: usize,
    },
    /// A size that is zero or not a multiple of the page size.
    #[error("DMA region size {0} must be a non-zero multiple of {PAGE}")]
    BadSize(usize),
}

/// A page-aligned, shared, device-visible memory region at a chosen I/O virtual address.
#[derive(Debug)]
pub struct DmaMem {
    base: NonNull<u8>,
    len: usize,
    iova: u64,
    fd: OwnedFd,
}

// SAFETY: `DmaMem` owns its mapping; every access goes through raw pointers with bounds checks,
// and moving the owner to another thread does not change what the pointers address.
unsafe impl Send for DmaMem {}

impl DmaMem {
    /// Creates `len` bytes (a multiple of [`PAGE`]) of zeroed memory in a new memfd, mapped
    /// shared, that the device will see at `iova`.
    pub fn create(name: &str, len: usize, iova: u64) -> Result<Self, DmaError> {
        let name = std::ffi::CString::new(name).unwrap_or_default();
        let fd =
            memfd_create(&name, MemFdCreateFlag::MFD_CLOEXEC).map_err(|cause| DmaError::Sys {
                what: "memfd_create",
                cause,
            })?;
        let size = i64::try_from(len).map_err(|_| DmaError::BadSize(len))?;
        nix::unistd::ftruncate(&fd, size).map_err(|cause| DmaError::Sys {
            what: "ftruncate",
            cause,
        })?;
        Self::map(fd, len, iova)
    }

    /// Maps `len` bytes of an existing memfd (handed over by duplexd), seen by the device at
    /// `iova`.
    pub fn map(fd: OwnedFd, len: usize, iova: u64) -> Result<Self, DmaError> {
        let size = std::num::NonZeroUsize::new(len)
            .filter(|_| len % PAGE == 0)
            .ok_or(DmaError::BadSize(len))?;
        // SAFETY: a fresh shared mapping of a file we hold, at an address the kernel picks; it
        // overlaps nothing, and nothing refers to it yet.
        let base = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(|cause| DmaError::Sys {
            what: "mmap",
            cause,
        })?;
        Ok(Self {
            base: base.cast(),
            len,
            iova,
            fd,
        })
    }

    /// The memfd (to share with a vfio-user device).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never empty; for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device's address of offset 0.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The process's address of offset 0 (for kernel VFIO's `MAP_DMA`).
    pub fn vaddr(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// The device's address of `offset`.
    pub fn iova_of(&self, offset: usize) -> u64 {
        self.iova + offset as u64
    }

    /// Makes the whole region visible to the device behind `t` at [`DmaMem::iova`].
    pub fn map_for<T: Transport + ?Sized>(&self, t: &mut T) -> Result<(), TransportError> {
        let m = DmaMapping {
            iova: self.iova,
            len: self.len as u64,
            fd: self.fd.as_fd(),
            file_offset: 0,
            vaddr: self.vaddr(),
        };
        // SAFETY: the mapping stays mapped until `self` drops, and the controller that owns
        // both the transport and this memory drops the transport's DMA access with itself;
        // this module never forms a Rust reference into the region (raw pointers only).
        unsafe { t.map_dma(m) }
    }

    fn ptr(&self, offset: usize, len: usize) -> Result<*mut u8, DmaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.base.as_ptr().wrapping_add(offset)),
            _ => Err(DmaError::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Copies `data` into the region at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), DmaError> {
        let dst = self.ptr(offset, data.len())?;
        // SAFETY: `dst..dst + data.len()` lies inside our live mapping (checked by `ptr`), and
        // `data` is ordinary memory that cannot overlap the mapping (no reference into the
        // mapping ever exists). The device may read these bytes concurrently; it sees either
        // old or new bytes, never Rust-level UB on our side since no reference is formed.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Copies `out.len()` bytes at `offset` out of the region.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), DmaError> {
        let src = self.ptr(offset, out.len())?;
        // SAFETY: `src..src + out.len()` lies inside our live mapping (checked by `ptr`); `out`
        // is ordinary memory, disjoint from the mapping. The device may write the source
        // concurrently; we copy whatever bytes are there without forming a reference.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Zeroes `len` bytes at `offset`.
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), DmaError> {
        let dst = self.ptr(offset, len)?;
        // SAFETY: in bounds of our live mapping (checked by `ptr`); raw write, no reference.
        unsafe { std::ptr::write_bytes(dst, 0, len) };
        Ok(())
    }

    /// Writes a submission queue entry at `offset` (64-byte aligned), then a release fence so
    /// that the entry is visible before the doorbell write that follows.
    pub fn write_sqe(&self, offset: usize, sqe: &Sqe) -> Result<(), DmaError> {
        self.write(offset, &sqe.to_bytes())?;
        fence(Ordering::Release);
        Ok(())
    }

    /// Reads the completion entry at `offset` if its phase tag equals `phase`: the status word
    /// (holding the phase) is read first, then, after an acquire fence, the rest, so the entry is
    /// never seen half-written by a device that writes the status word last.
    pub fn read_cqe(&self, offset: usize, phase: bool) -> Result<Option<Cqe>, DmaError> {
        let status_at = self
            .ptr(offset, std::mem::size_of::<Cqe>())?
            .wrapping_add(14);
        // SAFETY: `status_at..+2` is inside the 16 bytes checked above, inside our live mapping;
        // a volatile read of two bytes (alignment 1), no reference formed.
        let status = unsafe { std::ptr::read_volatile(status_at.cast::<[u8; 2]>()) };
        let status = u16::from_le_bytes(status);
        if (status & 1 == 1) != phase {
            return Ok(None);
        }
        fence(Ordering::Acquire);
        let mut raw = [0u8; 16];
        self.read(offset, &mut raw)?;
        let mut cqe: Cqe = bytemuck::pod_read_unaligned(&raw);
        // The status word as read first decides the phase; keep it.
        cqe.status = status;
        Ok(Some(cqe))
    }
}

impl Drop for DmaMem {
    fn drop(&mut self) {
        // SAFETY: `base..base + len` is the mapping `map` made and only we own; no reference into
        // it exists (none is ever formed), so nothing dangles after it is gone.
        if let Err(e) = unsafe { munmap(self.base.cast(), self.len) } {
            tracing::warn!(error = %e, "munmap of DMA memory failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_bounds_are_checked() {
        let m = DmaMem::create("t", 2 * PAGE, 1 << 30).expect("create");
        m.write(100, b"hello").expect("write");
        let mut out = [0u8; 5];
        m.read(100, &mut out).expect("read");
        assert_eq!(&out, b"hello");
        assert!(m.write(2 * PAGE - 2, b"abc").is_err());
        assert!(m.read(usize::MAX, &mut out).is_err());
        assert!(DmaMem::create("t", 100, 0).is_err());
        assert_eq!(m.iova_of(8), (1 << 30) + 8);
    }

    #[test]
    fn completion_entries_are_taken_by_phase() {
        let m = DmaMem::create("t", PAGE, 0).expect("create");
        assert!(m.read_cqe(0, true).expect("read").is_none());
        let cqe = Cqe {
            dw0: 7,
            cid: 3,
            status: 1,
            ..Cqe::default()
        };
        m.write(0, bytemuck::bytes_of(&cqe)).expect("write");
        assert_eq!(m.read_cqe(0, true).expect("read"), Some(cqe));
        assert!(m.read_cqe(0, false).expect("read").is_none());
        assert!(m.read_cqe(PAGE - 8, true).is_err());
    }
}
