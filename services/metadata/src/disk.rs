//! [`MetaDisk`]: how the metadata service reaches a drive (byte offsets and lengths in whole
//! blocks), and [`MemDisk`], a drive in memory with a volatile write cache, crash points and
//! failures, for the tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Granule of the in-memory medium.
const SECTOR: usize = 512;

/// A failed drive operation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{op} at byte {offset} ({len} bytes): {why}")]
pub struct DiskError {
    /// `read`, `write` or `flush`.
    pub op: &'static str,
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// What happened.
    pub why: String,
}

/// A drive as the metadata service reads and writes it.
pub trait MetaDisk {
    /// How the operator knows the drive (its address or name).
    fn label(&self) -> &str;
    /// Capacity in bytes.
    fn capacity(&self) -> u64;
    /// Logical block size.
    fn block_size(&self) -> u32;
    /// Reads `len` bytes at `offset`.
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError>;
    /// Writes `data` at `offset` (possibly only into a volatile cache until [`MetaDisk::flush`]).
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), DiskError>;
}

#[derive(Debug)]
struct MemState {
    /// What survives a power cut: 512-byte sectors that were ever written (sparse).
    medium: BTreeMap<u64, [u8; SECTOR]>,
    /// Completed writes not yet flushed, in order.
    cache: Vec<(u64, Vec<u8>)>,
    /// Writes (and flushes) left before the simulated crash; `None`: no crash armed.
    crash_after: Option<u64>,
    /// The crash happened: every operation fails until `restart`.
    crashed: bool,
    /// The crashing write is torn: its first half reaches the medium.
    tear: bool,
    /// Every operation fails.
    failed: bool,
    writes: u64,
}

/// A drive in memory. Clones share the drive (a test keeps one to crash, restart and inspect
/// it while a store owns another).
#[derive(Clone, Debug)]
pub struct MemDisk {
    label: String,
    block_size: u32,
    capacity: u64,
    state: Arc<Mutex<MemState>>,
}

impl MemDisk {
    /// An all-zero drive of `capacity` bytes. Reads of never-written ranges return zeroes
    /// (the medium grows as it is written).
    pub fn new(label: &str, capacity: u64, block_size: u32) -> Self {
        Self {
            label: label.to_owned(),
            block_size,
            capacity,
            state: Arc::new(Mutex::new(MemState {
                medium: BTreeMap::new(),
                cache: Vec::new(),
                crash_after: None,
                crashed: false,
                tear: false,
                failed: false,
                writes: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Arms a crash: after `n` more writes or flushes succeed, the next one fails (torn: half
    /// of a write reaches the medium), unflushed writes are lost, and every later operation
    /// fails until [`MemDisk::restart`].
    pub fn crash_after(&self, n: u64, tear: bool) {
        let mut s = self.lock();
        s.crash_after = Some(n);
        s.tear = tear;
    }

    /// Cuts the power now: unflushed writes are lost, every operation fails until
    /// [`MemDisk::restart`].
    pub fn power_cut(&self) {
        let mut s = self.lock();
        s.crashed = true;
        s.crash_after = None;
        s.cache.clear();
    }

    /// Power back: the drive works again (with what reached its medium).
    pub fn restart(&self) {
        let mut s = self.lock();
        s.crashed = false;
        s.crash_after = None;
        s.cache.clear();
    }

    /// Whether the armed crash happened.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Makes every operation fail (a pulled drive), or work again.
    pub fn set_failed(&self, failed: bool) {
        self.lock().failed = failed;
    }

    /// Writes and flushes done so far.
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Overwrites bytes on the medium directly (corruption, for tests).
    pub fn poke(&self, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        put(&mut s.medium, offset, data);
    }

    /// The medium's bytes (what survives a power cut).
    pub fn peek(&self, offset: u64, len: usize) -> Vec<u8> {
        let s = self.lock();
        get(&s.medium, offset, len)
    }

    fn check(
        &self,
        s: &mut MemState,
        op: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<(), DiskError> {
        let err = |why: &str| DiskError {
            op,
            offset,
            len,
            why: why.to_owned(),
        };
        if s.failed {
            return Err(err("drive failed"));
        }
        if s.crashed {
            return Err(err("drive lost power"));
        }
        if offset.checked_add(len).is_none_or(|e| e > self.capacity)
            || offset % u64::from(self.block_size) != 0
            || len % u64::from(self.block_size) != 0
        {
            return Err(err("outside the drive or not whole blocks"));
        }
        Ok(())
    }

    /// Counts one write or flush against an armed crash; true when this one crashes.
    fn crashes_now(s: &mut MemState) -> bool {
        match s.crash_after {
            Some(0) => {
                s.crashed = true;
                s.crash_after = None;
                s.cache.clear();
                true
            }
            Some(n) => {
                s.crash_after = Some(n - 1);
                false
            }
            None => false,
        }
    }
}

/// Writes `data` at `offset` (whole sectors: the callers write whole blocks; a partial
/// sector is merged).
fn put(medium: &mut BTreeMap<u64, [u8; SECTOR]>, offset: u64, data: &[u8]) {
    let mut at = offset;
    let mut rest = data;
    while !rest.is_empty() {
        let sector = at / SECTOR as u64;
        let within = (at % SECTOR as u64) as usize;
        let n = (SECTOR - within).min(rest.len());
        let s = medium.entry(sector).or_insert([0; SECTOR]);
        s[within..within + n].copy_from_slice(&rest[..n]);
        at += n as u64;
        rest = &rest[n..];
    }
}

fn get(medium: &BTreeMap<u64, [u8; SECTOR]>, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let first = offset / SECTOR as u64;
    let last = (offset + len as u64).div_ceil(SECTOR as u64);
    for (&sector, data) in medium.range(first..last) {
        let start = sector * SECTOR as u64;
        let (lo, hi) = (
            start.max(offset),
            (start + SECTOR as u64).min(offset + len as u64),
        );
        out[(lo - offset) as usize..(hi - offset) as usize]
            .copy_from_slice(&data[(lo - start) as usize..(hi - start) as usize]);
    }
    out
}

impl MetaDisk for MemDisk {
    fn label(&self) -> &str {
        &self.label
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        let mut s = self.lock();
        self.check(&mut s, "read", offset, len as u64)?;
        let mut out = get(&s.medium, offset, len);
        // The cache is newer than the medium.
        for (at, data) in &s.cache {
            let (a, b) = (*at, *at + data.len() as u64);
            let (lo, hi) = (a.max(offset), b.min(offset + len as u64));
            if lo < hi {
                let src = &data[(lo - a) as usize..(hi - a) as usize];
                out[(lo - offset) as usize..(hi - offset) as usize].copy_from_slice(src);
            }
        }
        Ok(out)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let mut s = self.lock();
        self.check(&mut s, "write", offset, data.len() as u64)?;
        if Self::crashes_now(&mut s) {
            if s.tear {
                let half = data.len() / 2 / 512 * 512;
                put(&mut s.medium, offset, &data[..half]);
            }
            return Err(DiskError {
                op: "write",
                offset,
                len: data.len() as u64,
                why: "drive lost power during the write".into(),
            });
        }
        s.writes += 1;
        s.cache.push((offset, data.to_vec()));
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        let mut s = self.lock();
        self.check(&mut s, "flush", 0, 0)?;
        if Self::crashes_now(&mut s) {
            return Err(DiskError {
                op: "flush",
                offset: 0,
                len: 0,
                why: "drive lost power during the flush".into(),
            });
        }
        s.writes += 1;
        let cache = std::mem::take(&mut s.cache);
        for (at, data) in cache {
            put(&mut s.medium, at, &data);
        }
        Ok(())
    }
}
