//! The state lock: an exclusive lock on `<state_dir>/handoff.lock` that the
//! kernel releases when its holder dies.
//!
//! It is an `flock(2)` lock (std's [`File::try_lock`]): it belongs to the open
//! file description, so it is released when the last descriptor for it is
//! closed — including by process death — and it is not shared with a child
//! across exec because the descriptor is close-on-exec. A crashed incumbent
//! therefore never leaves a stale lock behind, which is what lets the
//! successor, or the incumbent resuming after an abort, take it without any
//! "is the owner still alive?" guesswork.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// File name of the state lock inside the state dir.
pub(crate) const LOCK_FILE: &str = "handoff.lock";

/// Errors taking the state lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file could not be opened or created (a missing state dir,
    /// no permission, no space).
    #[error("cannot open state lock {path}: {source}")]
    Open {
        /// The lock file, `<state_dir>/handoff.lock`.
        path: PathBuf,
        /// The error from opening it.
        source: io::Error,
    },
    /// Another process held the lock for the whole wait: another instance
    /// using the same state dir, or a previous holder that has not let go
    /// yet. `fuser` on the path names the holder.
    #[error("state lock {path} is held by another process (last holder recorded: {holder}) and was not released within {waited_ms} ms")]
    Busy {
        /// The lock file, `<state_dir>/handoff.lock`.
        path: PathBuf,
        /// What the lock file records about its last holder (`pid N`), or
        /// `unknown` when it records nothing.
        holder: String,
        /// Milliseconds waited before giving up.
        waited_ms: u64,
    },
    /// `flock(2)` itself failed, for a reason other than the lock being
    /// held.
    #[error("locking {path}: {source}")]
    Lock {
        /// The lock file, `<state_dir>/handoff.lock`.
        path: PathBuf,
        /// The error from `flock`.
        source: io::Error,
    },
    /// The lock file is a symlink or another user's (see
    /// [`crate::private_fs`]): whoever can open it can take the lock.
    #[error("state lock: {0}")]
    Unsafe(#[from] crate::private_fs::PrivateError),
}

/// A held state lock. Dropping it releases the lock.
#[derive(Debug)]
pub struct StateLock {
    file: File,
    path: PathBuf,
}

impl StateLock {
    /// File name of the state lock inside the state dir (`handoff.lock`):
    /// what an operator looks for with `fuser` when an upgrade waits for
    /// the lock.
    pub const FILE_NAME: &'static str = LOCK_FILE;

    /// Takes the lock if it is free right now.
    ///
    /// The file is created 0600 and never opened through a symlink
    /// ([`crate::private_fs`]): `flock` needs only a read-only descriptor,
    /// so a file another user can open is a lock another user can take.
    /// The state dir is checked first, as `handoff run` checks it (a
    /// service started without `handoff run` gets the same refusal): a
    /// directory another user can write, or one with such a directory
    /// above it, lets them replace the lock file itself.
    pub fn try_acquire(state_dir: &Path) -> Result<Option<StateLock>, LockError> {
        Self::take(state_dir, true)
    }

    /// [`try_acquire`](Self::try_acquire); `record` writes this process's
    /// pid into the file as the holder (diagnostics for a later `Busy`).
    fn take(state_dir: &Path, record: bool) -> Result<Option<StateLock>, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let file = crate::private_fs::check_dir(state_dir)
            .and_then(|()| {
                crate::private_fs::open_file(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false),
                    &path,
                )
            })
            .map_err(|e| match e {
                crate::private_fs::PrivateError::Io { source, .. } => LockError::Open {
                    path: path.clone(),
                    source,
                },
                other => LockError::Unsafe(other),
            })?;
        match file.try_lock() {
            Ok(()) => {
                let mut lock = StateLock { file, path };
                // Diagnostics only: who holds it. Failure to record is not a
                // reason to give the lock up.
                if record {
                    let _ = lock.record_holder();
                }
                Ok(Some(lock))
            }
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(source)) => Err(LockError::Lock { path, source }),
        }
    }

    /// Polls for the lock until `budget` runs out. Used where the previous
    /// holder is expected to release it momentarily (after SealComplete, or
    /// after the supervisor killed an aborted successor).
    pub fn acquire_within(state_dir: &Path, budget: Duration) -> Result<StateLock, LockError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(l) = Self::try_acquire(state_dir)? {
                return Ok(l);
            }
            if start.elapsed() >= budget {
                let path = state_dir.join(LOCK_FILE);
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "unknown".into());
                return Err(LockError::Busy {
                    path,
                    holder,
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Whether some process holds the lock right now (probes by trying it,
    /// for an instant). The probe leaves the recorded holder alone: it is
    /// not one, and a later "held by pid N" must name the real holder.
    pub fn is_held(state_dir: &Path) -> Result<bool, LockError> {
        Ok(Self::take(state_dir, false)?.is_none())
    }

    fn record_holder(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        writeln!(self.file, "pid {}", std::process::id())
    }

    /// The lock file this lock is held on, `<state_dir>/handoff.lock`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Probing whether the lock is held does not make the prober the
    /// recorded holder: a later `Busy` names the process that took it.
    #[test]
    fn probing_leaves_the_recorded_holder_alone() {
        let dir = tempfile::tempdir().unwrap();
        drop(StateLock::try_acquire(dir.path()).unwrap().unwrap());
        std::fs::write(dir.path().join(LOCK_FILE), "pid 4242\n").unwrap();
        assert!(!StateLock::is_held(dir.path()).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap(),
            "pid 4242\n"
        );
    }

    /// A service started without `handoff run` (no supervisor to check its
    /// dirs) is refused a state dir others could replace, as `handoff run`
    /// refuses it: the lock file is not even created.
    #[test]
    fn refuses_a_state_dir_others_may_write() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let state = root.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = StateLock::try_acquire(&state).unwrap_err();
        assert!(matches!(e, LockError::Unsafe(_)), "{e}");
        assert!(e.to_string().contains("mode 0777"), "{e}");
        assert!(!state.join(LOCK_FILE).exists());
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = StateLock::try_acquire(&state).unwrap_err();
        assert!(e.to_string().contains("without the sticky bit"), "{e}");
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(StateLock::try_acquire(&state).unwrap().is_some());
    }

    #[test]
    fn exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateLock::try_acquire(dir.path()).unwrap().unwrap();
        assert!(StateLock::try_acquire(dir.path()).unwrap().is_none());
        let e = StateLock::acquire_within(dir.path(), Duration::from_millis(30)).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(a);
        assert!(StateLock::try_acquire(dir.path()).unwrap().is_some());
    }
}
