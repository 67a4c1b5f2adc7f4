//! `handoff upgrade`: one handoff, phases printed as they happen.
//!
//! Exit status: 0 committed, 1 aborted (reason printed), 2 nothing was
//! attempted: usage or connection error, or the supervisor refused the
//! request — notably "another handoff is in progress" when a second
//! `handoff upgrade` (or a SIGHUP) arrives while one runs.
//!
//! Concurrent upgrades are serialised by the supervisor, not by this
//! client: a service has exactly one supervisor (it holds the service's
//! restart lock for its whole life, see `restart`), and that supervisor
//! admits one handoff at a time and refuses the rest at once rather than
//! queueing them — a deploy tool that raced another learns so immediately
//! and can decide whether to retry. So this client takes no lock itself.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::admin::{self, Event, Request};
use crate::RuntimeDir;

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
    #[arg(long, value_parser = crate::parse_duration, value_name = "DURATION")]
    pub deadline: Option<Duration>,
    /// Budget for the old process to drain its connections (e.g. 10s).
    #[arg(long, value_parser = crate::parse_duration, value_name = "DURATION")]
    pub drain_grace: Option<Duration>,
    /// One JSON object per line instead of human output.
    #[arg(long)]
    pub json: bool,
}

pub fn main(a: UpgradeArgs) -> ExitCode {
    let path = admin::admin_path(&a.rt.runtime_dir);
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
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                format!(
                    "cannot reach the supervisor at {}: {e}\n  is `handoff run --runtime-dir {}` running?",
                    path.display(),
                    a.rt.runtime_dir.display()
                ),
                a.json,
            )
        }
    };
    let req = Request::Upgrade {
        binary,
        deadline_ms: a.deadline.map(|d| d.as_millis() as u64),
        drain_grace_ms: a.drain_grace.map(|d| d.as_millis() as u64),
    };
    if let Err(e) = admin::send(&stream, &req) {
        return fail(
            format!("sending the request to {}: {e}", path.display()),
            a.json,
        );
    }
    let out = std::io::stdout();
    loop {
        // The supervisor enforces the handoff's own deadlines; this only
        // guards against a wedged supervisor.
        let ev: Event = match admin::recv(&stream, Some(Duration::from_secs(3600))) {
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
                ..
            } => {
                if !a.json {
                    let old = old_pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                    println!("committed: pid {old} -> {new_pid} ({build_id}) in {total_ms:.2} ms");
                    for w in warnings {
                        eprintln!("warning: {w}");
                    }
                }
                return ExitCode::SUCCESS;
            }
            Event::Aborted { reason, .. } => {
                // On stderr in both modes: JSON consumers get it on stdout
                // too, a person watching a deploy log sees it either way.
                eprintln!("aborted: {reason}");
                return ExitCode::from(1);
            }
            Event::Error { message } => {
                if !a.json {
                    eprintln!("handoff upgrade: {message}");
                }
                return ExitCode::from(2);
            }
            Event::Status { .. } => return fail("unexpected status reply".into(), a.json),
        }
    }
}
