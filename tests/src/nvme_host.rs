//! A blocking NVMe/TCP host for tests and figures, on top of `duplex-host`: test-friendly
//! wrappers (panics instead of errors, raw PDUs for crafting protocol violations) and a
//! pipelined load at a chosen queue depth. The load generator is `duplex-bench` (issue 5).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use duplex_host::{pdu::Pdu, Data, HostError, Queue, QueueOptions};
use duplex_nvme::cmd::{Cqe, Sqe};
use duplex_nvme::spec::{admin, fctype, io, prop};
use duplex_nvme::status::Status;
use duplex_nvme::tcp::Digests;

/// Host id the tests connect with.
pub const HOSTID: [u8; 16] = [7; 16];

/// A blocking NVMe/TCP host for tests: one queue.
#[derive(Debug)]
pub struct Host {
    /// The queue.
    pub q: Queue,
    next_cid: u16,
}

impl Host {
    /// Opens a connection (ICReq/ICResp) with `digests`; panics on failure.
    pub fn dial(addr: SocketAddr, digests: Digests) -> Self {
        let q = Queue::dial(
            addr,
            QueueOptions {
                digests,
                timeout: Some(Duration::from_secs(20)),
                max_data: 1 << 24,
                in_capsule: 8192,
                busy_poll: None,
            },
        )
        .expect("ICReq/ICResp");
        Self { q, next_cid: 1 }
    }

    /// The socket, for raw reads, writes and shutdown.
    pub fn socket(&self) -> &TcpStream {
        self.q.socket()
    }

    /// Sends raw bytes.
    pub fn raw(&mut self, b: &[u8]) {
        self.q.send_raw(b).expect("write");
    }

    /// Reads one PDU from the controller (a C2HTermReq is `HostError::Terminated`).
    pub fn read_pdu(&mut self) -> Result<Pdu, HostError> {
        self.q.read_pdu()
    }

    /// A command id for raw-crafted commands.
    pub fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1);
        self.next_cid
    }

    /// Sends a command and waits for it. Host→controller `out` goes in the capsule if
    /// `in_capsule`, else on R2T; `read_len` sizes a controller→host transfer.
    pub fn command(
        &mut self,
        sqe: Sqe,
        out: Option<&[u8]>,
        in_capsule: bool,
        read_len: usize,
    ) -> (Cqe, Vec<u8>) {
        let data = match out {
            Some(d) => Data::Out(d.to_vec()),
            None if read_len > 0 => Data::In(read_len),
            None => Data::None,
        };
        if !in_capsule {
            self.q.set_in_capsule(0);
        }
        let c = self.q.execute(sqe, data);
        self.q.set_in_capsule(8192);
        let c = c.expect("a completion");
        (c.cqe, c.data)
    }

    /// Fabrics Connect of queue `qid` (sqsize 31 for the admin queue, 63 for I/O; KATO 30 s).
    pub fn connect(&mut self, qid: u16, cntlid: u16, subnqn: &str, hostnqn: &str) -> Cqe {
        self.connect_as(qid, cntlid, subnqn, hostnqn, HOSTID)
    }

    /// [`Host::connect`] with host identifier `hostid`.
    pub fn connect_as(
        &mut self,
        qid: u16,
        cntlid: u16,
        subnqn: &str,
        hostnqn: &str,
        hostid: [u8; 16],
    ) -> Cqe {
        let sqe = duplex_nvme::cmd::ConnectCmd {
            recfmt: 0,
            qid,
            sqsize: if qid == 0 { 31 } else { 63 },
            cattr: 0,
            kato: if qid == 0 { 30_000 } else { 0 },
        }
        .to_sqe(0);
        let data = duplex_nvme::cmd::ConnectData {
            hostid,
            cntlid,
            subnqn: subnqn.into(),
            hostnqn: hostnqn.into(),
        }
        .to_bytes();
        self.command(sqe, Some(&data), true, 0).0
    }

    /// Property Set.
    pub fn prop_set(&mut self, offset: u32, value: u32) -> Cqe {
        let sqe = Sqe {
            opcode: admin::FABRICS,
            nsid: u32::from(fctype::PROPERTY_SET),
            cdw11: offset,
            cdw12: value,
            ..Sqe::default()
        };
        self.command(sqe, None, false, 0).0
    }

    /// Property Get.
    pub fn prop_get(&mut self, offset: u32, eight: bool) -> Cqe {
        let sqe = Sqe {
            opcode: admin::FABRICS,
            nsid: u32::from(fctype::PROPERTY_GET),
            cdw10: u32::from(eight),
            cdw11: offset,
            ..Sqe::default()
        };
        self.command(sqe, None, false, 0).0
    }

    /// Connects the admin queue to `subnqn` as `hostnqn` and enables the controller. Returns
    /// the controller id.
    pub fn admin_as(
        addr: SocketAddr,
        digests: Digests,
        subnqn: &str,
        hostnqn: &str,
    ) -> (Self, u16) {
        Self::admin_as_id(addr, digests, subnqn, hostnqn, HOSTID)
    }

    /// [`Host::admin_as`] with host identifier `hostid`.
    pub fn admin_as_id(
        addr: SocketAddr,
        digests: Digests,
        subnqn: &str,
        hostnqn: &str,
        hostid: [u8; 16],
    ) -> (Self, u16) {
        let mut h = Self::dial(addr, digests);
        let c = h.connect_as(0, 0xFFFF, subnqn, hostnqn, hostid);
        assert!(c.status().is_success(), "admin connect: {}", c.status());
        let cntlid = c.dw0 as u16;
        assert!(h
            .prop_set(prop::CC, prop::CC_EN | 6 << 16 | 4 << 20)
            .status()
            .is_success());
        (h, cntlid)
    }

    /// An admin command with `read_len` bytes of controller data: (status, data, dword 0).
    pub fn admin_cmd(&mut self, sqe: Sqe, read_len: usize) -> (Status, Vec<u8>, u32) {
        let (c, d) = self.command(sqe, None, false, read_len);
        (c.status(), d, c.dw0)
    }

    /// Runs `load` on this (connected I/O) queue, namespace 1. Every command must succeed.
    pub fn run_load(&mut self, load: Load) -> LoadResult {
        let nlb = (load.io_size / load.block_size) as u32;
        let span = load.blocks / u64::from(nlb);
        assert!(nlb > 0 && span > 0, "load does not fit the namespace");
        let payload = vec![0x5Au8; load.io_size];
        let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next_seq = 0u64;
        let mut started: HashMap<u16, Instant> = HashMap::new();
        let (mut sent, mut done) = (0usize, 0usize);
        let mut latency = Duration::ZERO;
        let begin = Instant::now();
        while done < load.ios {
            while sent < load.ios && started.len() < load.queue_depth {
                let slot = if load.random {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % span
                } else {
                    let s = next_seq % span;
                    next_seq += 1;
                    s
                };
                let lba = slot * u64::from(nlb);
                let sqe = Sqe {
                    opcode: if load.write { io::WRITE } else { io::READ },
                    nsid: 1,
                    cdw10: lba as u32,
                    cdw11: (lba >> 32) as u32,
                    cdw12: nlb - 1,
                    ..Sqe::default()
                };
                let data = if load.write {
                    Data::Out(payload.clone())
                } else {
                    Data::In(load.io_size)
                };
                let cid = self.q.submit(sqe, data).expect("submit");
                started.insert(cid, Instant::now());
                sent += 1;
            }
            let c = self.q.poll().expect("a completion");
            assert!(c.status().is_success(), "I/O failed: {}", c.status());
            let t = started.remove(&c.cid).expect("a command we sent");
            latency += t.elapsed();
            done += 1;
        }
        LoadResult {
            ios: done,
            elapsed: begin.elapsed(),
            mean_latency: latency / done.max(1) as u32,
        }
    }
}

/// One pipelined workload.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Writes (else reads).
    pub write: bool,
    /// Random offsets (else sequential).
    pub random: bool,
    /// Bytes per I/O (a multiple of the block size).
    pub io_size: usize,
    /// Commands kept in flight.
    pub queue_depth: usize,
    /// Commands in all.
    pub ios: usize,
    /// Namespace block size.
    pub block_size: usize,
    /// Blocks of the namespace the load may touch (from block 0).
    pub blocks: u64,
}

/// What a load measured.
#[derive(Debug, Clone, Copy)]
pub struct LoadResult {
    /// Commands completed.
    pub ios: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Mean latency from sending a command to its response.
    pub mean_latency: Duration,
}

impl LoadResult {
    /// I/Os per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64()
    }
}
