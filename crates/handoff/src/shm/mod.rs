//! A shared-memory state region that survives a writer killed mid-write
//! (docs/design.md §8.3).
//!
//! A [`Region`] is a small file in the state dir, mapped `MAP_SHARED` by
//! every process that opens it — the incumbent, its successor, the
//! supervisor's `status` — so hot state and counters pass from one build to
//! the next without a serialisation round trip, and outlive any one of
//! them.
//!
//! # Concurrency: a seqlock with a robust writer lock
//!
//! * **Readers** never block writers and never write the region on the
//!   fast path: they copy the payload word by word with atomic loads
//!   between two reads of a sequence number and retry if it changed or was
//!   odd (a write in progress). See [`Region::read`].
//! * **Writers** take a lock whose word holds the owner's identity — pid
//!   plus a start-time guard — stamped by a compare-and-swap on every
//!   acquire (the identity is re-derived from `getpid()` each time, so a
//!   forked child never stamps its parent's). See [`Region::lock`].
//! * **A dead writer cannot wedge anyone.** A waiter that spins past a
//!   bound probes the owner (`kill(pid, 0)`, then `/proc` for zombie state
//!   and start time, so neither a zombie nor a stranger that inherited the
//!   pid passes for the owner — see `owner`). If the owner is dead it
//!   *recovers* the lock: it stamps its own identity over the dead owner's
//!   with a CAS (exactly one waiter wins), forces the sequence even, then
//!   releases. A recoverer killed in the middle of that has left its own
//!   identity in the word, so the next waiter recovers it in turn. Readers
//!   stuck on an odd sequence run the same probe and recovery.
//! * **Panics release.** The [`WriteGuard`] restores sequence parity and
//!   releases the lock when dropped, including during unwinding.
//! * **Corrupt owner words** (pid 0, negative, out of range) are never
//!   probed — `kill` would address a process group or every process — and
//!   are recovered like dead owners.
//!
//! # The accepted limit, and its remedy
//!
//! Recovery restores *liveness*, not *consistency*: a writer killed
//! half-way through an update leaves a half-written record, and once the
//! sequence is forced even a plain seqlock reader would accept it. So every
//! record carries a crc32c, recomputed by the writer as the last step of
//! each write (when the guard drops). A reader that gets a stable sequence
//! but a checksum mismatch returns [`ShmError::TornRecord`] instead of the
//! data, and keeps doing so until some writer completes a full write; a
//! writer can tell with [`WriteGuard::is_consistent`] and rewrite the whole
//! record. A panic mid-write deliberately leaves the checksum stale too: an
//! update that did not finish is torn whether its writer died or unwound.
//! (A crc32c lets a torn record through with probability 2⁻³².)
//!
//! # Other limits
//!
//! * All processes sharing a region must be in the same pid namespace and
//!   see the same `/proc`; owner identities are pids.
//! * The lock is process-robust, not re-entrant: a thread that locks twice,
//!   or leaks a guard with `mem::forget`, or `exec`s while holding one (the
//!   new image has the same pid and start time), waits on itself forever.
//! * On platforms without `/proc` the start-time guard is unavailable and
//!   the probe falls back to existence only (a reused pid then reads as
//!   alive: a wait, never a broken lock).
//! * The region file must never be truncated while mapped (that is a
//!   `SIGBUS` in every process using it); this crate never does.

mod error;
mod file;
mod guard;
mod hooks;
mod mapped;
// The on-disk layout is public to the crate's tests (which corrupt
// regions at its offsets), private otherwise.
#[cfg(feature = "shm-test-hooks")]
pub mod layout;
#[cfg(not(feature = "shm-test-hooks"))]
mod layout;
mod owner;
mod seqlock;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use error::ShmError;
pub use file::RegionSpec;
pub use guard::WriteGuard;
pub use owner::{OwnerId, OwnerState};

use crate::sys::shm::SharedMap;
use mapped::{Cells, Mapped};

/// The lock and sequence as they are right now (diagnostics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockState {
    /// The writer lock's owner word: free, or who holds it.
    pub owner: OwnerState,
    /// Even when no write is in progress.
    pub seq: u64,
    /// Dead (or corrupt) owners recovered since the file was created.
    pub recoveries: u64,
    /// The owner word of the last one recovered.
    pub last_recovered: OwnerState,
}

/// A mapped shared region. `Send + Sync`: threads may share one mapping.
#[derive(Debug)]
pub struct Region {
    m: Mapped,
    schema: u64,
}

impl Region {
    /// Opens region `name` in `dir`, creating it (zero-filled) if it does
    /// not exist. Safe against another process creating it concurrently:
    /// both end up mapping the same file.
    pub fn open_or_create(dir: &Path, name: &str, spec: RegionSpec) -> Result<Region, ShmError> {
        check_spec(spec)?;
        let path = file::region_path(dir, name)?;
        let (file, st) = file::open_or_create(&path, spec)?;
        Region::map(file, path, st)
    }

    /// Opens an existing region; [`ShmError::NotFound`] if there is none.
    /// With `spec`, its payload size and schema must match.
    pub fn open(dir: &Path, name: &str, spec: Option<RegionSpec>) -> Result<Region, ShmError> {
        if let Some(spec) = spec {
            check_spec(spec)?;
        }
        let path = file::region_path(dir, name)?;
        match file::open_existing(&path, spec)? {
            Some((file, st)) => Region::map(file, path, st),
            None => Err(ShmError::NotFound { path }),
        }
    }

    fn map(file: std::fs::File, path: PathBuf, st: layout::Static) -> Result<Region, ShmError> {
        let payload_len = st.payload_len as usize;
        let map = SharedMap::map(&file, layout::file_len(payload_len)).map_err(|source| {
            ShmError::Io {
                op: "mmap",
                path: path.clone(),
                source,
            }
        })?;
        // The descriptor is not needed once mapped: the mapping keeps the
        // file alive, and holding no fd means nothing to leak into children.
        drop(file);
        Ok(Region {
            m: Mapped {
                map,
                path,
                payload_len,
            },
            schema: st.schema,
        })
    }

    /// The region file.
    pub fn path(&self) -> &Path {
        &self.m.path
    }

    /// The payload size in bytes, as recorded in the file's header.
    pub fn payload_len(&self) -> usize {
        self.m.payload_len
    }

    /// The schema tag recorded in the file's header.
    pub fn schema(&self) -> u64 {
        self.schema
    }

    /// Copies a consistent snapshot of the payload into `buf` (exactly
    /// [`payload_len`](Self::payload_len) bytes) and returns its sequence
    /// number. Waits, without limit, while a *live* writer is mid-write; a
    /// dead one is recovered. [`ShmError::TornRecord`] if the record is the
    /// remains of a write that never finished.
    pub fn read(&self, buf: &mut [u8]) -> Result<u64, ShmError> {
        seqlock::read(&self.m, buf, None)
    }

    /// [`read`](Self::read), giving up with [`ShmError::Busy`] after
    /// `budget` if a live writer keeps a write in progress that long.
    pub fn read_within(&self, buf: &mut [u8], budget: Duration) -> Result<u64, ShmError> {
        seqlock::read(&self.m, buf, Some(deadline(budget)))
    }

    /// Takes the writer lock, waiting without limit while a live process
    /// holds it; a dead holder's lock is recovered.
    pub fn lock(&self) -> WriteGuard<'_> {
        loop {
            // Without a deadline the wait only ends by acquiring.
            if let Ok(g) = seqlock::lock(&self.m, None) {
                return g;
            }
        }
    }

    /// [`lock`](Self::lock), giving up with [`ShmError::Busy`] (naming the
    /// holder) after `budget`. A live holder is never broken.
    pub fn lock_within(&self, budget: Duration) -> Result<WriteGuard<'_>, ShmError> {
        seqlock::lock(&self.m, Some(deadline(budget))).map_err(|b| self.m.busy("the write lock", b))
    }

    /// The lock word, sequence and recovery count right now.
    pub fn lock_state(&self) -> LockState {
        let c = self.cells();
        use std::sync::atomic::Ordering::Acquire;
        LockState {
            owner: OwnerState::decode(c.owner.load(Acquire)),
            seq: c.seq.load(Acquire),
            recoveries: c.recoveries.load(Acquire),
            last_recovered: OwnerState::decode(c.last_recovered.load(Acquire)),
        }
    }

    pub(crate) fn cells(&self) -> Cells<'_> {
        self.m.cells()
    }
}

fn deadline(budget: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(budget)
        .unwrap_or(now + Duration::from_secs(86_400 * 365))
}

fn check_spec(spec: RegionSpec) -> Result<(), ShmError> {
    if spec.payload_len == 0 || spec.payload_len > layout::MAX_PAYLOAD {
        return Err(ShmError::PayloadSize {
            requested: spec.payload_len,
            max: layout::MAX_PAYLOAD,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
