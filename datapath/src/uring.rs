//! The io_uring: the datapath's DMA-like boundary, where the kernel reads and writes pool memory.
//!
//! This is the only module of the crate allowed `unsafe`. Everything handed to the kernel is
//! built here from indices, never from Rust references into shared memory:
//!
//! * **Pool chunks** are named by handle; their addresses come from [`Pool::chunk_ptr`] after a
//!   bounds check against the pool, and only the kernel touches the bytes. The ring keeps an
//!   `Arc<Pool>`, so the mapping outlives every operation that points into it, and dropping the
//!   ring waits for those operations (or, if waiting fails, leaks what they point at).
//! * **iovec arrays** live in per-slot storage owned by the ring; a slot's array is rewritten
//!   only when no operation of that slot is in flight.
//! * **The zero buffer** (for writing zeroes where `fallocate` cannot) is owned by the ring,
//!   page aligned (so `O_DIRECT` accepts it), and never written after creation.
//!
//! # Restrictions
//!
//! The ring is created disabled (`IORING_SETUP_R_DISABLED`); its files (the engine's wake
//! eventfd, the rings' doorbell eventfds, every volume) are registered, then `IORING_REGISTER_RESTRICTIONS` allows exactly the
//! operations the engine issues — `READV`, `WRITEV`, `FSYNC`, `FALLOCATE`, `POLL_ADD` — and
//! requires `IOSQE_FIXED_FILE` on every submission, and only then is the ring enabled. No
//! `io_uring_register` operation is allowed afterwards. So even a compromised datapath cannot use
//! its ring to open, connect, or touch any fd but its registered volumes and eventfds (the
//! seccomp filter does not see io_uring operations; these restrictions are what confines them),
//! and the sandbox does not allow `io_uring_setup` or `io_uring_register`, so it cannot make or
//! widen another ring.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_ipc::pool::Pool;
use io_uring::{opcode, register::Restriction, squeue, types, IoUring};

use crate::mapped::MappedFile;

/// Set in the `user_data` of a poll, whose low 32 bits are the polled file's index; request
/// operations carry their slot number.
pub(crate) const POLL_BIT: u64 = 1 << 63;
/// Most iovecs one vectored operation carries (`IOV_MAX`); a longer transfer continues in
/// another operation, like a short one.
pub(crate) const MAX_IOVECS: usize = 1024;
/// Bytes of the zero buffer: the largest piece one emulated write-zeroes operation writes.
pub(crate) const ZERO_BYTES: usize = 256 * 1024;
/// How long dropping the ring waits for operations still in flight.
const DROP_WAIT: Duration = Duration::from_secs(30);

/// Errors of the ring.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// The kernel refused a ring operation.
    #[error("io_uring {what} failed: {source}")]
    Sys {
        /// Which operation.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel lacks a feature the engine needs.
    #[error("io_uring lacks {0} (needs Linux 5.11 or later)")]
    Unsupported(&'static str),
    /// The submission queue stayed full after a submit.
    #[error("io_uring submission queue is full")]
    QueueFull,
    /// A caller bug: an operation that the ring's own checks refuse.
    #[error("io_uring operation refused: {0}")]
    Refused(&'static str),
}

/// Same layout as `struct iovec` (asserted below), but made of integers so the ring stays `Send`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Iov {
    /// Address.
    pub(crate) base: usize,
    /// Length.
    pub(crate) len: usize,
}

const _: () = assert!(std::mem::size_of::<Iov>() == std::mem::size_of::<libc::iovec>());
const _: () = assert!(std::mem::align_of::<Iov>() == std::mem::align_of::<libc::iovec>());

/// One page of zeroes, page aligned.
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct ZeroPage([u8; 4096]);

/// Where the bytes of a vectored operation are.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Memory<'a> {
    /// A chain of pool chunks, packed from its head (chunk `i` holds bytes `[i*cs, (i+1)*cs)`).
    Chain(&'a [u32]),
    /// The zero buffer (writes only), repeated as needed: bytes are all zero wherever they start.
    Zeroes,
}

/// The direction of a vectored operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    /// File → memory (`READV`).
    Read,
    /// Memory → file (`WRITEV`); `dsync`: `RWF_DSYNC`, durable on completion.
    Write {
        /// Durable on completion.
        dsync: bool,
    },
}

/// A vectored transfer: `len` bytes at file `offset`, starting `skip` bytes into `memory`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Transfer<'a> {
    /// Fixed-file index.
    pub file: u32,
    /// Direction.
    pub dir: Dir,
    /// The memory.
    pub memory: Memory<'a>,
    /// Bytes already transferred (skipped in `memory`).
    pub skip: u64,
    /// Bytes to transfer from there (the operation may carry fewer; see [`MAX_IOVECS`]).
    pub len: u64,
    /// File offset of the first byte to transfer.
    pub offset: u64,
    /// Do it now, as a copy to or from this mapping of the same file as `file`, instead of
    /// through the ring: for memory-backed files, where the ring would only hand the copy to a
    /// kernel worker thread. Its result is reaped like a ring completion.
    pub inline: Option<&'a MappedFile>,
}

/// A restricted io_uring with per-slot iovec storage.
pub(crate) struct Uring {
    ring: IoUring,
    pool: Arc<Pool>,
    zeroes: Box<[ZeroPage]>,
    iovs: Vec<Vec<Iov>>,
    slot_inflight: Vec<u32>,
    io_inflight: usize,
    files: u32,
    /// Results of inline transfers, reaped before the ring's completions.
    done_inline: Vec<(u64, i32)>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("sq_entries", &self.ring.params().sq_entries())
            .field("files", &self.files)
            .field("io_inflight", &self.io_inflight)
            .finish_non_exhaustive()
    }
}

fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> UringError {
    move |source| UringError::Sys { what, source }
}

impl Uring {
    /// Creates the ring for `slots` request slots, registers `files` as its fixed files (an
    /// operation names file `i` as `files[i]`), restricts it (module docs) and enables it.
    pub(crate) fn new(
        entries: u32,
        slots: usize,
        files: &[BorrowedFd<'_>],
        pool: Arc<Pool>,
    ) -> Result<Self, UringError> {
        let ring = IoUring::builder()
            .setup_r_disabled()
            .setup_clamp()
            .build(entries)
            .map_err(sys("setup"))?;
        if !ring.params().is_feature_ext_arg() {
            return Err(UringError::Unsupported("IORING_FEAT_EXT_ARG"));
        }
        if !ring.params().is_feature_nodrop() {
            return Err(UringError::Unsupported("IORING_FEAT_NODROP"));
        }
        let fds: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
        let submitter = ring.submitter();
        submitter
            .register_files(&fds)
            .map_err(sys("register files"))?;
        let mut restrictions = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_op(opcode::Fallocate::CODE),
            Restriction::sqe_op(opcode::PollAdd::CODE),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
        ];
        submitter
            .register_restrictions(&mut restrictions)
            .map_err(sys("register restrictions"))?;
        submitter
            .register_enable_rings()
            .map_err(sys("enable rings"))?;
        let zero_page = ZeroPage([0; 4096]);
        Ok(Self {
            ring,
            pool,
            zeroes: vec![zero_page; ZERO_BYTES / 4096].into_boxed_slice(),
            iovs: (0..slots).map(|_| Vec::new()).collect(),
            slot_inflight: vec![0; slots],
            io_inflight: 0,
            files: u32::try_from(fds.len()).unwrap_or(u32::MAX),
            done_inline: Vec::new(),
        })
    }

    /// I/O operations in flight (the poll not counted).
    pub(crate) fn io_inflight(&self) -> usize {
        self.io_inflight
    }

    fn check(&self, slot: usize, file: u32) -> Result<(), UringError> {
        if slot >= self.slot_inflight.len() {
            return Err(UringError::Refused("slot out of range"));
        }
        if file >= self.files {
            return Err(UringError::Refused("file not registered"));
        }
        Ok(())
    }

    /// Queues one SQE, submitting first if the queue is full.
    ///
    /// # Safety
    /// Every buffer `entry` points to must stay valid, and not be written by this process while
    /// the kernel may write it, until its completion is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> Result<(), UringError> {
        for _ in 0..2 {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit().map_err(sys("submit"))?;
        }
        Err(UringError::QueueFull)
    }

    fn counted(&mut self, slot: usize) {
        self.slot_inflight[slot] += 1;
        self.io_inflight += 1;
    }

    /// Queues a vectored read or write for request `slot`. Returns the bytes the operation
    /// carries (at most `t.len`, fewer when it needs more than [`MAX_IOVECS`] iovecs).
    pub(crate) fn transfer(&mut self, slot: usize, t: Transfer<'_>) -> Result<u64, UringError> {
        self.check(slot, t.file)?;
        if self.slot_inflight[slot] != 0 {
            return Err(UringError::Refused("slot busy"));
        }
        if t.len == 0 {
            return Err(UringError::Refused("empty transfer"));
        }
        let chunk = self.pool.chunk_size() as u64;
        let mut iovs = std::mem::take(&mut self.iovs[slot]);
        iovs.clear();
        let mut at = t.skip;
        let end = t.skip.saturating_add(t.len);
        while at < end && iovs.len() < MAX_IOVECS {
            let (base, room) = match t.memory {
                Memory::Chain(chunks) => {
                    let Some(&h) = usize::try_from(at / chunk).ok().and_then(|i| chunks.get(i))
                    else {
                        self.iovs[slot] = iovs;
                        return Err(UringError::Refused("transfer beyond the chain"));
                    };
                    if h >= self.pool.capacity() {
                        self.iovs[slot] = iovs;
                        return Err(UringError::Refused("chunk outside the pool"));
                    }
                    let intra = at % chunk;
                    // Bounds: h < capacity, so chunk h lies inside the pool mapping, and
                    // intra + room == chunk_size: the iovec stays inside the chunk.
                    let ptr = self.pool.chunk_ptr(h).wrapping_add(intra as usize);
                    (ptr.expose_provenance(), chunk - intra)
                }
                Memory::Zeroes => {
                    if t.dir == Dir::Read {
                        self.iovs[slot] = iovs;
                        return Err(UringError::Refused("reading into the zero buffer"));
                    }
                    // Every byte of the buffer is zero: start each piece at its beginning.
                    (self.zeroes.as_ptr().expose_provenance(), ZERO_BYTES as u64)
                }
            };
            let len = room.min(end - at);
            iovs.push(Iov {
                base,
                len: len as usize,
            });
            at += len;
        }
        let carried = at - t.skip;
        self.iovs[slot] = iovs;
        if let Some(m) = t.inline {
            // SAFETY: every iovec was built above: inside one chunk of the pool mapping (handle
            // checked, length bounded by the chunk), which self.pool keeps mapped, chunks the
            // engine holds and never references; or inside self.zeroes, only read (a read into
            // the zero buffer was refused above). The copy ends before we return.
            let res = unsafe { m.copy(t.dir, t.offset, &self.iovs[slot]) };
            self.done_inline.push((slot as u64, res));
            self.counted(slot);
            return Ok(carried);
        }
        let iovs = &self.iovs[slot];
        let n = u32::try_from(iovs.len()).unwrap_or(u32::MAX);
        let ptr = iovs.as_ptr().cast::<libc::iovec>();
        let file = types::Fixed(t.file);
        let entry = match t.dir {
            Dir::Read => opcode::Readv::new(file, ptr, n).offset(t.offset).build(),
            Dir::Write { dsync } => opcode::Writev::new(file, ptr, n)
                .offset(t.offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
        };
        let entry = entry
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(slot as u64);
        // SAFETY: the iovec array is self.iovs[slot], whose heap buffer is not touched again
        // until this slot has no operation in flight (slot_inflight guards transfer(), and Drop
        // waits), and Iov has iovec's layout (asserted above). Each iovec lies inside one chunk
        // of the pool mapping (handle checked against the pool's capacity, length bounded by
        // the chunk's end), which self.pool keeps mapped until the operation is reaped; the
        // engine holds those chunks (HELD by the datapath) and never forms a reference to them.
        // Or it lies inside self.zeroes, which is never written and lives as long as the ring.
        unsafe { self.push(&entry) }?;
        self.counted(slot);
        Ok(carried)
    }

    /// Queues `fdatasync` of `file` for request `slot`.
    pub(crate) fn fdatasync(&mut self, slot: usize, file: u32) -> Result<(), UringError> {
        self.check(slot, file)?;
        let entry = opcode::Fsync::new(types::Fixed(file))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(slot as u64);
        // SAFETY: an fsync points at no memory.
        unsafe { self.push(&entry) }?;
        self.counted(slot);
        Ok(())
    }

    /// Queues `fallocate(file, mode, offset, len)` for request `slot`.
    pub(crate) fn fallocate(
        &mut self,
        slot: usize,
        file: u32,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> Result<(), UringError> {
        self.check(slot, file)?;
        let entry = opcode::Fallocate::new(types::Fixed(file), len)
            .offset(offset)
            .mode(mode)
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(slot as u64);
        // SAFETY: an fallocate points at no memory.
        unsafe { self.push(&entry) }?;
        self.counted(slot);
        Ok(())
    }

    /// Queues a one-shot poll for `file` becoming readable; its completion's `user_data` is
    /// `POLL_BIT | file`.
    pub(crate) fn poll_readable(&mut self, file: u32) -> Result<(), UringError> {
        if file >= self.files {
            return Err(UringError::Refused("file not registered"));
        }
        let entry = opcode::PollAdd::new(types::Fixed(file), libc::POLLIN as u32)
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(POLL_BIT | u64::from(file));
        // SAFETY: a poll points at no memory.
        unsafe { self.push(&entry) }
    }

    /// Submits what is queued without waiting.
    pub(crate) fn submit(&mut self) -> Result<(), UringError> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => Err(UringError::Sys {
                what: "submit",
                source: e,
            }),
        }
    }

    /// Submits what is queued and sleeps until a completion arrives or `timeout` passes.
    pub(crate) fn wait(&mut self, timeout: Duration) -> Result<(), UringError> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(UringError::Sys {
                what: "wait",
                source: e,
            }),
        }
    }

    /// Moves every completion into `out` as `(user_data, result)`.
    pub(crate) fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        let start = out.len();
        out.append(&mut self.done_inline);
        out.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(ud, _) in &out[start..] {
            if let Some(n) = usize::try_from(ud)
                .ok()
                .and_then(|s| self.slot_inflight.get_mut(s))
            {
                *n = n.saturating_sub(1);
                self.io_inflight = self.io_inflight.saturating_sub(1);
            }
        }
    }

    /// Whether completions are waiting to be reaped (no system call).
    pub(crate) fn has_completions(&mut self) -> bool {
        !self.done_inline.is_empty() || !self.ring.completion().is_empty()
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // The kernel may still write pool memory or read our iovecs: wait for every I/O
        // operation to finish before the pool Arc, the iovecs and the zero buffer go.
        let deadline = Instant::now() + DROP_WAIT;
        let mut sink = Vec::new();
        while self.io_inflight > 0 && Instant::now() < deadline {
            if self.wait(Duration::from_millis(100)).is_err() {
                break;
            }
            sink.clear();
            self.reap(&mut sink);
        }
        if self.io_inflight > 0 {
            tracing::error!(
                inflight = self.io_inflight,
                "io_uring operations did not finish; leaking their memory so the kernel never \
                 writes freed memory"
            );
            std::mem::forget(Arc::clone(&self.pool));
            std::mem::forget(std::mem::take(&mut self.iovs));
            std::mem::forget(std::mem::take(&mut self.zeroes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duplex_ipc::pool::Holder;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    fn setup(chunk: usize, count: u32) -> (Uring, std::fs::File, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        file.set_len(1 << 20).expect("len");
        let pool = Pool::create(
            "t",
            chunk,
            count,
            Holder {
                role: 1,
                incarnation: 1,
            },
        )
        .expect("pool");
        let wake = duplex_ipc::doorbell::Doorbell::new().expect("eventfd");
        let uring = Uring::new(8, 4, &[wake.fd(), file.as_fd()], Arc::new(pool)).expect("ring");
        (uring, file, dir)
    }

    fn one(u: &mut Uring) -> (u64, i32) {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.is_empty() && Instant::now() < deadline {
            u.wait(Duration::from_millis(100)).expect("wait");
            u.reap(&mut out);
        }
        assert_eq!(out.len(), 1, "{out:?}");
        out[0]
    }

    #[test]
    fn restrictions_refuse_other_opcodes_and_non_fixed_files() {
        let (mut u, _f, _d) = setup(4096, 4);
        // An opcode not on the list, even with a fixed file.
        let nop = opcode::Nop::new()
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(1);
        // SAFETY: a nop points at no memory.
        unsafe { u.push(&nop) }.expect("push");
        u.submit().expect("submit");
        assert_eq!(one(&mut u), (1, -libc::EACCES));
        // An allowed opcode on a raw fd (no IOSQE_FIXED_FILE).
        let raw = opcode::Fsync::new(types::Fd(0)).build().user_data(2);
        // SAFETY: an fsync points at no memory.
        unsafe { u.push(&raw) }.expect("push");
        u.submit().expect("submit");
        assert_eq!(one(&mut u), (2, -libc::EACCES));
        // Registering anything after enable is refused.
        assert!(u.ring.submitter().register_files_update(0, &[0]).is_err());
        // The allowed path works.
        u.fdatasync(0, 1).expect("fdatasync");
        assert_eq!(one(&mut u), (0, 0));
        assert_eq!(u.io_inflight(), 0);
    }

    #[test]
    fn polls_complete_when_an_eventfd_rings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::create(
            "t",
            4096,
            1,
            Holder {
                role: 1,
                incarnation: 1,
            },
        )
        .expect("pool");
        let bells = [
            duplex_ipc::doorbell::Doorbell::new().expect("eventfd"),
            duplex_ipc::doorbell::Doorbell::new().expect("eventfd"),
        ];
        let mut u =
            Uring::new(8, 1, &[bells[0].fd(), bells[1].fd()], Arc::new(pool)).expect("ring");
        u.poll_readable(0).expect("poll");
        u.poll_readable(1).expect("poll");
        assert!(u.poll_readable(2).is_err());
        u.submit().expect("submit");
        let mut out = Vec::new();
        u.wait(Duration::from_millis(20)).expect("wait");
        u.reap(&mut out);
        assert!(out.is_empty(), "nothing rang: {out:?}");
        bells[1].ring();
        assert_eq!(one(&mut u), (POLL_BIT | 1, i32::from(libc::POLLIN)));
        assert_eq!(u.io_inflight(), 0, "polls are not I/O");
        drop(dir);
    }

    #[test]
    fn vectored_transfers_move_pool_bytes_and_respect_skip() {
        vectored_transfers(false);
    }

    #[test]
    fn inline_transfers_move_pool_bytes_and_are_reaped_like_completions() {
        vectored_transfers(true);
    }

    fn vectored_transfers(inline: bool) {
        let (mut u, mut f, _d) = setup(4096, 4);
        let mapping = inline.then(|| MappedFile::map(f.as_fd(), 1 << 20).expect("map"));
        let inline = mapping.as_ref();
        let pool = Arc::clone(&u.pool);
        let h = pool.alloc_chain(3 * 4096).expect("chain");
        let data: Vec<u8> = (0..3 * 4096).map(|i| (i * 7 % 251) as u8).collect();
        pool.write_chain(h, &data).expect("fill");
        let chunks = pool.chain(h).expect("chain");
        let t = Transfer {
            file: 1,
            dir: Dir::Write { dsync: true },
            memory: Memory::Chain(&chunks),
            skip: 100,
            len: 3 * 4096 - 100,
            offset: 8192,
            inline,
        };
        assert_eq!(u.transfer(0, t).expect("write"), 3 * 4096 - 100);
        assert!(matches!(
            u.transfer(0, t),
            Err(UringError::Refused("slot busy"))
        ));
        assert_eq!(one(&mut u), (0, 3 * 4096 - 100));
        let mut back = vec![0; 3 * 4096 - 100];
        f.seek(std::io::SeekFrom::Start(8192)).expect("seek");
        f.read_exact(&mut back).expect("read");
        assert_eq!(back, data[100..]);
        // Zeroes over part of it, then read it all back into the chain.
        let z = Transfer {
            file: 1,
            dir: Dir::Write { dsync: false },
            memory: Memory::Zeroes,
            skip: 0,
            len: 4096,
            offset: 8192,
            inline,
        };
        assert_eq!(u.transfer(1, z).expect("zeroes"), 4096);
        assert_eq!(one(&mut u), (1, 4096));
        let r = Transfer {
            file: 1,
            dir: Dir::Read,
            memory: Memory::Chain(&chunks),
            skip: 0,
            len: 2 * 4096,
            offset: 8192,
            inline,
        };
        assert_eq!(u.transfer(2, r).expect("read"), 2 * 4096);
        assert_eq!(one(&mut u), (2, 2 * 4096));
        pool.set_chain_len(h, 2 * 4096).expect("len");
        let mut out = Vec::new();
        pool.read_chain(h, &mut out).expect("read chain");
        assert_eq!(out[..4096], [0; 4096]);
        assert_eq!(out[4096..], data[4096 + 100..2 * 4096 + 100]);
        // Reading into the zero buffer, beyond the chain, or from an unknown file is refused.
        let bad = Transfer {
            dir: Dir::Read,
            memory: Memory::Zeroes,
            ..r
        };
        assert!(u.transfer(3, bad).is_err());
        let beyond = Transfer { len: 4 * 4096, ..r };
        assert!(u.transfer(3, beyond).is_err());
        assert!(u.transfer(3, Transfer { file: 9, ..r }).is_err());
        assert!(u.transfer(4, r).is_err(), "slot out of range");
        assert_eq!(u.io_inflight(), 0);
        f.write_all(b"").expect("file still usable");
    }

    #[test]
    fn long_chains_are_split_at_iov_max() {
        let (mut u, _f, _d) = setup(64, 2048);
        let pool = Arc::clone(&u.pool);
        let h = pool.alloc_chain(64 * 1500).expect("chain");
        let chunks = pool.chain(h).expect("chain");
        let t = Transfer {
            file: 1,
            dir: Dir::Write { dsync: false },
            memory: Memory::Chain(&chunks),
            skip: 10,
            len: 64 * 1500 - 10,
            offset: 0,
            inline: None,
        };
        assert_eq!(u.transfer(0, t).expect("write"), 64 * 1024 - 10);
        assert_eq!(one(&mut u), (0, 64 * 1024 - 10));
    }
}
