//! A small blocking NVMe/TCP host for tests and figures: ICReq, Connect, admin and I/O commands
//! with in-capsule data, R2T/H2CData and C2HData, digests, and a pipelined load at a chosen
//! queue depth. Not the project's host library (that is the load generator's issue); enough to
//! drive a target from a test. Panics on anything unexpected: it is test code.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use duplex_nvme::cmd::{ConnectCmd, ConnectData, Cqe, Sgl, Sqe};
use duplex_nvme::spec::{admin, fctype, io, prop, sgl};
use duplex_nvme::status::Status;
use duplex_nvme::tcp::{self, CommonHeader, Digests, PduType};

/// A blocking NVMe/TCP host for tests.
#[derive(Debug)]
pub struct Host {
    pub s: TcpStream,
    pub digests: Digests,
    next_cid: u16,
    pub qid: u16,
}

impl Host {
    pub fn dial(addr: SocketAddr, digests: Digests) -> Self {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut h = Self {
            s,
            digests,
            next_cid: 1,
            qid: 0,
        };
        let req = tcp::IcReq {
            pfv: 0,
            hpda: 0,
            digests,
            maxr2t: 0,
        };
        h.s.write_all(&req.encode()).expect("icreq");
        let mut resp = [0u8; 128];
        h.s.read_exact(&mut resp).expect("icresp");
        let r = tcp::IcResp::parse(&resp).expect("parse icresp");
        assert_eq!(r.digests, digests);
        assert!(r.maxh2cdata >= 4096);
        h
    }

    pub fn raw(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("write");
    }

    /// Reads one PDU from the controller: (common header, full header, data).
    pub fn read_pdu(&mut self) -> std::io::Result<(CommonHeader, Vec<u8>, Vec<u8>)> {
        let mut ch = [0u8; 8];
        self.s.read_exact(&mut ch)?;
        let c = CommonHeader::parse(&ch);
        let l = tcp::layout(&c, self.digests, false, 1 << 24).expect("controller PDU layout");
        let mut rest = vec![0u8; l.head_rest()];
        self.s.read_exact(&mut rest)?;
        let mut header = ch.to_vec();
        header.extend_from_slice(&rest);
        if l.header_digest {
            assert_eq!(
                tcp::digest(&header[..l.hlen]),
                header[l.hlen..l.hlen + 4],
                "controller header digest"
            );
        }
        let mut data = vec![0u8; l.data_len];
        self.s.read_exact(&mut data)?;
        if l.data_digest {
            let mut d = [0u8; 4];
            self.s.read_exact(&mut d)?;
            assert_eq!(tcp::digest(&data), d, "controller data digest");
        }
        Ok((c, header, data))
    }

    pub fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1);
        self.next_cid
    }

    /// Sends a command; host→controller `out` goes in-capsule if `in_capsule`, else via R2T.
    /// `read_len` sizes a controller→host transfer. Returns the response and data received.
    pub fn command(
        &mut self,
        mut sqe: Sqe,
        out: Option<&[u8]>,
        in_capsule: bool,
        read_len: usize,
    ) -> (Cqe, Vec<u8>) {
        sqe.flags = 1 << 6; // PSDT: SGL
        let mut capsule = Vec::new();
        match out {
            Some(d) if in_capsule => {
                sqe.set_sgl(Sgl {
                    address: 0,
                    length: d.len() as u32,
                    id: sgl::DATA_BLOCK_OFFSET,
                });
                capsule = d.to_vec();
            }
            Some(d) => sqe.set_sgl(Sgl {
                address: 0,
                length: d.len() as u32,
                id: sgl::TRANSPORT_DATA_BLOCK,
            }),
            None => sqe.set_sgl(Sgl {
                address: 0,
                length: read_len as u32,
                id: sgl::TRANSPORT_DATA_BLOCK,
            }),
        }
        let mut pdu = tcp::capsule_cmd(&sqe, capsule.len(), self.digests, 0);
        pdu.extend_from_slice(&capsule);
        if !capsule.is_empty() && self.digests.data {
            pdu.extend_from_slice(&tcp::digest(&capsule));
        }
        self.raw(&pdu);
        let mut data = Vec::new();
        loop {
            let (c, header, d) = self.read_pdu().expect("response");
            match PduType::from_u8(c.pdu_type) {
                Some(PduType::CapsuleResp) => {
                    let mut raw = [0u8; 16];
                    raw.copy_from_slice(&header[8..24]);
                    let cqe: Cqe = bytemuck::cast(raw);
                    assert_eq!(cqe.cid, sqe.cid);
                    return (cqe, data);
                }
                Some(PduType::C2HData) => {
                    let h = tcp::parse_data_header(&header).expect("c2h");
                    assert_eq!(h.cccid, sqe.cid);
                    assert_eq!(h.datao as usize, data.len());
                    data.extend_from_slice(&d);
                }
                Some(PduType::R2T) => {
                    let r = tcp::parse_r2t(&header).expect("r2t");
                    let src = out.expect("R2T for a command without data");
                    let chunk = &src[r.r2to as usize..(r.r2to + r.r2tl) as usize];
                    let h = tcp::DataHeader {
                        cccid: r.cccid,
                        ttag: r.ttag,
                        datao: r.r2to,
                        datal: r.r2tl,
                    };
                    let mut p =
                        tcp::data_pdu(PduType::H2CData, &h, tcp::FLAG_DATA_LAST, self.digests, 0);
                    p.extend_from_slice(chunk);
                    if self.digests.data {
                        p.extend_from_slice(&tcp::digest(chunk));
                    }
                    self.raw(&p);
                }
                other => panic!("unexpected PDU {other:?}"),
            }
        }
    }

    pub fn connect(&mut self, qid: u16, cntlid: u16, subnqn: &str, hostnqn: &str) -> Cqe {
        let cid = self.cid();
        let sqe = ConnectCmd {
            recfmt: 0,
            qid,
            sqsize: if qid == 0 { 31 } else { 63 },
            cattr: 0,
            kato: if qid == 0 { 30_000 } else { 0 },
        }
        .to_sqe(cid);
        let data = ConnectData {
            hostid: [7; 16],
            cntlid,
            subnqn: subnqn.into(),
            hostnqn: hostnqn.into(),
        }
        .to_bytes();
        self.qid = qid;
        self.command(sqe, Some(&data), true, 0).0
    }

    pub fn prop_set(&mut self, offset: u32, value: u32) -> Cqe {
        let cid = self.cid();
        let sqe = Sqe {
            opcode: admin::FABRICS,
            cid,
            nsid: u32::from(fctype::PROPERTY_SET),
            cdw11: offset,
            cdw12: value,
            ..Sqe::default()
        };
        self.command(sqe, None, false, 0).0
    }

    pub fn prop_get(&mut self, offset: u32, eight: bool) -> Cqe {
        let cid = self.cid();
        let sqe = Sqe {
            opcode: admin::FABRICS,
            cid,
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
        let mut h = Self::dial(addr, digests);
        let c = h.connect(0, 0xFFFF, subnqn, hostnqn);
        assert!(c.status().is_success(), "admin connect: {}", c.status());
        let cntlid = c.dw0 as u16;
        assert!(h
            .prop_set(prop::CC, 1 | (6 << 16) | (4 << 20))
            .status()
            .is_success());
        (h, cntlid)
    }

    pub fn admin_cmd(&mut self, mut sqe: Sqe, read_len: usize) -> (Status, Vec<u8>, u32) {
        sqe.cid = self.cid();
        let (c, d) = self.command(sqe, None, false, read_len);
        (c.status(), d, c.dw0)
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

impl Host {
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
                let cid = (sent % 0xF000) as u16;
                let mut sqe = Sqe {
                    opcode: if load.write { io::WRITE } else { io::READ },
                    flags: 1 << 6,
                    cid,
                    nsid: 1,
                    cdw10: lba as u32,
                    cdw11: (lba >> 32) as u32,
                    cdw12: nlb - 1,
                    ..Sqe::default()
                };
                let inline = load.write && load.io_size <= 8192;
                sqe.set_sgl(Sgl {
                    address: 0,
                    length: load.io_size as u32,
                    id: if inline {
                        sgl::DATA_BLOCK_OFFSET
                    } else {
                        sgl::TRANSPORT_DATA_BLOCK
                    },
                });
                let mut pdu =
                    tcp::capsule_cmd(&sqe, if inline { load.io_size } else { 0 }, self.digests, 0);
                if inline {
                    pdu.extend_from_slice(&payload);
                    if self.digests.data {
                        pdu.extend_from_slice(&tcp::digest(&payload));
                    }
                }
                self.raw(&pdu);
                started.insert(cid, Instant::now());
                sent += 1;
            }
            let (c, header, _) = self.read_pdu().expect("a PDU from the target");
            match PduType::from_u8(c.pdu_type) {
                Some(PduType::CapsuleResp) => {
                    let cqe: Cqe =
                        bytemuck::pod_read_unaligned(&header[tcp::CH_LEN..tcp::CH_LEN + 16]);
                    assert!(cqe.status().is_success(), "I/O failed: {}", cqe.status());
                    let t = started
                        .remove(&cqe.cid)
                        .expect("a response for a command we sent");
                    latency += t.elapsed();
                    done += 1;
                }
                Some(PduType::C2HData) => {}
                Some(PduType::R2T) => {
                    let r = tcp::parse_r2t(&header).expect("r2t");
                    let chunk = &payload[r.r2to as usize..(r.r2to + r.r2tl) as usize];
                    let h = tcp::DataHeader {
                        cccid: r.cccid,
                        ttag: r.ttag,
                        datao: r.r2to,
                        datal: r.r2tl,
                    };
                    let mut p =
                        tcp::data_pdu(PduType::H2CData, &h, tcp::FLAG_DATA_LAST, self.digests, 0);
                    p.extend_from_slice(chunk);
                    if self.digests.data {
                        p.extend_from_slice(&tcp::digest(chunk));
                    }
                    self.raw(&p);
                }
                other => panic!("unexpected PDU {other:?}"),
            }
        }
        LoadResult {
            ios: done,
            elapsed: begin.elapsed(),
            mean_latency: latency / done.max(1) as u32,
        }
    }
}
