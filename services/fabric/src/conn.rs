//! One NVMe/TCP connection = one queue (admin or I/O) of one controller.
//!
//! States: `AwaitIcReq` → (ICReq/ICResp) → `AwaitConnect` → (Fabrics Connect) → `Admin` or
//! `Io` → closed. The reader (this task) parses PDUs. Reads and in-capsule writes start at once
//! and are finished by the datapath completion router (the fast path, [`crate::io::start`]);
//! every other command, and those when the pool or ring is full, runs as a task of its own. A
//! writer task owns the socket's write half and sends what commands queue in the connection's
//! [`Outbox`]. Host-to-controller data that did not fit in the capsule is pulled with R2T and
//! arrives as H2CData, which the reader routes to the waiting command by transfer tag.
//!
//! Bounds (a slow or hostile host cannot grow our memory, nor take what other hosts need): at
//! most `sqsize + 1` commands in flight per queue (more is a protocol error), in-capsule data ≤
//! [`IN_CAPSULE_DATA`], one transfer ≤ [`MAX_TRANSFER`] bytes, at most [`queue_budget`] pool
//! chunks held per queue (a read or write waits for its share before it allocates or pulls data
//! with R2T), an outgoing queue past [`TX_QUEUE`] PDUs stops the reader (a host that does not
//! read stalls its own commands, then its own socket), and a connection limit per process. Per
//! connection that is at most the budget, plus the PDUs of the commands in flight (two each) and
//! [`TX_QUEUE`] more, plus in-capsule data of the queued commands.
//!
//! Protocol violations (unknown PDU type, bad lengths, digest mismatch, H2CData outside its
//! R2T, …) get a C2HTermReq naming the fault, then the connection closes. Other connections are
//! untouched.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_ipc::control::RateLimiter;
use duplex_ipc::pool::{BufHandle, Piece};
use duplex_nvme::cmd::{ConnectCmd, ConnectData, Cqe, Sqe};
use duplex_nvme::spec::{admin, fctype, sgl};
use duplex_nvme::status::{generic, specific, Status};
use duplex_nvme::tcp::{self, fes, CommonHeader, Digests, Layout, PduError, PduType};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::backend::{Backend, Chain};
use crate::controller::{keep_alive_watchdog, Controller, Teardown, MAX_IO_QUEUES, QUEUE_ENTRIES};
use crate::target::{Port, Target};
use crate::{admin as admin_cmds, io as io_cmds};

/// In-capsule data accepted on every queue (bytes; IOCCSZ = 64 + this).
pub const IN_CAPSULE_DATA: usize = 8192;
/// Largest data transfer of one command (MDTS = 128 KiB) and MAXH2CDATA.
pub const MAX_TRANSFER: usize = 128 * 1024;
/// MDTS as reported: 2^5 × 4 KiB.
pub const MDTS: u8 = 5;
/// PDUs queued for sending on a connection past which its reader stops reading commands.
pub const TX_QUEUE: usize = 2 * QUEUE_ENTRIES as usize;
/// How long a new connection has to send ICReq, and a Connect after it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pool chunks one queue may hold at once: an eighth of the pool, and at least one largest
/// transfer.
pub fn queue_budget(backend: Option<&Backend>) -> usize {
    backend.map_or(0, |b| {
        let pool = b.pool();
        let per_transfer = MAX_TRANSFER.div_ceil(pool.chunk_size().max(1));
        (pool.capacity() as usize / 8).max(per_transfer)
    })
}

/// What a command produces.
#[derive(Debug, Default)]
pub struct Reply {
    /// Status.
    pub status: Status,
    /// Completion dword 0.
    pub dw0: u32,
    /// Completion dword 1.
    pub dw1: u32,
    /// Data for the host (sent as C2HData before the response).
    pub data: Option<Payload>,
}

/// Data a command returns to the host.
#[derive(Debug)]
pub enum Payload {
    /// Bytes the fabric built (Identify, log pages).
    Bytes(Vec<u8>),
    /// Read data still in the shared pool: sent from there (zero copy; copied into the PDU
    /// only to compute a data digest), and freed when dropped (also if the connection dies
    /// first).
    Chain(Chain),
}

/// What a connection's writer sends.
#[derive(Debug)]
pub enum Out {
    /// A whole PDU.
    Bytes(Vec<u8>),
    /// A CapsuleResp PDU (the writer encodes it).
    Resp(Cqe),
    /// The C2HData PDU of command `cid` whose data goes from the pool straight to the socket:
    /// the first `len` bytes of the chain, last PDU of the transfer, no data digest (PDUs with
    /// one are `Bytes`).
    Data {
        /// The command.
        cid: u16,
        /// The data.
        chain: Chain,
        /// Bytes of it to send.
        len: usize,
    },
}

/// PDUs a connection's commands queued for its writer. Pushing never waits: what bounds the
/// queue is the commands in flight (at most `sqsize + 1`, each queuing its data and response)
/// and the reader, which stops reading past [`TX_QUEUE`].
#[derive(Debug, Default)]
pub struct Outbox {
    queue: RefCell<VecDeque<Out>>,
    /// Something was queued, or the outbox closed.
    ready: Notify,
    /// The writer took what was queued.
    drained: Notify,
    closed: Cell<bool>,
}

impl Outbox {
    /// Queues `out`; `false` (and `out` is dropped, its chain freed) once closed.
    pub fn push(&self, out: Out) -> bool {
        if self.closed.get() {
            return false;
        }
        self.queue.borrow_mut().push_back(out);
        self.ready.notify_one();
        true
    }

    /// Refuses everything from now on; the writer sends what is queued, then stops.
    fn close(&self) {
        self.closed.set(true);
        self.ready.notify_one();
    }

    /// Closes and drops what is queued (the socket failed).
    fn abandon(&self) {
        self.close();
        let dropped = std::mem::take(&mut *self.queue.borrow_mut());
        drop(dropped);
        self.drained.notify_waiters();
    }

    fn pop(&self) -> Option<Out> {
        self.queue.borrow_mut().pop_front()
    }

    /// Waits until the writer has caught up to below [`TX_QUEUE`] (or the outbox closed).
    async fn room(&self) {
        loop {
            let drained = self.drained.notified();
            if self.queue.borrow().len() < TX_QUEUE || self.closed.get() {
                return;
            }
            drained.await;
        }
    }
}

/// The command ids outstanding on a queue.
struct CidSet {
    bits: Box<[u64]>,
    len: usize,
}

impl CidSet {
    fn new() -> Self {
        Self {
            bits: vec![0; 1 << 10].into_boxed_slice(),
            len: 0,
        }
    }

    /// Adds `cid`; `false` if it is already in.
    fn insert(&mut self, cid: u16) -> bool {
        let (w, b) = (usize::from(cid >> 6), 1u64 << (cid & 63));
        if self.bits[w] & b != 0 {
            return false;
        }
        self.bits[w] |= b;
        self.len += 1;
        true
    }

    fn remove(&mut self, cid: u16) {
        let (w, b) = (usize::from(cid >> 6), 1u64 << (cid & 63));
        if self.bits[w] & b != 0 {
            self.bits[w] &= !b;
            self.len -= 1;
        }
    }
}

impl Reply {
    /// A bare status.
    pub fn status(status: Status) -> Self {
        Self {
            status,
            ..Self::default()
        }
    }
    /// Success with dword 0.
    pub fn ok(dw0: u32) -> Self {
        Self {
            dw0,
            ..Self::default()
        }
    }
    /// Success with data.
    pub fn data(data: Vec<u8>) -> Self {
        Self {
            data: Some(Payload::Bytes(data)),
            ..Self::default()
        }
    }
}

impl From<Status> for Reply {
    fn from(s: Status) -> Self {
        Self::status(s)
    }
}

/// Shared by every connection of the process.
#[derive(Debug)]
pub struct Shared {
    /// The target.
    pub target: Rc<Target>,
    /// The datapath channel (absent in discovery-only tests).
    pub backend: Option<Rc<Backend>>,
    /// Live connections.
    pub connections: Cell<usize>,
    /// Connection limit.
    pub max_connections: usize,
    /// Rate limit for warnings a host can trigger.
    pub warn_limit: RefCell<RateLimiter>,
}

impl Shared {
    /// Logs a failed command (rate limited, at info: hosts probe for optional features).
    pub fn note(&self, peer: SocketAddr, what: &str) {
        if let Some(suppressed) = self.warn_limit.borrow_mut().check(Instant::now()) {
            tracing::info!(%peer, suppressed, "{what}");
        }
    }

    /// Logs a host-triggered warning, rate limited.
    pub fn warn(&self, peer: SocketAddr, what: &str) {
        if let Some(suppressed) = self.warn_limit.borrow_mut().check(Instant::now()) {
            tracing::warn!(%peer, suppressed, "{what}");
        }
    }
}

/// What kind of queue a connection became.
#[derive(Debug, Clone)]
pub enum Role {
    /// Before Connect.
    Unconnected,
    /// The admin queue of a controller.
    Admin(Rc<Controller>),
    /// An I/O queue of a controller.
    Io(Rc<Controller>, u16),
}

/// How host data for a command arrives.
#[derive(Debug)]
pub enum DataIn {
    /// No data.
    None,
    /// In the capsule.
    InCapsule(Vec<u8>),
    /// To be pulled with R2T: this many bytes.
    Transfer(usize),
}

struct Transfer {
    cccid: u16,
    next: usize,
    end: usize,
    dest: Dest,
    done: Option<oneshot::Sender<Dest>>,
}

/// Where pulled host data goes.
enum Dest {
    /// A buffer of the fabric's (admin and small commands).
    Bytes(Vec<u8>),
    /// Straight into a pool chain the command holds, at the data offset (writes); `failed`
    /// if the pool refused a copy.
    Chain {
        /// The chain.
        head: BufHandle,
        /// A copy failed (the command fails; the stream stays in step).
        failed: bool,
    },
}

/// The per-connection queue state shared with command tasks.
pub struct Queue {
    /// Process-wide state.
    pub shared: Rc<Shared>,
    /// Peer address.
    pub peer: SocketAddr,
    /// Local address.
    pub local: SocketAddr,
    /// The listener's port.
    pub port: Port,
    /// Negotiated digests.
    pub digests: Digests,
    /// Host PDU data alignment.
    pub hpda: u8,
    /// Role after Connect.
    pub role: RefCell<Role>,
    /// Queue id.
    pub qid: Cell<u16>,
    sqsize: Cell<u16>,
    sqhd: Cell<u16>,
    sqflow_disabled: Cell<bool>,
    outstanding: RefCell<CidSet>,
    transfers: RefCell<HashMap<u16, Transfer>>,
    next_ttag: Cell<u16>,
    outbox: Rc<Outbox>,
    /// Pool chunks this queue may hold at once (see [`queue_budget`]).
    budget: Arc<Semaphore>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("peer", &self.peer)
            .field("qid", &self.qid.get())
            .finish_non_exhaustive()
    }
}

impl Queue {
    /// The controller, once connected.
    pub fn controller(&self) -> Option<Rc<Controller>> {
        match &*self.role.borrow() {
            Role::Admin(c) | Role::Io(c, _) => Some(c.clone()),
            Role::Unconnected => None,
        }
    }

    /// Waits until this queue may hold `bytes` more of the shared pool; the permit gives them
    /// back when dropped. This is what keeps one slow or stalled host from taking the whole
    /// pool: its commands wait here, then its queue fills, then its socket.
    pub async fn reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let n = self.chunks(bytes)?;
        Arc::clone(&self.budget).acquire_many_owned(n).await.ok()
    }

    /// [`Queue::reserve`] if the share is there now.
    pub fn try_reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let n = self.chunks(bytes)?;
        Arc::clone(&self.budget).try_acquire_many_owned(n).ok()
    }

    fn chunks(&self, bytes: usize) -> Option<u32> {
        let chunk = self.shared.backend.as_ref()?.pool().chunk_size().max(1);
        u32::try_from(bytes.div_ceil(chunk)).ok()
    }

    /// Queues a PDU for sending. Fails only if the connection is closing.
    pub fn send(&self, pdu: Vec<u8>) -> bool {
        self.outbox.push(Out::Bytes(pdu))
    }

    /// Pulls `len` bytes of host data for command `cid` with R2T (one R2T per window of at
    /// most [`MAX_TRANSFER`] bytes, one outstanding at a time).
    pub async fn pull(&self, cid: u16, len: usize) -> Result<Vec<u8>, Status> {
        match self
            .pull_to(cid, len, Dest::Bytes(Vec::with_capacity(len)))
            .await?
        {
            Dest::Bytes(b) => Ok(b),
            Dest::Chain { .. } => Err(generic::INTERNAL),
        }
    }

    /// Pulls `len` bytes of host data for command `cid` with R2T straight into pool chain
    /// `head` (which holds at least `len` bytes), and sets its used length.
    pub async fn pull_into(&self, cid: u16, head: BufHandle, len: usize) -> Result<(), Status> {
        let dest = Dest::Chain {
            head,
            failed: false,
        };
        match self.pull_to(cid, len, dest).await? {
            Dest::Chain { failed: false, .. } => {}
            _ => return Err(generic::INTERNAL),
        }
        let pool = self
            .shared
            .backend
            .as_ref()
            .ok_or(generic::INTERNAL)?
            .pool();
        pool.set_chain_len(head, len).map_err(|e| {
            tracing::error!(error = %e, "cannot set the length of a pulled chain");
            generic::INTERNAL
        })
    }

    async fn pull_to(&self, cid: u16, len: usize, mut dest: Dest) -> Result<Dest, Status> {
        let mut start = 0;
        while start < len {
            let n = (len - start).min(MAX_TRANSFER);
            let ttag = self.alloc_ttag();
            let (tx, rx) = oneshot::channel();
            self.transfers.borrow_mut().insert(
                ttag,
                Transfer {
                    cccid: cid,
                    next: start,
                    end: start + n,
                    dest,
                    done: Some(tx),
                },
            );
            let r2t = tcp::r2t_pdu(
                &tcp::R2t {
                    cccid: cid,
                    ttag,
                    r2to: start as u32,
                    r2tl: n as u32,
                },
                self.digests,
            );
            if !self.send(r2t) {
                self.transfers.borrow_mut().remove(&ttag);
                return Err(generic::DATA_TRANSFER);
            }
            dest = rx.await.map_err(|_| generic::DATA_TRANSFER)?;
            start += n;
        }
        Ok(dest)
    }

    fn alloc_ttag(&self) -> u16 {
        let transfers = self.transfers.borrow();
        loop {
            let t = self.next_ttag.get();
            self.next_ttag.set(if t >= 0xFFFE { 0 } else { t + 1 });
            if !transfers.contains_key(&t) {
                return t;
            }
        }
    }

    /// Host data of a command, from the capsule or pulled.
    pub async fn host_data(&self, cid: u16, data: DataIn) -> Result<Vec<u8>, Status> {
        match data {
            DataIn::None => Ok(Vec::new()),
            DataIn::InCapsule(d) => Ok(d),
            DataIn::Transfer(n) => self.pull(cid, n).await,
        }
    }

    fn advance_sqhd(&self) {
        let size = u32::from(self.sqsize.get()) + 1;
        self.sqhd
            .set(((u32::from(self.sqhd.get()) + 1) % size) as u16);
    }

    /// Sends the data (if any) and the response of command `cid`.
    pub fn complete(&self, cid: u16, reply: Reply, sgl_len: usize) {
        let mut status = reply.status;
        if let Some(data) = reply.data.filter(|_| status.is_success() && sgl_len > 0) {
            let sent = match data {
                // Zero copy: the writer sends the header, then the data from the pool. Read
                // data must be exactly what the SGL asked for.
                Payload::Chain(c) if !self.digests.data => {
                    let whole = c.bytes() == Some(sgl_len);
                    if whole {
                        let out = Out::Data {
                            cid,
                            chain: c,
                            len: sgl_len,
                        };
                        if !self.outbox.push(out) {
                            return;
                        }
                    }
                    whole
                }
                data => {
                    let h = tcp::DataHeader {
                        cccid: cid,
                        ttag: 0,
                        datao: 0,
                        datal: sgl_len as u32,
                    };
                    let pdu = tcp::data_pdu(
                        PduType::C2HData,
                        &h,
                        tcp::FLAG_DATA_LAST,
                        self.digests,
                        self.hpda,
                    );
                    match copy_data(pdu, data, sgl_len, self.digests.data) {
                        Some(pdu) => {
                            if !self.send(pdu) {
                                return;
                            }
                            true
                        }
                        None => false,
                    }
                }
            };
            if !sent {
                status = generic::INTERNAL;
            }
        }
        let cqe = Cqe {
            dw0: reply.dw0,
            dw1: reply.dw1,
            sqhd: if self.sqflow_disabled.get() {
                0xFFFF
            } else {
                self.sqhd.get()
            },
            sqid: self.qid.get(),
            cid,
            status: status.cqe_bits(),
        };
        // The command leaves the queue before its response can reach the host, so the host
        // may reuse the id at once.
        self.outstanding.borrow_mut().remove(cid);
        self.outbox.push(Out::Resp(cqe));
    }
}

/// A data PDU with its data copied in after `pdu` (the header): exactly `sgl_len` bytes (a
/// shorter payload, Identify data for a larger SGL, is padded with zeroes), then the data
/// digest if `digest`. `None` if read data is not exactly `sgl_len` bytes.
fn copy_data(mut pdu: Vec<u8>, data: Payload, sgl_len: usize, digest: bool) -> Option<Vec<u8>> {
    let start = pdu.len();
    pdu.reserve(sgl_len + tcp::DIGEST_LEN);
    let filled = match data {
        Payload::Bytes(d) => {
            pdu.extend_from_slice(&d[..d.len().min(sgl_len)]);
            true
        }
        Payload::Chain(c) => c.append_to(&mut pdu) == Some(sgl_len),
    };
    if !filled {
        return None;
    }
    pdu.resize(start + sgl_len, 0);
    if digest {
        let d = tcp::digest(&pdu[start..]);
        pdu.extend_from_slice(&d);
    }
    Some(pdu)
}

/// A received PDU.
struct Pdu {
    layout: Layout,
    header: Vec<u8>,
    data: Vec<u8>,
}

enum ReadError {
    /// The peer closed or the socket failed.
    Io,
    /// A protocol violation; the header bytes read so far are quoted in the TermReq.
    Proto(PduError, Vec<u8>),
}

impl From<std::io::Error> for ReadError {
    fn from(_: std::io::Error) -> Self {
        Self::Io
    }
}

/// Buffers a connection reads PDUs into, handed back after each PDU
/// ([`Spare::give_back`]) so that reading a PDU costs no allocation.
#[derive(Default)]
struct Spare {
    header: Vec<u8>,
    data: Vec<u8>,
}

impl Spare {
    fn give_back(&mut self, pdu: Pdu) {
        self.header = pdu.header;
        self.data = pdu.data;
    }
}

/// Reads one PDU into `spare`'s buffers (taken).
async fn read_pdu(
    rd: &mut BufReader<OwnedReadHalf>,
    digests: Digests,
    max_data: usize,
    spare: &mut Spare,
) -> Result<Pdu, ReadError> {
    let mut ch = [0u8; tcp::CH_LEN];
    rd.read_exact(&mut ch).await?;
    let common = CommonHeader::parse(&ch);
    let layout = tcp::layout(&common, digests, true, max_data)
        .map_err(|e| ReadError::Proto(e, ch.to_vec()))?;
    let mut header = std::mem::take(&mut spare.header);
    header.clear();
    header.extend_from_slice(&ch);
    header.resize(tcp::CH_LEN + layout.head_rest(), 0);
    rd.read_exact(&mut header[tcp::CH_LEN..]).await?;
    if layout.header_digest {
        let got = &header[layout.hlen..layout.hlen + tcp::DIGEST_LEN];
        if tcp::digest(&header[..layout.hlen]) != got {
            return Err(ReadError::Proto(
                PduError::new(fes::HEADER_DIGEST, "header digest mismatch"),
                header[..layout.hlen].to_vec(),
            ));
        }
    }
    header.truncate(layout.hlen);
    let mut data = std::mem::take(&mut spare.data);
    data.clear();
    data.reserve(layout.data_len);
    while data.len() < layout.data_len {
        // read_buf fills the spare capacity without zeroing it first.
        let want = (layout.data_len - data.len()) as u64;
        if (&mut *rd).take(want).read_buf(&mut data).await? == 0 {
            return Err(ReadError::Io);
        }
    }
    if layout.data_digest {
        let mut d = [0u8; 4];
        rd.read_exact(&mut d).await?;
        if tcp::digest(&data) != d {
            // NVMe/TCP 1.0 has no fatal error status for data digests; 03h (digest error)
            // with FEI pointing at the data digest tells it apart from a header digest.
            return Err(ReadError::Proto(
                PduError {
                    fes: fes::HEADER_DIGEST,
                    fei: layout.plen as u32 - 4,
                    what: "data digest mismatch",
                },
                header,
            ));
        }
    }
    Ok(Pdu {
        layout,
        header,
        data,
    })
}

/// Serves one accepted connection to its end.
pub async fn serve(stream: TcpStream, shared: Rc<Shared>, port: Port) {
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let local = stream.local_addr().unwrap_or(port.addr);
    if shared.connections.get() >= shared.max_connections {
        shared.warn(peer, "connection limit reached: refusing a connection");
        return;
    }
    let _ = stream.set_nodelay(true);
    shared.connections.set(shared.connections.get() + 1);
    let span = tracing::info_span!("conn", %peer, port = port.id);
    let _enter = span.enter();
    tracing::debug!("connection accepted");
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let result = handshake(&mut rd, wr, &shared, peer, local, port).await;
    if let Some((queue, writer)) = result {
        run(rd, queue, writer).await;
    }
    shared.connections.set(shared.connections.get() - 1);
    tracing::debug!("connection closed");
}

type Writer = tokio::task::JoinHandle<()>;

/// ICReq/ICResp. On a protocol error, a C2HTermReq is sent and the connection closes.
async fn handshake(
    rd: &mut BufReader<OwnedReadHalf>,
    mut wr: OwnedWriteHalf,
    shared: &Rc<Shared>,
    peer: SocketAddr,
    local: SocketAddr,
    port: Port,
) -> Option<(Rc<Queue>, Writer)> {
    let first = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        read_pdu(rd, Digests::default(), 0, &mut Spare::default()),
    )
    .await;
    let fail = |e: PduError, quote: &[u8]| tcp::term_req(PduType::C2HTermReq, &e, quote);
    let icreq = match first {
        Err(_) => {
            shared.warn(peer, "no ICReq within the handshake timeout: closing");
            return None;
        }
        Ok(Err(ReadError::Io)) => return None,
        Ok(Err(ReadError::Proto(e, quote))) => {
            shared.warn(peer, &format!("bad first PDU: {e}"));
            let _ = wr.write_all(&fail(e, &quote)).await;
            return None;
        }
        Ok(Ok(pdu)) if pdu.layout.pdu_type != PduType::IcReq => {
            let e = PduError::new(fes::PDU_SEQUENCE, "first PDU is not ICReq");
            shared.warn(peer, &e.to_string());
            let _ = wr.write_all(&fail(e, &pdu.header)).await;
            return None;
        }
        Ok(Ok(pdu)) => match tcp::IcReq::parse(&pdu.header) {
            Ok(r) if r.pfv != 0 => {
                let e = PduError {
                    fes: fes::UNSUPPORTED_PARAMETER,
                    fei: 8,
                    what: "unsupported PDU format version",
                };
                let _ = wr.write_all(&fail(e, &pdu.header)).await;
                return None;
            }
            Ok(r) if r.hpda > 31 => {
                let e = PduError::field(10, "HPDA out of range");
                let _ = wr.write_all(&fail(e, &pdu.header)).await;
                return None;
            }
            Ok(r) => r,
            Err(e) => {
                shared.warn(peer, &format!("bad ICReq: {e}"));
                let _ = wr.write_all(&fail(e, &pdu.header)).await;
                return None;
            }
        },
    };
    let resp = tcp::IcResp {
        pfv: 0,
        cpda: 0,
        digests: icreq.digests,
        maxh2cdata: MAX_TRANSFER as u32,
    };
    if wr.write_all(&resp.encode()).await.is_err() {
        return None;
    }
    tracing::debug!(digests = ?icreq.digests, hpda = icreq.hpda, "ICReq accepted");
    let outbox = Rc::new(Outbox::default());
    let writer = tokio::task::spawn_local(write_loop(
        wr,
        Rc::clone(&outbox),
        Gather::new(icreq.digests, icreq.hpda),
    ));
    let queue = Rc::new(Queue {
        shared: shared.clone(),
        peer,
        local,
        port,
        digests: icreq.digests,
        hpda: icreq.hpda,
        role: RefCell::new(Role::Unconnected),
        qid: Cell::new(0),
        sqsize: Cell::new(31),
        sqhd: Cell::new(0),
        sqflow_disabled: Cell::new(false),
        outstanding: RefCell::new(CidSet::new()),
        transfers: RefCell::new(HashMap::new()),
        next_ttag: Cell::new(0),
        outbox,
        budget: Arc::new(Semaphore::new(queue_budget(shared.backend.as_deref()))),
    });
    Some((queue, writer))
}

/// A gathered piece of the writer's next send.
enum Seg {
    /// Bytes `[start, end)` of the gather buffer.
    Buf(usize, usize),
    /// The first `len` bytes of a chain (freed once sent).
    Chain(Chain, usize),
}

/// What the writer has gathered for its next send.
struct Gather {
    buf: Vec<u8>,
    segs: Vec<Seg>,
    bytes: usize,
    digests: Digests,
    hpda: u8,
}

impl Gather {
    /// Gathers no more than this before sending.
    const MAX_BYTES: usize = 256 * 1024;
    const MAX_SEGS: usize = 256;

    /// Encodes PDUs with `digests`, aligning C2HData's data to `hpda`.
    fn new(digests: Digests, hpda: u8) -> Self {
        Self {
            buf: Vec::new(),
            segs: Vec::new(),
            bytes: 0,
            digests,
            hpda,
        }
    }

    fn push(&mut self, out: Out) {
        let start = self.buf.len();
        match out {
            Out::Bytes(pdu) => self.buf.extend_from_slice(&pdu),
            Out::Resp(cqe) => tcp::capsule_resp_into(&mut self.buf, &cqe, self.digests),
            Out::Data { cid, chain, len } => {
                let h = tcp::DataHeader {
                    cccid: cid,
                    ttag: 0,
                    datao: 0,
                    datal: len as u32,
                };
                let header = Digests {
                    data: false,
                    ..self.digests
                };
                tcp::data_pdu_into(
                    &mut self.buf,
                    PduType::C2HData,
                    &h,
                    tcp::FLAG_DATA_LAST,
                    header,
                    self.hpda,
                );
                self.appended(start);
                self.segs.push(Seg::Chain(chain, len));
                self.bytes += len;
                return;
            }
        }
        self.appended(start);
    }

    /// Counts the bytes appended to the buffer since `start`, extending the last buffer piece
    /// if it ends there.
    fn appended(&mut self, start: usize) {
        self.bytes += self.buf.len() - start;
        if let Some(Seg::Buf(_, end)) = self.segs.last_mut() {
            if *end == start {
                *end = self.buf.len();
                return;
            }
        }
        self.segs.push(Seg::Buf(start, self.buf.len()));
    }

    fn full(&self) -> bool {
        self.bytes >= Self::MAX_BYTES || self.segs.len() >= Self::MAX_SEGS
    }

    /// Sends everything gathered, waiting for the socket to take it, then starts afresh (the
    /// chains are freed).
    async fn send(&mut self, sock: &TcpStream) -> std::io::Result<()> {
        use std::os::fd::AsFd;
        let pool = self.segs.iter().find_map(|s| match s {
            Seg::Chain(c, _) => Some(c.pool()),
            Seg::Buf(..) => None,
        });
        let pieces: Vec<Piece<'_>> = self
            .segs
            .iter()
            .map(|s| match s {
                Seg::Buf(a, b) => Piece::Bytes(&self.buf[*a..*b]),
                Seg::Chain(c, len) => c.piece(*len),
            })
            .collect();
        let mut done = 0;
        while done < self.bytes {
            let r = match pool {
                None => sock.try_write(&self.buf[done..]),
                Some(pool) => sock.try_io(tokio::io::Interest::WRITABLE, || {
                    pool.send_pieces(sock.as_fd(), &pieces, done)
                }),
            };
            match r {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => sock.writable().await?,
                Err(e) => return Err(e),
            }
        }
        drop(pieces);
        self.buf.clear();
        self.segs.clear();
        self.bytes = 0;
        Ok(())
    }
}

/// Sends what the connection's commands queue, in order. Everything ready is gathered (PDUs
/// into one buffer, read data as pieces of the pool) and leaves in one `sendmsg` when nothing
/// more is ready or enough is gathered: the data of reads goes from the pool straight to the
/// socket. Ends once the outbox is closed and empty, or the socket fails (then what is queued
/// is dropped and nothing more is taken).
async fn write_loop(mut wr: OwnedWriteHalf, outbox: Rc<Outbox>, mut gather: Gather) {
    loop {
        let ready = outbox.ready.notified();
        let Some(first) = outbox.pop() else {
            if outbox.closed.get() {
                break;
            }
            ready.await;
            continue;
        };
        gather.push(first);
        while let Some(out) = outbox.pop() {
            if gather.full() && gather.send(wr.as_ref()).await.is_err() {
                outbox.abandon();
                return;
            }
            gather.push(out);
        }
        outbox.drained.notify_waiters();
        if gather.send(wr.as_ref()).await.is_err() {
            outbox.abandon();
            return;
        }
    }
    let _ = wr.shutdown().await;
}

async fn run(mut rd: BufReader<OwnedReadHalf>, queue: Rc<Queue>, writer: Writer) {
    let mut tasks = JoinSet::new();
    let mut spare = Spare::default();
    let mut teardown: Option<watch::Receiver<Teardown>> = None;
    let max_data = IN_CAPSULE_DATA.max(MAX_TRANSFER);
    let connect_deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let target = queue.shared.target.clone();
    let shutdown = target.shutdown.notified();
    tokio::pin!(shutdown);
    let term: Option<Vec<u8>> = loop {
        let torn = async {
            match teardown.as_mut() {
                Some(w) => {
                    let _ = w.wait_for(|t| *t != Teardown::Alive).await;
                }
                None => {
                    if matches!(*queue.role.borrow(), Role::Unconnected) {
                        tokio::time::sleep_until(connect_deadline).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        let next = async {
            // A host that does not read its responses stops being read.
            queue.outbox.room().await;
            read_pdu(&mut rd, queue.digests, max_data, &mut spare).await
        };
        let pdu = tokio::select! {
            r = next => r,
            _ = torn => {
                if teardown.is_none() {
                    queue.shared.warn(queue.peer, "no Connect within the handshake timeout: closing");
                }
                break None;
            }
            _ = &mut shutdown => break None,
        };
        // Reap finished command tasks without waiting. (Never a select branch: losing that
        // race would drop `read_pdu` halfway through a PDU and desynchronise the stream.)
        while tasks.try_join_next().is_some() {}
        if queue.outbox.closed.get() {
            // The writer failed: the socket is gone.
            break None;
        }
        let mut pdu = match pdu {
            Ok(p) => p,
            Err(ReadError::Io) => break None,
            Err(ReadError::Proto(e, quote)) => {
                queue.shared.warn(queue.peer, &e.to_string());
                break Some(tcp::term_req(PduType::C2HTermReq, &e, &quote));
            }
        };
        if let Some(c) = queue.controller() {
            c.touch();
        }
        let result = match pdu.layout.pdu_type {
            PduType::CapsuleCmd => on_capsule(&queue, &mut tasks, &mut pdu),
            PduType::H2CData => on_h2c_data(&queue, &pdu),
            PduType::H2CTermReq => {
                let (fes, fei) = tcp::parse_term_req(&pdu.header).unwrap_or((0, 0));
                tracing::info!(fes, fei, "host terminated the connection (H2CTermReq)");
                break None;
            }
            _ => Err(PduError::new(
                fes::PDU_SEQUENCE,
                "unexpected PDU type after ICReq",
            )),
        };
        if let Err(e) = result {
            queue.shared.warn(queue.peer, &e.to_string());
            break Some(tcp::term_req(PduType::C2HTermReq, &e, &pdu.header));
        }
        spare.give_back(pdu);
        if teardown.is_none() {
            if let Some(c) = queue.controller() {
                teardown = Some(c.watch());
            }
        }
    };
    // Stop every command of this queue; their buffers return to the pool when the datapath
    // completes them (the backend frees completions nobody waits for).
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    queue.transfers.borrow_mut().clear();
    if let Some(t) = term {
        queue.send(t);
    }
    // The writer sends what is queued, then ends. Fast-path commands still in the datapath
    // complete into the closed outbox, which drops their data.
    queue.outbox.close();
    let role = queue.role.replace(Role::Unconnected);
    match role {
        Role::Admin(c) => {
            c.tear_down(Teardown::AdminGone);
            queue.shared.target.remove_controller(c.cntlid);
            tracing::info!(cntlid = c.cntlid, host = %c.hostnqn, "controller removed");
        }
        Role::Io(c, qid) => {
            c.connected.borrow_mut().remove(&qid);
        }
        Role::Unconnected => {}
    }
    drop(queue);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

/// Handles a command capsule: checks it, finds its data, starts its task.
fn on_capsule(queue: &Rc<Queue>, tasks: &mut JoinSet<()>, pdu: &mut Pdu) -> Result<(), PduError> {
    let mut raw = [0u8; 64];
    raw.copy_from_slice(&pdu.header[tcp::CH_LEN..tcp::CH_LEN + 64]);
    let sqe = Sqe::from_bytes(&raw);
    if pdu.data.len() > IN_CAPSULE_DATA.max(duplex_nvme::cmd::CONNECT_DATA_LEN) {
        return Err(PduError::new(
            fes::DATA_LIMIT,
            "in-capsule data larger than IOCCSZ",
        ));
    }
    let limit = usize::from(queue.sqsize.get()) + 1;
    {
        let mut out = queue.outstanding.borrow_mut();
        if out.len >= limit {
            return Err(PduError::new(
                fes::PDU_SEQUENCE,
                "more commands outstanding than the queue has entries",
            ));
        }
        if !out.insert(sqe.cid) {
            // A command id in use: answer without disturbing the running command.
            let q = queue.clone();
            queue.advance_sqhd();
            tasks.spawn_local(async move {
                let cqe = Cqe {
                    sqhd: q.sqhd.get(),
                    sqid: q.qid.get(),
                    cid: sqe.cid,
                    status: generic::CID_CONFLICT.cqe_bits(),
                    ..Cqe::default()
                };
                q.outbox.push(Out::Resp(cqe));
            });
            return Ok(());
        }
    }
    queue.advance_sqhd();
    let sgl = sqe.sgl();
    let (kind, sgl_len, bad) = classify_data(&sqe, sgl, pdu.data.len());
    if bad.is_none() && io_cmds::start(queue, &sqe, &pdu.data, sgl_len) {
        return Ok(());
    }
    let data = match kind {
        DataKind::None => DataIn::None,
        DataKind::InCapsule => DataIn::InCapsule(std::mem::take(&mut pdu.data)),
        DataKind::Transfer(n) => DataIn::Transfer(n),
    };
    let q = queue.clone();
    tasks.spawn_local(async move {
        let reply = match bad {
            Some(status) => Reply::status(status),
            None => execute(&q, sqe, data).await,
        };
        if !reply.status.is_success() && q.qid.get() == 0 {
            q.shared.note(
                q.peer,
                &format!(
                    "admin command {:#04x} (nsid {:#x}, cdw10 {:#x}, cdw11 {:#x}, cdw12 {:#x}, cdw14 {:#x}, sgl {} bytes) failed: {}",
                    sqe.opcode,
                    sqe.nsid,
                    sqe.cdw10,
                    sqe.cdw11,
                    sqe.cdw12,
                    sqe.cdw14,
                    sqe.sgl().length,
                    reply.status
                ),
            );
        }
        q.complete(sqe.cid, reply, sgl_len);
    });
    Ok(())
}

/// Where a command's data is.
enum DataKind {
    None,
    InCapsule,
    Transfer(usize),
}

/// Works out from SGL descriptor 1 (and `capsule`, the bytes of in-capsule data) where the
/// command's data is, and how many bytes of data a read returns. An SGL the command cannot use
/// completes it with an error status.
fn classify_data(
    sqe: &Sqe,
    s: duplex_nvme::cmd::Sgl,
    capsule: usize,
) -> (DataKind, usize, Option<Status>) {
    let len = s.length as usize;
    if capsule > 0 {
        if s.id != sgl::DATA_BLOCK_OFFSET || s.address != 0 || len != capsule {
            return (DataKind::None, 0, Some(generic::SGL_LENGTH));
        }
        return (DataKind::InCapsule, 0, None);
    }
    if len == 0 {
        return (DataKind::None, 0, None);
    }
    if s.id != sgl::TRANSPORT_DATA_BLOCK {
        let status = if s.id == sgl::DATA_BLOCK_OFFSET {
            generic::SGL_LENGTH
        } else {
            generic::SGL_TYPE
        };
        return (DataKind::None, 0, Some(status));
    }
    if len > MAX_TRANSFER.max(duplex_nvme::cmd::CONNECT_DATA_LEN) {
        return (DataKind::None, 0, Some(generic::INVALID_FIELD));
    }
    if host_to_controller(sqe) {
        (DataKind::Transfer(len), 0, None)
    } else {
        (DataKind::None, len, None)
    }
}

/// Whether a command moves data from host to controller (bit 0 of the opcode, for fabrics
/// commands bit 0 of the command type).
fn host_to_controller(sqe: &Sqe) -> bool {
    if sqe.opcode == admin::FABRICS {
        sqe.fctype() & 1 != 0
    } else {
        sqe.opcode & 1 != 0
    }
}

async fn execute(q: &Rc<Queue>, sqe: Sqe, data: DataIn) -> Reply {
    if sqe.psdt() == 0 {
        return Reply::status(generic::INVALID_FIELD);
    }
    let role = q.role.borrow().clone();
    match role {
        Role::Unconnected => {
            if sqe.opcode == admin::FABRICS && sqe.fctype() == fctype::CONNECT {
                connect(q, sqe, data).await
            } else {
                Reply::status(generic::SEQUENCE)
            }
        }
        Role::Admin(ctrl) => {
            if sqe.opcode == admin::FABRICS {
                fabrics(q, &ctrl, sqe).await
            } else if !ctrl.ready() {
                Reply::status(generic::SEQUENCE)
            } else {
                admin_cmds::execute(q, &ctrl, sqe, data).await
            }
        }
        Role::Io(ctrl, _) => {
            if sqe.opcode == admin::FABRICS {
                if sqe.fctype() == fctype::CONNECT {
                    Reply::status(generic::SEQUENCE)
                } else {
                    Reply::status(generic::INVALID_OPCODE)
                }
            } else {
                io_cmds::execute(q, &ctrl, sqe, data).await
            }
        }
    }
}

/// Fabrics commands on a connected admin queue: Property Get/Set, Disconnect.
async fn fabrics(_q: &Rc<Queue>, ctrl: &Rc<Controller>, sqe: Sqe) -> Reply {
    match sqe.fctype() {
        fctype::PROPERTY_GET => {
            let eight = sqe.cdw10 & 7 == 1;
            match ctrl.property(sqe.cdw11) {
                Some(v) => Reply {
                    dw0: v as u32,
                    dw1: if eight { (v >> 32) as u32 } else { 0 },
                    ..Reply::default()
                },
                None => Reply::status(generic::INVALID_FIELD),
            }
        }
        fctype::PROPERTY_SET => {
            let v = u64::from(sqe.cdw12) | (u64::from(sqe.cdw13) << 32);
            if ctrl.set_property(sqe.cdw11, v) {
                Reply::ok(0)
            } else {
                Reply::status(generic::INVALID_FIELD)
            }
        }
        fctype::CONNECT => Reply::status(generic::SEQUENCE),
        _ => Reply::status(generic::INVALID_OPCODE),
    }
}

/// Invalid Parameter in the Connect data at byte `offset` (IATTR = 1).
fn bad_data(status: Status, offset: u32) -> Reply {
    Reply {
        status,
        dw0: (1 << 16) | offset,
        ..Reply::default()
    }
}

/// Invalid Parameter in the Connect command at byte `offset` (IATTR = 0).
fn bad_field(offset: u32) -> Reply {
    Reply {
        status: specific::CONNECT_INVALID_PARAM,
        dw0: offset,
        ..Reply::default()
    }
}

async fn connect(q: &Rc<Queue>, sqe: Sqe, data: DataIn) -> Reply {
    let cmd = ConnectCmd::from_sqe(&sqe);
    if cmd.recfmt != 0 {
        return Reply::status(specific::CONNECT_FORMAT);
    }
    let raw = match q.host_data(sqe.cid, data).await {
        Ok(d) => d,
        Err(s) => return Reply::status(s),
    };
    let Some(cd) = ConnectData::parse(&raw) else {
        return bad_data(specific::CONNECT_INVALID_PARAM, 0);
    };
    let target = &q.shared.target;
    let Some(subsys) = target.subsystem(&cd.subnqn, q.port.kind) else {
        q.shared.warn(
            q.peer,
            &format!("connect to unknown subsystem {:?} refused", cd.subnqn),
        );
        return bad_data(specific::CONNECT_INVALID_PARAM, 256);
    };
    if !subsys.allows(&cd.hostnqn) {
        q.shared.warn(
            q.peer,
            &format!(
                "host {:?} is not allowed on {}: connect refused",
                cd.hostnqn, subsys.nqn
            ),
        );
        return bad_data(specific::CONNECT_INVALID_HOST, 512);
    }
    if cmd.sqsize == 0 || cmd.sqsize >= QUEUE_ENTRIES {
        return bad_field(44);
    }
    if cmd.qid == 0 {
        if cd.cntlid != 0xFFFF && cd.cntlid != 0xFFFE {
            return bad_data(specific::CONNECT_INVALID_PARAM, 16);
        }
        let Some(cntlid) = target.alloc_cntlid() else {
            return Reply::status(specific::CONNECT_BUSY);
        };
        let kato = if cmd.kato == 0 {
            Duration::ZERO
        } else {
            // Rounded up to the keep-alive granularity (KAS: 1 s).
            Duration::from_millis(u64::from(cmd.kato).div_ceil(1000) * 1000)
        };
        let ctrl = Rc::new(Controller::new(
            cntlid,
            subsys.clone(),
            cd.hostnqn.clone(),
            cd.hostid,
            kato,
        ));
        target.add_controller(ctrl.clone());
        tokio::task::spawn_local(keep_alive_watchdog(ctrl.clone()));
        q.sqsize.set(cmd.sqsize);
        q.sqflow_disabled.set(cmd.cattr & 4 != 0);
        q.qid.set(0);
        *q.role.borrow_mut() = Role::Admin(ctrl);
        tracing::info!(
            cntlid,
            host = %cd.hostnqn,
            subsystem = %subsys.nqn,
            kato_ms = kato.as_millis() as u64,
            "controller created"
        );
        return Reply::ok(u32::from(cntlid));
    }
    if subsys.discovery {
        return bad_field(42);
    }
    let Some(ctrl) = target.controller(cd.cntlid).filter(|c| c.alive()) else {
        return bad_data(specific::CONNECT_INVALID_PARAM, 16);
    };
    if ctrl.subsys.nqn != subsys.nqn {
        return bad_data(specific::CONNECT_INVALID_PARAM, 256);
    }
    if ctrl.hostnqn != cd.hostnqn {
        return bad_data(specific::CONNECT_INVALID_PARAM, 512);
    }
    if cmd.qid > ctrl.io_queues.get().min(MAX_IO_QUEUES) {
        return bad_field(42);
    }
    if !ctrl.connected.borrow_mut().insert(cmd.qid) {
        return Reply::status(specific::CONNECT_BUSY);
    }
    q.sqsize.set(cmd.sqsize);
    q.sqflow_disabled.set(cmd.cattr & 4 != 0);
    q.qid.set(cmd.qid);
    *q.role.borrow_mut() = Role::Io(ctrl.clone(), cmd.qid);
    tracing::debug!(cntlid = ctrl.cntlid, qid = cmd.qid, "I/O queue connected");
    Reply::ok(u32::from(ctrl.cntlid))
}

/// Routes H2CData to the transfer its tag names; anything outside what the R2T asked for is a
/// fatal protocol error.
fn on_h2c_data(queue: &Rc<Queue>, pdu: &Pdu) -> Result<(), PduError> {
    let h =
        tcp::parse_data_header(&pdu.header).ok_or(PduError::field(2, "short H2CData header"))?;
    let mut transfers = queue.transfers.borrow_mut();
    let t = transfers
        .get_mut(&h.ttag)
        .ok_or(PduError::field(10, "H2CData for no outstanding R2T"))?;
    if t.cccid != h.cccid {
        return Err(PduError::field(8, "H2CData CCCID does not match its R2T"));
    }
    if h.datal as usize != pdu.data.len() {
        return Err(PduError::field(16, "H2CData DATAL disagrees with PLEN"));
    }
    if h.datao as usize != t.next || t.next + pdu.data.len() > t.end {
        return Err(PduError::new(
            fes::DATA_OUT_OF_RANGE,
            "H2CData outside the window its R2T asked for",
        ));
    }
    match &mut t.dest {
        Dest::Bytes(b) => b.extend_from_slice(&pdu.data),
        Dest::Chain { head, failed } => {
            let pool = queue.shared.backend.as_ref().map(|b| b.pool());
            let copied = pool.map(|p| p.write_at(*head, t.next, &pdu.data));
            if !matches!(copied, Some(Ok(()))) && !*failed {
                tracing::error!(result = ?copied, "cannot copy host data into the pool");
                *failed = true;
            }
        }
    }
    t.next += pdu.data.len();
    if t.next == t.end {
        if let Some(t) = transfers.remove(&h.ttag) {
            if let Some(done) = t.done {
                let _ = done.send(t.dest);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_ids_are_tracked_one_by_one() {
        let mut set = CidSet::new();
        for cid in [0, 63, 64, 0xFFFF] {
            assert!(set.insert(cid));
            assert!(!set.insert(cid), "{cid} twice");
        }
        assert_eq!(set.len, 4);
        set.remove(63);
        set.remove(63);
        assert_eq!(set.len, 3);
        assert!(set.insert(63));
        assert!(!set.insert(64));
    }
}
