//! A spawned child process, reaped by exactly one owner.
//!
//! Each child gets a small waiter thread that blocks until the child exits
//! (without reaping), marks it dead under the handle's mutex, then reaps it.
//! Signals go through the same mutex, so a signal can never hit a recycled
//! pid (see `sys::wait`). Waiting per pid rather than `waitpid(-1)` means a
//! program embedding the supervisor keeps ownership of its other children.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sys::wait;
pub use crate::sys::wait::Exit;

#[derive(Debug, Default)]
struct State {
    exit: Option<Exit>,
    /// Set once the zombie is known to exist (waitid WNOWAIT returned) —
    /// from then on the pid must not be signalled.
    exited: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

/// Handle on a child process this process spawned.
#[derive(Debug, Clone)]
pub struct Child {
    pid: u32,
    shared: Arc<Shared>,
}

impl Child {
    /// Takes ownership of reaping `pid`, which must be our own child and not
    /// waited for by anyone else.
    pub fn adopt(pid: u32) -> io::Result<Child> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("reap-{pid}"))
            .spawn(move || {
                let waited = wait::wait_exited_nowait(pid);
                let mut st = s.state.lock().unwrap_or_else(|p| p.into_inner());
                st.exited = true;
                st.exit = match waited.and_then(|()| wait::reap(pid)) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        tracing::warn!(target: "handoff::child", pid, error = %e, "waiting for child failed");
                        Some(Exit::Code(-1))
                    }
                };
                drop(st);
                s.cv.notify_all();
            })?;
        Ok(Child { pid, shared })
    }

    /// Watches a process that is *not* our child — an incumbent left by a
    /// previous supervisor. Its exit status cannot be collected; liveness is
    /// polled, guarded against pid reuse by the process start time.
    pub fn adopt_foreign(pid: u32) -> io::Result<Child> {
        // Start ticks, not `start_time_ms`: the latter adds `btime`, which
        // some kernels report with a second of jitter, and one jittery read
        // would make a live process look recycled (and get it restarted
        // next to itself).
        let started = crate::procinfo::stat(pid).map(|s| s.start_ticks);
        if !foreign_alive(pid, started) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {pid} is not running"),
            ));
        }
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("watch-{pid}"))
            .spawn(move || {
                while foreign_alive(pid, started) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let mut st = s.state.lock().unwrap_or_else(|p| p.into_inner());
                st.exited = true;
                st.exit = Some(Exit::Unknown);
                drop(st);
                s.cv.notify_all();
            })?;
        Ok(Child { pid, shared })
    }

    /// The child's pid. Once it has exited the pid may name another
    /// process: signal through [`Child::signal`], never by pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Exit status if the child has exited (and been reaped).
    pub fn try_exit(&self) -> Option<Exit> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .exit
    }

    /// Waits up to `d` for the child to exit.
    pub fn wait_timeout(&self, d: Duration) -> Option<Exit> {
        let deadline = Instant::now() + d;
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(e) = st.exit {
                return Some(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Sends `sig` unless the child has already exited. Returns whether a
    /// signal was sent.
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> io::Result<bool> {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.exited {
            return Ok(false);
        }
        wait::signal(self.pid, sig)?;
        Ok(true)
    }

    /// SIGKILL and wait (bounded) for the reap. Returns the exit status, or
    /// `None` if the child did not disappear within `d` (it is then stuck in
    /// the kernel; the waiter thread will still reap it eventually).
    pub fn kill_and_reap(&self, d: Duration) -> Option<Exit> {
        if let Err(e) = self.signal(nix::sys::signal::Signal::SIGKILL) {
            tracing::warn!(target: "handoff::child", pid = self.pid, error = %e, "SIGKILL failed");
        }
        self.wait_timeout(d)
    }
}

/// Alive, not a zombie, and (where the platform tells) the same process
/// that had `started` as its start time (in clock ticks since boot).
fn foreign_alive(pid: u32, started: Option<u64>) -> bool {
    if !crate::procinfo::exists(pid) {
        return false;
    }
    match (started, crate::procinfo::stat(pid)) {
        (_, Some(st)) if st.is_dead() => false,
        (Some(a), Some(st)) => a == st.start_ticks,
        (Some(_), None) => false,
        (None, _) => !crate::procinfo::is_zombie(pid),
    }
}
