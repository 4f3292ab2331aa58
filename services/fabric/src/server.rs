//! The fabric's listeners, accept loops and I/O threads.
//!
//! The runtime thread accepts on every listener and deals the connections out in turn over the
//! I/O threads: itself (thread 0) and the [`Worker`]s. Each I/O thread is a tokio
//! current-thread runtime of its own with its own datapath channel ([`Backend`]): a connection
//! lives on one thread from its first byte to its last, and its commands go to the datapath
//! on that thread's rings, so the per-command path takes no lock between threads. What they
//! share (the target, subsystems, controllers: an admin queue may be on one thread and the I/O
//! queues of its controller on others) is behind atomics and short locks
//! ([`crate::cells`]).
//!
//! The heartbeat runs on the runtime thread, so it proves that thread alive and no other. Each
//! worker's runtime therefore ticks a counter of its own ([`Liveness`]), and the heartbeat
//! beats only while every counter moves ([`LivenessWatch`]): a worker stuck in a loop that never
//! yields, or in a blocking call, stalls its connections while the process looks alive, so the
//! fabric stops beating and duplexd restarts it (the datapath keeps its volumes; the hosts
//! reconnect).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::conn;
use crate::queue::Shared;
use crate::subsystem::Port;
use crate::target::Target;

/// A listener handed to the fabric, with what it serves.
#[derive(Debug)]
pub struct Listener {
    /// The socket, already listening.
    pub socket: tokio::net::TcpListener,
    /// Its port.
    pub port: Port,
}

/// An I/O thread besides the runtime thread: connections handed to it are served there.
#[derive(Debug)]
pub struct Worker {
    index: usize,
    connections: mpsc::UnboundedSender<(std::net::TcpStream, Port)>,
}

impl Worker {
    /// Starts I/O thread `index` (1 and up): its runtime, then its datapath channel, built by
    /// `backend` on the thread itself (its doorbells join that thread's reactor). Returns once
    /// the thread is ready to serve, or with why it could not start. Call it before entering
    /// the sandbox: making a thread and a runtime takes system calls the policy does not allow.
    ///
    /// The thread's runtime ticks its counter in `live` every `tick` for as long as it runs.
    pub fn start<F>(
        index: usize,
        target: Arc<Target>,
        live: Arc<Liveness>,
        tick: Duration,
        backend: F,
    ) -> anyhow::Result<Self>
    where
        F: FnOnce() -> anyhow::Result<Option<Rc<Backend>>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(std::net::TcpStream, Port)>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
        std::thread::Builder::new()
            .name(format!("fabric-io{index}"))
            .spawn(move || {
                // A panic on an I/O thread would leave its connections hanging while the
                // rest of the process looks alive: stop the whole service (duplexd restarts
                // it, hosts reconnect).
                struct AbortOnPanic(usize);
                impl Drop for AbortOnPanic {
                    fn drop(&mut self) {
                        if std::thread::panicking() {
                            tracing::error!(thread = self.0, "fabric I/O thread panicked: aborting");
                            std::process::abort();
                        }
                    }
                }
                let _abort = AbortOnPanic(index);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot build its runtime: {e}")));
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let backend = match backend() {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("{e:#}")));
                            return;
                        }
                    };
                    let shared = Rc::new(Shared::new(target, backend, index));
                    route_completions(&shared);
                    tokio::task::spawn_local(async move {
                        let mut ticks = tokio::time::interval(tick);
                        loop {
                            ticks.tick().await;
                            live.tick(index);
                        }
                    });
                    let _ = ready_tx.send(Ok(()));
                    drop(ready_tx);
                    while let Some((stream, port)) = rx.recv().await {
                        match tokio::net::TcpStream::from_std(stream) {
                            Ok(s) => {
                                tokio::task::spawn_local(conn::serve(s, Rc::clone(&shared), port));
                            }
                            Err(e) => {
                                tracing::warn!(thread = index, error = %e, "cannot take a connection")
                            }
                        }
                    }
                    // The runtime thread stopped dealing: serve what is open until the
                    // process ends (as the runtime thread's own connections are).
                    std::future::pending::<()>().await;
                });
            })
            .map_err(|e| anyhow::anyhow!("cannot start fabric I/O thread {index}: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                index,
                connections: tx,
            }),
            Ok(Err(e)) => Err(anyhow::anyhow!("fabric I/O thread {index}: {e}")),
            Err(_) => Err(anyhow::anyhow!(
                "fabric I/O thread {index} ended before it was ready"
            )),
        }
    }
}

/// Tick counters of the worker threads (1 and up), each moved by its thread's runtime.
#[derive(Debug)]
pub struct Liveness {
    ticks: Vec<AtomicU64>,
}

impl Liveness {
    /// Counters for `workers` worker threads (threads 1 to `workers`).
    pub fn new(workers: usize) -> Arc<Self> {
        Arc::new(Self {
            ticks: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// How many worker threads it counts.
    pub fn workers(&self) -> usize {
        self.ticks.len()
    }

    /// Thread `index` (1 and up) is alive.
    pub fn tick(&self, index: usize) {
        if let Some(t) = index.checked_sub(1).and_then(|i| self.ticks.get(i)) {
            t.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Thread `index`'s count (1 and up; 0 for a thread it does not count).
    pub fn count(&self, index: usize) -> u64 {
        index
            .checked_sub(1)
            .and_then(|i| self.ticks.get(i))
            .map_or(0, |t| t.load(Ordering::Relaxed))
    }
}

/// The heartbeat's view of [`Liveness`]: each worker's last count and when it last moved.
#[derive(Debug)]
pub struct LivenessWatch {
    seen: Vec<(u64, Instant)>,
    stalled: Vec<bool>,
    limit: Duration,
    last_look: Instant,
}

impl LivenessWatch {
    /// Watches `live`; a thread whose count stands still for longer than `limit` is stalled.
    pub fn new(live: &Liveness, limit: Duration, now: Instant) -> Self {
        let n = live.workers();
        Self {
            seen: (1..=n).map(|i| (live.count(i), now)).collect(),
            stalled: vec![false; n],
            limit,
            last_look: now,
        }
    }

    /// Whether thread `index` (1 and up) was found stalled at the last look.
    pub fn is_stalled(&self, index: usize) -> bool {
        index
            .checked_sub(1)
            .and_then(|i| self.stalled.get(i))
            .copied()
            .unwrap_or(false)
    }

    /// True while every worker's count moved within the limit. A thread found stalled is
    /// logged once (and once more should it come back). A look that comes more than half the
    /// limit after the previous one judges nothing: the watcher itself did not run (the whole
    /// process paused or starved), so the others' silence says nothing; every thread starts
    /// over from this look.
    pub fn all_alive(&mut self, live: &Liveness, now: Instant) -> bool {
        let late = now.saturating_duration_since(self.last_look) > self.limit / 2;
        self.last_look = now;
        if late {
            for (i, seen) in self.seen.iter_mut().enumerate() {
                *seen = (live.count(i + 1), now);
            }
            return true;
        }
        let mut all = true;
        for (i, (seen, stalled)) in self.seen.iter_mut().zip(&mut self.stalled).enumerate() {
            let index = i + 1;
            let count = live.count(index);
            if count != seen.0 {
                *seen = (count, now);
                if *stalled {
                    *stalled = false;
                    tracing::warn!(thread = index, "fabric I/O thread runs again");
                }
                continue;
            }
            if now.saturating_duration_since(seen.1) > self.limit {
                all = false;
                if !*stalled {
                    *stalled = true;
                    tracing::error!(
                        thread = index,
                        stalled_ms =
                            u64::try_from(now.saturating_duration_since(seen.1).as_millis())
                                .unwrap_or(u64::MAX),
                        "fabric I/O thread stopped running: its connections are stalled; the \
                         heartbeat stops so that duplexd restarts the fabric"
                    );
                }
            }
        }
        all
    }
}

/// Hands the thread's datapath completions to their commands, for as long as the thread runs.
fn route_completions(shared: &Rc<Shared>) {
    if let Some(b) = shared.backend.clone() {
        let thread = shared.thread;
        tokio::task::spawn_local(async move {
            if let Err(e) = b.run().await {
                tracing::error!(thread, error = %e, "datapath channel failed: I/O commands will fail");
            }
        });
    }
}

/// Where the runtime thread sends the next connection: itself, then each worker, in turn.
struct Dealer {
    shared: Rc<Shared>,
    workers: Vec<Worker>,
    next: Cell<usize>,
}

impl Dealer {
    fn deal(&self, stream: tokio::net::TcpStream, port: Port) {
        let turn = self.next.get();
        self.next.set((turn + 1) % (self.workers.len() + 1));
        let Some(worker) = turn.checked_sub(1).and_then(|i| self.workers.get(i)) else {
            tokio::task::spawn_local(conn::serve(stream, Rc::clone(&self.shared), port));
            return;
        };
        match stream.into_std() {
            Ok(s) => {
                if worker.connections.send((s, port)).is_err() {
                    // Only if the thread is gone, which aborts the process: nothing to serve.
                    tracing::error!(
                        thread = worker.index,
                        "fabric I/O thread gone: connection dropped"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot hand a connection over"),
        }
    }
}

/// Serves until `stop` resolves: accepts on every listener, deals connections out over this
/// thread and `workers`, routes this thread's completions.
pub async fn serve(
    target: Arc<Target>,
    backend: Option<Rc<Backend>>,
    listeners: Vec<Listener>,
    workers: Vec<Worker>,
    stop: impl std::future::Future<Output = ()>,
) {
    let shared = Rc::new(Shared::new(target.clone(), backend, 0));
    route_completions(&shared);
    let threads = workers.len() + 1;
    let dealer = Rc::new(Dealer {
        shared,
        workers,
        next: Cell::new(0),
    });
    for l in listeners {
        tracing::info!(address = %l.port.addr, kind = ?l.port.kind, threads, "listening");
        tokio::task::spawn_local(accept_loop(l, Rc::clone(&dealer)));
    }
    stop.await;
    tracing::info!(
        connections = target.connection_count(),
        controllers = target.controller_count(),
        "stopping: closing every connection"
    );
    target.shutdown.notify_waiters();
    // Give connection tasks a moment to send what they have queued.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn accept_loop(l: Listener, dealer: Rc<Dealer>) {
    loop {
        match l.socket.accept().await {
            Ok((stream, _)) => dealer.deal(stream, l.port.clone()),
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_closes_on_a_thread_that_stops_ticking_and_opens_when_it_runs_again() {
        let live = Liveness::new(2);
        let limit = Duration::from_millis(100);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut watch = LivenessWatch::new(&live, limit, t0);
        // Within the limit nobody has to have ticked yet.
        assert!(watch.all_alive(&live, at(50)));
        assert!(watch.all_alive(&live, at(100)));
        live.tick(1);
        live.tick(2);
        assert!(watch.all_alive(&live, at(150)));
        // Thread 1 keeps ticking, thread 2 stops: still alive up to the limit, not after.
        live.tick(1);
        assert!(watch.all_alive(&live, at(200)));
        live.tick(1);
        assert!(watch.all_alive(&live, at(250)));
        live.tick(1);
        assert!(!watch.all_alive(&live, at(251)));
        assert!(watch.is_stalled(2));
        assert!(!watch.is_stalled(1));
        // Stays closed while it stays still; opens once it ticks again.
        live.tick(1);
        assert!(!watch.all_alive(&live, at(300)));
        live.tick(2);
        assert!(watch.all_alive(&live, at(301)));
        assert!(!watch.is_stalled(2));
        // Ticks for threads it does not count change nothing.
        live.tick(0);
        live.tick(3);
        assert_eq!((live.count(0), live.count(3)), (0, 0));
    }

    #[test]
    fn a_late_look_judges_nothing_and_starts_every_thread_over() {
        let live = Liveness::new(1);
        let limit = Duration::from_millis(100);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut watch = LivenessWatch::new(&live, limit, t0);
        assert!(watch.all_alive(&live, at(40)));
        // The watcher did not run for 500 ms (the process paused): no verdict on thread 1.
        assert!(watch.all_alive(&live, at(540)));
        assert!(!watch.is_stalled(1));
        // From there, the limit counts again from that look.
        assert!(watch.all_alive(&live, at(590)));
        assert!(watch.all_alive(&live, at(640)));
        assert!(!watch.all_alive(&live, at(641)));
        assert!(watch.is_stalled(1));
    }

    #[test]
    fn a_watch_over_no_workers_is_always_open() {
        let live = Liveness::new(0);
        let t0 = Instant::now();
        let mut watch = LivenessWatch::new(&live, Duration::ZERO, t0);
        assert!(watch.all_alive(&live, t0 + Duration::from_secs(3600)));
    }
}
