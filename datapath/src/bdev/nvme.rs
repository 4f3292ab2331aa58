//! [`NvmeBdev`]: a namespace of an NVMe drive through the user-space driver
//! ([`crate::drives::Drive`]: pieces per MDTS, PRPs straight from the pool chunks, retries,
//! reset on failure). Its completions are polled, so it is busy while commands are out.

use std::os::fd::BorrowedFd;

use duplex_ipc::desc::STATUS_LBA_OUT_OF_RANGE;

use super::{in_range, Attach, Bdev, Ctx, Done, Io};
use crate::drives::{Drive, Finished};
use crate::integrity::Verdict;

/// One I/O in flight: its pieces outstanding and the first error.
#[derive(Debug, Clone, Copy)]
struct Pending {
    token: u64,
    outstanding: u32,
    status: u16,
    /// Keep the blocks' verdicts ([`super::REPORT_VERDICTS`]).
    report: bool,
}

/// A namespace of an NVMe drive. See the module docs.
#[derive(Debug)]
pub struct NvmeBdev {
    drive: Drive,
    /// I/Os in flight; a piece's token is the index here.
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    ready: Vec<Done>,
    finished: Vec<Finished>,
    /// Verdicts of ended reads that asked for them, by the caller's token.
    verdicts: Vec<(u64, Vec<Verdict>)>,
}

impl NvmeBdev {
    /// A block device over a drive brought up by [`Drive::open`].
    pub fn new(drive: Drive) -> Self {
        Self {
            drive,
            pending: Vec::new(),
            free: Vec::new(),
            ready: Vec::new(),
            finished: Vec::new(),
            verdicts: Vec::new(),
        }
    }

    /// The drive.
    pub fn drive(&self) -> &Drive {
        &self.drive
    }
}

impl Bdev for NvmeBdev {
    fn drives_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Drive>) {
        out.push(&mut self.drive);
    }

    fn name(&self) -> &str {
        self.drive.name()
    }

    fn block_size(&self) -> u32 {
        self.drive.block_size()
    }

    fn size(&self) -> u64 {
        self.drive.blocks() * u64::from(self.drive.block_size())
    }

    fn attach(&mut self, _ids: &mut Attach) {}

    fn files<'a>(&'a self, _out: &mut Vec<BorrowedFd<'a>>) {}

    fn submit(&mut self, io: Io, ctx: &mut Ctx<'_>) {
        if !in_range(&io, self.block_size(), self.size()) {
            self.ready.push(Done {
                token: io.token,
                status: STATUS_LBA_OUT_OF_RANGE,
            });
            return;
        }
        let i = self.free.pop().unwrap_or_else(|| {
            self.pending.push(None);
            self.pending.len() - 1
        });
        let inner = Io {
            token: i as u64,
            ..io
        };
        match self.drive.start(&inner, ctx.chain(io.chain.id), ctx.pool) {
            Ok(0) => {
                self.free.push(i);
                self.ready.push(Done {
                    token: io.token,
                    status: 0,
                });
            }
            Ok(n) => {
                self.pending[i] = Some(Pending {
                    token: io.token,
                    outstanding: n,
                    status: 0,
                    report: io.op == super::Op::Read && io.seq == super::REPORT_VERDICTS,
                });
            }
            Err(status) => {
                self.free.push(i);
                self.ready.push(Done {
                    token: io.token,
                    status,
                });
            }
        }
    }

    fn poll(&mut self, ctx: &mut Ctx<'_>, out: &mut Vec<Done>) -> bool {
        let mut progress = !self.ready.is_empty();
        out.append(&mut self.ready);
        let mut finished = std::mem::take(&mut self.finished);
        finished.clear();
        progress |= self.drive.poll(ctx.now, ctx.pool, &mut finished);
        for f in &finished {
            let Some(i) = usize::try_from(f.token).ok() else {
                continue;
            };
            let Some(p) = self.pending.get_mut(i).and_then(Option::as_mut) else {
                tracing::error!(
                    drive = self.drive.name(),
                    token = f.token,
                    "piece of no I/O"
                );
                continue;
            };
            p.outstanding = p.outstanding.saturating_sub(1);
            if f.status != 0 && p.status == 0 {
                p.status = f.status;
            }
            if p.outstanding == 0 {
                if p.report {
                    let v = self.drive.take_verdicts(i as u64);
                    if !v.is_empty() {
                        // At most what is in flight: the caller takes each when its read ends.
                        self.verdicts.retain(|x| x.0 != p.token);
                        self.verdicts.push((p.token, v));
                    }
                }
                out.push(Done {
                    token: p.token,
                    status: p.status,
                });
                self.pending[i] = None;
                self.free.push(i);
            }
        }
        self.finished = finished;
        progress
    }

    fn busy(&self) -> bool {
        !self.ready.is_empty() || self.drive.busy()
    }

    fn inflight(&self) -> usize {
        self.pending.iter().filter(|p| p.is_some()).count() + self.ready.len()
    }

    fn retries(&self) -> u64 {
        self.drive.retries()
    }

    fn integrity_errors(&self) -> u64 {
        self.drive.integrity_errors()
    }

    fn carries_records(&self) -> bool {
        self.drive.metadata_size() != 0
    }

    fn take_verdicts(&mut self, token: u64) -> Option<Vec<Verdict>> {
        let i = self.verdicts.iter().position(|x| x.0 == token)?;
        Some(self.verdicts.swap_remove(i).1)
    }
}
