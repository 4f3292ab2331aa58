//! One NVMe/TCP connection = one queue.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use duplex_nvme::cmd::{ConnectCmd, ConnectData, Cqe, Sgl, Sqe};
use duplex_nvme::spec::{admin, fctype, feat, prop, sgl};
use duplex_nvme::status::Status;
use duplex_nvme::tcp::{self, Digests, PduType};

use crate::pdu::{self, Pdu};
use crate::tls::{Stream, TlsPsk};
use crate::{HostError, Result};

/// How to open a queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueOptions {
    /// Digests to ask for (the target must grant exactly these).
    pub digests: Digests,
    /// Socket read timeout (`None`: wait forever).
    pub timeout: Option<Duration>,
    /// Largest controller data PDU accepted (bytes).
    pub max_data: usize,
    /// In-capsule data this queue sends (bytes; the target's IOCCSZ − 64 for I/O queues).
    pub in_capsule: usize,
    /// Before [`Queue::poll`] sleeps in `recv`, poll the socket this long for data (a load
    /// generator on a core of its own spares itself the wakeup, as spdk_nvme_perf does).
    pub busy_poll: Option<Duration>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            digests: Digests::default(),
            timeout: Some(Duration::from_secs(30)),
            max_data: 1 << 20,
            in_capsule: 4096,
            busy_poll: None,
        }
    }
}

/// Data of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// None.
    None,
    /// Host to controller: these bytes (in the capsule if they fit, else on R2T).
    Out(Vec<u8>),
    /// Controller to host: this many bytes.
    In(usize),
}

/// A completed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Command id.
    pub cid: u16,
    /// The completion entry.
    pub cqe: Cqe,
    /// Controller data received for it.
    pub data: Vec<u8>,
}

impl Completion {
    /// The status.
    pub fn status(&self) -> Status {
        self.cqe.status()
    }

    /// `Ok(self)` on success, else the status as an error.
    pub fn ok(self) -> Result<Self> {
        if self.status().is_success() {
            Ok(self)
        } else {
            Err(HostError::Status(self.status()))
        }
    }
}

/// Bytes the receive side buffers.
const RECV_BUFFER: usize = 64 * 1024;

#[derive(Debug)]
struct Pending {
    out: Vec<u8>,
    data: Vec<u8>,
    want: usize,
}

/// One queue (TCP connection) to a controller.
#[derive(Debug)]
pub struct Queue {
    /// Reads are buffered; writes go to the stream under the buffer.
    reader: BufReader<Stream>,
    opts: QueueOptions,
    cpda: u8,
    maxh2cdata: usize,
    qid: u16,
    next_cid: u16,
    pending: HashMap<u16, Pending>,
    /// The last Connect's dword 0 asked for authentication (AUTHREQ.ATR).
    auth_required: bool,
    /// PDUs queued by `submit` and R2T answers, sent by `flush` (which `poll` calls before it
    /// would block): commands submitted together leave in one `send`, so the target reads them
    /// together (and acknowledges them with one ACK).
    out: Vec<u8>,
}

impl Queue {
    /// Opens a TCP connection and exchanges ICReq/ICResp.
    pub fn dial(addr: SocketAddr, opts: QueueOptions) -> Result<Self> {
        Self::open(addr, opts, None)
    }

    /// Opens a TCP connection, runs the TLS 1.3 handshake with `psk`, then exchanges
    /// ICReq/ICResp over TLS.
    pub fn dial_tls(addr: SocketAddr, opts: QueueOptions, psk: &TlsPsk) -> Result<Self> {
        Self::open(addr, opts, Some(psk))
    }

    fn open(addr: SocketAddr, opts: QueueOptions, psk: Option<&TlsPsk>) -> Result<Self> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(opts.timeout)?;
        let stream = match psk {
            None => Stream::Tcp(s),
            Some(psk) => crate::tls::handshake(s, psk)?,
        };
        // Small PDUs (responses, 4 KiB data) are read many to a system call; data of a
        // larger transfer than this skips the buffer and lands in its command's buffer.
        let mut reader = BufReader::with_capacity(RECV_BUFFER, stream);
        let req = tcp::IcReq {
            pfv: 0,
            hpda: 0,
            digests: opts.digests,
            maxr2t: 0,
        };
        reader.get_mut().write_all(&req.encode())?;
        let p = pdu::read(&mut reader, Digests::default(), 0)?;
        if p.pdu_type != PduType::IcResp {
            return Err(HostError::Unexpected(format!(
                "{:?} where ICResp was expected",
                p.pdu_type
            )));
        }
        let r = tcp::IcResp::parse(&p.header)?;
        if r.pfv != 0 || r.digests != opts.digests || r.maxh2cdata < 4096 || r.cpda > 31 {
            return Err(HostError::Unexpected(format!(
                "ICResp with PFV {}, digests {:?} (asked {:?}), MAXH2CDATA {}, CPDA {}",
                r.pfv, r.digests, opts.digests, r.maxh2cdata, r.cpda
            )));
        }
        Ok(Self {
            reader,
            opts,
            cpda: r.cpda,
            maxh2cdata: r.maxh2cdata as usize,
            qid: 0,
            next_cid: 0,
            pending: HashMap::new(),
            auth_required: false,
            out: Vec::with_capacity(64 * 1024),
        })
    }

    /// Digests in force.
    pub fn digests(&self) -> Digests {
        self.opts.digests
    }

    /// Queue id (after [`Queue::connect`]).
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Commands in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Sets how much data this queue sends in the capsule.
    pub fn set_in_capsule(&mut self, bytes: usize) {
        self.opts.in_capsule = bytes;
    }

    /// Fabrics Connect. `cntlid` is 0xFFFF for an admin queue, the controller's id for an I/O
    /// queue. Returns the controller id.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        &mut self,
        qid: u16,
        sqsize: u16,
        kato_ms: u32,
        cntlid: u16,
        subnqn: &str,
        hostnqn: &str,
        hostid: [u8; 16],
    ) -> Result<u16> {
        let sqe = ConnectCmd {
            recfmt: 0,
            qid,
            sqsize,
            cattr: 0,
            kato: kato_ms,
        }
        .to_sqe(0);
        let data = ConnectData {
            hostid,
            cntlid,
            subnqn: subnqn.to_owned(),
            hostnqn: hostnqn.to_owned(),
        }
        .to_bytes();
        // Connect data always travels in the capsule.
        let keep = self.opts.in_capsule;
        self.opts.in_capsule = keep.max(data.len());
        let done = self.execute(sqe, Data::Out(data));
        self.opts.in_capsule = keep;
        let c = done?.ok()?;
        self.qid = qid;
        self.auth_required = c.cqe.dw0 & (1 << 17) != 0;
        Ok(c.cqe.dw0 as u16)
    }

    /// Whether the last Connect said this queue must authenticate (in-band, DH-HMAC-CHAP).
    pub fn auth_required(&self) -> bool {
        self.auth_required
    }

    fn alloc_cid(&mut self) -> u16 {
        loop {
            let cid = self.next_cid;
            self.next_cid = self.next_cid.wrapping_add(1);
            if !self.pending.contains_key(&cid) {
                return cid;
            }
        }
    }

    /// Queues a command for sending (its `cid` is assigned here and returned). It leaves at the
    /// next [`Queue::flush`], which [`Queue::poll`] does before it waits.
    pub fn submit(&mut self, mut sqe: Sqe, data: Data) -> Result<u16> {
        let cid = self.alloc_cid();
        sqe.cid = cid;
        sqe.flags = (sqe.flags & 0x3F) | 1 << 6; // PSDT: SGL, metadata in one buffer
        let (len, inline, out, want) = match data {
            Data::None => (0, false, Vec::new(), 0),
            Data::In(n) => (n, false, Vec::new(), n),
            Data::Out(d) => {
                let inline = d.len() <= self.opts.in_capsule;
                (d.len(), inline, d, 0)
            }
        };
        sqe.set_sgl(Sgl {
            address: 0,
            length: len as u32,
            id: if inline {
                sgl::DATA_BLOCK_OFFSET
            } else {
                sgl::TRANSPORT_DATA_BLOCK
            },
        });
        let digests = self.opts.digests;
        let mut pdu = tcp::capsule_cmd(&sqe, if inline { len } else { 0 }, digests, self.cpda);
        if inline && len > 0 {
            pdu.extend_from_slice(&out);
            if digests.data {
                pdu.extend_from_slice(&tcp::digest(&out));
            }
        }
        self.out.extend_from_slice(&pdu);
        self.pending.insert(
            cid,
            Pending {
                out: if inline { Vec::new() } else { out },
                data: Vec::with_capacity(want),
                want,
            },
        );
        Ok(cid)
    }

    /// Waits for the next completion, answering R2Ts and gathering C2HData meanwhile.
    pub fn poll(&mut self) -> Result<Completion> {
        loop {
            if !self.pdu_buffered() {
                self.flush()?;
                if let Some(spin) = self.opts.busy_poll {
                    if self.reader.buffer().is_empty() {
                        self.spin_for_data(spin)?;
                    }
                }
            }
            let head = pdu::read_header(&mut self.reader, self.opts.digests, self.opts.max_data)?;
            if head.layout.pdu_type == PduType::C2HData {
                // Read data goes straight into its command's buffer.
                if let Some(c) = self.on_c2h(&head)? {
                    return Ok(c);
                }
                continue;
            }
            let mut data = Vec::new();
            pdu::read_data(&mut self.reader, &head, &mut data)?;
            let p = Pdu {
                pdu_type: head.layout.pdu_type,
                ch: head.ch,
                header: head.header,
                data,
            };
            match p.pdu_type {
                PduType::CapsuleResp => {
                    let cqe: Cqe = bytemuck::pod_read_unaligned(&p.header[tcp::CH_LEN..24]);
                    let pending = self.pending.remove(&cqe.cid).ok_or_else(|| {
                        HostError::Unexpected(format!("a response for unknown command {}", cqe.cid))
                    })?;
                    return Ok(Completion {
                        cid: cqe.cid,
                        cqe,
                        data: pending.data,
                    });
                }
                PduType::R2T => self.on_r2t(&p)?,
                other => {
                    return Err(HostError::Unexpected(format!(
                        "{other:?} on an established queue"
                    )))
                }
            }
        }
    }

    /// A C2HData PDU whose header is read: its data is read into the command's buffer.
    fn on_c2h(&mut self, p: &pdu::Head) -> Result<Option<Completion>> {
        let h = tcp::parse_data_header(&p.header)
            .ok_or_else(|| HostError::Unexpected("short C2HData header".into()))?;
        let pending = self.pending.get_mut(&h.cccid).ok_or_else(|| {
            HostError::Unexpected(format!("C2HData for unknown command {}", h.cccid))
        })?;
        if h.datao as usize != pending.data.len()
            || h.datal as usize != p.layout.data_len
            || pending.data.len() + p.layout.data_len > pending.want
        {
            return Err(HostError::Unexpected(format!(
                "C2HData at {} of {} bytes for command {} (have {}, want {})",
                h.datao,
                h.datal,
                h.cccid,
                pending.data.len(),
                pending.want
            )));
        }
        pdu::read_data(&mut self.reader, p, &mut pending.data)?;
        let last = p.ch.flags & tcp::FLAG_DATA_LAST != 0;
        if last && p.ch.flags & tcp::FLAG_DATA_SUCCESS != 0 {
            // No response capsule follows: the command succeeded.
            let pending = self.pending.remove(&h.cccid).unwrap_or(Pending {
                out: Vec::new(),
                data: Vec::new(),
                want: 0,
            });
            return Ok(Some(Completion {
                cid: h.cccid,
                cqe: Cqe {
                    cid: h.cccid,
                    sqid: self.qid,
                    ..Cqe::default()
                },
                data: pending.data,
            }));
        }
        Ok(None)
    }

    fn on_r2t(&mut self, p: &Pdu) -> Result<()> {
        let r = tcp::parse_r2t(&p.header)
            .ok_or_else(|| HostError::Unexpected("short R2T header".into()))?;
        let pending = self
            .pending
            .get(&r.cccid)
            .ok_or_else(|| HostError::Unexpected(format!("R2T for unknown command {}", r.cccid)))?;
        let (start, len) = (r.r2to as usize, r.r2tl as usize);
        let end = start
            .checked_add(len)
            .filter(|&e| e <= pending.out.len() && len > 0)
            .ok_or_else(|| {
                HostError::Unexpected(format!(
                    "R2T for {len} bytes at {start} of a {}-byte transfer",
                    pending.out.len()
                ))
            })?;
        let digests = self.opts.digests;
        let mut at = start;
        while at < end {
            let n = (end - at).min(self.maxh2cdata);
            let chunk = &pending.out[at..at + n];
            let h = tcp::DataHeader {
                cccid: r.cccid,
                ttag: r.ttag,
                datao: at as u32,
                datal: n as u32,
            };
            let flags = if at + n == end {
                tcp::FLAG_DATA_LAST
            } else {
                0
            };
            self.out.extend_from_slice(&tcp::data_pdu(
                PduType::H2CData,
                &h,
                flags,
                digests,
                self.cpda,
            ));
            self.out.extend_from_slice(chunk);
            if digests.data {
                self.out.extend_from_slice(&tcp::digest(chunk));
            }
            at += n;
        }
        Ok(())
    }

    /// Sends everything queued.
    pub fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            self.reader.get_mut().write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }

    /// Polls the socket (non-blocking peeks) until data arrives or `spin` passes.
    fn spin_for_data(&mut self, spin: Duration) -> Result<()> {
        // TLS may hold a whole record decrypted already: the socket says nothing of it.
        let Stream::Tcp(s) = self.reader.get_ref() else {
            return Ok(());
        };
        s.set_nonblocking(true)?;
        let start = std::time::Instant::now();
        let mut b = [0u8; 1];
        loop {
            match s.peek(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() >= spin {
                        break;
                    }
                    std::hint::spin_loop();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Data, EOF, or an error the blocking read that follows reports.
                _ => break,
            }
        }
        s.set_nonblocking(false)?;
        Ok(())
    }

    /// A whole PDU is already in the read buffer: reading it will not block.
    fn pdu_buffered(&self) -> bool {
        let b = self.reader.buffer();
        b.len() >= tcp::CH_LEN && u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize <= b.len()
    }

    /// Submits one command and waits for it (no other command may be in flight).
    pub fn execute(&mut self, sqe: Sqe, data: Data) -> Result<Completion> {
        if !self.pending.is_empty() {
            return Err(HostError::Unexpected(
                "execute() with commands in flight; use submit/poll".into(),
            ));
        }
        self.submit(sqe, data)?;
        self.poll()
    }

    /// Sends raw bytes (tests craft PDUs with it).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.flush()?;
        Ok(self.reader.get_mut().write_all(bytes)?)
    }

    /// Reads one PDU without interpreting it (tests).
    pub fn read_pdu(&mut self) -> Result<Pdu> {
        self.flush()?;
        pdu::read(&mut self.reader, self.opts.digests, self.opts.max_data)
    }

    /// The underlying socket (tests shut it down or read it to the end).
    pub fn socket(&self) -> &TcpStream {
        self.reader.get_ref().tcp()
    }

    fn fabrics(fctype: u8) -> Sqe {
        Sqe {
            opcode: admin::FABRICS,
            nsid: u32::from(fctype),
            ..Sqe::default()
        }
    }

    /// Property Get (`eight`: an 8-byte property such as CAP).
    pub fn property_get(&mut self, offset: u32, eight: bool) -> Result<u64> {
        let mut sqe = Self::fabrics(fctype::PROPERTY_GET);
        sqe.cdw10 = u32::from(eight);
        sqe.cdw11 = offset;
        let c = self.execute(sqe, Data::None)?.ok()?;
        Ok(u64::from(c.cqe.dw0) | (u64::from(c.cqe.dw1) << 32))
    }

    /// Property Set of a 4-byte property.
    pub fn property_set(&mut self, offset: u32, value: u32) -> Result<()> {
        let mut sqe = Self::fabrics(fctype::PROPERTY_SET);
        sqe.cdw11 = offset;
        sqe.cdw12 = value;
        self.execute(sqe, Data::None)?.ok()?;
        Ok(())
    }

    /// Enables the controller (CC.EN with 64-byte SQEs and 16-byte CQEs) and checks CSTS.RDY.
    pub fn enable(&mut self) -> Result<()> {
        self.property_set(prop::CC, prop::CC_EN | 6 << 16 | 4 << 20)?;
        let csts = self.property_get(prop::CSTS, false)?;
        if csts & u64::from(prop::CSTS_RDY) == 0 {
            return Err(HostError::Unexpected(format!(
                "CSTS {csts:#x} after enabling"
            )));
        }
        Ok(())
    }

    /// Identify (4096 bytes).
    pub fn identify(&mut self, cns: u8, nsid: u32) -> Result<Vec<u8>> {
        let sqe = Sqe {
            opcode: admin::IDENTIFY,
            nsid,
            cdw10: u32::from(cns),
            ..Sqe::default()
        };
        Ok(self.execute(sqe, Data::In(4096))?.ok()?.data)
    }

    /// Set Features Number of Queues: asks for `n` I/O queues, returns how many were granted.
    pub fn set_queues(&mut self, n: u16) -> Result<u16> {
        let want = u32::from(n.max(1) - 1);
        let sqe = Sqe {
            opcode: admin::SET_FEATURES,
            cdw10: u32::from(feat::NUM_QUEUES),
            cdw11: want | want << 16,
            ..Sqe::default()
        };
        let c = self.execute(sqe, Data::None)?.ok()?;
        let granted = (c.cqe.dw0 & 0xFFFF).min(c.cqe.dw0 >> 16) as u16;
        Ok(granted.saturating_add(1).min(n.max(1)))
    }

    /// Keep Alive.
    pub fn keep_alive(&mut self) -> Result<()> {
        let sqe = Sqe {
            opcode: admin::KEEP_ALIVE,
            ..Sqe::default()
        };
        self.execute(sqe, Data::None)?.ok()?;
        Ok(())
    }
}
