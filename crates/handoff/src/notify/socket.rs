//! The receiving end of `NOTIFY_SOCKET`: a `SOCK_DGRAM` Unix socket the
//! supervisor binds, one per spawned child, read by one thread that keeps
//! what that child has announced.
//!
//! **Why one socket per child.** The child's pid is known only once it has
//! been spawned, and a quick child may send `READY=1` before the spawn call
//! returns. With the socket bound *before* the spawn and read only *after*
//! it ([`NotifySocket::watch`]), early datagrams simply wait in the kernel
//! queue until we know whose they may be: nothing is lost, nothing needs a
//! replay buffer keyed on a pid that might have been recycled.
//!
//! **Who counts.** `SO_PASSCRED` makes the kernel attach the sender's pid to
//! every datagram, and an unprivileged sender cannot forge it. A datagram
//! counts only if that pid is the watched child's — a process this
//! supervisor spawned itself. Anything else (a grandchild, a stranger that
//! found the socket, a test poking at it) is logged and dropped, so a stray
//! `READY=1` can never commit an upgrade.
//!
//! **`MAINPID=`** is recorded only when it names the sender itself. A child
//! cannot hand its role to another pid: the supervisor signals and reaps
//! only processes it spawned (signalling a pid that is not our child races
//! with pid reuse, and reaping it is impossible). A program that forks its
//! real server and exits is therefore not supported in notify mode — run it
//! in the foreground.
//!
//! Datagrams longer than [`MAX_DATAGRAM`], with
//! truncated control data, or carrying descriptors (`FDSTORE=1` is not
//! supported; the descriptors are closed at once) are logged and dropped.
//! Linux only: elsewhere there are no per-datagram credentials, so every
//! datagram is dropped.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::message::{NotifyMessage, MAX_DATAGRAM};
use super::NotifyError;
use crate::sys::dgram::recv_datagram;

/// What the watched child has announced so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Announced {
    /// It sent `READY=1` (at least once). Stays set.
    pub ready: bool,
    /// It sent `STOPPING=1`: it is shutting down. Stays set; before
    /// `ready`, it fails the upgrade.
    pub stopping: bool,
    /// It sent `RELOADING=1` and no `READY=1` since.
    pub reloading: bool,
    /// The last `STATUS=` text it sent.
    pub status: Option<String>,
    /// The last `ERRNO=` it sent.
    pub errno: Option<i32>,
    /// Set only when equal to the child's own pid (see the module docs).
    pub main_pid: Option<u32>,
    /// How many `WATCHDOG=1` pings it sent (counted only: no watchdog is
    /// enforced).
    pub watchdog_pings: u64,
}

#[derive(Debug, Default)]
struct Inner {
    announced: Mutex<Announced>,
    cv: Condvar,
    stop: AtomicBool,
    rejected: AtomicU64,
}

impl Inner {
    fn announced(&self) -> MutexGuard<'_, Announced> {
        self.announced.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How often the reader thread looks at the stop flag, and how often a
/// waiter re-checks its own give-up condition (e.g. "the child exited").
const TICK: Duration = Duration::from_millis(50);

/// A bound notify socket nobody reads yet: give its [`path`](Self::path)
/// to the child as `NOTIFY_SOCKET`, spawn, then [`watch`](Self::watch).
///
/// # Example
///
/// ```no_run
/// use handoff::notify::NotifySocket;
/// use std::time::Duration;
///
/// let sock = NotifySocket::bind("/run/svc/notify-1.sock")?;
/// // spawn the child with NOTIFY_SOCKET=/run/svc/notify-1.sock, then:
/// # let child_pid = 1234;
/// let watched = sock.watch(child_pid)?;
/// let got = watched.wait(Duration::from_secs(10), |a| a.ready, || false);
/// println!("ready: {}", got.is_some());
/// # Ok::<(), handoff::notify::NotifyError>(())
/// ```
#[derive(Debug)]
pub struct NotifySocket {
    file: SocketFile,
    sock: UnixDatagram,
}

/// Removes the socket file when dropped.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl NotifySocket {
    /// Binds `path`, removing a stale socket file first (the caller owns the
    /// directory: it holds the lock that makes it its only supervisor).
    pub fn bind(path: impl AsRef<Path>) -> Result<NotifySocket, NotifyError> {
        let path = path.as_ref().to_path_buf();
        let err = |source| NotifyError::Socket {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let sock = UnixDatagram::bind(&path).map_err(err)?;
        let file = SocketFile(path.clone());
        crate::sys::creds::enable_passcred(&sock).map_err(err)?;
        sock.set_read_timeout(Some(TICK)).map_err(err)?;
        Ok(NotifySocket { file, sock })
    }

    /// The path to put in the child's `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.file.0
    }

    /// Starts reading, counting only datagrams whose kernel-attested sender
    /// is `pid`. Datagrams queued since the bind are read now.
    pub fn watch(self, pid: u32) -> Result<Watched, NotifyError> {
        let NotifySocket { file, sock } = self;
        let inner = Arc::new(Inner::default());
        let reader = inner.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("notify-{pid}"))
            .spawn(move || read_loop(sock, pid, reader));
        match spawned {
            Ok(_) => Ok(Watched { file, pid, inner }),
            Err(source) => Err(NotifyError::Socket {
                path: file.0.clone(),
                source,
            }),
        }
    }
}

/// A notify socket being read for one child. Dropping it stops the reader
/// (within 50 ms) and removes the socket file.
#[derive(Debug)]
pub struct Watched {
    file: SocketFile,
    pid: u32,
    inner: Arc<Inner>,
}

impl Watched {
    /// The socket's path, the child's `NOTIFY_SOCKET` (removed on drop).
    pub fn path(&self) -> &Path {
        &self.file.0
    }

    /// The child whose datagrams count: the only sender accepted.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the child has announced so far.
    pub fn announced(&self) -> Announced {
        self.inner.announced().clone()
    }

    /// Datagrams dropped so far (another sender, descriptors, too long…).
    pub fn rejected(&self) -> u64 {
        self.inner.rejected.load(Ordering::Relaxed)
    }

    /// Waits up to `limit` until `done` holds for what the child announced,
    /// or `give_up` returns true (checked every 50 ms, e.g. "the child
    /// exited"). Returns the announcement that satisfied `done`, or `None`.
    pub fn wait(
        &self,
        limit: Duration,
        done: impl Fn(&Announced) -> bool,
        give_up: impl Fn() -> bool,
    ) -> Option<Announced> {
        let deadline = Instant::now() + limit;
        let mut a = self.inner.announced();
        loop {
            if done(&a) {
                return Some(a.clone());
            }
            let now = Instant::now();
            if now >= deadline || give_up() {
                return None;
            }
            a = self
                .inner
                .cv
                .wait_timeout(a, (deadline - now).min(TICK))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // The file goes with `self.file`; the reader sees the flag within
        // one tick and drops the socket.
        self.inner.stop.store(true, Ordering::SeqCst);
    }
}

fn read_loop(sock: UnixDatagram, child: u32, inner: Arc<Inner>) {
    // One byte more than the limit, so an over-long datagram shows up as
    // truncated instead of passing at exactly the limit.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    while !inner.stop.load(Ordering::SeqCst) {
        let d = match recv_datagram(&sock, &mut buf) {
            Ok(d) => d,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(target: "handoff::notify", child, error = %e, "reading the notify socket failed");
                std::thread::sleep(TICK);
                continue;
            }
        };
        let pid = d.sender.and_then(|c| c.pid);
        let reject = |why: &str| {
            inner.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "handoff::notify", child, sender_pid = ?pid, "dropped a notify datagram: {why}");
        };
        if d.fds_closed > 0 {
            reject(&format!(
                "it carried {} file descriptor(s), closed unread (FDSTORE is not supported)",
                d.fds_closed
            ));
            continue;
        }
        if d.truncated || d.len > MAX_DATAGRAM || d.control_truncated {
            reject(&format!(
                "longer than {MAX_DATAGRAM} bytes or with truncated control data"
            ));
            continue;
        }
        match pid {
            None => reject("the kernel attached no sender credentials"),
            Some(p) if p != child => {
                reject("the sender is not the process this supervisor spawned")
            }
            Some(_) => {
                apply(
                    child,
                    &mut inner.announced(),
                    NotifyMessage::parse(&buf[..d.len]),
                );
                inner.cv.notify_all();
            }
        }
    }
}

fn apply(pid: u32, a: &mut Announced, m: NotifyMessage) {
    tracing::debug!(target: "handoff::notify", pid, ?m, "notify datagram");
    if m.ready {
        a.ready = true;
        a.reloading = false;
    }
    if m.reloading {
        a.reloading = true;
    }
    if m.stopping {
        a.stopping = true;
    }
    if m.watchdog {
        a.watchdog_pings += 1;
    }
    if m.status.is_some() {
        a.status = m.status;
    }
    if m.errno.is_some() {
        a.errno = m.errno;
    }
    match m.main_pid {
        Some(p) if p == pid => a.main_pid = Some(p),
        Some(p) => tracing::warn!(
            target: "handoff::notify",
            pid,
            claimed = p,
            "ignoring MAINPID= naming another process: only processes the supervisor spawned are signalled and reaped"
        ),
        None => {}
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn early_datagrams_wait_and_only_the_child_counts() {
        let dir = tempfile::tempdir().unwrap();
        let sock = NotifySocket::bind(dir.path().join("n.sock")).unwrap();
        let path = sock.path().to_path_buf();
        let tx = UnixDatagram::unbound().unwrap();
        // Sent before anyone reads (as a quick child would): kept.
        tx.send_to(b"STATUS=warming up\nMAINPID=1", &path).unwrap();
        tx.send_to(b"READY=1", &path).unwrap();
        let w = sock.watch(std::process::id()).unwrap();
        let a = w
            .wait(Duration::from_secs(5), |a| a.ready, || false)
            .expect("READY=1 from the watched pid counts");
        assert_eq!(a.status.as_deref(), Some("warming up"));
        assert_eq!(a.main_pid, None, "MAINPID of another process is ignored");
        assert_eq!(w.rejected(), 0);
        drop(w);
        assert!(!path.exists(), "the socket file goes with the watcher");
    }

    #[test]
    fn other_senders_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let sock = NotifySocket::bind(dir.path().join("n.sock")).unwrap();
        let w = sock.watch(1).unwrap();
        let tx = UnixDatagram::unbound().unwrap();
        tx.send_to(b"READY=1", w.path()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.rejected() == 0 {
            assert!(Instant::now() < deadline, "datagram never rejected");
            std::thread::yield_now();
        }
        assert!(!w.announced().ready);
        let t = Instant::now();
        assert!(w
            .wait(Duration::from_secs(30), |a| a.ready, || true)
            .is_none());
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(w
            .wait(Duration::from_millis(100), |a| a.ready, || false)
            .is_none());
    }
}
