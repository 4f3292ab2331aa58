//! Simulated drives for the RAID tests: `duplex-drive-sim` drives in this process, reached by
//! the datapath's NVMe driver over vfio-user, and the ways a test takes one away.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use duplex_datapath::bdev::{BdevBox, NvmeBdev};
use duplex_datapath::drives::{Drive as NvmeDrive, DriveFds};
use duplex_datapath::EngineConfig;
use duplex_drive_sim::port::Ports;
use duplex_drive_sim::{Drive, DriveConfig, Fault, FaultOp};
use duplex_ipc::pool::Pool;
use duplex_ipc::topology::{DriveSpec, DriveTransport, VolumeSpec};

use super::{Node, Setup};

/// Block size of the simulated drives.
pub const BS: u32 = 4096;

/// One simulated drive with its ports.
pub struct SimDrive {
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub ports: Ports,
    pub drive: Arc<Drive>,
}

/// A 16 MiB simulated drive with a volatile write cache.
pub fn sim_drive() -> SimDrive {
    sim_drive_with_metadata(0)
}

/// [`sim_drive`] formatted with `metadata` bytes of metadata a block (separate buffer).
pub fn sim_drive_with_metadata(metadata: u16) -> SimDrive {
    let dir = tempfile::tempdir().unwrap();
    let file = tempfile::tempfile_in(dir.path()).unwrap();
    let drive = Drive::open(
        file,
        DriveConfig {
            block_size: BS,
            blocks: (16 << 20) / u64::from(BS),
            cache_blocks: 1 << 12,
            metadata_size: metadata,
            ..DriveConfig::default()
        },
    )
    .unwrap();
    let sockets = vec![dir.path().join("a.sock"), dir.path().join("b.sock")];
    let ports = Ports::start(drive.clone(), &sockets).unwrap();
    SimDrive {
        _dir: dir,
        socket: sockets[0].clone(),
        ports,
        drive,
    }
}

/// The datapath's NVMe block device on port A of `d`, as duplexd would hand it over.
pub fn nvme_bdev(d: &SimDrive, name: &str, pool: &Pool) -> BdevBox {
    nvme_bdev_at(d, &d.socket, name, pool)
}

/// [`nvme_bdev`] on the port at `socket`.
fn nvme_bdev_at(d: &SimDrive, socket: &std::path::Path, name: &str, pool: &Pool) -> BdevBox {
    let spec = VolumeSpec {
        id: 0,
        name: name.into(),
        resource: format!("volume:{name}"),
        path: socket.display().to_string(),
        block_size: BS,
        blocks: d.drive.config().blocks,
        direct: false,
        drive: Some(DriveSpec {
            transport: DriveTransport::VfioUser,
            nsid: 1,
            host_id: [7; 16],
            fence_key: 0,
        }),
    };
    let stream = UnixStream::connect(socket).unwrap();
    let drive = NvmeDrive::open(&spec, DriveFds::User(stream.into()), pool).unwrap();
    Box::new(NvmeBdev::new(drive))
}

/// An engine with the simulated drives as raw devices 0..n, no volumes, channel 0 for hosts
/// and channel 1 privileged (raw drive ids).
pub fn raw_node(drives: &[SimDrive]) -> Node {
    raw_node_with(drives, EngineConfig::default())
}

/// [`raw_node`] on the drives' B ports (the peer controller's).
pub fn raw_node_on_port_b(drives: &[SimDrive]) -> Node {
    raw_node_at(drives, EngineConfig::default(), true)
}

/// [`raw_node`] with an engine configuration of the test's own.
pub fn raw_node_with(drives: &[SimDrive], config: EngineConfig) -> Node {
    raw_node_at(drives, config, false)
}

fn raw_node_at(drives: &[SimDrive], config: EngineConfig, port_b: bool) -> Node {
    let setup = Setup {
        volumes: vec![],
        channels: 2,
        raw_channels: 1,
        config,
        ..Setup::default()
    };
    let mut node = Node::start_devices(setup, |pool| {
        let devs = drives
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let socket = if port_b {
                    d.socket.with_file_name("b.sock")
                } else {
                    d.socket.clone()
                };
                nvme_bdev_at(d, &socket, &format!("d{i}"), pool)
            })
            .collect();
        (devs, vec![])
    });
    for i in 0..drives.len() as u32 {
        node.fabric[1].block_sizes.insert(i, BS);
    }
    node
}

/// How a member is taken away.
#[derive(Clone, Copy, Debug)]
pub enum Loss {
    Pull,
    Error,
    PowerCut,
}

pub fn lose(d: &mut SimDrive, how: Loss) {
    match how {
        Loss::Pull => d.ports.pull(),
        Loss::Error => {
            d.drive.inject(Fault::Error {
                op: FaultOp::Any,
                first_lba: 0,
                last_lba: u64::MAX,
                status: 0x0280, // Media: Write Fault
                dnr: true,
                remaining: None,
            });
        }
        Loss::PowerCut => {
            d.drive.power_cut();
        }
    }
}

pub fn restore(d: &mut SimDrive, how: Loss) {
    match how {
        Loss::Pull => d.ports.insert().unwrap(),
        Loss::Error => d.drive.clear_faults(),
        Loss::PowerCut => d.drive.power_on(),
    }
}
