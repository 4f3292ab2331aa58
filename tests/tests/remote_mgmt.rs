//! Remote management through duplexd: a node whose config has `[mgmt] key_file` and a mgmt
//! `[[listener]]` with `tls = true` is configured from "another machine" with
//! `duplexctl --connect ADDR --key-file FILE` (pool, volume, subsystem, namespace over two
//! simulated drives), the local socket sees the same; mgmt crashed through the remote port comes
//! back on the same port (duplexd holds the listener); `duplexd --check` refuses a remote
//! listener without a key and a key file that is not a key.

use std::path::Path;
use std::process::Command;

use duplex_tests::pool::{ctl_json, drive_sim, pool_node_config};
use duplex_tests::{bin, free_port, remote_ctl_ok, Node};

fn remote_section(key: &Path, port: u16) -> String {
    format!(
        "\n[mgmt]\nkey_file = {:?}\n\n[[listener]]\nname = \"remote-mgmt\"\naddress = \"127.0.0.1:{port}\"\nservice = \"mgmt\"\ntls = true\n",
        key.display().to_string()
    )
}

#[test]
fn a_node_is_configured_from_afar_and_its_remote_port_outlives_mgmt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_s0, a0) = drive_sim(dir.path(), "d0", "128M");
    let (_s1, a1) = drive_sim(dir.path(), "d1", "128M");
    let key = dir.path().join("mgmt.key");
    let hex: String = (0..32u8).map(|i| format!("{:02x}", i ^ 0x9e)).collect();
    std::fs::write(&key, hex).expect("key");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut config = pool_node_config(free_port(), &[&a0, &a1], "128MiB");
    config.push_str(&remote_section(&key, port));
    let mut node = Node::start(&config);
    node.log.wait_for(&["metadata service ready"]);
    node.log
        .wait_for(&["serving remote management (TLS with the mgmt key)"]);

    let nqn = "nqn.2026-12.io.duplex:remote";
    for args in [
        &["pool", "create", "tank", "--raid", "1", "--drives", "d0,d1"][..],
        &["volume", "create", "v0", "--pool", "tank", "--size", "16m"],
        &["subsystem", "create", nqn],
        &["namespace", "add", nqn, "--volume", "v0"],
    ] {
        remote_ctl_ok(&addr, &key, args);
    }
    // The local socket sees what the remote commands made.
    let local = ctl_json(&node, &["volume", "list"]);
    assert_eq!(local["volumes"][0]["name"], "v0", "{local}");
    let far: serde_json::Value =
        serde_json::from_str(&remote_ctl_ok(&addr, &key, &["--json", "volume", "list"]))
            .expect("json");
    assert_eq!(far, local);

    // mgmt crashed from afar: duplexd restarts it, and the same port serves again.
    remote_ctl_ok(
        &addr,
        &key,
        &["service", "crash", "mgmt", "--mode", "panic"],
    );
    node.log.wait_for(&["service ready service=mgmt"]);
    let services: serde_json::Value =
        serde_json::from_str(&remote_ctl_ok(&addr, &key, &["--json", "service", "list"]))
            .expect("json");
    let mgmt = services["services"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == "mgmt"))
        .cloned()
        .expect("mgmt in the list");
    assert!(mgmt["generation"].as_u64() >= Some(2), "{mgmt}");
}

#[test]
fn duplexd_check_refuses_a_remote_listener_without_a_usable_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |config: &str| {
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            config
                .replace("{state}", &dir.path().join("state").display().to_string())
                .replace("{mgmt}", &bin("duplex-mgmt").display().to_string()),
        )
        .expect("config");
        let out = Command::new(bin("duplexd"))
            .arg("--config")
            .arg(&path)
            .arg("--check")
            .output()
            .expect("duplexd");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let a = dir.path().join("a.sock");
    let base = pool_node_config(free_port(), &[&a], "64MiB");
    let key = dir.path().join("mgmt.key");
    let listener_only = format!(
        "{base}\n[[listener]]\nname = \"remote-mgmt\"\naddress = \"127.0.0.1:{}\"\nservice = \"mgmt\"\ntls = true\n",
        free_port()
    );
    let (code, err) = check(&listener_only);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("remote management needs its key") && err.contains("[mgmt] key_file"),
        "{err}"
    );
    let keyed = format!("{base}{}", remote_section(&key, free_port()));
    let (code, err) = check(&keyed);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("[mgmt] key_file") && err.contains("mgmt.key"),
        "{err}"
    );
    std::fs::write(&key, "not a key").expect("key");
    let (code, err) = check(&keyed);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not 64 hexadecimal digits"), "{err}");
    std::fs::write(&key, "ab".repeat(32)).expect("key");
    let (code, err) = check(&keyed);
    assert_eq!(code, Some(0), "{err}");
}
