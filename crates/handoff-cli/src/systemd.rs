//! `handoff run` under systemd: `Type=notify` notifications, the watchdog,
//! and socket activation intake ([`activation`]).
//!
//! What the manager is told, one datagram each (`sd_notify(3)`):
//!
//! | when                                   | datagram                                               |
//! |----------------------------------------|--------------------------------------------------------|
//! | first incumbent ready, admin bound     | `READY=1` `STATUS=serving pid N (BUILD)`               |
//! | an upgrade begins (admin or SIGHUP)    | `RELOADING=1` `MONOTONIC_USEC=T` `STATUS=upgrading …`  |
//! | it commits or aborts                   | `READY=1` `STATUS=serving pid M (BUILD); upgrade …`    |
//! | the incumbent dies outside a handoff   | `STATUS=restarting: …`, then `STATUS=serving …`        |
//! | stopping (SIGTERM, `handoff stop`, …)  | `STOPPING=1` `STATUS=stopping (…)`                     |
//! | every `WATCHDOG_USEC`/2, if responsive | `WATCHDOG=1`                                           |
//!
//! The notifier is process-wide, like the `NOTIFY_SOCKET` it comes from:
//! one manager, one socket, and notifications come from several threads
//! (signal loop, admin connections, crash monitor). Before [`init`] — or
//! outside systemd — every function here is a no-op.
//!
//! Overlapping upgrades: the library runs one handoff at a time and turns a
//! concurrent request away with "in progress". Each request still announces
//! `RELOADING=1` with its own timestamp (for `Type=notify-reload`, systemd
//! waits for a `RELOADING=1` stamped after the SIGHUP *it* sent), but
//! `READY=1` goes out only when the last overlapping request has finished,
//! so the manager never sees "ready" while a handoff is still running.

pub mod activation;

use std::fmt::Display;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use handoff::notify::{NotifyError, NotifyReport, NotifySupervisor};
use handoff::sd_notify::{self, Notifier, State};
use handoff::{HandoffError, Report, Supervisor};

use handoff_admin::schema::{Event, Request};
use handoff_admin::wire;

struct Systemd {
    notifier: Notifier,
    watchdog: Option<Duration>,
    reload: Mutex<Reload>,
    /// Whether the last send failed: a broken socket is logged once, not
    /// at every watchdog tick.
    failing: Mutex<bool>,
}

#[derive(Default)]
struct Reload {
    /// Upgrade requests between their `RELOADING=1` and their end.
    in_flight: u32,
    /// What the last finished one left serving, for the final `READY=1`.
    status: Option<String>,
}

static SYSTEMD: OnceLock<Systemd> = OnceLock::new();

/// The variables [`init`] took out of our environment, as they were: a
/// supervisor re-executing itself in place (`reexec`) puts them back for
/// its new program, which is still systemd's main process (same pid).
static INHERITED: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// What [`init`] removed from the environment, to hand to our next program.
pub fn inherited_env() -> &'static [(String, String)] {
    INHERITED.get().map(Vec::as_slice).unwrap_or(&[])
}

/// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID`, then removes
/// them from our environment (`sd_notify(unset_environment=1)`): they are
/// the supervisor's, and nothing we start may inherit them.
///
/// Must run before any thread exists (it edits the environment). A
/// malformed value is an error here, at start, rather than a service that
/// systemd kills later for never having said `READY=1`.
pub fn init() -> Result<()> {
    let notifier = Notifier::from_env().context("systemd notify socket")?;
    let watchdog = sd_notify::watchdog_interval().context("systemd watchdog")?;
    let _ = INHERITED.set(
        [
            sd_notify::NOTIFY_SOCKET,
            sd_notify::WATCHDOG_USEC,
            sd_notify::WATCHDOG_PID,
        ]
        .iter()
        .filter_map(|v| Some((v.to_string(), std::env::var(v).ok()?)))
        .collect(),
    );
    for var in [
        sd_notify::NOTIFY_SOCKET,
        sd_notify::WATCHDOG_USEC,
        sd_notify::WATCHDOG_PID,
    ] {
        std::env::remove_var(var);
    }
    if let Some(addr) = notifier.address() {
        eprintln!("handoff run: notifying systemd at NOTIFY_SOCKET={addr}");
    }
    let _ = SYSTEMD.set(Systemd {
        notifier,
        watchdog,
        reload: Mutex::new(Reload::default()),
        failing: Mutex::new(false),
    });
    Ok(())
}

fn get() -> Option<&'static Systemd> {
    SYSTEMD.get().filter(|s| s.notifier.is_enabled())
}

fn send(states: &[State]) {
    let Some(sd) = get() else { return };
    let r = sd.notifier.send(states);
    let mut failing = sd.failing.lock().unwrap_or_else(|p| p.into_inner());
    match r {
        Ok(()) => {
            if *failing {
                eprintln!("handoff run: systemd notifications work again");
            }
            *failing = false;
        }
        Err(e) => {
            if !*failing {
                eprintln!("handoff run: {e}");
            }
            *failing = true;
        }
    }
}

/// `RELOADING=1` stamped now, or nothing if the clock cannot be read (a
/// `RELOADING=1` without its timestamp would be ignored by notify-reload).
fn reloading() -> Option<State> {
    match State::reloading_now() {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("handoff run: {e}");
            None
        }
    }
}

/// `serving pid N (BUILD)`.
fn serving(pid: u32, build: &str) -> String {
    if build.is_empty() {
        format!("serving pid {pid}")
    } else {
        format!("serving pid {pid} ({build})")
    }
}

/// Hands each listener to systemd's fd store (`FDSTORE=1`, `FDNAME=` its
/// name, the socket attached), once at start. With `FileDescriptorStoreMax=`
/// in the unit, a supervisor restarted after a crash gets them back through
/// `LISTEN_FDS` under the same names, so it needs neither to bind nor to
/// copy them out of the service it re-attaches to. Without it systemd
/// logs and drops them: harmless.
pub fn store_listeners(listeners: &[handoff::Listener]) {
    let Some(sd) = get() else { return };
    for l in listeners {
        if let Err(e) = sd
            .notifier
            .store_fds(&l.name, &[std::os::fd::AsFd::as_fd(&l.fd)])
        {
            eprintln!("handoff run: keeping {} in systemd's fd store: {e}", l.name);
        }
    }
}

/// The first incumbent serves (started or re-attached) and the admin
/// socket is bound: `READY=1`.
pub fn ready(pid: u32, build: &str) {
    send(&[State::Ready, State::status(serving(pid, build))]);
}

/// Marks one upgrade request as running until [`UpgradeGuard::end`] (or
/// drop): see the module docs for overlapping requests. `serving` is the
/// incumbent's pid and build id, if there is one.
pub fn upgrade(serving: Option<(u32, String)>) -> UpgradeGuard {
    if let Some(sd) = get() {
        let mut r = sd.reload.lock().unwrap_or_else(|p| p.into_inner());
        r.in_flight += 1;
        let mut states: Vec<State> = reloading().into_iter().collect();
        let status = match serving {
            Some((pid, build)) if build.is_empty() => format!("upgrading pid {pid}"),
            Some((pid, build)) => format!("upgrading pid {pid} ({build})"),
            None => "upgrading".to_string(),
        };
        states.push(State::status(status));
        // Sent under the lock so a concurrent end cannot slip a READY=1
        // between our count and our RELOADING=1.
        send(&states);
    }
    UpgradeGuard { done: false }
}

/// How an upgrade request ended, for the `STATUS=` that goes with the
/// `READY=1` after it.
#[derive(Debug)]
pub enum Ended {
    /// Turned away (another one in progress, no incumbent): it changed
    /// nothing, and says nothing.
    Refused,
    Committed {
        old_pid: Option<u32>,
        new_pid: u32,
        build: String,
        total: Duration,
    },
    /// `serving`: what still serves (pid, build).
    Aborted {
        serving: Option<(u32, String)>,
        reason: String,
    },
}

impl Ended {
    fn status(self) -> Option<String> {
        match self {
            Ended::Refused => None,
            Ended::Committed {
                old_pid,
                new_pid,
                build,
                total,
            } => Some(format!(
                "{}; upgrade from pid {} committed in {:.1} ms",
                serving(new_pid, &build),
                old_pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                total.as_secs_f64() * 1000.0
            )),
            Ended::Aborted { serving: s, reason } => Some(format!(
                "{}; upgrade aborted: {reason}",
                match s {
                    Some((pid, build)) => serving(pid, &build),
                    None => "no service process".to_string(),
                }
            )),
        }
    }
}

/// Runs one upgrade request of the library-mode supervisor (`run`)
/// between [`upgrade`] and [`UpgradeGuard::end`].
pub fn around_upgrade(
    sup: &Supervisor,
    run: impl FnOnce() -> Result<Report, HandoffError>,
) -> Result<Report, HandoffError> {
    let current = |sup: &Supervisor| sup.incumbent_pid().map(|p| (p, sup.incumbent_build()));
    let guard = upgrade(current(sup));
    let r = run();
    guard.end(match &r {
        Ok(r) => Ended::Committed {
            old_pid: r.old_pid,
            new_pid: r.new_pid,
            build: r.new_build_id.clone(),
            total: r.total,
        },
        Err(HandoffError::InProgress | HandoffError::NoIncumbent) => Ended::Refused,
        Err(e) => Ended::Aborted {
            serving: current(sup),
            reason: e.to_string(),
        },
    });
    r
}

/// [`around_upgrade`] for the notify-mode supervisor (no build ids there).
pub fn around_notify_upgrade(
    sup: &NotifySupervisor,
    run: impl FnOnce() -> Result<NotifyReport, NotifyError>,
) -> Result<NotifyReport, NotifyError> {
    let current = |sup: &NotifySupervisor| sup.incumbent_pid().map(|p| (p, String::new()));
    let guard = upgrade(current(sup));
    let r = run();
    guard.end(match &r {
        Ok(r) => Ended::Committed {
            old_pid: r.old_pid,
            new_pid: r.new_pid,
            build: String::new(),
            total: r.total,
        },
        Err(NotifyError::InProgress | NotifyError::NoIncumbent) => Ended::Refused,
        Err(e) => Ended::Aborted {
            serving: current(sup),
            reason: e.to_string(),
        },
    });
    r
}

/// One upgrade request in flight (see [`upgrade`]).
pub struct UpgradeGuard {
    done: bool,
}

impl UpgradeGuard {
    /// The request ended; the last overlapping one to end sends `READY=1`
    /// with what now serves.
    pub fn end(mut self, ended: Ended) {
        self.close(ended.status());
    }

    fn close(&mut self, outcome: Option<String>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let Some(sd) = get() else { return };
        let mut r = sd.reload.lock().unwrap_or_else(|p| p.into_inner());
        if outcome.is_some() {
            r.status = outcome;
        }
        r.in_flight = r.in_flight.saturating_sub(1);
        if r.in_flight == 0 {
            let status = r.status.take().unwrap_or_else(|| "serving".to_string());
            send(&[State::Ready, State::status(status)]);
        }
    }
}

impl Drop for UpgradeGuard {
    /// A request that unwound without finishing must not leave the
    /// manager believing we reload forever.
    fn drop(&mut self) {
        self.close(None);
    }
}

/// The incumbent died outside a handoff; a new one starts after `delay`.
pub fn crashed(pid: u32, exit: &dyn Display, delay: Duration) {
    send(&[State::status(format!(
        "restarting: pid {pid} died outside a handoff ({exit}); next start in {delay:?}"
    ))]);
}

/// A crashed incumbent was replaced.
pub fn restarted(pid: u32, build: &str) {
    send(&[State::status(format!(
        "{}, restarted after a crash",
        serving(pid, build)
    ))]);
}

/// The supervisor is stopping (`why`: the signal, `handoff stop`, a crash
/// loop): `STOPPING=1`, so the manager stops expecting readiness and
/// watchdog pings. Only the first call sends.
pub fn stopping(why: &str) {
    // `handoff stop` stops us and then signals us (the signal loop owns the
    // exit): the manager hears about the first reason only.
    static SENT: AtomicBool = AtomicBool::new(false);
    if SENT.swap(true, Ordering::SeqCst) {
        return;
    }
    send(&[State::Stopping, State::status(format!("stopping ({why})"))]);
}

/// With a watchdog (`WatchdogSec=`), starts the thread that sends
/// `WATCHDOG=1` every half interval — but only while `probe` says the
/// supervisor is responsive. A supervisor whose admin loop is wedged then
/// misses its pings and systemd restarts it (the running service survives
/// that: the new supervisor re-attaches to it). Call once `READY=1` has
/// gone out: systemd arms the watchdog when start-up completes.
pub fn start_watchdog(probe: impl Fn() -> bool + Send + 'static) -> Result<()> {
    let Some(interval) = get().and_then(|sd| sd.watchdog) else {
        return Ok(());
    };
    eprintln!("handoff run: systemd watchdog every {interval:?}; pinging at half that");
    std::thread::Builder::new()
        .name("sd-watchdog".into())
        .spawn(move || pet_loop(interval / 2, probe, &|| send(&[State::Watchdog])))
        .context("starting the watchdog thread")?;
    Ok(())
}

/// Every `period`: ping if `probe` passes. Never returns.
fn pet_loop(period: Duration, probe: impl Fn() -> bool, ping: &dyn Fn()) {
    let mut was_ok = true;
    loop {
        let ok = probe();
        if ok {
            ping();
        } else if was_ok {
            eprintln!("handoff run: the supervisor failed its own health probe; withholding the watchdog ping");
        }
        was_ok = ok;
        std::thread::sleep(period);
    }
}

/// A probe that asks our own admin socket for a status within `timeout`:
/// it passes only if the admin accept loop, a connection thread and the
/// supervisor's process table all answer — the parts an operator needs.
pub fn admin_probe(admin_path: PathBuf, timeout: Duration) -> impl Fn() -> bool + Send {
    move || {
        let Ok(s) = std::os::unix::net::UnixStream::connect(&admin_path) else {
            return false;
        };
        let _ = s.set_write_timeout(Some(timeout));
        if wire::send(&s, &Request::Status).is_err() {
            return false;
        }
        matches!(
            wire::recv::<Event>(&s, Some(timeout)),
            Ok(Event::Status { .. })
        )
    }
}

/// How long the admin probe may take: a quarter of the interval (so a
/// slow answer still leaves time for the ping), at most 5 s.
pub fn probe_timeout() -> Duration {
    get()
        .and_then(|sd| sd.watchdog)
        .map(|w| (w / 4).min(Duration::from_secs(5)))
        .unwrap_or(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    #[test]
    fn pings_only_while_the_probe_passes() {
        let healthy = Arc::new(AtomicBool::new(true));
        let pings = Arc::new(AtomicU32::new(0));
        let probes = Arc::new(AtomicU32::new(0));
        {
            let (healthy, pings, probes) = (healthy.clone(), pings.clone(), probes.clone());
            std::thread::spawn(move || {
                pet_loop(
                    Duration::from_millis(1),
                    move || {
                        probes.fetch_add(1, Ordering::SeqCst);
                        healthy.load(Ordering::SeqCst)
                    },
                    &move || {
                        pings.fetch_add(1, Ordering::SeqCst);
                    },
                )
            });
        }
        let wait = |f: &dyn Fn() -> bool| {
            let end = std::time::Instant::now() + Duration::from_secs(10);
            while !f() {
                assert!(std::time::Instant::now() < end, "timed out");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait(&|| pings.load(Ordering::SeqCst) >= 3);
        healthy.store(false, Ordering::SeqCst);
        // Once a probe has failed, pings stop while probes go on.
        let p0 = probes.load(Ordering::SeqCst);
        wait(&|| probes.load(Ordering::SeqCst) >= p0 + 2);
        let frozen = pings.load(Ordering::SeqCst);
        let p1 = probes.load(Ordering::SeqCst);
        wait(&|| probes.load(Ordering::SeqCst) >= p1 + 20);
        assert_eq!(pings.load(Ordering::SeqCst), frozen);
        healthy.store(true, Ordering::SeqCst);
        wait(&|| pings.load(Ordering::SeqCst) > frozen);
    }
}
