//! Receiving one datagram on a `SOCK_DGRAM` Unix socket together with the
//! sender's kernel-vouched credentials, for the notify socket (`notify`).
//!
//! Unlike `msg::recv_with`, a truncated payload or control message is not an
//! error of the socket: it is a property of that one datagram, which the
//! caller drops. Descriptors a sender attached (`SCM_RIGHTS`) are closed
//! here at once — the notify protocol's `FDSTORE=1` is not supported, and
//! an fd we never close would leak one slot of our table per datagram.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use super::creds::PeerCred;
use super::msg::errno;

/// What arrived besides the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    /// Payload bytes copied into the buffer.
    pub len: usize,
    /// The sender as the kernel saw it (needs `SO_PASSCRED`, Linux only).
    pub sender: Option<PeerCred>,
    /// Descriptors that were attached and have been closed.
    pub fds_closed: usize,
    /// The payload did not fit the buffer (the rest is lost).
    pub truncated: bool,
    /// Control data did not fit (descriptors beyond it were closed by the
    /// kernel; credentials may be missing).
    pub control_truncated: bool,
}

/// At most this many descriptors are received (and closed) per datagram;
/// more make the control message truncate, and the kernel closes the rest.
const MAX_FDS: usize = 16;

/// One `recvmsg` (honouring `SO_RCVTIMEO`, EINTR retried).
pub fn recv_datagram<F: AsFd>(sock: &F, buf: &mut [u8]) -> io::Result<Datagram> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let mut space = nix::cmsg_space!(nix::sys::socket::UnixCredentials, [RawFd; MAX_FDS]);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
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
        let mut d = Datagram {
            len: msg.bytes,
            sender: None,
            fds_closed: 0,
            truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
            control_truncated: msg.flags.contains(MsgFlags::MSG_CTRUNC),
        };
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                match c {
                    ControlMessageOwned::ScmRights(fds) => {
                        for fd in fds {
                            // Ours now (the kernel installed it in our
                            // table); dropping the OwnedFd closes it.
                            drop(super::exec::own(fd));
                            d.fds_closed += 1;
                        }
                    }
                    #[cfg(any(target_os = "linux", target_os = "android"))]
                    ControlMessageOwned::ScmCredentials(u) => {
                        d.sender = Some(PeerCred {
                            pid: u32::try_from(u.pid()).ok().filter(|p| *p != 0),
                            uid: u.uid(),
                        });
                    }
                    _ => {}
                }
            }
        }
        return Ok(d);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, ControlMessage};
    use std::io::IoSlice;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn credentials_and_attached_fds_are_reported_and_closed() {
        let (a, b) = UnixDatagram::pair().unwrap();
        super::super::creds::enable_passcred(&b).unwrap();
        a.send(b"READY=1").unwrap();
        let mut buf = [0u8; 64];
        let d = recv_datagram(&b, &mut buf).unwrap();
        assert_eq!(&buf[..d.len], b"READY=1");
        assert_eq!(d.sender.and_then(|c| c.pid), Some(std::process::id()));
        assert_eq!(d.fds_closed, 0);

        let f = std::fs::File::open("/dev/null").unwrap();
        let raw = [f.as_raw_fd()];
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(b"FDSTORE=1")],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let d = recv_datagram(&b, &mut buf).unwrap();
        assert_eq!(d.fds_closed, 1);

        a.send(&[b'x'; 100]).unwrap();
        let mut small = [0u8; 10];
        let d = recv_datagram(&b, &mut small).unwrap();
        assert!(d.truncated);
    }
}
