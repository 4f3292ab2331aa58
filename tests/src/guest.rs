//! Linux guests in QEMU for interop tests: a Debian kernel (bookworm's 6.1 or bookworm-backports'
//! 6.12) and a busybox initramfs with nvme-cli, fio and the NVMe/TCP host and target modules,
//! built from Debian packages by `tests/guest/build.sh` into `<target>/guest/<flavour>/`.
//!
//! A guest runs one shell script from a 9p share and powers off; its exit code, stdout and
//! stderr come back ([`GuestRun`]). The guest sees the host's 127.0.0.1 as 10.0.2.2 (QEMU user
//! networking) and is 10.0.2.15 itself; [`RunSpec::hostfwd`] forwards host ports into it. While it
//! runs, the script's output lines (and the init's progress lines from the serial console) are
//! written to the test's stderr with a prefix, bypassing the test harness's capture, so a long
//! run shows progress.
//!
//! KVM is used when it can boot the guest (probed once per image and machine, remembered in the
//! image directory); otherwise TCG. `DUPLEX_GUEST_ACCEL=kvm|tcg` forces one,
//! `DUPLEX_GUEST_DIR` moves the image cache, `DUPLEX_QEMU` names the QEMU binary.
//!
//! ```no_run
//! use duplex_tests::guest::{Guest, Kernel, RunSpec};
//! let image = Guest::image(Kernel::Bookworm).unwrap();
//! let run = image.run(&RunSpec::new("nvme version")).unwrap();
//! assert_eq!(run.exit_code, 0);
//! assert!(run.stdout.contains("nvme version"));
//! ```

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The 9p mount tag of the share (see `tests/guest/init`).
const SHARE_TAG: &str = "duplex";
/// How long a KVM probe may take to reach the script before KVM counts as unusable.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU may take to power off after the script's status was written.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);
/// How often the monitor looks at the guest.
const POLL: Duration = Duration::from_millis(100);

/// Which Debian kernel the guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Debian bookworm's kernel (6.1.x).
    Bookworm,
    /// Debian bookworm-backports' kernel (6.12.x).
    Backports,
}

impl Kernel {
    /// Both kernels.
    pub const ALL: [Kernel; 2] = [Kernel::Bookworm, Kernel::Backports];

    /// The flavour name `tests/guest/build.sh` takes.
    pub fn flavour(self) -> &'static str {
        match self {
            Kernel::Bookworm => "bookworm",
            Kernel::Backports => "backports",
        }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.flavour())
    }
}

/// How QEMU runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation (`-accel kvm -cpu host`).
    Kvm,
    /// Software emulation (`-accel tcg -cpu max`).
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What went wrong in the harness (a script that fails is not an error: see
/// [`GuestRun::exit_code`]).
#[derive(Debug)]
pub enum GuestError {
    /// A file or process operation of the harness failed.
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// `tests/guest/build.sh` failed.
    Build {
        /// The kernel flavour being built.
        kernel: Kernel,
        /// How the script ended.
        status: ExitStatus,
        /// The script's last output lines.
        output: String,
    },
    /// The spec cannot be run (e.g. a space in the host NQN).
    Spec(String),
    /// QEMU ended without the guest reporting the script's exit code.
    NoResult {
        /// QEMU's exit status and its own error output.
        qemu: String,
        /// What the guest's init reported, if anything (`DUPLEX-GUEST-ERROR ...`).
        guest_error: Option<String>,
        /// The last serial console lines.
        console: String,
    },
    /// The guest did not finish within the spec's timeout; QEMU was killed.
    Timeout {
        /// The timeout.
        after: Duration,
        /// Whether the script had started.
        script_started: bool,
        /// The last lines of the script's stdout and stderr.
        output: String,
        /// The last serial console lines.
        console: String,
    },
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::Io { context, source } => write!(f, "{context}: {source}"),
            GuestError::Build {
                kernel,
                status,
                output,
            } => write!(
                f,
                "building the {kernel} guest image failed ({status}); last output:\n{output}"
            ),
            GuestError::Spec(why) => write!(f, "bad guest run spec: {why}"),
            GuestError::NoResult {
                qemu,
                guest_error,
                console,
            } => {
                write!(f, "the guest ended without a result ({qemu})")?;
                if let Some(e) = guest_error {
                    write!(f, "; guest init: {e}")?;
                }
                write!(f, "; console tail:\n{console}")
            }
            GuestError::Timeout {
                after,
                script_started,
                output,
                console,
            } => write!(
                f,
                "the guest did not finish within {after:?} (script {}); QEMU killed.\n\
                 script output tail:\n{output}\nconsole tail:\n{console}",
                if *script_started {
                    "started"
                } else {
                    "never started"
                }
            ),
        }
    }
}

impl std::error::Error for GuestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GuestError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The harness's result type.
pub type Result<T> = std::result::Result<T, GuestError>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> GuestError {
    let context = context.into();
    move |source| GuestError::Io { context, source }
}

/// Entry point: guest images by kernel.
#[derive(Debug)]
pub struct Guest;

impl Guest {
    /// The image for `kernel`, built (or found in the cache) by `tests/guest/build.sh`. Needs
    /// root the first time on a machine (apt); later calls in the same process are free, later
    /// processes pay about a second for the cache check. Concurrent builders wait for each other
    /// (the script locks the output directory).
    pub fn image(kernel: Kernel) -> Result<GuestImage> {
        static BUILT: Mutex<Vec<GuestImage>> = Mutex::new(Vec::new());
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(image) = built.iter().find(|i| i.kernel == kernel) {
            return Ok(image.clone());
        }
        let image = build(kernel)?;
        built.push(image.clone());
        Ok(image)
    }

    /// Where images are cached: `$DUPLEX_GUEST_DIR`, else `guest/` in the cargo target
    /// directory this test binary was built in.
    pub fn cache_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("DUPLEX_GUEST_DIR") {
            return PathBuf::from(dir);
        }
        target_dir().join("guest")
    }
}

/// The cargo target directory: the nearest ancestor of the running executable holding cargo's
/// `CACHEDIR.TAG`, else `$CARGO_TARGET_DIR`, else the workspace's `target/`.
fn target_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe
            .ancestors()
            .skip(1)
            .find(|d| d.join("CACHEDIR.TAG").is_file())
        {
            return dir.to_path_buf();
        }
    }
    let workspace = workspace_dir();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}

fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Runs the build script, echoing its lines to stderr as they come.
fn build(kernel: Kernel) -> Result<GuestImage> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    let dir = Guest::cache_dir().join(kernel.flavour());
    let mut child = Command::new("bash")
        .arg(&script)
        .arg(kernel.flavour())
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("running {}", script.display())))?;
    let mut lines = Vec::new();
    let stdout = child.stdout.take();
    let echo_out = std::thread::spawn(move || {
        let mut seen = Vec::new();
        if let Some(out) = stdout {
            for line in io::BufReader::new(out).lines().map_while(|l| l.ok()) {
                seen.push(line);
            }
        }
        seen
    });
    if let Some(err) = child.stderr.take() {
        for line in io::BufReader::new(err).lines().map_while(|l| l.ok()) {
            emit(&format!("[guest-build {kernel}] {line}"));
            lines.push(line);
        }
    }
    lines.extend(echo_out.join().unwrap_or_default());
    let status = child
        .wait()
        .map_err(io_err(format!("waiting for {}", script.display())))?;
    if !status.success() {
        let from = lines.len().saturating_sub(40);
        return Err(GuestError::Build {
            kernel,
            status,
            output: lines[from..].join("\n"),
        });
    }
    let release = fs::read_to_string(dir.join("kernel-release"))
        .map_err(io_err(format!("reading {}/kernel-release", dir.display())))?
        .trim()
        .to_owned();
    let vmlinux = dir.join("vmlinux");
    Ok(GuestImage {
        kernel,
        boot_kernel: if vmlinux.is_file() {
            vmlinux
        } else {
            dir.join("vmlinuz")
        },
        vmlinuz: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio"),
        release,
        dir,
    })
}

/// A bootable guest: kernel and initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Which kernel.
    pub kernel: Kernel,
    /// The kernel image (bzImage).
    pub vmlinuz: PathBuf,
    /// What QEMU boots: the uncompressed `vmlinux` when it has a PVH entry (no decompression
    /// in the emulator: seconds faster under TCG), else `vmlinuz`.
    pub boot_kernel: PathBuf,
    /// The uncompressed cpio initramfs.
    pub initramfs: PathBuf,
    /// The kernel release (`uname -r` in the guest), e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// The cache directory holding both (and `manifest`, the package versions).
    pub dir: PathBuf,
}

/// What to run in a guest and how. Build with [`RunSpec::new`] and the builder methods, or set
/// the public fields.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The shell script (busybox `sh`), run from the share directory as the guest's root user.
    /// Its stdout/stderr come back in [`GuestRun`]; files it writes to its working directory
    /// (the share) stay readable through [`GuestRun::file`].
    pub script: String,
    /// The NVMe host NQN written to `/etc/nvme/hostnqn` (default: made from the host id).
    pub host_nqn: Option<String>,
    /// The NVMe host id (a UUID) written to `/etc/nvme/hostid` (default: a fresh UUID).
    pub host_id: Option<String>,
    /// Extra kernel command line words.
    pub cmdline: Vec<String>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest CPUs (the Linux NVMe/TCP host makes at most one I/O queue per CPU).
    pub cpus: u32,
    /// `(host port, guest port)`: host `127.0.0.1:HOST` forwards to the guest's `GUEST` (TCP).
    pub hostfwd: Vec<(u16, u16)>,
    /// Cut the guest off from the host and the outside (`restrict=on`); forwarded ports still
    /// work. Off by default: the guest reaches the host's 127.0.0.1 at 10.0.2.2.
    pub isolated: bool,
    /// Extra QEMU arguments, placed after the machine, CPU and memory options and before the
    /// harness's own devices (so e.g. an `intel-iommu` device is realised first).
    pub qemu_args: Vec<String>,
    /// Files copied into the share before boot: (name in the share, host path).
    pub files: Vec<(String, PathBuf)>,
    /// The whole run (boot, script, power off) must finish within this, or QEMU is killed.
    pub timeout: Duration,
    /// Prefix of the streamed output lines (default `guest`).
    pub label: String,
    /// Stream the script's output and the init's progress to stderr while the guest runs.
    pub stream: bool,
}

impl Default for RunSpec {
    fn default() -> Self {
        Self {
            script: String::new(),
            host_nqn: None,
            host_id: None,
            cmdline: Vec::new(),
            memory_mib: 1024,
            cpus: 1,
            hostfwd: Vec::new(),
            isolated: false,
            qemu_args: Vec::new(),
            files: Vec::new(),
            timeout: Duration::from_secs(600),
            label: "guest".to_owned(),
            stream: true,
        }
    }
}

impl RunSpec {
    /// A spec running `script` with the defaults (1 GiB, 1 CPU, 600 s).
    pub fn new(script: impl Into<String>) -> Self {
        Self {
            script: script.into(),
            ..Self::default()
        }
    }

    /// Sets the host NQN and host id.
    pub fn host(mut self, nqn: impl Into<String>, id: impl Into<String>) -> Self {
        self.host_nqn = Some(nqn.into());
        self.host_id = Some(id.into());
        self
    }

    /// Adds a kernel command line word.
    pub fn cmdline(mut self, word: impl Into<String>) -> Self {
        self.cmdline.push(word.into());
        self
    }

    /// Sets the memory (MiB).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Sets the CPU count.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Forwards host `127.0.0.1:host` to the guest's `guest` TCP port.
    pub fn hostfwd(mut self, host: u16, guest: u16) -> Self {
        self.hostfwd.push((host, guest));
        self
    }

    /// Adds QEMU arguments.
    pub fn qemu_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.qemu_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Copies the host file `from` into the share as `name` before boot.
    pub fn file(mut self, name: impl Into<String>, from: impl Into<PathBuf>) -> Self {
        self.files.push((name.into(), from.into()));
        self
    }

    /// Sets the timeout of the whole run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the prefix of the streamed lines.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// Turns streaming to stderr on or off.
    pub fn stream(mut self, on: bool) -> Self {
        self.stream = on;
        self
    }
}

/// A finished guest run. Dropping it removes its temporary directory (share and console log).
#[derive(Debug)]
pub struct GuestRun {
    /// The script's exit code.
    pub exit_code: i32,
    /// The script's stdout.
    pub stdout: String,
    /// The script's stderr.
    pub stderr: String,
    /// The serial console log (kernel messages, init progress, markers).
    pub console_log: PathBuf,
    /// The share directory (the script's working directory in the guest).
    pub share: PathBuf,
    /// From starting QEMU to QEMU's exit.
    pub wall_time: Duration,
    /// From starting QEMU to the script starting (host clock), if it started.
    pub boot_time: Option<Duration>,
    /// How the guest ran.
    pub accel: Accel,
    /// The kernel release the guest ran.
    pub release: String,
    _dir: tempfile::TempDir,
}

impl GuestRun {
    /// The serial console log's text.
    pub fn console(&self) -> String {
        fs::read(&self.console_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// A file the script wrote into its working directory (the share).
    pub fn file(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.share.join(name);
        fs::read(&path).map_err(io_err(format!("reading {}", path.display())))
    }

    /// stdout, stderr and the console tail, for assertion messages.
    pub fn report(&self) -> String {
        format!(
            "exit code {} ({}, {}, {:.1?})\n--- stdout\n{}\n--- stderr\n{}\n--- console tail\n{}",
            self.exit_code,
            self.release,
            self.accel.name(),
            self.wall_time,
            self.stdout,
            self.stderr,
            tail_lines(&self.console(), 40)
        )
    }
}

impl GuestImage {
    /// Boots the guest, runs `spec.script`, waits for it to power off. A script that fails is
    /// a [`GuestRun`] with a non-zero exit code; a guest that never reports, or runs past the
    /// timeout (QEMU is killed), is an error.
    pub fn run(&self, spec: &RunSpec) -> Result<GuestRun> {
        self.spawn(spec)?.wait()
    }

    /// Boots the guest in the background (e.g. a reference target for another guest); its
    /// output streams as with [`GuestImage::run`]. Dropping the handle kills QEMU.
    pub fn spawn(&self, spec: &RunSpec) -> Result<RunningGuest> {
        let accel = self.accel()?;
        self.spawn_with(spec, accel)
    }

    /// How [`GuestImage::run`] will run this image: KVM if it boots it here, else TCG (or what
    /// `DUPLEX_GUEST_ACCEL` forces); probed once per machine and image. For tests whose QEMU
    /// arguments depend on it (e.g. `kernel-irqchip=split` for an emulated IOMMU under KVM).
    pub fn accel(&self) -> Result<Accel> {
        match std::env::var("DUPLEX_GUEST_ACCEL").as_deref() {
            Ok("kvm") => return Ok(Accel::Kvm),
            Ok("tcg") => return Ok(Accel::Tcg),
            _ => {}
        }
        let usable = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if !usable {
            return Ok(Accel::Tcg);
        }
        let host = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let key = format!("{} {}", host.trim(), qemu_binary());
        let memo = self.dir.join("accel");
        if let Ok(text) = fs::read_to_string(&memo) {
            if let Some((k, v)) = text.trim().rsplit_once(' ') {
                if k == key {
                    return Ok(if v == "kvm" { Accel::Kvm } else { Accel::Tcg });
                }
            }
        }
        let probe = RunSpec::new("exit 0")
            .timeout(KVM_PROBE_TIMEOUT)
            .label(format!("kvm-probe {}", self.kernel))
            .stream(false);
        let (accel, why) = match self.spawn_with(&probe, Accel::Kvm).and_then(|g| g.wait()) {
            Ok(run) if run.exit_code == 0 => (Accel::Kvm, "KVM boots the guest".to_owned()),
            Ok(run) => (Accel::Tcg, format!("probe script exited {}", run.exit_code)),
            Err(e) => (Accel::Tcg, e.to_string()),
        };
        let why = why.lines().next().unwrap_or_default().to_owned();
        emit(&format!(
            "[guest {}] KVM probe: using {} ({why})",
            self.kernel,
            accel.name()
        ));
        let _ = fs::write(&memo, format!("{key} {}\n", accel.name()));
        Ok(accel)
    }

    fn spawn_with(&self, spec: &RunSpec, accel: Accel) -> Result<RunningGuest> {
        let dir = tempfile::Builder::new()
            .prefix("duplex-guest-")
            .tempdir()
            .map_err(io_err("creating the guest's temporary directory"))?;
        let share = dir.path().join("share");
        fs::create_dir(&share).map_err(io_err(format!("creating {}", share.display())))?;
        fs::write(share.join("run.sh"), &spec.script)
            .map_err(io_err("writing the guest script"))?;
        for (name, from) in &spec.files {
            if name.contains('/') || name.is_empty() || name.starts_with('.') {
                return Err(GuestError::Spec(format!("bad share file name {name:?}")));
            }
            fs::copy(from, share.join(name))
                .map_err(io_err(format!("copying {} into the share", from.display())))?;
        }
        let console_log = dir.path().join("console.log");
        let qemu_log = dir.path().join("qemu.log");
        let args = self.qemu_command(spec, accel, &share, &console_log)?;

        let qemu_out = File::create(&qemu_log).map_err(io_err("creating qemu.log"))?;
        let qemu_err = qemu_out
            .try_clone()
            .map_err(io_err("duplicating qemu.log"))?;
        let ready = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let monitor = Monitor {
            spec: spec.clone(),
            accel,
            release: self.release.clone(),
            dir,
            share: share.clone(),
            console_log,
            qemu_log,
            ready: Arc::clone(&ready),
            stop: Arc::clone(&stop),
        };
        // QEMU is started by the monitor thread, which lives exactly as long as QEMU, so that
        // the parent-death signal (set by setpriv) fires if the test process dies.
        let thread = std::thread::Builder::new()
            .name(format!("guest-{}", spec.label))
            .spawn(move || {
                let mut command = match setpriv() {
                    Some(setpriv) => {
                        let mut c = Command::new(setpriv);
                        c.args(["--pdeathsig", "KILL", "--"]).args(&args);
                        c
                    }
                    None => {
                        let mut c = Command::new(&args[0]);
                        c.args(&args[1..]);
                        c
                    }
                };
                command
                    .stdin(Stdio::null())
                    .stdout(qemu_out)
                    .stderr(qemu_err);
                let child = command.spawn();
                let _ = tx.send(child.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                match child {
                    Ok(child) => monitor.watch(child),
                    Err(e) => Err(GuestError::Io {
                        context: format!("starting {}", args[0]),
                        source: e,
                    }),
                }
            })
            .map_err(io_err("starting the guest monitor thread"))?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => {
                // The thread reports the spawn error itself.
                return Err(thread.join().map_or_else(
                    |_| GuestError::Spec("the guest monitor thread panicked".to_owned()),
                    |r| match r {
                        Ok(_) => GuestError::Spec("QEMU did not start".to_owned()),
                        Err(e) => e,
                    },
                ));
            }
        }
        Ok(RunningGuest {
            share,
            thread: Some(thread),
            ready,
            stop,
        })
    }

    fn qemu_command(
        &self,
        spec: &RunSpec,
        accel: Accel,
        share: &Path,
        console_log: &Path,
    ) -> Result<Vec<String>> {
        let mut append = vec![
            "console=ttyS0".to_owned(),
            "panic=-1".to_owned(),
            "oops=panic".to_owned(),
            format!("duplex.share={SHARE_TAG}"),
        ];
        let word = |what: &str, v: &str| -> Result<String> {
            if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '"') {
                return Err(GuestError::Spec(format!(
                    "{what} {v:?} must be one non-empty word"
                )));
            }
            Ok(v.to_owned())
        };
        if let Some(nqn) = &spec.host_nqn {
            append.push(format!("duplex.hostnqn={}", word("host NQN", nqn)?));
        }
        if let Some(id) = &spec.host_id {
            append.push(format!("duplex.hostid={}", word("host id", id)?));
        }
        for w in &spec.cmdline {
            append.push(word("kernel command line word", w)?);
        }
        let share_path = share
            .to_str()
            .filter(|s| !s.contains(','))
            .ok_or_else(|| GuestError::Spec(format!("unusable share path {share:?}")))?;
        let mut netdev = "user,id=net0".to_owned();
        if spec.isolated {
            netdev.push_str(",restrict=on");
        }
        for (host, guest) in &spec.hostfwd {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        let mut args: Vec<String> = vec![
            qemu_binary(),
            "-machine".into(),
            "q35".into(),
            "-accel".into(),
            accel.name().into(),
            "-cpu".into(),
            match accel {
                Accel::Kvm => "host".into(),
                Accel::Tcg => "max".into(),
            },
            "-m".into(),
            spec.memory_mib.to_string(),
            "-smp".into(),
            spec.cpus.max(1).to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-no-reboot".into(),
        ];
        args.extend(spec.qemu_args.iter().cloned());
        args.extend([
            "-serial".into(),
            format!("file:{}", console_log.display()),
            "-kernel".into(),
            self.boot_kernel.display().to_string(),
            "-initrd".into(),
            self.initramfs.display().to_string(),
            "-append".into(),
            append.join(" "),
            "-netdev".into(),
            netdev,
            "-device".into(),
            "virtio-net-pci,netdev=net0,romfile=".into(),
            "-virtfs".into(),
            format!("local,path={share_path},mount_tag={SHARE_TAG},security_model=none,id=share"),
        ]);
        Ok(args)
    }
}

fn qemu_binary() -> String {
    std::env::var("DUPLEX_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_owned())
}

/// `setpriv` (util-linux), to give QEMU a parent-death signal without unsafe code.
fn setpriv() -> Option<&'static Path> {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    SETPRIV
        .get_or_init(|| {
            ["/usr/bin/setpriv", "/bin/setpriv"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        })
        .as_deref()
}

/// A guest running in the background. Dropping it kills QEMU and removes its files.
#[derive(Debug)]
pub struct RunningGuest {
    share: PathBuf,
    thread: Option<JoinHandle<Result<GuestRun>>>,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl RunningGuest {
    /// The share directory (the script's working directory): a script can signal the host by
    /// creating files there.
    pub fn share(&self) -> &Path {
        &self.share
    }

    /// Waits until the guest's script has started (the network and modules are up by then);
    /// false if the guest ended or `timeout` passed first.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ready.load(Ordering::Acquire) {
                return true;
            }
            if Instant::now() >= deadline || self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return self.ready.load(Ordering::Acquire);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the guest to power off (or its timeout).
    pub fn wait(mut self) -> Result<GuestRun> {
        self.join()
    }

    /// Kills QEMU now; the result is what the guest had reported by then.
    pub fn kill(mut self) -> Result<GuestRun> {
        self.stop.store(true, Ordering::Release);
        self.join()
    }

    fn join(&mut self) -> Result<GuestRun> {
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(GuestError::Spec(
                    "the guest monitor thread panicked".to_owned(),
                ))
            }),
            None => Err(GuestError::Spec("the guest was already joined".to_owned())),
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::Release);
            let _ = t.join();
        }
    }
}

/// The monitor thread's state: follows the guest's files, enforces the timeout.
struct Monitor {
    spec: RunSpec,
    accel: Accel,
    release: String,
    dir: tempfile::TempDir,
    share: PathBuf,
    console_log: PathBuf,
    qemu_log: PathBuf,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

/// Kills and reaps QEMU when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl Monitor {
    fn watch(self, child: Child) -> Result<GuestRun> {
        let mut qemu = Qemu(child);
        let started = Instant::now();
        let deadline = started + self.spec.timeout;
        let label = &self.spec.label;
        let mut tails = [
            Tail::new(self.share.join("stdout"), format!("[{label}] "), false),
            Tail::new(
                self.share.join("stderr"),
                format!("[{label} stderr] "),
                false,
            ),
            Tail::new(
                self.console_log.clone(),
                format!("[{label} console] "),
                true,
            ),
        ];
        let status_path = self.share.join("status");
        let mut boot_time = None;
        let mut status_seen: Option<Instant> = None;
        let mut timed_out = false;
        let exit = loop {
            if self.spec.stream {
                for t in &mut tails {
                    t.poll();
                }
            }
            if boot_time.is_none() && self.share.join("ready").exists() {
                boot_time = Some(started.elapsed());
                self.ready.store(true, Ordering::Release);
            }
            if status_seen.is_none() && status_path.exists() {
                status_seen = Some(Instant::now());
            }
            match qemu.0.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) => {}
                Err(e) => return Err(io_err("waiting for QEMU")(e)),
            }
            let now = Instant::now();
            let grace_over = status_seen.is_some_and(|t| now > t + POWEROFF_GRACE);
            if self.stop.load(Ordering::Acquire) || grace_over {
                break None;
            }
            if now > deadline {
                timed_out = true;
                break None;
            }
            std::thread::sleep(POLL);
        };
        drop(qemu); // kills it if still running
        let wall_time = started.elapsed();
        if self.spec.stream {
            for t in &mut tails {
                t.poll();
                t.flush();
            }
        }
        let stdout = read_lossy(&self.share.join("stdout"));
        let stderr = read_lossy(&self.share.join("stderr"));
        let console = read_lossy(&self.console_log);
        let exit_code = fs::read_to_string(&status_path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .or_else(|| {
                console
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("DUPLEX-GUEST-RESULT "))
                    .and_then(|v| v.trim().parse().ok())
            });
        let Some(exit_code) = exit_code else {
            if timed_out {
                return Err(GuestError::Timeout {
                    after: self.spec.timeout,
                    script_started: boot_time.is_some(),
                    output: format!(
                        "{}\n--- stderr\n{}",
                        tail_lines(&stdout, 30),
                        tail_lines(&stderr, 30)
                    ),
                    console: tail_lines(&console, 40),
                });
            }
            let qemu = match exit {
                Some(status) => format!("QEMU {status}"),
                None => "QEMU killed".to_owned(),
            };
            let qemu_log = read_lossy(&self.qemu_log);
            return Err(GuestError::NoResult {
                qemu: if qemu_log.trim().is_empty() {
                    qemu
                } else {
                    format!("{qemu}: {}", qemu_log.trim())
                },
                guest_error: console
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("DUPLEX-GUEST-ERROR "))
                    .map(str::to_owned),
                console: tail_lines(&console, 40),
            });
        };
        Ok(GuestRun {
            exit_code,
            stdout,
            stderr,
            console_log: self.console_log,
            share: self.share,
            wall_time,
            boot_time,
            accel: self.accel,
            release: self.release,
            _dir: self.dir,
        })
    }
}

/// Follows a growing file and echoes its new complete lines with a prefix.
struct Tail {
    path: PathBuf,
    prefix: String,
    /// Only the init's lines and kernel trouble (for the console).
    console: bool,
    pos: u64,
    partial: Vec<u8>,
}

impl Tail {
    fn new(path: PathBuf, prefix: String, console: bool) -> Self {
        Self {
            path,
            prefix,
            console,
            pos: 0,
            partial: Vec::new(),
        }
    }

    fn poll(&mut self) {
        let Ok(mut f) = File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if let Ok(n) = f.read_to_end(&mut buf) {
            self.pos += n as u64;
        }
        self.partial.extend_from_slice(&buf);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            self.show(&String::from_utf8_lossy(&line[..i]));
        }
    }

    fn flush(&mut self) {
        if !self.partial.is_empty() {
            let line = String::from_utf8_lossy(&self.partial).into_owned();
            self.partial.clear();
            self.show(&line);
        }
    }

    fn show(&self, line: &str) {
        let line = line.trim_end_matches('\r');
        if self.console {
            let wanted = line.starts_with("duplex-init:")
                || line.starts_with("DUPLEX-GUEST-")
                || ["Kernel panic", "BUG:", "Oops", "WARNING:", "Call Trace"]
                    .iter()
                    .any(|p| line.contains(p));
            if !wanted {
                return;
            }
        }
        emit(&format!("{}{line}", self.prefix));
    }
}

/// Writes a line to the process's stderr directly (not through the test harness's capture).
fn emit(line: &str) {
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits for a running guest to create `name` in its share (`share`, [`RunningGuest::share`]):
/// its script's way of asking the host test for a step. `false` if the guest finished first
/// (its result says why).
pub fn wait_guest_file(share: &Path, name: &str) -> bool {
    loop {
        if share.join(name).exists() {
            return true;
        }
        if share.join("status").exists() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
