//! Fuzz targets for the config channel's decoders, [`ConfigRequest::decode`] and
//! [`ConfigReply::decode`] (the metadata service decodes what mgmt sends, mgmt what metadata
//! answers; neither trusts the other).
//!
//! Properties: decoding never panics, whatever the bytes; and whatever either decoder accepts
//! re-encodes to bytes that decode to the same message.
//!
//! * `decode_arbitrary_bytes` feeds raw bytes to both decoders.
//! * `decode_mutated_valid_messages` takes a valid encoding of one message of every kind (every
//!   request, every reply, and the largest replies the bounds allow) and applies fuzzer-chosen
//!   byte flips, overwrites, insertions and truncations, so that the pointer, list, text, union
//!   and enum paths of the decoders are reached.
//!
//! Bounded under plain `cargo test` like `fuzz_control.rs` (whose doc says how to run longer,
//! or coverage-guided):
//!
//! ```text
//! cargo test -p duplex-ipc --test fuzz_config
//! BOLERO_RANDOM_TEST_TIME_MS=600000 cargo test --release -p duplex-ipc --test fuzz_config
//! ```
//!
//! A failure prints `BOLERO_RANDOM_SEED=...`; set that variable to replay it.

use std::time::Duration;

use duplex_ipc::config::{examples, ConfigReply, ConfigRequest};

/// Iterations of `decode_arbitrary_bytes` under `cargo test`, unless `BOLERO_RANDOM_ITERATIONS`
/// says otherwise. Most inputs fail at the segment table, so they are cheap.
const ARBITRARY_ITERATIONS: usize = 10_000_000;
/// Iterations of `decode_mutated_valid_messages` under `cargo test`.
const MUTATED_ITERATIONS: usize = 2_000_000;
/// Wall-clock cap per target, unless `BOLERO_RANDOM_TEST_TIME_MS` says otherwise. (A bound, not
/// an assertion.)
const TIME_CAP: Duration = Duration::from_secs(10);

/// Decodes `bytes` both ways; whatever decodes must round-trip.
fn check(bytes: &[u8]) {
    if let Ok((id, request)) = ConfigRequest::decode(bytes) {
        let again = ConfigRequest::decode(&request.encode(id));
        assert_eq!(
            again.ok(),
            Some((id, request)),
            "re-encoding changed a decoded request"
        );
    }
    if let Ok((id, reply)) = ConfigReply::decode(bytes) {
        let again = ConfigReply::decode(&reply.encode(id));
        assert_eq!(
            again.ok(),
            Some((id, reply)),
            "re-encoding changed a decoded reply"
        );
    }
}

/// Valid encodings of every message kind, the starting points for mutation.
fn corpus() -> Vec<Vec<u8>> {
    let requests = examples::requests().into_iter().map(|r| r.encode(1 << 32));
    let replies = examples::replies()
        .into_iter()
        .chain(examples::largest_replies())
        .map(|r| r.encode(7));
    requests.chain(replies).collect()
}

#[test]
fn corpus_is_valid() {
    let corpus = corpus();
    assert!(corpus.len() > 20);
    for bytes in corpus {
        assert!(ConfigRequest::decode(&bytes).is_ok() || ConfigReply::decode(&bytes).is_ok());
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
    // The largest replies are longer than a u16 reaches; scale positions over the whole message.
    let pos = |at: u16, len: usize| usize::from(at) * len.max(1) / 65_536;
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
