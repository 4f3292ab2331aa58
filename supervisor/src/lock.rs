//! One duplexd per state directory: an exclusive `flock` on `STATE_DIR/duplexd.lock`, held for the
//! life of the process (the kernel drops it when the process dies, however it dies).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Errors taking the state directory.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The directory or lock file could not be created or opened.
    #[error("cannot use state directory {dir}: {source}")]
    Io {
        /// The state directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Another duplexd holds it.
    #[error("another duplexd{pid} is running on state directory {dir}")]
    Busy {
        /// The state directory.
        dir: PathBuf,
        /// " (pid N)" if the holder wrote its pid.
        pid: String,
    },
}

/// The held lock. Dropping it releases the directory.
#[derive(Debug)]
pub struct StateLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl StateLock {
    /// Creates `dir` if needed and locks it, writing our pid into the lock file.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("duplexd.lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let pid = text
                    .trim()
                    .parse::<u32>()
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default();
                return Err(LockError::Busy {
                    dir: dir.to_owned(),
                    pid,
                });
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        lock.set_len(0).map_err(io)?;
        lock.rewind().map_err(io)?;
        writeln!(lock, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _lock: lock, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
