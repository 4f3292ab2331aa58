//! The fabric's listeners and accept loops.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use duplex_ipc::control::RateLimiter;

use crate::backend::Backend;
use crate::conn;
use crate::queue::Shared;
use crate::subsystem::Port;
use crate::target::Target;

/// Connections one fabric process serves at most.
pub const MAX_CONNECTIONS: usize = 1024;

/// A listener handed to the fabric, with what it serves.
#[derive(Debug)]
pub struct Listener {
    /// The socket, already listening.
    pub socket: tokio::net::TcpListener,
    /// Its port.
    pub port: Port,
}

/// Serves until `stop` resolves: accepts on every listener, routes completions.
pub async fn serve(
    target: Rc<Target>,
    backend: Option<Rc<Backend>>,
    listeners: Vec<Listener>,
    stop: impl std::future::Future<Output = ()>,
) {
    let shared = Rc::new(Shared {
        target: target.clone(),
        backend: backend.clone(),
        connections: Cell::new(0),
        max_connections: MAX_CONNECTIONS,
        warn_limit: RefCell::new(RateLimiter::new(20, Duration::from_secs(10))),
    });
    if let Some(b) = backend {
        tokio::task::spawn_local(async move {
            if let Err(e) = b.run().await {
                tracing::error!(error = %e, "datapath channel failed: I/O commands will fail");
            }
        });
    }
    for l in listeners {
        let shared = shared.clone();
        tracing::info!(address = %l.port.addr, kind = ?l.port.kind, "listening");
        tokio::task::spawn_local(accept_loop(l, shared));
    }
    stop.await;
    tracing::info!(
        connections = shared.connections.get(),
        controllers = target.controller_count(),
        "stopping: closing every connection"
    );
    target.shutdown.notify_waiters();
    // Give connection tasks a moment to send what they have queued.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn accept_loop(l: Listener, shared: Rc<Shared>) {
    loop {
        match l.socket.accept().await {
            Ok((stream, _)) => {
                tokio::task::spawn_local(conn::serve(stream, shared.clone(), l.port.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
