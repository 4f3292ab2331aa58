//! Fuzz target for the engine's validation and dispatch: batches of arbitrary descriptors
//! (any opcode, volume, LBA, block count and flags; a buffer field that is nothing, a valid chain
//! lent through the descriptor, a chain lent through another index or ring, a chain the fabric
//! holds, or any handle) are pushed through a running engine.
//!
//! Properties, for every batch: every submission gets exactly one completion, with its tag and
//! epoch; its status is what an independent model of the contract says; the completion carries
//! a chain exactly when the submission lent one validly; and once the fabric has settled what it
//! got back and what it kept, every chunk of the pool is free (no leak, nothing taken that was
//! not lent). The engine never panics (it runs on its own thread: a panic would end it and the
//! next batch would time out).
//!
//! Under plain `cargo test` bolero runs the target for a bounded number of iterations (below).
//! Longer, as for `ipc/tests/fuzz_control.rs`:
//!
//! ```text
//! BOLERO_RANDOM_ITERATIONS=1000000 BOLERO_RANDOM_TEST_TIME_MS=600000 \
//!     cargo test --release -p duplex-datapath --test fuzz_descriptors
//! ```
//!
//! A failure prints `BOLERO_RANDOM_SEED=...`; set that variable to replay it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;
use duplex_datapath::FLUSH_ALL;
use duplex_ipc::desc::{
    IoDesc, OP_DEALLOCATE, OP_FLUSH, OP_READ, OP_WRITE, OP_WRITE_ZEROES, STATUS_INVALID_FIELD,
    STATUS_LBA_OUT_OF_RANGE, STATUS_NOT_MAPPED, STATUS_SUCCESS,
};
use duplex_ipc::pool::NIL;

/// Iterations (batches of up to 48 descriptors) under `cargo test`, unless
/// `BOLERO_RANDOM_ITERATIONS` says otherwise.
const ITERATIONS: usize = 5_000;
/// Wall-clock cap, unless `BOLERO_RANDOM_TEST_TIME_MS` says otherwise (a bound, not an
/// assertion).
const TIME_CAP: Duration = Duration::from_secs(20);
/// Bytes of input per descriptor.
const STRIDE: usize = 24;
/// Volumes: (id, block size, blocks).
const VOLUMES: [(u32, u32, u64); 2] = [(1, 512, 8192), (2, 4096, 2048)];

/// What the buffer field of a fuzzed descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Buf {
    /// `NIL`.
    Nil,
    /// A chain of this many chunks lent through the descriptor.
    Lent(usize),
    /// A chain lent through a later index of the submission ring.
    WrongIndex,
    /// A chain lent through the completion ring.
    WrongRing,
    /// A chain the fabric holds and did not lend.
    Held,
    /// This raw handle (often outside the pool, sometimes a free chunk).
    Raw(u32),
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0_u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Decodes one descriptor from `STRIDE` bytes, biased towards the interesting values.
fn decode(b: &[u8]) -> (IoDesc, Buf) {
    let opcode = match b[0] % 7 {
        0 => OP_READ,
        1 => OP_WRITE,
        2 => OP_FLUSH,
        3 => OP_WRITE_ZEROES,
        4 => OP_DEALLOCATE,
        _ => b[1],
    };
    let volume = match b[2] % 5 {
        0 | 1 => 1,
        2 => 2,
        3 => FLUSH_ALL,
        _ => u32::from(b[3]),
    };
    let raw = u64_at(b, 8);
    let blocks = match b[4] % 8 {
        0 => 0,
        1..=6 => u32::from(b[5] % 64),
        _ => raw as u32,
    };
    let end = VOLUMES.iter().find(|v| v.0 == volume).map_or(4096, |v| v.2);
    let lba = match b[6] % 8 {
        0..=2 => u64::from(b[7]),
        3 | 4 => end.saturating_sub(u64::from(b[7] % 70)),
        5 => raw >> (b[7] % 64),
        6 => u64::MAX - u64::from(b[7] % 4),
        _ => raw,
    };
    let buf = match b[16] % 8 {
        0 => Buf::Nil,
        1..=3 => Buf::Lent(1 + usize::from(b[17] % 40)),
        4 => Buf::WrongIndex,
        5 => Buf::WrongRing,
        6 => Buf::Held,
        _ => Buf::Raw(u32::from_le_bytes([b[18], b[19], b[20], b[21]]) >> (b[17] % 32)),
    };
    let desc = IoDesc {
        opcode,
        volume,
        lba,
        blocks,
        flags: b[22],
        checksum: u32::from(b[23]),
        ..IoDesc::default()
    };
    (desc, buf)
}

/// The status the contract gives `desc` (precedence as documented: buffer, opcode, volume,
/// blocks, range, chain capacity), and whether its chain comes back.
fn model(desc: &IoDesc, buf: Buf, chunk: u64) -> (u16, bool) {
    let lent = matches!(buf, Buf::Lent(_));
    let data = !matches!(desc.opcode, OP_FLUSH | OP_WRITE_ZEROES | OP_DEALLOCATE);
    if data && !lent {
        return (STATUS_INVALID_FIELD, false);
    }
    let known = [OP_READ, OP_WRITE, OP_FLUSH, OP_WRITE_ZEROES, OP_DEALLOCATE];
    if !known.contains(&desc.opcode) {
        return (STATUS_INVALID_FIELD, lent);
    }
    if desc.opcode == OP_FLUSH && desc.volume == FLUSH_ALL {
        return (STATUS_SUCCESS, lent);
    }
    let Some(&(_, bs, blocks)) = VOLUMES.iter().find(|v| v.0 == desc.volume) else {
        return (STATUS_NOT_MAPPED, lent);
    };
    if desc.opcode == OP_FLUSH {
        return (STATUS_SUCCESS, lent);
    }
    if desc.blocks == 0 && desc.opcode != OP_DEALLOCATE {
        return (STATUS_INVALID_FIELD, lent);
    }
    match desc.lba.checked_add(u64::from(desc.blocks)) {
        Some(e) if e <= blocks => {}
        _ => return (STATUS_LBA_OUT_OF_RANGE, lent),
    }
    if let Buf::Lent(chunks) = buf {
        if data && (chunks as u64) * chunk < u64::from(desc.blocks) * u64::from(bs) {
            return (STATUS_INVALID_FIELD, true);
        }
    }
    (STATUS_SUCCESS, lent)
}

fn run_batch(node: &mut Node, input: &[[u8; STRIDE]]) {
    let chunk = node.pool.chunk_size() as u64;
    let f = node.f();
    let pool = std::sync::Arc::clone(&f.pool);
    let mut expected = std::collections::HashMap::new();
    let mut kept = Vec::new();
    for b in input.iter().take(48) {
        let (mut desc, buf) = decode(b);
        desc.tag = f.tag();
        desc.epoch = EPOCH;
        let index = f.sq.next_index();
        desc.buf = match buf {
            Buf::Nil => NIL,
            Buf::Lent(chunks) => {
                let h = pool.alloc_chain(chunks * chunk as usize).unwrap();
                pool.lend_chain(h, f.sq_id(), index).unwrap();
                h.0
            }
            Buf::WrongIndex | Buf::WrongRing | Buf::Held => {
                let h = pool.alloc_chain(chunk as usize).unwrap();
                match buf {
                    Buf::WrongIndex => pool.lend_chain(h, f.sq_id(), index + 1000).unwrap(),
                    Buf::WrongRing => pool.lend_chain(h, f.cq_id(), index).unwrap(),
                    _ => {}
                }
                kept.push((h, buf, index));
                h.0
            }
            Buf::Raw(h) => h,
        };
        expected.insert(desc.tag, (desc, model(&desc, buf, chunk)));
        let pushed =
            f.sq.push_wait(std::slice::from_ref(&desc), Some(DEADLINE))
                .unwrap();
        assert_eq!(pushed, 1);
    }
    let done = f.collect(expected.len());
    for (tag, d) in done {
        let (sent, (status, back)) = expected[&tag];
        assert_eq!(
            (d.desc.status, d.data.is_some()),
            (status, back),
            "submitted {sent:?}, completed {:?}",
            d.desc
        );
        assert_eq!(
            (d.desc.opcode, d.desc.volume, d.desc.lba, d.desc.blocks),
            (sent.opcode, sent.volume, sent.lba, sent.blocks)
        );
    }
    // Settle what the fabric kept: take back what it lent elsewhere, free it all.
    for (h, buf, index) in kept {
        match buf {
            Buf::WrongIndex => pool.take_chain(h, f.sq_id(), index + 1000).unwrap(),
            Buf::WrongRing => pool.take_chain(h, f.cq_id(), index).unwrap(),
            _ => {}
        }
        pool.free_chain(h).unwrap();
    }
    assert_eq!(
        pool.free_count(),
        pool.capacity() as usize,
        "a chunk leaked or was taken without being lent"
    );
}

#[test]
fn arbitrary_descriptors_get_exactly_the_contracted_completions() {
    let node = Mutex::new(Node::start(Setup {
        chunks: 2048,
        ..Setup::default()
    }));
    bolero::check!()
        .with_iterations(ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_type::<Vec<[u8; STRIDE]>>()
        .for_each(|input| {
            let mut node = node.lock().unwrap_or_else(|e| e.into_inner());
            run_batch(&mut node, input);
        });
    let node = node.into_inner().unwrap_or_else(|e| e.into_inner());
    let stats = node.stop();
    assert_eq!(stats.submissions, stats.completions);
    eprintln!("{stats:?}");
}
