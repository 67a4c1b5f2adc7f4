//! The notify-mode supervisor's shared state, below both the main loop
//! (`mod.rs`) and the admin handlers (`admin`) that use it.

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use handoff::notify::NotifySupervisor;
use handoff::Program;
use handoff_admin::schema::status::{Counts, LastHandoff};

/// State shared by the admin threads, the monitor and the main thread.
pub(crate) struct Ctx {
    pub sup: NotifySupervisor,
    pub program: Program,
    pub shown: Vec<String>,
    pub started: Instant,
    pub stopping: AtomicBool,
    pub history: Mutex<History>,
    pub seq: std::sync::atomic::AtomicU64,
    pub metrics: crate::metrics::Metrics,
}

#[derive(Default)]
pub(crate) struct History {
    pub counts: Counts,
    pub last: Option<LastHandoff>,
}

/// Notify mode under the shared crash monitor: a restart spawns the
/// program and waits for its readiness like an upgrade with no old process.
impl crate::supervise::Supervised for Ctx {
    fn incumbent(&self) -> Option<handoff::Child> {
        self.sup.incumbent()
    }

    fn wait_idle(&self, timeout: Duration) -> bool {
        self.sup.wait_idle(timeout)
    }

    fn restart_if_dead(&self, dead: u32) -> std::result::Result<Option<(u32, String)>, String> {
        self.sup
            .restart_if_dead(&self.program, dead, &mut |_| {})
            .map(|r| r.map(|r| (r.new_pid, String::new())))
            .map_err(|e| e.to_string())
    }
}
