//! `duplexd`: the duplex node supervisor.
//!
//! Today it validates the node config, takes its state directory (one duplexd per directory) and
//! runs until SIGTERM or SIGINT. Spawning and supervising services is being built (issue 3).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use duplex_supervisor::config::NodeConfig;
use duplex_supervisor::lock::StateLock;
use nix::sys::signal::{SigSet, Signal};

/// The duplex node supervisor.
#[derive(Debug, Parser)]
#[command(name = "duplexd", version)]
struct Args {
    /// Node config file (TOML).
    #[arg(short, long, value_name = "FILE")]
    config: PathBuf,
    /// Validate the config and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("duplexd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let config = NodeConfig::load(&args.config)?;
    if args.check {
        println!(
            "{}: ok ({} services)",
            args.config.display(),
            config.services.len()
        );
        return Ok(());
    }
    // Block the stop signals before anything else so none is lost; they are taken synchronously.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.thread_block().context("blocking signals")?;
    let _lock = StateLock::acquire(config.node.state_dir.get_ref())?;
    tracing::info!(node = %config.node.name.get_ref(), state_dir = %config.node.state_dir.get_ref().display(), "duplexd running");
    let signal = stop.wait().context("waiting for signals")?;
    tracing::info!(?signal, "stopping");
    Ok(())
}
