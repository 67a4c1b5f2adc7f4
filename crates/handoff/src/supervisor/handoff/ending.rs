//! How a run ends: Begin and Ready, then Commit to both processes — or the
//! abort path that leaves the incumbent serving.

use std::time::{Duration, Instant};

use super::run::{phase_timeout, successor_failure, unexpected, Left, Run, Step};
use crate::channel::Channel;
use crate::child::Child;
use crate::crash;
use crate::error::{HandoffError, ProtocolError};
use crate::CatchUpReport;
use crate::frame::FrameError;
use crate::phase::{Peer, SupervisorPhase};
use crate::protocol::Message;
use crate::supervisor::types::{ConnectionsMoved, Successor};
use crate::supervisor::{PhaseDone, Report};
use crate::timeouts::PhaseClock;

/// Sealed (or there was no incumbent, or it died): the successor is to
/// begin.
pub(super) struct AwaitingReady {
    /// The incumbent, drained and sealed; `None` when there is none.
    o: Option<Channel>,
    n: Successor,
    state: Option<Vec<u8>>,
    moved: Option<ConnectionsMoved>,
}

/// The successor said Ready, healthy: the handoff commits.
pub(super) struct Ready {
    o: Option<Channel>,
    n: Successor,
    moved: Option<ConnectionsMoved>,
}

impl AwaitingReady {
    pub(super) fn new(
        o: Option<Channel>,
        n: Successor,
        state: Option<Vec<u8>>,
        moved: Option<ConnectionsMoved>,
    ) -> AwaitingReady {
        AwaitingReady {
            o,
            n,
            state,
            moved,
        }
    }

    /// With no incumbent to hand over from: a first start, a restart, or an
    /// incumbent that died mid-handoff.
    pub(super) fn without_incumbent(n: Successor) -> AwaitingReady {
        AwaitingReady::new(None, n, None, None)
    }

    /// Sends Begin with the sealed state and waits for Ready.
    pub(super) fn begin(mut self, run: &mut Run<'_, '_>) -> Step<Ready> {
        match self.ready(run) {
            Ok(()) => Ok(Ready {
                o: self.o,
                n: self.n,
                moved: self.moved,
            }),
            Err(e) => {
                let prepared = self.o.is_some();
                Err((
                    e,
                    Left {
                        o: self.o,
                        prepared,
                        n: Some(self.n),
                    },
                ))
            }
        }
    }

    fn ready(&mut self, run: &mut Run<'_, '_>) -> Result<(), HandoffError> {
        // From Begin on the successor holds the state lock: a restarted
        // supervisor must be able to find it. (The write was queued at spawn
        // time and has had the whole drain and seal to land.)
        run.sup.journal.wait(run.successor_recorded)?;
        self.n
            .chan
            .send(&Message::Begin {
                handoff_id: run.id,
                state: self.state.take(),
            })
            .map_err(|e| ProtocolError::frame(Peer::Successor, "begin", e))?;
        crash::point_if(run.with_incumbent, "s-after-begin");
        let cap = run.remaining();
        let ready = recv_successor(run, &mut self.n, cap)?;
        crash::point_if(run.with_incumbent, "s-after-ready");
        let Message::Ready {
            healthz_ok,
            metadata,
            ..
        } = ready
        else {
            return Err(unexpected(Peer::Successor, "awaiting-ready", ready.name()));
        };
        if !healthz_ok {
            let detail = metadata
                .iter()
                .find(|(k, _)| k == "health")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| "no detail given".into());
            return Err(HandoffError::Unhealthy { detail });
        }
        run.record.successor_pid = Some(self.n.child.pid());
        // The new incumbent's build: what its Ready says, else what its
        // Hello said (a peer may leave Ready's metadata empty) — never the
        // previous incumbent's.
        let build = match metadata.iter().find(|(k, _)| k == "build_id") {
            Some((_, b)) => b.clone(),
            None => run.hello_build.clone(),
        };
        run.sup.procs().incumbent_build = build;
        run.catch_up = metadata
            .iter()
            .find(|(k, _)| k == crate::catch_up::METADATA_KEY)
            .and_then(|(_, v)| CatchUpReport::from_metadata(v));
        Ok(())
    }
}

/// Reads the successor until a message that ends the phase arrives
/// (heartbeats while its health check runs keep it alive), enforcing
/// liveness per read and `cap` (plus wire slack) on the whole phase.
fn recv_successor(
    run: &Run<'_, '_>,
    n: &mut Successor,
    cap: Duration,
) -> Result<Message, HandoffError> {
    let peer = Peer::Successor;
    let phase = run.phase();
    let clock = PhaseClock::start(cap);
    let t = run.t;
    loop {
        let now = Instant::now();
        if clock.expired(now, t.wire_slack) {
            let e = phase_timeout(peer, phase, &clock);
            return Err(successor_failure(n, e));
        }
        let timeout = t.read_timeout(&clock, now);
        let msg = match n.chan.recv(Some(timeout)) {
            Ok(m) => m,
            Err(FrameError::TimedOut { .. }) if clock.expired(Instant::now(), t.wire_slack) => {
                let e = phase_timeout(peer, phase, &clock);
                return Err(successor_failure(n, e));
            }
            Err(e) => {
                let e = ProtocolError::frame(peer, phase.name(), e);
                return Err(successor_failure(n, e));
            }
        };
        let legal = phase.allows(peer, &msg);
        let msg = crate::phase::admit(peer, phase.name(), legal, Some(run.id), msg)?;
        if !msg.is_keepalive() {
            return Ok(msg);
        }
    }
}

impl Ready {
    pub(super) fn commit(self, mut run: Run<'_, '_>) -> Result<Report, HandoffError> {
        run.enter(SupervisorPhase::Committed);
        let mut warnings = vec![];
        let id = run.id;
        let Ready { o, n, moved } = self;
        // The successor first: were we to die between the two sends, the
        // successor (committed, holding the lock) is the incumbent and the
        // old one, finding the lock taken, retires. The other order could
        // retire the old process while the new one is still waiting.
        if let Err(e) = n.chan.send(&Message::Commit { handoff_id: id }) {
            warnings.push(format!("the new incumbent did not get Commit ({e})"));
        }
        let new_pid = n.child.pid();
        let old_pid = run.old.as_ref().map(Child::pid);
        // Record the new incumbent before the old one hears Commit: the old
        // one may exit at once, and whoever watches the incumbent (the
        // crash-restart monitor) must then already see it retiring, not an
        // incumbent that died outside a handoff.
        {
            let mut p = run.sup.procs();
            if let Some(old) = p.incumbent.replace(n.child) {
                p.retiring.push(old);
            }
            p.retiring.retain(|c| c.try_exit().is_none());
        }
        if let Some(o) = &o {
            if let Err(e) = o.send(&Message::Commit { handoff_id: id }) {
                warnings.push(format!("the old incumbent did not get Commit ({e}); it will find the state lock taken and retire"));
            }
        }
        crash::point_if(run.with_incumbent, "s-after-commit");
        warnings.splice(0..0, std::mem::take(&mut run.warnings));
        // Dropping our end tells the old incumbent we are done with it.
        drop(o);
        drop(n.chan);
        let took = run.phase_started.elapsed();
        let done = PhaseDone {
            phase: SupervisorPhase::Committed,
            took,
        };
        run.phases.push(done);
        (run.observer)(done);
        // The handoff is over for the service: both processes have their
        // Commit. What follows is the supervisor's bookkeeping.
        let total = run.started.elapsed();
        let cleared = run.sup.journal.clear();
        if let Err(e) = run.sup.journal.wait(cleared) {
            warnings.push(format!("clearing the journal failed: {e}"));
        }
        tracing::info!(target: "handoff::commit", handoff_id = %crate::protocol::IdHex(id), new_pid, ?old_pid, total_us = total.as_micros() as u64);
        for w in &warnings {
            tracing::warn!(target: "handoff::commit", handoff_id = %crate::protocol::IdHex(id), "{w}");
        }
        Ok(Report {
            handoff_id: id,
            old_pid,
            new_pid,
            new_build_id: run.sup.procs().incumbent_build.clone(),
            phases: run.phases,
            total,
            prepared_for: run.held_for,
            warnings,
            connections: moved,
            catch_up: run.catch_up,
        })
    }
}

impl Run<'_, '_> {
    /// Tells each process what the failed handoff leaves it to do: the
    /// successor to stop (killed first when it is the one to blame), the
    /// incumbent to resume.
    pub(super) fn abort(mut self, cause: HandoffError, left: Left) -> HandoffError {
        let phase = self.phase();
        tracing::warn!(target: "handoff::abort", handoff_id = %crate::protocol::IdHex(self.id), phase = phase.name(), cause = %cause);
        self.enter(SupervisorPhase::ResumingAfterAbort);
        let reason = cause.to_string();
        let Left { o, prepared, n } = left;
        if let Some(n) = &n {
            let _ = n.chan.send(&Message::Abort {
                handoff_id: self.id,
                reason: reason.clone(),
            });
        }
        let resumed = match n {
            // The successor stopped answering or misbehaved: kill it first,
            // so that nothing it might still do (bind the control path,
            // hold the state lock) can race the incumbent's resumption.
            Some(n) if cause.blames_successor() => {
                kill_successor(&n.child);
                self.resume_incumbent(o, prepared)
            }
            // It is answering: it got Abort and exits by itself, after
            // finishing any connections it accepted early (a stateless
            // service may accept before Begin). The incumbent resumes
            // meanwhile, so that wait does not lengthen the accept gap; a
            // successor holding the state lock releases it on Abort, which
            // the incumbent's lock wait covers. After Abort it neither binds
            // nor locks anything (both happen only on Begin, before Ready).
            Some(n) => {
                let resumed = self.resume_incumbent(o, prepared);
                let grace = self.t.abort_grace;
                if n.child.wait_timeout(grace).is_none() {
                    tracing::warn!(target: "handoff::abort", pid = n.child.pid(), grace_ms = grace.as_millis() as u64, "successor still running after the abort grace; killing it");
                    kill_successor(&n.child);
                }
                resumed
            }
            None => self.resume_incumbent(o, prepared),
        };
        let took = self.phase_started.elapsed();
        (self.observer)(PhaseDone {
            phase: SupervisorPhase::ResumingAfterAbort,
            took,
        });
        let cleared = self.sup.journal.clear();
        if let Err(e) = self.sup.journal.wait(cleared) {
            tracing::error!(target: "handoff::abort", error = %e, "clearing the journal failed");
        }
        HandoffError::Aborted {
            handoff_id: self.id,
            phase,
            cause: Box::new(cause),
            incumbent_resumed: resumed,
        }
    }

    /// Tells the incumbent (if it was asked to drain) to resume; whether it
    /// is serving on.
    fn resume_incumbent(&self, o: Option<Channel>, prepared: bool) -> bool {
        match o {
            Some(o) if prepared => o
                .send(&Message::ResumeAfterAbort {
                    handoff_id: self.id,
                })
                .is_ok(),
            // Never asked to drain: it simply goes on.
            Some(_) => true,
            None => false,
        }
    }
}

pub(in crate::supervisor) fn kill_successor(child: &Child) {
    if child.kill_and_reap(Duration::from_secs(10)).is_none() {
        tracing::error!(target: "handoff::abort", pid = child.pid(), "successor did not die within 10 s of SIGKILL");
    }
}
