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

/// Why a notify-mode start or upgrade failed. Every variant before
/// [`OldStopFailed`](Self::OldStopFailed) leaves the old process serving.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("another upgrade is in progress; retry when it finishes")]
    InProgress,
    #[error("there is no running process to upgrade from; start one first")]
    NoIncumbent,
    #[error("notify socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spawned: starting the new process: {0}")]
    Spawn(#[from] SpawnError),
    #[error("ready: the new process (pid {pid}) did not become ready within {waited_ms} ms ({waiting_for}){}; it was killed", last_words(.status, .errno))]
    NotReady {
        pid: u32,
        waited_ms: u64,
        /// "READY=1", "the probe …" or both.
        waiting_for: String,
        status: Option<String>,
        errno: Option<i32>,
    },
    #[error("ready: the new process (pid {pid}) exited before it was ready: {exit}{}", last_words(.status, .errno))]
    Exited {
        pid: u32,
        exit: Exit,
        status: Option<String>,
        errno: Option<i32>,
    },
    #[error("ready: the new process (pid {pid}) sent STOPPING=1 before READY=1{}; it was killed", last_words(.status, .errno))]
    StoppedBeforeReady {
        pid: u32,
        status: Option<String>,
        errno: Option<i32>,
    },
    #[error("adopting pid {pid}, left serving by a previous supervisor: {source}")]
    Adopt { pid: u32, source: std::io::Error },
    #[error("old-signalled: sending {signal} to the old process (pid {pid}): {source}")]
    OldStopFailed {
        pid: u32,
        signal: &'static str,
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
