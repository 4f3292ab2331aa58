//! `duplexd` as a process: refuses bad configs with one line, refuses a second instance on the
//! same state directory, stops with exit 0 on SIGTERM.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use duplex_tests::{field, KillOnDrop, Log};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const DUPLEXD: &str = env!("CARGO_BIN_EXE_duplexd");

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("node.toml");
    let text = format!(
        "[node]\nname = \"a\"\nstate_dir = \"{}\"\n{extra}\n[[service]]\nname = \"mgmt\"\nbinary = \"{}\"\n",
        dir.join("state").display(),
        env!("CARGO_BIN_EXE_duplex-test-service")
    );
    std::fs::write(&path, text).expect("write config");
    path
}

fn stderr_of(args: &[&str]) -> (i32, String) {
    let out = Command::new(DUPLEXD)
        .args(args)
        .output()
        .expect("run duplexd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_are_refused_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "flavour = \"mint\"");
    let (code, err) = stderr_of(&["--config", path.to_str().expect("utf8")]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("duplexd: {}:4:", path.display())),
        "{err}"
    );
    assert!(err.contains("flavour"), "{err}");

    let (code, err) = stderr_of(&["--config", "/nonexistent/node.toml"]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("/nonexistent/node.toml") && err.contains("cannot read"),
        "{err}"
    );

    let (code, err) = stderr_of(&["--config"]);
    assert_eq!(code, 2, "usage errors exit 2: {err}");
}

#[test]
fn check_mode_validates_and_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "");
    let out = Command::new(DUPLEXD)
        .args(["--config", path.to_str().expect("utf8"), "--check"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 services)"));
}

#[test]
fn a_second_duplexd_on_the_same_state_dir_refuses_and_sigterm_stops_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "");
    let first = Command::new(DUPLEXD)
        .args(["--config", path.to_str().expect("utf8")])
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut first = KillOnDrop(first);
    // Wait until the first holds the lock (its pid is in the lock file).
    let lock = dir.path().join("state/duplexd.lock");
    let start = Instant::now();
    while std::fs::read_to_string(&lock)
        .map(|t| t.trim() != first.0.id().to_string())
        .unwrap_or(true)
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "first duplexd never took the lock"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (code, err) = stderr_of(&["--config", path.to_str().expect("utf8")]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("another duplexd (pid {})", first.0.id())),
        "{err}"
    );

    kill(Pid::from_raw(first.0.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = first.0.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "SIGTERM must stop duplexd cleanly");
}

#[test]
fn services_start_with_their_resources_restart_after_sigkill_and_crash_loops_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = env!("CARGO_BIN_EXE_duplex-test-service");
    let config = format!(
        r#"
[node]
name = "t"
state_dir = "{state}"

[supervisor]
backoff_initial_ms = 10
crash_loop_exits = 3
crash_loop_window_s = 600

[[service]]
name = "alpha"
binary = "{svc}"

[[service]]
name = "beta"
binary = "{svc}"
after = ["alpha"]

[[service]]
name = "gamma"
binary = "{svc}"
args = ["--exit-after-ready"]

[[ring]]
name = "io0"
producer = "alpha"
consumer = "beta"
capacity = 64

[[pool]]
name = "bufs"
chunk_size = 4096
chunks = 64
users = ["alpha", "beta"]

[[listener]]
name = "nvme"
address = "127.0.0.1:0"
service = "alpha"
"#,
        state = dir.path().join("state").display()
    );
    let path = dir.path().join("node.toml");
    std::fs::write(&path, config).expect("write");
    let mut duplexd = Command::new(DUPLEXD)
        .args(["--config", path.to_str().expect("utf8")])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn duplexd");
    let mut log = Log::new(duplexd.stderr.take().expect("stderr"));
    let mut duplexd = KillOnDrop(duplexd);

    // Both get their resources: the health region, a ring, 2 doorbells, the pool and the
    // listener (6); beta 5.
    log.wait_for(&["duplex-test-service alpha: generation 1 ready with 6 resources"]);
    log.wait_for(&["duplex-test-service beta: generation 1 ready with 5 resources"]);
    let ready = log.wait_for(&["service ready", "service=alpha", "generation=1"]);
    let pid = field(&ready, "pid");

    // SIGKILL alpha: it is restarted at once, as generation 2, in restart mode.
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill alpha");
    log.wait_for(&[
        "service exited unexpectedly",
        "service=alpha",
        &format!("pid={pid}"),
    ]);
    let again = log.wait_for(&["service ready", "service=alpha", "generation=2"]);
    assert_ne!(field(&again, "pid"), pid);

    // gamma exits after every start: after 3 exits it is marked failed.
    log.wait_for(&["crash-loop", "service=gamma"]);

    kill(Pid::from_raw(duplexd.0.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = duplexd.0.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    log.drain();
    // Reverse start order: beta (after alpha) stops before alpha.
    let stopped: Vec<&String> = log
        .seen
        .iter()
        .filter(|l| l.contains("service stopped"))
        .collect();
    let pos = |n: &str| {
        stopped
            .iter()
            .position(|l| l.contains(&format!("service={n}")))
    };
    assert!(
        pos("beta") < pos("alpha") && pos("alpha").is_some(),
        "{stopped:?}"
    );
}

#[test]
fn a_port_in_use_or_a_missing_binary_is_refused_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr");
    let path = write_config(
        dir.path(),
        &format!("\n[[listener]]\nname = \"nvme\"\naddress = \"{addr}\"\nservice = \"mgmt\"\n"),
    );
    let (code, err) = stderr_of(&["--config", path.to_str().expect("utf8")]);
    let last: Vec<&str> = err.lines().filter(|l| l.starts_with("duplexd:")).collect();
    assert_eq!(code, 1, "{err}");
    assert_eq!(last.len(), 1, "{err}");
    assert!(last[0].contains(&format!("cannot bind {addr}")), "{err}");

    let path = write_config(dir.path(), "");
    let text = std::fs::read_to_string(&path).expect("read").replace(
        env!("CARGO_BIN_EXE_duplex-test-service"),
        "/nonexistent/duplex-mgmt",
    );
    std::fs::write(&path, text).expect("write");
    let (code, err) = stderr_of(&["--config", path.to_str().expect("utf8")]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.lines().any(|l| l
            .starts_with("duplexd: service mgmt: binary /nonexistent/duplex-mgmt does not exist")),
        "{err}"
    );
}
