//! Several fabric I/O threads (`[fabric] io_threads = 3`) against a whole node (duplexd,
//! datapath, fabric, mgmt) over loopback: connections are dealt out over the threads, each with
//! its own channel to the datapath; a verifying workload over five queues finds every block it
//! wrote; the per-thread connection counters on mgmt's metrics endpoint show every thread took
//! connections; the fabric SIGKILLed under a workload comes back on all its channels and the data
//! written before is intact. No root or QEMU needed for that one. A second test stops one worker
//! thread of the fabric (seized and interrupted with ptrace: that thread alone stops, as a stuck
//! one would) and finds the fabric stops its heartbeat, is restarted by duplexd, and serves
//! the data intact; it needs ptrace rights over the fabric (root, as CI runs).

use duplex_tests::{duplex_bench, free_port, http_get, storage_config, Node, ShmVolume, PATIENCE};

const SUBNQN: &str = "nqn.2026-11.io.duplex:threads";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:d0b1e5c4-0000-4000-8000-00000000000f";

/// The value of `duplex_fabric_thread_connections_total` for each thread, from `/metrics`.
fn taken_by_thread(metrics: &str) -> Vec<(u32, u64)> {
    let mut out: Vec<(u32, u64)> = metrics
        .lines()
        .filter(|l| l.starts_with("duplex_fabric_thread_connections_total{"))
        .filter_map(|l| {
            let thread = l
                .split("thread=\"")
                .nth(1)?
                .split('"')
                .next()?
                .parse()
                .ok()?;
            let value = l.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some((thread, value as u64))
        })
        .collect();
    out.sort_unstable();
    out
}

#[test]
fn connections_spread_over_the_io_threads_and_data_survives_a_fabric_kill() {
    let vol = ShmVolume::new("threads-test");
    let volume = &vol.0;
    let (port, metrics_port) = (free_port(), free_port());
    let config = format!(
        "{}\n[[service]]\nname = \"mgmt\"\nbinary = \"{{mgmt}}\"\n\n\
         [[listener]]\nname = \"metrics\"\naddress = \"127.0.0.1:{metrics_port}\"\nservice = \"mgmt\"\n\n\
         [fabric]\nio_threads = 3\n",
        storage_config(
            "threads",
            port,
            &format!("path = \"{volume}\"\nsize = \"64MiB\""),
            SUBNQN,
            HOSTNQN,
        )
    );
    let mut node = Node::start(&config);
    let ready = node.log.wait_for(&["fabric ready"]);
    assert!(ready.contains("io_threads=3"), "{ready}");
    node.log.wait_for(&["datapath ready", "channels=3"]);

    // One admin queue and five I/O queues: six connections over three threads.
    let (code, out, err) = duplex_bench(
        port,
        SUBNQN,
        HOSTNQN,
        &[
            "--workload",
            "mixed",
            "--verify",
            "--bs",
            "4k",
            "--qd",
            "16",
            "--queues",
            "5",
            "--ios",
            "30000",
            "--span-blocks",
            "8192",
            "--seed",
            "5",
            "--json",
        ],
    );
    assert_eq!(code, 0, "duplex-bench: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(v["verify"]["errors"], 0, "{out}");
    assert!(
        v["verify"]["blocks_checked"].as_u64().unwrap_or(0) > 0,
        "{out}"
    );

    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let text = http_get(&metrics_addr, "/metrics").expect("GET /metrics");
    let taken = taken_by_thread(&text);
    assert_eq!(
        taken.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        [0, 1, 2],
        "a counter per I/O thread:\n{text}"
    );
    assert!(
        taken.iter().all(|(_, n)| *n >= 1),
        "every thread took connections: {taken:?}"
    );
    assert!(
        taken.iter().map(|(_, n)| n).sum::<u64>() >= 6,
        "the admin and five I/O queues were counted: {taken:?}"
    );

    // Every block of the span written once more, then the fabric killed while a workload runs
    // on all three threads; afterwards every block reads back as written.
    let span = ["--span-blocks", "2048", "--seed", "7", "--bs", "4k"];
    write_span(port, &span, 2048);
    let before = node.service("fabric")["generation"].as_u64().unwrap_or(0);
    let load = std::process::Command::new(duplex_tests::bin("duplex-bench"))
        .args([
            "--target",
            &format!("127.0.0.1:{port}"),
            "--nqn",
            SUBNQN,
            "--hostnqn",
            HOSTNQN,
            "--workload",
            "read",
            "--bs",
            "4k",
            "--qd",
            "16",
            "--queues",
            "4",
            "--ios",
            "100000000",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("duplex-bench runs");
    let mut load = duplex_tests::KillOnDrop(load);
    // The load is on every thread once its five connections were counted (after the six of
    // the first run and the two of the second).
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let text = http_get(&metrics_addr, "/metrics").unwrap_or_default();
        let now: u64 = taken_by_thread(&text).iter().map(|(_, n)| n).sum();
        if now >= 6 + 2 + 5 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the load's connections were never counted: {now}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (code, out, err) = node.ctl(&["service", "crash", "fabric", "--mode", "kill"]);
    assert_eq!(code, 0, "duplexctl crash fabric: {out}{err}");
    node.wait_running("fabric", before);
    let restarted = node
        .log
        .wait_for(&["the fabric was restarted on this channel", "channel=2"]);
    assert!(restarted.contains("generation="), "{restarted}");
    let _ = load.0.kill();
    let _ = load.0.wait();

    verify_span(port, &span, 2048);
}

/// Writes `ios` blocks over the span (two queues, verified as they go).
fn write_span(port: u16, span: &[&str], ios: u32) {
    let ios = ios.to_string();
    let args = [
        &[
            "--workload",
            "write",
            "--verify",
            "--qd",
            "8",
            "--queues",
            "2",
            "--ios",
            &ios,
        ][..],
        span,
    ]
    .concat();
    let (code, out, err) = duplex_bench(port, SUBNQN, HOSTNQN, &args);
    assert_eq!(code, 0, "{out}{err}");
}

/// Reads every block of the span back (after the fabric's restart): all `blocks` as written.
fn verify_span(port: u16, span: &[&str], blocks: u32) {
    let args = [&["--verify-only", "--queues", "2"][..], span].concat();
    let (code, out, err) = duplex_bench(port, SUBNQN, HOSTNQN, &args);
    assert_eq!(code, 0, "after the fabric's restart: {out}{err}");
    assert!(
        out.contains(&format!("{blocks} blocks checked, 0 errors")),
        "{out}"
    );
}

/// Stops thread `tid` of another process, as a stuck thread would be: seized with ptrace and
/// interrupted, it stays in a ptrace stop while the rest of its process runs on. It is stopped
/// where it waits for events (`epoll_wait`), holding nothing another thread may need (a lock,
/// the log's writer): stopped elsewhere, it is resumed and interrupted again. The thread made
/// here is the tracer and waits on it, so that once the process is killed its end is reaped
/// here and its parent (duplexd) can reap the process. Returns once the thread is stopped.
fn freeze_thread(tid: i32) -> std::thread::JoinHandle<()> {
    use nix::errno::Errno;
    use nix::sys::ptrace;
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use nix::unistd::Pid;
    let (tx, rx) = std::sync::mpsc::channel::<Result<String, String>>();
    let tracer = std::thread::spawn(move || {
        let pid = Pid::from_raw(tid);
        if let Err(e) = ptrace::seize(pid, ptrace::Options::empty()) {
            let _ = tx.send(Err(format!(
                "PTRACE_SEIZE {tid}: {e} (needs root or CAP_SYS_PTRACE)"
            )));
            return;
        }
        if let Err(e) = ptrace::interrupt(pid) {
            let _ = tx.send(Err(format!("PTRACE_INTERRUPT {tid}: {e}")));
            return;
        }
        let mut told = Some(tx);
        let mut tries = 0;
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL)) {
                Ok(status @ (WaitStatus::PtraceEvent(..) | WaitStatus::Stopped(..))) => {
                    let Some(tx) = told.take() else {
                        // Stopped for good: nothing here resumes it again.
                        continue;
                    };
                    let at =
                        std::fs::read_to_string(format!("/proc/{tid}/syscall")).unwrap_or_default();
                    tries += 1;
                    if !waits_for_events(&at) && tries < 1000 {
                        // Not where it waits: let it run on (with the signal it stopped
                        // for, if any), and stop it again.
                        let signal = match status {
                            WaitStatus::Stopped(_, s) => Some(s),
                            _ => None,
                        };
                        let _ = ptrace::cont(pid, signal);
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        let _ = ptrace::interrupt(pid);
                        told = Some(tx);
                        continue;
                    }
                    let _ = tx.send(Ok(format!("after {tries} stops, in: {}", at.trim_end())));
                }
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => break,
                Err(Errno::EINTR) => {}
                Err(_) => break,
                Ok(_) => {}
            }
        }
        if let Some(tx) = told {
            let _ = tx.send(Err(format!("thread {tid} ended before it stopped")));
        }
    });
    let at = rx
        .recv()
        .expect("the tracer reports")
        .unwrap_or_else(|e| panic!("cannot stop the fabric's I/O thread: {e}"));
    eprintln!("fabric I/O thread {tid} stopped {at}");
    tracer
}

/// Whether a `/proc/TID/syscall` line shows the thread in an epoll wait (x86_64 and aarch64
/// numbers).
fn waits_for_events(line: &str) -> bool {
    let nr = line
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<i64>().ok());
    if cfg!(target_arch = "x86_64") {
        matches!(nr, Some(232 | 281 | 441))
    } else {
        // aarch64: epoll_pwait, epoll_pwait2.
        matches!(nr, Some(22 | 441))
    }
}

/// The id of the thread named `name` in process `pid`.
fn thread_named(pid: i32, name: &str) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(Result::ok)
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })?
        .file_name()
        .to_str()?
        .parse()
        .ok()
}

#[test]
fn a_stuck_io_thread_stops_the_fabric_heartbeat_and_the_fabric_is_restarted() {
    let vol = ShmVolume::new("threads-stuck");
    let volume = &vol.0;
    let port = free_port();
    let config = format!(
        "{}\n[[service]]\nname = \"mgmt\"\nbinary = \"{{mgmt}}\"\n\n[fabric]\nio_threads = 2\n",
        storage_config(
            "stuck",
            port,
            &format!("path = \"{volume}\"\nsize = \"16MiB\""),
            SUBNQN,
            HOSTNQN,
        )
    );
    let mut node = Node::start(&config);
    node.log.wait_for(&["fabric ready", "io_threads=2"]);
    node.log.wait_for(&["datapath ready", "channels=2"]);
    // Two queues, dealt over both threads, write the span.
    let span = ["--span-blocks", "1024", "--seed", "11", "--bs", "4k"];
    write_span(port, &span, 1024);

    let row = node.service("fabric");
    let before = row["generation"].as_u64().unwrap_or(0);
    let fabric = i32::try_from(row["pid"].as_i64().expect("the fabric's pid")).expect("pid");
    let tid = thread_named(fabric, "fabric-io1").expect("the fabric has an I/O thread 1");
    let tracer = freeze_thread(tid);
    // Only that thread stopped: the runtime thread's heartbeat now refuses to beat, duplexd
    // finds the fabric hung and restarts it.
    let stalled = node
        .log
        .wait_for(&["fabric I/O thread stopped running", "thread=1"]);
    assert!(stalled.contains("stalled_ms="), "{stalled}");
    node.log.wait_for(&["service is hung", "fabric"]);
    node.wait_running("fabric", before);
    tracer
        .join()
        .expect("the tracer ends with the stopped process");

    verify_span(port, &span, 1024);
}
