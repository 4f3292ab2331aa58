//! Errors: [`FormatError`] (bytes that are not a valid structure: which structure, at which
//! byte offset, what is wrong), [`ConfigError`] (a configuration that breaks a rule, in terms of
//! its names) and [`EncodeError`] (what cannot be written). The drive they came from is the
//! caller's to add; the import rule's own errors ([`crate::ImportError`]) name drives by label.

use std::fmt;

use crate::layout::LayoutError;
use crate::records::RaidLevel;
use crate::{Uuid, MAX_NODES};

/// The structure a [`FormatError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Structure {
    /// A drive superblock (either copy).
    Superblock,
    /// A heartbeat slot.
    Heartbeat,
    /// The header of a metadata image.
    ImageHeader,
    /// The body of a metadata image (its checksum, or the rules across its records).
    ImageBody,
    /// The type/flags/length header of a record.
    RecordHeader,
    /// A pool record.
    PoolRecord,
    /// A volume record.
    VolumeRecord,
    /// A subsystem record.
    SubsystemRecord,
    /// A namespace record.
    NamespaceRecord,
    /// An ownership record.
    OwnershipRecord,
    /// A cluster configuration record.
    ClusterConfigRecord,
    /// A spare record.
    SpareRecord,
    /// A write sequence record.
    WriteSeqRecord,
    /// A checksum area record.
    ChecksumAreaRecord,
    /// A reservation record.
    ReservationRecord,
    /// A host secret record.
    HostSecretRecord,
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Structure::Superblock => "Superblock",
            Structure::Heartbeat => "Heartbeat slot",
            Structure::ImageHeader => "Metadata image header",
            Structure::ImageBody => "Metadata image body",
            Structure::RecordHeader => "Record header",
            Structure::PoolRecord => "Pool record",
            Structure::VolumeRecord => "Volume record",
            Structure::SubsystemRecord => "Subsystem record",
            Structure::NamespaceRecord => "Namespace record",
            Structure::OwnershipRecord => "Ownership record",
            Structure::ClusterConfigRecord => "Cluster config record",
            Structure::SpareRecord => "Spare record",
            Structure::WriteSeqRecord => "Write sequence record",
            Structure::ChecksumAreaRecord => "Checksum area record",
            Structure::ReservationRecord => "Reservation record",
            Structure::HostSecretRecord => "Host secret record",
        })
    }
}

/// Bytes that are not a valid structure: which one, where, and what is wrong.
///
/// `offset` is a byte offset from the start of what was parsed: the superblock or heartbeat
/// block, or the metadata slot (record offsets include the 128-byte image header), or the body
/// when records are decoded on their own ([`crate::records::decode_records`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{structure} at byte {offset}: {problem}")]
pub struct FormatError {
    /// The structure that is invalid.
    pub structure: Structure,
    /// Byte offset of the offending field (or of the structure, for whole-structure problems).
    pub offset: u64,
    /// What is wrong.
    pub problem: Problem,
}

impl FormatError {
    /// An error about `structure` at byte `offset`.
    pub fn new(structure: Structure, offset: u64, problem: Problem) -> Self {
        Self {
            structure,
            offset,
            problem,
        }
    }

    /// This error, about the drive labelled `drive`.
    pub fn on_drive(self, drive: impl Into<String>) -> DriveError {
        DriveError {
            drive: drive.into(),
            error: self,
        }
    }
}

/// A [`FormatError`] about one drive, named by the label the operator knows it by (its
/// address).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Drive {drive}: {error}")]
pub struct DriveError {
    /// The drive's label.
    pub drive: String,
    /// What is wrong on it.
    pub error: FormatError,
}

/// What is wrong in a [`FormatError`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The input ends before the structure or field does.
    #[error("truncated: needs {needed} bytes, {available} available")]
    Truncated {
        /// Bytes the field or structure needs.
        needed: u64,
        /// Bytes that were left.
        available: u64,
    },
    /// The magic number is not this structure's.
    #[error("bad magic \"{}\", expected \"{}\"", .found.escape_ascii(), .expected.escape_ascii())]
    BadMagic {
        /// The 8 bytes found.
        found: [u8; 8],
        /// The structure's magic.
        expected: [u8; 8],
    },
    /// The format version is newer than this code reads.
    #[error(
        "format version {found} is newer than this software reads (version {supported}); \
         upgrade duplex to import it"
    )]
    UnsupportedVersion {
        /// The version recorded.
        found: u32,
        /// The newest version this code reads.
        supported: u32,
    },
    /// The stored checksum does not match the bytes.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// CRC-32C recorded in the structure.
        stored: u32,
        /// CRC-32C of the bytes as read.
        computed: u32,
    },
    /// A field holds a value the format does not allow.
    #[error("{field} {value} is invalid: {why}")]
    BadValue {
        /// The field's name.
        field: &'static str,
        /// The value found.
        value: u64,
        /// Why it is refused.
        why: &'static str,
    },
    /// A string field is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    BadUtf8 {
        /// The field's name.
        field: &'static str,
    },
    /// A record's payload is longer than its fields.
    #[error("{count} bytes follow the last field")]
    TrailingBytes {
        /// How many.
        count: u64,
    },
    /// A record type this code does not know, marked must-understand.
    #[error(
        "unknown record type {record_type} is marked must-understand; \
         upgrade duplex to import this pool"
    )]
    UnknownRequiredRecord {
        /// The record type.
        record_type: u16,
    },
    /// A record every image must have is absent.
    #[error("no {record} record")]
    MissingRecord {
        /// Which record.
        record: &'static str,
    },
    /// A record an image has exactly once appears again.
    #[error("a second {record} record")]
    DuplicateRecord {
        /// Which record.
        record: &'static str,
    },
    /// Two fields that must agree do not.
    #[error("{field} is {found}, but {other} is {expected}")]
    Mismatch {
        /// The field found wrong.
        field: &'static str,
        /// Its value.
        found: String,
        /// The field it must agree with.
        other: &'static str,
        /// That field's value.
        expected: String,
    },
    /// The recorded layout is not self-consistent or not within the drive.
    #[error("{0}")]
    Layout(LayoutError),
    /// The decoded values break a configuration rule.
    #[error("{0}")]
    Config(ConfigError),
}

/// Why a string field is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StringProblem {
    /// It is empty.
    #[error("is empty")]
    Empty,
    /// It is longer than its limit.
    #[error("is {len} bytes, longer than {max}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// It contains a control character.
    #[error("contains a control character")]
    ControlCharacter,
    /// An NQN that does not start with `nqn.`.
    #[error("does not start with \"nqn.\"")]
    NotNqn,
    /// An NVMe ASCII field (serial, model) with a byte outside printable ASCII.
    #[error("is not printable ASCII")]
    NotPrintableAscii,
}

/// A configuration that breaks a rule of the format, named by what the operator knows it by.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A string field is invalid.
    #[error("{field} {value:?} {problem}")]
    BadString {
        /// Which field ("Volume name", "Subsystem NQN", ...).
        field: &'static str,
        /// The value.
        value: String,
        /// What is wrong with it.
        problem: StringProblem,
    },
    /// An identifier that must be set is all zero.
    #[error("{what} is the nil UUID")]
    NilUuid {
        /// Whose identifier.
        what: String,
    },
    /// Something that must be unique appears twice.
    #[error("Duplicate {what} {value}")]
    Duplicate {
        /// What kind of thing ("volume name", "member drive", ...).
        what: &'static str,
        /// The repeated value.
        value: String,
    },
    /// A list longer than its limit.
    #[error("Too many {what}: {count}, at most {max}")]
    TooMany {
        /// What the list holds.
        what: &'static str,
        /// Its length.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The pool's chunk size is not a power of two in 4 KiB..=1 MiB.
    #[error("Pool chunk size {0} is not a power of two between 4096 and 1048576 bytes")]
    ChunkSize(u32),
    /// The pool's per-member data area holds no whole chunk.
    #[error("Pool data area of {bytes} bytes per member holds no {chunk}-byte chunk")]
    DataArea {
        /// The recorded per-member data area.
        bytes: u64,
        /// The chunk size.
        chunk: u32,
    },
    /// The pool's checksum area breaks a rule.
    #[error("Pool checksum area of {len} bytes at byte {offset}: {why}")]
    ChecksumArea {
        /// Its offset on each member.
        offset: u64,
        /// Its length.
        len: u64,
        /// The rule it breaks.
        why: String,
    },
    /// The number of members does not suit the RAID level.
    #[error("Pool at {level} cannot have {count} members: {rule}")]
    MemberCount {
        /// The pool's RAID level.
        level: RaidLevel,
        /// Members listed.
        count: usize,
        /// The level's rule.
        rule: &'static str,
    },
    /// Member slots are not exactly `0..count`.
    #[error("Pool member slot {slot} is {why}; slots must be 0..{count}, each once")]
    MemberSlot {
        /// The offending slot.
        slot: u32,
        /// Members listed.
        count: usize,
        /// "out of range" or "repeated".
        why: &'static str,
    },
    /// A node id is out of range.
    #[error("{what} node id {node} is out of range (nodes are 0..{max})", max = MAX_NODES)]
    NodeId {
        /// Whose node id.
        what: &'static str,
        /// The id.
        node: u32,
    },
    /// The image header's epoch differs from its ownership record's.
    #[error("Ownership epoch {ownership} differs from the image's epoch {header}")]
    EpochMismatch {
        /// Epoch in the ownership record.
        ownership: u64,
        /// Epoch of the image.
        header: u64,
    },
    /// A volume's block size is not 512 or 4096.
    #[error("Volume {volume:?}: block size {block_size} is not 512 or 4096")]
    VolumeBlockSize {
        /// The volume's name.
        volume: String,
        /// The block size.
        block_size: u32,
    },
    /// A volume of zero blocks.
    #[error("Volume {volume:?}: size is zero blocks")]
    EmptyVolume {
        /// The volume's name.
        volume: String,
    },
    /// A volume with flags this version does not support.
    #[error(
        "Volume {volume:?}: flags {flags:#x} are not supported (thin provisioning is reserved)"
    )]
    VolumeFlags {
        /// The volume's name.
        volume: String,
        /// The flags.
        flags: u32,
    },
    /// A volume that names itself as its parent.
    #[error("Volume {volume:?}: is its own parent")]
    SelfParent {
        /// The volume's name.
        volume: String,
    },
    /// An extent of zero blocks, or one whose end overflows.
    #[error("Volume {volume:?}: extent {index} is empty or its end overflows")]
    BadExtent {
        /// The volume's name.
        volume: String,
        /// Index of the extent in the record.
        index: usize,
    },
    /// Two extents of a volume map the same volume blocks.
    #[error("Volume {volume:?}: extents {first} and {second} overlap at volume block {block}")]
    ExtentOverlap {
        /// The volume's name.
        volume: String,
        /// Index of one extent.
        first: usize,
        /// Index of the other.
        second: usize,
        /// First volume block both map.
        block: u64,
    },
    /// The extents do not cover the volume exactly.
    #[error(
        "Volume {volume:?}: extents leave volume blocks {start}..{end} unmapped \
         or map past the volume's {size} blocks"
    )]
    ExtentCoverage {
        /// The volume's name.
        volume: String,
        /// First block of the hole (or of the part past the end).
        start: u64,
        /// End of the hole (or of the last extent).
        end: u64,
        /// The volume's size in blocks.
        size: u64,
    },
    /// An extent ends past the pool's capacity.
    #[error(
        "Volume {volume:?}: extent {index} ends at pool byte {end}, \
         past the pool's capacity of {capacity} bytes"
    )]
    ExtentOutsidePool {
        /// The volume's name.
        volume: String,
        /// Index of the extent.
        index: usize,
        /// Its end, in pool bytes.
        end: u128,
        /// The pool's capacity in bytes.
        capacity: u64,
    },
    /// Extents of two volumes (or two extents of one) map the same pool bytes.
    #[error("Volumes {first:?} and {second:?} both map pool byte {at}")]
    PoolOverlap {
        /// One volume's name.
        first: String,
        /// The other's (the same name if one volume maps a pool byte twice).
        second: String,
        /// First pool byte both map.
        at: u128,
    },
    /// A namespace id outside 1..=1024.
    #[error("Namespace {nsid} of {subsystem}: nsid is outside 1..=1024")]
    Nsid {
        /// The subsystem's NQN.
        subsystem: String,
        /// The namespace id.
        nsid: u32,
    },
    /// A namespace of a subsystem the image does not have.
    #[error("Namespace {nsid} of {subsystem}: there is no such subsystem")]
    UnknownSubsystem {
        /// The subsystem's NQN.
        subsystem: String,
        /// The namespace id.
        nsid: u32,
    },
    /// A namespace of a volume that is not in this pool.
    #[error("Namespace {nsid} of {subsystem}: volume {volume} is not a volume of this pool")]
    UnknownVolume {
        /// The subsystem's NQN.
        subsystem: String,
        /// The namespace id.
        nsid: u32,
        /// The volume UUID it names.
        volume: Uuid,
    },
    /// A namespace's reservation state breaks a rule (of the record itself, or it names a
    /// namespace the image does not have, or a second record names the same namespace).
    #[error("Reservation of namespace {nsid} of {subsystem}: {why}")]
    Reservation {
        /// The subsystem's NQN.
        subsystem: String,
        /// The namespace id.
        nsid: u32,
        /// The rule it breaks.
        why: String,
    },
    /// A host's sealed secrets break a rule (the blob, or a host the subsystem does not
    /// allow, or a second record for the same host).
    #[error("Secrets of host {host} on {subsystem}: {why}")]
    HostSecret {
        /// The subsystem's NQN.
        subsystem: String,
        /// The host's NQN.
        host: String,
        /// The rule it breaks.
        why: String,
    },
    /// ANA group id 0, which NVMe reserves.
    #[error("Namespace {nsid} of {subsystem}: ANA group id 0 is reserved")]
    AnaGroup {
        /// The subsystem's NQN.
        subsystem: String,
        /// The namespace id.
        nsid: u32,
    },
}

/// Why something cannot be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The configuration breaks a rule; nothing invalid is ever written.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The image is larger than a metadata slot.
    #[error("Metadata image of {needed} bytes does not fit in a slot of {slot_size} bytes")]
    TooLarge {
        /// Bytes the header and body need.
        needed: u64,
        /// The slot size.
        slot_size: u64,
    },
}
