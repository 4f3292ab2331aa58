//! `duplex-mgmt`: the mgmt service. Spawned by duplexd with its lifecycle channel; not run by
//! hand. See `duplex_mgmt::server`.

use std::process::ExitCode;

use duplex_ipc::lifecycle;
use duplex_mgmt::server;

fn main() -> ExitCode {
    duplex_ipc::lifecycle::init_logging();
    lifecycle::abort_on_panic();
    // Before the sandbox: OpenSSL reads its configuration when the TLS context is built.
    let remote = match duplex_mgmt::remote::RemoteServer::prepare() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("duplex-mgmt: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Then: everything mgmt does itself, the lifecycle handshake included, happens under the
    // filter.
    if let Err(e) = duplex_sandbox::enter(server::SERVICE) {
        eprintln!("duplex-mgmt: {:#}", anyhow::Error::from(e));
        return ExitCode::FAILURE;
    }
    match server::run(remote) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex-mgmt: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
