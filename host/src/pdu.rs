//! Reading PDUs sent by a controller.

use std::io::Read;

use duplex_nvme::tcp::{self, fes, CommonHeader, Digests, Layout, PduError, PduType};

use crate::{HostError, Result};

/// One PDU as received: its header (HLEN bytes, digest stripped) and data (digest checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    /// Type.
    pub pdu_type: PduType,
    /// Common header.
    pub ch: CommonHeader,
    /// The whole header (common header included).
    pub header: Vec<u8>,
    /// Data.
    pub data: Vec<u8>,
}

/// Reads one controller PDU: checks the common header against the negotiated `digests` and
/// `max_data`, verifies digests. A TermReq from the controller is [`HostError::Terminated`].
pub fn read(r: &mut impl Read, digests: Digests, max_data: usize) -> Result<Pdu> {
    let head = read_header(r, digests, max_data)?;
    let mut data = Vec::new();
    read_data(r, &head, &mut data)?;
    Ok(Pdu {
        pdu_type: head.layout.pdu_type,
        ch: head.ch,
        header: head.header,
        data,
    })
}

/// A PDU whose header has been read, its data not yet.
#[derive(Debug)]
pub struct Head {
    /// Common header.
    pub ch: CommonHeader,
    /// Where everything is.
    pub layout: Layout,
    /// The whole header (common header included, digest stripped).
    pub header: Vec<u8>,
}

/// Reads a controller PDU's header (checked as [`read`] does); its data is read next, with
/// [`read_data`], straight to where it belongs.
pub fn read_header(r: &mut impl Read, digests: Digests, max_data: usize) -> Result<Head> {
    let mut ch = [0u8; tcp::CH_LEN];
    r.read_exact(&mut ch)?;
    let c = CommonHeader::parse(&ch);
    let l = tcp::layout(&c, digests, false, max_data)?;
    let mut header = vec![0u8; tcp::CH_LEN + l.head_rest()];
    header[..tcp::CH_LEN].copy_from_slice(&ch);
    r.read_exact(&mut header[tcp::CH_LEN..])?;
    if l.header_digest && tcp::digest(&header[..l.hlen]) != header[l.hlen..l.hlen + tcp::DIGEST_LEN]
    {
        return Err(PduError::new(fes::HEADER_DIGEST, "header digest mismatch").into());
    }
    header.truncate(l.hlen);
    if l.pdu_type == PduType::C2HTermReq {
        let (fes, fei) = tcp::parse_term_req(&header).unwrap_or((0, 0));
        return Err(HostError::Terminated { fes, fei });
    }
    Ok(Head {
        ch: c,
        layout: l,
        header,
    })
}

/// Reads the data of the PDU `head` announced, appending it to `dest` (without zeroing it
/// first), and checks its digest.
pub fn read_data(r: &mut impl Read, head: &Head, dest: &mut Vec<u8>) -> Result<()> {
    let n = head.layout.data_len;
    let start = dest.len();
    dest.reserve(n);
    let got = r.by_ref().take(n as u64).read_to_end(dest)?;
    if got != n {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    if head.layout.data_digest {
        let mut d = [0u8; tcp::DIGEST_LEN];
        r.read_exact(&mut d)?;
        if tcp::digest(&dest[start..]) != d {
            return Err(PduError::new(fes::HEADER_DIGEST, "data digest mismatch").into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use duplex_nvme::cmd::Cqe;

    const D: Digests = Digests {
        header: true,
        data: true,
    };

    #[test]
    fn reads_a_response_and_data_and_checks_digests() {
        let cqe = Cqe {
            cid: 4,
            ..Cqe::default()
        };
        let mut wire = tcp::capsule_resp(&cqe, D);
        let h = tcp::DataHeader {
            cccid: 4,
            ttag: 0,
            datao: 0,
            datal: 3,
        };
        wire.extend_from_slice(&tcp::data_pdu(
            PduType::C2HData,
            &h,
            tcp::FLAG_DATA_LAST,
            D,
            0,
        ));
        wire.extend_from_slice(b"abc");
        wire.extend_from_slice(&tcp::digest(b"abc"));
        let mut r = &wire[..];
        let p = read(&mut r, D, 1 << 20).expect("resp");
        assert_eq!(p.pdu_type, PduType::CapsuleResp);
        assert_eq!(p.header.len(), 24);
        let p = read(&mut r, D, 1 << 20).expect("data");
        assert_eq!(
            (p.pdu_type, p.data.as_slice()),
            (PduType::C2HData, &b"abc"[..])
        );
        // A flipped data byte is a digest error.
        let mut bad = wire.clone();
        let n = bad.len();
        bad[n - 5] ^= 1;
        let mut r = &bad[..];
        read(&mut r, D, 1 << 20).expect("resp");
        assert!(matches!(
            read(&mut r, D, 1 << 20),
            Err(HostError::Protocol(_))
        ));
        // A host PDU type from a controller is refused.
        let cmd = tcp::capsule_cmd(&duplex_nvme::cmd::Sqe::default(), 0, D, 0);
        assert!(matches!(
            read(&mut &cmd[..], D, 0),
            Err(HostError::Protocol(_))
        ));
        // A TermReq ends the connection with its status.
        let t = tcp::term_req(PduType::C2HTermReq, &PduError::field(2, "x"), &[0; 8]);
        assert!(matches!(
            read(&mut &t[..], D, 0),
            Err(HostError::Terminated { fes: 1, fei: 2 })
        ));
        // Truncated input is an I/O error.
        assert!(matches!(
            read(&mut &wire[..10], D, 0),
            Err(HostError::Io(_))
        ));
    }
}
