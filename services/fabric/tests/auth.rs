//! In-band authentication (DH-HMAC-CHAP) through a live fabric (real TCP, rings to the memory
//! datapath): an exported subsystem whose host has secrets sealed with the array's key, hosts
//! driven by `duplex_host::auth` (the Linux host is the interop proof: `tests/interop_linux_auth.rs`
//! in duplex-tests). Connect asks for authentication (ATR); the right secret, one way and both
//! ways, opens the admin and I/O queues; a wrong one gets AUTH_Failure1 and the queue stays shut
//! (Authentication Required with DNR); so does a host that never authenticates; a node with
//! another key refuses the host at Connect; malformed commands get their status, never a crash;
//! fuzzer-chosen authentication commands never open the queue (bounded, as `fuzz_dispatch.rs`).

mod common;

use common::*;
use duplex_host::auth::{auth_sqe, authenticate, negotiate};
use duplex_host::{Data, HostError, Queue, QueueOptions};
use duplex_ipc::exports::{
    AnaGroupState, AnaState, ExportNamespace, ExportSecret, ExportSubsystem, ExportTable,
    ExportsRegion,
};
use duplex_nvme::auth::{Hash, Secret};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::io;
use duplex_nvme::status::{generic, specific, Status};
use duplex_ondisk::secrets::{seal, HostKeys, SecretsKey};

const SUB: &str = "nqn.2026-12.io.duplex:auth";
const OPEN_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000ff";
const KEY: [u8; 32] = [0x42; 32];

fn host_secret() -> Secret {
    Secret {
        transform: Some(Hash::Sha256),
        key: (0u8..32).collect(),
    }
}

fn ctrl_secret() -> Secret {
    Secret {
        transform: None,
        key: (100u8..148).collect(),
    }
}

/// A fabric exporting [`SUB`] to [`HOSTNQN`] (with secrets, the controller's when `bidi`) and
/// [`OPEN_HOST`] (without), the fabric holding `node_key`.
fn start(bidi: bool, node_key: [u8; 32]) -> (Harness, ExportsRegion) {
    let key = SecretsKey::from_bytes(KEY);
    let keys = HostKeys {
        dhchap: Some(host_secret().to_text()),
        dhchap_ctrl: bidi.then(|| ctrl_secret().to_text()),
        tls_psk: None,
    };
    let sealed = seal(&key, SUB, HOSTNQN, &keys, [7; 12]);
    let region = ExportsRegion::create(1 << 20).expect("exports region");
    region
        .publish(&ExportTable {
            generation: 1,
            subsystems: vec![ExportSubsystem {
                nqn: SUB.into(),
                serial: "auth1".into(),
                model: "duplex auth".into(),
                allow_any_host: false,
                hosts: vec![HOSTNQN.into(), OPEN_HOST.into()],
                secrets: vec![ExportSecret {
                    host: HOSTNQN.into(),
                    sealed,
                }],
                namespaces: vec![ExportNamespace {
                    nsid: 1,
                    volume: 7,
                    block_size: BS,
                    blocks: BLOCKS,
                    nguid: [0x57; 16],
                    uuid: [0x58; 16],
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
    let h = Harness::start_keyed(
        Some((region.region().try_clone_fd().expect("fd"), None)),
        None,
        Some(SecretsKey::from_bytes(node_key)),
    );
    (h, region)
}

fn dial(h: &Harness) -> Queue {
    Queue::dial(h.addr, QueueOptions::default()).expect("dial")
}

fn status_of(r: duplex_host::Result<impl Sized>) -> Status {
    match r {
        Err(HostError::Status(s)) => s,
        Err(e) => panic!("{e}"),
        Ok(_) => Status::SUCCESS,
    }
}

fn read(q: &mut Queue) -> duplex_host::Result<duplex_host::Completion> {
    q.execute(
        Sqe {
            opcode: io::READ,
            nsid: 1,
            ..Sqe::default()
        },
        Data::In(BS as usize),
    )?
    .ok()
}

/// Admin queue connected and (when `secret`) authenticated; the controller id.
fn admin(h: &Harness, host: &str, secret: Option<(&Secret, Option<&Secret>)>) -> (Queue, u16) {
    let mut q = dial(h);
    let cntlid = q
        .connect(0, 31, 0, 0xFFFF, SUB, host, [1; 16])
        .expect("connect");
    if let Some((s, c)) = secret {
        assert!(q.auth_required(), "Connect asks for authentication");
        authenticate(&mut q, SUB, host, s, c, 0, &[0x33; 64]).expect("authenticate");
    }
    (q, cntlid)
}

#[test]
fn the_right_secret_opens_every_queue_one_way_and_both_ways() {
    for bidi in [false, true] {
        let (h, _exports) = start(bidi, KEY);
        let (s, c) = (host_secret(), ctrl_secret());
        let (mut a, cntlid) = admin(&h, HOSTNQN, Some((&s, bidi.then_some(&c))));
        a.enable().expect("enable");
        a.identify(1, 0).expect("identify after authentication");
        a.set_queues(1).expect("queues");
        let mut q = dial(&h);
        q.connect(1, 31, 0, cntlid, SUB, HOSTNQN, [1; 16])
            .expect("io connect");
        assert!(q.auth_required(), "every queue authenticates");
        assert_eq!(status_of(read(&mut q)), specific::AUTH_REQUIRED);
        authenticate(&mut q, SUB, HOSTNQN, &s, bidi.then_some(&c), 1, &[0x44; 64])
            .expect("io authenticate");
        read(&mut q).expect("read after authentication");
    }
}

#[test]
fn a_wrong_secret_or_none_leaves_the_queue_shut() {
    let (h, _exports) = start(true, KEY);
    // A wrong host secret: Failure1, then Authentication Required.
    let wrong = Secret {
        transform: Some(Hash::Sha256),
        key: vec![9; 32],
    };
    let mut q = dial(&h);
    q.connect(0, 31, 0, 0xFFFF, SUB, HOSTNQN, [1; 16])
        .expect("connect");
    let e = authenticate(&mut q, SUB, HOSTNQN, &wrong, None, 0, &[0; 64])
        .expect_err("a wrong secret fails");
    assert!(e.to_string().contains("failed this host"), "{e}");
    q.enable().expect("enable (a fabrics command)");
    assert_eq!(status_of(q.identify(1, 0)), specific::AUTH_REQUIRED);
    // The host's secret right, the controller's wrong: the host fails the controller.
    let mut q = dial(&h);
    q.connect(0, 31, 0, 0xFFFF, SUB, HOSTNQN, [1; 16])
        .expect("connect");
    let e = authenticate(
        &mut q,
        SUB,
        HOSTNQN,
        &host_secret(),
        Some(&wrong),
        0,
        &[5; 64],
    )
    .expect_err("a wrong controller secret fails");
    assert!(e.to_string().contains("controller's response"), "{e}");
    q.enable().expect("enable");
    assert_eq!(status_of(q.identify(1, 0)), specific::AUTH_REQUIRED);
    // No authentication at all.
    let mut q = dial(&h);
    q.connect(0, 31, 0, 0xFFFF, SUB, HOSTNQN, [1; 16])
        .expect("connect");
    q.enable().expect("enable");
    assert_eq!(status_of(q.identify(1, 0)), specific::AUTH_REQUIRED);
    // A host without secrets is not asked.
    let (mut open, _) = admin(&h, OPEN_HOST, None);
    assert!(!open.auth_required());
    open.enable().expect("enable");
    open.identify(1, 0).expect("identify");
}

#[test]
fn a_node_with_another_key_refuses_the_host_at_connect() {
    let (h, _exports) = start(false, [0x43; 32]);
    let mut q = dial(&h);
    let s = status_of(q.connect(0, 31, 0, 0xFFFF, SUB, HOSTNQN, [1; 16]));
    assert_eq!(s, specific::CONNECT_INVALID_HOST);
    let (_, _) = admin(&h, OPEN_HOST, None);
}

#[test]
fn malformed_authentication_commands_get_their_status() {
    let (h, _exports) = start(false, KEY);
    let mut q = dial(&h);
    q.connect(0, 31, 0, 0xFFFF, SUB, HOSTNQN, [1; 16])
        .expect("connect");
    let nego = negotiate(0, &[1], &[0]);
    // Wrong SECP.
    let mut sqe = auth_sqe(true, nego.len() as u32);
    sqe.cdw10 = 0xEA01_0100;
    assert_eq!(
        status_of(q.execute(sqe, Data::Out(nego.clone())).and_then(|c| c.ok())),
        generic::INVALID_FIELD
    );
    // A length other than the SGL's.
    let sqe = auth_sqe(true, nego.len() as u32 + 1);
    assert_eq!(
        status_of(q.execute(sqe, Data::Out(nego.clone())).and_then(|c| c.ok())),
        generic::SGL_INVALID_DATA
    );
    // A receive with nothing due.
    assert_eq!(
        status_of(
            q.execute(auth_sqe(false, 4096), Data::In(4096))
                .and_then(|c| c.ok())
        ),
        generic::SEQUENCE
    );
    // Garbage instead of a negotiate: Failure1 (incorrect protocol message) comes back.
    q.execute(auth_sqe(true, 16), Data::Out(vec![0xEE; 16]))
        .and_then(|c| c.ok())
        .expect("the send completes");
    let f = q
        .execute(auth_sqe(false, 4096), Data::In(4096))
        .and_then(|c| c.ok())
        .expect("failure1")
        .data;
    assert_eq!((f[0], f[1], f[6]), (0, 0xF1, 1));
    // The queue is still usable for a proper transaction afterwards.
    authenticate(&mut q, SUB, HOSTNQN, &host_secret(), None, 3, &[0; 64])
        .expect("authenticate after a failure");
    q.enable().expect("enable");
    q.identify(1, 0).expect("identify");
}

/// Fuzzer-chosen authentication commands (sends of raw bytes or of negotiate, reply and
/// success2 messages with fuzzer bytes laid over them, receives of any length, lengths that
/// disagree with the SGL) on a queue that must authenticate: every command gets a response,
/// the connection stays up, the queue never opens without the secret, and a proper
/// transaction afterwards works. Bounded under `cargo test` (as `fuzz_dispatch.rs`).
#[test]
fn arbitrary_authentication_commands_never_open_the_queue_or_break_the_target() {
    let (h, _exports) = start(true, KEY);
    let addr = h.addr;
    bolero::check!()
        .with_iterations(2_000)
        .with_test_time(std::time::Duration::from_secs(15))
        .with_type::<Vec<(bool, u8, Vec<u8>, u16)>>()
        .for_each(|steps| {
            let mut q = Queue::dial(addr, QueueOptions::default()).expect("dial");
            q.connect(0, 31, 0, 0xFFFF, SUB, HOSTNQN, [1; 16])
                .expect("connect");
            for (send, kind, bytes, len) in steps.iter().take(8) {
                let r = if *send {
                    let mut msg = match kind % 4 {
                        0 => negotiate(u16::from(*kind), &[1, 2, 3], &[0, 1]),
                        1 => {
                            let mut m = vec![0u8; 16 + 64];
                            m[0] = 1;
                            m[1] = 2;
                            m[6] = 32;
                            m
                        }
                        2 => {
                            let mut m = vec![0u8; 16];
                            m[0] = 1;
                            m[1] = 4;
                            m
                        }
                        _ => Vec::new(),
                    };
                    for (i, b) in bytes.iter().take(128).enumerate() {
                        if i < msg.len() {
                            msg[i] ^= b;
                        } else {
                            msg.push(*b);
                        }
                    }
                    if msg.is_empty() {
                        msg.push(0);
                    }
                    let tl = if len % 7 == 0 {
                        u32::from(*len)
                    } else {
                        msg.len() as u32
                    };
                    q.execute(auth_sqe(true, tl), Data::Out(msg))
                } else {
                    let al = usize::from(*len % 8200).max(1);
                    q.execute(auth_sqe(false, al as u32), Data::In(al))
                };
                // A response, whatever its status: never a broken connection.
                r.expect("every authentication command is answered");
            }
            q.enable().expect("enable");
            assert_eq!(
                status_of(q.identify(1, 0)),
                specific::AUTH_REQUIRED,
                "the queue opened without the secret: {steps:?}"
            );
        });
    let (mut a, _) = admin(&h, HOSTNQN, Some((&host_secret(), Some(&ctrl_secret()))));
    a.enable().expect("enable");
    a.identify(1, 0).expect("identify");
}
