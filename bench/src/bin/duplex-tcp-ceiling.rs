//! `duplex-tcp-ceiling [--seconds S] [--server-cpu N] [--client-cpu M]`: the loopback TCP
//! ceiling of this machine, one stream, measured the way the benchmark command pins duplex
//! (receiver on the target's core, sender on the generator's). Prints `Gbit/s` on one line.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;

fn pin(cpu: Option<usize>) -> anyhow::Result<()> {
    if let Some(cpu) = cpu {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).context("CPU number out of range")?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
            .with_context(|| format!("cannot pin to CPU {cpu}"))?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut seconds = 3.0f64;
    let (mut server_cpu, mut client_cpu) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--seconds" => seconds = value()?.parse().context("--seconds")?,
            "--server-cpu" => server_cpu = Some(value()?.parse().context("--server-cpu")?),
            "--client-cpu" => client_cpu = Some(value()?.parse().context("--client-cpu")?),
            other => {
                anyhow::bail!("unknown argument {other} (--seconds, --server-cpu, --client-cpu)")
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> anyhow::Result<u64> {
        pin(server_cpu)?;
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    });
    pin(client_cpu)?;
    let mut c = TcpStream::connect(addr)?;
    let buf = vec![0x5Au8; 1 << 20];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs_f64(seconds) {
        c.write_all(&buf)?;
    }
    drop(c);
    let total = server
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:.1} Gbit/s ({} MiB in {secs:.2} s)",
        total as f64 * 8.0 / secs / 1e9,
        total >> 20
    );
    Ok(())
}
