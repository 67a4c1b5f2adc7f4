//! Which message is legal in which phase, for each of the three roles, in one
//! place (the rustls discipline): every read in the crate goes through
//! [`SupervisorPhase::allows`], [`IncumbentPhase::allows`] or
//! [`SuccessorPhase::allows`] (or, for the supervisor's two conversations
//! outside a handoff, [`reattach_allows`] and [`stop_allows`]), so a message
//! arriving out of turn is rejected the same way everywhere.

use serde::{Deserialize, Serialize};

pub use crate::protocol::Peer;
use crate::protocol::{HandoffId, Message};
use crate::protocol_error::ProtocolError;

/// The supervisor's phases; also what the journal records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum SupervisorPhase {
    /// Hello/HelloAck with the incumbent and the freshly spawned successor.
    Negotiating,
    /// PrepareHandoff sent; waiting for Drained.
    Draining,
    /// Drained received (and, with an incumbent below version 5,
    /// SealRequest sent); waiting for SealComplete or SealFailed.
    Sealing,
    /// Begin sent; waiting for the successor's Ready.
    AwaitingReady,
    /// Ready received; Commit being delivered. The successor is the
    /// incumbent from here on, whatever happens.
    Committed,
    /// Something failed before Ready: successor killed, incumbent resuming.
    ResumingAfterAbort,
}

impl SupervisorPhase {
    /// The phase's name in logs, errors, reports and `handoff status`
    /// (`awaiting-ready`); also its [`Display`](std::fmt::Display).
    pub fn name(self) -> &'static str {
        match self {
            SupervisorPhase::Negotiating => "negotiating",
            SupervisorPhase::Draining => "draining",
            SupervisorPhase::Sealing => "sealing",
            SupervisorPhase::AwaitingReady => "awaiting-ready",
            SupervisorPhase::Committed => "committed",
            SupervisorPhase::ResumingAfterAbort => "resuming-after-abort",
        }
    }

    /// May `peer` send `msg` to the supervisor in this phase?
    ///
    /// Keepalives are legal only where a peer has promised them: Heartbeat
    /// and SealProgress from the incumbent while it drains or seals,
    /// Heartbeat from the successor while its health check runs.
    pub fn allows(self, peer: Peer, msg: &Message) -> bool {
        use Message as M;
        use SupervisorPhase as P;
        matches!(
            (self, peer, msg),
            (P::Negotiating, _, M::Hello(_))
                | (
                    P::Draining,
                    Peer::Incumbent,
                    M::Drained { .. }
                        | M::Heartbeat { .. }
                        // Version 3: the connections the drain moves, then
                        // their count, all before Drained.
                        | M::Connections { .. }
                        | M::ConnectionsDone { .. }
                )
                | (
                    P::Sealing,
                    Peer::Incumbent,
                    M::SealComplete { .. }
                        | M::SealFailed { .. }
                        | M::SealProgress { .. }
                        | M::Heartbeat { .. }
                )
                // The successor heartbeats while its health check runs.
                | (P::AwaitingReady, Peer::Successor, M::Ready { .. } | M::Heartbeat { .. })
        )
    }
}

impl std::fmt::Display for SupervisorPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The one gate every received message passes: legal in this phase (per
/// the tables above, evaluated by the caller into `legal`) and, when it is
/// handoff-scoped, for the handoff under way.
pub fn admit(
    peer: Peer,
    phase: &'static str,
    legal: bool,
    id: Option<HandoffId>,
    msg: Message,
) -> Result<Message, ProtocolError> {
    if !legal {
        return Err(ProtocolError::Unexpected {
            peer,
            phase,
            message: msg.name(),
        });
    }
    if let (Some(expected), Some(found)) = (id, msg.handoff_id()) {
        if expected != found {
            return Err(ProtocolError::WrongHandoffId {
                peer,
                phase,
                message: msg.name(),
                expected,
                found,
            });
        }
    }
    Ok(msg)
}

/// What a supervisor re-attaching after a crash accepts in reply to
/// FetchListeners.
pub fn reattach_allows(msg: &Message) -> bool {
    matches!(msg, Message::Listeners { .. })
}

/// What a supervisor stopping the incumbent ([`Message::Shutdown`] sent)
/// accepts until the outcome: the incumbent's heartbeats while it drains,
/// then ShutdownDrained. Not a [`SupervisorPhase`]: a stop is no handoff and
/// is never journaled.
pub fn stop_allows(msg: &Message) -> bool {
    matches!(
        msg,
        Message::Heartbeat { .. } | Message::ShutdownDrained { .. }
    )
}

/// What the successor accepts on the socket the incumbent moves its
/// connections on (version 4, [`Message::MoveChannel`]): batches, then
/// their count — nothing else ever travels that way.
pub fn direct_move_allows(msg: &Message) -> bool {
    matches!(
        msg,
        Message::Connections { .. } | Message::ConnectionsDone { .. }
    )
}

/// The incumbent's side of one control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncumbentPhase {
    /// Hello sent, waiting for HelloAck.
    Greeting,
    /// Negotiated; waiting for PrepareHandoff (a handoff), FetchListeners
    /// (a re-attaching supervisor) or Shutdown (`handoff stop`).
    Idle,
    /// Drained sent; waiting for the seal request (or an abort). From
    /// version 5 an incumbent seals at once instead and never waits here
    /// (except after a drain an abort cut short).
    Drained,
    /// Seal failed and reported; waiting to be told to resume.
    SealFailed,
    /// State lock released; waiting for Commit or ResumeAfterAbort.
    Sealed,
}

impl IncumbentPhase {
    /// The phase's name in the incumbent's logs and errors (`seal-failed`).
    pub fn name(self) -> &'static str {
        match self {
            IncumbentPhase::Greeting => "greeting",
            IncumbentPhase::Idle => "idle",
            IncumbentPhase::Drained => "drained",
            IncumbentPhase::SealFailed => "seal-failed",
            IncumbentPhase::Sealed => "sealed",
        }
    }

    /// May the supervisor send `msg` to the incumbent in this phase?
    /// Keepalives never come this way: the supervisor sends none.
    pub fn allows(self, msg: &Message) -> bool {
        use IncumbentPhase as P;
        use Message as M;
        matches!(
            (self, msg),
            (P::Greeting, M::HelloAck { .. })
                | (
                    P::Idle,
                    M::PrepareHandoff { .. }
                        | M::PrepareHandoffV3 { .. }
                        | M::PrepareHandoffV4 { .. }
                        | M::FetchListeners {}
                        | M::Shutdown { .. }
                )
                | (
                    P::Drained,
                    M::SealRequest { .. } | M::ResumeAfterAbort { .. }
                )
                | (P::SealFailed, M::ResumeAfterAbort { .. })
                | (P::Sealed, M::Commit { .. } | M::ResumeAfterAbort { .. })
        )
    }
}

/// The successor's side of its socketpair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuccessorPhase {
    /// Hello sent (once warm), waiting for HelloAck.
    Greeting,
    /// Warm; waiting for Begin (or Abort). Connections the incumbent moves
    /// arrive here too: held, unread, until Ready.
    AwaitBegin,
    /// Ready sent; waiting for Commit. Abort is no longer legal: after Ready
    /// the successor is the incumbent whatever happens.
    AwaitCommit,
}

impl SuccessorPhase {
    /// The phase's name in the successor's logs and errors (`await-begin`).
    pub fn name(self) -> &'static str {
        match self {
            SuccessorPhase::Greeting => "greeting",
            SuccessorPhase::AwaitBegin => "await-begin",
            SuccessorPhase::AwaitCommit => "await-commit",
        }
    }

    /// May the supervisor send `msg` to the successor in this phase?
    pub fn allows(self, msg: &Message) -> bool {
        use Message as M;
        use SuccessorPhase as P;
        matches!(
            (self, msg),
            (P::Greeting, M::HelloAck { .. })
                | (
                    P::AwaitBegin,
                    M::Begin { .. }
                        | M::Abort { .. }
                        // Version 3: moved connections, relayed.
                        | M::Connections { .. }
                        // Version 4: the socket they come on instead.
                        | M::MoveChannel { .. }
                )
                | (P::AwaitCommit, M::Commit { .. })
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_SUPERVISOR_PHASES: [SupervisorPhase; 6] = [
        SupervisorPhase::Negotiating,
        SupervisorPhase::Draining,
        SupervisorPhase::Sealing,
        SupervisorPhase::AwaitingReady,
        SupervisorPhase::Committed,
        SupervisorPhase::ResumingAfterAbort,
    ];

    #[test]
    fn keepalives_only_where_promised() {
        let hb = Message::Heartbeat { handoff_id: 1 };
        assert!(SupervisorPhase::Draining.allows(Peer::Incumbent, &hb));
        assert!(SupervisorPhase::Sealing.allows(Peer::Incumbent, &hb));
        assert!(SupervisorPhase::AwaitingReady.allows(Peer::Successor, &hb));
        assert!(!SupervisorPhase::AwaitingReady.allows(Peer::Incumbent, &hb));
        assert!(!SupervisorPhase::Draining.allows(Peer::Successor, &hb));
        assert!(!SupervisorPhase::Negotiating.allows(Peer::Incumbent, &hb));
    }

    #[test]
    fn ready_only_from_successor_awaiting_ready() {
        let ready = Message::Ready {
            handoff_id: 1,
            listening_on: vec![],
            healthz_ok: true,
            metadata: vec![],
        };
        assert!(SupervisorPhase::AwaitingReady.allows(Peer::Successor, &ready));
        assert!(!SupervisorPhase::AwaitingReady.allows(Peer::Incumbent, &ready));
        assert!(!SupervisorPhase::Sealing.allows(Peer::Successor, &ready));
    }

    #[test]
    fn abort_is_illegal_after_ready() {
        let abort = Message::Abort {
            handoff_id: 1,
            reason: String::new(),
        };
        assert!(SuccessorPhase::AwaitBegin.allows(&abort));
        assert!(!SuccessorPhase::AwaitCommit.allows(&abort));
    }

    /// Shutdown is a request from an idle incumbent's supervisor only:
    /// never in the middle of a handoff (the supervisor waits for it to
    /// end), never to a successor; its reply is legal only in a stop.
    #[test]
    fn shutdown_only_to_an_idle_incumbent() {
        let shutdown = Message::Shutdown {
            stop_id: 1,
            drain_grace_ms: 10,
        };
        assert!(IncumbentPhase::Idle.allows(&shutdown));
        for p in [
            IncumbentPhase::Greeting,
            IncumbentPhase::Drained,
            IncumbentPhase::SealFailed,
            IncumbentPhase::Sealed,
        ] {
            assert!(!p.allows(&shutdown), "{}", p.name());
        }
        for p in [
            SuccessorPhase::Greeting,
            SuccessorPhase::AwaitBegin,
            SuccessorPhase::AwaitCommit,
        ] {
            assert!(!p.allows(&shutdown), "{}", p.name());
        }
        let done = Message::ShutdownDrained {
            stop_id: 1,
            open_conns_remaining: 0,
            accept_closed: true,
        };
        assert!(stop_allows(&done));
        assert!(stop_allows(&Message::Heartbeat { handoff_id: 1 }));
        assert!(!stop_allows(&shutdown));
        assert!(!stop_allows(&Message::Drained {
            handoff_id: 1,
            open_conns_remaining: 0,
            accept_closed: true,
        }));
        for p in ALL_SUPERVISOR_PHASES {
            for peer in [Peer::Incumbent, Peer::Successor] {
                assert!(!p.allows(peer, &done), "{p} {peer}");
                assert!(!p.allows(peer, &shutdown), "{p} {peer}");
            }
        }
        assert!(!reattach_allows(&done));
    }

    /// The gate checks the stop's id like a handoff's.
    #[test]
    fn a_stop_reply_for_another_stop_is_refused() {
        let done = Message::ShutdownDrained {
            stop_id: 2,
            open_conns_remaining: 0,
            accept_closed: true,
        };
        let legal = stop_allows(&done);
        assert!(matches!(
            admit(Peer::Incumbent, "stopping", legal, Some(1), done),
            Err(ProtocolError::WrongHandoffId {
                expected: 1,
                found: 2,
                ..
            })
        ));
    }

    /// Moved connections travel only incumbent → supervisor while it
    /// drains and supervisor → successor before Begin: never after Begin
    /// (the successor would have to take in connections while the handoff
    /// can still abort), never the other way.
    #[test]
    fn connections_only_while_draining_and_before_begin() {
        let c = Message::Connections {
            handoff_id: 1,
            conns: vec![],
        };
        let done = Message::ConnectionsDone {
            handoff_id: 1,
            moved: 0,
            closed: 0,
        };
        for m in [&c, &done] {
            assert!(SupervisorPhase::Draining.allows(Peer::Incumbent, m));
            assert!(!SupervisorPhase::Draining.allows(Peer::Successor, m));
            for p in [
                SupervisorPhase::Negotiating,
                SupervisorPhase::Sealing,
                SupervisorPhase::AwaitingReady,
                SupervisorPhase::Committed,
                SupervisorPhase::ResumingAfterAbort,
            ] {
                for peer in [Peer::Incumbent, Peer::Successor] {
                    assert!(!p.allows(peer, m), "{p} {peer} {}", m.name());
                }
            }
        }
        assert!(SuccessorPhase::AwaitBegin.allows(&c));
        assert!(!SuccessorPhase::AwaitBegin.allows(&done));
        assert!(!SuccessorPhase::AwaitCommit.allows(&c));
        assert!(!SuccessorPhase::Greeting.allows(&c));
        for p in [
            IncumbentPhase::Greeting,
            IncumbentPhase::Idle,
            IncumbentPhase::Drained,
            IncumbentPhase::SealFailed,
            IncumbentPhase::Sealed,
        ] {
            assert!(!p.allows(&c), "{}", p.name());
        }
        let prep = Message::PrepareHandoffV3 {
            handoff_id: 1,
            successor_pid: 2,
            deadline_ms: 3,
            drain_grace_ms: 4,
            move_connections: true,
            max_in_flight: 253,
        };
        assert!(IncumbentPhase::Idle.allows(&prep));
        assert!(!IncumbentPhase::Drained.allows(&prep));
    }

    /// Version 4: the incumbent is asked to move straight to the
    /// successor only in place of PrepareHandoff; the successor gets its
    /// end only while it waits for Begin; the direct socket carries the
    /// batches and their count and nothing else.
    #[test]
    fn direct_moves_only_where_the_table_says() {
        let prep = Message::PrepareHandoffV4 {
            handoff_id: 1,
            successor_pid: 2,
            deadline_ms: 3,
            drain_grace_ms: 4,
            max_in_flight: 253,
        };
        let chan = Message::MoveChannel { handoff_id: 1 };
        assert!(IncumbentPhase::Idle.allows(&prep));
        assert!(SuccessorPhase::AwaitBegin.allows(&chan));
        for p in [
            IncumbentPhase::Greeting,
            IncumbentPhase::Drained,
            IncumbentPhase::SealFailed,
            IncumbentPhase::Sealed,
        ] {
            assert!(!p.allows(&prep), "{}", p.name());
        }
        for p in [SuccessorPhase::Greeting, SuccessorPhase::AwaitCommit] {
            assert!(!p.allows(&chan), "{}", p.name());
        }
        for p in ALL_SUPERVISOR_PHASES {
            for peer in [Peer::Incumbent, Peer::Successor] {
                assert!(!p.allows(peer, &prep), "{p} {peer}");
                assert!(!p.allows(peer, &chan), "{p} {peer}");
            }
        }
        assert!(direct_move_allows(&Message::Connections {
            handoff_id: 1,
            conns: vec![],
        }));
        assert!(direct_move_allows(&Message::ConnectionsDone {
            handoff_id: 1,
            moved: 0,
            closed: 0,
        }));
        for m in [
            prep,
            chan,
            Message::Begin {
                handoff_id: 1,
                state: None,
            },
            Message::Heartbeat { handoff_id: 1 },
        ] {
            assert!(!direct_move_allows(&m), "{}", m.name());
        }
    }

    #[test]
    fn incumbent_cannot_be_sealed_before_draining() {
        let seal = Message::SealRequest { handoff_id: 1 };
        assert!(!IncumbentPhase::Idle.allows(&seal));
        assert!(IncumbentPhase::Drained.allows(&seal));
        assert!(!IncumbentPhase::Sealed.allows(&Message::SealRequest { handoff_id: 1 }));
    }
}
