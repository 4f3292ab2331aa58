//! The send side of a connection: the [`Outbox`] its commands queue PDUs in, and the writer
//! task that gathers them and sends them (read data straight from the pool).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use duplex_ipc::pool::Piece;
use duplex_nvme::cmd::Cqe;
use duplex_nvme::tcp::{self, Digests, PduType};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::stream::WriteHalf;

use crate::backend::Chain;
use crate::controller::QUEUE_ENTRIES;

/// PDUs queued for sending on a connection past which its reader stops reading commands.
pub const TX_QUEUE: usize = 2 * QUEUE_ENTRIES as usize;

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
    pub(crate) fn close(&self) {
        self.closed.set(true);
        self.ready.notify_one();
    }

    /// Closes and drops what is queued (the socket failed).
    pub(crate) fn abandon(&self) {
        self.close();
        let dropped = std::mem::take(&mut *self.queue.borrow_mut());
        drop(dropped);
        self.drained.notify_waiters();
    }

    /// Whether it closed (the connection is ending, or its socket failed).
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    fn pop(&self) -> Option<Out> {
        self.queue.borrow_mut().pop_front()
    }

    /// Whether the writer is below [`TX_QUEUE`] and the outbox open: [`Outbox::room`] would not
    /// wait.
    pub(crate) fn has_room(&self) -> bool {
        self.queue.borrow().len() < TX_QUEUE && !self.closed.get()
    }

    /// Waits until the writer has caught up to below [`TX_QUEUE`] (or the outbox closed).
    pub(crate) async fn room(&self) {
        loop {
            let drained = self.drained.notified();
            if self.queue.borrow().len() < TX_QUEUE || self.closed.get() {
                return;
            }
            drained.await;
        }
    }
}

/// A gathered piece of the writer's next send.
enum Seg {
    /// Bytes `[start, end)` of the gather buffer.
    Buf(usize, usize),
    /// The first `len` bytes of a chain (freed once sent).
    Chain(Chain, usize),
}

/// What the writer has gathered for its next send.
pub(crate) struct Gather {
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
    pub(crate) fn new(digests: Digests, hpda: u8) -> Self {
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

    /// Sends everything gathered on `wr`, then starts afresh (the chains are freed).
    async fn send(&mut self, wr: &mut WriteHalf) -> std::io::Result<()> {
        match wr {
            WriteHalf::Tcp(w) => self.send_tcp(w.as_ref()).await,
            WriteHalf::Tls(w) => {
                // TLS encrypts a copy anyway: read data is copied out of the pool in order.
                let mut flat = Vec::with_capacity(self.bytes);
                for s in &self.segs {
                    match s {
                        Seg::Buf(a, b) => flat.extend_from_slice(&self.buf[*a..*b]),
                        Seg::Chain(c, len) => {
                            let at = flat.len();
                            if c.append_to(&mut flat).is_none_or(|n| n < *len) {
                                return Err(std::io::ErrorKind::InvalidData.into());
                            }
                            flat.truncate(at + len);
                        }
                    }
                }
                w.write_all(&flat).await?;
                w.flush().await?;
                self.buf.clear();
                self.segs.clear();
                self.bytes = 0;
                Ok(())
            }
        }
    }

    /// Sends everything gathered, waiting for the socket to take it, then starts afresh (the
    /// chains are freed).
    async fn send_tcp(&mut self, sock: &TcpStream) -> std::io::Result<()> {
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
pub(crate) async fn write_loop(mut wr: WriteHalf, outbox: Rc<Outbox>, mut gather: Gather) {
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
            if gather.full() && gather.send(&mut wr).await.is_err() {
                outbox.abandon();
                return;
            }
            gather.push(out);
        }
        outbox.drained.notify_waiters();
        if gather.send(&mut wr).await.is_err() {
            outbox.abandon();
            return;
        }
    }
    let _ = wr.shutdown().await;
}
