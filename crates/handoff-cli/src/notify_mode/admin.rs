//! The admin socket in notify mode: the same requests and events as in
//! library mode (`handoff_admin`), so `handoff upgrade`, `status` and `stop`
//! work unchanged. Phases are notify mode's own: `spawned`, `ready`,
//! `old-signalled`, then `old-stopped` or `old-killed`.

use crate::metrics::Outcome;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use handoff::notify::{NotifyError, NotifyOptions, NotifyPhaseDone, NotifyReport};
use handoff::Program;
use handoff_admin::schema::status::{Activity, LastHandoff, PhaseTiming, Trigger};
use handoff_admin::schema::stop::StopReport;
use handoff_admin::schema::{Event, Request};
use handoff_admin::wire;
use nix::sys::signal::Signal;

use super::ctx::Ctx;
use crate::stop::{judge, Asked};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The admin requests' handler, for [`crate::keeper::start`].
pub(super) fn handler(ctx: Arc<Ctx>) -> Arc<impl Fn(UnixStream, Request) + Send + Sync + 'static> {
    Arc::new(move |stream, req| handle(stream, req, &ctx))
}

/// An identifier for the log and `handoff upgrade`'s output (notify mode
/// has no journal, so no library handoff id).
fn next_id(ctx: &Ctx) -> String {
    format!("notify-{}", ctx.seq.fetch_add(1, Ordering::Relaxed) + 1)
}

/// Which phase a failure belongs to, for the `aborted` event.
fn failed_phase(e: &NotifyError) -> Option<&'static str> {
    match e {
        NotifyError::Spawn(_) | NotifyError::Socket { .. } => Some("spawned"),
        NotifyError::NotReady { .. }
        | NotifyError::Exited { .. }
        | NotifyError::StoppedBeforeReady { .. } => Some("ready"),
        NotifyError::OldStopFailed { .. } => Some("old-signalled"),
        NotifyError::InProgress | NotifyError::NoIncumbent | NotifyError::Adopt { .. } => None,
    }
}

/// Counts an upgrade finally turned away (another in flight, stopping).
pub(super) fn count_refusal<T>(ctx: &Ctx, r: &Result<T, NotifyError>) {
    if let Err(NotifyError::InProgress) = r {
        ctx.metrics.upgrade(Outcome::Refused, Duration::ZERO);
    }
}

/// One upgrade, recorded for `handoff status`.
pub(super) fn upgrade(
    ctx: &Ctx,
    trigger: Trigger,
    program: &Program,
    opts: NotifyOptions,
    observer: &mut dyn FnMut(NotifyPhaseDone),
) -> Result<NotifyReport, NotifyError> {
    if ctx.stopping.load(Ordering::SeqCst) {
        return Err(NotifyError::InProgress);
    }
    let started = Instant::now();
    let old = ctx.sup.incumbent_pid();
    let mut phases = vec![];
    let r = crate::systemd::around_notify_upgrade(&ctx.sup, || {
        ctx.sup.perform_handoff(program, opts, &mut |p| {
            ctx.metrics.phase(p.phase.name(), p.took);
            phases.push(PhaseTiming {
                phase: p.phase.name().into(),
                took_ms: ms(p.took),
            });
            observer(p)
        })
    });
    // InProgress is counted by the caller, which may wait and retry.
    match &r {
        Ok(_) => ctx.metrics.upgrade(Outcome::Committed, started.elapsed()),
        Err(NotifyError::InProgress) => {}
        Err(NotifyError::NoIncumbent) => ctx.metrics.upgrade(Outcome::Refused, Duration::ZERO),
        Err(_) => ctx.metrics.upgrade(Outcome::Aborted, started.elapsed()),
    }
    ctx.metrics.set_incumbent(ctx.sup.incumbent_pid());
    if matches!(r, Err(NotifyError::InProgress | NotifyError::NoIncumbent)) {
        return r;
    }
    let mut h = ctx.history.lock().unwrap_or_else(|p| p.into_inner());
    match &r {
        Ok(_) => h.counts.committed += 1,
        Err(_) => h.counts.aborted += 1,
    }
    h.last = Some(LastHandoff {
        handoff_id: None,
        trigger,
        outcome: if r.is_ok() { "committed" } else { "aborted" }.into(),
        old_pid: old,
        new_pid: r.as_ref().ok().map(|r| r.new_pid),
        phases,
        total_ms: ms(started.elapsed()),
        ended_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        reason: r.as_ref().err().map(|e| e.to_string()),
    });
    r
}

fn handle(stream: UnixStream, req: Request, ctx: &Ctx) {
    match req {
        Request::Prepare { .. } | Request::Discard => {
            let _ = wire::send(
                &stream,
                &Event::Error {
                    message: "notify mode cannot prepare a successor ahead: a socket-activated program starts serving as soon as it starts, so there is nothing to hold; prepared upgrades need a service that links the handoff library (--mode library)".into(),
                },
            );
        }
        Request::ReexecSupervisor { .. } => {
            let _ = wire::send(
                &stream,
                &Event::Error {
                    message: "notify mode cannot replace its supervisor in place yet: `handoff upgrade --supervisor` is for a service that links the handoff library (--mode library); restart the supervisor under its service manager instead".into(),
                },
            );
        }
        Request::Status => {
            let h = ctx.history.lock().unwrap_or_else(|p| p.into_inner());
            let pid = ctx.sup.incumbent_pid();
            let announced = ctx.sup.incumbent_announced().and_then(|a| a.status);
            let exe = pid.and_then(crate::exe::of_pid);
            let _ = wire::send(
                &stream,
                &Event::Status {
                    supervisor_pid: std::process::id(),
                    supervisor_build: crate::reexec::build_id(),
                    incumbent_pid: pid,
                    build_id: match announced {
                        Some(s) => format!("notify mode, STATUS={s:?}"),
                        None => "notify mode".into(),
                    },
                    incumbent_exe: exe.as_ref().map(|e| e.path.clone()),
                    incumbent_exe_sha256: exe.and_then(|e| e.sha256),
                    listeners: ctx.shown.clone(),
                    retiring_pids: ctx.sup.retiring_pids(),
                    service_counters: None,
                    service_counters_error: None,
                    activity: Activity {
                        supervisor_uptime_ms: ctx.started.elapsed().as_millis() as u64,
                        incumbent_uptime_ms: pid.and_then(crate::progress::uptime_ms),
                        stopping: ctx.stopping.load(Ordering::SeqCst),
                        handoffs: h.counts,
                        last_handoff: h.last.clone(),
                        ..Activity::default()
                    },
                },
            );
        }
        Request::Stop { grace_ms } => {
            crate::systemd::stopping("handoff stop");
            let grace = grace_ms
                .map(Duration::from_millis)
                .unwrap_or(ctx.sup.config().drain_grace);
            ctx.stopping.store(true, Ordering::SeqCst);
            let pid = ctx.sup.incumbent_pid();
            let _ = wire::send(
                &stream,
                &Event::Stopping {
                    supervisor_pid: std::process::id(),
                    incumbent_pid: pid,
                    grace_ms: ms(grace),
                    in_flight: None,
                },
            );
            let t0 = Instant::now();
            let ended = ctx.sup.stop(grace);
            let processes = match ended {
                Some(s) => vec![judge(
                    s.pid,
                    "incumbent",
                    Some(s.exit),
                    s.killed,
                    &Asked::Signal {
                        signal: ctx.sup.config().stop_signal,
                        // No control socket in notify mode: the signal is the
                        // way, not a fallback.
                        fallback: None,
                    },
                    t0.elapsed(),
                )],
                None => vec![],
            };
            let _ = wire::send(
                &stream,
                &Event::Stopped(StopReport {
                    supervisor_pid: std::process::id(),
                    grace_ms: ms(grace),
                    waited_for_handoff_ms: 0.0,
                    processes,
                    total_ms: ms(t0.elapsed()),
                }),
            );
            // The main thread owns the exit (socket and lock clean-up).
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGTERM);
        }
        Request::Upgrade {
            binary,
            deadline_ms,
            drain_grace_ms,
            wait_ms,
        } => {
            let mut program = ctx.program.clone();
            if let Some(b) = binary {
                program.path = b;
            }
            let opts = NotifyOptions {
                deadline: deadline_ms.map(Duration::from_millis),
                drain_grace: drain_grace_ms.map(Duration::from_millis),
            };
            let mut observer = |p: NotifyPhaseDone| {
                let _ = wire::send(
                    &stream,
                    &Event::Phase {
                        phase: p.phase.name().to_string(),
                        took_ms: ms(p.took),
                    },
                );
            };
            // `--wait`: queue behind an upgrade or restart in progress.
            let wait_until = Instant::now() + Duration::from_millis(wait_ms.unwrap_or(0));
            let mut told = false;
            let r = loop {
                match upgrade(ctx, Trigger::Admin, &program, opts, &mut observer) {
                    Err(NotifyError::InProgress)
                        if Instant::now() < wait_until && !ctx.stopping.load(Ordering::SeqCst) =>
                    {
                        if !told {
                            told = true;
                            let _ = wire::send(
                                &stream,
                                &Event::Waiting {
                                    in_flight: None,
                                    wait_ms: wait_ms.unwrap_or(0),
                                },
                            );
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    r => break r,
                }
            };
            count_refusal(ctx, &r);
            let id = next_id(ctx);
            let ev = match r {
                Ok(r) => {
                    eprintln!(
                        "handoff run: upgrade {id} done: pid {} -> {} in {:.2} ms",
                        r.old_pid.unwrap_or(0),
                        r.new_pid,
                        ms(r.total)
                    );
                    Event::Committed {
                        handoff_id: id,
                        old_pid: r.old_pid,
                        new_pid: r.new_pid,
                        build_id: "notify mode".into(),
                        total_ms: ms(r.total),
                        warnings: r.warnings,
                        prepared_for_ms: None,
                        connections_moved: None,
                        connections_closed: None,
                        connections_direct: None,
                        catch_up: None,
                    }
                }
                Err(NotifyError::InProgress) if ctx.stopping.load(Ordering::SeqCst) => {
                    Event::Error {
                        message: "the supervisor is stopping (`handoff stop` or SIGTERM) and accepts no new upgrades".into(),
                    }
                }
                Err(e @ (NotifyError::InProgress | NotifyError::NoIncumbent)) => Event::Error {
                    message: e.to_string(),
                },
                Err(e) => {
                    eprintln!("handoff run: upgrade {id} failed: {e}");
                    Event::Aborted {
                        handoff_id: Some(id),
                        phase: failed_phase(&e).map(str::to_string),
                        reason: e.to_string(),
                    }
                }
            };
            let _ = wire::send(&stream, &ev);
        }
    }
}
