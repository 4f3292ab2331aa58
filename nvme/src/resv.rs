//! NVMe reservations (NVM Express Base Specification 2.0, section 8.19 "Reservations"; commands
//! Reservation Register 0Dh, Reservation Report 0Eh, Reservation Acquire 11h and Reservation
//! Release 15h): a pure model of one namespace's reservation state, with no I/O.
//!
//! [`Reservations`] holds the registrants, the reservation (type and holder), the generation
//! counter (PRGEN) and the Persist Through Power Loss state. Each command is decoded from its
//! dword 10 (and 11) and data buffer ([`Register`], [`Acquire`], [`Release`], [`Report`]) and then
//! applied; a failure returns the completion [`Status`] the controller reports and leaves the
//! state untouched. A success returns an [`Outcome`]: the registrations the command removed, the
//! controllers whose outstanding commands must be aborted (Preempt and Abort), and the
//! Reservation Notification log page events ([`Notice`]) the caller raises later.
//! [`Reservations::check`] is the spec's table of which I/O commands a host may issue under each
//! reservation type.
//!
//! Registration is per host: the spec ties a registrant to a Host Identifier, so every
//! controller of that host shares it. The model records, for each registrant, the controller
//! through which it registered ([`HostCtrl`]); that controller id is what Reservation Report
//! shows, and it is the target of the registrant's notices and aborts. A caller whose hosts have
//! several controllers (the fabric target) raises each notice, and aborts, on every controller of
//! that host id; on a dual-ported drive each port is one controller with its own host id, so the
//! pair is exact. A fabrics target (dynamic controller model) passes controller id `0xFFFF`, as
//! the spec asks for Reservation Report.
//!
//! Where the specification leaves a choice this follows the Linux target
//! (`drivers/nvme/target/pr.c`); each such choice, and each place the model departs from that
//! target to follow the specification's text, is said on the item it concerns. Persistence is out
//! of scope: the PTPL state is accepted (CPTPL) and reported (PTPLS) but nothing is written
//! anywhere; a caller that implements Persist Through Power Loss stores and restores the state.
//! Reservation Notification Mask (feature 82h) filtering is the caller's too.

#![warn(missing_docs)]

use std::fmt;

use crate::bytes::{put_u16, put_u32, put_u64};
use crate::status::{generic, Status};

/// Reservation Conflict (generic status 83h), with Do Not Retry as the Linux target sets it.
pub const RESERVATION_CONFLICT: Status = crate::status::generic::RESERVATION_CONFLICT;

/// Host Identifier Inconsistent Format (generic status 18h): Reservation Report with the
/// 64-bit host identifier format while a registrant's host identifier is 128 bits.
pub const HOST_ID_INCONSISTENT_FORMAT: Status = crate::status::generic::HOST_ID_INCONSISTENT;

/// Reservation command opcodes (NVM command set I/O commands).
pub mod opc {
    /// Reservation Register.
    pub const REGISTER: u8 = 0x0D;
    /// Reservation Report.
    pub const REPORT: u8 = 0x0E;
    /// Reservation Acquire.
    pub const ACQUIRE: u8 = 0x11;
    /// Reservation Release.
    pub const RELEASE: u8 = 0x15;
}

/// Reservation Notification log page identifier.
pub const LID_RESERVATION_NOTIFICATION: u8 = 0x80;
/// Reservation Notification Mask feature identifier.
pub const FEAT_RESV_NOTIFICATION_MASK: u8 = 0x82;
/// Reservation Persistence feature identifier (dword 0 bit 0 is PTPL).
pub const FEAT_RESV_PERSISTENCE: u8 = 0x83;
/// Asynchronous event type "I/O command specific status".
pub const AEN_TYPE_IO_SPECIFIC: u32 = 6;
/// Asynchronous event information "Reservation Log Page Available" (log page 80h).
pub const AEN_INFO_RESERVATION_LOG: u32 = 0x00;
/// Identify Namespace RESCAP for this model: PTPL (bit 0), all six types (bits 6:1) and IEKEY
/// with the semantics of revision 1.3 and later (bit 7).
pub const RESCAP: u8 = 0xFF;

/// At most this many registrants per namespace: the state is kept whole on the drives and in
/// every controller's copy, so it is bounded. A host registering beyond it gets
/// [`REGISTRANTS_FULL`].
pub const MAX_REGISTRANTS: usize = 64;

/// What a Register beyond [`MAX_REGISTRANTS`] gets: the specification names no status for a
/// full registrant table, so Invalid Field in Command (with Do Not Retry), as for any request
/// the controller cannot take.
pub const REGISTRANTS_FULL: Status = generic::INVALID_FIELD;

/// Size of the Reservation Status data structure's header (EDS = 0).
pub const STATUS_HEADER_LEN: usize = 24;
/// Size of a Registered Controller data structure (EDS = 0).
pub const STATUS_ENTRY_LEN: usize = 24;
/// Size of the Reservation Status Extended data structure's header (EDS = 1).
pub const STATUS_EXT_HEADER_LEN: usize = 64;
/// Size of a Registered Controller Extended data structure (EDS = 1).
pub const STATUS_EXT_ENTRY_LEN: usize = 64;
/// Size of a Reservation Notification log page.
pub const NOTIFICATION_LOG_LEN: usize = 64;

/// A Host Identifier. 128-bit identifiers (fabrics, or Set Features Host Identifier with EXHID
/// = 1) use all 16 bytes; a 64-bit identifier is held in bytes 7:0 with bytes 15:8 zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct HostId(pub [u8; 16]);

impl HostId {
    /// A 64-bit host identifier (little-endian in bytes 7:0, as Set Features writes it).
    pub const fn from_u64(v: u64) -> Self {
        let l = v.to_le_bytes();
        Self([
            l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], 0, 0, 0, 0, 0, 0, 0, 0,
        ])
    }

    /// The 64-bit identifier, if bytes 15:8 are zero (what Reservation Report puts in HOSTID
    /// when EDS = 0).
    pub fn as_u64(&self) -> Option<u64> {
        if self.0[8..].iter().any(|&b| b != 0) {
            return None;
        }
        le64(&self.0, 0)
    }
}

impl fmt::Debug for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostId(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// A host and one of its controllers: the controller through which a registrant registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostCtrl {
    /// Host identifier.
    pub host: HostId,
    /// Controller id (`0xFFFF` for a dynamic controller).
    pub cntlid: u16,
}

/// Reservation type (RTYPE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ResvType {
    /// Write Exclusive: only the holder writes; anyone reads.
    WriteExclusive = 1,
    /// Exclusive Access: only the holder reads or writes.
    ExclusiveAccess = 2,
    /// Write Exclusive - Registrants Only: registrants write; anyone reads.
    WriteExclusiveRegistrantsOnly = 3,
    /// Exclusive Access - Registrants Only: only registrants read or write.
    ExclusiveAccessRegistrantsOnly = 4,
    /// Write Exclusive - All Registrants: every registrant is a holder; anyone reads.
    WriteExclusiveAllRegistrants = 5,
    /// Exclusive Access - All Registrants: every registrant is a holder; only they access.
    ExclusiveAccessAllRegistrants = 6,
}

impl ResvType {
    /// All six types, in RTYPE order.
    pub const ALL: [Self; 6] = [
        Self::WriteExclusive,
        Self::ExclusiveAccess,
        Self::WriteExclusiveRegistrantsOnly,
        Self::ExclusiveAccessRegistrantsOnly,
        Self::WriteExclusiveAllRegistrants,
        Self::ExclusiveAccessAllRegistrants,
    ];

    /// From RTYPE; `None` for the reserved values (0, 7-FFh).
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::WriteExclusive,
            2 => Self::ExclusiveAccess,
            3 => Self::WriteExclusiveRegistrantsOnly,
            4 => Self::ExclusiveAccessRegistrantsOnly,
            5 => Self::WriteExclusiveAllRegistrants,
            6 => Self::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// The RTYPE value.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Whether every registrant is a reservation holder (types 5 and 6).
    pub const fn all_registrants(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveAllRegistrants | Self::ExclusiveAccessAllRegistrants
        )
    }

    /// Whether registrants that are not holders have access (types 3 to 6).
    pub const fn registrants_access(self) -> bool {
        !matches!(self, Self::WriteExclusive | Self::ExclusiveAccess)
    }

    /// Whether reads are restricted too (types 2, 4, 6).
    pub const fn exclusive_access(self) -> bool {
        matches!(
            self,
            Self::ExclusiveAccess
                | Self::ExclusiveAccessRegistrantsOnly
                | Self::ExclusiveAccessAllRegistrants
        )
    }
}

/// Reads a little-endian u64 at `off`, `None` past the end.
fn le64(b: &[u8], off: usize) -> Option<u64> {
    b.get(off..off + 8).map(|_| crate::bytes::u64_at(b, off))
}

/// The two keys of Register's and Acquire's 16-byte data; shorter data: Data SGL Length
/// Invalid.
fn two_keys(data: &[u8]) -> Result<(u64, u64), Status> {
    match (le64(data, 0), le64(data, 8)) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(generic::SGL_LENGTH),
    }
}

/// Register's and Acquire's 16-byte data from its two keys.
fn key_data(first: u64, second: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    put_u64(&mut b, 0, first);
    put_u64(&mut b, 8, second);
    b
}

/// Ignore Existing Key, dword 10 bit 3 of all three commands.
const IEKEY: u32 = 1 << 3;

/// RTYPE, dword 10 bits 15:8 of Acquire and Release.
const fn rtype_field(cdw10: u32) -> u8 {
    ((cdw10 >> 8) & 0xFF) as u8
}

/// Reservation Register Action (RREGA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterAction {
    /// 000b: Register Reservation Key.
    Register = 0,
    /// 001b: Unregister Reservation Key.
    Unregister = 1,
    /// 010b: Replace Reservation Key.
    Replace = 2,
}

/// Change Persist Through Power Loss State (CPTPL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cptpl {
    /// 00b: no change.
    NoChange,
    /// 10b: reservations are released and registrants cleared on a power on (PTPL = 0).
    Clear,
    /// 11b: reservations and registrants persist across a power loss (PTPL = 1).
    Set,
}

/// A Reservation Register command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Register {
    /// RREGA.
    pub action: RegisterAction,
    /// IEKEY: skip the CRKEY check (Unregister and Replace).
    pub iekey: bool,
    /// CPTPL, applied when the command succeeds.
    pub cptpl: Cptpl,
    /// Current reservation key (Unregister, Replace).
    pub crkey: u64,
    /// New reservation key (Register, Replace).
    pub nrkey: u64,
}

impl Register {
    /// Decodes dword 10 and the 16-byte data (CRKEY, NRKEY). Reserved RREGA or CPTPL values:
    /// Invalid Field in Command; data shorter than 16 bytes: Data SGL Length Invalid.
    pub fn decode(cdw10: u32, data: &[u8]) -> Result<Self, Status> {
        let action = match cdw10 & 7 {
            0 => RegisterAction::Register,
            1 => RegisterAction::Unregister,
            2 => RegisterAction::Replace,
            _ => return Err(generic::INVALID_FIELD),
        };
        let cptpl = match cdw10 >> 30 {
            0 => Cptpl::NoChange,
            2 => Cptpl::Clear,
            3 => Cptpl::Set,
            _ => return Err(generic::INVALID_FIELD),
        };
        let (crkey, nrkey) = two_keys(data)?;
        Ok(Self {
            action,
            iekey: cdw10 & IEKEY != 0,
            cptpl,
            crkey,
            nrkey,
        })
    }

    /// Dword 10.
    pub fn cdw10(&self) -> u32 {
        let cptpl = match self.cptpl {
            Cptpl::NoChange => 0,
            Cptpl::Clear => 2,
            Cptpl::Set => 3,
        };
        self.action as u32 | if self.iekey { IEKEY } else { 0 } | (cptpl << 30)
    }

    /// The 16-byte data buffer.
    pub fn data(&self) -> [u8; 16] {
        key_data(self.crkey, self.nrkey)
    }
}

/// Reservation Acquire Action (RACQA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcquireAction {
    /// 000b: Acquire.
    Acquire = 0,
    /// 001b: Preempt.
    Preempt = 1,
    /// 010b: Preempt and Abort.
    PreemptAbort = 2,
}

/// A Reservation Acquire command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acquire {
    /// RACQA.
    pub action: AcquireAction,
    /// RTYPE of the reservation to create.
    pub rtype: ResvType,
    /// Current reservation key of the issuing host.
    pub crkey: u64,
    /// Preempt reservation key (Preempt, Preempt and Abort).
    pub prkey: u64,
}

impl Acquire {
    /// Decodes dword 10 and the 16-byte data (CRKEY, PRKEY). Reserved RACQA or RTYPE, or IEKEY
    /// set: Invalid Field in Command (IEKEY as the Linux target: since revision 1.3 the key is
    /// always checked for Acquire); data shorter than 16 bytes: Data SGL Length Invalid.
    pub fn decode(cdw10: u32, data: &[u8]) -> Result<Self, Status> {
        let action = match cdw10 & 7 {
            0 => AcquireAction::Acquire,
            1 => AcquireAction::Preempt,
            2 => AcquireAction::PreemptAbort,
            _ => return Err(generic::INVALID_FIELD),
        };
        if cdw10 & IEKEY != 0 {
            return Err(generic::INVALID_FIELD);
        }
        let rtype = ResvType::from_u8(rtype_field(cdw10)).ok_or(generic::INVALID_FIELD)?;
        let (crkey, prkey) = two_keys(data)?;
        Ok(Self {
            action,
            rtype,
            crkey,
            prkey,
        })
    }

    /// Dword 10.
    pub fn cdw10(&self) -> u32 {
        self.action as u32 | (u32::from(self.rtype.code()) << 8)
    }

    /// The 16-byte data buffer.
    pub fn data(&self) -> [u8; 16] {
        key_data(self.crkey, self.prkey)
    }
}

/// Reservation Release Action (RRELA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseAction {
    /// 000b: Release.
    Release = 0,
    /// 001b: Clear.
    Clear = 1,
}

/// A Reservation Release command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Release {
    /// RRELA.
    pub action: ReleaseAction,
    /// RTYPE as sent: compared with the reservation's type only when the issuer holds it.
    pub rtype: u8,
    /// Current reservation key of the issuing host.
    pub crkey: u64,
}

impl Release {
    /// Decodes dword 10 and the 8-byte data (CRKEY). Reserved RRELA or IEKEY set: Invalid Field
    /// in Command (IEKEY as the Linux target); data shorter than 8 bytes: Data SGL Length
    /// Invalid.
    pub fn decode(cdw10: u32, data: &[u8]) -> Result<Self, Status> {
        let action = match cdw10 & 7 {
            0 => ReleaseAction::Release,
            1 => ReleaseAction::Clear,
            _ => return Err(generic::INVALID_FIELD),
        };
        if cdw10 & IEKEY != 0 {
            return Err(generic::INVALID_FIELD);
        }
        let crkey = le64(data, 0).ok_or(generic::SGL_LENGTH)?;
        Ok(Self {
            action,
            rtype: rtype_field(cdw10),
            crkey,
        })
    }

    /// Dword 10.
    pub fn cdw10(&self) -> u32 {
        self.action as u32 | (u32::from(self.rtype) << 8)
    }

    /// The 8-byte data buffer.
    pub fn data(&self) -> [u8; 8] {
        self.crkey.to_le_bytes()
    }
}

/// A Reservation Report command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// Bytes the host's buffer holds: (NUMD + 1) * 4.
    pub len: u64,
    /// EDS: the extended data structure (128-bit host identifiers) is requested.
    pub eds: bool,
}

impl Report {
    /// Decodes dwords 10 (NUMD, zero-based) and 11 (EDS, bit 0).
    pub fn decode(cdw10: u32, cdw11: u32) -> Self {
        Self {
            len: (u64::from(cdw10) + 1) * 4,
            eds: cdw11 & 1 != 0,
        }
    }
}

/// The kind of access a command makes, for [`Reservations::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// The read command group: Read, Compare, Verify (and Zone Management Receive).
    Read,
    /// The write command group: Write, Write Uncorrectable, Write Zeroes, Dataset Management,
    /// Copy, Flush (and Zone Append, Zone Management Send).
    Write,
}

impl Access {
    /// The group of an NVM command set I/O opcode; `None` for commands reservations do not
    /// restrict, which includes the four reservation commands (always allowed; each checks its
    /// own keys). Flush is in the write group as in the Linux target.
    pub const fn of_io_opcode(opcode: u8) -> Option<Self> {
        match opcode {
            0x02 | 0x05 | 0x0C | 0x7A => Some(Self::Read),
            0x00 | 0x01 | 0x04 | 0x08 | 0x09 | 0x19 | 0x79 | 0x7D => Some(Self::Write),
            _ => None,
        }
    }
}

/// A Reservation Notification log page type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NoticeKind {
    /// 1h: the host's registration was removed by another host's Preempt.
    RegistrationPreempted = 1,
    /// 2h: the reservation was released (or its type changed by a Preempt).
    ReservationReleased = 2,
    /// 3h: the reservation and registrations were cleared by another host.
    ReservationPreempted = 3,
}

/// A notification to raise: a Reservation Notification log page entry for `to`'s host (on every
/// controller of that host), followed by an asynchronous event (I/O command specific status,
/// Reservation Log Page Available) if the host enabled it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Notice {
    /// The registrant notified (host, and the controller it registered through).
    pub to: HostCtrl,
    /// Log page type.
    pub kind: NoticeKind,
}

/// What a successful command did beyond its status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Registrations the command removed, in registration order, including the issuer's own
    /// (Unregister; a Preempt whose PRKEY matches the issuer's key).
    pub unregistered: Vec<HostCtrl>,
    /// Preempt and Abort only: the hosts whose registrations it removed (the same list as
    /// `unregistered`, the issuer included if it lost its own registration, as in the Linux
    /// target). The caller aborts the outstanding commands of every controller of these hosts
    /// on this namespace before completing the command.
    pub abort: Vec<HostCtrl>,
    /// Notifications to raise, in order; never addressed to the issuing host.
    pub notices: Vec<Notice>,
}

/// One registrant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registrant {
    /// Host identifier.
    pub host: HostId,
    /// Controller the host registered through (shown by Reservation Report).
    pub cntlid: u16,
    /// Reservation key.
    pub key: u64,
}

impl Registrant {
    /// The (host, controller) pair.
    pub fn ctrl(&self) -> HostCtrl {
        HostCtrl {
            host: self.host,
            cntlid: self.cntlid,
        }
    }
}

/// Who holds the reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    /// Types 1 to 4: one host.
    One(HostId),
    /// Types 5 and 6: every registrant.
    All,
}

/// The reservation on the namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    rtype: ResvType,
    holder: Holder,
}

impl Held {
    fn new(rtype: ResvType, by: HostId) -> Self {
        let holder = if rtype.all_registrants() {
            Holder::All
        } else {
            Holder::One(by)
        };
        Self { rtype, holder }
    }
}

/// The reservation state of one namespace.
///
/// Invariants (checked by the tests after every operation): a single holder is a registrant; an
/// all-registrants reservation exists only while there is a registrant; the generation never
/// decreases (it wraps at 2^32 as the spec's counter does); a failed command changes nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reservations {
    registrants: Vec<Registrant>,
    held: Option<Held>,
    generation: u32,
    ptpl: bool,
}

impl Reservations {
    /// No registrants, no reservation, generation 0, PTPL off.
    pub fn new() -> Self {
        Self::default()
    }

    /// The generation (PRGEN): incremented by every successful Reservation Register (including
    /// a re-registration with the same key), Preempt, Preempt and Abort, and Clear.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Persist Through Power Loss state (reported only; persistence is the caller's).
    pub fn ptpl(&self) -> bool {
        self.ptpl
    }

    /// The reservation type, if a reservation is held.
    pub fn rtype(&self) -> Option<ResvType> {
        self.held.map(|h| h.rtype)
    }

    /// The single reservation holder; `None` without a reservation or under an
    /// all-registrants type (where every registrant holds it: see [`Self::is_holder`]).
    pub fn holder(&self) -> Option<HostId> {
        match self.held {
            Some(Held {
                holder: Holder::One(h),
                ..
            }) => Some(h),
            _ => None,
        }
    }

    /// Whether `host` is a reservation holder.
    pub fn is_holder(&self, host: HostId) -> bool {
        match self.held {
            None => false,
            Some(Held {
                holder: Holder::One(h),
                ..
            }) => h == host,
            Some(Held {
                holder: Holder::All,
                ..
            }) => self.registrant(host).is_some(),
        }
    }

    /// The registrants, in registration order.
    pub fn registrants(&self) -> &[Registrant] {
        &self.registrants
    }

    /// `host`'s registration.
    pub fn registrant(&self, host: HostId) -> Option<&Registrant> {
        self.registrants.iter().find(|r| r.host == host)
    }

    fn position(&self, host: HostId) -> Option<usize> {
        self.registrants.iter().position(|r| r.host == host)
    }

    /// `host`'s registrant entry if its key is `crkey`, else Reservation Conflict (Acquire and
    /// Release from a non-registrant or with a wrong key).
    fn keyed(&self, host: HostId, crkey: u64) -> Result<&Registrant, Status> {
        match self.registrant(host) {
            Some(r) if r.key == crkey => Ok(r),
            _ => Err(RESERVATION_CONFLICT),
        }
    }

    /// Removes every registrant `remove` selects, listing it in `out.unregistered`, then drops
    /// the reservation if its holder went (single holder) or nobody is left (all registrants).
    fn remove_where(&mut self, remove: impl Fn(&Registrant) -> bool, out: &mut Outcome) {
        self.registrants.retain(|r| {
            if remove(r) {
                out.unregistered.push(r.ctrl());
                false
            } else {
                true
            }
        });
        let gone = match self.held {
            None => false,
            Some(Held {
                holder: Holder::One(h),
                ..
            }) => !self.registrants.iter().any(|r| r.host == h),
            Some(Held {
                holder: Holder::All,
                ..
            }) => self.registrants.is_empty(),
        };
        if gone {
            self.held = None;
        }
    }

    /// Appends a `kind` notice for every registrant but `except`.
    fn notify_others(&self, except: HostId, kind: NoticeKind, out: &mut Outcome) {
        out.notices.extend(
            self.registrants
                .iter()
                .filter(|r| r.host != except)
                .map(|r| Notice { to: r.ctrl(), kind }),
        );
    }

    /// Reservation Register from `who`.
    ///
    /// * Register: a new registrant with NRKEY (CRKEY and IEKEY are not used). A host already
    ///   registered with NRKEY succeeds with no change (the generation still advances, as for
    ///   every successful Register command); with another key, Reservation Conflict. A zero
    ///   NRKEY is accepted, as the Linux target does.
    /// * Unregister: CRKEY must be the host's key unless IEKEY; a non-registrant gets
    ///   Reservation Conflict. Unregistering a single holder releases the reservation, and for
    ///   the Registrants Only types notifies the other registrants (Reservation Released).
    ///   Under an all-registrants type the reservation stays while any registrant remains and
    ///   ends silently with the last one.
    /// * Replace: CRKEY must match unless IEKEY; the key becomes NRKEY and a holder stays the
    ///   holder. A non-registrant gets Reservation Conflict even with IEKEY (the Linux target;
    ///   SPDK registers it instead).
    ///
    /// On success CPTPL is applied and the generation advances.
    pub fn register(&mut self, who: HostCtrl, cmd: &Register) -> Result<Outcome, Status> {
        let mut out = Outcome::default();
        let pos = self.position(who.host);
        let key_ok = |key: u64| cmd.iekey || key == cmd.crkey;
        match (cmd.action, pos) {
            (RegisterAction::Register, Some(i)) => {
                if self.registrants[i].key != cmd.nrkey {
                    return Err(RESERVATION_CONFLICT);
                }
            }
            (RegisterAction::Register, None) => {
                if self.registrants.len() >= MAX_REGISTRANTS {
                    return Err(REGISTRANTS_FULL);
                }
                self.registrants.push(Registrant {
                    host: who.host,
                    cntlid: who.cntlid,
                    key: cmd.nrkey,
                });
            }
            (RegisterAction::Unregister, Some(i)) => {
                if !key_ok(self.registrants[i].key) {
                    return Err(RESERVATION_CONFLICT);
                }
                let before = self.held;
                self.remove_where(|r| r.host == who.host, &mut out);
                if let Some(Held {
                    rtype,
                    holder: Holder::One(h),
                }) = before
                {
                    if h == who.host
                        && matches!(
                            rtype,
                            ResvType::WriteExclusiveRegistrantsOnly
                                | ResvType::ExclusiveAccessRegistrantsOnly
                        )
                    {
                        self.notify_others(who.host, NoticeKind::ReservationReleased, &mut out);
                    }
                }
            }
            (RegisterAction::Replace, Some(i)) => {
                if !key_ok(self.registrants[i].key) {
                    return Err(RESERVATION_CONFLICT);
                }
                self.registrants[i].key = cmd.nrkey;
            }
            (RegisterAction::Unregister | RegisterAction::Replace, None) => {
                return Err(RESERVATION_CONFLICT)
            }
        }
        match cmd.cptpl {
            Cptpl::NoChange => {}
            Cptpl::Clear => self.ptpl = false,
            Cptpl::Set => self.ptpl = true,
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(out)
    }

    /// Reservation Acquire from `who`, whose key must be CRKEY (else Reservation Conflict).
    ///
    /// * Acquire: with no reservation, `who` becomes the holder of RTYPE. A holder acquiring
    ///   the type it holds succeeds with no change; any other case is Reservation Conflict.
    ///   Under an all-registrants type every registrant is a holder, so any registrant may
    ///   acquire that same type again (the specification; the Linux target only lets the
    ///   registrant that created it).
    /// * Preempt / Preempt and Abort, by the reservation in place:
    ///   - none: registrants whose key is PRKEY are unregistered (the issuer too, if its key
    ///     matches); no reservation is created; none matching is Reservation Conflict.
    ///   - all registrants, PRKEY = 0: `who` creates a reservation of RTYPE and every other
    ///     registrant is unregistered.
    ///   - all registrants, PRKEY != 0: registrants with key PRKEY are unregistered, the
    ///     reservation stays (ending if nobody is left); none matching is Reservation Conflict.
    ///   - single holder whose key is PRKEY (`who` itself included, which is how a holder
    ///     changes the type): `who` becomes the holder of RTYPE, every other registrant with key
    ///     PRKEY is unregistered, and if the type changed the remaining registrants but `who`
    ///     are notified (Reservation Released). The Linux target lets a holder preempting itself
    ///     change the type whatever PRKEY is and unregisters nobody then; this follows the
    ///     specification's cases instead.
    ///   - single holder, other PRKEY != 0: as "none" (the reservation stays).
    ///   - single holder, PRKEY = 0: Invalid Field in Command.
    ///
    ///   Every host unregistered but `who` is notified (Registration Preempted). A successful
    ///   preempt advances the generation. Preempt and Abort also lists the unregistered hosts
    ///   in [`Outcome::abort`].
    pub fn acquire(&mut self, who: HostId, cmd: &Acquire) -> Result<Outcome, Status> {
        self.keyed(who, cmd.crkey)?;
        let mut out = Outcome::default();
        match cmd.action {
            AcquireAction::Acquire => match self.held {
                None => self.held = Some(Held::new(cmd.rtype, who)),
                Some(h) if h.rtype == cmd.rtype && self.is_holder(who) => {}
                Some(_) => return Err(RESERVATION_CONFLICT),
            },
            AcquireAction::Preempt | AcquireAction::PreemptAbort => {
                let type_changed = self.preempt(who, cmd.rtype, cmd.prkey, &mut out)?;
                let preempted: Vec<Notice> = out
                    .unregistered
                    .iter()
                    .filter(|c| c.host != who)
                    .map(|&to| Notice {
                        to,
                        kind: NoticeKind::RegistrationPreempted,
                    })
                    .collect();
                out.notices.extend(preempted);
                if type_changed {
                    self.notify_others(who, NoticeKind::ReservationReleased, &mut out);
                }
                if cmd.action == AcquireAction::PreemptAbort {
                    out.abort = out.unregistered.clone();
                }
                self.generation = self.generation.wrapping_add(1);
            }
        }
        Ok(out)
    }

    /// The state change of a preempt (see [`Self::acquire`]); `Ok(true)` if a single holder's
    /// reservation was taken over with a different type.
    fn preempt(
        &mut self,
        who: HostId,
        rtype: ResvType,
        prkey: u64,
        out: &mut Outcome,
    ) -> Result<bool, Status> {
        let by_key = |this: &mut Self, out: &mut Outcome| {
            if !this.registrants.iter().any(|r| r.key == prkey) {
                return Err(RESERVATION_CONFLICT);
            }
            this.remove_where(|r| r.key == prkey, out);
            Ok(false)
        };
        match self.held {
            None => by_key(self, out),
            Some(Held {
                holder: Holder::All,
                ..
            }) => {
                if prkey != 0 {
                    return by_key(self, out);
                }
                self.held = Some(Held::new(rtype, who));
                self.remove_where(|r| r.host != who, out);
                Ok(false)
            }
            Some(Held {
                holder: Holder::One(h),
                rtype: old,
            }) => {
                let holder_key = self.registrant(h).map(|r| r.key);
                if holder_key == Some(prkey) {
                    self.held = Some(Held::new(rtype, who));
                    self.remove_where(|r| r.key == prkey && r.host != who, out);
                    Ok(old != rtype)
                } else if prkey != 0 {
                    by_key(self, out)
                } else {
                    Err(generic::INVALID_FIELD)
                }
            }
        }
    }

    /// Reservation Release from `who`, whose key must be CRKEY (else Reservation Conflict).
    ///
    /// * Release: no reservation, or `who` not a holder: success with no effect. A holder
    ///   naming a type other than the reservation's: Invalid Field in Command (the
    ///   specification; the Linux target answers Reservation Conflict). Otherwise the
    ///   reservation ends; for types other than Write Exclusive and Exclusive Access the other
    ///   registrants are notified (Reservation Released). Under an all-registrants type any
    ///   registrant, being a holder, releases it for all. The generation does not change.
    /// * Clear: every registration and the reservation are removed, the generation advances,
    ///   and every registrant but `who` is notified (Reservation Preempted).
    pub fn release(&mut self, who: HostId, cmd: &Release) -> Result<Outcome, Status> {
        self.keyed(who, cmd.crkey)?;
        let mut out = Outcome::default();
        match cmd.action {
            ReleaseAction::Release => {
                let Some(held) = self.held else {
                    return Ok(out);
                };
                if !self.is_holder(who) {
                    return Ok(out);
                }
                if held.rtype.code() != cmd.rtype {
                    return Err(generic::INVALID_FIELD);
                }
                self.held = None;
                if held.rtype.registrants_access() {
                    self.notify_others(who, NoticeKind::ReservationReleased, &mut out);
                }
            }
            ReleaseAction::Clear => {
                self.notify_others(who, NoticeKind::ReservationPreempted, &mut out);
                out.unregistered = self.registrants.iter().map(Registrant::ctrl).collect();
                self.registrants.clear();
                self.held = None;
                self.generation = self.generation.wrapping_add(1);
            }
        }
        Ok(out)
    }

    /// Whether `host` may issue a command of kind `access`: Reservation Conflict if not. The
    /// specification's table, for a host that is not a holder (holders, and everyone when
    /// there is no reservation, may do both):
    ///
    /// | type                                 | registrant read/write | non-registrant read/write |
    /// |--------------------------------------|-----------------------|---------------------------|
    /// | 1 Write Exclusive                    | yes / no              | yes / no                  |
    /// | 2 Exclusive Access                   | no / no               | no / no                   |
    /// | 3 Write Exclusive, Registrants Only  | yes / yes             | yes / no                  |
    /// | 4 Exclusive Access, Registrants Only | yes / yes             | no / no                   |
    /// | 5 Write Exclusive, All Registrants   | (holder)              | yes / no                  |
    /// | 6 Exclusive Access, All Registrants  | (holder)              | no / no                   |
    pub fn check(&self, host: HostId, access: Access) -> Result<(), Status> {
        let Some(held) = self.held else {
            return Ok(());
        };
        if self.is_holder(host) {
            return Ok(());
        }
        let allowed_as_registrant =
            held.rtype.registrants_access() && self.registrant(host).is_some();
        let allowed =
            allowed_as_registrant || (access == Access::Read && !held.rtype.exclusive_access());
        if allowed {
            Ok(())
        } else {
            Err(RESERVATION_CONFLICT)
        }
    }

    /// [`Self::check`] for an NVM command set I/O opcode; commands reservations do not restrict
    /// (see [`Access::of_io_opcode`]) pass.
    pub fn check_io(&self, host: HostId, opcode: u8) -> Result<(), Status> {
        match Access::of_io_opcode(opcode) {
            Some(a) => self.check(host, a),
            None => Ok(()),
        }
    }

    /// The Reservation Status data structure (EDS = 0: 24-byte header and 24-byte Registered
    /// Controller entries with 64-bit host identifiers) or the extended one (EDS = 1: 64-byte
    /// header and 64-byte entries with 128-bit host identifiers), one entry per registrant in
    /// registration order, cut to the first `max_len` bytes. REGCTL counts every registrant
    /// even when the cut leaves some out, so a host can size its next read. The result is never
    /// longer than the structure: the caller zero-fills the rest of the host's buffer (a
    /// buffer smaller than the header is answered with what fits, not an error).
    ///
    /// EDS = 0 while a registrant's host identifier does not fit 64 bits (see
    /// [`HostId::as_u64`]): Host Identifier Inconsistent Format. A fabrics target, whose host
    /// identifiers are always 128 bits, gets the Linux target's answer to EDS = 0 as soon as
    /// anyone has registered.
    pub fn report(&self, eds: bool, max_len: usize) -> Result<Vec<u8>, Status> {
        let (head, entry) = if eds {
            (STATUS_EXT_HEADER_LEN, STATUS_EXT_ENTRY_LEN)
        } else {
            (STATUS_HEADER_LEN, STATUS_ENTRY_LEN)
        };
        let mut b = vec![0u8; head + entry * self.registrants.len()];
        put_u32(&mut b, 0, self.generation);
        b[4] = self.held.map_or(0, |h| h.rtype.code());
        put_u16(
            &mut b,
            5,
            u16::try_from(self.registrants.len()).unwrap_or(u16::MAX),
        );
        b[9] = u8::from(self.ptpl);
        for (i, r) in self.registrants.iter().enumerate() {
            let off = head + i * entry;
            put_u16(&mut b, off, r.cntlid);
            b[off + 2] = u8::from(self.is_holder(r.host)); // RCSTS bit 0
            if eds {
                put_u64(&mut b, off + 8, r.key);
                b[off + 16..off + 32].copy_from_slice(&r.host.0);
            } else {
                let id = r.host.as_u64().ok_or(HOST_ID_INCONSISTENT_FORMAT)?;
                put_u64(&mut b, off + 8, id);
                put_u64(&mut b, off + 16, r.key);
            }
        }
        b.truncate(max_len);
        Ok(b)
    }
}

/// A Reservation Notification log page (64 bytes): `count` is the log page count (a wrapping
/// per-controller counter that skips 0), `kind` `None` for an empty page, `available` the
/// number of pages still queued, `nsid` the namespace.
pub fn notification_log_page(
    count: u64,
    kind: Option<NoticeKind>,
    available: u8,
    nsid: u32,
) -> [u8; NOTIFICATION_LOG_LEN] {
    let mut b = [0u8; NOTIFICATION_LOG_LEN];
    put_u64(&mut b, 0, count);
    b[8] = kind.map_or(0, |k| k as u8);
    b[9] = available;
    put_u32(&mut b, 12, nsid);
    b
}

/// The whole reservation state of a namespace, to keep elsewhere (on the drives, in another
/// controller) and build again ([`Reservations::state`], [`Reservations::from_state`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResvState {
    /// The registrants, in registration order.
    pub registrants: Vec<Registrant>,
    /// The reservation's type, if one is held.
    pub rtype: Option<ResvType>,
    /// The holder of a single-holder reservation (types 1 to 4); `None` without a reservation
    /// and for types 5 and 6, where every registrant holds it.
    pub holder: Option<HostId>,
    /// The generation (PRGEN).
    pub generation: u32,
    /// Persist Through Power Loss.
    pub ptpl: bool,
}

/// Why a [`ResvState`] is not one [`Reservations`] can be in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// More than [`MAX_REGISTRANTS`] registrants.
    #[error("more than {MAX_REGISTRANTS} registrants")]
    TooManyRegistrants,
    /// A host registered twice.
    #[error("a host is registered twice")]
    DuplicateHost,
    /// A single-holder type without a holder, or the holder not a registrant.
    #[error("the reservation's holder is not a registrant")]
    HolderNotRegistered,
    /// A holder named for no reservation or for an all-registrants type.
    #[error("a holder is named where the reservation has none")]
    UnexpectedHolder,
    /// An all-registrants reservation with nobody registered.
    #[error("an all-registrants reservation without registrants")]
    NoRegistrants,
}

impl ResvState {
    /// The state as it is kept elsewhere (the export table, a channel answer, the record on
    /// the drives): registrants as (host identifier, controller id, key) in registration order,
    /// the type code (0: none, unknown codes read as none), the holder (all zero: none).
    pub fn from_kept(
        registrants: impl IntoIterator<Item = ([u8; 16], u16, u64)>,
        rtype: u8,
        holder: [u8; 16],
        generation: u32,
        ptpl: bool,
    ) -> Self {
        Self {
            registrants: registrants
                .into_iter()
                .map(|(host, cntlid, key)| Registrant {
                    host: HostId(host),
                    cntlid,
                    key,
                })
                .collect(),
            rtype: ResvType::from_u8(rtype),
            holder: (holder != [0; 16]).then_some(HostId(holder)),
            generation,
            ptpl,
        }
    }
}

impl Reservations {
    /// The whole state, to keep.
    pub fn state(&self) -> ResvState {
        ResvState {
            registrants: self.registrants.clone(),
            rtype: self.rtype(),
            holder: self.holder(),
            generation: self.generation,
            ptpl: self.ptpl,
        }
    }

    /// Builds the state kept with [`Self::state`] again, refusing one no sequence of commands
    /// could have left (read from a drive, it may be anything).
    pub fn from_state(state: &ResvState) -> Result<Self, StateError> {
        if state.registrants.len() > MAX_REGISTRANTS {
            return Err(StateError::TooManyRegistrants);
        }
        for (i, r) in state.registrants.iter().enumerate() {
            if state.registrants[..i].iter().any(|o| o.host == r.host) {
                return Err(StateError::DuplicateHost);
            }
        }
        let held = match (state.rtype, state.holder) {
            (None, None) => None,
            (None, Some(_)) => return Err(StateError::UnexpectedHolder),
            (Some(t), h) if t.all_registrants() => {
                if h.is_some() {
                    return Err(StateError::UnexpectedHolder);
                }
                if state.registrants.is_empty() {
                    return Err(StateError::NoRegistrants);
                }
                Some(Held {
                    rtype: t,
                    holder: Holder::All,
                })
            }
            (Some(t), Some(h)) if state.registrants.iter().any(|r| r.host == h) => Some(Held {
                rtype: t,
                holder: Holder::One(h),
            }),
            (Some(_), _) => return Err(StateError::HolderNotRegistered),
        };
        Ok(Self {
            registrants: state.registrants.clone(),
            held,
            generation: state.generation,
            ptpl: state.ptpl,
        })
    }

    /// Sets Persist Through Power Loss (Set Features Reservation Persistence, 83h).
    pub fn set_ptpl(&mut self, ptpl: bool) {
        self.ptpl = ptpl;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::{u16_at, u32_at, u64_at};

    const A: HostCtrl = HostCtrl {
        host: HostId::from_u64(0xA),
        cntlid: 1,
    };
    const B: HostCtrl = HostCtrl {
        host: HostId::from_u64(0xB),
        cntlid: 2,
    };
    const C: HostCtrl = HostCtrl {
        host: HostId::from_u64(0xC),
        cntlid: 3,
    };
    const KA: u64 = 0xA1;
    const KB: u64 = 0xB1;
    const KC: u64 = 0xC1;

    use AcquireAction::{Acquire as Acq, Preempt, PreemptAbort};
    use ReleaseAction::{Clear, Release as Rel};
    use ResvType::*;

    fn register(r: &mut Reservations, who: HostCtrl, key: u64) -> Result<Outcome, Status> {
        r.register(
            who,
            &Register {
                action: RegisterAction::Register,
                iekey: false,
                cptpl: Cptpl::NoChange,
                crkey: 0,
                nrkey: key,
            },
        )
    }

    fn regop(
        r: &mut Reservations,
        who: HostCtrl,
        action: RegisterAction,
        iekey: bool,
        crkey: u64,
        nrkey: u64,
    ) -> Result<Outcome, Status> {
        let cmd = Register {
            action,
            iekey,
            cptpl: Cptpl::NoChange,
            crkey,
            nrkey,
        };
        r.register(who, &cmd)
    }

    fn acquire(
        r: &mut Reservations,
        who: HostCtrl,
        action: AcquireAction,
        rtype: ResvType,
        crkey: u64,
        prkey: u64,
    ) -> Result<Outcome, Status> {
        let cmd = Acquire {
            action,
            rtype,
            crkey,
            prkey,
        };
        r.acquire(who.host, &cmd)
    }

    fn release(
        r: &mut Reservations,
        who: HostCtrl,
        action: ReleaseAction,
        rtype: u8,
        crkey: u64,
    ) -> Result<Outcome, Status> {
        r.release(
            who.host,
            &Release {
                action,
                rtype,
                crkey,
            },
        )
    }

    /// A, B, C registered with KA, KB, KC; generation 3.
    fn three() -> Reservations {
        let mut r = Reservations::new();
        for (h, k) in [(A, KA), (B, KB), (C, KC)] {
            register(&mut r, h, k).expect("register");
        }
        assert_eq!(r.generation(), 3);
        r
    }

    fn notice(to: HostCtrl, kind: NoticeKind) -> Notice {
        Notice { to, kind }
    }

    fn check_invariants(r: &Reservations) {
        match r.held {
            None => {}
            Some(Held {
                holder: Holder::One(h),
                rtype,
            }) => {
                assert!(!rtype.all_registrants());
                assert!(r.registrant(h).is_some(), "holder is a registrant");
            }
            Some(Held {
                holder: Holder::All,
                rtype,
            }) => {
                assert!(rtype.all_registrants());
                assert!(!r.registrants.is_empty());
            }
        }
        let holders = r.registrants.iter().filter(|x| r.is_holder(x.host)).count();
        match r.rtype() {
            None => assert_eq!(holders, 0),
            Some(t) if t.all_registrants() => assert_eq!(holders, r.registrants.len()),
            Some(_) => assert_eq!(holders, 1),
        }
        for (i, x) in r.registrants.iter().enumerate() {
            assert!(r.registrants[i + 1..].iter().all(|y| y.host != x.host));
        }
    }

    #[test]
    fn decode_and_encode() {
        let reg = Register {
            action: RegisterAction::Replace,
            iekey: true,
            cptpl: Cptpl::Set,
            crkey: 5,
            nrkey: 6,
        };
        assert_eq!(reg.cdw10(), 2 | 8 | (3 << 30));
        assert_eq!(Register::decode(reg.cdw10(), &reg.data()), Ok(reg));
        assert_eq!(Register::decode(3, &[0; 16]), Err(generic::INVALID_FIELD));
        assert_eq!(
            Register::decode(1 << 30, &[0; 16]),
            Err(generic::INVALID_FIELD)
        );
        assert_eq!(Register::decode(0, &[0; 15]), Err(generic::SGL_LENGTH));

        let acq = Acquire {
            action: PreemptAbort,
            rtype: ExclusiveAccessAllRegistrants,
            crkey: 7,
            prkey: 8,
        };
        assert_eq!(acq.cdw10(), 2 | (6 << 8));
        assert_eq!(Acquire::decode(acq.cdw10(), &acq.data()), Ok(acq));
        assert_eq!(
            Acquire::decode(3 | (1 << 8), &[0; 16]),
            Err(generic::INVALID_FIELD)
        );
        assert_eq!(
            Acquire::decode(8 | (1 << 8), &[0; 16]),
            Err(generic::INVALID_FIELD)
        );
        assert_eq!(Acquire::decode(0, &[0; 16]), Err(generic::INVALID_FIELD));
        assert_eq!(
            Acquire::decode(7 << 8, &[0; 16]),
            Err(generic::INVALID_FIELD)
        );
        assert_eq!(Acquire::decode(1 << 8, &[0; 8]), Err(generic::SGL_LENGTH));

        let rel = Release {
            action: Clear,
            rtype: 3,
            crkey: 9,
        };
        assert_eq!(Release::decode(rel.cdw10(), &rel.data()), Ok(rel));
        assert_eq!(Release::decode(2, &[0; 8]), Err(generic::INVALID_FIELD));
        assert_eq!(Release::decode(8, &[0; 8]), Err(generic::INVALID_FIELD));
        assert_eq!(Release::decode(0, &[0; 7]), Err(generic::SGL_LENGTH));

        assert_eq!(Report::decode(5, 1), Report { len: 24, eds: true });
        assert_eq!(
            Report::decode(u32::MAX, 0),
            Report {
                len: 1 << 34,
                eds: false
            }
        );
        assert_eq!(RESERVATION_CONFLICT.sc(), 0x83);
        assert!(RESERVATION_CONFLICT
            .to_string()
            .contains("reservation conflict"));
        for t in ResvType::ALL {
            assert_eq!(ResvType::from_u8(t.code()), Some(t));
        }
        assert_eq!(ResvType::from_u8(0), None);
        assert_eq!(ResvType::from_u8(7), None);
        assert_eq!(HostId::from_u64(0x1234).as_u64(), Some(0x1234));
        assert_eq!(HostId([1; 16]).as_u64(), None);
        assert_eq!(
            format!("{:?}", HostId::from_u64(0xAB)),
            format!("HostId(ab{})", "0".repeat(30))
        );
    }

    #[test]
    fn register_replace_unregister() {
        let mut r = Reservations::new();
        assert_eq!(register(&mut r, A, KA), Ok(Outcome::default()));
        assert_eq!(r.generation(), 1);
        // Registering again with the same key succeeds and still counts.
        assert_eq!(register(&mut r, A, KA), Ok(Outcome::default()));
        assert_eq!(r.generation(), 2);
        // Another key: conflict, nothing changes.
        let before = r.clone();
        assert_eq!(register(&mut r, A, KB), Err(RESERVATION_CONFLICT));
        assert_eq!(r, before);
        // Replace with the wrong current key; then the right one; then IEKEY.
        assert_eq!(
            regop(&mut r, A, RegisterAction::Replace, false, 0x99, 0x55),
            Err(RESERVATION_CONFLICT)
        );
        assert!(regop(&mut r, A, RegisterAction::Replace, false, KA, 0x55).is_ok());
        assert_eq!(r.registrant(A.host).map(|x| x.key), Some(0x55));
        assert!(regop(&mut r, A, RegisterAction::Replace, true, 0x99, KA).is_ok());
        assert_eq!(r.registrant(A.host).map(|x| x.key), Some(KA));
        assert_eq!(r.generation(), 4);
        // Replace and unregister from a non-registrant: conflict, even with IEKEY.
        for (action, iekey) in [
            (RegisterAction::Replace, false),
            (RegisterAction::Replace, true),
            (RegisterAction::Unregister, false),
            (RegisterAction::Unregister, true),
        ] {
            assert_eq!(
                regop(&mut r, B, action, iekey, KB, KB),
                Err(RESERVATION_CONFLICT)
            );
        }
        // Unregister: key checked unless IEKEY.
        assert_eq!(
            regop(&mut r, A, RegisterAction::Unregister, false, KB, 0),
            Err(RESERVATION_CONFLICT)
        );
        let out = regop(&mut r, A, RegisterAction::Unregister, false, KA, 0).expect("unregister");
        assert_eq!(out.unregistered, vec![A]);
        assert!(out.notices.is_empty() && out.abort.is_empty());
        assert!(r.registrants().is_empty());
        register(&mut r, A, KA).expect("register");
        assert!(regop(&mut r, A, RegisterAction::Unregister, true, 0, 0).is_ok());
        assert_eq!(r.generation(), 7);
        assert!(r.registrants().is_empty());
        check_invariants(&r);
    }

    #[test]
    fn cptpl_is_applied_on_success_only() {
        let mut r = Reservations::new();
        let mut cmd = Register {
            action: RegisterAction::Register,
            iekey: false,
            cptpl: Cptpl::Set,
            crkey: 0,
            nrkey: KA,
        };
        r.register(A, &cmd).expect("register");
        assert!(r.ptpl());
        assert_eq!(r.report(true, 64).expect("report")[9], 1);
        cmd.cptpl = Cptpl::Clear;
        cmd.nrkey = KB; // conflicting: nothing applied
        assert_eq!(r.register(A, &cmd), Err(RESERVATION_CONFLICT));
        assert!(r.ptpl());
        cmd.nrkey = KA;
        r.register(A, &cmd).expect("re-register");
        assert!(!r.ptpl());
        cmd.cptpl = Cptpl::NoChange;
        r.register(A, &cmd).expect("re-register");
        assert!(!r.ptpl());
        assert_eq!(r.report(true, 64).expect("report")[9], 0);
    }

    /// Each type x holder / registrant / non-registrant x read / write on a three-host
    /// namespace: A holds (or, for all-registrants types, created), B is registered, C is not.
    #[test]
    fn access_matrix() {
        // (type, registrant read, registrant write, non-registrant read, non-registrant write)
        let table = [
            (WriteExclusive, true, false, true, false),
            (ExclusiveAccess, false, false, false, false),
            (WriteExclusiveRegistrantsOnly, true, true, true, false),
            (ExclusiveAccessRegistrantsOnly, true, true, false, false),
            (WriteExclusiveAllRegistrants, true, true, true, false),
            (ExclusiveAccessAllRegistrants, true, true, false, false),
        ];
        let allowed = |r: &Reservations, h: HostCtrl, a: Access| match r.check(h.host, a) {
            Ok(()) => true,
            Err(s) => {
                assert_eq!(s, RESERVATION_CONFLICT);
                false
            }
        };
        for (t, rr, rw, nr, nw) in table {
            let mut r = Reservations::new();
            for h in [A, B, C] {
                assert!(allowed(&r, h, Access::Read) && allowed(&r, h, Access::Write));
            }
            register(&mut r, A, KA).expect("register");
            register(&mut r, B, KB).expect("register");
            acquire(&mut r, A, Acq, t, KA, 0).expect("acquire");
            assert_eq!(r.rtype(), Some(t));
            assert_eq!(r.holder(), (!t.all_registrants()).then_some(A.host));
            assert!(r.is_holder(A.host));
            assert_eq!(r.is_holder(B.host), t.all_registrants());
            assert!(!r.is_holder(C.host));
            assert!(
                allowed(&r, A, Access::Read) && allowed(&r, A, Access::Write),
                "{t:?}"
            );
            assert_eq!(allowed(&r, B, Access::Read), rr, "{t:?} registrant read");
            assert_eq!(allowed(&r, B, Access::Write), rw, "{t:?} registrant write");
            assert_eq!(
                allowed(&r, C, Access::Read),
                nr,
                "{t:?} non-registrant read"
            );
            assert_eq!(
                allowed(&r, C, Access::Write),
                nw,
                "{t:?} non-registrant write"
            );
            // Opcode classification feeds the same table.
            assert_eq!(r.check_io(C.host, 0x02).is_ok(), nr);
            assert_eq!(r.check_io(C.host, 0x01).is_ok(), nw);
            assert!(r.check_io(C.host, opc::REPORT).is_ok());
            assert!(r.check_io(C.host, opc::REGISTER).is_ok());
            check_invariants(&r);
        }
    }

    #[test]
    fn opcode_groups() {
        for op in [0x02, 0x05, 0x0C] {
            assert_eq!(Access::of_io_opcode(op), Some(Access::Read));
        }
        for op in [0x00, 0x01, 0x04, 0x08, 0x09, 0x19] {
            assert_eq!(Access::of_io_opcode(op), Some(Access::Write));
        }
        for op in [opc::REGISTER, opc::REPORT, opc::ACQUIRE, opc::RELEASE] {
            assert_eq!(Access::of_io_opcode(op), None);
        }
    }

    #[test]
    fn acquire_rules() {
        let mut r = three();
        // Non-registrant and wrong key: conflict.
        let mut d = Reservations::new();
        assert_eq!(
            acquire(&mut d, A, Acq, WriteExclusive, KA, 0),
            Err(RESERVATION_CONFLICT)
        );
        assert_eq!(
            acquire(&mut r, A, Acq, WriteExclusive, KB, 0),
            Err(RESERVATION_CONFLICT)
        );
        assert_eq!(
            acquire(&mut r, A, Acq, WriteExclusive, KA, 0),
            Ok(Outcome::default())
        );
        assert_eq!(r.holder(), Some(A.host));
        // Acquire does not count.
        assert_eq!(r.generation(), 3);
        // Again, same type: success, no change; other type: conflict.
        let before = r.clone();
        assert!(acquire(&mut r, A, Acq, WriteExclusive, KA, 0).is_ok());
        assert_eq!(r, before);
        assert_eq!(
            acquire(&mut r, A, Acq, ExclusiveAccess, KA, 0),
            Err(RESERVATION_CONFLICT)
        );
        // Another registrant, either type: conflict (the other port of a dual-ported drive).
        for t in ResvType::ALL {
            assert_eq!(acquire(&mut r, B, Acq, t, KB, 0), Err(RESERVATION_CONFLICT));
        }
        assert_eq!(r, before);

        // All registrants: every registrant is a holder and may acquire the same type.
        let mut r = three();
        acquire(&mut r, A, Acq, WriteExclusiveAllRegistrants, KA, 0).expect("acquire");
        assert!(acquire(&mut r, B, Acq, WriteExclusiveAllRegistrants, KB, 0).is_ok());
        assert_eq!(
            acquire(&mut r, B, Acq, ExclusiveAccessAllRegistrants, KB, 0),
            Err(RESERVATION_CONFLICT)
        );
        assert_eq!(r.holder(), None);
        assert!([A, B, C].iter().all(|h| r.is_holder(h.host)));
        check_invariants(&r);
    }

    #[test]
    fn preempt_holder_with_a_new_type() {
        let mut r = three();
        acquire(&mut r, A, Acq, WriteExclusive, KA, 0).expect("acquire");
        let out = acquire(&mut r, B, Preempt, ExclusiveAccess, KB, KA).expect("preempt");
        assert_eq!(r.holder(), Some(B.host));
        assert_eq!(r.rtype(), Some(ExclusiveAccess));
        assert!(r.registrant(A.host).is_none());
        assert_eq!(out.unregistered, vec![A]);
        assert!(out.abort.is_empty());
        assert_eq!(
            out.notices,
            vec![
                notice(A, NoticeKind::RegistrationPreempted),
                notice(C, NoticeKind::ReservationReleased),
            ]
        );
        assert_eq!(r.generation(), 4);
        assert_eq!(r.check(A.host, Access::Read), Err(RESERVATION_CONFLICT));
        assert_eq!(r.check(C.host, Access::Read), Err(RESERVATION_CONFLICT));
        check_invariants(&r);

        // Same type: no Reservation Released.
        let mut r = three();
        acquire(&mut r, A, Acq, WriteExclusive, KA, 0).expect("acquire");
        let out = acquire(&mut r, B, Preempt, WriteExclusive, KB, KA).expect("preempt");
        assert_eq!(
            out.notices,
            vec![notice(A, NoticeKind::RegistrationPreempted)]
        );
        check_invariants(&r);
    }

    #[test]
    fn holder_preempts_itself_to_change_type() {
        let mut r = three();
        acquire(&mut r, A, Acq, WriteExclusive, KA, 0).expect("acquire");
        let out =
            acquire(&mut r, A, Preempt, ExclusiveAccessRegistrantsOnly, KA, KA).expect("preempt");
        assert_eq!(r.holder(), Some(A.host));
        assert_eq!(r.rtype(), Some(ExclusiveAccessRegistrantsOnly));
        assert!(out.unregistered.is_empty());
        assert_eq!(
            out.notices,
            vec![
                notice(B, NoticeKind::ReservationReleased),
                notice(C, NoticeKind::ReservationReleased),
            ]
        );
        assert_eq!(r.generation(), 4);
        check_invariants(&r);
    }

    #[test]
    fn preempt_and_abort_lists_every_host_sharing_the_key() {
        let mut r = Reservations::new();
        register(&mut r, A, KA).expect("register");
        register(&mut r, B, KB).expect("register");
        register(&mut r, C, KA).expect("register"); // C shares A's key
        acquire(&mut r, A, Acq, ExclusiveAccess, KA, 0).expect("acquire");
        let out = acquire(&mut r, B, PreemptAbort, ExclusiveAccess, KB, KA).expect("preempt");
        assert_eq!(out.unregistered, vec![A, C]);
        assert_eq!(out.abort, vec![A, C]);
        assert_eq!(
            out.notices,
            vec![
                notice(A, NoticeKind::RegistrationPreempted),
                notice(C, NoticeKind::RegistrationPreempted),
            ]
        );
        assert_eq!(r.holder(), Some(B.host));
        assert_eq!(r.registrants().len(), 1);
        check_invariants(&r);
    }

    #[test]
    fn preempt_non_holder_registrants() {
        let mut r = three();
        acquire(&mut r, A, Acq, WriteExclusiveRegistrantsOnly, KA, 0).expect("acquire");
        let out = acquire(&mut r, B, PreemptAbort, WriteExclusive, KB, KC).expect("preempt");
        // The reservation stays with A, of its type; C is gone and must be aborted.
        assert_eq!(r.holder(), Some(A.host));
        assert_eq!(r.rtype(), Some(WriteExclusiveRegistrantsOnly));
        assert_eq!(out.unregistered, vec![C]);
        assert_eq!(out.abort, vec![C]);
        assert_eq!(
            out.notices,
            vec![notice(C, NoticeKind::RegistrationPreempted)]
        );
        assert_eq!(r.check(C.host, Access::Write), Err(RESERVATION_CONFLICT));
        assert_eq!(r.generation(), 4);
        check_invariants(&r);
    }

    #[test]
    fn preempt_failures_change_nothing() {
        let mut r = three();
        acquire(&mut r, A, Acq, WriteExclusive, KA, 0).expect("acquire");
        let before = r.clone();
        // PRKEY 0 under a single holder: Invalid Field.
        assert_eq!(
            acquire(&mut r, B, Preempt, WriteExclusive, KB, 0),
            Err(generic::INVALID_FIELD)
        );
        // PRKEY matching nobody: Reservation Conflict.
        assert_eq!(
            acquire(&mut r, B, Preempt, WriteExclusive, KB, 0x77),
            Err(RESERVATION_CONFLICT)
        );
        // Wrong CRKEY, non-registrant.
        assert_eq!(
            acquire(&mut r, B, Preempt, WriteExclusive, KC, KA),
            Err(RESERVATION_CONFLICT)
        );
        let mut d = before.clone();
        regop(&mut d, C, RegisterAction::Unregister, false, KC, 0).expect("unregister");
        let d_before = d.clone();
        assert_eq!(
            acquire(&mut d, C, PreemptAbort, WriteExclusive, KC, KA),
            Err(RESERVATION_CONFLICT)
        );
        assert_eq!(d, d_before);
        assert_eq!(r, before);
    }

    #[test]
    fn preempt_without_reservation_only_unregisters() {
        let mut r = three();
        let out = acquire(&mut r, A, Preempt, ExclusiveAccess, KA, KB).expect("preempt");
        assert_eq!(r.rtype(), None);
        assert_eq!(out.unregistered, vec![B]);
        assert_eq!(
            out.notices,
            vec![notice(B, NoticeKind::RegistrationPreempted)]
        );
        assert_eq!(r.generation(), 4);
        // Its own key: the issuer unregisters itself, with no notice.
        let out = acquire(&mut r, A, PreemptAbort, ExclusiveAccess, KA, KA).expect("preempt");
        assert_eq!(out.unregistered, vec![A]);
        assert_eq!(out.abort, vec![A]);
        assert!(out.notices.is_empty());
        assert_eq!(
            acquire(&mut r, C, Preempt, ExclusiveAccess, KC, 0),
            Err(RESERVATION_CONFLICT)
        );
        check_invariants(&r);
    }

    #[test]
    fn preempt_all_registrants() {
        // PRKEY 0: the issuer takes a new reservation, everybody else is unregistered.
        let mut r = three();
        acquire(&mut r, A, Acq, WriteExclusiveAllRegistrants, KA, 0).expect("acquire");
        let out = acquire(&mut r, B, PreemptAbort, ExclusiveAccess, KB, 0).expect("preempt");
        assert_eq!(r.holder(), Some(B.host));
        assert_eq!(r.rtype(), Some(ExclusiveAccess));
        assert_eq!(out.unregistered, vec![A, C]);
        assert_eq!(out.abort, vec![A, C]);
        assert_eq!(
            out.notices,
            vec![
                notice(A, NoticeKind::RegistrationPreempted),
                notice(C, NoticeKind::RegistrationPreempted),
            ]
        );
        check_invariants(&r);

        // PRKEY 0 into another all-registrants type: only the issuer is left, holding it.
        let mut r = three();
        acquire(&mut r, A, Acq, ExclusiveAccessAllRegistrants, KA, 0).expect("acquire");
        acquire(&mut r, C, Preempt, WriteExclusiveAllRegistrants, KC, 0).expect("preempt");
        assert_eq!(r.rtype(), Some(WriteExclusiveAllRegistrants));
        assert_eq!(r.registrants().len(), 1);
        assert!(r.is_holder(C.host));
        check_invariants(&r);

        // PRKEY != 0: only those registrants go; the reservation stays.
        let mut r = three();
        acquire(&mut r, A, Acq, ExclusiveAccessAllRegistrants, KA, 0).expect("acquire");
        let out = acquire(&mut r, B, Preempt, WriteExclusive, KB, KA).expect("preempt");
        assert_eq!(r.rtype(), Some(ExclusiveAccessAllRegistrants));
        assert_eq!(out.unregistered, vec![A]);
        assert!(out.abort.is_empty());
        assert!(r.is_holder(B.host) && r.is_holder(C.host));
        assert_eq!(r.check(A.host, Access::Read), Err(RESERVATION_CONFLICT));
        assert_eq!(
            acquire(&mut r, B, Preempt, WriteExclusive, KB, 0x77),
            Err(RESERVATION_CONFLICT)
        );
        check_invariants(&r);
    }

    #[test]
    fn unregistering_the_holder() {
        // Write Exclusive: released silently.
        let mut r = three();
        acquire(&mut r, A, Acq, WriteExclusive, KA, 0).expect("acquire");
        let out = regop(&mut r, A, RegisterAction::Unregister, false, KA, 0).expect("unreg");
        assert_eq!(r.rtype(), None);
        assert!(out.notices.is_empty());
        // Registrants Only: the others hear of it.
        let mut r = three();
        acquire(&mut r, A, Acq, ExclusiveAccessRegistrantsOnly, KA, 0).expect("acquire");
        let out = regop(&mut r, A, RegisterAction::Unregister, true, 0, 0).expect("unreg");
        assert_eq!(r.rtype(), None);
        assert_eq!(
            out.notices,
            vec![
                notice(B, NoticeKind::ReservationReleased),
                notice(C, NoticeKind::ReservationReleased),
            ]
        );
        // A non-holder leaving changes nothing else.
        let mut r = three();
        acquire(&mut r, A, Acq, ExclusiveAccessRegistrantsOnly, KA, 0).expect("acquire");
        let out = regop(&mut r, B, RegisterAction::Unregister, false, KB, 0).expect("unreg");
        assert_eq!(r.holder(), Some(A.host));
        assert!(out.notices.is_empty());
        // All registrants: the reservation lasts until the last registrant leaves.
        let mut r = three();
        acquire(&mut r, B, Acq, WriteExclusiveAllRegistrants, KB, 0).expect("acquire");
        for (h, k) in [(B, KB), (A, KA)] {
            let out = regop(&mut r, h, RegisterAction::Unregister, false, k, 0).expect("unreg");
            assert!(out.notices.is_empty());
            assert_eq!(r.rtype(), Some(WriteExclusiveAllRegistrants));
            check_invariants(&r);
        }
        regop(&mut r, C, RegisterAction::Unregister, false, KC, 0).expect("unreg");
        assert_eq!(r.rtype(), None);
        assert_eq!(r.generation(), 6);
        check_invariants(&r);
    }

    #[test]
    fn release_rules() {
        let mut r = three();
        // Nothing held: success, no effect.
        assert_eq!(release(&mut r, A, Rel, 1, KA), Ok(Outcome::default()));
        acquire(&mut r, A, Acq, WriteExclusiveRegistrantsOnly, KA, 0).expect("acquire");
        let before = r.clone();
        // Key checks come first.
        assert_eq!(release(&mut r, A, Rel, 3, KB), Err(RESERVATION_CONFLICT));
        let mut d = Reservations::new();
        assert_eq!(release(&mut d, A, Rel, 3, KA), Err(RESERVATION_CONFLICT));
        // Holder naming the wrong type: Invalid Field.
        assert_eq!(release(&mut r, A, Rel, 1, KA), Err(generic::INVALID_FIELD));
        assert_eq!(release(&mut r, A, Rel, 0, KA), Err(generic::INVALID_FIELD));
        // Non-holder registrant: success, no effect (whatever the type).
        assert_eq!(release(&mut r, B, Rel, 3, KB), Ok(Outcome::default()));
        assert_eq!(release(&mut r, B, Rel, 1, KB), Ok(Outcome::default()));
        assert_eq!(r, before);
        // The holder releases; the others are notified; the generation stays.
        let out = release(&mut r, A, Rel, 3, KA).expect("release");
        assert_eq!(r.rtype(), None);
        assert_eq!(r.registrants().len(), 3);
        assert_eq!(
            out.notices,
            vec![
                notice(B, NoticeKind::ReservationReleased),
                notice(C, NoticeKind::ReservationReleased),
            ]
        );
        assert_eq!(r.generation(), 3);

        // Write Exclusive and Exclusive Access releases notify nobody.
        for t in [WriteExclusive, ExclusiveAccess] {
            acquire(&mut r, B, Acq, t, KB, 0).expect("acquire");
            let out = release(&mut r, B, Rel, t.code(), KB).expect("release");
            assert!(out.notices.is_empty());
        }

        // All registrants: any registrant releases it for all.
        acquire(&mut r, A, Acq, ExclusiveAccessAllRegistrants, KA, 0).expect("acquire");
        let out = release(&mut r, C, Rel, 6, KC).expect("release");
        assert_eq!(r.rtype(), None);
        assert_eq!(
            out.notices,
            vec![
                notice(A, NoticeKind::ReservationReleased),
                notice(B, NoticeKind::ReservationReleased),
            ]
        );
        check_invariants(&r);
    }

    #[test]
    fn clear_removes_everything() {
        let mut r = three();
        acquire(&mut r, A, Acq, ExclusiveAccess, KA, 0).expect("acquire");
        assert_eq!(release(&mut r, B, Clear, 0, KA), Err(RESERVATION_CONFLICT));
        // Any registrant may clear, not only the holder.
        let out = release(&mut r, B, Clear, 0, KB).expect("clear");
        assert_eq!(r.rtype(), None);
        assert!(r.registrants().is_empty());
        assert_eq!(r.generation(), 4);
        assert_eq!(out.unregistered, vec![A, B, C]);
        assert!(out.abort.is_empty());
        assert_eq!(
            out.notices,
            vec![
                notice(A, NoticeKind::ReservationPreempted),
                notice(C, NoticeKind::ReservationPreempted),
            ]
        );
        for h in [A, B, C] {
            assert!(r.check(h.host, Access::Write).is_ok());
        }
    }

    #[test]
    fn report_normal_format() {
        let mut r = three();
        acquire(&mut r, B, Acq, WriteExclusiveRegistrantsOnly, KB, 0).expect("acquire");
        let b = r.report(false, 4096).expect("report");
        assert_eq!(b.len(), 24 + 3 * 24);
        assert_eq!(u32_at(&b, 0), 3); // GEN
        assert_eq!(b[4], 3); // RTYPE
        assert_eq!(u16_at(&b, 5), 3); // REGCTL
        assert_eq!(b[9], 0); // PTPLS
        assert!(b[7..9].iter().chain(&b[10..24]).all(|&x| x == 0));
        for (i, (h, k)) in [(A, KA), (B, KB), (C, KC)].into_iter().enumerate() {
            let e = &b[24 + i * 24..48 + i * 24];
            assert_eq!(u16_at(e, 0), h.cntlid);
            assert_eq!(e[2], u8::from(h == B)); // RCSTS
            assert!(e[3..8].iter().all(|&x| x == 0));
            assert_eq!(Some(u64_at(e, 8)), h.host.as_u64());
            assert_eq!(u64_at(e, 16), k);
        }
        // Cut to the host's buffer; REGCTL still counts everyone.
        let cut = r.report(false, 60).expect("report");
        assert_eq!(cut, b[..60]);
        assert_eq!(u16_at(&cut, 5), 3);
        assert_eq!(r.report(false, 4).expect("report"), b[..4]);
        // A 128-bit host identifier cannot be shown in this format.
        let wide = HostCtrl {
            host: HostId([0x5A; 16]),
            cntlid: 9,
        };
        register(&mut r, wide, 0x99).expect("register");
        assert_eq!(r.report(false, 4096), Err(HOST_ID_INCONSISTENT_FORMAT));
        // Nobody registered: just the header.
        let b = Reservations::new().report(false, 4096).expect("report");
        assert_eq!(b, vec![0u8; 24]);
    }

    #[test]
    fn report_extended_format() {
        let mut r = Reservations::new();
        let hosts = [
            HostCtrl {
                host: HostId(*b"host-one-uuid-01"),
                cntlid: 0xFFFF,
            },
            HostCtrl {
                host: HostId(*b"host-two-uuid-02"),
                cntlid: 0xFFFF,
            },
        ];
        register(&mut r, hosts[0], 0x1111).expect("register");
        register(&mut r, hosts[1], 0x2222).expect("register");
        acquire(
            &mut r,
            hosts[1],
            Acq,
            ExclusiveAccessAllRegistrants,
            0x2222,
            0,
        )
        .expect("acquire");
        r.register(
            hosts[0],
            &Register {
                action: RegisterAction::Register,
                iekey: false,
                cptpl: Cptpl::Set,
                crkey: 0,
                nrkey: 0x1111,
            },
        )
        .expect("re-register");
        let b = r.report(true, 4096).expect("report");
        assert_eq!(b.len(), 64 + 2 * 64);
        assert_eq!(u32_at(&b, 0), 3);
        assert_eq!(b[4], 6);
        assert_eq!(u16_at(&b, 5), 2);
        assert_eq!(b[9], 1);
        assert!(b[10..64].iter().all(|&x| x == 0));
        for (i, (h, k)) in [(hosts[0], 0x1111), (hosts[1], 0x2222)]
            .into_iter()
            .enumerate()
        {
            let e = &b[64 + i * 64..128 + i * 64];
            assert_eq!(u16_at(e, 0), 0xFFFF);
            assert_eq!(e[2], 1); // every registrant holds an all-registrants reservation
            assert_eq!(u64_at(e, 8), k);
            assert_eq!(e[16..32], h.host.0);
            assert!(e[32..].iter().all(|&x| x == 0));
        }
        assert_eq!(r.report(true, 100).expect("report"), b[..100]);
        // 64-bit host ids are shown widened.
        let b = three().report(true, 4096).expect("report");
        assert_eq!(b[64 + 16..64 + 32], HostId::from_u64(0xA).0);
        // A huge buffer request allocates only the structure.
        let req = Report::decode(u32::MAX, 1);
        let len = usize::try_from(req.len).unwrap_or(usize::MAX);
        assert_eq!(
            three().report(req.eds, len).expect("report").len(),
            64 + 3 * 64
        );
    }

    #[test]
    fn notification_log_page_layout() {
        let p = notification_log_page(7, Some(NoticeKind::ReservationPreempted), 2, 5);
        assert_eq!(u64_at(&p, 0), 7);
        assert_eq!((p[8], p[9]), (3, 2));
        assert_eq!(u32_at(&p, 12), 5);
        assert!(p[16..].iter().all(|&x| x == 0));
        assert_eq!(notification_log_page(0, None, 0, 0), [0u8; 64]);
    }

    /// A state no sequence of commands leaves is refused; the registrant table is bounded.
    #[test]
    fn states_that_cannot_be_are_refused_and_registrants_are_bounded() {
        let mut r = three();
        acquire(&mut r, A, Acq, ResvType::WriteExclusive, KA, 0).expect("acquire");
        let good = r.state();
        assert_eq!(good.holder, Some(A.host));
        assert_eq!(good.rtype, Some(ResvType::WriteExclusive));
        let bad = |f: &dyn Fn(&mut ResvState)| {
            let mut s = good.clone();
            f(&mut s);
            Reservations::from_state(&s).expect_err("refused")
        };
        assert_eq!(
            bad(&|s| s.registrants.push(s.registrants[1])),
            StateError::DuplicateHost
        );
        assert_eq!(
            bad(&|s| s.holder = Some(HostId([9; 16]))),
            StateError::HolderNotRegistered
        );
        assert_eq!(bad(&|s| s.holder = None), StateError::HolderNotRegistered);
        assert_eq!(bad(&|s| s.rtype = None), StateError::UnexpectedHolder);
        assert_eq!(
            bad(&|s| s.rtype = Some(ResvType::ExclusiveAccessAllRegistrants)),
            StateError::UnexpectedHolder
        );
        assert_eq!(
            bad(&|s| {
                s.rtype = Some(ResvType::WriteExclusiveAllRegistrants);
                s.holder = None;
                s.registrants.clear();
            }),
            StateError::NoRegistrants
        );
        let mut full = Reservations::new();
        let ctrl = |i: u64| HostCtrl {
            host: HostId::from_u64(i),
            cntlid: 0xFFFF,
        };
        for i in 0..MAX_REGISTRANTS as u64 {
            register(&mut full, ctrl(i + 100), i + 1).expect("register");
        }
        let before = full.clone();
        assert_eq!(
            register(&mut full, ctrl(999), 7).expect_err("full"),
            REGISTRANTS_FULL
        );
        assert_eq!(full, before);
        let mut s = full.state();
        s.registrants.push(Registrant {
            host: ctrl(999).host,
            cntlid: 1,
            key: 7,
        });
        assert_eq!(
            Reservations::from_state(&s).expect_err("refused"),
            StateError::TooManyRegistrants
        );
    }

    /// Deterministic pseudo-random sequences of commands from three hosts, checking after each
    /// that the invariants hold, that failures change nothing, that the generation moves exactly
    /// when the specification says, and that notices and aborts are addressed sensibly.
    #[test]
    fn random_sequences_keep_invariants() {
        struct XorShift(u64);
        impl XorShift {
            fn next(&mut self) -> u64 {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0
            }
            fn below(&mut self, n: u64) -> u64 {
                self.next() % n
            }
        }
        let hosts = [A, B, C];
        let keys = [0, KA, KB, KC];
        let mut successes = [0usize; 4]; // register, acquire, release, preempt
        for seed in 1..=40u64 {
            let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut r = Reservations::new();
            for _ in 0..500 {
                let who = hosts[rng.below(3) as usize];
                let own = r.registrant(who.host).map(|x| x.key);
                // Mostly the right key, sometimes a random one.
                let crkey = match own {
                    Some(k) if rng.below(5) != 0 => k,
                    _ => keys[rng.below(4) as usize],
                };
                let other = keys[rng.below(4) as usize];
                let rtype = ResvType::ALL[rng.below(6) as usize];
                let before = r.clone();
                let regs_before: Vec<HostId> = r.registrants().iter().map(|x| x.host).collect();
                let (res, counts, kind) = match rng.below(3) {
                    0 => {
                        let action = [
                            RegisterAction::Register,
                            RegisterAction::Unregister,
                            RegisterAction::Replace,
                        ][rng.below(3) as usize];
                        let cmd = Register {
                            action,
                            iekey: rng.below(4) == 0,
                            cptpl: [Cptpl::NoChange, Cptpl::Clear, Cptpl::Set]
                                [rng.below(3) as usize],
                            crkey,
                            nrkey: if action == RegisterAction::Register {
                                own.filter(|_| rng.below(2) == 0).unwrap_or(other)
                            } else {
                                other
                            },
                        };
                        (r.register(who, &cmd), true, 0)
                    }
                    1 => {
                        let action = [Acq, Preempt, PreemptAbort][rng.below(3) as usize];
                        let prkey = if rng.below(2) == 0 {
                            r.registrants()
                                .get(rng.below(3) as usize)
                                .map_or(other, |x| x.key)
                        } else {
                            other
                        };
                        let cmd = Acquire {
                            action,
                            rtype,
                            crkey,
                            prkey,
                        };
                        (
                            r.acquire(who.host, &cmd),
                            action != Acq,
                            if action == Acq { 1 } else { 3 },
                        )
                    }
                    _ => {
                        let action = if rng.below(6) == 0 { Clear } else { Rel };
                        let t = match r.rtype() {
                            Some(t) if rng.below(3) != 0 => t.code(),
                            _ => rng.below(8) as u8,
                        };
                        let cmd = Release {
                            action,
                            rtype: t,
                            crkey,
                        };
                        (r.release(who.host, &cmd), action == Clear, 2)
                    }
                };
                check_invariants(&r);
                // Kept and built again, the state is the same.
                assert_eq!(Reservations::from_state(&r.state()).as_ref(), Ok(&r));
                assert!(r.generation() >= before.generation());
                match res {
                    Err(s) => {
                        assert!(
                            s == RESERVATION_CONFLICT || s == generic::INVALID_FIELD,
                            "{s:?}"
                        );
                        assert_eq!(r, before, "a failed command changed the state");
                    }
                    Ok(out) => {
                        successes[kind] += 1;
                        let expect = before.generation() + u32::from(counts);
                        assert_eq!(r.generation(), expect);
                        assert!(out.notices.iter().all(|n| n.to.host != who.host));
                        assert!(out.notices.iter().all(|n| regs_before.contains(&n.to.host)));
                        assert!(out.abort.is_empty() || out.abort == out.unregistered);
                        for u in &out.unregistered {
                            assert!(regs_before.contains(&u.host));
                            assert!(r.registrant(u.host).is_none());
                        }
                        let added = r
                            .registrants()
                            .iter()
                            .filter(|x| !regs_before.contains(&x.host))
                            .count();
                        assert!(added <= 1);
                        assert_eq!(
                            regs_before.len() - out.unregistered.len() + added,
                            r.registrants().len()
                        );
                    }
                }
                // Holders can always access; with no reservation everybody can.
                for h in hosts {
                    if r.is_holder(h.host) || r.rtype().is_none() {
                        assert!(r.check(h.host, Access::Read).is_ok());
                        assert!(r.check(h.host, Access::Write).is_ok());
                    }
                }
                let rep = r.report(true, 4096).expect("report");
                assert_eq!(usize::from(u16_at(&rep, 5)), r.registrants().len());
                assert_eq!(u32_at(&rep, 0), r.generation());
            }
        }
        // The sequences exercised every command family successfully.
        assert!(successes.iter().all(|&n| n > 100), "{successes:?}");
    }
}
