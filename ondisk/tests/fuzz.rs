//! Fuzz targets for the on-disk parsers and the import rule.
//!
//! Properties: no parser and no import panics, whatever the bytes; whatever a parser accepts
//! re-encodes to bytes that parse to the same value; and a plan the import rule returns has a
//! winner that is a valid image actually present in the inputs, at the place the plan names.
//!
//! * `*_arbitrary_bytes` feed raw bytes (most fail at the magic or the length, which is what a
//!   zeroed or foreign block looks like).
//! * `*_mutated` take a valid encoding and apply fuzzer-chosen byte edits and truncations, then
//!   (when the fuzzer says so) recompute the checksums so that field and record validation is
//!   reached rather than only the CRC check.
//! * `import_mutated_pools` damages, drops, swaps, truncates and duplicates the superblocks and
//!   slots of a simulated pool with a history; `import_arbitrary_drives` offers raw drives.
//!
//! Bounded under `cargo test` (iterations and a time cap per target, below); run longer with
//! `BOLERO_RANDOM_ITERATIONS=… BOLERO_RANDOM_TEST_TIME_MS=… cargo test --release -p
//! duplex-ondisk --test fuzz` (the variables win over the bounds in the code), or
//! coverage-guided with `cargo +nightly bolero test -p duplex-ondisk TARGET --engine libfuzzer
//! --sanitizer NONE -r 10000000` (cargo-bolero 0.13 builds every test binary of the package
//! and has no `--test`: the other binaries fail to link under its instrumentation, so give it a
//! `cargo` on `PATH` that turns `cargo test …` into `cargo test --test fuzz …`). The campaign of
//! issue 14, 10⁷ executions per target, no failure: `docs/PERFORMANCE.md`. A failure prints
//! `BOLERO_RANDOM_SEED=...`; set that variable to replay it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use duplex_ondisk::import::{plan_import, DriveInput, ImportRequest};
use duplex_ondisk::records::decode_records;
use duplex_ondisk::{
    Heartbeat, MetadataImage, PoolConfig, RaidLevel, Superblock, SuperblockCopy, Uuid,
};

/// Iterations of a parser target under `cargo test`.
const PARSE_ITERATIONS: usize = 200_000;
/// Iterations of an import target under `cargo test` (each parses a whole pool).
const IMPORT_ITERATIONS: usize = 20_000;
/// Wall-clock cap per target (a bound on the run, not an assertion).
const TIME_CAP: Duration = Duration::from_secs(4);

/// One edit of a valid encoding; positions are taken modulo the current length.
#[derive(Debug, Clone, Copy, bolero::TypeGenerator)]
enum Edit {
    /// XOR one byte with a non-zero mask.
    Flip { at: u16, mask: u8 },
    /// Overwrite one byte.
    Set { at: u16, value: u8 },
    /// Overwrite a little-endian u32 (counts and lengths).
    SetU32 { at: u16, value: u32 },
    /// Cut the input.
    Truncate { len: u16 },
}

fn apply(bytes: &mut Vec<u8>, edits: &[Edit]) {
    for e in edits {
        let n = bytes.len();
        if n == 0 {
            return;
        }
        match *e {
            Edit::Flip { at, mask } => bytes[usize::from(at) % n] ^= mask.max(1),
            Edit::Set { at, value } => bytes[usize::from(at) % n] = value,
            Edit::SetU32 { at, value } => {
                let at = usize::from(at) % n;
                for (i, b) in value.to_le_bytes().iter().enumerate() {
                    if let Some(x) = bytes.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            Edit::Truncate { len } => bytes.truncate(usize::from(len) % (n + 1)),
        }
    }
}

fn recrc(b: &mut [u8], at: usize) {
    if b.len() >= at + 4 {
        b[at..at + 4].fill(0);
        let crc = crc32c::crc32c(b);
        b[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Recomputes an image's body and header checksums (for whatever body length it claims).
fn reseal_image(b: &mut [u8]) {
    if b.len() < 128 {
        return;
    }
    let len = u32::from_le_bytes(b[52..56].try_into().unwrap()) as usize;
    if let Some(body) = b.get(128..128usize.saturating_add(len)) {
        let crc = crc32c::crc32c(body);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
    }
    recrc(&mut b[..128], 124);
}

fn check_superblock(bytes: &[u8]) {
    if let Ok(sb) = Superblock::parse(bytes) {
        assert_eq!(Superblock::parse(&sb.encode()[..]), Ok(sb));
    }
}

fn check_heartbeat(bytes: &[u8]) {
    if let Ok(hb) = Heartbeat::parse(bytes) {
        assert_eq!(Heartbeat::parse(&hb.encode()[..]), Ok(hb));
    }
}

fn check_image(bytes: &[u8]) {
    if let Ok(image) = MetadataImage::parse(bytes) {
        let again = image.encode(1 << 20).expect("a parsed image re-encodes");
        assert_eq!(MetadataImage::parse(&again), Ok(image));
    }
}

fn check_body(bytes: &[u8]) {
    let _ = decode_records(bytes);
    if let Ok(config) = PoolConfig::decode_body(bytes) {
        let again = config.encode_body().expect("a decoded config re-encodes");
        assert_eq!(PoolConfig::decode_body(&again), Ok(config));
    }
}

fn valid_superblock() -> Vec<u8> {
    superblock(uuid(0xd0, 1), 1, SuperblockCopy::Secondary).encode_vec()
}

fn valid_heartbeat() -> Vec<u8> {
    Heartbeat {
        node_id: 1,
        boot_id: uuid(1, 1),
        epoch: 3,
        counter: 99,
        peer_boot_id: uuid(1, 2),
        peer_counter: 98,
    }
    .encode()
    .to_vec()
}

fn valid_image() -> Vec<u8> {
    let mut sim = Sim::new(RaidLevel::Raid10, 4);
    sim.add_volume();
    // Every record type: a write sequence mark, a checksum area and reservation states too
    // (one held by a single host, one by all registrants).
    sim.commit(|c| {
        let l = layout();
        let (data, len) = duplex_ondisk::checksum_split(l.data_size, c.pool.chunk_size).unwrap();
        c.pool.member_data_bytes = data;
        c.write_seq_mark = 1 << 24;
        c.checksum_area = Some(duplex_ondisk::ChecksumArea {
            offset: l.data_offset + data,
            len,
        });
        c.reservations = vec![reservation(1, 2, true), reservation(2, 5, false)];
    });
    sim.image_bytes()
}

/// `raw` as the fields of a 4096-byte block behind a valid magic and version, with a valid CRC,
/// so that arbitrary field values reach field validation.
fn framed(magic: &[u8; 8], raw: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[..8].copy_from_slice(magic);
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    let n = raw.len().min(4092 - 12);
    b[12..12 + n].copy_from_slice(&raw[..n]);
    recrc(&mut b, 4092);
    b
}

#[test]
fn superblock_arbitrary_bytes() {
    bolero::check!()
        .with_iterations(PARSE_ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_max_len(5000)
        .for_each(|raw: &[u8]| {
            check_superblock(raw);
            check_superblock(&framed(b"DPLXSB01", raw));
        });
}

#[test]
fn superblock_mutated() {
    let valid = valid_superblock();
    check_superblock(&valid);
    bolero::check!()
        .with_iterations(PARSE_ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_type::<(Vec<Edit>, bool)>()
        .for_each(|(edits, reseal)| {
            let mut b = valid.clone();
            apply(&mut b, edits);
            if *reseal {
                recrc(&mut b, 4092);
            }
            check_superblock(&b);
        });
}

#[test]
fn heartbeat_arbitrary_and_mutated() {
    let valid = valid_heartbeat();
    check_heartbeat(&valid);
    bolero::check!()
        .with_iterations(PARSE_ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_type::<(Vec<Edit>, bool, Vec<u8>)>()
        .for_each(|(edits, reseal, raw)| {
            check_heartbeat(raw);
            check_heartbeat(&framed(b"DPLXHB01", raw));
            let mut b = valid.clone();
            apply(&mut b, edits);
            if *reseal {
                recrc(&mut b, 4092);
            }
            check_heartbeat(&b);
        });
}

#[test]
fn image_arbitrary_bytes() {
    bolero::check!()
        .with_iterations(PARSE_ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_max_len(4096)
        .for_each(|bytes: &[u8]| {
            check_image(bytes);
            // The same bytes behind a valid-looking header.
            let mut b = valid_header_for(bytes);
            b.extend_from_slice(bytes);
            check_image(&b);
        });
}

/// A header with correct checksums for `body`.
fn valid_header_for(body: &[u8]) -> Vec<u8> {
    static HEADER: OnceLock<Vec<u8>> = OnceLock::new();
    let mut b = HEADER.get_or_init(|| valid_image()[..128].to_vec()).clone();
    b[52..56].copy_from_slice(&(body.len() as u32).to_le_bytes());
    b[56..60].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    recrc(&mut b, 124);
    b
}

#[test]
fn image_mutated() {
    let valid = valid_image();
    check_image(&valid);
    assert!(MetadataImage::parse(&valid).is_ok());
    bolero::check!()
        .with_iterations(PARSE_ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_type::<(Vec<Edit>, bool)>()
        .for_each(|(edits, reseal)| {
            let mut b = valid.clone();
            apply(&mut b, edits);
            if *reseal {
                reseal_image(&mut b);
            }
            check_image(&b);
        });
}

/// A valid body (namespaces 1 and 2 of `SUBSYS`, no reservation state) then a must-understand
/// reservation record of `SUBSYS` whose fields after the NQN are `raw`, so that arbitrary
/// nsids, types, flags, holders, counts and registrants reach the record's decoding and rules.
fn with_reservation_payload(raw: &[u8]) -> Vec<u8> {
    static BODY: OnceLock<Vec<u8>> = OnceLock::new();
    let mut b = BODY
        .get_or_init(|| config(RaidLevel::Raid1, 2).encode_body().unwrap())
        .clone();
    let len = 2 + SUBSYS.len() + raw.len();
    b.extend_from_slice(&10u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&(len as u32).to_le_bytes());
    b.extend_from_slice(&(SUBSYS.len() as u16).to_le_bytes());
    b.extend_from_slice(SUBSYS.as_bytes());
    b.extend_from_slice(raw);
    b
}

#[test]
fn records_arbitrary_and_mutated() {
    let valid = {
        let image = valid_image();
        let len = u32::from_le_bytes(image[52..56].try_into().unwrap()) as usize;
        image[128..128 + len].to_vec()
    };
    check_body(&valid);
    assert!(PoolConfig::decode_body(&valid).is_ok());
    // The framing reaches a valid reservation: namespace 1, type 0, flags 0, no holder, no
    // registrants.
    let mut none = 1u32.to_le_bytes().to_vec();
    none.extend_from_slice(&[0; 8 + 4 + 1 + 1 + 16 + 2]);
    let framed = PoolConfig::decode_body(&with_reservation_payload(&none)).unwrap();
    assert_eq!(framed.reservations.len(), 1);
    bolero::check!()
        .with_iterations(PARSE_ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_type::<(Vec<Edit>, Vec<u8>)>()
        .for_each(|(edits, raw)| {
            check_body(raw);
            check_body(&with_reservation_payload(raw));
            let mut b = valid.clone();
            apply(&mut b, edits);
            check_body(&b);
        });
}

/// Asserts what a plan promises about its inputs.
fn check_import(req: &ImportRequest) {
    let Ok(plan) = plan_import(req) else {
        return;
    };
    // The winner is a valid image at the place the plan names (labels need not be unique).
    let found = req
        .drives
        .iter()
        .filter(|d| d.label == plan.source.drive)
        .filter_map(|d| d.slots.get(plan.source.slot as usize)?.as_ref())
        .any(|bytes| MetadataImage::parse(bytes).as_ref() == Ok(&plan.winner));
    assert!(found, "the winner is not at {}", plan.source);
    assert_eq!(plan.winner.slot_index, plan.source.slot);
    assert_eq!(plan.winner.pool_uuid(), plan.pool);
    // No valid image of the pool's drives is newer.
    for d in &plan.drives {
        for s in &d.slots {
            if let duplex_ondisk::import::SlotState::Valid { stamp } = s {
                assert!(*stamp <= plan.winner.stamp());
            }
        }
    }
    assert_eq!(plan.members.len(), plan.winner.config.pool.members.len());
    assert_eq!(plan.drives.len(), req.drives.len());
}

/// Pools with histories, built once: a mirror, a RAID 10 after a takeover and a failure.
fn pools() -> &'static [Vec<DriveInput>] {
    static POOLS: OnceLock<Vec<Vec<DriveInput>>> = OnceLock::new();
    POOLS.get_or_init(|| {
        let mut a = Sim::new(RaidLevel::Raid1, 3);
        a.add_volume();
        a.commit(|c| c.cluster_generation = 5);
        let mut b = Sim::new(RaidLevel::Raid10, 4);
        b.add_volume();
        b.take_over(1);
        b.fail(3);
        b.commit_to(&[0], |c| c.cluster_generation = 9);
        let mut c = Sim::new(RaidLevel::Raid0, 2);
        for _ in 0..9 {
            c.add_volume();
        }
        vec![a.drives, b.drives, c.drives]
    })
}

/// Which block of a drive an import edit hits.
#[derive(Debug, Clone, Copy, bolero::TypeGenerator)]
enum Block {
    Primary,
    Secondary,
    Slot(u8),
}

#[derive(Debug, Clone, bolero::TypeGenerator)]
enum ImportEdit {
    /// Byte edits of one block, then maybe recompute its checksums.
    Bytes {
        drive: u8,
        block: Block,
        edits: Vec<Edit>,
        reseal: bool,
    },
    /// The read of one block fails.
    Lose { drive: u8, block: Block },
    /// One block replaced by another drive's (or another position's).
    Copy {
        from: u8,
        from_block: Block,
        to: u8,
        to_block: Block,
    },
    /// A drive not offered.
    Remove { drive: u8 },
    /// A drive offered twice (a clone), maybe under the same label.
    Duplicate { drive: u8, same_label: bool },
    /// Fewer slots read.
    TruncateSlots { drive: u8, len: u8 },
}

fn block(d: &mut DriveInput, b: Block) -> Option<&mut Option<Vec<u8>>> {
    match b {
        Block::Primary => Some(&mut d.primary),
        Block::Secondary => Some(&mut d.secondary),
        Block::Slot(i) => {
            let n = d.slots.len();
            if n == 0 {
                None
            } else {
                d.slots.get_mut(usize::from(i) % n)
            }
        }
    }
}

fn edit_pool(drives: &mut Vec<DriveInput>, e: &ImportEdit) {
    let n = drives.len();
    if n == 0 {
        return;
    }
    let pick = |i: u8| usize::from(i) % n;
    match e {
        ImportEdit::Bytes {
            drive,
            block: b,
            edits,
            reseal,
        } => {
            let is_slot = matches!(b, Block::Slot(_));
            if let Some(Some(bytes)) = block(&mut drives[pick(*drive)], *b) {
                apply(bytes, edits);
                if *reseal {
                    if is_slot {
                        reseal_image(bytes);
                    } else {
                        recrc(bytes, 4092);
                    }
                }
            }
        }
        ImportEdit::Lose { drive, block: b } => {
            if let Some(x) = block(&mut drives[pick(*drive)], *b) {
                *x = None;
            }
        }
        ImportEdit::Copy {
            from,
            from_block,
            to,
            to_block,
        } => {
            let value = block(&mut drives[pick(*from)], *from_block).and_then(|x| x.clone());
            if let Some(x) = block(&mut drives[pick(*to)], *to_block) {
                *x = value;
            }
        }
        ImportEdit::Remove { drive } => {
            drives.remove(pick(*drive));
        }
        ImportEdit::Duplicate { drive, same_label } => {
            let mut d = drives[pick(*drive)].clone();
            if !same_label {
                d.label.push_str("-clone");
            }
            drives.push(d);
        }
        ImportEdit::TruncateSlots { drive, len } => {
            drives[pick(*drive)].slots.truncate(usize::from(*len) % 10);
        }
    }
}

#[test]
fn import_mutated_pools() {
    for p in pools() {
        let req = ImportRequest {
            drives: p.clone(),
            pool: None,
            force: false,
        };
        assert!(plan_import(&req).is_ok());
        check_import(&req);
    }
    bolero::check!()
        .with_iterations(IMPORT_ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_type::<(u8, Vec<ImportEdit>, bool, u8)>()
        .for_each(|(which, edits, force, pool)| {
            let pools = pools();
            let mut drives = pools[usize::from(*which) % pools.len()].clone();
            for e in edits {
                edit_pool(&mut drives, e);
            }
            let pool = match pool % 4 {
                0 | 1 => None,
                2 => Some(POOL),
                _ => Some(Uuid([*pool; 16])),
            };
            check_import(&ImportRequest {
                drives,
                pool,
                force: *force,
            });
        });
}

#[test]
fn import_arbitrary_drives() {
    type Raw = Vec<(Option<Vec<u8>>, Option<Vec<u8>>, Vec<Option<Vec<u8>>>)>;
    bolero::check!()
        .with_iterations(IMPORT_ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_type::<(Raw, bool, Option<[u8; 16]>)>()
        .for_each(|(raw, force, pool)| {
            let drives = raw
                .iter()
                .enumerate()
                .map(|(i, (p, s, slots))| DriveInput {
                    label: format!("r{i}"),
                    primary: p.clone(),
                    secondary: s.clone(),
                    slots: slots.clone(),
                })
                .collect();
            check_import(&ImportRequest {
                drives,
                pool: pool.map(Uuid),
                force: *force,
            });
        });
}
