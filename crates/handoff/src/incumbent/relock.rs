//! Getting the state lock back after a seal (docs/design.md §6.3): a
//! sealed incumbent released it for the successor, and may serve again only
//! once it holds it again.

use std::time::{Duration, Instant};

use crate::lock::{LockError, StateLock};
use crate::process::ProcessConfig;
use crate::protocol::{HandoffId, IdHex};

/// Who holds the state lock once the supervisor has vanished after our
/// seal.
pub(super) enum Holder {
    /// We re-took it: the successor never made it (or gave up).
    Us(StateLock),
    /// Not free within `recovery_wait`: the successor holds it, and is the
    /// incumbent.
    Successor,
}

/// The supervisor vanished after we released the lock. Whoever holds the
/// lock is the incumbent: if we can take it back within `recovery_wait`,
/// the successor never made it; if not, it did.
pub(super) fn after_supervisor_lost(cfg: &ProcessConfig) -> Result<Holder, LockError> {
    match StateLock::acquire_within(&cfg.state_dir, cfg.recovery_wait) {
        Ok(lock) => Ok(Holder::Us(lock)),
        Err(LockError::Busy { .. }) => Ok(Holder::Successor),
        Err(e) => Err(e),
    }
}

/// Re-takes the state lock after an aborted handoff, however long that
/// takes.
///
/// We released it at seal, so until we hold it again someone else may
/// change the state: serving (resuming) without it could lose writes.
/// Exiting would be worse than waiting: the supervisor's crash restarts
/// would each fail on the same held lock, so the service would stay
/// down for as long as the holder keeps it, and then stay down. Waiting
/// sealed keeps every connection queued in the listeners' backlog (the
/// supervisor holds the listeners) and resumes the moment the lock is
/// free. It is said at error level at once and every 30 s while it
/// lasts, naming the lock and its recorded holder: someone must act.
pub(super) fn after_abort(cfg: &ProcessConfig, id: HandoffId) -> StateLock {
    const SAY_EVERY: Duration = Duration::from_secs(30);
    let hex = IdHex(id);
    let started = Instant::now();
    let mut said: Option<Instant> = None;
    let mut pause = Duration::from_millis(10);
    loop {
        match StateLock::acquire_within(&cfg.state_dir, cfg.lock_wait) {
            Ok(lock) => {
                if said.is_some() {
                    tracing::warn!(target: "handoff::incumbent", handoff_id = %hex, waited_ms = started.elapsed().as_millis() as u64, "re-took the state lock at last; resuming");
                }
                return lock;
            }
            Err(e) => {
                if said.is_none_or(|t| t.elapsed() >= SAY_EVERY) {
                    said = Some(Instant::now());
                    tracing::error!(target: "handoff::incumbent", handoff_id = %hex, error = %e, waited_ms = started.elapsed().as_millis() as u64,
                        "cannot re-take the state lock after an aborted handoff: NOT serving until it is free (serving without it could lose writes); still retrying. Find the holder with `fuser {}`",
                        cfg.state_dir.join(crate::lock::LOCK_FILE).display());
                }
                // A busy lock was already waited for; any other
                // failure returns at once, so pause before the next.
                if !matches!(e, LockError::Busy { .. }) {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}
