//! Admin commands of an NVMe over PCIe controller.

use duplex_nvme::cmd::{GetLogPage, Sqe};
use duplex_nvme::identify;
use duplex_nvme::log;
use duplex_nvme::resv::{self, HostId};
use duplex_nvme::spec::{admin, cns, feat, io, lid};
use duplex_nvme::status::{generic, specific, Status};

use super::more_status::{FEATURE_NOT_CHANGEABLE, INVALID_INTERRUPT_VECTOR};
use super::{
    from_host, le64, put, to_host, Completion, Controller, Cq, Features, Progress, Sq, ACL, AERL,
    CQE_SIZE, ELPE, PAGE_SIZE, PCI_VENDOR_ID, SQE_SIZE, VERSION,
};
use crate::dma::Dma;
use crate::drive::DriveState;
use crate::limited;

/// Firmware revision reported.
const FIRMWARE: &str = "0.1";
/// ONCS bit 5: reservations.
const ONCS_RESERVATIONS: u16 = 1 << 5;
/// CTRATT bit 0: 128-bit host identifier supported.
const CTRATT_HOSTID128: u8 = 1;

/// An admin command's result: `Ok(Some(dw0))` completes it successfully, `Ok(None)` leaves it
/// outstanding (an Asynchronous Event Request), `Err` completes it with that status.
type AdminResult = Result<Option<u32>, Status>;

impl Controller {
    /// Handles an admin command; `None` if it stays outstanding.
    pub(super) fn admin(
        &mut self,
        st: &mut DriveState,
        dma: &dyn Dma,
        sqe: Sqe,
        p: &mut Progress,
    ) -> Option<Completion> {
        match self.admin_inner(st, dma, &sqe, p) {
            Ok(Some(dw0)) => Some(self.completion(0, sqe.cid, Status::SUCCESS, dw0)),
            Ok(None) => None,
            Err(s) => {
                limited!(debug, 20, opcode = sqe.opcode, status = ?s, "admin command failed");
                Some(self.completion(0, sqe.cid, s, 0))
            }
        }
    }

    fn admin_inner(
        &mut self,
        st: &mut DriveState,
        dma: &dyn Dma,
        sqe: &Sqe,
        p: &mut Progress,
    ) -> AdminResult {
        let known = matches!(
            sqe.opcode,
            admin::DELETE_IO_SQ
                | admin::CREATE_IO_SQ
                | admin::GET_LOG_PAGE
                | admin::DELETE_IO_CQ
                | admin::CREATE_IO_CQ
                | admin::IDENTIFY
                | admin::ABORT
                | admin::SET_FEATURES
                | admin::GET_FEATURES
                | admin::ASYNC_EVENT
                | admin::KEEP_ALIVE
        );
        if !known {
            return Err(generic::INVALID_OPCODE);
        }
        // No fused operations, no SGLs.
        if sqe.flags & 3 != 0 || sqe.psdt() != 0 {
            return Err(generic::INVALID_FIELD);
        }
        if self.aers.contains(&sqe.cid) {
            return Err(generic::CID_CONFLICT);
        }
        match sqe.opcode {
            admin::CREATE_IO_CQ => self.create_cq(sqe),
            admin::CREATE_IO_SQ => self.create_sq(sqe),
            admin::DELETE_IO_SQ => self.delete_sq(st, dma, sqe, p),
            admin::DELETE_IO_CQ => self.delete_cq(sqe),
            admin::IDENTIFY => self.identify(st, dma, sqe),
            admin::GET_LOG_PAGE => self.get_log_page(st, dma, sqe),
            admin::SET_FEATURES => self.set_features(st, dma, sqe),
            admin::GET_FEATURES => self.get_features(st, dma, sqe),
            admin::ABORT => self.abort(st, dma, sqe, p),
            admin::ASYNC_EVENT => {
                if self.aers.len() > usize::from(AERL) {
                    return Err(specific::AER_LIMIT);
                }
                self.aers.push_back(sqe.cid);
                Ok(None)
            }
            _ => Ok(Some(0)), // Keep Alive
        }
    }

    fn io_queues_exist(&self) -> bool {
        self.sqs.iter().skip(1).any(Option::is_some) || self.cqs.iter().skip(1).any(Option::is_some)
    }

    fn create_cq(&mut self, sqe: &Sqe) -> AdminResult {
        let qid = usize::from((sqe.cdw10 & 0xFFFF) as u16);
        let size = (sqe.cdw10 >> 16) + 1;
        let pc = sqe.cdw11 & 1 != 0;
        let ien = sqe.cdw11 & 2 != 0;
        let iv = (sqe.cdw11 >> 16) as u16;
        let base = le64(&sqe.dptr);
        if qid == 0
            || qid > usize::from(self.feat.ncqa) + 1
            || !matches!(self.cqs.get(qid), Some(None))
        {
            return Err(specific::INVALID_QID);
        }
        if size < 2 || size > u32::from(self.drive.config().mqes) {
            return Err(specific::INVALID_QUEUE_SIZE);
        }
        if (self.cc >> duplex_nvme::spec::reg::CC_IOCQES_SHIFT) & 0xF != 4 {
            return Err(specific::INVALID_QUEUE_SIZE);
        }
        if !pc {
            return Err(generic::INVALID_FIELD);
        }
        if iv >= self.irq_vectors() {
            return Err(INVALID_INTERRUPT_VECTOR);
        }
        if base & (PAGE_SIZE - 1) != 0 {
            return Err(generic::PRP_OFFSET);
        }
        if base.checked_add(u64::from(size) * CQE_SIZE).is_none() {
            return Err(generic::INVALID_FIELD);
        }
        if let Some(slot) = self.cqs.get_mut(qid) {
            *slot = Some(Cq {
                base,
                size,
                head: 0,
                tail: 0,
                phase: true,
                ien,
                iv,
                held: Default::default(),
                users: 0,
            });
        }
        Ok(Some(0))
    }

    fn create_sq(&mut self, sqe: &Sqe) -> AdminResult {
        let qid = usize::from((sqe.cdw10 & 0xFFFF) as u16);
        let size = (sqe.cdw10 >> 16) + 1;
        let pc = sqe.cdw11 & 1 != 0;
        let cqid = (sqe.cdw11 >> 16) as u16;
        let base = le64(&sqe.dptr);
        if qid == 0
            || qid > usize::from(self.feat.nsqa) + 1
            || !matches!(self.sqs.get(qid), Some(None))
        {
            return Err(specific::INVALID_QID);
        }
        if cqid == 0 || !matches!(self.cqs.get(usize::from(cqid)), Some(Some(_))) {
            return Err(specific::INVALID_CQ);
        }
        if size < 2 || size > u32::from(self.drive.config().mqes) {
            return Err(specific::INVALID_QUEUE_SIZE);
        }
        if (self.cc >> duplex_nvme::spec::reg::CC_IOSQES_SHIFT) & 0xF != 6 {
            return Err(specific::INVALID_QUEUE_SIZE);
        }
        if !pc {
            return Err(generic::INVALID_FIELD);
        }
        if base & (PAGE_SIZE - 1) != 0 {
            return Err(generic::PRP_OFFSET);
        }
        if base.checked_add(u64::from(size) * SQE_SIZE).is_none() {
            return Err(generic::INVALID_FIELD);
        }
        if let Some(Some(cq)) = self.cqs.get_mut(usize::from(cqid)) {
            cq.users += 1;
        }
        if let Some(slot) = self.sqs.get_mut(qid) {
            *slot = Some(Sq {
                base,
                size,
                head: 0,
                tail: 0,
                cqid,
            });
        }
        Ok(Some(0))
    }

    fn delete_sq(
        &mut self,
        st: &mut DriveState,
        dma: &dyn Dma,
        sqe: &Sqe,
        p: &mut Progress,
    ) -> AdminResult {
        let qid = (sqe.cdw10 & 0xFFFF) as u16;
        let cqid = match self.sqs.get(usize::from(qid)) {
            Some(Some(sq)) if qid != 0 => sq.cqid,
            _ => return Err(specific::INVALID_QID),
        };
        // Its delayed commands complete (aborted) before the deletion does.
        let c = st.ctrl(self.cntlid);
        let (mut gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut c.pending)
            .into_iter()
            .partition(|x| x.sqid == qid);
        c.pending = keep;
        gone.sort_unstable_by_key(|x| x.seq);
        for pend in gone {
            let s = pend.aborted.unwrap_or(generic::ABORTED_SQ_DELETION);
            let comp = self.completion(qid, pend.sqe.cid, s, 0);
            self.complete(dma, comp, p);
        }
        if let Some(slot) = self.sqs.get_mut(usize::from(qid)) {
            *slot = None;
        }
        if let Some(Some(cq)) = self.cqs.get_mut(usize::from(cqid)) {
            cq.users = cq.users.saturating_sub(1);
        }
        Ok(Some(0))
    }

    fn delete_cq(&mut self, sqe: &Sqe) -> AdminResult {
        let qid = usize::from((sqe.cdw10 & 0xFFFF) as u16);
        match self.cqs.get(qid) {
            Some(Some(cq)) if qid != 0 => {
                if cq.users > 0 {
                    return Err(specific::INVALID_QUEUE_DELETION);
                }
            }
            _ => return Err(specific::INVALID_QID),
        }
        if let Some(slot) = self.cqs.get_mut(qid) {
            *slot = None;
        }
        Ok(Some(0))
    }

    fn identify(&mut self, st: &mut DriveState, dma: &dyn Dma, sqe: &Sqe) -> AdminResult {
        let cns = (sqe.cdw10 & 0xFF) as u8;
        let data = match cns {
            cns::NAMESPACE => {
                if sqe.nsid != 1 {
                    return Err(generic::INVALID_NS);
                }
                self.id_namespace()
            }
            cns::CONTROLLER => self.id_controller(st),
            cns::ACTIVE_NS_LIST => {
                if sqe.nsid >= 0xFFFF_FFFE {
                    return Err(generic::INVALID_NS);
                }
                identify::active_ns_list([1], sqe.nsid)
            }
            cns::NS_DESC_LIST => {
                if sqe.nsid != 1 {
                    return Err(generic::INVALID_NS);
                }
                self.ns_descriptors()
            }
            _ => return Err(generic::INVALID_FIELD),
        };
        let segs = self.prps(dma, sqe, identify::IDENTIFY_LEN as u64)?;
        to_host(dma, &segs, &data)?;
        Ok(Some(0))
    }

    fn id_controller(&self, st: &DriveState) -> Vec<u8> {
        let cfg = self.drive.config();
        let info = identify::ControllerInfo {
            vendor_id: PCI_VENDOR_ID,
            serial: cfg.serial.clone(),
            model: cfg.model.clone(),
            firmware: FIRMWARE.into(),
            ieee_oui: [0; 3],
            cntlid: self.cntlid,
            version: VERSION,
            cntrltype: identify::ControllerType::Io,
            mdts: cfg.mdts,
            oaes: 0,
            acl: ACL,
            aerl: AERL,
            elpe: ELPE,
            kas: 0,
            anatt: 0,
            ana_groups: 0,
            nn: 1,
            maxcmd: 0,
            oncs: identify::ONCS_COMPARE
                | identify::ONCS_DSM
                | identify::ONCS_WRITE_ZEROES
                | ONCS_RESERVATIONS,
            vwc: st.cache_present(),
            subnqn: format!("nqn.2026-11.io.duplex:drive-sim:{}", cfg.serial),
            ioccsz: 0,
            iorcsz: 0,
            multi_controller: true,
        };
        let mut b = identify::controller(&info);
        // PCIe: PRPs only (SGLS 0) and no fabrics fields (IOCCSZ..MSDBD).
        put(&mut b, 536, &0u32.to_le_bytes());
        if let Some(f) = b.get_mut(1792..1804) {
            f.fill(0);
        }
        if let Some(c) = b.get_mut(96) {
            *c |= CTRATT_HOSTID128;
        }
        if !st.cache_present() {
            // VWC: no cache, so no flush behaviour to report either.
            put(&mut b, 525, &[0]);
        }
        b
    }

    fn id_namespace(&self) -> Vec<u8> {
        let cfg = self.drive.config();
        let mut b = identify::namespace(&identify::NamespaceInfo {
            blocks: cfg.blocks,
            used: cfg.blocks,
            block_size: cfg.block_size,
            ana_group: 0,
            nguid: cfg.nguid,
            shared: true,
            rescap: resv::RESCAP,
        });
        put(&mut b, 120, &cfg.eui64);
        // LBA formats: the block size with 0, 8 or 64 bytes of metadata, transferred in a
        // separate buffer (MC bit 1); FLBAS says which one the namespace is in.
        let n = crate::drive::METADATA_SIZES.len();
        put(&mut b, 25, &[(n - 1) as u8]); // NLBAF, 0's based
        put(&mut b, 26, &[cfg.lba_format() & 0xF]); // FLBAS: format, metadata separate
        put(&mut b, 27, &[0b10]); // MC: metadata in a separate buffer
        for (i, ms) in crate::drive::METADATA_SIZES.iter().enumerate() {
            let lbaf = u32::from(*ms) | cfg.block_size.trailing_zeros() << 16;
            put(&mut b, 128 + 4 * i, &lbaf.to_le_bytes());
        }
        b
    }

    /// Namespace identification descriptors: EUI64, NGUID, a UUID derived from the NGUID
    /// (version 4 and variant bits forced), each only if non-zero, and the command set (NVM).
    fn ns_descriptors(&self) -> Vec<u8> {
        let cfg = self.drive.config();
        let mut b = vec![0u8; identify::IDENTIFY_LEN];
        let mut at = 0usize;
        let mut add = |t: u8, v: &[u8]| {
            put(&mut b, at, &[t, v.len() as u8]);
            put(&mut b, at + 4, v);
            at += 4 + v.len();
        };
        if cfg.eui64 != [0; 8] {
            add(1, &cfg.eui64);
        }
        if cfg.nguid != [0; 16] {
            add(identify::nidt::NGUID, &cfg.nguid);
            add(identify::nidt::UUID, &uuid_from(cfg.nguid));
        }
        add(identify::nidt::CSI, &[0]);
        b
    }

    fn get_log_page(&mut self, st: &mut DriveState, dma: &dyn Dma, sqe: &Sqe) -> AdminResult {
        let g = GetLogPage::from_sqe(sqe);
        if g.len > self.max_transfer() {
            return Err(generic::INVALID_FIELD);
        }
        if g.offset % 4 != 0 {
            return Err(generic::INVALID_FIELD);
        }
        let segs = self.prps(dma, sqe, g.len)?;
        let page: Vec<u8> = match g.lid {
            lid::ERROR => {
                let n = usize::from(ELPE) + 1;
                let mut v: Vec<u8> = self.errors.iter().flatten().copied().collect();
                v.resize(64 * n, 0);
                if !g.rae {
                    self.masked_events &= !1; // error status events
                }
                v
            }
            lid::SMART => {
                if !matches!(sqe.nsid, 0 | 1 | 0xFFFF_FFFF) {
                    return Err(generic::INVALID_FIELD);
                }
                log::smart(&log::HealthCounters {
                    bytes_read: st.stats.bytes_read,
                    bytes_written: st.stats.bytes_written,
                    reads: st.stats.reads,
                    writes: st.stats.writes,
                    power_on_hours: st.power_on_hours(),
                    media_errors: st.stats.media_errors,
                })
            }
            lid::FW_SLOT => log::firmware_slot(FIRMWARE),
            lid::CMD_EFFECTS => command_effects(),
            resv::LID_RESERVATION_NOTIFICATION => {
                let c = st.ctrl(self.cntlid);
                let entry = c.notices.pop_front();
                let left = u8::try_from(c.notices.len()).unwrap_or(u8::MAX);
                let more = !c.notices.is_empty();
                let page = match entry {
                    Some((count, kind)) => resv::notification_log_page(count, Some(kind), left, 1),
                    None => resv::notification_log_page(0, None, 0, 0),
                };
                if !g.rae {
                    self.masked_events &= !(1 << resv::AEN_TYPE_IO_SPECIFIC);
                    if more {
                        self.raise(duplex_nvme::spec::aen::dword0(
                            resv::AEN_TYPE_IO_SPECIFIC,
                            resv::AEN_INFO_RESERVATION_LOG,
                            resv::LID_RESERVATION_NOTIFICATION,
                        ));
                    }
                }
                page.to_vec()
            }
            _ => return Err(specific::INVALID_LOG_PAGE),
        };
        let from = usize::try_from(g.offset).unwrap_or(usize::MAX);
        let data = page.get(from..).unwrap_or(&[]);
        to_host(dma, &segs, data)?;
        Ok(Some(0))
    }

    fn set_features(&mut self, st: &mut DriveState, dma: &dyn Dma, sqe: &Sqe) -> AdminResult {
        let fid = (sqe.cdw10 & 0xFF) as u8;
        if sqe.cdw10 & (1 << 31) != 0 {
            return Err(specific::FEATURE_NOT_SAVEABLE);
        }
        let v = sqe.cdw11;
        match fid {
            feat::ARBITRATION => self.feat.arbitration = v & 0xFFFF_FF07,
            feat::POWER_MGMT => {
                if v & 0x1F != 0 {
                    return Err(generic::INVALID_FIELD); // only power state 0
                }
                self.feat.power = v & 0xFF;
            }
            feat::TEMP_THRESHOLD => {
                let (tmpsel, thsel) = ((v >> 16) & 0xF, (v >> 20) & 3);
                if tmpsel != 0 || thsel > 1 {
                    return Err(generic::INVALID_FIELD);
                }
                if thsel == 0 {
                    self.feat.temp_over = (v & 0xFFFF) as u16;
                } else {
                    self.feat.temp_under = (v & 0xFFFF) as u16;
                }
            }
            feat::ERROR_RECOVERY => {
                if v & (1 << 16) != 0 {
                    return Err(generic::INVALID_FIELD); // DULBE not supported
                }
                self.feat.error_recovery = v & 0xFFFF;
            }
            feat::VOLATILE_WC => {
                let on = v & 1 != 0;
                if on && !st.cache_present() {
                    return Err(generic::INVALID_FIELD);
                }
                st.set_vwc(on).map_err(|_| generic::INTERNAL)?;
            }
            feat::NUM_QUEUES => {
                let (nsqr, ncqr) = ((v & 0xFFFF) as u16, (v >> 16) as u16);
                if nsqr == 0xFFFF || ncqr == 0xFFFF {
                    return Err(generic::INVALID_FIELD);
                }
                if self.io_queues_exist() {
                    return Err(generic::SEQUENCE);
                }
                let max = self.max_queues().saturating_sub(1);
                self.feat.nsqa = nsqr.min(max);
                self.feat.ncqa = ncqr.min(max);
                return Ok(Some(
                    u32::from(self.feat.nsqa) | (u32::from(self.feat.ncqa) << 16),
                ));
            }
            feat::IRQ_COALESCE => self.feat.irq_coalescing = v & 0xFFFF,
            feat::ASYNC_EVENT => self.feat.async_config = v,
            feat::HOST_ID => return self.set_host_id(st, dma, sqe),
            resv::FEAT_RESV_NOTIFICATION_MASK => {
                if sqe.nsid != 1 && sqe.nsid != 0xFFFF_FFFF {
                    return Err(generic::INVALID_NS);
                }
                st.ctrl(self.cntlid).resv_mask = v & 0b1110;
            }
            resv::FEAT_RESV_PERSISTENCE => {
                if sqe.nsid != 1 && sqe.nsid != 0xFFFF_FFFF {
                    return Err(generic::INVALID_NS);
                }
                // The reservation model changes PTPL only through Reservation Register's
                // CPTPL; asking for the current state is accepted.
                if (v & 1 != 0) != st.resv.ptpl() {
                    return Err(FEATURE_NOT_CHANGEABLE);
                }
            }
            _ => return Err(generic::INVALID_FIELD),
        }
        Ok(Some(0))
    }

    /// Set Features Host Identifier: 8 bytes (EXHID = 0) or 16 (EXHID = 1) of data. Changing
    /// the identifier of a host that is a registrant is Command Sequence Error; all zero clears
    /// it.
    fn set_host_id(&mut self, st: &mut DriveState, dma: &dyn Dma, sqe: &Sqe) -> AdminResult {
        let ext = sqe.cdw11 & 1 != 0;
        let len = if ext { 16 } else { 8 };
        let segs = self.prps(dma, sqe, len)?;
        let data = from_host(dma, &segs, len)?;
        let new = if ext {
            let mut h = [0u8; 16];
            if let Some(d) = data.get(..16) {
                h.copy_from_slice(d);
            }
            HostId(h)
        } else {
            HostId::from_u64(le64(&data))
        };
        let cur = st.ctrl(self.cntlid).host;
        if cur != HostId::default() && cur != new && st.resv.registrant(cur).is_some() {
            return Err(generic::SEQUENCE);
        }
        let c = st.ctrl(self.cntlid);
        c.host = new;
        c.host_ext = ext && new != HostId::default();
        Ok(Some(0))
    }

    fn get_features(&mut self, st: &mut DriveState, dma: &dyn Dma, sqe: &Sqe) -> AdminResult {
        let fid = (sqe.cdw10 & 0xFF) as u8;
        let sel = (sqe.cdw10 >> 8) & 7;
        let known = matches!(
            fid,
            feat::ARBITRATION
                | feat::POWER_MGMT
                | feat::TEMP_THRESHOLD
                | feat::ERROR_RECOVERY
                | feat::VOLATILE_WC
                | feat::NUM_QUEUES
                | feat::IRQ_COALESCE
                | feat::ASYNC_EVENT
                | feat::HOST_ID
                | resv::FEAT_RESV_NOTIFICATION_MASK
                | resv::FEAT_RESV_PERSISTENCE
        );
        if !known || sel > 3 {
            return Err(generic::INVALID_FIELD);
        }
        let ns_specific = matches!(
            fid,
            feat::ERROR_RECOVERY | resv::FEAT_RESV_NOTIFICATION_MASK | resv::FEAT_RESV_PERSISTENCE
        );
        if ns_specific && fid != feat::ERROR_RECOVERY && sqe.nsid != 1 {
            return Err(generic::INVALID_NS);
        }
        if sel == 3 {
            // Supported capabilities: changeable (bit 2), namespace specific (bit 1).
            let changeable = fid != resv::FEAT_RESV_PERSISTENCE;
            return Ok(Some(
                (u32::from(changeable) << 2) | (u32::from(ns_specific) << 1),
            ));
        }
        let current = sel == 0;
        let f = if current {
            self.feat.clone()
        } else {
            Features::new(self.max_queues())
        };
        let v = match fid {
            feat::ARBITRATION => f.arbitration,
            feat::POWER_MGMT => f.power,
            feat::TEMP_THRESHOLD => {
                let (tmpsel, thsel) = ((sqe.cdw11 >> 16) & 0xF, (sqe.cdw11 >> 20) & 3);
                if tmpsel != 0 || thsel > 1 {
                    return Err(generic::INVALID_FIELD);
                }
                let t = if thsel == 0 {
                    f.temp_over
                } else {
                    f.temp_under
                };
                u32::from(t) | (sqe.cdw11 & 0x003F_0000)
            }
            feat::ERROR_RECOVERY => f.error_recovery,
            feat::VOLATILE_WC => u32::from(if current {
                st.caching()
            } else {
                st.cache_present()
            }),
            feat::NUM_QUEUES => u32::from(f.nsqa) | (u32::from(f.ncqa) << 16),
            feat::IRQ_COALESCE => f.irq_coalescing,
            feat::ASYNC_EVENT => f.async_config,
            feat::HOST_ID => return self.get_host_id(st, dma, sqe, current),
            resv::FEAT_RESV_NOTIFICATION_MASK => {
                if current {
                    st.ctrl(self.cntlid).resv_mask
                } else {
                    0
                }
            }
            _ => u32::from(current && st.resv.ptpl()), // Reservation Persistence
        };
        Ok(Some(v))
    }

    /// Get Features Host Identifier: the identifier in the format EXHID asks for; Host
    /// Identifier Inconsistent Format if it was set in the other format.
    fn get_host_id(
        &mut self,
        st: &mut DriveState,
        dma: &dyn Dma,
        sqe: &Sqe,
        current: bool,
    ) -> AdminResult {
        let ext = sqe.cdw11 & 1 != 0;
        let c = st.ctrl(self.cntlid);
        let (host, host_ext) = if current {
            (c.host, c.host_ext)
        } else {
            (HostId::default(), false)
        };
        if host != HostId::default() && host_ext != ext {
            return Err(generic::HOST_ID_INCONSISTENT);
        }
        let len: usize = if ext { 16 } else { 8 };
        let segs = self.prps(dma, sqe, len as u64)?;
        to_host(dma, &segs, host.0.get(..len).unwrap_or(&[]))?;
        Ok(Some(u32::from(ext)))
    }

    /// Abort: dword 0 bit 0 is 0 if the command was aborted (it completes with Command Abort
    /// Requested first), 1 if it was not found outstanding (already completed, never fetched,
    /// or unknown). Outstanding commands are the delayed I/O commands and the Asynchronous
    /// Event Requests.
    fn abort(
        &mut self,
        st: &mut DriveState,
        dma: &dyn Dma,
        sqe: &Sqe,
        p: &mut Progress,
    ) -> AdminResult {
        let sqid = (sqe.cdw10 & 0xFFFF) as u16;
        let cid = (sqe.cdw10 >> 16) as u16;
        if sqid == 0 {
            if let Some(i) = self.aers.iter().position(|&c| c == cid) {
                self.aers.remove(i);
                let c = self.completion(0, cid, generic::ABORT_REQUESTED, 0);
                self.complete(dma, c, p);
                return Ok(Some(0));
            }
            return Ok(Some(1));
        }
        let c = st.ctrl(self.cntlid);
        let Some(i) = c
            .pending
            .iter()
            .position(|x| x.sqid == sqid && x.sqe.cid == cid && x.aborted.is_none())
        else {
            return Ok(Some(1));
        };
        c.pending.remove(i);
        let comp = self.completion(sqid, cid, generic::ABORT_REQUESTED, 0);
        self.complete(dma, comp, p);
        Ok(Some(0))
    }
}

/// A version 4 UUID made from the NGUID's bytes.
fn uuid_from(nguid: [u8; 16]) -> [u8; 16] {
    let mut u = nguid;
    u[6] = (u[6] & 0x0F) | 0x40;
    u[8] = (u[8] & 0x3F) | 0x80;
    u
}

/// Commands Supported and Effects.
fn command_effects() -> Vec<u8> {
    use log::effects::{CSUPP, LBCC};
    let a = [
        admin::DELETE_IO_SQ,
        admin::CREATE_IO_SQ,
        admin::GET_LOG_PAGE,
        admin::DELETE_IO_CQ,
        admin::CREATE_IO_CQ,
        admin::IDENTIFY,
        admin::ABORT,
        admin::SET_FEATURES,
        admin::GET_FEATURES,
        admin::ASYNC_EVENT,
        admin::KEEP_ALIVE,
    ]
    .map(|o| (o, CSUPP));
    let i = [
        (io::FLUSH, CSUPP | LBCC),
        (io::WRITE, CSUPP | LBCC),
        (io::READ, CSUPP),
        (io::COMPARE, CSUPP),
        (io::WRITE_ZEROES, CSUPP | LBCC),
        (io::DSM, CSUPP | LBCC),
        (resv::opc::REGISTER, CSUPP),
        (resv::opc::REPORT, CSUPP),
        (resv::opc::ACQUIRE, CSUPP),
        (resv::opc::RELEASE, CSUPP),
    ];
    log::command_effects(&a, &i)
}
