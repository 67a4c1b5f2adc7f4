//! Every `unsafe` block and every platform difference of the crate.
//!
//! The rest of the crate is `deny(unsafe_code)`; what needs raw syscalls —
//! fork/exec with an fd shuffle, waiting without reaping, kernel-vouched peer
//! credentials, the shared region's mapping seen as atomic words — lives here behind small safe functions, each `unsafe` block
//! with the `SAFETY:` argument that justifies it.

pub mod clock;
pub mod creds;
pub mod dgram;
pub mod exec;
pub mod fdpass;
pub mod fs;
mod msg;
pub mod pidfd;
pub mod shm;
pub mod wait;

pub use creds::{peer_credentials, recv_with_credentials, send_with_credentials, PeerCred};
pub use fdpass::is_socket;

pub mod accept {
    //! Which failures of `accept(2)` pass.
    use std::io;

    /// Whether a failed `accept` may succeed if retried later: out of
    /// descriptors or memory (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`), or
    /// a connection that died in the backlog (`ECONNABORTED`, `ECONNRESET`,
    /// `ETIMEDOUT`, `EPROTO`, `EPERM` from a firewall, `EINTR`, `EAGAIN`).
    /// The rest (`EBADF`, `EINVAL`, `ENOTSOCK`, …) mean the listening
    /// socket itself is gone or unusable: retrying would spin forever.
    pub fn is_transient(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(
                libc::EMFILE
                    | libc::ENFILE
                    | libc::ENOBUFS
                    | libc::ENOMEM
                    | libc::ECONNABORTED
                    | libc::EPROTO
                    | libc::EPERM
                    | libc::EINTR
                    | libc::EAGAIN
                    | libc::ETIMEDOUT
                    | libc::ECONNRESET
            )
        )
    }
}

pub mod poll {
    //! Waiting on more than one descriptor at once.
    use std::io;
    use std::os::fd::BorrowedFd;
    use std::time::{Duration, Instant};

    /// Waits up to `within` until one of `fds` is readable — has data, or
    /// its peer hung up or failed (`POLLIN`, `POLLHUP`, `POLLERR`) — and
    /// returns the index of the first such one; `None` if none is within
    /// the time. `EINTR` is retried with the time left.
    pub fn first_readable(fds: &[BorrowedFd<'_>], within: Duration) -> io::Result<Option<usize>> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut polled: Vec<PollFd<'_>> = fds
                .iter()
                .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
                .collect();
            match poll(&mut polled, timeout) {
                Ok(0) => return Ok(None),
                Ok(_) => {
                    return Ok(polled
                        .iter()
                        .position(|p| p.revents().is_some_and(|r| !r.is_empty())))
                }
                Err(nix::errno::Errno::EINTR) if !left.is_zero() => continue,
                Err(e) => return Err(io::Error::from_raw_os_error(e as i32)),
            }
        }
    }
}

pub mod fd {
    //! Raw fd numbers from the environment (`LISTEN_FDS`, `HANDOFF_SOCK_FD`).
    use std::io;
    use std::os::fd::{BorrowedFd, RawFd};

    /// Borrows `fd` after confirming with `F_GETFD` that it is open.
    pub fn borrow_raw_checked(fd: RawFd) -> io::Result<BorrowedFd<'static>> {
        if fd < 0 {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        // SAFETY: F_GETFD only queries flags of a descriptor number; on a
        // closed number it fails with EBADF and touches nothing.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor is open (checked above) and was inherited by
        // this process for it to own; the borrow is only used immediately,
        // before `own` takes it over.
        Ok(unsafe { BorrowedFd::borrow_raw(fd) })
    }
}
