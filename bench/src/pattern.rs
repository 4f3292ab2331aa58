//! Verifiable block contents.
//!
//! Each logical block starts with a 32-byte tag — magic, LBA, seed, generation — followed by
//! bytes from a xorshift stream seeded by all three. A read is checked against the generation
//! the writer last completed for that block: a stale, misplaced (wrong LBA), foreign (other
//! seed) or corrupted block is reported with what was found.

/// Tag magic: "DPLXBNCH".
pub const MAGIC: u64 = u64::from_le_bytes(*b"DPLXBNCH");
/// Bytes of the tag at the head of each block.
pub const TAG_LEN: usize = 32;

/// What a block should hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    /// Logical block address.
    pub lba: u64,
    /// The run's seed.
    pub seed: u64,
    /// Write generation of the block (1 for the first write).
    pub generation: u64,
}

fn stream(t: &Tag) -> impl Iterator<Item = u8> {
    let mut x =
        t.lba ^ t.seed.rotate_left(17) ^ t.generation.rotate_left(41) ^ 0x2545_F491_4F6C_DD1D;
    if x == 0 {
        x = 1;
    }
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x.to_le_bytes()
    })
    .flatten()
}

/// Fills `block` (one logical block) with the contents for `t`.
pub fn fill(block: &mut [u8], t: &Tag) {
    let head = block.len().min(TAG_LEN);
    let mut tag = [0u8; TAG_LEN];
    tag[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    tag[8..16].copy_from_slice(&t.lba.to_le_bytes());
    tag[16..24].copy_from_slice(&t.seed.to_le_bytes());
    tag[24..32].copy_from_slice(&t.generation.to_le_bytes());
    block[..head].copy_from_slice(&tag[..head]);
    for (b, v) in block[head..].iter_mut().zip(stream(t)) {
        *b = v;
    }
}

/// What a read found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// No tag at all (never written by this tool, or overwritten by something else).
    NoTag,
    /// The tag names another block, run or generation.
    WrongTag {
        /// Tag found.
        found: Tag,
    },
    /// The tag is right but the bytes after it are not.
    Corrupt {
        /// First differing byte offset within the block.
        offset: usize,
    },
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Checks `block` against `t`.
pub fn check(block: &[u8], t: &Tag) -> Result<(), Mismatch> {
    if block.len() < TAG_LEN || u64_at(block, 0) != MAGIC {
        return Err(Mismatch::NoTag);
    }
    let found = Tag {
        lba: u64_at(block, 8),
        seed: u64_at(block, 16),
        generation: u64_at(block, 24),
    };
    if found != *t {
        return Err(Mismatch::WrongTag { found });
    }
    match block[TAG_LEN..]
        .iter()
        .zip(stream(t))
        .position(|(a, b)| *a != b)
    {
        None => Ok(()),
        Some(i) => Err(Mismatch::Corrupt {
            offset: TAG_LEN + i,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_kind_of_mismatch() {
        let t = Tag {
            lba: 77,
            seed: 5,
            generation: 3,
        };
        let mut b = vec![0u8; 4096];
        fill(&mut b, &t);
        assert_eq!(check(&b, &t), Ok(()));
        assert_eq!(check(&vec![0u8; 4096], &t), Err(Mismatch::NoTag));
        let older = Tag { generation: 2, ..t };
        assert!(matches!(check(&b, &older), Err(Mismatch::WrongTag { .. })));
        let mut c = b.clone();
        c[1000] ^= 0x10;
        assert_eq!(check(&c, &t), Err(Mismatch::Corrupt { offset: 1000 }));
        let mut other = vec![0u8; 4096];
        fill(&mut other, &Tag { lba: 78, ..t });
        assert_ne!(other[TAG_LEN..], b[TAG_LEN..]);
    }
}
