//! Typed errors. Each names the phase and the peer it happened with, so a
//! log line or an aborted upgrade says what failed, where, and with whom.

use std::io;
use std::path::PathBuf;

use crate::frame::FrameError;
use crate::journal::JournalError;
use crate::lock::LockError;
use crate::phase::{Peer, SupervisorPhase};
use crate::protocol::{HandoffId, NoCommonVersion, Role};

/// A protocol violation or failure on one channel.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{phase}: reading from/writing to the {peer}: {source}")]
    Frame {
        peer: Peer,
        phase: &'static str,
        #[source]
        source: FrameError,
    },
    #[error("{phase}: the {peer} sent {message} for handoff {found:#018x}, but this is handoff {expected:#018x}")]
    WrongHandoffId {
        peer: Peer,
        phase: &'static str,
        message: &'static str,
        expected: HandoffId,
        found: HandoffId,
    },
    #[error("{phase}: the {peer} sent {message}, which is not legal in this phase")]
    Unexpected {
        peer: Peer,
        phase: &'static str,
        message: &'static str,
    },
    #[error("{phase}: expected a Hello from a {expected}, got one from a {found}")]
    WrongRole {
        phase: &'static str,
        expected: Role,
        found: Role,
    },
    #[error("{phase}: the {peer} announced pid {announced} but the kernel says the socket belongs to pid {kernel}")]
    PidMismatch {
        peer: Peer,
        phase: &'static str,
        announced: u32,
        kernel: u32,
    },
    #[error(
        "{phase}: the {peer}'s socket belongs to uid {uid}; only uid {ours} or root may take part"
    )]
    WrongUid {
        peer: Peer,
        phase: &'static str,
        uid: u32,
        ours: u32,
    },
    #[error("{phase}: the kernel attached no credentials to the {peer}'s Hello")]
    NoCredentials { peer: Peer, phase: &'static str },
    #[error("{phase}: {0}", phase = .1)]
    NoCommonVersion(#[source] NoCommonVersion, &'static str),
    #[error("{phase}: the {peer} did not answer within {waited_ms} ms ({clock})")]
    Timeout {
        peer: Peer,
        phase: &'static str,
        waited_ms: u64,
        /// "liveness" (silence) or "phase deadline" (wall clock).
        clock: &'static str,
    },
}

impl ProtocolError {
    /// The peer this error is about, where it names one.
    pub fn peer(&self) -> Option<Peer> {
        match self {
            ProtocolError::Frame { peer, .. }
            | ProtocolError::WrongHandoffId { peer, .. }
            | ProtocolError::Unexpected { peer, .. }
            | ProtocolError::PidMismatch { peer, .. }
            | ProtocolError::WrongUid { peer, .. }
            | ProtocolError::NoCredentials { peer, .. }
            | ProtocolError::Timeout { peer, .. } => Some(*peer),
            ProtocolError::WrongRole { expected, .. } => Some(match expected {
                Role::Incumbent => Peer::Incumbent,
                _ => Peer::Successor,
            }),
            ProtocolError::NoCommonVersion(..) => None,
        }
    }

    pub(crate) fn frame(peer: Peer, phase: &'static str, source: FrameError) -> ProtocolError {
        match source {
            FrameError::TimedOut { waited_ms } => ProtocolError::Timeout {
                peer,
                phase,
                waited_ms,
                clock: "liveness",
            },
            source => ProtocolError::Frame {
                peer,
                phase,
                source,
            },
        }
    }

    /// True when the peer went away (EOF, reset, broken pipe) rather than
    /// misbehaving.
    pub fn is_disconnect(&self) -> bool {
        match self {
            ProtocolError::Frame { source, .. } => match source {
                FrameError::Closed | FrameError::Truncated { .. } => true,
                FrameError::Io(e) => matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::UnexpectedEof
                ),
                _ => false,
            },
            _ => false,
        }
    }
}

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

impl From<crate::supervisor::ConnectError> for StopError {
    fn from(e: crate::supervisor::ConnectError) -> Self {
        match e {
            crate::supervisor::ConnectError::Connect { path, source } => {
                StopError::Connect { path, source }
            }
            crate::supervisor::ConnectError::Protocol(p) => StopError::Protocol(p),
        }
    }
}

/// Errors on the process side (incumbent or successor).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("environment: {0}")]
    Env(String),
    #[error(transparent)]
    ListenFds(#[from] crate::listeners::ListenFdsError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("control socket {path}: {source}")]
    ControlSocket { path: PathBuf, source: io::Error },
    #[error("the supervisor aborted this handoff: {reason}")]
    Aborted { reason: String },
    #[error("the supervisor went away before Begin; exiting so the incumbent keeps serving")]
    SupervisorGone,
    #[error("service: {0}")]
    Service(String),
}
