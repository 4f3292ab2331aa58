//! [`serve`] against a client that writes raw messages: requests the server must refuse (and
//! stay in step after), the no-reply flag, descriptors it must close, sizes that end the
//! connection.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{message, read_reply, send_with_fds, version_message, MemDevice};
use duplex_vfio::user::proto::{
    self, command, Header, RegionAccess, RegionInfoBody, FLAG_NO_REPLY, HEADER_SIZE, TYPE_COMMAND,
    TYPE_REPLY,
};
use duplex_vfio::user::{serve, Errno, ServeError};

fn start() -> (UnixStream, JoinHandle<Result<(), ServeError>>) {
    let (client, server) = UnixStream::pair().expect("socketpair");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let handle = thread::spawn(move || {
        let (mut device, _seen) = MemDevice::new();
        serve(server, &mut device)
    });
    (client, handle)
}

fn negotiated() -> (UnixStream, JoinHandle<Result<(), ServeError>>) {
    let (mut client, server) = start();
    client.write_all(&version_message(1)).expect("send VERSION");
    let (header, _) = read_reply(&mut client).expect("VERSION reply");
    assert!(!header.is_error());
    (client, server)
}

/// Sends `bytes` and returns the reply's errno (0 for a successful reply) and body.
fn ask(client: &mut UnixStream, bytes: &[u8]) -> (u32, Vec<u8>) {
    client.write_all(bytes).expect("send");
    let (header, body) = read_reply(client).expect("a reply");
    assert_eq!(header.message_type(), TYPE_REPLY);
    let sent = Header::decode(bytes).expect("header");
    assert_eq!(header.message_id, sent.message_id);
    assert_eq!(header.command, sent.command);
    if header.is_error() {
        assert_eq!(header.message_size as usize, HEADER_SIZE);
        (header.error, body)
    } else {
        (0, body)
    }
}

fn access(command: u16, offset: u64, region: u32, count: u32, data: &[u8]) -> Vec<u8> {
    let mut body = RegionAccess {
        offset,
        region,
        count,
    }
    .encode()
    .to_vec();
    body.extend_from_slice(data);
    message(command, 7, TYPE_COMMAND, &body)
}

fn finish(client: UnixStream, server: JoinHandle<Result<(), ServeError>>) {
    drop(client);
    let served = server.join().expect("server thread");
    assert!(served.is_ok(), "{served:?}");
}

#[test]
fn version_comes_first_and_once() {
    let (mut client, server) = start();
    let reset = message(command::DEVICE_RESET, 1, TYPE_COMMAND, &[]);
    assert_eq!(ask(&mut client, &reset).0, Errno::EINVAL.0);
    let mut bad = version_message(2);
    bad[HEADER_SIZE] = 9; // major 9
    assert_eq!(ask(&mut client, &bad).0, Errno::ENOTSUP.0);
    let mut garbled = version_message(3);
    let at = garbled.len() - 3;
    garbled[at] = b'!';
    assert_eq!(ask(&mut client, &garbled).0, Errno::EINVAL.0);
    let (errno, body) = ask(&mut client, &version_message(4));
    assert_eq!(errno, 0);
    let (version, caps) = proto::decode_version(&body).expect("server's version");
    assert_eq!((version.major, version.minor), (0, 1));
    assert_eq!(caps, proto::Capabilities::ours());
    assert_eq!(body.last(), Some(&0), "NUL-terminated JSON");
    assert_eq!(ask(&mut client, &version_message(5)).0, Errno::EINVAL.0);
    assert_eq!(ask(&mut client, &reset).0, 0);
    finish(client, server);
}

#[test]
fn bad_requests_get_error_replies_and_the_stream_stays_in_step() {
    let (mut client, server) = negotiated();
    let config = proto::PCI_CONFIG_REGION_INDEX;
    let cases: Vec<(Vec<u8>, Errno)> = vec![
        (message(99, 1, TYPE_COMMAND, &[1, 2, 3]), Errno::ENOTSUP),
        (
            message(command::DMA_READ, 1, TYPE_COMMAND, &[0; 16]),
            Errno::ENOTSUP,
        ),
        (
            message(command::DEVICE_RESET, 1, TYPE_REPLY, &[]),
            Errno::EINVAL,
        ),
        (
            access(command::REGION_READ, 4090, config, 8, &[]),
            Errno::EINVAL,
        ),
        (
            access(command::REGION_READ, u64::MAX, config, 8, &[]),
            Errno::EINVAL,
        ),
        (access(command::REGION_READ, 0, 42, 8, &[]), Errno::EINVAL),
        (
            access(command::REGION_READ, 0, 0, 2 << 20, &[]),
            Errno::E2BIG,
        ),
        (
            access(command::REGION_READ, 0, config, 4, &[1]),
            Errno::EINVAL,
        ),
        (
            access(command::REGION_WRITE, 0, config, 8, &[1; 4]),
            Errno::EINVAL,
        ),
        (
            access(
                command::REGION_WRITE,
                0,
                proto::PCI_ROM_REGION_INDEX,
                1,
                &[1],
            ),
            Errno::EACCES,
        ),
        (
            access(command::REGION_WRITE, 4095, config, 2, &[1; 2]),
            Errno::EINVAL,
        ),
        (
            message(command::REGION_READ, 1, TYPE_COMMAND, &[0; 5]),
            Errno::EINVAL,
        ),
        (
            message(command::DEVICE_GET_INFO, 1, TYPE_COMMAND, &[]),
            Errno::EINVAL,
        ),
        (
            message(
                command::DEVICE_GET_INFO,
                1,
                TYPE_COMMAND,
                &[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            Errno::EINVAL,
        ),
        (
            message(
                command::DEVICE_GET_REGION_INFO,
                1,
                TYPE_COMMAND,
                &RegionInfoBody {
                    argsz: 32,
                    index: 9,
                    ..RegionInfoBody::default()
                }
                .encode(),
            ),
            Errno::EINVAL,
        ),
        (
            message(command::DMA_MAP, 1, TYPE_COMMAND, &[0; 31]),
            Errno::EINVAL,
        ),
        (
            message(
                command::DMA_UNMAP,
                1,
                TYPE_COMMAND,
                &[
                    24, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
            ),
            Errno::ENOTSUP,
        ),
    ];
    for (request, errno) in &cases {
        assert_eq!(
            ask(&mut client, request).0,
            errno.0,
            "{:?}",
            Header::decode(request)
        );
    }
    // Still in step: a good request gets its answer.
    let (errno, body) = ask(
        &mut client,
        &access(command::REGION_READ, 0, config, 4, &[]),
    );
    assert_eq!(errno, 0);
    assert_eq!(body.len(), RegionAccess::SIZE + 4);
    finish(client, server);
}

#[test]
fn region_info_asks_for_room_before_sending_caps_and_fd() {
    let (mut client, server) = negotiated();
    let ask_region = |argsz: u32| {
        message(
            command::DEVICE_GET_REGION_INFO,
            3,
            TYPE_COMMAND,
            &RegionInfoBody {
                argsz,
                index: 0,
                ..RegionInfoBody::default()
            }
            .encode(),
        )
    };
    let (errno, body) = ask(&mut client, &ask_region(32));
    assert_eq!(errno, 0);
    assert_eq!(body.len(), RegionInfoBody::SIZE);
    let info = RegionInfoBody::decode(&body).expect("region info");
    assert_eq!(info.argsz as usize, 32 + 8 + 8 + 2 * 16);
    assert_ne!(info.flags & proto::REGION_INFO_FLAG_CAPS, 0);
    let (errno, body) = ask(&mut client, &ask_region(info.argsz));
    assert_eq!(errno, 0);
    assert_eq!(body.len(), info.argsz as usize);
    let info = RegionInfoBody::decode(&body).expect("region info");
    assert_eq!(
        proto::parse_region_caps(&body, &info).expect("caps"),
        common::BAR0_SPARSE.to_vec()
    );
    finish(client, server);
}

#[test]
fn no_reply_is_honoured() {
    let (mut client, server) = negotiated();
    let config = proto::PCI_CONFIG_REGION_INDEX;
    let mut quiet = access(command::REGION_WRITE, 0, config, 4, b"shh!");
    let mut header = Header::decode(&quiet).expect("header");
    header.flags |= FLAG_NO_REPLY;
    quiet[..HEADER_SIZE].copy_from_slice(&header.encode());
    client.write_all(&quiet).expect("send");
    // A failing no-reply command: no error reply either.
    let failing = message(99, 8, TYPE_COMMAND | FLAG_NO_REPLY, &[]);
    client.write_all(&failing).expect("send");
    // The next reply is the answer to this read, and it sees the quiet write.
    let (errno, body) = ask(
        &mut client,
        &access(command::REGION_READ, 0, config, 4, &[]),
    );
    assert_eq!(errno, 0);
    assert_eq!(&body[RegionAccess::SIZE..], b"shh!");
    finish(client, server);
}

/// A pipe whose read end reports end-of-file once every copy of its write end is closed.
fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe().expect("pipe")
}

/// Whether every copy of the pipe's write end has been closed (waits up to a few seconds).
fn all_closed(read_end: OwnedFd) -> bool {
    let mut file = std::fs::File::from(read_end);
    let started = Instant::now();
    let flags = rustix::fs::fcntl_getfl(&file).expect("getfl");
    rustix::fs::fcntl_setfl(&file, flags | rustix::fs::OFlags::NONBLOCK).expect("setfl");
    let mut buf = [0u8; 1];
    while started.elapsed() < Duration::from_secs(5) {
        match file.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
    false
}

#[test]
fn descriptors_not_taken_are_closed() {
    let (mut client, server) = negotiated();
    // One descriptor with a command that takes none.
    let (read_end, write_end) = pipe();
    let reset = message(command::DEVICE_RESET, 1, TYPE_COMMAND, &[]);
    send_with_fds(&client, &reset, &[write_end.as_fd()]).expect("send");
    drop(write_end);
    let (header, _) = read_reply(&mut client).expect("reply");
    assert!(!header.is_error());
    assert!(all_closed(read_end), "the server kept a descriptor");

    // More descriptors than a message may carry: refused, all closed.
    let (read_end, write_end) = pipe();
    let many: Vec<OwnedFd> = (0..80)
        .map(|_| write_end.try_clone().expect("dup"))
        .collect();
    let borrowed: Vec<BorrowedFd<'_>> = many.iter().map(AsFd::as_fd).collect();
    send_with_fds(&client, &reset, &borrowed).expect("send");
    drop(borrowed);
    drop(many);
    drop(write_end);
    let (header, _) = read_reply(&mut client).expect("reply");
    assert!(header.is_error());
    assert_eq!(header.error, Errno::EINVAL.0);
    assert!(all_closed(read_end), "the server kept a descriptor");

    // A refused DMA_MAP closes its descriptor too.
    let (read_end, write_end) = pipe();
    let map = message(command::DMA_MAP, 2, TYPE_COMMAND, &[0; 32]);
    send_with_fds(&client, &map, &[write_end.as_fd()]).expect("send");
    drop(write_end);
    let (header, _) = read_reply(&mut client).expect("reply");
    assert!(header.is_error());
    assert!(all_closed(read_end), "the server kept a descriptor");
    finish(client, server);
}

#[test]
fn unframable_sizes_end_the_connection_after_an_error_reply() {
    for (size, errno) in [(u32::MAX, Errno::E2BIG), (8, Errno::EINVAL)] {
        let (mut client, server) = negotiated();
        let mut bytes = message(command::DEVICE_RESET, 1, TYPE_COMMAND, &[]);
        bytes[4..8].copy_from_slice(&size.to_ne_bytes());
        client.write_all(&bytes).expect("send");
        let (header, _) = read_reply(&mut client).expect("error reply");
        assert!(header.is_error());
        assert_eq!(header.error, errno.0);
        let served = server.join().expect("server thread");
        assert!(
            matches!(served, Err(ServeError::MessageSize(s)) if s == size),
            "{served:?}"
        );
        assert!(read_reply(&mut client).is_none(), "the server closed");
    }
}

#[test]
fn closing_mid_message_is_truncated() {
    let (mut client, server) = negotiated();
    let bytes = access(
        command::REGION_WRITE,
        0,
        proto::PCI_CONFIG_REGION_INDEX,
        8,
        &[1; 8],
    );
    client.write_all(&bytes[..bytes.len() - 3]).expect("send");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let served = server.join().expect("server thread");
    assert!(matches!(served, Err(ServeError::Truncated)), "{served:?}");
    let (client_end, server) = start();
    client_end
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    assert!(server.join().expect("server thread").is_ok());
}
