//! Parity RAID as pure code: where a stripe's columns live, and the P+Q arithmetic.
//!
//! # Geometry
//!
//! `n` members, `np` parity columns (1: RAID 5, P; 2: RAID 6, P and Q), `k = n - np` data
//! columns per stripe, `chunk` bytes per column. Stripe `s` holds device bytes
//! `[s·k·chunk, (s+1)·k·chunk)`, column `d` of it `[s·k·chunk + d·chunk, … + chunk)`; every
//! column of stripe `s` is bytes `[s·chunk, (s+1)·chunk)` of its member's data area. The
//! parity rotates (md's left-symmetric layout): P of stripe `s` is on member
//! `pd = n - 1 - (s mod n)`, Q on `(pd + 1) mod n`, data column `d` on `(pd + np + d) mod n`.
//!
//! Columns are numbered as the arithmetic numbers them: `0..k` data, `k` P, `k + 1` Q.
//!
//! # Arithmetic
//!
//! P is the XOR of the data columns; Q is `Σ g^d · D_d` over GF(2^8) with the polynomial
//! 0x11d and generator 2 (the Linux md RAID-6 code). P and Q of every write (`generate`,
//! `update`) are computed here eight bytes at a time: Q by Horner's rule, `Q = g·Q ⊕ D`, with
//! the multiplication by `g = 2` done on every byte of a 64-bit word at once (shift, then
//! reduce the bytes whose top bit fell off by 0x1d) — md's "int" syndrome. The two-erasure
//! solve of a rebuild (`reconstruct`) is the `gf256` crate's (`docs/DECISIONS.md` says why).
//! This module guards the preconditions (equal lengths, no more lost columns than parity
//! columns), so no input makes it panic.

use gf256::raid::{raid5, raid6};

/// The top bit of every byte of a word.
const TOP: u64 = 0x8080_8080_8080_8080;
/// The field's reduction (0x11d without its x^8 term) in every byte of a word.
const POLY: u64 = 0x1d1d_1d1d_1d1d_1d1d;

/// Every byte of `v` multiplied by 2 in GF(2^8) (polynomial 0x11d).
#[inline]
fn mul2(v: u64) -> u64 {
    let top = v & TOP;
    // 0xff in each byte whose top bit is set: 0x80 - 0x01 = 0x7f, with the top bit back.
    let carried = (top - (top >> 7)) | top;
    ((v & !TOP) << 1) ^ (carried & POLY)
}

/// A byte multiplied by 2 in GF(2^8).
#[inline]
fn mul2_byte(b: u8) -> u8 {
    (b << 1) ^ if b & 0x80 != 0 { 0x1d } else { 0 }
}

#[inline]
fn word(w: &[u8]) -> u64 {
    u64::from_ne_bytes(w.try_into().unwrap_or_default())
}

/// `acc = acc ⊕ src`, bytewise.
fn xor_into(acc: &mut [u8], src: &[u8]) {
    let mut a = acc.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (a, s) in (&mut a).zip(&mut s) {
        a.copy_from_slice(&(word(a) ^ word(s)).to_ne_bytes());
    }
    for (a, s) in a.into_remainder().iter_mut().zip(s.remainder()) {
        *a ^= s;
    }
}

/// `acc = 2·acc ⊕ src` in GF(2^8), bytewise: one step of Horner's rule.
fn horner_step(acc: &mut [u8], src: &[u8]) {
    let mut a = acc.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (a, s) in (&mut a).zip(&mut s) {
        a.copy_from_slice(&(mul2(word(a)) ^ word(s)).to_ne_bytes());
    }
    for (a, s) in a.into_remainder().iter_mut().zip(s.remainder()) {
        *a = mul2_byte(*a) ^ s;
    }
}

/// `acc = acc ⊕ 2^times·(old ⊕ new)` in GF(2^8), bytewise: a read-modify-write's change to a
/// parity column (P: `times` 0; Q: the data column's index), in one pass.
fn xor_delta_into(acc: &mut [u8], old: &[u8], new: &[u8], times: usize) {
    let mut a = acc.chunks_exact_mut(8);
    let mut o = old.chunks_exact(8);
    let mut n = new.chunks_exact(8);
    for ((a, o), n) in (&mut a).zip(&mut o).zip(&mut n) {
        let mut v = word(o) ^ word(n);
        for _ in 0..times {
            v = mul2(v);
        }
        a.copy_from_slice(&(word(a) ^ v).to_ne_bytes());
    }
    for ((a, o), n) in a
        .into_remainder()
        .iter_mut()
        .zip(o.remainder())
        .zip(n.remainder())
    {
        let mut v = o ^ n;
        for _ in 0..times {
            v = mul2_byte(v);
        }
        *a ^= v;
    }
}

/// Why parity arithmetic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParityError {
    /// Columns of different lengths, or the wrong number of them.
    #[error("parity over {columns} columns of unequal or wrong sizes")]
    Shape {
        /// How many columns were given.
        columns: usize,
    },
    /// More lost columns than parity columns.
    #[error("{lost} columns lost, {parity} parity columns can rebuild at most {parity}")]
    TooManyLost {
        /// Lost columns.
        lost: usize,
        /// Parity columns.
        parity: usize,
    },
}

/// Where the columns of a parity RAID's stripes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Members.
    pub n: usize,
    /// Parity columns per stripe (1 or 2).
    pub np: usize,
    /// Bytes per column.
    pub chunk: u64,
}

/// A device byte, located.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// The stripe.
    pub stripe: u64,
    /// The data column.
    pub col: usize,
    /// Bytes into the column.
    pub row: u64,
}

impl Geometry {
    /// Data columns per stripe.
    pub fn k(&self) -> usize {
        self.n - self.np
    }

    /// Data bytes per stripe.
    pub fn stripe_bytes(&self) -> u64 {
        self.k() as u64 * self.chunk
    }

    /// Where device byte `off` lives.
    pub fn locate(&self, off: u64) -> Place {
        let sb = self.stripe_bytes();
        let within = off % sb;
        Place {
            stripe: off / sb,
            col: (within / self.chunk) as usize,
            row: within % self.chunk,
        }
    }

    /// The member holding column `col` (`0..k` data, `k` P, `k + 1` Q) of stripe `stripe`.
    pub fn member(&self, stripe: u64, col: usize) -> usize {
        let n = self.n as u64;
        let pd = n - 1 - stripe % n;
        let k = self.k();
        let m = if col < k {
            pd + (self.np + col) as u64
        } else {
            pd + (col - k) as u64
        };
        (m % n) as usize
    }

    /// The column member `m` holds in stripe `stripe`.
    pub fn column_of(&self, stripe: u64, m: usize) -> usize {
        let n = self.n as u64;
        let pd = n - 1 - stripe % n;
        let rel = ((m as u64 + n - pd) % n) as usize;
        if rel < self.np {
            self.k() + rel
        } else {
            rel - self.np
        }
    }
}

fn same_len(cols: &[&[u8]], others: &[usize]) -> Option<usize> {
    let len = cols.first().map(|c| c.len())?;
    (cols.iter().all(|c| c.len() == len) && others.iter().all(|&o| o == len)).then_some(len)
}

/// Computes the parity of `data` (the `k` data columns, equal lengths) into `p` and, for RAID
/// 6, `q`.
pub fn generate(data: &[&[u8]], p: &mut [u8], q: Option<&mut [u8]>) -> Result<(), ParityError> {
    let shape = ParityError::Shape {
        columns: data.len(),
    };
    let lens = match &q {
        Some(q) => vec![p.len(), q.len()],
        None => vec![p.len()],
    };
    if same_len(data, &lens).is_none() || data.len() > 255 {
        return Err(shape);
    }
    let Some((last, rest)) = data.split_last() else {
        // Never: same_len refuses no columns.
        return Err(ParityError::Shape { columns: 0 });
    };
    p.copy_from_slice(last);
    for d in rest {
        xor_into(p, d);
    }
    if let Some(q) = q {
        // Horner from the last column: Q = ((D[k-1]·g ⊕ D[k-2])·g ⊕ …)·g ⊕ D[0].
        q.copy_from_slice(last);
        for d in rest.iter().rev() {
            horner_step(q, d);
        }
    }
    Ok(())
}

/// Folds the change of data column `col` from `old` to `new` into `p` (and `q`): the
/// read-modify-write update.
pub fn update(
    col: usize,
    old: &[u8],
    new: &[u8],
    p: &mut [u8],
    q: Option<&mut [u8]>,
) -> Result<(), ParityError> {
    let shape = ParityError::Shape { columns: 1 };
    let mut lens = vec![new.len(), p.len()];
    if let Some(q) = &q {
        lens.push(q.len());
    }
    if same_len(&[old], &lens).is_none() || col > 254 {
        return Err(shape);
    }
    // P ⊕= old ⊕ new; Q ⊕= g^col·(old ⊕ new).
    xor_delta_into(p, old, new, 0);
    if let Some(q) = q {
        xor_delta_into(q, old, new, col);
    }
    Ok(())
}

/// Rebuilds the columns named in `lost` (`0..k` data, `k` P, `k + 1` Q) from the others, in
/// place: `data` are the `k` data columns, `p` and `q` the parity (`q` for RAID 6 only).
pub fn reconstruct(
    data: &mut [&mut [u8]],
    p: &mut [u8],
    q: Option<&mut [u8]>,
    lost: &[usize],
) -> Result<(), ParityError> {
    let np = if q.is_some() { 2 } else { 1 };
    let k = data.len();
    let mut lost: Vec<usize> = lost.to_vec();
    lost.sort_unstable();
    lost.dedup();
    if lost.len() > np {
        return Err(ParityError::TooManyLost {
            lost: lost.len(),
            parity: np,
        });
    }
    let shape = ParityError::Shape { columns: k };
    if lost.iter().any(|&c| c >= k + np) || k == 0 || k > 255 {
        return Err(shape);
    }
    let len = p.len();
    if data.iter().any(|d| d.len() != len) || q.as_ref().is_some_and(|q| q.len() != len) {
        return Err(shape);
    }
    if lost.is_empty() {
        return Ok(());
    }
    let result = match q {
        Some(q) => raid6::repair(data, p, q, &lost).is_ok(),
        None => raid5::repair(data, p, &lost).is_ok(),
    };
    result.then_some(()).ok_or(ParityError::TooManyLost {
        lost: lost.len(),
        parity: np,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn left_symmetric_rotation() {
        let g = Geometry {
            n: 4,
            np: 1,
            chunk: 4096,
        };
        // Stripe 0: P on member 3, data 0..3 on members 0, 1, 2.
        assert_eq!(
            (0..4).map(|c| g.member(0, c)).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        // Stripe 1: P on member 2, data on 3, 0, 1.
        assert_eq!(
            (0..4).map(|c| g.member(1, c)).collect::<Vec<_>>(),
            [3, 0, 1, 2]
        );
        let g6 = Geometry {
            n: 5,
            np: 2,
            chunk: 4096,
        };
        // Stripe 0: P on 4, Q on 0, data on 1, 2, 3.
        assert_eq!(
            (0..5).map(|c| g6.member(0, c)).collect::<Vec<_>>(),
            [1, 2, 3, 4, 0]
        );
        for s in 0..20 {
            for c in 0..5 {
                assert_eq!(g6.column_of(s, g6.member(s, c)), c);
            }
        }
    }

    #[test]
    fn locate_walks_columns_then_stripes() {
        let g = Geometry {
            n: 3,
            np: 1,
            chunk: 8192,
        };
        assert_eq!(
            g.locate(8192 * 2 + 10),
            Place {
                stripe: 1,
                col: 0,
                row: 10
            }
        );
        assert_eq!(
            g.locate(8192 + 4096),
            Place {
                stripe: 0,
                col: 1,
                row: 4096
            }
        );
    }

    #[test]
    fn refusals_instead_of_panics() {
        let a = [1u8; 8];
        let b = [2u8; 7];
        let mut p = [0u8; 8];
        assert!(generate(&[&a, &b], &mut p, None).is_err());
        let mut d0 = [0u8; 8];
        let mut d1 = [0u8; 8];
        assert!(matches!(
            reconstruct(&mut [&mut d0, &mut d1], &mut p, None, &[0, 1]),
            Err(ParityError::TooManyLost { .. })
        ));
        assert!(reconstruct(&mut [&mut d0, &mut d1], &mut p, None, &[7]).is_err());
        let mut q = [0u8; 4];
        assert!(generate(&[&a], &mut p, Some(&mut q)).is_err());
    }

    /// The Q column against a byte-at-a-time GF(2^8) computation written from the definition
    /// (polynomial 0x11d, generator 2), so the crate's field is the one md uses.
    #[test]
    fn q_is_the_md_syndrome() {
        fn mul(mut a: u8, mut b: u8) -> u8 {
            let mut r = 0u8;
            while b != 0 {
                if b & 1 != 0 {
                    r ^= a;
                }
                let carry = a & 0x80 != 0;
                a <<= 1;
                if carry {
                    a ^= 0x1d;
                }
                b >>= 1;
            }
            r
        }
        // 1029 bytes: whole words and a tail; every byte value in every column.
        let len = 1029;
        let cols: Vec<Vec<u8>> = (0..7u8)
            .map(|c| {
                (0..len)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(c * 7) ^ (i >> 8) as u8)
                    .collect()
            })
            .collect();
        let refs: Vec<&[u8]> = cols.iter().map(Vec::as_slice).collect();
        let (mut p, mut q) = (vec![0u8; len], vec![0u8; len]);
        generate(&refs, &mut p, Some(&mut q)).expect("parity");
        for i in 0..len {
            let mut want_q = 0u8;
            let mut g = 1u8;
            for c in &cols {
                want_q ^= mul(g, c[i]);
                g = mul(g, 2);
            }
            assert_eq!(q[i], want_q, "byte {i}");
            assert_eq!(p[i], cols.iter().fold(0, |x, c| x ^ c[i]));
        }
    }

    fn stripe() -> impl Strategy<Value = (Vec<Vec<u8>>, bool)> {
        (3usize..10, 1usize..64, any::<bool>()).prop_flat_map(|(k, len, raid6)| {
            (
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), len), k),
                Just(raid6),
            )
        })
    }

    proptest! {
        /// Any one (RAID 5) or two (RAID 6) lost columns, data or parity, come back bit-exact.
        #[test]
        fn lost_columns_come_back_bit_exact(
            (data, raid6) in stripe(),
            a in 0usize..12,
            b in 0usize..12,
            scribble in any::<u8>(),
        ) {
            let k = data.len();
            let len = data[0].len();
            let np = if raid6 { 2 } else { 1 };
            let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let mut p = vec![0u8; len];
            let mut q = vec![0u8; len];
            generate(&refs, &mut p, raid6.then_some(&mut q[..])).expect("parity");
            let mut lost = vec![a % (k + np)];
            if raid6 {
                lost.push(b % (k + np));
            }
            let mut cols = data.clone();
            let (mut p2, mut q2) = (p.clone(), q.clone());
            for &c in &lost {
                let col = if c < k { &mut cols[c] } else if c == k { &mut p2 } else { &mut q2 };
                col.iter_mut().for_each(|x| *x = scribble);
            }
            let mut refs: Vec<&mut [u8]> = cols.iter_mut().map(Vec::as_mut_slice).collect();
            reconstruct(&mut refs, &mut p2, raid6.then_some(&mut q2[..]), &lost).expect("parity");
            prop_assert_eq!(&cols, &data);
            prop_assert_eq!(&p2, &p);
            if raid6 {
                prop_assert_eq!(&q2, &q);
            }
        }

        /// Read-modify-write gives the parity a full computation gives.
        #[test]
        fn update_matches_generate((data, raid6) in stripe(), col in 0usize..10, new_byte in any::<u8>()) {
            let k = data.len();
            let col = col % k;
            let len = data[0].len();
            let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let (mut p, mut q) = (vec![0u8; len], vec![0u8; len]);
            generate(&refs, &mut p, raid6.then_some(&mut q[..])).expect("parity");
            let mut next = data.clone();
            next[col] = (0..len).map(|i| new_byte ^ i as u8).collect();
            update(col, &data[col], &next[col], &mut p, raid6.then_some(&mut q[..])).expect("parity");
            let refs: Vec<&[u8]> = next.iter().map(Vec::as_slice).collect();
            let (mut p2, mut q2) = (vec![0u8; len], vec![0u8; len]);
            generate(&refs, &mut p2, raid6.then_some(&mut q2[..])).expect("parity");
            prop_assert_eq!(p, p2);
            if raid6 {
                prop_assert_eq!(q, q2);
            }
        }
    }
}
