//! The socket a direct move (protocol version 4) goes on, as each end
//! receives it from the supervisor.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use crate::channel::Channel;
use crate::protocol::MOVE_DIRECT_SINCE;

/// Takes the descriptors attached to PrepareHandoffV4 or MoveChannel as the
/// move socket: exactly one, a Unix stream socket made by a process of our
/// own user or root — the supervisor, which sent it on a control
/// connection already authenticated; the check keeps a confused or hostile
/// sender from making us talk to anything else. The error says why not.
///
/// Its frames are always of version 4, the version that made it, whatever
/// each end's control connection negotiated: the incumbent and the
/// successor negotiated with the supervisor separately, and a build at 5
/// hands over to one at 4 (or back) on the same socket.
pub(crate) fn open(mut fds: Vec<OwnedFd>) -> Result<Channel, String> {
    let count = fds.len();
    let (Some(fd), 1) = (fds.pop(), count) else {
        return Err(format!("expected one descriptor attached, got {count}"));
    };
    let ours = nix::unistd::geteuid().as_raw();
    match crate::sys::peer_credentials(&fd) {
        Ok(c) if c.uid == ours || c.uid == 0 => {}
        Ok(c) => {
            return Err(format!(
                "the attached socket was made by uid {}, not ours ({ours})",
                c.uid
            ))
        }
        Err(e) => {
            return Err(format!(
                "the attached descriptor is not a Unix socket we can identify the peer of: {e}"
            ))
        }
    }
    let mut chan = Channel::new(UnixStream::from(fd));
    chan.set_version(MOVE_DIRECT_SINCE);
    Ok(chan)
}
