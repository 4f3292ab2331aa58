//! duplex-nvme: the NVMe and NVMe/TCP wire formats duplex speaks, with no I/O and no `unsafe`.
//!
//! * [`cmd`]: the 64-byte submission queue entry and the 16-byte completion queue entry, with
//!   typed accessors for the fields duplex reads (Read/Write, Fabrics Connect, Property Get/Set,
//!   Get Log Page, Features, Identify).
//! * [`status`]: NVMe status codes (type + code + DNR) as one value.
//! * [`spec`]: opcodes, feature and log identifiers, controller properties.
//! * [`identify`]: builders for Identify Controller, Identify Namespace, the active namespace
//!   list and namespace identification descriptors.
//! * [`log`]: builders for the log pages a target reports (error, SMART/health, firmware slot,
//!   changed namespace list, commands supported and effects, ANA, discovery).
//! * [`auth`]: in-band authentication (DH-HMAC-CHAP), the controller's side.
//! * [`tls`]: NVMe/TCP TLS 1.3 PSKs: the interchange format, identities, the derivations.
//! * [`tcp`]: NVMe/TCP PDUs (transport specification 1.0): headers with validation, encode and
//!   decode, header and data digests (CRC32C).
//!
//! Layouts follow the NVM Express Base Specification 2.0 and the NVMe/TCP Transport
//! Specification 1.0; every `#[repr(C)]` struct has a compile-time size assertion, and offsets
//! in builders are named after the specification's field names. Parsers never panic on any
//! input (fuzzed in `tests/fuzz_pdu.rs`).

pub mod auth;
pub mod cmd;
pub mod identify;
mod keytext;
pub mod log;
pub mod resv;
pub mod spec;
pub mod status;
pub mod tcp;
pub mod tls;

#[allow(dead_code)] // readers are used by tests and by hosts of the format (issue 5)
pub(crate) mod bytes {
    //! Little-endian field access on byte buffers whose length the caller has checked.

    /// Writes `v` at `off`.
    pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
        b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    /// Writes `v` at `off`.
    pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    /// Writes `v` at `off`.
    pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    /// Reads at `off`.
    pub fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }
    /// Reads at `off`.
    pub fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }
    /// Reads at `off`.
    pub fn u64_at(b: &[u8], off: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[off..off + 8]);
        u64::from_le_bytes(a)
    }
    /// Writes `s` space-padded into `b[off..off+len]` (NVMe ASCII fields), truncating.
    pub fn put_ascii(b: &mut [u8], off: usize, len: usize, s: &str) {
        let field = &mut b[off..off + len];
        field.fill(b' ');
        let n = s.len().min(len);
        field[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
    /// Writes `s` NUL-padded into `b[off..off+len]` (NQN fields), truncating to `len - 1`.
    pub fn put_nqn(b: &mut [u8], off: usize, len: usize, s: &str) {
        let field = &mut b[off..off + len];
        field.fill(0);
        let n = s.len().min(len - 1);
        field[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
    /// Reads a NUL-terminated (or full-width) string field; `None` if not UTF-8.
    pub fn nqn_at(b: &[u8], off: usize, len: usize) -> Option<String> {
        let field = b.get(off..off + len)?;
        let end = field.iter().position(|&c| c == 0).unwrap_or(len);
        std::str::from_utf8(&field[..end]).ok().map(str::to_owned)
    }
}
