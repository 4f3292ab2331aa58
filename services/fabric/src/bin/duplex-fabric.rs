//! `duplex-fabric`: the NVMe/TCP target service. Spawned by duplexd; not run by hand. See
//! `duplex_fabric::service`.

use std::process::ExitCode;

fn main() -> ExitCode {
    // Plain lines on stderr: duplexd prefixes them with service, pid and generation.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .init();
    duplex_ipc::lifecycle::abort_on_panic();
    match duplex_fabric::service::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex-fabric: {e:#}");
            ExitCode::FAILURE
        }
    }
}
