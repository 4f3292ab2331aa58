//! Fuzz targets for the fabric's PDU handling and command dispatch, against the live target
//! (real TCP, real rings to a memory datapath).
//!
//! * `arbitrary_commands_always_complete`: fuzzer-chosen admin and I/O commands (any opcode,
//!   namespace, dwords, data in the capsule, pulled with R2T, or read back) on a connected
//!   controller: every one gets exactly one response, and a fresh controller works afterwards.
//! * `arbitrary_reservation_commands_always_complete`: fuzzer-chosen reservation commands
//!   (Register, Report, Acquire, Release with any dwords and data; the reservation features and
//!   log page) from two hosts on an exported namespace whose changes go to an in-memory
//!   metadata service applying the model (some answers errors): every command gets one
//!   response, and at the end the fabric's Report is the model's.
//! * `arbitrary_bytes_after_icreq_never_break_the_target`: raw bytes after a valid ICReq (and
//!   after an admin Connect): the connection may end with a C2HTermReq, and the target must
//!   serve a fresh connection afterwards (a panic would end the fabric thread).
//!
//! Bounded under `cargo test`; longer runs: `BOLERO_RANDOM_ITERATIONS=…
//! BOLERO_RANDOM_TEST_TIME_MS=… cargo test --release -p duplex-fabric --test fuzz_dispatch`.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use common::*;
use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::{admin, feat, io};
use duplex_nvme::tcp::Digests;

const NONE: Digests = Digests {
    header: false,
    data: false,
};
const ITERATIONS: usize = 20_000;
/// Wall-clock cap per target (a bound on the run, not an assertion).
const TIME_CAP: Duration = Duration::from_secs(15);

type Cmd = (u8, u8, u32, u32, u32, u8, bool);

fn io_pair(addr: std::net::SocketAddr) -> (Host, Host) {
    let (mut a, cntlid) = admin(addr, NONE);
    let (s, _, _) = a.admin_cmd(
        Sqe {
            opcode: admin::SET_FEATURES,
            cdw10: u32::from(feat::NUM_QUEUES),
            ..Sqe::default()
        },
        0,
    );
    assert!(s.is_success());
    let mut q = Host::dial(addr, NONE);
    assert!(q.connect(1, cntlid, SUBNQN, HOSTNQN).status().is_success());
    (a, q)
}

fn sane(h: &Harness) {
    let (mut a, mut q) = io_pair(h.addr);
    assert!(a
        .admin_cmd(
            Sqe {
                opcode: admin::KEEP_ALIVE,
                ..Sqe::default()
            },
            0
        )
        .0
        .is_success());
    let r = Sqe {
        opcode: io::READ,
        nsid: 1,
        cid: q.cid(),
        ..Sqe::default()
    };
    assert!(q
        .command(r, None, false, BS as usize)
        .0
        .status()
        .is_success());
}

#[test]
fn arbitrary_commands_always_complete() {
    let h = Harness::start();
    let addr = h.addr;
    bolero::check!()
        .with_iterations(ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_type::<Vec<Cmd>>()
        .for_each(|cmds| {
            let (mut a, mut q) = io_pair(addr);
            for &(opcode, nsid, cdw10, cdw11, cdw12, data, on_io) in cmds.iter().take(8) {
                // An Asynchronous Event Request completes only on an event: not here.
                if !on_io && opcode == admin::ASYNC_EVENT {
                    continue;
                }
                let host = if on_io { &mut q } else { &mut a };
                let sqe = Sqe {
                    opcode,
                    nsid: match nsid % 5 {
                        0 => 0,
                        1 => 1,
                        2 => 2,
                        3 => u32::MAX,
                        _ => u32::from(nsid),
                    },
                    cdw10,
                    cdw11,
                    cdw12,
                    ..Sqe::default()
                };
                // Data direction: bit 0 of the opcode (of the command type for fabrics).
                let h2c = if opcode == admin::FABRICS {
                    sqe.fctype() & 1 != 0
                } else {
                    opcode & 1 != 0
                };
                let len = [0usize, 512, 4096, 8192][usize::from(data % 4)];
                let out = vec![0xA5u8; len];
                // The host library checks that the response names a command in flight and
                // that no more data comes than the SGL asked for.
                let (_, got) = if h2c && len > 0 {
                    host.command(sqe, Some(&out), data & 4 != 0, 0)
                } else {
                    host.command(sqe, None, false, len)
                };
                assert!(got.len() <= len, "more data than the SGL asked for");
            }
        });
    sane(&h);
}

#[test]
fn arbitrary_reservation_commands_always_complete() {
    use duplex_tests::resv::Io;
    let (h, meta, _exports) = Harness::with_reservations(5);
    let addr = h.addr;
    let hosts = [[0xA1u8; 16], [0xB2u8; 16]];
    bolero::check!()
        .with_iterations(ITERATIONS / 4)
        .with_test_time(TIME_CAP)
        .with_type::<Vec<(u8, u8, u32, u32, Vec<u8>)>>()
        .for_each(|cmds| {
            let mut q = [
                Io::connect(addr, RESV_SUBNQN, HOSTNQN, hosts[0]),
                Io::connect(addr, RESV_SUBNQN, HOSTNQN, hosts[1]),
            ];
            for (who, op, cdw10, cdw11, data) in cmds.iter().take(8) {
                let io = &mut q[usize::from(who & 1)];
                let opcode =
                    [0x0D, 0x0E, 0x11, 0x15, 0x82, 0x83, 0x80, io::WRITE][usize::from(op % 8)];
                let data: Vec<u8> = data.iter().copied().take(64).collect();
                let sqe = Sqe {
                    opcode,
                    nsid: 1,
                    cdw10: *cdw10,
                    cdw11: *cdw11,
                    ..Sqe::default()
                };
                match opcode {
                    // The reservation features (Set and Get) and the notification log page,
                    // on the admin queue.
                    0x82 | 0x83 => {
                        let set = cdw11 & 0x8000_0000 != 0;
                        let sqe = Sqe {
                            opcode: if set {
                                admin::SET_FEATURES
                            } else {
                                admin::GET_FEATURES
                            },
                            cdw10: u32::from(opcode) | (cdw10 & 0x700),
                            ..sqe
                        };
                        io.admin.command(sqe, None, false, 0);
                    }
                    0x80 => {
                        let sqe = Sqe {
                            opcode: admin::GET_LOG_PAGE,
                            nsid: 0xFFFF_FFFF,
                            cdw10: 0x80 | (cdw10 & 0x8000) | (64 / 4 - 1) << 16,
                            ..sqe
                        };
                        io.admin.command(sqe, None, false, 64);
                    }
                    0x0E => {
                        let len = (*cdw10 as usize % 1024 + 1) * 4;
                        let (_, got) = io.q.command(sqe, None, false, len);
                        assert!(got.len() <= len, "more data than the SGL asked for");
                    }
                    _ if data.is_empty() => {
                        io.q.command(sqe, None, false, 0);
                    }
                    _ => {
                        io.q.command(sqe, Some(&data), cdw11 & 1 != 0, 0);
                    }
                }
            }
        });
    // The state the fabric reports is the model's, as the in-memory metadata service holds it.
    let mut a = duplex_tests::resv::Io::connect(addr, RESV_SUBNQN, HOSTNQN, hosts[0]);
    let (generation, rtype, regs) = a.report();
    let states = meta.states.lock().expect("states");
    let model = states
        .get(&(RESV_SUBNQN.to_owned(), 1))
        .cloned()
        .unwrap_or_default()
        .state();
    assert_eq!(generation, model.generation);
    assert_eq!(rtype, model.rtype.map_or(0, |t| t as u8));
    let want: Vec<([u8; 16], u64, bool)> = model
        .registrants
        .iter()
        .map(|g| {
            let holds = match model.rtype {
                Some(t) if t as u8 >= 5 => true,
                Some(_) => model.holder == Some(g.host),
                None => false,
            };
            (g.host.0, g.key, holds)
        })
        .collect();
    assert_eq!(regs, want);
    drop(states);
    sane(&h);
}

#[test]
fn arbitrary_bytes_after_icreq_never_break_the_target() {
    let h = Harness::start();
    let addr = h.addr;
    bolero::check!()
        .with_iterations(ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_type::<(bool, Vec<u8>)>()
        .for_each(|(connected, bytes)| {
            let x = if *connected {
                admin(addr, NONE).0
            } else {
                Host::dial(addr, NONE)
            };
            let mut s = x.socket();
            let _ = s.write_all(bytes);
            // End our side; the target answers what it can, may send a C2HTermReq, and closes.
            let _ = s.shutdown(Shutdown::Write);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
    sane(&h);
}
