//! The cluster service process: one per node, sandboxed (policy `cluster`), restartable.
//!
//! Resources: the topology (its `cluster` part: array name, node id, boot number, the peer's
//! interconnect address, beat interval and dead time) and the interconnect listener
//! (`listener:NAME` of the `[[listener]]` whose service is `cluster`), bound by duplexd, so a
//! restarted service listens on the same port at once.
//!
//! One thread (a tokio current-thread runtime): a dialler connects to the peer's listener and
//! sends a beat every beat interval, reconnecting after a failure; every accepted connection is
//! read for the peer's beats, each fed to the [`Membership`] model; a ticker re-evaluates the
//! model, beats the supervisor's health region and logs each change of the peer's state. A
//! connection that sends something that is not a valid message of this array from the peer
//! is closed (rate-limited warning).
//!
//! What is not here yet (issue 15): the disk heartbeat (so the model runs without it: a silent
//! link is never a death), ownership and epochs, fencing and takeover, and the status channel
//! for `duplexctl cluster status`.

use duplex_ipc::metrics::{Counter, Gauge, Metric, Metrics, METRICS_RESOURCE};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use duplex_ipc::cluster::{ClusterRegion, FenceOutcome, CLUSTER_RESOURCE};
use duplex_ipc::control::RateLimiter;
use duplex_ipc::lifecycle::{self, Health, Started};
use duplex_ipc::topology::{ClusterSpec, Topology, TOPOLOGY_RESOURCE};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::membership::{Membership, PeerState, Transition};
use crate::wire::{read_frame, Body, Message, NodeState};

/// The service's name (its `[[service]]` and sandbox policy).
pub const SERVICE: &str = "cluster";
/// Accepted interconnect connections read at once; more are closed at once (only the peer
/// has a reason to connect, and it keeps one).
pub const MAX_ACCEPTED: usize = 8;

fn take(started: &mut Started, name: &str) -> anyhow::Result<OwnedFd> {
    started
        .take(name)
        .map(|h| h.fd)
        .ok_or_else(|| anyhow!("duplexd did not hand over `{name}`"))
}

/// Runs the service; `enter` puts the seccomp policy on once every resource is taken.
pub fn run(enter: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut started = lifecycle::start(SERVICE, Duration::from_secs(10))?;
    let health = started.health()?;
    let topology = Topology::from_memfd(take(&mut started, TOPOLOGY_RESOURCE)?)?;
    let spec = topology
        .cluster
        .clone()
        .ok_or_else(|| anyhow!("the node config has no [cluster] with a peer"))?;
    let region = match started.take(CLUSTER_RESOURCE) {
        Some(h) => Some(ClusterRegion::attach(h.fd).context("the cluster state region")?),
        None => {
            tracing::warn!("no cluster state region: no disk heartbeat, so no takeover");
            None
        }
    };
    let metrics = match started.take(METRICS_RESOURCE) {
        Some(h) => match Metrics::attach(h.fd).map(ClusterMetrics::new) {
            Ok(Ok(m)) => Some(m),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "metrics not kept");
                None
            }
            Err(e) => return Err(e).context("the metrics region"),
        },
        None => None,
    };
    let listener = match &spec.listener {
        Some(r) => {
            let l = std::net::TcpListener::from(take(&mut started, r)?);
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    // The runtime's epoll instance and eventfd are made before the sandbox forbids them.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    enter()?;
    let started = Arc::new(started);
    started.ready()?;
    let stop = lifecycle::spawn_stop_flag(Arc::clone(&started))?;
    tracing::info!(
        node = spec.node_id,
        boot = spec.boot,
        peer = %spec.peer,
        cluster = %spec.name,
        generation = started.generation,
        "cluster service ready"
    );
    let local = tokio::task::LocalSet::new();
    local.block_on(
        &rt,
        serve(spec, listener, region, metrics, health, started, stop),
    )
}

/// What the tasks share.
struct Node {
    spec: ClusterSpec,
    clock: Instant,
    membership: RefCell<Membership>,
    /// The peer's node id, once heard.
    peer_id: RefCell<Option<u16>>,
    /// Whether the connection this node dialled to the peer is up.
    link_out: std::cell::Cell<bool>,
    /// Something worth reporting at once changed (a transition, the link).
    changed: std::cell::Cell<bool>,
    warn: RefCell<RateLimiter>,
    /// The node's cluster state region: the datapath's disk heartbeat and fencing.
    region: Option<ClusterRegion>,
    /// Where the takeover of the peer's pools stands.
    takeover: RefCell<Takeover>,
    /// This node's disk heartbeat: the datapath's round count, and when it last moved.
    own_rounds: std::cell::Cell<(u64, u64)>,
    /// The newest events (at most [`EVENTS_KEPT`]), oldest first.
    events: RefCell<std::collections::VecDeque<Event>>,
    /// The last sequence number given to an event.
    event_seq: std::cell::Cell<u64>,
    /// What the region said last, to raise an event when it changes: fenced, host link down.
    seen: std::cell::Cell<(bool, bool)>,
    /// What the peer's last beat said of a takeover of this node (`None`: no beat yet).
    peer_pending: std::cell::Cell<Option<bool>>,
    /// Whether this node waits to join, and said so.
    join_told: std::cell::Cell<bool>,
    /// The service's metrics, when the node keeps them.
    metrics: Option<ClusterMetrics>,
}

/// Heartbeats, the peer's state, deaths, fences and takeovers, for Prometheus.
struct ClusterMetrics {
    metrics: Metrics,
    sent_link: Counter,
    sent_disk: Counter,
    heard_link: Counter,
    heard_disk: Counter,
    peer: Vec<(PeerState, Gauge)>,
    deaths: Counter,
    fenced: Gauge,
    takeovers: Counter,
    /// The peer's disk heartbeat counter seen last (a change is one beat heard).
    peer_counter: std::cell::Cell<u64>,
}

impl ClusterMetrics {
    fn new(metrics: Metrics) -> Result<Self, duplex_ipc::metrics::MetricsError> {
        metrics.start_writing();
        let path = |p| [("path", p)];
        let peer = [
            PeerState::Unknown,
            PeerState::Alive,
            PeerState::LinkDown,
            PeerState::Dead,
        ]
        .into_iter()
        .map(|st| Ok((st, metrics.gauge(Metric::PeerUp, &[("state", st.name())])?)))
        .collect::<Result<Vec<_>, duplex_ipc::metrics::MetricsError>>()?;
        Ok(Self {
            sent_link: metrics.counter(Metric::HeartbeatsSent, &path("interconnect"))?,
            sent_disk: metrics.counter(Metric::HeartbeatsSent, &path("disk"))?,
            heard_link: metrics.counter(Metric::HeartbeatsReceived, &path("interconnect"))?,
            heard_disk: metrics.counter(Metric::HeartbeatsReceived, &path("disk"))?,
            peer,
            deaths: metrics.counter(Metric::PeerDeaths, &[])?,
            fenced: metrics.gauge(Metric::Fenced, &[])?,
            takeovers: metrics.counter(Metric::Takeovers, &[])?,
            peer_counter: std::cell::Cell::new(0),
            metrics,
        })
    }

    fn peer_state(&self, state: PeerState) {
        for (st, g) in &self.peer {
            g.set(u64::from(*st == state));
        }
    }

    fn fence(&self, outcome: &str) {
        if let Ok(c) = self
            .metrics
            .counter(Metric::Fences, &[("outcome", outcome)])
        {
            c.inc();
        }
    }
}

/// How many events the service keeps (and reports).
pub const EVENTS_KEPT: usize = 64;

/// Something an operator must hear of: a peer's state changing, a fence, a takeover or its
/// refusal, this node fenced, the host link. In the status report (`duplexctl cluster
/// events`), newest last, and in the log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Event {
    /// Numbered from 1 in this service instance.
    pub seq: u64,
    /// When (Unix time, ms).
    pub at_unix_ms: u64,
    /// `info`, `warning` or `error`.
    pub level: &'static str,
    /// A fixed name to match on (`peer-alive`, `peer-interconnect-down`, `peer-dead`,
    /// `fencing`, `takeover`, `takeover-refused`, `lost-fencing-race`, `fenced`,
    /// `peer-rejoined`, `peer-rebooted`, `host-link-down`, `host-link-up`, `started`).
    pub kind: &'static str,
    /// For people.
    pub message: String,
}

/// Where the takeover of the peer's pools stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Takeover {
    /// Nothing to do.
    Idle,
    /// The datapath was asked to fence `victim` (request `seq`).
    Fencing { seq: u64, victim: u64, since: u64 },
    /// The peer (`victim`) is fenced off every drive; its pools are this node's.
    Done { victim: u64 },
    /// The takeover could not be done: why (no takeover; pools of the peer stay offline).
    Failed { victim: u64, why: String, at: u64 },
}

impl Takeover {
    fn describe(&self) -> String {
        match self {
            Self::Idle => "none".into(),
            Self::Fencing { victim, .. } => format!("fencing key {victim:#018x}"),
            Self::Done { victim } => {
                format!("peer's pools taken over (key {victim:#018x} fenced off every drive)")
            }
            Self::Failed { victim, why, .. } => {
                format!(
                    "refused: key {victim:#018x} not fenced ({why}); the peer's pools stay offline"
                )
            }
        }
    }
}

impl Node {
    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Raises an event (the log line is the caller's).
    fn event(&self, level: &'static str, kind: &'static str, message: String) {
        let seq = self.event_seq.get() + 1;
        self.event_seq.set(seq);
        let at_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut events = self.events.borrow_mut();
        if events.len() == EVENTS_KEPT {
            events.pop_front();
        }
        events.push_back(Event {
            seq,
            at_unix_ms,
            level,
            kind,
            message,
        });
        self.changed.set(true);
    }

    /// Whether this node is fencing its peer, or took its pools and the metadata service has
    /// not imported them all yet: what the beats tell the peer (the join handshake).
    fn takeover_pending(&self) -> bool {
        match &*self.takeover.borrow() {
            Takeover::Fencing { .. } => true,
            Takeover::Done { .. } => self.region.as_ref().is_some_and(|r| {
                let slot = 1u64 << self.spec.peer_slot();
                r.claims().0 & slot != 0 && r.settled() & slot == 0
            }),
            Takeover::Idle | Takeover::Failed { .. } => false,
        }
    }

    /// The join handshake: this boot joins the cluster (and its metadata service may serve
    /// its pools) once the peer, heard on the interconnect, says it is taking nothing of this
    /// node over; or once the peer is dead; or when no peer was heard at all for the dead
    /// time while this node's disk heartbeat goes on (a node starting alone).
    fn join_tick(&self) {
        let Some(r) = &self.region else {
            return;
        };
        if r.joined() {
            return;
        }
        let now = self.now();
        let state = self.membership.borrow().state();
        let peer = self.spec.peer_id;
        let how = match (state, self.peer_pending.get()) {
            (PeerState::Alive, Some(false)) => Some(format!(
                "peer node {peer} acknowledged: it is taking nothing of this node over"
            )),
            (PeerState::Dead, _) => Some(format!("peer node {peer} is dead: joining alone")),
            (PeerState::Unknown, _) if now >= self.spec.dead_ms && self.own_disk_ok(now) => {
                Some(format!(
                    "no peer heard for the dead time ({} ms): this node starts alone",
                    self.spec.dead_ms
                ))
            }
            _ => None,
        };
        match how {
            Some(how) => {
                r.set_joined();
                tracing::info!(%how, "joined the cluster: this node serves its pools");
                self.event("info", "joined", format!("joined the cluster: {how}"));
            }
            None if !self.join_told.replace(true) => {
                tracing::info!(
                    peer,
                    "joining the cluster: this node serves none of its pools until the peer acknowledges (or is found dead)"
                );
            }
            None => {}
        }
    }

    /// A rejoin of the fenced peer that waited for this node's metadata service to import
    /// what it claimed: done once that is so.
    fn rejoin_tick(&self) {
        let done = matches!(*self.takeover.borrow(), Takeover::Done { .. });
        let (alive, boot) = {
            let m = self.membership.borrow();
            (m.state() == PeerState::Alive, m.peer_boot())
        };
        if done && alive && !self.takeover_pending() {
            self.peer_back(boot);
        }
    }

    /// Events from what the region says: this node fenced, the host link down or up.
    fn region_events(&self) {
        let Some(r) = &self.region else {
            return;
        };
        let now = (r.fenced(), r.host_link_down());
        let before = self.seen.replace(now);
        if now.0 && !before.0 {
            self.event(
                "error",
                "fenced",
                "this node is fenced: its reservation key is gone from a drive; it serves nothing more until it restarts with a new key".into(),
            );
        }
        if now.1 != before.1 {
            if now.1 {
                self.event(
                    "warning",
                    "host-link-down",
                    "the host link (the fabric listener's interface) is down: this node's pools move to the peer".into(),
                );
            } else {
                self.event("info", "host-link-up", "the host link is up again".into());
            }
        }
    }

    fn warn(&self, peer: SocketAddr, what: &str) {
        if let Some(suppressed) = self.warn.borrow_mut().check(Instant::now()) {
            tracing::warn!(%peer, suppressed, "{what}");
        }
    }

    /// The status report `duplexctl cluster status` shows (JSON), within the report's limit:
    /// the oldest events left out when it would not fit.
    fn status(&self) -> String {
        let mut skip = 0;
        loop {
            let text = self.status_skipping(skip);
            let n = self.events.borrow().len();
            if text.len() <= duplex_ipc::control::MAX_REPORT_BYTES || skip >= n {
                return text;
            }
            skip = (skip + 8).min(n);
        }
    }

    fn status_skipping(&self, skip: usize) -> String {
        let m = self.membership.borrow();
        let now = self.now();
        let ago = |at: Option<u64>| at.map(|at| now.saturating_sub(at));
        let peer_boot = m.peer_boot();
        serde_json::json!({
            "cluster": self.spec.name,
            "node": self.spec.node_id,
            "boot": self.spec.boot,
            "beat_ms": self.spec.beat_ms,
            "dead_ms": self.spec.dead_ms,
            "peer": {
                "node": *self.peer_id.borrow(),
                "boot": (peer_boot != 0).then_some(peer_boot),
                "address": self.spec.peer.to_string(),
                "state": m.state().name(),
                "link_heard_ms_ago": ago(m.link().at),
                "disk_heard_ms_ago": ago(m.disk().at),
            },
            "link_out": if self.link_out.get() { "up" } else { "down" },
            "disk_heartbeat": self.disk_summary(now),
            "disk": self.region.as_ref().map(|r| {
                let (written, drives) = r.written();
                let peer = r.slot(self.spec.peer_slot());
                serde_json::json!({
                    "rounds": r.rounds(),
                    "written": written,
                    "drives": drives,
                    "fenced": r.fenced(),
                    "peer_counter": peer.map(|p| p.counter),
                    "peer_boot": peer.map(|p| p.boot),
                    "peer_drives": peer.map(|p| p.drives),
                    "claims": r.claims().0,
                })
            }),
            "takeover": self.takeover.borrow().describe(),
            "takeover_pending": self.takeover_pending(),
            "joined": self.region.as_ref().map(ClusterRegion::joined),
            "events": self.events.borrow().iter().skip(skip).collect::<Vec<_>>(),
            "drives": self.region.as_ref().and_then(|r| r.reservations()).map(|(round, list)| {
                serde_json::json!({
                    "round": round,
                    "list": list.iter().map(drive_json).collect::<Vec<_>>(),
                })
            }),
        })
        .to_string()
    }

    /// One line on the disk heartbeat, for `duplexctl cluster status`.
    fn disk_summary(&self, now: u64) -> String {
        let Some(r) = &self.region else {
            return "not run (no cluster state region): a silent interconnect is never taken for a death".into();
        };
        if r.fenced() {
            return "stopped: this node is fenced".into();
        }
        let (written, drives) = r.written();
        let m = self.membership.borrow();
        let heard = match m.disk().at {
            Some(at) => format!("{} ms ago", now.saturating_sub(at)),
            None => "never".into(),
        };
        format!(
            "this node's slot written on {written} of {drives} drives (round {}); the peer's last changed {heard}",
            r.rounds()
        )
    }

    /// Whether this node's own disk heartbeat is going (rounds done within the dead time):
    /// only then does a silent peer slot mean anything.
    fn own_disk_ok(&self, now: u64) -> bool {
        let Some(r) = &self.region else {
            return false;
        };
        let rounds = r.rounds();
        let (seen, at) = self.own_rounds.get();
        if rounds != seen {
            self.own_rounds.set((rounds, now));
            return true;
        }
        rounds > 0 && now.saturating_sub(at) < self.spec.dead_ms
    }

    /// Reads the disk heartbeat the datapath saw; moves the takeover along.
    fn disk_tick(&self) {
        let Some(r) = &self.region else {
            return;
        };
        let now = self.now();
        let ok = self.own_disk_ok(now);
        if let Some(m) = &self.metrics {
            m.sent_disk.store(r.rounds());
            m.fenced.set(u64::from(r.fenced()));
            if let Some(v) = r.slot(self.spec.peer_slot()) {
                if v.counter != m.peer_counter.replace(v.counter) && v.counter > 0 {
                    m.heard_disk.inc();
                }
            }
        }
        if ok {
            if let Some(v) = r.slot(self.spec.peer_slot()) {
                if v.drives > 0 && v.counter > 0 {
                    let t = self
                        .membership
                        .borrow_mut()
                        .disk_read(now, v.boot, v.counter);
                    self.report(t);
                }
            }
        }
        let state = self.takeover.borrow().clone();
        let dead = self.membership.borrow().state() == PeerState::Dead;
        match state {
            // Still dead and not fenced: try again (the drives, or this node's view of them,
            // may have come back), once per dead time.
            Takeover::Idle if dead && ok => {
                self.start_takeover(self.membership.borrow().peer_boot())
            }
            Takeover::Failed { at, .. }
                if dead && ok && now.saturating_sub(at) >= self.spec.dead_ms =>
            {
                self.start_takeover(self.membership.borrow().peer_boot())
            }
            Takeover::Idle | Takeover::Failed { .. } => {}
            Takeover::Fencing { seq, victim, since } => {
                let Some(a) = r.fence_answer().filter(|a| a.seq == seq) else {
                    if now.saturating_sub(since) > 10 * self.spec.dead_ms {
                        tracing::error!(
                            victim = format!("{victim:#018x}"),
                            "the datapath did not answer the fence request"
                        );
                    }
                    return;
                };
                self.changed.set(true);
                if let Some(m) = &self.metrics {
                    m.fence(match a.outcome {
                        Some(FenceOutcome::Fenced) => "fenced",
                        Some(FenceOutcome::SelfFenced) => "self-fenced",
                        Some(FenceOutcome::Unreachable) => "unreachable",
                        Some(FenceOutcome::Failed) => "failed",
                        Some(FenceOutcome::NoDrives) => "no-drives",
                        None => "unknown",
                    });
                    if a.outcome == Some(FenceOutcome::Fenced) {
                        m.takeovers.inc();
                    }
                }
                let next = match a.outcome {
                    Some(FenceOutcome::Fenced) => {
                        r.claim(self.spec.peer_slot(), victim);
                        tracing::warn!(
                            peer = self.spec.peer_id,
                            victim = format!("{victim:#018x}"),
                            preempted = a.preempted,
                            fence_ms = now.saturating_sub(since),
                            "TAKEOVER: the peer is fenced off every drive; its pools are this node's"
                        );
                        self.event(
                            "warning",
                            "takeover",
                            format!("peer node {} fenced off every drive (key {victim:#018x}, preempted on {} drives in {} ms): its pools are this node's", self.spec.peer_id, a.preempted, now.saturating_sub(since)),
                        );
                        Takeover::Done { victim }
                    }
                    Some(FenceOutcome::SelfFenced) => {
                        tracing::error!(
                            peer = self.spec.peer_id,
                            victim = format!("{victim:#018x}"),
                            "NO TAKEOVER: this node lost the fencing race (its own key is gone from a drive): it serves nothing more"
                        );
                        self.event(
                            "error",
                            "lost-fencing-race",
                            format!("no takeover: peer node {} fenced this node first (this node's key is gone from a drive); it serves nothing more", self.spec.peer_id),
                        );
                        Takeover::Failed {
                            victim,
                            why: FenceOutcome::SelfFenced.name().into(),
                            at: now,
                        }
                    }
                    other => {
                        let why = other.map_or("an unknown answer", FenceOutcome::name);
                        tracing::error!(
                            peer = self.spec.peer_id,
                            victim = format!("{victim:#018x}"),
                            why,
                            "NO TAKEOVER: the peer could not be fenced; its pools stay offline"
                        );
                        self.event(
                            "error",
                            "takeover-refused",
                            format!("no takeover: peer node {} could not be fenced ({why}); its pools stay offline; tried again every {} ms while it stays dead", self.spec.peer_id, self.spec.dead_ms),
                        );
                        Takeover::Failed {
                            victim,
                            why: why.into(),
                            at: now,
                        }
                    }
                };
                *self.takeover.borrow_mut() = next;
            }
            Takeover::Done { .. } => {}
        }
    }

    /// The peer is heard again: a new boot of a fenced peer has rejoined, so the claim on its
    /// pools (already this node's on the drives) is withdrawn.
    fn peer_back(&self, boot: u64) {
        let done = match &*self.takeover.borrow() {
            Takeover::Done { victim } | Takeover::Failed { victim, .. } => Some(*victim),
            _ => None,
        };
        if let (Some(victim), Some(r)) = (done, &self.region) {
            // Not before this node's metadata service has imported what it claimed: the
            // rejoining peer waits for that too (its beats say so), then this runs again.
            if self.takeover_pending() {
                return;
            }
            if victim & ((1 << 48) - 1) != boot & ((1 << 48) - 1) {
                r.release_claims(1 << self.spec.peer_slot());
                tracing::info!(
                    peer = self.spec.peer_id,
                    boot,
                    "the fenced peer rejoined with a new boot"
                );
                self.event(
                    "info",
                    "peer-rejoined",
                    format!(
                        "the fenced peer node {} rejoined with a new boot ({boot})",
                        self.spec.peer_id
                    ),
                );
                *self.takeover.borrow_mut() = Takeover::Idle;
            }
        }
    }

    /// The peer is dead: fence it (then take over), if this node can judge.
    fn start_takeover(&self, boot: u64) {
        let Some(r) = &self.region else {
            tracing::error!("peer dead, but this node runs no disk heartbeat: no takeover");
            return;
        };
        let now = self.now();
        if !self.own_disk_ok(now) {
            tracing::error!("peer looks dead, but this node's own disk heartbeat is not going: it cannot judge; no takeover");
            return;
        }
        let victim = (u64::from(self.spec.peer_id) << 48) | (boot & ((1 << 48) - 1)).max(1);
        match &*self.takeover.borrow() {
            Takeover::Done { victim: v } | Takeover::Fencing { victim: v, .. } if *v == victim => {
                return;
            }
            _ => {}
        }
        let seq = r.request_fence(victim);
        tracing::warn!(
            peer = self.spec.peer_id,
            victim = format!("{victim:#018x}"),
            "peer dead: fencing it off every drive"
        );
        self.event(
            "warning",
            "fencing",
            format!(
                "fencing peer node {} (key {victim:#018x}) off every drive",
                self.spec.peer_id
            ),
        );
        *self.takeover.borrow_mut() = Takeover::Fencing {
            seq,
            victim,
            since: now,
        };
        self.changed.set(true);
    }

    fn report(&self, t: Option<Transition>) {
        let Some(t) = t else {
            return;
        };
        self.changed.set(true);
        let peer = self.peer_id.borrow().unwrap_or(self.spec.peer_id);
        if let Some(m) = &self.metrics {
            m.peer_state(t.to);
            if t.to == PeerState::Dead {
                m.deaths.inc();
            }
        }
        match t.to {
            PeerState::Alive => {
                tracing::info!(peer, boot = t.boot, from = t.from.name(), "peer alive");
                self.event(
                    "info",
                    "peer-alive",
                    format!(
                        "peer node {peer} (boot {}) is alive (was {})",
                        t.boot,
                        t.from.name()
                    ),
                );
                self.peer_back(t.boot);
            }
            PeerState::LinkDown => {
                tracing::warn!(
                    peer,
                    boot = t.boot,
                    from = t.from.name(),
                    "peer interconnect down: no takeover, configuration changes are refused"
                );
                self.event(
                    "warning",
                    "peer-interconnect-down",
                    format!("the interconnect to peer node {peer} is down while its disk heartbeat goes on: no takeover; configuration changes are refused until it is back"),
                );
            }
            PeerState::Dead => {
                tracing::error!(
                    peer,
                    boot = t.boot,
                    from = t.from.name(),
                    "peer dead: both heartbeats silent for the dead time"
                );
                self.event(
                    "error",
                    "peer-dead",
                    format!("peer node {peer} (boot {}) is dead: the interconnect and the disk heartbeat silent for {} ms", t.boot, self.spec.dead_ms),
                );
                self.start_takeover(t.boot);
            }
            PeerState::Unknown => {}
        }
    }

    /// A message from `from` on an accepted connection; `Err` closes that connection.
    fn heard(&self, from: SocketAddr, m: Message) -> Result<(), String> {
        if m.cluster != self.spec.name {
            return Err(format!(
                "a node of array {:?} (this is {:?})",
                m.cluster, self.spec.name
            ));
        }
        if m.node == self.spec.node_id {
            return Err(format!("a node with this node's id {}", m.node));
        }
        {
            let mut peer = self.peer_id.borrow_mut();
            match *peer {
                Some(id) if id != m.node => {
                    return Err(format!("node {} (the peer is node {id})", m.node));
                }
                Some(_) => {}
                None => {
                    tracing::info!(peer = m.node, %from, "peer identified");
                    *peer = Some(m.node);
                }
            }
        }
        let known = self.membership.borrow().link().boot;
        if known != 0 && known != m.boot {
            tracing::warn!(
                peer = m.node,
                old_boot = known,
                boot = m.boot,
                "peer rebooted"
            );
            self.event(
                "warning",
                "peer-rebooted",
                format!("peer node {} rebooted (boot {known} → {})", m.node, m.boot),
            );
        }
        match m.body {
            Body::Beat {
                seq,
                state,
                config_generation,
                takeover_pending,
            } => {
                if let Some(r) = &self.region {
                    r.set_peer_config_generation(config_generation);
                }
                self.peer_pending.set(Some(takeover_pending));
                if let Some(m) = &self.metrics {
                    m.heard_link.inc();
                }
                if state == NodeState::Fenced {
                    tracing::warn!(peer = m.node, boot = m.boot, "peer reports itself fenced");
                }
                let t = self
                    .membership
                    .borrow_mut()
                    .link_beat(self.now(), m.boot, seq);
                self.report(t);
            }
            Body::Leaving => {
                tracing::info!(
                    peer = m.node,
                    boot = m.boot,
                    "peer's cluster service stops on purpose"
                );
            }
        }
        Ok(())
    }
}

/// The name of a reservation type (NVMe RTYPE).
fn rtype_name(t: u8) -> &'static str {
    match t {
        0 => "none",
        1 => "Write Exclusive",
        2 => "Exclusive Access",
        3 => "Write Exclusive - Registrants Only",
        4 => "Exclusive Access - Registrants Only",
        5 => "Write Exclusive - All Registrants",
        6 => "Exclusive Access - All Registrants",
        _ => "reserved type",
    }
}

/// One drive's reservation for the status report: the type and every registered key with the
/// node and boot it names (the fencing key's layout: node in the top 16 bits).
fn drive_json(d: &duplex_ipc::cluster::DriveReservation) -> serde_json::Value {
    serde_json::json!({
        "name": d.name,
        "reservation": rtype_name(d.rtype),
        "error": (!d.error.is_empty()).then_some(&d.error),
        "keys": d.keys.iter().map(|(k, holder)| serde_json::json!({
            "key": format!("{k:#018x}"),
            "node": k >> 48,
            "boot": k & ((1 << 48) - 1),
            "holder": holder,
        })).collect::<Vec<_>>(),
    })
}

async fn serve(
    spec: ClusterSpec,
    listener: Option<std::net::TcpListener>,
    region: Option<ClusterRegion>,
    metrics: Option<ClusterMetrics>,
    health: Health,
    started: Arc<Started>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let beat = Duration::from_millis(spec.beat_ms.max(1));
    let membership = if region.is_some() {
        Membership::new(spec.dead_ms)
    } else {
        Membership::new(spec.dead_ms).without_disk_heartbeat()
    };
    // A takeover a predecessor finished is still in force.
    let takeover = match &region {
        Some(r) if r.claims().0 & (1 << spec.peer_slot()) != 0 => Takeover::Done {
            victim: r.claims().1,
        },
        _ => Takeover::Idle,
    };
    let node = Rc::new(Node {
        membership: RefCell::new(membership),
        region,
        takeover: RefCell::new(takeover),
        own_rounds: std::cell::Cell::new((0, 0)),
        events: RefCell::new(std::collections::VecDeque::new()),
        event_seq: std::cell::Cell::new(0),
        seen: std::cell::Cell::new((false, false)),
        peer_pending: std::cell::Cell::new(None),
        join_told: std::cell::Cell::new(false),
        metrics,
        spec,
        clock: Instant::now(),
        peer_id: RefCell::new(None),
        link_out: std::cell::Cell::new(false),
        changed: std::cell::Cell::new(true),
        warn: RefCell::new(RateLimiter::new(10, Duration::from_secs(1))),
    });
    if let Some(m) = &node.metrics {
        m.peer_state(node.membership.borrow().state());
    }
    node.event(
        "info",
        "started",
        format!(
            "cluster service started: node {} boot {}, peer node {} at {}{}",
            node.spec.node_id,
            node.spec.boot,
            node.spec.peer_id,
            node.spec.peer,
            if matches!(*node.takeover.borrow(), Takeover::Done { .. }) {
                "; the peer's pools are this node's (a takeover before this start)"
            } else {
                ""
            }
        ),
    );
    if let Some(l) = listener {
        let l = TcpListener::from_std(l).context("interconnect listener")?;
        tokio::task::spawn_local(accept(Rc::clone(&node), l));
    } else {
        tracing::warn!("no interconnect listener: the peer's beats cannot reach this node");
    }
    tokio::task::spawn_local(dial(Rc::clone(&node), beat, Arc::clone(&stop)));
    let mut tick = tokio::time::interval(beat / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = Instant::now();
    // Events already in the node's journal (duplexd keeps it; this list is the service's own).
    let mut journaled = 0u64;
    while !stop.load(Ordering::Acquire) {
        tick.tick().await;
        health.beat();
        let from = journaled;
        for e in node.events.borrow().iter().filter(|e| e.seq > from) {
            journaled = e.seq;
            let level = match e.level {
                "error" => duplex_ipc::control::EventLevel::Error,
                "warning" => duplex_ipc::control::EventLevel::Warning,
                _ => duplex_ipc::control::EventLevel::Info,
            };
            if let Err(err) = started.event(level, e.kind, &e.message) {
                tracing::warn!(error = %err, kind = e.kind, "cannot send an event to duplexd");
            }
        }
        node.region_events();
        node.disk_tick();
        node.join_tick();
        node.rejoin_tick();
        let t = node.membership.borrow_mut().tick(node.now());
        node.report(t);
        if let Some(r) = &node.region {
            r.set_peer_linked(node.membership.borrow().state() == PeerState::Alive);
        }
        // The status report: at once after a change, else twice a second.
        if node.changed.replace(false) || reported.elapsed() >= Duration::from_millis(500) {
            if let Err(e) = started.report(&node.status()) {
                tracing::warn!(error = %e, "cannot send the status report");
            }
            reported = Instant::now();
        }
    }
    // A planned stop: the peer hears it (best effort) so the silence that follows is explained.
    if let Ok(Ok(mut s)) = tokio::time::timeout(beat, TcpStream::connect(node.spec.peer)).await {
        if let Ok(f) = message(&node, Body::Leaving).frame() {
            let _ = tokio::time::timeout(beat, s.write_all(&f)).await;
        }
    }
    tracing::info!("cluster service stopped");
    Ok(())
}

fn message(node: &Node, body: Body) -> Message {
    Message {
        cluster: node.spec.name.clone(),
        node: node.spec.node_id,
        boot: node.spec.boot,
        body,
    }
}

/// Accepts the peer's connections (one at a time matters not: each is read on its own).
async fn accept(node: Rc<Node>, l: TcpListener) {
    let open = Rc::new(std::cell::Cell::new(0usize));
    loop {
        match l.accept().await {
            Ok((s, from)) => {
                if open.get() >= MAX_ACCEPTED {
                    node.warn(
                        from,
                        &format!("{MAX_ACCEPTED} interconnect connections open: refusing another"),
                    );
                    continue;
                }
                let _ = s.set_nodelay(true);
                open.set(open.get() + 1);
                let (node, open) = (Rc::clone(&node), Rc::clone(&open));
                tokio::task::spawn_local(async move {
                    receive(node, s, from).await;
                    open.set(open.get() - 1);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "interconnect accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one accepted connection to its end. A connection that sends nothing for twice the
/// dead time is closed (the peer beats far more often; a silent one only holds a slot).
async fn receive(node: Rc<Node>, mut s: TcpStream, from: SocketAddr) {
    let idle = Duration::from_millis(node.spec.dead_ms.saturating_mul(2).max(1));
    loop {
        let frame = match tokio::time::timeout(idle, read_frame(&mut s)).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                node.warn(from, &format!("interconnect connection closed: {e}"));
                return;
            }
            Err(_) => {
                node.warn(
                    from,
                    "closing an interconnect connection silent for twice the dead time",
                );
                return;
            }
        };
        let m = match Message::decode(&frame) {
            Ok(m) => m,
            Err(e) => {
                node.warn(from, &format!("closing an interconnect connection: {e}"));
                return;
            }
        };
        if let Err(why) = node.heard(from, m) {
            node.warn(
                from,
                &format!("closing an interconnect connection from {why}"),
            );
            return;
        }
    }
}

/// Connects to the peer and beats, reconnecting after every failure.
async fn dial(node: Rc<Node>, beat: Duration, stop: Arc<AtomicBool>) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) {
        let mut s = match tokio::time::timeout(beat, TcpStream::connect(node.spec.peer)).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) | Err(_) => {
                tokio::time::sleep(beat).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        tracing::info!(peer = %node.spec.peer, "interconnect link to the peer up");
        node.link_out.set(true);
        node.changed.set(true);
        let mut tick = tokio::time::interval(beat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if stop.load(Ordering::Acquire) {
                return;
            }
            seq += 1;
            let m = message(
                &node,
                Body::Beat {
                    seq,
                    state: if node.region.as_ref().is_some_and(ClusterRegion::fenced) {
                        NodeState::Fenced
                    } else {
                        NodeState::Serving
                    },
                    config_generation: node
                        .region
                        .as_ref()
                        .map_or(0, ClusterRegion::config_generation),
                    takeover_pending: node.takeover_pending(),
                },
            );
            let Ok(f) = m.frame() else {
                tracing::error!("cannot encode a beat");
                return;
            };
            match tokio::time::timeout(beat, s.write_all(&f)).await {
                Ok(Ok(())) => {
                    if let Some(m) = &node.metrics {
                        m.sent_link.inc();
                    }
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
        tracing::info!(peer = %node.spec.peer, "interconnect link to the peer lost");
        node.link_out.set(false);
        node.changed.set(true);
        tokio::time::sleep(beat).await;
    }
}
