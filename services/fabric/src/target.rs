//! The target: subsystems with their namespaces and allowed hosts, the discovery subsystem, and
//! the controllers hosts have created (the dynamic controller model: one per admin Connect).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

use duplex_ipc::topology::{ListenerKind, SubsystemSpec, Topology, VolumeSpec};
use duplex_nvme::log::HealthCounters;
use duplex_nvme::spec::DISCOVERY_NQN;
use tokio::sync::Notify;

use crate::controller::Controller;

/// Controller ids one node hands out: `[cntlid_base, cntlid_base + CNTLID_SPAN)`.
pub const CNTLID_SPAN: u16 = 0x4000;

/// A namespace as the fabric serves it.
#[derive(Clone, Debug)]
pub struct Namespace {
    /// Namespace id.
    pub nsid: u32,
    /// The volume behind it.
    pub volume: VolumeSpec,
    /// NGUID.
    pub nguid: [u8; 16],
    /// UUID.
    pub uuid: [u8; 16],
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
    /// Any host may connect.
    pub allow_any_host: bool,
    /// Allowed host NQNs.
    pub hosts: Vec<String>,
    /// Namespaces by id (ascending).
    pub namespaces: Vec<Namespace>,
    /// The discovery subsystem.
    pub discovery: bool,
}

impl Subsystem {
    /// Whether `hostnqn` may connect.
    pub fn allows(&self, hostnqn: &str) -> bool {
        self.allow_any_host || self.hosts.iter().any(|h| h == hostnqn)
    }

    /// The namespace `nsid`.
    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }

    fn from_spec(s: &SubsystemSpec, topo: &Topology) -> Self {
        let mut namespaces: Vec<Namespace> = s
            .namespaces
            .iter()
            .filter_map(|n| {
                Some(Namespace {
                    nsid: n.nsid,
                    volume: topo.volume(n.volume)?.clone(),
                    nguid: n.nguid,
                    uuid: n.uuid,
                })
            })
            .collect();
        namespaces.sort_by_key(|n| n.nsid);
        Self {
            nqn: s.nqn.clone(),
            serial: s.serial.clone(),
            model: s.model.clone(),
            allow_any_host: s.allow_any_host,
            hosts: s.hosts.clone(),
            namespaces,
            discovery: false,
        }
    }
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
    /// NVM subsystems.
    pub subsystems: Vec<Rc<Subsystem>>,
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
            allow_any_host: true,
            hosts: Vec::new(),
            namespaces: Vec::new(),
            discovery: true,
        });
        let base = topology.cntlid_base.max(1);
        Self {
            topology,
            subsystems,
            discovery,
            ports,
            controllers: RefCell::new(HashMap::new()),
            next_cntlid: Cell::new(base),
            started: Instant::now(),
            discovery_genctr: Cell::new(1),
            shutdown: Notify::new(),
            stats: Cell::new(HealthCounters::default()),
            ana_changes: Cell::new(1),
        }
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
        self.subsystems.iter().find(|s| s.nqn == nqn).cloned()
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
