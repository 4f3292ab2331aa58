//! `duplex-drive-sim`: a simulated dual-ported NVMe drive.
//!
//! ```text
//! duplex-drive-sim serve --backing /var/lib/duplex/d0.img --size 1G \
//!     --socket /run/duplex/d0-a.sock --socket /run/duplex/d0-b.sock --control /run/duplex/d0.ctl
//! duplex-drive-sim ctl --control /run/duplex/d0.ctl status
//! duplex-drive-sim ctl --control /run/duplex/d0.ctl inject error --op write --lba 0-99 --status 0x281
//! duplex-drive-sim ctl --control /run/duplex/d0.ctl power-cut
//! ```
//!
//! `serve` prints one line `ready <socket>... control <path>` on standard output when it
//! listens, and runs until SIGTERM or SIGINT. Exit status 0, 1 on errors, 2 on usage errors.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use duplex_drive_sim::control::{self, Request};
use duplex_drive_sim::port::Ports;
use duplex_drive_sim::{Drive, DriveConfig, Fault, FaultOp};

#[derive(Parser, Debug)]
#[command(
    name = "duplex-drive-sim",
    about = "A simulated dual-ported NVMe drive (vfio-user)"
)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// Serve a drive: one vfio-user socket per port.
    Serve(Serve),
    /// Talk to a running drive's control socket.
    Ctl {
        /// The drive's control socket.
        #[arg(long, short)]
        control: PathBuf,
        #[command(subcommand)]
        cmd: Ctl,
    },
}

#[derive(clap::Args, Debug)]
struct Serve {
    /// Backing file (created if missing, extended to --size).
    #[arg(long)]
    backing: PathBuf,
    /// Capacity, e.g. 1G, 512M (a multiple of the block size).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    size: u64,
    /// Logical block size (512 or 4096).
    #[arg(long, default_value_t = 4096, value_parser = parse_block_size)]
    block_size: u32,
    /// Metadata bytes per block of the namespace's LBA format (0, 8 or 64; the drive offers
    /// all three, transferred in a separate buffer): for end-to-end protection information.
    #[arg(long, default_value_t = 0, value_parser = parse_metadata)]
    metadata: u16,
    /// A port's vfio-user socket (give it twice for a dual-ported drive).
    #[arg(long = "socket", required = true)]
    sockets: Vec<PathBuf>,
    /// The control socket (fault injection, power, status).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Volatile write cache in MiB (0: write-through).
    #[arg(long, default_value_t = 64)]
    cache_mib: u64,
    /// Serial number.
    #[arg(long, default_value = "DUPLEXSIM0001")]
    serial: String,
    /// I/O queue pairs per controller.
    #[arg(long, default_value_t = 16)]
    max_queues: u16,
}

#[derive(Subcommand, Debug)]
enum Ctl {
    /// The drive's state as JSON.
    Status,
    /// Add a fault; prints its id.
    Inject {
        #[command(subcommand)]
        fault: FaultArg,
    },
    /// Remove a fault (or all).
    Clear {
        /// The fault's id; all when absent.
        id: Option<u64>,
    },
    /// Cut the power: the write cache is lost, the ports vanish.
    PowerCut,
    /// Restore the power: the ports come back.
    PowerOn,
    /// Pull the drive: the ports vanish (the data stays); with --port, that port's cable alone.
    Pull {
        /// One port (0 = the first --socket), the drive and its other port go on.
        #[arg(long)]
        port: Option<usize>,
    },
    /// Insert the drive again; with --port, plug that port back in.
    Insert {
        /// One port (0 = the first --socket).
        #[arg(long)]
        port: Option<usize>,
    },
    /// Destage the write cache.
    Flush,
    /// The medium rots: bit BIT of block LBA inverted, its metadata kept (what a drive that
    /// returns silently corrupted data looks like).
    Rot {
        /// The block.
        #[arg(long)]
        lba: u64,
        /// The bit within it (modulo the block size in bits).
        #[arg(long, default_value_t = 0)]
        bit: u32,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Op {
    Read,
    Write,
    Flush,
    Any,
}

impl From<Op> for FaultOp {
    fn from(o: Op) -> FaultOp {
        match o {
            Op::Read => FaultOp::Read,
            Op::Write => FaultOp::Write,
            Op::Flush => FaultOp::Flush,
            Op::Any => FaultOp::Any,
        }
    }
}

#[derive(Subcommand, Debug)]
enum FaultArg {
    /// Commands touching an LBA range complete with an error status.
    Error {
        #[arg(long, value_enum, default_value_t = Op::Any)]
        op: Op,
        /// FIRST-LAST (inclusive) or one LBA.
        #[arg(long, value_parser = parse_range)]
        lba: (u64, u64),
        /// Status: SCT << 8 | SC, e.g. 0x281 (unrecovered read error).
        #[arg(long, value_parser = parse_u16)]
        status: u16,
        /// Set Do Not Retry.
        #[arg(long)]
        dnr: bool,
        /// Fail only this many commands.
        #[arg(long)]
        count: Option<u32>,
    },
    /// Commands complete later.
    Latency {
        #[arg(long, value_enum, default_value_t = Op::Any)]
        op: Op,
        /// Added microseconds.
        #[arg(long)]
        micros: u64,
    },
    /// Commands never complete (until cleared, aborted or reset).
    Stall {
        #[arg(long, value_enum, default_value_t = Op::Any)]
        op: Op,
    },
    /// The next write to the range persists only KEEP bytes, then the power fails.
    TornWrite {
        #[arg(long, value_parser = parse_range)]
        lba: (u64, u64),
        /// Bytes of the write that reach the medium.
        #[arg(long)]
        keep_bytes: u64,
    },
    /// Flush succeeds without persisting anything.
    LyingFlush,
    /// The firmware hangs (no command completes) until a controller reset.
    Hang,
    /// Writes to the range succeed but store nothing (until cleared).
    LostWrite {
        #[arg(long, value_parser = parse_range)]
        lba: (u64, u64),
    },
    /// Reads of the range return one bit flipped per block.
    BitFlip {
        #[arg(long, value_parser = parse_range)]
        lba: (u64, u64),
        /// Bit index within each block.
        #[arg(long, default_value_t = 0)]
        bit: u32,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        Some((i, 'T' | 't')) => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a size like 1G, 512M or 4096"))
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("{s:?}: the block size is 512 or 4096")),
    }
}

fn parse_metadata(s: &str) -> Result<u16, String> {
    match s {
        "0" => Ok(0),
        "8" => Ok(8),
        "64" => Ok(64),
        _ => Err(format!("{s:?}: the metadata size is 0, 8 or 64")),
    }
}

fn parse_u16(s: &str) -> Result<u16, String> {
    let r = if let Some(h) = s.strip_prefix("0x") {
        u16::from_str_radix(h, 16)
    } else {
        s.parse()
    };
    r.map_err(|_| format!("{s:?} is not a 16-bit number"))
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("{s:?} is not an LBA or FIRST-LAST");
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if a > b {
                return Err(bad());
            }
            Ok((a, b))
        }
        None => s.parse().map(|a| (a, a)).map_err(|_| bad()),
    }
}

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let r = match args.what {
        What::Serve(s) => serve(s),
        What::Ctl { control, cmd } => ctl(&control, cmd),
    };
    if let Err(e) = r {
        eprintln!("duplex-drive-sim: error: {e:#}");
        std::process::exit(1);
    }
}

fn serve(a: Serve) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if a.size % u64::from(a.block_size) != 0 {
        bail!(
            "--size {} is not a multiple of the block size {}",
            a.size,
            a.block_size
        );
    }
    // Signals are taken synchronously by this thread; block them before any thread starts.
    let mut mask = nix::sys::signal::SigSet::empty();
    mask.add(nix::sys::signal::Signal::SIGTERM);
    mask.add(nix::sys::signal::Signal::SIGINT);
    mask.thread_block().context("blocking signals")?;

    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&a.backing)
        .with_context(|| format!("backing file {}", a.backing.display()))?;
    let cfg = DriveConfig {
        block_size: a.block_size,
        blocks: a.size / u64::from(a.block_size),
        cache_blocks: usize::try_from((a.cache_mib << 20) / u64::from(a.block_size))
            .unwrap_or(usize::MAX),
        serial: a.serial.clone(),
        max_queues: a.max_queues,
        metadata_size: a.metadata,
        ..DriveConfig::default()
    };
    let drive = Drive::open(file, cfg).context("opening the drive")?;
    for s in &a.sockets {
        if s.exists() {
            bail!(
                "{} exists: is another drive serving there? (remove it if not)",
                s.display()
            );
        }
    }
    let ports = Ports::start(drive.clone(), &a.sockets).context("starting the ports")?;
    let ports = Arc::new(Mutex::new(ports));
    if let Some(c) = &a.control {
        if c.exists() {
            bail!(
                "{} exists: is another drive serving there? (remove it if not)",
                c.display()
            );
        }
        let l = std::os::unix::net::UnixListener::bind(c)
            .with_context(|| format!("control socket {}", c.display()))?;
        let p = ports.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control::serve_control(l, p))
            .context("control thread")?;
    }
    let list: Vec<String> = a.sockets.iter().map(|p| p.display().to_string()).collect();
    println!(
        "ready {} control {}",
        list.join(" "),
        a.control
            .as_ref()
            .map_or("-".to_string(), |c| c.display().to_string())
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let sig = mask.wait().context("waiting for a signal")?;
    tracing::info!(signal = ?sig, "stopping");
    drop(ports);
    if let Some(c) = &a.control {
        let _ = std::fs::remove_file(c);
    }
    // Acknowledged writes in the cache reach the file on an orderly stop (a power cut is the
    // `power-cut` control request, not a signal).
    drive.destage().context("destaging the write cache")?;
    Ok(())
}

fn ctl(control: &std::path::Path, cmd: Ctl) -> Result<()> {
    let req = match cmd {
        Ctl::Status => Request::Status,
        Ctl::Inject { fault } => Request::Inject {
            fault: match fault {
                FaultArg::Error {
                    op,
                    lba,
                    status,
                    dnr,
                    count,
                } => Fault::Error {
                    op: op.into(),
                    first_lba: lba.0,
                    last_lba: lba.1,
                    status,
                    dnr,
                    remaining: count,
                },
                FaultArg::Latency { op, micros } => Fault::Latency {
                    op: op.into(),
                    micros,
                },
                FaultArg::Stall { op } => Fault::Stall { op: op.into() },
                FaultArg::TornWrite { lba, keep_bytes } => Fault::TornWrite {
                    first_lba: lba.0,
                    last_lba: lba.1,
                    keep_bytes,
                },
                FaultArg::LostWrite { lba } => Fault::LostWrite {
                    first_lba: lba.0,
                    last_lba: lba.1,
                },
                FaultArg::LyingFlush => Fault::LyingFlush,
                FaultArg::Hang => Fault::Hang,
                FaultArg::BitFlip { lba, bit } => Fault::BitFlip {
                    first_lba: lba.0,
                    last_lba: lba.1,
                    bit,
                },
            },
        },
        Ctl::Clear { id } => Request::Clear { id },
        Ctl::PowerCut => Request::PowerCut,
        Ctl::PowerOn => Request::PowerOn,
        Ctl::Pull { port } => Request::Pull { port },
        Ctl::Insert { port } => Request::Insert { port },
        Ctl::Flush => Request::Flush,
        Ctl::Rot { lba, bit } => Request::Rot { lba, bit },
    };
    let answer = control::request(control, &req)
        .with_context(|| format!("control socket {}", control.display()))?;
    println!("{answer}");
    if answer.get("ok") != Some(&serde_json::Value::Bool(true)) {
        bail!(
            "{}",
            answer
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("request failed")
        );
    }
    Ok(())
}
