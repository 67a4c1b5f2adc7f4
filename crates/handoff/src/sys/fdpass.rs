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
