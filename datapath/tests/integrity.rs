//! End-to-end integrity on drives formatted with metadata (`duplex-drive-sim --metadata`):
//! every block written through the datapath carries a record the drive stores beside it; a
//! block whose data the drive returns changed fails its check. On a raw drive that is a media
//! error; under a mirror the read is served from the good copy and the bad copy rewritten; when
//! every copy is bad the read fails, never returning wrong data.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::sim::{raw_node, sim_drive_with_metadata, SimDrive, BS};
use common::{pattern, Node};
use duplex_datapath::bdev::{IntentSpec, MemberState, RaidLevel};
use duplex_datapath::control::PoolSpec;
use duplex_datapath::map::{Extent, VolumeMap};
use duplex_drive_sim::Fault;
use duplex_ipc::desc::{STATUS_INTEGRITY, STATUS_SUCCESS};

const DATA_OFFSET: u64 = 1 << 20;
const DATA_LEN: u64 = 8 << 20;
/// Blocks per I/O.
const IO_BLOCKS: u32 = 4;

fn payload(i: u64) -> Vec<u8> {
    pattern(i.wrapping_mul(0x9E37) + 11, (IO_BLOCKS * BS) as usize)
}

fn mirror(node: &mut Node) -> usize {
    mirror_again(node, false, 1)
}

fn mirror_again(node: &mut Node, resync: bool, seq_base: u64) -> usize {
    mirror_limited(node, resync, seq_base, 0)
}

fn mirror_limited(node: &mut Node, resync: bool, seq_base: u64, seq_limit: u64) -> usize {
    mirror_with(node, resync, seq_base, seq_limit, None)
}

/// The member LBA of volume block `b` (a one-set mirror: the data area from DATA_OFFSET).
fn member_lba(b: u64) -> u64 {
    DATA_OFFSET / u64::from(BS) + b
}

fn write_all(node: &mut Node, n: u64) {
    for i in 0..n {
        let d = node.fabric[0].write_sync(1, i * u64::from(IO_BLOCKS), &payload(i), 0);
        assert_eq!(d.desc.status, STATUS_SUCCESS, "write {i}");
    }
}

/// Reads every write back: each must be right (or, where `bad` says, fail with an integrity
/// error); returns how many failed.
fn read_all(node: &mut Node, n: u64, bad: impl Fn(u64) -> bool) -> u64 {
    let mut failed = 0;
    for i in 0..n {
        let d = node.fabric[0].read_sync(1, i * u64::from(IO_BLOCKS), IO_BLOCKS);
        if bad(i) {
            assert_eq!(d.desc.status, STATUS_INTEGRITY, "read {i} should fail");
            failed += 1;
        } else {
            assert_eq!(d.desc.status, STATUS_SUCCESS, "read {i}");
            assert!(
                d.data.as_deref() == Some(&payload(i)[..]),
                "read {i} returned wrong data"
            );
        }
    }
    failed
}

fn drive_errors(node: &Node, id: usize) -> u64 {
    let devices = node.control.devices().unwrap();
    devices
        .iter()
        .find(|d| d.index == id)
        .map(|d| d.integrity_errors)
        .unwrap()
}

#[test]
fn a_raw_drive_with_metadata_returns_a_media_error_for_a_rotten_block_never_its_data() {
    let drives: Vec<SimDrive> = (0..1).map(|_| sim_drive_with_metadata(8)).collect();
    let mut node = raw_node(&drives);
    let data = pattern(5, 8 * BS as usize);
    let d = node.fabric[1].write_sync(0, 100, &data, 0);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    let d = node.fabric[1].read_sync(0, 100, 8);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    assert!(d.data.as_deref() == Some(&data[..]));
    assert_eq!(drive_errors(&node, 0), 0);
    drives[0].drive.rot(103, 77).unwrap();
    let d = node.fabric[1].read_sync(0, 100, 8);
    assert_eq!(d.desc.status, STATUS_INTEGRITY);
    assert_eq!(drive_errors(&node, 0), 1);
    // The blocks around it are fine; a rewrite cures it.
    let d = node.fabric[1].read_sync(0, 100, 3);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    let d = node.fabric[1].write_sync(0, 103, &data[3 * BS as usize..4 * BS as usize], 0);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    let d = node.fabric[1].read_sync(0, 100, 8);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    assert!(d.data.as_deref() == Some(&data[..]));
    // Blocks never written through duplex (no record) read as they are.
    let d = node.fabric[1].read_sync(0, 3000, 2);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    let stats = node.stop();
    assert_eq!(stats.errors, 1, "{stats:?}");
}

#[test]
fn a_mirror_serves_rotten_blocks_from_the_good_copy_and_rewrites_the_bad_one() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive_with_metadata(8)).collect();
    let mut node = raw_node(&drives);
    let pool = mirror(&mut node);
    let n = 64;
    write_all(&mut node, n);
    // Rot one block of every fourth write, on alternate members, with different bits.
    let rotten: Vec<(usize, u64)> = (0..n)
        .step_by(4)
        .map(|i| ((i / 4 % 2) as usize, i * u64::from(IO_BLOCKS) + i % 4))
        .collect();
    for &(m, b) in &rotten {
        drives[m]
            .drive
            .rot(member_lba(b), (b * 131) as u32)
            .unwrap();
    }
    // Every read returns the right data, twice over: reads alternate between the copies, and
    // the extra read in between makes the second pass read each write from the other copy.
    assert_eq!(read_all(&mut node, n, |_| false), 0);
    assert_eq!(read_all(&mut node, 1, |_| false), 0);
    assert_eq!(read_all(&mut node, n, |_| false), 0);
    let status = node.control.status().unwrap();
    let me = status.iter().find(|d| d.index == pool).unwrap();
    assert_eq!(
        me.members,
        vec![MemberState::Active, MemberState::Active],
        "no member failed"
    );
    let found = drive_errors(&node, 0) + drive_errors(&node, 1);
    // Each rotten block was met once: it was rewritten when first met.
    assert_eq!(found, rotten.len() as u64);
    assert_eq!(me.integrity.recovered, found, "{:?}", me.integrity);
    assert_eq!(me.integrity.healed, found, "{:?}", me.integrity);
    assert_eq!(me.integrity.unrecoverable, 0);
    // The bad copies were rewritten: read straight from the member, each holds the data.
    for &(m, b) in &rotten {
        let d = node.fabric[1].read_sync(m as u32, member_lba(b), 1);
        assert_eq!(d.desc.status, STATUS_SUCCESS, "member {m} block {b}");
        let i = b / u64::from(IO_BLOCKS);
        let within = (b % u64::from(IO_BLOCKS)) as usize * BS as usize;
        assert!(
            d.data.as_deref() == Some(&payload(i)[within..within + BS as usize]),
            "member {m} block {b} was not rewritten"
        );
    }
    assert_eq!(drive_errors(&node, 0) + drive_errors(&node, 1), found);
    let stats = node.stop();
    assert_eq!(stats.errors, 0, "{stats:?}");
}

#[test]
fn a_block_bad_on_every_copy_fails_the_read_and_the_rest_reads_right() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive_with_metadata(64)).collect();
    let mut node = raw_node(&drives);
    let pool = mirror(&mut node);
    let n = 16;
    write_all(&mut node, n);
    // Write 5's first block rots on both members.
    let b = 5 * u64::from(IO_BLOCKS);
    drives[0].drive.rot(member_lba(b), 1).unwrap();
    drives[1].drive.rot(member_lba(b), 2).unwrap();
    assert_eq!(read_all(&mut node, n, |i| i == 5), 1);
    let status = node.control.status().unwrap();
    let me = status.iter().find(|d| d.index == pool).unwrap();
    assert_eq!(me.integrity.unrecoverable, 1, "{:?}", me.integrity);
    assert_eq!(me.members, vec![MemberState::Active, MemberState::Active]);
    // The host rewrites it: both copies take the new data and it reads again.
    write_all(&mut node, n);
    assert_eq!(read_all(&mut node, n, |_| false), 0);
    let _ = drives;
    node.stop();
}

/// A mirror over two drives with metadata, `n` writes on it, and member 1 flipping bit `bit`
/// of every block it reads: the drives (kept alive), the node and the pool's device.
fn mirror_with_a_flipping_member(n: u64, bit: u32) -> (Vec<SimDrive>, Node, usize) {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive_with_metadata(8)).collect();
    let mut node = raw_node(&drives);
    let pool = mirror(&mut node);
    write_all(&mut node, n);
    drives[1].drive.inject(Fault::BitFlip {
        first_lba: 0,
        last_lba: u64::MAX,
        bit,
    });
    (drives, node, pool)
}

#[test]
fn bit_flips_on_every_read_of_one_member_never_reach_the_host() {
    let n = 32;
    let (_drives, mut node, pool) = mirror_with_a_flipping_member(n, 4242);
    for _ in 0..3 {
        assert_eq!(read_all(&mut node, n, |_| false), 0);
    }
    assert!(drive_errors(&node, 1) > 0);
    assert_eq!(drive_errors(&node, 0), 0);
    let status = node.control.status().unwrap();
    let me = status.iter().find(|d| d.index == pool).unwrap();
    assert!(me.integrity.recovered > 0, "{:?}", me.integrity);
    assert_eq!(me.integrity.unrecoverable, 0);
    assert_eq!(me.members, vec![MemberState::Active, MemberState::Active]);
    node.stop();
}

/// A member whose every read fails its check is failed once it passes
/// `MAX_BAD_READS` in an hour (the ordinary member failure: an event, the pool degraded);
/// every read before and after returns the right data, and no more reads go to it.
#[test]
fn a_member_failing_every_reads_check_is_failed_past_the_limit() {
    use duplex_datapath::bdev::MAX_BAD_READS;
    let n = 32;
    let (_drives, mut node, pool) = mirror_with_a_flipping_member(n, 99);
    let state = |node: &Node| {
        let st = node.control.status().unwrap();
        let me = st.iter().find(|d| d.index == pool).unwrap().clone();
        (me.members.clone(), me.integrity)
    };
    let mut rounds = 0;
    loop {
        assert_eq!(read_all(&mut node, n, |_| false), 0);
        rounds += 1;
        let (members, counts) = state(&node);
        if members[1] == MemberState::Failed {
            assert_eq!(
                counts.bad_reads,
                u64::from(MAX_BAD_READS) + 1,
                "failed at the read past the limit: {counts:?}"
            );
            break;
        }
        assert!(
            counts.bad_reads <= u64::from(MAX_BAD_READS),
            "past the limit and not failed: {counts:?}"
        );
        assert!(rounds < 100, "never failed: {counts:?}");
    }
    assert_eq!(state(&node).0[0], MemberState::Active);
    // No read goes to it any more: the count stays.
    let before = state(&node).1.bad_reads;
    for _ in 0..3 {
        assert_eq!(read_all(&mut node, n, |_| false), 0);
    }
    assert_eq!(state(&node).1.bad_reads, before);
    assert_eq!(state(&node).1.unrecoverable, 0);
    node.stop();
}

/// Scrubs pool `pool` to the end; returns what it found.
fn scrub(node: &Node, pool: usize) -> duplex_datapath::bdev::ScrubStatus {
    let ctl = node.control.clone();
    ctl.scrub(pool).unwrap();
    let mut last = Default::default();
    common::wait_until("the scrub to finish", || {
        let st = ctl.status().unwrap();
        last = st
            .iter()
            .find(|d| d.index == pool)
            .and_then(|d| d.scrub)
            .unwrap_or_default();
        last.total > 0 && last.done >= last.total
    });
    last
}

#[test]
fn a_mirror_scrub_rewrites_bad_copies_and_reports_blocks_with_no_good_copy() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive_with_metadata(8)).collect();
    let mut node = raw_node(&drives);
    let pool = mirror(&mut node);
    let n = 256;
    write_all(&mut node, n);
    // A healthy pool: nothing found, every byte checked.
    let found = scrub(&node, pool);
    assert_eq!(
        (found.mismatches, found.repaired, found.skipped),
        (0, 0, 0),
        "{found:?}"
    );
    assert_eq!(found.done, DATA_LEN);
    // Ten blocks rot on one copy or the other; one on both.
    let rotten: Vec<(usize, u64)> = (0..10u64).map(|k| ((k % 2) as usize, k * 97 + 3)).collect();
    for &(m, b) in &rotten {
        drives[m].drive.rot(member_lba(b), (b * 7) as u32).unwrap();
    }
    let lost = 555;
    drives[0].drive.rot(member_lba(lost), 9).unwrap();
    drives[1].drive.rot(member_lba(lost), 10).unwrap();
    let found = scrub(&node, pool);
    assert_eq!(found.mismatches, rotten.len() as u64, "{found:?}");
    assert_eq!(found.repaired, rotten.len() as u64, "{found:?}");
    assert_eq!(found.skipped, 1, "{found:?}");
    let status = node.control.status().unwrap();
    let me = status.iter().find(|d| d.index == pool).unwrap();
    assert_eq!(me.integrity.unrecoverable, 1, "{:?}", me.integrity);
    assert_eq!(me.members, vec![MemberState::Active, MemberState::Active]);
    // The repaired copies hold the data again, read straight from their member.
    for &(m, b) in &rotten {
        let d = node.fabric[1].read_sync(m as u32, member_lba(b), 1);
        assert_eq!(d.desc.status, STATUS_SUCCESS, "member {m} block {b}");
        let i = b / u64::from(IO_BLOCKS);
        let within = (b % u64::from(IO_BLOCKS)) as usize * BS as usize;
        assert!(d.data.as_deref() == Some(&payload(i)[within..within + BS as usize]));
    }
    // Everything reads right but the lost block's write, which fails.
    let lost_write = lost / u64::from(IO_BLOCKS);
    assert_eq!(read_all(&mut node, n, |i| i == lost_write), 1);
    // A second scrub finds only the block with no good copy.
    let found = scrub(&node, pool);
    assert_eq!(
        (found.mismatches, found.repaired, found.skipped),
        (0, 0, 1),
        "{found:?}"
    );
    // A block written behind the pool's back on one copy (a raw write, with a record) and
    // never on the other (no record): the copy with a record is the newest, and is copied.
    let spot = member_lba(DATA_LEN / u64::from(BS) - 1);
    let d = node.fabric[1].write_sync(1, spot, &pattern(77, BS as usize), 0);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    let found = scrub(&node, pool);
    assert_eq!(
        (found.mismatches, found.repaired, found.skipped),
        (1, 1, 1),
        "{found:?}"
    );
    let d = node.fabric[1].read_sync(0, spot, 1);
    assert!(d.data.as_deref() == Some(&pattern(77, BS as usize)[..]));
    node.stop();
}

/// Pool 0, a mirror over raw drives 0 and 1, and volume 1 over all of it, published (again, on
/// a fresh engine: an import) with `resync`, the first write sequence number and the committed
/// mark as the control plane would give them.
fn mirror_with(
    node: &mut Node,
    resync: bool,
    seq_base: u64,
    seq_limit: u64,
    bitmap: Option<IntentSpec>,
) -> usize {
    mirror_as(node, resync, seq_base, seq_limit, bitmap, |_| {})
}

/// [`mirror_with`], with the pool's spec changed by `tweak` before it is published.
fn mirror_as(
    node: &mut Node,
    resync: bool,
    seq_base: u64,
    seq_limit: u64,
    bitmap: Option<IntentSpec>,
    tweak: impl FnOnce(&mut PoolSpec),
) -> usize {
    let ctl = node.control.clone();
    let mut spec = PoolSpec {
        name: "pool0".into(),
        level: RaidLevel::Raid1,
        chunk: 64 << 10,
        data_offset: DATA_OFFSET,
        data_len: DATA_LEN,
        drives: vec![0, 1],
        states: vec![],
        hold_until_recorded: false,
        journal: None,
        seq_base,
        resync,
        seq_limit,
        bitmap,
        resync_members: 0,
        checksum: None,
    };
    tweak(&mut spec);
    let pool = ctl.publish_pool(1, spec).unwrap();
    let blocks = DATA_LEN / u64::from(BS);
    ctl.publish_volumes(
        1,
        vec![VolumeMap {
            id: 1,
            name: "vol1".into(),
            block_size: BS,
            blocks,
            extents: vec![Extent {
                start: 0,
                blocks,
                device: pool,
                device_offset: 0,
            }],
        }],
    )
    .unwrap();
    node.fabric[0].block_sizes.insert(1, BS);
    pool
}

/// Waits for the resync of `pool` to reach its end; its figures then.
fn resync_finished(node: &Node, pool: usize) -> duplex_datapath::bdev::ScrubStatus {
    let mut last = Default::default();
    common::wait_until("the resync to finish", || {
        last = node
            .control
            .status()
            .unwrap()
            .iter()
            .find(|d| d.index == pool)
            .and_then(|d| d.scrub)
            .unwrap_or_default();
        last.total > 0 && last.done >= last.total
    });
    last
}

fn payload2(i: u64) -> Vec<u8> {
    pattern(i.wrapping_mul(0x51ED) + 99, (IO_BLOCKS * BS) as usize)
}

/// Reads every write back; returns how many returned the older generation (`newer(i)`: the
/// write was overwritten with generation 2). Anything else is wrong data and fails the test.
fn count_stale(node: &mut Node, n: u64, newer: impl Fn(u64) -> bool) -> u64 {
    let mut stale = 0;
    for i in 0..n {
        let d = node.fabric[0].read_sync(1, i * u64::from(IO_BLOCKS), IO_BLOCKS);
        assert_eq!(d.desc.status, STATUS_SUCCESS, "read {i}");
        let got = d.data.unwrap();
        let want = if newer(i) { payload2(i) } else { payload(i) };
        if got != want {
            assert!(
                newer(i) && got == payload(i),
                "read {i}: neither generation"
            );
            stale += 1;
        }
    }
    stale
}

#[test]
fn after_a_lying_flush_and_a_power_cut_a_resync_picks_the_newer_copy_by_sequence() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive_with_metadata(8)).collect();
    let n = 96;
    let newer = |i: u64| i % 3 == 1;
    {
        let mut node = raw_node(&drives);
        mirror(&mut node);
        write_all(&mut node, n);
        assert_eq!(flush(&mut node), STATUS_SUCCESS);
        // Drive 1 starts lying about flushes: what it is told is durable stays in its cache.
        drives[1].drive.inject(Fault::LyingFlush);
        for i in (0..n).filter(|&i| newer(i)) {
            let d = node.fabric[0].write_sync(1, i * u64::from(IO_BLOCKS), &payload2(i), 0);
            assert_eq!(d.desc.status, STATUS_SUCCESS);
        }
        assert_eq!(flush(&mut node), STATUS_SUCCESS, "acknowledged: durable");
        node.stop();
    }
    for d in &drives {
        d.drive.power_cut();
        d.drive.clear_faults();
        d.drive.power_on();
    }
    // Without a resync the stale copies reach the host: the reads alternate between the
    // copies, and drive 1's old blocks carry valid records of their own.
    {
        let mut node = raw_node(&drives);
        mirror_again(&mut node, false, 1 << 20);
        let stale = count_stale(&mut node, n, newer);
        assert!(
            stale > 0,
            "the lying flush lost nothing: the test proves nothing"
        );
        node.stop();
    }
    // With a resync (as an import does), every read returns the newest data: the reads wait
    // for their windows, the copies are compared by their records' sequence numbers.
    let mut node = raw_node(&drives);
    let pool = mirror_again(&mut node, true, 1 << 21);
    assert_eq!(
        count_stale(&mut node, n, newer),
        0,
        "stale data reached the host"
    );
    let last = resync_finished(&node, pool);
    let overwritten = (0..n).filter(|&i| newer(i)).count() as u64 * u64::from(IO_BLOCKS);
    assert_eq!(last.mismatches, overwritten, "{last:?}");
    assert_eq!(last.repaired, overwritten, "{last:?}");
    assert_eq!(last.skipped, 0, "{last:?}");
    // Drive 1 holds the newest data itself now: read straight from it.
    for i in (0..n).filter(|&i| newer(i)) {
        let d = node.fabric[1].read_sync(1, member_lba(i * u64::from(IO_BLOCKS)), IO_BLOCKS);
        assert_eq!(d.desc.status, STATUS_SUCCESS);
        assert!(
            d.data.as_deref() == Some(&payload2(i)[..]),
            "write {i} on drive 1"
        );
    }
    // Writes after the import carry newer sequence numbers than anything before.
    write_all(&mut node, 8);
    assert_eq!(read_all(&mut node, 8, |_| false), 0);
    node.stop();
}

fn flush(node: &mut Node) -> u16 {
    let d = node.fabric[0].call(
        duplex_ipc::desc::IoDesc {
            opcode: duplex_ipc::desc::OP_FLUSH,
            volume: 1,
            ..Default::default()
        },
        0,
        &[],
    );
    d.desc.status
}

/// The write sequence number (low 32 bits) in the integrity record of member LBA `lba`.
fn record_seq(drive: &SimDrive, lba: u64) -> u32 {
    let md = drive.drive.metadata(lba, 1).unwrap();
    u32::from_be_bytes(md[0..4].try_into().unwrap())
}

/// Writes on both drives so far (their drive-wide write sequence).
fn drive_writes(drives: &[SimDrive]) -> u64 {
    drives.iter().map(|d| d.drive.port_writes().0).sum()
}

#[test]
fn writes_wait_at_the_committed_write_sequence_mark_until_a_higher_one_is_published() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive_with_metadata(8)).collect();
    let mut node = raw_node(&drives);
    let (base, mark) = (1000, 1008);
    let pool = mirror_limited(&mut node, false, base, mark);
    let headroom = |node: &Node| {
        node.control
            .devices()
            .unwrap()
            .iter()
            .find(|d| d.index == pool)
            .and_then(|d| d.seq_headroom)
    };
    assert_eq!(headroom(&node), Some(mark - base));
    write_all(&mut node, mark - base);
    assert_eq!(headroom(&node), Some(0));
    for i in 0..mark - base {
        for d in &drives {
            let seq = record_seq(d, member_lba(i * u64::from(IO_BLOCKS)));
            assert_eq!(
                u64::from(seq),
                base + i,
                "write {i}: numbered from the base"
            );
        }
    }
    // The next write waits: a read submitted after it completes first, and neither drive
    // sees the write.
    let before = drive_writes(&drives);
    let i = mark - base;
    let w = node.fabric[0].write(1, i * u64::from(IO_BLOCKS), &payload(i), 0);
    let r = node.fabric[0].read(1, 0, IO_BLOCKS);
    let done = node.fabric[0].collect(1);
    assert!(done.contains_key(&r), "the write past the mark completed");
    assert_eq!(done[&r].desc.status, STATUS_SUCCESS);
    assert_eq!(
        drive_writes(&drives),
        before,
        "a write past the mark reached a drive"
    );
    // A higher mark published for the same pool: the same device, and the write goes on with
    // the mark's number.
    assert_eq!(mirror_limited(&mut node, false, base, mark + 100), pool);
    let done = node.fabric[0].collect(1);
    assert_eq!(done[&w].desc.status, STATUS_SUCCESS);
    for d in &drives {
        assert_eq!(
            u64::from(record_seq(d, member_lba(i * u64::from(IO_BLOCKS)))),
            mark
        );
    }
    assert_eq!(headroom(&node), Some(99));
    // A lower mark published later does not lower it.
    mirror_limited(&mut node, false, base, mark + 10);
    assert_eq!(headroom(&node), Some(99));
    assert_eq!(read_all(&mut node, i + 1, |_| false), 0);
    node.stop();
}

/// The write-intent bitmap's area in these tests: after the data area, 1 MiB.
const BITMAP: IntentSpec = IntentSpec {
    offset: DATA_OFFSET + DATA_LEN + (1 << 20),
    len: 1 << 20,
    tag: 0x77,
};

/// The write-intent bitmap bounds a resync. Writes mark their 1 MiB regions on both members
/// before they go (the block on the media says which); a member lies about flushes and the
/// power is cut; the resync after it compares only the marked regions — every stale copy is
/// in one of them and is repaired, the host never reads stale data — and skips the rest.
#[test]
fn a_resync_compares_only_the_regions_the_write_intent_bitmap_marks() {
    use duplex_datapath::bdev::intent;
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive_with_metadata(8)).collect();
    let n = 96;
    let newer = |i: u64| i % 3 == 1;
    // Region 5 (5 MiB into the data area) is written too, once.
    let far = (5 << 20) / u64::from(BS);
    let region = intent::region_size(DATA_LEN);
    assert_eq!(region, 1 << 20);
    {
        let mut node = raw_node(&drives);
        mirror_with(&mut node, false, 1, 0, Some(BITMAP));
        write_all(&mut node, n);
        let d = node.fabric[0].write_sync(1, far, &payload(1000), 0);
        assert_eq!(d.desc.status, STATUS_SUCCESS);
        assert_eq!(flush(&mut node), STATUS_SUCCESS);
        drives[1].drive.inject(Fault::LyingFlush);
        for i in (0..n).filter(|&i| newer(i)) {
            let d = node.fabric[0].write_sync(1, i * u64::from(IO_BLOCKS), &payload2(i), 0);
            assert_eq!(d.desc.status, STATUS_SUCCESS);
        }
        assert_eq!(flush(&mut node), STATUS_SUCCESS);
        node.stop();
    }
    // On the honest member's medium: the block marks regions 0 and 1 (the writes' 1.5 MiB)
    // and 5, nothing else.
    let block = drives[0]
        .drive
        .read_medium(BITMAP.offset / u64::from(BS), 1)
        .unwrap();
    let regions = (DATA_LEN / region) as usize;
    let bits = intent::decode(&block, BITMAP.tag, region, regions).expect("a valid block");
    let marked: Vec<usize> = (0..regions).filter(|&r| bits[r]).collect();
    assert_eq!(marked, vec![0, 1, 5]);
    for d in &drives {
        d.drive.power_cut();
        d.drive.clear_faults();
        d.drive.power_on();
    }
    let mut node = raw_node(&drives);
    let pool = mirror_with(&mut node, true, 1 << 21, 0, Some(BITMAP));
    assert_eq!(
        count_stale(&mut node, n, newer),
        0,
        "stale data reached the host"
    );
    let last = resync_finished(&node, pool);
    let overwritten = (0..n).filter(|&i| newer(i)).count() as u64 * u64::from(IO_BLOCKS);
    assert_eq!(last.mismatches, overwritten, "{last:?}");
    assert_eq!(last.repaired, overwritten, "{last:?}");
    assert_eq!(
        last.clean,
        5 * region,
        "five clean regions skipped: {last:?}"
    );
    let d = node.fabric[0].read_sync(1, far, IO_BLOCKS);
    assert!(d.data.as_deref() == Some(&payload(1000)[..]));
    node.stop();
}

/// A member that failed and came back is resynced from the write-intent bitmap: marks are not
/// cleared while a member is out, so the regions written before it failed (not yet cleared)
/// and while it was out are copied to it and nothing else. Plain drives (no integrity
/// records): the bitmap does not need them.
#[test]
fn a_member_that_came_back_gets_only_the_regions_the_bitmap_marked_while_it_was_out() {
    use common::sim::{lose, restore, sim_drive, Loss};
    use duplex_datapath::bdev::intent;
    let mut drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let region = intent::region_size(DATA_LEN);
    assert_eq!(region, 1 << 20);
    let blocks_per_region = region / u64::from(BS);
    let far = 5 * blocks_per_region;
    let n = 96; // regions 0 and 1
    {
        let mut node = raw_node(&drives);
        mirror_with(&mut node, false, 1, 0, Some(BITMAP));
        write_all(&mut node, n);
        assert_eq!(flush(&mut node), STATUS_SUCCESS);
        // Member 1 is pulled; the writes from here on miss it.
        lose(&mut drives[1], Loss::Pull);
        for i in 0..8 {
            let d = node.fabric[0].write_sync(1, i * u64::from(IO_BLOCKS), &payload2(i), 0);
            assert_eq!(d.desc.status, STATUS_SUCCESS, "degraded write {i}");
        }
        let d = node.fabric[0].write_sync(1, far, &payload(1000), 0);
        assert_eq!(d.desc.status, STATUS_SUCCESS);
        assert_eq!(flush(&mut node), STATUS_SUCCESS);
        let st = node.control.status().unwrap();
        assert_eq!(st[0].members[1], MemberState::Failed, "{st:?}");
        node.stop();
    }
    // The surviving member's block marks regions 0, 1 (before the pull, not cleared yet)
    // and 5 (while member 1 was out).
    let regions = (DATA_LEN / region) as usize;
    let block = drives[0]
        .drive
        .read_medium(BITMAP.offset / u64::from(BS), 1)
        .unwrap();
    let bits = intent::decode(&block, BITMAP.tag, region, regions).expect("a valid block");
    // Region 1 may have been cleared before the pull (idle 5 s on a slow machine: both copies
    // then held it); 0 and 5 were written while member 1 was out and stay marked.
    let marked: Vec<usize> = (0..regions).filter(|&r| bits[r]).collect();
    assert!(
        marked == vec![0, 1, 5] || marked == vec![0, 5],
        "{marked:?}"
    );
    // The same block read at the byte offsets docs/ONDISK.md gives ("Write-intent bitmap"),
    // not through the decoder.
    assert_eq!(&block[0..8], b"DPXWIB02");
    assert_eq!(
        u64::from_le_bytes(block[8..16].try_into().unwrap()),
        BITMAP.tag
    );
    assert_eq!(
        u64::from_le_bytes(block[16..24].try_into().unwrap()),
        1 << 20
    );
    assert_eq!(u32::from_le_bytes(block[24..28].try_into().unwrap()), 8);
    let mut zeroed = block[..4096].to_vec();
    zeroed[28..32].fill(0);
    assert_eq!(
        u32::from_le_bytes(block[28..32].try_into().unwrap()),
        crc32c::crc32c(&zeroed)
    );
    assert_eq!(
        block[32] | 0b10,
        0b0010_0011,
        "regions 0, (1) and 5, least significant bit first"
    );
    assert!(block[33..4096].iter().all(|&b| b == 0));
    restore(&mut drives[1], Loss::Pull);
    let mut node = raw_node(&drives);
    // A marker in clean region 3 of member 1 only (written on the raw drive): a region the
    // bitmap does not mark is never copied, so it stays (on a real member both copies agree
    // there; here it shows what the rebuild touched).
    let marker_lba = member_lba(3 * blocks_per_region);
    let d = node.fabric[1].write_sync(1, marker_lba, &payload(3000), 0);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    // The import: member 1 came back, rebuilding from 0, from the marked regions only.
    let pool = mirror_as(&mut node, true, 1 << 21, 0, Some(BITMAP), |s| {
        s.states = vec![MemberState::Active, MemberState::Rebuilding { done: 0 }];
        s.resync_members = 0b10;
    });
    common::wait_until("the member to be rebuilt", || {
        let st = node.control.status().unwrap();
        st.iter()
            .find(|d| d.index == pool)
            .is_some_and(|d| d.members.iter().all(|m| *m == MemberState::Active))
    });
    let d = node.fabric[1].read_sync(1, marker_lba, IO_BLOCKS);
    assert!(
        d.data.as_deref() == Some(&payload(3000)[..]),
        "a clean region was copied"
    );
    // Member 1 now holds what it missed: with member 0 pulled, every write reads back.
    lose(&mut drives[0], Loss::Pull);
    for i in 0..n {
        let want = if i < 8 { payload2(i) } else { payload(i) };
        let d = node.fabric[0].read_sync(1, i * u64::from(IO_BLOCKS), IO_BLOCKS);
        assert_eq!(d.desc.status, STATUS_SUCCESS, "read {i}");
        assert!(d.data.as_deref() == Some(&want[..]), "read {i}: wrong data");
    }
    let d = node.fabric[0].read_sync(1, far, IO_BLOCKS);
    assert!(d.data.as_deref() == Some(&payload(1000)[..]), "region 5");
    let st = node.control.status().unwrap();
    assert_eq!(
        st.iter().find(|d| d.index == pool).unwrap().members[1],
        MemberState::Active
    );
    node.stop();
}

/// The bitmap's block write failing on a member fails that member (it cannot record what it
/// is about to miss); the write that waited for the block goes on the other copy, and the
/// block on that copy marks the write's region.
#[test]
fn a_member_failing_the_bitmap_block_write_is_failed_and_the_write_goes_on() {
    use common::sim::sim_drive;
    use duplex_datapath::bdev::intent;
    use duplex_drive_sim::FaultOp;
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    let pool = mirror_with(&mut node, false, 1, 0, Some(BITMAP));
    let bitmap_lba = BITMAP.offset / u64::from(BS);
    drives[1].drive.inject(Fault::Error {
        op: FaultOp::Write,
        first_lba: bitmap_lba,
        last_lba: bitmap_lba,
        status: 0x0280,
        dnr: true,
        remaining: None,
    });
    let d = node.fabric[0].write_sync(1, 0, &payload(7), 0);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    let st = node.control.status().unwrap();
    let me = st.iter().find(|d| d.index == pool).unwrap();
    assert_eq!(me.members, vec![MemberState::Active, MemberState::Failed]);
    let d = node.fabric[0].read_sync(1, 0, IO_BLOCKS);
    assert!(d.data.as_deref() == Some(&payload(7)[..]));
    let block = drives[0].drive.read_medium(bitmap_lba, 1).unwrap();
    let region = intent::region_size(DATA_LEN);
    let bits = intent::decode(&block, BITMAP.tag, region, (DATA_LEN / region) as usize)
        .expect("the surviving copy's block");
    assert!(bits[0], "region 0 marked on the surviving copy");
    // The write never reached the failed member.
    let first = member_lba(0);
    let raw = drives[1].drive.read_medium(first, 1).unwrap();
    assert!(raw.iter().all(|&b| b == 0), "the failed member was written");
    node.stop();
}

/// A three-way mirror rebuilds a replaced member while one of the two sources has a rotten
/// block: the rebuild's read of that window fails its check and is taken from the other
/// source; the rebuilt member then serves everything alone, right.
#[test]
fn a_rebuild_reads_a_rotten_window_from_another_copy() {
    use common::sim::{lose, Loss};
    let mut drives: Vec<SimDrive> = (0..4).map(|_| sim_drive_with_metadata(8)).collect();
    let mut node = raw_node(&drives);
    let pool = mirror_as(&mut node, false, 1, 0, None, |s| {
        s.drives = vec![0, 1, 2];
    });
    let n = 64;
    write_all(&mut node, n);
    lose(&mut drives[1], Loss::Pull);
    // The next write fails member 1.
    let d = node.fabric[0].write_sync(1, 0, &payload(0), 0);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    let st = node.control.status().unwrap();
    assert_eq!(
        st.iter().find(|d| d.index == pool).unwrap().members[1],
        MemberState::Failed
    );
    // Rot in the first window of source member 0.
    drives[0].drive.rot(member_lba(3), 17).unwrap();
    node.control.replace_member(pool, 1, 3, 0).unwrap();
    common::wait_until("the member to be rebuilt", || {
        let st = node.control.status().unwrap();
        st.iter()
            .find(|d| d.index == pool)
            .is_some_and(|d| d.members.iter().all(|m| *m == MemberState::Active))
    });
    lose(&mut drives[0], Loss::Pull);
    lose(&mut drives[2], Loss::Pull);
    assert_eq!(read_all(&mut node, n, |_| false), 0);
    node.stop();
}

/// RAID 10 with a bitmap: writes that cross chunk boundaries inside a row and across rows
/// (the pieces' set offsets go back to the row's start at each chunk) mark their regions and
/// read back; the block on every member marks the regions written and no others.
#[test]
fn raid10_writes_across_chunks_mark_their_regions() {
    use common::sim::sim_drive;
    use duplex_datapath::bdev::intent;
    let drives: Vec<SimDrive> = (0..4).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    mirror_as(&mut node, false, 1, 0, Some(BITMAP), |s| {
        s.level = RaidLevel::Raid10;
        s.drives = vec![0, 1, 2, 3];
    });
    let bs = u64::from(BS);
    let chunk_blocks = (64 << 10) / bs;
    // 8 KiB over the first chunk boundary (set 0 then set 1, same row); 1 MiB + 8 KiB from
    // just before the end of row 7 (set offsets 448 KiB .. about 1 MiB: regions 0 and 1 of
    // both sets); one block in set 1's region 3 (row 48: set offset 3 MiB).
    let writes: Vec<(u64, usize)> = vec![
        (chunk_blocks - 1, 2),
        (16 * chunk_blocks - 1, 258),
        (97 * chunk_blocks, 1),
    ];
    for (k, &(lba, n)) in writes.iter().enumerate() {
        let data = pattern(500 + k as u64, n * BS as usize);
        let d = node.fabric[0].write_sync(1, lba, &data, 0);
        assert_eq!(d.desc.status, STATUS_SUCCESS, "write {k}");
        let d = node.fabric[0].read_sync(1, lba, n as u32);
        assert!(d.data.as_deref() == Some(&data[..]), "write {k} read back");
    }
    // Every member's data area is DATA_LEN bytes (the device twice that).
    let region = intent::region_size(DATA_LEN);
    let regions = DATA_LEN.div_ceil(region) as usize;
    for (m, d) in drives.iter().enumerate() {
        let block = d.drive.read_medium(BITMAP.offset / bs, 1).unwrap();
        let bits = intent::decode(&block, BITMAP.tag, region, regions).expect("a valid block");
        let marked: Vec<usize> = (0..regions).filter(|&r| bits[r]).collect();
        assert_eq!(marked, vec![0, 1, 3], "member {m}");
    }
    node.stop();
}
