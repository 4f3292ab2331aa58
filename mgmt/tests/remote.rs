//! Remote management: the real `duplexctl --connect ADDR --key-file FILE` against the real
//! `duplex-mgmt` (under its seccomp policy) through a TCP listener handed over as duplexd hands
//! it (`remote:NAME`, with the `mgmt-key` region). The key is proven in a TLS 1.3 handshake: the
//! right one gets the same answers as the local socket; a wrong one, a plain TCP peer, a silent
//! peer or a TLS client without the key get nothing and cost the node nothing; a restarted mgmt
//! serves the same port again.
//!
//! No timing assertions: every wait ends as soon as its condition holds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn the_right_key_manages_the_node_from_afar_like_the_local_socket() {
    let mut node = Node::with_remote();
    let _mgmt = node.start_mgmt();
    let key = node.remote.as_ref().unwrap().key_file.clone();

    let local = node.ctl(&["--json", "service", "list"]);
    let remote = node.remote_ctl(&key, &["--json", "service", "list"]);
    assert_eq!(remote.ok(), local.ok());
    // A storage request goes through mgmt's config channel as from the local socket.
    let local = node.ctl(&["--json", "drive", "list"]);
    let remote = node.remote_ctl(&key, &["--json", "drive", "list"]);
    assert_eq!(remote.ok(), local.ok());
    let out = node.remote_ctl(&key, &["status"]);
    assert!(out.ok().contains("node"), "{out:?}");
    // And a change: the metadata service (here the test) received it.
    let _ = node.metadata.taken();
    let out = node.remote_ctl(
        &key,
        &["pool", "create", "tank", "--raid", "1", "--drives", "d0,d1"],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let taken = node.metadata.taken();
    assert!(
        matches!(&taken[..], [duplex_ipc::config::ConfigRequest::CreatePool { name, .. }] if name == "tank"),
        "{taken:?}"
    );
}

#[test]
fn a_wrong_key_is_refused_in_the_handshake_with_one_line_and_the_node_serves_on() {
    let mut node = Node::with_remote();
    let mgmt = node.start_mgmt();
    let wrong = node.dir.path().join("wrong.key");
    std::fs::write(&wrong, "ab".repeat(32)).unwrap();
    let out = node.remote_ctl(&wrong, &["service", "list"]);
    let line = out.failed(1);
    eprintln!("{line}");
    assert!(
        line.contains("the TLS handshake with") && line.contains("--key-file"),
        "{line}"
    );
    // Nothing reached the supervisor, and the node is still managed with the right key.
    assert!(node.admin.taken().is_empty(), "{:?}", node.admin.taken());
    let key = node.remote.as_ref().unwrap().key_file.clone();
    node.remote_ctl(&key, &["service", "list"]).ok();
    eventually(
        "a rate-limited warning about the refused connection",
        || mgmt.log().contains("remote management connection refused"),
    );
}

#[test]
fn key_and_address_mistakes_are_one_line_errors_without_contacting_anything() {
    let node = Node::with_remote();
    let key = node.remote.as_ref().unwrap().key_file.clone();
    let bin = env!("CARGO_BIN_EXE_duplexctl");
    let run = |args: &[&str]| ctl(&mut Command::new(bin), args);

    let line = run(&["--connect", "127.0.0.1:1", "status"])
        .failed(2)
        .to_owned();
    assert!(line.contains("--connect needs --key-file"), "{line}");
    let k = key.to_str().unwrap();
    let line = run(&["--key-file", k, "status"]).failed(2).to_owned();
    assert!(line.contains("--key-file is for --connect"), "{line}");
    let line = run(&["--connect", "localhost", "--key-file", k, "status"])
        .failed(2)
        .to_owned();
    assert!(line.contains("host:port"), "{line}");
    let short = node.dir.path().join("short.key");
    std::fs::write(&short, "0123").unwrap();
    let line = run(&[
        "--connect",
        "127.0.0.1:1",
        "--key-file",
        short.to_str().unwrap(),
        "status",
    ])
    .failed(1)
    .to_owned();
    assert!(line.contains("not 64 hexadecimal digits"), "{line}");
    let line = run(&[
        "--connect",
        "127.0.0.1:1",
        "--key-file",
        "/nonexistent/mgmt.key",
        "status",
    ])
    .failed(1)
    .to_owned();
    assert!(line.contains("cannot read the key file"), "{line}");
    // Nobody listens: told apart from a wrong key.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let line = run(&["--connect", &addr, "--key-file", k, "status"])
        .failed(1)
        .to_owned();
    assert!(line.contains("connection refused"), "{line}");
}

#[test]
fn hostile_peers_get_nothing_and_do_not_hold_up_the_operator() {
    let mut node = Node::with_remote();
    let mgmt = node.start_mgmt();
    let addr = node.remote.as_ref().unwrap().addr();
    let key = node.remote.as_ref().unwrap().key_file.clone();

    // A silent peer, holding its connection open (its handshake would time out).
    let silent = TcpStream::connect(&addr).unwrap();
    // A plain peer writing a Cap'n Proto-looking message without TLS: closed, nothing answered.
    let mut plain = TcpStream::connect(&addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    plain.write_all(&[0u8; 64]).unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(
        got.len() < 16,
        "a plain peer got more than a TLS alert: {got:?}"
    );
    // Random bytes that look like a TLS record header.
    let mut junk = TcpStream::connect(&addr).unwrap();
    junk.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut bytes = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    bytes.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let _ = junk.write_all(&bytes);
    let mut got = Vec::new();
    let _ = junk.read_to_end(&mut got);
    assert!(got.len() < 16, "junk got an answer: {got:?}");

    // The operator is served meanwhile.
    assert!(node.admin.taken().is_empty(), "{:?}", node.admin.taken());
    node.remote_ctl(&key, &["service", "list"]).ok();
    assert!(!node.admin.taken().is_empty());
    drop(silent);

    // A real TLS client without the key: OpenSSL's s_client fails its handshake.
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &addr, "-tls1_3", "-brief"])
        .stdin(Stdio::null())
        .output()
        .expect("openssl (scripts/setup installs it)");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || !text.contains("CONNECTION ESTABLISHED"),
        "a TLS client without the key got a session:\n{text}"
    );
    assert!(node.admin.taken().is_empty(), "{:?}", node.admin.taken());
    assert!(
        mgmt.log().contains("remote management connection refused"),
        "{}",
        mgmt.log()
    );
}

#[test]
fn a_restarted_mgmt_serves_the_same_remote_port() {
    let mut node = Node::with_remote();
    let mut first = node.start_mgmt();
    let key = node.remote.as_ref().unwrap().key_file.clone();
    node.remote_ctl(&key, &["service", "list"]).ok();
    first.kill();
    drop(first);
    let _second = node.start_mgmt();
    node.remote_ctl(&key, &["service", "list"]).ok();
}

#[test]
fn silent_peers_on_the_remote_port_never_cost_the_local_socket_its_slots() {
    let mut node = Node::with_remote();
    let mgmt = node.start_mgmt();
    let addr = node.remote.as_ref().unwrap().addr();
    let key = node.remote.as_ref().unwrap().key_file.clone();
    // More silent peers than there are connection slots, all accepted by the kernel.
    let silent: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    eventually("the handshake budget refusing the surplus", || {
        mgmt.log()
            .contains("too many remote management handshakes at once")
    });
    // The local socket is served: its connection was not refused for want of a slot.
    node.ctl(&["service", "list"]).ok();
    assert!(
        !mgmt
            .log()
            .contains("too many management connections; closing a new one"),
        "{}",
        mgmt.log()
    );
    // And the operator with the key gets in once the silent handshakes time out.
    node.remote_ctl(&key, &["--timeout", "60", "service", "list"])
        .ok();
    drop(silent);
}

#[test]
fn a_server_that_does_not_prove_the_key_is_refused_before_any_request() {
    let node = Node::with_remote();
    let key = node.remote.as_ref().unwrap().key_file.clone();
    let dir = node.dir.path();
    // An impostor at the node's address: OpenSSL's s_server with a self-signed certificate,
    // TLS 1.3, no PSK.
    let (cert, pkey) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-subj", "/CN=impostor", "-days", "1", "-keyout"])
        .arg(&pkey)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .expect("openssl req");
    assert!(made.status.success(), "{made:?}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("openssl")
        .args(["s_server", "-accept", &port.to_string(), "-tls1_3", "-cert"])
        .arg(&cert)
        .arg("-key")
        .arg(&pkey)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    eventually("s_server listening", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let out = ctl(
        &mut Command::new(env!("CARGO_BIN_EXE_duplexctl")),
        &[
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--key-file",
            key.to_str().unwrap(),
            "service",
            "list",
        ],
    );
    let _ = server.kill();
    let _ = server.wait();
    // Refused in the handshake (not sent a request and left waiting for an answer).
    let line = out.failed(1);
    assert!(
        line.contains("the TLS handshake with") && line.contains("--key-file"),
        "{line}"
    );
}
