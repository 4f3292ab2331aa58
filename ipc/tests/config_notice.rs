//! The restart notice: a caller waiting for an answer from a metadata service that died gets
//! the successor's notice as its answer at once (not after its timeout); a notice left over
//! is discarded before the next request.

use std::time::Duration;

use duplex_ipc::config::{ConfigChannel, ConfigErrorKind, ConfigReply, ConfigRequest};

#[test]
fn a_waiting_caller_takes_the_restart_notice_as_its_answer() {
    let (mgmt, metadata) = ConfigChannel::pair().expect("pair");
    let waiter = std::thread::spawn(move || {
        let r = mgmt.call(
            &ConfigRequest::CreateSubsystem("nqn.2026-12.io.duplex:x".into()),
            Duration::from_secs(3600),
        );
        (mgmt, r)
    });
    // The "predecessor" takes the request and dies without answering; the successor says so.
    let got = metadata
        .recv_request(Duration::from_secs(3600))
        .expect("recv")
        .expect("a request");
    assert!(matches!(got.1, ConfigRequest::CreateSubsystem(_)));
    metadata.send_restart_notice().expect("notice");
    let (mgmt, answer) = waiter.join().expect("join");
    match answer.expect("call") {
        Some(ConfigReply::Error { kind, message }) => {
            assert_eq!(kind, ConfigErrorKind::NotReady);
            assert!(message.contains("restarted"), "{message}");
        }
        other => panic!("expected the notice, got {other:?}"),
    }
    // A notice nobody waited for is discarded before the next request.
    metadata.send_restart_notice().expect("notice");
    assert_eq!(mgmt.discard_queued(), 1);
}
