//! duplex-sandbox: how every duplex process but the supervisor is confined.
//!
//! Two halves, one per side of `exec`:
//!
//! * **In the supervisor, between fork and exec** — [`harden_child`] (for `Command::pre_exec`):
//!   moves the fds the service is handed to 3, 4, 5, … and lets every other fd close at exec,
//!   sets rlimits (`RLIMIT_CORE` 0 by default), drops capabilities to a given set (bounding,
//!   ambient, effective, permitted, inheritable), optionally gives the child its own mount
//!   namespace with private propagation, and sets `PR_SET_NO_NEW_PRIVS`. Everything it needs is
//!   computed before the fork ([`Hardening`]); it only makes raw syscalls, so it is
//!   async-signal-safe in the child of a multi-threaded parent.
//! * **In the service, before it serves** — [`enter`]: installs the service's seccomp
//!   filter on every thread of the process.
//!
//! # Policies are data
//!
//! Each service's seccomp policy is a file in `sandbox/policies/<service>.policy`, embedded at
//! build time and compiled to BPF with `seccompiler` when the service enters its sandbox. Every
//! rule carries a comment saying why it is needed (the parser rejects a rule without one), a
//! policy `@include`s `common.policy` for what every Rust process needs, and a syscall no rule
//! allows kills the process (`SECCOMP_RET_KILL_PROCESS`; a policy may say `@default trap`
//! instead while it is being developed). The format: `sandbox/policies/README.md` and
//! [`policy`]. Policies exist for x86_64 only; elsewhere [`enter`] fails with
//! [`SandboxError::UnsupportedArch`] rather than run unconfined.
//!
//! The tests prove three things per policy, as Firecracker does: the service's normal work runs
//! under it, a forbidden call (`execve`, `openat`, `fork`) kills it, and no rule is redundant
//! (each rule, removed alone, makes the probe die).
//!
//! # Off switch for development
//!
//! `DUPLEX_SANDBOX=off` in a service's environment makes [`enter`] skip seccomp after a loud
//! warning on stderr and through `tracing`. Any other value, or none, keeps it on.
//!
//! # What a sandboxed service must know
//!
//! * glibc >= 2.34 creates threads with `clone3`, whose flags seccomp cannot read; policies answer
//!   it with `ENOSYS` (glibc then uses `clone`, pinned to `CLONE_THREAD`). A fork is killed.
//! * A panic with `RUST_BACKTRACE` set opens `/proc/self/maps` and the binary to symbolize, and is
//!   killed with `SIGSYS` instead of exiting 101: the supervisor must not pass `RUST_BACKTRACE`
//!   to services.
//! * `abort()` needs `getpid`, `gettid` and `tgkill(…, SIGABRT)`; they are allowed, so a crash
//!   injected as an abort shows as `SIGABRT`, not `SIGSYS`.
//! * Debug builds of std check with `fcntl(F_GETFD)` that an `OwnedFd` is open before closing it.
//!
//! # What is not (yet) done
//!
//! * **PID namespace.** `unshare(CLONE_NEWPID)` in `pre_exec` moves only the *children* of the
//!   exec'd service into the new namespace, not the service itself; putting the service in one
//!   needs `clone(CLONE_NEWPID)` in place of the fork `std::process::Command` does, and a PID 1
//!   in the namespace to reap. Services do not fork (their policies forbid it), so a PID
//!   namespace would buy little for that cost; skipped.
//! * **User ids.** Services run under the supervisor's uid. With every capability dropped a uid-0
//!   service still owns root-owned files by DAC; seccomp (no `open*`) is what keeps it off the
//!   filesystem. Per-service uids are future work.
//! * **Filesystem view.** [`Hardening::private_mounts`] gives a mount namespace whose changes do
//!   not propagate back; narrowing it to the service's state directory is for the supervisor.

mod harden;
pub mod policy;
#[cfg(target_arch = "x86_64")]
mod syscalls_x86_64;

use std::io;

pub use harden::{
    harden_child, move_fds_into_place, reserve_low_fds, Capability, Hardening, MAX_KEPT_FDS,
};
pub use policy::{CompiledPolicy, MismatchAction, Policy, Rule};

/// The environment variable whose value `off` disables seccomp in [`enter`] (development only).
pub const SANDBOX_ENV: &str = "DUPLEX_SANDBOX";

/// Errors of the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A policy file is malformed; names the file and line.
    #[error("{file}:{line}: {msg}")]
    Policy {
        /// The policy file, such as `common.policy`.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// No policy is shipped for this service.
    #[error("No seccomp policy for service `{0}` (policies: sandbox/policies/)")]
    UnknownService(String),
    /// A rule asked for by location does not exist.
    #[error("No rule at {file}:{line}")]
    NoSuchRule {
        /// The policy file.
        file: String,
        /// 1-based line number.
        line: usize,
    },
    /// Policies are written for x86_64 only.
    #[error("Seccomp policies exist for x86_64 only, not {0}")]
    UnsupportedArch(&'static str),
    /// `seccompiler` rejected the policy.
    #[error("Cannot compile seccomp policy `{policy}`")]
    Compile {
        /// The policy.
        policy: String,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// `PR_SET_NO_NEW_PRIVS` failed.
    #[error("Cannot set no_new_privs")]
    NoNewPrivs(#[source] io::Error),
    /// The kernel refused the filter.
    #[error("Cannot install seccomp policy `{policy}`")]
    Install {
        /// The policy.
        policy: String,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// A [`Hardening`] was asked to keep more fds than [`MAX_KEPT_FDS`].
    #[error("Cannot hand over {0} fds; at most {MAX_KEPT_FDS}")]
    TooManyFds(usize),
    /// A [`Hardening`] was asked to keep fd 0, 1, 2 or a negative one; stdio is set up by
    /// `Command` itself.
    #[error("Fd {0} cannot be handed over as a kept fd (must be 3 or more)")]
    BadFd(i32),
}

/// Confines the calling process with the seccomp policy of `service`: sets
/// `PR_SET_NO_NEW_PRIVS`, then installs the filter on every thread (TSYNC).
///
/// Call it in a service's `main` before it serves, once the fds the supervisor handed over
/// have been taken: from then on the process may only make the syscalls its policy lists, and anything else
/// kills it with `SIGSYS`. With `DUPLEX_SANDBOX=off` in the environment it only sets
/// `no_new_privs`, warns loudly and returns `Ok`.
pub fn enter(service: &str) -> Result<(), SandboxError> {
    let relaxed = match std::env::var_os(SANDBOX_ENV) {
        Some(v) if v == "off" => true,
        Some(v) if v.is_empty() || v == "on" => false,
        Some(v) => {
            tracing::warn!(
                "{SANDBOX_ENV}={v:?} is not `off` or `on`; the sandbox stays ON for {service}"
            );
            false
        }
        None => false,
    };
    if relaxed {
        if !Policy::services().any(|s| s == service) {
            return Err(SandboxError::UnknownService(service.to_owned()));
        }
        set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
        let msg = format!(
            "!!! {SANDBOX_ENV}=off: SECCOMP SANDBOX IS OFF for service `{service}` (pid {}). \
             Development only: this process can make any system call. !!!",
            std::process::id()
        );
        tracing::warn!("{msg}");
        eprintln!("{msg}");
        return Ok(());
    }
    let compiled = Policy::for_service(service)?.compile()?;
    compiled.install()?;
    tracing::info!(
        service,
        instructions = compiled.instructions(),
        "seccomp policy in force"
    );
    Ok(())
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`: from now on `execve` cannot grant privileges (setuid bits,
/// file capabilities), which also lets an unprivileged process install seccomp filters.
pub(crate) fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
