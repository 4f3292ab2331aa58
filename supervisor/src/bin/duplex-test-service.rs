//! A service for the supervisor's system tests. Not a user tool.
//!
//! Does the lifecycle handshake, attaches what it was handed, enters the `test-service` seccomp
//! policy (before it says Ready and serves), beats its health counter, obeys `Shutdown` and
//! `Inject`, and plays one of three roles:
//!
//! * `--role idle` (default): attaches every handed-over ring and pool (proving the fds are the
//!   real objects), says Ready, then only serves control messages.
//! * `--role ends --out RING --in RING [--rate N]`: both ends of a checksummed stream. Publishes
//!   descriptors numbered 1, 2, 3, … (tag = sequence; lba, reserved words and checksum derived
//!   from it) on `--out`, at most `N` per second, and checks what comes back on `--in`: every
//!   sequence number exactly once, in order, intact. Logs `stream progress …` lines and, on
//!   Shutdown, `stream verdict sent=… received=… gaps=… dups=… corrupt=…`.
//! * `--role relay --in RING --out RING`: forwards every descriptor from `--in` to `--out`
//!   exactly once across its own crashes: it *peeks* at `--in`, publishes on `--out`, and only
//!   then consumes from `--in`; a restarted relay reads the last descriptor its predecessor
//!   published on `--out` and skips what was already forwarded.
//!
//! `--exit-after-ready` makes it exit with status 3 right after Ready (a crash loop on demand).
//! `--garbage control|admin` makes an idle service send a malformed message on its lifecycle
//! channel (or on the admin channel, when it runs as `mgmt`) once after Ready, then carry on:
//! the supervisor must drop it and run on.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use duplex_ipc::control::{ControlError, ResourceKind, StartMode};
use duplex_ipc::desc::IoDesc;
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::lifecycle::{self, Health, Next, Started};
use duplex_ipc::pool::{Holder, Pool};
use duplex_ipc::ring::{self, Consumer, Producer, RingRegion, WaitPolicy};

/// One write per line, so lines from several threads or processes do not interleave.
fn say(name: &str, text: &str) {
    let line = format!("duplex-test-service {name}: {text}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

struct Args {
    role: String,
    input: Option<String>,
    output: Option<String>,
    rate: u64,
    exit_after_ready: bool,
    garbage: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        role: "idle".into(),
        input: None,
        output: None,
        rate: 20_000,
        exit_after_ready: false,
        garbage: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |what: &str| it.next().ok_or(format!("{what} needs a value"));
        match a.as_str() {
            "--role" => args.role = value("--role")?,
            "--in" => args.input = Some(value("--in")?),
            "--out" => args.output = Some(value("--out")?),
            "--rate" => {
                args.rate = value("--rate")?
                    .parse()
                    .map_err(|e| format!("--rate: {e}"))?;
            }
            "--exit-after-ready" => args.exit_after_ready = true,
            "--garbage" => args.garbage = Some(value("--garbage")?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let name = std::env::var("DUPLEX_SERVICE").unwrap_or_else(|_| "test".into());
    lifecycle::abort_on_panic();
    match run(&name) {
        Ok(code) => code,
        Err(e) => {
            say(&name, &format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error>;

/// The seccomp policy in force from before Ready on. Validating handed-over fds (a socket's
/// type, an eventfd's `/proc/self/fd` link) needs calls the policy does not allow, so the
/// service attaches everything first.
fn enter_sandbox() -> Result<(), Error> {
    duplex_sandbox::enter("test-service").map_err(|e| format!("cannot enter the sandbox: {e}"))?;
    Ok(())
}

fn run(name: &str) -> Result<ExitCode, Error> {
    let args = parse_args()?;
    let mut started = lifecycle::start(name, Duration::from_secs(30))?;
    let health = started.health()?;
    match args.role.as_str() {
        "idle" => idle(name, started, &health, &args),
        "ends" => {
            let out = producer(&mut started, args.output.as_deref())?;
            let inp = consumer(&mut started, args.input.as_deref())?;
            enter_sandbox()?;
            ends(name, started, &health, out, inp, args.rate)
        }
        "relay" => {
            let inp = consumer(&mut started, args.input.as_deref())?;
            let out = producer(&mut started, args.output.as_deref())?;
            enter_sandbox()?;
            relay(name, started, &health, inp, out)
        }
        other => Err(format!("unknown role {other}").into()),
    }
}

fn ring_parts(
    started: &mut Started,
    ring: Option<&str>,
) -> Result<(RingRegion<IoDesc>, Doorbell, Doorbell), Error> {
    let ring = ring.ok_or("--in/--out RING is required for this role")?;
    let mut take = |suffix: &str| {
        let n = format!("ring:{ring}{suffix}");
        started.take(&n).ok_or(format!("no resource {n}"))
    };
    let region = RingRegion::<IoDesc>::attach(take("")?.fd)?;
    let data = Doorbell::from_fd(take(":data")?.fd)?;
    let space = Doorbell::from_fd(take(":space")?.fd)?;
    Ok((region, data, space))
}

fn ring_mode(started: &Started) -> ring::StartMode {
    match started.mode {
        StartMode::Fresh => ring::StartMode::Fresh,
        StartMode::Restart => ring::StartMode::Restart,
    }
}

fn producer(started: &mut Started, ring: Option<&str>) -> Result<Producer<IoDesc>, Error> {
    let (region, data, space) = ring_parts(started, ring)?;
    let mut p = Producer::attach(region, data, space, started.generation, ring_mode(started))?;
    p.set_policy(WaitPolicy::Doorbell);
    Ok(p)
}

fn consumer(started: &mut Started, ring: Option<&str>) -> Result<Consumer<IoDesc>, Error> {
    let (region, data, space) = ring_parts(started, ring)?;
    let mut c = Consumer::attach(region, data, space, started.generation, ring_mode(started))?;
    c.set_policy(WaitPolicy::Doorbell);
    Ok(c)
}

/// Handles every pending control message; returns whether to shut down.
fn control(started: &Started, wait: Duration) -> Result<bool, Error> {
    let mut wait = wait;
    loop {
        match started.channel.recv_timeout(wait) {
            Ok(Some((env, _))) => {
                if started.handle(&env) == Next::Shutdown {
                    return Ok(true);
                }
            }
            Ok(None) => return Ok(false),
            Err(ControlError::PeerClosed) => return Ok(true),
            Err(e) => return Err(e.into()),
        }
        wait = Duration::ZERO;
    }
}

fn idle(name: &str, mut started: Started, health: &Health, args: &Args) -> Result<ExitCode, Error> {
    let mut attached = 1; // the health region
    let mut admin = None;
    for r in std::mem::take(&mut started.resources) {
        match r.kind {
            ResourceKind::Socket if r.name == "admin" => {
                admin = Some(duplex_ipc::admin::AdminChannel::from_fd(r.fd)?);
            }
            ResourceKind::RingRegion => {
                RingRegion::<IoDesc>::attach(r.fd)?;
            }
            ResourceKind::Pool => {
                Pool::attach(
                    r.fd,
                    Holder {
                        role: 9,
                        incarnation: started.generation,
                    },
                )?;
            }
            _ => {}
        }
        attached += 1;
    }
    enter_sandbox()?;
    started.ready()?;
    say(
        name,
        &format!(
            "generation {} ready with {attached} resources",
            started.generation
        ),
    );
    if args.exit_after_ready {
        return Ok(ExitCode::from(3));
    }
    match args.garbage.as_deref() {
        None => {}
        Some("control") => started
            .channel
            .send_raw_for_tests(b"\x01\x00\x00\x00garbage!")?,
        Some("admin") => admin
            .as_ref()
            .ok_or("--garbage admin: no admin channel (only mgmt has one)")?
            .send_raw_for_tests(b"\x01\x00\x00\x00garbage!")?,
        Some(other) => return Err(format!("--garbage {other}: control or admin").into()),
    }
    let tick = health.interval() / 2;
    loop {
        health.beat();
        if control(&started, tick)? {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn checksum(d: &IoDesc) -> u32 {
    let mut bytes = [0_u8; 36];
    for (i, w) in [d.tag, d.lba, d.reserved[0], d.reserved[1]]
        .iter()
        .enumerate()
    {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    bytes[32..].copy_from_slice(&d.blocks.to_le_bytes());
    crc32c::crc32c(&bytes)
}

fn make(seq: u64, epoch: u64) -> IoDesc {
    let mut d = IoDesc {
        tag: seq,
        epoch,
        lba: splitmix(seq),
        blocks: (splitmix(seq ^ 0x55) % 256) as u32 + 1,
        opcode: duplex_ipc::desc::OP_WRITE,
        flags: duplex_ipc::desc::FLAG_CHECKSUM,
        reserved: [splitmix(seq ^ 0xAA), splitmix(seq ^ 0xCC)],
        ..IoDesc::default()
    };
    d.checksum = checksum(&d);
    d
}

fn intact(d: &IoDesc) -> bool {
    d.lba == splitmix(d.tag)
        && d.reserved == [splitmix(d.tag ^ 0xAA), splitmix(d.tag ^ 0xCC)]
        && d.checksum == checksum(d)
}

#[derive(Default)]
struct Verdict {
    sent: u64,
    received: u64,
    gaps: u64,
    dups: u64,
    corrupt: u64,
}

impl Verdict {
    fn line(&self, what: &str) -> String {
        format!(
            "stream {what} sent={} received={} gaps={} dups={} corrupt={} in_flight={}",
            self.sent,
            self.received,
            self.gaps,
            self.dups,
            self.corrupt,
            self.sent - self.received.min(self.sent)
        )
    }
}

/// The far ends of the stream. The datapath role: never restarted, so it keeps the whole
/// stream's verdict in its heap.
fn ends(
    name: &str,
    started: Started,
    health: &Health,
    mut out: Producer<IoDesc>,
    mut inp: Consumer<IoDesc>,
    rate: u64,
) -> Result<ExitCode, Error> {
    started.ready()?;
    say(
        name,
        &format!("generation {} ready (ends)", started.generation),
    );
    let mut v = Verdict::default();
    let mut expected = 1_u64;
    let begun = Instant::now();
    let mut last_report = Instant::now();
    let mut batch = Vec::with_capacity(64);
    let mut got = Vec::with_capacity(64);
    loop {
        health.beat();
        if control(&started, Duration::ZERO)? {
            say(name, &v.line("verdict"));
            return Ok(ExitCode::SUCCESS);
        }
        // Pace: at most `rate` per second since start, and a bounded window in flight.
        let allowed = (begun.elapsed().as_micros() as u64).saturating_mul(rate) / 1_000_000;
        let window = v.sent - v.received.min(v.sent);
        let want = allowed
            .saturating_sub(v.sent)
            .min(64)
            .min(512 - window.min(512));
        batch.clear();
        for k in 0..want {
            batch.push(make(v.sent + 1 + k, started.generation));
        }
        if !batch.is_empty() {
            v.sent += out.try_push(&batch)? as u64;
        }
        got.clear();
        let n = inp.pop_wait(&mut got, 64, Some(Duration::from_millis(2)))?;
        for d in &got[..n] {
            v.received += 1;
            if !intact(d) {
                v.corrupt += 1;
                say(name, &format!("CORRUPT descriptor {d:?}"));
            }
            if d.tag == expected {
                expected += 1;
            } else if d.tag < expected {
                v.dups += 1;
                say(
                    name,
                    &format!("DUPLICATE seq {} (expected {expected})", d.tag),
                );
            } else {
                v.gaps += d.tag - expected;
                say(name, &format!("GAP: got seq {} expected {expected}", d.tag));
                expected = d.tag + 1;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            say(name, &v.line("progress"));
        }
    }
}

/// Forwards `inp` → `out` exactly once across its own restarts.
fn relay(
    name: &str,
    started: Started,
    health: &Health,
    mut inp: Consumer<IoDesc>,
    mut out: Producer<IoDesc>,
) -> Result<ExitCode, Error> {
    // What the predecessor forwarded last: everything up to it is done, even if the
    // predecessor died before consuming it from `inp`.
    let mut last = out.last_published().map_or(0, |d| d.tag);
    started.ready()?;
    say(
        name,
        &format!(
            "generation {} ready (relay, mode {:?}, last forwarded seq {last})",
            started.generation, started.mode
        ),
    );
    let mut batch = Vec::with_capacity(64);
    loop {
        health.beat();
        if control(&started, Duration::ZERO)? {
            return Ok(ExitCode::SUCCESS);
        }
        if !inp.wait_ready(Some(Duration::from_millis(5)))? {
            continue;
        }
        batch.clear();
        inp.try_peek(&mut batch, 64)?;
        let skip = batch.iter().take_while(|d| d.tag <= last).count();
        if skip > 0 {
            say(
                name,
                &format!(
                    "skipping {skip} descriptors already forwarded by a predecessor (up to seq {last})"
                ),
            );
            inp.commit(skip as u64)?;
            continue;
        }
        let pushed = out.push_wait(&batch, Some(Duration::from_millis(5)))?;
        if pushed > 0 {
            last = batch[pushed - 1].tag;
            inp.commit(pushed as u64)?;
        }
    }
}
