//! Our [`Client`] against scripted servers that misbehave: silence, trickles, garbage, wrong
//! ids and commands, huge sizes, error flags, malformed region info, stray descriptors. Every
//! case must end in a typed error, never a panic or a hang, and a stream put out of step must
//! leave the client refusing further calls without touching the socket again.
//!
//! No test measures time. What the timeout does is shown by what happens: a silent server gets
//! [`ClientError::Timeout`], a trickling one is hung up on before its reply is complete, a reply
//! held back while a shorter timeout runs out elsewhere is still taken. [`HANG_GUARD`] only
//! turns a hang into a clear failure.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use duplex_vfio::user::proto::{
    self, command, Capabilities, DeviceInfoBody, Header, RegionAccess, RegionInfoBody, HEADER_SIZE,
};
use duplex_vfio::user::{Client, ClientError, Errno};

const TIMEOUT: Duration = Duration::from_millis(400);
/// A timeout no exchange in these tests comes near, even on a stalled machine.
const LONG_TIMEOUT: Duration = Duration::from_secs(60);
/// A call still running after this long has hung. A guard only, never what a test checks: it
/// turns a hang into a failure that says so instead of waiting for the harness to kill the test.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// Runs `call` on a thread of its own and returns what it returned; fails the test, saying
/// `what` hung or panicked, if it never returns.
fn returns<T: Send + 'static>(what: &str, call: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = mpsc::channel();
    let worker = thread::spawn(move || {
        // The receiver is gone only when the test has already failed.
        let _ = done.send(call());
    });
    match result.recv_timeout(HANG_GUARD) {
        Ok(value) => {
            worker.join().expect("call thread");
            value
        }
        Err(RecvTimeoutError::Timeout) => panic!("{what} hung: no result after {HANG_GUARD:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

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

/// Runs `script` as the server on one end of a socketpair; returns the other end and the
/// server thread, which yields what the script returned.
fn scripted<T: Send + 'static>(
    script: impl FnOnce(&mut UnixStream) -> T + Send + 'static,
) -> (UnixStream, JoinHandle<T>) {
    let (client, mut server) = UnixStream::pair().expect("socketpair");
    let handle = thread::spawn(move || {
        let outcome = script(&mut server);
        // Hold the connection until the client lets go, so silence is silence, not a close.
        let mut sink = [0u8; 64];
        while matches!(server.read(&mut sink), Ok(n) if n > 0) {}
        outcome
    });
    (client, handle)
}

/// Connects to a scripted server, expecting failure (a hang fails the test); returns the error
/// and what the script returned.
fn connect_fails_with<T: Send + 'static>(
    script: impl FnOnce(&mut UnixStream) -> T + Send + 'static,
) -> (ClientError, T) {
    let (stream, server) = scripted(script);
    let result = returns("connecting to a hostile server", move || {
        Client::from_stream(stream, TIMEOUT)
    });
    let error = result.expect_err("connecting to a hostile server must fail");
    (error, server.join().expect("script thread"))
}

/// Connects to a scripted server, expecting failure (a hang fails the test).
fn connect_fails(script: impl FnOnce(&mut UnixStream) + Send + 'static) -> ClientError {
    connect_fails_with(script).0
}

/// Connects to a scripted server that handshakes properly, then runs `after`.
fn connected<T: Send + 'static>(
    after: impl FnOnce(&mut UnixStream) -> T + Send + 'static,
) -> (Client, JoinHandle<T>) {
    connected_with(TIMEOUT, after)
}

/// As [`connected`], with the client's `timeout`.
fn connected_with<T: Send + 'static>(
    timeout: Duration,
    after: impl FnOnce(&mut UnixStream) -> T + Send + 'static,
) -> (Client, JoinHandle<T>) {
    let (stream, server) = scripted(move |stream| {
        handshake(stream);
        after(stream)
    });
    let client = Client::from_stream(stream, timeout).expect("handshake");
    (client, server)
}

/// Reads whatever the client sends until it closes the connection; returns how many bytes.
fn bytes_until_closed(stream: &mut UnixStream) -> usize {
    let mut rest = Vec::new();
    // An error (a reset) ends the connection too; what arrived before it is counted.
    let _ = stream.read_to_end(&mut rest);
    rest.len()
}

fn is_protocol(error: &ClientError, needle: &str) -> bool {
    matches!(error, ClientError::Protocol(why) if why.contains(needle))
}

/// A server that takes the request and never answers: the client gives up with `Timeout` (not
/// a hang, not another error), having sent nothing more.
#[test]
fn silence_times_out() {
    let (error, after_request) = connect_fails_with(|stream| {
        read_request(stream).expect("VERSION");
        bytes_until_closed(stream)
    });
    assert!(matches!(error, ClientError::Timeout), "{error:?}");
    assert_eq!(after_request, 0, "bytes sent after the unanswered request");
}

/// A reply trickled a byte at a time, each byte well within the timeout of the one before but
/// the whole far beyond it: the exchange's deadline, not a per-read one, ends it. The server
/// sees the client hang up before its reply is complete, and the error is `Timeout` (a reply
/// read whole would have been a protocol error: its body is 400 spaces).
#[test]
fn a_trickle_cannot_stretch_the_timeout() {
    let (error, trickled) = connect_fails_with(|stream| {
        let (version, _) = read_request(stream).expect("VERSION");
        let header = version.reply(400).expect("size");
        let mut message = header.encode().to_vec();
        message.resize(HEADER_SIZE + 400, b' ');
        for (sent, byte) in message.into_iter().enumerate() {
            if stream.write_all(&[byte]).is_err() {
                // The client hung up with `sent` bytes of the reply written.
                return Some(sent);
            }
            // The hostile server's pace (a byte per 50 ms: the 416 bytes take 20 s), not a wait
            // for anything; nothing here depends on how long it really takes.
            thread::sleep(Duration::from_millis(50));
        }
        None
    });
    assert!(matches!(error, ClientError::Timeout), "{error:?}");
    assert!(
        trickled.is_some(),
        "the client took the whole trickled reply instead of giving up"
    );
}

/// The timeout cuts off silence, not a reply that is merely slow. A client with a long timeout
/// asks; its server holds the reply until another client, with the short [`TIMEOUT`] and asked
/// later, has given up on a silent server. The first client must still be waiting then, and
/// take the reply: a call's timeout is its own, and a slow reply within it is not cut short.
/// (The order of events is what is checked; the long timeout is long only so that a stalled
/// test machine cannot make it expire.)
#[test]
fn a_slow_reply_within_the_timeout_is_taken() {
    let (asked_tx, asked) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let (mut client, server) = connected_with(LONG_TIMEOUT, move |stream| {
        let (request, _) = read_request(stream)?;
        asked_tx.send(()).ok()?;
        released.recv().ok()?;
        reply(stream, &request, &[]);
        let (next, _) = read_request(stream)?;
        reply(stream, &next, &[]);
        Some(())
    });
    let (done, result) = mpsc::channel();
    let caller = thread::spawn(move || {
        let _ = done.send(client.reset());
        client
    });
    asked
        .recv_timeout(HANG_GUARD)
        .expect("the server never got the request");
    // Meanwhile a whole short timeout runs out, on another connection.
    let error = connect_fails(|stream| {
        read_request(stream);
    });
    assert!(matches!(error, ClientError::Timeout), "{error:?}");
    // The server has had the request all that time and has not answered: the client must
    // still be waiting.
    match result.try_recv() {
        Err(TryRecvError::Empty) => {}
        other => panic!("the client did not wait for the reply: {other:?}"),
    }
    release.send(()).expect("server");
    let outcome = result
        .recv_timeout(HANG_GUARD)
        .expect("the call hung after the reply was sent");
    outcome.expect("a slow reply within the timeout");
    let mut client = caller.join().expect("caller");
    assert!(!client.is_broken());
    client.reset().expect("still in step");
    client.shutdown();
    server
        .join()
        .expect("script")
        .expect("the script ran to its end");
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

/// An error reply leaves the stream in step; a protocol violation breaks it, after which every
/// call is refused at once: `Broken`, with nothing more sent to the server.
#[test]
fn error_replies_keep_the_connection_and_protocol_errors_break_it() {
    let (mut client, server) = connected(|stream| {
        // An error reply with a (spurious) body: read whole, the stream stays in step.
        let (first, _) = read_request(stream)?;
        raw(
            stream,
            Header {
                message_size: (HEADER_SIZE + 8) as u32,
                ..first.error_reply(5)
            },
            &[9; 8],
        );
        // A proper answer.
        let (second, _) = read_request(stream)?;
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
        let (third, _) = read_request(stream)?;
        let mut body = RegionAccess {
            offset: 8,
            region: 0,
            count: 4,
        }
        .encode()
        .to_vec();
        body.extend_from_slice(b"evil");
        reply(stream, &third, &body);
        // What the broken client sends from now on (it should send nothing).
        Some(bytes_until_closed(stream))
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
    let error = client.reset().expect_err("broken");
    assert!(matches!(error, ClientError::Broken), "{error:?}");
    let error = client.region_read(0, 0, &mut buf).expect_err("broken");
    assert!(matches!(error, ClientError::Broken), "{error:?}");
    drop(client);
    let after_break = server.join().expect("script");
    assert_eq!(
        after_break,
        Some(0),
        "bytes a broken client sent (None: the script ended early)"
    );
}

/// A call whose reply never comes fails with `Timeout` (it does not hang) and breaks the
/// client: the next call is refused with `Broken`, and nothing more reaches the server.
#[test]
fn a_missing_reply_times_out_and_breaks_the_client() {
    let (mut client, server) = connected(|stream| {
        read_request(stream).expect("REGION_READ");
        bytes_until_closed(stream)
    });
    let (mut client, error) = returns("a call to a silent server", move || {
        let mut buf = [0u8; 8];
        let error = client.region_read(0, 0, &mut buf).expect_err("no reply");
        (client, error)
    });
    assert!(matches!(error, ClientError::Timeout), "{error:?}");
    assert!(client.is_broken());
    let mut buf = [0u8; 8];
    let error = client.region_read(0, 0, &mut buf).expect_err("broken");
    assert!(matches!(error, ClientError::Broken), "{error:?}");
    drop(client);
    let after_request = server.join().expect("script");
    assert_eq!(after_request, 0, "bytes sent after the unanswered request");
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
