//! One NVMe controller: created by an admin-queue Connect, alive until its admin queue goes or
//! its keep-alive timer expires. Holds the controller properties (CC, CSTS), features, the
//! asynchronous event queue and the keep-alive timer.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_nvme::spec::{aen, lid, prop};
use tokio::sync::{watch, Notify};

use crate::cells::{Locked, SyncCell};
use crate::subsystem::Subsystem;

/// Maximum queue entries supported (CAP.MQES + 1).
pub const QUEUE_ENTRIES: u16 = 128;
/// Most I/O queues one controller may have.
pub const MAX_IO_QUEUES: u16 = 16;
/// Asynchronous Event Requests a controller keeps outstanding (AERL + 1).
pub const AER_LIMIT: usize = 4;
/// Keep-alive granularity reported in KAS (100 ms units).
pub const KAS: u16 = 10;

/// CAP: MQES, CQR (contiguous queues required), TO = 10 s, CSS = NVM command set, MPSMIN =
/// MPSMAX = 4 KiB.
pub const CAP: u64 = (QUEUE_ENTRIES as u64 - 1) | 1 << 16 | 20 << 24 | 1 << 37;
/// VS: NVMe 1.4.
pub const VERSION: u32 = 0x0001_0400;

/// Why a controller went away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Teardown {
    /// Still alive.
    Alive,
    /// Its admin queue disconnected.
    AdminGone,
    /// Its keep-alive timer expired.
    KeepAliveExpired,
    /// The fabric is shutting down.
    Shutdown,
    /// Its subsystem left the export table.
    Removed,
    /// Its host is no longer allowed on its subsystem.
    Denied,
}

/// The keep-alive clock's grain: host traffic is noted at most this often (nanoseconds).
const TOUCH_GRAIN_NS: u64 = 1_000_000;

/// Most entries of the Changed Namespace List log page; past that it reports FFFFFFFFh.
pub const CHANGED_NS_ENTRIES: usize = 1024;

/// A controller. Its admin queue and its I/O queues may be served by different fabric threads:
/// what changes is behind atomics or locks, and what changes together (CC with CSTS; the event
/// queue with the masks and the logs that feed it) behind one lock.
#[derive(Debug)]
pub struct Controller {
    /// Controller id.
    pub cntlid: u16,
    /// Its subsystem.
    pub subsys: Arc<Subsystem>,
    /// Host NQN of the Connect that created it.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Keep-alive timeout (0: disabled).
    pub kato: SyncCell<Duration>,
    /// CC and CSTS.
    regs: Locked<(u32, u32)>,
    /// I/O queues granted by Set Features Number of Queues.
    pub io_queues: SyncCell<u16>,
    /// Connected I/O queue ids.
    pub connected: Locked<HashSet<u16>>,
    /// Asynchronous Event Configuration.
    pub aec: AtomicU32,
    /// Volatile write cache enabled.
    pub wce: AtomicBool,
    /// Outstanding Asynchronous Event Requests.
    pub aers: AtomicUsize,
    events: Locked<Events>,
    event_ready: Notify,
    /// When the controller was made: `last_traffic` counts from it.
    born: Instant,
    /// Nanoseconds from `born` to the host's last traffic.
    last_traffic: AtomicU64,
    teardown: watch::Sender<Teardown>,
    /// Reservation Notification Mask (feature 82h) by namespace: bit `type` set, not reported.
    resv_mask: Locked<std::collections::HashMap<u32, u32>>,
}

/// The asynchronous events of a controller and what decides them.
#[derive(Debug, Default)]
struct Events {
    /// Queued completions (dword 0) for the host's Asynchronous Event Requests.
    queue: VecDeque<u32>,
    /// Notice classes (their Asynchronous Event Configuration bits) reported and not yet
    /// cleared by the host reading their log page with RAE cleared: masked meanwhile.
    masked: u32,
    /// Namespaces changed since the host last read the Changed Namespace List, ascending; one
    /// more than [`CHANGED_NS_ENTRIES`] means "more than fit".
    changed_ns: Vec<u32>,
    /// Reservation Notification log pages not yet read: (log page count, type, nsid).
    resv_log: VecDeque<(u64, u8, u32)>,
    /// The last log page count given (wraps, skipping 0).
    resv_count: u64,
    /// A Reservation Log Page Available event was sent and the host has not read the page.
    resv_event_out: bool,
}

/// Most Reservation Notification log pages kept per controller; older ones are dropped (the
/// log page count tells the host some were lost).
pub const RESV_LOG_PAGES: usize = 255;

impl Controller {
    /// A new, disabled controller.
    pub fn new(
        cntlid: u16,
        subsys: Arc<Subsystem>,
        hostnqn: String,
        hostid: [u8; 16],
        kato: Duration,
    ) -> Self {
        Self {
            cntlid,
            subsys,
            hostnqn,
            hostid,
            kato: SyncCell::new(kato),
            regs: Locked::new((0, 0)),
            io_queues: SyncCell::new(0),
            connected: Locked::new(HashSet::new()),
            aec: AtomicU32::new(0),
            wce: AtomicBool::new(true),
            aers: AtomicUsize::new(0),
            events: Locked::default(),
            event_ready: Notify::new(),
            born: Instant::now(),
            last_traffic: AtomicU64::new(0),
            teardown: watch::channel(Teardown::Alive).0,
            resv_mask: Locked::new(std::collections::HashMap::new()),
        }
    }

    /// Whether CSTS.RDY is set (the host enabled the controller).
    pub fn ready(&self) -> bool {
        self.regs.lock().1 & prop::CSTS_RDY != 0
    }

    /// Property Get: `(value, known)`.
    pub fn property(&self, offset: u32) -> Option<u64> {
        Some(match offset {
            prop::CAP => CAP,
            prop::VS => u64::from(VERSION),
            prop::CC => u64::from(self.regs.lock().0),
            prop::CSTS => u64::from(self.regs.lock().1),
            _ => return None,
        })
    }

    /// Property Set. Returns false for an offset that cannot be written.
    pub fn set_property(&self, offset: u32, value: u64) -> bool {
        match offset {
            prop::CC => {
                let new = value as u32;
                let mut regs = self.regs.lock();
                let old = regs.0;
                let mut csts = regs.1;
                if new & prop::CC_EN != 0 && old & prop::CC_EN == 0 {
                    csts |= prop::CSTS_RDY;
                } else if new & prop::CC_EN == 0 && old & prop::CC_EN != 0 {
                    // A controller reset: not ready, shutdown status cleared.
                    csts &= !(prop::CSTS_RDY | prop::CSTS_SHST_COMPLETE);
                }
                if new & prop::CC_SHN_MASK != 0 {
                    csts |= prop::CSTS_SHST_COMPLETE;
                }
                *regs = (new, csts);
                drop(regs);
                tracing::debug!(
                    cntlid = self.cntlid,
                    cc = new,
                    csts,
                    "controller configuration"
                );
                true
            }
            // NSSR (subsystem reset) and the read-only properties.
            _ => false,
        }
    }

    /// Notes host traffic (resets the keep-alive timer: traffic-based keep alive).
    pub fn touch(&self) {
        // Written at most once a millisecond (keep-alive counts in seconds): the queues of one
        // controller on several threads then mostly read this line instead of fighting for it.
        let nanos = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if nanos
            > self
                .last_traffic
                .load(Ordering::Relaxed)
                .saturating_add(TOUCH_GRAIN_NS)
        {
            self.last_traffic.fetch_max(nanos, Ordering::Relaxed);
        }
    }

    /// Time since the host was last heard from.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_nanos(self.last_traffic.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }

    /// Tears the controller down: every queue of it closes.
    pub fn tear_down(&self, why: Teardown) {
        self.regs.lock().1 |= prop::CSTS_CFS;
        self.teardown.send_if_modified(|t| {
            if *t == Teardown::Alive {
                *t = why;
                true
            } else {
                false
            }
        });
    }

    /// Whether the controller has not been torn down.
    pub fn alive(&self) -> bool {
        *self.teardown.borrow() == Teardown::Alive
    }

    /// A receiver that sees the teardown.
    pub fn watch(&self) -> watch::Receiver<Teardown> {
        self.teardown.subscribe()
    }

    /// Queues an asynchronous event (completion dword 0) if its class is enabled.
    pub fn raise_event(&self, dword0: u32, enabled_by: u32) {
        if self.aec.load(Ordering::Relaxed) & enabled_by == 0 {
            return;
        }
        self.events.lock().queue.push_back(dword0);
        self.event_ready.notify_one();
    }

    /// Queues a notice (event type 2h) with `info` and `log_page` if its class, the
    /// Asynchronous Event Configuration bit `enabled_by`, is enabled and not masked; masks the
    /// class until the host reads `log_page` with RAE cleared ([`Controller::clear_notice`]).
    /// Returns whether it was queued.
    pub fn raise_notice(&self, info: u32, log_page: u8, enabled_by: u32) -> bool {
        if self.aec.load(Ordering::Relaxed) & enabled_by == 0 {
            return false;
        }
        {
            let mut ev = self.events.lock();
            if ev.masked & enabled_by != 0 {
                return false;
            }
            ev.masked |= enabled_by;
            ev.queue
                .push_back(aen::dword0(aen::TYPE_NOTICE, info, log_page));
        }
        self.event_ready.notify_one();
        true
    }

    /// The host read the log page of notice class `enabled_by` with RAE cleared: the class is
    /// reported again.
    pub fn clear_notice(&self, enabled_by: u32) {
        self.events.lock().masked &= !enabled_by;
    }

    /// Namespaces `nsids` were added, removed or changed: they join the Changed Namespace List
    /// (whether or not the event is enabled: the log page is not) and a Namespace Attribute
    /// Changed notice is raised (if enabled and not masked).
    pub fn namespaces_changed(&self, nsids: &[u32]) {
        {
            let mut ev = self.events.lock();
            let list = &mut ev.changed_ns;
            for &id in nsids {
                if list.len() > CHANGED_NS_ENTRIES {
                    break;
                }
                if let Err(at) = list.binary_search(&id) {
                    list.insert(at, id);
                }
            }
        }
        if self.raise_notice(aen::NOTICE_NS_CHANGED, lid::CHANGED_NS, aen::CFG_NS_ATTR) {
            tracing::debug!(
                cntlid = self.cntlid,
                ?nsids,
                "namespace attribute changed notice queued"
            );
        }
    }

    /// The Changed Namespace List as it stands (ascending ids; longer than
    /// [`CHANGED_NS_ENTRIES`] when more changed than fit).
    pub fn changed_namespaces(&self) -> Vec<u32> {
        self.events.lock().changed_ns.clone()
    }

    /// The host read the Changed Namespace List: it starts afresh.
    pub fn clear_changed_namespaces(&self) {
        self.events.lock().changed_ns.clear();
    }

    /// A reservation notice of log page type `kind` for namespace `nsid`: queued on the
    /// Reservation Notification log (unless the namespace's mask hides the type), and a
    /// Reservation Log Page Available event sent if none is outstanding.
    pub fn reservation_notice(&self, nsid: u32, kind: u8) {
        let mask = self.reservation_mask(nsid);
        if kind == 0 || kind > 7 || mask & (1 << kind) != 0 {
            return;
        }
        let mut ev = self.events.lock();
        let mut count = ev.resv_count.wrapping_add(1);
        if count == 0 {
            count = 1;
        }
        ev.resv_count = count;
        if ev.resv_log.len() >= RESV_LOG_PAGES {
            ev.resv_log.pop_front();
        }
        ev.resv_log.push_back((count, kind, nsid));
        if !ev.resv_event_out {
            ev.resv_event_out = true;
            ev.queue.push_back(aen::dword0(
                duplex_nvme::resv::AEN_TYPE_IO_SPECIFIC,
                duplex_nvme::resv::AEN_INFO_RESERVATION_LOG,
                duplex_nvme::resv::LID_RESERVATION_NOTIFICATION,
            ));
            drop(ev);
            self.event_ready.notify_one();
        }
    }

    /// The next Reservation Notification log page (64 bytes), taken off the log; an empty
    /// page when none is queued. `rae` cleared: the next notice sends an event again.
    pub fn take_reservation_log_page(&self, rae: bool) -> Vec<u8> {
        let (entry, left) = {
            let mut ev = self.events.lock();
            let e = ev.resv_log.pop_front();
            if !rae {
                ev.resv_event_out = false;
            }
            (e, ev.resv_log.len())
        };
        let available = u8::try_from(left).unwrap_or(u8::MAX);
        let page = match entry {
            Some((count, kind, nsid)) => {
                duplex_nvme::resv::notification_log_page(count, notice_kind(kind), available, nsid)
            }
            None => duplex_nvme::resv::notification_log_page(0, None, 0, 0),
        };
        page.to_vec()
    }

    /// Sets the Reservation Notification Mask of namespace `nsid` (bits 1..=3).
    pub fn set_reservation_mask(&self, nsid: u32, mask: u32) {
        self.resv_mask.lock().insert(nsid, mask & 0b1110);
    }

    /// The Reservation Notification Mask of namespace `nsid`.
    pub fn reservation_mask(&self, nsid: u32) -> u32 {
        self.resv_mask.lock().get(&nsid).copied().unwrap_or(0)
    }

    /// Waits for the next asynchronous event.
    pub async fn next_event(&self) -> u32 {
        loop {
            // Armed before the queue is looked at: an event queued in between still wakes us.
            let ready = self.event_ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some(e) = self.events.lock().queue.pop_front() {
                return e;
            }
            ready.await;
        }
    }
}

fn notice_kind(kind: u8) -> Option<duplex_nvme::resv::NoticeKind> {
    use duplex_nvme::resv::NoticeKind;
    Some(match kind {
        1 => NoticeKind::RegistrationPreempted,
        2 => NoticeKind::ReservationReleased,
        3 => NoticeKind::ReservationPreempted,
        _ => return None,
    })
}

/// Watches a controller's keep-alive timer; tears it down when the host was silent for longer
/// than KATO. Ends when the controller is torn down for any reason.
pub async fn keep_alive_watchdog(ctrl: Arc<Controller>) {
    let mut watch = ctrl.watch();
    loop {
        let kato = ctrl.kato.get();
        let period = if kato.is_zero() {
            Duration::from_secs(1)
        } else {
            kato / 4
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = watch.changed() => return,
        }
        if *watch.borrow() != Teardown::Alive {
            return;
        }
        let kato = ctrl.kato.get();
        if !kato.is_zero() && ctrl.idle() > kato {
            tracing::warn!(
                cntlid = ctrl.cntlid,
                host = %ctrl.hostnqn,
                kato_ms = kato.as_millis() as u64,
                "keep alive timeout expired: tearing the controller down"
            );
            ctrl.tear_down(Teardown::KeepAliveExpired);
            return;
        }
    }
}
