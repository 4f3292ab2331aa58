//! The state of one queue (one connection) that its commands share: its controller and role,
//! the commands outstanding and their states, transfers of host data pulled with R2T, its
//! share of the buffer pool, and how a command completes (data and response into the outbox).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use duplex_ipc::control::RateLimiter;
use duplex_ipc::metrics::{Counter, Histogram, Metric};
use duplex_ipc::pool::BufHandle;
use duplex_nvme::cmd::{Cqe, Sqe};
use duplex_nvme::spec::io;
use duplex_nvme::status::{generic, Status};
use duplex_nvme::tcp::{self, fes, Digests, PduError, PduType};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::backend::{Backend, BackendError};
use crate::command::{CmdState, DataIn, Payload, Reply, MAX_TRANSFER};
use crate::controller::Controller;
use crate::subsystem::Port;
use crate::target::Target;
use crate::writer::{Out, Outbox};

/// Pool chunks one queue may hold at once: an eighth of the pool, and at least one largest
/// transfer.
pub fn queue_budget(backend: Option<&Backend>) -> usize {
    backend.map_or(0, |b| {
        let pool = b.pool();
        let per_transfer = MAX_TRANSFER.div_ceil(pool.chunk_size().max(1));
        (pool.capacity() as usize / 8).max(per_transfer)
    })
}

/// The commands outstanding on a queue, by id, each with its state.
#[derive(Debug, Default)]
struct Commands {
    states: HashMap<u16, Cmd, IdHash>,
}

/// Hashes the 16-bit ids a queue keys its tables by (command ids, transfer tags): a Fibonacci
/// multiply, which spreads consecutive ids over the top bits the table probes with, instead of
/// SipHash on every command. Ids are the host's choice, but a table holds at most a queue's
/// entries, which bounds what colliding ids can cost.
type IdHash = std::hash::BuildHasherDefault<IdHasher>;

/// The hasher of [`IdHash`].
#[derive(Debug, Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u16(&mut self, v: u16) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// One outstanding command.
#[derive(Debug)]
struct Cmd {
    state: CmdState,
    /// A read or write counted in the metrics when it completes.
    io: Option<Tally>,
}

/// What the metrics need of a read or write: when it arrived, where, how much.
#[derive(Debug, Clone, Copy)]
struct Tally {
    at: Instant,
    nsid: u32,
    write: bool,
    blocks: u64,
}

impl Commands {
    /// Takes `cid` in state [`CmdState::Received`]; `false` if it is outstanding already.
    #[cfg(test)]
    fn insert(&mut self, cid: u16) -> bool {
        self.insert_io(cid, None)
    }

    fn insert_io(&mut self, cid: u16, io: Option<Tally>) -> bool {
        match self.states.entry(cid) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Cmd {
                    state: CmdState::Received,
                    io,
                });
                true
            }
        }
    }

    /// Moves `cid` to `to`; the state it left (`None` if `cid` is not outstanding).
    fn set(&mut self, cid: u16, to: CmdState) -> Option<CmdState> {
        self.states
            .get_mut(&cid)
            .map(|c| std::mem::replace(&mut c.state, to))
    }

    /// Frees `cid`; the state it was in.
    #[cfg(test)]
    fn remove(&mut self, cid: u16) -> Option<CmdState> {
        self.take(cid).map(|c| c.state)
    }

    fn take(&mut self, cid: u16) -> Option<Cmd> {
        self.states.remove(&cid)
    }

    fn len(&self) -> usize {
        self.states.len()
    }
}

/// Whether a new command may start on a queue ([`Queue::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// It is outstanding now, in state [`CmdState::Received`].
    Yes,
    /// Its command id is in use: it was answered with Command ID Conflict.
    Conflict,
    /// More commands than the queue has entries: a protocol error.
    Full,
}

/// Shared by every connection of one fabric I/O thread.
#[derive(Debug)]
pub struct Shared {
    /// The target (every thread's).
    pub target: Arc<Target>,
    /// This thread's datapath channel (absent in discovery-only tests).
    pub backend: Option<Rc<Backend>>,
    /// Which I/O thread this is (0: the runtime thread).
    pub thread: usize,
    /// Connections this thread took (metrics; none without a metrics region).
    pub taken: Option<duplex_ipc::metrics::Counter>,
    /// Rate limit for warnings a host can trigger.
    pub warn_limit: RefCell<RateLimiter>,
}

impl Shared {
    /// What I/O thread `thread` shares between its connections.
    pub fn new(target: Arc<Target>, backend: Option<Rc<Backend>>, thread: usize) -> Self {
        let taken = target.metrics().and_then(|m| {
            m.counter(
                duplex_ipc::metrics::Metric::FabricThreadConnections,
                &[("thread", &thread.to_string())],
            )
            .map_err(|e| target.metrics_full(&e))
            .ok()
        });
        Self {
            target,
            backend,
            thread,
            taken,
            warn_limit: RefCell::new(RateLimiter::new(20, std::time::Duration::from_secs(10))),
        }
    }

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
    Admin(Arc<Controller>),
    /// An I/O queue of a controller.
    Io(Arc<Controller>, u16),
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
    outstanding: RefCell<Commands>,
    /// Metric handles of the namespaces this queue did I/O on.
    io_metrics: RefCell<Vec<(u32, Rc<NsMetrics>)>>,
    /// Where the host's in-band authentication on this queue stands.
    pub auth: RefCell<crate::auth::QueueAuth>,
    /// The PSK identity the host proved on this connection's TLS channel (TLS listeners).
    pub tls_identity: Option<duplex_nvme::tls::Identity>,
    transfers: RefCell<HashMap<u16, Transfer, IdHash>>,
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
    /// A new connection's queue, before Connect.
    // What a connection learnt before its first command: each its own field of the queue.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shared: Rc<Shared>,
        peer: SocketAddr,
        local: SocketAddr,
        port: Port,
        digests: Digests,
        hpda: u8,
        outbox: Rc<Outbox>,
        tls_identity: Option<duplex_nvme::tls::Identity>,
    ) -> Self {
        let budget = queue_budget(shared.backend.as_deref());
        Self {
            shared,
            peer,
            local,
            port,
            digests,
            hpda,
            role: RefCell::new(Role::Unconnected),
            qid: Cell::new(0),
            sqsize: Cell::new(31),
            sqhd: Cell::new(0),
            sqflow_disabled: Cell::new(false),
            outstanding: RefCell::new(Commands::default()),
            io_metrics: RefCell::new(Vec::new()),
            auth: RefCell::new(crate::auth::QueueAuth::NotRequired),
            tls_identity,
            transfers: RefCell::new(HashMap::default()),
            next_ttag: Cell::new(0),
            outbox,
            budget: Arc::new(Semaphore::new(budget)),
        }
    }

    /// Makes this queue `role` (after a successful Connect): queue `qid` of `sqsize + 1`
    /// entries, with SQ flow control off if the host asked.
    pub(crate) fn connected(&self, role: Role, qid: u16, sqsize: u16, sqflow_disabled: bool) {
        self.sqsize.set(sqsize);
        self.sqflow_disabled.set(sqflow_disabled);
        self.qid.set(qid);
        *self.role.borrow_mut() = role;
    }

    /// The outbox the writer sends from.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Takes command `sqe` (its capsule just arrived), advancing the submission queue head.
    pub(crate) fn admit(&self, sqe: &Sqe) -> Admit {
        let cid = sqe.cid;
        let mut out = self.outstanding.borrow_mut();
        if out.len() > usize::from(self.sqsize.get()) {
            return Admit::Full;
        }
        self.advance_sqhd();
        // Reads and writes on an I/O queue are counted when the node keeps metrics.
        let io = (self.qid.get() != 0
            && matches!(sqe.opcode, io::READ | io::WRITE)
            && self.shared.target.metrics().is_some())
        .then(|| Tally {
            at: Instant::now(),
            nsid: sqe.nsid,
            write: sqe.opcode == io::WRITE,
            blocks: u64::from(sqe.nlb()) + 1,
        });
        if !out.insert_io(cid, io) {
            // A command id in use: answered without disturbing the running command.
            tracing::debug!(qid = self.qid.get(), cid, "command id in use");
            let cqe = Cqe {
                sqhd: self.sqhd.get(),
                sqid: self.qid.get(),
                cid,
                status: generic::CID_CONFLICT.cqe_bits(),
                ..Cqe::default()
            };
            self.outbox.push(Out::Resp(cqe));
            return Admit::Conflict;
        }
        tracing::trace!(qid = self.qid.get(), cid, to = ?CmdState::Received, "command");
        Admit::Yes
    }

    /// Moves command `cid` to state `to` (a trace event).
    pub fn set_state(&self, cid: u16, to: CmdState) {
        if let Some(from) = self.outstanding.borrow_mut().set(cid, to) {
            if from != to {
                tracing::trace!(qid = self.qid.get(), cid, ?from, ?to, "command");
            }
        }
    }

    /// Submits `d` for command `cid` and waits for its completion (the command is
    /// [`CmdState::InDatapath`] meanwhile).
    pub async fn submit(
        &self,
        cid: u16,
        backend: &Backend,
        d: duplex_ipc::desc::IoDesc,
    ) -> Result<duplex_ipc::desc::IoDesc, BackendError> {
        self.set_state(cid, CmdState::InDatapath);
        let done = backend.submit(d).await;
        self.set_state(cid, CmdState::Executing);
        done
    }

    /// Allocates a chain of at least `bytes` for command `cid` (which is
    /// [`CmdState::AwaitingBuffer`] while the pool is exhausted).
    pub async fn alloc(
        &self,
        cid: u16,
        backend: &Backend,
        bytes: usize,
    ) -> Result<BufHandle, BackendError> {
        self.set_state(cid, CmdState::AwaitingBuffer);
        let buf = backend.alloc(bytes).await;
        self.set_state(cid, CmdState::Executing);
        buf
    }

    /// Ends the queue's commands: the transfers waiting for host data are dropped, and what
    /// was outstanding is reported (by state) and forgotten.
    pub(crate) fn abandon_commands(&self) {
        self.transfers.borrow_mut().clear();
        let states = std::mem::take(&mut self.outstanding.borrow_mut().states);
        if !states.is_empty() {
            let mut by_state: Vec<(CmdState, usize)> = Vec::new();
            for s in states.values().map(|c| &c.state) {
                match by_state.iter_mut().find(|(k, _)| k == s) {
                    Some((_, n)) => *n += 1,
                    None => by_state.push((*s, 1)),
                }
            }
            tracing::debug!(qid = self.qid.get(), abandoned = ?by_state, "commands abandoned with their connection");
        }
    }

    /// The controller, once connected.
    pub fn controller(&self) -> Option<Arc<Controller>> {
        match &*self.role.borrow() {
            Role::Admin(c) | Role::Io(c, _) => Some(c.clone()),
            Role::Unconnected => None,
        }
    }

    /// Waits until this queue may hold `bytes` more of the shared pool for command `cid`
    /// (meanwhile [`CmdState::AwaitingBuffer`]); the permit gives them back when dropped.
    /// This is what keeps one slow or stalled host from taking the whole pool: its commands
    /// wait here, then its queue fills, then its socket.
    pub async fn reserve(&self, cid: u16, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let n = self.chunks(bytes)?;
        self.set_state(cid, CmdState::AwaitingBuffer);
        let permit = Arc::clone(&self.budget).acquire_many_owned(n).await.ok();
        self.set_state(cid, CmdState::Executing);
        permit
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

    async fn pull_to(&self, cid: u16, len: usize, dest: Dest) -> Result<Dest, Status> {
        self.set_state(cid, CmdState::AwaitingData);
        let pulled = self.pull_windows(cid, len, dest).await;
        self.set_state(cid, CmdState::Executing);
        pulled
    }

    async fn pull_windows(&self, cid: u16, len: usize, mut dest: Dest) -> Result<Dest, Status> {
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

    /// Routes H2CData to the transfer its tag names; anything outside what the R2T asked for is a
    /// fatal protocol error.
    pub(crate) fn h2c_data(&self, header: &[u8], data: &[u8]) -> Result<(), PduError> {
        let h = tcp::parse_data_header(header).ok_or(PduError::field(2, "short H2CData header"))?;
        let mut transfers = self.transfers.borrow_mut();
        let t = transfers
            .get_mut(&h.ttag)
            .ok_or(PduError::field(10, "H2CData for no outstanding R2T"))?;
        if t.cccid != h.cccid {
            return Err(PduError::field(8, "H2CData CCCID does not match its R2T"));
        }
        if h.datal as usize != data.len() {
            return Err(PduError::field(16, "H2CData DATAL disagrees with PLEN"));
        }
        if h.datao as usize != t.next || t.next + data.len() > t.end {
            return Err(PduError::new(
                fes::DATA_OUT_OF_RANGE,
                "H2CData outside the window its R2T asked for",
            ));
        }
        match &mut t.dest {
            Dest::Bytes(b) => b.extend_from_slice(data),
            Dest::Chain { head, failed } => {
                let pool = self.shared.backend.as_ref().map(|b| b.pool());
                let copied = pool.map(|p| p.write_at(*head, t.next, data));
                if !matches!(copied, Some(Ok(()))) && !*failed {
                    tracing::error!(result = ?copied, "cannot copy host data into the pool");
                    *failed = true;
                }
            }
        }
        t.next += data.len();
        if t.next == t.end {
            if let Some(t) = transfers.remove(&h.ttag) {
                if let Some(done) = t.done {
                    let _ = done.send(t.dest);
                }
            }
        }
        Ok(())
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
        let from = self.outstanding.borrow_mut().take(cid);
        tracing::trace!(qid = self.qid.get(), cid, from = ?from.as_ref().map(|c| c.state), status = %status, "command completed");
        self.outbox.push(Out::Resp(cqe));
        if let Some(t) = from.and_then(|c| c.io) {
            self.count_io(t, status.is_success());
        }
    }

    /// Counts a completed read or write in the namespace's metrics on this queue's port.
    fn count_io(&self, t: Tally, ok: bool) {
        let cached = self
            .io_metrics
            .borrow()
            .iter()
            .find(|(nsid, _)| *nsid == t.nsid)
            .map(|(_, m)| Rc::clone(m));
        let m = match cached {
            Some(m) => m,
            None => {
                let Some(m) = self.ns_metrics(t.nsid) else {
                    return;
                };
                let mut cache = self.io_metrics.borrow_mut();
                if cache.len() >= MAX_CACHED_NS_METRICS {
                    cache.remove(0);
                }
                cache.push((t.nsid, Rc::clone(&m)));
                m
            }
        };
        let op = &m.ops[usize::from(t.write)];
        let ns = u64::try_from(t.at.elapsed().as_nanos()).unwrap_or(u64::MAX);
        op.latency.observe_ns(ns);
        if ok {
            op.commands.inc();
            op.bytes
                .add(t.blocks.saturating_mul(u64::from(m.block_size)));
        } else {
            op.errors.inc();
        }
    }

    /// The metrics of namespace `nsid` of this queue's controller through its port.
    fn ns_metrics(&self, nsid: u32) -> Option<Rc<NsMetrics>> {
        let metrics = self.shared.target.metrics()?;
        let ctrl = match &*self.role.borrow() {
            Role::Io(c, _) => Arc::clone(c),
            _ => return None,
        };
        let ns = ctrl.subsys.namespace(nsid)?;
        let nsid = nsid.to_string();
        let port = self.port.addr.to_string();
        let mut ops = Vec::with_capacity(2);
        for op in ["read", "write"] {
            let labels = [
                ("subsystem", ctrl.subsys.nqn.as_str()),
                ("nsid", nsid.as_str()),
                ("port", port.as_str()),
                ("op", op),
            ];
            let made = (|| {
                Ok::<_, duplex_ipc::metrics::MetricsError>(OpMetrics {
                    commands: metrics.counter(Metric::NsCommands, &labels)?,
                    bytes: metrics.counter(Metric::NsBytes, &labels)?,
                    errors: metrics.counter(Metric::NsErrors, &labels)?,
                    latency: metrics.histogram(Metric::NsLatency, &labels)?,
                })
            })();
            match made {
                Ok(m) => ops.push(m),
                Err(e) => {
                    self.shared.target.metrics_full(&e);
                    return None;
                }
            }
        }
        let [read, write] = <[OpMetrics; 2]>::try_from(ops).ok()?;
        Some(Rc::new(NsMetrics {
            block_size: ns.block_size,
            ops: [read, write],
        }))
    }
}

/// Namespaces whose metric handles a queue keeps at hand.
const MAX_CACHED_NS_METRICS: usize = 64;

/// A namespace's metrics through one port.
#[derive(Debug)]
struct NsMetrics {
    block_size: u32,
    /// Read, write.
    ops: [OpMetrics; 2],
}

#[derive(Debug)]
struct OpMetrics {
    commands: Counter,
    bytes: Counter,
    errors: Counter,
    latency: Histogram,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_ids_are_tracked_one_by_one_with_their_state() {
        let mut set = Commands::default();
        for cid in [0, 63, 64, 0xFFFF] {
            assert!(set.insert(cid));
            assert!(!set.insert(cid), "{cid} twice");
        }
        assert_eq!(set.len(), 4);
        assert_eq!(set.set(63, CmdState::InDatapath), Some(CmdState::Received));
        assert_eq!(set.set(7, CmdState::InDatapath), None, "not outstanding");
        assert_eq!(set.remove(63), Some(CmdState::InDatapath));
        assert_eq!(set.remove(63), None);
        assert_eq!(set.len(), 3);
        assert!(set.insert(63));
        assert!(!set.insert(64));
    }
}
