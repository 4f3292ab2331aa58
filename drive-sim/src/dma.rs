//! Host memory as the controller sees it: the [`Dma`] trait the vfio-user glue implements over
//! the client's shared regions, and [`VecDma`], a `Vec<u8>`-backed implementation for tests and
//! fuzzing.

use std::sync::Mutex;

/// A DMA access outside host memory (or otherwise refused by the transport).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DMA access of {len} bytes at {addr:#x} is outside host memory")]
pub struct DmaFault {
    /// First byte address of the refused access.
    pub addr: u64,
    /// Length of the refused access.
    pub len: u64,
}

/// Host memory the controller reads (SQEs, PRP lists, write data) and writes (CQEs, read data).
///
/// Implementations must not panic on any address or length: an access that is not entirely
/// inside host memory returns [`DmaFault`] and transfers nothing (or an unspecified prefix: the
/// controller treats the whole access as failed either way).
pub trait Dma {
    /// Copies `buf.len()` bytes from host address `addr` into `buf`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault>;
    /// Copies `data` to host address `addr`.
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaFault>;
}

/// Host memory backed by a `Vec<u8>` that covers host addresses `base..base + len`; anything
/// else is a [`DmaFault`]. Interior mutability (a mutex) lets the controller write through
/// `&self` and lets a test share it between threads.
#[derive(Debug)]
pub struct VecDma {
    base: u64,
    mem: Mutex<Vec<u8>>,
}

impl VecDma {
    /// `len` zeroed bytes at host addresses `0..len`.
    pub fn new(len: usize) -> Self {
        Self::with_base(0, len)
    }

    /// `len` zeroed bytes at host addresses `base..base + len` (a non-zero base makes a null
    /// pointer fault, as it would on most real hosts).
    pub fn with_base(base: u64, len: usize) -> Self {
        Self {
            base,
            mem: Mutex::new(vec![0; len]),
        }
    }

    /// The first host address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Bytes of host memory.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there is no host memory at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `len` bytes at `addr` into a new vector.
    pub fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, DmaFault> {
        let mut v = vec![0; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }

    /// Sets `len` bytes at `addr` to `byte`.
    pub fn fill(&self, addr: u64, len: usize, byte: u8) -> Result<(), DmaFault> {
        let mut mem = self.lock();
        let range = self.range(addr, len as u64, mem.len())?;
        if let Some(s) = mem.get_mut(range) {
            s.fill(byte);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range(&self, addr: u64, len: u64, size: usize) -> Result<std::ops::Range<usize>, DmaFault> {
        let fault = DmaFault { addr, len };
        let start = addr.checked_sub(self.base).ok_or(fault)?;
        let end = start.checked_add(len).ok_or(fault)?;
        if end > size as u64 {
            return Err(fault);
        }
        let start = usize::try_from(start).map_err(|_| fault)?;
        let end = usize::try_from(end).map_err(|_| fault)?;
        Ok(start..end)
    }
}

impl Dma for VecDma {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let mem = self.lock();
        let range = self.range(addr, buf.len() as u64, mem.len())?;
        let src = mem.get(range).ok_or(DmaFault {
            addr,
            len: buf.len() as u64,
        })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
        let mut mem = self.lock();
        let range = self.range(addr, data.len() as u64, mem.len())?;
        let dst = mem.get_mut(range).ok_or(DmaFault {
            addr,
            len: data.len() as u64,
        })?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let d = VecDma::with_base(0x1000, 0x100);
        d.write(0x1000, &[1, 2, 3]).expect("in range");
        assert_eq!(d.read_vec(0x1000, 3).expect("in range"), vec![1, 2, 3]);
        d.write(0x10FF, &[9]).expect("last byte");
        assert!(d.write(0x10FF, &[9, 9]).is_err());
        assert!(d.read_vec(0xFFF, 1).is_err());
        assert!(d.read_vec(u64::MAX, 2).is_err());
        assert!(d.write(0x1000, &[]).is_ok());
        assert!(d.fill(0x1000, 0x101, 0).is_err());
        d.fill(0x1000, 0x100, 7).expect("whole");
        assert_eq!(d.read_vec(0x1080, 1).expect("in range"), vec![7]);
        assert_eq!(d.len(), 0x100);
        assert!(!d.is_empty());
    }
}
