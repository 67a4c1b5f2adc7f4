//! Process start times, for telling a live process from a recycled pid.

/// Start time of `pid` in milliseconds since the Unix epoch, where the
/// platform can tell (Linux: `/proc/<pid>/stat` field 22 plus `btime`).
#[cfg(target_os = "linux")]
pub fn start_time_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: parse
    // from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    // rest starts at field 3; starttime is field 22 → index 19.
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|v| *v > 0)? as u64;
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(btime * 1000 + ticks * 1000 / hz)
}

/// Whether a process with this pid exists (`kill(pid, 0)`; EPERM still
/// means it exists). Pids that would address a group are never probed.
pub fn exists(pid: u32) -> bool {
    match i32::try_from(pid) {
        Ok(p) if p > 0 => !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None),
            Err(nix::Error::ESRCH)
        ),
        _ => false,
    }
}

/// Whether `pid` is a zombie (exited, not yet reaped by its parent).
#[cfg(target_os = "linux")]
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(false)
}

#[cfg(not(target_os = "linux"))]
pub fn is_zombie(_pid: u32) -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
pub fn start_time_ms(_pid: u32) -> Option<u64> {
    None
}

/// What `/proc/<pid>/stat` says about a process, read in one go so the
/// state and the start time describe the same process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// The state letter (`R`, `S`, `D`, `Z`, `X`, …).
    pub state: u8,
    /// The parent's pid (field 4): whether a process is our own child.
    pub ppid: u32,
    /// Start time in clock ticks since boot (field 22). Unlike
    /// [`start_time_ms`] it does not depend on `btime`, which some kernels
    /// report with a second of jitter, so two reads of it always agree.
    pub start_ticks: u64,
}

impl ProcStat {
    /// Exited, not yet reaped (or being torn down): no longer runs code.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// State and start ticks of `pid`, where the platform can tell.
#[cfg(target_os = "linux")]
pub fn stat(pid: u32) -> Option<ProcStat> {
    if pid == 0 || pid > i32::MAX as u32 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace();
    // rest starts at field 3 (state); starttime is field 22 → 19 further.
    let state = *fields.next()?.as_bytes().first()?;
    let ppid = fields.next()?.parse().ok()?;
    // starttime is field 22: 17 further on from field 4.
    let start_ticks = fields.nth(17)?.parse().ok()?;
    Some(ProcStat {
        state,
        ppid,
        start_ticks,
    })
}

/// Start-time seam for platforms without `/proc`: callers fall back to
/// existence checks (documented where they do).
#[cfg(not(target_os = "linux"))]
pub fn stat(_pid: u32) -> Option<ProcStat> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn our_own_start_time_is_in_the_past_and_recent() {
        let t = super::start_time_ms(std::process::id()).unwrap();
        let now = crate::clock::now_ms();
        assert!(t <= now + 1000, "{t} vs {now}");
        assert!(now - t < 3_600_000 * 24, "{t} vs {now}");
    }

    #[test]
    fn stat_of_self_is_running_and_stable() {
        let a = super::stat(std::process::id()).unwrap();
        let b = super::stat(std::process::id()).unwrap();
        assert_eq!(a.start_ticks, b.start_ticks);
        assert!(!a.is_dead(), "{a:?}");
        assert!(super::stat(0).is_none());
        assert!(super::stat(u32::MAX).is_none());
    }
}
