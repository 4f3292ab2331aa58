//! Shared test fixtures: a memory-backed PCI-like [`Device`] for our server, memfds, eventfds.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use duplex_vfio::user::proto::{self, PCI_CONFIG_REGION_INDEX, PCI_MSIX_IRQ_INDEX};
use duplex_vfio::user::{Device, DeviceInfo, DmaTable, Errno, IrqInfo, RegionInfo};
use rustix::fs::{ftruncate, memfd_create, MemfdFlags};

/// BAR0's size: 16 KiB, backed by a memfd the client may mmap (its first and third pages,
/// through the sparse-mmap capability).
pub const BAR0_SIZE: u64 = 0x4000;
/// The sparse mmap areas of BAR0.
pub const BAR0_SPARSE: [(u64, u64); 2] = [(0, 0x1000), (0x2000, 0x2000)];
/// Writing a `u32` vector number here signals that MSI-X vector's eventfd.
pub const DOORBELL_IRQ: u64 = 0x100;
/// Writing `src: u64, dst: u64, len: u64` here copies `len` bytes of DMA memory from `src` to
/// `dst` through the device's [`DmaTable`].
pub const DOORBELL_DMA: u64 = 0x200;
/// Any write here fails with `EINVAL`.
pub const POISON: u64 = 0x300;
/// The config region's size.
pub const CONFIG_SIZE: u64 = 4096;
/// MSI-X vectors.
pub const MSIX_COUNT: u32 = 4;

/// A DMA_MAP the device saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenMap {
    pub iova: u64,
    pub size: u64,
    pub file_offset: u64,
    pub readable: bool,
    pub writable: bool,
    pub had_fd: bool,
}

/// What the device saw, for the test to look at.
#[derive(Debug, Default)]
pub struct Seen {
    pub maps: Vec<SeenMap>,
    pub unmaps: Vec<(u64, u64)>,
    pub set_irqs: Vec<(u32, u32, u32, u32, usize)>,
    pub resets: u32,
    pub dma_errors: Vec<String>,
}

/// A PCI-like device: BAR0 (memfd-backed, mmap-able in parts), a config region, MSI-X.
#[derive(Debug)]
pub struct MemDevice {
    pub bar0_fd: Arc<OwnedFd>,
    pub config: Vec<u8>,
    pub dma: DmaTable,
    pub vectors: HashMap<u32, OwnedFd>,
    pub seen: Arc<Mutex<Seen>>,
}

impl MemDevice {
    pub fn new() -> (MemDevice, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let device = MemDevice {
            bar0_fd: Arc::new(memfd(BAR0_SIZE)),
            config: vec![0; CONFIG_SIZE as usize],
            dma: DmaTable::new(),
            vectors: HashMap::new(),
            seen: Arc::clone(&seen),
        };
        (device, seen)
    }

    fn bar0(&self) -> File {
        File::from(self.bar0_fd.try_clone().expect("dup BAR0 memfd"))
    }

    fn doorbell(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match offset {
            DOORBELL_IRQ => {
                let vector = u32::from_ne_bytes(data.try_into().map_err(|_| Errno::EINVAL)?);
                let fd = self.vectors.get(&vector).ok_or(Errno::EINVAL)?;
                signal(fd);
                Ok(())
            }
            DOORBELL_DMA => {
                if data.len() != 24 {
                    return Err(Errno::EINVAL);
                }
                let word = |i: usize| {
                    u64::from_ne_bytes(data[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
                };
                let (src, dst, len) = (word(0), word(1), word(2));
                let mut buf = vec![0u8; len as usize];
                let result = self
                    .dma
                    .read(src, &mut buf)
                    .and_then(|()| self.dma.write(dst, &buf));
                result.map_err(|error| {
                    let errno = error.errno();
                    self.seen
                        .lock()
                        .expect("seen lock")
                        .dma_errors
                        .push(error.to_string());
                    errno
                })
            }
            POISON => Err(Errno::EINVAL),
            _ => {
                self.bar0()
                    .write_all_at(data, offset)
                    .map_err(Errno::from)?;
                Ok(())
            }
        }
    }
}

impl Device for MemDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: proto::DEVICE_FLAGS_PCI | proto::DEVICE_FLAGS_RESET,
            num_regions: proto::PCI_NUM_REGIONS,
            num_irqs: proto::PCI_NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let rw = proto::REGION_INFO_FLAG_READ | proto::REGION_INFO_FLAG_WRITE;
        match index {
            0 => Some(RegionInfo {
                index,
                flags: rw | proto::REGION_INFO_FLAG_MMAP,
                size: BAR0_SIZE,
                offset: 0,
                mmap_fd: Some(Arc::clone(&self.bar0_fd)),
                sparse: BAR0_SPARSE.to_vec(),
            }),
            PCI_CONFIG_REGION_INDEX => Some(RegionInfo {
                index,
                flags: rw,
                size: CONFIG_SIZE,
                ..RegionInfo::default()
            }),
            // The ROM: read-only, one page.
            6 => Some(RegionInfo {
                index,
                flags: proto::REGION_INFO_FLAG_READ,
                size: 4096,
                ..RegionInfo::default()
            }),
            i if i < proto::PCI_NUM_REGIONS => Some(RegionInfo {
                index,
                ..RegionInfo::default()
            }),
            _ => None,
        }
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        (index < proto::PCI_NUM_IRQS).then_some(IrqInfo {
            index,
            flags: proto::IRQ_INFO_EVENTFD,
            count: if index == PCI_MSIX_IRQ_INDEX {
                MSIX_COUNT
            } else {
                0
            },
        })
    }

    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        match index {
            0 => self.bar0().read_exact_at(buf, offset).map_err(Errno::from),
            PCI_CONFIG_REGION_INDEX => {
                let at = offset as usize;
                buf.copy_from_slice(&self.config[at..at + buf.len()]);
                Ok(())
            }
            6 => {
                buf.fill(0xee);
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match index {
            0 => self.doorbell(offset, data),
            PCI_CONFIG_REGION_INDEX => {
                let at = offset as usize;
                self.config[at..at + data.len()].copy_from_slice(data);
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }

    fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        file_offset: u64,
        readable: bool,
        writable: bool,
        fd: Option<OwnedFd>,
    ) -> Result<(), Errno> {
        self.seen.lock().expect("seen lock").maps.push(SeenMap {
            iova,
            size,
            file_offset,
            readable,
            writable,
            had_fd: fd.is_some(),
        });
        let fd = fd.ok_or(Errno::EINVAL)?;
        self.dma
            .map(iova, size, file_offset, readable, writable, fd)
            .map_err(|error| error.errno())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), Errno> {
        self.seen
            .lock()
            .expect("seen lock")
            .unmaps
            .push((iova, size));
        self.dma.unmap(iova, size).map_err(|error| error.errno())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Errno> {
        self.seen
            .lock()
            .expect("seen lock")
            .set_irqs
            .push((index, flags, start, count, fds.len()));
        if index != PCI_MSIX_IRQ_INDEX {
            return Ok(());
        }
        if fds.is_empty() {
            for vector in start..start + count {
                self.vectors.remove(&vector);
            }
        }
        for (vector, fd) in (start..).zip(fds) {
            self.vectors.insert(vector, fd);
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        self.seen.lock().expect("seen lock").resets += 1;
        self.vectors.clear();
        self.dma.clear();
        Ok(())
    }
}

/// A memfd of `size` bytes.
pub fn memfd(size: u64) -> OwnedFd {
    let fd = memfd_create("duplex-vfio-test", MemfdFlags::CLOEXEC).expect("memfd_create");
    ftruncate(&fd, size).expect("ftruncate memfd");
    fd
}

/// A blocking eventfd.
pub fn eventfd() -> OwnedFd {
    nix::sys::eventfd::EventFd::from_value_and_flags(0, nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
        .expect("eventfd")
        .into()
}

/// Adds 1 to an eventfd.
pub fn signal(fd: impl AsFd) {
    let mut file = File::from(fd.as_fd().try_clone_to_owned().expect("dup eventfd"));
    file.write_all(&1u64.to_ne_bytes()).expect("signal eventfd");
}

/// Reads (and so resets) an eventfd's counter, waiting for it to be non-zero.
pub fn wait(fd: impl AsFd) -> u64 {
    let mut file = File::from(fd.as_fd().try_clone_to_owned().expect("dup eventfd"));
    let mut value = [0u8; 8];
    file.read_exact(&mut value).expect("read eventfd");
    u64::from_ne_bytes(value)
}

/// Reads `len` bytes of `fd` at `offset`.
pub fn pread(fd: impl AsFd, offset: u64, len: usize) -> Vec<u8> {
    let file = File::from(fd.as_fd().try_clone_to_owned().expect("dup fd"));
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).expect("pread");
    buf
}

/// Writes `data` to `fd` at `offset`.
pub fn pwrite(fd: impl AsFd, offset: u64, data: &[u8]) {
    let file = File::from(fd.as_fd().try_clone_to_owned().expect("dup fd"));
    file.write_all_at(data, offset).expect("pwrite");
}

/// The 24 bytes a DMA-copy doorbell write takes.
pub fn dma_copy(src: u64, dst: u64, len: u64) -> Vec<u8> {
    [src, dst, len]
        .iter()
        .flat_map(|word| word.to_ne_bytes())
        .collect()
}

/// A recognisable pattern of `len` bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The bytes of a message: a header with `command`, `id` and `flags`, then `body`.
pub fn message(command: u16, id: u16, flags: u32, body: &[u8]) -> Vec<u8> {
    let header = proto::Header {
        message_id: id,
        command,
        message_size: (proto::HEADER_SIZE + body.len()) as u32,
        flags,
        error: 0,
    };
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// A `VERSION` command as a client sends it.
pub fn version_message(id: u16) -> Vec<u8> {
    let body = proto::encode_version(0, 1, &proto::Capabilities::ours());
    message(proto::command::VERSION, id, proto::TYPE_COMMAND, &body)
}

/// Sends `bytes` as one `sendmsg`, with `fds` (fails the test on a short send).
pub fn send_with_fds(
    stream: &std::os::unix::net::UnixStream,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> std::io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = vec![std::mem::MaybeUninit::<u8>::uninit(); 16 + fds.len() * 8 + 64];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let sent = sendmsg(
        stream,
        &[std::io::IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent < bytes.len() {
        (&*stream).write_all(&bytes[sent..])?;
    }
    Ok(())
}

/// Reads one reply (header and body) as a client would; `None` at the end of the stream.
pub fn read_reply(stream: &mut std::os::unix::net::UnixStream) -> Option<(proto::Header, Vec<u8>)> {
    let mut header = [0u8; proto::HEADER_SIZE];
    stream.read_exact(&mut header).ok()?;
    let header = proto::Header::decode(&header).expect("16 bytes");
    let mut body = vec![0u8; header.body_len().expect("the server's message size")];
    stream
        .read_exact(&mut body)
        .expect("the server's reply body");
    Some((header, body))
}
