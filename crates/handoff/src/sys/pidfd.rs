//! Process file descriptors (Linux ≥ 5.6): how a restarted notify-mode
//! supervisor copies the listening sockets out of a service it did not
//! start, and signals that service without racing pid reuse.
//!
//! A pidfd refers to one process, not to a pid number: once opened, a
//! recycled pid can never be addressed through it. `pidfd_getfd(2)` then
//! duplicates one of the target's descriptors into this process (the copy
//! shares the open file description, exactly like `SCM_RIGHTS`). It needs
//! `PTRACE_MODE_ATTACH_REALCREDS` over the target: root, or the same uid
//! where Yama's `ptrace_scope` allows (0, or 1 for a descendant).

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

/// Opens a pidfd for `pid` (`pidfd_open(2)`, close-on-exec).
#[cfg(target_os = "linux")]
pub fn open(pid: u32) -> io::Result<OwnedFd> {
    use rustix::process::{pidfd_open, Pid, PidfdFlags};
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    Ok(pidfd_open(pid, PidfdFlags::empty())?)
}

/// Duplicates the target's descriptor `target_fd` into this process
/// (`pidfd_getfd(2)`; the copy is close-on-exec).
#[cfg(target_os = "linux")]
pub fn getfd(pidfd: BorrowedFd<'_>, target_fd: RawFd) -> io::Result<OwnedFd> {
    use rustix::process::{pidfd_getfd, PidfdGetfdFlags};
    Ok(pidfd_getfd(pidfd, target_fd, PidfdGetfdFlags::empty())?)
}

/// Sends `sig` to the process behind `pidfd` (`pidfd_send_signal(2)`):
/// never reaches a process that merely inherited the pid number.
#[cfg(target_os = "linux")]
pub fn send_signal(pidfd: BorrowedFd<'_>, sig: nix::sys::signal::Signal) -> io::Result<()> {
    let sig = rustix::process::Signal::from_named_raw(sig as i32)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_send_signal(pidfd, sig)?)
}

/// Waits up to `within` for the process behind `pidfd` to exit: a pidfd
/// polls readable once its process has terminated (Linux ≥ 5.3), so this
/// needs no polling of `/proc` and cannot be fooled by a recycled pid.
/// Returns whether it exited.
#[cfg(target_os = "linux")]
pub fn wait_exit(pidfd: BorrowedFd<'_>, within: std::time::Duration) -> io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let timeout = Timespec::try_from(left).ok();
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        match poll(&mut fds, timeout.as_ref()) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(rustix::io::Errno::INTR) if !left.is_zero() => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub fn wait_exit(_pidfd: BorrowedFd<'_>, _within: std::time::Duration) -> io::Result<bool> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

#[cfg(not(target_os = "linux"))]
pub fn open(_pid: u32) -> io::Result<OwnedFd> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

#[cfg(not(target_os = "linux"))]
pub fn getfd(_pidfd: BorrowedFd<'_>, _target_fd: RawFd) -> io::Result<OwnedFd> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

#[cfg(not(target_os = "linux"))]
pub fn send_signal(_pidfd: BorrowedFd<'_>, _sig: nix::sys::signal::Signal) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::fd::AsFd;

    #[test]
    fn copies_a_descriptor_of_our_own_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pidfd = super::open(std::process::id()).unwrap();
        let copy = super::getfd(pidfd.as_fd(), std::os::fd::AsRawFd::as_raw_fd(&l)).unwrap();
        let copy = std::net::TcpListener::from(copy);
        assert_eq!(copy.local_addr().unwrap(), l.local_addr().unwrap());
        assert!(super::open(0).is_err());
    }

    #[test]
    fn wait_exit_sees_a_child_end() {
        let mut c = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let pidfd = super::open(c.id()).unwrap();
        assert!(!super::wait_exit(pidfd.as_fd(), std::time::Duration::ZERO).unwrap());
        assert!(super::wait_exit(pidfd.as_fd(), std::time::Duration::from_secs(10)).unwrap());
        c.wait().unwrap();
    }
}
