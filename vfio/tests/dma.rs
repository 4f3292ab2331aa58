//! [`DmaTable`] on its own: mapping checks, reads and writes against a memfd the "client" (the
//! test) accesses through its own mapping, spanning adjacent mappings, permissions.

mod common;

use std::fs::File;

use common::{memfd, pattern};
use duplex_vfio::user::{DmaError, DmaTable, Errno};

const PAGE: u64 = 4096;

fn client_mapping(fd: &std::os::fd::OwnedFd) -> memmap2::MmapMut {
    let file = File::from(fd.try_clone().expect("dup memfd"));
    // SAFETY: the test owns the memfd and uses the table's copies and this mapping one after
    // the other, never at the same time.
    unsafe { memmap2::MmapMut::map_mut(&file) }.expect("client's mapping")
}

#[test]
fn bytes_cross_between_client_mapping_and_table() {
    let fd = memfd(4 * PAGE);
    let mut client = client_mapping(&fd);
    let mut table = DmaTable::new();
    table
        .map(
            0x10_0000,
            4 * PAGE,
            0,
            true,
            true,
            fd.try_clone().expect("dup"),
        )
        .expect("map");
    assert_eq!(table.len(), 1);

    let data = pattern(3000, 1);
    client[100..3100].copy_from_slice(&data);
    let mut seen = vec![0u8; 3000];
    table.read(0x10_0000 + 100, &mut seen).expect("read");
    assert_eq!(seen, data);

    let reply = pattern(5000, 2);
    table.write(0x10_0000 + PAGE + 7, &reply).expect("write");
    assert_eq!(&client[PAGE as usize + 7..PAGE as usize + 5007], &reply[..]);

    // Past the end, before the start.
    let mut two = [0u8; 2];
    assert!(matches!(
        table.read(0x10_0000 + 4 * PAGE - 1, &mut two),
        Err(DmaError::NotMapped { .. })
    ));
    assert!(matches!(
        table.write(0x10_0000 - 1, &two),
        Err(DmaError::NotMapped { .. })
    ));
    assert!(matches!(
        table.read(u64::MAX, &mut two),
        Err(DmaError::NotMapped { .. })
    ));
    table.read(0x10_0000, &mut []).expect("nothing to read");

    table.unmap(0x10_0000, 4 * PAGE).expect("unmap");
    assert!(table.is_empty());
    assert!(matches!(
        table.read(0x10_0000, &mut two),
        Err(DmaError::NotMapped { .. })
    ));
}

#[test]
fn file_offset_is_honoured() {
    let fd = memfd(4 * PAGE);
    let mut client = client_mapping(&fd);
    client[2 * PAGE as usize..2 * PAGE as usize + 5].copy_from_slice(b"third");
    let mut table = DmaTable::new();
    table
        .map(0, PAGE, 2 * PAGE, true, false, fd.try_clone().expect("dup"))
        .expect("map");
    let mut seen = [0u8; 5];
    table.read(0, &mut seen).expect("read");
    assert_eq!(&seen, b"third");
}

#[test]
fn accesses_span_adjacent_mappings_and_check_all_first() {
    let first = memfd(PAGE);
    let second = memfd(PAGE);
    let mut client_first = client_mapping(&first);
    let mut client_second = client_mapping(&second);
    let mut table = DmaTable::new();
    table
        .map(0x1000, PAGE, 0, true, true, first.try_clone().expect("dup"))
        .expect("map first");
    table
        .map(
            0x2000,
            PAGE,
            0,
            true,
            false,
            second.try_clone().expect("dup"),
        )
        .expect("map second (read-only)");
    client_first[PAGE as usize - 4..].copy_from_slice(b"spli");
    client_second[..4].copy_from_slice(b"t up");
    let mut seen = [0u8; 8];
    table.read(0x2000 - 4, &mut seen).expect("read across");
    assert_eq!(&seen, b"split up");

    // A write across both is refused whole: the second is read-only, so the first is untouched.
    assert!(matches!(
        table.write(0x2000 - 4, b"XXXXXXXX"),
        Err(DmaError::Permission { write: true, .. })
    ));
    assert_eq!(&client_first[PAGE as usize - 4..], b"spli");
    // A gap after the second: refused whole too.
    let mut long = vec![0u8; 2 * PAGE as usize];
    assert!(matches!(
        table.read(0x1000 + PAGE, &mut long),
        Err(DmaError::NotMapped { .. })
    ));
    assert_eq!(
        table.mappings().collect::<Vec<_>>(),
        vec![(0x1000, PAGE), (0x2000, PAGE)]
    );
}

#[test]
fn write_only_mappings_refuse_reads() {
    let fd = memfd(PAGE);
    let client = client_mapping(&fd);
    let mut table = DmaTable::new();
    table
        .map(0, PAGE, 0, false, true, fd.try_clone().expect("dup"))
        .expect("map");
    table.write(0, b"in").expect("write");
    assert_eq!(&client[..2], b"in");
    let mut buf = [0u8; 2];
    let error = table
        .read(0, &mut buf)
        .expect_err("read of a write-only mapping");
    assert!(matches!(error, DmaError::Permission { write: false, .. }));
    assert_eq!(error.errno(), Errno::EFAULT);
}

#[test]
fn bad_mappings_are_refused() {
    let fd = memfd(2 * PAGE);
    let dup = || fd.try_clone().expect("dup");
    let mut table = DmaTable::new();
    table
        .map(0x4000, 2 * PAGE, 0, true, true, dup())
        .expect("map");

    let beyond = table
        .map(0x10_0000, 3 * PAGE, 0, true, true, dup())
        .expect_err("past the file's end");
    assert!(matches!(beyond, DmaError::BeyondFile { file_size, .. } if file_size == 2 * PAGE));
    assert!(matches!(
        table.map(0x10_0000, PAGE, 2 * PAGE, true, true, dup()),
        Err(DmaError::BeyondFile { .. })
    ));
    for (iova, size) in [(0x3000, 2 * PAGE), (0x5000, PAGE), (0x5000, 4 * PAGE)] {
        let overlap = table
            .map(iova, size, 0, true, true, dup())
            .expect_err("overlap");
        assert!(matches!(
            overlap,
            DmaError::Overlap {
                existing: 0x4000,
                ..
            }
        ));
        assert_eq!(overlap.errno(), Errno::EEXIST);
    }
    assert!(matches!(
        table.map(0x10_0000, 0, 0, true, true, dup()),
        Err(DmaError::Empty { .. })
    ));
    assert!(matches!(
        table.map(0x10_0000, PAGE, 0, false, false, dup()),
        Err(DmaError::NoAccess { .. })
    ));
    for (iova, size, offset) in [
        (0x10_0001, PAGE, 0),
        (0x10_0000, 100, 0),
        (0x10_0000, PAGE, 8),
    ] {
        assert!(matches!(
            table.map(iova, size, offset, true, true, dup()),
            Err(DmaError::Unaligned { .. })
        ));
    }
    assert!(matches!(
        table.map(u64::MAX - PAGE + 1, PAGE, 0, true, true, dup()),
        Err(DmaError::Overflow { .. })
    ));
    assert!(matches!(
        table.map(0, PAGE, u64::MAX - PAGE + 1, true, true, dup()),
        Err(DmaError::Overflow { .. })
    ));
    // Not a file with a size: a socket's is 0.
    let (socket, _other) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    assert!(matches!(
        table.map(0x10_0000, PAGE, 0, true, true, socket.into()),
        Err(DmaError::BeyondFile { file_size: 0, .. })
    ));

    // Adjacent is fine.
    table
        .map(0x4000 + 2 * PAGE, PAGE, 0, true, true, dup())
        .expect("adjacent above");
    table
        .map(0x3000, PAGE, PAGE, true, true, dup())
        .expect("adjacent below");
    assert_eq!(table.len(), 3);

    assert!(matches!(
        table.unmap(0x4000, PAGE),
        Err(DmaError::NoSuchMapping { .. })
    ));
    assert!(matches!(
        table.unmap(0x4001, 2 * PAGE),
        Err(DmaError::NoSuchMapping { .. })
    ));
    table.clear();
    assert!(table.is_empty());
    assert!(format!("{table:?}").contains("[]"));
}
