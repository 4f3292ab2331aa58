//! Wire compatibility, one way: our [`Client`] against rust-vmm's `vfio_user::Server`, an
//! independent implementation of the protocol.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{eventfd, memfd, pattern, pread, pwrite, wait};
use duplex_vfio::user::proto::{self, PCI_CONFIG_REGION_INDEX, PCI_MSIX_IRQ_INDEX};
use duplex_vfio::user::{Client, ClientError};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, ServerBackend, ServerRegion, SparseArea};

const TIMEOUT: Duration = Duration::from_secs(10);
const BAR0_SIZE: u64 = 0x4000;
const CONFIG_SIZE: u64 = 4096;

/// A DMA_MAP as the backend saw it: flags, file offset, address, size, and 16 bytes read
/// through the fd at the offset.
type SeenMap = (u32, u64, u64, u64, Option<Vec<u8>>);

/// What rust-vmm's server handed its backend.
#[derive(Debug, Default)]
struct Log {
    maps: Vec<SeenMap>,
    unmaps: Vec<(u64, u64)>,
    set_irqs: Vec<(u32, u32, u32, u32, usize)>,
    writes: Vec<(u32, u64, Vec<u8>)>,
    resets: u32,
}

/// A backend that stores region bytes and signals every eventfd it is given.
struct Backend {
    regions: HashMap<u32, Vec<u8>>,
    log: Arc<Mutex<Log>>,
}

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let bytes = self
            .regions
            .get(&region)
            .ok_or(std::io::ErrorKind::InvalidInput)?;
        let at = offset as usize;
        data.copy_from_slice(&bytes[at..at + data.len()]);
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let bytes = self
            .regions
            .get_mut(&region)
            .ok_or(std::io::ErrorKind::InvalidInput)?;
        let at = offset as usize;
        bytes[at..at + data.len()].copy_from_slice(data);
        self.log
            .lock()
            .expect("log")
            .writes
            .push((region, offset, data.to_vec()));
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        let marker = fd.map(|file| {
            let mut buf = vec![0u8; 16];
            file.read_exact_at(&mut buf, offset)
                .expect("read the shared fd");
            buf
        });
        self.log
            .lock()
            .expect("log")
            .maps
            .push((flags.bits(), offset, address, size, marker));
        Ok(())
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, address: u64, size: u64) -> std::io::Result<()> {
        self.log.lock().expect("log").unmaps.push((address, size));
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        self.log.lock().expect("log").resets += 1;
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        self.log
            .lock()
            .expect("log")
            .set_irqs
            .push((index, flags, start, count, fds.len()));
        for mut fd in fds {
            fd.write_all(&1u64.to_ne_bytes())?;
        }
        Ok(())
    }
}

fn region(index: u32, flags: u32, size: u64) -> ServerRegion {
    let mut region = ServerRegion {
        region_info: Default::default(),
        sparse_areas: Vec::new(),
        mmap_fd: None,
    };
    region.region_info.argsz = 32;
    region.region_info.index = index;
    region.region_info.flags = flags;
    region.region_info.size = size;
    region
}

#[test]
fn our_client_against_rust_vmm_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vfio-user.sock");
    let bar0 = memfd(BAR0_SIZE);
    pwrite(&bar0, 0x2000, b"BAR0 via the fd");

    let rw = proto::REGION_INFO_FLAG_READ | proto::REGION_INFO_FLAG_WRITE;
    let mut regions: Vec<ServerRegion> = (0..proto::PCI_NUM_REGIONS)
        .map(|index| region(index, 0, 0))
        .collect();
    regions[0] = region(0, rw | proto::REGION_INFO_FLAG_MMAP, BAR0_SIZE);
    regions[0].mmap_fd = Some(bar0.as_raw_fd());
    for (offset, size) in [(0u64, 0x1000u64), (0x2000, 0x2000)] {
        let mut area = SparseArea {
            area: Default::default(),
        };
        area.area.offset = offset;
        area.area.size = size;
        regions[0].sparse_areas.push(area);
    }
    regions[PCI_CONFIG_REGION_INDEX as usize] = region(PCI_CONFIG_REGION_INDEX, rw, CONFIG_SIZE);
    let irqs = (0..proto::PCI_NUM_IRQS)
        .map(|index| vfio_user::IrqInfo {
            index,
            flags: proto::IRQ_INFO_EVENTFD,
            count: if index == PCI_MSIX_IRQ_INDEX { 4 } else { 0 },
        })
        .collect();
    let server = vfio_user::Server::new(&path, true, irqs, regions).expect("rust-vmm server");
    let log = Arc::new(Mutex::new(Log::default()));
    let backend_log = Arc::clone(&log);
    let served = thread::spawn(move || {
        let mut backend = Backend {
            regions: HashMap::from([
                (0, vec![0u8; BAR0_SIZE as usize]),
                (PCI_CONFIG_REGION_INDEX, vec![0u8; CONFIG_SIZE as usize]),
            ]),
            log: backend_log,
        };
        server.run(&mut backend).map_err(|error| error.to_string())
    });

    let mut client = Client::connect(&path, TIMEOUT).expect("connect to rust-vmm's server");

    // rust-vmm answers minor version 0 and announces one fd per message.
    assert_eq!(client.version(), (0, 0));
    assert_eq!(client.max_msg_fds(), 1);
    assert_eq!(client.max_data_xfer_size(), proto::MAX_DATA_XFER_SIZE);
    let info = client.device_info();
    assert_eq!(
        info.flags,
        proto::DEVICE_FLAGS_PCI | proto::DEVICE_FLAGS_RESET
    );
    assert_eq!(info.num_regions, proto::PCI_NUM_REGIONS);
    assert_eq!(info.num_irqs, proto::PCI_NUM_IRQS);

    // BAR0: the sparse-mmap capability (asked for again with a larger argsz) and its fd.
    let bar0_info = client.region(0).expect("BAR0");
    assert_eq!(bar0_info.size, BAR0_SIZE);
    assert_eq!(bar0_info.sparse, vec![(0, 0x1000), (0x2000, 0x2000)]);
    assert_ne!(bar0_info.flags & proto::REGION_INFO_FLAG_CAPS, 0);
    assert_ne!(bar0_info.flags & proto::REGION_INFO_FLAG_MMAP, 0);
    let fd = bar0_info.mmap_fd.as_ref().expect("BAR0's fd");
    assert_eq!(pread(fd.as_fd(), 0x2000, 15), b"BAR0 via the fd");
    let config = client.region(PCI_CONFIG_REGION_INDEX).expect("config");
    assert_eq!(config.size, CONFIG_SIZE);
    assert!(config.sparse.is_empty());

    // Region bytes round trip through the backend.
    let data = pattern(300, 5);
    client
        .region_write(PCI_CONFIG_REGION_INDEX, 0x100, &data)
        .expect("region write");
    let mut back = vec![0u8; 300];
    client
        .region_read(PCI_CONFIG_REGION_INDEX, 0x100, &mut back)
        .expect("region read");
    assert_eq!(back, data);
    let mut two = [0u8; 2];
    assert!(matches!(
        client.region_read(PCI_CONFIG_REGION_INDEX, CONFIG_SIZE - 1, &mut two),
        Err(ClientError::OutOfRange { .. })
    ));

    // DMA: the backend reads the marker through the fd it was given.
    let memory = memfd(0x4000);
    pwrite(&memory, 0x1000, b"DMA memory here!");
    client
        .dma_map(0x8000_0000, 0x2000, memory.as_fd(), 0x1000, true, true)
        .expect("dma_map");
    client.dma_unmap(0x8000_0000, 0x2000).expect("dma_unmap");
    // More than the one fd rust-vmm takes is refused before sending.
    let (a, b) = (eventfd(), eventfd());
    assert!(matches!(
        client.set_irqs(
            PCI_MSIX_IRQ_INDEX,
            proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER,
            0,
            2,
            &[a.as_fd(), b.as_fd()],
        ),
        Err(ClientError::TooManyFds { count: 2, max: 1 })
    ));

    // Interrupts: the backend signals the eventfd it was given.
    let msix = client.irq_info(PCI_MSIX_IRQ_INDEX).expect("irq info");
    assert_eq!(msix.count, 4);
    assert_eq!(msix.flags, proto::IRQ_INFO_EVENTFD);
    let vector = eventfd();
    let flags = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    client
        .set_irqs(PCI_MSIX_IRQ_INDEX, flags, 3, 1, &[vector.as_fd()])
        .expect("set_irqs");
    assert_eq!(wait(&vector), 1);

    client.reset().expect("reset");
    client.shutdown();
    drop(client);
    let result = served.join().expect("server thread");
    assert!(result.is_ok(), "rust-vmm server: {result:?}");

    let log = log.lock().expect("log");
    assert_eq!(log.writes, vec![(PCI_CONFIG_REGION_INDEX, 0x100, data)]);
    assert_eq!(
        log.maps,
        vec![(
            DmaMapFlags::READ_WRITE.bits(),
            0x1000,
            0x8000_0000,
            0x2000,
            Some(b"DMA memory here!".to_vec())
        )]
    );
    assert_eq!(log.unmaps, vec![(0x8000_0000, 0x2000)]);
    assert_eq!(log.set_irqs, vec![(PCI_MSIX_IRQ_INDEX, flags, 3, 1, 1)]);
    assert_eq!(log.resets, 1);
}
