//! `duplex-datapath`: the datapath service. Spawned by duplexd with its lifecycle channel; not
//! run by hand. See `duplex_datapath::service`.

use std::process::ExitCode;

use duplex_datapath::service;
use duplex_ipc::lifecycle;

fn main() -> ExitCode {
    duplex_ipc::lifecycle::init_logging();
    lifecycle::abort_on_panic();
    match service::run(|| duplex_sandbox::enter(service::SERVICE)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex-datapath: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
