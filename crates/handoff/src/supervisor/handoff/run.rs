//! The context every state of a handoff shares ([`Run`]: the supervisor,
//! the clocks, the journal record, the phases done so far), and what a
//! failed step hands to the abort path ([`Left`]).

use std::time::{Duration, Instant};

use crate::supervisor::types::{HandoffOptions, PhaseDone, Successor, Supervisor};
use crate::channel::Channel;
use crate::child::Child;
use crate::error::{HandoffError, ProtocolError};
use crate::journal::{now_ms, JournalRecord};
use crate::phase::{Peer, SupervisorPhase};
use crate::protocol::HandoffId;
use crate::timeouts::Timeouts;

/// Fresh handoff id: random enough to never repeat across restarts. (A
/// stop's id too: it scopes that exchange the same way.)
pub(in crate::supervisor) fn new_handoff_id() -> HandoffId {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.write_u32(std::process::id());
    h.finish()
}

/// What a failed step still holds, for the abort path to tell.
#[derive(Default)]
pub(super) struct Left {
    /// The incumbent's channel, if it was connected.
    pub(super) o: Option<Channel>,
    /// PrepareHandoff was sent: the incumbent must be told to resume.
    pub(super) prepared: bool,
    /// The successor, if it was spawned.
    pub(super) n: Option<Successor>,
}

impl Left {
    pub(super) fn successor(n: Successor) -> Left {
        Left {
            n: Some(n),
            ..Left::default()
        }
    }
}

/// A step's outcome: the next state, or the failure and what is left.
pub(super) type Step<T> = Result<T, (HandoffError, Left)>;

/// How a run starts.
pub(super) enum Start {
    /// Spawn a successor.
    Fresh,
    /// With a successor prepared ahead, already greeted.
    Held(Successor),
}

/// One handoff in flight: the context its states share.
pub(in crate::supervisor) struct Run<'a, 'o> {
    pub(super) sup: &'a Supervisor,
    pub(super) t: Timeouts,
    pub(super) observer: &'o mut dyn FnMut(PhaseDone),
    pub(super) id: HandoffId,
    pub(super) started: Instant,
    pub(super) phase_started: Instant,
    pub(super) phases: Vec<PhaseDone>,
    pub(super) record: JournalRecord,
    pub(super) with_incumbent: bool,
    pub(super) old: Option<Child>,
    pub(super) start: Start,
    /// Journal write that recorded the successor's pid; must be durable
    /// before Begin.
    pub(super) successor_recorded: u64,
    /// How long the successor had been held, when it was prepared ahead.
    pub(super) held_for: Option<Duration>,
    /// Reported with the outcome (e.g. a prepared successor that was found
    /// dead and replaced).
    pub(super) warnings: Vec<String>,
    /// The build id the successor announced in its Hello.
    pub(super) hello_build: String,
    /// The successor's catch-up, from its Ready.
    pub(super) catch_up: Option<crate::CatchUpReport>,
}

impl<'a, 'o> Run<'a, 'o> {
    pub(in crate::supervisor) fn new(
        sup: &'a Supervisor,
        opts: HandoffOptions,
        observer: &'o mut dyn FnMut(PhaseDone),
        with_incumbent: bool,
    ) -> Self {
        let mut t = sup.cfg.timeouts;
        if let Some(d) = opts.deadline {
            t.deadline = d;
        }
        if let Some(g) = opts.drain_grace {
            t.drain_grace = g;
        }
        let id = new_handoff_id();
        let old = if with_incumbent {
            sup.procs().incumbent.clone()
        } else {
            None
        };
        let now = Instant::now();
        Run {
            sup,
            t,
            observer,
            id,
            started: now,
            phase_started: now,
            phases: vec![],
            record: JournalRecord {
                handoff_id: id,
                phase: SupervisorPhase::Negotiating,
                incumbent_pid: old.as_ref().map(Child::pid),
                successor_pid: None,
                started_at: now_ms(),
            },
            with_incumbent,
            old,
            start: Start::Fresh,
            successor_recorded: 0,
            held_for: None,
            warnings: vec![],
            hello_build: String::new(),
            catch_up: None,
        }
    }

    pub(super) fn phase(&self) -> SupervisorPhase {
        self.record.phase
    }

    /// Journals the next phase and reports the one that just ended.
    pub(super) fn enter(&mut self, next: SupervisorPhase) {
        let now = Instant::now();
        let done = PhaseDone {
            phase: self.record.phase,
            took: now - self.phase_started,
        };
        self.phases.push(done);
        (self.observer)(done);
        tracing::info!(
            target: "handoff::phase",
            handoff_id = %crate::protocol::IdHex(self.id),
            phase = done.phase.name(),
            took_us = done.took.as_micros() as u64,
            next = next.name(),
        );
        self.phase_started = now;
        self.record.phase = next;
        self.sup.journal.write(&self.record);
    }

    /// What remains of the overall deadline.
    pub(super) fn remaining(&self) -> Duration {
        self.t.deadline.saturating_sub(self.started.elapsed())
    }

    pub(super) fn incumbent_died(&self) -> bool {
        match &self.old {
            Some(c) => c.wait_timeout(Duration::from_millis(500)).is_some(),
            None => false,
        }
    }
}

/// A successor channel failure: if the child exited, say so (that is the
/// useful diagnosis), otherwise keep the protocol error.
pub(super) fn successor_failure(n: &Successor, e: ProtocolError) -> HandoffError {
    if let Some(exit) = n.child.wait_timeout(Duration::from_millis(200)) {
        return HandoffError::SuccessorExited {
            pid: n.child.pid(),
            exit,
        };
    }
    e.into()
}

/// A message the phase table allows but this state has no use for: the
/// peer's mistake, reported as an unexpected message rather than trusted.
pub(super) fn unexpected(peer: Peer, phase: &'static str, message: &'static str) -> HandoffError {
    ProtocolError::Unexpected {
        peer,
        phase,
        message,
    }
    .into()
}

/// The whole-phase clock ran out waiting for `peer` (§5.1).
pub(super) fn phase_timeout(
    peer: Peer,
    phase: SupervisorPhase,
    clock: &crate::timeouts::PhaseClock,
) -> ProtocolError {
    ProtocolError::Timeout {
        peer,
        phase: phase.name(),
        waited_ms: clock.started.elapsed().as_millis() as u64,
        clock: "phase deadline",
    }
}
