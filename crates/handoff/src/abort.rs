//! [`AbortSignal`]: how a drain in progress learns that its handoff was
//! aborted, so it can stop winding down and the service accept again at
//! once.
//!
//! Why it exists: a drain can take the whole drain grace (a stateful
//! service waits for every connection to finish). When the supervisor
//! aborts meanwhile — the new build died, the deadline passed — the old
//! build used to learn it only after its drain returned, and so stayed not
//! accepting for the rest of the grace: with the incumbent stopped
//! mid-drain and the upgrade aborted at 10.6 s, the service answered again
//! only ~30 s later. The incumbent now watches its control connection while
//! the service drains and fires this signal the moment the supervisor says
//! `ResumeAfterAbort` (or goes away).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

type Callback = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    fired: bool,
    callbacks: Vec<Callback>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    cv: Condvar,
}

/// Fired when the handoff a drain is for has been aborted (or the
/// supervisor went away): stop draining and return; the library then calls
/// [`Drainable::resume`](crate::Drainable::resume). Cheap to clone; every
/// clone sees the same signal.
#[derive(Clone, Default)]
pub struct AbortSignal(Arc<Inner>);

impl std::fmt::Debug for AbortSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortSignal")
            .field("aborted", &self.is_aborted())
            .finish()
    }
}

impl AbortSignal {
    /// A signal that has not fired (and, unless [`fire`](Self::fire) is
    /// called, never will: what a drain for `handoff stop` gets).
    pub fn new() -> AbortSignal {
        AbortSignal::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the handoff has been aborted.
    pub fn is_aborted(&self) -> bool {
        self.state().fired
    }

    /// Blocks until the signal fires or `timeout` passes; whether it fired.
    /// A drain that waits for its connections can wait on this instead of
    /// sleeping.
    pub fn wait(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut s = self.state();
        while !s.fired {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .0
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Runs `f` when the signal fires — at once, on this thread, if it
    /// already has; else on the thread that fires it. For waking a drain
    /// that waits on something of its own (a condition variable, an async
    /// task). `f` must not block.
    pub fn on_abort(&self, f: impl FnOnce() + Send + 'static) {
        let mut s = self.state();
        if s.fired {
            drop(s);
            f();
        } else {
            s.callbacks.push(Box::new(f));
        }
    }

    /// Fires the signal: wakes every [`wait`](Self::wait) and runs every
    /// [`on_abort`](Self::on_abort) callback, once. The library does this;
    /// a service's own tests may too.
    pub fn fire(&self) {
        let callbacks = {
            let mut s = self.state();
            if s.fired {
                return;
            }
            s.fired = true;
            std::mem::take(&mut s.callbacks)
        };
        self.0.cv.notify_all();
        for f in callbacks {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn firing_wakes_a_waiter_and_runs_callbacks_once() {
        let s = AbortSignal::new();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        s.on_abort(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert!(!s.wait(Duration::from_millis(1)));
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || s.wait(Duration::from_secs(30)))
        };
        s.fire();
        s.fire();
        assert!(waiter.join().unwrap());
        assert!(s.is_aborted());
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        // Registered after the fact: runs at once.
        let r = ran.clone();
        s.on_abort(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(ran.load(Ordering::SeqCst), 2);
    }
}
