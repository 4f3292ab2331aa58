//! `duplex-fabric`: the NVMe/TCP target service. Spawned by duplexd; not run by hand. See
//! `duplex_fabric::service`.

use std::process::ExitCode;

fn main() -> ExitCode {
    duplex_ipc::lifecycle::init_logging();
    duplex_ipc::lifecycle::abort_on_panic();
    match duplex_fabric::service::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex-fabric: {e:#}");
            ExitCode::FAILURE
        }
    }
}
