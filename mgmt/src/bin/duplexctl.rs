//! `duplexctl`: the operator's command-line client of a duplex node. See `docs/OPERATOR.md`.
//!
//! Exit status: 0 success, 1 failure (one line on stderr, `duplexctl: ...`), 2 usage error.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use duplex_ipc::admin::CrashMode;
use duplex_mgmt::client::{self, Answer, Outcome, Request, Target};
use duplex_mgmt::render;

/// Manage a duplex storage node through its mgmt service.
#[derive(Debug, Parser)]
#[command(name = "duplexctl", version)]
struct Cli {
    /// The node's state directory (holds mgmt.sock and duplexd.lock).
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = "DUPLEX_STATE_DIR",
        default_value = "/var/lib/duplex"
    )]
    state_dir: PathBuf,
    /// The management socket [default: mgmt.sock in the state directory].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print one JSON document instead of text (errors stay one line on stderr).
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to keep trying while mgmt does not answer (it may be restarting).
    #[arg(long, global = true, value_name = "SECS", default_value = "10", value_parser = parse_timeout)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Node summary: name, supervisor, services running, sandbox.
    Status,
    /// The service table and actions on services.
    #[command(subcommand)]
    Service(ServiceCommand),
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// Every service: state, pid, generation, restarts, hangs, uptime, last exit.
    List,
    /// Stop a service and start it again (also brings a failed one back).
    Restart {
        /// The service's name.
        name: String,
    },
    /// Make a service fail on purpose (crash-injection testing).
    Crash {
        /// The service's name.
        name: String,
        /// How it fails.
        #[arg(long, value_enum)]
        mode: Mode,
    },
}

/// `--mode` of `service crash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// The supervisor sends SIGKILL.
    Kill,
    /// The service panics and aborts (SIGABRT).
    Panic,
    /// The service stops its heartbeat and blocks; the watchdog must kill it.
    Hang,
    /// The service makes a system call its seccomp policy forbids (SIGSYS).
    ForbiddenSyscall,
}

impl From<Mode> for CrashMode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Kill => Self::Kill,
            Mode::Panic => Self::Panic,
            Mode::Hang => Self::Hang,
            Mode::ForbiddenSyscall => Self::ForbiddenSyscall,
        }
    }
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err("must be more than 0 and at most 86400 seconds".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// One line on stderr, exit status 1.
fn fail(message: &str) -> ExitCode {
    eprintln!("duplexctl: {}", duplex_mgmt::server::one_line(message));
    ExitCode::FAILURE
}

/// A clap error as one line: the first paragraph of its message, without `error: `.
fn usage_error(e: &clap::Error) -> ExitCode {
    let rendered = e.render().to_string();
    let first = rendered.split("\n\n").next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!(
        "duplexctl: {} (see duplexctl --help)",
        duplex_mgmt::server::one_line(first)
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    // Help and version go to stdout, exit 0.
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => usage_error(&e),
            };
        }
    };
    let request = match &cli.command {
        Command::Status => Request::Status,
        Command::Service(ServiceCommand::List) => Request::ListServices,
        Command::Service(ServiceCommand::Restart { name }) => Request::Restart(name.clone()),
        Command::Service(ServiceCommand::Crash { name, mode }) => Request::Crash {
            name: name.clone(),
            mode: (*mode).into(),
        },
    };
    let target = Target {
        socket: cli
            .socket
            .clone()
            .unwrap_or_else(|| cli.state_dir.join("mgmt.sock")),
        state_dir: cli.state_dir.clone(),
        timeout: cli.timeout,
    };
    match client::call(&target, &request) {
        Ok(outcome) => match print(&cli, &request, &outcome) {
            Ok(()) => ExitCode::SUCCESS,
            // A reader that stopped reading (`| head`) has what it wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => fail(&format!("cannot write the output: {e}")),
        },
        Err(e) => fail(&e.to_string()),
    }
}

fn print(cli: &Cli, request: &Request, outcome: &Outcome) -> std::io::Result<()> {
    let text = match (outcome, cli.json) {
        (Outcome::Answer(Answer::Status(s)), false) => render::status_text(s),
        (Outcome::Answer(Answer::Status(s)), true) => json(&render::status_json(s))?,
        (Outcome::Answer(Answer::Services(list)), false) => render::services_table(list),
        (Outcome::Answer(Answer::Services(list)), true) => json(&render::services_json(list))?,
        (Outcome::Answer(Answer::Done(message)), false) => {
            format!("{}\n", render::printable(message))
        }
        (Outcome::Answer(Answer::Done(message)), true) => json(&render::MessageJson {
            message,
            mgmt_went_down: false,
        })?,
        (Outcome::MgmtWentDown, json_wanted) => {
            let what = match request {
                Request::Crash { mode, .. } => format!("crash --mode {}", mode.name()),
                _ => "restart".into(),
            };
            let message = format!("mgmt went down as asked ({what}) before it could answer");
            if json_wanted {
                json(&render::MessageJson {
                    message: &message,
                    mgmt_went_down: true,
                })?
            } else {
                format!("{message}\n")
            }
        }
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

fn json(value: &impl serde::Serialize) -> std::io::Result<String> {
    let mut text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    text.push('\n');
    Ok(text)
}
