//! `handoff stop`, and the graceful stop that SIGTERM/SIGINT to `handoff
//! run` performs too.
//!
//! The order matters:
//! 1. close the door: no new upgrade is admitted from here on (see
//!    [`Progress::begin_stop`]) and the crash monitor restarts nothing;
//! 2. let a handoff in flight finish — stopping the incumbent under a
//!    handoff would turn a clean upgrade into an abort, or leave the
//!    successor it just committed running unsupervised;
//! 3. ask the incumbent to stop through its control socket (Shutdown,
//!    protocol version 2): it drains exactly as for a handoff — stops
//!    accepting, finishes every request in flight, closes keep-alive
//!    connections at a request boundary — says so, and exits by itself.
//!    No service has to install a SIGTERM handler for this. Where that
//!    cannot be done (an incumbent of an older build, an unreachable
//!    control socket, a drain that failed) it gets SIGTERM instead, and the
//!    report says so and why. Old incumbents still retiring after their
//!    handoff get nothing: they are finishing their connections already,
//!    and a signal would only cut the requests of one with no handler.
//!    Connections still in the backlog are closed with the listeners when
//!    the supervisor exits;
//! 4. after the grace, SIGKILL whatever is left, and reap it;
//! 5. report to every client that asked, then exit 0.
//!
//! The report says how each process was asked ([`Asked`]) and "exited"
//! (drained) only for a process that exited by itself, with status 0,
//! within the grace. One that died of a signal — SIGTERM's default action
//! when the service has no handler for it, which ends it at once with its
//! requests in flight — or was SIGKILLed after the grace, or exited with an
//! error, is reported as such, and `handoff stop` exits 1: an operator must
//! never read "drained" for cut requests.

mod verdict;

pub use verdict::{judge, Asked};

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use handoff::{Child, Program, Supervisor};
use handoff_admin::client;
use handoff_admin::schema::stop::{ProcessEnd, StopReport};
use handoff_admin::schema::{admin_path, Event, Request};
use handoff_admin::wire;
use nix::sys::signal::Signal;

use crate::args::RuntimeDir;
use crate::progress::{ms, Progress};
use verdict::REAP;

pub const AFTER_HELP: &str = "\
EXIT STATUS:
  0  the service drained: every process exited by itself, with status 0,
     within the grace; the supervisor exited
  1  the supervisor exited, but a process did not drain: it died of a signal
     (SIGTERM with no handler for it ends a process at once, cutting the
     requests in flight), was killed after the grace, or exited with an
     error status; the report names it and says which
  2  nothing was stopped: usage error, or the supervisor could not be reached

The supervisor first refuses new upgrades, lets a handoff in flight finish,
then asks the service to stop through its control socket: it drains as for
an upgrade (finishes the requests it is serving) and exits by itself, no
SIGTERM handler needed. A service that cannot be asked that way (an older
build, notify mode) gets SIGTERM instead; the report says which way each
process was asked (`asked` in --json) and why it fell back (`fallback`).
SIGKILL after the grace. SIGTERM or SIGINT to `handoff run` does the same
with the --drain-grace it was started with.

EXAMPLES:
  handoff stop --runtime-dir /run/kv                # grace: the supervisor's --drain-grace
  handoff stop --runtime-dir /run/kv --grace 10s --json";

#[derive(clap::Args, Debug)]
pub struct StopArgs {
    #[command(flatten)]
    pub rt: RuntimeDir,
    /// How long the service gets to drain and exit before SIGKILL
    /// (default: the supervisor's --drain-grace).
    #[arg(long, value_parser = crate::duration::parse, value_name = "DURATION")]
    pub grace: Option<Duration>,
    /// One JSON object per line (the supervisor's events) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the stop once, however many ask (admin clients, signals).
#[derive(Default)]
pub struct Stopper {
    done: Mutex<Option<StopReport>>,
}

impl Stopper {
    /// Stops the service (first caller) or waits for the stop under way,
    /// then calls `reply` with the report. `reply` runs under the stopper's
    /// lock, so whoever exits the process after a stop — the signal path
    /// calls this too — does so only after every reply has been written.
    pub fn stop(
        &self,
        sup: &Supervisor,
        progress: &Progress,
        stopping: &AtomicBool,
        program: &Program,
        grace: Duration,
        reply: &mut dyn FnMut(&StopReport),
    ) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let report = done.get_or_insert_with(|| shutdown(sup, progress, stopping, program, grace));
        reply(report);
    }
}

fn shutdown(
    sup: &Supervisor,
    progress: &Progress,
    stopping: &AtomicBool,
    program: &Program,
    grace: Duration,
) -> StopReport {
    let t0 = Instant::now();
    stopping.store(true, Ordering::SeqCst);
    progress.begin_stop();
    let mut processes = vec![];
    let mut waited = Duration::ZERO;
    // A crash restart could have started a new incumbent while we stopped
    // the last one: go round until the incumbent we stopped is the last.
    for _ in 0..3 {
        let w = Instant::now();
        progress.wait_idle();
        // The library's handoff slot is also taken by a crash restart,
        // which `progress` does not see: `restart_if_dead` for a pid that
        // is not the incumbent takes the slot (waiting for whoever holds
        // it), finds nothing to do and returns — a barrier.
        let _ = sup.restart_if_dead(program, 0, &mut |_| {});
        waited += w.elapsed();
        // A successor held for an upgrade that will not come: told to stop
        // (Abort), and given the grace like the others.
        if let Some(c) = sup.discard_prepared() {
            let t = Instant::now();
            processes.push(end_of(&c, "prepared", &Asked::Abort, t, t + grace));
        }
        let incumbent = sup.incumbent();
        stop_all(sup, incumbent.as_ref(), grace, &mut processes);
        if sup.incumbent().map(|c| c.pid()) == incumbent.map(|c| c.pid()) {
            break;
        }
    }
    StopReport {
        supervisor_pid: std::process::id(),
        grace_ms: ms(grace),
        waited_for_handoff_ms: ms(waited),
        processes,
        total_ms: ms(t0.elapsed()),
    }
}

fn stop_all(
    sup: &Supervisor,
    incumbent: Option<&Child>,
    grace: Duration,
    out: &mut Vec<ProcessEnd>,
) {
    let t = Instant::now();
    let deadline = t + grace;
    let retiring = sup.retiring();
    if let Some(c) = incumbent.filter(|c| c.try_exit().is_none()) {
        let asked = ask_incumbent(sup, c, deadline);
        out.push(end_of(c, "incumbent", &asked, t, deadline));
    }
    // They drain in parallel within the one grace: the retiring ones have
    // been finishing their connections since their handoff committed.
    for c in &retiring {
        out.push(end_of(c, "retiring", &Asked::Commit, t, deadline));
    }
}

/// How long an incumbent that hung up on its stop gets to be seen gone
/// before it is taken for alive (its drain failed and it resumed). Its
/// exit closes the socket and makes it a zombie in one go; this only
/// covers the reaper noticing.
const GONE: Duration = Duration::from_millis(250);

/// Asks the incumbent to stop, through the control protocol when it can,
/// else with SIGTERM; returns how it asked. With the protocol, returns once
/// the incumbent has reported its drain (it then exits by itself), or at
/// `deadline`.
fn ask_incumbent(sup: &Supervisor, c: &Child, deadline: Instant) -> Asked {
    let pid = c.pid();
    let grace = deadline.saturating_duration_since(Instant::now());
    let why = match sup.request_stop(pid, grace) {
        Ok(req) => {
            eprintln!(
                "handoff run: stopping the incumbent (pid {pid}) through the control protocol (version {}): it drains within {:.1}s",
                req.version(),
                grace.as_secs_f64()
            );
            match req.wait_drained(deadline) {
                Ok(d) if d.open_conns_remaining > 0 => {
                    eprintln!(
                        "handoff run: the incumbent (pid {pid}) drained with {} connections still open; it finishes them and exits",
                        d.open_conns_remaining
                    );
                    return Asked::ControlProtocol;
                }
                Ok(_) => return Asked::ControlProtocol,
                // Out of grace: it is killed now, and judged for it.
                Err(_) if Instant::now() >= deadline => return Asked::ControlProtocol,
                // It died while draining: judged as it ended.
                Err(_) if c.wait_timeout(GONE).is_some() => return Asked::ControlProtocol,
                Err(e) => format!("the incumbent ended the stop without reporting its drain ({e})"),
            }
        }
        Err(e) => e.to_string(),
    };
    eprintln!("handoff run: cannot stop the incumbent (pid {pid}) through the control protocol: {why}; sending SIGTERM");
    let _ = c.signal(Signal::SIGTERM);
    Asked::Signal {
        signal: Signal::SIGTERM,
        fallback: Some(why),
    }
}

/// Waits for a child already told to stop until `deadline`, then kills it;
/// judges how it ended.
fn end_of(c: &Child, role: &str, asked: &Asked, t: Instant, deadline: Instant) -> ProcessEnd {
    let (exit, killed) = match c.wait_timeout(deadline.saturating_duration_since(Instant::now())) {
        Some(e) => (Some(e), false),
        None => (c.kill_and_reap(REAP), true),
    };
    judge(c.pid(), role, exit, killed, asked, t.elapsed())
}

/// `handoff stop`.
pub fn main(a: StopArgs) -> ExitCode {
    let fail = |msg: String| {
        if a.json {
            println!("{}", serde_json::json!({"event": "error", "message": msg}));
        } else {
            eprintln!("handoff stop: {msg}");
        }
        ExitCode::from(2)
    };
    let path = admin_path(&a.rt.runtime_dir);
    let stream = match client::connect(&a.rt.runtime_dir) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let req = Request::Stop {
        grace_ms: a.grace.map(|d| d.as_millis() as u64),
    };
    if let Err(e) = wire::send(&stream, &req) {
        return fail(format!("sending the request to {}: {e}", path.display()));
    }
    loop {
        // The supervisor bounds the stop (handoff deadline + grace + reap);
        // this only guards against a wedged one.
        let ev: Event = match wire::recv(&stream, Some(Duration::from_secs(3600))) {
            Ok(ev) => ev,
            Err(e) => return fail(format!("reading from the supervisor: {e}")),
        };
        if a.json {
            println!("{}", serde_json::to_string(&ev).unwrap_or_default());
        }
        match ev {
            Event::Stopping {
                supervisor_pid,
                incumbent_pid,
                grace_ms,
                in_flight,
            } if !a.json => {
                if let Some(f) = in_flight {
                    println!(
                        "stopping supervisor pid {supervisor_pid}: waiting for {} ({}) to finish",
                        f.handoff_id
                            .map(|id| format!("handoff {id}"))
                            .unwrap_or_else(|| "a handoff".into()),
                        f.phase
                    );
                }
                let pid = incumbent_pid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into());
                println!(
                    "stopping supervisor pid {supervisor_pid}: draining incumbent pid {pid} (grace {:.1}s)",
                    grace_ms / 1000.0
                );
            }
            Event::Stopping { .. } => {}
            Event::Stopped(r) => {
                if !a.json {
                    for p in &r.processes {
                        let asked = match p.asked_words() {
                            a if a.is_empty() => a,
                            a => format!("  ({a})"),
                        };
                        println!(
                            "  {:<9} pid {:<8} {:<9} {:>9.1} ms  {}{asked}",
                            p.role,
                            p.pid,
                            p.how,
                            p.took_ms,
                            p.exit.as_deref().unwrap_or("")
                        );
                    }
                    println!(
                        "stopped in {:.1} ms (waited {:.1} ms for a handoff)",
                        r.total_ms, r.waited_for_handoff_ms
                    );
                    for p in &r.processes {
                        if let Some(why) = &p.fallback {
                            eprintln!(
                                "handoff stop: {} pid {}: not stopped through the control protocol: {why}; sent {} instead",
                                p.role, p.pid, p.asked
                            );
                        }
                    }
                    for p in r.processes.iter().filter(|p| !p.drained()) {
                        eprintln!(
                            "handoff stop: {} pid {} did not drain: {}",
                            p.role,
                            p.pid,
                            p.why.as_deref().unwrap_or(&p.how)
                        );
                    }
                }
                // The supervisor exits right after this reply: wait for its
                // end of the socket to close (bounded), so that when we
                // return it no longer holds the service's locks.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = std::io::copy(&mut &stream, &mut std::io::sink());
                return if r.drained() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                };
            }
            Event::Error { message } => {
                if !a.json {
                    eprintln!("handoff stop: {message}");
                }
                return ExitCode::from(2);
            }
            other => return fail(format!("unexpected reply: {other:?}")),
        }
    }
}
