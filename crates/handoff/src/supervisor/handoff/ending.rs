//! How a run ends: Commit to both processes, or the abort path that leaves
//! the incumbent serving.

use std::time::Duration;

use super::Run;
use crate::child::Child;
use crate::crash;
use crate::error::HandoffError;
use crate::phase::SupervisorPhase;
use crate::protocol::Message;
use crate::supervisor::{PhaseDone, Report};

impl Run<'_, '_> {
    pub(super) fn commit(mut self) -> Result<Report, HandoffError> {
        self.enter(SupervisorPhase::Committed)?;
        let mut warnings = vec![];
        let id = self.id;
        // The successor first: were we to die between the two sends, the
        // successor (committed, holding the lock) is the incumbent and the
        // old one, finding the lock taken, retires. The other order could
        // retire the old process while the new one is still waiting.
        let n = self.n.take().expect("successor exists at commit");
        if let Err(e) = n.chan.send(&Message::Commit { handoff_id: id }) {
            warnings.push(format!("the new incumbent did not get Commit ({e})"));
        }
        let new_pid = n.child.pid();
        let old_pid = self.old.as_ref().map(Child::pid);
        // Record the new incumbent before the old one hears Commit: the old
        // one may exit at once, and whoever watches the incumbent (the
        // crash-restart monitor) must then already see it retiring, not an
        // incumbent that died outside a handoff.
        {
            let mut p = self.sup.procs();
            if let Some(old) = p.incumbent.replace(n.child) {
                p.retiring.push(old);
            }
            p.retiring.retain(|c| c.try_exit().is_none());
        }
        if let Some(o) = &self.o {
            if let Err(e) = o.send(&Message::Commit { handoff_id: id }) {
                warnings.push(format!("the old incumbent did not get Commit ({e}); it will find the state lock taken and retire"));
            }
        }
        crash::point_if(self.with_incumbent, "s-after-commit");
        warnings.splice(0..0, std::mem::take(&mut self.warnings));
        // Dropping our end tells the old incumbent we are done with it.
        self.o = None;
        drop(n.chan);
        let took = self.phase_started.elapsed();
        let done = PhaseDone {
            phase: SupervisorPhase::Committed,
            took,
        };
        self.phases.push(done);
        (self.observer)(done);
        // The handoff is over for the service: both processes have their
        // Commit. What follows is the supervisor's bookkeeping.
        let total = self.started.elapsed();
        let cleared = self.sup.journal.clear();
        if let Err(e) = self.sup.journal.wait(cleared) {
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
            new_build_id: self.sup.procs().incumbent_build.clone(),
            phases: self.phases,
            total,
            prepared_for: self.held_for,
            warnings,
            connections: self.moved,
        })
    }

    pub(super) fn abort(mut self, cause: HandoffError) -> HandoffError {
        let phase = self.phase();
        tracing::warn!(target: "handoff::abort", handoff_id = %crate::protocol::IdHex(self.id), phase = phase.name(), cause = %cause);
        let _ = self.enter(SupervisorPhase::ResumingAfterAbort);
        let reason = cause.to_string();
        let n = self.n.take();
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
                self.resume_incumbent()
            }
            // It is answering: it got Abort and exits by itself, after
            // finishing any connections it accepted early (a stateless
            // service may accept before Begin). The incumbent resumes
            // meanwhile, so that wait does not lengthen the accept gap; a
            // successor holding the state lock releases it on Abort, which
            // the incumbent's lock wait covers. After Abort it neither binds
            // nor locks anything (both happen only on Begin, before Ready).
            Some(n) => {
                let resumed = self.resume_incumbent();
                let grace = self.t.abort_grace;
                if n.child.wait_timeout(grace).is_none() {
                    tracing::warn!(target: "handoff::abort", pid = n.child.pid(), grace_ms = grace.as_millis() as u64, "successor still running after the abort grace; killing it");
                    kill_successor(&n.child);
                }
                resumed
            }
            None => self.resume_incumbent(),
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
    fn resume_incumbent(&mut self) -> bool {
        let mut resumed = false;
        if let Some(o) = self.o.take() {
            if self.prepared {
                resumed = o
                    .send(&Message::ResumeAfterAbort {
                        handoff_id: self.id,
                    })
                    .is_ok();
            } else {
                resumed = true; // never asked to drain: it simply goes on
            }
        }
        resumed
    }
}

pub(in crate::supervisor) fn kill_successor(child: &Child) {
    if child.kill_and_reap(Duration::from_secs(10)).is_none() {
        tracing::error!(target: "handoff::abort", pid = child.pid(), "successor did not die within 10 s of SIGKILL");
    }
}
