//! The `duplex-raid` binary outside duplexd. (Being an integration test also makes cargo build
//! the binary the system tests of `duplex-tests` spawn under duplexd.)

use std::process::Command;

#[test]
fn the_binary_refuses_arguments_and_a_missing_lifecycle_channel() {
    let exe = env!("CARGO_BIN_EXE_duplex-raid");
    let out = Command::new(exe).arg("--rate").output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("takes no arguments"));
    // Not spawned by duplexd: no lifecycle channel, a one-line failure, no panic.
    let out = Command::new(exe).output().expect("runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("duplex-raid: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
