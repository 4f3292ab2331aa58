//! Fencing by reservations against `duplex-drive-sim`: two nodes, each reaching three
//! dual-ported drives through its own port (node A port 0, node B port 1), with the
//! datapath's user-space driver over vfio-user. The race of two nodes that each believe the
//! other dead is run many times: exactly one wins, on every drive; the loser stops at the first
//! drive and none of its writes reaches a drive afterwards (the simulator counts writes per
//! port).

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use duplex_datapath::fence::{Fence, FenceError, FenceKey, NvmeReservations, Step, FENCE_TYPE};
use duplex_datapath::nvme::vfio_user::VfioUser;
use duplex_datapath::nvme::{CmdError, Controller, DmaMem, IoCmd, Options, Seg};
use duplex_drive_sim::port::Ports;
use duplex_drive_sim::{Drive, DriveConfig};

const BS: u32 = 4096;
const DATA_IOVA: u64 = 1 << 40;
/// Races run (the issue asks for at least 20).
const RACES: u64 = 24;

struct SimDrive {
    name: String,
    sockets: Vec<PathBuf>,
    ports: Ports,
    drive: Arc<Drive>,
}

fn drives(dir: &std::path::Path, n: usize) -> Vec<SimDrive> {
    (0..n)
        .map(|i| {
            let file = tempfile::tempfile_in(dir).expect("backing file");
            let cfg = DriveConfig {
                block_size: BS,
                blocks: (16 << 20) / u64::from(BS),
                cache_blocks: 1 << 12,
                ..DriveConfig::default()
            };
            let drive = Drive::open(file, cfg).expect("drive");
            let sockets = vec![
                dir.join(format!("d{i}a.sock")),
                dir.join(format!("d{i}b.sock")),
            ];
            let ports = Ports::start(drive.clone(), &sockets).expect("ports");
            SimDrive {
                // Named against creation order, so that fencing order (by name) is not the
                // order the nodes list them in.
                name: format!("drive-{}", n - i),
                sockets,
                ports,
                drive,
            }
        })
        .collect()
}

/// Node `node`'s controllers: one per drive, through port `node` (host id per node).
fn controllers(ds: &[SimDrive], node: usize) -> Vec<Controller<VfioUser>> {
    ds.iter()
        .map(|d| {
            let t = VfioUser::connect(&d.sockets[node], Duration::from_secs(5)).expect("connect");
            let mut host = [0u8; 16];
            host[0] = node as u8 + 1;
            host[15] = 0x5A;
            let opts = Options {
                io_queues: 1,
                host_id: Some(host),
                ..Options::default()
            };
            let mem = DmaMem::create("driver", opts.dma_len(), 0).expect("DMA memory");
            let mut c = Controller::new(t, mem, opts).expect("bring-up");
            let m = DmaMem::create("data", BS as usize, DATA_IOVA).expect("data memory");
            c.add_memory(m).expect("map data memory");
            c
        })
        .collect()
}

fn fence<'a>(
    ds: &[SimDrive],
    ctrls: &'a mut [Controller<VfioUser>],
    key: FenceKey,
) -> Fence<NvmeReservations<'a, VfioUser>> {
    let list = ds
        .iter()
        .zip(ctrls.iter_mut())
        .map(|(d, c)| NvmeReservations::new(d.name.clone(), c, 1, 1))
        .collect();
    Fence::new(list, key)
}

/// One block written at `lba` through `c`.
fn write(c: &mut Controller<VfioUser>, lba: u64, seed: u8) -> Result<u32, CmdError> {
    let m = c.added_memory(0).expect("memory");
    m.write(0, &[seed; BS as usize]).expect("fill");
    let seg = Seg {
        iova: m.iova_of(0),
        len: BS,
    };
    c.exec(1, IoCmd::write(1, lba, 1, BS, false), &[seg], c.timeout())
        .expect("controller")
}

/// Writes through port `port` (controller id port + 1) the drive executed.
fn port_writes(d: &SimDrive, port: usize) -> u64 {
    let (_, ports) = d.drive.port_writes();
    ports
        .iter()
        .find(|p| usize::from(p.cntlid) == port + 1)
        .map_or(0, |p| p.writes)
}

#[test]
fn two_nodes_racing_to_fence_each_other_end_with_exactly_one_on_every_drive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = drives(dir.path(), 3);
    let mut a = controllers(&ds, 0);
    let mut b = controllers(&ds, 1);
    let first = ds.iter().map(|d| d.name.clone()).min().expect("drives");
    let mut wins = [0u64; 2];
    for race in 1..=RACES {
        // Both (re)join with this boot's key: registered everywhere, one reservation.
        let keys = [FenceKey::new(1, race), FenceKey::new(2, race)];
        fence(&ds, &mut a, keys[0]).join().expect("A joins");
        fence(&ds, &mut b, keys[1]).join().expect("B joins");
        {
            let mut fa = fence(&ds, &mut a, keys[0]);
            for (drive, k) in fa.keys() {
                let k = k.expect("report");
                assert_eq!(k.rtype, Some(FENCE_TYPE), "{drive}");
                assert!(k.has(keys[0]) && k.has(keys[1]), "{drive}: {k:?}");
            }
        }
        // Both write while both are members.
        for (c, node) in a.iter_mut().zip(0..).chain(b.iter_mut().zip(1..)) {
            assert_eq!(write(c, race, node as u8).map(drop), Ok(()));
        }

        // Each believes the other dead: both fence at once.
        let barrier = Barrier::new(2);
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| {
                let mut f = fence(&ds, &mut a, keys[0]);
                barrier.wait();
                f.fence(keys[1])
            });
            let tb = s.spawn(|| {
                let mut f = fence(&ds, &mut b, keys[1]);
                barrier.wait();
                f.fence(keys[0])
            });
            (ta.join().expect("A"), tb.join().expect("B"))
        });
        let (winner, loser, lost) = match (ra, rb) {
            (Ok(steps), Err(e)) => {
                assert_eq!(steps, vec![Step::Preempted; 3]);
                (0, 1, e)
            }
            (Err(e), Ok(steps)) => {
                assert_eq!(steps, vec![Step::Preempted; 3]);
                (1, 0, e)
            }
            (ra, rb) => panic!("race {race}: not exactly one winner: A {ra:?}, B {rb:?}"),
        };
        wins[winner] += 1;
        // The loser stopped at the first drive in fencing order, fenced.
        assert_eq!(
            lost,
            FenceError::Fenced {
                drive: first.clone(),
                key: keys[loser],
            },
            "race {race}"
        );
        // Every drive: only the winner's key, holding the reservation.
        let (wc, lc) = if winner == 0 {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        for (drive, k) in fence(&ds, wc, keys[winner]).keys() {
            let k = k.expect("report");
            assert_eq!(k.keys, vec![(keys[winner], true)], "race {race}, {drive}");
            assert_eq!(k.rtype, Some(FENCE_TYPE));
        }
        // The loser's writes reach no drive; the winner's do.
        let before: Vec<u64> = ds.iter().map(|d| port_writes(d, loser)).collect();
        for c in lc.iter_mut() {
            assert_eq!(write(c, race, 0xEE), Err(CmdError::ReservationConflict));
        }
        let after: Vec<u64> = ds.iter().map(|d| port_writes(d, loser)).collect();
        assert_eq!(
            before, after,
            "race {race}: a write from the fenced node reached a drive"
        );
        for c in wc.iter_mut() {
            assert_eq!(write(c, race, 0x11).map(drop), Ok(()));
        }
        // Fencing again finishes without harm (a takeover that crashed halfway repeats it).
        let again = fence(&ds, wc, keys[winner])
            .fence(keys[loser])
            .expect("fence again");
        assert_eq!(again, vec![Step::AlreadyGone; 3]);
    }
    // Both sides won some races (the barrier makes them real races, not a fixed order). With
    // 24 races a one-sided run is possible but rare; it is reported, not failed on.
    eprintln!("wins: A {}, B {}", wins[0], wins[1]);
}

#[test]
fn a_drive_the_survivor_cannot_reach_stops_fencing_and_a_rejoin_needs_a_new_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ds = drives(dir.path(), 2);
    let mut a = controllers(&ds, 0);
    let mut b = controllers(&ds, 1);
    let (ka, kb) = (FenceKey::new(1, 1), FenceKey::new(2, 1));
    fence(&ds, &mut a, ka).join().expect("A joins");
    fence(&ds, &mut b, kb).join().expect("B joins");
    // B's cable to the second drive in order is pulled: B cannot fence A there.
    let second = (0..ds.len())
        .max_by(|&x, &y| ds[x].name.cmp(&ds[y].name))
        .expect("drive");
    ds[second].ports.pull_port(1).expect("pull");
    let r = fence(&ds, &mut b, kb).fence(ka);
    match r {
        Err(FenceError::Unreachable { drive, .. }) => assert_eq!(drive, ds[second].name),
        other => panic!("fencing over a pulled port: {other:?}"),
    }
    // Unless that drive holds no current pool data (the metadata service's say): then it is
    // passed over, and only there; a drive that must be fenced still stops the fence.
    let unneeded = ds[second].name.clone();
    let steps = fence(&ds, &mut b, kb)
        .fence_skipping(ka, |name| name == unneeded)
        .expect("fenced where it matters");
    assert_eq!(steps.last(), Some(&Step::Skipped), "{steps:?}");
    assert!(
        steps[..steps.len() - 1].iter().all(|s| *s != Step::Skipped),
        "{steps:?}"
    );
    let r = fence(&ds, &mut b, kb).fence_skipping(ka, |name| name != unneeded);
    assert!(
        matches!(r, Err(FenceError::Unreachable { .. })),
        "a drive that must be fenced was passed over: {r:?}"
    );
    ds[second].ports.insert_port(1).expect("insert");

    // A, fenced off the first drive, rejoins with the next boot's key; its old key cannot be
    // used to fence.
    let r = fence(&ds, &mut a, ka).fence(kb);
    assert!(
        matches!(r, Err(FenceError::Fenced { .. })),
        "a fenced key fenced its peer: {r:?}"
    );
    let ka2 = FenceKey::new(1, 2);
    fence(&ds, &mut a, ka2).join().expect("A rejoins");
    for (drive, k) in fence(&ds, &mut a, ka2).keys() {
        let k = k.expect("report");
        assert!(k.has(ka2), "{drive}: {k:?}");
        assert!(
            !k.has(ka),
            "{drive}: the old boot's key is still registered"
        );
    }
}
