//! `duplexd`: the duplex node supervisor.
//!
//! Validates the node config, takes its state directory (one duplexd per directory), creates the
//! shared resources and listening sockets, spawns and supervises the services, and on SIGTERM or
//! SIGINT stops them in reverse dependency order and exits 0.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use duplex_supervisor::config::NodeConfig;
use duplex_supervisor::lock::StateLock;
use duplex_supervisor::node::Node;

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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    // Block the handled signals before anything else so none is lost; the node reads them from
    // a signalfd.
    Node::signal_mask()
        .thread_block()
        .context("blocking signals")?;
    let _lock = StateLock::acquire(config.node.state_dir.get_ref())?;
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
        .unwrap_or_default();
    tracing::info!(node = %config.node.name.get_ref(), state_dir = %config.node.state_dir.get_ref().display(), "duplexd starting");
    let node = Node::new(config, exe_dir)?;
    if node.run()? {
        anyhow::bail!("node failed: the datapath died");
    }
    Ok(())
}
