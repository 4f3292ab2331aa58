//! Multipath (`duplex-bench --paths ADDR1,ADDR2,...`): a host that follows ANA, as Linux native
//! NVMe multipath does, reduced to what a failover test must measure.
//!
//! * Every path has a controller of its own (admin queue, one I/O queue). Its *admin thread*
//!   connects, enables ANA change notices (Set Features Asynchronous Event Configuration, bit
//!   11), reads the ANA log page, and keeps one Asynchronous Event Request posted: each ANA
//!   change notice re-reads the log. A lost connection is dialled again every 100 ms, for as
//!   long as the run lasts (a restarted controller comes back as a path).
//! * One *worker* keeps `queue_depth` commands in flight on the path whose namespace group is
//!   optimized (non-optimized when no path is optimized). A command that fails with a path
//!   error (status code type 3: ANA inaccessible, persistent loss, transition; or a retriable
//!   internal error), or whose connection fails or times out (`io_timeout`), is sent again on
//!   the next usable path, until `failover_timeout` after its first try. A path that failed a
//!   command is not used again until its admin thread has read a newer ANA log (an ANA change
//!   notice, or a reconnect).
//! * Reported: I/O errors (commands that failed for good: must be 0), verify errors, path
//!   errors and transport failures seen, commands retried, path switches, and the largest
//!   latency of any I/O counted from its first try: the host-visible pause across a failover.
//!
//! Writes are idempotent here (the same generation's data to the same blocks), so a write
//! retried after its first path may or may not have done it is safe to repeat.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use duplex_host::{Data, HostError, Queue, QueueOptions};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::{admin, aen, ana, cns, feat, io, lid};
use duplex_nvme::status::Status;
use duplex_nvme::tcp::Digests;
use hdrhistogram::Histogram;

use crate::pattern::{self, Tag};

/// What the multipath run does.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The paths (each a controller's I/O port).
    pub paths: Vec<SocketAddr>,
    /// Digests.
    pub digests: Digests,
    /// Subsystem NQN (the same on every path).
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Namespace id.
    pub nsid: u32,
    /// Use only the first blocks of the namespace.
    pub span_blocks: Option<u64>,
    /// Bytes per I/O.
    pub io_size: usize,
    /// Commands in flight.
    pub queue_depth: usize,
    /// Percentage of reads.
    pub read_pct: u32,
    /// Random offsets.
    pub random: bool,
    /// Stop after this many I/Os.
    pub ios: Option<u64>,
    /// Stop after this long.
    pub time: Option<Duration>,
    /// Write tagged blocks and check every read; read everything back at the end.
    pub verify: bool,
    /// Only read back, expecting this generation.
    pub verify_only: Option<u64>,
    /// Seed of the tags.
    pub seed: u64,
    /// A command not answered within this is taken as lost with its connection.
    pub io_timeout: Duration,
    /// A command not done within this after its first try fails the run.
    pub failover_timeout: Duration,
    /// Wait this long for a first usable path.
    pub connect_timeout: Duration,
    /// Stop the load (then read back, when verifying) once this file exists.
    pub stop_file: Option<std::path::PathBuf>,
}

/// What the multipath run measured.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// Reads done.
    pub reads: u64,
    /// Writes done.
    pub writes: u64,
    /// Wall time of the load.
    pub seconds: f64,
    /// Commands that failed for good.
    pub io_errors: u64,
    /// Blocks checked.
    pub blocks_checked: u64,
    /// Blocks read back wrong.
    pub verify_errors: u64,
    /// The first verify error.
    pub first_error: Option<String>,
    /// Completions with a path error.
    pub path_errors: u64,
    /// Connections lost or timed out under commands.
    pub transport_failures: u64,
    /// Commands sent again.
    pub retries: u64,
    /// Changes of the path in use.
    pub path_switches: u64,
    /// ANA change notices received (all paths).
    pub ana_notices: u64,
    /// The largest latency of an I/O from its first try (µs): the host-visible pause.
    pub max_latency_us: f64,
    /// Median latency (µs).
    pub p50_us: f64,
    /// 99th percentile latency (µs).
    pub p99_us: f64,
    /// The path in use at the end (index in `--paths`).
    pub final_path: Option<usize>,
    /// Each failover the host went through: from the first failure (path error, lost or
    /// timed-out connection) to the next command done, and the largest latency of a command
    /// retried in it (from its first try): the pause the host saw.
    pub failovers: Vec<Failover>,
}

/// One failover as the host saw it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failover {
    /// From the first failure to the next command done (µs).
    pub gap_us: f64,
    /// The largest latency of a command retried in it, from its first try (µs).
    pub pause_us: f64,
}

/// One path as its admin thread sees it.
#[derive(Debug, Clone, Copy, Default)]
struct PathView {
    /// The controller id (when connected).
    cntlid: Option<u16>,
    /// The namespace's group state (`ana::*`; 0: unknown).
    state: u8,
    /// Bumped on every ANA log read (and reconnect).
    generation: u64,
    /// Bumped on every admin connect: a new session may be a new controller instance, with
    /// which the I/O queues opened before have nothing to do.
    session: u64,
    /// Namespace geometry (from this controller).
    blocks: u64,
    block_size: usize,
    in_capsule: usize,
}

struct Shared {
    views: Mutex<Vec<PathView>>,
    stop: AtomicBool,
    notices: AtomicU64,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    b.get(o..o + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

/// The state of group `group` in an ANA log page (0: not listed).
pub fn ana_state_of(log: &[u8], group: u32) -> u8 {
    let count = usize::from(u16_at(log, 8));
    let mut at = 16;
    for _ in 0..count {
        if at + 32 > log.len() {
            break;
        }
        let g = u32_at(log, at);
        let nnsid = u32_at(log, at + 4) as usize;
        let state = log[at + 16] & 0x0F;
        if g == group {
            return state;
        }
        at = at
            .saturating_add(32)
            .saturating_add(nnsid.saturating_mul(4));
    }
    0
}

fn execute(q: &mut Queue, sqe: Sqe, data: Data) -> anyhow::Result<Vec<u8>> {
    let c = q.execute(sqe, data)?;
    if !c.status().is_success() {
        bail!("{}", c.status());
    }
    Ok(c.data)
}

fn read_ana(q: &mut Queue, group: u32) -> anyhow::Result<u8> {
    let len = 4096usize;
    let numd = (len / 4 - 1) as u32;
    let sqe = Sqe {
        opcode: admin::GET_LOG_PAGE,
        cdw10: u32::from(lid::ANA) | (numd & 0xFFFF) << 16,
        cdw11: numd >> 16,
        ..Sqe::default()
    };
    let log = execute(q, sqe, Data::In(len)).context("Get Log Page ANA")?;
    Ok(ana_state_of(&log, group))
}

/// One path's admin thread: connect, watch ANA, reconnect; until the run stops.
fn admin_thread(spec: &Spec, path: usize, shared: &Shared) {
    let addr = spec.paths[path];
    while !shared.stop.load(Ordering::Relaxed) {
        if let Err(e) = admin_session(spec, path, shared) {
            tracing_line(&format!("path {path} ({addr}): {e:#}"));
        }
        {
            let mut v = shared.views.lock().unwrap_or_else(|p| p.into_inner());
            v[path].cntlid = None;
            v[path].state = 0;
            v[path].generation += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tracing_line(s: &str) {
    if std::env::var_os("DUPLEX_BENCH_DEBUG").is_some() {
        eprintln!("duplex-bench: {s}");
    }
}

fn admin_session(spec: &Spec, path: usize, shared: &Shared) -> anyhow::Result<()> {
    let addr = spec.paths[path];
    let mut q = Queue::dial(
        addr,
        QueueOptions {
            digests: spec.digests,
            // An AER waits as long as nothing changes.
            timeout: None,
            ..QueueOptions::default()
        },
    )
    .with_context(|| format!("connecting to {addr}"))?;
    // No keep alive (KATO 0): this thread sleeps in the AER.
    let cntlid = q.connect(0, 31, 0, 0xFFFF, &spec.subnqn, &spec.hostnqn, spec.hostid)?;
    q.enable()?;
    let ctrl = q.identify(cns::CONTROLLER, 0)?;
    let ns = q.identify(cns::NAMESPACE, spec.nsid)?;
    let nsze = u64::from(u32_at(&ns, 0)) | (u64::from(u32_at(&ns, 4)) << 32);
    let lbaf = ns.get(26).copied().unwrap_or(0) & 0xF;
    let block_size = 1usize << ((u32_at(&ns, 128 + 4 * usize::from(lbaf)) >> 16) & 0x1F);
    let group = u32_at(&ns, 92);
    let in_capsule = (u32_at(&ctrl, 1792) as usize * 16).saturating_sub(64);
    if nsze == 0 {
        bail!("namespace {} is empty or inactive", spec.nsid);
    }
    q.set_queues(1)?;
    execute(
        &mut q,
        Sqe {
            opcode: admin::SET_FEATURES,
            cdw10: u32::from(feat::ASYNC_EVENT),
            cdw11: aen::CFG_ANA_CHANGE,
            ..Sqe::default()
        },
        Data::None,
    )
    .context("enabling ANA change notices")?;
    let state = if group == 0 {
        ana::OPTIMIZED
    } else {
        read_ana(&mut q, group)?
    };
    {
        let mut v = shared.views.lock().unwrap_or_else(|p| p.into_inner());
        v[path] = PathView {
            cntlid: Some(cntlid),
            state,
            generation: v[path].generation + 1,
            session: v[path].session + 1,
            blocks: nsze,
            block_size,
            in_capsule,
        };
    }
    tracing_line(&format!(
        "path {path} ({addr}): controller {cntlid}, state {state}"
    ));
    loop {
        q.submit(
            Sqe {
                opcode: admin::ASYNC_EVENT,
                ..Sqe::default()
            },
            Data::None,
        )?;
        let c = q.poll()?;
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if !c.status().is_success() {
            bail!("Asynchronous Event Request: {}", c.status());
        }
        shared.notices.fetch_add(1, Ordering::Relaxed);
        let state = read_ana(&mut q, group)?;
        tracing_line(&format!("path {path}: ANA change notice, state {state}"));
        let mut v = shared.views.lock().unwrap_or_else(|p| p.into_inner());
        v[path].state = state;
        v[path].generation += 1;
    }
}

/// One command of the workload, through its tries.
#[derive(Clone)]
struct Cmd {
    first: Instant,
    slot: u64,
    write: bool,
    generation: u64,
    retried: bool,
}

/// How long a path whose connection failed waits before a new one is tried without ANA news
/// (as the Linux host's `reconnect_delay`, shorter: a test run is short).
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

struct IoPath {
    queue: Option<Queue>,
    /// The admin session the queue was opened in.
    session: u64,
    /// The admin generation when this path last failed a command (not used until it moves),
    /// and for a failed connection, when a new one is tried anyway (the host's reconnect
    /// delay: a controller that stalled a command past the I/O timeout may be well, with no
    /// ANA news to give).
    failed_at: Option<(u64, Option<Instant>)>,
    inflight: HashMap<u16, Cmd>,
}

/// Runs the multipath workload.
pub fn run(spec: &Spec) -> anyhow::Result<Report> {
    if spec.paths.is_empty() {
        bail!("--paths names no path");
    }
    let shared = Arc::new(Shared {
        views: Mutex::new(vec![PathView::default(); spec.paths.len()]),
        stop: AtomicBool::new(false),
        notices: AtomicU64::new(0),
    });
    let admins: Vec<_> = (0..spec.paths.len())
        .map(|p| {
            let (spec, shared) = (spec.clone(), Arc::clone(&shared));
            std::thread::spawn(move || admin_thread(&spec, p, &shared))
        })
        .collect();
    let result = work(spec, &shared);
    shared.stop.store(true, Ordering::Relaxed);
    // Admin threads sleep in an AER: they end with the process (detached).
    drop(admins);
    result
}

fn work(spec: &Spec, shared: &Shared) -> anyhow::Result<Report> {
    // The geometry, from the first path that connects.
    let deadline = Instant::now() + spec.connect_timeout;
    let (blocks, block_size) = loop {
        let v = shared
            .views
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(p) = v.iter().find(|p| p.cntlid.is_some()) {
            break (p.blocks, p.block_size);
        }
        if Instant::now() > deadline {
            bail!("no path connected within {:?}", spec.connect_timeout);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if spec.io_size % block_size != 0 {
        bail!(
            "--bs {} is not a multiple of the block size {block_size}",
            spec.io_size
        );
    }
    let nlb = (spec.io_size / block_size) as u64;
    let span = spec.span_blocks.unwrap_or(blocks).min(blocks);
    let slots = span / nlb;
    if slots == 0 {
        bail!("the span is smaller than one I/O");
    }
    let mut paths: Vec<IoPath> = (0..spec.paths.len())
        .map(|_| IoPath {
            queue: None,
            session: 0,
            failed_at: None,
            inflight: HashMap::new(),
        })
        .collect();
    let mut gens = vec![0u64; slots as usize];
    if let Some(g) = spec.verify_only {
        gens.fill(g);
    }
    let mut busy = vec![false; slots as usize];
    let mut rng = spec.seed | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut seq = 0u64;
    let mut retry: VecDeque<Cmd> = VecDeque::new();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)?;
    let mut r = Report {
        reads: 0,
        writes: 0,
        seconds: 0.0,
        io_errors: 0,
        blocks_checked: 0,
        verify_errors: 0,
        first_error: None,
        path_errors: 0,
        transport_failures: 0,
        retries: 0,
        path_switches: 0,
        ana_notices: 0,
        max_latency_us: 0.0,
        p50_us: 0.0,
        p99_us: 0.0,
        final_path: None,
        failovers: Vec::new(),
    };
    // The failover under way: when its first failure came, when the next command was done.
    let mut event: Option<(Instant, Option<Duration>, Duration)> = None;
    let begin = Instant::now();
    let until = spec.time.map(|t| begin + t);
    let mut sent = 0u64;
    // The final read-back: every slot with a generation, in order.
    let mut checking = spec.verify_only.is_some();
    let mut check_next = 0u64;
    let mut current: Option<usize> = None;
    let mut no_path_since: Option<Instant> = None;
    loop {
        let views = shared
            .views
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // The path to use: optimized first, then non-optimized; never one that failed a
        // command since its last ANA news, unless no other can be used and its connection
        // failed a reconnect delay ago (a new one is tried).
        let now = Instant::now();
        let usable = |i: usize, want: u8, retrying: bool| {
            views[i].cntlid.is_some()
                && views[i].state == want
                && match paths[i].failed_at {
                    Some((g, retry_at)) if g == views[i].generation => {
                        retrying && retry_at.is_some_and(|t| now >= t)
                    }
                    _ => !retrying,
                }
        };
        let pick = [
            (ana::OPTIMIZED, false),
            (ana::NON_OPTIMIZED, false),
            (ana::OPTIMIZED, true),
            (ana::NON_OPTIMIZED, true),
        ]
        .into_iter()
        .find_map(|(want, retrying)| {
            (0..paths.len())
                .find(|&i| usable(i, want, retrying))
                .map(|i| (i, retrying))
        });
        // A path tried again only because nothing else can be used does not end the wait for
        // a usable path: a command it completes does.
        let retrying = pick.is_some_and(|(_, r)| r);
        let pick = pick.map(|(i, _)| i);
        let loading = !checking
            && spec.ios.is_none_or(|n| sent < n)
            && until.is_none_or(|t| Instant::now() < t)
            && spec.stop_file.as_ref().is_none_or(|f| !f.exists());
        if pick.is_none() || retrying {
            let since = *no_path_since.get_or_insert_with(Instant::now);
            if since.elapsed() > spec.failover_timeout {
                bail!(
                    "no usable path for {:?} (path errors {}, transport failures {})",
                    spec.failover_timeout,
                    r.path_errors,
                    r.transport_failures
                );
            }
        } else {
            no_path_since = None;
        }
        if let Some(p) = pick {
            if current != Some(p) {
                if current.is_some() {
                    r.path_switches += 1;
                }
                tracing_line(&format!("using path {p}"));
                current = Some(p);
            }
            if paths[p].queue.is_some()
                && paths[p].session != views[p].session
                && paths[p].inflight.is_empty()
            {
                // Opened for an earlier session (the controller may have restarted since):
                // a fresh one, for the controller the admin queue now knows.
                tracing_line(&format!("path {p}: I/O queue of an earlier session closed"));
                paths[p].queue = None;
            }
            if paths[p].queue.is_none() {
                match open_io(spec, p, &views[p]) {
                    Ok(q) => {
                        paths[p].queue = Some(q);
                        paths[p].session = views[p].session;
                    }
                    Err(e) => {
                        tracing_line(&format!("path {p}: I/O queue: {e:#}"));
                        paths[p].failed_at =
                            Some((views[p].generation, Some(Instant::now() + RECONNECT_DELAY)));
                        continue;
                    }
                }
            }
            // Fill the queue: retries first, then new commands.
            while paths[p].inflight.len() < spec.queue_depth {
                let cmd = if let Some(c) = retry.pop_front() {
                    r.retries += 1;
                    c
                } else if loading && spec.verify_only.is_none() {
                    let mut slot = if spec.random {
                        next() % slots
                    } else {
                        seq += 1;
                        (seq - 1) % slots
                    };
                    let mut tries = 0;
                    while busy[slot as usize] && tries < slots {
                        slot = (slot + 1) % slots;
                        tries += 1;
                    }
                    if busy[slot as usize] {
                        break;
                    }
                    let write = next() % 100 >= u64::from(spec.read_pct);
                    let generation = if write {
                        gens[slot as usize] + 1
                    } else {
                        gens[slot as usize]
                    };
                    sent += 1;
                    Cmd {
                        first: Instant::now(),
                        slot,
                        write,
                        generation,
                        retried: false,
                    }
                } else if checking && check_next < slots {
                    let slot = check_next;
                    check_next += 1;
                    if gens[slot as usize] == 0 {
                        continue;
                    }
                    Cmd {
                        first: Instant::now(),
                        slot,
                        write: false,
                        generation: gens[slot as usize],
                        retried: false,
                    }
                } else {
                    break;
                };
                busy[cmd.slot as usize] = true;
                let lba = cmd.slot * nlb;
                let sqe = Sqe {
                    opcode: if cmd.write { io::WRITE } else { io::READ },
                    nsid: spec.nsid,
                    cdw10: lba as u32,
                    cdw11: (lba >> 32) as u32,
                    cdw12: (nlb - 1) as u32,
                    ..Sqe::default()
                };
                let data = if cmd.write {
                    let mut buf = vec![0u8; spec.io_size];
                    if spec.verify {
                        for (i, b) in buf.chunks_mut(block_size).enumerate() {
                            pattern::fill(
                                b,
                                &Tag {
                                    lba: lba + i as u64,
                                    seed: spec.seed,
                                    generation: cmd.generation,
                                },
                            );
                        }
                    }
                    Data::Out(buf)
                } else {
                    Data::In(spec.io_size)
                };
                let q = paths[p].queue.as_mut().context("queue")?;
                match q.submit(sqe, data) {
                    Ok(cid) => {
                        paths[p].inflight.insert(cid, cmd);
                    }
                    Err(e) => {
                        tracing_line(&format!("path {p}: submit: {e}"));
                        open_event(&mut event, &mut r);
                        retry.push_back(Cmd {
                            retried: true,
                            ..cmd
                        });
                        fail_path(&mut paths[p], &mut retry, &views[p], &mut r);
                        break;
                    }
                }
            }
        }
        // Nothing more to do?
        let outstanding: usize = paths.iter().map(|p| p.inflight.len()).sum();
        if outstanding == 0 && retry.is_empty() {
            if !loading && !checking && (spec.verify || spec.verify_only.is_some()) {
                checking = true;
                continue;
            }
            if !loading && (!checking || check_next >= slots) {
                break;
            }
        }
        // A command retried for too long fails the run.
        if let Some(c) = retry.front() {
            if c.first.elapsed() > spec.failover_timeout {
                r.io_errors += 1;
                bail!(
                    "no path served the {} at block {} within {:?} (path errors {}, transport failures {})",
                    if c.write { "write" } else { "read" },
                    c.slot * nlb,
                    spec.failover_timeout,
                    r.path_errors,
                    r.transport_failures
                );
            }
        }
        // Wait for a completion on a path with commands out (the chosen one first).
        let Some(p) = pick
            .filter(|&p| !paths[p].inflight.is_empty())
            .or_else(|| paths.iter().position(|p| !p.inflight.is_empty()))
        else {
            // No path to send on: wait for ANA news.
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let polled = match paths[p].queue.as_mut() {
            Some(q) => q.poll(),
            None => Err(HostError::Unexpected("no queue".into())),
        };
        match polled {
            Ok(c) => {
                let Some(cmd) = paths[p].inflight.remove(&c.cid) else {
                    bail!("path {p}: a completion for command {} not in flight", c.cid);
                };
                let status: Status = c.status();
                if status.is_success() {
                    no_path_since = None;
                    if let Some((opened, gap, worst)) = event.as_mut() {
                        if gap.is_none() {
                            *gap = Some(opened.elapsed());
                        }
                        if cmd.retried {
                            *worst = (*worst).max(cmd.first.elapsed());
                        }
                    }
                    busy[cmd.slot as usize] = false;
                    latency.record(cmd.first.elapsed().as_nanos().max(1) as u64)?;
                    if cmd.write {
                        r.writes += 1;
                        gens[cmd.slot as usize] = cmd.generation;
                    } else {
                        r.reads += 1;
                        if (spec.verify || spec.verify_only.is_some()) && cmd.generation > 0 {
                            check(spec, block_size, nlb, &cmd, &c.data, &mut r);
                        }
                    }
                } else if status.sct() == 3
                    || (!status.is_dnr() && status.sct() == 0 && status.sc() == 0x06)
                {
                    // A path error: this path is not to be used until ANA says more.
                    r.path_errors += 1;
                    tracing_line(&format!("path {p}: {status} at block {}", cmd.slot * nlb));
                    paths[p].failed_at = Some((views[p].generation, None));
                    open_event(&mut event, &mut r);
                    retry.push_back(Cmd {
                        retried: true,
                        ..cmd
                    });
                } else {
                    r.io_errors += 1;
                    bail!(
                        "{} at block {} failed on path {p}: {status}",
                        if cmd.write { "write" } else { "read" },
                        cmd.slot * nlb
                    );
                }
            }
            Err(e) => {
                tracing_line(&format!("path {p}: {e}"));
                open_event(&mut event, &mut r);
                fail_path(&mut paths[p], &mut retry, &views[p], &mut r);
            }
        }
    }
    close_event(&mut event, &mut r);
    r.seconds = begin.elapsed().as_secs_f64();
    r.ana_notices = shared.notices.load(Ordering::Relaxed);
    r.max_latency_us = latency.max() as f64 / 1000.0;
    r.p50_us = latency.value_at_quantile(0.5) as f64 / 1000.0;
    r.p99_us = latency.value_at_quantile(0.99) as f64 / 1000.0;
    r.final_path = current;
    Ok(r)
}

/// A failure: opens a failover unless one is open that no command has ended yet (a failover
/// that a command ended is recorded first).
fn open_event(event: &mut Option<(Instant, Option<Duration>, Duration)>, r: &mut Report) {
    if matches!(event, Some((_, None, _))) {
        return;
    }
    close_event(event, r);
    *event = Some((Instant::now(), None, Duration::ZERO));
}

fn close_event(event: &mut Option<(Instant, Option<Duration>, Duration)>, r: &mut Report) {
    if let Some((opened, gap, worst)) = event.take() {
        r.failovers.push(Failover {
            gap_us: gap.unwrap_or_else(|| opened.elapsed()).as_secs_f64() * 1e6,
            pause_us: worst.as_secs_f64() * 1e6,
        });
    }
}

/// A path's connection failed under commands: every one goes to the retry queue. The path is
/// not used again until its admin queue has news, unless the queue that failed was of an
/// earlier admin session (a controller since restarted): then a new queue is tried at once.
fn fail_path(p: &mut IoPath, retry: &mut VecDeque<Cmd>, view: &PathView, r: &mut Report) {
    r.transport_failures += 1;
    p.queue = None;
    if p.session == view.session {
        p.failed_at = Some((view.generation, Some(Instant::now() + RECONNECT_DELAY)));
    }
    let mut cmds: Vec<Cmd> = p
        .inflight
        .drain()
        .map(|(_, c)| Cmd { retried: true, ..c })
        .collect();
    cmds.sort_by_key(|c| c.first);
    retry.extend(cmds);
}

fn open_io(spec: &Spec, path: usize, view: &PathView) -> anyhow::Result<Queue> {
    let cntlid = view.cntlid.context("not connected")?;
    let mut q = Queue::dial(
        spec.paths[path],
        QueueOptions {
            digests: spec.digests,
            timeout: Some(spec.io_timeout),
            in_capsule: view.in_capsule,
            ..QueueOptions::default()
        },
    )?;
    q.connect(
        1,
        u16::try_from(spec.queue_depth.saturating_sub(1))
            .unwrap_or(u16::MAX)
            .max(1),
        0,
        cntlid,
        &spec.subnqn,
        &spec.hostnqn,
        spec.hostid,
    )?;
    Ok(q)
}

fn check(spec: &Spec, block_size: usize, nlb: u64, cmd: &Cmd, data: &[u8], r: &mut Report) {
    let lba0 = cmd.slot * nlb;
    for (i, block) in data.chunks(block_size).enumerate() {
        let want = Tag {
            lba: lba0 + i as u64,
            seed: spec.seed,
            generation: cmd.generation,
        };
        r.blocks_checked += 1;
        if let Err(m) = pattern::check(block, &want) {
            r.verify_errors += 1;
            if r.first_error.is_none() {
                r.first_error = Some(format!(
                    "block {}: expected {want:?}, found {m:?}",
                    want.lba
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ana_log_is_read_at_the_specification_offsets() {
        // Header (16 bytes), then a descriptor per group: id, NSID count, change count,
        // state at byte 16, NSIDs from byte 32.
        let mut log = vec![0u8; 16];
        log[8] = 2;
        for (group, state, nsids) in [(1u32, ana::INACCESSIBLE, 2u32), (2, ana::OPTIMIZED, 1)] {
            let mut d = vec![0u8; 32];
            d[0..4].copy_from_slice(&group.to_le_bytes());
            d[4..8].copy_from_slice(&nsids.to_le_bytes());
            d[16] = state;
            log.extend_from_slice(&d);
            for n in 0..nsids {
                log.extend_from_slice(&(n + 1).to_le_bytes());
            }
        }
        assert_eq!(ana_state_of(&log, 1), ana::INACCESSIBLE);
        assert_eq!(ana_state_of(&log, 2), ana::OPTIMIZED);
        assert_eq!(ana_state_of(&log, 3), 0);
        // Truncated or hostile: no panic, nothing found.
        assert_eq!(ana_state_of(&log[..40], 2), 0);
        let mut bad = log.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(ana_state_of(&bad, 2), 0);
    }
}
