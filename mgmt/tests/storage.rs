//! The storage commands end to end up to the metadata service: the real `duplexctl` talks to the
//! real `duplex-mgmt` (under its seccomp policy), which forwards each request on its config
//! channel to a fake metadata service (see `common`) and returns its reply.
//!
//! No timing assertions: every wait ends as soon as its condition holds, with a generous
//! deadline.

mod common;

use std::process::{Command, Stdio};

use common::*;
use duplex_ipc::admin::{AdminRequest, ServiceState};
use duplex_ipc::config::{ConfigRequest, RaidLevel};

const NQN: &str = "nqn.2026-11.io.duplex:vol0";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:host-a";

fn json(out: &Ctl) -> serde_json::Value {
    serde_json::from_str(out.ok()).expect("one JSON document")
}

/// The first whitespace-separated words of each line.
fn words(text: &str, n: usize) -> Vec<Vec<&str>> {
    text.lines()
        .map(|l| l.split_whitespace().take(n).collect())
        .collect()
}

#[test]
fn lists_reach_metadata_and_render_as_tables_and_json() {
    let mut node = Node::new();
    let _mgmt = node.start_mgmt();

    let out = node.ctl(&["drive", "list"]);
    assert_eq!(
        words(out.ok(), 4),
        [
            vec!["NAME", "STATE", "POOL", "SLOT"],
            vec!["d0", "active", "tank", "0"],
            vec!["d1", "failed", "tank", "1"],
            vec!["d2", "free", "-", "-"],
        ],
        "{out:?}"
    );
    let doc = json(&node.ctl(&["--json", "drive", "list"]));
    let drives = doc["drives"].as_array().expect("drives");
    assert_eq!(drives.len(), 3);
    assert_eq!(drives[0]["name"], "d0");
    assert_eq!(drives[0]["address"], "vfio-user:drives/d0-a.sock");
    assert_eq!(drives[2]["state"], "free");
    assert_eq!(drives[2]["pool"], "");

    let out = node.ctl(&["pool", "list"]);
    assert_eq!(
        words(out.ok(), 3),
        [
            vec!["NAME", "RAID", "SIZE"],
            vec!["tank", "raid1", "1G"],
            vec!["scratch", "raid1", "1G"],
        ],
        "{out:?}"
    );
    let doc = json(&node.ctl(&["pool", "list", "--json"]));
    assert_eq!(doc["pools"][0]["name"], "tank");
    assert_eq!(doc["pools"][0]["free_bytes"], 768_u64 << 20);
    assert_eq!(doc["pools"][0]["members"].as_array().map(Vec::len), Some(2));

    let out = node.ctl(&["pool", "show", "tank"]);
    let text = out.ok();
    assert!(text.starts_with("  pool: tank\n"), "{text}");
    assert!(text.contains(" state: degraded\n"), "{text}");
    assert!(text.contains("  1     d1     failed"), "{text}");
    let doc = json(&node.ctl(&["--json", "pool", "show", "tank"]));
    assert_eq!(doc["pool"]["name"], "tank");
    assert_eq!(doc["pool"]["members"][1]["state"], "failed");

    let out = node.ctl(&["volume", "list"]);
    assert_eq!(
        words(out.ok(), 3),
        [vec!["NAME", "POOL", "SIZE"], vec!["vol0", "tank", "256M"]],
        "{out:?}"
    );
    let doc = json(&node.ctl(&["--json", "volume", "list"]));
    assert_eq!(doc["volumes"][0]["exports"][0]["nqn"], NQN);

    let out = node.ctl(&["subsystem", "list"]);
    assert_eq!(
        words(out.ok(), 3),
        [
            vec!["NQN", "NAMESPACES", "HOSTS"],
            vec![NQN, "1:vol0", HOST]
        ],
        "{out:?}"
    );
    let doc = json(&node.ctl(&["--json", "subsystem", "list"]));
    assert_eq!(doc["subsystems"][0]["hosts"][0], HOST);

    let mut want = Vec::new();
    for r in [
        ConfigRequest::ListDrives,
        ConfigRequest::ListPools,
        ConfigRequest::ShowPool("tank".into()),
    ] {
        want.push(r.clone());
        want.push(r);
    }
    // `volume list` pages: from the first, then after the last name it got, until a page is
    // empty.
    for _ in 0..2 {
        want.push(ConfigRequest::ListVolumesAfter(String::new()));
        want.push(ConfigRequest::ListVolumesAfter("vol0".into()));
    }
    want.push(ConfigRequest::ListSubsystems);
    want.push(ConfigRequest::ListSubsystems);
    assert_eq!(node.metadata.taken(), want);
    // Before each, mgmt asked the supervisor whether metadata runs.
    let asked = node.admin.taken();
    assert_eq!(asked.len(), want.len());
    assert!(asked.iter().all(|r| *r == AdminRequest::ListServices));
}

#[test]
fn changes_are_forwarded_as_asked_and_print_one_line() {
    let mut node = Node::new();
    let _mgmt = node.start_mgmt();

    let out = node.ctl(&[
        "pool",
        "create",
        "tank",
        "--raid",
        "10",
        "--drives",
        "d0,d1,d2,d3",
    ]);
    assert_eq!(out.ok(), "created pool tank (raid10, 4 drives)\n");
    let doc = json(&node.ctl(&[
        "--json", "pool", "create", "p2", "--raid", "1", "--drives", "d4,d5", "--chunk", "128K",
    ]));
    assert_eq!(doc["message"], "created pool p2 (raid1, 2 drives)");
    assert_eq!(doc["uuid"], "0b1e5c7a-2f4d-4e8a-9c3b-5d6e7f809a1b");
    assert!(doc.get("nsid").is_none(), "{doc}");

    node.ctl(&[
        "volume", "create", "vol1", "--pool", "tank", "--size", "10G",
    ])
    .ok();
    node.ctl(&["volume", "resize", "vol1", "--size", "1t"]).ok();
    node.ctl(&["subsystem", "create", NQN]).ok();
    // The metadata service says nothing: duplexctl words it, with the nsid assigned.
    let out = node.ctl(&["namespace", "add", NQN, "--volume", "vol1"]);
    assert_eq!(
        out.ok(),
        format!("added namespace 3 of {NQN}: volume vol1\n")
    );
    let doc = json(&node.ctl(&[
        "namespace",
        "add",
        NQN,
        "--volume",
        "vol1",
        "--nsid",
        "7",
        "--json",
    ]));
    assert_eq!(doc["nsid"], 7);
    let out = node.ctl(&["host", "allow", NQN, HOST]);
    assert_eq!(out.ok(), "did allowHost\n");
    node.ctl(&["host", "allow", NQN, "--any"]).ok();
    node.ctl(&["host", "deny", NQN, "--any"]).ok();
    node.ctl(&["host", "deny", NQN, HOST]).ok();
    node.ctl(&["namespace", "remove", NQN, "7"]).ok();
    node.ctl(&["subsystem", "delete", NQN]).ok();
    node.ctl(&["volume", "delete", "vol1"]).ok();
    node.ctl(&["pool", "destroy", "tank", "--force"]).ok();
    node.ctl(&["pool", "destroy", "p2"]).ok();

    let nqn = || NQN.to_owned();
    assert_eq!(
        node.metadata.taken(),
        [
            ConfigRequest::CreatePool {
                name: "tank".into(),
                raid: RaidLevel::Raid10,
                drives: vec!["d0".into(), "d1".into(), "d2".into(), "d3".into()],
                chunk_bytes: 0,
            },
            ConfigRequest::CreatePool {
                name: "p2".into(),
                raid: RaidLevel::Raid1,
                drives: vec!["d4".into(), "d5".into()],
                chunk_bytes: 128 * 1024,
            },
            ConfigRequest::CreateVolume {
                name: "vol1".into(),
                pool: "tank".into(),
                size_bytes: 10 << 30,
            },
            ConfigRequest::ResizeVolume {
                name: "vol1".into(),
                size_bytes: 1 << 40,
            },
            ConfigRequest::CreateSubsystem(nqn()),
            ConfigRequest::AddNamespace {
                nqn: nqn(),
                volume: "vol1".into(),
                nsid: 0,
            },
            ConfigRequest::AddNamespace {
                nqn: nqn(),
                volume: "vol1".into(),
                nsid: 7,
            },
            ConfigRequest::AllowHost {
                nqn: nqn(),
                host_nqn: HOST.into(),
                secrets: None,
            },
            ConfigRequest::AllowAnyHost {
                nqn: nqn(),
                any: true,
            },
            ConfigRequest::AllowAnyHost {
                nqn: nqn(),
                any: false,
            },
            ConfigRequest::DenyHost {
                nqn: nqn(),
                host_nqn: HOST.into(),
            },
            ConfigRequest::RemoveNamespace {
                nqn: nqn(),
                nsid: 7
            },
            ConfigRequest::DeleteSubsystem(nqn()),
            ConfigRequest::DeleteVolume("vol1".into()),
            ConfigRequest::DestroyPool {
                name: "tank".into(),
                force: true,
            },
            ConfigRequest::DestroyPool {
                name: "p2".into(),
                force: false,
            },
        ]
    );
}

#[test]
fn a_metadata_error_is_one_line_and_exit_1() {
    let mut node = Node::new();
    let _mgmt = node.start_mgmt();
    let out = node.ctl(&[
        "pool", "create", BUSY_POOL, "--raid", "1", "--drives", "d0,d1",
    ]);
    assert_eq!(out.failed(1), "duplexctl: drive d0 belongs to pool tank");
    let out = node.ctl(&["--json", "pool", "show", "nosuch"]);
    assert_eq!(out.failed(1), "duplexctl: no pool named `nosuch`");
    // A reply that does not fit the request is refused by mgmt.
    let out = node.ctl(&["pool", "show", TWO_POOLS]);
    assert_eq!(
        out.failed(1),
        "duplexctl: the metadata service answered showPool with a pool list, which does not fit"
    );
    assert_eq!(node.metadata.taken().len(), 3);
}

#[test]
fn without_a_running_metadata_service_the_error_says_so_and_nothing_is_sent() {
    let mut node = Node::new();
    // A node without a metadata service: mgmt has no config channel.
    let mut mgmt = node.start_mgmt_with(Handout::NoConfig);
    for args in [
        &["pool", "list"][..],
        &[
            "--json", "volume", "create", "v", "--pool", "p", "--size", "1g",
        ],
    ] {
        let out = node.ctl(args);
        assert_eq!(
            out.failed(1),
            "duplexctl: the metadata service is not running: this node has none \
             (no service named `metadata` in its config)",
            "{args:?}"
        );
    }
    // mgmt serves everything else as before.
    node.ctl(&["status"]).ok();
    mgmt.kill();

    // A metadata service that is down (the supervisor says so): refused at once.
    let _mgmt = node.start_mgmt();
    for state in [ServiceState::Backoff, ServiceState::Failed] {
        *node.admin.metadata_state.lock().expect("lock") = Some(state);
        let out = node.ctl(&["volume", "delete", "vol0"]);
        assert_eq!(
            out.failed(1),
            format!(
                "duplexctl: the metadata service is not running (it is {}; see `duplexctl service list`)",
                state.name()
            )
        );
    }
    // Starting counts as up.
    *node.admin.metadata_state.lock().expect("lock") = Some(ServiceState::Starting);
    node.ctl(&["volume", "delete", "vol0"]).ok();
    assert_eq!(
        node.metadata.taken(),
        [ConfigRequest::DeleteVolume("vol0".into())]
    );
}

#[test]
fn a_change_is_never_repeated_across_an_mgmt_restart_but_a_read_is() {
    let mut node = Node::new();
    let mut mgmt = node.start_mgmt();
    // mgmt dies after forwarding the change, before it answers.
    node.metadata
        .kill_next
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let out = node.ctl(&["volume", "delete", "vol0"]);
    assert_eq!(
        out.failed(1),
        "duplexctl: mgmt restarted during the request; it may or may not have been carried out"
    );
    mgmt.wait();
    assert_eq!(
        node.metadata.taken(),
        [ConfigRequest::DeleteVolume("vol0".into())]
    );

    // A read that loses its mgmt the same way is asked again of the next one.
    let mut mgmt = node.start_mgmt();
    node.metadata
        .kill_next
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let waiting = Command::new(env!("CARGO_BIN_EXE_duplexctl"))
        .arg("--state-dir")
        .arg(node.state_dir())
        .args(["--timeout", "60", "volume", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn duplexctl");
    mgmt.wait();
    let _successor = node.start_mgmt();
    let out = waiting.wait_with_output().expect("duplexctl");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("vol0"));
    // (The first page asked twice, then the page after it: the end.)
    assert_eq!(
        node.metadata.taken(),
        [
            ConfigRequest::ListVolumesAfter(String::new()),
            ConfigRequest::ListVolumesAfter(String::new()),
            ConfigRequest::ListVolumesAfter("vol0".into())
        ]
    );
}
