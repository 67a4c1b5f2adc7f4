//! `sendmsg`/`recvmsg` with control messages, shared by credential passing
//! and descriptor passing: EINTR retried, `SIGPIPE` never raised, the whole
//! buffer written (the control message rides on the first chunk).
//!
//! On nix, not rustix (which has `sendmsg`/`recvmsg` with `SCM_RIGHTS`
//! too): credential passing must stay on nix (`creds.rs`: a peer's pid of 0
//! across pid namespaces), and descriptor passing shares this one loop with
//! it. Moving `SCM_RIGHTS` alone would make two send loops and two receive
//! paths for one concern, each with its own EINTR and truncation handling,
//! and nix would stay a dependency all the same (the spawn's `fork` path
//! and signals in `exec.rs`, `poll` in the incumbent).

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{recvmsg, send, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

pub(super) fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Writes all of `buf`; `cmsgs` are attached to the first chunk.
pub(super) fn send_all_with<F: AsFd>(
    sock: &F,
    buf: &[u8],
    cmsgs: &[ControlMessage<'_>],
) -> io::Result<()> {
    let fd = sock.as_fd().as_raw_fd();
    let mut rest = if cmsgs.is_empty() {
        buf
    } else {
        let sent = loop {
            match sendmsg::<()>(
                fd,
                &[IoSlice::new(buf)],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => break n,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(errno(e)),
            }
        };
        &buf[sent..]
    };
    while !rest.is_empty() {
        match send(fd, rest, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(())
}

/// One `recvmsg` into `buf` (honouring `SO_RCVTIMEO`), handing every
/// control message received to `take`. Received descriptors are
/// close-on-exec. A truncated control message is an error: whatever did not
/// fit was lost (and, for descriptors, closed by the kernel).
pub(super) fn recv_with<F: AsFd>(
    sock: &F,
    buf: &mut [u8],
    space: &mut [u8],
    mut take: impl FnMut(ControlMessageOwned),
) -> io::Result<usize> {
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(
            sock.as_fd().as_raw_fd(),
            &mut iov,
            Some(space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(errno(e)),
        };
        if let Ok(cmsgs) = msg.cmsgs() {
            cmsgs.for_each(&mut take);
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::other("control message truncated"));
        }
        return Ok(msg.bytes);
    }
}
