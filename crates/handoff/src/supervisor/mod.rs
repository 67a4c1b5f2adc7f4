//! The supervisor role: owns the listeners, spawns successors, drives each
//! handoff and journals it (docs/design.md §2, §5, §6).
//!
//! ```text
//! S       socketpair(); spawn N with listeners + control fd
//! S -> O  connect(control socket); O: Hello; S: HelloAck (N starts meanwhile)
//! N -> S  Hello (its warm-up done); S: HelloAck
//! S -> O  PrepareHandoff            O -> S  Heartbeat* Drained
//! S -> O  SealRequest (v ≤ 4)       O -> S  SealProgress* SealComplete | SealFailed
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

use std::sync::Mutex;
use std::time::Duration;

use crate::busy::Busy;

use crate::child::Child;
use crate::error::HandoffError;
use crate::journal::{Journal, JournalWriter};
use crate::listeners::Listener;
use crate::spawn::Program;

mod handoff;
use handoff::Run;
mod peer;
mod prepared;
mod stop;
mod types;
pub(crate) use peer::{check_hello, connect_incumbent_socket};
pub use stop::StopRequest;
use types::Processes;
pub use types::{
    ConnectionsMoved, HandoffOptions, PhaseDone, Prepared, Report, Supervisor, SupervisorConfig,
};

impl Supervisor {
    /// Fails only if the journal's writer thread cannot be started.
    pub fn new(cfg: SupervisorConfig, listeners: Vec<Listener>) -> std::io::Result<Supervisor> {
        // Room for two batches of moved connections on their way through
        // (`sys::fdpass::reserve_table`): without it the first upgrade that
        // moves connections grows the table mid-relay, and each growth
        // sleeps in the kernel for an RCU grace period.
        let room = 2 * crate::sys::fdpass::MAX_FDS as u64 + 64;
        if let Err(e) = crate::sys::fdpass::reserve_table(room) {
            tracing::debug!(error = %e, "descriptor table not reserved");
        }
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

    /// The configuration it was created with.
    pub fn config(&self) -> &SupervisorConfig {
        &self.cfg
    }

    /// The listening sockets it holds for the service's whole life and
    /// passes to every process it spawns, in fd order (3, 4, …).
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// The journal in the state dir, for reading what is in flight (its
    /// writes go through the supervisor's background writer).
    pub fn journal(&self) -> &Journal {
        self.journal.journal()
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

    /// The incumbent's build, as its Ready (or, for an adopted incumbent,
    /// the caller) said; empty before the first one.
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
    /// it. Its liveness is watched by polling (it is not our child, or one
    /// whose exit status the caller collects itself).
    pub fn adopt_incumbent(&self, pid: u32, build_id: &str) -> std::io::Result<()> {
        self.install_incumbent(Child::adopt_foreign(pid)?, build_id);
        Ok(())
    }

    /// Takes on an incumbent that is this process's own child, spawned by
    /// the program this process replaced with `exec` (same pid, same
    /// children): reaped here, its exit status known. Refused for a process
    /// that is not our child.
    pub fn adopt_own_incumbent(&self, pid: u32, build_id: &str) -> std::io::Result<()> {
        self.install_incumbent(own_child(pid)?, build_id);
        Ok(())
    }

    fn install_incumbent(&self, c: Child, build_id: &str) {
        let mut p = self.procs();
        if let Some(old) = p.incumbent.replace(c) {
            p.retiring.push(old);
        }
        p.incumbent_build = build_id.to_string();
    }

    /// Takes on an old incumbent still finishing its connections, left by
    /// the program this process replaced with `exec` (our child: reaped
    /// here). Refused for a process that is not our child.
    pub fn adopt_retiring(&self, pid: u32) -> std::io::Result<()> {
        let c = own_child(pid)?;
        self.procs().retiring.push(c);
        Ok(())
    }

    /// Holds off every handoff (upgrade, prepare, crash restart) for as
    /// long as the guard lives: for replacing the supervisor's own binary
    /// in place, which must not happen mid-handoff. A handoff in progress
    /// makes it fail at once with [`HandoffError::InProgress`].
    pub fn quiesce(&self) -> Result<Quiesced<'_>, HandoffError> {
        self.busy
            .try_enter()
            .map(Quiesced)
            .ok_or(HandoffError::InProgress)
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

/// No handoff starts while this lives ([`Supervisor::quiesce`]).
#[derive(Debug)]
pub struct Quiesced<'a>(#[allow(dead_code)] crate::busy::BusyGuard<'a>);

/// A handle on `pid`, our own child (checked: reaping anyone else's would
/// fail, and watching it would leave its zombie).
fn own_child(pid: u32) -> std::io::Result<Child> {
    match crate::procinfo::stat(pid) {
        Some(s) if s.ppid == std::process::id() => Child::adopt(pid),
        Some(s) => Err(std::io::Error::other(format!(
            "process {pid} is not our child (its parent is {})",
            s.ppid
        ))),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("process {pid} is not running"),
        )),
    }
}
