//! The vfio-user transport: a controller emulated in another process (`duplex-drive-sim`, or
//! any vfio-user NVMe device), its BAR0 reached with region reads and writes over the socket,
//! the driver's memory shared by fd.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use duplex_vfio::user::{proto, Client};

use super::transport::{DmaMapping, Transport, TransportError};

/// A controller reached over vfio-user.
#[derive(Debug)]
pub struct VfioUser {
    client: Client,
    name: String,
}

impl VfioUser {
    /// Connects to the device's socket (tests and tools; the datapath gets a connected stream).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, TransportError> {
        let name = path.display().to_string();
        let client = Client::connect(path, timeout)
            .map_err(|e| TransportError::new(format!("vfio-user connect {name}"), e))?;
        Self::check(client, name)
    }

    /// Adopts a connected stream (handed over by duplexd), named `name` in logs.
    pub fn from_stream(
        stream: UnixStream,
        name: impl Into<String>,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        let name = name.into();
        let client = Client::from_stream(stream, timeout)
            .map_err(|e| TransportError::new(format!("vfio-user handshake with {name}"), e))?;
        Self::check(client, name)
    }

    fn check(client: Client, name: String) -> Result<Self, TransportError> {
        let info = client.device_info();
        let bar0 = client.region(proto::PCI_BAR0_REGION_INDEX);
        let ok = info.flags & proto::DEVICE_FLAGS_PCI != 0
            && bar0.is_some_and(|r| {
                r.size >= 0x2000
                    && r.flags & (proto::REGION_INFO_FLAG_READ | proto::REGION_INFO_FLAG_WRITE)
                        == proto::REGION_INFO_FLAG_READ | proto::REGION_INFO_FLAG_WRITE
            });
        if !ok {
            return Err(TransportError::new(
                format!("vfio-user device {name}"),
                "not a PCI device with a readable and writable BAR0 of NVMe registers",
            ));
        }
        Ok(Self { client, name })
    }

    /// From now on, no `setsockopt` per exchange (the datapath's sandbox allows none): see
    /// `duplex_vfio::user::Client::fix_timeouts`.
    pub fn fix_timeouts(&mut self) {
        self.client.fix_timeouts();
    }

    /// Closes the connection (the device sees the client go).
    pub fn close(&self) {
        self.client.shutdown();
    }
}

impl Transport for VfioUser {
    fn name(&self) -> &str {
        &self.name
    }

    fn read32(&mut self, offset: u64) -> Result<u32, TransportError> {
        let mut b = [0u8; 4];
        self.client
            .region_read(proto::PCI_BAR0_REGION_INDEX, offset, &mut b)
            .map_err(|e| TransportError::new(format!("BAR0 read at {offset:#x}"), e))?;
        Ok(u32::from_le_bytes(b))
    }

    fn write32(&mut self, offset: u64, value: u32) -> Result<(), TransportError> {
        self.client
            .region_write(proto::PCI_BAR0_REGION_INDEX, offset, &value.to_le_bytes())
            .map_err(|e| TransportError::new(format!("BAR0 write at {offset:#x}"), e))
    }

    unsafe fn map_dma(&mut self, m: DmaMapping<'_>) -> Result<(), TransportError> {
        self.client
            .dma_map(m.iova, m.len, m.fd, m.file_offset, true, true)
            .map_err(|e| {
                TransportError::new(format!("DMA map of {} bytes at {:#x}", m.len, m.iova), e)
            })
    }

    fn unmap_dma(&mut self, iova: u64, len: u64) -> Result<(), TransportError> {
        self.client
            .dma_unmap(iova, len)
            .map_err(|e| TransportError::new(format!("DMA unmap at {iova:#x}"), e))
    }
}
