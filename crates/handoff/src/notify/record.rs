//! The notify-mode record: which process serves, so that a supervisor
//! restarted after a crash can take it back instead of starting a second
//! one (which could not even bind: the orphan still holds the ports).
//!
//! Library mode needs no such file: its incumbent answers on the control
//! socket and hands the listeners back itself. A notify-mode program knows
//! nothing of handoff, so the supervisor writes down, in the state dir:
//! the serving process's pid **and kernel start time** (a pid alone may
//! have been recycled by the time anyone reads it: the start time is what
//! makes "this is still our process" checkable), the listener names and
//! addresses, and the notify socket path it was given. A process spawned
//! for an upgrade but not yet ready is recorded as `pending`: after a
//! crash it is killed (it would otherwise serve alongside the incumbent).
//!
//! Written atomically (temp file, fsync, rename, fsync the directory), so a
//! crash leaves the previous record or the new one; removed on a clean stop.
//!
//! A restarted supervisor gets the sockets back with `pidfd_getfd(2)` on
//! the orphan's fds 3…3+n-1 (where it was given them, `LISTEN_FDS` style),
//! checking each is a listening socket with the recorded address.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::listeners::Listener;
use crate::sys::pidfd;

/// File name of the record inside the state dir.
pub const RECORD_FILE: &str = "notify-incumbent.json";

/// A process, identified so a recycled pid never matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    /// The process id, which alone may have been recycled.
    pub pid: u32,
    /// Kernel start time in clock ticks since boot (`/proc/<pid>/stat`
    /// field 22).
    pub start_ticks: u64,
}

impl ProcId {
    /// `pid` as it is now, if it runs.
    pub fn of(pid: u32) -> Option<ProcId> {
        let st = crate::procinfo::stat(pid).filter(|s| !s.is_dead())?;
        Some(ProcId {
            pid,
            start_ticks: st.start_ticks,
        })
    }

    /// Still running, and still the same process (not a recycled pid).
    pub fn is_live(&self) -> bool {
        ProcId::of(self.pid).is_some_and(|now| now == *self)
    }
}

/// One listener as the serving process was given it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedListener {
    /// The listener's name, as the supervisor passed it in
    /// `LISTEN_FDNAMES`.
    pub name: String,
    /// `tcp://HOST:PORT` or `unix:PATH` (the bound address).
    pub addr: String,
}

/// What the state dir says about the service (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyRecord {
    /// The ready, serving process (`None` before the first one is ready).
    pub incumbent: Option<ProcId>,
    /// Its `NOTIFY_SOCKET` path.
    pub notify_socket: Option<PathBuf>,
    /// Spawned, not ready yet.
    pub pending: Option<ProcId>,
    /// In the order they were passed (fd 3, 4, …).
    pub listeners: Vec<RecordedListener>,
}

/// Errors of the record and of taking an orphan back.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Replacing or removing the record failed: the state dir is full,
    /// read-only or gone. ([`NotifySupervisor`](super::NotifySupervisor)
    /// only logs it: it costs the recovery after a crash, never the
    /// service.)
    #[error("writing the notify-mode record {path}: {source}")]
    Write {
        /// The record's path.
        path: PathBuf,
        /// The failed operation's error.
        source: io::Error,
    },
    /// The record exists but could not be read.
    #[error("reading the notify-mode record {path}: {source}")]
    Read {
        /// The record's path.
        path: PathBuf,
        /// The read's error.
        source: io::Error,
    },
    /// The record does not parse (every write replaces it whole, so a crash
    /// cannot tear it). Delete it once no process from a previous
    /// supervisor still serves.
    #[error("the notify-mode record {path} is corrupt ({source}); if no process from a previous supervisor still serves, delete it")]
    Corrupt {
        /// The record's path.
        path: PathBuf,
        /// Why it does not parse.
        source: serde_json::Error,
    },
    /// The orphan was started with other listeners than this supervisor
    /// is configured with ([`Orphan::check_names`]), so it is not taken
    /// over.
    #[error("pid {pid} (left by a supervisor that exited) still serves with listeners {recorded:?}, but the listeners now are {wanted:?}; restart with the same --listen list to take it over, or stop pid {pid} first")]
    Names {
        /// The orphan's pid.
        pid: u32,
        /// The listener names the record lists, in fd order.
        recorded: Vec<String>,
        /// The listener names this supervisor has, in order.
        wanted: Vec<String>,
    },
    /// A listener could not be copied out of the orphan
    /// ([`Orphan::fetch_listener`]): `pidfd_getfd` was refused (ptrace
    /// rules, an old kernel), the orphan exited or closed the descriptor,
    /// or it is not a socket listening on the recorded address.
    #[error("pid {pid} (left by a supervisor that exited) still serves, but its listener {name:?} (fd {fd}) could not be taken over: {why}. Stop pid {pid} (kill {pid}) and start again, or run under systemd with FileDescriptorStoreMax= so systemd's fd store keeps the sockets")]
    Fetch {
        /// The orphan's pid.
        pid: u32,
        /// The listener's recorded name (`#<index>` past the record's end).
        name: String,
        /// The descriptor number in the orphan (`3 + index`).
        fd: i32,
        /// What went wrong, with what an operator can do about it.
        why: String,
    },
}

/// Reads and writes [`RECORD_FILE`] in one directory.
///
/// # Example
///
/// ```no_run
/// use handoff::notify::{NotifyRecord, RecordStore};
///
/// let store = RecordStore::new("/var/lib/web");
/// if let Some(orphan) = store.find_orphan()? {
///     let listener = orphan.fetch_listener(0)?; // a copy of its fd 3
///     println!("pid {} still serves {}", orphan.pid(), listener.name);
/// }
/// # Ok::<(), handoff::notify::RecordError>(())
/// ```
#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
    path: PathBuf,
}

impl RecordStore {
    /// The record in `dir` (the service's state dir). Touches nothing on
    /// disk.
    pub fn new(dir: impl Into<PathBuf>) -> RecordStore {
        let dir = dir.into();
        RecordStore {
            path: dir.join(RECORD_FILE),
            dir,
        }
    }

    /// Where the record file is (whether it exists or not).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Atomically replaces the record.
    pub fn write(&self, record: &NotifyRecord) -> Result<(), RecordError> {
        let err = |source| RecordError::Write {
            path: self.path.clone(),
            source,
        };
        crate::journal::write_json_atomic(&self.dir, &self.path, record).map_err(err)
    }

    /// The record, `None` when there is none.
    pub fn read(&self) -> Result<Option<NotifyRecord>, RecordError> {
        match fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| RecordError::Corrupt {
                    path: self.path.clone(),
                    source,
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RecordError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Removes the record (durably): nothing serves.
    pub fn clear(&self) -> Result<(), RecordError> {
        let err = |source| RecordError::Write {
            path: self.path.clone(),
            source,
        };
        match fs::remove_file(&self.path) {
            Ok(()) => crate::journal::sync_dir(&self.dir).map_err(err),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    /// Looks for a process a previous supervisor left serving.
    ///
    /// A `pending` process that still runs is killed first (with a pidfd,
    /// so a recycled pid is never hit): it was never ready, and left alone
    /// it would serve next to the incumbent. A record whose incumbent is
    /// gone — exited, or its pid now belongs to another process (start time
    /// differs) — is stale: removed, and `None` returned.
    pub fn find_orphan(&self) -> Result<Option<Orphan>, RecordError> {
        let Some(rec) = self.read()? else {
            return Ok(None);
        };
        if let Some(p) = rec.pending {
            kill_if_live(p);
        }
        let Some(inc) = rec.incumbent else {
            self.clear()?;
            return Ok(None);
        };
        // Open first, check second: if the recorded process still holds the
        // pid after the pidfd exists, the pidfd is that process (it started
        // before the open, so no newer process can have had the pid then).
        let pidfd = pidfd::open(inc.pid).ok();
        if !inc.is_live() {
            tracing::info!(target: "handoff::notify", pid = inc.pid, "the recorded process is gone; starting afresh");
            self.clear()?;
            return Ok(None);
        }
        Ok(Some(Orphan {
            id: inc,
            pidfd,
            record: rec,
        }))
    }
}

/// SIGKILL through a pidfd, if `p` is still that process.
fn kill_if_live(p: ProcId) {
    let Ok(fd) = pidfd::open(p.pid) else { return };
    if p.is_live() {
        tracing::warn!(target: "handoff::notify", pid = p.pid, "killing a process spawned for an interrupted upgrade");
        let _ = pidfd::send_signal(fd.as_fd(), nix::sys::signal::Signal::SIGKILL);
    }
}

/// A live process a previous supervisor left serving.
#[derive(Debug)]
pub struct Orphan {
    id: ProcId,
    /// `None` if `pidfd_open` failed (then every fetch fails with why).
    pidfd: Option<OwnedFd>,
    record: NotifyRecord,
}

impl Orphan {
    /// The orphan's pid, checked against its start time when it was found.
    pub fn pid(&self) -> u32 {
        self.id.pid
    }

    /// The record it was found by: its listeners and notify socket.
    pub fn record(&self) -> &NotifyRecord {
        &self.record
    }

    /// The recorded listener names, in order.
    pub fn names(&self) -> Vec<String> {
        self.record
            .listeners
            .iter()
            .map(|l| l.name.clone())
            .collect()
    }

    /// Refuses to take the orphan over with a different listener list.
    pub fn check_names(&self, wanted: &[String]) -> Result<(), RecordError> {
        let recorded = self.names();
        if recorded != wanted {
            return Err(RecordError::Names {
                pid: self.pid(),
                recorded,
                wanted: wanted.to_vec(),
            });
        }
        Ok(())
    }

    /// A copy of listener `index` (the orphan's fd `3 + index`), checked to
    /// be a listening socket bound to the recorded address.
    pub fn fetch_listener(&self, index: usize) -> Result<Listener, RecordError> {
        let pid = self.pid();
        let fd = 3 + index as i32;
        let Some(rec) = self.record.listeners.get(index) else {
            return Err(RecordError::Fetch {
                pid,
                name: format!("#{index}"),
                fd,
                why: format!("the record lists {} listeners", self.record.listeners.len()),
            });
        };
        let fail = |why: String| RecordError::Fetch {
            pid,
            name: rec.name.clone(),
            fd,
            why,
        };
        let pidfd = match &self.pidfd {
            Some(p) => p,
            None => return Err(fail(explain(pidfd::open(pid).err(), "pidfd_open"))),
        };
        let got =
            pidfd::getfd(pidfd.as_fd(), fd).map_err(|e| fail(explain(Some(e), "pidfd_getfd")))?;
        let listening = nix::sys::socket::getsockopt(&got, nix::sys::socket::sockopt::AcceptConn)
            .unwrap_or(false);
        let actual = describe_fd(got.as_fd());
        if !listening || actual.as_deref() != Some(rec.addr.as_str()) {
            return Err(fail(format!(
                "its fd {fd} is {} (listening: {listening}), not the recorded {}",
                actual.as_deref().unwrap_or("not a socket"),
                rec.addr
            )));
        }
        Ok(Listener {
            name: rec.name.clone(),
            fd: got,
        })
    }

    /// The `NOTIFY_SOCKET` path the orphan was given.
    pub fn notify_socket(&self) -> Option<&Path> {
        self.record.notify_socket.as_deref()
    }
}

/// The bound address of a socket as `tcp://HOST:PORT` or `unix:PATH`, the
/// way the supervisor shows and records listeners.
pub fn describe_fd(fd: std::os::fd::BorrowedFd<'_>) -> Option<String> {
    // std parses the address by family: only one of the two can succeed,
    // and each works on (and closes) its own duplicate.
    if let Ok(a) = std::net::TcpListener::from(fd.try_clone_to_owned().ok()?).local_addr() {
        return Some(format!("tcp://{a}"));
    }
    let u = std::os::unix::net::UnixListener::from(fd.try_clone_to_owned().ok()?);
    let a = u.local_addr().ok()?;
    Some(format!("unix:{}", a.as_pathname()?.display()))
}

/// Why a pidfd call failed, with what an operator can do about it.
fn explain(e: Option<io::Error>, call: &str) -> String {
    let Some(e) = e else {
        return format!("{call} failed");
    };
    match e.raw_os_error() {
        Some(libc::EPERM) => format!(
            "{call}: EPERM: ptrace restrictions forbid copying its descriptors (run as root, \
             or as its user with /proc/sys/kernel/yama/ptrace_scope 0)"
        ),
        Some(libc::ENOSYS) => format!("{call}: ENOSYS: the kernel is older than Linux 5.6"),
        Some(libc::ESRCH) => format!("{call}: it exited meanwhile"),
        Some(libc::EBADF) => format!("{call}: it has closed that descriptor"),
        _ => format!("{call}: {e}"),
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn rec(incumbent: Option<ProcId>) -> NotifyRecord {
        NotifyRecord {
            incumbent,
            notify_socket: None,
            pending: None,
            listeners: vec![RecordedListener {
                name: "http".into(),
                addr: "tcp://127.0.0.1:1".into(),
            }],
        }
    }

    #[test]
    fn written_atomically_read_back_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        assert!(store.read().unwrap().is_none());
        let r = rec(ProcId::of(std::process::id()));
        store.write(&r).unwrap();
        assert_eq!(store.read().unwrap(), Some(r));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [RECORD_FILE], "no temp file left behind");
        store.clear().unwrap();
        store.clear().unwrap();
        assert!(store.read().unwrap().is_none());
        std::fs::write(store.path(), "{").unwrap();
        assert!(matches!(store.read(), Err(RecordError::Corrupt { .. })));
    }

    #[test]
    fn a_recycled_pid_is_stale_and_the_live_process_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        let me = ProcId::of(std::process::id()).unwrap();
        let other = ProcId {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        store.write(&rec(Some(other))).unwrap();
        assert!(store.find_orphan().unwrap().is_none());
        assert!(store.read().unwrap().is_none(), "a stale record is removed");

        store.write(&rec(Some(me))).unwrap();
        let o = store.find_orphan().unwrap().expect("we are alive");
        assert_eq!(o.pid(), me.pid);
        assert!(o.check_names(&["http".into()]).is_ok());
        let e = o.check_names(&["web".into()]).unwrap_err().to_string();
        assert!(e.contains("restart with the same --listen list"), "{e}");
        // Whatever our fd 3 is, it is not a socket listening on port 1.
        let e = o.fetch_listener(0).unwrap_err().to_string();
        assert!(e.contains(&format!("Stop pid {}", me.pid)), "{e}");
        assert!(o.fetch_listener(1).is_err());
    }
}
