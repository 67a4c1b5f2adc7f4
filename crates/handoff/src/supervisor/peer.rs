//! Who is on the other end: the checks that rest on what the kernel vouches
//! for (`SO_PEERCRED` on the control socket, `SCM_CREDENTIALS` on the
//! successor's socketpair), not only on the pid a peer announces
//! (docs/design.md §4.5).
//! Shared by a handoff and by a restarted supervisor re-attaching.

use std::os::unix::net::UnixStream;

use crate::error::{HandoffError, ProtocolError, StopError};
use crate::frame::FrameError;
use crate::phase::Peer;
use crate::protocol::{Hello, Role};
use crate::sys;

/// Checks a Hello against what the kernel vouches for: the right role, the
/// announced pid equal to the kernel's (`kernel_pid`, from `SO_PEERCRED` or
/// `SCM_CREDENTIALS`), and — when we know whom we expect — that process.
pub(crate) fn check_hello(
    hello: &Hello,
    role: Role,
    kernel_pid: Option<u32>,
    expected_pid: Option<u32>,
    phase: &'static str,
) -> Result<(), ProtocolError> {
    let peer = if role == Role::Incumbent {
        Peer::Incumbent
    } else {
        Peer::Successor
    };
    if hello.role != role {
        return Err(ProtocolError::WrongRole {
            phase,
            expected: role,
            found: hello.role,
        });
    }
    if let Some(k) = kernel_pid {
        if k != hello.pid {
            return Err(ProtocolError::PidMismatch {
                peer,
                phase,
                announced: hello.pid,
                kernel: k,
            });
        }
    }
    if let Some(e) = expected_pid {
        let found = kernel_pid.unwrap_or(hello.pid);
        if found != e {
            return Err(ProtocolError::NotExpected {
                peer,
                phase,
                expected: e,
                found,
            });
        }
    }
    Ok(())
}

/// Why [`connect_incumbent_socket`] failed; each caller turns it into its
/// own error type (a handoff's, a stop's).
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// Nobody listens there, or the socket cannot be reached.
    Connect {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Someone listens there, but not a process we may talk to.
    Protocol(ProtocolError),
}

impl From<ProtocolError> for ConnectError {
    fn from(e: ProtocolError) -> Self {
        ConnectError::Protocol(e)
    }
}

impl From<ConnectError> for HandoffError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Connect { path, source } => HandoffError::Connect { path, source },
            ConnectError::Protocol(p) => HandoffError::Protocol(p),
        }
    }
}

impl From<ConnectError> for StopError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Connect { path, source } => StopError::Connect { path, source },
            ConnectError::Protocol(p) => StopError::Protocol(p),
        }
    }
}

/// Connects to the incumbent's control socket and checks with the kernel
/// (`SO_PEERCRED`) that whoever listens there runs as our uid or as root.
/// Returns the stream and those credentials (their pid is checked against
/// the Hello later).
pub(crate) fn connect_incumbent_socket(
    path: &std::path::Path,
    phase: &'static str,
) -> Result<(UnixStream, sys::PeerCred), ConnectError> {
    let stream = UnixStream::connect(path).map_err(|source| ConnectError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let kernel = sys::peer_credentials(&stream)
        .map_err(|e| ProtocolError::frame(Peer::Incumbent, phase, FrameError::Io(e)))?;
    let ours = nix::unistd::geteuid().as_raw();
    if kernel.uid != ours && kernel.uid != 0 {
        return Err(ProtocolError::WrongUid {
            peer: Peer::Incumbent,
            phase,
            uid: kernel.uid,
            ours,
        }
        .into());
    }
    Ok((stream, kernel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{PROTO_MAX, PROTO_MIN};

    fn hello(pid: u32) -> Hello {
        Hello {
            role: Role::Incumbent,
            pid,
            proto_min: PROTO_MIN,
            proto_max: PROTO_MAX,
            build_id: "t".into(),
        }
    }

    /// Each failure names what it compared: the Hello against the kernel,
    /// or the peer against the process the supervisor expected.
    #[test]
    fn a_hello_is_checked_against_the_kernel_then_the_expected_process() {
        assert!(check_hello(&hello(7), Role::Incumbent, Some(7), Some(7), "hello").is_ok());
        match check_hello(&hello(8), Role::Incumbent, Some(7), None, "hello") {
            Err(ProtocolError::PidMismatch {
                announced: 8,
                kernel: 7,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        let e = check_hello(&hello(9), Role::Incumbent, Some(9), Some(7), "hello").unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::NotExpected {
                    expected: 7,
                    found: 9,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("is pid 9, not pid 7"), "{e}");
        // No kernel pid (a platform without SO_PEERCRED's pid): the Hello's.
        assert!(matches!(
            check_hello(&hello(9), Role::Incumbent, None, Some(7), "hello"),
            Err(ProtocolError::NotExpected { found: 9, .. })
        ));
    }
}
