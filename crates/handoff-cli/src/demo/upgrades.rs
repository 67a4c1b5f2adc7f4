//! The demo's upgrade loop: one handoff every interval, through the supervisor's admin
//! socket, exactly as `handoff upgrade` asks for it.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use handoff_admin::schema::{Event, Request};
use handoff_admin::wire;

/// Budget of one handoff from start to Ready. The demo service needs milliseconds; this
/// only bounds how long a stop can wait for an upgrade in flight.
const DEADLINE: Duration = Duration::from_secs(10);
/// Budget for the old process to drain.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Longest silence from the supervisor while an upgrade runs (it reports every phase).
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How one upgrade ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Committed {
        total_ms: f64,
        old_pid: Option<u32>,
        new_pid: u32,
        warnings: Vec<String>,
    },
    Aborted {
        /// The phase it failed in, when the supervisor says.
        phase: Option<String>,
        reason: String,
    },
}

/// One upgrade: when it started, its phases as the supervisor reported them, its outcome.
#[derive(Debug, Clone)]
pub struct UpgradeRecord {
    /// 1 for the first upgrade.
    pub number: u64,
    /// Start, relative to the start of the demo's load.
    pub at: Duration,
    /// `(phase, ms)` in order.
    pub phases: Vec<(String, f64)>,
    pub outcome: Outcome,
}

impl UpgradeRecord {
    pub fn committed(&self) -> bool {
        matches!(self.outcome, Outcome::Committed { .. })
    }

    /// Start to Commit, for a committed upgrade.
    pub fn total_ms(&self) -> Option<f64> {
        match self.outcome {
            Outcome::Committed { total_ms, .. } => Some(total_ms),
            Outcome::Aborted { .. } => None,
        }
    }
}

/// What the upgrade thread tells the main loop.
#[derive(Debug)]
pub enum UpgradeNote {
    Done(UpgradeRecord),
    /// The requested number of upgrades has been performed.
    LimitReached,
}

/// Asks the supervisor for one upgrade and follows it to the end.
fn upgrade_once(runtime_dir: &Path) -> (Vec<(String, f64)>, Outcome) {
    let mut phases = Vec::new();
    let aborted = |reason: String| Outcome::Aborted {
        phase: None,
        reason,
    };
    // The admin client's connect: it believes the socket only when our uid
    // or root serves it, like `handoff upgrade` does.
    let stream = match handoff_admin::client::connect(runtime_dir) {
        Ok(s) => s,
        Err(e) => return (phases, aborted(e.to_string())),
    };
    let req = Request::Upgrade {
        binary: None,
        deadline_ms: Some(DEADLINE.as_millis() as u64),
        drain_grace_ms: Some(DRAIN_GRACE.as_millis() as u64),
        wait_ms: None,
    };
    if let Err(e) = wire::send(&stream, &req) {
        return (phases, aborted(format!("sending the upgrade request: {e}")));
    }
    loop {
        let event: Event = match wire::recv(&stream, Some(EVENT_TIMEOUT)) {
            Ok(ev) => ev,
            Err(e) => {
                let reason = format!("reading from the supervisor: {e}");
                return (phases, aborted(reason));
            }
        };
        match event {
            Event::Phase { phase, took_ms } => phases.push((phase, took_ms)),
            Event::Committed {
                old_pid,
                new_pid,
                total_ms,
                warnings,
                ..
            } => {
                let outcome = Outcome::Committed {
                    total_ms,
                    old_pid,
                    new_pid,
                    warnings,
                };
                return (phases, outcome);
            }
            Event::Aborted { phase, reason, .. } => {
                return (phases, Outcome::Aborted { phase, reason });
            }
            Event::Error { message } => return (phases, aborted(message)),
            // Not an answer to an upgrade without --wait.
            other @ (Event::Status { .. }
            | Event::Prepared { .. }
            | Event::Discarded { .. }
            | Event::Waiting { .. }
            | Event::Stopping { .. }
            | Event::Reexecuting { .. }
            | Event::Stopped(_)) => {
                return (phases, aborted(format!("unexpected reply: {other:?}")));
            }
        }
    }
}

/// The upgrade thread. Dropping it (or [`Upgrader::stop`]) ends the loop after the upgrade
/// in flight, if any.
pub struct Upgrader {
    stop: Option<Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Upgrader {
    /// Starts upgrading every `interval` from `t0` on (the first one at `t0 + interval`),
    /// `limit` times at most, and none that would start after `last_start`, reporting each
    /// upgrade on `notes`.
    pub fn spawn(
        runtime_dir: PathBuf,
        t0: Instant,
        interval: Duration,
        limit: Option<u64>,
        last_start: Instant,
        notes: Sender<UpgradeNote>,
    ) -> std::io::Result<Upgrader> {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let handle = thread::Builder::new()
            .name("upgrades".into())
            .spawn(move || {
                let mut next = t0 + interval;
                let mut number = 0;
                loop {
                    if limit.is_some_and(|l| number >= l) {
                        let _ = notes.send(UpgradeNote::LimitReached);
                        return;
                    }
                    if next > last_start {
                        // No time left for another one: idle until told to stop (returning
                        // now would look like a crash to the main loop).
                        let _ = stop_rx.recv();
                        return;
                    }
                    let wait = next.saturating_duration_since(Instant::now());
                    match stop_rx.recv_timeout(wait) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                    number += 1;
                    let started = Instant::now();
                    let (phases, outcome) = upgrade_once(&runtime_dir);
                    let record = UpgradeRecord {
                        number,
                        at: started.saturating_duration_since(t0),
                        phases,
                        outcome,
                    };
                    if notes.send(UpgradeNote::Done(record)).is_err() {
                        return;
                    }
                    // Keep the rhythm; after an overrun, go again at once.
                    next = (next + interval).max(Instant::now());
                }
            })?;
        Ok(Upgrader {
            stop: Some(stop_tx),
            handle: Some(handle),
        })
    }

    /// Stops the loop and waits for the upgrade in flight (bounded by the handoff's
    /// deadline). Returns false if the thread panicked.
    pub fn stop(mut self) -> bool {
        self.stop.take();
        self.handle.take().is_none_or(|h| h.join().is_ok())
    }
}

impl Drop for Upgrader {
    fn drop(&mut self) {
        // Disconnecting the channel wakes the thread, which then ends.
        self.stop.take();
    }
}
