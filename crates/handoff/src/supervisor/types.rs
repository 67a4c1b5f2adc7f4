//! The supervisor's types: its configuration, what it reports, and the
//! state it keeps between handoffs (the processes, a successor held ahead).
//! Below the code that drives them — `mod.rs`, `handoff/`, `prepared`,
//! `stop` — which all read them, so none of that code depends on another
//! part for its data.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::busy::Busy;
use crate::channel::Channel;
use crate::child::Child;
use crate::journal::{JournalRecord, JournalWriter};
use crate::listeners::Listener;
use crate::phase::SupervisorPhase;
use crate::protocol::{HandoffId, VersionRange};
use crate::spawn::Program;
use crate::timeouts::Timeouts;

/// How the supervisor is set up.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Where the service keeps its state lock; also holds the journal.
    pub state_dir: PathBuf,
    /// Path of the incumbent's control socket.
    pub control_path: PathBuf,
    /// The protocol's timeouts as the supervisor applies them
    /// (docs/design.md §5); per handoff, [`HandoffOptions`] may override
    /// the deadline and the drain grace.
    pub timeouts: Timeouts,
    /// The protocol versions the supervisor accepts; each channel gets the
    /// highest one both sides speak.
    pub versions: VersionRange,
}

impl SupervisorConfig {
    /// A configuration with the default [`Timeouts`] and every version
    /// this build speaks.
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
    /// Replaces [`Timeouts::deadline`] (start → Ready) for this handoff.
    pub deadline: Option<Duration>,
    /// Replaces [`Timeouts::drain_grace`] (PrepareHandoff → Drained) for
    /// this handoff; still capped by what remains of the deadline.
    pub drain_grace: Option<Duration>,
}

/// One phase as it completed, reported to the observer as it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseDone {
    /// The phase that ended.
    pub phase: SupervisorPhase,
    /// How long the handoff spent in it.
    pub took: Duration,
}

/// What a committed handoff did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The handoff's id, as in the supervisor's and the processes' logs.
    pub handoff_id: HandoffId,
    /// The incumbent handed off from; `None` for a first start or a crash
    /// restart.
    pub old_pid: Option<u32>,
    /// The successor, now the incumbent.
    pub new_pid: u32,
    /// The new incumbent's build, from its Ready's `build_id` metadata
    /// (which the library's successor always sends), else from its Hello.
    pub new_build_id: String,
    /// Every phase in the order it ended, Committed last.
    pub phases: Vec<PhaseDone>,
    /// From the request to the moment both processes had been sent Commit
    /// (the journal is cleared after that, before the call returns).
    pub total: Duration,
    /// When the handoff used a successor prepared ahead
    /// ([`Supervisor::prepare`]): how long it had been held.
    pub prepared_for: Option<Duration>,
    /// Problems after Ready that did not change the outcome (e.g. the old
    /// process vanished before it got Commit).
    pub warnings: Vec<String>,
    /// The connections the old process moved to the new one, and those it
    /// closed instead; `None` when nothing could be counted: a process
    /// speaks protocol version 2 or older (every connection was closed by
    /// the drain, as before), there was no incumbent, or the incumbent
    /// could not start sending and closed its connections instead (it then
    /// reports no total).
    pub connections: Option<ConnectionsMoved>,
    /// How the successor caught up with the incumbent's writes before its
    /// Hello ([`Boot::catch_up`](crate::Boot::catch_up)), as its Ready
    /// said; `None` when it did not.
    pub catch_up: Option<crate::CatchUpReport>,
}

/// What a handoff did with the old process's live connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectionsMoved {
    /// Handed to the new process: their clients did not reconnect.
    pub moved: u64,
    /// Closed by the drain instead (HTTP/2, upgraded, refused).
    pub closed: u64,
    /// They went straight from the old process to the new one (both speak
    /// protocol version 4); `false`: relayed through the supervisor (one
    /// of them speaks 3).
    pub direct: bool,
}

// `total` runs from the request to the moment both processes have been sent
// Commit; the journal is cleared (durably) after that, before
// `perform_handoff` returns.

#[derive(Debug, Default)]
pub(super) struct Processes {
    pub(super) incumbent: Option<Child>,
    pub(super) incumbent_build: String,
    /// Old incumbents finishing their connections; reaped as they exit.
    pub(super) retiring: Vec<Child>,
}

/// A successor started ahead of its upgrade by [`Supervisor::prepare`].
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The id the upgrade that uses it will carry (it is in the journal
    /// already).
    pub handoff_id: HandoffId,
    /// The successor's pid.
    pub pid: u32,
    /// What it announced in its Hello.
    pub build_id: String,
    /// What it runs; only an upgrade of an equal `Program` uses it.
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
    pub(super) cfg: SupervisorConfig,
    pub(super) listeners: Vec<Listener>,
    pub(super) journal: JournalWriter,
    /// Taken for the whole of each handoff (start, upgrade, crash restart,
    /// prepare, discard): one at a time.
    pub(super) busy: Busy,
    pub(super) procs: Mutex<Processes>,
    /// A successor prepared ahead, waiting for its upgrade. Taken only with
    /// `busy` held, so a handoff never races a prepare or a discard.
    pub(super) held: Mutex<Option<Held>>,
}

impl Supervisor {
    pub(super) fn procs(&self) -> MutexGuard<'_, Processes> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
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

/// A spawned successor and its control channel.
pub(super) struct Successor {
    pub(super) child: Child,
    pub(super) chan: Channel,
}

/// A successor spawned and greeted ahead of its handoff (see
/// [`Supervisor::prepare`](crate::Supervisor::prepare)): warm, waiting for
/// Begin, the incumbent not yet told anything. Its journal record (phase
/// negotiating, its pid) stays written while it is held, so a restarted
/// supervisor stops it.
pub(in crate::supervisor) struct Held {
    pub(in crate::supervisor) n: Successor,
    pub(in crate::supervisor) program: Program,
    pub(in crate::supervisor) record: JournalRecord,
    pub(in crate::supervisor) build_id: String,
    /// Spawn to HelloAck.
    pub(in crate::supervisor) took: Duration,
    pub(in crate::supervisor) since: Instant,
}
