//! The supervisor's activity, as a `status` event carries it (and `Waiting`
//! and `Stopping` carry the handoff in flight): what `handoff status`
//! shows beside the processes.
//!
//! Only the data lives here; the supervisor's record that fills it in
//! (its upgrade gate, the phase running now) is the binary's.

use serde::{Deserialize, Serialize};

/// What asked for the handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// `handoff upgrade` on the admin socket.
    Admin,
    /// SIGHUP to `handoff run`.
    Sighup,
}

/// Handoffs since the supervisor started (crash restarts not included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Handoffs that committed.
    pub committed: u64,
    /// Handoffs that aborted (the old process served on).
    pub aborted: u64,
}

/// One finished phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseTiming {
    /// Its name (`negotiating`, `draining`, …).
    pub phase: String,
    /// How long it took.
    pub took_ms: f64,
}

/// The most recent handoff that ran (committed or aborted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastHandoff {
    /// `0x…`; absent only for a failure before the library assigned one.
    pub handoff_id: Option<String>,
    /// What asked for it.
    pub trigger: Trigger,
    /// `committed` or `aborted`.
    pub outcome: String,
    /// The incumbent it started from.
    pub old_pid: Option<u32>,
    /// The new incumbent (committed only).
    pub new_pid: Option<u32>,
    /// In order, as they ended; an aborted one ends with `resuming-after-abort`.
    pub phases: Vec<PhaseTiming>,
    /// From admission to the outcome.
    pub total_ms: f64,
    /// When it ended, milliseconds since the Unix epoch.
    pub ended_at_ms: u64,
    /// Why it aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The handoff running right now, as this supervisor sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    /// From the journal (absent in the instant before its first write lands).
    pub handoff_id: Option<String>,
    /// What asked for it.
    pub trigger: Trigger,
    /// The phase running now: the one after the last that ended.
    pub phase: String,
    /// How long it has been in `phase`.
    pub in_phase_ms: u64,
    /// Since the handoff was admitted.
    pub elapsed_ms: u64,
    /// The phases that already ended.
    pub phases: Vec<PhaseTiming>,
}

/// The journal's record of a handoff in flight (`<state-dir>/handoff.journal`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalView {
    /// `0x…`.
    pub handoff_id: String,
    /// The last phase it recorded.
    pub phase: String,
    /// The process handing over.
    pub incumbent_pid: Option<u32>,
    /// The process taking over, once spawned.
    pub successor_pid: Option<u32>,
    /// When the handoff started, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
}

/// The activity part of a status reply (flattened into
/// [`Event::Status`](super::Event::Status)).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    /// Since `handoff run` started.
    pub supervisor_uptime_ms: u64,
    /// From the kernel's start time of the incumbent process.
    pub incumbent_uptime_ms: Option<u64>,
    /// `handoff stop` or SIGTERM received: no new upgrades.
    pub stopping: bool,
    /// Committed and aborted handoffs so far.
    pub handoffs: Counts,
    /// The most recent handoff that ended.
    pub last_handoff: Option<LastHandoff>,
    /// The handoff running now.
    pub in_flight: Option<InFlight>,
    /// Present while the journal records a handoff (upgrade or crash restart).
    pub journal: Option<JournalView>,
    /// Why the journal could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_error: Option<String>,
    /// A successor started ahead by `handoff upgrade --prepare`, held for
    /// the next upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<PreparedView>,
}

/// A successor held for the next upgrade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreparedView {
    /// The held process.
    pub pid: u32,
    /// What it said it is.
    pub build_id: String,
    /// The binary it runs (the next upgrade of this binary uses it).
    pub binary: String,
    /// How long it has been held.
    pub held_ms: u64,
}
