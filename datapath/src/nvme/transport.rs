//! How the driver reaches a controller: its BAR0 registers and the DMA mappings of its memory.
//! Kernel VFIO (a PCIe function bound to `vfio-pci`) and vfio-user (a device in another process,
//! such as `duplex-drive-sim`) implement the same interface.

use std::os::fd::BorrowedFd;

use super::vfio_kernel::KernelVfio;
use super::vfio_user::VfioUser;

/// A transport failure: the device (or the way to it) is gone or refused.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {cause}")]
pub struct TransportError {
    /// What the driver was doing.
    pub what: String,
    /// Why it failed.
    pub cause: Box<dyn std::error::Error + Send + Sync>,
}

impl TransportError {
    /// Wraps `cause` with what was being done.
    pub fn new(
        what: impl Into<String>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            what: what.into(),
            cause: cause.into(),
        }
    }
}

/// A piece of the driver's memory to make visible to the device at `iova`.
#[derive(Debug, Clone, Copy)]
pub struct DmaMapping<'a> {
    /// The device's address of the first byte.
    pub iova: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub len: u64,
    /// The memfd holding the memory (vfio-user shares it with the device process).
    pub fd: BorrowedFd<'a>,
    /// Offset of the first byte in `fd`.
    pub file_offset: u64,
    /// The driver process's address of the first byte (kernel VFIO pins it).
    pub vaddr: u64,
}

/// Register and DMA access to one NVMe controller.
pub trait Transport {
    /// A name for logs and errors (a socket path, a PCI address).
    fn name(&self) -> &str;

    /// Reads the 32-bit register at `offset` of BAR0.
    fn read32(&mut self, offset: u64) -> Result<u32, TransportError>;

    /// Writes the 32-bit register at `offset` of BAR0 (doorbells included).
    fn write32(&mut self, offset: u64, value: u32) -> Result<(), TransportError>;

    /// Reads a 64-bit register as two 32-bit reads, low dword first.
    fn read64(&mut self, offset: u64) -> Result<u64, TransportError> {
        let lo = self.read32(offset)?;
        let hi = self.read32(offset + 4)?;
        Ok(u64::from(lo) | u64::from(hi) << 32)
    }

    /// Writes a 64-bit register as two 32-bit writes, low dword first.
    fn write64(&mut self, offset: u64, value: u64) -> Result<(), TransportError> {
        self.write32(offset, value as u32)?;
        self.write32(offset + 4, (value >> 32) as u32)
    }

    /// Makes `m` visible to the device (IOMMU mapping, or sharing the fd).
    ///
    /// # Safety
    ///
    /// From now until [`Transport::unmap_dma`] of the range (or the transport is dropped) the
    /// device may read and write that memory at any time: the caller keeps it mapped at
    /// `m.vaddr` and never forms a Rust reference to it (raw pointers and system calls only).
    unsafe fn map_dma(&mut self, m: DmaMapping<'_>) -> Result<(), TransportError>;

    /// Removes a mapping made by [`Transport::map_dma`].
    fn unmap_dma(&mut self, iova: u64, len: u64) -> Result<(), TransportError>;
}

/// Either transport, so one controller type serves both.
#[derive(Debug)]
pub enum AnyTransport {
    /// vfio-user.
    User(VfioUser),
    /// Kernel VFIO.
    Kernel(KernelVfio),
}

impl Transport for AnyTransport {
    fn name(&self) -> &str {
        match self {
            Self::User(t) => t.name(),
            Self::Kernel(t) => t.name(),
        }
    }

    fn read32(&mut self, offset: u64) -> Result<u32, TransportError> {
        match self {
            Self::User(t) => t.read32(offset),
            Self::Kernel(t) => t.read32(offset),
        }
    }

    fn write32(&mut self, offset: u64, value: u32) -> Result<(), TransportError> {
        match self {
            Self::User(t) => t.write32(offset, value),
            Self::Kernel(t) => t.write32(offset, value),
        }
    }

    unsafe fn map_dma(&mut self, m: DmaMapping<'_>) -> Result<(), TransportError> {
        match self {
            // SAFETY: forwarded; our caller upholds the same contract.
            Self::User(t) => unsafe { t.map_dma(m) },
            // SAFETY: forwarded; our caller upholds the same contract.
            Self::Kernel(t) => unsafe { t.map_dma(m) },
        }
    }

    fn unmap_dma(&mut self, iova: u64, len: u64) -> Result<(), TransportError> {
        match self {
            Self::User(t) => t.unmap_dma(iova, len),
            Self::Kernel(t) => t.unmap_dma(iova, len),
        }
    }
}
