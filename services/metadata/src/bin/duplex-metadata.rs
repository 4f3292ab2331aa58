//! `duplex-metadata`: the metadata service. Spawned by duplexd with its lifecycle channel; not
//! run by hand. See `duplex_metadata::service`.
//!
//! One option, a test hook given through the node config's `[[service]] args`:
//! `--crash-in-commit K` aborts the service right after the K-th drive write or flush of every
//! configuration request (`duplex_metadata::ring::CrashPoint`): the system tests crash it at
//! chosen points inside a commit with it.

use std::process::ExitCode;

use duplex_ipc::lifecycle;
use duplex_metadata::ring::CrashPoint;
use duplex_metadata::service;

fn main() -> ExitCode {
    lifecycle::init_logging();
    lifecycle::abort_on_panic();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let crash = match args.as_slice() {
        [] => None,
        [flag, k] if flag == "--crash-in-commit" => match k.parse::<u32>() {
            Ok(k) if k > 0 => Some(k),
            _ => {
                eprintln!("duplex-metadata: --crash-in-commit takes a count from 1, not `{k}`");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("duplex-metadata: usage: duplex-metadata [--crash-in-commit K] (spawned by duplexd)");
            return ExitCode::from(2);
        }
    };
    match service::run(
        || {
            duplex_sandbox::enter(service::SERVICE)
                .map_err(|e| anyhow::anyhow!("cannot enter the sandbox: {e}"))
        },
        CrashPoint::after(crash),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex-metadata: {e:#}");
            ExitCode::FAILURE
        }
    }
}
