//! `duplexd`: the duplex node supervisor.
//!
//! Validates the node config, takes its state directory (one duplexd per directory), creates the
//! shared resources and listening sockets, spawns and supervises the services, and on SIGTERM or
//! SIGINT stops them in reverse dependency order and exits 0.

use std::path::PathBuf;
use std::process::ExitCode;

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
    // Block the handled signals before any thread exists (the log writer's included), so that
    // every thread inherits the mask and none is lost or kills us by its default action; the
    // node reads them from a signalfd.
    if let Err(e) = Node::signal_mask().thread_block() {
        eprintln!("duplexd: blocking signals: {e}");
        return ExitCode::FAILURE;
    }
    // duplexd's own log and every service's output (which it passes on line by line) go through
    // one lossy queue drained by a writer thread: a slow reader of stderr makes duplexd drop log
    // lines (the writer counts them), never block.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .thread_name("duplexd-log")
        .finish(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = run(&args);
    // Flush the log before the final line.
    drop(guard);
    match result {
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
    config
        .mgmt_key()
        .map_err(|why| anyhow::anyhow!("{}: {why}", args.config.display()))?;
    if args.check {
        println!(
            "{}: ok ({} services)",
            args.config.display(),
            config.services.len()
        );
        return Ok(());
    }
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
