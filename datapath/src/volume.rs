//! Volumes: the backing files and block devices the datapath serves blocks from.
//!
//! The supervisor opens every backing store (read-write; `O_DIRECT` when the topology says
//! `direct`) and hands the fd over as resource `volume:NAME`; the datapath never opens a path.
//! [`Volume::new`] checks the fd against its [`VolumeSpec`] before the sandbox goes on: access
//! mode, `O_DIRECT` as announced, a regular file or a block device, and for a regular file a size
//! that covers every block (a block device's size needs an ioctl the sandbox does not allow, so
//! the supervisor checks it at open).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use duplex_ipc::topology::VolumeSpec;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::{fstat, SFlag};

use crate::mapped::MappedFile;

/// Errors taking a volume's backing fd.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The spec itself is impossible (the topology validation should have refused it).
    #[error("Volume {name}: {why}")]
    BadSpec {
        /// Volume name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A system call on the fd failed.
    #[error("Volume {name}: {what} of its backing fd failed: {source}")]
    Sys {
        /// Volume name.
        name: String,
        /// Which call.
        what: &'static str,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// The fd does not match what the spec says or is no storage.
    #[error("Volume {name} ({path}): {why}")]
    BadFd {
        /// Volume name.
        name: String,
        /// Backing path (for the message only).
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// `f_type` of ramfs (linux/magic.h; not in the libc crate).
const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;

/// One volume: its geometry and its open backing file or block device.
#[derive(Debug)]
pub struct Volume {
    id: u32,
    name: String,
    block_size: u32,
    blocks: u64,
    direct: bool,
    block_device: bool,
    memory_backed: bool,
    mapped: Option<MappedFile>,
    fd: OwnedFd,
}

impl Volume {
    /// Takes the handed-over backing fd of `spec`, checking it (see the module docs).
    pub fn new(spec: &VolumeSpec, fd: OwnedFd) -> Result<Self, VolumeError> {
        let bad_spec = |why: String| VolumeError::BadSpec {
            name: spec.name.clone(),
            why,
        };
        if !matches!(spec.block_size, 512 | 4096) {
            return Err(bad_spec(format!("block size {}", spec.block_size)));
        }
        let bytes = spec
            .blocks
            .checked_mul(u64::from(spec.block_size))
            .filter(|_| spec.blocks > 0)
            .ok_or_else(|| bad_spec(format!("{} blocks", spec.blocks)))?;
        let sys = |what, source| VolumeError::Sys {
            name: spec.name.clone(),
            what,
            source,
        };
        let bad_fd = |why: String| VolumeError::BadFd {
            name: spec.name.clone(),
            path: spec.path.clone(),
            why,
        };
        let flags = OFlag::from_bits_truncate(
            fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| sys("F_GETFL", e))?,
        );
        if flags & OFlag::O_ACCMODE != OFlag::O_RDWR {
            return Err(bad_fd("not opened read-write".into()));
        }
        if flags.contains(OFlag::O_DIRECT) != spec.direct {
            return Err(bad_fd(format!(
                "the topology says direct = {} but the fd was opened {} O_DIRECT",
                spec.direct,
                if spec.direct { "without" } else { "with" }
            )));
        }
        let st = fstat(fd.as_raw_fd()).map_err(|e| sys("fstat", e))?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let block_device = if kind == SFlag::S_IFREG {
            let size = u64::try_from(st.st_size).unwrap_or(0);
            if size < bytes {
                return Err(bad_fd(format!(
                    "the backing file holds {size} bytes, the volume needs {bytes}"
                )));
            }
            false
        } else if kind == SFlag::S_IFBLK {
            true
        } else {
            return Err(bad_fd("neither a regular file nor a block device".into()));
        };
        // tmpfs and ramfs: every read and write is a copy in the kernel that never waits for a
        // device. The engine does those inline rather than through the io_uring, which would
        // hand each one to a kernel worker thread (these file systems cannot take
        // IOCB_NOWAIT), costing a thread switch per I/O on the datapath's core.
        let memory_backed = !block_device
            && nix::sys::statfs::fstatfs(&fd).is_ok_and(|s| {
                let t = s.filesystem_type();
                t == nix::sys::statfs::TMPFS_MAGIC || t.0 == RAMFS_MAGIC
            });
        // Those are mapped, and the engine copies (the mapped module); should mapping fail,
        // the io_uring serves them, slowly but correctly.
        let mapped = if memory_backed {
            match MappedFile::map(fd.as_fd(), bytes) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(volume = %spec.name, error = %e, "cannot map a memory-backed volume: serving it through the io_uring");
                    None
                }
            }
        } else {
            None
        };
        Ok(Self {
            id: spec.id,
            name: spec.name.clone(),
            block_size: spec.block_size,
            blocks: spec.blocks,
            direct: spec.direct,
            block_device,
            memory_backed,
            mapped,
            fd,
        })
    }

    /// Id used in descriptors.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Name in the node config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Logical block size in bytes (512 or 4096).
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Size in logical blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The fd was opened with `O_DIRECT`.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The backing store is a block device (not a regular file).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The backing file lives in memory (tmpfs or ramfs): reads and writes never wait for a
    /// device, so the engine maps the file and copies, inline (the `mapped` module).
    pub fn memory_backed(&self) -> bool {
        self.memory_backed
    }

    /// The mapping of a memory-backed volume, through which the engine copies.
    pub(crate) fn mapped(&self) -> Option<&MappedFile> {
        self.mapped.as_ref()
    }

    /// The backing fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn spec(blocks: u64, direct: bool) -> VolumeSpec {
        VolumeSpec {
            id: 3,
            name: "v".into(),
            resource: "volume:v".into(),
            path: "/somewhere/v".into(),
            block_size: 512,
            blocks,
            direct,
            drive: None,
        }
    }

    fn file(len: u64, write: bool) -> (tempfile::TempDir, OwnedFd) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(len))
            .expect("create");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(0)
            .open(&path)
            .expect("open");
        (dir, f.into())
    }

    #[test]
    fn accepts_a_file_that_covers_the_volume() {
        let (_d, fd) = file(512 * 8, true);
        let v = Volume::new(&spec(8, false), fd).expect("volume");
        assert_eq!((v.id(), v.block_size(), v.blocks()), (3, 512, 8));
        assert!(!v.is_block_device() && !v.direct());
    }

    #[test]
    fn refuses_short_files_read_only_fds_direct_mismatch_and_non_storage() {
        let (_d, fd) = file(512 * 7, true);
        let e = Volume::new(&spec(8, false), fd).expect_err("short");
        assert!(e.to_string().contains("holds 3584 bytes"), "{e}");
        let (_d, fd) = file(512 * 8, false);
        let e = Volume::new(&spec(8, false), fd).expect_err("read-only");
        assert!(e.to_string().contains("read-write"), "{e}");
        let (_d, fd) = file(512 * 8, true);
        let e = Volume::new(&spec(8, true), fd).expect_err("not direct");
        assert!(e.to_string().contains("without O_DIRECT"), "{e}");
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        assert!(Volume::new(&spec(8, false), r).is_err());
        let (_d, fd) = file(512 * 8, true);
        let mut s = spec(8, false);
        s.block_size = 1024;
        assert!(matches!(
            Volume::new(&s, fd),
            Err(VolumeError::BadSpec { .. })
        ));
    }
}
