//! What `handoff run` does with each admin request (`upgrade`, `upgrade
//! --prepare`, `--discard-prepared`, `status`, `stop`) and the metrics it keeps
//! of upgrades, whichever way they were triggered.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use handoff::{HandoffError, HandoffOptions, PhaseDone, Program, Supervisor};
use handoff_admin::schema::status::{InFlight, Trigger};
use handoff_admin::schema::{Event, Request};
use handoff_admin::wire;
use nix::sys::signal::Signal;

use super::outcome::outcome_event;
use crate::metrics::{Metrics, Outcome};
use crate::progress::{Hooks, Progress, UpgradeFailure};
use crate::status;

/// What `handoff upgrade --supervisor` keeps across `exec`: held for the
/// life of the process (released as it exits).
pub(super) struct Carried {
    pub(super) supervisor_lock: std::fs::File,
    pub(super) restart_lock: handoff::RestartLock,
    /// A twin of the admin socket the admin thread serves.
    pub(super) admin: std::os::unix::net::UnixListener,
    /// A twin of the `--metrics` listener the metrics thread serves.
    pub(super) metrics: Option<std::net::TcpListener>,
}

pub(super) struct Ctx {
    pub(super) sup: Arc<Supervisor>,
    pub(super) program: Program,
    pub(super) shown: Vec<String>,
    /// The listeners' names, in order, as the service got them.
    pub(super) names: Vec<String>,
    pub(super) carried: Carried,
    pub(super) state_dir: PathBuf,
    pub(super) metrics: Metrics,
    /// Handoff history and the upgrade gate, for status and stop.
    pub(super) progress: Progress,
    pub(super) stopper: crate::stop::Stopper,
    /// Tells the crash monitor to restart nothing.
    pub(super) stopping: Arc<AtomicBool>,
}

impl Ctx {
    /// What an upgrade spawns: `binary` with the service's arguments; with
    /// no binary named, the one a successor was prepared for if there is
    /// one (so `upgrade --prepare --binary X` then SIGHUP cuts over to X),
    /// else the program `handoff run` was given.
    pub(super) fn upgrade_program(&self, binary: Option<PathBuf>) -> Program {
        let mut program = self.program.clone();
        match binary {
            Some(b) => program.path = b,
            None => {
                if let Some(p) = self.sup.prepared() {
                    program = p.program;
                }
            }
        }
        program
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One handoff attempt with its phases and outcome counted in the metrics.
///
/// `InProgress` is not counted here: the progress gate retries it while a
/// crash restart holds the slot, and only its final answer is a refusal
/// (see [`count_refusal`]).
pub(super) fn upgrade_counted(
    ctx: &Ctx,
    program: &Program,
    opts: HandoffOptions,
    observer: &mut dyn FnMut(PhaseDone),
) -> Result<handoff::Report, HandoffError> {
    let started = std::time::Instant::now();
    let r = ctx.sup.perform_handoff(program, opts, &mut |p: PhaseDone| {
        ctx.metrics.phase(p.phase.name(), p.took);
        observer(p)
    });
    let outcome = match &r {
        Ok(_) => Some(Outcome::Committed),
        Err(HandoffError::InProgress) => None,
        Err(HandoffError::NoIncumbent) => Some(Outcome::Refused),
        Err(_) => Some(Outcome::Aborted),
    };
    if let Some(o) = outcome {
        ctx.metrics.upgrade(o, started.elapsed());
    }
    ctx.metrics.set_incumbent(ctx.sup.incumbent_pid());
    r
}

/// Counts an upgrade the gate turned away before any attempt ran.
pub(super) fn count_refusal<T>(metrics: &Metrics, r: &Result<T, UpgradeFailure>) {
    if let Err(
        UpgradeFailure::Stopping
        | UpgradeFailure::StillBusy(_)
        | UpgradeFailure::Handoff(HandoffError::InProgress),
    ) = r
    {
        metrics.upgrade(Outcome::Refused, Duration::ZERO);
    }
}

pub(super) fn handle_admin(stream: UnixStream, req: Request, ctx: &Ctx) {
    match req {
        Request::Status => {
            let (service_counters, service_counters_error) =
                status::service_counters(&ctx.state_dir);
            let incumbent_pid = ctx.sup.incumbent_pid();
            let exe = incumbent_pid.and_then(crate::exe::of_pid);
            let _ = wire::send(
                &stream,
                &Event::Status {
                    supervisor_pid: std::process::id(),
                    supervisor_build: crate::reexec::build_id(),
                    incumbent_pid,
                    build_id: ctx.sup.incumbent_build(),
                    incumbent_exe: exe.as_ref().map(|e| e.path.clone()),
                    incumbent_exe_sha256: exe.and_then(|e| e.sha256),
                    listeners: ctx.shown.clone(),
                    retiring_pids: ctx.sup.retiring_pids(),
                    service_counters,
                    service_counters_error,
                    activity: ctx.progress.activity(&ctx.sup),
                },
            );
        }
        Request::Stop { grace_ms } => {
            crate::systemd::stopping("handoff stop");
            let grace = grace_ms
                .map(Duration::from_millis)
                .unwrap_or(ctx.sup.config().timeouts.drain_grace);
            let _ = wire::send(
                &stream,
                &Event::Stopping {
                    supervisor_pid: std::process::id(),
                    incumbent_pid: ctx.sup.incumbent_pid(),
                    grace_ms: ms(grace),
                    in_flight: ctx.progress.in_flight(&ctx.sup),
                },
            );
            ctx.stopper.stop(
                &ctx.sup,
                &ctx.progress,
                &ctx.stopping,
                &ctx.program,
                grace,
                &mut |r| {
                    let _ = wire::send(&stream, &Event::Stopped(r.clone()));
                },
            );
            // The main thread owns the exit (socket and lock clean-up):
            // wake it. It finds the stop done and exits 0.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGTERM);
        }
        Request::Prepare { binary } => {
            let program = ctx.upgrade_program(binary);
            let message = if ctx.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                Some("the supervisor is stopping (`handoff stop` or SIGTERM) and accepts no new upgrades".to_string())
            } else {
                None
            };
            let ev = match message {
                Some(message) => Event::Error { message },
                None => prepare_event(ctx.sup.prepare(&program, &mut |p: PhaseDone| {
                    let _ = wire::send(
                        &stream,
                        &Event::Phase {
                            phase: p.phase.name().to_string(),
                            took_ms: ms(p.took),
                        },
                    );
                })),
            };
            let _ = wire::send(&stream, &ev);
        }
        Request::ReexecSupervisor { binary } => {
            let message = match reexec(ctx, binary, &stream) {
                Ok(never) => match never {},
                Err(e) => format!("{e:#}"),
            };
            eprintln!("handoff run: not re-executed: {message}");
            let _ = wire::send(&stream, &Event::Error { message });
        }
        Request::Discard => {
            let pid = ctx.sup.discard_prepared().map(|c| c.pid());
            if let Some(pid) = pid {
                eprintln!("handoff run: discarded the prepared successor (pid {pid})");
            }
            let _ = wire::send(&stream, &Event::Discarded { pid });
        }
        Request::Upgrade {
            binary,
            deadline_ms,
            drain_grace_ms,
            wait_ms,
        } => {
            let program = ctx.upgrade_program(binary);
            let opts = HandoffOptions {
                deadline: deadline_ms.map(Duration::from_millis),
                drain_grace: drain_grace_ms.map(Duration::from_millis),
            };
            let mut observer = |p: PhaseDone| {
                let _ = wire::send(
                    &stream,
                    &Event::Phase {
                        phase: p.phase.name().to_string(),
                        took_ms: ms(p.took),
                    },
                );
            };
            let mut on_wait = |in_flight: Option<InFlight>| {
                let _ = wire::send(
                    &stream,
                    &Event::Waiting {
                        in_flight,
                        wait_ms: wait_ms.unwrap_or(0),
                    },
                );
            };
            // Sent while the handoff slot is still held (see `Hooks::done`).
            let mut done = |r: &Result<handoff::Report, HandoffError>| {
                let _ = wire::send(&stream, &outcome_event(r));
            };
            let r = ctx.progress.upgrade(
                &ctx.sup,
                Trigger::Admin,
                wait_ms.map(Duration::from_millis),
                &mut |obs| {
                    crate::systemd::around_upgrade(&ctx.sup, || {
                        upgrade_counted(ctx, &program, opts, obs)
                    })
                },
                Hooks {
                    phase: &mut observer,
                    waiting: &mut on_wait,
                    done: &mut done,
                },
            );
            count_refusal(&ctx.metrics, &r);
            // Refused before any attempt, so `done` had nothing to say.
            if let Err(
                e @ (UpgradeFailure::Stopping
                | UpgradeFailure::StillBusy(_)
                | UpgradeFailure::Handoff(HandoffError::InProgress)),
            ) = r
            {
                let _ = wire::send(
                    &stream,
                    &Event::Error {
                        message: e.to_string(),
                    },
                );
            }
        }
    }
}

/// The reply to `handoff upgrade --prepare`, also logged.
fn prepare_event(r: Result<handoff::Prepared, HandoffError>) -> Event {
    match r {
        Ok(p) => {
            eprintln!(
                "handoff run: prepared pid {} ({}) in {:.2} ms; held for the next upgrade",
                p.pid,
                p.build_id,
                ms(p.took)
            );
            Event::Prepared {
                handoff_id: format!("{:#018x}", p.handoff_id),
                pid: p.pid,
                build_id: p.build_id,
                took_ms: ms(p.took),
            }
        }
        Err(e @ (HandoffError::InProgress | HandoffError::NoIncumbent)) => Event::Error {
            message: e.to_string(),
        },
        Err(e) => {
            eprintln!("handoff run: prepare failed: {e}");
            Event::Aborted {
                handoff_id: None,
                phase: Some("negotiating".into()),
                reason: e.to_string(),
            }
        }
    }
}

/// `handoff upgrade --supervisor`: checks the new binary, then `exec`s it
/// with what it must carry on (`crate::reexec`). Returns only on failure —
/// with nothing changed: the supervisor carries on as it was.
fn reexec(
    ctx: &Ctx,
    binary: Option<PathBuf>,
    stream: &UnixStream,
) -> anyhow::Result<std::convert::Infallible> {
    use anyhow::{bail, Context};
    use std::os::fd::AsFd;
    if ctx.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("the supervisor is stopping (`handoff stop` or SIGTERM)");
    }
    if crate::keeper::REPLACED.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("the runtime dir was re-created since this supervisor started; restart it under its service manager instead");
    }
    // No handoff may start (or be under way) across the exec: the journal
    // is clear and nothing is mid-flight for the new program to pick up.
    let _quiet = ctx
        .sup
        .quiesce()
        .map_err(|_| anyhow::anyhow!("a handoff is in progress; try again once it has ended"))?;
    if let Some(p) = ctx.sup.prepared() {
        bail!(
            "a successor (pid {}) is prepared for the next upgrade; upgrade or `--discard-prepared` first",
            p.pid
        );
    }
    let binary = match binary {
        Some(b) => b,
        None => crate::reexec::default_binary()?,
    };
    let build = crate::reexec::preflight(&binary)?;
    let from_build = crate::reexec::build_id();
    // The running executable itself, even if its file was replaced since.
    let fallback =
        std::fs::File::open("/proc/self/exe").context("keeping this binary to fall back to")?;
    let c = &ctx.carried;
    let (counts, last_handoff) = ctx.progress.history();
    let handover = crate::reexec::Handover {
        supervisor_lock_fd: crate::reexec::raw(c.supervisor_lock.as_fd()),
        restart_lock_fd: crate::reexec::raw(c.restart_lock.as_fd()),
        admin_fd: Some(crate::reexec::raw(c.admin.as_fd())),
        fallback_fd: Some(crate::reexec::raw(fallback.as_fd())),
        from_build: from_build.clone(),
        names: ctx.names.clone(),
        retiring: ctx.sup.retiring_pids(),
        fell_back: None,
        metrics_fd: c.metrics.as_ref().map(|l| crate::reexec::raw(l.as_fd())),
        counts: Some(counts),
        last_handoff,
    };
    let _ = wire::send(
        stream,
        &Event::Reexecuting {
            supervisor_pid: std::process::id(),
            binary: binary.clone(),
            build: build.clone(),
            from_build,
        },
    );
    eprintln!(
        "handoff run: re-executing in place: {} ({build})",
        binary.display()
    );
    // No scrape may be cut half-answered by the exec: stop accepting (new
    // ones wait in the carried socket's backlog) and let answers finish.
    let _metrics_quiet = ctx.metrics.quiesce(Duration::from_secs(2));
    handoff::crash::point("s-before-reexec");
    let mut keep = vec![
        c.supervisor_lock.as_fd(),
        c.restart_lock.as_fd(),
        c.admin.as_fd(),
        fallback.as_fd(),
    ];
    keep.extend(c.metrics.as_ref().map(|l| l.as_fd()));
    Err(crate::reexec::exec(&binary, &handover, &keep))
}
