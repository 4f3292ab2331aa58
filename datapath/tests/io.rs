//! The engine in-process, with the test as the fabric: every opcode against real files, the
//! validation paths, concurrency, backpressure and shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use duplex_datapath::{Channel, Engine, EngineConfig, EngineError, FLUSH_ALL};
use duplex_ipc::desc::{
    IoDesc, FLAG_FUA, OP_DEALLOCATE, OP_FLUSH, OP_READ, OP_WRITE, OP_WRITE_ZEROES,
    STATUS_INVALID_FIELD, STATUS_LBA_OUT_OF_RANGE, STATUS_NOT_MAPPED, STATUS_READ_ERROR,
    STATUS_SUCCESS, STATUS_WRITE_FAULT,
};
use duplex_ipc::pool::{BufHandle, ChunkState, NIL};
use duplex_ipc::ring::{self, Consumer, Producer, RingRegion, StartMode};

fn crc(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

fn ok(d: &Done) {
    assert_eq!(d.desc.status, STATUS_SUCCESS, "{:?}", d.desc);
}

/// Writes then reads back checksummed data of several sizes, at the start, middle and end of
/// each volume; the read completion's chain holds exactly the bytes read.
#[test]
fn write_then_read_back_on_both_block_sizes() {
    write_then_read_back(Setup::default());
}

/// The same on tmpfs, where the engine maps the file and copies instead of going through the
/// io_uring.
#[test]
fn write_then_read_back_on_a_memory_backed_volume() {
    if let Some(setup) = on_tmpfs() {
        write_then_read_back(setup);
    }
}

/// Volumes on tmpfs (`/dev/shm`), or `None` (the test says it is skipped) where there is none.
fn on_tmpfs() -> Option<Setup> {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIPPED: no /dev/shm");
        return None;
    }
    Some(Setup {
        dir: Some(shm.to_owned()),
        ..Setup::default()
    })
}

/// A memory-backed volume whose file is truncated under the engine's mapping: its reads and
/// writes fail (read error, write fault), and the engine and the other volume go on.
#[test]
fn a_memory_backed_file_that_shrinks_fails_its_io_and_nothing_else() {
    let Some(setup) = on_tmpfs() else {
        return;
    };
    let mut node = Node::start(setup);
    let data = pattern(5, 4096);
    ok(&node.f().write_sync(2, 100, &data, 0));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&node.paths[1])
        .unwrap()
        .set_len(4096)
        .unwrap();
    let r = node.f().read_sync(2, 100, 1);
    assert_eq!(r.desc.status, STATUS_READ_ERROR, "{:?}", r.desc);
    // Inside what is left of the file too: the mapping is no longer the file.
    let w = node.f().write_sync(2, 0, &data, 0);
    assert_eq!(w.desc.status, STATUS_WRITE_FAULT, "{:?}", w.desc);
    let other = pattern(6, 4096);
    ok(&node.f().write_sync(1, 0, &other, 0));
    assert_eq!(node.f().read_sync(1, 0, 8).data.unwrap(), other);
    let stats = node.stop();
    assert_eq!(stats.errors, 2, "{stats:?}");
}

fn write_then_read_back(setup: Setup) {
    let mut node = Node::start(setup);
    for (vol, bs, blocks) in [(1_u32, 512_u64, 8192_u64), (2, 4096, 2048)] {
        for (i, bytes) in [bs, 7 * bs, 4096, 4096 + bs, 64 * 1024, 128 * 1024]
            .into_iter()
            .enumerate()
        {
            let n = bytes / bs;
            for lba in [0, blocks / 2 + 1, blocks - n] {
                let data = pattern(lba ^ (i as u64) << 32 ^ u64::from(vol), bytes as usize);
                let f = node.f();
                let w = f.write_sync(vol, lba, &data, 0);
                ok(&w);
                assert_eq!(
                    w.data.as_deref().map(<[u8]>::len),
                    Some(bytes as usize),
                    "write returns its chain"
                );
                let r = f.read_sync(vol, lba, n as u32);
                ok(&r);
                assert_eq!(r.desc.buf_len as u64, bytes);
                let back = r.data.expect("read returns its chain");
                assert_eq!(back.len(), data.len(), "vol {vol} lba {lba} {bytes} bytes");
                assert_eq!(crc(&back), crc(&data), "vol {vol} lba {lba} {bytes} bytes");
            }
        }
    }
    // What the engine wrote is in the file.
    let data = pattern(99, 8192);
    ok(&node.f().write_sync(2, 10, &data, 0));
    let file = std::fs::read(&node.paths[1]).unwrap();
    assert_eq!(file[10 * 4096..12 * 4096], data[..]);
    let pool = Arc::clone(&node.pool);
    let stats = node.stop();
    assert_eq!(stats.submissions, stats.completions);
    assert_eq!(stats.errors, 0);
    assert_eq!(
        pool.free_count(),
        pool.capacity() as usize,
        "every chunk came back"
    );
}

#[test]
fn fua_write_and_flushes() {
    let mut node = Node::start(Setup::default());
    let f = node.f();
    let data = pattern(5, 4096 * 3);
    ok(&f.write_sync(2, 100, &data, FLAG_FUA));
    assert_eq!(crc(&f.read_sync(2, 100, 3).data.unwrap()), crc(&data));
    for volume in [1, 2, FLUSH_ALL] {
        let d = f.call(
            IoDesc {
                opcode: OP_FLUSH,
                volume,
                ..IoDesc::default()
            },
            0,
            &[],
        );
        ok(&d);
        // A zeroed descriptor names chunk 0 in `buf`; it was not lent, so it is ignored.
        assert_eq!(d.desc.buf, NIL);
    }
    let d = f.call(
        IoDesc {
            opcode: OP_FLUSH,
            volume: 3,
            ..IoDesc::default()
        },
        0,
        &[],
    );
    assert_eq!(d.desc.status, STATUS_NOT_MAPPED);
    node.stop();
}

/// Writes a pattern, zeroes (or deallocates) a range inside it, reads zeroes there and the
/// pattern around it.
fn zeroes_case(node: &mut Node, vol: u32, bs: u64, opcode: u8, flags: u8) {
    let f = node.f();
    let base = 64;
    let data = pattern(
        u64::from(opcode) << 8 | u64::from(flags),
        (32 * bs) as usize,
    );
    ok(&f.write_sync(vol, base, &data, 0));
    let d = f.call(
        IoDesc {
            opcode,
            volume: vol,
            lba: base + 8,
            blocks: 16,
            flags,
            ..IoDesc::default()
        },
        0,
        &[],
    );
    ok(&d);
    let back = f.read_sync(vol, base, 32).data.unwrap();
    let (b, z) = ((8 * bs) as usize, (24 * bs) as usize);
    assert_eq!(back[..b], data[..b], "before the range");
    assert!(back[b..z].iter().all(|&x| x == 0), "{opcode:#x} left data");
    assert_eq!(back[z..], data[z..], "after the range");
}

#[test]
fn write_zeroes_and_deallocate_read_back_zeroes() {
    for emulate in [false, true] {
        let mut node = Node::start(Setup {
            config: EngineConfig {
                emulate_zeroes: emulate,
                ..EngineConfig::default()
            },
            ..Setup::default()
        });
        for (vol, bs) in [(1, 512), (2, 4096)] {
            for opcode in [OP_WRITE_ZEROES, OP_DEALLOCATE] {
                for flags in [0, FLAG_FUA] {
                    zeroes_case(&mut node, vol, bs, opcode, flags);
                }
            }
        }
        // Deallocating nothing is a no-op; zeroing nothing is invalid.
        let f = node.f();
        let mk = |opcode| IoDesc {
            opcode,
            volume: 1,
            lba: 5,
            blocks: 0,
            ..IoDesc::default()
        };
        ok(&f.call(mk(OP_DEALLOCATE), 0, &[]));
        assert_eq!(
            f.call(mk(OP_WRITE_ZEROES), 0, &[]).desc.status,
            STATUS_INVALID_FIELD
        );
        // A large zeroing (more than one zero-buffer iovec) at the end of a volume.
        let d = f.call(
            IoDesc {
                opcode: OP_WRITE_ZEROES,
                volume: 2,
                lba: 2048 - 1024,
                blocks: 1024,
                ..IoDesc::default()
            },
            0,
            &[],
        );
        ok(&d);
        let stats = node.stop();
        if emulate {
            assert_eq!(
                stats.zero_writes,
                2 * 2 * 2 + 1,
                "every zeroing went through writes"
            );
        }
        assert_eq!(stats.errors, 1);
    }
}

/// tmpfs cannot `FALLOC_FL_ZERO_RANGE`: the engine falls back to writing zeroes.
#[test]
fn tmpfs_volumes_fall_back_to_writing_zeroes() {
    let Some(setup) = on_tmpfs() else {
        return;
    };
    let mut node = Node::start(setup);
    for (vol, bs) in [(1, 512), (2, 4096)] {
        zeroes_case(&mut node, vol, bs, OP_WRITE_ZEROES, 0);
        zeroes_case(&mut node, vol, bs, OP_WRITE_ZEROES, FLAG_FUA);
        zeroes_case(&mut node, vol, bs, OP_DEALLOCATE, 0);
    }
    let stats = node.stop();
    assert!(stats.zero_writes >= 4, "{stats:?}");
    assert_eq!(stats.errors, 0);
}

#[test]
fn invalid_descriptors_get_error_completions_and_their_buffers_back() {
    let mut node = Node::start(Setup::default());
    let f = node.f();
    let cases: Vec<(IoDesc, usize, u16, bool)> = vec![
        // (descriptor, chain bytes, status, chain comes back)
        (
            IoDesc {
                opcode: OP_READ,
                volume: 1,
                lba: 8192,
                blocks: 1,
                ..IoDesc::default()
            },
            512,
            STATUS_LBA_OUT_OF_RANGE,
            true,
        ),
        (
            IoDesc {
                opcode: OP_WRITE,
                volume: 2,
                lba: 2047,
                blocks: 2,
                ..IoDesc::default()
            },
            8192,
            STATUS_LBA_OUT_OF_RANGE,
            true,
        ),
        (
            IoDesc {
                opcode: OP_READ,
                volume: 2,
                lba: u64::MAX,
                blocks: 1,
                ..IoDesc::default()
            },
            4096,
            STATUS_LBA_OUT_OF_RANGE,
            true,
        ),
        (
            IoDesc {
                opcode: OP_DEALLOCATE,
                volume: 2,
                lba: u64::MAX - 1,
                blocks: 4,
                ..IoDesc::default()
            },
            0,
            STATUS_LBA_OUT_OF_RANGE,
            false,
        ),
        (
            IoDesc {
                opcode: OP_WRITE_ZEROES,
                volume: 1,
                lba: 8000,
                blocks: 193,
                ..IoDesc::default()
            },
            0,
            STATUS_LBA_OUT_OF_RANGE,
            false,
        ),
        (
            IoDesc {
                opcode: OP_READ,
                volume: 9,
                lba: 0,
                blocks: 1,
                ..IoDesc::default()
            },
            512,
            STATUS_NOT_MAPPED,
            true,
        ),
        (
            IoDesc {
                opcode: 0x7e,
                volume: 1,
                lba: 0,
                blocks: 1,
                ..IoDesc::default()
            },
            512,
            STATUS_INVALID_FIELD,
            true,
        ),
        (
            IoDesc {
                opcode: 0x7e,
                volume: 1,
                lba: 0,
                blocks: 1,
                buf: NIL,
                ..IoDesc::default()
            },
            0,
            STATUS_INVALID_FIELD,
            false,
        ),
        (
            IoDesc {
                opcode: OP_WRITE,
                volume: 1,
                lba: 0,
                blocks: 0,
                ..IoDesc::default()
            },
            512,
            STATUS_INVALID_FIELD,
            true,
        ),
        // The chain is shorter than the transfer.
        (
            IoDesc {
                opcode: OP_READ,
                volume: 2,
                lba: 0,
                blocks: 3,
                ..IoDesc::default()
            },
            8192,
            STATUS_INVALID_FIELD,
            true,
        ),
        // No buffer at all.
        (
            IoDesc {
                opcode: OP_WRITE,
                volume: 1,
                lba: 0,
                blocks: 1,
                buf: NIL,
                ..IoDesc::default()
            },
            0,
            STATUS_INVALID_FIELD,
            false,
        ),
    ];
    for (desc, bytes, status, back) in cases {
        let d = f.call(desc, bytes, &[]);
        assert_eq!(d.desc.status, status, "{desc:?} → {:?}", d.desc);
        assert_eq!(d.data.is_some(), back, "{desc:?} → {:?}", d.desc);
    }

    // Chains not lent through the descriptor: lent at another index, held by the fabric, out of
    // the pool. Invalid field, no buffer, and the chunks stay as they were.
    let pool = Arc::clone(&f.pool);
    let wrong = pool.alloc_chain(512).unwrap();
    pool.lend_chain(wrong, f.sq_id(), f.sq.next_index() + 5)
        .unwrap();
    let held = pool.alloc_chain(512).unwrap();
    let other_ring = pool.alloc_chain(512).unwrap();
    pool.lend_chain(other_ring, f.cq_id(), f.sq.next_index())
        .unwrap();
    for buf in [wrong.0, held.0, other_ring.0, pool.capacity(), NIL - 1] {
        let d = f.call(
            IoDesc {
                opcode: OP_WRITE,
                volume: 1,
                lba: 3,
                blocks: 1,
                buf,
                ..IoDesc::default()
            },
            0,
            &[],
        );
        assert_eq!(d.desc.status, STATUS_INVALID_FIELD, "buf {buf}");
        assert_eq!(
            d.desc.buf, NIL,
            "buf {buf}: a chain that was not ours is not returned"
        );
    }
    assert!(matches!(
        pool.state(wrong).unwrap(),
        ChunkState::Lent { .. }
    ));
    assert!(matches!(pool.state(held).unwrap(), ChunkState::Held { .. }));
    assert!(matches!(
        pool.state(other_ring).unwrap(),
        ChunkState::Lent { .. }
    ));

    // Tags and epochs are echoed; the engine still serves.
    let data = pattern(1, 512);
    let w = f.write_sync(1, 3, &data, 0);
    ok(&w);
    assert_eq!(f.read_sync(1, 3, 1).data.unwrap(), data);
    let stats = node.stop();
    assert_eq!(stats.errors, 16);
    assert_eq!(stats.submissions, stats.completions);
}

/// 128 requests in flight at once, writes then reads, with verification.
#[test]
fn queue_depth_128_with_verification() {
    let mut node = Node::start(Setup::default());
    let f = node.f();
    let mut expect = HashMap::new();
    let mut tags = HashMap::new();
    // 128 disjoint extents of 16 blocks of volume 2, each written with 1..=16 blocks.
    for round in 0..2 {
        for i in 0..128_u64 {
            let blocks = 1 + splitmix(i ^ round) % 16;
            let data = pattern(i << 8 | round, (blocks * 4096) as usize);
            let tag = f.write(2, i * 16, &data, if i % 7 == 0 { FLAG_FUA } else { 0 });
            tags.insert(tag, i);
            expect.insert(i, data);
        }
        let done = f.collect(128);
        assert!(done.values().all(|d| d.desc.status == STATUS_SUCCESS));
        let mut reads = HashMap::new();
        for (&i, data) in &expect {
            let tag = f.read(2, i * 16, (data.len() / 4096) as u32);
            reads.insert(tag, i);
        }
        let done = f.collect(128);
        for (tag, d) in done {
            ok(&d);
            let i = reads[&tag];
            assert_eq!(
                crc(d.data.as_ref().unwrap()),
                crc(&expect[&i]),
                "extent {i}"
            );
        }
    }
    let pool = Arc::clone(&node.pool);
    let stats = node.stop();
    assert_eq!(stats.completions, 512);
    assert_eq!(pool.free_count(), pool.capacity() as usize);
}

/// A completion ring of 4 slots that the fabric empties one completion at a time, each time
/// only once the ring is full and the engine, with completions it cannot publish, is asleep
/// waiting for room: the engine waits rather than dropping anything, is woken by the room made
/// (its `max_sleep` is an hour), and loses nothing.
#[test]
fn completion_ring_backpressure_loses_nothing() {
    const WRITES: u64 = 100;
    const CQ_SLOTS: u64 = 4;
    let mut node = Node::start(Setup {
        submit_capacity: 128,
        complete_capacity: CQ_SLOTS,
        config: EngineConfig {
            // Only the room made can wake the waiting engine in time.
            max_sleep: Duration::from_secs(3600),
            ..EngineConfig::default()
        },
        ..Setup::default()
    });
    let mut f = node.fabric.remove(0);
    let mut tags = Vec::new();
    for i in 0..WRITES {
        tags.push(f.write(1, i, &pattern(i, 512), 0));
    }
    let mut seen = Vec::new();
    while (seen.len() as u64) < WRITES {
        // More completions are due than the ring holds: the engine must fill the ring and wait
        // for room. Only then is one slot freed. (The ring is read first: a full ring seen after
        // a slot was freed is a new one, so the wait seen with it is a new wait.)
        let take = if WRITES - seen.len() as u64 > CQ_SLOTS {
            wait_until(
                &format!(
                    "a full completion ring and the engine asleep waiting for room ({} of \
                     {WRITES} taken)",
                    seen.len()
                ),
                || f.completions_ready() == CQ_SLOTS && node.engine_asleep_for_room(&f),
            );
            1
        } else {
            // The last completions: all fit, wait for them to be there.
            let due = (WRITES - seen.len() as u64) as usize;
            wait_until("the last completions", || {
                f.completions_ready() == due as u64
            });
            due
        };
        let mut got = Vec::new();
        let index = f.cq.next_index();
        assert_eq!(f.cq.try_pop(&mut got, take).unwrap(), take);
        for (j, d) in got.into_iter().enumerate() {
            assert_eq!(d.status, STATUS_SUCCESS);
            f.pool
                .take_chain(BufHandle(d.buf), f.cq_id(), index + j as u64)
                .unwrap();
            f.pool.free_chain(BufHandle(d.buf)).unwrap();
            seen.push(d.tag);
        }
    }
    assert_eq!(
        f.completions_ready(),
        0,
        "more completions than submissions"
    );
    seen.sort_unstable();
    assert_eq!(seen, tags, "every submission completed exactly once");
    for i in 0..WRITES {
        assert_eq!(f.read_sync(1, i, 1).data.unwrap(), pattern(i, 512));
    }
    let stats = node.stop();
    assert_eq!(stats.completions, 2 * WRITES);
    assert_eq!(stats.unpublished, 0);
    // Each wait for room seen above was a sleep of its own.
    assert!(stats.sleeps >= WRITES - CQ_SLOTS, "{stats:?}");
}

/// Stopping an idle engine wakes it: asleep with an hour-long `max_sleep`, it still ends when
/// told to (`Node::stop` fails the test if it does not). Stopping a busy one completes what it
/// consumed and leaves the rest in the submission ring.
#[test]
fn shutdown_idle_and_busy() {
    let node = Node::start(Setup {
        config: EngineConfig {
            max_sleep: Duration::from_secs(3600),
            ..EngineConfig::default()
        },
        ..Setup::default()
    });
    wait_until("the idle engine asleep", || {
        node.engine_asleep_on(&node.fabric[0])
    });
    let stats = node.stop();
    assert_eq!(stats.submissions, 0);
    assert!(stats.sleeps >= 1, "{stats:?}");

    let mut node = Node::start(Setup::default());
    let f = node.f();
    for i in 0..64_u64 {
        f.write(2, i * 32, &pattern(i, 32 * 4096), 0);
    }
    // Whatever the engine consumed before it stopped is completed; the rest stays in the ring.
    let mut f = node.fabric.remove(0);
    let stats = node.stop();
    // The engine has returned: everything it published is in the ring already.
    let mut got = Vec::new();
    f.drain_ready_into(&mut got);
    assert_eq!(stats.unpublished, 0);
    assert_eq!(stats.submissions, stats.completions);
    assert_eq!(got.len() as u64, stats.completions);
    assert!(got.iter().all(|d| d.desc.status == STATUS_SUCCESS));
    assert_eq!(f.submissions_waiting(), 64 - stats.submissions);
}

/// From a sleep that would last an hour, a submission is served: the doorbell wakes the engine.
/// Each write is published only once the engine is asleep waiting for submissions, so each
/// round is one such sleep ended by the doorbell (the test's hang guard is far shorter than
/// the sleep).
#[test]
fn idle_engine_wakes_on_a_submission() {
    const ROUNDS: u64 = 20;
    let mut node = Node::start(Setup {
        config: EngineConfig {
            max_sleep: Duration::from_secs(3600),
            ..EngineConfig::default()
        },
        ..Setup::default()
    });
    for i in 0..ROUNDS {
        wait_until(&format!("the engine asleep before write {i}"), || {
            node.engine_asleep_on(&node.fabric[0])
        });
        ok(&node.f().write_sync(1, i, &pattern(i, 512), 0));
    }
    let stats = node.stop();
    assert_eq!(stats.submissions, ROUNDS);
    assert!(stats.sleeps >= ROUNDS, "{stats:?}");
}

/// The heartbeat goes on while idle: each time the engine is seen asleep, with nothing to
/// wake it but its `max_sleep`, it beats again.
#[test]
fn idle_engine_beats() {
    const ROUNDS: u64 = 10;
    let node = Node::start(Setup {
        config: EngineConfig {
            max_sleep: Duration::from_millis(20),
            ..EngineConfig::default()
        },
        ..Setup::default()
    });
    for i in 0..ROUNDS {
        wait_until(&format!("the engine asleep ({i} sleeps seen)"), || {
            node.engine_asleep_on(&node.fabric[0])
        });
        // It does not beat while blocked, so a beat now means it woke by itself.
        let before = node.beats();
        wait_until(&format!("a beat after sleep {i}"), || node.beats() > before);
    }
    let stats = node.stop();
    assert_eq!(stats.submissions, 0);
    assert!(stats.sleeps >= ROUNDS, "{stats:?}");
}

/// Two channels served at once from two fabric threads.
#[test]
fn two_channels_in_parallel() {
    let mut node = Node::start(Setup {
        channels: 2,
        ..Setup::default()
    });
    let fabrics = std::mem::take(&mut node.fabric);
    let handles: Vec<_> = fabrics
        .into_iter()
        .enumerate()
        .map(|(c, mut f)| {
            std::thread::spawn(move || {
                for i in 0..200_u64 {
                    let lba = (c as u64) * 1000 + i * 4;
                    let data = pattern(lba, 4 * 512);
                    ok(&f.write_sync(1, lba, &data, 0));
                    assert_eq!(f.read_sync(1, lba, 4).data.unwrap(), data);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let stats = node.stop();
    assert_eq!(stats.completions, 800);
}

/// O_DIRECT volumes (where the file system allows it).
#[test]
fn direct_io_volumes() {
    let probe = tempfile::tempdir().unwrap();
    let path = probe.path().join("probe");
    std::fs::write(&path, [0; 4096]).unwrap();
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    {
        eprintln!("SKIPPED: the temporary directory refuses O_DIRECT: {e}");
        return;
    }
    let mut node = Node::start(Setup {
        direct: true,
        ..Setup::default()
    });
    for (vol, bs) in [(1_u32, 512_usize), (2, 4096)] {
        for blocks in [1, 3, 32] {
            let data = pattern(blocks as u64, bs * blocks);
            ok(&node.f().write_sync(vol, 17, &data, FLAG_FUA));
            assert_eq!(
                node.f().read_sync(vol, 17, blocks as u32).data.unwrap(),
                data
            );
        }
        zeroes_case(&mut node, vol, bs as u64, OP_WRITE_ZEROES, 0);
        zeroes_case(&mut node, vol, bs as u64, OP_DEALLOCATE, 0);
    }
    assert_eq!(node.stop().errors, 0);
}

/// Configurations the engine refuses.
#[test]
fn bad_configurations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // O_DIRECT with 4096-byte blocks on 512-byte chunks.
    let setup = Setup {
        chunk_size: 512,
        direct: true,
        volumes: vec![VolumeDef {
            id: 1,
            block_size: 4096,
            blocks: 16,
        }],
        ..Setup::default()
    };
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(dir.path().join("probe"))
        .is_ok()
    {
        let (volumes, _) = volume_files(&setup, dir.path());
        let (_, pool) = pools(&setup);
        let e = Engine::new(volumes, pool, vec![], EngineConfig::default()).unwrap_err();
        assert!(e.to_string().contains("multiple of the block size"), "{e}");
    }
    // Two channels on the same ring ids.
    let setup = Setup::default();
    let (_, pool) = pools(&setup);
    let mk = || {
        let sq = RingRegion::create("sq", 8, 1).unwrap();
        let cq = RingRegion::create("cq", 8, 2).unwrap();
        let (a, b) = ring::doorbells().unwrap();
        let (c, d) = ring::doorbells().unwrap();
        Channel::new(
            Consumer::attach(sq, a, b, 1, StartMode::Fresh).unwrap(),
            Producer::attach(cq, c, d, 1, StartMode::Fresh).unwrap(),
        )
    };
    let e = Engine::new(
        vec![],
        Arc::clone(&pool),
        vec![mk(), mk()],
        EngineConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(e, EngineError::Config(_)), "{e}");
    let e = Engine::new(
        vec![],
        pool,
        vec![],
        EngineConfig {
            queue_depth: 0,
            ..EngineConfig::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("queue depth"), "{e}");
}

/// A transfer needing more iovecs than one operation carries (`IOV_MAX`) continues in further
/// operations until the whole range moved.
#[test]
fn long_chains_continue_past_iov_max() {
    let mut node = Node::start(Setup {
        chunk_size: 64,
        chunks: 8192,
        ..Setup::default()
    });
    // 256 KiB in 64-byte chunks: 4096 iovecs, four operations each way.
    let data = pattern(3, 256 * 1024);
    ok(&node.f().write_sync(1, 100, &data, 0));
    let back = node.f().read_sync(1, 100, 512).data.unwrap();
    assert_eq!(crc(&back), crc(&data));
    assert_eq!(node.stop().errors, 0);
}

/// A read that comes back short continues; one that then makes no progress (the backing file
/// was truncated under the volume) fails: a partial transfer is never reported as success.
#[test]
fn short_reads_continue_and_no_progress_fails() {
    let mut node = Node::start(Setup::default());
    let data = pattern(8, 4 * 4096);
    ok(&node.f().write_sync(2, 2044, &data, 0));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&node.paths[1])
        .unwrap();
    file.set_len(2046 * 4096 + 100).unwrap();
    let r = node.f().read_sync(2, 2044, 4);
    assert_eq!(
        r.desc.status,
        duplex_ipc::desc::STATUS_READ_ERROR,
        "{:?}",
        r.desc
    );
    assert_eq!(
        r.desc.buf_len, 0,
        "buf_len stays as submitted (0 here) on an error"
    );
    // What is still there reads fine.
    let r = node.f().read_sync(2, 2044, 2);
    ok(&r);
    assert_eq!(r.data.unwrap(), data[..2 * 4096]);
    let stats = node.stop();
    assert!(stats.short_transfers >= 1, "{stats:?}");
    assert_eq!(stats.errors, 1);
}
