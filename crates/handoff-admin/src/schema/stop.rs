//! What a stop reports (the `stopped` event): how each process was asked
//! to stop and how it ended.
//!
//! The data and how it reads; the verdict that fills in [`ProcessEnd::how`]
//! from an exit status is the supervisor's (`stop` in the binary), which
//! depends on this and not the other way round.

use serde::{Deserialize, Serialize};

/// How one process ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessEnd {
    /// The process.
    pub pid: u32,
    /// `incumbent`, `retiring`, or `prepared` (held for an upgrade).
    pub role: String,
    /// How it was asked to stop: `control-protocol` (Shutdown over its
    /// control socket), a signal's name (`SIGTERM`: notify mode, or library
    /// mode's fallback — see `fallback`), `commit` (retiring since its
    /// handoff committed: nothing sent) or `abort` (a prepared successor).
    /// Empty from a supervisor older than this field.
    #[serde(default)]
    pub asked: String,
    /// Why a library-mode incumbent got a signal instead of the control
    /// protocol (an older build, an unreachable control socket, a drain
    /// that failed); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// `exited`: drained — by itself, within the grace, with status 0 (a
    /// prepared successor, told to abort, with any status; a process
    /// adopted from a previous supervisor, whose status cannot be known,
    /// once it is gone within the grace). `failed`: by
    /// itself within the grace with another status. `signalled`: died of a
    /// signal within the grace (the stop signal's default action when it
    /// has no handler, or a crash). `killed`: SIGKILL after the grace.
    /// `stuck`: still there after SIGKILL (uninterruptible sleep).
    pub how: String,
    /// Its exit status, where known.
    pub exit: Option<String>,
    /// Why it did not drain, in words; absent when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// From the request to its end.
    pub took_ms: f64,
}

impl ProcessEnd {
    /// Exited by itself within the grace (see [`ProcessEnd::how`]).
    pub fn drained(&self) -> bool {
        self.how == "exited"
    }

    /// How it was asked, in words ("" when the supervisor did not say).
    pub fn asked_words(&self) -> String {
        match self.asked.as_str() {
            "" => String::new(),
            "control-protocol" => "stopped through the control protocol".into(),
            "commit" => "retiring since its handoff committed".into(),
            "abort" => "told to abort".into(),
            signal => format!("sent {signal}"),
        }
    }

    /// One line for a log: role, pid, how, the exit status and why, and
    /// how it was asked.
    pub fn line(&self) -> String {
        let exit = self
            .exit
            .as_deref()
            .map(|e| format!(", {e}"))
            .unwrap_or_default();
        let why = self
            .why
            .as_deref()
            .map(|w| format!(" — did not drain: {w}"))
            .unwrap_or_default();
        let asked = match self.asked_words() {
            a if a.is_empty() => String::new(),
            a => format!(" ({a})"),
        };
        format!(
            "{} pid {} {} after {:.0} ms{exit}{why}{asked}",
            self.role, self.pid, self.how, self.took_ms
        )
    }
}

/// What a stop did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopReport {
    /// The supervisor that stopped.
    pub supervisor_pid: u32,
    /// How long each process had to drain.
    pub grace_ms: f64,
    /// Time spent letting a handoff in flight finish.
    pub waited_for_handoff_ms: f64,
    /// Every process it stopped (or let finish).
    pub processes: Vec<ProcessEnd>,
    /// From the request to the end of the last process.
    pub total_ms: f64,
}

impl StopReport {
    /// Every process it stopped drained (see [`ProcessEnd::drained`]).
    pub fn drained(&self) -> bool {
        self.processes.iter().all(ProcessEnd::drained)
    }

    /// One line for the supervisor's log.
    pub fn summary(&self) -> String {
        let procs: Vec<String> = self.processes.iter().map(ProcessEnd::line).collect();
        format!(
            "stopped in {:.0} ms: {}",
            self.total_ms,
            if procs.is_empty() {
                "nothing was running".to_string()
            } else {
                procs.join("; ")
            }
        )
    }
}
