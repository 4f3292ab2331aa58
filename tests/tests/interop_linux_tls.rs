//! The NVMe/TCP secure channel as the Linux kernel host sees it (issue 17), in a QEMU guest
//! running Debian's bookworm-backports 6.12 kernel against a two-node array whose controllers
//! each have a plain fabric listener and one with `tls = true`:
//! 1. `nvme discover` (nvme-cli's own decoder of the Discovery Log Page) reports the TLS
//!    listener's entries with TREQ "required" and SECTYPE TLS 1.3, the plain one's with "not
//!    required" and none;
//! 2. `nvme connect` to the TLS listener without TLS is refused (the target closes the
//!    connection at the host's clear-text ICReq; the controller logs why);
//! 3. the same host connects to the plain listener and reads a block.
//!
//! A Linux host connecting *over* TLS needs the tlshd handshake daemon (ktls-utils), which
//! Debian bookworm (the guests' userland) does not ship: the TLS data path is proven with
//! duplex's host library and OpenSSL's s_client (`tests/tls.rs`, `fabric/tests/tls.rs`).
//! NEEDS: root and QEMU (as the other interop tests); runs in TCG where KVM does not work.
//! `DUPLEX_INTEROP=off` skips it on a developer machine without QEMU.

use std::time::Duration;

use duplex_tests::guest::{Guest, Kernel, RunSpec};
use duplex_tests::pair::{Pair, HOSTNQN, SUBNQN};

const HOSTID: &str = "9a1e0000-0000-4000-8000-000000000001";

fn script(plain: u16, tls: u16) -> String {
    format!(
        r#"
set -x
A=10.0.2.2
NQN={SUBNQN}
die() {{ echo "FAILED: $*"; dmesg | tail -60; exit 1; }}
echo "== discovery log through the plain listener"
nvme discover -t tcp -a $A -s {plain} -o json > disc.json 2>&1 || die "discover"
cat disc.json
echo "== connect to the TLS listener without TLS"
if nvme connect -t tcp -a $A -s {tls} -n $NQN > notls.out 2>&1; then
  echo connected > notls.txt
  nvme disconnect -n $NQN || true
else
  echo refused > notls.txt
fi
cat notls.out
echo "== the plain listener serves the same host"
nvme connect -t tcp -a $A -s {plain} -n $NQN || die "plain connect"
for i in $(seq 1 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.2; done
dd if=/dev/nvme0n1 of=/dev/null bs=4096 count=1 iflag=direct && echo ok > io.txt
nvme disconnect -n $NQN || true
dmesg | grep -i nvme | tail -40
echo ALL-OK
"#
    )
}

#[test]
fn linux_6_12_host_reads_tls_required_from_discovery_and_is_refused_without_tls() {
    if std::env::var("DUPLEX_INTEROP").is_ok_and(|v| v == "off") {
        eprintln!("SKIPPED: DUPLEX_INTEROP=off (a developer switch; CI never sets it)");
        return;
    }
    let image = Guest::image(Kernel::Backports).expect("guest image");
    let mut p = Pair::on_loopback(50, 600);
    let (plain, tls) = (p.at.nvme[0].port(), p.at.tls[0].port());
    let spec = RunSpec::new(script(plain, tls))
        .host(HOSTNQN, HOSTID)
        .memory_mib(1024)
        .cpus(2)
        .timeout(Duration::from_secs(600))
        .label(format!("{} TLS", image.release));
    let guest = image.spawn(&spec).expect("guest");
    let result = guest.wait().expect("guest result");
    eprintln!("{}", result.report());
    let out = &result.stdout;
    p.node(0).log.pump();
    assert_eq!(
        result.exit_code,
        0,
        "guest script failed:\n{out}\n{}\nnode 1 log tail:\n{}",
        result.stderr,
        p.node(0).log.tail(40)
    );
    assert!(out.contains("ALL-OK"));
    let file = |n: &str| String::from_utf8_lossy(&result.file(n).unwrap_or_default()).into_owned();
    let disc: serde_json::Value = serde_json::from_str(&file("disc.json")).expect("discover JSON");
    let records = disc["records"].as_array().expect("records");
    let entry = |port: u16| {
        records
            .iter()
            .find(|r| {
                r["trsvcid"].as_str() == Some(port.to_string().as_str()) && r["subnqn"] == SUBNQN
            })
            .unwrap_or_else(|| panic!("no entry for {SUBNQN} on port {port}: {disc}"))
    };
    let (e_tls, e_plain) = (entry(tls), entry(plain));
    assert_eq!(e_tls["treq"], "required", "{e_tls}");
    assert_eq!(e_plain["treq"], "not required", "{e_plain}");
    assert_eq!(e_tls["sectype"], "tls13", "{e_tls}");
    assert_eq!(e_plain["sectype"], "none", "{e_plain}");
    assert_eq!(file("notls.txt").trim(), "refused", "{out}");
    assert_eq!(file("io.txt").trim(), "ok", "{out}");
    let refused = p
        .node(0)
        .log
        .matching(&["connection refused on a TLS listener"]);
    assert!(!refused.is_empty(), "the controller did not say why");
}
