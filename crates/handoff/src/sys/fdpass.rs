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
/// many descriptors keeps what it has in flight on each hop within a window
/// ([`InFlight`], [`window_for_limit`]).
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

/// The descriptors a sender has on their way through one stream socket,
/// batch by batch, so it can keep more than one batch in flight and still
/// stay inside the kernel's limit (see [`unread_by_peer`]).
///
/// The peer reads in order, so what it has not read is always the newest
/// batches: a batch is read once what is still unread fits in the batches
/// sent after it. Sizes are in `SIOCOUTQ`'s own unit (kernel buffers, more
/// than the bytes in them): each batch's is what the count grew by when it
/// was sent. If the peer read meanwhile, a batch looks smaller and may be
/// taken for read a little early — by at most one batch; the window is a
/// quarter of the limit, so that stays far from it.
#[derive(Debug)]
pub struct InFlight {
    /// Size and descriptors of each batch not known to be read, oldest
    /// first.
    sent: std::collections::VecDeque<(usize, usize)>,
    units: usize,
    fds: usize,
    window: usize,
    /// What was unread when the last `wait_room` returned.
    before: usize,
}

impl InFlight {
    /// At most `window` descriptors in flight (at least one batch always
    /// goes).
    pub fn new(window: usize) -> InFlight {
        InFlight {
            sent: std::collections::VecDeque::new(),
            units: 0,
            fds: 0,
            window: window.max(1),
            before: 0,
        }
    }

    /// Records a batch of `fds` descriptors just sent on `sock`.
    pub fn sent<F: AsFd>(&mut self, sock: &F, fds: usize) {
        let after = unread_by_peer(sock).unwrap_or(self.before);
        let size = after.saturating_sub(self.before);
        self.sent.push_back((size, fds));
        self.units += size;
        self.fds += fds;
    }

    /// Forgets the batches the peer has read, given what it has not.
    fn settle(&mut self, unread: usize) {
        if unread == 0 {
            self.sent.clear();
            (self.units, self.fds) = (0, 0);
            return;
        }
        while let Some(&(size, f)) = self.sent.front() {
            if self.units - size < unread {
                break;
            }
            self.sent.pop_front();
            self.units -= size;
            self.fds -= f;
        }
    }

    /// Waits until `n` more descriptors fit in the window — the peer of
    /// `sock` has read enough —, `deadline`, or `stop()` says to give up.
    /// Polls, backing off from 10 µs to 200 µs: there is no readiness event
    /// for "the peer read it".
    pub fn wait_room<F: AsFd>(
        &mut self,
        sock: &F,
        n: usize,
        deadline: std::time::Instant,
        stop: &dyn Fn() -> bool,
    ) -> io::Result<()> {
        let mut pause = std::time::Duration::from_micros(10);
        loop {
            let unread = unread_by_peer(sock)?;
            self.settle(unread);
            if self.fds == 0 || self.fds + n <= self.window {
                self.before = unread;
                return Ok(());
            }
            if stop() {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "stopped waiting for the peer to read the descriptors sent to it",
                ));
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer did not read the descriptors sent to it in time",
                ));
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(std::time::Duration::from_micros(200));
        }
    }
}

/// Most descriptors a sender whose `RLIMIT_NOFILE` is `limit` (the current
/// soft limit when `None`) may have in flight on one hop: a quarter of it,
/// so the two hops of a relay by the same user stay within half of it.
pub fn window_for_limit(limit: Option<u64>) -> usize {
    let soft = limit.or_else(|| {
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _)| soft)
    });
    match soft {
        Some(s) => usize::try_from(s / 4).unwrap_or(usize::MAX).max(1),
        None => MAX_FDS,
    }
}

/// The soft `RLIMIT_NOFILE` of process `pid` (`prlimit(2)`; we may read
/// it for a process of our own uid, or as root).
#[cfg(target_os = "linux")]
pub fn nofile_limit_of(pid: u32) -> io::Result<u64> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: with a null new limit prlimit only reads: it writes one
    // `rlimit` through `&mut old`, alive and writable for the call.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // `rlim_t` is 32 bits wide on some 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    Ok(old.rlim_cur as u64)
}

/// Elsewhere another process's limit cannot be read.
#[cfg(not(target_os = "linux"))]
pub fn nofile_limit_of(_pid: u32) -> io::Result<u64> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

use super::exec::reserve_top;

/// Grows this process's descriptor table now to `min(want, soft
/// RLIMIT_NOFILE)` slots, so that thousands of descriptors arriving at once
/// (moved connections, `docs/connection-transfer.md`) do not grow it on the
/// way. Returns the slots reserved (0 when the limit is too small to matter).
///
/// Why: the kernel grows a table by doubling it, and in a process with more
/// than one thread every growth waits for an RCU grace period
/// (`expand_files` → `synchronize_rcu`), 10–20 ms on a 2-core VM. A successor
/// taking in 10,000 connections grew its table 64 → 16 Ki slots — eight
/// waits, ~75 ms of the drain spent asleep inside `recvmsg`. A table never
/// shrinks and survives exec, so every process the supervisor starts gets
/// its table grown in the child before exec, while it is one thread and no
/// wait is due (`sys::exec`, with [`reserve_top`]); this function is for a
/// process that grows its own (the supervisor), at one wait.
///
/// How: `fcntl(F_DUPFD_CLOEXEC)` of `/dev/null` to the top slot, closed at
/// once — the one portable way to make the kernel size the table.
pub fn reserve_table(want: u64) -> io::Result<u64> {
    let top = reserve_top(want);
    if top < 0 {
        return Ok(0);
    }
    let null = std::fs::File::open("/dev/null")?;
    let raw = nix::fcntl::fcntl(&null, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(top))
        .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
    // SAFETY: `raw` was just returned by F_DUPFD_CLOEXEC: an open
    // descriptor nobody else knows of; the OwnedFd closes it once.
    drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
    Ok(u64::try_from(top).unwrap_or(0) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn in_flight_keeps_a_window_of_descriptors_and_forgets_what_was_read() {
        use std::time::{Duration, Instant};
        let (a, b) = UnixStream::pair().unwrap();
        let mut w = InFlight::new(5);
        let file = tempfile::tempfile().unwrap();
        let soon = Instant::now() + Duration::from_secs(5);
        // Two batches of 2 fit in a window of 5; a third does not until
        // the peer reads.
        for _ in 0..2 {
            w.wait_room(&a, 2, soon, &|| false).unwrap();
            send_with_fds(&a, &[7u8; 100], &[file.as_fd(), file.as_fd()]).unwrap();
            w.sent(&a, 2);
        }
        let err = w
            .wait_room(&a, 2, Instant::now() + Duration::from_millis(20), &|| false)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Told to stop (the handoff aborted), it gives up at once, long
        // before its deadline.
        let err = w.wait_room(&a, 2, soon, &|| true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
        assert!(Instant::now() < soon);
        // The peer reads the first batch: room again.
        let mut buf = [0u8; 100];
        let (n, fds) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!((n, fds.len()), (100, 2));
        w.wait_room(&a, 2, soon, &|| false).unwrap();
        assert_eq!(w.fds, 2, "the second batch is still unread");
        // A batch bigger than the window still goes when nothing is in
        // flight.
        let _ = recv_with_fds(&b, &mut buf).unwrap();
        w.wait_room(&a, 50, soon, &|| false).unwrap();
        assert_eq!(w.fds, 0);
    }

    #[test]
    fn the_window_is_a_quarter_of_the_limit() {
        assert_eq!(window_for_limit(Some(1024)), 256);
        assert_eq!(window_for_limit(Some(20_000)), 5_000);
        assert_eq!(window_for_limit(Some(2)), 1);
    }

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
        assert!(unread_by_peer(&a).unwrap() >= 5);
        let mut buf = [0u8; 5];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(unread_by_peer(&a).unwrap(), 0);
    }

    #[test]
    fn batches_stay_a_quarter_of_the_limit() {
        assert_eq!(batch_for_limit(Some(1024)), 253);
        assert_eq!(batch_for_limit(Some(400)), 100);
        assert_eq!(batch_for_limit(Some(2)), 1);
        assert_eq!(batch_for_limit(Some(u64::MAX)), MAX_FDS);
    }
}
