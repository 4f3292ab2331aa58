//! Fuzz targets for [`serve`]: whatever a client writes, the server never panics, answers only
//! with well-formed replies, and either stays able to serve or closes cleanly.
//!
//! * `arbitrary_bytes` writes raw bytes (after a valid `VERSION` or not) and closes: the server
//!   must end with `Ok` or a framing error, never a panic or a socket failure, and every reply
//!   it wrote must be a well-formed reply.
//! * `framed_messages` writes a valid `VERSION`, then well-framed messages with fuzzer-chosen
//!   commands, flags and bodies (region accesses, region and interrupt queries, `SET_IRQS`,
//!   `DMA_MAP` with and without a memfd, `DMA_UNMAP`, device DMA copies), then a probe: the
//!   probe's reply must come back correct, so no message put the server out of step.
//!
//! Under plain `cargo test` each target runs bolero's random engine for a bounded number of
//! iterations (the constants below; a few seconds in the default `dev` profile). To run longer:
//!
//! ```text
//! BOLERO_RANDOM_ITERATIONS=1000000 BOLERO_RANDOM_TEST_TIME_MS=600000 \
//!     cargo test --release -p duplex-vfio --test fuzz_serve
//! ```
//!
//! A failure prints `BOLERO_RANDOM_SEED=...`; set that variable to replay it.

mod common;

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use common::{dma_copy, memfd, message, send_with_fds, version_message, MemDevice, DOORBELL_DMA};
use duplex_vfio::user::proto::{
    self, command, DeviceInfoBody, DmaMap, DmaUnmap, Header, IrqInfoBody, RegionAccess,
    RegionInfoBody, SetIrqs, HEADER_SIZE, TYPE_COMMAND, TYPE_REPLY,
};
use duplex_vfio::user::{serve, ServeError};

/// Iterations of `arbitrary_bytes` under `cargo test`, unless `BOLERO_RANDOM_ITERATIONS` says
/// otherwise.
const BYTES_ITERATIONS: usize = 10_000;
/// Iterations of `framed_messages` under `cargo test`.
const FRAMED_ITERATIONS: usize = 10_000;
/// Wall-clock cap per target, unless `BOLERO_RANDOM_TEST_TIME_MS` says otherwise.
const TIME_CAP: Duration = Duration::from_secs(10);
/// The message id of the probe that ends `framed_messages`.
const PROBE_ID: u16 = 0xbeef;
/// Pages of the memfd `DMA_MAP`s may share.
const DMA_PAGES: u64 = 16;

/// Splits the bytes the server wrote into replies, checking each is well formed.
fn replies(mut bytes: &[u8]) -> Vec<(Header, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let header = Header::decode(bytes).expect("a whole reply header");
        assert_eq!(header.message_type(), TYPE_REPLY, "{header:?}");
        let len = header.message_size as usize;
        assert!(len >= HEADER_SIZE && len <= bytes.len(), "{header:?}");
        if header.is_error() {
            assert_eq!(len, HEADER_SIZE, "error replies have no body");
            assert_ne!(header.error, 0, "error replies carry an errno");
        }
        out.push((header, bytes[HEADER_SIZE..len].to_vec()));
        bytes = &bytes[len..];
    }
    out
}

/// Runs a server, sends `messages` (bytes and whether a memfd goes with them), closes the
/// sending side, and returns how the server ended and everything it wrote.
fn exchange(messages: &[(Vec<u8>, bool)]) -> (Result<(), ServeError>, Vec<u8>) {
    let (client, server_end) = UnixStream::pair().expect("socketpair");
    let server = thread::spawn(move || {
        let (mut device, _seen) = MemDevice::new();
        serve(server_end, &mut device)
    });
    let mut reader = client.try_clone().expect("clone");
    let collector = thread::spawn(move || {
        let mut all = Vec::new();
        let read = reader.read_to_end(&mut all);
        (all, read.err().map(|error| error.kind()))
    });
    let memory = memfd(DMA_PAGES * proto::PAGE_SIZE);
    for (bytes, with_fd) in messages {
        let fds: &[BorrowedFd<'_>] = if *with_fd { &[memory.as_fd()] } else { &[] };
        // The server may have closed (a size it cannot frame); later sends then fail.
        if send_with_fds(&client, bytes, fds).is_err() {
            break;
        }
    }
    let _ = client.shutdown(std::net::Shutdown::Write);
    let served = server.join().expect("serve panicked");
    let (written, error) = collector.join().expect("collector");
    // A server closing with our bytes still unread resets the connection (after its replies).
    if let Some(kind) = error {
        assert!(
            kind == std::io::ErrorKind::ConnectionReset
                && matches!(served, Err(ServeError::MessageSize(_))),
            "reading the replies failed with {kind:?}; serve ended with {served:?}"
        );
    }
    (served, written)
}

#[test]
fn arbitrary_bytes() {
    bolero::check!()
        .with_iterations(BYTES_ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_max_len(2048)
        .for_each(|input: &[u8]| {
            // The first byte says whether a valid VERSION goes first (to get past negotiation).
            let (negotiate, bytes) = match input.split_first() {
                Some((first, rest)) => (first & 1 == 1, rest),
                None => (false, input),
            };
            let mut stream = Vec::new();
            if negotiate {
                stream.push((version_message(0), false));
            }
            stream.push((bytes.to_vec(), false));
            let (served, written) = exchange(&stream);
            assert!(
                matches!(
                    served,
                    Ok(()) | Err(ServeError::Truncated) | Err(ServeError::MessageSize(_))
                ),
                "{served:?}"
            );
            replies(&written);
        });
}

/// One fuzzer-chosen message body.
#[derive(Debug, Clone, bolero::TypeGenerator)]
enum Body {
    Raw(Vec<u8>),
    Version {
        major: u16,
        minor: u16,
        json: Vec<u8>,
    },
    DeviceInfo {
        argsz: Option<u8>,
    },
    RegionInfo {
        argsz: Option<u16>,
        index: u8,
    },
    IrqInfo {
        argsz: Option<u8>,
        index: u8,
    },
    SetIrqs {
        argsz: Option<u8>,
        flags: u8,
        index: u8,
        start: u8,
        count: u8,
    },
    Access {
        write: bool,
        offset: u16,
        region: u8,
        count: u16,
        data: u16,
    },
    DmaMap {
        argsz: Option<u8>,
        flags: u8,
        offset_pages: u8,
        address_pages: u8,
        size_pages: u8,
        with_fd: bool,
    },
    DmaUnmap {
        flags: u8,
        address_pages: u8,
        size_pages: u8,
    },
    DmaCopy {
        src: u16,
        dst: u16,
        len: u16,
    },
    Reset,
}

/// One fuzzer-chosen message.
#[derive(Debug, Clone, bolero::TypeGenerator)]
struct Msg {
    /// Use the body's own command, or `command` (any number)?
    own_command: bool,
    command: u8,
    /// Header flags: no-reply (bit 0), error (bit 1), a type other than command (bits 2-7,
    /// when at least 0xc0).
    flags: u8,
    id: u16,
    body: Body,
}

impl Msg {
    /// The message's bytes and whether a memfd goes with it.
    fn encode(&self) -> (Vec<u8>, bool) {
        let page = proto::PAGE_SIZE;
        let mut with_fd = false;
        let (own, body): (u16, Vec<u8>) = match &self.body {
            Body::Raw(bytes) => (
                command::DEVICE_RESET,
                bytes.iter().copied().take(96).collect(),
            ),
            Body::Version { major, minor, json } => {
                let mut body = proto::Version {
                    major: *major % 2,
                    minor: *minor % 3,
                }
                .encode()
                .to_vec();
                body.extend(json.iter().take(64));
                (command::VERSION, body)
            }
            Body::DeviceInfo { argsz } => (
                command::DEVICE_GET_INFO,
                DeviceInfoBody {
                    argsz: argsz.map_or(16, |argsz| u32::from(argsz % 32)),
                    ..DeviceInfoBody::default()
                }
                .encode()
                .to_vec(),
            ),
            Body::RegionInfo { argsz, index } => (
                command::DEVICE_GET_REGION_INFO,
                RegionInfoBody {
                    argsz: argsz.map_or(32, |argsz| u32::from(argsz % 256)),
                    index: u32::from(*index % 12),
                    ..RegionInfoBody::default()
                }
                .encode()
                .to_vec(),
            ),
            Body::IrqInfo { argsz, index } => (
                command::DEVICE_GET_IRQ_INFO,
                IrqInfoBody {
                    argsz: argsz.map_or(16, |argsz| u32::from(argsz % 32)),
                    index: u32::from(*index % 8),
                    ..IrqInfoBody::default()
                }
                .encode()
                .to_vec(),
            ),
            Body::SetIrqs {
                argsz,
                flags,
                index,
                start,
                count,
            } => (
                command::DEVICE_SET_IRQS,
                SetIrqs {
                    argsz: argsz.map_or(20, |argsz| u32::from(argsz % 40)),
                    // Mostly one data type and one action; sometimes anything.
                    flags: if *flags >= 0xf0 {
                        u32::from(*flags)
                    } else {
                        (1 << (flags % 3)) | (8 << ((flags / 3) % 3))
                    },
                    index: u32::from(*index % 8),
                    start: u32::from(*start % 8),
                    count: u32::from(*count % 8),
                }
                .encode()
                .to_vec(),
            ),
            Body::Access {
                write,
                offset,
                region,
                count,
                data,
            } => {
                let mut body = RegionAccess {
                    offset: u64::from(*offset % 0x4800),
                    region: u32::from(*region % 10),
                    count: u32::from(*count % 0x1200),
                }
                .encode()
                .to_vec();
                let command = if *write {
                    body.resize(body.len() + usize::from(*data % 300), 0x5a);
                    command::REGION_WRITE
                } else {
                    command::REGION_READ
                };
                (command, body)
            }
            Body::DmaMap {
                argsz,
                flags,
                offset_pages,
                address_pages,
                size_pages,
                with_fd: fd,
            } => {
                with_fd = *fd;
                (
                    command::DMA_MAP,
                    DmaMap {
                        argsz: argsz.map_or(32, |argsz| u32::from(argsz % 40)),
                        flags: u32::from(*flags % 8),
                        offset: u64::from(*offset_pages % 20) * page,
                        address: u64::from(*address_pages % 32) * page,
                        size: u64::from(*size_pages % 20) * page,
                    }
                    .encode()
                    .to_vec(),
                )
            }
            Body::DmaUnmap {
                flags,
                address_pages,
                size_pages,
            } => (
                command::DMA_UNMAP,
                DmaUnmap {
                    argsz: 24,
                    flags: u32::from(*flags % 2),
                    address: u64::from(*address_pages % 32) * page,
                    size: u64::from(*size_pages % 20) * page,
                }
                .encode()
                .to_vec(),
            ),
            Body::DmaCopy { src, dst, len } => {
                let data = dma_copy(
                    u64::from(*src) * 2,
                    u64::from(*dst) * 2,
                    u64::from(len % 0x3000),
                );
                let mut body = RegionAccess {
                    offset: DOORBELL_DMA,
                    region: 0,
                    count: 24,
                }
                .encode()
                .to_vec();
                body.extend_from_slice(&data);
                (command::REGION_WRITE, body)
            }
            Body::Reset => (command::DEVICE_RESET, Vec::new()),
        };
        let command = if self.own_command {
            own
        } else {
            u16::from(self.command % 20)
        };
        let mut flags = 0;
        if self.flags & 1 != 0 {
            flags |= proto::FLAG_NO_REPLY;
        }
        if self.flags & 2 != 0 {
            flags |= proto::FLAG_ERROR;
        }
        if self.flags >= 0xc0 {
            flags |= u32::from(self.flags >> 2) & proto::FLAGS_TYPE_MASK;
        }
        (message(command, self.id, flags, &body), with_fd)
    }
}

#[test]
fn framed_messages() {
    bolero::check!()
        .with_iterations(FRAMED_ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_type::<Vec<Msg>>()
        .for_each(|messages: &Vec<Msg>| {
            let mut stream = vec![(version_message(0), false)];
            stream.extend(messages.iter().take(24).map(Msg::encode));
            let probe = DeviceInfoBody {
                argsz: 16,
                ..DeviceInfoBody::default()
            };
            stream.push((
                message(
                    command::DEVICE_GET_INFO,
                    PROBE_ID,
                    TYPE_COMMAND,
                    &probe.encode(),
                ),
                false,
            ));
            let (served, written) = exchange(&stream);
            assert!(served.is_ok(), "{served:?}");
            let replies = replies(&written);
            let (header, body) = replies.last().expect("at least the probe's reply");
            assert_eq!(header.message_id, PROBE_ID, "{header:?}");
            assert_eq!(header.command, command::DEVICE_GET_INFO);
            assert!(!header.is_error(), "{header:?}");
            let info = DeviceInfoBody::decode(body).expect("device info");
            assert_eq!(info.num_regions, proto::PCI_NUM_REGIONS);
            // One reply per message at most (none for no-reply ones), VERSION's included.
            assert!(replies.len() <= stream.len());
        });
}
