//! The wire layer's error: a protocol violation or failure on one channel,
//! naming the phase and the peer it happened with. It sits with frames and
//! messages, below the roles: the legality table (`phase`) and the channel
//! report it without depending on supervisor or service plumbing, whose own
//! errors (`error`) wrap it.

use std::io;

use crate::frame::FrameError;
use crate::protocol::{HandoffId, NoCommonVersion, Peer, Role};

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
    /// The pid a Hello announced is not the pid the kernel reports for
    /// the socket: the peer lies about who it is, or is not the process
    /// that made the connection.
    #[error("{phase}: the {peer} announced pid {announced} but the kernel says the socket belongs to pid {kernel}")]
    PidMismatch {
        /// The process whose identity failed the check.
        peer: Peer,
        /// The phase this side was in, as its log lines name it.
        phase: &'static str,
        /// The pid the Hello announced.
        announced: u32,
        /// The pid the kernel reports for the socket (`SO_PEERCRED` or
        /// `SCM_CREDENTIALS`).
        kernel: u32,
    },
    /// The peer is not the process the supervisor expected (the successor
    /// it spawned, the incumbent it recorded or is stopping): another
    /// process answered in its place.
    #[error("{phase}: the {peer} is pid {found}, not pid {expected} as expected (another process answered in its place)")]
    NotExpected {
        /// The process whose identity failed the check.
        peer: Peer,
        /// The phase this side was in, as its log lines name it.
        phase: &'static str,
        /// The pid the supervisor expected.
        expected: u32,
        /// The peer's pid: the kernel's where it reports one, else the
        /// Hello's.
        found: u32,
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
            | ProtocolError::NotExpected { peer, .. }
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
