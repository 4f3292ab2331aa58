//! Test harness: the fabric in-process on a thread (real listener, real rings and pool), a
//! memory "datapath" thread at the other end of the rings, and a small blocking NVMe/TCP host.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use duplex_fabric::backend::Backend;
use duplex_fabric::exports::ExportsFeed;
use duplex_fabric::server::{self, Listener};
use duplex_fabric::subsystem::Port;
use duplex_fabric::target::Target;
use duplex_ipc::desc::{self, IoDesc};
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::exports::ExportsRegion;
use duplex_ipc::pool::{BufHandle, Holder, Pool, NIL};
use duplex_ipc::ring::{self, Consumer, Producer, RingRegion, StartMode, WaitPolicy};
use duplex_ipc::topology::*;
use duplex_nvme::tcp::Digests;

pub const SUBNQN: &str = "nqn.2026-11.io.duplex:test";
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
pub const BLOCKS: u64 = 2048;
pub const BS: u32 = 4096;

pub use duplex_tests::nvme_host::Host;

/// Connects an admin queue to the test subsystem as the allowed host.
pub fn admin(addr: SocketAddr, digests: Digests) -> (Host, u16) {
    Host::admin_as(addr, digests, SUBNQN, HOSTNQN)
}

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
            drive: None,
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
        drives: vec![],
        meta: None,
        cluster: None,
    }
}

/// The fabric on a thread plus a memory datapath. The datapath serves every volume id from a
/// disk of its own (`BLOCKS` blocks of `BS` bytes, made on first use), so a namespace's I/O
/// lands on the volume the topology or export table names.
pub struct Harness {
    pub addr: SocketAddr,
    /// A view of the shared pool (to count what is in use).
    pub pool: Pool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    fabric: Option<JoinHandle<()>>,
    dp_stop: Arc<AtomicBool>,
    /// Once set, the memory datapath answers every request as a fenced datapath does.
    dp_fenced: Arc<AtomicBool>,
    datapath: Option<JoinHandle<()>>,
}

impl Harness {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts the fabric with an exports region (and the doorbell its writer rings), as the
    /// service does: the table is read before the first host is served, then on every ring.
    pub fn start_with(exports: Option<(OwnedFd, Option<Doorbell>)>) -> Self {
        Self::start_full(exports, None)
    }

    /// [`Harness::start_with`] with the fabric's end of a reservation channel.
    pub fn start_full(
        exports: Option<(OwnedFd, Option<Doorbell>)>,
        resv: Option<duplex_ipc::resv::ResvChannel>,
    ) -> Self {
        Self::start_keyed(exports, resv, None)
    }

    /// [`Harness::start_full`] with the array's secrets key (hosts' DH-HMAC-CHAP secrets).
    pub fn start_keyed(
        exports: Option<(OwnedFd, Option<Doorbell>)>,
        resv: Option<duplex_ipc::resv::ResvChannel>,
        key: Option<duplex_ondisk::secrets::SecretsKey>,
    ) -> Self {
        Self::start_inner(exports, resv, key, false)
    }

    /// [`Harness::start_keyed`] with a listener that requires TLS.
    #[allow(dead_code)]
    pub fn start_tls(
        exports: Option<(OwnedFd, Option<Doorbell>)>,
        key: Option<duplex_ondisk::secrets::SecretsKey>,
    ) -> Self {
        Self::start_inner(exports, None, key, true)
    }

    fn start_inner(
        exports: Option<(OwnedFd, Option<Doorbell>)>,
        resv: Option<duplex_ipc::resv::ResvChannel>,
        key: Option<duplex_ondisk::secrets::SecretsKey>,
        tls: bool,
    ) -> Self {
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
        let dp_fenced = Arc::new(AtomicBool::new(false));
        let fenced2 = dp_fenced.clone();
        let datapath =
            std::thread::spawn(move || memory_datapath(dp_pool, dp_sq, dp_cq, stop2, fenced2));

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
                    tls,
                };
                let target = std::sync::Arc::new(Target::new(topology(), vec![port.clone()]));
                if tls {
                    target.set_tls(duplex_fabric::tls::TlsServer::new().expect("TLS"));
                }
                if let Some(key) = key {
                    target.set_secrets_key(key);
                }
                if let Some(ch) = resv {
                    target.set_resv_client(
                        duplex_fabric::resv_channel::ResvClient::new(ch).expect("resv client"),
                    );
                }
                if let Some((fd, bell)) = exports {
                    let region = ExportsRegion::attach(fd).expect("exports region");
                    let feed = ExportsFeed::new(region, bell).expect("exports feed");
                    feed.refresh(&target);
                    tokio::task::spawn_local(feed.run(target.clone()));
                }
                let l = Listener {
                    socket: tokio::net::TcpListener::from_std(listener).expect("listener"),
                    port,
                };
                server::serve(target, Some(backend), vec![l], Vec::new(), async {
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
            dp_fenced,
            datapath: Some(datapath),
        }
    }
}

impl Harness {
    /// From now on the datapath answers every request with `STATUS_FENCED`, as the real one
    /// does once a drive told it the peer preempted this node's key.
    pub fn fence_datapath(&self) {
        self.dp_fenced.store(true, Ordering::SeqCst);
    }

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
    fenced: Arc<AtomicBool>,
) {
    let mut disks: HashMap<u32, Vec<u8>> = HashMap::new();
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
            // A flush names no disk (it may name every volume: u32::MAX).
            let flush = d.opcode == desc::OP_FLUSH;
            let volume = if flush { u32::MAX } else { d.volume };
            let disk = disks.entry(volume).or_insert_with(|| {
                vec![
                    0u8;
                    if flush {
                        0
                    } else {
                        (BLOCKS * u64::from(BS)) as usize
                    }
                ]
            });
            d.status = if fenced.load(Ordering::SeqCst) {
                desc::STATUS_FENCED
            } else if off + len > disk.len() && !flush {
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

/// The metadata service's end of the reservation channel, in memory: applies the reservation
/// model to one state per namespace (no drives), answers every `error_every`th request with an
/// error (0: never), until dropped.
pub struct FakeMetadata {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The model's state by (subsystem, nsid), as committed.
    pub states: Arc<std::sync::Mutex<HashMap<(String, u32), duplex_nvme::resv::Reservations>>>,
    /// Requests answered.
    pub answered: Arc<std::sync::atomic::AtomicU64>,
}

impl FakeMetadata {
    pub fn start(ch: duplex_ipc::resv::ResvChannel, error_every: u64) -> Self {
        use duplex_ipc::exports::ExportRegistrant;
        use duplex_ipc::resv::*;
        use duplex_nvme::resv::{Acquire, HostCtrl, HostId, Register, Release};
        let stop = Arc::new(AtomicBool::new(false));
        let states: Arc<std::sync::Mutex<HashMap<(String, u32), duplex_nvme::resv::Reservations>>> =
            Arc::default();
        let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop2, states2, answered2) = (stop.clone(), states.clone(), answered.clone());
        let thread = std::thread::spawn(move || {
            let mut versions: HashMap<(String, u32), u64> = HashMap::new();
            while !stop2.load(Ordering::Relaxed) {
                let Ok(Some((id, req))) = ch.recv_request(Duration::from_millis(20)) else {
                    continue;
                };
                let n = answered2.fetch_add(1, Ordering::Relaxed) + 1;
                if error_every != 0 && n % error_every == 0 {
                    let _ = ch.send_reply(id, &ResvReply::Error("injected".into()));
                    continue;
                }
                let k = (req.subnqn.clone(), req.nsid);
                let mut all = states2.lock().expect("states");
                let m = all.entry(k.clone()).or_default();
                let mut next = m.clone();
                let who = HostCtrl {
                    host: HostId(req.host_id),
                    cntlid: req.cntlid,
                };
                let r = match &req.command {
                    ResvCommand::Register { cdw10, data } => {
                        Register::decode(*cdw10, data).and_then(|c| next.register(who, &c))
                    }
                    ResvCommand::Acquire { cdw10, data } => {
                        Acquire::decode(*cdw10, data).and_then(|c| next.acquire(who.host, &c))
                    }
                    ResvCommand::Release { cdw10, data } => {
                        Release::decode(*cdw10, data).and_then(|c| next.release(who.host, &c))
                    }
                    ResvCommand::SetPtpl(on) => {
                        next.set_ptpl(*on);
                        Ok(Default::default())
                    }
                };
                let (status, outcome) = match r {
                    Ok(o) => {
                        *m = next;
                        *versions.entry(k.clone()).or_default() += 1;
                        (0, o)
                    }
                    Err(s) => (s.0, Default::default()),
                };
                let st = m.state();
                let reply = ResvReply::Done(ResvDone {
                    status,
                    state: ResvStateMsg {
                        version: versions.get(&k).copied().unwrap_or(0),
                        generation: st.generation,
                        rtype: st.rtype.map_or(0, |t| t as u8),
                        ptpl: st.ptpl,
                        holder: st.holder.map_or([0; 16], |h| h.0),
                        registrants: st
                            .registrants
                            .iter()
                            .map(|g| ExportRegistrant {
                                host_id: g.host.0,
                                key: g.key,
                                cntlid: g.cntlid,
                            })
                            .collect(),
                    },
                    aborts: outcome
                        .abort
                        .iter()
                        .map(|c| ResvCtrl {
                            host_id: c.host.0,
                            cntlid: c.cntlid,
                        })
                        .collect(),
                    notices: outcome
                        .notices
                        .iter()
                        .map(|n| ResvNotice {
                            to: ResvCtrl {
                                host_id: n.to.host.0,
                                cntlid: n.to.cntlid,
                            },
                            kind: n.kind as u8,
                        })
                        .collect(),
                });
                drop(all);
                let _ = ch.send_reply(id, &reply);
            }
        });
        Self {
            stop,
            thread: Some(thread),
            states,
            answered,
        }
    }
}

impl Drop for FakeMetadata {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The exported subsystem (reservations are kept for exported namespaces only).
pub const RESV_SUBNQN: &str = "nqn.2026-12.io.duplex:resv";

/// A fabric exporting namespace 1 of [`RESV_SUBNQN`] to any host, with its reservation channel to
/// an in-memory metadata service (every `error_every`th answer an error).
impl Harness {
    pub fn with_reservations(error_every: u64) -> (Harness, FakeMetadata, ExportsRegion) {
        let region = ExportsRegion::create(1 << 20).expect("exports region");
        region
            .publish(&duplex_ipc::exports::ExportTable {
                generation: 1,
                subsystems: vec![duplex_ipc::exports::ExportSubsystem {
                    nqn: RESV_SUBNQN.into(),
                    serial: "resv1".into(),
                    model: "duplex resv".into(),
                    allow_any_host: true,
                    hosts: vec![],
                    secrets: vec![],
                    namespaces: vec![duplex_ipc::exports::ExportNamespace {
                        nsid: 1,
                        volume: 7,
                        block_size: BS,
                        blocks: BLOCKS,
                        nguid: [0x77; 16],
                        uuid: [0x78; 16],
                        ana_group: 1,
                    }],
                }],
                ana: vec![duplex_ipc::exports::AnaGroupState {
                    group: 1,
                    state: duplex_ipc::exports::AnaState::Optimized,
                }],
                reservations: vec![],
            })
            .expect("publish");
        let (fabric, metadata) = duplex_ipc::resv::ResvChannel::pair().expect("channel");
        let meta = FakeMetadata::start(metadata, error_every);
        let h = Harness::start_full(
            Some((region.region().try_clone_fd().expect("fd"), None)),
            Some(fabric),
        );
        (h, meta, region)
    }
}
