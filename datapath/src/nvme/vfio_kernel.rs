//! The kernel VFIO transport: a PCIe NVMe function bound to `vfio-pci`, its BAR0 mapped, the
//! driver's memory pinned and mapped in the IOMMU for the device's DMA.
//!
//! A VFIO module of the crate, allowed `unsafe` for the DMA mapping (the promise that the
//! memory stays mapped and is never seen through a Rust reference).

use std::os::fd::OwnedFd;

use duplex_vfio::kernel;

use super::transport::{DmaMapping, Transport, TransportError};

/// A controller reached through kernel VFIO.
#[derive(Debug)]
pub struct KernelVfio {
    dev: kernel::Device,
    name: String,
}

impl KernelVfio {
    /// Sets up and adopts PCI function `bdf` (tests and tools: needs `/dev/vfio` access).
    pub fn open(bdf: &str) -> Result<Self, TransportError> {
        let h =
            kernel::open(bdf).map_err(|e| TransportError::new(format!("VFIO open {bdf}"), e))?;
        Self::from_fds(h.container, h.device, Some(h.group), bdf)
    }

    /// Adopts the fds duplexd set up (container, device, and the group kept open).
    pub fn from_fds(
        container: OwnedFd,
        device: OwnedFd,
        group: Option<OwnedFd>,
        name: &str,
    ) -> Result<Self, TransportError> {
        let dev = kernel::Device::from_fds(container, device, group)
            .map_err(|e| TransportError::new(format!("VFIO device {name}"), e))?;
        Ok(Self {
            dev,
            name: name.to_string(),
        })
    }

    /// Whether BAR0 is mapped (else every register access is a system call).
    pub fn bar0_mapped(&self) -> bool {
        self.dev.bar0_mapped()
    }
}

impl Transport for KernelVfio {
    fn name(&self) -> &str {
        &self.name
    }

    fn read32(&mut self, offset: u64) -> Result<u32, TransportError> {
        self.dev
            .read32(offset)
            .map_err(|e| TransportError::new("BAR0 read", e))
    }

    fn write32(&mut self, offset: u64, value: u32) -> Result<(), TransportError> {
        self.dev
            .write32(offset, value)
            .map_err(|e| TransportError::new("BAR0 write", e))
    }

    unsafe fn map_dma(&mut self, m: DmaMapping<'_>) -> Result<(), TransportError> {
        // SAFETY: forwarded: our caller upholds `Transport::map_dma`'s contract, which is
        // `kernel::Device::map_dma`'s.
        unsafe { self.dev.map_dma(m.iova, m.len, m.vaddr) }.map_err(|e| {
            TransportError::new(format!("DMA map of {} bytes at {:#x}", m.len, m.iova), e)
        })
    }

    fn unmap_dma(&mut self, iova: u64, len: u64) -> Result<(), TransportError> {
        self.dev
            .unmap_dma(iova, len)
            .map_err(|e| TransportError::new("DMA unmap", e))
    }
}
