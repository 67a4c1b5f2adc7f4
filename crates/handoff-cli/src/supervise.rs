//! The long-running duties of `handoff run` beyond serving upgrades:
//! taking over from a supervisor that crashed, and restarting an incumbent
//! that died outside a handoff.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use handoff::{Listener, Program, StateLock, Supervisor, SupervisorConfig};

/// How long a restarted supervisor waits for an incumbent to answer when the
/// state says one should exist (a handoff was in flight, or the state lock
/// is held): long enough for a sealed incumbent to re-take the lock
/// (`HANDOFF_RECOVERY_WAIT_MS`, 10 s by default) and re-bind.
const SETTLE: Duration = Duration::from_secs(20);

/// An incumbent left by a previous supervisor, with its listeners.
pub struct Recovered {
    pub pid: u32,
    pub build_id: String,
    pub listeners: Vec<Listener>,
}

/// Finds out whether a service from a previous supervisor is still running
/// and, if so, takes its listeners back. `names` are the `--listen` names
/// in order; they must match what the running service was given.
pub fn recover(cfg: &SupervisorConfig, names: &[String]) -> Result<Option<Recovered>> {
    let journal = handoff::resume_from_journal(
        &cfg.state_dir,
        &cfg.control_path,
        Duration::from_secs(2),
        cfg.timeouts.abort_grace,
    )
    .context("recovering from the journal")?;
    if let Some(rec) = &journal {
        eprintln!(
            "handoff run: an upgrade was interrupted (handoff {:#018x}, phase {}); incumbent now: {}; orphaned successor: {}",
            rec.record.handoff_id,
            rec.record.phase,
            rec.incumbent_pid.map(|p| p.to_string()).unwrap_or_else(|| "none yet".into()),
            match rec.killed_successor {
                Some(p) => format!("pid {p} still running after the abort grace, killed"),
                None => "none left running".into(),
            },
        );
    }
    let lock_held = StateLock::is_held(&cfg.state_dir).context("probing the state lock")?;
    let expect_one = journal.is_some() || lock_held;
    if !expect_one && !cfg.control_path.exists() {
        return Ok(None);
    }
    let settle = if expect_one { SETTLE } else { Duration::ZERO };
    let Some(r) = handoff::reattach(cfg, settle).context("re-attaching to the running service")?
    else {
        if StateLock::is_held(&cfg.state_dir)? {
            bail!(
                "the state lock in {} is held, but no process answers as the incumbent on {} (waited {:?}); \
                 find the holder with `fuser {}` and stop it",
                cfg.state_dir.display(),
                cfg.control_path.display(),
                settle,
                cfg.state_dir.join(handoff::StateLock::FILE_NAME).display()
            );
        }
        return Ok(None);
    };
    let got: Vec<String> = r.listeners.iter().map(|l| l.name.clone()).collect();
    if got != names {
        bail!(
            "the running service (pid {}) has listeners {:?} but --listen names {:?}; \
             restart with the same --listen list to take it over",
            r.pid,
            got,
            names
        );
    }
    Ok(Some(Recovered {
        pid: r.pid,
        build_id: r.build_id,
        listeners: r.listeners,
    }))
}

/// The address a listener is bound to, as `tcp://…` or `unix:…`.
pub fn describe(l: &Listener) -> String {
    let Ok(fd) = l.fd.try_clone() else {
        return "?".into();
    };
    // Only one of these can succeed for a given socket family; the clone is
    // closed either way.
    if let Ok(a) = TcpListener::from(fd).local_addr() {
        return format!("tcp://{a}");
    }
    let Ok(fd) = l.fd.try_clone() else {
        return "?".into();
    };
    match UnixListener::from(fd)
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
    {
        Some(p) => format!("unix:{}", p.display()),
        None => "?".into(),
    }
}

/// Restart policy for an incumbent that dies outside a handoff.
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// Consecutive failed restarts before giving up.
    pub limit: u32,
    /// An incumbent that lived this long resets the backoff.
    pub healthy_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            limit: 5,
            healthy_after: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The default policy, with `healthy_after` from
    /// `HANDOFF_HEALTHY_AFTER_MS` if set (tests: a crash loop after a
    /// healthy run without waiting 30 s for it).
    pub fn from_env() -> Self {
        let mut b = Backoff::default();
        if let Some(ms) = std::env::var("HANDOFF_HEALTHY_AFTER_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            b.healthy_after = Duration::from_millis(ms);
        }
        b
    }
}

/// What the crash monitor needs from a supervisor, library or notify mode.
pub trait Supervised {
    /// The serving process, if one runs.
    fn incumbent(&self) -> Option<handoff::Child>;
    /// Waits up to `timeout` until no handoff is in progress, without
    /// taking the handoff slot; whether none is.
    fn wait_idle(&self, timeout: Duration) -> bool;
    /// Starts a fresh process if `dead` is still the recorded incumbent (an
    /// upgrade may have replaced it meanwhile); the new pid and build id.
    fn restart_if_dead(&self, dead: u32) -> std::result::Result<Option<(u32, String)>, String>;
}

/// Library mode: a restart is a handoff with no old process.
pub struct LibraryMode {
    pub sup: Arc<Supervisor>,
    pub program: Program,
}

impl Supervised for LibraryMode {
    fn incumbent(&self) -> Option<handoff::Child> {
        self.sup.incumbent()
    }

    fn wait_idle(&self, timeout: Duration) -> bool {
        self.sup.wait_idle(timeout)
    }

    fn restart_if_dead(&self, dead: u32) -> std::result::Result<Option<(u32, String)>, String> {
        self.sup
            .restart_if_dead(&self.program, dead, &mut |_| {})
            .map(|r| r.map(|r| (r.new_pid, r.new_build_id)))
            .map_err(|e| e.to_string())
    }
}

/// Restarts an incumbent that dies outside a handoff: exponential backoff
/// from `policy.initial` to `policy.max` (reset once a process has lived
/// `policy.healthy_after`), and an error once `policy.limit` restarts in a
/// row have failed — the caller then stops everything and exits, so a
/// service manager sees the crash loop instead of a supervisor spinning.
///
/// Whether the dead process lived long enough is judged once per death:
/// after a failed restart the same dead process is still the recorded
/// incumbent, and judging it again would find it "healthy" (it lived long,
/// once) and reset the count on every attempt — a loop that never gives
/// up.
/// Connections meanwhile wait in the listeners' backlog (we keep them).
///
/// An incumbent that dies while a handoff is in progress (its drain
/// panicked, say) is the handoff's business: it carries on with the
/// successor, or aborts. So the monitor first waits for the handoff to end
/// and only then looks: replaced means nothing happened here — no log line,
/// no service-manager status, no back-off step; still the recorded
/// incumbent (the handoff aborted) means a crash like any other. Waiting
/// after seeing the death is race-free: a handoff that starts later cannot
/// replace a dead incumbent (it refuses with "no incumbent"), so any that
/// could was already in progress, and the wait covers it.
pub fn monitor(
    s: &impl Supervised,
    stopping: &AtomicBool,
    policy: Backoff,
    on_restart: impl Fn(u32),
) -> Result<()> {
    let mut delay = policy.initial;
    let mut failures = 0u32;
    let mut born = Instant::now();
    // The death whose restarts are being attempted.
    let mut handling: Option<u32> = None;
    loop {
        if stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(c) = s.incumbent() else {
            // Only between a failed restart and the next attempt.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let Some(exit) = c.wait_timeout(Duration::from_millis(250)) else {
            continue;
        };
        if stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let dead = c.pid();
        let during = !s.wait_idle(Duration::ZERO);
        while !s.wait_idle(Duration::from_millis(250)) {
            if stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
        if s.incumbent().map(|x| x.pid()) != Some(dead) {
            continue; // a handoff replaced it
        }
        if handling != Some(dead) {
            handling = Some(dead);
            if born.elapsed() >= policy.healthy_after {
                delay = policy.initial;
                failures = 0;
            }
            let when = if during {
                "during a handoff that did not replace it"
            } else {
                "outside an upgrade"
            };
            eprintln!(
                "handoff run: the incumbent (pid {dead}) died {when} ({exit}); restarting in {delay:?}"
            );
        } else {
            eprintln!("handoff run: restarting again in {delay:?}");
        }
        crate::systemd::crashed(dead, &exit, delay);
        std::thread::sleep(delay);
        // A stop may have begun during the backoff: start nothing it would
        // then have to stop again (see `stop::shutdown`).
        if stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        match s.restart_if_dead(dead) {
            Ok(Some((pid, build))) => {
                crate::systemd::restarted(pid, &build);
                println!("restarted pid={pid}");
                on_restart(pid);
                born = Instant::now();
            }
            Ok(None) => {}
            Err(e) => {
                failures += 1;
                eprintln!(
                    "handoff run: restart {failures}/{} failed: {e}",
                    policy.limit
                );
                if failures >= policy.limit {
                    bail!("the service keeps failing to start ({failures} restarts in a row failed; last: {e})");
                }
            }
        }
        delay = (delay * 2).min(policy.max);
    }
}
