//! Watching the control connection while the service drains, so that an
//! abort stops the drain at once rather than when it has run its course.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use crate::channel::Channel;

/// Watches the control connection while the service drains: the
/// supervisor sends nothing then unless it aborts, so the connection
/// becoming readable (a `ResumeAfterAbort`, or EOF when the supervisor is
/// gone) fires the drain's [`AbortSignal`](crate::AbortSignal). It only
/// polls; the message itself is read afterwards on the control thread, as
/// always. Dropping the watch stops it.
pub(super) struct AbortWatch {
    /// Written to (or dropped) to end the watch.
    stop: Option<UnixStream>,
}

impl AbortWatch {
    pub(super) fn start(chan: &Channel, abort: &crate::AbortSignal) -> AbortWatch {
        let pair = chan
            .stream()
            .try_clone()
            .and_then(|c| Ok((c, UnixStream::pair()?)));
        let (conn, (stop, stopped)) = match pair {
            Ok(p) => p,
            Err(e) => {
                // Without a watch the drain runs its course, as before:
                // the abort is read once it returns.
                tracing::warn!(target: "handoff::incumbent", error = %e, "cannot watch the control connection during the drain; an abort will wait for the drain to end");
                return AbortWatch { stop: None };
            }
        };
        let abort = abort.clone();
        let spawned = std::thread::Builder::new()
            .name("handoff-abort-watch".into())
            .spawn(move || {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                loop {
                    let mut fds = [
                        PollFd::new(conn.as_fd(), PollFlags::POLLIN),
                        PollFd::new(stopped.as_fd(), PollFlags::POLLIN),
                    ];
                    match poll(&mut fds, PollTimeout::NONE) {
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(_) => return, // the drain runs its course
                        Ok(_) => {}
                    }
                    let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                    if ready(&fds[1]) {
                        return; // the drain is over
                    }
                    if ready(&fds[0]) {
                        abort.fire();
                        return;
                    }
                }
            });
        match spawned {
            Ok(_) => AbortWatch { stop: Some(stop) },
            Err(e) => {
                tracing::warn!(target: "handoff::incumbent", error = %e, "cannot start the drain's abort watch; an abort will wait for the drain to end");
                AbortWatch { stop: None }
            }
        }
    }
}

impl Drop for AbortWatch {
    fn drop(&mut self) {
        if let Some(mut s) = self.stop.take() {
            // The byte or, failing that, the close (POLLHUP) ends the poll.
            let _ = s.write_all(&[1]);
        }
    }
}
