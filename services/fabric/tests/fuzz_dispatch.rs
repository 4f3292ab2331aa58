//! Fuzz targets for the fabric's PDU handling and command dispatch, against the live target
//! (real TCP, real rings to a memory datapath).
//!
//! * `arbitrary_commands_always_complete`: fuzzer-chosen admin and I/O commands (any opcode,
//!   namespace, dwords, data in the capsule, pulled with R2T, or read back) on a connected
//!   controller: every one gets exactly one response, and a fresh controller works afterwards.
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
