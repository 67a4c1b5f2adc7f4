//! The handoff's states in order, from spawning the successor to Ready;
//! then Commit, or the abort path with whatever the failed step left.

use super::draining::Draining;
use super::ending::{AwaitingReady, Ready};
use super::greeting::{self, Greeted, Spawned};
use super::run::{Left, Run, Start, Step};
use crate::error::HandoffError;
use crate::phase::SupervisorPhase;
use crate::spawn::Program;
use crate::supervisor::types::{Report, Successor};

/// The successor before the incumbent is greeted: just spawned, or
/// prepared ahead and greeted already.
enum Arrived {
    Spawned(Spawned),
    Greeted(Greeted),
}

impl Arrived {
    fn into_successor(self) -> Successor {
        match self {
            Arrived::Spawned(s) => s.into_successor(),
            Arrived::Greeted(g) => g.into_successor(),
        }
    }
}

impl Run<'_, '_> {
    pub(in crate::supervisor) fn execute(mut self, program: &Program) -> Result<Report, HandoffError> {
        self.sup.journal.reset_error();
        // With a prepared successor this rewrite only refreshes the incumbent's
        // pid: the record naming the successor (which is all recovery needs)
        // was made durable by the prepare, so Begin does not wait for it.
        self.sup.journal.write(&self.record);
        match self.drive(program) {
            Ok(ready) => ready.commit(self),
            Err((e, left)) => Err(self.abort(e, left)),
        }
    }

    /// Everything up to and including Ready.
    fn drive(&mut self, program: &Program) -> Step<Ready> {
        // Spawn first, greet the incumbent second: the successor's exec,
        // dynamic loading and warm-up (most of a handoff's time) then run on
        // the other core while we greet the incumbent, instead of after it.
        // Nothing is asked of the incumbent before the successor's Hello, so
        // a failed greeting costs only the successor, which `abort` reaps.
        let n = match std::mem::replace(&mut self.start, Start::Fresh) {
            Start::Fresh => Arrived::Spawned(
                Spawned::spawn(self, program).map_err(|e| (e, Left::default()))?,
            ),
            Start::Held(n) => Arrived::Greeted(Greeted::held(n)),
        };
        let o = if self.with_incumbent {
            match greeting::connect_incumbent(self) {
                Ok(o) => {
                    // Where negotiating's time goes (HANDOFF_LOG=handoff::phase=debug).
                    tracing::debug!(target: "handoff::phase", handoff_id = %crate::protocol::IdHex(self.id), "incumbent greeted");
                    Some(o)
                }
                Err(e) => return Err((e, Left::successor(n.into_successor()))),
            }
        } else {
            None
        };
        let n = match n {
            Arrived::Greeted(g) => g,
            Arrived::Spawned(s) => match s.greet(self) {
                Ok(g) => g,
                Err((e, n)) => {
                    return Err((
                        e,
                        Left {
                            o,
                            prepared: false,
                            n: Some(n),
                        },
                    ))
                }
            },
        };
        let awaiting = match o {
            Some(o) => {
                self.enter(SupervisorPhase::Draining);
                let drained = Draining::start(self, o, n)?.drained(self);
                let sealed = match drained {
                    Ok(sealing) => sealing.sealed(self),
                    Err(failed) => Err(failed),
                };
                match sealed {
                    Ok(awaiting) => awaiting,
                    Err((e, left)) if self.incumbent_died() => {
                        // The incumbent crashed mid-handoff: nothing to
                        // resume, so carry on with the successor rather than
                        // leave the listeners unserved.
                        tracing::warn!(target: "handoff::phase", handoff_id = %crate::protocol::IdHex(self.id), error = %e,
                            "incumbent died during the handoff; continuing with the successor");
                        let Some(n) = left.n else {
                            return Err((e, left));
                        };
                        if self.phase() != SupervisorPhase::Sealing {
                            self.enter(SupervisorPhase::Sealing);
                        }
                        AwaitingReady::without_incumbent(n)
                    }
                    Err(failed) => return Err(failed),
                }
            }
            None => AwaitingReady::without_incumbent(n.into_successor()),
        };
        self.enter(SupervisorPhase::AwaitingReady);
        awaiting.begin(self)
    }

}
