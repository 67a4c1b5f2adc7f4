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
    /// The program does not exist: a path with a slash that is not there,
    /// or a bare name no `PATH` directory has as an executable file. Check
    /// the path given to the supervisor (and its `PATH`).
    #[error("program {path} not found{}", if *.searched_path { " in PATH" } else { "" })]
    NotFound {
        /// The program as the supervisor was given it.
        path: PathBuf,
        /// Whether it was a bare name looked up through `PATH`.
        searched_path: bool,
    },
    /// The child could not be started (no processes or memory left), or
    /// it failed before running the program — in `execve` (not executable,
    /// a bad interpreter line) or in the descriptor shuffle before it. The
    /// child's errno comes back through a close-on-exec pipe.
    #[error("cannot execute {path}: {source}")]
    Exec {
        /// The resolved program path.
        path: PathBuf,
        /// The error from starting the child, or the child's errno.
        source: io::Error,
    },
    /// Something the spawn needs around the child failed: the control
    /// socketpair, the argument and environment blocks (a NUL byte in one,
    /// or `=` in a variable's name), or the thread that reaps the child.
    #[error("preparing to spawn {path}: {source}")]
    Prepare {
        /// The program being spawned.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

/// Why a handoff did not commit.
///
/// The supervisor's handoff methods (`start`, `perform_handoff`,
/// `prepare`, `restart_if_dead`) return [`InProgress`](Self::InProgress)
/// and [`NoIncumbent`](Self::NoIncumbent) before anything starts; every
/// failure after that comes back as [`Aborted`](Self::Aborted), whose
/// `cause` is one of the other variants ([`HandoffError::cause`] finds
/// it). Crash recovery (`resume_from_journal`) returns the others as they
/// are.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The supervisor's single handoff slot is taken: by another upgrade,
    /// a start, crash restart, prepare or stop, or a quiesce for replacing
    /// the supervisor's binary. Nothing was done; retry when it finishes
    /// (`handoff upgrade --wait` waits instead).
    #[error("another handoff is in progress; retry when it finishes")]
    InProgress,
    /// An upgrade or prepare found no running incumbent: it exited and the
    /// crash monitor has not restarted it yet, or none was ever started.
    #[error("there is no incumbent to hand off from; start one first")]
    NoIncumbent,
    /// The incumbent's control socket could not be connected to: nobody
    /// listens there (the incumbent died or is re-binding), or the path is
    /// wrong or unreachable. The successor is stopped; check that the
    /// incumbent runs and that the supervisor and service agree on the path.
    #[error("connecting to the incumbent's control socket {path}: {source}")]
    Connect {
        /// The control socket's path.
        path: PathBuf,
        /// The error `connect(2)` returned.
        source: io::Error,
    },
    /// The successor could not be spawned; the incumbent was not asked
    /// anything.
    #[error("spawning the successor: {0}")]
    Spawn(#[from] SpawnError),
    /// A peer broke the protocol, timed out, hung up or failed an identity
    /// check; the error names which peer and in which phase.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The incumbent's seal failed (SealFailed); it keeps the state lock
    /// and resumes. Look at the service's own logs for why.
    #[error("the incumbent failed to seal: {reason}")]
    SealFailed {
        /// The service's error, as the incumbent reported it.
        reason: String,
    },
    /// The successor said Ready with its health check failed; it exits by
    /// itself and the incumbent resumes. Fix the new build.
    #[error("the successor failed its health check: {detail}")]
    Unhealthy {
        /// The health check's error (Ready's `health` metadata), or "no
        /// detail given".
        detail: String,
    },
    /// The successor exited before Ready — crashed, failed its start-up,
    /// or gave up; its exit status says how. Its own logs say why.
    #[error("the successor (pid {pid}) exited before Ready: {exit}")]
    SuccessorExited {
        /// The successor's pid.
        pid: u32,
        /// How it ended.
        exit: crate::child::Exit,
    },
    /// The journal could not be written (or, when a restarted supervisor
    /// reads it, read): the state dir is full, read-only or gone. A
    /// handoff does not go on without it, since a supervisor restarted
    /// after a crash would not know which process holds the state lock.
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    /// The handoff started and then failed: the successor was stopped and,
    /// where there was one, the incumbent told to resume.
    #[error("handoff {handoff_id:#018x} aborted while {phase}: {cause}{}", resumed_note(*.incumbent_resumed))]
    Aborted {
        /// The handoff's id, as in the supervisor's and the processes' logs.
        handoff_id: HandoffId,
        /// The phase the handoff was in when it failed.
        phase: SupervisorPhase,
        /// What failed: one of the other variants.
        cause: Box<HandoffError>,
        /// Whether the incumbent serves on: it was sent ResumeAfterAbort,
        /// or was greeted but never asked to drain. False when there was
        /// none (a first start), it died or could not be reached, or
        /// ResumeAfterAbort could not be sent.
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
    /// The pid asked for is not the supervisor's running incumbent: it has
    /// exited, or a handoff that finished meanwhile replaced it.
    #[error("pid {pid} is not the running incumbent")]
    NotIncumbent {
        /// The pid the caller asked to stop.
        pid: u32,
    },
    /// The incumbent's control socket could not be connected to (nobody
    /// listens there, or the path is unreachable).
    #[error("connecting to the incumbent's control socket {path}: {source}")]
    Connect {
        /// The control socket's path.
        path: PathBuf,
        /// The error `connect(2)` returned.
        source: io::Error,
    },
    /// The greeting or the drain went wrong: an identity check failed, the
    /// incumbent broke the protocol, hung up (its drain failed and it
    /// serves on, or it died) or outlived the grace.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The incumbent is a build that predates [`Message::Shutdown`]
    /// (protocol version [`SHUTDOWN_SINCE`]). The supervisor hung up before
    /// HelloAck, so it serves on untouched.
    ///
    /// [`Message::Shutdown`]: crate::protocol::Message::Shutdown
    /// [`SHUTDOWN_SINCE`]: crate::protocol::SHUTDOWN_SINCE
    #[error("the incumbent (pid {pid}) speaks protocol versions {theirs}: a build from before stopping through the control protocol (version {needed})")]
    Unsupported {
        /// The incumbent's pid.
        pid: u32,
        /// The versions its Hello offered.
        theirs: crate::protocol::VersionRange,
        /// The first version with Shutdown ([`SHUTDOWN_SINCE`]).
        ///
        /// [`SHUTDOWN_SINCE`]: crate::protocol::SHUTDOWN_SINCE
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
