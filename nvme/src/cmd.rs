//! Submission and completion queue entries.

use bytemuck::{Pod, Zeroable};

use crate::bytes::{nqn_at, put_nqn, put_u16, u16_at};
use crate::status::Status;

/// A 64-byte submission queue entry (command).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct Sqe {
    /// Opcode.
    pub opcode: u8,
    /// FUSE (bits 1:0) and PSDT (bits 7:6).
    pub flags: u8,
    /// Command identifier.
    pub cid: u16,
    /// Namespace id (for a fabrics command, byte 4 is the command type).
    pub nsid: u32,
    /// Dwords 2-3.
    pub cdw2: u32,
    /// Dword 3.
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// Data pointer: SGL descriptor 1 (16 bytes).
    pub dptr: [u8; 16],
    /// Dword 10.
    pub cdw10: u32,
    /// Dword 11.
    pub cdw11: u32,
    /// Dword 12.
    pub cdw12: u32,
    /// Dword 13.
    pub cdw13: u32,
    /// Dword 14.
    pub cdw14: u32,
    /// Dword 15.
    pub cdw15: u32,
}

const _: () = assert!(std::mem::size_of::<Sqe>() == 64);

/// A 16-byte completion queue entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct Cqe {
    /// Command specific dword 0.
    pub dw0: u32,
    /// Command specific dword 1.
    pub dw1: u32,
    /// SQ head pointer.
    pub sqhd: u16,
    /// SQ identifier.
    pub sqid: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag (bit 0) and status field (bits 15:1).
    pub status: u16,
}

const _: () = assert!(std::mem::size_of::<Cqe>() == 16);

impl Cqe {
    /// The status field.
    pub fn status(&self) -> Status {
        Status::from_cqe_bits(self.status)
    }
}

/// SGL descriptor 1 of a command, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sgl {
    /// Address (for in-capsule data: the offset into the capsule's data).
    pub address: u64,
    /// Length in bytes.
    pub length: u32,
    /// Descriptor identifier (type in bits 7:4, subtype in 3:0).
    pub id: u8,
}

impl Sqe {
    /// Decodes from exactly 64 bytes.
    pub fn from_bytes(b: &[u8; 64]) -> Self {
        bytemuck::pod_read_unaligned(b)
    }

    /// The 64 wire bytes.
    pub fn to_bytes(&self) -> [u8; 64] {
        bytemuck::cast(*self)
    }

    /// Fabrics command type (byte 4) of a fabrics command.
    pub fn fctype(&self) -> u8 {
        self.nsid.to_le_bytes()[0]
    }

    /// PSDT: 0 = PRPs, 1/2 = SGLs.
    pub fn psdt(&self) -> u8 {
        self.flags >> 6
    }

    /// SGL descriptor 1.
    pub fn sgl(&self) -> Sgl {
        let d = &self.dptr;
        let mut a = [0u8; 8];
        a.copy_from_slice(&d[0..8]);
        Sgl {
            address: u64::from_le_bytes(a),
            length: u32::from_le_bytes([d[8], d[9], d[10], d[11]]),
            id: d[15],
        }
    }

    /// Sets SGL descriptor 1.
    pub fn set_sgl(&mut self, sgl: Sgl) {
        self.dptr = [0; 16];
        self.dptr[0..8].copy_from_slice(&sgl.address.to_le_bytes());
        self.dptr[8..12].copy_from_slice(&sgl.length.to_le_bytes());
        self.dptr[15] = sgl.id;
    }

    /// Starting LBA (dwords 10-11) of Read, Write, Compare, Write Zeroes.
    pub fn slba(&self) -> u64 {
        u64::from(self.cdw10) | (u64::from(self.cdw11) << 32)
    }

    /// Number of logical blocks (dword 12 bits 15:0, zero-based, so 1..=65536).
    pub fn nlb(&self) -> u32 {
        (self.cdw12 & 0xFFFF) + 1
    }

    /// Force Unit Access (dword 12 bit 30).
    pub fn fua(&self) -> bool {
        self.cdw12 & (1 << 30) != 0
    }
}

/// Fields of a Fabrics Connect command (dwords 10-12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectCmd {
    /// Record format (0).
    pub recfmt: u16,
    /// Queue id (0 = admin).
    pub qid: u16,
    /// Submission queue size (zero-based).
    pub sqsize: u16,
    /// Connect attributes (bit 2: SQ flow control disabled).
    pub cattr: u8,
    /// Keep alive timeout in ms (admin queue only).
    pub kato: u32,
}

impl ConnectCmd {
    /// Decodes the command fields.
    pub fn from_sqe(s: &Sqe) -> Self {
        Self {
            recfmt: (s.cdw10 & 0xFFFF) as u16,
            qid: (s.cdw10 >> 16) as u16,
            sqsize: (s.cdw11 & 0xFFFF) as u16,
            cattr: ((s.cdw11 >> 16) & 0xFF) as u8,
            kato: s.cdw12,
        }
    }

    /// Encodes into a command.
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        Sqe {
            opcode: crate::spec::admin::FABRICS,
            cid,
            nsid: u32::from(crate::spec::fctype::CONNECT),
            cdw10: u32::from(self.recfmt) | (u32::from(self.qid) << 16),
            cdw11: u32::from(self.sqsize) | (u32::from(self.cattr) << 16),
            cdw12: self.kato,
            ..Sqe::default()
        }
    }
}

/// Connect command data (1024 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectData {
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Requested controller id (0xFFFF: any, dynamic model).
    pub cntlid: u16,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
}

/// Size of Connect data.
pub const CONNECT_DATA_LEN: usize = 1024;

impl ConnectData {
    /// Decodes; `None` if short or the NQNs are not UTF-8.
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < CONNECT_DATA_LEN {
            return None;
        }
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&b[0..16]);
        Some(Self {
            hostid,
            cntlid: u16_at(b, 16),
            subnqn: nqn_at(b, 256, 256)?,
            hostnqn: nqn_at(b, 512, 256)?,
        })
    }

    /// Encodes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; CONNECT_DATA_LEN];
        b[0..16].copy_from_slice(&self.hostid);
        put_u16(&mut b, 16, self.cntlid);
        put_nqn(&mut b, 256, 256, &self.subnqn);
        put_nqn(&mut b, 512, 256, &self.hostnqn);
        b
    }
}

/// Fields of Get Log Page (dwords 10-13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GetLogPage {
    /// Log page identifier.
    pub lid: u8,
    /// Log specific field.
    pub lsp: u8,
    /// Retain asynchronous event.
    pub rae: bool,
    /// Bytes requested.
    pub len: u64,
    /// Byte offset.
    pub offset: u64,
}

impl GetLogPage {
    /// Decodes.
    pub fn from_sqe(s: &Sqe) -> Self {
        let numdl = u64::from(s.cdw10 >> 16);
        let numdu = u64::from(s.cdw11 & 0xFFFF);
        Self {
            lid: (s.cdw10 & 0xFF) as u8,
            lsp: ((s.cdw10 >> 8) & 0x7F) as u8,
            rae: s.cdw10 & (1 << 15) != 0,
            len: ((numdu << 16 | numdl) + 1) * 4,
            offset: u64::from(s.cdw12) | (u64::from(s.cdw13) << 32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_round_trip() {
        let c = ConnectCmd {
            recfmt: 0,
            qid: 3,
            sqsize: 127,
            cattr: 0,
            kato: 5000,
        };
        assert_eq!(ConnectCmd::from_sqe(&c.to_sqe(7)), c);
        let d = ConnectData {
            hostid: [9; 16],
            cntlid: 0xFFFF,
            subnqn: "nqn.2026-11.io.duplex:x".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1".into(),
        };
        assert_eq!(ConnectData::parse(&d.to_bytes()), Some(d));
        assert_eq!(ConnectData::parse(&[0; 100]), None);
    }

    #[test]
    fn sqe_fields() {
        let mut s = Sqe {
            cdw10: 0x10,
            cdw11: 0x1,
            cdw12: 7 | (1 << 30),
            ..Sqe::default()
        };
        assert_eq!(s.slba(), (1 << 32) | 0x10);
        assert_eq!(s.nlb(), 8);
        assert!(s.fua());
        let g = Sgl {
            address: 0,
            length: 4096,
            id: crate::spec::sgl::TRANSPORT_DATA_BLOCK,
        };
        s.set_sgl(g);
        assert_eq!(s.sgl(), g);
        assert_eq!(Sqe::from_bytes(&s.to_bytes()), s);
        let glp = GetLogPage::from_sqe(&Sqe {
            cdw10: 0x0C | (1 << 15) | (0x3FF << 16),
            cdw11: 0,
            cdw12: 8,
            ..Sqe::default()
        });
        assert_eq!(
            (glp.lid, glp.rae, glp.len, glp.offset),
            (0x0C, true, 4096, 8)
        );
    }
}
