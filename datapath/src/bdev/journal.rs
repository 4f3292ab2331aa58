//! The stripe journal's on-disk records (pure code; `docs/ONDISK.md`, "Stripe journal").
//!
//! Each member of a parity pool has a ring in its journal area. Byte 0 of the ring holds a
//! *marker*: the ring's generation. Entries follow it back to back, each a 4 KiB header and
//! its payload padded to 4 KiB: the new data of every piece it writes (in header order), then
//! the new P rows, then the new Q rows of the stripe window. An entry is valid when its header
//! and payload checksums hold, its pool tag is the pool's and its generation the newest
//! marker's; anything else is skipped.

/// Bytes of a header (and of a marker).
pub const HEADER: usize = 4096;
/// At most this many pieces in one entry (one per data column).
pub const MAX_PIECES: usize = 64;
const MAGIC: u64 = u64::from_le_bytes(*b"DPXJRNL1");
const PIECES_AT: usize = 96;
const PIECE_BYTES: usize = 24;

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The ring's generation (at byte 0).
    Marker,
    /// A stripe window's update.
    Entry,
}

/// A record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Marker or entry.
    pub kind: Kind,
    /// The pool's journal tag (entries of another pool on the same drive do not count).
    pub tag: u64,
    /// The ring generation.
    pub gen: u64,
    /// Entry sequence number (increasing within a generation).
    pub seq: u64,
    /// Parity columns of the pool (1 or 2).
    pub np: u8,
    /// The stripe.
    pub stripe: u64,
    /// Rows `[lo, hi)` of the window the parity covers.
    pub lo: u64,
    /// End of the rows.
    pub hi: u64,
    /// `(data column, a, b)`: the rows `[a, b)` of the column the entry writes.
    pub pieces: Vec<(u16, u64, u64)>,
    /// Payload bytes (before padding).
    pub payload_len: u64,
    /// CRC-32C of the payload.
    pub payload_crc: u32,
}

/// Payload bytes rounded up to whole 4 KiB.
pub fn padded(len: u64) -> u64 {
    len.div_ceil(HEADER as u64) * HEADER as u64
}

impl Header {
    /// The payload length an entry with these pieces needs.
    pub fn payload_for(pieces: &[(u16, u64, u64)], np: u8, lo: u64, hi: u64) -> u64 {
        pieces.iter().map(|p| p.2 - p.1).sum::<u64>() + u64::from(np) * (hi - lo)
    }

    /// Bytes the record takes in the ring.
    pub fn record_len(&self) -> u64 {
        HEADER as u64 + padded(self.payload_len)
    }

    /// The 4 KiB header.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(0, &MAGIC.to_le_bytes());
        put(
            8,
            &[match self.kind {
                Kind::Marker => 1,
                Kind::Entry => 2,
            }],
        );
        put(9, &[self.np]);
        put(10, &(self.pieces.len() as u16).to_le_bytes());
        put(12, &self.payload_crc.to_le_bytes());
        put(16, &self.tag.to_le_bytes());
        put(24, &self.gen.to_le_bytes());
        put(32, &self.seq.to_le_bytes());
        put(40, &self.stripe.to_le_bytes());
        put(48, &self.lo.to_le_bytes());
        put(56, &self.hi.to_le_bytes());
        put(64, &self.payload_len.to_le_bytes());
        for (i, &(col, a, bb)) in self.pieces.iter().take(MAX_PIECES).enumerate() {
            let at = PIECES_AT + i * PIECE_BYTES;
            put(at, &u64::from(col).to_le_bytes());
            put(at + 8, &a.to_le_bytes());
            put(at + 16, &bb.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..HEADER - 4]);
        b[HEADER - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads a header; `None` for anything that is not a whole, self-consistent one.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..HEADER)?;
        let u64_at = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
        };
        let crc = u32::from_le_bytes(b.get(HEADER - 4..)?.try_into().ok()?);
        if u64_at(0)? != MAGIC || crc32c::crc32c(&b[..HEADER - 4]) != crc {
            return None;
        }
        let kind = match b[8] {
            1 => Kind::Marker,
            2 => Kind::Entry,
            _ => return None,
        };
        let np = b[9];
        let count = usize::from(u16::from_le_bytes([b[10], b[11]]));
        if count > MAX_PIECES || !(1..=2).contains(&np) && kind == Kind::Entry {
            return None;
        }
        let (lo, hi) = (u64_at(48)?, u64_at(56)?);
        let mut pieces = Vec::with_capacity(count);
        for i in 0..count {
            let at = PIECES_AT + i * PIECE_BYTES;
            let col = u16::try_from(u64_at(at)?).ok()?;
            let (a, bb) = (u64_at(at + 8)?, u64_at(at + 16)?);
            if a >= bb || a < lo || bb > hi {
                return None;
            }
            pieces.push((col, a, bb));
        }
        let h = Self {
            kind,
            tag: u64_at(16)?,
            gen: u64_at(24)?,
            seq: u64_at(32)?,
            np,
            stripe: u64_at(40)?,
            lo,
            hi,
            pieces,
            payload_len: u64_at(64)?,
            payload_crc: u32::from_le_bytes(b[12..16].try_into().ok()?),
        };
        if h.kind == Kind::Entry
            && (lo >= hi
                || h.pieces.is_empty()
                || h.payload_len != Self::payload_for(&h.pieces, np, lo, hi))
        {
            return None;
        }
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Header {
        let pieces = vec![(0, 4096, 8192), (2, 0, 16384)];
        Header {
            kind: Kind::Entry,
            tag: 7,
            gen: 3,
            seq: 99,
            np: 2,
            stripe: 12,
            lo: 0,
            hi: 16384,
            payload_len: Header::payload_for(&pieces, 2, 0, 16384),
            pieces,
            payload_crc: 0xdead_beef,
        }
    }

    #[test]
    fn a_header_round_trips_at_its_offsets() {
        let h = entry();
        let b = h.encode();
        assert_eq!(b.len(), HEADER);
        assert_eq!(&b[..8], b"DPXJRNL1");
        assert_eq!(b[8], 2);
        assert_eq!(u64::from_le_bytes(b[40..48].try_into().expect("8")), 12);
        assert_eq!(Header::decode(&b), Some(h.clone()));
        assert_eq!(h.payload_len, 4096 + 16384 + 2 * 16384);
        assert_eq!(h.record_len(), 4096 + h.payload_len);
    }

    /// Whatever a drive returns in its journal area, reading it never panics, and what reads as
    /// a record encodes back to the same bytes.
    #[test]
    fn any_bytes_from_a_drive_are_read_safely() {
        bolero::check!()
            .with_iterations(20_000)
            .for_each(|b: &[u8]| {
                let mut block = vec![0u8; HEADER];
                let n = b.len().min(HEADER);
                block[..n].copy_from_slice(&b[..n]);
                if let Some(h) = Header::decode(b) {
                    assert_eq!(Header::decode(&h.encode()), Some(h));
                }
                // Mostly a header with its checksum fixed up, so the decoder's later checks run.
                let crc = crc32c::crc32c(&block[..HEADER - 4]);
                block[HEADER - 4..].copy_from_slice(&crc.to_le_bytes());
                block[..8].copy_from_slice(b"DPXJRNL1");
                let crc = crc32c::crc32c(&block[..HEADER - 4]);
                block[HEADER - 4..].copy_from_slice(&crc.to_le_bytes());
                if let Some(h) = Header::decode(&block) {
                    assert_eq!(Header::decode(&h.encode()), Some(h));
                }
            });
    }

    #[test]
    fn damaged_or_inconsistent_headers_are_not_records() {
        let b = entry().encode();
        for at in [0, 8, 40, 100, HEADER - 1] {
            let mut d = b.clone();
            d[at] ^= 1;
            assert_eq!(Header::decode(&d), None, "byte {at}");
        }
        assert_eq!(Header::decode(&b[..100]), None);
        let mut h = entry();
        h.payload_len += 1;
        assert_eq!(Header::decode(&h.encode()), None);
        let mut h = entry();
        h.pieces[0] = (0, 8192, 4096);
        assert_eq!(Header::decode(&h.encode()), None);
        assert_eq!(Header::decode(&[0u8; HEADER]), None);
    }
}
