//! `handoff stop`, and the graceful stop that SIGTERM/SIGINT to `handoff
//! run` performs too.
//!
//! The order matters:
//! 1. close the door: no new upgrade is admitted from here on (see
//!    [`Progress::begin_stop`]) and the crash monitor restarts nothing;
//! 2. let a handoff in flight finish — stopping the incumbent under a
//!    handoff would turn a clean upgrade into an abort, or leave the
//!    successor it just committed running unsupervised;
//! 3. SIGTERM the incumbent (and any retiring old incumbents): a service
//!    drains on SIGTERM — the demo stops accepting, finishes every request
//!    in flight, closes keep-alive connections at a request boundary, then
//!    exits; connections still in the backlog are closed with the
//!    listeners when the supervisor exits;
//! 4. after the grace, SIGKILL whatever is left, and reap it;
//! 5. report to every client that asked, then exit 0.
//!
//! The report says "exited" (drained) only for a process that exited by
//! itself, with status 0, within the grace. One that died of a signal —
//! SIGTERM's default action when the service has no handler for it, which
//! ends it at once with its requests in flight — or was SIGKILLed after the
//! grace, or exited with an error, is reported as such, and `handoff stop`
//! exits 1: an operator must never read "drained" for cut requests.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use handoff::{Exit, Program, Supervisor};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::admin::{self, Event, Request};
use crate::progress::{ms, Progress};
use crate::RuntimeDir;

/// How long a process gets to disappear after SIGKILL.
const REAP: Duration = Duration::from_secs(5);

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
then sends SIGTERM to the service (which finishes the requests it is serving)
and SIGKILL after the grace. SIGTERM or SIGINT to `handoff run` does the same
with the --drain-grace it was started with.

EXAMPLES:
  handoff stop --runtime-dir /run/kv                # grace: the supervisor's --drain-grace
  handoff stop --runtime-dir /run/kv --grace 10s --json";

#[derive(clap::Args, Debug)]
pub struct StopArgs {
    #[command(flatten)]
    pub rt: RuntimeDir,
    /// How long the service gets to drain after SIGTERM before SIGKILL
    /// (default: the supervisor's --drain-grace).
    #[arg(long, value_parser = crate::parse_duration, value_name = "DURATION")]
    pub grace: Option<Duration>,
    /// One JSON object per line (the supervisor's events) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// How one process ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessEnd {
    pub pid: u32,
    /// `incumbent`, `retiring`, or `prepared` (held for an upgrade).
    pub role: String,
    /// `exited`: drained — by itself, within the grace, with status 0 (a
    /// prepared successor, told to abort, with any status; a process
    /// adopted from a previous supervisor, whose status cannot be known,
    /// once it is gone within the grace). `failed`: by
    /// itself within the grace with another status. `signalled`: died of a
    /// signal within the grace (the stop signal's default action when it
    /// has no handler, or a crash). `killed`: SIGKILL after the grace.
    /// `stuck`: still there after SIGKILL (uninterruptible sleep).
    pub how: String,
    /// Its exit status, where known.
    pub exit: Option<String>,
    /// Why it did not drain, in words; absent when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    pub took_ms: f64,
}

impl ProcessEnd {
    /// Judges how a process that was told to stop ended. `exit`: its status
    /// (`None`: still there after SIGKILL); `killed`: it outlived the grace
    /// and got SIGKILL; `signal`: what it was told to stop with.
    pub fn judge(
        pid: u32,
        role: &str,
        exit: Option<Exit>,
        killed: bool,
        signal: Signal,
        took: Duration,
    ) -> ProcessEnd {
        let (how, why) = match exit {
            None => (
                "stuck",
                Some(format!(
                    "still there {REAP:?} after SIGKILL (uninterruptible sleep?)"
                )),
            ),
            Some(_) if killed => (
                "killed",
                Some(
                    "still running after the grace: killed with SIGKILL, cutting the requests it still had in flight"
                        .to_string(),
                ),
            ),
            Some(Exit::Signal(s)) if s == signal as i32 => (
                "signalled",
                Some(format!(
                    "killed by {sig}: it has no {sig} handler (the default action ends it at once), so the requests it had in flight were cut",
                    sig = signal.as_str()
                )),
            ),
            Some(e @ Exit::Signal(_)) => (
                "signalled",
                Some(format!(
                    "{e} while stopping: the requests it had in flight were lost"
                )),
            ),
            // Told to abort, it exits as it sees fit: it never served
            // through the handoff it was held for.
            Some(Exit::Code(_)) if role == "prepared" => ("exited", None),
            Some(Exit::Code(0)) => ("exited", None),
            Some(Exit::Code(c)) => (
                "failed",
                Some(format!(
                    "exited with status {c} while stopping: not a clean drain"
                )),
            ),
            // Adopted from a previous supervisor: it is gone by itself within
            // the grace; its status cannot be known (not our child).
            Some(Exit::Unknown) => ("exited", None),
        };
        ProcessEnd {
            pid,
            role: role.into(),
            how: how.into(),
            exit: exit.map(|e| e.to_string()),
            why,
            took_ms: ms(took),
        }
    }

    /// Exited by itself within the grace (see [`ProcessEnd::how`]).
    pub fn drained(&self) -> bool {
        self.how == "exited"
    }

    /// One line for a log: role, pid, how, the exit status and why.
    pub fn line(&self) -> String {
        let exit = self
            .exit
            .as_deref()
            .map(|e| format!(", {e}"))
            .unwrap_or_default();
        let why = self
            .why
            .as_deref()
            .map(|w| format!(" — did not drain: {w}"))
            .unwrap_or_default();
        format!(
            "{} pid {} {} after {:.0} ms{exit}{why}",
            self.role, self.pid, self.how, self.took_ms
        )
    }
}

/// What a stop did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopReport {
    pub supervisor_pid: u32,
    pub grace_ms: f64,
    /// Time spent letting a handoff in flight finish.
    pub waited_for_handoff_ms: f64,
    pub processes: Vec<ProcessEnd>,
    pub total_ms: f64,
}

impl StopReport {
    /// Every process it stopped drained (see [`ProcessEnd::drained`]).
    pub fn drained(&self) -> bool {
        self.processes.iter().all(ProcessEnd::drained)
    }
}

/// One line for the supervisor's log.
pub fn summary(r: &StopReport) -> String {
    let procs: Vec<String> = r.processes.iter().map(ProcessEnd::line).collect();
    format!(
        "stopped in {:.0} ms: {}",
        r.total_ms,
        if procs.is_empty() {
            "nothing was running".to_string()
        } else {
            procs.join("; ")
        }
    )
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
            processes.push(end_of(&c, "prepared", t, t + grace));
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
    incumbent: Option<&handoff::Child>,
    grace: Duration,
    out: &mut Vec<ProcessEnd>,
) {
    let t = Instant::now();
    let deadline = t + grace;
    let retiring = sup.retiring();
    let alive = incumbent.filter(|c| c.try_exit().is_none());
    // All at once, then wait: they drain in parallel within one grace.
    for c in alive.into_iter().chain(&retiring) {
        let _ = c.signal(Signal::SIGTERM);
    }
    if let Some(c) = alive {
        out.push(end_of(c, "incumbent", t, deadline));
    }
    for c in &retiring {
        out.push(end_of(c, "retiring", t, deadline));
    }
}

/// Waits for a child already told to stop until `deadline`, then kills it;
/// judges how it ended.
fn end_of(c: &handoff::Child, role: &str, t: Instant, deadline: Instant) -> ProcessEnd {
    let (exit, killed) = match c.wait_timeout(deadline.saturating_duration_since(Instant::now())) {
        Some(e) => (Some(e), false),
        None => (c.kill_and_reap(REAP), true),
    };
    ProcessEnd::judge(c.pid(), role, exit, killed, Signal::SIGTERM, t.elapsed())
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
    let path = admin::admin_path(&a.rt.runtime_dir);
    let stream = match admin::connect(&a.rt.runtime_dir) {
        Ok(s) => s,
        Err(msg) => return fail(msg),
    };
    let req = Request::Stop {
        grace_ms: a.grace.map(|d| d.as_millis() as u64),
    };
    if let Err(e) = admin::send(&stream, &req) {
        return fail(format!("sending the request to {}: {e}", path.display()));
    }
    loop {
        // The supervisor bounds the stop (handoff deadline + grace + reap);
        // this only guards against a wedged one.
        let ev: Event = match admin::recv(&stream, Some(Duration::from_secs(3600))) {
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
                        println!(
                            "  {:<9} pid {:<8} {:<9} {:>9.1} ms  {}",
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
