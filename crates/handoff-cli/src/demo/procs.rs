//! Keeping track of every process the demo started, so it can prove none is left behind.
//!
//! A pid alone is not an identity (pids are recycled), so each process is remembered with
//! its start time where the platform tells it (Linux: `/proc/PID/stat`); a process with the
//! same pid and another start time is someone else's and is never signalled.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// One process, as first seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    /// Start time in clock ticks since boot (Linux), to tell a recycled pid apart.
    start: Option<u64>,
}

/// `(state, ppid, starttime)` from `/proc/PID/stat`.
#[cfg(target_os = "linux")]
fn stat(pid: u32) -> Option<(char, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    let mut rest = text.get(text.rfind(')')? + 1..)?.split_ascii_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    // Fields 5..=21 come next; starttime is field 22.
    let start = rest.nth(17)?.parse().ok()?;
    Some((state, ppid, start))
}

#[cfg(not(target_os = "linux"))]
fn stat(_pid: u32) -> Option<(char, u32, u64)> {
    None
}

fn raw(pid: u32) -> Option<Pid> {
    // 0 and values above i32::MAX would address a process group: never.
    i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .map(Pid::from_raw)
}

impl Proc {
    /// Identifies a process that is running now.
    pub fn identify(pid: u32) -> Proc {
        Proc {
            pid,
            start: stat(pid).map(|(_, _, start)| start),
        }
    }

    /// Whether this very process still runs (a zombie has finished running).
    pub fn running(&self) -> bool {
        let Some(p) = raw(self.pid) else { return false };
        if cfg!(target_os = "linux") {
            // No start time: it was already gone when identified, and whatever has its pid
            // now is someone else.
            match (self.start, stat(self.pid)) {
                (Some(first), Some((state, _, start))) => {
                    state != 'Z' && state != 'X' && start == first
                }
                _ => false,
            }
        } else {
            !matches!(kill(p, None), Err(nix::Error::ESRCH))
        }
    }

    /// SIGKILLs it if it is still this process.
    pub fn kill(&self) {
        if let (true, Some(p)) = (self.running(), raw(self.pid)) {
            let _ = kill(p, Signal::SIGKILL);
        }
    }
}

/// Every descendant of `pid` running now (Linux; empty elsewhere), from one `/proc` scan.
pub fn descendants(pid: u32) -> Vec<u32> {
    let parents = parent_map();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (&child, _) in parents.iter().filter(|(_, &pp)| pp == parent) {
            if !found.contains(&child) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found
}

/// pid → ppid of every process (Linux; empty elsewhere).
fn parent_map() -> BTreeMap<u32, u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| stat(pid).map(|(_, ppid, _)| (pid, ppid)))
        .collect()
}

/// Becomes a "child subreaper" (Linux): a service process orphaned by the supervisor is
/// re-parented to us rather than to init, so it can still be found, killed and reaped.
pub fn become_subreaper() {
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_child_subreaper(true);
}

/// Reaps every exited process that was re-parented to us (see [`become_subreaper`]),
/// except `keep` (a child that its `std::process::Child` handle will reap).
pub fn reap_orphans(keep: Option<u32>) {
    let me = std::process::id();
    for (pid, ppid) in parent_map() {
        if ppid == me && Some(pid) != keep {
            if let Some(p) = raw(pid) {
                let _ = waitpid(p, Some(WaitPidFlag::WNOHANG));
            }
        }
    }
}

/// Our own children other than `keep` (Linux; empty elsewhere): with [`become_subreaper`],
/// these are processes the supervisor left behind.
pub fn orphans(keep: Option<u32>) -> Vec<u32> {
    let me = std::process::id();
    parent_map()
        .into_iter()
        .filter(|&(pid, ppid)| ppid == me && Some(pid) != keep)
        .map(|(pid, _)| pid)
        .collect()
}

/// Waits (at most `within`) until none of `procs` runs, reaping our own orphans meanwhile.
/// Returns the ones still running.
pub fn wait_gone(procs: &[Proc], within: Duration) -> Vec<Proc> {
    let end = Instant::now() + within;
    loop {
        reap_orphans(None);
        let left: Vec<Proc> = procs.iter().copied().filter(Proc::running).collect();
        if left.is_empty() || Instant::now() >= end {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
