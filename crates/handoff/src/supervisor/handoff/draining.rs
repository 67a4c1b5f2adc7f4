//! Draining and sealing: the incumbent is asked to stop accepting and
//! finish (or move) its connections, then to seal its state; the successor
//! is watched meanwhile, and the connections the drain moves go to it —
//! straight from the incumbent on a socket pair we make (version 4), or
//! relayed through us (version 3).

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use super::ending::AwaitingReady;
use super::greeting::Greeted;
use super::run::{phase_timeout, successor_failure, unexpected, Left, Run, Step};
use crate::channel::Channel;
use crate::crash;
use crate::error::{HandoffError, ProtocolError};
use crate::frame::FrameError;
use crate::phase::{Peer, SupervisorPhase};
use crate::protocol::{Message, MovedMeta, MOVE_DIRECT_SINCE, MOVE_SINCE, SEAL_AT_ONCE_SINCE};
use crate::supervisor::types::{ConnectionsMoved, Successor};
use crate::sys;
use crate::timeouts::PhaseClock;

/// The connections a drain moves, on their way through us.
struct Relay {
    /// This handoff moves connections (both peers negotiated version 3).
    moving: bool,
    /// They go straight to the successor (both negotiated version 4): no
    /// batch comes our way, only the count.
    direct: bool,
    /// Connections relayed to the successor so far.
    relayed: u64,
    /// The descriptors on their way to the successor (its window: see
    /// [`Draining::start`]).
    to_successor: sys::fdpass::InFlight,
    /// The incumbent's count (ConnectionsDone), when it moved any.
    moved: Option<ConnectionsMoved>,
}

/// PrepareHandoff sent: the incumbent drains, the successor waits.
pub(super) struct Draining {
    o: Channel,
    n: Successor,
    relay: Relay,
}

/// Drained received (and SealRequest sent, below version 5): the
/// incumbent hands over its state.
pub(super) struct Sealing {
    o: Channel,
    n: Successor,
    moved: Option<ConnectionsMoved>,
}

impl Draining {
    /// Sends PrepareHandoff: the drain begins.
    pub(super) fn start(run: &mut Run<'_, '_>, o: Channel, n: Greeted) -> Step<Draining> {
        let remaining = run.remaining();
        let grace = run.t.drain_grace.min(remaining);
        let n = n.into_successor();
        // How many descriptors may be on their way on each hop: a quarter
        // of the supervisor's limit and of the incumbent's, so that the two
        // hops together stay within half of either (the kernel counts them
        // against the user, `sys::fdpass::unread_by_peer`). The incumbent
        // is told ours and applies its own; we apply both to ours. An
        // incumbent whose limit cannot be read gets one batch at a time.
        let own_window = sys::fdpass::window_for_limit(None);
        let incumbent_window = run
            .record
            .incumbent_pid
            .and_then(|pid| sys::fdpass::nofile_limit_of(pid).ok())
            .map(|l| sys::fdpass::window_for_limit(Some(l)))
            .unwrap_or(sys::fdpass::MAX_FDS);
        // Version 3 on the incumbent's channel says whether to move its
        // connections: only when the successor can take them too.
        let moving = o.version() >= MOVE_SINCE && n.chan.version() >= MOVE_SINCE;
        // Version 4 on both: straight from one to the other, on a socket
        // pair whose ends we hand out and close — we never hold a moved
        // connection, and a crash of ours mid-transfer breaks both control
        // channels exactly as before (docs/connection-transfer.md). If we
        // cannot make the pair we relay; a successor that cannot take its
        // end has failed.
        let v4 = o.version() >= MOVE_DIRECT_SINCE && n.chan.version() >= MOVE_DIRECT_SINCE;
        let direct = if !(moving && v4) {
            None
        } else {
            match direct_channel(run, &n) {
                Ok(end) => end,
                Err(e) => {
                    let e = ProtocolError::frame(Peer::Successor, "draining", e);
                    let e = successor_failure(&n, e);
                    let left = Left {
                        o: Some(o),
                        prepared: false,
                        n: Some(n),
                    };
                    return Err((e, left));
                }
            }
        };
        let sent = if let Some(end) = &direct {
            // The successor reads the batches: its own limit is the window.
            let window = sys::fdpass::nofile_limit_of(n.child.pid())
                .ok()
                .map(|l| sys::fdpass::window_for_limit(Some(l)))
                .unwrap_or(sys::fdpass::MAX_FDS);
            let prepare = Message::PrepareHandoffV4 {
                handoff_id: run.id,
                successor_pid: n.child.pid(),
                deadline_ms: remaining.as_millis() as u64,
                drain_grace_ms: grace.as_millis() as u64,
                max_in_flight: u32::try_from(window).unwrap_or(u32::MAX),
            };
            o.send_with_fds(&prepare, &[std::os::fd::AsFd::as_fd(end)])
        } else if o.version() >= MOVE_SINCE {
            o.send(&Message::PrepareHandoffV3 {
                handoff_id: run.id,
                successor_pid: n.child.pid(),
                deadline_ms: remaining.as_millis() as u64,
                drain_grace_ms: grace.as_millis() as u64,
                move_connections: moving,
                // What we can take in at once: a batch lands in our own
                // descriptor table before it goes on.
                max_in_flight: u32::try_from(own_window).unwrap_or(u32::MAX),
            })
        } else {
            o.send(&Message::PrepareHandoff {
                handoff_id: run.id,
                successor_pid: n.child.pid(),
                deadline_ms: remaining.as_millis() as u64,
                drain_grace_ms: grace.as_millis() as u64,
            })
        };
        // Our copy of the incumbent's end closes here: from now on the two
        // ends belong to the incumbent and the successor only.
        let direct = direct.map(drop).is_some();
        if let Err(e) = sent {
            // Whether it got the request is unknown: tell it to resume.
            let e = ProtocolError::frame(Peer::Incumbent, "draining", e).into();
            return Err((
                e,
                Left {
                    o: Some(o),
                    prepared: true,
                    n: Some(n),
                },
            ));
        }
        crash::point_if(run.with_incumbent, "s-after-prepare");
        Ok(Draining {
            o,
            n,
            relay: Relay {
                moving,
                direct,
                relayed: 0,
                to_successor: sys::fdpass::InFlight::new(own_window.min(incumbent_window)),
                moved: None,
            },
        })
    }

    /// Waits for Drained (relaying moved connections meanwhile), then
    /// sends SealRequest — or, to an incumbent at version 5 or later, which
    /// seals on its own once it has said Drained, nothing.
    pub(super) fn drained(mut self, run: &mut Run<'_, '_>) -> Step<Sealing> {
        let grace = run.t.drain_grace.min(run.remaining());
        let got = recv_incumbent(run, &mut self.o, &mut self.n, Some(&mut self.relay), grace);
        let msg = match got {
            Ok(m) => m,
            Err(e) => return Err((e, self.left())),
        };
        let Message::Drained { .. } = msg else {
            let e = unexpected(Peer::Incumbent, "draining", msg.name());
            return Err((e, self.left()));
        };
        crash::point_if(run.with_incumbent, "s-after-drained");
        run.enter(SupervisorPhase::Sealing);
        if self.o.version() < SEAL_AT_ONCE_SINCE {
            if let Err(e) = self.o.send(&Message::SealRequest { handoff_id: run.id }) {
                let e = ProtocolError::frame(Peer::Incumbent, "sealing", e).into();
                return Err((e, self.left()));
            }
            crash::point_if(run.with_incumbent, "s-after-seal-request");
        }
        Ok(Sealing {
            o: self.o,
            n: self.n,
            moved: self.relay.moved,
        })
    }

    fn left(self) -> Left {
        Left {
            o: Some(self.o),
            prepared: true,
            n: Some(self.n),
        }
    }
}

impl Sealing {
    /// Waits for the seal's outcome: the incumbent's state, on to Begin.
    pub(super) fn sealed(mut self, run: &mut Run<'_, '_>) -> Step<AwaitingReady> {
        let cap = run.remaining();
        let got = recv_incumbent(run, &mut self.o, &mut self.n, None, cap);
        crash::point_if(run.with_incumbent && got.is_ok(), "s-after-sealed");
        let failure = match got {
            Ok(Message::SealComplete { state, .. }) => {
                return Ok(AwaitingReady::new(Some(self.o), self.n, state, self.moved))
            }
            Ok(Message::SealFailed { error, .. }) => HandoffError::SealFailed { reason: error },
            Ok(m) => unexpected(Peer::Incumbent, "sealing", m.name()),
            Err(e) => e,
        };
        Err((
            failure,
            Left {
                o: Some(self.o),
                prepared: true,
                n: Some(self.n),
            },
        ))
    }
}

/// Reads the incumbent until a message that ends the current phase
/// arrives, enforcing liveness per read and `cap` (plus wire slack) on the
/// whole phase. With `relay` (draining), frames may carry moved
/// connections, passed on to the successor as they come. Meanwhile the
/// successor has nothing to say: anything readable on its channel — its
/// hang-up (it died) or a protocol breach — fails the handoff at once, not
/// after a drain that may last the whole drain grace while nobody accepts.
fn recv_incumbent(
    run: &mut Run<'_, '_>,
    o: &mut Channel,
    n: &mut Successor,
    mut relay: Option<&mut Relay>,
    cap: Duration,
) -> Result<Message, HandoffError> {
    let peer = Peer::Incumbent;
    let phase = run.phase();
    let clock = PhaseClock::start(cap);
    let t = run.t;
    loop {
        let now = Instant::now();
        if clock.expired(now, t.wire_slack) {
            return Err(phase_timeout(peer, phase, &clock)
            .into());
        }
        let timeout = t.read_timeout(&clock, now);
        let got = match o.first_readable(&n.chan, timeout) {
            Ok(Some(true)) => return Err(successor_spoke(run, n, phase.name())),
            // Nothing from the incumbent within the read timeout: the same
            // failure a read that timed out reports.
            Ok(None) => Err(FrameError::TimedOut {
                waited_ms: timeout.as_millis() as u64,
            }),
            Ok(Some(false)) if relay.is_some() => o.recv_with_fds(timeout),
            Ok(Some(false)) => o.recv(Some(timeout)).map(|m| (m, vec![])),
            Err(e) => Err(FrameError::from(e)),
        };
        let (msg, fds) = match got {
            Ok(m) => m,
            Err(FrameError::TimedOut { .. }) if clock.expired(Instant::now(), t.wire_slack) => {
                return Err(phase_timeout(peer, phase, &clock)
                .into());
            }
            Err(e) => return Err(ProtocolError::frame(peer, phase.name(), e).into()),
        };
        let legal = phase.allows(peer, &msg);
        let msg = crate::phase::admit(peer, phase.name(), legal, Some(run.id), msg)?;
        if msg.is_keepalive() {
            continue;
        }
        match (msg, relay.as_deref_mut()) {
            (Message::Connections { conns, .. }, Some(r)) if r.moving && !r.direct => {
                relay_batch(run, n, r, conns, fds)?
            }
            (Message::ConnectionsDone { moved, closed, .. }, Some(r)) if r.moving => {
                crash::point_if(r.direct, "s-after-moved");
                if !r.direct && moved != r.relayed {
                    run.warnings.push(format!("the old incumbent counted {moved} connections moved, the supervisor relayed {}", r.relayed));
                }
                r.moved = Some(ConnectionsMoved {
                    moved,
                    closed,
                    direct: r.direct,
                });
            }
            (m @ (Message::Connections { .. } | Message::ConnectionsDone { .. }), _) => {
                return Err(unasked(m.name()))
            }
            (msg, _) => return Ok(msg),
        }
    }
}

/// The successor's channel turned readable while the incumbent drains or
/// seals: read what it is — its hang-up, or a message the phase table does
/// not allow there — and make it the handoff's failure.
fn successor_spoke(run: &Run<'_, '_>, n: &mut Successor, phase: &'static str) -> HandoffError {
    let e = match n.chan.recv(Some(run.t.wire_slack)) {
        Err(e) => ProtocolError::frame(Peer::Successor, phase, e),
        Ok(msg) => ProtocolError::Unexpected {
            peer: Peer::Successor,
            phase,
            message: msg.name(),
        },
    };
    successor_failure(n, e)
}

/// A move message from an incumbent that was not asked to move — or, when
/// it moves them straight to the successor, a batch sent our way.
fn unasked(message: &'static str) -> HandoffError {
    ProtocolError::Unexpected {
        peer: Peer::Incumbent,
        phase: "draining (no connections were to move through the supervisor)",
        message,
    }
    .into()
}

/// Makes the socket pair the incumbent moves its connections on and hands
/// the successor its end (MoveChannel); returns the incumbent's end, to go
/// with PrepareHandoff. Both ends are close-on-exec; ours close when the
/// caller drops them. No pair (the descriptor limit, say): `None`, with a
/// warning, and the supervisor relays. The successor's channel failing is
/// the error: the successor's failure.
fn direct_channel(run: &mut Run<'_, '_>, n: &Successor) -> Result<Option<OwnedFd>, FrameError> {
    let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => {
            run.warnings.push(format!(
                "could not make the socket pair to move connections directly ({e}); relaying them instead"
            ));
            return Ok(None);
        }
    };
    let handoff_id = run.id;
    n.chan.send_with_fds(
        &Message::MoveChannel { handoff_id },
        &[std::os::fd::AsFd::as_fd(&theirs)],
    )?;
    Ok(Some(OwnedFd::from(ours)))
}

/// Passes one batch of moved connections on to the successor as it came;
/// our copies close when this returns, so the supervisor holds at most one
/// batch (docs/connection-transfer.md).
fn relay_batch(
    run: &Run<'_, '_>,
    n: &Successor,
    r: &mut Relay,
    conns: Vec<MovedMeta>,
    fds: Vec<OwnedFd>,
) -> Result<(), HandoffError> {
    if let Err(e) = MovedMeta::check_batch(conns.len(), fds.len()) {
        return Err(ProtocolError::frame(Peer::Incumbent, "draining", e).into());
    }
    crash::point_if(run.with_incumbent, "s-relaying");
    let count = conns.len() as u64;
    let left = run.remaining().max(Duration::from_millis(1));
    let borrowed: Vec<_> = fds.iter().map(std::os::fd::AsFd::as_fd).collect();
    // A successor that stops reading must not hold us past the deadline;
    // and a window of descriptors in flight (`sys::fdpass::unread_by_peer`:
    // the kernel refuses descriptors past the user's limit).
    let flight = &mut r.to_successor;
    let sent = n
        .chan
        .stream()
        .set_write_timeout(Some(left))
        .and_then(|()| flight.wait_room(n.chan.stream(), borrowed.len(), Instant::now() + left, &|| false))
        .map_err(FrameError::from)
        .and_then(|()| {
            n.chan.send_with_fds(
                &Message::Connections {
                    handoff_id: run.id,
                    conns,
                },
                &borrowed,
            )
        });
    let _ = n.chan.stream().set_write_timeout(None);
    match sent {
        Ok(()) => flight.sent(n.chan.stream(), borrowed.len()),
        Err(e) => {
            let e = ProtocolError::frame(Peer::Successor, "draining", e);
            return Err(successor_failure(n, e));
        }
    }
    r.relayed += count;
    Ok(())
}
