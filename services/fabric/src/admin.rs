//! Admin commands of I/O and discovery controllers (after Connect, with CC.EN set).

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use duplex_ipc::exports::MAX_ANA_GROUP;
use duplex_ipc::topology::ListenerKind;
use duplex_nvme::cmd::{GetLogPage, Sqe};
use duplex_nvme::identify::{self, ControllerInfo, ControllerType, NamespaceInfo};
use duplex_nvme::log::{self, effects, AnaGroup, DiscoveryEntry};
use duplex_nvme::spec::{admin, aen, cns, feat, io, lid};
use duplex_nvme::status::{generic, specific};

use crate::command::{DataIn, Reply, IN_CAPSULE_DATA, MAX_TRANSFER, MDTS};
use crate::controller::{Controller, AER_LIMIT, KAS, MAX_IO_QUEUES, QUEUE_ENTRIES, VERSION};
use crate::queue::Queue;
use crate::target::Target;

/// Firmware revision reported (the crate version).
pub const FIRMWARE: &str = env!("CARGO_PKG_VERSION");
/// ANA transition time (seconds).
pub const ANATT: u8 = 10;

/// Executes one admin command.
pub async fn execute(q: &Rc<Queue>, ctrl: &Arc<Controller>, sqe: Sqe, data: DataIn) -> Reply {
    // Commands with data from the host are not among ours: drain it to keep the stream sane.
    if !matches!(data, DataIn::None) {
        if let Err(s) = q.host_data(sqe.cid, data).await {
            return Reply::status(s);
        }
    }
    match sqe.opcode {
        admin::IDENTIFY => identify(q, ctrl, &sqe),
        admin::GET_LOG_PAGE => get_log_page(q, ctrl, &sqe),
        admin::SET_FEATURES
            if (sqe.cdw10 & 0xFF) as u8 == duplex_nvme::resv::FEAT_RESV_PERSISTENCE =>
        {
            set_persistence(q, ctrl, &sqe).await
        }
        admin::SET_FEATURES => set_features(ctrl, &sqe),
        admin::GET_FEATURES => get_features(q, ctrl, &sqe),
        admin::ASYNC_EVENT => async_event(ctrl).await,
        admin::KEEP_ALIVE => Reply::ok(0),
        // Abort: "command not aborted" (bit 0 set); commands here finish on their own.
        admin::ABORT => Reply::ok(1),
        _ => Reply::status(generic::INVALID_OPCODE),
    }
}

/// Identify Controller content for `ctrl`. OAES reports Namespace Attribute Notices (bit 8)
/// and ANA Change Notices (bit 11) on I/O controllers, Discovery Log Page Change Notices
/// (bit 31) on discovery controllers. ANAGRPMAX (and NANAGRPID) bound every ANA group id the
/// subsystem may use: [`MAX_ANA_GROUP`] for an exported subsystem, the node's group otherwise.
pub fn controller_info(target: &Target, ctrl: &Controller) -> ControllerInfo {
    let s = &ctrl.subsys;
    let io = !s.discovery;
    let ana_groups = if s.exported {
        MAX_ANA_GROUP.max(target.topology.ana_group)
    } else {
        target.topology.ana_group.max(1)
    };
    ControllerInfo {
        vendor_id: 0,
        serial: s.serial.clone(),
        model: s.model.clone(),
        firmware: FIRMWARE.to_owned(),
        ieee_oui: [0; 3],
        cntlid: ctrl.cntlid,
        version: VERSION,
        cntrltype: if io {
            ControllerType::Io
        } else {
            ControllerType::Discovery
        },
        mdts: MDTS,
        oaes: if io {
            identify::OAES_NS_ATTR | identify::OAES_ANA_CHANGE
        } else {
            identify::OAES_DISC_CHANGE
        },
        acl: 3,
        aerl: (AER_LIMIT - 1) as u8,
        elpe: 0,
        kas: KAS,
        anatt: if io { ANATT } else { 0 },
        ana_groups,
        nn: s.max_nsid(),
        maxcmd: QUEUE_ENTRIES,
        oncs: if io {
            let resv = if reservations(target, ctrl) {
                identify::ONCS_RESERVATIONS
            } else {
                0
            };
            identify::ONCS_COMPARE | identify::ONCS_DSM | identify::ONCS_WRITE_ZEROES | resv
        } else {
            0
        },
        vwc: io,
        subnqn: s.nqn.clone(),
        ioccsz: 64 + IN_CAPSULE_DATA as u32,
        iorcsz: 16,
        multi_controller: io,
    }
}

/// Whether `ctrl`'s namespaces take reservation commands: exported ones (their state is kept
/// with their pool) on a node with a reservation channel.
fn reservations(target: &Target, ctrl: &Controller) -> bool {
    ctrl.subsys.exported && target.resv_client().is_some()
}

fn identify(q: &Queue, ctrl: &Controller, sqe: &Sqe) -> Reply {
    let cns = (sqe.cdw10 & 0xFF) as u8;
    let s = &ctrl.subsys;
    let ns = || s.namespace(sqe.nsid);
    match cns {
        cns::CONTROLLER => Reply::data(identify::controller(&controller_info(
            &q.shared.target,
            ctrl,
        ))),
        cns::NAMESPACE if !s.discovery => match ns() {
            Some(n) => Reply::data(identify::namespace(&NamespaceInfo {
                blocks: n.blocks,
                used: n.blocks,
                block_size: n.block_size,
                ana_group: n.ana_group,
                nguid: n.nguid,
                shared: true,
                rescap: if reservations(&q.shared.target, ctrl) {
                    duplex_nvme::resv::RESCAP
                } else {
                    0
                },
            })),
            None => Reply::status(generic::INVALID_NS),
        },
        cns::ACTIVE_NS_LIST if !s.discovery => {
            if sqe.nsid >= 0xFFFF_FFFE {
                return Reply::status(generic::INVALID_NS);
            }
            Reply::data(identify::active_ns_list(
                s.namespaces().iter().map(|n| n.nsid),
                sqe.nsid,
            ))
        }
        cns::NS_DESC_LIST if !s.discovery => match ns() {
            Some(n) => Reply::data(identify::ns_descriptors(&n.nguid, &n.uuid)),
            None => Reply::status(generic::INVALID_NS),
        },
        // I/O command set specific Identify for the NVM command set (CSI 0): no limits to
        // report (all fields zero); other command sets are not supported.
        0x06 if (sqe.cdw11 >> 24) == 0 => Reply::data(vec![0; identify::IDENTIFY_LEN]),
        0x05 if !s.discovery && (sqe.cdw11 >> 24) == 0 => match ns() {
            Some(_) => Reply::data(vec![0; identify::IDENTIFY_LEN]),
            None => Reply::status(generic::INVALID_NS),
        },
        _ => Reply::status(generic::INVALID_FIELD),
    }
}

fn get_log_page(q: &Queue, ctrl: &Controller, sqe: &Sqe) -> Reply {
    let g = GetLogPage::from_sqe(sqe);
    let len = match usize::try_from(g.len) {
        Ok(n) if n <= MAX_TRANSFER => n,
        _ => return Reply::status(generic::INVALID_FIELD),
    };
    let target = &q.shared.target;
    let s = &ctrl.subsys;
    let page = match (g.lid, s.discovery) {
        (lid::DISCOVERY, true) => log::discovery(
            target.discovery_genctr.load(Ordering::Relaxed),
            &discovery_entries(q, ctrl),
        ),
        (lid::ERROR, _) => log::error_info(1),
        (lid::SMART, false) => log::smart(&target.health()),
        (lid::FW_SLOT, false) => log::firmware_slot(FIRMWARE),
        (lid::CHANGED_NS, false) => log::changed_ns_list(&ctrl.changed_namespaces()),
        (lid::CMD_EFFECTS, false) => log::command_effects(
            &[
                admin::GET_LOG_PAGE,
                admin::IDENTIFY,
                admin::ABORT,
                admin::SET_FEATURES,
                admin::GET_FEATURES,
                admin::ASYNC_EVENT,
                admin::KEEP_ALIVE,
            ]
            .map(|op| (op, effects::CSUPP)),
            &[
                (io::FLUSH, effects::CSUPP),
                (io::WRITE, effects::CSUPP | effects::LBCC),
                (io::READ, effects::CSUPP),
                (io::COMPARE, effects::CSUPP),
                (io::WRITE_ZEROES, effects::CSUPP | effects::LBCC),
                (io::DSM, effects::CSUPP | effects::LBCC),
                (duplex_nvme::resv::opc::REGISTER, effects::CSUPP),
                (duplex_nvme::resv::opc::REPORT, effects::CSUPP),
                (duplex_nvme::resv::opc::ACQUIRE, effects::CSUPP),
                (duplex_nvme::resv::opc::RELEASE, effects::CSUPP),
            ],
        ),
        // Each read takes a page off the queue: only a read of the page from its start
        // takes one (a read the window refuses, or of its tail, must not lose a page).
        (duplex_nvme::resv::LID_RESERVATION_NOTIFICATION, false) => {
            if g.offset != 0 {
                return Reply::status(generic::INVALID_FIELD);
            }
            ctrl.take_reservation_log_page(g.rae)
        }
        (lid::ANA, false) => {
            let namespaces = s.namespaces();
            let mut ids: Vec<u32> = namespaces.iter().map(|n| n.ana_group).collect();
            // A subsystem without namespaces still reports the node's group (as hosts read
            // the log before any namespace exists).
            if ids.is_empty() {
                ids.push(target.topology.ana_group);
            }
            ids.sort_unstable();
            ids.dedup();
            let groups: Vec<AnaGroup> = ids
                .into_iter()
                .map(|id| AnaGroup {
                    id,
                    state: target.ana_state(s, id) as u8,
                    nsids: namespaces
                        .iter()
                        .filter(|n| n.ana_group == id)
                        .map(|n| n.nsid)
                        .collect(),
                })
                .collect();
            log::ana(target.ana_change_count(), &groups, g.lsp & 1 != 0)
        }
        _ => return Reply::status(specific::INVALID_LOG_PAGE),
    };
    let Some(data) = log::window(&page, g.offset, len) else {
        return Reply::status(generic::INVALID_FIELD);
    };
    // What reading a log page clears, now that the read succeeded. The Changed Namespace List
    // lists what changed since it was last read (whatever RAE says: RAE is about the event),
    // counted as read once a read reaches its end; RAE cleared unmasks the page's notices.
    let notice = match g.lid {
        lid::CHANGED_NS => {
            if g.offset.saturating_add(g.len) >= page.len() as u64 {
                ctrl.clear_changed_namespaces();
            }
            aen::CFG_NS_ATTR
        }
        lid::ANA => aen::CFG_ANA_CHANGE,
        lid::DISCOVERY => aen::CFG_DISC_CHANGE,
        _ => 0,
    };
    if !g.rae && notice != 0 {
        ctrl.clear_notice(notice);
    }
    Reply::data(data)
}

/// The discovery log as `ctrl`'s host may see it: every subsystem that allows the host, at
/// every I/O port, plus this discovery subsystem at every port.
fn discovery_entries(q: &Queue, ctrl: &Controller) -> Vec<DiscoveryEntry> {
    let target = &q.shared.target;
    let addr_of = |p: &crate::subsystem::Port| {
        // A port bound to the wildcard address reports the address this host reached.
        let ip = if p.addr.ip().is_unspecified() {
            q.local.ip()
        } else {
            p.addr.ip()
        };
        (ip.to_string(), p.addr.port().to_string(), ip.is_ipv6())
    };
    let mut out = Vec::new();
    for s in target.subsystems() {
        if !s.allows(&ctrl.hostnqn) {
            continue;
        }
        for p in target.ports.iter().filter(|p| p.kind == ListenerKind::Nvme) {
            let (traddr, trsvcid, ipv6) = addr_of(p);
            out.push(DiscoveryEntry {
                subtype: log::subtype::NVME,
                port_id: p.id,
                traddr,
                trsvcid,
                ipv6,
                subnqn: s.nqn.clone(),
                tls: p.tls,
            });
        }
    }
    for p in &target.ports {
        let (traddr, trsvcid, ipv6) = addr_of(p);
        out.push(DiscoveryEntry {
            subtype: log::subtype::CURRENT_DISCOVERY,
            port_id: p.id,
            traddr,
            trsvcid,
            ipv6,
            subnqn: target.discovery.nqn.clone(),
            tls: p.tls,
        });
    }
    out
}

fn set_features(ctrl: &Controller, sqe: &Sqe) -> Reply {
    if sqe.cdw10 & (1 << 31) != 0 {
        return Reply::status(specific::FEATURE_NOT_SAVEABLE);
    }
    let fid = (sqe.cdw10 & 0xFF) as u8;
    let v = sqe.cdw11;
    match fid {
        feat::NUM_QUEUES if !ctrl.subsys.discovery => {
            let (nsqr, ncqr) = (v & 0xFFFF, v >> 16);
            if nsqr == 0xFFFF || ncqr == 0xFFFF {
                return Reply::status(generic::INVALID_FIELD);
            }
            let want = (nsqr.min(ncqr) + 1).min(u32::from(MAX_IO_QUEUES)) as u16;
            ctrl.io_queues.set(want);
            let granted = u32::from(want - 1);
            Reply::ok(granted | granted << 16)
        }
        feat::ASYNC_EVENT => {
            ctrl.aec.store(v, Ordering::Relaxed);
            Reply::ok(0)
        }
        feat::KATO => {
            let ms = u64::from(v).div_ceil(1000) * 1000;
            ctrl.kato.set(std::time::Duration::from_millis(ms));
            ctrl.touch();
            Reply::ok(0)
        }
        feat::VOLATILE_WC if !ctrl.subsys.discovery => {
            ctrl.wce.store(v & 1 != 0, Ordering::Relaxed);
            Reply::ok(0)
        }
        duplex_nvme::resv::FEAT_RESV_NOTIFICATION_MASK if ctrl.subsys.exported => {
            if sqe.nsid == 0xFFFF_FFFF {
                for n in ctrl.subsys.namespaces().iter() {
                    ctrl.set_reservation_mask(n.nsid, v);
                }
                return Reply::ok(0);
            }
            match ctrl.subsys.namespace(sqe.nsid) {
                Some(n) => {
                    ctrl.set_reservation_mask(n.nsid, v);
                    Reply::ok(0)
                }
                None => Reply::status(generic::INVALID_NS),
            }
        }
        _ => Reply::status(generic::INVALID_FIELD),
    }
}

/// Set Features Reservation Persistence (83h): the namespace's PTPL, kept with its
/// reservation state on the drives (a round trip to the metadata service).
async fn set_persistence(q: &Rc<Queue>, ctrl: &Arc<Controller>, sqe: &Sqe) -> Reply {
    if !reservations(&q.shared.target, ctrl) {
        return Reply::status(generic::INVALID_FIELD);
    }
    let Some(ns) = ctrl.subsys.namespace(sqe.nsid) else {
        return Reply::status(generic::INVALID_NS);
    };
    // Saving (SV) is how PTPL is kept anyway: accepted either way.
    let ptpl = sqe.cdw11 & 1 != 0;
    crate::resv::change(q, ctrl, &ns, duplex_ipc::resv::ResvCommand::SetPtpl(ptpl))
        .await
        .into()
}

fn get_features(q: &Queue, ctrl: &Controller, sqe: &Sqe) -> Reply {
    let fid = (sqe.cdw10 & 0xFF) as u8;
    let sel = (sqe.cdw10 >> 8) & 7;
    if matches!(
        fid,
        duplex_nvme::resv::FEAT_RESV_NOTIFICATION_MASK | duplex_nvme::resv::FEAT_RESV_PERSISTENCE
    ) {
        return reservation_feature(q, ctrl, sqe, fid, sel);
    }
    let changeable = matches!(
        fid,
        feat::NUM_QUEUES | feat::ASYNC_EVENT | feat::KATO | feat::VOLATILE_WC
    );
    if sel == 3 {
        // Supported capabilities: changeable (bit 2), never saveable.
        return Reply::ok(if changeable { 1 << 2 } else { 0 });
    }
    let io = !ctrl.subsys.discovery;
    let value = match fid {
        feat::NUM_QUEUES if io => {
            let n = u32::from(ctrl.io_queues.get().max(1) - 1);
            n | n << 16
        }
        feat::ASYNC_EVENT => ctrl.aec.load(Ordering::Relaxed),
        feat::KATO => ctrl.kato.get().as_millis() as u32,
        feat::VOLATILE_WC if io => u32::from(ctrl.wce.load(Ordering::Relaxed)),
        feat::ARBITRATION
        | feat::POWER_MGMT
        | feat::ERROR_RECOVERY
        | feat::IRQ_COALESCE
        | feat::WRITE_ATOMICITY
            if io =>
        {
            0
        }
        feat::TEMP_THRESHOLD if io => 0x157,
        _ => return Reply::status(generic::INVALID_FIELD),
    };
    Reply::ok(value)
}

/// Get Features of the per-namespace reservation features: the Notification Mask (82h, this
/// controller's) and Persistence (83h, the namespace's PTPL).
fn reservation_feature(q: &Queue, ctrl: &Controller, sqe: &Sqe, fid: u8, sel: u32) -> Reply {
    if !reservations(&q.shared.target, ctrl) {
        return Reply::status(generic::INVALID_FIELD);
    }
    if sel == 3 {
        // Changeable, per namespace (bit 1); 83h also saveable (it is kept on the drives).
        let saveable = u32::from(fid == duplex_nvme::resv::FEAT_RESV_PERSISTENCE);
        return Reply::ok(1 << 2 | 1 << 1 | saveable);
    }
    let Some(ns) = ctrl.subsys.namespace(sqe.nsid) else {
        return Reply::status(generic::INVALID_NS);
    };
    if fid == duplex_nvme::resv::FEAT_RESV_NOTIFICATION_MASK {
        // Default (sel 1) is no type masked.
        return Reply::ok(if sel == 1 {
            0
        } else {
            ctrl.reservation_mask(ns.nsid)
        });
    }
    let ptpl = if sel == 1 {
        false
    } else {
        crate::resv::model_of(q, &ns).ptpl()
    };
    Reply::ok(u32::from(ptpl))
}

async fn async_event(ctrl: &Arc<Controller>) -> Reply {
    if ctrl
        .aers
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < AER_LIMIT).then_some(n + 1)
        })
        .is_err()
    {
        return Reply::status(specific::AER_LIMIT);
    }
    struct Outstanding<'a>(&'a Controller);
    impl Drop for Outstanding<'_> {
        fn drop(&mut self) {
            self.0.aers.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _guard = Outstanding(ctrl);
    let dw0 = ctrl.next_event().await;
    tracing::info!(cntlid = ctrl.cntlid, dw0, "asynchronous event completed");
    Reply::ok(dw0)
}
