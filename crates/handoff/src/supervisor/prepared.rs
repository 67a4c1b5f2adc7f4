//! Successors prepared ahead ([`Supervisor::prepare`]): holding one,
//! handing it to the next upgrade, and stopping it when it cannot serve.

use std::sync::MutexGuard;
use std::time::Duration;

use super::handoff::{kill_successor, Run};
use super::types::Held;
use super::{HandoffOptions, PhaseDone, Prepared, Supervisor};
use crate::child::Child;
use crate::error::HandoffError;
use crate::spawn::Program;

impl Supervisor {
    /// Starts the successor for the next upgrade now — spawn, exec, its
    /// warm-up, Hello — and holds it, waiting for Begin, until
    /// [`Supervisor::perform_handoff`] asks for the same `program`. The
    /// incumbent is not told anything: a build that fails to start costs
    /// nothing but its own process, and the upgrade later does not wait for
    /// the start-up.
    ///
    /// A successor already held is replaced (asked to stop, with
    /// [`Timeouts::abort_grace`](crate::Timeouts::abort_grace) to finish
    /// what it accepted). If the supervisor dies while holding one, the
    /// successor sees its control channel close and exits, and a restarted
    /// supervisor's recovery stops it if it does not (it is in the journal).
    ///
    /// A prepared successor of a service that accepts before Begin serves
    /// alongside the incumbent while it is held. One that hangs while held
    /// is not noticed until its upgrade, which then times out waiting for
    /// Ready and aborts (the incumbent resumes): there is no keepalive
    /// before Begin.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use handoff::{Supervisor, Program, HandoffOptions};
    /// # fn f(sup: &Supervisor) -> Result<(), handoff::HandoffError> {
    /// let next = Program::new("/opt/svc/v2/svc");
    /// let held = sup.prepare(&next, &mut |_| {})?; // v2 starts; v1 serves on
    /// println!("v2 is pid {}, started in {:?}", held.pid, held.took);
    /// // ... later: the cut-over waits for no process start.
    /// let report = sup.perform_handoff(&next, HandoffOptions::default(), &mut |_| {})?;
    /// assert_eq!(report.new_pid, held.pid);
    /// # Ok(()) }
    /// ```
    pub fn prepare(
        &self,
        program: &Program,
        observer: &mut dyn FnMut(PhaseDone),
    ) -> Result<Prepared, HandoffError> {
        let _busy = self.busy.try_enter().ok_or(HandoffError::InProgress)?;
        if self.incumbent_pid().is_none() {
            return Err(HandoffError::NoIncumbent);
        }
        if let Some(old) = self.held_slot().take() {
            tracing::info!(target: "handoff::prepare", pid = old.n.child.pid(), "replacing the successor prepared before");
            self.retire_held(old, "replaced by a newer prepared successor");
        }
        let held = Run::new(self, HandoffOptions::default(), observer, true).prepare(program)?;
        let info = describe(&held);
        *self.held_slot() = Some(held);
        crate::crash::point("s-holding-prepared");
        Ok(info)
    }

    /// The successor held for the next upgrade, if any.
    pub fn prepared(&self) -> Option<Prepared> {
        self.held_slot().as_ref().map(describe)
    }

    /// Stops the successor held for the next upgrade (Abort, then
    /// [`Timeouts::abort_grace`](crate::Timeouts::abort_grace) before
    /// SIGKILL, in the background) and returns its handle, to wait for it
    /// if the caller cares. Waits for a handoff in flight first.
    pub fn discard_prepared(&self) -> Option<Child> {
        let _busy = self.busy.enter();
        let held = self.held_slot().take()?;
        let child = held.n.child.clone();
        self.retire_held(held, "discarded");
        let cleared = self.journal.clear();
        if let Err(e) = self.journal.wait(cleared) {
            tracing::error!(target: "handoff::prepare", error = %e, "clearing the journal failed");
        }
        Some(child)
    }

    pub(super) fn held_slot(&self) -> MutexGuard<'_, Option<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The held successor, if it can serve this handoff: same program,
    /// still running, and nothing on its channel (a held successor has
    /// nothing to say before Begin; bytes or EOF mean it is broken or
    /// gone). One that cannot is stopped, with a warning for the report.
    pub(super) fn take_held_for(
        &self,
        program: &Program,
        warnings: &mut Vec<String>,
    ) -> Option<Held> {
        let held = self.held_slot().take()?;
        let pid = held.n.child.pid();
        let unusable = if held.program != *program {
            Some(format!(
                "the successor prepared for {} (pid {pid}) was stopped: this upgrade asks for {}",
                held.program.path.display(),
                program.path.display()
            ))
        } else if let Some(exit) = held.n.child.try_exit() {
            Some(dead(pid, exit))
        } else if held.n.chan.has_input() {
            // Its channel closes as it dies, a moment before its reaper
            // notices: name the exit if that is what it was.
            Some(match held.n.child.wait_timeout(Duration::from_millis(200)) {
                Some(exit) => dead(pid, exit),
                None => format!(
                    "the prepared successor (pid {pid}) closed or wrote to its control channel while held; stopped it and started a fresh one"
                ),
            })
        } else {
            None
        };
        match unusable {
            None => Some(held),
            Some(w) => {
                tracing::warn!(target: "handoff::prepare", pid, "{w}");
                self.retire_held(held, "unusable for this upgrade");
                warnings.push(w);
                None
            }
        }
    }

    /// Tells a held successor to stop and gives it the abort grace in the
    /// background; it is tracked as retiring meanwhile (so a stop finds it).
    pub(super) fn retire_held(&self, held: Held, reason: &str) {
        let _ = held.n.chan.send(&crate::protocol::Message::Abort {
            handoff_id: held.record.handoff_id,
            reason: reason.to_string(),
        });
        let child = held.n.child;
        drop(held.n.chan);
        self.procs().retiring.push(child.clone());
        let grace = self.cfg.timeouts.abort_grace;
        let spawned = std::thread::Builder::new()
            .name("retire-prepared".into())
            .spawn({
                let child = child.clone();
                move || {
                    if child.wait_timeout(grace).is_none() {
                        tracing::warn!(target: "handoff::prepare", pid = child.pid(), "prepared successor still running after the abort grace; killing it");
                        kill_successor(&child);
                    }
                }
            });
        if spawned.is_err() {
            kill_successor(&child);
        }
    }

    /// A run that did not use the held successor replaced and then cleared
    /// the journal: write the held successor's record back.
    pub(super) fn rejournal_held(&self) {
        if let Some(h) = self.held_slot().as_ref() {
            let seq = self.journal.write(&h.record);
            if let Err(e) = self.journal.wait(seq) {
                tracing::error!(target: "handoff::prepare", error = %e, "re-recording the prepared successor failed");
            }
        }
    }
}

fn dead(pid: u32, exit: crate::child::Exit) -> String {
    format!("the prepared successor (pid {pid}) had exited ({exit}); started a fresh one")
}

fn describe(h: &Held) -> Prepared {
    Prepared {
        handoff_id: h.record.handoff_id,
        pid: h.n.child.pid(),
        build_id: h.build_id.clone(),
        program: h.program.clone(),
        took: h.took,
        held_for: h.since.elapsed(),
    }
}
