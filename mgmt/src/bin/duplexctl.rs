//! `duplexctl`: the operator's command-line client of a duplex node. See `docs/OPERATOR.md`.
//!
//! Exit status: 0 success, 1 failure (one line on stderr, `duplexctl: ...`), 2 usage error
//! (also one line; nothing is contacted).

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use duplex_ipc::admin::CrashMode;
use duplex_ipc::config::{
    check_name, check_nqn, ConfigReply, ConfigRequest, HostSecrets, RaidLevel,
};
use duplex_mgmt::client::{self, Answer, Outcome, Request, Target};
use duplex_mgmt::render;
use duplex_mgmt::units::{parse_chunk, parse_size};

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
    /// Manage a node from afar: its remote management listener (`host:port`, a mgmt
    /// `[[listener]]` with `tls = true`); needs --key-file.
    #[arg(long, global = true, value_name = "HOST:PORT", env = "DUPLEX_CONNECT")]
    connect: Option<String>,
    /// The node's mgmt key (`[mgmt] key_file`: 64 hex digits), proven in TLS 1.3 to the node
    /// given by --connect.
    #[arg(long, global = true, value_name = "FILE", env = "DUPLEX_KEY_FILE")]
    key_file: Option<PathBuf>,
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
    /// The drives the node sees.
    #[command(subcommand)]
    Drive(DriveCommand),
    /// Pools: RAID sets of drives that volumes are carved from.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Volumes: thick allocations in a pool, exported as namespaces.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// NVMe subsystems hosts connect to.
    #[command(subcommand)]
    Subsystem(SubsystemCommand),
    /// Namespaces: volumes exported in a subsystem.
    #[command(subcommand)]
    Namespace(NamespaceCommand),
    /// Which hosts may connect to a subsystem.
    #[command(subcommand)]
    Host(HostCommand),
    /// The two-controller array: membership with the peer.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The node's events, oldest first: takeovers, fencing, failed drives, rebuilds,
    /// configuration changes, service crashes, refused hosts. Kept by duplexd in the state
    /// directory, across restarts of mgmt, of every service and of duplexd.
    Events {
        /// Only events numbered above this one.
        #[arg(long, value_name = "SEQ", default_value = "0")]
        after: u64,
        /// Keep printing events as they come (until interrupted); with --json, one JSON
        /// object per line.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// This node and its peer as the cluster service sees them: node ids and boots, the
    /// peer's state, how long ago each heartbeat was heard, the drives' reservation keys,
    /// each pool's owner and epoch.
    Status,
    /// The cluster service's events, oldest first: the peer's state changing, fencing,
    /// takeovers and their refusals, this node fenced, the host link.
    Events,
}

#[derive(Debug, Subcommand)]
enum DriveCommand {
    /// Every drive: state, pool and slot, size, model, serial, address.
    List,
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Make a pool of free drives.
    Create {
        /// The pool's name (1 to 64 bytes).
        #[arg(value_parser = parse_name)]
        name: String,
        /// RAID level: 0 (striping), 1 (mirroring), 10 (striped mirror pairs).
        #[arg(long, value_enum)]
        raid: Raid,
        /// Free drives, comma-separated, in slot order (RAID 10 pairs: slots 0+1, 2+3, ...).
        #[arg(long, value_name = "D1,D2,...", value_delimiter = ',', required = true, value_parser = parse_name)]
        drives: Vec<String>,
        /// Stripe chunk: a power of two from 4k to 1m [default: 64k].
        #[arg(long, value_name = "SIZE", value_parser = parse_chunk_arg)]
        chunk: Option<u32>,
    },
    /// Every pool: RAID level, size, allocation, state.
    List,
    /// One pool: its state and its members.
    Show {
        /// The pool.
        #[arg(value_parser = parse_name)]
        name: String,
    },
    /// Forget a pool; its drives become free.
    Destroy {
        /// The pool.
        #[arg(value_parser = parse_name)]
        name: String,
        /// Also delete its volumes and the namespaces exporting them.
        #[arg(long)]
        force: bool,
    },
    /// Move a pool this node owns to the peer controller (a planned giveback, under I/O): its
    /// ANA group goes to change, its I/O drains, its ownership goes to NODE with the next
    /// epoch; NODE serves it once it has read the change.
    Move {
        /// The pool.
        #[arg(value_parser = parse_name)]
        name: String,
        /// The node id to move it to (the peer's, 1..=4).
        #[arg(long = "to", value_name = "NODE", value_parser = clap::value_parser!(u16).range(1..=4))]
        node: u16,
    },
    /// Check a RAID 5 or 6 pool's parity against its data everywhere, rewriting what
    /// disagrees, while hosts keep working; `pool show` says how far it got and what it found.
    Scrub {
        /// The pool.
        #[arg(value_parser = parse_name)]
        name: String,
        /// Scrub at most this many bytes per second of each member (`50M`; `auto`: yield to
        /// host I/O, the default); the same as `pool rate` first.
        #[arg(long, value_parser = parse_rate_arg)]
        rate: Option<u64>,
    },
    /// Reserve a free drive as a hot spare of a RAID 5 or 6 pool: when a member fails, the
    /// spare takes its slot and is rebuilt at once, with no operator.
    AddSpare {
        /// The pool.
        #[arg(value_parser = parse_name)]
        pool: String,
        /// A free drive.
        #[arg(value_parser = parse_name)]
        drive: String,
    },
    /// Set how fast a RAID 5 or 6 pool's rebuilds and scrubs go: RATE bytes per second of
    /// each member (`50M`, `1G`), or `auto` (the default: full speed while hosts are idle,
    /// a trickle while they work). Applies at once to a running rebuild or scrub.
    Rate {
        /// The pool.
        #[arg(value_parser = parse_name)]
        pool: String,
        /// Bytes per second (`50M`), or `auto`.
        #[arg(value_parser = parse_rate_arg)]
        rate: u64,
    },
    /// Replace a failed member of a RAID 5 or 6 pool by a free drive: the new drive is
    /// rebuilt from the other members while hosts keep working (`pool show` says how far).
    Replace {
        /// The pool.
        #[arg(value_parser = parse_name)]
        pool: String,
        /// The failed member's drive.
        #[arg(value_parser = parse_name)]
        old: String,
        /// A free drive.
        #[arg(value_parser = parse_name)]
        new: String,
        /// Rebuild at most this many bytes per second of the member (`50M`; `auto`: yield
        /// to host I/O, the default); the same as `pool rate` first.
        #[arg(long, value_parser = parse_rate_arg)]
        rate: Option<u64>,
    },
    /// Import a pool found on the drives but not imported at start (`drive list` shows its
    /// drives `stale`, with the pool's UUID).
    Import {
        /// The pool's UUID.
        #[arg(value_parser = parse_uuid)]
        uuid: String,
        /// Accept missing members (they are failed: the pool runs degraded) and a superblock
        /// newer than every metadata image (that newer metadata is lost).
        #[arg(long)]
        force: bool,
    },
}

/// `--raid` of `pool create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Raid {
    /// Striping, no redundancy.
    #[value(name = "0")]
    Raid0,
    /// Mirroring across all drives.
    #[value(name = "1")]
    Raid1,
    /// Striping over mirror pairs.
    #[value(name = "10")]
    Raid10,
    /// Rotating single parity: survives one lost drive.
    #[value(name = "5")]
    Raid5,
    /// Rotating double parity: survives two lost drives.
    #[value(name = "6")]
    Raid6,
}

impl From<Raid> for RaidLevel {
    fn from(raid: Raid) -> Self {
        match raid {
            Raid::Raid0 => Self::Raid0,
            Raid::Raid1 => Self::Raid1,
            Raid::Raid10 => Self::Raid10,
            Raid::Raid5 => Self::Raid5,
            Raid::Raid6 => Self::Raid6,
        }
    }
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Make a volume in a pool.
    Create {
        /// The volume's name (1 to 64 bytes).
        #[arg(value_parser = parse_name)]
        name: String,
        /// The pool it is allocated from.
        #[arg(long, value_parser = parse_name)]
        pool: String,
        /// Its size: 512, 4k, 10m, 10G, 1t (powers of 1024).
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
    },
    /// Every volume: pool, size, NGUID, the namespaces exporting it.
    List,
    /// Change a volume's size.
    Resize {
        /// The volume.
        #[arg(value_parser = parse_name)]
        name: String,
        /// The new size (as for create).
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
    },
    /// Delete a volume (not while a namespace exports it).
    Delete {
        /// The volume.
        #[arg(value_parser = parse_name)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum SubsystemCommand {
    /// Make a subsystem (no namespace, no host allowed yet).
    Create {
        /// Its NQN (nqn.yyyy-mm.reverse.domain:name, at most 223 bytes).
        #[arg(value_parser = parse_nqn)]
        nqn: String,
    },
    /// Every subsystem: namespaces and allowed hosts.
    List,
    /// Delete a subsystem (not while it has namespaces).
    Delete {
        /// Its NQN.
        #[arg(value_parser = parse_nqn)]
        nqn: String,
    },
}

#[derive(Debug, Subcommand)]
enum NamespaceCommand {
    /// Export a volume as a namespace of a subsystem.
    Add {
        /// The subsystem's NQN.
        #[arg(value_parser = parse_nqn)]
        nqn: String,
        /// The volume.
        #[arg(long, value_parser = parse_name)]
        volume: String,
        /// The namespace id [default: the lowest free one].
        #[arg(long, value_parser = parse_nsid)]
        nsid: Option<u32>,
    },
    /// Stop exporting a namespace (the volume stays).
    Remove {
        /// The subsystem's NQN.
        #[arg(value_parser = parse_nqn)]
        nqn: String,
        /// The namespace id.
        #[arg(value_parser = parse_nsid)]
        nsid: u32,
    },
}

#[derive(Debug, Subcommand)]
enum HostCommand {
    /// Allow a host to connect to a subsystem, or (--any) every host.
    #[command(group(ArgGroup::new("who").required(true).args(["host", "any"])))]
    Allow {
        /// The subsystem's NQN.
        #[arg(value_parser = parse_nqn)]
        nqn: String,
        /// The host's NQN.
        #[arg(value_name = "HOSTNQN", value_parser = parse_nqn)]
        host: Option<String>,
        /// Any host may connect.
        #[arg(long)]
        any: bool,
        /// The host's DH-HMAC-CHAP secret (`DHHC-1:XX:<base64>:`, as `nvme gen-dhchap-key`
        /// makes it): the host must then authenticate. Given for a host already allowed, the
        /// DH-HMAC-CHAP secrets replace the ones it had (its TLS PSK stays).
        #[arg(long, value_name = "SECRET", value_parser = parse_dhchap, requires = "host")]
        dhchap_secret: Option<String>,
        /// The controller's secret, for a host that authenticates the controller too
        /// (bidirectional; `nvme connect --dhchap-ctrl-secret`).
        #[arg(long, value_name = "SECRET", value_parser = parse_dhchap, requires = "dhchap_secret")]
        dhchap_ctrl_secret: Option<String>,
        /// The host's configured TLS PSK (`NVMeTLSkey-1:01:<base64>:`, as `nvme gen-tls-key`
        /// prints it): what it connects with on listeners that require TLS (`tls = true`).
        /// Given for a host already allowed, it replaces its PSK (its DH-HMAC-CHAP secrets
        /// stay).
        #[arg(long, value_name = "KEY", value_parser = parse_tls_psk, requires = "host")]
        tls_psk: Option<String>,
    },
    /// Take a host off a subsystem's allow-list, or (--any) admit only the hosts on it.
    #[command(group(ArgGroup::new("who").required(true).args(["host", "any"])))]
    Deny {
        /// The subsystem's NQN.
        #[arg(value_parser = parse_nqn)]
        nqn: String,
        /// The host's NQN.
        #[arg(value_name = "HOSTNQN", value_parser = parse_nqn)]
        host: Option<String>,
        /// Stop admitting any host: only those on the allow-list.
        #[arg(long)]
        any: bool,
    },
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

fn parse_name(text: &str) -> Result<String, String> {
    check_name(text).map_err(|e| e.to_string())?;
    Ok(text.to_owned())
}

/// A UUID in its canonical `8-4-4-4-12` hex form (either case; sent in lowercase).
fn parse_uuid(text: &str) -> Result<String, String> {
    let lower = text.to_ascii_lowercase();
    let ok = lower.len() == 36
        && lower.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(lower)
    } else {
        Err(format!(
            "`{text}` is not a UUID (8-4-4-4-12 hex digits, as `duplexctl drive list` shows a pool's)"
        ))
    }
}

fn parse_nqn(text: &str) -> Result<String, String> {
    check_nqn(text).map_err(|e| e.to_string())?;
    Ok(text.to_owned())
}

/// A DH-HMAC-CHAP secret in the standard representation, checked (CRC included).
fn parse_dhchap(text: &str) -> Result<String, String> {
    duplex_nvme::auth::Secret::parse(text).map_err(|e| e.to_string())?;
    Ok(text.to_owned())
}

/// A configured TLS PSK in the interchange format, checked (CRC included); SHA-256 keys only.
fn parse_tls_psk(text: &str) -> Result<String, String> {
    let k = duplex_nvme::tls::ConfiguredKey::parse(text).map_err(|e| e.to_string())?;
    if k.psk_hash() != duplex_nvme::tls::PskHash::Sha256 {
        return Err(
            "a SHA-384 key: only SHA-256 PSKs (NVMeTLSkey-1:01:, as `nvme gen-tls-key \
                    --hmac=1` makes them) are supported"
                .into(),
        );
    }
    Ok(text.to_owned())
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

/// A rate: `auto` (0), or a size per second (`50M`, `50M/s`).
fn parse_rate_arg(text: &str) -> Result<u64, String> {
    if text == "auto" {
        return Ok(0);
    }
    let size = text.strip_suffix("/s").unwrap_or(text);
    if size
        .trim_start_matches('0')
        .chars()
        .all(|c| !c.is_ascii_digit())
        && size.starts_with('0')
    {
        return Err("a rate of 0 would stop the work: say `auto` for the default".into());
    }
    match parse_size(size) {
        Ok(n) => Ok(n),
        Err(e) => Err(format!(
            "{e} (a rate is bytes per second, `50M`, or `auto`)"
        )),
    }
}

fn parse_chunk_arg(text: &str) -> Result<u32, String> {
    parse_chunk(text).map_err(|e| e.to_string())
}

fn parse_nsid(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(n) if (1..=0xffff_fffe).contains(&n) => Ok(n),
        _ => Err("a namespace id is a number from 1 to 4294967294".into()),
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
    usage(first)
}

/// A usage error: one line on stderr, exit status 2.
fn usage(message: &str) -> ExitCode {
    eprintln!(
        "duplexctl: {} (see duplexctl --help)",
        duplex_mgmt::server::one_line(message)
    );
    ExitCode::from(2)
}

/// The storage configuration request of a storage command; `Err` is a usage error clap cannot
/// see.
fn config_request(command: &Command) -> Result<ConfigRequest, String> {
    Ok(match command {
        Command::Status | Command::Service(_) | Command::Cluster(_) | Command::Events { .. } => {
            return Err("not a storage command".into())
        }
        Command::Drive(DriveCommand::List) => ConfigRequest::ListDrives,
        Command::Pool(PoolCommand::Create {
            name,
            raid,
            drives,
            chunk,
        }) => {
            let mut seen = HashSet::new();
            if let Some(twice) = drives.iter().find(|d| !seen.insert(d.as_str())) {
                return Err(format!("drive {twice} is named twice in --drives"));
            }
            ConfigRequest::CreatePool {
                name: name.clone(),
                raid: (*raid).into(),
                drives: drives.clone(),
                chunk_bytes: chunk.unwrap_or(0),
            }
        }
        Command::Pool(PoolCommand::List) => ConfigRequest::ListPools,
        Command::Pool(PoolCommand::Show { name }) => ConfigRequest::ShowPool(name.clone()),
        Command::Pool(PoolCommand::Destroy { name, force }) => ConfigRequest::DestroyPool {
            name: name.clone(),
            force: *force,
        },
        Command::Pool(PoolCommand::Move { name, node }) => ConfigRequest::MovePool {
            name: name.clone(),
            node: *node,
        },
        Command::Pool(PoolCommand::Scrub { name, .. }) => ConfigRequest::ScrubPool(name.clone()),
        Command::Pool(PoolCommand::AddSpare { pool, drive }) => ConfigRequest::AddSpare {
            pool: pool.clone(),
            drive: drive.clone(),
        },
        Command::Pool(PoolCommand::Rate { pool, rate }) => ConfigRequest::SetPoolRate {
            pool: pool.clone(),
            rate: *rate,
        },
        Command::Pool(PoolCommand::Replace { pool, old, new, .. }) => {
            ConfigRequest::ReplaceMember {
                pool: pool.clone(),
                old: old.clone(),
                new: new.clone(),
            }
        }
        Command::Pool(PoolCommand::Import { uuid, force }) => ConfigRequest::ImportPool {
            pool: uuid.clone(),
            force: *force,
        },
        Command::Volume(VolumeCommand::Create { name, pool, size }) => {
            ConfigRequest::CreateVolume {
                name: name.clone(),
                pool: pool.clone(),
                size_bytes: *size,
            }
        }
        Command::Volume(VolumeCommand::List) => ConfigRequest::ListVolumes,
        Command::Volume(VolumeCommand::Resize { name, size }) => ConfigRequest::ResizeVolume {
            name: name.clone(),
            size_bytes: *size,
        },
        Command::Volume(VolumeCommand::Delete { name }) => {
            ConfigRequest::DeleteVolume(name.clone())
        }
        Command::Subsystem(SubsystemCommand::Create { nqn }) => {
            ConfigRequest::CreateSubsystem(nqn.clone())
        }
        Command::Subsystem(SubsystemCommand::List) => ConfigRequest::ListSubsystems,
        Command::Subsystem(SubsystemCommand::Delete { nqn }) => {
            ConfigRequest::DeleteSubsystem(nqn.clone())
        }
        Command::Namespace(NamespaceCommand::Add { nqn, volume, nsid }) => {
            ConfigRequest::AddNamespace {
                nqn: nqn.clone(),
                volume: volume.clone(),
                nsid: nsid.unwrap_or(0),
            }
        }
        Command::Namespace(NamespaceCommand::Remove { nqn, nsid }) => {
            ConfigRequest::RemoveNamespace {
                nqn: nqn.clone(),
                nsid: *nsid,
            }
        }
        Command::Host(HostCommand::Allow {
            nqn,
            host,
            any,
            dhchap_secret,
            dhchap_ctrl_secret,
            tls_psk,
        }) => match host {
            Some(host) => ConfigRequest::AllowHost {
                nqn: nqn.clone(),
                host_nqn: host.clone(),
                secrets: (dhchap_secret.is_some() || tls_psk.is_some()).then(|| HostSecrets {
                    host: dhchap_secret.clone(),
                    ctrl: dhchap_ctrl_secret.clone(),
                    tls_psk: tls_psk.clone(),
                }),
            },
            None => ConfigRequest::AllowAnyHost {
                nqn: nqn.clone(),
                any: *any,
            },
        },
        Command::Host(HostCommand::Deny { nqn, host, any }) => match host {
            Some(host) => ConfigRequest::DenyHost {
                nqn: nqn.clone(),
                host_nqn: host.clone(),
            },
            None => ConfigRequest::AllowAnyHost {
                nqn: nqn.clone(),
                any: !*any,
            },
        },
    })
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
    {
        use std::io::IsTerminal;
        render::set_progress_bars(std::io::stdout().is_terminal());
    }
    let target = match target_of(&cli) {
        Ok(t) => t,
        Err(TargetError::Usage(m)) => return usage(&m),
        Err(TargetError::Key(m)) => return fail(&m),
    };
    if matches!(cli.command, Command::Status) {
        return status_screen(&target, cli.json);
    }
    if let Command::Events { after, follow } = cli.command {
        return events(&target, after, follow, cli.json);
    }
    let request = match &cli.command {
        Command::Status => Request::Status,
        Command::Service(ServiceCommand::List) => Request::ListServices,
        Command::Service(ServiceCommand::Restart { name }) => Request::Restart(name.clone()),
        Command::Service(ServiceCommand::Crash { name, mode }) => Request::Crash {
            name: name.clone(),
            mode: (*mode).into(),
        },
        Command::Cluster(ClusterCommand::Status | ClusterCommand::Events) => {
            Request::Report("cluster".into())
        }
        storage => match config_request(storage) {
            Ok(request) => Request::Config(request),
            Err(message) => return usage(&message),
        },
    };
    // `--rate` of `pool replace` and `pool scrub`: the pool's rate is set first.
    let rate = match &cli.command {
        Command::Pool(PoolCommand::Replace {
            pool,
            rate: Some(rate),
            ..
        })
        | Command::Pool(PoolCommand::Scrub {
            name: pool,
            rate: Some(rate),
        }) => Some(ConfigRequest::SetPoolRate {
            pool: pool.clone(),
            rate: *rate,
        }),
        _ => None,
    };
    if let Some(rate) = rate {
        match client::call(&target, &Request::Config(rate)) {
            Ok(Outcome::Answer(Answer::Config(ConfigReply::Done(_)))) => {}
            Ok(Outcome::Answer(Answer::Config(ConfigReply::Error { message, .. }))) => {
                return fail(&format!("--rate: {message}"))
            }
            Ok(other) => return fail(&format!("--rate: unexpected answer {other:?}")),
            Err(e) => return fail(&format!("--rate: {e}")),
        }
    }
    let answer = if matches!(request, Request::Config(ConfigRequest::ListVolumes)) {
        list_volumes(&target)
    } else {
        client::call(&target, &request)
    };
    match answer {
        Ok(Outcome::Answer(Answer::Report { generation, text })) if text.is_empty() => fail(
            &format!(
                "the cluster service has not reported yet (generation {generation}; is it running? `duplexctl service list`)"
            ),
        ),
        Ok(outcome) => match print(&cli, &request, &outcome, &{
            if matches!(cli.command, Command::Cluster(ClusterCommand::Status)) {
                cluster_pools(&target, &outcome)
            } else {
                Ok(Vec::new())
            }
        }) {
            Ok(()) => ExitCode::SUCCESS,
            // A reader that stopped reading (`| head`) has what it wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => fail(&format!("cannot write the output: {e}")),
        },
        Err(e) => fail(&e.to_string()),
    }
}

/// Why the options name no node to ask.
enum TargetError {
    /// A usage error (exit 2).
    Usage(String),
    /// The key file cannot be used (exit 1).
    Key(String),
}

/// Where the node's mgmt answers, as the options say: the local socket, or a remote
/// management listener and its key.
fn target_of(cli: &Cli) -> Result<Target, TargetError> {
    let remote = match (&cli.connect, &cli.key_file) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(TargetError::Usage(
                "--key-file is for --connect (a node managed from afar)".into(),
            ))
        }
        (Some(_), None) => {
            return Err(TargetError::Usage(
                "--connect needs --key-file (the node's [mgmt] key_file)".into(),
            ))
        }
        (Some(_), Some(_)) if cli.socket.is_some() => {
            return Err(TargetError::Usage(
                "--connect and --socket name two nodes: give one".into(),
            ))
        }
        (Some(addr), Some(file)) => {
            if !addr.contains(':') {
                return Err(TargetError::Usage(format!(
                    "--connect {addr:?}: give host:port"
                )));
            }
            let key = duplex_mgmt::remote::read_key(file).map_err(TargetError::Key)?;
            Some(client::Remote {
                addr: addr.clone(),
                key,
            })
        }
    };
    Ok(Target {
        socket: cli
            .socket
            .clone()
            .unwrap_or_else(|| cli.state_dir.join("mgmt.sock")),
        state_dir: cli.state_dir.clone(),
        timeout: cli.timeout,
        remote,
    })
}

/// `duplexctl status`: the node summary, then (each best effort, the screen says what it could
/// not learn) the cluster, the pools with their ANA state and jobs, the alerts and the recent
/// events.
fn status_screen(target: &Target, json_wanted: bool) -> ExitCode {
    let status = match client::call(target, &Request::Status) {
        Ok(Outcome::Answer(Answer::Status(s))) => s,
        Ok(other) => return fail(&format!("unexpected answer {other:?}")),
        Err(e) => return fail(&e.to_string()),
    };
    let cluster = match client::call(target, &Request::Report("cluster".into())) {
        Ok(Outcome::Answer(Answer::Report { text, .. })) if !text.is_empty() => {
            serde_json::from_str(&text).ok()
        }
        _ => None,
    };
    let pools = match client::call(target, &Request::Config(ConfigRequest::ListPools)) {
        Ok(Outcome::Answer(Answer::Config(ConfigReply::Pools(list)))) => Ok(list),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    };
    let mut events = Vec::new();
    let mut after = 0;
    while let Ok(page) = events_page(target, after) {
        let Some(last) = page.last().and_then(|e| e["seq"].as_u64()) else {
            break;
        };
        after = last;
        events.extend(page);
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let screen = render::Screen {
        status: &status,
        cluster,
        pools,
        events,
        now_ms,
    };
    let text = if json_wanted {
        let mut t = serde_json::to_string_pretty(&screen.json()).unwrap_or_default();
        t.push('\n');
        t
    } else {
        screen.text()
    };
    use std::io::Write;
    match std::io::stdout().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(&format!("cannot write the output: {e}")),
    }
}

/// One page of events above `after`.
fn events_page(target: &Target, after: u64) -> Result<Vec<serde_json::Value>, String> {
    match client::call(target, &Request::Events(after)) {
        Ok(Outcome::Answer(Answer::Events(text))) => {
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("the events are not JSON: {e}"))?;
            let list = v.as_array().cloned().unwrap_or_default();
            // Pages move forward by number, or the listing would never end.
            if list.iter().any(|e| e["seq"].as_u64().unwrap_or(0) <= after) {
                return Err("duplexd listed events out of order".into());
            }
            Ok(list)
        }
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// `duplexctl events`: every event above `after`, then (`follow`) new ones as they come.
fn events(target: &Target, mut after: u64, follow: bool, json_wanted: bool) -> ExitCode {
    use std::io::Write;
    let mut all = Vec::new();
    let mut out = std::io::stdout();
    loop {
        let page = match events_page(target, after) {
            Ok(p) => p,
            Err(e) => return fail(&e),
        };
        if page.is_empty() {
            if !follow {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        after = page.last().and_then(|e| e["seq"].as_u64()).unwrap_or(after);
        if follow {
            let text = if json_wanted {
                page.iter().map(|e| format!("{e}\n")).collect::<String>()
            } else {
                render::node_events(&page)
            };
            if out
                .write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
            {
                return ExitCode::SUCCESS;
            }
        } else {
            all.extend(page);
        }
    }
    let text = if json_wanted {
        let mut t =
            serde_json::to_string_pretty(&serde_json::json!({ "events": all })).unwrap_or_default();
        t.push('\n');
        t
    } else if all.is_empty() {
        "no events\n".into()
    } else {
        render::node_events(&all)
    };
    match out.write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(&format!("cannot write the output: {e}")),
    }
}

/// `volume list`: every page of volumes (one reply holds at most 128), as one list.
fn list_volumes(target: &Target) -> Result<Outcome, client::ClientError> {
    let mut all: Vec<duplex_ipc::config::VolumeInfo> = Vec::new();
    loop {
        let after = all.last().map(|v| v.name.clone()).unwrap_or_default();
        let page = Request::Config(ConfigRequest::ListVolumesAfter(after.clone()));
        match client::call(target, &page)? {
            Outcome::Answer(Answer::Config(ConfigReply::Volumes(list))) => {
                if list.is_empty() {
                    break;
                }
                // Pages move forward by name, or the listing would never end.
                if list.iter().any(|v| v.name <= after) {
                    return Err(client::ClientError::Protocol(
                        "the metadata service listed volumes out of order".into(),
                    ));
                }
                all.extend(list);
            }
            other => return Ok(other),
        }
    }
    Ok(Outcome::Answer(Answer::Config(ConfigReply::Volumes(all))))
}

/// How long `cluster status` waits for the pools' owners.
const POOLS_WAIT: Duration = Duration::from_secs(2);

/// For `cluster status`: the pools (owner, epoch) as the metadata service lists them, or why
/// not. Nothing for other commands.
fn cluster_pools(
    target: &Target,
    outcome: &Outcome,
) -> Result<Vec<duplex_ipc::config::PoolInfo>, String> {
    if !matches!(outcome, Outcome::Answer(Answer::Report { .. })) {
        return Ok(Vec::new());
    }
    // The cluster's state must show even when the metadata service is stuck: its answer is
    // waited for a short while only (the call goes on in a thread that exits with us).
    let (tx, rx) = std::sync::mpsc::channel();
    let target = target.clone();
    std::thread::spawn(move || {
        let _ = tx.send(client::call(
            &target,
            &Request::Config(ConfigRequest::ListPools),
        ));
    });
    let Ok(answer) = rx.recv_timeout(POOLS_WAIT) else {
        return Err(format!(
            "the metadata service did not answer within {} s",
            POOLS_WAIT.as_secs()
        ));
    };
    match answer {
        Ok(Outcome::Answer(Answer::Config(ConfigReply::Pools(list)))) => Ok(list),
        Ok(Outcome::Answer(Answer::Config(ConfigReply::Error { message, .. }))) => Err(message),
        Ok(_) => Err("the metadata service answered something else".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn print(
    cli: &Cli,
    request: &Request,
    outcome: &Outcome,
    pools: &Result<Vec<duplex_ipc::config::PoolInfo>, String>,
) -> std::io::Result<()> {
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
        (Outcome::Answer(Answer::Events(text)), _) => format!("{text}\n"),
        (Outcome::Answer(Answer::Report { text, .. }), json_wanted)
            if matches!(cli.command, Command::Cluster(ClusterCommand::Events)) =>
        {
            render::cluster_events(text, json_wanted).map_err(std::io::Error::other)?
        }
        (Outcome::Answer(Answer::Report { generation, text }), json_wanted) => {
            let pools = pools.as_ref().map(Vec::as_slice).map_err(Clone::clone);
            render::cluster_status(*generation, text, pools, json_wanted)
                .map_err(std::io::Error::other)?
        }
        (Outcome::Answer(Answer::Config(reply)), json_wanted) => {
            let Request::Config(config) = request else {
                return Err(std::io::Error::other("a storage answer to another command"));
            };
            config_text(config, reply, json_wanted)?
        }
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

/// What a storage command prints.
fn config_text(
    request: &ConfigRequest,
    reply: &ConfigReply,
    json_wanted: bool,
) -> std::io::Result<String> {
    Ok(match (reply, json_wanted) {
        (ConfigReply::Drives(drives), false) => render::drives_table(drives),
        (ConfigReply::Drives(drives), true) => json(&render::DrivesJson { drives })?,
        (ConfigReply::Pools(pools), false) => match (request, pools.as_slice()) {
            (ConfigRequest::ShowPool(_), [pool]) => render::pool_text(pool),
            _ => render::pools_table(pools),
        },
        (ConfigReply::Pools(pools), true) => match (request, pools.as_slice()) {
            (ConfigRequest::ShowPool(_), [pool]) => json(&render::PoolJson { pool })?,
            _ => json(&render::PoolsJson { pools })?,
        },
        (ConfigReply::Volumes(volumes), false) => render::volumes_table(volumes),
        (ConfigReply::Volumes(volumes), true) => json(&render::VolumesJson { volumes })?,
        (ConfigReply::Subsystems(subsystems), false) => render::subsystems_table(subsystems),
        (ConfigReply::Subsystems(subsystems), true) => {
            json(&render::SubsystemsJson { subsystems })?
        }
        (ConfigReply::Done(done), false) => format!("{}\n", render::done_line(request, done)),
        (ConfigReply::Done(done), true) => json(&render::done_json(request, done))?,
        // The client turns errors into a failure before anything is printed.
        (ConfigReply::Error { message, .. }, _) => {
            return Err(std::io::Error::other(message.clone()))
        }
    })
}

fn json(value: &impl serde::Serialize) -> std::io::Result<String> {
    let mut text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    text.push('\n');
    Ok(text)
}
