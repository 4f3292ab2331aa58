//! Log pages a target reports, built whole; [`window`] cuts the part a Get Log Page asked for.

use crate::bytes::{put_ascii, put_nqn, put_u16, put_u32, put_u64};

/// Cuts `len` bytes at `offset` out of `page`, zero-filled past its end: hosts read some logs
/// in fixed-size chunks past the end (nvme-cli reads the ANA log 4 KiB at a time), and the
/// Linux target answers those with zeroes too. `None` if `offset` is not dword aligned
/// (Invalid Field).
pub fn window(page: &[u8], offset: u64, len: usize) -> Option<Vec<u8>> {
    if offset % 4 != 0 {
        return None;
    }
    let mut out = vec![0u8; len];
    let off = usize::try_from(offset).unwrap_or(usize::MAX);
    if off < page.len() {
        let n = (page.len() - off).min(len);
        out[..n].copy_from_slice(&page[off..off + n]);
    }
    Some(out)
}

/// Error Information: `entries` empty entries (64 bytes each; error count 0 = unused).
pub fn error_info(entries: usize) -> Vec<u8> {
    vec![0u8; 64 * entries.max(1)]
}

/// I/O counters for SMART / Health.
#[derive(Clone, Copy, Debug, Default)]
pub struct HealthCounters {
    /// Bytes read by hosts.
    pub bytes_read: u64,
    /// Bytes written by hosts.
    pub bytes_written: u64,
    /// Read commands completed.
    pub reads: u64,
    /// Write commands completed.
    pub writes: u64,
    /// Power-on time in hours.
    pub power_on_hours: u64,
    /// Media and data integrity errors.
    pub media_errors: u64,
}

/// SMART / Health Information (512 bytes).
pub fn smart(c: &HealthCounters) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0] = 0; // critical warning: none
    put_u16(&mut b, 1, 273 + 35); // composite temperature: 35 C, in Kelvin
    b[3] = 100; // available spare
    b[4] = 10; // available spare threshold
    b[5] = 0; // percentage used
              // Data units are thousands of 512-byte units, rounded up.
    put_u64(&mut b, 32, (c.bytes_read / 512).div_ceil(1000));
    put_u64(&mut b, 48, (c.bytes_written / 512).div_ceil(1000));
    put_u64(&mut b, 64, c.reads);
    put_u64(&mut b, 80, c.writes);
    put_u64(&mut b, 112, 1); // power cycles
    put_u64(&mut b, 128, c.power_on_hours);
    put_u64(&mut b, 160, c.media_errors);
    b
}

/// Firmware Slot Information (512 bytes): slot 1 active, holding `revision`.
pub fn firmware_slot(revision: &str) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0] = 1; // AFI: slot 1 active
    put_ascii(&mut b, 8, 8, revision); // FRS1
    b
}

/// Changed Namespace List (4096 bytes): up to 1024 ids, or 0xFFFFFFFF first if more changed.
pub fn changed_ns_list(ids: &[u32]) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    if ids.len() > 1024 {
        put_u32(&mut b, 0, u32::MAX);
    } else {
        for (i, id) in ids.iter().enumerate() {
            put_u32(&mut b, i * 4, *id);
        }
    }
    b
}

/// Effects bits of Commands Supported and Effects.
pub mod effects {
    /// Command supported.
    pub const CSUPP: u32 = 1 << 0;
    /// Logical block content change.
    pub const LBCC: u32 = 1 << 1;
}

/// Commands Supported and Effects (4096 bytes): admin opcodes then I/O opcodes, each with its
/// effects word.
pub fn command_effects(admin: &[(u8, u32)], io: &[(u8, u32)]) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for &(op, e) in admin {
        put_u32(&mut b, usize::from(op) * 4, e);
    }
    for &(op, e) in io {
        put_u32(&mut b, 1024 + usize::from(op) * 4, e);
    }
    b
}

/// One ANA group.
#[derive(Clone, Debug)]
pub struct AnaGroup {
    /// Group id.
    pub id: u32,
    /// State (`spec::ana::*`).
    pub state: u8,
    /// Namespaces in the group.
    pub nsids: Vec<u32>,
}

/// Asymmetric Namespace Access log. With `groups_only` (LSP bit 0, RGO) the namespace lists
/// are left out.
pub fn ana(change_count: u64, groups: &[AnaGroup], groups_only: bool) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    put_u64(&mut b, 0, change_count);
    put_u16(&mut b, 8, groups.len() as u16);
    for g in groups {
        let mut d = vec![0u8; 32];
        put_u32(&mut d, 0, g.id);
        let n = if groups_only { 0 } else { g.nsids.len() };
        put_u32(&mut d, 4, n as u32);
        put_u64(&mut d, 8, change_count);
        d[16] = g.state;
        b.extend_from_slice(&d);
        if !groups_only {
            for id in &g.nsids {
                b.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
    b
}

/// Discovery log entry subtypes.
pub mod subtype {
    /// A referral to another discovery service.
    pub const DISCOVERY_REFERRAL: u8 = 1;
    /// An NVM subsystem.
    pub const NVME: u8 = 2;
    /// The current discovery subsystem.
    pub const CURRENT_DISCOVERY: u8 = 3;
}

/// One Discovery Log Page entry.
#[derive(Clone, Debug)]
pub struct DiscoveryEntry {
    /// Subtype.
    pub subtype: u8,
    /// Port id.
    pub port_id: u16,
    /// Transport address (IP).
    pub traddr: String,
    /// Transport service id (TCP port).
    pub trsvcid: String,
    /// IPv6 rather than IPv4.
    pub ipv6: bool,
    /// Subsystem NQN.
    pub subnqn: String,
    /// The port requires a secure channel (TLS 1.3): TREQ "required", TSAS SECTYPE TLS 1.3.
    pub tls: bool,
}

/// Discovery Log Page: 1024-byte header, 1024 bytes per entry.
pub fn discovery(genctr: u64, entries: &[DiscoveryEntry]) -> Vec<u8> {
    let mut b = vec![0u8; 1024 * (1 + entries.len())];
    put_u64(&mut b, 0, genctr);
    put_u64(&mut b, 8, entries.len() as u64);
    put_u16(&mut b, 16, 0); // RECFMT
    for (i, e) in entries.iter().enumerate() {
        let o = 1024 * (i + 1);
        b[o] = 3; // TRTYPE: TCP
        b[o + 1] = if e.ipv6 { 2 } else { 1 }; // ADRFAM
        b[o + 2] = e.subtype;
        // TREQ bits 1:0: 01b secure channel required, 10b not required.
        b[o + 3] = if e.tls { 0b01 } else { 0b10 };
        put_u16(&mut b, o + 4, e.port_id);
        put_u16(&mut b, o + 6, 0xFFFF); // CNTLID: dynamic
        put_u16(&mut b, o + 8, 32); // ASQSZ
        put_ascii(&mut b, o + 32, 32, &e.trsvcid);
        put_nqn(&mut b, o + 256, 256, &e.subnqn);
        put_ascii(&mut b, o + 512, 256, &e.traddr);
        // TSAS (TCP): SECTYPE 0 none, 2 TLS 1.3.
        b[o + 768] = if e.tls { 2 } else { 0 };
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::{u32_at, u64_at};

    #[test]
    fn window_cuts_and_pads() {
        let p: Vec<u8> = (0..10).collect();
        assert_eq!(window(&p, 8, 4), Some(vec![8, 9, 0, 0]));
        assert_eq!(window(&p, 12, 2), Some(vec![0, 0]));
        assert_eq!(window(&p, 4096, 4), Some(vec![0; 4]));
        assert_eq!(window(&p, 11, 2), None);
        assert_eq!(window(&p, u64::MAX - 3, 2), Some(vec![0, 0]));
    }

    #[test]
    fn ana_layout() {
        let g = [AnaGroup {
            id: 1,
            state: 1,
            nsids: vec![1, 2],
        }];
        let b = ana(5, &g, false);
        assert_eq!(b.len(), 16 + 32 + 8);
        assert_eq!((u64_at(&b, 0), b[8]), (5, 1));
        assert_eq!((u32_at(&b, 16), u32_at(&b, 20), b[32]), (1, 2, 1));
        assert_eq!((u32_at(&b, 48), u32_at(&b, 52)), (1, 2));
        assert_eq!(ana(5, &g, true).len(), 48);
    }

    #[test]
    fn discovery_layout() {
        let b = discovery(
            3,
            &[DiscoveryEntry {
                subtype: subtype::NVME,
                port_id: 1,
                traddr: "127.0.0.1".into(),
                trsvcid: "4420".into(),
                ipv6: false,
                subnqn: "nqn.x".into(),
                tls: false,
            }],
        );
        assert_eq!((u64_at(&b, 0), u64_at(&b, 8)), (3, 1));
        assert_eq!((b[1024], b[1025], b[1026]), (3, 1, 2));
        assert_eq!(&b[1024 + 32..1024 + 36], b"4420");
        assert_eq!(b[1024 + 36], b' ');
        assert_eq!(&b[1024 + 512..1024 + 521], b"127.0.0.1");
        assert_eq!(&b[1024 + 256..1024 + 261], b"nqn.x");
        // TREQ (byte 3): not required; TSAS SECTYPE (byte 768): none.
        assert_eq!((b[1024 + 3], b[1024 + 768]), (2, 0));
        let tls = discovery(
            1,
            &[DiscoveryEntry {
                subtype: subtype::NVME,
                port_id: 2,
                traddr: "127.0.0.1".into(),
                trsvcid: "4421".into(),
                ipv6: false,
                subnqn: "nqn.x".into(),
                tls: true,
            }],
        );
        assert_eq!((tls[1024 + 3], tls[1024 + 768]), (1, 2));
    }
}
