//! The NVMe/TCP secure channel (TLS 1.3 with a PSK, issue 17) on a two-node array built from
//! processes: each controller has a fabric listener with `tls = true` beside its plain one; the
//! host's configured PSK is set with `duplexctl host allow --tls-psk` (stored sealed on the
//! drives). Through the sandboxed fabric of both controllers:
//! - the host library connects over TLS with its PSK (identities of both versions), writes and
//!   reads data back through the owner; the peer, once it has read the key from the drives,
//!   admits the host too;
//! - OpenSSL's own client (`openssl s_client`) completes the handshake and gets an ICResp;
//! - without TLS (a plain ICReq), with a wrong PSK, or as a host without one, the connection is
//!   refused before any PDU, with a log line and the refusal metric's reason `tls`;
//! - the key is never in clear text in what `duplexctl` lists; a SHA-384 key is refused; giving
//!   DH-HMAC-CHAP secrets and the PSK one after the other keeps both;
//! - the configured PSK is one nvme-cli made (`nvme gen-tls-key`): our parser reads the
//!   interchange format of a real host's tool, CRC included.
//!
//! The Linux kernel host's side (discovery log fields, a connect without TLS refused) is
//! `interop_linux_tls.rs`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use duplex_host::tls::TlsPsk;
use duplex_host::{Data, Queue, QueueOptions};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::io;
use duplex_nvme::tcp;
use duplex_nvme::tls::{ConfiguredKey, PskHash, Variant};
use duplex_tests::pair::{Pair, HOSTNQN, SUBNQN};

fn configured(byte: u8) -> String {
    ConfiguredKey {
        hash: Some(PskHash::Sha256),
        key: (0..32).map(|i| byte.wrapping_add(i)).collect(),
    }
    .to_text()
}

fn psk(key: &str, version: u8) -> TlsPsk {
    TlsPsk::derive(key, HOSTNQN, SUBNQN, version, Variant::Rfc).expect("derive")
}

/// A configured PSK as nvme-cli makes one for a host (`nvme gen-tls-key`, installed by
/// scripts/setup): our parser takes it, CRC included, and writes it back the same.
fn nvme_cli_key() -> String {
    let out = std::process::Command::new("nvme")
        .args(["gen-tls-key", "--hmac=1"])
        .output()
        .expect("nvme gen-tls-key (nvme-cli)");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout)
        .expect("text")
        .trim()
        .to_owned();
    let parsed = ConfiguredKey::parse(&text).expect("nvme-cli's key parses");
    assert_eq!(parsed.hash, Some(PskHash::Sha256));
    assert_eq!(parsed.key.len(), 32);
    assert_eq!(
        parsed.to_text(),
        text,
        "the interchange format written back"
    );
    text
}

fn opts() -> QueueOptions {
    QueueOptions {
        timeout: Some(Duration::from_secs(20)),
        ..QueueOptions::default()
    }
}

/// Admin queue over TLS to `addr`, connected and enabled; the queue and controller id.
fn admin(addr: SocketAddr, p: &TlsPsk) -> duplex_host::Result<(Queue, u16)> {
    let mut a = Queue::dial_tls(addr, opts(), p)?;
    let cntlid = a.connect(0, 31, 0, 0xFFFF, SUBNQN, HOSTNQN, [9; 16])?;
    a.enable()?;
    Ok((a, cntlid))
}

/// Writes 64 KiB at block `lba` over TLS through `addr` and reads it back.
fn write_read(addr: SocketAddr, p: &TlsPsk, lba: u64, fill: u8) {
    let (mut a, cntlid) = admin(addr, p).expect("admin over TLS");
    a.identify(1, 0).expect("identify");
    a.set_queues(1).expect("queues");
    let mut q = Queue::dial_tls(addr, opts(), p).expect("TLS dial");
    q.connect(1, 31, 0, cntlid, SUBNQN, HOSTNQN, [9; 16])
        .expect("io connect over TLS");
    let data: Vec<u8> = (0..64 * 1024).map(|i| fill ^ (i as u8)).collect();
    let sqe = |opcode| Sqe {
        opcode,
        nsid: 1,
        cdw10: lba as u32,
        cdw11: (lba >> 32) as u32,
        cdw12: 15,
        ..Sqe::default()
    };
    q.execute(sqe(io::WRITE), Data::Out(data.clone()))
        .expect("write")
        .ok()
        .expect("write status");
    let back = q
        .execute(sqe(io::READ), Data::In(data.len()))
        .expect("read")
        .ok()
        .expect("read status");
    assert!(back.data == data, "data read back over TLS differs");
}

#[test]
fn hosts_connect_over_tls_with_their_psk_and_are_refused_without() {
    let mut p = Pair::on_loopback(50, 600);
    let key = nvme_cli_key();
    let wrong = configured(0x41);
    let (code, out, err) = p.nodes[0].ctl(&["host", "allow", SUBNQN, HOSTNQN, "--tls-psk", &key]);
    assert_eq!(code, 0, "{out}{err}");
    // A mistyped key is refused by duplexctl (its CRC).
    let mut typo = key.clone().into_bytes();
    typo[20] = if typo[20] == b'A' { b'B' } else { b'A' };
    let typo = String::from_utf8(typo).expect("text");
    let (code, _, err) = p.nodes[0].ctl(&["host", "allow", SUBNQN, HOSTNQN, "--tls-psk", &typo]);
    assert_ne!(code, 0);
    assert!(err.contains("TLS key") || err.contains("CRC"), "{err}");
    let (_, listed, _) = p.nodes[0].ctl(&["--json", "subsystem", "list"]);
    assert!(!listed.contains("NVMeTLSkey"), "{listed}");

    let (tls_a, tls_b) = (p.at.tls[0], p.at.tls[1]);
    // Through the owner: data over TLS, both identity versions.
    write_read(tls_a, &psk(&key, 1), 0, 0x5a);
    write_read(tls_a, &psk(&key, 0), 64, 0xa5);
    // The peer admits the host once it has read the key from the drives.
    let deadline = Instant::now() + duplex_tests::PATIENCE;
    loop {
        match admin(tls_b, &psk(&key, 1)) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "the peer refuses the host: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // OpenSSL's client with the TLS PSK: an ICResp through the channel.
    let resp = duplex_tests::tls::s_client_icresp(tls_a, &psk(&key, 0));
    assert_eq!(resp.len(), 128, "a whole ICResp through s_client: {resp:?}");
    assert_eq!(resp[0], tcp::PduType::IcResp as u8);
    assert!(
        duplex_tests::tls::s_client_icresp(tls_a, &psk(&wrong, 0)).is_empty(),
        "a wrong PSK"
    );

    // Refused: plain NVMe/TCP on the TLS port, a wrong PSK.
    assert!(
        Queue::dial(tls_a, opts()).is_err(),
        "a plain ICReq was answered"
    );
    assert!(
        admin(tls_a, &psk(&wrong, 1)).is_err(),
        "a wrong PSK was let in"
    );
    // The plain port still serves plain NVMe/TCP.
    let mut plain = Queue::dial(p.at.nvme[0], opts()).expect("plain dial");
    plain
        .connect(0, 31, 0, 0xFFFF, SUBNQN, HOSTNQN, [9; 16])
        .expect("plain connect");
    // A SHA-384 key is refused at once (the handshake could never use it).
    let sha384 = ConfiguredKey {
        hash: Some(PskHash::Sha384),
        key: vec![3; 48],
    }
    .to_text();
    let (code, _, err) = p.nodes[0].ctl(&["host", "allow", SUBNQN, HOSTNQN, "--tls-psk", &sha384]);
    assert_ne!(code, 0);
    assert!(err.contains("SHA-384"), "{err}");
    // DH-HMAC-CHAP secrets given later keep the PSK, and the PSK given later keeps them.
    let secret = duplex_nvme::auth::Secret {
        transform: None,
        key: vec![0x21; 32],
    }
    .to_text();
    let (code, out, err) =
        p.nodes[0].ctl(&["host", "allow", SUBNQN, HOSTNQN, "--dhchap-secret", &secret]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = p.nodes[0].ctl(&["host", "allow", SUBNQN, HOSTNQN, "--tls-psk", &key]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, listed, _) = p.nodes[0].ctl(&["--json", "subsystem", "list"]);
    let v: serde_json::Value = serde_json::from_str(&listed).expect("JSON");
    assert_eq!(
        v["subsystems"][0]["hosts_authenticate"],
        serde_json::json!([true]),
        "the DH-HMAC-CHAP secret was dropped: {listed}"
    );
    let mut both = Queue::dial_tls(tls_a, opts(), &psk(&key, 1)).expect("the PSK was kept");
    both.connect(0, 31, 0, 0xFFFF, SUBNQN, HOSTNQN, [9; 16])
        .expect("connect");
    assert!(
        both.auth_required(),
        "DH-HMAC-CHAP asked on the TLS queue too"
    );

    let log = p
        .node(0)
        .log
        .wait_for(&["connection refused on a TLS listener"]);
    assert!(log.contains("TLS"), "{log}");
    let (_, events, _) = p.nodes[0].ctl(&["--json", "events"]);
    assert!(
        events.contains("host-refused") && events.contains("TLS listener"),
        "{events}"
    );
    let metrics =
        duplex_tests::http_get(&p.at.metrics[0].to_string(), "/metrics").expect("GET /metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("duplex_host_refusals_total") && l.contains("reason=\"tls\"")),
        "{metrics}"
    );
}
