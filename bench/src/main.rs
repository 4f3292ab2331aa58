//! `duplex-bench`: drives an NVMe/TCP subsystem (duplex or any other target) and reports IOPS,
//! throughput and latency percentiles; `--verify` writes tagged blocks and checks every read.

use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use duplex_bench::worker::{self, WorkerResult, WorkerSpec};
use duplex_host::{Queue, QueueOptions};
use duplex_nvme::spec::cns;
use duplex_nvme::tcp::Digests;
use hdrhistogram::Histogram;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    Randread,
    Randwrite,
    Read,
    Write,
    /// Random reads and writes (`--read-pct`).
    Mixed,
}

/// Drive an NVMe/TCP subsystem and measure it.
#[derive(Parser, Debug)]
#[command(name = "duplex-bench", version)]
struct Args {
    /// Target address, HOST:PORT (the I/O port, e.g. 127.0.0.1:4420).
    #[arg(long, required_unless_present = "paths", conflicts_with = "paths")]
    target: Option<String>,
    /// Multipath: every controller's address (HOST:PORT,HOST:PORT,...). The run follows ANA
    /// (the log page and its change notices), sends on the optimized path, and retries a
    /// command failed with a path error, or lost with its connection, on another path.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Multipath: a command not answered within this many milliseconds is taken as lost with
    /// its connection (and retried on another path).
    #[arg(long, default_value_t = 10_000)]
    io_timeout_ms: u64,
    /// Multipath: a command not done within this many milliseconds of its first try fails
    /// the run.
    #[arg(long, default_value_t = 60_000)]
    failover_timeout_ms: u64,
    /// Multipath: stop the load once this file exists (then read back, with --verify): a
    /// test or script ends the run on an event rather than a clock.
    #[arg(long)]
    stop_file: Option<std::path::PathBuf>,
    /// Subsystem NQN.
    #[arg(long)]
    nqn: String,
    /// Host NQN (must be allowed by the subsystem).
    #[arg(
        long,
        default_value = "nqn.2014-08.org.nvmexpress:uuid:d0b1e5c4-0000-4000-8000-000000000001"
    )]
    hostnqn: String,
    /// Namespace id.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// Workload.
    #[arg(long, value_enum, default_value = "randread")]
    workload: Workload,
    /// Percentage of reads for `mixed`.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u32).range(0..=100))]
    read_pct: u32,
    /// Bytes per I/O (4k, 128k, ...), a multiple of the block size.
    #[arg(long, default_value = "4k", value_parser = duplex_bench::parse_size)]
    bs: usize,
    /// Commands in flight per queue.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    qd: u32,
    /// I/O queues (connections, one worker thread each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Run for this many seconds (default 10 unless --ios is given).
    #[arg(long)]
    time: Option<f64>,
    /// Stop after this many I/Os in all.
    #[arg(long)]
    ios: Option<u64>,
    /// Pin worker i to the i-th CPU of this list (e.g. 1 or 2,3).
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Write tagged blocks (LBA, seed, generation) and check every read, then read back every
    /// written block; any mismatch fails the run.
    #[arg(long)]
    verify: bool,
    /// Write nothing: read back the span and check every block against `--seed` and
    /// `--generation` (what a `write --verify` run over the same span left).
    #[arg(long)]
    verify_only: bool,
    /// After the load (before the read-back of `--verify`), send a Flush and wait for it: the
    /// writes acknowledged are durable once it succeeds (a failed Flush fails the run).
    #[arg(long)]
    flush: bool,
    /// Generation `--verify-only` expects.
    #[arg(long, default_value_t = 1)]
    generation: u64,
    /// Seed of the run (in every verify tag).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Header and data digests (CRC32C).
    #[arg(long)]
    digests: bool,
    /// Connect over TLS 1.3 with this configured PSK (`NVMeTLSkey-1:01:<base64>:`, the one
    /// `duplexctl host allow --tls-psk` gave the host), to a listener with `tls = true`.
    #[arg(long, value_name = "KEY", conflicts_with = "paths")]
    tls_key: Option<String>,
    /// Poll the sockets for completions instead of sleeping in recv (as spdk_nvme_perf does;
    /// each worker then keeps its core busy).
    #[arg(long)]
    busy_poll: bool,
    /// Use only the first N blocks of the namespace.
    #[arg(long)]
    span_blocks: Option<u64>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Report {
    target: String,
    nqn: String,
    workload: String,
    block_size: usize,
    io_size: usize,
    queue_depth: u32,
    queues: u16,
    seconds: f64,
    reads: u64,
    writes: u64,
    iops: f64,
    mib_per_s: f64,
    latency_us: Latency,
    verify: Option<Verify>,
}

#[derive(serde::Serialize)]
struct Latency {
    mean: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(serde::Serialize)]
struct Verify {
    blocks_checked: u64,
    errors: u64,
    first_error: Option<String>,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's message (which names the argument, sometimes on the lines
            // after the first), then where to look.
            let text = e.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(|l| l.trim().trim_start_matches("error: "))
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            eprintln!(
                "duplex-bench: {} (see duplex-bench --help)",
                message.join(" ")
            );
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("duplex-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn address(flag: &str, text: &str) -> anyhow::Result<SocketAddr> {
    text.to_socket_addrs()
        .with_context(|| format!("{flag} {text:?}: not HOST:PORT"))?
        .next()
        .with_context(|| format!("{flag} {text:?}: no address"))
}

fn hostid_of(hostnqn: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    for (i, b) in hostnqn.bytes().enumerate() {
        id[i % 16] ^= b.rotate_left(i as u32 % 8);
    }
    id
}

fn run(args: &Args) -> anyhow::Result<bool> {
    if !args.paths.is_empty() {
        return run_multipath(args);
    }
    let addr = address("--target", args.target.as_deref().unwrap_or_default())?;
    let digests = Digests {
        header: args.digests,
        data: args.digests,
    };
    let hostid = hostid_of(&args.hostnqn);
    let tls = args
        .tls_key
        .as_deref()
        .map(|k| {
            duplex_host::tls::TlsPsk::derive(
                k,
                &args.hostnqn,
                &args.nqn,
                1,
                duplex_nvme::tls::Variant::Rfc,
            )
        })
        .transpose()
        .context("--tls-key")?;
    let admin_opts = QueueOptions {
        digests,
        ..QueueOptions::default()
    };
    let mut admin = match &tls {
        None => Queue::dial(addr, admin_opts),
        Some(psk) => Queue::dial_tls(addr, admin_opts, psk),
    }
    .with_context(|| format!("connecting to {addr}"))?;
    let cntlid = admin
        .connect(0, 31, 30_000, 0xFFFF, &args.nqn, &args.hostnqn, hostid)
        .with_context(|| format!("Connect to {} as {}", args.nqn, args.hostnqn))?;
    admin.enable().context("enabling the controller")?;
    let ctrl = admin
        .identify(cns::CONTROLLER, 0)
        .context("Identify Controller")?;
    let ns = admin
        .identify(cns::NAMESPACE, args.nsid)
        .with_context(|| format!("Identify Namespace {}", args.nsid))?;
    let nsze = u64::from(u32_at(&ns, 0)) | (u64::from(u32_at(&ns, 4)) << 32);
    let lbaf = ns[26] & 0xF;
    let block_size = 1usize << ((u32_at(&ns, 128 + 4 * usize::from(lbaf)) >> 16) & 0xFF);
    let mdts = ctrl[77];
    let max_io = if mdts == 0 {
        usize::MAX
    } else {
        4096usize << mdts
    };
    let ioccsz = (u32_at(&ctrl, 1792) as usize * 16).saturating_sub(64);
    if nsze == 0 {
        bail!("namespace {} is empty or inactive", args.nsid);
    }
    if args.bs % block_size != 0 || args.bs > max_io {
        bail!(
            "--bs {} must be a multiple of the block size {block_size} and at most {max_io} (MDTS)",
            args.bs
        );
    }
    let span = args.span_blocks.unwrap_or(nsze).min(nsze);
    let granted = admin
        .set_queues(args.queues)
        .context("Set Features Number of Queues")?;
    if granted < args.queues {
        bail!(
            "the target grants {granted} I/O queues, --queues asks for {}",
            args.queues
        );
    }
    let (read_pct, random) = match args.workload {
        Workload::Randread => (100, true),
        Workload::Randwrite => (0, true),
        Workload::Read => (100, false),
        Workload::Write => (0, false),
        Workload::Mixed => (args.read_pct, true),
    };
    let time = match (args.time, args.ios) {
        (Some(t), _) if !(t > 0.0 && t < 1e7) => {
            bail!("--time {t}: must be a positive number of seconds")
        }
        (Some(t), _) => Some(Duration::from_secs_f64(t)),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let start = Instant::now();
    let until = time.map(|t| start + t);
    let n = u64::from(args.queues);
    let slice = span / n;
    let specs: Vec<WorkerSpec> = (0..args.queues)
        .map(|i| WorkerSpec {
            addr,
            digests,
            tls: tls.clone(),
            // Long enough to cover any round trip; past it the worker sleeps as usual.
            busy_poll: args.busy_poll.then_some(Duration::from_millis(10)),
            subnqn: args.nqn.clone(),
            hostnqn: args.hostnqn.clone(),
            hostid,
            cntlid,
            qid: i + 1,
            nsid: args.nsid,
            block_size,
            in_capsule: ioccsz,
            first_block: u64::from(i) * slice,
            blocks: slice,
            io_size: args.bs,
            queue_depth: args.qd as usize,
            read_pct,
            random,
            ios: args.ios.map(|t| t / n + u64::from(u64::from(i) < t % n)),
            until,
            verify: args.verify,
            verify_only: args.verify_only.then_some(args.generation),
            flush: args.flush,
            seed: args.seed,
            cpu: args.cpus.get(usize::from(i)).copied(),
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    // Keep alive on the admin queue while the workers run.
    let ka_stop = Arc::clone(&stop);
    let keep_alive = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut last = Instant::now();
        while !ka_stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if last.elapsed() >= Duration::from_secs(10) {
                admin.keep_alive().context("Keep Alive")?;
                last = Instant::now();
            }
        }
        Ok(())
    });
    let handles: Vec<_> = specs
        .into_iter()
        .map(|spec| {
            let (p, s) = (Arc::clone(&progress), Arc::clone(&stop));
            std::thread::spawn(move || worker::run(&spec, &p, &s))
        })
        .collect();
    if std::io::stderr().is_terminal() && !args.json {
        let mut last = 0;
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(500));
            let now = progress.load(Ordering::Relaxed);
            eprint!(
                "\r[{:6.1}s] {:>10} I/Os  {:>9.0} IOPS   ",
                start.elapsed().as_secs_f64(),
                now,
                (now - last) as f64 * 2.0
            );
            last = now;
        }
        eprintln!();
    }
    let mut results: Vec<WorkerResult> = Vec::new();
    let mut failure = None;
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => {
                stop.store(true, Ordering::Relaxed);
                failure.get_or_insert(e);
            }
            Err(_) => {
                failure.get_or_insert(anyhow::anyhow!("a worker panicked"));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    match keep_alive.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            failure.get_or_insert(e);
        }
        Err(_) => {
            failure.get_or_insert(anyhow::anyhow!("the keep-alive thread panicked"));
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let (mut reads, mut writes, mut checked, mut errors, mut first) = (0, 0, 0, 0, None);
    let mut seconds: f64 = 0.0;
    for r in &results {
        hist.add(&r.latency)?;
        reads += r.reads;
        writes += r.writes;
        checked += r.verified;
        errors += r.verify_errors;
        if first.is_none() {
            first.clone_from(&r.first_error);
        }
        seconds = seconds.max(r.elapsed.as_secs_f64());
    }
    let ios = reads + writes;
    let iops = ios as f64 / seconds.max(1e-9);
    let us = |ns: u64| ns as f64 / 1000.0;
    let report = Report {
        target: addr.to_string(),
        nqn: args.nqn.clone(),
        workload: format!("{:?}", args.workload).to_lowercase(),
        block_size,
        io_size: args.bs,
        queue_depth: args.qd,
        queues: args.queues,
        seconds,
        reads,
        writes,
        iops,
        mib_per_s: iops * args.bs as f64 / (1 << 20) as f64,
        latency_us: Latency {
            mean: hist.mean() / 1000.0,
            p50: us(hist.value_at_quantile(0.5)),
            p99: us(hist.value_at_quantile(0.99)),
            p999: us(hist.value_at_quantile(0.999)),
            max: us(hist.max()),
        },
        verify: (args.verify || args.verify_only).then(|| Verify {
            blocks_checked: checked,
            errors,
            first_error: first.clone(),
        }),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let l = &report.latency_us;
        println!(
            "{} {} QD{} x{}: {:.0} IOPS, {:.1} MiB/s, latency us mean {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} ({} I/Os in {:.2} s)",
            report.workload, args.bs, args.qd, args.queues, report.iops, report.mib_per_s,
            l.mean, l.p50, l.p99, l.p999, l.max, ios, seconds
        );
        if let Some(v) = &report.verify {
            println!(
                "verify: {} blocks checked, {} errors{}",
                v.blocks_checked,
                v.errors,
                v.first_error
                    .as_ref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(errors == 0)
}

fn run_multipath(args: &Args) -> anyhow::Result<bool> {
    let paths = args
        .paths
        .iter()
        .map(|p| address("--paths", p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.queues != 1 {
        bail!("--paths runs one queue per path (leave --queues at 1)");
    }
    if args.flush {
        bail!("--flush is for one path (with --paths, a path may fail over mid-flush)");
    }
    let (read_pct, random) = match args.workload {
        Workload::Randread => (100, true),
        Workload::Randwrite => (0, true),
        Workload::Read => (100, false),
        Workload::Write => (0, false),
        Workload::Mixed => (args.read_pct, true),
    };
    let time = match (args.time, args.ios) {
        (Some(t), _) if !(t > 0.0 && t < 1e7) => {
            bail!("--time {t}: must be a positive number of seconds")
        }
        (Some(t), _) => Some(Duration::from_secs_f64(t)),
        (None, Some(_)) => None,
        (None, None) if args.stop_file.is_some() => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    if args.io_timeout_ms == 0 || args.failover_timeout_ms == 0 {
        bail!("--io-timeout-ms and --failover-timeout-ms must be positive");
    }
    let spec = duplex_bench::multipath::Spec {
        paths,
        digests: Digests {
            header: args.digests,
            data: args.digests,
        },
        subnqn: args.nqn.clone(),
        hostnqn: args.hostnqn.clone(),
        hostid: hostid_of(&args.hostnqn),
        nsid: args.nsid,
        span_blocks: args.span_blocks,
        io_size: args.bs,
        queue_depth: args.qd as usize,
        read_pct,
        random,
        ios: args.ios,
        time,
        verify: args.verify,
        verify_only: args.verify_only.then_some(args.generation),
        seed: args.seed,
        io_timeout: Duration::from_millis(args.io_timeout_ms),
        failover_timeout: Duration::from_millis(args.failover_timeout_ms),
        connect_timeout: Duration::from_secs(30),
        stop_file: args.stop_file.clone(),
    };
    let r = duplex_bench::multipath::run(&spec)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let ios = r.reads + r.writes;
        println!(
            "multipath {} paths {:?} {} QD{}: {} I/Os in {:.2} s ({:.0} IOPS), latency us p50 {:.1} p99 {:.1} max {:.1}",
            spec.paths.len(),
            args.workload,
            args.bs,
            args.qd,
            ios,
            r.seconds,
            ios as f64 / r.seconds.max(1e-9),
            r.p50_us,
            r.p99_us,
            r.max_latency_us
        );
        println!(
            "paths: {} path errors, {} transport failures, {} retries, {} path switches, {} ANA change notices; I/O errors {}",
            r.path_errors, r.transport_failures, r.retries, r.path_switches, r.ana_notices, r.io_errors
        );
        if args.verify || args.verify_only {
            println!(
                "verify: {} blocks checked, {} errors{}",
                r.blocks_checked,
                r.verify_errors,
                r.first_error
                    .as_ref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(r.io_errors == 0 && r.verify_errors == 0)
}
