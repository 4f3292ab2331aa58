//! Wire compatibility, the other way: rust-vmm's `vfio_user::Client`, an independent
//! implementation of the protocol, against our [`serve`].

mod common;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::thread;

use common::{
    dma_copy, eventfd, memfd, pattern, pwrite, wait, MemDevice, SeenMap, BAR0_SIZE, BAR0_SPARSE,
    CONFIG_SIZE, DOORBELL_DMA, DOORBELL_IRQ, MSIX_COUNT,
};
use duplex_vfio::user::proto::{self, PCI_CONFIG_REGION_INDEX, PCI_MSIX_IRQ_INDEX};
use duplex_vfio::user::serve;

#[test]
fn rust_vmm_client_against_our_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vfio-user.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let (mut device, seen) = MemDevice::new();
    let bar0 = std::sync::Arc::clone(&device.bar0_fd);
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        serve(stream, &mut device)
    });

    let mut client = vfio_user::Client::new(&path).expect("rust-vmm client connects");

    // Regions, with BAR0's sparse areas and fd.
    let region = client.region(0).expect("BAR0");
    assert_eq!(region.size, BAR0_SIZE);
    assert_eq!(
        region.flags,
        proto::REGION_INFO_FLAG_READ
            | proto::REGION_INFO_FLAG_WRITE
            | proto::REGION_INFO_FLAG_MMAP
            | proto::REGION_INFO_FLAG_CAPS
    );
    let areas: Vec<(u64, u64)> = region
        .sparse_areas
        .iter()
        .map(|area| (area.offset, area.size))
        .collect();
    assert_eq!(areas, BAR0_SPARSE.to_vec());
    let file_offset = region.file_offset.as_ref().expect("BAR0's fd");
    assert_eq!(file_offset.start(), 0);
    pwrite(bar0.as_fd(), 0x1000, b"shared BAR0");
    let mut seen_through_fd = [0u8; 11];
    file_offset
        .file()
        .read_exact_at(&mut seen_through_fd, 0x1000)
        .expect("read through the fd rust-vmm received");
    assert_eq!(&seen_through_fd, b"shared BAR0");
    let config = client.region(PCI_CONFIG_REGION_INDEX).expect("config");
    assert_eq!(config.size, CONFIG_SIZE);
    assert!(config.file_offset.is_none());

    // Region bytes round trip.
    let data = pattern(64, 1);
    client
        .region_write(PCI_CONFIG_REGION_INDEX, 8, &data)
        .expect("region write");
    let mut back = vec![0u8; 64];
    client
        .region_read(PCI_CONFIG_REGION_INDEX, 8, &mut back)
        .expect("region read");
    assert_eq!(back, data);

    // DMA: map a memfd, have the device copy within it, read the result through the file.
    let memory = memfd(0x3000);
    let marker = pattern(100, 7);
    pwrite(&memory, 0x1000, &marker);
    client
        .dma_map(0x1000, 0x4000_0000, 0x2000, memory.as_raw_fd())
        .expect("dma_map");
    client
        .region_write(0, DOORBELL_DMA, &dma_copy(0x4000_0000, 0x4000_1000, 100))
        .expect("DMA copy");
    let file = File::from(memory.try_clone().expect("dup"));
    let mut copied = vec![0u8; 100];
    file.read_exact_at(&mut copied, 0x2000)
        .expect("read the copy");
    assert_eq!(copied, marker);
    assert_eq!(
        seen.lock().expect("seen").maps,
        vec![SeenMap {
            iova: 0x4000_0000,
            size: 0x2000,
            file_offset: 0x1000,
            readable: true,
            writable: true,
            had_fd: true,
        }]
    );

    // Interrupts.
    let msix = client.get_irq_info(PCI_MSIX_IRQ_INDEX).expect("irq info");
    assert_eq!(msix.count, MSIX_COUNT);
    let vector = eventfd();
    client
        .set_irqs(
            PCI_MSIX_IRQ_INDEX,
            proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER,
            2,
            1,
            &[vector.as_raw_fd()],
        )
        .expect("set_irqs");
    client
        .region_write(0, DOORBELL_IRQ, &2u32.to_ne_bytes())
        .expect("ring vector 2");
    assert_eq!(wait(&vector), 1);

    client.dma_unmap(0x4000_0000, 0x2000).expect("dma_unmap");
    client.reset().expect("reset");
    client.shutdown().expect("shutdown");
    drop(client);
    let served = server.join().expect("server thread");
    assert!(served.is_ok(), "serve: {served:?}");

    let seen = seen.lock().expect("seen");
    assert_eq!(seen.unmaps, vec![(0x4000_0000, 0x2000)]);
    assert_eq!(seen.resets, 1);
    assert_eq!(seen.set_irqs.len(), 1);
    assert!(seen.dma_errors.is_empty(), "{:?}", seen.dma_errors);
}
