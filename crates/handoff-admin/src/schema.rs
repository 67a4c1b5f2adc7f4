//! What the admin socket's two ends say: one [`Request`], then [`Event`]s.
//!
//! Fields are only ever added (with `#[serde(default)]`), so a client and a
//! supervisor of different builds still understand each other, and
//! `handoff status --json` (which prints the `status` event) stays stable
//! for scripts.

pub mod status;
pub mod stop;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use self::status::{Activity, InFlight};
use self::stop::StopReport;

/// File name of the admin socket inside the runtime dir.
pub const ADMIN_SOCK: &str = "admin.sock";

/// Where the admin socket of the supervisor using `runtime_dir` is.
pub fn admin_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(ADMIN_SOCK)
}

/// A successor's pre-copy catch-up with the incumbent's writes, as its
/// Ready reported it (docs/design.md §2.7).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct CatchUp {
    /// Rounds run before Hello.
    pub rounds: u32,
    /// Records applied over all rounds.
    pub records: u64,
    /// Bytes read over all rounds.
    pub bytes: u64,
    /// Records the last round found: what was written during the round
    /// before it.
    pub last_records: u64,
    /// Whether the last round was within the service's bound (else a cap
    /// on rounds or time stopped it).
    pub converged: bool,
    /// All rounds together.
    pub took_ms: f64,
}

/// What a client asks; exactly one per connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Replace the service with a fresh process (`handoff upgrade`).
    Upgrade {
        /// Spawn this binary instead of the one `handoff run` was given.
        binary: Option<PathBuf>,
        /// Override the handoff's overall deadline for this one upgrade.
        deadline_ms: Option<u64>,
        /// Override the drain grace for this one upgrade.
        drain_grace_ms: Option<u64>,
        /// Wait this long for a handoff in flight to end instead of
        /// refusing with "in progress".
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// Start the successor for the next upgrade now and hold it
    /// (`handoff upgrade --prepare`); the next upgrade of the same binary
    /// uses it.
    Prepare {
        /// Prepare this binary instead of the one `handoff run` was given.
        binary: Option<PathBuf>,
    },
    /// Stop the successor held for the next upgrade
    /// (`handoff upgrade --discard-prepared`).
    Discard,
    /// What runs (`handoff status`).
    Status,
    /// Stop the service and the supervisor; `grace_ms` defaults to the
    /// supervisor's drain grace.
    Stop {
        /// How long the service gets to drain before SIGKILL.
        #[serde(default)]
        grace_ms: Option<u64>,
    },
    /// Replace the supervisor's own binary in place, same pid, the service
    /// untouched (`handoff upgrade --supervisor`).
    ReexecSupervisor {
        /// `exec` this binary; default: the path the supervisor runs from.
        binary: Option<PathBuf>,
    },
}

/// What the supervisor answers, one per frame; the last one of a
/// conversation is final (committed, aborted, status, stopped, error…).
// One event per frame, built and sent at once: its size in memory is of
// no consequence, boxing the status would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// One phase of the handoff ended.
    Phase {
        /// The phase's name (`negotiating`, `draining`, …).
        phase: String,
        /// How long it took.
        took_ms: f64,
    },
    /// The handoff committed: the new process serves.
    Committed {
        /// `0x…`, as the journal and the log name it.
        handoff_id: String,
        /// The process that retired (none on a first start).
        old_pid: Option<u32>,
        /// The process that serves now.
        new_pid: u32,
        /// What the new process said it is.
        build_id: String,
        /// From the request to Commit.
        total_ms: f64,
        /// Things that went wrong without failing the handoff.
        warnings: Vec<String>,
        /// The handoff used a successor prepared ahead, held this long.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prepared_for_ms: Option<f64>,
        /// Live connections handed to the new process (their clients did
        /// not reconnect); absent when a process speaks protocol version 2
        /// or older, or in notify mode: the drain closed them all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connections_moved: Option<u64>,
        /// Connections the drain closed instead of moving (HTTP/2, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connections_closed: Option<u64>,
        /// Whether the moved connections went straight from the old
        /// process to the new one (protocol version 4) rather than through
        /// the supervisor; absent when none were moved.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connections_direct: Option<bool>,
        /// How the new process caught up with the old one's writes before
        /// its Hello; absent when it did not (a stateless service, or one
        /// that does not use catch-up).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        catch_up: Option<CatchUp>,
    },
    /// `handoff upgrade --prepare`: the successor started, said Hello and
    /// is held for the next upgrade.
    Prepared {
        /// `0x…`, the handoff it is held for.
        handoff_id: String,
        /// The held process.
        pid: u32,
        /// What it said it is.
        build_id: String,
        /// From the request to its Hello.
        took_ms: f64,
    },
    /// `handoff upgrade --discard-prepared`: the held successor (if any)
    /// was told to stop.
    Discarded {
        /// The process told to stop; none if nothing was held.
        pid: Option<u32>,
    },
    /// The handoff did not commit; the old process serves on.
    Aborted {
        /// Absent for a failure before the library assigned one.
        handoff_id: Option<String>,
        /// The phase it failed in, where known.
        phase: Option<String>,
        /// Why, in words.
        reason: String,
    },
    /// What runs (`handoff status`).
    Status {
        /// The supervisor's own pid.
        supervisor_pid: u32,
        /// What the supervisor's own binary is: its version and a digest of
        /// the executable (changes with `handoff upgrade --supervisor`).
        #[serde(default)]
        supervisor_build: String,
        /// The serving process, if any.
        incumbent_pid: Option<u32>,
        /// What the serving process said it is.
        build_id: String,
        /// The executable the serving process runs, as the kernel names it
        /// (`/proc/PID/exe`: symlinks resolved; ` (deleted)` appended once
        /// the file was removed or replaced on disk). Absent while none
        /// runs, or where the platform cannot tell.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        incumbent_exe: Option<String>,
        /// SHA-256 (lowercase hex) of the bytes the serving process runs —
        /// read through the process, so it is the running build even after
        /// the file was replaced: what `sha256sum FILE` prints for the build
        /// it was started from. Tells two builds of the same version apart.
        /// Absent for a moment after a new build starts (it is hashed in the
        /// background, so a status query never waits for it): ask again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        incumbent_exe_sha256: Option<String>,
        /// `NAME=tcp://ADDR` or `NAME=unix:PATH`, as bound.
        listeners: Vec<String>,
        /// Old incumbents still finishing their connections.
        retiring_pids: Vec<u32>,
        /// The live counters the service publishes in its state dir, as
        /// it wrote them: opaque JSON to the supervisor, which reads the
        /// file itself (the service is never asked); absent when the
        /// service publishes none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service_counters: Option<serde_json::Value>,
        /// Why the published counters exist but could not be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service_counters_error: Option<String>,
        /// Uptimes, handoff counts, the last handoff, the one in flight.
        #[serde(flatten)]
        activity: Activity,
    },
    /// `upgrade --wait`: another handoff holds the slot; ours runs after it.
    Waiting {
        /// What runs (absent when it is a crash restart).
        in_flight: Option<InFlight>,
        /// How long the request waits at most.
        wait_ms: u64,
    },
    /// A stop was accepted: no new upgrades from now on.
    Stopping {
        /// The supervisor's own pid.
        supervisor_pid: u32,
        /// The process that will be asked to drain.
        incumbent_pid: Option<u32>,
        /// How long it gets before SIGKILL.
        grace_ms: f64,
        /// The handoff the stop waits for first, if any.
        in_flight: Option<InFlight>,
    },
    /// The service is stopped; the supervisor exits right after this.
    Stopped(StopReport),
    /// `handoff upgrade --supervisor`: the new binary answered its check;
    /// the supervisor `exec`s it now. The connection closes with the
    /// `exec` (an `Error` follows instead if the `exec` failed).
    Reexecuting {
        /// The supervisor's pid, the same after the `exec`.
        supervisor_pid: u32,
        /// The binary being `exec`ed.
        binary: PathBuf,
        /// Its build, as its check said.
        build: String,
        /// The build it replaces.
        from_build: String,
    },
    /// The request itself failed (bad request, handoff already running…).
    Error {
        /// What the client is told.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests keep their wire form, and one from a client older than a
    /// field still reads.
    #[test]
    fn requests_read_across_builds() {
        let old: Request = serde_json::from_str(r#"{"cmd":"upgrade","binary":"/opt/kv"}"#)
            .expect("an upgrade without the newer fields");
        assert_eq!(
            old,
            Request::Upgrade {
                binary: Some("/opt/kv".into()),
                deadline_ms: None,
                drain_grace_ms: None,
                wait_ms: None,
            }
        );
        assert_eq!(
            serde_json::to_value(Request::Status).expect("json"),
            serde_json::json!({"cmd": "status"})
        );
        let stop: Request = serde_json::from_str(r#"{"cmd":"stop"}"#).expect("a bare stop");
        assert_eq!(stop, Request::Stop { grace_ms: None });
    }

    /// The running executable's path and digest are optional both ways: a
    /// status from a supervisor that predates them reads (as unknown), and
    /// they are left out of the JSON when unknown.
    #[test]
    fn status_exe_fields_are_optional() {
        let old = serde_json::json!({
            "event": "status", "supervisor_pid": 1, "incumbent_pid": 2, "build_id": "b",
            "listeners": [], "retiring_pids": [], "supervisor_uptime_ms": 0,
            "incumbent_uptime_ms": null, "stopping": false,
            "handoffs": {"committed": 0, "aborted": 0},
            "last_handoff": null, "in_flight": null, "journal": null,
        });
        let ev: Event = serde_json::from_value(old).expect("a status without the exe fields");
        let Event::Status {
            incumbent_exe,
            incumbent_exe_sha256,
            ..
        } = &ev
        else {
            panic!("not a status: {ev:?}");
        };
        assert_eq!((incumbent_exe, incumbent_exe_sha256), (&None, &None));
        let v = serde_json::to_value(&ev).expect("json");
        assert!(v.get("incumbent_exe").is_none(), "{v}");
        assert!(v.get("incumbent_exe_sha256").is_none(), "{v}");
    }

    /// The service's counters travel as the service published them,
    /// whatever they hold, beside the flattened activity.
    #[test]
    fn status_counters_are_opaque() {
        let ev = Event::Status {
            supervisor_pid: 1,
            supervisor_build: "handoff 0.1.0 (abc)".into(),
            incumbent_pid: Some(2),
            build_id: "b".into(),
            incumbent_exe: None,
            incumbent_exe_sha256: None,
            listeners: vec![],
            retiring_pids: vec![],
            service_counters: Some(serde_json::json!({"anything": [1, {"nested": true}]})),
            service_counters_error: None,
            activity: Activity::default(),
        };
        let v = serde_json::to_value(&ev).expect("json");
        assert_eq!(v["event"], "status");
        assert_eq!(v["service_counters"]["anything"][1]["nested"], true);
        assert_eq!(v["stopping"], false);
        let back: Event = serde_json::from_value(v).expect("reads back");
        assert_eq!(back, ev);
    }
}
