//! The one-handoff-at-a-time slot of a supervisor (library and notify mode).
//!
//! A plain `Mutex<()>` would do for the exclusion, but others need to *see*
//! the slot without taking it: the crash monitor must wait for a handoff in
//! flight to end before it calls a dead incumbent a crash (the handoff may
//! be replacing it), and taking the lock just to look would make a
//! concurrent upgrade fail with "in progress" for no reason. So the slot is
//! a flag under a mutex with a condvar that wakes whoever waits for it to
//! clear. A guard clears it on drop, also while unwinding, so a panic in a
//! handoff does not leave the slot taken (or poisoned) for good.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

#[derive(Debug, Default)]
pub(crate) struct Busy {
    taken: Mutex<bool>,
    freed: Condvar,
}

/// Holds the slot; frees it on drop.
#[derive(Debug)]
pub(crate) struct BusyGuard<'a>(&'a Busy);

impl Busy {
    fn taken(&self) -> MutexGuard<'_, bool> {
        // Only a bool behind it, always consistent: a poisoned lock is fine.
        self.taken.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the slot if it is free.
    pub(crate) fn try_enter(&self) -> Option<BusyGuard<'_>> {
        let mut t = self.taken();
        if *t {
            return None;
        }
        *t = true;
        Some(BusyGuard(self))
    }

    /// Takes the slot, waiting for whoever holds it.
    pub(crate) fn enter(&self) -> BusyGuard<'_> {
        let mut t = self.taken();
        while *t {
            t = self.freed.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        *t = true;
        BusyGuard(self)
    }

    /// Waits up to `timeout` for the slot to be free, without taking it;
    /// whether it was free.
    pub(crate) fn wait_free(&self, timeout: Duration) -> bool {
        let t = self.taken();
        let (t, _) = self
            .freed
            .wait_timeout_while(t, timeout, |taken| *taken)
            .unwrap_or_else(|p| p.into_inner());
        !*t
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        *self.0.taken() = false;
        self.0.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn one_holder_and_waiters_see_it_end() {
        let b = Arc::new(Busy::default());
        let g = b.try_enter().expect("free at first");
        assert!(b.try_enter().is_none());
        assert!(!b.wait_free(Duration::from_millis(10)));
        let released = Arc::new(AtomicBool::new(false));
        let (b2, r2) = (b.clone(), released.clone());
        // The waiter may start waiting before or after the release; either
        // way it must see the slot free, and never before the release.
        let waiter = std::thread::spawn(move || {
            let free = b2.wait_free(Duration::from_secs(30));
            (free, r2.load(Ordering::SeqCst))
        });
        released.store(true, Ordering::SeqCst);
        drop(g);
        assert_eq!(waiter.join().expect("waiter"), (true, true));
        // Looking did not take it.
        let _g = b.try_enter().expect("free again");
    }

    #[test]
    fn enter_waits_for_the_holder() {
        let b = Arc::new(Busy::default());
        let g = b.enter();
        let released = Arc::new(AtomicBool::new(false));
        let (b2, r2) = (b.clone(), released.clone());
        let other = std::thread::spawn(move || {
            let _g = b2.enter();
            // Entered only once the holder let go.
            r2.load(Ordering::SeqCst)
        });
        released.store(true, Ordering::SeqCst);
        drop(g);
        assert!(
            other.join().expect("other"),
            "entered while the slot was held"
        );
    }

    #[test]
    fn a_panic_frees_the_slot() {
        let b = Arc::new(Busy::default());
        let b2 = b.clone();
        let r = std::thread::spawn(move || {
            let _g = b2.enter();
            panic!("in a handoff");
        })
        .join();
        assert!(r.is_err());
        assert!(b.try_enter().is_some());
    }
}
