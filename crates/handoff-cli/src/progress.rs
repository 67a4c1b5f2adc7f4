//! What the supervisor has been doing, for `handoff status`, and the one
//! gate every upgrade passes through (admin request or SIGHUP alike).
//!
//! The library runs one handoff at a time and refuses a concurrent one with
//! [`HandoffError::InProgress`]; it reports phases only as they *end*. This
//! module wraps [`Supervisor::perform_handoff`] to keep what an operator
//! asks about while and between upgrades: which phase is running now and
//! since when, the last handoff's phases and outcome, the counts. It is also
//! where `handoff stop` closes the door: the stopping flag and "a handoff is
//! in flight" live under one mutex, so an upgrade either got in before the
//! stop (and the stop waits for it) or is refused — never both nor neither.
//!
//! The journal stays the durable truth (it is what a restarted supervisor
//! reads); the status shows it beside this in-memory view, which it may lag
//! by one fsync.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use handoff::{HandoffError, PhaseDone, Report, Supervisor, SupervisorPhase};
use handoff_admin::schema::status::{
    Activity, Counts, InFlight, JournalView, LastHandoff, PhaseTiming, PreparedView, Trigger,
};

/// How often a waiting upgrade re-checks a slot held by someone this module
/// does not see finish (a crash restart holds the library's slot too).
const RECHECK: Duration = Duration::from_millis(50);

/// One handoff attempt, given the observer to report phases to.
pub type Perform<'a> = &'a mut dyn FnMut(&mut dyn FnMut(PhaseDone)) -> Result<Report, HandoffError>;

/// Where [`Progress::upgrade`] reports to.
pub struct Hooks<'a> {
    /// Each phase as it ends.
    pub phase: &'a mut dyn FnMut(PhaseDone),
    /// Once, when the request starts waiting for a handoff in flight.
    pub waiting: &'a mut dyn FnMut(Option<InFlight>),
    /// The outcome of an attempt, while the slot is still held.
    pub done: &'a mut dyn FnMut(&Result<Report, HandoffError>),
}

/// Why an upgrade did not run or did not commit.
#[derive(Debug)]
pub enum UpgradeFailure {
    /// The supervisor is stopping; nothing was attempted.
    Stopping,
    /// `--wait` ran out while another handoff still held the slot.
    StillBusy(Duration),
    Handoff(HandoffError),
}

impl std::fmt::Display for UpgradeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpgradeFailure::Stopping => f.write_str(
                "the supervisor is stopping (`handoff stop` or SIGTERM) and accepts no new upgrades",
            ),
            UpgradeFailure::StillBusy(w) => write!(
                f,
                "another handoff was still in progress after waiting {w:?}; retry, or wait longer with --wait"
            ),
            UpgradeFailure::Handoff(e) => e.fmt(f),
        }
    }
}

struct Running {
    trigger: Trigger,
    started: Instant,
    phase: SupervisorPhase,
    phase_since: Instant,
    done: Vec<PhaseTiming>,
    /// Its outcome has been told to the requester; the slot is being
    /// released. A request arriving now waits for it instead of being
    /// turned away: the requester of the last upgrade may be a script
    /// that starts the next as soon as it heard the outcome.
    finishing: bool,
}

/// How long a request waits for a handoff that has told its outcome to
/// release the slot (microseconds, in practice).
const FINISHING_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct State {
    stopping: bool,
    counts: Counts,
    last: Option<LastHandoff>,
    running: Option<Running>,
    /// Requests waiting for a finishing handoff to release the slot.
    awaiting_release: usize,
}

/// The supervisor's record of its handoffs; one per `handoff run`.
pub struct Progress {
    started: Instant,
    state: Mutex<State>,
    /// Notified when a handoff ends.
    idle: Condvar,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            started: Instant::now(),
            state: Mutex::default(),
            idle: Condvar::new(),
        }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn hex_id(id: u64) -> String {
    format!("{id:#018x}")
}

/// The phase that starts when `done` ends, in a handoff that goes on. (An
/// abort is only known when `resuming-after-abort` itself ends, so for the
/// few milliseconds of an abort this names the phase that would have come.)
fn next_phase(done: SupervisorPhase) -> SupervisorPhase {
    use SupervisorPhase as P;
    match done {
        P::Negotiating => P::Draining,
        P::Draining => P::Sealing,
        P::Sealing => P::AwaitingReady,
        P::AwaitingReady | P::Committed => P::Committed,
        P::ResumingAfterAbort => P::ResumingAfterAbort,
    }
}

/// How long `pid` has been running, from the kernel's records: its start
/// time in clock ticks since boot (`/proc/PID/stat` field 22) against the
/// time since boot (`/proc/uptime`), both on the boot clock, so good to a
/// tick (10 ms) for adopted processes as well as our own children. (The
/// wall-clock start time via `btime` is only good to a second.)
pub fn uptime_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|v| *v > 0)? as u64;
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(((up * 1000.0) as u64).saturating_sub(ticks * 1000 / hz))
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A record that goes on from `counts` and `last`: what a supervisor
    /// replaced in place (`handoff upgrade --supervisor`) had counted.
    pub fn with_history(counts: Counts, last: Option<LastHandoff>) -> Progress {
        let p = Progress::default();
        {
            let mut st = p.lock();
            st.counts = counts;
            st.last = last;
        }
        p
    }

    /// The handoffs counted and the last one, for a re-exec to carry.
    pub fn history(&self) -> (Counts, Option<LastHandoff>) {
        let st = self.lock();
        (st.counts, st.last.clone())
    }

    /// Runs one handoff, recording it: `perform` is
    /// [`Supervisor::perform_handoff`] (possibly wrapped), called with an
    /// observer that passes phases on to `hooks.phase`. With `wait`, a
    /// handoff already in flight is waited for (bounded by `wait`;
    /// `hooks.waiting` is told once, with what runs) and ours runs after
    /// it; without, it fails at once with [`HandoffError::InProgress`].
    ///
    /// `hooks.done` gets the outcome of a handoff that ran (or found no
    /// incumbent) *before* the slot is released: a stop waiting for the
    /// slot then cannot end the process before the requester has heard
    /// whether its upgrade committed. Failures to get the slot (stopping,
    /// in progress, still busy after `wait`) are only returned.
    pub fn upgrade(
        &self,
        sup: &Supervisor,
        trigger: Trigger,
        wait: Option<Duration>,
        perform: Perform<'_>,
        hooks: Hooks<'_>,
    ) -> Result<Report, UpgradeFailure> {
        let Hooks {
            phase: observer,
            waiting: on_wait,
            done,
        } = hooks;
        let until = wait.map(|w| Instant::now() + w);
        let mut told = false;
        loop {
            if self.admit_after_finishing(trigger)? {
                let r = perform(&mut |p| {
                    self.phase_ended(p);
                    observer(p);
                });
                match r {
                    // A crash restart holds the library's slot: we did not
                    // see it start, so it is waited for by re-checking.
                    Err(HandoffError::InProgress) => self.end(trigger, None),
                    Err(HandoffError::NoIncumbent) => {
                        let r = Err(HandoffError::NoIncumbent);
                        self.finishing();
                        done(&r);
                        self.end(trigger, None);
                        return r.map_err(UpgradeFailure::Handoff);
                    }
                    r => {
                        self.finishing();
                        done(&r);
                        self.end(trigger, Some(&r));
                        return r.map_err(UpgradeFailure::Handoff);
                    }
                }
            }
            let (Some(until), Some(w)) = (until, wait) else {
                return Err(UpgradeFailure::Handoff(HandoffError::InProgress));
            };
            let now = Instant::now();
            if now >= until {
                return Err(UpgradeFailure::StillBusy(w));
            }
            if !told {
                told = true;
                on_wait(self.in_flight(sup));
            }
            let st = self.lock();
            if st.running.is_some() {
                let _ = self.idle.wait_timeout(st, (until - now).min(RECHECK));
            } else {
                drop(st);
                std::thread::sleep((until - now).min(RECHECK));
            }
        }
    }

    /// Takes the slot, waiting (up to [`FINISHING_WAIT`]) for a handoff
    /// that has told its outcome and is releasing it: `Ok(false)` if a
    /// handoff is in flight.
    fn admit_after_finishing(&self, trigger: Trigger) -> Result<bool, UpgradeFailure> {
        let until = Instant::now() + FINISHING_WAIT;
        let mut st = self.lock();
        while st.running.as_ref().is_some_and(|r| r.finishing) && !st.stopping {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st.awaiting_release += 1;
            st = self
                .idle
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            st.awaiting_release -= 1;
        }
        drop(st);
        self.admit(trigger)
    }

    /// The handoff in the slot has an outcome, about to be told.
    fn finishing(&self) {
        if let Some(r) = self.lock().running.as_mut() {
            r.finishing = true;
        }
    }

    /// Takes the slot: `Ok(false)` if a handoff is in flight.
    fn admit(&self, trigger: Trigger) -> Result<bool, UpgradeFailure> {
        let mut st = self.lock();
        if st.stopping {
            return Err(UpgradeFailure::Stopping);
        }
        if st.running.is_some() {
            return Ok(false);
        }
        let now = Instant::now();
        st.running = Some(Running {
            trigger,
            started: now,
            phase: SupervisorPhase::Negotiating,
            phase_since: now,
            done: vec![],
            finishing: false,
        });
        Ok(true)
    }

    fn phase_ended(&self, p: PhaseDone) {
        let mut st = self.lock();
        if let Some(r) = st.running.as_mut() {
            r.done.push(PhaseTiming {
                phase: p.phase.name().to_string(),
                took_ms: ms(p.took),
            });
            r.phase = next_phase(p.phase);
            r.phase_since = Instant::now();
        }
    }

    /// Frees the slot; `outcome` is `None` when nothing ran.
    fn end(&self, trigger: Trigger, outcome: Option<&Result<Report, HandoffError>>) {
        let mut st = self.lock();
        let running = st.running.take();
        if let (Some(outcome), Some(running)) = (outcome, running) {
            let ended_at_ms = handoff::journal::now_ms();
            let last = match outcome {
                Ok(r) => {
                    st.counts.committed += 1;
                    LastHandoff {
                        handoff_id: Some(hex_id(r.handoff_id)),
                        trigger,
                        outcome: "committed".into(),
                        old_pid: r.old_pid,
                        new_pid: Some(r.new_pid),
                        phases: running.done,
                        total_ms: ms(r.total),
                        ended_at_ms,
                        reason: None,
                    }
                }
                Err(e) => {
                    st.counts.aborted += 1;
                    let id = match e {
                        HandoffError::Aborted { handoff_id, .. } => Some(hex_id(*handoff_id)),
                        _ => None,
                    };
                    LastHandoff {
                        handoff_id: id,
                        trigger,
                        outcome: "aborted".into(),
                        old_pid: None,
                        new_pid: None,
                        phases: running.done,
                        total_ms: ms(running.started.elapsed()),
                        ended_at_ms,
                        reason: Some(e.to_string()),
                    }
                }
            };
            st.last = Some(last);
        }
        drop(st);
        self.idle.notify_all();
    }

    /// Closes the door to new upgrades; returns whether it was already closed.
    pub fn begin_stop(&self) -> bool {
        std::mem::replace(&mut self.lock().stopping, true)
    }

    /// Waits for the handoff in flight, if any, to end. Bounded by that
    /// handoff's own deadline, which the library enforces.
    pub fn wait_idle(&self) {
        let mut st = self.lock();
        while st.running.is_some() {
            st = self.idle.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The handoff in flight, if this supervisor runs one.
    pub fn in_flight(&self, sup: &Supervisor) -> Option<InFlight> {
        let journal = sup.journal().read().ok().flatten();
        let st = self.lock();
        let r = st.running.as_ref()?;
        Some(InFlight {
            handoff_id: journal.map(|j| hex_id(j.handoff_id)),
            trigger: r.trigger,
            phase: r.phase.name().to_string(),
            in_phase_ms: r.phase_since.elapsed().as_millis() as u64,
            elapsed_ms: r.started.elapsed().as_millis() as u64,
            phases: r.done.clone(),
        })
    }

    /// Everything `handoff status` shows about handoffs and uptimes.
    pub fn activity(&self, sup: &Supervisor) -> Activity {
        let (journal, journal_error) = match sup.journal().read() {
            Ok(j) => (
                j.map(|j| JournalView {
                    handoff_id: hex_id(j.handoff_id),
                    phase: j.phase.name().to_string(),
                    incumbent_pid: j.incumbent_pid,
                    successor_pid: j.successor_pid,
                    started_at_ms: j.started_at,
                }),
                None,
            ),
            Err(e) => (None, Some(e.to_string())),
        };
        let in_flight = self.in_flight(sup).map(|mut f| {
            f.handoff_id = journal.as_ref().map(|j| j.handoff_id.clone());
            f
        });
        let incumbent_uptime_ms = sup.incumbent_pid().and_then(uptime_ms);
        let st = self.lock();
        Activity {
            supervisor_uptime_ms: uptime_ms(std::process::id())
                .unwrap_or_else(|| self.started.elapsed().as_millis() as u64),
            incumbent_uptime_ms,
            stopping: st.stopping,
            handoffs: st.counts,
            last_handoff: st.last.clone(),
            in_flight,
            journal,
            journal_error,
            prepared: sup.prepared().map(|p| PreparedView {
                pid: p.pid,
                build_id: p.build_id,
                binary: p.program.path.display().to_string(),
                held_ms: p.held_for.as_millis() as u64,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_the_handoff_order() {
        use SupervisorPhase as P;
        let mut p = P::Negotiating;
        let mut seen = vec![p];
        while p != P::Committed {
            p = next_phase(p);
            seen.push(p);
        }
        assert_eq!(
            seen,
            [
                P::Negotiating,
                P::Draining,
                P::Sealing,
                P::AwaitingReady,
                P::Committed
            ]
        );
    }

    #[test]
    fn our_own_uptime_is_plausible() {
        let ours = uptime_ms(std::process::id()).expect("procfs");
        let init = uptime_ms(1).expect("procfs");
        // Not days ago, and after pid 1 (to a tick).
        assert!(ours < 3_600_000, "{ours}");
        assert!(init + 10 >= ours, "init {init} < ours {ours}");
        assert!(uptime_ms(u32::MAX).is_none());
    }

    /// The requester of an upgrade hears its outcome just before the slot
    /// is released. One that starts the next upgrade at once waits for that
    /// release instead of being told another handoff is in progress; a
    /// handoff still running is refused as before.
    #[test]
    fn a_request_waits_for_a_handoff_that_told_its_outcome() {
        let p = std::sync::Arc::new(Progress::default());
        assert!(p.admit(Trigger::Admin).unwrap());
        assert!(
            !p.admit_after_finishing(Trigger::Admin).unwrap(),
            "a handoff still running is refused at once"
        );
        p.finishing();
        let next = std::thread::spawn({
            let p = p.clone();
            move || p.admit_after_finishing(Trigger::Admin)
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.lock().awaiting_release == 0 {
            assert!(
                !next.is_finished(),
                "refused instead of waiting: {:?}",
                next.join()
            );
            assert!(Instant::now() < deadline, "the request never waited");
            std::thread::yield_now();
        }
        // What the first handoff does after telling its outcome.
        p.end(Trigger::Admin, None);
        assert!(
            next.join().unwrap().unwrap(),
            "the next request got the slot"
        );
        assert!(p.lock().running.is_some());
    }

    #[test]
    fn stop_closes_the_gate_once() {
        let p = Progress::default();
        assert!(p.admit(Trigger::Admin).unwrap());
        assert!(!p.admit(Trigger::Sighup).unwrap(), "one at a time");
        assert!(!p.begin_stop());
        assert!(p.begin_stop(), "second stop sees the first");
        p.end(Trigger::Admin, None);
        p.wait_idle();
        assert!(matches!(
            p.admit(Trigger::Admin),
            Err(UpgradeFailure::Stopping)
        ));
        // Nothing ran: nothing counted.
        assert_eq!(p.lock().counts, Counts::default());
    }
}
