//! duplexctl without a running mgmt: usage errors, and the ways a node can be absent. Each error
//! is one line on stderr with the right exit status.

mod common;

use std::os::unix::net::UnixListener;
use std::process::Command;

use common::{ctl, Ctl};

fn duplexctl(state_dir: &std::path::Path, args: &[&str]) -> Ctl {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_duplexctl"));
    cmd.arg("--state-dir").arg(state_dir);
    ctl(&mut cmd, args)
}

#[test]
fn usage_errors_are_one_line_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let out = duplexctl(d, &["frobnicate"]);
    assert!(
        out.failed(2)
            .starts_with("duplexctl: unrecognized subcommand 'frobnicate'"),
        "{out:?}"
    );
    let out = duplexctl(d, &["service", "crash", "fabric", "--mode", "explode"]);
    let line = out.failed(2);
    assert!(line.contains("invalid value 'explode'"), "{line}");
    assert!(
        line.contains("kill, panic, hang, forbidden-syscall"),
        "{line}"
    );
    let out = duplexctl(d, &["service", "crash", "fabric"]);
    assert!(out.failed(2).contains("--mode"), "{out:?}");
    let out = duplexctl(d, &["--timeout", "0", "status"]);
    assert!(out.failed(2).contains("--timeout"), "{out:?}");
    let out = duplexctl(d, &[]);
    assert!(out.failed(2).contains("subcommand"), "{out:?}");
}

#[test]
fn storage_argument_errors_exit_2_without_contacting_the_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // Something listens but never answers: a command that reached for it would hang until its
    // timeout and exit 1; a usage error exits 2 first.
    let _listener = UnixListener::bind(d.join("mgmt.sock")).expect("bind");
    let nqn = "nqn.2026-11.io.duplex:vol0";
    for (args, says) in [
        (
            &["volume", "create", "v", "--pool", "p", "--size", "10x"][..],
            "invalid value '10x' for '--size <SIZE>': not a size",
        ),
        (
            &["volume", "resize", "v", "--size", "1.5G"],
            "invalid value '1.5G' for '--size <SIZE>'",
        ),
        (
            &["volume", "create", "v", "--pool", "p", "--size", "0"],
            "must be more than 0",
        ),
        (
            &["pool", "create", "tank", "--raid", "7", "--drives", "a,b"],
            "invalid value '7' for '--raid <RAID>' [possible values: 0, 1, 10, 5, 6]",
        ),
        (
            &[
                "pool", "create", "tank", "--raid", "1", "--drives", "a,b", "--chunk", "3k",
            ],
            "a chunk is a power of two from 4k to 1m",
        ),
        (
            &[
                "pool", "create", "tank", "--raid", "1", "--drives", "a,b", "--chunk", "2m",
            ],
            "a chunk is a power of two from 4k to 1m",
        ),
        (
            &["pool", "create", "tank", "--raid", "1"],
            "required arguments were not provided: --drives",
        ),
        (
            &["pool", "create", "tank", "--raid", "1", "--drives", "a,b,a"],
            "drive a is named twice in --drives",
        ),
        (
            &["pool", "rate", "tank", "0"],
            "a rate of 0 would stop the work: say `auto` for the default",
        ),
        (
            &["pool", "rate", "tank", "fast"],
            "(a rate is bytes per second, `50M`, or `auto`)",
        ),
        (
            &["pool", "replace", "tank", "d1", "d3", "--rate", "1x"],
            "a rate is bytes per second",
        ),
        (
            &["pool", "show", &"x".repeat(65)],
            "a name must be 1 to 64 bytes long",
        ),
        (
            &["subsystem", "create", "iqn.2026-11.x"],
            "an NQN starts with \"nqn.\"",
        ),
        (
            &["subsystem", "create", &format!("nqn.{}", "x".repeat(220))],
            "an NQN must be 1 to 223 bytes long",
        ),
        (&["host", "allow", nqn], "<HOSTNQN|--any>"),
        (
            &["host", "allow", nqn, "nqn.2014-08.h", "--any"],
            "cannot be used with",
        ),
        (&["host", "deny", nqn, "not-an-nqn"], "an NQN starts with"),
        (&["namespace", "add", nqn], "--volume"),
        (
            &["namespace", "add", nqn, "--volume", "v", "--nsid", "0"],
            "a namespace id is a number from 1 to 4294967294",
        ),
        (&["namespace", "remove", nqn, "x"], "a namespace id"),
        (&["drive", "frob"], "unrecognized subcommand 'frob'"),
    ] {
        let out = duplexctl(d, args);
        let line = out.failed(2);
        assert!(line.contains(says), "{args:?}: {line}");
        assert!(line.ends_with("(see duplexctl --help)"), "{line}");
    }
}

#[test]
fn help_goes_to_stdout_with_exit_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = duplexctl(dir.path(), &["service", "crash", "--help"]);
    assert!(out.ok().contains("forbidden-syscall"), "{out:?}");
}

#[test]
fn no_node_and_no_duplexd_are_told_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let sock = d.join("mgmt.sock");
    let out = duplexctl(d, &["status"]);
    assert_eq!(
        out.failed(1),
        format!(
            "duplexctl: no duplex node at {}: {} does not exist (is duplexd running?)",
            d.display(),
            sock.display()
        )
    );

    // A socket file nobody listens on any more.
    drop(UnixListener::bind(&sock).expect("bind"));
    let out = duplexctl(d, &["--json", "service", "list"]);
    assert_eq!(
        out.failed(1),
        format!(
            "duplexctl: duplexd is not running: {} refuses connections (a stale socket)",
            sock.display()
        )
    );

    // --socket overrides the state directory's socket.
    let other = d.join("elsewhere.sock");
    let out = duplexctl(d, &["--socket", other.to_str().expect("utf-8"), "status"]);
    assert!(
        out.failed(1)
            .contains(&format!("{} does not exist", other.display())),
        "{out:?}"
    );

    // DUPLEX_STATE_DIR stands in for --state-dir.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_duplexctl"));
    cmd.env("DUPLEX_STATE_DIR", d);
    let out = cmd.arg("status").output().expect("duplexctl");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refuses connections"));
}

#[test]
fn a_listener_nobody_serves_and_no_live_duplexd_is_not_answering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let _listener = UnixListener::bind(d.join("mgmt.sock")).expect("bind");
    // No lock file: duplexd never ran here.
    let out = duplexctl(d, &["--timeout", "0.3", "status"]);
    let line = out.failed(1);
    assert!(
        line.starts_with("duplexctl: mgmt is not answering on ")
            && line.contains("duplexd does not seem to run"),
        "{line}"
    );
    // A lock file naming a process that is gone.
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let pid = gone.id();
    gone.wait().expect("wait");
    std::fs::write(d.join("duplexd.lock"), format!("{pid}\n")).expect("write lock");
    let out = duplexctl(d, &["--timeout", "0.3", "status"]);
    assert!(
        out.failed(1)
            .contains(&format!("names pid {pid}, which is not running")),
        "{out:?}"
    );
}
