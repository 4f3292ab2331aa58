//! One worker: a thread with its own I/O queue and its own slice of the namespace.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use duplex_host::{Data, Queue, QueueOptions};
use duplex_nvme::cmd::Sqe;
use duplex_nvme::spec::io;
use duplex_nvme::tcp::Digests;
use hdrhistogram::Histogram;

use crate::pattern::{self, Tag};

/// Where and what one worker runs.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    /// Target address.
    pub addr: SocketAddr,
    /// Digests.
    pub digests: Digests,
    /// TLS with this identity and PSK (`None`: plain TCP).
    pub tls: Option<duplex_host::tls::TlsPsk>,
    /// Poll the socket before sleeping in recv, this long.
    pub busy_poll: Option<Duration>,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Controller id (from the admin Connect).
    pub cntlid: u16,
    /// I/O queue id.
    pub qid: u16,
    /// Namespace id.
    pub nsid: u32,
    /// Namespace block size.
    pub block_size: usize,
    /// In-capsule data the target accepts on I/O queues.
    pub in_capsule: usize,
    /// First block of this worker's slice.
    pub first_block: u64,
    /// Blocks in the slice.
    pub blocks: u64,
    /// Bytes per I/O.
    pub io_size: usize,
    /// Commands in flight.
    pub queue_depth: usize,
    /// Percentage of reads (0: writes only, 100: reads only).
    pub read_pct: u32,
    /// Random offsets (else sequential).
    pub random: bool,
    /// Stop after this many I/Os (per worker).
    pub ios: Option<u64>,
    /// Stop at this instant.
    pub until: Option<Instant>,
    /// Verify mode.
    pub verify: bool,
    /// Only read back and check the slice, expecting every block at this generation (what a
    /// previous run that wrote each block once left).
    pub verify_only: Option<u64>,
    /// Send a Flush after the load and wait for it.
    pub flush: bool,
    /// Seed of the run (in every block tag).
    pub seed: u64,
    /// Pin the worker's thread to this CPU.
    pub cpu: Option<usize>,
}

/// What a worker measured.
#[derive(Debug)]
pub struct WorkerResult {
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Latency of every I/O, nanoseconds.
    pub latency: Histogram<u64>,
    /// Blocks read back wrong.
    pub verify_errors: u64,
    /// Blocks checked.
    pub verified: u64,
    /// The first verify error, described.
    pub first_error: Option<String>,
    /// Wall time of the load phase.
    pub elapsed: Duration,
}

struct InFlight {
    start: Instant,
    slot: u64,
    write: bool,
    generation: u64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs the worker to its end. `progress` counts completed I/Os; `stop` ends the load early.
pub fn run(
    spec: &WorkerSpec,
    progress: &AtomicU64,
    stop: &AtomicBool,
) -> anyhow::Result<WorkerResult> {
    if let Some(cpu) = spec.cpu {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).context("CPU number out of range")?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
            .with_context(|| format!("cannot pin worker to CPU {cpu}"))?;
    }
    let opts = QueueOptions {
        digests: spec.digests,
        in_capsule: spec.in_capsule,
        busy_poll: spec.busy_poll,
        ..QueueOptions::default()
    };
    let mut q = match &spec.tls {
        None => Queue::dial(spec.addr, opts),
        Some(psk) => Queue::dial_tls(spec.addr, opts, psk),
    }
    .with_context(|| format!("I/O queue {}: connecting to {}", spec.qid, spec.addr))?;
    q.connect(
        spec.qid,
        // SQSIZE is zero-based and at least 1; the target allows SQSIZE + 1 in flight.
        u16::try_from(spec.queue_depth.saturating_sub(1))
            .unwrap_or(u16::MAX)
            .max(1),
        0,
        spec.cntlid,
        &spec.subnqn,
        &spec.hostnqn,
        spec.hostid,
    )
    .with_context(|| format!("I/O queue {}: Connect", spec.qid))?;
    let nlb = (spec.io_size / spec.block_size) as u64;
    let slots = spec.blocks / nlb;
    if slots == 0 {
        bail!(
            "the namespace slice of worker {} is smaller than one I/O",
            spec.qid
        );
    }
    let checking = spec.verify || spec.verify_only.is_some();
    let mut gens = vec![0u64; if checking { slots as usize } else { 0 }];
    let mut busy = vec![false; if spec.verify { slots as usize } else { 0 }];
    let mut rng = Rng(spec.seed ^ (u64::from(spec.qid) << 32) | 1);
    let mut seq = 0u64;
    let mut inflight: std::collections::HashMap<u16, InFlight> = Default::default();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut result = WorkerResult {
        reads: 0,
        writes: 0,
        latency: Histogram::new_with_bounds(1, 60_000_000_000, 3)?,
        verify_errors: 0,
        verified: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    let mut sent = 0u64;
    let mut plain = vec![0u8; if spec.verify { 0 } else { spec.io_size }];
    plain.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    if let Some(g) = spec.verify_only {
        gens.fill(g);
    }
    let begin = Instant::now();
    while spec.verify_only.is_none() {
        let more = !stop.load(Ordering::Relaxed)
            && spec.ios.is_none_or(|n| sent < n)
            && spec.until.is_none_or(|t| Instant::now() < t);
        while more && inflight.len() < spec.queue_depth {
            let mut slot = if spec.random {
                rng.next() % slots
            } else {
                seq += 1;
                (seq - 1) % slots
            };
            if spec.verify {
                // Never two commands on one slot at once: the check needs a known generation.
                let mut tries = 0;
                while busy[slot as usize] && tries < slots {
                    slot = (slot + 1) % slots;
                    tries += 1;
                }
                if busy[slot as usize] {
                    break;
                }
            }
            let write = rng.next() % 100 >= u64::from(spec.read_pct);
            let lba = spec.first_block + slot * nlb;
            let sqe = Sqe {
                opcode: if write { io::WRITE } else { io::READ },
                nsid: spec.nsid,
                cdw10: lba as u32,
                cdw11: (lba >> 32) as u32,
                cdw12: (nlb - 1) as u32,
                ..Sqe::default()
            };
            let mut generation = 0;
            let data = match (write, spec.verify) {
                (false, _) => Data::In(spec.io_size),
                (true, false) => Data::Out(plain.clone()),
                (true, true) => {
                    generation = gens[slot as usize] + 1;
                    let mut buf = vec![0u8; spec.io_size];
                    for (i, block) in buf.chunks_mut(spec.block_size).enumerate() {
                        pattern::fill(
                            block,
                            &Tag {
                                lba: lba + i as u64,
                                seed: spec.seed,
                                generation,
                            },
                        );
                    }
                    Data::Out(buf)
                }
            };
            if !write && spec.verify {
                generation = gens[slot as usize];
            }
            let cid = q.submit(sqe, data)?;
            if spec.verify {
                busy[slot as usize] = true;
            }
            inflight.insert(
                cid,
                InFlight {
                    start: Instant::now(),
                    slot,
                    write,
                    generation,
                },
            );
            sent += 1;
        }
        if inflight.is_empty() {
            break;
        }
        let c = q.poll()?;
        let Some(f) = inflight.remove(&c.cid) else {
            bail!("a completion for command {} that is not in flight", c.cid);
        };
        if !c.status().is_success() {
            bail!(
                "{} at block {} failed: {}",
                if f.write { "write" } else { "read" },
                spec.first_block + f.slot * nlb,
                c.status()
            );
        }
        latency.record(f.start.elapsed().as_nanos().max(1) as u64)?;
        progress.fetch_add(1, Ordering::Relaxed);
        if f.write {
            result.writes += 1;
        } else {
            result.reads += 1;
        }
        if spec.verify {
            busy[f.slot as usize] = false;
            if f.write {
                gens[f.slot as usize] = f.generation;
            } else if f.generation > 0 {
                check(spec, nlb, f.slot, f.generation, &c.data, &mut result);
            }
        }
    }
    if spec.flush {
        let sqe = Sqe {
            opcode: io::FLUSH,
            nsid: spec.nsid,
            ..Sqe::default()
        };
        let c = q.execute(sqe, Data::None)?;
        if !c.status().is_success() {
            bail!("flush failed: {}", c.status());
        }
    }
    result.elapsed = begin.elapsed();
    result.latency = latency;
    if checking {
        // Read back every block written in this run (or, verifying only, every block) and
        // check it.
        for slot in 0..slots {
            let g = gens[slot as usize];
            if g == 0 {
                continue;
            }
            let lba = spec.first_block + slot * nlb;
            let sqe = Sqe {
                opcode: io::READ,
                nsid: spec.nsid,
                cdw10: lba as u32,
                cdw11: (lba >> 32) as u32,
                cdw12: (nlb - 1) as u32,
                ..Sqe::default()
            };
            let c = q.execute(sqe, Data::In(spec.io_size))?;
            if !c.status().is_success() {
                bail!("verify read at block {lba} failed: {}", c.status());
            }
            check(spec, nlb, slot, g, &c.data, &mut result);
        }
    }
    Ok(result)
}

fn check(
    spec: &WorkerSpec,
    nlb: u64,
    slot: u64,
    generation: u64,
    data: &[u8],
    r: &mut WorkerResult,
) {
    let lba0 = spec.first_block + slot * nlb;
    for (i, block) in data.chunks(spec.block_size).enumerate() {
        let want = Tag {
            lba: lba0 + i as u64,
            seed: spec.seed,
            generation,
        };
        r.verified += 1;
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
