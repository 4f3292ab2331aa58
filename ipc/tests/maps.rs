//! The maps channel (`duplex_ipc::maps`): round trips of every message, malformed and
//! out-of-bounds input refused, volume tables cut into datagram-sized parts, both ends over a real
//! `SOCK_SEQPACKET` pair, and bounded fuzzing of both decoders (bolero).
//!
//! Hermetic: no root, no files; no timing assertions (timeouts are generous hang guards, or
//! short ones where nothing is meant to arrive).
//!
//! The fuzz targets run like `fuzz_control.rs` (whose docs say how to run them longer or
//! coverage-guided):
//!
//! ```text
//! cargo test -p duplex-ipc --test maps decode_
//! BOLERO_RANDOM_TEST_TIME_MS=600000 cargo test --release -p duplex-ipc --test maps decode_
//! ```
//!
//! A failure prints `BOLERO_RANDOM_SEED=...`; set that variable to replay it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use duplex_ipc::control::{ControlError, MAX_MESSAGE_BYTES};
use duplex_ipc::maps::{
    examples, volume_parts, MapsChannel, MapsError, MapsMessage, MapsReply, MapsRequest,
    MemberFailed, PoolSpec, PublishVolumes, MAX_DEVICES, MAX_EXTENTS, MAX_MEMBERS, MAX_NAME_BYTES,
    MAX_VOLUMES,
};

/// Hang guard for things that must arrive.
const ARRIVES: Duration = Duration::from_secs(30);
/// How long to wait for something that must not arrive.
const QUIET: Duration = Duration::from_millis(50);

fn pool_spec() -> PoolSpec {
    match examples::requests().into_iter().nth(1) {
        Some(MapsRequest::PublishPool(spec)) => spec,
        other => panic!("example 1 is not a pool: {other:?}"),
    }
}

#[test]
fn every_request_round_trips() {
    for (i, r) in examples::requests().into_iter().enumerate() {
        let id = (1 << 32) | i as u64;
        let bytes = r.encode(id);
        assert_eq!(
            MapsRequest::decode(&bytes).ok(),
            Some((id, r.clone())),
            "{r:?}"
        );
        assert_eq!(MapsRequest::request_id_of(&bytes), Some(id));
    }
}

#[test]
fn every_message_round_trips() {
    for m in examples::messages() {
        let bytes = m.encode();
        assert_eq!(MapsMessage::decode(&bytes).ok(), Some(m.clone()), "{m:?}");
    }
}

#[test]
fn the_largest_listing_fits_one_datagram() {
    let m = examples::largest_listing();
    let bytes = m.encode();
    assert!(
        bytes.len() <= MAX_MESSAGE_BYTES,
        "{} bytes for {MAX_DEVICES} devices",
        bytes.len()
    );
    assert_eq!(MapsMessage::decode(&bytes).ok(), Some(m));
}

#[test]
fn garbage_is_refused() {
    for bytes in [&b""[..], b"not capnp at all", &[0xff; 64]] {
        assert!(MapsRequest::decode(bytes).is_err());
        assert!(MapsMessage::decode(bytes).is_err());
        assert_eq!(MapsRequest::request_id_of(bytes), None);
    }
    // Truncated and with trailing bytes.
    let bytes = MapsRequest::PublishPool(pool_spec()).encode(5);
    assert!(MapsRequest::decode(&bytes[..bytes.len() - 8]).is_err());
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 8]);
    assert!(matches!(
        MapsRequest::decode(&longer),
        Err(ControlError::TrailingBytes(8))
    ));
}

#[test]
fn unknown_union_members_and_enumerants_are_refused() {
    // MapsRequest's body discriminant: data bytes 8..10 of the root struct, which starts after
    // the segment table (8 bytes) and the root pointer (8 bytes).
    let mut bytes = MapsRequest::ListDevices.encode(11);
    assert_eq!(&bytes[24..26], &[0, 0], "layout changed");
    bytes[24] = 9;
    assert!(matches!(
        MapsRequest::decode(&bytes),
        Err(ControlError::UnknownVariant {
            what: "MapsRequest.body",
            value: 9
        })
    ));
    assert_eq!(MapsRequest::request_id_of(&bytes), Some(11));
    // PoolSpec.level: data bytes 8..10 of the PoolSpec, allocated right after the root struct
    // (2 data words, 1 pointer).
    let mut bytes = MapsRequest::PublishPool(pool_spec()).encode(12);
    assert_eq!(&bytes[48..50], &[2, 0], "layout changed");
    bytes[48] = 7;
    assert!(matches!(
        MapsRequest::decode(&bytes),
        Err(ControlError::UnknownVariant {
            what: "RaidLevel",
            value: 7
        })
    ));
    // MapsMessage's body discriminant: data bytes 0..2 of the root struct.
    let mut bytes = examples::messages()[0].encode();
    bytes[16] = 5;
    assert!(matches!(
        MapsMessage::decode(&bytes),
        Err(ControlError::UnknownVariant {
            what: "MapsMessage.body",
            ..
        })
    ));
}

#[test]
fn bounds_are_enforced_on_both_sides() {
    let decode = |r: &MapsRequest| MapsRequest::decode(&r.encode(1));
    let mut spec = pool_spec();
    spec.name = "x".repeat(MAX_NAME_BYTES + 1);
    let long = MapsRequest::PublishPool(spec);
    assert!(matches!(
        long.validate(),
        Err(ControlError::TextTooLong { .. })
    ));
    assert!(matches!(
        decode(&long),
        Err(ControlError::TextTooLong { .. })
    ));
    let mut spec = pool_spec();
    spec.name.clear();
    assert!(decode(&MapsRequest::PublishPool(spec)).is_err());
    let mut spec = pool_spec();
    spec.drives = (0..=MAX_MEMBERS as u32).collect();
    spec.states.clear();
    assert!(matches!(
        decode(&MapsRequest::PublishPool(spec)),
        Err(ControlError::TooManyEntries { .. })
    ));
    let mut spec = pool_spec();
    spec.drives.clear();
    spec.states.clear();
    assert!(decode(&MapsRequest::PublishPool(spec)).is_err());
    let mut spec = pool_spec();
    spec.states.pop();
    assert!(decode(&MapsRequest::PublishPool(spec)).is_err());
    let volumes = |volumes| {
        MapsRequest::PublishVolumes(PublishVolumes {
            epoch: 1,
            volumes,
            part: 0,
            more: false,
        })
    };
    assert!(decode(&volumes(vec![examples::volume(1, MAX_EXTENTS)])).is_ok());
    assert!(matches!(
        decode(&volumes(vec![examples::volume(1, MAX_EXTENTS + 1)])),
        Err(ControlError::TooManyEntries { .. })
    ));
    assert!(decode(&volumes(vec![examples::volume(1, 0)])).is_err());
    let fr = |members| MapsRequest::FailuresRecorded { device: 2, members };
    assert!(decode(&fr(vec![])).is_err());
    assert!(decode(&fr((0..=MAX_MEMBERS as u32).collect())).is_err());
    // Replies: a listing over the bound, a name over its bound, an error text over its bound.
    let mut listing = examples::largest_listing();
    if let MapsMessage::Reply {
        reply: MapsReply::Devices(list),
        ..
    } = &mut listing
    {
        list.truncate(4);
        list[0].name = "y".repeat(MAX_NAME_BYTES + 1);
    }
    assert!(matches!(
        MapsMessage::decode(&listing.encode()),
        Err(ControlError::TextTooLong { .. })
    ));
    let many = MapsMessage::Reply {
        request_id: 1,
        reply: MapsReply::Devices(vec![examples::device(1, 0); MAX_DEVICES + 1]),
    };
    assert!(matches!(
        MapsMessage::decode(&many.encode()),
        Err(ControlError::TooManyEntries { .. })
    ));
    let error = MapsMessage::Reply {
        request_id: 1,
        reply: MapsReply::Error("e".repeat(5000)),
    };
    assert!(MapsMessage::decode(&error.encode()).is_err());
}

#[test]
fn volume_tables_are_cut_into_parts_that_fit_one_datagram() {
    // The largest table: every part encodes within a datagram and decodes back, the parts are
    // numbered in order, only the last says no more follow, and together they are the table.
    let table: Vec<_> = (0..MAX_VOLUMES as u32)
        .map(|i| examples::volume(i, 1 + (i as usize % 7) * 40))
        .collect();
    let parts = volume_parts(9, &table).unwrap();
    assert!(parts.len() > 1);
    let mut joined = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p.part as usize, i);
        assert_eq!(p.more, i + 1 < parts.len());
        assert_eq!(p.epoch, 9);
        let request = MapsRequest::PublishVolumes(p.clone());
        let bytes = request.encode(u64::MAX);
        assert!(
            bytes.len() <= MAX_MESSAGE_BYTES,
            "part {i}: {}",
            bytes.len()
        );
        assert_eq!(MapsRequest::decode(&bytes).ok(), Some((u64::MAX, request)));
        joined.extend(p.volumes.iter().cloned());
    }
    assert_eq!(joined, table);
    // A small table, and the empty one, is one part.
    let one = volume_parts(1, &table[..3]).unwrap();
    assert_eq!(one.len(), 1);
    assert!(!one[0].more);
    let empty = volume_parts(1, &[]).unwrap();
    assert_eq!(empty.len(), 1);
    assert!(empty[0].volumes.is_empty());
    // Too many volumes.
    let mut over = table;
    over.push(examples::volume(1, 1));
    assert!(matches!(
        volume_parts(1, &over),
        Err(MapsError::Unsendable(_))
    ));
}

/// The datapath end answers `requests` requests with `reply`, sending `events` before each
/// reply; gives back what it received and its end.
fn serve(
    datapath: MapsChannel,
    requests: usize,
    events: Vec<MemberFailed>,
    reply: impl Fn(&MapsRequest) -> MapsReply + Send + 'static,
) -> std::thread::JoinHandle<(Vec<MapsRequest>, MapsChannel)> {
    std::thread::spawn(move || {
        let mut got = Vec::new();
        for _ in 0..requests {
            let (id, request) = datapath.recv_request(None).unwrap().unwrap();
            for e in &events {
                datapath.send_event(e).unwrap();
            }
            datapath.send_reply(id, &reply(&request)).unwrap();
            got.push(request);
        }
        (got, datapath)
    })
}

fn failure(member: u32) -> MemberFailed {
    MemberFailed {
        device: 2,
        member,
        name: format!("d{member}"),
        status: 0x0281,
    }
}

#[test]
fn calls_get_their_replies_and_keep_the_events_that_arrive_meanwhile() {
    let (datapath, metadata) = MapsChannel::pair().unwrap();
    let mut metadata = metadata.with_first_request_id(3 << 32);
    let server = serve(datapath, 3, vec![failure(0), failure(1)], |r| match r {
        MapsRequest::ListDevices => MapsReply::Devices(vec![examples::device(0, 0)]),
        MapsRequest::PublishPool(_) => MapsReply::Device(2),
        _ => MapsReply::Error("no".into()),
    });
    let devices = metadata.list_devices(ARRIVES).unwrap();
    assert_eq!(devices, vec![examples::device(0, 0)]);
    assert_eq!(metadata.publish_pool(pool_spec(), ARRIVES).unwrap(), 2);
    let refused = metadata.failures_recorded(2, vec![1], ARRIVES).unwrap_err();
    assert!(
        matches!(&refused, MapsError::Refused { request: "failuresRecorded", reason } if reason == "no"),
        "{refused}"
    );
    // Every event sent before each reply, in order.
    for member in [0, 1, 0, 1, 0, 1] {
        assert_eq!(metadata.recv_event(ARRIVES).unwrap(), Some(failure(member)));
    }
    let (got, _datapath) = server.join().unwrap();
    assert_eq!(metadata.recv_event(QUIET).unwrap(), None);
    assert_eq!(got[0], MapsRequest::ListDevices);
}

#[test]
fn a_late_reply_is_discarded_and_a_missing_one_times_out() {
    let (datapath, mut metadata) = MapsChannel::pair().unwrap();
    let err = metadata.call(&MapsRequest::ListDevices, QUIET).unwrap_err();
    assert!(
        matches!(err, MapsError::Timeout { request_id: 1, .. }),
        "{err}"
    );
    // The datapath answers the first request late, then the second in time.
    let (first, _) = datapath.recv_request(Some(ARRIVES)).unwrap().unwrap();
    datapath.send_reply(first, &MapsReply::Device(1)).unwrap();
    let server = serve(datapath, 1, vec![], |_| MapsReply::Done);
    let reply = metadata.call(&MapsRequest::ListDevices, ARRIVES).unwrap();
    assert_eq!(reply, MapsReply::Done);
    server.join().unwrap();
}

#[test]
fn a_volume_table_is_published_in_parts() {
    let (datapath, mut metadata) = MapsChannel::pair().unwrap();
    let table: Vec<_> = (0..1000).map(|i| examples::volume(i, 4)).collect();
    let parts = volume_parts(5, &table).unwrap().len();
    let server = serve(datapath, parts, vec![], |_| MapsReply::Done);
    metadata.publish_volumes(5, &table, ARRIVES).unwrap();
    let (got, _) = server.join().unwrap();
    let mut joined = Vec::new();
    for r in got {
        let MapsRequest::PublishVolumes(p) = r else {
            panic!("not a volume part: {r:?}");
        };
        joined.extend(p.volumes);
    }
    assert_eq!(joined, table);
}

#[test]
fn malformed_requests_are_errors_the_channel_survives() {
    let (datapath, metadata) = MapsChannel::pair().unwrap();
    // Garbage: no id to answer.
    metadata.send_raw_for_tests(b"garbage").unwrap();
    let e = datapath.recv_request(Some(ARRIVES)).unwrap_err();
    assert!(
        e.is_malformed() && matches!(e, MapsError::Channel(_)),
        "{e}"
    );
    // A readable id with a bad body: answerable.
    let mut bytes = MapsRequest::PublishPool(pool_spec()).encode(77);
    bytes[48] = 7;
    metadata.send_raw_for_tests(&bytes).unwrap();
    let e = datapath.recv_request(Some(ARRIVES)).unwrap_err();
    assert!(
        matches!(e, MapsError::Malformed { request_id: 77, .. }),
        "{e}"
    );
    // A reply sent as a request.
    metadata
        .send_raw_for_tests(&examples::messages()[3].encode())
        .unwrap();
    assert!(datapath.recv_request(Some(ARRIVES)).is_err());
    // Then a good one.
    let id = metadata.send_request(&MapsRequest::ListDevices).unwrap();
    assert_eq!(
        datapath.recv_request(None).unwrap(),
        Some((id, MapsRequest::ListDevices))
    );
    // Nothing more.
    assert!(datapath.recv_request(Some(QUIET)).unwrap().is_none());
}

#[test]
fn malformed_messages_from_the_datapath_are_skipped() {
    let (datapath, mut metadata) = MapsChannel::pair().unwrap();
    let server = std::thread::spawn(move || {
        let (id, _) = datapath.recv_request(None).unwrap().unwrap();
        datapath.send_raw_for_tests(b"garbage").unwrap();
        datapath.send_reply(id, &MapsReply::Done).unwrap();
        datapath
    });
    assert_eq!(
        metadata.call(&MapsRequest::ListDevices, ARRIVES).unwrap(),
        MapsReply::Done
    );
    let datapath = server.join().unwrap();
    // A closed peer is a channel error, not a hang.
    drop(datapath);
    let e = metadata.recv_event(ARRIVES).unwrap_err();
    assert!(
        matches!(e, MapsError::Channel(ControlError::PeerClosed)),
        "{e}"
    );
}

#[test]
fn out_of_bounds_sends_are_refused_before_sending() {
    let (datapath, metadata) = MapsChannel::pair().unwrap();
    let mut spec = pool_spec();
    spec.drives.clear();
    assert!(metadata
        .send_request(&MapsRequest::PublishPool(spec))
        .is_err());
    let too_many = MapsReply::Devices(vec![examples::device(1, 0); MAX_DEVICES + 1]);
    assert!(datapath.send_reply(1, &too_many).is_err());
    let mut e = failure(1);
    e.name.clear();
    assert!(datapath.send_event(&e).is_err());
    assert!(datapath.recv_request(Some(QUIET)).unwrap().is_none());
}

// -- Fuzzing (bolero), bounded under plain `cargo test`.

/// Iterations of `decode_arbitrary_bytes` unless `BOLERO_RANDOM_ITERATIONS` says otherwise.
const ARBITRARY_ITERATIONS: usize = 10_000_000;
/// Iterations of `decode_mutated_valid_messages`.
const MUTATED_ITERATIONS: usize = 2_000_000;
/// Wall-clock cap per target unless `BOLERO_RANDOM_TEST_TIME_MS` says otherwise (a bound, not
/// an assertion).
const TIME_CAP: Duration = Duration::from_secs(10);

/// Decodes `bytes` both ways; whatever decodes must round-trip.
fn check(bytes: &[u8]) {
    if let Ok((id, request)) = MapsRequest::decode(bytes) {
        let again = MapsRequest::decode(&request.encode(id));
        assert_eq!(
            again.ok(),
            Some((id, request)),
            "re-encoding changed a request"
        );
    }
    let _ = MapsRequest::request_id_of(bytes);
    if let Ok(message) = MapsMessage::decode(bytes) {
        let again = MapsMessage::decode(&message.encode());
        assert_eq!(again.ok(), Some(message), "re-encoding changed a message");
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let requests = examples::requests().into_iter().map(|r| r.encode(1 << 40));
    let messages = examples::messages().into_iter().map(|m| m.encode());
    requests.chain(messages).collect()
}

#[test]
fn decode_arbitrary_bytes() {
    bolero::check!()
        .with_iterations(ARBITRARY_ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_max_len(4096)
        .for_each(|bytes: &[u8]| check(bytes));
}

/// One edit of a valid encoding; positions are taken modulo the current length.
#[derive(Debug, Clone, Copy, bolero::TypeGenerator)]
enum Mutation {
    Flip { at: u16, mask: u8 },
    SetU16 { at: u16, value: u16 },
    SetU32 { at: u16, value: u32 },
    Insert { at: u16, value: u8 },
    Remove { at: u16 },
    Truncate { len: u16 },
}

fn apply(bytes: &mut Vec<u8>, mutation: Mutation) {
    let pos = |at: u16, len: usize| usize::from(at) % len.max(1);
    match mutation {
        Mutation::Flip { at, mask } => {
            let at = pos(at, bytes.len());
            if let Some(b) = bytes.get_mut(at) {
                *b ^= mask.max(1);
            }
        }
        Mutation::SetU16 { at, value } => {
            let at = pos(at, bytes.len());
            if let Some(s) = bytes.get_mut(at..at + 2) {
                s.copy_from_slice(&value.to_le_bytes());
            }
        }
        Mutation::SetU32 { at, value } => {
            let at = pos(at, bytes.len());
            if let Some(s) = bytes.get_mut(at..at + 4) {
                s.copy_from_slice(&value.to_le_bytes());
            }
        }
        Mutation::Insert { at, value } => {
            let at = pos(at, bytes.len() + 1);
            bytes.insert(at, value);
        }
        Mutation::Remove { at } => {
            if !bytes.is_empty() {
                let at = pos(at, bytes.len());
                bytes.remove(at);
            }
        }
        Mutation::Truncate { len } => {
            let len = pos(len, bytes.len() + 1);
            bytes.truncate(len);
        }
    }
}

#[test]
fn decode_mutated_valid_messages() {
    let corpus = corpus();
    bolero::check!()
        .with_iterations(MUTATED_ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_type::<(u8, u8, Vec<Mutation>)>()
        .for_each(|(pick, count, mutations)| {
            let Some(base) = corpus.get(usize::from(*pick) % corpus.len()) else {
                return;
            };
            let mut bytes = base.clone();
            for m in mutations.iter().take(1 + usize::from(*count % 3)) {
                apply(&mut bytes, *m);
            }
            check(&bytes);
        });
}
