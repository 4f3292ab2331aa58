//! Seccomp tests against a real process (the probe, `src/bin/duplex-sandbox-probe.rs`):
//! the `test-service` policy lets its normal work run, forbidden calls kill it, `/proc` shows the
//! filter on every thread, the off switch is loud, and every rule of the policy is needed.
#![cfg(target_arch = "x86_64")]

use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Output, Stdio};

use duplex_sandbox::{harden_child, Hardening, Policy, SANDBOX_ENV};

const PROBE: &str = env!("CARGO_BIN_EXE_duplex-sandbox-probe");
const SIGSYS: i32 = libc::SIGSYS;

/// The probe, with a clean environment for what matters here and core dumps off (a seccomp kill
/// dumps core where `RLIMIT_CORE` allows).
fn probe(args: &[&str]) -> Command {
    let mut cmd = Command::new(PROBE);
    cmd.args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove(SANDBOX_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let hardening = Hardening::new();
    let harden = move || {
        // SAFETY: pre_exec runs this in the forked child, just before exec.
        unsafe { harden_child(&hardening) }
    };
    // SAFETY: the closure only calls harden_child, which is async-signal-safe.
    unsafe { cmd.pre_exec(harden) };
    cmd
}

fn output(cmd: &mut Command) -> Output {
    match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run the probe {PROBE}: {e}"),
    }
}

fn describe(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_killed_by_seccomp(args: &[&str]) {
    let o = output(&mut probe(args));
    assert_eq!(
        o.status.signal(),
        Some(SIGSYS),
        "{args:?}: {}",
        describe(&o)
    );
}

#[test]
fn normal_work_runs_under_the_policy() {
    let o = output(&mut probe(&["work"]));
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "OK\n");
}

#[test]
fn execve_is_killed() {
    assert_killed_by_seccomp(&["exec"]);
}

#[test]
fn open_of_a_path_is_killed() {
    assert_killed_by_seccomp(&["open"]);
}

#[test]
fn fork_is_killed() {
    assert_killed_by_seccomp(&["fork"]);
}

#[test]
fn abort_ends_with_sigabrt() {
    // Crash injection's "panic" mode aborts: it must look like an abort, not a seccomp kill.
    let o = output(&mut probe(&["abort"]));
    assert_eq!(o.status.signal(), Some(libc::SIGABRT), "{}", describe(&o));
}

#[test]
fn panic_unwinds_and_exits_101() {
    let o = output(&mut probe(&["panic"]));
    assert_eq!(o.status.code(), Some(101), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("probe panics on purpose"));
}

#[test]
fn panic_with_a_backtrace_requested_is_killed() {
    // Printing a backtrace opens /proc/self/maps and the binary: a sandboxed service must not
    // get RUST_BACKTRACE from its supervisor, or its panics turn into SIGSYS.
    let o = output(probe(&["panic"]).env("RUST_BACKTRACE", "1"));
    assert_eq!(o.status.signal(), Some(SIGSYS), "{}", describe(&o));
}

/// Spawns the probe in `block` mode and waits for its `READY`.
fn blocked_probe(env: &[(&str, &str)]) -> Child {
    let mut cmd = probe(&["block"]);
    cmd.stdin(Stdio::piped()).envs(env.iter().copied());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("spawn probe: {e}"),
    };
    let mut line = String::new();
    if let Some(out) = child.stdout.as_mut() {
        if let Err(e) = BufReader::new(out).read_line(&mut line) {
            panic!("reading probe stdout: {e}");
        }
    }
    assert_eq!(line, "READY\n", "probe did not get ready");
    child
}

fn finish(mut child: Child) -> ExitStatus {
    drop(child.stdin.take());
    match child.wait() {
        Ok(s) => s,
        Err(e) => panic!("wait: {e}"),
    }
}

/// The `status` files of every thread of `pid`.
fn thread_statuses(pid: u32) -> Vec<String> {
    let tasks = match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(d) => d,
        Err(e) => panic!("/proc/{pid}/task: {e}"),
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        match std::fs::read_to_string(t.path().join("status")) {
            Ok(s) => out.push(s),
            Err(e) => panic!("{}: {e}", t.path().display()),
        }
    }
    out
}

#[test]
fn proc_shows_seccomp_and_no_new_privs_on_every_thread() {
    let child = blocked_probe(&[]);
    let statuses = thread_statuses(child.id());
    // The probe started a thread before entering: TSYNC must have covered it.
    assert_eq!(statuses.len(), 2, "threads: {statuses:#?}");
    for s in &statuses {
        assert!(s.contains("\nSeccomp:\t2\n"), "{s}");
        assert!(s.contains("\nNoNewPrivs:\t1\n"), "{s}");
    }
    let status = finish(child);
    assert!(status.success(), "{status:?}");
}

#[test]
fn off_switch_is_loud_and_skips_seccomp() {
    let o = output(probe(&["exec"]).env(SANDBOX_ENV, "off"));
    // With the sandbox off, execve works: /bin/true runs and exits 0.
    assert!(o.status.success(), "{}", describe(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("SECCOMP SANDBOX IS OFF"), "{stderr}");

    let child = blocked_probe(&[(SANDBOX_ENV, "off")]);
    for s in thread_statuses(child.id()) {
        assert!(s.contains("\nSeccomp:\t0\n"), "{s}");
        assert!(s.contains("\nNoNewPrivs:\t1\n"), "{s}");
    }
    assert!(finish(child).success());
}

#[test]
fn any_other_switch_value_keeps_the_sandbox_on() {
    for value in ["of", "0", "false", "OFF"] {
        let o = output(probe(&["exec"]).env(SANDBOX_ENV, value));
        assert_eq!(o.status.signal(), Some(SIGSYS), "{value}: {}", describe(&o));
    }
}

#[test]
fn a_probe_stopped_and_continued_in_a_sleep_resumes_it() {
    // What an operator's `kill -STOP`/`kill -CONT`, a debugger or io_uring's task work does to
    // a service asleep: the kernel resumes the sleep through restart_syscall.
    let o = stopped_and_continued(&[]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("OK"),
        "{}",
        describe(&o)
    );
}

/// Runs the probe's `restart` mode: once it sleeps, stops it (SIGSTOP) until the kernel shows it
/// stopped, and continues it (SIGCONT); again until the stop caught its main thread inside
/// `clock_nanosleep` (not between two sleeps); then lets it finish.
fn stopped_and_continued(extra: &[&str]) -> Output {
    use nix::sys::signal::{kill, Signal};
    let mut cmd = probe(&[&["restart"][..], extra].concat());
    cmd.stdin(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot run the probe {PROBE}: {e}"),
    };
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let _ = reader.read_line(&mut line);
    if line.trim_end() == "SLEEPING" {
        let state = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()?.to_owned()))
        };
        for _ in 0..10_000 {
            if kill(pid, Signal::SIGSTOP).is_err() {
                break;
            }
            while state().is_some_and(|s| s != "T" && s != "Z") {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let in_sleep = std::fs::read_to_string(format!("/proc/{pid}/syscall"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok())
                == Some(libc::SYS_clock_nanosleep);
            let _ = kill(pid, Signal::SIGCONT);
            if in_sleep {
                break;
            }
        }
    }
    // Let it finish (stdin readable), then collect what it said.
    drop(child.stdin.take());
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut reader, &mut rest);
    let mut o = match child.wait_with_output() {
        Ok(o) => o,
        Err(e) => panic!("probe: {e}"),
    };
    let mut stdout = line.into_bytes();
    stdout.extend(rest);
    o.stdout = stdout;
    o
}

#[test]
fn every_rule_is_needed() {
    // Remove each rule in turn: some mode of the probe must then be killed by seccomp.
    let policy = match Policy::for_service("test-service") {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let mut unneeded = Vec::new();
    for rule in policy.rules() {
        // Such a rule is only used by code std compiles in with debug assertions on (the probe
        // is built with the same profile as this test).
        if !cfg!(debug_assertions) && rule.why().contains("debug assertions") {
            eprintln!("SKIPPED (built without debug assertions): {rule}");
            continue;
        }
        let at = format!("{}:{}", rule.file(), rule.line());
        let needed = ["work", "abort", "panic", "restart"].iter().any(|mode| {
            let o = if *mode == "restart" {
                stopped_and_continued(&["--omit", &at])
            } else {
                output(&mut probe(&[mode, "--omit", &at]))
            };
            assert_ne!(o.status.code(), Some(2), "probe failed: {}", describe(&o));
            o.status.signal() == Some(SIGSYS)
        });
        if !needed {
            unneeded.push(rule.to_string());
        }
    }
    assert!(
        unneeded.is_empty(),
        "rules nothing in the probe needs (exercise them or remove them):\n{}",
        unneeded.join("\n")
    );
}
