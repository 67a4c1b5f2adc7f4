//! Typed errors. Each names the phase and the peer it happened with, so a
//! log line or an aborted upgrade says what failed, where, and with whom.

use std::io;
use std::path::PathBuf;

use crate::journal::JournalError;
use crate::lock::LockError;
use crate::phase::SupervisorPhase;
use crate::protocol::HandoffId;
pub use crate::protocol_error::ProtocolError;

/// Spawning a successor failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("program {path} not found{}", if *.searched_path { " in PATH" } else { "" })]
    NotFound { path: PathBuf, searched_path: bool },
    #[error("cannot execute {path}: {source}")]
    Exec { path: PathBuf, source: io::Error },
    #[error("preparing to spawn {path}: {source}")]
    Prepare { path: PathBuf, source: io::Error },
}

/// Why a handoff did not commit.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("another handoff is in progress; retry when it finishes")]
    InProgress,
    #[error("there is no incumbent to hand off from; start one first")]
    NoIncumbent,
    #[error("connecting to the incumbent's control socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("spawning the successor: {0}")]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the incumbent failed to seal: {reason}")]
    SealFailed { reason: String },
    #[error("the successor failed its health check: {detail}")]
    Unhealthy { detail: String },
    #[error("the successor (pid {pid}) exited before Ready: {exit}")]
    SuccessorExited { pid: u32, exit: crate::child::Exit },
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    #[error("handoff {handoff_id:#018x} aborted while {phase}: {cause}{}", resumed_note(*.incumbent_resumed))]
    Aborted {
        handoff_id: HandoffId,
        phase: SupervisorPhase,
        cause: Box<HandoffError>,
        /// Whether an incumbent was told to resume (false on a first start).
        incumbent_resumed: bool,
    },
}

fn resumed_note(resumed: bool) -> &'static str {
    if resumed {
        "; the successor was stopped and the incumbent keeps serving"
    } else {
        "; the successor was stopped"
    }
}

impl HandoffError {
    /// Whether this failure says the successor itself stopped answering or
    /// misbehaved (so an abort kills it at once) rather than a failure
    /// elsewhere — the incumbent, the journal, a failed health check the
    /// successor reported — after which it is asked to stop and given
    /// [`crate::Timeouts::abort_grace`] to finish what it accepted.
    pub fn blames_successor(&self) -> bool {
        match self {
            HandoffError::SuccessorExited { .. } => true,
            HandoffError::Protocol(p) => p.peer() == Some(crate::phase::Peer::Successor),
            HandoffError::Aborted { cause, .. } => cause.blames_successor(),
            _ => false,
        }
    }

    /// The root cause, looking through `Aborted`.
    pub fn cause(&self) -> &HandoffError {
        match self {
            HandoffError::Aborted { cause, .. } => cause.cause(),
            e => e,
        }
    }
}

/// Why the incumbent could not be stopped through the control protocol
/// ([`Supervisor::request_stop`](crate::Supervisor::request_stop)). Each
/// leaves the caller to stop it another way — a signal — and to say why.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("pid {pid} is not the running incumbent")]
    NotIncumbent { pid: u32 },
    #[error("connecting to the incumbent's control socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the incumbent (pid {pid}) speaks protocol versions {theirs}: a build from before stopping through the control protocol (version {needed})")]
    Unsupported {
        pid: u32,
        theirs: crate::protocol::VersionRange,
        needed: crate::protocol::ProtoVersion,
    },
}

/// Errors on the process side (incumbent or successor).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The process was started with an environment it cannot use: a
    /// variable such as `HANDOFF_STATE_DIR` missing with no default
    /// configured, a bad `HANDOFF_ROLE` or `HANDOFF_SOCK_FD`, or a passed
    /// listener that could not be duplicated. The text says which.
    #[error("environment: {0}")]
    Env(String),
    /// The listening sockets passed in `LISTEN_FDS` could not be taken.
    #[error(transparent)]
    ListenFds(#[from] crate::listeners::ListenFdsError),
    /// The channel to the supervisor failed, or the supervisor broke the
    /// protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The state lock could not be taken; for a successor, the sealed
    /// incumbent did not release it in time.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The control socket could not be bound, or stopped accepting for a
    /// reason a retry cannot pass (running out of descriptors is waited
    /// out, not reported).
    #[error("control socket {path}: {source}")]
    ControlSocket {
        /// The control socket's path.
        path: PathBuf,
        /// The error from binding or accepting.
        source: io::Error,
    },
    /// The supervisor aborted the handoff before Begin. The successor
    /// should exit: the incumbent keeps serving.
    #[error("the supervisor aborted this handoff: {reason}")]
    Aborted {
        /// The reason the supervisor gave in its Abort.
        reason: String,
    },
    /// The supervisor hung up before this successor became the incumbent
    /// (before Begin, or before it read Ready). The successor should exit:
    /// the incumbent keeps serving.
    #[error("the supervisor went away before this process became the incumbent (before Begin, or before it read Ready); exiting so the old process keeps serving")]
    SupervisorGone,
    /// The service's own code failed: its health check (the handoff is
    /// then aborted) or its `resume`. The text says which, and why.
    #[error("service: {0}")]
    Service(String),
}
