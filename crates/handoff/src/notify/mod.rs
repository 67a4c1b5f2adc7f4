//! Notify mode: zero-downtime upgrades for programs that do not link this
//! library but speak systemd's socket activation and readiness protocol.
//!
//! The supervisor passes the listeners the way systemd does (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`, `LISTEN_PID` = the child's own pid, fds 3…) and gives
//! each child a `NOTIFY_SOCKET` of its own ([`NotifySocket`]). An upgrade:
//!
//! ```text
//! spawned        new process started with the same listening sockets
//! ready          it sent READY=1 (and/or the readiness probe passed)
//! old-signalled  the old process was sent the stop signal (SIGTERM)
//! old-stopped    it exited within the drain grace   | old-killed: SIGKILL after it
//! ```
//!
//! If the new process is not ready within the deadline (or exits, or sends
//! `STOPPING=1` first) it is killed and reaped and the old one is left
//! untouched: it never stopped serving. Because both share the listening
//! sockets (one open file description each), connections that arrive while
//! the old process winds down wait in the accept queue for the new one; the
//! old process must finish what it already accepted before exiting.
//!
//! A supervisor that crashes leaves the program serving. With
//! [`NotifyConfig::record_dir`] set, the supervisor keeps a [`NotifyRecord`]
//! (pid + kernel start time, listener addresses) so that the next one finds
//! that process ([`RecordStore::find_orphan`]), copies its listening sockets
//! back out of it (`pidfd_getfd`, [`Orphan::fetch_listener`]) and adopts it
//! ([`NotifySupervisor::adopt`]) instead of binding ports it still holds.
//!
//! This mode cannot carry state between builds (there is no handoff
//! protocol to seal it), and it is Linux-only (per-datagram credentials).

mod backend;
mod message;
mod probe;
mod record;
mod socket;

use std::path::PathBuf;

pub use backend::{
    NotifyConfig, NotifyOptions, NotifyPhase, NotifyPhaseDone, NotifyReport, NotifyStopped,
    NotifySupervisor, Readiness,
};
pub use message::{NotifyMessage, MAX_DATAGRAM};
pub use probe::ReadyProbe;
pub use record::{
    describe_fd, NotifyRecord, Orphan, ProcId, RecordError, RecordStore, RecordedListener,
    RECORD_FILE,
};
pub use socket::{Announced, NotifySocket, Watched};

use crate::child::Exit;
use crate::error::SpawnError;

/// Why a notify-mode start or upgrade failed; each leaves the old process
/// serving. ([`OldStopFailed`](Self::OldStopFailed) is the exception, and
/// never reaches a caller as an error: the new process serves regardless, and
/// the upgrade reports it among its warnings.)
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// Another start, upgrade, crash restart, adoption or stop is running
    /// (the supervisor does one at a time). Nothing was done: retry when it
    /// finishes.
    #[error("another upgrade is in progress; retry when it finishes")]
    InProgress,
    /// An upgrade found no running process to replace: it exited and has
    /// not been restarted yet, or none was ever started.
    #[error("there is no running process to upgrade from; start one first")]
    NoIncumbent,
    /// A notify socket could not be bound in
    /// [`NotifyConfig::socket_dir`], or its reader thread could not be
    /// started. Check that the dir exists and is the supervisor's.
    #[error("notify socket {path}: {source}")]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The new process could not be spawned.
    #[error("spawned: starting the new process: {0}")]
    Spawn(#[from] SpawnError),
    /// The new process did not become ready within the deadline: no
    /// `READY=1`, or the readiness probe never passed. It was sent the stop
    /// signal and, still running after the abort grace, SIGKILL; the old
    /// process was never touched.
    #[error("ready: the new process (pid {pid}) did not become ready within {waited_ms} ms ({waiting_for}){}; it was stopped (its stop signal, then SIGKILL once the abort grace ran out)", last_words(.status, .errno))]
    NotReady {
        /// The new process's pid.
        pid: u32,
        /// Milliseconds waited for it to become ready.
        waited_ms: u64,
        /// "READY=1", "the probe …" or both.
        waiting_for: String,
        /// Its last `STATUS=` text, if it sent one.
        status: Option<String>,
        /// The `ERRNO=` it reported, if any.
        errno: Option<i32>,
    },
    /// The new process exited before it was ready; see its exit status and
    /// last words.
    #[error("ready: the new process (pid {pid}) exited before it was ready: {exit}{}", last_words(.status, .errno))]
    Exited {
        /// The new process's pid.
        pid: u32,
        /// How it ended.
        exit: Exit,
        /// Its last `STATUS=` text, if it sent one.
        status: Option<String>,
        /// The `ERRNO=` it reported, if any.
        errno: Option<i32>,
    },
    /// The new process said `STOPPING=1` before `READY=1`: it is giving
    /// up. It was stopped like one that is not ready.
    #[error("ready: the new process (pid {pid}) sent STOPPING=1 before READY=1{}; it was stopped (its stop signal, then SIGKILL once the abort grace ran out)", last_words(.status, .errno))]
    StoppedBeforeReady {
        /// The new process's pid.
        pid: u32,
        /// Its last `STATUS=` text, if it sent one.
        status: Option<String>,
        /// The `ERRNO=` it reported, if any.
        errno: Option<i32>,
    },
    /// A process found by [`RecordStore::find_orphan`] could not be taken
    /// over: it is gone, or it cannot be watched.
    #[error("adopting pid {pid}, left serving by a previous supervisor: {source}")]
    Adopt {
        /// The orphan's pid.
        pid: u32,
        /// What failed.
        source: std::io::Error,
    },
    /// The old process could not be sent the stop signal. The new one
    /// serves regardless; an upgrade reports this among its warnings.
    #[error("old-signalled: sending {signal} to the old process (pid {pid}): {source}")]
    OldStopFailed {
        /// The old process's pid.
        pid: u32,
        /// The stop signal's name (`SIGTERM`).
        signal: &'static str,
        /// Why the signal could not be sent.
        source: std::io::Error,
    },
}

fn last_words(status: &Option<String>, errno: &Option<i32>) -> String {
    let mut s = String::new();
    if let Some(st) = status {
        s.push_str(&format!("; its last STATUS= was {st:?}"));
    }
    if let Some(e) = errno {
        s.push_str(&format!(
            "; it reported ERRNO={e} ({})",
            std::io::Error::from_raw_os_error(*e)
        ));
    }
    s
}
