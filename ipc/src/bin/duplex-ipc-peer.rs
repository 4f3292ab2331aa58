//! Helper process of the multi-process restart test (`ipc/tests/restart.rs`). Not a user tool.
//!
//! `duplex-ipc-peer producer|consumer key=value...` with inherited fds:
//! `r r_data r_space` (request ring, producer → consumer), `q q_data q_space` (completion ring,
//! consumer → producer), `pool`, `ledger`; plus `generation=G`, `mode=fresh|restart`.
//!
//! The producer streams `ledger.count()` sequence-numbered write descriptors, each with a chain of
//! pool buffers holding a deterministic payload and its CRC32C, and stays alive throughout. The
//! consumer verifies each payload, records it in the ledger, and completes it on the completion
//! ring, freeing the buffers (even tags) or lending them back through the completion ring (odd
//! tags, like a read's data). The test kills consumers; their successors start with
//! `mode=restart` and reclaim; the producer notices the restart and resubmits what the dead
//! incarnations had consumed but not completed.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use duplex_ipc::desc::{IoDesc, FLAG_CHECKSUM, OP_WRITE};
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::pool::{BufHandle, Holder, Pool, ReclaimPlan, NIL};
use duplex_ipc::ring::{Consumer, Producer, RingRegion, StartMode};
use duplex_ipc::testkit::{inherited_fd, payload, Ledger};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const OP_END: u8 = 0xff;
const PRODUCER_ROLE: u8 = 1;
const CONSUMER_ROLE: u8 = 2;

struct Args(HashMap<String, String>);

impl Args {
    fn get(&self, k: &str) -> Res<&str> {
        self.0
            .get(k)
            .map(String::as_str)
            .ok_or_else(|| format!("missing argument {k}=").into())
    }
    fn fd(&self, k: &str) -> Res<std::os::fd::OwnedFd> {
        Ok(inherited_fd(self.get(k)?)?)
    }
    fn bell(&self, k: &str) -> Res<Doorbell> {
        Ok(Doorbell::from_fd(self.fd(k)?)?)
    }
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let role = argv.next().unwrap_or_default();
    let args = Args(
        argv.filter_map(|a| a.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect(),
    );
    let result = match role.as_str() {
        "producer" => producer(&args),
        "consumer" => consumer(&args),
        other => Err(format!("unknown role {other:?}: expected producer or consumer").into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex-ipc-peer {role}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn mode(args: &Args) -> Res<StartMode> {
    match args.get("mode")? {
        "fresh" => Ok(StartMode::Fresh),
        "restart" => Ok(StartMode::Restart),
        m => Err(format!("bad mode {m}").into()),
    }
}

fn consumer(args: &Args) -> Res<()> {
    let generation: u64 = args.get("generation")?.parse()?;
    let mode = mode(args)?;
    let r = RingRegion::<IoDesc>::attach(args.fd("r")?)?;
    let q = RingRegion::<IoDesc>::attach(args.fd("q")?)?;
    let pool = Pool::attach(
        args.fd("pool")?,
        Holder {
            role: CONSUMER_ROLE,
            incarnation: generation,
        },
    )?;
    let ledger = Ledger::attach(args.fd("ledger")?)?;
    if mode == StartMode::Restart {
        pool.reclaim(&ReclaimPlan {
            consumes: &[(r.ring_id(), r.head())],
            produces: &[(q.ring_id(), q.tail())],
        });
    }
    let (q_id, r_id) = (q.ring_id(), r.ring_id());
    // Completion ring first: the producer reads its restart mark after seeing ours on `r`.
    let mut done = Producer::attach(
        q,
        args.bell("q_data")?,
        args.bell("q_space")?,
        generation,
        mode,
    )?;
    let mut input = Consumer::attach(
        r,
        args.bell("r_data")?,
        args.bell("r_space")?,
        generation,
        mode,
    )?;
    let mut batch = Vec::with_capacity(32);
    let mut completions = Vec::with_capacity(32);
    let mut expect = Vec::new();
    let mut got = Vec::new();
    loop {
        batch.clear();
        let first = input.next_index();
        if input.pop_wait(&mut batch, 32, Some(Duration::from_millis(100)))? == 0 {
            continue;
        }
        completions.clear();
        for (i, d) in batch.iter().enumerate() {
            if d.opcode == OP_END {
                return Ok(());
            }
            let index = first + i as u64;
            let head = BufHandle(d.buf);
            let mut c = IoDesc {
                tag: d.tag,
                epoch: d.epoch,
                buf: NIL,
                ..IoDesc::default()
            };
            let ok = match pool.take_chain(head, r_id, index) {
                Err(e) => {
                    eprintln!("consumer: seq {} at index {index}: {e}", d.tag);
                    false
                }
                Ok(()) => {
                    got.clear();
                    pool.read_chain(head, &mut got)?;
                    payload(d.tag, &mut expect);
                    d.flags & FLAG_CHECKSUM != 0
                        && got.len() == d.buf_len as usize
                        && crc32c::crc32c(&got) == d.checksum
                        && got == expect
                }
            };
            if !ok {
                ledger.corrupt().fetch_add(1, Ordering::Relaxed);
                c.status = 0x0281; // Unrecovered read error: the data was bad.
            }
            ledger.applied(d.tag).fetch_add(1, Ordering::Relaxed);
            completions.push((c, head, ok));
        }
        // Lend odd tags' buffers back with their completion (like read data); free the rest.
        let mut descs = Vec::with_capacity(completions.len());
        for (index, (mut c, head, ok)) in (done.next_index()..).zip(completions.drain(..)) {
            if ok && c.tag % 2 == 1 {
                pool.lend_chain(head, q_id, index)?;
                c.buf = head.0;
            } else if ok {
                pool.free_chain(head)?;
            }
            descs.push(c);
        }
        let mut sent = 0;
        while sent < descs.len() {
            sent += done.push_wait(&descs[sent..], None)?;
        }
    }
}

fn producer(args: &Args) -> Res<()> {
    let generation: u64 = args.get("generation")?.parse()?;
    let r = RingRegion::<IoDesc>::attach(args.fd("r")?)?;
    let q = RingRegion::<IoDesc>::attach(args.fd("q")?)?;
    let pool = Pool::attach(
        args.fd("pool")?,
        Holder {
            role: PRODUCER_ROLE,
            incarnation: generation,
        },
    )?;
    let ledger = Ledger::attach(args.fd("ledger")?)?;
    let total = ledger.count();
    let (r_id, q_id) = (r.ring_id(), q.ring_id());
    let mut out = Producer::attach(
        r,
        args.bell("r_data")?,
        args.bell("r_space")?,
        generation,
        StartMode::Fresh,
    )?;
    let mut back = Consumer::attach(
        q,
        args.bell("q_data")?,
        args.bell("q_space")?,
        generation,
        StartMode::Fresh,
    )?;

    let mut by_index: HashMap<u64, u64> = HashMap::new();
    let mut index_of: HashMap<u64, u64> = HashMap::new();
    let mut retry: Vec<u64> = Vec::new();
    let mut completed = vec![false; total as usize];
    let (mut next_seq, mut done_count) = (0u64, 0u64);
    let mut buf = Vec::new();
    let mut batch = Vec::with_capacity(32);
    let mut comps = Vec::with_capacity(64);
    let mut duplicates = 0u64;

    let mut handle_completions = |comps: &[IoDesc],
                                  first: u64,
                                  by_index: &mut HashMap<u64, u64>,
                                  index_of: &mut HashMap<u64, u64>,
                                  done_count: &mut u64|
     -> Res<()> {
        for (i, c) in comps.iter().enumerate() {
            if c.buf != NIL {
                pool.take_chain(BufHandle(c.buf), q_id, first + i as u64)?;
                pool.free_chain(BufHandle(c.buf))?;
            }
            let Some(idx) = index_of.remove(&c.tag) else {
                duplicates += 1;
                continue;
            };
            by_index.remove(&idx);
            if c.status != 0 {
                return Err(format!("seq {} completed with status {:#x}", c.tag, c.status).into());
            }
            if let Some(slot) = completed.get_mut(c.tag as usize) {
                if !*slot {
                    *slot = true;
                    *done_count += 1;
                }
            }
        }
        ledger.progress().store(*done_count, Ordering::Relaxed);
        Ok(())
    };

    while done_count < total {
        // Submit as much as the ring and the pool take.
        let free = out.free()? as usize;
        batch.clear();
        let base = out.next_index();
        while batch.len() < free.min(32) && (!retry.is_empty() || next_seq < total) {
            let seq = retry.last().copied().unwrap_or(next_seq);
            payload(seq, &mut buf);
            let Ok(chain) = pool.alloc_chain(buf.len()) else {
                break;
            };
            if retry.pop().is_none() {
                next_seq += 1;
            }
            pool.write_chain(chain, &buf)?;
            let index = base + batch.len() as u64;
            pool.lend_chain(chain, r_id, index)?;
            batch.push(IoDesc {
                tag: seq,
                epoch: generation,
                lba: seq,
                buf: chain.0,
                buf_len: buf.len() as u32,
                opcode: OP_WRITE,
                flags: FLAG_CHECKSUM,
                checksum: crc32c::crc32c(&buf),
                ..IoDesc::default()
            });
            by_index.insert(index, seq);
            index_of.insert(seq, index);
        }
        if !batch.is_empty() && out.try_push(&batch)? != batch.len() {
            return Err("ring refused descriptors it had room for".into());
        }
        // Collect completions; wait briefly only if nothing could be submitted.
        comps.clear();
        let first = back.next_index();
        let wait = if batch.is_empty() {
            Some(Duration::from_millis(5))
        } else {
            Some(Duration::ZERO)
        };
        back.pop_wait(&mut comps, 64, wait)?;
        handle_completions(&comps, first, &mut by_index, &mut index_of, &mut done_count)?;

        // A replaced consumer: drain what the dead incarnations completed, then resubmit what
        // they consumed without completing.
        if let Some(restart) = out.consumer_restart() {
            ledger.restarts_seen().fetch_add(1, Ordering::Relaxed);
            let published_before = back.producer_restart().map_or(0, |p| p.published_before);
            while back.next_index() < published_before {
                comps.clear();
                let first = back.next_index();
                back.pop_wait(&mut comps, 64, Some(Duration::from_millis(100)))?;
                handle_completions(&comps, first, &mut by_index, &mut index_of, &mut done_count)?;
            }
            let lost: Vec<(u64, u64)> = by_index
                .iter()
                .filter(|(&idx, _)| idx < restart.consumed_before)
                .map(|(&i, &s)| (i, s))
                .collect();
            for (idx, seq) in lost {
                by_index.remove(&idx);
                index_of.remove(&seq);
                ledger.resubmitted(seq).fetch_add(1, Ordering::Relaxed);
                retry.push(seq);
            }
        }
    }
    // Tell the consumer to stop; it may be between incarnations, so do not wait for it.
    let end = IoDesc {
        opcode: OP_END,
        buf: NIL,
        ..IoDesc::default()
    };
    if out.push_wait(&[end], Some(Duration::from_secs(60)))? != 1 {
        return Err("could not publish end-of-stream: request ring stayed full".into());
    }
    println!(
        "producer: {total} completed, {} restarts seen, {duplicates} duplicate completions, {} free chunks",
        ledger.restarts_seen().load(Ordering::Relaxed),
        pool.free_count()
    );
    if duplicates != 0 {
        return Err(format!("{duplicates} duplicate completions").into());
    }
    Ok(())
}
