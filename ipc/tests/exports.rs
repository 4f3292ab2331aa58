//! The exports region: publish/read round trips, readers racing a writer, a writer dying
//! mid-write, corrupt region contents, and bounded fuzzing of the table decoder (bolero).
//!
//! The fuzz targets run a bounded number of iterations under `cargo test`; run longer with
//! `BOLERO_RANDOM_ITERATIONS=… BOLERO_RANDOM_TEST_TIME_MS=… cargo test --release -p duplex-ipc
//! --test exports`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use duplex_ipc::exports::{
    AnaGroupState, AnaState, ExportNamespace, ExportRegistrant, ExportReservation, ExportSubsystem,
    ExportTable, ExportsError, ExportsRegion, TableError, DEFAULT_EXPORTS_SIZE, MAX_NSID,
};
use duplex_ipc::lifecycle::Health;

/// A 16-byte identifier derived from `(kind, generation, index)`: unique and never zero.
fn id(kind: u8, g: u64, i: u32) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = kind;
    a[1..9].copy_from_slice(&g.to_le_bytes());
    a[9..13].copy_from_slice(&i.to_le_bytes());
    a
}

/// The table of generation `g`: every field a function of `g`, its length varying with it.
fn table(g: u64) -> ExportTable {
    let namespaces = (1..=(g % 7) as u32 + 1)
        .map(|i| ExportNamespace {
            nsid: i * 3,
            volume: i + g as u32,
            block_size: if g % 2 == 0 { 4096 } else { 512 },
            blocks: g * 10 + u64::from(i),
            nguid: id(1, g, i),
            uuid: id(2, g, i),
            ana_group: 1 + (g % 4) as u32,
        })
        .collect();
    ExportTable {
        generation: g,
        subsystems: vec![
            ExportSubsystem {
                nqn: format!("nqn.2026-12.io.duplex:s{}", g % 3),
                serial: format!("sn{}", g % 1_000_000),
                model: "duplex".into(),
                allow_any_host: g % 2 == 0,
                hosts: (0..g % 5)
                    .map(|i| format!("nqn.2014-08.org.nvmexpress:uuid:{i}-{g}"))
                    .collect(),
                // The first host (when there is one) must authenticate.
                secrets: (0..(g % 5).min(1))
                    .map(|i| duplex_ipc::exports::ExportSecret {
                        host: format!("nqn.2014-08.org.nvmexpress:uuid:{i}-{g}"),
                        sealed: vec![1; 40 + (g % 7) as usize],
                    })
                    .collect(),
                namespaces,
            },
            ExportSubsystem {
                nqn: "nqn.2026-12.io.duplex:fixed".into(),
                serial: "fixed".into(),
                model: "duplex fixed".into(),
                allow_any_host: true,
                hosts: vec![],
                secrets: vec![],
                namespaces: vec![],
            },
        ],
        // Every group a namespace may name, in a state that varies with `g`.
        ana: (1..=4)
            .map(|group| AnaGroupState {
                group,
                state: [
                    AnaState::Optimized,
                    AnaState::NonOptimized,
                    AnaState::Inaccessible,
                    AnaState::PersistentLoss,
                    AnaState::Change,
                ][((g + u64::from(group)) % 5) as usize],
            })
            .collect(),
        // Every other table: the first namespace with reservation state (g % 4 registrants).
        reservations: if g % 2 == 0 {
            vec![ExportReservation {
                nguid: id(1, g, 1),
                version: g * 3,
                generation: g as u32 + 7,
                rtype: (g % 7) as u8,
                ptpl: g % 3 == 0,
                holder: if g % 7 > 0 && g % 7 < 5 {
                    id(3, g, 1)
                } else {
                    [0; 16]
                },
                registrants: (0..g % 4)
                    .map(|i| ExportRegistrant {
                        host_id: id(3, g, i as u32 + 1),
                        key: 0xAB00 + i,
                        cntlid: 0xFFFF,
                    })
                    .collect(),
            }]
        } else {
            vec![]
        },
    }
}

#[test]
fn ana_states_are_said_for_every_group_and_checked() {
    let t = table(3);
    let back = ExportTable::decode(&t.encode().expect("encodes")).expect("decodes");
    assert_eq!(back, t);
    assert_eq!(back.ana_state(1), Some(AnaState::Change));
    assert_eq!(back.ana_state(2), Some(AnaState::Optimized));
    assert_eq!(back.ana_state(4), Some(AnaState::Inaccessible));
    assert_eq!(back.ana_state(9), None);

    // A namespace whose group has no state is refused: a group must never default to serving.
    let mut missing = table(3);
    let group = missing.subsystems[0].namespaces[0].ana_group;
    missing.ana.retain(|g| g.group != group);
    let err = missing.encode().expect_err("a group without a state");
    assert!(err.to_string().contains("has no state"), "{err}");

    let mut twice = table(3);
    twice.ana.push(twice.ana[0]);
    assert!(matches!(twice.validate(), Err(TableError::AnaGroup { .. })));
    let mut zero = table(3);
    zero.ana.push(AnaGroupState {
        group: 0,
        state: AnaState::Optimized,
    });
    assert!(matches!(
        zero.validate(),
        Err(TableError::AnaGroup { group: 0, .. })
    ));

    // A state byte that is not an ANA state: the last group's state is the byte before the
    // (empty, table 3 has no reservations) reservation count, the last 4 bytes.
    let mut b = t.encode().expect("encodes");
    assert!(t.reservations.is_empty());
    let n = b.len();
    b[n - 5] = 0x05;
    let err = ExportTable::decode(&b).expect_err("not an ANA state");
    assert!(err.to_string().contains("not an ANA state"), "{err}");
    // The NVMe codes, written down from the specification (ANA log page, byte 32 of a
    // group descriptor).
    for (state, code) in [
        (AnaState::Optimized, 1u8),
        (AnaState::NonOptimized, 2),
        (AnaState::Inaccessible, 3),
        (AnaState::PersistentLoss, 4),
        (AnaState::Change, 0x0F),
    ] {
        assert_eq!(state as u8, code);
        assert_eq!(AnaState::from_code(code), Some(state));
    }
}

#[test]
fn published_tables_read_back_through_another_attachment() {
    let writer = ExportsRegion::create(DEFAULT_EXPORTS_SIZE).expect("create");
    let reader =
        ExportsRegion::attach(writer.region().try_clone_fd().expect("fd")).expect("attach");
    assert_eq!(reader.read().expect("read"), None, "never published");
    assert_eq!(reader.current_generation(), 0);
    for g in [1, 2, 9, 10] {
        writer.publish(&table(g)).expect("publish");
        assert_eq!(reader.read().expect("read"), Some(table(g)));
        assert_eq!(reader.current_generation(), g);
    }
    // Not newer: refused, the current table stays.
    match writer.publish(&table(10)) {
        Err(ExportsError::StaleGeneration {
            new: 10,
            current: 10,
        }) => {}
        other => panic!("expected StaleGeneration, got {other:?}"),
    }
    assert!(matches!(
        writer.publish(&table(3)),
        Err(ExportsError::StaleGeneration { .. })
    ));
    // Invalid: refused before anything is written.
    let mut bad = table(11);
    bad.subsystems[0].namespaces[0].nsid = MAX_NSID + 1;
    assert!(matches!(
        writer.publish(&bad),
        Err(ExportsError::Table(TableError::Nsid { .. }))
    ));
    assert_eq!(reader.read().expect("read"), Some(table(10)));
}

#[test]
fn a_table_larger_than_a_slot_is_refused() {
    let small = ExportsRegion::create(4096).expect("create");
    assert!(small.capacity() < 2048);
    let mut t = table(1);
    t.subsystems[0].hosts = (0..200)
        .map(|i| format!("nqn.2014-08.org.nvmexpress:uuid:{i:036}"))
        .collect();
    t.subsystems[0].secrets.clear();
    match small.publish(&t) {
        Err(ExportsError::TooLarge { len, capacity }) => assert!(len > capacity),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(small.read().expect("read"), None);
}

#[test]
fn validation_names_what_is_wrong() {
    let check = |edit: &dyn Fn(&mut ExportTable), want: &dyn Fn(&TableError) -> bool| {
        let mut t = table(4);
        edit(&mut t);
        let e = t.encode().expect_err("must be refused");
        assert!(want(&e), "unexpected error {e:?}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    };
    check(&|t| t.generation = 0, &|e| {
        matches!(e, TableError::Generation(0))
    });
    check(&|t| t.subsystems[0].nqn = "iqn.x".into(), &|e| {
        matches!(e, TableError::BadNqn { .. })
    });
    check(
        &|t| t.subsystems[0].nqn = format!("nqn.{}", "x".repeat(220)),
        &|e| matches!(e, TableError::BadNqn { .. }),
    );
    check(
        &|t| t.subsystems[0].nqn = "nqn.2014-08.org.nvmexpress.discovery".into(),
        &|e| matches!(e, TableError::BadNqn { .. }),
    );
    check(
        &|t| t.subsystems[1].nqn = t.subsystems[0].nqn.clone(),
        &|e| matches!(e, TableError::DuplicateNqn(_)),
    );
    check(&|t| t.subsystems[0].serial = "x".repeat(21), &|e| {
        matches!(
            e,
            TableError::BadField {
                field: "serial",
                ..
            }
        )
    });
    check(&|t| t.subsystems[0].model = "é".into(), &|e| {
        matches!(e, TableError::BadField { field: "model", .. })
    });
    check(
        &|t| {
            t.subsystems[0].hosts = vec!["nqn.a".into(), "nqn.a".into()];
        },
        &|e| matches!(e, TableError::DuplicateHost { .. }),
    );
    check(&|t| t.subsystems[0].namespaces[0].nsid = 0, &|e| {
        matches!(e, TableError::Nsid { nsid: 0, .. })
    });
    check(
        &|t| {
            let n = t.subsystems[0].namespaces[0];
            t.subsystems[0].namespaces.push(ExportNamespace {
                nguid: id(7, 0, 0),
                uuid: id(8, 0, 0),
                ..n
            });
        },
        &|e| matches!(e, TableError::DuplicateNsid { .. }),
    );
    for edit in [
        &(|t: &mut ExportTable| t.subsystems[0].namespaces[0].block_size = 1024)
            as &dyn Fn(&mut ExportTable),
        &|t| t.subsystems[0].namespaces[0].blocks = 0,
        &|t| t.subsystems[0].namespaces[0].blocks = u64::MAX / 256,
        &|t| t.subsystems[0].namespaces[0].ana_group = 0,
        &|t| t.subsystems[0].namespaces[0].nguid = [0; 16],
        &|t| {
            let n = t.subsystems[0].namespaces[0];
            t.subsystems[1].namespaces.push(ExportNamespace {
                uuid: id(9, 0, 0),
                ..n
            });
        },
    ] {
        check(edit, &|e| matches!(e, TableError::Namespace { .. }));
    }
    // Reservations: a namespace of the table, once, a type up to 6, at most 64 registrants,
    // each a non-zero host id once.
    for edit in [
        &(|t: &mut ExportTable| t.reservations[0].nguid = id(9, 9, 9)) as &dyn Fn(&mut ExportTable),
        &|t| {
            let r = t.reservations[0].clone();
            t.reservations.push(r);
        },
        &|t| t.reservations[0].rtype = 7,
        &|t| {
            t.reservations[0].registrants = vec![
                ExportRegistrant {
                    host_id: [0; 16],
                    key: 1,
                    cntlid: 1,
                };
                1
            ]
        },
        &|t| {
            let g = ExportRegistrant {
                host_id: [5; 16],
                key: 1,
                cntlid: 1,
            };
            t.reservations[0].registrants = vec![g, g];
        },
    ] {
        check(edit, &|e| matches!(e, TableError::Reservation { .. }));
    }
    check(
        &|t| {
            t.reservations[0].registrants = (0..65u8)
                .map(|i| ExportRegistrant {
                    host_id: [i + 1; 16],
                    key: 1,
                    cntlid: 1,
                })
                .collect()
        },
        &|e| {
            matches!(
                e,
                TableError::TooMany {
                    what: "registrants",
                    ..
                }
            )
        },
    );
    // Unknown flag bits and a registrant count past the bytes are refused when decoding.
    let mut t = table(4);
    t.reservations[0].registrants.clear();
    let b = t.encode().expect("encode");
    // The reservation is the last thing in the table: flags at its byte 29, count at 46.
    let at = b.len() - (16 + 8 + 4 + 1 + 1 + 16 + 2);
    let mut bad = b.clone();
    bad[at + 29] = 2;
    assert!(matches!(
        ExportTable::decode(&bad),
        Err(TableError::Reservation { .. })
    ));
    let mut bad = b.clone();
    bad[at + 46] = 3;
    assert!(matches!(
        ExportTable::decode(&bad),
        Err(TableError::Truncated { .. })
    ));
    let mut bad = b;
    bad[at + 46] = 65;
    assert!(matches!(
        ExportTable::decode(&bad),
        Err(TableError::TooMany { .. })
    ));
}

/// A writer thread publishes thousands of generations while readers copy: every table a
/// reader gets is whole (equal to the table of its generation), and generations never go
/// back.
#[test]
fn readers_never_see_a_torn_table_while_a_writer_publishes() {
    const GENERATIONS: u64 = 5_000;
    let writer = ExportsRegion::create(64 * 1024).expect("create");
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let r =
                ExportsRegion::attach(writer.region().try_clone_fd().expect("fd")).expect("attach");
            let done = done.clone();
            std::thread::spawn(move || {
                let (mut seen, mut last, mut contended) = (0u64, 0u64, 0u64);
                loop {
                    let finished = done.load(Ordering::Acquire);
                    match r.read() {
                        Ok(Some(t)) => {
                            assert_eq!(t, table(t.generation), "a torn or mixed table");
                            assert!(t.generation >= last, "generation went back");
                            last = t.generation;
                            seen += 1;
                        }
                        Ok(None) => assert_eq!(last, 0, "a published table vanished"),
                        Err(ExportsError::Contended { .. }) => contended += 1,
                        Err(e) => panic!("read failed: {e}"),
                    }
                    if finished {
                        return (seen, last, contended);
                    }
                }
            })
        })
        .collect();
    for g in 1..=GENERATIONS {
        writer.publish(&table(g)).expect("publish");
    }
    done.store(true, Ordering::Release);
    for r in readers {
        let (seen, last, _contended) = r.join().expect("reader");
        assert!(seen > 0, "the reader read nothing whole");
        assert_eq!(last, GENERATIONS, "the last read is the last table");
    }
}

#[test]
fn a_writer_dying_mid_write_leaves_the_current_table_intact() {
    let writer = ExportsRegion::create(DEFAULT_EXPORTS_SIZE).expect("create");
    let reader =
        ExportsRegion::attach(writer.region().try_clone_fd().expect("fd")).expect("attach");
    // Dying before anything was ever published: still nothing published.
    writer.die_mid_write_for_tests(&[0xEE; 1000]);
    assert_eq!(reader.read().expect("read"), None);
    writer.publish(&table(1)).expect("publish");
    for garbage in [
        vec![0u8; 10],
        vec![0xFF; 4096],
        table(2).encode().expect("encode"),
    ] {
        writer.die_mid_write_for_tests(&garbage);
        assert_eq!(reader.read().expect("read"), Some(table(1)));
    }
    // A successor writer (a restarted metadata service) attaches and publishes over the
    // half-written slot.
    let successor =
        ExportsRegion::attach(writer.region().try_clone_fd().expect("fd")).expect("attach");
    successor.publish(&table(2)).expect("publish");
    assert_eq!(reader.read().expect("read"), Some(table(2)));
    successor.die_mid_write_for_tests(&[1, 2, 3]);
    assert_eq!(reader.read().expect("read"), Some(table(2)));
    successor.publish(&table(3)).expect("publish");
    assert_eq!(reader.read().expect("read"), Some(table(3)));
}

#[test]
fn corrupt_region_contents_are_errors_not_panics() {
    let region = ExportsRegion::create(16 * 1024).expect("create");
    region.publish(&table(5)).expect("publish");
    let len = table(5).encode().expect("encode").len();
    // Every byte of the published slot's header and body, changed: an error (or, for bytes
    // no check covers, the same table), never a panic or a different table.
    for at in 0..64 + len {
        let fresh = ExportsRegion::create(16 * 1024).expect("create");
        fresh.publish(&table(5)).expect("publish");
        for value in [0x00, 0xFF, 0x5A] {
            fresh.scribble_current_for_tests(at, value);
            match fresh.read() {
                Ok(Some(t)) => assert_eq!(t, table(5), "byte {at} changed the table"),
                Ok(None) => panic!("byte {at}: the table vanished"),
                Err(ExportsError::Corrupt(_) | ExportsError::Table(_)) => {}
                Err(e) => panic!("byte {at}: unexpected {e}"),
            }
        }
    }
    // The `current` word naming a slot that holds another generation, or nothing.
    region.set_current_for_tests(7 << 1);
    assert!(matches!(region.read(), Err(ExportsError::Corrupt(_))));
    region.set_current_for_tests(5 << 1 | 1);
    assert!(matches!(region.read(), Err(ExportsError::Corrupt(_))));
    // A huge claimed length.
    region.set_current_for_tests(5 << 1);
    assert_eq!(region.read().expect("read"), Some(table(5)));
    for at in 16..24 {
        region.scribble_current_for_tests(at, 0xFF);
    }
    assert!(matches!(region.read(), Err(ExportsError::Corrupt(_))));
}

#[test]
fn other_regions_are_not_exports_regions() {
    let health = Health::create("x", Duration::from_millis(100)).expect("health");
    let fd = health.region().try_clone_fd().expect("fd");
    assert!(matches!(
        ExportsRegion::attach(fd),
        Err(ExportsError::NotExports(_))
    ));
    let fd = duplex_ipc::region::raw_memfd_for_tests(8192, true, b"not a region").expect("fd");
    assert!(matches!(
        ExportsRegion::attach(fd),
        Err(ExportsError::Region(_))
    ));
}

/// Iterations of each fuzz target under `cargo test`, unless `BOLERO_RANDOM_ITERATIONS` says
/// otherwise.
const FUZZ_ITERATIONS: usize = 500_000;
/// Wall-clock cap per fuzz target (a bound on the run, not an assertion).
const FUZZ_TIME_CAP: Duration = Duration::from_secs(5);

/// Decodes `bytes`; what decodes must re-encode to bytes that decode to the same table.
fn check_decode(bytes: &[u8]) {
    if let Ok(t) = ExportTable::decode(bytes) {
        let again = t.encode().expect("a decoded table encodes");
        assert_eq!(ExportTable::decode(&again).ok().as_ref(), Some(&t));
    }
}

#[test]
fn fuzz_decode_arbitrary_bytes() {
    bolero::check!()
        .with_iterations(FUZZ_ITERATIONS)
        .with_test_time(FUZZ_TIME_CAP)
        .with_max_len(4096)
        .for_each(|bytes: &[u8]| check_decode(bytes));
}

#[test]
fn fuzz_decode_mutated_tables() {
    let corpus: Vec<Vec<u8>> = (1..=12)
        .map(|g| table(g).encode().expect("encode"))
        .collect();
    bolero::check!()
        .with_iterations(FUZZ_ITERATIONS)
        .with_test_time(FUZZ_TIME_CAP)
        .with_type::<(u8, Vec<(u16, u8, u8)>)>()
        .for_each(|(pick, edits)| {
            let mut b = corpus[usize::from(*pick) % corpus.len()].clone();
            for &(at, kind, value) in edits.iter().take(8) {
                let at = usize::from(at) % b.len().max(1);
                match kind % 4 {
                    0 => {
                        if let Some(x) = b.get_mut(at) {
                            *x = value;
                        }
                    }
                    1 => b.insert(at.min(b.len()), value),
                    2 => {
                        if at < b.len() {
                            b.remove(at);
                        }
                    }
                    _ => b.truncate(at),
                }
            }
            check_decode(&b);
        });
}
