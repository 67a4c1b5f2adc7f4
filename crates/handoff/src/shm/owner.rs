//! Who holds the writer lock, and whether they still exist.
//!
//! The owner word packs the holder's pid (low 32 bits) with a *guard*
//! derived from the holder's start time (high 32 bits). A pid alone cannot
//! tell a dead owner from a live stranger: once the owner's zombie is
//! reaped the kernel may hand its pid to any new process, and `kill(pid, 0)`
//! then succeeds for the stranger. The start time of a pid changes when it
//! is reused, so comparing it catches that; a zombie (killed, not yet
//! reaped) still answers `kill(pid, 0)` too, so its `/proc` state is checked
//! as well.
//!
//! The guard is `0x8000_0000 | (start ticks & 0x7fff_ffff)`, so a known
//! start time always gives a non-zero guard. A guard of 0 means "start time
//! unknown" (a platform without `/proc`): such an owner is judged by
//! existence and zombie state only — the weaker, documented fallback. The
//! 31 bits of ticks wrap after about 248 days at 100 Hz; a pid would have to
//! be reused by a process started a whole multiple of that later to fool
//! the check.
//!
//! A word this encoding cannot produce — pid 0, a pid above `i32::MAX`
//! (negative as a `pid_t`), or a non-zero guard without its marker bit — is
//! *corrupt*. It is never turned into a pid to probe: `kill(0, …)` would
//! address our own process group and `kill(-1, …)` every process we may
//! signal. No live process can own a word no process could have written,
//! so a corrupt owner is recovered like a dead one.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

const GUARD_MARK: u32 = 0x8000_0000;

/// A lock owner: a process identified by pid and start-time guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerId {
    pid: u32,
    guard: u32,
}

/// What an owner word says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerState {
    /// Unlocked.
    Free,
    /// Locked by this owner (alive or not).
    Held(OwnerId),
    /// A value no owner can have written; carries the raw word.
    Corrupt(u64),
}

impl OwnerId {
    /// The identity `pid` has right now, or `None` if it does not exist.
    /// Where the platform cannot tell start times the guard is 0.
    pub fn of_process(pid: u32) -> Option<OwnerId> {
        if pid == 0 || pid > i32::MAX as u32 {
            return None;
        }
        match crate::procinfo::stat(pid) {
            Some(st) if !st.is_dead() => Some(OwnerId {
                pid,
                guard: guard_of(st.start_ticks),
            }),
            Some(_) => None,
            None if crate::procinfo::exists(pid) && !cfg!(target_os = "linux") => {
                Some(OwnerId { pid, guard: 0 })
            }
            None => None,
        }
    }

    /// Builds an identity from its parts. `None` for a pid that could
    /// never be probed safely, or a guard without its marker bit.
    pub fn from_parts(pid: u32, guard: u32) -> Option<OwnerId> {
        let id = OwnerId { pid, guard };
        match OwnerState::decode(id.word()) {
            OwnerState::Held(id) => Some(id),
            _ => None,
        }
    }

    /// The owner's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The start-time guard (0 = start time unknown).
    pub fn guard(&self) -> u32 {
        self.guard
    }

    /// The owner word for this identity.
    pub fn word(&self) -> u64 {
        (u64::from(self.guard) << 32) | u64::from(self.pid)
    }
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.guard == 0 {
            write!(f, "pid {}", self.pid)
        } else {
            write!(
                f,
                "pid {} (start tick {})",
                self.pid,
                self.guard & !GUARD_MARK
            )
        }
    }
}

impl OwnerState {
    /// Decodes an owner word, rejecting values no owner can have written.
    pub fn decode(word: u64) -> OwnerState {
        if word == 0 {
            return OwnerState::Free;
        }
        let pid = word as u32;
        let guard = (word >> 32) as u32;
        let pid_ok = pid != 0 && pid <= i32::MAX as u32;
        let guard_ok = guard == 0 || guard & GUARD_MARK != 0;
        if pid_ok && guard_ok {
            OwnerState::Held(OwnerId { pid, guard })
        } else {
            OwnerState::Corrupt(word)
        }
    }
}

impl fmt::Display for OwnerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OwnerState::Free => f.write_str("free"),
            OwnerState::Held(id) => write!(f, "held by {id}"),
            OwnerState::Corrupt(w) => write!(f, "corrupt owner word {w:#018x}"),
        }
    }
}

fn guard_of(start_ticks: u64) -> u32 {
    GUARD_MARK | (start_ticks as u32 & !GUARD_MARK)
}

/// Why an owner was judged gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// No process has the pid.
    Gone,
    /// The pid is a zombie: exited, not yet reaped.
    Zombie,
    /// The pid belongs to a process with a different start time: reused.
    PidReused,
    /// The word was corrupt (see the module docs).
    Corrupt,
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeadReason::Gone => "process gone",
            DeadReason::Zombie => "process exited (zombie)",
            DeadReason::PidReused => "pid reused by another process",
            DeadReason::Corrupt => "corrupt owner word",
        })
    }
}

/// Probe result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead(DeadReason),
}

/// Whether the owner recorded in `id` still exists as the same process.
///
/// Conservative where it cannot tell: an existing pid whose start time
/// cannot be read is taken as alive (a live holder must never be broken;
/// the cost of the error is waiting, never two writers).
pub fn probe(id: OwnerId) -> Liveness {
    // `id.pid` is in 1..=i32::MAX by construction (see `OwnerState::decode`),
    // so `exists` can only ever address that single process.
    if !crate::procinfo::exists(id.pid) {
        return Liveness::Dead(DeadReason::Gone);
    }
    match crate::procinfo::stat(id.pid) {
        Some(st) if st.is_dead() => Liveness::Dead(DeadReason::Zombie),
        Some(st) if id.guard != 0 && guard_of(st.start_ticks) != id.guard => {
            Liveness::Dead(DeadReason::PidReused)
        }
        Some(_) => Liveness::Alive,
        // Existed a moment ago, no stat now: it may just have exited.
        None if !crate::procinfo::exists(id.pid) => Liveness::Dead(DeadReason::Gone),
        None => Liveness::Alive,
    }
}

/// This process's identity, cached per pid.
///
/// The cache is keyed by the pid it was computed for and `getpid()` is
/// called on every use, so a forked child — which inherits the cache but
/// has a different pid — computes its own identity instead of stamping the
/// lock with its parent's. (A child's pid always differs from the cached
/// one: the parent, whose identity is cached, is alive at the fork.)
pub fn current() -> OwnerId {
    static CACHE: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let cached = CACHE.load(Ordering::Relaxed);
    if cached != 0 && cached as u32 == pid {
        if let OwnerState::Held(id) = OwnerState::decode(cached) {
            return id;
        }
    }
    let id = OwnerId::of_process(pid).unwrap_or(OwnerId { pid, guard: 0 });
    CACHE.store(id.word(), Ordering::Relaxed);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rejects_words_that_would_address_groups() {
        assert_eq!(OwnerState::decode(0), OwnerState::Free);
        for w in [
            // pid 0 (our process group) with a plausible guard
            (u64::from(GUARD_MARK | 5) << 32),
            // pid -1 (every process)
            u64::from(u32::MAX),
            // negative pids
            0x8000_0000,
            (u64::from(GUARD_MARK) << 32) | 0xFFFF_FFFE,
            // guard without its marker bit
            (5u64 << 32) | 1234,
        ] {
            assert_eq!(OwnerState::decode(w), OwnerState::Corrupt(w), "{w:#x}");
        }
        let id = OwnerId::from_parts(i32::MAX as u32, GUARD_MARK | 1).unwrap();
        assert_eq!(OwnerState::decode(id.word()), OwnerState::Held(id));
        assert!(OwnerId::from_parts(0, 0).is_none());
        assert!(OwnerId::from_parts(1 << 31, 0).is_none());
        assert!(OwnerId::from_parts(7, 3).is_none());
        assert_eq!(
            OwnerState::decode(OwnerId::from_parts(7, 0).unwrap().word()),
            OwnerState::Held(OwnerId { pid: 7, guard: 0 })
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn self_is_alive_and_a_wrong_guard_is_a_reused_pid() {
        let me = current();
        assert_eq!(me.pid(), std::process::id());
        assert_ne!(me.guard(), 0);
        assert_eq!(current(), me);
        assert_eq!(OwnerId::of_process(me.pid()), Some(me));
        assert_eq!(probe(me), Liveness::Alive);
        let other = OwnerId::from_parts(me.pid(), me.guard() ^ 1).unwrap();
        assert_eq!(probe(other), Liveness::Dead(DeadReason::PidReused));
        // Unknown start time: existence only.
        let weak = OwnerId::from_parts(me.pid(), 0).unwrap();
        assert_eq!(probe(weak), Liveness::Alive);
    }
}
