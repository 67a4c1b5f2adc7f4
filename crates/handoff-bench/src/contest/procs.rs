//! Process plumbing for the contestants: bounded waits on trigger commands, pids, reaping.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use anyhow::{Context, Result};
use handoff_load::blocking::Conn;
use handoff_load::failure::Failure;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Waits for `child` and collects its output, at most `budget`; kills it on timeout. The
/// wait runs on a helper thread so the moment of exit is seen at once (no polling bias in
/// the "tool done" times).
pub fn output_within(child: Child, budget: Duration) -> std::io::Result<std::process::Output> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(budget) {
        Ok(out) => {
            let _ = waiter.join();
            out
        }
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = waiter.join();
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("still running after {budget:?}; killed"),
            ))
        }
    }
}

/// BENCH_TRACE=1: appends the trigger's wall-clock µs to `dir/triggers.log`, to line up
/// with the services' `bench-trace` lines and the supervisor's log timestamps.
pub(super) fn trace_trigger(dir: &Path, old: u32) {
    let us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let line = format!("trigger old={old} at={us}\n");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("triggers.log"))
        .and_then(|mut f| f.write_all(line.as_bytes()));
}

/// Reaps whatever children have exited (orphans reparented to us included).
pub(super) fn reap_any() {
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == nix::sys::wait::WaitStatus::StillAlive {
            break;
        }
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // The state follows the parenthesized command name.
            let state = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// The last lines of a log that are not INFO lines, joined: the error a process printed.
pub(super) fn last_errors(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.contains(" INFO ")).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

pub(super) fn read_pid(path: &Path) -> Result<u32> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    s.trim()
        .parse()
        .with_context(|| format!("{} holds {s:?}", path.display()))
}

/// The pid of the process answering a fresh connection to `addr` (its `X-Pid`).
pub fn probe_pid(addr: SocketAddr) -> Result<u32, Failure> {
    let resp = Conn::connect(addr)?.request("GET", "/", None, true)?;
    resp.header("x-pid")
        .and_then(|p| p.parse().ok())
        .filter(|_| resp.status == 200)
        .ok_or_else(|| Failure::Other(format!("status {} without X-Pid", resp.status)))
}
