//! `duplex-metadata`: the metadata service. Spawned by duplexd with its lifecycle channel; not
//! run by hand. See `duplex_metadata::service`.

use std::process::ExitCode;

use duplex_ipc::lifecycle;
use duplex_metadata::service;

fn main() -> ExitCode {
    lifecycle::init_logging();
    lifecycle::abort_on_panic();
    match service::run(|| {
        duplex_sandbox::enter(service::SERVICE)
            .map_err(|e| anyhow::anyhow!("cannot enter the sandbox: {e}"))
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex-metadata: {e:#}");
            ExitCode::FAILURE
        }
    }
}
