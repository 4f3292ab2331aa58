//! Volume maps: which blocks of which device hold a volume.
//!
//! A volume is an extent map over the engine's devices (the roots of the block-device trees:
//! a file, a drive, a RAID pool). A volume served 1:1 from its own file or drive has one
//! extent covering its device; a volume of a pool has the extents the metadata service
//! allocated for it (thick, one or more after a grow). A request is resolved against the map
//! when it starts, into one device I/O per extent it touches, so a map replaced while it runs
//! does not change it: in-flight I/O finishes on the map it started with.

use crate::bdev::BdevBox;

/// `blocks` blocks of a volume from volume block `start` live on device `device` from byte
/// `device_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First volume block.
    pub start: u64,
    /// Blocks.
    pub blocks: u64,
    /// Index of the device (engine root).
    pub device: usize,
    /// Byte offset on the device.
    pub device_offset: u64,
}

/// A volume as the engine serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeMap {
    /// Id used in descriptors.
    pub id: u32,
    /// Name, for logs.
    pub name: String,
    /// Logical block size.
    pub block_size: u32,
    /// Size in blocks.
    pub blocks: u64,
    /// The extents, in volume order, covering every block exactly once.
    pub extents: Vec<Extent>,
}

/// A piece of a request: `len` bytes at `device_offset` of `device`, `skip` bytes into the
/// request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub device: usize,
    pub device_offset: u64,
    pub len: u64,
    pub skip: u64,
}

impl VolumeMap {
    /// A volume that is the whole of device `device`.
    pub fn whole(id: u32, name: &str, device: usize, dev: &BdevBox) -> Self {
        let bs = dev.block_size();
        let blocks = dev.size() / u64::from(bs);
        Self {
            id,
            name: name.to_owned(),
            block_size: bs,
            blocks,
            extents: vec![Extent {
                start: 0,
                blocks,
                device,
                device_offset: 0,
            }],
        }
    }

    /// Checks the map against the devices: block size, extents in order, contiguous, covering
    /// the volume, inside their devices.
    pub fn validate(&self, devices: &[BdevBox]) -> Result<(), String> {
        self.validate_with(|d| {
            devices
                .get(d)
                .map(|d| (d.name().to_owned(), d.block_size(), d.size()))
        })
    }

    /// As [`VolumeMap::validate`], with the devices' `(name, block size, size)` looked up by
    /// index.
    pub fn validate_with(
        &self,
        device: impl Fn(usize) -> Option<(String, u32, u64)>,
    ) -> Result<(), String> {
        if !matches!(self.block_size, 512 | 4096) || self.blocks == 0 {
            return Err(format!(
                "volume {}: {} blocks of {} bytes",
                self.name, self.blocks, self.block_size
            ));
        }
        let bs = u64::from(self.block_size);
        let mut next = 0u64;
        for e in &self.extents {
            let Some((dev_name, dev_bs, dev_size)) = device(e.device) else {
                return Err(format!("volume {}: no device {}", self.name, e.device));
            };
            if dev_bs != self.block_size {
                return Err(format!(
                    "volume {} has {}-byte blocks, its device {dev_name} {dev_bs}-byte ones",
                    self.name, self.block_size,
                ));
            }
            let end = e
                .blocks
                .checked_mul(bs)
                .and_then(|l| l.checked_add(e.device_offset));
            if e.start != next
                || e.blocks == 0
                || e.device_offset % bs != 0
                || end.is_none_or(|end| end > dev_size)
            {
                return Err(format!(
                    "volume {}: extent {e:?} is out of order, empty or outside device {dev_name}",
                    self.name,
                ));
            }
            next = e.start + e.blocks;
        }
        if next != self.blocks {
            return Err(format!(
                "volume {}: extents cover {next} of {} blocks",
                self.name, self.blocks
            ));
        }
        Ok(())
    }

    /// Byte range of `blocks` blocks from `lba`, if it lies inside the volume.
    pub(crate) fn range(&self, lba: u64, blocks: u32) -> Option<(u64, u64)> {
        let end = lba.checked_add(u64::from(blocks))?;
        if end > self.blocks {
            return None;
        }
        let bs = u64::from(self.block_size);
        Some((lba.checked_mul(bs)?, u64::from(blocks).checked_mul(bs)?))
    }

    /// Calls `f` with each piece of the byte range `[offset, offset + len)` (validated by
    /// [`VolumeMap::range`]).
    pub(crate) fn pieces(&self, offset: u64, len: u64, mut f: impl FnMut(Piece)) {
        let bs = u64::from(self.block_size);
        let mut at = 0;
        for e in &self.extents {
            if at >= len {
                break;
            }
            let (e_start, e_len) = (e.start * bs, e.blocks * bs);
            let pos = offset + at;
            if pos >= e_start + e_len || pos < e_start {
                continue;
            }
            let n = (e_start + e_len - pos).min(len - at);
            f(Piece {
                device: e.device,
                device_offset: e.device_offset + (pos - e_start),
                len: n,
                skip: at,
            });
            at += n;
        }
    }

    /// The devices the volume lives on (each once).
    pub(crate) fn devices(&self, mut f: impl FnMut(usize)) {
        for (i, e) in self.extents.iter().enumerate() {
            if !self.extents[..i].iter().any(|o| o.device == e.device) {
                f(e.device);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> VolumeMap {
        VolumeMap {
            id: 1,
            name: "v".into(),
            block_size: 512,
            blocks: 30,
            extents: vec![
                Extent {
                    start: 0,
                    blocks: 10,
                    device: 0,
                    device_offset: 5120,
                },
                Extent {
                    start: 10,
                    blocks: 20,
                    device: 1,
                    device_offset: 0,
                },
            ],
        }
    }

    #[test]
    fn requests_are_cut_at_extent_ends() {
        let m = map();
        let mut got = Vec::new();
        m.pieces(9 * 512, 3 * 512, |p| got.push(p));
        assert_eq!(
            got,
            vec![
                Piece {
                    device: 0,
                    device_offset: 5120 + 9 * 512,
                    len: 512,
                    skip: 0
                },
                Piece {
                    device: 1,
                    device_offset: 0,
                    len: 1024,
                    skip: 512
                },
            ]
        );
        got.clear();
        m.pieces(12 * 512, 512, |p| got.push(p));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].device_offset, 1024);
        assert_eq!(m.range(29, 1), Some((29 * 512, 512)));
        assert_eq!(m.range(29, 2), None);
        assert_eq!(m.range(u64::MAX, 1), None);
        let mut devs = Vec::new();
        m.devices(|d| devs.push(d));
        assert_eq!(devs, vec![0, 1]);
    }
}
