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

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use duplex_nvme::cmd::{ConnectCmd, ConnectData, Sqe};
use duplex_nvme::spec::{admin, fctype, sgl, DISCOVERY_NQN};
use duplex_nvme::status::{generic, specific, Status};
use duplex_nvme::tcp::{self, fes, CommonHeader, Digests, Layout, PduError, PduType};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::stream::{ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::command::{CmdState, DataIn, Reply, IN_CAPSULE_DATA, MAX_TRANSFER};
use crate::controller::{keep_alive_watchdog, Controller, Teardown, MAX_IO_QUEUES, QUEUE_ENTRIES};
use crate::queue::{Admit, Queue, Role, Shared};
use crate::subsystem::Port;
use crate::writer::{write_loop, Gather, Outbox};
use crate::{admin as admin_cmds, io as io_cmds};
/// How long a new connection has to send ICReq, and a Connect after it (on a TLS listener, to
/// finish the TLS handshake before that too).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    rd: &mut BufReader<ReadHalf>,
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
    let Some(_counted) = shared.target.count_connection() else {
        shared.warn(peer, "connection limit reached: refusing a connection");
        return;
    };
    if let Some(c) = &shared.taken {
        c.inc();
    }
    let _ = stream.set_nodelay(true);
    let span = tracing::info_span!("conn", %peer, port = port.id, thread = shared.thread);
    let _enter = span.enter();
    tracing::debug!("connection accepted");
    let (rd, wr, identity) = if port.tls {
        match secure(stream, &shared, peer).await {
            Some(x) => x,
            None => return,
        }
    } else {
        let (rd, wr) = crate::stream::plain(stream);
        (rd, wr, None)
    };
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let result = handshake(&mut rd, wr, &shared, peer, local, port, identity).await;
    if let Some((queue, writer)) = result {
        run(rd, queue, writer).await;
    }
    tracing::debug!("connection closed");
}

type Writer = tokio::task::JoinHandle<()>;

/// The TLS handshake of a connection on a TLS listener (within the handshake timeout): the
/// halves and the identity the host proved, or `None` (logged and counted: the connection
/// closes).
async fn secure(
    stream: TcpStream,
    shared: &Rc<Shared>,
    peer: SocketAddr,
) -> Option<(ReadHalf, WriteHalf, Option<duplex_nvme::tls::Identity>)> {
    let target = &shared.target;
    let Some(server) = target.tls() else {
        crate::tls::refused(target, shared, peer, "this node has no TLS set up");
        return None;
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, server.accept(target, stream)).await {
        Err(_) => {
            crate::tls::refused(target, shared, peer, "no TLS handshake within the timeout");
            None
        }
        Ok(Err(why)) => {
            crate::tls::refused(target, shared, peer, &why);
            None
        }
        Ok(Ok(a)) => {
            tracing::debug!(identity = %a.identity.to_text(), "TLS channel up");
            let (rd, wr) = crate::stream::tls(a.stream);
            Some((rd, wr, Some(a.identity)))
        }
    }
}

/// ICReq/ICResp. On a protocol error, a C2HTermReq is sent and the connection closes.
async fn handshake(
    rd: &mut BufReader<ReadHalf>,
    mut wr: WriteHalf,
    shared: &Rc<Shared>,
    peer: SocketAddr,
    local: SocketAddr,
    port: Port,
    tls_identity: Option<duplex_nvme::tls::Identity>,
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
    let queue = Rc::new(Queue::new(
        Rc::clone(shared),
        peer,
        local,
        port,
        icreq.digests,
        icreq.hpda,
        outbox,
        tls_identity,
    ));
    Some((queue, writer))
}

async fn run(mut rd: BufReader<ReadHalf>, queue: Rc<Queue>, writer: Writer) {
    let mut tasks = JoinSet::new();
    let mut spare = Spare::default();
    let mut teardown: Option<watch::Receiver<Teardown>> = None;
    let max_data = IN_CAPSULE_DATA.max(MAX_TRANSFER);
    let connect_deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let target = queue.shared.target.clone();
    let shutdown = target.shutdown.notified();
    tokio::pin!(shutdown);
    let term: Option<Vec<u8>> = loop {
        // The queue ends when its controller is torn down, or, before it is connected, at
        // the handshake deadline (returns true then). A Connect is carried out by a task of its
        // own, so the controller may appear while this waits for the next PDU (an idle I/O
        // queue may send none for a long time): it is looked for until the deadline.
        let torn = async {
            match teardown.as_mut() {
                Some(w) => {
                    let _ = w.wait_for(|t| *t != Teardown::Alive).await;
                    false
                }
                None => loop {
                    if let Some(c) = queue.controller() {
                        let mut w = c.watch();
                        let _ = w.wait_for(|t| *t != Teardown::Alive).await;
                        break false;
                    }
                    let now = tokio::time::Instant::now();
                    if now >= connect_deadline {
                        break true;
                    }
                    let step = (connect_deadline - now).min(std::time::Duration::from_millis(50));
                    tokio::time::sleep(step).await;
                },
            }
        };
        let next = async {
            // A host that does not read its responses stops being read.
            queue.outbox().room().await;
            read_pdu(&mut rd, queue.digests, max_data, &mut spare).await
        };
        let pdu = tokio::select! {
            r = next => r,
            expired = torn => {
                if expired {
                    queue.shared.warn(queue.peer, "no Connect within the handshake timeout: closing");
                }
                break None;
            }
            _ = &mut shutdown => break None,
        };
        // Reap finished command tasks without waiting. (Never a select branch: losing that
        // race would drop `read_pdu` halfway through a PDU and desynchronise the stream.)
        while tasks.try_join_next().is_some() {}
        let mut step = on_pdu(&queue, &mut tasks, &mut spare, &mut teardown, pdu);
        // The PDUs already whole in the read buffer (a host at depth sends its commands
        // together) are taken at once, without the select above: reading them cannot wait.
        // The writer's room and the controller's teardown are still looked at before each;
        // the node's shutdown when the buffer runs dry.
        while matches!(step, Step::Go)
            && whole_pdu_buffered(rd.buffer())
            && queue.outbox().has_room()
            && teardown
                .as_ref()
                .is_none_or(|w| *w.borrow() == Teardown::Alive)
        {
            let pdu = read_pdu(&mut rd, queue.digests, max_data, &mut spare).await;
            step = on_pdu(&queue, &mut tasks, &mut spare, &mut teardown, pdu);
        }
        if let Step::Stop(term) = step {
            break term;
        }
    };
    // Stop every command of this queue; their buffers return to the pool when the datapath
    // completes them (the backend frees completions nobody waits for).
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    queue.abandon_commands();
    if let Some(t) = term {
        queue.send(t);
    }
    // The writer sends what is queued, then ends. Fast-path commands still in the datapath
    // complete into the closed outbox, which drops their data.
    queue.outbox().close();
    let role = queue.role.replace(Role::Unconnected);
    match role {
        Role::Admin(c) => {
            c.tear_down(Teardown::AdminGone);
            queue.shared.target.remove_controller(c.cntlid);
            tracing::info!(cntlid = c.cntlid, host = %c.hostnqn, "controller removed");
        }
        Role::Io(c, qid) => {
            c.connected.lock().remove(&qid);
        }
        Role::Unconnected => {}
    }
    drop(queue);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

/// What the reader does after a PDU.
enum Step {
    /// Reads the next.
    Go,
    /// Ends the connection, sending this C2HTermReq first if any.
    Stop(Option<Vec<u8>>),
}

/// Whether `buf` starts with a whole PDU (by its common header's PLEN; a bad PLEN is found by
/// [`read_pdu`] from the header alone).
fn whole_pdu_buffered(buf: &[u8]) -> bool {
    buf.len() >= tcp::CH_LEN
        && u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize <= buf.len()
}

/// Handles one PDU (or the failure to read one).
fn on_pdu(
    queue: &Rc<Queue>,
    tasks: &mut JoinSet<()>,
    spare: &mut Spare,
    teardown: &mut Option<watch::Receiver<Teardown>>,
    pdu: Result<Pdu, ReadError>,
) -> Step {
    if queue.outbox().is_closed() {
        // The writer failed: the socket is gone.
        return Step::Stop(None);
    }
    let mut pdu = match pdu {
        Ok(p) => p,
        Err(ReadError::Io) => return Step::Stop(None),
        Err(ReadError::Proto(e, quote)) => {
            queue.shared.warn(queue.peer, &e.to_string());
            return Step::Stop(Some(tcp::term_req(PduType::C2HTermReq, &e, &quote)));
        }
    };
    if let Role::Admin(c) | Role::Io(c, _) = &*queue.role.borrow() {
        c.touch();
    }
    let result = match pdu.layout.pdu_type {
        PduType::CapsuleCmd => on_capsule(queue, tasks, &mut pdu),
        PduType::H2CData => on_h2c_data(queue, &pdu),
        PduType::H2CTermReq => {
            let (fes, fei) = tcp::parse_term_req(&pdu.header).unwrap_or((0, 0));
            tracing::info!(fes, fei, "host terminated the connection (H2CTermReq)");
            return Step::Stop(None);
        }
        _ => Err(PduError::new(
            fes::PDU_SEQUENCE,
            "unexpected PDU type after ICReq",
        )),
    };
    if let Err(e) = result {
        queue.shared.warn(queue.peer, &e.to_string());
        return Step::Stop(Some(tcp::term_req(PduType::C2HTermReq, &e, &pdu.header)));
    }
    spare.give_back(pdu);
    if teardown.is_none() {
        if let Some(c) = queue.controller() {
            *teardown = Some(c.watch());
        }
    }
    Step::Go
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
    match queue.admit(&sqe) {
        Admit::Yes => {}
        Admit::Conflict => return Ok(()),
        Admit::Full => {
            return Err(PduError::new(
                fes::PDU_SEQUENCE,
                "more commands outstanding than the queue has entries",
            ))
        }
    }
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
        q.set_state(sqe.cid, CmdState::Executing);
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
                match sqe.fctype() {
                    fctype::AUTH_SEND => crate::auth::send(q, sqe, data).await,
                    fctype::AUTH_RECV => crate::auth::receive(q, &sqe),
                    _ => fabrics(q, &ctrl, sqe).await,
                }
            } else if !ctrl.ready() {
                Reply::status(generic::SEQUENCE)
            } else if !q.auth.borrow().allows_commands() {
                Reply::status(specific::AUTH_REQUIRED)
            } else {
                admin_cmds::execute(q, &ctrl, sqe, data).await
            }
        }
        Role::Io(ctrl, _) => {
            if sqe.opcode == admin::FABRICS {
                match sqe.fctype() {
                    fctype::AUTH_SEND => crate::auth::send(q, sqe, data).await,
                    fctype::AUTH_RECV => crate::auth::receive(q, &sqe),
                    fctype::CONNECT => Reply::status(generic::SEQUENCE),
                    _ => Reply::status(generic::INVALID_OPCODE),
                }
            } else if !q.auth.borrow().allows_commands() {
                Reply::status(specific::AUTH_REQUIRED)
            } else {
                io_cmds::execute(q, &ctrl, sqe, data).await
            }
        }
    }
}

/// Fabrics commands on a connected admin queue: Property Get/Set, Disconnect.
async fn fabrics(_q: &Rc<Queue>, ctrl: &Arc<Controller>, sqe: Sqe) -> Reply {
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
pub(crate) fn bad_data(status: Status, offset: u32) -> Reply {
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
        target.count_host(true, "unknown-subsystem");
        return bad_data(specific::CONNECT_INVALID_PARAM, 256);
    };
    if !subsys.allows(&cd.hostnqn) {
        let why = format!(
            "host {:?} is not allowed on {}: connect refused",
            cd.hostnqn, subsys.nqn
        );
        q.shared.warn(q.peer, &why);
        target.count_host(true, "host-not-allowed");
        target.host_event(
            duplex_ipc::control::EventLevel::Warning,
            "host-refused",
            &format!("{why} (from {})", q.peer),
        );
        return bad_data(specific::CONNECT_INVALID_HOST, 512);
    }
    if let Some(id) = &q.tls_identity {
        if !crate::tls::connect_fits(id, &cd.hostnqn, &subsys.nqn, DISCOVERY_NQN) {
            let why = format!(
                "host {:?} connecting to {} on a TLS channel keyed for {} on {}: refused",
                cd.hostnqn, subsys.nqn, id.hostnqn, id.subnqn
            );
            q.shared.warn(q.peer, &why);
            target.count_host(true, "tls-identity");
            target.host_event(
                duplex_ipc::control::EventLevel::Warning,
                "host-refused",
                &format!("{why} (from {})", q.peer),
            );
            return bad_data(specific::CONNECT_INVALID_HOST, 512);
        }
    }
    if cmd.sqsize == 0 || cmd.sqsize >= QUEUE_ENTRIES {
        return bad_field(44);
    }
    // A host with secrets authenticates every queue it connects (not discovery's).
    let session = if subsys.discovery {
        None
    } else {
        match crate::auth::begin(q, &subsys, &cd.hostnqn) {
            Ok(s) => s,
            Err(refusal) => return refusal,
        }
    };
    let atr = if session.is_some() {
        crate::auth::CONNECT_ATR
    } else {
        0
    };
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
        let ctrl = Arc::new(Controller::new(
            cntlid,
            subsys.clone(),
            cd.hostnqn.clone(),
            cd.hostid,
            kato,
        ));
        target.add_controller(ctrl.clone());
        tokio::task::spawn_local(keep_alive_watchdog(ctrl.clone()));
        q.connected(Role::Admin(ctrl), 0, cmd.sqsize, cmd.cattr & 4 != 0);
        set_auth(q, session);
        tracing::info!(
            cntlid,
            host = %cd.hostnqn,
            subsystem = %subsys.nqn,
            kato_ms = kato.as_millis() as u64,
            "controller created"
        );
        if !subsys.discovery {
            target.count_host(false, &subsys.nqn);
            target.host_event(
                duplex_ipc::control::EventLevel::Info,
                "host-connected",
                &format!(
                    "host {} connected to {} from {} (controller {cntlid})",
                    cd.hostnqn, subsys.nqn, q.peer
                ),
            );
        }
        return Reply::ok(u32::from(cntlid) | atr);
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
    if !ctrl.connected.lock().insert(cmd.qid) {
        return Reply::status(specific::CONNECT_BUSY);
    }
    q.connected(
        Role::Io(ctrl.clone(), cmd.qid),
        cmd.qid,
        cmd.sqsize,
        cmd.cattr & 4 != 0,
    );
    set_auth(q, session);
    tracing::debug!(cntlid = ctrl.cntlid, qid = cmd.qid, "I/O queue connected");
    Reply::ok(u32::from(ctrl.cntlid) | atr)
}

/// The queue's authentication from Connect on: a transaction due, or none needed.
fn set_auth(q: &Queue, session: Option<duplex_nvme::auth::Session>) {
    *q.auth.borrow_mut() = match session {
        Some(s) => crate::auth::QueueAuth::Pending {
            session: Box::new(s),
            reauth: false,
        },
        None => crate::auth::QueueAuth::NotRequired,
    };
}

/// Routes H2CData to the transfer its tag names ([`Queue::h2c_data`]).
fn on_h2c_data(queue: &Rc<Queue>, pdu: &Pdu) -> Result<(), PduError> {
    queue.h2c_data(&pdu.header, &pdu.data)
}
