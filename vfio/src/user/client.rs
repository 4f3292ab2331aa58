//! The driver's end of a vfio-user connection.
//!
//! [`Client`] is blocking with one request in flight. Connecting negotiates the version, then
//! reads the device info and every region's info (with its sparse-mmap areas and mmap fd), which
//! it keeps. Every reply is checked before it is used: it must be a reply to this request (type,
//! message id, command), of a size the request allows, and its error flag turns into
//! [`ClientError::Device`]. A reply that fails those checks, a timeout, or a socket failure
//! leaves the stream out of step, so the client then refuses every later call with
//! [`ClientError::Broken`].

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tracing::debug;

use super::proto::{
    self, command, Capabilities, DeviceInfoBody, DmaMap, DmaUnmap, Header, IrqInfoBody,
    RegionAccess, RegionInfoBody, SetIrqs, HEADER_SIZE, MAX_DATA_XFER_SIZE, MAX_MSG_FDS,
    TYPE_REPLY, VERSION_MAJOR, VERSION_MINOR,
};
use super::sock::{is_hang_up, Link, SockError};
use super::{DeviceInfo, Errno, IrqInfo, RegionInfo};

/// The most regions a device may announce (a PCI device has 9). Each costs one or two round
/// trips at connect time, so a hostile count must not make connecting take forever.
pub const MAX_REGIONS: u32 = 64;

/// The largest `VERSION` reply body accepted (the capability JSON is a few dozen bytes).
const MAX_VERSION_BODY: usize = 64 * 1024;

/// The largest region-info reply (region info plus capabilities) accepted.
const MAX_REGION_INFO_BODY: usize = 64 * 1024;

/// The most body bytes accepted on replies that have none (`DMA_MAP`, `SET_IRQS`, `RESET`);
/// they are read and ignored, so that a server adding a payload does not break the stream.
const MAX_IGNORED_BODY: usize = 256;

/// Why a client call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Connecting to the server's socket failed.
    #[error("connecting to vfio-user socket {path}: {cause}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The failure.
        cause: io::Error,
    },
    /// The socket failed.
    #[error("vfio-user socket failed: {0}")]
    Io(io::Error),
    /// The server closed the connection.
    #[error("vfio-user server closed the connection")]
    Closed,
    /// No (complete) reply came within the timeout.
    #[error("vfio-user server did not reply within the timeout")]
    Timeout,
    /// The server sent something that breaks the protocol.
    #[error("vfio-user protocol violation: {0}")]
    Protocol(String),
    /// The server refused the command with an error reply.
    #[error("vfio-user server refused {}: {errno}", command::name(*command))]
    Device {
        /// The command refused ([`command`]).
        command: u16,
        /// The errno the server gave (0 when it gave none).
        errno: Errno,
    },
    /// The region index is not one of the device's.
    #[error("vfio-user device has no region {0}")]
    NoSuchRegion(u32),
    /// A region access outside the region.
    #[error("{len}-byte access at offset {offset:#x} is outside region {index} ({size} bytes)")]
    OutOfRange {
        /// The region.
        index: u32,
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// The region's size.
        size: u64,
    },
    /// A transfer larger than the negotiated `max_data_xfer_size`.
    #[error("{len}-byte transfer exceeds the negotiated maximum of {max} bytes")]
    TooLarge {
        /// Length asked for.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// More descriptors than the server takes with one message.
    #[error("{count} descriptors exceed the {max} the server takes with one message")]
    TooManyFds {
        /// Descriptors given.
        count: usize,
        /// The server's limit.
        max: u32,
    },
    /// A request this client does not send (the reason says which).
    #[error("unsupported vfio-user request: {0}")]
    Unsupported(&'static str),
    /// An earlier timeout, protocol violation or socket failure left the stream out of step.
    #[error("vfio-user connection is unusable after an earlier failure")]
    Broken,
}

impl ClientError {
    /// Whether the error leaves the stream out of step (the client refuses further calls).
    fn breaks_stream(&self) -> bool {
        matches!(
            self,
            ClientError::Io(_)
                | ClientError::Closed
                | ClientError::Timeout
                | ClientError::Protocol(_)
        )
    }
}

impl From<SockError> for ClientError {
    fn from(error: SockError) -> Self {
        match error {
            SockError::Closed { .. } => ClientError::Closed,
            SockError::Timeout => ClientError::Timeout,
            SockError::Io(error) if is_hang_up(&error) => ClientError::Closed,
            SockError::Io(error) => ClientError::Io(error),
        }
    }
}

fn protocol(why: impl Into<String>) -> ClientError {
    ClientError::Protocol(why.into())
}

/// A reply whose header passed the checks; its body has not been read yet.
struct Pending {
    header: Header,
    body_len: usize,
    fds: Vec<OwnedFd>,
}

/// A blocking vfio-user client: the driver's end of one connection to one device.
#[derive(Debug)]
pub struct Client {
    link: Link,
    next_id: u16,
    broken: bool,
    version: (u16, u16),
    server_caps: Capabilities,
    max_xfer: u32,
    max_fds: u32,
    info: DeviceInfo,
    regions: Vec<RegionInfo>,
}

impl Client {
    /// Connects to the server listening at `path`, then sets up as [`Client::from_stream`].
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|cause| ClientError::Connect {
            path: path.to_path_buf(),
            cause,
        })?;
        Client::from_stream(stream, timeout)
    }

    /// Keeps the socket timeouts as set up from now on (no `setsockopt` per exchange; see
    /// [`Client::from_stream`]): each system call of an exchange is bounded by the timeout,
    /// the exchange by a small multiple of it. For a client in a sandbox without `setsockopt`.
    pub fn fix_timeouts(&mut self) {
        self.link.set_rearm(false);
    }

    /// Takes an already-connected stream (made blocking), negotiates the version, and reads the
    /// device info and every region's info. `timeout` (non-zero) bounds each exchange, this
    /// set-up's and every later call's: a reply not complete by then is
    /// [`ClientError::Timeout`].
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Client, ClientError> {
        if timeout.is_zero() {
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a zero timeout",
            )));
        }
        let link = Link::new(stream, Some(timeout)).map_err(ClientError::Io)?;
        let mut client = Client {
            link,
            next_id: 0,
            broken: false,
            version: (VERSION_MAJOR, VERSION_MINOR),
            server_caps: Capabilities::default(),
            max_xfer: MAX_DATA_XFER_SIZE,
            max_fds: 1,
            info: DeviceInfo::default(),
            regions: Vec::new(),
        };
        client.negotiate()?;
        client.info = client.get_device_info()?;
        let mut regions = Vec::new();
        for index in 0..client.info.num_regions {
            regions.push(client.get_region_info(index)?);
        }
        client.regions = regions;
        debug!(
            version = ?client.version,
            regions = client.regions.len(),
            irqs = client.info.num_irqs,
            "vfio-user client connected"
        );
        Ok(client)
    }

    /// The device's flags and region and interrupt counts.
    pub fn device_info(&self) -> DeviceInfo {
        self.info
    }

    /// The region with `index`, as read at connect time.
    pub fn region(&self, index: u32) -> Option<&RegionInfo> {
        usize::try_from(index)
            .ok()
            .and_then(|index| self.regions.get(index))
    }

    /// The protocol version agreed on, `(major, minor)`.
    pub fn version(&self) -> (u16, u16) {
        self.version
    }

    /// The capabilities the server announced.
    pub fn server_capabilities(&self) -> Capabilities {
        self.server_caps
    }

    /// The largest region read or write this client sends (the smaller of the server's
    /// `max_data_xfer_size` and [`MAX_DATA_XFER_SIZE`]).
    pub fn max_data_xfer_size(&self) -> u32 {
        self.max_xfer
    }

    /// The most descriptors one request may carry (the smaller of the server's `max_msg_fds`
    /// and [`MAX_MSG_FDS`]).
    pub fn max_msg_fds(&self) -> u32 {
        self.max_fds
    }

    /// Whether an earlier failure made the connection unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Reads `buf.len()` bytes of region `index` at `offset`.
    pub fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ClientError> {
        let count = self.check_access(index, offset, buf.len())?;
        if count == 0 {
            return Ok(());
        }
        let request = RegionAccess {
            offset,
            region: index,
            count,
        };
        let expected = RegionAccess::SIZE + buf.len();
        self.call(
            command::REGION_READ,
            &[&request.encode()],
            &[],
            expected,
            |link, pending| {
                if pending.body_len != expected {
                    return Err(protocol(format!(
                        "REGION_READ reply of {} bytes for {count} bytes of data, expected {expected}",
                        pending.body_len
                    )));
                }
                let mut fields = [0u8; RegionAccess::SIZE];
                recv_body(link, &mut fields)?;
                let reply = RegionAccess::decode(&fields).map_err(|e| protocol(e.to_string()))?;
                if reply != request {
                    return Err(protocol(format!(
                        "REGION_READ reply is for {reply:?}, the request was {request:?}"
                    )));
                }
                recv_body(link, buf)
            },
        )
    }

    /// Writes `data` to region `index` at `offset`.
    pub fn region_write(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let count = self.check_access(index, offset, data.len())?;
        if count == 0 {
            return Ok(());
        }
        let request = RegionAccess {
            offset,
            region: index,
            count,
        };
        let body = self.call_simple(
            command::REGION_WRITE,
            &[&request.encode(), data],
            &[],
            RegionAccess::SIZE,
        )?;
        // The spec's reply echoes the access; an empty reply is taken too.
        if !body.is_empty() {
            let reply =
                RegionAccess::decode(&body).map_err(|e| self.poison(protocol(e.to_string())))?;
            if reply != request {
                return Err(self.poison(protocol(format!(
                    "REGION_WRITE reply is for {reply:?}, the request was {request:?}"
                ))));
            }
        }
        Ok(())
    }

    /// Shares `size` bytes of `fd` from `file_offset` with the device at DMA address `iova`.
    /// `readable`/`writable` say what the device may do with it.
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        readable: bool,
        writable: bool,
    ) -> Result<(), ClientError> {
        self.check_fds(1)?;
        let mut flags = 0;
        if readable {
            flags |= proto::DMA_MAP_FLAG_READ;
        }
        if writable {
            flags |= proto::DMA_MAP_FLAG_WRITE;
        }
        let request = DmaMap {
            argsz: DmaMap::SIZE as u32,
            flags,
            offset: file_offset,
            address: iova,
            size,
        };
        self.call_simple(
            command::DMA_MAP,
            &[&request.encode()],
            &[fd],
            MAX_IGNORED_BODY,
        )?;
        Ok(())
    }

    /// Withdraws the DMA mapping at `iova` of `size` bytes (exactly a mapped range).
    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), ClientError> {
        let request = DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            flags: 0,
            address: iova,
            size,
        };
        // The reply echoes the entry (rust-vmm's and the spec's) or is empty; either is fine.
        self.call_simple(
            command::DMA_UNMAP,
            &[&request.encode()],
            &[],
            DmaUnmap::SIZE,
        )?;
        Ok(())
    }

    /// What the device says about interrupt type `index`.
    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfo, ClientError> {
        let request = IrqInfoBody {
            argsz: IrqInfoBody::SIZE as u32,
            flags: 0,
            index,
            count: 0,
        };
        let body = self.call_simple(
            command::DEVICE_GET_IRQ_INFO,
            &[&request.encode()],
            &[],
            IrqInfoBody::SIZE,
        )?;
        let reply = IrqInfoBody::decode(&body).map_err(|e| self.poison(protocol(e.to_string())))?;
        if reply.index != index {
            return Err(self.poison(protocol(format!(
                "DEVICE_GET_IRQ_INFO reply is for index {}, the request was for {index}",
                reply.index
            ))));
        }
        Ok(IrqInfo {
            index,
            flags: reply.flags,
            count: reply.count,
        })
    }

    /// Sets interrupts `start..start + count` of type `index`: `flags` is one
    /// `IRQ_SET_DATA_*` (not `DATA_BOOL`, which this client does not send) and one
    /// `IRQ_SET_ACTION_*`; with `DATA_EVENTFD`, `fds` are the eventfds (none: unwire them).
    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        if flags & proto::IRQ_SET_DATA_BOOL != 0 {
            return Err(ClientError::Unsupported("SET_IRQS with DATA_BOOL"));
        }
        self.check_fds(fds.len())?;
        let request = SetIrqs {
            argsz: SetIrqs::SIZE as u32,
            flags,
            index,
            start,
            count,
        };
        self.call_simple(
            command::DEVICE_SET_IRQS,
            &[&request.encode()],
            fds,
            MAX_IGNORED_BODY,
        )?;
        Ok(())
    }

    /// Resets the device.
    pub fn reset(&mut self) -> Result<(), ClientError> {
        self.call_simple(command::DEVICE_RESET, &[], &[], MAX_IGNORED_BODY)?;
        Ok(())
    }

    /// Shuts the stream down both ways (the server sees the client close). Later calls fail.
    pub fn shutdown(&self) {
        if let Err(error) = self.link.stream().shutdown(std::net::Shutdown::Both) {
            debug!(%error, "vfio-user client shutdown");
        }
    }

    fn negotiate(&mut self) -> Result<(), ClientError> {
        let body = proto::encode_version(VERSION_MAJOR, VERSION_MINOR, &Capabilities::ours());
        let reply = self.call_simple(command::VERSION, &[&body], &[], MAX_VERSION_BODY)?;
        let (version, caps) =
            proto::decode_version(&reply).map_err(|e| self.poison(protocol(e.to_string())))?;
        if version.major != VERSION_MAJOR || version.minor > VERSION_MINOR {
            return Err(self.poison(protocol(format!(
                "server answered version {}.{} to {VERSION_MAJOR}.{VERSION_MINOR}",
                version.major, version.minor
            ))));
        }
        if caps.max_data_xfer_size == 0 {
            return Err(self.poison(protocol("server's max_data_xfer_size is 0")));
        }
        self.version = (version.major, version.minor);
        self.server_caps = caps;
        self.max_xfer = caps.max_data_xfer_size.min(MAX_DATA_XFER_SIZE);
        self.max_fds = caps.max_msg_fds.min(MAX_MSG_FDS);
        Ok(())
    }

    fn get_device_info(&mut self) -> Result<DeviceInfo, ClientError> {
        let request = DeviceInfoBody {
            argsz: DeviceInfoBody::SIZE as u32,
            ..DeviceInfoBody::default()
        };
        let body = self.call_simple(
            command::DEVICE_GET_INFO,
            &[&request.encode()],
            &[],
            DeviceInfoBody::SIZE,
        )?;
        let reply =
            DeviceInfoBody::decode(&body).map_err(|e| self.poison(protocol(e.to_string())))?;
        if reply.num_regions > MAX_REGIONS {
            return Err(self.poison(protocol(format!(
                "device claims {} regions, at most {MAX_REGIONS} are taken",
                reply.num_regions
            ))));
        }
        Ok(DeviceInfo {
            flags: reply.flags,
            num_regions: reply.num_regions,
            num_irqs: reply.num_irqs,
        })
    }

    /// Asks for region `index` with room for the region info alone, then, when the server says
    /// capabilities need more, once more with the size it asked for.
    fn get_region_info(&mut self, index: u32) -> Result<RegionInfo, ClientError> {
        let mut argsz = RegionInfoBody::SIZE;
        let mut fd: Option<OwnedFd> = None;
        for attempt in 0..2 {
            let request = RegionInfoBody {
                argsz: argsz as u32,
                index,
                ..RegionInfoBody::default()
            };
            let (body, fds) = self.call(
                command::DEVICE_GET_REGION_INFO,
                &[&request.encode()],
                &[],
                argsz,
                |link, pending| {
                    // The fd normally comes with the header; take it with any part of the body.
                    let mut body = vec![0u8; pending.body_len];
                    let mut lost = false;
                    link.recv_exact(&mut body, &mut pending.fds, &mut lost)?;
                    Ok((body, std::mem::take(&mut pending.fds)))
                },
            )?;
            let result = self.parse_region_info(index, argsz, attempt, &body, fds, &mut fd);
            match result.map_err(|e| self.poison(e))? {
                RegionStep::Done(info) => return Ok(info),
                RegionStep::AskAgain(needed) => argsz = needed,
            }
        }
        Err(self.poison(protocol(format!(
            "DEVICE_GET_REGION_INFO for region {index} keeps asking for more room"
        ))))
    }

    fn parse_region_info(
        &self,
        index: u32,
        asked: usize,
        attempt: u32,
        body: &[u8],
        mut fds: Vec<OwnedFd>,
        fd: &mut Option<OwnedFd>,
    ) -> Result<RegionStep, ClientError> {
        let reply = RegionInfoBody::decode(body).map_err(|e| protocol(e.to_string()))?;
        if reply.index != index {
            return Err(protocol(format!(
                "DEVICE_GET_REGION_INFO reply is for region {}, the request was for {index}",
                reply.index
            )));
        }
        if fds.len() > 1 {
            return Err(protocol(format!(
                "DEVICE_GET_REGION_INFO reply for region {index} carries {} descriptors",
                fds.len()
            )));
        }
        if let Some(received) = fds.pop() {
            *fd = Some(received);
        }
        let needed = usize::try_from(reply.argsz).unwrap_or(usize::MAX);
        if needed > body.len() {
            if needed <= asked {
                return Err(protocol(format!(
                    "DEVICE_GET_REGION_INFO reply for region {index} gives its size as {needed} bytes but has {}",
                    body.len()
                )));
            }
            if attempt > 0 || needed > MAX_REGION_INFO_BODY {
                return Err(protocol(format!(
                    "DEVICE_GET_REGION_INFO for region {index} needs {needed} bytes after {asked} were offered"
                )));
            }
            return Ok(RegionStep::AskAgain(needed));
        }
        let sparse = proto::parse_region_caps(body, &reply).map_err(|e| protocol(e.to_string()))?;
        for &(offset, size) in &sparse {
            if offset.checked_add(size).is_none_or(|end| end > reply.size) {
                return Err(protocol(format!(
                    "sparse mmap area {offset:#x}+{size:#x} is outside region {index} ({} bytes)",
                    reply.size
                )));
            }
        }
        Ok(RegionStep::Done(RegionInfo {
            index,
            flags: reply.flags,
            size: reply.size,
            offset: reply.offset,
            mmap_fd: fd.take().map(Arc::new),
            sparse,
        }))
    }

    /// Checks a region access against the region and the transfer limit; returns the count.
    fn check_access(&self, index: u32, offset: u64, len: usize) -> Result<u32, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let region = self.region(index).ok_or(ClientError::NoSuchRegion(index))?;
        let count = u32::try_from(len)
            .ok()
            .filter(|&count| count <= self.max_xfer)
            .ok_or(ClientError::TooLarge {
                len,
                max: self.max_xfer,
            })?;
        let in_range = u64::try_from(len)
            .ok()
            .and_then(|len| offset.checked_add(len))
            .is_some_and(|end| end <= region.size);
        if !in_range {
            return Err(ClientError::OutOfRange {
                index,
                offset,
                len,
                size: region.size,
            });
        }
        Ok(count)
    }

    fn check_fds(&self, count: usize) -> Result<(), ClientError> {
        if count > self.max_fds as usize {
            return Err(ClientError::TooManyFds {
                count,
                max: self.max_fds,
            });
        }
        Ok(())
    }

    /// Marks the connection broken when `error` leaves the stream out of step; returns it.
    fn poison(&mut self, error: ClientError) -> ClientError {
        if error.breaks_stream() {
            self.broken = true;
        }
        error
    }

    /// A request whose reply body (at most `max_body` bytes) is returned whole; descriptors
    /// that come with it are closed.
    fn call_simple(
        &mut self,
        command: u16,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
        max_body: usize,
    ) -> Result<Vec<u8>, ClientError> {
        self.call(command, parts, fds, max_body, |link, pending| {
            let mut body = vec![0u8; pending.body_len];
            recv_body(link, &mut body)?;
            Ok(body)
        })
    }

    /// Sends one request and reads its reply: checks the header (a reply, to this id and
    /// command, with a body of at most `max_body` bytes), turns an error reply into
    /// [`ClientError::Device`] (reading its body, if any, so the stream stays in step), and
    /// otherwise lets `read_body` read the body.
    fn call<T>(
        &mut self,
        command: u16,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
        max_body: usize,
        read_body: impl FnOnce(&mut Link, &mut Pending) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let result = self.exchange(command, parts, fds, max_body, read_body);
        result.map_err(|error| self.poison(error))
    }

    fn exchange<T>(
        &mut self,
        command: u16,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
        max_body: usize,
        read_body: impl FnOnce(&mut Link, &mut Pending) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let body_len: usize = parts.iter().map(|part| part.len()).sum();
        let header = Header::command(id, command, body_len).map_err(|_| ClientError::TooLarge {
            len: body_len,
            max: self.max_xfer,
        })?;
        let header_bytes = header.encode();
        let mut message: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        message.push(&header_bytes);
        message.extend_from_slice(parts);

        self.link.begin();
        self.link.send(&message, fds)?;

        let mut reply_bytes = [0u8; HEADER_SIZE];
        let mut reply_fds = Vec::new();
        let mut lost = false;
        self.link
            .recv_exact(&mut reply_bytes, &mut reply_fds, &mut lost)?;
        let reply = Header::decode(&reply_bytes).map_err(|e| protocol(e.to_string()))?;
        let name = command::name(command);
        if reply.message_type() != TYPE_REPLY {
            return Err(protocol(format!(
                "answer to {name} has message type {} (flags {:#x}), not a reply",
                reply.message_type(),
                reply.flags
            )));
        }
        if reply.message_id != id || reply.command != command {
            return Err(protocol(format!(
                "reply to {name} #{id} is for {} #{}",
                command::name(reply.command),
                reply.message_id
            )));
        }
        let body_len = reply
            .body_len()
            .ok()
            .filter(|&len| len <= max_body)
            .ok_or_else(|| {
                protocol(format!(
                    "reply to {name} claims {} bytes, at most {} expected",
                    reply.message_size,
                    HEADER_SIZE + max_body
                ))
            })?;
        if reply.is_error() {
            self.link.discard(body_len)?;
            return Err(ClientError::Device {
                command,
                errno: Errno(reply.error),
            });
        }
        let mut pending = Pending {
            header: reply,
            body_len,
            fds: reply_fds,
        };
        let value = read_body(&mut self.link, &mut pending)?;
        if lost {
            debug!(
                command = name,
                id = pending.header.message_id,
                "vfio-user reply came with more descriptors than taken; closed them"
            );
        }
        Ok(value)
    }
}

enum RegionStep {
    Done(RegionInfo),
    AskAgain(usize),
}

/// Reads the next `buf.len()` bytes of a reply body; descriptors among them are closed.
fn recv_body(link: &mut Link, buf: &mut [u8]) -> Result<(), ClientError> {
    let mut fds = Vec::new();
    let mut lost = false;
    link.recv_exact(buf, &mut fds, &mut lost)?;
    Ok(())
}
