//! The fabric as a duplexd service: lifecycle handshake, resources, sandbox, runtime.
//!
//! Resources: `health`, `topology`, the datapath channel named by the topology (`pool:NAME`,
//! `ring:SUBMIT` + doorbells as producer, `ring:COMPLETE` + doorbells as consumer) and one
//! `listener:NAME` per topology listener (bound and listening, opened by duplexd: a restarted
//! fabric accepts on the very same sockets, so hosts reconnect to the same address).
//!
//! A restarted fabric (`StartMode::Restart`) reclaims the buffers its predecessor held and
//! drops completions addressed to it; hosts lose their connections and reconnect.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use duplex_ipc::control::StartMode;
use duplex_ipc::desc::IoDesc;
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::lifecycle::{self, Control, Health, Next, Started};
use duplex_ipc::pool::{Holder, Pool};
use duplex_ipc::ring::{self, Consumer, Producer, RingRegion, WaitPolicy};
use duplex_ipc::topology::{Topology, ROLE_FABRIC, TOPOLOGY_RESOURCE};
use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::server::{self, Listener};
use crate::target::{Port, Target};

/// The service (and seccomp policy) name.
pub const SERVICE: &str = "fabric";

struct Parts {
    health: Health,
    topology: Topology,
    pool: Option<Pool>,
    submit: Option<Producer<IoDesc>>,
    complete: Option<Consumer<IoDesc>>,
    listeners: Vec<(std::net::TcpListener, Port)>,
}

fn take(started: &mut Started, name: &str) -> anyhow::Result<OwnedFd> {
    started
        .take(name)
        .map(|h| h.fd)
        .ok_or_else(|| anyhow!("duplexd did not hand over `{name}`"))
}

fn ring_parts(
    started: &mut Started,
    name: &str,
) -> anyhow::Result<(RingRegion<IoDesc>, Doorbell, Doorbell)> {
    let region = RingRegion::<IoDesc>::attach(take(started, &format!("ring:{name}"))?)
        .with_context(|| format!("ring {name}"))?;
    let data = Doorbell::from_fd(take(started, &format!("ring:{name}:data"))?)?;
    let space = Doorbell::from_fd(take(started, &format!("ring:{name}:space"))?)?;
    Ok((region, data, space))
}

fn attach(started: &mut Started) -> anyhow::Result<Parts> {
    let health = started.health()?;
    let topology = Topology::from_memfd(take(started, TOPOLOGY_RESOURCE)?)?;
    let mode = match started.mode {
        StartMode::Fresh => ring::StartMode::Fresh,
        StartMode::Restart => ring::StartMode::Restart,
    };
    let (mut pool, mut submit, mut complete) = (None, None, None);
    if let Some(ch) = topology.io.channels.first() {
        let me = Holder {
            role: ROLE_FABRIC,
            incarnation: started.generation,
        };
        pool = Some(Pool::attach(
            take(started, &format!("pool:{}", topology.io.pool))?,
            me,
        )?);
        let (r, d, s) = ring_parts(started, &ch.submit)?;
        let mut p = Producer::attach(r, d, s, started.generation, mode)?;
        p.set_policy(WaitPolicy::Doorbell);
        submit = Some(p);
        let (r, d, s) = ring_parts(started, &ch.complete)?;
        let mut c = Consumer::attach(r, d, s, started.generation, mode)?;
        c.set_policy(WaitPolicy::Doorbell);
        complete = Some(c);
    }
    let mut listeners = Vec::new();
    for (i, l) in topology.listeners.iter().enumerate() {
        let socket = std::net::TcpListener::from(take(started, &l.resource)?);
        socket.set_nonblocking(true)?;
        let addr: SocketAddr = socket
            .local_addr()
            .with_context(|| format!("{} is not a TCP listener", l.resource))?;
        listeners.push((
            socket,
            Port {
                id: i as u16 + 1,
                addr,
                kind: l.kind,
            },
        ));
    }
    Ok(Parts {
        health,
        topology,
        pool,
        submit,
        complete,
        listeners,
    })
}

/// Runs the fabric service to its end (Shutdown, or the supervisor gone).
pub fn run() -> anyhow::Result<()> {
    let mut started = lifecycle::start(SERVICE, Duration::from_secs(30))?;
    let parts = attach(&mut started)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("cannot build the runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(started, parts))
}

async fn serve(started: Started, parts: Parts) -> anyhow::Result<()> {
    let Parts {
        health,
        topology,
        pool,
        submit,
        complete,
        listeners,
    } = parts;
    let restart = started.mode == StartMode::Restart;
    let backend = match (pool, submit, complete) {
        (Some(p), Some(s), Some(c)) => Some(Backend::new(p, s, c, started.generation, restart)?),
        _ => {
            tracing::warn!("no datapath channel in the topology: only discovery works");
            None
        }
    };
    let mut socks = Vec::new();
    let mut ports = Vec::new();
    for (s, port) in listeners {
        ports.push(port.clone());
        socks.push(Listener {
            socket: tokio::net::TcpListener::from_std(s)?,
            port,
        });
    }
    let target = Rc::new(Target::new(topology, ports));
    let started = Arc::new(started);
    let (tx, mut events) = mpsc::unbounded_channel();
    lifecycle::spawn_control_thread(Arc::clone(&started), move |_, event| tx.send(event).is_ok())
        .context("cannot start the lifecycle thread")?;
    let every = (health.interval() / 4).max(Duration::from_millis(1));
    tokio::task::spawn_local(async move {
        let mut ticks = tokio::time::interval(every);
        loop {
            ticks.tick().await;
            health.beat();
        }
    });
    // Everything is attached, registered with the reactor, and the lifecycle thread exists:
    // from here on the policy holds.
    duplex_sandbox::enter(SERVICE).context("cannot enter the sandbox")?;
    started.ready()?;
    tracing::info!(
        generation = started.generation,
        mode = ?started.mode,
        subsystems = target.subsystems.len(),
        "fabric ready"
    );
    let stop = async {
        while let Some(e) = events.recv().await {
            match e {
                // On the runtime thread: an injected hang stops the heartbeat with it.
                Control::Message(env) => {
                    if started.handle(&env) == Next::Shutdown {
                        return;
                    }
                }
                Control::Closed => return,
                Control::Failed(e) => {
                    tracing::error!(error = %e, "lifecycle channel failed");
                    return;
                }
            }
        }
    };
    server::serve(target, backend, socks, stop).await;
    Ok(())
}
