//! The `duplex-cluster` binary outside duplexd, and the interconnect decoder against random
//! bytes. (Being an integration test also makes cargo build the binary the system tests of
//! `duplex-tests` spawn under duplexd.)

use std::process::Command;

use duplex_cluster::wire::{Body, Message, NodeState, MAX_FRAME};

#[test]
fn the_binary_refuses_arguments_and_a_missing_lifecycle_channel() {
    let exe = env!("CARGO_BIN_EXE_duplex-cluster");
    let out = Command::new(exe).arg("--peer").output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("takes no arguments"));
    // Not spawned by duplexd: no lifecycle channel, a one-line failure, no panic.
    let out = Command::new(exe).output().expect("runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("duplex-cluster: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn random_bytes_never_panic_the_decoder() {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let good = Message {
        cluster: "duplex".into(),
        node: 1,
        boot: 42,
        body: Body::Beat {
            seq: 3,
            state: NodeState::Serving,
            config_generation: 0,
            takeover_pending: false,
        },
    }
    .frame()
    .expect("frame");
    for _ in 0..20_000 {
        let len = (next() % (MAX_FRAME as u64 + 64)) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Half of the inputs start as a real message, then are damaged.
        if next() % 2 == 0 {
            b = good[4..].to_vec();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
        }
        if let Ok(m) = Message::decode(&b) {
            assert!(m.validate().is_ok());
        }
    }
}
