//! duplex-bench's command line: bad arguments are one line on stderr and exit 2, help exits 0,
//! an unreachable target is one line and exit 1. (Also makes `cargo test --workspace` build the
//! binary the system tests run.)

use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_duplex-bench"))
        .args(args)
        .output()
        .expect("duplex-bench runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_arguments_are_one_line_and_exit_2() {
    let base = ["--target", "127.0.0.1:1", "--nqn", "nqn.x"];
    for (extra, mentions) in [
        (&["--bs", "3q"][..], "--bs"),
        (&["--qd", "0"][..], "--qd"),
        (&["--workload", "sideways"][..], "--workload"),
        (&["--read-pct", "101"][..], "--read-pct"),
        (&["--queues", "0"][..], "--queues"),
        (&["--frobnicate"][..], "--frobnicate"),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let (code, out, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(mentions), "{args:?}: {err}");
    }
    let (code, _, err) = run(&["--nqn", "nqn.x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--target"), "{err}");
}

#[test]
fn help_exits_0_and_an_unreachable_target_is_one_line() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--verify"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    // Nothing listens there any more.
    let (code, _, err) = run(&["--target", &format!("127.0.0.1:{port}"), "--nqn", "nqn.x"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("connecting to"), "{err}");
}
