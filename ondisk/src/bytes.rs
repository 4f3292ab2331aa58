//! Little-endian field access: a bounds-checked cursor for variable-length structures (records)
//! and fixed-offset accessors for fixed-size blocks (superblock, heartbeat, image header).

use crate::error::{FormatError, Problem, Structure};
use crate::Uuid;

/// A cursor over untrusted bytes. Every read checks the remaining length and fails with
/// [`Problem::Truncated`] at the offset of the field; nothing here can panic.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf[0]` in the structure the caller reports offsets in (e.g. the slot).
    base: u64,
    structure: Structure,
}

impl<'a> Reader<'a> {
    /// A reader of `buf`, whose first byte is at `base` in the reported coordinates.
    pub fn new(buf: &'a [u8], base: u64, structure: Structure) -> Self {
        Self {
            buf,
            pos: 0,
            base,
            structure,
        }
    }

    /// Offset of the next byte, in reported coordinates.
    pub fn offset(&self) -> u64 {
        self.base.saturating_add(self.pos as u64)
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// An error about the structure at the current offset.
    pub fn error(&self, problem: Problem) -> FormatError {
        FormatError::new(self.structure, self.offset(), problem)
    }

    /// An error about the structure at offset `at` (reported coordinates).
    pub fn error_at(&self, at: u64, problem: Problem) -> FormatError {
        FormatError::new(self.structure, at, problem)
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.pos.checked_add(n);
        match end.and_then(|end| self.buf.get(self.pos..end)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(self.error(Problem::Truncated {
                needed: n as u64,
                available: self.remaining() as u64,
            })),
        }
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub fn uuid(&mut self) -> Result<Uuid, FormatError> {
        Ok(Uuid(self.array()?))
    }

    /// A boolean byte: 0 or 1, anything else refused.
    pub fn bool(&mut self, field: &'static str) -> Result<bool, FormatError> {
        let at = self.offset();
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.error_at(
                at,
                Problem::BadValue {
                    field,
                    value: u64::from(v),
                    why: "a boolean is 0 or 1",
                },
            )),
        }
    }

    /// A string: u16 length, then that many bytes of UTF-8. Limits on content are checked by
    /// the record's own validation; here only the encoding.
    pub fn string(&mut self, field: &'static str) -> Result<String, FormatError> {
        let at = self.offset();
        let len = usize::from(self.u16()?);
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.error_at(at, Problem::BadUtf8 { field }))
    }

    /// A count of items of `item_size` bytes each that must all fit in what remains: refuses a
    /// count the remaining bytes cannot hold before anything is allocated for it.
    pub fn count_fits(&self, at: u64, count: u64, item_size: u64) -> Result<usize, FormatError> {
        let needed = count.saturating_mul(item_size);
        if needed > self.remaining() as u64 {
            return Err(self.error_at(
                at,
                Problem::Truncated {
                    needed,
                    available: self.remaining() as u64,
                },
            ));
        }
        // `needed` fits in the buffer, so `count` fits in usize.
        usize::try_from(count).map_err(|_| {
            self.error_at(
                at,
                Problem::Truncated {
                    needed,
                    available: self.remaining() as u64,
                },
            )
        })
    }

    /// Refuses bytes left after the last field.
    pub fn finish(&self) -> Result<(), FormatError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(self.error(Problem::TrailingBytes { count: n as u64 })),
        }
    }
}

/// An appending little-endian encoder.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn uuid(&mut self, v: &Uuid) {
        self.buf.extend_from_slice(&v.0);
    }
    pub fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }
    /// A string whose length validation has bounded (every string limit is far below 64 KiB);
    /// a longer one is cut at 65535 bytes, which its validation has already refused.
    pub fn string(&mut self, s: &str) {
        let bytes = s.as_bytes();
        let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
        self.u16(len);
        self.buf
            .extend_from_slice(bytes.get(..usize::from(len)).unwrap_or(bytes));
    }
}

/// Fixed-offset accessors on a fixed-size block. Offsets are the format's constants, so every
/// access is within the block by construction (asserted by the offset tests).
pub(crate) mod fixed {
    use crate::Uuid;

    pub fn get<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
        let mut a = [0u8; N];
        if let Some(s) = b.get(off..off + N) {
            a.copy_from_slice(s);
        }
        a
    }
    pub fn u8_at(b: &[u8], off: usize) -> u8 {
        get::<1>(b, off)[0]
    }
    pub fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(get(b, off))
    }
    pub fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(get(b, off))
    }
    pub fn uuid_at(b: &[u8], off: usize) -> Uuid {
        Uuid(get(b, off))
    }
    pub fn put(b: &mut [u8], off: usize, v: &[u8]) {
        if let Some(s) = b.get_mut(off..off + v.len()) {
            s.copy_from_slice(v);
        }
    }
    pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
        put(b, off, &v.to_le_bytes());
    }
    pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
        put(b, off, &v.to_le_bytes());
    }
}
