//! A minimal service for the supervisor's system tests. Not a user tool.
//!
//! Does the lifecycle handshake, attaches every handed-over ring and pool (proving the fds are the
//! real objects), says Ready, then waits for Shutdown. `--exit-after-ready` makes it exit at once
//! with status 3 (a crash loop on demand).

use std::process::ExitCode;
use std::time::Duration;

use duplex_ipc::control::{Body, ControlError, ResourceKind};
use duplex_ipc::desc::IoDesc;
use duplex_ipc::lifecycle;
use duplex_ipc::pool::{Holder, Pool};
use duplex_ipc::ring::RingRegion;

fn main() -> ExitCode {
    let name = std::env::var("DUPLEX_SERVICE").unwrap_or_else(|_| "test".into());
    match run(&name) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("duplex-test-service {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(name: &str) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut started = lifecycle::start(name, Duration::from_secs(30))?;
    let mut attached = 0;
    for r in std::mem::take(&mut started.resources) {
        match r.kind {
            ResourceKind::RingRegion => {
                RingRegion::<IoDesc>::attach(r.fd)?;
            }
            ResourceKind::Pool => {
                Pool::attach(
                    r.fd,
                    Holder {
                        role: 9,
                        incarnation: started.generation,
                    },
                )?;
            }
            _ => {}
        }
        attached += 1;
    }
    started.ready()?;
    // One write, so the line is not interleaved with other writers of the shared log pipe.
    let line = format!(
        "duplex-test-service {name}: generation {} ready with {attached} resources\n",
        started.generation
    );
    std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes())?;
    if std::env::args().any(|a| a == "--exit-after-ready") {
        return Ok(ExitCode::from(3));
    }
    loop {
        match started.channel.recv_timeout(Duration::from_secs(1)) {
            Ok(Some((env, _))) if matches!(env.body, Body::Shutdown { .. }) => {
                return Ok(ExitCode::SUCCESS)
            }
            Ok(_) => {}
            Err(ControlError::PeerClosed) => return Ok(ExitCode::SUCCESS),
            Err(e) => return Err(e.into()),
        }
    }
}
