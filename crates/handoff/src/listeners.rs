//! Listening sockets passed by systemd's convention: `LISTEN_FDS=n`,
//! `LISTEN_FDNAMES=a:b:…`, `LISTEN_PID=<pid>`, fds 3 … 3+n-1.
//!
//! `LISTEN_PID` must be the receiving process's own pid: a variable inherited
//! by a grandchild (which did not get the fds) must not make it believe it
//! owns fds 3… . Taking the fds marks them close-on-exec so they do not leak
//! into the service's own children.

use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};

/// First passed fd, by convention.
pub const LISTEN_FDS_START: RawFd = 3;

/// A named listening socket.
#[derive(Debug)]
pub struct Listener {
    /// Its name from `LISTEN_FDNAMES` (`unknown` when no names were
    /// passed): how the service tells its sockets apart.
    pub name: String,
    /// The listening socket, owned by this process and close-on-exec.
    pub fd: OwnedFd,
}

impl Listener {
    /// As a std TCP listener (the fd must be a TCP socket).
    pub fn into_tcp(self) -> TcpListener {
        TcpListener::from(self.fd)
    }

    /// As a std Unix listener.
    pub fn into_unix(self) -> UnixListener {
        UnixListener::from(self.fd)
    }
}

/// Errors reading passed listeners.
#[derive(Debug, thiserror::Error)]
pub enum ListenFdsError {
    /// `LISTEN_FDS` is set to something that is not a number (the value).
    #[error("LISTEN_FDS={0:?} is not a number")]
    BadCount(String),
    /// `LISTEN_PID` is unset or names another process: the variables were
    /// inherited from the process the descriptors were passed to, so they
    /// are not this process's to take.
    #[error(
        "LISTEN_PID={found} is not this process ({ours}): the fds were meant for another process"
    )]
    WrongPid {
        /// The value of `LISTEN_PID`.
        found: String,
        /// This process's pid.
        ours: u32,
    },
    /// `LISTEN_FDS` is set but `LISTEN_PID` is not: systemd always sets
    /// both, so the descriptors cannot be known to be this process's.
    #[error(
        "LISTEN_FDS is set but LISTEN_PID is not (this process is {ours}): systemd sets both; \
         the fds may have been meant for another process"
    )]
    NoPid {
        /// This process's pid.
        ours: u32,
    },
    /// `LISTEN_FDNAMES` does not have one name per descriptor.
    #[error("LISTEN_FDNAMES has {names} names for {fds} fds")]
    NameCount {
        /// Names in `LISTEN_FDNAMES`.
        names: usize,
        /// Descriptors `LISTEN_FDS` announces.
        fds: usize,
    },
    /// A descriptor `LISTEN_FDS` announces is not open in this process, or
    /// could not be made close-on-exec.
    #[error("fd {fd} from LISTEN_FDS is not open: {source}")]
    NotOpen {
        /// The descriptor number.
        fd: RawFd,
        /// The error from checking it or setting close-on-exec.
        source: std::io::Error,
    },
    /// The passed descriptors were already taken once in this process:
    /// taking them again would give the same sockets two owners.
    #[error("passed fds were already taken by this process")]
    AlreadyTaken,
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Reads what `LISTEN_*` describe from an environment lookup, and (when
/// `take` is set) takes ownership of fds `3…`. Returns an empty list when no
/// fds were passed to this process.
pub fn from_env_with<F: Fn(&str) -> Option<String>>(
    env: F,
    pid: u32,
    take: bool,
) -> Result<Vec<(String, RawFd)>, ListenFdsError> {
    let Some(count) = env("LISTEN_FDS") else {
        return Ok(vec![]);
    };
    let n: usize = count
        .trim()
        .parse()
        .map_err(|_| ListenFdsError::BadCount(count.clone()))?;
    match env("LISTEN_PID") {
        Some(p) if p.trim().parse::<u32>().ok() == Some(pid) => {}
        Some(p) => {
            return Err(ListenFdsError::WrongPid {
                found: p,
                ours: pid,
            })
        }
        // systemd requires LISTEN_PID; without it the fds are not ours.
        None => return Err(ListenFdsError::NoPid { ours: pid }),
    }
    let names: Vec<String> = match env("LISTEN_FDNAMES") {
        Some(s) if !s.is_empty() => s.split(':').map(str::to_string).collect(),
        _ => vec!["unknown".to_string(); n],
    };
    if names.len() != n {
        return Err(ListenFdsError::NameCount {
            names: names.len(),
            fds: n,
        });
    }
    if take && TAKEN.swap(true, Ordering::SeqCst) {
        return Err(ListenFdsError::AlreadyTaken);
    }
    Ok(names
        .into_iter()
        .enumerate()
        .map(|(i, name)| (name, LISTEN_FDS_START + i as RawFd))
        .collect())
}

/// Takes the listeners passed to this process (empty if none were).
pub fn take_from_env() -> Result<Vec<Listener>, ListenFdsError> {
    let list = from_env_with(|k| std::env::var(k).ok(), std::process::id(), true)?;
    list.into_iter()
        .map(|(name, fd)| {
            let fd = take_fd(fd)?;
            Ok(Listener { name, fd })
        })
        .collect()
}

/// Takes ownership of an inherited fd after checking it is open, and marks
/// it close-on-exec.
/// Takes ownership of descriptor `fd`, inherited across `exec` by
/// agreement (a supervisor re-executing itself names the ones it keeps):
/// checked to be open, made close-on-exec again.
pub fn take_inherited(fd: RawFd) -> Result<OwnedFd, ListenFdsError> {
    take_fd(fd)
}

pub(crate) fn take_fd(fd: RawFd) -> Result<OwnedFd, ListenFdsError> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // SAFETY-free check first: F_GETFD on a borrowed raw number.
    let borrowed = crate::sys::fd::borrow_raw_checked(fd)
        .map_err(|source| ListenFdsError::NotOpen { fd, source })?;
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| {
        ListenFdsError::NotOpen {
            fd,
            source: std::io::Error::from_raw_os_error(e as i32),
        }
    })?;
    let owned = crate::sys::exec::own(fd);
    debug_assert_eq!(owned.as_raw_fd(), fd);
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn parses_names_and_fds() {
        let e = env(&[
            ("LISTEN_FDS", "2"),
            ("LISTEN_PID", "77"),
            ("LISTEN_FDNAMES", "http:admin"),
        ]);
        let l = from_env_with(e, 77, false).unwrap();
        assert_eq!(l, vec![("http".into(), 3), ("admin".into(), 4)]);
    }

    #[test]
    fn wrong_or_missing_pid_is_refused() {
        let e = env(&[("LISTEN_FDS", "1"), ("LISTEN_PID", "78")]);
        assert!(matches!(
            from_env_with(e, 77, false),
            Err(ListenFdsError::WrongPid { .. })
        ));
        let e = env(&[("LISTEN_FDS", "1")]);
        let err = from_env_with(e, 77, false).unwrap_err();
        assert!(matches!(err, ListenFdsError::NoPid { ours: 77 }), "{err}");
        assert!(err.to_string().contains("LISTEN_PID is not"), "{err}");
    }

    #[test]
    fn nothing_passed_is_empty() {
        assert!(from_env_with(env(&[]), 1, false).unwrap().is_empty());
    }

    #[test]
    fn bad_count_and_name_mismatch() {
        let e = env(&[("LISTEN_FDS", "x"), ("LISTEN_PID", "1")]);
        assert!(matches!(
            from_env_with(e, 1, false),
            Err(ListenFdsError::BadCount(_))
        ));
        let e = env(&[
            ("LISTEN_FDS", "2"),
            ("LISTEN_PID", "1"),
            ("LISTEN_FDNAMES", "a"),
        ]);
        assert!(matches!(
            from_env_with(e, 1, false),
            Err(ListenFdsError::NameCount { .. })
        ));
    }
}
