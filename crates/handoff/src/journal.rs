//! The supervisor's journal: one small JSON record in the state dir saying
//! which handoff is in flight and how far it got.
//!
//! Written atomically at every phase (write a temp file, fsync it, rename it
//! over the journal, fsync the directory) so that after a crash — of the
//! supervisor or the whole machine — the file is either the previous record
//! or the new one, never a torn mix. JSON so an operator can `cat` it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::clock::now_ms;
use crate::phase::SupervisorPhase;
use crate::protocol::HandoffId;

/// File name of the journal inside the state dir.
pub const JOURNAL_FILE: &str = "handoff.journal";

/// What the journal records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRecord {
    /// The handoff in flight (for a successor prepared ahead, the id its
    /// handoff will take).
    pub handoff_id: HandoffId,
    /// The phase the supervisor entered last: how far the handoff got. The
    /// file spells it as the variant's name (`"AwaitingReady"`), not as
    /// [`SupervisorPhase::name`] does.
    pub phase: SupervisorPhase,
    /// Pid of the incumbent being handed off from; `None` for a first start
    /// or a crash restart (a handoff from nobody).
    pub incumbent_pid: Option<u32>,
    /// Pid of the successor, once spawned. A restarted supervisor stops
    /// this process unless it turns out to be the incumbent
    /// (docs/design.md §6.5), which is why the record naming it must be
    /// durable before Begin.
    pub successor_pid: Option<u32>,
    /// Milliseconds since the Unix epoch when the handoff started.
    pub started_at: u64,
}

/// Errors reading or writing the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Replacing or removing the journal failed (creating the temp file,
    /// writing, fsync, rename, unlink, or the fsync of the directory): the
    /// state dir is full, read-only or gone.
    #[error("writing journal {path}: {source}")]
    Write {
        /// The journal's path.
        path: PathBuf,
        /// The failed operation's error.
        source: io::Error,
    },
    /// The journal exists but could not be read.
    #[error("reading journal {path}: {source}")]
    Read {
        /// The journal's path.
        path: PathBuf,
        /// The read's error.
        source: io::Error,
    },
    /// The journal is not a record this build can parse. A crash cannot
    /// tear it (every write replaces it whole), so something else changed
    /// it. Recovery stops there: the operator inspects it, then deletes it.
    #[error("journal {path} is corrupt ({source}); inspect it, then delete it to continue")]
    Corrupt {
        /// The journal's path.
        path: PathBuf,
        /// Why it does not parse.
        source: serde_json::Error,
    },
}

/// Handle on the journal file.
#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
    dir: PathBuf,
}

impl Journal {
    /// The journal of the service whose state dir is `state_dir`
    /// (`<state_dir>/handoff.journal`). Touches nothing on disk.
    pub fn new(state_dir: &Path) -> Journal {
        Journal {
            path: state_dir.join(JOURNAL_FILE),
            dir: state_dir.to_path_buf(),
        }
    }

    /// Where the journal file is (whether it exists or not).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Atomically replaces the journal with `record`.
    pub fn write(&self, record: &JournalRecord) -> Result<(), JournalError> {
        let err = |source| JournalError::Write {
            path: self.path.clone(),
            source,
        };
        write_json_atomic(&self.dir, &self.path, record).map_err(err)
    }

    /// Reads the journal; `None` when no handoff is in flight.
    pub fn read(&self) -> Result<Option<JournalRecord>, JournalError> {
        match fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| JournalError::Corrupt {
                    path: self.path.clone(),
                    source,
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Removes the journal (durably): no handoff in flight.
    pub fn clear(&self) -> Result<(), JournalError> {
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(JournalError::Write {
                    path: self.path.clone(),
                    source,
                })
            }
        }
        sync_dir(&self.dir).map_err(|source| JournalError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Writes journal records on a background thread, in order, so the fsyncs
/// overlap the protocol instead of sitting on its critical path.
///
/// Each record replaces the whole journal, so when writes queue up only the
/// newest matters: the writer coalesces to it. Callers wait (with
/// [`wait`](Self::wait)) only where durability is load-bearing — before the
/// successor is sent Begin (from then on it holds the state lock, so a
/// restarted supervisor must find its pid), and before a handoff returns
/// (so the journal is cleared when the caller sees the outcome).
#[derive(Debug)]
pub struct JournalWriter {
    journal: Journal,
    shared: std::sync::Arc<(std::sync::Mutex<WriterState>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
enum Op {
    Write(JournalRecord),
    Clear,
}

#[derive(Debug, Default)]
struct WriterState {
    pending: Option<(u64, Op)>,
    submitted: u64,
    durable: u64,
    /// First failure, with the sequence number it happened at.
    failed: Option<(u64, io::ErrorKind, String)>,
    stop: bool,
}

impl JournalWriter {
    /// Starts the writer thread for `journal`; fails only if the thread
    /// cannot be spawned. Dropping the writer writes what is still queued,
    /// then stops the thread.
    pub fn new(journal: Journal) -> io::Result<JournalWriter> {
        let shared = std::sync::Arc::new((
            std::sync::Mutex::new(WriterState::default()),
            std::sync::Condvar::new(),
        ));
        let s = shared.clone();
        let j = journal.clone();
        let thread = std::thread::Builder::new()
            .name("handoff-journal".into())
            .spawn(move || Self::run(j, s))?;
        Ok(JournalWriter {
            journal,
            shared,
            thread: Some(thread),
        })
    }

    fn run(j: Journal, s: std::sync::Arc<(std::sync::Mutex<WriterState>, std::sync::Condvar)>) {
        let (m, cv) = &*s;
        loop {
            let mut st = m.lock().unwrap_or_else(|p| p.into_inner());
            while st.pending.is_none() && !st.stop {
                st = cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            let Some((seq, op)) = st.pending.take() else {
                return; // stopping with nothing left to write
            };
            drop(st);
            let r = match &op {
                Op::Write(rec) => j.write(rec),
                Op::Clear => j.clear(),
            };
            let mut st = m.lock().unwrap_or_else(|p| p.into_inner());
            st.durable = seq;
            if let Err(e) = r {
                let (kind, msg) = match &e {
                    JournalError::Write { source, .. } | JournalError::Read { source, .. } => {
                        (source.kind(), source.to_string())
                    }
                    other => (io::ErrorKind::Other, other.to_string()),
                };
                st.failed.get_or_insert((seq, kind, msg));
            }
            drop(st);
            cv.notify_all();
        }
    }

    fn submit(&self, op: Op) -> u64 {
        let (m, cv) = &*self.shared;
        let mut st = m.lock().unwrap_or_else(|p| p.into_inner());
        st.submitted += 1;
        let seq = st.submitted;
        st.pending = Some((seq, op));
        drop(st);
        cv.notify_all();
        seq
    }

    /// Queues `record` to replace the journal; returns its sequence number.
    pub fn write(&self, record: &JournalRecord) -> u64 {
        self.submit(Op::Write(record.clone()))
    }

    /// Queues the removal of the journal.
    pub fn clear(&self) -> u64 {
        self.submit(Op::Clear)
    }

    /// Blocks until operation `seq` (or a later one superseding it) is
    /// durable. A failed write is reported to every waiter from then on.
    pub fn wait(&self, seq: u64) -> Result<(), JournalError> {
        let (m, cv) = &*self.shared;
        let mut st = m.lock().unwrap_or_else(|p| p.into_inner());
        while st.durable < seq && st.failed.is_none() {
            st = cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        match &st.failed {
            Some((_, kind, msg)) => Err(JournalError::Write {
                path: self.journal.path().to_path_buf(),
                source: io::Error::new(*kind, msg.clone()),
            }),
            None => Ok(()),
        }
    }

    /// Forgets a reported failure (a new handoff starts afresh).
    pub fn reset_error(&self) {
        let (m, _) = &*self.shared;
        m.lock().unwrap_or_else(|p| p.into_inner()).failed = None;
    }

    /// The journal this writer replaces, for reading it directly.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }
}

impl Drop for JournalWriter {
    fn drop(&mut self) {
        let (m, cv) = &*self.shared;
        m.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Replaces `path` (inside `dir`) with `value` as JSON, durably and
/// atomically: a temp file in the same directory, fsync, rename, fsync of
/// the directory. A crash leaves the old content or the new, never a mix;
/// the journal and the notify-mode record both depend on that.
pub(crate) fn write_json_atomic<T: serde::Serialize>(
    dir: &Path,
    path: &Path,
    value: &T,
) -> io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    // A new file (O_EXCL, O_NOFOLLOW, 0600): the name is predictable, so
    // an existing one is never written through. One left by a process that
    // had our pid and crashed is removed (unlinking a planted symlink
    // removes the link, not its target) and the create tried once more.
    let create = || {
        crate::private_fs::open_file(OpenOptions::new().write(true).create_new(true), &tmp)
            .map_err(io::Error::from)
    };
    let mut f = match create() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(&tmp)?;
            create()?
        }
        other => other?,
    };
    let written = f
        .write_all(&bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    drop(f);
    if let Err(e) = written {
        // A full disk must not leave the temp file behind to fill it more.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// fsync on a directory makes a rename or unlink inside it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_clear() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        assert_eq!(j.read().unwrap(), None);
        let mut r = JournalRecord {
            handoff_id: 9,
            phase: SupervisorPhase::Negotiating,
            incumbent_pid: Some(1),
            successor_pid: None,
            started_at: now_ms(),
        };
        j.write(&r).unwrap();
        assert_eq!(j.read().unwrap(), Some(r.clone()));
        r.phase = SupervisorPhase::Sealing;
        r.successor_pid = Some(2);
        j.write(&r).unwrap();
        assert_eq!(j.read().unwrap(), Some(r));
        j.clear().unwrap();
        assert_eq!(j.read().unwrap(), None);
        j.clear().unwrap();
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn temp_file_is_new_private_and_never_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        // A link planted at the predictable temp name: removed, not
        // written through.
        let target = dir.path().join("target");
        let tmp = dir
            .path()
            .join(format!(".{JOURNAL_FILE}.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        let r = JournalRecord {
            handoff_id: 1,
            phase: SupervisorPhase::Negotiating,
            incumbent_pid: None,
            successor_pid: None,
            started_at: 0,
        };
        j.write(&r).unwrap();
        assert!(!target.exists());
        assert!(fs::symlink_metadata(&tmp).is_err(), "temp file left behind");
        let mode = fs::metadata(j.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    /// Issue 14, item 10: a journal write that fails on a full disk leaves
    /// no `.handoff.journal.<pid>.tmp` behind (it would keep the disk full)
    /// and the previous record intact. A real ENOSPC, from a small tmpfs;
    /// mounting needs root, so elsewhere the test says it skips.
    #[test]
    fn a_disk_full_write_leaves_no_temp_file_and_the_old_record() {
        use std::process::Command;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: mounting a tmpfs needs root (run the tests as root to cover it)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "handoff-test"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                let why = String::from_utf8_lossy(&o.stderr).into_owned();
                eprintln!("SKIPPED: `mount -t tmpfs` was refused: {}", why.trim());
                return;
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run `mount`: {e}");
                return;
            }
        }
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(self.0).status();
            }
        }
        let _unmount = Unmount(dir.path());

        let j = Journal::new(dir.path());
        let old = JournalRecord {
            handoff_id: 1,
            phase: SupervisorPhase::Negotiating,
            incumbent_pid: Some(1),
            successor_pid: None,
            started_at: 0,
        };
        j.write(&old).unwrap();
        // Fill the rest.
        let mut filler = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.path().join("filler"))
            .unwrap();
        let chunk = [0u8; 4096];
        loop {
            match filler.write(&chunk) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        let new = JournalRecord {
            phase: SupervisorPhase::Sealing,
            successor_pid: Some(2),
            ..old.clone()
        };
        let e = j.write(&new).unwrap_err();
        assert!(e.to_string().contains("No space left on device"), "{e}");
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["filler", JOURNAL_FILE], "left behind");
        assert_eq!(j.read().unwrap(), Some(old));
    }

    #[test]
    fn writer_orders_coalesces_and_waits() {
        let dir = tempfile::tempdir().unwrap();
        let w = JournalWriter::new(Journal::new(dir.path())).unwrap();
        let mut r = JournalRecord {
            handoff_id: 1,
            phase: SupervisorPhase::Negotiating,
            incumbent_pid: None,
            successor_pid: None,
            started_at: 0,
        };
        let mut last = 0;
        for pid in 0..100 {
            r.successor_pid = Some(pid);
            last = w.write(&r);
        }
        w.wait(last).unwrap();
        assert_eq!(w.journal().read().unwrap().unwrap().successor_pid, Some(99));
        let c = w.clear();
        w.wait(c).unwrap();
        assert_eq!(w.journal().read().unwrap(), None);
    }

    #[test]
    fn writer_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let w = JournalWriter::new(Journal::new(&dir.path().join("missing"))).unwrap();
        let seq = w.write(&JournalRecord {
            handoff_id: 1,
            phase: SupervisorPhase::Negotiating,
            incumbent_pid: None,
            successor_pid: None,
            started_at: 0,
        });
        let e = w.wait(seq).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        w.reset_error();
    }

    #[test]
    fn corrupt_journal_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        fs::write(j.path(), b"{not json").unwrap();
        let e = j.read().unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
}
