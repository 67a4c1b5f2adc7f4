//! `handoff upgrade`: one handoff, phases printed as they happen.
//!
//! Exit status: 0 committed, 1 aborted (reason printed), 2 nothing was
//! attempted: usage or connection error, or the supervisor refused the
//! request — notably "another handoff is in progress" when a second
//! `handoff upgrade` (or a SIGHUP) arrives while one runs, or "stopping".
//!
//! Concurrent upgrades are serialised by the supervisor, not by this
//! client: a service has exactly one supervisor (it holds the service's
//! restart lock for its whole life, see `restart`), and that supervisor
//! admits one handoff at a time. By default it refuses the rest at once
//! rather than queueing them — a deploy tool that raced another learns so
//! immediately and can decide whether to retry. With `--wait DURATION` the
//! supervisor holds the request until the handoff in flight ends (bounded),
//! then runs it: the waiting happens where the slot is, so no client lock
//! and no retry loop are needed.
//!
//! `--prepare` splits an upgrade in two: the new build is started and
//! warmed up now, while the incumbent serves on untouched, and the next
//! upgrade (this command again, or SIGHUP) only hands over. A build that
//! fails to start fails the prepare, never an upgrade.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use handoff_admin::schema::status::Trigger;
use handoff_admin::schema::{admin_path, Event, Request};
use handoff_admin::{client, wire};

use crate::args::RuntimeDir;

#[derive(clap::Args, Debug)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub rt: RuntimeDir,
    /// Spawn this binary instead of the program given to `handoff run`
    /// (same arguments). Default: the same path again — the usual deploy is
    /// to replace the file on disk, then upgrade.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Overall budget from start to the new process's Ready (e.g. 30s).
    #[arg(long, value_parser = crate::duration::parse, value_name = "DURATION")]
    pub deadline: Option<Duration>,
    /// Budget for the old process to drain its connections (e.g. 10s).
    #[arg(long, value_parser = crate::duration::parse, value_name = "DURATION")]
    pub drain_grace: Option<Duration>,
    /// If another handoff is in flight, wait up to this long for it to end
    /// and then upgrade, instead of failing with "in progress" (e.g. 30s).
    /// Also waits, within the same budget, for a supervisor that is still
    /// starting (no admin socket yet) instead of failing to reach it.
    #[arg(long, value_parser = crate::duration::parse, value_name = "DURATION")]
    pub wait: Option<Duration>,
    /// Start the new process now, let it warm up and say Hello, and hold
    /// it: nothing is asked of the running process. The next upgrade (of the
    /// same binary, or with no --binary; `handoff upgrade` or SIGHUP) hands
    /// over to it without waiting for its start-up. `handoff status` shows
    /// it; preparing again replaces it.
    #[arg(long, conflicts_with_all = ["discard_prepared", "deadline", "drain_grace", "wait"])]
    pub prepare: bool,
    /// Stop the process held by --prepare (it gets the abort grace to
    /// finish anything it accepted).
    #[arg(long, conflicts_with_all = ["binary", "deadline", "drain_grace", "wait"])]
    pub discard_prepared: bool,
    /// Upgrade the supervisor itself, not the service: the running
    /// `handoff run` execs the new `handoff` binary in place (--binary,
    /// default: the path it runs from — replace the file, then this). Same
    /// pid, the service untouched and still its child; no unit restart under
    /// systemd. A new binary that cannot start in place is refused or falls
    /// back to the old one. Waits for no upgrade in flight.
    #[arg(long, conflicts_with_all = ["prepare", "discard_prepared", "deadline", "drain_grace"])]
    pub supervisor: bool,
    /// One JSON object per line instead of human output.
    #[arg(long)]
    pub json: bool,
}

pub const AFTER_HELP: &str = "\
EXIT STATUS:
  0  committed: the new process serves (--prepare: it is started and held;
     --discard-prepared: done, or there was none)
  1  aborted: the old process resumed serving (reason printed); --prepare:
     the new process failed to start and was stopped
  2  nothing attempted: usage error, supervisor unreachable, another handoff
     in progress (without --wait, or still after it), or the supervisor is stopping

EXAMPLES:
  handoff upgrade --runtime-dir /run/kv
  handoff upgrade --runtime-dir /run/kv --binary /opt/kv/v2/kv --deadline 30s
  handoff upgrade --runtime-dir /run/kv --wait 2m --json   # queue behind a running upgrade

  # a new handoff binary for the supervisor itself (same pid, service untouched):
  cp new/handoff /usr/local/bin/handoff && handoff upgrade --runtime-dir /run/kv --supervisor

  # stage the new build while the old one serves, cut over later in milliseconds:
  handoff upgrade --runtime-dir /run/kv --prepare --binary /opt/kv/v2/kv
  handoff upgrade --runtime-dir /run/kv        # or: kill -HUP <handoff run pid>";

pub fn main(a: UpgradeArgs) -> ExitCode {
    let path = admin_path(&a.rt.runtime_dir);
    let fail = |msg: String, json: bool| {
        if json {
            println!("{}", serde_json::json!({"event": "error", "message": msg}));
        } else {
            eprintln!("handoff upgrade: {msg}");
        }
        ExitCode::from(2)
    };
    let binary = match a.binary.as_ref().map(std::path::absolute) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => return fail(format!("--binary: {e}"), a.json),
    };
    let stream = match client::connect_within(&a.rt.runtime_dir, a.wait) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string(), a.json),
    };
    if a.supervisor {
        return supervisor(&a, &stream, binary, &fail);
    }
    let req = if a.prepare {
        Request::Prepare { binary }
    } else if a.discard_prepared {
        Request::Discard
    } else {
        Request::Upgrade {
            binary,
            deadline_ms: a.deadline.map(|d| d.as_millis() as u64),
            drain_grace_ms: a.drain_grace.map(|d| d.as_millis() as u64),
            wait_ms: a.wait.map(|d| d.as_millis() as u64),
        }
    };
    if let Err(e) = wire::send(&stream, &req) {
        return fail(
            format!("sending the request to {}: {e}", path.display()),
            a.json,
        );
    }
    let out = std::io::stdout();
    loop {
        // The supervisor enforces the handoff's own deadlines; this only
        // guards against a wedged supervisor.
        let ev: Event = match wire::recv(&stream, Some(Duration::from_secs(3600))) {
            Ok(ev) => ev,
            Err(e) => return fail(format!("reading from the supervisor: {e}"), a.json),
        };
        if a.json {
            let mut o = out.lock();
            let _ = writeln!(o, "{}", serde_json::to_string(&ev).unwrap_or_default());
            let _ = o.flush();
        }
        match ev {
            Event::Phase { phase, took_ms } => {
                if !a.json {
                    let mut o = out.lock();
                    let _ = writeln!(o, "  {phase:<22} {took_ms:>9.2} ms");
                    let _ = o.flush();
                }
            }
            Event::Committed {
                old_pid,
                new_pid,
                build_id,
                total_ms,
                warnings,
                prepared_for_ms,
                connections_moved,
                connections_closed,
                connections_direct,
                catch_up,
                ..
            } => {
                if !a.json {
                    let old = old_pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                    let held = prepared_for_ms
                        .map(|h| match h {
                            h if h < 1000.0 => format!(" (prepared {h:.0} ms before)"),
                            h => format!(" (prepared {:.1} s before)", h / 1000.0),
                        })
                        .unwrap_or_default();
                    let conns = match (connections_moved, connections_closed) {
                        (Some(m), Some(c)) => {
                            let how = match connections_direct {
                                Some(false) => {
                                    " (through the supervisor: a process speaks protocol 3)"
                                }
                                _ => "",
                            };
                            format!("; {m} connections moved{how}, {c} closed")
                        }
                        _ => String::new(),
                    };
                    println!(
                        "committed: pid {old} -> {new_pid} ({build_id}) in {total_ms:.2} ms{held}{conns}"
                    );
                    if let Some(c) = catch_up {
                        let how = if c.converged {
                            "converged"
                        } else {
                            "stopped by its cap; the rest was read after Begin"
                        };
                        println!(
                            "  caught up before Hello: {} rounds, {} records in {:.2} ms, the last round {} records ({how})",
                            c.rounds, c.records, c.took_ms, c.last_records
                        );
                    }
                    for w in warnings {
                        eprintln!("warning: {w}");
                    }
                }
                return ExitCode::SUCCESS;
            }
            Event::Prepared {
                pid,
                build_id,
                took_ms,
                ..
            } => {
                if !a.json {
                    println!("prepared: pid {pid} ({build_id}) started in {took_ms:.2} ms; held for the next upgrade");
                }
                return ExitCode::SUCCESS;
            }
            Event::Discarded { pid } => {
                if !a.json {
                    match pid {
                        Some(p) => println!("discarded: pid {p} told to stop"),
                        None => println!("nothing prepared"),
                    }
                }
                return ExitCode::SUCCESS;
            }
            Event::Aborted { reason, .. } => {
                // On stderr in both modes: JSON consumers get it on stdout
                // too, a person watching a deploy log sees it either way.
                if a.prepare {
                    eprintln!("prepare failed (the running process was not touched): {reason}");
                } else {
                    eprintln!("aborted: {reason}");
                }
                return ExitCode::from(1);
            }
            Event::Error { message } => {
                if !a.json {
                    eprintln!("handoff upgrade: {message}");
                }
                return ExitCode::from(2);
            }
            Event::Waiting { in_flight, wait_ms } => {
                if !a.json {
                    let what = match in_flight {
                        // The id comes from the journal, which may not have
                        // been written yet in the handoff's first instant.
                        Some(f) => format!(
                            "{} ({}, {} for {:.1}s)",
                            f.handoff_id
                                .map(|id| format!("handoff {id}"))
                                .unwrap_or_else(|| "a handoff".into()),
                            match f.trigger {
                                Trigger::Admin => "handoff upgrade",
                                Trigger::Sighup => "SIGHUP",
                            },
                            f.phase,
                            f.in_phase_ms as f64 / 1000.0
                        ),
                        None => "a crash restart".into(),
                    };
                    eprintln!(
                        "waiting for {what} to finish (up to {:.1}s)",
                        wait_ms as f64 / 1000.0
                    );
                }
            }
            other @ (Event::Status { .. }
            | Event::Stopping { .. }
            | Event::Stopped(_)
            | Event::Reexecuting { .. }) => {
                return fail(format!("unexpected reply: {other:?}"), a.json)
            }
        }
    }
}

/// `--supervisor`: asks for the re-exec, then waits for the supervisor to
/// answer again from the new binary (same pid, the new build in its status).
/// Exit 0 once it does; 1 if it fell back to the old binary or did not come
/// back; 2 if it refused (a handoff in flight, a binary that cannot start).
fn supervisor(
    a: &UpgradeArgs,
    stream: &std::os::unix::net::UnixStream,
    binary: Option<PathBuf>,
    fail: &dyn Fn(String, bool) -> ExitCode,
) -> ExitCode {
    if let Err(e) = wire::send(stream, &Request::ReexecSupervisor { binary }) {
        return fail(format!("sending the request: {e}"), a.json);
    }
    let say = |ev: &Event| {
        if a.json {
            println!("{}", serde_json::to_string(ev).unwrap_or_default());
        }
    };
    let (pid, build, from) = match wire::recv::<Event>(stream, Some(Duration::from_secs(30))) {
        Ok(Event::Reexecuting {
            supervisor_pid,
            binary,
            build,
            from_build,
        }) => {
            if a.json {
                say(&Event::Reexecuting {
                    supervisor_pid,
                    binary,
                    build: build.clone(),
                    from_build: from_build.clone(),
                });
            } else {
                println!(
                    "re-executing pid {supervisor_pid}: {} ({build}), was {from_build}",
                    binary.display()
                );
            }
            (supervisor_pid, build, from_build)
        }
        Ok(Event::Error { message }) => return fail(message, a.json),
        Ok(other) => return fail(format!("unexpected answer: {other:?}"), a.json),
        Err(e) => return fail(format!("reading from the supervisor: {e}"), a.json),
    };
    // The connection ends with the exec; an Error instead means it failed.
    if let Ok(Event::Error { message }) = wire::recv::<Event>(stream, Some(Duration::from_secs(30)))
    {
        return fail(message, a.json);
    }
    let deadline = std::time::Instant::now() + a.wait.unwrap_or(Duration::from_secs(30));
    let mut last = String::from("no answer yet");
    while std::time::Instant::now() < deadline {
        match crate::status::fetch(&a.rt.runtime_dir) {
            Ok(
                ref ev @ Event::Status {
                    supervisor_pid,
                    ref supervisor_build,
                    ..
                },
            ) => {
                if supervisor_pid != pid {
                    last = format!("a different supervisor answers (pid {supervisor_pid})");
                } else if *supervisor_build == build {
                    say(ev);
                    if !a.json {
                        println!("supervisor pid {pid} runs {build}");
                    }
                    return ExitCode::SUCCESS;
                } else if *supervisor_build == from {
                    if !a.json {
                        eprintln!("handoff upgrade: the new binary did not take over; the supervisor fell back to {from} (its log says why)");
                    }
                    say(ev);
                    return ExitCode::from(1);
                } else {
                    last = format!("it answers as {supervisor_build}");
                }
            }
            Ok(_) => {}
            Err(e) => last = e.to_string(),
        }
        // Polling a process that is starting up again: its admin socket
        // answers within milliseconds once it is back.
        std::thread::sleep(Duration::from_millis(20));
    }
    if !a.json {
        eprintln!("handoff upgrade: the supervisor did not answer as {build} in time ({last})");
    }
    ExitCode::from(1)
}
