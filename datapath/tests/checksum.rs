//! Integrity records in a checksum area, for drives whose LBA format has no metadata
//! (`ChecksumBdev`, ONDISK "Checksum area"): every block of the pool's data area on a member has
//! a 16-byte entry (two records) in an area of the same drive. Checked on every read; a mirror
//! serves a rotten block from the good copy and rewrites the bad one; a block bad on every copy
//! is a media error, never wrong data; a power cut between an entry write and its data write
//! leaves every block readable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::sim::{raw_node, sim_drive, SimDrive, BS};
use common::{pattern, Node};
use duplex_datapath::bdev::{checksum_area_len, MemberState, RaidLevel};
use duplex_datapath::control::{ChecksumSpec, PoolSpec};
use duplex_datapath::map::{Extent, VolumeMap};
use duplex_ipc::desc::{STATUS_INTEGRITY, STATUS_SUCCESS};

const DATA_OFFSET: u64 = 1 << 20;
const DATA_LEN: u64 = 8 << 20;
/// The checksum area: right after the data area.
const AREA: u64 = DATA_OFFSET + DATA_LEN;
/// Blocks per I/O.
const IO_BLOCKS: u32 = 4;

fn payload(generation: u64, i: u64) -> Vec<u8> {
    pattern(
        i.wrapping_mul(0x9E37) + generation * 0x1_0000 + 11,
        (IO_BLOCKS * BS) as usize,
    )
}

fn member_lba(b: u64) -> u64 {
    DATA_OFFSET / u64::from(BS) + b
}

/// Pool 0 over raw drives `drives` at `level` with a checksum area, and volume 1 over it.
fn pool(node: &mut Node, level: RaidLevel, drives: Vec<u32>, seq_base: u64) -> usize {
    let ctl = node.control.clone();
    let spec = PoolSpec {
        name: "pool0".into(),
        level,
        chunk: 64 << 10,
        data_offset: DATA_OFFSET,
        data_len: DATA_LEN,
        drives,
        states: vec![],
        hold_until_recorded: false,
        journal: None,
        seq_base,
        resync: false,
        seq_limit: 0,
        bitmap: None,
        resync_members: 0,
        checksum: Some(ChecksumSpec {
            offset: AREA,
            len: checksum_area_len(DATA_LEN, BS),
        }),
    };
    let pool = ctl.publish_pool(1, spec).unwrap();
    map_volume(node, pool);
    pool
}

/// Volume 1 over the whole of pool device `pool`.
fn map_volume(node: &mut Node, pool: usize) {
    let ctl = node.control.clone();
    let status = ctl.status().unwrap();
    let size = status.iter().find(|d| d.index == pool).unwrap().size;
    let blocks = size / u64::from(BS);
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
}

fn mirror(node: &mut Node, seq_base: u64) -> usize {
    pool(node, RaidLevel::Raid1, vec![0, 1], seq_base)
}

fn write_all(node: &mut Node, generation: u64, n: u64) {
    for i in 0..n {
        let d = node.fabric[0].write_sync(1, i * u64::from(IO_BLOCKS), &payload(generation, i), 0);
        assert_eq!(d.desc.status, STATUS_SUCCESS, "write {i}");
    }
}

/// Reads every write back: each must hold generation `generation` (or, where `bad` says, fail
/// with an integrity error); returns how many failed.
fn read_all(node: &mut Node, generation: u64, n: u64, bad: impl Fn(u64) -> bool) -> u64 {
    let mut failed = 0;
    for i in 0..n {
        let d = node.fabric[0].read_sync(1, i * u64::from(IO_BLOCKS), IO_BLOCKS);
        if bad(i) {
            assert_eq!(d.desc.status, STATUS_INTEGRITY, "read {i} should fail");
            failed += 1;
        } else {
            assert_eq!(d.desc.status, STATUS_SUCCESS, "read {i}");
            assert!(
                d.data.as_deref() == Some(&payload(generation, i)[..]),
                "read {i} returned wrong data"
            );
        }
    }
    failed
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

fn drive_errors(node: &Node, id: usize) -> u64 {
    let devices = node.control.devices().unwrap();
    devices
        .iter()
        .find(|d| d.index == id)
        .map(|d| d.integrity_errors)
        .unwrap()
}

/// The entry of data-area block `b` on the medium of `drive`.
fn entry_on_medium(drive: &SimDrive, b: u64) -> [u8; 16] {
    let at = AREA + 16 * b;
    let lba = at / u64::from(BS);
    let block = drive.drive.read_medium(lba, 1).unwrap();
    let within = (at % u64::from(BS)) as usize;
    block[within..within + 16].try_into().unwrap()
}

/// ONDISK's record, computed here from the specification's words: `seq32` big endian, then
/// CRC-32C over "DPX1", the drive LBA (u64 little endian), `seq32` (little endian) and the data.
fn record(lba: u64, seq32: u32, data: &[u8]) -> [u8; 8] {
    let mut bytes = b"DPX1".to_vec();
    bytes.extend_from_slice(&lba.to_le_bytes());
    bytes.extend_from_slice(&seq32.to_le_bytes());
    bytes.extend_from_slice(data);
    let crc = crc32c::crc32c(&bytes);
    let mut r = [0u8; 8];
    r[..4].copy_from_slice(&seq32.to_be_bytes());
    r[4..].copy_from_slice(&crc.to_be_bytes());
    r
}

#[test]
fn entries_reach_the_medium_before_their_data_at_the_specified_offsets() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    mirror(&mut node, 1000);
    write_all(&mut node, 1, 4);
    write_all(&mut node, 2, 2);
    for d in &drives {
        for b in 0..4 * u64::from(IO_BLOCKS) {
            let e = entry_on_medium(d, b);
            let i = b / u64::from(IO_BLOCKS);
            let within = (b % u64::from(IO_BLOCKS)) as usize * BS as usize;
            let data = |g| payload(g, i)[within..within + BS as usize].to_vec();
            let seq0 = u32::from_be_bytes(e[0..4].try_into().unwrap());
            assert!(seq0 >= 1000, "block {b}: slot 0 seq {seq0}");
            if i < 2 {
                // Written twice: slot 0 the second write, slot 1 the first.
                assert_eq!(e[..8], record(member_lba(b), seq0, &data(2)), "block {b}");
                let seq1 = u32::from_be_bytes(e[8..12].try_into().unwrap());
                assert!(seq1 < seq0);
                assert_eq!(e[8..], record(member_lba(b), seq1, &data(1)), "block {b}");
            } else {
                assert_eq!(e[..8], record(member_lba(b), seq0, &data(1)), "block {b}");
                assert_eq!(e[8..], [0; 8], "block {b}: nothing before");
            }
        }
        // Nothing else was written in the area.
        assert_eq!(entry_on_medium(d, 4 * u64::from(IO_BLOCKS)), [0; 16]);
    }
    node.stop();
}

#[test]
fn a_mirror_without_metadata_serves_rotten_blocks_from_the_good_copy_and_rewrites_the_bad_one() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    let pool = mirror(&mut node, 1);
    let n = 64;
    write_all(&mut node, 1, n);
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
    assert_eq!(read_all(&mut node, 1, n, |_| false), 0);
    assert_eq!(read_all(&mut node, 1, 1, |_| false), 0);
    assert_eq!(read_all(&mut node, 1, n, |_| false), 0);
    let status = node.control.status().unwrap();
    let me = status.iter().find(|d| d.index == pool).unwrap();
    assert_eq!(me.members, vec![MemberState::Active, MemberState::Active]);
    let found = drive_errors(&node, 0) + drive_errors(&node, 1);
    assert_eq!(found, rotten.len() as u64, "each rotten block met once");
    assert_eq!(me.integrity.recovered, found, "{:?}", me.integrity);
    assert_eq!(me.integrity.healed, found, "{:?}", me.integrity);
    // The bad copies were rewritten: read straight from the member, each holds the data.
    for &(m, b) in &rotten {
        let d = node.fabric[1].read_sync(m as u32, member_lba(b), 1);
        assert_eq!(d.desc.status, STATUS_SUCCESS);
        let i = b / u64::from(IO_BLOCKS);
        let within = (b % u64::from(IO_BLOCKS)) as usize * BS as usize;
        assert!(
            d.data.as_deref() == Some(&payload(1, i)[within..within + BS as usize]),
            "member {m} block {b} was not rewritten"
        );
    }
    let stats = node.stop();
    assert_eq!(stats.errors, 0, "{stats:?}");
}

#[test]
fn a_block_bad_on_every_copy_without_metadata_is_a_media_error_and_scrub_reports_it() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    let pool = mirror(&mut node, 1);
    let n = 16;
    write_all(&mut node, 1, n);
    let b = 5 * u64::from(IO_BLOCKS) + 1;
    drives[0].drive.rot(member_lba(b), 1).unwrap();
    drives[1].drive.rot(member_lba(b), 2).unwrap();
    // One copy of another block rots too: the scrub repairs it.
    drives[1].drive.rot(member_lba(9), 3).unwrap();
    let ctl = node.control.clone();
    ctl.scrub(pool).unwrap();
    let mut found = Default::default();
    common::wait_until("the scrub to finish", || {
        found = ctl
            .status()
            .unwrap()
            .iter()
            .find(|d| d.index == pool)
            .and_then(|d| d.scrub)
            .unwrap_or_default();
        found.total > 0 && found.done >= found.total
    });
    assert_eq!(
        (found.mismatches, found.repaired, found.skipped),
        (1, 1, 1),
        "{found:?}"
    );
    assert_eq!(read_all(&mut node, 1, n, |i| i == 5), 1);
    // The host rewrites it: both copies take the new data and it reads again.
    write_all(&mut node, 1, n);
    assert_eq!(read_all(&mut node, 1, n, |_| false), 0);
    node.stop();
}

/// The protocol's reason: each block written three times between flushes, the last two never
/// flushed by the host, then the power of both drives cut. The entry of the third write is
/// on the medium (FUA) and names the second write's data in its second slot, which the device
/// made durable with a flush of its own before moving it there: every block reads back, the
/// second or third generation, never an integrity error. (Negative control, run by hand:
/// without the flush the blocks hold the first generation under entries naming the second and
/// third, and every read fails.) Then once more after the import: an entry read from the
/// medium names a write the cut lost. (Negative control by hand: rewriting without reading
/// the block first fails the reads after the second cut.)
#[test]
fn a_power_cut_after_unflushed_rewrites_leaves_every_block_readable() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let n = 32;
    {
        let mut node = raw_node(&drives);
        mirror(&mut node, 1);
        write_all(&mut node, 1, n);
        assert_eq!(flush(&mut node), STATUS_SUCCESS);
        write_all(&mut node, 2, n);
        write_all(&mut node, 3, n);
        node.stop();
    }
    for d in &drives {
        d.drive.power_cut();
        d.drive.power_on();
    }
    let mut node = raw_node(&drives);
    let pool = mirror(&mut node, 1 << 20);
    for i in 0..n {
        let d = node.fabric[0].read_sync(1, i * u64::from(IO_BLOCKS), IO_BLOCKS);
        assert_eq!(d.desc.status, STATUS_SUCCESS, "read {i}");
        let got = d.data.unwrap();
        assert!(
            got == payload(2, i) || got == payload(3, i),
            "read {i}: not a generation written after the flush"
        );
    }
    let status = node.control.status().unwrap();
    let me = status.iter().find(|d| d.index == pool).unwrap();
    assert_eq!(me.integrity.recovered, 0, "{:?}", me.integrity);
    assert_eq!(drive_errors(&node, 0) + drive_errors(&node, 1), 0);
    node.stop();
    // The entries on the medium name in slot 0 the third generation, which the cut lost.
    // Written over once more after the import (no flush) and cut again: the rewrite must
    // keep the slot naming what the block really holds (the device reads the block before
    // its first rewrite), or the block would read bad on every copy now.
    let mut node = raw_node(&drives);
    mirror(&mut node, 2 << 20);
    write_all(&mut node, 4, n);
    node.stop();
    for d in &drives {
        d.drive.power_cut();
        d.drive.power_on();
    }
    let mut node = raw_node(&drives);
    mirror(&mut node, 3 << 20);
    for i in 0..n {
        let d = node.fabric[0].read_sync(1, i * u64::from(IO_BLOCKS), IO_BLOCKS);
        assert_eq!(
            d.desc.status, STATUS_SUCCESS,
            "read {i} after the second cut"
        );
        let got = d.data.unwrap();
        assert!(
            [2, 3, 4].iter().any(|&g| got == payload(g, i)),
            "read {i}: not a generation written after the flush"
        );
    }
    // And it goes on: new writes over the old entries.
    write_all(&mut node, 5, n);
    assert_eq!(read_all(&mut node, 5, n, |_| false), 0);
    node.stop();
}

#[test]
fn a_raid5_pool_without_metadata_rebuilds_a_rotten_block_from_parity() {
    let drives: Vec<SimDrive> = (0..3).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    let pool = pool(&mut node, RaidLevel::Raid5, vec![0, 1, 2], 1);
    let n = 64;
    write_all(&mut node, 1, n);
    // Rot a block on each member's data area.
    for (m, d) in drives.iter().enumerate() {
        d.drive.rot(member_lba(3 + m as u64 * 40), 17).unwrap();
    }
    assert_eq!(read_all(&mut node, 1, n, |_| false), 0);
    let found: u64 = (0..3).map(|m| drive_errors(&node, m)).sum();
    assert!(found > 0, "no rotten block was read");
    let status = node.control.status().unwrap();
    let me = status.iter().find(|d| d.index == pool).unwrap();
    assert_eq!(
        me.members,
        vec![
            MemberState::Active,
            MemberState::Active,
            MemberState::Active
        ]
    );
    // Repaired where met: a second pass finds nothing new.
    assert_eq!(read_all(&mut node, 1, n, |_| false), 0);
    let again: u64 = (0..3).map(|m| drive_errors(&node, m)).sum();
    assert_eq!(again, found);
    node.stop();
}

#[test]
fn a_checksum_area_that_does_not_fit_is_refused_and_the_drives_stay_free() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    let ctl = node.control.clone();
    let spec = |offset, len| PoolSpec {
        name: "pool0".into(),
        level: RaidLevel::Raid1,
        chunk: 64 << 10,
        data_offset: DATA_OFFSET,
        data_len: DATA_LEN,
        drives: vec![0, 1],
        states: vec![],
        hold_until_recorded: false,
        journal: None,
        seq_base: 1,
        resync: false,
        seq_limit: 0,
        bitmap: None,
        resync_members: 0,
        checksum: Some(ChecksumSpec { offset, len }),
    };
    for (offset, len, why) in [
        (AREA, 4096, "too small"),
        (DATA_OFFSET, 32 << 10, "over the data"),
        (15 << 20, 2 << 20, "past the drive"),
    ] {
        let err = ctl.publish_pool(1, spec(offset, len)).unwrap_err();
        assert!(err.to_string().contains("checksum area"), "{why}: {err}");
    }
    // The drives are still free: a pool with a good area is built over them.
    mirror(&mut node, 1);
    write_all(&mut node, 1, 4);
    assert_eq!(read_all(&mut node, 1, 4, |_| false), 0);
    node.stop();
}

/// A member replaced on a pool with a checksum area: the new drive is wrapped like the others
/// (its entries written by the rebuild), the old one leaves unwrapped (free again, read raw);
/// a scrub afterwards finds nothing (the rebuilt copies carry newer sequence numbers but the
/// same data), and with the other copies pulled every block reads from the rebuilt member.
#[test]
fn a_replaced_member_is_rebuilt_with_its_entries_and_a_scrub_finds_nothing() {
    use common::sim::{lose, Loss};
    let mut drives: Vec<SimDrive> = (0..3).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    let pool = mirror(&mut node, 1);
    let n = 64;
    write_all(&mut node, 1, n);
    lose(&mut drives[1], Loss::Pull);
    let d = node.fabric[0].write_sync(1, 0, &payload(1, 0), 0);
    assert_eq!(d.desc.status, STATUS_SUCCESS);
    node.control.replace_member(pool, 1, 2, 0).unwrap();
    common::wait_until("the member to be rebuilt", || {
        let st = node.control.status().unwrap();
        st.iter()
            .find(|d| d.index == pool)
            .is_some_and(|d| d.members.iter().all(|m| *m == MemberState::Active))
    });
    // The new member's entries are on its medium.
    let e = entry_on_medium(&drives[2], 5);
    assert_ne!(e[..8], [0; 8], "no entry written by the rebuild");
    let ctl = node.control.clone();
    ctl.scrub(pool).unwrap();
    let mut found = Default::default();
    common::wait_until("the scrub to finish", || {
        found = ctl
            .status()
            .unwrap()
            .iter()
            .find(|d| d.index == pool)
            .and_then(|d| d.scrub)
            .unwrap_or_default();
        found.total > 0 && found.done >= found.total
    });
    assert_eq!(
        (found.mismatches, found.repaired, found.skipped),
        (0, 0, 0),
        "{found:?}"
    );
    // Rot on the rebuilt member is caught by its entries and served from member 0.
    drives[2].drive.rot(member_lba(7), 5).unwrap();
    assert_eq!(read_all(&mut node, 1, n, |_| false), 0);
    assert!(
        drive_errors(&node, 2) > 0,
        "the rebuilt member's rot went unseen"
    );
    lose(&mut drives[0], Loss::Pull);
    assert_eq!(read_all(&mut node, 1, n, |_| false), 0);
    node.stop();
}

/// A pool device taken apart (its pool moved to the peer) frees its drives and forgets what it
/// held (cached entries, sequence numbers): when the pool comes back after the peer rewrote it
/// through the drives' other ports, the device built again serves the peer's data. Taking it
/// apart is refused while a volume maps it.
#[test]
fn a_pool_taken_apart_frees_its_drives_and_built_again_serves_the_peers_writes() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let mut a = raw_node(&drives);
    let n = 32;
    let first = mirror(&mut a, 1);
    write_all(&mut a, 1, n);
    assert_eq!(read_all(&mut a, 1, n, |_| false), 0);
    assert_eq!(flush(&mut a), STATUS_SUCCESS);
    let err = a.control.retire_pool(first).unwrap_err();
    assert!(err.contains("mapped by a volume"), "{err}");
    a.control.publish_volumes(1, vec![]).unwrap();
    a.control.retire_pool(first).unwrap();
    let status = a.control.status().unwrap();
    assert!(status.iter().all(|d| d.index != first), "{status:?}");
    for drive in [0, 1] {
        assert!(
            status.iter().any(|d| d.index == drive),
            "drive {drive} is not free"
        );
    }
    // The peer, on the B ports, rewrites every block (its sequence numbers above ours).
    let mut b = common::sim::raw_node_on_port_b(&drives);
    let theirs = mirror(&mut b, 1 << 20);
    write_all(&mut b, 2, n);
    assert_eq!(flush(&mut b), STATUS_SUCCESS);
    b.control.publish_volumes(1, vec![]).unwrap();
    b.control.retire_pool(theirs).unwrap();
    b.stop();
    // Back here: a new device, reading the peer's data with the peer's entries.
    let second = mirror(&mut a, 1 << 21);
    assert_ne!(second, first);
    assert_eq!(read_all(&mut a, 2, n, |_| false), 0);
    write_all(&mut a, 3, n);
    assert_eq!(read_all(&mut a, 3, n, |_| false), 0);
    assert_eq!(drive_errors(&a, 0) + drive_errors(&a, 1), 0);
    a.stop();
}

/// A pool device that cannot be taken apart in time (a member holds a scrub read back) stays
/// whole and in service: the request is refused naming why, the volume is served again with
/// every block intact once the member answers, and taken apart once nothing is out.
#[test]
fn a_pool_with_io_out_past_its_patience_is_not_taken_apart_and_stays_in_service() {
    use duplex_drive_sim::{Fault, FaultOp};
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let config = duplex_datapath::EngineConfig {
        retire_patience: std::time::Duration::ZERO,
        ..duplex_datapath::EngineConfig::default()
    };
    let mut node = common::sim::raw_node_with(&drives, config);
    let pool = mirror(&mut node, 1);
    let n = 16;
    write_all(&mut node, 1, n);
    assert_eq!(flush(&mut node), STATUS_SUCCESS);
    // Member 1 holds every read back: the scrub's first read of it stays inside the drive.
    let stall = drives[1].drive.inject(Fault::Stall { op: FaultOp::Read });
    node.control.scrub(pool).unwrap();
    let cntlid = drives[1].drive.controllers()[0];
    common::wait_until("the scrub's read to be held in member 1", || {
        drives[1].drive.held_commands(cntlid) > 0
    });
    node.control.publish_volumes(1, vec![]).unwrap();
    let err = node.control.retire_pool(pool).unwrap_err();
    assert!(err.contains("not taken apart"), "{err}");
    let status = node.control.status().unwrap();
    assert!(status.iter().any(|d| d.index == pool), "{status:?}");
    // The member answers: the scrub finishes, the volume is served again, every block intact.
    assert!(drives[1].drive.clear_fault(stall));
    common::wait_until("the scrub to finish", || {
        node.control
            .status()
            .unwrap()
            .iter()
            .find(|d| d.index == pool)
            .and_then(|d| d.scrub)
            .is_some_and(|s| s.total > 0 && s.done >= s.total)
    });
    map_volume(&mut node, pool);
    assert_eq!(read_all(&mut node, 1, n, |_| false), 0);
    node.control.publish_volumes(1, vec![]).unwrap();
    node.control.retire_pool(pool).unwrap();
    node.stop();
}

/// Write Zeroes and Deallocate over more than a piece (4 MiB) are done in pieces: afterwards
/// every block reads as zeroes on every copy (the entries say "zeroes"), rewrites read back,
/// and a rotten zeroed block is still caught.
#[test]
fn zeroing_the_whole_volume_in_pieces_leaves_zeroes_with_their_entries() {
    let drives: Vec<SimDrive> = (0..2).map(|_| sim_drive()).collect();
    let mut node = raw_node(&drives);
    mirror(&mut node, 1);
    let n = 64;
    write_all(&mut node, 1, n);
    let blocks = DATA_LEN / u64::from(BS);
    let tail = blocks - u64::from(IO_BLOCKS);
    for opcode in [
        duplex_ipc::desc::OP_WRITE_ZEROES,
        duplex_ipc::desc::OP_DEALLOCATE,
    ] {
        // Data in the last piece too.
        let d = node.fabric[0].write_sync(1, tail, &payload(9, 9), 0);
        assert_eq!(d.desc.status, STATUS_SUCCESS);
        let d = node.fabric[0].call(
            duplex_ipc::desc::IoDesc {
                opcode,
                volume: 1,
                lba: 0,
                blocks: u32::try_from(blocks).unwrap(),
                ..Default::default()
            },
            0,
            &[],
        );
        assert_eq!(d.desc.status, STATUS_SUCCESS, "opcode {opcode:#x}");
        for i in 0..n {
            let d = node.fabric[0].read_sync(1, i * u64::from(IO_BLOCKS), IO_BLOCKS);
            assert_eq!(d.desc.status, STATUS_SUCCESS, "read {i}");
            assert!(
                d.data.unwrap().iter().all(|&b| b == 0),
                "read {i} not zeroes"
            );
        }
        let d = node.fabric[0].read_sync(1, tail, IO_BLOCKS);
        assert_eq!(d.desc.status, STATUS_SUCCESS);
        assert!(
            d.data.unwrap().iter().all(|&b| b == 0),
            "the last piece not zeroed"
        );
        for d in &drives {
            assert_eq!(entry_on_medium(d, 3)[..8], [0; 8], "slot 0 says zeroes");
            assert_eq!(entry_on_medium(d, blocks - 1)[..8], [0; 8]);
        }
        write_all(&mut node, 2, 4);
        assert_eq!(read_all(&mut node, 2, 4, |_| false), 0);
    }
    // A zeroed block that rots on one copy is caught and served from the other.
    drives[0].drive.rot(member_lba(100), 3).unwrap();
    drives[1].drive.rot(member_lba(100), 3).unwrap();
    let d = node.fabric[0].read_sync(1, 100, 1);
    assert_eq!(
        d.desc.status, STATUS_INTEGRITY,
        "rot on both copies of a zeroed block"
    );
    node.stop();
}
