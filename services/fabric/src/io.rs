//! NVM I/O commands: checked against the namespace, turned into ring descriptors for the
//! datapath, their data moved through the shared buffer pool.
//!
//! Reads and in-capsule writes take the fast path when they can ([`start`]): the reader
//! checks the command, takes its pool share, buffer and ring slot at once, and the completion
//! router finishes it ([`finish`]). Everything else, and those when the pool or ring is full
//! right now, runs as a task ([`execute`]), which waits for what it needs.

use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use duplex_ipc::desc::{
    IoDesc, FLAG_FUA, OP_DEALLOCATE, OP_FLUSH, OP_READ, OP_WRITE, OP_WRITE_ZEROES, STATUS_FENCED,
};
use duplex_ipc::exports::AnaState;
use duplex_ipc::pool::{BufHandle, NIL};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::io;
use duplex_nvme::status::{generic, media, path, Status};

use crate::backend::{Backend, BackendError, Chain, FastOp, Finish, Pending};
use crate::command::{CmdState, DataIn, Payload, Reply, MAX_TRANSFER};
use crate::controller::Controller;
use crate::queue::{Queue, Role};
use crate::subsystem::Namespace;

/// Starts a read, or a write whose data came in the capsule (`capsule`), on an I/O queue
/// without a task. `false` if the command needs the general path: another command, a check
/// that fails (the task answers it), or no pool share, buffer or ring slot right now.
pub fn start(q: &Rc<Queue>, sqe: &Sqe, capsule: &[u8], sgl_len: usize) -> bool {
    // Borrowed, not cloned: an `Arc` count shared with the controller's other queues (on
    // other threads) is not touched per command. Nothing here changes the role.
    let role = q.role.borrow();
    let Role::Io(ctrl, _) = &*role else {
        return false;
    };
    let Some(backend) = q.shared.backend.as_ref() else {
        return false;
    };
    if sqe.psdt() == 0 || !q.auth.borrow().allows_commands() {
        return false;
    }
    let Some(ns) = ctrl.subsys.namespace(sqe.nsid) else {
        return false;
    };
    let ns = &ns;
    if path_status(q, ctrl, ns).is_some() {
        return false;
    }
    // A namespace under a reservation the command conflicts with: the slow path answers.
    if q.shared.target.has_reservations()
        && q.shared
            .target
            .reservation_conflict(&ns.nguid, ctrl.hostid, sqe.opcode)
            .is_some()
    {
        return false;
    }
    let (slba, nlb) = (sqe.slba(), sqe.nlb());
    let Ok(bytes) = range(ns, slba, nlb) else {
        return false;
    };
    if bytes > MAX_TRANSFER {
        return false;
    }
    let op = match sqe.opcode {
        io::READ if capsule.is_empty() && sgl_len == bytes => FastOp::Read,
        io::WRITE if capsule.len() == bytes => FastOp::Write,
        _ => return false,
    };
    let Some(permit) = q.try_reserve(bytes) else {
        return false;
    };
    let Ok(buf) = backend.pool().alloc_chain(bytes) else {
        return false;
    };
    let mut d = match op {
        FastOp::Read => desc(OP_READ, ns, slba, nlb),
        FastOp::Write => {
            if let Err(e) = backend.pool().write_chain(buf, capsule) {
                tracing::error!(error = %e, "cannot copy host data into the pool");
                backend.free(buf);
                return false;
            }
            let mut d = desc(OP_WRITE, ns, slba, nlb);
            d.flags |= write_flags(ctrl, sqe);
            d
        }
    };
    d.buf = buf.0;
    d.buf_len = bytes as u32;
    let p = Pending {
        sink: Rc::clone(q) as Rc<dyn Finish>,
        cid: sqe.cid,
        bytes,
        op,
        permit,
    };
    if backend.try_start(d, p).is_err() {
        backend.free(buf);
        return false;
    }
    q.set_state(sqe.cid, CmdState::InDatapath);
    true
}

impl Finish for Queue {
    /// Finishes a fast-path command from its completion `done`.
    fn finish(&self, backend: &Rc<Backend>, p: Pending, done: IoDesc) {
        let (reply, sgl_len) = match p.op {
            FastOp::Read => match read_done(self, backend, done, p.permit, p.bytes) {
                Ok(chain) => (
                    Reply {
                        data: Some(Payload::Chain(chain)),
                        ..Reply::default()
                    },
                    p.bytes,
                ),
                Err(s) => (Reply::status(s), 0),
            },
            FastOp::Write => {
                let status = write_done(self, backend, done, p.bytes);
                drop(p.permit);
                (Reply::status(status), 0)
            }
        };
        self.complete(p.cid, reply, sgl_len);
    }

    /// Fails a fast-path command whose completion will never come (the datapath channel
    /// failed).
    fn fail(&self, p: Pending) {
        self.complete(p.cid, Reply::status(generic::INTERNAL), 0);
    }
}

/// What a completed read gives the host: its chain (which holds `permit`), or an error.
fn read_done(
    q: &Queue,
    backend: &Rc<Backend>,
    done: IoDesc,
    permit: OwnedSemaphorePermit,
    bytes: usize,
) -> Result<Chain, Status> {
    let chain = (done.buf != NIL).then(|| backend.own(BufHandle(done.buf), permit));
    let status = datapath_status(q, done.status);
    if !status.is_success() {
        if status.sct() == 2 {
            q.shared.target.record_media_error(q.shared.thread);
        }
        return Err(status);
    }
    let chain = chain.ok_or_else(|| {
        tracing::error!("datapath completed a read without its buffer");
        generic::INTERNAL
    })?;
    q.shared.target.record_read(q.shared.thread, bytes as u64);
    Ok(chain)
}

/// The status of a completed write; its chain is freed.
fn write_done(q: &Queue, backend: &Backend, done: IoDesc, bytes: usize) -> Status {
    if done.buf != NIL {
        backend.free(BufHandle(done.buf));
    }
    let status = datapath_status(q, done.status);
    if status.is_success() {
        q.shared.target.record_write(q.shared.thread, bytes as u64);
    } else if status.sct() == 2 {
        q.shared.target.record_media_error(q.shared.thread);
    }
    status
}

/// Executes one I/O command.
pub async fn execute(q: &Rc<Queue>, ctrl: &Arc<Controller>, sqe: Sqe, data: DataIn) -> Reply {
    let Some(backend) = q.shared.backend.clone() else {
        return Reply::status(generic::INTERNAL);
    };
    if sqe.opcode == io::FLUSH {
        return flush(q, &backend, ctrl, &sqe).await.into();
    }
    let Some(ns) = ctrl.subsys.namespace(sqe.nsid) else {
        return Reply::status(generic::INVALID_NS);
    };
    if let Some(status) = path_status(q, ctrl, &ns) {
        q.shared.note(
            q.peer,
            &format!(
                "I/O to namespace {} refused on this path: {status}",
                ns.nsid
            ),
        );
        return Reply::status(status);
    }
    if let Some(status) = q
        .shared
        .target
        .reservation_conflict(&ns.nguid, ctrl.hostid, sqe.opcode)
    {
        q.shared.note(
            q.peer,
            &format!(
                "I/O command {:#04x} to namespace {} refused: reservation conflict",
                sqe.opcode, ns.nsid
            ),
        );
        return Reply::status(status);
    }
    if crate::resv::is_reservation(sqe.opcode) {
        return crate::resv::execute(q, ctrl, &ns, &sqe, data).await;
    }
    match sqe.opcode {
        io::READ => read(q, &backend, &ns, &sqe, data).await,
        io::WRITE => write(q, &backend, ctrl, &ns, &sqe, data).await.into(),
        io::COMPARE => compare(q, &backend, &ns, &sqe, data).await.into(),
        io::WRITE_ZEROES => write_zeroes(q, &backend, ctrl, &ns, &sqe).await.into(),
        io::DSM => dsm(q, &backend, &ns, &sqe, data).await.into(),
        _ => Reply::status(generic::INVALID_OPCODE),
    }
}

/// The status of a datapath completion for the host. A fenced datapath (the peer took this
/// node's reservation key away) fences the whole target: every group becomes inaccessible here.
fn datapath_status(q: &Queue, status: u16) -> Status {
    if status == STATUS_FENCED {
        q.shared.target.set_fenced();
    }
    Status::from_desc(status)
}

/// The path error an I/O command to `ns` gets here, if its ANA group is not served on this
/// node's ports now: nothing reaches the datapath, and the host retries on another path.
fn path_status(q: &Queue, ctrl: &Controller, ns: &Namespace) -> Option<Status> {
    match q.shared.target.ana_state(&ctrl.subsys, ns.ana_group) {
        AnaState::Optimized | AnaState::NonOptimized => None,
        AnaState::Inaccessible => Some(path::ANA_INACCESSIBLE),
        AnaState::PersistentLoss => Some(path::ANA_PERSISTENT_LOSS),
        AnaState::Change => Some(path::ANA_TRANSITION),
    }
}

/// Descriptor flags of a write: FUA when the command asks, or when the volatile write cache is
/// off.
fn write_flags(ctrl: &Controller, sqe: &Sqe) -> u8 {
    if sqe.fua() || !ctrl.wce.load(std::sync::atomic::Ordering::Relaxed) {
        FLAG_FUA
    } else {
        0
    }
}

/// Checks `slba + nlb` against the namespace and returns the byte length.
fn range(ns: &Namespace, slba: u64, nlb: u32) -> Result<usize, Status> {
    let end = slba.checked_add(u64::from(nlb)).ok_or(generic::LBA_RANGE)?;
    if end > ns.blocks {
        return Err(generic::LBA_RANGE);
    }
    Ok(nlb as usize * ns.block_size as usize)
}

fn backend_error(e: BackendError) -> Status {
    tracing::error!(error = %e, "datapath request failed");
    generic::INTERNAL
}

fn desc(op: u8, ns: &Namespace, lba: u64, blocks: u32) -> IoDesc {
    IoDesc {
        opcode: op,
        volume: ns.volume,
        lba,
        blocks,
        buf: NIL,
        ..IoDesc::default()
    }
}

/// Submits `d` for command `cid` of queue `q` and waits for its completion.
async fn submit(q: &Queue, cid: u16, backend: &Backend, d: IoDesc) -> Result<IoDesc, Status> {
    q.submit(cid, backend, d).await.map_err(backend_error)
}

async fn read(q: &Queue, backend: &Rc<Backend>, ns: &Namespace, sqe: &Sqe, data: DataIn) -> Reply {
    if !matches!(data, DataIn::None) {
        return Reply::status(generic::INVALID_FIELD);
    }
    match read_blocks(
        q,
        sqe.cid,
        backend,
        ns,
        sqe.slba(),
        sqe.nlb(),
        sqe.sgl().length,
    )
    .await
    {
        Ok(chain) => Reply {
            data: Some(Payload::Chain(chain)),
            ..Reply::default()
        },
        Err(s) => Reply::status(s),
    }
}

/// Reads blocks into a pool chain, which the caller then owns.
async fn read_blocks(
    q: &Queue,
    cid: u16,
    backend: &Rc<Backend>,
    ns: &Namespace,
    slba: u64,
    nlb: u32,
    sgl_len: u32,
) -> Result<Chain, Status> {
    let bytes = range(ns, slba, nlb)?;
    if bytes > MAX_TRANSFER {
        return Err(generic::INVALID_FIELD);
    }
    if bytes != sgl_len as usize {
        return Err(generic::SGL_LENGTH);
    }
    let permit = q.reserve(cid, bytes).await.ok_or(generic::INTERNAL)?;
    let buf = q.alloc(cid, backend, bytes).await.map_err(backend_error)?;
    let mut d = desc(OP_READ, ns, slba, nlb);
    d.buf = buf.0;
    d.buf_len = bytes as u32;
    // On an error the chain stays lent to the ring; the datapath's completion returns it and
    // the router frees it.
    let done = submit(q, cid, backend, d).await?;
    read_done(q, backend, done, permit, bytes)
}

async fn write(
    q: &Queue,
    backend: &Backend,
    ctrl: &Controller,
    ns: &Namespace,
    sqe: &Sqe,
    data: DataIn,
) -> Status {
    let (slba, nlb) = (sqe.slba(), sqe.nlb());
    let bytes = match range(ns, slba, nlb) {
        Ok(b) => b,
        Err(s) => return s,
    };
    if bytes > MAX_TRANSFER {
        return generic::INVALID_FIELD;
    }
    let have = match &data {
        DataIn::InCapsule(d) => d.len(),
        DataIn::Transfer(n) => *n,
        DataIn::None => 0,
    };
    if have != bytes {
        return generic::SGL_LENGTH;
    }
    let Some(_permit) = q.reserve(sqe.cid, bytes).await else {
        return generic::INTERNAL;
    };
    let buf = match q.alloc(sqe.cid, backend, bytes).await {
        Ok(b) => b,
        Err(e) => return backend_error(e),
    };
    // Freed if this task is dropped while the host (slowly, or never) sends the data.
    let guard = FreeOnDrop {
        backend,
        head: Some(buf),
    };
    // Host data goes into the chain: copied from the capsule, or from each H2CData PDU as it
    // arrives.
    let filled = match data {
        DataIn::Transfer(n) => q.pull_into(sqe.cid, buf, n).await,
        data => match q.host_data(sqe.cid, data).await {
            Ok(payload) => backend.pool().write_chain(buf, &payload).map_err(|e| {
                tracing::error!(error = %e, "cannot copy host data into the pool");
                generic::INTERNAL
            }),
            Err(s) => Err(s),
        },
    };
    if let Err(s) = filled {
        return s;
    }
    // The host's data took its time: a reservation published meanwhile may forbid the write.
    if let Some(s) = q
        .shared
        .target
        .reservation_conflict(&ns.nguid, ctrl.hostid, sqe.opcode)
    {
        return s;
    }
    guard.disarm();
    let mut d = desc(OP_WRITE, ns, slba, nlb);
    d.buf = buf.0;
    d.buf_len = bytes as u32;
    d.flags |= write_flags(ctrl, sqe);
    match submit(q, sqe.cid, backend, d).await {
        Ok(done) => write_done(q, backend, done, bytes),
        Err(s) => s,
    }
}

/// A chain held by a command task, freed if the task ends (or is dropped) before handing it
/// on.
struct FreeOnDrop<'a> {
    backend: &'a Backend,
    head: Option<BufHandle>,
}

impl FreeOnDrop<'_> {
    /// The chain is handed on: do not free it.
    fn disarm(mut self) {
        self.head = None;
    }
}

impl Drop for FreeOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.head.take() {
            self.backend.free(h);
        }
    }
}

async fn compare(
    q: &Queue,
    backend: &Rc<Backend>,
    ns: &Namespace,
    sqe: &Sqe,
    data: DataIn,
) -> Status {
    let (slba, nlb) = (sqe.slba(), sqe.nlb());
    let bytes = match range(ns, slba, nlb) {
        Ok(b) => b,
        Err(s) => return s,
    };
    let theirs = match q.host_data(sqe.cid, data).await {
        Ok(p) => p,
        Err(s) => return s,
    };
    if theirs.len() != bytes {
        return generic::SGL_LENGTH;
    }
    let chain = match read_blocks(q, sqe.cid, backend, ns, slba, nlb, bytes as u32).await {
        Ok(c) => c,
        Err(s) => return s,
    };
    let mut ours = Vec::with_capacity(bytes);
    match chain.append_to(&mut ours) {
        Some(n) if n == bytes && ours == theirs => Status::SUCCESS,
        Some(n) if n == bytes => media::COMPARE_FAILURE,
        _ => generic::INTERNAL,
    }
}

async fn write_zeroes(
    q: &Queue,
    backend: &Backend,
    ctrl: &Controller,
    ns: &Namespace,
    sqe: &Sqe,
) -> Status {
    let (slba, nlb) = (sqe.slba(), sqe.nlb());
    if let Err(s) = range(ns, slba, nlb) {
        return s;
    }
    let mut d = desc(OP_WRITE_ZEROES, ns, slba, nlb);
    d.flags |= write_flags(ctrl, sqe);
    match submit(q, sqe.cid, backend, d).await {
        Ok(done) => datapath_status(q, done.status),
        Err(s) => s,
    }
}

async fn flush(q: &Queue, backend: &Backend, ctrl: &Controller, sqe: &Sqe) -> Status {
    let volume = if sqe.nsid == u32::MAX {
        u32::MAX
    } else {
        match ctrl.subsys.namespace(sqe.nsid) {
            Some(ns) => {
                // Flush is a write as reservations see it (the Linux target's choice too).
                if let Some(status) =
                    q.shared
                        .target
                        .reservation_conflict(&ns.nguid, ctrl.hostid, sqe.opcode)
                {
                    return status;
                }
                ns.volume
            }
            None => return generic::INVALID_NS,
        }
    };
    let d = IoDesc {
        opcode: OP_FLUSH,
        volume,
        buf: NIL,
        ..IoDesc::default()
    };
    match submit(q, sqe.cid, backend, d).await {
        Ok(done) => datapath_status(q, done.status),
        Err(s) => s,
    }
}

/// Dataset Management: with the Deallocate attribute, every range is deallocated; without it
/// the command is advisory and succeeds.
async fn dsm(q: &Queue, backend: &Backend, ns: &Namespace, sqe: &Sqe, data: DataIn) -> Status {
    let nr = (sqe.cdw10 & 0xFF) as usize + 1;
    let deallocate = sqe.cdw11 & (1 << 2) != 0;
    let ranges = match q.host_data(sqe.cid, data).await {
        Ok(p) => p,
        Err(s) => return s,
    };
    if ranges.len() < nr * 16 {
        return generic::SGL_LENGTH;
    }
    if !deallocate {
        return Status::SUCCESS;
    }
    let mut parsed = Vec::with_capacity(nr);
    for r in ranges.chunks_exact(16).take(nr) {
        let nlb = u32::from_le_bytes([r[4], r[5], r[6], r[7]]);
        let mut a = [0u8; 8];
        a.copy_from_slice(&r[8..16]);
        let slba = u64::from_le_bytes(a);
        if nlb == 0 {
            continue;
        }
        if let Err(s) = range(ns, slba, nlb) {
            return s;
        }
        parsed.push((slba, nlb));
    }
    for (slba, nlb) in parsed {
        match submit(q, sqe.cid, backend, desc(OP_DEALLOCATE, ns, slba, nlb)).await {
            Ok(done) if done.status == 0 => {}
            Ok(done) => return datapath_status(q, done.status),
            Err(s) => return s,
        }
    }
    Status::SUCCESS
}
