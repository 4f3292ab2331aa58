//! Builders shared by the tests: a valid configuration, superblocks, and `Sim`, a pool whose
//! history of commits is written to in-memory drives the way the metadata service will write
//! real ones (image to the next slot of every live member; superblocks when states or the
//! epoch change).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use duplex_ondisk::import::{DriveInput, ImportRequest};
use duplex_ondisk::layout::METADATA_SLOT_SIZE;
use duplex_ondisk::{
    Extent, Layout, MemberState, MetadataImage, Namespace, Ownership, Pool, PoolConfig, PoolMember,
    RaidLevel, Reservation, ReservationRegistrant, Role, Subsystem, Superblock, SuperblockCopy,
    Uuid, Volume,
};

/// Capacity of the simulated drives.
pub const CAPACITY: u64 = 1 << 30;
pub const CLUSTER: Uuid = Uuid([0xc1; 16]);
pub const POOL: Uuid = Uuid([0xb0; 16]);
pub const SUBSYS: &str = "nqn.2024-01.io.duplex:sub0";

/// A non-nil UUID distinct per (tag, n).
pub fn uuid(tag: u8, n: u8) -> Uuid {
    let mut b = [tag; 16];
    b[15] = n;
    Uuid(b)
}

/// The drive UUID of member `i`.
pub fn drive_uuid(i: usize) -> Uuid {
    uuid(0xd0, i as u8)
}

pub fn layout() -> Layout {
    Layout::for_drive(CAPACITY, 4096).unwrap()
}

pub fn volume(name: &str, n: u8, size: u64, extents: Vec<Extent>) -> Volume {
    Volume {
        name: name.to_string(),
        uuid: uuid(0xa0, n),
        nguid: uuid(0xa1, n).0,
        size_blocks: size,
        block_size: 4096,
        flags: 0,
        parent: Uuid::NIL,
        extents,
    }
}

pub fn ext(volume_block: u64, pool_block: u64, blocks: u64) -> Extent {
    Extent {
        volume_block,
        pool_block,
        blocks,
    }
}

/// A valid configuration of a pool of `n` members at `level`: one subsystem, two volumes (the
/// first grown: two extents), two namespaces.
pub fn config(level: RaidLevel, n: usize) -> PoolConfig {
    PoolConfig {
        pool: Pool {
            name: "pool0".to_string(),
            uuid: POOL,
            raid_level: level,
            chunk_size: 64 * 1024,
            member_data_bytes: layout().data_size,
            members: (0..n)
                .map(|i| PoolMember {
                    drive_uuid: drive_uuid(i),
                    slot: i as u32,
                    state: MemberState::Active,
                    changed_generation: 1,
                })
                .collect(),
        },
        ownership: Ownership {
            owner_node: 0,
            epoch: 1,
        },
        cluster_generation: 1,
        subsystems: vec![Subsystem {
            nqn: SUBSYS.to_string(),
            allow_any_host: false,
            hosts: vec!["nqn.2014-08.org.nvmexpress:uuid:host-1".to_string()],
            serial: "DPLX0001".to_string(),
            model: "duplex".to_string(),
        }],
        volumes: vec![
            volume("vol0", 0, 1000, vec![ext(0, 0, 600), ext(600, 2000, 400)]),
            volume("vol1", 1, 500, vec![ext(0, 600, 500)]),
        ],
        namespaces: vec![
            Namespace {
                subsystem_nqn: SUBSYS.to_string(),
                nsid: 1,
                volume_uuid: uuid(0xa0, 0),
                ana_group: 1,
            },
            Namespace {
                subsystem_nqn: SUBSYS.to_string(),
                nsid: 2,
                volume_uuid: uuid(0xa0, 1),
                ana_group: 1,
            },
        ],
        spares: vec![],
        write_seq_mark: 0,
        checksum_area: None,
        reservations: vec![],
        host_secrets: Vec::new(),
    }
}

/// A host identifier distinct per `n` (never all zero).
pub fn host_id(n: u8) -> [u8; 16] {
    let mut b = [0x40; 16];
    b[15] = n;
    b
}

/// A registrant: host `n`, key and controller id derived from it.
pub fn registrant(n: u8) -> ReservationRegistrant {
    ReservationRegistrant {
        host_id: host_id(n),
        key: 0x1000 + u64::from(n),
        cntlid: 0x10 + u16::from(n),
    }
}

/// A valid reservation state of namespace `nsid` of [`SUBSYS`] of type `rtype`: hosts 1..=3
/// registered, host 2 the holder for types 1 to 4.
pub fn reservation(nsid: u32, rtype: u8, ptpl: bool) -> Reservation {
    Reservation {
        subnqn: SUBSYS.to_string(),
        nsid,
        version: 7,
        generation: 3,
        rtype,
        ptpl,
        holder: if (1..=4).contains(&rtype) {
            host_id(2)
        } else {
            [0; 16]
        },
        registrants: (1..=3).map(registrant).collect(),
    }
}

pub fn superblock(drive: Uuid, slot: u32, copy: SuperblockCopy) -> Superblock {
    Superblock {
        cluster_uuid: CLUSTER,
        pool_uuid: POOL,
        drive_uuid: drive,
        member_slot: slot,
        role: Role::Data,
        state: MemberState::Active,
        generation: 1,
        epoch: 1,
        owner_node: 0,
        copy,
        layout: layout(),
    }
}

/// A pool's history written to in-memory drives.
#[derive(Debug, Clone)]
pub struct Sim {
    pub config: PoolConfig,
    pub generation: u64,
    pub epoch: u64,
    pub writer: u32,
    /// Slot of the newest image.
    pub slot: u32,
    /// Member `i` at creation is drive `i`, labelled `d{i}`.
    pub drives: Vec<DriveInput>,
}

impl Sim {
    /// A new pool: generation 1 in slot 0 of every member, superblocks at (1, 1).
    pub fn new(level: RaidLevel, n: usize) -> Sim {
        let empty = vec![0u8; 4096];
        let mut sim = Sim {
            config: config(level, n),
            generation: 1,
            epoch: 1,
            writer: 0,
            slot: 0,
            drives: (0..n)
                .map(|i| DriveInput {
                    label: format!("d{i}"),
                    primary: None,
                    secondary: None,
                    slots: vec![Some(empty.clone()); layout().metadata_slots as usize],
                })
                .collect(),
        };
        let all: Vec<usize> = (0..n).collect();
        sim.write_image(&all);
        sim.write_superblocks(&all);
        sim
    }

    pub fn image(&self) -> MetadataImage {
        MetadataImage {
            slot_index: self.slot,
            generation: self.generation,
            epoch: self.epoch,
            writer_node: self.writer,
            config: self.config.clone(),
        }
    }

    pub fn image_bytes(&self) -> Vec<u8> {
        self.image().encode(METADATA_SLOT_SIZE as usize).unwrap()
    }

    fn write_image(&mut self, to: &[usize]) {
        let bytes = self.image_bytes();
        for &i in to {
            self.drives[i].slots[self.slot as usize] = Some(bytes.clone());
        }
    }

    /// Drives whose member is active in the current configuration.
    pub fn live(&self) -> Vec<usize> {
        self.config
            .pool
            .members
            .iter()
            .filter(|m| m.state == MemberState::Active)
            .map(|m| m.slot as usize)
            .collect()
    }

    /// One commit (generation + 1, next slot) written to drives `to`.
    pub fn commit_to(&mut self, to: &[usize], change: impl FnOnce(&mut PoolConfig)) {
        change(&mut self.config);
        self.generation += 1;
        self.slot = layout().next_metadata_slot(self.slot);
        self.write_image(to);
    }

    /// One commit written to every member that is not failed (active or rebuilding).
    pub fn commit(&mut self, change: impl FnOnce(&mut PoolConfig)) {
        let mut config = self.config.clone();
        change(&mut config);
        let live: Vec<usize> = config
            .pool
            .members
            .iter()
            .filter(|m| m.state != MemberState::Failed)
            .map(|m| m.slot as usize)
            .collect();
        self.commit_to(&live, |c| *c = config);
    }

    /// Marks member `i` failed (a commit to the others), then rewrites the others' superblocks.
    pub fn fail(&mut self, i: usize) {
        let generation = self.generation + 1;
        self.commit(|c| {
            c.pool.members[i].state = MemberState::Failed;
            c.pool.members[i].changed_generation = generation;
        });
        self.write_superblocks(&self.live());
    }

    /// A change of owner: epoch + 1 written by `node`, then superblocks.
    pub fn take_over(&mut self, node: u32) {
        self.epoch += 1;
        self.writer = node;
        let epoch = self.epoch;
        self.commit(|c| {
            c.ownership = Ownership {
                owner_node: node,
                epoch,
            }
        });
        self.write_superblocks(&self.live());
    }

    /// Adds a volume (a config change) in a commit to every live member.
    pub fn add_volume(&mut self) {
        let n = self.config.volumes.len() as u8;
        let start = 10_000 + u64::from(n) * 100;
        self.commit(|c| {
            c.volumes
                .push(volume(&format!("vol{n}"), n, 100, vec![ext(0, start, 100)]))
        });
    }

    /// Both superblock copies of drives `to`, at the current stamp and member state.
    pub fn write_superblocks(&mut self, to: &[usize]) {
        for &i in to {
            let m = self.config.pool.members[i];
            for copy in [SuperblockCopy::Primary, SuperblockCopy::Secondary] {
                let sb = Superblock {
                    member_slot: m.slot,
                    state: m.state,
                    generation: self.generation,
                    epoch: self.epoch,
                    owner_node: self.writer,
                    ..superblock(m.drive_uuid, m.slot, copy)
                };
                let bytes = Some(sb.encode_vec());
                match copy {
                    SuperblockCopy::Primary => self.drives[i].primary = bytes,
                    SuperblockCopy::Secondary => self.drives[i].secondary = bytes,
                }
            }
        }
    }

    pub fn request(&self, force: bool) -> ImportRequest {
        ImportRequest {
            drives: self.drives.clone(),
            pool: None,
            force,
        }
    }
}

/// Flips one byte of `bytes` at `at` (modulo its length).
pub fn flip(bytes: &mut Option<Vec<u8>>, at: usize) {
    if let Some(b) = bytes {
        if !b.is_empty() {
            let at = at % b.len();
            b[at] ^= 0x5a;
        }
    }
}
