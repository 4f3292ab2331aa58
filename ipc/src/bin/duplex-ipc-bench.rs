//! `duplex-ipc-bench`: cross-process ring figures beside references measured in the same run.
//!
//! ```text
//! cargo run --release -p duplex-ipc --bin duplex-ipc-bench [-- --quick]
//! ```
//!
//! Measures, with the parent pinned to CPU 0 and a child process pinned to CPU 1:
//! one-way throughput of 64-byte descriptors at batch 1 and 32, polled and doorbell; round-trip
//! latency (median, p99), polled and doorbell; and as references a crossbeam channel between two
//! threads and a Unix socket pair between two processes. Figures only: nothing is asserted.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Instant;

use duplex_ipc::desc::IoDesc;
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::ring::{Consumer, Producer, RingRegion, StartMode, WaitPolicy};
use duplex_ipc::testkit::{inherited_fd, spawn_with_fds};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const OP_END: u8 = 0xff;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("child") => child(&args[1..]),
        None | Some("--quick") => parent(!args.is_empty()),
        Some(other) => {
            Err(format!("unknown argument {other:?}; usage: duplex-ipc-bench [--quick]").into())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex-ipc-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Online CPUs (not the affinity mask, which pinning narrows and children inherit).
fn online_cpus() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(1)
        .max(1)
}

fn pin(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    let ncpu = online_cpus();
    if set.set(cpu % ncpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn policy(name: &str) -> Res<WaitPolicy> {
    match name {
        "poll" => Ok(WaitPolicy::Poll),
        "doorbell" => Ok(WaitPolicy::Doorbell),
        p => Err(format!("bad policy {p}").into()),
    }
}

/// A pair of rings (parent → child, child → parent) with their doorbells.
struct Link {
    a: RingRegion<IoDesc>,
    b: RingRegion<IoDesc>,
    bells: [Doorbell; 4],
}

impl Link {
    fn new() -> Res<Self> {
        Ok(Self {
            a: RingRegion::create("bench-a", 1024, 1)?,
            b: RingRegion::create("bench-b", 1024, 2)?,
            bells: [
                Doorbell::new()?,
                Doorbell::new()?,
                Doorbell::new()?,
                Doorbell::new()?,
            ],
        })
    }

    fn spawn(&self, mode: &str, policy: &str, extra: &str) -> Res<Child> {
        let fds = [
            self.a.region().fd(),
            self.bells[0].fd(),
            self.bells[1].fd(),
            self.b.region().fd(),
            self.bells[2].fd(),
            self.bells[3].fd(),
        ];
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("child")
            .arg(mode)
            .arg(policy)
            .arg(extra)
            .stdin(Stdio::null());
        for fd in &fds {
            cmd.arg(fd.as_raw_fd().to_string());
        }
        Ok(spawn_with_fds(&mut cmd, &fds)?)
    }

    fn endpoints(self, policy: WaitPolicy) -> Res<(Producer<IoDesc>, Consumer<IoDesc>)> {
        let [a_data, a_space, b_data, b_space] = self.bells;
        let mut p = Producer::attach(self.a, a_data, a_space, 1, StartMode::Fresh)?;
        let mut c = Consumer::attach(self.b, b_data, b_space, 1, StartMode::Fresh)?;
        p.set_policy(policy);
        c.set_policy(policy);
        Ok((p, c))
    }
}

fn child(args: &[String]) -> Res<()> {
    pin(1);
    let [mode, pol, extra, fds @ ..] = args else {
        return Err("child: bad arguments".into());
    };
    let fds: Vec<OwnedFd> = fds
        .iter()
        .map(|f| inherited_fd(f))
        .collect::<Result<_, _>>()?;
    if mode == "sock-echo" {
        let Some(fd) = fds.into_iter().next() else {
            return Err("sock-echo needs an fd".into());
        };
        let mut s = UnixStream::from(fd);
        let mut buf = [0u8; 64];
        while s.read_exact(&mut buf).is_ok() {
            s.write_all(&buf)?;
        }
        return Ok(());
    }
    let mut it = fds.into_iter();
    let mut next = || it.next().ok_or("missing fd");
    let (a, a_data, a_space) = (next()?, next()?, next()?);
    let (b, b_data, b_space) = (next()?, next()?, next()?);
    let policy = policy(pol)?;
    let mut input = Consumer::attach(
        RingRegion::<IoDesc>::attach(a)?,
        Doorbell::from_fd(a_data)?,
        Doorbell::from_fd(a_space)?,
        1,
        StartMode::Fresh,
    )?;
    let mut output = Producer::attach(
        RingRegion::<IoDesc>::attach(b)?,
        Doorbell::from_fd(b_data)?,
        Doorbell::from_fd(b_space)?,
        1,
        StartMode::Fresh,
    )?;
    input.set_policy(policy);
    output.set_policy(policy);
    let batch: usize = extra.parse().unwrap_or(32);
    let mut buf = Vec::with_capacity(batch);
    loop {
        buf.clear();
        input.pop_wait(&mut buf, batch, None)?;
        let end = buf.iter().any(|d| d.opcode == OP_END);
        if mode == "echo" || end {
            let mut sent = 0;
            while sent < buf.len() {
                sent += output.push_wait(&buf[sent..], None)?;
            }
        }
        if end {
            return Ok(());
        }
    }
}

/// One-way throughput: the parent streams `n` descriptors in batches; the child consumes them
/// and echoes only the end marker. Returns descriptors per second.
fn ring_throughput(pol: &str, batch: usize, n: u64) -> Res<f64> {
    let link = Link::new()?;
    let mut child = link.spawn("sink", pol, &batch.to_string())?;
    let (mut p, mut c) = link.endpoints(policy(pol)?)?;
    let items: Vec<IoDesc> = (0..batch as u64)
        .map(|i| IoDesc {
            tag: i,
            ..IoDesc::default()
        })
        .collect();
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < n {
        let want = (n - sent).min(batch as u64) as usize;
        let mut off = 0;
        while off < want {
            off += p.push_wait(&items[off..want], None)?;
        }
        sent += want as u64;
    }
    p.push_wait(
        &[IoDesc {
            opcode: OP_END,
            ..IoDesc::default()
        }],
        None,
    )?;
    let mut out = Vec::new();
    while out.is_empty() {
        c.pop_wait(&mut out, 1, None)?;
    }
    let secs = start.elapsed().as_secs_f64();
    child.wait()?;
    Ok(n as f64 / secs)
}

fn percentiles(mut ns: Vec<u64>) -> (u64, u64) {
    ns.sort_unstable();
    let at = |q: f64| {
        ns.get(((ns.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    (at(0.5), at(0.99))
}

fn ring_round_trip(pol: &str, samples: usize) -> Res<(u64, u64)> {
    let link = Link::new()?;
    let mut child = link.spawn("echo", pol, "1")?;
    let (mut p, mut c) = link.endpoints(policy(pol)?)?;
    let mut ns = Vec::with_capacity(samples);
    let mut out = Vec::with_capacity(1);
    for i in 0..samples + samples / 10 {
        let t = Instant::now();
        p.push_wait(
            &[IoDesc {
                tag: i as u64,
                ..IoDesc::default()
            }],
            None,
        )?;
        out.clear();
        while out.is_empty() {
            c.pop_wait(&mut out, 1, None)?;
        }
        if i >= samples / 10 {
            ns.push(t.elapsed().as_nanos() as u64);
        }
    }
    p.push_wait(
        &[IoDesc {
            opcode: OP_END,
            ..IoDesc::default()
        }],
        None,
    )?;
    child.wait()?;
    Ok(percentiles(ns))
}

fn socketpair_round_trip(samples: usize) -> Res<(u64, u64)> {
    let (mut mine, theirs) = UnixStream::pair()?;
    let theirs = OwnedFd::from(theirs);
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["child", "sock-echo", "-", "-"])
        .arg(theirs.as_raw_fd().to_string())
        .stdin(Stdio::null());
    let mut child = spawn_with_fds(&mut cmd, &[std::os::fd::AsFd::as_fd(&theirs)])?;
    drop(theirs);
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    let mut ns = Vec::with_capacity(samples);
    for i in 0..samples + samples / 10 {
        let t = Instant::now();
        mine.write_all(&msg)?;
        mine.read_exact(&mut buf)?;
        if i >= samples / 10 {
            ns.push(t.elapsed().as_nanos() as u64);
        }
    }
    drop(mine);
    child.wait()?;
    Ok(percentiles(ns))
}

fn crossbeam_throughput(n: u64) -> Res<f64> {
    let (tx, rx) = crossbeam::channel::bounded::<IoDesc>(1024);
    let t = std::thread::spawn(move || {
        pin(1);
        let mut count = 0u64;
        while rx.recv().is_ok() {
            count += 1;
        }
        count
    });
    let start = Instant::now();
    for i in 0..n {
        tx.send(IoDesc {
            tag: i,
            ..IoDesc::default()
        })?;
    }
    drop(tx);
    let got = t.join().map_err(|_| "crossbeam receiver panicked")?;
    let secs = start.elapsed().as_secs_f64();
    Ok(got as f64 / secs)
}

fn crossbeam_round_trip(samples: usize) -> Res<(u64, u64)> {
    let (tx, rx) = crossbeam::channel::bounded::<IoDesc>(1);
    let (tx2, rx2) = crossbeam::channel::bounded::<IoDesc>(1);
    let t = std::thread::spawn(move || {
        pin(1);
        while let Ok(d) = rx.recv() {
            if tx2.send(d).is_err() {
                break;
            }
        }
    });
    let mut ns = Vec::with_capacity(samples);
    for i in 0..samples + samples / 10 {
        let start = Instant::now();
        tx.send(IoDesc {
            tag: i as u64,
            ..IoDesc::default()
        })?;
        rx2.recv()?;
        if i >= samples / 10 {
            ns.push(start.elapsed().as_nanos() as u64);
        }
    }
    drop(tx);
    t.join().map_err(|_| "crossbeam echo panicked")?;
    Ok(percentiles(ns))
}

fn parent(quick: bool) -> Res<()> {
    pin(0);
    let n: u64 = if quick { 200_000 } else { 20_000_000 };
    let rt: usize = if quick { 2_000 } else { 200_000 };
    let ncpu = online_cpus();
    println!("duplex-ipc-bench: {ncpu} CPUs, parent on CPU 0, peer on CPU 1; 64-byte descriptors, ring of 1024");
    println!();
    println!("{:<52} {:>14}", "one-way throughput", "M desc/s");
    for (label, pol, batch, count) in [
        ("duplex ring, polled, batch 1 (processes)", "poll", 1, n / 4),
        ("duplex ring, polled, batch 32 (processes)", "poll", 32, n),
        (
            "duplex ring, doorbell, batch 1 (processes)",
            "doorbell",
            1,
            n / 20,
        ),
        (
            "duplex ring, doorbell, batch 32 (processes)",
            "doorbell",
            32,
            n / 4,
        ),
    ] {
        let rate = ring_throughput(pol, batch, count.max(1000))?;
        println!("{label:<52} {:>14.2}", rate / 1e6);
    }
    let rate = crossbeam_throughput(n / 4)?;
    println!(
        "{:<52} {:>14.2}",
        "reference: crossbeam bounded channel (threads)",
        rate / 1e6
    );
    println!();
    println!("{:<52} {:>10} {:>10}", "round trip", "median ns", "p99 ns");
    for (label, pol, samples) in [
        ("duplex ring, polled (processes)", "poll", rt),
        ("duplex ring, doorbell (processes)", "doorbell", rt / 4),
    ] {
        let (p50, p99) = ring_round_trip(pol, samples)?;
        println!("{label:<52} {p50:>10} {p99:>10}");
    }
    let (p50, p99) = socketpair_round_trip(rt / 4)?;
    println!(
        "{:<52} {p50:>10} {p99:>10}",
        "reference: unix socketpair (processes)"
    );
    let (p50, p99) = crossbeam_round_trip(rt / 4)?;
    println!(
        "{:<52} {p50:>10} {p99:>10}",
        "reference: crossbeam channel pair (threads)"
    );
    Ok(())
}
