//! The vfio-user protocol (version 0.1): a device emulated in another process, reached over a
//! UNIX stream socket, with the client's DMA memory, the device's mmap-able regions and the
//! interrupt eventfds passed as file descriptors (`SCM_RIGHTS`).
//!
//! * [`proto`]: the wire format, without I/O.
//! * [`Client`]: the driver's end. Blocking, one request in flight, every reply checked and
//!   bounded by a timeout.
//! * [`serve`] and [`Device`]: the device's end, for one connected client.
//! * [`DmaTable`]: the device's view of the memory the client shares with `DMA_MAP`.

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::Arc;

pub mod client;
pub mod dma;
pub mod proto;
pub mod server;
mod sock;

pub use client::{Client, ClientError};
pub use dma::{DmaError, DmaTable};
pub use server::{serve, Device, ServeError};

/// What `DEVICE_GET_INFO` says about a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceInfo {
    /// `DEVICE_FLAGS_*` ([`proto::DEVICE_FLAGS_RESET`], [`proto::DEVICE_FLAGS_PCI`]).
    pub flags: u32,
    /// How many regions the device has (indexes `0..num_regions`; 9 for a PCI device).
    pub num_regions: u32,
    /// How many interrupt types the device has (indexes `0..num_irqs`; 5 for a PCI device).
    pub num_irqs: u32,
}

/// One region of a device, as `DEVICE_GET_REGION_INFO` describes it.
///
/// The client keeps one per region after connecting; a [`Device`] returns one for the server to
/// describe (its `index` is ignored there: the server answers with the index asked for).
#[derive(Debug, Clone, Default)]
pub struct RegionInfo {
    /// The region's index (for a PCI device, [`proto::PCI_BAR0_REGION_INDEX`] and on).
    pub index: u32,
    /// `REGION_INFO_FLAG_*` (read, write, mmap; the caps flag is the server's business).
    pub flags: u32,
    /// The region's size in bytes.
    pub size: u64,
    /// The offset in `mmap_fd` at which the region starts (for `mmap`).
    pub offset: u64,
    /// The file the region can be mapped from, when the server passed one.
    pub mmap_fd: Option<Arc<OwnedFd>>,
    /// The parts of the region that may be mapped, as `(offset, size)` within the region (the
    /// sparse-mmap capability). Empty when the server sent none.
    pub sparse: Vec<(u64, u64)>,
}

/// One interrupt type of a device, as `DEVICE_GET_IRQ_INFO` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IrqInfo {
    /// The interrupt type's index ([`proto::PCI_MSIX_IRQ_INDEX`] and so on).
    pub index: u32,
    /// `IRQ_INFO_*` flags (eventfd, maskable, automasked, noresize).
    pub flags: u32,
    /// How many interrupts of this type the device has (vectors, for MSI-X).
    pub count: u32,
}

/// A UNIX errno as the protocol carries it (the `error` field of an error reply).
///
/// A plain number rather than `nix::errno::Errno` because a peer may send any value and the
/// client reports it unchanged; conversions from `nix`, `rustix` and `std::io` errors are
/// provided for device implementations.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Errno(pub u32);

impl Errno {
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(libc::EPERM as u32);
    /// I/O error.
    pub const EIO: Errno = Errno(libc::EIO as u32);
    /// Bad address.
    pub const EFAULT: Errno = Errno(libc::EFAULT as u32);
    /// Device or resource busy.
    pub const EBUSY: Errno = Errno(libc::EBUSY as u32);
    /// Already exists (a DMA mapping overlapping another).
    pub const EEXIST: Errno = Errno(libc::EEXIST as u32);
    /// No such device or address.
    pub const ENXIO: Errno = Errno(libc::ENXIO as u32);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(libc::EINVAL as u32);
    /// Argument list (here: message) too long.
    pub const E2BIG: Errno = Errno(libc::E2BIG as u32);
    /// Permission denied.
    pub const EACCES: Errno = Errno(libc::EACCES as u32);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(libc::ENOMEM as u32);
    /// Not supported.
    pub const ENOTSUP: Errno = Errno(libc::ENOTSUP as u32);
    /// Value too large for the data type.
    pub const EOVERFLOW: Errno = Errno(libc::EOVERFLOW as u32);

    /// The number, as the wire carries it.
    pub fn raw(self) -> u32 {
        self.0
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({self})")
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match i32::try_from(self.0) {
            Ok(0) => write!(f, "errno 0"),
            Ok(raw) => write!(f, "{}", std::io::Error::from_raw_os_error(raw)),
            Err(_) => write!(f, "errno {}", self.0),
        }
    }
}

impl From<std::io::Error> for Errno {
    /// The error's errno, or `EIO` for an error that has none.
    fn from(error: std::io::Error) -> Errno {
        error
            .raw_os_error()
            .and_then(|raw| u32::try_from(raw).ok())
            .map_or(Errno::EIO, Errno)
    }
}

impl From<nix::errno::Errno> for Errno {
    fn from(errno: nix::errno::Errno) -> Errno {
        u32::try_from(errno as i32).map_or(Errno::EIO, Errno)
    }
}

impl From<rustix::io::Errno> for Errno {
    fn from(errno: rustix::io::Errno) -> Errno {
        u32::try_from(errno.raw_os_error()).map_or(Errno::EIO, Errno)
    }
}
