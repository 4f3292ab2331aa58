//! Attaching a bad region fails with a clear error, never a crash.

use std::os::fd::OwnedFd;

use duplex_ipc::desc::IoDesc;
use duplex_ipc::pool::{Holder, Pool, PoolError};
use duplex_ipc::region::{
    raw_memfd_for_tests, Region, RegionError, RegionHeader, RegionKind, REGION_MAGIC,
    REGION_VERSION,
};
use duplex_ipc::ring::{RingError, RingRegion};

fn header_bytes(h: RegionHeader) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&h.magic.to_le_bytes());
    v.extend_from_slice(&h.version.to_le_bytes());
    v.extend_from_slice(&h.kind.to_le_bytes());
    v.extend_from_slice(&h.layout_size.to_le_bytes());
    for p in h.params {
        v.extend_from_slice(&p.to_le_bytes());
    }
    v
}

fn good_header(len: u64) -> RegionHeader {
    RegionHeader {
        magic: REGION_MAGIC,
        version: REGION_VERSION,
        kind: RegionKind::Plain as u32,
        layout_size: len,
        params: [0; 5],
    }
}

fn attach(fd: OwnedFd) -> String {
    match Region::attach(fd, RegionKind::Plain) {
        Ok(_) => "attached".into(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_well_formed_region_attaches() {
    let fd = raw_memfd_for_tests(4096, true, &header_bytes(good_header(4096))).expect("memfd");
    assert_eq!(attach(fd), "attached");
}

#[test]
fn wrong_magic_is_refused() {
    let mut h = good_header(4096);
    h.magic = 0x1234;
    let fd = raw_memfd_for_tests(4096, true, &header_bytes(h)).expect("memfd");
    let e = Region::attach(fd, RegionKind::Plain).expect_err("must fail");
    assert!(matches!(e, RegionError::BadMagic(0x1234)), "{e}");
    assert!(e.to_string().contains("not a duplex region"), "{e}");
}

#[test]
fn wrong_version_is_refused() {
    let mut h = good_header(4096);
    h.version = REGION_VERSION + 1;
    let fd = raw_memfd_for_tests(4096, true, &header_bytes(h)).expect("memfd");
    let e = Region::attach(fd, RegionKind::Plain).expect_err("must fail");
    assert!(matches!(e, RegionError::BadVersion { .. }), "{e}");
}

#[test]
fn truncated_memfd_is_refused() {
    // Smaller than a header.
    let fd = raw_memfd_for_tests(16, true, &[]).expect("memfd");
    let e = Region::attach(fd, RegionKind::Plain).expect_err("must fail");
    assert!(
        matches!(e, RegionError::Truncated { actual: 16, .. }),
        "{e}"
    );
    // A header that claims more than the file holds.
    let fd = raw_memfd_for_tests(4096, true, &header_bytes(good_header(8192))).expect("memfd");
    let e = Region::attach(fd, RegionKind::Plain).expect_err("must fail");
    assert!(
        matches!(
            e,
            RegionError::Truncated {
                actual: 4096,
                needed: 8192
            }
        ),
        "{e}"
    );
    // A header that claims less than the file holds.
    let fd = raw_memfd_for_tests(8192, true, &header_bytes(good_header(4096))).expect("memfd");
    let e = Region::attach(fd, RegionKind::Plain).expect_err("must fail");
    assert!(matches!(e, RegionError::SizeMismatch { .. }), "{e}");
}

#[test]
fn unsealed_memfd_is_refused() {
    let fd = raw_memfd_for_tests(4096, false, &header_bytes(good_header(4096))).expect("memfd");
    let e = Region::attach(fd, RegionKind::Plain).expect_err("must fail");
    assert!(matches!(e, RegionError::NotSealed(_)), "{e}");
}

#[test]
fn foreign_fds_are_refused() {
    let file = tempfile_in_tmp();
    let e = Region::attach(OwnedFd::from(file), RegionKind::Plain).expect_err("must fail");
    assert!(matches!(e, RegionError::NotMemfd(_)), "{e}");
    let (r, _w) = nix::unistd::pipe().expect("pipe");
    let e = Region::attach(r, RegionKind::Plain).expect_err("must fail");
    assert!(
        e.to_string().contains("not a memfd") || matches!(e, RegionError::Truncated { .. }),
        "{e}"
    );
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let e = Region::attach(OwnedFd::from(a), RegionKind::Plain).expect_err("must fail");
    assert!(
        e.to_string().contains("not a memfd") || matches!(e, RegionError::Truncated { .. }),
        "{e}"
    );
}

fn tempfile_in_tmp() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("duplex-region-test-{}", std::process::id()));
    let mut f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("temp file");
    std::io::Write::write_all(&mut f, &header_bytes(good_header(4096))).expect("write");
    f.set_len(4096).expect("len");
    let _ = std::fs::remove_file(&path);
    f
}

#[test]
fn wrong_kind_is_refused() {
    let pool = Pool::create(
        "p",
        64,
        4,
        Holder {
            role: 1,
            incarnation: 1,
        },
    )
    .expect("pool");
    let e = RingRegion::<IoDesc>::attach(pool.region().try_clone_fd().expect("dup"))
        .expect_err("must fail");
    assert!(
        matches!(e, RingError::Region(RegionError::WrongKind { .. })),
        "{e}"
    );
    let ring = RingRegion::<IoDesc>::create("r", 8, 1).expect("ring");
    let e = Pool::attach(
        ring.region().try_clone_fd().expect("dup"),
        Holder {
            role: 1,
            incarnation: 1,
        },
    )
    .expect_err("must fail");
    assert!(
        matches!(e, PoolError::Region(RegionError::WrongKind { .. })),
        "{e}"
    );
}

#[test]
fn ring_of_another_descriptor_type_is_refused() {
    let ring = RingRegion::<IoDesc>::create("r", 8, 1).expect("ring");
    let e = RingRegion::<u64>::attach(ring.region().try_clone_fd().expect("dup"))
        .expect_err("must fail");
    assert!(
        matches!(
            e,
            RingError::DescriptorMismatch {
                found: 64,
                expected: 8,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn bad_layout_parameters_are_refused() {
    // A ring header whose capacity is not a power of two.
    let mut h = good_header(4096);
    h.kind = RegionKind::Ring as u32;
    h.params = [3, 64, 8, 1, 0];
    let fd = raw_memfd_for_tests(4096, true, &header_bytes(h)).expect("memfd");
    assert!(RingRegion::<IoDesc>::attach(fd).is_err());
    // A ring whose slots would run past the end of the region.
    h.params = [1024, 64, 8, 1, 0];
    let fd = raw_memfd_for_tests(4096, true, &header_bytes(h)).expect("memfd");
    let e = RingRegion::<IoDesc>::attach(fd).expect_err("must fail");
    assert!(e.to_string().contains("outside"), "{e}");
    // A pool whose chunk table overlaps its data.
    let mut h = good_header(8192);
    h.kind = RegionKind::Pool as u32;
    h.params = [64, 100, 128, 256, 0];
    let fd = raw_memfd_for_tests(8192, true, &header_bytes(h)).expect("memfd");
    assert!(Pool::attach(
        fd,
        Holder {
            role: 1,
            incarnation: 1
        }
    )
    .is_err());
}
