//! NVMe completion status: status code type (SCT), status code (SC) and Do Not Retry.

use std::fmt;

/// A completion status field as carried in bits 15:1 of CQE dword 3: SC in bits 7:0, SCT in
/// bits 10:8, DNR in bit 14 (of this 15-bit value).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status(pub u16);

const DNR: u16 = 1 << 14;

impl Status {
    /// Success.
    pub const SUCCESS: Self = Self(0);

    /// A status of type `sct`, code `sc`, without DNR.
    pub const fn new(sct: u8, sc: u8) -> Self {
        Self(((sct as u16 & 7) << 8) | sc as u16)
    }

    /// The same status with Do Not Retry set.
    pub const fn dnr(self) -> Self {
        Self(self.0 | DNR)
    }

    /// Status code type.
    pub const fn sct(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }

    /// Status code.
    pub const fn sc(self) -> u8 {
        (self.0 & 0xFF) as u8
    }

    /// Whether Do Not Retry is set.
    pub const fn is_dnr(self) -> bool {
        self.0 & DNR != 0
    }

    /// Whether this is success.
    pub const fn is_success(self) -> bool {
        self.0 & 0x7FF == 0
    }

    /// From the 16-bit descriptor status the datapath reports (`SCT << 8 | SC`); media and
    /// range errors are final, so DNR is set for everything but internal errors.
    pub const fn from_desc(v: u16) -> Self {
        let s = Self(v & 0x7FF);
        // Internal errors and path errors are retriable (on another path).
        if s.is_success() || (s.sct() == 0 && s.sc() == 0x06) || s.sct() == 3 {
            s
        } else {
            s.dnr()
        }
    }

    /// The value of CQE dword 3 bits 31:16 (phase bit 0 left clear).
    pub const fn cqe_bits(self) -> u16 {
        self.0 << 1
    }

    /// From CQE dword 3 bits 31:16.
    pub const fn from_cqe_bits(v: u16) -> Self {
        Self(v >> 1)
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Status(sct={:#x} sc={:#04x}{})",
            self.sct(),
            self.sc(),
            if self.is_dnr() { " dnr" } else { "" }
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match (self.sct(), self.sc()) {
            (0, 0x00) => "success",
            (0, 0x01) => "invalid command opcode",
            (0, 0x02) => "invalid field in command",
            (0, 0x03) => "command id conflict",
            (0, 0x04) => "data transfer error",
            (0, 0x06) => "internal error",
            (0, 0x07) => "command abort requested",
            (0, 0x08) => "command aborted due to SQ deletion",
            (0, 0x0B) => "invalid namespace or format",
            (0, 0x0C) => "command sequence error",
            (0, 0x0D) => "invalid SGL segment descriptor",
            (0, 0x0F) => "data SGL length invalid",
            (0, 0x11) => "SGL descriptor type invalid",
            (0, 0x13) => "invalid PRP offset",
            (0, 0x18) => "host identifier inconsistent format",
            (0, 0x1B) => "command aborted due to preempt and abort",
            (0, 0x80) => "LBA out of range",
            (0, 0x81) => "capacity exceeded",
            (0, 0x82) => "namespace not ready",
            (0, 0x83) => "reservation conflict",
            (1, 0x00) => "completion queue invalid",
            (1, 0x01) => "invalid queue identifier",
            (1, 0x02) => "invalid queue size",
            (1, 0x03) => "abort command limit exceeded",
            (1, 0x0C) => "invalid queue deletion",
            (1, 0x05) => "asynchronous event request limit exceeded",
            (1, 0x09) => "invalid log page",
            (1, 0x0D) => "feature not saveable",
            (1, 0x80) => "connect: incompatible format",
            (1, 0x81) => "connect: controller busy",
            (1, 0x82) => "connect: invalid parameters",
            (1, 0x84) => "connect: invalid host",
            (2, 0x80) => "write fault",
            (2, 0x81) => "unrecovered read error",
            (2, 0x82) => "end-to-end guard check error",
            (2, 0x85) => "compare failure",
            (3, 0x02) => "asymmetric access inaccessible",
            (3, 0x03) => "asymmetric access transition",
            _ => "status",
        };
        write!(f, "{name} (sct {:#x}, sc {:#04x})", self.sct(), self.sc())
    }
}

/// Generic command status (SCT 0).
pub mod generic {
    use super::Status;
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: Status = Status::new(0, 0x01).dnr();
    /// Invalid Field in Command.
    pub const INVALID_FIELD: Status = Status::new(0, 0x02).dnr();
    /// Command ID Conflict.
    pub const CID_CONFLICT: Status = Status::new(0, 0x03).dnr();
    /// Data Transfer Error.
    pub const DATA_TRANSFER: Status = Status::new(0, 0x04);
    /// Internal Error.
    pub const INTERNAL: Status = Status::new(0, 0x06);
    /// Command Abort Requested.
    pub const ABORT_REQUESTED: Status = Status::new(0, 0x07);
    /// Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: Status = Status::new(0, 0x08);
    /// Invalid Namespace or Format.
    pub const INVALID_NS: Status = Status::new(0, 0x0B).dnr();
    /// Command Sequence Error.
    pub const SEQUENCE: Status = Status::new(0, 0x0C).dnr();
    /// Data SGL Length Invalid: a length that disagrees with the SGL's.
    pub const SGL_INVALID_DATA: Status = Status::new(0, 0x0F).dnr();
    /// Invalid SGL Segment Descriptor.
    pub const INVALID_SGL: Status = Status::new(0, 0x0D).dnr();
    /// Data SGL Length Invalid.
    pub const SGL_LENGTH: Status = Status::new(0, 0x0F).dnr();
    /// SGL Descriptor Type Invalid.
    pub const SGL_TYPE: Status = Status::new(0, 0x11).dnr();
    /// Invalid PRP Offset.
    pub const PRP_OFFSET: Status = Status::new(0, 0x13).dnr();
    /// Host Identifier Inconsistent Format.
    pub const HOST_ID_INCONSISTENT: Status = Status::new(0, 0x18).dnr();
    /// Command Aborted due to Preempt and Abort.
    pub const ABORTED_PREEMPT: Status = Status::new(0, 0x1B);
    /// LBA Out of Range.
    pub const LBA_RANGE: Status = Status::new(0, 0x80).dnr();
    /// Capacity Exceeded.
    pub const CAPACITY_EXCEEDED: Status = Status::new(0, 0x81).dnr();
    /// Namespace Not Ready.
    pub const NS_NOT_READY: Status = Status::new(0, 0x82);
    /// Reservation Conflict.
    pub const RESERVATION_CONFLICT: Status = Status::new(0, 0x83).dnr();
}

/// Command specific status (SCT 1).
pub mod specific {
    use super::Status;
    /// Completion Queue Invalid.
    pub const INVALID_CQ: Status = Status::new(1, 0x00).dnr();
    /// Invalid Queue Identifier.
    pub const INVALID_QID: Status = Status::new(1, 0x01).dnr();
    /// Invalid Queue Size.
    pub const INVALID_QUEUE_SIZE: Status = Status::new(1, 0x02).dnr();
    /// Abort Command Limit Exceeded.
    pub const ABORT_LIMIT: Status = Status::new(1, 0x03).dnr();
    /// Invalid Queue Deletion.
    pub const INVALID_QUEUE_DELETION: Status = Status::new(1, 0x0C).dnr();
    /// Asynchronous Event Request Limit Exceeded.
    pub const AER_LIMIT: Status = Status::new(1, 0x05).dnr();
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: Status = Status::new(1, 0x09).dnr();
    /// Feature Identifier Not Saveable.
    pub const FEATURE_NOT_SAVEABLE: Status = Status::new(1, 0x0D).dnr();
    /// Connect Incompatible Format.
    pub const CONNECT_FORMAT: Status = Status::new(1, 0x80).dnr();
    /// Connect Controller Busy.
    pub const CONNECT_BUSY: Status = Status::new(1, 0x81);
    /// Connect Invalid Parameters.
    pub const CONNECT_INVALID_PARAM: Status = Status::new(1, 0x82).dnr();
    /// Connect Invalid Host.
    pub const CONNECT_INVALID_HOST: Status = Status::new(1, 0x84).dnr();
    /// Authentication Required: a command on a queue that has not authenticated (in-band
    /// authentication, DH-HMAC-CHAP); with DNR, so the host does not retry it.
    pub const AUTH_REQUIRED: Status = Status::new(1, 0x91).dnr();
}

/// Path related status (SCT 3). Never with Do Not Retry: a host with another path retries
/// there (Linux fails over on any SCT 3 status without DNR, and on an ANA status re-reads the
/// ANA log page).
pub mod path {
    use super::Status;
    /// Internal Path Error.
    pub const INTERNAL: Status = Status::new(3, 0x00);
    /// Asymmetric Access Persistent Loss.
    pub const ANA_PERSISTENT_LOSS: Status = Status::new(3, 0x01);
    /// Asymmetric Access Inaccessible.
    pub const ANA_INACCESSIBLE: Status = Status::new(3, 0x02);
    /// Asymmetric Access Transition.
    pub const ANA_TRANSITION: Status = Status::new(3, 0x03);
}

/// Media and data integrity errors (SCT 2).
pub mod media {
    use super::Status;
    /// Write Fault.
    pub const WRITE_FAULT: Status = Status::new(2, 0x80).dnr();
    /// Unrecovered Read Error.
    pub const READ_ERROR: Status = Status::new(2, 0x81).dnr();
    /// Compare Failure.
    pub const COMPARE_FAILURE: Status = Status::new(2, 0x85).dnr();
    /// End-to-end Guard Check Error.
    pub const GUARD_CHECK: Status = Status::new(2, 0x82).dnr();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_cqe_bits() {
        let s = specific::CONNECT_INVALID_HOST;
        assert_eq!((s.sct(), s.sc(), s.is_dnr()), (1, 0x84, true));
        assert_eq!(s.cqe_bits(), 0x8000 | (0x184 << 1));
        assert_eq!(Status::from_cqe_bits(s.cqe_bits() | 1), s);
        assert!(Status::SUCCESS.is_success());
        assert_eq!(Status::from_desc(0x0080), generic::LBA_RANGE);
        assert_eq!(Status::from_desc(0x0006), generic::INTERNAL);
        assert!(s.to_string().contains("invalid host"));
    }
}
