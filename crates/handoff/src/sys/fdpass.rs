//! Passing file descriptors over a Unix socket (`SCM_RIGHTS`): how a
//! restarted supervisor gets the listening sockets back from the incumbent,
//! which holds its own copies of them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// Most descriptors one message may carry (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 253;

/// Writes all of `buf`, the first chunk carrying `fds`.
pub fn send_with_fds<F: AsFd>(sock: &F, buf: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use nix::sys::socket::ControlMessage;
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors exceed the {MAX_FDS} one message can carry",
                fds.len()
            ),
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    if raw.is_empty() {
        return super::msg::send_all_with(sock, buf, &[]);
    }
    super::msg::send_all_with(sock, buf, &[ControlMessage::ScmRights(&raw)])
}

/// One `recvmsg` into `buf`, taking ownership of any descriptors attached
/// (close-on-exec). Honours `SO_RCVTIMEO`. A truncated control message (more
/// fds than we have room for) is an error: the kernel has closed the rest.
pub fn recv_with_fds<F: AsFd>(sock: &F, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut fds = vec![];
    let n = super::msg::recv_with(sock, buf, &mut space, |c| {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(raw) = c {
            // The kernel installed these descriptors in our table for us
            // alone: we own them.
            fds.extend(raw.into_iter().map(super::exec::own));
        }
    })?;
    Ok((n, fds))
}

/// Whether `fd` is a socket: what a moved connection must be (a
/// descriptor of another kind is a broken or hostile sender's).
pub fn is_socket<F: AsFd>(fd: &F) -> bool {
    nix::sys::stat::fstat(fd.as_fd()).is_ok_and(|st| (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK)
}

/// Bytes written to the stream socket `sock` that its peer has not read
/// yet (`SIOCOUTQ`).
///
/// Why it matters here: the kernel counts every descriptor sitting in a
/// Unix socket's queue against the sending user, and refuses a send
/// (`ETOOMANYREFS`) once that user has more in flight than the sender's
/// `RLIMIT_NOFILE` — for every process of the user at once. A sender of
/// many descriptors waits until its peer has read the previous batch, so
/// at most one batch per hop is ever in flight.
///
/// Elsewhere it reports 0 (no flow control): macOS and the BSDs have no
/// `SIOCOUTQ` for Unix sockets, and their limit on descriptors in flight is
/// system-wide rather than per user.
pub fn unread_by_peer<F: AsFd>(sock: &F) -> io::Result<usize> {
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = sock;
        return Ok(0);
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    unread_by_peer_linux(sock)
}

/// `SIOCOUTQ` (the same request as `TIOCOUTQ`).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn unread_by_peer_linux<F: AsFd>(sock: &F) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int through the pointer, which points
    // at `n`, alive and writable for the call; the descriptor is borrowed
    // for the call's duration.
    let r = unsafe { libc::ioctl(sock.as_fd().as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Most descriptors one batch may carry for a sender whose
/// `RLIMIT_NOFILE` is `limit` (the current soft limit when `None`): a
/// quarter of it, so the two hops of a relay (each with at most one batch
/// in flight, see [`unread_by_peer`]) stay well inside it, and at most
/// [`MAX_FDS`].
pub fn batch_for_limit(limit: Option<u64>) -> usize {
    let soft = limit.or_else(|| {
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _)| soft)
    });
    match soft {
        Some(s) => usize::try_from(s / 4).unwrap_or(MAX_FDS).clamp(1, MAX_FDS),
        None => MAX_FDS,
    }
}

/// Waits until the peer of `sock` has read everything written to it, or
/// `deadline`: the flow control of [`unread_by_peer`]. Polls, backing off
/// from 50 µs to 1 ms (there is no readiness event for "the peer read it").
pub fn wait_until_read<F: AsFd>(sock: &F, deadline: std::time::Instant) -> io::Result<()> {
    let mut pause = std::time::Duration::from_micros(10);
    loop {
        if unread_by_peer(sock)? == 0 {
            return Ok(());
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not read the previous batch of descriptors in time",
            ));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(std::time::Duration::from_micros(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn passes_a_working_descriptor() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"shared").unwrap();
        send_with_fds(&a, b"x", &[file.as_fd()]).unwrap();
        let mut buf = [0u8; 4];
        let (n, fds) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!((n, fds.len()), (1, 1));
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "shared");
    }

    #[test]
    fn counts_what_the_peer_has_not_read() {
        let (a, mut b) = UnixStream::pair().unwrap();
        assert_eq!(unread_by_peer(&a).unwrap(), 0);
        (&a).write_all(b"hello").unwrap();
        assert!(unread_by_peer(&a).unwrap() > 0);
        let soon = std::time::Instant::now() + std::time::Duration::from_millis(20);
        assert!(wait_until_read(&a, soon).is_err(), "nobody read it");
        let mut buf = [0u8; 5];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(unread_by_peer(&a).unwrap(), 0);
        let later = std::time::Instant::now() + std::time::Duration::from_secs(5);
        wait_until_read(&a, later).unwrap();
    }

    #[test]
    fn batches_stay_a_quarter_of_the_limit() {
        assert_eq!(batch_for_limit(Some(1024)), 253);
        assert_eq!(batch_for_limit(Some(400)), 100);
        assert_eq!(batch_for_limit(Some(2)), 1);
        assert_eq!(batch_for_limit(Some(u64::MAX)), MAX_FDS);
    }
}
