//! Messages, protocol versions and version negotiation (docs/design.md §4).
//!
//! A payload is one tag byte followed by the postcard encoding of that
//! message's body. Keeping the tag outside postcard means an unknown message
//! is reported as exactly that ([`FrameError::UnknownMessage`]) instead of as a
//! generic deserialisation failure, and a newer peer can add messages without
//! an older one misreading them.
//!
//! `Hello` and `HelloAck` are frozen: they are always sent in version-1 frames
//! with the same body layout, so any two builds can at least agree on whether
//! they share a version.
//!
//! Versions:
//! * 1 — the handoff (PrepareHandoff … Commit) and FetchListeners.
//! * 2 — adds [`Message::Shutdown`] / [`Message::ShutdownDrained`]: `handoff
//!   stop` drains the incumbent through the control socket instead of
//!   signalling it. A message is legal only on a channel whose negotiated
//!   version has it ([`Message::since`]); the channel refuses the rest both
//!   ways, so a peer of an older build never sees one.
//! * 3 — moves live connections to the successor instead of closing them
//!   (docs/connection-transfer.md): [`Message::PrepareHandoffV3`] says
//!   whether to, [`Message::Connections`] carries a batch of them (their
//!   descriptors attached), [`Message::ConnectionsDone`] counts them. Used
//!   only when the incumbent *and* the successor negotiated 3; otherwise the
//!   drain closes connections as before.
//! * 4 — the moved connections go straight from the incumbent to the
//!   successor, on a socket pair the supervisor makes for the handoff
//!   ([`Message::PrepareHandoffV4`] to the incumbent and
//!   [`Message::MoveChannel`] to the successor, one end attached to each),
//!   instead of through the supervisor: it received, re-sent and closed
//!   every descriptor, a fifth of the CPU a large drain costs. Used only
//!   when both peers negotiated 4; with a peer at 3 the supervisor relays.
//! * 5 — no new message: an incumbent that said Drained seals at once, and
//!   the supervisor sends no [`Message::SealRequest`]. Nothing happens
//!   between the two (the supervisor only journaled the phase), and the
//!   round trip was two wake-ups inside the accept gap — on a machine
//!   saturated by its own clients, a millisecond or more each. An abort
//!   that comes meanwhile finds the incumbent sealed, as one during the
//!   seal always could: it takes its lock back and serves (docs/design.md
//!   §4.2). With an incumbent at 4 or less the supervisor asks, as before.

use serde::{Deserialize, Serialize};

use crate::frame::FrameError;
pub use crate::version::{ProtoVersion, PROTO_MAX, PROTO_MIN};
/// First version with [`Message::Shutdown`] and [`Message::ShutdownDrained`]:
/// a supervisor that negotiated less with an incumbent must stop it another
/// way (a signal).
pub const SHUTDOWN_SINCE: ProtoVersion = 2;
/// First version that moves connections ([`Message::PrepareHandoffV3`],
/// [`Message::Connections`], [`Message::ConnectionsDone`]).
pub const MOVE_SINCE: ProtoVersion = 3;
/// First version that moves connections on a direct incumbent → successor
/// socket ([`Message::PrepareHandoffV4`], [`Message::MoveChannel`]).
pub const MOVE_DIRECT_SINCE: ProtoVersion = 4;
/// First version whose incumbent seals as soon as it has said Drained,
/// without waiting for [`Message::SealRequest`].
pub const SEAL_AT_ONCE_SINCE: ProtoVersion = 5;
/// Version of the frames carrying `Hello`/`HelloAck`, fixed forever.
pub const HELLO_FRAME_VERSION: ProtoVersion = 1;

/// The peer a supervisor talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peer {
    /// The serving process, asked to drain and seal.
    Incumbent,
    /// The new process, spawned to take over from the incumbent.
    Successor,
    /// The supervisor, as the incumbent or successor sees it.
    Supervisor,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Peer::Incumbent => "incumbent",
            Peer::Successor => "successor",
            Peer::Supervisor => "supervisor",
        })
    }
}

/// Identifies one handoff; carried by every handoff-scoped message.
pub type HandoffId = u64;

/// A handoff id as operators see it everywhere — `handoff upgrade`, status,
/// logs — so one grep correlates them: `0x` and 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdHex(pub HandoffId);

impl std::fmt::Display for IdHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

/// Who is speaking on a control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The supervisor. It never sends Hello; it is the role named when a
    /// process and its supervisor share no version.
    Supervisor,
    /// The serving process, which says Hello to each control connection.
    Incumbent,
    /// A process the supervisor spawned to take over, which says Hello once
    /// it has warmed up.
    Successor,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Supervisor => "supervisor",
            Role::Incumbent => "incumbent",
            Role::Successor => "successor",
        })
    }
}

/// An inclusive range of protocol versions a peer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    /// The lowest version spoken.
    pub min: ProtoVersion,
    /// The highest version spoken.
    pub max: ProtoVersion,
}

impl VersionRange {
    /// The range this build speaks.
    pub const OURS: VersionRange = VersionRange {
        min: PROTO_MIN,
        max: PROTO_MAX,
    };
}

impl std::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

/// No version both peers speak.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no common protocol version: we speak {ours}, the {peer} speaks {theirs}; upgrade in smaller steps so adjacent builds overlap")]
pub struct NoCommonVersion {
    /// The versions the side reporting the error speaks.
    pub ours: VersionRange,
    /// The versions the peer offered; for a process checking its
    /// supervisor's HelloAck, the one version the supervisor chose.
    pub theirs: VersionRange,
    /// The role of the peer that offered `theirs`.
    pub peer: Role,
}

/// Picks the highest version inside both ranges.
///
/// An empty range on either side (min > max) shares nothing with anything.
pub fn negotiate(
    ours: VersionRange,
    theirs: VersionRange,
    peer: Role,
) -> Result<ProtoVersion, NoCommonVersion> {
    let lo = ours.min.max(theirs.min);
    let hi = ours.max.min(theirs.max);
    if ours.min > ours.max || theirs.min > theirs.max || lo > hi {
        return Err(NoCommonVersion { ours, theirs, peer });
    }
    Ok(hi)
}

/// First message on every channel, from the process side (incumbent or
/// successor) to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Who is speaking: an incumbent on a connection to its control socket,
    /// a successor on the socketpair it was spawned with. The supervisor
    /// refuses the other one
    /// ([`ProtocolError::WrongRole`](crate::ProtocolError::WrongRole)).
    pub role: Role,
    /// The sender's own pid. Believed only where the kernel agrees
    /// (`SO_PEERCRED` on the control socket, `SCM_CREDENTIALS` on a
    /// successor's socketpair) and where it is the process the supervisor
    /// expects there (docs/design.md §4.5).
    pub pid: u32,
    /// Lowest protocol version the sender speaks.
    pub proto_min: ProtoVersion,
    /// Highest protocol version the sender speaks; the supervisor picks the
    /// highest version inside both its range and this one ([`negotiate`]).
    pub proto_max: ProtoVersion,
    /// The sender's build name
    /// ([`ProcessConfig::build_id`](crate::ProcessConfig::build_id)), shown
    /// in the supervisor's status, reports and logs; never interpreted.
    pub build_id: String,
}

impl Hello {
    /// The versions the sender offers, `proto_min ..= proto_max`, as
    /// [`negotiate`] takes them.
    pub fn range(&self) -> VersionRange {
        VersionRange {
            min: self.proto_min,
            max: self.proto_max,
        }
    }
}

/// One connection in a [`Message::Connections`] batch; its descriptor is
/// the one at the same index among the frame's `SCM_RIGHTS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedMeta {
    /// Bytes the old owner had read from the socket and not consumed (for
    /// HTTP/1.1, the start of a pipelined request): the new owner reads
    /// them before the socket.
    pub unread: Vec<u8>,
    /// Opaque per-connection state from the service (which listener it
    /// came from, a session, ...).
    pub state: Vec<u8>,
}

impl MovedMeta {
    /// A [`Message::Connections`] batch must bring one descriptor per
    /// entry: anything else is a broken or hostile sender, refused whole.
    pub(crate) fn check_batch(entries: usize, descriptors: usize) -> Result<(), FrameError> {
        if entries == descriptors {
            return Ok(());
        }
        Err(FrameError::Malformed {
            message: "Connections",
            reason: format!("{entries} connections but {descriptors} descriptors attached"),
        })
    }
}

/// Every message of the protocol.
///
/// docs/design.md §4.3 has the table of tags, directions and versions,
/// §4.4 which message is legal in which phase. Durations on the wire are
/// whole milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Incumbent or successor → supervisor: the first frame on every
    /// channel (see [`Hello`]). Always sent in a version-1 frame.
    Hello(Hello),
    /// Supervisor → incumbent or successor: the answer to Hello. Always
    /// sent in a version-1 frame; every later frame on the channel carries
    /// the version it names.
    HelloAck {
        /// The version chosen: the highest in both ranges ([`negotiate`]).
        version: ProtoVersion,
    },
    /// Supervisor → incumbent, on a channel negotiated below
    /// [`MOVE_SINCE`] (from there on, [`Message::PrepareHandoffV3`]): a
    /// successor is warm; stop accepting and drain. Opens the handoff on
    /// the incumbent's side.
    PrepareHandoff {
        /// The id the supervisor chose for this handoff (random, not reused
        /// across restarts). Every later message of the handoff carries it;
        /// one with another id is refused
        /// ([`ProtocolError::WrongHandoffId`](crate::ProtocolError::WrongHandoffId)).
        handoff_id: HandoffId,
        /// Pid of the successor the supervisor spawned; the incumbent only
        /// logs it.
        successor_pid: u32,
        /// What remains of the overall deadline when this is sent, in ms.
        /// The incumbent waits for SealRequest until then (plus the wire
        /// slack), and for Commit until then plus the wire slack and its
        /// `lock_wait`.
        deadline_ms: u64,
        /// Budget for draining, in ms; never more than `deadline_ms`.
        drain_grace_ms: u64,
    },
    /// Incumbent → supervisor: the service's drain returned (it is
    /// expected to within the drain grace). The incumbent no longer accepts
    /// and waits for SealRequest or ResumeAfterAbort. When connections
    /// move, every [`Message::Connections`] batch and
    /// [`Message::ConnectionsDone`] come first.
    Drained {
        /// The handoff being drained for.
        handoff_id: HandoffId,
        /// Connections still open when the drain returned (0 for a full
        /// drain), as the service's [`DrainReport`](crate::DrainReport)
        /// said. Informational: the supervisor seals either way.
        open_conns_remaining: u64,
        /// Whether the service has stopped accepting, as its
        /// [`DrainReport`](crate::DrainReport) said. Informational too.
        accept_closed: bool,
    },
    /// Supervisor → incumbent, after Drained: make the state durable and
    /// hand it over ([`Drainable::seal`](crate::Drainable::seal)).
    SealRequest {
        /// The handoff whose drain has ended.
        handoff_id: HandoffId,
    },
    /// Incumbent → supervisor while the service seals: its
    /// `progress(done, total)` calls, relayed as they happen. A keepalive:
    /// it resets the liveness clock and ends nothing.
    SealProgress {
        /// The handoff being sealed for.
        handoff_id: HandoffId,
        /// Work sealed so far, in the service's own units (records,
        /// bytes…); passed through unchecked.
        done: u64,
        /// The work the seal expects in all, in the same units.
        total: u64,
    },
    /// Incumbent → supervisor: the seal succeeded and the incumbent has
    /// released the state lock (just before sending this); it waits for
    /// Commit or ResumeAfterAbort.
    SealComplete {
        /// The handoff sealed for.
        handoff_id: HandoffId,
        /// Small opaque state the incumbent hands to its successor: what
        /// [`Drainable::seal`](crate::Drainable::seal) returned, relayed
        /// unchanged in [`Message::Begin`].
        state: Option<Vec<u8>>,
    },
    /// Incumbent → supervisor: the seal failed. The incumbent still holds
    /// the state lock and resumes whatever the supervisor does next; the
    /// supervisor aborts the handoff
    /// ([`HandoffError::SealFailed`](crate::HandoffError::SealFailed)).
    SealFailed {
        /// The handoff whose seal failed.
        handoff_id: HandoffId,
        /// The service's error, as text, for the supervisor's report.
        error: String,
    },
    /// Supervisor → successor, once the incumbent has sealed (or there is
    /// none, or it died mid-handoff): take the state lock, bind the control
    /// socket, run the health check, then say Ready. The journal record
    /// naming the successor is durable before this is sent
    /// (docs/design.md §6.1).
    Begin {
        /// The handoff the successor takes over in.
        handoff_id: HandoffId,
        /// The incumbent's sealed state (SealComplete's `state`); `None`
        /// when it sealed none or there was no incumbent to seal.
        state: Option<Vec<u8>>,
    },
    /// Successor → supervisor: the successor holds the state lock, has
    /// bound the control socket and has run its health check. Healthy, it
    /// is the incumbent from the moment the supervisor reads this, whatever
    /// happens next; unhealthy, the handoff aborts.
    Ready {
        /// The handoff Begin named.
        handoff_id: HandoffId,
        /// Names of the listeners the successor was given
        /// (`LISTEN_FDNAMES`); for the record, the supervisor does not
        /// check them.
        listening_on: Vec<String>,
        /// Whether the service's health check passed. `false` aborts the
        /// handoff ([`HandoffError::Unhealthy`](crate::HandoffError::Unhealthy))
        /// and the incumbent resumes.
        healthz_ok: bool,
        /// Free-form key/value pairs. The library's successor sends
        /// `build_id` (recorded as the new incumbent's build) and, when its
        /// health check failed, `health` with the check's error (the detail
        /// of `HandoffError::Unhealthy`).
        metadata: Vec<(String, String)>,
    },
    /// Supervisor → successor, then → incumbent: the handoff is done. The
    /// successor is the incumbent; the old one retires, finishes its
    /// connections and exits. The successor hears it first
    /// (docs/design.md §2.2).
    Commit {
        /// The handoff that committed.
        handoff_id: HandoffId,
    },
    /// Supervisor → successor, before Ready: the handoff failed (or a
    /// successor prepared ahead is discarded or replaced). The successor
    /// exits, finishing any connections it accepted early. One the failure
    /// blames (it exited, timed out or broke the protocol) is killed at
    /// once; any other gets the abort grace before SIGKILL
    /// (docs/design.md §6.2).
    Abort {
        /// The handoff that failed (or the prepared successor's).
        handoff_id: HandoffId,
        /// Why, as text: the handoff's error, or why a prepared successor
        /// is stopped. The successor reports it in
        /// [`ProcessError::Aborted`](crate::ProcessError::Aborted).
        reason: String,
    },
    /// Supervisor → incumbent that was sent PrepareHandoff: the handoff
    /// aborted; accept again. A sealed incumbent first re-takes the state
    /// lock (docs/design.md §6.3). One only greeted is not told: it sees
    /// its connection close and serves on.
    ResumeAfterAbort {
        /// The handoff that aborted.
        handoff_id: HandoffId,
    },
    /// Incumbent → supervisor while it drains (for a handoff or a stop) or
    /// seals, successor → supervisor while its health check runs: a
    /// keepalive sent every
    /// [`Timeouts::heartbeat`](crate::Timeouts::heartbeat). It resets the
    /// liveness clock and ends no phase.
    Heartbeat {
        /// The handoff under way, or during a stop the
        /// [`Message::Shutdown`]'s `stop_id`.
        handoff_id: HandoffId,
    },
    /// From a supervisor restarted after a crash: send me the listeners.
    FetchListeners {},
    /// The incumbent's copies of the listeners, attached as `SCM_RIGHTS`,
    /// in `names` order.
    Listeners {
        /// One name per attached descriptor (`LISTEN_FDNAMES`, as the
        /// incumbent was given them); a reply whose count differs from the
        /// descriptors' is refused.
        names: Vec<String>,
    },
    /// Supervisor → idle incumbent (version ≥ [`SHUTDOWN_SINCE`]): stop
    /// serving for good, with no successor (`handoff stop`). The incumbent
    /// drains within `drain_grace_ms`, heartbeating with `stop_id` meanwhile,
    /// answers [`Message::ShutdownDrained`], retires and exits once its
    /// connections are done. There is no seal: it keeps the state lock until
    /// it exits.
    Shutdown {
        /// Scopes the exchange like a handoff id: the incumbent's
        /// Heartbeats and its reply carry it.
        stop_id: HandoffId,
        /// The drain's budget, in ms (the stop's grace). Whatever is still
        /// running once the grace is over may be sent SIGKILL by the
        /// supervisor's caller.
        drain_grace_ms: u64,
    },
    /// Incumbent → supervisor: the drain asked by [`Message::Shutdown`] is
    /// done (as far as it got within the grace), and the process is retiring.
    ///
    /// Deliberately not [`Message::Drained`]: Drained means "paused, state
    /// lock held, ready to seal or resume" and is legal only while a
    /// handoff drains; this one means "leaving for good". One meaning per
    /// message keeps the phase table literal.
    ShutdownDrained {
        /// The `stop_id` of the Shutdown this answers.
        stop_id: HandoffId,
        /// Connections still open when the drain returned; the incumbent
        /// finishes them before it exits.
        open_conns_remaining: u64,
        /// Whether the service has stopped accepting, as its
        /// [`DrainReport`](crate::DrainReport) said.
        accept_closed: bool,
    },
    /// Version ≥ [`MOVE_SINCE`]: PrepareHandoff (whose version-1 body is
    /// frozen) with whether the incumbent may move its idle connections to
    /// the successor — true only when the successor negotiated ≥ 3 too.
    PrepareHandoffV3 {
        /// As in [`Message::PrepareHandoff`]: the id every later message of
        /// the handoff carries.
        handoff_id: HandoffId,
        /// Pid of the successor the supervisor spawned (logged).
        successor_pid: u32,
        /// What remains of the overall deadline, in ms; it also bounds each
        /// write of moved connections.
        deadline_ms: u64,
        /// Budget for draining, in ms; never more than `deadline_ms`.
        drain_grace_ms: u64,
        /// Whether the drain may hand connections to the successor
        /// ([`Mover::offer`](crate::Mover::offer)); `false` (the successor
        /// speaks less than version 3) makes it close them, as before.
        move_connections: bool,
        /// Most descriptors the incumbent may have on their way to the
        /// supervisor at once (sent, not yet read): a quarter of the
        /// supervisor's soft `RLIMIT_NOFILE`, what it can take in under its
        /// own descriptor limit. A batch is at most this, and at most 253.
        max_in_flight: u32,
    },
    /// Version ≥ [`MOVE_SINCE`]: a batch of connections, their descriptors
    /// attached (`SCM_RIGHTS`, one per entry, in order; at most 253).
    /// Incumbent → supervisor while draining; supervisor → successor, as
    /// received, while it waits for Begin. The sender keeps its own copies
    /// until the handoff's outcome (docs/connection-transfer.md).
    Connections {
        /// The handoff the connections move in.
        handoff_id: HandoffId,
        /// One entry per attached descriptor, in the same order; a count
        /// that does not match the descriptors fails the handoff.
        conns: Vec<MovedMeta>,
    },
    /// Version ≥ [`MOVE_SINCE`]: incumbent → supervisor, before Drained:
    /// how many connections the drain moved and how many it closed.
    ConnectionsDone {
        /// The handoff being drained for.
        handoff_id: HandoffId,
        /// Connections sent in Connections batches. The supervisor warns in
        /// its report when this differs from the count it relayed.
        moved: u64,
        /// Connections the drain closed instead
        /// ([`Mover::closed`](crate::Mover::closed)).
        closed: u64,
    },
    /// Version ≥ [`MOVE_DIRECT_SINCE`]: PrepareHandoff for an incumbent
    /// that moves its idle connections straight to the successor. One
    /// descriptor is attached: a socket whose other end the successor got
    /// ([`Message::MoveChannel`]). The incumbent sends its
    /// [`Message::Connections`] batches there, then a
    /// [`Message::ConnectionsDone`] there *and* to the supervisor, all
    /// before Drained (docs/connection-transfer.md).
    PrepareHandoffV4 {
        /// As in [`Message::PrepareHandoff`].
        handoff_id: HandoffId,
        /// Pid of the successor the supervisor spawned (logged).
        successor_pid: u32,
        /// What remains of the overall deadline, in ms; it also bounds each
        /// write of moved connections.
        deadline_ms: u64,
        /// Budget for draining, in ms; never more than `deadline_ms`.
        drain_grace_ms: u64,
        /// Most descriptors the incumbent may have on their way to the
        /// successor at once (sent, not yet read): a quarter of the
        /// successor's soft `RLIMIT_NOFILE`. A batch is at most this, and
        /// at most 253.
        max_in_flight: u32,
    },
    /// Version ≥ [`MOVE_DIRECT_SINCE`]: supervisor → successor while it
    /// waits for Begin, before the incumbent is asked to drain: one
    /// descriptor attached, the socket on which the incumbent will send the
    /// connections it moves. Read alongside the control channel until
    /// Begin; every batch on it comes before Begin.
    MoveChannel {
        /// The handoff the connections move in.
        handoff_id: HandoffId,
    },
}

macro_rules! bodies {
    ($( $tag:literal $name:ident { $($field:ident : $ty:ty),* } )*) => {
        mod body {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[derive(serde::Serialize, serde::Deserialize)]
                pub struct $name { $(pub $field: $ty),* }
            )*
        }

        impl Message {
            /// The message's name, for errors and logs.
            pub fn name(&self) -> &'static str {
                match self {
                    Message::Hello(_) => "Hello",
                    $( Message::$name { .. } => stringify!($name), )*
                }
            }

            /// Payload bytes: tag then postcard body.
            pub fn encode(&self) -> Vec<u8> {
                let (tag, body) = match self {
                    Message::Hello(h) => (0u8, postcard::to_stdvec(h)),
                    $( Message::$name { $($field),* } => (
                        $tag,
                        postcard::to_stdvec(&body::$name { $($field: $field.clone()),* }),
                    ), )*
                };
                // postcard serialisation of these plain structs into a Vec
                // cannot fail (no maps with non-string keys, no I/O).
                let body = body.unwrap_or_default();
                let mut out = Vec::with_capacity(1 + body.len());
                out.push(tag);
                out.extend_from_slice(&body);
                out
            }

            /// Parses a payload. Unknown tags, short or over-long bodies are
            /// typed errors.
            pub fn decode(payload: &[u8]) -> Result<Message, FrameError> {
                let (&tag, body) = payload.split_first().ok_or(FrameError::Empty)?;
                match tag {
                    0 => Ok(Message::Hello(strict::<Hello>("Hello", body)?)),
                    $( $tag => {
                        #[allow(unused_variables)]
                        let b: body::$name = strict(stringify!($name), body)?;
                        Ok(Message::$name { $($field: b.$field),* })
                    } )*
                    other => Err(FrameError::UnknownMessage { tag: other }),
                }
            }
        }
    };
}

bodies! {
    1 HelloAck { version: ProtoVersion }
    2 PrepareHandoff { handoff_id: HandoffId, successor_pid: u32, deadline_ms: u64, drain_grace_ms: u64 }
    3 Drained { handoff_id: HandoffId, open_conns_remaining: u64, accept_closed: bool }
    4 SealRequest { handoff_id: HandoffId }
    5 SealProgress { handoff_id: HandoffId, done: u64, total: u64 }
    6 SealComplete { handoff_id: HandoffId, state: Option<Vec<u8>> }
    7 SealFailed { handoff_id: HandoffId, error: String }
    8 Begin { handoff_id: HandoffId, state: Option<Vec<u8>> }
    9 Ready { handoff_id: HandoffId, listening_on: Vec<String>, healthz_ok: bool, metadata: Vec<(String, String)> }
    10 Commit { handoff_id: HandoffId }
    11 Abort { handoff_id: HandoffId, reason: String }
    12 ResumeAfterAbort { handoff_id: HandoffId }
    13 Heartbeat { handoff_id: HandoffId }
    14 FetchListeners { }
    15 Listeners { names: Vec<String> }
    16 Shutdown { stop_id: HandoffId, drain_grace_ms: u64 }
    17 ShutdownDrained { stop_id: HandoffId, open_conns_remaining: u64, accept_closed: bool }
    18 PrepareHandoffV3 { handoff_id: HandoffId, successor_pid: u32, deadline_ms: u64, drain_grace_ms: u64, move_connections: bool, max_in_flight: u32 }
    19 Connections { handoff_id: HandoffId, conns: Vec<MovedMeta> }
    20 ConnectionsDone { handoff_id: HandoffId, moved: u64, closed: u64 }
    21 PrepareHandoffV4 { handoff_id: HandoffId, successor_pid: u32, deadline_ms: u64, drain_grace_ms: u64, max_in_flight: u32 }
    22 MoveChannel { handoff_id: HandoffId }
}

/// Decodes a body and insists that it used every byte: trailing garbage is a
/// sign of a framing bug or tampering, not something to ignore.
fn strict<T: serde::de::DeserializeOwned>(
    message: &'static str,
    body: &[u8],
) -> Result<T, FrameError> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(FrameError::Malformed {
            message,
            reason: format!("{} trailing bytes", rest.len()),
        }),
        Err(e) => Err(FrameError::Malformed {
            message,
            reason: e.to_string(),
        }),
    }
}

impl Message {
    /// The first protocol version that has this message. A channel
    /// negotiated below it neither sends nor accepts it
    /// ([`FrameError::NotInVersion`]).
    pub fn since(&self) -> ProtoVersion {
        match self {
            Message::Shutdown { .. } | Message::ShutdownDrained { .. } => SHUTDOWN_SINCE,
            Message::PrepareHandoffV3 { .. }
            | Message::Connections { .. }
            | Message::ConnectionsDone { .. } => MOVE_SINCE,
            Message::PrepareHandoffV4 { .. } | Message::MoveChannel { .. } => MOVE_DIRECT_SINCE,
            _ => 1,
        }
    }

    /// The exchange this message belongs to, if it is scoped to one: a
    /// handoff, or a stop ([`Message::Shutdown`]'s `stop_id`, which the
    /// incumbent's Heartbeats carry too).
    pub fn handoff_id(&self) -> Option<HandoffId> {
        match self {
            Message::Hello(_)
            | Message::HelloAck { .. }
            | Message::FetchListeners {}
            | Message::Listeners { .. } => None,
            Message::PrepareHandoff { handoff_id, .. }
            | Message::Drained { handoff_id, .. }
            | Message::SealRequest { handoff_id }
            | Message::SealProgress { handoff_id, .. }
            | Message::SealComplete { handoff_id, .. }
            | Message::SealFailed { handoff_id, .. }
            | Message::Begin { handoff_id, .. }
            | Message::Ready { handoff_id, .. }
            | Message::Commit { handoff_id }
            | Message::Abort { handoff_id, .. }
            | Message::ResumeAfterAbort { handoff_id }
            | Message::Heartbeat { handoff_id }
            | Message::PrepareHandoffV3 { handoff_id, .. }
            | Message::Connections { handoff_id, .. }
            | Message::ConnectionsDone { handoff_id, .. }
            | Message::PrepareHandoffV4 { handoff_id, .. }
            | Message::MoveChannel { handoff_id } => Some(*handoff_id),
            Message::Shutdown { stop_id, .. } | Message::ShutdownDrained { stop_id, .. } => {
                Some(*stop_id)
            }
        }
    }

    /// True for the messages that only prove liveness.
    pub fn is_keepalive(&self) -> bool {
        matches!(
            self,
            Message::Heartbeat { .. } | Message::SealProgress { .. }
        )
    }
}

#[cfg(test)]
mod tests;
