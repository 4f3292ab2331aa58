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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use duplex_ipc::exports::{AnaState, ExportSubsystem, ExportTable};
use duplex_ipc::metrics::{Counter, Gauge, Metric, Metrics};
use duplex_ipc::topology::{ListenerKind, Topology};
use duplex_nvme::log::HealthCounters;
use duplex_nvme::spec::{aen, lid, DISCOVERY_NQN};
use tokio::sync::Notify;

use crate::cells::{Locked, SyncCell};
use crate::controller::{Controller, Teardown};
use crate::subsystem::{export_access, Namespace, Port, Subsystem};

/// Controller ids one node hands out: `[cntlid_base, cntlid_base + CNTLID_SPAN)`.
pub const CNTLID_SPAN: u16 = 0x4000;

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
    /// ANA groups in the table, if any group's state changed (0: none changed).
    pub ana_groups: usize,
}
/// Everything one fabric process serves.
#[derive(Debug)]
pub struct Target {
    /// Topology as handed over.
    pub topology: Topology,
    /// NVM subsystems: the static topology's, then the export table's.
    subsystems: Locked<Vec<Arc<Subsystem>>>,
    /// The discovery subsystem.
    pub discovery: Arc<Subsystem>,
    /// Listening ports.
    pub ports: Vec<Port>,
    controllers: Locked<HashMap<u16, Arc<Controller>>>,
    next_cntlid: SyncCell<u16>,
    /// When this incarnation started (SMART power-on hours).
    pub started: Instant,
    /// Discovery log generation counter.
    pub discovery_genctr: AtomicU64,
    /// Wakes everything on shutdown.
    pub shutdown: Notify,
    /// Host I/O counted by the thread that completed it (a line of its own per thread).
    io_counters: [IoCounters; COUNTER_SLOTS],
    ana_changes: AtomicU64,
    /// The ANA state of each group of the exported subsystems (from the export table).
    ana: Locked<HashMap<u32, AnaState>>,
    /// The datapath reported this node fenced: nothing is accessible here any more.
    fenced: AtomicBool,
    /// Generation of the export table applied last (0: none).
    exports_generation: AtomicU64,
    /// The reservation state of the exported namespaces that have one, by NGUID (from the
    /// export table: the metadata service keeps it with the pool on the drives).
    reservations: Locked<HashMap<[u8; 16], (u64, duplex_nvme::resv::Reservations)>>,
    /// Whether `reservations` has any entry (the I/O fast path looks here first).
    any_reservations: AtomicBool,
    /// The reservation channel to the metadata service (none: reservation changes are
    /// refused).
    resv_client: OnceLock<Arc<crate::resv_channel::ResvClient>>,
    /// Where events for the node's journal go (duplexd, through the lifecycle channel).
    event_sink: OnceLock<Sink>,
    /// Events hosts can cause (connects, refusals) are sent at most this often: a flood of
    /// connects must not fill the lifecycle channel (its sends block the runtime).
    event_limit: Locked<duplex_ipc::control::RateLimiter>,
    /// The node's metrics region for this service (none: the node keeps no metrics).
    metrics: OnceLock<Metrics>,
    /// The ANA state gauges, by (port id, group): one per state.
    ana_gauges: Locked<AnaGauges>,
    /// Whether "metrics region full" was said already.
    metrics_full_said: AtomicBool,
    /// Connects and refusals, by subsystem or reason.
    host_counters: Locked<HashMap<(bool, String), Counter>>,
    /// The array's secrets key (hosts' DH-HMAC-CHAP secrets are sealed with it).
    secrets_key: OnceLock<duplex_ondisk::secrets::SecretsKey>,
    /// The TLS side of TLS listeners (set up before the sandbox).
    tls: OnceLock<crate::tls::TlsServer>,
    /// The next DH-HMAC-CHAP challenge's sequence number (never 0).
    auth_seq: AtomicU32,
    /// Live connections, over every I/O thread.
    connections: AtomicUsize,
}

/// Slots of per-thread I/O counters (a thread beyond them shares one, by index).
const COUNTER_SLOTS: usize = 8;

/// One thread's count of host I/O, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
struct IoCounters {
    reads: AtomicU64,
    bytes_read: AtomicU64,
    writes: AtomicU64,
    bytes_written: AtomicU64,
    media_errors: AtomicU64,
}

/// Connections one fabric process serves at most, over all its I/O threads.
pub const MAX_CONNECTIONS: usize = 1024;

/// A connection counted against [`MAX_CONNECTIONS`] until it drops.
#[derive(Debug)]
pub struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The ANA state gauges of each (port id, group): one per state.
type AnaGauges = HashMap<(u16, u32), Vec<(AnaState, Gauge)>>;

/// Connect and refusal counters kept at most (a host cannot make the region fill up).
const MAX_HOST_COUNTERS: usize = 256;

/// Sends an event (level, kind, message) to the node's journal.
pub type EventSink = Box<dyn Fn(duplex_ipc::control::EventLevel, &str, &str) + Send + Sync>;

struct Sink(EventSink);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}

impl Target {
    /// Builds the target from the topology and the bound listener addresses.
    pub fn new(topology: Topology, ports: Vec<Port>) -> Self {
        let subsystems = topology
            .subsystems
            .iter()
            .map(|s| Arc::new(Subsystem::from_spec(s, &topology)))
            .collect();
        let discovery = Arc::new(Subsystem::discovery(format!("duplex-{}", topology.node)));
        let base = topology.cntlid_base.max(1);
        Self {
            topology,
            subsystems: Locked::new(subsystems),
            discovery,
            ports,
            controllers: Locked::new(HashMap::new()),
            next_cntlid: SyncCell::new(base),
            started: Instant::now(),
            discovery_genctr: AtomicU64::new(1),
            shutdown: Notify::new(),
            io_counters: std::array::from_fn(|_| IoCounters::default()),
            ana_changes: AtomicU64::new(1),
            ana: Locked::new(HashMap::new()),
            fenced: AtomicBool::new(false),
            exports_generation: AtomicU64::new(0),
            reservations: Locked::new(HashMap::new()),
            any_reservations: AtomicBool::new(false),
            resv_client: OnceLock::new(),
            metrics: OnceLock::new(),
            ana_gauges: Locked::new(HashMap::new()),
            metrics_full_said: AtomicBool::new(false),
            host_counters: Locked::new(HashMap::new()),
            secrets_key: OnceLock::new(),
            tls: OnceLock::new(),
            auth_seq: AtomicU32::new({
                let mut b = [0u8; 4];
                // A random start (a fixed one would repeat across restarts); 1 without one.
                let _ = getrandom::fill(&mut b);
                u32::from_le_bytes(b).max(1)
            }),
            connections: AtomicUsize::new(0),
            event_sink: OnceLock::new(),
            event_limit: Locked::new(duplex_ipc::control::RateLimiter::new(
                5,
                std::time::Duration::from_secs(1),
            )),
        }
    }

    /// A host-caused event (a connect, a refusal), rate limited: what is over the rate is
    /// counted and said with the next one sent.
    pub fn host_event(&self, level: duplex_ipc::control::EventLevel, kind: &str, message: &str) {
        let allowed = self.event_limit.lock().check(std::time::Instant::now());
        if let Some(suppressed) = allowed {
            if suppressed > 0 {
                self.event(
                    level,
                    kind,
                    &format!("{message} ({suppressed} earlier host events not recorded)"),
                );
            } else {
                self.event(level, kind, message);
            }
        }
    }

    /// Where events go from now on.
    pub fn set_event_sink(&self, sink: EventSink) {
        if self.event_sink.set(Sink(sink)).is_err() {
            tracing::warn!("an event sink was set already: the first one stays");
        }
    }

    /// An event for the node's journal (dropped without a sink; duplexd rate-limits).
    pub fn event(&self, level: duplex_ipc::control::EventLevel, kind: &str, message: &str) {
        if let Some(sink) = self.event_sink.get() {
            (sink.0)(level, kind, message);
        }
    }

    /// Gives the target its end of the reservation channel.
    pub fn set_resv_client(&self, client: crate::resv_channel::ResvClient) {
        if self.resv_client.set(Arc::new(client)).is_err() {
            tracing::warn!("a reservation channel was set already: the first one stays");
        }
    }

    /// The reservation channel, if there is one.
    pub fn resv_client(&self) -> Option<Arc<crate::resv_channel::ResvClient>> {
        self.resv_client.get().cloned()
    }

    /// The NVM subsystems served now (static ones first).
    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.subsystems.lock().clone()
    }

    /// Generation of the export table applied last (0: none yet).
    pub fn exports_generation(&self) -> u64 {
        self.exports_generation.load(Ordering::Acquire)
    }

    /// Merges export table `table` into what is served (see the module docs). Does nothing
    /// for the generation applied last.
    pub fn apply_exports(&self, table: &ExportTable) -> ExportsChange {
        let mut change = ExportsChange {
            generation: table.generation,
            ..ExportsChange::default()
        };
        if table.generation == self.exports_generation.load(Ordering::Acquire) {
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
                next.push(Arc::new(Subsystem::from_export(e)));
                change.added.push(e.nqn.clone());
                discovery_changed = true;
                ns_changed = true;
            }
        }
        *self.subsystems.lock() = next;
        // Before any notice goes out: a host acting on one meets the new state.
        self.apply_reservations(table);
        let ana: HashMap<u32, AnaState> = table.ana.iter().map(|g| (g.group, g.state)).collect();
        let ana_changed = *self.ana.lock() != ana;
        if ana_changed {
            for g in &table.ana {
                let was = self.ana.lock().get(&g.group).copied();
                if was != Some(g.state) {
                    tracing::info!(
                        group = g.group,
                        from = was.map_or("none", AnaState::name),
                        to = g.state.name(),
                        "ANA state changed"
                    );
                    if was.is_some() {
                        self.event(
                            duplex_ipc::control::EventLevel::Info,
                            "ana-changed",
                            &format!(
                                "ANA group {} on this node's ports: {} -> {}",
                                g.group,
                                was.map_or("none", AnaState::name),
                                g.state.name()
                            ),
                        );
                    }
                }
            }
            *self.ana.lock() = ana;
            change.ana_groups = table.ana.len();
        }
        if ana_changed || ns_changed {
            self.publish_ana_metrics();
        }
        if ns_changed || ana_changed {
            // ANA group descriptors list the namespaces and their state: either changed.
            self.ana_changes.fetch_add(1, Ordering::Relaxed);
        }
        if ana_changed {
            // Every host of an exported subsystem hears of it (an ANA change notice, which it
            // answers by reading the ANA log page).
            for s in self.subsystems().iter().filter(|s| s.exported) {
                for c in self.controllers_of(s) {
                    if c.alive() {
                        c.raise_notice(aen::NOTICE_ANA_CHANGE, lid::ANA, aen::CFG_ANA_CHANGE);
                    }
                }
            }
        }
        if discovery_changed {
            let _ = self
                .discovery_genctr
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |g| {
                    Some(g.wrapping_add(1).max(1))
                });
            for c in self.controllers_of(&self.discovery) {
                c.raise_notice(
                    aen::NOTICE_DISC_CHANGE,
                    lid::DISCOVERY,
                    aen::CFG_DISC_CHANGE,
                );
            }
        }
        self.exports_generation
            .store(table.generation, Ordering::Release);
        change
    }

    /// Takes the table's reservation states: every namespace's as published (the table is
    /// the whole truth; a namespace it names none for has none). A state the model cannot be
    /// in is logged and the namespace keeps the one it had (never silently opened up).
    fn apply_reservations(&self, table: &ExportTable) {
        let mut next = HashMap::new();
        let mut old = self.reservations.lock();
        for r in &table.reservations {
            let state = kept_state(&r.registrants, r.rtype, r.holder, r.generation, r.ptpl);
            // A newer state taken from a change's answer stays until the table catches up.
            if let Some(kept) = old.get(&r.nguid).filter(|(v, _)| *v > r.version) {
                next.insert(r.nguid, kept.clone());
                continue;
            }
            match duplex_nvme::resv::Reservations::from_state(&state) {
                Ok(m) => {
                    next.insert(r.nguid, (r.version, m));
                }
                Err(e) => {
                    tracing::error!(error = %e, version = r.version, "a namespace's published reservation state is not one it can be in: keeping the one it had");
                    if let Some(kept) = old.get(&r.nguid) {
                        next.insert(r.nguid, kept.clone());
                    }
                }
            }
        }
        self.any_reservations
            .store(!next.is_empty(), Ordering::Release);
        *old = next;
    }

    /// The reservation conflict I/O command `opcode` from host `host` meets on namespace
    /// `nguid`, if any (namespaces without reservation state: none).
    pub fn reservation_conflict(
        &self,
        nguid: &[u8; 16],
        host: [u8; 16],
        opcode: u8,
    ) -> Option<duplex_nvme::status::Status> {
        self.reservations
            .lock()
            .get(nguid)
            .and_then(|(_, r)| r.check_io(duplex_nvme::resv::HostId(host), opcode).err())
    }

    /// The reservation model of namespace `nguid` as this fabric has it.
    pub fn reservation(&self, nguid: &[u8; 16]) -> Option<duplex_nvme::resv::Reservations> {
        self.reservations.lock().get(nguid).map(|(_, r)| r.clone())
    }

    /// Takes the state a change's answer carries (the metadata service committed it), unless
    /// the namespace already has a newer one.
    pub fn take_reservation(&self, nguid: [u8; 16], s: &duplex_ipc::resv::ResvStateMsg) {
        let state = kept_state(&s.registrants, s.rtype, s.holder, s.generation, s.ptpl);
        match duplex_nvme::resv::Reservations::from_state(&state) {
            Ok(m) => {
                let mut all = self.reservations.lock();
                if all.get(&nguid).is_some_and(|(v, _)| *v >= s.version) {
                    return;
                }
                all.insert(nguid, (s.version, m));
                self.any_reservations.store(true, Ordering::Release);
            }
            Err(e) => {
                tracing::error!(error = %e, version = s.version, "the metadata service answered with a reservation state the model cannot be in: not taken");
            }
        }
    }

    /// Raises a reservation notice of `kind` for namespace `nsid` of subsystem `s` on every
    /// controller of host `host_id` there.
    pub fn reservation_notice(&self, s: &Arc<Subsystem>, nsid: u32, host_id: [u8; 16], kind: u8) {
        for c in self.controllers_of(s) {
            if c.hostid == host_id {
                c.reservation_notice(nsid, kind);
            }
        }
    }

    /// Whether any namespace has reservation state (the I/O fast path checks only then).
    pub fn has_reservations(&self) -> bool {
        self.any_reservations.load(Ordering::Acquire)
    }

    /// Brings exported subsystem `s` to `e` (same identity): its hosts, then its namespaces.
    /// Returns whether the hosts and whether the namespaces changed.
    fn update(
        &self,
        s: &Arc<Subsystem>,
        e: &ExportSubsystem,
        change: &mut ExportsChange,
    ) -> (bool, bool) {
        let access = export_access(e);
        let access_changed = s.set_access(access);
        if access_changed {
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
        let changed =
            s.replace_namespaces(e.namespaces.iter().map(Namespace::from_export).collect());
        if !changed.is_empty() {
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
    pub fn controllers_of(&self, s: &Arc<Subsystem>) -> Vec<Arc<Controller>> {
        self.controllers
            .lock()
            .values()
            .filter(|c| Arc::ptr_eq(&c.subsys, s))
            .cloned()
            .collect()
    }

    /// SMART / health counters (this incarnation's, over every I/O thread).
    pub fn health(&self) -> HealthCounters {
        let mut h = HealthCounters {
            power_on_hours: self.started.elapsed().as_secs() / 3600,
            ..HealthCounters::default()
        };
        for c in &self.io_counters {
            let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
            h.reads += n(&c.reads);
            h.bytes_read += n(&c.bytes_read);
            h.writes += n(&c.writes);
            h.bytes_written += n(&c.bytes_written);
            h.media_errors += n(&c.media_errors);
        }
        h
    }

    fn io_counters(&self, thread: usize) -> &IoCounters {
        &self.io_counters[thread % COUNTER_SLOTS]
    }

    /// Counts a read of `bytes` completed on I/O thread `thread`.
    pub fn record_read(&self, thread: usize, bytes: u64) {
        let c = self.io_counters(thread);
        c.reads.fetch_add(1, Ordering::Relaxed);
        c.bytes_read.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts a write of `bytes` completed on I/O thread `thread`.
    pub fn record_write(&self, thread: usize, bytes: u64) {
        let c = self.io_counters(thread);
        c.writes.fetch_add(1, Ordering::Relaxed);
        c.bytes_written.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts a media error met on I/O thread `thread`.
    pub fn record_media_error(&self, thread: usize) {
        self.io_counters(thread)
            .media_errors
            .fetch_add(1, Ordering::Relaxed);
    }

    /// ANA change count (grows with every ANA state change).
    pub fn ana_change_count(&self) -> u64 {
        self.ana_changes.load(Ordering::Relaxed)
    }

    /// Serves TLS listeners with `server`.
    pub fn set_tls(&self, server: crate::tls::TlsServer) {
        let _ = self.tls.set(server);
    }

    /// The TLS side, when this node has TLS listeners.
    pub fn tls(&self) -> Option<&crate::tls::TlsServer> {
        self.tls.get()
    }

    /// Unseals hosts' secrets with `key` from now on.
    pub fn set_secrets_key(&self, key: duplex_ondisk::secrets::SecretsKey) {
        let _ = self.secrets_key.set(key);
    }

    /// The array's secrets key, when this node has one.
    pub fn secrets_key(&self) -> Option<&duplex_ondisk::secrets::SecretsKey> {
        self.secrets_key.get()
    }

    /// A sequence number for a DH-HMAC-CHAP challenge: never 0, never the same twice running.
    pub fn next_auth_seq(&self) -> u32 {
        self.auth_seq
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.wrapping_add(1).max(1))
            })
            .unwrap_or(1)
    }

    /// Keeps metrics in `m` from now on (the node exposes them).
    pub fn set_metrics(&self, m: Metrics) {
        m.start_writing();
        if self.metrics.set(m).is_ok() {
            self.publish_ana_metrics();
        }
    }

    /// The metrics region, when the node keeps metrics.
    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.get()
    }

    /// Says once that the metrics region is full (what does not fit is not counted).
    pub fn metrics_full(&self, e: &duplex_ipc::metrics::MetricsError) {
        if !self.metrics_full_said.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "metrics not kept for some series");
        }
    }

    /// Counts a host's connection (`refused`: its reason; else its subsystem).
    pub fn count_host(&self, refused: bool, what: &str) {
        let Some(m) = self.metrics() else {
            return;
        };
        let key = (refused, what.to_owned());
        let mut counters = self.host_counters.lock();
        if let Some(c) = counters.get(&key) {
            c.inc();
            return;
        }
        if counters.len() >= MAX_HOST_COUNTERS {
            return;
        }
        let made = if refused {
            m.counter(Metric::HostRefusals, &[("reason", what)])
        } else {
            m.counter(Metric::HostConnects, &[("subsystem", what)])
        };
        match made {
            Ok(c) => {
                c.inc();
                counters.insert(key, c);
            }
            Err(e) => self.metrics_full(&e),
        }
    }

    /// Sets the ANA gauges: each group of the exported subsystems on each I/O port, one series
    /// per state, 1 for the state it is in.
    fn publish_ana_metrics(&self) {
        let Some(m) = self.metrics() else {
            return;
        };
        let mut groups: Vec<u32> = self.ana.lock().keys().copied().collect();
        for sub in self.subsystems().iter().filter(|s| !s.exported) {
            groups.extend(sub.namespaces().iter().map(|n| n.ana_group));
        }
        groups.sort_unstable();
        groups.dedup();
        let mut gauges = self.ana_gauges.lock();
        gauges.retain(|(_, g), list| {
            let keep = groups.contains(g);
            if !keep {
                list.iter().for_each(|(_, gauge)| gauge.remove());
            }
            keep
        });
        for port in self
            .ports
            .iter()
            .filter(|p| p.kind != ListenerKind::Discovery)
        {
            for &group in &groups {
                let state = if self.fenced.load(Ordering::Acquire) {
                    AnaState::Inaccessible
                } else {
                    self.ana
                        .lock()
                        .get(&group)
                        .copied()
                        .unwrap_or(AnaState::Optimized)
                };
                let list = gauges.entry((port.id, group)).or_insert_with(|| {
                    let addr = port.addr.to_string();
                    let g = group.to_string();
                    AnaState::ALL
                        .iter()
                        .filter_map(|&st| {
                            m.gauge(
                                Metric::AnaState,
                                &[("port", &addr), ("group", &g), ("state", st.name())],
                            )
                            .map_err(|e| self.metrics_full(&e))
                            .ok()
                            .map(|gauge| (st, gauge))
                        })
                        .collect()
                });
                for (st, gauge) in list.iter() {
                    gauge.set(u64::from(*st == state));
                }
            }
        }
    }

    /// The ANA state of group `group` of subsystem `s` on this node's ports. The static
    /// topology's subsystems are always optimized (one node serves them); an exported one's
    /// group is what the export table says, and inaccessible if it says nothing (it always
    /// does: a table is refused otherwise).
    pub fn ana_state(&self, s: &Subsystem, group: u32) -> AnaState {
        if self.fenced.load(Ordering::Acquire) {
            return AnaState::Inaccessible;
        }
        if !s.exported {
            return AnaState::Optimized;
        }
        self.ana
            .lock()
            .get(&group)
            .copied()
            .unwrap_or(AnaState::Inaccessible)
    }

    /// The datapath completed a request as fenced (the peer preempted this node's reservation
    /// key): every group of every subsystem is inaccessible on this node's ports from now on
    /// (until the process restarts), and every host hears of it (ANA change notice).
    pub fn set_fenced(&self) {
        if self.fenced.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!("the datapath is fenced: every ANA group is inaccessible on this node");
        self.ana_changes.fetch_add(1, Ordering::Relaxed);
        self.publish_ana_metrics();
        for s in self.subsystems() {
            for c in self.controllers_of(&s) {
                if c.alive() {
                    c.raise_notice(aen::NOTICE_ANA_CHANGE, lid::ANA, aen::CFG_ANA_CHANGE);
                }
            }
        }
    }

    /// The subsystem called `nqn` reachable through a port of `kind`.
    pub fn subsystem(&self, nqn: &str, kind: ListenerKind) -> Option<Arc<Subsystem>> {
        if nqn == DISCOVERY_NQN {
            return Some(self.discovery.clone());
        }
        if kind == ListenerKind::Discovery {
            return None;
        }
        self.subsystems
            .lock()
            .iter()
            .find(|s| s.nqn == nqn)
            .cloned()
    }

    /// Picks a free controller id, or `None` when the node's range is exhausted.
    pub fn alloc_cntlid(&self) -> Option<u16> {
        let base = self.topology.cntlid_base.max(1);
        let ctrls = self.controllers.lock();
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
    pub fn add_controller(&self, c: Arc<Controller>) {
        self.controllers.lock().insert(c.cntlid, c);
    }

    /// The controller `cntlid`.
    pub fn controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.controllers.lock().get(&cntlid).cloned()
    }

    /// Forgets a controller (its admin queue went away).
    pub fn remove_controller(&self, cntlid: u16) {
        self.controllers.lock().remove(&cntlid);
    }

    /// Counts a new connection, or `None` when [`MAX_CONNECTIONS`] are live already.
    pub fn count_connection(&self) -> Option<Counted<'_>> {
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| Counted(&self.connections))
    }

    /// Live connections, over every I/O thread.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Number of live controllers.
    pub fn controller_count(&self) -> usize {
        self.controllers.lock().len()
    }
}

/// The model's state of a namespace as the export table or a change's answer carries it.
fn kept_state(
    registrants: &[duplex_ipc::exports::ExportRegistrant],
    rtype: u8,
    holder: [u8; 16],
    generation: u32,
    ptpl: bool,
) -> duplex_nvme::resv::ResvState {
    duplex_nvme::resv::ResvState::from_kept(
        registrants.iter().map(|g| (g.host_id, g.cntlid, g.key)),
        rtype,
        holder,
        generation,
        ptpl,
    )
}
