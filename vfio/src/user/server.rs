//! The device's end of a vfio-user connection.
//!
//! [`serve`] runs one client's connection to completion over a [`Device`]. It reads each
//! message whole (exactly `message_size` bytes, even one it refuses, so a bad request never
//! puts the stream out of step), checks it (sizes, region bounds and permissions, interrupt
//! ranges, flag combinations) before the device sees it, and answers with a reply or an error
//! reply carrying an errno, unless the command set the no-reply flag. Descriptors that come with
//! a message go to the device when the command takes them and are closed otherwise.
//!
//! Only a message whose `message_size` is below the header or above
//! [`MAX_MESSAGE_SIZE`] ends the connection (after an error
//! reply): its end cannot be found, so nothing after it can be read in step.
//!
//! Refusals a client can provoke are logged as warnings, at most
//! [`WARNINGS_PER_SECOND`] a second; the rest are counted and the count is logged with the
//! next warning let through.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, warn};

use super::proto::{
    self, command, Capabilities, DeviceInfoBody, DmaMap, DmaUnmap, Header, IrqInfoBody,
    RegionAccess, RegionInfoBody, SetIrqs, HEADER_SIZE, MAX_DATA_XFER_SIZE, MAX_MESSAGE_SIZE,
    TYPE_COMMAND, VERSION_MAJOR, VERSION_MINOR,
};
use super::sock::{is_hang_up, Link, SockError};
use super::{DeviceInfo, Errno, IrqInfo, RegionInfo};

/// The most warnings about a client's requests logged per second.
pub const WARNINGS_PER_SECOND: u32 = 10;

/// A device served over vfio-user: what [`serve`] asks about it and tells it.
///
/// The server has already checked what it can before calling: region accesses are within
/// [`Device::region_info`]'s size and allowed by its flags, at most
/// [`MAX_DATA_XFER_SIZE`] bytes; `set_irqs` has one data type
/// and one action, an index [`Device::irq_info`] knows, a range within its count, and (with
/// `IRQ_SET_DATA_EVENTFD`) either no eventfds or one per interrupt; `dma_map` flags hold only
/// read and write. An error returned is sent to the client as the reply's errno.
pub trait Device {
    /// Flags and region and interrupt counts (`DEVICE_GET_INFO`).
    fn info(&self) -> DeviceInfo;

    /// Region `index`, or `None` for an index the device does not have. Its `index` field is
    /// ignored; `sparse` areas are sent as the sparse-mmap capability, and `mmap_fd` with the
    /// complete reply.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;

    /// Interrupt type `index`, or `None` for an index the device does not have.
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;

    /// Reads `buf.len()` bytes of region `index` at `offset` (checked to be inside it).
    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno>;

    /// Writes `data` to region `index` at `offset` (checked to be inside it).
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno>;

    /// The client shares `size` bytes of `fd` from `file_offset` at DMA address `iova` (see
    /// [`DmaTable`](super::DmaTable)). `fd` is `None` when the client sent no descriptor.
    fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        file_offset: u64,
        readable: bool,
        writable: bool,
        fd: Option<OwnedFd>,
    ) -> Result<(), Errno>;

    /// The client withdraws the mapping at `iova` of `size` bytes. The device must be done with
    /// the memory when this returns.
    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), Errno>;

    /// Sets interrupts `start..start + count` of type `index` (`flags`: one `IRQ_SET_DATA_*`,
    /// never `DATA_BOOL`, and one `IRQ_SET_ACTION_*`). With `IRQ_SET_DATA_EVENTFD`, `fds` holds
    /// one eventfd per interrupt, or none to unwire them. `count == 0` with `DATA_NONE` means
    /// every interrupt of the type.
    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Errno>;

    /// Resets the device.
    fn reset(&mut self) -> Result<(), Errno>;
}

/// Why [`serve`] stopped, other than the client closing between messages.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The socket failed (a read timeout set on the stream by the caller shows up here too).
    #[error("vfio-user socket failed: {0}")]
    Io(io::Error),
    /// The client closed the connection in the middle of a message.
    #[error("vfio-user client closed the connection in the middle of a message")]
    Truncated,
    /// A message size that leaves the rest of the stream unreadable.
    #[error(
        "vfio-user client sent a message size of {0}, outside {HEADER_SIZE}..={MAX_MESSAGE_SIZE}"
    )]
    MessageSize(u32),
}

impl From<SockError> for ServeError {
    fn from(error: SockError) -> Self {
        match error {
            SockError::Closed { .. } => ServeError::Truncated,
            SockError::Timeout => ServeError::Io(io::ErrorKind::TimedOut.into()),
            SockError::Io(error) => ServeError::Io(error),
        }
    }
}

/// Serves `device` to the client at the other end of `stream` until the client closes the
/// connection between two messages or before reading a reply (`Ok`), closes it mid-message,
/// sends a message whose size cannot be framed, or the socket fails.
///
/// The stream is made blocking; timeouts the caller set on it are kept (a read timeout then ends
/// the connection when the client is idle that long).
pub fn serve(stream: UnixStream, device: &mut dyn Device) -> Result<(), ServeError> {
    let link = Link::new(stream, None).map_err(ServeError::Io)?;
    let mut server = Server {
        link,
        device,
        negotiated: false,
        client_max_fds: 1,
        warnings: RateLimit::default(),
    };
    server.run()
}

/// A refused request: the errno for the client and the reason for the log.
struct Refusal {
    errno: Errno,
    why: String,
}

fn refuse(errno: Errno, why: impl Into<String>) -> Refusal {
    Refusal {
        errno,
        why: why.into(),
    }
}

fn malformed(error: proto::ProtoError) -> Refusal {
    refuse(Errno::EINVAL, error.to_string())
}

fn device_refused(errno: Errno) -> Refusal {
    refuse(errno, "the device refused it")
}

/// A successful reply's body and the descriptor that goes with it.
#[derive(Default)]
struct Reply {
    body: Vec<u8>,
    fd: Option<Arc<OwnedFd>>,
}

impl Reply {
    fn body(body: impl Into<Vec<u8>>) -> Self {
        Reply {
            body: body.into(),
            fd: None,
        }
    }
}

/// At most [`WARNINGS_PER_SECOND`] warnings a second; the rest counted.
#[derive(Debug)]
struct RateLimit {
    window: Instant,
    emitted: u32,
    suppressed: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            window: Instant::now(),
            emitted: 0,
            suppressed: 0,
        }
    }
}

impl RateLimit {
    /// `Some(number suppressed since the last one let through)` when a warning may be logged.
    fn admit(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.emitted = 0;
        }
        if self.emitted < WARNINGS_PER_SECOND {
            self.emitted += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }
}

struct Server<'d> {
    link: Link,
    device: &'d mut dyn Device,
    negotiated: bool,
    /// How many descriptors the client takes with one message (its `max_msg_fds`).
    client_max_fds: u32,
    warnings: RateLimit,
}

impl Server<'_> {
    fn run(&mut self) -> Result<(), ServeError> {
        let mut body = Vec::new();
        loop {
            let mut header_bytes = [0u8; HEADER_SIZE];
            let mut fds = Vec::new();
            let mut fds_lost = false;
            match self
                .link
                .recv_exact(&mut header_bytes, &mut fds, &mut fds_lost)
            {
                Ok(()) => {}
                Err(SockError::Closed { got: 0 }) => {
                    debug!("vfio-user client closed the connection");
                    return Ok(());
                }
                Err(SockError::Io(error)) if is_hang_up(&error) => {
                    debug!(%error, "vfio-user client closed the connection");
                    return Ok(());
                }
                Err(error) => return Err(error.into()),
            }
            let header = Header::decode(&header_bytes).map_err(|_| ServeError::Truncated)?;
            let body_len = match header.body_len() {
                Ok(len) => len,
                Err(error) => {
                    let errno = if (header.message_size as usize) < HEADER_SIZE {
                        Errno::EINVAL
                    } else {
                        Errno::E2BIG
                    };
                    self.warn(&header, errno, &error.to_string());
                    if !header.no_reply() {
                        // Best effort: the connection ends either way.
                        let _ = self.send_error(&header, errno);
                    }
                    return Err(ServeError::MessageSize(header.message_size));
                }
            };
            body.clear();
            body.resize(body_len, 0);
            match self.link.recv_exact(&mut body, &mut fds, &mut fds_lost) {
                Ok(()) => {}
                Err(SockError::Io(error)) if is_hang_up(&error) => {
                    return Err(ServeError::Truncated)
                }
                Err(error) => return Err(error.into()),
            }

            let sent = match self.handle(&header, &body, fds, fds_lost) {
                Ok(_) if header.no_reply() => Ok(()),
                Ok(reply) => self.send_reply(&header, reply),
                Err(refusal) => {
                    self.warn(&header, refusal.errno, &refusal.why);
                    if header.no_reply() {
                        Ok(())
                    } else {
                        self.send_error(&header, refusal.errno)
                    }
                }
            };
            match sent {
                Ok(()) => {}
                // The client went away before reading its reply.
                Err(ServeError::Io(error)) if is_hang_up(&error) => {
                    debug!(%error, "vfio-user client closed the connection before its reply");
                    return Ok(());
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn warn(&mut self, header: &Header, errno: Errno, why: &str) {
        if let Some(suppressed) = self.warnings.admit() {
            warn!(
                command = command::name(header.command),
                number = header.command,
                id = header.message_id,
                %errno,
                suppressed,
                "vfio-user request refused: {why}"
            );
        }
    }

    fn send_reply(&mut self, request: &Header, reply: Reply) -> Result<(), ServeError> {
        let Ok(header) = request.reply(reply.body.len()) else {
            return self.send_error(request, Errno::E2BIG);
        };
        let fd: Option<BorrowedFd<'_>> = reply.fd.as_deref().map(AsFd::as_fd);
        let fds: &[BorrowedFd<'_>] = match &fd {
            Some(fd) => std::slice::from_ref(fd),
            None => &[],
        };
        self.link.send(&[&header.encode(), &reply.body], fds)?;
        Ok(())
    }

    fn send_error(&mut self, request: &Header, errno: Errno) -> Result<(), ServeError> {
        // An errno of 0 would read as "no error given"; say EIO instead.
        let errno = if errno.0 == 0 { Errno::EIO } else { errno };
        self.link
            .send(&[&request.error_reply(errno.0).encode()], &[])?;
        Ok(())
    }

    fn handle(
        &mut self,
        header: &Header,
        body: &[u8],
        fds: Vec<OwnedFd>,
        fds_lost: bool,
    ) -> Result<Reply, Refusal> {
        if header.message_type() != TYPE_COMMAND {
            return Err(refuse(
                Errno::EINVAL,
                format!("message type {} is not a command", header.message_type()),
            ));
        }
        if fds_lost {
            return Err(refuse(
                Errno::EINVAL,
                format!("more than {} descriptors", proto::MAX_MSG_FDS),
            ));
        }
        if !self.negotiated && header.command != command::VERSION {
            return Err(refuse(Errno::EINVAL, "the first message must be VERSION"));
        }
        match header.command {
            command::VERSION => self.version(body),
            command::DEVICE_GET_INFO => self.device_info(body),
            command::DEVICE_GET_REGION_INFO => self.region_info(body),
            command::DEVICE_GET_IRQ_INFO => self.irq_info(body),
            command::DEVICE_SET_IRQS => self.set_irqs(body, fds),
            command::REGION_READ => self.region_read(body),
            command::REGION_WRITE => self.region_write(body),
            command::DMA_MAP => self.dma_map(body, fds),
            command::DMA_UNMAP => self.dma_unmap(body),
            command::DEVICE_RESET => {
                self.device.reset().map_err(device_refused)?;
                Ok(Reply::default())
            }
            _ => Err(refuse(Errno::ENOTSUP, "command not supported")),
        }
    }

    fn version(&mut self, body: &[u8]) -> Result<Reply, Refusal> {
        if self.negotiated {
            return Err(refuse(Errno::EINVAL, "version already negotiated"));
        }
        let (version, caps) = proto::decode_version(body).map_err(malformed)?;
        if version.major != VERSION_MAJOR {
            return Err(refuse(
                Errno::ENOTSUP,
                format!("client speaks major version {}", version.major),
            ));
        }
        let minor = version.minor.min(VERSION_MINOR);
        self.negotiated = true;
        self.client_max_fds = caps.max_msg_fds;
        debug!(
            major = version.major,
            minor = version.minor,
            ?caps,
            "vfio-user client version"
        );
        Ok(Reply::body(proto::encode_version(
            VERSION_MAJOR,
            minor,
            &Capabilities::ours(),
        )))
    }

    fn device_info(&mut self, body: &[u8]) -> Result<Reply, Refusal> {
        let request = DeviceInfoBody::decode(body).map_err(malformed)?;
        check_argsz(request.argsz, DeviceInfoBody::SIZE)?;
        let info = self.device.info();
        Ok(Reply::body(
            DeviceInfoBody {
                argsz: DeviceInfoBody::SIZE as u32,
                flags: info.flags,
                num_regions: info.num_regions,
                num_irqs: info.num_irqs,
            }
            .encode(),
        ))
    }

    /// Region `index`, if the device has it.
    fn region(&self, index: u32) -> Result<RegionInfo, Refusal> {
        if index >= self.device.info().num_regions {
            return Err(refuse(Errno::EINVAL, format!("no region {index}")));
        }
        self.device
            .region_info(index)
            .ok_or_else(|| refuse(Errno::EINVAL, format!("no region {index}")))
    }

    fn region_info(&mut self, body: &[u8]) -> Result<Reply, Refusal> {
        let request = RegionInfoBody::decode(body).map_err(malformed)?;
        check_argsz(request.argsz, RegionInfoBody::SIZE)?;
        let region = self.region(request.index)?;
        let caps = if region.sparse.is_empty() {
            Vec::new()
        } else {
            proto::encode_sparse_mmap_cap(&region.sparse)
        };
        let full = RegionInfoBody::SIZE + caps.len();
        let mut flags = region.flags & !proto::REGION_INFO_FLAG_CAPS;
        let mut cap_offset = 0;
        if !caps.is_empty() {
            flags |= proto::REGION_INFO_FLAG_CAPS;
            cap_offset = RegionInfoBody::SIZE as u32;
        }
        let info = RegionInfoBody {
            argsz: u32::try_from(full).unwrap_or(u32::MAX),
            flags,
            index: request.index,
            cap_offset,
            size: region.size,
            offset: region.offset,
        };
        let mut reply = Reply::body(info.encode());
        // Too little room: the region info alone, whose argsz tells the client what to ask for.
        // Otherwise the capabilities too, and the mmap fd if the client takes descriptors.
        let complete = usize::try_from(request.argsz).is_ok_and(|argsz| argsz >= full);
        if complete {
            reply.body.extend_from_slice(&caps);
            if self.client_max_fds > 0 {
                reply.fd = region.mmap_fd;
            }
        }
        Ok(reply)
    }

    fn irq_info(&mut self, body: &[u8]) -> Result<Reply, Refusal> {
        let request = IrqInfoBody::decode(body).map_err(malformed)?;
        check_argsz(request.argsz, IrqInfoBody::SIZE)?;
        let irq = self.irq(request.index)?;
        Ok(Reply::body(
            IrqInfoBody {
                argsz: IrqInfoBody::SIZE as u32,
                flags: irq.flags,
                index: request.index,
                count: irq.count,
            }
            .encode(),
        ))
    }

    /// Interrupt type `index`, if the device has it.
    fn irq(&self, index: u32) -> Result<IrqInfo, Refusal> {
        if index >= self.device.info().num_irqs {
            return Err(refuse(Errno::EINVAL, format!("no interrupt type {index}")));
        }
        self.device
            .irq_info(index)
            .ok_or_else(|| refuse(Errno::EINVAL, format!("no interrupt type {index}")))
    }

    fn set_irqs(&mut self, body: &[u8], fds: Vec<OwnedFd>) -> Result<Reply, Refusal> {
        let request = SetIrqs::decode(body).map_err(malformed)?;
        check_argsz(request.argsz, SetIrqs::SIZE)?;
        let SetIrqs {
            flags,
            index,
            start,
            count,
            ..
        } = request;
        let data = flags & proto::IRQ_SET_DATA_TYPE_MASK;
        let action = flags & proto::IRQ_SET_ACTION_TYPE_MASK;
        if flags & !(proto::IRQ_SET_DATA_TYPE_MASK | proto::IRQ_SET_ACTION_TYPE_MASK) != 0
            || data.count_ones() != 1
            || action.count_ones() != 1
        {
            return Err(refuse(
                Errno::EINVAL,
                format!("SET_IRQS flags {flags:#x} need one data type and one action"),
            ));
        }
        if data == proto::IRQ_SET_DATA_BOOL {
            return Err(refuse(Errno::ENOTSUP, "SET_IRQS with DATA_BOOL"));
        }
        let irq = self.irq(index)?;
        let all = count == 0 && start == 0 && data == proto::IRQ_SET_DATA_NONE;
        let in_range = start
            .checked_add(count)
            .is_some_and(|end| end <= irq.count && count > 0);
        if !all && !in_range {
            return Err(refuse(
                Errno::EINVAL,
                format!(
                    "interrupts {start}+{count} of type {index}, which has {}",
                    irq.count
                ),
            ));
        }
        let fds_ok = match data {
            proto::IRQ_SET_DATA_EVENTFD => fds.is_empty() || fds.len() == count as usize,
            _ => fds.is_empty(),
        };
        if !fds_ok {
            return Err(refuse(
                Errno::EINVAL,
                format!("{} descriptors for {count} interrupts", fds.len()),
            ));
        }
        self.device
            .set_irqs(index, flags, start, count, fds)
            .map_err(device_refused)?;
        Ok(Reply::default())
    }

    /// Checks an access to a region for the flag it needs, its size and its bounds.
    fn check_access(
        &self,
        access: &RegionAccess,
        flag: u32,
        data_len: usize,
    ) -> Result<(), Refusal> {
        if access.count > MAX_DATA_XFER_SIZE {
            return Err(refuse(
                Errno::E2BIG,
                format!("{} bytes exceed {MAX_DATA_XFER_SIZE}", access.count),
            ));
        }
        if data_len != access.count as usize {
            return Err(refuse(
                Errno::EINVAL,
                format!("count {} with {data_len} bytes of data", access.count),
            ));
        }
        let region = self.region(access.region)?;
        if region.flags & flag == 0 {
            return Err(refuse(
                Errno::EACCES,
                format!(
                    "region {} does not allow it (flags {:#x})",
                    access.region, region.flags
                ),
            ));
        }
        let inside = access
            .offset
            .checked_add(u64::from(access.count))
            .is_some_and(|end| end <= region.size);
        if !inside {
            return Err(refuse(
                Errno::EINVAL,
                format!(
                    "{} bytes at {:#x} are outside region {} ({} bytes)",
                    access.count, access.offset, access.region, region.size
                ),
            ));
        }
        Ok(())
    }

    fn region_read(&mut self, body: &[u8]) -> Result<Reply, Refusal> {
        let access = RegionAccess::decode(body).map_err(malformed)?;
        if body.len() != RegionAccess::SIZE {
            return Err(refuse(Errno::EINVAL, "REGION_READ with data"));
        }
        self.check_access(&access, proto::REGION_INFO_FLAG_READ, access.count as usize)?;
        let mut reply = Vec::with_capacity(RegionAccess::SIZE + access.count as usize);
        reply.extend_from_slice(&access.encode());
        reply.resize(RegionAccess::SIZE + access.count as usize, 0);
        let buf = reply.get_mut(RegionAccess::SIZE..).unwrap_or_default();
        self.device
            .region_read(access.region, access.offset, buf)
            .map_err(device_refused)?;
        Ok(Reply::body(reply))
    }

    fn region_write(&mut self, body: &[u8]) -> Result<Reply, Refusal> {
        let access = RegionAccess::decode(body).map_err(malformed)?;
        let data = body.get(RegionAccess::SIZE..).unwrap_or_default();
        self.check_access(&access, proto::REGION_INFO_FLAG_WRITE, data.len())?;
        self.device
            .region_write(access.region, access.offset, data)
            .map_err(device_refused)?;
        Ok(Reply::body(access.encode()))
    }

    fn dma_map(&mut self, body: &[u8], mut fds: Vec<OwnedFd>) -> Result<Reply, Refusal> {
        let request = DmaMap::decode(body).map_err(malformed)?;
        check_argsz(request.argsz, DmaMap::SIZE)?;
        let known = proto::DMA_MAP_FLAG_READ | proto::DMA_MAP_FLAG_WRITE;
        if request.flags & !known != 0 {
            return Err(refuse(
                Errno::EINVAL,
                format!("DMA_MAP flags {:#x}", request.flags),
            ));
        }
        if fds.len() > 1 {
            return Err(refuse(
                Errno::EINVAL,
                format!("DMA_MAP with {} descriptors", fds.len()),
            ));
        }
        self.device
            .dma_map(
                request.address,
                request.size,
                request.offset,
                request.flags & proto::DMA_MAP_FLAG_READ != 0,
                request.flags & proto::DMA_MAP_FLAG_WRITE != 0,
                fds.pop(),
            )
            .map_err(device_refused)?;
        Ok(Reply::default())
    }

    fn dma_unmap(&mut self, body: &[u8]) -> Result<Reply, Refusal> {
        let request = DmaUnmap::decode(body).map_err(malformed)?;
        check_argsz(request.argsz, DmaUnmap::SIZE)?;
        if request.flags != 0 {
            return Err(refuse(
                Errno::ENOTSUP,
                format!("DMA_UNMAP flags {:#x}", request.flags),
            ));
        }
        self.device
            .dma_unmap(request.address, request.size)
            .map_err(device_refused)?;
        Ok(Reply::body(
            DmaUnmap {
                argsz: DmaUnmap::SIZE as u32,
                ..request
            }
            .encode(),
        ))
    }
}

/// Refuses an `argsz` smaller than the structure it describes.
fn check_argsz(argsz: u32, size: usize) -> Result<(), Refusal> {
    if usize::try_from(argsz).is_ok_and(|argsz| argsz >= size) {
        Ok(())
    } else {
        Err(refuse(
            Errno::EINVAL,
            format!("argsz {argsz} is below the {size}-byte structure"),
        ))
    }
}
