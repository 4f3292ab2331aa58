//! The export table: which NVM subsystems, namespaces and hosts the fabric serves, changing at
//! run time, and the supervisor-held shared-memory region that carries it.
//!
//! The metadata service owns the node's configuration (persisted on the drives) and publishes
//! the part the fabric serves as an [`ExportTable`]: subsystems with their allowed hosts and
//! namespaces, each namespace naming the datapath volume it is served from
//! ([`ExportNamespace::volume`], the id in `IoDesc.volume`). The table travels in an
//! [`ExportsRegion`], a memfd created by duplexd and kept across the restarts of both ends, so a
//! restarted fabric finds the current table even while the metadata service is down.
//!
//! # Region layout
//!
//! A region of kind [`RegionKind::Plain`] whose header parameters are `[EXPORTS_TAG, slot
//! capacity, 0, 0, 0]`. Offsets in bytes; every word is little-endian and accessed only as an
//! atomic, every body only through volatile copies:
//!
//! | offset | field |
//! |---|---|
//! | 0 | region header |
//! | 128 | `current`: `generation << 1 \| slot` of the published table; 0 = never published |
//! | 256 + s × (64 + capacity) | slot `s` (0 or 1) header: `seq` (+0), `generation` (+8), `length` (+16), CRC-32C of the body (+24) |
//! | 256 + s × (64 + capacity) + 64 | slot `s` body: the encoded table, `length` bytes |
//!
//! # Publishing and reading (one writer, any readers, both may die at any instant)
//!
//! The writer fills the slot that `current` does *not* name: it makes the slot's `seq` odd
//! (a release store, then a release fence), writes the body, generation, length and CRC, makes
//! `seq` even again (release), and only then publishes with a release store of `current`. The
//! published slot is never written until another table has been published in the other slot, so
//! a writer dying mid-write leaves the current table intact (its successor overwrites the spare
//! slot, moving `seq` past the odd value the dead writer left).
//!
//! A reader loads `current` (acquire), the slot's `seq` (acquire; odd means a writer is in it),
//! copies the header words and the body out, issues an acquire fence and loads `seq` and
//! `current` again: if either moved, a writer lapped it and it tries again. A stable copy is
//! then checked: generation equal to the one `current` names, length within the slot, CRC-32C,
//! and the decoded table (see below) with the same generation. A region whose contents fail
//! these checks is [`ExportsError::Corrupt`]; nothing a peer writes into the region can make a
//! reader panic or read outside the mapping.
//!
//! # Waking readers
//!
//! The writer rings a [`crate::doorbell::Doorbell`] (an eventfd, resource
//! [`EXPORTS_BELL_RESOURCE`]) after each publish; a reader waits on it, drains it, then calls
//! [`ExportsRegion::read`]. Draining before reading means a publish that races with the read
//! rings again, so no change is missed; a spurious wake reads the same generation again. That
//! is all the protocol: when and how often to read is the reader's policy.
//!
//! # Encoding (format version 4, little-endian)
//!
//! ```text
//! table      = version:u32 generation:u64 count:u32 subsystem{count} groups:u32 group{groups}
//!              resvs:u32 resv{resvs}
//! subsystem  = nqn:str serial:str model:str flags:u8 hosts:u32 str{hosts} secrets:u32 secret{secrets}
//!              namespaces:u32 namespace{namespaces}
//!              flags bit 0: allow_any_host; the other bits are zero
//! secret     = host:str length:u16 sealed:[u8;length]
//!              an allowed host's DH-HMAC-CHAP secrets, sealed (ONDISK record 11): the
//!              reader unseals them with the array's secrets key
//! namespace  = nsid:u32 volume:u32 block_size:u32 blocks:u64 nguid:[u8;16] uuid:[u8;16] ana_group:u32
//! group      = id:u32 state:u8       the ANA state of group `id` on this node's ports
//! resv       = nguid:[u8;16] version:u64 generation:u32 rtype:u8 flags:u8 holder:[u8;16]
//!              count:u16 registrant{count}
//!              the reservation state of the namespace `nguid` names (ONDISK record 10);
//!              flags bit 0: PTPL; the other bits are zero
//! registrant = host_id:[u8;16] key:u64 cntlid:u16
//! str        = length:u16 UTF-8 bytes
//! ```
//!
//! Decoding refuses, with a [`TableError`]: truncation and trailing bytes, another version,
//! generation 0 or ≥ 2^63, text that is not UTF-8, counts beyond the limits below, NQNs that do
//! not start with `nqn.`, are longer than [`MAX_NQN_LEN`] bytes, contain control characters, or
//! name the discovery subsystem; an NQN used twice; serial numbers and model numbers that are
//! not printable ASCII of at most 20 and 40 bytes; a host listed twice; an nsid outside
//! `1..=`[`MAX_NSID`] or used twice in a subsystem; a block size other than 512 or 4096; zero
//! blocks or a byte size past `u64`; an ANA group outside `1..=`[`MAX_ANA_GROUP`]; an all-zero
//! NGUID or UUID, or one used twice in the table (hosts identify namespaces by them); an ANA
//! group listed twice or outside `1..=`[`MAX_ANA_GROUP`], a state that is not an ANA state
//! ([`AnaState`]), or a namespace whose group has no state (every state is said, never
//! assumed: a group this node does not own must not default to serving); a reservation naming
//! no namespace of the table or listed twice, a reservation type above 6, unknown flag bits,
//! more than [`MAX_REGISTRANTS`] registrants, an all-zero or repeated registrant host id; secrets
//! of a host the subsystem does not allow, or listed twice, or more than [`MAX_SEALED_BYTES`].
//! (Whether the holder fits the type is the reader's to check, with the reservations model.)

use std::os::fd::OwnedFd;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use crate::region::{page_size, Region, RegionError, RegionKind, HEADER_SIZE};

/// Name of the resource carrying the exports region.
pub const EXPORTS_RESOURCE: &str = "exports";
/// Name of the resource carrying the eventfd the writer rings after each publish.
pub const EXPORTS_BELL_RESOURCE: &str = "exports-bell";
/// Size of the region duplexd creates: two slots of just under 2 MiB.
pub const DEFAULT_EXPORTS_SIZE: usize = 4 << 20;
/// `params[0]` of an exports region says it is one.
pub const EXPORTS_TAG: u64 = u64::from_le_bytes(*b"EXPORTS\x01");
/// Version of the table encoding.
pub const FORMAT_VERSION: u32 = 4;
/// Longest sealed secrets of one host (as ONDISK record 11 keeps them).
pub const MAX_SEALED_BYTES: usize = 512;
/// Most registrants of one namespace's reservation (as ONDISK record 10 keeps them).
pub const MAX_REGISTRANTS: usize = 64;
/// Largest namespace id (and most namespaces per subsystem).
pub const MAX_NSID: u32 = 1024;
/// Longest NQN, in bytes (NVMe base specification: 223 bytes of UTF-8).
pub const MAX_NQN_LEN: usize = 223;
/// Most subsystems in a table.
pub const MAX_SUBSYSTEMS: usize = 1024;
/// Most allowed hosts per subsystem.
pub const MAX_HOSTS: usize = 1024;
/// Largest ANA group id.
pub const MAX_ANA_GROUP: u32 = 128;
/// Largest generation (the `current` word keeps it shifted left by one).
pub const MAX_GENERATION: u64 = u64::MAX >> 1;

/// The well-known discovery subsystem NQN, which no export may take.
const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Offset of the `current` word.
const CURRENT_OFFSET: usize = 128;
/// Offset of slot 0.
const SLOTS_OFFSET: usize = 256;
/// Bytes of a slot header.
const SLOT_HEADER: usize = 64;
/// Smallest region accepted.
const MIN_SIZE: usize = 4096;
/// Reads lapped by a writer before [`ExportsRegion::read`] gives up with
/// [`ExportsError::Contended`].
const READ_ATTEMPTS: usize = 64;
/// Bytes of one encoded namespace.
const NAMESPACE_BYTES: usize = 4 + 4 + 4 + 8 + 16 + 16 + 4;
/// Bytes of an encoded reservation without registrants.
const RESV_BYTES: usize = 16 + 8 + 4 + 1 + 1 + 16 + 2;
/// Bytes of an encoded registrant.
const REGISTRANT_BYTES: usize = 16 + 8 + 2;

/// One namespace of an exported subsystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExportNamespace {
    /// Namespace id, `1..=`[`MAX_NSID`], unique in its subsystem.
    pub nsid: u32,
    /// The datapath volume serving it (`IoDesc.volume`).
    pub volume: u32,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// Size in logical blocks (> 0).
    pub blocks: u64,
    /// Namespace globally unique identifier (non-zero, unique in the table).
    pub nguid: [u8; 16],
    /// Namespace UUID (non-zero, unique in the table).
    pub uuid: [u8; 16],
    /// ANA group, `1..=`[`MAX_ANA_GROUP`].
    pub ana_group: u32,
}

/// One exported NVM subsystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSubsystem {
    /// Subsystem NQN (unique in the table).
    pub nqn: String,
    /// Serial number (printable ASCII, at most 20 bytes).
    pub serial: String,
    /// Model number (printable ASCII, at most 40 bytes).
    pub model: String,
    /// Any host may connect (then `hosts` is not consulted).
    pub allow_any_host: bool,
    /// Host NQNs allowed to connect.
    pub hosts: Vec<String>,
    /// The sealed DH-HMAC-CHAP secrets of allowed hosts that must authenticate.
    pub secrets: Vec<ExportSecret>,
    /// Namespaces.
    pub namespaces: Vec<ExportNamespace>,
}

/// An allowed host's DH-HMAC-CHAP secrets, sealed with the array's secrets key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSecret {
    /// The host's NQN (one of the subsystem's hosts).
    pub host: String,
    /// The sealed secrets (`duplex_ondisk::secrets`).
    pub sealed: Vec<u8>,
}

/// An ANA state (the NVMe codes, as the ANA log page reports them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AnaState {
    /// This node serves the group: I/O goes here.
    Optimized = 0x01,
    /// Served, but another path is better.
    NonOptimized = 0x02,
    /// Not served here now (the peer owns the group): commands fail with a path error and
    /// the host uses another path.
    Inaccessible = 0x03,
    /// Not served here, and will not be again.
    PersistentLoss = 0x04,
    /// Moving (takeover or giveback in progress): hosts wait up to ANATT and retry.
    Change = 0x0F,
}

impl AnaState {
    /// The state of an NVMe code.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x01 => Self::Optimized,
            0x02 => Self::NonOptimized,
            0x03 => Self::Inaccessible,
            0x04 => Self::PersistentLoss,
            0x0F => Self::Change,
            _ => return None,
        })
    }

    /// Whether I/O is served in this state.
    pub fn serves_io(self) -> bool {
        matches!(self, Self::Optimized | Self::NonOptimized)
    }

    /// Every state.
    pub const ALL: [Self; 5] = [
        Self::Optimized,
        Self::NonOptimized,
        Self::Inaccessible,
        Self::PersistentLoss,
        Self::Change,
    ];

    /// The name `nvme ana-log` and sysfs use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Optimized => "optimized",
            Self::NonOptimized => "non-optimized",
            Self::Inaccessible => "inaccessible",
            Self::PersistentLoss => "persistent-loss",
            Self::Change => "change",
        }
    }
}

/// The ANA state of one group on this node's ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AnaGroupState {
    /// Group id, `1..=`[`MAX_ANA_GROUP`].
    pub group: u32,
    /// Its state.
    pub state: AnaState,
}

/// One registrant of a namespace's reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExportRegistrant {
    /// Host identifier (non-zero, once per reservation).
    pub host_id: [u8; 16],
    /// Reservation key.
    pub key: u64,
    /// Controller id Reservation Report shows (0xFFFF: dynamic).
    pub cntlid: u16,
}

/// The reservation state of one exported namespace, as the metadata service keeps it on the
/// drives (ONDISK record 10).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ExportReservation {
    /// The namespace (its NGUID).
    pub nguid: [u8; 16],
    /// Grows with every committed change: a reader takes only a newer one.
    pub version: u64,
    /// PRGEN.
    pub generation: u32,
    /// Reservation type (0: none; 1..=6).
    pub rtype: u8,
    /// Persist Through Power Loss.
    pub ptpl: bool,
    /// The holder of types 1..=4 (all zero otherwise).
    pub holder: [u8; 16],
    /// The registrants, in registration order (at most [`MAX_REGISTRANTS`]).
    pub registrants: Vec<ExportRegistrant>,
}

/// What the fabric exports, as one versioned whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportTable {
    /// Grows with every published table (1..=[`MAX_GENERATION`]).
    pub generation: u64,
    /// The subsystems.
    pub subsystems: Vec<ExportSubsystem>,
    /// The ANA state of every group a namespace names (and of groups without namespaces yet),
    /// by group id.
    pub ana: Vec<AnaGroupState>,
    /// The reservation state of the namespaces that have one (by NGUID).
    pub reservations: Vec<ExportReservation>,
}

impl ExportTable {
    /// The state of group `group`, if the table says.
    pub fn ana_state(&self, group: u32) -> Option<AnaState> {
        self.ana.iter().find(|g| g.group == group).map(|g| g.state)
    }
}

/// Why bytes are not a valid export table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The bytes end inside a field.
    #[error("Export table ends early at byte {at}")]
    Truncated {
        /// Offset of the field that does not fit.
        at: usize,
    },
    /// Bytes follow the last subsystem.
    #[error("Export table has {extra} bytes after its end")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// Another encoding version.
    #[error("Export table has format version {0}, this build reads {FORMAT_VERSION}")]
    Version(u32),
    /// Generation 0 or past [`MAX_GENERATION`].
    #[error("Export table generation {0} is out of range")]
    Generation(u64),
    /// A text field is not UTF-8.
    #[error("Export table: {what} is not UTF-8")]
    NotUtf8 {
        /// Which field.
        what: &'static str,
    },
    /// A list longer than its limit.
    #[error("Export table: {count} {what} (at most {max})")]
    TooMany {
        /// Which list.
        what: &'static str,
        /// Its length.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A subsystem flags byte with unknown bits.
    #[error("Export table: subsystem {nqn} has unknown flags {flags:#04x}")]
    Flags {
        /// The subsystem.
        nqn: String,
        /// The flags.
        flags: u8,
    },
    /// An NQN that is not one.
    #[error("Export table: {what} {nqn:?} {why}")]
    BadNqn {
        /// Subsystem or host NQN.
        what: &'static str,
        /// The NQN (cut to 64 characters).
        nqn: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A subsystem NQN used twice.
    #[error("Export table: subsystem {0} is listed twice")]
    DuplicateNqn(String),
    /// A host's secrets that cannot be.
    #[error("Export table: the secrets of host {host} on {nqn} {why}")]
    Secrets {
        /// The subsystem.
        nqn: String,
        /// The host.
        host: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A host listed twice on a subsystem.
    #[error("Export table: host {host} is listed twice on {nqn}")]
    DuplicateHost {
        /// The subsystem.
        nqn: String,
        /// The host.
        host: String,
    },
    /// A serial or model number that cannot be reported.
    #[error("Export table: {field} of {nqn} {why}")]
    BadField {
        /// The subsystem.
        nqn: String,
        /// `serial` or `model`.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// An nsid outside `1..=MAX_NSID`.
    #[error("Export table: namespace id {nsid} of {nqn} is outside 1..={MAX_NSID}")]
    Nsid {
        /// The subsystem.
        nqn: String,
        /// The nsid.
        nsid: u32,
    },
    /// An nsid used twice in one subsystem.
    #[error("Export table: namespace id {nsid} is used twice in {nqn}")]
    DuplicateNsid {
        /// The subsystem.
        nqn: String,
        /// The nsid.
        nsid: u32,
    },
    /// An ANA group entry that is not valid.
    #[error("Export table: ANA group {group}: {why}")]
    AnaGroup {
        /// The group.
        group: u32,
        /// What is wrong.
        why: String,
    },
    /// A reservation entry that is not valid.
    #[error("Export table: reservation of namespace {nguid}: {why}")]
    Reservation {
        /// The namespace's NGUID, in hex.
        nguid: String,
        /// What is wrong.
        why: String,
    },
    /// A namespace whose size or format is not servable.
    #[error("Export table: namespace {nsid} of {nqn}: {why}")]
    Namespace {
        /// The subsystem.
        nqn: String,
        /// The nsid.
        nsid: u32,
        /// What is wrong.
        why: String,
    },
}

/// Errors of the exports region.
#[derive(Debug, thiserror::Error)]
pub enum ExportsError {
    /// Creating, mapping or attaching the region failed.
    #[error("Exports region is unusable: {0}")]
    Region(#[source] RegionError),
    /// The region is not an exports region (tag, capacity or size).
    #[error("Fd is not an exports region: {0}")]
    NotExports(String),
    /// The table is invalid (refused before publishing, or found so when reading).
    #[error(transparent)]
    Table(#[from] TableError),
    /// The encoded table does not fit a slot.
    #[error("Export table of {len} bytes does not fit the region's {capacity}-byte slots")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// Slot capacity.
        capacity: usize,
    },
    /// Publishing a generation that is not newer than the published one.
    #[error("Export table generation {new} is not greater than the published {current}")]
    StaleGeneration {
        /// The generation offered.
        new: u64,
        /// The generation published.
        current: u64,
    },
    /// The region's published slot does not hold what its header and `current` word say.
    #[error("Exports region is corrupt: {0}")]
    Corrupt(String),
    /// A writer published again and again while this reader copied.
    #[error("Export table changed under {attempts} consecutive reads; try again")]
    Contended {
        /// Reads attempted.
        attempts: usize,
    },
}

type Result<T> = std::result::Result<T, ExportsError>;

impl ExportTable {
    /// Checks everything decoding checks (see the module docs).
    pub fn validate(&self) -> std::result::Result<(), TableError> {
        if self.generation == 0 || self.generation > MAX_GENERATION {
            return Err(TableError::Generation(self.generation));
        }
        too_many("subsystems", self.subsystems.len(), MAX_SUBSYSTEMS)?;
        too_many("ANA groups", self.ana.len(), MAX_ANA_GROUP as usize)?;
        let mut groups = std::collections::HashSet::new();
        for g in &self.ana {
            if g.group == 0 || g.group > MAX_ANA_GROUP {
                return Err(TableError::AnaGroup {
                    group: g.group,
                    why: format!("outside 1..={MAX_ANA_GROUP}"),
                });
            }
            if !groups.insert(g.group) {
                return Err(TableError::AnaGroup {
                    group: g.group,
                    why: "listed twice".to_owned(),
                });
            }
        }
        let mut nqns = std::collections::HashSet::new();
        let mut nguids = std::collections::HashSet::new();
        let mut uuids = std::collections::HashSet::new();
        for s in &self.subsystems {
            check_nqn("subsystem NQN", &s.nqn)?;
            if s.nqn == DISCOVERY_NQN {
                return Err(TableError::BadNqn {
                    what: "subsystem NQN",
                    nqn: s.nqn.clone(),
                    why: "is the discovery subsystem's",
                });
            }
            if !nqns.insert(s.nqn.as_str()) {
                return Err(TableError::DuplicateNqn(s.nqn.clone()));
            }
            check_ascii(&s.nqn, "serial", &s.serial, 20)?;
            check_ascii(&s.nqn, "model", &s.model, 40)?;
            too_many("hosts", s.hosts.len(), MAX_HOSTS)?;
            let mut hosts = std::collections::HashSet::new();
            for h in &s.hosts {
                check_nqn("host NQN", h)?;
                if !hosts.insert(h.as_str()) {
                    return Err(TableError::DuplicateHost {
                        nqn: s.nqn.clone(),
                        host: h.clone(),
                    });
                }
            }
            let mut with_secrets = std::collections::HashSet::new();
            for x in &s.secrets {
                let why = if !hosts.contains(x.host.as_str()) {
                    Some("are of a host the subsystem does not allow")
                } else if !with_secrets.insert(x.host.as_str()) {
                    Some("are listed twice")
                } else if x.sealed.is_empty() || x.sealed.len() > MAX_SEALED_BYTES {
                    Some("have an impossible length")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(TableError::Secrets {
                        nqn: s.nqn.clone(),
                        host: x.host.clone(),
                        why,
                    });
                }
            }
            too_many("namespaces", s.namespaces.len(), MAX_NSID as usize)?;
            let mut nsids = std::collections::HashSet::new();
            for n in &s.namespaces {
                if n.nsid == 0 || n.nsid > MAX_NSID {
                    return Err(TableError::Nsid {
                        nqn: s.nqn.clone(),
                        nsid: n.nsid,
                    });
                }
                if !nsids.insert(n.nsid) {
                    return Err(TableError::DuplicateNsid {
                        nqn: s.nqn.clone(),
                        nsid: n.nsid,
                    });
                }
                let bad = |why: String| TableError::Namespace {
                    nqn: s.nqn.clone(),
                    nsid: n.nsid,
                    why,
                };
                if !matches!(n.block_size, 512 | 4096) {
                    return Err(bad(format!("block size {} (512 or 4096)", n.block_size)));
                }
                if n.blocks == 0 || n.blocks.checked_mul(u64::from(n.block_size)).is_none() {
                    return Err(bad(format!("{} blocks", n.blocks)));
                }
                if n.ana_group == 0 || n.ana_group > MAX_ANA_GROUP {
                    return Err(bad(format!(
                        "ANA group {} (1..={MAX_ANA_GROUP})",
                        n.ana_group
                    )));
                }
                if !groups.contains(&n.ana_group) {
                    return Err(bad(format!("ANA group {} has no state", n.ana_group)));
                }
                for (what, id, seen) in [
                    ("NGUID", &n.nguid, &mut nguids),
                    ("UUID", &n.uuid, &mut uuids),
                ] {
                    if *id == [0; 16] {
                        return Err(bad(format!("{what} is all zero")));
                    }
                    if !seen.insert(*id) {
                        return Err(bad(format!("{what} is used by another namespace")));
                    }
                }
            }
        }
        too_many("reservations", self.reservations.len(), nguids.len())?;
        let mut reserved = std::collections::HashSet::new();
        for r in &self.reservations {
            let bad = |why: &str| TableError::Reservation {
                nguid: r.nguid.iter().map(|b| format!("{b:02x}")).collect(),
                why: why.to_owned(),
            };
            if !nguids.contains(&r.nguid) {
                return Err(bad("no such namespace in the table"));
            }
            if !reserved.insert(r.nguid) {
                return Err(bad("listed twice"));
            }
            if r.rtype > 6 {
                return Err(bad(&format!("reservation type {} (0..=6)", r.rtype)));
            }
            too_many("registrants", r.registrants.len(), MAX_REGISTRANTS)?;
            for (i, g) in r.registrants.iter().enumerate() {
                if g.host_id == [0; 16] {
                    return Err(bad("a registrant's host id is all zero"));
                }
                if r.registrants[..i].iter().any(|o| o.host_id == g.host_id) {
                    return Err(bad("a host is registered twice"));
                }
            }
        }
        Ok(())
    }

    /// Encodes a valid table (see the module docs for the format).
    pub fn encode(&self) -> std::result::Result<Vec<u8>, TableError> {
        self.validate()?;
        let mut b = Vec::with_capacity(64 + self.subsystems.len() * 256);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        put_count(&mut b, self.subsystems.len());
        for s in &self.subsystems {
            put_str(&mut b, &s.nqn);
            put_str(&mut b, &s.serial);
            put_str(&mut b, &s.model);
            b.push(u8::from(s.allow_any_host));
            put_count(&mut b, s.hosts.len());
            for h in &s.hosts {
                put_str(&mut b, h);
            }
            put_count(&mut b, s.secrets.len());
            for x in &s.secrets {
                put_str(&mut b, &x.host);
                // At most MAX_SEALED_BYTES after validation.
                b.extend_from_slice(&(x.sealed.len() as u16).to_le_bytes());
                b.extend_from_slice(&x.sealed);
            }
            put_count(&mut b, s.namespaces.len());
            for n in &s.namespaces {
                b.extend_from_slice(&n.nsid.to_le_bytes());
                b.extend_from_slice(&n.volume.to_le_bytes());
                b.extend_from_slice(&n.block_size.to_le_bytes());
                b.extend_from_slice(&n.blocks.to_le_bytes());
                b.extend_from_slice(&n.nguid);
                b.extend_from_slice(&n.uuid);
                b.extend_from_slice(&n.ana_group.to_le_bytes());
            }
        }
        put_count(&mut b, self.ana.len());
        for g in &self.ana {
            b.extend_from_slice(&g.group.to_le_bytes());
            b.push(g.state as u8);
        }
        put_count(&mut b, self.reservations.len());
        for r in &self.reservations {
            b.extend_from_slice(&r.nguid);
            b.extend_from_slice(&r.version.to_le_bytes());
            b.extend_from_slice(&r.generation.to_le_bytes());
            b.push(r.rtype);
            b.push(u8::from(r.ptpl));
            b.extend_from_slice(&r.holder);
            // Validated: at most 64.
            b.extend_from_slice(&(r.registrants.len() as u16).to_le_bytes());
            for g in &r.registrants {
                b.extend_from_slice(&g.host_id);
                b.extend_from_slice(&g.key.to_le_bytes());
                b.extend_from_slice(&g.cntlid.to_le_bytes());
            }
        }
        Ok(b)
    }

    /// Decodes and validates a table. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Self, TableError> {
        let mut r = Cursor { b: bytes, at: 0 };
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(TableError::Version(version));
        }
        let generation = r.u64()?;
        // Smallest subsystem: three empty strings, flags, two counts.
        let count = r.count("subsystems", 2 * 3 + 1 + 4 + 4, MAX_SUBSYSTEMS)?;
        let mut subsystems = Vec::with_capacity(count);
        for _ in 0..count {
            let nqn = r.str("subsystem NQN")?;
            let serial = r.str("serial")?;
            let model = r.str("model")?;
            let flags = r.u8()?;
            if flags & !1 != 0 {
                return Err(TableError::Flags {
                    nqn: cut(&nqn),
                    flags,
                });
            }
            let n = r.count("hosts", 2, MAX_HOSTS)?;
            let mut hosts = Vec::with_capacity(n);
            for _ in 0..n {
                hosts.push(r.str("host NQN")?);
            }
            let n = r.count("secrets", 4, MAX_HOSTS)?;
            let mut secrets = Vec::with_capacity(n);
            for _ in 0..n {
                let host = r.str("host NQN of secrets")?;
                let len = usize::from(u16::from_le_bytes(r.array()?));
                secrets.push(ExportSecret {
                    host,
                    sealed: r.take(len)?.to_vec(),
                });
            }
            let n = r.count("namespaces", NAMESPACE_BYTES, MAX_NSID as usize)?;
            let mut namespaces = Vec::with_capacity(n);
            for _ in 0..n {
                namespaces.push(ExportNamespace {
                    nsid: r.u32()?,
                    volume: r.u32()?,
                    block_size: r.u32()?,
                    blocks: r.u64()?,
                    nguid: r.id()?,
                    uuid: r.id()?,
                    ana_group: r.u32()?,
                });
            }
            subsystems.push(ExportSubsystem {
                nqn,
                serial,
                model,
                allow_any_host: flags & 1 != 0,
                hosts,
                secrets,
                namespaces,
            });
        }
        let n = r.count("ANA groups", 5, MAX_ANA_GROUP as usize)?;
        let mut ana = Vec::with_capacity(n);
        for _ in 0..n {
            let group = r.u32()?;
            let code = r.u8()?;
            let state = AnaState::from_code(code).ok_or_else(|| TableError::AnaGroup {
                group,
                why: format!("state {code:#04x} is not an ANA state"),
            })?;
            ana.push(AnaGroupState { group, state });
        }
        let n = r.count(
            "reservations",
            RESV_BYTES,
            MAX_SUBSYSTEMS.saturating_mul(MAX_NSID as usize),
        )?;
        let mut reservations = Vec::with_capacity(n);
        for _ in 0..n {
            let nguid = r.id()?;
            let version = r.u64()?;
            let generation = r.u32()?;
            let rtype = r.u8()?;
            let flags = r.u8()?;
            let holder = r.id()?;
            let count = usize::from(u16::from_le_bytes(r.array()?));
            if flags & !1 != 0 {
                return Err(TableError::Reservation {
                    nguid: nguid.iter().map(|b| format!("{b:02x}")).collect(),
                    why: format!("unknown flags {flags:#04x}"),
                });
            }
            too_many("registrants", count, MAX_REGISTRANTS)?;
            if count.saturating_mul(REGISTRANT_BYTES) > bytes.len().saturating_sub(r.at) {
                return Err(TableError::Truncated { at: r.at });
            }
            let mut registrants = Vec::with_capacity(count);
            for _ in 0..count {
                registrants.push(ExportRegistrant {
                    host_id: r.id()?,
                    key: r.u64()?,
                    cntlid: u16::from_le_bytes(r.array()?),
                });
            }
            reservations.push(ExportReservation {
                nguid,
                version,
                generation,
                rtype,
                ptpl: flags & 1 != 0,
                holder,
                registrants,
            });
        }
        if r.at != bytes.len() {
            return Err(TableError::TrailingBytes {
                extra: bytes.len() - r.at,
            });
        }
        let t = Self {
            generation,
            subsystems,
            ana,
            reservations,
        };
        t.validate()?;
        Ok(t)
    }
}

fn too_many(what: &'static str, count: usize, max: usize) -> std::result::Result<(), TableError> {
    if count > max {
        return Err(TableError::TooMany { what, count, max });
    }
    Ok(())
}

/// At most 64 characters of `s`, for messages.
fn cut(s: &str) -> String {
    s.chars().take(64).collect()
}

fn check_nqn(what: &'static str, nqn: &str) -> std::result::Result<(), TableError> {
    let why = if !nqn.starts_with("nqn.") {
        "does not start with \"nqn.\""
    } else if nqn.len() > MAX_NQN_LEN {
        "is longer than 223 bytes"
    } else if nqn.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(TableError::BadNqn {
        what,
        nqn: cut(nqn),
        why,
    })
}

fn check_ascii(
    nqn: &str,
    field: &'static str,
    v: &str,
    max: usize,
) -> std::result::Result<(), TableError> {
    let why = if v.len() > max {
        format!("is longer than {max} bytes")
    } else if !v.bytes().all(|c| (0x20..=0x7E).contains(&c)) {
        "is not printable ASCII".to_owned()
    } else {
        return Ok(());
    };
    Err(TableError::BadField {
        nqn: cut(nqn),
        field,
        why,
    })
}

fn put_count(b: &mut Vec<u8>, n: usize) {
    // Validated counts are at most 1024.
    b.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    // Validated strings are at most 223 bytes.
    let n = s.len().min(usize::from(u16::MAX));
    b.extend_from_slice(&(n as u16).to_le_bytes());
    b.extend_from_slice(&s.as_bytes()[..n]);
}

/// Reads fields off the encoded table, checking every length.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], TableError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(TableError::Truncated { at: self.at })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], TableError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> std::result::Result<u8, TableError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> std::result::Result<u32, TableError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> std::result::Result<u64, TableError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn id(&mut self) -> std::result::Result<[u8; 16], TableError> {
        self.array()
    }

    fn str(&mut self, what: &'static str) -> std::result::Result<String, TableError> {
        let n = u16::from_le_bytes(self.array()?);
        let bytes = self.take(usize::from(n))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| TableError::NotUtf8 { what })
    }

    /// A list length: at most `max`, and no more items of at least `min_item` bytes than the
    /// bytes left could hold (so a hostile count cannot make us allocate).
    fn count(
        &mut self,
        what: &'static str,
        min_item: usize,
        max: usize,
    ) -> std::result::Result<usize, TableError> {
        let at = self.at;
        let n = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
        too_many(what, n, max)?;
        let left = self.b.len() - self.at;
        if n.saturating_mul(min_item) > left {
            return Err(TableError::Truncated { at });
        }
        Ok(n)
    }
}

/// The shared-memory region carrying the export table (see the module docs for its layout and
/// protocol). One process publishes, any number read.
#[derive(Debug)]
pub struct ExportsRegion {
    region: Region,
    capacity: usize,
}

impl ExportsRegion {
    /// Supervisor side: a new, empty exports region of `size` bytes (rounded up to a page, at
    /// least 4 KiB).
    pub fn create(size: usize) -> Result<Self> {
        let page = page_size();
        let size = size.max(MIN_SIZE).div_ceil(page) * page;
        let capacity = slot_capacity(size);
        let region = Region::create(
            "exports",
            RegionKind::Plain,
            size,
            [EXPORTS_TAG, capacity as u64, 0, 0, 0],
        )
        .map_err(ExportsError::Region)?;
        Ok(Self { region, capacity })
    }

    /// Attaches a handed-over region, checking that it is an exports region whose slots fit.
    pub fn attach(fd: OwnedFd) -> Result<Self> {
        let region = Region::attach(fd, RegionKind::Plain).map_err(ExportsError::Region)?;
        let params = region.params();
        if params[0] != EXPORTS_TAG {
            return Err(ExportsError::NotExports(format!("tag {:#018x}", params[0])));
        }
        let capacity = usize::try_from(params[1]).unwrap_or(usize::MAX);
        if capacity % 8 != 0 || capacity == 0 || capacity > slot_capacity(region.len()) {
            return Err(ExportsError::NotExports(format!(
                "slot capacity {capacity} does not fit its {} bytes",
                region.len()
            )));
        }
        Ok(Self { region, capacity })
    }

    /// The region (the supervisor hands its fd to the writer and the readers).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Largest encoded table a slot holds, in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn current(&self) -> &AtomicU64 {
        self.region.atomic_u64(CURRENT_OFFSET)
    }

    fn slot_offset(&self, slot: usize) -> usize {
        SLOTS_OFFSET + slot * (SLOT_HEADER + self.capacity)
    }

    /// Slot `slot`'s header word `index` (0 seq, 1 generation, 2 length, 3 CRC).
    fn slot_word(&self, slot: usize, index: usize) -> &AtomicU64 {
        self.region.atomic_u64(self.slot_offset(slot) + index * 8)
    }

    /// The generation of the published table (0: none yet). A hint: the table itself is only
    /// known good once [`ExportsRegion::read`] checked it.
    pub fn current_generation(&self) -> u64 {
        self.current().load(Ordering::Acquire) >> 1
    }

    /// Writer side: publishes `table` in the spare slot, then makes it current. Refuses an
    /// invalid table, one that does not fit, and a generation not greater than the published
    /// one. Ring the doorbell afterwards.
    pub fn publish(&self, table: &ExportTable) -> Result<()> {
        let body = table.encode()?;
        if body.len() > self.capacity {
            return Err(ExportsError::TooLarge {
                len: body.len(),
                capacity: self.capacity,
            });
        }
        let cur = self.current().load(Ordering::Acquire);
        let current = cur >> 1;
        if table.generation <= current {
            return Err(ExportsError::StaleGeneration {
                new: table.generation,
                current,
            });
        }
        let slot = if cur == 0 { 0 } else { 1 - (cur & 1) as usize };
        let seq = self.slot_word(slot, 0).load(Ordering::Relaxed);
        // Odd while being written; a dead writer may have left it odd already.
        let begin = if seq % 2 == 0 {
            seq.wrapping_add(1)
        } else {
            seq.wrapping_add(2)
        };
        // Release: a reader that sees the odd value also sees the `current` it was published
        // after. The fence orders the body writes after it.
        self.slot_word(slot, 0).store(begin, Ordering::Release);
        fence(Ordering::Release);
        self.copy_in(self.slot_offset(slot) + SLOT_HEADER, &body);
        self.slot_word(slot, 1)
            .store(table.generation, Ordering::Relaxed);
        self.slot_word(slot, 2)
            .store(body.len() as u64, Ordering::Relaxed);
        self.slot_word(slot, 3)
            .store(u64::from(crc32c::crc32c(&body)), Ordering::Relaxed);
        self.slot_word(slot, 0)
            .store(begin.wrapping_add(1), Ordering::Release);
        self.current()
            .store(table.generation << 1 | slot as u64, Ordering::Release);
        Ok(())
    }

    /// Reader side: the published table, `None` if none was ever published. A copy lapped by
    /// the writer is retried; a region whose published slot fails its checks is
    /// [`ExportsError::Corrupt`].
    pub fn read(&self) -> Result<Option<ExportTable>> {
        let mut body = Vec::new();
        for _ in 0..READ_ATTEMPTS {
            let cur = self.current().load(Ordering::Acquire);
            if cur == 0 {
                return Ok(None);
            }
            let (generation, slot) = (cur >> 1, (cur & 1) as usize);
            let seq = self.slot_word(slot, 0).load(Ordering::Acquire);
            if seq % 2 == 1 {
                if self.current().load(Ordering::Acquire) == cur {
                    return Err(ExportsError::Corrupt(format!(
                        "the published slot {slot} is marked as being written"
                    )));
                }
                std::thread::yield_now();
                continue;
            }
            let stored_generation = self.slot_word(slot, 1).load(Ordering::Relaxed);
            let len = self.slot_word(slot, 2).load(Ordering::Relaxed);
            let crc = self.slot_word(slot, 3).load(Ordering::Relaxed);
            let fits = usize::try_from(len).ok().filter(|&n| n <= self.capacity);
            body.clear();
            if let Some(n) = fits {
                body.resize(n, 0);
                self.copy_out(self.slot_offset(slot) + SLOT_HEADER, &mut body);
            }
            fence(Ordering::Acquire);
            let seq_after = self.slot_word(slot, 0).load(Ordering::Acquire);
            if seq_after != seq || self.current().load(Ordering::Acquire) != cur {
                std::thread::yield_now();
                continue;
            }
            if fits.is_none() {
                return Err(ExportsError::Corrupt(format!(
                    "slot {slot} claims {len} bytes, more than its {}",
                    self.capacity
                )));
            }
            if stored_generation != generation {
                return Err(ExportsError::Corrupt(format!(
                    "slot {slot} holds generation {stored_generation}, the region says {generation}"
                )));
            }
            if u64::from(crc32c::crc32c(&body)) != crc {
                return Err(ExportsError::Corrupt(format!(
                    "slot {slot} (generation {generation}) fails its CRC"
                )));
            }
            let table = ExportTable::decode(&body)?;
            if table.generation != generation {
                return Err(ExportsError::Corrupt(format!(
                    "the table in slot {slot} says generation {}, the region {generation}",
                    table.generation
                )));
            }
            return Ok(Some(table));
        }
        Err(ExportsError::Contended {
            attempts: READ_ATTEMPTS,
        })
    }

    /// Copies `bytes` into the mapping at `offset` (8-aligned, inside a slot) with volatile
    /// writes.
    fn copy_in(&self, offset: usize, bytes: &[u8]) {
        if self.region.check_range(offset, bytes.len(), 8).is_err() {
            return;
        }
        let base = self.region.base().as_ptr().wrapping_add(offset);
        let mut words = bytes.chunks_exact(8);
        for (i, w) in words.by_ref().enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            let p = base.wrapping_add(i * 8).cast::<u64>();
            // SAFETY: `p` lies inside the mapping (range checked above) and is 8-byte aligned
            // (8-aligned offset from a page-aligned base); nobody holds a reference to these
            // bytes, and a concurrent reader only copies them (and discards a torn copy).
            unsafe { std::ptr::write_volatile(p, u64::from_ne_bytes(a)) };
        }
        let done = bytes.len() - words.remainder().len();
        for (i, &b) in words.remainder().iter().enumerate() {
            let p = base.wrapping_add(done + i);
            // SAFETY: inside the checked range; a byte has no alignment.
            unsafe { std::ptr::write_volatile(p, b) };
        }
    }

    /// Copies `out.len()` bytes out of the mapping at `offset` (8-aligned) with volatile reads:
    /// the writer may be changing them, which the caller detects afterwards.
    fn copy_out(&self, offset: usize, out: &mut [u8]) {
        if self.region.check_range(offset, out.len(), 8).is_err() {
            return;
        }
        let base = self
            .region
            .base()
            .as_ptr()
            .cast_const()
            .wrapping_add(offset);
        let len = out.len();
        let mut words = out.chunks_exact_mut(8);
        for (i, w) in words.by_ref().enumerate() {
            let p = base.wrapping_add(i * 8).cast::<u64>();
            // SAFETY: `p` lies inside the mapping (range checked above) and is 8-byte aligned;
            // the read is volatile into a local: no reference to shared bytes is formed, and
            // any bit pattern is a valid u64.
            let v = unsafe { std::ptr::read_volatile(p) };
            w.copy_from_slice(&v.to_ne_bytes());
        }
        let rest = words.into_remainder();
        let done = len - rest.len();
        for (i, b) in rest.iter_mut().enumerate() {
            let p = base.wrapping_add(done + i);
            // SAFETY: inside the checked range; any byte is a valid u8.
            *b = unsafe { std::ptr::read_volatile(p) };
        }
    }

    /// Simulates a writer that dies mid-write: marks the spare slot as being written and
    /// scribbles `garbage` over its header words and body, without publishing. For tests.
    #[doc(hidden)]
    pub fn die_mid_write_for_tests(&self, garbage: &[u8]) {
        let cur = self.current().load(Ordering::Acquire);
        let slot = if cur == 0 { 0 } else { 1 - (cur & 1) as usize };
        let seq = self.slot_word(slot, 0).load(Ordering::Relaxed);
        self.slot_word(slot, 0).store(seq | 1, Ordering::Release);
        let word = |i: usize| {
            let mut a = [0u8; 8];
            for (j, b) in a.iter_mut().enumerate() {
                *b = garbage
                    .get((i * 8 + j) % garbage.len().max(1))
                    .copied()
                    .unwrap_or(0xA5);
            }
            u64::from_le_bytes(a)
        };
        for i in 1..4 {
            self.slot_word(slot, i).store(word(i), Ordering::Relaxed);
        }
        let n = garbage.len().min(self.capacity);
        self.copy_in(self.slot_offset(slot) + SLOT_HEADER, &garbage[..n]);
    }

    /// Overwrites byte `at` of the published slot (header from 0, body from 64) with `value`,
    /// as a scribbling peer would. For tests.
    #[doc(hidden)]
    pub fn scribble_current_for_tests(&self, at: usize, value: u8) {
        let cur = self.current().load(Ordering::Acquire);
        let slot = (cur & 1) as usize;
        let at = at % (SLOT_HEADER + self.capacity);
        let offset = self.slot_offset(slot) + at;
        let word = self.region.atomic_u64(offset & !7);
        let shift = (offset % 8) * 8;
        let old = word.load(Ordering::Relaxed);
        word.store(
            (old & !(0xFF << shift)) | u64::from(value) << shift,
            Ordering::Relaxed,
        );
    }

    /// Overwrites the `current` word. For tests.
    #[doc(hidden)]
    pub fn set_current_for_tests(&self, value: u64) {
        self.current().store(value, Ordering::Release);
    }
}

/// Slot capacity of a region of `size` bytes: two slots with their headers after the control
/// words, 8-aligned.
fn slot_capacity(size: usize) -> usize {
    let per_slot = size.saturating_sub(SLOTS_OFFSET) / 2;
    per_slot.saturating_sub(SLOT_HEADER) / 8 * 8
}

const _: () = assert!(CURRENT_OFFSET >= HEADER_SIZE && SLOTS_OFFSET >= CURRENT_OFFSET + 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_leaves_room_for_both_slots() {
        for size in [4096, 8192, DEFAULT_EXPORTS_SIZE] {
            let c = slot_capacity(size);
            assert!(SLOTS_OFFSET + 2 * (SLOT_HEADER + c) <= size);
            assert_eq!(c % 8, 0);
        }
    }

    #[test]
    fn counts_beyond_the_bytes_left_are_truncation() {
        let mut b = Vec::new();
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            ExportTable::decode(&b),
            Err(TableError::Truncated { at: 12 })
        );
    }
}
