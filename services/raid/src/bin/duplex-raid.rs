//! `duplex-raid`: the raid service. Spawned by duplexd with its lifecycle channel; not run by
//! hand. See `duplex_raid::service`.

use std::process::ExitCode;

use duplex_ipc::lifecycle;
use duplex_raid::service;

fn main() -> ExitCode {
    lifecycle::init_logging();
    lifecycle::abort_on_panic();
    if std::env::args().len() > 1 {
        eprintln!("duplex-raid: takes no arguments (spawned by duplexd)");
        return ExitCode::from(2);
    }
    match service::run(|| {
        duplex_sandbox::enter(service::SERVICE)
            .map_err(|e| anyhow::anyhow!("cannot enter the sandbox: {e}"))
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex-raid: {e:#}");
            ExitCode::FAILURE
        }
    }
}
