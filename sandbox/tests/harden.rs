//! `harden_child` tests: a child spawned through it is checked from outside through `/proc`.
//! Parts that need root (bounding set, kept capabilities, mount namespaces) check the refusal
//! instead when not run as root, and say so.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use duplex_sandbox::{
    harden_child, move_fds_into_place, reserve_low_fds, Capability, Hardening, SandboxError,
    MAX_KEPT_FDS,
};

const PROBE: &str = env!("CARGO_BIN_EXE_duplex-sandbox-probe");

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn skip(what: &str) {
    eprintln!("SKIPPED (not root): {what}");
}

/// Spawns the probe in `idle` mode under `h` and waits until it has exec'd and said `READY`.
fn spawn_idle(h: Hardening) -> std::io::Result<Child> {
    // Keep std's exec-error pipe out of the slots the kept fds move to.
    reserve_low_fds(MAX_KEPT_FDS)?;
    let mut cmd = Command::new(PROBE);
    cmd.arg("idle")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let harden = move || {
        // SAFETY: pre_exec runs this in the forked child, just before exec.
        unsafe { harden_child(&h) }
    };
    // SAFETY: the closure only calls harden_child, which is async-signal-safe.
    unsafe { cmd.pre_exec(harden) };
    let mut child = cmd.spawn()?;
    let mut line = String::new();
    if let Some(out) = child.stdout.as_mut() {
        BufReader::new(out).read_line(&mut line)?;
    }
    assert_eq!(line, "READY\n");
    Ok(child)
}

fn finish(mut child: Child) {
    drop(child.stdin.take());
    match child.wait() {
        Ok(s) => assert!(s.success(), "{s:?}"),
        Err(e) => panic!("wait: {e}"),
    }
}

fn must<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

fn proc_file(pid: u32, name: &str) -> String {
    must(
        std::fs::read_to_string(format!("/proc/{pid}/{name}")),
        &format!("/proc/{pid}/{name}"),
    )
}

fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

fn limit(limits: &str, name: &str) -> (String, String) {
    let line = limits
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in {limits}"));
    let mut words = line[name.len()..].split_whitespace();
    let soft = words.next().unwrap_or_default().to_owned();
    let hard = words.next().unwrap_or_default().to_owned();
    (soft, hard)
}

fn memfd(name: &std::ffi::CStr) -> OwnedFd {
    must(
        nix::sys::memfd::memfd_create(name, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC),
        "memfd_create",
    )
}

#[test]
fn hardened_child_has_nnp_no_caps_no_core_and_exactly_the_kept_fds() {
    let a = memfd(c"kept-a");
    let b = must(
        nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC),
        "eventfd",
    );
    // An fd without CLOEXEC that is not handed over must not leak into the child either.
    let leaky = must(a.try_clone(), "dup");
    must(
        nix::fcntl::fcntl(
            leaky.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        ),
        "F_SETFD",
    );

    let h = must(
        Hardening::new().keep_fds(&[b.as_raw_fd(), a.as_raw_fd()]),
        "keep_fds",
    )
    .max_open_files(64)
    .max_core_bytes(0);
    let child = must(spawn_idle(h), "spawn");
    let pid = child.id();

    let status = proc_file(pid, "status");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status_field(&status, set), "0000000000000000", "{set}");
    }
    if is_root() {
        assert_eq!(status_field(&status, "CapBnd"), "0000000000000000");
    } else {
        skip("bounding set drop (needs CAP_SETPCAP)");
    }

    let limits = proc_file(pid, "limits");
    assert_eq!(
        limit(&limits, "Max core file size"),
        ("0".into(), "0".into())
    );
    assert_eq!(limit(&limits, "Max open files"), ("64".into(), "64".into()));

    let fds: BTreeSet<RawFd> = must(std::fs::read_dir(format!("/proc/{pid}/fd")), "fd dir")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    assert_eq!(fds, BTreeSet::from([0, 1, 2, 3, 4]));
    let link = |fd: RawFd| {
        must(
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}")),
            "readlink",
        )
        .to_string_lossy()
        .into_owned()
    };
    assert_eq!(link(3), "anon_inode:[eventfd]");
    assert!(link(4).starts_with("/memfd:kept-a"), "{}", link(4));
    // The kept fds survive exec, so they cannot be close-on-exec any more.
    let fdinfo = proc_file(pid, "fdinfo/3");
    let flags = status_field(&fdinfo, "flags");
    let flags = must(u32::from_str_radix(&flags, 8), "flags");
    assert_eq!(flags & libc::O_CLOEXEC as u32, 0, "{fdinfo}");
    finish(child);
}

#[test]
fn kept_capability_survives_exec() {
    let h = Hardening::new().keep_capabilities(&[Capability::NET_BIND_SERVICE]);
    if !is_root() {
        // Without the capability, keeping it is refused rather than silently dropped.
        let err = spawn_idle(h).err();
        assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::EPERM));
        skip("keeping a capability (the supervisor holds none)");
        return;
    }
    let child = must(spawn_idle(h), "spawn");
    let status = proc_file(child.id(), "status");
    let want = format!("{:016x}", 1u64 << Capability::NET_BIND_SERVICE.raw());
    for set in ["CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(status_field(&status, set), want, "{set}");
    }
    finish(child);
}

#[test]
fn private_mounts_give_a_mount_namespace_of_its_own() {
    let h = Hardening::new().private_mounts(true);
    if !is_root() {
        let err = spawn_idle(h).err();
        assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::EPERM));
        skip("mount namespace (needs CAP_SYS_ADMIN)");
        return;
    }
    let child = must(spawn_idle(h), "spawn");
    let pid = child.id();
    let ns = |p: &str| must(std::fs::read_link(format!("/proc/{p}/ns/mnt")), "ns link");
    assert_ne!(ns(&pid.to_string()), ns("self"));
    let mountinfo = proc_file(pid, "mountinfo");
    assert!(
        !mountinfo.contains(" shared:"),
        "a mount still propagates:\n{mountinfo}"
    );
    finish(child);
}

#[test]
fn exec_failure_is_still_reported_by_spawn() {
    must(reserve_low_fds(MAX_KEPT_FDS), "reserve");
    let a = memfd(c"kept");
    let h = must(Hardening::new().keep_fds(&[a.as_raw_fd()]), "keep_fds");
    let mut cmd = Command::new("/nonexistent/duplex-service");
    let harden = move || {
        // SAFETY: pre_exec runs this in the forked child, just before exec.
        unsafe { harden_child(&h) }
    };
    // SAFETY: the closure only calls harden_child, which is async-signal-safe.
    unsafe { cmd.pre_exec(harden) };
    let err = cmd.spawn().err();
    assert_eq!(
        err.map(|e| e.kind()),
        Some(std::io::ErrorKind::NotFound),
        "exec error lost"
    );
}

#[test]
fn a_pipe_in_a_target_slot_is_refused() {
    // In a forked child: put a pipe on fd 3 that is not handed over (as std's exec-error pipe
    // could be), then ask to hand over another fd. It must fail with EBUSY, not replace fd 3.
    let a = memfd(c"kept");
    let src = a.as_raw_fd().max(10) + 1;
    // SAFETY: the child only makes async-signal-safe calls and leaves with _exit; the parent
    // only waits for it.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut p = [0; 2];
        // SAFETY: pipe writes two fds to the array given.
        let ok = unsafe { libc::pipe(p.as_mut_ptr()) } == 0
            // SAFETY: fd juggling in the forked child only.
            && unsafe { libc::dup2(p[1], 3) } == 3
            // SAFETY: fd juggling in the forked child only.
            && unsafe { libc::dup2(a.as_raw_fd(), src) } == src;
        // SAFETY: the forked child is about to _exit; nothing else uses its fds.
        let r = unsafe { move_fds_into_place(&[src]) };
        let code = match (ok, r.map_err(|e| e.raw_os_error())) {
            (true, Err(Some(libc::EBUSY))) => 0,
            (false, _) => 3,
            _ => 4,
        };
        // SAFETY: ends the forked child at once.
        unsafe { libc::_exit(code) };
    }
    assert!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: waits for the child forked above, writing its status to a valid int.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "3: setup failed, 4: not refused"
    );
}

#[test]
fn bad_keep_lists_are_refused_before_the_fork() {
    assert!(matches!(
        Hardening::new().keep_fds(&[5, 2]),
        Err(SandboxError::BadFd(2))
    ));
    assert!(matches!(
        Hardening::new().keep_fds(&[3; MAX_KEPT_FDS + 1]),
        Err(SandboxError::TooManyFds(_))
    ));
    assert!(Hardening::new().keep_fds(&[3; MAX_KEPT_FDS]).is_ok());
}
