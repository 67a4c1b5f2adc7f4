//! Connecting to a supervisor's admin socket — and believing only one
//! served by our own uid or root.
//!
//! Whoever could write the runtime dir could have put their own
//! `admin.sock` there and answered `committed: pid 1 -> 31337` to an
//! upgrade that never happened; the kernel (`SO_PEERCRED`) says who really
//! listens.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::schema::admin_path;

/// How often [`connect_within`] tries again while the socket is not there.
const RETRY_EVERY: Duration = Duration::from_millis(20);

/// Why no trusted connection to the supervisor was made; each says where
/// it looked and what is probably wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing answers at the socket's path.
    #[error(
        "cannot reach the supervisor at {}: {error}\n  is `handoff run --runtime-dir {}` running?",
        path.display(),
        runtime_dir.display()
    )]
    Unreachable {
        /// The admin socket's path.
        path: PathBuf,
        /// The runtime dir it was derived from.
        runtime_dir: PathBuf,
        /// What `connect` said.
        error: io::Error,
    },
    /// The runtime dir (or the socket) is another user's, and we may not
    /// enter it: the supervisor answers its own uid and root only.
    #[error(
        "cannot reach the supervisor at {}: {error}\n  {} belongs to uid {owner}, and this runs \
         as uid {ours}: run the command as {} — the supervisor answers no one else",
        path.display(),
        runtime_dir.display(),
        run_as(*owner)
    )]
    Forbidden {
        /// The admin socket's path.
        path: PathBuf,
        /// The runtime dir it was derived from.
        runtime_dir: PathBuf,
        /// Who owns the runtime dir.
        owner: u32,
        /// Our own effective uid.
        ours: u32,
        /// What `connect` said.
        error: io::Error,
    },
    /// The socket is served by another user: not our supervisor.
    #[error(
        "refusing to talk to {}: it is served by uid {uid}{}, not by uid {ours} (ours) or root, \
         so it is not our supervisor (another user may have planted it)\n  \
         fix: make {} a directory only its owner can write (`handoff run` creates it mode 0700), \
         remove what is in it and restart `handoff run`",
        path.display(),
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        runtime_dir.display()
    )]
    Foreign {
        /// The admin socket's path.
        path: PathBuf,
        /// The runtime dir it was derived from.
        runtime_dir: PathBuf,
        /// Who serves it.
        uid: u32,
        /// Which process serves it, where the platform says.
        pid: Option<u32>,
        /// Our own effective uid.
        ours: u32,
    },
    /// The kernel would not say who serves it.
    #[error("cannot tell who serves {}: {error}; refusing to trust it", path.display())]
    Unverifiable {
        /// The admin socket's path.
        path: PathBuf,
        /// What `SO_PEERCRED` said.
        error: io::Error,
    },
}

/// Who may talk to a supervisor whose runtime dir `owner` owns.
fn run_as(owner: u32) -> String {
    if owner == 0 {
        "root (e.g. with sudo)".into()
    } else {
        format!("uid {owner} (e.g. `sudo -u '#{owner}' handoff …`) or as root")
    }
}

/// Connects to the supervisor's admin socket in `runtime_dir`.
pub fn connect(runtime_dir: &Path) -> Result<UnixStream, ConnectError> {
    connect_within(runtime_dir, None)
}

/// [`connect`], waiting up to `wait` for a supervisor that is still
/// starting: its admin socket is bound only after its first process is up,
/// and a stateless service answers on its port before that, so a script
/// that starts `handoff run` and waits for the port can be early.
pub fn connect_within(
    runtime_dir: &Path,
    wait: Option<Duration>,
) -> Result<UnixStream, ConnectError> {
    let path = admin_path(runtime_dir);
    let end = wait.map(|w| Instant::now() + w);
    let connected = loop {
        match UnixStream::connect(&path) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && end.is_some_and(|end| Instant::now() < end) =>
            {
                std::thread::sleep(RETRY_EVERY);
            }
            r => break r,
        }
    };
    let stream = match connected {
        Ok(s) => s,
        Err(error) => {
            let ours = nix::unistd::geteuid().as_raw();
            // EACCES where the dir is someone else's: say whose, not "is
            // it running?" (it is; we are the wrong user).
            let owner = std::fs::metadata(runtime_dir)
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
                .filter(|&o| o != ours);
            return Err(match owner {
                Some(owner) if error.kind() == io::ErrorKind::PermissionDenied => {
                    ConnectError::Forbidden {
                        path,
                        runtime_dir: runtime_dir.to_path_buf(),
                        owner,
                        ours,
                        error,
                    }
                }
                _ => ConnectError::Unreachable {
                    path,
                    runtime_dir: runtime_dir.to_path_buf(),
                    error,
                },
            });
        }
    };
    let ours = nix::unistd::geteuid().as_raw();
    match handoff::peer_credentials(&stream) {
        Ok(c) if c.uid == ours || c.uid == 0 => Ok(stream),
        Ok(c) => Err(ConnectError::Foreign {
            path,
            runtime_dir: runtime_dir.to_path_buf(),
            uid: c.uid,
            pid: c.pid,
            ours,
        }),
        Err(error) => Err(ConnectError::Unverifiable { path, error }),
    }
}
