//! `handoff run --mode notify`: supervising a program that does not link
//! the handoff library but speaks systemd's conventions — socket activation
//! (`LISTEN_FDS`, `LISTEN_PID`) and readiness (`sd_notify` `READY=1`).
//!
//! The library's [`handoff::notify::NotifySupervisor`] does the work; this
//! module is the daemon around it: listeners, the admin socket (same
//! protocol and the same `handoff upgrade` / `status` / `stop` as library
//! mode), SIGHUP/SIGTERM, and restarting a process that dies outside an
//! upgrade. It takes over from `run` right after the locks are held.

mod admin;
mod ctx;
mod recover;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use handoff::notify::{NotifyConfig, NotifyOptions, NotifySupervisor, Readiness, ReadyProbe};
use handoff::Program;
use nix::sys::signal::{SigSet, Signal};

use crate::supervise::Backoff;
use ctx::{Ctx, History};

/// How the service takes part in upgrades.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The service links the handoff library (drain, seal, state handoff).
    #[default]
    Library,
    /// Any socket-activated program that sends `READY=1` (sd_notify).
    Notify,
}

/// `handoff run` options for notify mode.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct NotifyArgs {
    /// `library`: the service links the handoff library. `notify`: any
    /// program that takes its listeners from LISTEN_FDS and sends READY=1
    /// to NOTIFY_SOCKET; an upgrade starts the new one, waits for it to be
    /// ready, then stops the old one with --stop-signal. [default: library]
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Notify mode: the signal that asks the old process to finish its
    /// requests and exit (SIGKILL follows after --drain-grace).
    #[arg(long, value_name = "SIGNAL", value_parser = parse_signal)]
    pub stop_signal: Option<Signal>,
    /// Notify mode: also require this check to pass before the new process
    /// counts as ready: http://HOST:PORT/PATH (GET answers 2xx) or
    /// tcp://HOST:PORT (connect succeeds). Use an address only the new
    /// process serves: the shared listeners may be answered by the old one.
    #[arg(long, value_name = "URL")]
    pub ready_probe: Option<ReadyProbe>,
    /// Notify mode with --ready-probe: do not wait for READY=1, only for the
    /// probe (for programs that never send it).
    #[arg(long, requires = "ready_probe")]
    pub probe_only: bool,
}

/// `SIGTERM`, `TERM` or `15`.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let up = s.trim().to_ascii_uppercase();
    if let Ok(n) = up.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("{s:?} is not a signal number"));
    }
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    match name.parse::<Signal>() {
        Ok(Signal::SIGKILL | Signal::SIGSTOP) => Err(format!(
            "{s}: the stop signal must be one the process can handle (SIGKILL follows the grace anyway)"
        )),
        Ok(sig) => Ok(sig),
        Err(_) => Err(format!("{s:?} is not a signal name (e.g. SIGTERM, SIGINT, SIGQUIT)")),
    }
}

impl NotifyArgs {
    /// Refuses notify-only options in library mode.
    /// The mode, library when neither the flags nor the config say.
    pub fn mode(&self) -> Mode {
        self.mode.unwrap_or_default()
    }

    pub fn check(&self) -> Result<(), String> {
        if self.mode() == Mode::Library
            && (self.stop_signal.is_some() || self.ready_probe.is_some())
        {
            return Err(
                "--stop-signal and --ready-probe (stop-signal, ready-probe) apply to --mode notify only"
                    .into(),
            );
        }
        if self.probe_only && self.ready_probe.is_none() {
            return Err("--probe-only (probe-only) needs --ready-probe (ready-probe)".into());
        }
        Ok(())
    }
}

/// What `run` has prepared before handing over.
pub struct Prepared {
    pub runtime_dir: PathBuf,
    /// Where the crash-recovery record lives (see `recover`).
    pub state_dir: PathBuf,
    /// The listeners to bind or take from systemd — or, when a process a
    /// crashed supervisor left still serves, to take back from it.
    pub sources: Vec<crate::systemd::activation::Source>,
    pub program: Program,
    pub deadline: Duration,
    pub drain_grace: Duration,
    pub abort_grace: Duration,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Blocked in every thread; waited for by the main thread.
    pub sigs: SigSet,
}

/// Runs the notify-mode supervisor until SIGTERM/SIGINT or `handoff stop`.
/// `held` (the supervisor and restart locks) is kept until return.
pub fn run<H>(args: &NotifyArgs, p: Prepared, held: H) -> Result<()> {
    let metrics = crate::metrics::Metrics::new().context("defining the supervisor's metrics")?;
    let mut cfg = NotifyConfig::new(&p.runtime_dir);
    cfg.deadline = p.deadline;
    cfg.drain_grace = p.drain_grace;
    cfg.abort_grace = p.abort_grace;
    if let Some(s) = args.stop_signal {
        cfg.stop_signal = s;
    }
    cfg.readiness = Readiness {
        notify: !args.probe_only,
        probe: args.ready_probe.clone(),
    };
    cfg.record_dir = Some(p.state_dir.clone());
    let opened = recover::open(&p.state_dir, p.sources)?;
    let shown: Vec<String> = opened
        .listeners
        .iter()
        .map(|(l, a)| format!("{}={a}", l.name))
        .collect();
    {
        let mut o = std::io::stdout().lock();
        for s in &shown {
            writeln!(o, "listening {s}")?;
        }
        o.flush()?;
    }
    let listeners = opened.listeners.into_iter().map(|(l, _)| l).collect();
    let sup = NotifySupervisor::new(cfg, listeners);
    crate::systemd::store_listeners(sup.listeners());
    let first_pid = match &opened.orphan {
        Some(orphan) => {
            let pid = sup.adopt(orphan)?;
            eprintln!("handoff run: re-attached to the running service (pid {pid}) left by a previous supervisor");
            pid
        }
        None => {
            sup.start(&p.program, &mut |_| {})
                .map_err(|e| {
                    anyhow::anyhow!("starting {} in notify mode: {e}", p.program.path.display())
                })?
                .new_pid
        }
    };
    metrics.set_incumbent(Some(first_pid));
    if let Some(addr) = p.metrics {
        let bound = metrics
            .serve(addr)
            .with_context(|| format!("binding the metrics endpoint {addr}"))?;
        println!("metrics http://{bound}/metrics");
    }
    let ctx = Arc::new(Ctx {
        metrics,
        sup,
        program: p.program,
        shown,
        started: Instant::now(),
        stopping: AtomicBool::new(false),
        history: Mutex::new(History::default()),
        seq: Default::default(),
    });
    {
        let ctx = ctx.clone();
        std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || {
                let on_restart = |pid| {
                    ctx.metrics.restart();
                    ctx.metrics.set_incumbent(Some(pid));
                };
                if let Err(e) =
                    crate::supervise::monitor(&*ctx, &ctx.stopping, Backoff::from_env(), on_restart)
                {
                    eprintln!("handoff run: {e:#}; stopping");
                    crate::systemd::stopping("the service keeps failing to start");
                    ctx.stopping.store(true, Ordering::SeqCst);
                    ctx.sup.stop(ctx.sup.config().drain_grace);
                    std::process::exit(1);
                }
            })?;
    }

    let admin_path = handoff_admin::schema::admin_path(&p.runtime_dir);
    let _ = fs::remove_file(&admin_path); // stale: we hold the supervisor lock
    let admin_listener = UnixListener::bind(&admin_path)
        .with_context(|| format!("binding {}", admin_path.display()))?;
    fs::set_permissions(&admin_path, fs::Permissions::from_mode(0o600))?;
    println!("ready pid={first_pid}");
    std::io::stdout().flush()?;
    // Served on a thread of its own, and kept in place should the runtime
    // dir be deleted under us.
    crate::keeper::start(
        p.runtime_dir.clone(),
        admin_listener,
        admin::handler(ctx.clone()),
    )?;
    crate::systemd::ready(first_pid, "");
    crate::systemd::start_watchdog(crate::systemd::admin_probe(
        admin_path.clone(),
        crate::systemd::probe_timeout(),
    ))?;

    loop {
        match p.sigs.wait() {
            Ok(Signal::SIGHUP) => {
                let ctx = ctx.clone();
                std::thread::spawn(move || {
                    let r = admin::upgrade(
                        &ctx,
                        handoff_admin::schema::status::Trigger::Sighup,
                        &ctx.program,
                        NotifyOptions::default(),
                        &mut |_| {},
                    );
                    admin::count_refusal(&ctx, &r);
                    match r {
                        Ok(r) => eprintln!(
                            "handoff run: SIGHUP upgrade done: pid {} in {:?}",
                            r.new_pid, r.total
                        ),
                        Err(e) => eprintln!("handoff run: SIGHUP upgrade failed: {e}"),
                    }
                });
            }
            Ok(sig) => {
                // Also how a `handoff stop` ends: its admin thread stopped
                // the service, replied, then signalled us.
                eprintln!("handoff run: {sig}: stopping");
                crate::systemd::stopping(sig.as_ref());
                ctx.stopping.store(true, Ordering::SeqCst);
                let t0 = Instant::now();
                if let Some(s) = ctx.sup.stop(ctx.sup.config().drain_grace) {
                    let end = crate::stop::judge(
                        s.pid,
                        "incumbent",
                        Some(s.exit),
                        s.killed,
                        &crate::stop::Asked::Signal {
                            signal: ctx.sup.config().stop_signal,
                            // No control socket in notify mode: the signal is the
                            // way, not a fallback.
                            fallback: None,
                        },
                        t0.elapsed(),
                    );
                    eprintln!("handoff run: stopped {}", end.line());
                }
                let _ = fs::remove_file(&admin_path);
                drop(held);
                return Ok(());
            }
            Err(e) => bail!("waiting for signals: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("SIGTERM"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("quit"), Ok(Signal::SIGQUIT));
        assert_eq!(parse_signal("2"), Ok(Signal::SIGINT));
        assert!(parse_signal("SIGKILL").is_err());
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("999").is_err());
    }
}
