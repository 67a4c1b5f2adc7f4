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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn our_own_start_time_is_in_the_past_and_recent() {
        let t = super::start_time_ms(std::process::id()).unwrap();
        let now = crate::journal::now_ms();
        assert!(t <= now + 1000, "{t} vs {now}");
        assert!(now - t < 3_600_000 * 24, "{t} vs {now}");
    }
}
