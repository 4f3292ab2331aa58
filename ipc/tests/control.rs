//! Control channel tests over real `SOCK_SEQPACKET` socketpairs: round trips of every message
//! kind, descriptor passing, and a peer that sends garbage.
//!
//! Hermetic: no root, no files outside memfds and pipes, no timing assertions.

use std::ffi::CString;
use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use duplex_ipc::control::{
    Body, ControlChannel, ControlError, Envelope, ErrorCode, RateLimiter, RequestIds, Resource,
    ResourceKind, StartMode, MAX_FDS, MAX_MESSAGE_BYTES, MAX_NAME_BYTES, MAX_REPORT_BYTES,
    MAX_RESOURCES, MAX_TEXT_BYTES, PROTOCOL_VERSION,
};
use nix::fcntl::OFlag;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use proptest::prelude::*;

fn envelope(request_id: u64, body: Body) -> Envelope {
    Envelope {
        request_id,
        epoch: 7,
        body,
    }
}

/// One message of every kind, with values that exercise every field.
fn every_kind() -> Vec<Envelope> {
    vec![
        envelope(
            1,
            Body::Hello {
                service: "datapath".into(),
                pid: 4242,
                protocol_version: PROTOCOL_VERSION,
            },
        ),
        envelope(
            2,
            Body::Start {
                generation: 3,
                mode: StartMode::Restart,
                resources: Vec::new(),
            },
        ),
        envelope(
            3,
            Body::Start {
                generation: 1,
                mode: StartMode::Fresh,
                resources: Vec::new(),
            },
        ),
        envelope(4, Body::Ready { generation: 3 }),
        envelope(5, Body::Heartbeat { counter: u64::MAX }),
        envelope(
            6,
            Body::Shutdown {
                reason: "operator request ✓".into(),
                deadline_ms: 5000,
            },
        ),
        envelope(7, Body::Ack { request_id: 6 }),
        envelope(
            8,
            Body::Error {
                request_id: 2,
                code: ErrorCode::BadResource,
                message: "pool header checksum mismatch".into(),
            },
        ),
        envelope(
            9,
            Body::Error {
                request_id: 0,
                code: ErrorCode::StaleEpoch,
                message: "".into(),
            },
        ),
        Envelope {
            request_id: u64::MAX,
            epoch: u64::MAX,
            body: Body::Shutdown {
                reason: "x".repeat(MAX_TEXT_BYTES),
                deadline_ms: u32::MAX,
            },
        },
        envelope(
            10,
            Body::Report {
                text: r#"{"peer":{"state":"alive"}}"#.into(),
            },
        ),
        envelope(
            11,
            Body::Report {
                text: "r".repeat(MAX_REPORT_BYTES),
            },
        ),
    ]
}

/// A channel whose peer is a bare socket, to send what a `ControlChannel` would refuse to.
fn raw_pair() -> (OwnedFd, ControlChannel) {
    let (raw, end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    (raw, ControlChannel::from_fd(end).expect("from_fd"))
}

fn raw_send(fd: &OwnedFd, bytes: &[u8], fds: &[RawFd]) {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(
        fd.as_raw_fd(),
        &[std::io::IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    assert_eq!(sent, bytes.len());
}

/// A non-blocking pipe as (read end, write end).
fn pipe() -> (File, File) {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).expect("pipe2");
    (File::from(r), File::from(w))
}

/// Whether every write end of the pipe `read_end` belongs to is closed (reads see EOF rather
/// than "would block"). Deterministic: close(2) is synchronous.
fn all_writers_closed(read_end: &mut File) -> bool {
    let mut byte = [0_u8; 1];
    match read_end.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => panic!("unexpected data in pipe"),
        Err(err) if err.kind() == ErrorKind::WouldBlock => false,
        Err(err) => panic!("read: {err}"),
    }
}

fn heartbeat(counter: u64) -> Envelope {
    envelope(counter, Body::Heartbeat { counter })
}

/// Asserts the channel still works: a valid message sent raw is received intact.
fn assert_still_usable(raw: &OwnedFd, channel: &ControlChannel) {
    let msg = heartbeat(99);
    raw_send(raw, &msg.encode(), &[]);
    let (got, fds) = channel.recv().expect("valid message after a bad one");
    assert_eq!(got, msg);
    assert!(fds.is_empty());
}

fn recv_err(channel: &ControlChannel) -> ControlError {
    match channel.recv() {
        Ok((env, _)) => panic!("expected an error, received {env:?}"),
        Err(err) => err,
    }
}

/// Byte offset of the first occurrence of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("marker present in encoding")
}

#[test]
fn every_message_kind_round_trips_both_ways() {
    let (supervisor, service) = ControlChannel::pair().expect("pair");
    for msg in every_kind() {
        supervisor.send(&msg, &[]).expect("send");
        let (got, fds) = service.recv().expect("recv");
        assert_eq!(got, msg);
        assert!(fds.is_empty());

        service.send(&msg, &[]).expect("send back");
        let (got, fds) = supervisor.recv().expect("recv back");
        assert_eq!(got, msg);
        assert!(fds.is_empty());
    }
}

#[test]
fn encode_decode_round_trips_without_a_socket() {
    for msg in every_kind() {
        assert_eq!(Envelope::decode(&msg.encode()).expect("decode"), msg);
    }
}

#[test]
fn passed_fds_arrive_and_refer_to_the_same_objects() {
    let (supervisor, service) = ControlChannel::pair().expect("pair");
    let (mut pipe_r, pipe_w) = pipe();
    let name = CString::new("control-test").expect("name");
    let mut memfd = File::from(memfd_create(&name, MemFdCreateFlag::MFD_CLOEXEC).expect("memfd"));
    memfd.write_all(b"shared bytes").expect("write memfd");
    let (ev_r, _ev_w) = pipe();

    // Resources name the descriptors out of order: fd_index is what binds them.
    let resources = vec![
        Resource {
            name: "pool".into(),
            kind: ResourceKind::Pool,
            fd_index: 2,
        },
        Resource {
            name: "doorbell".into(),
            kind: ResourceKind::Eventfd,
            fd_index: 0,
        },
        Resource {
            name: "ring.fabric0.sq".into(),
            kind: ResourceKind::RingRegion,
            fd_index: 1,
        },
    ];
    let msg = envelope(
        1,
        Body::Start {
            generation: 2,
            mode: StartMode::Restart,
            resources: resources.clone(),
        },
    );
    let fds: [BorrowedFd<'_>; 3] = [ev_r.as_fd(), pipe_w.as_fd(), memfd.as_fd()];
    supervisor.send(&msg, &fds).expect("send");

    let (got, received) = service.recv().expect("recv");
    assert_eq!(got, msg);
    assert_eq!(received.len(), 3);
    for (sent, got) in fds.iter().zip(&received) {
        assert_ne!(
            sent.as_raw_fd(),
            got.as_raw_fd(),
            "the receiver gets its own descriptors"
        );
    }
    let mut received = received.into_iter().map(File::from);
    let (ev_got, mut pipe_w_got, mut memfd_got) =
        match (received.next(), received.next(), received.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => unreachable!("three descriptors checked above"),
        };

    // Same open file descriptions: identical device and inode.
    let id = |f: &File| {
        let m = f.metadata().expect("fstat");
        (m.dev(), m.ino())
    };
    assert_eq!(id(&ev_got), id(&ev_r));
    assert_eq!(id(&pipe_w_got), id(&pipe_w));
    assert_eq!(id(&memfd_got), id(&memfd));

    // Data flows through them.
    pipe_w_got
        .write_all(b"ping")
        .expect("write received pipe end");
    let mut buf = [0_u8; 4];
    pipe_r.read_exact(&mut buf).expect("read original pipe end");
    assert_eq!(&buf, b"ping");

    memfd_got.seek(SeekFrom::Start(0)).expect("seek");
    let mut contents = String::new();
    memfd_got
        .read_to_string(&mut contents)
        .expect("read received memfd");
    assert_eq!(contents, "shared bytes");

    // Received descriptors are close-on-exec.
    let flags =
        nix::fcntl::fcntl(memfd_got.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
    assert_ne!(flags & libc::FD_CLOEXEC, 0);
}

#[test]
fn fd_index_beyond_the_received_fds_is_rejected_and_the_fds_closed() {
    let (raw, channel) = raw_pair();
    let (mut pipe_r, pipe_w) = pipe();
    let msg = envelope(
        1,
        Body::Start {
            generation: 1,
            mode: StartMode::Fresh,
            resources: vec![Resource {
                name: "pool".into(),
                kind: ResourceKind::Pool,
                fd_index: 1,
            }],
        },
    );
    raw_send(&raw, &msg.encode(), &[pipe_w.as_raw_fd()]);
    let err = recv_err(&channel);
    assert!(
        matches!(
            err,
            ControlError::FdIndexOutOfRange {
                index: 1,
                received: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_malformed());

    // The received duplicate was closed: once ours is closed too, the pipe has no writer.
    drop(pipe_w);
    assert!(all_writers_closed(&mut pipe_r));
    assert_still_usable(&raw, &channel);
}

#[test]
fn fds_not_named_by_the_message_are_rejected_and_closed() {
    let (raw, channel) = raw_pair();
    let (mut pipe_r, pipe_w) = pipe();
    raw_send(&raw, &heartbeat(1).encode(), &[pipe_w.as_raw_fd()]);
    let err = recv_err(&channel);
    assert!(
        matches!(
            err,
            ControlError::FdCountMismatch {
                received: 1,
                named: 0
            }
        ),
        "{err:?}"
    );
    drop(pipe_w);
    assert!(all_writers_closed(&mut pipe_r));
    assert_still_usable(&raw, &channel);
}

#[test]
fn duplicate_fd_index_is_rejected() {
    let (raw, channel) = raw_pair();
    let (_pipe_r, pipe_w) = pipe();
    let resource = |name: &str| Resource {
        name: name.into(),
        kind: ResourceKind::File,
        fd_index: 0,
    };
    let msg = envelope(
        1,
        Body::Start {
            generation: 1,
            mode: StartMode::Fresh,
            resources: vec![resource("a"), resource("b")],
        },
    );
    raw_send(
        &raw,
        &msg.encode(),
        &[pipe_w.as_raw_fd(), pipe_w.as_raw_fd()],
    );
    let err = recv_err(&channel);
    assert!(matches!(err, ControlError::DuplicateFdIndex(0)), "{err:?}");
    assert_still_usable(&raw, &channel);
}

#[test]
fn too_many_fds_are_rejected_and_all_closed() {
    let (raw, channel) = raw_pair();
    let (mut pipe_r, pipe_w) = pipe();
    let many = vec![pipe_w.as_raw_fd(); MAX_FDS + 1];
    raw_send(&raw, &heartbeat(1).encode(), &many);
    let err = recv_err(&channel);
    assert!(
        matches!(err, ControlError::TooManyFds { count, .. } if count == MAX_FDS + 1),
        "{err:?}"
    );
    assert!(err.is_malformed());
    drop(pipe_w);
    assert!(
        all_writers_closed(&mut pipe_r),
        "a received descriptor leaked"
    );
    assert_still_usable(&raw, &channel);
}

#[test]
fn random_bytes_are_rejected_without_panicking() {
    let (raw, channel) = raw_pair();
    // xorshift64*, fixed seed: the same bytes every run.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    for round in 0..64 {
        let len = 1 + usize::try_from(next() % 512).expect("small");
        let bytes: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
        raw_send(&raw, &bytes, &[]);
        let err = recv_err(&channel);
        assert!(err.is_malformed(), "round {round}: {err:?}");
    }
    assert_still_usable(&raw, &channel);
}

#[test]
fn malformed_messages_are_rejected_and_the_channel_stays_usable() {
    let (raw, channel) = raw_pair();
    let valid = heartbeat(5).encode();

    // Truncated: the segment table promises more words than follow.
    raw_send(&raw, &valid[..valid.len() - 8], &[]);
    assert!(matches!(recv_err(&channel), ControlError::Decode(_)));

    // Only a segment table.
    raw_send(&raw, &valid[..8], &[]);
    assert!(matches!(recv_err(&channel), ControlError::Decode(_)));

    // Bytes after the message.
    let mut trailing = valid.clone();
    trailing.extend_from_slice(&[0; 8]);
    raw_send(&raw, &trailing, &[]);
    assert!(matches!(recv_err(&channel), ControlError::TrailingBytes(8)));

    // A segment table claiming a huge message: refused before allocating.
    let mut huge = valid.clone();
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    raw_send(&raw, &huge, &[]);
    assert!(matches!(recv_err(&channel), ControlError::Decode(_)));

    // Valid framing, null root pointer: every field defaults, so the body is a `hello` without
    // a service name.
    let mut null_root = vec![0_u8; 16];
    null_root[4] = 1; // one segment of one word (the null root pointer)
    raw_send(&raw, &null_root, &[]);
    let err = recv_err(&channel);
    assert!(
        matches!(err, ControlError::MissingField("hello.service")),
        "{err:?}"
    );

    assert_still_usable(&raw, &channel);
}

#[test]
fn unknown_union_discriminant_and_enumerant_are_rejected() {
    let (raw, channel) = raw_pair();

    // The body discriminant is the u16 right after `epoch` in the envelope's data section.
    let epoch = 0x0123_4567_89AB_CDEF_u64;
    let msg = Envelope {
        request_id: 1,
        epoch,
        body: Body::Ack { request_id: 1 },
    };
    let mut bytes = msg.encode();
    let at = find(&bytes, &epoch.to_le_bytes()) + 8;
    assert_eq!(
        bytes[at..at + 2],
        5_u16.to_le_bytes(),
        "ack is union member 5"
    );
    bytes[at..at + 2].copy_from_slice(&99_u16.to_le_bytes());
    raw_send(&raw, &bytes, &[]);
    let err = recv_err(&channel);
    assert!(
        matches!(
            err,
            ControlError::UnknownVariant {
                what: "Envelope.body",
                value: 99
            }
        ),
        "{err:?}"
    );

    // The error code is the u16 right after the error's `requestId`.
    let answered = 0x1122_3344_5566_7788_u64;
    let msg = envelope(
        2,
        Body::Error {
            request_id: answered,
            code: ErrorCode::StaleEpoch,
            message: "m".into(),
        },
    );
    let mut bytes = msg.encode();
    let at = find(&bytes, &answered.to_le_bytes()) + 8;
    assert_eq!(
        bytes[at..at + 2],
        5_u16.to_le_bytes(),
        "staleEpoch is enumerant 5"
    );
    bytes[at..at + 2].copy_from_slice(&77_u16.to_le_bytes());
    raw_send(&raw, &bytes, &[]);
    let err = recv_err(&channel);
    assert!(
        matches!(
            err,
            ControlError::UnknownVariant {
                what: "ErrorCode",
                value: 77
            }
        ),
        "{err:?}"
    );

    assert_still_usable(&raw, &channel);
}

#[test]
fn out_of_bounds_fields_are_rejected_on_receive_and_refused_on_send() {
    let (raw, channel) = raw_pair();
    let (sender, _receiver) = ControlChannel::pair().expect("pair");
    let cases = [
        envelope(
            1,
            Body::Hello {
                service: "s".repeat(MAX_NAME_BYTES + 1),
                pid: 1,
                protocol_version: 1,
            },
        ),
        envelope(
            2,
            Body::Hello {
                service: String::new(),
                pid: 1,
                protocol_version: 1,
            },
        ),
        envelope(
            3,
            Body::Shutdown {
                reason: "r".repeat(MAX_TEXT_BYTES + 1),
                deadline_ms: 1,
            },
        ),
        envelope(
            4,
            Body::Error {
                request_id: 1,
                code: ErrorCode::Internal,
                message: "m".repeat(MAX_TEXT_BYTES + 1),
            },
        ),
        envelope(
            4,
            Body::Report {
                text: "r".repeat(MAX_REPORT_BYTES + 1),
            },
        ),
        envelope(
            5,
            Body::Start {
                generation: 1,
                mode: StartMode::Fresh,
                resources: (0..=MAX_RESOURCES)
                    .map(|i| Resource {
                        name: format!("r{i}"),
                        kind: ResourceKind::Region,
                        fd_index: u32::try_from(i).expect("small"),
                    })
                    .collect(),
            },
        ),
        envelope(
            6,
            Body::Start {
                generation: 1,
                mode: StartMode::Fresh,
                resources: vec![Resource {
                    name: "n".repeat(MAX_NAME_BYTES + 1),
                    kind: ResourceKind::Region,
                    fd_index: 0,
                }],
            },
        ),
    ];
    for msg in &cases {
        let send_err = sender.send(msg, &[]).expect_err("send must refuse");
        assert!(send_err.is_malformed(), "{send_err:?}");

        raw_send(&raw, &msg.encode(), &[]);
        let err = recv_err(&channel);
        assert!(
            matches!(
                err,
                ControlError::TextTooLong { .. }
                    | ControlError::MissingField(_)
                    | ControlError::TooManyEntries { .. }
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), send_err.to_string());
    }

    // Invalid UTF-8 can only come from a raw peer.
    let msg = envelope(
        7,
        Body::Hello {
            service: "svc-MARK".into(),
            pid: 1,
            protocol_version: 1,
        },
    );
    let mut bytes = msg.encode();
    let at = find(&bytes, b"MARK");
    bytes[at] = 0xFF;
    raw_send(&raw, &bytes, &[]);
    let err = recv_err(&channel);
    assert!(
        matches!(err, ControlError::InvalidUtf8("hello.service")),
        "{err:?}"
    );

    assert_still_usable(&raw, &channel);
}

#[test]
fn a_datagram_over_the_size_limit_is_rejected_whole() {
    let (raw, channel) = raw_pair();
    // Starts like a valid message, so only the size can be the reason for rejection.
    let mut big = heartbeat(1).encode();
    big.resize(MAX_MESSAGE_BYTES + 4096, 0);
    raw_send(&raw, &big, &[]);
    let err = recv_err(&channel);
    assert!(
        matches!(err, ControlError::Truncated { max } if max == MAX_MESSAGE_BYTES),
        "{err:?}"
    );
    assert!(err.is_malformed());

    // Exactly at the limit: not truncated (rejected for its trailing bytes instead).
    big.truncate(MAX_MESSAGE_BYTES);
    raw_send(&raw, &big, &[]);
    assert!(matches!(recv_err(&channel), ControlError::TrailingBytes(_)));

    assert_still_usable(&raw, &channel);
}

#[test]
fn send_refuses_bad_fd_lists_and_sends_nothing() {
    let (a, b) = ControlChannel::pair().expect("pair");
    let (_r, w) = pipe();

    let many = vec![w.as_fd(); MAX_FDS + 1];
    let err = a.send(&heartbeat(1), &many).expect_err("too many fds");
    assert!(matches!(err, ControlError::TooManyFds { .. }), "{err:?}");

    let err = a.send(&heartbeat(2), &[w.as_fd()]).expect_err("unnamed fd");
    assert!(
        matches!(
            err,
            ControlError::FdCountMismatch {
                received: 1,
                named: 0
            }
        ),
        "{err:?}"
    );

    let start = envelope(
        3,
        Body::Start {
            generation: 1,
            mode: StartMode::Fresh,
            resources: vec![Resource {
                name: "r".into(),
                kind: ResourceKind::File,
                fd_index: 0,
            }],
        },
    );
    let err = a.send(&start, &[]).expect_err("missing fd");
    assert!(matches!(
        err,
        ControlError::FdIndexOutOfRange {
            index: 0,
            received: 0,
            ..
        }
    ));

    // Nothing was queued: a zero timeout finds the socket empty.
    assert!(b.recv_timeout(Duration::ZERO).expect("poll").is_none());
}

#[test]
fn recv_timeout_returns_queued_messages_and_none_when_idle() {
    let (a, b) = ControlChannel::pair().expect("pair");
    assert!(b
        .recv_timeout(Duration::from_millis(20))
        .expect("idle")
        .is_none());
    a.send(&heartbeat(1), &[]).expect("send");
    let (got, _) = b
        .recv_timeout(Duration::from_secs(60))
        .expect("recv")
        .expect("a message");
    assert_eq!(got, heartbeat(1));
}

#[test]
fn peer_close_is_reported() {
    let (a, b) = ControlChannel::pair().expect("pair");
    a.send(&heartbeat(1), &[]).expect("send");
    drop(a);
    // Queued messages are still delivered, then EOF.
    assert_eq!(b.recv().expect("queued message").0, heartbeat(1));
    assert!(matches!(b.recv(), Err(ControlError::PeerClosed)));
    assert!(matches!(
        b.recv_timeout(Duration::from_secs(60)),
        Err(ControlError::PeerClosed)
    ));
    assert!(matches!(
        b.send(&heartbeat(2), &[]),
        Err(ControlError::PeerClosed)
    ));
}

#[test]
fn from_fd_accepts_only_seqpacket_sockets() {
    let (stream, _other) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    assert!(matches!(
        ControlChannel::from_fd(stream),
        Err(ControlError::NotSeqPacket)
    ));

    let (r, _w) = pipe();
    assert!(matches!(
        ControlChannel::from_fd(OwnedFd::from(r)),
        Err(ControlError::Io {
            op: "getsockopt(SO_TYPE)",
            ..
        })
    ));

    let (a, b) = ControlChannel::pair().expect("pair");
    let a = ControlChannel::from_fd(a.into_fd()).expect("seqpacket accepted");
    a.send(&heartbeat(1), &[]).expect("send");
    assert_eq!(b.recv().expect("recv").0, heartbeat(1));
}

#[test]
fn request_ids_count_from_one() {
    let (a, _b) = ControlChannel::pair().expect("pair");
    assert_eq!(
        [
            a.next_request_id(),
            a.next_request_id(),
            a.next_request_id()
        ],
        [1, 2, 3]
    );
    let ids = RequestIds::default();
    assert_eq!(ids.next_id(), 1);
    assert_eq!(ids.next_id(), 2);
}

#[test]
fn rate_limiter_allows_a_burst_per_window_and_counts_the_rest() {
    let mut limiter = RateLimiter::new(3, Duration::from_secs(1));
    let t0 = Instant::now();
    assert_eq!(limiter.check(t0), Some(0));
    assert_eq!(limiter.check(t0), Some(0));
    assert_eq!(limiter.check(t0 + Duration::from_millis(500)), Some(0));
    assert_eq!(limiter.check(t0 + Duration::from_millis(600)), None);
    assert_eq!(limiter.check(t0 + Duration::from_millis(999)), None);
    // A new window: allowed again, reporting the two suppressed.
    assert_eq!(limiter.check(t0 + Duration::from_secs(1)), Some(2));
    assert_eq!(limiter.check(t0 + Duration::from_secs(1)), Some(0));
}

#[test]
fn a_flood_of_malformed_messages_is_survived() {
    let (raw, channel) = raw_pair();
    for _ in 0..1000 {
        raw_send(&raw, &[0xFF; 16], &[]);
        assert!(recv_err(&channel).is_malformed());
    }
    assert_still_usable(&raw, &channel);
}

fn text(max: usize) -> impl Strategy<Value = String> {
    // Around the bound, with multi-byte characters so byte and char lengths differ.
    prop::collection::vec(
        prop_oneof![Just('a'), Just('é'), Just('✓')],
        0..=max / 2 + 2,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn kind() -> impl Strategy<Value = ResourceKind> {
    prop_oneof![
        Just(ResourceKind::Region),
        Just(ResourceKind::RingRegion),
        Just(ResourceKind::Pool),
        Just(ResourceKind::Eventfd),
        Just(ResourceKind::Socket),
        Just(ResourceKind::File),
    ]
}

fn code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::Internal),
        Just(ErrorCode::Malformed),
        Just(ErrorCode::UnsupportedVersion),
        Just(ErrorCode::Unexpected),
        Just(ErrorCode::BadResource),
        Just(ErrorCode::StaleEpoch),
    ]
}

fn body() -> impl Strategy<Value = Body> {
    let resource =
        (text(MAX_NAME_BYTES), kind(), 0_u32..24).prop_map(|(name, kind, fd_index)| Resource {
            name,
            kind,
            fd_index,
        });
    prop_oneof![
        (text(MAX_NAME_BYTES), any::<u32>(), any::<u32>()).prop_map(|(service, pid, v)| {
            Body::Hello {
                service,
                pid,
                protocol_version: v,
            }
        }),
        (
            any::<u64>(),
            prop_oneof![Just(StartMode::Fresh), Just(StartMode::Restart)],
            prop::collection::vec(resource, 0..=MAX_RESOURCES + 1)
        )
            .prop_map(|(generation, mode, resources)| Body::Start {
                generation,
                mode,
                resources
            }),
        any::<u64>().prop_map(|generation| Body::Ready { generation }),
        any::<u64>().prop_map(|counter| Body::Heartbeat { counter }),
        (text(MAX_TEXT_BYTES), any::<u32>()).prop_map(|(reason, deadline_ms)| Body::Shutdown {
            reason,
            deadline_ms
        }),
        any::<u64>().prop_map(|request_id| Body::Ack { request_id }),
        (any::<u64>(), code(), text(MAX_TEXT_BYTES)).prop_map(|(request_id, code, message)| {
            Body::Error {
                request_id,
                code,
                message,
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// decode(encode(m)) is m exactly when m is within bounds, and the same error otherwise.
    #[test]
    fn decode_accepts_exactly_the_valid_encodings(
        request_id in any::<u64>(),
        epoch in any::<u64>(),
        body in body(),
    ) {
        let msg = Envelope { request_id, epoch, body };
        let decoded = Envelope::decode(&msg.encode());
        match msg.validate() {
            Ok(()) => prop_assert_eq!(decoded.expect("valid message decodes"), msg),
            Err(err) => {
                let decode_err = decoded.expect_err("invalid message is rejected");
                prop_assert_eq!(decode_err.to_string(), err.to_string());
            }
        }
    }
}
