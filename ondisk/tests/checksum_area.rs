//! Record type 9, the checksum area: round trips, its sizing and placement helpers, every
//! refusal (when built and when parsed), and that a reader which does not know the type refuses
//! the image (must-understand).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use duplex_ondisk::records::{decode_records, Record, CHECKSUM_SIZING_BLOCK};
use duplex_ondisk::{
    checksum_area_bytes, checksum_split, ChecksumArea, ConfigError, MetadataImage, PoolConfig,
    Problem, RaidLevel, Structure,
};
use proptest::prelude::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// `cfg` with its member data area shared between data and a checksum area, as pool
/// creation shares it on the common 1 GiB layout.
fn with_area(mut cfg: PoolConfig) -> PoolConfig {
    let l = layout();
    let (data, len) = checksum_split(l.data_size, cfg.pool.chunk_size).unwrap();
    cfg.pool.member_data_bytes = data;
    cfg.checksum_area = Some(ChecksumArea {
        offset: l.data_offset + data,
        len,
    });
    cfg
}

/// The record by hand: offset, length, entry bytes.
fn area_record(offset: u64, len: u64, entry: u16, flags: u16) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&9u16.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&18u32.to_le_bytes());
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&entry.to_le_bytes());
    v
}

/// The body of `cfg` without a checksum area, then `extra`.
fn body_then(cfg: &PoolConfig, extra: &[u8]) -> Vec<u8> {
    let mut plain = cfg.clone();
    plain.checksum_area = None;
    let mut body = plain.encode_body().unwrap();
    body.extend_from_slice(extra);
    body
}

fn config_problem(body: &[u8]) -> (Structure, ConfigError) {
    match PoolConfig::decode_body(body) {
        Err(e) => match e.problem {
            Problem::Config(c) => (e.structure, c),
            other => panic!("expected a config error, got {other:?}"),
        },
        Ok(c) => panic!("accepted: {c:?}"),
    }
}

#[test]
fn sizes_are_16_bytes_per_block_rounded_to_4_kib() {
    assert_eq!(checksum_area_bytes(0, 512), 0);
    assert_eq!(checksum_area_bytes(1, 512), 4096);
    assert_eq!(checksum_area_bytes(256 * 512, 512), 4096);
    assert_eq!(checksum_area_bytes(256 * 512 + 1, 512), 8192);
    assert_eq!(checksum_area_bytes(MIB, 512), 32 * KIB);
    assert_eq!(checksum_area_bytes(MIB, 4096), 4 * KIB);
    // Block size unknown (0): the 512-byte worst case.
    assert_eq!(checksum_area_bytes(MIB, 0), 32 * KIB);
    assert_eq!(CHECKSUM_SIZING_BLOCK, 512);
    // No overflow at the top of the range.
    assert_eq!(
        checksum_area_bytes(u64::MAX, 512),
        (u64::MAX / 512 + 1) * 16
    );
}

#[test]
fn the_split_of_a_one_gib_drive() {
    // 942 MiB of data area, 64 KiB chunks: 14615 chunks of data, then 7308 blocks of 4 KiB
    // of entries (14615 × 64 KiB / 512 × 16 = 7307.5 × 4 KiB, rounded up); one more chunk
    // does not fit.
    let (data, len) = checksum_split(942 * MIB, 64 << 10).unwrap();
    assert_eq!(data, 14615 * 64 * KIB);
    assert_eq!(len, 7308 * 4 * KIB);
    assert!(data + len <= 942 * MIB);
    let more = 14616 * 64 * KIB;
    assert_eq!(checksum_area_bytes(more, 512), 7308 * 4 * KIB);
    assert!(more + checksum_area_bytes(more, 512) > 942 * MIB);
    // Too small for one chunk with its area; a zero chunk.
    assert_eq!(checksum_split(64 * KIB, 64 << 10), None);
    assert_eq!(
        checksum_split(64 * KIB + 4 * KIB, 64 << 10),
        Some((64 * KIB, 4 * KIB))
    );
    assert_eq!(checksum_split(MIB, 0), None);
}

#[test]
fn a_pool_with_a_checksum_area_round_trips() {
    for (level, n) in [
        (RaidLevel::Raid1, 2),
        (RaidLevel::Raid10, 4),
        (RaidLevel::Raid5, 3),
        (RaidLevel::Raid6, 4),
    ] {
        let cfg = with_area(config(level, n));
        let body = cfg.encode_body().unwrap();
        assert_eq!(PoolConfig::decode_body(&body).unwrap(), cfg);
        let recs = decode_records(&body).unwrap();
        assert_eq!(
            recs.last(),
            Some(&Record::ChecksumArea(cfg.checksum_area.unwrap()))
        );
        // Through a whole image too.
        let image = MetadataImage {
            slot_index: 3,
            generation: 4,
            epoch: 1,
            writer_node: 0,
            config: cfg.clone(),
        };
        let bytes = image.encode(2 << 20).unwrap();
        assert_eq!(MetadataImage::parse(&bytes).unwrap().config, cfg);
    }
    // Absent: no record, decodes as none (every pool made before the record existed).
    let cfg = config(RaidLevel::Raid1, 2);
    let body = cfg.encode_body().unwrap();
    assert!(!decode_records(&body)
        .unwrap()
        .iter()
        .any(|r| matches!(r, Record::ChecksumArea(_))));
    assert_eq!(PoolConfig::decode_body(&body).unwrap().checksum_area, None);
}

#[test]
fn a_bad_checksum_area_is_never_written() {
    let good = with_area(config(RaidLevel::Raid1, 2));
    let area = good.checksum_area.unwrap();
    let mdb = good.pool.member_data_bytes;
    let bad = |offset: u64, len: u64| {
        let mut c = good.clone();
        c.checksum_area = Some(ChecksumArea { offset, len });
        c
    };
    for (cfg, words) in [
        (bad(area.offset + 512, area.len), "multiples of 4096"),
        (bad(area.offset, area.len + 512), "multiples of 4096"),
        (bad(area.offset, 0), "empty"),
        (bad(area.offset, area.len - 4096), "need at least"),
        (bad(mdb - 4096, area.len), "inside the"),
        (bad(u64::MAX - 4095, area.len), "2^64"),
    ] {
        let e = cfg.validate().unwrap_err();
        assert!(
            matches!(&e, ConfigError::ChecksumArea { why, .. } if why.contains(words)),
            "{e}"
        );
        assert!(cfg.encode_body().is_err());
    }
    // Exactly the size needed, right after the member data bytes: fine.
    assert!(bad(mdb, checksum_area_bytes(mdb, 512)).validate().is_ok());
}

#[test]
fn a_bad_checksum_area_record_is_refused_when_parsed() {
    let good = with_area(config(RaidLevel::Raid1, 2));
    let area = good.checksum_area.unwrap();
    let mdb = good.pool.member_data_bytes;
    let base = body_then(&good, &[]).len() as u64;
    // Entry bytes other than 16, at the field's offset.
    let body = body_then(&good, &area_record(area.offset, area.len, 8, 1));
    let e = PoolConfig::decode_body(&body).unwrap_err();
    assert_eq!(e.structure, Structure::ChecksumAreaRecord);
    assert_eq!(e.offset, base + 8 + 16);
    assert!(matches!(
        e.problem,
        Problem::BadValue {
            field: "checksum entry bytes",
            value: 8,
            ..
        }
    ));
    // Misaligned: refused as the record is read, at its header.
    let body = body_then(&good, &area_record(area.offset + 512, area.len, 16, 1));
    let e = PoolConfig::decode_body(&body).unwrap_err();
    assert_eq!(
        (e.structure, e.offset),
        (Structure::ChecksumAreaRecord, base)
    );
    // Too small for the member data bytes, or inside them: refused by the rules across
    // records.
    for extra in [
        area_record(area.offset, area.len - 4096, 16, 1),
        area_record(mdb - 4096, area.len, 16, 1),
    ] {
        let (structure, e) = config_problem(&body_then(&good, &extra));
        assert_eq!(structure, Structure::ImageBody);
        assert!(matches!(e, ConfigError::ChecksumArea { .. }), "{e}");
    }
    // Twice.
    let one = area_record(area.offset, area.len, 16, 1);
    let e = PoolConfig::decode_body(&body_then(&good, &[one.clone(), one].concat())).unwrap_err();
    assert_eq!(e.structure, Structure::ChecksumAreaRecord);
    assert_eq!(
        e.problem,
        Problem::DuplicateRecord {
            record: "checksum area"
        }
    );
    // Short and long payloads.
    let mut short = area_record(area.offset, area.len, 16, 1);
    short[4..8].copy_from_slice(&17u32.to_le_bytes());
    short.pop();
    assert!(PoolConfig::decode_body(&body_then(&good, &short)).is_err());
    let mut long = area_record(area.offset, area.len, 16, 1);
    long[4..8].copy_from_slice(&19u32.to_le_bytes());
    long.push(0);
    let e = PoolConfig::decode_body(&body_then(&good, &long)).unwrap_err();
    assert_eq!(e.problem, Problem::TrailingBytes { count: 1 });
    // The good one by hand decodes to the config.
    let body = body_then(&good, &area_record(area.offset, area.len, 16, 1));
    assert_eq!(PoolConfig::decode_body(&body).unwrap(), good);
}

#[test]
fn a_reader_that_does_not_know_the_record_refuses_the_image() {
    let cfg = with_area(config(RaidLevel::Raid1, 2));
    let body = cfg.encode_body().unwrap();
    let at = body_then(&cfg, &[]).len();
    // Written must-understand.
    assert_eq!(u16::from_le_bytes([body[at], body[at + 1]]), 9);
    assert_eq!(u16::from_le_bytes([body[at + 2], body[at + 3]]) & 1, 1);
    // What an older reader sees: a must-understand type it does not know (here: the same
    // record renumbered to a type this reader does not know) refuses the image, rather than
    // the pool being served without its checksum area kept up to date.
    let mut older = body.clone();
    older[at..at + 2].copy_from_slice(&999u16.to_le_bytes());
    let e = PoolConfig::decode_body(&older).unwrap_err();
    assert_eq!(
        e.problem,
        Problem::UnknownRequiredRecord { record_type: 999 }
    );
    assert_eq!(e.offset, at as u64);
}

#[test]
fn the_layout_check_keeps_the_area_in_the_data_area_after_the_data() {
    let l = layout();
    let cfg = with_area(config(RaidLevel::Raid1, 2));
    let area = cfg.checksum_area.unwrap();
    let mdb = cfg.pool.member_data_bytes;
    assert!(area.check_layout(&l, mdb).is_ok());
    // Starting inside the data the pool uses.
    let inside = ChecksumArea {
        offset: area.offset - 64 * KIB,
        ..area
    };
    assert!(inside.check_pool(mdb).is_ok(), "fine without the layout");
    assert!(inside.check_layout(&l, mdb).is_err());
    // Past the end of the data area (the tail reserve, the secondary superblock).
    let past = ChecksumArea {
        offset: l.data_end() - 4096,
        len: area.len,
    };
    assert!(past.check_layout(&l, mdb).is_err());
    // A drive with a smaller data area than the pool's first members.
    let small = duplex_ondisk::Layout::for_drive(1 << 29, 512).unwrap();
    assert!(area.check_layout(&small, mdb).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The split is the largest chunk multiple whose data and area fit, and its area is valid
    /// for it.
    #[test]
    fn the_split_is_the_largest_that_fits(space in 0u64..(1u64 << 50), shift in 12u32..=20) {
        let chunk = 1u32 << shift;
        let c = u64::from(chunk);
        match checksum_split(space, chunk) {
            None => prop_assert!(c + checksum_area_bytes(c, 512) > space),
            Some((data, len)) => {
                prop_assert!(data > 0 && data % c == 0);
                prop_assert_eq!(len, checksum_area_bytes(data, 512));
                prop_assert!(data + len <= space);
                let more = data + c;
                prop_assert!(more + checksum_area_bytes(more, 512) > space);
                let area = ChecksumArea { offset: data, len };
                prop_assert!(area.check_pool(data).is_ok());
            }
        }
    }
}
