//! Passing file descriptors over a Unix socket (`SCM_RIGHTS`): how a
//! restarted supervisor gets the listening sockets back from the incumbent,
//! which holds its own copies of them.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// Most descriptors one message may carry (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 253;

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Writes all of `buf`, the first chunk carrying `fds`.
pub fn send_with_fds<F: AsFd>(sock: &F, buf: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
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
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let sent = loop {
        match sendmsg::<()>(
            sock.as_fd().as_raw_fd(),
            &[IoSlice::new(buf)],
            if raw.is_empty() { &[] } else { &cmsg },
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(errno(e)),
        }
    };
    let mut rest = &buf[sent..];
    while !rest.is_empty() {
        match nix::sys::socket::send(sock.as_fd().as_raw_fd(), rest, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(())
}

/// One `recvmsg` into `buf`, taking ownership of any descriptors attached
/// (close-on-exec). Honours `SO_RCVTIMEO`. A truncated control message (more
/// fds than we have room for) is an error: the kernel has closed the rest.
pub fn recv_with_fds<F: AsFd>(sock: &F, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(
            sock.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(errno(e)),
        };
        let mut fds = vec![];
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // The kernel installed these descriptors in our table
                    // for us alone: we own them.
                    fds.extend(raw.into_iter().map(super::exec::own));
                }
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::other("descriptor message truncated"));
        }
        return Ok((msg.bytes, fds));
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
}
