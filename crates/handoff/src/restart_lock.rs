//! The restart lock (docs/design.md §8.2): serialises upgrade requests from separate
//! processes — two supervisors started for the same service (`handoff run`
//! holds it for its whole life; `handoff upgrade` requests meet the
//! supervisor's single handoff slot instead) — so two restarts never
//! overlap.
//!
//! It is an `flock(2)` lock on `<dir>/handoff-restart.lock`. Like the state
//! lock it belongs to the open file description, so the kernel releases it
//! when the holder dies, however it dies: there is never a stale lock to
//! judge, and therefore never a reason to *break* one. Breaking a lock
//! because its holder "looks stuck" is exactly how two restarts end up
//! running at once, so a waiter whose budget runs out gives up with
//! [`RestartLockError::Busy`], naming the holder, and the holder keeps it.
//!
//! The holder records itself in the file — pid, start time, when it took
//! the lock, and a random token — so the waiter's error can say who is in
//! the way, and the holder can log its token to tie the two together. The
//! record is diagnostics only: the flock alone decides who holds the lock,
//! and a record whose process is gone (left by a dead holder, or not yet
//! overwritten by a brand-new one) is reported as such, not trusted.
//!
//! The file is never removed: unlinking a lock file lets a newcomer lock a
//! fresh inode while the old holder still holds the old one.

use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// File name of the restart lock inside its directory.
pub const RESTART_LOCK_FILE: &str = "handoff-restart.lock";

/// The holder record is written as one fixed-size block at offset 0, so a
/// new record always covers an old one completely.
const RECORD_LEN: usize = 512;
const NOTE_MAX: usize = 200;

/// Who holds (or last held) the restart lock, as recorded by the holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Pid of the process that took the lock.
    pub pid: u32,
    /// Process start time, ms since the epoch (for humans).
    pub start_time_ms: Option<u64>,
    /// Process start time in clock ticks since boot (for the liveness
    /// check: immune to `btime` jitter).
    pub start_ticks: Option<u64>,
    /// When the lock was taken, ms since the epoch.
    pub acquired_at_ms: u64,
    /// 128 random bits, hex: identifies this holding in logs.
    pub token: String,
    /// What the holder is doing (free text, may be empty).
    #[serde(default)]
    pub note: String,
}

impl Holder {
    /// Whether the recorded process still runs (same pid *and* start time,
    /// not a zombie), i.e. whether this record can describe the current
    /// holder at all.
    pub fn is_alive(&self) -> bool {
        if !crate::procinfo::exists(self.pid) {
            return false;
        }
        match (crate::procinfo::stat(self.pid), self.start_ticks) {
            (Some(st), _) if st.is_dead() => false,
            (Some(st), Some(t)) => st.start_ticks == t,
            _ => true,
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let age = crate::journal::now_ms().saturating_sub(self.acquired_at_ms);
        write!(
            f,
            "pid {} since {} ({}.{:03} s ago), token {}",
            self.pid,
            fmt_utc(self.acquired_at_ms),
            age / 1000,
            age % 1000,
            self.token
        )?;
        if !self.note.is_empty() {
            write!(f, " ({})", self.note)?;
        }
        Ok(())
    }
}

/// Errors taking the restart lock.
#[derive(Debug, thiserror::Error)]
pub enum RestartLockError {
    /// The lock file could not be opened or created (a missing or
    /// unwritable dir).
    #[error("cannot open restart lock {path}: {source}")]
    Open {
        /// The lock file's path.
        path: PathBuf,
        /// The error from opening it.
        source: io::Error,
    },
    /// `flock` failed for another reason than contention; or, in
    /// [`RestartLock::reclaim`], the descriptor carried across `exec` is
    /// not this lock file, does not hold the lock, or the record does not
    /// name this process.
    #[error("locking restart lock {path}: {source}")]
    Lock {
        /// The lock file's path.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The lock file is a symlink or another user's (see
    /// [`crate::private_fs`]): whoever can open it can take the lock.
    #[error("restart lock: {0}")]
    Unsafe(#[from] crate::private_fs::PrivateError),
    /// Another live process holds the lock; it was not broken.
    #[error("restart lock {path} is held by {}; gave up after {waited_ms} ms (a live holder's lock is never broken)", describe(.holder))]
    Busy {
        /// The lock file's path.
        path: PathBuf,
        /// The holder, if its record names a live process (boxed: keeps
        /// the error small on the happy path's `Result`).
        holder: Option<Box<Holder>>,
        /// How long the waiter waited, in ms (at least its budget).
        waited_ms: u64,
    },
}

fn describe(holder: &Option<Box<Holder>>) -> String {
    match holder {
        Some(h) => h.to_string(),
        None => "a process that has not recorded itself yet".into(),
    }
}

/// A held restart lock. Dropping it releases the lock.
#[derive(Debug)]
pub struct RestartLock {
    file: File,
    path: PathBuf,
    holder: Holder,
}

/// The lock file as this process holds it open: what a supervisor
/// re-executing itself in place keeps across `exec` and
/// [reclaims](RestartLock::reclaim) on the other side.
impl std::os::fd::AsFd for RestartLock {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl RestartLock {
    /// Takes the lock, waiting up to `budget` for the current holder to
    /// finish. On timeout the error names the holder.
    pub fn acquire(dir: &Path, budget: Duration) -> Result<RestartLock, RestartLockError> {
        Self::acquire_with_note(dir, budget, "")
    }

    /// [`acquire`](Self::acquire), recording `note` (what we are about to
    /// do, e.g. "upgrade to build 42") for waiters' errors.
    pub fn acquire_with_note(
        dir: &Path,
        budget: Duration,
        note: &str,
    ) -> Result<RestartLock, RestartLockError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(l) = Self::try_acquire(dir, note)? {
                return Ok(l);
            }
            let waited = start.elapsed();
            if waited >= budget {
                let path = dir.join(RESTART_LOCK_FILE);
                let holder = read_record(&path).filter(Holder::is_alive).map(Box::new);
                return Err(RestartLockError::Busy {
                    path,
                    holder,
                    waited_ms: waited.as_millis() as u64,
                });
            }
            // Poll interval of a budget-bounded wait: flock has no timed
            // blocking form, and the holder may be another process.
            std::thread::park_timeout(pause.min(budget - waited));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Takes back the lock this process held before it re-executed itself
    /// in place: `fd` is the lock file as the previous program had it open
    /// (kept across `exec`), still holding the lock. It is checked to be
    /// `dir`'s lock file and to hold the lock (a `flock` belongs to the open
    /// file, so taking it again through the same file succeeds, and
    /// through another would not); the holder record keeps naming us (the
    /// pid is the same).
    pub fn reclaim(dir: &Path, fd: std::os::fd::OwnedFd) -> Result<RestartLock, RestartLockError> {
        use std::os::unix::fs::MetadataExt;
        let path = dir.join(RESTART_LOCK_FILE);
        let file = File::from(fd);
        let lock_err = |source| RestartLockError::Lock {
            path: path.clone(),
            source,
        };
        let carried = file.metadata().map_err(lock_err)?;
        let on_disk = std::fs::symlink_metadata(&path).map_err(lock_err)?;
        if (carried.dev(), carried.ino()) != (on_disk.dev(), on_disk.ino()) {
            return Err(lock_err(io::Error::other(
                "the descriptor carried across exec is not this lock file",
            )));
        }
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(lock_err(io::Error::other(
                    "the descriptor carried across exec does not hold the lock",
                )))
            }
            Err(TryLockError::Error(e)) => return Err(lock_err(e)),
        }
        let pid = std::process::id();
        let holder = read_record(&path)
            .filter(|h| h.pid == pid)
            .ok_or_else(|| lock_err(io::Error::other("the lock's record does not name this process")))?;
        Ok(RestartLock { file, path, holder })
    }

    /// Takes the lock if it is free right now.
    pub fn try_acquire(dir: &Path, note: &str) -> Result<Option<RestartLock>, RestartLockError> {
        let path = dir.join(RESTART_LOCK_FILE);
        let file = open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(source)) => {
                return Err(RestartLockError::Lock { path, source })
            }
        }
        let pid = std::process::id();
        let mut note = note.to_string();
        if note.len() > NOTE_MAX {
            let mut cut = NOTE_MAX;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let holder = Holder {
            pid,
            start_time_ms: crate::procinfo::start_time_ms(pid),
            start_ticks: crate::procinfo::stat(pid).map(|s| s.start_ticks),
            acquired_at_ms: crate::journal::now_ms(),
            token: token(),
            note,
        };
        if let Err(e) = write_record(&file, &holder) {
            // Diagnostics only: waiters will say the holder is unrecorded.
            tracing::warn!(target: "handoff::restart_lock", path = %path.display(), error = %e,
                "could not record the restart lock holder");
        }
        Ok(Some(RestartLock { file, path, holder }))
    }

    /// Whether some process holds the lock right now. (Probes by trying
    /// it, so it can make a concurrent zero-budget `acquire` fail.)
    pub fn is_held(dir: &Path) -> Result<bool, RestartLockError> {
        let path = dir.join(RESTART_LOCK_FILE);
        let file = open(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(false),
            Err(TryLockError::WouldBlock) => Ok(true),
            Err(TryLockError::Error(source)) => Err(RestartLockError::Lock { path, source }),
        }
    }

    /// The last record written in `dir`'s lock file, alive or not (see
    /// [`Holder::is_alive`]); `None` if there is none or it is unreadable.
    pub fn recorded_holder(dir: &Path) -> Option<Holder> {
        read_record(&dir.join(RESTART_LOCK_FILE))
    }

    /// This holding's token, for logs.
    pub fn token(&self) -> &str {
        &self.holder.token
    }

    /// The record this process wrote when it took the lock.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RestartLock {
    fn drop(&mut self) {
        // Closing the descriptor releases the flock; unlock explicitly too
        // in case a forked child still shares the open file description.
        let _ = self.file.unlock();
    }
}

/// Opens (creating 0600, never through a symlink) the lock file: `flock`
/// needs only a read-only descriptor, so a file another user could open
/// would be a lock another user could hold to keep `handoff run` from
/// starting.
fn open(path: &Path) -> Result<File, RestartLockError> {
    crate::private_fs::open_file(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
        path,
    )
    .map_err(|e| match e {
        crate::private_fs::PrivateError::Io { source, .. } => RestartLockError::Open {
            path: path.to_path_buf(),
            source,
        },
        other => RestartLockError::Unsafe(other),
    })
}

fn write_record(file: &File, holder: &Holder) -> io::Result<()> {
    let mut rec = serde_json::to_vec(holder).map_err(io::Error::other)?;
    if rec.len() >= RECORD_LEN {
        return Err(io::Error::other("holder record too long"));
    }
    rec.resize(RECORD_LEN - 1, b' ');
    rec.push(b'\n');
    file.write_all_at(&rec, 0)?;
    file.set_len(RECORD_LEN as u64)
}

fn read_record(path: &Path) -> Option<Holder> {
    // A read racing the holder's write may see a mix; retry a few times.
    for _ in 0..3 {
        let mut s = String::new();
        File::open(path).ok()?.read_to_string(&mut s).ok()?;
        let s = s.trim();
        if s.is_empty() {
            return None;
        }
        if let Ok(h) = serde_json::from_str(s) {
            return Some(h);
        }
        std::thread::yield_now();
    }
    None
}

/// 128 random bits as hex, from the kernel's generator; if that cannot be
/// read, from std's per-process random hash keys (it only needs to be
/// unique, not secret).
fn token() -> String {
    let mut b = [0u8; 16];
    let ok = File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        use std::hash::{BuildHasher, Hasher};
        for (i, chunk) in b.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(crate::journal::now_ms() ^ u64::from(std::process::id()) ^ i as u64);
            chunk.copy_from_slice(&h.finish().to_ne_bytes());
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `ms` since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (civil-from-days,
/// H. Hinnant).
fn fmt_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_names_the_holder_and_releases_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let a = RestartLock::acquire_with_note(dir.path(), Duration::ZERO, "upgrade 1").unwrap();
        assert_eq!(a.token().len(), 32);
        assert!(RestartLock::is_held(dir.path()).unwrap());
        // Another open file description, even in this process, conflicts.
        assert!(RestartLock::try_acquire(dir.path(), "").unwrap().is_none());
        let e = RestartLock::acquire(dir.path(), Duration::from_millis(30)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains(a.token()), "{msg}");
        assert!(msg.contains("upgrade 1"), "{msg}");
        match e {
            RestartLockError::Busy {
                holder, waited_ms, ..
            } => {
                assert_eq!(holder.as_deref(), Some(a.holder()));
                assert!(waited_ms >= 30);
            }
            other => panic!("{other}"),
        }
        let recorded = RestartLock::recorded_holder(dir.path()).unwrap();
        assert!(recorded.is_alive());
        let token = a.token().to_string();
        drop(a);
        assert!(!RestartLock::is_held(dir.path()).unwrap());
        let b = RestartLock::acquire(dir.path(), Duration::ZERO).unwrap();
        assert_ne!(b.token(), token);
    }

    #[test]
    fn a_record_from_a_reused_pid_is_not_alive() {
        let mut h = Holder {
            pid: std::process::id(),
            start_time_ms: None,
            start_ticks: crate::procinfo::stat(std::process::id()).map(|s| s.start_ticks),
            acquired_at_ms: 0,
            token: "t".into(),
            note: String::new(),
        };
        assert!(h.is_alive());
        if let Some(t) = h.start_ticks.as_mut() {
            *t += 1;
            assert!(!h.is_alive());
        }
        h.pid = 0;
        assert!(!h.is_alive());
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(fmt_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(fmt_utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(fmt_utc(1_795_000_000_000), "2026-11-18T11:06:40.000Z");
    }
}
