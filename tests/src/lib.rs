//! Harness for duplex's system tests: finds the built binaries, runs `duplexd` on a config in a
//! temporary state directory, follows its log, and drives `duplexctl`.
//!
//! The binaries come from other packages of the workspace, so they are looked up next to the
//! test executable (`target/<profile>/`). `cargo test --workspace` / `cargo nextest run
//! --workspace` build them (every package with integration tests gets its binaries built); a
//! missing one is a clear panic naming the command to run.
#![allow(clippy::unwrap_used)] // test harness: a failed expectation is a test failure

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod guest;
pub mod netns;
pub mod nvme_host;
pub mod pair;
pub mod pool;
pub mod resv;
pub mod tls;

/// How long any single wait in a system test may take before it fails with the log so far.
/// Generous: it bounds a hang, it does not measure speed.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// The path of a workspace binary (`duplexd`, `duplexctl`, `duplex-mgmt`,
/// `duplex-test-service`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace` (or the whole suite) first",
        path.display()
    );
    path
}

/// A TCP port on 127.0.0.1 for a node's listener, reserved for the rest of this test process.
///
/// Ports come from below the kernel's ephemeral range, so no outgoing connection of another test
/// (a host, a guest's forwarded port, a drive client) can be given it between now and the
/// moment `duplexd` binds it; and each is claimed with a lock file held until this process
/// exits, so two tests running at once never pick the same one. (A port merely free a moment
/// ago was taken by a concurrent test's connection once: `Address already in use`.)
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    static HELD: Mutex<Vec<nix::fcntl::Flock<std::fs::File>>> = Mutex::new(Vec::new());
    static CALLS: AtomicU32 = AtomicU32::new(0);

    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u32>().ok())
        })
        .unwrap_or(32768);
    let low = 10_000u32;
    let high = ephemeral_low.max(low + 1_000);
    let span = high - low;
    let dir = std::env::temp_dir().join("duplex-test-ports");
    std::fs::create_dir_all(&dir).expect("a directory for port claims");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seed = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(nanos)
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(104_729));
    for i in 0..span {
        let port = low + (seed.wrapping_add(i) % span);
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        let Ok(claim) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
        else {
            continue;
        };
        let Ok(claim) = nix::fcntl::Flock::lock(claim, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        HELD.lock().unwrap_or_else(|e| e.into_inner()).push(claim);
        return port;
    }
    panic!("no free TCP port below the ephemeral range {low}..{high}");
}

/// Runs `duplex-bench` against subsystem `subnqn` on 127.0.0.1:`port` as host `hostnqn`, with
/// `args`: (exit code, stdout, stderr).
pub fn duplex_bench(
    port: u16,
    subnqn: &str,
    hostnqn: &str,
    args: &[&str],
) -> (i32, String, String) {
    let target = format!("127.0.0.1:{port}");
    let out = Command::new(bin("duplex-bench"))
        .args(["--target", &target, "--nqn", subnqn, "--hostnqn", hostnqn])
        .args(args)
        .output()
        .expect("duplex-bench runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The config of a storage node for system tests: datapath and fabric, an NVMe/TCP listener on
/// 127.0.0.1:`port`, one volume `vol0` (its `[[volume]]` keys after the name in `volume`), and
/// subsystem `subnqn` exporting it as namespace 1 to `hostnqn`. `{state}` is left for
/// [`Node::start`].
pub fn storage_config(name: &str, port: u16, volume: &str, subnqn: &str, hostnqn: &str) -> String {
    format!(
        r#"
[node]
name = "{name}"
state_dir = "{{state}}"

[[service]]
name = "datapath"
kind = "datapath"

[[service]]
name = "fabric"
after = ["datapath"]

[[listener]]
name = "nvme"
address = "127.0.0.1:{port}"
service = "fabric"

[[volume]]
name = "vol0"
{volume}

[[subsystem]]
nqn = "{subnqn}"
hosts = ["{hostnqn}"]
namespaces = [{{ nsid = 1, volume = "vol0" }}]
"#
    )
}

/// A volume file in `/dev/shm` named for this test process and `tag`, removed first and again
/// when dropped.
#[derive(Debug)]
pub struct ShmVolume(pub String);

impl ShmVolume {
    /// `/dev/shm/duplex-TAG-PID.img`, not there yet.
    pub fn new(tag: &str) -> Self {
        let path = format!("/dev/shm/duplex-{tag}-{}.img", std::process::id());
        let _ = std::fs::remove_file(&path);
        Self(path)
    }
}

impl Drop for ShmVolume {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A child killed (and reaped) when dropped, so a failing test leaves no process behind.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Waits for the child to end by itself; its status and what it wrote to the pipes it was
    /// given (stderr read on a thread, so neither pipe can fill up and stall it).
    pub fn wait_output(&mut self) -> std::process::Output {
        use std::io::Read;
        let mut err_pipe = self.0.stderr.take();
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(e) = err_pipe.as_mut() {
                let _ = e.read_to_end(&mut v);
            }
            v
        });
        let mut stdout = Vec::new();
        if let Some(o) = self.0.stdout.as_mut() {
            let _ = o.read_to_end(&mut stdout);
        }
        let status = self.0.wait().expect("the child ends");
        std::process::Output {
            status,
            stdout,
            stderr: err.join().unwrap_or_default(),
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running duplexd with its log.
#[derive(Debug)]
pub struct Node {
    /// The process.
    pub duplexd: KillOnDrop,
    /// Its stderr, line by line.
    pub log: Log,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The network namespace duplexd runs in (`None`: the test's own).
    pub netns: Option<String>,
    _dir: tempfile::TempDir,
}

/// `duplexd --config PATH`, inside `netns` when given.
fn duplexd_command(netns: Option<&str>, config: &Path) -> Command {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin("duplexd"));
            c
        }
        None => Command::new(bin("duplexd")),
    };
    c.arg("--config").arg(config);
    c
}

impl Node {
    /// Writes `config` (with `{state}` replaced by the state directory and `{svc}`, `{mgmt}` by
    /// the test-service and mgmt binaries) and starts duplexd on it.
    pub fn start(config: &str) -> Self {
        Self::start_in(None, config)
    }

    /// [`Node::start`] inside network namespace `netns` (its listeners bind there).
    pub fn start_in(netns: Option<&str>, config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let text = config
            .replace("{state}", &state_dir.display().to_string())
            .replace("{svc}", &bin("duplex-test-service").display().to_string())
            .replace("{mgmt}", &bin("duplex-mgmt").display().to_string());
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        let mut child = duplexd_command(netns, &path)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Log::new(child.stderr.take().unwrap());
        let mut node = Self {
            duplexd: KillOnDrop(child),
            log,
            state_dir,
            netns: netns.map(str::to_owned),
            _dir: dir,
        };
        // Resources (the management socket included) exist before the first spawn.
        node.log.wait_for(&["service spawned"]);
        node
    }

    /// Runs `duplexctl` against this node; returns (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("duplexctl"))
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `duplexctl --json service list`, as a list of JSON objects.
    pub fn services(&self) -> Vec<serde_json::Value> {
        let (code, out, err) = self.ctl(&["--json", "service", "list"]);
        assert_eq!(code, 0, "duplexctl service list failed: {err}");
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("duplexctl --json output is not JSON ({e}): {out}"));
        match v {
            serde_json::Value::Array(a) => a,
            serde_json::Value::Object(mut o) => match o.remove("services") {
                Some(serde_json::Value::Array(a)) => a,
                _ => panic!("no services in {out}"),
            },
            _ => panic!("unexpected JSON {out}"),
        }
    }

    /// One service's row.
    pub fn service(&self, name: &str) -> serde_json::Value {
        self.services()
            .into_iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no service {name} in the list"))
    }

    /// Waits until `name` runs with a generation above `above`; returns its row.
    pub fn wait_running(&mut self, name: &str, above: u64) -> serde_json::Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let row = self.service(name);
            if row["state"] == "running" && row["generation"].as_u64().unwrap_or(0) > above {
                return row;
            }
            if Instant::now() > deadline {
                self.log.pump();
                panic!(
                    "{name} not running above generation {above}: {row}\nlog:\n{}",
                    self.log.tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The pid of duplexd.
    pub fn pid(&self) -> u32 {
        self.duplexd.0.id()
    }

    /// Starts duplexd again on the same config and state directory (the previous one must
    /// have ended: [`Node::stop`] or [`Node::kill_all`]).
    pub fn relaunch(&mut self) {
        self.relaunch_replacing("", "");
    }

    /// Waits until this launch's fabric has applied an export table adding `subnqn` (a pool's
    /// subsystem is served once that line is logged; an import alone does not say the fabric
    /// has it yet, and a host connecting in between is refused).
    pub fn wait_exported(&mut self, subnqn: &str) -> String {
        self.log
            .wait_for(&["export table applied", &format!("\"{subnqn}\"")])
    }

    /// Replaces `from` (which must be there) with `to` in the node's config file, for the next
    /// launch.
    pub fn edit_config(&self, from: &str, to: &str) {
        let path = self._dir.path().join("node.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(from),
            "`{from}` is not in the config:\n{text}"
        );
        std::fs::write(&path, text.replace(from, to)).unwrap();
    }

    /// As [`Node::relaunch`], with `from` replaced by `to` in the config first (a new listener
    /// port: the old one may have been taken by another test's node in the meantime).
    pub fn relaunch_replacing(&mut self, from: &str, to: &str) {
        let path = self._dir.path().join("node.toml");
        if !from.is_empty() {
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, text.replace(from, to)).unwrap();
        }
        let mut child = duplexd_command(self.netns.as_deref(), &path)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.log = Log::new(child.stderr.take().unwrap());
        self.duplexd = KillOnDrop(child);
        self.log.wait_for(&["service spawned"]);
    }

    /// The pids of the services duplexd lists that are still its children. A pid a listing
    /// shows may belong to a service that has just ended, and pids are reused (this machine's
    /// `pid_max` is 32768, and the test suite makes processes fast): signalling it unchecked
    /// could hit another test's process.
    pub fn service_pids(&self) -> Vec<i32> {
        let me = self.pid() as i32;
        self.services()
            .iter()
            .filter_map(|s| s["pid"].as_i64())
            .filter(|&p| p > 0)
            .map(|p| p as i32)
            .filter(|&p| parent_of(p) == Some(me))
            .collect()
    }

    /// SIGKILLs duplexd and every service it runs (the whole node, as a power loss of the
    /// controller would stop it), and waits until every one of them is gone.
    pub fn kill_all(&mut self) {
        let me = self.pid() as i32;
        let mut pids = self.service_pids();
        // duplexd stopped before any service dies, so that it cannot restart one (with the
        // listeners' sockets) behind our back; every child it has then goes too.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(me),
            nix::sys::signal::Signal::SIGSTOP,
        );
        pids.extend(children_of(me));
        pids.sort_unstable();
        pids.dedup();
        pids.push(me);
        for &p in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.duplexd.0.wait();
        let deadline = Instant::now() + PATIENCE;
        // A killed child of duplexd is reaped by init once duplexd is gone; wait for that.
        while pids.iter().any(|&p| alive(p)) {
            assert!(
                Instant::now() < deadline,
                "killed processes linger: {pids:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.log.drain();
    }

    /// Waits for duplexd to end by itself; its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        self.duplexd.0.wait().ok().and_then(|s| s.code())
    }

    /// SIGTERM, then the exit code; drains the log.
    pub fn stop(&mut self) -> Option<i32> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.duplexd.0.wait().unwrap();
        self.log.drain();
        status.code()
    }
}

/// Lines of a running process's log, collected by a thread.
#[derive(Debug)]
pub struct Log {
    rx: mpsc::Receiver<String>,
    /// Every line seen so far.
    pub seen: Vec<String>,
}

impl Log {
    /// Follows `stderr`.
    pub fn new(stderr: std::process::ChildStderr) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// Takes every line available now.
    pub fn pump(&mut self) {
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line);
        }
    }

    /// Collects every remaining line (after the process exited).
    pub fn drain(&mut self) {
        while let Ok(line) = self.rx.recv_timeout(Duration::from_secs(30)) {
            self.seen.push(line);
        }
    }

    /// Every line read so far.
    pub fn seen_lines(&self) -> &[String] {
        &self.seen
    }

    /// The last `n` lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let from = self.seen.len().saturating_sub(n);
        self.seen[from..].join("\n")
    }

    /// Waits for a line containing every one of `parts`; returns it.
    pub fn wait_for(&mut self, parts: &[&str]) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(l) = self
                .seen
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "the log ended (the process closed its stderr: it exited) before a line \
                     with {parts:?}; its last lines:\n{}",
                    self.tail(80)
                ),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!(
                    "no log line with {parts:?} within {PATIENCE:?}; log so far:\n{}",
                    self.tail(80)
                ),
            }
        }
    }

    /// Lines containing every one of `parts`.
    pub fn matching(&self, parts: &[&str]) -> Vec<&String> {
        self.seen
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .collect()
    }
}

/// The numeric value of `key=` in a log line.
pub fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {line}"))
}

/// `/proc/PID/status` as (key, value) pairs.
pub fn proc_status(pid: u64) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// Median and 99th percentile of `values` (sorted in place).
pub fn median_p99(values: &mut [u64]) -> (u64, u64) {
    values.sort_unstable();
    if values.is_empty() {
        return (0, 0);
    }
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

/// The parent of process `pid`, if it exists (from /proc).
fn parent_of(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: the comm may hold spaces and parentheses.
    s.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
}

/// The processes whose parent is `pid` (from /proc).
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| parent_of(p) == Some(pid))
        .collect()
}

/// Whether process `pid` still runs a thread: a process whose leader is already a zombie may
/// still have threads exiting, holding its files (its listeners' sockets among them).
fn alive(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
    })
}

/// `GET path` on `addr` (HTTP/1.0); the body of a 200 answer.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    std::io::Write::write_fmt(
        &mut s,
        format_args!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
    .ok()?;
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut out).ok()?;
    let text = String::from_utf8(out).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
}

/// `duplexctl --connect ADDR --key-file KEY ARGS` (remote management, no state directory): its
/// exit code, stdout and stderr.
pub fn remote_ctl(addr: &str, key: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin("duplexctl"))
        .args(["--connect", addr, "--key-file"])
        .arg(key)
        .args(args)
        .env_remove("DUPLEX_STATE_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("duplexctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`remote_ctl`], which must succeed; its stdout.
pub fn remote_ctl_ok(addr: &str, key: &Path, args: &[&str]) -> String {
    let (code, out, err) = remote_ctl(addr, key, args);
    assert_eq!(code, Some(0), "duplexctl --connect {args:?}: {out}{err}");
    out
}
