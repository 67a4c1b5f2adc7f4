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
    /// A frame could not be written to or read from the peer: the
    /// connection closed or broke, or what arrived was not a valid frame.
    /// [`is_disconnect`](Self::is_disconnect) tells a peer that went away
    /// from one that sent something wrong.
    #[error("{phase}: reading from/writing to the {peer}: {source}")]
    Frame {
        /// The process on the other end of the channel.
        peer: Peer,
        /// The phase this side was in, as its log lines name it.
        phase: &'static str,
        /// What went wrong with the connection or the frame.
        #[source]
        source: FrameError,
    },
    /// The peer sent a message for another handoff (or stop) than the one
    /// under way: a confused or misbehaving peer. The message is refused,
    /// not acted on.
    #[error("{phase}: the {peer} sent {message} for handoff {found:#018x}, but this is handoff {expected:#018x}")]
    WrongHandoffId {
        /// The process that sent the message.
        peer: Peer,
        /// The phase this side was in, as its log lines name it.
        phase: &'static str,
        /// The name of the message, such as `Drained`.
        message: &'static str,
        /// The id of the handoff or stop under way.
        expected: HandoffId,
        /// The id the message carried.
        found: HandoffId,
    },
    /// The peer sent a message that the protocol does not allow in this
    /// phase: a bug in the peer, or a peer that is not following the
    /// handoff protocol.
    #[error("{phase}: the {peer} sent {message}, which is not legal in this phase")]
    Unexpected {
        /// The process that sent the message.
        peer: Peer,
        /// The phase this side was in, as its log lines name it.
        phase: &'static str,
        /// The name of the message that arrived out of turn.
        message: &'static str,
    },
    /// A Hello announced another role than the one expected on that socket
    /// (a successor where the incumbent should answer, or the reverse): the
    /// wrong process is on the other end.
    #[error("{phase}: expected a Hello from a {expected}, got one from a {found}")]
    WrongRole {
        /// The phase this side was in, as its log lines name it.
        phase: &'static str,
        /// The role expected on this socket.
        expected: Role,
        /// The role the Hello announced.
        found: Role,
    },
    /// The process on the other end is not the one it should be: the pid
    /// its Hello announced is not the pid the kernel reports for the
    /// socket, or not the process the supervisor expected (the successor
    /// it spawned, the incumbent it recorded).
    #[error("{phase}: the {peer} announced pid {announced} but the kernel says the socket belongs to pid {kernel}")]
    PidMismatch {
        /// The process whose identity failed the check.
        peer: Peer,
        /// The phase this side was in, as its log lines name it.
        phase: &'static str,
        /// The pid the Hello announced; when the check was against the
        /// expected process, that process's pid instead.
        announced: u32,
        /// The pid the kernel reports for the socket (`SO_PEERCRED` or
        /// `SCM_CREDENTIALS`), or the announced one where it reports none.
        kernel: u32,
    },
    /// The control socket belongs to a process of another user, not root:
    /// someone else may have bound the path. Nothing is sent to it; check
    /// who owns the control socket path.
    #[error(
        "{phase}: the {peer}'s socket belongs to uid {uid}; only uid {ours} or root may take part"
    )]
    WrongUid {
        /// The process on the other end of the socket.
        peer: Peer,
        /// The phase this side was in, as its log lines name it.
        phase: &'static str,
        /// The peer's effective uid, as the kernel reports it.
        uid: u32,
        /// This process's effective uid.
        ours: u32,
    },
    /// On Linux, the successor's Hello arrived without the sender
    /// credentials (`SCM_CREDENTIALS`) the kernel should attach, so its pid
    /// cannot be checked.
    #[error("{phase}: the kernel attached no credentials to the {peer}'s Hello")]
    NoCredentials {
        /// The process whose Hello lacked credentials.
        peer: Peer,
        /// The phase this side was in, as its log lines name it.
        phase: &'static str,
    },
    /// The two sides share no protocol version (the error, and the phase
    /// this side was in): the builds are too far apart to hand off
    /// directly.
    #[error("{phase}: {0}", phase = .1)]
    NoCommonVersion(#[source] NoCommonVersion, &'static str),
    /// The peer sent nothing for too long: silence past the liveness
    /// timeout, or a phase not finished by its wall-clock deadline.
    #[error("{phase}: the {peer} did not answer within {waited_ms} ms ({clock})")]
    Timeout {
        /// The process that did not answer.
        peer: Peer,
        /// The phase this side was in, as its log lines name it.
        phase: &'static str,
        /// Milliseconds waited before giving up.
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
    #[error("the supervisor went away before Begin; exiting so the incumbent keeps serving")]
    SupervisorGone,
    /// The service's own code failed: its health check (the handoff is
    /// then aborted) or its `resume`. The text says which, and why.
    #[error("service: {0}")]
    Service(String),
}
