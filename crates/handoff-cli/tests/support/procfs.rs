//! `/proc` helpers: process trees, states, fd counts, and killing a tree.
#![allow(dead_code)]
#![allow(unused_imports)]

use super::*;
// ---------------------------------------------------------------------------------------
// /proc helpers
// ---------------------------------------------------------------------------------------

/// The fields of `/proc/PID/stat` the tests care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    /// `R`, `S`, `D`, `T`, `Z` (zombie), …
    pub state: char,
    pub ppid: u32,
}

/// Parses a `/proc/PID/stat` line. The second field is the command name in parentheses and
/// may itself contain spaces and parentheses, so the fixed fields are taken after the
/// *last* `)`.
pub fn parse_stat(line: &str) -> Option<ProcStat> {
    let open = line.find('(')?;
    let pid = line[..open].trim().parse().ok()?;
    let close = line.rfind(')')?;
    let mut rest = line.get(close + 1..)?.split_ascii_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(ProcStat { pid, state, ppid })
}

/// `/proc/PID/stat` of one process, or `None` if it does not exist (any more).
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// One snapshot of every process on the system (processes may vanish mid-scan; those are
/// skipped).
pub fn all_processes() -> Vec<ProcStat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_stat)
        .collect()
}

/// Direct children of `pid` (zombies included), sorted.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut kids: Vec<u32> = all_processes()
        .into_iter()
        .filter(|p| p.ppid == pid)
        .map(|p| p.pid)
        .collect();
    kids.sort_unstable();
    kids
}

/// Children of `pid` with their state, for diagnostics.
pub fn children_with_state(pid: u32) -> Vec<(u32, char)> {
    let mut kids: Vec<(u32, char)> = all_processes()
        .into_iter()
        .filter(|p| p.ppid == pid)
        .map(|p| (p.pid, p.state))
        .collect();
    kids.sort_unstable();
    kids
}

/// Every descendant of `pid` (children, grandchildren, …), from one /proc snapshot.
pub fn descendants_of(pid: u32) -> Vec<u32> {
    let procs = all_processes();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for p in procs.iter().filter(|p| p.ppid == parent) {
            if !found.contains(&p.pid) {
                found.push(p.pid);
                frontier.push(p.pid);
            }
        }
    }
    found
}

/// The process state character (`Z` = zombie), or `None` if the process is gone.
pub fn process_state(pid: u32) -> Option<char> {
    proc_stat(pid).map(|s| s.state)
}

pub fn is_zombie(pid: u32) -> bool {
    process_state(pid) == Some('Z')
}

/// Number of open file descriptors of `pid` (entries of `/proc/PID/fd`), or `None` if the
/// process is gone or not ours.
pub fn count_open_fds(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// SIGKILLs `pid` and every descendant. The supervisor is stopped (SIGSTOP) first so it
/// cannot spawn anything new, and the descendants are collected *before* it is killed:
/// once it dies its children are re-parented and could no longer be found through it.
/// Service processes run in their own process groups, so each is killed by pid.
pub fn kill_tree(pid: u32) {
    if kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).is_ok() {
        // A stopped process shows `T`; a bounded wait, since delivery is asynchronous.
        poll_until(Duration::from_secs(1), || {
            !matches!(process_state(pid), Some('R' | 'S' | 'D'))
        });
    }
    let descendants = descendants_of(pid);
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    for d in descendants {
        let _ = kill(Pid::from_raw(d as i32), Signal::SIGKILL);
    }
}
