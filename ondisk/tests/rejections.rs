//! Every rejection path: each malformed input is refused with the structure, offset and
//! problem the code documents (and nothing panics on the way).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use duplex_ondisk::records::{decode_records, Record};
use duplex_ondisk::{
    ConfigError, EncodeError, FormatError, Heartbeat, ImageHeader, Layout, LayoutError,
    MetadataImage, PoolConfig, Problem, RaidLevel, StringProblem, Structure, Superblock,
    SuperblockCopy,
};

// ---------------------------------------------------------------------------------------------
// Helpers that write structures by hand, from the document's offsets.

fn recrc(b: &mut [u8], at: usize) {
    b[at..at + 4].fill(0);
    let crc = crc32c::crc32c(b);
    b[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

fn sb_bytes() -> Vec<u8> {
    superblock(uuid(0xd0, 0), 0, SuperblockCopy::Primary).encode_vec()
}

/// A superblock with `f` applied to its bytes and the CRC fixed.
fn sb_patched(f: impl FnOnce(&mut [u8])) -> Result<Superblock, FormatError> {
    let mut b = sb_bytes();
    f(&mut b);
    recrc(&mut b, 4092);
    Superblock::parse(&b)
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s);
}

fn rec(t: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&t.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// A pool record payload by hand: `members` of (drive tag, slot, state code, position).
fn pool_payload(name: &[u8], level: u8, chunk: u32, members: &[(u8, u32, u8, u64)]) -> Vec<u8> {
    let mut p = Vec::new();
    string(&mut p, name);
    p.extend_from_slice(&POOL.0);
    p.push(level);
    p.extend_from_slice(&chunk.to_le_bytes());
    p.extend_from_slice(&layout().data_size.to_le_bytes());
    p.extend_from_slice(&(members.len() as u16).to_le_bytes());
    for &(tag, slot, state, pos) in members {
        p.extend_from_slice(&drive_uuid(tag as usize).0);
        p.extend_from_slice(&slot.to_le_bytes());
        p.push(state);
        p.extend_from_slice(&pos.to_le_bytes());
        p.extend_from_slice(&1u64.to_le_bytes());
    }
    p
}

fn good_pool() -> Vec<u8> {
    rec(
        1,
        1,
        &pool_payload(b"pool0", 1, 65536, &[(0, 0, 1, 0), (1, 1, 1, 0)]),
    )
}

fn ownership(epoch: u64) -> Vec<u8> {
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&epoch.to_le_bytes());
    rec(2, 1, &p)
}

fn cluster() -> Vec<u8> {
    rec(3, 1, &7u64.to_le_bytes())
}

/// A minimal valid body followed by `extra` records.
fn body_with(extra: &[Vec<u8>]) -> Vec<u8> {
    let mut b = [good_pool(), ownership(1), cluster()].concat();
    for e in extra {
        b.extend_from_slice(e);
    }
    b
}

/// A whole image around `body`, with valid checksums (header fields from the document).
fn image_bytes(body: &[u8], epoch: u64, pool: [u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; 128];
    b[0..8].copy_from_slice(b"DPLXMD01");
    put_u32(&mut b, 8, 1);
    put_u32(&mut b, 12, 0);
    b[16..32].copy_from_slice(&pool);
    put_u64(&mut b, 32, 1);
    put_u64(&mut b, 40, epoch);
    put_u32(&mut b, 48, 0);
    put_u32(&mut b, 52, body.len() as u32);
    put_u32(&mut b, 56, crc32c::crc32c(body));
    recrc(&mut b, 124);
    b.extend_from_slice(body);
    b
}

fn volume_payload(name: &[u8], size: u64, extents: &[(u64, u64, u64)]) -> Vec<u8> {
    let mut p = Vec::new();
    string(&mut p, name);
    p.extend_from_slice(&uuid(0xa0, 9).0);
    p.extend_from_slice(&uuid(0xa1, 9).0);
    p.extend_from_slice(&size.to_le_bytes());
    p.extend_from_slice(&4096u32.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&[0; 16]);
    p.extend_from_slice(&(extents.len() as u32).to_le_bytes());
    for &(v, pb, n) in extents {
        p.extend_from_slice(&v.to_le_bytes());
        p.extend_from_slice(&pb.to_le_bytes());
        p.extend_from_slice(&n.to_le_bytes());
    }
    p
}

fn config_err(body: &[u8]) -> ConfigError {
    match PoolConfig::decode_body(body) {
        Err(FormatError {
            problem: Problem::Config(e),
            ..
        }) => e,
        other => panic!("expected a config error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Layout.

#[test]
fn layout_refuses_small_drives_and_bad_block_sizes() {
    let min = duplex_ondisk::layout::MIN_CAPACITY;
    let e = Layout::for_drive(64 << 20, 4096).unwrap_err();
    assert_eq!(
        e,
        LayoutError::TooSmall {
            capacity: 64 << 20,
            minimum: min
        }
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with("Layout: drive of 67108864 bytes is too small"),
        "{msg}"
    );
    assert!(msg.contains(&min.to_string()), "{msg}");
    assert!(Layout::for_drive(0, 512).is_err());
    assert_eq!(
        Layout::for_drive(1 << 30, 1024),
        Err(LayoutError::BlockSize(1024))
    );
    assert!(matches!(
        Layout::for_drive((1 << 30) + 512, 4096),
        Err(LayoutError::CapacityNotBlockMultiple { .. })
    ));
}

#[test]
fn recorded_layouts_must_be_consistent_and_within_the_drive() {
    let l = layout();
    let bad = [
        Layout {
            block_size: 1000,
            ..l
        },
        Layout {
            secondary_offset: l.secondary_offset - 4096,
            ..l
        },
        Layout {
            capacity_bytes: l.capacity_bytes * 2,
            ..l
        },
        Layout {
            journal_offset: l.metadata_offset + 4096,
            ..l
        },
        Layout {
            data_offset: l.data_offset + 512,
            ..l
        },
        Layout {
            data_size: l.data_size + (2 << 20),
            ..l
        },
        Layout { data_size: 0, ..l },
        Layout {
            metadata_slots: 1,
            ..l
        },
        Layout {
            metadata_slot_size: 0,
            ..l
        },
        Layout {
            heartbeat_offset: 0,
            ..l
        },
        Layout {
            heartbeat_slots: 0,
            ..l
        },
        Layout {
            journal_size: u64::MAX - 4095,
            ..l
        },
        Layout {
            capacity_bytes: 4096,
            secondary_offset: 0,
            ..l
        },
    ];
    for b in bad {
        assert!(b.validate().is_err(), "{b:?}");
        // And through the superblock, at the layout's offset.
        let sb = Superblock {
            layout: b,
            ..superblock(uuid(1, 1), 0, SuperblockCopy::Primary)
        };
        let e = Superblock::parse(&sb.encode()[..]).unwrap_err();
        assert_eq!((e.structure, e.offset), (Structure::Superblock, 128));
        assert!(matches!(e.problem, Problem::Layout(_)), "{e}");
    }
}

#[test]
fn a_drive_smaller_than_its_recorded_capacity_is_refused() {
    let l = layout();
    assert!(l.check_capacity(l.capacity_bytes).is_ok());
    assert!(l.check_capacity(l.capacity_bytes * 2).is_ok());
    let e = l.check_capacity(l.capacity_bytes - 4096).unwrap_err();
    assert!(matches!(e, LayoutError::DriveShrank { .. }));
    assert!(e.to_string().starts_with("Layout: the drive has"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Superblock.

#[test]
fn superblock_truncated() {
    for len in [0, 1, 8, 4095] {
        let e = Superblock::parse(&sb_bytes()[..len]).unwrap_err();
        assert_eq!(e.offset, 0);
        assert_eq!(
            e.problem,
            Problem::Truncated {
                needed: 4096,
                available: len as u64
            }
        );
    }
}

#[test]
fn superblock_bad_magic() {
    let mut b = sb_bytes();
    b[0] = b'X';
    let e = Superblock::parse(&b).unwrap_err();
    assert!(matches!(e.problem, Problem::BadMagic { .. }));
    assert_eq!(e.offset, 0);
    assert!(
        e.to_string()
            .starts_with("Superblock at byte 0: bad magic \"XPLXSB01\", expected \"DPLXSB01\""),
        "{e}"
    );
    // Callers name the drive.
    let d = e.clone().on_drive("0000:01:00.0");
    assert_eq!(d.drive, "0000:01:00.0");
    assert!(
        d.to_string()
            .starts_with("Drive 0000:01:00.0: Superblock at byte 0: bad magic"),
        "{d}"
    );
    // An all-zero block (never written).
    assert!(matches!(
        Superblock::parse(&[0u8; 4096]).unwrap_err().problem,
        Problem::BadMagic { .. }
    ));
}

#[test]
fn superblock_newer_version_is_refused_clearly() {
    let mut b = sb_bytes();
    put_u32(&mut b, 8, 2);
    // Refused on the version, whatever the checksum says.
    let e = Superblock::parse(&b).unwrap_err();
    assert_eq!(e.offset, 8);
    assert_eq!(
        e.problem,
        Problem::UnsupportedVersion {
            found: 2,
            supported: 1
        }
    );
    assert!(e.to_string().contains("upgrade duplex"), "{e}");
    let e = sb_patched(|b| put_u32(b, 8, 0)).unwrap_err();
    assert!(matches!(e.problem, Problem::BadValue { value: 0, .. }));
}

#[test]
fn superblock_bad_crc() {
    for at in [12, 64, 100, 2000, 4092, 4095] {
        let mut b = sb_bytes();
        b[at] ^= 1;
        let e = Superblock::parse(&b).unwrap_err();
        assert_eq!(e.offset, 4092);
        assert!(matches!(e.problem, Problem::BadChecksum { .. }), "{e}");
    }
}

#[test]
fn superblock_bad_codes_and_fields() {
    type Patch = Box<dyn Fn(&mut [u8])>;
    let cases: [(usize, Patch); 7] = [
        (64, Box::new(|b| b[64] = 0)),
        (64, Box::new(|b| b[64] = 4)),
        (65, Box::new(|b| b[65] = 9)),
        (66, Box::new(|b| b[66] = 3)),
        (68, Box::new(|b| put_u32(b, 68, 4))),
        // A rebuild position on an active drive.
        (72, Box::new(|b| put_u64(b, 72, 5))),
        (128, Box::new(|b| put_u32(b, 136, 4097))),
    ];
    for (at, f) in cases {
        let e = sb_patched(f).unwrap_err();
        assert_eq!(
            (e.structure, e.offset),
            (Structure::Superblock, at as u64),
            "{e}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Heartbeat.

#[test]
fn heartbeat_rejections() {
    let hb = Heartbeat {
        node_id: 1,
        boot_id: uuid(1, 1),
        epoch: 1,
        counter: 1,
        peer_boot_id: uuid(1, 2),
        peer_counter: 0,
    };
    let good = hb.encode().to_vec();
    let e = Heartbeat::parse(&good[..100]).unwrap_err();
    assert!(matches!(e.problem, Problem::Truncated { .. }));
    assert_eq!(e.structure, Structure::Heartbeat);

    let mut b = good.clone();
    b[3] = 0;
    assert!(matches!(
        Heartbeat::parse(&b).unwrap_err().problem,
        Problem::BadMagic { .. }
    ));

    let mut b = good.clone();
    put_u32(&mut b, 8, 7);
    assert!(matches!(
        Heartbeat::parse(&b).unwrap_err().problem,
        Problem::UnsupportedVersion { found: 7, .. }
    ));

    let mut b = good.clone();
    b[40] ^= 0x80;
    let e = Heartbeat::parse(&b).unwrap_err();
    assert_eq!(e.offset, 4092);
    assert!(matches!(e.problem, Problem::BadChecksum { .. }));

    let mut b = good;
    put_u32(&mut b, 12, 4);
    recrc(&mut b, 4092);
    let e = Heartbeat::parse(&b).unwrap_err();
    assert_eq!(e.offset, 12);
    assert!(
        e.to_string()
            .starts_with("Heartbeat slot at byte 12: node id 4"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Image header and body.

#[test]
fn image_rejections() {
    let good = image_bytes(&body_with(&[]), 1, POOL.0);
    MetadataImage::parse(&good).unwrap();

    // Truncated header.
    for len in [0, 127] {
        let e = MetadataImage::parse(&good[..len]).unwrap_err();
        assert_eq!(e.structure, Structure::ImageHeader);
        assert!(matches!(e.problem, Problem::Truncated { needed: 128, .. }));
    }
    // Bad magic.
    let mut b = good.clone();
    b[7] = b'2';
    assert!(matches!(
        MetadataImage::parse(&b).unwrap_err().problem,
        Problem::BadMagic { .. }
    ));
    // Newer version.
    let mut b = good.clone();
    put_u32(&mut b, 8, 9);
    assert!(matches!(
        MetadataImage::parse(&b).unwrap_err().problem,
        Problem::UnsupportedVersion { found: 9, .. }
    ));
    // Header CRC.
    let mut b = good.clone();
    b[33] ^= 1;
    let e = MetadataImage::parse(&b).unwrap_err();
    assert_eq!((e.structure, e.offset), (Structure::ImageHeader, 124));
    assert!(matches!(e.problem, Problem::BadChecksum { .. }));
    // Body length past the end of the slot.
    let e = MetadataImage::parse(&good[..good.len() - 1]).unwrap_err();
    assert_eq!((e.structure, e.offset), (Structure::ImageBody, 128));
    assert!(matches!(e.problem, Problem::Truncated { .. }));
    let mut b = good.clone();
    put_u32(&mut b, 52, u32::MAX);
    recrc(&mut b[..128], 124);
    assert!(matches!(
        MetadataImage::parse(&b).unwrap_err().problem,
        Problem::Truncated { .. }
    ));
    // Torn write: header valid, body not.
    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] ^= 0xff;
    ImageHeader::parse(&b).unwrap();
    let e = MetadataImage::parse(&b).unwrap_err();
    assert_eq!((e.structure, e.offset), (Structure::ImageBody, 128));
    assert!(matches!(e.problem, Problem::BadChecksum { .. }));
    assert!(e
        .to_string()
        .starts_with("Metadata image body at byte 128: checksum mismatch"));
    // Writer node out of range.
    let mut b = good.clone();
    put_u32(&mut b, 48, 4);
    recrc(&mut b[..128], 124);
    assert_eq!(MetadataImage::parse(&b).unwrap_err().offset, 48);
    // Header pool UUID and epoch must match the records.
    let e = MetadataImage::parse(&image_bytes(&body_with(&[]), 1, [9; 16])).unwrap_err();
    assert_eq!((e.structure, e.offset), (Structure::ImageHeader, 16));
    assert!(matches!(e.problem, Problem::Mismatch { .. }));
    let e = MetadataImage::parse(&image_bytes(&body_with(&[]), 2, POOL.0)).unwrap_err();
    assert_eq!((e.structure, e.offset), (Structure::ImageHeader, 40));
}

#[test]
fn encode_refuses_what_it_must_not_write() {
    let image = MetadataImage {
        slot_index: 0,
        generation: 1,
        epoch: 1,
        writer_node: 0,
        config: config(RaidLevel::Raid1, 2),
    };
    let len = image.encode(1 << 20).unwrap().len();
    assert!(matches!(
        image.encode(200),
        Err(EncodeError::TooLarge { slot_size: 200, .. })
    ));
    assert!(image.encode(len).is_ok());
    let e = MetadataImage {
        epoch: 2,
        ..image.clone()
    }
    .encode(1 << 20);
    assert_eq!(
        e,
        Err(EncodeError::Config(ConfigError::EpochMismatch {
            ownership: 1,
            header: 2
        }))
    );
    assert!(MetadataImage {
        writer_node: 4,
        ..image.clone()
    }
    .encode(1 << 20)
    .is_err());
    let mut bad = image;
    bad.config.volumes[0].name = "x".repeat(65);
    assert!(matches!(
        bad.encode(1 << 20),
        Err(EncodeError::Config(ConfigError::BadString { .. }))
    ));
    assert!(bad.config.encode_body().is_err());
}

// ---------------------------------------------------------------------------------------------
// Records.

#[test]
fn record_header_and_payload_truncated() {
    let mut b = body_with(&[]);
    b.extend_from_slice(&[5, 0, 0]);
    let e = decode_records(&b).unwrap_err();
    assert_eq!(e.structure, Structure::RecordHeader);
    assert!(matches!(e.problem, Problem::Truncated { .. }));
    // A length past the end.
    let mut b = body_with(&[]);
    b.extend_from_slice(&rec(4, 1, &[0; 10])[..12]);
    let e = decode_records(&b).unwrap_err();
    assert_eq!(e.structure, Structure::RecordHeader);
    assert!(matches!(
        e.problem,
        Problem::Truncated {
            needed: 10,
            available: 4
        }
    ));
    // A field past the end of its record (a pool record cut short).
    let p = pool_payload(b"pool0", 1, 65536, &[(0, 0, 1, 0)]);
    let e = decode_records(&rec(1, 1, &p[..p.len() - 1])).unwrap_err();
    assert_eq!(e.structure, Structure::PoolRecord);
    assert!(matches!(e.problem, Problem::Truncated { .. }));
    // A string length past the end.
    let e = decode_records(&rec(1, 1, &[200, 0, b'a'])).unwrap_err();
    assert_eq!((e.structure, e.offset), (Structure::PoolRecord, 8 + 2));
}

#[test]
fn counts_past_the_end_are_refused_before_allocating() {
    // 60000 members in a record of a few bytes.
    let mut p = pool_payload(b"pool0", 1, 65536, &[]);
    let n = p.len();
    p[n - 2..].copy_from_slice(&60000u16.to_le_bytes());
    let e = decode_records(&rec(1, 1, &p)).unwrap_err();
    assert!(matches!(e.problem, Problem::Truncated { needed, .. } if needed == 60000 * 37));
    // u32::MAX extents.
    let mut v = volume_payload(b"v", 1, &[]);
    let n = v.len();
    v[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = decode_records(&rec(5, 1, &v)).unwrap_err();
    assert_eq!(e.structure, Structure::VolumeRecord);
    assert!(matches!(e.problem, Problem::Truncated { .. }));
}

#[test]
fn bad_utf8_is_refused() {
    let e = decode_records(&rec(
        1,
        1,
        &pool_payload(&[0xff, 0xfe], 1, 65536, &[(0, 0, 1, 0)]),
    ))
    .unwrap_err();
    assert_eq!((e.structure, e.offset), (Structure::PoolRecord, 8));
    assert_eq!(e.problem, Problem::BadUtf8 { field: "pool name" });
}

#[test]
fn overlong_and_bad_strings_are_refused() {
    let e = decode_records(&rec(
        1,
        1,
        &pool_payload(&[b'a'; 65], 1, 65536, &[(0, 0, 1, 0)]),
    ))
    .unwrap_err();
    assert_eq!((e.structure, e.offset), (Structure::PoolRecord, 0));
    assert!(
        matches!(
            &e.problem,
            Problem::Config(ConfigError::BadString {
                problem: StringProblem::TooLong { len: 65, max: 64 },
                ..
            })
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("Pool record at byte 0: Pool name \"aaa"),
        "{e}"
    );
    // 64 bytes is fine.
    decode_records(&rec(
        1,
        1,
        &pool_payload(&[b'a'; 64], 1, 65536, &[(0, 0, 1, 0)]),
    ))
    .unwrap();
    // Empty and control characters.
    for name in [&b""[..], b"a\nb"] {
        assert!(
            decode_records(&rec(1, 1, &pool_payload(name, 1, 65536, &[(0, 0, 1, 0)]))).is_err()
        );
    }

    let mut cfg = config(RaidLevel::Raid1, 2);
    cfg.subsystems[0].nqn = "iqn.2024-01.io.duplex:sub0".to_string();
    assert!(matches!(
        cfg.validate(),
        Err(ConfigError::BadString {
            problem: StringProblem::NotNqn,
            ..
        })
    ));
    let mut cfg = config(RaidLevel::Raid1, 2);
    cfg.subsystems[0]
        .hosts
        .push(format!("nqn.{}", "h".repeat(220)));
    assert!(matches!(
        cfg.validate(),
        Err(ConfigError::BadString {
            problem: StringProblem::TooLong { len: 224, max: 223 },
            ..
        })
    ));
    let mut cfg = config(RaidLevel::Raid1, 2);
    cfg.subsystems[0]
        .hosts
        .push(format!("nqn.{}", "h".repeat(219)));
    cfg.validate().unwrap();
    let mut cfg = config(RaidLevel::Raid1, 2);
    cfg.subsystems[0].serial = "S".repeat(21);
    assert!(cfg.validate().is_err());
    let mut cfg = config(RaidLevel::Raid1, 2);
    cfg.subsystems[0].model = "modèle".to_string();
    assert!(matches!(
        cfg.validate(),
        Err(ConfigError::BadString {
            problem: StringProblem::NotPrintableAscii,
            ..
        })
    ));
    let mut cfg = config(RaidLevel::Raid1, 2);
    let host = cfg.subsystems[0].hosts[0].clone();
    cfg.subsystems[0].hosts.push(host);
    assert!(matches!(cfg.validate(), Err(ConfigError::Duplicate { .. })));
}

#[test]
fn extents_must_cover_the_volume_without_overlap() {
    let v = |extents: &[(u64, u64, u64)]| volume_payload(b"v", 100, extents);
    let err = |p: Vec<u8>| -> ConfigError {
        match decode_records(&rec(5, 1, &p)).unwrap_err().problem {
            Problem::Config(e) => e,
            other => panic!("{other:?}"),
        }
    };
    decode_records(&rec(5, 1, &v(&[(0, 0, 100)]))).unwrap();
    decode_records(&rec(5, 1, &v(&[(50, 0, 50), (0, 900, 50)]))).unwrap();
    assert!(matches!(
        err(v(&[(0, 0, 60), (50, 100, 50)])),
        ConfigError::ExtentOverlap {
            first: 0,
            second: 1,
            block: 50,
            ..
        }
    ));
    assert!(matches!(
        err(v(&[(0, 0, 40), (50, 100, 50)])),
        ConfigError::ExtentCoverage {
            start: 40,
            end: 50,
            ..
        }
    ));
    assert!(matches!(
        err(v(&[(0, 0, 90)])),
        ConfigError::ExtentCoverage {
            start: 90,
            end: 100,
            ..
        }
    ));
    assert!(matches!(
        err(v(&[(0, 0, 101)])),
        ConfigError::ExtentCoverage {
            start: 100,
            end: 101,
            ..
        }
    ));
    assert!(matches!(err(v(&[])), ConfigError::ExtentCoverage { .. }));
    assert!(matches!(
        err(v(&[(0, 0, 100), (100, 0, 0)])),
        ConfigError::BadExtent { index: 1, .. }
    ));
    assert!(matches!(
        err(v(&[(0, 0, 50), (50, u64::MAX, 50)])),
        ConfigError::BadExtent { index: 1, .. }
    ));
    let msg = err(v(&[(0, 0, 60), (50, 100, 50)])).to_string();
    assert!(
        msg.starts_with("Volume \"v\": extents 0 and 1 overlap"),
        "{msg}"
    );
}

#[test]
fn volumes_must_not_overlap_in_the_pool_nor_leave_it() {
    let mut cfg = config(RaidLevel::Raid1, 2);
    cfg.volumes[1].extents[0].pool_block = 599; // vol0 maps pool blocks 0..600
    assert!(matches!(
        cfg.validate(),
        Err(ConfigError::PoolOverlap { at, .. }) if at == 599 * 4096
    ));
    let mut cfg = config(RaidLevel::Raid1, 2);
    cfg.volumes[1].extents[0].pool_block = 2399; // vol0's second extent is 2000..2400
    assert!(matches!(
        cfg.validate(),
        Err(ConfigError::PoolOverlap { .. })
    ));
    // A 512-byte volume overlapping a 4096-byte one is compared in bytes.
    let mut cfg = config(RaidLevel::Raid1, 2);
    cfg.volumes[1].block_size = 512;
    cfg.volumes[1].extents[0].pool_block = 8 * 599 + 7;
    assert!(matches!(
        cfg.validate(),
        Err(ConfigError::PoolOverlap { .. })
    ));
    cfg.volumes[1].extents[0].pool_block = 8 * 600;
    cfg.validate().unwrap();
    // Past the pool's capacity.
    let mut cfg = config(RaidLevel::Raid1, 2);
    let blocks = cfg.capacity_bytes().unwrap() / 4096;
    cfg.volumes[1].extents[0].pool_block = blocks - 499;
    assert!(matches!(
        cfg.validate(),
        Err(ConfigError::ExtentOutsidePool { index: 0, .. })
    ));
    cfg.volumes[1].extents[0].pool_block = blocks - 500;
    cfg.validate().unwrap();
    // Through decoding: the body-level error is at the body's start.
    let mut cfg = config(RaidLevel::Raid1, 2);
    let good = cfg.encode_body().unwrap();
    cfg.volumes[1].extents[0].pool_block = 0;
    let overlapping = cfg.clone();
    let image = MetadataImage {
        slot_index: 0,
        generation: 1,
        epoch: 1,
        writer_node: 0,
        config: overlapping,
    };
    assert!(image.encode(1 << 20).is_err());
    assert!(PoolConfig::decode_body(&good).is_ok());
}

#[test]
fn unknown_records_must_understand_or_skip() {
    // Optional: skipped, the config is what the known records say.
    let body = body_with(&[rec(999, 0, b"from the future"), rec(1000, 0x8000, b"")]);
    let recs = decode_records(&body).unwrap();
    assert!(recs.iter().any(|r| matches!(
        r,
        Record::Skipped {
            record_type: 999,
            flags: 0,
            length: 15,
            ..
        }
    )));
    let cfg = PoolConfig::decode_body(&body).unwrap();
    assert_eq!(cfg.cluster_generation, 7);
    // Must-understand: refused, at the record's offset.
    let base = body_with(&[]).len() as u64;
    let body = body_with(&[rec(999, 1, b"from the future")]);
    let e = decode_records(&body).unwrap_err();
    assert_eq!((e.structure, e.offset), (Structure::RecordHeader, base));
    assert_eq!(
        e.problem,
        Problem::UnknownRequiredRecord { record_type: 999 }
    );
    // Through a whole image, offsets are from the slot's start.
    let e = MetadataImage::parse(&image_bytes(&body, 1, POOL.0)).unwrap_err();
    assert_eq!(e.offset, 128 + base);
    assert!(e.to_string().contains("must-understand"), "{e}");
}

#[test]
fn record_sets_must_be_complete_and_unique() {
    let e = PoolConfig::decode_body(&[good_pool(), ownership(1)].concat()).unwrap_err();
    assert_eq!((e.structure, e.offset), (Structure::ImageBody, 0));
    assert_eq!(
        e.problem,
        Problem::MissingRecord {
            record: "cluster config"
        }
    );
    let e = PoolConfig::decode_body(&[ownership(1), cluster()].concat()).unwrap_err();
    assert_eq!(e.problem, Problem::MissingRecord { record: "pool" });
    let e = PoolConfig::decode_body(&body_with(&[ownership(1)])).unwrap_err();
    assert_eq!(e.structure, Structure::OwnershipRecord);
    assert_eq!(
        e.problem,
        Problem::DuplicateRecord {
            record: "ownership"
        }
    );
    assert!(PoolConfig::decode_body(&[]).is_err());
}

#[test]
fn trailing_bytes_in_a_known_record() {
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&1u64.to_le_bytes());
    p.push(0);
    let e = decode_records(&rec(2, 1, &p)).unwrap_err();
    assert_eq!(e.structure, Structure::OwnershipRecord);
    assert_eq!(e.problem, Problem::TrailingBytes { count: 1 });
    assert_eq!(e.offset, 8 + 12);
}

#[test]
fn pool_record_rules() {
    let p = |level, chunk, members: &[(u8, u32, u8, u64)]| {
        decode_records(&rec(1, 1, &pool_payload(b"p", level, chunk, members)))
    };
    // Codes other than 0, 1, 10, 5 and 6 are unknown.
    for level in [2u8, 3, 4, 7, 11, 255] {
        let e = p(level, 65536, &[(0, 0, 1, 0)]).unwrap_err();
        assert_eq!(e.offset, 8 + 3 + 16, "{e}");
        assert!(matches!(
            e.problem,
            Problem::BadValue {
                field: "RAID level",
                ..
            }
        ));
    }
    assert!(p(7, 65536, &[(0, 0, 1, 0)])
        .unwrap_err()
        .to_string()
        .contains("unknown code"));
    // RAID 5 needs 3 members, RAID 6 four.
    let members =
        |n: u32| -> Vec<(u8, u32, u8, u64)> { (0..n).map(|i| (i as u8, i, 1, 0)).collect() };
    assert!(p(5, 65536, &members(2)).is_err());
    p(5, 65536, &members(3)).unwrap();
    assert!(p(6, 65536, &members(3)).is_err());
    p(6, 65536, &members(4)).unwrap();
    // Chunk sizes.
    for chunk in [0, 2048, 3 << 12, 2 << 20] {
        assert!(matches!(
            p(1, chunk, &[(0, 0, 1, 0)]).unwrap_err().problem,
            Problem::Config(ConfigError::ChunkSize(_))
        ));
    }
    // Member counts per level.
    assert!(p(10, 65536, &[(0, 0, 1, 0), (1, 1, 1, 0), (2, 2, 1, 0)]).is_err());
    p(
        10,
        65536,
        &[(0, 0, 1, 0), (1, 1, 1, 0), (2, 2, 1, 0), (3, 3, 1, 0)],
    )
    .unwrap();
    assert!(p(0, 65536, &[]).is_err());
    // Slots 0..n, each once; drives unique; states known; positions only when rebuilding.
    assert!(matches!(
        p(1, 65536, &[(0, 0, 1, 0), (1, 2, 1, 0)])
            .unwrap_err()
            .problem,
        Problem::Config(ConfigError::MemberSlot { slot: 2, .. })
    ));
    assert!(matches!(
        p(1, 65536, &[(0, 0, 1, 0), (1, 0, 1, 0)])
            .unwrap_err()
            .problem,
        Problem::Config(ConfigError::MemberSlot {
            slot: 0,
            why: "repeated",
            ..
        })
    ));
    assert!(matches!(
        p(1, 65536, &[(0, 0, 1, 0), (0, 1, 1, 0)])
            .unwrap_err()
            .problem,
        Problem::Config(ConfigError::Duplicate {
            what: "member drive",
            ..
        })
    ));
    assert!(matches!(
        p(1, 65536, &[(0, 0, 4, 0)]).unwrap_err().problem,
        Problem::BadValue {
            field: "member state",
            ..
        }
    ));
    assert!(matches!(
        p(1, 65536, &[(0, 0, 2, 7)]).unwrap_err().problem,
        Problem::BadValue {
            field: "member rebuild position",
            ..
        }
    ));
    p(1, 65536, &[(0, 0, 3, 7)]).unwrap();
}

#[test]
fn cross_record_rules() {
    let check = |f: &dyn Fn(&mut PoolConfig)| {
        let mut c = config(RaidLevel::Raid1, 2);
        f(&mut c);
        c.validate()
    };
    assert!(matches!(
        check(&|c| c.namespaces[0].subsystem_nqn = "nqn.other".into()),
        Err(ConfigError::UnknownSubsystem { .. })
    ));
    assert!(matches!(
        check(&|c| c.namespaces[0].volume_uuid = uuid(0xee, 1)),
        Err(ConfigError::UnknownVolume { .. })
    ));
    assert!(matches!(
        check(&|c| c.namespaces[1].nsid = 1),
        Err(ConfigError::Duplicate {
            what: "namespace",
            ..
        })
    ));
    for nsid in [0, 1025] {
        assert!(matches!(
            check(&|c| c.namespaces[0].nsid = nsid),
            Err(ConfigError::Nsid { .. })
        ));
    }
    assert!(check(&|c| c.namespaces[0].nsid = 1024).is_ok());
    assert!(matches!(
        check(&|c| c.namespaces[0].ana_group = 0),
        Err(ConfigError::AnaGroup { .. })
    ));
    assert!(matches!(
        check(&|c| c.volumes[1].name = "vol0".into()),
        Err(ConfigError::Duplicate {
            what: "volume name",
            ..
        })
    ));
    assert!(matches!(
        check(&|c| c.volumes[1].uuid = c.volumes[0].uuid),
        Err(ConfigError::Duplicate {
            what: "volume UUID",
            ..
        })
    ));
    assert!(matches!(
        check(&|c| c.volumes[1].nguid = c.volumes[0].nguid),
        Err(ConfigError::Duplicate {
            what: "volume NGUID",
            ..
        })
    ));
    assert!(matches!(
        check(&|c| c.subsystems.push(c.subsystems[0].clone())),
        Err(ConfigError::Duplicate {
            what: "subsystem NQN",
            ..
        })
    ));
    assert!(matches!(
        check(&|c| c.volumes[0].uuid = duplex_ondisk::Uuid::NIL),
        Err(ConfigError::NilUuid { .. })
    ));
    assert!(matches!(
        check(&|c| c.volumes[0].nguid = [0; 16]),
        Err(ConfigError::NilUuid { .. })
    ));
    assert!(matches!(
        check(&|c| c.volumes[0].flags = 1),
        Err(ConfigError::VolumeFlags { flags: 1, .. })
    ));
    assert!(matches!(
        check(&|c| c.volumes[0].block_size = 1024),
        Err(ConfigError::VolumeBlockSize { .. })
    ));
    assert!(matches!(
        check(&|c| {
            c.volumes[0].size_blocks = 0;
            c.volumes[0].extents.clear();
        }),
        Err(ConfigError::EmptyVolume { .. })
    ));
    assert!(matches!(
        check(&|c| c.volumes[0].parent = c.volumes[0].uuid),
        Err(ConfigError::SelfParent { .. })
    ));
    assert!(matches!(
        check(&|c| c.ownership.owner_node = 4),
        Err(ConfigError::NodeId { node: 4, .. })
    ));
    // Through decoding, a cross-record error names the body.
    let mut c = config(RaidLevel::Raid1, 2);
    let mut body = c.encode_body().unwrap();
    c.namespaces.clear();
    // Append a namespace of an unknown volume by hand.
    let mut ns = Vec::new();
    string(&mut ns, SUBSYS.as_bytes());
    ns.extend_from_slice(&9u32.to_le_bytes());
    ns.extend_from_slice(&uuid(0xee, 1).0);
    ns.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&rec(6, 1, &ns));
    assert!(matches!(
        config_err(&body),
        ConfigError::UnknownVolume { nsid: 9, .. }
    ));
    let e = PoolConfig::decode_body(&body).unwrap_err();
    assert_eq!((e.structure, e.offset), (Structure::ImageBody, 0));
}

#[test]
fn booleans_are_0_or_1() {
    let mut p = Vec::new();
    string(&mut p, SUBSYS.as_bytes());
    p.push(2);
    string(&mut p, b"");
    string(&mut p, b"");
    p.extend_from_slice(&0u16.to_le_bytes());
    let e = decode_records(&rec(4, 1, &p)).unwrap_err();
    assert_eq!(e.structure, Structure::SubsystemRecord);
    assert!(matches!(
        e.problem,
        Problem::BadValue {
            field: "allow any host",
            value: 2,
            ..
        }
    ));
    assert_eq!(e.offset, 8 + 2 + SUBSYS.len() as u64);
}

// ---------------------------------------------------------------------------------------------
// Reservation records (type 10).

/// A reservation payload by hand: NQN, nsid, version, generation, type, flags, holder, the
/// count as given, then `entries` of (host identifier, key, controller id).
fn resv_payload(
    nsid: u32,
    rtype: u8,
    flags: u8,
    holder: [u8; 16],
    count: u16,
    entries: &[([u8; 16], u64, u16)],
) -> Vec<u8> {
    let mut p = Vec::new();
    string(&mut p, SUBSYS.as_bytes());
    p.extend_from_slice(&nsid.to_le_bytes());
    p.extend_from_slice(&5u64.to_le_bytes());
    p.extend_from_slice(&9u32.to_le_bytes());
    p.push(rtype);
    p.push(flags);
    p.extend_from_slice(&holder);
    p.extend_from_slice(&count.to_le_bytes());
    for (host, key, cntlid) in entries {
        p.extend_from_slice(host);
        p.extend_from_slice(&key.to_le_bytes());
        p.extend_from_slice(&cntlid.to_le_bytes());
    }
    p
}

/// `n` registrants by hand: hosts 1..=n.
fn entries(n: usize) -> Vec<([u8; 16], u64, u16)> {
    (1..=n)
        .map(|i| (host_id(i as u8), i as u64, i as u16))
        .collect()
}

/// The valid body of the common configuration (namespaces 1 and 2 of `SUBSYS`), then
/// `extra`; returns the body and the offset of `extra`.
fn resv_body(extra: &[u8]) -> (Vec<u8>, u64) {
    let mut body = config(RaidLevel::Raid1, 2).encode_body().unwrap();
    let at = body.len() as u64;
    body.extend_from_slice(extra);
    (body, at)
}

/// Offset of the nsid in a reservation payload of `SUBSYS` (after the record header): `s`.
fn resv_s() -> u64 {
    8 + 2 + SUBSYS.len() as u64
}

fn resv_err(c: &PoolConfig) -> String {
    match c.validate() {
        Err(e @ ConfigError::Reservation { .. }) => {
            assert!(
                matches!(
                    c.encode_body(),
                    Err(EncodeError::Config(ConfigError::Reservation { .. }))
                ),
                "an invalid reservation is never written"
            );
            e.to_string()
        }
        other => panic!("expected a reservation error, got {other:?}"),
    }
}

#[test]
fn reservation_rules_are_checked_when_built() {
    let with = |f: &dyn Fn(&mut duplex_ondisk::Reservation)| {
        let mut c = config(RaidLevel::Raid1, 2);
        let mut r = reservation(1, 1, true);
        f(&mut r);
        c.reservations = vec![r];
        c
    };
    with(&|_| {}).validate().unwrap();
    // The type: 0..=6.
    for rtype in [7u8, 255] {
        let msg = resv_err(&with(&|r| r.rtype = rtype));
        assert!(msg.contains("is not an NVMe type"), "{msg}");
    }
    // At most 64 registrants.
    let msg = resv_err(&with(&|r| {
        r.registrants = (1..=65).map(registrant).collect()
    }));
    assert!(msg.contains("65 registrants, at most 64"), "{msg}");
    let ok = with(&|r| r.registrants = (1..=64).map(registrant).collect());
    ok.validate().unwrap();
    // Host identifiers: not all zero, each once.
    let msg = resv_err(&with(&|r| r.registrants[0].host_id = [0; 16]));
    assert!(
        msg.contains("registrant 0 has the all-zero host identifier"),
        "{msg}"
    );
    let msg = resv_err(&with(&|r| r.registrants[2].host_id = host_id(1)));
    assert!(msg.contains("is registered twice"), "{msg}");
    // Types 1 to 4: a holder, and a registrant.
    for rtype in 1..=4u8 {
        let msg = resv_err(&with(&|r| {
            r.rtype = rtype;
            r.holder = [0; 16];
        }));
        assert!(msg.contains("reservation has no holder"), "{msg}");
        let msg = resv_err(&with(&|r| {
            r.rtype = rtype;
            r.holder = host_id(9);
        }));
        assert!(msg.contains("is not a registrant"), "{msg}");
    }
    // No reservation, and types 5 and 6: no single holder.
    for rtype in [0u8, 5, 6] {
        let msg = resv_err(&with(&|r| r.rtype = rtype));
        assert!(msg.contains("holder"), "{msg}");
        with(&|r| {
            r.rtype = rtype;
            r.holder = [0; 16];
        })
        .validate()
        .unwrap();
    }
    // Types 5 and 6: at least one registrant.
    for rtype in [5u8, 6] {
        let msg = resv_err(&with(&|r| {
            r.rtype = rtype;
            r.holder = [0; 16];
            r.registrants.clear();
        }));
        assert!(msg.contains("has no registrants"), "{msg}");
    }
    // The namespace: in range, of this image, one record each.
    for nsid in [0, 1025] {
        let msg = resv_err(&with(&|r| r.nsid = nsid));
        assert!(msg.contains("nsid is outside 1..=1024"), "{msg}");
    }
    let msg = resv_err(&with(&|r| r.nsid = 3));
    assert!(
        msg.starts_with(&format!(
            "Reservation of namespace 3 of {SUBSYS}: this image has no such namespace"
        )),
        "{msg}"
    );
    let msg = resv_err(&with(&|r| r.subnqn = "nqn.2024-01.io.duplex:other".into()));
    assert!(msg.contains("no such namespace"), "{msg}");
    let mut twice = with(&|_| {});
    twice.reservations.push(reservation(1, 0, false));
    let msg = resv_err(&twice);
    assert!(msg.contains("a second reservation record"), "{msg}");
    twice.reservations[1].nsid = 2;
    twice.validate().unwrap();
    // Removing a namespace without its reservation state is refused.
    let mut gone = with(&|_| {});
    gone.namespaces.remove(0);
    let msg = resv_err(&gone);
    assert!(msg.contains("no such namespace"), "{msg}");
    gone.reservations.clear();
    gone.validate().unwrap();
    // A bad subsystem NQN.
    assert!(matches!(
        with(&|r| r.subnqn = "iqn.x".into()).validate(),
        Err(ConfigError::BadString {
            field: "Reservation subsystem NQN",
            problem: StringProblem::NotNqn,
            ..
        })
    ));
}

#[test]
fn reservation_records_are_refused_when_parsed() {
    let s = resv_s();
    let good = resv_payload(1, 2, 1, host_id(2), 3, &entries(3));
    let (body, base) = resv_body(&rec(10, 1, &good));
    assert_eq!(
        PoolConfig::decode_body(&body).unwrap().reservations[0].holder,
        host_id(2)
    );

    // Truncated anywhere inside the payload (the record length says so): refused, never read
    // past.
    for cut in 0..good.len() {
        let (body, _) = resv_body(&rec(10, 1, &good[..cut]));
        let e = PoolConfig::decode_body(&body).unwrap_err();
        assert_eq!(e.structure, Structure::ReservationRecord, "cut at {cut}");
        assert!(matches!(e.problem, Problem::Truncated { .. }), "{e}");
    }
    // A record length past the body's end.
    let (mut body, _) = resv_body(&rec(10, 1, &good));
    body.truncate(body.len() - 1);
    let e = PoolConfig::decode_body(&body).unwrap_err();
    assert_eq!(e.structure, Structure::RecordHeader);
    // A count larger than the bytes: refused at the count before anything is allocated.
    let (body, _) = resv_body(&rec(
        10,
        1,
        &resv_payload(1, 2, 1, host_id(2), 4, &entries(3)),
    ));
    let e = PoolConfig::decode_body(&body).unwrap_err();
    assert_eq!(
        (e.structure, e.offset),
        (Structure::ReservationRecord, base + s + 34)
    );
    assert_eq!(
        e.problem,
        Problem::Truncated {
            needed: 4 * 26,
            available: 3 * 26
        }
    );
    // Fewer than the bytes: the record length must be exactly the count's.
    let (body, _) = resv_body(&rec(
        10,
        1,
        &resv_payload(1, 2, 1, host_id(2), 2, &entries(3)),
    ));
    let e = PoolConfig::decode_body(&body).unwrap_err();
    assert_eq!(e.problem, Problem::TrailingBytes { count: 26 });
    // More than 64, with or without the bytes for them.
    for (count, n) in [(65u16, 65), (u16::MAX, 0)] {
        let (body, _) = resv_body(&rec(
            10,
            1,
            &resv_payload(1, 6, 0, [0; 16], count, &entries(n)),
        ));
        let e = PoolConfig::decode_body(&body).unwrap_err();
        assert_eq!(
            (e.structure, e.offset),
            (Structure::ReservationRecord, base + s + 34)
        );
        assert!(
            matches!(e.problem, Problem::BadValue { field: "registrant count", value, .. } if value == u64::from(count)),
            "{e}"
        );
    }
    let (body, _) = resv_body(&rec(
        10,
        1,
        &resv_payload(1, 6, 0, [0; 16], 64, &entries(64)),
    ));
    assert_eq!(
        PoolConfig::decode_body(&body).unwrap().reservations[0]
            .registrants
            .len(),
        64
    );
    // Flag bits other than PTPL.
    for flags in [2u8, 0x80, 3, 0xff] {
        let (body, _) = resv_body(&rec(
            10,
            1,
            &resv_payload(1, 2, flags, host_id(2), 3, &entries(3)),
        ));
        let e = PoolConfig::decode_body(&body).unwrap_err();
        assert_eq!(
            (e.structure, e.offset),
            (Structure::ReservationRecord, base + s + 17)
        );
        assert!(
            matches!(e.problem, Problem::BadValue { field: "reservation flags", value, .. } if value == u64::from(flags)),
            "{e}"
        );
    }
    // An unknown type, at its field.
    let (body, _) = resv_body(&rec(10, 1, &resv_payload(1, 7, 0, [0; 16], 3, &entries(3))));
    let e = PoolConfig::decode_body(&body).unwrap_err();
    assert_eq!(
        (e.structure, e.offset),
        (Structure::ReservationRecord, base + s + 16)
    );
    assert!(
        e.to_string().contains("reservation type 7 is invalid"),
        "{e}"
    );
    // The record's own rules: at the record, naming it.
    for payload in [
        resv_payload(1, 1, 0, host_id(9), 3, &entries(3)),
        resv_payload(1, 1, 0, [0; 16], 3, &entries(3)),
        resv_payload(1, 0, 0, host_id(1), 3, &entries(3)),
        resv_payload(1, 5, 0, host_id(1), 3, &entries(3)),
        resv_payload(1, 6, 0, [0; 16], 0, &[]),
        resv_payload(1, 0, 0, [0; 16], 2, &[entries(1)[0], entries(1)[0]]),
        resv_payload(1, 0, 0, [0; 16], 1, &[([0; 16], 1, 1)]),
    ] {
        let (body, _) = resv_body(&rec(10, 1, &payload));
        let e = PoolConfig::decode_body(&body).unwrap_err();
        assert_eq!(
            (e.structure, e.offset),
            (Structure::ReservationRecord, base)
        );
        assert!(
            matches!(
                e.problem,
                Problem::Config(ConfigError::Reservation { nsid: 1, .. })
            ),
            "{e}"
        );
        assert!(
            e.to_string().starts_with(&format!(
                "Reservation record at byte {base}: Reservation of namespace 1 of {SUBSYS}: "
            )),
            "{e}"
        );
    }
    // The rules across records: a namespace this image does not have, or twice.
    let (body, _) = resv_body(&rec(10, 1, &resv_payload(3, 0, 0, [0; 16], 0, &[])));
    let e = PoolConfig::decode_body(&body).unwrap_err();
    assert_eq!((e.structure, e.offset), (Structure::ImageBody, 0));
    assert!(matches!(
        config_err(&body),
        ConfigError::Reservation { nsid: 3, .. }
    ));
    let one = rec(10, 1, &resv_payload(1, 0, 0, [0; 16], 0, &[]));
    let (body, _) = resv_body(&[one.clone(), one].concat());
    assert!(config_err(&body)
        .to_string()
        .contains("a second reservation record"));
}

#[test]
fn a_reader_that_does_not_know_reservations_refuses_the_image() {
    let mut cfg = config(RaidLevel::Raid1, 2);
    cfg.reservations = vec![reservation(1, 1, true)];
    let body = cfg.encode_body().unwrap();
    let (_, at) = resv_body(&[]);
    let at = at as usize;
    // Written must-understand, after every other record.
    assert_eq!(u16::from_le_bytes([body[at], body[at + 1]]), 10);
    assert_eq!(u16::from_le_bytes([body[at + 2], body[at + 3]]) & 1, 1);
    // What an older reader sees (the record renumbered to a type this reader does not know):
    // the image is refused, rather than committed again without the registrations.
    let mut older = body.clone();
    older[at..at + 2].copy_from_slice(&999u16.to_le_bytes());
    let e = PoolConfig::decode_body(&older).unwrap_err();
    assert_eq!(
        (e.structure, e.offset, e.problem),
        (
            Structure::RecordHeader,
            at as u64,
            Problem::UnknownRequiredRecord { record_type: 999 }
        )
    );
}
