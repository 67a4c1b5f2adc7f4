//! `handoff run`: the supervisor daemon.
//!
//! Binds the listeners, starts PROGRAM as the first incumbent, and serves
//! upgrade requests on `<runtime-dir>/admin.sock` (mode 0600; only our own
//! uid or root may use it, checked with `SO_PEERCRED` on every connection).

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use handoff::{HandoffOptions, Program, RestartLock, Supervisor, SupervisorConfig};
use handoff_admin::schema;
use handoff_admin::schema::status::Trigger;
use nix::sys::signal::{SigSet, Signal};

use crate::args::RunArgs;
use crate::listen::{bind, parse_listen};
use crate::metrics::Metrics;
use crate::progress::{Hooks, Progress};
use crate::{restart, supervise};

mod outcome;
mod requests;
use requests::{count_refusal, handle_admin, upgrade_counted, Ctx};

/// File name of the incumbent's control socket inside the runtime dir.
const CONTROL_SOCK: &str = "control.sock";

/// `handoff run --help`: examples for each way of running.
pub const AFTER_HELP: &str = "\
EXAMPLES:
  # a service linking the handoff library, two listeners, metrics:
  handoff run --runtime-dir /run/kv --state-dir /var/lib/kv \\
      --listen http=tcp://0.0.0.0:8080 --listen admin=unix:/run/kv/http.sock \\
      --metrics 127.0.0.1:9464 -- /usr/local/bin/kv --data /var/lib/kv

  # the same from a file (flags still override it); check what it resolves to first:
  handoff run --config /etc/kv/handoff.toml --check-config
  handoff run --config /etc/kv/handoff.toml

  # any socket-activated program that sends READY=1 (no library needed):
  handoff run --mode notify --runtime-dir /run/web --state-dir /var/lib/web \\
      --listen http=tcp://0.0.0.0:8080 --stop-signal SIGTERM --drain-grace 30s -- gunicorn app:app

SIGNALS: SIGHUP upgrades (like `handoff upgrade`); SIGTERM/SIGINT drain and stop (like `handoff stop`).
LOGS: structured events on stderr, filtered by HANDOFF_LOG (e.g. HANDOFF_LOG=debug); targets in docs/observability.md.
UNDER SYSTEMD: Type=notify (READY/RELOADING/STOPPING/STATUS, watchdog), socket units; see docs/systemd/.
EXIT: 0 after a clean stop; 1 if it could not start or the service kept crashing (crash-loop limit).";

pub fn main(a: RunArgs) -> ExitCode {
    match run(a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handoff run: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Creates the runtime or state dir mode 0700, or checks an existing one:
/// a symlink, another user's directory or one others may write is refused
/// with the fix, since whoever can write it can replace the sockets and
/// lock files in it (see `handoff::private_fs`).
fn make_dir(path: &Path, flag: &str) -> Result<()> {
    handoff::private_fs::ensure_dir(path).with_context(|| format!("{flag} {}", path.display()))
}

fn run(args: RunArgs) -> Result<()> {
    let a = crate::config::resolve(&args).map_err(anyhow::Error::msg)?;
    if args.check_config {
        println!("{}", crate::config::describe(&a));
        return Ok(());
    }
    let metrics = Metrics::new().context("defining the supervisor's metrics")?;
    // Block the signals we handle before any thread exists, so every thread
    // inherits the mask and only the signal thread (sigwait) sees them.
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        sigs.add(s);
    }
    sigs.thread_block().context("blocking signals")?;
    // systemd's variables are read and scrubbed from our environment
    // before any thread exists (NOTIFY_SOCKET, WATCHDOG_*, LISTEN_*).
    // A supervisor that re-executed itself in place handed us its locks and
    // sockets (`reexec`); read before any thread starts.
    let handover = crate::reexec::take_handover()?;
    crate::systemd::init()?;
    let activation = crate::systemd::activation::take()?;

    let runtime = a.runtime_dir.clone();
    make_dir(&runtime, "--runtime-dir")?;
    make_dir(&a.state_dir, "--state-dir")?;

    // One supervisor per runtime dir, enforced by a kernel-released lock
    // (0600, never through a symlink: see `make_dir`).
    let lock_path = runtime.join("supervisor.lock");
    // Test knob (crash-points builds only): a new binary that cannot take
    // over, to prove the fallback to the previous one.
    #[cfg(feature = "crash-points")]
    if handover.is_some() && std::env::var_os("HANDOFF_TEST_TAKEOVER_FAIL").is_some() {
        std::env::remove_var("HANDOFF_TEST_TAKEOVER_FAIL");
        let e = anyhow::anyhow!("HANDOFF_TEST_TAKEOVER_FAIL is set");
        return Err(fall_back(handover, e));
    }
    let (lock, restart_lock) = match &handover {
        Some(h) => match reclaim_locks(h, &lock_path, &a.state_dir) {
            Ok(locks) => locks,
            Err(e) => return Err(fall_back(handover, e)),
        },
        None => take_locks(&lock_path, &runtime, &a.state_dir)?,
    };
    if handover.is_some() {
        handoff::crash::point("s-reexec-taking-over");
    }

    let control = runtime.join(CONTROL_SOCK);
    let mut cfg = SupervisorConfig::new(&a.state_dir, &control);
    cfg.timeouts.deadline = a.deadline;
    cfg.timeouts.drain_grace = a.drain_grace;
    cfg.timeouts.abort_grace = a.abort_grace;
    if let Some(ms) = std::env::var("HANDOFF_LIVENESS_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.timeouts.liveness = Duration::from_millis(ms);
    }
    let specs = a
        .listen
        .iter()
        .map(|s| parse_listen(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let sources = crate::systemd::activation::plan(specs, activation)?;
    let names: Vec<String> = sources.iter().map(|s| s.name().to_string()).collect();
    let mut program = Program::new(PathBuf::from(&a.program[0]));
    program.args = a.program[1..].to_vec();
    if a.notify.mode() == crate::notify_mode::Mode::Notify {
        let prepared = crate::notify_mode::Prepared {
            runtime_dir: runtime,
            state_dir: a.state_dir.clone(),
            sources,
            program,
            deadline: a.deadline,
            drain_grace: a.drain_grace,
            abort_grace: a.abort_grace,
            metrics: a.metrics,
            sigs,
        };
        return crate::notify_mode::run(&a.notify, prepared, (lock, restart_lock));
    }

    // A service left running by a supervisor that died: take it over,
    // listeners included, instead of binding anew (its sockets hold the
    // ports, and it must not stop serving).
    let recovered = match &handover {
        Some(h) => {
            let names = h.names.clone();
            match supervise::recover(&cfg, &names) {
                Ok(Some(r)) => Some(r),
                Ok(None) => {
                    let e = anyhow::anyhow!("no incumbent answered on {}", control.display());
                    return Err(fall_back(handover, e));
                }
                Err(e) => return Err(fall_back(handover, e)),
            }
        }
        None => supervise::recover(&cfg, &names)?,
    };
    let (sup, shown, pid) = match recovered {
        Some(r) => {
            let shown: Vec<String> = r
                .listeners
                .iter()
                .map(|l| format!("{}={}", l.name, supervise::describe(l)))
                .collect();
            let sup = Supervisor::new(cfg, r.listeners).context("starting the supervisor")?;
            // After a re-exec the incumbent is still our child: reap it
            // (unless the program we replaced had itself re-attached to a
            // process another supervisor spawned).
            if handover.is_some() {
                sup.adopt_own_incumbent(r.pid, &r.build_id)
                    .or_else(|_| sup.adopt_incumbent(r.pid, &r.build_id))
            } else {
                sup.adopt_incumbent(r.pid, &r.build_id)
            }
            .with_context(|| format!("adopting pid {}", r.pid))?;
            match &handover {
                Some(h) => {
                    for &pid in &h.retiring {
                        // Gone already is fine: nothing left to reap.
                        let _ = sup.adopt_retiring(pid);
                    }
                    eprintln!(
                        "handoff run: re-executed in place as {} (was {}{}); serving pid {} ({})",
                        crate::reexec::build_id(),
                        h.from_build,
                        match &h.fell_back {
                            Some(why) => format!("; the new binary fell back: {why}"),
                            None => String::new(),
                        },
                        r.pid,
                        r.build_id
                    );
                }
                None => eprintln!(
                    "handoff run: re-attached to the running service (pid {}, {})",
                    r.pid, r.build_id
                ),
            }
            print_listening(&shown)?;
            (Arc::new(sup), shown, r.pid)
        }
        None => {
            let mut listeners = vec![];
            let mut shown = vec![];
            for source in sources {
                let (l, addr) = source.open(bind)?;
                shown.push(format!("{}={addr}", l.name));
                listeners.push(l);
            }
            print_listening(&shown)?;
            let sup = Arc::new(Supervisor::new(cfg, listeners).context("starting the supervisor")?);
            let report = sup
                .start(&program, &mut |_| {})
                .map_err(|e| anyhow::anyhow!("starting {}: {e}", a.program[0].to_string_lossy()))?;
            (sup, shown, report.new_pid)
        }
    };
    metrics.set_incumbent(Some(pid));
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let watched = supervise::LibraryMode {
            sup: sup.clone(),
            program: program.clone(),
        };
        let stopping = stopping.clone();
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || {
                if let Err(e) =
                    supervise::monitor(&watched, &stopping, supervise::Backoff::from_env(), |pid| {
                        metrics.restart();
                        metrics.set_incumbent(Some(pid));
                    })
                {
                    eprintln!("handoff run: {e:#}; stopping");
                    crate::systemd::stopping("the service keeps failing to start");
                    stop(&watched.sup);
                    std::process::exit(1);
                }
            })?;
    }

    let admin_path = schema::admin_path(&runtime);
    let admin_listener = match handover.as_ref().and_then(|h| h.admin_fd) {
        // Carried across exec: clients kept connecting to it meanwhile.
        Some(fd) => UnixListener::from(crate::reexec::take_fd(fd)?),
        None => {
            let _ = fs::remove_file(&admin_path); // stale: we hold the supervisor lock
            let l = UnixListener::bind(&admin_path)
                .with_context(|| format!("binding {}", admin_path.display()))?;
            fs::set_permissions(&admin_path, fs::Permissions::from_mode(0o600))?;
            l
        }
    };
    // Past the point of falling back: the previous binary's descriptor
    // closes (no process we spawn may inherit it).
    if let Some(fd) = handover.as_ref().and_then(|h| h.fallback_fd) {
        drop(crate::reexec::take_fd(fd));
    }
    // Past it too, so a fallback still finds the carried listener open.
    let metrics_twin = serve_metrics(&metrics, a.metrics, handover.as_ref())?;
    let admin_twin = admin_listener
        .try_clone()
        .context("keeping the admin socket for a re-exec")?;
    // `ready` means ready for commands too: only once the admin socket is
    // bound (an upgrade sent right after it must find the socket).
    println!("ready pid={pid}");
    std::io::stdout().flush()?;

    let names: Vec<String> = shown
        .iter()
        .map(|s| s.split_once('=').map_or(s.as_str(), |(n, _)| n).to_string())
        .collect();
    let ctx = Arc::new(Ctx {
        sup: sup.clone(),
        program,
        shown,
        names,
        carried: requests::Carried {
            supervisor_lock: lock,
            restart_lock,
            admin: admin_twin,
            metrics: metrics_twin,
        },
        state_dir: a.state_dir.clone(),
        metrics: metrics.clone(),
        progress: match &handover {
            Some(h) => Progress::with_history(h.counts.unwrap_or_default(), h.last_handoff.clone()),
            None => Progress::default(),
        },
        stopper: crate::stop::Stopper::default(),
        stopping: stopping.clone(),
    });
    // The admin socket, served on a thread of its own, and kept in place
    // should the runtime dir be deleted under us.
    {
        let ctx = ctx.clone();
        crate::keeper::start(
            runtime.clone(),
            admin_listener,
            Arc::new(move |stream, req| handle_admin(stream, req, &ctx)),
        )?;
    }
    crate::systemd::ready(pid, &sup.incumbent_build());
    crate::systemd::start_watchdog(crate::systemd::admin_probe(
        admin_path.clone(),
        crate::systemd::probe_timeout(),
    ))?;

    // The main thread waits for signals.
    loop {
        match sigs.wait() {
            Ok(Signal::SIGHUP) => {
                let ctx = ctx.clone();
                std::thread::spawn(move || {
                    let r = ctx.progress.upgrade(
                        &ctx.sup,
                        Trigger::Sighup,
                        None,
                        &mut |obs| {
                            let program = ctx.upgrade_program(None);
                            crate::systemd::around_upgrade(&ctx.sup, || {
                                upgrade_counted(&ctx, &program, HandoffOptions::default(), obs)
                            })
                        },
                        Hooks {
                            phase: &mut |_| {},
                            waiting: &mut |_| {},
                            done: &mut |_| {},
                        },
                    );
                    count_refusal(&ctx.metrics, &r);
                    match r {
                        Ok(r) => eprintln!(
                            "handoff run: SIGHUP upgrade committed: pid {} in {:?}",
                            r.new_pid, r.total
                        ),
                        Err(e) => eprintln!("handoff run: SIGHUP upgrade failed: {e}"),
                    }
                });
            }
            Ok(sig) => {
                // Also how a `handoff stop` ends: its admin thread has
                // stopped the service and replied, then signalled us.
                eprintln!("handoff run: {sig}: stopping");
                crate::systemd::stopping(sig.as_ref());
                let grace = ctx.sup.config().timeouts.drain_grace;
                ctx.stopper.stop(
                    &ctx.sup,
                    &ctx.progress,
                    &ctx.stopping,
                    &ctx.program,
                    grace,
                    &mut |r| eprintln!("handoff run: {}", r.summary()),
                );
                let _ = fs::remove_file(&admin_path);
                // The locks (in `ctx`) are released as the process exits.
                return Ok(());
            }
            Err(e) => bail!("waiting for signals: {e}"),
        }
    }
}

/// The supervisor lock (one supervisor per runtime dir) and the restart
/// lock (one per service), taken at start.
fn take_locks(lock_path: &Path, runtime: &Path, state_dir: &Path) -> Result<(File, RestartLock)> {
    let lock = handoff::private_fs::open_file(
        File::options().create(true).truncate(false).write(true),
        lock_path,
    )
    .with_context(|| format!("opening {}", lock_path.display()))?;
    // A supervisor that was just killed may still be closing its files
    // (the kernel releases the lock as the last of them closes): give it a
    // moment rather than refuse a restart that raced its exit.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while lock.try_lock().is_err() {
        if std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        bail!(
            "another handoff supervisor is running with --runtime-dir {} (it holds {}); use `handoff upgrade` to talk to it",
            runtime.display(),
            lock_path.display()
        );
    }
    // And one per service (state dir), whatever its runtime dir: held until
    // we exit. See `restart` for why upgrades need no lock of their own.
    let restart_lock = restart::hold(state_dir, runtime)?;
    Ok((lock, restart_lock))
}

/// The same locks, carried across `exec` by the supervisor we replace.
fn reclaim_locks(
    h: &crate::reexec::Handover,
    lock_path: &Path,
    state_dir: &Path,
) -> Result<(File, RestartLock)> {
    use std::os::unix::fs::MetadataExt;
    let lock = File::from(crate::reexec::take_fd(h.supervisor_lock_fd)?);
    let (carried, on_disk) = (lock.metadata()?, fs::symlink_metadata(lock_path)?);
    if (carried.dev(), carried.ino()) != (on_disk.dev(), on_disk.ino()) {
        bail!(
            "the supervisor lock carried across exec is not {}",
            lock_path.display()
        );
    }
    lock.try_lock()
        .map_err(|e| anyhow::anyhow!("the supervisor lock carried across exec: {e}"))?;
    let restart = RestartLock::reclaim(state_dir, crate::reexec::take_fd(h.restart_lock_fd)?)
        .context("the restart lock carried across exec")?;
    Ok((lock, restart))
}

/// A supervisor `exec`ed in place that cannot carry on: back to the binary
/// it replaced (which finds the same handover), or, without one, the error.
fn fall_back(handover: Option<crate::reexec::Handover>, e: anyhow::Error) -> anyhow::Error {
    match handover {
        Some(h) if h.fallback_fd.is_some() => {
            eprintln!("handoff run: cannot take over in place ({e:#}); falling back to the previous binary");
            let why = format!("{e:#}");
            crate::reexec::fall_back(h, &why).context(why)
        }
        _ => e,
    }
}

/// Serves `--metrics` on the listener a replaced supervisor carried across
/// its `exec` when it is bound where asked (a scrape meanwhile waited in its
/// backlog), else on a fresh one; returns a twin of it for the next re-exec.
fn serve_metrics(
    metrics: &Metrics,
    addr: Option<std::net::SocketAddr>,
    handover: Option<&crate::reexec::Handover>,
) -> Result<Option<std::net::TcpListener>> {
    let carried = match handover.and_then(|h| h.metrics_fd) {
        Some(fd) => Some(std::net::TcpListener::from(crate::reexec::take_fd(fd)?)),
        None => None,
    };
    let Some(addr) = addr else {
        return Ok(None); // a carried one, if any, closes here
    };
    let fits = |l: &std::net::TcpListener| {
        l.local_addr().is_ok_and(|have| {
            have.ip() == addr.ip() && (addr.port() == 0 || have.port() == addr.port())
        })
    };
    let listener = match carried {
        Some(l) if fits(&l) => l,
        _ => std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the metrics endpoint {addr}"))?,
    };
    let twin = listener
        .try_clone()
        .context("keeping the metrics socket for a re-exec")?;
    let bound = metrics
        .serve_listener(listener)
        .with_context(|| format!("serving the metrics endpoint {addr}"))?;
    println!("metrics http://{bound}/metrics");
    Ok(Some(twin))
}

fn print_listening(shown: &[String]) -> Result<()> {
    let mut o = std::io::stdout().lock();
    for s in shown {
        writeln!(o, "listening {s}")?;
    }
    o.flush()?;
    Ok(())
}

/// Stops the service after a crash loop: SIGTERM to every process we run,
/// SIGKILL after a grace.
fn stop(sup: &Supervisor) {
    let _ = sup.discard_prepared();
    let mut kids: Vec<handoff::Child> = vec![];
    if let Some(c) = sup.incumbent() {
        kids.push(c);
    }
    for c in &kids {
        let _ = c.signal(Signal::SIGTERM);
    }
    for c in &kids {
        if c.wait_timeout(Duration::from_secs(10)).is_none() {
            let _ = c.kill_and_reap(Duration::from_secs(5));
        }
    }
}
