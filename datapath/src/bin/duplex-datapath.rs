//! `duplex-datapath`: the datapath service. Spawned by duplexd with its lifecycle channel; not
//! run by hand. See `duplex_datapath::service`.

use std::process::ExitCode;

use duplex_datapath::service;
use duplex_ipc::lifecycle;

fn main() -> ExitCode {
    // Plain lines on stderr: the supervisor prefixes them with service, pid and generation.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .init();
    lifecycle::abort_on_panic();
    match service::run(|| duplex_sandbox::enter(service::SERVICE)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex-datapath: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
