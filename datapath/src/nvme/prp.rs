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

/// Builds the PRPs of a transfer of exactly `want` bytes over `segs`: returns PRP1 and PRP2.
/// `list_iova` is where the command's list page lives; when a list is needed, PRP2 is that
/// address and `list` holds the entries to write there (it is left empty otherwise). `list` is
/// the caller's, reused from command to command: no allocation per command once it has grown.
pub fn build(
    segs: &[Seg],
    want: u64,
    list_iova: u64,
    list: &mut Vec<u64>,
) -> Result<(u64, u64), PrpError> {
    let page = PAGE as u64;
    list.clear();
    let have: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    if have != want {
        return Err(PrpError::Length { have, want });
    }
    let mut nonzero = segs.iter().filter(|s| s.len > 0);
    let first = *nonzero.next().ok_or(PrpError::Empty)?;
    if first.iova % 4 != 0 {
        return Err(PrpError::Unaligned(first.iova));
    }
    // The page addresses after the first page, segment by segment.
    let pages = |from: u64, end: u64, list: &mut Vec<u64>| -> Result<(), PrpError> {
        let mut p = from;
        while p < end {
            list.push(p);
            if list.len() > LIST_ENTRIES {
                return Err(PrpError::TooLarge(list.len() + 1));
            }
            p += page;
        }
        Ok(())
    };
    let mut end = first
        .iova
        .checked_add(u64::from(first.len))
        .ok_or(PrpError::Gap(first.iova))?;
    pages((first.iova / page + 1) * page, end, list)?;
    for s in nonzero {
        // Every boundary between segments must be a page boundary on both sides.
        if end % page != 0 {
            return Err(PrpError::Gap(end));
        }
        if s.iova % page != 0 {
            return Err(PrpError::Gap(s.iova));
        }
        end = s
            .iova
            .checked_add(u64::from(s.len))
            .ok_or(PrpError::Gap(s.iova))?;
        pages(s.iova, end, list)?;
    }
    Ok(match list.len() {
        0 => (first.iova, 0),
        1 => {
            let second = list[0];
            list.clear();
            (first.iova, second)
        }
        _ => (first.iova, list_iova),
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

    /// The old shape: PRP1, PRP2 and the list, from a fresh list.
    fn prps(segs: &[Seg], want: u64, list_iova: u64) -> Result<(u64, u64, Vec<u64>), PrpError> {
        let mut list = vec![1, 2, 3]; // stale entries from an earlier command
        build(segs, want, list_iova, &mut list).map(|(a, b)| (a, b, list))
    }

    #[test]
    fn one_two_and_many_pages() {
        let one = prps(&[seg(0x10000, P)], P, 0xAAA000).expect("one page");
        assert_eq!((one.0, one.1, one.2.len()), (0x10000, 0, 0));
        let off = prps(&[seg(0x10200, P)], P, 0xAAA000).expect("offset: two pages");
        assert_eq!((off.0, off.1), (0x10200, 0x11000));
        let many = prps(&[seg(0x10000, 4 * P)], 4 * P, 0xAAA000).expect("list");
        assert_eq!(many.1, 0xAAA000);
        assert_eq!(many.2, vec![0x11000, 0x12000, 0x13000]);
    }

    #[test]
    fn segments_join_at_page_boundaries_only() {
        let p = prps(
            &[seg(0x10800, P / 2), seg(0x40000, 2 * P)],
            P / 2 + 2 * P,
            0xA000,
        )
        .expect("scattered");
        assert_eq!(p.0, 0x10800);
        assert_eq!(p.2, vec![0x40000, 0x41000]);
        assert_eq!(
            prps(&[seg(0x10000, 100), seg(0x20000, P)], 100 + P, 0),
            Err(PrpError::Gap(0x10064))
        );
        assert_eq!(
            prps(&[seg(0x10000, P), seg(0x20010, P)], 2 * P, 0),
            Err(PrpError::Gap(0x20010))
        );
        assert_eq!(
            prps(&[seg(0x10002, 8)], 8, 0),
            Err(PrpError::Unaligned(0x10002))
        );
        assert_eq!(prps(&[], 0, 0), Err(PrpError::Empty));
        assert!(matches!(
            prps(&[seg(0, P)], 2 * P, 0),
            Err(PrpError::Length { .. })
        ));
        let max = (LIST_ENTRIES as u64 + 1) * P;
        assert!(prps(&[seg(0, max)], max, 0).is_ok());
        assert_eq!(
            prps(&[seg(0, max + P)], max + P, 0),
            Err(PrpError::TooLarge(LIST_ENTRIES + 2))
        );
    }
}
