//! `duplexd` as a process: refuses bad configs with one line, refuses a second instance on the
//! same state directory, stops with exit 0 on SIGTERM.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const DUPLEXD: &str = env!("CARGO_BIN_EXE_duplexd");

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("node.toml");
    let text = format!(
        "[node]\nname = \"a\"\nstate_dir = \"{}\"\n{extra}\n[[service]]\nname = \"mgmt\"\n",
        dir.join("state").display()
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
    let mut first = Command::new(DUPLEXD)
        .args(["--config", path.to_str().expect("utf8")])
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Wait until the first holds the lock (its pid is in the lock file).
    let lock = dir.path().join("state/duplexd.lock");
    let start = Instant::now();
    while std::fs::read_to_string(&lock)
        .map(|t| t.trim() != first.id().to_string())
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
        err.contains(&format!("another duplexd (pid {})", first.id())),
        "{err}"
    );

    kill(Pid::from_raw(first.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = first.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "SIGTERM must stop duplexd cleanly");
}
