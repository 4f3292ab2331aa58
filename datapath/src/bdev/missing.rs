//! [`MissingBdev`]: the place of a RAID member that is not there (missing at import, or stale
//! and kept out until a rebuild): every I/O fails. A RAID device keeps such a member failed,
//! so it is never sent I/O in the first place; this is its stand-in for the geometry.

use std::os::fd::BorrowedFd;

use duplex_ipc::desc::STATUS_INTERNAL;

use super::{Attach, Bdev, Ctx, Done, Io};

/// A member that is not there. See the module docs.
#[derive(Debug)]
pub struct MissingBdev {
    name: String,
    block_size: u32,
    size: u64,
    ready: Vec<Done>,
}

impl MissingBdev {
    /// A stand-in of `size` bytes in `block_size`-byte blocks.
    pub fn new(name: &str, block_size: u32, size: u64) -> Self {
        Self {
            name: name.to_owned(),
            block_size,
            size,
            ready: Vec::new(),
        }
    }
}

impl Bdev for MissingBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn attach(&mut self, _ids: &mut Attach) {}

    fn files<'a>(&'a self, _out: &mut Vec<BorrowedFd<'a>>) {}

    fn submit(&mut self, io: Io, _ctx: &mut Ctx<'_>) {
        self.ready.push(Done {
            token: io.token,
            status: STATUS_INTERNAL,
        });
    }

    fn poll(&mut self, _ctx: &mut Ctx<'_>, out: &mut Vec<Done>) -> bool {
        let moved = !self.ready.is_empty();
        out.append(&mut self.ready);
        moved
    }

    fn busy(&self) -> bool {
        !self.ready.is_empty()
    }

    fn inflight(&self) -> usize {
        self.ready.len()
    }
}
