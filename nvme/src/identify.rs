//! Identify data structures (4096 bytes each), built from typed parameters.

use crate::bytes::{put_ascii, put_nqn, put_u16, put_u32, put_u64};

/// Size of every Identify data structure.
pub const IDENTIFY_LEN: usize = 4096;

/// Controller type (CNTRLTYPE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControllerType {
    /// I/O controller.
    Io = 1,
    /// Discovery controller.
    Discovery = 2,
}

/// What Identify Controller reports.
#[derive(Clone, Debug)]
pub struct ControllerInfo {
    /// PCI vendor id (VID and SSVID).
    pub vendor_id: u16,
    /// Serial number (20 ASCII bytes).
    pub serial: String,
    /// Model number (40 ASCII bytes).
    pub model: String,
    /// Firmware revision (8 ASCII bytes).
    pub firmware: String,
    /// IEEE OUI (3 bytes, as on the wire).
    pub ieee_oui: [u8; 3],
    /// Controller id.
    pub cntlid: u16,
    /// Version (VER), e.g. 0x0001_0400 for 1.4.
    pub version: u32,
    /// I/O or discovery.
    pub cntrltype: ControllerType,
    /// Maximum data transfer size as a power of two of the minimum page size (0: no limit).
    pub mdts: u8,
    /// Asynchronous events supported (OAES).
    pub oaes: u32,
    /// Abort command limit (zero-based).
    pub acl: u8,
    /// Asynchronous event request limit (zero-based).
    pub aerl: u8,
    /// Error log page entries (zero-based).
    pub elpe: u8,
    /// Keep alive support granularity in 100 ms units (must be non-zero for fabrics).
    pub kas: u16,
    /// ANA: transition time in seconds; zero disables ANA reporting.
    pub anatt: u8,
    /// Number of ANA groups (ANAGRPMAX = NANAGRPID).
    pub ana_groups: u32,
    /// Number of namespaces (NN; also MNAN).
    pub nn: u32,
    /// Maximum outstanding commands per queue (MAXCMD).
    pub maxcmd: u16,
    /// Optional NVM command support (ONCS).
    pub oncs: u16,
    /// Volatile write cache present.
    pub vwc: bool,
    /// Subsystem NQN.
    pub subnqn: String,
    /// I/O queue command capsule size in bytes (64 + in-capsule data).
    pub ioccsz: u32,
    /// I/O queue response capsule size in bytes.
    pub iorcsz: u32,
    /// Multi-controller subsystem (CMIC bit 1).
    pub multi_controller: bool,
}

/// ONCS: Compare.
pub const ONCS_COMPARE: u16 = 1 << 0;
/// ONCS: Dataset Management.
pub const ONCS_DSM: u16 = 1 << 2;
/// ONCS: Write Zeroes.
pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;
/// ONCS: Reservations (Reservation Register, Report, Acquire and Release).
pub const ONCS_RESERVATIONS: u16 = 1 << 5;
/// OAES: namespace attribute notices.
pub const OAES_NS_ATTR: u32 = 1 << 8;
/// OAES: ANA change notices.
pub const OAES_ANA_CHANGE: u32 = 1 << 11;
/// OAES: discovery log page change notices.
pub const OAES_DISC_CHANGE: u32 = 1 << 31;

/// Builds Identify Controller (CNS 01h).
pub fn controller(c: &ControllerInfo) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    put_u16(&mut b, 0, c.vendor_id); // VID
    put_u16(&mut b, 2, c.vendor_id); // SSVID
    put_ascii(&mut b, 4, 20, &c.serial); // SN
    put_ascii(&mut b, 24, 40, &c.model); // MN
    put_ascii(&mut b, 64, 8, &c.firmware); // FR
    b[72] = 6; // RAB: recommended arbitration burst
    b[73..76].copy_from_slice(&c.ieee_oui); // IEEE
    let ana = c.anatt > 0;
    // CMIC: bit 0 multi-port, bit 1 multi-controller, bit 3 ANA reporting.
    b[76] = (u8::from(c.multi_controller) * 0b11) | if ana { 1 << 3 } else { 0 };
    b[77] = c.mdts; // MDTS
    put_u16(&mut b, 78, c.cntlid); // CNTLID
    put_u32(&mut b, 80, c.version); // VER
    put_u32(&mut b, 92, c.oaes); // OAES
    b[111] = c.cntrltype as u8; // CNTRLTYPE
    put_u16(&mut b, 256, 0); // OACS: no optional admin commands
    b[258] = c.acl; // ACL
    b[259] = c.aerl; // AERL
    b[260] = 0b11; // FRMW: slot 1 read-only, one slot
    b[261] = 1 << 1 | 1 << 2; // LPA: commands supported and effects log, extended data (offsets)
    b[262] = c.elpe; // ELPE
    put_u16(&mut b, 266, 0x157); // WCTEMP 70 C (in Kelvin)
    put_u16(&mut b, 268, 0x175); // CCTEMP 100 C
    put_u16(&mut b, 320, c.kas); // KAS
    if ana {
        // NVMe Base Specification, Identify Controller: byte 342 ANATT, byte 343 ANACAP, bytes
        // 347:344 ANAGRPMAX, bytes 351:348 NANAGRPID (right after ENDGIDMAX at 341:340). They
        // were one byte higher until a Linux host showed `anatt 0, anacap 10, anagrpmax 351`.
        // ANACAP: reports optimized, non-optimized, inaccessible, persistent loss, change;
        // ANAGRPID does not change while the namespace is attached (bit 6).
        b[342] = c.anatt; // ANATT
        b[343] = 0b0001_1111 | 1 << 6;
        put_u32(&mut b, 344, c.ana_groups); // ANAGRPMAX
        put_u32(&mut b, 348, c.ana_groups); // NANAGRPID
    }
    b[512] = 0x66; // SQES: 64 bytes
    b[513] = 0x44; // CQES: 16 bytes
    put_u16(&mut b, 514, c.maxcmd); // MAXCMD
    put_u32(&mut b, 516, c.nn); // NN
    put_u16(&mut b, 520, c.oncs); // ONCS
                                  // VWC: bit 0 present; bits 2:1 = 11b: Flush with NSID FFFFFFFFh is supported.
    b[525] = if c.vwc { 0b111 } else { 0b110 };
    // SGLS: SGLs supported (bits 1:0 = 01b), SGL offsets (bit 20).
    put_u32(&mut b, 536, 1 | 1 << 20);
    put_u32(&mut b, 540, c.nn); // MNAN
    put_nqn(&mut b, 768, 256, &c.subnqn); // SUBNQN
    if c.cntrltype == ControllerType::Io {
        put_u32(&mut b, 1792, c.ioccsz / 16); // IOCCSZ (16-byte units)
        put_u32(&mut b, 1796, c.iorcsz / 16); // IORCSZ
    }
    put_u16(&mut b, 1800, 0); // ICDOFF: in-capsule data right after the SQE
    b[1802] = 0; // FCATT: dynamic controller model
    b[1803] = 1; // MSDBD: one SGL data block descriptor
    b
}

/// What Identify Namespace reports.
#[derive(Clone, Copy, Debug)]
pub struct NamespaceInfo {
    /// Size in logical blocks (NSZE = NCAP).
    pub blocks: u64,
    /// Blocks in use (NUSE).
    pub used: u64,
    /// Logical block size (a power of two ≥ 512).
    pub block_size: u32,
    /// ANA group id (0: none).
    pub ana_group: u32,
    /// NGUID.
    pub nguid: [u8; 16],
    /// Shared namespace (may be reached through several controllers: NMIC bit 0).
    pub shared: bool,
    /// Reservation Capabilities (RESCAP; 0: none).
    pub rescap: u8,
}

/// Builds Identify Namespace (CNS 00h).
pub fn namespace(n: &NamespaceInfo) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    put_u64(&mut b, 0, n.blocks); // NSZE
    put_u64(&mut b, 8, n.blocks); // NCAP
    put_u64(&mut b, 16, n.used); // NUSE
                                 // NSFEAT: bit 0 thin provisioning, bit 3 NGUID/EUI64 never reused.
    b[24] = 1 | 1 << 3;
    b[25] = 0; // NLBAF: one format
    b[26] = 0; // FLBAS: format 0, no metadata
    b[30] = u8::from(n.shared); // NMIC
    b[31] = n.rescap; // RESCAP
                      // DLFEAT: deallocated blocks read as zeroes (bits 2:0 = 001b), Write Zeroes may
                      // deallocate (bit 3).
    b[33] = 0b1001;
    put_u32(&mut b, 92, n.ana_group); // ANAGRPID
    b[104..120].copy_from_slice(&n.nguid); // NGUID
                                           // LBAF0: MS 0, LBADS = log2(block size), RP 0 (best).
    put_u32(&mut b, 128, n.block_size.trailing_zeros() << 16);
    b
}

/// Builds the active namespace id list (CNS 02h): ids greater than `after`, ascending, at most
/// 1024.
pub fn active_ns_list(nsids: impl IntoIterator<Item = u32>, after: u32) -> Vec<u8> {
    let mut ids: Vec<u32> = nsids.into_iter().filter(|&n| n > after).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut b = vec![0u8; IDENTIFY_LEN];
    for (i, id) in ids.iter().take(IDENTIFY_LEN / 4).enumerate() {
        put_u32(&mut b, i * 4, *id);
    }
    b
}

/// Namespace identification descriptor types.
pub mod nidt {
    /// NGUID (16 bytes).
    pub const NGUID: u8 = 2;
    /// UUID (16 bytes).
    pub const UUID: u8 = 3;
    /// Command set identifier (1 byte).
    pub const CSI: u8 = 4;
}

/// Builds the namespace identification descriptor list (CNS 03h): NGUID, UUID and CSI (NVM).
pub fn ns_descriptors(nguid: &[u8; 16], uuid: &[u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let mut at = 0;
    for (t, v) in [
        (nidt::NGUID, &nguid[..]),
        (nidt::UUID, &uuid[..]),
        (nidt::CSI, &[0u8][..]),
    ] {
        b[at] = t;
        b[at + 1] = v.len() as u8;
        b[at + 4..at + 4 + v.len()].copy_from_slice(v);
        at += 4 + v.len();
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::{u16_at, u32_at, u64_at};

    #[test]
    fn controller_fields_land_at_their_offsets() {
        let c = ControllerInfo {
            vendor_id: 0x1d1d,
            serial: "SN1".into(),
            model: "duplex".into(),
            firmware: "0.1".into(),
            ieee_oui: [1, 2, 3],
            cntlid: 7,
            version: 0x0001_0400,
            cntrltype: ControllerType::Io,
            mdts: 5,
            oaes: OAES_ANA_CHANGE,
            acl: 3,
            aerl: 3,
            elpe: 63,
            kas: 10,
            anatt: 10,
            ana_groups: 2,
            nn: 1,
            maxcmd: 128,
            oncs: ONCS_DSM,
            vwc: true,
            subnqn: "nqn.x".into(),
            ioccsz: 64 + 8192,
            iorcsz: 16,
            multi_controller: true,
        };
        let b = controller(&c);
        assert_eq!(&b[4..7], b"SN1");
        assert_eq!(b[23], b' ');
        assert_eq!(u16_at(&b, 78), 7);
        assert_eq!(u32_at(&b, 80), 0x10400);
        assert_eq!(b[76], 0b1011);
        assert_eq!(u16_at(&b, 320), 10);
        assert_eq!(u32_at(&b, 1792), (64 + 8192) / 16);
        assert_eq!(&b[768..773], b"nqn.x");
        assert_eq!(b[773], 0);
        assert_eq!(b[111], 1);
        // The ANA fields at the specification's offsets, written down here from the
        // specification (and Linux's `struct nvme_id_ctrl`), not from the encoder: ANATT 342,
        // ANACAP 343, ANAGRPMAX 344..348, NANAGRPID 348..352, and nothing in the reserved bytes
        // around them.
        assert_eq!(&b[338..342], [0, 0, 0, 0], "NSETIDMAX, ENDGIDMAX");
        assert_eq!(b[342], 10, "ANATT");
        assert_eq!(b[343], 0x5f, "ANACAP");
        assert_eq!(&b[344..348], [2, 0, 0, 0], "ANAGRPMAX");
        assert_eq!(&b[348..352], [2, 0, 0, 0], "NANAGRPID");
        assert_eq!(&b[352..356], [0, 0, 0, 0], "PELS");
    }

    #[test]
    fn namespace_and_lists() {
        let n = namespace(&NamespaceInfo {
            blocks: 100,
            used: 100,
            block_size: 4096,
            ana_group: 1,
            nguid: [5; 16],
            shared: true,
            rescap: 0xFF,
        });
        assert_eq!(u64_at(&n, 0), 100);
        // Byte offsets from the specification (Identify Namespace: NMIC 30, RESCAP 31).
        assert_eq!((n[30], n[31]), (1, 0xFF));
        // ONCS bit 5 (Identify Controller byte 520): Reservations.
        assert_eq!(ONCS_RESERVATIONS, 0x20);
        assert_eq!(u32_at(&n, 128) >> 16, 12);
        assert_eq!(u32_at(&n, 92), 1);
        let l = active_ns_list([3, 1, 2], 1);
        assert_eq!((u32_at(&l, 0), u32_at(&l, 4), u32_at(&l, 8)), (2, 3, 0));
        let d = ns_descriptors(&[1; 16], &[2; 16]);
        assert_eq!(
            (d[0], d[1], d[4], d[20], d[21], d[24]),
            (2, 16, 1, 3, 16, 2)
        );
        assert_eq!((d[40], d[41]), (4, 1));
    }
}
