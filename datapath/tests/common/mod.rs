//! The fabric's side of the datapath tests: rings, a pool, volume files in a temporary
//! directory, and a fabric that submits descriptors with checksummed payloads and collects
//! completions (taking back, reading and freeing their chains).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod sim;

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use duplex_datapath::bdev::BdevBox;
use duplex_datapath::control::EngineControl;
use duplex_datapath::map::VolumeMap;
use duplex_datapath::{Channel, Engine, EngineConfig, EngineError, EngineStats, Stopper, Volume};
use duplex_ipc::desc::{IoDesc, OP_READ, OP_WRITE};
use duplex_ipc::doorbell::Doorbell;
use duplex_ipc::pool::{BufHandle, Holder, Pool, NIL};
use duplex_ipc::ring::{self, Consumer, Producer, RingRegion, StartMode, WaitPolicy};
use duplex_ipc::topology::{VolumeSpec, ROLE_DATAPATH, ROLE_FABRIC};

/// Generous bound on every wait; tests end as soon as their condition holds.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// Offset of `producer_waiting` in a ring region (docs/IPC.md): set by a producer about to sleep
/// on a full ring, cleared when it wakes.
const PRODUCER_WAITING: usize = 384;
/// Offset of `consumer_waiting` in a ring region (docs/IPC.md): set by a consumer about to sleep
/// on an empty ring, cleared when it wakes.
const CONSUMER_WAITING: usize = 512;

/// Waits until `condition` holds, checking it again and again; how long that takes is not
/// measured. [`DEADLINE`] is a hang guard only: past it the test fails saying what it waited for.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "hang: still waiting for {what} after {DEADLINE:?}"
        );
        // Let the engine have the core (on a small machine it may share ours).
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The fabric's epoch in these tests.
pub const EPOCH: u64 = 7;

pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// `len` pseudo-random bytes from `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(&splitmix(seed ^ (i << 20)).to_le_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// One volume of a test node.
#[derive(Clone, Debug)]
pub struct VolumeDef {
    pub id: u32,
    pub block_size: u32,
    pub blocks: u64,
}

/// What to build.
#[derive(Clone, Debug)]
pub struct Setup {
    pub chunk_size: usize,
    pub chunks: u32,
    pub channels: usize,
    pub submit_capacity: u64,
    pub complete_capacity: u64,
    pub volumes: Vec<VolumeDef>,
    /// Directory for the volume files (a fresh temporary directory when `None`).
    pub dir: Option<PathBuf>,
    /// Open the volume files with `O_DIRECT`.
    pub direct: bool,
    pub config: EngineConfig,
    /// The last `raw_channels` of the channels are privileged (raw drive ids).
    pub raw_channels: usize,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            chunk_size: 4096,
            chunks: 4096,
            channels: 1,
            submit_capacity: 256,
            complete_capacity: 256,
            volumes: vec![
                VolumeDef {
                    id: 1,
                    block_size: 512,
                    blocks: 8192,
                },
                VolumeDef {
                    id: 2,
                    block_size: 4096,
                    blocks: 2048,
                },
            ],
            dir: None,
            direct: false,
            config: EngineConfig::default(),
            raw_channels: 0,
        }
    }
}

/// A completion as the fabric sees it, its chain taken back, read and freed.
#[derive(Clone, Debug)]
pub struct Done {
    pub desc: IoDesc,
    /// The chain's used bytes, if the completion carried one.
    pub data: Option<Vec<u8>>,
}

/// The fabric's end of one channel.
pub struct Fabric {
    pub pool: Arc<Pool>,
    pub sq: Producer<IoDesc>,
    pub cq: Consumer<IoDesc>,
    pub next_tag: u64,
    /// Block size of each volume id.
    pub block_sizes: HashMap<u32, u32>,
}

impl Fabric {
    pub fn sq_id(&self) -> u8 {
        self.sq.ring().ring_id()
    }

    pub fn cq_id(&self) -> u8 {
        self.cq.ring().ring_id()
    }

    pub fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    /// Publishes `desc` (tag and epoch filled in when zero), with a chain of `capacity` bytes
    /// holding `payload` lent through it when `capacity > 0`. Waits for ring space.
    pub fn submit(&mut self, mut desc: IoDesc, capacity: usize, payload: &[u8]) -> u64 {
        if desc.tag == 0 {
            desc.tag = self.tag();
        }
        if desc.epoch == 0 {
            desc.epoch = EPOCH;
        }
        if capacity > 0 {
            let h = self.pool.alloc_chain(capacity).expect("pool exhausted");
            self.pool.write_chain(h, payload).unwrap();
            self.pool
                .lend_chain(h, self.sq_id(), self.sq.next_index())
                .unwrap();
            desc.buf = h.0;
            desc.buf_len = payload.len() as u32;
        }
        let pushed = self
            .sq
            .push_wait(std::slice::from_ref(&desc), Some(DEADLINE))
            .unwrap();
        assert_eq!(pushed, 1, "submission ring stayed full");
        desc.tag
    }

    /// Writes `data` at `lba` of volume `vol`.
    pub fn write(&mut self, vol: u32, lba: u64, data: &[u8], flags: u8) -> u64 {
        let bs = self.block_sizes[&vol] as usize;
        assert_eq!(data.len() % bs, 0);
        let desc = IoDesc {
            opcode: OP_WRITE,
            volume: vol,
            lba,
            blocks: (data.len() / bs) as u32,
            flags,
            ..IoDesc::default()
        };
        self.submit(desc, data.len(), data)
    }

    /// Reads `blocks` blocks at `lba` of volume `vol` into a fresh chain.
    pub fn read(&mut self, vol: u32, lba: u64, blocks: u32) -> u64 {
        let bytes = self.block_sizes[&vol] as usize * blocks as usize;
        let desc = IoDesc {
            opcode: OP_READ,
            volume: vol,
            lba,
            blocks,
            ..IoDesc::default()
        };
        self.submit(desc, bytes, &[])
    }

    /// Takes back the chain of a completion popped at `index`, reads it, frees it.
    fn settle(&self, desc: IoDesc, index: u64) -> Done {
        assert_eq!(desc.epoch, EPOCH, "epoch not echoed: {desc:?}");
        let data = if desc.buf == NIL {
            None
        } else {
            let h = BufHandle(desc.buf);
            self.pool
                .take_chain(h, self.cq_id(), index)
                .unwrap_or_else(|e| {
                    panic!("completion {desc:?} at {index}: chain not lent through it: {e}")
                });
            let mut out = Vec::new();
            self.pool.read_chain(h, &mut out).unwrap();
            self.pool.free_chain(h).unwrap();
            Some(out)
        };
        Done { desc, data }
    }

    /// Whether the engine has announced that it is going to sleep on this channel's empty
    /// submission ring (its `consumer_waiting` flag; cleared again when it wakes).
    pub fn engine_waits_for_submissions(&self) -> bool {
        self.sq
            .ring()
            .region()
            .atomic_u32(CONSUMER_WAITING)
            .load(Ordering::SeqCst)
            != 0
    }

    /// Whether the engine has announced that it is going to sleep until this channel's full
    /// completion ring has room (its `producer_waiting` flag; cleared again when it wakes).
    pub fn engine_waits_for_room(&self) -> bool {
        self.cq
            .ring()
            .region()
            .atomic_u32(PRODUCER_WAITING)
            .load(Ordering::SeqCst)
            != 0
    }

    /// Completions published and not yet popped.
    pub fn completions_ready(&self) -> u64 {
        let ring = self.cq.ring();
        // Head first: the tail only grows, so this never underflows.
        let head = ring.head();
        ring.tail().wrapping_sub(head)
    }

    /// Submissions published and not yet consumed by the engine.
    pub fn submissions_waiting(&self) -> u64 {
        let ring = self.sq.ring();
        let head = ring.head();
        ring.tail().wrapping_sub(head)
    }

    /// Pops, without waiting, every completion already published, settling them into `out`.
    pub fn drain_ready_into(&mut self, out: &mut Vec<Done>) -> usize {
        let mut got = Vec::new();
        let index = self.cq.next_index();
        let n = self.cq.try_pop(&mut got, usize::MAX).unwrap();
        for (j, d) in got.into_iter().enumerate() {
            out.push(self.settle(d, index + j as u64));
        }
        n
    }

    /// Pops what completions are there within `wait`, settling them into `out`.
    pub fn drain_some_into(&mut self, out: &mut Vec<Done>, wait: Duration) -> usize {
        let mut got = Vec::new();
        let index = self.cq.next_index();
        let n = self.cq.pop_wait(&mut got, 64, Some(wait)).unwrap();
        for (j, d) in got.into_iter().enumerate() {
            out.push(self.settle(d, index + j as u64));
        }
        n
    }

    /// Waits for exactly `n` completions (more arriving is a failure of the caller's count).
    pub fn collect(&mut self, n: usize) -> HashMap<u64, Done> {
        let mut out = Vec::new();
        let deadline = Instant::now() + DEADLINE;
        while out.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} completions arrived",
                out.len()
            );
            self.drain_some_into(&mut out, Duration::from_millis(20));
        }
        let mut map = HashMap::new();
        for d in out {
            let tag = d.desc.tag;
            assert!(
                map.insert(tag, d).is_none(),
                "two completions for tag {tag}"
            );
        }
        assert_eq!(map.len(), n);
        map
    }

    /// Submits one descriptor and waits for its completion.
    pub fn call(&mut self, desc: IoDesc, capacity: usize, payload: &[u8]) -> Done {
        let tag = self.submit(desc, capacity, payload);
        let mut done = self.collect(1);
        done.remove(&tag).expect("completion for another tag")
    }

    pub fn write_sync(&mut self, vol: u32, lba: u64, data: &[u8], flags: u8) -> Done {
        let tag = self.write(vol, lba, data, flags);
        self.collect(1).remove(&tag).expect("tag")
    }

    pub fn read_sync(&mut self, vol: u32, lba: u64, blocks: u32) -> Done {
        let tag = self.read(vol, lba, blocks);
        self.collect(1).remove(&tag).expect("tag")
    }
}

/// A running engine and the fabric ends of its channels.
pub struct Node {
    pub dir: Option<tempfile::TempDir>,
    pub paths: Vec<PathBuf>,
    pub fabric: Vec<Fabric>,
    pub pool: Arc<Pool>,
    pub stop: Stopper,
    /// The engine's control inlet.
    pub control: EngineControl,
    /// Calls of the engine's beat callback (once per turn of its loop).
    pub beats: Arc<AtomicU64>,
    /// `/proc/self/task/<tid>/stat` of the engine's thread.
    engine_stat: PathBuf,
    engine: Option<JoinHandle<Result<EngineStats, EngineError>>>,
}

/// Makes a node's devices and volume maps from the datapath's pool.
type DeviceBuilder<'a> = dyn FnOnce(&Pool) -> (Vec<BdevBox>, Vec<VolumeMap>) + 'a;

/// The fabric's ends of one channel: submission producer, completion consumer.
type FabricEnds = (Producer<IoDesc>, Consumer<IoDesc>);

/// Creates `n` ring pairs' regions and doorbells and attaches both ends.
fn rings(setup: &Setup, n: usize) -> (Vec<Channel>, Vec<FabricEnds>) {
    let mut engine_side = Vec::new();
    let mut fabric_side = Vec::new();
    for i in 0..n {
        let sq_id = (2 * i + 1) as u8;
        let cq_id = (2 * i + 2) as u8;
        let sq = RingRegion::<IoDesc>::create("sq", setup.submit_capacity, sq_id).unwrap();
        let cq = RingRegion::<IoDesc>::create("cq", setup.complete_capacity, cq_id).unwrap();
        let (sq_data, sq_space) = ring::doorbells().unwrap();
        let (cq_data, cq_space) = ring::doorbells().unwrap();
        let clone = |d: &Doorbell| d.try_clone().unwrap();
        let mut fab_sq = Producer::attach(
            sq.try_clone().unwrap(),
            clone(&sq_data),
            clone(&sq_space),
            EPOCH,
            StartMode::Fresh,
        )
        .unwrap();
        let mut fab_cq = Consumer::attach(
            cq.try_clone().unwrap(),
            clone(&cq_data),
            clone(&cq_space),
            EPOCH,
            StartMode::Fresh,
        )
        .unwrap();
        fab_sq.set_policy(WaitPolicy::Doorbell);
        fab_cq.set_policy(WaitPolicy::Doorbell);
        let dp_cq = Producer::attach(cq, cq_data, cq_space, 1, StartMode::Fresh).unwrap();
        let dp_sq = Consumer::attach(sq, sq_data, sq_space, 1, StartMode::Fresh).unwrap();
        engine_side.push(if i + setup.raw_channels >= n {
            Channel::raw(dp_sq, dp_cq)
        } else {
            Channel::new(dp_sq, dp_cq)
        });
        fabric_side.push((fab_sq, fab_cq));
    }
    (engine_side, fabric_side)
}

/// Creates (sparse) volume files of `setup` in `dir` and opens them as the supervisor would.
pub fn volume_files(setup: &Setup, dir: &Path) -> (Vec<Volume>, Vec<PathBuf>) {
    let mut volumes = Vec::new();
    let mut paths = Vec::new();
    for v in &setup.volumes {
        let path = dir.join(format!("vol{}", v.id));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(u64::from(v.block_size) * v.blocks).unwrap();
        drop(f);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(if setup.direct { libc::O_DIRECT } else { 0 })
            .open(&path)
            .unwrap();
        let spec = VolumeSpec {
            id: v.id,
            name: format!("vol{}", v.id),
            resource: format!("volume:vol{}", v.id),
            path: path.display().to_string(),
            block_size: v.block_size,
            blocks: v.blocks,
            direct: setup.direct,
            drive: None,
        };
        volumes.push(Volume::new(&spec, f.into()).unwrap());
        paths.push(path);
    }
    (volumes, paths)
}

/// The pool as the fabric creates it and as the datapath attaches it.
pub fn pools(setup: &Setup) -> (Arc<Pool>, Arc<Pool>) {
    let fabric = Pool::create(
        "pool",
        setup.chunk_size,
        setup.chunks,
        Holder {
            role: ROLE_FABRIC,
            incarnation: EPOCH,
        },
    )
    .unwrap();
    let datapath = Pool::attach(
        fabric.region().try_clone_fd().unwrap(),
        Holder {
            role: ROLE_DATAPATH,
            incarnation: 1,
        },
    )
    .unwrap();
    (Arc::new(fabric), Arc::new(datapath))
}

impl Node {
    /// Builds everything and runs the engine on a thread.
    pub fn start(setup: Setup) -> Self {
        Self::start_with(setup, None)
    }

    /// As [`Node::start`], serving the devices and volume maps `build` makes (given the
    /// datapath's pool) instead of the setup's volume files.
    pub fn start_devices(
        setup: Setup,
        build: impl FnOnce(&Pool) -> (Vec<BdevBox>, Vec<VolumeMap>),
    ) -> Self {
        Self::start_with(setup, Some(Box::new(build)))
    }

    fn start_with(setup: Setup, build: Option<Box<DeviceBuilder<'_>>>) -> Self {
        let (dir, base) = match &setup.dir {
            Some(d) => {
                let t = tempfile::tempdir_in(d).unwrap();
                let p = t.path().to_owned();
                (Some(t), p)
            }
            None => {
                let t = tempfile::tempdir().unwrap();
                let p = t.path().to_owned();
                (Some(t), p)
            }
        };
        let (volumes, paths) = volume_files(&setup, &base);
        let (fabric_pool, dp_pool) = pools(&setup);
        let (channels, ends) = rings(&setup, setup.channels);
        let engine = match build {
            None => Engine::new(volumes, dp_pool, channels, setup.config.clone()).unwrap(),
            Some(build) => {
                let (devices, maps) = build(&dp_pool);
                Engine::with_devices(devices, maps, dp_pool, channels, setup.config.clone())
                    .unwrap()
            }
        };
        let stop = engine.stopper();
        let control = engine.control();
        let beats = Arc::new(AtomicU64::new(0));
        let b = Arc::clone(&beats);
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let engine = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                // "<pid>/task/<tid>": where this thread's scheduler state is.
                tid_tx
                    .send(std::fs::read_link("/proc/thread-self"))
                    .unwrap();
                engine.run(|| {
                    b.fetch_add(1, Ordering::SeqCst);
                })
            })
            .unwrap();
        let engine_stat = Path::new("/proc")
            .join(tid_rx.recv().unwrap().unwrap())
            .join("stat");
        let block_sizes: HashMap<u32, u32> =
            setup.volumes.iter().map(|v| (v.id, v.block_size)).collect();
        let fabric = ends
            .into_iter()
            .map(|(sq, cq)| Fabric {
                pool: Arc::clone(&fabric_pool),
                sq,
                cq,
                next_tag: 0,
                block_sizes: block_sizes.clone(),
            })
            .collect();
        Self {
            dir,
            paths,
            fabric,
            pool: fabric_pool,
            stop,
            control,
            beats,
            engine_stat,
            engine: Some(engine),
        }
    }

    pub fn f(&mut self) -> &mut Fabric {
        &mut self.fabric[0]
    }

    /// The engine's beats so far.
    pub fn beats(&self) -> u64 {
        self.beats.load(Ordering::SeqCst)
    }

    /// Whether the engine is asleep waiting for a submission on `fabric` (which must be one of
    /// its channels): it has announced the wait (the submission ring's `consumer_waiting` flag)
    /// and its thread is blocked (`S` in `/proc/…/stat`). Its loop blocks nowhere but in that
    /// sleep, which it enters only after announcing the wait and finding the ring still empty,
    /// so once this holds the engine has counted the sleep and only a doorbell, the wake
    /// eventfd or [`EngineConfig::max_sleep`] ends it.
    pub fn engine_asleep_on(&self, fabric: &Fabric) -> bool {
        fabric.engine_waits_for_submissions() && self.engine_blocked()
    }

    /// Whether the engine is asleep until `fabric`'s full completion ring has room (which must
    /// be one of its channels): it has announced the wait (the completion ring's
    /// `producer_waiting` flag) and its thread is blocked; see [`Node::engine_asleep_on`].
    pub fn engine_asleep_for_room(&self, fabric: &Fabric) -> bool {
        fabric.engine_waits_for_room() && self.engine_blocked()
    }

    /// Whether the engine's thread is blocked in the kernel (state `S`).
    fn engine_blocked(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(&self.engine_stat) else {
            return false;
        };
        // The state follows the parenthesised thread name.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('S'))
    }

    /// Stops the engine and returns its counters.
    pub fn stop(mut self) -> EngineStats {
        self.stop.stop();
        let handle = self.engine.take().unwrap();
        let deadline = Instant::now() + DEADLINE;
        while !handle.is_finished() {
            assert!(Instant::now() < deadline, "engine did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
        handle.join().unwrap().unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(h) = self.engine.take() {
            self.stop.stop();
            let _ = h.join();
        }
    }
}
