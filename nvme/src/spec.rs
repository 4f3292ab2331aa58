//! Opcodes, identifiers and controller properties (NVM Express Base Specification 2.0, NVMe
//! over Fabrics 1.1).

/// Admin command opcodes.
pub mod admin {
    /// Delete I/O Submission Queue (PCIe controllers).
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue (PCIe controllers).
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Delete I/O Completion Queue (PCIe controllers).
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue (PCIe controllers).
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0A;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0C;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Fabrics command (the command type is in byte 4).
    pub const FABRICS: u8 = 0x7F;
}

/// NVM command set I/O opcodes.
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Compare.
    pub const COMPARE: u8 = 0x05;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
}

/// Fabrics command types (byte 4 of a fabrics command).
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
    /// Authentication Send.
    pub const AUTH_SEND: u8 = 0x05;
    /// Authentication Receive.
    pub const AUTH_RECV: u8 = 0x06;
    /// Disconnect.
    pub const DISCONNECT: u8 = 0x08;
}

/// Controller property offsets (Property Get/Set).
pub mod prop {
    /// Controller Capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version (4 bytes).
    pub const VS: u32 = 0x08;
    /// Controller Configuration (4 bytes).
    pub const CC: u32 = 0x14;
    /// Controller Status (4 bytes).
    pub const CSTS: u32 = 0x1C;
    /// NVM Subsystem Reset (4 bytes).
    pub const NSSR: u32 = 0x20;

    /// CC.EN.
    pub const CC_EN: u32 = 1;
    /// CC.SHN mask (bits 15:14).
    pub const CC_SHN_MASK: u32 = 3 << 14;
    /// CSTS.RDY.
    pub const CSTS_RDY: u32 = 1;
    /// CSTS.CFS (controller fatal status).
    pub const CSTS_CFS: u32 = 1 << 1;
    /// CSTS.SHST = shutdown complete (bits 3:2 = 10b).
    pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace.
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u8 = 0x01;
    /// Active namespace id list.
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    /// Namespace identification descriptor list.
    pub const NS_DESC_LIST: u8 = 0x03;
}

/// Feature identifiers.
pub mod feat {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Power Management.
    pub const POWER_MGMT: u8 = 0x02;
    /// Temperature Threshold.
    pub const TEMP_THRESHOLD: u8 = 0x04;
    /// Error Recovery.
    pub const ERROR_RECOVERY: u8 = 0x05;
    /// Volatile Write Cache.
    pub const VOLATILE_WC: u8 = 0x06;
    /// Number of Queues.
    pub const NUM_QUEUES: u8 = 0x07;
    /// Interrupt Coalescing.
    pub const IRQ_COALESCE: u8 = 0x08;
    /// Write Atomicity Normal.
    pub const WRITE_ATOMICITY: u8 = 0x0A;
    /// Asynchronous Event Configuration.
    pub const ASYNC_EVENT: u8 = 0x0B;
    /// Keep Alive Timer.
    pub const KATO: u8 = 0x0F;
    /// Host Identifier (PCIe: the 8- or 16-byte identifier reservations key hosts by).
    pub const HOST_ID: u8 = 0x81;
}

/// Memory-mapped controller registers of an NVMe over PCIe controller (BAR0), NVMe Base
/// Specification 2.0 section 3.1.4. CAP, VS, CC and CSTS share their offsets with the fabrics
/// properties in [`prop`].
pub mod reg {
    /// Controller Capabilities (8 bytes).
    pub const CAP: u64 = 0x00;
    /// Version (4 bytes).
    pub const VS: u64 = 0x08;
    /// Interrupt Mask Set (4 bytes).
    pub const INTMS: u64 = 0x0C;
    /// Interrupt Mask Clear (4 bytes).
    pub const INTMC: u64 = 0x10;
    /// Controller Configuration (4 bytes).
    pub const CC: u64 = 0x14;
    /// Controller Status (4 bytes).
    pub const CSTS: u64 = 0x1C;
    /// NVM Subsystem Reset (4 bytes).
    pub const NSSR: u64 = 0x20;
    /// Admin Queue Attributes (4 bytes).
    pub const AQA: u64 = 0x24;
    /// Admin Submission Queue Base Address (8 bytes).
    pub const ASQ: u64 = 0x28;
    /// Admin Completion Queue Base Address (8 bytes).
    pub const ACQ: u64 = 0x30;
    /// First doorbell (SQ 0 tail); queue y's SQ tail doorbell is at
    /// `DOORBELLS + (2y) * (4 << CAP.DSTRD)`, its CQ head doorbell at `DOORBELLS + (2y + 1) * ..`.
    pub const DOORBELLS: u64 = 0x1000;

    /// CAP.MQES: maximum queue entries supported, zero-based (bits 15:0).
    pub const fn cap_mqes(cap: u64) -> u32 {
        (cap & 0xFFFF) as u32
    }
    /// CAP.TO: worst-case time to ready, in 500 ms units (bits 31:24).
    pub const fn cap_to(cap: u64) -> u32 {
        ((cap >> 24) & 0xFF) as u32
    }
    /// CAP.DSTRD: doorbell stride, 4 << DSTRD bytes (bits 35:32).
    pub const fn cap_dstrd(cap: u64) -> u32 {
        ((cap >> 32) & 0xF) as u32
    }
    /// CAP.MPSMIN: minimum memory page size, 4 KiB << MPSMIN (bits 51:48).
    pub const fn cap_mpsmin(cap: u64) -> u32 {
        ((cap >> 48) & 0xF) as u32
    }
    /// CAP.MPSMAX: maximum memory page size, 4 KiB << MPSMAX (bits 55:52).
    pub const fn cap_mpsmax(cap: u64) -> u32 {
        ((cap >> 52) & 0xF) as u32
    }
    /// CAP.CQR: contiguous queues required (bit 16).
    pub const CAP_CQR: u64 = 1 << 16;
    /// CAP.CSS bit 37: the NVM command set.
    pub const CAP_CSS_NVM: u64 = 1 << 37;

    /// CC.EN.
    pub const CC_EN: u32 = 1;
    /// CC.CSS (bits 6:4): 000b = NVM command set.
    pub const CC_CSS_SHIFT: u32 = 4;
    /// CC.MPS (bits 10:7): memory page size 4 KiB << MPS.
    pub const CC_MPS_SHIFT: u32 = 7;
    /// CC.AMS (bits 13:11): 000b = round robin.
    pub const CC_AMS_SHIFT: u32 = 11;
    /// CC.SHN (bits 15:14): 01b normal shutdown, 10b abrupt shutdown.
    pub const CC_SHN_SHIFT: u32 = 14;
    /// CC.IOSQES (bits 19:16): log2 of the SQ entry size (6 = 64 bytes).
    pub const CC_IOSQES_SHIFT: u32 = 16;
    /// CC.IOCQES (bits 23:20): log2 of the CQ entry size (4 = 16 bytes).
    pub const CC_IOCQES_SHIFT: u32 = 20;

    /// CSTS.RDY.
    pub const CSTS_RDY: u32 = 1;
    /// CSTS.CFS: controller fatal status.
    pub const CSTS_CFS: u32 = 1 << 1;
    /// CSTS.SHST (bits 3:2) mask.
    pub const CSTS_SHST_MASK: u32 = 3 << 2;
    /// CSTS.SHST = 10b: shutdown processing complete.
    pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;
    /// CSTS.NSSRO: NVM subsystem reset occurred.
    pub const CSTS_NSSRO: u32 = 1 << 4;
}

/// Log page identifiers.
pub mod lid {
    /// Error Information.
    pub const ERROR: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART: u8 = 0x02;
    /// Firmware Slot Information.
    pub const FW_SLOT: u8 = 0x03;
    /// Changed Namespace List.
    pub const CHANGED_NS: u8 = 0x04;
    /// Commands Supported and Effects.
    pub const CMD_EFFECTS: u8 = 0x05;
    /// Asymmetric Namespace Access.
    pub const ANA: u8 = 0x0C;
    /// Discovery (discovery controllers only).
    pub const DISCOVERY: u8 = 0x70;
}

/// Asynchronous event types and information (completion dword 0 of an AER).
pub mod aen {
    /// Event type "notice".
    pub const TYPE_NOTICE: u32 = 2;
    /// Notice: namespace attribute changed (log page: changed namespace list).
    pub const NOTICE_NS_CHANGED: u32 = 0x00;
    /// Notice: ANA change (log page: ANA).
    pub const NOTICE_ANA_CHANGE: u32 = 0x03;
    /// Notice: discovery log page change.
    pub const NOTICE_DISC_CHANGE: u32 = 0xF0;
    /// Async Event Configuration bit enabling namespace attribute notices.
    pub const CFG_NS_ATTR: u32 = 1 << 8;
    /// Async Event Configuration bit enabling ANA change notices.
    pub const CFG_ANA_CHANGE: u32 = 1 << 11;
    /// Async Event Configuration bit enabling discovery log change notices.
    pub const CFG_DISC_CHANGE: u32 = 1 << 31;

    /// Completion dword 0 for an event.
    pub const fn dword0(event_type: u32, info: u32, log_page: u8) -> u32 {
        event_type | (info << 8) | ((log_page as u32) << 16)
    }
}

/// ANA states (ANA log page group descriptors).
pub mod ana {
    /// Optimized.
    pub const OPTIMIZED: u8 = 0x01;
    /// Non-optimized.
    pub const NON_OPTIMIZED: u8 = 0x02;
    /// Inaccessible.
    pub const INACCESSIBLE: u8 = 0x03;
    /// Persistent loss.
    pub const PERSISTENT_LOSS: u8 = 0x04;
    /// Change.
    pub const CHANGE: u8 = 0x0F;
}

/// The well-known NQN of the discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Largest NQN (bytes, without the terminating NUL).
pub const NQN_MAX: usize = 223;

/// SGL descriptor identifiers (byte 15 of a descriptor: type in bits 7:4, subtype in 3:0).
pub mod sgl {
    /// Data Block, subtype offset: data in the command capsule at the given offset.
    pub const DATA_BLOCK_OFFSET: u8 = 0x01;
    /// Transport Data Block, subtype transport specific: data moves by R2T/H2CData or C2HData.
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5A;
}
