//! Kernel-vouched identity of the process on the other end of a Unix socket.
//!
//! * `SO_PEERCRED` (Linux) / `getpeereid` + `LOCAL_PEERPID` (macOS) give the
//!   credentials the peer had when it called `connect()` or `listen()`.
//!   That is what proves who owns the incumbent's control socket.
//! * On a socketpair, `SO_PEERCRED` names the pair's *creator* (the
//!   supervisor), so for the successor we use `SCM_CREDENTIALS` instead:
//!   the receiver sets `SO_PASSCRED` and the kernel attaches (and refuses to
//!   let an unprivileged sender forge) the sender's pid/uid/gid.
//!
//! These stay on nix, where pidfd and waitid moved to rustix: rustix's
//! `UCred` holds the pid as a non-zero `Pid`, but the kernel reports pid 0
//! for a peer in a pid namespace the receiver cannot see (a client in a
//! container), which we must read as "unknown", not trust a type that rules
//! it out. The `SCM_CREDENTIALS` messages share `msg.rs` with descriptor
//! passing.

use std::io;
use std::os::fd::AsFd;

/// Identity of a peer process as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// None where the platform cannot say (some BSDs).
    pub pid: Option<u32>,
    /// The peer's user id as the kernel reports it (the effective uid, for
    /// `SO_PEERCRED` and `getpeereid`); it must be ours or root's
    /// (docs/design.md §4.5).
    pub uid: u32,
}

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Credentials of the peer of a connected Unix stream socket.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn peer_credentials<F: AsFd>(fd: &F) -> io::Result<PeerCred> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let c = getsockopt(fd, PeerCredentials).map_err(errno)?;
    Ok(PeerCred {
        pid: u32::try_from(c.pid()).ok().filter(|p| *p != 0),
        uid: c.uid(),
    })
}

/// Credentials of the peer of a connected Unix stream socket.
#[cfg(any(target_os = "macos", target_os = "ios"))]
pub fn peer_credentials<F: AsFd>(fd: &F) -> io::Result<PeerCred> {
    use nix::sys::socket::{getsockopt, sockopt::LocalPeerPid};
    let (uid, _gid) = nix::unistd::getpeereid(fd.as_fd()).map_err(errno)?;
    let pid = getsockopt(fd, LocalPeerPid).map_err(errno)?;
    Ok(PeerCred {
        pid: u32::try_from(pid).ok().filter(|p| *p != 0),
        uid: uid.as_raw(),
    })
}

/// Credentials of the peer of a connected Unix stream socket.
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "macos",
    target_os = "ios"
)))]
pub fn peer_credentials<F: AsFd>(fd: &F) -> io::Result<PeerCred> {
    let (uid, _gid) = nix::unistd::getpeereid(fd.as_fd()).map_err(errno)?;
    Ok(PeerCred {
        pid: None,
        uid: uid.as_raw(),
    })
}

/// Asks the kernel to attach the sender's credentials to every message
/// received on `fd` from now on (Linux `SO_PASSCRED`). Elsewhere a no-op:
/// identity then rests on construction (only the spawned child holds the
/// other end of the socketpair).
pub fn enable_passcred<F: AsFd>(fd: &F) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use nix::sys::socket::{setsockopt, sockopt::PassCred};
        setsockopt(fd, PassCred, &true).map_err(errno)?;
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = fd;
    Ok(())
}

/// Writes all of `buf`, the first chunk carrying `SCM_CREDENTIALS` on Linux.
pub fn send_with_credentials<F: AsFd>(fd: &F, buf: &[u8]) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use nix::sys::socket::{ControlMessage, UnixCredentials};
        let creds = UnixCredentials::new();
        super::msg::send_all_with(fd, buf, &[ControlMessage::ScmCredentials(&creds)])
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    super::msg::send_all_with(fd, buf, &[])
}

/// One `recvmsg` into `buf`, returning the byte count and the sender's pid if
/// the kernel attached `SCM_CREDENTIALS` (requires [`enable_passcred`]).
/// Honours the socket's `SO_RCVTIMEO`.
pub fn recv_with_credentials<F: AsFd>(
    fd: &F,
    buf: &mut [u8],
) -> io::Result<(usize, Option<PeerCred>)> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let mut space = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let mut space = nix::cmsg_space!(libc::c_int);
    let mut cred = None;
    let n = super::msg::recv_with(fd, buf, &mut space, |c| {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let nix::sys::socket::ControlMessageOwned::ScmCredentials(u) = c {
            cred = Some(PeerCred {
                pid: u32::try_from(u.pid()).ok(),
                uid: u.uid(),
            });
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let _ = c;
    })?;
    Ok((n, cred))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn socketpair_peercred_names_the_creator() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = peer_credentials(&a).unwrap();
        assert_eq!(c.pid, Some(std::process::id()));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn scm_credentials_carry_the_sender_pid() {
        let (a, b) = UnixStream::pair().unwrap();
        enable_passcred(&b).unwrap();
        send_with_credentials(&a, b"hello").unwrap();
        let mut buf = [0u8; 16];
        let (n, cred) = recv_with_credentials(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(cred.unwrap().pid, Some(std::process::id()));
    }
}
