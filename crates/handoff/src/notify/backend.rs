//! The notify-mode supervisor: start, upgrade, restart and stop a program
//! that speaks socket activation and `sd_notify`, not the handoff protocol.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::probe::ReadyProbe;
use super::record::{describe_fd, NotifyRecord, Orphan, ProcId, RecordStore, RecordedListener};
use super::socket::{Announced, NotifySocket, Watched};
use super::NotifyError;
use crate::busy::Busy;
use crate::child::{Child, Exit};
use crate::listeners::Listener;
use crate::spawn::{spawn_activated, Program};
use std::os::fd::AsFd;

/// What "ready" means for a new process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Wait for `READY=1` on the notify socket (always, when there is no
    /// probe: then it is the only evidence).
    pub notify: bool,
    /// Also (or instead) wait for this probe to pass. See [`ReadyProbe`]
    /// for why a probe of the shared public address proves little.
    pub probe: Option<ReadyProbe>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            notify: true,
            probe: None,
        }
    }
}

impl Readiness {
    fn describe(&self) -> String {
        match (&self.probe, self.notify) {
            (None, _) => "waiting for READY=1".into(),
            (Some(p), true) => format!("waiting for READY=1 and the probe {p}"),
            (Some(p), false) => format!("waiting for the probe {p}"),
        }
    }
}

/// How the notify-mode supervisor is set up.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// Where the per-child notify sockets are bound
    /// (`notify-<supervisor pid>-<n>.sock`); the
    /// supervisor's runtime dir, mode 0700.
    pub socket_dir: PathBuf,
    /// Budget from spawn to ready.
    pub deadline: Duration,
    /// How long the old process may take to exit after the stop signal
    /// before it gets SIGKILL.
    pub drain_grace: Duration,
    /// What the old process is sent to make it finish and exit (and a new
    /// one that did not become ready); SIGTERM by default.
    pub stop_signal: Signal,
    /// How long a new process that did not become ready gets after the
    /// stop signal before SIGKILL. Socket-activated programs accept as soon
    /// as they start, so one that failed its readiness may hold
    /// connections; the stop signal lets it finish them instead of having
    /// them reset.
    pub abort_grace: Duration,
    /// What must happen before a new process counts as ready.
    pub readiness: Readiness,
    /// Where to keep the crash-recovery record (the service's state dir;
    /// see [`RecordStore`]). `None`: no record, so a supervisor restarted
    /// after a crash cannot take the running process back.
    pub record_dir: Option<PathBuf>,
}

impl NotifyConfig {
    /// Sockets in `socket_dir`; 60 s deadline, 30 s drain grace, SIGTERM,
    /// 5 s abort grace, `READY=1` as readiness, no crash-recovery record.
    /// (`handoff run --mode notify` sets its own: docs/design.md §14.)
    pub fn new(socket_dir: impl Into<PathBuf>) -> NotifyConfig {
        NotifyConfig {
            socket_dir: socket_dir.into(),
            deadline: Duration::from_secs(60),
            drain_grace: Duration::from_secs(30),
            stop_signal: Signal::SIGTERM,
            abort_grace: Duration::from_secs(5),
            readiness: Readiness::default(),
            record_dir: None,
        }
    }
}

/// Per-upgrade overrides.
#[derive(Debug, Clone, Copy, Default)]
pub struct NotifyOptions {
    /// Replaces [`NotifyConfig::deadline`] for this upgrade.
    pub deadline: Option<Duration>,
    /// Replaces [`NotifyConfig::drain_grace`] for this upgrade.
    pub drain_grace: Option<Duration>,
}

/// The steps of a notify-mode upgrade (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyPhase {
    /// The new process was started with the listeners and its own
    /// notify socket.
    Spawned,
    /// It is ready: `READY=1`, the probe, or both, as configured. From here
    /// on it is the incumbent.
    Ready,
    /// The old process was sent the stop signal.
    OldSignalled,
    /// The old process exited within the drain grace.
    OldStopped,
    /// The old process outlived the drain grace and was SIGKILLed.
    OldKilled,
}

impl NotifyPhase {
    /// The step's name in logs and reports (`old-signalled`); also its
    /// [`Display`](std::fmt::Display).
    pub fn name(self) -> &'static str {
        match self {
            NotifyPhase::Spawned => "spawned",
            NotifyPhase::Ready => "ready",
            NotifyPhase::OldSignalled => "old-signalled",
            NotifyPhase::OldStopped => "old-stopped",
            NotifyPhase::OldKilled => "old-killed",
        }
    }
}

impl std::fmt::Display for NotifyPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One step as it completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifyPhaseDone {
    /// The step that completed.
    pub phase: NotifyPhase,
    /// Time since the previous step completed (since the upgrade began,
    /// for `Spawned`).
    pub took: Duration,
}

/// What a completed start or upgrade did.
#[derive(Debug, Clone)]
pub struct NotifyReport {
    /// The process replaced; `None` on a first start, or when it had
    /// already exited.
    pub old_pid: Option<u32>,
    /// The new process, now the incumbent.
    pub new_pid: u32,
    /// Each step as it completed, in order (as the observer saw them).
    pub phases: Vec<NotifyPhaseDone>,
    /// How the old process ended (`None` on a first start).
    pub old_exit: Option<Exit>,
    /// The old process ignored the stop signal for the whole drain grace.
    pub escalated: bool,
    /// From the start of the upgrade to the old process's end (to Ready,
    /// when there was none to stop).
    pub total: Duration,
    /// Problems after Ready that did not change the outcome: the old
    /// process escalated to SIGKILL, or could not be signalled.
    pub warnings: Vec<String>,
}

/// How [`NotifySupervisor::stop`] ended the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifyStopped {
    /// The process stopped: the incumbent once any upgrade in flight had
    /// finished.
    pub pid: u32,
    /// How it ended; [`Exit::Unknown`] for an adopted process, which is
    /// not our child.
    pub exit: Exit,
    /// It outlived the grace and got SIGKILL.
    pub killed: bool,
}

/// A running child with the notify socket read on its behalf.
#[derive(Debug)]
struct Running {
    child: Child,
    notify: Watched,
}

#[derive(Debug, Default)]
struct Procs {
    incumbent: Option<Running>,
    /// Old processes told to stop, until they have exited.
    retiring: Vec<Child>,
}

/// Supervises a socket-activated, `sd_notify`-speaking program.
///
/// # Example
///
/// ```no_run
/// use handoff::notify::{NotifyConfig, NotifyOptions, NotifySupervisor};
/// use handoff::{Listener, Program};
/// use std::net::TcpListener;
///
/// let tcp = TcpListener::bind("127.0.0.1:8080")?;
/// let listeners = vec![Listener { name: "http".into(), fd: tcp.into() }];
/// let sup = NotifySupervisor::new(NotifyConfig::new("/run/svc"), listeners);
/// let program = Program::new("/usr/bin/my-socket-activated-server");
/// sup.start(&program, &mut |p| println!("{} {:?}", p.phase, p.took))?;
/// // later: spawn the new build, wait for READY=1, SIGTERM the old one
/// let r = sup.perform_handoff(&program, NotifyOptions::default(), &mut |_| {})?;
/// println!("now serving: pid {} (old one escalated: {})", r.new_pid, r.escalated);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct NotifySupervisor {
    cfg: NotifyConfig,
    listeners: Vec<Listener>,
    /// Taken for each start, upgrade, crash restart, adoption and stop.
    busy: Busy,
    procs: Mutex<Procs>,
    seq: AtomicU64,
    store: Option<RecordStore>,
}

/// How long to wait for the kernel to finish off a SIGKILLed process.
const REAP: Duration = Duration::from_secs(5);

impl NotifySupervisor {
    /// A supervisor passing `listeners` (in this order, at fds 3…) to every
    /// process it starts. Nothing runs yet: [`start`](Self::start) or
    /// [`adopt`](Self::adopt).
    pub fn new(cfg: NotifyConfig, listeners: Vec<Listener>) -> NotifySupervisor {
        NotifySupervisor {
            store: cfg.record_dir.as_ref().map(RecordStore::new),
            cfg,
            listeners,
            busy: Busy::default(),
            procs: Mutex::new(Procs::default()),
            seq: AtomicU64::new(0),
        }
    }

    /// The configuration it was created with.
    pub fn config(&self) -> &NotifyConfig {
        &self.cfg
    }

    /// The listening sockets it holds and passes on, in fd order.
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    fn procs(&self) -> MutexGuard<'_, Procs> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current process's handle (for waiting on it or signalling it).
    pub fn incumbent(&self) -> Option<Child> {
        self.procs().incumbent.as_ref().map(|r| r.child.clone())
    }

    /// Pid of the current process, if it runs.
    pub fn incumbent_pid(&self) -> Option<u32> {
        self.incumbent()
            .filter(|c| c.try_exit().is_none())
            .map(|c| c.pid())
    }

    /// Old processes told to stop that have not exited yet.
    pub fn retiring_pids(&self) -> Vec<u32> {
        let mut p = self.procs();
        p.retiring.retain(|c| c.try_exit().is_none());
        p.retiring.iter().map(Child::pid).collect()
    }

    /// What the current process announced (its `STATUS=` text…).
    pub fn incumbent_announced(&self) -> Option<Announced> {
        self.procs()
            .incumbent
            .as_ref()
            .map(|r| r.notify.announced())
    }

    /// Path of the current process's notify socket.
    pub fn incumbent_notify_socket(&self) -> Option<PathBuf> {
        self.procs()
            .incumbent
            .as_ref()
            .map(|r| r.notify.path().to_path_buf())
    }

    /// Waits up to `timeout` until no start, upgrade, crash restart or stop
    /// is in progress; whether none is. Takes nothing. A process seen dead
    /// during an upgrade is the upgrade's business: it makes the new one
    /// the incumbent regardless, or (not ready) leaves the dead one
    /// recorded; only once this returns `true` does
    /// [`NotifySupervisor::incumbent`] say which. An upgrade that starts
    /// after the death refuses it ([`NotifyError::NoIncumbent`]).
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.busy.wait_free(timeout)
    }

    /// Starts the first process and waits until it is ready.
    pub fn start(
        &self,
        program: &Program,
        observer: &mut dyn FnMut(NotifyPhaseDone),
    ) -> Result<NotifyReport, NotifyError> {
        let _busy = self.busy.try_enter().ok_or(NotifyError::InProgress)?;
        self.replace(program, NotifyOptions::default(), observer)
    }

    /// Takes over a process a previous supervisor left serving (found by
    /// [`RecordStore::find_orphan`]; `listeners` must be its own, fetched
    /// from it or from systemd) as the incumbent: upgrades, stop and the
    /// crash monitor then work on it. It is not our child, so its liveness
    /// is polled ([`Child::adopt_foreign`]) and its exit status is unknown.
    /// Its notify socket is bound again at the recorded path, so what it
    /// announces from now on (`STATUS=`…) is heard.
    pub fn adopt(&self, orphan: &Orphan) -> Result<u32, NotifyError> {
        let _busy = self.busy.try_enter().ok_or(NotifyError::InProgress)?;
        let pid = orphan.pid();
        let child =
            Child::adopt_foreign(pid).map_err(|source| NotifyError::Adopt { pid, source })?;
        let path = match orphan.notify_socket() {
            Some(p) if p.parent() == Some(self.cfg.socket_dir.as_path()) => p.to_path_buf(),
            _ => self.next_socket_path(),
        };
        let notify = NotifySocket::bind(&path)?.watch(pid)?;
        self.procs().incumbent = Some(Running { child, notify });
        self.save(None);
        Ok(pid)
    }

    fn next_socket_path(&self) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.cfg
            .socket_dir
            .join(format!("notify-{}-{n}.sock", std::process::id()))
    }

    /// Records the incumbent (and `pending`, a process spawned but not yet
    /// ready). A failure is logged, not fatal: it only costs the recovery
    /// after a crash, never the service.
    fn save(&self, pending: Option<u32>) {
        let Some(store) = &self.store else { return };
        let (incumbent, notify_socket) = match &self.procs().incumbent {
            Some(r) => (
                ProcId::of(r.child.pid()),
                Some(r.notify.path().to_path_buf()),
            ),
            None => (None, None),
        };
        let rec = NotifyRecord {
            incumbent,
            notify_socket,
            pending: pending.and_then(ProcId::of),
            listeners: self
                .listeners
                .iter()
                .map(|l| RecordedListener {
                    name: l.name.clone(),
                    addr: describe_fd(l.fd.as_fd()).unwrap_or_else(|| "?".into()),
                })
                .collect(),
        };
        let r = if rec.incumbent.is_none() && rec.pending.is_none() {
            store.clear()
        } else {
            store.write(&rec)
        };
        if let Err(e) = r {
            tracing::warn!(target: "handoff::notify", error = %e, "the crash-recovery record was not written");
        }
    }

    /// Starts a fresh process if `dead_pid` — the one the caller saw exit —
    /// is still the recorded one (an upgrade may have replaced it already).
    pub fn restart_if_dead(
        &self,
        program: &Program,
        dead_pid: u32,
        observer: &mut dyn FnMut(NotifyPhaseDone),
    ) -> Result<Option<NotifyReport>, NotifyError> {
        let _busy = self.busy.enter();
        match self.incumbent() {
            Some(c) if c.pid() == dead_pid && c.try_exit().is_some() => {}
            _ => return Ok(None),
        }
        self.replace(program, NotifyOptions::default(), observer)
            .map(Some)
    }

    /// Replaces the running process with a fresh one of `program`: spawn,
    /// wait for ready, then stop the old one (stop signal, drain grace,
    /// SIGKILL). Only one upgrade runs at a time.
    pub fn perform_handoff(
        &self,
        program: &Program,
        opts: NotifyOptions,
        observer: &mut dyn FnMut(NotifyPhaseDone),
    ) -> Result<NotifyReport, NotifyError> {
        let _busy = self.busy.try_enter().ok_or(NotifyError::InProgress)?;
        if self.incumbent_pid().is_none() {
            return Err(NotifyError::NoIncumbent);
        }
        self.replace(program, opts, observer)
    }

    /// Stops the current process: the stop signal, `grace`, then SIGKILL.
    /// Waits for an upgrade in flight first, so the process it stops may
    /// not be the one that was current when it was called: the result
    /// names it.
    pub fn stop(&self, grace: Duration) -> Option<NotifyStopped> {
        let _busy = self.busy.enter();
        let old = self.procs().incumbent.take()?;
        let mut since = Instant::now();
        let r = self
            .stop_child(&old.child, grace, &mut |_, _| {}, &mut since)
            .ok()
            .map(|(exit, killed)| NotifyStopped {
                pid: old.child.pid(),
                exit,
                killed,
            });
        // Only once it is gone: a crash during the drain leaves it recorded,
        // so a restarted supervisor adopts it rather than failing to bind
        // the ports it still holds.
        self.save(None);
        r
    }

    /// The upgrade itself; the caller holds `busy`.
    fn replace(
        &self,
        program: &Program,
        opts: NotifyOptions,
        observer: &mut dyn FnMut(NotifyPhaseDone),
    ) -> Result<NotifyReport, NotifyError> {
        let t0 = Instant::now();
        let mut phases = vec![];
        let mut mark = |phase, since: &mut Instant| {
            let p = NotifyPhaseDone {
                phase,
                took: since.elapsed(),
            };
            *since = Instant::now();
            observer(p);
            phases.push(p);
        };
        let mut since = t0;
        let deadline = opts.deadline.unwrap_or(self.cfg.deadline);
        let grace = opts.drain_grace.unwrap_or(self.cfg.drain_grace);

        let sock_path = self.next_socket_path();
        let sock = NotifySocket::bind(&sock_path)?;
        let child = spawn_activated(
            program,
            &self.listeners,
            &[("NOTIFY_SOCKET", sock.path().as_os_str())],
        )?;
        let pid = child.pid();
        // Before waiting: a crash from here on must not leave it running
        // unrecorded next to the incumbent.
        self.save(Some(pid));
        let notify = match sock.watch(pid) {
            Ok(w) => w,
            Err(e) => {
                child.kill_and_reap(REAP);
                self.save(None);
                return Err(e);
            }
        };
        mark(NotifyPhase::Spawned, &mut since);
        tracing::info!(target: "handoff::notify", pid, "spawned");

        if let Err(e) = self.await_ready(&child, &notify, deadline) {
            let exit = self.stop_unready(&child);
            tracing::warn!(target: "handoff::notify", pid, ?exit, error = %e, "new process not ready; stopped");
            self.save(None);
            return Err(e);
        }
        mark(NotifyPhase::Ready, &mut since);

        // From here the new process is the incumbent whatever happens.
        let old = self.procs().incumbent.replace(Running { child, notify });
        self.save(None);
        let mut report = NotifyReport {
            old_pid: None,
            new_pid: pid,
            phases: vec![],
            old_exit: None,
            escalated: false,
            total: Duration::ZERO,
            warnings: vec![],
        };
        if let Some(old) = old.filter(|o| o.child.try_exit().is_none()) {
            report.old_pid = Some(old.child.pid());
            self.procs().retiring.push(old.child.clone());
            match self.stop_child(&old.child, grace, &mut mark, &mut since) {
                Ok((exit, killed)) => {
                    report.old_exit = Some(exit);
                    report.escalated = killed;
                    if killed {
                        report.warnings.push(format!(
                            "the old process (pid {}) ignored {} for the whole drain grace ({} ms) and was killed with SIGKILL",
                            old.child.pid(),
                            self.cfg.stop_signal.as_str(),
                            grace.as_millis()
                        ));
                    }
                }
                Err(e) => report.warnings.push(e.to_string()),
            }
        }
        report.phases = phases;
        report.total = t0.elapsed();
        Ok(report)
    }

    /// Stops a new process that never became ready: the stop signal, then
    /// SIGKILL if it is still there after the abort grace (at once if it
    /// already exited).
    fn stop_unready(&self, c: &Child) -> Option<Exit> {
        if let Some(e) = c.try_exit() {
            return Some(e);
        }
        if c.signal(self.cfg.stop_signal).is_ok() {
            if let Some(e) = c.wait_timeout(self.cfg.abort_grace) {
                return Some(e);
            }
            tracing::warn!(target: "handoff::notify", pid = c.pid(), grace_ms = self.cfg.abort_grace.as_millis() as u64,
                "the new process outlived the abort grace; sending SIGKILL");
        }
        c.kill_and_reap(REAP)
    }

    /// Stop signal, drain grace, SIGKILL; reports each step to `mark`.
    fn stop_child(
        &self,
        c: &Child,
        grace: Duration,
        mark: &mut impl FnMut(NotifyPhase, &mut Instant),
        since: &mut Instant,
    ) -> Result<(Exit, bool), NotifyError> {
        let sig = self.cfg.stop_signal;
        if let Err(source) = c.signal(sig) {
            return Err(NotifyError::OldStopFailed {
                pid: c.pid(),
                signal: sig.as_str(),
                source,
            });
        }
        mark(NotifyPhase::OldSignalled, since);
        if let Some(e) = c.wait_timeout(grace) {
            mark(NotifyPhase::OldStopped, since);
            return Ok((e, false));
        }
        tracing::warn!(target: "handoff::notify", pid = c.pid(), grace_ms = grace.as_millis() as u64,
            "the old process outlived the drain grace; sending SIGKILL");
        let e = c.kill_and_reap(REAP).unwrap_or(Exit::Unknown);
        mark(NotifyPhase::OldKilled, since);
        Ok((e, true))
    }

    fn await_ready(
        &self,
        child: &Child,
        notify: &Watched,
        limit: Duration,
    ) -> Result<(), NotifyError> {
        let start = Instant::now();
        let r = &self.cfg.readiness;
        let exited = || child.try_exit().is_some();
        let not_ready = |a: &Announced| NotifyError::NotReady {
            pid: child.pid(),
            waited_ms: start.elapsed().as_millis() as u64,
            waiting_for: r.describe(),
            status: a.status.clone(),
            errno: a.errno,
        };
        let check_end = |a: &Announced| -> Result<(), NotifyError> {
            if let Some(exit) = child.try_exit() {
                return Err(NotifyError::Exited {
                    pid: child.pid(),
                    exit,
                    status: a.status.clone(),
                    errno: a.errno,
                });
            }
            if a.stopping && !a.ready {
                return Err(NotifyError::StoppedBeforeReady {
                    pid: child.pid(),
                    status: a.status.clone(),
                    errno: a.errno,
                });
            }
            Ok(())
        };
        // Without a probe, READY=1 is the only evidence there is.
        if r.notify || r.probe.is_none() {
            let got = notify.wait(limit, |a| a.ready || a.stopping, exited);
            let a = got.clone().unwrap_or_else(|| notify.announced());
            check_end(&a)?;
            if got.is_none() {
                return Err(not_ready(&a));
            }
        }
        if let Some(p) = &r.probe {
            let left = limit.saturating_sub(start.elapsed());
            if let Err(why) = p.wait(left, exited) {
                let a = notify.announced();
                check_end(&a)?;
                let mut e = not_ready(&a);
                if let NotifyError::NotReady { waiting_for, .. } = &mut e {
                    waiting_for.push_str(&format!("; last probe failure: {why}"));
                }
                return Err(e);
            }
        }
        Ok(())
    }
}
