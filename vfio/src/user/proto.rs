//! The vfio-user wire format (version 0.1), without I/O.
//!
//! Every message is a 16-byte [`Header`] followed by a command-specific body; the header's
//! `message_size` counts both. The bodies used here are fixed-size structures (their `argsz`,
//! when they have one, is the size of the reply payload the sender can take), sometimes followed
//! by variable data: the capability JSON of `VERSION`, the capability chain of a region-info
//! reply, the bytes of a region read or write. File descriptors travel beside the bytes, as
//! `SCM_RIGHTS` on the message's first byte.
//!
//! All integers are in the host's byte order, as the protocol specifies. The structures here are
//! `#[repr(C)]` with compile-time checks that their C layout and their encoding are both exactly
//! the wire size; encoding and decoding are explicit, field by field. Decoders take any byte
//! slice, check its length first and return [`ProtoError`]; they never panic.

use serde::Deserialize;
use thiserror::Error;

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;
/// The protocol major version spoken here.
pub const VERSION_MAJOR: u16 = 0;
/// The protocol minor version spoken here.
pub const VERSION_MINOR: u16 = 1;
/// The largest `count` of a region read or write that either end here sends or accepts (and the
/// protocol's default `max_data_xfer_size`).
pub const MAX_DATA_XFER_SIZE: u32 = 1 << 20;
/// Room for a command's own fields beside its data in [`MAX_MESSAGE_SIZE`].
pub const MAX_FIELDS_SIZE: usize = 4096;
/// The largest message (header included) either end here accepts: a header, a page of fields and
/// [`MAX_DATA_XFER_SIZE`] bytes of data. A peer claiming more is refused without allocating.
pub const MAX_MESSAGE_SIZE: usize = HEADER_SIZE + MAX_FIELDS_SIZE + MAX_DATA_XFER_SIZE as usize;
/// The most file descriptors either end here receives with one message (announced as
/// `max_msg_fds`).
pub const MAX_MSG_FDS: u32 = 64;
/// The page size of DMA mappings (announced as `pgsizes`).
pub const PAGE_SIZE: u64 = 4096;

/// Command numbers (the header's `command`).
pub mod command {
    /// Version and capability negotiation; the first message of a connection.
    pub const VERSION: u16 = 1;
    /// Share client memory with the device.
    pub const DMA_MAP: u16 = 2;
    /// Withdraw client memory from the device.
    pub const DMA_UNMAP: u16 = 3;
    /// Device flags and region and interrupt counts.
    pub const DEVICE_GET_INFO: u16 = 4;
    /// One region's flags, size, mmap offset and capabilities.
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    /// ioeventfds for a region (not used here).
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    /// One interrupt type's flags and count.
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    /// Wire interrupts to eventfds, trigger, mask or unmask them.
    pub const DEVICE_SET_IRQS: u16 = 8;
    /// Read a device region.
    pub const REGION_READ: u16 = 9;
    /// Write a device region.
    pub const REGION_WRITE: u16 = 10;
    /// Server reads client memory over the socket (not used here).
    pub const DMA_READ: u16 = 11;
    /// Server writes client memory over the socket (not used here).
    pub const DMA_WRITE: u16 = 12;
    /// Reset the device.
    pub const DEVICE_RESET: u16 = 13;

    /// The command's name, for messages (`"unknown"` for a number the protocol does not have).
    pub fn name(command: u16) -> &'static str {
        match command {
            VERSION => "VERSION",
            DMA_MAP => "DMA_MAP",
            DMA_UNMAP => "DMA_UNMAP",
            DEVICE_GET_INFO => "DEVICE_GET_INFO",
            DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
            DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
            DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
            DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
            REGION_READ => "REGION_READ",
            REGION_WRITE => "REGION_WRITE",
            DMA_READ => "DMA_READ",
            DMA_WRITE => "DMA_WRITE",
            DEVICE_RESET => "DEVICE_RESET",
            _ => "unknown",
        }
    }
}

/// The type bits (0-3) of the header's flags.
pub const FLAGS_TYPE_MASK: u32 = 0xf;
/// Message type: a command.
pub const TYPE_COMMAND: u32 = 0;
/// Message type: a reply.
pub const TYPE_REPLY: u32 = 1;
/// Flag: the sender of a command wants no reply (not even an error reply).
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// Flag: the reply reports an error; the header's `error` holds the errno.
pub const FLAG_ERROR: u32 = 1 << 5;

/// PCI region index: BAR 0.
pub const PCI_BAR0_REGION_INDEX: u32 = 0;
/// PCI region index: BAR 1.
pub const PCI_BAR1_REGION_INDEX: u32 = 1;
/// PCI region index: BAR 2.
pub const PCI_BAR2_REGION_INDEX: u32 = 2;
/// PCI region index: BAR 3.
pub const PCI_BAR3_REGION_INDEX: u32 = 3;
/// PCI region index: BAR 4.
pub const PCI_BAR4_REGION_INDEX: u32 = 4;
/// PCI region index: BAR 5.
pub const PCI_BAR5_REGION_INDEX: u32 = 5;
/// PCI region index: expansion ROM.
pub const PCI_ROM_REGION_INDEX: u32 = 6;
/// PCI region index: configuration space.
pub const PCI_CONFIG_REGION_INDEX: u32 = 7;
/// PCI region index: VGA.
pub const PCI_VGA_REGION_INDEX: u32 = 8;
/// Number of PCI regions.
pub const PCI_NUM_REGIONS: u32 = 9;

/// PCI interrupt index: legacy INTx.
pub const PCI_INTX_IRQ_INDEX: u32 = 0;
/// PCI interrupt index: MSI.
pub const PCI_MSI_IRQ_INDEX: u32 = 1;
/// PCI interrupt index: MSI-X.
pub const PCI_MSIX_IRQ_INDEX: u32 = 2;
/// PCI interrupt index: error (AER).
pub const PCI_ERR_IRQ_INDEX: u32 = 3;
/// PCI interrupt index: device request.
pub const PCI_REQ_IRQ_INDEX: u32 = 4;
/// Number of PCI interrupt types.
pub const PCI_NUM_IRQS: u32 = 5;

/// Device flag: the device supports `DEVICE_RESET`.
pub const DEVICE_FLAGS_RESET: u32 = 1;
/// Device flag: the device is a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 2;

/// Region flag: the client may read the region.
pub const REGION_INFO_FLAG_READ: u32 = 1;
/// Region flag: the client may write the region.
pub const REGION_INFO_FLAG_WRITE: u32 = 2;
/// Region flag: the client may mmap the region (the reply carries a file descriptor).
pub const REGION_INFO_FLAG_MMAP: u32 = 4;
/// Region flag: a capability chain follows the region info (`cap_offset`).
pub const REGION_INFO_FLAG_CAPS: u32 = 8;
/// Region capability id: sparse mmap areas.
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
/// The version of the sparse mmap capability.
pub const REGION_INFO_CAP_SPARSE_MMAP_VERSION: u16 = 1;

/// Interrupt info flag: the interrupt type can signal an eventfd.
pub const IRQ_INFO_EVENTFD: u32 = 1;
/// Interrupt info flag: the interrupt type can be masked and unmasked.
pub const IRQ_INFO_MASKABLE: u32 = 2;
/// Interrupt info flag: the interrupt masks itself when triggered.
pub const IRQ_INFO_AUTOMASKED: u32 = 4;
/// Interrupt info flag: interrupts are set up as a set.
pub const IRQ_INFO_NORESIZE: u32 = 8;

/// DMA map flag: the device may read the memory.
pub const DMA_MAP_FLAG_READ: u32 = 1;
/// DMA map flag: the device may write the memory.
pub const DMA_MAP_FLAG_WRITE: u32 = 2;

/// `SET_IRQS` data type: none; the action applies to the whole range.
pub const IRQ_SET_DATA_NONE: u32 = 1;
/// `SET_IRQS` data type: one boolean byte per interrupt follows the structure.
pub const IRQ_SET_DATA_BOOL: u32 = 2;
/// `SET_IRQS` data type: one eventfd per interrupt travels as `SCM_RIGHTS` (none: unwire).
pub const IRQ_SET_DATA_EVENTFD: u32 = 4;
/// `SET_IRQS` action: mask.
pub const IRQ_SET_ACTION_MASK: u32 = 8;
/// `SET_IRQS` action: unmask.
pub const IRQ_SET_ACTION_UNMASK: u32 = 16;
/// `SET_IRQS` action: trigger (with eventfds: the eventfds to signal on a trigger).
pub const IRQ_SET_ACTION_TRIGGER: u32 = 32;
/// The data-type bits of `SET_IRQS` flags (exactly one must be set).
pub const IRQ_SET_DATA_TYPE_MASK: u32 =
    IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;
/// The action bits of `SET_IRQS` flags (exactly one must be set).
pub const IRQ_SET_ACTION_TYPE_MASK: u32 =
    IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER;

/// A message, or part of one, that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    /// Fewer bytes than the structure needs.
    #[error("{what} is {len} bytes, shorter than its {need}")]
    Short {
        /// The structure.
        what: &'static str,
        /// Bytes there were.
        len: usize,
        /// Bytes it needs.
        need: usize,
    },
    /// A header's `message_size` below the header or above [`MAX_MESSAGE_SIZE`].
    #[error("message size {0} is outside {HEADER_SIZE}..={MAX_MESSAGE_SIZE}")]
    MessageSize(u32),
    /// The capability JSON of a `VERSION` message does not parse.
    #[error("version capabilities are not valid: {0}")]
    Capabilities(String),
    /// A region's capability chain is malformed.
    #[error("region capability chain: {0}")]
    RegionCaps(String),
}

/// Integers the wire structures are made of.
trait Field: Sized + Copy + Default {
    const SIZE: usize;
    fn from_slice(bytes: &[u8]) -> Self;
}

macro_rules! field {
    ($($ty:ty),*) => {$(
        impl Field for $ty {
            const SIZE: usize = std::mem::size_of::<$ty>();
            fn from_slice(bytes: &[u8]) -> Self {
                bytes.try_into().map_or(0, <$ty>::from_ne_bytes)
            }
        }
    )*};
}
field!(u16, u32, u64);

/// Reads fields in order from a slice already checked to be long enough.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(what: &'static str, bytes: &'a [u8], need: usize) -> Result<Self, ProtoError> {
        if bytes.len() < need {
            return Err(ProtoError::Short {
                what,
                len: bytes.len(),
                need,
            });
        }
        Ok(Reader { bytes, at: 0 })
    }

    fn read<T: Field>(&mut self) -> T {
        let end = self.at.saturating_add(T::SIZE);
        let value = self
            .bytes
            .get(self.at..end)
            .map_or_else(T::default, T::from_slice);
        self.at = end;
        value
    }
}

/// Writes fields in order into a buffer of exactly the structure's size.
struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.at.saturating_add(bytes.len());
        if let Some(dst) = self.out.get_mut(self.at..end) {
            dst.copy_from_slice(bytes);
        }
        self.at = end;
    }
}

/// Declares a fixed-size wire structure with its encoder and decoder.
macro_rules! wire {
    (
        $(#[$meta:meta])*
        pub struct $name:ident ($what:literal, $size:literal) {
            $( $(#[$fmeta:meta])* pub $field:ident: $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        // The C layout has no padding (it is the wire size) and the encoding writes every field
        // (its length is the wire size too).
        const _: () = assert!(std::mem::size_of::<$name>() == $size);
        const _: () = assert!(0 $(+ std::mem::size_of::<$ty>())* == $size);

        impl $name {
            /// Encoded size in bytes.
            pub const SIZE: usize = $size;

            /// The encoding, in host byte order.
            pub fn encode(&self) -> [u8; $size] {
                let mut out = [0u8; $size];
                let mut writer = Writer { out: &mut out, at: 0 };
                $( writer.put(&self.$field.to_ne_bytes()); )*
                out
            }

            /// Decodes the structure from the first [`Self::SIZE`] bytes of `bytes`; what
            /// follows is the caller's.
            pub fn decode(bytes: &[u8]) -> Result<Self, ProtoError> {
                let mut reader = Reader::new($what, bytes, $size)?;
                Ok(Self { $( $field: reader.read(), )* })
            }
        }
    };
}

wire! {
    /// The header every message starts with.
    pub struct Header("message header", 16) {
        /// Chosen by the sender of a command, echoed in its reply.
        pub message_id: u16,
        /// The command ([`command`]), in a command and in its reply.
        pub command: u16,
        /// Size of the whole message, header included.
        pub message_size: u32,
        /// Type bits and the no-reply and error flags.
        pub flags: u32,
        /// The errno of an error reply.
        pub error: u32,
    }
}

impl Header {
    /// The header of a command whose body is `body_len` bytes.
    pub fn command(message_id: u16, command: u16, body_len: usize) -> Result<Header, ProtoError> {
        Ok(Header {
            message_id,
            command,
            message_size: message_size(body_len)?,
            flags: TYPE_COMMAND,
            error: 0,
        })
    }

    /// The header of a successful reply to this command, with a body of `body_len` bytes.
    pub fn reply(&self, body_len: usize) -> Result<Header, ProtoError> {
        Ok(Header {
            message_id: self.message_id,
            command: self.command,
            message_size: message_size(body_len)?,
            flags: TYPE_REPLY,
            error: 0,
        })
    }

    /// The header of an error reply to this command (error replies have no body).
    pub fn error_reply(&self, errno: u32) -> Header {
        Header {
            message_id: self.message_id,
            command: self.command,
            message_size: HEADER_SIZE as u32,
            flags: TYPE_REPLY | FLAG_ERROR,
            error: errno,
        }
    }

    /// The type bits: [`TYPE_COMMAND`] or [`TYPE_REPLY`] (anything else is malformed).
    pub fn message_type(&self) -> u32 {
        self.flags & FLAGS_TYPE_MASK
    }

    /// Whether the sender of this command wants no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }

    /// Whether this reply reports an error.
    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }

    /// The size of the body that follows, after checking `message_size` against
    /// [`HEADER_SIZE`]`..=`[`MAX_MESSAGE_SIZE`].
    pub fn body_len(&self) -> Result<usize, ProtoError> {
        let size = usize::try_from(self.message_size)
            .map_err(|_| ProtoError::MessageSize(self.message_size))?;
        if !(HEADER_SIZE..=MAX_MESSAGE_SIZE).contains(&size) {
            return Err(ProtoError::MessageSize(self.message_size));
        }
        Ok(size - HEADER_SIZE)
    }
}

/// `message_size` for a body of `body_len` bytes, refusing what exceeds [`MAX_MESSAGE_SIZE`].
fn message_size(body_len: usize) -> Result<u32, ProtoError> {
    let size = body_len.saturating_add(HEADER_SIZE);
    if size > MAX_MESSAGE_SIZE {
        return Err(ProtoError::MessageSize(
            u32::try_from(size).unwrap_or(u32::MAX),
        ));
    }
    u32::try_from(size).map_err(|_| ProtoError::MessageSize(u32::MAX))
}

wire! {
    /// The fixed part of a `VERSION` command or reply; the capability JSON follows.
    pub struct Version("VERSION body", 4) {
        /// Major version.
        pub major: u16,
        /// Minor version.
        pub minor: u16,
    }
}

/// The capabilities exchanged in `VERSION` (the JSON object `{"capabilities": {...}}`).
///
/// Absent fields take the protocol's defaults ([`Capabilities::default`]); unknown fields (such
/// as the `migration` object rust-vmm's implementation sends) are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The most file descriptors the sender can receive with one message.
    pub max_msg_fds: u32,
    /// The largest `count` of a region read or write the sender accepts.
    pub max_data_xfer_size: u32,
    /// Page sizes the sender supports for DMA mappings, OR-ed together.
    pub pgsizes: u64,
}

impl Default for Capabilities {
    /// The protocol's defaults: 1 fd, 1 MiB transfers, 4 KiB pages.
    fn default() -> Self {
        Capabilities {
            max_msg_fds: 1,
            max_data_xfer_size: MAX_DATA_XFER_SIZE,
            pgsizes: PAGE_SIZE,
        }
    }
}

impl Capabilities {
    /// What this crate's client and server announce.
    pub fn ours() -> Self {
        Capabilities {
            max_msg_fds: MAX_MSG_FDS,
            max_data_xfer_size: MAX_DATA_XFER_SIZE,
            pgsizes: PAGE_SIZE,
        }
    }

    /// The NUL-terminated JSON that carries these capabilities.
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = format!(
            "{{\"capabilities\":{{\"max_msg_fds\":{},\"max_data_xfer_size\":{},\"pgsizes\":{}}}}}",
            self.max_msg_fds, self.max_data_xfer_size, self.pgsizes
        )
        .into_bytes();
        json.push(0);
        json
    }

    /// Parses the capability JSON of a `VERSION` message: the bytes up to the first NUL (or all
    /// of them); none at all means the defaults. Numbers beyond `u32` are clamped.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ProtoError> {
        let text = bytes.split(|&b| b == 0).next().unwrap_or_default();
        if text.iter().all(u8::is_ascii_whitespace) {
            return Ok(Capabilities::default());
        }
        let doc: CapsDoc = serde_json::from_slice(text)
            .map_err(|error| ProtoError::Capabilities(error.to_string()))?;
        let clamp = |value: u64| u32::try_from(value).unwrap_or(u32::MAX);
        Ok(Capabilities {
            max_msg_fds: clamp(doc.capabilities.max_msg_fds),
            max_data_xfer_size: clamp(doc.capabilities.max_data_xfer_size),
            pgsizes: doc.capabilities.pgsizes,
        })
    }
}

#[derive(Deserialize, Default)]
struct CapsDoc {
    #[serde(default)]
    capabilities: CapsJson,
}

#[derive(Deserialize)]
struct CapsJson {
    #[serde(default = "default_max_msg_fds")]
    max_msg_fds: u64,
    #[serde(default = "default_max_data_xfer_size")]
    max_data_xfer_size: u64,
    #[serde(default = "default_pgsizes")]
    pgsizes: u64,
}

impl Default for CapsJson {
    fn default() -> Self {
        CapsJson {
            max_msg_fds: default_max_msg_fds(),
            max_data_xfer_size: default_max_data_xfer_size(),
            pgsizes: default_pgsizes(),
        }
    }
}

fn default_max_msg_fds() -> u64 {
    1
}

fn default_max_data_xfer_size() -> u64 {
    u64::from(MAX_DATA_XFER_SIZE)
}

fn default_pgsizes() -> u64 {
    PAGE_SIZE
}

/// The body of a `VERSION` command or reply: version and NUL-terminated capability JSON.
pub fn encode_version(major: u16, minor: u16, caps: &Capabilities) -> Vec<u8> {
    let mut body = Version { major, minor }.encode().to_vec();
    body.extend_from_slice(&caps.to_json());
    body
}

/// Decodes the body of a `VERSION` command or reply.
pub fn decode_version(body: &[u8]) -> Result<(Version, Capabilities), ProtoError> {
    let version = Version::decode(body)?;
    let caps = Capabilities::from_json(body.get(Version::SIZE..).unwrap_or_default())?;
    Ok((version, caps))
}

wire! {
    /// The body of `DMA_MAP` (the memory's fd travels as `SCM_RIGHTS`); the reply has none.
    pub struct DmaMap("DMA_MAP body", 32) {
        /// Size of this structure (32).
        pub argsz: u32,
        /// [`DMA_MAP_FLAG_READ`], [`DMA_MAP_FLAG_WRITE`].
        pub flags: u32,
        /// Offset of the memory in the fd.
        pub offset: u64,
        /// The DMA address (IOVA) the memory appears at.
        pub address: u64,
        /// Size in bytes.
        pub size: u64,
    }
}

wire! {
    /// The body of `DMA_UNMAP`, and of its reply (the same entry, echoed).
    pub struct DmaUnmap("DMA_UNMAP body", 24) {
        /// The most reply payload the client takes (24).
        pub argsz: u32,
        /// Unused in this version; must be zero.
        pub flags: u32,
        /// The DMA address of the mapping.
        pub address: u64,
        /// Its size.
        pub size: u64,
    }
}

wire! {
    /// The body of `DEVICE_GET_INFO` and of its reply.
    pub struct DeviceInfoBody("DEVICE_GET_INFO body", 16) {
        /// In the command: the most reply payload the client takes; in the reply: 16.
        pub argsz: u32,
        /// [`DEVICE_FLAGS_RESET`], [`DEVICE_FLAGS_PCI`].
        pub flags: u32,
        /// Number of regions.
        pub num_regions: u32,
        /// Number of interrupt types.
        pub num_irqs: u32,
    }
}

wire! {
    /// The body of `DEVICE_GET_REGION_INFO` and the start of its reply (capabilities may
    /// follow, at offsets counted from the start of this structure).
    pub struct RegionInfoBody("DEVICE_GET_REGION_INFO body", 32) {
        /// In the command: the most reply payload the client takes; in the reply: the size of
        /// the full payload (more than asked means: ask again with this).
        pub argsz: u32,
        /// `REGION_INFO_FLAG_*`.
        pub flags: u32,
        /// The region's index.
        pub index: u32,
        /// Offset of the first capability from the start of this structure (0: none).
        pub cap_offset: u32,
        /// The region's size.
        pub size: u64,
        /// The region's offset in the mmap fd.
        pub offset: u64,
    }
}

wire! {
    /// The header of every region capability.
    pub struct CapHeader("region capability header", 8) {
        /// The capability's id ([`REGION_INFO_CAP_SPARSE_MMAP`]).
        pub id: u16,
        /// The capability's version.
        pub version: u16,
        /// Offset of the next capability from the start of the region info (0: last).
        pub next: u32,
    }
}

wire! {
    /// The sparse-mmap capability after its [`CapHeader`]; `nr_areas` [`SparseArea`]s follow.
    pub struct SparseMmapHeader("sparse mmap capability", 8) {
        /// Number of areas.
        pub nr_areas: u32,
        /// Reserved.
        pub reserved: u32,
    }
}

wire! {
    /// One mmap-able area of a region.
    pub struct SparseArea("sparse mmap area", 16) {
        /// Offset within the region.
        pub offset: u64,
        /// Size.
        pub size: u64,
    }
}

/// A region-info capability chain holding one sparse-mmap capability with `areas`, to follow a
/// [`RegionInfoBody`] (so the capability sits at offset [`RegionInfoBody::SIZE`]).
pub fn encode_sparse_mmap_cap(areas: &[(u64, u64)]) -> Vec<u8> {
    let mut caps = Vec::with_capacity(
        CapHeader::SIZE + SparseMmapHeader::SIZE + areas.len() * SparseArea::SIZE,
    );
    caps.extend_from_slice(
        &CapHeader {
            id: REGION_INFO_CAP_SPARSE_MMAP,
            version: REGION_INFO_CAP_SPARSE_MMAP_VERSION,
            next: 0,
        }
        .encode(),
    );
    caps.extend_from_slice(
        &SparseMmapHeader {
            nr_areas: u32::try_from(areas.len()).unwrap_or(u32::MAX),
            reserved: 0,
        }
        .encode(),
    );
    for &(offset, size) in areas {
        caps.extend_from_slice(&SparseArea { offset, size }.encode());
    }
    caps
}

/// Walks the capability chain of a region-info reply `body` (which starts with `info`) and
/// returns the areas of every sparse-mmap capability, in wire order. Capabilities with other ids
/// are skipped. Every offset must point inside `body`, past the region info, and the chain must
/// move forward (so it ends).
pub fn parse_region_caps(
    body: &[u8],
    info: &RegionInfoBody,
) -> Result<Vec<(u64, u64)>, ProtoError> {
    let mut areas = Vec::new();
    if info.flags & REGION_INFO_FLAG_CAPS == 0 || info.cap_offset == 0 {
        return Ok(areas);
    }
    let bad = |why: String| ProtoError::RegionCaps(why);
    let mut at = usize::try_from(info.cap_offset).unwrap_or(usize::MAX);
    let mut min = RegionInfoBody::SIZE;
    loop {
        if at < min {
            return Err(bad(format!(
                "capability at offset {at} overlaps what precedes it (offset {min} or later expected)"
            )));
        }
        let cap = body.get(at..).ok_or_else(|| {
            bad(format!(
                "capability offset {at} is past the {}-byte reply",
                body.len()
            ))
        })?;
        let header = CapHeader::decode(cap)?;
        if header.id == REGION_INFO_CAP_SPARSE_MMAP {
            let rest = cap.get(CapHeader::SIZE..).unwrap_or_default();
            let sparse = SparseMmapHeader::decode(rest)?;
            let list = rest.get(SparseMmapHeader::SIZE..).unwrap_or_default();
            let count = usize::try_from(sparse.nr_areas).unwrap_or(usize::MAX);
            if count > list.len() / SparseArea::SIZE {
                return Err(bad(format!(
                    "sparse mmap capability at offset {at} claims {} areas, {} bytes hold {}",
                    sparse.nr_areas,
                    list.len(),
                    list.len() / SparseArea::SIZE
                )));
            }
            for area in list.chunks_exact(SparseArea::SIZE).take(count) {
                let area = SparseArea::decode(area)?;
                areas.push((area.offset, area.size));
            }
        }
        if header.next == 0 {
            return Ok(areas);
        }
        min = at.saturating_add(CapHeader::SIZE);
        at = usize::try_from(header.next).unwrap_or(usize::MAX);
    }
}

wire! {
    /// The fixed part of `REGION_READ` and `REGION_WRITE` (command and reply); a write command
    /// and a read reply carry `count` bytes of data after it.
    pub struct RegionAccess("region access", 16) {
        /// Offset within the region.
        pub offset: u64,
        /// The region's index.
        pub region: u32,
        /// Bytes to transfer.
        pub count: u32,
    }
}

wire! {
    /// The body of `DEVICE_GET_IRQ_INFO` and of its reply.
    pub struct IrqInfoBody("DEVICE_GET_IRQ_INFO body", 16) {
        /// The most reply payload the client takes; in the reply: 16.
        pub argsz: u32,
        /// `IRQ_INFO_*` (in the reply).
        pub flags: u32,
        /// The interrupt type's index.
        pub index: u32,
        /// Number of interrupts of the type (in the reply).
        pub count: u32,
    }
}

wire! {
    /// The fixed part of `DEVICE_SET_IRQS` (eventfds travel as `SCM_RIGHTS`); the reply has
    /// no body.
    pub struct SetIrqs("DEVICE_SET_IRQS body", 20) {
        /// Size of the request payload, data included.
        pub argsz: u32,
        /// One `IRQ_SET_DATA_*` and one `IRQ_SET_ACTION_*`.
        pub flags: u32,
        /// The interrupt type's index.
        pub index: u32,
        /// First interrupt of the range.
        pub start: u32,
        /// Number of interrupts in the range.
        pub count: u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_checks_size() {
        let header = Header::command(7, command::REGION_WRITE, 20).expect("small body");
        assert_eq!(header.message_size, 36);
        let decoded = Header::decode(&header.encode()).expect("16 bytes");
        assert_eq!(decoded, header);
        assert_eq!(decoded.body_len(), Ok(20));
        let reply = header.reply(0).expect("empty body");
        assert_eq!(reply.message_type(), TYPE_REPLY);
        assert_eq!(reply.message_id, 7);
        let bad = Header {
            message_size: 15,
            ..header
        };
        assert_eq!(bad.body_len(), Err(ProtoError::MessageSize(15)));
        let huge = Header {
            message_size: u32::MAX,
            ..header
        };
        assert!(huge.body_len().is_err());
        assert!(Header::command(0, 1, MAX_MESSAGE_SIZE).is_err());
        assert!(Header::decode(&[0; 15]).is_err());
    }

    #[test]
    fn layout_matches_the_wire() {
        let map = DmaMap {
            argsz: 32,
            flags: 3,
            offset: 0x1000,
            address: 0x2000,
            size: 0x3000,
        };
        let bytes = map.encode();
        assert_eq!(&bytes[8..16], &0x1000u64.to_ne_bytes());
        assert_eq!(&bytes[16..24], &0x2000u64.to_ne_bytes());
        assert_eq!(DmaMap::decode(&bytes), Ok(map));
        let access = RegionAccess {
            offset: 5,
            region: 7,
            count: 9,
        };
        let bytes = access.encode();
        assert_eq!(&bytes[8..12], &7u32.to_ne_bytes());
        assert_eq!(RegionAccess::decode(&bytes), Ok(access));
    }

    #[test]
    fn capabilities_parse_what_peers_send() {
        let ours = Capabilities::ours();
        let json = ours.to_json();
        assert_eq!(json.last(), Some(&0));
        assert_eq!(Capabilities::from_json(&json), Ok(ours));
        // What rust-vmm's vfio_user sends.
        let theirs = br#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#;
        let caps = Capabilities::from_json(theirs).expect("rust-vmm's capabilities");
        assert_eq!(caps.max_msg_fds, 1);
        assert_eq!(caps.pgsizes, PAGE_SIZE);
        assert_eq!(Capabilities::from_json(b""), Ok(Capabilities::default()));
        assert_eq!(
            Capabilities::from_json(b"{}\0"),
            Ok(Capabilities::default())
        );
        // The first drafts of the spec had an empty array here.
        assert_eq!(
            Capabilities::from_json(b"{\"capabilities\":[]}"),
            Ok(Capabilities::default())
        );
        assert!(Capabilities::from_json(b"{\"capabilities\":7}").is_err());
        assert!(Capabilities::from_json(b"{\"capabilities\":{\"max_msg_fds\":-1}}").is_err());
        assert!(Capabilities::from_json(b"\xff\xfe").is_err());
        let big = br#"{"capabilities":{"max_data_xfer_size":99999999999}}"#;
        assert_eq!(
            Capabilities::from_json(big).map(|c| c.max_data_xfer_size),
            Ok(u32::MAX)
        );
    }

    fn region_with_caps(caps: &[u8]) -> (Vec<u8>, RegionInfoBody) {
        let info = RegionInfoBody {
            argsz: (RegionInfoBody::SIZE + caps.len()) as u32,
            flags: REGION_INFO_FLAG_CAPS,
            index: 0,
            cap_offset: RegionInfoBody::SIZE as u32,
            size: 0x10000,
            offset: 0,
        };
        let mut body = info.encode().to_vec();
        body.extend_from_slice(caps);
        (body, info)
    }

    #[test]
    fn sparse_caps_round_trip() {
        let areas = [(0, 0x1000), (0x3000, 0x2000)];
        let (body, info) = region_with_caps(&encode_sparse_mmap_cap(&areas));
        assert_eq!(parse_region_caps(&body, &info), Ok(areas.to_vec()));
    }

    #[test]
    fn malformed_caps_are_errors() {
        // A chain pointing back at itself.
        let mut caps = encode_sparse_mmap_cap(&[(0, 0x1000)]);
        caps[4..8].copy_from_slice(&(RegionInfoBody::SIZE as u32).to_ne_bytes());
        let (body, info) = region_with_caps(&caps);
        assert!(parse_region_caps(&body, &info).is_err());
        // More areas than bytes.
        let mut caps = encode_sparse_mmap_cap(&[(0, 0x1000)]);
        caps[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        let (body, info) = region_with_caps(&caps);
        assert!(parse_region_caps(&body, &info).is_err());
        // An offset inside the region info, or past the body.
        let (body, mut info) = region_with_caps(&encode_sparse_mmap_cap(&[]));
        info.cap_offset = 8;
        assert!(parse_region_caps(&body, &info).is_err());
        info.cap_offset = 4000;
        assert!(parse_region_caps(&body, &info).is_err());
        // Truncated.
        let (body, info) = region_with_caps(&encode_sparse_mmap_cap(&[(0, 1)])[..10]);
        assert!(parse_region_caps(&body, &info).is_err());
        // An unknown capability is skipped.
        let mut caps = encode_sparse_mmap_cap(&[(0, 1)]);
        caps[0..2].copy_from_slice(&0x77u16.to_ne_bytes());
        let (body, info) = region_with_caps(&caps);
        assert_eq!(parse_region_caps(&body, &info), Ok(vec![]));
    }

    #[test]
    fn decoders_never_panic_on_short_input() {
        for len in 0..40 {
            let bytes = vec![0xa5u8; len];
            let _ = Header::decode(&bytes);
            let _ = decode_version(&bytes);
            let _ = DmaMap::decode(&bytes);
            let _ = DmaUnmap::decode(&bytes);
            let _ = DeviceInfoBody::decode(&bytes);
            let _ = RegionInfoBody::decode(&bytes);
            let _ = RegionAccess::decode(&bytes);
            let _ = IrqInfoBody::decode(&bytes);
            let _ = SetIrqs::decode(&bytes);
            if let Ok(info) = RegionInfoBody::decode(&bytes) {
                let _ = parse_region_caps(&bytes, &info);
            }
        }
    }
}
