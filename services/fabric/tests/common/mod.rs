//! Test harness: the fabric in-process on a thread (real listener, real rings and pool), a
//! memory "datapath" thread at the other end of the rings, and a small blocking NVMe/TCP host.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use duplex_fabric::backend::Backend;
use duplex_fabric::server::{self, Listener};
use duplex_fabric::target::{Port, Target};
use duplex_ipc::desc::{self, IoDesc};
use duplex_ipc::pool::{BufHandle, Holder, Pool, NIL};
use duplex_ipc::ring::{self, Consumer, Producer, RingRegion, StartMode, WaitPolicy};
use duplex_ipc::topology::*;
use duplex_nvme::cmd::{ConnectCmd, ConnectData, Cqe, Sgl, Sqe};
use duplex_nvme::spec::{admin, fctype, prop, sgl};
use duplex_nvme::status::Status;
use duplex_nvme::tcp::{self, CommonHeader, Digests, PduType};

pub const SUBNQN: &str = "nqn.2026-11.io.duplex:test";
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
pub const BLOCKS: u64 = 2048;
pub const BS: u32 = 4096;

pub fn topology() -> Topology {
    Topology {
        version: TOPOLOGY_VERSION,
        node: "t".into(),
        cntlid_base: 1,
        ana_group: 1,
        volumes: vec![VolumeSpec {
            id: 1,
            name: "v".into(),
            resource: "volume:v".into(),
            path: "mem".into(),
            block_size: BS,
            blocks: BLOCKS,
            direct: false,
        }],
        subsystems: vec![SubsystemSpec {
            nqn: SUBNQN.into(),
            serial: "serial1".into(),
            model: "duplex".into(),
            allow_any_host: false,
            hosts: vec![HOSTNQN.into()],
            namespaces: vec![NamespaceSpec {
                nsid: 1,
                volume: 1,
                nguid: [0x11; 16],
                uuid: [0x22; 16],
            }],
        }],
        io: IoSpec {
            pool: "p".into(),
            channels: vec![],
        },
        listeners: vec![],
    }
}

/// The fabric on a thread plus a memory datapath.
pub struct Harness {
    pub addr: SocketAddr,
    /// A view of the shared pool (to count what is in use).
    pub pool: Pool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    fabric: Option<JoinHandle<()>>,
    dp_stop: Arc<AtomicBool>,
    datapath: Option<JoinHandle<()>>,
}

impl Harness {
    pub fn start() -> Self {
        let sq = RingRegion::<IoDesc>::create("sq", 64, 1).expect("ring");
        let cq = RingRegion::<IoDesc>::create("cq", 64, 2).expect("ring");
        let (sq_data, sq_space) = ring::doorbells().expect("bells");
        let (cq_data, cq_space) = ring::doorbells().expect("bells");
        let fab = Holder {
            role: ROLE_FABRIC,
            incarnation: 1,
        };
        let dp = Holder {
            role: ROLE_DATAPATH,
            incarnation: 1,
        };
        let pool = Pool::create("p", 4096, 512, fab).expect("pool");
        let dp_pool = Pool::attach(pool.region().try_clone_fd().expect("fd"), dp).expect("attach");
        let view = Pool::attach(
            pool.region().try_clone_fd().expect("fd"),
            Holder {
                role: 9,
                incarnation: 1,
            },
        )
        .expect("attach");
        let mut dp_sq = Consumer::attach(
            sq.try_clone().expect("clone"),
            sq_data.try_clone().expect("b"),
            sq_space.try_clone().expect("b"),
            1,
            StartMode::Fresh,
        )
        .expect("consumer");
        dp_sq.set_policy(WaitPolicy::Doorbell);
        let mut dp_cq = Producer::attach(
            cq.try_clone().expect("clone"),
            cq_data.try_clone().expect("b"),
            cq_space.try_clone().expect("b"),
            1,
            StartMode::Fresh,
        )
        .expect("producer");
        dp_cq.set_policy(WaitPolicy::Doorbell);
        let dp_stop = Arc::new(AtomicBool::new(false));
        let stop2 = dp_stop.clone();
        let datapath = std::thread::spawn(move || memory_datapath(dp_pool, dp_sq, dp_cq, stop2));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nb");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let fabric = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let mut submit =
                    Producer::attach(sq, sq_data, sq_space, 1, StartMode::Fresh).expect("p");
                submit.set_policy(WaitPolicy::Doorbell);
                let mut complete =
                    Consumer::attach(cq, cq_data, cq_space, 1, StartMode::Fresh).expect("c");
                complete.set_policy(WaitPolicy::Doorbell);
                let backend = Backend::new(pool, submit, complete, 1, false).expect("backend");
                let port = Port {
                    id: 1,
                    addr,
                    kind: ListenerKind::Nvme,
                };
                let target = Rc::new(Target::new(topology(), vec![port.clone()]));
                let l = Listener {
                    socket: tokio::net::TcpListener::from_std(listener).expect("listener"),
                    port,
                };
                server::serve(target, Some(backend), vec![l], async {
                    let _ = stop_rx.await;
                })
                .await;
            });
        });
        Self {
            addr,
            pool: view,
            stop: Some(stop_tx),
            fabric: Some(fabric),
            dp_stop,
            datapath: Some(datapath),
        }
    }
}

impl Harness {
    /// Pool chunks not free right now.
    pub fn pool_in_use(&self) -> usize {
        self.pool.capacity() as usize - self.pool.free_count()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(f) = self.fabric.take() {
            let _ = f.join();
        }
        self.dp_stop.store(true, Ordering::Relaxed);
        if let Some(d) = self.datapath.take() {
            let _ = d.join();
        }
    }
}

fn memory_datapath(
    pool: Pool,
    mut sq: Consumer<IoDesc>,
    mut cq: Producer<IoDesc>,
    stop: Arc<AtomicBool>,
) {
    let mut disk = vec![0u8; (BLOCKS * u64::from(BS)) as usize];
    let mut batch = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        batch.clear();
        let first = sq.next_index();
        let n = sq
            .pop_wait(&mut batch, 32, Some(Duration::from_millis(20)))
            .expect("pop");
        for (i, d) in batch.iter().take(n).enumerate() {
            let mut d = *d;
            let index = first + i as u64;
            if d.buf != NIL {
                pool.take_chain(BufHandle(d.buf), 1, index).expect("take");
            }
            let off = (d.lba * u64::from(BS)) as usize;
            let len = d.blocks as usize * BS as usize;
            d.status = if off + len > disk.len() && d.opcode != desc::OP_FLUSH {
                desc::STATUS_LBA_OUT_OF_RANGE
            } else {
                match d.opcode {
                    desc::OP_WRITE => {
                        let mut v = Vec::new();
                        pool.read_chain(BufHandle(d.buf), &mut v)
                            .expect("read chain");
                        disk[off..off + len].copy_from_slice(&v[..len]);
                        0
                    }
                    desc::OP_READ => {
                        pool.write_chain(BufHandle(d.buf), &disk[off..off + len])
                            .expect("write chain");
                        0
                    }
                    desc::OP_WRITE_ZEROES | desc::OP_DEALLOCATE => {
                        disk[off..off + len].fill(0);
                        0
                    }
                    desc::OP_FLUSH => 0,
                    _ => desc::STATUS_INVALID_FIELD,
                }
            };
            if d.buf != NIL {
                pool.lend_chain(BufHandle(d.buf), 2, cq.next_index())
                    .expect("lend");
            }
            cq.push_wait(&[d], None).expect("push");
        }
    }
}

/// A blocking NVMe/TCP host for tests.
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

    /// Connects the admin queue and enables the controller. Returns the controller id.
    pub fn admin(addr: SocketAddr, digests: Digests) -> (Self, u16) {
        let mut h = Self::dial(addr, digests);
        let c = h.connect(0, 0xFFFF, SUBNQN, HOSTNQN);
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
