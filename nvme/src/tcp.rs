//! NVMe/TCP PDUs (NVMe/TCP Transport Specification 1.0).
//!
//! Every PDU starts with an 8-byte common header (type, flags, HLEN, PDO, PLEN), then the rest
//! of its type's header (HLEN bytes in all), then a 4-byte header digest if negotiated, padding
//! up to PDO, the data, and a 4-byte data digest if negotiated and data is present. Digests are
//! CRC32C, little-endian.
//!
//! Receiving is two steps so that a peer cannot make us read or allocate what we did not
//! agree to: [`CommonHeader::parse`] + [`layout`] check the 8 bytes against the negotiated
//! digests and limits (every error names the spec's fatal error status and the offending
//! field's offset, for the C2HTermReq/H2CTermReq that must follow); then the rest is read and
//! decoded by type.

use crate::bytes::{put_u16, put_u32, u16_at, u32_at};

/// Common header length.
pub const CH_LEN: usize = 8;
/// Digest length.
pub const DIGEST_LEN: usize = 4;
/// HLEN of ICReq and ICResp.
pub const IC_LEN: usize = 128;
/// HLEN of CapsuleCmd.
pub const CAPSULE_CMD_HLEN: usize = 72;
/// HLEN of CapsuleResp, H2CData, C2HData, R2T and the TermReqs.
pub const SHORT_HLEN: usize = 24;
/// Largest TermReq PDU (header + copy of the offending header).
pub const TERM_REQ_MAX_PLEN: usize = 152;

/// Header digest present.
pub const FLAG_HDGST: u8 = 0x01;
/// Data digest present.
pub const FLAG_DDGST: u8 = 0x02;
/// Last data PDU of a transfer (H2CData, C2HData).
pub const FLAG_DATA_LAST: u8 = 0x04;
/// C2HData: the command succeeded; no CapsuleResp follows.
pub const FLAG_DATA_SUCCESS: u8 = 0x08;

/// PDU types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PduType {
    /// Initialize Connection Request (host → controller).
    IcReq = 0,
    /// Initialize Connection Response.
    IcResp = 1,
    /// Host to Controller Terminate Connection Request.
    H2CTermReq = 2,
    /// Controller to Host Terminate Connection Request.
    C2HTermReq = 3,
    /// Command capsule.
    CapsuleCmd = 4,
    /// Response capsule.
    CapsuleResp = 5,
    /// Host to controller data.
    H2CData = 6,
    /// Controller to host data.
    C2HData = 7,
    /// Ready to transfer.
    R2T = 9,
}

impl PduType {
    /// From the wire byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::IcReq,
            1 => Self::IcResp,
            2 => Self::H2CTermReq,
            3 => Self::C2HTermReq,
            4 => Self::CapsuleCmd,
            5 => Self::CapsuleResp,
            6 => Self::H2CData,
            7 => Self::C2HData,
            9 => Self::R2T,
            _ => return None,
        })
    }

    /// The HLEN this type must carry.
    pub fn hlen(self) -> usize {
        match self {
            Self::IcReq | Self::IcResp => IC_LEN,
            Self::CapsuleCmd => CAPSULE_CMD_HLEN,
            _ => SHORT_HLEN,
        }
    }

    /// Sent by hosts (as opposed to controllers).
    pub fn from_host(self) -> bool {
        matches!(
            self,
            Self::IcReq | Self::H2CTermReq | Self::CapsuleCmd | Self::H2CData
        )
    }

    /// May carry data.
    fn has_data(self) -> bool {
        matches!(self, Self::CapsuleCmd | Self::H2CData | Self::C2HData)
    }
}

/// Fatal error statuses of a TermReq (FES).
pub mod fes {
    /// Invalid PDU Header Field.
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    /// PDU Sequence Error.
    pub const PDU_SEQUENCE: u16 = 0x02;
    /// Header Digest Error.
    pub const HEADER_DIGEST: u16 = 0x03;
    /// Data Transfer Out of Range.
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    /// Data Transfer Limit Exceeded.
    pub const DATA_LIMIT: u16 = 0x05;
    /// Unsupported Parameter.
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// A protocol violation: what a TermReq reports (and then the connection closes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("NVMe/TCP protocol error: {what} (fatal error status {fes:#x}, field offset {fei})")]
pub struct PduError {
    /// Fatal error status.
    pub fes: u16,
    /// Fatal error information: for an invalid header field, the byte offset of the field.
    pub fei: u32,
    /// What went wrong, for logs.
    pub what: &'static str,
}

impl PduError {
    /// An invalid header field at byte offset `fei`.
    pub const fn field(fei: u32, what: &'static str) -> Self {
        Self {
            fes: fes::INVALID_HEADER_FIELD,
            fei,
            what,
        }
    }
    /// Any other fatal error.
    pub const fn new(fes: u16, what: &'static str) -> Self {
        Self { fes, fei: 0, what }
    }
}

/// The 8-byte common header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommonHeader {
    /// PDU type (raw: unknown values are a protocol error reported by [`layout`]).
    pub pdu_type: u8,
    /// Flags.
    pub flags: u8,
    /// Header length.
    pub hlen: u8,
    /// PDU data offset.
    pub pdo: u8,
    /// PDU length (everything, digests included).
    pub plen: u32,
}

impl CommonHeader {
    /// Decodes the first 8 bytes.
    pub fn parse(b: &[u8; CH_LEN]) -> Self {
        Self {
            pdu_type: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: u32_at(b, 4),
        }
    }

    /// Encodes into the first 8 bytes of `b`.
    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.pdu_type;
        b[1] = self.flags;
        b[2] = self.hlen;
        b[3] = self.pdo;
        put_u32(b, 4, self.plen);
    }
}

/// Digests in force on a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    /// Header digest.
    pub header: bool,
    /// Data digest.
    pub data: bool,
}

/// Where the parts of a received PDU are, checked against what was negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Type.
    pub pdu_type: PduType,
    /// Header length (common header included).
    pub hlen: usize,
    /// A header digest follows the header.
    pub header_digest: bool,
    /// Bytes of padding between the header (and its digest) and the data.
    pub pad: usize,
    /// Data bytes.
    pub data_len: usize,
    /// A data digest follows the data.
    pub data_digest: bool,
    /// Total PDU length.
    pub plen: usize,
}

impl Layout {
    /// Bytes after the common header up to the data (rest of header, header digest, pad).
    pub fn head_rest(&self) -> usize {
        self.hlen - CH_LEN + self.digest_len(self.header_digest) + self.pad
    }

    fn digest_len(&self, on: bool) -> usize {
        if on {
            DIGEST_LEN
        } else {
            0
        }
    }
}

/// Checks a received common header: the type is known and expected from this side, HLEN is
/// the type's, the digest flags match what was negotiated (none before and on ICReq/ICResp
/// and TermReqs), PDO and PLEN are consistent, and data is at most `max_data` bytes.
pub fn layout(
    ch: &CommonHeader,
    digests: Digests,
    from_host: bool,
    max_data: usize,
) -> Result<Layout, PduError> {
    let t = PduType::from_u8(ch.pdu_type)
        .filter(|t| t.from_host() == from_host)
        .ok_or(PduError::field(0, "unknown or wrong-direction PDU type"))?;
    let hlen = t.hlen();
    if usize::from(ch.hlen) != hlen {
        return Err(PduError::field(2, "HLEN does not match the PDU type"));
    }
    let plen = ch.plen as usize;
    let control = matches!(
        t,
        PduType::IcReq | PduType::IcResp | PduType::H2CTermReq | PduType::C2HTermReq
    );
    if control {
        if ch.flags & (FLAG_HDGST | FLAG_DDGST) != 0 {
            return Err(PduError::field(
                1,
                "digest flag on a connection control PDU",
            ));
        }
        let ok = match t {
            PduType::IcReq | PduType::IcResp => plen == IC_LEN,
            _ => (SHORT_HLEN..=TERM_REQ_MAX_PLEN).contains(&plen),
        };
        if !ok {
            return Err(PduError::field(4, "PLEN is wrong for the PDU type"));
        }
        return Ok(Layout {
            pdu_type: t,
            hlen,
            header_digest: false,
            pad: 0,
            data_len: plen - hlen,
            data_digest: false,
            plen,
        });
    }
    if (ch.flags & FLAG_HDGST != 0) != digests.header {
        return Err(PduError::field(
            1,
            "header digest flag disagrees with negotiation",
        ));
    }
    let hd = if digests.header { DIGEST_LEN } else { 0 };
    let head = hlen + hd;
    if plen < head {
        return Err(PduError::field(4, "PLEN shorter than the header"));
    }
    if plen == head {
        if ch.flags & FLAG_DDGST != 0 {
            return Err(PduError::field(1, "data digest flag without data"));
        }
        if ch.pdo != 0 && usize::from(ch.pdo) != head {
            return Err(PduError::field(3, "PDO set on a PDU without data"));
        }
        if matches!(t, PduType::H2CData | PduType::C2HData) {
            return Err(PduError::field(4, "data PDU without data"));
        }
        return Ok(Layout {
            pdu_type: t,
            hlen,
            header_digest: digests.header,
            pad: 0,
            data_len: 0,
            data_digest: false,
            plen,
        });
    }
    if !t.has_data() {
        return Err(PduError::field(
            4,
            "PLEN claims data on a PDU type without data",
        ));
    }
    if (ch.flags & FLAG_DDGST != 0) != digests.data {
        return Err(PduError::field(
            1,
            "data digest flag disagrees with negotiation",
        ));
    }
    let pdo = usize::from(ch.pdo);
    if pdo < head || pdo >= plen {
        return Err(PduError::field(3, "PDO outside the PDU"));
    }
    let dd = if digests.data { DIGEST_LEN } else { 0 };
    let data_len = plen
        .checked_sub(pdo + dd)
        .filter(|&n| n > 0)
        .ok_or(PduError::field(4, "PLEN too short for PDO and data digest"))?;
    if data_len > max_data {
        return Err(PduError::new(
            fes::DATA_LIMIT,
            "PDU data larger than allowed",
        ));
    }
    Ok(Layout {
        pdu_type: t,
        hlen,
        header_digest: digests.header,
        pad: pdo - head,
        data_len,
        data_digest: digests.data,
        plen,
    })
}

/// CRC32C of `data`, as the 4 digest bytes.
pub fn digest(data: &[u8]) -> [u8; 4] {
    crc32c::crc32c(data).to_le_bytes()
}

/// ICReq fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcReq {
    /// PDU format version (0).
    pub pfv: u16,
    /// Host PDU data alignment (zero-based dwords).
    pub hpda: u8,
    /// Digests requested.
    pub digests: Digests,
    /// Maximum outstanding R2Ts per command (zero-based).
    pub maxr2t: u32,
}

/// ICResp fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcResp {
    /// PDU format version (0).
    pub pfv: u16,
    /// Controller PDU data alignment (zero-based dwords).
    pub cpda: u8,
    /// Digests enabled.
    pub digests: Digests,
    /// Largest H2CData data the controller accepts.
    pub maxh2cdata: u32,
}

fn dgst_byte(d: Digests) -> u8 {
    u8::from(d.header) | (u8::from(d.data) << 1)
}

fn dgst_from(b: u8) -> Digests {
    Digests {
        header: b & 1 != 0,
        data: b & 2 != 0,
    }
}

fn ic_pdu(t: PduType, pfv: u16, align: u8, d: Digests, word: u32) -> Vec<u8> {
    let mut b = vec![0u8; IC_LEN];
    CommonHeader {
        pdu_type: t as u8,
        flags: 0,
        hlen: IC_LEN as u8,
        pdo: 0,
        plen: IC_LEN as u32,
    }
    .write(&mut b);
    put_u16(&mut b, 8, pfv);
    b[10] = align;
    b[11] = dgst_byte(d);
    put_u32(&mut b, 12, word);
    b
}

impl IcReq {
    /// Decodes a whole ICReq (128 bytes). Reserved bits set in the digest byte are an error.
    pub fn parse(b: &[u8]) -> Result<Self, PduError> {
        if b.len() != IC_LEN {
            return Err(PduError::field(4, "ICReq is not 128 bytes"));
        }
        if b[11] & !3 != 0 {
            return Err(PduError::field(11, "reserved digest bits set"));
        }
        Ok(Self {
            pfv: u16_at(b, 8),
            hpda: b[10],
            digests: dgst_from(b[11]),
            maxr2t: u32_at(b, 12),
        })
    }
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        ic_pdu(
            PduType::IcReq,
            self.pfv,
            self.hpda,
            self.digests,
            self.maxr2t,
        )
    }
}

impl IcResp {
    /// Decodes a whole ICResp (128 bytes).
    pub fn parse(b: &[u8]) -> Result<Self, PduError> {
        if b.len() != IC_LEN {
            return Err(PduError::field(4, "ICResp is not 128 bytes"));
        }
        Ok(Self {
            pfv: u16_at(b, 8),
            cpda: b[10],
            digests: dgst_from(b[11]),
            maxh2cdata: u32_at(b, 12),
        })
    }
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        ic_pdu(
            PduType::IcResp,
            self.pfv,
            self.cpda,
            self.digests,
            self.maxh2cdata,
        )
    }
}

/// The header of H2CData and C2HData PDUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeader {
    /// Command capsule CID.
    pub cccid: u16,
    /// Transfer tag (H2CData: the R2T's; C2HData: reserved).
    pub ttag: u16,
    /// Offset of this data in the command's transfer.
    pub datao: u32,
    /// Data length.
    pub datal: u32,
}

/// The header of an R2T PDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2t {
    /// Command capsule CID.
    pub cccid: u16,
    /// Transfer tag the host echoes in H2CData.
    pub ttag: u16,
    /// Offset requested.
    pub r2to: u32,
    /// Length requested.
    pub r2tl: u32,
}

/// Decodes the 24-byte header of a data PDU (after the common header was checked).
pub fn parse_data_header(h: &[u8]) -> Option<DataHeader> {
    (h.len() >= SHORT_HLEN).then(|| DataHeader {
        cccid: u16_at(h, 8),
        ttag: u16_at(h, 10),
        datao: u32_at(h, 12),
        datal: u32_at(h, 16),
    })
}

/// Decodes an R2T header.
pub fn parse_r2t(h: &[u8]) -> Option<R2t> {
    (h.len() >= SHORT_HLEN).then(|| R2t {
        cccid: u16_at(h, 8),
        ttag: u16_at(h, 10),
        r2to: u32_at(h, 12),
        r2tl: u32_at(h, 16),
    })
}

/// Decodes a TermReq: (FES, FEI).
pub fn parse_term_req(h: &[u8]) -> Option<(u16, u32)> {
    (h.len() >= SHORT_HLEN).then(|| (u16_at(h, 8), u32_at(h, 10)))
}

/// Builds the header part (common header, type header, header digest, padding) of an
/// outgoing PDU carrying `data_len` bytes of data (data and data digest are sent after it).
/// `cpda` is the receiver's alignment requirement (zero-based dwords).
pub fn encode_header(
    t: PduType,
    extra_flags: u8,
    type_header: &[u8],
    data_len: usize,
    digests: Digests,
    cpda: u8,
) -> Vec<u8> {
    let mut b = Vec::new();
    encode_header_into(&mut b, t, extra_flags, type_header, data_len, digests, cpda);
    b
}

/// [`encode_header`], appended to `out` (no allocation when `out` has room).
pub fn encode_header_into(
    out: &mut Vec<u8>,
    t: PduType,
    extra_flags: u8,
    type_header: &[u8],
    data_len: usize,
    digests: Digests,
    cpda: u8,
) {
    let hlen = t.hlen();
    debug_assert_eq!(type_header.len(), hlen - CH_LEN);
    let hd = if digests.header { DIGEST_LEN } else { 0 };
    let (pdo, dd) = if data_len > 0 {
        let align = (usize::from(cpda) + 1) * 4;
        (
            (hlen + hd).div_ceil(align) * align,
            if digests.data { DIGEST_LEN } else { 0 },
        )
    } else {
        (0, 0)
    };
    let head = if data_len > 0 { pdo } else { hlen + hd };
    let plen = head + data_len + dd;
    let mut flags = extra_flags;
    if digests.header {
        flags |= FLAG_HDGST;
    }
    if data_len > 0 && digests.data {
        flags |= FLAG_DDGST;
    }
    let start = out.len();
    out.resize(start + head, 0);
    let b = &mut out[start..];
    CommonHeader {
        pdu_type: t as u8,
        flags,
        hlen: hlen as u8,
        pdo: pdo as u8,
        plen: plen as u32,
    }
    .write(b);
    b[CH_LEN..hlen].copy_from_slice(type_header);
    if digests.header {
        let d = digest(&b[..hlen]);
        b[hlen..hlen + DIGEST_LEN].copy_from_slice(&d);
    }
}

/// A CapsuleResp PDU.
pub fn capsule_resp(cqe: &crate::cmd::Cqe, digests: Digests) -> Vec<u8> {
    let mut b = Vec::new();
    capsule_resp_into(&mut b, cqe, digests);
    b
}

/// [`capsule_resp`], appended to `out`.
pub fn capsule_resp_into(out: &mut Vec<u8>, cqe: &crate::cmd::Cqe, digests: Digests) {
    let raw: [u8; 16] = bytemuck::cast(*cqe);
    encode_header_into(out, PduType::CapsuleResp, 0, &raw, 0, digests, 0);
}

/// A CapsuleCmd PDU header for a command with `data_len` bytes of in-capsule data.
pub fn capsule_cmd(sqe: &crate::cmd::Sqe, data_len: usize, digests: Digests, cpda: u8) -> Vec<u8> {
    encode_header(
        PduType::CapsuleCmd,
        0,
        &sqe.to_bytes(),
        data_len,
        digests,
        cpda,
    )
}

fn short(a: u16, b: u16, c: u32, d: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    put_u16(&mut h, 0, a);
    put_u16(&mut h, 2, b);
    put_u32(&mut h, 4, c);
    put_u32(&mut h, 8, d);
    h
}

/// A data PDU header (C2HData from a controller, H2CData from a host).
pub fn data_pdu(t: PduType, h: &DataHeader, flags: u8, digests: Digests, align: u8) -> Vec<u8> {
    let mut b = Vec::new();
    data_pdu_into(&mut b, t, h, flags, digests, align);
    b
}

/// [`data_pdu`]'s header, appended to `out`.
pub fn data_pdu_into(
    out: &mut Vec<u8>,
    t: PduType,
    h: &DataHeader,
    flags: u8,
    digests: Digests,
    align: u8,
) {
    encode_header_into(
        out,
        t,
        flags,
        &short(h.cccid, h.ttag, h.datao, h.datal),
        h.datal as usize,
        digests,
        align,
    );
}

/// An R2T PDU.
pub fn r2t_pdu(r: &R2t, digests: Digests) -> Vec<u8> {
    encode_header(
        PduType::R2T,
        0,
        &short(r.cccid, r.ttag, r.r2to, r.r2tl),
        0,
        digests,
        0,
    )
}

/// A TermReq PDU (C2HTermReq from a controller) quoting up to 128 bytes of the offending
/// header. Never carries digests.
pub fn term_req(t: PduType, err: &PduError, offending: &[u8]) -> Vec<u8> {
    let quote = &offending[..offending.len().min(TERM_REQ_MAX_PLEN - SHORT_HLEN)];
    let mut b = vec![0u8; SHORT_HLEN + quote.len()];
    CommonHeader {
        pdu_type: t as u8,
        flags: 0,
        hlen: SHORT_HLEN as u8,
        pdo: 0,
        plen: b.len() as u32,
    }
    .write(&mut b);
    put_u16(&mut b, 8, err.fes);
    put_u32(&mut b, 10, err.fei);
    b[SHORT_HLEN..].copy_from_slice(quote);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::{Cqe, Sqe};

    #[test]
    fn encoding_into_a_buffer_appends_what_the_allocating_encoders_return() {
        let digests = Digests {
            header: true,
            data: true,
        };
        let cqe = Cqe {
            cid: 7,
            status: 2,
            ..Cqe::default()
        };
        let h = DataHeader {
            cccid: 7,
            ttag: 0,
            datao: 0,
            datal: 4096,
        };
        for d in [D0, digests] {
            let mut out = vec![0xEE; 3];
            capsule_resp_into(&mut out, &cqe, d);
            data_pdu_into(&mut out, PduType::C2HData, &h, FLAG_DATA_LAST, d, 3);
            let mut want = vec![0xEE; 3];
            want.extend(capsule_resp(&cqe, d));
            want.extend(data_pdu(PduType::C2HData, &h, FLAG_DATA_LAST, d, 3));
            assert_eq!(out, want);
        }
    }

    const D0: Digests = Digests {
        header: false,
        data: false,
    };
    const D1: Digests = Digests {
        header: true,
        data: true,
    };

    fn ch(b: &[u8]) -> CommonHeader {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        CommonHeader::parse(&a)
    }

    #[test]
    fn icreq_round_trip_and_checks() {
        let r = IcReq {
            pfv: 0,
            hpda: 0,
            digests: D1,
            maxr2t: 0,
        };
        let b = r.encode();
        let l = layout(&ch(&b), D0, true, 0).expect("layout");
        assert_eq!((l.pdu_type, l.plen, l.data_len), (PduType::IcReq, 128, 0));
        assert_eq!(IcReq::parse(&b), Ok(r));
        let mut bad = b.clone();
        bad[11] = 0x80;
        assert_eq!(IcReq::parse(&bad).map_err(|e| e.fei), Err(11));
        // an ICResp coming from a host is refused
        let resp = IcResp {
            pfv: 0,
            cpda: 0,
            digests: D1,
            maxh2cdata: 0x2_0000,
        }
        .encode();
        assert_eq!(layout(&ch(&resp), D0, true, 0).map_err(|e| e.fei), Err(0));
        assert_eq!(IcResp::parse(&resp).map(|r| r.maxh2cdata), Ok(0x2_0000));
    }

    #[test]
    fn capsule_with_in_capsule_data_and_digests() {
        let sqe = Sqe {
            opcode: 1,
            cid: 5,
            ..Sqe::default()
        };
        for d in [D0, D1] {
            let head = capsule_cmd(&sqe, 4096, d, 0);
            let c = ch(&head);
            let l = layout(&c, d, true, 8192).expect("layout");
            assert_eq!(l.data_len, 4096);
            assert_eq!(l.pad, 0);
            assert_eq!(CH_LEN + l.head_rest(), head.len());
            assert_eq!(l.plen, head.len() + 4096 + if d.data { 4 } else { 0 });
            if d.header {
                assert_eq!(digest(&head[..72]), head[72..76]);
            }
            // too much data for the limit
            assert_eq!(
                layout(&c, d, true, 4095).map_err(|e| e.fes),
                Err(fes::DATA_LIMIT)
            );
            // digest flags must match the negotiation
            let other = Digests {
                header: !d.header,
                data: d.data,
            };
            assert_eq!(layout(&c, other, true, 8192).map_err(|e| e.fei), Err(1));
        }
    }

    #[test]
    fn malformed_headers_name_the_field() {
        let mut b = capsule_cmd(&Sqe::default(), 0, D0, 0);
        assert_eq!(layout(&ch(&b), D0, true, 0).map(|l| l.data_len), Ok(0));
        b[2] = 24;
        assert_eq!(layout(&ch(&b), D0, true, 0).map_err(|e| e.fei), Err(2));
        b[2] = 72;
        b[0] = 8;
        assert_eq!(layout(&ch(&b), D0, true, 0).map_err(|e| e.fei), Err(0));
        b[0] = 4;
        put_u32(&mut b, 4, 10);
        assert_eq!(layout(&ch(&b), D0, true, 0).map_err(|e| e.fei), Err(4));
        // data claimed on an R2T-like header from the wrong side
        let r = r2t_pdu(
            &R2t {
                cccid: 1,
                ttag: 2,
                r2to: 0,
                r2tl: 4096,
            },
            D0,
        );
        assert!(layout(&ch(&r), D0, true, 0).is_err());
        assert_eq!(layout(&ch(&r), D0, false, 0).map(|l| l.plen), Ok(24));
        // PDO inside the header
        let mut c = capsule_cmd(&Sqe::default(), 16, D0, 0);
        c[3] = 8;
        assert_eq!(layout(&ch(&c), D0, true, 64).map_err(|e| e.fei), Err(3));
    }

    #[test]
    fn data_r2t_resp_and_term_req() {
        let h = DataHeader {
            cccid: 3,
            ttag: 4,
            datao: 8192,
            datal: 512,
        };
        let p = data_pdu(PduType::H2CData, &h, FLAG_DATA_LAST, D1, 0);
        let l = layout(&ch(&p), D1, true, 1 << 20).expect("layout");
        assert_eq!(l.data_len, 512);
        assert_eq!(parse_data_header(&p), Some(h));
        let cqe = Cqe {
            cid: 9,
            status: 3 << 1,
            ..Cqe::default()
        };
        let r = capsule_resp(&cqe, D1);
        assert_eq!(r.len(), 28);
        assert_eq!(layout(&ch(&r), D1, false, 0).map(|l| l.plen), Ok(28));
        let t = term_req(PduType::C2HTermReq, &PduError::field(2, "x"), &[7u8; 200]);
        assert_eq!(t.len(), TERM_REQ_MAX_PLEN);
        assert_eq!(parse_term_req(&t), Some((1, 2)));
        assert_eq!(layout(&ch(&t), D1, false, 0).map(|l| l.data_len), Ok(128));
    }
}
