//! Waiting for a child without reaping it, so that signalling it stays
//! race-free against pid reuse.
//!
//! A pid can be recycled only after its zombie is reaped. The waiter thread
//! first blocks in `waitid(WEXITED | WNOWAIT)`, which returns when the child
//! has exited but leaves the zombie in place; it then marks the child dead
//! under the same mutex that `kill` takes, and only then reaps. So `kill`
//! either sees "alive" while the pid still names our child (alive or
//! zombie), or sees "dead" and does not signal at all.

use std::io;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status (`-1`: its status could not be
    /// collected).
    Code(i32),
    /// It was killed by this signal number.
    Signal(i32),
    /// The process was not our child (adopted), so its status is unknown.
    Unknown,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit status {c}"),
            Exit::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown signal");
                write!(f, "killed by signal {s} ({name})")
            }
            Exit::Unknown => f.write_str("exited (status unknown: not our child)"),
        }
    }
}

/// Blocks until `pid` has exited, without reaping it
/// (`waitid(P_PID, pid, WEXITED | WNOWAIT)`; P_PID restricts it to that
/// one child of ours).
pub fn wait_exited_nowait(pid: u32) -> io::Result<()> {
    use rustix::process::{waitid, Pid, WaitId, WaitIdOptions};
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ECHILD))?;
    loop {
        match waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        ) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reaps an exited child and decodes its status.
pub fn reap(pid: u32) -> io::Result<Exit> {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid as i32), None) {
            Ok(WaitStatus::Exited(_, c)) => return Ok(Exit::Code(c)),
            Ok(WaitStatus::Signaled(_, s, _)) => return Ok(Exit::Signal(s as i32)),
            Ok(_) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e as i32)),
        }
    }
}

/// Sends `sig` to `pid`. Only call while the child is known not reaped.
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) -> io::Result<()> {
    let Ok(raw) = i32::try_from(pid) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "pid out of range",
        ));
    };
    // kill(0) or a negative pid would signal a process group or every
    // process: refuse them outright.
    if raw <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to signal pid <= 0",
        ));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), sig)
        .map_err(|e| io::Error::from_raw_os_error(e as i32))
}
