//! A successor prepared ahead of its handoff: how a run is started from one,
//! and how one is prepared (the first half of a run, stopped after HelloAck).

use std::time::Instant;

use super::greeting::Spawned;
use super::run::{Left, Run, Start};
use crate::child::Child;
use crate::error::HandoffError;
use crate::journal::JournalRecord;
use crate::phase::SupervisorPhase;
use crate::spawn::Program;
use crate::supervisor::types::Held;
use crate::supervisor::PhaseDone;

impl Run<'_, '_> {
    /// Carries on with a successor prepared ahead: the handoff takes its id
    /// and its record (whose start time predates the successor's, which is
    /// what lets recovery tell it from a process that reused its pid), and
    /// starts from greeting the incumbent.
    pub(in crate::supervisor) fn with_held(mut self, held: Held, warnings: Vec<String>) -> Self {
        self.id = held.record.handoff_id;
        self.record = JournalRecord {
            incumbent_pid: self.old.as_ref().map(Child::pid),
            phase: SupervisorPhase::Negotiating,
            ..held.record
        };
        self.start = Start::Held(held.n);
        self.hello_build = held.build_id;
        self.held_for = Some(held.since.elapsed());
        self.warnings = warnings;
        self
    }

    pub(in crate::supervisor) fn with_warnings(mut self, warnings: Vec<String>) -> Self {
        self.warnings = warnings;
        self
    }

    /// Spawns and greets a successor, then stops: the rest of its handoff
    /// runs later, from [`Run::with_held`]. A failure stops the successor;
    /// the incumbent was never involved.
    pub(in crate::supervisor) fn prepare(
        mut self,
        program: &Program,
    ) -> Result<Held, HandoffError> {
        self.sup.journal.reset_error();
        self.sup.journal.write(&self.record);
        let spawned = match Spawned::spawn(&mut self, program) {
            Ok(s) => s,
            Err(e) => return Err(self.abort(e, Left::default())),
        };
        let n = match spawned.greet(&mut self) {
            Ok(g) => g.into_successor(),
            Err((e, n)) => return Err(self.abort(e, Left::successor(n))),
        };
        if let Err(e) = self.sup.journal.wait(self.successor_recorded) {
            return Err(self.abort(e.into(), Left::successor(n)));
        }
        let took = self.phase_started.elapsed();
        (self.observer)(PhaseDone {
            phase: SupervisorPhase::Negotiating,
            took,
        });
        tracing::info!(target: "handoff::prepare", handoff_id = %crate::protocol::IdHex(self.id), pid = n.child.pid(), took_us = took.as_micros() as u64, "successor prepared; held until the next upgrade");
        Ok(Held {
            n,
            program: program.clone(),
            record: self.record.clone(),
            build_id: std::mem::take(&mut self.hello_build),
            took,
            since: Instant::now(),
        })
    }
}
