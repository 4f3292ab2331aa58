//! Kernel VFIO (`vfio-pci` with a TYPE1 IOMMU container): a PCIe function's BAR0 mapped into
//! the process, and the process's memory mapped for the device's DMA.
//!
//! Two halves, so that a sandboxed process never opens a path: [`open`] (run by duplexd, or a
//! test, with the right to open `/dev/vfio/*` and read sysfs) sets up container, group and
//! device and returns their fds; [`Device::from_fds`] (run by the datapath on the handed-over
//! fds) maps BAR0, enables bus mastering, and maps DMA through the container.
//!
//! The second module of the crate allowed `unsafe` (after `user::dma`): ioctls whose argument
//! structures are ours, and the BAR0 mapping, which is device memory touched only with
//! volatile 32-bit accesses through raw pointers.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;

/// `VFIO_TYPE` of the ioctl numbers (`';'`) and their base.
const VFIO_TYPE: libc::c_ulong = b';' as libc::c_ulong;
const VFIO_BASE: libc::c_ulong = 100;
/// `_IO(VFIO_TYPE, VFIO_BASE + n)`: VFIO ioctls encode neither direction nor size.
const fn vfio_io(n: libc::c_ulong) -> libc::c_ulong {
    (VFIO_TYPE << 8) | (VFIO_BASE + n)
}
const GET_API_VERSION: libc::c_ulong = vfio_io(0);
const CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
const SET_IOMMU: libc::c_ulong = vfio_io(2);
const GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
const GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
const GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
const DEVICE_GET_INFO: libc::c_ulong = vfio_io(7);
const DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
const DEVICE_RESET: libc::c_ulong = vfio_io(11);
const IOMMU_GET_INFO: libc::c_ulong = vfio_io(12);
const IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
const IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);

const API_VERSION: libc::c_int = 0;
const TYPE1_IOMMU: libc::c_ulong = 1;
const TYPE1V2_IOMMU: libc::c_ulong = 3;
const GROUP_FLAGS_VIABLE: u32 = 1;
const DEVICE_FLAGS_PCI: u32 = 1 << 1;
const DEVICE_FLAGS_RESET: u32 = 1 << 0;
const REGION_INFO_FLAG_READ: u32 = 1;
const REGION_INFO_FLAG_WRITE: u32 = 2;
const REGION_INFO_FLAG_MMAP: u32 = 4;
const DMA_MAP_FLAG_READ: u32 = 1;
const DMA_MAP_FLAG_WRITE: u32 = 2;
/// `VFIO_IOMMU_INFO_CAPS` and `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`.
const IOMMU_INFO_CAPS: u32 = 1 << 1;
const IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: u16 = 1;
/// `sizeof(struct vfio_iommu_type1_info)`.
const IOMMU_INFO_LEN: usize = 24;
/// PCI region indexes of vfio-pci.
const BAR0_REGION: u32 = 0;
const CONFIG_REGION: u32 = 7;
/// PCI command register and its bits.
const PCI_COMMAND: u64 = 4;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

#[repr(C)]
#[derive(Debug, Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Debug, Default)]
struct DeviceInfo {
    argsz: u32,
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

const _: () = assert!(std::mem::size_of::<RegionInfo>() == 32);
const _: () = assert!(std::mem::size_of::<DmaMap>() == 32);
const _: () = assert!(std::mem::size_of::<DmaUnmap>() == 24);

/// Errors of kernel VFIO.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A file could not be opened or read.
    #[error("{path}: {cause}")]
    Open {
        /// The path.
        path: String,
        /// Why.
        cause: std::io::Error,
    },
    /// An ioctl failed.
    #[error("{what} failed: {cause}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// Why.
        cause: std::io::Error,
    },
    /// The VFIO setup is not usable.
    #[error("{0}")]
    Unusable(String),
    /// A register access outside BAR0 or not 4-byte aligned (a driver bug).
    #[error("BAR0 access at {offset:#x} outside its {size} bytes or unaligned")]
    Bar {
        /// Offset.
        offset: u64,
        /// BAR0 size.
        size: u64,
    },
}

/// The fds of one device set up for VFIO: what duplexd hands the datapath.
#[derive(Debug)]
pub struct Handles {
    /// The container (`/dev/vfio/vfio`) with the group attached and the IOMMU type set.
    pub container: OwnedFd,
    /// The group (`/dev/vfio/N`); must stay open while the device is used.
    pub group: OwnedFd,
    /// The device fd (`VFIO_GROUP_GET_DEVICE_FD`).
    pub device: OwnedFd,
}

fn ioctl_ptr<T>(
    fd: &impl AsRawFd,
    what: &'static str,
    req: libc::c_ulong,
    arg: &mut T,
) -> Result<libc::c_int, KernelError> {
    // SAFETY: `arg` is a live, exclusively borrowed `#[repr(C)]` structure of the layout the
    // ioctl `req` expects (its `argsz` set by the caller); the kernel reads and writes only
    // within it during the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, std::ptr::from_mut(arg)) };
    if r < 0 {
        return Err(KernelError::Ioctl {
            what,
            cause: std::io::Error::last_os_error(),
        });
    }
    Ok(r)
}

fn ioctl_val(
    fd: &impl AsRawFd,
    what: &'static str,
    req: libc::c_ulong,
    arg: libc::c_ulong,
) -> Result<libc::c_int, KernelError> {
    // SAFETY: an ioctl whose argument is a plain integer (or unused); no memory is passed.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if r < 0 {
        return Err(KernelError::Ioctl {
            what,
            cause: std::io::Error::last_os_error(),
        });
    }
    Ok(r)
}

fn open_rw(path: &str) -> Result<OwnedFd, KernelError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|cause| KernelError::Open {
            path: path.to_string(),
            cause,
        })
}

/// Sets up the PCI function `bdf` (e.g. `0000:00:04.0`, bound to `vfio-pci`): its IOMMU group
/// into a new TYPE1 container, and the device fd. Needs the rights to open `/dev/vfio/*`.
pub fn open(bdf: &str) -> Result<Handles, KernelError> {
    if bdf.is_empty() || bdf.contains('/') {
        return Err(KernelError::Unusable(format!("bad PCI address {bdf:?}")));
    }
    let link = format!("/sys/bus/pci/devices/{bdf}/iommu_group");
    let group_path = std::fs::read_link(&link).map_err(|cause| KernelError::Open {
        path: link.clone(),
        cause,
    })?;
    let group_id = group_path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| KernelError::Unusable(format!("{link} -> {group_path:?} names no group")))?;
    let container = open_rw("/dev/vfio/vfio")?;
    let version = ioctl_val(&container, "VFIO_GET_API_VERSION", GET_API_VERSION, 0)?;
    if version != API_VERSION {
        return Err(KernelError::Unusable(format!(
            "VFIO API version {version}, expected {API_VERSION}"
        )));
    }
    let iommu = if ioctl_val(
        &container,
        "VFIO_CHECK_EXTENSION",
        CHECK_EXTENSION,
        TYPE1V2_IOMMU,
    )? == 1
    {
        TYPE1V2_IOMMU
    } else if ioctl_val(
        &container,
        "VFIO_CHECK_EXTENSION",
        CHECK_EXTENSION,
        TYPE1_IOMMU,
    )? == 1
    {
        TYPE1_IOMMU
    } else {
        return Err(KernelError::Unusable(
            "no TYPE1 IOMMU support in VFIO".into(),
        ));
    };
    let group = open_rw(&format!("/dev/vfio/{group_id}"))?;
    let mut status = GroupStatus {
        argsz: std::mem::size_of::<GroupStatus>() as u32,
        flags: 0,
    };
    ioctl_ptr(
        &group,
        "VFIO_GROUP_GET_STATUS",
        GROUP_GET_STATUS,
        &mut status,
    )?;
    if status.flags & GROUP_FLAGS_VIABLE == 0 {
        return Err(KernelError::Unusable(format!(
            "IOMMU group {group_id} is not viable (every device in it must be bound to vfio-pci)"
        )));
    }
    let mut cfd = container.as_raw_fd();
    ioctl_ptr(
        &group,
        "VFIO_GROUP_SET_CONTAINER",
        GROUP_SET_CONTAINER,
        &mut cfd,
    )?;
    ioctl_val(&container, "VFIO_SET_IOMMU", SET_IOMMU, iommu)?;
    let name = std::ffi::CString::new(bdf)
        .map_err(|_| KernelError::Unusable("NUL in PCI address".into()))?;
    // SAFETY: the argument is a NUL-terminated string that outlives the call; the kernel only
    // reads it.
    let dfd = unsafe { libc::ioctl(group.as_raw_fd(), GROUP_GET_DEVICE_FD, name.as_ptr()) };
    if dfd < 0 {
        return Err(KernelError::Ioctl {
            what: "VFIO_GROUP_GET_DEVICE_FD",
            cause: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    let device = unsafe { OwnedFd::from_raw_fd(dfd) };
    Ok(Handles {
        container,
        group,
        device,
    })
}

/// An opened device: BAR0 mapped (or reached with pread/pwrite), DMA through the container.
#[derive(Debug)]
pub struct Device {
    container: OwnedFd,
    device: std::fs::File,
    /// Kept open while the device is used (the group owns the container attachment).
    _group: Option<OwnedFd>,
    bar0: Option<(NonNull<u8>, usize)>,
    bar0_info: RegionInfo,
    resettable: bool,
}

// SAFETY: the BAR0 pointer addresses a device mapping this value owns; it is only accessed
// through volatile reads and writes, from whichever thread owns the value.
unsafe impl Send for Device {}

impl Device {
    /// Adopts set-up fds (from [`open`], possibly handed over by another process): checks it is a
    /// PCI device, maps BAR0 when the kernel allows it, and enables memory decoding and bus
    /// mastering in the command register (DMA needs it).
    pub fn from_fds(
        container: OwnedFd,
        device: OwnedFd,
        group: Option<OwnedFd>,
    ) -> Result<Self, KernelError> {
        let device = std::fs::File::from(device);
        let mut info = DeviceInfo {
            argsz: std::mem::size_of::<DeviceInfo>() as u32,
            ..DeviceInfo::default()
        };
        ioctl_ptr(&device, "VFIO_DEVICE_GET_INFO", DEVICE_GET_INFO, &mut info)?;
        if info.flags & DEVICE_FLAGS_PCI == 0 || info.num_regions <= CONFIG_REGION {
            return Err(KernelError::Unusable(format!(
                "not a vfio-pci device (flags {:#x}, {} regions)",
                info.flags, info.num_regions
            )));
        }
        let region = |index| -> Result<RegionInfo, KernelError> {
            let mut r = RegionInfo {
                argsz: std::mem::size_of::<RegionInfo>() as u32,
                index,
                ..RegionInfo::default()
            };
            ioctl_ptr(
                &device,
                "VFIO_DEVICE_GET_REGION_INFO",
                DEVICE_GET_REGION_INFO,
                &mut r,
            )?;
            Ok(r)
        };
        let bar0_info = region(BAR0_REGION)?;
        let config = region(CONFIG_REGION)?;
        if bar0_info.size < 0x2000
            || bar0_info.flags & (REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE)
                != (REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE)
        {
            return Err(KernelError::Unusable(format!(
                "BAR0 of {} bytes (flags {:#x}) cannot hold NVMe registers",
                bar0_info.size, bar0_info.flags
            )));
        }
        let mut cmd = [0u8; 2];
        device
            .read_exact_at(&mut cmd, config.offset + PCI_COMMAND)
            .map_err(|cause| KernelError::Ioctl {
                what: "config space read",
                cause,
            })?;
        let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        device
            .write_all_at(&cmd.to_le_bytes(), config.offset + PCI_COMMAND)
            .map_err(|cause| KernelError::Ioctl {
                what: "config space write",
                cause,
            })?;
        let bar0 = if bar0_info.flags & REGION_INFO_FLAG_MMAP != 0 {
            let len = usize::try_from(bar0_info.size)
                .map_err(|_| KernelError::Unusable("BAR0 too large".into()))?;
            let off = libc::off_t::try_from(bar0_info.offset)
                .map_err(|_| KernelError::Unusable("BAR0 offset too large".into()))?;
            // SAFETY: a new shared mapping of the device's BAR0 region at an address the kernel
            // picks; it aliases no Rust object and is only accessed with volatile operations.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    device.as_raw_fd(),
                    off,
                )
            };
            if p == libc::MAP_FAILED {
                tracing::warn!(error = %std::io::Error::last_os_error(), "BAR0 mmap failed; using pread/pwrite");
                None
            } else {
                NonNull::new(p.cast::<u8>()).map(|p| (p, len))
            }
        } else {
            None
        };
        Ok(Self {
            container,
            device,
            _group: group,
            bar0,
            bar0_info,
            resettable: info.flags & DEVICE_FLAGS_RESET != 0,
        })
    }

    fn check(&self, offset: u64) -> Result<(), KernelError> {
        if offset % 4 != 0
            || offset
                .checked_add(4)
                .is_none_or(|e| e > self.bar0_info.size)
        {
            return Err(KernelError::Bar {
                offset,
                size: self.bar0_info.size,
            });
        }
        Ok(())
    }

    /// Reads the 32-bit register at `offset` of BAR0.
    pub fn read32(&self, offset: u64) -> Result<u32, KernelError> {
        self.check(offset)?;
        if let Some((p, _)) = self.bar0 {
            let at = p.as_ptr().wrapping_add(offset as usize).cast::<u32>();
            // SAFETY: `at` is 4-byte aligned (checked) and inside the live BAR0 mapping
            // (checked against its size); a volatile read of device memory, no reference.
            return Ok(u32::from_le(unsafe { std::ptr::read_volatile(at) }));
        }
        let mut b = [0u8; 4];
        self.device
            .read_exact_at(&mut b, self.bar0_info.offset + offset)
            .map_err(|cause| KernelError::Ioctl {
                what: "BAR0 read",
                cause,
            })?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes the 32-bit register at `offset` of BAR0 (after a fence, so that memory written
    /// before, such as a submission entry, is visible to the device first).
    pub fn write32(&self, offset: u64, value: u32) -> Result<(), KernelError> {
        self.check(offset)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if let Some((p, _)) = self.bar0 {
            let at = p.as_ptr().wrapping_add(offset as usize).cast::<u32>();
            // SAFETY: `at` is 4-byte aligned (checked) and inside the live BAR0 mapping
            // (checked against its size); a volatile write of device memory, no reference.
            unsafe { std::ptr::write_volatile(at, value.to_le()) };
            return Ok(());
        }
        self.device
            .write_all_at(&value.to_le_bytes(), self.bar0_info.offset + offset)
            .map_err(|cause| KernelError::Ioctl {
                what: "BAR0 write",
                cause,
            })
    }

    /// Maps `[vaddr, vaddr + size)` of this process for the device's DMA at `iova`.
    ///
    /// # Safety
    ///
    /// Until [`Device::unmap_dma`] of the same range (or the container closes), the device may
    /// read and write that memory at any time: the caller must keep it mapped and never form a
    /// Rust reference to it (raw-pointer, volatile or system-call access only).
    pub unsafe fn map_dma(&self, iova: u64, size: u64, vaddr: u64) -> Result<(), KernelError> {
        let mut m = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            vaddr,
            iova,
            size,
        };
        let r = ioctl_ptr(&self.container, "VFIO_IOMMU_MAP_DMA", IOMMU_MAP_DMA, &mut m);
        match r {
            Ok(_) => Ok(()),
            // EINVAL is also what an IOVA beyond the IOMMU's address width gets: say so.
            Err(KernelError::Ioctl { cause, .. })
                if cause.raw_os_error() == Some(libc::EINVAL) && size > 0 =>
            {
                let end = iova.saturating_add(size - 1);
                match self.iova_ranges() {
                    Ok(ranges)
                        if !ranges.is_empty()
                            && !ranges.iter().any(|&(s, e)| s <= iova && end <= e) =>
                    {
                        let usable: Vec<String> = ranges
                            .iter()
                            .map(|(s, e)| format!("{s:#x}-{e:#x}"))
                            .collect();
                        Err(KernelError::Unusable(format!(
                            "VFIO_IOMMU_MAP_DMA of IOVA {iova:#x}-{end:#x}: outside the \
                             IOMMU's usable IOVA ranges {}",
                            usable.join(", ")
                        )))
                    }
                    _ => Err(KernelError::Ioctl {
                        what: "VFIO_IOMMU_MAP_DMA",
                        cause,
                    }),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The IOVA ranges the container's IOMMU can map (`[start, end]`, inclusive), from the
    /// kernel's IOVA range capability; empty if the kernel does not report one (before 5.4).
    /// An emulated Intel IOMMU with `aw-bits=39` (and much real hardware) ends at `2^39 - 1`.
    pub fn iova_ranges(&self) -> Result<Vec<(u64, u64)>, KernelError> {
        let mut argsz = IOMMU_INFO_LEN as u32;
        for _ in 0..2 {
            // u64 elements: the structure and its capabilities are 8-byte aligned.
            let mut buf = vec![0u64; (argsz as usize).div_ceil(8)];
            let bytes = buf.len() * 8;
            buf[0] = u64::from(argsz);
            // SAFETY: `buf` is a live, exclusively owned buffer of `bytes` >= `argsz` bytes whose
            // first u32 (little-endian x86 layout) is `argsz`; VFIO_IOMMU_GET_INFO writes at most
            // `argsz` bytes into it during the call.
            let r = unsafe {
                libc::ioctl(
                    self.container.as_raw_fd(),
                    IOMMU_GET_INFO,
                    buf.as_mut_ptr().cast::<u8>(),
                )
            };
            if r < 0 {
                return Err(KernelError::Ioctl {
                    what: "VFIO_IOMMU_GET_INFO",
                    cause: std::io::Error::last_os_error(),
                });
            }
            let raw: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let u16_at = |o: usize| raw.get(o..o + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
            let u32_at = |o: usize| {
                raw.get(o..o + 4)
                    .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            };
            let u64_at = |o: usize| {
                raw.get(o..o + 8).map(|b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    u64::from_ne_bytes(a)
                })
            };
            let wanted = u32_at(0).unwrap_or(0);
            let flags = u32_at(4).unwrap_or(0);
            if flags & IOMMU_INFO_CAPS == 0 {
                return Ok(Vec::new());
            }
            if wanted as usize > bytes {
                // The capabilities did not fit: ask again with the size the kernel named.
                argsz = wanted;
                continue;
            }
            let mut at = u32_at(16).unwrap_or(0) as usize;
            let mut hops = 0;
            while at >= IOMMU_INFO_LEN && hops < 64 {
                hops += 1;
                let (Some(id), Some(next)) = (u16_at(at), u32_at(at + 4)) else {
                    break;
                };
                if id == IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
                    let n = u32_at(at + 8).unwrap_or(0) as usize;
                    return Ok((0..n)
                        .map_while(|i| {
                            let o = at + 16 + i * 16;
                            Some((u64_at(o)?, u64_at(o + 8)?))
                        })
                        .collect());
                }
                at = next as usize;
            }
            return Ok(Vec::new());
        }
        Err(KernelError::Unusable(
            "VFIO_IOMMU_GET_INFO keeps asking for a larger buffer".into(),
        ))
    }

    /// Removes a DMA mapping.
    pub fn unmap_dma(&self, iova: u64, size: u64) -> Result<(), KernelError> {
        let mut m = DmaUnmap {
            argsz: std::mem::size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova,
            size,
        };
        ioctl_ptr(
            &self.container,
            "VFIO_IOMMU_UNMAP_DMA",
            IOMMU_UNMAP_DMA,
            &mut m,
        )
        .map(drop)
    }

    /// Function-level reset, where the device supports it.
    pub fn reset(&self) -> Result<(), KernelError> {
        if !self.resettable {
            return Err(KernelError::Unusable(
                "device does not support reset".into(),
            ));
        }
        ioctl_val(&self.device, "VFIO_DEVICE_RESET", DEVICE_RESET, 0).map(drop)
    }

    /// BAR0's size.
    pub fn bar0_size(&self) -> u64 {
        self.bar0_info.size
    }

    /// Whether BAR0 is mapped (else registers go through pread/pwrite).
    pub fn bar0_mapped(&self) -> bool {
        self.bar0.is_some()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some((p, len)) = self.bar0.take() {
            // SAFETY: the mapping made in `from_fds`, owned by us; no reference into it exists.
            unsafe { libc::munmap(p.as_ptr().cast(), len) };
        }
    }
}

/// Whether `path` looks like a PCI address rather than a socket path.
pub fn is_pci_address(s: &str) -> bool {
    !s.contains('/')
        && s.len() == 12
        && s.as_bytes().get(4) == Some(&b':')
        && !Path::new(s).exists()
}
