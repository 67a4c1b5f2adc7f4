//! One request from the supervisor, served to its end: a handoff (drain,
//! seal, then commit or resume), a stop, or a request for the listeners.
//!
//! The handoff is one type per state, each consuming itself into the next
//! — [`Draining`] → [`Drained`] → [`Sealed`] — and receiving in a state
//! yields only what `phase.rs`'s table allows there. The state lock is a
//! field of every state before the seal and of none after it: only a state
//! that holds it can resume serving ([`Outcome::Serving`] carries it back),
//! and a sealed one must first get it back ([`relock`]).

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use super::abort_watch::AbortWatch;
use super::control::{ControlSocket, Greeted};
use super::relock;
use crate::channel::Channel;
use crate::crash;
use crate::error::{ProcessError, ProtocolError};
use crate::listeners::Listener;
use crate::lock::StateLock;
use crate::moving::Flusher;
use crate::phase::{IncumbentPhase, Peer};
use crate::process::{Drainable, Heartbeat, ProcessConfig};
use crate::protocol::{HandoffId, IdHex, Message, SEAL_AT_ONCE_SINCE};

/// What a request came to.
pub(super) enum Outcome {
    /// Still the incumbent, serving and holding the state lock: nothing
    /// changed (the listeners were handed over), or the service resumed.
    Serving(StateLock),
    /// The supervisor committed the handoff to the successor.
    Committed(HandoffId),
    /// The supervisor vanished after the seal and the successor holds the
    /// state lock.
    SuccessorWon(HandoffId),
    /// Stopped with no successor, the drain reported. The lock is still
    /// held: nothing may take over the state while this process finishes
    /// what is open.
    Stopped {
        /// The stop request's id.
        stop_id: HandoffId,
        /// The state lock, to keep until the process exits.
        lock: StateLock,
    },
}

/// What serving a request works with besides the request itself.
pub(super) struct Ctx<'a, D> {
    pub(super) cfg: &'a ProcessConfig,
    /// Copies of the passed listeners, for a supervisor that lost them.
    pub(super) kept: &'a [Listener],
    /// Re-bound after the lock is re-taken following a seal.
    pub(super) control: &'a mut ControlSocket,
    pub(super) service: &'a mut D,
}

impl<D: Drainable> Ctx<'_, D> {
    /// Serves on, with the lock (the handoff or stop ended without one).
    fn resume(&mut self, lock: StateLock) -> Result<Outcome, ProcessError> {
        self.service
            .resume()
            .map_err(|e| ProcessError::Service(format!("resume failed: {e}")))?;
        Ok(Outcome::Serving(lock))
    }

    /// Lock re-taken after a seal: the successor may have bound the control
    /// path meanwhile, so bind it again before serving.
    fn relocked(&mut self, lock: StateLock) -> Result<Outcome, ProcessError> {
        self.control.rebind()?;
        self.resume(lock)
    }

    /// The supervisor vanished after we released the lock: whoever holds
    /// it is the incumbent.
    fn recover_after_seal(&mut self, id: HandoffId) -> Result<Outcome, ProcessError> {
        match relock::after_supervisor_lost(self.cfg)? {
            relock::Holder::Us(lock) => {
                tracing::info!(target: "handoff::incumbent", handoff_id = %IdHex(id), "re-took the state lock; resuming");
                self.relocked(lock)
            }
            relock::Holder::Successor => {
                tracing::info!(target: "handoff::incumbent", handoff_id = %IdHex(id), "the successor holds the state lock; retiring");
                self.service.retire();
                Ok(Outcome::SuccessorWon(id))
            }
        }
    }
}

/// Serves one request, read by a greeter, holding `lock`.
pub(super) fn serve<D: Drainable>(
    g: Greeted,
    lock: StateLock,
    cx: &mut Ctx<'_, D>,
) -> Result<Outcome, ProcessError> {
    // The slot is given back when the request has been served.
    let Greeted {
        chan,
        first,
        fds,
        slot: _slot,
    } = g;
    let draining = match first {
        Message::PrepareHandoff {
            handoff_id,
            deadline_ms,
            drain_grace_ms,
            successor_pid,
        } => Draining::prepared(
            chan,
            lock,
            handoff_id,
            successor_pid,
            deadline_ms,
            drain_grace_ms,
            None,
        ),
        Message::PrepareHandoffV3 {
            handoff_id,
            deadline_ms,
            drain_grace_ms,
            successor_pid,
            move_connections,
            max_in_flight,
        } => Draining::prepared(
            chan,
            lock,
            handoff_id,
            successor_pid,
            deadline_ms,
            drain_grace_ms,
            move_connections.then_some(max_in_flight as usize),
        ),
        Message::PrepareHandoffV4 {
            handoff_id,
            deadline_ms,
            drain_grace_ms,
            successor_pid,
            max_in_flight,
        } => Draining::prepared(
            chan,
            lock,
            handoff_id,
            successor_pid,
            deadline_ms,
            drain_grace_ms,
            Some(max_in_flight as usize),
        )
        .straight_to_successor(fds),
        Message::Shutdown {
            stop_id,
            drain_grace_ms,
        } => {
            return shut_down(
                chan,
                lock,
                stop_id,
                Duration::from_millis(drain_grace_ms),
                cx,
            );
        }
        Message::FetchListeners {} => {
            // A supervisor restarted after a crash wants the listeners
            // back: hand over our copies (the kernel dups them into it).
            let names = cx.kept.iter().map(|l| l.name.clone()).collect();
            let fds: Vec<_> = cx
                .kept
                .iter()
                .map(|l| std::os::fd::AsFd::as_fd(&l.fd))
                .collect();
            match chan.send_with_fds(&Message::Listeners { names }, &fds) {
                Ok(()) => {
                    tracing::info!(target: "handoff::incumbent", count = fds.len(), "handed the listeners to a re-attaching supervisor")
                }
                Err(e) => {
                    tracing::warn!(target: "handoff::incumbent", error = %e, "sending listeners")
                }
            }
            return Ok(Outcome::Serving(lock));
        }
        m => {
            return Err(ProtocolError::Unexpected {
                peer: Peer::Supervisor,
                phase: IncumbentPhase::Idle.name(),
                message: m.name(),
            }
            .into())
        }
    };
    draining.drain(cx)
}

/// Stops serving for good, as the supervisor asked: drain within `grace`
/// (heartbeating, as in a handoff, so a long drain is not taken for a dead
/// process), report it, retire.
///
/// A failed drain changes nothing: the service resumes, and the connection
/// closes without ShutdownDrained — the supervisor then falls back to a
/// signal, and says so. Once the drain succeeded, the stop is final even if
/// the reply cannot be delivered: the supervisor asked for it, and a
/// process left half-drained and unsupervised would serve nobody well.
fn shut_down<D: Drainable>(
    chan: Channel,
    lock: StateLock,
    id: HandoffId,
    grace: Duration,
    cx: &mut Ctx<'_, D>,
) -> Result<Outcome, ProcessError> {
    let hex = IdHex(id);
    tracing::info!(target: "handoff::incumbent", stop_id = %hex, drain_grace_ms = grace.as_millis() as u64, "stopping: draining");
    let hb = Heartbeat::start(chan.sender(), id, cx.cfg.timeouts.heartbeat);
    let drained = cx.service.drain(grace);
    hb.stop();
    let report = match drained {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(target: "handoff::incumbent", stop_id = %hex, error = %e, "drain failed while stopping; resuming (the supervisor falls back to a signal)");
            return cx.resume(lock);
        }
    };
    let sent = chan.send(&Message::ShutdownDrained {
        stop_id: id,
        open_conns_remaining: report.open_conns_remaining,
        accept_closed: report.accept_closed,
    });
    if let Err(e) = sent {
        let e = ProtocolError::frame(Peer::Supervisor, IncumbentPhase::Idle.name(), e);
        tracing::warn!(target: "handoff::incumbent", stop_id = %hex, error = %e, "supervisor gone after the stop's drain; retiring anyway");
    }
    cx.service.retire();
    Ok(Outcome::Stopped { stop_id: id, lock })
}

/// PrepareHandoff read: the drain is next.
struct Draining {
    chan: Channel,
    lock: StateLock,
    id: HandoffId,
    deadline: Instant,
    grace: Duration,
    /// Connections move, at most this many per batch.
    moving: Option<usize>,
    /// Version 4: the socket to the successor the connections go on.
    direct: Option<Channel>,
}

impl Draining {
    /// A PrepareHandoff of any version, read.
    fn prepared(
        chan: Channel,
        lock: StateLock,
        handoff_id: HandoffId,
        successor_pid: u32,
        deadline_ms: u64,
        drain_grace_ms: u64,
        moving: Option<usize>,
    ) -> Draining {
        tracing::info!(target: "handoff::incumbent", handoff_id = %IdHex(handoff_id), successor_pid, deadline_ms, drain_grace_ms, ?moving, "draining");
        Draining {
            chan,
            lock,
            id: handoff_id,
            deadline: Instant::now() + Duration::from_millis(deadline_ms),
            grace: Duration::from_millis(drain_grace_ms),
            moving,
            direct: None,
        }
    }

    /// Version 4: connections go on the socket to the successor that came
    /// with the request.
    fn straight_to_successor(mut self, fds: Vec<OwnedFd>) -> Draining {
        match crate::moving::socket::open(fds) {
            Ok(c) => self.direct = Some(c),
            // Without it nothing can move: close them, as a drain without
            // moving would.
            Err(e) => {
                tracing::warn!(target: "handoff::incumbent", error = %e, "PrepareHandoff came without a usable socket to the successor; closing connections instead of moving them");
                self.moving = None;
            }
        }
        self
    }

    /// Drains (moving connections if asked), heartbeating meanwhile and
    /// watching the connection: the supervisor says nothing while we drain
    /// unless it aborts (or it went away), and then the drain stops at
    /// once. Then says Drained — or resumes.
    fn drain<D: Drainable>(self, cx: &mut Ctx<'_, D>) -> Result<Outcome, ProcessError> {
        let Draining {
            chan,
            lock,
            id,
            deadline,
            grace,
            moving,
            mut direct,
        } = self;
        let t = cx.cfg.timeouts;
        // Stops the drain: the supervisor's abort, or a failed send of
        // moved connections.
        let abort = crate::AbortSignal::new();
        // Connections the drain moves go out as they are offered, on a
        // thread of their own (docs/connection-transfer.md). Without that
        // thread nothing is moved: the drain closes them, as before.
        let hex = IdHex(id);
        let (mover, flusher) = if let Some(max_in_flight) = moving {
            let mover = crate::Mover::moving_at_most(max_in_flight);
            // Straight to the successor (version 4), or to the supervisor.
            let started = direct
                .as_ref()
                .unwrap_or(&chan)
                .sender()
                .and_then(|s| Flusher::start(s, id, mover.clone(), deadline, abort.clone()));
            match started {
                Ok(f) => (mover, Some(f)),
                Err(e) => {
                    tracing::warn!(target: "handoff::incumbent", handoff_id = %hex, error = %e, "cannot start sending connections; closing them instead");
                    (crate::Mover::disabled(), None)
                }
            }
        } else {
            (crate::Mover::disabled(), None)
        };

        let hb = Heartbeat::start(chan.sender(), id, t.heartbeat);
        let watch = AbortWatch::start(&chan, &abort);
        crash::point("o-in-drain");
        let drained = cx.service.drain_moving(grace, &abort, &mover);
        drop(watch);
        if abort.is_aborted() {
            hb.stop();
            // Its ResumeAfterAbort (or EOF) is waiting on the connection:
            // read it below, as after a completed drain, without saying
            // Drained to a supervisor that has moved on. (The offered
            // connections are the service's still: `resume` serves them.)
            let failed = flusher.as_ref().is_some_and(Flusher::failed);
            drop(flusher);
            drop(direct); // the successor sees our end close
            if failed {
                // Our own sending failed (the successor is gone or stuck):
                // serve on now rather than when the supervisor has noticed
                // — connections refused meanwhile would be closed, each a
                // client reconnecting. Safe: we said no Drained, hold the
                // lock, and the successor gets no Begin. Dropping the
                // channel (after the resume) aborts the handoff.
                tracing::warn!(target: "handoff::incumbent", handoff_id = %hex, "moving connections failed during the drain; serving them again and abandoning the handoff");
                return cx.resume(lock);
            }
            // The supervisor aborted: its ResumeAfterAbort (or EOF) is
            // waiting on the connection.
            tracing::info!(target: "handoff::incumbent", handoff_id = %hex, "the handoff was aborted during the drain; the drain stops now");
            let drained = Drained {
                chan,
                lock,
                id,
                deadline,
            };
            return drained.seal_when_asked(cx);
        }
        // Everything offered must be on its way before Drained.
        let sent = flusher.map(Flusher::finish);
        hb.stop();
        let report = match drained {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(target: "handoff::incumbent", handoff_id = %hex, error = %e, "drain failed; resuming");
                return cx.resume(lock); // dropping the channel aborts the handoff
            }
        };
        if let Some(sent) = sent {
            let done = sent.and_then(|s| {
                tracing::info!(target: "handoff::incumbent", handoff_id = %hex, moved = s.moved, closed = s.closed, "connections moved");
                let count = Message::ConnectionsDone {
                    handoff_id: id,
                    moved: s.moved,
                    closed: s.closed,
                };
                // Moving directly, the successor gets the count too, and
                // then our end's close: it has everything before we say
                // Drained, so before it can get Begin.
                if let Some(d) = direct.take() {
                    d.send(&count)?;
                }
                chan.send(&count)
            });
            if let Err(e) = done {
                // The successor may hold some of them; it gets no Begin
                // (the supervisor aborts on the broken channel), so it
                // never reads them. Ours serve on.
                tracing::warn!(target: "handoff::incumbent", handoff_id = %hex, error = %e, "sending the moved connections failed; resuming");
                return cx.resume(lock);
            }
        }
        let sent = chan.send(&Message::Drained {
            handoff_id: id,
            open_conns_remaining: report.open_conns_remaining,
            accept_closed: report.accept_closed,
        });
        if let Err(e) = sent {
            tracing::warn!(target: "handoff::incumbent", handoff_id = %hex, error = %e, "supervisor gone after drain; resuming");
            return cx.resume(lock);
        }
        crash::point("o-after-drained");
        let drained = Drained {
            chan,
            lock,
            id,
            deadline,
        };
        // From version 5 the seal follows at once: the supervisor would
        // only have asked for it (protocol.rs, "Versions").
        if drained.chan.version() >= SEAL_AT_ONCE_SINCE {
            drained.seal(cx)
        } else {
            drained.seal_when_asked(cx)
        }
    }
}

/// Drained (or the drain was cut short by an abort), the lock still held.
struct Drained {
    chan: Channel,
    lock: StateLock,
    id: HandoffId,
    deadline: Instant,
}

impl Drained {
    /// Protocol ≤ 4, or after an abort: waits for the SealRequest — or
    /// resumes, on ResumeAfterAbort or a supervisor gone.
    fn seal_when_asked<D: Drainable>(
        mut self,
        cx: &mut Ctx<'_, D>,
    ) -> Result<Outcome, ProcessError> {
        let wait = left(self.deadline, cx.cfg.timeouts.wire_slack);
        match recv(&mut self.chan, IncumbentPhase::Drained, Some(self.id), wait) {
            Ok(Message::SealRequest { .. }) => self.seal(cx),
            Ok(Message::ResumeAfterAbort { .. }) => {
                tracing::info!(target: "handoff::incumbent", handoff_id = %IdHex(self.id), "handoff aborted while draining or drained; resuming");
                cx.resume(self.lock)
            }
            got => {
                let e = off_table(IncumbentPhase::Drained, got);
                tracing::warn!(target: "handoff::incumbent", handoff_id = %IdHex(self.id), error = %e, "lost the supervisor while drained; resuming");
                cx.resume(self.lock)
            }
        }
    }

    /// Seals, heartbeating meanwhile and relaying the service's
    /// SealProgress; releases the lock and says SealComplete — or, if the
    /// seal failed, says so and resumes with the lock.
    fn seal<D: Drainable>(self, cx: &mut Ctx<'_, D>) -> Result<Outcome, ProcessError> {
        let Drained {
            mut chan,
            lock,
            id,
            deadline,
        } = self;
        let t = cx.cfg.timeouts;
        let hb = Heartbeat::start(chan.sender(), id, t.heartbeat);
        let progress_sender = chan.sender().ok();
        let mut progress = |done: u64, total: u64| {
            if let Some(s) = &progress_sender {
                let _ = s.send(&Message::SealProgress {
                    handoff_id: id,
                    done,
                    total,
                });
            }
        };
        crash::point("o-in-seal");
        let sealed = cx.service.seal(&mut progress);
        hb.stop();
        match sealed {
            Ok(state) => {
                // Release the lock *before* telling the supervisor: the
                // successor takes it as soon as it gets Begin.
                drop(lock);
                if let Err(e) = chan.send(&Message::SealComplete {
                    handoff_id: id,
                    state,
                }) {
                    tracing::warn!(target: "handoff::incumbent", handoff_id = %IdHex(id), error = %e, "supervisor gone after seal");
                    return cx.recover_after_seal(id);
                }
                crash::point("o-after-seal-complete");
                Sealed { chan, id, deadline }.await_commit(cx)
            }
            Err(e) => {
                tracing::error!(target: "handoff::incumbent", handoff_id = %IdHex(id), error = %e, "seal failed");
                let _ = chan.send(&Message::SealFailed {
                    handoff_id: id,
                    error: e.to_string(),
                });
                // Whatever the supervisor says next (ResumeAfterAbort) or
                // does (hang up), we resume; the lock is still ours.
                let _ = recv(
                    &mut chan,
                    IncumbentPhase::SealFailed,
                    Some(id),
                    left(deadline, t.wire_slack),
                );
                cx.resume(lock)
            }
        }
    }
}

/// Sealed and said so: the lock is released, for the successor.
struct Sealed {
    chan: Channel,
    id: HandoffId,
    deadline: Instant,
}

impl Sealed {
    /// Commit (retire) or ResumeAfterAbort (re-take the lock, however long
    /// that takes, then resume); a supervisor gone leaves it to whoever
    /// holds the lock.
    fn await_commit<D: Drainable>(mut self, cx: &mut Ctx<'_, D>) -> Result<Outcome, ProcessError> {
        let id = self.id;
        let wait = left(self.deadline, cx.cfg.timeouts.wire_slack) + cx.cfg.lock_wait;
        match recv(&mut self.chan, IncumbentPhase::Sealed, Some(id), wait) {
            Ok(Message::Commit { .. }) => {
                crash::point("o-after-commit");
                cx.service.retire();
                Ok(Outcome::Committed(id))
            }
            Ok(Message::ResumeAfterAbort { .. }) => {
                tracing::info!(target: "handoff::incumbent", handoff_id = %IdHex(id), "handoff aborted after seal; re-taking the state lock");
                let lock = relock::after_abort(cx.cfg, id);
                cx.relocked(lock)
            }
            got => {
                let e = off_table(IncumbentPhase::Sealed, got);
                tracing::warn!(target: "handoff::incumbent", handoff_id = %IdHex(id), error = %e, "lost the supervisor while sealed");
                cx.recover_after_seal(id)
            }
        }
    }
}

/// What is left of the handoff's deadline, plus `slack`.
fn left(deadline: Instant, slack: Duration) -> Duration {
    deadline.saturating_duration_since(Instant::now()) + slack
}

/// Receives the next message legal in `phase`, or explains why not.
fn recv(
    chan: &mut Channel,
    phase: IncumbentPhase,
    id: Option<HandoffId>,
    timeout: Duration,
) -> Result<Message, ProtocolError> {
    let msg = chan
        .recv(Some(timeout))
        .map_err(|e| ProtocolError::frame(Peer::Supervisor, phase.name(), e))?;
    let legal = phase.allows(&msg);
    crate::phase::admit(Peer::Supervisor, phase.name(), legal, id, msg)
}

/// What a receive in `phase` that did not bring one of the messages
/// handled there amounts to: its own error, or the message — legal by the
/// phase table but of no use here — as an unexpected one.
fn off_table(phase: IncumbentPhase, got: Result<Message, ProtocolError>) -> ProtocolError {
    match got {
        Err(e) => e,
        Ok(m) => ProtocolError::Unexpected {
            peer: Peer::Supervisor,
            phase: phase.name(),
            message: m.name(),
        },
    }
}
