//! duplex-datapath: serves volumes (backing files or block devices through a restricted io_uring,
//! or namespaces of NVMe drives through its own user-space driver, [`nvme`]) to the fabric, over
//! the shared-memory descriptor rings and buffer pool of `duplex-ipc`.
//!
//! # What it does
//!
//! The fabric submits [`IoDesc`](duplex_ipc::desc::IoDesc)s on a submission ring per channel;
//! the datapath answers each with exactly one completion (the same descriptor, `status` set,
//! `tag` and `epoch` echoed) on the channel's completion ring, in any order:
//!
//! | opcode | what happens |
//! |---|---|
//! | `OP_READ` / `OP_WRITE` | `readv`/`writev` straight between the file and the pool chunks of the descriptor's chain (zero-copy; the payload is packed from the chain's head, chunk `i` holding bytes `[i*cs, (i+1)*cs)`). `FLAG_FUA` on a write: `RWF_DSYNC`. Memory-backed volumes (tmpfs, ramfs) are mapped and copied instead, inline (`mapped` module). A read sets the chain's used lengths and the completion's `buf_len`. The chain goes back to the fabric in the completion. |
//! | `OP_FLUSH` | `fdatasync` of the volume, or of every volume for `volume == u32::MAX` |
//! | `OP_WRITE_ZEROES` | `fallocate(FALLOC_FL_ZERO_RANGE \| FALLOC_FL_KEEP_SIZE)`; `FLAG_FUA`: then `fdatasync` |
//! | `OP_DEALLOCATE` | `fallocate(FALLOC_FL_PUNCH_HOLE \| FALLOC_FL_KEEP_SIZE)` (later reads return zeroes); 0 blocks is a no-op; `FLAG_FUA`: then `fdatasync` |
//!
//! Where the backing store does not support the `fallocate` mode (`EOPNOTSUPP`: tmpfs for
//! `ZERO_RANGE`, block devices without write-zeroes-unmap for `PUNCH_HOLE`, ...), the range is
//! written with zeroes from a page-aligned zero buffer instead, and that volume skips the
//! `fallocate` from then on. Block devices get no `BLKZEROOUT`/`BLKDISCARD` ioctl (the block
//! device `fallocate` modes already issue those where the device supports them).
//!
//! Validation, before any I/O, in this order (the first check that fails decides): a read, a
//! write or an unknown opcode needs a chain lent through exactly that descriptor
//! (`Pool::take_chain(buf, ring, index)`), else `STATUS_INVALID_FIELD` without a buffer; an
//! unknown opcode, an unknown volume, zero blocks for anything but a deallocate:
//! `STATUS_INVALID_FIELD`; blocks beyond the volume or an overflowing `lba + blocks`:
//! `STATUS_LBA_OUT_OF_RANGE`; a chain shorter than `blocks × block_size`:
//! `STATUS_INVALID_FIELD`. Refusals are logged, rate-limited. A failed I/O: `STATUS_READ_ERROR`
//! (reads) or `STATUS_WRITE_FAULT` (everything else) for media-like errnos, `STATUS_INTERNAL` for
//! errnos that point at the datapath itself (`EINVAL`, `EBADF`, `EFAULT`, `EACCES`, ...); logged,
//! rate-limited, with the errno. A short transfer continues where it stopped (one that makes no
//! progress fails); success is reported only for the whole range. A descriptor's chain is
//! returned with its completion whenever it was validly lent (also on errors; a command without
//! data ignores a `buf` that is not a lent chain, since a zeroed descriptor names chunk 0); a
//! completion without a chain has `buf = NIL`. The submission's `buf_len` is not trusted: the
//! transfer length is `blocks × block_size`; the payload of a write is read packed from the
//! chain's head (the chunks' used lengths are not consulted). Malformed descriptors are error
//! completions, never panics (fuzzed against a model of these rules:
//! `tests/fuzz_descriptors.rs`).
//!
//! Epochs are only echoed: a restarted fabric discards completions of its predecessors itself
//! (`docs/IPC.md`).
//!
//! # Threads and waiting
//!
//! One serving thread ([`Engine::run`]) owns one io_uring, every request and every ring
//! endpoint. The io_uring's fixed files are its wake eventfd, each channel's doorbells (the
//! submission ring's *data* eventfd, the completion ring's *space* eventfd) and the volumes.
//! When there is nothing to do it spins for [`EngineConfig::spin`] (50 µs) over its rings and
//! the io_uring completion queue, then announces its waits (`Consumer::arm_wait` on every
//! submission ring it can consume from, `Producer::arm_wait` on every full completion ring: the
//! peer rings a doorbell only for a side that announced it), queues a one-shot `POLL_ADD` on
//! each of those doorbells and on the wake eventfd, and sleeps in a single `io_uring_enter` that
//! ends on an I/O completion, a doorbell, the wake eventfd ([`Stopper::stop`]), or after
//! [`EngineConfig::max_sleep`] (the heartbeat interval / 4 in the service). An idle datapath
//! uses no measurable CPU (`tests/idle.rs`: about 0.2 ms per second, the heartbeat wakeups).
//!
//! Backpressure: at most [`EngineConfig::queue_depth`] (128) requests in flight; a channel whose
//! completion ring is full is not consumed from until its completions are published (none is
//! ever dropped). In the service, lifecycle messages are received by a second thread that
//! blocks on the lifecycle channel and stops the engine on `Shutdown` ([`service`]).
//!
//! # Confinement
//!
//! * The io_uring is created disabled, gets its fixed files, is restricted to `READV`, `WRITEV`,
//!   `FSYNC`, `FALLOCATE` and `POLL_ADD` with `IOSQE_FIXED_FILE` required and no register
//!   operation, and only then enabled (`uring` module docs). seccomp cannot see io_uring
//!   operations; the restrictions are what confines them.
//! * Then the process enters `sandbox/policies/datapath.policy`: besides `common`, only
//!   `io_uring_enter`, `sched_yield` (the poll), `rt_sigreturn` (the `SIGBUS` handler of
//!   memory-backed volumes, `mapped` module) and `sendmsg`/`recvmsg` (lifecycle channel). No `io_uring_setup` or
//!   `io_uring_register`, no `open*`, no `poll`, no `fdatasync`/`fallocate` syscalls (they go
//!   through the ring).
//! * `unsafe` lives only in the `uring` module (the DMA-like boundary where the kernel writes
//!   pool memory), the `mapped` module (memory-backed volumes mapped, copied through raw
//!   pointers, and the `SIGBUS` handler that survives a file shrinking under its mapping) and
//!   the NVMe driver's DMA and VFIO modules (`nvme::dma`, `nvme::transport`,
//!   `nvme::vfio_kernel`: memory a device reads and writes); no Rust reference ever points into
//!   pool memory, a volume's mapping or DMA memory.
//! * Volumes on NVMe drives ([`drives`]) are brought up before the sandbox (vfio-user handshake
//!   on the stream duplexd connected, or BAR0 mapped and DMA mapped through the VFIO fds duplexd
//!   opened); afterwards a drive needs only `sendmsg`/`recvmsg` (vfio-user doorbells) or nothing
//!   at all (BAR0 stores), and `clock_nanosleep` (common) while a controller resets.
//!
//! # O_DIRECT
//!
//! duplexd opens a volume with `O_DIRECT` when the topology says `direct`, and falls back to
//! buffered I/O when the filesystem refuses `O_DIRECT` (tmpfs, for one) — it decides at open;
//! [`Volume::new`] checks the fd matches what the topology says. With `O_DIRECT`, buffers,
//! offsets and lengths must be aligned to the logical block size: offsets and lengths are whole
//! blocks, pool chunks are page aligned, and [`Engine::new`] refuses a pool whose chunk size is
//! not a multiple of a direct volume's block size. Should a transfer come back short at an
//! unaligned point, the kernel refuses the continuation (`EINVAL`) and the request fails with
//! `STATUS_INTERNAL`. Buffered volumes are durable only through flush/FUA, like a drive with a
//! volatile write cache.
//!
//! # Not done
//!
//! RAID 0, 1 and 10 exist ([`bdev`]); rebuild and resync do not: a member that failed, or that
//! the metadata service found stale, stays out for good and its pool serves degraded. Parity
//! RAID (5, 6), the write-intent bitmap and scrubbing; taking a RAID device out of a running
//! engine (there is no command for it, so a pool the datapath serves cannot be destroyed) and
//! drives added after start (the raw drives are the topology's); reconnecting a drive that came
//! back after a pull; several I/O queues per drive and interrupts (completions are polled);
//! per-block checksums (`FLAG_CHECKSUM` is ignored); `IORING_SETUP_SQPOLL` and registered
//! buffers; a size check of block devices (needs an ioctl; duplexd sizes the volume at open).
//! Pools and volume maps published at run time live in the engine only: a restarted datapath
//! serves none of them until the metadata service publishes them again.

pub mod bdev;
mod channel;
pub mod control;
pub mod diskbeat;
pub mod drives;
mod engine;
pub mod fence;
pub mod integrity;
pub mod map;
mod mapped;
pub mod nvme;
pub mod parity;
mod request;
pub mod service;
mod uring;
mod volume;

pub use channel::Channel;
pub use engine::{Engine, EngineConfig, EngineError, EngineStats, Stopper};
pub use request::FLUSH_ALL;
pub use uring::UringError;
pub use volume::{Volume, VolumeError};
