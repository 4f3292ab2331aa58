//! Physical Region Page entries for a transfer (NVMe Base Specification 2.0, 4.1.1): the data
//! pointer of a command over PCIe.
//!
//! A transfer is a list of device-address segments. PRP1 is the first byte (dword aligned, any
//! offset in its page); every later page starts at a page boundary. Two pages: PRP2 is the
//! second page. More: PRP2 points at a list of the remaining page addresses, which the driver
//! writes into one page it owns per command (so at most 512 entries: 2 MiB + the first page,
//! more than any MDTS the driver programs).

use super::dma::PAGE;

/// Entries in one PRP list page.
pub const LIST_ENTRIES: usize = PAGE / 8;

/// A piece of a transfer at a device address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Device (I/O virtual) address.
    pub iova: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Why a segment list cannot be described with PRPs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrpError {
    /// No bytes.
    #[error("a transfer of zero bytes has no PRPs")]
    Empty,
    /// The first byte is not dword aligned.
    #[error("transfer starts at {0:#x}, not dword aligned")]
    Unaligned(u64),
    /// A segment boundary that is not a page boundary.
    #[error("segment boundary at {0:#x} is not page aligned")]
    Gap(u64),
    /// More pages than one list page holds.
    #[error("transfer spans {0} pages, more than {max} PRPs", max = LIST_ENTRIES + 1)]
    TooLarge(usize),
    /// The segments do not add up to the command's length.
    #[error("segments hold {have} bytes, the command moves {want}")]
    Length {
        /// Bytes in the segments.
        have: u64,
        /// Bytes the command transfers.
        want: u64,
    },
}

/// The data pointer of one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prps {
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 (0, the second page, or the list's address).
    pub prp2: u64,
    /// The list's entries, to be written at the list page whose address is `prp2` (empty when
    /// no list is needed).
    pub list: Vec<u64>,
}

/// Builds the PRPs of a transfer of exactly `want` bytes over `segs`; `list_iova` is where the
/// command's list page lives (used only when a list is needed).
pub fn build(segs: &[Seg], want: u64, list_iova: u64) -> Result<Prps, PrpError> {
    let page = PAGE as u64;
    let have: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    if have != want {
        return Err(PrpError::Length { have, want });
    }
    let segs: Vec<Seg> = segs.iter().copied().filter(|s| s.len > 0).collect();
    let first = *segs.first().ok_or(PrpError::Empty)?;
    if first.iova % 4 != 0 {
        return Err(PrpError::Unaligned(first.iova));
    }
    // Every boundary between segments must be a page boundary on both sides.
    for w in segs.windows(2) {
        let end = w[0]
            .iova
            .checked_add(u64::from(w[0].len))
            .ok_or(PrpError::Gap(w[0].iova))?;
        if end % page != 0 {
            return Err(PrpError::Gap(end));
        }
        if w[1].iova % page != 0 {
            return Err(PrpError::Gap(w[1].iova));
        }
    }
    // The page addresses after the first page.
    let mut rest = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        let start = if i == 0 {
            (s.iova / page + 1) * page
        } else {
            s.iova
        };
        let end = s.iova + u64::from(s.len);
        let mut p = start;
        while p < end {
            rest.push(p);
            if rest.len() > LIST_ENTRIES {
                return Err(PrpError::TooLarge(rest.len() + 1));
            }
            p += page;
        }
    }
    Ok(match rest.len() {
        0 => Prps {
            prp1: first.iova,
            prp2: 0,
            list: Vec::new(),
        },
        1 => Prps {
            prp1: first.iova,
            prp2: rest[0],
            list: Vec::new(),
        },
        _ => Prps {
            prp1: first.iova,
            prp2: list_iova,
            list: rest,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE as u64;

    fn seg(iova: u64, len: u64) -> Seg {
        Seg {
            iova,
            len: len as u32,
        }
    }

    #[test]
    fn one_two_and_many_pages() {
        let one = build(&[seg(0x10000, P)], P, 0xAAA000).expect("one page");
        assert_eq!((one.prp1, one.prp2, one.list.len()), (0x10000, 0, 0));
        let off = build(&[seg(0x10200, P)], P, 0xAAA000).expect("offset: two pages");
        assert_eq!((off.prp1, off.prp2), (0x10200, 0x11000));
        let many = build(&[seg(0x10000, 4 * P)], 4 * P, 0xAAA000).expect("list");
        assert_eq!(many.prp2, 0xAAA000);
        assert_eq!(many.list, vec![0x11000, 0x12000, 0x13000]);
    }

    #[test]
    fn segments_join_at_page_boundaries_only() {
        let p = build(
            &[seg(0x10800, P / 2), seg(0x40000, 2 * P)],
            P / 2 + 2 * P,
            0xA000,
        )
        .expect("scattered");
        assert_eq!(p.prp1, 0x10800);
        assert_eq!(p.list, vec![0x40000, 0x41000]);
        assert_eq!(
            build(&[seg(0x10000, 100), seg(0x20000, P)], 100 + P, 0),
            Err(PrpError::Gap(0x10064))
        );
        assert_eq!(
            build(&[seg(0x10000, P), seg(0x20010, P)], 2 * P, 0),
            Err(PrpError::Gap(0x20010))
        );
        assert_eq!(
            build(&[seg(0x10002, 8)], 8, 0),
            Err(PrpError::Unaligned(0x10002))
        );
        assert_eq!(build(&[], 0, 0), Err(PrpError::Empty));
        assert!(matches!(
            build(&[seg(0, P)], 2 * P, 0),
            Err(PrpError::Length { .. })
        ));
        let max = (LIST_ENTRIES as u64 + 1) * P;
        assert!(build(&[seg(0, max)], max, 0).is_ok());
        assert_eq!(
            build(&[seg(0, max + P)], max + P, 0),
            Err(PrpError::TooLarge(LIST_ENTRIES + 2))
        );
    }
}
