//! The supervisor role: owns the listeners, spawns successors, drives each
//! handoff and journals it (docs/design.md §2, §5, §6).
//!
//! ```text
//! S       socketpair(); spawn N with listeners + control fd
//! S -> O  connect(control socket); O: Hello; S: HelloAck (N starts meanwhile)
//! N -> S  Hello (its warm-up done); S: HelloAck
//! S -> O  PrepareHandoff            O -> S  Heartbeat* Drained
//! S -> O  SealRequest               O -> S  SealProgress* SealComplete | SealFailed
//! S -> N  Begin                     N -> S  Heartbeat* Ready
//! S -> O,N Commit
//! ```
//!
//! Any failure before Ready kills and reaps the successor and tells the
//! incumbent to resume. After Ready the successor is the incumbent whatever
//! happens next.
//!
//! The first two steps for the successor (spawn, Hello/HelloAck) can also
//! run ahead of the upgrade, with [`Supervisor::prepare`]: the new build
//! starts and warms up while nothing is asked of the incumbent, and the
//! upgrade itself then costs only the steps from greeting the incumbent on.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::busy::Busy;

use crate::child::Child;
use crate::error::HandoffError;
use crate::journal::{Journal, JournalWriter};
use crate::listeners::Listener;
use crate::phase::SupervisorPhase;
use crate::protocol::{HandoffId, VersionRange};
use crate::spawn::Program;
use crate::timeouts::Timeouts;

mod handoff;
use handoff::{Held, Run};
mod peer;
mod prepared;
mod stop;
pub(crate) use peer::{check_hello, connect_incumbent_socket};
pub use stop::StopRequest;

/// How the supervisor is set up.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Where the service keeps its state lock; also holds the journal.
    pub state_dir: PathBuf,
    /// Path of the incumbent's control socket.
    pub control_path: PathBuf,
    pub timeouts: Timeouts,
    pub versions: VersionRange,
}

impl SupervisorConfig {
    pub fn new(state_dir: impl Into<PathBuf>, control_path: impl Into<PathBuf>) -> Self {
        SupervisorConfig {
            state_dir: state_dir.into(),
            control_path: control_path.into(),
            timeouts: Timeouts::default(),
            versions: VersionRange::OURS,
        }
    }
}

/// Per-handoff overrides of the configured timeouts.
#[derive(Debug, Clone, Copy, Default)]
pub struct HandoffOptions {
    pub deadline: Option<Duration>,
    pub drain_grace: Option<Duration>,
}

/// One phase as it completed, reported to the observer as it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseDone {
    pub phase: SupervisorPhase,
    pub took: Duration,
}

/// What a committed handoff did.
#[derive(Debug, Clone)]
pub struct Report {
    pub handoff_id: HandoffId,
    pub old_pid: Option<u32>,
    pub new_pid: u32,
    pub new_build_id: String,
    pub phases: Vec<PhaseDone>,
    pub total: Duration,
    /// When the handoff used a successor prepared ahead
    /// ([`Supervisor::prepare`]): how long it had been held.
    pub prepared_for: Option<Duration>,
    /// Problems after Ready that did not change the outcome (e.g. the old
    /// process vanished before it got Commit).
    pub warnings: Vec<String>,
}

// `total` runs from the request to the moment both processes have been sent
// Commit; the journal is cleared (durably) after that, before
// `perform_handoff` returns.

#[derive(Debug, Default)]
struct Processes {
    incumbent: Option<Child>,
    incumbent_build: String,
    /// Old incumbents finishing their connections; reaped as they exit.
    retiring: Vec<Child>,
}

/// A successor started ahead of its upgrade by [`Supervisor::prepare`].
#[derive(Debug, Clone)]
pub struct Prepared {
    pub handoff_id: HandoffId,
    pub pid: u32,
    /// What it announced in its Hello.
    pub build_id: String,
    pub program: Program,
    /// Spawn to HelloAck: the start-up the upgrade will not wait for.
    pub took: Duration,
    /// How long it has been held so far.
    pub held_for: Duration,
}

/// Drives handoffs for one service.
///
/// # Example
///
/// ```no_run
/// use handoff::{Supervisor, SupervisorConfig, Program, HandoffOptions};
/// use handoff::listeners::Listener;
/// use std::net::TcpListener;
///
/// let tcp = TcpListener::bind("127.0.0.1:0")?;
/// let listeners = vec![Listener { name: "http".into(), fd: tcp.into() }];
/// let sup = Supervisor::new(SupervisorConfig::new("/var/lib/svc", "/run/svc/control.sock"), listeners)?;
/// let program = Program::new("/usr/local/bin/my-service");
/// sup.start(&program, &mut |p| println!("{} {:?}", p.phase, p.took))?;
/// // ... later, after replacing the binary on disk:
/// let report = sup.perform_handoff(&program, HandoffOptions::default(), &mut |_| {})?;
/// println!("now serving: pid {}", report.new_pid);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Supervisor {
    cfg: SupervisorConfig,
    listeners: Vec<Listener>,
    journal: JournalWriter,
    /// Taken for the whole of each handoff (start, upgrade, crash restart,
    /// prepare, discard): one at a time.
    busy: Busy,
    procs: Mutex<Processes>,
    /// A successor prepared ahead, waiting for its upgrade. Taken only with
    /// `busy` held, so a handoff never races a prepare or a discard.
    held: Mutex<Option<Held>>,
}

impl Supervisor {
    /// Fails only if the journal's writer thread cannot be started.
    pub fn new(cfg: SupervisorConfig, listeners: Vec<Listener>) -> std::io::Result<Supervisor> {
        let journal = JournalWriter::new(Journal::new(&cfg.state_dir))?;
        Ok(Supervisor {
            cfg,
            listeners,
            journal,
            busy: Busy::default(),
            procs: Mutex::new(Processes::default()),
            held: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &SupervisorConfig {
        &self.cfg
    }

    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    pub fn journal(&self) -> &Journal {
        self.journal.journal()
    }

    fn procs(&self) -> MutexGuard<'_, Processes> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pid of the current incumbent, if one is running.
    pub fn incumbent_pid(&self) -> Option<u32> {
        let p = self.procs();
        p.incumbent
            .as_ref()
            .filter(|c| c.try_exit().is_none())
            .map(Child::pid)
    }

    /// The incumbent's child handle (for waiting on it or signalling it).
    pub fn incumbent(&self) -> Option<Child> {
        self.procs().incumbent.clone()
    }

    pub fn incumbent_build(&self) -> String {
        self.procs().incumbent_build.clone()
    }

    /// Old incumbents still finishing their connections.
    pub fn retiring_pids(&self) -> Vec<u32> {
        self.retiring().iter().map(Child::pid).collect()
    }

    /// Handles on the old incumbents still finishing their connections:
    /// for stopping them race-free against pid reuse
    /// ([`Child::signal`]) and learning how each ended.
    pub fn retiring(&self) -> Vec<Child> {
        let mut p = self.procs();
        p.retiring.retain(|c| c.try_exit().is_none());
        p.retiring.clone()
    }

    /// Takes on an incumbent that this supervisor did not spawn — one left
    /// serving by a previous supervisor — so the next handoff starts from
    /// it. Its liveness is watched by polling (it is not our child).
    pub fn adopt_incumbent(&self, pid: u32, build_id: &str) -> std::io::Result<()> {
        let c = Child::adopt_foreign(pid)?;
        let mut p = self.procs();
        if let Some(old) = p.incumbent.replace(c) {
            p.retiring.push(old);
        }
        p.incumbent_build = build_id.to_string();
        Ok(())
    }

    /// Waits up to `timeout` until no handoff (upgrade, start, crash
    /// restart, prepare) is in progress; whether none is. Takes nothing, so
    /// it never makes a concurrent upgrade fail as "in progress".
    ///
    /// For whoever watches the incumbent: one seen dead *during* a handoff
    /// is the handoff's business — it goes on with the successor and
    /// replaces the dead process, or aborts and leaves it recorded. Only
    /// once this returns `true` does [`Supervisor::incumbent`] say which.
    /// (A handoff that starts after the death cannot replace it: an upgrade
    /// or prepare refuses a dead incumbent with
    /// [`HandoffError::NoIncumbent`].)
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.busy.wait_free(timeout)
    }

    /// Starts the first incumbent: a handoff from nobody.
    pub fn start(
        &self,
        program: &Program,
        observer: &mut dyn FnMut(PhaseDone),
    ) -> Result<Report, HandoffError> {
        let _busy = self.busy.try_enter().ok_or(HandoffError::InProgress)?;
        let r = Run::new(self, HandoffOptions::default(), observer, false).execute(program);
        self.rejournal_held();
        r
    }

    /// Starts a fresh incumbent if `dead_pid` — the incumbent the caller
    /// saw exit — is still the recorded incumbent. Waits for a handoff in
    /// progress to finish first (it may already have replaced the dead
    /// process). Returns `Ok(None)` when there was nothing to do.
    ///
    /// While no process accepts, connections wait in the listen backlog
    /// that this supervisor keeps open: a crash costs latency, not refusals.
    pub fn restart_if_dead(
        &self,
        program: &Program,
        dead_pid: u32,
        observer: &mut dyn FnMut(PhaseDone),
    ) -> Result<Option<Report>, HandoffError> {
        let _busy = self.busy.enter();
        {
            let p = self.procs();
            match &p.incumbent {
                Some(c) if c.pid() == dead_pid && c.try_exit().is_some() => {}
                _ => return Ok(None),
            }
        }
        let r = Run::new(self, HandoffOptions::default(), observer, false)
            .execute(program)
            .map(Some);
        self.rejournal_held();
        r
    }

    /// Replaces the incumbent with a fresh process of `program`.
    ///
    /// If a successor of the same `program` was prepared ahead
    /// ([`Supervisor::prepare`]) and is still alive and quiet, the handoff
    /// uses it and starts at greeting the incumbent; otherwise that one is
    /// stopped (said in [`Report::warnings`]) and a fresh one spawned.
    ///
    /// Only one handoff runs at a time; a concurrent call gets
    /// [`HandoffError::InProgress`] at once.
    pub fn perform_handoff(
        &self,
        program: &Program,
        opts: HandoffOptions,
        observer: &mut dyn FnMut(PhaseDone),
    ) -> Result<Report, HandoffError> {
        let _busy = self.busy.try_enter().ok_or(HandoffError::InProgress)?;
        if self.incumbent_pid().is_none() {
            return Err(HandoffError::NoIncumbent);
        }
        let mut warnings = vec![];
        let run = Run::new(self, opts, observer, true);
        match self.take_held_for(program, &mut warnings) {
            Some(held) => run.with_held(held, warnings).execute(program),
            None => run.with_warnings(warnings).execute(program),
        }
    }
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("cfg", &self.cfg)
            .field("listeners", &self.listeners.len())
            .finish()
    }
}
