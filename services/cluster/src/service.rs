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

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
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
    local.block_on(&rt, serve(spec, listener, health, started, stop))
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
}

impl Node {
    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn warn(&self, peer: SocketAddr, what: &str) {
        if let Some(suppressed) = self.warn.borrow_mut().check(Instant::now()) {
            tracing::warn!(%peer, suppressed, "{what}");
        }
    }

    /// The status report `duplexctl cluster status` shows (JSON).
    fn status(&self) -> String {
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
            "disk_heartbeat": "not written yet (a silent interconnect is never taken for a death)",
        })
        .to_string()
    }

    fn report(&self, t: Option<Transition>) {
        let Some(t) = t else {
            return;
        };
        self.changed.set(true);
        let peer = self.peer_id.borrow().unwrap_or(0);
        match t.to {
            PeerState::Alive => {
                tracing::info!(peer, boot = t.boot, from = t.from.name(), "peer alive")
            }
            PeerState::LinkDown => tracing::warn!(
                peer,
                boot = t.boot,
                from = t.from.name(),
                "peer interconnect down: no takeover, configuration changes are refused"
            ),
            PeerState::Dead => tracing::error!(
                peer,
                boot = t.boot,
                from = t.from.name(),
                "peer dead: both heartbeats silent for the dead time"
            ),
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
        }
        match m.body {
            Body::Beat { seq, state } => {
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

async fn serve(
    spec: ClusterSpec,
    listener: Option<std::net::TcpListener>,
    health: Health,
    started: Arc<Started>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let beat = Duration::from_millis(spec.beat_ms.max(1));
    let node = Rc::new(Node {
        membership: RefCell::new(Membership::new(spec.dead_ms).without_disk_heartbeat()),
        spec,
        clock: Instant::now(),
        peer_id: RefCell::new(None),
        link_out: std::cell::Cell::new(false),
        changed: std::cell::Cell::new(true),
        warn: RefCell::new(RateLimiter::new(10, Duration::from_secs(1))),
    });
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
    while !stop.load(Ordering::Acquire) {
        tick.tick().await;
        health.beat();
        let t = node.membership.borrow_mut().tick(node.now());
        node.report(t);
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
                    state: NodeState::Serving,
                },
            );
            let Ok(f) = m.frame() else {
                tracing::error!("cannot encode a beat");
                return;
            };
            match tokio::time::timeout(beat, s.write_all(&f)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        tracing::info!(peer = %node.spec.peer, "interconnect link to the peer lost");
        node.link_out.set(false);
        node.changed.set(true);
        tokio::time::sleep(beat).await;
    }
}
