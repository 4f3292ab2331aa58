//! Our client against our server, over a socketpair: every operation, error replies, requests
//! refused before sending, and DMA through a memfd the client writes through its own mapping.

mod common;

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{
    dma_copy, eventfd, memfd, pattern, pwrite, wait, MemDevice, Seen, BAR0_SIZE, BAR0_SPARSE,
    CONFIG_SIZE, DOORBELL_DMA, DOORBELL_IRQ, MSIX_COUNT, POISON,
};
use duplex_vfio::user::proto::{
    self, command, PCI_CONFIG_REGION_INDEX, PCI_MSIX_IRQ_INDEX, PCI_ROM_REGION_INDEX,
};
use duplex_vfio::user::{serve, Client, ClientError, Errno, ServeError};

const TIMEOUT: Duration = Duration::from_secs(10);

fn start() -> (Client, Arc<Mutex<Seen>>, JoinHandle<Result<(), ServeError>>) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let (mut device, seen) = MemDevice::new();
    let server = thread::spawn(move || serve(theirs, &mut device));
    let client = Client::from_stream(ours, TIMEOUT).expect("connect");
    (client, seen, server)
}

fn finish(client: Client, server: JoinHandle<Result<(), ServeError>>) {
    client.shutdown();
    drop(client);
    let served = server.join().expect("server thread");
    assert!(served.is_ok(), "serve ended with {served:?}");
}

fn device_errno(result: Result<(), ClientError>, expected_command: u16) -> Errno {
    match result {
        Err(ClientError::Device { command, errno }) => {
            assert_eq!(command, expected_command);
            errno
        }
        other => panic!("expected an error reply to {expected_command}, got {other:?}"),
    }
}

#[test]
fn connect_reads_version_device_and_regions() {
    let (client, _seen, server) = start();
    assert_eq!(client.version(), (0, 1));
    assert_eq!(client.server_capabilities(), proto::Capabilities::ours());
    let info = client.device_info();
    assert_eq!(info.num_regions, proto::PCI_NUM_REGIONS);
    assert_eq!(info.num_irqs, proto::PCI_NUM_IRQS);
    assert_eq!(
        info.flags,
        proto::DEVICE_FLAGS_PCI | proto::DEVICE_FLAGS_RESET
    );

    let bar0 = client.region(0).expect("BAR0");
    assert_eq!(bar0.size, BAR0_SIZE);
    assert_eq!(bar0.sparse, BAR0_SPARSE.to_vec());
    assert_ne!(bar0.flags & proto::REGION_INFO_FLAG_MMAP, 0);
    assert_ne!(bar0.flags & proto::REGION_INFO_FLAG_CAPS, 0);
    let fd = bar0.mmap_fd.as_ref().expect("BAR0's mmap fd");
    // The fd is the device's BAR0 memfd: what goes through the protocol shows in the file.
    pwrite(fd.as_fd(), 0x2000, b"through the fd");
    let mut buf = [0u8; 14];
    let mut client = client;
    client.region_read(0, 0x2000, &mut buf).expect("BAR0 read");
    assert_eq!(&buf, b"through the fd");

    let config = client.region(PCI_CONFIG_REGION_INDEX).expect("config");
    assert_eq!(config.size, CONFIG_SIZE);
    assert!(config.mmap_fd.is_none());
    assert!(config.sparse.is_empty());
    assert!(client.region(proto::PCI_NUM_REGIONS).is_none());
    finish(client, server);
}

#[test]
fn region_round_trip_and_errors() {
    let (mut client, _seen, server) = start();
    let data = pattern(200, 3);
    client
        .region_write(PCI_CONFIG_REGION_INDEX, 0x40, &data)
        .expect("config write");
    let mut back = vec![0u8; 200];
    client
        .region_read(PCI_CONFIG_REGION_INDEX, 0x40, &mut back)
        .expect("config read");
    assert_eq!(back, data);

    // The device refuses: an error reply, and the connection stays usable.
    let errno = device_errno(
        client.region_write(0, POISON, &[1, 2, 3, 4]),
        command::REGION_WRITE,
    );
    assert_eq!(errno, Errno::EINVAL);
    // The server refuses a write to a read-only region.
    let errno = device_errno(
        client.region_write(PCI_ROM_REGION_INDEX, 0, &[1]),
        command::REGION_WRITE,
    );
    assert_eq!(errno, Errno::EACCES);
    let mut rom = [0u8; 4];
    client
        .region_read(PCI_ROM_REGION_INDEX, 0, &mut rom)
        .expect("ROM read");
    assert_eq!(rom, [0xee; 4]);
    assert!(!client.is_broken());

    // Refused before sending.
    let mut two = [0u8; 2];
    assert!(matches!(
        client.region_read(PCI_CONFIG_REGION_INDEX, CONFIG_SIZE - 1, &mut two),
        Err(ClientError::OutOfRange { .. })
    ));
    assert!(matches!(
        client.region_write(PCI_CONFIG_REGION_INDEX, u64::MAX, &two),
        Err(ClientError::OutOfRange { .. })
    ));
    assert!(matches!(
        client.region_read(42, 0, &mut two),
        Err(ClientError::NoSuchRegion(42))
    ));
    let mut huge = vec![0u8; proto::MAX_DATA_XFER_SIZE as usize + 1];
    assert!(matches!(
        client.region_read(0, 0, &mut huge),
        Err(ClientError::TooLarge { .. })
    ));
    // Zero bytes: nothing to do.
    client
        .region_read(PCI_CONFIG_REGION_INDEX, 0, &mut [])
        .expect("empty read");
    client
        .region_read(PCI_CONFIG_REGION_INDEX, 0, &mut back)
        .expect("still usable");
    finish(client, server);
}

#[test]
fn dma_bytes_cross_both_ways() {
    let (mut client, seen, server) = start();
    const IOVA: u64 = 0x10_0000;
    const SIZE: u64 = 0x4000;
    let fd = memfd(SIZE);
    let file = File::from(fd.try_clone().expect("dup memfd"));
    // SAFETY: the test owns the memfd; the device writes it only while the test waits for the
    // reply to the doorbell write below, and the test reads it only after that.
    let mut mem = unsafe { memmap2::MmapMut::map_mut(&file) }.expect("client's own mapping");
    let data = pattern(512, 9);
    mem[0x1000..0x1000 + 512].copy_from_slice(&data);

    client
        .dma_map(IOVA, SIZE, fd.as_fd(), 0, true, true)
        .expect("dma_map");
    assert_eq!(
        seen.lock().expect("seen").maps,
        vec![common::SeenMap {
            iova: IOVA,
            size: SIZE,
            file_offset: 0,
            readable: true,
            writable: true,
            had_fd: true,
        }]
    );
    // The device copies page 1 to page 3 through its DmaTable.
    client
        .region_write(
            0,
            DOORBELL_DMA,
            &dma_copy(IOVA + 0x1000, IOVA + 0x3000, 512),
        )
        .expect("DMA copy");
    assert_eq!(&mem[0x3000..0x3000 + 512], &data[..]);
    // And across the second half of the mapping, into the client's next write.
    mem[0x2000..0x2008].copy_from_slice(b"updated!");
    client
        .region_write(0, DOORBELL_DMA, &dma_copy(IOVA + 0x2000, IOVA, 8))
        .expect("DMA copy");
    assert_eq!(&mem[0..8], b"updated!");

    // Refused maps: past the file, overlapping, unaligned, empty.
    let short = memfd(0x1000);
    let errno = device_errno(
        client.dma_map(0x20_0000, 0x2000, short.as_fd(), 0, true, true),
        command::DMA_MAP,
    );
    assert_eq!(errno, Errno::EINVAL);
    let errno = device_errno(
        client.dma_map(IOVA + 0x3000, 0x2000, fd.as_fd(), 0, true, false),
        command::DMA_MAP,
    );
    assert_eq!(errno, Errno::EEXIST);
    let errno = device_errno(
        client.dma_map(0x30_0100, 0x1000, fd.as_fd(), 0, true, true),
        command::DMA_MAP,
    );
    assert_eq!(errno, Errno::EINVAL);
    let errno = device_errno(
        client.dma_map(0x30_0000, 0, fd.as_fd(), 0, true, true),
        command::DMA_MAP,
    );
    assert_eq!(errno, Errno::EINVAL);

    // Unmap: only the exact range.
    device_errno(client.dma_unmap(IOVA, 0x1000), command::DMA_UNMAP);
    client.dma_unmap(IOVA, SIZE).expect("dma_unmap");
    // Now the device's DMA faults.
    let errno = device_errno(
        client.region_write(0, DOORBELL_DMA, &dma_copy(IOVA, IOVA + 0x1000, 8)),
        command::REGION_WRITE,
    );
    assert_eq!(errno, Errno::EFAULT);
    assert_eq!(
        seen.lock().expect("seen").unmaps,
        vec![(IOVA, 0x1000), (IOVA, SIZE)]
    );
    drop(mem);
    finish(client, server);
}

#[test]
fn interrupts_and_reset() {
    let (mut client, seen, server) = start();
    let msix = client.irq_info(PCI_MSIX_IRQ_INDEX).expect("irq info");
    assert_eq!(msix.index, PCI_MSIX_IRQ_INDEX);
    assert_eq!(msix.count, MSIX_COUNT);
    assert_ne!(msix.flags & proto::IRQ_INFO_EVENTFD, 0);
    let errno = match client.irq_info(99) {
        Err(ClientError::Device { errno, .. }) => errno,
        other => panic!("irq_info(99) gave {other:?}"),
    };
    assert_eq!(errno, Errno::EINVAL);

    let vectors = [eventfd(), eventfd()];
    let flags = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    client
        .set_irqs(
            PCI_MSIX_IRQ_INDEX,
            flags,
            1,
            2,
            &[vectors[0].as_fd(), vectors[1].as_fd()],
        )
        .expect("set_irqs");
    client
        .region_write(0, DOORBELL_IRQ, &2u32.to_ne_bytes())
        .expect("ring vector 2");
    assert_eq!(wait(&vectors[1]), 1);
    client
        .region_write(0, DOORBELL_IRQ, &1u32.to_ne_bytes())
        .expect("ring vector 1");
    assert_eq!(wait(&vectors[0]), 1);

    // Two eventfds for one interrupt; a range past the count; two data types.
    device_errno(
        client.set_irqs(
            PCI_MSIX_IRQ_INDEX,
            flags,
            0,
            1,
            &[vectors[0].as_fd(), vectors[1].as_fd()],
        ),
        command::DEVICE_SET_IRQS,
    );
    device_errno(
        client.set_irqs(PCI_MSIX_IRQ_INDEX, flags, 3, 2, &[]),
        command::DEVICE_SET_IRQS,
    );
    device_errno(
        client.set_irqs(
            PCI_MSIX_IRQ_INDEX,
            flags | proto::IRQ_SET_DATA_NONE,
            0,
            1,
            &[],
        ),
        command::DEVICE_SET_IRQS,
    );
    assert!(matches!(
        client.set_irqs(
            PCI_MSIX_IRQ_INDEX,
            proto::IRQ_SET_DATA_BOOL | proto::IRQ_SET_ACTION_MASK,
            0,
            1,
            &[]
        ),
        Err(ClientError::Unsupported(_))
    ));
    // Disable all: count 0 with DATA_NONE.
    client
        .set_irqs(
            PCI_MSIX_IRQ_INDEX,
            proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_TRIGGER,
            0,
            0,
            &[],
        )
        .expect("disable all");

    client.reset().expect("reset");
    let seen = seen.lock().expect("seen");
    assert_eq!(seen.resets, 1);
    assert_eq!(
        seen.set_irqs,
        vec![
            (PCI_MSIX_IRQ_INDEX, flags, 1, 2, 2),
            (
                PCI_MSIX_IRQ_INDEX,
                proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_TRIGGER,
                0,
                0,
                0
            ),
        ]
    );
    drop(seen);
    finish(client, server);
}

#[test]
fn connect_by_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("device.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let (mut device, _seen) = MemDevice::new();
        serve(stream, &mut device)
    });
    let mut client = Client::connect(&path, TIMEOUT).expect("connect by path");
    client.reset().expect("reset");
    finish(client, server);
    assert!(matches!(
        Client::connect(&dir.path().join("nobody"), TIMEOUT),
        Err(ClientError::Connect { .. })
    ));
}

#[test]
fn many_exchanges_stay_in_step() {
    let (mut client, _seen, server) = start();
    for i in 0..3000u32 {
        let value = i.to_ne_bytes();
        client
            .region_write(PCI_CONFIG_REGION_INDEX, u64::from(i % 1000) * 4, &value)
            .expect("write");
        let mut back = [0u8; 4];
        client
            .region_read(PCI_CONFIG_REGION_INDEX, u64::from(i % 1000) * 4, &mut back)
            .expect("read");
        assert_eq!(back, value);
    }
    // A full-size transfer through BAR0's file.
    let mut big = vec![0u8; BAR0_SIZE as usize];
    client.region_read(0, 0, &mut big).expect("whole BAR0");
    finish(client, server);
}
