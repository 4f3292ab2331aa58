//! Our [`Client`] against scripted servers that misbehave: silence, trickles, garbage, wrong
//! ids and commands, huge sizes, error flags, malformed region info, stray descriptors. Every
//! case must end in a typed error within the timeout, never a panic or a hang, and a stream put
//! out of step must leave the client refusing further calls.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use duplex_vfio::user::proto::{
    self, command, Capabilities, DeviceInfoBody, Header, RegionAccess, RegionInfoBody, HEADER_SIZE,
};
use duplex_vfio::user::{Client, ClientError, Errno};

const TIMEOUT: Duration = Duration::from_millis(400);
/// How far past the timeout a failing call may return (scheduling on a loaded machine).
const LATE: Duration = Duration::from_millis(1500);

/// Reads one request (header and body); `None` once the client has gone.
fn read_request(stream: &mut UnixStream) -> Option<(Header, Vec<u8>)> {
    let mut header = [0u8; HEADER_SIZE];
    stream.read_exact(&mut header).ok()?;
    let header = Header::decode(&header).ok()?;
    let mut body = vec![0u8; header.body_len().ok()?];
    stream.read_exact(&mut body).ok()?;
    Some((header, body))
}

fn reply(stream: &mut UnixStream, request: &Header, body: &[u8]) {
    let header = request.reply(body.len()).expect("reply size");
    let mut message = header.encode().to_vec();
    message.extend_from_slice(body);
    // The client may have given up already.
    let _ = stream.write_all(&message);
}

fn raw(stream: &mut UnixStream, header: Header, body: &[u8]) {
    let mut message = header.encode().to_vec();
    message.extend_from_slice(body);
    let _ = stream.write_all(&message);
}

fn version_body(major: u16, minor: u16) -> Vec<u8> {
    proto::encode_version(major, minor, &Capabilities::default())
}

fn info_body(num_regions: u32) -> Vec<u8> {
    DeviceInfoBody {
        argsz: 16,
        flags: proto::DEVICE_FLAGS_PCI,
        num_regions,
        num_irqs: 0,
    }
    .encode()
    .to_vec()
}

fn region_body(index: u32) -> Vec<u8> {
    RegionInfoBody {
        argsz: 32,
        flags: proto::REGION_INFO_FLAG_READ | proto::REGION_INFO_FLAG_WRITE,
        index,
        cap_offset: 0,
        size: 4096,
        offset: 0,
    }
    .encode()
    .to_vec()
}

/// Answers the connect sequence properly: version, one region of 4096 bytes.
fn handshake(stream: &mut UnixStream) {
    let (version, _) = read_request(stream).expect("VERSION");
    reply(stream, &version, &version_body(0, 1));
    let (info, _) = read_request(stream).expect("DEVICE_GET_INFO");
    reply(stream, &info, &info_body(1));
    let (region, _) = read_request(stream).expect("DEVICE_GET_REGION_INFO");
    reply(stream, &region, &region_body(0));
}

/// Runs `script` as the server on one end of a socketpair; returns the other end.
fn scripted(script: impl FnOnce(&mut UnixStream) + Send + 'static) -> (UnixStream, JoinHandle<()>) {
    let (client, mut server) = UnixStream::pair().expect("socketpair");
    let handle = thread::spawn(move || {
        script(&mut server);
        // Hold the connection until the client lets go, so silence is silence, not a close.
        let mut sink = [0u8; 64];
        while matches!(server.read(&mut sink), Ok(n) if n > 0) {}
    });
    (client, handle)
}

/// Connects to a scripted server, expecting failure; checks how long it took.
fn connect_fails(script: impl FnOnce(&mut UnixStream) + Send + 'static) -> ClientError {
    let (stream, server) = scripted(script);
    let started = Instant::now();
    let result = Client::from_stream(stream, TIMEOUT);
    assert!(
        started.elapsed() < TIMEOUT + LATE,
        "took {:?}",
        started.elapsed()
    );
    let error = result.expect_err("connecting to a hostile server must fail");
    server.join().expect("script thread");
    error
}

/// Connects to a scripted server that handshakes properly, then runs `after`.
fn connected(after: impl FnOnce(&mut UnixStream) + Send + 'static) -> (Client, JoinHandle<()>) {
    let (stream, server) = scripted(move |stream| {
        handshake(stream);
        after(stream);
    });
    let client = Client::from_stream(stream, TIMEOUT).expect("handshake");
    (client, server)
}

fn is_protocol(error: &ClientError, needle: &str) -> bool {
    matches!(error, ClientError::Protocol(why) if why.contains(needle))
}

#[test]
fn silence_times_out() {
    let started = Instant::now();
    let error = connect_fails(|stream| {
        read_request(stream);
    });
    assert!(matches!(error, ClientError::Timeout), "{error:?}");
    assert!(started.elapsed() >= TIMEOUT);
}

#[test]
fn a_trickle_cannot_stretch_the_timeout() {
    let error = connect_fails(|stream| {
        let (version, _) = read_request(stream).expect("VERSION");
        let header = version.reply(400).expect("size");
        let mut message = header.encode().to_vec();
        message.resize(HEADER_SIZE + 400, b' ');
        for byte in message {
            if stream.write_all(&[byte]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    assert!(matches!(error, ClientError::Timeout), "{error:?}");
}

#[test]
fn a_closed_connection_is_closed() {
    let (stream, server) = UnixStream::pair().expect("socketpair");
    drop(server);
    let error = Client::from_stream(stream, TIMEOUT).expect_err("closed");
    assert!(matches!(error, ClientError::Closed), "{error:?}");

    let error = connect_fails(|stream| {
        read_request(stream);
        let _ = stream.write_all(&[1, 0, 1]);
        let _ = stream.shutdown(std::net::Shutdown::Both);
    });
    assert!(matches!(error, ClientError::Closed), "{error:?}");
}

#[test]
fn garbage_is_a_protocol_error() {
    let error = connect_fails(|stream| {
        read_request(stream);
        let _ = stream.write_all(&[0xff; 64]);
    });
    assert!(is_protocol(&error, "not a reply"), "{error:?}");
}

#[test]
fn a_command_instead_of_a_reply_is_refused() {
    let error = connect_fails(|stream| {
        let (version, body) = read_request(stream).expect("VERSION");
        raw(stream, version, &body);
    });
    assert!(is_protocol(&error, "not a reply"), "{error:?}");
}

#[test]
fn wrong_id_or_command_is_refused() {
    let error = connect_fails(|stream| {
        let (version, _) = read_request(stream).expect("VERSION");
        let wrong = Header {
            message_id: version.message_id.wrapping_add(1),
            ..version
        };
        reply(stream, &wrong, &version_body(0, 1));
    });
    assert!(is_protocol(&error, "is for VERSION #1"), "{error:?}");

    let error = connect_fails(|stream| {
        let (version, _) = read_request(stream).expect("VERSION");
        let wrong = Header {
            command: command::DEVICE_RESET,
            ..version
        };
        reply(stream, &wrong, &[]);
    });
    assert!(is_protocol(&error, "DEVICE_RESET"), "{error:?}");
}

#[test]
fn huge_sizes_are_refused_without_reading() {
    for size in [u32::MAX, 64 * 1024 * 1024, 15, 0] {
        let error = connect_fails(move |stream| {
            let (version, _) = read_request(stream).expect("VERSION");
            raw(
                stream,
                Header {
                    message_size: size,
                    ..version.reply(0).expect("size")
                },
                &[],
            );
        });
        assert!(is_protocol(&error, "claims"), "{size}: {error:?}");
    }
}

#[test]
fn error_replies_are_device_errors() {
    let error = connect_fails(|stream| {
        let (version, _) = read_request(stream).expect("VERSION");
        raw(stream, version.error_reply(13), &[]);
    });
    assert!(
        matches!(
            error,
            ClientError::Device {
                command: command::VERSION,
                errno: Errno(13)
            }
        ),
        "{error:?}"
    );
}

#[test]
fn bad_versions_are_refused() {
    for (major, minor) in [(1, 0), (0, 2)] {
        let error = connect_fails(move |stream| {
            let (version, _) = read_request(stream).expect("VERSION");
            reply(stream, &version, &version_body(major, minor));
        });
        assert!(is_protocol(&error, "answered version"), "{error:?}");
    }
    let error = connect_fails(|stream| {
        let (version, _) = read_request(stream).expect("VERSION");
        let mut body = proto::Version { major: 0, minor: 1 }.encode().to_vec();
        body.extend_from_slice(b"{not json\0");
        reply(stream, &version, &body);
    });
    assert!(is_protocol(&error, "capabilities"), "{error:?}");
    let error = connect_fails(|stream| {
        let (version, _) = read_request(stream).expect("VERSION");
        reply(stream, &version, &[0]);
    });
    assert!(is_protocol(&error, "shorter"), "{error:?}");
}

#[test]
fn absurd_region_counts_are_refused() {
    let error = connect_fails(|stream| {
        let (version, _) = read_request(stream).expect("VERSION");
        reply(stream, &version, &version_body(0, 1));
        let (info, _) = read_request(stream).expect("DEVICE_GET_INFO");
        reply(stream, &info, &info_body(u32::MAX));
    });
    assert!(is_protocol(&error, "regions"), "{error:?}");
}

/// A server that answers the connect sequence up to the region info, which `region` answers.
fn region_fails(region: impl FnOnce(&mut UnixStream, Header) + Send + 'static) -> ClientError {
    connect_fails(move |stream| {
        let (version, _) = read_request(stream).expect("VERSION");
        reply(stream, &version, &version_body(0, 1));
        let (info, _) = read_request(stream).expect("DEVICE_GET_INFO");
        reply(stream, &info, &info_body(1));
        let (request, _) = read_request(stream).expect("DEVICE_GET_REGION_INFO");
        region(stream, request);
    })
}

#[test]
fn malformed_region_info_is_refused() {
    // The wrong region.
    let error = region_fails(|stream, request| reply(stream, &request, &region_body(5)));
    assert!(is_protocol(&error, "region 5"), "{error:?}");

    // More bytes than the argsz asked for.
    let error = region_fails(|stream, request| {
        let mut body = region_body(0);
        body.extend_from_slice(&[0; 64]);
        reply(stream, &request, &body);
    });
    assert!(is_protocol(&error, "claims"), "{error:?}");

    // Always wanting more room.
    let error = region_fails(|stream, mut request| {
        for argsz in [4096, 8192] {
            let mut info = RegionInfoBody::decode(&region_body(0)).expect("decode");
            info.argsz = argsz;
            reply(stream, &request, &info.encode());
            match read_request(stream) {
                Some((next, _)) => request = next,
                None => return,
            }
        }
    });
    assert!(is_protocol(&error, "needs 8192 bytes"), "{error:?}");

    // Wanting more room than a client can give.
    let error = region_fails(|stream, request| {
        let mut info = RegionInfoBody::decode(&region_body(0)).expect("decode");
        info.argsz = u32::MAX;
        reply(stream, &request, &info.encode());
    });
    assert!(is_protocol(&error, "needs 4294967295 bytes"), "{error:?}");

    // Claiming a payload larger than the one sent, when there was room.
    let error = region_fails(|stream, request| {
        let mut info = RegionInfoBody::decode(&region_body(0)).expect("decode");
        info.argsz = 4096;
        reply(stream, &request, &info.encode());
        let Some((again, _)) = read_request(stream) else {
            return;
        };
        reply(stream, &again, &info.encode());
    });
    assert!(
        is_protocol(&error, "gives its size as 4096 bytes"),
        "{error:?}"
    );

    // A capability chain that loops, and sparse areas outside the region.
    for (caps_fix, needle) in [
        (
            (|caps: &mut Vec<u8>| caps[4..8].copy_from_slice(&32u32.to_ne_bytes()))
                as fn(&mut Vec<u8>),
            "overlaps",
        ),
        (|caps: &mut Vec<u8>| caps.truncate(20), "areas"),
    ] {
        let error = region_fails(move |stream, request| {
            let mut caps = proto::encode_sparse_mmap_cap(&[(0, 0x1000)]);
            caps_fix(&mut caps);
            let mut info = RegionInfoBody::decode(&region_body(0)).expect("decode");
            info.argsz = (32 + caps.len()) as u32;
            info.flags |= proto::REGION_INFO_FLAG_CAPS;
            info.cap_offset = 32;
            reply(stream, &request, &info.encode());
            let Some((again, _)) = read_request(stream) else {
                return;
            };
            let mut body = info.encode().to_vec();
            body.extend_from_slice(&caps);
            reply(stream, &again, &body);
        });
        assert!(is_protocol(&error, needle), "{error:?}");
    }
    let error = region_fails(|stream, request| {
        let caps = proto::encode_sparse_mmap_cap(&[(0x800, 0x1000)]);
        let mut info = RegionInfoBody::decode(&region_body(0)).expect("decode");
        info.argsz = (32 + caps.len()) as u32;
        info.flags |= proto::REGION_INFO_FLAG_CAPS;
        info.cap_offset = 32;
        reply(stream, &request, &info.encode());
        let Some((again, _)) = read_request(stream) else {
            return;
        };
        let mut body = info.encode().to_vec();
        body.extend_from_slice(&caps);
        reply(stream, &again, &body);
    });
    assert!(is_protocol(&error, "outside region 0"), "{error:?}");
}

#[test]
fn stray_descriptors_are_refused_or_closed() {
    let error = region_fails(|stream, request| {
        let (a, b) = (memfd(), memfd());
        let header = request.reply(32).expect("size");
        let mut message = header.encode().to_vec();
        message.extend_from_slice(&region_body(0));
        send_with_fds(stream, &message, &[a.as_fd(), b.as_fd()]);
    });
    assert!(is_protocol(&error, "2 descriptors"), "{error:?}");

    // Descriptors with a reply that takes none are closed, and the call succeeds.
    let (mut client, server) = connected(|stream| {
        let Some((request, _)) = read_request(stream) else {
            return;
        };
        let fd = memfd();
        let header = request.reply(0).expect("size");
        send_with_fds(stream, &header.encode(), &[fd.as_fd()]);
    });
    client.reset().expect("reset with a stray fd");
    client.shutdown();
    server.join().expect("script");
}

fn memfd() -> std::os::fd::OwnedFd {
    rustix::fs::memfd_create("stray", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd")
}

fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    let sent = sendmsg(
        stream,
        &[std::io::IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .expect("sendmsg");
    assert_eq!(sent, bytes.len());
}

#[test]
fn error_replies_keep_the_connection_and_protocol_errors_break_it() {
    let (mut client, server) = connected(|stream| {
        // An error reply with a (spurious) body: read whole, the stream stays in step.
        let Some((first, _)) = read_request(stream) else {
            return;
        };
        raw(
            stream,
            Header {
                message_size: (HEADER_SIZE + 8) as u32,
                ..first.error_reply(5)
            },
            &[9; 8],
        );
        // A proper answer.
        let Some((second, _)) = read_request(stream) else {
            return;
        };
        let mut body = RegionAccess {
            offset: 0,
            region: 0,
            count: 4,
        }
        .encode()
        .to_vec();
        body.extend_from_slice(b"good");
        reply(stream, &second, &body);
        // An answer for another access.
        let Some((third, _)) = read_request(stream) else {
            return;
        };
        let mut body = RegionAccess {
            offset: 8,
            region: 0,
            count: 4,
        }
        .encode()
        .to_vec();
        body.extend_from_slice(b"evil");
        reply(stream, &third, &body);
    });
    let mut buf = [0u8; 4];
    let error = client.region_read(0, 0, &mut buf).expect_err("error reply");
    assert!(
        matches!(
            error,
            ClientError::Device {
                command: command::REGION_READ,
                errno: Errno::EIO
            }
        ),
        "{error:?}"
    );
    client.region_read(0, 0, &mut buf).expect("in step");
    assert_eq!(&buf, b"good");
    let error = client
        .region_read(0, 0, &mut buf)
        .expect_err("wrong access");
    assert!(is_protocol(&error, "REGION_READ reply is for"), "{error:?}");
    assert!(client.is_broken());
    let started = Instant::now();
    assert!(matches!(client.reset(), Err(ClientError::Broken)));
    assert!(started.elapsed() < Duration::from_millis(100));
    drop(client);
    server.join().expect("script");
}

#[test]
fn a_missing_reply_times_out_and_breaks_the_client() {
    let (mut client, server) = connected(|stream| {
        read_request(stream);
    });
    let started = Instant::now();
    let mut buf = [0u8; 8];
    let error = client.region_read(0, 0, &mut buf).expect_err("no reply");
    assert!(matches!(error, ClientError::Timeout), "{error:?}");
    let took = started.elapsed();
    assert!(took >= TIMEOUT && took < TIMEOUT + LATE, "took {took:?}");
    assert!(matches!(
        client.region_read(0, 0, &mut buf),
        Err(ClientError::Broken)
    ));
    drop(client);
    server.join().expect("script");
}

#[test]
fn a_short_region_read_reply_is_refused() {
    let (mut client, server) = connected(|stream| {
        let Some((request, _)) = read_request(stream) else {
            return;
        };
        // Claims 8 bytes of data, sends the fields and 8 bytes, but the request was for 16.
        let mut body = RegionAccess {
            offset: 0,
            region: 0,
            count: 8,
        }
        .encode()
        .to_vec();
        body.extend_from_slice(&[1; 8]);
        reply(stream, &request, &body);
    });
    let mut buf = [0u8; 16];
    let error = client.region_read(0, 0, &mut buf).expect_err("short");
    assert!(is_protocol(&error, "REGION_READ reply of"), "{error:?}");
    drop(client);
    server.join().expect("script");
}
