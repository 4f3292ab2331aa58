//! The fabric as a duplexd service: lifecycle handshake, resources, sandbox, runtime.
//!
//! Resources: `health`, `topology`, the datapath channel named by the topology (`pool:NAME`,
//! `ring:SUBMIT` + doorbells as producer, `ring:COMPLETE` + doorbells as consumer) and one
//! `listener:NAME` per topology listener (bound and listening, opened by duplexd: a restarted
//! fabric accepts on the very same sockets, so hosts reconnect to the same address).
//!
//! Optional: `exports`, the exports region ([`duplex_ipc::exports`]), and `exports-bell`, the
//! eventfd its writer rings after each publish. With them the fabric reads the current export
//! table before it says Ready (fresh start or restart alike) and again on every ring
//! ([`crate::exports::ExportsFeed`]); without them it serves the static topology alone. The
//! region is mapped and the bell registered with the reactor before the sandbox is entered:
//! following the table needs no system call the policy does not already allow.
//!
//! Optional: `resv`, the reservation channel to the metadata service ([`duplex_ipc::resv`]),
//! registered with the reactor before the sandbox; without it reservation changes are refused.
//!
//! A restarted fabric (`StartMode::Restart`) reclaims the buffers its predecessor held and
//! drops completions addressed to it; hosts lose their connections and reconnect.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use duplex_ipc::control::StartMode;
use duplex_ipc::desc::IoDesc;
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::exports::{ExportsRegion, EXPORTS_BELL_RESOURCE, EXPORTS_RESOURCE};
use duplex_ipc::lifecycle::{self, Control, Health, Next, Started};
use duplex_ipc::metrics::{Metrics, METRICS_RESOURCE};
use duplex_ipc::pool::{Holder, Pool};
use duplex_ipc::ring::{self, Consumer, Producer, RingRegion, WaitPolicy};
use duplex_ipc::topology::{Topology, ROLE_FABRIC, TOPOLOGY_RESOURCE};
use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::exports::ExportsFeed;
use crate::server::{self, Listener};
use crate::subsystem::Port;
use crate::target::Target;

/// The service (and seccomp policy) name.
pub const SERVICE: &str = "fabric";
/// Heartbeat intervals an I/O thread other than the runtime thread may go without running its
/// timer before the fabric stops beating (1 s at the default 100 ms; duplexd then waits its own
/// `missed_beats`): a healthy runtime passes its timers on every poll turn under load and
/// sleeps on them when idle.
const STALL_INTERVALS: u32 = 10;
/// ... and never less than this, however short the interval (tests run 20 ms heartbeats).
const MIN_STALL: Duration = Duration::from_secs(1);

struct Parts {
    health: Health,
    topology: Topology,
    /// One datapath channel per I/O thread (all on the same pool), in thread order.
    channels: Vec<IoChannel>,
    listeners: Vec<(std::net::TcpListener, Port)>,
    exports: Option<ExportsRegion>,
    exports_bell: Option<Doorbell>,
    resv: Option<duplex_ipc::resv::ResvChannel>,
    metrics: Option<Metrics>,
    secrets_key: Option<duplex_ondisk::secrets::SecretsKey>,
}

/// A datapath channel as attached: a view of the pool and the two rings.
struct IoChannel {
    pool: Pool,
    submit: Producer<IoDesc>,
    complete: Consumer<IoDesc>,
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
    let mut channels = Vec::new();
    if !topology.io.channels.is_empty() {
        let me = Holder {
            role: ROLE_FABRIC,
            incarnation: started.generation,
        };
        let first = Pool::attach(take(started, &format!("pool:{}", topology.io.pool))?, me)?;
        // Each further I/O thread its own view of the pool (its own allocation cursor).
        let mut pools = Vec::new();
        for _ in 1..topology.io.channels.len() {
            pools.push(Pool::attach(first.region().try_clone_fd()?, me)?);
        }
        for (pool, ch) in std::iter::once(first)
            .chain(pools)
            .zip(&topology.io.channels)
        {
            let (r, d, s) = ring_parts(started, &ch.submit)?;
            let mut submit = Producer::attach(r, d, s, started.generation, mode)?;
            submit.set_policy(WaitPolicy::Doorbell);
            let (r, d, s) = ring_parts(started, &ch.complete)?;
            let mut complete = Consumer::attach(r, d, s, started.generation, mode)?;
            complete.set_policy(WaitPolicy::Doorbell);
            channels.push(IoChannel {
                pool,
                submit,
                complete,
            });
        }
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
                tls: l.tls,
            },
        ));
    }
    let exports = started
        .take(EXPORTS_RESOURCE)
        .map(|h| ExportsRegion::attach(h.fd))
        .transpose()
        .context("exports region")?;
    let exports_bell = started
        .take(EXPORTS_BELL_RESOURCE)
        .map(|h| Doorbell::from_fd(h.fd))
        .transpose()
        .context("exports doorbell")?;
    let resv = started
        .take(duplex_ipc::resv::RESV_RESOURCE)
        .map(|h| {
            duplex_ipc::resv::ResvChannel::from_fd(h.fd)
                .map(|c| c.with_first_request_id(started.generation << 32))
        })
        .transpose()
        .context("reservation channel")?;
    let secrets_key = started
        .take(duplex_ipc::keys::SECRETS_KEY_RESOURCE)
        .map(|h| duplex_ipc::keys::attach(h.fd))
        .transpose()
        .context("the secrets key")?
        .map(duplex_ondisk::secrets::SecretsKey::from_bytes);
    let metrics = started
        .take(METRICS_RESOURCE)
        .map(|h| Metrics::attach(h.fd))
        .transpose()
        .context("metrics region")?;
    Ok(Parts {
        secrets_key,
        metrics,
        resv,
        health,
        topology,
        channels,
        listeners,
        exports,
        exports_bell,
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
        channels,
        listeners,
        exports,
        exports_bell,
        resv,
        metrics,
        secrets_key,
    } = parts;
    let restart = started.mode == StartMode::Restart;
    let generation = started.generation;
    let mut channels = channels.into_iter();
    let backend = match channels.next() {
        Some(c) => Some(Backend::new(
            c.pool, c.submit, c.complete, generation, restart,
        )?),
        None => {
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
    let tls_ports = ports.iter().filter(|p| p.tls).count();
    let target = Arc::new(Target::new(topology, ports));
    if tls_ports > 0 {
        // Before the sandbox: OpenSSL reads its configuration when the context is built.
        target.set_tls(crate::tls::TlsServer::new()?);
        if secrets_key.is_none() {
            tracing::warn!(
                "TLS listeners but no secrets key ([secrets] key_file): every TLS connection \
                 is refused"
            );
        }
        tracing::info!(
            listeners = tls_ports,
            "TLS 1.3 with PSK required on these listeners"
        );
    }
    if let Some(key) = secrets_key {
        target.set_secrets_key(key);
    }
    match metrics {
        Some(m) => target.set_metrics(m),
        None => tracing::debug!("no metrics region: the node keeps no metrics"),
    }
    match resv {
        Some(channel) => target.set_resv_client(
            crate::resv_channel::ResvClient::new(channel)
                .context("cannot watch the reservation channel")?,
        ),
        None => tracing::info!("no reservation channel: reservation commands are refused"),
    }
    match (exports, exports_bell) {
        (Some(region), bell) => {
            if bell.is_none() {
                tracing::warn!("no `{EXPORTS_BELL_RESOURCE}`: the export table is read once");
            }
            let feed =
                ExportsFeed::new(region, bell).context("cannot watch the exports doorbell")?;
            feed.refresh(&target);
            tokio::task::spawn_local(feed.run(Arc::clone(&target)));
        }
        (None, Some(_)) => {
            tracing::warn!("`{EXPORTS_BELL_RESOURCE}` without `{EXPORTS_RESOURCE}`: ignored");
        }
        (None, None) => {}
    }
    let started = Arc::new(started);
    {
        let started = Arc::clone(&started);
        target.set_event_sink(Box::new(move |level, kind, message| {
            if let Err(e) = started.event(level, kind, message) {
                tracing::warn!(error = %e, kind, "cannot send an event to duplexd");
            }
        }));
    }
    let (tx, mut events) = mpsc::unbounded_channel();
    lifecycle::spawn_control_thread(Arc::clone(&started), move |_, event| tx.send(event).is_ok())
        .context("cannot start the lifecycle thread")?;
    let every = (health.interval() / 4).max(Duration::from_millis(1));
    // The heartbeat proves this thread; the other I/O threads prove themselves to it.
    let live = server::Liveness::new(channels.len());
    {
        let live = Arc::clone(&live);
        let limit = (health.interval() * STALL_INTERVALS).max(MIN_STALL);
        tokio::task::spawn_local(async move {
            let mut watch = server::LivenessWatch::new(&live, limit, Instant::now());
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                if watch.all_alive(&live, Instant::now()) {
                    health.beat();
                }
            }
        });
    }
    // Everything is attached, registered with the reactor, and the lifecycle thread exists:
    // from here on the policy holds.
    // The other I/O threads, each with its channel, before the sandbox (making a thread and a
    // runtime takes system calls the policy does not allow); the target is complete by now.
    let mut workers = Vec::new();
    for (i, c) in channels.enumerate() {
        workers.push(server::Worker::start(
            i + 1,
            Arc::clone(&target),
            Arc::clone(&live),
            every,
            move || {
                let backend = Backend::new(c.pool, c.submit, c.complete, generation, restart)?;
                Ok(Some(backend))
            },
        )?);
    }
    duplex_sandbox::enter(SERVICE).context("cannot enter the sandbox")?;
    started.ready()?;
    tracing::info!(
        generation = started.generation,
        mode = ?started.mode,
        subsystems = target.subsystems().len(),
        io_threads = workers.len() + 1,
        exports_generation = target.exports_generation(),
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
    server::serve(target, backend, socks, workers, stop).await;
    Ok(())
}
