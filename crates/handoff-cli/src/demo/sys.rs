//! The demo's only `unsafe`: a `pre_exec` hook and one `ioctl`.

use std::process::Command;

/// Makes the spawned supervisor receive SIGTERM (its graceful stop, which also stops the
/// service) if this process dies without cleaning up — killed with SIGKILL, say (Linux;
/// a no-op elsewhere). Must be called from the thread that will live as long as the
/// child: the kernel ties the parent-death signal to the spawning thread.
pub fn stop_child_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = nix::unistd::getpid();
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe work is allowed: it makes two raw syscalls (prctl, getppid)
        // through nix, which neither allocates nor takes a lock, and builds an io::Error
        // from an errno (no allocation for OS errors).
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)?;
                // We may have died between fork and prctl: then nobody would signal.
                if nix::unistd::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Width in columns of the terminal on stderr, if it is one.
pub fn stderr_columns() -> Option<usize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` through the pointer, which points to
    // a live, properly aligned local of that type; fd 2 is only read from.
    let rc = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some(ws.ws_col as usize)
}
