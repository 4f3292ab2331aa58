//! The write-intent bitmap of a mirror (RAID 1, 10): which regions of the members' data areas
//! may hold copies that differ, so that a resync after a crash, a power cut or a takeover
//! compares those regions only.
//!
//! A region's bit is on the members (one 4 KiB block, written with FUA to every member that is
//! not failed) before any write into the region is sent; it is cleared — after a flush of every
//! member, once no write has touched the region for [`CLEAR_AFTER`] — by the next block write.
//! A crash therefore leaves every region a write was in flight in (or written to within the
//! last [`CLEAR_AFTER`]) marked.
//!
//! The block (`docs/ONDISK.md`, "Write-intent bitmap"): magic `DPXWIB02` (`DPXWIB01` blocks,
//! from builds that cleared marks while a member was out, are not valid), the pool's tag (u64),
//! the region size (u64), the region count (u32), CRC-32C of the block with this field zero
//! (u32), then one bit per region (least significant first). At import the valid blocks of all
//! members are OR-ed (one may be older than another, never newer than the writes it allowed);
//! with none valid, every region counts as dirty.

use std::time::{Duration, Instant};

/// Bytes of the bitmap block.
pub const BLOCK: usize = 4096;
const HEADER: usize = 32;
const MAGIC: &[u8; 8] = b"DPXWIB02";
/// Most regions one block holds.
pub const MAX_REGIONS: u64 = ((BLOCK - HEADER) * 8) as u64;
/// The smallest region.
pub const MIN_REGION: u64 = 1 << 20;
/// How long a region stays marked after its last write.
pub const CLEAR_AFTER: Duration = Duration::from_secs(5);

/// Where a mirror keeps its bitmap: byte `offset` of every member (at least [`BLOCK`] bytes
/// from there, `len`), and the pool's tag that its block carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntentSpec {
    /// First byte of the bitmap area on every member.
    pub offset: u64,
    /// Bytes of the area.
    pub len: u64,
    /// The pool's tag.
    pub tag: u64,
}

/// The region size for members of `member_len` data bytes: a power of two, at least
/// [`MIN_REGION`], with at most [`MAX_REGIONS`] regions.
pub fn region_size(member_len: u64) -> u64 {
    member_len
        .div_ceil(MAX_REGIONS)
        .max(MIN_REGION)
        .next_power_of_two()
}

/// The block carrying `bits`.
pub fn encode(tag: u64, region: u64, bits: &[bool]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&tag.to_le_bytes());
    b[16..24].copy_from_slice(&region.to_le_bytes());
    let n = u32::try_from(bits.len()).unwrap_or(u32::MAX);
    b[24..28].copy_from_slice(&n.to_le_bytes());
    for (r, &on) in bits.iter().enumerate().take(MAX_REGIONS as usize) {
        if on {
            b[HEADER + r / 8] |= 1 << (r % 8);
        }
    }
    let crc = crc32c::crc32c(&b);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The bits of a block, if it is a valid block of this pool with this geometry.
pub fn decode(block: &[u8], tag: u64, region: u64, regions: usize) -> Option<Vec<bool>> {
    let b = block.get(..BLOCK)?;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    if &b[..8] != MAGIC
        || u64_at(8) != tag
        || u64_at(16) != region
        || u32_at(24) as usize != regions
    {
        return None;
    }
    let mut zeroed = b.to_vec();
    zeroed[28..32].fill(0);
    if crc32c::crc32c(&zeroed) != u32_at(28) {
        return None;
    }
    Some(
        (0..regions)
            .map(|r| b[HEADER + r / 8] & 1 << (r % 8) != 0)
            .collect(),
    )
}

/// What the bitmap of one mirror device knows and does (the I/O is the device's).
#[derive(Debug)]
pub struct Intent {
    pub(crate) spec: IntentSpec,
    pub(crate) region: u64,
    regions: usize,
    /// The bits on the members (as the last completed block write left them).
    on_disk: Vec<bool>,
    /// The bits wanted.
    want: Vec<bool>,
    /// Writes in flight per region, and a counter of writes started per region.
    pending: Vec<u32>,
    started: Vec<u64>,
    idle_since: Vec<Option<Instant>>,
    /// The bits a block write in flight carries.
    pub(crate) writing: Option<Vec<bool>>,
    /// Regions a flush in flight may clear, with their write counters when it began.
    pub(crate) flushing: Option<Vec<(usize, u64)>>,
    /// Member I/O of the block write, the flush or the load in flight.
    pub(crate) outstanding: u32,
    /// A load at import: `Some(dirty so far, whether any member's block was valid)`.
    pub(crate) loading: Option<(Vec<bool>, bool)>,
    /// The load has not been sent yet.
    pub(crate) load_wanted: bool,
    /// Block writes done, regions cleared (for the device's log and tests).
    pub(crate) writes: u64,
    pub(crate) cleared: u64,
    /// When idle regions were last looked for (at most once a second).
    checked: Option<Instant>,
}

impl Intent {
    /// A bitmap for members of `member_len` data bytes, all clear (a new device: the first
    /// block write replaces whatever the area held).
    pub fn new(spec: IntentSpec, member_len: u64) -> Option<Self> {
        if spec.len < BLOCK as u64 {
            return None;
        }
        let region = region_size(member_len);
        let regions = usize::try_from(member_len.div_ceil(region)).ok()?;
        Some(Self {
            spec,
            region,
            regions,
            on_disk: vec![false; regions],
            want: vec![false; regions],
            pending: vec![0; regions],
            started: vec![0; regions],
            idle_since: vec![None; regions],
            writing: None,
            flushing: None,
            outstanding: 0,
            loading: None,
            load_wanted: false,
            writes: 0,
            cleared: 0,
            checked: None,
        })
    }

    /// Regions.
    pub fn regions(&self) -> usize {
        self.regions
    }

    /// The regions member bytes `[at, at + len)` of the data area touch.
    pub fn regions_of(&self, at: u64, len: u64) -> std::ops::Range<usize> {
        let first = (at / self.region) as usize;
        let last = (at + len.max(1) - 1) / self.region;
        first.min(self.regions)..(last as usize + 1).min(self.regions)
    }

    /// Whether writes into `rs` may go: their bits are on the members and no block write in
    /// flight clears them, and no load is pending.
    pub fn ready(&self, rs: std::ops::Range<usize>) -> bool {
        self.loading.is_none()
            && !self.load_wanted
            && rs
                .clone()
                .all(|r| self.on_disk[r] && self.writing.as_ref().is_none_or(|w| w[r]))
    }

    /// Wants the bits of `rs` set.
    pub fn mark(&mut self, rs: std::ops::Range<usize>) {
        for r in rs {
            self.want[r] = true;
        }
    }

    /// A write into `rs` starts.
    pub fn start(&mut self, rs: std::ops::Range<usize>) {
        for r in rs {
            self.pending[r] += 1;
            self.started[r] += 1;
            self.idle_since[r] = None;
        }
    }

    /// A write into `rs` ended.
    pub fn end(&mut self, rs: std::ops::Range<usize>, now: Instant) {
        for r in rs {
            self.pending[r] = self.pending[r].saturating_sub(1);
            if self.pending[r] == 0 {
                self.idle_since[r] = Some(now);
            }
        }
    }

    /// The block to write now, if the wanted bits differ from the members' and nothing is in
    /// flight; the bits it carries are remembered until [`Intent::written`].
    pub fn next_block(&mut self) -> Option<Vec<u8>> {
        if self.writing.is_some()
            || self.flushing.is_some()
            || self.loading.is_some()
            || self.load_wanted
            || self.want == self.on_disk
        {
            return None;
        }
        let bits = self.want.clone();
        let block = encode(self.spec.tag, self.region, &bits);
        self.writing = Some(bits);
        Some(block)
    }

    /// The block write ended (on every member that took it).
    pub fn written(&mut self) {
        if let Some(bits) = self.writing.take() {
            self.cleared += self
                .on_disk
                .iter()
                .zip(&bits)
                .filter(|(&was, &now)| was && !now)
                .count() as u64;
            self.on_disk = bits;
            self.writes += 1;
        }
    }

    /// Regions that may be cleared now (marked, idle for [`CLEAR_AFTER`]), with their write
    /// counters: a flush of every member comes first. Empty while anything is in flight.
    pub fn clearable(&mut self, now: Instant) -> Vec<(usize, u64)> {
        if self.writing.is_some() || self.flushing.is_some() || self.loading.is_some() {
            return Vec::new();
        }
        if self
            .checked
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return Vec::new();
        }
        self.checked = Some(now);
        (0..self.regions)
            .filter(|&r| {
                self.want[r]
                    && self.on_disk[r]
                    && self.pending[r] == 0
                    && self.idle_since[r]
                        .is_some_and(|t| now.saturating_duration_since(t) >= CLEAR_AFTER)
            })
            .map(|r| (r, self.started[r]))
            .collect()
    }

    /// The flush before clearing `regions` ended: those no write touched since are cleared
    /// in the wanted bits (the next block write carries it).
    pub fn flushed(&mut self, regions: &[(usize, u64)]) {
        for &(r, count) in regions {
            if self.pending[r] == 0 && self.started[r] == count {
                self.want[r] = false;
            }
        }
    }

    /// A load at import: the members' blocks are read before any write goes.
    pub fn want_load(&mut self) {
        self.load_wanted = true;
    }

    /// One member's block read back (`None`: the read failed).
    pub fn loaded(&mut self, block: Option<&[u8]>) {
        let Some((dirty, any)) = self.loading.as_mut() else {
            return;
        };
        if let Some(bits) = block.and_then(|b| decode(b, self.spec.tag, self.region, self.regions))
        {
            *any = true;
            for (d, b) in dirty.iter_mut().zip(bits) {
                *d |= b;
            }
        }
    }

    /// Whether region `r` is marked (on the members or wanted).
    pub fn is_marked(&self, r: usize) -> bool {
        self.on_disk.get(r).copied().unwrap_or(false) || self.want.get(r).copied().unwrap_or(false)
    }

    /// The load ended: the dirty regions (every one when no member had a valid block), now
    /// the members' and the wanted bits. Their idle clocks start `now` (no write is in flight
    /// in them), so they are cleared like any other once the members agree.
    pub fn load_done(&mut self, now: Instant) -> Vec<bool> {
        let (dirty, any) = self
            .loading
            .take()
            .unwrap_or((vec![true; self.regions], false));
        let dirty = if any { dirty } else { vec![true; self.regions] };
        self.on_disk = dirty.clone();
        self.want = dirty.clone();
        for (r, &d) in dirty.iter().enumerate() {
            if d && self.pending[r] == 0 {
                self.idle_since[r] = Some(now);
            }
        }
        dirty
    }

    /// Regions marked on the members now.
    pub fn marked(&self) -> usize {
        self.on_disk.iter().filter(|&&b| b).count()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_block_round_trips_and_anything_else_is_refused() {
        let bits: Vec<bool> = (0..1000).map(|r| r % 7 == 3).collect();
        let b = encode(0xabc, 1 << 20, &bits);
        assert_eq!(&b[..8], b"DPXWIB02");
        assert_eq!(decode(&b, 0xabc, 1 << 20, 1000), Some(bits.clone()));
        assert_eq!(decode(&b, 0xabd, 1 << 20, 1000), None, "another pool's");
        assert_eq!(decode(&b, 0xabc, 2 << 20, 1000), None, "another geometry");
        assert_eq!(decode(&b, 0xabc, 1 << 20, 999), None);
        let mut torn = b.clone();
        torn[HEADER + 3] ^= 0x10;
        assert_eq!(decode(&torn, 0xabc, 1 << 20, 1000), None, "a flipped bit");
        assert_eq!(decode(&[0u8; BLOCK], 0xabc, 1 << 20, 1000), None);
        // Region 3's bit: byte 32, bit 3.
        assert_eq!(b[HEADER] & 1 << 3, 1 << 3);
    }

    #[test]
    fn region_sizes_fit_one_block() {
        assert_eq!(region_size(8 << 20), MIN_REGION);
        let big = 16u64 << 40;
        let r = region_size(big);
        assert!(r.is_power_of_two() && big.div_ceil(r) <= MAX_REGIONS, "{r}");
    }

    #[test]
    fn bits_are_set_before_writes_and_cleared_after_a_flush_when_idle() {
        let spec = IntentSpec {
            offset: 0,
            len: 1 << 20,
            tag: 7,
        };
        let mut i = Intent::new(spec, 8 << 20).unwrap();
        let rs = i.regions_of(3 << 20, 4096);
        assert_eq!(rs, 3..4);
        assert!(!i.ready(rs.clone()));
        i.mark(rs.clone());
        let block = i.next_block().expect("a block to write");
        assert!(decode(&block, 7, 1 << 20, 8).unwrap()[3]);
        assert!(!i.ready(rs.clone()), "not before the block is written");
        i.written();
        assert!(i.ready(rs.clone()));
        let t0 = Instant::now();
        i.start(rs.clone());
        i.end(rs.clone(), t0);
        assert!(i.clearable(t0).is_empty(), "not before CLEAR_AFTER");
        let later = t0 + CLEAR_AFTER;
        let c = i.clearable(later);
        assert_eq!(c, vec![(3, 1)]);
        // A write after the flush began keeps the region marked.
        i.start(rs.clone());
        i.flushed(&c);
        assert!(i.next_block().is_none());
        i.end(rs.clone(), later);
        let c = i.clearable(later + CLEAR_AFTER);
        i.flushed(&c);
        let block = i.next_block().expect("the clearing block");
        assert!(
            !i.ready(rs.clone()),
            "a write waits while its bit is being cleared"
        );
        assert!(!decode(&block, 7, 1 << 20, 8).unwrap()[3]);
        i.written();
        assert_eq!((i.marked(), i.cleared), (0, 1));
    }

    #[test]
    fn a_load_ors_the_valid_blocks_and_counts_everything_dirty_without_one() {
        let spec = IntentSpec {
            offset: 0,
            len: 1 << 20,
            tag: 7,
        };
        let mut i = Intent::new(spec, 8 << 20).unwrap();
        i.loading = Some((vec![false; 8], false));
        let a: Vec<bool> = (0..8).map(|r| r == 1).collect();
        let b: Vec<bool> = (0..8).map(|r| r == 5).collect();
        i.loaded(Some(&encode(7, 1 << 20, &a)));
        i.loaded(Some(&encode(7, 1 << 20, &b)));
        i.loaded(None);
        let t0 = Instant::now();
        let dirty = i.load_done(t0);
        assert_eq!(
            dirty.iter().filter(|&&d| d).count(),
            2,
            "{dirty:?}: regions 1 and 5"
        );
        // The loaded marks are cleared like any other once idle (after a flush).
        assert!(i.is_marked(1) && i.is_marked(5) && !i.is_marked(0));
        let clear = i.clearable(t0 + CLEAR_AFTER);
        assert_eq!(clear, vec![(1, 0), (5, 0)]);
        i.flushed(&clear);
        let block = i.next_block().expect("a block clearing them");
        assert_eq!(decode(&block, 7, 1 << 20, 8), Some(vec![false; 8]));
        let mut j = Intent::new(spec, 8 << 20).unwrap();
        j.loading = Some((vec![false; 8], false));
        j.loaded(Some(&[0u8; BLOCK]));
        assert!(j.load_done(t0).iter().all(|&d| d));
    }
}
