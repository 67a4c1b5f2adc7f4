//! The sending side of systemd's notification protocol (`sd_notify(3)`):
//! how a `Type=notify` service tells its manager it is ready, reloading,
//! stopping or alive.
//!
//! The manager passes `NOTIFY_SOCKET` in the environment: an absolute path
//! (`/run/systemd/notify`) or, with a leading `@`, a Linux abstract-namespace
//! name (the `@` stands for the leading NUL byte of the address). Each
//! notification is **one datagram** of newline-separated `KEY=VALUE`
//! assignments, so assignments sent together are seen together: `READY=1`
//! and the `STATUS=` that explains it arrive atomically. The manager reads at
//! most [`MAX_MESSAGE`] bytes and drops a longer datagram whole.
//!
//! When `NOTIFY_SOCKET` is unset the process is not supervised by a notify
//! socket and every call is a successful no-op, exactly like `sd_notify`.
//!
//! Two details systemd insists on:
//! - `RELOADING=1` must carry `MONOTONIC_USEC=` (the sender's
//!   `CLOCK_MONOTONIC` in µs) in the same datagram for `Type=notify-reload`:
//!   systemd sent the reload signal at some instant and accepts only a
//!   `RELOADING=1` generated after it, or it would mistake a reload that was
//!   already finishing for the answer to its own signal.
//! - The notify socket belongs to the main process. A child that inherits
//!   `NOTIFY_SOCKET` could send `READY=1` or `STOPPING=1` in the main
//!   process's name (systemd attributes by cgroup when `NotifyAccess=all`).
//!   That is why `sd_notify(unset_environment=1)` exists, and why
//!   `spawn` never passes the supervisor's own
//!   `NOTIFY_SOCKET`, `WATCHDOG_USEC` or `WATCHDOG_PID` to a service.
//!
//! Each assignment is spelled by the [`sd-notify`](https://docs.rs/sd-notify)
//! crate (`NotifyState`); this module is the thin layer it lacks for a
//! supervisor and its services:
//! - The address is read **once**, at start, and kept: the crate reads
//!   `NOTIFY_SOCKET` at every call and can hide it from children only by
//!   `std::env::remove_var`, which is unsound once threads exist (a tokio
//!   runtime, our supervisor's threads). We take the variables out of what
//!   children get instead (`spawn`), and the re-exec hands them back.
//! - Abstract-namespace addresses (`@name`), which the crate connects to as
//!   a file path.
//! - A send that cannot block for ever on a wedged manager (1 s), a message
//!   longer than the manager reads refused rather than lost, `STATUS=`
//!   texts made single-line, malformed `WATCHDOG_*` reported rather than
//!   ignored, and errors that name the address and the message.
//!
//! ```
//! use handoff::sd_notify::{Notifier, State};
//! use std::os::unix::net::UnixDatagram;
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("notify.sock");
//! let manager = UnixDatagram::bind(&path)?; // what systemd would hold
//!
//! let n = Notifier::from_address(path.to_str().unwrap())?;
//! n.send(&[State::Ready, State::status("serving pid 42")])?;
//!
//! let mut buf = [0u8; 4096];
//! let len = manager.recv(&mut buf)?;
//! assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving pid 42");
//!
//! // Outside systemd: nothing to talk to, nothing happens.
//! Notifier::disabled().send(&[State::Stopping])?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt::{self, Write as _};
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The variable naming the manager's notify socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The watchdog interval in µs, set when the unit has `WatchdogSec=`.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The pid the watchdog variables are meant for (absent: this process).
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";
/// systemd's receive buffer (`NOTIFY_BUFFER_MAX`, one page): a datagram
/// longer than this is dropped by the manager, so it is refused here.
pub const MAX_MESSAGE: usize = 4096;
/// `STATUS=` texts are cut to this many bytes by [`State::status`], so that
/// a long error message can never push a notification over [`MAX_MESSAGE`].
pub const STATUS_MAX: usize = 1024;
/// How long a send may block on a full manager queue before it fails: a
/// wedged manager must not wedge the process that talks to it.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors reading the notify environment or sending a notification.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` (the value, lossily decoded if it is not UTF-8) is
    /// neither an absolute path nor `@` and an abstract name.
    #[error(
        "NOTIFY_SOCKET={0:?} is neither an absolute path nor an abstract socket name \
         starting with '@' (sd_notify(3)); fix or unset it"
    )]
    BadAddress(String),
    /// `NOTIFY_SOCKET` has the right form but is no usable socket address:
    /// a path too long for one, or an abstract name on a system that has
    /// none.
    #[error("NOTIFY_SOCKET={addr:?} cannot be used as a Unix socket address: {source}")]
    Unaddressable {
        /// The value of `NOTIFY_SOCKET`.
        addr: String,
        /// Why it is not an address.
        #[source]
        source: io::Error,
    },
    /// The datagram socket to send from could not be created or set up.
    #[error("creating the datagram socket for NOTIFY_SOCKET={addr:?}: {source}")]
    Socket {
        /// The value of `NOTIFY_SOCKET`.
        addr: String,
        /// The error from creating or configuring the socket.
        #[source]
        source: io::Error,
    },
    /// The manager did not take the notification: its socket is gone, or
    /// its queue stayed full for the whole send timeout (1 s).
    #[error("sending {what} to the service manager at NOTIFY_SOCKET={addr:?}: {source}")]
    Send {
        /// The value of `NOTIFY_SOCKET`.
        addr: String,
        /// The notification's first assignment, such as `"READY=1"`, and
        /// how many more it had.
        what: String,
        /// The error from sending.
        #[source]
        source: io::Error,
    },
    /// The notification is longer than the manager reads
    /// ([`MAX_MESSAGE`]), so it is not sent.
    #[error("notification {what} is {len} bytes; the service manager reads at most {max}")]
    TooLong {
        /// The notification's first assignment, and how many more it had.
        what: String,
        /// Its length in bytes.
        len: usize,
        /// The most the manager reads, in bytes.
        max: usize,
    },
    /// A value that would corrupt the notification: a `STATUS=` built by
    /// hand with a newline or NUL in it, or an `FDNAME=` systemd would
    /// drop.
    #[error("{key}= value {value:?} {why}")]
    BadValue {
        /// The assignment's key: `STATUS` or `FDNAME`.
        key: &'static str,
        /// The value refused.
        value: String,
        /// What is wrong with it, for the message.
        why: &'static str,
    },
    /// `CLOCK_MONOTONIC` could not be read for `MONOTONIC_USEC=`.
    #[error("reading CLOCK_MONOTONIC for MONOTONIC_USEC: {0}")]
    Clock(#[source] io::Error),
    /// A watchdog variable is set but unusable.
    #[error("{var}={value:?} is not {expected} (sd_watchdog_enabled(3)); fix or unset it")]
    BadWatchdog {
        /// The variable: `WATCHDOG_USEC` or `WATCHDOG_PID`.
        var: &'static str,
        /// Its value.
        value: String,
        /// What it should be, such as "a process id".
        expected: &'static str,
    },
}

/// One assignment of a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// `READY=1`: start-up (or a reload) is complete.
    Ready,
    /// `RELOADING=1` + `MONOTONIC_USEC=`: a reload began at that instant.
    Reloading {
        /// When the reload began: `CLOCK_MONOTONIC` in µs (see
        /// [`monotonic_usec`]).
        monotonic_usec: u64,
    },
    /// `STOPPING=1`: shutting down; the manager stops expecting readiness.
    Stopping,
    /// `STATUS=…`: one line for `systemctl status`. Build it with
    /// [`State::status`], which makes any text safe to send.
    Status(String),
    /// `WATCHDOG=1`: still alive (see [`watchdog_interval`]).
    Watchdog,
}

impl State {
    /// `RELOADING=1` stamped with the current `CLOCK_MONOTONIC`.
    pub fn reloading_now() -> Result<State, NotifyError> {
        let monotonic_usec = monotonic_usec()?;
        Ok(State::Reloading { monotonic_usec })
    }

    /// `STATUS=` with `text` made single-line (control characters become
    /// spaces: a newline would start a new assignment) and cut to
    /// [`STATUS_MAX`] bytes at a character boundary.
    pub fn status(text: impl AsRef<str>) -> State {
        let mut s: String = text
            .as_ref()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if s.len() > STATUS_MAX {
            let mut end = STATUS_MAX - '…'.len_utf8();
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s.push('…');
        }
        State::Status(s)
    }

    /// Appends this state's assignments, as the `sd-notify` crate spells
    /// them, newline-separated.
    fn write(&self, out: &mut String) -> Result<(), NotifyError> {
        use sd_notify::NotifyState as N;
        let (first, second) = match self {
            State::Ready => (N::Ready, None),
            State::Reloading { monotonic_usec } => (
                N::Reloading,
                Some(N::MonotonicUsec(i128::from(*monotonic_usec))),
            ),
            State::Stopping => (N::Stopping, None),
            State::Watchdog => (N::Watchdog, None),
            State::Status(s) => {
                // The crate writes the text as it is; a newline would
                // start an assignment of the caller's choosing.
                if s.contains(['\n', '\0']) {
                    return Err(NotifyError::BadValue {
                        key: "STATUS",
                        value: s.clone(),
                        why: "contains a newline or NUL, which would split the notification",
                    });
                }
                (N::Status(s), None)
            }
        };
        for (i, a) in std::iter::once(first).chain(second).enumerate() {
            if i > 0 {
                out.push('\n');
            }
            // Writing into a String cannot fail.
            let _ = write!(out, "{a}");
        }
        Ok(())
    }
}

/// The datagram payload for `states`, in order, newline-separated.
pub fn encode(states: &[State]) -> Result<String, NotifyError> {
    let mut out = String::new();
    for (i, s) in states.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        s.write(&mut out)?;
    }
    if out.len() > MAX_MESSAGE {
        return Err(NotifyError::TooLong {
            what: describe(&out),
            len: out.len(),
            max: MAX_MESSAGE,
        });
    }
    Ok(out)
}

/// Microseconds on `CLOCK_MONOTONIC`, the clock of `MONOTONIC_USEC=`.
pub fn monotonic_usec() -> Result<u64, NotifyError> {
    crate::sys::clock::monotonic_usec().map_err(NotifyError::Clock)
}

/// A handle on the manager's notify socket, or a no-op when there is none.
///
/// Each [`send`](Notifier::send) is one datagram to the address read at
/// construction; the socket is unbound and close-on-exec, so it is never
/// visible to a child process.
pub struct Notifier {
    target: Option<Target>,
}

struct Target {
    /// As given in `NOTIFY_SOCKET`, for messages.
    shown: String,
    addr: SocketAddr,
    sock: UnixDatagram,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("address", &self.address())
            .finish()
    }
}

impl Notifier {
    /// From `NOTIFY_SOCKET`: disabled when the variable is unset, an error
    /// when it is set to something that is not a notify address. The
    /// variable is left in place; see the module docs for why children
    /// must not see it.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        match std::env::var_os(NOTIFY_SOCKET) {
            None => Ok(Notifier::disabled()),
            Some(v) => match v.to_str() {
                Some(s) => Notifier::from_address(s),
                None => Err(NotifyError::BadAddress(v.to_string_lossy().into_owned())),
            },
        }
    }

    /// From a `NOTIFY_SOCKET` value: `/absolute/path` or `@abstract-name`.
    pub fn from_address(value: &str) -> Result<Notifier, NotifyError> {
        let addr = parse_address(value)?;
        let sock = UnixDatagram::unbound().map_err(|source| NotifyError::Socket {
            addr: value.to_string(),
            source,
        })?;
        sock.set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(|source| NotifyError::Socket {
                addr: value.to_string(),
                source,
            })?;
        Ok(Notifier {
            target: Some(Target {
                shown: value.to_string(),
                addr,
                sock,
            }),
        })
    }

    /// A notifier that sends nothing (not running under a manager).
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The `NOTIFY_SOCKET` value in use, if any.
    pub fn address(&self) -> Option<&str> {
        self.target.as_ref().map(|t| t.shown.as_str())
    }

    /// Sends `states` as one datagram (a no-op when disabled).
    pub fn send(&self, states: &[State]) -> Result<(), NotifyError> {
        let Some(t) = &self.target else {
            return Ok(());
        };
        let msg = encode(states)?;
        t.sock
            .send_to_addr(msg.as_bytes(), &t.addr)
            .map_err(|source| NotifyError::Send {
                addr: t.shown.clone(),
                what: describe(&msg),
                source,
            })?;
        Ok(())
    }

    /// `READY=1`.
    pub fn ready(&self) -> Result<(), NotifyError> {
        self.send(&[State::Ready])
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` of now.
    pub fn reloading(&self) -> Result<(), NotifyError> {
        if !self.is_enabled() {
            return Ok(());
        }
        self.send(&[State::reloading_now()?])
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.send(&[State::Stopping])
    }

    /// `STATUS=text` (made safe by [`State::status`]).
    pub fn status(&self, text: impl AsRef<str>) -> Result<(), NotifyError> {
        self.send(&[State::status(text)])
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.send(&[State::Watchdog])
    }
}

impl Notifier {
    /// `FDSTORE=1` `FDNAME=name` with `fds` attached (`SCM_RIGHTS`): the
    /// manager keeps them (with `FileDescriptorStoreMax=` > 0) and passes
    /// them back through `LISTEN_FDS`/`LISTEN_FDNAMES` when the service is
    /// started again — how a restarted supervisor gets its listening sockets
    /// without binding, even if nothing else still holds them. A no-op
    /// when disabled. `name` follows systemd's rules (≤ 255 printable ASCII
    /// characters, no `:`), or the manager would drop the message.
    pub fn store_fds(
        &self,
        name: &str,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), NotifyError> {
        let Some(t) = &self.target else {
            return Ok(());
        };
        if name.is_empty()
            || name.len() > 255
            || name.contains(':')
            || !name.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(NotifyError::BadValue {
                key: "FDNAME",
                value: name.to_string(),
                why: "is not 1 to 255 printable ASCII characters without ':', so systemd \
                      would drop it (sd_pid_notify_with_fds(3))",
            });
        }
        let msg = format!("FDSTORE=1\nFDNAME={name}");
        let err = |source| NotifyError::Send {
            addr: t.shown.clone(),
            what: describe(&msg),
            source,
        };
        // `sendmsg` with descriptors needs a destination: a socket of its
        // own, connected, so the shared one stays unconnected.
        let sock = UnixDatagram::unbound().map_err(err)?;
        sock.connect_addr(&t.addr).map_err(err)?;
        sock.set_write_timeout(Some(SEND_TIMEOUT)).map_err(err)?;
        crate::sys::fdpass::send_with_fds(&sock, msg.as_bytes(), fds).map_err(err)
    }
}

/// The first assignment of a message, for error texts (a `STATUS=` can be
/// long; the key is what identifies the message).
fn describe(msg: &str) -> String {
    let first = msg.lines().next().unwrap_or("");
    let more = msg.lines().count().saturating_sub(1);
    if more > 0 {
        format!("{first:?} (+{more} more)")
    } else {
        format!("{first:?}")
    }
}

fn parse_address(value: &str) -> Result<SocketAddr, NotifyError> {
    let bad = || NotifyError::BadAddress(value.to_string());
    let unaddressable = |source| NotifyError::Unaddressable {
        addr: value.to_string(),
        source,
    };
    if value.len() < 2 {
        return Err(bad());
    }
    if value.starts_with('/') {
        return SocketAddr::from_pathname(value).map_err(unaddressable);
    }
    if let Some(name) = value.strip_prefix('@') {
        return abstract_address(name.as_bytes()).map_err(unaddressable);
    }
    Err(bad())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_address(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket names exist only on Linux",
    ))
}

/// The watchdog interval systemd expects `WATCHDOG=1` within, from
/// `WATCHDOG_USEC` — or `None` when there is no watchdog, or when
/// `WATCHDOG_PID` names another process (the variables were inherited, and
/// the watchdog is that process's duty). Mirrors `sd_watchdog_enabled(3)`.
/// Send [`State::Watchdog`] at about half the interval.
pub fn watchdog_interval() -> Result<Option<Duration>, NotifyError> {
    watchdog_interval_with(|k| std::env::var(k).ok(), std::process::id())
}

/// [`watchdog_interval`] over an explicit environment lookup and pid.
pub fn watchdog_interval_with(
    env: impl Fn(&str) -> Option<String>,
    pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = env(WATCHDOG_USEC) else {
        return Ok(None);
    };
    let n = match usec.trim().parse::<u64>() {
        Ok(n) if n > 0 && n != u64::MAX => n,
        _ => {
            return Err(NotifyError::BadWatchdog {
                var: WATCHDOG_USEC,
                value: usec,
                expected: "a positive number of microseconds",
            })
        }
    };
    if let Some(p) = env(WATCHDOG_PID) {
        match p.trim().parse::<u32>() {
            Ok(owner) if owner > 0 => {
                if owner != pid {
                    return Ok(None);
                }
            }
            _ => {
                return Err(NotifyError::BadWatchdog {
                    var: WATCHDOG_PID,
                    value: p,
                    expected: "a process id",
                })
            }
        }
    }
    Ok(Some(Duration::from_micros(n)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn recv(s: &UnixDatagram) -> String {
        let mut buf = [0u8; MAX_MESSAGE + 1];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn store_fds_sends_the_descriptors_with_their_name() {
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let manager = UnixDatagram::bind(&path).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let n = Notifier::from_address(path.to_str().unwrap()).unwrap();
        n.store_fds("http", &[l.as_fd()]).unwrap();
        let mut buf = [0u8; 64];
        let (len, fds) = crate::sys::fdpass::recv_with_fds(&manager, &mut buf).unwrap();
        assert_eq!(&buf[..len], b"FDSTORE=1\nFDNAME=http");
        let got = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap(), l.local_addr().unwrap());
        let e = n.store_fds("a:b", &[l.as_fd()]).unwrap_err();
        assert!(
            e.to_string().contains("without ':'") && !e.to_string().contains("newline"),
            "the message says what is wrong with a name: {e}"
        );
    }

    #[test]
    fn encodes_exactly_what_systemd_parses() {
        let m = encode(&[
            State::Reloading {
                monotonic_usec: 123456789,
            },
            State::status("upgrading"),
        ])
        .unwrap();
        assert_eq!(m, "RELOADING=1\nMONOTONIC_USEC=123456789\nSTATUS=upgrading");
        assert_eq!(encode(&[State::Stopping]).unwrap(), "STOPPING=1");
        assert_eq!(encode(&[State::Watchdog]).unwrap(), "WATCHDOG=1");
        assert_eq!(encode(&[State::Ready]).unwrap(), "READY=1");
    }

    #[test]
    fn status_is_made_single_line_and_bounded() {
        assert_eq!(
            State::status("a\nb\r\0c"),
            State::Status("a b  c".to_string())
        );
        let State::Status(long) = State::status("é".repeat(4000)) else {
            unreachable!()
        };
        assert!(
            long.len() <= STATUS_MAX && long.ends_with('…'),
            "{}",
            long.len()
        );
        // A hand-built Status with a newline is refused, not split.
        assert!(matches!(
            encode(&[State::Status("x\nREADY=1".into())]),
            Err(NotifyError::BadValue { .. })
        ));
        let many: Vec<State> = (0..5).map(|_| State::status("x".repeat(1000))).collect();
        assert!(matches!(encode(&many), Err(NotifyError::TooLong { .. })));
    }

    #[test]
    fn addresses_follow_sd_notify() {
        for bad in ["", "@", "/", "relative/path", "vsock:2:1234", "x"] {
            assert!(
                matches!(parse_address(bad), Err(NotifyError::BadAddress(_))),
                "{bad:?}"
            );
        }
        let long = format!("/{}", "a".repeat(200));
        assert!(matches!(
            Notifier::from_address(&long),
            Err(NotifyError::Unaddressable { .. })
        ));
    }

    #[test]
    fn sends_to_a_path_and_reports_a_missing_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_address(path.to_str().unwrap()).unwrap();
        let before = monotonic_usec().unwrap();
        n.reloading().unwrap();
        let after = monotonic_usec().unwrap();
        let m = recv(&rx);
        let usec: u64 = m
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("{m:?}"))
            .parse()
            .unwrap();
        assert!(before <= usec && usec <= after, "{before} {usec} {after}");
        n.status("x").unwrap();
        assert_eq!(recv(&rx), "STATUS=x");
        drop(rx);
        std::fs::remove_file(&path).unwrap();
        let e = n.ready().unwrap_err();
        assert!(matches!(e, NotifyError::Send { .. }), "{e}");
        assert!(e.to_string().contains("\"READY=1\""), "{e}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("handoff-sd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::from_address(&format!("@{name}")).unwrap();
        n.send(&[State::Ready, State::status("up")]).unwrap();
        assert_eq!(recv(&rx), "READY=1\nSTATUS=up");
    }

    #[test]
    fn disabled_is_a_no_op() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready().unwrap();
        n.reloading().unwrap();
        n.watchdog().unwrap();
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn watchdog_follows_sd_watchdog_enabled() {
        let w = |pairs: &[(&str, &str)]| watchdog_interval_with(env(pairs), 77);
        assert_eq!(w(&[]).unwrap(), None);
        assert_eq!(
            w(&[("WATCHDOG_USEC", "500000")]).unwrap(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            w(&[("WATCHDOG_USEC", "500000"), ("WATCHDOG_PID", "77")]).unwrap(),
            Some(Duration::from_millis(500))
        );
        // Meant for another process: not ours to pet.
        assert_eq!(
            w(&[("WATCHDOG_USEC", "500000"), ("WATCHDOG_PID", "78")]).unwrap(),
            None
        );
        for bad in ["0", "x", "-1", "18446744073709551615"] {
            assert!(w(&[("WATCHDOG_USEC", bad)]).is_err(), "{bad}");
        }
        assert!(w(&[("WATCHDOG_USEC", "1"), ("WATCHDOG_PID", "me")]).is_err());
    }
}
