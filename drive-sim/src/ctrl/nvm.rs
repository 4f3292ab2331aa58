//! NVM command set I/O commands, including the reservation commands.

use std::time::Instant;

use duplex_nvme::cmd::Sqe;
use duplex_nvme::resv::{self, Acquire, HostCtrl, HostId, Outcome, Register, Release, Report};
use duplex_nvme::spec::io;
use duplex_nvme::status::{generic, media, Status};

use super::{from_host, le64, to_host, Completion, Controller, Progress};
use crate::dma::Dma;
use crate::drive::{DriveState, OpGroup, Pending};
use crate::limited;

/// What became of a submitted I/O command.
pub(super) enum Submit {
    /// Handled now: its completion (`None`: never completes, the drive lost power).
    Done(Option<Completion>),
    /// Delayed by a fault: it is in the drive's table of outstanding commands.
    Deferred,
}

/// Most ranges of a Dataset Management command.
const DSM_RANGE_LEN: u64 = 16;

impl Controller {
    /// Validates a fetched I/O command and runs it now or delays it.
    pub(super) fn io_submit(
        &mut self,
        st: &mut DriveState,
        dma: &dyn Dma,
        sqid: u16,
        sqe: Sqe,
        now: Instant,
        p: &mut Progress,
    ) -> Submit {
        let conflict = st.ctrls.get(&self.cntlid).is_some_and(|c| {
            c.pending
                .iter()
                .any(|x| x.sqid == sqid && x.sqe.cid == sqe.cid)
        });
        if conflict {
            return Submit::Done(Some(self.completion(
                sqid,
                sqe.cid,
                generic::CID_CONFLICT,
                0,
            )));
        }
        if let Err(s) = self.validate_io(st, &sqe) {
            limited!(debug, 20, opcode = sqe.opcode, status = ?s, "I/O command rejected");
            return Submit::Done(Some(self.completion(sqid, sqe.cid, s, 0)));
        }
        if let Some(g) = OpGroup::of(sqe.opcode) {
            if let Some(wait) = st.delay_for(g, now) {
                let seq = st.seq();
                st.ctrl(self.cntlid).pending.push(Pending {
                    seq,
                    sqid,
                    sqe,
                    wait,
                    aborted: None,
                });
                return Submit::Deferred;
            }
        }
        Submit::Done(self.exec_io(st, dma, sqid, &sqe, p))
    }

    /// Checks what can be checked without executing: opcode, fused/PSDT, namespace, LBA range,
    /// MDTS.
    fn validate_io(&self, st: &DriveState, sqe: &Sqe) -> Result<(), Status> {
        let op = sqe.opcode;
        let known = matches!(
            op,
            io::FLUSH
                | io::WRITE
                | io::READ
                | io::COMPARE
                | io::WRITE_ZEROES
                | io::DSM
                | resv::opc::REGISTER
                | resv::opc::REPORT
                | resv::opc::ACQUIRE
                | resv::opc::RELEASE
        );
        if !known {
            return Err(generic::INVALID_OPCODE);
        }
        if sqe.flags & 3 != 0 || sqe.psdt() != 0 {
            return Err(generic::INVALID_FIELD);
        }
        if sqe.nsid != 1 && !(op == io::FLUSH && sqe.nsid == 0xFFFF_FFFF) {
            return Err(generic::INVALID_NS);
        }
        match op {
            io::READ | io::WRITE | io::COMPARE => {
                check_range(st, sqe.slba(), u64::from(sqe.nlb()))?;
                // The metadata goes through a separate buffer, which must be named and
                // dword aligned.
                if st.ms > 0 && (sqe.mptr == 0 || sqe.mptr % 4 != 0) {
                    return Err(generic::INVALID_FIELD);
                }
                if u64::from(sqe.nlb()) * st.bs > self.max_transfer() {
                    return Err(generic::INVALID_FIELD);
                }
            }
            io::WRITE_ZEROES => check_range(st, sqe.slba(), u64::from(sqe.nlb()))?,
            _ => {}
        }
        Ok(())
    }

    /// Executes a validated I/O command; `None` if it never completes (it cut the power).
    pub(super) fn exec_io(
        &mut self,
        st: &mut DriveState,
        dma: &dyn Dma,
        sqid: u16,
        sqe: &Sqe,
        p: &mut Progress,
    ) -> Option<Completion> {
        let host = st.ctrl(self.cntlid).host;
        let r = match st.resv.check_io(host, sqe.opcode) {
            Err(s) => Err(s),
            Ok(()) => match sqe.opcode {
                io::READ => self.read(st, dma, sqe, false),
                io::COMPARE => self.read(st, dma, sqe, true),
                io::WRITE => self.write(st, dma, sqe),
                io::WRITE_ZEROES => self.write_zeroes(st, sqe),
                io::FLUSH => flush(st),
                io::DSM => self.dsm(st, dma, sqe),
                resv::opc::REGISTER | resv::opc::ACQUIRE | resv::opc::RELEASE => {
                    self.resv_change(st, dma, sqe, p)
                }
                resv::opc::REPORT => self.resv_report(st, dma, sqe),
                _ => Err(generic::INVALID_OPCODE),
            },
        };
        if st.epoch != self.epoch {
            return None; // torn write: the power is gone
        }
        let (status, dw0) = match r {
            Ok(dw0) => (Status::SUCCESS, dw0),
            Err(s) => {
                if s.sct() == 2 {
                    self.log_error(sqid, sqe.cid, s, sqe.slba(), sqe.nsid);
                }
                (s, 0)
            }
        };
        Some(self.completion(sqid, sqe.cid, status, dw0))
    }

    fn read(
        &mut self,
        st: &mut DriveState,
        dma: &dyn Dma,
        sqe: &Sqe,
        compare: bool,
    ) -> Result<u32, Status> {
        let (slba, nlb) = (sqe.slba(), u64::from(sqe.nlb()));
        if let Some(s) = st.take_error(OpGroup::Read, &[(slba, slba + nlb - 1)]) {
            return Err(s);
        }
        let len = nlb * st.bs;
        let segs = self.prps(dma, sqe, len)?;
        let mut data = st.read_blocks(slba, nlb).map_err(internal)?;
        st.flip_bits(slba, &mut data);
        let md = st.read_metadata(slba, nlb).map_err(internal)?;
        if compare {
            if from_host(dma, &segs, len)? != data || metadata_from_host(dma, sqe, md.len())? != md
            {
                return Err(media::COMPARE_FAILURE);
            }
        } else {
            to_host(dma, &segs, &data)?;
            if !md.is_empty() {
                dma.write(sqe.mptr, &md)
                    .map_err(|_| generic::DATA_TRANSFER)?;
            }
            st.stats.reads += 1;
            st.stats.bytes_read += len;
        }
        Ok(0)
    }

    fn write(&mut self, st: &mut DriveState, dma: &dyn Dma, sqe: &Sqe) -> Result<u32, Status> {
        let (slba, nlb) = (sqe.slba(), u64::from(sqe.nlb()));
        let last = slba + nlb - 1;
        if let Some(s) = st.take_error(OpGroup::Write, &[(slba, last)]) {
            return Err(s);
        }
        let len = nlb * st.bs;
        let segs = self.prps(dma, sqe, len)?;
        let data = from_host(dma, &segs, len)?;
        let md = metadata_from_host(dma, sqe, usize::try_from(nlb * st.ms).unwrap_or(0))?;
        if let Some(keep) = st.take_torn(slba, last) {
            st.record_write(self.cntlid);
            torn(st, slba, &data, keep);
            return Ok(0);
        }
        if st.lost_write(slba, last) {
            // Acknowledged, counted, never stored.
            st.record_write(self.cntlid);
            return Ok(0);
        }
        let through = sqe.fua() && !st.lying_flush();
        st.write_blocks_md(slba, &data, &md, through)
            .map_err(internal)?;
        st.record_write(self.cntlid);
        st.stats.writes += 1;
        st.stats.bytes_written += len;
        Ok(0)
    }

    fn write_zeroes(&mut self, st: &mut DriveState, sqe: &Sqe) -> Result<u32, Status> {
        let (slba, nlb) = (sqe.slba(), u64::from(sqe.nlb()));
        let last = slba + nlb - 1;
        if let Some(s) = st.take_error(OpGroup::Write, &[(slba, last)]) {
            return Err(s);
        }
        if let Some(keep) = st.take_torn(slba, last) {
            let n = keep.min(nlb * st.bs);
            let zeroes = vec![0u8; usize::try_from(n).unwrap_or(0)];
            st.record_write(self.cntlid);
            torn(st, slba, &zeroes, keep);
            return Ok(0);
        }
        let through = sqe.fua() && !st.lying_flush();
        st.zero_blocks(slba, nlb, through).map_err(internal)?;
        st.record_write(self.cntlid);
        st.stats.writes += 1;
        Ok(0)
    }

    /// Dataset Management: with the Deallocate attribute the ranges are zeroed (through the
    /// cache), so they read back as zeroes as Identify Namespace's DLFEAT promises; without
    /// it the command is a hint and does nothing.
    fn dsm(&mut self, st: &mut DriveState, dma: &dyn Dma, sqe: &Sqe) -> Result<u32, Status> {
        if sqe.cdw11 & 4 == 0 {
            return Ok(0);
        }
        let nr = u64::from(sqe.cdw10 & 0xFF) + 1;
        let len = nr * DSM_RANGE_LEN;
        let segs = self.prps(dma, sqe, len)?;
        let data = from_host(dma, &segs, len)?;
        let mut ranges = Vec::new();
        for r in data.chunks_exact(16) {
            let n = u64::from(u32::from_le_bytes([
                r.get(4).copied().unwrap_or(0),
                r.get(5).copied().unwrap_or(0),
                r.get(6).copied().unwrap_or(0),
                r.get(7).copied().unwrap_or(0),
            ]));
            let slba = le64(r.get(8..).unwrap_or(&[]));
            if n == 0 {
                continue;
            }
            check_range(st, slba, n)?;
            ranges.push((slba, n));
        }
        let inclusive: Vec<(u64, u64)> = ranges.iter().map(|&(s, n)| (s, s + n - 1)).collect();
        if let Some(s) = st.take_error(OpGroup::Write, &inclusive) {
            return Err(s);
        }
        for (slba, n) in ranges {
            st.zero_blocks(slba, n, false).map_err(internal)?;
        }
        st.record_write(self.cntlid);
        Ok(0)
    }

    /// Reads a reservation command's data (`len` bytes).
    fn resv_data(&self, dma: &dyn Dma, sqe: &Sqe, len: u64) -> Result<Vec<u8>, Status> {
        let segs = self.prps(dma, sqe, len)?;
        from_host(dma, &segs, len)
    }

    /// Reservation Register, Acquire and Release. They need the controller's host identifier:
    /// without one (all zero) they fail with Command Sequence Error.
    fn resv_change(
        &mut self,
        st: &mut DriveState,
        dma: &dyn Dma,
        sqe: &Sqe,
        p: &mut Progress,
    ) -> Result<u32, Status> {
        let host = st.ctrl(self.cntlid).host;
        if host == HostId::default() {
            return Err(generic::SEQUENCE);
        }
        let out = match sqe.opcode {
            resv::opc::REGISTER => {
                let data = self.resv_data(dma, sqe, 16)?;
                let cmd = Register::decode(sqe.cdw10, &data)?;
                let who = HostCtrl {
                    host,
                    cntlid: self.cntlid,
                };
                st.resv.register(who, &cmd)?
            }
            resv::opc::ACQUIRE => {
                let data = self.resv_data(dma, sqe, 16)?;
                let cmd = Acquire::decode(sqe.cdw10, &data)?;
                let out = st.resv.acquire(host, &cmd)?;
                if !out.unregistered.is_empty() {
                    let victims = out.unregistered.iter().map(|h| h.cntlid).collect();
                    st.record_preempt(self.cntlid, victims);
                }
                out
            }
            _ => {
                let data = self.resv_data(dma, sqe, 8)?;
                let cmd = Release::decode(sqe.cdw10, &data)?;
                st.resv.release(host, &cmd)?
            }
        };
        self.apply_outcome(st, dma, out, p);
        Ok(0)
    }

    /// Aborts the preempted hosts' outstanding commands on every controller (this one's
    /// complete right now, before the Acquire; another port's at its next `process`, never
    /// executing) and queues the notifications.
    fn apply_outcome(
        &mut self,
        st: &mut DriveState,
        dma: &dyn Dma,
        out: Outcome,
        p: &mut Progress,
    ) {
        for h in &out.abort {
            st.abort_host(h.host, generic::ABORTED_PREEMPT);
        }
        if !out.abort.is_empty() {
            self.complete_aborted(st, dma, p);
        }
        for n in &out.notices {
            st.notify(n.to.host, n.kind);
        }
    }

    fn resv_report(
        &mut self,
        st: &mut DriveState,
        dma: &dyn Dma,
        sqe: &Sqe,
    ) -> Result<u32, Status> {
        let r = Report::decode(sqe.cdw10, sqe.cdw11);
        if r.len > self.max_transfer() {
            return Err(generic::INVALID_FIELD);
        }
        let segs = self.prps(dma, sqe, r.len)?;
        let b = st
            .resv
            .report(r.eds, usize::try_from(r.len).unwrap_or(usize::MAX))?;
        to_host(dma, &segs, &b)?;
        Ok(0)
    }
}

/// Flush: destages the cache (a lying-flush fault skips it).
fn flush(st: &mut DriveState) -> Result<u32, Status> {
    if let Some(s) = st.take_error(OpGroup::Flush, &[]) {
        return Err(s);
    }
    if st.lying_flush() {
        return Ok(0);
    }
    st.destage().map_err(internal)?;
    Ok(0)
}

/// A torn write: the first `keep` bytes of `data` reach the file, then the power goes.
fn torn(st: &mut DriveState, slba: u64, data: &[u8], keep: u64) {
    let n = usize::try_from(keep).unwrap_or(usize::MAX).min(data.len());
    if let Err(e) = st.write_raw(slba, data.get(..n).unwrap_or(&[])) {
        tracing::warn!(error = %e, "torn write prefix failed");
    }
    tracing::info!(slba, kept = n, "torn write: cutting power");
    st.power_cut();
}

fn check_range(st: &DriveState, slba: u64, nlb: u64) -> Result<(), Status> {
    match slba.checked_add(nlb) {
        Some(end) if end <= st.blocks => Ok(()),
        _ => Err(generic::LBA_RANGE),
    }
}

/// The metadata of a command on a namespace formatted with metadata: `len` bytes from the
/// separate buffer at MPTR (none when the format has none).
fn metadata_from_host(dma: &dyn Dma, sqe: &Sqe, len: usize) -> Result<Vec<u8>, Status> {
    let mut md = vec![0u8; len];
    if len > 0 {
        dma.read(sqe.mptr, &mut md)
            .map_err(|_| generic::DATA_TRANSFER)?;
    }
    Ok(md)
}

fn internal(e: std::io::Error) -> Status {
    limited!(warn, 5, error = %e, "backing file I/O failed");
    generic::INTERNAL
}
