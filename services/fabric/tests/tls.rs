//! The NVMe/TCP secure channel (TLS 1.3 with a PSK) through a live fabric (real TCP, rings to
//! the memory datapath) on a listener that requires it: an exported subsystem whose host has a
//! configured TLS PSK sealed with the array's key. The host library connects with identities of
//! both versions (and the digest of the older libnvme derivation), writes and reads data back;
//! OpenSSL's own client (`openssl s_client`, an implementation that is not ours) completes the
//! handshake with the TLS PSK and gets an ICResp for its ICReq; a plain ICReq, a wrong key, a
//! host without a key, a SHA-384 identity are refused before any PDU; a channel is bound to its
//! identity: a Connect for another host or another subsystem is refused (discovery excepted);
//! hostile bytes and identities (bounded) are refused and leave the target serving.

mod common;

use std::io::{Read, Write};

use common::*;
use duplex_host::tls::TlsPsk;
use duplex_host::{Data, HostError, Queue, QueueOptions};
use duplex_ipc::exports::{
    AnaGroupState, AnaState, ExportNamespace, ExportSecret, ExportSubsystem, ExportTable,
    ExportsRegion,
};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::{io, DISCOVERY_NQN};
use duplex_nvme::status::specific;
use duplex_nvme::tcp;
use duplex_nvme::tls::{ConfiguredKey, PskHash, Variant};
use duplex_ondisk::secrets::{seal, HostKeys, SecretsKey};

const SUB: &str = "nqn.2026-12.io.duplex:tls";
/// A second subsystem the host may use, for which it has no key.
const SUB2: &str = "nqn.2026-12.io.duplex:tls2";
const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000ee";
const KEY: [u8; 32] = [0x24; 32];

fn configured(byte: u8) -> String {
    ConfiguredKey {
        hash: Some(PskHash::Sha256),
        key: vec![byte; 32],
    }
    .to_text()
}

/// A fabric with one TLS listener exporting [`SUB`] to [`HOSTNQN`] (configured PSK
/// `configured(7)`) and [`OTHER_HOST`] (no key).
fn start() -> (Harness, ExportsRegion) {
    let key = SecretsKey::from_bytes(KEY);
    let keys = HostKeys {
        tls_psk: Some(configured(7)),
        ..HostKeys::default()
    };
    let sealed = seal(&key, SUB, HOSTNQN, &keys, [3; 12]);
    let region = ExportsRegion::create(1 << 20).expect("exports region");
    region
        .publish(&ExportTable {
            generation: 1,
            subsystems: vec![ExportSubsystem {
                nqn: SUB.into(),
                serial: "tls1".into(),
                model: "duplex tls".into(),
                allow_any_host: false,
                hosts: vec![HOSTNQN.into(), OTHER_HOST.into()],
                secrets: vec![ExportSecret {
                    host: HOSTNQN.into(),
                    sealed,
                }],
                namespaces: vec![ExportNamespace {
                    nsid: 1,
                    volume: 9,
                    block_size: BS,
                    blocks: BLOCKS,
                    nguid: [0x67; 16],
                    uuid: [0x68; 16],
                    ana_group: 1,
                }],
            }],
            ana: vec![AnaGroupState {
                group: 1,
                state: AnaState::Optimized,
            }],
            reservations: vec![],
        })
        .expect("publish");
    let mut table = region.read().expect("read back").expect("a table");
    table.subsystems.push(ExportSubsystem {
        nqn: SUB2.into(),
        serial: "tls2".into(),
        model: "duplex tls".into(),
        allow_any_host: true,
        hosts: vec![],
        secrets: vec![],
        namespaces: vec![],
    });
    table.generation = 2;
    region.publish(&table).expect("publish");
    let h = Harness::start_tls(
        Some((region.region().try_clone_fd().expect("fd"), None)),
        Some(key),
    );
    (h, region)
}

fn psk(host: &str, byte: u8, version: u8, variant: Variant) -> TlsPsk {
    TlsPsk::derive(&configured(byte), host, SUB, version, variant).expect("derive")
}

/// The admin queue over TLS, connected and enabled, then an I/O queue that writes a block and
/// reads it back.
fn serve_data(h: &Harness, psk: &TlsPsk, fill: u8) {
    let opts = QueueOptions::default();
    let mut a = Queue::dial_tls(h.addr, opts, psk).expect("TLS dial");
    let cntlid = a
        .connect(0, 31, 0, 0xFFFF, SUB, HOSTNQN, [1; 16])
        .expect("connect over TLS");
    a.enable().expect("enable");
    a.identify(1, 0).expect("identify");
    a.set_queues(1).expect("queues");
    let mut q = Queue::dial_tls(h.addr, opts, psk).expect("TLS dial io");
    q.connect(1, 31, 0, cntlid, SUB, HOSTNQN, [1; 16])
        .expect("io connect over TLS");
    // A transfer larger than one TLS record (16 KiB) each way.
    let data = vec![fill; 8 * BS as usize];
    q.execute(
        Sqe {
            opcode: io::WRITE,
            nsid: 1,
            cdw10: 16,
            cdw12: 7,
            ..Sqe::default()
        },
        Data::Out(data.clone()),
    )
    .expect("write")
    .ok()
    .expect("write status");
    let back = q
        .execute(
            Sqe {
                opcode: io::READ,
                nsid: 1,
                cdw10: 16,
                cdw12: 7,
                ..Sqe::default()
            },
            Data::In(data.len()),
        )
        .expect("read")
        .ok()
        .expect("read status");
    assert_eq!(back.data, data, "data read back over TLS");
}

#[test]
fn a_host_with_its_psk_connects_over_tls_with_either_identity_version() {
    let (h, _exports) = start();
    serve_data(&h, &psk(HOSTNQN, 7, 0, Variant::Rfc), 0x5a);
    serve_data(&h, &psk(HOSTNQN, 7, 1, Variant::Rfc), 0xa5);
    // A host whose libnvme derived the older way: its version 1 digest says so.
    serve_data(&h, &psk(HOSTNQN, 7, 1, Variant::Compat), 0x3c);
}

/// Whether the target closed the connection without answering (reads end at once).
fn closed_without_answer(mut s: std::net::TcpStream) -> bool {
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            // A TLS alert may come first; never an ICResp.
            Ok(n) => {
                if b[..n].first() == Some(&(tcp::PduType::IcResp as u8)) {
                    return false;
                }
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn without_tls_or_without_the_right_key_a_host_is_refused_before_any_pdu() {
    let (h, _exports) = start();
    // A plain ICReq: closed, no ICResp.
    let mut s = std::net::TcpStream::connect(h.addr).expect("tcp");
    let icreq = tcp::IcReq {
        pfv: 0,
        hpda: 0,
        digests: tcp::Digests::default(),
        maxr2t: 0,
    };
    s.write_all(&icreq.encode()).expect("send ICReq");
    assert!(closed_without_answer(s), "a plain ICReq got an answer");
    assert!(matches!(
        Queue::dial(h.addr, QueueOptions::default()),
        Err(HostError::Io(_)) | Err(HostError::Protocol(_))
    ));
    // A wrong key, both versions; a host without a key; a SHA-384 identity.
    for bad in [
        psk(HOSTNQN, 8, 0, Variant::Rfc),
        psk(HOSTNQN, 8, 1, Variant::Rfc),
        psk(OTHER_HOST, 7, 0, Variant::Rfc),
    ] {
        let r = Queue::dial_tls(h.addr, QueueOptions::default(), &bad);
        assert!(r.is_err(), "{bad:?} was let in");
    }
    let sha384 = TlsPsk::derive(
        &ConfiguredKey {
            hash: Some(PskHash::Sha384),
            key: vec![7; 48],
        }
        .to_text(),
        HOSTNQN,
        SUB,
        1,
        Variant::Rfc,
    )
    .expect("derive");
    assert!(Queue::dial_tls(h.addr, QueueOptions::default(), &sha384).is_err());
    // The target still serves the right key afterwards.
    serve_data(&h, &psk(HOSTNQN, 7, 1, Variant::Rfc), 0x11);
}

#[test]
fn a_tls_channel_is_bound_to_its_identitys_host_and_subsystem() {
    let (h, _exports) = start();
    let p = psk(HOSTNQN, 7, 1, Variant::Rfc);
    let mut a = Queue::dial_tls(h.addr, QueueOptions::default(), &p).expect("TLS dial");
    match a.connect(0, 31, 0, 0xFFFF, SUB, OTHER_HOST, [2; 16]) {
        Err(HostError::Status(s)) => assert_eq!(s, specific::CONNECT_INVALID_HOST),
        other => panic!("Connect as another host on a TLS channel: {other:?}"),
    }
    // Keyed for SUB: not a way into another subsystem, even one open to any host.
    let mut b = Queue::dial_tls(h.addr, QueueOptions::default(), &p).expect("TLS dial");
    match b.connect(0, 31, 0, 0xFFFF, SUB2, HOSTNQN, [1; 16]) {
        Err(HostError::Status(s)) => assert_eq!(s, specific::CONNECT_INVALID_HOST),
        other => panic!("Connect to another subsystem on a TLS channel: {other:?}"),
    }
    // The discovery subsystem is reachable with it (as `nvme discover --tls` does).
    let mut d = Queue::dial_tls(h.addr, QueueOptions::default(), &p).expect("TLS dial");
    d.connect(0, 31, 0, 0xFFFF, DISCOVERY_NQN, HOSTNQN, [1; 16])
        .expect("discovery over TLS");
    // An identity naming the discovery subsystem (the host's key on any subsystem) reaches
    // discovery, and nothing else.
    let disc =
        TlsPsk::derive(&configured(7), HOSTNQN, DISCOVERY_NQN, 0, Variant::Rfc).expect("derive");
    let mut e = Queue::dial_tls(h.addr, QueueOptions::default(), &disc).expect("TLS dial");
    e.connect(0, 31, 0, 0xFFFF, DISCOVERY_NQN, HOSTNQN, [1; 16])
        .expect("discovery with a discovery identity");
    let mut f = Queue::dial_tls(h.addr, QueueOptions::default(), &disc).expect("TLS dial");
    match f.connect(0, 31, 0, 0xFFFF, SUB, HOSTNQN, [1; 16]) {
        Err(HostError::Status(s)) => assert_eq!(s, specific::CONNECT_INVALID_HOST),
        other => panic!("Connect to SUB on a discovery identity's channel: {other:?}"),
    }
}

/// OpenSSL's command-line client, given the identity and TLS PSK, completes the handshake and
/// the target answers its ICReq with an ICResp through the channel; with another PSK it does
/// not get one.
#[test]
fn openssl_s_client_completes_the_handshake_and_gets_an_icresp() {
    let (h, _exports) = start();
    let run = |p: &TlsPsk| duplex_tests::tls::s_client_icresp(h.addr, p);
    let resp = run(&psk(HOSTNQN, 7, 0, Variant::Rfc));
    assert_eq!(resp.len(), 128, "a whole ICResp through s_client");
    assert_eq!(resp[0], tcp::PduType::IcResp as u8);
    let r = tcp::IcResp::parse(&resp).expect("ICResp");
    assert_eq!(r.pfv, 0);
    let refused = run(&psk(HOSTNQN, 8, 0, Variant::Rfc));
    assert!(
        refused.is_empty(),
        "s_client with a wrong PSK got {refused:?}"
    );
}

/// A small deterministic generator (xorshift64*), so that a failing case can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Hostile input on the TLS listener, bounded: random bytes in place of a ClientHello, and real
/// handshakes presenting random and half-right identities with random keys. Every one is
/// refused; the target neither panics nor stops serving the right key.
#[test]
fn hostile_bytes_and_identities_on_a_tls_listener_are_refused_and_harmless() {
    let (h, _exports) = start();
    let mut rng = Rng(0x007e_5715_0001);
    let rounds = std::env::var("DUPLEX_TLS_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    for i in 0..rounds {
        // Raw bytes, sometimes starting like a TLS handshake record.
        let mut s = std::net::TcpStream::connect(h.addr).expect("tcp");
        let n = (rng.next() % 700) as usize;
        let mut b = rng.bytes(n);
        if i % 2 == 0 && b.len() >= 3 {
            b[..3].copy_from_slice(&[0x16, 0x03, 0x01]);
        }
        let _ = s.write_all(&b);
        let _ = s.shutdown(std::net::Shutdown::Write);
        assert!(
            closed_without_answer(s),
            "round {i}: raw bytes got an ICResp"
        );
        // An identity: random text, or a well-formed one for unknown or half-right NQNs.
        let len = (rng.next() % 200) as usize;
        let identity = match i % 4 {
            0 => String::from_utf8_lossy(&rng.bytes(len)).replace('\0', " "),
            1 => format!("NVMe0R01 {HOSTNQN} {}", "x".repeat(len)),
            2 => format!("NVMe1R01 {HOSTNQN} {SUB} {}", "A".repeat(len % 64)),
            _ => format!("NVMe{}R0{} {OTHER_HOST} {SUB}", len % 3, (len / 3) % 4),
        };
        let bad = TlsPsk {
            identity,
            psk: rng.bytes(32),
        };
        assert!(
            Queue::dial_tls(h.addr, QueueOptions::default(), &bad).is_err(),
            "round {i}: {bad:?} was let in"
        );
    }
    serve_data(&h, &psk(HOSTNQN, 7, 1, Variant::Rfc), 0x77);
}
