//! `duplex-nvme-check`: duplex's user-space NVMe driver against one controller, from the
//! command line: identify it, write and read back a verified pattern, or measure it.
//!
//! ```text
//! duplex-nvme-check --vfio-user /run/drive0.sock identify
//! duplex-nvme-check --vfio 0000:00:04.0 verify --mib 64 --queues 2
//! duplex-nvme-check --vfio-user /run/drive0.sock bench --rw randread --qd 32 --time 5
//! ```
//!
//! `verify` destroys the data in the range it writes. Output: human lines, or one JSON object
//! with `--json`. Exit status 0 on success, 1 on failure, 2 on usage errors.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use duplex_datapath::integrity::{self, Verdict, RECORD_LEN};
use duplex_datapath::nvme::{
    vfio_kernel::KernelVfio, vfio_user::VfioUser, CmdError, Controller, DmaMem, Done, IoCmd,
    NamespaceId, Options, Seg, Transport,
};

#[derive(Parser, Debug)]
#[command(
    name = "duplex-nvme-check",
    about = "Drive one NVMe controller with duplex's user-space driver"
)]
struct Args {
    /// A vfio-user socket (duplex-drive-sim's port, or any vfio-user NVMe device).
    #[arg(long, conflicts_with = "vfio", required_unless_present = "vfio")]
    vfio_user: Option<std::path::PathBuf>,
    /// A PCI function bound to vfio-pci, e.g. 0000:00:04.0.
    #[arg(long)]
    vfio: Option<String>,
    /// Namespace id.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// Command timeout in milliseconds (then Abort, then controller reset).
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// One JSON object instead of human lines.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// Identify the controller and the namespace.
    Identify,
    /// Write a pattern over the first MIB MiB through every queue, read it back, compare.
    Verify {
        /// MiB to write and verify.
        #[arg(long, default_value_t = 64)]
        mib: u64,
        /// I/O queue pairs.
        #[arg(long, default_value_t = 2)]
        queues: u16,
        /// Bytes per command.
        #[arg(long, default_value_t = 128 * 1024)]
        io_size: u32,
        /// Commands in flight per queue.
        #[arg(long, default_value_t = 8)]
        qd: u16,
        /// Pattern seed (a different seed proves a re-read sees new data).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Measure IOPS and latency on one queue.
    Bench {
        /// Workload.
        #[arg(long, value_enum, default_value_t = Rw::Randread)]
        rw: Rw,
        /// Commands in flight.
        #[arg(long, default_value_t = 32)]
        qd: u16,
        /// Bytes per command.
        #[arg(long, default_value_t = 4096)]
        bs: u32,
        /// Seconds to run.
        #[arg(long, default_value_t = 5.0)]
        time: f64,
        /// Span of the namespace used, in MiB (0: all of it).
        #[arg(long, default_value_t = 0)]
        span_mib: u64,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Rw {
    Randread,
    Randwrite,
}

/// IOVA of the data buffers (the driver's own memory sits at 0): 4 GiB, above the 32-bit MSI
/// window and well inside a 39-bit IOMMU address width (QEMU's `intel-iommu,aw-bits=39`, and
/// many real Intel IOMMUs, end at 2^39; 1 << 40 is refused there).
const DATA_IOVA: u64 = 1 << 32;
/// IOVA of the metadata buffers (a namespace formatted with metadata): 2 GiB above the data.
const MD_IOVA: u64 = DATA_IOVA + (1 << 31);

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("duplex-nvme-check: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let queues = match &args.what {
        What::Verify { queues, .. } => *queues,
        _ => 1,
    };
    let opts = Options {
        io_queues: queues.max(1),
        queue_entries: 256,
        timeout: Duration::from_millis(args.timeout_ms),
        ..Options::default()
    };
    let timeout = Duration::from_millis(args.timeout_ms.max(1000));
    if let Some(path) = &args.vfio_user {
        let t = VfioUser::connect(path, timeout)?;
        drive(t, opts, args)
    } else if let Some(bdf) = &args.vfio {
        let t = KernelVfio::open(bdf)?;
        if !t.bar0_mapped() {
            eprintln!("duplex-nvme-check: BAR0 not mappable; registers go through pread/pwrite");
        }
        drive(t, opts, args)
    } else {
        bail!("give --vfio-user SOCKET or --vfio PCI-ADDRESS")
    }
}

fn drive<T: Transport>(t: T, opts: Options, args: &Args) -> Result<()> {
    let mem = DmaMem::create("duplex-nvme-check", opts.dma_len(), 0)?;
    let mut c = Controller::new(t, mem, opts).context("controller bring-up")?;
    let ns = c.namespace(args.nsid).context("identify namespace")?;
    let id = c.identity().clone();
    match &args.what {
        What::Identify => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "vid": id.vid, "serial": id.serial, "model": id.model,
                        "firmware": id.firmware, "cntlid": id.cntlid,
                        "version": format!("{}.{}", id.version >> 16, (id.version >> 8) & 0xFF),
                        "mdts_bytes": id.mdts_bytes, "nn": id.nn, "oncs": id.oncs, "vwc": id.vwc,
                        "io_queues": c.io_queues(), "queue_entries": c.queue_entries(),
                        "nsid": ns.nsid, "blocks": ns.blocks, "block_size": ns.block_size,
                        "metadata_size": ns.metadata_size,
                        "metadata_extended": ns.metadata_extended,
                        "rescap": ns.rescap,
                    })
                );
            } else {
                println!(
                    "controller {:#06x} {:?} serial {:?} firmware {:?} cntlid {} version {}.{}",
                    id.vid,
                    id.model,
                    id.serial,
                    id.firmware,
                    id.cntlid,
                    id.version >> 16,
                    (id.version >> 8) & 0xFF
                );
                println!(
                    "namespace {}: {} blocks of {} bytes; {} I/O queues of {} entries; MDTS {} bytes",
                    ns.nsid,
                    ns.blocks,
                    ns.block_size,
                    c.io_queues(),
                    c.queue_entries(),
                    id.mdts_bytes
                );
            }
            Ok(())
        }
        What::Verify {
            mib,
            io_size,
            qd,
            seed,
            ..
        } => verify(&mut c, &ns, *mib, *io_size, *qd, *seed, args.json),
        What::Bench {
            rw,
            qd,
            bs,
            time,
            span_mib,
        } => bench(&mut c, &ns, *rw, *qd, *bs, *time, *span_mib, args.json),
    }
}

/// The pattern byte at byte `i` of block `lba`.
fn pattern(seed: u64, lba: u64, out: &mut [u8]) {
    let mut x = seed ^ lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

#[allow(clippy::too_many_arguments)]
fn verify<T: Transport>(
    c: &mut Controller<T>,
    ns: &NamespaceId,
    mib: u64,
    io_size: u32,
    qd: u16,
    seed: u64,
    json: bool,
) -> Result<()> {
    let (block_size, blocks, nsid) = (ns.block_size, ns.blocks, ns.nsid);
    // A format with metadata in a separate buffer: every block written carries duplex's
    // integrity record (sequence number: the seed plus the LBA), every block read is checked.
    let ms = usize::from(ns.metadata_size);
    if ms != 0 && (ns.metadata_extended || ms < RECORD_LEN) {
        bail!(
            "namespace {nsid}: {ms} bytes of metadata per block{}: duplex needs at least {RECORD_LEN} in a separate buffer",
            if ns.metadata_extended { " interleaved with the data (extended LBA)" } else { "" }
        );
    }
    let bytes = mib << 20;
    if io_size == 0 || io_size % block_size != 0 || io_size as usize % 4096 != 0 {
        bail!("--io-size must be a multiple of 4096 and of the block size {block_size}");
    }
    if bytes / u64::from(block_size) > blocks {
        bail!(
            "{mib} MiB is more than the namespace's {} bytes",
            blocks * u64::from(block_size)
        );
    }
    let queues = c.io_queues();
    let qd = qd.clamp(1, c.queue_entries() - 1);
    let slots = usize::from(queues) * usize::from(qd);
    let data = DmaMem::create(
        "duplex-nvme-check-data",
        slots * io_size as usize,
        DATA_IOVA,
    )?;
    let mem = c.add_memory(data)?;
    let per_cmd = u64::from(io_size / block_size);
    let md_per_cmd = per_cmd as usize * ms;
    let md_mem = if ms == 0 {
        None
    } else {
        let len = (slots * md_per_cmd).div_ceil(4096) * 4096;
        Some(c.add_memory(DmaMem::create("duplex-nvme-check-md", len, MD_IOVA)?)?)
    };
    let mut md = vec![0u8; md_per_cmd];
    let mut records = 0u64;
    let commands = bytes.div_ceil(u64::from(io_size));
    let start = Instant::now();
    let mut buf = vec![0u8; io_size as usize];
    for phase in [true, false] {
        // true: write everything; false: read everything back and compare.
        let mut next = 0u64; // next command index to issue
        let mut inflight = vec![None::<u64>; slots];
        let mut done_count = 0u64;
        let mut out: Vec<Done> = Vec::new();
        while done_count < commands {
            for (slot, f) in inflight.iter_mut().enumerate() {
                if f.is_some() || next >= commands {
                    continue;
                }
                let qid = (slot / usize::from(qd)) as u16 + 1;
                let lba = next * per_cmd;
                let nlb = per_cmd.min(bytes / u64::from(block_size) - lba) as u32;
                let len = nlb * block_size;
                let off = slot * io_size as usize;
                let m = c.added_memory(mem).context("data memory")?;
                let seg = Seg {
                    iova: m.iova_of(off),
                    len,
                };
                let mut cmd = if phase {
                    for b in 0..u64::from(nlb) {
                        let at = (b * u64::from(block_size)) as usize;
                        let block = &mut buf[at..at + block_size as usize];
                        pattern(seed, lba + b, block);
                        if ms != 0 {
                            let r = &mut md[b as usize * ms..(b as usize + 1) * ms];
                            r.fill(0);
                            r[..RECORD_LEN].copy_from_slice(&integrity::seal(
                                lba + b,
                                seed + lba + b,
                                block,
                            ));
                        }
                    }
                    m.write(off, &buf[..len as usize])?;
                    IoCmd::write(nsid, lba, nlb, block_size, false)
                } else {
                    IoCmd::read(nsid, lba, nlb, block_size)
                };
                if let Some(h) = md_mem {
                    let mm = c.added_memory(h).context("metadata memory")?;
                    let at = slot * md_per_cmd;
                    if phase {
                        mm.write(at, &md[..nlb as usize * ms])?;
                    }
                    cmd.sqe.mptr = mm.iova_of(at);
                }
                c.submit(qid, cmd, &[seg], slot as u64)?;
                *f = Some(next);
                next += 1;
            }
            for qid in 1..=queues {
                c.ring(qid)?;
            }
            out.clear();
            for qid in 1..=queues {
                c.poll(qid, &mut out)?;
            }
            c.check_timeouts(Instant::now(), &mut out)?;
            for d in &out {
                let slot = d.tag as usize;
                let Some(cmd) = inflight.get_mut(slot).and_then(Option::take) else {
                    bail!("completion for a slot with nothing in flight: {d:?}");
                };
                if let Err(e) = &d.result {
                    bail!(
                        "{} of command {cmd} failed: {e}",
                        if phase { "write" } else { "read" }
                    );
                }
                if !phase {
                    let lba = cmd * per_cmd;
                    let nlb = per_cmd.min(bytes / u64::from(block_size) - lba);
                    let len = (nlb * u64::from(block_size)) as usize;
                    let m = c.added_memory(mem).context("data memory")?;
                    m.read(slot * io_size as usize, &mut buf[..len])?;
                    let mut want = vec![0u8; block_size as usize];
                    if let Some(h) = md_mem {
                        let mm = c.added_memory(h).context("metadata memory")?;
                        mm.read(slot * md_per_cmd, &mut md[..nlb as usize * ms])?;
                    }
                    for b in 0..nlb {
                        pattern(seed, lba + b, &mut want);
                        let at = (b * u64::from(block_size)) as usize;
                        let block = &buf[at..at + block_size as usize];
                        if block != &want[..] {
                            bail!("block {} read back differs from what was written", lba + b);
                        }
                        if ms != 0 {
                            let r = &md[b as usize * ms..(b as usize + 1) * ms];
                            let seq = integrity::seq32(seed + lba + b);
                            let got = integrity::verify(lba + b, block, r);
                            if got != (Verdict::Good { seq }) {
                                bail!(
                                    "block {}: its integrity record read back {got:?} (metadata {:02x?}), not the one written (sequence {seq})",
                                    lba + b,
                                    &r[..RECORD_LEN]
                                );
                            }
                            records += 1;
                        }
                    }
                }
                done_count += 1;
            }
        }
        if phase {
            match c.exec(1, IoCmd::flush(nsid), &[], Duration::from_secs(30))? {
                Ok(_) => {}
                Err(e) => bail!("flush failed: {e}"),
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({"verified_bytes": bytes, "queues": queues, "qd": qd,
                "io_size": io_size, "seconds": secs, "resets": c.resets(),
                "nsid": nsid, "metadata_size": ms, "records_checked": records})
        );
    } else {
        println!(
            "verified {mib} MiB ({commands} commands of {io_size} bytes each way) over {queues} queues in {secs:.1} s"
        );
        if ms != 0 {
            println!(
                "{records} integrity records written and checked ({ms} bytes of metadata a block)"
            );
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench<T: Transport>(
    c: &mut Controller<T>,
    ns: &NamespaceId,
    rw: Rw,
    qd: u16,
    bs: u32,
    time: f64,
    span_mib: u64,
    json: bool,
) -> Result<()> {
    let (block_size, blocks, nsid) = (ns.block_size, ns.blocks, ns.nsid);
    if ns.metadata_size != 0 {
        bail!(
            "namespace {nsid} is formatted with {} bytes of metadata a block: bench moves data only (verify carries records)",
            ns.metadata_size
        );
    }
    if bs == 0 || bs % block_size != 0 || bs as usize % 4096 != 0 {
        bail!("--bs must be a multiple of 4096 and of the block size {block_size}");
    }
    let qd = qd.clamp(1, c.queue_entries() - 1);
    let nlb = bs / block_size;
    let span = if span_mib == 0 {
        blocks
    } else {
        (span_mib << 20) / u64::from(block_size)
    }
    .min(blocks);
    let slots_max = span / u64::from(nlb);
    if slots_max == 0 {
        bail!("the span holds no {bs}-byte block");
    }
    let data = DmaMem::create(
        "duplex-nvme-check-data",
        usize::from(qd) * bs as usize,
        DATA_IOVA,
    )?;
    let mem = c.add_memory(data)?;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next_lba = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % slots_max) * u64::from(nlb)
    };
    let mut started = vec![Instant::now(); usize::from(qd)];
    let mut lat_ns: Vec<u64> = Vec::with_capacity(1 << 20);
    let deadline = Instant::now() + Duration::from_secs_f64(time.max(0.1));
    let begin = Instant::now();
    let mut out: Vec<Done> = Vec::new();
    let mut inflight = 0usize;
    let issue = |c: &mut Controller<T>, slot: usize, lba: u64| -> Result<()> {
        let m = c.added_memory(mem).context("data memory")?;
        let seg = Seg {
            iova: m.iova_of(slot * bs as usize),
            len: bs,
        };
        let cmd = match rw {
            Rw::Randread => IoCmd::read(nsid, lba, nlb, block_size),
            Rw::Randwrite => IoCmd::write(nsid, lba, nlb, block_size, false),
        };
        c.submit(1, cmd, &[seg], slot as u64)?;
        Ok(())
    };
    for (slot, s) in started.iter_mut().enumerate() {
        issue(c, slot, next_lba())?;
        *s = Instant::now();
        inflight += 1;
    }
    c.ring(1)?;
    let mut errors = 0u64;
    while inflight > 0 {
        out.clear();
        c.poll(1, &mut out)?;
        c.check_timeouts(Instant::now(), &mut out)?;
        let now = Instant::now();
        for d in &out {
            let slot = d.tag as usize;
            inflight -= 1;
            match &d.result {
                Ok(_) => lat_ns.push(now.duration_since(started[slot]).as_nanos() as u64),
                Err(CmdError::Reset) | Err(CmdError::TimedOut) => errors += 1,
                Err(e) => bail!("I/O failed: {e}"),
            }
            if now < deadline {
                issue(c, slot, next_lba())?;
                started[slot] = Instant::now();
                inflight += 1;
            }
        }
        if !out.is_empty() {
            c.ring(1)?;
        }
    }
    let secs = begin.elapsed().as_secs_f64();
    lat_ns.sort_unstable();
    let n = lat_ns.len().max(1);
    let pct = |p: f64| {
        lat_ns
            .get(((n as f64 * p) as usize).min(n - 1))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let mean = lat_ns.iter().sum::<u64>() as f64 / n as f64 / 1000.0;
    let iops = lat_ns.len() as f64 / secs;
    let name = match rw {
        Rw::Randread => "randread",
        Rw::Randwrite => "randwrite",
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"rw": name, "bs": bs, "qd": qd, "seconds": secs, "ios": lat_ns.len(),
                "iops": iops, "mean_us": mean, "p50_us": pct(0.5), "p99_us": pct(0.99),
                "errors": errors})
        );
    } else {
        println!(
            "{name} bs {bs} qd {qd}: {iops:.0} IOPS, mean {mean:.1} us, p50 {:.1} us, p99 {:.1} us ({} I/Os in {secs:.1} s)",
            pct(0.5),
            pct(0.99),
            lat_ns.len()
        );
    }
    Ok(())
}
