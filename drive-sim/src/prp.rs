//! Physical Region Page entries and lists (NVM Express Base Specification 2.0, section 4.1.1
//! "Physical Region Page Entry and List"): turning a command's PRP1/PRP2 and transfer length into
//! the host memory segments the data occupies.
//!
//! The rules, as a PCIe controller applies them with a memory page size `P` (CC.MPS):
//!
//! * PRP1 addresses the first byte; its offset within a page may be non-zero but must be dword
//!   aligned (bits 1:0 clear). The first segment runs to the end of that page or the end of the
//!   transfer.
//! * If the rest fits in one page, PRP2 addresses it and must be page aligned.
//! * Otherwise PRP2 is a PRP List pointer: qword aligned (bits 2:0 clear), possibly in the middle
//!   of a page. The list's entries run to the end of that page; every entry addresses one page and
//!   must be page aligned. When more entries are needed than the rest of a list page holds, the
//!   page's last entry is instead a pointer to the next list page, which must be page aligned too
//!   (it is a PRP entry other than the command's own PRP1/PRP2).
//!
//! A violated alignment rule is [`PrpError::Offset`] (status Invalid PRP Offset); a list page
//! that cannot be read is [`PrpError::ListRead`] (Data Transfer Error). The function reads no
//! more list bytes than the transfer needs and its work and output are proportional to
//! `len / P`: the caller bounds `len` (MDTS) before calling.

use duplex_nvme::status::{generic, Status};

use crate::dma::DmaFault;

/// A piece of host memory: `len` bytes at `addr`, never crossing a page boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Host address.
    pub addr: u64,
    /// Bytes.
    pub len: u64,
}

/// Why PRPs could not be turned into segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrpError {
    /// A PRP entry or list pointer violates its alignment rule.
    #[error("PRP entry {entry:#x} has an invalid offset")]
    Offset {
        /// The offending entry.
        entry: u64,
    },
    /// A PRP list page could not be read from host memory.
    #[error("PRP list at {addr:#x} is not readable")]
    ListRead {
        /// The list address.
        addr: u64,
    },
    /// The page size is not a power of two of at least 16 bytes (a caller bug).
    #[error("invalid memory page size {0}")]
    PageSize(u64),
}

impl PrpError {
    /// The completion status a controller reports for this error.
    pub fn status(&self) -> Status {
        match self {
            Self::Offset { .. } => generic::PRP_OFFSET,
            Self::ListRead { .. } => generic::DATA_TRANSFER,
            Self::PageSize(_) => generic::INTERNAL,
        }
    }
}

/// The segments of a `len`-byte transfer described by `prp1` and `prp2` with memory page size
/// `page_size`; `read_list(addr, buf)` reads PRP list bytes from host memory. A zero length
/// uses neither pointer and yields no segments.
pub fn segments<F>(
    prp1: u64,
    prp2: u64,
    len: u64,
    page_size: u64,
    mut read_list: F,
) -> Result<Vec<Segment>, PrpError>
where
    F: FnMut(u64, &mut [u8]) -> Result<(), DmaFault>,
{
    if !page_size.is_power_of_two() || page_size < 16 {
        return Err(PrpError::PageSize(page_size));
    }
    let mask = page_size - 1;
    let mut out = Vec::new();
    if len == 0 {
        return Ok(out);
    }
    if prp1 & 3 != 0 {
        return Err(PrpError::Offset { entry: prp1 });
    }
    let first = len.min(page_size - (prp1 & mask));
    out.push(Segment {
        addr: prp1,
        len: first,
    });
    let mut remaining = len - first;
    if remaining == 0 {
        return Ok(out);
    }
    if remaining <= page_size {
        if prp2 & mask != 0 {
            return Err(PrpError::Offset { entry: prp2 });
        }
        out.push(Segment {
            addr: prp2,
            len: remaining,
        });
        return Ok(out);
    }
    if prp2 & 7 != 0 {
        return Err(PrpError::Offset { entry: prp2 });
    }
    out.reserve(usize::try_from(remaining.div_ceil(page_size).min(4096)).unwrap_or(0));
    let mut list = prp2;
    let mut buf = vec![0u8; usize::try_from(page_size).unwrap_or(4096)];
    loop {
        // Entries this list page still holds, from the pointer to the end of its page.
        let slots = (page_size - (list & mask)) / 8;
        let need = remaining.div_ceil(page_size);
        let chain = need > slots;
        let take = if chain { slots } else { need };
        let bytes = usize::try_from(take * 8).map_err(|_| PrpError::ListRead { addr: list })?;
        let chunk = buf
            .get_mut(..bytes)
            .ok_or(PrpError::ListRead { addr: list })?;
        read_list(list, chunk).map_err(|_| PrpError::ListRead { addr: list })?;
        let mut next = None;
        for (i, raw) in chunk.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(raw);
            let entry = u64::from_le_bytes(b);
            if entry & mask != 0 {
                return Err(PrpError::Offset { entry });
            }
            if chain && i as u64 == take - 1 {
                next = Some(entry);
                break;
            }
            let n = remaining.min(page_size);
            out.push(Segment {
                addr: entry,
                len: n,
            });
            remaining -= n;
        }
        match next {
            Some(n) if remaining > 0 => list = n,
            _ => break,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const P: u64 = 4096;

    /// Sparse host memory for list pages: address -> qword.
    #[derive(Default)]
    struct Mem {
        q: HashMap<u64, u64>,
        reads: Vec<(u64, usize)>,
    }

    impl Mem {
        fn put_list(&mut self, at: u64, entries: &[u64]) {
            for (i, e) in entries.iter().enumerate() {
                self.q.insert(at + 8 * i as u64, *e);
            }
        }
        fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
            self.reads.push((addr, buf.len()));
            if addr >= 0xDEAD_0000 {
                return Err(DmaFault {
                    addr,
                    len: buf.len() as u64,
                });
            }
            for (i, c) in buf.chunks_exact_mut(8).enumerate() {
                let v = self.q.get(&(addr + 8 * i as u64)).copied().unwrap_or(0);
                c.copy_from_slice(&v.to_le_bytes());
            }
            Ok(())
        }
    }

    fn run(m: &mut Mem, prp1: u64, prp2: u64, len: u64) -> Result<Vec<Segment>, PrpError> {
        segments(prp1, prp2, len, P, |a, b| m.read(a, b))
    }

    fn seg(addr: u64, len: u64) -> Segment {
        Segment { addr, len }
    }

    fn total(s: &[Segment]) -> u64 {
        s.iter().map(|x| x.len).sum()
    }

    #[test]
    fn zero_length_uses_nothing() {
        let mut m = Mem::default();
        assert_eq!(run(&mut m, 3, 5, 0), Ok(vec![]));
        assert!(m.reads.is_empty());
    }

    #[test]
    fn single_page_with_and_without_offset() {
        let mut m = Mem::default();
        assert_eq!(run(&mut m, 0x10000, 7, 4096), Ok(vec![seg(0x10000, 4096)]));
        assert_eq!(run(&mut m, 0x10000, 7, 512), Ok(vec![seg(0x10000, 512)]));
        // Offset that still fits in the first page: PRP2 is not used (even if garbage).
        assert_eq!(run(&mut m, 0x10200, 3, 3584), Ok(vec![seg(0x10200, 3584)]));
        assert!(m.reads.is_empty());
    }

    #[test]
    fn prp1_must_be_dword_aligned() {
        let mut m = Mem::default();
        assert_eq!(
            run(&mut m, 0x10002, 0, 16),
            Err(PrpError::Offset { entry: 0x10002 })
        );
        assert_eq!(
            run(&mut m, 0x10001, 0, 16).map_err(|e| e.status()),
            Err(generic::PRP_OFFSET)
        );
        assert!(run(&mut m, 0x10004, 0, 16).is_ok());
    }

    #[test]
    fn two_pages_use_prp2_as_data() {
        let mut m = Mem::default();
        assert_eq!(
            run(&mut m, 0x10000, 0x30000, 8192),
            Ok(vec![seg(0x10000, 4096), seg(0x30000, 4096)])
        );
        // With an offset, two pages cover less than 8 KiB.
        assert_eq!(
            run(&mut m, 0x10800, 0x30000, 4096),
            Ok(vec![seg(0x10800, 2048), seg(0x30000, 2048)])
        );
        assert_eq!(
            run(&mut m, 0x10800, 0x30000, 6144),
            Ok(vec![seg(0x10800, 2048), seg(0x30000, 4096)])
        );
        // PRP2 as a data pointer must be page aligned.
        assert_eq!(
            run(&mut m, 0x10000, 0x30008, 8192),
            Err(PrpError::Offset { entry: 0x30008 })
        );
        assert!(m.reads.is_empty());
    }

    #[test]
    fn list_for_three_pages_and_more() {
        let mut m = Mem::default();
        m.put_list(0x50000, &[0x61000, 0x62000, 0x63000]);
        assert_eq!(
            run(&mut m, 0x60000, 0x50000, 3 * P),
            Ok(vec![seg(0x60000, P), seg(0x61000, P), seg(0x62000, P)])
        );
        // Only the entries needed are read.
        assert_eq!(m.reads, vec![(0x50000, 16)]);
        // Exact multiple vs a partial last page.
        assert_eq!(
            run(&mut m, 0x60000, 0x50000, 3 * P + 100).map(|s| total(&s)),
            Ok(3 * P + 100)
        );
        let s = run(&mut m, 0x60000, 0x50000, 3 * P + 100).expect("ok");
        assert_eq!(s.last(), Some(&seg(0x63000, 100)));
        // With a PRP1 offset, 2 pages + a bit need a list.
        let s = run(&mut m, 0x60F00, 0x50000, 256 + P + 1).expect("ok");
        assert_eq!(s, vec![seg(0x60F00, 256), seg(0x61000, P), seg(0x62000, 1)]);
    }

    #[test]
    fn list_pointer_alignment() {
        let mut m = Mem::default();
        m.put_list(0x50010, &[0x61000, 0x62000]);
        // A list in the middle of a page is fine if qword aligned.
        assert_eq!(
            run(&mut m, 0x60000, 0x50010, 3 * P).map(|s| total(&s)),
            Ok(3 * P)
        );
        assert_eq!(
            run(&mut m, 0x60000, 0x50014, 3 * P),
            Err(PrpError::Offset { entry: 0x50014 })
        );
    }

    #[test]
    fn misaligned_list_entries_are_rejected() {
        let mut m = Mem::default();
        m.put_list(0x50000, &[0x61000, 0x62200]);
        assert_eq!(
            run(&mut m, 0x60000, 0x50000, 3 * P),
            Err(PrpError::Offset { entry: 0x62200 })
        );
        // Even a dword-aligned offset is invalid in a list entry.
        m.put_list(0x50000, &[0x61004, 0x62000]);
        assert_eq!(
            run(&mut m, 0x60000, 0x50000, 3 * P).map_err(|e| e.status()),
            Err(generic::PRP_OFFSET)
        );
    }

    #[test]
    fn full_list_page_without_chaining() {
        // 1 + 512 pages: the first list page holds exactly the 512 entries needed, so its last
        // entry is data, not a chain pointer.
        let mut m = Mem::default();
        let entries: Vec<u64> = (0..512).map(|i| 0x100_0000 + i * P).collect();
        m.put_list(0x50000, &entries);
        let s = run(&mut m, 0x60000, 0x50000, 513 * P).expect("ok");
        assert_eq!(s.len(), 513);
        assert_eq!(s.last(), Some(&seg(0x100_0000 + 511 * P, P)));
        assert_eq!(m.reads, vec![(0x50000, 4096)]);
    }

    #[test]
    fn chained_list_pages() {
        // 1 + 513 pages: the first list page holds 511 data entries and a chain pointer; the
        // second page the remaining two.
        let mut m = Mem::default();
        let mut first: Vec<u64> = (0..511).map(|i| 0x100_0000 + i * P).collect();
        first.push(0x70000);
        m.put_list(0x50000, &first);
        m.put_list(0x70000, &[0x100_0000 + 511 * P, 0x100_0000 + 512 * P]);
        let s = run(&mut m, 0x60000, 0x50000, 514 * P).expect("ok");
        assert_eq!(s.len(), 514);
        assert_eq!(total(&s), 514 * P);
        assert_eq!(s.get(512), Some(&seg(0x100_0000 + 511 * P, P)));
        assert_eq!(s.get(513), Some(&seg(0x100_0000 + 512 * P, P)));
        assert_eq!(m.reads, vec![(0x50000, 4096), (0x70000, 16)]);
    }

    #[test]
    fn chain_from_a_list_in_the_middle_of_a_page() {
        // The list starts 16 bytes before the end of its page: one data entry, then a chain.
        let mut m = Mem::default();
        m.put_list(0x50FF0, &[0x61000, 0x80000]);
        m.put_list(0x80000, &[0x62000, 0x63000]);
        let s = run(&mut m, 0x60000, 0x50FF0, 4 * P).expect("ok");
        assert_eq!(
            s,
            vec![
                seg(0x60000, P),
                seg(0x61000, P),
                seg(0x62000, P),
                seg(0x63000, P)
            ]
        );
        // The list's last qword of the page is only a chain pointer: no data entry at all.
        let mut m = Mem::default();
        m.put_list(0x50FF8, &[0x80000]);
        m.put_list(0x80000, &[0x62000, 0x63000]);
        let s = run(&mut m, 0x60000, 0x50FF8, 3 * P).expect("ok");
        assert_eq!(s, vec![seg(0x60000, P), seg(0x62000, P), seg(0x63000, P)]);
        // Exactly the entries needed fit in the rest of the page: no chain.
        let mut m = Mem::default();
        m.put_list(0x50FF0, &[0x61000, 0x62000]);
        let s = run(&mut m, 0x60000, 0x50FF0, 3 * P).expect("ok");
        assert_eq!(s.last(), Some(&seg(0x62000, P)));
    }

    #[test]
    fn chain_pointer_must_be_page_aligned() {
        let mut m = Mem::default();
        m.put_list(0x50FF0, &[0x61000, 0x80010]);
        assert_eq!(
            run(&mut m, 0x60000, 0x50FF0, 4 * P),
            Err(PrpError::Offset { entry: 0x80010 })
        );
    }

    #[test]
    fn unreadable_list_is_a_transfer_error() {
        let mut m = Mem::default();
        let e = run(&mut m, 0x60000, 0xDEAD_0000, 3 * P).expect_err("fault");
        assert_eq!(e, PrpError::ListRead { addr: 0xDEAD_0000 });
        assert_eq!(e.status(), generic::DATA_TRANSFER);
        // A chain into unreadable memory.
        m.put_list(0x50FF8, &[0xDEAD_1000]);
        assert_eq!(
            run(&mut m, 0x60000, 0x50FF8, 3 * P),
            Err(PrpError::ListRead { addr: 0xDEAD_1000 })
        );
    }

    #[test]
    fn self_referencing_chain_terminates() {
        // Every list page chains to itself: each pass still consumes 511 data entries.
        let mut m = Mem::default();
        let mut page: Vec<u64> = vec![0x61000; 511];
        page.push(0x50000);
        m.put_list(0x50000, &page);
        let s = run(&mut m, 0x60000, 0x50000, 2000 * P).expect("ok");
        assert_eq!(total(&s), 2000 * P);
    }

    #[test]
    fn other_page_sizes_and_bad_ones() {
        let mut m = Mem::default();
        m.put_list(0x5000, &[0x4000, 0x6000]);
        let s = segments(0x2000, 0x5000, 3 * 8192, 8192, |a, b| m.read(a, b));
        assert_eq!(s.map(|s| s.len()), Ok(3));
        assert_eq!(
            segments(0, 0, 1, 1000, |_, _| Ok(())),
            Err(PrpError::PageSize(1000))
        );
        assert_eq!(
            segments(0, 0, 1, 8, |_, _| Ok(())),
            Err(PrpError::PageSize(8))
        );
    }

    #[test]
    fn high_addresses_do_not_overflow() {
        let mut m = Mem::default();
        let top = u64::MAX - (P - 1); // last page
        assert_eq!(
            run(&mut m, top + 4, 0, P - 4),
            Ok(vec![seg(top + 4, P - 4)])
        );
        assert_eq!(
            run(&mut m, top, top, 2 * P),
            Ok(vec![seg(top, P), seg(top, P)])
        );
    }
}
