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

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

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
    pub fn start<F>(index: usize, target: Arc<Target>, backend: F) -> anyhow::Result<Self>
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
