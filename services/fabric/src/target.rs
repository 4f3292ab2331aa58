//! The target: subsystems with their namespaces and allowed hosts, the discovery subsystem, and
//! the controllers hosts have created (the dynamic controller model: one per admin Connect).
//!
//! Subsystems come from two places: the static topology duplexd hands over at start (fixed for
//! the life of the process) and the export table the metadata service publishes
//! ([`duplex_ipc::exports`]), which [`Target::apply_exports`] merges in at any time. Applying a
//! table diffs it against what is served: a new subsystem becomes connectable; a removed one
//! (or one whose serial or model number changed) has its controllers torn down; a host no
//! longer allowed has its controllers on that subsystem torn down and its next Connect refused;
//! a namespace added, removed or changed queues a Namespace Attribute Changed notice on every
//! live controller of its subsystem (see [`Controller::namespaces_changed`]). A table NQN that
//! names a static subsystem is ignored: the static topology wins.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Instant;

use duplex_ipc::exports::{ExportNamespace, ExportSubsystem, ExportTable, MAX_NSID};
use duplex_ipc::topology::{ListenerKind, SubsystemSpec, Topology};
use duplex_nvme::log::HealthCounters;
use duplex_nvme::spec::{aen, lid, DISCOVERY_NQN};
use tokio::sync::Notify;

use crate::controller::{Controller, Teardown};

/// Controller ids one node hands out: `[cntlid_base, cntlid_base + CNTLID_SPAN)`.
pub const CNTLID_SPAN: u16 = 0x4000;

/// A namespace as the fabric serves it (a copy: commands keep the one they started with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace id.
    pub nsid: u32,
    /// The datapath volume serving it (`IoDesc.volume`).
    pub volume: u32,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in logical blocks.
    pub blocks: u64,
    /// NGUID.
    pub nguid: [u8; 16],
    /// UUID.
    pub uuid: [u8; 16],
    /// ANA group.
    pub ana_group: u32,
}

impl Namespace {
    fn from_export(n: &ExportNamespace) -> Self {
        Self {
            nsid: n.nsid,
            volume: n.volume,
            block_size: n.block_size,
            blocks: n.blocks,
            nguid: n.nguid,
            uuid: n.uuid,
            ana_group: n.ana_group,
        }
    }
}

/// Who may connect to a subsystem.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Access {
    allow_any_host: bool,
    hosts: HashSet<String>,
}

/// An NVM subsystem, or the discovery subsystem.
#[derive(Debug)]
pub struct Subsystem {
    /// NQN.
    pub nqn: String,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// The discovery subsystem.
    pub discovery: bool,
    /// From the export table: its hosts and namespaces change at run time.
    pub exported: bool,
    access: RefCell<Access>,
    /// Namespaces by id (ascending); replaced whole when the export table changes them.
    namespaces: RefCell<Rc<[Namespace]>>,
}

impl Subsystem {
    /// Whether `hostnqn` may connect.
    pub fn allows(&self, hostnqn: &str) -> bool {
        let a = self.access.borrow();
        a.allow_any_host || a.hosts.contains(hostnqn)
    }

    /// The namespace `nsid`, if it is active now.
    pub fn namespace(&self, nsid: u32) -> Option<Namespace> {
        let namespaces = self.namespaces.borrow();
        namespaces
            .binary_search_by_key(&nsid, |n| n.nsid)
            .ok()
            .and_then(|i| namespaces.get(i).copied())
    }

    /// The active namespaces now, ascending by id.
    pub fn namespaces(&self) -> Rc<[Namespace]> {
        Rc::clone(&self.namespaces.borrow())
    }

    /// The largest namespace id this subsystem may ever report (Identify Controller NN): the
    /// highest one for a static subsystem, [`MAX_NSID`] for an exported one (namespaces come
    /// and go).
    pub fn max_nsid(&self) -> u32 {
        if self.exported {
            MAX_NSID
        } else {
            self.namespaces
                .borrow()
                .iter()
                .map(|n| n.nsid)
                .max()
                .unwrap_or(0)
        }
    }

    fn new(
        nqn: String,
        serial: String,
        model: String,
        access: Access,
        mut namespaces: Vec<Namespace>,
        exported: bool,
    ) -> Self {
        namespaces.sort_by_key(|n| n.nsid);
        Self {
            nqn,
            serial,
            model,
            discovery: false,
            exported,
            access: RefCell::new(access),
            namespaces: RefCell::new(namespaces.into()),
        }
    }

    fn from_spec(s: &SubsystemSpec, topo: &Topology) -> Self {
        let namespaces = s
            .namespaces
            .iter()
            .filter_map(|n| {
                let v = topo.volume(n.volume)?;
                Some(Namespace {
                    nsid: n.nsid,
                    volume: v.id,
                    block_size: v.block_size,
                    blocks: v.blocks,
                    nguid: n.nguid,
                    uuid: n.uuid,
                    ana_group: topo.ana_group,
                })
            })
            .collect();
        let access = Access {
            allow_any_host: s.allow_any_host,
            hosts: s.hosts.iter().cloned().collect(),
        };
        Self::new(
            s.nqn.clone(),
            s.serial.clone(),
            s.model.clone(),
            access,
            namespaces,
            false,
        )
    }

    fn from_export(e: &ExportSubsystem) -> Self {
        Self::new(
            e.nqn.clone(),
            e.serial.clone(),
            e.model.clone(),
            export_access(e),
            e.namespaces.iter().map(Namespace::from_export).collect(),
            true,
        )
    }
}

fn export_access(e: &ExportSubsystem) -> Access {
    Access {
        allow_any_host: e.allow_any_host,
        hosts: e.hosts.iter().cloned().collect(),
    }
}

/// The namespace ids that differ between two sorted lists: added, removed, or with any
/// attribute changed.
fn changed_nsids(old: &[Namespace], new: &[Namespace]) -> Vec<u32> {
    let old_by_id: HashMap<u32, &Namespace> = old.iter().map(|n| (n.nsid, n)).collect();
    let new_ids: HashSet<u32> = new.iter().map(|n| n.nsid).collect();
    let mut out: Vec<u32> = new
        .iter()
        .filter(|n| old_by_id.get(&n.nsid) != Some(n))
        .map(|n| n.nsid)
        .chain(
            old.iter()
                .map(|n| n.nsid)
                .filter(|id| !new_ids.contains(id)),
        )
        .collect();
    out.sort_unstable();
    out
}

/// What applying an export table changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportsChange {
    /// The table's generation.
    pub generation: u64,
    /// False if this generation was already applied (nothing was done).
    pub applied: bool,
    /// Subsystems that became connectable.
    pub added: Vec<String>,
    /// Subsystems that went away (their controllers torn down).
    pub removed: Vec<String>,
    /// Table subsystems ignored because the static topology has a subsystem of that NQN.
    pub ignored: Vec<String>,
    /// Namespaces added, removed or changed, over all subsystems.
    pub namespaces: usize,
    /// Controllers torn down because their host is no longer allowed.
    pub denied: usize,
}
/// A listening port as the discovery log reports it.
#[derive(Clone, Debug)]
pub struct Port {
    /// Port id (1-based, in listener order).
    pub id: u16,
    /// IP address.
    pub addr: std::net::SocketAddr,
    /// What it serves.
    pub kind: ListenerKind,
}

/// Everything one fabric process serves.
#[derive(Debug)]
pub struct Target {
    /// Topology as handed over.
    pub topology: Topology,
    /// NVM subsystems: the static topology's, then the export table's.
    subsystems: RefCell<Vec<Rc<Subsystem>>>,
    /// The discovery subsystem.
    pub discovery: Rc<Subsystem>,
    /// Listening ports.
    pub ports: Vec<Port>,
    controllers: RefCell<HashMap<u16, Rc<Controller>>>,
    next_cntlid: Cell<u16>,
    /// When this incarnation started (SMART power-on hours).
    pub started: Instant,
    /// Discovery log generation counter.
    pub discovery_genctr: Cell<u64>,
    /// Wakes everything on shutdown.
    pub shutdown: Notify,
    stats: Cell<HealthCounters>,
    ana_changes: Cell<u64>,
    /// Generation of the export table applied last (0: none).
    exports_generation: Cell<u64>,
}

impl Target {
    /// Builds the target from the topology and the bound listener addresses.
    pub fn new(topology: Topology, ports: Vec<Port>) -> Self {
        let subsystems = topology
            .subsystems
            .iter()
            .map(|s| Rc::new(Subsystem::from_spec(s, &topology)))
            .collect();
        let discovery = Rc::new(Subsystem {
            nqn: DISCOVERY_NQN.to_owned(),
            serial: format!("duplex-{}", topology.node),
            model: "duplex discovery".to_owned(),
            discovery: true,
            exported: false,
            access: RefCell::new(Access {
                allow_any_host: true,
                hosts: HashSet::new(),
            }),
            namespaces: RefCell::new(Rc::from(Vec::new())),
        });
        let base = topology.cntlid_base.max(1);
        Self {
            topology,
            subsystems: RefCell::new(subsystems),
            discovery,
            ports,
            controllers: RefCell::new(HashMap::new()),
            next_cntlid: Cell::new(base),
            started: Instant::now(),
            discovery_genctr: Cell::new(1),
            shutdown: Notify::new(),
            stats: Cell::new(HealthCounters::default()),
            ana_changes: Cell::new(1),
            exports_generation: Cell::new(0),
        }
    }

    /// The NVM subsystems served now (static ones first).
    pub fn subsystems(&self) -> Vec<Rc<Subsystem>> {
        self.subsystems.borrow().clone()
    }

    /// Generation of the export table applied last (0: none yet).
    pub fn exports_generation(&self) -> u64 {
        self.exports_generation.get()
    }

    /// Merges export table `table` into what is served (see the module docs). Does nothing
    /// for the generation applied last.
    pub fn apply_exports(&self, table: &ExportTable) -> ExportsChange {
        let mut change = ExportsChange {
            generation: table.generation,
            ..ExportsChange::default()
        };
        if table.generation == self.exports_generation.get() {
            return change;
        }
        change.applied = true;
        let old = self.subsystems();
        let statics: HashSet<&str> = old
            .iter()
            .filter(|s| !s.exported)
            .map(|s| s.nqn.as_str())
            .collect();
        let mut wanted: HashMap<&str, &ExportSubsystem> = HashMap::new();
        for e in &table.subsystems {
            if statics.contains(e.nqn.as_str()) {
                change.ignored.push(e.nqn.clone());
            } else {
                wanted.insert(e.nqn.as_str(), e);
            }
        }
        let mut next = Vec::with_capacity(old.len());
        let mut kept = HashSet::new();
        let mut discovery_changed = false;
        let mut ns_changed = false;
        for s in old {
            if !s.exported {
                next.push(s);
                continue;
            }
            match wanted.get(s.nqn.as_str()) {
                Some(e) if e.serial == s.serial && e.model == s.model => {
                    let (access, namespaces) = self.update(&s, e, &mut change);
                    discovery_changed |= access;
                    ns_changed |= namespaces;
                    kept.insert(s.nqn.clone());
                    next.push(s);
                }
                _ => {
                    for c in self.controllers_of(&s) {
                        c.tear_down(Teardown::Removed);
                    }
                    change.removed.push(s.nqn.clone());
                    discovery_changed = true;
                    ns_changed = true;
                }
            }
        }
        for e in &table.subsystems {
            if wanted.contains_key(e.nqn.as_str()) && !kept.contains(&e.nqn) {
                next.push(Rc::new(Subsystem::from_export(e)));
                change.added.push(e.nqn.clone());
                discovery_changed = true;
                ns_changed = true;
            }
        }
        *self.subsystems.borrow_mut() = next;
        if ns_changed {
            // ANA group descriptors list the namespaces: their membership changed.
            self.ana_changes.set(self.ana_changes.get().wrapping_add(1));
        }
        if discovery_changed {
            self.discovery_genctr
                .set(self.discovery_genctr.get().wrapping_add(1).max(1));
            for c in self.controllers_of(&self.discovery) {
                c.raise_notice(
                    aen::NOTICE_DISC_CHANGE,
                    lid::DISCOVERY,
                    aen::CFG_DISC_CHANGE,
                );
            }
        }
        self.exports_generation.set(table.generation);
        change
    }

    /// Brings exported subsystem `s` to `e` (same identity): its hosts, then its namespaces.
    /// Returns whether the hosts and whether the namespaces changed.
    fn update(
        &self,
        s: &Rc<Subsystem>,
        e: &ExportSubsystem,
        change: &mut ExportsChange,
    ) -> (bool, bool) {
        let access = export_access(e);
        let access_changed = *s.access.borrow() != access;
        if access_changed {
            *s.access.borrow_mut() = access;
            for c in self.controllers_of(s) {
                if !s.allows(&c.hostnqn) && c.alive() {
                    tracing::info!(
                        cntlid = c.cntlid,
                        host = %c.hostnqn,
                        subsystem = %s.nqn,
                        "host no longer allowed: tearing its controller down"
                    );
                    c.tear_down(Teardown::Denied);
                    change.denied += 1;
                }
            }
        }
        let mut namespaces: Vec<Namespace> =
            e.namespaces.iter().map(Namespace::from_export).collect();
        namespaces.sort_by_key(|n| n.nsid);
        let changed = changed_nsids(&s.namespaces(), &namespaces);
        if !changed.is_empty() {
            *s.namespaces.borrow_mut() = namespaces.into();
            change.namespaces += changed.len();
            for c in self.controllers_of(s) {
                if c.alive() {
                    c.namespaces_changed(&changed);
                }
            }
        }
        (access_changed, !changed.is_empty())
    }

    /// The controllers of subsystem `s`.
    pub fn controllers_of(&self, s: &Rc<Subsystem>) -> Vec<Rc<Controller>> {
        self.controllers
            .borrow()
            .values()
            .filter(|c| Rc::ptr_eq(&c.subsys, s))
            .cloned()
            .collect()
    }

    /// SMART / health counters (this incarnation's).
    pub fn health(&self) -> HealthCounters {
        let mut h = self.stats.get();
        h.power_on_hours = self.started.elapsed().as_secs() / 3600;
        h
    }

    /// Counts a completed read of `bytes`.
    pub fn record_read(&self, bytes: u64) {
        let mut h = self.stats.get();
        h.reads += 1;
        h.bytes_read += bytes;
        self.stats.set(h);
    }

    /// Counts a completed write of `bytes`.
    pub fn record_write(&self, bytes: u64) {
        let mut h = self.stats.get();
        h.writes += 1;
        h.bytes_written += bytes;
        self.stats.set(h);
    }

    /// Counts a media error.
    pub fn record_media_error(&self) {
        let mut h = self.stats.get();
        h.media_errors += 1;
        self.stats.set(h);
    }

    /// ANA change count (grows with every ANA state change).
    pub fn ana_change_count(&self) -> u64 {
        self.ana_changes.get()
    }

    /// The subsystem called `nqn` reachable through a port of `kind`.
    pub fn subsystem(&self, nqn: &str, kind: ListenerKind) -> Option<Rc<Subsystem>> {
        if nqn == DISCOVERY_NQN {
            return Some(self.discovery.clone());
        }
        if kind == ListenerKind::Discovery {
            return None;
        }
        self.subsystems
            .borrow()
            .iter()
            .find(|s| s.nqn == nqn)
            .cloned()
    }

    /// Picks a free controller id, or `None` when the node's range is exhausted.
    pub fn alloc_cntlid(&self) -> Option<u16> {
        let base = self.topology.cntlid_base.max(1);
        let ctrls = self.controllers.borrow();
        for _ in 0..CNTLID_SPAN {
            let id = self.next_cntlid.get();
            let next = if id >= base.saturating_add(CNTLID_SPAN - 1) {
                base
            } else {
                id + 1
            };
            self.next_cntlid.set(next);
            if !ctrls.contains_key(&id) && id < 0xFFF0 {
                return Some(id);
            }
        }
        None
    }

    /// Registers a new controller.
    pub fn add_controller(&self, c: Rc<Controller>) {
        self.controllers.borrow_mut().insert(c.cntlid, c);
    }

    /// The controller `cntlid`.
    pub fn controller(&self, cntlid: u16) -> Option<Rc<Controller>> {
        self.controllers.borrow().get(&cntlid).cloned()
    }

    /// Forgets a controller (its admin queue went away).
    pub fn remove_controller(&self, cntlid: u16) {
        self.controllers.borrow_mut().remove(&cntlid);
    }

    /// Number of live controllers.
    pub fn controller_count(&self) -> usize {
        self.controllers.borrow().len()
    }
}
