//! Helper process for the sandbox tests (`tests/*.rs`). Not a user tool.
//!
//! `duplex-sandbox-probe MODE [--omit FILE:LINE]`:
//!
//! * `work`: does what the `test-service` policy is written for, under it: attaches a sealed
//!   memfd region and maps it, rings and drains an eventfd doorbell, passes a message with an fd
//!   over `SOCK_SEQPACKET` to a worker thread it spawns, sleeps, reads the clock, exits. Prints
//!   `OK`. The fds are made before entering the sandbox, as the supervisor would hand them over.
//! * `abort`: enters, then `abort()`s (the crash-injection "panic" mode of a service).
//! * `panic`: enters, then panics (unwinds, exits 101).
//! * `block`: starts a thread, enters, prints `READY`, then reads stdin to its end and exits, so
//!   that a test can look at `/proc/PID/status` of every thread meanwhile.
//! * `exec`, `open`, `fork`: enters, then tries `execve("/bin/true")`, `openat` of a path, or
//!   `fork()`; each must kill it.
//! * `idle`: no sandbox; prints `READY` and reads stdin to its end (the child of the
//!   `harden_child` tests).
//! * `restart`: enters, prints `SLEEPING`, then sleeps 20 ms at a time until stdin is readable
//!   (the test stops and continues it inside one of those sleeps, which the kernel resumes with
//!   `restart_syscall`); prints `OK`.
//!
//! `--omit FILE:LINE` enters the `test-service` policy without that rule (the "no rule is
//! redundant" test). Exit status 2 with a message on stderr: the probe itself failed.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

const SERVICE: &str = "test-service";
const REGION_LEN: usize = 4 * 4096;

type Res<T> = Result<T, String>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("duplex-sandbox-probe: {e}");
        std::process::exit(2);
    }
}

fn run(args: &[String]) -> Res<()> {
    let omit = match args.get(1..) {
        Some([flag, at]) if flag == "--omit" => {
            let (file, line) = at
                .rsplit_once(':')
                .and_then(|(f, l)| Some((f.to_owned(), l.parse::<usize>().ok()?)))
                .ok_or_else(|| format!("bad --omit {at}: want FILE:LINE"))?;
            Some((file, line))
        }
        Some([]) => None,
        _ => return Err(format!("bad arguments {args:?}")),
    };
    let enter = || -> Res<()> {
        match &omit {
            None => duplex_sandbox::enter(SERVICE).map_err(|e| format!("enter: {e}")),
            Some((file, line)) => duplex_sandbox::Policy::for_service(SERVICE)
                .and_then(|p| p.without(file, *line))
                .and_then(|p| p.compile())
                .and_then(|c| c.install())
                .map_err(|e| format!("enter without {file}:{line}: {e}")),
        }
    };
    match args.first().map(String::as_str) {
        Some("work") => work(enter),
        Some("abort") => {
            enter()?;
            std::process::abort()
        }
        Some("panic") => {
            enter()?;
            panic!("probe panics on purpose")
        }
        Some("block") => {
            // A thread that exists before the filter goes on: TSYNC must cover it too.
            let _parked = std::thread::spawn(std::thread::park);
            enter()?;
            wait_for_stdin_eof()
        }
        Some("exec") => {
            enter()?;
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            // SAFETY: argv is a null-terminated array of NUL-terminated strings that outlive the
            // call.
            unsafe { libc::execv(c"/bin/true".as_ptr(), argv.as_ptr()) };
            Err(format!(
                "execv returned: {}",
                std::io::Error::last_os_error()
            ))
        }
        Some("open") => {
            enter()?;
            let r = std::fs::File::open("/proc/self/status");
            Err(format!("open returned: {r:?}"))
        }
        Some("fork") => {
            enter()?;
            // SAFETY: the child, if there were one, would only call _exit.
            match unsafe { libc::fork() } {
                0 => {
                    // SAFETY: _exit is async-signal-safe and ends the child at once.
                    unsafe { libc::_exit(0) }
                }
                pid => Err(format!("fork returned {pid}")),
            }
        }
        Some("idle") => wait_for_stdin_eof(),
        Some("restart") => {
            enter()?;
            let mut out = std::io::stdout();
            writeln!(out, "SLEEPING").map_err(|e| format!("stdout: {e}"))?;
            out.flush().map_err(|e| format!("stdout: {e}"))?;
            loop {
                std::thread::sleep(Duration::from_millis(20));
                let mut pfd = libc::pollfd {
                    fd: 0,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll reads and writes one pollfd through the valid pointer given.
                if unsafe { libc::poll(&mut pfd, 1, 0) } > 0 {
                    break;
                }
            }
            println!("OK");
            Ok(())
        }
        other => Err(format!("unknown mode {other:?}")),
    }
}

fn wait_for_stdin_eof() -> Res<()> {
    let mut out = std::io::stdout();
    writeln!(out, "READY").map_err(|e| format!("stdout: {e}"))?;
    out.flush().map_err(|e| format!("stdout: {e}"))?;
    let mut buf = [0u8; 64];
    let mut stdin = std::io::stdin();
    while stdin.read(&mut buf).map_err(|e| format!("stdin: {e}"))? > 0 {}
    Ok(())
}

fn sys(what: &str) -> impl FnOnce(nix::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn work(enter: impl FnOnce() -> Res<()>) -> Res<()> {
    // What the supervisor would hand over: a sealed region, a doorbell, a control socket.
    let region = memfd_create(
        c"probe-region",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(sys("memfd_create"))?;
    nix::unistd::ftruncate(&region, REGION_LEN as i64).map_err(sys("ftruncate"))?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    nix::fcntl::fcntl(
        region.as_raw_fd(),
        nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::from_bits_truncate(seals)),
    )
    .map_err(sys("F_ADD_SEALS"))?;
    let bell = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(sys("eventfd"))?;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(sys("socketpair"))?;

    enter()?;

    // Attach the region as duplex-ipc does: check size and seals, map it shared, use it.
    let st = nix::sys::stat::fstat(region.as_raw_fd()).map_err(sys("fstat"))?;
    if st.st_size != REGION_LEN as i64 {
        return Err(format!("region size {}", st.st_size));
    }
    let got = nix::fcntl::fcntl(region.as_raw_fd(), nix::fcntl::FcntlArg::F_GET_SEALS)
        .map_err(sys("F_GET_SEALS"))?;
    if got & seals != seals {
        return Err(format!("seals {got:#x}"));
    }
    map_and_check(&region)?;
    exercise_heap()?;

    // A worker thread receives a message and a doorbell fd over the socket, and rings it.
    let worker = std::thread::Builder::new()
        .name("probe-worker".into())
        .spawn(move || receive_and_ring(theirs))
        .map_err(|e| format!("spawn: {e}"))?;
    let payload = b"hello over seqpacket";
    let fds = [bell.as_fd().as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(payload)];
    sendmsg::<()>(ours.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(sys("sendmsg"))?;
    wait_readable(bell.as_fd().as_raw_fd())?;
    let rung = bell.read().map_err(sys("eventfd read"))?;
    if rung != 1 {
        return Err(format!("doorbell counted {rung}"));
    }
    let echoed = worker.join().map_err(|_| "worker panicked".to_owned())??;
    if echoed != payload {
        return Err(format!("worker got {echoed:?}"));
    }

    // Time: sleep, park with a timeout (a futex wait), and read the clock through the syscall
    // as well as the vDSO (which falls back to the syscall on clock sources it cannot read).
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(1));
    std::thread::park_timeout(Duration::from_millis(1));
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid pointer given.
    let rc = unsafe { libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 || start.elapsed() < Duration::from_millis(1) {
        return Err(format!("clock: rc {rc}, elapsed {:?}", start.elapsed()));
    }

    println!("OK");
    Ok(())
}

/// Allocates as services do: many mid-sized blocks (the heap grows with `brk`) and one large
/// block that grows (glibc `realloc`s an mmap-backed block with `mremap`).
fn exercise_heap() -> Res<()> {
    let blocks: Vec<Vec<u8>> = (0..16).map(|i| vec![i as u8; 64 * 1024]).collect();
    let mut big = vec![1u8; 256 * 1024];
    big.resize(4 * 1024 * 1024, 2);
    let sum = std::hint::black_box(&blocks)
        .iter()
        .map(|b| usize::from(b[b.len() - 1]))
        .sum::<usize>()
        + usize::from(std::hint::black_box(&big)[big.len() - 1]);
    if sum != (0..16).sum::<usize>() + 2 {
        return Err(format!("heap sum {sum}"));
    }
    Ok(())
}

fn map_and_check(region: &OwnedFd) -> Res<()> {
    let len = std::num::NonZeroUsize::new(REGION_LEN).ok_or("zero length")?;
    // SAFETY: maps a memfd this process owns; nothing else maps it, and the mapping is only
    // touched through raw pointers below and unmapped before returning.
    let base = unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_SHARED,
            region,
            0,
        )
    }
    .map_err(sys("mmap"))?;
    let p = base.as_ptr().cast::<u8>();
    for i in 0..REGION_LEN {
        // SAFETY: i < REGION_LEN, the mapping's length.
        let byte = unsafe { p.add(i) };
        // SAFETY: `byte` points into the live mapping; no reference to it exists.
        unsafe { byte.write_volatile(i as u8) };
    }
    // SAFETY: REGION_LEN - 1 is inside the mapping.
    let last = unsafe { p.add(REGION_LEN - 1) };
    // SAFETY: `last` points into the live mapping, written above.
    let last = unsafe { last.read_volatile() };
    // SAFETY: unmaps the mapping made above; no reference into it exists.
    unsafe { nix::sys::mman::munmap(base, REGION_LEN) }.map_err(sys("munmap"))?;
    if last != ((REGION_LEN - 1) as u8) {
        return Err(format!("region read back {last}"));
    }
    Ok(())
}

fn wait_readable(fd: RawFd) -> Res<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: poll reads and writes one pollfd through the valid pointer given.
        let n = unsafe { libc::poll(&mut pfd, 1, -1) };
        if n > 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("poll: {err}"));
        }
    }
}

fn receive_and_ring(sock: OwnedFd) -> Res<Vec<u8>> {
    wait_readable(sock.as_raw_fd())?;
    let mut buf = [0u8; 256];
    let mut cmsg_space = nix::cmsg_space!([RawFd; 1]);
    let (len, fd) = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(sys("recvmsg"))?;
        let mut fd = None;
        for c in msg.cmsgs().map_err(sys("cmsgs"))? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                fd = fds.first().copied();
            }
        }
        (msg.bytes, fd)
    };
    let fd = fd.ok_or("no fd received")?;
    // SAFETY: SCM_RIGHTS just installed this fd in our table; nothing else owns it.
    let bell = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::unistd::write(&bell, &1u64.to_ne_bytes()).map_err(sys("eventfd write"))?;
    drop(bell);
    Ok(buf.get(..len).unwrap_or_default().to_vec())
}
