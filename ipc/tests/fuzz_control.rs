//! Fuzz targets for the control message decoder, [`Envelope::decode`].
//!
//! Properties: decoding never panics, whatever the bytes; and whatever it accepts re-encodes to
//! bytes that decode to the same envelope.
//!
//! * `decode_arbitrary_bytes` feeds raw bytes. Most fail at the segment table, which is what a
//!   garbage-sending peer looks like.
//! * `decode_mutated_valid_messages` takes a valid encoding of one of several messages (one of
//!   every kind, including a `Start` with resources) and applies fuzzer-chosen byte flips,
//!   overwrites, insertions and truncations, so that the pointer, list, text, union and enum
//!   paths of the decoder are reached.
//!
//! Under plain `cargo test` (stable Rust) bolero runs each target with its random engine for a
//! bounded number of iterations (the constants below; together about ten seconds in the default
//! `dev` profile):
//!
//! ```text
//! cargo test -p duplex-ipc --test fuzz_control
//! ```
//!
//! To run longer, override the bound with bolero's environment variables (they take precedence
//! over the values set in the code), e.g. ten minutes per target, or a number of iterations:
//!
//! ```text
//! BOLERO_RANDOM_TEST_TIME_MS=600000 BOLERO_RANDOM_ITERATIONS=18446744073709551615 \
//!     cargo test --release -p duplex-ipc --test fuzz_control
//! BOLERO_RANDOM_ITERATIONS=10000000 cargo test --release -p duplex-ipc --test fuzz_control
//! ```
//!
//! For coverage-guided fuzzing with libFuzzer (needs nightly Rust and `cargo install
//! cargo-bolero`):
//!
//! ```text
//! cargo +nightly bolero test -p duplex-ipc --test fuzz_control \
//!     decode_mutated_valid_messages --engine libfuzzer -T 10min
//! ```
//!
//! A failure prints `BOLERO_RANDOM_SEED=...`; set that variable to replay it.

use std::time::Duration;

use duplex_ipc::control::{
    Body, Envelope, ErrorCode, Resource, ResourceKind, StartMode, MAX_RESOURCES,
};

/// Iterations of `decode_arbitrary_bytes` under `cargo test`, unless `BOLERO_RANDOM_ITERATIONS`
/// says otherwise. Most of these inputs fail at the segment table, so they are cheap.
const ARBITRARY_ITERATIONS: usize = 20_000_000;
/// Iterations of `decode_mutated_valid_messages` under `cargo test`, unless
/// `BOLERO_RANDOM_ITERATIONS` says otherwise.
const MUTATED_ITERATIONS: usize = 8_000_000;
/// Wall-clock cap per target, unless `BOLERO_RANDOM_TEST_TIME_MS` says otherwise, so that a
/// slow or loaded machine does not run the suite for minutes. (A bound, not an assertion.)
const TIME_CAP: Duration = Duration::from_secs(20);

/// Decodes `bytes`; if that succeeds, checks that re-encoding round-trips.
fn check(bytes: &[u8]) {
    if let Ok(envelope) = Envelope::decode(bytes) {
        let again = Envelope::decode(&envelope.encode());
        assert_eq!(
            again.ok().as_ref(),
            Some(&envelope),
            "re-encoding changed a decoded message"
        );
    }
}

/// Valid encodings of one message of every kind, the starting points for mutation.
fn corpus() -> Vec<Vec<u8>> {
    let resources = (0..MAX_RESOURCES)
        .map(|i| Resource {
            name: format!("ring.fabric{i}.sq"),
            kind: match i % 6 {
                0 => ResourceKind::Region,
                1 => ResourceKind::RingRegion,
                2 => ResourceKind::Pool,
                3 => ResourceKind::Eventfd,
                4 => ResourceKind::Socket,
                _ => ResourceKind::File,
            },
            fd_index: u32::try_from(MAX_RESOURCES - 1 - i).unwrap_or(0),
        })
        .collect::<Vec<_>>();
    let bodies = [
        Body::Hello {
            service: "datapath".into(),
            pid: 1234,
            protocol_version: 1,
        },
        Body::Start {
            generation: 2,
            mode: StartMode::Restart,
            resources: resources.clone(),
        },
        Body::Start {
            generation: 1,
            mode: StartMode::Fresh,
            resources: resources.into_iter().take(2).collect(),
        },
        Body::Ready { generation: 2 },
        Body::Heartbeat { counter: 77 },
        Body::Shutdown {
            reason: "upgrade".into(),
            deadline_ms: 3000,
        },
        Body::Ack { request_id: 9 },
        Body::Error {
            request_id: 9,
            code: ErrorCode::Unexpected,
            message: "twice".into(),
        },
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let id = u64::try_from(i).unwrap_or(0) + 1;
            Envelope {
                request_id: id,
                epoch: 3,
                body,
            }
            .encode()
        })
        .collect()
}

#[test]
fn corpus_is_valid() {
    for bytes in corpus() {
        assert!(Envelope::decode(&bytes).is_ok());
    }
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
    /// XOR one byte with a non-zero mask.
    Flip { at: u16, mask: u8 },
    /// Overwrite one byte.
    Set { at: u16, value: u8 },
    /// Overwrite a little-endian u16 (discriminants, enumerants, list and text lengths).
    SetU16 { at: u16, value: u16 },
    /// Overwrite a little-endian u32 (segment table entries, pointer offsets and sizes).
    SetU32 { at: u16, value: u32 },
    /// Insert one byte.
    Insert { at: u16, value: u8 },
    /// Remove one byte.
    Remove { at: u16 },
    /// Cut the message short.
    Truncate { len: u16 },
}

fn apply(bytes: &mut Vec<u8>, mutation: Mutation) {
    let pos = |at: u16, len: usize| usize::from(at) % len.max(1);
    match mutation {
        Mutation::Flip { at, mask } => {
            let at = pos(at, bytes.len());
            if let Some(byte) = bytes.get_mut(at) {
                *byte ^= mask.max(1);
            }
        }
        Mutation::Set { at, value } => {
            let at = pos(at, bytes.len());
            if let Some(byte) = bytes.get_mut(at) {
                *byte = value;
            }
        }
        Mutation::SetU16 { at, value } => {
            let at = pos(at, bytes.len());
            if let Some(slot) = bytes.get_mut(at..at + 2) {
                slot.copy_from_slice(&value.to_le_bytes());
            }
        }
        Mutation::SetU32 { at, value } => {
            let at = pos(at, bytes.len());
            if let Some(slot) = bytes.get_mut(at..at + 4) {
                slot.copy_from_slice(&value.to_le_bytes());
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
            // One to three edits keep the message mostly well-formed, which is where the deep
            // paths are; more would mostly break the framing.
            for mutation in mutations.iter().take(1 + usize::from(*count % 3)) {
                apply(&mut bytes, *mutation);
            }
            check(&bytes);
        });
}
