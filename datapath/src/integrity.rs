//! End-to-end integrity records: 8 bytes of protection per logical block, kept in the NVMe LBA
//! format's metadata (a separate buffer at MPTR, protection information off).
//!
//! A record is `seq32` (big endian) then `check` (big endian): `check` is CRC-32C over a
//! header — the tag `DPX1`, the block's LBA on the drive (little endian, 8 bytes), `seq32`
//! (little endian) — followed by the block's data. It catches bit flips in the data or the
//! record, a block written to the wrong LBA of the drive (misdirected writes) and a write torn
//! between data and metadata. `seq32` is the low 32 bits of the writer's sequence number (the
//! pool's write counter, so that the two copies of a mirror can be told apart by age after a
//! crash); 0 and all-ones are never stored, so a record of all zeroes — a fresh drive, Write
//! Zeroes, Deallocate — means "not written by duplex": such a block must read as zeroes (what
//! the drive gives a block never written, zeroed or deallocated), and one that does not has
//! rotted.
//!
//! Formats with more than 8 bytes of metadata keep the record in the first 8 and zeroes after.

/// Bytes of a record.
pub const RECORD_LEN: usize = 8;

const TAG: &[u8; 4] = b"DPX1";

/// What a block's record says of its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No record (all zeroes): the block was never written through duplex.
    Unwritten,
    /// The data is what was written, with this sequence number.
    Good {
        /// The record's `seq32`.
        seq: u32,
    },
    /// The data, the record or the LBA disagree.
    Bad,
}

/// The `seq32` stored for sequence number `seq` (never 0 or all-ones).
pub fn seq32(seq: u64) -> u32 {
    match seq as u32 {
        0 | u32::MAX => 1,
        s => s,
    }
}

fn check(lba: u64, seq: u32, data: &[u8]) -> u32 {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(TAG);
    h[4..12].copy_from_slice(&lba.to_le_bytes());
    h[12..].copy_from_slice(&seq.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&h), data)
}

/// The record of `data` (one block) written at `lba` with sequence number `seq`.
pub fn seal(lba: u64, seq: u64, data: &[u8]) -> [u8; RECORD_LEN] {
    let s = seq32(seq);
    let mut r = [0u8; RECORD_LEN];
    r[..4].copy_from_slice(&s.to_be_bytes());
    r[4..].copy_from_slice(&check(lba, s, data).to_be_bytes());
    r
}

/// Checks `data` (one block) read at `lba` against its metadata `md` (at least
/// [`RECORD_LEN`] bytes; shorter is [`Verdict::Bad`]).
pub fn verify(lba: u64, data: &[u8], md: &[u8]) -> Verdict {
    let Some(r) = md.get(..RECORD_LEN) else {
        return Verdict::Bad;
    };
    if r.iter().all(|&b| b == 0) {
        // No record: the block must hold the zeroes it was left with.
        return if data.iter().all(|&b| b == 0) {
            Verdict::Unwritten
        } else {
            Verdict::Bad
        };
    }
    let seq = u32::from_be_bytes([r[0], r[1], r[2], r[3]]);
    let want = u32::from_be_bytes([r[4], r[5], r[6], r[7]]);
    if seq == 0 || seq == u32::MAX || check(lba, seq, data) != want {
        return Verdict::Bad;
    }
    Verdict::Good { seq }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_block_verifies_and_every_single_bit_flip_is_caught() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let r = seal(77, 5, &data);
        assert_eq!(verify(77, &data, &r), Verdict::Good { seq: 5 });
        for bit in (0..4096 * 8).step_by(97) {
            let mut d = data.clone();
            d[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(verify(77, &d, &r), Verdict::Bad, "data bit {bit}");
        }
        for bit in 0..64 {
            let mut m = r;
            m[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(verify(77, &data, &m), Verdict::Bad, "record bit {bit}");
        }
    }

    #[test]
    fn a_misdirected_block_is_caught() {
        let data = vec![0xA5u8; 512];
        let r = seal(10, 9, &data);
        assert_eq!(verify(11, &data, &r), Verdict::Bad);
    }

    #[test]
    fn zero_records_are_unwritten_and_reserved_sequences_are_never_stored() {
        let data = vec![0u8; 512];
        assert_eq!(verify(3, &data, &[0; 8]), Verdict::Unwritten);
        assert_eq!(verify(3, &data, &[0; 64]), Verdict::Unwritten);
        assert_eq!(verify(3, &data, &[1; 4]), Verdict::Bad);
        // A block without a record that does not read as zeroes has rotted.
        let mut rotten = data.clone();
        rotten[100] = 4;
        assert_eq!(verify(3, &rotten, &[0; 8]), Verdict::Bad);
        for s in [0u64, u64::from(u32::MAX), 1 << 32] {
            let r = seal(3, s, &data);
            assert_ne!(r, [0; 8]);
            assert_eq!(verify(3, &data, &r), Verdict::Good { seq: 1 });
        }
        // The layout: seq32 big endian, then the check.
        let r = seal(3, 0x0102_0304, &data);
        assert_eq!(&r[..4], &[1, 2, 3, 4]);
    }
}
