//! The restart lock (docs/design.md §8.2) as the supervisor binary uses it: one
//! supervisor per service, for its whole life.
//!
//! # Why the supervisor holds it, and for its whole life
//!
//! A service is identified by its state dir (state lock, journal, data),
//! not by its runtime dir: two `handoff run` started with different
//! `--runtime-dir` but the same `--state-dir` would each believe they own
//! the service, and their handoffs would race — each draining and sealing
//! "the" incumbent, each spawning a successor. The runtime dir's
//! `supervisor.lock` cannot see that, so `handoff run` also takes
//! [`RestartLock`] in the state dir before it touches anything (listeners,
//! journal, the running service) and keeps it until it exits. The kernel
//! releases it when the supervisor dies however it dies, so a supervisor
//! restarted after a crash takes it straight away; a live holder is never
//! broken — the newcomer fails, naming the holder (pid, since when, token,
//! and its runtime dir).
//!
//! # Why `handoff upgrade` does not take it
//!
//! With the lock held for the supervisor's life, every upgrade request for
//! the service necessarily goes to that one supervisor, whose admin socket
//! already admits one handoff at a time: a second `handoff upgrade` (or a
//! SIGHUP) while one runs gets "another handoff is in progress" and exit
//! status 2 straight away, and nothing has been touched. A client-side lock
//! would add nothing but a second way to wait: the client would have to
//! learn the state dir, could not take a lock its supervisor already holds,
//! and a lock per upgrade would let a second supervisor in between
//! upgrades. So the serialisation is: across supervisors, this lock;
//! within one, the supervisor's single handoff slot.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Result};
use handoff::{RestartLock, RestartLockError};

/// How long a starting supervisor waits for the lock. A supervisor that
/// crashed has already released it (the kernel does so before its parent
/// can see it exit); the wait only covers one that is still exiting, e.g.
/// a restart issued right after a stop. Longer than that means another
/// supervisor is running: fail, never break it.
pub const WAIT: Duration = Duration::from_secs(3);

/// Takes the restart lock of the service whose state dir is `state_dir`,
/// recording `runtime_dir` so a second supervisor's error says where to
/// find this one.
pub fn hold(state_dir: &Path, runtime_dir: &Path) -> Result<RestartLock> {
    let note = format!(
        "handoff run --runtime-dir {}",
        std::path::absolute(runtime_dir)
            .unwrap_or_else(|_| runtime_dir.to_path_buf())
            .display()
    );
    RestartLock::acquire_with_note(state_dir, WAIT, &note).map_err(|e| match e {
        RestartLockError::Busy { .. } => anyhow!(
            "another handoff supervisor runs the service in --state-dir {}: {e}; \
             talk to it with `handoff upgrade`/`handoff status` instead of starting a second one",
            state_dir.display()
        ),
        other => anyhow!(other),
    })
}
