//! This process's side of the shared counters ([`handoff_demo::counters`]):
//! count in memory, flush to the region in batches, and publish each
//! flushed record as JSON for `handoff status`.
//!
//! Requests are counted in an in-process `AtomicU64` (one relaxed add per
//! response: see `server::Shared::served`); only a flush takes the region's
//! write lock, adding the delta since the previous flush. Flushes happen
//! every [`FLUSH_EVERY`] on a dedicated thread, and synchronously when the
//! process seals (its state passes to the successor), retires and exits,
//! so nothing counted is lost across a handoff. Adding deltas, never
//! storing totals, is what lets the retiring process and its successor
//! both write the same record while their lifetimes overlap.
//!
//! Publishing happens under the region's lock, right after the write, so
//! the JSON file follows the record in order (see
//! [`counters::update_then`]). A publish that fails (a full disk) leaves
//! the region updated and is said once, until one succeeds again.
//!
//! Counters are best effort: a region that cannot be opened (another
//! build's layout, a full disk) or a flush that fails is logged and the
//! service keeps serving — an upgrade must never fail over statistics. A
//! process killed outright (SIGKILL, SIGTERM without a handoff) loses at
//! most its last [`FLUSH_EVERY`] of counts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use handoff::shm::Region;
use handoff_demo::counters::{self, Found};

use crate::server::Shared;

/// How often pending counts are written to the region.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// How long a flush waits for another process's write lock (writes take
/// microseconds; on timeout the delta stays pending for the next flush).
const LOCK_BUDGET: Duration = Duration::from_millis(500);
/// What a successor receives from a sealed predecessor in `Begin`: proof
/// that it takes over in a handoff (as opposed to a first start or a
/// restart after a crash), so it counts a handoff survived.
pub const SEAL_NOTE: &[u8] = b"handoff-demo/counters: sealed";

pub struct Live {
    region: Region,
    /// Where the counters are published (the state dir).
    state_dir: PathBuf,
    /// The last publish failed (said once, until one succeeds).
    publish_failing: AtomicBool,
    /// The mutex makes concurrent flushes (timer thread, seal, exit) add
    /// each request exactly once.
    state: Mutex<State>,
    pid: u32,
}

#[derive(Default)]
struct State {
    /// This process's generation; 0 until registered.
    number: u64,
    /// Requests already added to the region.
    flushed: u64,
    /// A registration that failed (region busy), retried by each flush.
    unregistered: Option<bool>,
}

impl Live {
    /// Maps the region in `state_dir`, or logs why not and returns `None`.
    pub fn open(state_dir: &Path) -> Option<Arc<Live>> {
        match counters::open_or_create(state_dir) {
            Ok(region) => Some(Arc::new(Live {
                region,
                state_dir: state_dir.to_path_buf(),
                publish_failing: AtomicBool::new(false),
                state: Mutex::new(State::default()),
                pid: std::process::id(),
            })),
            Err(e) => {
                tracing::warn!(target: "demo::counters", error = %e, "running without shared counters");
                None
            }
        }
    }

    /// Records this process as a new generation (once committed, before
    /// accepting). `via_handoff`: it took over from a sealed predecessor.
    pub fn begin_generation(&self, via_handoff: bool) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.register(&mut st, via_handoff);
    }

    fn register(&self, st: &mut State, via_handoff: bool) {
        let pid = self.pid;
        let mut number = 0;
        let r = counters::update_then(
            &self.region,
            LOCK_BUDGET,
            |c| number = c.begin_generation(pid, via_handoff, now_ms()),
            |c| self.publish(c),
        );
        if self.report("registering this process", r) {
            st.number = number;
            st.unregistered = None;
        } else {
            st.unregistered = Some(via_handoff);
        }
    }

    /// Adds the requests counted in `served` since the last flush.
    pub fn flush(&self, served: &AtomicU64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(via_handoff) = st.unregistered {
            self.register(&mut st, via_handoff);
        }
        let (number, flushed) = (st.number, st.flushed);
        if number == 0 {
            return;
        }
        let now = served.load(Ordering::Relaxed);
        let delta = now.wrapping_sub(flushed);
        if delta == 0 {
            return;
        }
        let pid = self.pid;
        let r = counters::update_then(
            &self.region,
            LOCK_BUDGET,
            |c| c.add_requests(number, pid, delta, now_ms()),
            |c| self.publish(c),
        );
        if self.report("flushing", r) {
            st.flushed = now;
        }
    }

    /// Publishes the record just written; a failure is logged once (a
    /// full disk would otherwise say it every [`FLUSH_EVERY`]).
    fn publish(&self, c: &counters::Counters) {
        match counters::publish(&self.state_dir, c) {
            Ok(()) => {
                if self.publish_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(target: "demo::counters", "publishing the counters works again");
                }
            }
            Err(e) => {
                if !self.publish_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(target: "demo::counters", error = %e,
                        "cannot publish the counters for `handoff status`; the region is updated, will retry");
                }
            }
        }
    }

    fn report(&self, what: &str, r: Result<Found, counters::Error>) -> bool {
        match r {
            Ok(Found::Intact) => true,
            Ok(Found::Torn) => {
                tracing::warn!(target: "demo::counters", path = %self.region.path().display(),
                    "{what}: the record was torn by a writer that died mid-write; rewrote it");
                true
            }
            Ok(Found::Reset(e)) => {
                tracing::warn!(target: "demo::counters", path = %self.region.path().display(),
                    error = %e, "{what}: the record did not decode; counting from zero");
                true
            }
            Err(e) => {
                tracing::warn!(target: "demo::counters", error = %e, "{what} failed; will retry");
                false
            }
        }
    }

    /// Starts the periodic flusher; stop it with [`Flusher::stop`] before
    /// the final flush, so the process never exits mid-write.
    pub fn spawn_flusher(self: &Arc<Self>, shared: Arc<Shared>) -> Flusher {
        let (tx, rx) = mpsc::channel::<()>();
        let live = self.clone();
        let thread = std::thread::Builder::new()
            .name("counters".into())
            .spawn(move || loop {
                match rx.recv_timeout(FLUSH_EVERY) {
                    Err(RecvTimeoutError::Timeout) => live.flush(&shared.served),
                    _ => return,
                }
            });
        match thread {
            Ok(t) => Flusher {
                stop: Some(tx),
                thread: Some(t),
            },
            Err(e) => {
                tracing::warn!(target: "demo::counters", error = %e,
                    "no flusher thread; counts are written at seal and exit only");
                Flusher {
                    stop: None,
                    thread: None,
                }
            }
        }
    }
}

/// The running periodic flusher.
pub struct Flusher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Stops the thread and waits for it (at most one flush in progress).
    pub fn stop(mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch, as the counters record
/// them (`handoff status` shows ages from these).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
