//! The read path, the lock path, and recovery of a dead owner's lock.
//!
//! Memory ordering follows the seqlock of Boehm, "Can seqlocks get along
//! with programming language memory models?" (MSPC 2012), as crossbeam
//! implements it:
//!
//! * writer: `seq = odd` (relaxed), **release fence**, payload and crc
//!   stores (relaxed), `seq = even` (**release**);
//! * reader: `s1 = seq` (**acquire**), payload and crc loads (relaxed),
//!   **acquire fence**, `s2 = seq` (relaxed); accept iff `s1 == s2` and even.
//!
//! If a reader's relaxed load sees any store of a write, the writer's
//! release fence synchronises with the reader's acquire fence, so the odd
//! store happens-before the load of `s2`, and `s2 != s1`. If `s1` is the
//! even value a write ended with, its release store makes all of that
//! write's data visible. Every access is atomic, so there is no data race
//! anywhere — the property Rust requires, and the one a `memcpy` of shared
//! memory would lack.
//!
//! The lock word is only ever changed by CAS: `0 → me` to acquire,
//! `me → 0` to release, `dead → me` to recover. Sequence parity is only
//! changed by the lock holder (a writer, or a recoverer, which holds the
//! lock for the duration of its recovery), so "odd while the lock is held
//! by a dead process" is the only way a sequence can stay odd — and
//! recovery is the only way out of it.

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use super::guard::{self, WriteGuard};
use super::mapped::{Cells, Mapped, TimedOut};
use super::owner::{self, DeadReason, Liveness, OwnerId, OwnerState};
use super::{hooks, ShmError};

/// Spin iterations before yielding.
const SPINS: u32 = 64;
/// Yields (after the spins) before the first owner probe.
const YIELDS: u32 = 16;
/// First and longest sleep between probes once the owner is known alive.
const MIN_NAP: Duration = Duration::from_micros(20);
const MAX_NAP: Duration = Duration::from_millis(1);

/// Bounded spinning, then yielding, then exponentially longer naps (capped
/// at 1 ms) with an owner probe before each — so a dead owner is noticed
/// within about a millisecond of dying, while a live holder of a long
/// critical section costs its waiters little CPU.
#[derive(Debug)]
pub(crate) struct Waiter {
    deadline: Option<Instant>,
    started: Instant,
    round: u32,
    /// Deadline checks so far (see `expired`); never reset by `restart`.
    calls: u32,
    nap: Duration,
}

impl Waiter {
    pub fn new(deadline: Option<Instant>) -> Waiter {
        Waiter {
            deadline,
            started: Instant::now(),
            round: 0,
            calls: 0,
            nap: MIN_NAP,
        }
    }

    /// Past the spinning and yielding: time to look at the owner.
    pub fn should_probe(&self) -> bool {
        self.round >= SPINS + YIELDS
    }

    /// Progress was made (the owner or sequence changed): spin again.
    pub fn restart(&mut self) {
        self.round = 0;
        self.nap = MIN_NAP;
    }

    /// Waits a little; `Err(waited)` once the deadline has passed.
    pub fn pause(&mut self) -> Result<(), Duration> {
        if self.round < SPINS + YIELDS {
            // Progress (a `restart`) can keep us in this phase forever under
            // heavy contention, so the deadline is checked here too.
            self.expired().map_or(Ok(()), Err)?;
            if self.round < SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
            self.round += 1;
            return Ok(());
        }
        let now = Instant::now();
        let mut nap = self.nap;
        if let Some(d) = self.deadline {
            if now >= d {
                return Err(now - self.started);
            }
            nap = nap.min(d - now);
        }
        // A bounded nap inside a loop that re-checks the condition: the
        // holder cannot wake us (it may be another process, or dead).
        std::thread::park_timeout(nap);
        self.nap = (self.nap * 2).min(MAX_NAP);
        Ok(())
    }

    /// Whether the deadline has passed, checked on every 64th call to keep
    /// `Instant::now` off the spinning path. For loops that retry on
    /// progress rather than pause.
    pub fn expired(&mut self) -> Option<Duration> {
        self.calls = self.calls.wrapping_add(1);
        if !self.calls.is_multiple_of(64) {
            return None;
        }
        let now = Instant::now();
        match self.deadline {
            Some(d) if now >= d => Some(now - self.started),
            _ => None,
        }
    }
}

/// The seqlock read. See the module docs for the ordering argument.
pub(crate) fn read(
    region: &Mapped,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> Result<u64, ShmError> {
    if buf.len() != region.payload_len {
        return Err(ShmError::BufferSize {
            path: region.path.clone(),
            expected: region.payload_len,
            got: buf.len(),
        });
    }
    let c = region.cells();
    let mut waiter: Option<Waiter> = None;
    let mut last_odd = None;
    loop {
        let s1 = c.seq.load(Ordering::Acquire);
        if s1 & 1 == 0 {
            guard::copy_out(c.payload, 0, buf);
            let crc = c.crc.load(Ordering::Relaxed) as u32;
            fence(Ordering::Acquire);
            let s2 = c.seq.load(Ordering::Relaxed);
            if s1 == s2 {
                if crc32c::crc32c(buf) != crc {
                    return Err(ShmError::TornRecord {
                        path: region.path.clone(),
                        seq: s1,
                    });
                }
                return Ok(s1);
            }
            // A write overlapped the copy: that is progress, retry at once.
            let w = waiter.get_or_insert_with(|| Waiter::new(deadline));
            if let Some(waited) = w.expired() {
                return Err(region.busy("a consistent read", timed_out(c, waited)));
            }
            std::hint::spin_loop();
            continue;
        }
        let w = waiter.get_or_insert_with(|| Waiter::new(deadline));
        if last_odd != Some(s1) {
            // A different write than the one we last waited on.
            last_odd = Some(s1);
            w.restart();
        }
        if w.should_probe() && unwedge_for_reader(region, c) {
            w.restart();
            continue;
        }
        if let Err(waited) = w.pause() {
            return Err(region.busy("a consistent read", timed_out(c, waited)));
        }
    }
}

/// A reader stuck on an odd sequence: recover the lock if its owner is
/// dead, or repair the parity if nobody holds the lock. Returns whether
/// anything changed.
fn unwedge_for_reader(region: &Mapped, c: Cells<'_>) -> bool {
    let cur = c.owner.load(Ordering::Acquire);
    if cur != 0 {
        return matches!(
            try_recover(region, c, cur, owner::current()),
            Probe::Recovered
        );
    }
    // Odd with the lock free is normally a reader's stale view (the writer
    // ended its write and released since we loaded the sequence). Taking
    // the lock makes it certain: while we hold it no write can be in
    // progress, so an odd sequence then is orphaned and ours to fix.
    let me = owner::current();
    if c.owner
        .compare_exchange(0, me.word(), Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return true;
    }
    let s = c.seq.load(Ordering::Relaxed);
    if s & 1 == 1 {
        c.seq.store(s + 1, Ordering::Release);
        tracing::warn!(target: "handoff::shm", path = %region.path.display(), seq = s,
            "odd sequence with the lock free: parity restored");
    }
    let _ = c
        .owner
        .compare_exchange(me.word(), 0, Ordering::Release, Ordering::Relaxed);
    true
}

/// Takes the writer lock, recovering it from a dead owner if need be.
pub(crate) fn lock(region: &Mapped, deadline: Option<Instant>) -> Result<WriteGuard<'_>, TimedOut> {
    let c = region.cells();
    // Per acquire, never cached across fork: see `owner::current`.
    let me = owner::current();
    if c.owner
        .compare_exchange(0, me.word(), Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
    {
        return Ok(WriteGuard::new(region, me));
    }
    let mut w = Waiter::new(deadline);
    let mut last = None;
    loop {
        let cur = c.owner.load(Ordering::Relaxed);
        if cur == 0 {
            if c.owner
                .compare_exchange_weak(0, me.word(), Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Ok(WriteGuard::new(region, me));
            }
            continue;
        }
        if last != Some(cur) {
            last = Some(cur);
            w.restart();
        }
        if w.should_probe() {
            match try_recover(region, c, cur, me) {
                Probe::Recovered | Probe::Changed => {
                    w.restart();
                    continue;
                }
                Probe::Alive => {}
            }
        }
        if let Err(waited) = w.pause() {
            return Err(timed_out(c, waited));
        }
    }
}

fn timed_out(c: Cells<'_>, waited: Duration) -> TimedOut {
    TimedOut {
        owner: OwnerState::decode(c.owner.load(Ordering::Acquire)),
        waited,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// The owner is alive (or is this process): keep waiting.
    Alive,
    /// The word changed under us; look again.
    Changed,
    /// We recovered a dead owner's lock; it is free now.
    Recovered,
}

/// Probes the owner recorded in `cur` and, if it is dead, recovers the
/// lock: stamp our identity over it (CAS, so exactly one waiter wins),
/// force the sequence even, release.
///
/// Each step leaves a state the next waiter can handle: killed after the
/// stamp, the word names *us*, dead, and is recovered again; killed after
/// forcing parity, likewise; the forced-even sequence is idempotent.
fn try_recover(region: &Mapped, c: Cells<'_>, cur: u64, me: OwnerId) -> Probe {
    let reason = match OwnerState::decode(cur) {
        OwnerState::Free => return Probe::Changed,
        // Another thread of this process: alive by definition.
        OwnerState::Held(id) if id == me => return Probe::Alive,
        OwnerState::Held(id) => match owner::probe(id) {
            Liveness::Alive => return Probe::Alive,
            Liveness::Dead(reason) => reason,
        },
        OwnerState::Corrupt(_) => DeadReason::Corrupt,
    };
    if c.owner
        .compare_exchange(cur, me.word(), Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return Probe::Changed;
    }
    hooks::point("mid-recovery");
    let s = c.seq.load(Ordering::Relaxed);
    let torn = s & 1 == 1;
    if torn {
        c.seq.store(s + 1, Ordering::Release);
    }
    c.recoveries.fetch_add(1, Ordering::Relaxed);
    c.last_recovered.store(cur, Ordering::Relaxed);
    tracing::warn!(target: "handoff::shm", path = %region.path.display(),
        owner = %OwnerState::decode(cur), %reason, mid_write = torn,
        "recovered the write lock of a dead owner");
    // Cannot fail: only we, the holder, change a word that names us (no
    // live process judges us dead).
    let _ = c
        .owner
        .compare_exchange(me.word(), 0, Ordering::Release, Ordering::Relaxed);
    Probe::Recovered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_holds_even_when_progress_keeps_restarting_the_spin() {
        let t = Instant::now();
        let mut w = Waiter::new(Some(t + Duration::from_millis(20)));
        loop {
            w.restart();
            if w.pause().is_err() {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "deadline ignored");
        }
        assert!(t.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn probes_only_after_spinning_and_naps_grow_to_the_cap() {
        let mut w = Waiter::new(None);
        for _ in 0..SPINS + YIELDS {
            assert!(!w.should_probe());
            w.pause().unwrap();
        }
        assert!(w.should_probe());
        for _ in 0..8 {
            w.pause().unwrap();
        }
        assert_eq!(w.nap, MAX_NAP);
        w.restart();
        assert!(!w.should_probe());
        assert_eq!(w.nap, MIN_NAP);
    }
}
