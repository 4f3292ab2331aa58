//! System tests of the mgmt service and duplexctl: the test plays duplexd (see `common`), the real
//! `duplex-mgmt` runs under its seccomp policy (the default), the real `duplexctl` talks to it.
//!
//! No timing assertions: every wait ends as soon as its condition holds, with a generous
//! deadline. Every spawned process is killed and reaped when its handle drops.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

use common::*;
use duplex_ipc::admin::{AdminRequest, CrashMode};
use duplex_ipc::control::{Body, Fault};

const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;
const SIGSYS: i32 = 31;

fn restarting_line() -> String {
    format!(
        "duplexctl: node reachable (duplexd pid {}) but mgmt is restarting; try again",
        std::process::id()
    )
}

#[test]
fn service_list_as_a_table_and_as_json() {
    let mut node = Node::new();
    let _mgmt = node.start_mgmt();

    let out = node.ctl(&["service", "list"]);
    let rows: Vec<Vec<&str>> = out
        .ok()
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let want: Vec<Vec<&str>> = vec![
        vec![
            "NAME",
            "KIND",
            "STATE",
            "PID",
            "GEN",
            "RESTARTS",
            "HANGS",
            "UPTIME",
            "LAST-EXIT",
        ],
        vec![
            "datapath", "datapath", "running", "4100", "1", "0", "0", "1h02m", "-",
        ],
        vec![
            "fabric",
            "service",
            "backoff",
            "-",
            "3",
            "2",
            "1",
            "-",
            "signal",
            "9",
            "(SIGKILL)",
        ],
        vec![
            "mgmt", "service", "running", "4102", "1", "0", "0", "1m01s", "-",
        ],
    ];
    assert_eq!(rows, want, "{out:?}");

    let out = node.ctl(&["--json", "service", "list"]);
    let doc: serde_json::Value = serde_json::from_str(out.ok()).expect("one JSON document");
    let list = doc["services"].as_array().expect("services array");
    let canned = canned_services();
    assert_eq!(list.len(), canned.len());
    for (row, s) in list.iter().zip(&canned) {
        assert_eq!(row["name"], s.name.as_str());
        assert_eq!(row["kind"], if s.datapath { "datapath" } else { "service" });
        assert_eq!(row["state"], s.state.name());
        assert_eq!(row["pid"], s.pid);
        assert_eq!(row["generation"], s.generation);
        assert_eq!(row["restarts"], s.restarts);
        assert_eq!(row["uptime_ms"], s.uptime_ms);
        assert_eq!(row["hangs"], s.hangs);
        assert_eq!(row["last_exit"], s.last_exit.as_str());
        assert_eq!(row["last_restart_ms"], s.last_restart_ms);
    }
    assert_eq!(
        node.admin.taken(),
        [AdminRequest::ListServices, AdminRequest::ListServices]
    );
}

#[test]
fn status_as_text_and_as_json() {
    let mut node = Node::new();
    let _mgmt = node.start_mgmt();

    let out = node.ctl(&["status"]);
    let text = out.ok();
    assert!(text.contains("node:       node-a\n"), "{text}");
    assert!(text.contains("state:      serving\n"), "{text}");
    assert!(
        text.contains(&format!(
            "supervisor: duplexd pid {}, up 2h05m\n",
            std::process::id()
        )),
        "{text}"
    );
    assert!(text.contains("services:   2 of 3 running\n"), "{text}");
    assert!(text.contains("sandbox:    on"), "{text}");

    let out = node.ctl(&["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(out.ok()).expect("one JSON document");
    let s = canned_status();
    assert_eq!(doc["node"], "node-a");
    assert_eq!(doc["supervisor_pid"], s.supervisor_pid);
    assert_eq!(doc["uptime_ms"], s.uptime_ms);
    assert_eq!(doc["failed"], false);
    assert_eq!(doc["services_running"], 2);
    assert_eq!(doc["services_total"], 3);
    assert_eq!(doc["sandbox"], true);
    // The rest of the screen: the cluster service's report, the pools (the fake metadata
    // service's two, degraded: alerts), the events (the fake supervisor's two, long ago).
    assert_eq!(doc["cluster"]["node"], 1, "{doc}");
    assert_eq!(doc["cluster"]["peer_state"], "alive", "{doc}");
    assert_eq!(doc["pools"][0]["name"], "tank", "{doc}");
    assert_eq!(doc["pools"][0]["ana"], "optimized", "{doc}");
    assert_eq!(doc["recent_warnings"], 0, "{doc}");
    assert!(
        doc["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "pool tank is degraded")),
        "{doc}"
    );
    assert!(
        doc["alerts"].as_array().is_some_and(|a| a.iter().any(|x| x
            .as_str()
            .is_some_and(|s| s.contains("services are not running")))),
        "{doc}"
    );
    assert!(
        text.contains("cluster:    node 1 of duplex; peer node 2 alive\n"),
        "{text}"
    );
    assert!(
        text.contains("alerts:\n  - 1 of 3 services are not running"),
        "{text}"
    );
    assert!(
        text.contains("  tank             raid1  DEGRADED  served here (ANA optimized)\n"),
        "{text}"
    );
    assert!(text.contains("events:     "), "{text}");
    let taken = node.admin.taken();
    assert_eq!(
        taken
            .iter()
            .filter(|r| **r == AdminRequest::NodeStatus)
            .count(),
        2,
        "{taken:?}"
    );
    assert!(taken.contains(&AdminRequest::Events(0)), "{taken:?}");
}

#[test]
fn restart_and_crash_reach_the_admin_channel() {
    let mut node = Node::new();
    let _mgmt = node.start_mgmt();

    assert_eq!(
        node.ctl(&["service", "restart", "fabric"]).ok(),
        "restarting fabric\n"
    );
    let mut want = vec![AdminRequest::RestartService("fabric".into())];
    for mode in CrashMode::ALL {
        let out = node.ctl(&["service", "crash", "datapath", "--mode", mode.name()]);
        assert_eq!(out.ok(), format!("crashing datapath ({})\n", mode.name()));
        want.push(AdminRequest::CrashService {
            name: "datapath".into(),
            mode,
        });
    }
    let out = node.ctl(&["--json", "service", "restart", "fabric"]);
    let doc: serde_json::Value = serde_json::from_str(out.ok()).expect("one JSON document");
    assert_eq!(doc["message"], "restarting fabric");
    assert_eq!(doc["mgmt_went_down"], false);
    want.push(AdminRequest::RestartService("fabric".into()));
    assert_eq!(node.admin.taken(), want);
}

#[test]
fn cluster_status_shows_the_cluster_service_report() {
    let mut node = Node::new();
    let _mgmt = node.start_mgmt();
    let out = node.ctl(&["cluster", "status"]);
    let text = out.ok();
    assert!(
        text.contains("array duplex: node 1 boot 17 (cluster service generation 4)"),
        "{text}"
    );
    assert!(
        text.contains("peer: node 2 boot 5 at 127.0.0.1:7400: alive"),
        "{text}"
    );
    let out = node.ctl(&["--json", "cluster", "status"]);
    let doc: serde_json::Value = serde_json::from_str(out.ok()).expect("one JSON document");
    assert_eq!(doc["peer"]["state"], "alive");
    assert_eq!(doc["generation"], 4);
    // The pools' owners and epochs, from the metadata service.
    assert!(
        text.contains("pool tank: owner node 1 (epoch 3), degraded, served here"),
        "{text}"
    );
    assert_eq!(doc["pools"][0]["name"], "tank", "{doc}");
    assert_eq!(doc["pools"][0]["owner"], 1, "{doc}");
    // Each status: the report, then the metadata service looked for (for the pools).
    assert_eq!(
        node.admin.taken(),
        [
            AdminRequest::ServiceReport("cluster".into()),
            AdminRequest::ListServices,
            AdminRequest::ServiceReport("cluster".into()),
            AdminRequest::ListServices,
        ]
    );
}

#[test]
fn an_unknown_service_is_one_line_and_exit_1() {
    let mut node = Node::new();
    let _mgmt = node.start_mgmt();
    let out = node.ctl(&["service", "restart", "nosuch"]);
    assert_eq!(out.failed(1), "duplexctl: no service named `nosuch`");
    let out = node.ctl(&["--json", "service", "crash", "nosuch", "--mode", "panic"]);
    assert_eq!(out.failed(1), "duplexctl: no service named `nosuch`");
    // A name over the schema's bound is refused by mgmt itself.
    let long = "x".repeat(300);
    let out = node.ctl(&["service", "restart", &long]);
    assert_eq!(
        out.failed(1),
        "duplexctl: service name must be 1 to 256 bytes long"
    );
    assert_eq!(
        node.admin.taken(),
        [
            AdminRequest::RestartService("nosuch".into()),
            AdminRequest::CrashService {
                name: "nosuch".into(),
                mode: CrashMode::Panic
            }
        ]
    );
}

#[test]
fn a_supervisor_that_does_not_answer_is_an_error_not_a_hang() {
    let mut node = Node::new();
    let mut mgmt = node.start_mgmt();
    let out = node.ctl(&["service", "restart", SILENT]);
    assert_eq!(out.failed(1), "duplexctl: supervisor did not answer");
    // mgmt serves on.
    node.ctl(&["status"]).ok();
    assert!(mgmt.alive());
}

#[test]
fn killed_mgmt_reads_as_restarting_until_a_successor_serves_the_same_socket() {
    let mut node = Node::new();
    let mut mgmt = node.start_mgmt();
    node.ctl(&["status"]).ok();
    mgmt.kill();
    node.admin.taken();

    // Nobody accepts: the connection waits in the backlog until the timeout.
    for args in [
        &["--timeout", "1", "status"][..],
        &["--timeout", "0.5", "--json", "service", "list"],
        &["--timeout", "0.5", "service", "restart", "fabric"],
    ] {
        let out = node.ctl(args);
        assert_eq!(out.failed(1), restarting_line(), "{args:?}");
    }

    // A client that is waiting when the successor starts is served by it.
    let waiting = Command::new(env!("CARGO_BIN_EXE_duplexctl"))
        .arg("--state-dir")
        .arg(node.state_dir())
        .args(["--timeout", "60", "service", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn duplexctl");
    let successor = node.start_mgmt();
    assert_eq!(successor.generation, 2);
    let out = waiting.wait_with_output().expect("duplexctl");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("fabric"));
    node.ctl(&["status"]).ok();

    // The restart that timed out was never sent: mgmt is asked for nothing but reads.
    let asked = node.admin.taken();
    assert!(
        asked.iter().all(|r| matches!(
            r,
            AdminRequest::ListServices
                | AdminRequest::NodeStatus
                | AdminRequest::ServiceReport(_)
                | AdminRequest::Events(_)
        )),
        "{asked:?}"
    );
}

#[test]
fn a_read_is_retried_when_mgmt_dies_under_it() {
    let mut node = Node::new();
    let mut mgmt = node.start_mgmt();
    node.admin
        .kill_on_status
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let waiting = Command::new(env!("CARGO_BIN_EXE_duplexctl"))
        .arg("--state-dir")
        .arg(node.state_dir())
        .args(["--timeout", "60", "status"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn duplexctl");
    let (status, log) = mgmt.wait();
    assert_eq!(signal(status), Some(SIGKILL), "{log}");
    let _successor = node.start_mgmt();
    let out = waiting.wait_with_output().expect("duplexctl");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("node-a"));
    // The node summary asked twice (the first lost with mgmt), then the rest of the screen.
    assert_eq!(
        node.admin.taken()[..2],
        [AdminRequest::NodeStatus, AdminRequest::NodeStatus]
    );
}

#[test]
fn crashing_mgmt_itself_is_success_and_another_drop_is_reported() {
    let mut node = Node::new();
    let mut mgmt = node.start_mgmt();
    let out = node.ctl(&["service", "crash", "mgmt", "--mode", "kill"]);
    assert_eq!(
        out.ok(),
        "mgmt went down as asked (crash --mode kill) before it could answer\n"
    );
    let (status, log) = mgmt.wait();
    assert_eq!(signal(status), Some(SIGKILL), "{log}");

    let mut mgmt = node.start_mgmt();
    let out = node.ctl(&["--json", "service", "restart", "mgmt"]);
    let doc: serde_json::Value = serde_json::from_str(out.ok()).expect("one JSON document");
    assert_eq!(doc["mgmt_went_down"], true);
    mgmt.wait();

    // mgmt dies while restarting another service: the outcome is unknown, and not retried.
    let mut mgmt = node.start_mgmt();
    let out = node.ctl(&["service", "restart", VANISHING]);
    assert_eq!(
        out.failed(1),
        "duplexctl: mgmt restarted during the request; it may or may not have been carried out"
    );
    mgmt.wait();
    assert_eq!(
        node.admin.taken(),
        [
            AdminRequest::CrashService {
                name: "mgmt".into(),
                mode: CrashMode::Kill
            },
            AdminRequest::RestartService("mgmt".into()),
            AdminRequest::RestartService(VANISHING.into()),
        ]
    );
}

/// Reads until EOF (mgmt closed the connection); fails the test if it never does.
fn read_to_eof(stream: &mut UnixStream) {
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut buf = [0_u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("mgmt did not close a garbage connection: {e}"),
        }
    }
}

#[test]
fn garbage_on_the_socket_only_loses_that_connection() {
    let mut node = Node::new();
    let mut mgmt = node.start_mgmt();
    let mut noise = Vec::new();
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.push(x as u8);
    }
    let huge_segment = [0_u8, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
    let many_segments = [0xff_u8, 0x01, 0, 0, 1, 0, 0, 0];
    // A well-framed message (one segment of two words) whose content is not an RPC message.
    let nonsense = [
        0_u8, 0, 0, 0, 2, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];
    for garbage in [&noise[..], &huge_segment, &many_segments, &nonsense] {
        let mut s = UnixStream::connect(&node.socket).expect("connect");
        s.write_all(garbage).expect("write");
        read_to_eof(&mut s);
    }
    // Half a message, then gone.
    let mut s = UnixStream::connect(&node.socket).expect("connect");
    s.write_all(&[0, 0, 0, 0, 8, 0]).expect("write");
    drop(s);

    assert!(mgmt.alive(), "{}", mgmt.log());
    node.ctl(&["status"]).ok();
    assert!(mgmt.alive());
}

#[test]
fn connections_beyond_the_limit_are_closed_and_service_recovers() {
    let mut node = Node::new();
    let mut mgmt = node.start_mgmt();
    let limit = duplex_mgmt::server::MAX_CONNECTIONS;
    let mut held: Vec<UnixStream> = (0..limit)
        .map(|_| UnixStream::connect(&node.socket).expect("connect"))
        .collect();
    // Beyond the limit, mgmt closes new connections at once.
    let mut extra = UnixStream::connect(&node.socket).expect("connect");
    read_to_eof(&mut extra);
    let out = node.ctl(&["--timeout", "0.5", "status"]);
    assert_eq!(out.failed(1), restarting_line());
    held.clear();
    eventually("a slot frees up", || {
        node.ctl(&["--timeout", "1", "status"]).code == Some(0)
    });
    assert!(mgmt.alive());
}

#[test]
fn mgmt_runs_under_its_seccomp_policy() {
    let mut node = Node::new();
    let mut mgmt = node.start_mgmt();
    node.ctl(&["service", "list"]).ok();
    let statuses = mgmt.thread_statuses();
    assert!(statuses.len() >= 2, "mgmt runs its admin thread too");
    for s in &statuses {
        assert!(s.contains("\nSeccomp:\t2\n"), "{s}");
        assert!(s.contains("\nNoNewPrivs:\t1\n"), "{s}");
    }
    assert!(mgmt.alive());
}

#[test]
fn injected_forbidden_syscall_is_killed_by_the_sandbox() {
    let mut node = Node::new();
    let mut mgmt = node.start_mgmt();
    mgmt.send(Body::Inject {
        fault: Fault::ForbiddenSyscall,
    });
    let (status, log) = mgmt.wait();
    assert_eq!(signal(status), Some(SIGSYS), "{status:?}; log:\n{log}");
}

#[test]
fn injected_panic_aborts() {
    let mut node = Node::new();
    let mut mgmt = node.start_mgmt();
    mgmt.send(Body::Inject {
        fault: Fault::Panic,
    });
    let (status, log) = mgmt.wait();
    assert_eq!(signal(status), Some(SIGABRT), "{status:?}; log:\n{log}");
    assert!(log.contains("injected panic"), "{log}");
}

#[test]
fn injected_hang_stops_the_heartbeat_and_blocks() {
    let mut node = Node::new();
    let mut mgmt = node.start_mgmt();
    let before = node.health.count();
    eventually("the heartbeat moves", || node.health.count() > before + 3);

    mgmt.send(Body::Inject { fault: Fault::Hang });
    // The counter comes to rest...
    let mut last = node.health.count();
    eventually("the heartbeat stops", || {
        std::thread::sleep(BEAT_INTERVAL * 10);
        let now = node.health.count();
        let still = now == last;
        last = now;
        still
    });
    // ...and stays there, while the process lives on.
    for _ in 0..5 {
        std::thread::sleep(BEAT_INTERVAL * 4);
        assert_eq!(node.health.count(), last);
        assert!(mgmt.alive());
    }
    // Nothing is served meanwhile.
    assert_eq!(
        node.ctl(&["--timeout", "0.5", "status"]).failed(1),
        restarting_line()
    );
    assert!(mgmt.alive());
    mgmt.kill();
}

#[test]
fn shutdown_and_a_closed_channel_exit_0() {
    let mut node = Node::new();
    let mut mgmt = node.start_mgmt();
    mgmt.send(Body::Shutdown {
        reason: "test".into(),
        deadline_ms: 10_000,
    });
    let (status, log) = mgmt.wait();
    assert_eq!(status.code(), Some(0), "{status:?}; log:\n{log}");

    let mut mgmt = node.start_mgmt();
    let (ours, _) = duplex_ipc::control::ControlChannel::pair().expect("pair");
    drop(std::mem::replace(&mut mgmt.control, ours));
    let (status, log) = mgmt.wait();
    assert_eq!(status.code(), Some(0), "{status:?}; log:\n{log}");
}

#[test]
fn missing_or_wrong_resources_are_refused() {
    let mut node = Node::new();
    let mut mgmt = node.spawn_mgmt();
    node.handshake(&mut mgmt, Handout::NoAdmin);
    let (status, log) = mgmt.wait();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("did not hand over `admin`"), "{log}");

    let mut mgmt = node.spawn_mgmt();
    node.handshake(&mut mgmt, Handout::WrongSocket);
    let (status, log) = mgmt.wait();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("`mgmt-socket` is unusable"), "{log}");
}

#[test]
fn a_slow_reader_of_the_table_is_not_a_problem() {
    // `service list | head -1`: the reader goes away early; duplexctl does not complain.
    let mut node = Node::new();
    let _mgmt = node.start_mgmt();
    let mut child = Command::new(env!("CARGO_BIN_EXE_duplexctl"))
        .arg("--state-dir")
        .arg(node.state_dir())
        .args(["service", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("duplexctl");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
}
