//! A hostile or broken target must not crash the host: arbitrary bytes as controller PDUs, and
//! arbitrary PDUs after a valid ICResp on a live queue with a command in flight, end in a
//! `HostError` or a completion — never a panic, never a read past what was announced.
//!
//! Bounded under `cargo test`; longer: `BOLERO_RANDOM_ITERATIONS=… cargo test --release -p
//! duplex-host --test fuzz_pdu`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use duplex_host::{pdu, Data, Queue, QueueOptions};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::tcp::{self, Digests};

/// Wall-clock cap per target (a bound on the run, not an assertion).
const TIME_CAP: Duration = Duration::from_secs(10);

#[test]
fn arbitrary_bytes_as_controller_pdus() {
    bolero::check!()
        .with_iterations(2_000_000)
        .with_test_time(TIME_CAP)
        .with_max_len(600)
        .for_each(|bytes: &[u8]| {
            let Some((&ctl, rest)) = bytes.split_first() else {
                return;
            };
            let d = Digests {
                header: ctl & 1 != 0,
                data: ctl & 2 != 0,
            };
            let mut r = rest;
            while let Ok(p) = pdu::read(&mut r, d, 256) {
                assert!(p.data.len() <= 256);
            }
        });
}

#[test]
fn arbitrary_pdus_on_a_live_queue() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    bolero::check!()
        .with_iterations(3_000)
        .with_test_time(TIME_CAP)
        .with_max_len(2000)
        .for_each(|bytes: &[u8]| {
            let target = {
                let listener = listener.try_clone().expect("clone");
                let reply = bytes.to_vec();
                std::thread::spawn(move || {
                    let (mut s, _) = listener.accept().expect("accept");
                    let mut icreq = [0u8; 128];
                    if s.read_exact(&mut icreq).is_err() {
                        return;
                    }
                    let resp = tcp::IcResp {
                        pfv: 0,
                        cpda: 0,
                        digests: Digests::default(),
                        maxh2cdata: 8192,
                    };
                    let _ = s.write_all(&resp.encode());
                    let _ = s.write_all(&reply);
                    // End of the target: the host sees EOF after the garbage.
                })
            };
            let opts = QueueOptions {
                timeout: Some(Duration::from_secs(5)),
                ..QueueOptions::default()
            };
            if let Ok(mut q) = Queue::dial(addr, opts) {
                let read = Sqe {
                    opcode: 0x02,
                    nsid: 1,
                    ..Sqe::default()
                };
                let write = Sqe {
                    opcode: 0x01,
                    nsid: 1,
                    ..Sqe::default()
                };
                if q.submit(read, Data::In(4096)).is_ok()
                    && q.submit(write, Data::Out(vec![1; 16384])).is_ok()
                {
                    while q.poll().is_ok() {}
                }
            }
            let _ = target.join();
        });
}
